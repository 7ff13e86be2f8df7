//! The safety rules of `DESIGN.md`, one test per claim, driving one core by hand (or the
//! simulated world with faults off where two hosts are needed).
//!
//! These tests must never reach into the core's internals: only inputs, actions and the
//! status view, as the daemon will.

mod world;

use failoverd_core::{
    Action, Body, Check, Command, CommandId, Config, ConfigError, Core, Effect, Input, Level, Mac,
    Millis, OpId, Outcome, PeerMessage, Refusal, Role, RoleCause, MAX_EPOCH, MAX_EPOCH_STEP,
};
use world::{sim_config, Faults, World};

const IMPOSTOR: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

/// One core driven by hand, with a clock in milliseconds.
struct One {
    core: Core,
    now: u64,
    pending: Option<(OpId, Effect)>,
}

impl One {
    fn start(leftover: bool, epoch: u64, generation: Option<u64>) -> One {
        let mut one = One {
            core: Core::new(sim_config()).expect("valid config"),
            now: 1_000,
            pending: None,
        };
        one.feed(Input::Started {
            leftover_address: leftover,
            persisted_epoch: epoch,
            newest_generation: generation,
        });
        one
    }

    /// A live core under `epoch`: started with a leftover the peer confirms.
    fn live(epoch: u64) -> One {
        let mut one = One::start(true, epoch, Some(7));
        one.peer(epoch, false, false, Body::Heartbeat);
        one.ok(Outcome::Announced);
        one.ok(Outcome::ConodeStarted);
        assert_eq!(one.core.status().role, Role::Live);
        one
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        self.core.handle(Millis(self.now), input);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.core.poll_action() {
            if let Action::Do { op, effect } = a {
                self.pending = Some((op, effect));
            }
            out.push(a);
        }
        out
    }

    /// Advances the clock by `ms`, firing timers on the way.
    fn wait(&mut self, ms: u64) -> Vec<Action> {
        let end = self.now + ms;
        let mut out = Vec::new();
        while let Some(at) = self.core.poll_timeout().filter(|t| t.0 <= end) {
            self.now = self.now.max(at.0);
            self.core.handle_timeout(at);
            out.extend(self.drain());
        }
        self.now = end;
        out
    }

    fn answer(&mut self, result: Result<Outcome, String>) -> Vec<Action> {
        let (op, _) = self.pending.take().expect("an effect is pending");
        self.feed(Input::Outcome { op, result })
    }

    fn ok(&mut self, outcome: Outcome) -> Vec<Action> {
        self.answer(Ok(outcome))
    }

    fn peer(&mut self, epoch: u64, live: bool, may_hold: bool, body: Body) -> Vec<Action> {
        self.feed(Input::Peer(PeerMessage {
            epoch,
            live,
            may_hold,
            newest_generation: Some(1),
            body,
        }))
    }

    fn command(&mut self, id: u64, command: Command) -> Vec<Action> {
        self.feed(Input::Command {
            id: CommandId(id),
            command,
        })
    }
}

fn effects(actions: &[Action]) -> Vec<Effect> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Do { effect, .. } => Some(*effect),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<Result<String, String>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { result, .. } => Some(result.clone()),
            _ => None,
        })
        .collect()
}

fn refusals(actions: &[Action]) -> Vec<(Refusal, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(PeerMessage {
                body: Body::Refused { of, reason, .. },
                ..
            }) => Some((*of, reason.clone())),
            _ => None,
        })
        .collect()
}

fn refused(actions: &[Action]) -> String {
    match replies(actions).as_slice() {
        [Err(reason)] => reason.clone(),
        other => panic!("expected one refusal, got {other:?}"),
    }
}

#[test]
fn never_claims_at_boot() {
    for leftover in [false, true] {
        let mut one = One::start(leftover, 4, Some(9));
        let mut all = Vec::new();
        for _ in 0..50 {
            all.extend(one.peer(4, false, false, Body::Heartbeat));
            all.extend(one.wait(100));
        }
        all.extend(one.wait(10_000));
        let claimed = effects(&all).into_iter().any(|e| {
            matches!(
                e,
                Effect::ProbeAddress | Effect::AddAddress | Effect::PersistEpoch(_)
            )
        });
        assert!(!claimed, "leftover {leftover}: {all:?}");
    }
}

#[test]
fn leftover_address_is_removed_unless_peer_confirms_current_epoch() {
    // Confirmed: the peer is at our epoch or below and has no copy.
    let mut one = One::start(true, 5, Some(9));
    let out = one.peer(5, false, false, Body::Heartbeat);
    assert_eq!(effects(&out), [Effect::Announce]);
    one.ok(Outcome::Announced);
    assert_eq!(effects(&one.ok(Outcome::ConodeStarted)), []);
    assert_eq!(one.core.status().role, Role::Live);

    // The peer reports a higher epoch, or says it may hold the address.
    for (epoch, may_hold) in [(6, false), (4, true)] {
        let mut one = One::start(true, 5, Some(9));
        let out = one.peer(epoch, false, may_hold, Body::Heartbeat);
        assert_eq!(
            effects(&out),
            [Effect::RemoveAddress],
            "peer {epoch} {may_hold}"
        );
        assert!(one.core.may_hold());
        one.ok(Outcome::AddressRemoved);
        one.ok(Outcome::ConodeStopped);
        assert!(!one.core.may_hold());
    }

    // The peer stays silent: removed after the grace (a safe default).
    let mut one = One::start(true, 5, Some(9));
    assert_eq!(effects(&one.wait(sim_config().leftover_grace.0 - 1)), []);
    assert_eq!(effects(&one.wait(1)), [Effect::RemoveAddress]);
}

#[test]
fn higher_epoch_drops_the_address_at_once() {
    let mut one = One::live(5);
    let out = one.peer(6, false, false, Body::Heartbeat);
    assert_eq!(
        effects(&out),
        [Effect::RemoveAddress],
        "in the same call: {out:?}"
    );
    assert_eq!(one.core.status().role, Role::Standby);
    assert!(
        one.core.status().vip_held,
        "still may hold until the removal is confirmed"
    );
    assert_eq!(
        effects(&one.ok(Outcome::AddressRemoved)),
        [Effect::StopConode]
    );
    one.ok(Outcome::ConodeStopped);
    assert!(!one.core.may_hold() && one.core.is_settled());
}

#[test]
fn a_host_whose_link_comes_back_drops_at_once_when_it_hears_the_higher_epoch() {
    // Outside the model's guarantee (DESIGN.md): `a` held the address under 3 with its
    // link down; `b` was force-promoted under 4. The link returns: both see the conflict.
    let mut a = One::live(3);
    let mut b = One::live(4);
    let from_a = a.feed(Input::ConflictSeen {
        mac: Mac([2, 0, 0, 0, 0, 0xb]),
    });
    let from_b = b.feed(Input::ConflictSeen {
        mac: Mac([2, 0, 0, 0, 0, 0xa]),
    });
    // Each tells the other its epoch right away.
    let sent = |out: &[Action]| {
        out.iter()
            .find_map(|x| match x {
                Action::Send(m) => Some(m.clone()),
                _ => None,
            })
            .expect("a message to the peer")
    };
    let (to_b, to_a) = (sent(&from_a), sent(&from_b));
    assert_eq!(effects(&b.feed(Input::Peer(to_b))), []);
    assert_eq!(effects(&a.feed(Input::Peer(to_a))), [Effect::RemoveAddress]);
    assert_eq!(b.core.status().role, Role::Live);
    assert_eq!(a.core.status().conflicts, 1);
}

#[test]
fn conflict_is_resolved_by_epoch_and_always_counted() {
    // The peer is at a lower epoch: keep the address, announce again.
    let mut one = One::live(5);
    one.peer(4, false, false, Body::Heartbeat);
    let out = one.feed(Input::ConflictSeen { mac: IMPOSTOR });
    assert_eq!(effects(&out), [Effect::Announce]);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Log { text, .. } if text.contains("52:54:00:aa:bb:cc"))));
    assert_eq!(one.core.status().conflicts, 1);
    // The peer may hold it under the same epoch: we cannot tell who is right; drop.
    one.ok(Outcome::Announced);
    one.peer(5, false, true, Body::Heartbeat);
    let out = one.feed(Input::ConflictSeen { mac: IMPOSTOR });
    assert_eq!(effects(&out), [Effect::RemoveAddress]);
    assert_eq!(one.core.status().conflicts, 2);
}

#[test]
fn stale_epoch_handover_is_refused() {
    let mut one = One::start(false, 5, Some(9));
    let out = one.peer(4, false, false, Body::Handover { generation: 3 });
    assert_eq!(effects(&out), []);
    let r = refusals(&out);
    assert!(
        matches!(r.as_slice(), [(Refusal::Handover, why)] if why.contains("stale epoch")),
        "{r:?}"
    );
    assert_eq!(one.core.status().role, Role::Standby);
}

#[test]
fn stale_epoch_handover_request_is_refused() {
    let mut one = One::live(5);
    let out = one.peer(4, false, false, Body::HandoverRequest { ask: 1 });
    assert_eq!(effects(&out), [], "nothing stopped");
    assert!(
        matches!(refusals(&out).as_slice(), [(Refusal::HandoverRequest, why)] if why.contains("stale epoch"))
    );
    assert_eq!(one.core.status().role, Role::Live);
}

/// Logged lines at `level`.
fn logs(actions: &[Action], level: Level) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log { level: l, text } if *l == level => Some(text.clone()),
            _ => None,
        })
        .collect()
}

/// `(of, request_epoch)` of every refusal sent to the peer.
fn refused_epochs(actions: &[Action]) -> Vec<(Refusal, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(PeerMessage {
                body: Body::Refused {
                    of, request_epoch, ..
                },
                ..
            }) => Some((*of, *request_epoch)),
            _ => None,
        })
        .collect()
}

/// A live host, and a standby that heard its (not live) peer, both at epoch 5.
fn live_and_standby_at_5() -> [(&'static str, One); 2] {
    let mut standby = One::start(false, 5, Some(7));
    standby.peer(5, false, false, Body::Heartbeat);
    [("live", One::live(5)), ("standby", standby)]
}

#[test]
fn a_future_epoch_from_the_peer_is_refused_and_changes_nothing() {
    let bodies = [
        Body::Heartbeat,
        Body::HandoverRequest { ask: 1 },
        Body::Handover { generation: 7 },
        Body::HandoverAck { from_epoch: 5 },
        Body::Refused {
            of: Refusal::Handover,
            request_epoch: 5,
            reason: "busy".into(),
        },
    ];
    // Past the step above the highest epoch seen (5), past the ceiling, and the largest
    // numbers the wire can carry.
    let future = [
        5 + MAX_EPOCH_STEP + 1,
        MAX_EPOCH + 1,
        u64::MAX - 1,
        u64::MAX,
    ];
    for epoch in future {
        for body in &bodies {
            for (name, mut one) in live_and_standby_at_5() {
                let case = format!("{name}, epoch {epoch}, {body:?}");
                let before = one.core.status();
                let out = one.peer(epoch, true, true, body.clone());
                assert_eq!(effects(&out), [], "{case}: nothing done: {out:?}");
                assert_eq!(replies(&out), [], "{case}");
                assert_eq!(one.core.status(), before, "{case}: nothing changed");
                let errors = logs(&out, Level::Error);
                assert!(
                    matches!(errors.as_slice(), [t] if t.contains(&format!("future epoch {epoch}")) && t.contains("nothing changed")),
                    "{case}: logged loudly, once: {out:?}"
                );
                // Answered so the peer's log says it too; a refusal is not answered.
                let answered = refused_epochs(&out);
                if matches!(body, Body::Refused { .. }) {
                    assert_eq!(answered, [], "{case}");
                } else {
                    assert_eq!(answered, [(Refusal::Message, epoch)], "{case}");
                }
                // Later: nothing persisted (a standby records epochs it took at its
                // heartbeat), the address kept, the epoch the same.
                let later = one.wait(2_000);
                let e = effects(&later);
                assert!(
                    !e.iter().any(|e| matches!(
                        e,
                        Effect::PersistEpoch(_) | Effect::RemoveAddress | Effect::StopConode
                    )),
                    "{case}: {e:?}"
                );
                assert_eq!(one.core.status().role, before.role, "{case}");
                assert_eq!(one.core.status().epoch, 5, "{case}");
            }
        }
    }
}

#[test]
fn a_future_epoch_repeated_is_logged_loudly_once_and_a_claim_ignores_it() {
    let mut one = One::start(false, 5, Some(7));
    one.peer(5, false, false, Body::Heartbeat);
    let forged = 5 + MAX_EPOCH_STEP + 1;
    assert_eq!(
        logs(
            &one.peer(forged, false, false, Body::Heartbeat),
            Level::Error
        )
        .len(),
        1
    );
    let again = one.peer(forged, false, false, Body::Heartbeat);
    assert_eq!(logs(&again, Level::Error), Vec::<String>::new());
    assert_eq!(refused_epochs(&again), [(Refusal::Message, forged)]);
    // The next claim is one above the real epochs, not above the forged one.
    one.peer(5, false, false, Body::Heartbeat);
    assert_eq!(
        effects(&one.command(1, Command::Promote { force: false })),
        [Effect::QuickProbe]
    );
    one.ok(Outcome::ProbeResult { holder: None });
    assert_eq!(
        effects(&one.ok(Outcome::GenerationInstalled(7))),
        [Effect::PersistEpoch(6)]
    );
}

#[test]
fn a_peer_far_ahead_within_the_step_is_heard() {
    // A legitimate peer claimed many times while this host was down or cut off: up to
    // MAX_EPOCH_STEP above what this host has seen, it is taken as the real epoch.
    let ahead = 5 + MAX_EPOCH_STEP;
    let [(_, mut live), (_, mut standby)] = live_and_standby_at_5();
    assert_eq!(
        effects(&live.peer(ahead, true, true, Body::Heartbeat)),
        [Effect::RemoveAddress],
        "the higher epoch wins at once"
    );
    standby.peer(ahead, true, true, Body::Heartbeat);
    assert_eq!(standby.core.status().peer.epoch, ahead);
    assert_eq!(
        effects(&standby.wait(100)),
        [Effect::PersistEpoch(ahead)],
        "recorded at the next heartbeat"
    );
}

#[test]
fn a_host_whose_epoch_the_peer_refuses_says_so() {
    let mut one = One::start(false, 5, Some(7));
    let refusal = Body::Refused {
        of: Refusal::Message,
        request_epoch: 5,
        reason: "future epoch 5: ...".into(),
    };
    let out = one.peer(3, false, false, refusal.clone());
    assert!(
        matches!(logs(&out, Level::Error).as_slice(), [t] if t.contains("refuses this host's messages under epoch 5")),
        "{out:?}"
    );
    assert_eq!(effects(&out), []);
    assert_eq!(
        logs(&one.peer(3, false, false, refusal), Level::Error),
        Vec::<String>::new()
    );
}

#[test]
fn the_epoch_never_saturates() {
    // The last epoch there is can be claimed once...
    let mut one = One::start(false, MAX_EPOCH - 1, Some(4));
    one.wait(1_000);
    one.command(1, Command::Promote { force: true });
    one.ok(Outcome::ProbeResult { holder: None });
    assert_eq!(
        effects(&one.ok(Outcome::GenerationInstalled(4))),
        [Effect::PersistEpoch(MAX_EPOCH)]
    );
    for outcome in [
        Outcome::EpochPersisted(MAX_EPOCH),
        Outcome::ProbeResult { holder: None },
        Outcome::AddressAdded,
        Outcome::Announced,
        Outcome::ConodeStarted,
    ] {
        one.ok(outcome);
    }
    assert_eq!(one.core.status().role, Role::Live);
    one.command(2, Command::Demote);
    one.ok(Outcome::ConodeStopped);
    one.ok(Outcome::AddressRemoved);
    assert_eq!(one.core.status().role, Role::Standby);
    // ...and no claim after it: refused up front, nothing persisted, not u64::MAX.
    let out = one.command(3, Command::Promote { force: true });
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("no epoch is left"), "{out:?}");
    assert_eq!(one.core.status().epoch, MAX_EPOCH);

    // A corrupt epoch file at u64::MAX: said at start, and promote refused.
    let mut corrupt = One {
        core: Core::new(sim_config()).expect("valid config"),
        now: 1_000,
        pending: None,
    };
    let out = corrupt.feed(Input::Started {
        leftover_address: false,
        persisted_epoch: u64::MAX,
        newest_generation: Some(4),
    });
    assert!(
        matches!(logs(&out, Level::Error).as_slice(), [t] if t.contains("corrupt epoch file")),
        "{out:?}"
    );
    corrupt.wait(1_000);
    let out = corrupt.command(1, Command::Promote { force: true });
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("no epoch is left"));

    // A handover under the last epoch is refused (the peer takes its address back).
    let mut one = One::start(false, MAX_EPOCH, Some(4));
    let out = one.peer(MAX_EPOCH, false, false, Body::Handover { generation: 4 });
    assert_eq!(effects(&out), []);
    assert!(
        matches!(refusals(&out).as_slice(), [(Refusal::Handover, why)] if why.contains("no epoch is left")),
        "{out:?}"
    );

    // A standby that took the peer's (legitimate, within the step) last epoch.
    let mut one = One::start(false, MAX_EPOCH - 3, Some(4));
    one.peer(MAX_EPOCH, false, false, Body::Heartbeat);
    let out = one.command(1, Command::Promote { force: false });
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("no epoch is left"));
}

#[test]
fn handover_onto_an_older_generation_is_refused() {
    let mut one = One::start(false, 5, Some(3));
    let out = one.peer(5, false, false, Body::Handover { generation: 4 });
    assert_eq!(effects(&out), []);
    assert!(
        matches!(refusals(&out).as_slice(), [(Refusal::Handover, why)] if why.contains("older than the final generation 4"))
    );
}

#[test]
fn switchover_installs_the_final_generation_before_claiming() {
    let mut w = World::new(1, Faults::NONE, false);
    w.run_for(500).unwrap(); // the hosts hear each other
    w.command(0, Command::Promote { force: false });
    w.run_for(1_000).unwrap();
    assert_eq!(w.live_host(), Some(0));
    let before = w.epoch(0);
    w.hosts[1].applied.clear();
    let id = w.command(0, Command::Switchover);
    w.run_for(3_000).unwrap();
    assert!(
        matches!(w.reply_to(id), Some(Ok(_))),
        "{:?}",
        w.reply_to(id)
    );
    assert_eq!(w.live_host(), Some(1));
    assert!(w.hosts[1].addr && !w.hosts[0].addr);
    assert!(w.epoch(1) > before);
    let steps: Vec<_> = w.hosts[1]
        .applied
        .iter()
        .copied()
        .filter(|e| *e != Effect::Announce)
        .collect();
    assert_eq!(
        steps,
        [
            Effect::InstallGeneration(w.floor),
            Effect::PersistEpoch(before + 1),
            Effect::ProbeAddress,
            Effect::AddAddress,
            Effect::StartConode
        ]
    );
}

#[test]
fn switchover_asked_on_either_host_moves_the_address_and_grows_the_epoch() {
    let mut w = World::new(2, Faults::NONE, false);
    w.run_for(500).unwrap();
    w.command(0, Command::Promote { force: false });
    w.run_for(1_000).unwrap();
    // (asked on the live host?, command): each moves the address to the other host.
    for (on_live, command) in [
        (true, Command::Switchover),
        (false, Command::Switchover),
        (false, Command::Promote { force: false }),
        (true, Command::Switchover),
    ] {
        let from = w.live_host().expect("a live host");
        let before = w.epoch(from);
        let id = w.command(if on_live { from } else { 1 - from }, command);
        w.run_for(3_000).unwrap();
        assert!(
            matches!(w.reply_to(id), Some(Ok(_))),
            "{command:?}: {:?}",
            w.reply_to(id)
        );
        assert_eq!(w.live_host(), Some(1 - from));
        assert!(w.hosts[1 - from].addr && !w.hosts[from].addr);
        assert!(w.epoch(1 - from) > before);
        // Each side says why its role changed (metrics and hooks name it).
        let cause = |h: usize| {
            let st = w.hosts[h].core.as_ref().expect("running").status();
            st.role_cause.map(|(c, _)| c)
        };
        assert_eq!(cause(1 - from), Some(RoleCause::Switchover));
        assert_eq!(cause(from), Some(RoleCause::HandedOver));
    }
}

#[test]
fn a_demote_names_its_cause() {
    let mut one = One::live(4);
    one.command(1, Command::Demote);
    let (cause, why) = one.core.status().role_cause.expect("a cause");
    assert_eq!(cause, RoleCause::Demote);
    assert_eq!(cause.label(), "demote");
    assert!(why.contains("demoted by the operator"), "{why}");
}

#[test]
fn a_refused_handover_is_taken_back_onto_the_newest_generation() {
    let mut one = One::live(5);
    one.peer(5, false, false, Body::Heartbeat);
    assert_eq!(
        effects(&one.command(1, Command::Switchover)),
        [Effect::ShipFinalSnapshot],
        "the final snapshot is taken while the conode still serves reads"
    );
    assert_eq!(
        effects(&one.ok(Outcome::FinalSnapshotShipped { generation: 9 })),
        [Effect::StopConode]
    );
    let out = one.ok(Outcome::ConodeStopped);
    assert_eq!(effects(&out), [Effect::RemoveAddress]);
    let out = one.ok(Outcome::AddressRemoved);
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Send(m) if m.body == Body::Handover { generation: 9 })));
    // Since then the peer was live and shipped us a newer final snapshot (seed 69195).
    one.feed(Input::GenerationVerified { generation: 10 });
    let refusal = Body::Refused {
        of: Refusal::Handover,
        request_epoch: 5,
        reason: "busy".into(),
    };
    let out = one.peer(6, false, false, refusal);
    assert_eq!(effects(&out), [Effect::InstallGeneration(10)]);
    assert_eq!(
        effects(&one.ok(Outcome::GenerationInstalled(10))),
        [Effect::PersistEpoch(7)]
    );
    // A refusal while the peer may hold the address is not a refusal to act on.
    let mut other = One::live(5);
    other.peer(5, false, false, Body::Heartbeat);
    other.command(1, Command::Switchover);
    other.ok(Outcome::FinalSnapshotShipped { generation: 9 });
    other.ok(Outcome::ConodeStopped);
    other.ok(Outcome::AddressRemoved);
    let refusal = Body::Refused {
        of: Refusal::Handover,
        request_epoch: 5,
        reason: "stale".into(),
    };
    assert_eq!(effects(&other.peer(6, true, true, refusal)), []);
}

#[test]
fn forced_promote_refuses_without_a_verified_generation() {
    let mut one = One::start(false, 2, None);
    one.wait(1_000);
    let out = one.command(1, Command::Promote { force: true });
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("no verified generation"));
}

#[test]
fn promote_without_force_refuses_when_the_peer_is_unreachable() {
    let mut one = One::start(false, 2, Some(4));
    one.peer(2, true, true, Body::Heartbeat);
    one.wait(1_000);
    let out = one.command(1, Command::Promote { force: false });
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("--force"));
}

#[test]
fn promote_refuses_when_probe_sees_holder() {
    let mut one = One::start(false, 2, Some(4));
    one.wait(1_000);
    let out = one.command(1, Command::Promote { force: true });
    assert_eq!(
        effects(&out),
        [Effect::QuickProbe],
        "the quick probe comes first"
    );
    let out = one.ok(Outcome::ProbeResult {
        holder: Some(IMPOSTOR),
    });
    assert_eq!(effects(&out), [], "no install, no epoch, no add");
    assert!(refused(&out).contains("52:54:00:aa:bb:cc"));
    assert_eq!(one.core.status().epoch, 2);

    // A holder that appears between the first probe and the add is caught by the second.
    one.command(2, Command::Promote { force: true });
    one.ok(Outcome::ProbeResult { holder: None });
    one.ok(Outcome::GenerationInstalled(4));
    one.ok(Outcome::EpochPersisted(3));
    let out = one.ok(Outcome::ProbeResult {
        holder: Some(IMPOSTOR),
    });
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("52:54:00:aa:bb:cc"));
}

#[test]
fn forced_promote_installs_persists_then_claims() {
    let mut one = One::start(false, 2, Some(4));
    one.wait(1_000);
    let mut seen = effects(&one.command(1, Command::Promote { force: true }));
    for outcome in [
        Outcome::ProbeResult { holder: None },
        Outcome::GenerationInstalled(4),
        Outcome::EpochPersisted(3),
        Outcome::ProbeResult { holder: None },
        Outcome::AddressAdded,
        Outcome::Announced,
    ] {
        seen.extend(effects(&one.ok(outcome)));
    }
    let out = one.ok(Outcome::ConodeStarted);
    assert_eq!(
        seen,
        [
            Effect::QuickProbe,
            Effect::InstallGeneration(4),
            Effect::PersistEpoch(3),
            Effect::ProbeAddress,
            Effect::AddAddress,
            Effect::Announce,
            Effect::StartConode
        ]
    );
    assert!(matches!(replies(&out).as_slice(), [Ok(text)] if text.contains("live under epoch 3")));
    assert_eq!(one.core.status().epoch, 3);
}

#[test]
fn a_generation_verified_during_a_claim_is_installed_before_the_conode_starts() {
    let mut one = One::start(false, 2, Some(4));
    one.wait(1_000);
    one.command(1, Command::Promote { force: true });
    one.ok(Outcome::ProbeResult { holder: None });
    one.ok(Outcome::GenerationInstalled(4));
    one.feed(Input::GenerationVerified { generation: 6 });
    one.ok(Outcome::EpochPersisted(3));
    one.ok(Outcome::ProbeResult { holder: None });
    one.ok(Outcome::AddressAdded);
    assert_eq!(
        effects(&one.ok(Outcome::Announced)),
        [Effect::InstallGeneration(6)]
    );
    assert_eq!(
        effects(&one.ok(Outcome::GenerationInstalled(6))),
        [Effect::StartConode]
    );
    // If that install fails, the conode is not started on the older generation.
    let mut one = One::start(false, 2, Some(4));
    one.wait(1_000);
    one.command(1, Command::Promote { force: true });
    one.ok(Outcome::ProbeResult { holder: None });
    one.ok(Outcome::GenerationInstalled(4));
    one.ok(Outcome::EpochPersisted(3));
    one.ok(Outcome::ProbeResult { holder: None });
    one.ok(Outcome::AddressAdded);
    one.feed(Input::GenerationVerified { generation: 6 });
    one.ok(Outcome::Announced);
    let out = one.answer(Err("disk full".into()));
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("not started on the older generation"));
}

#[test]
fn no_epoch_is_used_before_it_is_persisted() {
    let mut one = One::start(false, 2, Some(4));
    one.wait(1_000);
    one.command(1, Command::Promote { force: true });
    one.ok(Outcome::ProbeResult { holder: None });
    one.ok(Outcome::GenerationInstalled(4));
    // PersistEpoch(3) is pending: every message still carries 2.
    let out = one.wait(200);
    let epochs: Vec<u64> = out
        .iter()
        .filter_map(|a| match a {
            Action::Send(m) => Some(m.epoch),
            _ => None,
        })
        .collect();
    assert!(
        !epochs.is_empty() && epochs.iter().all(|e| *e == 2),
        "{epochs:?}"
    );
    // Persisting fails: no claim under 3.
    let out = one.answer(Err("disk full".into()));
    assert_eq!(effects(&out), []);
    assert!(refused(&out).contains("disk full"));
}

#[test]
fn an_add_without_outcome_counts_as_held_and_is_removed() {
    let mut one = One::start(false, 2, Some(4));
    one.wait(1_000);
    one.command(1, Command::Promote { force: true });
    for outcome in [
        Outcome::ProbeResult { holder: None },
        Outcome::GenerationInstalled(4),
        Outcome::EpochPersisted(3),
    ] {
        one.ok(outcome);
    }
    let out = one.ok(Outcome::ProbeResult { holder: None });
    assert_eq!(effects(&out), [Effect::AddAddress]);
    let out = one.wait(sim_config().action_timeout.0);
    assert_eq!(effects(&out), [Effect::RemoveAddress]);
    assert!(one.core.may_hold());
    assert!(refused(&out).contains("no outcome within"));
    one.ok(Outcome::AddressRemoved);
    assert!(!one.core.may_hold());
}

#[test]
fn a_failed_removal_is_retried_and_still_counts_as_held() {
    let mut one = One::live(5);
    assert_eq!(
        effects(&one.command(1, Command::Demote)),
        [Effect::StopConode]
    );
    assert_eq!(
        effects(&one.ok(Outcome::ConodeStopped)),
        [Effect::RemoveAddress]
    );
    let mut answered = Vec::new();
    for attempt in 1..=3 {
        answered.extend(replies(&one.answer(Err("netlink: device busy".into()))));
        assert!(one.core.status().vip_held);
        assert!(one
            .core
            .status()
            .doing
            .contains(&format!("attempt {attempt} failed")));
        assert_eq!(
            effects(&one.wait(sim_config().remove_retry.0)),
            [Effect::RemoveAddress]
        );
    }
    answered.extend(replies(&one.ok(Outcome::AddressRemoved)));
    assert!(!one.core.may_hold());
    assert!(
        matches!(answered.as_slice(), [Ok(text)] if text.starts_with("demoted")),
        "{answered:?}"
    );
}

#[test]
fn every_action_without_an_outcome_times_out() {
    let mut one = One::live(5);
    one.peer(5, false, false, Body::Heartbeat);
    // Switchover: the conode never reports stopped; the live host stays live (and its
    // conode, frozen by the final snapshot, accepts writes again).
    assert_eq!(
        effects(&one.command(1, Command::Switchover)),
        [Effect::ShipFinalSnapshot]
    );
    assert_eq!(
        effects(&one.ok(Outcome::FinalSnapshotShipped { generation: 8 })),
        [Effect::StopConode]
    );
    let out = one.wait(sim_config().action_timeout.0);
    assert_eq!(effects(&out), [Effect::StartConode]);
    assert!(refused(&out).contains("switchover aborted"));
    assert_eq!(one.core.status().role, Role::Live);
}

#[test]
fn commands_are_refused_where_they_make_no_sense() {
    let mut standby = One::start(false, 3, Some(4));
    standby.peer(3, false, false, Body::Heartbeat);
    assert!(refused(&standby.command(1, Command::Demote)).contains("nothing to demote"));
    assert!(refused(&standby.command(2, Command::Switchover)).contains("not live"));
    let mut live = One::live(3);
    live.wait(1_000); // the peer falls silent
    assert!(refused(&live.command(3, Command::Promote { force: true })).contains("already live"));
    assert!(refused(&live.command(4, Command::Switchover)).contains("peer has not been heard"));
    let mut starting = One::start(true, 3, Some(4));
    assert!(refused(&starting.command(5, Command::Demote)).contains("busy"));
}

#[test]
fn health_verdicts_alert_but_never_promote() {
    let mut one = One::start(false, 3, Some(4));
    one.peer(3, true, true, Body::Heartbeat);
    let mut out = Vec::new();
    for check in [Check::LiveConode, Check::LivePeer] {
        out.extend(one.feed(Input::Health {
            check,
            ok: false,
            reason: "no answer within 2 s".into(),
        }));
    }
    out.extend(one.wait(5_000));
    assert_eq!(effects(&out), []);
    let status = one.core.status();
    assert_eq!(status.role, Role::Standby);
    assert_eq!(status.health.len(), 2);
    assert!(status
        .health
        .iter()
        .all(|h| !h.ok && h.reason == "no answer within 2 s"));
}

#[test]
fn config_validation_names_the_values() {
    let cfg = Config {
        peer_timeout: Millis(100),
        ..sim_config()
    };
    let err = Core::new(cfg).expect_err("peer_timeout below 2 heartbeats");
    assert!(matches!(
        err,
        ConfigError::TooShort {
            name: "peer_timeout",
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "peer_timeout is 100 ms, below 200 ms: it must cover 2 × heartbeat_interval, or one lost heartbeat makes the peer unreachable"
    );
    let cfg = Config {
        remove_retry: Millis(0),
        ..sim_config()
    };
    assert_eq!(
        Core::new(cfg).expect_err("zero").to_string(),
        "remove_retry is 0 ms: it must be positive"
    );
    assert!(Config::default().validate().is_ok());
}

#[test]
fn health_verdicts_belong_to_the_role_they_were_checked_for() {
    let health = |check, ok| Input::Health {
        check,
        ok,
        reason: "checked".into(),
    };
    // A standby (deciding about its leftover) with a failing check of the live conode.
    let mut one = One::start(true, 4, Some(7));
    one.feed(health(Check::LiveConode, false));
    assert_eq!(one.core.status().health.len(), 1);
    // Live now: the standby's verdicts are gone, and a late one is not taken.
    one.peer(4, false, false, Body::Heartbeat);
    one.ok(Outcome::Announced);
    one.ok(Outcome::ConodeStarted);
    assert_eq!(one.core.status().role, Role::Live);
    assert!(one.core.status().health.is_empty());
    one.feed(health(Check::LiveConode, false));
    assert!(one.core.status().health.is_empty());
    one.feed(health(Check::OwnConode, true));
    let h = one.core.status().health;
    assert_eq!((h.len(), h[0].check, h[0].ok), (1, Check::OwnConode, true));
}
