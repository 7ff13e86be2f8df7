//! Skipchain storage in the conode's redb file (tables declared in [`crate::db`]).
//!
//! Blocks are immutable once stored; forward links live in their own table, keyed by
//! the block they leave from and their level. [`commit`] writes blocks and links in one
//! durable write transaction and refuses anything that would not extend a chain by
//! exactly one block at a time, so the tables always hold whole prefixes of chains.

use prost::Message;
use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::block::{self, ForwardLink, SkipBlock};
use crate::db::{
    decode_position, encode_position, META, REOPENING, SKIPCHAIN_BLOCKS, SKIPCHAIN_CHAINS,
    SKIPCHAIN_INDEX, SKIPCHAIN_LINKS,
};

fn e(x: impl std::fmt::Display) -> String {
    format!("database: {x}")
}

/// A read view of the skipchain tables.
pub struct View {
    txn: ReadTransaction,
}

macro_rules! open_or_none {
    ($txn:expr, $def:expr) => {
        match $txn.open_table($def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x)),
        }
    };
}

impl View {
    /// A view of `db`'s committed state. Refused for the stand-in that serves while the
    /// database is reopened after an I/O error (it has no `meta` table, which every
    /// conode's database has): a read must never answer "no such block" for a block the
    /// file holds.
    pub fn new(db: &Database) -> Result<View, String> {
        let txn = db.begin_read().map_err(e)?;
        let meta = txn.open_table(META).map(|_| ());
        match meta {
            Ok(()) => Ok(View { txn }),
            Err(redb::TableError::TableDoesNotExist(_)) => Err(e(REOPENING)),
            Err(x) => Err(e(x)),
        }
    }

    /// The stored block (without forward links).
    pub fn block_bare(&self, hash: &[u8]) -> Result<Option<SkipBlock>, String> {
        let t = open_or_none!(self.txn, SKIPCHAIN_BLOCKS);
        let Some(v) = t.get(hash).map_err(e)? else {
            return Ok(None);
        };
        SkipBlock::decode(v.value()).map(Some).map_err(|x| {
            format!(
                "database: stored block {} is damaged: {x}",
                block::short(hash)
            )
        })
    }

    /// Whether the block with `hash` is stored (without reading it).
    pub fn has_block(&self, hash: &[u8]) -> Result<bool, String> {
        let t = match self.txn.open_table(SKIPCHAIN_BLOCKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(x) => return Err(e(x)),
        };
        Ok(t.get(hash).map_err(e)?.is_some())
    }

    /// The forward link at `level` from block `from`.
    pub fn link(&self, from: &[u8], level: u32) -> Result<Option<ForwardLink>, String> {
        let t = open_or_none!(self.txn, SKIPCHAIN_LINKS);
        let Some(v) = t.get(&link_key(from, level)[..]).map_err(e)? else {
            return Ok(None);
        };
        ForwardLink::decode(v.value())
            .map(Some)
            .map_err(|x| format!("database: stored forward link is damaged: {x}"))
    }

    /// The block with its forward links.
    pub fn block(&self, hash: &[u8]) -> Result<Option<SkipBlock>, String> {
        let Some(mut b) = self.block_bare(hash)? else {
            return Ok(None);
        };
        for level in 0..b.height.max(0) as u32 {
            match self.link(hash, level)? {
                Some(l) => b.forward.push(l),
                None => break,
            }
        }
        Ok(Some(b))
    }

    /// Hash of block `index` of chain `genesis`.
    pub fn hash_at(&self, genesis: &[u8], index: u32) -> Result<Option<[u8; 32]>, String> {
        let t = open_or_none!(self.txn, SKIPCHAIN_INDEX);
        let Some(v) = t.get(&index_key(genesis, index)[..]).map_err(e)? else {
            return Ok(None);
        };
        block::hash32(v.value(), "database: indexed hash").map(Some)
    }

    /// Latest (index, hash) of chain `genesis`.
    pub fn latest(&self, genesis: &[u8]) -> Result<Option<(u32, [u8; 32])>, String> {
        let t = open_or_none!(self.txn, SKIPCHAIN_CHAINS);
        let Some(v) = t.get(genesis).map_err(e)? else {
            return Ok(None);
        };
        Ok(Some(decode_position(v.value())?))
    }

    /// The latest block of chain `genesis`, with its links.
    pub fn latest_block(&self, genesis: &[u8]) -> Result<Option<SkipBlock>, String> {
        match self.latest(genesis)? {
            Some((_, h)) => self.block(&h),
            None => Ok(None),
        }
    }

    /// Every chain: (genesis, latest index, latest hash).
    pub fn chains(&self) -> Result<Vec<crate::db::ChainPosition>, String> {
        crate::db::chain_positions(&self.txn)
    }

    /// (blocks, chains) for Status: cheap (table lengths).
    pub fn counts(&self) -> (u64, u64) {
        let blocks = self
            .txn
            .open_table(SKIPCHAIN_BLOCKS)
            .ok()
            .and_then(|t| t.len().ok())
            .unwrap_or(0);
        let chains = self
            .txn
            .open_table(SKIPCHAIN_CHAINS)
            .ok()
            .and_then(|t| t.len().ok())
            .unwrap_or(0);
        (blocks, chains)
    }

    /// Stored bytes of blocks and links, for Status: reads every page of both tables.
    pub fn stored_bytes(&self) -> u64 {
        let mut bytes = 0;
        for def in [SKIPCHAIN_BLOCKS, SKIPCHAIN_LINKS] {
            if let Ok(t) = self.txn.open_table(def) {
                bytes += t.stats().map(|s| s.stored_bytes()).unwrap_or(0);
            }
        }
        bytes
    }
}

fn link_key(from: &[u8], level: u32) -> Vec<u8> {
    let mut k = from.to_vec();
    k.push(level.min(255) as u8);
    k
}

fn index_key(genesis: &[u8], index: u32) -> Vec<u8> {
    let mut k = genesis.to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// One change to commit: a new block (extending its chain by one) or a forward link.
pub enum Put {
    Block(SkipBlock),
    Link { level: u32, link: ForwardLink },
}

/// Commit `puts` in one durable transaction. Blocks must come in chain order, each the
/// genesis of an unknown chain or the successor of its chain's latest block (checked
/// again here so that two racing writers cannot interleave). Links replace nothing: an
/// existing link at the same place is kept.
pub fn commit(db: &crate::db::Db, puts: &[Put]) -> Result<(), String> {
    // What the write adds, about (values and keys): the free-space floor counts it
    // before the write starts.
    let need: usize = puts
        .iter()
        .map(|p| match p {
            // The block under its hash, its index entry, its chain's position.
            Put::Block(b) => b.encoded_len() + 32 + (36 + 32) + (32 + 36),
            Put::Link { link, .. } => link.encoded_len() + 33,
        })
        .sum();
    let txn = db.begin_write(need as u64)?;
    // A write can fail with an I/O error before the commit (a page flushed early).
    let written = (|| {
        let mut blocks = txn.open_table(SKIPCHAIN_BLOCKS).map_err(e)?;
        let mut links = txn.open_table(SKIPCHAIN_LINKS).map_err(e)?;
        let mut index = txn.open_table(SKIPCHAIN_INDEX).map_err(e)?;
        let mut chains = txn.open_table(SKIPCHAIN_CHAINS).map_err(e)?;
        for p in puts {
            match p {
                Put::Block(b) => {
                    let genesis = block::chain_id(b)?;
                    let hash = block::hash32(&b.hash, "block hash")?;
                    let latest = chains
                        .get(&genesis[..])
                        .map_err(e)?
                        .map(|v| decode_position(v.value()))
                        .transpose()?;
                    let ok = match latest {
                        None => b.index == 0,
                        Some((i, _)) => b.index >= 1 && b.index as u32 == i + 1,
                    };
                    if !ok {
                        return Err(format!(
                            "block {} does not extend chain {} (latest is {:?})",
                            b.index,
                            block::short(&genesis),
                            latest.map(|l| l.0)
                        ));
                    }
                    blocks
                        .insert(&hash[..], &block::encode_stored(b)[..])
                        .map_err(e)?;
                    index
                        .insert(&index_key(&genesis, b.index as u32)[..], &hash[..])
                        .map_err(e)?;
                    let pos = encode_position(b.index as u32, &hash);
                    chains.insert(&genesis[..], &pos[..]).map_err(e)?;
                }
                Put::Link { level, link } => {
                    let k = link_key(&link.from, *level);
                    if links.get(&k[..]).map_err(e)?.is_none() {
                        links.insert(&k[..], &link.encode_to_vec()[..]).map_err(e)?;
                    }
                }
            }
        }
        Ok::<_, String>(())
    })();
    if let Err(err) = written {
        // Closed first: the check tries a write transaction of its own.
        drop(txn);
        db.check_io(&err);
        return Err(err);
    }
    db.commit(txn)
}
