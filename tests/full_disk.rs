//! A conode whose data directory is on a small tmpfs (mounted by the test, as root):
//! the free-space floor refuses new blocks before the disk is full, and a disk filled
//! anyway (by another writer) breaks the database only until space is back: it reopens by
//! itself, and every acknowledged block is there.

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

/// Fill `path` with `bytes` bytes (stops quietly when the disk is full).
fn filler(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_is_refused_early_and_survived() {
    let files = NodeFiles::setup("full disk");
    let data = files.dir.path().join("tmpfs");
    let fs = Tmpfs::mount(&data, 48);
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

    // 1. The floor: 1 MiB blocks until refused, before the disk is full.
    let refusal = loop {
        let i = acked.len() as u32;
        assert!(i < 100, "never refused");
        match append(&latest, i, 1 << 20) {
            Ok(b) => {
                latest = b.hash.clone();
                acked.push((b.index as u32, b.hash));
            }
            Err(e) => break e,
        }
    };
    eprintln!(
        "refused at block {} with {} MiB free: {refusal}",
        acked.len(),
        fs.free() >> 20
    );
    assert!(refusal.contains("below the floor of 6 MiB"), "{refusal}");
    assert!(fs.free() > 1 << 20, "refused before the disk was full");

    // 2. Another writer fills the disk to 1.5 MiB free, past a floor of 1 MiB (the conode
    // restarted with it): a 4 MiB block passes the floor and fails with an I/O error in the
    // database. (With the 6 MiB floor a 4 MiB block may fit in what the floor leaves.)
    node.stop();
    let node = files.start_with(&[
        ("CONODE_SERVICE_PATH", data.to_str().unwrap()),
        ("CONODE_MIN_FREE_MB", "1"),
    ]);
    let big = data.join("filler");
    let keep = (1 << 20) + (512 << 10);
    // A conode database cannot be trimmed: grow the tmpfs instead.
    let out = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    filler(&big, fs.free().saturating_sub(keep));
    eprintln!("{} MiB free after the filler", fs.free() >> 20);
    let i = acked.len() as u32;
    let e = append(&latest, i, 4 << 20).expect_err("the disk is too full for 4 MiB");
    eprintln!("append on a full disk: {e}");
    // Status says the database is broken; writes are refused with a clear error.
    let st = rt
        .block_on(conode::client::status(&server, Duration::from_secs(5)))
        .expect("Status answers with a broken database");
    let dbst = &st.status["Db"].field;
    eprintln!("Status Db: {dbst:?}");
    // Broken, or already reopened (Status drives the reopen) on a disk still full.
    assert!(dbst["Writes"].starts_with("refused: "), "{dbst:?}");
    assert!(
        dbst.get("Error").is_some_and(|e| e.contains("I/O error"))
            || dbst["Writes"].contains("below the floor"),
        "{dbst:?}"
    );
    // Writes are refused with a clear error while the disk is full: broken, or reopened
    // and below the floor.
    let e = append(&latest, i, 1000).expect_err("refused while the disk is full");
    assert!(
        e.contains("refused until the database is reopened") || e.contains("below the floor"),
        "{e}"
    );
    // Reads: once reopened (every 2 s at most) they are served while the disk is full.
    let t = Instant::now();
    let read = loop {
        match rt.block_on(client::get_by_index(&server, &g.hash, 1)) {
            Ok(b) => break Some(b),
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                eprintln!("read while full, not yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                eprintln!("reads fail while the disk is full: {e}");
                break None;
            }
        }
    };
    let read = read.expect("reads are served while the disk is full");
    assert_eq!(read.hash, acked[1].1);

    // 3. Space back: the database reopens by itself and takes blocks again.
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
    acked.push((b.index as u32, b.hash));
    // Every acknowledged block is there.
    for (i, hash) in &acked {
        let got = rt
            .block_on(client::get_by_index(&server, &g.hash, *i as i32))
            .unwrap_or_else(|e| panic!("block {i}: {e}"));
        assert_eq!(&got.hash, hash, "block {i}");
    }
    let log = node.log_text();
    let errors = log
        .lines()
        .filter(|l| l.contains("refuses every operation until it is reopened"))
        .count();
    assert_eq!(errors, 1, "the failure is logged once:\n{log}");
    assert!(log.contains("reopened after the I/O error"), "{log}");
    drop(node);
    drop(fs);
}
