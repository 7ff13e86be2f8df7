//! Who may use the peer port's connection slots. The port has one legitimate client, the
//! pinned peer, and strangers must not be able to starve it by opening connections and
//! never finishing the TLS handshake (40 such connections used to hold all 16 slots and
//! make snapshots fail).
//!
//! - A connection in its TLS handshake takes a **handshake slot**, apart from the slots
//!   of authenticated connections: [`PEER_HANDSHAKES`] reserved for the peer's own
//!   address, [`STRANGER_HANDSHAKES`] shared by every other address, at most
//!   [`PER_ADDRESS`] of them from one address. A connection that finds no slot is closed
//!   at once (it never waits in a queue in front of the peer).
//! - While more than half of the strangers' slots are taken, a stranger gets
//!   [`PRESSED_HANDSHAKE`] to finish its handshake instead of the configured timeout.
//! - Only an authenticated connection (the pinned key) takes one of the slots that serve
//!   requests.
//! - Refusals are logged at most once per [`LOG_EVERY`], with their count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handshakes at once from the peer's own address.
pub const PEER_HANDSHAKES: usize = 4;
/// Handshakes at once from all other addresses together.
pub const STRANGER_HANDSHAKES: usize = 32;
/// Handshakes at once from one address other than the peer's.
pub const PER_ADDRESS: usize = 4;
/// A stranger's handshake deadline while more than half of their slots are taken.
pub const PRESSED_HANDSHAKE: Duration = Duration::from_secs(1);
/// At most one refusal line per this interval.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

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
            let mut per = self
                .gate
                .per_address
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.ip);
                }
            }
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
    /// The pinned peer's address, when `peer.address` resolves.
    peer: Option<IpAddr>,
    peer_slots: Arc<Semaphore>,
    stranger_slots: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Slots of authenticated connections.
    pub served: Arc<Semaphore>,
    refused: Mutex<Refused>,
}

impl Gate {
    /// `peer`: the peer's `host:port` (resolved now; a name that does not resolve gives
    /// the peer no reserved slots, only the per-address limit of a stranger).
    pub fn new(peer: &str, served: usize) -> Arc<Gate> {
        let peer = std::net::ToSocketAddrs::to_socket_addrs(peer)
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| a.ip());
        Arc::new(Gate {
            peer,
            peer_slots: Arc::new(Semaphore::new(PEER_HANDSHAKES)),
            stranger_slots: Arc::new(Semaphore::new(STRANGER_HANDSHAKES)),
            per_address: Mutex::new(HashMap::new()),
            served: Arc::new(Semaphore::new(served)),
            refused: Mutex::new(Refused::default()),
        })
    }

    /// A handshake slot for a connection from `ip`, or `None` (close it at once; counted
    /// and logged at most once per [`LOG_EVERY`]). `timeout`: the handshake deadline when
    /// the port is not under pressure.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, timeout: Duration) -> Option<Handshake> {
        if Some(ip) == self.peer {
            return match self.peer_slots.clone().try_acquire_owned() {
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
                        "the peer's address has as many handshakes open as allowed",
                    );
                    None
                }
            };
        }
        {
            let mut per = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = per.entry(ip).or_insert(0);
            if *n >= PER_ADDRESS {
                drop(per);
                self.refuse(ip, "too many handshakes open from this address");
                return None;
            }
            *n += 1;
        }
        // From here the per-address count is the Handshake's to give back.
        let Ok(p) = self.stranger_slots.clone().try_acquire_owned() else {
            let mut per = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
            drop(per);
            self.refuse(ip, "every handshake slot for other addresses is taken");
            return None;
        };
        let pressed = self.stranger_slots.available_permits() < STRANGER_HANDSHAKES / 2;
        Some(Handshake {
            _permit: p,
            ip,
            gate: self.clone(),
            counted: true,
            deadline: if pressed {
                timeout.min(PRESSED_HANDSHAKE)
            } else {
                timeout
            },
        })
    }

    /// Count a refusal; log the count at most once per [`LOG_EVERY`].
    pub fn refuse(&self, ip: IpAddr, why: &str) {
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.count += 1;
        if r.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                "peer port: refused {} connection(s) since the last such line, the latest from {ip}: {why} (one line per {LOG_EVERY:?} at most)",
                r.count
            );
            r.count = 0;
            r.logged = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_cannot_take_the_peers_handshake_slots() {
        let g = Gate::new("10.0.0.2:7780", 16);
        let t = Duration::from_secs(5);
        let stranger: IpAddr = "10.0.0.9".parse().unwrap();
        let held: Vec<_> = (0..PER_ADDRESS)
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
        assert_eq!(held.len() + more.len(), STRANGER_HANDSHAKES);
        assert!(
            more.last().unwrap().deadline <= PRESSED_HANDSHAKE,
            "under pressure strangers get less time"
        );
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let p: Vec<_> = (0..PEER_HANDSHAKES)
            .map(|_| g.admit(peer, t).expect("the peer's own slots"))
            .collect();
        assert_eq!(p[0].deadline, t);
        // Slots come back when handshakes end.
        drop(held);
        assert!(g.admit(stranger, t).is_some());
        assert!(g.per_address.lock().unwrap().get(&stranger).is_none());
    }
}
