//! What the daemon knows about itself: its role, the last snapshot it shipped or
//! installed, its last error. Read by `failoverd status`, the peer's `/v1/status` and
//! `/metrics`.
//!
//! Must never wait for the store: the generations held come from the store's published
//! view ([`Store::view`]), never from its lock, so status answers while an install runs.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::standby::{Installed, Store};

pub use conode::db::unix_ms as now_ms;

/// Which side of the pair this host is on now: the failover core's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Live,
    Standby,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Live => "live",
            Role::Standby => "standby",
        }
    }
}

/// The last snapshot this host shipped (live) or installed (standby).
#[derive(Debug, Clone, Serialize)]
pub struct LastSnapshot {
    pub generation: u64,
    pub taken_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    pub transport: String,
    pub bytes_sent: u64,
    pub reused_bytes: u64,
    pub chains: usize,
}

#[derive(Default)]
struct Inner {
    last: Option<LastSnapshot>,
    last_error: Option<String>,
}

/// The status of this host. Cheap to read; never waits for the store.
pub struct Status {
    store: Arc<Store>,
    inner: Mutex<Inner>,
    /// The failover core's view, published by its driver after every step.
    core: Mutex<Option<tokio::sync::watch::Receiver<Option<failoverd_core::Status>>>>,
}

/// A copy of the status at one moment.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    pub role: Option<Role>,
    pub epoch: u64,
    pub last: Option<LastSnapshot>,
    pub age_seconds: Option<f64>,
    pub generations_held: Vec<u64>,
    pub error: Option<String>,
    /// The failover core's view (role, epoch, address, peer, health), once it runs.
    pub core: Option<failoverd_core::Status>,
}

impl Status {
    pub fn new(store: Arc<Store>) -> Status {
        Status {
            store,
            inner: Mutex::new(Inner::default()),
            core: Mutex::new(None),
        }
    }

    /// Show the failover core's view from now on.
    pub fn attach_core(&self, rx: tokio::sync::watch::Receiver<Option<failoverd_core::Status>>) {
        *self.core.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
    }

    fn core(&self) -> Option<failoverd_core::Status> {
        self.core
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|rx| rx.borrow().clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember a refused request or a failed snapshot (logging and counting are the
    /// caller's, who knows its cause).
    pub fn set_error(&self, e: String) {
        self.lock().last_error = Some(e);
    }

    pub fn installed(&self, inst: &Installed) {
        let mut i = self.lock();
        i.last_error = None;
        i.last = Some(LastSnapshot {
            generation: inst.manifest.generation,
            taken_unix_ms: inst.manifest.taken_unix_ms,
            finished_unix_ms: now_ms(),
            bytes: inst.manifest.bytes,
            duration_ms: now_ms().saturating_sub(inst.manifest.created_unix_ms),
            transport: inst.manifest.transport.name().to_string(),
            bytes_sent: 0,
            reused_bytes: 0,
            chains: inst.manifest.positions.len(),
        });
    }

    pub fn shipped(&self, s: LastSnapshot) {
        let mut i = self.lock();
        i.last_error = None;
        i.last = Some(s);
    }

    /// The status now.
    pub fn view(&self) -> StatusView {
        let held = self.store.view();
        let i = self.lock();
        let last = i.last.clone().or_else(|| {
            held.held.last().map(|n| LastSnapshot {
                generation: n.generation,
                taken_unix_ms: n.taken_unix_ms,
                finished_unix_ms: n.installed_unix_ms,
                bytes: n.bytes,
                duration_ms: n.installed_unix_ms.saturating_sub(n.created_unix_ms),
                transport: n.transport.name().to_string(),
                bytes_sent: 0,
                reused_bytes: 0,
                chains: n.chains,
            })
        });
        let core = self.core();
        StatusView {
            role: role_of(&core),
            epoch: core.as_ref().map_or(0, |c| c.epoch),
            core,
            age_seconds: last
                .as_ref()
                .map(|l| now_ms().saturating_sub(l.taken_unix_ms) as f64 / 1000.0),
            last,
            generations_held: held.held.iter().map(|g| g.generation).collect(),
            error: i.last_error.clone(),
        }
    }

    /// `/v1/status` for the peer: what this host holds.
    pub fn peer_json(&self) -> serde_json::Value {
        let held = self.store.view();
        let gens: Vec<_> = held
            .held
            .iter()
            .map(|h| {
                serde_json::json!({
                    "generation": h.generation,
                    "bytes": h.bytes,
                    "taken_unix_ms": h.taken_unix_ms,
                    "chains": h.chains,
                })
            })
            .collect();
        let core = self.core();
        serde_json::json!({
            "role": role_of(&core),
            "epoch": core.as_ref().map_or(0, |c| c.epoch),
            "generations": gens,
        })
    }
}

impl StatusView {
    /// `failoverd status --json`.
    pub fn json(&self) -> serde_json::Value {
        let last = self.last.as_ref();
        serde_json::json!({
            "role": self.role,
            "epoch": self.epoch,
            "generation": last.map(|l| l.generation),
            "age_seconds": self.age_seconds,
            "bytes": last.map(|l| l.bytes),
            "duration_ms": last.map(|l| l.duration_ms),
            "transport": last.map(|l| l.transport.clone()),
            "bytes_sent": last.map(|l| l.bytes_sent),
            "reused_bytes": last.map(|l| l.reused_bytes),
            "chains": last.map(|l| l.chains),
            "generations_held": self.generations_held,
            "error": self.error,
            "vip_held": self.core.as_ref().map(|c| c.vip_held),
            "doing": self.core.as_ref().map(|c| c.doing.clone()),
            "newest_generation": self.core.as_ref().and_then(|c| c.newest_generation),
            "conflicts": self.core.as_ref().map(|c| c.conflicts),
            "peer": self.core.as_ref().map(|c| serde_json::json!({
                "reachable": c.peer.reachable,
                "epoch": c.peer.epoch,
                "live": c.peer.live,
                "may_hold": c.peer.may_hold,
                "newest_generation": c.peer.newest_generation,
            })),
            "health": self.core.as_ref().map(|c| c.health.iter().map(|h| serde_json::json!({
                "check": check_name(h.check),
                "ok": h.ok,
                "reason": h.reason,
            })).collect::<Vec<_>>()),
        })
    }
}

/// A health check's name in status and metrics.
pub fn check_name(c: failoverd_core::Check) -> &'static str {
    match c {
        failoverd_core::Check::OwnConode => "own_conode",
        failoverd_core::Check::LiveConode => "live_conode",
        failoverd_core::Check::LivePeer => "live_peer",
    }
}

/// The role the failover core shows (none before it runs).
fn role_of(core: &Option<failoverd_core::Status>) -> Option<Role> {
    core.as_ref().map(|c| match c.role {
        failoverd_core::Role::Live => Role::Live,
        failoverd_core::Role::Standby => Role::Standby,
    })
}
