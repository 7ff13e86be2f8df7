//! Status service benchmark: the conode against the ceiling of its stack.
//!
//! The ceiling is a minimal tokio + tokio-tungstenite server (`accept_async`, then a
//! fixed blob the size of a real Status reply for every message). It runs in its own
//! process, started by re-executing this binary with `--echo-server PORT HEX`, so both
//! servers are separate processes with the default tokio runtime, and one load
//! generator (tokio, multi-threaded, in this process) drives both.
//!
//! Rows: new WebSocket connection per request at 1 and 64 clients (req/s, p50, p99 of
//! connect→reply), 64 persistent connections (req/s), and VmRSS idle, with 1,000 idle
//! upgraded connections (and what one of them costs). Load rows run A B B A (conode,
//! ceiling, ceiling, conode) so drift on a shared machine cancels; the new-connection
//! rows also count closes the server did not answer with a close frame. Targets are
//! printed, never asserted. Everything is bounded: fixed durations, a timeout on every connect,
//! send and read, and a watchdog on the whole run. Spawned processes are stopped by
//! pid when their guard drops, on error and on panic too.
//!
//! Run it with `scripts/bench` (or `cargo bench -p conode --bench status`). To measure
//! another conode build against the same ceiling (e.g. a candidate fix), set
//! `STATUS_BENCH_CONODE=/path/to/conode`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conode::proto::StatusResponse;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// Measured time per server per round; each load row runs two rounds per server.
const ROUND: Duration = Duration::from_secs(2);
/// Unmeasured load before the first round against each server.
const WARMUP: Duration = Duration::from_millis(500);
/// Every connect, handshake, send and read gets this long.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a spawned server has to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole measurement (after the build) must finish within this.
const WATCHDOG: Duration = Duration::from_secs(150);
/// Idle connections held open for the memory row.
const IDLE_CONNS: usize = 1_000;
/// Concurrency of the many-clients rows.
const CLIENTS: usize = 64;
/// Targets, printed beside the ratios.
const TARGET_RATIO: f64 = 0.7;
const TARGET_IDLE_RSS_MIB: f64 = 20.0;

type Ws = WebSocketStream<TcpStream>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--echo-server") {
        return echo_server(&args[1..]);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench status: error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------
// The ceiling: a minimal tokio-tungstenite server.

/// `--echo-server PORT HEX`: answer every data message on every WebSocket with the
/// bytes HEX, until killed.
fn echo_server(args: &[String]) -> ExitCode {
    let (Some(port), Some(blob)) = (
        args.first().and_then(|p| p.parse::<u16>().ok()),
        args.get(1).and_then(|h| hex::decode(h).ok()),
    ) else {
        eprintln!("echo server: usage: --echo-server PORT HEX_REPLY");
        return ExitCode::from(2);
    };
    let blob = Bytes::from(blob);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("echo server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("echo server: cannot bind 127.0.0.1:{port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let blob = blob.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_binary() || msg.is_text())
                        && ws.send(Message::Binary(blob.clone())).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    })
}

// ---------------------------------------------------------------------------------
// Processes.

/// A spawned server, stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Proc, String> {
        let out = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start the {name}: {e}"))?;
        Ok(Proc {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, with the end of its log.
    fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the {} exited ({status}); its log ends with:\n{}",
                self.name,
                log_tail(&self.log)
            )),
            Err(e) => Err(format!("cannot wait for the {}: {e}", self.name)),
        }
    }

    /// VmRSS from /proc/PID/status, in KiB.
    fn rss_kib(&mut self) -> Result<u64, String> {
        self.check_alive()?;
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no VmRSS line in {path}"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let Ok(pid) = i32::try_from(self.child.id()) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        // The pid of our own child, not yet reaped (try_wait above said it still runs),
        // so it cannot belong to another process.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench status: the {} ignored SIGTERM for 5 s; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Run `cmd` to completion within `limit`.
fn run_bounded(mut cmd: Command, what: &str, limit: Duration) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("{what} failed ({s}): {}", err.trim()));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {limit:?}"));
            }
            Err(e) => return Err(format!("cannot wait for {what}: {e}")),
        }
    }
}

/// A port P on 127.0.0.1 such that P and P+1 are both free right now.
fn free_port_pair() -> Result<u16, String> {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let p = a.local_addr().map_err(|e| e.to_string())?.port();
        if p < u16::MAX - 1 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err("no pair of adjacent free ports on 127.0.0.1 after 100 tries".into())
}

/// Raise the soft open-files limit so 1,000 idle connections (plus the load) fit.
fn raise_nofile(need: u64) -> Result<(), String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let limit = || {
        getrlimit(Resource::RLIMIT_NOFILE)
            .map_err(|e| format!("getrlimit(RLIMIT_NOFILE) failed: {e}"))
    };
    let (mut soft, hard) = limit()?;
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        soft = limit()?.0;
    }
    if soft < need {
        return Err(format!(
            "open-files limit is {soft} but the bench needs {need}: raise the hard limit (ulimit -Hn)"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The load generator.

/// A server under test: where its Status WebSocket is.
struct Target {
    addr: SocketAddr,
    url: String,
}

impl Target {
    fn new(port: u16) -> Target {
        Target {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            url: format!("ws://127.0.0.1:{port}/Status/Request"),
        }
    }
}

async fn within<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no progress within {IO_TIMEOUT:?}")),
    }
}

/// Connect and upgrade to the Status WebSocket.
async fn connect(t: &Target) -> Result<Ws, String> {
    let tcp = within("connect", TcpStream::connect(t.addr)).await?;
    let _ = tcp.set_nodelay(true);
    // A small client read buffer keeps the generator's own cost down (tungstenite
    // zero-fills its whole read buffer, 128 KiB by default, before every read).
    let cfg = WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = within(
        "upgrade",
        tokio_tungstenite::client_async_with_config(t.url.as_str(), tcp, Some(cfg)),
    )
    .await?;
    Ok(ws)
}

/// Send the empty Status request and return the reply's bytes.
async fn request(ws: &mut Ws) -> Result<Bytes, String> {
    within("send", ws.send(Message::binary(Bytes::new()))).await?;
    loop {
        match within("read", async { Ok::<_, String>(ws.next().await) }).await? {
            Some(Ok(Message::Binary(b))) if !b.is_empty() => return Ok(b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Err(format!("unexpected reply {m:?}")),
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed before replying".into()),
        }
    }
}

/// Close politely: send a close frame, then wait for the server's close or EOF.
/// Returns whether the server answered with a close frame (RFC 6455 section 5.5.1).
async fn close(mut ws: Ws) -> bool {
    let answered = tokio::time::timeout(IO_TIMEOUT, async {
        if ws.close(None).await.is_err() {
            return false;
        }
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return false,
            }
        }
    })
    .await;
    answered == Ok(true)
}

/// A reply that decodes as a Status response with our server identity.
fn check_reply(b: &[u8]) -> Result<(), String> {
    let r = StatusResponse::decode(b).map_err(|e| format!("reply is not a Status: {e}"))?;
    if r.serveridentity.is_none() || !r.status.contains_key("Generic") {
        return Err("Status reply lacks its server identity or Generic section".into());
    }
    Ok(())
}

/// One request on a new connection; returns the connect→reply time and whether the
/// server answered our close frame.
async fn one_shot(t: &Target) -> Result<(Duration, bool), String> {
    let start = Instant::now();
    let mut ws = connect(t).await?;
    let reply = request(&mut ws).await?;
    let took = start.elapsed();
    check_reply(&reply)?;
    let answered = close(ws).await;
    Ok((took, answered))
}

#[derive(Default)]
struct Load {
    done: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// Connect→reply latencies in µs (new-connection rows only).
    lat_us: Vec<u32>,
    /// Closes the server did not answer with a close frame (new-connection rows only).
    unanswered_closes: u64,
}

impl Load {
    fn merge(&mut self, o: Load) {
        self.done += o.done;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.elapsed += o.elapsed;
        self.lat_us.extend(o.lat_us);
        self.unanswered_closes += o.unanswered_closes;
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile, in ms.
    fn pct_ms(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        self.lat_us.sort_unstable();
        let n = self.lat_us.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        f64::from(self.lat_us[rank.clamp(1, n) - 1]) / 1000.0
    }

    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// `clients` tasks, each doing new-connection requests back to back for `dur`.
async fn new_conn_load(t: &Arc<Target>, clients: usize, dur: Duration) -> Load {
    let start = Instant::now();
    let end = start + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let t = t.clone();
            tokio::spawn(async move {
                let mut l = Load::default();
                while Instant::now() < end {
                    match one_shot(&t).await {
                        Ok((d, answered)) => {
                            l.done += 1;
                            l.unanswered_closes += u64::from(!answered);
                            l.lat_us
                                .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
                        }
                        Err(e) => {
                            l.fail(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                l
            })
        })
        .collect();
    let mut total = Load::default();
    for task in tasks {
        match task.await {
            Ok(l) => total.merge(l),
            Err(e) => total.fail(format!("load task failed: {e}")),
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// `conns` connections opened first, then each sends requests in a loop for `dur`.
async fn persistent_load(t: &Arc<Target>, conns: usize, dur: Duration) -> Load {
    let mut total = Load::default();
    let mut socks = Vec::with_capacity(conns);
    for _ in 0..conns {
        match connect(t).await {
            Ok(ws) => socks.push(ws),
            Err(e) => total.fail(e),
        }
    }
    let start = Instant::now();
    let end = start + dur;
    let tasks: Vec<_> = socks
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut l = Load::default();
                let mut first = true;
                while Instant::now() < end {
                    match request(&mut ws).await {
                        Ok(b) => {
                            if first {
                                first = false;
                                if let Err(e) = check_reply(&b) {
                                    l.fail(e);
                                    break;
                                }
                            }
                            l.done += 1;
                        }
                        Err(e) => {
                            l.fail(e);
                            break;
                        }
                    }
                }
                (l, ws)
            })
        })
        .collect();
    let mut open = Vec::new();
    for task in tasks {
        match task.await {
            Ok((l, ws)) => {
                total.merge(l);
                open.push(ws);
            }
            Err(e) => total.fail(format!("load task failed: {e}")),
        }
    }
    total.elapsed = start.elapsed();
    futures_util::future::join_all(open.into_iter().map(close)).await;
    total
}

/// Open `n` upgraded, idle connections (100 at a time).
async fn open_idle(t: &Arc<Target>, n: usize) -> Result<Vec<Ws>, String> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(100);
        let got = futures_util::future::join_all((0..batch).map(|_| connect(t))).await;
        for ws in got {
            all.push(ws.map_err(|e| format!("idle connection {}: {e}", all.len() + 1))?);
        }
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------
// The run.

struct Servers {
    conode: Proc,
    echo: Proc,
    conode_t: Arc<Target>,
    echo_t: Arc<Target>,
}

/// Poll until `t` answers a Status request, or fail with the server's log.
async fn wait_ready(p: &mut Proc, t: &Target) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        p.check_alive()?;
        match one_shot(t).await {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => {
                return Err(format!(
                    "the {} did not answer within {START_TIMEOUT:?} ({e}); its log ends with:\n{}",
                    p.name,
                    log_tail(&p.log)
                ))
            }
        }
    }
}

/// One real Status reply's bytes.
async fn real_reply(t: &Target) -> Result<Bytes, String> {
    let mut ws = connect(t).await?;
    let b = request(&mut ws).await?;
    check_reply(&b)?;
    let _ = close(ws).await;
    Ok(b)
}

/// Start the conode (configured in `dir`), take one real reply, start the ceiling
/// with a blob of that size.
async fn start_servers(dir: &Path) -> Result<(Servers, Bytes, PathBuf), String> {
    let conode_bin = std::env::var_os("STATUS_BENCH_CONODE").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_conode")),
        PathBuf::from,
    );
    let port = free_port_pair()?;
    let private = dir.join("private.toml");
    let mut setup = Command::new(&conode_bin);
    setup.arg("-c").arg(&private).args([
        "setup",
        "--non-interactive",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--description",
        "bench",
    ]);
    run_bounded(setup, "conode setup", Duration::from_secs(20))?;
    let mut cmd = Command::new(&conode_bin);
    cmd.arg("-c")
        .arg(&private)
        .args(["server", "--allow-root"])
        .env("CONODE_SERVICE_PATH", dir.join("data"))
        .env_remove("RUST_LOG");
    let mut conode = Proc::spawn("conode", cmd, &dir.join("conode.log"))?;
    let conode_t = Arc::new(Target::new(port + 1));
    wait_ready(&mut conode, &conode_t).await?;

    let blob = real_reply(&conode_t).await?;
    let echo_port = free_port_pair()?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = Command::new(me);
    cmd.args(["--echo-server", &echo_port.to_string(), &hex::encode(&blob)]);
    let mut echo = Proc::spawn("ceiling server", cmd, &dir.join("echo.log"))?;
    let echo_t = Arc::new(Target::new(echo_port));
    wait_ready(&mut echo, &echo_t).await?;
    Ok((
        Servers {
            conode,
            echo,
            conode_t,
            echo_t,
        },
        blob,
        conode_bin,
    ))
}

/// A row of the table.
struct Row {
    name: String,
    conode: f64,
    ceiling: f64,
    /// Higher is better (req/s) or lower is better (latency, memory).
    higher_better: bool,
    unit_fmt: fn(f64) -> String,
    extra_target: Option<(&'static str, bool)>,
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.higher_better {
            self.conode / self.ceiling
        } else {
            self.ceiling / self.conode
        }
    }
}

fn fmt_rate(v: f64) -> String {
    format!("{v:.0}")
}
fn fmt_ms(v: f64) -> String {
    format!("{v:.3}")
}
fn fmt_tenths(v: f64) -> String {
    format!("{v:.1}")
}

/// Each load row, A B B A: conode, ceiling, ceiling, conode; results merged per server.
async fn ab_ba<F, Fut>(s: &Servers, load: F) -> Result<(Load, Load), String>
where
    F: Fn(Arc<Target>, Duration) -> Fut,
    Fut: std::future::Future<Output = Load>,
{
    let (mut a, mut b) = (Load::default(), Load::default());
    a.merge(load(s.conode_t.clone(), ROUND).await);
    b.merge(load(s.echo_t.clone(), ROUND).await);
    b.merge(load(s.echo_t.clone(), ROUND).await);
    a.merge(load(s.conode_t.clone(), ROUND).await);
    for (who, l) in [("conode", &a), ("ceiling", &b)] {
        if l.done == 0 {
            return Err(format!(
                "no request to the {who} succeeded: {}",
                l.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    Ok((a, b))
}

async fn measure(dir: &Path, table: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<(), String> {
    let (mut s, blob, bin) = start_servers(dir).await?;
    notes.push(format!("conode: {}", bin.display()));
    notes.push(format!(
        "real Status reply: {} bytes; the ceiling answers with those same bytes",
        blob.len()
    ));

    // Memory, before any load.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = (s.conode.rss_kib()?, s.echo.rss_kib()?);
    let mut with_conns = (0, 0);
    for (which, t) in [(0, s.conode_t.clone()), (1, s.echo_t.clone())] {
        let conns = open_idle(&t, IDLE_CONNS).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = if which == 0 {
            s.conode.rss_kib()?
        } else {
            s.echo.rss_kib()?
        };
        if which == 0 {
            with_conns.0 = rss;
        } else {
            with_conns.1 = rss;
        }
        drop(conns);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Warm both up (page faults, allocator, thread wake-ups), unmeasured.
    for t in [&s.conode_t, &s.echo_t] {
        let _ = new_conn_load(t, CLIENTS, WARMUP).await;
    }

    let mut row_notes = Vec::new();
    let mut note_errors = |row: &str, a: &Load, b: &Load| {
        for (who, l) in [("conode", a), ("ceiling", b)] {
            if l.errors > 0 {
                row_notes.push(format!(
                    "{row}, {who}: {} errors, first: {}",
                    l.errors,
                    l.first_error.as_deref().unwrap_or("?")
                ));
            }
            if l.unanswered_closes > 0 {
                row_notes.push(format!(
                    "{row}, {who}: {} of {} closes got no close frame back (EOF instead)",
                    l.unanswered_closes, l.done
                ));
            }
        }
    };

    for clients in [1, CLIENTS] {
        let (mut a, mut b) = ab_ba(
            &s,
            |t, d| async move { new_conn_load(&t, clients, d).await },
        )
        .await?;
        let name = format!(
            "new conn/request, {clients} client{}",
            if clients == 1 { "" } else { "s" }
        );
        note_errors(&name, &a, &b);
        table.push(Row {
            name: format!("{name}: req/s"),
            conode: a.rate(),
            ceiling: b.rate(),
            higher_better: true,
            unit_fmt: fmt_rate,
            extra_target: None,
        });
        for p in [50.0, 99.0] {
            table.push(Row {
                name: format!("{name}: p{p:.0} ms"),
                conode: a.pct_ms(p),
                ceiling: b.pct_ms(p),
                higher_better: false,
                unit_fmt: fmt_ms,
                extra_target: None,
            });
        }
    }

    let (a, b) = ab_ba(
        &s,
        |t, d| async move { persistent_load(&t, CLIENTS, d).await },
    )
    .await?;
    let name = format!("persistent, {CLIENTS} conns: req/s");
    note_errors(&name, &a, &b);
    table.push(Row {
        name,
        conode: a.rate(),
        ceiling: b.rate(),
        higher_better: true,
        unit_fmt: fmt_rate,
        extra_target: None,
    });

    let mib = |k: u64| k as f64 / 1024.0;
    let idle_mib = mib(idle.0);
    table.push(Row {
        name: "RSS idle, MiB".into(),
        conode: idle_mib,
        ceiling: mib(idle.1),
        higher_better: false,
        unit_fmt: fmt_tenths,
        extra_target: Some(("<= 20 MiB", idle_mib <= TARGET_IDLE_RSS_MIB)),
    });
    table.push(Row {
        name: format!("RSS with {IDLE_CONNS} idle conns, MiB"),
        conode: mib(with_conns.0),
        ceiling: mib(with_conns.1),
        higher_better: false,
        unit_fmt: fmt_tenths,
        extra_target: None,
    });
    let per_conn = |w: u64, i: u64| w.saturating_sub(i) as f64 / IDLE_CONNS as f64;
    table.push(Row {
        name: "  => per idle conn, KiB".into(),
        conode: per_conn(with_conns.0, idle.0),
        ceiling: per_conn(with_conns.1, idle.1),
        higher_better: false,
        unit_fmt: fmt_tenths,
        extra_target: None,
    });
    notes.extend(row_notes);
    s.conode.check_alive()?;
    s.echo.check_alive()?;
    Ok(())
}

fn print_table(rows: &[Row], notes: &[String]) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:>10} {:>10} {:>7}  {:<22} met",
        "row", "conode", "ceiling", "ratio", "target"
    );
    let _ = writeln!(out, "{}", "-".repeat(100));
    for r in rows {
        let ratio = r.ratio();
        let mut target = format!(">= {TARGET_RATIO}x");
        let mut met = ratio >= TARGET_RATIO;
        if let Some((t, ok)) = r.extra_target {
            target.push_str(", ");
            target.push_str(t);
            met &= ok;
        }
        let _ = writeln!(
            out,
            "{:<40} {:>10} {:>10} {:>6.2}x  {:<22} {}",
            r.name,
            (r.unit_fmt)(r.conode),
            (r.unit_fmt)(r.ceiling),
            ratio,
            target,
            if met { "yes" } else { "NO" }
        );
    }
    let _ = writeln!(
        out,
        "\nratio: conode/ceiling for req/s; ceiling/conode for latency and memory, so higher is better on every row."
    );
    let _ = writeln!(
        out,
        "latency: connect -> reply received, on a new connection; the close follows and counts in req/s."
    );
    let _ = writeln!(
        out,
        "load: {}s per server per row (A B B A), {CLIENTS} clients or connections; generator in-process (tokio, multi-threaded).",
        2 * ROUND.as_secs()
    );
    for n in notes {
        let _ = writeln!(out, "note: {n}");
    }
    print!("{out}");
}

fn run() -> Result<(), String> {
    raise_nofile((IDLE_CONNS + 2 * CLIENTS + 64) as u64)?;
    let dir = tempfile::Builder::new()
        .prefix("conode-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let mut table = Vec::new();
    let mut notes = Vec::new();
    let started = Instant::now();
    rt.block_on(async {
        match tokio::time::timeout(WATCHDOG, measure(dir.path(), &mut table, &mut notes)).await {
            Ok(r) => r,
            Err(_) => Err(format!("the bench did not finish within {WATCHDOG:?}")),
        }
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    notes.push(format!(
        "{cpus} CPUs shared by generator and server; loadavg before: {}; measured in {:.1}s",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    ));
    print_table(&table, &notes);
    Ok(())
}
