//! `conode server`: wires the ports, the services and the database together.
//!
//! [`Server::start`] binds both ports and returns; [`Server::stop`] stops accepting,
//! lets in-flight requests finish (up to [`GRACE`]), closes idle connections with 1001,
//! and closes the database cleanly. The binary calls them around a signal; tests call
//! them directly. [`Options`] holds what is not in `private.toml` (the metrics port).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::config::{cert_path, PrivateConfig};
use crate::db::Db;
use crate::metrics::{self, Metrics};
use crate::peer::{self, BuiltinPeerHandler, Counters, PeerHandler, PeerRouter, PeerTls};
use crate::skipchain::Skipchain;
use crate::status::StatusService;
use crate::tls::{self, CertReloader};
use crate::ws::{self, Services};

/// How long shutdown waits for in-flight requests.
pub const GRACE: Duration = Duration::from_secs(30);

/// Settings of a running conode that are not in the Go-compatible `private.toml`.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Serve Prometheus metrics at `GET /metrics` on this address ([`crate::metrics`]);
    /// off when `None`.
    pub metrics: Option<SocketAddr>,
}

pub struct Server {
    ws_addr: SocketAddr,
    peer_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    db: Arc<Db>,
    admin_path: PathBuf,
}

impl Server {
    /// Open the database, bind both ports and start serving.
    pub async fn start(cfg: PrivateConfig, db_path: PathBuf) -> Result<Server, String> {
        Self::start_with(cfg, db_path, Vec::new()).await
    }

    /// As [`Server::start`], with [`Options`].
    pub async fn start_opts(
        cfg: PrivateConfig,
        db_path: PathBuf,
        opts: Options,
    ) -> Result<Server, String> {
        Self::start_inner(cfg, db_path, Vec::new(), |h| h, opts).await
    }

    /// As [`Server::start`], with more client services beside the built-in ones.
    pub async fn start_with(
        cfg: PrivateConfig,
        db_path: PathBuf,
        extra: Vec<Arc<dyn ws::Service>>,
    ) -> Result<Server, String> {
        Self::start_inner(cfg, db_path, extra, |h| h, Options::default()).await
    }

    /// As [`Server::start`], with `wrap` put in front of the conode-to-conode port's
    /// handler: tests use it to lose or hold messages a member receives.
    pub async fn start_wrapped(
        cfg: PrivateConfig,
        db_path: PathBuf,
        wrap: impl FnOnce(Arc<dyn PeerHandler>) -> Arc<dyn PeerHandler>,
    ) -> Result<Server, String> {
        Self::start_inner(cfg, db_path, Vec::new(), wrap, Options::default()).await
    }

    async fn start_inner(
        cfg: PrivateConfig,
        db_path: PathBuf,
        extra: Vec<Arc<dyn ws::Service>>,
        wrap: impl FnOnce(Arc<dyn PeerHandler>) -> Arc<dyn PeerHandler>,
        opts: Options,
    ) -> Result<Server, String> {
        tls::install_provider();
        tune_malloc();
        let db = Arc::new(Db::open(&db_path, &cfg.keys.public_bytes())?);
        db.set_free_floor(crate::db::free_floor_from_env()?);
        let peer_tls = PeerTls::new(&cfg.keys)
            .map_err(|e| format!("cannot build the conode-to-conode certificate: {e}"))?;
        let ws_tls = if cfg.ws_tls() {
            let reloader = CertReloader::new(
                cert_path(&cfg.ws_tls_certificate)?,
                cert_path(&cfg.ws_tls_certificate_key)?,
            )?;
            Some(reloader)
        } else {
            None
        };
        let peer_listener = ws::bind(&cfg.listen_addr()?, "conode-to-conode").await?;
        let ws_listener = ws::bind(&cfg.ws_listen_addr()?, "client WebSocket").await?;
        let ws_addr = ws_listener.local_addr().map_err(|e| e.to_string())?;
        let peer_addr = peer_listener.local_addr().map_err(|e| e.to_string())?;
        let metrics_listener = match opts.metrics {
            Some(a) => Some(metrics::bind(a).await?),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
            None => None,
        };
        let admin_path = admin::admin_socket_path(&db_path, &cfg.keys.public_bytes());
        let admin_listener = admin::bind(&admin_path)?;
        let metrics = Arc::new(Metrics::new());

        let counters = Arc::new(Counters::default());
        let skipchain = Skipchain::new(
            db.clone(),
            cfg.keys.clone(),
            peer_tls.clone(),
            cfg.address.clone(),
            counters.clone(),
            metrics.clone(),
        );
        let sc = Arc::downgrade(&skipchain);
        let skipblock_section: crate::status::Section =
            Arc::new(move || sc.upgrade().map(|s| s.figures()).unwrap_or_default());
        let status = Arc::new(StatusService {
            cfg: cfg.clone(),
            db: db.clone(),
            counters: counters.clone(),
            started: Instant::now(),
            available: Default::default(),
            identity: Default::default(),
            sections: vec![("Skipblock", skipblock_section)],
        });
        let mut services = Services::default();
        services.add(status.clone());
        services.add(skipchain.clone());
        for s in extra {
            services.add(s);
        }
        let _ = status.available.set(services.names().join(","));
        metrics.declare_requests(&metrics::RequestLabels::UNKNOWN);
        for name in services.names() {
            if let Some(s) = services.get(name) {
                for m in s.methods() {
                    metrics.declare_requests(&metrics::RequestLabels::of(name, s.methods(), m));
                }
            }
        }

        let (stop, stop_rx) = watch::channel(false);
        let (tracker, done) = mpsc::channel(1);
        let mut tasks = Vec::new();
        let acceptor = ws_tls
            .as_ref()
            .map(|r| TlsAcceptor::from(r.server_config()));
        if let Some(r) = ws_tls {
            tasks.push(tokio::spawn(r.watch(stop_rx.clone())));
        }
        tasks.push(tokio::spawn(ws::serve(
            ws_listener,
            Arc::new(services),
            acceptor.clone(),
            stop_rx.clone(),
            tracker.clone(),
            metrics.clone(),
        )));
        tasks.push(tokio::spawn(admin::serve(
            admin_listener,
            db.clone(),
            stop_rx.clone(),
            tracker.clone(),
        )));
        let mut router = PeerRouter::default();
        router.0.insert(
            "Peer",
            Arc::new(BuiltinPeerHandler {
                public: cfg.keys.public_bytes(),
            }),
        );
        router.0.insert("Skipchain", skipchain.clone());
        let handler = wrap(Arc::new(router));
        tasks.push(tokio::spawn(peer::serve(
            peer_listener,
            peer_tls,
            handler,
            counters,
            stop_rx.clone(),
            tracker,
            metrics.clone(),
        )));
        if let Some(listener) = metrics_listener {
            let (first, read) = tokio::sync::oneshot::channel();
            tasks.push(tokio::spawn(metrics::refresher(
                metrics.clone(),
                Arc::downgrade(&db),
                cfg.keys.public_bytes(),
                stop_rx.clone(),
                first,
            )));
            // The first scrape shows the database's figures, not zeros (a database that
            // does not answer in time does not hold the start).
            let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
            tasks.push(tokio::spawn(metrics::serve(listener, metrics, stop_rx)));
        }
        {
            // Fetch what other members hold beyond us; stops with the server.
            let sc = skipchain.clone();
            let mut stop_rx = stop.subscribe();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = sc.sync_all() => {}
                    _ = crate::ws::stopped(&mut stop_rx) => {}
                }
            }));
        }
        drop(skipchain);
        tracing::info!(
            "conode {} ({}) serving peers on {peer_addr} and clients on {}://{ws_addr}, database {}",
            cfg.keys.public_hex(),
            cfg.address,
            if acceptor.is_some() { "wss" } else { "ws" },
            db_path.display()
        );
        if let Some(a) = metrics_addr {
            tracing::info!("metrics at http://{a}/metrics");
        }
        Ok(Server {
            ws_addr,
            peer_addr,
            metrics_addr,
            stop,
            done,
            tasks,
            db,
            admin_path,
        })
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Where `GET /metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin socket (snapshots for backups and failoverd; see [`crate::admin`]).
    pub fn admin_socket(&self) -> &Path {
        &self.admin_path
    }

    /// The open database (tests write into it; services get it at start).
    pub fn database(&self) -> &Arc<Db> {
        &self.db
    }

    /// Stop gracefully; returns once the database is closed.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if tokio::time::timeout(GRACE, self.done.recv()).await.is_err() {
            tracing::warn!("shutdown: connections still busy after {GRACE:?}; closing anyway");
        }
        // A request's blocking work (a commit, a read) may still hold the database for a
        // moment after its connection closed: wait for it, within the same grace.
        let deadline = tokio::time::Instant::now() + GRACE;
        while Arc::strong_count(&self.db) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match Arc::try_unwrap(self.db) {
            Ok(db) => {
                drop(db);
                tracing::info!("database closed cleanly");
            }
            Err(_) => tracing::warn!(
                "shutdown: the database is still in use by a request; it will close when it finishes"
            ),
        }
    }
}

/// Wait for SIGTERM or SIGINT.
pub async fn signal() -> Result<&'static str, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Keep freed memory for the next block instead of handing it back to the kernel.
///
/// Block frames and redb pages of 64 KiB and more churn through glibc's malloc. By
/// default it returns a heap's free top to the kernel past a few hundred KiB, and the
/// next block faults those pages in again, zeroed: about a tenth of the CPU with 64 KiB
/// blocks. Here a heap keeps up to [`MALLOC_TRIM`] free, and allocations below
/// [`MALLOC_MMAP`] come from the heaps. Process-wide and set once, like the TLS
/// provider; a no-op where the allocator is not glibc's.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes two thresholds of glibc's allocator; it takes
            // no pointers and is safe to call at any time.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM as libc::c_int);
                libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP as libc::c_int);
            }
        });
    }
}

/// Free memory a malloc heap keeps rather than returning it to the kernel.
const MALLOC_TRIM: usize = 8 << 20;
/// Allocations at least this large are mapped on their own (and unmapped when freed).
const MALLOC_MMAP: usize = 4 << 20;
