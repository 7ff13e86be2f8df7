//! The Status service (`/Status/Request`), wire-compatible with the Go conode.
//!
//! Sections: `Generic` (the keys the Go conode reports), `Db` (figures of our redb file),
//! `Conode` (`version`). The reply's `ServerIdentity` is our own, with the URL clients
//! should use. This module only reads state; it never changes it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;

use crate::config::{PrivateConfig, Scheme};
use crate::db::Db;
use crate::keys;
use crate::peer::Counters;
use crate::proto::{self, ServerIdentity, StatusRequest, StatusResponse};
use crate::ws::{BoxFuture, Service};

/// The version reported in `Conode.version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct StatusService {
    pub cfg: PrivateConfig,
    pub db: Arc<Db>,
    pub counters: Arc<Counters>,
    pub started: Instant,
    /// Sorted, comma-joined service names; set once all services are registered.
    pub available: OnceLock<String>,
    /// Our identity never changes while running: computed once.
    pub identity: OnceLock<ServerIdentity>,
    /// More sections (one per service), computed at each request.
    pub sections: Vec<(&'static str, Section)>,
}

/// A function giving one Status section.
pub type Section = Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

impl StatusService {
    pub fn server_identity(&self) -> ServerIdentity {
        self.identity
            .get_or_init(|| self.compute_identity())
            .clone()
    }

    fn compute_identity(&self) -> ServerIdentity {
        let public = self.cfg.keys.public_bytes();
        ServerIdentity {
            public: proto::tagged_point(&public),
            service_identities: Vec::new(),
            id: keys::server_identity_id(&public).to_vec(),
            address: self.cfg.address.to_string(),
            description: self.cfg.description.clone(),
            url: self.cfg.advertised_url(),
        }
    }

    pub fn response(&self) -> StatusResponse {
        let mut generic = BTreeMap::new();
        let put = |m: &mut BTreeMap<String, String>, k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put(
            &mut generic,
            "Available_Services",
            self.available.get().cloned().unwrap_or_default(),
        );
        put(
            &mut generic,
            "TX_bytes",
            self.counters.tx.load(Ordering::Relaxed).to_string(),
        );
        put(
            &mut generic,
            "RX_bytes",
            self.counters.rx.load(Ordering::Relaxed).to_string(),
        );
        put(&mut generic, "Uptime", go_duration(self.started.elapsed()));
        put(
            &mut generic,
            "System",
            format!("{}/{}/rust", std::env::consts::OS, std::env::consts::ARCH),
        );
        put(&mut generic, "Host", self.cfg.address.host.clone());
        put(&mut generic, "Port", self.cfg.address.port.to_string());
        put(&mut generic, "Description", self.cfg.description.clone());
        let conn = match self.cfg.address.scheme {
            Scheme::Tls => "tls",
            Scheme::Tcp => "tcp",
        };
        put(&mut generic, "ConnType", conn.to_string());

        let mut status = BTreeMap::new();
        status.insert("Generic".to_string(), proto::Status { field: generic });
        status.insert(
            "Db".to_string(),
            proto::Status {
                field: self.db.figures(),
            },
        );
        let mut conode = BTreeMap::new();
        conode.insert("version".to_string(), VERSION.to_string());
        status.insert("Conode".to_string(), proto::Status { field: conode });
        for (name, f) in &self.sections {
            status.insert(name.to_string(), proto::Status { field: f() });
        }
        StatusResponse {
            status,
            serveridentity: Some(self.server_identity()),
        }
    }
}

impl Service for StatusService {
    fn name(&self) -> &'static str {
        "Status"
    }

    fn methods(&self) -> &'static [&'static str] {
        &["Request"]
    }

    fn call<'a>(
        &'a self,
        method: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            match method {
                "Request" => {
                    StatusRequest::decode(body).map_err(|e| format!("decoding Request: {e}"))?;
                    Ok(self.response().encode_to_vec())
                }
                other => Err(format!(
                    "The requested message hasn't been registered: {other}"
                )),
            }
        })
    }
}

/// A duration as Go's `time.Duration.String()` prints it: `1h2m3.456s`, `2m0s`, `1.5ms`.
pub fn go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    fn frac(whole: u128, rem: u128, digits: usize) -> String {
        let f = format!("{rem:0digits$}");
        let f = f.trim_end_matches('0');
        if f.is_empty() {
            whole.to_string()
        } else {
            format!("{whole}.{f}")
        }
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", frac(nanos / 1_000, nanos % 1_000, 3));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", frac(nanos / 1_000_000, nanos % 1_000_000, 6));
    }
    let secs = nanos / 1_000_000_000;
    let sub = nanos % 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let s = format!("{}s", frac(s, sub, 9));
    if h > 0 {
        format!("{h}h{m}m{s}")
    } else if m > 0 {
        format!("{m}m{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_go() {
        assert_eq!(
            go_duration(Duration::from_millis(3 * 3_600_000 + 2 * 60_000 + 1500)),
            "3h2m1.5s"
        );
        assert_eq!(go_duration(Duration::from_secs(120)), "2m0s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ns");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }
}
