//! The standby's side of snapshot shipping: receive, verify, install, keep N.
//!
//! # On disk (under `state_dir`)
//! - `generations/<generation, 20 digits>.db`: a verified snapshot, installed atomically
//!   (written in `staging/`, fsynced, integrity-checked, renamed, directory fsynced);
//! - `generations/<generation>.manifest`: the signed envelope it was verified against,
//!   installed after the `.db` (a `.db` without its manifest is an interrupted install and
//!   is removed at start);
//! - `staging/<generation>.part`: the generation being received. When `keep` generations
//!   are installed already, the oldest (which this install would prune) is moved here and
//!   rewritten in place: a chunk it already holds at the same offset stays where it is
//!   (snapshots are page images, so most do), and only the others are written. Otherwise
//!   the file starts from a *spare*: after each install, while fewer than `keep`
//!   generations are held, a copy of the newest one is made beside it in the background
//!   (`staging/spare-<generation>.part`, its data extents only, the space reserved first),
//!   and the next generation is written over it in place as over a recycled file (an offer
//!   that comes while the copy runs waits for it: it would copy the same bytes). Without a
//!   spare (none made yet, or no room for it) the file starts empty. Chunks the standby
//!   holds elsewhere (same BLAKE3 hash in its
//!   newest generation) are copied from there; the others come from the live host. Every
//!   chunk is hashed as it enters the file, and the chunks left in place are hashed again
//!   before the install. Chunks of zeros (free pages) are never sent: the standby zeroes
//!   their ranges itself. Of several missing chunks with the same bytes, one is asked for
//!   and written at every place. A transfer
//!   that fails after the oldest generation was moved leaves `keep - 1` generations, the
//!   newest among them.
//!
//!   A whole image may also be streamed while the live host takes it, before its manifest
//!   exists ([`Store::begin_stream`], [`Store::put_streamed`]): each frame is hashed as it
//!   is written and recorded by offset (a frame that overlaps an earlier one drops the
//!   earlier record). When the signed manifest is offered, a chunk counts as held only if
//!   a record has its offset, length and hash; chunks of a recycled file count as in place
//!   only where no frame was written. Streamed bytes are never trusted before the manifest.
//! - `inbox/`: where rsync and scp land; the file there is verified and copied into
//!   `staging/` exactly like chunks received over HTTPS.
//!
//! # What is refused (the previous generations stay untouched)
//! A manifest not signed by the pinned peer key, for another conode, with a generation not
//! newer than the newest installed one, or with a chain behind where the newest installed
//! generation has it; a chunk whose bytes do not hash to the manifest; a file of the wrong
//! size; a file that fails redb's integrity check or whose chains differ from the
//! manifest's; a disk too full to hold the new generation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use conode::db::ChainPosition;

use crate::config::Transport;
pub use crate::error::StoreError;
use crate::manifest::Manifest;
use conode::db::unix_ms as now_ms;

/// One installed generation.
#[derive(Debug, Clone)]
pub struct Installed {
    pub manifest: Manifest,
    pub path: PathBuf,
    /// When it was installed (file modification time of its manifest).
    pub installed_unix_ms: u64,
}

/// An installed generation in brief.
#[derive(Debug, Clone)]
pub struct Held {
    pub generation: u64,
    pub bytes: u64,
    pub taken_unix_ms: u64,
    pub created_unix_ms: u64,
    pub installed_unix_ms: u64,
    pub chains: usize,
    pub transport: Transport,
}

struct Pending {
    manifest: Manifest,
    /// The signed envelope, stored beside the installed file.
    envelope: Vec<u8>,
    digest: [u8; 32],
    file: File,
    path: PathBuf,
    have: Vec<bool>,
    /// Chunks found already in place in a recycled generation file (hashed at install).
    in_place: Vec<bool>,
    /// Missing chunk → the other missing chunks with its length and hash, written when it
    /// arrives (a run of zeroed pages is one chunk sent, not thousands).
    copies: HashMap<u32, Vec<u32>>,
}

impl Pending {
    /// The chunks to ask the live host for: of those still lacking, one per distinct
    /// length and hash (the others are recorded in `copies`).
    fn missing(&mut self) -> Vec<u32> {
        let mut first: HashMap<(u32, [u8; 32]), u32> = HashMap::new();
        let mut out = Vec::new();
        self.copies.clear();
        for (i, c) in self.manifest.chunks.iter().enumerate() {
            if self.have[i] {
                continue;
            }
            match first.entry((c.len, c.hash)) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    self.copies.entry(*e.get()).or_default().push(i as u32)
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i as u32);
                    out.push(i as u32);
                }
            }
        }
        out
    }

    fn new(m: &Manifest, envelope: &[u8], digest: [u8; 32], file: File, path: PathBuf) -> Pending {
        Pending {
            have: vec![false; m.chunks.len()],
            in_place: vec![false; m.chunks.len()],
            copies: HashMap::new(),
            manifest: m.clone(),
            envelope: envelope.to_vec(),
            digest,
            file,
            path,
        }
    }
}

pub struct Store {
    gens: PathBuf,
    staging: PathBuf,
    inbox: PathBuf,
    keep: usize,
    peer_key: [u8; 32],
    conode: [u8; 32],
    inner: Mutex<Inner>,
    spares: std::sync::Arc<Spares>,
    /// What is installed, published after every change for status, metrics and the peer:
    /// read without waiting for `inner`, which an offer or a write may hold for long.
    view: Mutex<std::sync::Arc<View>>,
}

/// The installed generations as last published ([`Store::view`]).
#[derive(Debug, Default)]
pub struct View {
    pub held: Vec<Held>,
    /// The newest installed generation.
    pub newest: Option<Installed>,
}

/// The spare copy of the newest generation (see the module doc), made by a thread of its
/// own; lock order: `Store::inner`, then this.
#[derive(Default)]
struct Spares {
    state: Mutex<SpareState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
enum SpareState {
    #[default]
    None,
    /// A copy is being made.
    Making,
    /// A copy is being made of a generation given up meanwhile ([`Store::forget`]): its
    /// file may change under the copy, which is thrown away when done.
    MakingDiscarded,
    /// A copy of the generation `manifest` describes, at `path`.
    Ready { path: PathBuf, manifest: Manifest },
}

/// How long an offer waits for a spare being made before it goes without.
const SPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, SpareState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait (at most [`SPARE_WAIT`]) while a spare is being made.
    fn wait(&self) -> std::sync::MutexGuard<'_, SpareState> {
        let st = self.lock();
        self.done
            .wait_timeout_while(st, SPARE_WAIT, |s| {
                matches!(s, SpareState::Making | SpareState::MakingDiscarded)
            })
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// Take the spare if it is made; `None` if there is none (or it is still being made).
    fn take(&self) -> Option<(PathBuf, Manifest)> {
        let mut st = self.lock();
        match std::mem::take(&mut *st) {
            SpareState::Ready { path, manifest } => Some((path, manifest)),
            // None, or still being made after the wait (left to its thread).
            other => {
                *st = other;
                None
            }
        }
    }
}

/// Copy the data extents of `src` (`bytes` long) into the new file `dst`, whose space is
/// reserved first: a hole stays a hole (reserved, reading as zeros).
fn copy_extents(src: &Path, dst: &Path, bytes: u64) -> Result<(), StoreError> {
    let from = File::open(src).map_err(|e| io("cannot open", src, e))?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| io("cannot create", dst, e))?;
    reserve(&to, dst, bytes)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < bytes {
        let start = hole_end(&from, pos);
        if start >= bytes {
            break;
        }
        let end = conode::db::extent_at(&from, start, bytes).1.min(bytes);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], at)
                .map_err(|e| io("cannot read", src, e))?;
            to.write_all_at(&buf[..n], at)
                .map_err(|e| io("cannot write", dst, e))?;
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

struct Inner {
    installed: Vec<Installed>,
    pending: Option<Pending>,
    stream: Option<Streamed>,
}

/// A generation whose chunks arrive before its manifest (see the module doc).
struct Streamed {
    generation: u64,
    bytes: u64,
    file: File,
    path: PathBuf,
    /// The manifest of the generation whose file this was, when one was recycled.
    recycled: Option<Manifest>,
    /// What each frame wrote where: offset → (length, BLAKE3). Records never overlap.
    received: BTreeMap<u64, (u32, [u8; 32])>,
    /// The [`STREAM_WINDOW`]s frames wrote into: a recycled file's old bytes are gone there.
    written: BTreeSet<u64>,
}

/// Granularity at which streamed writes are remembered (a chunk).
const STREAM_WINDOW: u64 = crate::chunk::Params::DEFAULT.size as u64;

impl Streamed {
    /// Record that `len` bytes hashing to `hash` were written at `offset`.
    fn record(&mut self, offset: u64, len: u32, hash: [u8; 32]) {
        let end = offset + len as u64;
        let before = self
            .received
            .range(..offset)
            .next_back()
            .filter(|(&o, &(l, _))| o + l as u64 > offset)
            .map(|(&o, _)| o);
        let within: Vec<u64> = self.received.range(offset..end).map(|(&o, _)| o).collect();
        for o in before.into_iter().chain(within) {
            self.received.remove(&o);
        }
        self.received.insert(offset, (len, hash));
        if len > 0 {
            self.written
                .extend(offset / STREAM_WINDOW..=(end - 1) / STREAM_WINDOW);
        }
    }
}

impl Inner {
    /// The stream of `generation`, if it is the one being streamed.
    fn streaming(&mut self, generation: u64) -> Result<&mut Streamed, StoreError> {
        self.stream
            .as_mut()
            .filter(|s| s.generation == generation)
            .ok_or(StoreError::NotStreaming { generation })
    }

    /// Drop the generation being received, streamed or offered, and its staging file.
    fn drop_partial(&mut self) {
        if let Some(old) = self.pending.take() {
            let _ = std::fs::remove_file(&old.path);
        }
        if let Some(old) = self.stream.take() {
            let _ = std::fs::remove_file(&old.path);
        }
    }
}

impl View {
    fn of(installed: &[Installed]) -> View {
        View {
            held: installed
                .iter()
                .map(|i| Held {
                    generation: i.manifest.generation,
                    bytes: i.manifest.bytes,
                    taken_unix_ms: i.manifest.taken_unix_ms,
                    created_unix_ms: i.manifest.created_unix_ms,
                    installed_unix_ms: i.installed_unix_ms,
                    chains: i.manifest.positions.len(),
                    transport: i.manifest.transport,
                })
                .collect(),
            newest: installed.last().cloned(),
        }
    }
}

/// Result of an offer: the chunk indices still needed, and how many bytes were reused
/// from the previous generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub missing: Vec<u32>,
    pub reused_bytes: u64,
    /// This very generation (same number, same chunks) is installed already: its commit
    /// landed but the answer was lost. Nothing is missing.
    pub installed: bool,
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::io(what, path, e)
}

fn gen_name(g: u64) -> String {
    format!("{g:020}")
}

impl Store {
    /// Open (creating the directories), load the installed generations, clear leftovers.
    pub fn open(
        state_dir: &Path,
        keep: usize,
        peer_key: [u8; 32],
        conode: [u8; 32],
    ) -> Result<Store, StoreError> {
        let gens = state_dir.join("generations");
        let staging = state_dir.join("staging");
        let inbox = state_dir.join("inbox");
        for d in [&gens, &staging, &inbox] {
            std::fs::create_dir_all(d).map_err(|e| io("cannot create", d, e))?;
        }
        // Staged data from a previous run is not trusted: the live host resends.
        for e in std::fs::read_dir(&staging).map_err(|e| io("cannot list", &staging, e))? {
            let e = e.map_err(|e| io("cannot list", &staging, e))?;
            let _ = std::fs::remove_file(e.path());
        }
        let mut installed = Vec::new();
        for e in std::fs::read_dir(&gens).map_err(|e| io("cannot list", &gens, e))? {
            let e = e.map_err(|e| io("cannot list", &gens, e))?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            let Some(stem) = name.strip_suffix(".db") else {
                continue;
            };
            let mpath = gens.join(format!("{stem}.manifest"));
            let env = match std::fs::read(&mpath) {
                Ok(b) => b,
                Err(_) => {
                    tracing::warn!(
                        "removing {}: no manifest beside it (an install was interrupted)",
                        p.display()
                    );
                    let _ = std::fs::remove_file(&p);
                    continue;
                }
            };
            let m = Manifest::open(&env, &peer_key).map_err(|e| StoreError::Installed {
                path: mpath.clone(),
                reason: format!(
                    "{e} (was the peer key changed? move the generations directory aside)"
                ),
            })?;
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            if len != m.bytes || gen_name(m.generation) != stem {
                return Err(StoreError::Installed {
                    path: p.clone(),
                    reason: format!(
                        "does not match its manifest ({len} bytes, manifest says generation {} of {} bytes): move it aside",
                        m.generation, m.bytes
                    ),
                });
            }
            let installed_unix_ms = std::fs::metadata(&mpath)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            installed.push(Installed {
                manifest: m,
                path: p,
                installed_unix_ms,
            });
        }
        installed.sort_by_key(|i| i.manifest.generation);
        let view = Mutex::new(std::sync::Arc::new(View::of(&installed)));
        Ok(Store {
            gens,
            staging,
            inbox,
            keep: keep.max(1),
            peer_key,
            conode,
            inner: Mutex::new(Inner {
                installed,
                pending: None,
                stream: None,
            }),
            spares: Default::default(),
            view,
        })
    }

    /// Start making a spare copy of the newest generation when the next one will not
    /// recycle an installed file (fewer than `keep` generations, at least two, are held).
    fn make_spare(&self, inner: &Inner) {
        if inner.installed.len() >= self.keep.max(2) {
            return;
        }
        let Some(newest) = inner.installed.last() else {
            return;
        };
        {
            let mut st = self.spares.lock();
            match &*st {
                SpareState::Making | SpareState::MakingDiscarded => return,
                SpareState::Ready { path, manifest } => {
                    if manifest.generation == newest.manifest.generation {
                        return;
                    }
                    let _ = std::fs::remove_file(path);
                }
                SpareState::None => {}
            }
            *st = SpareState::Making;
        }
        let (src, manifest) = (newest.path.clone(), newest.manifest.clone());
        let dst = self
            .staging
            .join(format!("spare-{}.part", gen_name(manifest.generation)));
        let spares = self.spares.clone();
        let started = std::thread::Builder::new()
            .name("spare".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let _ = std::fs::remove_file(&dst);
                let r = copy_extents(&src, &dst, manifest.bytes);
                let mut st = spares.lock();
                if matches!(*st, SpareState::MakingDiscarded) {
                    let _ = std::fs::remove_file(&dst);
                    *st = SpareState::None;
                    spares.done.notify_all();
                    return;
                }
                *st = match r {
                    Ok(()) => {
                        tracing::info!(
                            "generation {}: spare copy for the next generation made in {:?}",
                            manifest.generation,
                            t.elapsed()
                        );
                        SpareState::Ready {
                            path: dst,
                            manifest,
                        }
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&dst);
                        tracing::warn!(
                            "no spare copy of generation {} ({e}): the next generation starts from an empty file",
                            manifest.generation
                        );
                        SpareState::None
                    }
                };
                spares.done.notify_all();
            });
        if let Err(e) = started {
            tracing::warn!("cannot start the spare copy thread: {e}");
            *self.spares.lock() = SpareState::None;
        }
    }

    /// Give generation `g` up: its file became the conode's database (a takeover links
    /// it there instead of copying it), so this store no longer holds it. The manifest
    /// goes first (a `.db` without one is never trusted), then the file's name here; a
    /// spare copy being made of it is thrown away (the conode may write into the file
    /// under the copy). Returns whether `g` was held.
    pub fn forget(&self, g: u64) -> bool {
        let mut inner = self.lock();
        let Some(at) = inner
            .installed
            .iter()
            .position(|i| i.manifest.generation == g)
        else {
            return false;
        };
        let old = inner.installed.remove(at);
        let name = gen_name(g);
        let mpath = self.gens.join(format!("{name}.manifest"));
        if let Err(e) = std::fs::remove_file(&mpath) {
            tracing::warn!("cannot remove {}: {e}", mpath.display());
        }
        if let Err(e) = std::fs::remove_file(&old.path) {
            tracing::warn!("cannot remove {}: {e}", old.path.display());
        }
        let _ = fsync_dir(&self.gens);
        self.publish(&inner);
        let mut st = self.spares.lock();
        match &*st {
            SpareState::Making => *st = SpareState::MakingDiscarded,
            // A finished spare was copied before the conode could start on the file.
            SpareState::Ready { .. } | SpareState::None | SpareState::MakingDiscarded => {}
        }
        true
    }

    /// At start: a generation whose file is the conode's database `db` (the same inode:
    /// a takeover that linked it there stopped before it gave the generation up) is the
    /// conode's now, and given up (the conode may have written into it).
    pub fn forget_if_same_file(&self, db: &Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let d = std::fs::metadata(db).ok()?;
        let g = self.installed().into_iter().find_map(|i| {
            let m = std::fs::metadata(&i.path).ok()?;
            (m.dev() == d.dev() && m.ino() == d.ino()).then_some(i.manifest.generation)
        })?;
        tracing::warn!(
            "generation {g} is the conode's database {} (a takeover linked it there and stopped before giving it up): no longer held here",
            db.display()
        );
        self.forget(g).then_some(g)
    }

    /// The generation the spare copy holds, once it is made (waits while it is made).
    pub fn spare(&self) -> Option<u64> {
        match &*self.spares.wait() {
            SpareState::Ready { manifest, .. } => Some(manifest.generation),
            _ => None,
        }
    }

    pub fn installed(&self) -> Vec<Installed> {
        self.lock().installed.clone()
    }

    /// What each installed generation is, without its chunk list (for status and metrics).
    /// Never waits for an offer, a write or an install in progress.
    pub fn held(&self) -> Vec<Held> {
        self.view().held.clone()
    }

    /// The newest installed generation. Never waits for work in progress.
    pub fn newest(&self) -> Option<Installed> {
        self.view().newest.clone()
    }

    /// The installed generations as last published. Never waits for work in progress.
    pub fn view(&self) -> std::sync::Arc<View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publish what `inner` holds installed (after every change to it).
    fn publish(&self, inner: &Inner) {
        let v = std::sync::Arc::new(View::of(&inner.installed));
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    /// Hold the store's lock for `d` on another thread (tests: status must not wait).
    #[doc(hidden)]
    pub fn hold_lock_for(
        self: &std::sync::Arc<Self>,
        d: std::time::Duration,
    ) -> std::thread::JoinHandle<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let t = std::thread::spawn(move || {
            let _g = me.lock();
            let _ = tx.send(());
            std::thread::sleep(d);
        });
        let _ = rx.recv();
        t
    }

    pub fn inbox(&self) -> &Path {
        &self.inbox
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Is `m` acceptable as the next generation? (Signature already checked.)
    fn admissible(&self, inner: &Inner, m: &Manifest) -> Result<(), StoreError> {
        if m.conode != self.conode {
            return Err(StoreError::OtherConode {
                got: m.conode,
                ours: self.conode,
            });
        }
        if let Some(newest) = inner.installed.last() {
            let have = newest.manifest.generation;
            if m.generation <= have {
                return Err(StoreError::NotNewer {
                    offered: m.generation,
                    installed: have,
                });
            }
            behind(&newest.manifest.positions, &m.positions)?;
        }
        Ok(())
    }

    /// Start (or resume) receiving the generation described by `envelope`.
    pub fn offer(&self, envelope: &[u8]) -> Result<Offer, StoreError> {
        let m = Manifest::open(envelope, &self.peer_key)?;
        // A spare being made is waited for here, not under the lock (status and the other
        // requests go on meanwhile).
        drop(self.spares.wait());
        let mut inner = self.lock();
        let digest = m.chunks_digest();
        if let Some(newest) = inner.installed.last() {
            if newest.manifest.generation == m.generation
                && newest.manifest.chunks_digest() == digest
            {
                return Ok(Offer {
                    missing: Vec::new(),
                    reused_bytes: 0,
                    installed: true,
                });
            }
        }
        self.admissible(&inner, &m)?;
        if let Some(p) = inner.pending.as_mut() {
            if p.manifest.generation == m.generation && p.digest == digest {
                return Ok(Offer {
                    missing: p.missing(),
                    reused_bytes: 0,
                    installed: false,
                });
            }
        }
        let stream = inner
            .stream
            .take()
            .filter(|s| s.generation == m.generation && s.bytes == m.bytes);
        inner.drop_partial();
        let (mut pending, recycled, written) = match stream {
            Some(s) => {
                let mut p = Pending::new(&m, envelope, digest, s.file, s.path);
                for (i, c) in m.chunks.iter().enumerate() {
                    p.have[i] = s.received.get(&c.offset) == Some(&(c.len, c.hash));
                }
                (p, s.recycled, s.written)
            }
            None => {
                let recycled = self.recycle(&mut inner, m.generation)?;
                let (file, path) = self.create_part(m.generation, m.bytes, recycled.is_some())?;
                let p = Pending::new(&m, envelope, digest, file, path);
                (p, recycled, BTreeSet::new())
            }
        };
        let mut reused = 0;
        if let Some(old) = recycled {
            reused += in_place(&old, &written, &mut pending);
        }
        reused += zeros(&mut pending)?;
        reused += match inner.installed.last() {
            Some(prev) => reuse(&prev.path, &prev.manifest, &mut pending)?,
            None => 0,
        };
        let missing = pending.missing();
        inner.pending = Some(pending);
        Ok(Offer {
            missing,
            reused_bytes: reused,
            installed: false,
        })
    }

    /// Start (or go on) receiving generation `generation`, `bytes` long, before its
    /// manifest: the live host streams a whole image while it takes it.
    pub fn begin_stream(&self, generation: u64, bytes: u64) -> Result<(), StoreError> {
        drop(self.spares.wait());
        let mut inner = self.lock();
        if inner
            .stream
            .as_ref()
            .is_some_and(|s| s.generation == generation && s.bytes == bytes)
        {
            return Ok(());
        }
        if let Some(newest) = inner.installed.last() {
            let have = newest.manifest.generation;
            if generation <= have {
                return Err(StoreError::NotNewer {
                    offered: generation,
                    installed: have,
                });
            }
        }
        if let Some(p) = &inner.pending {
            if p.manifest.generation == generation {
                return Err(StoreError::AlreadyOffered { generation });
            }
        }
        inner.drop_partial();
        let recycled = self.recycle(&mut inner, generation)?;
        let (file, path) = self.create_part(generation, bytes, recycled.is_some())?;
        inner.stream = Some(Streamed {
            generation,
            bytes,
            file,
            path,
            recycled,
            received: BTreeMap::new(),
            written: BTreeSet::new(),
        });
        Ok(())
    }

    /// Write `data` at `offset` of the streamed generation `generation`. It is hashed and
    /// remembered, and trusted only once the signed manifest names that hash there.
    pub fn put_streamed(
        &self,
        generation: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let hash = *blake3::hash(data).as_bytes();
        let mut inner = self.lock();
        let s = inner.streaming(generation)?;
        let out_of_range = StoreError::FrameOutOfRange {
            generation,
            offset,
            len: data.len() as u64,
            size: s.bytes,
        };
        let Ok(len) = u32::try_from(data.len()) else {
            return Err(out_of_range);
        };
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > s.bytes)
        {
            return Err(out_of_range);
        }
        s.file
            .write_all_at(data, offset)
            .map_err(|e| io("cannot write", &s.path, e))?;
        s.record(offset, len, hash);
        Ok(())
    }

    /// Make `len` bytes at `offset` of the streamed generation `generation` zeros: a chunk
    /// of zeros, which the live host does not send. In a new file where no frame was
    /// written they are zeros already (reserved, never written: redb's check finds a hole
    /// there and reads nothing, see `conode::db::Overlay`); elsewhere the range is zeroed
    /// (`zero_range`).
    pub fn put_streamed_zeros(
        &self,
        generation: u64,
        offset: u64,
        len: u32,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let s = inner.streaming(generation)?;
        let end = offset.checked_add(len as u64).filter(|&e| e <= s.bytes);
        let Some(end) = end.filter(|_| len > 0) else {
            return Err(StoreError::FrameOutOfRange {
                generation,
                offset,
                len: len as u64,
                size: s.bytes,
            });
        };
        let unwritten = s
            .written
            .range(offset / STREAM_WINDOW..=(end - 1) / STREAM_WINDOW)
            .next()
            .is_none();
        let zeros = crate::chunk::zeros_hash(len);
        if !(unwritten && s.recycled.is_none()) {
            // A recycled file's old bytes, or a frame's: zeroed by the filesystem (or
            // written zeros where it cannot).
            zero_range(&s.file, &s.path, offset, len as u64)?;
        }
        s.record(offset, len, zeros);
        Ok(())
    }

    fn part_path(&self, generation: u64) -> PathBuf {
        self.staging.join(format!("{}.part", gen_name(generation)))
    }

    /// When `keep` generations are installed (at least two), move the oldest, which this
    /// install would prune, to be the new generation's staging file; its manifest says what
    /// it holds where.
    fn recycle(&self, inner: &mut Inner, generation: u64) -> Result<Option<Manifest>, StoreError> {
        if inner.installed.len() < self.keep.max(2) {
            // A spare copy of the newest generation, if there is one.
            let Some((path, manifest)) = self.spares.take() else {
                return Ok(None);
            };
            let part = self.part_path(generation);
            let _ = std::fs::remove_file(&part);
            if let Err(e) = std::fs::rename(&path, &part) {
                let _ = std::fs::remove_file(&path);
                tracing::warn!("cannot use the spare {}: {e}", path.display());
                return Ok(None);
            }
            return Ok(Some(manifest));
        }
        let old = inner.installed.remove(0);
        self.publish(inner);
        let name = gen_name(old.manifest.generation);
        let mpath = self.gens.join(format!("{name}.manifest"));
        // Manifest first: a `.db` without one is an interrupted install, removed at start.
        std::fs::remove_file(&mpath).map_err(|e| io("cannot remove", &mpath, e))?;
        let part = self.part_path(generation);
        let _ = std::fs::remove_file(&part);
        std::fs::rename(&old.path, &part).map_err(|e| io("cannot move", &old.path, e))?;
        Ok(Some(old.manifest))
    }

    /// The staging file of `generation`, `bytes` long, with its space reserved.
    fn create_part(
        &self,
        generation: u64,
        bytes: u64,
        recycled: bool,
    ) -> Result<(File, PathBuf), StoreError> {
        let path = self.part_path(generation);
        if !recycled {
            let _ = std::fs::remove_file(&path);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(!recycled)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("cannot create", &path, e))?;
        if recycled {
            // A shorter generation: the end goes (a longer one is reserved below).
            let len = file
                .metadata()
                .map_err(|e| io("cannot stat", &path, e))?
                .len();
            if len > bytes {
                file.set_len(bytes)
                    .map_err(|e| io("cannot truncate", &path, e))?;
            }
        }
        // Reserve the space now: a full disk is found before any byte is sent.
        if let Err(e) = reserve(&file, &path, bytes) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok((file, path))
    }

    /// Store chunk `index` of generation `generation`, after checking its hash.
    pub fn put_chunk(&self, generation: u64, index: u32, data: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let p = pending_for(&mut inner, generation)?;
        let c = p
            .manifest
            .chunks
            .get(index as usize)
            .copied()
            .ok_or(StoreError::NoSuchChunk {
                generation,
                index,
                count: p.manifest.chunks.len(),
            })?;
        if data.len() != c.len as usize || *blake3::hash(data).as_bytes() != c.hash {
            return Err(StoreError::ChunkHash {
                generation,
                index: index as usize,
                offset: c.offset,
            });
        }
        p.file
            .write_all_at(data, c.offset)
            .map_err(|e| io("cannot write", &p.path, e))?;
        p.have[index as usize] = true;
        // The same bytes elsewhere in this generation: written from here, not sent again.
        for d in p.copies.remove(&index).unwrap_or_default() {
            let at = p.manifest.chunks[d as usize].offset;
            p.file
                .write_all_at(data, at)
                .map_err(|e| io("cannot write", &p.path, e))?;
            p.have[d as usize] = true;
        }
        Ok(())
    }

    /// Finish generation `generation`: everything received, verify, install, prune.
    pub fn commit(&self, generation: u64) -> Result<Installed, StoreError> {
        let pending = {
            let mut inner = self.lock();
            let p = pending_for(&mut inner, generation)?;
            let n = p.have.iter().filter(|h| !**h).count();
            if n > 0 {
                return Err(StoreError::Incomplete {
                    generation,
                    missing: n,
                });
            }
            inner.pending.take().ok_or(StoreError::Bug(format!(
                "generation {generation} vanished while committed"
            )))?
        };
        self.install(pending)
    }

    /// Verify the file `envelope` names in the inbox (landed by rsync or scp) and install it.
    pub fn install_inbox(&self, envelope: &[u8]) -> Result<Installed, StoreError> {
        let m = Manifest::open(envelope, &self.peer_key)?;
        let name = m.file.clone().ok_or(StoreError::NoInboxFile)?;
        crate::manifest::check_file_name(&name)?;
        let src = self.inbox.join(&name);
        let mut pending = {
            let mut inner = self.lock();
            self.admissible(&inner, &m)?;
            inner.drop_partial();
            let (file, path) = self.create_part(m.generation, m.bytes, false)?;
            Pending::new(&m, envelope, m.chunks_digest(), file, path)
        };
        let f = File::open(&src).map_err(|e| io("cannot open", &src, e))?;
        let len = f.metadata().map_err(|e| io("cannot stat", &src, e))?.len();
        if len != m.bytes {
            let _ = std::fs::remove_file(&pending.path);
            return Err(StoreError::WrongSize {
                path: src,
                len,
                expected: m.bytes,
                generation: m.generation,
            });
        }
        let r = copy_verified(&f, &src, &mut pending);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&pending.path);
            return Err(e);
        }
        self.install(pending)
    }

    fn install(&self, p: Pending) -> Result<Installed, StoreError> {
        let r = self.install_inner(&p);
        if r.is_err() {
            let _ = std::fs::remove_file(&p.path);
        }
        r
    }

    fn install_inner(&self, p: &Pending) -> Result<Installed, StoreError> {
        let m = &p.manifest;
        let t = std::time::Instant::now();
        // The fsync waits for the disk while the two checks read the same bytes from
        // memory: all three run side by side, and all must succeed.
        let (synced, hashed, checked) = std::thread::scope(|s| {
            let sync = s.spawn(|| {
                p.file
                    .sync_all()
                    .map_err(|e| io("cannot fsync", &p.path, e))
                    .map(|()| t.elapsed())
            });
            let hash = s.spawn(|| check_in_place(p).map(|()| t.elapsed()));
            let checked = conode::db::verify_snapshot(&p.path, &self.conode).map_err(|reason| {
                StoreError::Integrity {
                    generation: m.generation,
                    reason,
                }
            });
            let checked_at = t.elapsed();
            let join = |r: std::thread::Result<Result<std::time::Duration, StoreError>>, what| {
                r.unwrap_or_else(|_| Err(StoreError::Bug(format!("the {what} thread panicked"))))
            };
            (
                join(sync.join(), "fsync"),
                join(hash.join(), "hash"),
                checked.map(|pos| (checked_at, pos)),
            )
        });
        // A chunk kept in place that changed says more than the integrity check it breaks.
        let hashed = hashed?;
        let (checked_at, positions) = checked?;
        let synced = synced?;
        tracing::info!(
            "generation {}: chunks kept in place hashed after {hashed:?}, integrity-checked after {checked_at:?}, fsynced after {synced:?}",
            m.generation
        );
        let mut claimed = m.positions.clone();
        claimed.sort_by_key(|c| c.chain);
        let mut found = positions.clone();
        found.sort_by_key(|c| c.chain);
        if claimed != found {
            return Err(StoreError::ChainsDiffer {
                generation: m.generation,
            });
        }
        let name = gen_name(m.generation);
        let db = self.gens.join(format!("{name}.db"));
        let mpath = self.gens.join(format!("{name}.manifest"));
        let mut inner = self.lock();
        // Re-check under the lock: another install may have won meanwhile.
        self.admissible(&inner, m)?;
        std::fs::rename(&p.path, &db).map_err(|e| io("cannot install", &db, e))?;
        // Temp file, fsync, rename, fsync the directory (which also makes the rename of
        // the database above durable).
        conode::config::write_atomic(&mpath, &p.envelope, 0o600)
            .map_err(|e| io("cannot install", &mpath, e))?;
        let inst = Installed {
            manifest: m.clone(),
            path: db,
            installed_unix_ms: now_ms(),
        };
        inner.installed.push(inst.clone());
        while inner.installed.len() > self.keep {
            let old = inner.installed.remove(0);
            let name = gen_name(old.manifest.generation);
            let _ = std::fs::remove_file(self.gens.join(format!("{name}.manifest")));
            let _ = std::fs::remove_file(&old.path);
        }
        let _ = fsync_dir(&self.gens);
        self.publish(&inner);
        self.make_spare(&inner);
        Ok(inst)
    }
}

fn pending_for(inner: &mut Inner, generation: u64) -> Result<&mut Pending, StoreError> {
    match inner.pending.as_ref().map(|p| p.manifest.generation) {
        Some(g) if g == generation => inner
            .pending
            .as_mut()
            .ok_or(StoreError::Bug("the pending generation vanished".into())),
        receiving => Err(StoreError::NotReceiving {
            generation,
            receiving,
        }),
    }
}

/// A chain that `new` has behind where `old` has it (or lacks) is data the live host lost:
/// refuse rather than replace newer data with older.
fn behind(old: &[ChainPosition], new: &[ChainPosition]) -> Result<(), StoreError> {
    let by_chain: HashMap<[u8; 32], u32> = new.iter().map(|p| (p.chain, p.index)).collect();
    for o in old {
        match by_chain.get(&o.chain) {
            None => {
                return Err(StoreError::Behind {
                    chain: o.chain,
                    offered: None,
                    installed: o.index,
                })
            }
            Some(&i) if i < o.index => {
                return Err(StoreError::Behind {
                    chain: o.chain,
                    offered: Some(i),
                    installed: o.index,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Mark the chunks of `p` that the recycled file (which held `old`) has at the same offset,
/// with the same length and hash, in no [`STREAM_WINDOW`] of `written`. Returns their bytes.
fn in_place(old: &Manifest, written: &BTreeSet<u64>, p: &mut Pending) -> u64 {
    let held = crate::chunk::by_offset(&old.chunks);
    let mut bytes = 0;
    for (i, c) in p.manifest.chunks.iter().enumerate() {
        let end = c.offset + c.len as u64;
        if p.have[i]
            || end > old.bytes
            || held.get(&c.offset) != Some(&(c.len, c.hash))
            || (c.len > 0
                && written
                    .range(c.offset / STREAM_WINDOW..=(end - 1) / STREAM_WINDOW)
                    .next()
                    .is_some())
        {
            continue;
        }
        p.have[i] = true;
        p.in_place[i] = true;
        bytes += c.len as u64;
    }
    bytes
}

/// Hash again the chunks left in place in a recycled file: what it held was verified when
/// it was installed, but the disk may have changed it since.
///
/// A chunk of zeros that lies in a hole of the file (a free page never written: the live
/// host does not send them) is zeros by the filesystem's word, and is not read: reading a
/// hole would fill the page cache with zeros (680 MB of a 1.36 GB benchmark image).
fn check_in_place(p: &Pending) -> Result<(), StoreError> {
    let mut buf = vec![0u8; p.manifest.params.size as usize];
    let zeros = crate::chunk::zeros_hash(p.manifest.params.size);
    // A range of the file known to be a hole.
    let mut hole = (0u64, 0u64);
    for (i, c) in p.manifest.chunks.iter().enumerate() {
        if !p.in_place[i] {
            continue;
        }
        let end = c.offset + c.len as u64;
        if c.hash == zeros && c.len == p.manifest.params.size {
            if !(hole.0 <= c.offset && end <= hole.1) {
                hole = (c.offset, hole_end(&p.file, c.offset));
            }
            if end <= hole.1 {
                continue;
            }
        }
        let b = &mut buf[..c.len as usize];
        p.file
            .read_exact_at(b, c.offset)
            .map_err(|e| io("cannot read", &p.path, e))?;
        if *blake3::hash(b).as_bytes() != c.hash {
            return Err(StoreError::DiskCorruption {
                path: p.path.clone(),
                index: i,
                offset: c.offset,
            });
        }
    }
    Ok(())
}

/// Reserve the first `bytes` of `file` (at `path`): a full disk is an error now, not in the
/// middle of a transfer.
fn reserve(file: &File, path: &Path, bytes: u64) -> Result<(), StoreError> {
    if bytes == 0 {
        return Ok(());
    }
    let len = nix::libc::off_t::try_from(bytes).map_err(|_| {
        io(
            &format!("cannot reserve {bytes} bytes for"),
            path,
            std::io::Error::from(std::io::ErrorKind::FileTooLarge),
        )
    })?;
    nix::fcntl::posix_fallocate(file, 0, len).map_err(|e| {
        io(
            &format!("cannot reserve {bytes} bytes for"),
            path,
            std::io::Error::from(e),
        )
    })?;
    Ok(())
}

/// How far from `at` the file holds no data (a hole): `at` itself when there is data at
/// `at`, or when the filesystem cannot tell (`SEEK_DATA` unsupported).
fn hole_end(file: &File, at: u64) -> u64 {
    match conode::db::extent_at(file, at, u64::MAX) {
        (false, end) => end,
        (true, _) => at,
    }
}

/// Make every chunk of `p` still lacking whose hash is that of zeros (free pages) zeros
/// in its file, without a byte sent: `fallocate(FALLOC_FL_ZERO_RANGE)` on each run (its
/// space stays reserved), or written zeros where the filesystem cannot. Returns their
/// bytes. The live host never sends these chunks.
fn zeros(p: &mut Pending) -> Result<u64, StoreError> {
    let size = p.manifest.params.size;
    let full = crate::chunk::zeros_hash(size);
    let mut bytes = 0;
    let mut run: Option<(u64, u64)> = None;
    for (i, c) in p.manifest.chunks.iter().enumerate() {
        let zero = !p.have[i]
            && c.hash
                == if c.len == size {
                    full
                } else {
                    crate::chunk::zeros_hash(c.len)
                };
        if !zero {
            continue;
        }
        p.have[i] = true;
        bytes += c.len as u64;
        run = match run {
            Some((start, end)) if end == c.offset => Some((start, end + c.len as u64)),
            Some((start, end)) => {
                zero_range(&p.file, &p.path, start, end - start)?;
                Some((c.offset, c.offset + c.len as u64))
            }
            None => Some((c.offset, c.offset + c.len as u64)),
        };
    }
    if let Some((start, end)) = run {
        zero_range(&p.file, &p.path, start, end - start)?;
    }
    Ok(bytes)
}

fn zero_range(file: &File, path: &Path, start: u64, len: u64) -> Result<(), StoreError> {
    crate::chunk::fallocate_zeros(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE,
        start,
        len,
    )
    .map_err(|e| io("cannot zero a range of", path, e))
}

/// Copy into `p` every chunk whose hash the previous generation holds, checking each
/// copied chunk's hash. Returns the bytes reused.
fn reuse(prev_path: &Path, prev: &Manifest, p: &mut Pending) -> Result<u64, StoreError> {
    let index: HashMap<[u8; 32], (u64, u32)> = prev
        .chunks
        .iter()
        .map(|c| (c.hash, (c.offset, c.len)))
        .collect();
    let Ok(f) = File::open(prev_path) else {
        return Ok(0);
    };
    let mut buf = vec![0u8; p.manifest.params.size as usize];
    let mut reused = 0u64;
    for (i, c) in p.manifest.chunks.iter().enumerate() {
        if p.have[i] {
            continue;
        }
        let Some(&(off, len)) = index.get(&c.hash) else {
            continue;
        };
        if len != c.len {
            continue;
        }
        let b = &mut buf[..len as usize];
        if f.read_exact_at(b, off).is_err() || *blake3::hash(b).as_bytes() != c.hash {
            continue;
        }
        p.file
            .write_all_at(b, c.offset)
            .map_err(|e| io("cannot write", &p.path, e))?;
        p.have[i] = true;
        reused += len as u64;
    }
    Ok(reused)
}

/// Copy `src` into `p` chunk by chunk, checking every chunk's hash on the way.
fn copy_verified(src: &File, src_path: &Path, p: &mut Pending) -> Result<(), StoreError> {
    let mut buf = vec![0u8; p.manifest.params.size as usize];
    for (i, c) in p.manifest.chunks.iter().enumerate() {
        let b = &mut buf[..c.len as usize];
        src.read_exact_at(b, c.offset)
            .map_err(|e| io("cannot read", src_path, e))?;
        if *blake3::hash(b).as_bytes() != c.hash {
            return Err(StoreError::FileHash {
                path: src_path.to_path_buf(),
                index: i,
                offset: c.offset,
            });
        }
        p.file
            .write_all_at(b, c.offset)
            .map_err(|e| io("cannot write", &p.path, e))?;
        p.have[i] = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hole is found where nothing was written, a reserved range counts as one until it
    /// is written, and data is never taken for a hole (on ext4 and tmpfs).
    #[test]
    fn hole_end_finds_holes_and_never_skips_data() {
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs the tmpfs at /dev/shm");
        for dir in [std::env::temp_dir(), shm.to_path_buf()] {
            let tmp = tempfile::tempdir_in(&dir).unwrap();
            let path = tmp.path().join("f");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            let mib = 1u64 << 20;
            f.set_len(8 * mib).unwrap();
            f.write_all_at(&[1u8; 65536], 2 * mib).unwrap();
            f.write_all_at(&[2u8; 65536], 6 * mib).unwrap();
            let at = |o: u64| hole_end(&f, o);
            let d = dir.display();
            assert!(at(0) > 0 && at(0) <= 2 * mib, "{d}: {}", at(0));
            assert_eq!(at(2 * mib), 2 * mib, "{d}: data at 2 MiB");
            assert_eq!(at(2 * mib + 4096), 2 * mib + 4096, "{d}: data inside");
            let h = at(3 * mib);
            assert!(h > 3 * mib && h <= 6 * mib, "{d}: {h}");
            assert_eq!(at(6 * mib), 6 * mib, "{d}: data at 6 MiB");
            assert!(at(7 * mib) > 7 * mib, "{d}: the tail is a hole");
            // Reserved (fallocate) but never written: zeros, a hole to SEEK_DATA on ext4;
            // written later, data.
            zero_range(&f, &path, 4 * mib, mib).unwrap();
            f.write_all_at(&[3u8; 4096], 4 * mib).unwrap();
            assert_eq!(at(4 * mib), 4 * mib, "{d}: written after the reservation");
        }
    }

    /// On ext4 (`fallocate`) and on tmpfs (which refuses `FALLOC_FL_ZERO_RANGE`: zeros are
    /// written), exactly the range becomes zeros.
    #[test]
    fn zero_range_zeroes_exactly_its_range() {
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs the tmpfs at /dev/shm");
        for dir in [std::env::temp_dir(), shm.to_path_buf()] {
            let tmp = tempfile::tempdir_in(&dir).unwrap();
            let path = tmp.path().join("f");
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253 + 1) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            for (start, len) in [(4096u64, 16384u64), (100_000, 1_500_000), (2_999_000, 1000)] {
                zero_range(&f, &path, start, len).unwrap();
            }
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), data.len(), "{}", dir.display());
            for (i, (&g, &d)) in got.iter().zip(&data).enumerate() {
                let i = i as u64;
                let zeroed = (4096..20480).contains(&i)
                    || (100_000..1_600_000).contains(&i)
                    || i >= 2_999_000;
                assert_eq!(
                    g,
                    if zeroed { 0 } else { d },
                    "byte {i} in {}",
                    dir.display()
                );
            }
        }
    }
}
