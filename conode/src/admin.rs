//! The admin socket: a local Unix socket through which `conode backup` and `failoverd` take
//! consistent snapshots of a running conode's database, with no downtime.
//!
//! This module serves snapshots and positions and nothing else: it never writes to the
//! live database, never accepts data, and never listens on the network.
//!
//! # Where and who
//!
//! The socket is `admin-<first 16 hex digits of Public>.sock` beside the database file,
//! that is in the data directory ([`admin_socket_path`]). Its mode is 0600 from the moment
//! it has that name, and every connection's peer is checked with `SO_PEERCRED`: only root
//! and the conode's own user are served. With `CONODE_ADMIN_GROUP=<group>` (the packaged
//! unit sets `conode`, the group failoverd's user is in), the socket is 0660 in that group
//! and processes whose effective or supplementary groups include it are served too (the
//! supplementary groups from the socket, `SO_PEERGROUPS`). The conode removes it on a graceful stop; at
//! start, a leftover socket that nobody answers on is replaced, one that answers is an
//! error (another conode uses it). A path of 108 bytes or more does not fit a Unix socket
//! address: the conode then refuses to start and says so.
//!
//! # Protocol (version 1)
//!
//! The client connects and sends one request line (at most [`MAX_REQUEST_LINE`] bytes
//! before the `\n`, within [`REQUEST_TIMEOUT`]); the server answers and closes. Every
//! JSON line is one object followed by `\n`; hashes and keys are lowercase hex.
//!
//! - `snapshot\n`: the server copies the database in one read transaction into a fresh
//!   redb file (a temporary `.snapshot-<pid>-<n>.tmp` beside the database, deleted once
//!   it is open for streaming, and on error), then sends
//!   1. a header line:
//!      `{"ok":true,"bytes":N,"public":"<hex>","positions":[{"chain":"<hex>","index":I,"hash":"<hex>"},...],"taken_unix_ms":T}`
//!      where `positions` are the chains in the copy (genesis hash, latest index and
//!      latest block hash, sorted by chain) and `T` is when the read transaction began;
//!   2. exactly `N` bytes: the redb file;
//!   3. a trailer line `{"sha256":"<hex of the N bytes>"}`.
//!
//!   A stream that ends early, or whose bytes do not hash to the trailer, is damaged:
//!   discard it. The file is a complete redb database whose `meta.public` is the
//!   conode's key; check it with [`crate::db::verify_snapshot`] before using it.
//! - `image\n`: a page image of the live database file at its latest commit (see
//!   [`crate::db::Db::image`]). **Writers wait while the image streams**: the client must
//!   read at once and fast; a stream not finished within [`IMAGE_HOLD_LIMIT`] is cut short
//!   and the writers released. The server sends
//!   1. the same header line as `snapshot` (`bytes` is the image's length);
//!   2. exactly `N` bytes: the image;
//!   3. a trailer line `{"ok":true,"sent":N}`.
//!
//!   Pages keep their offsets from one image to the next, so what changed between two
//!   images is only what was written between them (what `failoverd` ships). The image is a
//!   crash image: opening it makes redb walk every tree once; check it with
//!   [`crate::db::verify_snapshot`]. A stream that ends before the trailer is damaged.
//!   The header also carries `"token":"<t>"`, naming this image.
//! - `image since=<t>\n`: the same, but if the conode still knows token `t` (one of the
//!   last [`crate::dirty::KEPT_TOKENS`] handed out by this process), only the pages
//!   written since `t` was handed out: the header then has `"changed_stream":M`, and the
//!   M bytes that follow are runs, each an offset (u64) and a length (u32), little-endian
//!   ([`RUN_HEADER`] bytes), then that many bytes of the file from that offset. Applied
//!   to the bytes of image `t` (cut or zero-extended to `bytes`), they give the whole
//!   image. A token it does not know (another process's, too old, or garbage) gets the
//!   whole image. The trailer's `sent` counts the M bytes. A client that did not finish
//!   applying an answer asks again since the same token.
//! - `final-image\n`, `final-image since=<t>\n`: the same as `image`, and the database
//!   is **frozen** at that image: from then on every write is refused
//!   ([`crate::db::FROZEN`]) while reads go on. A switchover ships this image as the
//!   host's last state, then stops the conode. Status shows `Db.Frozen`.
//! - `thaw\n`: accept writes again (a switchover called off):
//!   `{"ok":true,"was_frozen":B}`. A restart thaws too.
//! - `position\n`: `{"ok":true,"public":"<hex>","positions":[...]}`, the same
//!   positions as a snapshot would carry, without copying anything.
//! - Anything else, a line over [`MAX_REQUEST_LINE`] bytes, no complete line within
//!   [`REQUEST_TIMEOUT`], a peer of another user, more than [`MAX_SNAPSHOTS`] snapshots
//!   or [`MAX_CONNECTIONS`] connections at once, or a snapshot that cannot be made:
//!   `{"ok":false,"error":"<one line for the operator>"}` and the connection closes. The
//!   server keeps serving other connections. A refusal (another user, too many
//!   connections) may come before the request is read: a client reads the answer even if
//!   sending its request failed. A trailing `\r` is ignored; request words are
//!   case-sensitive.
//!
//! An example session (`socat - UNIX-CONNECT:/var/lib/conode/admin-5866666666666666.sock`),
//! `>` the client, `<` the server:
//!
//! ```text
//! > position
//! < {"ok":true,"public":"5866…66","positions":[{"chain":"8f1c…","index":41,"hash":"02ab…"}]}
//! ```
//!
//! ```text
//! > snapshot
//! < {"ok":true,"bytes":1589248,"public":"5866…66","positions":[{"chain":"8f1c…","index":41,"hash":"02ab…"}],"taken_unix_ms":1764000000000}
//! < (1589248 bytes of redb file)
//! < {"sha256":"9c0e…"}
//! ```
//!
//! ```text
//! > status
//! < {"ok":false,"error":"unknown request \"status\": expected \"snapshot\", \"image\", \"final-image\", \"thaw\" or \"position\""}
//! ```
//!
//! [`fetch_snapshot`] and [`fetch_position`] are the client side.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{watch, Semaphore};

use crate::db::{ChainPosition, Db};
use crate::ws::{stopped, Tracker};

/// Longest request line, without its `\n`.
pub const MAX_REQUEST_LINE: usize = 1024;
/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots and images taken at the same time; more are answered "busy". A snapshot holds
/// a read transaction (which keeps the live file from reusing pages) and writes a full
/// copy; an image holds the writers while it streams.
pub const MAX_SNAPSHOTS: usize = 2;
/// Connections served at the same time; more are answered "busy".
pub const MAX_CONNECTIONS: usize = 16;
/// How long one read or write of a stream may take before the other side is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client waits for the header, that is for the copy to be made.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1800);
/// Longest header line a client accepts (about 100 000 chains).
const MAX_HEADER_LINE: u64 = 16 << 20;
/// `sun_path` is 108 bytes, with the terminating NUL.
const SUN_PATH_LEN: usize = 108;
const CHUNK: usize = 64 * 1024;

/// The admin socket of the conode whose database is `db_path`:
/// `admin-<first 16 hex digits of public>.sock` in the same directory.
pub fn admin_socket_path(db_path: &Path, public: &[u8; 32]) -> PathBuf {
    let hex = hex::encode(public);
    db_path.with_file_name(format!("admin-{}.sock", &hex[..16]))
}

// ---------------------------------------------------------------------------------------
// Wire messages: one place for the JSON lines of the protocol.

#[derive(Debug, Serialize, Deserialize)]
struct WirePosition {
    chain: String,
    index: u32,
    hash: String,
}

#[derive(Serialize, Deserialize)]
struct WireSnapshotHeader {
    ok: bool,
    bytes: u64,
    public: String,
    positions: Vec<WirePosition>,
    taken_unix_ms: u64,
    /// `image` only: names this image, for `image since=TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// `image since=TOKEN` answered with the changed pages only: the stream's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    changed_stream: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WirePositionAnswer {
    ok: bool,
    public: String,
    positions: Vec<WirePosition>,
}

#[derive(Serialize, Deserialize)]
struct WireError {
    ok: bool,
    error: String,
}

#[derive(Serialize, Deserialize)]
struct WireTrailer {
    sha256: String,
}

fn to_wire(p: &[ChainPosition]) -> Vec<WirePosition> {
    p.iter()
        .map(|p| WirePosition {
            chain: hex::encode(p.chain),
            index: p.index,
            hash: hex::encode(p.hash),
        })
        .collect()
}

fn hex32(what: &str, s: &str) -> Result<[u8; 32], String> {
    let v = hex::decode(s).map_err(|e| format!("{what} {s:?} is not hex: {e}"))?;
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| format!("{what} {s:?} is {} bytes, expected 32", v.len()))
}

fn from_wire(p: Vec<WirePosition>) -> Result<Vec<ChainPosition>, String> {
    p.into_iter()
        .map(|p| {
            Ok(ChainPosition {
                chain: hex32("chain", &p.chain)?,
                index: p.index,
                hash: hex32("hash", &p.hash)?,
            })
        })
        .collect()
}

fn json_line<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty object keeps the line format.
    let mut line = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

fn error_line(msg: &str) -> Vec<u8> {
    json_line(&WireError {
        ok: false,
        error: msg.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// Server side.

/// The bound admin socket, ready for [`serve`].
pub struct AdminListener {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket we bound, so that a stop removes only our own.
    id: (u64, u64),
    /// The group also served ([`ADMIN_GROUP_ENV`]).
    group: Option<u32>,
}

/// The environment variable naming a group whose members may use the admin socket
/// besides root and the conode's user (e.g. `conode`, with failoverd's user in it).
pub const ADMIN_GROUP_ENV: &str = "CONODE_ADMIN_GROUP";

/// The group of [`ADMIN_GROUP_ENV`], if set: its name and gid; an error names a group
/// that does not exist (a configuration error: `conode server` exits with status 2).
pub fn admin_group() -> Result<Option<(String, u32)>, String> {
    let Some(name) = std::env::var_os(ADMIN_GROUP_ENV) else {
        return Ok(None);
    };
    let name = name.to_string_lossy().trim().to_string();
    if name.is_empty() {
        return Ok(None);
    }
    match nix::unistd::Group::from_name(&name) {
        Ok(Some(g)) => Ok(Some((name, g.gid.as_raw()))),
        Ok(None) => Err(format!(
            "{ADMIN_GROUP_ENV}={name:?}: no such group on this host"
        )),
        Err(e) => Err(format!("{ADMIN_GROUP_ENV}={name:?}: {e}")),
    }
}

/// The supplementary groups of the process at the other end of the Unix socket `fd`, as
/// the kernel recorded them when it connected (`SO_PEERGROUPS`, Linux 4.13 and later).
/// Unlike `/proc/PID/status`, this needs no view of the client's process (the unit's
/// `ProtectProc=invisible` hides it) and cannot name another process.
fn peer_groups(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    for _ in 0..4 {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `fd` is an open socket borrowed for the whole call; `groups` is a live,
        // initialised, writable buffer of exactly `len` bytes, and `len` points to a
        // socklen_t we own. The kernel writes at most `len` bytes into the buffer and
        // stores in `len` the bytes written, or the bytes needed when it fails with
        // ERANGE; nothing is read from the buffer beyond what it reports as written.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            groups.truncate((len as usize / GID).min(groups.len()));
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
        // More groups than room: the kernel said how many bytes it needs.
        groups.resize((len as usize / GID).max(groups.len() * 2), 0);
    }
    Err(std::io::Error::other(
        "SO_PEERGROUPS: the group list kept growing",
    ))
}

impl AdminListener {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Bind the admin socket at `path`, owner-only (0660 in [`ADMIN_GROUP_ENV`]'s group when it
/// is set). See the module doc for what happens to a
/// socket file that is already there.
pub fn bind(path: &Path) -> Result<AdminListener, String> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let len = path.as_os_str().len();
    if len >= SUN_PATH_LEN {
        return Err(format!(
            "the admin socket path {} is {len} bytes, more than a Unix socket address holds ({} bytes): use a shorter data directory (CONODE_SERVICE_PATH)",
            path.display(),
            SUN_PATH_LEN - 1
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(format!(
                        "another conode is using the admin socket {}: stop it first",
                        path.display()
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|e| {
                        format!(
                            "cannot remove the stale admin socket {}: {e}",
                            path.display()
                        )
                    })?;
                    tracing::info!(
                        "removed the stale admin socket {} (nothing answered on it)",
                        path.display()
                    );
                }
                Err(e) => {
                    return Err(format!(
                        "cannot tell whether the admin socket {} is in use: {e}; remove it if no conode runs",
                        path.display()
                    ))
                }
            }
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket: refusing to replace it; move it away",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot check {}: {e}", path.display())),
    }

    // Owner-only (or group-only, with a group) without a window: bind() creates the socket with mode 0777 & ~umask, and
    // setting the umask around it would change it for every thread of the process. So the
    // socket is bound inside a private directory (0700: only we and root can reach what is
    // in it), narrowed to 0600 (0660 with a group) there, and only then renamed to its public name. Nobody else
    // can connect at any moment; SO_PEERCRED in `serve` is a second fence.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let private = dir.join(format!(".admin-{}.d", std::process::id()));
    let tmp = private.join("s");
    // A leftover of a process that had our pid: ours by name.
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| format!("cannot create {}: {e}", private.display()))?;
    let group = admin_group()?;
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .map_err(|e| format!("cannot bind the admin socket {}: {e}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot make {} owner-only: {e}", tmp.display()))?;
        if let Some((name, gid)) = &group {
            // In a setgid data directory (the package's) the socket has the group
            // already, and no chown is made (the unit's syscall filter refuses chown).
            let has = std::fs::metadata(&tmp)
                .map(|m| m.gid() == *gid)
                .unwrap_or(false);
            if !has {
                nix::unistd::chown(&tmp, None, Some(nix::unistd::Gid::from_raw(*gid))).map_err(
                |e| {
                    format!(
                        "cannot give the admin socket to group {name} ({ADMIN_GROUP_ENV}): {e}; the conode's user must be a member of it"
                    )
                },
            )?;
            }
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| format!("cannot open {} to group {name}: {e}", tmp.display()))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("admin socket: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            format!(
                "cannot move the admin socket into place at {}: {e}",
                path.display()
            )
        })?;
        let m = std::fs::symlink_metadata(path)
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        Ok(AdminListener {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
            group: group.as_ref().map(|(_, gid)| *gid),
        })
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Remove the socket file if it is still the one we bound.
fn remove_socket(path: &Path, id: (u64, u64)) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if (m.dev(), m.ino()) == id {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove the admin socket {}: {e}", path.display());
            }
        }
    }
}

struct Ctx {
    db: Arc<Db>,
    euid: u32,
    /// Members of this group are served too ([`ADMIN_GROUP_ENV`]).
    group: Option<u32>,
    snapshots: Semaphore,
}

/// Serve the admin protocol until `shutdown` turns true, then remove the socket file.
/// Connections waiting for their request are closed at once; snapshots being streamed
/// finish (the server's stop waits for them through `tracker`).
pub async fn serve(
    admin: AdminListener,
    db: Arc<Db>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Tracker,
) {
    let AdminListener {
        listener,
        path,
        id,
        group,
    } = admin;
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "admin socket {}: cannot register with the runtime: {e}; backups are not available",
                path.display()
            );
            remove_socket(&path, id);
            return;
        }
    };
    let ctx = Arc::new(Ctx {
        db,
        euid: nix::unistd::geteuid().as_raw(),
        group,
        snapshots: Semaphore::new(MAX_SNAPSHOTS),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(10);
    tracing::debug!("admin socket listening on {}", path.display());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut shutdown) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                tracing::warn!("admin socket: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let permit = slots.clone().try_acquire_owned().ok();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let tracker = tracker.clone();
        tokio::spawn(async move {
            let _tracker = tracker;
            let mut stream = stream;
            let r = match permit {
                Some(_permit) => handle(&mut stream, &ctx, shutdown).await,
                None => {
                    let msg = format!(
                        "busy: {MAX_CONNECTIONS} admin connections are open; try again later"
                    );
                    let _ = reply(&mut stream, &error_line(&msg)).await;
                    Err(msg)
                }
            };
            if let Err(e) = r {
                tracing::debug!("admin socket: {e}");
            }
        });
    }
    drop(listener);
    remove_socket(&path, id);
}

/// Write `line` (with a timeout) and close our side.
async fn reply<S: AsyncWrite + Unpin>(s: &mut S, line: &[u8]) -> Result<(), String> {
    write_timed(s, line).await?;
    let _ = tokio::time::timeout(IO_TIMEOUT, s.shutdown()).await;
    Ok(())
}

async fn write_timed<S: AsyncWrite + Unpin>(s: &mut S, buf: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(IO_TIMEOUT, s.write_all(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("client went away: {e}")),
        Err(_) => Err(format!("client did not read for {IO_TIMEOUT:?}")),
    }
}

async fn handle(
    stream: &mut UnixStream,
    ctx: &Ctx,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == ctx.euid => {}
        Ok(c)
            if ctx.group.is_some_and(|g| {
                use std::os::fd::AsFd;
                c.gid() == g || peer_groups(stream.as_fd()).is_ok_and(|gs| gs.contains(&g))
            }) => {}
        Ok(c) => {
            let msg = format!(
                "permission denied: uid {} is neither root nor the conode's user (uid {}){}",
                c.uid(),
                ctx.euid,
                match ctx.group {
                    Some(g) => format!(", nor in group {g}"),
                    None => String::new(),
                }
            );
            tracing::warn!("admin socket: refused a client: {msg}");
            reply(stream, &error_line(&msg)).await?;
            return Err(msg);
        }
        Err(e) => {
            let msg = format!("cannot tell who the client is (SO_PEERCRED: {e})");
            reply(stream, &error_line(&msg)).await?;
            return Err(msg);
        }
    }
    let request = tokio::select! {
        r = tokio::time::timeout(REQUEST_TIMEOUT, read_request(stream)) => r,
        _ = stopped(&mut shutdown) => {
            let _ = reply(stream, &error_line("the conode is stopping")).await;
            return Ok(());
        }
    };
    let request = match request {
        Ok(Ok(r)) => r,
        Ok(Err(msg)) => {
            reply(stream, &error_line(&msg)).await?;
            return Err(msg);
        }
        Err(_) => {
            let msg = format!("no request line within {} s", REQUEST_TIMEOUT.as_secs());
            reply(stream, &error_line(&msg)).await?;
            return Err(msg);
        }
    };
    match request.as_str() {
        "snapshot" => snapshot(stream, ctx).await,
        "image" => image(stream, ctx, None, false).await,
        r if r.starts_with(IMAGE_SINCE) => {
            image(stream, ctx, Some(r[IMAGE_SINCE.len()..].to_string()), false).await
        }
        "final-image" => image(stream, ctx, None, true).await,
        r if r.starts_with(FINAL_IMAGE_SINCE) => {
            let since = r[FINAL_IMAGE_SINCE.len()..].to_string();
            image(stream, ctx, Some(since), true).await
        }
        "thaw" => {
            let was = ctx.db.thaw();
            if was {
                tracing::warn!("admin socket: the database was frozen by a final image and accepts writes again (the switchover was called off)");
            }
            reply(
                stream,
                &json_line(&WireThaw {
                    ok: true,
                    was_frozen: was,
                }),
            )
            .await
        }
        "position" => position(stream, ctx).await,
        other => {
            let shown: String = other.chars().take(64).collect();
            let msg = format!(
                "unknown request {shown:?}: expected \"snapshot\", \"image\", \"final-image\", \"thaw\" or \"position\""
            );
            reply(stream, &error_line(&msg)).await?;
            Err(msg)
        }
    }
}

/// One line of at most [`MAX_REQUEST_LINE`] bytes, without `\n` (and `\r`).
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, String> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 512];
    loop {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("cannot read the request: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "the connection closed before a request".into()
            } else {
                "the request line ended without a newline".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            buf.truncate(i);
            break;
        }
        if buf.len() > MAX_REQUEST_LINE {
            break;
        }
    }
    if buf.len() > MAX_REQUEST_LINE {
        return Err(format!(
            "request line longer than {MAX_REQUEST_LINE} bytes: expected \"snapshot\", \"image\", \"final-image\", \"thaw\" or \"position\""
        ));
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| {
        "the request is not UTF-8 text: expected \"snapshot\", \"image\", \"final-image\", \"thaw\" or \"position\""
            .to_string()
    })
}

async fn position(stream: &mut UnixStream, ctx: &Ctx) -> Result<(), String> {
    let db = ctx.db.clone();
    let r = tokio::task::spawn_blocking(move || {
        use redb::ReadableDatabase;
        let read = db
            .db()
            .begin_read()
            .map_err(|e| format!("cannot begin a read transaction: {e}"))?;
        let public = crate::db::owner_key(&read)?;
        Ok::<_, String>((public, crate::db::chain_positions(&read)?))
    })
    .await
    .unwrap_or_else(|e| Err(format!("the position task failed: {e}: this is a bug")));
    match r {
        Ok((public, positions)) => {
            let line = json_line(&WirePositionAnswer {
                ok: true,
                public: hex::encode(public),
                positions: to_wire(&positions),
            });
            reply(stream, &line).await
        }
        Err(msg) => {
            tracing::warn!("admin socket: position: {msg}");
            reply(stream, &error_line(&msg)).await?;
            Err(msg)
        }
    }
}

/// Removes a file when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove the snapshot file {}: {e}", p.display());
                }
            }
        }
    }
}

static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

/// Run the database work `f` of request `what` on a blocking thread; its error is
/// logged and answered to the client.
async fn blocking_or_reply<T: Send + 'static>(
    stream: &mut UnixStream,
    what: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let r = tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the {what} task failed: {e}: this is a bug")));
    match r {
        Ok(v) => Ok(v),
        Err(msg) => {
            tracing::warn!("admin socket: {what} failed: {msg}");
            reply(stream, &error_line(&msg)).await?;
            Err(msg)
        }
    }
}

/// One of the [`MAX_SNAPSHOTS`] slots shared by `snapshot` and `image`, or "busy" answered.
async fn snapshot_slot<'a>(
    stream: &mut UnixStream,
    ctx: &'a Ctx,
) -> Result<tokio::sync::SemaphorePermit<'a>, String> {
    match ctx.snapshots.try_acquire() {
        Ok(p) => Ok(p),
        Err(_) => {
            let msg = format!(
                "busy: {MAX_SNAPSHOTS} snapshots are being taken already; try again when one is done"
            );
            reply(stream, &error_line(&msg)).await?;
            Err(msg)
        }
    }
}

async fn snapshot(stream: &mut UnixStream, ctx: &Ctx) -> Result<(), String> {
    let _permit = snapshot_slot(stream, ctx).await?;
    let n = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = ctx
        .db
        .path
        .with_file_name(format!(".snapshot-{}-{n}.tmp", std::process::id()));
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let db = ctx.db.clone();
    let dest = tmp.clone();
    let info = blocking_or_reply(stream, "snapshot", move || db.snapshot_to(&dest)).await?;
    let mut file = match tokio::fs::File::open(&tmp).await {
        Ok(f) => f,
        Err(e) => {
            let msg = format!("cannot open the snapshot {}: {e}", tmp.display());
            reply(stream, &error_line(&msg)).await?;
            return Err(msg);
        }
    };
    // The open descriptor keeps the data: remove the name now, so that nothing is left
    // behind even if the conode is killed while streaming.
    drop(guard);
    let header = json_line(&WireSnapshotHeader {
        ok: true,
        bytes: info.bytes,
        public: hex::encode(info.public),
        positions: to_wire(&info.positions),
        taken_unix_ms: info.taken_unix_ms,
        token: None,
        changed_stream: None,
    });
    write_timed(stream, &header).await?;
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while sent < info.bytes {
        let want = ((info.bytes - sent) as usize).min(CHUNK);
        let got = file
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("cannot read the snapshot: {e}; the stream is cut short"))?;
        if got == 0 {
            let msg = format!(
                "the snapshot file ended after {sent} of {} bytes; the stream is cut short: this is a bug",
                info.bytes
            );
            tracing::error!("admin socket: {msg}");
            return Err(msg);
        }
        hasher.update(&buf[..got]);
        write_timed(stream, &buf[..got]).await?;
        sent += got as u64;
    }
    let trailer = json_line(&WireTrailer {
        sha256: hex::encode(hasher.finalize()),
    });
    reply(stream, &trailer).await?;
    tracing::info!(
        "admin socket: streamed a snapshot of {} bytes ({} chains, taken at {} ms)",
        info.bytes,
        info.positions.len(),
        info.taken_unix_ms
    );
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct WireImageTrailer {
    ok: bool,
    sent: u64,
}

/// Bytes per piece of an image read from the live file and written to the socket.
const IMAGE_PIECE: usize = 1 << 20;
/// Longest time an image may hold the writers; the stream is then cut short.
pub const IMAGE_HOLD_LIMIT: Duration = Duration::from_secs(20);

/// The request for the pages changed since an earlier image.
const IMAGE_SINCE: &str = "image since=";
/// The same for a final image (the database frozen once it is taken).
const FINAL_IMAGE_SINCE: &str = "final-image since=";

/// The answer to `thaw`.
#[derive(Serialize)]
struct WireThaw {
    ok: bool,
    was_frozen: bool,
}
/// Bytes before each run of pages in a changed-pages stream: offset (u64) and length
/// (u32), little-endian.
pub const RUN_HEADER: usize = 12;
/// Pages per run at most, in a changed-pages stream.
const RUN_PAGES: u64 = 256;

/// The runs of consecutive pages in sorted `pages`, as (offset, length) within `bytes`.
fn runs(pages: &[u64], bytes: u64) -> Vec<(u64, u32)> {
    let page = crate::dirty::PAGE;
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &p in pages {
        let (off, len) = (p * page, page.min(bytes - p * page) as u32);
        match out.last_mut() {
            Some((o, l)) if *o + *l as u64 == off && (*l as u64) < RUN_PAGES * page => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

async fn image(
    stream: &mut UnixStream,
    ctx: &Ctx,
    since: Option<String>,
    freeze: bool,
) -> Result<(), String> {
    let _permit = snapshot_slot(stream, ctx).await?;
    let db = ctx.db.clone();
    // The writers are held from inside `db.image` until the image is dropped: the whole
    // stream (header, pieces, trailer) must end by this deadline, whatever the client
    // reads; at the deadline the stream and the reader stop and the image is dropped.
    let deadline = tokio::time::Instant::now() + IMAGE_HOLD_LIMIT;
    let img =
        blocking_or_reply(stream, "image", move || db.image(since.as_deref(), freeze)).await?;
    if freeze {
        tracing::info!("admin socket: final image taken; the database is frozen (writes are refused until a restart or `thaw`)");
    }
    // The whole file in pieces, or the runs of changed pages, each after its run header.
    let pieces: Vec<(u64, u32, bool)> = match &img.changed {
        Some(pages) => runs(pages, img.bytes)
            .into_iter()
            .map(|(o, l)| (o, l, true))
            .collect(),
        None => (0..img.bytes)
            .step_by(IMAGE_PIECE)
            .map(|o| (o, (img.bytes - o).min(IMAGE_PIECE as u64) as u32, false))
            .collect(),
    };
    let stream_bytes: u64 = pieces
        .iter()
        .map(|&(_, l, run)| l as u64 + if run { RUN_HEADER as u64 } else { 0 })
        .sum();
    let header = json_line(&WireSnapshotHeader {
        ok: true,
        bytes: img.bytes,
        public: hex::encode(img.public),
        positions: to_wire(&img.positions),
        taken_unix_ms: img.taken_unix_ms,
        token: Some(img.token.clone()),
        changed_stream: img.changed.as_ref().map(|_| stream_bytes),
    });
    let (bytes, chains, taken) = (img.bytes, img.positions.len(), img.taken_unix_ms);
    // A reader thread holds the image (and so the pinned commit) and hands pieces over;
    // it stops when the receiver goes away.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
    // Written pieces come back to be filled again (no zeroing, no allocation per piece).
    let (back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        for (off, len, run) in pieces {
            if started.elapsed() > IMAGE_HOLD_LIMIT {
                let _ = tx.blocking_send(Err(format!(
                    "the image reader took more than {IMAGE_HOLD_LIMIT:?} ({off} of {} bytes): the image is abandoned so that writers go on",
                    img.bytes
                )));
                return;
            }
            let head = if run { RUN_HEADER } else { 0 };
            let mut buf = spare.try_recv().unwrap_or_default();
            buf.resize(head + len as usize, 0);
            if run {
                buf[..8].copy_from_slice(&off.to_le_bytes());
                buf[8..12].copy_from_slice(&len.to_le_bytes());
            }
            let r = img.read_at(&mut buf[head..], off).map(|()| buf);
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
        }
    });
    let streamed = tokio::time::timeout_at(deadline, async {
        // Owned by the stream: dropped with it at the deadline.
        let mut rx = rx;
        write_timed(stream, &header).await?;
        let mut sent = 0u64;
        while let Some(piece) = rx.recv().await {
            let piece = piece.map_err(|e| {
                tracing::error!("admin socket: {e}; the image stream is cut short");
                e
            })?;
            write_timed(stream, &piece).await?;
            sent += piece.len() as u64;
            let _ = back.send(piece);
        }
        Ok::<_, String>(sent)
    })
    .await;
    // The receiver is gone now (also at the deadline): the reader stops at its next piece
    // and drops the image, which releases the writers.
    let _ = reader.await;
    let sent = match streamed {
        Ok(r) => r?,
        Err(_) => {
            let msg = format!(
                "the image was not read within {IMAGE_HOLD_LIMIT:?}: the stream is cut short so that writers go on"
            );
            tracing::warn!("admin socket: {msg}");
            return Err(msg);
        }
    };
    if sent != stream_bytes {
        let msg =
            format!("the image stream stopped after {sent} of {stream_bytes} bytes: this is a bug");
        tracing::error!("admin socket: {msg}");
        return Err(msg);
    }
    reply(stream, &json_line(&WireImageTrailer { ok: true, sent })).await?;
    tracing::debug!("admin socket: streamed a page image of {bytes} bytes ({chains} chains, commit pinned at {taken} ms)");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Client side.

/// What a `snapshot` request delivered, checked against its trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub bytes: u64,
    pub public: [u8; 32],
    pub positions: Vec<ChainPosition>,
    pub taken_unix_ms: u64,
    /// SHA-256 of the `bytes` bytes, as the trailer announced and as received.
    pub sha256: [u8; 32],
}

/// What a `position` request answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionAnswer {
    pub public: [u8; 32],
    pub positions: Vec<ChainPosition>,
}

async fn connect(socket: &Path) -> Result<UnixStream, String> {
    match tokio::time::timeout(IO_TIMEOUT, UnixStream::connect(socket)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!(
            "conode not running? cannot connect to {}: {e}",
            socket.display()
        )),
        Err(_) => Err(format!(
            "conode not answering: connecting to {} took more than {IO_TIMEOUT:?}",
            socket.display()
        )),
    }
}

/// Connect and send `line`. A server that refuses the client answers and closes without
/// reading the request, so a failed send is only returned (as the second value, to report
/// if no answer can be read either) and the answer is read regardless.
async fn request(
    socket: &Path,
    line: &[u8],
    buffer: usize,
) -> Result<(BufReader<UnixStream>, Option<String>), String> {
    let mut s = connect(socket).await?;
    let sent = match tokio::time::timeout(IO_TIMEOUT, s.write_all(line)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!(
            "cannot send the request to {}: {e}",
            socket.display()
        )),
        Err(_) => Some(format!(
            "cannot send the request to {}: no progress for {IO_TIMEOUT:?}",
            socket.display()
        )),
    };
    Ok((BufReader::with_capacity(buffer, s), sent))
}

/// Read one `\n`-terminated JSON line of at most `max` bytes; `Ok(None)` at a clean EOF.
async fn read_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    max: u64,
    timeout: Duration,
    what: &str,
) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let n = match tokio::time::timeout(timeout, (&mut *r).take(max).read_until(b'\n', &mut line))
        .await
    {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(format!("cannot read the {what}: {e}")),
        Err(_) => return Err(format!("no {what} within {timeout:?}")),
    };
    whole_line(line, n, max, what)
}

/// `line` as read (`n` bytes, at most `max`): without its `\n`, or why it is not a line.
fn whole_line(mut line: Vec<u8>, n: usize, max: u64, what: &str) -> Result<Vec<u8>, String> {
    if n == 0 {
        return Err(format!(
            "the conode closed the connection before the {what}"
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(format!(
            "the {what} is cut short or longer than {max} bytes"
        ));
    }
    line.pop();
    Ok(line)
}

/// Parse an answer line: the `{"ok":false,...}` error, or `T`.
fn parse_answer<T: for<'de> Deserialize<'de>>(line: &[u8], what: &str) -> Result<T, String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("the {what} is not JSON ({e})"))?;
    if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        return Err(format!("the conode refused: {msg}"));
    }
    serde_json::from_value(v).map_err(|e| format!("the {what} is malformed ({e})"))
}

/// Ask the conode at `socket` for its chain positions (no snapshot).
pub async fn fetch_position(socket: &Path) -> Result<PositionAnswer, String> {
    let (mut r, sent) = request(socket, b"position\n", 4096).await?;
    let line = read_line(&mut r, MAX_HEADER_LINE, IO_TIMEOUT, "answer")
        .await
        .map_err(|e| sent.unwrap_or(e))?;
    let a: WirePositionAnswer = parse_answer(&line, "answer")?;
    Ok(PositionAnswer {
        public: hex32("public", &a.public)?,
        positions: from_wire(a.positions)?,
    })
}

#[derive(Deserialize)]
struct WireThawAnswer {
    was_frozen: bool,
}

/// Ask the conode at `socket` to accept writes again after a final image; returns
/// whether it was frozen.
pub async fn thaw(socket: &Path) -> Result<bool, String> {
    let (mut r, sent) = request(socket, b"thaw\n", 4096).await?;
    let line = read_line(&mut r, MAX_HEADER_LINE, IO_TIMEOUT, "answer")
        .await
        .map_err(|e| sent.unwrap_or(e))?;
    let a: WireThawAnswer = parse_answer(&line, "answer")?;
    Ok(a.was_frozen)
}

/// Ask the conode at `socket` for a snapshot and write it to `dest`.
///
/// `dest` must not exist: it is created owner-only (0600), filled with exactly the
/// announced bytes, checked against the trailer's SHA-256 and fsynced. On any error it is
/// removed. Renaming it into place (and fsyncing that directory) is the caller's job, as is
/// [`crate::db::verify_snapshot`].
pub async fn fetch_snapshot(socket: &Path, dest: &Path) -> Result<SnapshotHeader, String> {
    let (mut r, sent) = request(socket, b"snapshot\n", CHUNK).await?;
    let line = read_line(&mut r, MAX_HEADER_LINE, SNAPSHOT_TIMEOUT, "snapshot header")
        .await
        .map_err(|e| sent.unwrap_or(e))?;
    let h: WireSnapshotHeader = parse_answer(&line, "snapshot header")?;
    let public = hex32("public", &h.public)?;
    let positions = from_wire(h.positions)?;
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .await
        .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let mut guard = RemoveOnDrop(Some(dest.to_path_buf()));
    let sha256 = receive(&mut r, file, h.bytes, dest).await?;
    guard.0 = None;
    Ok(SnapshotHeader {
        bytes: h.bytes,
        public,
        positions,
        taken_unix_ms: h.taken_unix_ms,
        sha256,
    })
}

/// Copy `bytes` bytes from `r` into `file`, check the trailer, fsync; returns the SHA-256.
async fn receive<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    mut file: tokio::fs::File,
    bytes: u64,
    dest: &Path,
) -> Result<[u8; 32], String> {
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while got < bytes {
        let want = ((bytes - got) as usize).min(CHUNK);
        let n = match tokio::time::timeout(IO_TIMEOUT, r.read(&mut buf[..want])).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return Err(format!(
                    "reading the snapshot after {got} of {bytes} bytes: {e}"
                ))
            }
            Err(_) => {
                return Err(format!(
                    "the conode sent nothing for {IO_TIMEOUT:?} after {got} of {bytes} bytes"
                ))
            }
        };
        if n == 0 {
            return Err(format!(
                "the snapshot stream ended after {got} of {bytes} bytes: the conode stopped or failed while sending"
            ));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .await
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        got += n as u64;
    }
    let line = read_line(r, 1024, IO_TIMEOUT, "snapshot trailer").await?;
    let t: WireTrailer = serde_json::from_slice(&line)
        .map_err(|e| format!("the snapshot trailer is malformed ({e})"))?;
    let sent = hex32("sha256", &t.sha256)?;
    let mine: [u8; 32] = hasher.finalize().into();
    if mine != sent {
        return Err(format!(
            "the snapshot arrived damaged: its {bytes} bytes hash to {}, the conode sent {}",
            hex::encode(mine),
            hex::encode(sent)
        ));
    }
    file.flush()
        .await
        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    file.sync_all()
        .await
        .map_err(|e| format!("cannot fsync {}: {e}", dest.display()))?;
    Ok(mine)
}

/// Where [`fetch_image_blocking`] hands the image's bytes: header, offset, bytes.
type ImageSink<'a> = dyn FnMut(&ImageHeader, u64, &[u8]) -> Result<(), String> + 'a;

/// What an `image` request announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub bytes: u64,
    pub public: [u8; 32],
    pub positions: Vec<ChainPosition>,
    pub taken_unix_ms: u64,
    /// Names this image: ask `since` it next time.
    pub token: String,
    /// Only the pages written since the `since` token came; every other byte below
    /// `bytes` is as in the image that token named (zeros past its end).
    pub changed_only: bool,
}

/// Ask the conode at `socket` for a page image and hand its bytes to `sink` with the
/// header and their offsets in the file (an error from the sink stops the transfer): the whole file in order, or,
/// `since` a token the conode still knows, only the pages written since
/// ([`ImageHeader::changed_only`]). Blocking (call it from a blocking thread): the caller
/// hashes and stores as it reads. Returns once exactly the announced bytes and the
/// trailer arrived.
pub fn fetch_image_blocking(
    socket: &Path,
    since: Option<&str>,
    sink: impl FnMut(&ImageHeader, u64, &[u8]) -> Result<(), String>,
) -> Result<ImageHeader, String> {
    fetch_image_inner(socket, since, false, sink)
}

/// [`fetch_image_blocking`] for a final image: once it is taken the conode refuses every
/// write (`final-image`) until `thaw` or a restart.
pub fn fetch_final_image_blocking(
    socket: &Path,
    since: Option<&str>,
    sink: impl FnMut(&ImageHeader, u64, &[u8]) -> Result<(), String>,
) -> Result<ImageHeader, String> {
    fetch_image_inner(socket, since, true, sink)
}

fn fetch_image_inner(
    socket: &Path,
    since: Option<&str>,
    freeze: bool,
    mut sink: impl FnMut(&ImageHeader, u64, &[u8]) -> Result<(), String>,
) -> Result<ImageHeader, String> {
    use std::io::{BufRead, Read, Write};
    let s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "conode not running? cannot connect to {}: {e}",
            socket.display()
        )
    })?;
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let prefix = if freeze { "final-" } else { "" };
    let request = match since {
        Some(t) if !t.is_empty() && !t.contains(['\n', '\r']) => {
            format!("{prefix}{IMAGE_SINCE}{t}\n")
        }
        _ => format!("{prefix}image\n"),
    };
    let sent = (&s).write_all(request.as_bytes()).err();
    let _ = s.set_read_timeout(Some(SNAPSHOT_TIMEOUT));
    let mut r = std::io::BufReader::with_capacity(IMAGE_PIECE, &s);
    let read_line = |r: &mut std::io::BufReader<&std::os::unix::net::UnixStream>,
                     max: u64,
                     what: &str|
     -> Result<Vec<u8>, String> {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(max)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read the {what}: {e}"))?;
        whole_line(line, n, max, what)
    };
    let line = read_line(&mut r, MAX_HEADER_LINE, "image header").map_err(|e| match &sent {
        Some(s) => format!("cannot send the request to {}: {s}", socket.display()),
        None => e,
    })?;
    let h: WireSnapshotHeader = parse_answer(&line, "image header")?;
    let out = ImageHeader {
        bytes: h.bytes,
        public: hex32("public", &h.public)?,
        positions: from_wire(h.positions)?,
        taken_unix_ms: h.taken_unix_ms,
        token: h.token.ok_or("the image header names no token")?,
        changed_only: h.changed_stream.is_some(),
    };
    let total = h.changed_stream.unwrap_or(out.bytes);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut got = 0u64;
    // Hand `len` bytes of the stream to the sink as the file's bytes from `at`.
    let pass = |r: &mut std::io::BufReader<&std::os::unix::net::UnixStream>,
                got: &mut u64,
                mut at: u64,
                len: u64,
                sink: &mut ImageSink|
     -> Result<(), String> {
        let end = *got + len;
        while *got < end {
            let buf = r
                .fill_buf()
                .map_err(|e| format!("reading the image after {got} of {total} bytes: {e}"))?;
            if buf.is_empty() {
                return Err(format!(
                    "the image stream ended after {got} of {total} bytes: the conode stopped or failed while sending"
                ));
            }
            let n = (buf.len() as u64).min(end - *got) as usize;
            sink(&out, at, &buf[..n])?;
            r.consume(n);
            *got += n as u64;
            at += n as u64;
        }
        Ok(())
    };
    if out.changed_only {
        while got < total {
            let mut head = [0u8; RUN_HEADER];
            if total - got < RUN_HEADER as u64 {
                return Err(format!("the image stream's run at byte {got} is cut short"));
            }
            r.read_exact(&mut head)
                .map_err(|e| format!("reading the image after {got} of {total} bytes: {e}"))?;
            got += RUN_HEADER as u64;
            let off = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(head[8..].try_into().unwrap_or_default()) as u64;
            if off.checked_add(len).is_none_or(|e| e > out.bytes) || len > total - got {
                return Err(format!(
                    "the image stream names bytes {off}+{len}, outside the image's {} bytes or the stream",
                    out.bytes
                ));
            }
            pass(&mut r, &mut got, off, len, &mut sink)?;
        }
    } else {
        pass(&mut r, &mut got, 0, total, &mut sink)?;
    }
    let line = read_line(&mut r, 1024, "image trailer")?;
    let t: WireImageTrailer = serde_json::from_slice(&line)
        .map_err(|e| format!("the image trailer is malformed ({e})"))?;
    if !t.ok || t.sent != total {
        return Err(format!(
            "the image trailer says {} bytes were sent, the header announced {total}",
            t.sent
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_is_beside_the_database_and_named_by_the_key() {
        let p = admin_socket_path(Path::new("/var/lib/conode/ab.db"), &[0x58; 32]);
        assert_eq!(p, Path::new("/var/lib/conode/admin-5858585858585858.sock"));
    }

    #[tokio::test]
    async fn request_lines_are_bounded_and_trimmed() {
        let mut ok: &[u8] = b"snapshot\r\nrest";
        assert_eq!(read_request(&mut ok).await.unwrap(), "snapshot");
        let long = vec![b'a'; MAX_REQUEST_LINE + 1];
        let e = read_request(&mut long.as_slice()).await.unwrap_err();
        assert!(e.contains("longer than 1024 bytes"), "{e}");
        let mut exact = vec![b'a'; MAX_REQUEST_LINE];
        exact.push(b'\n');
        assert_eq!(
            read_request(&mut exact.as_slice()).await.unwrap().len(),
            1024
        );
        let e = read_request(&mut &b"snap"[..]).await.unwrap_err();
        assert!(e.contains("without a newline"), "{e}");
    }

    #[test]
    fn an_error_answer_is_reported_with_its_reason() {
        let line = error_line("busy: try later");
        assert_eq!(line, b"{\"ok\":false,\"error\":\"busy: try later\"}\n");
        let e = parse_answer::<WirePositionAnswer>(&line[..line.len() - 1], "answer").unwrap_err();
        assert_eq!(e, "the conode refused: busy: try later");
    }
}
