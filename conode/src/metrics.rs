//! Prometheus metrics of the conode, through `prometheus-client`: OpenMetrics text at
//! `GET /metrics` on a listen address of their own, off unless `conode server --metrics
//! ADDR` or `CONODE_METRICS=ADDR` is given. Every name, type and label is listed in
//! `docs/metrics-conode.md`; names are stable (dashboards and alerts use them).
//!
//! # Parts
//! - [`Metrics`]: the registry. Counters and the connection gauges move as things happen
//!   (the client and peer ports, the skipchain service call it).
//! - [`Metrics::refresh`]: the gauges that need the database (its size, free space,
//!   whether it takes writes, chains and their heights). They are read every
//!   [`REFRESH_EVERY`] by [`refresher`] on a blocking thread, never by a scrape: a scrape
//!   only reads atomics, so a busy, broken or hung database never holds it.
//! - [`serve`]: the HTTP/1.1 responder, one request per connection. Limits are visible:
//!   [`MAX_SCRAPES`] at once (more are closed at once), [`REQUEST_TIMEOUT`] to send the
//!   request head, at most [`MAX_REQUEST`] bytes of it, [`WRITE_TIMEOUT`] to take the
//!   answer. Anything but `GET /metrics` is answered with an error status.
//!
//! Label values are bounded: services and methods are the ones the conode has, and any
//! other name a client sends is counted as `unknown`; per-chain series exist only for the
//! chains this conode leads, [`MAX_CHAIN_SERIES`] at most.
//!
//! This module never changes the database: a broken database is reopened by Status and
//! writes, not by a scrape.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::db::Db;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The environment variable that turns the endpoint on when `--metrics` is not given.
pub const ENV: &str = "CONODE_METRICS";
/// How often the gauges that need the database are read again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// Per-chain height series at most (the chains this conode leads, by genesis hash): a
/// label per chain is unbounded otherwise. `conode_chains_led` counts them all.
pub const MAX_CHAIN_SERIES: usize = 100;
/// Scrapes served at once; a connection past them is closed at once. Prometheus scrapes
/// one at a time; a few more leave room for a person with curl.
pub const MAX_SCRAPES: usize = 4;
/// Time a client has to send its whole request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; a longer one gets `431`.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The label value of a service or method name the conode does not have.
pub const UNKNOWN: &str = "unknown";
/// Buckets of `conode_append_seconds`: an append is a round of signatures and a durable
/// commit on a threshold of members, so milliseconds to the 10 s timeouts.
const APPEND_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
];

/// The labels of a client request: a service and method the conode has, or
/// [`UNKNOWN`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: &'static str,
    pub method: &'static str,
}

impl RequestLabels {
    /// A request for a service the conode does not have.
    pub const UNKNOWN: RequestLabels = RequestLabels {
        service: UNKNOWN,
        method: UNKNOWN,
    };

    /// The labels of `method` of `service`, whose methods are `known`: a method not in
    /// `known` is [`UNKNOWN`], so a client cannot add label values.
    pub fn of(service: &'static str, known: &'static [&'static str], method: &str) -> Self {
        RequestLabels {
            service,
            method: known
                .iter()
                .copied()
                .find(|m| *m == method)
                .unwrap_or(UNKNOWN),
        }
    }
}

/// Which port a connection is on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Port {
    /// The client WebSocket port.
    Client,
    /// The conode-to-conode port.
    Peer,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabel {
    port: &'static str,
}

impl Port {
    fn label(self) -> PortLabel {
        PortLabel {
            port: match self {
                Port::Client => "client",
                Port::Peer => "peer",
            },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChainLabel {
    chain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// What [`Metrics::refresh`] reads off the database (see [`read_figures`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Size of the database file.
    pub db_bytes: Option<u64>,
    /// Free bytes on its filesystem, for unprivileged users.
    pub free_bytes: Option<u64>,
    /// The floor under which new blocks are refused.
    pub free_floor_bytes: u64,
    /// Whether new blocks are accepted (not broken, above the floor, not frozen).
    pub writable: bool,
    /// The chains, if they could be read (not while the database is broken: their gauges
    /// keep their last values meanwhile).
    pub chains: Option<ChainFigures>,
}

/// What [`read_figures`] reads of the chains.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainFigures {
    /// Chains held, and blocks held in all of them.
    pub chains: u64,
    pub blocks: u64,
    /// Height (blocks, genesis included) of the highest chain held.
    pub height_max: u64,
    /// Chains this conode leads (first member of the roster).
    pub chains_led: u64,
    /// Heights of the chains this conode leads, by genesis hash in hex, the first
    /// [`MAX_CHAIN_SERIES`] by hash.
    pub led_heights: Vec<(String, u64)>,
}

/// The metrics registry and the metrics in it. One per server; shared as an `Arc`.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_errors: Family<RequestLabels, Counter>,
    open_connections: Family<PortLabel, Gauge>,
    blocks_appended: Counter,
    chains_created: Counter,
    append_seconds: Histogram,
    db_bytes: Gauge,
    db_free_bytes: Gauge,
    db_free_floor_bytes: Gauge,
    db_writable: Gauge,
    chains: Gauge,
    blocks: Gauge,
    chain_height_max: Gauge,
    chains_led: Gauge,
    chain_height: Family<ChainLabel, Gauge>,
    /// The chains that have a `conode_chain_height` series now.
    chain_series: Mutex<BTreeSet<String>>,
    figures_time: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: crate::status::VERSION,
            })
            .set(1);
        let start_time = Gauge::<f64, AtomicU64>::default();
        start_time.set(unix_seconds(SystemTime::now()));
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_errors: Family::default(),
            open_connections: Family::default(),
            blocks_appended: Counter::default(),
            chains_created: Counter::default(),
            append_seconds: Histogram::new(APPEND_BUCKETS),
            db_bytes: Gauge::default(),
            db_free_bytes: Gauge::default(),
            db_free_floor_bytes: Gauge::default(),
            db_writable: Gauge::default(),
            chains: Gauge::default(),
            blocks: Gauge::default(),
            chain_height_max: Gauge::default(),
            chains_led: Gauge::default(),
            chain_height: Family::default(),
            chain_series: Mutex::default(),
            figures_time: Gauge::default(),
        };
        for p in [Port::Client, Port::Peer] {
            m.open_connections.get_or_create(&p.label()).set(0);
        }
        // Counters get `_total` appended by the encoder.
        registry.register(
            "conode_build_info",
            "1, with the conode's version as a label",
            build_info,
        );
        registry.register(
            "conode_start_time_seconds",
            "Unix time at which the conode started",
            start_time,
        );
        registry.register(
            "conode_requests",
            "Client WebSocket requests (messages) by service and method; names the conode does not have are 'unknown'",
            m.requests.clone(),
        );
        registry.register(
            "conode_request_errors",
            "Client WebSocket requests answered with an error (closed with 1002, or 4001 for an unknown service)",
            m.request_errors.clone(),
        );
        registry.register(
            "conode_open_connections",
            "TCP connections accepted and open on the client WebSocket port and on the conode-to-conode port",
            m.open_connections.clone(),
        );
        registry.register(
            "conode_blocks_appended",
            "Blocks (not genesis) this conode acknowledged as leader of their chain",
            m.blocks_appended.clone(),
        );
        registry.register(
            "conode_chains_created",
            "Chains (genesis blocks) this conode created and acknowledged as leader",
            m.chains_created.clone(),
        );
        registry.register(
            "conode_append_seconds",
            "Time from receiving a StoreSkipBlock that appends a block to acknowledging it, leader side",
            m.append_seconds.clone(),
        );
        registry.register(
            "conode_db_bytes",
            "Size of the database file",
            m.db_bytes.clone(),
        );
        registry.register(
            "conode_db_free_bytes",
            "Free bytes on the database's filesystem (for unprivileged users)",
            m.db_free_bytes.clone(),
        );
        registry.register(
            "conode_db_free_floor_bytes",
            "New blocks are refused while free bytes are below this (CONODE_MIN_FREE_MB)",
            m.db_free_floor_bytes.clone(),
        );
        registry.register(
            "conode_db_writable",
            "1 while new blocks are accepted; 0 while refused (database broken, disk below the floor, or frozen by a switchover)",
            m.db_writable.clone(),
        );
        registry.register("conode_chains", "Chains held", m.chains.clone());
        registry.register(
            "conode_blocks",
            "Blocks held, in all chains",
            m.blocks.clone(),
        );
        registry.register(
            "conode_chain_height_max",
            "Height (blocks, genesis included) of the highest chain held",
            m.chain_height_max.clone(),
        );
        registry.register(
            "conode_chains_led",
            "Chains this conode leads (first member of their roster)",
            m.chains_led.clone(),
        );
        registry.register(
            "conode_chain_height",
            "Height (blocks, genesis included) of each chain this conode leads, the first 100 by genesis hash",
            m.chain_height.clone(),
        );
        registry.register(
            "conode_figures_time_seconds",
            "Unix time at which the database gauges were last read (every 2 s)",
            m.figures_time.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Create the request series of `labels` at 0, so that they exist before the first
    /// request (a rate over a series that appears late misses its first increase).
    pub fn declare_requests(&self, labels: &RequestLabels) {
        let _ = self.requests.get_or_create(labels);
        let _ = self.request_errors.get_or_create(labels);
    }

    /// A client request for `labels` arrived.
    pub fn request(&self, labels: &RequestLabels) {
        self.requests.get_or_create(labels).inc();
    }

    /// A client request for `labels` was answered with an error.
    pub fn request_error(&self, labels: &RequestLabels) {
        self.request_errors.get_or_create(labels).inc();
    }

    /// A connection opened on `port`; it counts until the guard drops.
    pub fn connection(&self, port: Port) -> OpenConnection {
        let g = self.open_connections.get_or_create_owned(&port.label());
        g.inc();
        OpenConnection(g)
    }

    /// As leader, this conode acknowledged a block after `took`; `genesis` if it was the
    /// first block of a new chain.
    pub fn block_acknowledged(&self, genesis: bool, took: Duration) {
        if genesis {
            self.chains_created.inc();
        } else {
            self.blocks_appended.inc();
            self.append_seconds.observe(took.as_secs_f64());
        }
    }

    /// Set the gauges read off the database.
    pub fn refresh(&self, f: &Figures) {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(b) = f.db_bytes {
            self.db_bytes.set(i(b));
        }
        if let Some(b) = f.free_bytes {
            self.db_free_bytes.set(i(b));
        }
        self.db_free_floor_bytes.set(i(f.free_floor_bytes));
        self.db_writable.set(i64::from(f.writable));
        self.figures_time.set(unix_seconds(SystemTime::now()));
        let Some(f) = &f.chains else {
            return;
        };
        self.chains.set(i(f.chains));
        self.blocks.set(i(f.blocks));
        self.chain_height_max.set(i(f.height_max));
        self.chains_led.set(i(f.chains_led));
        // Set the new series before removing the old: a scrape meanwhile sees no gap.
        let keep: BTreeSet<&str> = f.led_heights.iter().map(|(c, _)| c.as_str()).collect();
        for (chain, h) in &f.led_heights {
            self.chain_height
                .get_or_create(&ChainLabel {
                    chain: chain.clone(),
                })
                .set(i(*h));
        }
        let mut series = self.chain_series.lock().unwrap_or_else(|p| p.into_inner());
        for c in series.iter().filter(|c| !keep.contains(c.as_str())) {
            self.chain_height.remove(&ChainLabel { chain: c.clone() });
        }
        *series = keep.iter().map(|c| c.to_string()).collect();
    }

    /// The exposition text (OpenMetrics, ending in `# EOF`). Reads only memory.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts one open connection in `conode_open_connections` until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---------------------------------------------------------------------------------------
// The gauges read off the database

/// Read the figures of `db`, for the conode whose key is `me`. `leaders` remembers, per
/// chain, whether this conode leads it (rosters cannot change, so it is read once per
/// chain: the genesis block). Blocking: a read transaction and a statvfs.
pub fn read_figures(db: &Db, me: &[u8; 32], leaders: &mut HashMap<[u8; 32], bool>) -> Figures {
    let free = db.free_bytes();
    let mut f = Figures {
        db_bytes: std::fs::metadata(&db.path).ok().map(|m| m.len()),
        free_bytes: free,
        free_floor_bytes: db.free_floor(),
        writable: db
            .writes_refused(db.broken_error().as_deref(), free)
            .is_none(),
        ..Figures::default()
    };
    if db.broken_error().is_some() {
        return f;
    }
    let Ok(view) = crate::skipchain::store::View::new(&db.db()) else {
        return f;
    };
    let Ok(positions) = view.chains() else {
        return f;
    };
    let (blocks, chains) = view.counts();
    let c = f.chains.insert(ChainFigures {
        blocks,
        chains,
        ..ChainFigures::default()
    });
    for p in &positions {
        let height = u64::from(p.index) + 1;
        c.height_max = c.height_max.max(height);
        let led = match leaders.get(&p.chain) {
            Some(l) => *l,
            None => {
                let Some(l) = leads(&view, &p.chain, me) else {
                    continue;
                };
                leaders.insert(p.chain, l);
                l
            }
        };
        if led {
            c.chains_led += 1;
            if c.led_heights.len() < MAX_CHAIN_SERIES {
                c.led_heights.push((hex::encode(p.chain), height));
            }
        }
    }
    f
}

/// Whether `me` leads chain `genesis` (first of its genesis block's roster); `None` if
/// that cannot be read now.
fn leads(view: &crate::skipchain::store::View, genesis: &[u8; 32], me: &[u8; 32]) -> Option<bool> {
    let g = view.block_bare(genesis).ok()??;
    let roster = g.roster?;
    let keys = crate::skipchain::block::roster_keys(&roster).ok()?;
    Some(keys.first() == Some(me))
}

/// Read the database figures into `metrics` now, then every [`REFRESH_EVERY`] until
/// `shutdown`; `first` is told once the first read is in. Each read runs on a blocking
/// thread, one at a time, so a hung filesystem holds one thread, not one per tick. Holds
/// the database only while it reads.
pub async fn refresher(
    metrics: Arc<Metrics>,
    db: Weak<Db>,
    me: [u8; 32],
    mut shutdown: watch::Receiver<bool>,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let leaders = Arc::new(Mutex::new(HashMap::new()));
    let mut first = Some(first);
    loop {
        let (db2, leaders2) = (db.clone(), leaders.clone());
        let read = tokio::task::spawn_blocking(move || {
            let db = db2.upgrade()?;
            let mut l = leaders2.lock().unwrap_or_else(|p| p.into_inner());
            Some(read_figures(&db, &me, &mut l))
        });
        tokio::select! {
            r = read => match r {
                Ok(Some(f)) => metrics.refresh(&f),
                Ok(None) => return,
                Err(e) => tracing::error!("metrics: reading the database figures failed: {e}; this is a bug"),
            },
            _ = crate::ws::stopped(&mut shutdown) => return,
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = crate::ws::stopped(&mut shutdown) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Where the endpoint listens

/// The metrics address: the `--metrics` flag if given, else `env` (the value of
/// [`ENV`]), else none (off). An empty value is off too.
pub fn listen_addr(
    flag: Option<&str>,
    env: Option<std::ffi::OsString>,
) -> Result<Option<SocketAddr>, String> {
    let (value, source) = match (flag, env) {
        (Some(f), _) => (f.to_string(), "--metrics"),
        (None, Some(e)) => (
            e.into_string().map_err(|e| {
                format!("{ENV}={e:?} is not UTF-8: give an IP:port such as 127.0.0.1:9102")
            })?,
            ENV,
        ),
        (None, None) => return Ok(None),
    };
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!(
            "{source} {value:?} is not an IP:port address: give one such as 127.0.0.1:9102 (the metrics port; keep it off the internet)"
        )
    })
}

/// [`listen_addr`] with the process's environment.
pub fn listen_addr_from_env(flag: Option<&str>) -> Result<Option<SocketAddr>, String> {
    listen_addr(flag, std::env::var_os(ENV))
}

// ---------------------------------------------------------------------------------------
// The HTTP endpoint

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// Not complete yet: read more.
    Partial,
    /// An error status and its body.
    Error(&'static str, &'static str),
}

/// Route a request head (pure).
pub fn route(buf: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return Route::Partial,
        Ok(httparse::Status::Partial) => {
            return Route::Error(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            )
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Route::Error(
                "431 Request Header Fields Too Large",
                "too many header fields\n",
            )
        }
        Err(_) => return Route::Error("400 Bad Request", "not an HTTP request\n"),
    }
    let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Route::Error("404 Not Found", "this port serves GET /metrics only\n");
    }
    if req.method != Some("GET") {
        return Route::Error("405 Method Not Allowed", "use GET /metrics\n");
    }
    Route::Metrics
}

/// Bind the metrics port, with a message that names it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    crate::ws::bind(&addr.to_string(), "metrics").await
}

/// Serve `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    tracing::warn!("metrics port: accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = crate::ws::stopped(&mut shutdown) => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics port: closing {peer}: {MAX_SCRAPES} scrapes already open");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = scrape(stream, &metrics).await {
                tracing::debug!("metrics port: {peer}: {e}");
            }
        });
    }
}

/// One connection: read the head, answer, close.
async fn scrape(mut s: TcpStream, metrics: &Metrics) -> Result<(), String> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before sending a request".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            match route(&buf) {
                Route::Partial => continue,
                Route::Metrics => return Ok(None),
                Route::Error(status, body) => return Ok(Some((status, body))),
            }
        }
    })
    .await;
    let (status, content_type, body) = match head {
        Ok(Ok(None)) => ("200 OK", CONTENT_TYPE, metrics.encode()),
        Ok(Ok(Some((status, body)))) => (status, "text/plain", body.to_string()),
        Ok(Err(e)) => return Err(e),
        Err(_) => (
            "408 Request Timeout",
            "text/plain",
            "request head not received in time\n".to_string(),
        ),
    };
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(WRITE_TIMEOUT, async {
        s.write_all(msg.as_bytes()).await?;
        s.shutdown().await
    })
    .await
    .map_err(|_| "the client did not take the answer in time".to_string())?
    .map_err(|e| e.to_string())?;
    if status.starts_with("200") {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_and_services_are_one_label_value() {
        const KNOWN: &[&str] = &["Request"];
        assert_eq!(
            RequestLabels::of("Status", KNOWN, "Request"),
            RequestLabels {
                service: "Status",
                method: "Request"
            }
        );
        let m = Metrics::new();
        for i in 0..1000 {
            m.request(&RequestLabels::of("Status", KNOWN, &format!("Evil{i}")));
        }
        m.request(&RequestLabels::UNKNOWN);
        let text = m.encode();
        assert!(
            text.contains("conode_requests_total{service=\"Status\",method=\"unknown\"} 1000\n"),
            "{text}"
        );
        assert!(
            text.contains("conode_requests_total{service=\"unknown\",method=\"unknown\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("Evil"), "{text}");
    }

    #[test]
    fn open_connections_count_until_dropped() {
        let m = Metrics::new();
        let a = m.connection(Port::Client);
        let _b = m.connection(Port::Client);
        let _p = m.connection(Port::Peer);
        assert!(m
            .encode()
            .contains("conode_open_connections{port=\"client\"} 2\n"));
        drop(a);
        let text = m.encode();
        assert!(
            text.contains("conode_open_connections{port=\"client\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("conode_open_connections{port=\"peer\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn the_text_is_openmetrics_with_stable_names() {
        let m = Metrics::new();
        m.declare_requests(&RequestLabels::UNKNOWN);
        m.block_acknowledged(true, Duration::from_millis(3));
        m.block_acknowledged(false, Duration::from_millis(30));
        let text = m.encode();
        for line in [
            "# TYPE conode_requests counter\n",
            "conode_requests_total{service=\"unknown\",method=\"unknown\"} 0\n",
            "# TYPE conode_append_seconds histogram\n",
            "conode_append_seconds_bucket{le=\"0.05\"} 1\n",
            "conode_append_seconds_count 1\n",
            "conode_blocks_appended_total 1\n",
            "conode_chains_created_total 1\n",
            "conode_open_connections{port=\"peer\"} 0\n",
            &format!(
                "conode_build_info{{version=\"{}\"}} 1\n",
                crate::status::VERSION
            ),
        ] {
            assert!(text.contains(line), "missing {line:?} in {text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("conode_start_time_seconds "), "{text}");
    }

    #[test]
    fn chain_series_follow_the_led_chains() {
        let m = Metrics::new();
        let mut c = ChainFigures {
            chains: 2,
            blocks: 7,
            height_max: 5,
            chains_led: 2,
            led_heights: vec![("aa".into(), 5), ("bb".into(), 2)],
        };
        let mut f = Figures {
            writable: true,
            chains: Some(c.clone()),
            ..Figures::default()
        };
        m.refresh(&f);
        let text = m.encode();
        assert!(
            text.contains("conode_chain_height{chain=\"aa\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("conode_db_writable 1\n"), "{text}");
        c.led_heights = vec![("aa".into(), 6)];
        f.chains = Some(c);
        m.refresh(&f);
        let text = m.encode();
        assert!(
            text.contains("conode_chain_height{chain=\"aa\"} 6\n"),
            "{text}"
        );
        assert!(!text.contains("chain=\"bb\""), "{text}");
        // A broken database: the chains cannot be read, and keep their last figures.
        f.writable = false;
        f.chains = None;
        m.refresh(&f);
        let text = m.encode();
        assert!(text.contains("conode_db_writable 0\n"), "{text}");
        assert!(
            text.contains("conode_chain_height{chain=\"aa\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("conode_chains 2\n"), "{text}");
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        let a = listen_addr(Some("127.0.0.1:9102"), Some("127.0.0.1:1".into())).unwrap();
        assert_eq!(a, Some("127.0.0.1:9102".parse().unwrap()));
        let a = listen_addr(None, Some("[::1]:9102".into())).unwrap();
        assert_eq!(a, Some("[::1]:9102".parse().unwrap()));
        assert_eq!(listen_addr(None, None).unwrap(), None);
        assert_eq!(listen_addr(None, Some("".into())).unwrap(), None);
        let e = listen_addr(Some("localhost"), None).unwrap_err();
        assert!(e.contains("--metrics \"localhost\""), "{e}");
        let e = listen_addr(None, Some("9102".into())).unwrap_err();
        assert!(e.contains("CONODE_METRICS \"9102\""), "{e}");
        // A bad environment value does not matter when the flag is given.
        assert!(listen_addr(Some("127.0.0.1:0"), Some("nonsense".into())).is_ok());
    }

    #[test]
    fn requests_are_routed_and_garbage_refused() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metr"), Route::Partial);
        assert!(matches!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::Error("405 Method Not Allowed", _)
        ));
        assert!(matches!(
            route(b"GET / HTTP/1.1\r\n\r\n"),
            Route::Error("404 Not Found", _)
        ));
        assert!(matches!(
            route(b"\x16\x03\x01\x00garbage\r\n\r\n"),
            Route::Error("400 Bad Request", _)
        ));
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(MAX_REQUEST + 1, b'a');
        assert!(matches!(
            route(&long),
            Route::Error("431 Request Header Fields Too Large", _)
        ));
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for _ in 0..100 {
            many.extend_from_slice(b"X-Pad: a\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(
            route(&many),
            Route::Error("431 Request Header Fields Too Large", _)
        ));
    }
}
