//! What the daemon knows about itself, for `failoverd status`, the peer's `/v1/status`
//! and Prometheus `/metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::standby::{Installed, Store};

/// Which side of the pair this host is on now. Until the virtual-IP work adds claims and
/// epochs, the live host is the one whose conode answers on its admin socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Live,
    Standby,
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
    role: Option<Role>,
    last: Option<LastSnapshot>,
    last_error: Option<String>,
    failures: BTreeMap<String, u64>,
    bytes_sent: u64,
    snapshots: u64,
    chunks_received: u64,
    chunk_bytes_received: u64,
}

pub struct Shared {
    pub store: Arc<Store>,
    pub io_timeout: Duration,
    pub admin: PathBuf,
    inner: Mutex<Inner>,
}

pub use conode::db::unix_ms as now_ms;

/// A failure's cause, as a metric label.
pub fn cause_of(e: &str) -> &'static str {
    if e.contains("no space left") {
        "disk_full"
    } else if e.contains("signature") {
        "signature"
    } else if e.contains("does not match its hash") {
        "hash"
    } else if e.contains("not newer") || e.contains("refusing to go back") {
        "old_generation"
    } else if e.contains("integrity") || e.contains("damaged") || e.contains("truncated") {
        "integrity"
    } else if e.contains("conode") && (e.contains("not running") || e.contains("admin")) {
        "conode"
    } else if e.starts_with("rsync") || e.starts_with("scp") {
        "transport"
    } else if e.contains("peer") {
        "peer"
    } else {
        "other"
    }
}

impl Shared {
    pub fn new(store: Arc<Store>, io_timeout: Duration, admin: PathBuf) -> Shared {
        Shared {
            store,
            io_timeout,
            admin,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_role(&self, r: Role) {
        let mut i = self.lock();
        if i.role != Some(r) {
            tracing::info!(
                "this host is now {r:?} (its conode {})",
                if r == Role::Live {
                    "answers"
                } else {
                    "does not answer"
                }
            );
        }
        i.role = Some(r);
    }

    pub fn role(&self) -> Option<Role> {
        self.lock().role
    }

    pub fn count_failure(&self, cause: &str) {
        *self.lock().failures.entry(cause.to_string()).or_default() += 1;
    }

    /// Record a refused request or a failed snapshot.
    pub fn refused(&self, e: &str) {
        tracing::warn!("{e}");
        let mut i = self.lock();
        *i.failures.entry(cause_of(e).to_string()).or_default() += 1;
        i.last_error = Some(e.to_string());
    }

    pub fn chunk_received(&self, n: u64) {
        let mut i = self.lock();
        i.chunks_received += 1;
        i.chunk_bytes_received += n;
    }

    pub fn installed(&self, inst: &Installed, took: Duration) {
        tracing::info!(
            "installed generation {} ({} bytes, {} chains) in {took:?}",
            inst.manifest.generation,
            inst.manifest.bytes,
            inst.manifest.positions.len()
        );
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
        // Its bytes were counted as they were sent (add_bytes_sent), resumed attempts too.
        i.snapshots += 1;
        i.last_error = None;
        i.last = Some(s);
    }

    pub fn add_bytes_sent(&self, n: u64) {
        self.lock().bytes_sent += n;
    }

    /// Refuse to receive snapshots while this host's own conode runs.
    pub async fn refuse_if_live(&self) -> Result<(), String> {
        match tokio::time::timeout(
            Duration::from_secs(2),
            conode::admin::fetch_position(&self.admin),
        )
        .await
        {
            Ok(Ok(_)) => Err("this host's conode is running, so this host is live: it does not take snapshots from its peer".into()),
            _ => Ok(()),
        }
    }

    /// `/v1/status` for the peer: what this host holds.
    pub fn peer_status(&self) -> serde_json::Value {
        let gens: Vec<_> = self
            .store
            .held()
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
        serde_json::json!({ "role": self.role(), "epoch": 0, "generations": gens })
    }

    /// `failoverd status --json`.
    pub fn status(&self) -> serde_json::Value {
        let held = self.store.held();
        let i = self.lock();
        let last = i.last.clone().or_else(|| {
            held.last().map(|n| LastSnapshot {
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
        let age = last
            .as_ref()
            .map(|l| now_ms().saturating_sub(l.taken_unix_ms) as f64 / 1000.0);
        serde_json::json!({
            "role": i.role,
            "epoch": 0,
            "generation": last.as_ref().map(|l| l.generation),
            "age_seconds": age,
            "bytes": last.as_ref().map(|l| l.bytes),
            "duration_ms": last.as_ref().map(|l| l.duration_ms),
            "transport": last.as_ref().map(|l| l.transport.clone()),
            "bytes_sent": last.as_ref().map(|l| l.bytes_sent),
            "reused_bytes": last.as_ref().map(|l| l.reused_bytes),
            "chains": last.as_ref().map(|l| l.chains),
            "generations_held": held.iter().map(|g| g.generation).collect::<Vec<_>>(),
            "error": i.last_error,
            "failures": i.failures,
        })
    }

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        let st = self.status();
        let i = self.lock();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in lines {
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let num = |k: &str| st.get(k).and_then(|v| v.as_f64());
        let role = st.get("role").and_then(|r| r.as_str()).unwrap_or("unknown");
        metric(
            "failoverd_role",
            "gauge",
            "1 for the role this host has now (live: its conode answers).",
            vec![(format!("{{role=\"{role}\"}}"), "1".into())],
        );
        metric(
            "failoverd_epoch",
            "gauge",
            "Epoch of this host (0 until claims exist).",
            vec![(String::new(), "0".into())],
        );
        for (name, key, help) in [
            (
                "failoverd_snapshot_generation",
                "generation",
                "Generation of the last snapshot shipped (live) or installed (standby).",
            ),
            (
                "failoverd_snapshot_age_seconds",
                "age_seconds",
                "Seconds since the last snapshot's read transaction began on the live conode.",
            ),
            (
                "failoverd_snapshot_bytes",
                "bytes",
                "Size of the last snapshot.",
            ),
        ] {
            if let Some(v) = num(key) {
                metric(name, "gauge", help, vec![(String::new(), v.to_string())]);
            }
        }
        if let Some(ms) = num("duration_ms") {
            metric(
                "failoverd_snapshot_duration_seconds",
                "gauge",
                "Time to take, ship, verify and install the last snapshot.",
                vec![(String::new(), (ms / 1000.0).to_string())],
            );
        }
        metric(
            "failoverd_snapshot_bytes_sent_total",
            "counter",
            "Snapshot bytes sent to the peer (chunks, or what rsync/scp reported).",
            vec![(String::new(), i.bytes_sent.to_string())],
        );
        metric(
            "failoverd_snapshots_total",
            "counter",
            "Snapshots shipped and installed by the peer.",
            vec![(String::new(), i.snapshots.to_string())],
        );
        metric(
            "failoverd_chunks_received_total",
            "counter",
            "Verified chunks received from the peer.",
            vec![(String::new(), i.chunks_received.to_string())],
        );
        metric(
            "failoverd_chunk_bytes_received_total",
            "counter",
            "Bytes of verified chunks received from the peer.",
            vec![(String::new(), i.chunk_bytes_received.to_string())],
        );
        metric(
            "failoverd_snapshot_failures_total",
            "counter",
            "Snapshots that failed or were refused, by cause.",
            i.failures
                .iter()
                .map(|(c, n)| (format!("{{cause=\"{c}\"}}"), n.to_string()))
                .collect(),
        );
        metric(
            "failoverd_generations_held",
            "gauge",
            "Verified generations held on this host.",
            vec![(
                String::new(),
                st["generations_held"]
                    .as_array()
                    .map_or(0, |a| a.len())
                    .to_string(),
            )],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_sent_are_counted_once() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(d.path(), 1, [1; 32], [2; 32]).unwrap());
        let sh = Shared::new(store, Duration::from_secs(1), d.path().join("none.sock"));
        sh.add_bytes_sent(700);
        sh.shipped(LastSnapshot {
            generation: 1,
            taken_unix_ms: 1,
            finished_unix_ms: 2,
            bytes: 1000,
            duration_ms: 1,
            transport: "https".into(),
            bytes_sent: 700,
            reused_bytes: 300,
            chains: 1,
        });
        let m = sh.metrics();
        assert!(
            m.contains("failoverd_snapshot_bytes_sent_total 700\n"),
            "{m}"
        );
        assert!(m.contains("failoverd_snapshots_total 1\n"), "{m}");
        assert_eq!(sh.status()["bytes_sent"], 700);
    }
}
