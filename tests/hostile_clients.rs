//! Clients that attack the conode's client port, against the real `conode server`
//! process: its resident memory is read from /proc while they run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use system_tests::NodeFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Flooders at once (each also holds a descriptor in this process and in the conode).
const FLOODERS: usize = 1000;
/// Bytes of pings the flooders sent.
static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// How long each floods.
const FLOOD: Duration = Duration::from_secs(3);

fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the conode runs");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status")
        * 1024
}

/// A WebSocket client that completes the handshake on `port`, then (once `go` says so)
/// sends pings as fast as it can and never reads another byte. Returns whether the
/// conode closed the connection (a write failed) before `FLOOD` was over.
async fn flooder(
    port: u16,
    go: tokio::sync::watch::Receiver<bool>,
    ready: Arc<AtomicUsize>,
) -> bool {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive window: the conode's writes to us stall at once (and the kernel
    // keeps little of them).
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = sock
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect to the client port");
    s.write_all(
        b"GET /Status/Request HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("send the upgrade");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "no end of the HTTP answer");
        s.read_exact(&mut b).await.expect("read the upgrade answer");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    ready.fetch_add(1, Ordering::SeqCst);
    // 32 masked pings of 125 bytes each (header 2, mask 4, payload 125).
    let mut burst = Vec::new();
    for _ in 0..32 {
        burst.extend_from_slice(&[0x89, 0x80 | 125, 1, 2, 3, 4]);
        burst.extend(std::iter::repeat_n(0x55u8, 125));
    }
    let mut go = go;
    let _ = go.wait_for(|g| *g).await;
    let until = Instant::now() + FLOOD;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(200), s.write_all(&burst)).await {
            Ok(Ok(())) => {
                SENT.fetch_add(burst.len() as u64, Ordering::Relaxed);
            }
            Ok(Err(_)) => return true,
            // Our own send buffer is full: the conode stopped reading us.
            Err(_) => tokio::task::yield_now().await,
        }
    }
    false
}

/// Start `n` flooders, wait until all are upgraded, measure the conode's resident memory,
/// let them flood for `FLOOD` while a well-behaved client asks Status every 100 ms.
/// Returns (baseline, peak, closed by the conode, Status answers).
fn flood(
    rt: &tokio::runtime::Runtime,
    pid: u32,
    port: u16,
    server: &conode::config::ServerToml,
    n: usize,
) -> (u64, u64, usize, usize) {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..n)
        .map(|_| rt.spawn(flooder(port, go_rx.clone(), ready.clone())))
        .collect();
    rt.block_on(async {
        let t = Instant::now();
        while ready.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "only {} of {n} connections upgraded",
                ready.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the conode settle after accepting them.
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let baseline = rss_bytes(pid);
    go_tx.send(true).unwrap();
    let t = Instant::now();
    let (mut peak, mut served) = (baseline, 0);
    while t.elapsed() < FLOOD + Duration::from_secs(1) {
        peak = peak.max(rss_bytes(pid));
        if rt
            .block_on(conode::client::status(server, Duration::from_secs(5)))
            .is_ok()
        {
            served += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed = rt.block_on(async {
        let mut closed = 0;
        for t in tasks {
            closed += usize::from(t.await.expect("a flooder panicked"));
        }
        closed
    });
    (baseline, peak, closed, served)
}

/// Pings without reading the pongs used to take the conode from 8 MB to 998 MB resident in
/// 3 s from one connection (every pong queued in memory). Now a connection may queue what
/// its client sent while the writes to it were stuck up to `conode::ws::UNREAD_BUDGET`,
/// and is closed past it. One flooder is closed and grows the conode by little; 1,000 at
/// once grow it by less than their budgets; a well-behaved client is served throughout.
#[test]
fn a_ping_flood_that_never_reads_keeps_the_conode_memory_bounded() {
    let files = NodeFiles::setup("ping flood");
    let node = files.start();
    let pid = node.pid();
    let server = conode::config::PrivateConfig::load(&files.private())
        .expect("private.toml")
        .server_toml();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let port = files.ws_port();

    // The attack as found: one connection.
    SENT.store(0, Ordering::SeqCst);
    let (baseline, peak, closed, served) = flood(&rt, pid, port, &server, 1);
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "one flooder: conode resident {} MiB, peak {} MiB (+{} KiB); closed by the conode: {}; {} MiB of pings sent; {served} Status answers meanwhile",
        baseline >> 20,
        peak >> 20,
        grown >> 10,
        closed == 1,
        SENT.load(Ordering::SeqCst) >> 20
    );
    assert_eq!(closed, 1, "the conode closed the flooder");
    assert!(
        grown < 16 << 20,
        "one flooder grew the conode by {} MiB",
        grown >> 20
    );
    assert!(served > 0, "no Status answered during the flood");

    // 1,000 at once.
    SENT.store(0, Ordering::SeqCst);
    let (baseline, peak, closed, served) = flood(&rt, pid, port, &server, FLOODERS);
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "{FLOODERS} flooders: conode resident {} MiB with them connected, peak {} MiB while they flooded (+{} MiB); {closed} of them closed by the conode; {} MiB of pings sent; {served} Status answers meanwhile",
        baseline >> 20,
        peak >> 20,
        grown >> 20,
        SENT.load(Ordering::SeqCst) >> 20
    );
    let bound = FLOODERS as u64 * (conode::ws::UNREAD_BUDGET + (64 << 10));
    assert!(
        grown < bound,
        "the flood grew the conode by {} MiB (bound {} MiB)",
        grown >> 20,
        bound >> 20
    );
    assert!(served > 0, "no Status answered during the flood");
    rt.block_on(conode::client::status(&server, Duration::from_secs(5)))
        .expect("the conode serves after the flood");
}
