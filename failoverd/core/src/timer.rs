//! The core's timers: a closed set, at most one deadline each, in a small table.
//!
//! Deadlines are [`Millis`] computed from the caller's `now`; this module never reads a
//! clock and never sleeps. [`crate::Core::poll_timeout`] is the earliest deadline.

use crate::api::Millis;

/// Every timer the core can arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Send our state to the peer (also resends a pending request or handover).
    Heartbeat,
    /// Nothing heard from the peer for `peer_timeout`: log it unreachable.
    PeerSilent,
    /// The pending effect has had no outcome in time: it failed.
    Action,
    /// Repeat the gratuitous ARP burst while live.
    AnnounceRefresh,
    /// A leftover address the peer did not confirm in time: remove it.
    Leftover,
    /// One side of a switchover waited too long for the other.
    Handover,
    /// Try removing the address again after a failure.
    RemoveRetry,
}

const ALL: [Timer; 7] = [
    Timer::Heartbeat,
    Timer::PeerSilent,
    Timer::Action,
    Timer::AnnounceRefresh,
    Timer::Leftover,
    Timer::Handover,
    Timer::RemoveRetry,
];

/// One optional deadline per [`Timer`].
#[derive(Clone, Debug, Default)]
pub(crate) struct TimerTable {
    at: [Option<Millis>; ALL.len()],
}

impl TimerTable {
    pub(crate) fn set(&mut self, t: Timer, at: Millis) {
        self.at[t as usize] = Some(at);
    }

    pub(crate) fn stop(&mut self, t: Timer) {
        self.at[t as usize] = None;
    }

    /// The earliest deadline of all armed timers.
    pub(crate) fn next(&self) -> Option<Millis> {
        self.at.iter().flatten().min().copied()
    }

    /// The first timer (in table order) whose deadline is at or before `now`, disarmed.
    pub(crate) fn take_expired(&mut self, now: Millis) -> Option<Timer> {
        let t = ALL
            .into_iter()
            .find(|t| self.at[*t as usize].is_some_and(|at| at <= now))?;
        self.stop(t);
        Some(t)
    }
}
