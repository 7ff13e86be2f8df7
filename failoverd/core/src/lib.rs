//! The sans-IO decision core of failoverd: which host may hold the virtual address,
//! and in which order the steps of a claim, a switchover or a release happen.
//!
//! A [`Core`] is a plain struct, one per host. It never reads a clock, opens a socket,
//! touches a file, spawns a thread or draws a random number; the shell (the daemon)
//! does all of that and reports back. The contract (invariants, fault model, timing
//! assumptions) is `DESIGN.md` beside this crate.
//!
//! # Operating manual
//!
//! 1. Build it once: `Core::new(Config { .. })` validates the timer settings and names
//!    the values it refuses.
//! 2. Tell it what the host looks like: `core.handle(now, Input::Started {
//!    leftover_address, persisted_epoch, newest_generation })`. `leftover_address` is
//!    whether *our tagged* address is on the interface; `persisted_epoch` is the epoch
//!    file (0 if none); `newest_generation` the newest verified generation on disk
//!    (including this host's own final snapshot). The core starts as standby and never
//!    claims at start.
//! 3. Feed it everything that happens, with the monotonic `now` of the moment:
//!    peer messages ([`Input::Peer`]), operator commands ([`Input::Command`]), health
//!    verdicts, verified generations, ARP conflicts, and the outcome of every effect it
//!    asked for ([`Input::Outcome`] with the same [`OpId`], `Err(reason)` on failure).
//! 4. After every `handle*` call, drain [`Core::poll_action`] and carry the actions out:
//!    - [`Action::Do`]: perform the [`Effect`], then report its outcome. Effects are
//!      carried out **one after the other, in the order asked** (the core relies on it:
//!      a removal asked after an add happens after that add). An effect that never
//!      reports is timed out by the core and treated as failed; it may still have
//!      happened, and the core plans for both.
//!    - [`Action::Send`]: deliver to the peer (best effort; loss needs no report).
//!    - [`Action::Reply`]: answer the operator (exactly one per command).
//!    - [`Action::Log`]: one log line.
//! 5. Arm one timer at [`Core::poll_timeout`]; when it passes, call
//!    [`Core::handle_timeout`] and drain again.
//! 6. Show [`Core::status`] for `failoverd status`.
//!
//! A restart of the daemon is a new `Core` and a new `Started`. Outcomes of the old
//! process's effects must not be fed to the new one.
//!
//! # Layout
//!
//! - [`api`]: the vocabulary: [`Millis`], [`Input`], [`Effect`], [`Outcome`],
//!   [`Action`], [`Command`].
//! - [`message`]: the peer protocol ([`PeerMessage`]: every message carries the
//!   sender's epoch and state).
//! - [`config`]: timer settings and the lease policy, validated together.
//! - `timer`: the closed set of timers and their table (private).
//! - `machine`: the state machine itself, [`Core`] (private module, type re-exported).
//! - [`status`]: the operator's view.
//!
//! # The lease hook
//!
//! [`LeasePolicy::None`] is the only policy today (manual failover). The core asks
//! `lease_allows(now)` before every add of the address, before keeping a leftover, and
//! after every timer while it claims the address (dropping it when refused). A witness
//! or etcd lease is one more [`LeasePolicy`] variant and one more input
//! (`LeaseGranted { until }`) read by that one function.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// Strings, vectors and queues; nothing of `std` (no clock, file, socket or thread).
extern crate alloc;

pub mod api;
pub mod config;
mod machine;
pub mod message;
pub mod status;
mod timer;

pub use api::{
    Action, Check, Command, CommandId, Effect, Input, Level, Mac, Millis, OpId, Outcome, RoleCause,
};
pub use config::{Config, ConfigError, LeasePolicy};
pub use machine::Core;
pub use message::{Body, PeerMessage, Refusal, MAX_EPOCH, MAX_EPOCH_STEP};
pub use status::{HealthVerdict, PeerStatus, Role, Status};
