//! The vocabulary between the core and its shell: time, inputs, effects, outcomes and
//! actions.
//!
//! Everything here is plain data. The shell turns the world into [`Input`]s and carries
//! out [`Action`]s; this module must never grow a method that performs anything.

use alloc::string::String;
use core::fmt;

use crate::message::PeerMessage;

/// Monotonic milliseconds, as the shell's clock reads them (e.g. `CLOCK_BOOTTIME` since
/// start). The core never reads a clock: every input comes with one of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + d`, saturating (a deadline past the end of time is "never").
    pub fn after(self, d: Millis) -> Millis {
        Millis(self.0.saturating_add(d.0))
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Millis) -> Millis {
        Millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms", self.0)
    }
}

/// A link-layer address, as an ARP reply or probe reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Names one side effect the core asked for; its [`Input::Outcome`] carries it back.
/// Outcomes for any other id (late, duplicated, from an abandoned step) are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(pub u64);

/// Names one operator command; its one [`Action::Reply`] carries it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CommandId(pub u64);

/// An operator command from the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// The planned move of the address to the other host (on either host).
    Switchover,
    /// Make this standby live: a switchover if the live peer answers; with the peer
    /// unreachable only with `force`, and even then only after a clean probe.
    Promote {
        /// Go ahead although the peer is unreachable.
        force: bool,
    },
    /// Stop the conode, remove the address, become standby (on the live host).
    Demote,
}

/// Why the role changed: stable names, for metrics (`failoverd_failovers_total{cause}`)
/// and the notify hooks (`FAILOVERD_CAUSE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RoleCause {
    /// Became live: the live peer handed over (a switchover).
    Switchover,
    /// Became live: `promote` with the peer reachable.
    Promote,
    /// Became live: `promote --force` with the peer unreachable.
    ForcedPromote,
    /// Became live again: the peer refused the handover.
    Reclaim,
    /// Stayed live after a restart: the peer confirmed the leftover address.
    LeftoverConfirmed,
    /// Became standby: handed the address over in a switchover.
    HandedOver,
    /// Became standby: `demote`.
    Demote,
    /// Became standby: the peer showed a higher epoch.
    HigherEpoch,
    /// Became standby: the peer is live under the same epoch.
    SplitBrain,
    /// Became standby: another host answers for the address and the peer's epoch wins.
    Conflict,
    /// Became standby: no lease allows holding the address.
    Lease,
    /// A leftover address from before a restart was removed.
    LeftoverRemoved,
    /// A claim failed after the address may have been added.
    ClaimFailed,
}

impl RoleCause {
    /// The stable name (snake case).
    pub fn label(self) -> &'static str {
        match self {
            RoleCause::Switchover => "switchover",
            RoleCause::Promote => "promote",
            RoleCause::ForcedPromote => "forced_promote",
            RoleCause::Reclaim => "reclaim",
            RoleCause::LeftoverConfirmed => "leftover_confirmed",
            RoleCause::HandedOver => "handed_over",
            RoleCause::Demote => "demote",
            RoleCause::HigherEpoch => "higher_epoch",
            RoleCause::SplitBrain => "split_brain",
            RoleCause::Conflict => "conflict",
            RoleCause::Lease => "lease",
            RoleCause::LeftoverRemoved => "leftover_removed",
            RoleCause::ClaimFailed => "claim_failed",
        }
    }
}

/// A health check whose verdict the shell reports. Verdicts alert; they never promote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// This host's own conode (admin socket and Status), checked while live.
    OwnConode,
    /// The live conode, reached through the virtual address (checked by the standby).
    LiveConode,
    /// The live failoverd, reached through the peer port (checked by the standby).
    LivePeer,
}

impl Check {
    /// The role whose host runs this check.
    pub fn checked_by(self) -> crate::status::Role {
        match self {
            Check::OwnConode => crate::status::Role::Live,
            Check::LiveConode | Check::LivePeer => crate::status::Role::Standby,
        }
    }
}

/// Something the core asks the shell to do to the world. Each one is answered by
/// exactly one [`Input::Outcome`] with the same [`OpId`], or the core times it out
/// and treats it as failed (it never assumes an effect happened, nor that it did not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write this epoch durably (write, fsync) → [`Outcome::EpochPersisted`].
    PersistEpoch(u64),
    /// RFC 5227-style ARP probe (IPv6: DAD) for the address → [`Outcome::ProbeResult`].
    ProbeAddress,
    /// One probe with a short wait (IPv6: one DAD solicitation) → [`Outcome::ProbeResult`]:
    /// refuses a claim early, before anything is installed or persisted. Not a safety
    /// check: the full [`Effect::ProbeAddress`] still comes right before the add.
    QuickProbe,
    /// Add the tagged address to the interface (idempotent) → [`Outcome::AddressAdded`].
    AddAddress,
    /// Remove our tagged address (idempotent) → [`Outcome::AddressRemoved`].
    RemoveAddress,
    /// A burst of gratuitous ARP (request and reply forms; IPv6: unsolicited NA)
    /// → [`Outcome::Announced`].
    Announce,
    /// Bring this verified generation into the conode's data directory
    /// → [`Outcome::GenerationInstalled`].
    InstallGeneration(u64),
    /// Start the conode (idempotent; a running one accepts writes again if a final
    /// image froze it) → [`Outcome::ConodeStarted`].
    StartConode,
    /// Stop the conode (idempotent) → [`Outcome::ConodeStopped`].
    StopConode,
    /// Freeze the running conode at a final image (it refuses every write from then on,
    /// reads go on) and ship it to the peer, which verifies it before the shell reports
    /// → [`Outcome::FinalSnapshotShipped`]. A conode that does not run: its database
    /// file. [`Effect::StartConode`] on a running conode lifts the freeze.
    ShipFinalSnapshot,
}

/// The successful result of an [`Effect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The epoch is on disk.
    EpochPersisted(u64),
    /// The probe finished; `holder` is the MAC of a host that answered, if any.
    ProbeResult {
        /// Who answered for the address (or probed for it at the same time).
        holder: Option<Mac>,
    },
    /// The address is on the interface.
    AddressAdded,
    /// The address is not on the interface.
    AddressRemoved,
    /// The announcement burst went out.
    Announced,
    /// The generation is installed in the conode's data directory.
    GenerationInstalled(u64),
    /// The conode runs.
    ConodeStarted,
    /// The conode does not run.
    ConodeStopped,
    /// The final snapshot is verified on the peer.
    FinalSnapshotShipped {
        /// The generation that was shipped.
        generation: u64,
    },
}

impl Outcome {
    /// Whether this outcome is a possible answer to `effect`.
    pub fn answers(&self, effect: &Effect) -> bool {
        match (self, effect) {
            (Outcome::EpochPersisted(a), Effect::PersistEpoch(b)) => a == b,
            (Outcome::GenerationInstalled(a), Effect::InstallGeneration(b)) => a == b,
            (Outcome::ProbeResult { .. }, Effect::ProbeAddress | Effect::QuickProbe)
            | (Outcome::AddressAdded, Effect::AddAddress)
            | (Outcome::AddressRemoved, Effect::RemoveAddress)
            | (Outcome::Announced, Effect::Announce)
            | (Outcome::ConodeStarted, Effect::StartConode)
            | (Outcome::ConodeStopped, Effect::StopConode)
            | (Outcome::FinalSnapshotShipped { .. }, Effect::ShipFinalSnapshot) => true,
            _ => false,
        }
    }
}

/// Everything the core is told. Each comes with `now` in [`crate::Core::handle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// First input of every process: what the shell found on this host.
    Started {
        /// Our tagged address is on the interface (left by an earlier process).
        leftover_address: bool,
        /// The epoch on disk (0 when none was ever written).
        persisted_epoch: u64,
        /// The newest verified generation held (including our own final snapshot).
        newest_generation: Option<u64>,
    },
    /// The result of the effect `op`: `Err` carries the reason in plain words.
    Outcome {
        /// Which effect this answers.
        op: OpId,
        /// What happened.
        result: Result<Outcome, String>,
    },
    /// A message from the peer, already authenticated by the shell (pinned TLS), but
    /// possibly delayed, duplicated, reordered or stale.
    Peer(PeerMessage),
    /// An operator command; answered by exactly one [`Action::Reply`].
    Command {
        /// Echoed in the reply.
        id: CommandId,
        /// What the operator asked.
        command: Command,
    },
    /// A health check's verdict.
    Health {
        /// Which check.
        check: Check,
        /// Passed or not.
        ok: bool,
        /// Why, in plain words (shown in status).
        reason: String,
    },
    /// The snapshot receiver verified and stored a generation.
    GenerationVerified {
        /// Its number.
        generation: u64,
    },
    /// While we may hold the address, another MAC answered ARP for it.
    ConflictSeen {
        /// The other MAC.
        mac: Mac,
    },
}

/// Severity of a log event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail for debugging the shell.
    Debug,
    /// Role changes and operator-visible steps.
    Info,
    /// Expected failures (a peer unreachable, an action failed).
    Warn,
    /// Broken assumptions: two holders, a shell that answers the wrong thing.
    Error,
}

/// Everything the core asks for, pulled with [`crate::Core::poll_action`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Carry out `effect`, then report [`Input::Outcome`] with `op`.
    Do {
        /// Echo this in the outcome.
        op: OpId,
        /// What to do.
        effect: Effect,
    },
    /// Send to the peer (best effort; a lost message needs no report).
    Send(PeerMessage),
    /// Answer an operator command (exactly once per [`CommandId`]).
    Reply {
        /// The command answered.
        id: CommandId,
        /// What was done, or why nothing was.
        result: Result<String, String>,
    },
    /// One log line (an event with its facts).
    Log {
        /// Severity.
        level: Level,
        /// One line: what happened, the numbers, the consequence.
        text: String,
    },
}
