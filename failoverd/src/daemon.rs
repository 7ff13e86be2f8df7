//! `failoverd run`: the peer port, `/metrics`, the control socket and the snapshot loop,
//! as supervised tasks of one runtime.
//!
//! [`run`] takes its shutdown as an argument (tests stop it). The tasks run in a
//! `JoinSet`: a task that ends or panics is logged at `error` and stops the daemon with an
//! error (a non-zero exit). The state directory is locked first ([`StateLock`]): a second
//! daemon on it is refused before it touches anything.
//!
//! # Control socket
//! `state_dir/control.sock`, mode 0600 (failoverd runs with umask 077). One request line,
//! one JSON answer line, then the connection closes:
//! - `status` → the status object (`failoverd status --json` prints it);
//! - `snapshot` → takes and ships a snapshot now and answers when the standby installed
//!   it: `{"ok":true,"generation":N,...}` or `{"ok":false,"error":"..."}`.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use conode::db::ChainPosition;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::{self, Config};
use crate::conode_ctl::Conode;
use crate::error::{Cause, ShipError};
use crate::event::Handle;
use crate::failover::{Address, Effects};
use crate::live::Shipper;
use crate::metrics::Metrics;
use crate::peer::{PeerClient, PeerServer};
use crate::standby::Store;
use crate::status::Status;
use failoverd_core::Command;

type Reply = oneshot::Sender<Result<serde_json::Value, String>>;

/// Connections served at once, per listener.
const PEER_CONNECTIONS: usize = 16;
/// Peer port connections open at once, in any state: far more than the gate's slots, so
/// that a connection past them is accepted and closed at once, never left waiting in the
/// kernel's queue in front of the peer's (see conode::gate).
const PEER_SOCKETS: usize = 256;
const CONTROL_CONNECTIONS: usize = 16;
const METRICS_CONNECTIONS: usize = 8;
/// How long a control client may take to send its request line.
const CONTROL_READ: Duration = Duration::from_secs(10);
/// How often the health checks run.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// How long the tasks get to stop at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The exclusive lock on a state directory, held while the daemon runs
/// (`state_dir/failoverd.lock`, `flock`, holding the owner's pid).
pub struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl StateLock {
    /// Lock `state_dir` (created if missing), or say which process holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, String> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| format!("state_dir {}: {e}", state_dir.display()))?;
        let path = state_dir.join("failoverd.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let me = format!("{}\n", std::process::id());
                let written = lock
                    .set_len(0)
                    .and_then(|()| lock.rewind())
                    .and_then(|()| lock.write_all(me.as_bytes()));
                written.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                Ok(StateLock { _lock: lock })
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(format!(
                    "state_dir {} is in use by another failoverd (pid {}): refusing to start a second daemon on it; nothing was changed",
                    state_dir.display(),
                    pid.trim().parse::<u32>().map_or("unknown".to_string(), |p| p.to_string())
                ))
            }
            Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

/// Run until `shutdown` completes (SIGINT or SIGTERM in the binary), or until a task
/// fails: then the error names it.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    // The start-up's file work runs off the runtime's threads, the lock first: a second
    // daemon on this state directory stops there, before it touches anything.
    let c = cfg.clone();
    let (_lock, key, paths, store) = tokio::task::spawn_blocking(move || {
        let lock = StateLock::acquire(&c.state_dir)?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let key = config::load_key(&c.key_file)?;
        if c.peer.public_key == key.public_bytes() {
            return Err("peer.public_key is this host's own key: pin the other host's key".into());
        }
        let paths = c.conode_paths()?;
        let store = Store::open(
            &c.state_dir,
            c.snapshot.keep,
            c.peer.public_key,
            paths.public,
        )
        .map_err(|e| e.to_string())?;
        store.forget_if_same_file(&paths.db);
        Ok::<_, String>((lock, key, paths, Arc::new(store)))
    })
    .await
    .map_err(|e| format!("start-up task failed: {e}: this is a bug"))??;
    conode::tls::install_provider();
    let peer_key = cfg.peer.public_key;
    let status = Arc::new(Status::new(store.clone()));
    let metrics = Arc::new(Metrics::new());
    let tls = conode::peer::PeerTls::new(&key)?;
    let client = PeerClient::new(&tls, &cfg.peer.address, peer_key, &cfg.timeouts)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut names: HashMap<tokio::task::Id, &'static str> = HashMap::new();

    // The failover core and what carries out its effects.
    let shipper = Arc::new(Shipper {
        cfg: cfg.clone(),
        key,
        admin: paths.admin.clone(),
        peer: client.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        mirror: std::sync::Mutex::new(None),
        busy: tokio::sync::Mutex::new(()),
    });
    let conode_ctl = Arc::new(Conode::new(
        cfg.conode.clone(),
        paths.admin.clone(),
        paths.db.clone(),
    ));
    let address = match cfg.vip_cidr() {
        None => Address::Unmanaged,
        Some(cidr) => Address::Vip(
            crate::vip::Vip::parse(&cfg.vip.interface, &cidr).map_err(|e| e.to_string())?,
            crate::vip::ProbeTimers {
                count: cfg.vip.probe_count,
                interval: cfg.vip.probe_interval,
                wait: cfg.vip.probe_wait,
            },
        ),
    };
    // What `failoverd check` checks of [vip] (the interface exists, the address lies in
    // one of its subnets, the capabilities): a daemon that could not hold the address
    // right refuses to start rather than claim it wrong later.
    if let Address::Vip(v, _) = &address {
        if let Err(problems) = crate::vip::check(v).await {
            return Err(format!(
                "{}: [vip] cannot be managed: {}",
                cfg.path.display(),
                problems.join("; ")
            ));
        }
    }
    let conflict_vip = match &address {
        Address::Vip(v, _) => Some(v.clone()),
        Address::Unmanaged => None,
    };
    let core_cfg = failoverd_core::Config {
        heartbeat_interval: millis(cfg.failover.heartbeat),
        peer_timeout: millis(cfg.failover.peer_timeout),
        handover_timeout: millis(cfg.failover.handover_timeout),
        ..failoverd_core::Config::default()
    };
    let core = failoverd_core::Core::new(core_cfg)
        .map_err(|e| format!("{}: [failover] {e}", cfg.path.display()))?;
    let started = failoverd_core::Input::Started {
        leftover_address: address.leftover().await?,
        persisted_epoch: {
            let dir = cfg.state_dir.clone();
            tokio::task::spawn_blocking(move || crate::epoch::read(&dir))
                .await
                .map_err(|e| format!("start-up task failed: {e}: this is a bug"))??
        },
        newest_generation: store.newest().map(|i| i.manifest.generation),
    };
    let effects = Arc::new(Effects {
        state_dir: cfg.state_dir.clone(),
        public: paths.public,
        store: store.clone(),
        conode: conode_ctl.clone(),
        shipper: shipper.clone(),
        address,
        conode_timeout: cfg.conode_timeout(),
        origin: std::sync::atomic::AtomicU64::new(0),
        strays: std::sync::Mutex::new(None),
    });
    let (events_tx, events_rx) = mpsc::channel(256);
    let (core_status_tx, core_status_rx) = watch::channel(None);
    status.attach_core(core_status_rx.clone());
    let handle = Handle {
        events: events_tx.clone(),
        status: core_status_rx,
    };
    let watchdog = match conode::sd_notify::watchdog() {
        None => None,
        Some(every) => match conode::sd_notify::Notifier::from_env() {
            Ok(Some(n)) => Some((n, every)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    "systemd's watchdog is asked for, but NOTIFY_SOCKET is unusable: {e}"
                );
                None
            }
        },
    };
    let reporting = crate::failover::Reporting {
        metrics: metrics.clone(),
        hooks: crate::hooks::Hooks::start(cfg.hooks.clone(), metrics.clone()),
        watchdog,
        vip: cfg.vip_cidr().unwrap_or_default(),
        peer: cfg.peer.address.clone(),
    };
    let h = tasks.spawn(crate::failover::drive(
        core,
        started,
        events_rx,
        events_tx.clone(),
        effects.clone(),
        client.clone(),
        core_status_tx,
        reporting,
        stop_rx.clone(),
    ));
    names.insert(h.id(), "failover driver");
    let server_toml = conode::config::PrivateConfig::load(&cfg.conode.config)
        .map_err(|e| format!("conode.config: {e}"))?
        .server_toml();
    let h = tasks.spawn(crate::failover::health_checks(
        handle.clone(),
        metrics.clone(),
        conode_ctl.clone(),
        client.clone(),
        server_toml,
        HEALTH_EVERY,
        stop_rx.clone(),
    ));
    names.insert(h.id(), "health checks");
    if let Some(v) = conflict_vip {
        let h = tasks.spawn(crate::failover::conflict_watch(
            v,
            handle.clone(),
            stop_rx.clone(),
        ));
        names.insert(h.id(), "address conflict watch");
    }

    let listen_peer = cfg
        .listen
        .peer_addr(&cfg.peer.address, cfg.vip.address.map(|(ip, _)| ip))?;
    let listener = tokio::net::TcpListener::bind(listen_peer)
        .await
        .map_err(|e| format!("listen.peer {listen_peer}: {e}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.pinned_server_config(vec![peer_key])?);
    let server = Arc::new(PeerServer {
        store: store.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        timeouts: cfg.timeouts,
        admin: paths.admin.clone(),
        events: Some(events_tx.clone()),
        gate: crate::peer::peer_gate(&cfg.peer.address),
        served: Arc::new(tokio::sync::Semaphore::new(PEER_CONNECTIONS)),
    });
    let h = tasks.spawn(crate::accept::serve(
        "peer port",
        listener,
        PEER_SOCKETS,
        stop_rx.clone(),
        move |tcp, from| crate::peer::accept(server.clone(), acceptor.clone(), tcp, from),
    ));
    names.insert(h.id(), "peer port");

    if let Some(addr) = cfg.listen.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listen.metrics {addr}: {e}"))?;
        let (st, m) = (status.clone(), metrics.clone());
        let h = tasks.spawn(crate::accept::serve(
            "metrics",
            l,
            METRICS_CONNECTIONS,
            stop_rx.clone(),
            move |tcp, from| serve_metrics(tcp, from, st.clone(), m.clone()),
        ));
        names.insert(h.id(), "metrics");
    }

    let sock = config::control_socket(&cfg.state_dir);
    // Ours to replace: the lock proves no other daemon serves this state directory.
    let _ = std::fs::remove_file(&sock);
    let control = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("control socket {}: {e}", sock.display()))?;
    let (trigger_tx, trigger_rx) = mpsc::channel::<Reply>(8);
    let st = status.clone();
    let hd = handle.clone();
    let h = tasks.spawn(crate::accept::serve(
        "control socket",
        control,
        CONTROL_CONNECTIONS,
        stop_rx.clone(),
        move |s, _| control_one(s, st.clone(), trigger_tx.clone(), hd.clone()),
    ));
    names.insert(h.id(), "control socket");

    let h = tasks.spawn(snapshot_loop(
        shipper,
        handle.clone(),
        effects.clone(),
        cfg.snapshot.interval,
        cfg.timeouts.conode,
        trigger_rx,
        stop_rx.clone(),
    ));
    names.insert(h.id(), "snapshot loop");
    tracing::info!(
        "failoverd running: peer port {}, peer {}, conode admin socket {}, transport {}",
        listen_peer,
        cfg.peer.address,
        paths.admin.display(),
        cfg.snapshot.transport.name()
    );

    conode::sd_notify::notify("READY=1");

    let outcome = supervise(&mut tasks, &names, shutdown).await;
    tracing::info!("stopping");
    conode::sd_notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    // The driver's last word (the watch keeps it after the driver is gone).
    let last = handle.status.borrow().clone();
    // The address is held only while failoverd runs to defend it (epochs, conflicts).
    crate::failover::release_on_stop(&effects, last.as_ref()).await;
    let _ = std::fs::remove_file(&sock);
    outcome
}

/// Wait for `shutdown` or for a task to end: a task ending before shutdown (returning,
/// failing or panicking) is logged at `error` and returned as the daemon's error.
pub async fn supervise(
    tasks: &mut JoinSet<Result<(), String>>,
    names: &HashMap<tokio::task::Id, &'static str>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => Ok(()),
        Some(done) = tasks.join_next_with_id() => {
            let (id, why) = match done {
                Ok((id, Ok(()))) => (id, "ended".to_string()),
                Ok((id, Err(e))) => (id, format!("failed: {e}")),
                Err(e) if e.is_panic() => (e.id(), format!("panicked: {}", panic_text(e.into_panic()))),
                Err(e) => (e.id(), format!("was cancelled: {e}")),
            };
            let name = names.get(&id).copied().unwrap_or("a task");
            let msg = format!("the {name} {why}: this is a bug; failoverd stops so that its supervisor restarts it");
            tracing::error!("{msg}");
            Err(msg)
        }
    }
}

fn millis(d: Duration) -> failoverd_core::Millis {
    failoverd_core::Millis(d.as_millis() as u64)
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

async fn snapshot_loop(
    shipper: Arc<Shipper>,
    handle: Handle,
    effects: Arc<Effects>,
    interval: Duration,
    conode_timeout: Duration,
    mut triggers: mpsc::Receiver<Reply>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let status = shipper.status.clone();
    let metrics = shipper.metrics.clone();
    let mut shipped: Option<Vec<ChainPosition>> = None;
    let mut failed = false;
    // Ticks `interval` apart from start to start (a snapshot that took longer is followed
    // at once): a commit waits at most about one interval plus one snapshot.
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reply = tokio::select! {
            _ = ticker.tick() => None,
            r = triggers.recv() => r,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let position = tokio::time::timeout(
            conode_timeout,
            conode::admin::fetch_position(&shipper.admin),
        )
        .await;
        let positions = match position {
            Ok(Ok(p)) => p.positions,
            other => {
                if let Some(r) = reply {
                    let reason = match other {
                        Ok(Err(e)) => e,
                        _ => format!(
                            "the conode's admin socket does not answer within {conode_timeout:?}"
                        ),
                    };
                    let _ = r.send(Err(ShipError::NotLive { reason }.to_string()));
                }
                continue;
            }
        };
        if reply.is_none() && !failed && shipped.as_ref() == Some(&positions) {
            continue;
        }
        let r = shipper.snapshot().await;
        match &r {
            Ok(s) => {
                shipped = Some(positions);
                failed = false;
                metrics.snapshot_shipped();
                status.shipped(s.clone());
                // This host's database holds at least what it shipped.
                effects
                    .origin
                    .fetch_max(s.generation, std::sync::atomic::Ordering::SeqCst);
                let _ = handle
                    .events
                    .send(crate::event::Event::GenerationVerified(s.generation))
                    .await;
            }
            Err(e) => {
                failed = true;
                let cause = e.cause();
                if cause == Cause::Bug {
                    tracing::error!("snapshot failed: {e}");
                } else {
                    tracing::warn!("snapshot failed: {e}");
                }
                metrics.failure(cause);
                status.set_error(format!("snapshot failed: {e}"));
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(
                r.map(|s| serde_json::to_value(s).unwrap_or_default())
                    .map_err(|e| e.to_string()),
            );
        }
    }
}

async fn control_one(
    s: UnixStream,
    status: Arc<Status>,
    triggers: mpsc::Sender<Reply>,
    handle: Handle,
) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let _ = tokio::time::timeout(CONTROL_READ, (&mut r).take(256).read_line(&mut line)).await;
    let answer = match line.trim() {
        "status" => {
            let mut v = status.view().json();
            v["ok"] = true.into();
            v
        }
        "snapshot" => {
            let (tx, rx) = oneshot::channel();
            match triggers.send(tx).await {
                Err(_) => serde_json::json!({"ok": false, "error": "failoverd is stopping"}),
                Ok(()) => match rx.await {
                    Ok(Ok(mut v)) => {
                        v["ok"] = true.into();
                        v
                    }
                    Ok(Err(e)) => serde_json::json!({"ok": false, "error": e}),
                    Err(_) => serde_json::json!({"ok": false, "error": "failoverd is stopping"}),
                },
            }
        }
        line @ ("switchover" | "promote" | "promote --force" | "demote") => {
            let command = match line {
                "switchover" => Command::Switchover,
                "promote" => Command::Promote { force: false },
                "promote --force" => Command::Promote { force: true },
                _ => Command::Demote,
            };
            match handle.command(command).await {
                Ok(done) => serde_json::json!({"ok": true, "message": done}),
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            }
        }
        other => {
            serde_json::json!({"ok": false, "error": format!("unknown request {:?}: expected status, snapshot, switchover, promote, promote --force or demote", other.chars().take(64).collect::<String>())})
        }
    };
    let mut s = r.into_inner();
    let mut out = answer.to_string().into_bytes();
    out.push(b'\n');
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

/// `/metrics` over plain HTTP/1.1 (hyper): GET /metrics, anything else 404.
async fn serve_metrics(
    tcp: tokio::net::TcpStream,
    from: String,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
) {
    use http_body_util::Full;
    use hyper::{Response, StatusCode};
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (status, metrics) = (status.clone(), metrics.clone());
        async move {
            let (code, ctype, body) =
                if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                    (
                        StatusCode::OK,
                        crate::metrics::CONTENT_TYPE,
                        metrics.encode(&status.view()),
                    )
                } else {
                    (
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "only GET /metrics here\n".to_string(),
                    )
                };
            let mut r = Response::new(Full::new(bytes::Bytes::from(body)));
            *r.status_mut() = code;
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(ctype),
            );
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
    if let Err(e) = conn.await {
        tracing::debug!("metrics: connection from {from}: {e}");
    }
}

/// Send one request line to the control socket and read the JSON answer.
pub async fn control_request(sock: &Path, line: &str) -> Result<serde_json::Value, String> {
    let mut s = UnixStream::connect(sock).await.map_err(|e| {
        format!(
            "failoverd not running? cannot connect to its control socket {}: {e}",
            sock.display()
        )
    })?;
    s.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| format!("control socket: {e}"))?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    r.read_line(&mut answer)
        .await
        .map_err(|e| format!("control socket: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| format!("control socket answered something that is not JSON: {e}"))?;
    if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
        return Err(v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("failed without a reason")
            .to_string());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_state_dir_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(d.path()).unwrap();
        let e = StateLock::acquire(d.path()).err().unwrap();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("in use"),
            "{e}"
        );
        drop(first);
        StateLock::acquire(d.path()).unwrap();
    }

    /// A task that panics stops the daemon with an error that names it, logged at
    /// `error`.
    #[tokio::test]
    async fn a_panicking_task_stops_the_daemon_with_an_error() {
        let log = Captured::default();
        let l = log.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || l.clone())
            .with_ansi(false)
            .finish();
        let _g = tracing::subscriber::set_default(sub);
        let mut tasks: JoinSet<Result<(), String>> = JoinSet::new();
        let mut names = HashMap::new();
        let h = tasks.spawn(async {
            std::future::pending::<()>().await;
            Ok(())
        });
        names.insert(h.id(), "peer port");
        let h = tasks.spawn(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("index out of bounds");
        });
        names.insert(h.id(), "snapshot loop");
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            supervise(&mut tasks, &names, std::future::pending()),
        )
        .await
        .expect("the supervisor noticed the panic");
        let e = r.unwrap_err();
        assert!(
            e.contains("snapshot loop panicked: index out of bounds")
                && e.contains("this is a bug"),
            "{e}"
        );
    }

    /// Garbage on the control socket gets a clear refusal and changes nothing; a
    /// command reaches the core and its answer comes back.
    #[tokio::test]
    async fn garbage_on_the_control_socket_is_refused_in_words() {
        let d = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(d.path(), 1, [1; 32], [2; 32]).unwrap());
        let status = Arc::new(Status::new(store));
        let (triggers, _t) = mpsc::channel(1);
        let (events, mut inbox) = mpsc::channel(4);
        let (_s, status_rx) = watch::channel(None);
        let handle = Handle {
            events,
            status: status_rx,
        };
        let ask = |line: &'static [u8]| {
            let (status, triggers, handle) = (status.clone(), triggers.clone(), handle.clone());
            async move {
                let (mut ours, theirs) = UnixStream::pair().unwrap();
                let served = tokio::spawn(control_one(theirs, status, triggers, handle));
                ours.write_all(line).await.unwrap();
                let mut answer = String::new();
                BufReader::new(&mut ours)
                    .read_line(&mut answer)
                    .await
                    .unwrap();
                served.await.unwrap();
                serde_json::from_str::<serde_json::Value>(&answer).unwrap()
            }
        };
        for garbage in [&b"\x16\x03\x01\x02\x00\n"[..], b"promote --now\n", b"\n"] {
            let v = ask(garbage).await;
            assert_eq!(v["ok"], false, "{v}");
            assert!(
                v["error"].as_str().unwrap().contains("unknown request"),
                "{v}"
            );
        }
        assert!(inbox.try_recv().is_err(), "nothing reached the core");
        // A real command is handed to the core with a reply channel.
        let asked = tokio::spawn(ask(b"demote\n"));
        match inbox.recv().await {
            Some(crate::event::Event::Command { command, reply }) => {
                assert_eq!(command, Command::Demote);
                reply.send(Err("this host is standby".into())).unwrap();
            }
            _ => panic!("no command reached the core"),
        }
        let v = asked.await.unwrap();
        assert_eq!(v["error"], "this host is standby", "{v}");
    }

    /// Log lines written by a test's subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn shutdown_stops_the_supervisor_without_error() {
        let mut tasks: JoinSet<Result<(), String>> = JoinSet::new();
        tasks.spawn(async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let r = supervise(&mut tasks, &HashMap::new(), async {}).await;
        assert_eq!(r, Ok(()));
    }
}
