//! `conode backup` and `conode restore`.
//!
//! A backup is a directory holding `<Public hex>.db` (a snapshot fetched from the running
//! conode over its admin socket, see [`crate::admin`]) and `private.toml`, both 0600. It is
//! taken with no downtime. Restoring puts it in place for a stopped conode.
//!
//! What this module must never do: destroy data. Every file is written under a temporary
//! name, fsynced, renamed into place, and the directory fsynced; a restore keeps the
//! database it replaces as `<hex>.db.before-restore-<unix seconds>`; and every check
//! (owner key, redb integrity, a running conode, a backup behind the current database)
//! happens before anything is moved. A failed command leaves no temporary file behind.

use std::fmt;
use std::path::{Path, PathBuf};

use redb::ReadableDatabase;

use crate::admin::{self, SnapshotHeader};
use crate::config::{self, PrivateConfig};
use crate::db::{verify_snapshot, ChainPosition};

use crate::config::db_file_name;

/// What `conode backup` wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub db: PathBuf,
    pub private: PathBuf,
    pub header: SnapshotHeader,
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wrote {} ({} bytes, a consistent snapshot taken at {}, sha256 {})",
            self.db.display(),
            self.header.bytes,
            utc(self.header.taken_unix_ms),
            hex::encode(self.header.sha256)
        )?;
        writeln!(f, "wrote {}", self.private.display())?;
        write_positions(f, &self.header.positions)
    }
}

/// What `conode restore` did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub db: PathBuf,
    pub from: PathBuf,
    /// Where the database that was in place went.
    pub kept: Option<PathBuf>,
    pub positions: Vec<ChainPosition>,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(k) = &self.kept {
            writeln!(f, "kept the previous database as {}", k.display())?;
        }
        writeln!(
            f,
            "restored {} from {}",
            self.db.display(),
            self.from.display()
        )?;
        write_positions(f, &self.positions)
    }
}

fn write_positions(f: &mut fmt::Formatter<'_>, positions: &[ChainPosition]) -> fmt::Result {
    if positions.is_empty() {
        return writeln!(f, "no chains yet");
    }
    for p in positions {
        writeln!(
            f,
            "chain {} at index {} (block {})",
            hex::encode(p.chain),
            p.index,
            hex::encode(p.hash)
        )?;
    }
    Ok(())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from milliseconds since the Unix epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn fsync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot fsync the directory {}: {e}", dir.display()))
}

fn fsync_file(path: &Path) -> Result<(), String> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot fsync {}: {e}", path.display()))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Removes a file when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `conode backup DIR`: fetch a snapshot from the running conode of `cfg` (whose
/// database is `db_path`), check it, and write `DIR/<hex>.db` and `DIR/private.toml`
/// (a copy of `private_path`), both 0600. `DIR` is created (0700) if missing.
pub async fn backup(
    private_path: &Path,
    cfg: &PrivateConfig,
    db_path: &Path,
    dir: &Path,
) -> Result<BackupReport, String> {
    use std::os::unix::fs::DirBuilderExt;
    let public = cfg.keys.public_bytes();
    let private_text = std::fs::read(private_path)
        .map_err(|e| format!("cannot read {}: {e}", private_path.display()))?;
    let created = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => false,
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a directory: give a directory for the backup",
                dir.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    format!("cannot create the backup directory {}: {e}", dir.display())
                })?;
            true
        }
        Err(e) => return Err(format!("cannot use {}: {e}", dir.display())),
    };
    let r = backup_into(private_path, &private_text, &public, db_path, dir).await;
    if r.is_err() && created {
        // Leave no empty directory behind a failed first backup (remove_dir keeps a
        // directory that has anything in it).
        let _ = std::fs::remove_dir(dir);
    }
    r
}

async fn backup_into(
    private_path: &Path,
    private_text: &[u8],
    public: &[u8; 32],
    db_path: &Path,
    dir: &Path,
) -> Result<BackupReport, String> {
    let public = *public;
    let socket = admin::admin_socket_path(db_path, &public);
    let db_dest = dir.join(db_file_name(&public));
    let tmp = dir.join(format!(
        ".{}.fetch-{}.tmp",
        db_file_name(&public),
        std::process::id()
    ));
    // A leftover of an interrupted backup by a process that had our pid: ours by name.
    let _ = std::fs::remove_file(&tmp);
    let header = admin::fetch_snapshot(&socket, &tmp).await?;
    let mut guard = TempFile(Some(tmp.clone()));
    if header.public != public {
        return Err(format!(
            "the conode at {} sent a snapshot of conode {}, not of {} ({}): nothing was written",
            socket.display(),
            hex::encode(header.public),
            hex::encode(public),
            private_path.display()
        ));
    }
    let positions = verify_snapshot(&tmp, &public)
        .map_err(|e| format!("the fetched snapshot fails its check: {e}; nothing was written"))?;
    if positions != header.positions {
        return Err(format!(
            "the fetched snapshot holds other chain positions than the conode announced ({} chains instead of {}): it is damaged; nothing was written",
            positions.len(),
            header.positions.len()
        ));
    }
    // The check opened the file read-write: make what it may have rewritten durable too.
    fsync_file(&tmp)?;
    std::fs::rename(&tmp, &db_dest).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            db_dest.display()
        )
    })?;
    guard.disarm();
    fsync_dir(dir)?;
    let private_dest = dir.join("private.toml");
    config::write_atomic(&private_dest, private_text, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", private_dest.display()))?;
    Ok(BackupReport {
        db: db_dest,
        private: private_dest,
        header,
    })
}

/// The database that a restore would replace.
enum Current {
    Missing,
    /// Open read-only: while this handle lives, a conode cannot open the file for writing.
    Readable {
        _lock: redb::ReadOnlyDatabase,
        positions: Vec<ChainPosition>,
    },
    Unreadable(String),
}

fn current_database(db_path: &Path) -> Result<Current, String> {
    match std::fs::symlink_metadata(db_path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Current::Missing),
        Err(e) => return Err(format!("cannot check {}: {e}", db_path.display())),
    }
    let opened = std::panic::catch_unwind(|| {
        let db = redb::ReadOnlyDatabase::open(db_path)?;
        let positions = {
            let read = db.begin_read()?;
            crate::db::chain_positions(&read)
        };
        Ok::<_, redb::Error>((db, positions))
    });
    Ok(match opened {
        Ok(Ok((db, Ok(p)))) => Current::Readable {
            _lock: db,
            positions: p,
        },
        Ok(Ok((_, Err(e)))) => Current::Unreadable(e),
        Ok(Err(redb::Error::DatabaseAlreadyOpen)) => {
            return Err(format!(
                "the conode is running: stop it before restoring ({} is open by another process)",
                db_path.display()
            ))
        }
        Ok(Err(e)) => Current::Unreadable(e.to_string()),
        Err(_) => Current::Unreadable("redb failed while reading it".into()),
    })
}

/// Why restoring `backup` over `current` would lose blocks, if it would.
fn goes_back(current: &[ChainPosition], backup: &[ChainPosition]) -> Option<String> {
    for c in current {
        let chain = hex::encode(c.chain);
        match backup.iter().find(|b| b.chain == c.chain) {
            None => {
                return Some(format!(
                    "chain {chain} is at index {} in the current database and not in the backup",
                    c.index
                ))
            }
            Some(b) if b.index < c.index => {
                return Some(format!(
                    "chain {chain} is at index {} in the current database and at {} in the backup",
                    c.index, b.index
                ))
            }
            Some(b) if b.index == c.index && b.hash != c.hash => {
                return Some(format!(
                    "chain {chain} has another block at index {} in the current database than in the backup",
                    c.index
                ))
            }
            Some(_) => {}
        }
    }
    None
}

/// Run as root (an operator restoring by hand), give the restored database to the
/// data directory's owner, so that the conode's user can open it; as any other user the
/// file is already that user's.
fn give_to_data_dir_owner(file: &Path, data: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let owner = std::fs::metadata(data).map_err(|e| format!("{}: {e}", data.display()))?;
    if owner.uid() == 0 {
        return Ok(());
    }
    nix::unistd::chown(
        file,
        Some(nix::unistd::Uid::from_raw(owner.uid())),
        Some(nix::unistd::Gid::from_raw(owner.gid())),
    )
    .map_err(|e| {
        format!(
            "cannot give {} to the data directory's owner (uid {}): {e}; nothing was changed",
            file.display(),
            owner.uid()
        )
    })
}

/// `conode restore DIR`: put the backup in `dir` in place as the database `db_path` of the
/// stopped conode of `cfg`. Without `force`, refuses when the current database is ahead of
/// the backup on any chain or cannot be read; with it, restores anyway. Either way the
/// current database is kept as `<hex>.db.before-restore-<unix seconds>`.
pub fn restore(
    cfg: &PrivateConfig,
    db_path: &Path,
    dir: &Path,
    force: bool,
) -> Result<RestoreReport, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let public = cfg.keys.public_bytes();
    let hexkey = hex::encode(public);

    // 1. The backup is this conode's.
    let backup_private = dir.join("private.toml");
    if !backup_private.exists() {
        return Err(format!(
            "{} is not a backup directory: {} is missing; nothing was changed",
            dir.display(),
            backup_private.display()
        ));
    }
    let theirs =
        PrivateConfig::load(&backup_private).map_err(|e| format!("{e}; nothing was changed"))?;
    if theirs.keys.public_bytes() != public {
        return Err(format!(
            "the backup in {} belongs to conode {}, not to {hexkey}: refusing to restore it; nothing was changed",
            dir.display(),
            theirs.keys.public_hex()
        ));
    }
    let backup_db = dir.join(db_file_name(&public));
    match std::fs::metadata(&backup_db) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(format!(
                "{} is not a file; nothing was changed",
                backup_db.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot read the backup database {}: {e}; nothing was changed",
                backup_db.display()
            ))
        }
    }

    // 2. The conode is stopped.
    let socket = admin::admin_socket_path(db_path, &public);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "the conode is running (its admin socket {} answers): stop it before restoring",
            socket.display()
        ));
    }
    let current = current_database(db_path)?;

    // 3. A checked copy beside the database (same filesystem, so the rename is atomic).
    let data = parent(db_path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(data)
        .map_err(|e| format!("cannot create the data directory {}: {e}", data.display()))?;
    let tmp = data.join(format!(
        ".{}.restore-{}.tmp",
        db_file_name(&public),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let copied = (|| {
        let mut src = std::fs::File::open(&backup_db)
            .map_err(|e| format!("cannot read {}: {e}", backup_db.display()))?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| {
            format!(
                "cannot copy {} to {}: {e}",
                backup_db.display(),
                tmp.display()
            )
        })?;
        dst.sync_all()
            .map_err(|e| format!("cannot fsync {}: {e}", tmp.display()))
    })();
    let mut guard = TempFile(Some(tmp.clone()));
    copied?;
    give_to_data_dir_owner(&tmp, data)?;
    // Check the copy, not the backup: what is checked is what goes in place, and the
    // backup itself is never opened read-write.
    let positions = verify_snapshot(&tmp, &public).map_err(|e| {
        format!(
            "the backup {} fails its check: {e}; the current database was not touched",
            backup_db.display()
        )
    })?;
    fsync_file(&tmp)?;

    // 4. Would it lose blocks?
    if !force {
        match &current {
            Current::Readable { positions: now, .. } => {
                if let Some(why) = goes_back(now, &positions) {
                    return Err(format!(
                        "the backup is behind the current database: {why}; restoring would lose those blocks. Pass --force to restore anyway (the current database is kept as {}.before-restore-<time>); nothing was changed",
                        db_path.display()
                    ));
                }
            }
            Current::Unreadable(why) => {
                return Err(format!(
                    "cannot read the current database {} ({why}), so cannot tell whether the backup is behind it. Pass --force to restore anyway (the current database is kept as {}.before-restore-<time>); nothing was changed",
                    db_path.display(),
                    db_path.display()
                ));
            }
            Current::Missing => {}
        }
    }

    // 5. Move the current database aside, the copy in place.
    let kept = match &current {
        Current::Missing => None,
        _ => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let base = format!("{}.before-restore-{secs}", db_path.display());
            let mut aside = PathBuf::from(&base);
            let mut n = 1;
            while std::fs::symlink_metadata(&aside).is_ok() {
                n += 1;
                aside = PathBuf::from(format!("{base}-{n}"));
            }
            std::fs::rename(db_path, &aside).map_err(|e| {
                format!(
                    "cannot move the current database {} aside to {}: {e}; nothing was changed",
                    db_path.display(),
                    aside.display()
                )
            })?;
            Some(aside)
        }
    };
    if let Err(e) = std::fs::rename(&tmp, db_path) {
        let mut msg = format!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            db_path.display()
        );
        if let Some(k) = &kept {
            match std::fs::rename(k, db_path) {
                Ok(()) => msg.push_str("; the current database was put back"),
                Err(e2) => msg.push_str(&format!(
                    "; and cannot put the current database back from {} ({e2}): move it back by hand",
                    k.display()
                )),
            }
        }
        return Err(msg);
    }
    guard.disarm();
    fsync_dir(data)?;
    drop(current);
    Ok(RestoreReport {
        db: db_path.to_path_buf(),
        from: backup_db,
        kept,
        positions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_764_000_000_000), "2025-11-24T16:00:00.000Z");
    }

    fn pos(chain: u8, index: u32, hash: u8) -> ChainPosition {
        ChainPosition {
            chain: [chain; 32],
            index,
            hash: [hash; 32],
        }
    }

    #[test]
    fn a_backup_behind_the_current_database_is_detected() {
        assert_eq!(
            goes_back(&[pos(1, 3, 3)], &[pos(1, 3, 3), pos(2, 1, 1)]),
            None
        );
        assert_eq!(goes_back(&[pos(1, 3, 3)], &[pos(1, 4, 4)]), None);
        assert!(goes_back(&[pos(1, 5, 5)], &[pos(1, 3, 3)])
            .unwrap()
            .contains("index 5 in the current database and at 3"));
        assert!(goes_back(&[pos(1, 3, 3)], &[])
            .unwrap()
            .contains("not in the backup"));
        assert!(goes_back(&[pos(1, 3, 3)], &[pos(1, 3, 4)])
            .unwrap()
            .contains("another block"));
    }
}
