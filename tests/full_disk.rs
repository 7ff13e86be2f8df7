//! A conode whose data directory is on a small tmpfs (mounted by the test, as root).
//!
//! 1. The free-space floor counts the block being written: new blocks are refused before
//!    one would take the free space below the floor, never after.
//! 2. A disk filled to the last byte anyway (another writer, the floor turned off) breaks
//!    the database: the failure is logged at `error` once however many appends fail,
//!    Status shows the I/O error, and reads answer with the block or a clear error, never
//!    "no such block" for a block that was acknowledged.
//! 3. Once space is back, writes are accepted again by themselves, the recovery is logged
//!    once, and every acknowledged block is there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use conode::skipchain::{block, client};
use system_tests::NodeFiles;

/// The tmpfs, unmounted on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, mib: u64) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn free(&self) -> u64 {
        let v = nix::sys::statvfs::statvfs(&self.0).unwrap();
        v.blocks_available() as u64 * v.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill `path` until the disk is full (the last write fails with "No space left").
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    let e = loop {
        if let Err(e) = f.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "{e}");
    // The last pages: smaller writes into what a 64 KiB write did not fit in.
    for n in [4096usize, 1] {
        while f.write_all(&chunk[..n]).is_ok() {}
    }
    let _ = f.sync_all();
}

const MIB: u64 = 1 << 20;

#[test]
fn a_full_disk_is_refused_early_and_survived() {
    let files = NodeFiles::setup("full disk");
    let data = files.dir.path().join("tmpfs");
    let fs = Tmpfs::mount(&data, 48);
    let floor = 6 * MIB;
    let mut node = files.start_with(&[
        ("CONODE_SERVICE_PATH", data.to_str().unwrap()),
        ("CONODE_MIN_FREE_MB", "6"),
    ]);
    let server = conode::config::PrivateConfig::load(&files.private())
        .unwrap()
        .server_toml();
    let roster = conode::config::Roster {
        servers: vec![server.clone()],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let blob = |i: u32, len: usize| -> Vec<u8> {
        (0..len)
            .map(|j| (j as u32 ^ i.wrapping_mul(2654435761)) as u8)
            .collect()
    };
    let g = rt
        .block_on(client::create(
            block::roster_from_config(&roster),
            b"genesis".to_vec(),
            0,
            0,
        ))
        .expect("genesis");
    let mut acked: Vec<(u32, Vec<u8>)> = vec![(0, g.hash.clone())];
    let mut latest = g.hash.clone();
    let append = |latest: &[u8], i: u32, len: usize| {
        rt.block_on(client::append(&server, latest, blob(i, len)))
            .map(|r| r.latest.expect("the new block"))
    };
    let status = || {
        rt.block_on(conode::client::status(&server, Duration::from_secs(5)))
            .expect("Status answers")
            .status["Db"]
            .field
            .clone()
    };

    // 1. The floor counts the block: 1 MiB blocks until refused, and no accepted block
    // takes the free space below the floor (the old check, "free < floor" before the
    // write, let the last block go up to its own size below it).
    let refusal = loop {
        let i = acked.len() as u32;
        assert!(i < 100, "never refused");
        let before = fs.free();
        match append(&latest, i, MIB as usize) {
            Ok(b) => {
                let after = fs.free();
                eprintln!(
                    "block {i}: {} KiB free before, {} KiB after",
                    before >> 10,
                    after >> 10
                );
                assert!(
                    after >= floor,
                    "block {i} took the free space below the floor: {after} < {floor}"
                );
                latest = b.hash.clone();
                acked.push((b.index as u32, b.hash));
            }
            Err(e) => break e,
        }
    };
    let free = fs.free();
    eprintln!(
        "refused at block {} with {} KiB free: {refusal}",
        acked.len(),
        free >> 10
    );
    assert!(refusal.contains("below the floor of 6 MiB"), "{refusal}");
    assert!(free >= floor, "refused before the floor: {free} < {floor}");
    assert!(acked.len() > 10, "the floor refused too early: {acked:?}");
    let log = node.log_text();
    assert!(
        !log.contains("ERROR"),
        "no error logged for the floor:\n{log}"
    );

    // 2. The floor turned off and the disk filled to the last byte by another writer:
    // every append fails, the database breaks, and it is logged once.
    node.stop();
    let node = files.start_with(&[
        ("CONODE_SERVICE_PATH", data.to_str().unwrap()),
        ("CONODE_MIN_FREE_MB", "0"),
    ]);
    // A conode database cannot be trimmed: grow the tmpfs, then fill it.
    fs.resize(64);
    let big = data.join("filler");
    fill(&big);
    assert_eq!(fs.free(), 0, "the disk is full");
    let i = acked.len() as u32;
    // Reads answer with the acknowledged block or a clear error, never "no such block"
    // (while the database is broken, and while it is reopened: a repair of the file).
    let read_all = |what: &str| {
        let mut served = 0;
        for (i, hash) in &acked {
            match rt.block_on(client::get_by_index(&server, &g.hash, *i as i32)) {
                Ok(b) => {
                    assert_eq!(&b.hash, hash, "block {i}");
                    served += 1;
                }
                Err(e) => assert!(
                    e.contains("I/O error"),
                    "block {i} {what}: neither the block nor a clear error: {e}"
                ),
            }
        }
        served
    };
    // `reopened`: the database is open again, and the appends must not close it again
    // (they are refused before they reach it: every read is served).
    let full_appends = |n: usize, reopened: bool| {
        for k in 0..n {
            let e = append(&latest, i, 2 * MIB as usize).expect_err("the disk is full");
            eprintln!("append {k} on a full disk: {e}");
            let served = read_all("on a full disk");
            eprintln!("{served} of {} blocks read", acked.len());
            if reopened {
                assert!(
                    e.contains("disk full: no room for this write since the I/O error"),
                    "{e}"
                );
                assert_eq!(served, acked.len(), "every block is read");
            }
        }
    };
    full_appends(4, false);
    // Status shows the I/O error (the database may be open again already: the conode
    // reopens it at once, to serve reads).
    let dbst = status();
    eprintln!("Status Db on a full disk: {dbst:?}");
    let last = dbst.get("LastIoError").expect("Status shows the I/O error");
    assert!(last.contains("No space left on device"), "{dbst:?}");
    assert_eq!(dbst["LastIoErrorCleared"], "false", "{dbst:?}");
    assert!(dbst.contains_key("LastIoErrorAge"), "{dbst:?}");
    // Open again on the full disk, by itself: every block is read.
    let t = Instant::now();
    while status()["Open"] != "true" {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never reopened on a full disk: {}",
            node.log_text()
        );
        read_all("while it is reopened");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("open again after {:?}", t.elapsed());
    assert_eq!(read_all("once reopened"), acked.len());
    // The writes that fail again on a reopened database, still on a full disk: counted,
    // not logged each.
    full_appends(3, true);
    let dbst = status();
    eprintln!("Status Db: {dbst:?}");
    let repeats: u64 = dbst["LastIoErrorRepeats"].parse().unwrap();
    assert!(
        repeats >= 3,
        "the appends after the first are counted: {dbst:?}"
    );
    assert_eq!(dbst["LastIoErrorCleared"], "false", "{dbst:?}");
    assert_eq!(dbst["Open"], "true", "{dbst:?}");
    assert!(
        dbst["Writes"].starts_with("refused: disk full: no room for this write"),
        "{dbst:?}"
    );
    let log = node.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(
        errors.len(),
        1,
        "one error line for 7 failed appends:\n{log}"
    );
    assert!(
        errors[0].contains("a write failed") && errors[0].contains("No space left"),
        "{log}"
    );
    let counts = log
        .lines()
        .filter(|l| l.contains("more write(s) failed or were refused"))
        .count();
    assert!(counts <= 1, "at most one count line:\n{log}");

    // 3. Space back: writes are accepted again by themselves.
    std::fs::remove_file(&big).unwrap();
    let t = Instant::now();
    let b = loop {
        match append(&latest, i, 1000) {
            Ok(b) => break b,
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the database never came back: {e}"),
        }
    };
    eprintln!("appends accepted again after {:?}", t.elapsed());
    acked.push((b.index as u32, b.hash.clone()));
    latest = b.hash;
    let b = append(&latest, i + 1, 1000).expect("and the next");
    acked.push((b.index as u32, b.hash));
    // Every acknowledged block is there.
    for (i, hash) in &acked {
        let got = rt
            .block_on(client::get_by_index(&server, &g.hash, *i as i32))
            .unwrap_or_else(|e| panic!("block {i}: {e}"));
        assert_eq!(&got.hash, hash, "block {i}");
    }
    let dbst = status();
    eprintln!("Status Db after the recovery: {dbst:?}");
    assert_eq!(dbst["Open"], "true", "{dbst:?}");
    assert_eq!(dbst["Writes"], "accepted", "{dbst:?}");
    assert_eq!(dbst["LastIoErrorCleared"], "true", "{dbst:?}");
    assert!(
        dbst["LastIoError"].contains("No space left on device"),
        "{dbst:?}"
    );
    let log = node.log_text();
    eprintln!("{log}");
    let errors = log.lines().filter(|l| l.contains("ERROR")).count();
    assert_eq!(errors, 1, "the failure is logged once:\n{log}");
    let recovered = log
        .lines()
        .filter(|l| l.contains("writes are accepted again"))
        .count();
    assert_eq!(recovered, 1, "the recovery is logged once:\n{log}");
    drop(node);
    drop(fs);
}
