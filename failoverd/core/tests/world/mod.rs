//! A deterministic simulated world for the decision core (test-only): two hosts, each a
//! `Core` and a simulated shell, a faulty peer network, an operator, and a virtual clock.
//!
//! The world advances to the next event (a core deadline, a message delivery, a shell
//! finishing an effect, the next fault), and after every step checks the invariants of
//! `DESIGN.md`. It must never be used outside tests, and it must never weaken a check to
//! let a run pass: a failure is a bug in the core (or in this model, to be fixed here).

#![allow(dead_code)] // each test crate uses its own part of the harness

use std::collections::{HashMap, VecDeque};

use failoverd_core::{
    Action, Body, Command, CommandId, Config, Core, Effect, Input, LeasePolicy, Mac, Millis, OpId,
    Outcome, PeerMessage, Refusal, RoleCause, MAX_EPOCH, MAX_EPOCH_STEP,
};

/// splitmix64: small, seedable, good enough to schedule faults.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// How hostile the world is (rates in per mille).
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Effects that fail cleanly (nothing happened, `Err` reported).
    pub action_fail: u64,
    /// Effects whose outcome is never reported (the effect happened or not, 50/50).
    pub outcome_lost: u64,
    /// Effects slower than their timeout.
    pub slow_action: u64,
    /// Peer messages lost.
    pub msg_drop: u64,
    /// Peer messages delivered twice.
    pub msg_dup: u64,
    /// Peer messages held back long enough to arrive stale and out of order.
    pub msg_late: u64,
}

impl Faults {
    pub const NONE: Faults = Faults {
        action_fail: 0,
        outcome_lost: 0,
        slow_action: 0,
        msg_drop: 0,
        msg_dup: 0,
        msg_late: 0,
    };
    pub const ROUGH: Faults = Faults {
        action_fail: 40,
        outcome_lost: 20,
        slow_action: 20,
        msg_drop: 80,
        msg_dup: 60,
        msg_late: 50,
    };
}

pub const MACS: [Mac; 2] = [Mac([2, 0, 0, 0, 0, 0xa]), Mac([2, 0, 0, 0, 0, 0xb])];
pub const NAMES: [&str; 2] = ["a", "b"];
/// A third host on the link that answers ARP for the address (a stale cache, a
/// misconfigured box): the source of `ConflictSeen` that is not the peer.
pub const IMPOSTOR: Mac = Mac([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);

/// Short timers so a seed covers many switchovers in a few simulated seconds.
pub fn sim_config() -> Config {
    Config {
        heartbeat_interval: Millis(100),
        peer_timeout: Millis(350),
        action_timeout: Millis(300),
        probe_timeout: Millis(300),
        transfer_timeout: Millis(600),
        handover_timeout: Millis(2_500),
        announce_refresh: Millis(1_000),
        leftover_grace: Millis(400),
        remove_retry: Millis(100),
        lease: LeasePolicy::None,
    }
}

/// One simulated host: the kernel's truth, the disk, the conode, the shell's queue and
/// the failoverd process (`core`, `None` while powered off).
pub struct Host {
    pub up: bool,
    pub addr: bool,
    pub disk_epoch: u64,
    pub verified: Option<u64>,
    pub data_gen: u64,
    pub conode: bool,
    /// The running conode was frozen by a final snapshot: it acknowledges no write.
    pub frozen: bool,
    /// The final snapshot this host shipped since its conode last started: when the
    /// conode stops, it must not hold newer data (acknowledged blocks the peer lacks).
    pub final_shipped: Option<u64>,
    pub core: Option<Core>,
    pub incarnation: u64,
    /// Effects applied to this host, in order (for scenario assertions).
    pub applied: Vec<Effect>,
    /// The highest epoch this host's running process knows: its disk at boot, every
    /// peer message delivered to it, every epoch it asked to persist.
    known: u64,
    /// Epochs this process asked to persist that were above all it knew when it asked:
    /// the only epochs a claim may be made under.
    fresh: Vec<u64>,
    /// Its core claimed the address after the last step (to see a claim begin).
    claiming: bool,
    queue: VecDeque<(OpId, Effect)>,
    busy: bool,
}

enum Ev {
    Deliver { to: usize, msg: PeerMessage },
    ShellDone { host: usize, incarnation: u64 },
    Chaos,
    PowerOn { host: usize },
}

/// Counts that show what a run exercised.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub steps: u64,
    pub commands: u64,
    pub replies_ok: u64,
    pub replies_err: u64,
    pub restarts: u64,
    pub power_cycles: u64,
    pub takeovers: u64,
    pub forced: u64,
    pub probe_refusals: u64,
    pub drops: u64,
    pub leftovers_kept: u64,
    pub leftovers_removed: u64,
    pub reclaims: u64,
    /// Claims of the address under a new epoch (leftovers kept are not claims).
    pub claims: u64,
    /// Claims whose epoch was not above every epoch either host claimed before: two
    /// hosts cut from each other (DESIGN.md §4). Not a violation; counted to show it.
    pub claims_not_above_all: u64,
    /// Messages with a future epoch injected, and refused.
    pub forged: u64,
    /// `ConflictSeen` inputs injected.
    pub conflicts: u64,
}

impl Tally {
    pub fn add(&mut self, t: &Tally) {
        self.steps += t.steps;
        self.commands += t.commands;
        self.replies_ok += t.replies_ok;
        self.replies_err += t.replies_err;
        self.restarts += t.restarts;
        self.power_cycles += t.power_cycles;
        self.takeovers += t.takeovers;
        self.forced += t.forced;
        self.probe_refusals += t.probe_refusals;
        self.drops += t.drops;
        self.leftovers_kept += t.leftovers_kept;
        self.leftovers_removed += t.leftovers_removed;
        self.reclaims += t.reclaims;
        self.claims += t.claims;
        self.claims_not_above_all += t.claims_not_above_all;
        self.forged += t.forged;
        self.conflicts += t.conflicts;
    }
}

pub struct World {
    pub now: Millis,
    pub rng: Rng,
    pub faults: Faults,
    pub cfg: Config,
    pub hosts: [Host; 2],
    events: Vec<(Millis, u64, Ev)>,
    seq: u64,
    /// Both directions of the peer link are down.
    pub cut: bool,
    /// Messages from host i are dropped.
    pub one_way: [bool; 2],
    /// Newest generation shipped as a final snapshot: no conode may start on older data.
    pub floor: u64,
    /// The highest epoch any core ever asked to persist: above every epoch any core can
    /// have seen, so a forged message above it by more than the step is a future one.
    max_epoch_asked: u64,
    /// Every claim's epoch, in order, with its host.
    pub claim_epochs: Vec<(usize, u64)>,
    gen_counter: u64,
    next_cmd: u64,
    /// Commands not yet answered: id → (host, incarnation, command).
    pub owed: HashMap<u64, (usize, u64, Command)>,
    /// Every reply, in order.
    pub replies: Vec<(usize, CommandId, Command, Result<String, String>)>,
    violations: Vec<String>,
    /// The last lines of the run, when tracing.
    pub trace: Option<VecDeque<String>>,
    pub chaos_left: u32,
    pub tally: Tally,
}

const TRACE_LINES: usize = 400;

impl World {
    /// Two standby hosts holding generation 1, neither holding the address.
    pub fn new(seed: u64, faults: Faults, trace: bool) -> World {
        let host = || Host {
            up: true,
            addr: false,
            disk_epoch: 0,
            verified: Some(1),
            data_gen: 1,
            conode: false,
            frozen: false,
            final_shipped: None,
            core: None,
            incarnation: 0,
            applied: Vec::new(),
            known: 0,
            fresh: Vec::new(),
            claiming: false,
            queue: VecDeque::new(),
            busy: false,
        };
        let mut w = World {
            now: Millis(0),
            rng: Rng::new(seed),
            faults,
            cfg: sim_config(),
            hosts: [host(), host()],
            events: Vec::new(),
            seq: 0,
            cut: false,
            one_way: [false; 2],
            floor: 0,
            max_epoch_asked: 0,
            claim_epochs: Vec::new(),
            gen_counter: 1,
            next_cmd: 1,
            owed: HashMap::new(),
            replies: Vec::new(),
            violations: Vec::new(),
            trace: trace.then(VecDeque::new),
            chaos_left: 0,
            tally: Tally::default(),
        };
        w.boot(0);
        w.boot(1);
        w
    }

    fn note(&mut self, f: impl FnOnce() -> String) {
        let now = self.now;
        if let Some(t) = &mut self.trace {
            if t.len() == TRACE_LINES {
                t.pop_front();
            }
            t.push_back(format!("{:>6} {}", now.0, f()));
        }
    }

    pub fn trace_text(&self) -> String {
        self.trace
            .as_ref()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn schedule(&mut self, at: Millis, ev: Ev) {
        self.seq += 1;
        self.events.push((at, self.seq, ev));
    }

    /// Starts a failoverd process on host `h` (after a restart or power-on).
    fn boot(&mut self, h: usize) {
        let mut core = match Core::new(self.cfg.clone()) {
            Ok(c) => c,
            Err(e) => panic!("the simulation's config is invalid: {e}"),
        };
        let host = &mut self.hosts[h];
        host.incarnation += 1;
        host.queue.clear();
        host.busy = false;
        host.known = host.disk_epoch;
        host.fresh.clear();
        host.claiming = false;
        let input = Input::Started {
            leftover_address: host.addr,
            persisted_epoch: host.disk_epoch,
            newest_generation: host.verified,
        };
        self.note(|| format!("{} boots: {input:?}", NAMES[h]));
        core.handle(self.now, input);
        self.hosts[h].core = Some(core);
        self.drain(h);
    }

    /// Feeds one input to host `h`'s core (if its process runs) and carries out what it asks.
    pub fn feed(&mut self, h: usize, input: Input) {
        if self.hosts[h].core.is_none() {
            return;
        }
        if self.trace.is_some() {
            let line = format!("{} <- {input:?}", NAMES[h]);
            self.note(|| line);
        }
        let now = self.now;
        if let Some(core) = self.hosts[h].core.as_mut() {
            core.handle(now, input);
        }
        self.drain(h);
    }

    /// An operator command on host `h`; returns its id.
    pub fn command(&mut self, h: usize, command: Command) -> CommandId {
        let id = CommandId(self.next_cmd);
        self.next_cmd += 1;
        if self.hosts[h].core.is_none() {
            return id; // the control socket is down with the process: no reply owed
        }
        self.tally.commands += 1;
        let inc = self.hosts[h].incarnation;
        self.owed.insert(id.0, (h, inc, command));
        self.feed(h, Input::Command { id, command });
        id
    }

    fn drain(&mut self, h: usize) {
        loop {
            let Some(action) = self.hosts[h].core.as_mut().and_then(|c| c.poll_action()) else {
                return;
            };
            self.carry_out(h, action);
        }
    }

    fn carry_out(&mut self, h: usize, action: Action) {
        match action {
            Action::Do { op, effect } => {
                self.note(|| format!("{} -> {effect:?} (op {})", NAMES[h], op.0));
                if let Effect::PersistEpoch(e) = effect {
                    let host = &mut self.hosts[h];
                    if e > host.known {
                        host.fresh.push(e);
                    }
                    host.known = host.known.max(e);
                    self.max_epoch_asked = self.max_epoch_asked.max(e);
                }
                self.hosts[h].queue.push_back((op, effect));
                self.kick(h);
            }
            Action::Send(msg) => self.send(h, msg),
            Action::Reply { id, result } => self.on_reply(h, id, result),
            Action::Log { level, text } => {
                self.count_log(&text);
                self.note(|| format!("{} log {level:?}: {text}", NAMES[h]));
            }
        }
    }

    /// A message with a future epoch reaches host `h`, as from a peer with a corrupt
    /// epoch file: it must be refused whole and change nothing.
    fn forge(&mut self, h: usize) {
        if !self.hosts[h].up || self.hosts[h].core.is_none() {
            return;
        }
        self.tally.forged += 1;
        let epoch = match self.rng.below(4) {
            // Past the step above every epoch any core can have seen.
            0 => self.max_epoch_asked + MAX_EPOCH_STEP + 1 + self.rng.below(1_000),
            1 => MAX_EPOCH + 1 + self.rng.below(1_000),
            2 => u64::MAX - self.rng.below(3),
            _ => self.rng.range(MAX_EPOCH + 1, u64::MAX),
        };
        let body = match self.rng.below(5) {
            0 => Body::Heartbeat,
            1 => Body::HandoverRequest {
                ask: self.rng.below(1_000),
            },
            2 => Body::Handover {
                generation: self.rng.below(self.gen_counter + 2),
            },
            3 => Body::HandoverAck {
                from_epoch: self.epoch(h),
            },
            _ => Body::Refused {
                of: if self.rng.chance(500) {
                    Refusal::Handover
                } else {
                    Refusal::HandoverRequest
                },
                request_epoch: self.epoch(h),
                reason: "forged".into(),
            },
        };
        let msg = PeerMessage {
            epoch,
            live: self.rng.chance(500),
            may_hold: self.rng.chance(500),
            newest_generation: Some(self.rng.below(self.gen_counter + 2)),
            body,
        };
        let line = format!("{} <- FORGED {msg:?}", NAMES[h]);
        self.note(|| line);
        let now = self.now;
        let Some(core) = self.hosts[h].core.as_mut() else {
            return;
        };
        let before = core.status();
        core.handle(now, Input::Peer(msg.clone()));
        let after = core.status();
        let actions: Vec<Action> = std::iter::from_fn(|| core.poll_action()).collect();
        let mut wrong = Vec::new();
        // `reachable` is read at the core's clock, which the input moved to `now`: time
        // may make the peer unreachable; the forged message must not make it reachable.
        let mut same_clock = before.clone();
        same_clock.peer.reachable = after.peer.reachable;
        if after != same_clock || (after.peer.reachable && !before.peer.reachable) {
            wrong.push(format!("its status changed from {before:?} to {after:?}"));
        }
        if let Some(a) = actions
            .iter()
            .find(|a| matches!(a, Action::Do { .. } | Action::Reply { .. }))
        {
            wrong.push(format!("it acted: {a:?}"));
        }
        let logged = actions.iter().any(
            |a| matches!(a, Action::Log { text, .. } if text.contains(&format!("future epoch {epoch}"))),
        );
        if !logged {
            wrong.push("it logged no refusal".into());
        }
        let answers: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(&m.body),
                _ => None,
            })
            .collect();
        let expected = match msg.body {
            Body::Refused { .. } => vec![],
            _ => vec![Body::Refused {
                of: Refusal::Message,
                request_epoch: epoch,
                reason: String::new(),
            }],
        };
        let same = answers.len() == expected.len()
            && answers.iter().zip(&expected).all(|(a, e)| match (a, e) {
                (
                    Body::Refused {
                        of: o1,
                        request_epoch: r1,
                        ..
                    },
                    Body::Refused {
                        of: o2,
                        request_epoch: r2,
                        ..
                    },
                ) => o1 == o2 && r1 == r2,
                _ => false,
            });
        if !same {
            wrong.push(format!(
                "it answered {answers:?}, not one refusal of the message"
            ));
        }
        for w in wrong {
            self.violations.push(format!(
                "host {} took a message with the future epoch {epoch}: {w}",
                NAMES[h]
            ));
        }
        for a in actions {
            self.carry_out(h, a);
        }
    }

    fn count_log(&mut self, text: &str) {
        let t = &mut self.tally;
        if text.starts_with("role standby → live") {
            if text.contains("took over") {
                t.takeovers += 1;
            } else if text.contains("forced") {
                t.forced += 1;
            } else if text.contains("leftover") {
                t.leftovers_kept += 1;
            } else if text.contains("took the address back") {
                t.reclaims += 1;
            }
        } else if text.starts_with("claim of the address abandoned: host") {
            t.probe_refusals += 1;
        } else if text.starts_with("dropping the address at once") {
            t.drops += 1;
        } else if text.starts_with("removing the leftover") {
            t.leftovers_removed += 1;
        }
    }

    fn on_reply(&mut self, h: usize, id: CommandId, result: Result<String, String>) {
        self.note(|| format!("{} reply {}: {result:?}", NAMES[h], id.0));
        match self.owed.remove(&id.0) {
            Some((host, _, command)) if host == h => {
                if result.is_ok() {
                    self.tally.replies_ok += 1;
                } else {
                    self.tally.replies_err += 1;
                }
                self.replies.push((h, id, command, result));
            }
            _ => self.violations.push(format!(
                "host {} replied to command {} which it does not owe a reply (a second reply?): {result:?}",
                NAMES[h], id.0
            )),
        }
    }

    fn send(&mut self, from: usize, msg: PeerMessage) {
        if self.cut
            || self.one_way[from]
            || (self.faults.msg_drop > 0 && self.rng.chance(self.faults.msg_drop))
        {
            self.note(|| format!("{} -> peer DROPPED {msg:?}", NAMES[from]));
            return;
        }
        let copies = if self.rng.chance(self.faults.msg_dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.chance(self.faults.msg_late) {
                self.rng.range(300, 1_500)
            } else {
                self.rng.range(1, 40)
            };
            self.note(|| format!("{} -> peer (+{delay}) {msg:?}", NAMES[from]));
            let at = self.now.after(Millis(delay));
            self.schedule(
                at,
                Ev::Deliver {
                    to: 1 - from,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// Starts the shell's next effect on host `h` if it is idle.
    fn kick(&mut self, h: usize) {
        let host = &self.hosts[h];
        if host.busy || host.queue.is_empty() || !host.up {
            return;
        }
        let delay = if self.rng.chance(self.faults.slow_action) {
            self.rng
                .range(self.cfg.action_timeout.0, 2 * self.cfg.transfer_timeout.0)
        } else {
            self.rng.range(1, 60)
        };
        self.hosts[h].busy = true;
        let incarnation = self.hosts[h].incarnation;
        let at = self.now.after(Millis(delay));
        self.schedule(
            at,
            Ev::ShellDone {
                host: h,
                incarnation,
            },
        );
    }

    fn shell_done(&mut self, h: usize, incarnation: u64) {
        if self.hosts[h].incarnation != incarnation || !self.hosts[h].up {
            return;
        }
        self.hosts[h].busy = false;
        let Some((op, effect)) = self.hosts[h].queue.pop_front() else {
            return;
        };
        let fail = self.rng.chance(self.faults.action_fail);
        let lost = self.rng.chance(self.faults.outcome_lost);
        let result = if fail {
            Err("simulated failure".to_string())
        } else if !lost || self.rng.chance(500) {
            self.apply(h, effect)
        } else {
            Err("not done".to_string())
        };
        if lost {
            self.note(|| format!("{} outcome of op {} LOST ({result:?})", NAMES[h], op.0));
        } else {
            self.feed(h, Input::Outcome { op, result });
        }
        self.kick(h);
    }

    /// Carries out `effect` on host `h`'s world and says what the shell would report.
    fn apply(&mut self, h: usize, effect: Effect) -> Result<Outcome, String> {
        let o = 1 - h;
        self.hosts[h].applied.push(effect);
        match effect {
            Effect::PersistEpoch(e) => {
                if e < self.hosts[h].disk_epoch {
                    self.violations.push(format!(
                        "host {}: the epoch on disk would go down from {} to {e}",
                        NAMES[h], self.hosts[h].disk_epoch
                    ));
                }
                self.hosts[h].disk_epoch = e;
                Ok(Outcome::EpochPersisted(e))
            }
            Effect::ProbeAddress | Effect::QuickProbe => {
                // The other host answers if its address is up, or is being added: the
                // model's probe lasts longer than an add (DESIGN.md, timing assumptions).
                let other = &self.hosts[o];
                let adding = other.queue.iter().any(|(_, e)| *e == Effect::AddAddress);
                let holder = (other.up && (other.addr || adding)).then_some(MACS[o]);
                Ok(Outcome::ProbeResult { holder })
            }
            Effect::AddAddress => {
                self.hosts[h].addr = true;
                Ok(Outcome::AddressAdded)
            }
            Effect::RemoveAddress => {
                self.hosts[h].addr = false;
                Ok(Outcome::AddressRemoved)
            }
            Effect::Announce => Ok(Outcome::Announced),
            Effect::InstallGeneration(g) => {
                if self.hosts[h].verified >= Some(g) {
                    self.hosts[h].data_gen = g;
                    Ok(Outcome::GenerationInstalled(g))
                } else {
                    Err(format!("generation {g} is not held here"))
                }
            }
            Effect::StartConode => {
                if self.hosts[h].data_gen < self.floor {
                    self.violations.push(format!(
                        "host {}: conode started on generation {}, older than the final snapshot {} shipped by a switchover: acknowledged blocks lost",
                        NAMES[h], self.hosts[h].data_gen, self.floor
                    ));
                }
                self.hosts[h].conode = true;
                self.hosts[h].frozen = false;
                self.hosts[h].final_shipped = None;
                Ok(Outcome::ConodeStarted)
            }
            Effect::StopConode => {
                if let Some(g) = self.hosts[h].final_shipped {
                    if self.hosts[h].conode && self.hosts[h].data_gen > g {
                        self.violations.push(format!(
                            "host {}: its conode acknowledged data {} after the final snapshot {g} it shipped: lost by the switchover",
                            NAMES[h], self.hosts[h].data_gen
                        ));
                    }
                }
                self.hosts[h].conode = false;
                self.hosts[h].frozen = false;
                Ok(Outcome::ConodeStopped)
            }
            Effect::ShipFinalSnapshot => {
                if self.cut || self.one_way[h] || !self.hosts[o].up {
                    Err("the peer is unreachable".into())
                } else {
                    // A running conode is frozen at the image; a stopped one's file is
                    // shipped as it is.
                    self.hosts[h].frozen = self.hosts[h].conode;
                    let g = self.hosts[h].data_gen;
                    self.hosts[h].final_shipped = Some(g);
                    self.hosts[h].verified = self.hosts[h].verified.max(Some(g));
                    self.hosts[o].verified = self.hosts[o].verified.max(Some(g));
                    self.floor = self.floor.max(g);
                    // Both shells report the new generation (ours: our own final snapshot).
                    self.feed(o, Input::GenerationVerified { generation: g });
                    self.feed(h, Input::GenerationVerified { generation: g });
                    Ok(Outcome::FinalSnapshotShipped { generation: g })
                }
            }
        }
    }

    /// The failoverd process of host `h` dies and restarts; the address stays on the
    /// interface, the epoch on disk. Effects in flight happened or not (50/50).
    pub fn restart(&mut self, h: usize) {
        self.tally.restarts += 1;
        self.note(|| format!("{} failoverd RESTARTS", NAMES[h]));
        let queued: Vec<_> = self.hosts[h].queue.drain(..).collect();
        for (_, effect) in queued {
            if self.rng.chance(500) {
                let _ = self.apply(h, effect);
            }
        }
        self.owed.retain(|_, (host, _, _)| *host != h);
        self.hosts[h].core = None;
        self.boot(h);
    }

    /// Host `h` loses power: the address and the conode are gone; a write in flight
    /// reached the disk or not. It comes back after `down_for`.
    pub fn power_cycle(&mut self, h: usize, down_for: Millis) {
        self.tally.power_cycles += 1;
        self.note(|| format!("{} POWER OFF for {down_for}", NAMES[h]));
        let queued: Vec<_> = self.hosts[h].queue.drain(..).collect();
        for (_, effect) in queued {
            if let Effect::PersistEpoch(_) = effect {
                if self.rng.chance(500) {
                    let _ = self.apply(h, effect);
                }
            }
        }
        let host = &mut self.hosts[h];
        host.up = false;
        host.addr = false;
        host.conode = false;
        host.frozen = false;
        host.busy = false;
        host.core = None;
        host.claiming = false;
        host.incarnation += 1;
        self.owed.retain(|_, (host, _, _)| *host != h);
        let at = self.now.after(down_for);
        self.schedule(at, Ev::PowerOn { host: h });
    }

    /// A client write acknowledged by the conode that serves the address.
    fn client_write(&mut self) {
        for h in 0..2 {
            let host = &self.hosts[h];
            if host.up && host.addr && host.conode && !host.frozen {
                self.gen_counter = self.gen_counter.max(host.data_gen) + 1;
                self.hosts[h].data_gen = self.gen_counter;
            }
        }
    }

    /// The live host ships a regular (not final) snapshot to the standby.
    fn periodic_ship(&mut self) {
        for h in 0..2 {
            let o = 1 - h;
            let (src, dst) = (&self.hosts[h], &self.hosts[o]);
            if src.up && src.addr && src.conode && dst.up && !self.cut && !self.one_way[h] {
                let g = src.data_gen;
                self.hosts[o].verified = self.hosts[o].verified.max(Some(g));
                self.feed(o, Input::GenerationVerified { generation: g });
            }
        }
    }

    fn chaos(&mut self) {
        let h = self.rng.below(2) as usize;
        match self.rng.below(110) {
            0..=34 => {
                let command = match self.rng.below(4) {
                    0 => Command::Switchover,
                    1 => Command::Promote { force: false },
                    2 => Command::Promote { force: true },
                    _ => Command::Demote,
                };
                self.note(|| format!("operator on {}: {command:?}", NAMES[h]));
                self.command(h, command);
            }
            35..=49 => self.client_write(),
            50..=61 => self.periodic_ship(),
            62..=71 => {
                if self.rng.chance(500) {
                    self.cut = true;
                } else {
                    self.one_way[h] = true;
                }
                let (cut, one_way) = (self.cut, self.one_way);
                self.note(|| format!("network: cut {cut} one-way {one_way:?}"));
            }
            72..=78 => {
                if self.hosts[h].up {
                    self.restart(h);
                }
            }
            79..=82 => {
                if self.hosts[h].up {
                    let d = Millis(self.rng.range(100, 2_000));
                    self.power_cycle(h, d);
                }
            }
            83..=89 => {
                let ok = self.rng.chance(700);
                let check = match self.rng.below(3) {
                    0 => failoverd_core::Check::OwnConode,
                    1 => failoverd_core::Check::LiveConode,
                    _ => failoverd_core::Check::LivePeer,
                };
                let reason = if ok {
                    "answers"
                } else {
                    "no answer within 2 s"
                }
                .to_string();
                self.feed(h, Input::Health { check, ok, reason });
            }
            90..=99 => {
                self.cut = false;
                self.one_way = [false; 2];
                self.note(|| "network: recovered".into());
            }
            100..=104 => self.forge(h),
            _ => {
                // Another MAC answers ARP for the address: the peer's (a stale answer)
                // or a third host's.
                let mac = if self.rng.chance(500) {
                    MACS[1 - h]
                } else {
                    IMPOSTOR
                };
                self.tally.conflicts += 1;
                self.feed(h, Input::ConflictSeen { mac });
            }
        }
        if self.chaos_left > 0 {
            self.chaos_left -= 1;
            let at = self.now.after(Millis(self.rng.range(1, 250)));
            self.schedule(at, Ev::Chaos);
        }
    }

    /// Schedules `n` random events (commands and faults), the first one now.
    pub fn unleash(&mut self, n: u32) {
        self.chaos_left = n;
        let now = self.now;
        self.schedule(now, Ev::Chaos);
    }

    /// Advances to the next event; `false` when nothing is left to happen.
    pub fn step(&mut self) -> Result<bool, String> {
        let ev = self
            .events
            .iter()
            .enumerate()
            .min_by_key(|(_, (at, seq, _))| (*at, *seq))
            .map(|(i, (at, _, _))| (i, *at));
        let timeout = (0..2)
            .filter_map(|h| Some((h, self.hosts[h].core.as_ref()?.poll_timeout()?)))
            .min_by_key(|(_, at)| *at);
        self.tally.steps += 1;
        match (ev, timeout) {
            (None, None) => return Ok(false),
            (_, Some((h, at))) if ev.is_none_or(|(_, e)| at < e) => {
                self.now = self.now.max(at);
                if let Some(core) = self.hosts[h].core.as_mut() {
                    core.handle_timeout(at);
                }
                self.drain(h);
            }
            (Some((i, at)), _) => {
                let (_, _, ev) = self.events.swap_remove(i);
                self.now = self.now.max(at);
                match ev {
                    Ev::Deliver { to, msg } => {
                        if self.hosts[to].up && self.hosts[to].core.is_some() {
                            let host = &mut self.hosts[to];
                            host.known = host.known.max(msg.epoch);
                            self.feed(to, Input::Peer(msg));
                        }
                    }
                    Ev::ShellDone { host, incarnation } => self.shell_done(host, incarnation),
                    Ev::Chaos => self.chaos(),
                    Ev::PowerOn { host } => {
                        self.note(|| format!("{} POWER ON", NAMES[host]));
                        self.hosts[host].up = true;
                        self.boot(host);
                    }
                }
            }
            (None, Some(_)) => unreachable!("handled by the timeout arm"),
        }
        self.check()?;
        Ok(true)
    }

    /// Runs every step up to time `t`.
    pub fn run_until(&mut self, t: Millis) -> Result<(), String> {
        loop {
            let next_ev = self.events.iter().map(|(at, _, _)| *at).min();
            let next_to = (0..2)
                .filter_map(|h| self.hosts[h].core.as_ref()?.poll_timeout())
                .min();
            let next = match (next_ev, next_to) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(x) => x,
                    None => break,
                },
            };
            if next > t {
                break;
            }
            self.step()?;
        }
        self.now = self.now.max(t);
        Ok(())
    }

    pub fn run_for(&mut self, d: u64) -> Result<(), String> {
        self.run_until(self.now.after(Millis(d)))
    }

    /// The safety invariants, checked after every step.
    pub fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.violations.first() {
            return Err(v.clone());
        }
        let holders: Vec<_> = (0..2)
            .filter(|&h| self.hosts[h].up && self.hosts[h].addr)
            .collect();
        if holders.len() > 1 {
            return Err("two hosts hold the address (world truth)".into());
        }
        // The cores' beliefs: a core that knows it holds the address (its add was
        // confirmed) is right, and no two cores know it at once. A core that merely
        // cannot rule it out (an add or removal without outcome) is covered below.
        let sure: Vec<_> = (0..2)
            .filter(|&h| self.hosts[h].core.as_ref().is_some_and(|c| c.holds()))
            .collect();
        if sure.len() > 1 {
            return Err("two cores know they hold the address (their own beliefs)".into());
        }
        for &h in &sure {
            if !(self.hosts[h].up && self.hosts[h].addr) {
                return Err(format!(
                    "host {}'s core believes it holds the address, which is not there",
                    NAMES[h]
                ));
            }
        }
        for h in holders {
            if let Some(core) = &self.hosts[h].core {
                if !core.may_hold() {
                    return Err(format!(
                        "host {} has the address but its core does not count it as held: {:?}",
                        NAMES[h],
                        core.status()
                    ));
                }
            }
        }
        self.check_claims()
    }

    /// Every claim (a core starting to claim the address, except keeping a confirmed
    /// leftover, which keeps its epoch) is made under an epoch its host asked to persist
    /// above everything that process knew, and above every epoch its host claimed
    /// before. Claims not above every epoch *either* host claimed are counted: they
    /// happen only to hosts cut from each other (DESIGN.md §4).
    fn check_claims(&mut self) -> Result<(), String> {
        for (h, name) in NAMES.iter().enumerate() {
            let Some(core) = &self.hosts[h].core else {
                continue;
            };
            let claims = core.claims();
            let started = claims && !self.hosts[h].claiming;
            self.hosts[h].claiming = claims;
            if !started {
                continue;
            }
            let st = core.status();
            if matches!(st.role_cause, Some((RoleCause::LeftoverConfirmed, _))) {
                continue;
            }
            let e = st.epoch;
            self.tally.claims += 1;
            if !self.hosts[h].fresh.contains(&e) {
                return Err(format!(
                    "host {} claims the address under epoch {e}, not one it asked to persist above all it knew (asked so: {:?}; it knows {})",
                    name, self.hosts[h].fresh, self.hosts[h].known
                ));
            }
            if e > MAX_EPOCH {
                return Err(format!("host {} claims under epoch {e} > MAX_EPOCH", name));
            }
            if let Some((_, before)) = self
                .claim_epochs
                .iter()
                .filter(|c| c.0 == h)
                .max_by_key(|c| c.1)
            {
                if e <= *before {
                    return Err(format!(
                        "host {} claims under epoch {e}, not above its own earlier claim under {before}",
                        name
                    ));
                }
            }
            if self.claim_epochs.iter().any(|c| c.1 >= e) {
                self.tally.claims_not_above_all += 1;
                self.note(|| {
                    format!(
                        "{} claims under {e}, not above every earlier claim of the pair",
                        name
                    )
                });
            }
            self.claim_epochs.push((h, e));
        }
        Ok(())
    }

    /// Heals everything, runs until quiet, and checks that the pair settled: every
    /// command answered, every core plainly live or standby, the truth as believed.
    pub fn settle(&mut self) -> Result<(), String> {
        self.faults = Faults::NONE;
        self.chaos_left = 0;
        self.events.retain(|(_, _, e)| !matches!(e, Ev::Chaos));
        self.cut = false;
        self.one_way = [false; 2];
        self.note(|| "SETTLE: faults off, network healed".into());
        self.run_for(6_000)?;
        if let Some((id, (h, _, c))) = self.owed.iter().next() {
            return Err(format!(
                "command {id} ({c:?}) on host {} got no reply",
                NAMES[*h]
            ));
        }
        for (host, name) in self.hosts.iter().zip(NAMES) {
            let Some(core) = &host.core else {
                return Err(format!("host {name} is not running after settling"));
            };
            if !core.is_settled() || host.addr != core.claims() {
                return Err(format!(
                    "host {name} did not settle: address present {}, status {:?}",
                    host.addr,
                    core.status()
                ));
            }
        }
        Ok(())
    }

    pub fn live_host(&self) -> Option<usize> {
        (0..2).find(|&h| self.hosts[h].core.as_ref().is_some_and(|c| c.claims()))
    }

    pub fn epoch(&self, h: usize) -> u64 {
        self.hosts[h].core.as_ref().map_or(0, |c| c.status().epoch)
    }

    pub fn reply_to(&self, id: CommandId) -> Option<&Result<String, String>> {
        self.replies.iter().find(|r| r.1 == id).map(|r| &r.3)
    }
}

/// One seeded run: `chaos` random events, settle, then on the healed pair a promote (if
/// nobody is live) and a switchover that must move the address and grow the epoch.
pub fn run_seed(seed: u64, chaos: u32, trace: bool) -> (Result<(), String>, World) {
    let mut w = World::new(seed, Faults::ROUGH, trace);
    let r = run_world(&mut w, chaos);
    (r, w)
}

fn run_world(w: &mut World, chaos: u32) -> Result<(), String> {
    // Start with a live host most of the time, then let chaos loose.
    w.run_for(300)?;
    w.command(0, Command::Promote { force: false });
    w.unleash(chaos);
    while w.chaos_left > 0 {
        if !w.step()? {
            break;
        }
    }
    w.settle()?;
    let live = match w.live_host() {
        Some(l) => l,
        None => {
            let h = if w.hosts[1].verified > w.hosts[0].verified {
                1
            } else {
                0
            };
            let id = w.command(h, Command::Promote { force: false });
            w.run_for(2_000)?;
            match w.live_host() {
                Some(l) => l,
                None => {
                    return Err(format!(
                        "promote on a healed, settled pair did not make {} live: {:?}",
                        NAMES[h],
                        w.reply_to(id)
                    ))
                }
            }
        }
    };
    let before = w.epoch(live);
    let id = w.command(live, Command::Switchover);
    w.run_for(4_000)?;
    let other = 1 - live;
    let moved = w.hosts[other].addr && !w.hosts[live].addr && w.live_host() == Some(other);
    if !moved || w.epoch(other) <= before || !matches!(w.reply_to(id), Some(Ok(_))) {
        return Err(format!(
            "switchover on a healthy network did not move the address from {} to {} with a higher epoch (was {before}, now {}): reply {:?}",
            NAMES[live],
            NAMES[other],
            w.epoch(other),
            w.reply_to(id)
        ));
    }
    if !w.owed.is_empty() {
        return Err(format!("commands without reply: {:?}", w.owed));
    }
    Ok(())
}
