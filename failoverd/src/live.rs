//! The live host's side: take a page image through the conode's admin socket, cut it into
//! chunks, sign the manifest, ship it with the configured transport.
//!
//! The image lands in `outgoing/image.db`, a scratch mirror kept between snapshots: the
//! chunks of a new image are compared with what the mirror held, and only the chunks that
//! differ are written (no fsync: after a restart the mirror's content is not trusted and
//! the next image rewrites all of it). The transports read the chunks to send from there.
//!
//! Over HTTPS, a whole image is also streamed to the standby while it is taken
//! (`PUT /v1/stream`): each chunk whose hash the standby's newest generation lacks is
//! queued for a sender task, and the manifest offered afterwards finds those chunks there
//! already. The queue never slows the take (the conode's writers wait for it): when the
//! queue is full or the stream failed, a chunk is left for the offer, which asks for
//! whatever did not arrive.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conode::keys::KeyPair;

use hyper::Method;

use crate::chunk::{Chunk, Chunker, Params};
use crate::config::{Config, Transport};
use crate::error::{PeerError, ShipError};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::peer::PeerClient;
use crate::status::{now_ms, LastSnapshot, Status};

/// How many times an interrupted HTTPS transfer is resumed before the snapshot fails.
pub const RESUME_ATTEMPTS: u32 = 8;
/// Chunk bytes per `PUT /v1/chunks` request: progress is acknowledged per request.
const BATCH_BYTES: usize = 32 << 20;
/// Bytes of streamed frames per `PUT /v1/stream` request.
const STREAM_BATCH: usize = 8 << 20;
/// Batches queued for the stream task at most.
const STREAM_QUEUE: usize = 4;
/// Name of the file rsync and scp write in the standby's inbox (rsync's delta basis).
pub const INBOX_FILE: &str = "snapshot.db";

pub struct Shipper {
    pub cfg: Config,
    pub key: KeyPair,
    pub admin: PathBuf,
    pub peer: PeerClient,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    /// What the mirror file holds, when it is known.
    pub mirror: std::sync::Mutex<Option<Mirror>>,
    /// One snapshot at a time (the periodic ones and a switchover's final one).
    pub busy: tokio::sync::Mutex<()>,
}

/// Where a whole image's chunks are framed while it is taken, a batch at a time, for the
/// stream task.
struct Outbox {
    tx: tokio::sync::mpsc::Sender<(u64, Vec<u8>)>,
    /// Not streamed: the standby holds these. `None` until the image starts when they are
    /// the old mirror's chunks (the standby installed that image).
    holds: Option<HashSet<[u8; 32]>>,
    /// The image's size.
    size: u64,
    batch: Vec<u8>,
    /// Bytes of chunks left for the offer because the queue was full.
    skipped: u64,
    /// The hash of a chunk of zeros: never sent, the standby makes them.
    zeros: [u8; 32],
    /// The stream task is gone (it failed).
    closed: bool,
}

impl Outbox {
    fn new(
        tx: tokio::sync::mpsc::Sender<(u64, Vec<u8>)>,
        holds: Option<HashSet<[u8; 32]>>,
    ) -> Outbox {
        Outbox {
            tx,
            holds,
            size: 0,
            batch: Vec::with_capacity(STREAM_BATCH + (64 << 10)),
            skipped: 0,
            zeros: crate::chunk::zeros_hash(Params::DEFAULT.size),
            closed: false,
        }
    }

    /// Frame chunk `c` (bytes `b`) unless the standby holds it.
    fn chunk(&mut self, c: &Chunk, b: &[u8]) {
        if self.closed {
            return;
        }
        if c.hash == self.zeros {
            // No bytes: the standby makes them (and has them in its page cache for the
            // integrity check before the manifest comes).
            self.batch.extend_from_slice(&c.offset.to_le_bytes());
            self.batch
                .extend_from_slice(&(c.len | crate::peer::ZEROS).to_le_bytes());
            return;
        }
        if self.holds.as_ref().is_some_and(|h| h.contains(&c.hash)) {
            return;
        }
        self.batch.extend_from_slice(&c.offset.to_le_bytes());
        self.batch.extend_from_slice(&c.len.to_le_bytes());
        self.batch.extend_from_slice(b);
        if self.batch.len() >= STREAM_BATCH {
            self.flush();
        }
    }

    /// Queue the batch if there is room; otherwise its chunks are left for the offer.
    fn flush(&mut self) {
        use tokio::sync::mpsc::error::TrySendError;
        if self.batch.is_empty() || self.closed {
            return;
        }
        let next = Vec::with_capacity(STREAM_BATCH + (64 << 10));
        match self
            .tx
            .try_send((self.size, std::mem::replace(&mut self.batch, next)))
        {
            Ok(()) => {}
            Err(TrySendError::Full((_, mut b))) => {
                self.skipped += b.len() as u64;
                b.clear();
                self.batch = b;
            }
            Err(TrySendError::Closed(_)) => self.closed = true,
        }
    }
}

/// The image the mirror file holds: its chunks, and the conode's token for it.
pub struct Mirror {
    pub chunks: Vec<Chunk>,
    pub token: String,
    /// The standby installed this image (so it holds these chunks).
    pub installed: bool,
}

/// Name of the mirror file in the outgoing directory.
pub const MIRROR_FILE: &str = "image.db";

/// What taking an image did.
struct Taken {
    header: conode::admin::ImageHeader,
    chunks: Vec<Chunk>,
    written: u64,
    /// Bytes of framed chunks not streamed because the queue was full.
    skipped: u64,
}

/// Take a page image from the conode at `admin` into `mirror`, which holds `old` (or is
/// not trusted: `None`). With `old`, the conode is asked for the pages written since
/// `old`'s token only: they are written in place, and only the chunks they touch are
/// hashed again. Otherwise the whole image streams
/// through the chunker and only chunks that differ are written, and the chunks `outbox`'s
/// standby lacks are queued for it.
/// Where an image comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The running conode's admin socket (`image`, or `image since=TOKEN`).
    Admin(PathBuf),
    /// The same for a switchover's final snapshot (`final-image`): the conode refuses
    /// every write once the image is taken.
    AdminFinal(PathBuf),
    /// The database file of a stopped conode (a switchover's final snapshot): always the
    /// whole file, integrity-checked first.
    File { db: PathBuf, public: [u8; 32] },
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Admin(p) | Source::AdminFinal(p) => p,
            Source::File { db, .. } => db,
        }
    }

    /// Hand the image's bytes to `sink`, as `conode::admin::fetch_image_blocking` does.
    fn fetch(
        &self,
        since: Option<&str>,
        mut sink: impl FnMut(&conode::admin::ImageHeader, u64, &[u8]) -> Result<(), String>,
    ) -> Result<conode::admin::ImageHeader, String> {
        match self {
            Source::Admin(admin) => conode::admin::fetch_image_blocking(admin, since, sink),
            Source::AdminFinal(admin) => {
                conode::admin::fetch_final_image_blocking(admin, since, sink)
            }
            Source::File { db, public } => {
                use std::os::unix::fs::FileExt;
                let positions = conode::db::verify_snapshot(db, public)?;
                let f = std::fs::File::open(db)
                    .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
                let bytes = f
                    .metadata()
                    .map_err(|e| format!("cannot stat {}: {e}", db.display()))?
                    .len();
                let taken = now_ms();
                let h = conode::admin::ImageHeader {
                    bytes,
                    public: *public,
                    positions,
                    taken_unix_ms: taken,
                    token: format!("file-{taken}"),
                    changed_only: false,
                };
                let mut buf = vec![0u8; 1 << 20];
                let mut at = 0u64;
                while at < bytes {
                    let n = ((bytes - at) as usize).min(buf.len());
                    f.read_exact_at(&mut buf[..n], at)
                        .map_err(|e| format!("cannot read {}: {e}", db.display()))?;
                    sink(&h, at, &buf[..n])?;
                    at += n as u64;
                }
                Ok(h)
            }
        }
    }
}

fn take_image(
    source: &Source,
    mirror: &Path,
    old: Option<Mirror>,
    params: Params,
    outbox: Option<Outbox>,
) -> Result<Taken, ShipError> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(mirror)
        .map_err(|e| ShipError::io("cannot open", mirror, e))?;
    let werr = |e: std::io::Error| ShipError::io("cannot write", mirror, e);
    if old.is_none() {
        // Not trusted: every byte is written again, so start from an empty file, where a
        // chunk of zeros needs no write at all (a hole reads as zeros).
        file.set_len(0)
            .map_err(|e| ShipError::io("cannot truncate", mirror, e))?;
    }
    let old_len = file
        .metadata()
        .map_err(|e| ShipError::io("cannot stat", mirror, e))?
        .len();
    let zeros = crate::chunk::zeros_hash(params.size);
    let since = old.as_ref().map(|m| m.token.clone());
    // What the mirror held by offset: needed only if the whole image comes.
    let held = std::cell::OnceCell::new();
    let max = params.size as u64;
    let written = std::cell::Cell::new(0u64);
    let mut touched = std::collections::BTreeSet::new();
    let mut chunker = Chunker::new(params);
    let outbox = std::cell::RefCell::new(outbox);
    // Whole-image chunks go around the page cache (see `direct`); changed pages do not.
    let direct = std::cell::RefCell::new(None);
    let mut on_chunk = |c: &Chunk, b: &[u8]| -> Result<(), String> {
        let werr = |e: std::io::Error| format!("cannot write {}: {e}", mirror.display());
        if let Some(o) = outbox.borrow_mut().as_mut() {
            o.chunk(c, b);
        }
        let held = held
            .get_or_init(|| crate::chunk::by_offset(old.as_ref().map_or(&[][..], |m| &m.chunks)));
        if held.get(&c.offset) == Some(&(c.len, c.hash)) {
            return Ok(());
        }
        if c.hash == zeros && c.len == params.size {
            // Past the old end the file is a hole until written (chunks come in order of
            // offset, each once): zeros already. Elsewhere, free the range.
            if c.offset >= old_len {
                return Ok(());
            }
            return crate::chunk::punch_zeros(&file, c.offset, c.len as u64).map_err(werr);
        }
        let mut d = direct.borrow_mut();
        if d.is_none() {
            *d = Some(crate::direct::DirectWriter::new(mirror, &file).map_err(werr)?);
        }
        let Some(d) = d.as_mut() else {
            return Err("the direct writer vanished: this is a bug".into());
        };
        d.write_at(b, c.offset).map_err(werr)?;
        written.set(written.get() + b.len() as u64);
        Ok(())
    };
    let admin = source.path();
    let header = source
        .fetch(since.as_deref(), |h, at, b| {
            if !h.changed_only {
                if let Some(o) = outbox.borrow_mut().as_mut() {
                    o.size = h.bytes;
                    if o.holds.is_none() {
                        let held = old.as_ref().map_or(&[][..], |m| &m.chunks);
                        o.holds = Some(held.iter().map(|c| c.hash).collect());
                    }
                }
                return chunker.push(b, &mut on_chunk);
            }
            // Changed pages only: straight into the mirror.
            file.write_all_at(b, at)
                .map_err(|e| format!("cannot write {}: {e}", mirror.display()))?;
            written.set(written.get() + b.len() as u64);
            touched.extend(at / max..=(at + b.len() as u64 - 1) / max);
            Ok(())
        })
        .map_err(|reason| ShipError::Conode {
            path: admin.to_path_buf(),
            reason,
        })?;
    let chunks = if !header.changed_only {
        Some(
            chunker
                .finish(&mut on_chunk)
                .map_err(|reason| ShipError::Conode {
                    path: admin.to_path_buf(),
                    reason,
                })?,
        )
    } else {
        None
    };
    // Every chunk of a whole image is in the file from here on.
    if let Some(d) = direct.borrow_mut().take() {
        d.finish().map_err(werr)?;
    }
    file.set_len(header.bytes)
        .map_err(|e| ShipError::io("cannot size", mirror, e))?;
    let chunks = if let Some(chunks) = chunks {
        chunks
    } else {
        let old = old.ok_or_else(|| {
            ShipError::Bug(
                "the conode sent changed pages for an image this host does not hold".into(),
            )
        })?;
        // Windows past the shorter of the two lengths changed too (grown or cut).
        let (shorter, len) = (old_len.min(header.bytes), header.bytes);
        touched.extend(shorter / max..len.div_ceil(max));
        let mut chunks: Vec<Chunk> = old
            .chunks
            .into_iter()
            .filter(|c| c.offset < len && !touched.contains(&(c.offset / max)))
            .collect();
        let mut buf = vec![0u8; max as usize];
        for &w in touched.iter().filter(|&&w| w * max < len) {
            let n = (len - w * max).min(max) as usize;
            file.read_exact_at(&mut buf[..n], w * max)
                .map_err(|e| ShipError::io("cannot read", mirror, e))?;
            chunks.extend(
                crate::chunk::chunk_slice(&buf[..n], &params)
                    .into_iter()
                    .map(|c| Chunk {
                        offset: c.offset + w * max,
                        ..c
                    }),
            );
        }
        chunks.sort_by_key(|c| c.offset);
        chunks
    };
    // Tests (debug builds) check the mirror against its chunks: the windows cut again
    // after changed pages, and the holes, punched ranges and direct writes of a whole image.
    #[cfg(debug_assertions)]
    {
        let all = std::fs::read(mirror).map_err(|e| ShipError::io("cannot read", mirror, e))?;
        if crate::chunk::chunk_slice(&all, &params) != chunks {
            return Err(ShipError::Bug(format!(
                "{}: the mirror's bytes disagree with the chunks of the image ({})",
                mirror.display(),
                if header.changed_only {
                    "changed pages"
                } else {
                    "whole image"
                }
            )));
        }
    }
    let skipped = outbox.take().map_or(0, |mut o| {
        o.flush();
        o.skipped
    });
    Ok(Taken {
        header,
        chunks,
        written: written.get(),
        skipped,
    })
}

/// The generation counter, persisted in `state_dir/generation`: never reused.
fn next_generation(state_dir: &Path, peer_newest: u64) -> Result<u64, ShipError> {
    let g = counter(state_dir)?.max(peer_newest) + 1;
    let path = state_dir.join("generation");
    conode::config::write_atomic(&path, format!("{g}\n").as_bytes(), 0o600)
        .map_err(|e| ShipError::io("cannot write", &path, e))?;
    Ok(g)
}

/// Raise the generation counter to at least `g`: this host's next snapshot is numbered
/// past `g` (a generation it installed into its conode).
pub fn number_past(state_dir: &Path, g: u64) -> Result<(), ShipError> {
    if counter(state_dir)? >= g {
        return Ok(());
    }
    let path = state_dir.join("generation");
    conode::config::write_atomic(&path, format!("{g}\n").as_bytes(), 0o600)
        .map_err(|e| ShipError::io("cannot write", &path, e))
}

fn counter(state_dir: &Path) -> Result<u64, ShipError> {
    let path = state_dir.join("generation");
    Ok(match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| {
            ShipError::io(
                "cannot use",
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "it does not hold a number: fix or remove it",
                ),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(ShipError::io("cannot read", &path, e)),
    })
}

impl Shipper {
    /// The newest generation the peer holds (0 if none or unreachable).
    async fn peer_newest(&self) -> u64 {
        match self
            .peer
            .request(Method::GET, "/v1/status", "", "status")
            .await
        {
            Ok(v) => v
                .get("generations")
                .and_then(|g| g.as_array())
                .and_then(|a| a.iter().filter_map(|g| g.get("generation")?.as_u64()).max())
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Take, ship and have the standby install one snapshot.
    pub async fn snapshot(&self) -> Result<LastSnapshot, ShipError> {
        self.snapshot_of(Source::Admin(self.admin.clone())).await
    }

    /// A switchover's final snapshot of the running conode: it is frozen at the image
    /// (refuses every write from then on, keeps serving reads) and the image shipped and
    /// installed on the standby. Only the pages written since the last image travel.
    pub async fn final_image(&self) -> Result<LastSnapshot, ShipError> {
        self.snapshot_of(Source::AdminFinal(self.admin.clone()))
            .await
    }

    /// Take, ship and have the standby install a snapshot of the stopped conode's
    /// database file `db` (a switchover's final snapshot when the conode does not run).
    pub async fn final_snapshot(
        &self,
        db: &Path,
        public: [u8; 32],
    ) -> Result<LastSnapshot, ShipError> {
        self.snapshot_of(Source::File {
            db: db.to_path_buf(),
            public,
        })
        .await
    }

    async fn snapshot_of(&self, source: Source) -> Result<LastSnapshot, ShipError> {
        let _one = self.busy.lock().await;
        let t0 = Instant::now();
        let out = self.cfg.outgoing_dir();
        // Generation numbers grow across both hosts: after a switchover the new live host
        // numbers past every generation either host shipped or holds (the failover core
        // knows both), so a number never names older data than an earlier one. The
        // taking-over host relies on it to skip installing data its database already holds.
        let known = self
            .status
            .view()
            .core
            .and_then(|c| c.newest_generation.max(c.peer.newest_generation))
            .unwrap_or(0);
        let peer_newest = self.peer_newest().await.max(known);
        let state_dir = self.cfg.state_dir.clone();
        let o = out.clone();
        // File work (and the counter's fsync) off the runtime's threads.
        let generation = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&o).map_err(|e| ShipError::io("cannot create", &o, e))?;
            next_generation(&state_dir, peer_newest)
        })
        .await
        .map_err(|e| ShipError::Bug(format!("the generation counter's task failed: {e}")))??;
        let file = out.join(MIRROR_FILE);
        // From here until the image is complete the mirror is not what it was.
        let old = self.mirror_lock().take();
        let (outbox, streamer) = match self.cfg.snapshot.transport {
            Transport::Https => match self.standby_holds(old.as_ref()).await {
                Some(holds) => {
                    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE);
                    let task = tokio::spawn(stream_image(
                        self.peer.clone(),
                        self.metrics.clone(),
                        generation,
                        rx,
                    ));
                    (Some(Outbox::new(tx, holds)), Some(task))
                }
                None => (None, None),
            },
            _ => (None, None),
        };
        let (f, params) = (file.clone(), Params::DEFAULT);
        let taken =
            tokio::task::spawn_blocking(move || take_image(&source, &f, old, params, outbox))
                .await
                .map_err(|e| ShipError::Bug(format!("the task taking the image failed: {e}")));
        // The outbox is gone with the take: the stream task sends what is queued and ends.
        let streamed = match streamer {
            Some(task) => match task.await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::warn!(
                        "generation {generation}: streaming the image while it was taken failed ({e}); the offer sends the rest"
                    );
                    0
                }
                Err(e) => {
                    tracing::warn!("generation {generation}: the stream task failed: {e}");
                    0
                }
            },
            None => 0,
        };
        let taken = taken??;
        *self.mirror_lock() = Some(Mirror {
            chunks: taken.chunks.clone(),
            token: taken.header.token.clone(),
            installed: false,
        });
        let take_ms = t0.elapsed().as_millis() as u64;
        self.ship(generation, &file, taken, streamed, t0, take_ms)
            .await
    }

    /// What the standby's newest generation holds: `Some(None)` when it installed the
    /// image the mirror holds (its chunks, collected only if a whole image comes), else
    /// the hashes it names when asked (`None` if it cannot say).
    async fn standby_holds(&self, old: Option<&Mirror>) -> Option<Option<HashSet<[u8; 32]>>> {
        if old.is_some_and(|m| m.installed) {
            return Some(None);
        }
        let v = self
            .peer
            .request(Method::GET, "/v1/hashes", "", "hashes")
            .await
            .ok()?;
        let raw = hex::decode(v.get("hashes")?.as_str()?).ok()?;
        if raw.len() % 32 != 0 {
            return None;
        }
        Some(Some(
            raw.chunks_exact(32)
                .filter_map(|h| <[u8; 32]>::try_from(h).ok())
                .collect(),
        ))
    }

    fn mirror_lock(&self) -> std::sync::MutexGuard<'_, Option<Mirror>> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn ship(
        &self,
        generation: u64,
        file: &Path,
        taken: Taken,
        streamed: u64,
        t0: Instant,
        take_ms: u64,
    ) -> Result<LastSnapshot, ShipError> {
        let Taken {
            header,
            chunks,
            written,
            skipped,
        } = taken;
        let transport = self.cfg.snapshot.transport;
        let m = Manifest {
            generation,
            conode: header.public,
            signer: self.key.public_bytes(),
            positions: header.positions.clone(),
            taken_unix_ms: header.taken_unix_ms,
            created_unix_ms: now_ms(),
            bytes: header.bytes,
            params: Params::DEFAULT,
            chunks,
            file: (transport != Transport::Https).then(|| INBOX_FILE.to_string()),
            transport,
        };
        let env = m.seal(&self.key);
        let (sent, reused, phases) = match transport {
            Transport::Https => ship_https(&self.peer, &self.metrics, &m, env, file).await?,
            Transport::Rsync | Transport::Scp => {
                let sent = self.ship_ssh(transport, file).await?;
                self.peer
                    .request(Method::POST, "/v1/inbox", env, "installing the snapshot")
                    .await?;
                (sent, 0, String::new())
            }
        };
        if let Some(mirror) = self.mirror_lock().as_mut() {
            mirror.installed |= mirror.token == header.token;
        }
        let sent = sent + streamed;
        let s = LastSnapshot {
            generation,
            taken_unix_ms: header.taken_unix_ms,
            finished_unix_ms: now_ms(),
            bytes: header.bytes,
            duration_ms: t0.elapsed().as_millis() as u64,
            transport: transport.name().to_string(),
            bytes_sent: sent,
            reused_bytes: reused,
            chains: header.positions.len(),
        };
        tracing::info!(
            "generation {generation} installed on the peer: {} bytes, {} chains, {} bytes sent over {}, {} reused, in {:?} ({} taken in {take_ms} ms, {written} bytes of it new to the mirror{}{phases})",
            s.bytes,
            s.chains,
            s.bytes_sent,
            s.transport,
            s.reused_bytes,
            t0.elapsed(),
            if header.changed_only {
                "pages changed since the last image"
            } else {
                "whole image"
            },
            if header.changed_only || transport != Transport::Https {
                String::new()
            } else {
                format!("; {streamed} bytes streamed while it was taken, {skipped} left for the offer")
            }
        );
        Ok(s)
    }

    /// rsync or scp the snapshot into the standby's inbox; the bytes sent as reported.
    async fn ship_ssh(&self, t: Transport, file: &Path) -> Result<u64, ShipError> {
        let ssh = &self.cfg.ssh;
        let dest = format!(
            "{}:{}/{INBOX_FILE}",
            ssh.target,
            ssh.inbox.trim_end_matches('/')
        );
        let (tool, mut cmd) = match t {
            Transport::Rsync => {
                let mut e = String::from("ssh");
                for a in &ssh.args {
                    e.push(' ');
                    e.push_str(&shell_quote(a));
                }
                let mut c = tokio::process::Command::new("rsync");
                // --ignore-times: the mirror keeps its size and may keep its mtime (to the
                // second) from one image to the next; rsync's quick check would skip it.
                c.arg("--no-whole-file")
                    .arg("--ignore-times")
                    .arg("--stats")
                    .arg("-e")
                    .arg(e)
                    .arg(file)
                    .arg(&dest);
                ("rsync", c)
            }
            _ => {
                let mut c = tokio::process::Command::new("scp");
                c.arg("-q").args(&ssh.args).arg(file).arg(&dest);
                ("scp", c)
            }
        };
        let fail = |reason: String| ShipError::Transport {
            tool,
            dest: dest.clone(),
            reason,
        };
        cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
        crate::hooks::without_network_capabilities(cmd.as_std_mut());
        let out = tokio::time::timeout(ssh.timeout, cmd.output())
            .await
            .map_err(|_| {
                fail(format!(
                    "did not finish within {:?} (ssh.timeout); killed",
                    ssh.timeout
                ))
            })?
            .map_err(|e| fail(format!("cannot run it: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(fail(format!(
                "{}: {}",
                out.status,
                err.trim().lines().last().unwrap_or("no message")
            )));
        }
        let size = tokio::fs::metadata(file)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let sent = match t {
            Transport::Rsync => {
                rsync_bytes_sent(&String::from_utf8_lossy(&out.stdout)).unwrap_or(size)
            }
            _ => size,
        };
        self.metrics.bytes_sent(sent);
        Ok(sent)
    }
}

/// Ship generation `m` (signed as `env`, its bytes in `file`) over HTTPS: offer, send
/// what is missing, commit; after a broken connection, offer again (the
/// standby answers only what it still lacks) up to [`RESUME_ATTEMPTS`] times. A
/// refusal, a key the peer does not trust, or a malformed answer ends it at once.
pub async fn ship_https(
    peer: &PeerClient,
    metrics: &Metrics,
    m: &Manifest,
    env: Vec<u8>,
    file: &Path,
) -> Result<(u64, u64, String), ShipError> {
    let mut sent = 0u64;
    let mut reused = None;
    let mut last: Option<PeerError> = None;
    for attempt in 0..RESUME_ATTEMPTS {
        if let Some(e) = &last {
            tracing::warn!(
                "generation {}: transfer interrupted ({e}); resuming (attempt {}/{RESUME_ATTEMPTS})",
                m.generation,
                attempt + 1
            );
            tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(4)))).await;
        }
        let t = Instant::now();
        let r = async {
            let offer = peer
                .request(Method::POST, "/v1/offer", env.clone(), "offer")
                .await?;
            let (missing, reused_now) = parse_offer(&offer, m.chunks.len())?;
            if reused.is_none() {
                reused = reused_now;
            }
            if offer.get("installed").and_then(|v| v.as_bool()) == Some(true) {
                // The commit of an earlier attempt landed; its answer was lost.
                return Ok::<_, ShipError>(format!(
                    "; installed already (an earlier attempt's answer was lost), found after {:?}",
                    t.elapsed()
                ));
            }
            let offered = t.elapsed();
            send_chunks(peer, metrics, m, file, &missing, &mut sent).await?;
            let chunks_sent = t.elapsed();
            peer
                .request(
                    Method::POST,
                    &format!("/v1/commit/{}", m.generation),
                    "",
                    "commit",
                )
                .await?;
            Ok::<_, ShipError>(format!(
                "; offer answered after {offered:?}, {} chunks sent after {chunks_sent:?}, installed after {:?}",
                missing.len(),
                t.elapsed()
            ))
        }
        .await;
        match r {
            Ok(phases) => return Ok((sent, reused.unwrap_or(0), phases)),
            Err(ShipError::Peer(e)) if !e.is_permanent() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(ShipError::GaveUp {
        address: peer.address().to_string(),
        generation: m.generation,
        attempts: RESUME_ATTEMPTS,
        last: last.unwrap_or(PeerError::Malformed {
            what: "offer".into(),
            reason: "no attempt was made".into(),
        }),
    })
}

/// Send chunks `missing` (indices checked against the manifest already) in batches of
/// about [`BATCH_BYTES`].
async fn send_chunks(
    peer: &PeerClient,
    metrics: &Metrics,
    m: &Manifest,
    file: &Path,
    missing: &[u32],
    sent: &mut u64,
) -> Result<(), ShipError> {
    let mut i = 0;
    while i < missing.len() {
        let mut j = i;
        let mut len = 0usize;
        while j < missing.len() && (len == 0 || len < BATCH_BYTES) {
            len += 8 + m.chunks[missing[j] as usize].len as usize;
            j += 1;
        }
        let batch: Vec<(u32, Chunk)> = missing[i..j]
            .iter()
            .map(|&idx| (idx, m.chunks[idx as usize]))
            .collect();
        let path = file.to_path_buf();
        let body = tokio::task::spawn_blocking(move || frame_chunks(&path, &batch, len))
            .await
            .map_err(|e| ShipError::Bug(format!("the task reading chunks failed: {e}")))??;
        let n = body.len() as u64;
        peer.request(
            Method::PUT,
            &format!("/v1/chunks/{}", m.generation),
            body,
            "sending chunks",
        )
        .await?;
        *sent += n;
        metrics.bytes_sent(n);
        i = j;
    }
    Ok(())
}

/// The standby's answer to an offer, checked: every index names a chunk of the manifest
/// (`chunks` of them). Returns the indices and the bytes it reused.
pub fn parse_offer(
    offer: &serde_json::Value,
    chunks: usize,
) -> Result<(Vec<u32>, Option<u64>), PeerError> {
    let malformed = |reason: String| PeerError::Malformed {
        what: "offer".into(),
        reason,
    };
    let list = offer
        .get("missing")
        .and_then(|v| v.as_array())
        .ok_or_else(|| malformed("no list of missing chunks".into()))?;
    let missing = list
        .iter()
        .map(|v| {
            v.as_u64()
                .filter(|&n| (n as usize) < chunks)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    malformed(format!(
                        "it asks for chunk {v}, but the manifest has {chunks} chunks (0 to {})",
                        chunks.saturating_sub(1)
                    ))
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    Ok((missing, offer.get("reused_bytes").and_then(|v| v.as_u64())))
}

/// Read chunks `batch` of `file` into one request body of frames (`len` bytes).
fn frame_chunks(file: &Path, batch: &[(u32, Chunk)], len: usize) -> Result<Vec<u8>, ShipError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).map_err(|e| ShipError::io("cannot open", file, e))?;
    let mut buf = Vec::with_capacity(len);
    for (idx, c) in batch {
        buf.extend_from_slice(&idx.to_le_bytes());
        buf.extend_from_slice(&c.len.to_le_bytes());
        let at = buf.len();
        buf.resize(at + c.len as usize, 0);
        f.read_exact_at(&mut buf[at..], c.offset)
            .map_err(|e| ShipError::io("cannot read", file, e))?;
    }
    Ok(buf)
}

/// Send the batches of frames queued while a whole image is taken, one `PUT /v1/stream`
/// request each, two at a time. Returns the bytes sent; an error ends the stream (the take
/// goes on, the offer sends the rest).
async fn stream_image(
    peer: PeerClient,
    metrics: Arc<Metrics>,
    generation: u64,
    mut rx: tokio::sync::mpsc::Receiver<(u64, Vec<u8>)>,
) -> Result<u64, String> {
    let mut in_flight = std::collections::VecDeque::new();
    let mut sent = 0;
    let done = |t: tokio::task::JoinHandle<Result<u64, String>>| async move {
        t.await.map_err(|e| format!("stream request: {e}"))?
    };
    while let Some((size, body)) = rx.recv().await {
        if in_flight.len() == 2 {
            if let Some(t) = in_flight.pop_front() {
                sent += done(t).await?;
            }
        }
        let (peer, metrics) = (peer.clone(), metrics.clone());
        let path = format!("/v1/stream/{generation}/{size}");
        in_flight.push_back(tokio::spawn(async move {
            let n = body.len() as u64;
            peer.request(Method::PUT, &path, body, "streaming the image")
                .await
                .map_err(|e| e.to_string())?;
            metrics.bytes_sent(n);
            Ok(n)
        }));
    }
    for t in in_flight {
        sent += done(t).await?;
    }
    Ok(sent)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// "Total bytes sent: 1,234" from `rsync --stats`.
pub fn rsync_bytes_sent(stats: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("Total bytes sent:"))
        .and_then(|v| v.trim().replace(',', "").parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_stats_and_quoting() {
        assert_eq!(
            rsync_bytes_sent("Number of files: 1\nTotal bytes sent: 1,234,567\n"),
            Some(1234567)
        );
        assert_eq!(shell_quote("-i"), "-i");
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }

    #[test]
    fn an_offer_naming_a_chunk_out_of_range_is_a_clear_error() {
        let ok = serde_json::json!({"missing": [0, 2], "reused_bytes": 5});
        assert_eq!(parse_offer(&ok, 3).unwrap(), (vec![0, 2], Some(5)));
        for bad in [
            serde_json::json!({"missing": [3]}),
            serde_json::json!({"missing": [4294967296u64]}),
            serde_json::json!({"missing": [-1]}),
            serde_json::json!({"missing": ["1"]}),
            serde_json::json!({"gone": []}),
        ] {
            let e = parse_offer(&bad, 3).unwrap_err();
            assert!(e.is_permanent(), "{e}");
            assert!(e.to_string().contains("malformed"), "{e}");
        }
        let e = parse_offer(&serde_json::json!({"missing": [999999]}), 3).unwrap_err();
        assert!(
            e.to_string()
                .contains("asks for chunk 999999, but the manifest has 3 chunks"),
            "{e}"
        );
    }

    #[test]
    fn generations_only_grow() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(next_generation(d.path(), 0).unwrap(), 1);
        assert_eq!(next_generation(d.path(), 0).unwrap(), 2);
        assert_eq!(next_generation(d.path(), 10).unwrap(), 11);
        assert_eq!(next_generation(d.path(), 3).unwrap(), 12);
        std::fs::write(d.path().join("generation"), "x").unwrap();
        assert!(next_generation(d.path(), 0)
            .unwrap_err()
            .to_string()
            .contains("does not hold a number"));
    }
}
