//! `failoverd run`: the peer port, `/metrics`, the control socket, and the snapshot loop.
//!
//! # Control socket
//! `state_dir/control.sock`, mode 0600 (failoverd runs with umask 077). One request line,
//! one JSON answer line, then the connection closes:
//! - `status` → the status object (`failoverd status --json` prints it);
//! - `snapshot` → takes and ships a snapshot now and answers when the standby installed
//!   it: `{"ok":true,"generation":N,...}` or `{"ok":false,"error":"..."}`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use conode::db::ChainPosition;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{self, Config};
use crate::live::Shipper;
use crate::peer::{self, PeerClient};
use crate::standby::Store;
use crate::state::{Role, Shared};

type Reply = oneshot::Sender<Result<serde_json::Value, String>>;

/// Run until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), String> {
    let problems = cfg.problems();
    if !problems.is_empty() {
        return Err(format!(
            "the configuration has problems (run `failoverd check`):\n  {}",
            problems.join("\n  ")
        ));
    }
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    conode::tls::install_provider();
    let key = config::load_key(&cfg.key_file)?;
    let peer_key = cfg.peer_key()?;
    if peer_key == key.public_bytes() {
        return Err("peer.public_key is this host's own key: pin the other host's key".into());
    }
    let paths = cfg.conode_paths()?;
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("state_dir {}: {e}", cfg.state_dir.display()))?;
    let store = Arc::new(Store::open(
        &cfg.state_dir,
        cfg.snapshot.keep,
        peer_key,
        paths.public,
    )?);
    let io_timeout = std::env::var("FAILOVERD_IO_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(30));
    let shared = Arc::new(Shared::new(store, io_timeout, paths.admin.clone()));
    let tls = conode::peer::PeerTls::new(&key)?;
    let mut client = PeerClient::new(&tls, cfg.peer.address.clone(), peer_key)?;
    client.io_timeout = io_timeout;

    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(&cfg.listen.peer)
        .await
        .map_err(|e| format!("listen.peer {}: {e}", cfg.listen.peer))?;
    let server_cfg = tls.pinned_server_config(vec![peer_key])?;
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(peer::serve(
        listener,
        server_cfg,
        shared.clone(),
        stop_rx.clone(),
    )));
    if !cfg.listen.metrics.is_empty() {
        let l = tokio::net::TcpListener::bind(&cfg.listen.metrics)
            .await
            .map_err(|e| format!("listen.metrics {}: {e}", cfg.listen.metrics))?;
        tasks.push(tokio::spawn(serve_metrics(
            l,
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    let sock = cfg.control_socket();
    let _ = std::fs::remove_file(&sock);
    let control =
        UnixListener::bind(&sock).map_err(|e| format!("control socket {}: {e}", sock.display()))?;
    let (trigger_tx, trigger_rx) = mpsc::channel::<Reply>(8);
    tasks.push(tokio::spawn(serve_control(
        control,
        shared.clone(),
        trigger_tx,
        stop_rx.clone(),
    )));
    let shipper = Shipper {
        cfg: cfg.clone(),
        key,
        admin: paths.admin.clone(),
        peer: client,
        shared: shared.clone(),
        mirror: std::sync::Mutex::new(None),
    };
    tasks.push(tokio::spawn(snapshot_loop(
        shipper,
        cfg.interval(),
        trigger_rx,
        stop_rx.clone(),
    )));
    tracing::info!(
        "failoverd running: peer port {}, peer {}, conode admin socket {}, transport {}",
        cfg.listen.peer,
        cfg.peer.address,
        paths.admin.display(),
        cfg.snapshot.transport.name()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

async fn snapshot_loop(
    shipper: Shipper,
    interval: Duration,
    mut triggers: mpsc::Receiver<Reply>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = shipper.shared.clone();
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
            _ = stop.changed() => return,
        };
        let position = tokio::time::timeout(
            Duration::from_secs(5),
            conode::admin::fetch_position(&shipper.admin),
        )
        .await;
        let positions = match position {
            Ok(Ok(p)) => {
                shared.set_role(Role::Live);
                p.positions
            }
            other => {
                shared.set_role(Role::Standby);
                if let Some(r) = reply {
                    let why = match other {
                        Ok(Err(e)) => e,
                        _ => "the conode's admin socket does not answer".into(),
                    };
                    let _ = r.send(Err(format!(
                        "this host is the standby (its conode is not running: {why}): only the live host takes snapshots"
                    )));
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
                shared.shipped(s.clone());
            }
            Err(e) => {
                failed = true;
                shared.refused(&format!("snapshot failed: {e}"));
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(r.map(|s| serde_json::to_value(s).expect("json")));
        }
    }
}

async fn serve_control(
    l: UnixListener,
    shared: Arc<Shared>,
    triggers: mpsc::Sender<Reply>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let s = tokio::select! {
            r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        let triggers = triggers.clone();
        tokio::spawn(async move {
            let _ = control_one(s, shared, triggers).await;
        });
    }
}

async fn control_one(
    s: UnixStream,
    shared: Arc<Shared>,
    triggers: mpsc::Sender<Reply>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        (&mut r).take(256).read_line(&mut line),
    )
    .await;
    let answer = match line.trim() {
        "status" => {
            let mut v = shared.status();
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
        other => {
            serde_json::json!({"ok": false, "error": format!("unknown request {other:?}: expected \"status\" or \"snapshot\"")})
        }
    };
    let mut s = r.into_inner();
    let mut out = serde_json::to_vec(&answer).expect("json");
    out.push(b'\n');
    s.write_all(&out).await?;
    s.shutdown().await
}

async fn serve_metrics(
    l: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let s = tokio::select! {
            r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(s);
            let head = crate::http::read_request(&mut r).await;
            let mut s = r.into_inner();
            let _ = match head {
                Ok(Some(h)) if h.method == "GET" && h.path == "/metrics" => {
                    crate::http::write_response(
                        &mut s,
                        200,
                        "text/plain; version=0.0.4",
                        shared.metrics().as_bytes(),
                    )
                    .await
                }
                Ok(Some(_)) => {
                    crate::http::write_response(
                        &mut s,
                        404,
                        "text/plain",
                        b"only GET /metrics here\n",
                    )
                    .await
                }
                _ => Ok(()),
            };
        });
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
