//! Skipchains across real `conode` processes, one per loopback address 127.0.0.x, driven
//! by `conode chain` and by the library client: the CLI, crashes (`kill -9`) of the leader
//! and of a follower in the middle of a stream of appends, and bad input.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conode::config::{Roster, ServerToml};
use conode::skipchain::block::{self, SkipBlock};
use conode::skipchain::client;
use serde_json::Value;
use system_tests::*;

/// Acknowledged (index, hash) pairs, shared with the appending task.
type Acks = Arc<Mutex<Vec<(i32, Vec<u8>)>>>;

/// Longest a single CLI run or library request may take.
const CALL: Duration = Duration::from_secs(30);
/// Longest a member may take to receive a block it lacks.
const CATCH_UP: Duration = Duration::from_secs(30);

/// `n` conodes on 127.0.0.2, 127.0.0.3, …, with a roster file of all of them (member 0
/// first: it leads the chains created from that roster).
/// Fields drop in order: processes are killed before their directories are removed.
struct Cluster {
    nodes: Vec<Option<Node>>,
    rt: tokio::runtime::Runtime,
    files: Vec<NodeFiles>,
    servers: Vec<ServerToml>,
    roster: PathBuf,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let files: Vec<NodeFiles> = (0..n)
            .map(|i| NodeFiles::setup_on(&format!("member {i}"), &format!("127.0.0.{}", i + 2)))
            .collect();
        let nodes = files.iter().map(|f| Some(f.start_on_host())).collect();
        let (roster, servers) = write_roster(&files);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Cluster {
            files,
            nodes,
            servers,
            roster,
            rt,
        }
    }

    /// `conode -c <member i's private.toml> chain ARGS`.
    fn chain(&self, i: usize, args: &[&str], stdin: &[u8]) -> Run {
        let private = self.files[i].private();
        let mut all: Vec<&OsStr> = vec!["-c".as_ref(), private.as_os_str(), "chain".as_ref()];
        all.extend(args.iter().map(|a| -> &OsStr { a.as_ref() }));
        run_conode(&all, stdin, CALL)
    }

    /// Like [`Cluster::chain`], requiring success; returns the JSON printed.
    fn chain_json(&self, i: usize, args: &[&str], stdin: &[u8]) -> Value {
        let r = self.chain(i, args, stdin);
        assert_eq!(
            r.code,
            Some(0),
            "conode chain {args:?} on member {i}: {r:?}"
        );
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("conode chain {args:?} printed no JSON ({e}): {r:?}"))
    }

    fn kill9(&mut self, i: usize) {
        let mut n = self.nodes[i].take().expect("member running");
        n.kill9();
    }

    fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "member {i} is still running");
        self.nodes[i] = Some(self.files[i].start_on_host());
    }

    /// Run `f` on the runtime, failing the test after [`CALL`].
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt
            .block_on(async { tokio::time::timeout(CALL, f).await })
            .expect("request did not finish in time")
    }

    fn create(&self, data: &[u8]) -> SkipBlock {
        let roster = block::roster_from_config(&Roster {
            servers: self.servers.clone(),
        });
        self.block_on(client::create(roster, data.to_vec(), 0, 0))
            .expect("chain created")
    }

    /// Member `i`'s hash of block `index`, waiting until it holds it.
    fn hash_at(&self, i: usize, genesis: &[u8], index: i32) -> Vec<u8> {
        let deadline = Instant::now() + CATCH_UP;
        loop {
            match self.block_on(client::get_by_index(&self.servers[i], genesis, index)) {
                Ok(b) => return b.hash,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "member {i} does not hold block {index} after {CATCH_UP:?}: {e}\n{}",
                        self.log(i)
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The latest block index member `i` holds.
    fn latest(&self, i: usize, genesis: &[u8]) -> i32 {
        let up = self
            .block_on(client::update_chain(&self.servers[i], genesis))
            .unwrap_or_else(|e| panic!("update chain from member {i}: {e}"));
        up.last().expect("non-empty update chain").index
    }

    /// Every member holds blocks 0..=last with the leader's hashes.
    fn assert_same_blocks(&self, genesis: &[u8], last: i32) {
        let want: Vec<Vec<u8>> = (0..=last).map(|i| self.hash_at(0, genesis, i)).collect();
        for m in 1..self.servers.len() {
            for (i, h) in want.iter().enumerate() {
                assert_eq!(
                    &self.hash_at(m, genesis, i as i32),
                    h,
                    "member {m} block {i}"
                );
            }
        }
    }

    fn log(&self, i: usize) -> String {
        self.nodes[i]
            .as_ref()
            .map(|n| n.log_text())
            .unwrap_or_default()
    }

    /// Start appending to the chain through member 0 (the leader), one block at a time,
    /// until stopped; failed appends are retried.
    fn appender(&self, genesis: &[u8]) -> Appender {
        let acks: Acks = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let leader = self.servers[0].clone();
        let (a, s) = (acks.clone(), stop.clone());
        let mut target = genesis.to_vec();
        let task = self.rt.spawn(async move {
            let mut n = 0u32;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let data = format!("streamed {n}").into_bytes();
                match client::append(&leader, &target, data).await {
                    Ok(r) => {
                        let b = r.latest.expect("reply has the new block");
                        a.lock().unwrap().push((b.index, b.hash.clone()));
                        target = b.hash;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Appender { acks, stop, task }
    }
}

/// A task appending blocks; `acks` holds every acknowledged (index, hash).
struct Appender {
    acks: Acks,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Appender {
    fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Wait until at least `n` blocks are acknowledged.
    fn wait_for(&self, n: usize, c: &Cluster) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} appends acknowledged in 60s\n{}",
                self.count(),
                c.log(0)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stop appending (after the append in flight) and return the acknowledgements.
    fn stop(self, c: &Cluster) -> Vec<(i32, Vec<u8>)> {
        self.stop.store(true, Ordering::SeqCst);
        c.block_on(self.task).expect("appender task");
        let acks = self.acks.lock().unwrap().clone();
        acks
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn json_str<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

#[test]
fn cli_builds_a_chain_that_every_member_serves_identically() {
    let c = Cluster::start(4);
    let roster = c.roster.to_str().unwrap();
    let g = c.chain_json(
        0,
        &["create", roster, "--data", "-", "--json"],
        b"genesis of the CLI chain",
    );
    assert_eq!(g["index"], 0);
    let chain = json_str(&g, "chain").to_string();
    assert_eq!(json_str(&g, "hash"), chain);
    assert_eq!(g["roster"].as_array().unwrap().len(), 4);
    assert_eq!(json_str(&g, "data_hex"), hex(b"genesis of the CLI chain"));

    // 20 blocks: odd ones from standard input, even ones from a file; through the local
    // conode of each member in turn and through the roster (the block always goes to the
    // leader).
    let files_dir = c.files[0].dir.path();
    for k in 1..=20 {
        let data = format!("block {k}");
        let file = files_dir.join(format!("data-{k}"));
        let (src, stdin): (&str, &[u8]) = if k % 2 == 1 {
            ("-", data.as_bytes())
        } else {
            std::fs::write(&file, &data).unwrap();
            (file.to_str().unwrap(), b"")
        };
        let mut args = vec!["add", &chain, "--data", src, "--json"];
        let member = if k == 1 { 0 } else { k % 4 };
        if k % 3 == 0 {
            args.extend(["--roster", roster]);
        }
        let b = c.chain_json(member, &args, stdin);
        assert_eq!(b["index"], k, "add {k}: {b}");
        assert_eq!(json_str(&b, "chain"), chain);
        assert_eq!(json_str(&b, "data_hex"), hex(data.as_bytes()));
        assert_eq!(b["data_len"], data.len());
    }

    // Every member, asked through the CLI, has the same hash at every index.
    let genesis = (0..32)
        .map(|i| u8::from_str_radix(&chain[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    for m in 0..4 {
        c.hash_at(m, &genesis, 20);
    }
    for n in 0..=20 {
        let index = n.to_string();
        let hashes: Vec<String> = (0..4)
            .map(|m| {
                let b = c.chain_json(m, &["get", &chain, "--index", &index, "--json"], b"");
                assert_eq!(b["index"], n, "member {m}: {b}");
                json_str(&b, "hash").to_string()
            })
            .collect();
        assert!(
            hashes.iter().all(|h| *h == hashes[0]),
            "block {n}: {hashes:?}"
        );
    }

    // The verified update chain ends at block 20 on every member, along skiplist jumps.
    for m in 0..4 {
        let up = c.chain_json(m, &["update", &chain, "--json"], b"");
        let up = up.as_array().expect("update --json prints an array");
        assert_eq!(up.first().unwrap()["index"], 0);
        assert_eq!(up.last().unwrap()["index"], 20, "member {m}: {up:?}");
        assert!(up.len() < 21, "skiplist jumps expected: {}", up.len());
    }

    // Human output: the chain, then one line per block with a preview of text data.
    let r = c.chain(2, &["get", &chain], b"");
    assert_eq!(r.code, Some(0), "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert_eq!(lines[0], format!("chain {chain}"));
    assert!(
        lines[1].starts_with("block 20 ") && lines[1].ends_with("data 8 bytes \"block 20\""),
        "{}",
        lines[1]
    );
    let r = c.chain(3, &["update", &chain], b"");
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.lines().last().unwrap().starts_with("block 20 "));
}

#[test]
fn every_acknowledged_block_survives_kill_9_of_the_leader() {
    let mut c = Cluster::start(4);
    let g = c.create(b"crash test");
    let appender = c.appender(&g.hash);
    appender.wait_for(30, &c);
    c.kill9(0);
    // Let the stream run into the dead leader for a moment, then stop it.
    std::thread::sleep(Duration::from_millis(300));
    let acks = appender.stop(&c);
    assert!(acks.len() >= 30);
    for (k, (index, _)) in acks.iter().enumerate() {
        assert_eq!(*index, k as i32 + 1, "acknowledged indices are consecutive");
    }
    let last_ack = acks.last().unwrap().0;

    c.restart(0);
    for (index, hash) in &acks {
        let b = c
            .block_on(client::get_by_index(&c.servers[0], &g.hash, *index))
            .unwrap_or_else(|e| panic!("acknowledged block {index} lost: {e}\n{}", c.log(0)));
        assert_eq!(&b.hash, hash, "acknowledged block {index} changed");
    }
    // At most the one append in flight at the kill was committed without an answer.
    let latest = c.latest(0, &g.hash);
    assert!(
        latest == last_ack || latest == last_ack + 1,
        "restarted leader is at {latest}, last acknowledged {last_ack}"
    );
    // The chain goes on from the restarted leader.
    let r = c
        .block_on(client::append(
            &c.servers[0],
            &g.hash,
            b"after the crash".to_vec(),
        ))
        .unwrap_or_else(|e| panic!("append after restart: {e}\n{}", c.log(0)));
    assert_eq!(r.latest.unwrap().index, latest + 1);
    c.assert_same_blocks(&g.hash, latest + 1);
}

#[test]
fn followers_and_leader_recover_from_kill_9_and_converge() {
    let mut c = Cluster::start(4);
    let g = c.create(b"follower crash test");
    let appender = c.appender(&g.hash);
    appender.wait_for(10, &c);
    // A follower dies mid-stream; 3 of 4 still meet the threshold.
    c.kill9(3);
    let n = appender.count();
    appender.wait_for(n + 15, &c);
    let acks = appender.stop(&c);
    let last = acks.last().unwrap().0;
    assert_eq!(c.latest(0, &g.hash), last);

    // It restarts and catches up by itself: no new block is appended meanwhile.
    c.restart(3);
    for (index, hash) in &acks {
        assert_eq!(
            &c.hash_at(3, &g.hash, *index),
            hash,
            "restarted follower, block {index}"
        );
    }
    assert_eq!(c.latest(3, &g.hash), last);
    assert_eq!(c.latest(0, &g.hash), last, "nothing was appended");

    // The leader dies and restarts: the chain continues at the next index.
    c.kill9(0);
    c.restart(0);
    let mut target = g.hash.clone();
    for k in 1..=5 {
        let r = c
            .block_on(client::append(&c.servers[0], &target, vec![k; 64]))
            .unwrap_or_else(|e| panic!("append {k} after the leader restarted: {e}"));
        let b = r.latest.unwrap();
        assert_eq!(b.index, last + k as i32);
        target = b.hash;
    }
    c.assert_same_blocks(&g.hash, last + 5);
    for m in 0..4 {
        assert_eq!(c.latest(m, &g.hash), last + 5, "member {m}");
    }
}

#[test]
fn cli_rejects_bad_input_with_clear_errors_and_exit_codes() {
    // A one-member chain (threshold 1) on 127.0.0.2; two conodes that never run.
    let live = NodeFiles::setup_on("live", "127.0.0.2");
    let _node = live.start_on_host();
    let down_a = NodeFiles::setup_on("down a", "127.0.0.4");
    let down_b = NodeFiles::setup_on("down b", "127.0.0.5");
    let dir = live.dir.path();
    let cli = |args: &[&str], stdin: &[u8]| {
        let private = live.private();
        let mut all: Vec<&OsStr> = vec!["-c".as_ref(), private.as_os_str(), "chain".as_ref()];
        all.extend(args.iter().map(|a| -> &OsStr { a.as_ref() }));
        run_conode(&all, stdin, CALL)
    };
    let roster = live.public();
    let r = cli(&["create", roster.to_str().unwrap()], b"");
    assert_eq!(r.code, Some(0), "{r:?}");
    let chain = r
        .stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("chain "))
        .unwrap_or_else(|| panic!("no chain line: {r:?}"))
        .to_string();
    assert_eq!(chain.len(), 64);
    assert!(r.stdout.contains("block 0 "), "{r:?}");

    // An unknown chain: the server says so, exit 1.
    let unknown = "ab".repeat(32);
    for args in [
        vec!["get", &unknown],
        vec!["get", &unknown, "--index", "3"],
        vec!["update", &unknown, "--json"],
        vec!["add", &unknown, "--data", "-"],
    ] {
        let r = cli(&args, b"x");
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("no such block") || r.stderr.contains("no such chain"),
            "{args:?}: {r:?}"
        );
        assert!(r.stdout.is_empty(), "{args:?}: {r:?}");
    }
    // A block past the end of a known chain.
    let r = cli(&["get", &chain, "--index", "7"], b"");
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr
            .contains("no such block: index 7 (the chain is at block 0)"),
        "{r:?}"
    );

    // Malformed ids and arguments: usage errors, exit 2, nothing sent.
    let not_hex = "zz".repeat(32);
    for (id, want) in [
        ("zz", "is not hex"),
        (not_hex.as_str(), "is not hex"),
        ("abcd", "64 hex digits"),
    ] {
        for cmd in ["get", "update"] {
            let r = cli(&[cmd, id], b"");
            assert_eq!(r.code, Some(2), "{cmd} {id}: {r:?}");
            assert!(r.stderr.contains(want), "{cmd} {id}: {r:?}");
            assert_eq!(r.stderr.lines().count(), 1, "one line: {r:?}");
        }
    }
    let r = cli(&["get", &chain, "--index", "-1"], b"");
    assert_eq!(r.code, Some(2), "{r:?}");
    let r = cli(
        &["create", roster.to_str().unwrap(), "--base-height", "1"],
        b"",
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("--base-height 1 is out of range"),
        "{r:?}"
    );

    // Data over the limit, from a file and from standard input: refused before sending.
    let big = vec![b'x'; block::MAX_DATA + 1];
    let file = dir.join("big");
    std::fs::write(&file, &big).unwrap();
    let r = cli(&["add", &chain, "--data", file.to_str().unwrap()], b"");
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr.contains("4194305 bytes") && r.stderr.contains("the limit is 4194304 bytes"),
        "{r:?}"
    );
    let r = cli(&["add", &chain, "--data", "-"], &big);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("the limit is 4194304 bytes"), "{r:?}");
    let r = cli(
        &[
            "add",
            &chain,
            "--data",
            dir.join("missing").to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("cannot read block data"), "{r:?}");
    // Exactly the limit is accepted, and nothing over it was stored.
    let r = cli(&["add", &chain, "--data", "-", "--json"], &big[1..]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let b: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(b["index"], 1);
    assert_eq!(b["data_len"], block::MAX_DATA);

    // A roster whose servers are all down: a connection error naming each, exit 1.
    let down = dir.join("down.toml");
    std::fs::write(
        &down,
        std::fs::read_to_string(down_a.public()).unwrap()
            + &std::fs::read_to_string(down_b.public()).unwrap(),
    )
    .unwrap();
    let r = cli(
        &[
            "add",
            &chain,
            "--data",
            "-",
            "--roster",
            down.to_str().unwrap(),
        ],
        b"x",
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("no server of roster") && r.stderr.contains("cannot connect"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains(&down_a.host()) && r.stderr.contains(&down_b.host()),
        "{r:?}"
    );
    // With a live server after the dead ones, it is found.
    let mixed = dir.join("mixed.toml");
    std::fs::write(
        &mixed,
        std::fs::read_to_string(&down).unwrap() + &std::fs::read_to_string(live.public()).unwrap(),
    )
    .unwrap();
    let r = cli(
        &["get", &chain, "--roster", mixed.to_str().unwrap(), "--json"],
        b"",
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let b: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(b["index"], 1);
    // Creating a chain whose first server is down.
    let r = cli(&["create", down.to_str().unwrap()], b"");
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("cannot connect"), "{r:?}");
}

/// `conode -c <member i's private.toml> ARGS` (backup, restore), requiring success.
fn conode_ok(c: &Cluster, i: usize, args: &[&OsStr]) -> Run {
    let private = c.files[i].private();
    let mut all: Vec<&OsStr> = vec!["-c".as_ref(), private.as_os_str()];
    all.extend_from_slice(args);
    let data = c.files[i].data();
    let r = run_conode_env(
        &all,
        &[("CONODE_SERVICE_PATH", data.as_os_str())],
        b"",
        CALL,
    );
    assert_eq!(r.code, Some(0), "conode {args:?}: {r:?}");
    r
}

#[test]
fn a_backup_taken_during_appends_restores_to_a_consistent_prefix() {
    let mut c = Cluster::start(4);
    let g = c.create(b"backed up");
    let appender = c.appender(&g.hash);
    appender.wait_for(20, &c);
    let dir = c.files[0].dir.path().join("backup");
    let r = conode_ok(&c, 0, &["backup".as_ref(), dir.as_os_str()]);
    let at_backup = appender.count();
    appender.wait_for(at_backup + 10, &c);
    let acks = appender.stop(&c);
    let backup_out = r.stdout;

    // The members hold every acknowledged block (propagation follows the acknowledgement).
    let (last_ack, last_hash) = acks.last().cloned().unwrap();
    for m in 1..4 {
        assert_eq!(c.hash_at(m, &g.hash, last_ack), last_hash, "member {m}");
    }
    // Restore it on the leader's host with the other members down, so what it serves
    // comes from the backup alone.
    for i in 0..4 {
        c.kill9(i);
    }
    let r = conode_ok(
        &c,
        0,
        &["restore".as_ref(), dir.as_os_str(), "--force".as_ref()],
    );
    c.restart(0);
    let up = c
        .block_on(client::update_chain(&c.servers[0], &g.hash))
        .expect("the restored chain verifies from the genesis");
    let last = up.last().unwrap().index;
    // A prefix: at least what was acknowledged before the backup began, every block the
    // one acknowledged at its index, and no more than what was acknowledged at the end.
    assert!(
        last as usize >= at_backup.saturating_sub(1),
        "restored up to {last}, {at_backup} acknowledged before the backup"
    );
    assert!((last as usize) <= acks.len() + 1, "{last} > {}", acks.len());
    for (index, hash) in acks.iter().filter(|(i, _)| *i <= last) {
        assert_eq!(&c.hash_at(0, &g.hash, *index), hash, "block {index}");
    }
    // The position the backup recorded is what the restored conode serves.
    let position = format!(
        "chain {} at index {last} (block {})",
        hex(&g.hash),
        hex(&up.last().unwrap().hash)
    );
    assert!(backup_out.contains(&position), "{position}: {backup_out}");
    assert!(r.stdout.contains(&position), "{position}: {}", r.stdout);

    // The other members come back; the leader fetches the newer blocks and continues.
    for i in 1..4 {
        c.restart(i);
    }
    let mut appended = None;
    for _ in 0..50 {
        match c.block_on(client::append(&c.servers[0], &g.hash, b"after".to_vec())) {
            Ok(r) => {
                appended = r.latest;
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let b = appended.expect("the restored leader appends again");
    assert_eq!(b.index as usize, acks.len() + 1);
    c.assert_same_blocks(&g.hash, b.index);
}
