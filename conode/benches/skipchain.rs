//! Skipchain append benchmark: a 4-member roster on loopback against the ceiling of its
//! disk.
//!
//! The protocol side is four in-process conodes (`conode::server::Server`) on 127.0.0.2
//! to 127.0.0.5, their redb files in one directory. One client appends blocks through
//! the leader with `conode::skipchain::client::append`, one after the other (a chain is
//! sequential), and times each call: new WebSocket connection, request, reply, and the
//! client's check of the returned hash and forward link. The ceiling is a loop of redb
//! write transactions on a fresh file in the same directory, each inserting one value of
//! the block's data size under a 32-byte key and committing with the default (durable)
//! durability: what one host can commit on this disk with no network and no protocol.
//!
//! Rows, for 1 KiB and 64 KiB of data per block: blocks/s against commits/s, p50 and p99
//! of each call, CPU time of the process per block against per commit, and the leader's
//! storage per 1,000 blocks (file, pages in use, keys and values) against the raw data.
//! The ceiling runs in two halves around the protocol (A B A), on the same file, so
//! drift on a shared machine cancels and both files end up holding the same number of
//! entries. An extra row has 4 clients, each appending to its own chain (all led by the
//! same node), against the same ceiling. Notes give the client's floor (an empty Status
//! request on a new connection to the leader) and the stored size of one block.
//!
//! The target is `blocks/s ≥ 0.5 × ceiling ÷ F`, F being the fsyncs the protocol needs
//! per block ([`F_BLOCK`]: one durable commit per member, all on the one disk of this
//! run); the verdict for the fsyncs in series on the acknowledgement path ([`F_ACK`]) is
//! printed too. Targets are
//! printed, never asserted. When `strace` is installed, a short second pass re-executes
//! this binary under `strace -f` and counts the fsync-family calls per block on the
//! leader's and the followers' files and per ceiling commit, between marker files, so
//! those counts are measured, not assumed.
//!
//! Environment:
//! - `BENCH_DIR`: where the databases go (default: Cargo's target tmp dir). Everything is
//!   on one disk by construction; the table says which filesystem it was. Do not use a
//!   tmpfs: its fsync is free.
//! - `SKIPCHAIN_BENCH_BLOCKS_1K`, `SKIPCHAIN_BENCH_BLOCKS_64K`: blocks per row. By
//!   default, as many as the warm-up's pace fits in [`ROW_TIME`] (at least
//!   [`MIN_BLOCKS`], at most [`MAX_ROW_BYTES`] of data); the ceiling commits as many.
//! - `SKIPCHAIN_BENCH_CLIENTS`: clients of the concurrent row (4; 0 skips the row).
//! - `SKIPCHAIN_BENCH_STRACE=0`: skip the strace pass.
//!
//! Run it with `scripts/bench` or `cargo bench -p conode --bench skipchain`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use conode::config::{Address, PrivateConfig, Roster, Scheme, ServerToml};
use conode::keys::KeyPair;
use conode::server::Server;
use conode::skipchain::block::{self, SkipBlock};
use conode::skipchain::client;
use prost::Message as _;
use redb::{Database, TableDefinition};
use sha2::{Digest, Sha256};

/// Block sizes measured.
const SIZES: [usize; 2] = [1 << 10, 64 << 10];
/// Without a block count from the environment, the 1-client row lasts about this long:
/// the count is the warm-up's pace times this, within [`MIN_BLOCKS`] and
/// [`MAX_ROW_BYTES`] of data.
const ROW_TIME: Duration = Duration::from_secs(12);
const MIN_BLOCKS: usize = 200;
/// Data per row at most (each of the 4 members and the ceiling store it).
const MAX_ROW_BYTES: usize = 256 << 20;
/// Members of the roster.
const MEMBERS: usize = 4;
/// Unmeasured appends after the chain is created (dials, TLS, page cache, allocator);
/// the pace of the last [`PACE`] of them sets the default block count.
const WARMUP: usize = 50;
const PACE: usize = 40;
/// Status requests timed for the client's floor.
const STATUS_CALLS: usize = 300;
/// Blocks per size in the strace pass.
const PROBE_BLOCKS: usize = 100;
/// One append (or one ceiling commit) gets this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Followers must hold the latest block within this.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole measurement must finish within this.
const WATCHDOG: Duration = Duration::from_secs(1800);
/// Fsyncs the protocol needs per block: every member of the roster stores every block
/// durably (one redb transaction each, one `fdatasync`), so that a block signed by the
/// threshold survives the loss of the leader's disk, and in this run all four share one
/// disk, the ceiling's. The strace pass counts them (the "shared disk total").
const F_BLOCK: f64 = MEMBERS as f64;
/// Fsyncs in series on the acknowledgement path per block: the leader commits the block
/// and its forward links in one durable redb transaction (one `fdatasync`: redb's
/// one-phase commit with checksums), then the followers commit it, in parallel, and the
/// leader answers once the threshold holds it durably. Followers sign without writing.
const F_ACK: f64 = 2.0;
/// Target: blocks/s ≥ this × ceiling ÷ F.
const TARGET_FACTOR: f64 = 0.5;
/// The ceiling's one table: 32-byte key → value of the block size.
const CEILING_TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ceiling");

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("--probe") {
        probe_child(&args[1..])
    } else if args.iter().any(|a| a == "--list") {
        // `cargo bench -- --list` and friends: nothing to list.
        Ok(())
    } else {
        run()
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench skipchain: error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------
// Configuration, validated once.

struct Config {
    dir: PathBuf,
    /// Blocks per row, if set; else from the warm-up's pace.
    blocks: [Option<usize>; 2],
    clients: usize,
    strace: bool,
}

fn env_count(name: &str, min: usize) -> Result<Option<usize>, String> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= min => Ok(Some(n)),
            _ => Err(format!("{name}={v:?}: expected a whole number ≥ {min}")),
        },
    }
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let dir = std::env::var_os("BENCH_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create BENCH_DIR {}: {e}", dir.display()))?;
        Ok(Config {
            dir,
            blocks: [
                env_count("SKIPCHAIN_BENCH_BLOCKS_1K", 2)?,
                env_count("SKIPCHAIN_BENCH_BLOCKS_64K", 2)?,
            ],
            clients: env_count("SKIPCHAIN_BENCH_CLIENTS", 0)?.unwrap_or(4),
            strace: std::env::var("SKIPCHAIN_BENCH_STRACE").map_or(true, |v| v != "0"),
        })
    }
}

/// Which filesystem holds `dir`: "ext4 /dev/vda mounted at /", from /proc/self/mountinfo
/// (the mount point that is the longest prefix of the canonical path).
fn filesystem_of(dir: &Path) -> String {
    let Ok(path) = dir.canonicalize() else {
        return "unknown filesystem".into();
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        let mount = mount.replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(l, _)| mount.len() >= *l) {
            best = Some((mount.len(), format!("{fstype} {source} mounted at {mount}")));
        }
    }
    best.map_or_else(|| "unknown filesystem".into(), |(_, s)| s)
}

// ---------------------------------------------------------------------------------
// Statistics.

/// Call durations, in µs.
#[derive(Default)]
struct Lat {
    us: Vec<u64>,
    elapsed: Duration,
    /// CPU time of the whole process (user + system) during the calls.
    cpu: Duration,
}

impl Lat {
    fn push(&mut self, d: Duration) {
        self.us
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    fn merge(&mut self, o: Lat) {
        self.us.extend(o.us);
        self.elapsed += o.elapsed;
        self.cpu += o.cpu;
    }

    /// CPU ms per call.
    fn cpu_ms(&self) -> f64 {
        self.cpu.as_secs_f64() * 1000.0 / self.us.len().max(1) as f64
    }

    fn rate(&self) -> f64 {
        self.us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile, in ms.
    fn pct_ms(&mut self, p: f64) -> f64 {
        if self.us.is_empty() {
            return f64::NAN;
        }
        self.us.sort_unstable();
        let n = self.us.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.us[rank.clamp(1, n) - 1] as f64 / 1000.0
    }
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    let Ok(ru) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Duration::ZERO;
    };
    let us = |t: nix::sys::time::TimeVal| Duration::from_micros(t.num_microseconds().max(0) as u64);
    us(ru.user_time()) + us(ru.system_time())
}

// ---------------------------------------------------------------------------------
// The ceiling: durable redb commits of one value each.

struct Ceiling {
    db: Database,
    path: PathBuf,
    size: usize,
    next: u64,
}

impl Ceiling {
    fn create(path: PathBuf, size: usize) -> Result<Ceiling, String> {
        let db = Database::create(&path)
            .map_err(|e| format!("cannot create the ceiling's {}: {e}", path.display()))?;
        Ok(Ceiling {
            db,
            path,
            size,
            next: 0,
        })
    }

    /// `n` write transactions, each inserting one value and committing durably.
    fn commit_loop(&mut self, n: usize) -> Result<Lat, String> {
        let e = |x: &dyn std::fmt::Display| format!("ceiling {}: {x}", self.path.display());
        let mut value = vec![0u8; self.size];
        let mut lat = Lat::default();
        let (start, cpu) = (Instant::now(), cpu_time());
        for _ in 0..n {
            let key: [u8; 32] = Sha256::digest(self.next.to_le_bytes()).into();
            // Different bytes every time, as block data would be.
            value[..32].copy_from_slice(&key);
            self.next += 1;
            let t = Instant::now();
            let txn = self.db.begin_write().map_err(|x| e(&x))?;
            {
                let mut table = txn.open_table(CEILING_TABLE).map_err(|x| e(&x))?;
                table.insert(&key[..], &value[..]).map_err(|x| e(&x))?;
            }
            txn.commit().map_err(|x| e(&x))?;
            let took = t.elapsed();
            if took > CALL_TIMEOUT {
                return Err(format!(
                    "a ceiling commit took {took:?}: the disk is stalled"
                ));
            }
            lat.push(took);
        }
        lat.elapsed = start.elapsed();
        lat.cpu = cpu_time().saturating_sub(cpu);
        Ok(lat)
    }
}

/// Run `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("blocking task failed: {e}"))?
}

// ---------------------------------------------------------------------------------
// The roster: 4 in-process conodes on 127.0.0.2..5.

/// A port `p` with `p` and `p+1` free on `host` a moment ago.
fn free_port_pair(host: &str) -> Result<u16, String> {
    for _ in 0..200 {
        let a = std::net::TcpListener::bind((host, 0))
            .map_err(|e| format!("cannot bind {host}: {e}"))?;
        let p = a.local_addr().map_err(|e| e.to_string())?.port();
        if p < 65000 && std::net::TcpListener::bind((host, p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(format!(
        "no pair of adjacent free ports on {host} after 200 tries"
    ))
}

struct Cluster {
    servers: Vec<Server>,
    dbs: Vec<PathBuf>,
    roster: Roster,
}

impl Cluster {
    /// Member `i` keeps its database in `dir/node{i}/`; member 0 leads every chain.
    async fn start(dir: &Path) -> Result<Cluster, String> {
        let mut servers = Vec::new();
        let mut dbs = Vec::new();
        let mut entries = Vec::new();
        for i in 0..MEMBERS {
            let host = format!("127.0.0.{}", i + 2);
            let keys = KeyPair::generate().map_err(|e| format!("cannot make keys: {e}"))?;
            let address = Address {
                scheme: Scheme::Tls,
                host: host.clone(),
                port: free_port_pair(&host)?,
            };
            let mut cfg = PrivateConfig::new(keys, address, format!("bench{i}"));
            cfg.listen_address = host;
            let db = dir
                .join(format!("node{i}"))
                .join(format!("{}.db", cfg.keys.public_hex()));
            entries.push(cfg.server_toml());
            servers.push(
                Server::start(cfg, db.clone())
                    .await
                    .map_err(|e| format!("member {i} did not start: {e}"))?,
            );
            dbs.push(db);
        }
        Ok(Cluster {
            servers,
            dbs,
            roster: Roster { servers: entries },
        })
    }

    fn leader(&self) -> &ServerToml {
        &self.roster.servers[0]
    }

    async fn create(&self, data: Vec<u8>) -> Result<SkipBlock, String> {
        let roster = block::roster_from_config(&self.roster);
        within(client::create(roster, data, 0, 0))
            .await
            .map_err(|e| format!("creating a chain: {e}"))
    }

    /// Wait until every follower holds block `index` of `genesis`.
    async fn wait_followers(&self, genesis: &[u8], index: i32) -> Result<(), String> {
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        for (i, s) in self.roster.servers.iter().enumerate().skip(1) {
            loop {
                match client::get_by_index(s, genesis, index).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!(
                            "member {i} does not hold block {index} after {CATCH_UP_TIMEOUT:?}: {e}"
                        ))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        Ok(())
    }

    async fn stop(self) {
        for s in self.servers {
            s.stop().await;
        }
    }
}

async fn within<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| format!("no reply within {CALL_TIMEOUT:?}"))?
}

/// Block data of `size` bytes, different for every block of the run.
fn data(size: usize) -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut d = vec![0u8; size];
    let seed: [u8; 32] = Sha256::digest(NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes()).into();
    let n = size.min(32);
    d[..n].copy_from_slice(&seed[..n]);
    d
}

/// Append `n` blocks after `target`, one after the other; returns the call times and
/// the last block's hash.
async fn append_loop(
    leader: &ServerToml,
    mut target: Vec<u8>,
    size: usize,
    chain: usize,
    n: usize,
) -> Result<(Lat, Vec<u8>), String> {
    let mut lat = Lat::default();
    let (start, cpu) = (Instant::now(), cpu_time());
    for i in 0..n {
        let d = data(size);
        let t = Instant::now();
        let r = within(client::append(leader, &target, d))
            .await
            .map_err(|e| format!("append {i} of {n} to chain {chain}: {e}"))?;
        lat.push(t.elapsed());
        target = r.latest.ok_or("the append reply has no block")?.hash;
    }
    lat.elapsed = start.elapsed();
    lat.cpu = cpu_time().saturating_sub(cpu);
    Ok((lat, target))
}

// ---------------------------------------------------------------------------------
// The measurement.

struct SizeResult {
    size: usize,
    blocks: usize,
    seq: Lat,
    ceiling: Lat,
    concurrent: Option<(usize, Lat)>,
    /// Empty Status requests to the leader on a new connection: the client's floor.
    status: Lat,
    /// Leader's file, blocks in it (genesis and warm-up included).
    leader_bytes: u64,
    /// The leader's redb figures from its Status `Db` section, by name.
    leader_db: std::collections::BTreeMap<String, String>,
    leader_blocks: usize,
    /// The last block as stored (bytes), and its roster's share of it.
    block_bytes: (usize, usize),
    follower_bytes: Vec<u64>,
    ceiling_bytes: u64,
    ceiling_values: usize,
}

fn file_len(p: &Path) -> Result<u64, String> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .map_err(|e| format!("cannot stat {}: {e}", p.display()))
}

async fn measure_size(
    dir: &Path,
    size: usize,
    n: Option<usize>,
    clients: usize,
) -> Result<SizeResult, String> {
    let cluster = Cluster::start(&dir.join("roster")).await?;
    let g = cluster.create(data(size)).await?;
    let (_, target) = append_loop(cluster.leader(), g.hash.clone(), size, 0, WARMUP - PACE).await?;
    let (pace, target) = append_loop(cluster.leader(), target, size, 0, PACE).await?;
    cluster.wait_followers(&g.hash, WARMUP as i32).await?;
    let n = n.unwrap_or_else(|| {
        let per = pace.elapsed.as_secs_f64() / PACE as f64;
        ((ROW_TIME.as_secs_f64() / per) as usize).clamp(MIN_BLOCKS, MAX_ROW_BYTES / size)
    });

    let mut ceiling = Ceiling::create(dir.join("ceiling.redb"), size)?;
    let half = n / 2;
    let (mut c, back) = blocking(move || {
        let l = ceiling.commit_loop(half)?;
        Ok((l, ceiling))
    })
    .await?;
    ceiling = back;

    let (seq, last_hash) = append_loop(cluster.leader(), target, size, 0, n).await?;
    let last = within(client::get_block(cluster.leader(), &last_hash)).await?;
    let block_bytes = (
        block::encode_stored(&last).len(),
        last.roster.as_ref().map_or(0, |r| r.encoded_len()),
    );
    cluster.wait_followers(&g.hash, (WARMUP + n) as i32).await?;
    let leader_bytes = file_len(&cluster.dbs[0])?;
    let leader_db = within(async {
        conode::client::status(cluster.leader(), CALL_TIMEOUT)
            .await
            .map(|s| {
                s.status
                    .get("Db")
                    .map(|d| d.field.clone())
                    .unwrap_or_default()
            })
    })
    .await
    .map_err(|e| format!("Status of the leader: {e}"))?;
    let follower_bytes = cluster.dbs[1..]
        .iter()
        .map(|p| file_len(p))
        .collect::<Result<Vec<_>, _>>()?;

    let rest = n - half;
    let (c2, ceiling) = blocking(move || {
        let l = ceiling.commit_loop(rest)?;
        Ok((l, ceiling))
    })
    .await?;
    c.merge(c2);
    let ceiling_bytes = file_len(&ceiling.path)?;
    drop(ceiling);

    let mut status = Lat::default();
    let (start, cpu) = (Instant::now(), cpu_time());
    for _ in 0..STATUS_CALLS {
        let t = Instant::now();
        within(conode::client::call(
            cluster.leader(),
            "Status",
            "Request",
            Vec::new(),
        ))
        .await
        .map_err(|e| format!("Status request to the leader: {e}"))?;
        status.push(t.elapsed());
    }
    status.elapsed = start.elapsed();
    status.cpu = cpu_time().saturating_sub(cpu);

    let concurrent = if clients > 0 {
        let per = n.div_ceil(clients);
        let mut chains = Vec::new();
        for _ in 0..clients {
            chains.push(cluster.create(data(size)).await?);
        }
        let leader = cluster.leader().clone();
        let (start, cpu) = (Instant::now(), cpu_time());
        let tasks: Vec<_> = chains
            .iter()
            .enumerate()
            .map(|(k, g)| {
                let (leader, target) = (leader.clone(), g.hash.clone());
                tokio::spawn(async move { append_loop(&leader, target, size, k + 1, per).await })
            })
            .collect();
        let mut all = Lat::default();
        for t in tasks {
            let (l, _) = t.await.map_err(|e| format!("client task failed: {e}"))??;
            all.us.extend(l.us);
        }
        all.elapsed = start.elapsed();
        all.cpu = cpu_time().saturating_sub(cpu);
        Some((clients, all))
    } else {
        None
    };
    cluster.stop().await;
    Ok(SizeResult {
        size,
        blocks: n,
        seq,
        ceiling: c,
        concurrent,
        status,
        leader_bytes,
        leader_db,
        leader_blocks: 1 + WARMUP + n,
        block_bytes,
        follower_bytes,
        ceiling_bytes,
        ceiling_values: n,
    })
}

async fn measure(cfg: &Config, dir: &Path) -> Result<Vec<SizeResult>, String> {
    let mut out = Vec::new();
    for (k, size) in SIZES.iter().enumerate() {
        let d = dir.join(format!("run-{size}"));
        out.push(measure_size(&d, *size, cfg.blocks[k], cfg.clients).await?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// The strace pass: fsync-family calls per block, per file.

const SYNC_CALLS: [&str; 6] = [
    "fsync",
    "fdatasync",
    "sync_file_range",
    "msync",
    "syncfs",
    "sync",
];

/// fsync a marker file, so the trace shows where a phase starts and ends.
fn mark(dir: &Path, name: &str) -> Result<(), String> {
    let p = dir.join(format!("mark-{name}"));
    let f = std::fs::File::create(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    f.sync_all()
        .map_err(|e| format!("cannot fsync {}: {e}", p.display()))
}

/// `--probe DIR N`: for each size, N appends between markers, then N ceiling commits
/// between markers. Run under strace by the parent.
fn probe_child(args: &[String]) -> Result<(), String> {
    let (Some(dir), Some(n)) = (
        args.first().map(PathBuf::from),
        args.get(1).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        return Err("usage: --probe DIR BLOCKS".into());
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("no runtime: {e}"))?;
    rt.block_on(async {
        for size in SIZES {
            let d = dir.join(format!("probe-{size}"));
            let cluster = Cluster::start(&d).await?;
            let g = cluster.create(data(size)).await?;
            let (_, target) =
                append_loop(cluster.leader(), g.hash.clone(), size, 0, WARMUP).await?;
            cluster.wait_followers(&g.hash, WARMUP as i32).await?;
            mark(&dir, &format!("protocol-{size}-begin"))?;
            append_loop(cluster.leader(), target, size, 0, n).await?;
            cluster.wait_followers(&g.hash, (WARMUP + n) as i32).await?;
            mark(&dir, &format!("protocol-{size}-end"))?;
            cluster.stop().await;
            let mut c = Ceiling::create(d.join("ceiling.redb"), size)?;
            mark(&dir, &format!("ceiling-{size}-begin"))?;
            c.commit_loop(n)?;
            mark(&dir, &format!("ceiling-{size}-end"))?;
        }
        Ok(())
    })
}

/// Per size: fsync-family calls per block on the leader's file, on the followers'
/// files (all three), and per ceiling commit.
struct SyncCounts {
    blocks: usize,
    per_size: Vec<(usize, [f64; 3])>,
    calls_seen: Vec<String>,
}

fn probe(dir: &Path) -> Result<SyncCounts, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let out = dir.join("strace.txt");
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "--seccomp-bpf",
        "-y",
        "-e",
        "signal=none",
        "-e",
    ])
    .arg(format!("trace={}", SYNC_CALLS.join(",")))
    .arg("-o")
    .arg(&out)
    .arg(me)
    .arg("--probe")
    .arg(dir)
    .arg(PROBE_BLOCKS.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("cannot run strace: {e}"))?;
    let o = child
        .wait_with_output()
        .map_err(|e| format!("waiting for strace: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "the strace pass failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let text =
        std::fs::read_to_string(&out).map_err(|e| format!("cannot read {}: {e}", out.display()))?;
    // counts[size index][leader, followers, ceiling]
    let mut counts = vec![[0u64; 3]; SIZES.len()];
    let mut phase: Option<(usize, bool)> = None;
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some((_pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if !SYNC_CALLS.contains(&name) {
            continue; // "<... resumed>" and anything else
        }
        let path = args
            .split_once('<')
            .and_then(|(_, p)| p.split_once('>'))
            .map_or("", |(p, _)| p);
        if let Some(m) = path
            .rsplit('/')
            .next()
            .and_then(|f| f.strip_prefix("mark-"))
        {
            let mut parts = m.split('-');
            let (Some(kind), Some(size), Some(edge)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Some(k) = SIZES.iter().position(|s| s.to_string() == size) else {
                continue;
            };
            phase = (edge == "begin").then_some((k, kind == "protocol"));
            continue;
        }
        let Some((k, protocol)) = phase else { continue };
        seen.insert(name.to_string());
        let slot = if protocol && path.contains("/node0/") {
            0
        } else if protocol && path.contains("/node") {
            1
        } else if !protocol && path.ends_with("ceiling.redb") {
            2
        } else {
            continue;
        };
        counts[k][slot] += 1;
    }
    let per = |c: u64| c as f64 / PROBE_BLOCKS as f64;
    Ok(SyncCounts {
        blocks: PROBE_BLOCKS,
        per_size: SIZES
            .iter()
            .zip(&counts)
            .map(|(s, c)| (*s, [per(c[0]), per(c[1]), per(c[2])]))
            .collect(),
        calls_seen: seen.into_iter().collect(),
    })
}

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------
// The table.

fn kib(size: usize) -> String {
    format!("{} KiB", size >> 10)
}

fn print_table(results: &mut [SizeResult], syncs: &Result<SyncCounts, String>, notes: &[String]) {
    let mut out = String::new();
    let target = TARGET_FACTOR / F_BLOCK;
    let _ = writeln!(
        out,
        "{:<46} {:>10} {:>10} {:>7}  {:<14} met",
        "row", "skipchain", "ceiling", "ratio", "target"
    );
    let _ = writeln!(out, "{}", "-".repeat(96));
    let mut row = |name: String, a: f64, b: f64, ratio: f64, fmt: fn(f64) -> String, tgt: bool| {
        let (t, met) = if tgt {
            (
                format!(">= {target:.3}x"),
                if ratio >= target { "yes" } else { "NO" },
            )
        } else {
            (String::new(), "")
        };
        let _ = writeln!(
            out,
            "{name:<46} {:>10} {:>10} {ratio:>6.2}x  {t:<14} {met}",
            fmt(a),
            fmt(b)
        );
    };
    let rate = |v: f64| format!("{v:.0}");
    let ms = |v: f64| format!("{v:.2}");
    let mib = |v: f64| format!("{v:.2}");
    for r in results.iter_mut() {
        let s = kib(r.size);
        let (a, ceiling_rate) = (r.seq.rate(), r.ceiling.rate());
        row(
            format!("{s}, 1 client: blocks/s | commits/s"),
            a,
            ceiling_rate,
            a / ceiling_rate,
            rate,
            true,
        );
        for p in [50.0, 99.0] {
            let (a, b) = (r.seq.pct_ms(p), r.ceiling.pct_ms(p));
            row(format!("{s}, 1 client: p{p:.0} ms"), a, b, b / a, ms, false);
        }
        let (a, b) = (r.seq.cpu_ms(), r.ceiling.cpu_ms());
        row(
            format!("{s}, 1 client: CPU ms per block"),
            a,
            b,
            b / a,
            ms,
            false,
        );
        if let Some((k, l)) = r.concurrent.as_mut() {
            let a = l.rate();
            row(
                format!("{s}, {k} clients x own chain: blocks/s"),
                a,
                ceiling_rate,
                a / ceiling_rate,
                rate,
                true,
            );
            for p in [50.0, 99.0] {
                let (a, b) = (l.pct_ms(p), r.ceiling.pct_ms(p));
                row(
                    format!("{s}, {k} clients: p{p:.0} ms"),
                    a,
                    b,
                    b / a,
                    ms,
                    false,
                );
            }
            let (a, b) = (l.cpu_ms(), r.ceiling.cpu_ms());
            row(
                format!("{s}, {k} clients: CPU ms per block"),
                a,
                b,
                b / a,
                ms,
                false,
            );
        }
        let m = |bytes: u64, n: usize| bytes as f64 / n as f64 * 1000.0 / f64::from(1 << 20);
        let leader = m(r.leader_bytes, r.leader_blocks);
        let raw = r.size as f64 * 1000.0 / f64::from(1 << 20);
        row(
            format!("{s}: leader file | raw data, MiB/1k blocks"),
            leader,
            raw,
            raw / leader,
            mib,
            false,
        );
        let fig = |k: &str| r.leader_db.get(k).and_then(|v| v.parse::<u64>().ok());
        if let (Some(pages), Some(page)) = (fig("AllocatedPages"), fig("PageSize")) {
            let used = m(pages * page, r.leader_blocks);
            row(
                format!("{s}: leader pages in use | raw, MiB/1k"),
                used,
                raw,
                raw / used,
                mib,
                false,
            );
        }
        if let Some(stored) = fig("StoredBytes") {
            let stored = m(stored, r.leader_blocks);
            row(
                format!("{s}: leader keys+values | raw, MiB/1k"),
                stored,
                raw,
                raw / stored,
                mib,
                false,
            );
        }
        row(
            format!("{s}: ceiling file | raw data, MiB/1k values"),
            m(r.ceiling_bytes, r.ceiling_values),
            raw,
            raw / m(r.ceiling_bytes, r.ceiling_values),
            mib,
            false,
        );
    }
    let _ = writeln!(
        out,
        "\nratio: skipchain/ceiling for rates; ceiling/skipchain for latency and CPU; raw data/stored for sizes."
    );
    let _ = writeln!(
        out,
        "target: blocks/s >= {TARGET_FACTOR} x ceiling commits/s / F, F = {F_BLOCK} fsyncs per block on the shared disk"
    );
    let _ = writeln!(
        out,
        "        (each of the {MEMBERS} members stores the block in one durable redb transaction; the strace pass counts them)."
    );
    let verdicts = |f: f64| {
        results
            .iter()
            .map(|r| {
                let ratio = r.seq.rate() / r.ceiling.rate();
                let met = ratio >= TARGET_FACTOR / f;
                format!(
                    "{} {ratio:.2}x {}",
                    kib(r.size),
                    if met { "met" } else { "NOT met" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "        stricter count: in series on the acknowledgement path, the leader commits the block, then the followers\n        \
         (in parallel) before the leader answers, F = {F_ACK}, target {:.2}x: {}.",
        TARGET_FACTOR / F_ACK,
        verdicts(F_ACK)
    );
    let _ = writeln!(
        out,
        "skipchain latency: client::append to the leader: new WebSocket connection, request, reply, client's check of hash and link."
    );
    let _ = writeln!(
        out,
        "CPU per block: user + system time of this whole process (client and all {MEMBERS} members) over the row, per block or commit."
    );
    let _ = writeln!(
        out,
        "ceiling: one redb write transaction per value (32-byte key, value of the block's data size), default durability;"
    );
    let _ = writeln!(
        out,
        "         half before and half after the 1-client row, same file, same directory as the roster's databases."
    );
    match syncs {
        Ok(s) => {
            let _ = writeln!(
                out,
                "fsyncs per block (strace -f, {} blocks per size; calls seen: {}):",
                s.blocks,
                s.calls_seen.join(", ")
            );
            for (size, [l, f, c]) in &s.per_size {
                let _ = writeln!(
                    out,
                    "  {}: leader file {l:.2}, followers' files {f:.2} ({:.2} each), shared disk total {:.2}; ceiling {c:.2} per commit",
                    kib(*size),
                    f / (MEMBERS - 1) as f64,
                    l + f
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "fsyncs per block: not measured: {e}");
        }
    }
    for r in results.iter() {
        let _ = writeln!(
            out,
            "note: {}: {} blocks per row (+{} warm-up and the genesis in the file); a block is stored as {} bytes ({} of them the roster) plus its forward links; leader file {} bytes, followers {:?} bytes; ceiling file {} bytes",
            kib(r.size),
            r.blocks,
            WARMUP,
            r.block_bytes.0,
            r.block_bytes.1,
            r.leader_bytes,
            r.follower_bytes,
            r.ceiling_bytes
        );
    }
    for r in results.iter_mut() {
        let _ = writeln!(
            out,
            "floor ({}): an empty Status request to the leader on a new connection: p50 {:.2} ms, p99 {:.2} ms, CPU {:.2} ms",
            kib(r.size),
            r.status.pct_ms(50.0),
            r.status.pct_ms(99.0),
            r.status.cpu_ms()
        );
    }
    for n in notes {
        let _ = writeln!(out, "note: {n}");
    }
    print!("{out}");
}

fn run() -> Result<(), String> {
    let cfg = Config::from_env()?;
    let dir = tempfile::Builder::new()
        .prefix("skipchain-bench-")
        .tempdir_in(&cfg.dir)
        .map_err(|e| format!("cannot create a directory in {}: {e}", cfg.dir.display()))?;
    let fs = filesystem_of(dir.path());
    if fs.starts_with("tmpfs") || fs.starts_with("ramfs") {
        eprintln!(
            "bench skipchain: warning: {} is on {fs}, where fsync costs nothing; set BENCH_DIR to a directory on a disk",
            dir.path().display()
        );
    }
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let mut results = rt.block_on(async {
        match tokio::time::timeout(WATCHDOG, measure(&cfg, dir.path())).await {
            Ok(r) => r,
            Err(_) => Err(format!("the bench did not finish within {WATCHDOG:?}")),
        }
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    let measured = started.elapsed();
    let syncs = if !cfg.strace {
        Err("SKIPCHAIN_BENCH_STRACE=0".into())
    } else if !strace_available() {
        Err("strace is not installed (apt-get install strace)".into())
    } else {
        probe(&dir.path().join("probe"))
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let notes = vec![
        format!("databases in {} ({fs})", dir.path().display()),
        format!(
            "{MEMBERS} members in this process on 127.0.0.2..{}, member 0 leads; {cpus} CPUs shared by client, members and ceiling; loadavg before: {}; measured in {:.1}s",
            MEMBERS + 1,
            load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            measured.as_secs_f64()
        ),
    ];
    print_table(&mut results, &syncs, &notes);
    Ok(())
}
