//! Who may use a port's connection slots while connections are still unauthenticated:
//! strangers must not be able to starve known peers by opening connections and never
//! finishing the TLS handshake (1,100 half-open connections against two followers used
//! to take all their slots and make appends fail; 40 against failoverd's peer port made
//! snapshots fail).
//!
//! - A connection in its handshake takes a **handshake slot**, apart from the slots of
//!   authenticated connections (the caller's): [`Limits::known`] reserved for addresses
//!   that are known, [`Limits::strangers`] shared by every other address. An address is
//!   known when the caller says so ([`Gate::new`], [`Gate::set_members`]: the addresses
//!   of the roster members, the pinned peer), or once a connection from it proved a key
//!   the caller trusts ([`Gate::authenticated`]: a member's key, not any key). At most
//!   [`Limits::per_address`] handshakes from one address, known or not (a stranger
//!   sharing a member's address cannot take all the known slots). A connection that
//!   finds no slot is closed at once (it never waits in a queue in front of a known peer).
//! - While more than half of the strangers' slots are taken, a stranger gets
//!   [`Limits::pressed`] to finish its handshake instead of the usual deadline.
//! - Refusals are logged at most once per [`Limits::log_every`], with their count
//!   ([`Throttled`], which the ports use for their other repeated lines too).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The sizes of a [`Gate`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The port, in log lines ("conode port", "peer port").
    pub name: &'static str,
    /// Handshakes at once from known addresses.
    pub known: usize,
    /// Handshakes at once from all other addresses together.
    pub strangers: usize,
    /// Handshakes at once from one address, known or not.
    pub per_address: usize,
    /// A stranger's handshake deadline while more than half of their slots are taken.
    pub pressed: Duration,
    /// At most one refusal line per this interval.
    pub log_every: Duration,
}

/// Addresses learned from authentications remembered at most.
const MAX_KNOWN: usize = 4096;

/// The handshake slot a connection holds until its handshake ends.
pub struct Handshake {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    gate: Arc<Gate>,
    /// How long this connection has to finish its handshake.
    pub deadline: Duration,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.gate.uncount(self.ip);
    }
}

/// A repeated log line written at most once per interval, with the count of events since
/// the last one: `if let Some(n) = t.note() { warn!("… {n} …") }`.
pub struct Throttled {
    every: Duration,
    /// Events since the last line, and when that line was written.
    state: Mutex<(u64, Option<Instant>)>,
    total: AtomicU64,
    lines: AtomicU64,
}

impl Throttled {
    pub const fn new(every: Duration) -> Throttled {
        Throttled {
            every,
            state: Mutex::new((0, None)),
            total: AtomicU64::new(0),
            lines: AtomicU64::new(0),
        }
    }

    /// Count one event; `Some(events since the last line, this one included)` when a
    /// line is due now (the caller writes it).
    pub fn note(&self) -> Option<u64> {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        if s.1.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        let n = s.0;
        *s = (0, Some(Instant::now()));
        self.lines.fetch_add(1, Ordering::Relaxed);
        Some(n)
    }

    /// Events so far, and the lines due about them.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.total.load(Ordering::Relaxed),
            self.lines.load(Ordering::Relaxed),
        )
    }
}

pub struct Gate {
    limits: Limits,
    /// Known because the caller said so (replaced by [`Gate::set_members`]).
    members: Mutex<HashSet<IpAddr>>,
    /// Known because a trusted key authenticated from there.
    learned: Mutex<HashSet<IpAddr>>,
    known_slots: Arc<Semaphore>,
    stranger_slots: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    refused: Throttled,
}

impl Gate {
    /// A gate whose known addresses start as `known`.
    pub fn new(limits: Limits, known: impl IntoIterator<Item = IpAddr>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            members: Mutex::new(known.into_iter().collect()),
            learned: Mutex::new(HashSet::new()),
            known_slots: Arc::new(Semaphore::new(limits.known)),
            stranger_slots: Arc::new(Semaphore::new(limits.strangers)),
            per_address: Mutex::new(HashMap::new()),
            refused: Throttled::new(limits.log_every),
        })
    }

    fn uncount(&self, ip: IpAddr) {
        let mut per = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
    }

    /// The addresses the caller knows its peers at (the roster members' addresses, as
    /// resolved now), in place of those it gave before.
    pub fn set_members(&self, ips: impl IntoIterator<Item = IpAddr>) {
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = ips.into_iter().collect();
    }

    /// `ip` authenticated with a key the caller trusts (a roster member's, not merely a
    /// valid one): from now on it is known.
    pub fn authenticated(&self, ip: IpAddr) {
        let mut k = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        if k.len() < MAX_KNOWN {
            k.insert(ip);
        }
    }

    /// Whether `ip` is known (it has the known addresses' handshake slots).
    pub fn is_known(&self, ip: IpAddr) -> bool {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
            || self
                .learned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&ip)
    }

    /// A handshake slot for a connection from `ip`, or `None` (close it at once; counted
    /// and logged at most once per [`Limits::log_every`]). `timeout`: the handshake
    /// deadline when the port is not under pressure.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, timeout: Duration) -> Option<Handshake> {
        {
            let mut per = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = per.entry(ip).or_insert(0);
            if *n >= self.limits.per_address {
                drop(per);
                self.refuse(ip, "too many handshakes open from this address");
                return None;
            }
            *n += 1;
        }
        let (slots, why) = if self.is_known(ip) {
            (
                &self.known_slots,
                "the known addresses have as many handshakes open as allowed",
            )
        } else {
            (
                &self.stranger_slots,
                "every handshake slot for unknown addresses is taken",
            )
        };
        let Ok(p) = slots.clone().try_acquire_owned() else {
            self.uncount(ip);
            self.refuse(ip, why);
            return None;
        };
        let pressed = !Arc::ptr_eq(slots, &self.known_slots)
            && self.stranger_slots.available_permits() < self.limits.strangers / 2;
        Some(Handshake {
            _permit: p,
            ip,
            gate: self.clone(),
            deadline: if pressed {
                timeout.min(self.limits.pressed)
            } else {
                timeout
            },
        })
    }

    /// Count a refusal (or a handshake that failed); log the count at most once per
    /// [`Limits::log_every`].
    pub fn refuse(&self, ip: IpAddr, why: &str) {
        if let Some(n) = self.refused.note() {
            tracing::warn!(
                "{}: refused {n} connection(s) since the last such line, the latest from {ip}: {why} (one line per {:?} at most)",
                self.limits.name,
                self.limits.log_every
            );
        }
    }

    /// Connections refused (or whose handshake failed) so far, and the lines logged
    /// about them.
    pub fn refusals(&self) -> (u64, u64) {
        self.refused.counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        name: "test port",
        known: 8,
        strangers: 32,
        per_address: 4,
        pressed: Duration::from_secs(1),
        log_every: Duration::from_secs(10),
    };

    #[test]
    fn strangers_cannot_take_the_known_addresses_handshake_slots() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let g = Gate::new(LIMITS, [peer]);
        let t = Duration::from_secs(5);
        let stranger: IpAddr = "10.0.0.9".parse().unwrap();
        let held: Vec<_> = (0..LIMITS.per_address)
            .map(|_| g.admit(stranger, t).expect("within the per-address limit"))
            .collect();
        assert!(g.admit(stranger, t).is_none(), "past the per-address limit");
        // Strangers from many addresses fill their slots, and only theirs.
        let mut more = Vec::new();
        for i in 0..255u8 {
            if let Some(h) = g.admit(IpAddr::from([10, 1, 0, i]), t) {
                more.push(h);
            }
        }
        assert_eq!(held.len() + more.len(), LIMITS.strangers);
        assert!(
            more.last().unwrap().deadline <= LIMITS.pressed,
            "under pressure strangers get less time"
        );
        let p: Vec<_> = (0..LIMITS.per_address)
            .map(|_| g.admit(peer, t).expect("the known address's own slots"))
            .collect();
        assert_eq!(p[0].deadline, t, "known addresses are not pressed");
        // A known address has a per-address limit too: whoever shares it (a stranger
        // on a member's host) cannot take every known slot.
        assert!(g.admit(peer, t).is_none(), "past the per-address limit");
        // The roster's addresses: another member has the known slots left.
        let member: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(g.admit(member, t).is_none(), "strangers' slots are full");
        g.set_members([peer, member]);
        let m: Vec<_> = (0..LIMITS.known - LIMITS.per_address)
            .map(|_| g.admit(member, t).expect("a member's address is known"))
            .collect();
        drop(m);
        // Replaced, not added to: an address no longer given is a stranger again,
        // unless a trusted key authenticated from it.
        g.set_members([member]);
        assert!(!g.is_known(peer));
        g.authenticated(peer);
        assert!(g.is_known(peer));
        drop(p);
        assert!(g.admit(peer, t).is_some(), "known again");
        // Slots come back when handshakes end.
        drop(held);
        assert!(g.admit(stranger, t).is_some());
        assert!(g.per_address.lock().unwrap().get(&stranger).is_none());
        let (refused, lines) = g.refusals();
        assert!(refused > 200, "{refused}");
        assert_eq!(lines, 1, "one line per interval");
    }

    #[test]
    fn throttled_lines_carry_the_count_since_the_last() {
        let t = Throttled::new(Duration::from_millis(200));
        assert_eq!(t.note(), Some(1), "the first event is logged at once");
        for _ in 0..99 {
            assert_eq!(t.note(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.note(), Some(100), "the 99 held back and this one");
        assert_eq!(t.counts(), (101, 2));
    }
}
