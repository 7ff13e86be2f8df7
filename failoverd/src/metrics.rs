//! Prometheus metrics of failoverd, through `prometheus-client` (OpenMetrics text at
//! `/metrics`). Counters move as things happen; gauges are set from the status view at
//! each scrape ([`Metrics::encode`]). Names are stable: dashboards and alerts use them.
//!
//! Never blocks: counters are atomics, and the scrape reads the status view, which never
//! waits for the store.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Cause;
use crate::status::{Role, StatusView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    check: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabel {
    to: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

/// The metrics registry and the metrics in it.
pub struct Metrics {
    registry: Registry,
    snapshots: Counter,
    bytes_sent: Counter,
    chunks_received: Counter,
    chunk_bytes_received: Counter,
    failures: Family<CauseLabel, Counter>,
    role: Family<RoleLabel, Gauge>,
    epoch: Gauge,
    generation: Gauge,
    age_seconds: Gauge<f64, AtomicU64>,
    bytes: Gauge,
    duration_seconds: Gauge<f64, AtomicU64>,
    generations_held: Gauge,
    vip_held: Gauge,
    health: Family<CheckLabel, Gauge>,
    conflicts: Counter,
    health_seconds: Family<CheckLabel, Histogram>,
    failovers: Family<CauseLabel, Counter>,
    role_changes: Family<ChangeLabel, Counter>,
    hook_runs: Family<HookLabel, Counter>,
}

/// Health checks take milliseconds when well, up to their timeout (2 s) when not.
fn health_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            snapshots: Counter::default(),
            bytes_sent: Counter::default(),
            chunks_received: Counter::default(),
            chunk_bytes_received: Counter::default(),
            failures: Family::default(),
            role: Family::default(),
            epoch: Gauge::default(),
            generation: Gauge::default(),
            age_seconds: Gauge::default(),
            bytes: Gauge::default(),
            duration_seconds: Gauge::default(),
            generations_held: Gauge::default(),
            vip_held: Gauge::default(),
            health: Family::default(),
            conflicts: Counter::default(),
            health_seconds: Family::new_with_constructor(health_histogram),
            failovers: Family::default(),
            role_changes: Family::default(),
            hook_runs: Family::default(),
            registry: Registry::default(),
        };
        // Counters get `_total` appended by the encoder.
        registry.register(
            "failoverd_snapshots",
            "Snapshots shipped and installed by the peer",
            m.snapshots.clone(),
        );
        registry.register(
            "failoverd_snapshot_bytes_sent",
            "Snapshot bytes sent to the peer (chunks, or what rsync/scp reported)",
            m.bytes_sent.clone(),
        );
        registry.register(
            "failoverd_chunks_received",
            "Verified chunks received from the peer",
            m.chunks_received.clone(),
        );
        registry.register(
            "failoverd_chunk_bytes_received",
            "Bytes of verified chunks received from the peer",
            m.chunk_bytes_received.clone(),
        );
        registry.register(
            "failoverd_snapshot_failures",
            "Snapshots that failed or were refused, and refused peer connections, by cause",
            m.failures.clone(),
        );
        registry.register(
            "failoverd_role",
            "1 for the role this host has now (live: its conode answers)",
            m.role.clone(),
        );
        registry.register(
            "failoverd_epoch",
            "Epoch of this host (0 until claims exist)",
            m.epoch.clone(),
        );
        registry.register(
            "failoverd_snapshot_generation",
            "Generation of the last snapshot shipped (live) or installed (standby)",
            m.generation.clone(),
        );
        registry.register(
            "failoverd_snapshot_age_seconds",
            "Seconds since the last snapshot's read transaction began on the live conode",
            m.age_seconds.clone(),
        );
        registry.register(
            "failoverd_snapshot_bytes",
            "Size of the last snapshot",
            m.bytes.clone(),
        );
        registry.register(
            "failoverd_snapshot_duration_seconds",
            "Time to take, ship, verify and install the last snapshot",
            m.duration_seconds.clone(),
        );
        registry.register(
            "failoverd_generations_held",
            "Verified generations held on this host",
            m.generations_held.clone(),
        );
        registry.register(
            "failoverd_vip_held",
            "1 while the failover core counts the virtual IP as possibly on this host",
            m.vip_held.clone(),
        );
        registry.register(
            "failoverd_health",
            "1 when a health check passes, 0 when it fails (alerts only; never promotes)",
            m.health.clone(),
        );
        registry.register(
            "failoverd_address_conflicts",
            "Times another MAC answered ARP (or NDP) for the address while this host held it",
            m.conflicts.clone(),
        );
        registry.register(
            "failoverd_health_check_seconds",
            "Time each health check took (its answer or its failure)",
            m.health_seconds.clone(),
        );
        registry.register(
            "failoverd_failovers",
            "Times this host became live, by cause (switchover, promote, forced_promote, reclaim, leftover_confirmed)",
            m.failovers.clone(),
        );
        registry.register(
            "failoverd_role_changes",
            "Completed role changes of this host, by the role it went to and the cause",
            m.role_changes.clone(),
        );
        registry.register(
            "failoverd_hook_runs",
            "Notify hook runs by hook and result (ok, failed, timeout, dropped)",
            m.hook_runs.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn snapshot_shipped(&self) {
        self.snapshots.inc();
    }

    pub fn bytes_sent(&self, n: u64) {
        self.bytes_sent.inc_by(n);
    }

    pub fn chunk_received(&self, bytes: u64) {
        self.chunks_received.inc();
        self.chunk_bytes_received.inc_by(bytes);
    }

    /// A health check took `seconds`.
    pub fn health_check(&self, check: failoverd_core::Check, seconds: f64) {
        self.health_seconds
            .get_or_create(&CheckLabel {
                check: crate::status::check_name(check),
            })
            .observe(seconds);
    }

    /// The role changed to `to` (completed), for `cause`.
    pub fn role_changed(&self, to: failoverd_core::Role, cause: failoverd_core::RoleCause) {
        let to = match to {
            failoverd_core::Role::Live => "live",
            failoverd_core::Role::Standby => "standby",
        };
        if to == "live" {
            self.failovers
                .get_or_create(&CauseLabel {
                    cause: cause.label(),
                })
                .inc();
        }
        self.role_changes
            .get_or_create(&ChangeLabel {
                to,
                cause: cause.label(),
            })
            .inc();
    }

    /// A notify hook ran (or was dropped).
    pub fn hook_run(&self, hook: &'static str, result: &'static str) {
        self.hook_runs
            .get_or_create(&HookLabel { hook, result })
            .inc();
    }

    pub fn failure(&self, cause: Cause) {
        self.failures
            .get_or_create(&CauseLabel {
                cause: cause.label(),
            })
            .inc();
    }

    /// The exposition text, with the gauges set from `st`.
    pub fn encode(&self, st: &StatusView) -> String {
        for r in [Role::Live, Role::Standby] {
            self.role
                .get_or_create(&RoleLabel { role: r.name() })
                .set(i64::from(st.role == Some(r)));
        }
        self.epoch.set(st.epoch as i64);
        if let Some(l) = &st.last {
            self.generation.set(l.generation as i64);
            self.age_seconds.set(st.age_seconds.unwrap_or(0.0));
            self.bytes.set(l.bytes as i64);
            self.duration_seconds.set(l.duration_ms as f64 / 1000.0);
        }
        self.generations_held.set(st.generations_held.len() as i64);
        if let Some(c) = &st.core {
            self.vip_held.set(i64::from(c.vip_held));
            // The core counts conflicts since it started (as the counter does).
            let counted = self.conflicts.get();
            if c.conflicts > counted {
                self.conflicts.inc_by(c.conflicts - counted);
            }
            // Only this role's checks: a verdict of the other role's is gone, not stale.
            for check in [
                failoverd_core::Check::OwnConode,
                failoverd_core::Check::LiveConode,
                failoverd_core::Check::LivePeer,
            ] {
                let label = CheckLabel {
                    check: crate::status::check_name(check),
                };
                match c.health.iter().find(|h| h.check == check) {
                    Some(h) => {
                        self.health.get_or_create(&label).set(i64::from(h.ok));
                    }
                    None => {
                        self.health.remove(&label);
                    }
                }
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub use conode::metrics::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standby::Store;
    use crate::status::{LastSnapshot, Status};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// An install (or an offer) holds the store's lock for as long as its IO takes;
    /// status, `/v1/status` and `/metrics` must answer meanwhile.
    #[test]
    fn status_answers_while_the_store_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(d.path(), 1, [1; 32], [2; 32]).unwrap());
        let st = Status::new(store.clone());
        let metrics = Metrics::new();
        let held = store.hold_lock_for(Duration::from_secs(3));
        let t = Instant::now();
        let v = st.view();
        let _ = st.peer_json();
        let _ = metrics.encode(&v);
        let took = t.elapsed();
        held.join().unwrap();
        assert!(
            took < Duration::from_secs(1),
            "status waited {took:?} for the store's lock"
        );
        assert_eq!(v.generations_held, Vec::<u64>::new());
    }

    /// The names and types in `docs/metrics-failoverd.md`'s reference table are exactly
    /// those exported (every family touched so that each appears with its samples).
    #[test]
    fn the_documented_names_are_the_exported_ones() {
        let m = Metrics::new();
        m.failure(Cause::Io);
        m.hook_run("role_change", "ok");
        m.role_changed(
            failoverd_core::Role::Live,
            failoverd_core::RoleCause::Switchover,
        );
        m.health_check(failoverd_core::Check::OwnConode, 0.01);
        m.health
            .get_or_create(&CheckLabel {
                check: "own_conode",
            })
            .set(1);
        m.conflicts.inc();
        let text = m.encode(&StatusView::default());
        let exported: std::collections::BTreeSet<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                let name = match kind {
                    "counter" => format!("{name}_total"),
                    _ => name.to_string(),
                };
                (name, kind.to_string())
            })
            .collect();
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics-failoverd.md"),
        )
        .unwrap();
        let documented: std::collections::BTreeSet<(String, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((name.to_string(), cells.get(2)?.to_string()))
            })
            .collect();
        assert!(exported.len() >= 19, "{text}");
        assert_eq!(
            exported, documented,
            "the names exported and those in docs/metrics-failoverd.md differ"
        );
    }

    #[test]
    fn bytes_sent_are_counted_once() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(d.path(), 1, [1; 32], [2; 32]).unwrap());
        let st = Status::new(store);
        let metrics = Metrics::new();
        metrics.bytes_sent(700);
        metrics.snapshot_shipped();
        st.shipped(LastSnapshot {
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
        let (_core_tx, core_rx) = tokio::sync::watch::channel(Some(failoverd_core::Status {
            role: failoverd_core::Role::Live,
            epoch: 3,
            vip_held: true,
            doing: "idle".into(),
            peer: failoverd_core::PeerStatus {
                reachable: true,
                last_heard: None,
                epoch: 3,
                live: false,
                may_hold: false,
                newest_generation: None,
            },
            health: Vec::new(),
            newest_generation: Some(1),
            conflicts: 0,
            role_cause: None,
        }));
        st.attach_core(core_rx);
        let m = metrics.encode(&st.view());
        assert!(
            m.contains("failoverd_snapshot_bytes_sent_total 700\n"),
            "{m}"
        );
        assert!(m.contains("failoverd_snapshots_total 1\n"), "{m}");
        assert!(m.contains("failoverd_role{role=\"live\"} 1\n"), "{m}");
        assert!(m.contains("failoverd_role{role=\"standby\"} 0\n"), "{m}");
        assert!(m.contains("failoverd_epoch 3\n"), "{m}");
        assert!(m.contains("failoverd_vip_held 1\n"), "{m}");
        assert_eq!(st.view().json()["bytes_sent"], 700);
    }
}
