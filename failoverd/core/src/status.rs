//! The status view: what `failoverd status` shows, read from the core without changing
//! it.
//!
//! Plain data for the shell to print or serialise; it must never be used to decide
//! anything (decisions read the core's own state).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::api::{Check, Millis, RoleCause};

/// The role shown to operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the address (or is handing it over, or adding it after a clean probe).
    Live,
    /// Everything else.
    Standby,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Live => "live",
            Role::Standby => "standby",
        })
    }
}

/// What this host knows of its peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// Heard within `peer_timeout`.
    pub reachable: bool,
    /// When it was last heard, if ever.
    pub last_heard: Option<Millis>,
    /// The highest epoch it reported.
    pub epoch: u64,
    /// It said it is live.
    pub live: bool,
    /// It said it may hold the address.
    pub may_hold: bool,
    /// Its newest verified generation.
    pub newest_generation: Option<u64>,
}

/// A health check's latest verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthVerdict {
    /// Which check.
    pub check: Check,
    /// Passed or not.
    pub ok: bool,
    /// Why, as the shell said.
    pub reason: String,
    /// When the verdict last changed.
    pub since: Millis,
}

/// The whole view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// `live` or `standby`.
    pub role: Role,
    /// The persisted epoch.
    pub epoch: u64,
    /// The core's belief that the address may be on this host's interface (true while
    /// live, adding, releasing, or deciding about a leftover).
    pub vip_held: bool,
    /// What the core is doing now, in words ("idle", "removing the address (attempt 3):
    /// ...").
    pub doing: String,
    /// The peer as last heard.
    pub peer: PeerStatus,
    /// Health verdicts with their reasons.
    pub health: Vec<HealthVerdict>,
    /// The newest verified generation held here.
    pub newest_generation: Option<u64>,
    /// How many times another MAC answered for the address.
    pub conflicts: u64,
    /// Why the role last changed (or is changing now), and in words; `None` until it
    /// first changes in this process.
    pub role_cause: Option<(RoleCause, String)>,
}
