//! Bad input on the conode-to-conode port of the skipchain service. The test plays the
//! leader (roster[0]) of a 4-member roster whose three followers are real in-process
//! conodes, and sends them forged, replayed and malformed blocks. Each is refused with
//! a clear reason, nothing is stored, and the follower keeps serving.

mod common;

use std::sync::Arc;

use common::TestNode;
use conode::config::{Address, Roster, Scheme};
use conode::keys::KeyPair;
use conode::peer::{Counters, PeerConn, PeerTls};
use conode::skipchain::block::{self, ByzcoinSig, ForwardLink, SkipBlock};
use conode::skipchain::{client, PeerSign, PeerSignReply, PeerStore, PeerStoreSigned};
use prost::Message;

struct Fixture {
    keys: Vec<KeyPair>,
    roster: Roster,
    nodes: Vec<TestNode>,
    servers: Vec<conode::server::Server>,
    blocks: Vec<SkipBlock>,
}

fn leader_address(port: u16) -> Address {
    Address {
        scheme: Scheme::Tls,
        host: "127.0.0.1".into(),
        port,
    }
}

impl Fixture {
    /// Roster: [the test (leader), node1, node2, node3]; the followers hold the genesis.
    async fn new() -> Fixture {
        let nodes: Vec<TestNode> = (1..4).map(|i| TestNode::new(&format!("f{i}"))).collect();
        let lead = KeyPair::generate().unwrap();
        let mut leader_cfg = conode::config::PrivateConfig::new(
            lead.clone(),
            leader_address(common::free_port_pair()),
            "test leader".into(),
        );
        leader_cfg.listen_address = "127.0.0.1".into();
        let mut servers_toml = vec![leader_cfg.server_toml()];
        servers_toml.extend(nodes.iter().map(|n| n.cfg.server_toml()));
        let roster = Roster {
            servers: servers_toml,
        };
        let mut keys = vec![lead];
        keys.extend(nodes.iter().map(|n| n.cfg.keys.clone()));
        let mut servers = Vec::new();
        for n in &nodes {
            servers.push(n.start().await);
        }
        let mut g = SkipBlock {
            index: 0,
            height: 2,
            max_height: 2,
            base_height: 2,
            backlinks: vec![vec![1; 32]],
            data: b"genesis".to_vec(),
            roster: Some(block::roster_from_config(&roster)),
            signature_scheme: block::SCHEME_ED25519,
            ..Default::default()
        };
        g.hash = block::block_hash(&g).to_vec();
        let f = Fixture {
            keys,
            roster,
            nodes,
            servers,
            blocks: vec![g.clone()],
        };
        for i in 1..4 {
            f.call(0, i, "Genesis", store_msg(&g, vec![]))
                .await
                .expect("genesis accepted");
        }
        f
    }

    /// Send `method` to follower `to` (1..=3) as member `as_member`.
    async fn call(
        &self,
        as_member: usize,
        to: usize,
        method: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        self.call_as(&self.keys[as_member], to, method, payload)
            .await
    }

    async fn call_as(
        &self,
        keys: &KeyPair,
        to: usize,
        method: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let tls = PeerTls::new(keys).unwrap();
        let s = &self.roster.servers[to];
        let mut c = PeerConn::dial(
            &tls,
            &self.roster.servers[0].address,
            &s.address,
            s.public,
            Arc::new(Counters::default()),
        )
        .await
        .map_err(|e| e.to_string())?;
        c.request("Skipchain", method, payload)
            .await
            .map_err(|e| e.to_string())
    }

    /// The next valid block after the ones held, not yet signed.
    fn next_block(&self, data: &[u8]) -> SkipBlock {
        let index = self.blocks.len() as u32;
        let g = &self.blocks[0];
        let height = block::height_of(index, g.base_height, g.max_height);
        let backlinks = (0..height as u32)
            .map(|h| {
                let i = block::backlink_index(index, g.base_height, h).unwrap();
                self.blocks[i as usize].hash.clone()
            })
            .collect();
        let mut b = SkipBlock {
            index: index as i32,
            height,
            max_height: g.max_height,
            base_height: g.base_height,
            backlinks,
            genesis: g.hash.clone(),
            data: data.to_vec(),
            roster: g.roster.clone(),
            signature_scheme: block::SCHEME_ED25519,
            ..Default::default()
        };
        b.hash = block::block_hash(&b).to_vec();
        b
    }

    /// Forward links to `b`, signed by `signers` (positions in the roster, with `keys`).
    fn links(&self, b: &SkipBlock, keys: &[KeyPair], signers: &[usize]) -> Vec<ForwardLink> {
        let to: [u8; 32] = b.hash.clone().try_into().unwrap();
        b.backlinks
            .iter()
            .map(|from| {
                let from: [u8; 32] = from.clone().try_into().unwrap();
                let msg = block::link_hash(&from, &to);
                let sigs = signers.iter().map(|i| (*i, keys[*i].sign(&msg))).collect();
                ForwardLink {
                    from: from.to_vec(),
                    to: to.to_vec(),
                    new_roster: None,
                    signature: Some(ByzcoinSig {
                        msg: msg.to_vec(),
                        sig: block::combine_signatures(4, sigs),
                    }),
                }
            })
            .collect()
    }

    /// Block `index` as follower `i` holds it, if it does.
    async fn held(&self, i: usize, index: i32) -> Option<Vec<u8>> {
        client::get_by_index(&self.roster.servers[i], &self.blocks[0].hash, index)
            .await
            .ok()
            .map(|b| b.hash)
    }

    /// Append a valid block on every follower (sign round, then store).
    async fn append_valid(&mut self, data: &[u8]) {
        let b = self.next_block(data);
        for i in 1..4 {
            let r = self.call(0, i, "Sign", sign_msg(&b)).await.expect("signs");
            let r = PeerSignReply::decode(&r[..]).unwrap();
            assert_eq!(r.sigs.len(), b.backlinks.len());
        }
        let links = self.links(&b, &self.keys.clone(), &[0, 1, 2, 3]);
        for i in 1..4 {
            self.call(0, i, "Store", store_msg(&b, links.clone()))
                .await
                .expect("stores");
        }
        self.blocks.push(b);
    }
}

fn sign_msg(b: &SkipBlock) -> Vec<u8> {
    PeerSign {
        block: Some(b.clone()),
    }
    .encode_to_vec()
}

fn store_msg(b: &SkipBlock, links: Vec<ForwardLink>) -> Vec<u8> {
    PeerStore {
        block: Some(b.clone()),
        links,
    }
    .encode_to_vec()
}

fn store_signed_msg(b: &SkipBlock, links: Vec<ForwardLink>) -> Vec<u8> {
    PeerStoreSigned {
        genesis: b.genesis.clone(),
        hash: b.hash.clone(),
        links,
    }
    .encode_to_vec()
}

fn rehash(mut b: SkipBlock) -> SkipBlock {
    b.hash = block::block_hash(&b).to_vec();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_refuse_forged_replayed_and_malformed_blocks() {
    let mut f = Fixture::new().await;
    f.append_valid(b"one").await;
    f.append_valid(b"two").await;
    let b = f.next_block(b"three");
    let all = f.keys.clone();

    // Each case: (what, method, payload, as member, expected reason).
    let mut wrong_backlink = b.clone();
    wrong_backlink.backlinks[0] = f.blocks[0].hash.clone();
    let wrong_backlink = rehash(wrong_backlink);
    let mut wrong_hash = b.clone();
    wrong_hash.data = b"tampered".to_vec();
    let mut forged = f.links(&b, &all, &[0, 1, 2]);
    forged[0].signature.as_mut().unwrap().sig[10] ^= 0x40;
    let mut unsigned = f.links(&b, &all, &[0, 1, 2]);
    unsigned[0].signature = None;
    let mut outsider_keys = all.clone();
    outsider_keys[2] = KeyPair::generate().unwrap();
    let outsider = f.links(&b, &outsider_keys, &[0, 1, 2]);
    let too_few = f.links(&b, &all, &[0, 1]);
    let mut big = b.clone();
    big.data = vec![0; block::MAX_DATA + 1];
    let big = rehash(big);
    let mut other_roster = b.clone();
    other_roster.roster.as_mut().unwrap().list[3].address = "tls://127.0.0.9:1".into();
    let other_roster = rehash(other_roster);

    let cases: Vec<(&str, &str, Vec<u8>, usize, &str)> = vec![
        (
            "wrong backlink",
            "Sign",
            sign_msg(&wrong_backlink),
            0,
            "wrong backlink at level 0",
        ),
        (
            "wrong hash",
            "Sign",
            sign_msg(&wrong_hash),
            0,
            "block hash mismatch",
        ),
        (
            "proposed by a non-leader",
            "Sign",
            sign_msg(&b),
            2,
            "only the leader",
        ),
        (
            "replayed old block (sign)",
            "Sign",
            sign_msg(&f.blocks[2]),
            0,
            "block 2 already exists",
        ),
        (
            "data over the limit",
            "Sign",
            sign_msg(&big),
            0,
            "the limit is 4194304",
        ),
        (
            "roster changed",
            "Sign",
            sign_msg(&other_roster),
            0,
            "roster changes are not supported",
        ),
        (
            "forged signature",
            "Store",
            store_msg(&b, forged),
            0,
            "invalid signature of roster member",
        ),
        (
            "missing signature",
            "Store",
            store_msg(&b, unsigned),
            0,
            "has no signature",
        ),
        (
            "non-member signature",
            "Store",
            store_msg(&b, outsider),
            0,
            "invalid signature of roster member 2",
        ),
        (
            "below the threshold",
            "Store",
            store_msg(&b, too_few),
            0,
            "2 of 4 signatures; 3 needed",
        ),
        (
            "no links",
            "Store",
            store_msg(&b, vec![]),
            0,
            "comes with 0 forward links",
        ),
        (
            "wrong hash (store)",
            "Store",
            store_msg(&wrong_hash, f.links(&b, &all, &[0, 1, 2, 3])),
            0,
            "block hash mismatch",
        ),
        (
            "replayed old block (store)",
            "Store",
            store_msg(&f.blocks[2], f.links(&f.blocks[2], &all, &[0, 1, 2, 3])),
            0,
            "already hold block 2",
        ),
        (
            "malformed message",
            "Sign",
            vec![0xff, 0xff, 0xff],
            0,
            "malformed Sign",
        ),
        (
            "malformed store",
            "Store",
            vec![0x0a, 0x05, 1],
            0,
            "malformed Store",
        ),
        (
            "genesis from a non-leader",
            "Genesis",
            store_msg(&f.blocks[0], vec![]),
            1,
            "only from the first server",
        ),
        (
            "genesis replayed",
            "Genesis",
            store_msg(&f.blocks[0], vec![]),
            0,
            "already hold chain",
        ),
    ];
    for (what, method, payload, member, reason) in cases {
        for to in 1..4 {
            if member == to {
                continue;
            }
            let e = f
                .call(member, to, method, payload.clone())
                .await
                .expect_err(what);
            assert!(e.contains(reason), "{what}: to {to}: {e}");
            assert_eq!(f.held(to, 3).await, None, "{what}: block 3 stored on {to}");
        }
    }
    // A client of the peer port that is not in the roster cannot propose either.
    let stranger = KeyPair::generate().unwrap();
    let e = f
        .call_as(&stranger, 1, "Sign", sign_msg(&b))
        .await
        .unwrap_err();
    assert!(e.contains("only the leader"), "{e}");

    // A conflicting block at an index already held (another block 2).
    let mut fork = f.blocks[2].clone();
    fork.data = b"fork".to_vec();
    let fork = rehash(fork);
    let e = f
        .call(
            0,
            1,
            "Store",
            store_msg(&fork, f.links(&fork, &all, &[0, 1, 2, 3])),
        )
        .await
        .unwrap_err();
    assert!(e.contains("conflicting block 2"), "{e}");
    assert_eq!(f.held(1, 2).await, Some(f.blocks[2].hash.clone()));

    // Still serving: the valid block 3 goes through on every follower.
    f.append_valid(b"three").await;
    for to in 1..4 {
        assert_eq!(f.held(to, 3).await, Some(f.blocks[3].hash.clone()));
    }
    for s in f.servers.drain(..) {
        s.stop().await;
    }
    drop(f.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_blocks_fetches_them_before_signing() {
    let mut f = Fixture::new().await;
    f.append_valid(b"one").await;
    // Block 2 is stored on followers 2 and 3 only; follower 1 misses it.
    let b2 = f.next_block(b"two");
    let links = f.links(&b2, &f.keys.clone(), &[0, 1, 2, 3]);
    for i in 2..4 {
        f.call(0, i, "Store", store_msg(&b2, links.clone()))
            .await
            .unwrap();
    }
    f.blocks.push(b2.clone());
    assert_eq!(f.held(1, 2).await, None);
    // Block 3 arrives at follower 1 through member 2 (which holds block 2): follower 1
    // fetches block 2 from it, checks it, and stores both.
    let b3 = f.next_block(b"three");
    let links3 = f.links(&b3, &f.keys.clone(), &[0, 1, 2, 3]);
    f.call(2, 1, "Store", store_msg(&b3, links3)).await.unwrap();
    assert_eq!(f.held(1, 2).await, Some(b2.hash.clone()));
    assert_eq!(f.held(1, 3).await, Some(b3.hash.clone()));
    for s in f.servers.drain(..) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_signed_stores_the_signed_block_only_with_valid_links_and_others_fetch_it() {
    let mut f = Fixture::new().await;
    f.append_valid(b"one").await;
    let b = f.next_block(b"two");
    let all = f.keys.clone();
    // Followers 1 and 2 sign block 2; follower 3 is not asked.
    for i in 1..3 {
        f.call(0, i, "Sign", sign_msg(&b)).await.expect("signs");
    }
    let mut forged = f.links(&b, &all, &[0, 1, 2]);
    forged[0].signature.as_mut().unwrap().sig[64 + 10] ^= 0x40;
    let mut outsider_keys = all.clone();
    outsider_keys[2] = KeyPair::generate().unwrap();
    let mut elsewhere = f.links(&b, &all, &[0, 1, 2]);
    elsewhere[1].to = f.blocks[1].hash.clone();
    let mut wrong_target = b.clone();
    wrong_target.hash = f.blocks[1].hash.clone();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            // Member 1's signature, altered: follower 1 does not take it for its own.
            "forged signature",
            store_signed_msg(&b, forged),
            "invalid signature of roster member 1",
        ),
        (
            "non-member signature",
            store_signed_msg(&b, f.links(&b, &outsider_keys, &[0, 1, 2])),
            "invalid signature of roster member 2",
        ),
        (
            "below the threshold",
            store_signed_msg(&b, f.links(&b, &all, &[0, 1])),
            "2 of 4 signatures; 3 needed",
        ),
        (
            "no links",
            store_signed_msg(&b, vec![]),
            "comes with 0 forward links",
        ),
        (
            "links to another block",
            store_signed_msg(&b, elsewhere),
            "points to",
        ),
        (
            "a block held already",
            store_signed_msg(&wrong_target, f.links(&b, &all, &[0, 1, 2])),
            "already hold block",
        ),
        ("malformed", vec![0x0a, 0x05, 1], "malformed StoreSigned"),
    ];
    for (what, payload, reason) in cases {
        for to in 1..3 {
            let e = f
                .call(0, to, "StoreSigned", payload.clone())
                .await
                .expect_err(what);
            assert!(e.contains(reason), "{what}: to {to}: {e}");
            assert_eq!(f.held(to, 2).await, None, "{what}: block 2 stored on {to}");
        }
    }
    // The signed block is still kept: valid links store it, without the block.
    let links = f.links(&b, &all, &[0, 1, 2]);
    for to in 1..3 {
        f.call(0, to, "StoreSigned", store_signed_msg(&b, links.clone()))
            .await
            .expect("stores");
        assert_eq!(f.held(to, 2).await, Some(b.hash.clone()));
        let e = f
            .call(0, to, "StoreSigned", store_signed_msg(&b, links.clone()))
            .await
            .unwrap_err();
        assert!(e.contains("already hold block"), "{e}");
    }
    // Follower 3 never signed block 2. It fetches the block from the sender: not from the
    // test leader, which does not listen, but from member 2, which holds it; and it
    // verifies it as any fetched block.
    let e = f
        .call(0, 3, "StoreSigned", store_signed_msg(&b, links.clone()))
        .await
        .unwrap_err();
    assert!(e.contains("cannot connect"), "{e}");
    assert_eq!(f.held(3, 2).await, None);
    f.call(2, 3, "StoreSigned", store_signed_msg(&b, links))
        .await
        .expect("fetched from member 2");
    assert_eq!(f.held(3, 2).await, Some(b.hash.clone()));
    for s in f.servers.drain(..) {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_of_the_next_block_is_answered_once_the_block_before_is_stored() {
    let mut f = Fixture::new().await;
    f.append_valid(b"one").await;
    let b2 = f.next_block(b"two");
    for i in 1..4 {
        f.call(0, i, "Sign", sign_msg(&b2)).await.expect("signs");
    }
    let links2 = f.links(&b2, &f.keys.clone(), &[0, 1, 2, 3]);
    f.blocks.push(b2.clone());
    let b3 = f.next_block(b"three");
    // Sign(3) reaches follower 1 before StoreSigned(2), on another connection: it waits
    // for it, signs block 3 on top of block 2, and answers once block 2 is durable there.
    let f = Arc::new(f);
    let early = {
        let (f, b3) = (f.clone(), b3.clone());
        tokio::spawn(async move { f.call(0, 1, "Sign", sign_msg(&b3)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!early.is_finished(), "Sign(3) did not wait for block 2");
    let store = {
        let (f, b2) = (f.clone(), b2.clone());
        tokio::spawn(async move {
            f.call(0, 1, "StoreSigned", store_signed_msg(&b2, links2))
                .await
        })
    };
    let r = early.await.unwrap().expect("signs block 3");
    assert_eq!(
        f.held(1, 2).await,
        Some(b2.hash.clone()),
        "signed before block 2 was stored"
    );
    assert_eq!(
        PeerSignReply::decode(&r[..]).unwrap().sigs.len(),
        b3.backlinks.len()
    );
    store.await.unwrap().expect("stores block 2");
    // Follower 2 never gets StoreSigned(2): after waiting, it tries to fetch block 2 from
    // the leader (which does not listen here) and refuses to sign block 3.
    let e = f.call(0, 2, "Sign", sign_msg(&b3)).await.unwrap_err();
    assert!(e.contains("does not follow the latest block 1"), "{e}");
    let mut f = Arc::into_inner(f).expect("no other reference");
    for s in f.servers.drain(..) {
        s.stop().await;
    }
}
