//! `conode backup` and `conode restore` as an operator runs them, against real conode
//! processes: what is written and with which modes, and every refusal that must leave the
//! current database as it was.
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use conode::db::{verify_snapshot, ChainPosition, Db, SKIPCHAIN_BLOCKS, SKIPCHAIN_CHAINS};
use system_tests::*;

/// Bytes the tests look for to damage a data page of a backup on purpose.
const MARKER: &[u8; 24] = b"<<conode-backup-marker>>";

/// `conode -c PRIVATE ARGS` with the node's data directory, bounded to 60 s.
fn conode(n: &NodeFiles, args: &[&OsStr]) -> Run {
    let private = n.private();
    let mut all: Vec<&OsStr> = vec!["-c".as_ref(), private.as_os_str()];
    all.extend_from_slice(args);
    let data = n.data();
    run_conode_env(
        &all,
        &[("CONODE_SERVICE_PATH", data.as_os_str())],
        b"",
        Duration::from_secs(60),
    )
}

fn backup(n: &NodeFiles, dir: &Path) -> Run {
    conode(n, &["backup".as_ref(), dir.as_os_str()])
}

fn restore(n: &NodeFiles, dir: &Path, force: bool) -> Run {
    let mut args: Vec<&OsStr> = vec!["restore".as_ref(), dir.as_os_str()];
    if force {
        args.push("--force".as_ref());
    }
    conode(n, &args)
}

fn public(n: &NodeFiles) -> [u8; 32] {
    let v = hex_decode(&public_key_hex(&n.public()));
    v.try_into().expect("32-byte key")
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn db_path(n: &NodeFiles) -> PathBuf {
    n.data().join(format!("{}.db", hex(&public(n))))
}

/// With the conode stopped: put chain `[chain; 32]` at `index` (and 200 blocks carrying
/// [`MARKER`]) into its database.
fn seed(n: &NodeFiles, chain: u8, index: u32) -> ChainPosition {
    let db = Db::open(&db_path(n), &public(n)).expect("open the stopped conode's database");
    let hash = [index as u8; 32];
    let w = db.db().begin_write().unwrap();
    {
        let mut blocks = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
        for i in 0..200u32 {
            let mut k = [chain; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let mut v = vec![index as u8; 512];
            v[200..200 + MARKER.len()].copy_from_slice(MARKER);
            blocks.insert(&k[..], v.as_slice()).unwrap();
        }
        let mut chains = w.open_table(SKIPCHAIN_CHAINS).unwrap();
        let mut v = index.to_le_bytes().to_vec();
        v.extend_from_slice(&hash);
        chains.insert(&[chain; 32][..], v.as_slice()).unwrap();
    }
    w.commit().unwrap();
    ChainPosition {
        chain: [chain; 32],
        index,
        hash,
    }
}

/// The positions in a database file, checked on a copy (verification opens read-write).
fn positions_of(path: &Path, public: &[u8; 32]) -> Vec<ChainPosition> {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    std::fs::copy(path, &copy).unwrap();
    verify_snapshot(&copy, public).unwrap_or_else(|e| panic!("{e}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Names in the data directory other than the database, logs and the admin socket.
fn strays(n: &NodeFiles) -> Vec<String> {
    let db = format!("{}.db", hex(&public(n)));
    names(&n.data())
        .into_iter()
        .filter(|f| *f != db && !f.starts_with("admin-"))
        .collect()
}

#[test]
fn backup_writes_the_db_and_private_toml_owner_only_and_the_db_verifies() {
    let n = NodeFiles::setup("backup");
    let pos = seed(&n, 0xa1, 3);
    let mut node = n.start();
    let dir = n.dir.path().join("backups/today");
    let out = backup(&n, &dir);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let db = dir.join(format!("{}.db", hex(&public(&n))));
    let private = dir.join("private.toml");
    assert!(
        out.stdout.contains(&format!("wrote {}", db.display())),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("wrote {}", private.display())),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "chain {} at index 3 (block {})",
            hex(&pos.chain),
            hex(&pos.hash)
        )),
        "{}",
        out.stdout
    );
    assert_eq!(mode(&dir), 0o700, "a new backup directory is owner-only");
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&private), 0o600);
    assert_eq!(
        std::fs::read(&private).unwrap(),
        std::fs::read(n.private()).unwrap(),
        "private.toml is copied byte for byte"
    );
    assert_eq!(positions_of(&db, &public(&n)), vec![pos]);
    assert_eq!(
        names(&dir),
        vec![
            format!("{}.db", hex(&public(&n))),
            "private.toml".to_string()
        ],
        "no temporary file is left"
    );
    assert!(strays(&n).is_empty(), "{:?}", strays(&n));

    // Again into the same directory, while the conode keeps running: replaced atomically.
    let out = backup(&n, &dir);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(positions_of(&db, &public(&n)), vec![pos]);
    assert_eq!(node.stop().code(), Some(0));
}

#[test]
fn backup_fails_clearly_when_no_conode_answers_and_writes_nothing() {
    let n = NodeFiles::setup("not running");
    let dir = n.dir.path().join("bk");
    let out = backup(&n, &dir);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let socket = n
        .data()
        .join(format!("admin-{}.sock", &hex(&public(&n))[..16]));
    assert!(
        out.stderr.contains(&format!(
            "conode not running? cannot connect to {}",
            socket.display()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(!dir.exists(), "a failed first backup leaves no directory");

    // A broken private.toml is a configuration error.
    n.set_private_key("Address", "udp://x:1");
    let out = backup(&n, &dir);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("key `Address`"), "{}", out.stderr);
}

#[test]
fn restore_refuses_while_the_conode_runs() {
    let n = NodeFiles::setup("running");
    seed(&n, 0xb2, 2);
    let mut node = n.start();
    let dir = n.dir.path().join("bk");
    assert_eq!(backup(&n, &dir).code, Some(0));
    let out = restore(&n, &dir, true);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("the conode is running (its admin socket"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("stop it before restoring"),
        "{}",
        out.stderr
    );
    // Without its socket (removed by hand), the database lock still tells.
    let socket = n
        .data()
        .join(format!("admin-{}.sock", &hex(&public(&n))[..16]));
    std::fs::remove_file(&socket).unwrap();
    let out = restore(&n, &dir, true);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("the conode is running: stop it before restoring"),
        "{}",
        out.stderr
    );
    assert!(strays(&n).is_empty(), "{:?}", strays(&n));
    assert_eq!(node.stop().code(), Some(0));
    assert_eq!(positions_of(&db_path(&n), &public(&n))[0].index, 2);
}

#[test]
fn restore_refuses_a_backup_of_another_conode() {
    let a = NodeFiles::setup("A");
    let b = NodeFiles::setup("B");
    seed(&a, 0xa0, 4);
    seed(&b, 0xb0, 7);
    let mut node = a.start();
    let dir = a.dir.path().join("bk-a");
    assert_eq!(backup(&a, &dir).code, Some(0));
    node.stop();
    let before = std::fs::read(db_path(&b)).unwrap();

    let out = restore(&b, &dir, true);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "belongs to conode {}, not to {}",
            hex(&public(&a)),
            hex(&public(&b))
        )),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("nothing was changed"), "{}", out.stderr);

    // B's private.toml beside A's database renamed as B's: the database check catches it.
    std::fs::copy(b.private(), dir.join("private.toml")).unwrap();
    std::fs::rename(
        dir.join(format!("{}.db", hex(&public(&a)))),
        dir.join(format!("{}.db", hex(&public(&b)))),
    )
    .unwrap();
    let out = restore(&b, &dir, true);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "belongs to conode {}, not to {}",
            hex(&public(&a)),
            hex(&public(&b))
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("the current database was not touched"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(db_path(&b)).unwrap(), before);
    assert!(strays(&b).is_empty(), "{:?}", strays(&b));
}

/// Flip one bit in every copy of [`MARKER`] (data pages, wherever they are in the file).
fn flip_data_pages(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + MARKER.len() <= bytes.len() {
        if &bytes[i..i + MARKER.len()] == MARKER {
            bytes[i + 7] ^= 0x10;
            hits += 1;
            i += MARKER.len();
        } else {
            i += 1;
        }
    }
    assert!(hits > 0, "the marker is in the backup");
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn restore_refuses_a_damaged_backup_and_leaves_the_current_db_untouched() {
    let n = NodeFiles::setup("damaged");
    seed(&n, 0xc3, 5);
    let mut node = n.start();
    let dir = n.dir.path().join("bk");
    assert_eq!(backup(&n, &dir).code, Some(0));
    node.stop();
    let live = db_path(&n);
    let before = std::fs::read(&live).unwrap();
    let backup_db = dir.join(format!("{}.db", hex(&public(&n))));
    let good = std::fs::read(&backup_db).unwrap();

    fn truncate_half(p: &Path) {
        let b = std::fs::read(p).unwrap();
        std::fs::write(p, &b[..b.len() / 2]).unwrap();
    }
    fn truncate_all(p: &Path) {
        std::fs::write(p, b"").unwrap();
    }
    let damage = [
        (
            "bit flipped in the data pages",
            flip_data_pages as fn(&Path),
        ),
        ("truncated to half", truncate_half),
        ("truncated to nothing", truncate_all),
    ];
    for (what, f) in damage {
        std::fs::write(&backup_db, &good).unwrap();
        f(&backup_db);
        let damaged = std::fs::read(&backup_db).unwrap();
        let out = restore(&n, &dir, true);
        assert_eq!(out.code, Some(1), "{what}: {}", out.stdout);
        assert!(
            out.stderr.contains(&format!(
                "the backup {} fails its check",
                backup_db.display()
            )),
            "{what}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("damaged") || out.stderr.contains("is empty"),
            "{what}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("the current database was not touched"),
            "{what}: {}",
            out.stderr
        );
        assert_eq!(out.stderr.lines().count(), 1, "{what}: {}", out.stderr);
        assert_eq!(std::fs::read(&live).unwrap(), before, "{what}");
        assert_eq!(
            std::fs::read(&backup_db).unwrap(),
            damaged,
            "{what}: the backup itself is only read"
        );
        assert!(strays(&n).is_empty(), "{what}: {:?}", strays(&n));
    }
}

#[test]
fn restore_keeps_the_old_db_and_the_restarted_conode_serves_the_restored_one() {
    let n = NodeFiles::setup("restore");
    let pos = seed(&n, 0xd4, 3);
    let mut node = n.start();
    let dir = n.dir.path().join("bk");
    assert_eq!(backup(&n, &dir).code, Some(0));
    node.stop();
    // The conode went on to index 9 after the backup.
    let newer = seed(&n, 0xd4, 9);
    let live = db_path(&n);
    let newer_bytes = std::fs::read(&live).unwrap();

    let out = restore(&n, &dir, false);
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "chain {} is at index 9 in the current database and at 3 in the backup",
            hex(&pos.chain)
        )),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Pass --force"), "{}", out.stderr);
    assert_eq!(std::fs::read(&live).unwrap(), newer_bytes);
    assert!(strays(&n).is_empty(), "{:?}", strays(&n));

    let out = restore(&n, &dir, true);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let kept: Vec<String> = names(&n.data())
        .into_iter()
        .filter(|f| f.contains(".db.before-restore-"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", names(&n.data()));
    let kept = n.data().join(&kept[0]);
    assert!(
        out.stdout
            .contains(&format!("kept the previous database as {}", kept.display())),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "chain {} at index 3 (block {})",
            hex(&pos.chain),
            hex(&pos.hash)
        )),
        "{}",
        out.stdout
    );
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        newer_bytes,
        "the old database is kept as it was"
    );
    assert_eq!(positions_of(&kept, &public(&n)), vec![newer]);
    assert_eq!(mode(&live), 0o600);

    // The restarted conode opens the restored database and serves it.
    let mut node = n.start();
    let again = n.dir.path().join("bk2");
    let out = backup(&n, &again);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("chain {} at index 3", hex(&pos.chain))),
        "{}",
        out.stdout
    );
    assert_eq!(node.stop().code(), Some(0));

    // Onto a machine with no database yet: nothing to keep.
    let fresh = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(conode_bin());
    let out = cmd
        .arg("-c")
        .arg(n.private())
        .arg("restore")
        .arg(&dir)
        .env("CONODE_SERVICE_PATH", fresh.path().join("data"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("kept the previous"), "{stdout}");
    let restored = fresh
        .path()
        .join("data")
        .join(format!("{}.db", hex(&public(&n))));
    assert_eq!(positions_of(&restored, &public(&n)), vec![pos]);
}

#[test]
fn the_admin_socket_serves_no_other_user_even_if_its_mode_is_widened() {
    use std::os::unix::process::CommandExt;
    let root = nix::unistd::geteuid().is_root();
    assert!(
        root,
        "this test runs a client as uid 65534 (nobody) and must run as root (CI does)"
    );
    let n = NodeFiles::setup("other user");
    let mut node = n.start();
    let socket = n
        .data()
        .join(format!("admin-{}.sock", &hex(&public(&n))[..16]));
    let other = tempfile::tempdir().unwrap();
    for d in [n.dir.path(), &n.data(), other.path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let private = other.path().join("private.toml");
    std::fs::copy(n.private(), &private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = || {
        let out = Command::new(conode_bin())
            .arg("-c")
            .arg(&private)
            .arg("backup")
            .arg(other.path().join("bk"))
            .env("CONODE_SERVICE_PATH", n.data())
            .env("HOME", other.path())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // As the conode leaves it (0600), another user cannot even connect.
    let (code, err) = as_nobody();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot connect to {}", socket.display()))
            && err.contains("Permission denied"),
        "{err}"
    );
    // Widened by mistake: the peer check (SO_PEERCRED) still refuses, and says why.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_nobody();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the conode refused: permission denied: uid 65534 is neither root nor the conode's user (uid 0)"),
        "{err}"
    );
    assert!(!other.path().join("bk").exists());
    assert_eq!(node.stop().code(), Some(0));
}

/// An operator restoring as root into the data directory of the conode's user: the
/// restored database is that user's (the conode could not open a file of root's).
#[test]
fn a_restore_run_as_root_gives_the_database_to_the_data_directorys_owner() {
    use std::os::unix::fs::MetadataExt;
    let n = NodeFiles::setup("restore owner");
    seed(&n, 0xd5, 2);
    let mut node = n.start();
    let dir = n.dir.path().join("bk");
    assert_eq!(backup(&n, &dir).code, Some(0));
    node.stop();
    // The data directory belongs to the conode's user (nobody here).
    std::os::unix::fs::chown(n.data(), Some(65534), Some(65534)).unwrap();
    let out = restore(&n, &dir, true);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let m = std::fs::metadata(db_path(&n)).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (65534, 65534),
        "the restored database's owner"
    );
}
