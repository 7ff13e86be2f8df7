//! The decision core: one [`Core`] per host, a state machine fed `(now, input)` that
//! queues actions for its shell.
//!
//! It decides who may hold the virtual address and in which order the steps of a claim,
//! a switchover or a release happen. It must never perform anything itself (no clock,
//! no socket, no file, no thread) and never assume an effect happened: every step waits
//! for its outcome or times out, and an effect that may have added the address counts as
//! holding it until a removal is confirmed.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::api::{
    Action, Check, Command, CommandId, Effect, Input, Level, Mac, Millis, OpId, Outcome, RoleCause,
};
use crate::config::{Config, ConfigError, LeasePolicy};
use crate::message::{Body, PeerMessage, Refusal, MAX_EPOCH, MAX_EPOCH_STEP};
use crate::status::{HealthVerdict, PeerStatus, Role, Status};
use crate::timer::{Timer, TimerTable};

/// Why a claim of the address was started.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Why {
    /// `promote` with the peer reachable and not live.
    Promote,
    /// `promote --force` with the peer unreachable.
    Forced,
    /// The live peer handed over under `from_epoch`.
    Takeover { from_epoch: u64 },
    /// The peer refused our handover; we take the address back.
    Reclaim { refusal: String },
    /// The peer confirmed our leftover address is current.
    Leftover,
}

impl Why {
    fn cause(&self) -> RoleCause {
        match self {
            Why::Promote => RoleCause::Promote,
            Why::Forced => RoleCause::ForcedPromote,
            Why::Takeover { .. } => RoleCause::Switchover,
            Why::Reclaim { .. } => RoleCause::Reclaim,
            Why::Leftover => RoleCause::LeftoverConfirmed,
        }
    }

    fn describe(&self) -> String {
        match self {
            Why::Promote => "promoted by the operator".into(),
            Why::Forced => "forced promote by the operator (peer unreachable, probe clean)".into(),
            Why::Takeover { from_epoch } => {
                format!("took over from the peer's epoch {from_epoch} (switchover)")
            }
            Why::Reclaim { refusal } => {
                format!("took the address back after the peer refused the handover: {refusal}")
            }
            Why::Leftover => "the peer confirmed the leftover address is current".into(),
        }
    }
}

/// The steps of a claim, in order. Steps before `Add` are intentions; from `Add` on the
/// address may be on our interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ClaimStep {
    FirstProbe,
    Install,
    Persist,
    FinalProbe,
    Add,
    Announce,
    /// Install again if a newer generation was verified during the claim.
    CatchUp,
    StartConode,
}

#[derive(Clone, Debug)]
struct Claim {
    why: Why,
    step: ClaimStep,
    /// Brings the newest verified generation into service (promote, takeover).
    installs: bool,
    /// The generation installed so far.
    installed: Option<u64>,
    /// The claim's epoch, once persisted.
    epoch: Option<u64>,
    cmd: Option<CommandId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandStep {
    Ship,
    /// After the final snapshot of this generation was verified on the peer.
    StopConode(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RelStep {
    StopFirst,
    Remove,
    StopAfter,
}

#[derive(Clone, Debug)]
enum Then {
    /// Become standby; if set, tell the old live host we refused its handover.
    Standby {
        refuse_takeover: Option<(u64, String)>,
    },
    /// Send the peer the handover of `generation` under `epoch`.
    Handover { epoch: u64, generation: u64 },
}

#[derive(Clone, Debug)]
struct Release {
    step: RelStep,
    /// Why the address is released (for metrics and hooks).
    cause: RoleCause,
    stop_after: bool,
    then: Then,
    cmd: Option<CommandId>,
    why: String,
    stop_error: Option<String>,
}

#[derive(Clone, Debug)]
enum Phase {
    /// Before [`Input::Started`].
    Init,
    /// Started with our address on the interface; waiting for the peer to confirm.
    Leftover,
    Standby,
    /// A standby asked the live peer to hand over.
    Asking {
        cmd: CommandId,
    },
    Claiming(Claim),
    Live {
        epoch: u64,
    },
    /// The live side of a switchover, before the address is removed.
    HandingOver {
        epoch: u64,
        step: HandStep,
        cmd: Option<CommandId>,
        asked: bool,
    },
    /// Removing the address (and stopping the conode); retried until confirmed.
    Releasing(Release),
    /// Standby after a handover, waiting for the peer to say it is live.
    AwaitingTakeover {
        epoch: u64,
        generation: u64,
        cmd: Option<CommandId>,
    },
}

#[derive(Clone, Debug, Default)]
struct PeerView {
    last_heard: Option<Millis>,
    epoch: u64,
    live: bool,
    may_hold: bool,
    newest_generation: Option<u64>,
}

/// The decision core of one host. See the crate documentation for how to drive it.
#[derive(Debug)]
pub struct Core {
    cfg: Config,
    now: Millis,
    phase: Phase,
    /// The persisted epoch.
    epoch: u64,
    /// The highest epoch seen anywhere (peer messages, our own writes in flight).
    seen: u64,
    generation: Option<u64>,
    pending: Option<(OpId, Effect)>,
    next_op: u64,
    peer: PeerView,
    health: Vec<HealthVerdict>,
    conflicts: u64,
    served_request: Option<(u64, u64)>,
    refused_handover: Option<(u64, String)>,
    remove_attempts: u32,
    last_error: Option<String>,
    /// Why the role last changed, or is changing now, and in words.
    role_cause: Option<(RoleCause, String)>,
    /// The future epoch last refused, and the epoch under which the peer last refused
    /// ours: a broken peer repeats itself every heartbeat; each is logged loudly once.
    refused_future: Option<u64>,
    refused_by_peer: Option<u64>,
    /// The role the health verdicts in `health` were checked for.
    health_role: Role,
    timers: TimerTable,
    out: VecDeque<Action>,
}

impl Core {
    /// A core for one host, standby until told otherwise. Fails on an invalid `cfg`.
    pub fn new(cfg: Config) -> Result<Core, ConfigError> {
        cfg.validate()?;
        Ok(Core {
            cfg,
            now: Millis(0),
            phase: Phase::Init,
            epoch: 0,
            seen: 0,
            generation: None,
            pending: None,
            next_op: 1,
            peer: PeerView::default(),
            health: Vec::new(),
            conflicts: 0,
            role_cause: None,
            refused_future: None,
            refused_by_peer: None,
            health_role: Role::Standby,
            served_request: None,
            refused_handover: None,
            remove_attempts: 0,
            last_error: None,
            timers: TimerTable::default(),
            out: VecDeque::new(),
        })
    }

    /// Feeds one input. `now` never goes backwards (an earlier one is taken as the last).
    pub fn handle(&mut self, now: Millis, input: Input) {
        self.now = self.now.max(now);
        if matches!(self.phase, Phase::Init) && !matches!(input, Input::Started { .. }) {
            match input {
                Input::Command { id, .. } => self.reply(
                    id,
                    Err("failoverd is starting and has not read this host's state yet; retry in a moment".into()),
                ),
                other => self.log(Level::Debug, format!("ignored before start: {other:?}")),
            }
            return;
        }
        match input {
            Input::Started {
                leftover_address,
                persisted_epoch,
                newest_generation,
            } => self.on_started(leftover_address, persisted_epoch, newest_generation),
            Input::Outcome { op, result } => self.on_outcome(op, result),
            Input::Peer(m) => self.on_peer(m),
            Input::Command { id, command } => self.on_command(id, command),
            Input::Health { check, ok, reason } => self.on_health(check, ok, reason),
            Input::GenerationVerified { generation } => {
                self.generation = self.generation.max(Some(generation));
            }
            Input::ConflictSeen { mac } => self.on_conflict(mac),
        }
        self.forget_other_roles_health();
    }

    /// Health verdicts belong to the role they were checked for (a live host checks its
    /// own conode, a standby the live ones): when the role changes, the old verdicts go.
    fn forget_other_roles_health(&mut self) {
        let role = self.role();
        if role != self.health_role {
            self.health.clear();
            self.health_role = role;
        }
    }

    fn role(&self) -> Role {
        if self.claims() {
            Role::Live
        } else {
            Role::Standby
        }
    }

    /// Fires every timer due at `now`. Call it when [`Core::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.now = self.now.max(now);
        // Every timer re-arms in the future, so this ends; the bound is a second guard.
        for _ in 0..64 {
            let Some(t) = self.timers.take_expired(self.now) else {
                break;
            };
            self.on_timer(t);
        }
        if self.claims() && !self.lease_allows() {
            self.drop_address(
                RoleCause::Lease,
                "the lease no longer allows holding the address".into(),
            );
        }
        self.forget_other_roles_health();
    }

    /// The next action for the shell, in order. Drain it after every `handle*` call.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// The earliest deadline of the core's timers.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.timers.next()
    }

    /// The core believes the address is, or is about to be, on this host and means to
    /// keep it: live, handing over, or adding it after a clean probe.
    pub fn claims(&self) -> bool {
        match &self.phase {
            Phase::Live { .. } | Phase::HandingOver { .. } => true,
            Phase::Claiming(c) => c.step >= ClaimStep::Add,
            _ => false,
        }
    }

    /// The core knows the address is on this host: its add was confirmed (or the shell
    /// found it at start and the peer confirmed it) and no removal has been asked since.
    /// Unlike [`Core::may_hold`], this is never true on two hosts that can see each
    /// other's address on the link.
    pub fn holds(&self) -> bool {
        match &self.phase {
            Phase::Live { .. } | Phase::HandingOver { .. } => true,
            Phase::Claiming(c) => c.step >= ClaimStep::Announce,
            Phase::Releasing(r) => r.step == RelStep::StopFirst,
            _ => false,
        }
    }

    /// The core cannot rule out that the address is on this host: it claims it, is
    /// removing it, has a leftover to decide about, or has not started yet.
    pub fn may_hold(&self) -> bool {
        self.claims()
            || matches!(
                self.phase,
                Phase::Releasing(_) | Phase::Leftover | Phase::Init
            )
    }

    /// Nothing in progress: plainly live or plainly standby.
    pub fn is_settled(&self) -> bool {
        matches!(self.phase, Phase::Live { .. } | Phase::Standby)
    }

    /// The operator's view.
    pub fn status(&self) -> Status {
        Status {
            role: self.role(),
            epoch: self.epoch,
            vip_held: self.may_hold(),
            doing: self.doing(),
            peer: PeerStatus {
                reachable: self.peer_reachable(),
                last_heard: self.peer.last_heard,
                epoch: self.peer.epoch,
                live: self.peer.live,
                may_hold: self.peer.may_hold,
                newest_generation: self.peer.newest_generation,
            },
            health: self.health.clone(),
            newest_generation: self.generation,
            conflicts: self.conflicts,
            role_cause: self.role_cause.clone(),
        }
    }

    // ---- inputs ----

    fn on_started(&mut self, leftover: bool, epoch: u64, generation: Option<u64>) {
        if !matches!(self.phase, Phase::Init) {
            self.log(
                Level::Error,
                "a second Started input for one process: ignored; this is a bug in the shell"
                    .into(),
            );
            return;
        }
        self.epoch = epoch;
        self.seen = epoch;
        self.generation = generation;
        if epoch >= MAX_EPOCH {
            self.log(Level::Error, format!("the epoch on disk is {epoch}, at or above {MAX_EPOCH}, the highest a pair can reach: a corrupt epoch file; this host will claim nothing and the peer refuses its messages; stop both failoverds and write the peer's epoch (from its `failoverd status`) into this host's epoch file"));
        }
        if leftover {
            self.phase = Phase::Leftover;
            self.timers
                .set(Timer::Leftover, self.now.after(self.cfg.leftover_grace));
            self.log(Level::Warn, format!("started with the address left on the interface (epoch {epoch}): it stays only if the peer confirms within {} that this host holds the current epoch", self.cfg.leftover_grace));
        } else {
            self.phase = Phase::Standby;
            self.log(
                Level::Info,
                format!("started as standby: epoch {epoch}, newest generation {generation:?}"),
            );
        }
        self.beat();
        self.timers.set(
            Timer::Heartbeat,
            self.now.after(self.cfg.heartbeat_interval),
        );
    }

    fn on_outcome(&mut self, op: OpId, result: Result<Outcome, String>) {
        let Some((pending, effect)) = self.pending else {
            self.log(Level::Debug, format!("late outcome of op {} ignored", op.0));
            return;
        };
        if pending != op {
            self.log(
                Level::Debug,
                format!("outcome of abandoned op {} ignored", op.0),
            );
            return;
        }
        self.pending = None;
        self.timers.stop(Timer::Action);
        let result = match result {
            Ok(o) if o.answers(&effect) => Ok(o),
            Ok(o) => {
                let text = format!("the shell answered {o:?} to {effect:?}: treated as a failure; this is a bug in the shell");
                self.log(Level::Error, text.clone());
                Err(text)
            }
            Err(e) => Err(e),
        };
        self.step_done(effect, result);
    }

    fn on_peer(&mut self, m: PeerMessage) {
        if let Some(reason) = self.future_epoch(m.epoch) {
            return self.refuse_message(m, reason);
        }
        let was_reachable = self.peer_reachable();
        if self.peer.last_heard.is_none() || m.epoch >= self.peer.epoch {
            self.peer.epoch = m.epoch;
            self.peer.live = m.live;
            self.peer.may_hold = m.may_hold;
            self.peer.newest_generation = m.newest_generation;
        }
        self.peer.last_heard = Some(self.now);
        self.timers
            .set(Timer::PeerSilent, self.now.after(self.cfg.peer_timeout));
        if !was_reachable {
            self.log(
                Level::Info,
                format!("peer reachable: epoch {}, live: {}", m.epoch, m.live),
            );
        }
        self.seen = self.seen.max(m.epoch);

        // A higher epoch than the one we hold the address under: drop it at once.
        if let Some(h) = self.address_epoch() {
            if m.epoch > h {
                self.drop_address(
                    RoleCause::HigherEpoch,
                    format!(
                    "the peer reports epoch {} > {h}, the epoch this host holds the address under",
                    m.epoch
                ),
                );
            }
        }
        let outbid = match &self.phase {
            Phase::Claiming(c) => c.step < ClaimStep::Add && c.epoch.is_some_and(|e| m.epoch > e),
            _ => false,
        };
        if outbid {
            self.abandon_claim(format!(
                "the peer reports epoch {}, above this claim's",
                m.epoch
            ));
        }

        // What the header alone decides.
        match self.phase {
            Phase::Leftover if !m.may_hold && self.lease_allows() => {
                self.timers.stop(Timer::Leftover);
                self.log(Level::Info, format!("the peer (epoch {} ≤ ours {}, not holding the address) confirms this host holds the current epoch: keeping the leftover address", m.epoch, self.epoch));
                // The claim starts past its Add step, where causes are recorded.
                self.role_cause = Some((RoleCause::LeftoverConfirmed, Why::Leftover.describe()));
                let claim = Claim {
                    why: Why::Leftover,
                    step: ClaimStep::Announce,
                    installs: false,
                    installed: None,
                    epoch: Some(self.epoch),
                    cmd: None,
                };
                self.run_claim(claim);
            }
            Phase::Leftover => self.remove_leftover(format!(
                "the peer (epoch {}) says it may hold the address",
                m.epoch
            )),
            Phase::Live { epoch } if m.live && m.epoch == epoch => self.drop_address(
                RoleCause::SplitBrain,
                format!("the peer says it is live under our epoch {epoch}: split brain; dropping"),
            ),
            Phase::Live { epoch } if m.live => {
                self.log(Level::Warn, format!("the peer says it is live under the older epoch {}; keeping the address under {epoch} and telling it", m.epoch));
                self.send(Body::Heartbeat);
            }
            Phase::AwaitingTakeover { epoch, cmd, .. } if m.live && m.epoch > epoch => {
                self.timers.stop(Timer::Handover);
                self.phase = Phase::Standby;
                self.log(
                    Level::Info,
                    format!("switchover done: the peer is live under epoch {}", m.epoch),
                );
                if let Some(id) = cmd {
                    self.reply(id, Ok(format!("switchover done: the peer is live under epoch {}; this host is standby without the address", m.epoch)));
                }
            }
            _ => {}
        }

        match m.body {
            Body::Heartbeat | Body::HandoverAck { .. } => {}
            Body::HandoverRequest { ask } => self.on_handover_request(m.epoch, m.may_hold, ask),
            Body::Handover { generation } => self.on_handover(m.epoch, m.may_hold, generation),
            Body::Refused {
                of,
                request_epoch,
                reason,
            } => self.on_refused(m.may_hold, of, request_epoch, reason),
        }
    }

    fn on_handover_request(&mut self, epoch: u64, may_hold: bool, ask: u64) {
        if self.served_request == Some((epoch, ask)) {
            return;
        }
        match self.phase {
            Phase::Live { epoch: held } => {
                if epoch < held {
                    self.send_refusal(Refusal::HandoverRequest, epoch, format!("stale epoch: the request carries epoch {epoch}, the current epoch is {held}; ask again"));
                } else if may_hold {
                    self.send_refusal(
                        Refusal::HandoverRequest,
                        epoch,
                        "the requester says it may hold the address".into(),
                    );
                } else {
                    // Copies of a request we acted on must not start a second handover.
                    self.served_request = Some((epoch, ask));
                    self.log(
                        Level::Info,
                        format!("the peer asks for a switchover: handing over epoch {held}"),
                    );
                    self.start_handover(held, None, true);
                }
            }
            Phase::HandingOver { .. } | Phase::AwaitingTakeover { .. } => {}
            Phase::Releasing(Release {
                then: Then::Handover { .. },
                ..
            }) => {}
            _ => {
                let reason = format!("this host is not live ({})", self.doing());
                self.send_refusal(Refusal::HandoverRequest, epoch, reason);
            }
        }
    }

    fn on_handover(&mut self, epoch: u64, may_hold: bool, generation: u64) {
        if let Phase::Claiming(c) = &self.phase {
            if c.why == (Why::Takeover { from_epoch: epoch }) {
                return; // a copy of the handover we are carrying out
            }
        }
        if let Some((e, reason)) = self.refused_handover.clone() {
            if e == epoch {
                self.send(Body::Refused {
                    of: Refusal::Handover,
                    request_epoch: epoch,
                    reason,
                });
                return;
            }
        }
        let refusal = if epoch < self.seen {
            Some(format!("stale epoch: a handover under epoch {epoch}, but this host has seen epoch {}; nothing changed", self.seen))
        } else if !matches!(self.phase, Phase::Standby | Phase::Asking { .. }) {
            Some(format!("this host is busy ({})", self.doing()))
        } else if may_hold {
            Some("the sender says it may still hold the address".into())
        } else if self.generation < Some(generation) {
            Some(format!("this host holds verified generation {:?}, older than the final generation {generation} the live host shipped: taking over would lose acknowledged blocks", self.generation))
        } else if !self.lease_allows() {
            Some("no lease allows this host to hold the address".into())
        } else {
            self.next_epoch().err()
        };
        let cmd = match self.phase {
            Phase::Asking { cmd } => Some(cmd),
            _ => None,
        };
        if let Some(reason) = refusal {
            self.send_refusal(Refusal::Handover, epoch, reason.clone());
            if let Some(id) = cmd {
                self.timers.stop(Timer::Handover);
                self.phase = Phase::Standby;
                self.reply(
                    id,
                    Err(format!(
                        "the live host handed over, but this host refused: {reason}"
                    )),
                );
            }
            return;
        }
        self.timers.stop(Timer::Handover);
        self.log(Level::Info, format!("taking over: handover under epoch {epoch}, final generation {generation}; installing {:?}", self.generation));
        let claim = Claim {
            why: Why::Takeover { from_epoch: epoch },
            step: ClaimStep::Install,
            installs: true,
            installed: None,
            epoch: None,
            cmd,
        };
        self.run_claim(claim);
    }

    fn on_refused(&mut self, may_hold: bool, of: Refusal, request_epoch: u64, reason: String) {
        match (&self.phase, of) {
            (Phase::Asking { cmd }, Refusal::HandoverRequest) => {
                let id = *cmd;
                self.timers.stop(Timer::Handover);
                self.phase = Phase::Standby;
                self.reply(
                    id,
                    Err(format!("the live host refused to hand over: {reason}")),
                );
            }
            (Phase::AwaitingTakeover { epoch, cmd, .. }, Refusal::Handover)
                if *epoch == request_epoch && !may_hold =>
            {
                let cmd = *cmd;
                self.timers.stop(Timer::Handover);
                self.log(
                    Level::Warn,
                    format!("the peer refused the handover ({reason}); taking the address back"),
                );
                let claim = Claim {
                    why: Why::Reclaim { refusal: reason },
                    // The peer may have been live since and shipped us a newer final
                    // generation than our own data: bring the newest into service.
                    step: ClaimStep::Install,
                    installs: true,
                    installed: None,
                    epoch: None,
                    cmd,
                };
                self.run_claim(claim);
            }
            (_, Refusal::Message) => {
                let level = if self.refused_by_peer == Some(request_epoch) {
                    Level::Debug
                } else {
                    Level::Error
                };
                self.refused_by_peer = Some(request_epoch);
                self.log(
                    level,
                    format!("the peer refuses this host's messages under epoch {request_epoch}: {reason}"),
                );
            }
            _ => self.log(
                Level::Debug,
                format!("refusal of an earlier {of:?} ignored: {reason}"),
            ),
        }
    }

    fn on_command(&mut self, id: CommandId, command: Command) {
        let refused = match command {
            Command::Demote => self.cmd_demote(id),
            Command::Switchover => self.cmd_switchover(id),
            Command::Promote { force } => self.cmd_promote(id, force),
        };
        if let Err(reason) = refused {
            self.log(Level::Info, format!("{command:?} refused: {reason}"));
            self.reply(id, Err(reason));
        }
    }

    fn cmd_demote(&mut self, id: CommandId) -> Result<(), String> {
        match self.phase {
            Phase::Live { .. } => {
                self.begin_release(Release {
                    step: RelStep::StopFirst,
                    cause: RoleCause::Demote,
                    stop_after: false,
                    then: Then::Standby {
                        refuse_takeover: None,
                    },
                    cmd: Some(id),
                    why: "demoted by the operator".into(),
                    stop_error: None,
                });
                Ok(())
            }
            Phase::Standby | Phase::AwaitingTakeover { .. } | Phase::Asking { .. } => Err(format!(
                "this host is standby (epoch {}): there is nothing to demote",
                self.epoch
            )),
            _ => Err(self.busy()),
        }
    }

    fn cmd_switchover(&mut self, id: CommandId) -> Result<(), String> {
        match self.phase {
            Phase::Live { epoch } => {
                if !self.peer_reachable() {
                    return Err(format!("the peer has not been heard for {} (peer_timeout); a switchover needs it; nothing changed", self.silence()));
                }
                if self.peer.may_hold {
                    return Err(
                        "the peer reports it may hold the address; nothing changed".into(),
                    );
                }
                self.start_handover(epoch, Some(id), false);
                Ok(())
            }
            Phase::Standby if self.peer_reachable() && self.peer.live => {
                self.next_epoch()?;
                self.ask_live(id)
            }
            Phase::Standby => Err("the peer is not live (or not reachable): there is nothing to switch over from; use `failoverd promote`".into()),
            _ => Err(self.busy()),
        }
    }

    fn cmd_promote(&mut self, id: CommandId, force: bool) -> Result<(), String> {
        match self.phase {
            Phase::Live { epoch } => {
                return Err(format!("this host is already live under epoch {epoch}"))
            }
            Phase::Standby => {}
            _ => return Err(self.busy()),
        }
        self.next_epoch()?;
        let why = if self.peer_reachable() {
            if self.peer.live {
                return self.ask_live(id);
            }
            if self.peer.may_hold {
                return Err("the peer says it may hold the address (it is releasing it or deciding about a leftover); retry in a moment".into());
            }
            if self.peer.newest_generation > self.generation {
                return Err(format!("the peer holds a newer verified generation ({:?} > {:?}): promote the peer instead", self.peer.newest_generation, self.generation));
            }
            Why::Promote
        } else if !force {
            return Err(format!("the peer has not been heard for {}: refusing without --force; if the live host is down, run `failoverd promote --force` (the ARP probe still checks that no host answers for the address)", self.silence()));
        } else if self.generation.is_none() {
            return Err("refusing a forced promote: this host holds no verified generation; ship one from the live host or restore by hand".into());
        } else {
            Why::Forced
        };
        let claim = Claim {
            why,
            step: ClaimStep::FirstProbe,
            installs: true,
            installed: None,
            epoch: None,
            cmd: Some(id),
        };
        self.run_claim(claim);
        Ok(())
    }

    fn on_health(&mut self, check: Check, ok: bool, reason: String) {
        // `health_role` is the role now: every handle* call ends by making it so.
        if check.checked_by() != self.health_role {
            // Checked for the role this host had when the check began: out of date.
            return;
        }
        let now = self.now;
        match self.health.iter_mut().find(|h| h.check == check) {
            Some(h) if h.ok == ok => h.reason = reason,
            found => {
                let level = if ok { Level::Info } else { Level::Warn };
                let text = format!(
                    "health {check:?}: {} ({reason}); alert only, no promotion",
                    if ok { "ok" } else { "failing" }
                );
                let verdict = HealthVerdict {
                    check,
                    ok,
                    reason,
                    since: now,
                };
                match found {
                    Some(h) => *h = verdict,
                    None => self.health.push(verdict),
                }
                self.log(level, text);
            }
        }
    }

    fn on_conflict(&mut self, mac: Mac) {
        self.conflicts = self.conflicts.saturating_add(1);
        let n = self.conflicts;
        let Some(h) = self.address_epoch() else {
            self.log(Level::Warn, format!("host {mac} answers ARP for the address; this host does not hold it (conflict #{n})"));
            return;
        };
        let p = self.peer.epoch;
        if p > h || (p == h && self.peer.may_hold) {
            self.log(Level::Error, format!("conflict #{n}: host {mac} answers ARP for the address this host holds under epoch {h}; the peer's epoch {p} wins: dropping"));
            self.drop_address(
                RoleCause::Conflict,
                format!("address conflict with {mac}: the peer's epoch {p} ≥ ours {h}"),
            );
        } else {
            self.log(Level::Error, format!("conflict #{n}: host {mac} answers ARP for the address this host holds under epoch {h}; the peer's last epoch is {p}: keeping it, announcing again and telling the peer"));
            self.send(Body::Heartbeat);
            if matches!(self.phase, Phase::Live { .. }) && self.pending.is_none() {
                self.start(Effect::Announce);
            }
        }
    }

    fn on_timer(&mut self, t: Timer) {
        match t {
            Timer::Heartbeat => {
                self.beat();
                self.timers.set(
                    Timer::Heartbeat,
                    self.now.after(self.cfg.heartbeat_interval),
                );
                // Record a higher epoch heard from the peer, so a restart remembers it.
                if matches!(self.phase, Phase::Standby)
                    && self.pending.is_none()
                    && self.seen > self.epoch
                {
                    self.start(Effect::PersistEpoch(self.seen));
                }
            }
            Timer::PeerSilent => {
                let text = format!("peer unreachable: not heard for {}", self.silence());
                self.log(Level::Warn, text);
            }
            Timer::Action => {
                if let Some((_, effect)) = self.pending.take() {
                    let limit = self.limit(effect);
                    self.step_done(effect, Err(format!("no outcome within {limit}")));
                }
            }
            Timer::AnnounceRefresh => {
                if matches!(self.phase, Phase::Live { .. }) {
                    if self.pending.is_none() {
                        self.start(Effect::Announce);
                    }
                    self.timers.set(
                        Timer::AnnounceRefresh,
                        self.now.after(self.cfg.announce_refresh),
                    );
                }
            }
            Timer::Leftover => {
                if matches!(self.phase, Phase::Leftover) {
                    let why = format!(
                        "the peer did not confirm within {} that this host holds the current epoch",
                        self.cfg.leftover_grace
                    );
                    self.remove_leftover(why);
                }
            }
            Timer::Handover => match self.phase {
                Phase::Asking { cmd } => {
                    self.phase = Phase::Standby;
                    self.reply(cmd, Err(format!("the live host did not hand over within {}; nothing changed here; check `failoverd status` on both hosts", self.cfg.handover_timeout)));
                }
                Phase::AwaitingTakeover { epoch, cmd, .. } => {
                    self.phase = Phase::Standby;
                    let text = format!("the peer did not confirm the takeover within {}; this host is standby without the address (epoch {epoch}); check the peer: if neither host holds the address, run `failoverd promote` on one", self.cfg.handover_timeout);
                    self.log(Level::Warn, text.clone());
                    if let Some(id) = cmd {
                        self.reply(id, Err(text));
                    }
                }
                _ => {}
            },
            Timer::RemoveRetry => {
                if let Phase::Releasing(r) = &self.phase {
                    if r.step == RelStep::Remove && self.pending.is_none() {
                        self.start(Effect::RemoveAddress);
                    }
                }
            }
        }
    }

    // ---- steps ----

    fn step_done(&mut self, effect: Effect, result: Result<Outcome, String>) {
        match core::mem::replace(&mut self.phase, Phase::Init) {
            Phase::Claiming(c) => self.claim_step_done(c, effect, result),
            Phase::HandingOver {
                epoch,
                step,
                cmd,
                asked,
            } => self.hand_step_done(epoch, step, cmd, asked, result),
            Phase::Releasing(r) => self.release_step_done(r, result),
            other => {
                self.phase = other;
                match result {
                    Ok(Outcome::EpochPersisted(e)) => self.epoch = self.epoch.max(e),
                    Ok(_) => {}
                    Err(e) => self.log(Level::Warn, format!("{} failed: {e}", what(effect))),
                }
            }
        }
    }

    fn run_claim(&mut self, mut c: Claim) {
        let effect = match c.step {
            ClaimStep::FirstProbe => Effect::QuickProbe,
            ClaimStep::FinalProbe => Effect::ProbeAddress,
            // The newest verified generation at the time of the step, not of the command.
            ClaimStep::Install | ClaimStep::CatchUp => match self.generation {
                Some(g) if c.installs && Some(g) > c.installed => Effect::InstallGeneration(g),
                _ => {
                    c.step = if c.step == ClaimStep::Install {
                        ClaimStep::Persist
                    } else {
                        ClaimStep::StartConode
                    };
                    return self.run_claim(c);
                }
            },
            ClaimStep::Persist => match self.next_epoch() {
                Ok(e) => Effect::PersistEpoch(e),
                Err(reason) => return self.fail_claim(c, reason, false),
            },
            ClaimStep::Add => {
                self.role_cause = Some((c.why.cause(), c.why.describe()));
                Effect::AddAddress
            }
            ClaimStep::Announce => {
                self.timers.set(
                    Timer::AnnounceRefresh,
                    self.now.after(self.cfg.announce_refresh),
                );
                Effect::Announce
            }
            ClaimStep::StartConode => Effect::StartConode,
        };
        self.phase = Phase::Claiming(c);
        self.start(effect);
    }

    fn claim_step_done(&mut self, mut c: Claim, effect: Effect, result: Result<Outcome, String>) {
        let outcome = match result {
            Ok(Outcome::ProbeResult {
                holder: Some(mac), ..
            }) => {
                let reason = format!("host {mac} answered the ARP probe for the address");
                return self.fail_claim(c, reason, false);
            }
            Ok(o) => o,
            Err(e) => {
                return match c.step {
                    ClaimStep::Announce => {
                        self.log(
                            Level::Warn,
                            format!(
                                "announcing the address failed: {e}; clients may reach it late"
                            ),
                        );
                        c.step = ClaimStep::CatchUp;
                        self.run_claim(c)
                    }
                    ClaimStep::CatchUp => {
                        let why = format!(
                            "{} failed: {e}; it was not started on the older generation {:?}",
                            what(effect),
                            c.installed
                        );
                        self.become_live(c, Some(why))
                    }
                    ClaimStep::StartConode => self.become_live(c, Some(e)),
                    ClaimStep::Add => {
                        self.fail_claim(c, format!("adding the address failed: {e}"), true)
                    }
                    _ => self.fail_claim(c, format!("{} failed: {e}", what(effect)), false),
                };
            }
        };
        c.step = match c.step {
            ClaimStep::FirstProbe => ClaimStep::Install,
            ClaimStep::Install | ClaimStep::CatchUp => {
                if let Outcome::GenerationInstalled(g) = outcome {
                    c.installed = Some(g);
                }
                if c.step == ClaimStep::Install {
                    ClaimStep::Persist
                } else {
                    ClaimStep::CatchUp // again, in case an even newer one arrived
                }
            }
            ClaimStep::Persist => {
                if let Outcome::EpochPersisted(e) = outcome {
                    self.epoch = self.epoch.max(e);
                    c.epoch = Some(e);
                }
                ClaimStep::FinalProbe
            }
            ClaimStep::FinalProbe if !self.lease_allows() => {
                return self.fail_claim(c, "no lease allows holding the address".into(), false);
            }
            ClaimStep::FinalProbe => ClaimStep::Add,
            ClaimStep::Add => ClaimStep::Announce,
            ClaimStep::Announce => ClaimStep::CatchUp,
            ClaimStep::StartConode => return self.become_live(c, None),
        };
        self.run_claim(c);
    }

    fn become_live(&mut self, c: Claim, start_error: Option<String>) {
        let epoch = c.epoch.unwrap_or(self.epoch);
        self.phase = Phase::Live { epoch };
        let how = c.why.describe();
        self.log(
            Level::Info,
            format!("role standby → live: {how}; epoch {epoch}"),
        );
        if let Why::Takeover { from_epoch } = c.why {
            self.send(Body::HandoverAck { from_epoch });
        }
        let result = match (&c.why, start_error) {
            (Why::Reclaim { refusal }, None) => Err(format!("switchover refused by the peer ({refusal}); this host took the address back under epoch {epoch} and restarted its conode")),
            (_, None) => Ok(format!("this host is live under epoch {epoch}: the address is added and announced, the conode started")),
            (_, Some(e)) => Err(format!("this host holds the address under epoch {epoch}, but the conode did not start: {e}; start it by hand or run `failoverd demote`")),
        };
        match (c.cmd, result) {
            (Some(id), r) => self.reply(id, r),
            (None, Err(e)) => self.log(Level::Warn, e),
            (None, Ok(_)) => {}
        }
    }

    fn fail_claim(&mut self, c: Claim, reason: String, maybe_added: bool) {
        self.log(
            Level::Warn,
            format!("claim of the address abandoned: {reason}"),
        );
        if let Some(id) = c.cmd {
            let text = match &c.why {
                Why::Reclaim { refusal } => format!("switchover refused by the peer ({refusal}), and taking the address back failed: {reason}; no host holds the address: run `failoverd promote` on one host"),
                Why::Takeover { .. } => format!("taking over from the live host failed: {reason}; it was told and may take the address back"),
                _ => format!("refusing to claim the address: {reason}"),
            };
            self.reply(id, Err(text));
        }
        let refuse_takeover = match c.why {
            Why::Takeover { from_epoch } => Some((from_epoch, reason.clone())),
            _ => None,
        };
        if maybe_added {
            self.begin_release(Release {
                step: RelStep::Remove,
                cause: RoleCause::ClaimFailed,
                stop_after: false,
                then: Then::Standby { refuse_takeover },
                cmd: None,
                why: reason,
                stop_error: None,
            });
        } else {
            self.phase = Phase::Standby;
            if let Some((e, r)) = refuse_takeover {
                self.send_refusal(Refusal::Handover, e, r);
            }
        }
    }

    /// Abandons a claim that has not reached `Add` (its pending step is forgotten).
    fn abandon_claim(&mut self, reason: String) {
        if let Phase::Claiming(c) = core::mem::replace(&mut self.phase, Phase::Standby) {
            self.pending = None;
            self.timers.stop(Timer::Action);
            self.fail_claim(c, reason, false);
        }
    }

    /// The live side of a switchover: freeze the conode at a final image and ship it
    /// (clients keep reading meanwhile), stop the conode, then remove the address.
    fn start_handover(&mut self, epoch: u64, cmd: Option<CommandId>, asked: bool) {
        self.phase = Phase::HandingOver {
            epoch,
            step: HandStep::Ship,
            cmd,
            asked,
        };
        self.start(Effect::ShipFinalSnapshot);
    }

    fn hand_step_done(
        &mut self,
        epoch: u64,
        step: HandStep,
        cmd: Option<CommandId>,
        asked: bool,
        result: Result<Outcome, String>,
    ) {
        match (step, result) {
            (HandStep::Ship, Ok(Outcome::FinalSnapshotShipped { generation })) => {
                self.generation = self.generation.max(Some(generation));
                self.log(Level::Info, format!("final snapshot generation {generation} verified on the peer; stopping the conode"));
                self.phase = Phase::HandingOver {
                    epoch,
                    step: HandStep::StopConode(generation),
                    cmd,
                    asked,
                };
                self.start(Effect::StopConode);
            }
            (HandStep::StopConode(generation), Ok(Outcome::ConodeStopped)) => {
                self.begin_release(Release {
                    step: RelStep::Remove,
                    cause: RoleCause::HandedOver,
                    stop_after: false,
                    then: Then::Handover { epoch, generation },
                    cmd,
                    why: "switchover".into(),
                    stop_error: None,
                });
            }
            (step, result) => {
                let reason = match result {
                    Err(e) => e,
                    Ok(o) => format!("unexpected {o:?}"),
                };
                let what = match step {
                    HandStep::StopConode(_) => "stopping the conode",
                    HandStep::Ship => "shipping the final snapshot",
                };
                let text = format!("switchover aborted: {what} failed: {reason}; this host stays live under epoch {epoch} and its conode accepts writes again (started if it had stopped)");
                self.log(Level::Warn, text.clone());
                self.phase = Phase::Live { epoch };
                self.start(Effect::StartConode);
                if asked {
                    self.send_refusal(Refusal::HandoverRequest, epoch, text.clone());
                }
                if let Some(id) = cmd {
                    self.reply(id, Err(text));
                }
            }
        }
    }

    /// Drops the address now: the removal is queued in this very call.
    fn drop_address(&mut self, cause: RoleCause, reason: String) {
        let cmd = match &self.phase {
            Phase::HandingOver { cmd, .. } => *cmd,
            Phase::Claiming(c) => c.cmd,
            _ => None,
        };
        if let Some(id) = cmd {
            self.reply(
                id,
                Err(format!(
                    "interrupted: {reason}; this host dropped the address and is standby"
                )),
            );
        }
        self.log(
            Level::Warn,
            format!("dropping the address at once: {reason}"),
        );
        self.timers.stop(Timer::Leftover);
        self.begin_release(Release {
            step: RelStep::Remove,
            cause,
            stop_after: true,
            then: Then::Standby {
                refuse_takeover: None,
            },
            cmd: None,
            why: reason,
            stop_error: None,
        });
    }

    fn remove_leftover(&mut self, why: String) {
        self.timers.stop(Timer::Leftover);
        self.log(Level::Warn, format!("removing the leftover address: {why}"));
        self.begin_release(Release {
            step: RelStep::Remove,
            cause: RoleCause::LeftoverRemoved,
            stop_after: true,
            then: Then::Standby {
                refuse_takeover: None,
            },
            cmd: None,
            why: format!("leftover address removed: {why}"),
            stop_error: None,
        });
    }

    fn begin_release(&mut self, r: Release) {
        self.role_cause = Some((r.cause, r.why.clone()));
        let effect = match r.step {
            RelStep::StopFirst | RelStep::StopAfter => Effect::StopConode,
            RelStep::Remove => Effect::RemoveAddress,
        };
        self.phase = Phase::Releasing(r);
        self.start(effect);
    }

    fn release_step_done(&mut self, mut r: Release, result: Result<Outcome, String>) {
        match (r.step, result) {
            (RelStep::StopFirst, res) => {
                r.stop_error = res.err();
                r.step = RelStep::Remove;
                self.begin_release(r);
            }
            (RelStep::Remove, Ok(_)) => {
                self.remove_attempts = 0;
                self.last_error = None;
                if r.stop_after {
                    r.step = RelStep::StopAfter;
                    self.begin_release(r);
                } else {
                    self.finish_release(r);
                }
            }
            (RelStep::Remove, Err(e)) => {
                self.remove_attempts = self.remove_attempts.saturating_add(1);
                self.log(Level::Warn, format!("removing the address failed (attempt {}): {e}; this host may still hold it; retrying in {}", self.remove_attempts, self.cfg.remove_retry));
                self.last_error = Some(e);
                self.phase = Phase::Releasing(r);
                self.timers
                    .set(Timer::RemoveRetry, self.now.after(self.cfg.remove_retry));
            }
            (RelStep::StopAfter, res) => {
                if let Err(e) = res {
                    self.log(Level::Warn, format!("stopping the conode failed: {e}"));
                    r.stop_error = Some(e);
                }
                self.finish_release(r);
            }
        }
    }

    fn finish_release(&mut self, r: Release) {
        match r.then {
            Then::Standby { refuse_takeover } => {
                self.phase = Phase::Standby;
                self.log(
                    Level::Info,
                    format!(
                        "address removed, role standby: {}; epoch {}",
                        r.why, self.epoch
                    ),
                );
                if let Some((e, reason)) = refuse_takeover {
                    self.send_refusal(Refusal::Handover, e, reason);
                }
                if let Some(id) = r.cmd {
                    let result = match r.stop_error {
                        None => Ok(format!("demoted: the conode is stopped and the address removed; this host is standby at epoch {}", self.epoch)),
                        Some(e) => Err(format!("the address is removed and this host is standby at epoch {}, but the conode did not stop: {e}; stop it by hand", self.epoch)),
                    };
                    self.reply(id, result);
                }
            }
            Then::Handover { epoch, generation } => {
                self.phase = Phase::AwaitingTakeover {
                    epoch,
                    generation,
                    cmd: r.cmd,
                };
                self.log(Level::Info, format!("address removed, role standby: switchover; epoch {epoch}; handing generation {generation} over to the peer"));
                self.send(Body::Handover { generation });
                self.timers
                    .set(Timer::Handover, self.now.after(self.cfg.handover_timeout));
            }
        }
    }

    fn ask_live(&mut self, id: CommandId) -> Result<(), String> {
        self.phase = Phase::Asking { cmd: id };
        self.timers
            .set(Timer::Handover, self.now.after(self.cfg.handover_timeout));
        self.send(Body::HandoverRequest { ask: id.0 });
        Ok(())
    }

    // ---- helpers ----

    /// Why the peer's epoch `e` is refused, if it is a future epoch: above [`MAX_EPOCH`],
    /// or more than [`MAX_EPOCH_STEP`] above the highest epoch this host has seen (its own
    /// included). No legitimate peer is that far ahead (`DESIGN.md` §4).
    fn future_epoch(&self, e: u64) -> Option<String> {
        if e > MAX_EPOCH {
            Some(format!("future epoch {e}: above {MAX_EPOCH}, the highest epoch a pair can reach; a corrupt epoch file or a bug on the peer"))
        } else if e > self.seen.saturating_add(MAX_EPOCH_STEP) {
            Some(format!("future epoch {e}: more than {MAX_EPOCH_STEP} above {}, the highest epoch this host has seen, and no pair claims that often; a corrupt epoch file or a bug on the peer (if the peer's epoch is right, stop this failoverd, write it into this host's epoch file and start again)", self.seen))
        } else {
            None
        }
    }

    /// Refuses a whole peer message for its epoch: nothing of it is taken (not even that
    /// the peer was heard), nothing is persisted, the role does not change. Logged, and
    /// answered so the peer's log says it too (not a refusal: two hosts that refuse each
    /// other must not answer each other forever).
    fn refuse_message(&mut self, m: PeerMessage, reason: String) {
        let level = if self.refused_future == Some(m.epoch) {
            Level::Debug
        } else {
            Level::Error
        };
        self.refused_future = Some(m.epoch);
        let kind = match m.body {
            Body::Heartbeat => "heartbeat",
            Body::HandoverRequest { .. } => "handover request",
            Body::Handover { .. } => "handover",
            Body::HandoverAck { .. } => "handover ack",
            Body::Refused { .. } => "refusal",
        };
        self.log(
            level,
            format!("refusing the peer's {kind}: {reason}; nothing changed"),
        );
        if !matches!(m.body, Body::Refused { .. }) {
            self.send(Body::Refused {
                of: Refusal::Message,
                request_epoch: m.epoch,
                reason,
            });
        }
    }

    /// The epoch of a claim starting now: one above every epoch seen or persisted here.
    /// Refused (never saturated) when that would pass [`MAX_EPOCH`].
    fn next_epoch(&self) -> Result<u64, String> {
        let highest = self.seen.max(self.epoch);
        highest
            .checked_add(1)
            .filter(|e| *e <= MAX_EPOCH)
            .ok_or_else(|| format!("no epoch is left to claim under: this host has seen epoch {highest}, and {MAX_EPOCH} is the highest a pair can reach (a corrupt epoch file); nothing changed; stop both failoverds, make sure neither host has the address, and write one epoch above every epoch the pair really used into both epoch files"))
    }

    /// The epoch this host holds (or may hold) the address under, if it claims it or
    /// has a leftover.
    fn address_epoch(&self) -> Option<u64> {
        match &self.phase {
            Phase::Live { epoch } | Phase::HandingOver { epoch, .. } => Some(*epoch),
            Phase::Claiming(c) if c.step >= ClaimStep::Add => Some(c.epoch.unwrap_or(self.epoch)),
            Phase::Leftover => Some(self.epoch),
            _ => None,
        }
    }

    /// The lease hook: today only the manual policy, which always allows. A lease
    /// policy answers from `self.now` and the last `LeaseGranted { until }`.
    fn lease_allows(&self) -> bool {
        match self.cfg.lease {
            LeasePolicy::None => true,
        }
    }

    fn peer_reachable(&self) -> bool {
        self.peer
            .last_heard
            .is_some_and(|t| self.now.since(t) < self.cfg.peer_timeout)
    }

    fn silence(&self) -> String {
        match self.peer.last_heard {
            Some(t) => format!("{}", self.now.since(t)),
            None => "ever (never heard since start)".into(),
        }
    }

    fn busy(&self) -> String {
        format!("this host is busy: {}; retry when it is done", self.doing())
    }

    fn doing(&self) -> String {
        match &self.phase {
            Phase::Init => "starting".into(),
            Phase::Leftover => "deciding about a leftover address: waiting for the peer to confirm this host holds the current epoch".into(),
            Phase::Standby | Phase::Live { .. } => "idle".into(),
            Phase::Asking { .. } => "asking the live host to hand over".into(),
            Phase::Claiming(c) => format!("claiming the address ({:?}): step {:?}", c.why, c.step),
            Phase::HandingOver { step, .. } => format!("switchover: {}", match step {
                HandStep::StopConode(_) => "stopping the conode",
                HandStep::Ship => "shipping the final snapshot",
            }),
            Phase::Releasing(r) => match &self.last_error {
                Some(e) if r.step == RelStep::Remove => format!("removing the address ({}); attempt {} failed: {e}", r.why, self.remove_attempts),
                _ => format!("releasing the address ({})", r.why),
            },
            Phase::AwaitingTakeover { generation, .. } => format!("switchover: waiting for the peer to take over generation {generation}"),
        }
    }

    fn limit(&self, effect: Effect) -> Millis {
        match effect {
            Effect::ProbeAddress | Effect::QuickProbe => self.cfg.probe_timeout,
            Effect::InstallGeneration(_) | Effect::ShipFinalSnapshot => self.cfg.transfer_timeout,
            _ => self.cfg.action_timeout,
        }
    }

    /// Asks the shell for `effect`, replacing any pending step (its outcome will be
    /// ignored; the shell still carries effects out in the order they were asked).
    fn start(&mut self, effect: Effect) {
        let op = OpId(self.next_op);
        self.next_op = self.next_op.saturating_add(1);
        if let Effect::PersistEpoch(e) = effect {
            // It may reach the disk even if we never hear back: never write below it.
            self.seen = self.seen.max(e);
        }
        self.timers
            .set(Timer::Action, self.now.after(self.limit(effect)));
        self.pending = Some((op, effect));
        self.out.push_back(Action::Do { op, effect });
    }

    /// Our periodic message: a heartbeat, or the request or handover being waited on.
    fn beat(&mut self) {
        let body = match &self.phase {
            Phase::Asking { cmd } => Body::HandoverRequest { ask: cmd.0 },
            Phase::AwaitingTakeover { generation, .. } => Body::Handover {
                generation: *generation,
            },
            _ => Body::Heartbeat,
        };
        self.send(body);
    }

    fn send(&mut self, body: Body) {
        let m = PeerMessage {
            epoch: self.epoch,
            live: self.claims(),
            may_hold: self.may_hold(),
            newest_generation: self.generation,
            body,
        };
        self.out.push_back(Action::Send(m));
    }

    fn send_refusal(&mut self, of: Refusal, request_epoch: u64, reason: String) {
        if of == Refusal::Handover {
            self.refused_handover = Some((request_epoch, reason.clone()));
        }
        self.log(
            Level::Info,
            format!("refusing the peer's {of:?} under epoch {request_epoch}: {reason}"),
        );
        self.send(Body::Refused {
            of,
            request_epoch,
            reason,
        });
    }

    fn reply(&mut self, id: CommandId, result: Result<String, String>) {
        self.out.push_back(Action::Reply { id, result });
    }

    fn log(&mut self, level: Level, text: String) {
        self.out.push_back(Action::Log { level, text });
    }
}

/// An effect in words, for logs and replies.
fn what(effect: Effect) -> String {
    match effect {
        Effect::PersistEpoch(e) => format!("persisting epoch {e}"),
        Effect::ProbeAddress => "the ARP probe".into(),
        Effect::QuickProbe => "the quick ARP probe".into(),
        Effect::AddAddress => "adding the address".into(),
        Effect::RemoveAddress => "removing the address".into(),
        Effect::Announce => "announcing the address".into(),
        Effect::InstallGeneration(g) => format!("installing generation {g}"),
        Effect::StartConode => "starting the conode".into(),
        Effect::StopConode => "stopping the conode".into(),
        Effect::ShipFinalSnapshot => "shipping the final snapshot".into(),
    }
}
