//! Who may use a port's connection slots while connections are still unauthenticated:
//! strangers must not be able to starve known peers by opening connections and never
//! finishing the TLS handshake (1,100 half-open connections against two followers used
//! to take all their slots and make appends fail; 40 against failoverd's peer port made
//! snapshots fail).
//!
//! - A connection in its handshake takes a **handshake slot**, apart from the slots of
//!   authenticated connections (the caller's): [`Limits::known`] reserved for addresses
//!   that are known (given at the start, or that authenticated before: a roster member,
//!   the pinned peer), [`Limits::strangers`] shared by every other address, at most
//!   [`Limits::per_address`] of them from one address. A connection that finds no slot
//!   is closed at once (it never waits in a queue in front of a known peer).
//! - While more than half of the strangers' slots are taken, a stranger gets
//!   [`Limits::pressed`] to finish its handshake instead of the usual deadline.
//! - Refusals are logged at most once per [`Limits::log_every`], with their count.

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
    /// Handshakes at once from one address that is not known.
    pub per_address: usize,
    /// A stranger's handshake deadline while more than half of their slots are taken.
    pub pressed: Duration,
    /// At most one refusal line per this interval.
    pub log_every: Duration,
}

/// Known addresses remembered at most (authenticated ones are added as they come).
const MAX_KNOWN: usize = 4096;

/// The handshake slot a connection holds until its handshake ends.
pub struct Handshake {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    gate: Arc<Gate>,
    counted: bool,
    /// How long this connection has to finish its handshake.
    pub deadline: Duration,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if self.counted {
            self.gate.uncount(self.ip);
        }
    }
}

#[derive(Default)]
struct Refused {
    /// Refusals since the last line, and when that line was written.
    count: u64,
    logged: Option<Instant>,
}

pub struct Gate {
    limits: Limits,
    known: Mutex<HashSet<IpAddr>>,
    known_slots: Arc<Semaphore>,
    stranger_slots: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    refused: Mutex<Refused>,
    refused_total: AtomicU64,
    lines: AtomicU64,
}

impl Gate {
    /// A gate whose known addresses start as `known`.
    pub fn new(limits: Limits, known: impl IntoIterator<Item = IpAddr>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            known: Mutex::new(known.into_iter().collect()),
            known_slots: Arc::new(Semaphore::new(limits.known)),
            stranger_slots: Arc::new(Semaphore::new(limits.strangers)),
            per_address: Mutex::new(HashMap::new()),
            refused: Mutex::new(Refused::default()),
            refused_total: AtomicU64::new(0),
            lines: AtomicU64::new(0),
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

    /// `ip` authenticated (its key is one the caller trusts): from now on it is known.
    pub fn authenticated(&self, ip: IpAddr) {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if k.len() < MAX_KNOWN {
            k.insert(ip);
        }
    }

    /// A handshake slot for a connection from `ip`, or `None` (close it at once; counted
    /// and logged at most once per [`Limits::log_every`]). `timeout`: the handshake
    /// deadline when the port is not under pressure.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, timeout: Duration) -> Option<Handshake> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip);
        if known {
            return match self.known_slots.clone().try_acquire_owned() {
                Ok(p) => Some(Handshake {
                    _permit: p,
                    ip,
                    gate: self.clone(),
                    counted: false,
                    deadline: timeout,
                }),
                Err(_) => {
                    self.refuse(
                        ip,
                        "the known addresses have as many handshakes open as allowed",
                    );
                    None
                }
            };
        }
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
        let Ok(p) = self.stranger_slots.clone().try_acquire_owned() else {
            self.uncount(ip);
            self.refuse(ip, "every handshake slot for unknown addresses is taken");
            return None;
        };
        let pressed = self.stranger_slots.available_permits() < self.limits.strangers / 2;
        Some(Handshake {
            _permit: p,
            ip,
            gate: self.clone(),
            counted: true,
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
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.count += 1;
        if r.logged
            .is_none_or(|t| t.elapsed() >= self.limits.log_every)
        {
            tracing::warn!(
                "{}: refused {} connection(s) since the last such line, the latest from {ip}: {why} (one line per {:?} at most)",
                self.limits.name,
                r.count,
                self.limits.log_every
            );
            self.lines.fetch_add(1, Ordering::Relaxed);
            r.count = 0;
            r.logged = Some(Instant::now());
        }
    }

    /// Connections refused (or whose handshake failed) so far, and the lines logged
    /// about them.
    pub fn refusals(&self) -> (u64, u64) {
        (
            self.refused_total.load(Ordering::Relaxed),
            self.lines.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        name: "test port",
        known: 4,
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
        let p: Vec<_> = (0..LIMITS.known)
            .map(|_| g.admit(peer, t).expect("the known address's own slots"))
            .collect();
        assert_eq!(p[0].deadline, t);
        // An address that authenticates becomes known.
        let member: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(g.admit(member, t).is_none(), "strangers' slots are full");
        g.authenticated(member);
        drop(p);
        assert!(g.admit(member, t).is_some(), "known now");
        // Slots come back when handshakes end.
        drop(held);
        assert!(g.admit(stranger, t).is_some());
        assert!(g.per_address.lock().unwrap().get(&stranger).is_none());
        let (refused, lines) = g.refusals();
        assert!(refused > 200, "{refused}");
        assert_eq!(lines, 1, "one line per interval");
    }
}
