//! The skipchain service across a roster of in-process conodes on loopback addresses
//! 127.0.0.x: chains, followers, catch-up, and bad input on both ports.

mod common;

use std::time::{Duration, Instant};

use common::TestNode;
use conode::config::{Roster, ServerToml};
use conode::server::Server;
use conode::skipchain::block::{self, SkipBlock};
use conode::skipchain::client;
use prost::Message;

struct Cluster {
    nodes: Vec<TestNode>,
    servers: Vec<Option<Server>>,
    roster: Roster,
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
        let mut servers = Vec::new();
        for t in &nodes {
            servers.push(Some(t.start().await));
        }
        Cluster {
            nodes,
            servers,
            roster,
        }
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
        self.servers[i] = Some(self.nodes[i].start().await);
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
    // Status reports the blocks.
    let st = conode::client::status(c.server(0), Duration::from_secs(5))
        .await
        .unwrap();
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
    // It fetches blocks 4..=6 from the members (at start, or when they refuse to sign an
    // index they hold) and block 7 extends the real chain. (The client names the chain by
    // its genesis: this leader may not know block 6 yet.)
    let mut r = client::append(c.server(0), &g.hash, vec![7]).await;
    if let Err(e) = &r {
        assert!(e.contains("send the block again"), "{e}");
        r = client::append(c.server(0), &g.hash, vec![7]).await;
    }
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
