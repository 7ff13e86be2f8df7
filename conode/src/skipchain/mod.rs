//! The skipchain service: chains of blocks whose forward links are signed by at least
//! `n − (n−1)/3` members of the roster (Ed25519), stored in the conode's redb file.
//!
//! # Roles
//! The **leader** of a chain is `roster[0]` of its latest block. Clients send new blocks
//! to it (`Skipchain/StoreSkipBlock` on the WebSocket). The leader builds the block, asks
//! every other member to sign the forward links that will point to it (`Skipchain/Sign`
//! on the conode-to-conode port), and once it holds the threshold of valid signatures it
//! commits block and links in **one durable redb transaction**. Then it sends the block's
//! hash and its links to every other member (`Skipchain/StoreSigned`: each was asked to
//! sign that block, and kept it), and answers the client once the **same threshold of
//! members hold the block durably**, itself included: a member answers `StoreSigned` only
//! once the block is durable on its disk. Members beyond the threshold are not waited
//! for. Without the threshold within [`STORE_TIMEOUT`] (or once every member answered),
//! the client gets an error saying on how many members the block is durable; the block
//! stays committed here, and the members that lack it fetch it at their start-up or with
//! the next block. So an acknowledged block survives the loss of the leader's disk. A
//! genesis block (`Genesis`) is acknowledged by the same rule.
//!
//! A leader accepts no block on a chain before it has asked the other members, since it
//! started, for the blocks they hold beyond its own (at start-up, or at the first block
//! proposed), and enough of them answered that one holds every acknowledged block: a
//! leader restored from an older snapshot completes the chain instead of forking it.
//!
//! **Followers** check everything before they sign or store: the sender is the leader
//! (for `Sign`), index, heights and backlinks against their own copy of the chain, the
//! roster is unchanged, the hash; for `Store` and `StoreSigned` also every forward link's
//! signatures against the roster of the block it leaves from. A follower keeps the last
//! block it signed per chain, so `StoreSigned` stores it after checking the links (its
//! own signature in them is compared byte for byte instead of verified); one that did
//! not keep it (it refused to sign, or restarted) fetches it. A follower that lacks
//! blocks (it was down, or just restarted) fetches them (`Skipchain/GetBlocks`) from the
//! member that contacted it, and at start-up from the members of each chain it holds,
//! leader first. Fetched blocks are verified the same way, link by link, from the last
//! block it holds. `Store` (the block itself and its links) is still served.
//!
//! # Durability and pipelining
//! A follower answers `StoreSigned` (and `Store`) only once the block is durable, and
//! only durable blocks are visible in its database. Between its check of the links and
//! the end of its commit, the block is *checked*: the `Sign` of the next block may be
//! checked and signed on top of it meanwhile, but is answered only once it is durable.
//! So once block k+1 is signed, block k is on the disks of the followers that signed
//! k+1; but a follower's work on k+1 does not wait for its fsync of k (the leader's
//! next block may be proposed while it waits for the stores of k). A `Sign` that arrives
//! before the `StoreSigned` of the block it follows waits for it (at most 1 s,
//! `STORE_WAIT`), then fetches that block instead.
//!
//! Members reach each other only at the `Address` written in the roster, resolved at
//! each dial, so moving an address to another host with the same identity and data is
//! transparent to them. A member keeps two connections to each other member, each in
//! order: one for `Sign`, one for the rest.
//!
//! # Limits
//! Block data: at most [`block::MAX_DATA`] (4 MiB). Rosters cannot change (a block with
//! another roster than its predecessor is refused). Replies that return several blocks
//! stop after [`MAX_REPLY_BYTES`].

pub mod block;
pub mod client;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::config::Address;
use crate::db::Db;
use crate::keys::{self, KeyPair};
use crate::peer::{Counters, Members, PeerConn, PeerError, PeerHandler, PeerTls};
use crate::proto::untag_point;
use crate::ws::{BoxFuture, Service};
use block::{
    ByzcoinSig, ForwardLink, GetAllSkipChainIDsReply, GetSingleBlock, GetSingleBlockByIndex,
    GetSingleBlockByIndexReply, GetUpdateChain, GetUpdateChainReply, SkipBlock, StoreSkipBlock,
    StoreSkipBlockReply,
};
use store::{Put, View};

/// Replies carrying several blocks stop growing past this many bytes (at least one block
/// is always sent), to stay under the 10 MiB message limit.
pub const MAX_REPLY_BYTES: usize = 8 << 20;
/// How long the leader waits for the followers' signatures.
pub const SIGN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the leader, its own commit durable, waits for enough members to answer that
/// they hold the block durably too before it tells the client the block is not
/// acknowledged.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one member at most; propagation beyond it is dropped (the member
/// catches up later).
const QUEUE: usize = 1024;
/// How long Status reuses the stored-bytes figure (it reads every page).
const BYTES_TTL: Duration = Duration::from_secs(10);
/// How a follower says it holds the proposed index already.
const ALREADY_EXISTS: &str = "already exists";
/// How a member answers a store of a block (or genesis) it holds already: durably, as
/// only durable blocks are visible in its database.
const ALREADY_HELD: &str = "already hold ";
/// After a failed dial, requests to that member fail at once for this long (doubling up
/// to [`MAX_BACKOFF`]), so one dead member does not slow every block.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a follower's `Sign` waits for the `StoreSigned` of the block before it (sent
/// earlier, on another connection) before fetching that block instead.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// Data of the blocks a follower keeps after signing them, at most (one per chain; past
/// it the others are dropped, and their `StoreSigned` fetches the block instead).
const KEPT_BYTES: usize = 64 << 20;

// ---------------------------------------------------------------------------------------
// Conode-to-conode messages (service `Skipchain`)

/// `Sign`: the leader proposes `block`; the reply signs its forward links.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerSign {
    #[prost(message, optional, tag = "1")]
    pub block: Option<SkipBlock>,
}

/// One signature per level of the proposed block, on `hash(backlink[h] ‖ block.hash)`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerSignReply {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub sigs: Vec<Vec<u8>>,
}

/// `Store`: a committed block and the forward links pointing to it (`links[h]` leaves
/// from `backlinks[h]`). `Genesis` uses the same message with no links.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerStore {
    #[prost(message, optional, tag = "1")]
    pub block: Option<SkipBlock>,
    #[prost(message, repeated, tag = "2")]
    pub links: Vec<ForwardLink>,
}

/// `StoreSigned`: what `Store` says, to a member that was asked to sign the block: it kept
/// the block it signed, so the block is named by its hash instead of sent again. A member
/// that did not keep it (it refused to sign, restarted, or dropped it) fetches it from the
/// sender (`GetBlocks`), who stored it before sending.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerStoreSigned {
    #[prost(bytes = "vec", tag = "1")]
    pub genesis: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub hash: Vec<u8>,
    /// `links[h]` leaves from the block's `backlinks[h]`.
    #[prost(message, repeated, tag = "3")]
    pub links: Vec<ForwardLink>,
}

/// `GetBlocks`: blocks of `genesis` from `from_index` on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerGetBlocks {
    #[prost(bytes = "vec", tag = "1")]
    pub genesis: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub from_index: u32,
}

/// A link on a block the requester already holds (index below `from_index`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkAt {
    #[prost(uint32, tag = "1")]
    pub level: u32,
    #[prost(message, optional, tag = "2")]
    pub link: Option<ForwardLink>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerBlocks {
    /// Forward links on blocks before `from_index` that point to `from_index` or later.
    #[prost(message, repeated, tag = "1")]
    pub older_links: Vec<LinkAt>,
    /// Blocks from `from_index`, in order, each with its forward links.
    #[prost(message, repeated, tag = "2")]
    pub blocks: Vec<SkipBlock>,
    /// The sender's latest index (more pages follow while it exceeds the last block).
    #[prost(uint32, tag = "3")]
    pub latest_index: u32,
}

// ---------------------------------------------------------------------------------------
// Per-member message queues

struct Job {
    addr: Address,
    method: &'static str,
    payload: Vec<u8>,
    reply: Option<oneshot::Sender<Result<Vec<u8>, String>>>,
}

/// Which of its two connections to a member a message takes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    /// `Sign`, so that it is read and checked while the member commits the previous
    /// block (`StoreSigned`), not after.
    Sign,
    /// Everything else, in order.
    Other,
}

/// A member's answer to a queued request.
type Answer = oneshot::Receiver<Result<Vec<u8>, String>>;

/// The queue of each member and lane.
type Queues = HashMap<([u8; 32], Lane), mpsc::Sender<Job>>;

/// How this node talks to other members.
#[derive(Clone)]
struct Dialer {
    tls: PeerTls,
    our_address: Address,
    counters: Arc<Counters>,
}

async fn member_worker(d: Dialer, key: [u8; 32], mut rx: mpsc::Receiver<Job>) {
    let mut conn: Option<(Address, PeerConn)> = None;
    let mut down_until: Option<Instant> = None;
    let mut backoff = MIN_BACKOFF;
    while let Some(job) = rx.recv().await {
        let mut result = Err(String::new());
        for attempt in 0..2 {
            if let Some(t) = down_until {
                if Instant::now() < t {
                    result = Err(format!(
                        "{} is unreachable; retrying in {:?}",
                        job.addr,
                        t - Instant::now()
                    ));
                    break;
                }
            }
            if conn.as_ref().is_none_or(|(a, _)| a != &job.addr) {
                match PeerConn::dial(&d.tls, &d.our_address, &job.addr, key, d.counters.clone())
                    .await
                {
                    Ok(c) => {
                        conn = Some((job.addr.clone(), c));
                        down_until = None;
                        backoff = MIN_BACKOFF;
                    }
                    Err(e) => {
                        down_until = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        result = Err(e.to_string());
                        break;
                    }
                }
            }
            let Some((_, c)) = conn.as_mut() else { break };
            match c
                .request("Skipchain", job.method, job.payload.clone())
                .await
            {
                Ok(r) => {
                    result = Ok(r);
                    break;
                }
                Err(PeerError::Remote(e)) => {
                    result = Err(e);
                    break;
                }
                // A pooled connection may have been closed by the other side (idle
                // timeout, restart): dial once more.
                Err(e) => {
                    conn = None;
                    result = Err(e.to_string());
                    if attempt == 1 {
                        break;
                    }
                }
            }
        }
        if let Some(r) = job.reply {
            let _ = r.send(result);
        } else if let Err(e) = result {
            tracing::debug!("skipchain: {} to {}: {e}", job.method, job.addr);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The service

pub struct Skipchain {
    db: Arc<Db>,
    keys: KeyPair,
    dialer: Dialer,
    chains: Mutex<HashMap<[u8; 32], Arc<Chain>>>,
    members: Mutex<Queues>,
    /// The Status figures that read every page, and when; and whether a thread is
    /// reading them again (Status never waits for it).
    bytes: crate::db::Refreshed<u64>,
    /// As a follower: the last block signed per chain, until it is stored.
    signed: Mutex<HashMap<[u8; 32], Signed>>,
    /// The members of the rosters of the chains stored here, for the conode port's
    /// priority ([`PeerHandler::members`]).
    roster_members: Arc<Members>,
    /// Blocks acknowledged as leader, and how long each took.
    metrics: Arc<crate::metrics::Metrics>,
}

/// Per chain: the lock that orders its checks and writes, and, as a follower, the block
/// whose commit is under way.
#[derive(Default)]
struct Chain {
    lock: tokio::sync::Mutex<Option<Committing>>,
    /// Set (under `lock`) once this conode asked enough members for the blocks they hold
    /// beyond its own since it started: the leader accepts no block before.
    synced: std::sync::atomic::AtomicBool,
    /// Woken when `StoreSigned` has checked a block and starts committing it.
    checked: tokio::sync::Notify,
    /// Woken when that commit is over (durable, or failed).
    stored: tokio::sync::Notify,
}

/// A block with a valid forward link to it, being committed (durably) by `StoreSigned`
/// after the lock was released: `Sign` of the next block may build on it meanwhile, and
/// answers once it is durable.
struct Committing {
    index: u32,
    hash: [u8; 32],
    /// The block without its data (what `check_successor` reads of a predecessor).
    head: SkipBlock,
}

/// A block this node verified and signed as a follower. Kept so that `StoreSigned` need
/// not carry it again, and so that our own signatures in its forward links are known
/// without verifying them.
struct Signed {
    block: SkipBlock,
    hash: [u8; 32],
    /// Our position in the roster.
    position: usize,
    /// Our signature per level, on `hash(backlinks[h] ‖ hash)`.
    sigs: Vec<[u8; 64]>,
}

fn decode<M: Message + Default>(b: &[u8], what: &str) -> Result<M, String> {
    M::decode(b).map_err(|e| format!("malformed {what}: {e}"))
}

fn member_addr(s: &crate::proto::ServerIdentity) -> Result<([u8; 32], Address), String> {
    let k = untag_point(&s.public).ok_or("roster key is not an Ed25519 point")?;
    Ok((k, Address::parse(&s.address)?))
}

impl Skipchain {
    pub fn new(
        db: Arc<Db>,
        keys: KeyPair,
        tls: PeerTls,
        our_address: Address,
        counters: Arc<Counters>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Skipchain> {
        let roster_members = Arc::new(Members::default());
        match stored_rosters(&db) {
            Ok(rosters) => {
                for r in &rosters {
                    roster_members.add(r.list.iter().filter_map(|s| member_addr(s).ok()));
                }
            }
            Err(e) => tracing::warn!(
                "skipchain: cannot read the stored rosters (their members get no priority on the conode port until their chains are stored again): {e}"
            ),
        }
        Arc::new(Skipchain {
            db,
            keys,
            dialer: Dialer {
                tls,
                our_address,
                counters,
            },
            chains: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            bytes: crate::db::Refreshed::new("chain-bytes", BYTES_TTL),
            signed: Mutex::new(HashMap::new()),
            metrics,
            roster_members,
        })
    }

    /// The members of `roster`, a stored chain's, are members from now on.
    fn note_roster(&self, roster: Option<&block::Roster>) {
        if let Some(r) = roster {
            self.roster_members
                .add(r.list.iter().filter_map(|s| member_addr(s).ok()));
        }
    }

    fn view(&self) -> Result<View, String> {
        View::new(&self.db.db())
    }

    /// Keep `s`, the block just signed for chain `genesis`, in place of the last one.
    fn keep_signed(&self, genesis: [u8; 32], s: Signed) {
        let mut m = self.signed.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&genesis);
        let bytes: usize = m.values().map(|k| k.block.data.len()).sum();
        if bytes + s.block.data.len() > KEPT_BYTES {
            m.clear();
        }
        m.insert(genesis, s);
    }

    /// The block of chain `genesis` signed here, if it is the one with `hash`.
    fn take_signed(&self, genesis: &[u8; 32], hash: &[u8; 32]) -> Option<Signed> {
        let mut m = self.signed.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(genesis).is_some_and(|s| s.hash == *hash) {
            m.remove(genesis)
        } else {
            None
        }
    }

    fn chain(&self, genesis: &[u8; 32]) -> Arc<Chain> {
        let mut l = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(*genesis).or_default().clone()
    }

    /// Whether `b` follows the block kept from our last `Sign` of its chain, which is not
    /// stored here yet: its `StoreSigned` is then on its way on the other connection.
    fn store_on_its_way(&self, genesis: &[u8; 32], b: &SkipBlock) -> Result<bool, String> {
        let kept = {
            let m = self.signed.lock().unwrap_or_else(|p| p.into_inner());
            m.get(genesis).map(|s| (s.block.index, s.hash))
        };
        let Some((index, hash)) = kept else {
            return Ok(false);
        };
        if index as i64 + 1 != b.index as i64 || b.backlinks.first() != Some(&hash.to_vec()) {
            return Ok(false);
        }
        let latest = self.view()?.latest(genesis)?;
        Ok(latest.is_some_and(|(i, _)| i as i64 + 1 == index as i64))
    }

    /// Run blocking database work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| format!("internal error: {e}"))?
    }

    /// Queue `method` for member `key` at `addr`; `wait` returns the reply.
    fn send(
        &self,
        key: [u8; 32],
        addr: Address,
        method: &'static str,
        payload: Vec<u8>,
        wait: bool,
    ) -> Option<oneshot::Receiver<Result<Vec<u8>, String>>> {
        let (tx, rx) = if wait {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let job = Job {
            addr,
            method,
            payload,
            reply: tx,
        };
        let lane = if method == "Sign" {
            Lane::Sign
        } else {
            Lane::Other
        };
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let q = m.entry((key, lane)).or_insert_with(|| {
            let (t, r) = mpsc::channel(QUEUE);
            tokio::spawn(member_worker(self.dialer.clone(), key, r));
            t
        });
        if let Err(e) = q.try_send(job) {
            tracing::warn!(
                "skipchain: queue to {} is full; dropping {method}",
                hex::encode(key)
            );
            let (mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j)) = e;
            if let Some(r) = j.reply {
                let _ = r.send(Err("queue full".into()));
            }
        }
        rx
    }

    /// Status `Skipblock` section.
    pub fn figures(&self) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        if let Ok(v) = self.view() {
            let (blocks, chains) = v.counts();
            // The stored bytes read every page of the blocks: a thread of its own reads
            // them again once they are BYTES_TTL old, and Status shows the last figure
            // (none yet in the first Status of a conode just started).
            let db = Arc::downgrade(&self.db);
            let bytes = self.bytes.get(move || {
                db.upgrade()
                    .and_then(|db| View::new(&db.db()).ok())
                    .map(|v| v.stored_bytes())
            });
            if let Some(b) = bytes {
                f.insert("Bytes".into(), b.to_string());
            }
            f.insert("Blocks".into(), blocks.to_string());
            f.insert("Chains".into(), chains.to_string());
        }
        f
    }

    // -----------------------------------------------------------------------------------
    // Client requests

    async fn store_skip_block(&self, req: StoreSkipBlock) -> Result<StoreSkipBlockReply, String> {
        let nb = req.new_block.ok_or("StoreSkipBlock has no new block")?;
        if nb.data.len() > block::MAX_DATA {
            return Err(format!(
                "block data is {} bytes; the limit is {}",
                nb.data.len(),
                block::MAX_DATA
            ));
        }
        let received = Instant::now();
        let genesis = req.target_skip_chain_id.is_empty();
        let r = if genesis {
            self.create_chain(nb).await
        } else {
            self.append(&req.target_skip_chain_id, nb).await
        };
        if r.is_ok() {
            self.metrics.block_acknowledged(genesis, received.elapsed());
        }
        r
    }

    async fn create_chain(&self, nb: SkipBlock) -> Result<StoreSkipBlockReply, String> {
        let roster = nb.roster.ok_or("a new chain needs a roster")?;
        let keys = block::roster_keys(&roster)?;
        if keys[0] != self.keys.public_bytes() {
            return Err(format!(
                "not the leader of this chain: a new chain is created by the first server of its roster ({})",
                roster.list[0].address
            ));
        }
        let base = if nb.base_height == 0 {
            block::DEFAULT_BASE_HEIGHT
        } else {
            nb.base_height
        };
        let max = if nb.max_height == 0 {
            block::DEFAULT_MAX_HEIGHT
        } else {
            nb.max_height
        };
        let mut random = [0u8; 32];
        getrandom::getrandom(&mut random).map_err(|e| format!("no randomness: {e}"))?;
        let mut g = SkipBlock {
            index: 0,
            height: max,
            max_height: max,
            base_height: base,
            backlinks: vec![random.to_vec()],
            data: nb.data,
            roster: Some(roster.clone()),
            signature_scheme: block::SCHEME_ED25519,
            ..Default::default()
        };
        g.hash = block::block_hash(&g).to_vec();
        block::check_genesis(&g)?;
        let stored = g.clone();
        // Nothing newer than a chain just made can exist elsewhere.
        let chain = self.chain(&block::hash32(&g.hash, "genesis hash")?);
        let guard = chain.lock.lock().await;
        self.blocking(move |db| store::commit(db, &[Put::Block(stored)]))
            .await?;
        self.note_roster(Some(&roster));
        chain.synced.store(true, Ordering::Release);
        drop(guard);
        let msg = PeerStore {
            block: Some(g.clone()),
            links: Vec::new(),
        }
        .encode_to_vec();
        let replies = self.send_to_others(&roster, "Genesis", &msg)?;
        self.until_durable(&g, &roster, replies).await?;
        tracing::info!(
            "skipchain: created chain {} with {} members",
            hex::encode(&g.hash),
            roster.list.len()
        );
        Ok(StoreSkipBlockReply {
            previous: None,
            latest: Some(g),
        })
    }

    async fn append(&self, target: &[u8], nb: SkipBlock) -> Result<StoreSkipBlockReply, String> {
        let view = self.view()?;
        let tb = view.block_bare(target)?.ok_or("no such block")?;
        let genesis = block::chain_id(&tb)?;
        drop(view);
        let chain = self.chain(&genesis);
        let guard = chain.lock.lock().await;
        if !chain.synced.load(Ordering::Acquire) {
            // Since this conode started, no member was asked yet for the blocks it holds
            // beyond ours (the start-up sync has not reached this chain, or not enough
            // members answered it): ask them now, before building on our latest block.
            self.sync_chain_locked(&chain, &genesis).await?;
        }
        let view = self.view()?;
        let (latest_index, latest_hash) = view
            .latest(&genesis)?
            .ok_or("database: chain without a latest block")?;
        // The latest block has no forward links yet (nothing follows it), and clients
        // usually name it as the target: then it is decoded already.
        let mut latest = if tb.hash[..] == latest_hash[..] {
            tb
        } else {
            view.block_bare(&latest_hash)?
                .ok_or("database: the latest block is missing")?
        };
        if latest.index as i64 != latest_index as i64 {
            return Err(format!(
                "database: the latest block of chain {} has index {}, not {latest_index}",
                block::short(&genesis),
                latest.index
            ));
        }
        let roster = latest.roster.clone().ok_or("latest block has no roster")?;
        let keys = block::roster_keys(&roster)?;
        if keys[0] != self.keys.public_bytes() {
            return Err(format!(
                "not the leader of this chain: send blocks to {}",
                roster.list[0].address
            ));
        }
        if nb.index != 0 && nb.index != latest.index + 1 {
            return Err(format!(
                "block index {} is not the next one: the chain is at block {}",
                nb.index, latest.index
            ));
        }
        let index = latest
            .index
            .checked_add(1)
            .ok_or("the chain is at its last possible index")? as u32;
        let (base, max) = (latest.base_height, latest.max_height);
        let height = block::height_of(index, base, max);
        let mut backlinks = Vec::with_capacity(height as usize);
        for h in 0..height as u32 {
            let bi = block::backlink_index(index, base, h).ok_or("backlink out of range")?;
            let bh = if bi == latest_index {
                latest_hash
            } else {
                view.hash_at(&genesis, bi)?
                    .ok_or_else(|| format!("database: block {bi} of the chain is missing"))?
            };
            backlinks.push(bh.to_vec());
        }
        drop(view);
        let mut b = SkipBlock {
            index: index as i32,
            height,
            max_height: max,
            base_height: base,
            backlinks,
            genesis: genesis.to_vec(),
            data: nb.data,
            roster: Some(roster.clone()),
            signature_scheme: block::SCHEME_ED25519,
            ..Default::default()
        };
        let hash = block::block_hash(&b);
        b.hash = hash.to_vec();
        let msgs: Vec<[u8; 32]> = b
            .backlinks
            .iter()
            .map(|f| block::hash32(f, "backlink").map(|f| block::link_hash(&f, &hash)))
            .collect::<Result<_, _>>()?;

        // Collect signatures: the followers' until the threshold, and ours while they
        // work.
        let n = keys.len();
        let need = block::threshold(n);
        let proposal = PeerSign { block: Some(b) };
        let payload = proposal.encode_to_vec();
        let b = proposal
            .block
            .ok_or("internal: the proposal lost its block")?;
        let mut pending = FuturesUnordered::new();
        for (i, s) in roster.list.iter().enumerate().skip(1) {
            let (k, a) = member_addr(s)?;
            if let Some(rx) = self.send(k, a, "Sign", payload.clone(), true) {
                pending.push(async move { (i, rx.await) });
            }
        }
        let mut per_level: Vec<Vec<(usize, [u8; 64])>> =
            msgs.iter().map(|m| vec![(0, self.keys.sign(m))]).collect();
        let mut signers = 1;
        let mut errors = Vec::new();
        let deadline = tokio::time::sleep(SIGN_TIMEOUT);
        tokio::pin!(deadline);
        while signers < need {
            let (i, r) = tokio::select! {
                r = pending.next() => match r { Some(r) => r, None => break },
                _ = &mut deadline => { errors.push("timed out".to_string()); break }
            };
            let reply = match r {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    errors.push(format!("{}: {e}", roster.list[i].address));
                    continue;
                }
                Err(_) => continue,
            };
            match check_sign_reply(&reply, &keys[i], &msgs) {
                Ok(sigs) => {
                    for (lvl, s) in sigs.into_iter().enumerate() {
                        per_level[lvl].push((i, s));
                    }
                    signers += 1;
                }
                Err(e) => errors.push(format!("{}: {e}", roster.list[i].address)),
            }
        }
        if signers < need {
            drop(pending);
            // Members that hold this index already: this leader is behind (e.g. it was
            // restored from an older backup). Fetch what they hold so the next request
            // extends the real chain instead of forking it.
            if errors.iter().any(|e| e.contains(ALREADY_EXISTS)) {
                let mut fetched = 0;
                for m in &roster.list[1..] {
                    match self.catch_up_locked(&genesis, m).await {
                        Ok(k) => fetched += k,
                        Err(e) => tracing::info!("skipchain: catching up from {}: {e}", m.address),
                    }
                }
                if fetched > 0 {
                    return Err(format!(
                        "this leader was behind the other members (restored from an older backup?): it fetched {fetched} blocks from them; send the block again"
                    ));
                }
            }
            // The close reason a client sees is at most 123 bytes: name the failing
            // members first, and log the details.
            tracing::warn!(
                "skipchain: block {index} of {}: only {signers} of {n} signed: {}",
                block::short(&genesis),
                errors.join("; ")
            );
            let failed: Vec<&str> = errors
                .iter()
                .filter_map(|e| {
                    e.split_once(": ")
                        .map(|(a, _)| a.trim_start_matches("tls://"))
                })
                .collect();
            return Err(format!(
                "only {signers} of {n} members signed block {index} ({need} needed); failed: {} (see the leader's log)",
                failed.join(", ")
            ));
        }
        let links: Vec<ForwardLink> = per_level
            .into_iter()
            .zip(&msgs)
            .zip(&b.backlinks)
            .map(|((sigs, msg), from)| ForwardLink {
                from: from.clone(),
                to: hash.to_vec(),
                new_roster: None,
                signature: Some(ByzcoinSig {
                    msg: msg.to_vec(),
                    sig: block::combine_signatures(n, sigs),
                }),
            })
            .collect();
        let mut puts = vec![Put::Block(b.clone())];
        for (h, l) in links.iter().enumerate() {
            puts.push(Put::Link {
                level: h as u32,
                link: l.clone(),
            });
        }
        self.blocking(move |db| store::commit(db, &puts)).await?;
        // Durable here and signed: propagate, and acknowledge once a threshold of members
        // (this one included) hold it durably. Every follower was asked to sign this
        // block, so it is named by its hash; on each connection the `Sign` went first.
        // The next block may be proposed meanwhile: a follower signs it only once this
        // one is durable there.
        let msg = PeerStoreSigned {
            genesis: genesis.to_vec(),
            hash: hash.to_vec(),
            links: links.clone(),
        }
        .encode_to_vec();
        let replies = self.send_to_others(&roster, "StoreSigned", &msg)?;
        drop(guard);
        self.until_durable(&b, &roster, replies).await?;
        if latest.forward.is_empty() {
            latest.forward.push(links[0].clone());
        }
        Ok(StoreSkipBlockReply {
            previous: Some(latest),
            latest: Some(b),
        })
    }

    /// Queue `msg` (a store of a block durable here) for every member of `roster` but
    /// this one (the first), each with a channel for its answer.
    fn send_to_others(
        &self,
        roster: &block::Roster,
        method: &'static str,
        msg: &[u8],
    ) -> Result<Vec<(usize, Answer)>, String> {
        let mut out = Vec::with_capacity(roster.list.len());
        for (i, s) in roster.list.iter().enumerate().skip(1) {
            let (k, a) = member_addr(s)?;
            if let Some(rx) = self.send(k, a, method, msg.to_vec(), true) {
                out.push((i, rx));
            }
        }
        Ok(out)
    }

    /// Wait until block `b`, durable here, is durable on the threshold of `roster`'s
    /// members, this one included: a member answers a store once the block is durable on
    /// its disk, or says it holds it already. Members that answer later are not waited
    /// for. When the others' `answers` are all in, or [`STORE_TIMEOUT`] has passed, with
    /// fewer, the block is not acknowledged: it stays here, and the members that lack it
    /// fetch it when they start or when the next block is proposed.
    async fn until_durable(
        &self,
        b: &SkipBlock,
        roster: &block::Roster,
        answers: Vec<(usize, Answer)>,
    ) -> Result<(), String> {
        let n = roster.list.len();
        let need = block::threshold(n);
        let mut durable = 1;
        let mut errors = Vec::new();
        let mut pending: FuturesUnordered<_> = answers
            .into_iter()
            .map(|(i, rx)| async move { (i, rx.await) })
            .collect();
        let deadline = tokio::time::sleep(STORE_TIMEOUT);
        tokio::pin!(deadline);
        while durable < need {
            let (i, r) = tokio::select! {
                r = pending.next() => match r { Some(r) => r, None => break },
                _ = &mut deadline => {
                    errors.push(format!("{} did not answer within {STORE_TIMEOUT:?}", pending.len()));
                    break;
                }
            };
            let addr = &roster.list[i].address;
            match r {
                Ok(Ok(_)) => durable += 1,
                Ok(Err(e)) if e.contains(ALREADY_HELD) => durable += 1,
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: no answer (queue closed)")),
            }
        }
        if durable >= need {
            return Ok(());
        }
        let chain = block::short(if b.genesis.is_empty() {
            &b.hash
        } else {
            &b.genesis
        });
        tracing::warn!(
            "skipchain: block {} of {chain} is durable on {durable} of {n} members ({need} needed), not acknowledged; it stays here and the others fetch it later: {}",
            b.index,
            errors.join("; ")
        );
        // The close reason a client sees is at most 123 bytes.
        Err(format!(
            "block {} is durable on {durable} of {n} members, {need} needed: not acknowledged; kept by the leader, completed when they are back",
            b.index
        ))
    }

    /// Ask every other member of the chain, in roster order, for the blocks it holds
    /// beyond ours, and apply them; then mark the chain synced. The caller holds the
    /// chain's lock. An acknowledged block is durable on the threshold `t` of the `n`
    /// members, so on at least `t − 1` others, and any `n − t + 1` of the others include
    /// one that holds it: with fewer answers than that, fail (the chain stays unsynced).
    async fn sync_chain_locked(&self, chain: &Chain, genesis: &[u8; 32]) -> Result<(), String> {
        let roster = {
            let view = self.view()?;
            let (_, latest) = view.latest(genesis)?.ok_or("unknown chain")?;
            view.block_bare(&latest)?
                .ok_or("database: the latest block is missing")?
                .roster
                .ok_or("latest block has no roster")?
        };
        let n = roster.list.len();
        let enough = (n - block::threshold(n) + 1).min(n - 1);
        let mut answered = 0;
        let mut fetched = 0;
        let mut errors = Vec::new();
        for m in &roster.list {
            if untag_point(&m.public) == Some(self.keys.public_bytes()) {
                continue;
            }
            match self.catch_up_locked(genesis, m).await {
                Ok(k) => {
                    answered += 1;
                    fetched += k;
                }
                Err(e) => errors.push(format!("{}: {e}", m.address)),
            }
        }
        if answered < enough {
            tracing::warn!(
                "skipchain: chain {}: only {answered} of {} other members answered for newer blocks ({enough} needed): {}",
                block::short(genesis),
                n - 1,
                errors.join("; ")
            );
            return Err(format!(
                "chain {}: only {answered} of {} other members said which blocks they hold ({enough} needed); no block accepted until they do",
                block::short(genesis),
                n - 1
            ));
        }
        if fetched > 0 {
            tracing::info!(
                "skipchain: chain {}: fetched {fetched} newer blocks from the members",
                block::short(genesis)
            );
        }
        chain.synced.store(true, Ordering::Release);
        Ok(())
    }

    fn get_single_block(&self, req: GetSingleBlock) -> Result<SkipBlock, String> {
        self.view()?
            .block(&req.id)?
            .ok_or_else(|| "no such block".into())
    }

    fn get_by_index(
        &self,
        req: GetSingleBlockByIndex,
    ) -> Result<GetSingleBlockByIndexReply, String> {
        let view = self.view()?;
        let (latest, _) = view.latest(&req.genesis)?.ok_or("no such chain")?;
        if req.index < 0 || req.index as u32 > latest {
            return Err(format!(
                "no such block: index {} (the chain is at block {latest})",
                req.index
            ));
        }
        let target = req.index as u32;
        let hash = view
            .hash_at(&req.genesis, target)?
            .ok_or("database: indexed block missing")?;
        let blk = view
            .block(&hash)?
            .ok_or("database: indexed block missing")?;
        // The forward links from the genesis to this block, taking the longest jumps.
        let mut links = Vec::new();
        let mut cur = view
            .block(&req.genesis)?
            .ok_or("database: genesis missing")?;
        while (cur.index as u32) < target {
            let base = cur.base_height;
            let next = cur
                .forward
                .iter()
                .enumerate()
                .rev()
                .find(|(h, _)| {
                    block::forward_index(cur.index as u32, base, *h as u32)
                        .is_some_and(|t| t <= target)
                })
                .map(|(_, l)| l.clone());
            let Some(l) = next else { break };
            cur = view.block(&l.to)?.ok_or("database: linked block missing")?;
            links.push(l);
        }
        Ok(GetSingleBlockByIndexReply {
            skipblock: Some(blk),
            links,
        })
    }

    fn get_update_chain(&self, req: GetUpdateChain) -> Result<GetUpdateChainReply, String> {
        let view = self.view()?;
        let mut cur = view.block(&req.latest_id)?.ok_or("no such block")?;
        let max_h = match req.max_height {
            Some(h) if h > 0 => h.min(cur.max_height),
            _ => cur.max_height,
        } as usize;
        let max_blocks = req.max_blocks.filter(|m| *m > 0).map(|m| m as usize);
        let mut update = Vec::new();
        let mut bytes = 0;
        loop {
            bytes += cur.encoded_len();
            let links = cur.forward.clone();
            update.push(cur);
            if max_blocks.is_some_and(|m| update.len() >= m) || bytes >= MAX_REPLY_BYTES {
                break;
            }
            let mut next = None;
            for l in links.iter().take(max_h).rev() {
                if let Some(b) = view.block(&l.to)? {
                    next = Some(b);
                    break;
                }
            }
            match next {
                Some(b) => cur = b,
                None => break,
            }
        }
        Ok(GetUpdateChainReply { update })
    }

    fn all_ids(&self) -> Result<GetAllSkipChainIDsReply, String> {
        Ok(GetAllSkipChainIDsReply {
            skip_chain_ids: self
                .view()?
                .chains()?
                .into_iter()
                .map(|p| p.chain.to_vec())
                .collect(),
        })
    }

    // -----------------------------------------------------------------------------------
    // Conode-to-conode requests

    async fn on_sign(&self, from: [u8; 32], req: PeerSign) -> Result<PeerSignReply, String> {
        let b = req.block.ok_or("Sign without a block")?;
        let genesis = block::hash32(&b.genesis, "genesis")?;
        let chain = self.chain(&genesis);
        {
            // Registered before the check, so a wake-up in between is not missed.
            let checked = chain.checked.notified();
            if self.store_on_its_way(&genesis, &b)? {
                // Bounded: without it, the checks below fetch the block instead.
                let _ = tokio::time::timeout(STORE_WAIT, checked).await;
            }
        }
        let guard = chain.lock.lock().await;
        let mut view = self.view()?;
        let mut latest = building_on(&guard, view.latest(&genesis)?);
        if is_behind(latest.as_ref().map(|l| l.0), b.index) {
            drop(view);
            // Errors are logged only: the checks below then say what is missing.
            if let Err(e) = self.catch_up_from(&genesis, b.roster.as_ref(), from).await {
                tracing::warn!("skipchain: catching up before signing: {e}");
            }
            view = self.view()?;
            latest = building_on(&guard, view.latest(&genesis)?);
        }
        let ((latest_index, latest_hash), head) = latest.ok_or("unknown chain")?;
        if b.index as i64 <= latest_index as i64 {
            return Err(format!(
                "block {} {ALREADY_EXISTS}: this conode holds chain {} up to block {latest_index}",
                b.index,
                block::short(&genesis),
            ));
        }
        // Built on a block whose commit is under way: answer once it is durable.
        let pending = head.is_some().then_some(latest_hash);
        let latest = match head {
            Some(h) => h,
            None => view
                .block_bare(&latest_hash)?
                .ok_or("database: the latest block is missing")?,
        };
        let roster = latest.roster.as_ref().ok_or("latest block has no roster")?;
        let keys = block::roster_keys(roster)?;
        if keys[0] != from {
            return Err(
                "only the leader of this chain (the first server of its roster) may propose blocks"
                    .into(),
            );
        }
        let position = keys
            .iter()
            .position(|k| *k == self.keys.public_bytes())
            .ok_or("this conode is not in the chain's roster")?;
        let hash = block::check_successor(&latest, &genesis, &b, |h| {
            let i = block::backlink_index(b.index as u32, b.base_height, h)
                .ok_or("backlink out of range")?;
            if i == latest_index {
                return Ok(latest_hash);
            }
            view.hash_at(&genesis, i)?
                .ok_or_else(|| format!("block {i} is missing here"))
        })?;
        drop(view);
        let mut sigs = Vec::with_capacity(b.backlinks.len());
        for f in &b.backlinks {
            let f = block::hash32(f, "backlink")?;
            sigs.push(self.keys.sign(&block::link_hash(&f, &hash)));
        }
        let reply = PeerSignReply {
            sigs: sigs.iter().map(|s| s.to_vec()).collect(),
        };
        self.keep_signed(
            genesis,
            Signed {
                block: b,
                hash,
                position,
                sigs,
            },
        );
        drop(guard);
        if let Some(h) = pending {
            self.until_stored(&chain, &h).await?;
        }
        Ok(reply)
    }

    /// Wait until block `hash`, whose commit `StoreSigned` began, is durable here. A
    /// signature on the next block is answered only then, so that once a block is
    /// acknowledged, the block before it is on the disks of the followers that signed it.
    async fn until_stored(&self, chain: &Chain, hash: &[u8; 32]) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + SIGN_TIMEOUT;
        loop {
            // Registered before the checks, so the end of the commit is not missed.
            let stored = chain.stored.notified();
            if self.view()?.has_block(hash)? {
                return Ok(());
            }
            let under_way = chain
                .lock
                .lock()
                .await
                .as_ref()
                .is_some_and(|c| c.hash == *hash);
            if !under_way {
                // Over between the two checks, or failed.
                return if self.view()?.has_block(hash)? {
                    Ok(())
                } else {
                    Err(format!(
                        "block {} could not be stored here, so the block after it is not signed",
                        block::short(hash)
                    ))
                };
            }
            if tokio::time::timeout_at(deadline, stored).await.is_err() {
                return Err(format!(
                    "block {} is still being stored here after {SIGN_TIMEOUT:?}",
                    block::short(hash)
                ));
            }
        }
    }

    async fn on_genesis(&self, from: [u8; 32], req: PeerStore) -> Result<(), String> {
        let g = req.block.ok_or("Genesis without a block")?;
        let genesis = block::check_genesis(&g)?;
        let keys = block::roster_keys(g.roster.as_ref().ok_or("no roster")?)?;
        if keys[0] != from {
            return Err("a genesis block comes only from the first server of its roster".into());
        }
        if !keys.contains(&self.keys.public_bytes()) {
            return Err("this conode is not in the chain's roster".into());
        }
        let chain = self.chain(&genesis);
        let _guard = chain.lock.lock().await;
        if self.view()?.latest(&genesis)?.is_some() {
            return Err(format!(
                "already hold chain {}: genesis not stored again",
                block::short(&genesis)
            ));
        }
        let roster = g.roster.clone();
        self.blocking(move |db| store::commit(db, &[Put::Block(g)]))
            .await?;
        self.note_roster(roster.as_ref());
        Ok(())
    }

    async fn on_store(&self, from: [u8; 32], req: PeerStore) -> Result<(), String> {
        let b = req.block.ok_or("Store without a block")?;
        let genesis = block::hash32(&b.genesis, "genesis")?;
        let chain = self.chain(&genesis);
        let _guard = chain.lock.lock().await;
        self.catch_up_if_behind(&genesis, &b, from).await?;
        if let Some((i, h)) = self.view()?.latest(&genesis)? {
            if b.index as i64 <= i as i64 {
                return Err(held_or_conflicting(
                    &self.view()?,
                    &genesis,
                    b.index,
                    &b.hash,
                    (i, h),
                )?);
            }
        }
        if b.height < 0 || req.links.len() != b.height as usize {
            return Err(format!(
                "block {} comes with {} forward links; it needs {}",
                b.index,
                req.links.len(),
                b.height
            ));
        }
        let older: Vec<LinkAt> = req
            .links
            .into_iter()
            .enumerate()
            .map(|(h, l)| LinkAt {
                level: h as u32,
                link: Some(l),
            })
            .collect();
        let roster = b.roster.clone();
        let page = PeerBlocks {
            older_links: older,
            blocks: vec![b],
            latest_index: 0,
        };
        self.blocking(move |db| apply(db, &genesis, page).map(|_| ()))
            .await?;
        self.note_roster(roster.as_ref());
        Ok(())
    }

    /// `StoreSigned`: the block is the one kept from `Sign`, already checked against our
    /// chain (index, heights, backlinks, roster, hash); what is new is its forward links,
    /// and every signature in them is verified but ours (compared byte for byte). Without
    /// the kept block, or when behind, fetch from the sender.
    async fn on_store_signed(&self, from: [u8; 32], req: PeerStoreSigned) -> Result<(), String> {
        let genesis = block::hash32(&req.genesis, "genesis")?;
        let hash = block::hash32(&req.hash, "block hash")?;
        let chain = self.chain(&genesis);
        let mut guard = chain.lock.lock().await;
        let view = self.view()?;
        let latest = view.latest(&genesis)?;
        let Some(s) = self.take_signed(&genesis, &hash) else {
            drop(view);
            return self.fetch_stored(&genesis, &hash, latest, from).await;
        };
        let b = &s.block;
        match latest {
            Some((i, h)) if i as i64 + 1 == b.index as i64 => {
                if b.backlinks[0] != h {
                    return Err(format!(
                        "block {} no longer follows this conode's latest block {}",
                        b.index,
                        block::short(&h)
                    ));
                }
            }
            Some((i, h)) if b.index as i64 <= i as i64 => {
                return Err(held_or_conflicting(
                    &view,
                    &genesis,
                    b.index,
                    &hash,
                    (i, h),
                )?);
            }
            _ => {
                drop(view);
                return self.fetch_stored(&genesis, &hash, latest, from).await;
            }
        }
        drop(view);
        if let Err(e) = check_signed_links(&s, &req.links) {
            // Keep the block for a valid `StoreSigned`.
            self.keep_signed(genesis, s);
            return Err(e);
        }
        // Checked: the next block's `Sign` may build on it while it is committed, but
        // the answer waits until it is durable.
        *guard = Some(Committing {
            index: s.block.index as u32,
            hash,
            head: head_of(&s.block),
        });
        chain.checked.notify_waiters();
        drop(guard);
        let mut puts = vec![Put::Block(s.block)];
        puts.extend(
            req.links
                .into_iter()
                .enumerate()
                .map(|(h, link)| Put::Link {
                    level: h as u32,
                    link,
                }),
        );
        let r = self.blocking(move |db| store::commit(db, &puts)).await;
        let mut guard = chain.lock.lock().await;
        if guard.as_ref().is_some_and(|c| c.hash == hash) {
            *guard = None;
        }
        chain.stored.notify_waiters();
        r
    }

    /// A block stored by `from` that is not kept here: fetch the chain from `from`
    /// (verified as any fetch), then it must be held.
    async fn fetch_stored(
        &self,
        genesis: &[u8; 32],
        hash: &[u8; 32],
        latest: Option<(u32, [u8; 32])>,
        from: [u8; 32],
    ) -> Result<(), String> {
        let (_, latest_hash) = latest.ok_or("unknown chain")?;
        if self.view()?.has_block(hash)? {
            return Err(format!("already hold block {}", block::short(hash)));
        }
        let roster = self
            .view()?
            .block_bare(&latest_hash)?
            .ok_or("database: the latest block is missing")?
            .roster;
        self.catch_up_from(genesis, roster.as_ref(), from).await?;
        if self.view()?.has_block(hash)? {
            Ok(())
        } else {
            Err(format!(
                "block {} was not signed here, and the sender did not provide it",
                block::short(hash)
            ))
        }
    }

    fn on_get_blocks(&self, req: PeerGetBlocks) -> Result<PeerBlocks, String> {
        let view = self.view()?;
        let genesis = block::hash32(&req.genesis, "genesis")?;
        let (latest, _) = view.latest(&genesis)?.ok_or("no such chain")?;
        let first = view
            .block_bare(&genesis)?
            .ok_or("database: genesis missing")?;
        let (base, max) = (first.base_height, first.max_height);
        let mut older_links = Vec::new();
        if req.from_index > 0 && req.from_index <= latest {
            // At each level h, the one block j < from_index with j mod base^h = 0 and
            // j + base^h >= from_index links into the requested range.
            for h in 0..max.max(0) as u32 {
                let Some(step) = block::span(base, h) else {
                    break;
                };
                let j = ((req.from_index as u64 - 1) / step * step) as u32;
                if block::height_of(j, base, max) as u32 <= h {
                    continue;
                }
                let Some(jh) = view.hash_at(&genesis, j)? else {
                    continue;
                };
                if let Some(l) = view.link(&jh, h)? {
                    older_links.push(LinkAt {
                        level: h,
                        link: Some(l),
                    });
                }
            }
        }
        let mut blocks = Vec::new();
        let mut bytes = 0;
        let mut i = req.from_index;
        while i <= latest && (blocks.is_empty() || bytes < MAX_REPLY_BYTES) {
            let h = view
                .hash_at(&genesis, i)?
                .ok_or("database: indexed block missing")?;
            let b = view.block(&h)?.ok_or("database: indexed block missing")?;
            bytes += b.encoded_len();
            blocks.push(b);
            i += 1;
        }
        Ok(PeerBlocks {
            older_links,
            blocks,
            latest_index: latest,
        })
    }

    /// If `b` is beyond our latest block + 1 (or its chain is unknown here), fetch the
    /// missing blocks from `from`, the member that sent it. The caller holds the lock.
    async fn catch_up_if_behind(
        &self,
        genesis: &[u8; 32],
        b: &SkipBlock,
        from: [u8; 32],
    ) -> Result<(), String> {
        if !is_behind(self.view()?.latest(genesis)?, b.index) {
            return Ok(());
        }
        self.catch_up_from(genesis, b.roster.as_ref(), from).await
    }

    /// Fetch the blocks `from` holds beyond ours; it must be in `roster`. The caller
    /// holds the lock.
    async fn catch_up_from(
        &self,
        genesis: &[u8; 32],
        roster: Option<&block::Roster>,
        from: [u8; 32],
    ) -> Result<(), String> {
        let s = roster
            .ok_or("block has no roster")?
            .list
            .iter()
            .find(|s| untag_point(&s.public) == Some(from))
            .ok_or("the sender is not in the block's roster")?;
        self.catch_up_locked(genesis, s).await.map(|_| ())
    }

    /// Fetch and apply the blocks `member` holds beyond ours. The caller holds the
    /// chain's lock.
    async fn catch_up_locked(
        &self,
        genesis: &[u8; 32],
        member: &crate::proto::ServerIdentity,
    ) -> Result<u32, String> {
        let (key, addr) = member_addr(member)?;
        if key == self.keys.public_bytes() {
            return Ok(0);
        }
        let mut total = 0;
        loop {
            let from_index = match self.view()?.latest(genesis)? {
                Some((i, _)) => i + 1,
                None => 0,
            };
            let req = PeerGetBlocks {
                genesis: genesis.to_vec(),
                from_index,
            }
            .encode_to_vec();
            let rx = self
                .send(key, addr.clone(), "GetBlocks", req, true)
                .ok_or("internal: no reply channel")?;
            let reply = rx.await.map_err(|_| "member queue closed")??;
            let page: PeerBlocks = decode(&reply, "GetBlocks reply")?;
            let more = page.latest_index;
            if page.blocks.is_empty() {
                return Ok(total);
            }
            let g = *genesis;
            let roster = page.blocks[0].roster.clone();
            let (n, last) = self.blocking(move |db| apply(db, &g, page)).await?;
            if n > 0 {
                self.note_roster(roster.as_ref());
            }
            total += n;
            if n == 0 || last >= more {
                if total > 0 {
                    tracing::info!(
                        "skipchain: caught up chain {} to block {last} from {addr} ({total} blocks)",
                        block::short(genesis)
                    );
                }
                return Ok(total);
            }
        }
    }

    /// At start-up: for every chain held, fetch what the other members hold beyond us,
    /// asking the leader first and then the others, until one answers.
    pub async fn sync_all(self: Arc<Self>) {
        let chains = match self.view().and_then(|v| v.chains()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("skipchain: cannot list chains for start-up sync: {e}");
                return;
            }
        };
        for crate::db::ChainPosition { chain: genesis, .. } in chains {
            let chain = self.chain(&genesis);
            let _guard = chain.lock.lock().await;
            if chain.synced.load(Ordering::Acquire) {
                continue;
            }
            // Errors are logged; a leader retries at the next block proposed.
            if let Err(e) = self.sync_chain_locked(&chain, &genesis).await {
                tracing::info!("skipchain: start-up sync: {e}");
            }
        }
    }
}

/// The rosters of the chains stored in `db` (those of their genesis blocks: rosters
/// cannot change).
fn stored_rosters(db: &Db) -> Result<Vec<block::Roster>, String> {
    let view = View::new(&db.db())?;
    let mut out = Vec::new();
    for c in view.chains()? {
        if let Some(r) = view.block_bare(&c.chain)?.and_then(|g| g.roster) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Why block `index` (with `hash`) of `genesis` is not stored again, at or below our
/// `latest` block: we hold that very block, or another one at its index.
fn held_or_conflicting(
    view: &View,
    genesis: &[u8; 32],
    index: i32,
    hash: &[u8],
    latest: (u32, [u8; 32]),
) -> Result<String, String> {
    let ours = view.hash_at(genesis, index.max(0) as u32)?;
    Ok(if ours.is_some_and(|o| o[..] == hash[..]) {
        format!(
            "already hold block {index} of chain {}",
            block::short(genesis)
        )
    } else {
        format!(
            "conflicting block {index}: this conode holds another block at that index (latest {}, {})",
            latest.0,
            block::short(&latest.1)
        )
    })
}

/// The forward links of a `StoreSigned` for the kept block `s`: one per level, each from
/// its backlink to it, signed by the threshold. Rosters cannot change, so the blocks the
/// links leave from have the block's roster.
fn check_signed_links(s: &Signed, links: &[ForwardLink]) -> Result<(), String> {
    let b = &s.block;
    if links.len() != b.backlinks.len() {
        return Err(format!(
            "block {} comes with {} forward links; it needs {}",
            b.index,
            links.len(),
            b.backlinks.len()
        ));
    }
    let roster = b.roster.as_ref().ok_or("block has no roster")?;
    for (h, l) in links.iter().enumerate() {
        let from = block::hash32(&b.backlinks[h], "backlink")?;
        block::verify_link_from(l, &from, roster, &s.hash, Some((s.position, &s.sigs[h])))?;
    }
    Ok(())
}

/// `b` without its data.
fn head_of(b: &SkipBlock) -> SkipBlock {
    SkipBlock {
        index: b.index,
        height: b.height,
        max_height: b.max_height,
        base_height: b.base_height,
        backlinks: b.backlinks.clone(),
        verifiers: b.verifiers.clone(),
        genesis: b.genesis.clone(),
        data: Vec::new(),
        roster: b.roster.clone(),
        hash: b.hash.clone(),
        forward: Vec::new(),
        payload: None,
        signature_scheme: b.signature_scheme,
    }
}

/// What a new block builds on: the latest block stored, or the one being committed after
/// it (then with its head).
type Base = ((u32, [u8; 32]), Option<SkipBlock>);

fn building_on(committing: &Option<Committing>, stored: Option<(u32, [u8; 32])>) -> Option<Base> {
    match (committing, stored) {
        (Some(c), Some((i, _))) if c.index as i64 == i as i64 + 1 => {
            Some(((c.index, c.hash), Some(c.head.clone())))
        }
        (_, stored) => stored.map(|l| (l, None)),
    }
}

/// Whether a block at `index` is beyond our `latest` (index, hash) + 1, or its chain is
/// unknown here.
fn is_behind(latest: Option<(u32, [u8; 32])>, index: i32) -> bool {
    match latest {
        None => true,
        Some((i, _)) => (i as i64) + 1 < index as i64,
    }
}

/// Check one follower's signatures on `msgs` (one per level).
fn check_sign_reply(
    reply: &[u8],
    key: &[u8; 32],
    msgs: &[[u8; 32]],
) -> Result<Vec<[u8; 64]>, String> {
    let r: PeerSignReply = decode(reply, "Sign reply")?;
    if r.sigs.len() != msgs.len() {
        return Err(format!(
            "returned {} signatures for {} links",
            r.sigs.len(),
            msgs.len()
        ));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (s, m) in r.sigs.iter().zip(msgs) {
        let s: [u8; 64] = s
            .as_slice()
            .try_into()
            .map_err(|_| "a signature is not 64 bytes")?;
        if !keys::verify(key, m, &s) {
            return Err("returned an invalid signature".into());
        }
        out.push(s);
    }
    Ok(out)
}

/// A forward link at `level` leaving from `from`, checked against `from`'s roster.
fn check_link(level: u32, l: &ForwardLink, from: &SkipBlock) -> Result<(), String> {
    let to = block::hash32(&l.to, "link target")?;
    if level as i32 >= from.height
        || block::forward_index(from.index as u32, from.base_height, level).is_none()
    {
        return Err(format!(
            "forward link at level {level} beyond the block's height"
        ));
    }
    block::verify_link(l, from, &to)
}

/// Verify a page of blocks and links against what `db` holds and commit what is new, in
/// one transaction. Returns (new blocks, latest index after).
fn apply(db: &Db, genesis: &[u8; 32], page: PeerBlocks) -> Result<(u32, u32), String> {
    let view = View::new(&db.db())?;
    let mut puts = Vec::new();
    // New blocks of this page: index → hash, and hash → (index, base height), for
    // backlinks and link checks.
    let mut fresh: HashMap<u32, [u8; 32]> = HashMap::new();
    let mut fresh_by_hash: HashMap<[u8; 32], (i32, i32)> = HashMap::new();
    let mut latest: Option<SkipBlock> = view.latest_block(genesis)?;
    let hash_at = |fresh: &HashMap<u32, [u8; 32]>, i: u32| -> Result<[u8; 32], String> {
        if let Some(h) = fresh.get(&i) {
            return Ok(*h);
        }
        view.hash_at(genesis, i)?
            .ok_or_else(|| format!("block {i} is missing here"))
    };
    // Links that leave from blocks we hold (or just received): verified against the
    // roster of the block they leave from. Level-0 links to new blocks are collected by
    // target so each new block can be checked against one.
    let mut to_new: HashMap<Vec<u8>, ForwardLink> = HashMap::new();
    for la in page.older_links {
        let l = la.link.ok_or("empty link")?;
        let from = view
            .block_bare(&l.from)?
            .ok_or("a forward link leaves from a block not held here")?;
        if block::chain_id(&from)? != *genesis {
            return Err("a forward link leaves from another chain".into());
        }
        check_link(la.level, &l, &from)?;
        if la.level == 0 {
            to_new.insert(l.to.clone(), l.clone());
        }
        puts.push(Put::Link {
            level: la.level,
            link: l,
        });
    }
    let mut added = 0;
    for mut b in page.blocks {
        let forward = std::mem::take(&mut b.forward);
        match &latest {
            None => {
                let h = block::check_genesis(&b)?;
                if h != *genesis {
                    return Err("received a genesis block of another chain".into());
                }
            }
            Some(l) if b.index <= l.index => {
                // Known block: it must be ours; keep any new links.
                let ours = hash_at(&fresh, b.index.max(0) as u32)?;
                if ours[..] != b.hash[..] {
                    return Err(format!(
                        "conflicting block {}: this conode holds another block at that index",
                        b.index
                    ));
                }
            }
            Some(prev) => {
                let hb = block::check_successor(prev, genesis, &b, |h| {
                    let i = block::backlink_index(b.index as u32, b.base_height, h)
                        .ok_or("backlink out of range")?;
                    hash_at(&fresh, i)
                })?;
                let link = to_new.get(&hb[..]).ok_or_else(|| {
                    format!(
                        "block {} comes without a signed forward link to it",
                        b.index
                    )
                })?;
                if link.from != prev.hash {
                    return Err(format!(
                        "block {}'s forward link does not leave from block {}",
                        b.index, prev.index
                    ));
                }
            }
        }
        let is_new = latest.as_ref().is_none_or(|l| b.index > l.index);
        let own = if is_new {
            let h = block::hash32(&b.hash, "block hash")?;
            fresh.insert(b.index as u32, h);
            fresh_by_hash.insert(h, (b.index, b.base_height));
            puts.push(Put::Block(b.clone()));
            added += 1;
            latest.insert(b)
        } else {
            &view
                .block_bare(&b.hash)?
                .ok_or("database: known block missing")?
        };
        for (h, l) in forward.into_iter().enumerate() {
            check_link(h as u32, &l, own)?;
            if h == 0 {
                to_new.insert(l.to.clone(), l.clone());
            }
            puts.push(Put::Link {
                level: h as u32,
                link: l,
            });
        }
    }
    // Every link must point exactly base^level blocks ahead. Links whose target is
    // neither held nor in this page are not stored (they come again with that block).
    // (index, base height, chain) of a block of this page or held here.
    let index_of = |h: &[u8]| -> Result<Option<(i32, i32, [u8; 32])>, String> {
        if let Some((i, base)) = <[u8; 32]>::try_from(h)
            .ok()
            .and_then(|k| fresh_by_hash.get(&k))
        {
            return Ok(Some((*i, *base, *genesis)));
        }
        view.block_bare(h)?
            .map(|b| Ok((b.index, b.base_height, block::chain_id(&b)?)))
            .transpose()
    };
    let mut kept = Vec::with_capacity(puts.len());
    for p in puts {
        if let Put::Link { level, link } = &p {
            let (from, base, _) = index_of(&link.from)?.ok_or("database: link source missing")?;
            let Some((to, _, to_chain)) = index_of(&link.to)? else {
                continue;
            };
            let want = block::forward_index(from as u32, base, *level);
            if want != Some(to as u32) || to_chain != *genesis {
                return Err(format!(
                    "forward link at level {level} from block {from} points to block {to}, not {want:?}"
                ));
            }
        }
        kept.push(p);
    }
    let puts = kept;
    let last = latest.as_ref().map_or(0, |b| b.index as u32);
    if puts.is_empty() {
        return Ok((0, last));
    }
    drop(view);
    store::commit(db, &puts)?;
    Ok((added, last))
}

impl Service for Skipchain {
    fn name(&self) -> &'static str {
        "Skipchain"
    }

    fn methods(&self) -> &'static [&'static str] {
        &[
            "StoreSkipBlock",
            "GetSingleBlock",
            "GetSingleBlockByIndex",
            "GetUpdateChain",
            "GetAllSkipChainIDs",
        ]
    }

    fn call<'a>(
        &'a self,
        method: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            match method {
                "StoreSkipBlock" => Ok(self
                    .store_skip_block(decode(body, "StoreSkipBlock")?)
                    .await?
                    .encode_to_vec()),
                "GetSingleBlock" => Ok(self
                    .get_single_block(decode(body, "GetSingleBlock")?)?
                    .encode_to_vec()),
                "GetSingleBlockByIndex" => Ok(self
                    .get_by_index(decode(body, "GetSingleBlockByIndex")?)?
                    .encode_to_vec()),
                "GetUpdateChain" => Ok(self
                    .get_update_chain(decode(body, "GetUpdateChain")?)?
                    .encode_to_vec()),
                "GetAllSkipChainIDs" => Ok(self.all_ids()?.encode_to_vec()),
                other => Err(format!(
                    "The requested message hasn't been registered: {other}"
                )),
            }
        })
    }
}

impl PeerHandler for Skipchain {
    fn members(&self) -> Option<Arc<Members>> {
        Some(self.roster_members.clone())
    }

    fn call<'a>(
        &'a self,
        from: [u8; 32],
        _service: &'a str,
        method: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            match method {
                "Sign" => Ok(self
                    .on_sign(from, decode(payload, "Sign")?)
                    .await?
                    .encode_to_vec()),
                "Store" => self
                    .on_store(from, decode(payload, "Store")?)
                    .await
                    .map(|_| Vec::new()),
                "StoreSigned" => self
                    .on_store_signed(from, decode(payload, "StoreSigned")?)
                    .await
                    .map(|_| Vec::new()),
                "Genesis" => self
                    .on_genesis(from, decode(payload, "Genesis")?)
                    .await
                    .map(|_| Vec::new()),
                "GetBlocks" => Ok(self
                    .on_get_blocks(decode(payload, "GetBlocks")?)?
                    .encode_to_vec()),
                other => Err(format!("no handler for Skipchain/{other}")),
            }
        })
    }
}
