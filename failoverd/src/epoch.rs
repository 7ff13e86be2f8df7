//! The epoch on disk: `state_dir/epoch`, one decimal number. Written atomically and
//! durably (temp file, fsync, rename, fsync of the directory) before the core may use
//! it; read once at start.
//!
//! Never invents an epoch: a file that does not hold a number is an error for a person
//! to look at, not a zero.

use std::path::{Path, PathBuf};

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("epoch")
}

/// The persisted epoch (0 when none was ever written).
pub fn read(state_dir: &Path) -> Result<u64, String> {
    let p = path(state_dir);
    match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| {
            format!(
                "{} does not hold a number ({:?}): the epoch must never go back; restore it from the peer's `failoverd status` (its epoch) or remove the file only if both hosts are stopped",
                p.display(),
                s.chars().take(32).collect::<String>()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

/// Write `epoch` durably. Refuses to go back.
pub fn write(state_dir: &Path, epoch: u64) -> Result<(), String> {
    let now = read(state_dir)?;
    if epoch < now {
        return Err(format!(
            "refusing to write epoch {epoch} over {now} in {}: epochs only grow; this is a bug",
            path(state_dir).display()
        ));
    }
    let p = path(state_dir);
    conode::config::write_atomic(&p, format!("{epoch}\n").as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_persist_and_never_go_back() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), 0);
        write(d.path(), 3).unwrap();
        assert_eq!(read(d.path()).unwrap(), 3);
        write(d.path(), 3).unwrap();
        assert!(write(d.path(), 2).unwrap_err().contains("only grow"));
        assert_eq!(read(d.path()).unwrap(), 3);
        std::fs::write(d.path().join("epoch"), "seven").unwrap();
        assert!(read(d.path())
            .unwrap_err()
            .contains("does not hold a number"));
    }
}
