//! The skipchain service across a roster of in-process conodes on loopback addresses
//! 127.0.0.x: chains, followers, catch-up, durability of acknowledged blocks, and bad
//! input on both ports.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestNode;
use conode::config::{Roster, ServerToml};
use conode::peer::PeerHandler;
use conode::server::Server;
use conode::skipchain::block::{self, SkipBlock};
use conode::skipchain::client;
use conode::skipchain::store::View;
use conode::ws::BoxFuture;
use prost::Message;

/// In front of a member's conode-to-conode port: while `lose_stores` is set, the
/// `StoreSigned` messages it receives are answered with an error and not handled, as if
/// they never arrived (the member went down after signing, or the leader died before
/// sending them).
#[derive(Default)]
struct Gate {
    lose_stores: AtomicBool,
}

struct Gated {
    inner: Arc<dyn PeerHandler>,
    gate: Arc<Gate>,
}

impl PeerHandler for Gated {
    fn call<'a>(
        &'a self,
        from: [u8; 32],
        service: &'a str,
        method: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        if method == "StoreSigned" && self.gate.lose_stores.load(Ordering::SeqCst) {
            return Box::pin(async { Err("test: StoreSigned lost".to_string()) });
        }
        self.inner.call(from, service, method, payload)
    }

    fn members(&self) -> Option<Arc<conode::peer::Members>> {
        self.inner.members()
    }
}

struct Cluster {
    nodes: Vec<TestNode>,
    servers: Vec<Option<Server>>,
    gates: Vec<Arc<Gate>>,
    roster: Roster,
}

async fn start_gated(t: &TestNode, gate: &Arc<Gate>) -> Server {
    let gate = gate.clone();
    Server::start_wrapped(t.cfg.clone(), t.db_path(), move |inner| {
        Arc::new(Gated { inner, gate })
    })
    .await
    .expect("server starts")
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let nodes: Vec<TestNode> = (0..n)
            .map(|i| {
                let host = format!("127.0.0.{}", i + 2);
                let mut t = TestNode::with_host(&format!("node{i}"), &host);
                t.cfg.listen_address = host;
                t
            })
            .collect();
        let roster = Roster {
            servers: nodes.iter().map(|t| t.cfg.server_toml()).collect(),
        };
        let gates: Vec<Arc<Gate>> = nodes.iter().map(|_| Arc::default()).collect();
        let mut servers = Vec::new();
        for (t, g) in nodes.iter().zip(&gates) {
            servers.push(Some(start_gated(t, g).await));
        }
        Cluster {
            nodes,
            servers,
            gates,
            roster,
        }
    }

    /// Lose (or stop losing) the `StoreSigned` messages that reach member `i`.
    fn lose_stores(&self, i: usize, lose: bool) {
        self.gates[i].lose_stores.store(lose, Ordering::SeqCst);
    }

    /// The hash of block `index` of `genesis` in member `i`'s database now (a running
    /// member: only durable blocks are visible in it).
    fn held(&self, i: usize, genesis: &[u8], index: u32) -> Option<Vec<u8>> {
        let s = self.servers[i].as_ref()?;
        let v = View::new(&s.database().db()).expect("read transaction");
        v.hash_at(genesis, index)
            .expect("database read")
            .map(|h| h.to_vec())
    }

    /// The running members whose database holds block `b` now.
    fn holders(&self, b: &SkipBlock) -> Vec<usize> {
        let genesis = if b.genesis.is_empty() {
            &b.hash
        } else {
            &b.genesis
        };
        (0..self.nodes.len())
            .filter(|&i| self.held(i, genesis, b.index as u32).as_ref() == Some(&b.hash))
            .collect()
    }

    fn server(&self, i: usize) -> &ServerToml {
        &self.roster.servers[i]
    }

    async fn stop(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.stop().await;
        }
    }

    async fn restart(&mut self, i: usize) {
        self.stop(i).await;
        self.servers[i] = Some(start_gated(&self.nodes[i], &self.gates[i]).await);
    }

    async fn create(&self, data: &[u8]) -> SkipBlock {
        client::create(block::roster_from_config(&self.roster), data.to_vec(), 0, 0)
            .await
            .expect("chain created")
    }

    /// Wait until member `i` holds block `index` of `genesis`; return its hash.
    async fn wait_for(&self, i: usize, genesis: &[u8], index: i32) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client::get_by_index(self.server(i), genesis, index).await {
                Ok(b) => return b.hash,
                Err(e) if Instant::now() > deadline => {
                    panic!("member {i} never got block {index}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_members_hold_the_same_chain_and_a_restarted_follower_catches_up() {
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    assert_eq!(g.index, 0);
    let mut target = g.hash.clone();
    for i in 1..=10 {
        let r = client::append(c.server(0), &target, format!("block {i}").into_bytes())
            .await
            .expect("append");
        let latest = r.latest.unwrap();
        assert_eq!(latest.index, i);
        assert_eq!(latest.data, format!("block {i}").into_bytes());
        target = latest.hash;
    }
    // Every member holds the same 11 blocks.
    for m in 0..4 {
        for i in 0..=10 {
            let h = c.wait_for(m, &g.hash, i).await;
            let leader = client::get_by_index(c.server(0), &g.hash, i).await.unwrap();
            assert_eq!(h, leader.hash, "member {m} block {i}");
        }
    }
    // Status reports the blocks (the stored bytes come from a walk beside Status: they
    // may be missing, or from before these blocks, in the first answers).
    let mut tries = 0;
    let st = loop {
        let st = conode::client::status(c.server(0), Duration::from_secs(5))
            .await
            .unwrap();
        let bytes = st.status["Skipblock"]
            .field
            .get("Bytes")
            .and_then(|b| b.parse::<u64>().ok());
        tries += 1;
        if bytes.is_some_and(|b| b > 11 * 100) || tries > 250 {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sb = &st.status["Skipblock"].field;
    assert_eq!(sb["Blocks"], "11");
    assert_eq!(sb["Chains"], "1");
    assert!(sb["Bytes"].parse::<u64>().unwrap() > 11 * 100, "{sb:?}");
    assert!(st.status["Generic"].field["Available_Services"].contains("Skipchain"));
    // The update chain from the genesis reaches block 10 along signed links, with a
    // level-1 jump (base 4) on the way.
    let up = client::update_chain(c.server(2), &g.hash).await.unwrap();
    assert_eq!(up.last().unwrap().index, 10);
    assert!(
        up.len() < 11,
        "skiplist jumps: {:?}",
        up.iter().map(|b| b.index).collect::<Vec<_>>()
    );

    // Follower 3 stops; the chain goes on with 3 of 4 (threshold 3).
    c.stop(3).await;
    for i in 11..=15 {
        let r = client::append(c.server(0), &target, vec![i as u8; 100])
            .await
            .expect("append with one follower down");
        target = r.latest.unwrap().hash;
    }
    // It comes back and catches up at start (from the leader), before any new block.
    c.restart(3).await;
    let h = c.wait_for(3, &g.hash, 15).await;
    assert_eq!(h, target);
    let up = client::update_chain(c.server(3), &g.hash).await.unwrap();
    assert_eq!(up.last().unwrap().index, 15);

    // With two followers down, the threshold (3 of 4) cannot be met: refused, nothing
    // stored on the leader.
    c.stop(2).await;
    c.stop(3).await;
    let e = client::append(c.server(0), &target, b"x".to_vec())
        .await
        .unwrap_err();
    assert!(
        e.contains("only 2 of 4 members signed block 16 (3 needed)"),
        "{e}"
    );
    let e = client::get_by_index(c.server(0), &g.hash, 16)
        .await
        .unwrap_err();
    assert!(e.contains("no such block"), "{e}");

    // The leader restarts from its own database and continues the chain.
    c.restart(2).await;
    c.restart(0).await;
    let r = client::append(c.server(0), &target, b"after restart".to_vec())
        .await
        .expect("append after the leader restarted");
    assert_eq!(r.latest.unwrap().index, 16);
    for i in 0..4 {
        c.stop(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_close_with_a_clear_reason_and_nothing_is_stored() {
    let c = Cluster::start(4).await;
    let g = c.create(b"g").await;
    // To a follower (once it holds the genesis).
    c.wait_for(1, &g.hash, 0).await;
    let e = client::append(c.server(1), &g.hash, b"x".to_vec())
        .await
        .unwrap_err();
    assert!(
        e.contains("1002") && e.contains("not the leader of this chain"),
        "{e}"
    );
    // Unknown block.
    let e = client::get_block(c.server(0), &[7; 32]).await.unwrap_err();
    assert!(e.contains("no such block"), "{e}");
    let e = client::append(c.server(0), &[7; 32], b"x".to_vec())
        .await
        .unwrap_err();
    assert!(e.contains("no such block"), "{e}");
    // Over the size limit.
    let e = client::append(c.server(0), &g.hash, vec![0; block::MAX_DATA + 1])
        .await
        .unwrap_err();
    assert!(e.contains("the limit is 4194304"), "{e}");
    // Malformed protobuf.
    let e = conode::client::call(c.server(0), "Skipchain", "StoreSkipBlock", vec![0xff; 5])
        .await
        .unwrap_err();
    assert!(e.contains("malformed StoreSkipBlock"), "{e}");
    // Creating a chain on a node that is not roster[0].
    let mut r = block::roster_from_config(&c.roster);
    r.list.swap(0, 1);
    let req = block::StoreSkipBlock {
        target_skip_chain_id: vec![],
        new_block: Some(SkipBlock {
            roster: Some(r),
            ..Default::default()
        }),
        signature: None,
    };
    let e = conode::client::call(
        c.server(0),
        "Skipchain",
        "StoreSkipBlock",
        req.encode_to_vec(),
    )
    .await
    .unwrap_err();
    assert!(e.contains("not the leader"), "{e}");
    // Still serving, still one block.
    let ids = client::chain_ids(c.server(0)).await.unwrap();
    assert_eq!(ids, vec![g.hash.clone()]);
    let up = client::update_chain(c.server(0), &g.hash).await.unwrap();
    assert_eq!(up.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restored_from_an_older_copy_fetches_the_newer_blocks_and_does_not_fork() {
    let mut c = Cluster::start(4).await;
    let g = c.create(b"g").await;
    let mut target = g.hash.clone();
    for i in 1..=3 {
        target = client::append(c.server(0), &target, vec![i])
            .await
            .unwrap()
            .latest
            .unwrap()
            .hash;
    }
    c.stop(0).await;
    let old = c.nodes[0].dir.path().join("old.db");
    std::fs::copy(c.nodes[0].db_path(), &old).unwrap();
    c.restart(0).await;
    for i in 4..=6 {
        target = client::append(c.server(0), &target, vec![i])
            .await
            .unwrap()
            .latest
            .unwrap()
            .hash;
    }
    for m in 1..4 {
        c.wait_for(m, &g.hash, 6).await;
    }
    // The leader's host is replaced by one with the older copy (blocks 0..=3).
    c.stop(0).await;
    std::fs::rename(&old, c.nodes[0].db_path()).unwrap();
    c.restart(0).await;
    // It fetches blocks 4..=6 from the members before it accepts a block, and block 7
    // extends the real chain. (The client names the chain by its genesis: it cannot
    // know whether this leader holds block 6 yet.)
    let r = client::append(c.server(0), &g.hash, vec![7]).await;
    let b7 = r.expect("block 7").latest.unwrap();
    assert_eq!(b7.index, 7);
    assert_eq!(b7.backlinks[0], target);
    for m in 1..4 {
        assert_eq!(c.wait_for(m, &g.hash, 7).await, b7.hash);
    }
    for i in 0..4 {
        c.stop(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_acknowledged_block_is_durable_on_a_threshold_before_the_client_hears_of_it() {
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    // Read right after each reply, with no waiting: the leader and at least 2 of the 3
    // followers hold the block durably.
    let holders = c.holders(&g);
    assert!(
        holders.len() >= 3 && holders.contains(&0),
        "genesis acknowledged, held by {holders:?} only"
    );
    let mut target = g.hash.clone();
    for i in 1..=20 {
        let b = client::append(c.server(0), &target, vec![i as u8; 1000])
            .await
            .expect("append")
            .latest
            .unwrap();
        let holders = c.holders(&b);
        assert!(
            holders.len() >= 3 && holders.contains(&0),
            "block {i} acknowledged, held by {holders:?} only"
        );
        target = b.hash;
    }

    // Followers 2 and 3 sign block 21 but never store it (their `StoreSigned` is lost, as
    // if they went down right after signing): not acknowledged, with the count.
    c.lose_stores(2, true);
    c.lose_stores(3, true);
    let e = match client::append(c.server(0), &target, b"21".to_vec()).await {
        Ok(r) => panic!(
            "block {} acknowledged while on 2 of 4 members only",
            r.latest.unwrap().index
        ),
        Err(e) => e,
    };
    assert!(
        e.contains("block 21 is durable on 2 of 4 members, 3 needed: not acknowledged"),
        "{e}"
    );
    // It is committed on the leader and on follower 1, nowhere else.
    let b21 = client::get_by_index(c.server(0), &g.hash, 21)
        .await
        .expect("block 21 is on the leader");
    assert_eq!(c.holders(&b21), vec![0, 1]);
    // Followers 2 and 3 go down, and come back: at start-up they fetch block 21 from the
    // leader, and the chain goes on after it.
    c.stop(2).await;
    c.stop(3).await;
    c.lose_stores(2, false);
    c.lose_stores(3, false);
    c.restart(2).await;
    c.restart(3).await;
    assert_eq!(c.wait_for(2, &g.hash, 21).await, b21.hash);
    assert_eq!(c.wait_for(3, &g.hash, 21).await, b21.hash);
    let b22 = client::append(c.server(0), &b21.hash, b"22".to_vec())
        .await
        .expect("block 22 once they are back")
        .latest
        .unwrap();
    assert_eq!((b22.index, &b22.backlinks[0]), (22, &b21.hash));
    assert!(c.holders(&b22).len() >= 3);

    // Followers 2 and 3 down before the block: too few signatures, nothing stored.
    c.stop(2).await;
    c.stop(3).await;
    let e = client::append(c.server(0), &b22.hash, b"23".to_vec())
        .await
        .unwrap_err();
    assert!(
        e.contains("only 2 of 4 members signed block 23 (3 needed)"),
        "{e}"
    );
    assert_eq!(c.held(0, &g.hash, 23), None);
    // Back: the next block is 23, once the leader's back-off after the failed dials
    // (at most 5 s) lets it dial them again.
    c.restart(2).await;
    c.restart(3).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let b23 = loop {
        match client::append(c.server(0), &b22.hash, b"23".to_vec()).await {
            Ok(r) => break r.latest.unwrap(),
            Err(e) if e.contains("only 2 of 4") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("block 23 once they are back: {e}"),
        }
    };
    assert_eq!(b23.index, 23);
    assert!(c.holders(&b23).len() >= 3);
    for i in 0..4 {
        c.stop(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_acknowledged_block_survives_the_loss_of_the_leaders_disk() {
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    // Every block acknowledged to the client: (index, hash).
    let mut acked: Vec<(i32, Vec<u8>)> = vec![(0, g.hash.clone())];
    let append = |c: &Cluster, data: Vec<u8>| {
        let leader = c.server(0).clone();
        let genesis = g.hash.clone();
        async move { client::append(&leader, &genesis, data).await }
    };
    for i in 1..=3 {
        let b = append(&c, vec![i]).await.expect("append").latest.unwrap();
        acked.push((b.index, b.hash));
    }
    // An online snapshot of the leader's database, seconds old when it is brought back.
    let old = c.nodes[0].dir.path().join("old.db");
    let info = c.servers[0]
        .as_ref()
        .unwrap()
        .database()
        .snapshot_to(&old)
        .unwrap();
    assert_eq!(info.positions[0].index, 3);

    // Three rounds: blocks acknowledged after the snapshot, then the leader killed right
    // after an acknowledgement (whatever it would have sent afterwards is lost with it) and
    // its database replaced by the old snapshot, then started again. In the last round
    // the followers lose the leader's `StoreSigned` from the start, so the last block can
    // be durable on the leader alone: it must not have been acknowledged.
    for round in 0..3 {
        let lose_all = round == 2;
        if lose_all {
            for f in 1..4 {
                c.lose_stores(f, true);
            }
        }
        for k in 0..3 {
            let data = format!("round {round} block {k}").into_bytes();
            match append(&c, data).await {
                Ok(r) => {
                    let b = r.latest.unwrap();
                    acked.push((b.index, b.hash));
                }
                Err(e) => {
                    assert!(lose_all, "round {round}: {e}");
                    assert!(
                        e.contains("is durable on 1 of 4 members, 3 needed: not acknowledged"),
                        "{e}"
                    );
                    break;
                }
            }
        }
        // Killed: nothing it sends from now on arrives.
        for f in 1..4 {
            c.lose_stores(f, true);
        }
        c.stop(0).await;
        for f in 1..4 {
            c.lose_stores(f, false);
        }
        let db = c.nodes[0].db_path();
        std::fs::remove_file(&db).unwrap();
        std::fs::copy(&old, &db).unwrap();
        c.restart(0).await;
        // The first block the restarted leader accepts comes after every acknowledged one,
        // and every acknowledged block is on the leader, unchanged.
        let (last, last_hash) = acked.last().unwrap().clone();
        let b = append(&c, format!("after round {round}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("round {round}: first block after the restart: {e}"))
            .latest
            .unwrap();
        assert_eq!(
            (b.index, &b.backlinks[0]),
            (last + 1, &last_hash),
            "round {round}: the new block does not follow the last acknowledged block"
        );
        for (i, h) in &acked {
            assert_eq!(
                c.held(0, &g.hash, *i as u32).as_ref(),
                Some(h),
                "round {round}: acknowledged block {i} missing or changed on the leader"
            );
        }
        acked.push((b.index, b.hash));
    }
    // No fork: every member holds the same chain.
    let (last, _) = acked.last().unwrap().clone();
    for m in 1..4 {
        c.wait_for(m, &g.hash, last).await;
        for (i, h) in &acked {
            assert_eq!(
                c.held(m, &g.hash, *i as u32).as_ref(),
                Some(h),
                "member {m} block {i}"
            );
        }
    }
    for i in 0..4 {
        c.stop(i).await;
    }
}

/// A switchover's final image freezes the database: a writer waiting while the image is
/// taken, and every writer after it, is refused with a clear error and commits nothing;
/// reads go on; `thaw` accepts writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_final_image_freezes_the_database_until_thawed() {
    let mut c = Cluster::start(1).await;
    let g = c.create(b"g").await;
    let b1 = client::append(c.server(0), &g.hash, vec![1])
        .await
        .unwrap()
        .latest
        .unwrap();
    let srv = c.servers[0].as_ref().unwrap();
    let socket = srv.admin_socket().to_path_buf();
    assert!(!srv.database().is_frozen());
    // The image holds the writers for 400 ms; an append starts in the middle of it.
    let taking = tokio::task::spawn_blocking(move || {
        let mut first = true;
        conode::admin::fetch_final_image_blocking(&socket, None, |_, _, _| {
            if std::mem::take(&mut first) {
                std::thread::sleep(Duration::from_millis(400));
            }
            Ok(())
        })
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = client::append(c.server(0), &b1.hash, vec![2]).await;
    let h = taking.await.unwrap().expect("final image");
    assert_eq!(h.positions.len(), 1);
    assert_eq!(h.positions[0].index, 1, "the image holds block 1");
    let e = waiting.expect_err("a writer that waited for the image is refused");
    assert!(e.contains("handing over to its standby"), "{e}");
    let e = client::append(c.server(0), &b1.hash, vec![3])
        .await
        .expect_err("a later writer is refused");
    assert!(e.contains("handing over to its standby"), "{e}");
    // Nothing was committed; reads go on; Status shows the freeze.
    assert_eq!(c.held(0, &g.hash, 2), None);
    assert_eq!(c.wait_for(0, &g.hash, 1).await, b1.hash);
    let st = conode::client::status(c.server(0), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        st.status.get("Db").and_then(|d| d.field.get("Frozen")),
        Some(&"true".to_string())
    );
    let socket = c.servers[0].as_ref().unwrap().admin_socket().to_path_buf();
    assert!(conode::admin::thaw(&socket).await.unwrap(), "it was frozen");
    assert!(!conode::admin::thaw(&socket).await.unwrap(), "thawed once");
    let b2 = client::append(c.server(0), &b1.hash, vec![2])
        .await
        .expect("writes go on after thaw")
        .latest
        .unwrap();
    assert_eq!(b2.index, 2);
    c.stop(0).await;
}

/// Log lines written on this thread (a current-thread runtime runs every task there).
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

impl Captured {
    /// Capture what this thread logs until the guard is dropped.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// The log is bounded (not a line per connection), and says that it refused some.
    fn assert_bounded(&self, opened: usize) {
        let log = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        let refused = log
            .lines()
            .filter(|l| l.contains("conode port: refused"))
            .count();
        let all = log.lines().count();
        eprintln!(
            "{opened} stranger connections opened; {refused} refusal lines, {all} log lines in all"
        );
        assert!(refused >= 1, "the refusals are logged");
        assert!(
            all < 400,
            "{all} log lines: not bounded\n{}",
            &log[..log.len().min(4000)]
        );
    }
}

/// Strangers holding half-open connections (TCP, never a TLS byte) against `targets`
/// from their own loopback addresses, reopened as they are closed (at most 100 new ones
/// per 100 ms, about the attack's pace), until stopped.
struct Strangers {
    stop: Arc<AtomicBool>,
    opened: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Strangers {
    /// `n` connections, connection `i` from `from[i % from.len()]` to
    /// `targets[i % targets.len()]`.
    fn start(
        targets: Vec<std::net::SocketAddr>,
        from: Vec<std::net::Ipv4Addr>,
        n: usize,
    ) -> Strangers {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s2, o2) = (stop.clone(), opened.clone());
        let thread = std::thread::spawn(move || {
            use std::net::{SocketAddr, TcpStream};
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let connect = |i: usize, to: SocketAddr| -> Option<TcpStream> {
                let s = tokio::net::TcpSocket::new_v4().ok()?;
                s.bind((from[i % from.len()], 0).into()).ok()?;
                rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(1), s.connect(to))
                        .await
                        .ok()?
                        .ok()?
                        .into_std()
                        .ok()
                })
            };
            let mut held: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
            let deadline = Instant::now() + Duration::from_secs(180);
            while !s2.load(Ordering::SeqCst) && Instant::now() < deadline {
                let mut reopened = 0;
                for (i, slot) in held.iter_mut().enumerate() {
                    let alive = slot.as_ref().is_some_and(|c| {
                        c.set_nonblocking(true).is_ok()
                            && matches!(c.peek(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    if !alive && reopened < 100 {
                        reopened += 1;
                        *slot = connect(i, targets[i % targets.len()]);
                        if slot.is_some() {
                            o2.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Strangers {
            stop,
            opened,
            thread: Some(thread),
        }
    }

    /// Wait until `n` connections were opened in all (at most 60 s).
    async fn opened_at_least(&self, n: usize) {
        let t = Instant::now();
        while self.opened.load(Ordering::SeqCst) < n {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "only {} stranger connections opened",
                self.opened.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop; connections opened in all.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.opened.load(Ordering::SeqCst)
    }
}

impl Cluster {
    /// Member `i`'s conode port.
    fn peer_socket(&self, i: usize) -> std::net::SocketAddr {
        let a = &self.server(i).address;
        format!("{}:{}", a.host, a.port).parse().unwrap()
    }

    /// `n` appends through the leader, each answered and successful within 30 s.
    async fn append_n(&self, genesis: &SkipBlock, n: usize) {
        let mut target = genesis.hash.clone();
        for i in 1..=n {
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                client::append(self.server(0), &target, format!("block {i}").into_bytes()),
            )
            .await
            .expect("an append answers")
            .expect("an append succeeds while strangers hold connections");
            target = r.latest.unwrap().hash;
        }
    }
}

type Authenticated = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A connection from `from` to member `i`'s conode port that completed TLS and the hello
/// with `tls`'s key (one of a stranger's making), or why not.
async fn authenticate(
    tls: &conode::peer::PeerTls,
    from: std::net::Ipv4Addr,
    c: &Cluster,
    i: usize,
) -> Result<Authenticated, String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind((from, 0).into()).map_err(|e| e.to_string())?;
    let tcp = sock
        .connect(c.peer_socket(i))
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls.client_config(c.server(i).public)?);
    let name = rustls::pki_types::ServerName::try_from("conode").map_err(|e| e.to_string())?;
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let counters = conode::peer::Counters::default();
    let hello = conode::peer::PeerHello {
        public: tls.public().to_vec(),
        address: format!("tls://{from}:1"),
    };
    conode::peer::write_frame(&mut stream, &hello.encode_to_vec(), &counters)
        .await
        .map_err(|e| e.to_string())?;
    let welcome = conode::peer::read_frame(&mut stream, &counters)
        .await
        .map_err(|e| e.to_string())?;
    let welcome = conode::peer::PeerWelcome::decode(&welcome[..]).map_err(|e| e.to_string())?;
    if welcome.error.is_empty() {
        Ok(stream)
    } else {
        Err(welcome.error)
    }
}

/// `n` loopback addresses from 127.0.0.`first` on (the members are 127.0.0.2 to 5).
fn stranger_addresses(first: u8, n: u8) -> Vec<std::net::Ipv4Addr> {
    (0..n)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 0, first + i))
        .collect()
}

/// Half-open connections from strangers against two followers' conode ports (1,100 each,
/// from 20 addresses, reopened as they are closed, as an attacker would) no longer make
/// appends fail: handshakes take slots apart from authenticated connections, the roster
/// members' addresses have their own, one address has few, and the refusals are logged
/// once per interval with their count (each follower used to log 1.4 million identical
/// lines while appends failed with "only 2 of 4 members signed"). The leader restarts
/// once the strangers are in place, so it needs new connections.
#[tokio::test]
async fn appends_go_on_while_strangers_hold_half_open_connections_to_the_followers() {
    let captured = Captured::default();
    let _log = captured.install();
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    let strangers = Strangers::start(
        vec![c.peer_socket(1), c.peer_socket(2)],
        stranger_addresses(100, 20),
        2200,
    );
    strangers.opened_at_least(2200).await;
    c.restart(0).await;
    c.append_n(&g, 5).await;
    captured.assert_bounded(strangers.stop());
}

/// A follower restarted while strangers hold half-open connections against it knows the
/// roster members' addresses at once (from the rosters it stores), so the leader's new
/// connections get the members' handshake slots: appends go on. Before, the known
/// addresses were only those that authenticated since the start, none after a restart:
/// the leader competed with the strangers for their slots, and lost.
#[tokio::test]
async fn restarted_followers_know_the_members_while_strangers_hold_half_open_connections() {
    let captured = Captured::default();
    let _log = captured.install();
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    let strangers = Strangers::start(
        vec![c.peer_socket(1), c.peer_socket(2)],
        stranger_addresses(100, 20),
        2200,
    );
    strangers.opened_at_least(2200).await;
    c.restart(1).await;
    c.restart(2).await;
    // The strangers are back against the restarted followers before the appends.
    let opened = strangers.opened.load(Ordering::SeqCst);
    strangers.opened_at_least(opened + 1000).await;
    c.append_n(&g, 5).await;
    captured.assert_bounded(strangers.stop());
}

/// A stranger that completes a handshake with a key of its own making (anybody can) is
/// not a roster member: its address gets no member's slots. Before, any authenticated
/// address became "known", and known addresses had no per-address limit: such a
/// stranger then held every known handshake slot from that one address and the leader,
/// restarted, could not reach the followers.
#[tokio::test]
async fn a_stranger_with_a_key_of_its_own_gets_no_member_slots() {
    let captured = Captured::default();
    let _log = captured.install();
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    // The stranger authenticates to both followers from its address, with its own key,
    // and is served.
    let stranger_keys = conode::keys::KeyPair::generate().unwrap();
    let tls = conode::peer::PeerTls::new(&stranger_keys).unwrap();
    for i in [1, 2] {
        let mut stream = authenticate(&tls, [127, 0, 0, 100].into(), &c, i)
            .await
            .expect("a stranger's own key authenticates");
        let counters = conode::peer::Counters::default();
        let ping = conode::peer::PeerRequest {
            service: "Peer".into(),
            method: "Ping".into(),
            payload: conode::peer::Ping { nonce: vec![7] }.encode_to_vec(),
        };
        conode::peer::write_frame(&mut stream, &ping.encode_to_vec(), &counters)
            .await
            .unwrap();
        let reply = conode::peer::read_frame(&mut stream, &counters)
            .await
            .unwrap();
        let reply = conode::peer::PeerReply::decode(&reply[..]).unwrap();
        let pong = conode::peer::Pong::decode(&reply.payload[..]).unwrap();
        assert_eq!(pong.caller, stranger_keys.public_bytes(), "{}", reply.error);
    }
    // Then it holds many half-open connections from that one address.
    let strangers = Strangers::start(
        vec![c.peer_socket(1), c.peer_socket(2)],
        stranger_addresses(100, 1),
        300,
    );
    strangers.opened_at_least(600).await;
    c.restart(0).await;
    c.append_n(&g, 5).await;
    captured.assert_bounded(strangers.stop());
}

/// Strangers that complete the handshake with a key of their own (1,100 connections per
/// follower, from 20 addresses, held open) take only the slots of keys that are no
/// member's (`MAX_OTHER_PEER_CONNECTIONS`): the restarted leader's connections still get
/// the members'. Before, every authenticated connection took one of the same 1,024, and
/// the strangers took them all.
#[tokio::test]
async fn strangers_authenticated_with_their_own_keys_cannot_take_the_members_slots() {
    let captured = Captured::default();
    let _log = captured.install();
    let mut c = Cluster::start(4).await;
    let g = c.create(b"genesis").await;
    let tls = conode::peer::PeerTls::new(&conode::keys::KeyPair::generate().unwrap()).unwrap();
    let from = stranger_addresses(100, 20);
    let mut held = Vec::new();
    for n in 0..2200 {
        if let Ok(s) = authenticate(&tls, from[n % from.len()], &c, 1 + n % 2).await {
            held.push(s);
        }
    }
    // Each completed its handshake (a follower closes those past the slots after it).
    assert_eq!(held.len(), 2200);
    c.restart(0).await;
    c.append_n(&g, 5).await;
    drop(held);
    captured.assert_bounded(2200);
}
