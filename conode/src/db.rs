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

use redb::{
    Database, MultimapTableHandle, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle,
};

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

/// A `skipchain_chains` value: (latest index, latest hash).
pub fn decode_position(v: &[u8]) -> Result<(u32, [u8; 32]), String> {
    if v.len() != 36 {
        return Err(format!(
            "skipchain_chains: malformed position ({} bytes, not 36)",
            v.len()
        ));
    }
    let mut idx = [0u8; 4];
    idx.copy_from_slice(&v[..4]);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&v[4..]);
    Ok((u32::from_le_bytes(idx), hash))
}

/// The `skipchain_chains` value for (index, hash).
pub fn encode_position(index: u32, hash: &[u8; 32]) -> [u8; 36] {
    let mut v = [0u8; 36];
    v[..4].copy_from_slice(&index.to_le_bytes());
    v[4..].copy_from_slice(hash);
    v
}

/// The last committed position of every chain in a read transaction, sorted by genesis
/// hash.
pub fn chain_positions(txn: &redb::ReadTransaction) -> Result<Vec<ChainPosition>, String> {
    let t = match txn.open_table(SKIPCHAIN_CHAINS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading skipchain_chains: {e}")),
    };
    let mut out = Vec::new();
    for r in t.iter().map_err(|e| e.to_string())? {
        let (k, v) = r.map_err(|e| e.to_string())?;
        let chain = <[u8; 32]>::try_from(k.value()).map_err(|_| {
            format!(
                "skipchain_chains: malformed key ({} bytes)",
                k.value().len()
            )
        })?;
        let (index, hash) = decode_position(v.value())?;
        out.push(ChainPosition { chain, index, hash });
    }
    Ok(out)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often the allocator figures are read again (they walk the whole tree in a write
/// transaction, so they hold the writers meanwhile: a tenth of a second per 250 MB).
const STATS_TTL: Duration = Duration::from_secs(30);
/// How often the table figures are read again (they walk every table).
const FIGURES_TTL: Duration = Duration::from_secs(2);

/// A figure too costly to compute on request (it walks the database): readers get the
/// last value at once, and a thread of its own computes it again once it is `ttl` old,
/// one computation at a time. A reader never waits for a computation; the very first
/// read finds none.
pub struct Refreshed<T> {
    slot: std::sync::Arc<Mutex<Option<(Instant, T)>>>,
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ttl: Duration,
    name: &'static str,
}

impl<T: Clone + Send + 'static> Refreshed<T> {
    /// `name` names the computing thread.
    pub fn new(name: &'static str, ttl: Duration) -> Refreshed<T> {
        Refreshed {
            slot: Default::default(),
            busy: Default::default(),
            ttl,
            name,
        }
    }

    /// The last value computed, if any; starts `compute` on a thread of its own when
    /// there is none or it is `ttl` old and no computation runs. `compute` returning
    /// `None` (its source is gone) keeps the old value.
    pub fn get(&self, compute: impl FnOnce() -> Option<T> + Send + 'static) -> Option<T> {
        use std::sync::atomic::Ordering;
        let cached = self.slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let stale = cached
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= self.ttl);
        if stale && !self.busy.swap(true, Ordering::SeqCst) {
            let (slot, busy) = (self.slot.clone(), self.busy.clone());
            let started = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || {
                    if let Some(v) = compute() {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), v));
                    }
                    busy.store(false, Ordering::SeqCst);
                });
            if started.is_err() {
                self.busy.store(false, Ordering::SeqCst);
            }
        }
        cached.map(|(_, v)| v)
    }

    /// Forget the value: the next read starts a computation.
    pub fn clear(&self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

pub struct Db {
    /// What the thread that reopens the database after an I/O error shares with the
    /// requests.
    shared: std::sync::Arc<Shared>,
    /// New blocks are refused while the data directory's filesystem would have less free
    /// space than this after them ([`Db::set_free_floor`]).
    free_floor: std::sync::atomic::AtomicU64,
    pub path: PathBuf,
    stats: Mutex<Option<(Instant, BTreeMap<String, String>)>>,
    figures: Refreshed<BTreeMap<String, String>>,
    /// Set by a final image ([`Db::image`] with `freeze`): no write commits any more (a
    /// switchover ships that image as the last word of this host); cleared by
    /// [`Db::thaw`] or a restart.
    frozen: std::sync::atomic::AtomicBool,
}

/// The part of [`Db`] that a reopen after an I/O error needs. The reopen runs on a
/// thread of its own ([`Shared::start_reopener`]), never on a request's path; the thread
/// holds this only while it tries, so a conode that stops is not kept open by it.
struct Shared {
    /// The database in service: the file's, or while it is closed for a reopen an empty
    /// stand-in in memory, which has no `meta` table: every read of it is refused
    /// ([`crate::skipchain::store::View::new`], [`owner_key`]), never answered as if the
    /// database were empty. Use [`Shared::db`].
    handle: std::sync::RwLock<std::sync::Arc<Database>>,
    health: Mutex<Health>,
    /// Pages written since each recent page image (see [`crate::dirty`]).
    dirty: std::sync::Arc<crate::dirty::DirtyLog>,
    path: PathBuf,
}

/// What the I/O errors did to the database.
#[derive(Default)]
struct Health {
    /// Set when redb latched an I/O error (a full disk): it then refuses every operation
    /// until the database is reopened. Cleared once the file is open again.
    broken: Option<String>,
    /// Whether a thread that reopens the database runs.
    reopener: bool,
    /// The last I/O error and what followed it, kept until the conode stops (Status
    /// shows it).
    last: Option<Episode>,
}

/// One I/O error and what followed it, until a block commits again: logged at `error`
/// when it happens, then in one `warn` line with a count at most every [`COUNT_EVERY`],
/// and once more when a block commits again.
struct Episode {
    error: String,
    at: Instant,
    /// Writes that failed again or were refused because of it, since it happened.
    repeats: u64,
    /// `repeats` at the last line that logged them, and when that line was (the error
    /// line at first).
    logged: (u64, Instant),
    /// Whether a reopen succeeded, and whether one failed (each logged once).
    reopened: bool,
    reopen_failed: bool,
    /// When a block committed again: the database has recovered.
    cleared: Option<Instant>,
}

/// Open the redb file at `path` with the page-tracking backend.
fn open_file(
    path: &Path,
    dirty: &std::sync::Arc<crate::dirty::DirtyLog>,
) -> Result<Database, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open database {}: {e}", path.display()))?;
    redb::backends::FileBackend::new(file)
        .and_then(|b| {
            redb::Builder::new().create_with_backend(crate::dirty::Tracked::new(b, dirty.clone()))
        })
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => format!(
                "database {} is already open by another process: is another conode with this key running?",
                path.display()
            ),
            e => format!(
                "cannot open database {}: {e}; if the file is damaged, restore it from a backup",
                path.display()
            ),
        })
}

/// The free space below which new blocks are refused, unless set otherwise
/// (`CONODE_MIN_FREE_MB`).
pub const DEFAULT_FREE_FLOOR: u64 = 64 << 20;
/// The free-space floor from `CONODE_MIN_FREE_MB` (mebibytes; 0 turns it off), else
/// [`DEFAULT_FREE_FLOOR`].
pub fn free_floor_from_env() -> Result<u64, String> {
    match std::env::var("CONODE_MIN_FREE_MB") {
        Err(_) => Ok(DEFAULT_FREE_FLOOR),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|mb| mb.checked_mul(1 << 20))
            .ok_or_else(|| {
                format!(
                    "CONODE_MIN_FREE_MB={v:?} is not a number of mebibytes (0 turns the floor off)"
                )
            }),
    }
}

/// How long the thread that reopens a database broken by an I/O error waits after a failed
/// attempt.
pub const RECOVER_EVERY: Duration = Duration::from_secs(2);
/// How long it waits while a request still holds the broken database (it cannot be closed
/// until then).
const REOPEN_BUSY: Duration = Duration::from_millis(50);
/// At most one line with the count of writes failed or refused after an I/O error per
/// this interval.
pub const COUNT_EVERY: Duration = Duration::from_secs(30);
/// What a reader gets while the database is closed for a reopen after an I/O error.
pub const REOPENING: &str = "the database is being reopened after an I/O error (a full disk?): reads are refused until it is open again, in a moment; try again";
/// redb may round a write up to twice its size on disk (its allocations are powers of two
/// pages), so a write of `n` bytes is counted as `WRITE_FACTOR * n` against the
/// free-space floor.
pub const WRITE_FACTOR: u64 = 2;

/// What a writer gets from a frozen database.
pub const FROZEN: &str = "this conode is handing over to its standby (frozen by failoverd for a switchover): no new block is accepted here; try again in a moment";

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
        let dirty = crate::dirty::DirtyLog::new();
        let db = open_file(path, &dirty)?;
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
            shared: std::sync::Arc::new(Shared {
                handle: std::sync::RwLock::new(std::sync::Arc::new(db)),
                health: Mutex::new(Health::default()),
                dirty,
                path: path.to_path_buf(),
            }),
            free_floor: std::sync::atomic::AtomicU64::new(DEFAULT_FREE_FLOOR),
            path: path.to_path_buf(),
            stats: Mutex::new(None),
            figures: Refreshed::new("db-figures", FIGURES_TTL),
            frozen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The database in service now: the file's, or while it is closed for a reopen after
    /// an I/O error a stand-in whose reads are refused ([`REOPENING`]).
    pub fn db(&self) -> std::sync::Arc<Database> {
        self.shared.db()
    }

    /// A write transaction for a write of about `need` bytes, unless the database is
    /// frozen ([`FROZEN`]). The check comes after the transaction began: a writer that
    /// waited for the writers' lock held by a final image sees the freeze that image set.
    ///
    /// Also refused: while the database is broken by an I/O error (a thread of its own
    /// reopens it); when the write would take the filesystem's free space below the
    /// floor ([`Db::set_free_floor`]): a full disk is never reached by new blocks; and
    /// after an I/O error, until a block commits again, when the free space cannot hold
    /// the write, also with the floor off.
    pub fn begin_write(&self, need: u64) -> Result<redb::WriteTransaction, String> {
        if let Some(e) = self.shared.refuse_while_broken() {
            return Err(format!(
                "new blocks are refused until the database is reopened (by itself, in a moment): {e}"
            ));
        }
        let free = self.free_bytes();
        self.floor_error(free, need)?;
        if let Some(e) = self.shared.refuse_without_room(free, need) {
            return Err(e);
        }
        let txn = self.db().begin_write().map_err(|e| {
            self.check_io(&e.to_string());
            e.to_string()
        })?;
        if self.is_frozen() {
            let _ = txn.abort();
            return Err(FROZEN.to_string());
        }
        Ok(txn)
    }

    /// Commit `txn`; an I/O error (a full disk) marks the database broken
    /// ([`Db::check_io`]), and the first commit after one ends it.
    pub fn commit(&self, txn: redb::WriteTransaction) -> Result<(), String> {
        match txn.commit() {
            Ok(()) => {
                self.shared.committed();
                Ok(())
            }
            Err(e) => {
                let e = e.to_string();
                self.check_io(&e);
                Err(e)
            }
        }
    }

    /// Set the free-space floor, in bytes (0: none).
    pub fn set_free_floor(&self, bytes: u64) {
        self.free_floor
            .store(bytes, std::sync::atomic::Ordering::SeqCst);
    }

    /// The free-space floor, in bytes (0: none).
    pub fn free_floor(&self) -> u64 {
        self.free_floor.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Why new blocks are refused now, or `None` if they are accepted: `broken` (the
    /// database's I/O error, if any), free space (`free` bytes) below the floor, a
    /// freeze, or no room for a page after an I/O error. Reads no table and reopens
    /// nothing.
    pub fn writes_refused(&self, broken: Option<&str>, free: Option<u64>) -> Option<String> {
        match (broken, self.floor_error(free, 0)) {
            (Some(e), _) => Some(e.to_string()),
            (None, Err(e)) => Some(e),
            (None, Ok(())) if self.is_frozen() => Some(FROZEN.to_string()),
            (None, Ok(())) => self.no_room_for_a_page(free),
        }
    }

    /// After an I/O error, until a block commits again: the refusal of the smallest
    /// write (one page) if `free` bytes cannot hold it ([`Shared::refuse_without_room`]).
    fn no_room_for_a_page(&self, free: Option<u64>) -> Option<String> {
        let h = self.shared.health();
        let ep = h.last.as_ref().filter(|ep| ep.cleared.is_none())?;
        self.shared.no_room(ep, free?, crate::dirty::PAGE)
    }

    /// Free bytes on the data directory's filesystem (for unprivileged users).
    pub fn free_bytes(&self) -> Option<u64> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let v = nix::sys::statvfs::statvfs(dir).ok()?;
        Some(v.blocks_available() as u64 * v.fragment_size() as u64)
    }

    /// The refusal of a write of about `need` bytes when `free` bytes minus what it may
    /// take on disk ([`WRITE_FACTOR`]) are below the floor. A floor of 0 refuses nothing.
    fn floor_error(&self, free: Option<u64>, need: u64) -> Result<(), String> {
        let floor = self.free_floor();
        let take = need.saturating_mul(WRITE_FACTOR);
        match free {
            Some(free) if floor > 0 && free < floor.saturating_add(take) => Err(if take == 0 {
                format!(
                    "disk nearly full: {} MiB free, below the floor of {} MiB (CONODE_MIN_FREE_MB): new blocks are refused until space is freed on the filesystem of {}",
                    free >> 20,
                    floor >> 20,
                    self.path.display()
                )
            } else {
                // The floor first: a WebSocket close reason keeps only 123 bytes.
                format!(
                    "disk nearly full: this write would take the free space below the floor of {} MiB (CONODE_MIN_FREE_MB): {} KiB free, the write {} KiB (up to {} KiB on disk); new blocks are refused until space is freed on the filesystem of {}",
                    floor >> 20,
                    free >> 10,
                    need.div_ceil(1 << 10),
                    take.div_ceil(1 << 10),
                    self.path.display()
                )
            }),
            _ => Ok(()),
        }
    }

    /// The I/O error that broke the database, while it is broken (until it is open
    /// again).
    pub fn broken_error(&self) -> Option<String> {
        self.shared.health().broken.clone()
    }

    /// After a failed write (`what` its error): whether redb now refuses every operation
    /// (it latches an I/O error until the database is reopened). If so the database is
    /// marked broken, a thread of its own reopens it, and the failure is logged at
    /// `error` once: later failures until a block commits again are counted
    /// ([`COUNT_EVERY`]).
    pub fn check_io(&self, what: &str) {
        self.shared.check_io(what)
    }

    /// Whether a final image froze the database.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Accept writes again (a switchover that was called off); returns whether the
    /// database was frozen.
    pub fn thaw(&self) -> bool {
        self.frozen.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// The `Db` section of Status. Never waits for a walk of the database, nor for a
    /// reopen: the figures that read every table (entries, redb's allocator statistics)
    /// are those of the last walk, which a thread of its own makes again once they are
    /// [`FIGURES_TTL`] old (the first call starts the first walk: a conode just started
    /// answers its first Status at once, without them).
    pub fn figures(self: &std::sync::Arc<Self>) -> BTreeMap<String, String> {
        use std::sync::atomic::Ordering;
        let mut f = BTreeMap::new();
        let broken = {
            let h = self.shared.health();
            if let Some(ep) = &h.last {
                f.insert("LastIoError".into(), ep.error.clone());
                f.insert(
                    "LastIoErrorAge".into(),
                    crate::status::go_duration(ep.at.elapsed()),
                );
                f.insert("LastIoErrorRepeats".into(), ep.repeats.to_string());
                f.insert(
                    "LastIoErrorCleared".into(),
                    ep.cleared.is_some().to_string(),
                );
            }
            h.broken.clone()
        };
        f.insert("Open".into(), broken.is_none().to_string());
        if let Some(e) = &broken {
            f.insert("Error".into(), e.clone());
        }
        let free = self.free_bytes();
        if let Some(free) = free {
            f.insert("FreeBytes".into(), free.to_string());
        }
        f.insert(
            "FreeFloorBytes".into(),
            self.free_floor.load(Ordering::SeqCst).to_string(),
        );
        let writes = match self.writes_refused(broken.as_deref(), free) {
            Some(e) => format!("refused: {e}"),
            None => "accepted".into(),
        };
        f.insert("Writes".into(), writes);
        f.insert("Path".into(), self.path.display().to_string());
        if let Ok(m) = std::fs::metadata(&self.path) {
            f.insert("FileBytes".into(), m.len().to_string());
        }
        let me = std::sync::Arc::downgrade(self);
        if let Some(v) = self
            .figures
            .get(move || me.upgrade().and_then(|db| db.read_figures()))
        {
            f.extend(v);
        }
        f.insert("Frozen".into(), self.is_frozen().to_string());
        f
    }

    /// The figures that walk the tables (see [`Db::figures`]); `None` while the
    /// database is broken or being reopened (the last figures stay).
    fn read_figures(&self) -> Option<BTreeMap<String, String>> {
        if self.broken_error().is_some() {
            return None;
        }
        let mut f = BTreeMap::new();
        if let Ok(r) = self.db().begin_read() {
            owner_key(&r).ok()?;
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
        Some(f)
    }

    fn allocator_figures(&self) -> BTreeMap<String, String> {
        let mut cache = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < STATS_TTL {
                return v.clone();
            }
        }
        // Never wait for the writers (an image holds them while it streams, for seconds
        // at most): Status answers with the figures it had, and tries again next time.
        let w = match self.db().try_begin_write() {
            Ok(w) => w,
            Err(_) => return cache.as_ref().map(|(_, v)| v.clone()).unwrap_or_default(),
        };
        let mut f = BTreeMap::new();
        {
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

impl Shared {
    fn db(&self) -> std::sync::Arc<Database> {
        self.handle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See [`Db::check_io`].
    fn check_io(self: &std::sync::Arc<Self>, what: &str) {
        let latched = match self.db().try_begin_write() {
            Err(redb::TransactionError::Storage(
                redb::StorageError::Io(_) | redb::StorageError::PreviousIo,
            )) => true,
            Ok(t) => {
                let _ = t.abort();
                false
            }
            Err(_) => what.contains("I/O") || what.contains("No space"),
        };
        if !latched {
            return;
        }
        let mut h = self.health();
        if h.broken.is_none() {
            h.broken = Some(format!("the database failed with an I/O error ({what})"));
        }
        match h.last.as_mut() {
            Some(ep) if ep.cleared.is_none() => {
                ep.repeats += 1;
                self.count_line(ep, "failing");
            }
            _ => {
                tracing::error!(
                    "database {}: a write failed ({what}); redb refuses every operation until the database is reopened, which the conode does by itself at once (reads are served again then; new blocks are refused while there is no room for them or they would go below the free-space floor, CONODE_MIN_FREE_MB); acknowledged blocks are safe in the file; later failures are counted, not logged each",
                    self.path.display()
                );
                let now = Instant::now();
                h.last = Some(Episode {
                    error: format!("{what} (in the database {})", self.path.display()),
                    at: now,
                    repeats: 0,
                    logged: (0, now),
                    reopened: false,
                    reopen_failed: false,
                    cleared: None,
                });
            }
        }
        self.start_reopener(&mut h);
    }

    /// While the database is broken: the error, with the refusal counted (and the
    /// reopen started if it does not run).
    fn refuse_while_broken(self: &std::sync::Arc<Self>) -> Option<String> {
        let mut h = self.health();
        let e = h.broken.clone()?;
        if let Some(ep) = h.last.as_mut().filter(|ep| ep.cleared.is_none()) {
            ep.repeats += 1;
            self.count_line(ep, "still broken");
        }
        self.start_reopener(&mut h);
        Some(e)
    }

    /// After an I/O error, until a block commits again: the refusal (counted) of a write
    /// of about `need` bytes that the `free` bytes cannot hold ([`WRITE_FACTOR`]), also
    /// with the floor off. It would fail as the last one did and close the database for
    /// another reopen (reads are refused meanwhile).
    fn refuse_without_room(&self, free: Option<u64>, need: u64) -> Option<String> {
        let mut h = self.health();
        let ep = h.last.as_mut().filter(|ep| ep.cleared.is_none())?;
        let e = self.no_room(ep, free?, need)?;
        ep.repeats += 1;
        self.count_line(ep, "open, the disk full");
        Some(e)
    }

    /// Whether `free` bytes cannot hold a write of about `need` bytes, in the I/O error
    /// episode `ep` (see [`Shared::refuse_without_room`]): the refusal.
    fn no_room(&self, ep: &Episode, free: u64, need: u64) -> Option<String> {
        let take = need.saturating_mul(WRITE_FACTOR);
        if free >= take {
            return None;
        }
        // What matters first: a WebSocket close reason keeps only 123 bytes.
        Some(format!(
            "disk full: no room for this write since the I/O error ({} KiB free, up to {} KiB needed); new blocks are refused until space is freed on the filesystem of {} (the last write failed with: {})",
            free >> 10,
            take.div_ceil(1 << 10),
            self.path.display(),
            ep.error
        ))
    }

    /// The line with the count of writes failed or refused since the I/O error, when the
    /// last such line (or the error's) is [`COUNT_EVERY`] old.
    fn count_line(&self, ep: &mut Episode, state: &str) {
        if ep.logged.1.elapsed() < COUNT_EVERY {
            return;
        }
        tracing::warn!(
            "database {}: {} more write(s) failed or were refused since the I/O error {} ago ({} in all; the database is {state}; one line per {COUNT_EVERY:?} at most)",
            self.path.display(),
            ep.repeats - ep.logged.0,
            crate::status::go_duration(ep.at.elapsed()),
            ep.repeats
        );
        ep.logged = (ep.repeats, Instant::now());
    }

    /// A block committed: the end of the I/O error's episode, if one is open (logged).
    fn committed(&self) {
        let mut h = self.health();
        if let Some(ep) = h.last.as_mut().filter(|ep| ep.cleared.is_none()) {
            ep.cleared = Some(Instant::now());
            tracing::info!(
                "database {}: a block committed again {} after the I/O error: writes are accepted again ({} write(s) failed or were refused meanwhile)",
                self.path.display(),
                crate::status::go_duration(ep.at.elapsed()),
                ep.repeats
            );
        }
    }

    /// Start the thread that reopens the broken database, unless it runs or the database
    /// is not broken. `h` is the health, locked.
    fn start_reopener(self: &std::sync::Arc<Self>, h: &mut Health) {
        if h.reopener || h.broken.is_none() {
            return;
        }
        let me = std::sync::Arc::downgrade(self);
        let started = std::thread::Builder::new()
            .name("db-reopen".into())
            .spawn(move || {
                let mut stand_in = false;
                loop {
                    let Some(shared) = me.upgrade() else {
                        return;
                    };
                    let Some(wait) = shared.try_reopen(&mut stand_in) else {
                        return;
                    };
                    drop(shared);
                    std::thread::sleep(wait);
                }
            });
        match started {
            Ok(_) => h.reopener = true,
            Err(e) => tracing::warn!(
                "database {}: cannot start the thread that reopens it: {e}; trying again at the next write",
                self.path.display()
            ),
        }
    }

    /// One attempt to reopen the broken database: `None` once it is open again (or was
    /// not broken; the reopener then ends), else how long to wait before the next.
    ///
    /// The broken database is closed (only once no request holds it: until then its
    /// cached pages still answer reads, the others fail with redb's I/O error), an empty
    /// stand-in whose reads are refused takes its place (`stand_in` says it did), and the
    /// file is opened again, which redb repairs from its last commit (every acknowledged
    /// block is in it), also on a disk still full. Requests wait for none of it: they
    /// take the handle's lock only to clone it, and this takes it only to swap it.
    fn try_reopen(&self, stand_in: &mut bool) -> Option<Duration> {
        {
            let mut h = self.health();
            if h.broken.is_none() {
                h.reopener = false;
                return None;
            }
        }
        if !*stand_in {
            let fresh = match redb::Builder::new()
                .create_with_backend(redb::backends::InMemoryBackend::new())
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("database {}: cannot reopen: {e}", self.path.display());
                    return Some(RECOVER_EVERY);
                }
            };
            let broken = {
                let mut handle = self.handle.write().unwrap_or_else(|p| p.into_inner());
                if std::sync::Arc::strong_count(&handle) > 1 {
                    return Some(REOPEN_BUSY);
                }
                std::mem::replace(&mut *handle, std::sync::Arc::new(fresh))
            };
            *stand_in = true;
            // The last reference: this closes it (redb leaves the file to the next open).
            drop(broken);
        }
        match open_file(&self.path, &self.dirty) {
            Ok(db) => {
                let db = std::sync::Arc::new(db);
                *self.handle.write().unwrap_or_else(|p| p.into_inner()) = db;
                *stand_in = false;
                let mut h = self.health();
                h.broken = None;
                h.reopener = false;
                if let Some(ep) = h.last.as_mut().filter(|ep| !ep.reopened) {
                    ep.reopened = true;
                    tracing::info!(
                        "database {}: reopened {} after the I/O error: reads are served again; writes resume once there is room (logged when a block commits)",
                        self.path.display(),
                        crate::status::go_duration(ep.at.elapsed())
                    );
                }
                None
            }
            Err(e) => {
                let mut h = self.health();
                if let Some(ep) = h.last.as_mut().filter(|ep| !ep.reopen_failed) {
                    ep.reopen_failed = true;
                    tracing::warn!(
                        "database {}: cannot reopen yet ({e}); trying again every {RECOVER_EVERY:?} (logged once; reads are refused until then)",
                        self.path.display()
                    );
                }
                Some(RECOVER_EVERY)
            }
        }
    }
}

/// Where one chain stands: its genesis hash, and the index and hash of its latest block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainPosition {
    pub chain: [u8; 32],
    pub index: u32,
    pub hash: [u8; 32],
}

/// The 32-byte owner key in `meta`, as seen by `read`.
pub fn owner_key(read: &redb::ReadTransaction) -> Result<[u8; 32], String> {
    if let Err(redb::TableError::TableDoesNotExist(_)) = read.open_table(META) {
        return Err(format!(
            "the database has no meta table: not a conode's database, or {REOPENING}"
        ));
    }
    read.open_table(META)
        .and_then(|t| Ok(t.get(META_PUBLIC)?.map(|v| v.value().to_vec())))
        .map_err(|e| format!("cannot read the owner key: {e}"))?
        .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| "the database has no 32-byte owner key in meta".to_string())
}

/// What [`Db::snapshot_to`] wrote.
///
/// Transaction-consistent: the positions, the figures and every table in the file were read
/// in one redb read transaction, so the copy holds each commit of the live database
/// entirely or not at all, as it stood when that transaction began (`taken_unix_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Size of the snapshot file.
    pub bytes: u64,
    /// The owner key from `meta`.
    pub public: [u8; 32],
    /// The chain positions in the copied state.
    pub positions: Vec<ChainPosition>,
    /// Entries copied, per table name.
    pub tables: BTreeMap<String, u64>,
    /// When the read transaction began (milliseconds since the Unix epoch).
    pub taken_unix_ms: u64,
}

impl Db {
    /// Copy the committed state into a new redb file at `dest`, while writers carry on.
    ///
    /// One `begin_read()`; `dest` must not exist (it is created owner-only). `meta` is
    /// copied as `&str → &[u8]`, every other table as `&[u8] → &[u8]` (the convention for
    /// our tables); a table with other types, or a multimap table, is an error naming it.
    /// The copy is written in one write transaction, closed and fsynced. On error `dest` is
    /// removed. Blocking: run it on a blocking thread.
    pub fn snapshot_to(&self, dest: &Path) -> Result<SnapshotInfo, String> {
        use std::os::unix::fs::OpenOptionsExt;
        // Claim the name first: never write into a file somebody else owns.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| format!("cannot create the snapshot file {}: {e}", dest.display()))?;
        let r = self.copy_into(dest);
        if r.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        r
    }

    fn copy_into(&self, dest: &Path) -> Result<SnapshotInfo, String> {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "snapshot of {} into {}: {what}: {e}",
                self.path.display(),
                dest.display()
            )
        };
        let read = self
            .db()
            .begin_read()
            .map_err(|e| ctx("cannot begin a read transaction", &e))?;
        // A stand-in (the database being reopened after an I/O error) is refused here.
        owner_key(&read).map_err(|e| ctx("refusing", &e))?;
        let taken_unix_ms = unix_ms();
        let positions = chain_positions(&read)?;
        if let Some(t) = read
            .list_multimap_tables()
            .map_err(|e| ctx("cannot list the multimap tables", &e))?
            .next()
        {
            return Err(format!(
                "snapshot of {}: table {} is a multimap table, which a snapshot cannot copy: this is a bug (every table other than meta must map bytes to bytes)",
                self.path.display(),
                t.name()
            ));
        }
        let out = Database::create(dest).map_err(|e| ctx("cannot create the copy", &e))?;
        let write = out
            .begin_write()
            .map_err(|e| ctx("cannot begin writing the copy", &e))?;
        let mut tables = BTreeMap::new();
        let mut public = None;
        {
            let src = read
                .open_table(META)
                .map_err(|e| ctx("cannot open table meta", &e))?;
            let mut dst = write
                .open_table(META)
                .map_err(|e| ctx("cannot create table meta in the copy", &e))?;
            let mut n = 0u64;
            for r in src.iter().map_err(|e| ctx("reading table meta", &e))? {
                let (k, v) = r.map_err(|e| ctx("reading table meta", &e))?;
                if k.value() == META_PUBLIC {
                    public = <[u8; 32]>::try_from(v.value()).ok();
                }
                dst.insert(k.value(), v.value())
                    .map_err(|e| ctx("writing table meta", &e))?;
                n += 1;
            }
            tables.insert("meta".to_string(), n);
        }
        let Some(public) = public else {
            return Err(format!(
                "snapshot of {}: the meta table has no 32-byte owner key: refusing to copy a database that belongs to no conode",
                self.path.display()
            ));
        };
        let names: Vec<String> = read
            .list_tables()
            .map_err(|e| ctx("cannot list the tables", &e))?
            .map(|t| t.name().to_string())
            .filter(|n| n != META.name())
            .collect();
        for name in names {
            let def: TableDefinition<&[u8], &[u8]> = TableDefinition::new(&name);
            let src = read.open_table(def).map_err(|e| match e {
                redb::TableError::TableTypeMismatch { key, value, .. } => format!(
                    "snapshot of {}: table {name} maps {} to {}, not bytes to bytes, so a snapshot cannot copy it: this is a bug (every table other than meta must map bytes to bytes)",
                    self.path.display(),
                    key.name(),
                    value.name()
                ),
                e => ctx(&format!("cannot open table {name}"), &e),
            })?;
            let mut dst = write
                .open_table(def)
                .map_err(|e| ctx(&format!("cannot create table {name} in the copy"), &e))?;
            let mut n = 0u64;
            for r in src
                .iter()
                .map_err(|e| ctx(&format!("reading table {name}"), &e))?
            {
                let (k, v) = r.map_err(|e| ctx(&format!("reading table {name}"), &e))?;
                dst.insert(k.value(), v.value())
                    .map_err(|e| ctx(&format!("writing table {name}"), &e))?;
                n += 1;
            }
            tables.insert(name, n);
        }
        drop(read);
        write
            .commit()
            .map_err(|e| ctx("cannot commit the copy", &e))?;
        out.close().map_err(|e| ctx("cannot close the copy", &e))?;
        let f = std::fs::File::open(dest).map_err(|e| ctx("cannot reopen the copy", &e))?;
        f.sync_all().map_err(|e| ctx("cannot fsync the copy", &e))?;
        let bytes = f
            .metadata()
            .map_err(|e| ctx("cannot stat the copy", &e))?
            .len();
        Ok(SnapshotInfo {
            bytes,
            public,
            positions,
            tables,
            taken_unix_ms,
        })
    }
}

/// A page image of the live database file as it stood at one commit: what
/// [`Db::image`] returns, read with [`Image::read_at`].
///
/// The image is the file's bytes, not a copy through redb: pages keep their offsets, so two
/// images taken a little apart differ only in the pages written between them, and a
/// manifest of fixed places finds the rest unchanged. The file is a crash image of that
/// commit (its header says recovery is required, as the live file's does while the conode
/// has it open), so opening it makes redb walk and check every tree once; check it with
/// [`verify_snapshot`] before trusting it.
pub struct Image {
    /// Length of the file when the image was taken.
    pub bytes: u64,
    pub public: [u8; 32],
    pub positions: Vec<ChainPosition>,
    /// When the image's commit was pinned (milliseconds since the Unix epoch).
    pub taken_unix_ms: u64,
    /// Names this image's state: ask `since` it next time for only what changed.
    pub token: String,
    /// With a `since` token the log still kept: the pages ([`crate::dirty::PAGE`] bytes
    /// each, within `bytes`) written since, sorted. The image is then those pages only;
    /// every other byte below `bytes` is as in the image that token named (bytes past its
    /// end, zeros).
    pub changed: Option<Vec<u64>>,
    file: std::fs::File,
    path: PathBuf,
    // Held (never committed) until the image is dropped: no commit can run, so no page of
    // the file changes while it is read. A read transaction would not do: it keeps the
    // data pages of its commit, but redb frees the pages of the system tree (which the
    // commit's header names and a repair checks) as soon as the next commit is done.
    _writers: redb::WriteTransaction,
}

impl Db {
    /// Hold the writers and return a page image of the latest commit. Writers wait until
    /// the image is dropped: read it promptly.
    ///
    /// Why the bytes are consistent: every commit here is durable, so when no write
    /// transaction runs the file holds exactly the latest commit (redb's crash image of it),
    /// and none runs while the image is held. Blocking: run it on a blocking thread.
    ///
    /// With `freeze` (a switchover's final image) the database is frozen while the
    /// writers are held: once the image is dropped, writers get [`FROZEN`] instead of a
    /// commit, so the image stays this database's last state until [`Db::thaw`] or a
    /// restart. An image of a frozen database is allowed (a final image asked again).
    pub fn image(&self, since: Option<&str>, freeze: bool) -> Result<Image, String> {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            format!("page image of {}: {what}: {e}", self.path.display())
        };
        if let Some(e) = self.broken_error() {
            return Err(ctx("refused until the database is reopened", &e));
        }
        let file = std::fs::File::open(&self.path).map_err(|e| ctx("cannot open", &e))?;
        // First a commit that records the allocator state (redb's quick repair): the image
        // is a crash image, and a conode opening it (a standby taking over) then loads
        // that state instead of walking every tree to rebuild it. One small commit, only
        // when something was written since the last image.
        let mut record = self
            .db()
            .begin_write()
            .map_err(|e| ctx("cannot hold the writers", &e))?;
        if freeze {
            self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if self.shared.dirty.written_since_newest() {
            record.set_quick_repair(true);
            record
                .commit()
                .map_err(|e| ctx("cannot record the allocator state", &e))?;
        } else {
            let _ = record.abort();
        }
        // A writer may slip in here: the image is then of its commit (correct, a slower
        // repair); a frozen database refuses it.
        let writers = self
            .db()
            .begin_write()
            .map_err(|e| ctx("cannot hold the writers", &e))?;
        let read = self
            .db()
            .begin_read()
            .map_err(|e| ctx("cannot begin a read transaction", &e))?;
        let taken_unix_ms = unix_ms();
        let bytes = file.metadata().map_err(|e| ctx("cannot stat", &e))?.len();
        let positions = chain_positions(&read)?;
        let public = owner_key(&read).map_err(|e| ctx("refusing", &e))?;
        let (token, changed) = self.shared.dirty.rotate(since);
        let changed = changed.map(|mut pages| {
            pages.retain(|p| p * crate::dirty::PAGE < bytes);
            pages
        });
        Ok(Image {
            bytes,
            public,
            positions,
            taken_unix_ms,
            token,
            changed,
            file,
            path: self.path.clone(),
            _writers: writers,
        })
    }
}

impl Image {
    /// Fill `buf` with the image's bytes from `offset` (which must be within the image).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let end = offset + buf.len() as u64;
        if end > self.bytes {
            return Err(format!(
                "page image of {}: read of {offset}..{end} past its {} bytes: this is a bug",
                self.path.display(),
                self.bytes
            ));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            format!(
                "page image of {}: cannot read {offset}..{end}: {e}",
                self.path.display()
            )
        })
    }
}

/// Check a snapshot file before trusting it: redb's integrity check (the checksum of every
/// page), the owner key in `meta` equal to `expected_public`, and well-formed chain
/// positions, which it returns.
///
/// The file is never modified: redb's check writes (its header, allocator state) go to an
/// in-memory overlay ([`Overlay`]), so the bytes checked are the bytes kept, and a manifest
/// of them stays true. Do not check a database a running conode has open (its writes would
/// race the check). A file whose latest commit fails its checksums is refused, although
/// redb could fall back to the commit before it (that would drop what was saved last).
pub fn verify_snapshot(
    path: &Path,
    expected_public: &[u8; 32],
) -> Result<Vec<ChainPosition>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() == 0 {
        return Err(format!("{} is empty: not a database", path.display()));
    }
    // redb reports a damaged file as an error when asked to check on open, but some of its
    // consistency checks are debug assertions in debug builds: a panic is a damaged file too.
    let checked = std::panic::catch_unwind(|| verify_inner(path, expected_public));
    match checked {
        Ok(r) => r,
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(format!(
                "{} is damaged: redb failed while checking it ({why})",
                path.display()
            ))
        }
    }
}

/// redb's page cache while a snapshot is checked.
const VERIFY_CACHE: usize = 16 << 20;

fn verify_inner(path: &Path, expected_public: &[u8; 32]) -> Result<Vec<ChainPosition>, String> {
    let damaged = |e: &dyn std::fmt::Display| {
        format!(
            "{} is damaged: redb integrity check failed: {e}",
            path.display()
        )
    };
    let backend =
        Overlay::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // The open checks every page reachable from the latest commit and rebuilds the
    // allocator from them (two walks; a second `check_integrity` would walk twice more and
    // find nothing new). redb reports the repair's progress: 0.3 only when the latest
    // commit failed its checksums and it falls back to the one before, which would
    // silently drop what was saved last, so that aborts the check.
    let fell_back = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = fell_back.clone();
    let db = redb::Builder::new()
        .set_check_integrity_on_open(true)
        // Every page is read once per walk: a cache would only cost memory.
        .set_cache_size(VERIFY_CACHE)
        .set_repair_callback(move |r| {
            if (0.2..0.5).contains(&r.progress()) {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                r.abort();
            }
        })
        .create_with_backend(backend)
        .map_err(|e| match e {
            redb::DatabaseError::RepairAborted
                if fell_back.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                format!(
                    "{} is damaged: its latest commit fails redb's checksums, so it may not hold what was saved",
                    path.display()
                )
            }
            redb::DatabaseError::DatabaseAlreadyOpen => format!(
                "{} is open by another process (a running conode?): cannot check it",
                path.display()
            ),
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::InvalidData =>
            {
                format!("{} is not a redb database ({io})", path.display())
            }
            e => damaged(&e),
        })?;
    let read = db.begin_read().map_err(|e| damaged(&e))?;
    let owner = match read.open_table(META) {
        Ok(t) => t
            .get(META_PUBLIC)
            .map_err(|e| damaged(&e))?
            .map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(damaged(&e)),
    };
    match owner {
        None => {
            return Err(format!(
                "{} has no owner key in its meta table: not a conode database, or a damaged one",
                path.display()
            ))
        }
        Some(o) if o != expected_public => {
            return Err(format!(
                "{} belongs to conode {}, not to {}",
                path.display(),
                hex::encode(&o),
                hex::encode(expected_public)
            ))
        }
        Some(_) => {}
    }
    chain_positions(&read).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_reads_what_a_file_would_hold_and_never_writes_the_file() {
        use redb::StorageBackend;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let file: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &file).unwrap();
        let o = Overlay::open(&p).unwrap();
        // The model: what a real file would hold after the same calls.
        let mut model = file.clone();
        for round in 0..400 {
            match next(4) {
                0 => {
                    let at = next(70_000);
                    let data: Vec<u8> = (0..next(20_000)).map(|_| next(256) as u8).collect();
                    o.write(at, &data).unwrap();
                    let end = at as usize + data.len();
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[at as usize..end].copy_from_slice(&data);
                }
                1 => {
                    let len = next(70_000);
                    o.set_len(len).unwrap();
                    model.resize(len as usize, 0);
                }
                _ => {
                    let len = model.len() as u64;
                    let at = next(len + 1);
                    let n = next(len - at + 1) as usize;
                    let mut out = vec![0xeeu8; n];
                    o.read(at, &mut out).unwrap();
                    assert_eq!(
                        out,
                        model[at as usize..][..n],
                        "round {round}: {n} bytes at {at}"
                    );
                }
            }
            assert_eq!(o.len().unwrap(), model.len() as u64);
        }
        if let Some(last) = (model.len() as u64).checked_sub(1) {
            assert!(o.read(last, &mut [0u8; 2]).is_err(), "a read past the end");
        }
        assert_eq!(std::fs::read(&p).unwrap(), file, "the file was written");
    }

    #[test]
    fn a_database_is_never_opened_under_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let db = std::sync::Arc::new(Db::open(&p, &[1; 32]).unwrap());
        assert_eq!(db.figures()["Open"], "true");
        // The walk runs beside the caller: its figures come with a later call.
        let t = Instant::now();
        while !db.figures().contains_key("Tables") && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(db.figures()["Tables"], "1");
        while std::sync::Arc::strong_count(&db) > 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(db);
        Db::open(&p, &[1; 32]).unwrap();
        let e = Db::open(&p, &[2; 32]).err().unwrap();
        assert!(e.contains("belongs to conode 0101"), "{e}");
    }

    /// failoverd leaves the free pages of a snapshot as holes: the overlay reads them as
    /// zeros without reading the file there, every other byte as the file holds it, and
    /// the check of the sparse file passes as the check of the whole one does.
    #[test]
    fn a_sparse_snapshot_reads_as_its_bytes_and_verifies() {
        use redb::StorageBackend;
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        {
            let db = Db::open(&p, &[7; 32]).unwrap();
            for i in 0..24u8 {
                let w = db.db().begin_write().unwrap();
                {
                    // 64 KiB values: redb gives each a 128 KiB page, half of it zeros.
                    let mut t = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
                    let v: Vec<u8> = (0..65536u32).map(|j| (j as u8) ^ i | 1).collect();
                    t.insert(&[i; 32][..], &v[..]).unwrap();
                }
                w.commit().unwrap();
            }
        }
        let full = std::fs::read(&p).unwrap();
        let sparse = dir.path().join("sparse.db");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&sparse)
            .unwrap();
        f.set_len(full.len() as u64).unwrap();
        let mut holes = Vec::new();
        for (i, c) in full.chunks(4096).enumerate() {
            if c.iter().all(|&b| b == 0) {
                holes.push(i as u64 * 4096);
            } else {
                f.write_all_at(c, i as u64 * 4096).unwrap();
            }
        }
        f.sync_all().unwrap();
        // (Debug builds of redb fill free page space with 0xff, release builds leave zeros.)
        assert!(
            holes.len() >= 4,
            "the image has zero pages: {}",
            holes.len()
        );
        let o = Overlay::open(&sparse).unwrap();
        assert!(
            !o.seek_extent(holes[holes.len() / 2]).0,
            "the filesystem reports the hole"
        );
        let n = full.len() as u64;
        for (off, len) in [
            (0, n),
            (12_305, 300_001),
            (n - 70_000, 70_000),
            (holes[3], 4096),
        ] {
            let mut b = vec![0xa5u8; len as usize];
            o.read(off, &mut b).unwrap();
            assert!(
                b[..] == full[off as usize..(off + len) as usize],
                "bytes {off}+{len} differ"
            );
        }
        assert_eq!(verify_snapshot(&sparse, &[7; 32]).unwrap(), Vec::new());
        // A byte flipped in a value (a written range) is still found.
        let v5: Vec<u8> = (0..64u32).map(|j| (j as u8) ^ 5 | 1).collect();
        let at = full.windows(64).position(|w| w == &v5[..]).unwrap() as u64 + 1000;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
        assert!(verify_snapshot(&sparse, &[7; 32]).is_err());
    }

    /// The floor counts the write: refused when free space minus what the write may
    /// take would go below it, whatever the free space before; a floor of 0 refuses
    /// nothing.
    #[test]
    fn the_free_space_floor_counts_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db"), &[1; 32]).unwrap();
        let free = db.free_bytes().unwrap();
        // 200 MiB above the floor (other writers on this disk move it by less meanwhile).
        let floor = free
            .checked_sub(200 << 20)
            .expect("the test needs 200 MiB free in the temporary directory");
        db.set_free_floor(floor);
        db.begin_write(10 << 20).unwrap().abort().unwrap();
        let e = db.begin_write(150 << 20).err().unwrap();
        assert!(
            e.contains("would take the free space below the floor")
                && e.contains("the write 153600 KiB (up to 307200 KiB on disk)"),
            "{e}"
        );
        assert!(db.writes_refused(None, db.free_bytes()).is_none());
        db.set_free_floor(0);
        db.begin_write(u64::MAX / 4).unwrap().abort().unwrap();
    }

    /// Nothing on this database is the stand-in's: a view of it is served; a view of a
    /// database without `meta` (the stand-in during a reopen) is refused.
    #[test]
    fn a_view_of_the_stand_in_is_refused_not_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db"), &[1; 32]).unwrap();
        let v = crate::skipchain::store::View::new(&db.db()).unwrap();
        assert_eq!(v.block_bare(&[9; 32]).unwrap(), None);
        let stand_in = redb::Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        let e = crate::skipchain::store::View::new(&stand_in).err().unwrap();
        assert!(e.contains(REOPENING), "{e}");
        let r = stand_in.begin_read().unwrap();
        let e = owner_key(&r).err().unwrap();
        assert!(e.contains(REOPENING), "{e}");
    }

    /// redb's file backend whose writes fail with "No space left on device" while `full`
    /// is set: a disk filled by another writer.
    #[derive(Debug)]
    struct Full {
        inner: crate::dirty::Tracked,
        full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl redb::StorageBackend for Full {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.inner.close()
        }
        fn try_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }
        fn lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_shared_range(start, end)
        }
        fn unlock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.query_lock_range(start, end)
        }
    }

    /// A write failing with an I/O error shows in Status (also once the database is
    /// open again, until a block commits), the database is reopened by a thread of its
    /// own (the reopen opens the file with redb's plain backend, whose writes succeed),
    /// and a reader hammering it meanwhile gets the block or a clear error, never "no
    /// such block".
    #[test]
    fn an_io_error_shows_in_status_and_the_database_reopens_by_itself() {
        use crate::skipchain::block::SkipBlock;
        use prost::Message;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.db");
        let db = Arc::new(Db::open(&p, &[3; 32]).unwrap());
        db.set_free_floor(0);
        let put = |k: u8| -> Result<(), String> {
            let w = db.begin_write(200)?;
            {
                let mut t = w.open_table(SKIPCHAIN_BLOCKS).map_err(|e| e.to_string())?;
                let b = SkipBlock {
                    index: k as i32,
                    data: vec![k; 100],
                    ..Default::default()
                };
                t.insert(&[k; 32][..], &b.encode_to_vec()[..])
                    .map_err(|e| e.to_string())?;
            }
            db.commit(w)
        };
        put(1).unwrap();
        // The file, served from now on through a backend whose writes fail.
        let full = Arc::new(AtomicBool::new(false));
        {
            let mut h = db.shared.handle.write().unwrap();
            let tmp = redb::Builder::new()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .unwrap();
            drop(std::mem::replace(&mut *h, Arc::new(tmp)));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .unwrap();
            let inner = crate::dirty::Tracked::new(
                redb::backends::FileBackend::new(file).unwrap(),
                db.shared.dirty.clone(),
            );
            let b = Full {
                inner,
                full: full.clone(),
            };
            *h = Arc::new(redb::Builder::new().create_with_backend(b).unwrap());
        }
        full.store(true, Ordering::SeqCst);
        assert!(!db.figures().contains_key("LastIoError"));
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let reader = {
            let (db, stop, served) = (db.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut refused = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let r = crate::skipchain::store::View::new(&db.db())
                        .and_then(|v| v.block_bare(&[1; 32]));
                    match r {
                        Ok(Some(b)) => {
                            assert_eq!(b.index, 1);
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(None) => panic!("an acknowledged block read as missing"),
                        Err(e) => {
                            assert!(e.contains("I/O error") || e.contains("closed"), "{e}");
                            refused += 1;
                        }
                    }
                }
                refused
            })
        };
        // `served` went past `n` (the reader reads, loaded machine or not).
        let served_past = |n: u32| {
            let t = Instant::now();
            while served.load(Ordering::SeqCst) <= n {
                assert!(t.elapsed() < Duration::from_secs(10), "the reader reads");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        served_past(0);
        let e = put(2).err().unwrap();
        assert!(e.contains("No space left on device"), "{e}");
        let f = db.figures();
        assert!(
            f["LastIoError"].contains("No space left on device"),
            "{f:?}"
        );
        assert_eq!(f["LastIoErrorCleared"], "false", "{f:?}");
        // Open again by itself.
        let t = Instant::now();
        while db.broken_error().is_some() {
            assert!(t.elapsed() < Duration::from_secs(10), "never reopened");
            std::thread::sleep(Duration::from_millis(5));
        }
        let f = db.figures();
        assert_eq!(f["Open"], "true", "{f:?}");
        assert!(
            f["LastIoError"].contains("No space left on device"),
            "{f:?}"
        );
        assert_eq!(
            f["LastIoErrorCleared"], "false",
            "until a block commits: {f:?}"
        );
        served_past(served.load(Ordering::SeqCst));
        put(3).unwrap();
        stop.store(true, Ordering::SeqCst);
        let refused = reader.join().unwrap();
        eprintln!(
            "{} reads served, {refused} refused",
            served.load(Ordering::SeqCst)
        );
        let f = db.figures();
        assert_eq!(f["LastIoErrorCleared"], "true", "{f:?}");
        let v = crate::skipchain::store::View::new(&db.db()).unwrap();
        assert!(v.block_bare(&[1; 32]).unwrap().is_some());
        assert!(
            v.block_bare(&[2; 32]).unwrap().is_none(),
            "never acknowledged"
        );
        assert!(v.block_bare(&[3; 32]).unwrap().is_some());
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

/// Whether `file` holds data at `pos`, and up to where that stays so, as the filesystem
/// says (`SEEK_DATA`, `SEEK_HOLE`): `(false, end)` for a hole (it reads as zeros). `len` is
/// the answer's end when the filesystem cannot tell, which then counts as data (read it).
pub fn extent_at(file: &std::fs::File, pos: u64, len: u64) -> (bool, u64) {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let Ok(off) = nix::libc::off_t::try_from(pos) else {
        return (true, len);
    };
    // Callers read and write at positions only, so the file offset lseek moves is never
    // used.
    let data = match lseek(file, off, Whence::SeekData) {
        Ok(data) => data,
        // ENXIO: no data from here to the end. Anything else (no support): data.
        Err(e) => return (e != Errno::ENXIO, len),
    };
    if data as u64 > pos {
        return (false, data as u64);
    }
    match lseek(file, off, Whence::SeekHole) {
        Ok(hole) if hole > off => (true, hole as u64),
        _ => (true, len),
    }
}

/// A redb storage backend that reads a file and keeps every write in memory: redb can run
/// its integrity check (which commits) without changing a byte of the file.
#[derive(Debug)]
pub struct Overlay {
    file: std::fs::File,
    file_len: u64,
    state: Mutex<OverlayState>,
}

#[derive(Debug)]
struct OverlayState {
    len: u64,
    /// File bytes at or past this offset read as zeros (the file was "truncated" here).
    visible: u64,
    pages: std::collections::HashMap<u64, Box<[u8; OVERLAY_PAGE]>>,
    /// The last extent of the file found: (holds data, start, end).
    extent: (bool, u64, u64),
}

const OVERLAY_PAGE: usize = 4096;

impl Overlay {
    pub fn open(path: &Path) -> std::io::Result<Overlay> {
        let file = std::fs::File::open(path)?;
        let file_len = file.metadata()?.len();
        Ok(Overlay {
            file,
            file_len,
            state: Mutex::new(OverlayState {
                len: file_len,
                visible: file_len,
                pages: Default::default(),
                extent: (true, 0, 0),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OverlayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's bytes from `at` (zeros past its end). Holes in the file (ranges never
    /// written, as the free pages of a snapshot whose zeros were not sent) are not read:
    /// the filesystem says where they are (`SEEK_DATA`/`SEEK_HOLE`) and they are zeros,
    /// so checking a sparse file does not fill the page cache with zero pages.
    fn file_range(&self, st: &mut OverlayState, at: u64, out: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = self.file_len.min(st.visible);
        let avail = if at < end {
            ((end - at) as usize).min(out.len())
        } else {
            0
        };
        let mut done = 0usize;
        while done < avail {
            let pos = at + done as u64;
            let (data, upto) = self.extent_at(st, pos);
            let n = ((upto - pos) as usize).min(avail - done);
            if data {
                self.file.read_exact_at(&mut out[done..done + n], pos)?;
            } else {
                out[done..done + n].fill(0);
            }
            done += n;
        }
        out[avail..].fill(0);
        Ok(())
    }

    /// Whether the file holds data at `pos`, and up to where that stays so. Remembers the
    /// last answer (redb reads in order of offset, mostly): two `lseek`s per extent.
    fn extent_at(&self, st: &mut OverlayState, pos: u64) -> (bool, u64) {
        let (data, start, end) = st.extent;
        if (start..end).contains(&pos) {
            return (data, end);
        }
        let fresh = self.seek_extent(pos);
        st.extent = (fresh.0, pos, fresh.1);
        fresh
    }

    fn seek_extent(&self, pos: u64) -> (bool, u64) {
        extent_at(&self.file, pos, self.file_len)
    }

    /// The file's bytes of page `n` (zeros past its end).
    fn file_page(
        &self,
        st: &mut OverlayState,
        n: u64,
        out: &mut [u8; OVERLAY_PAGE],
    ) -> std::io::Result<()> {
        self.file_range(st, n * OVERLAY_PAGE as u64, out)
    }
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.state().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let mut st = self.state();
        if offset + out.len() as u64 > st.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the database",
            ));
        }
        let page = OVERLAY_PAGE as u64;
        let mut done = 0usize;
        while done < out.len() {
            let at = offset + done as u64;
            let within = (at % page) as usize;
            let take = (OVERLAY_PAGE - within).min(out.len() - done);
            if let Some(p) = st.pages.get(&(at / page)) {
                out[done..done + take].copy_from_slice(&p[within..within + take]);
                done += take;
                continue;
            }
            // A run of pages the overlay does not hold (all of them, until redb writes):
            // one read straight into `out`.
            let mut end = done + take;
            while end < out.len() && !st.pages.contains_key(&((offset + end as u64) / page)) {
                end = (end + OVERLAY_PAGE).min(out.len());
            }
            self.file_range(&mut st, at, &mut out[done..end])?;
            done = end;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut st = self.state();
        if len < st.len {
            // Forget overlay bytes past the new end, so growing again reads zeros.
            let first = len.div_ceil(OVERLAY_PAGE as u64);
            st.pages.retain(|n, _| *n < first);
            if !len.is_multiple_of(OVERLAY_PAGE as u64) {
                let n = len / OVERLAY_PAGE as u64;
                let cut = (len % OVERLAY_PAGE as u64) as usize;
                if let Some(p) = st.pages.get_mut(&n) {
                    p[cut..].fill(0);
                }
            }
        }
        st.len = len;
        st.visible = st.visible.min(len);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut st = self.state();
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let n = at / OVERLAY_PAGE as u64;
            let within = (at % OVERLAY_PAGE as u64) as usize;
            let take = (OVERLAY_PAGE - within).min(data.len() - done);
            if !st.pages.contains_key(&n) {
                let mut p = Box::new([0u8; OVERLAY_PAGE]);
                if n * (OVERLAY_PAGE as u64) < st.len {
                    self.file_page(&mut st, n, &mut p)?;
                }
                st.pages.insert(n, p);
            }
            let p = st.pages.get_mut(&n).expect("inserted above");
            p[within..within + take].copy_from_slice(&data[done..done + take]);
            done += take;
        }
        st.len = st.len.max(offset + data.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod refreshed_tests {
    use super::Refreshed;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn readers_never_wait_and_one_computation_runs_at_a_time() {
        let r = Refreshed::<u32>::new("test-refresh", Duration::from_millis(200));
        let runs = Arc::new(AtomicU32::new(0));
        let slow = |runs: Arc<AtomicU32>| {
            move || {
                std::thread::sleep(Duration::from_millis(300));
                Some(runs.fetch_add(1, Ordering::SeqCst) + 1)
            }
        };
        let t = Instant::now();
        assert_eq!(r.get(slow(runs.clone())), None, "the first read finds none");
        for _ in 0..10 {
            assert_eq!(r.get(slow(runs.clone())), None);
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "one computation for 11 reads"
        );
        // Stale by now: the last value is served at once, and one more computation starts.
        assert_eq!(r.get(slow(runs.clone())), Some(1));
        std::thread::sleep(Duration::from_millis(700));
        assert!(runs.load(Ordering::SeqCst) >= 2);
        // Cleared: none, and a computation whose source is gone (None) stores nothing.
        r.clear();
        assert_eq!(r.get(|| None), None);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r.get(|| None), None);
    }
}
