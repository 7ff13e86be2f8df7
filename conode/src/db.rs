//! The conode's redb database: opening it, and the figures Status reports.
//!
//! One file per conode, `<data dir>/<Public hex>.db`. Table definitions live here (one
//! place per fact). The `meta` table records the public key the file belongs to, so a
//! database is never served under another identity by mistake. This module never deletes
//! or truncates a database file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// `meta`: key → value, for facts about the file itself.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Key in [`META`]: the 32-byte public key of the conode that owns this file.
pub const META_PUBLIC: &str = "public";

// Skipchain tables. Every table other than `meta` maps bytes to bytes, so a snapshot can
// copy any table without knowing what it holds (keep it so for new tables).

/// `skipchain_blocks`: block hash (32) → `SkipBlock` protobuf, without forward links
/// (a stored block never changes).
pub const SKIPCHAIN_BLOCKS: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("skipchain_blocks");
/// `skipchain_links`: from-block hash (32) ‖ level (1 byte) → `ForwardLink` protobuf.
pub const SKIPCHAIN_LINKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("skipchain_links");
/// `skipchain_index`: genesis hash (32) ‖ index (u32 big-endian) → block hash (32).
pub const SKIPCHAIN_INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("skipchain_index");
/// `skipchain_chains`: genesis hash (32) → latest index (u32 little-endian) ‖ latest
/// block hash (32).
pub const SKIPCHAIN_CHAINS: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("skipchain_chains");

/// The last committed position of every chain in a read transaction: genesis hash →
/// (latest index, latest hash), sorted by genesis hash.
pub fn chain_positions(
    txn: &redb::ReadTransaction,
) -> Result<Vec<([u8; 32], u32, [u8; 32])>, String> {
    let t = match txn.open_table(SKIPCHAIN_CHAINS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading skipchain_chains: {e}")),
    };
    let mut out = Vec::new();
    for r in t.iter().map_err(|e| e.to_string())? {
        let (k, v) = r.map_err(|e| e.to_string())?;
        let (k, v) = (k.value(), v.value());
        let (Ok(genesis), true) = (<[u8; 32]>::try_from(k), v.len() == 36) else {
            return Err(format!(
                "skipchain_chains: malformed entry ({} byte key, {} byte value)",
                k.len(),
                v.len()
            ));
        };
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&v[..4]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&v[4..]);
        out.push((genesis, u32::from_le_bytes(idx), hash));
    }
    Ok(out)
}

/// How long Status may reuse the allocator figures (they need a write transaction).
const STATS_TTL: Duration = Duration::from_secs(5);
/// How long Status may reuse the other figures (a stat and a read transaction each).
const FIGURES_TTL: Duration = Duration::from_secs(1);

pub struct Db {
    pub db: Database,
    pub path: PathBuf,
    stats: Mutex<Option<(Instant, BTreeMap<String, String>)>>,
    figures: Mutex<Option<(Instant, BTreeMap<String, String>)>>,
}

impl Db {
    /// Open (creating if needed) the database of `public`.
    pub fn open(path: &Path, public: &[u8; 32]) -> Result<Db, String> {
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => format!(
                "database {} is already open by another process: is another conode with this key running?",
                path.display()
            ),
            e => format!(
                "cannot open database {}: {e}; if the file is damaged, restore it from a backup",
                path.display()
            ),
        })?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let owner = meta
                .get(META_PUBLIC)
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_vec());
            match owner {
                Some(o) if o != public => {
                    return Err(format!(
                        "database {} belongs to conode {}, not to {}: refusing to serve it under another identity",
                        path.display(),
                        hex::encode(&o),
                        hex::encode(public)
                    ))
                }
                Some(_) => {}
                None => {
                    meta.insert(META_PUBLIC, &public[..])
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        Ok(Db {
            db,
            path: path.to_path_buf(),
            stats: Mutex::new(None),
            figures: Mutex::new(None),
        })
    }

    /// The `Db` section of Status: figures of the redb file, at most [`FIGURES_TTL`] old.
    pub fn figures(&self) -> BTreeMap<String, String> {
        let mut cache = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < FIGURES_TTL {
                return v.clone();
            }
        }
        let f = self.read_figures();
        *cache = Some((Instant::now(), f.clone()));
        f
    }

    fn read_figures(&self) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        f.insert("Open".into(), "true".into());
        f.insert("Path".into(), self.path.display().to_string());
        if let Ok(m) = std::fs::metadata(&self.path) {
            f.insert("FileBytes".into(), m.len().to_string());
        }
        if let Ok(r) = self.db.begin_read() {
            if let Ok(tables) = r.list_tables() {
                let mut n = 0u64;
                let mut entries = 0u64;
                for t in tables {
                    n += 1;
                    if let Ok(u) = r.open_untyped_table(t) {
                        entries += u.len().unwrap_or(0);
                    }
                }
                f.insert("Tables".into(), n.to_string());
                f.insert("Entries".into(), entries.to_string());
            }
        }
        f.extend(self.allocator_figures());
        f
    }

    fn allocator_figures(&self) -> BTreeMap<String, String> {
        let mut cache = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < STATS_TTL {
                return v.clone();
            }
        }
        let mut f = BTreeMap::new();
        if let Ok(w) = self.db.begin_write() {
            if let Ok(s) = w.stats() {
                f.insert("TreeHeight".into(), s.tree_height().to_string());
                f.insert("AllocatedPages".into(), s.allocated_pages().to_string());
                f.insert("LeafPages".into(), s.leaf_pages().to_string());
                f.insert("BranchPages".into(), s.branch_pages().to_string());
                f.insert("StoredBytes".into(), s.stored_bytes().to_string());
                f.insert("MetadataBytes".into(), s.metadata_bytes().to_string());
                f.insert("FragmentedBytes".into(), s.fragmented_bytes().to_string());
                f.insert("PageSize".into(), s.page_size().to_string());
            }
            let _ = w.abort();
        }
        *cache = Some((Instant::now(), f.clone()));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_never_opened_under_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let db = Db::open(&p, &[1; 32]).unwrap();
        assert_eq!(db.figures()["Tables"], "1");
        drop(db);
        Db::open(&p, &[1; 32]).unwrap();
        let e = Db::open(&p, &[2; 32]).err().unwrap();
        assert!(e.contains("belongs to conode 0101"), "{e}");
    }

    #[test]
    fn a_second_open_says_another_conode_runs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let _db = Db::open(&p, &[1; 32]).unwrap();
        let e = Db::open(&p, &[1; 32]).err().unwrap();
        assert!(e.contains("already open"), "{e}");
    }
}
