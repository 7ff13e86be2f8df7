//! Online snapshots through the admin socket: consistency under concurrent writes, the
//! stream format, the socket's permissions and life cycle, bad requests, and the checks
//! `verify_snapshot` makes before a snapshot is trusted.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestNode;
use conode::admin;
use conode::db::{
    verify_snapshot, ChainPosition, Db, SKIPCHAIN_BLOCKS, SKIPCHAIN_CHAINS, SKIPCHAIN_INDEX,
};
use conode::server::Server;
use redb::{ReadableDatabase, TableDefinition};
use sha2::{Digest, Sha256};

/// Bytes that the tests look for in a file to damage a data page on purpose.
const MARKER: &[u8; 24] = b"<<conode-backup-marker>>";

fn hash_of(n: u64) -> [u8; 32] {
    Sha256::digest(n.to_be_bytes()).into()
}

/// One commit: the counter into two tables, the chain `[7; 32]` at index `n`.
/// A thread that calls `step(db, n)` for n = 2, 3, … until `stop`; it returns the last n.
fn writer(
    db: &Arc<Db>,
    stop: &Arc<AtomicBool>,
    step: fn(&Db, u64),
) -> std::thread::JoinHandle<u64> {
    let (db, stop) = (db.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut n = 1;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            step(&db, n);
        }
        n
    })
}

fn write_counter(db: &Db, n: u64) {
    let w = db.db().begin_write().unwrap();
    {
        let mut blocks = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
        blocks
            .insert(&b"counter"[..], &n.to_be_bytes()[..])
            .unwrap();
        let mut index = w.open_table(SKIPCHAIN_INDEX).unwrap();
        index.insert(&b"counter"[..], &n.to_be_bytes()[..]).unwrap();
        let mut chains = w.open_table(SKIPCHAIN_CHAINS).unwrap();
        let mut v = (n as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&hash_of(n));
        chains.insert(&[7u8; 32][..], v.as_slice()).unwrap();
    }
    w.commit().unwrap();
}

/// Fill `db` with `n` blocks of 512 bytes that carry [`MARKER`] and one chain at `n`.
fn fill(db: &Db, n: u32) -> ChainPosition {
    let w = db.db().begin_write().unwrap();
    {
        let mut blocks = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
        for i in 0..n {
            let mut v = vec![i as u8; 512];
            v[100..100 + MARKER.len()].copy_from_slice(MARKER);
            blocks
                .insert(&hash_of(u64::from(i))[..], v.as_slice())
                .unwrap();
        }
        let mut chains = w.open_table(SKIPCHAIN_CHAINS).unwrap();
        let mut v = n.to_le_bytes().to_vec();
        v.extend_from_slice(&hash_of(u64::from(n)));
        chains.insert(&[9u8; 32][..], v.as_slice()).unwrap();
    }
    w.commit().unwrap();
    ChainPosition {
        chain: [9; 32],
        index: n,
        hash: hash_of(u64::from(n)),
    }
}

/// Both counters of a snapshot file, which must be equal.
fn counters_of(path: &Path) -> (u64, u64) {
    let db = redb::Database::open(path).unwrap();
    let r = db.begin_read().unwrap();
    let get = |t: TableDefinition<&[u8], &[u8]>| {
        let t = r.open_table(t).unwrap();
        let v = t.get(&b"counter"[..]).unwrap().unwrap();
        u64::from_be_bytes(v.value().try_into().unwrap())
    };
    (get(SKIPCHAIN_BLOCKS), get(SKIPCHAIN_INDEX))
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".snapshot-") || n.starts_with(".admin-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_are_consistent_while_writes_continue() {
    let node = TestNode::new("consistent");
    let srv = node.start().await;
    let db = srv.database().clone();
    let public = node.cfg.keys.public_bytes();
    write_counter(&db, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer(&db, &stop, write_counter);
    let out = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for i in 0..6 {
        let dest = out.path().join(format!("s{i}.db"));
        let (a, b, header_positions, positions) = if i % 2 == 0 {
            let h = admin::fetch_snapshot(srv.admin_socket(), &dest)
                .await
                .unwrap();
            let p = verify_snapshot(&dest, &public).unwrap();
            let (a, b) = counters_of(&dest);
            (a, b, h.positions, p)
        } else {
            let (db, d) = (db.clone(), dest.clone());
            let info = tokio::task::spawn_blocking(move || db.snapshot_to(&d))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(info.public, public);
            assert_eq!(info.tables["skipchain_blocks"], 1);
            assert_eq!(info.tables["meta"], 1);
            let p = verify_snapshot(&dest, &public).unwrap();
            let (a, b) = counters_of(&dest);
            (a, b, info.positions, p)
        };
        assert_eq!(a, b, "snapshot {i}: the two tables disagree: torn copy");
        assert_eq!(header_positions, positions, "snapshot {i}");
        assert_eq!(
            positions,
            vec![ChainPosition {
                chain: [7; 32],
                index: a as u32,
                hash: hash_of(a)
            }],
            "snapshot {i}: the positions come from the same read transaction as the data"
        );
        seen.push(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "snapshots go forward: {seen:?}"
    );
    assert!(
        seen[0] < *seen.last().unwrap() && *seen.last().unwrap() < last,
        "the writer made progress during the snapshots: {seen:?}, last write {last}"
    );
    assert!(leftovers(node.dir.path()).is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn the_stream_carries_exactly_the_announced_bytes_and_their_sha256() {
    let node = TestNode::new("stream");
    let srv = node.start().await;
    let want = fill(srv.database(), 300);
    let public = node.cfg.keys.public_bytes();
    let socket = srv.admin_socket().to_path_buf();
    let raw = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"snapshot\n").unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    })
    .await
    .unwrap();
    let nl = raw.iter().position(|b| *b == b'\n').unwrap();
    let header: serde_json::Value = serde_json::from_slice(&raw[..nl]).unwrap();
    assert_eq!(header["ok"], true);
    assert_eq!(header["public"], hex::encode(public));
    assert_eq!(header["positions"][0]["chain"], hex::encode([9u8; 32]));
    assert_eq!(header["positions"][0]["index"], 300);
    assert_eq!(header["positions"][0]["hash"], hex::encode(want.hash));
    assert!(header["taken_unix_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let n = header["bytes"].as_u64().unwrap() as usize;
    let body = &raw[nl + 1..nl + 1 + n];
    let trailer = &raw[nl + 1 + n..];
    assert_eq!(
        trailer.last(),
        Some(&b'\n'),
        "one trailer line ends the stream"
    );
    let trailer: serde_json::Value = serde_json::from_slice(trailer).unwrap();
    assert_eq!(trailer["sha256"], hex::encode(Sha256::digest(body)));
    let out = tempfile::tempdir().unwrap();
    let copy = out.path().join("raw.db");
    std::fs::write(&copy, body).unwrap();
    assert_eq!(verify_snapshot(&copy, &public).unwrap(), vec![want]);

    // The client function checks the same and says what it got.
    let dest = out.path().join("fetched.db");
    let h = admin::fetch_snapshot(srv.admin_socket(), &dest)
        .await
        .unwrap();
    assert_eq!(h.positions, vec![want]);
    assert_eq!(h.bytes, std::fs::metadata(&dest).unwrap().len());
    assert_eq!(
        h.sha256,
        <[u8; 32]>::from(Sha256::digest(std::fs::read(&dest).unwrap()))
    );
    assert_eq!(
        std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // An existing destination is never overwritten.
    let e = admin::fetch_snapshot(srv.admin_socket(), &dest)
        .await
        .unwrap_err();
    assert!(e.contains("cannot create"), "{e}");
    assert_eq!(verify_snapshot(&dest, &public).unwrap(), vec![want]);

    let p = admin::fetch_position(srv.admin_socket()).await.unwrap();
    assert_eq!((p.public, p.positions), (public, vec![want]));
    assert!(
        leftovers(node.dir.path()).is_empty(),
        "no temporary snapshot is left beside the database"
    );
    srv.stop().await;
}

#[tokio::test]
async fn the_admin_socket_is_owner_only_and_removed_on_stop() {
    let node = TestNode::new("perms");
    let srv = node.start().await;
    let path = srv.admin_socket().to_path_buf();
    assert_eq!(
        path,
        admin::admin_socket_path(&node.db_path(), &node.cfg.keys.public_bytes())
    );
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        format!("admin-{}.sock", &node.cfg.keys.public_hex()[..16])
    );
    let m = std::fs::symlink_metadata(&path).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert!(
        leftovers(node.dir.path()).is_empty(),
        "the private bind directory is gone"
    );
    srv.stop().await;
    assert!(!path.exists(), "a graceful stop removes the socket");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
    let node = TestNode::new("stale");
    let path = admin::admin_socket_path(&node.db_path(), &node.cfg.keys.public_bytes());
    // A conode that was killed leaves its socket file; nothing answers on it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path).is_ok());
    let srv = node.start().await;
    let p = admin::fetch_position(srv.admin_socket()).await.unwrap();
    assert_eq!(p.public, node.cfg.keys.public_bytes());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Something answers: refuse, and leave it alone.
    let e = admin::bind(&path).err().unwrap();
    assert!(
        e.contains("another conode is using the admin socket"),
        "{e}"
    );
    assert!(admin::fetch_position(&path).await.is_ok());
    srv.stop().await;

    // Not a socket: refuse, and keep the file.
    std::fs::write(&path, b"precious").unwrap();
    let e = admin::bind(&path).err().unwrap();
    assert!(e.contains("is not a socket"), "{e}");
    let e = Server::start(node.cfg.clone(), node.db_path())
        .await
        .err()
        .unwrap();
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

/// Send `request`, read the whole answer.
fn ask(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server may answer and close before it has read an overlong request: a write
    // error is fine, the answer is what counts.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8(out).unwrap()
}

fn error_of(answer: &str) -> String {
    assert!(
        answer.ends_with('\n') && answer.lines().count() == 1,
        "{answer:?}"
    );
    let v: serde_json::Value = serde_json::from_str(answer).unwrap();
    assert_eq!(v["ok"], false, "{answer}");
    v["error"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_error_line_and_the_server_keeps_serving() {
    let node = TestNode::new("garbage");
    let srv = node.start().await;
    let socket = srv.admin_socket().to_path_buf();
    let s = socket.clone();
    tokio::task::spawn_blocking(move || {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"status\n".to_vec(), "unknown request \"status\""),
            (b"SNAPSHOT\n".to_vec(), "unknown request \"SNAPSHOT\""),
            (b"\n".to_vec(), "unknown request \"\""),
            (b"\x00\xff\xfe\x01\n".to_vec(), "not UTF-8"),
            (vec![b'a'; 1025], "longer than 1024 bytes"),
            (vec![b'b'; 100_000], "longer than 1024 bytes"),
            (b"snapshot".to_vec(), "without a newline"),
        ];
        for (req, want) in cases {
            let answer = if want == "without a newline" {
                // Send, then close our side: the line is incomplete.
                let mut c = UnixStream::connect(&s).unwrap();
                c.write_all(&req).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out
            } else {
                ask(&s, &req)
            };
            let e = error_of(&answer);
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.contains("expected") || want == "without a newline", "{e}");
        }
        // Still serving.
        let ok: serde_json::Value = serde_json::from_str(&ask(&s, b"position\n")).unwrap();
        assert_eq!(ok["ok"], true);
    })
    .await
    .unwrap();
    let p = admin::fetch_position(&socket).await.unwrap();
    assert_eq!(p.positions, vec![]);
    srv.stop().await;
}

#[tokio::test]
async fn a_silent_client_gets_an_error_after_the_request_timeout() {
    let node = TestNode::new("silent");
    let srv = node.start().await;
    let socket = srv.admin_socket().to_path_buf();
    let started = std::time::Instant::now();
    let answer = tokio::task::spawn_blocking(move || ask(&socket, b""))
        .await
        .unwrap();
    let e = error_of(&answer);
    assert!(e.contains("no request line within 10 s"), "{e}");
    assert!(started.elapsed() >= admin::REQUEST_TIMEOUT);
    assert!(admin::fetch_position(srv.admin_socket()).await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn a_socket_path_too_long_for_a_unix_address_is_refused() {
    let node = TestNode::new("long");
    let deep = node.dir.path().join("d".repeat(100));
    let db_path = deep.join(format!("{}.db", node.cfg.keys.public_hex()));
    let e = Server::start(node.cfg.clone(), db_path)
        .await
        .err()
        .unwrap();
    assert!(
        e.contains("admin socket path") && e.contains("more than a Unix socket address holds"),
        "{e}"
    );
    assert!(e.contains("CONODE_SERVICE_PATH"), "says what to do: {e}");
}

#[test]
fn a_table_that_is_not_bytes_to_bytes_fails_the_snapshot_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("x.db"), &[3; 32]).unwrap();
    fill(&db, 3);
    let odd: TableDefinition<u64, u64> = TableDefinition::new("oddity");
    let w = db.db().begin_write().unwrap();
    w.open_table(odd).unwrap().insert(1, 2).unwrap();
    w.commit().unwrap();
    let dest = dir.path().join("snap.db");
    let e = db.snapshot_to(&dest).unwrap_err();
    assert!(e.contains("table oddity maps u64 to u64"), "{e}");
    assert!(e.contains("this is a bug"), "{e}");
    assert!(!dest.exists(), "a failed snapshot leaves no file");
    // An existing destination is refused, not overwritten.
    std::fs::write(&dest, b"keep").unwrap();
    let e = db.snapshot_to(&dest).unwrap_err();
    assert!(e.contains("cannot create the snapshot file"), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
}

/// A snapshot of a filled database, for damaging.
fn snapshot_file(dir: &Path, public: &[u8; 32]) -> (std::path::PathBuf, ChainPosition) {
    let db = Db::open(&dir.join("live.db"), public).unwrap();
    let pos = fill(&db, 400);
    let dest = dir.join("snap.db");
    let info = db.snapshot_to(&dest).unwrap();
    assert_eq!(info.positions, vec![pos]);
    assert_eq!(info.tables["skipchain_blocks"], 400);
    (dest, pos)
}

/// Flip one bit in every copy of [`MARKER`]: data pages, wherever the file holds them.
fn damage_data_pages(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + MARKER.len() <= bytes.len() {
        if &bytes[i..i + MARKER.len()] == MARKER {
            bytes[i + 5] ^= 0x01;
            hits += 1;
            i += MARKER.len();
        } else {
            i += 1;
        }
    }
    assert!(hits > 0, "the marker is in the file");
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn verify_snapshot_rejects_damaged_truncated_foreign_and_non_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let public = [5u8; 32];
    let (good, pos) = snapshot_file(dir.path(), &public);
    let original = std::fs::read(&good).unwrap();
    assert_eq!(verify_snapshot(&good, &public).unwrap(), vec![pos]);

    let try_bytes = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        verify_snapshot(&p, &public).unwrap_err()
    };

    let flipped = dir.path().join("flipped.db");
    std::fs::write(&flipped, &original).unwrap();
    damage_data_pages(&flipped);
    let e = verify_snapshot(&flipped, &public).unwrap_err();
    assert!(e.contains("flipped.db is damaged"), "{e}");

    let e = try_bytes("half.db", &original[..original.len() / 2]);
    assert!(e.contains("half.db"), "{e}");
    let e = try_bytes("short.db", &original[..300]);
    assert!(e.contains("short.db"), "{e}");
    let e = try_bytes("empty.db", b"");
    assert!(e.contains("is empty"), "{e}");
    let e = try_bytes("text.db", &[b'x'; 8192]);
    assert!(e.contains("not a redb database"), "{e}");

    let other = dir.path().join("other.db");
    std::fs::write(&other, &original).unwrap();
    let e = verify_snapshot(&other, &[6u8; 32]).unwrap_err();
    assert!(
        e.contains(&format!(
            "belongs to conode {}, not to {}",
            hex::encode(public),
            hex::encode([6u8; 32])
        )),
        "{e}"
    );
    let e = verify_snapshot(&dir.path().join("missing.db"), &public).unwrap_err();
    assert!(e.contains("cannot read"), "{e}");
}

/// A copy whose latest commit is damaged is refused, although redb could fall back to the
/// commit before it: that would silently lose what was saved last.
#[test]
fn verify_snapshot_refuses_a_file_whose_latest_commit_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let public = [5u8; 32];
    let live = dir.path().join("live.db");
    let db = Db::open(&live, &public).unwrap();
    let put = |key: &[u8], len: usize| {
        let w = db.db().begin_write().unwrap();
        {
            let mut t = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
            t.insert(key, &vec![0x5a; len][..]).unwrap();
        }
        w.commit().unwrap();
    };
    put(b"first", 20_000);
    let before = std::fs::read(&live).unwrap();
    put(b"second", 20_000);
    // Crash images of the last two commits (the database is open, as on a live host).
    let after = std::fs::read(&live).unwrap();
    drop(db);
    let image = dir.path().join("image.db");
    std::fs::write(&image, &after).unwrap();
    verify_snapshot(&image, &public).expect("the undamaged image passes");

    // The pages the latest commit wrote (past the header page): flip a byte in each.
    const PAGE: usize = 4096;
    let written: Vec<usize> = (1..after.len() / PAGE)
        .filter(|&n| before.get(n * PAGE..(n + 1) * PAGE) != Some(&after[n * PAGE..(n + 1) * PAGE]))
        .collect();
    assert!(!written.is_empty(), "the second commit wrote no page");
    let mut refused = 0;
    for n in &written {
        let mut bytes = after.clone();
        bytes[n * PAGE + PAGE / 2] ^= 0x01;
        std::fs::write(&image, &bytes).unwrap();
        match verify_snapshot(&image, &public) {
            Err(e) => {
                assert!(
                    e.contains("image.db is damaged: its latest commit fails redb's checksums"),
                    "{e}"
                );
                refused += 1;
            }
            // Accepted: the flipped byte was in space no tree uses, and the latest commit
            // is whole.
            Ok(_) => {
                let db = redb::Database::create(&image).unwrap();
                let r = db.begin_read().unwrap();
                let t = r.open_table(SKIPCHAIN_BLOCKS).unwrap();
                assert!(
                    t.get(&b"second"[..]).unwrap().is_some(),
                    "page {n} damaged: accepted, but the latest commit is gone"
                );
            }
        }
    }
    assert!(refused > 0, "no damaged page of {written:?} was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_limit_a_client_is_told_busy_and_later_served() {
    let node = TestNode::new("busy");
    let srv = node.start().await;
    let socket = srv.admin_socket().to_path_buf();
    let s = socket.clone();
    tokio::task::spawn_blocking(move || {
        // Idle clients hold every slot until they send a line or time out.
        let idle: Vec<UnixStream> = (0..admin::MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&s).unwrap())
            .collect();
        let e = error_of(&ask(&s, b"position\n"));
        assert!(
            e.contains(&format!(
                "busy: {} admin connections are open",
                admin::MAX_CONNECTIONS
            )),
            "{e}"
        );
        drop(idle);
        // Slots come back as the idle clients' connections end.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let v: serde_json::Value = serde_json::from_str(&ask(&s, b"position\n")).unwrap();
            if v["ok"] == true {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still busy: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    srv.stop().await;
}

/// One commit that also moves pages: the counters, 40 new 512-byte blocks and the removal
/// of the 40 added two commits before, so pages are freed and reused all the time.
fn churn(db: &Db, n: u64) {
    write_counter(db, n);
    let w = db.db().begin_write().unwrap();
    {
        let mut blocks = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
        for i in 0..40 {
            blocks
                .insert(&hash_of(n * 1000 + i)[..], &[n as u8; 512][..])
                .unwrap();
            if n >= 2 {
                blocks.remove(&hash_of((n - 2) * 1000 + i)[..]).unwrap();
            }
        }
    }
    w.commit().unwrap();
}

/// Take a page image through the admin socket into `dest`, `pause` after every piece.
fn take_image(socket: &Path, dest: &Path, pause: Duration) -> admin::ImageHeader {
    let mut f = std::fs::File::create(dest).unwrap();
    admin::fetch_image_blocking(socket, None, |_, _, b| {
        std::thread::sleep(pause);
        f.write_all(b).map_err(|e| e.to_string())
    })
    .unwrap()
}

/// Take the pages changed `since` a token into the file `mirror` (the whole image when the
/// token is unknown), `pause` after every piece; `give_up_after` bytes, fail like a full
/// disk.
fn take_into(
    socket: &Path,
    mirror: &Path,
    since: Option<&str>,
    pause: Duration,
    give_up_after: Option<u64>,
) -> Result<admin::ImageHeader, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(mirror)
        .unwrap();
    let mut n = 0u64;
    let h = admin::fetch_image_blocking(socket, since, |_, at, b| {
        std::thread::sleep(pause);
        n += b.len() as u64;
        if give_up_after.is_some_and(|g| n > g) {
            return Err("no space left here".into());
        }
        f.write_all_at(b, at).map_err(|e| e.to_string())
    })?;
    f.set_len(h.bytes).unwrap();
    Ok(h)
}

fn pages_differing(a: &Path, b: &Path) -> (usize, usize) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let pages = a.len().max(b.len()).div_ceil(4096);
    let page = |v: &[u8], i: usize| {
        v.get(i * 4096..((i + 1) * 4096).min(v.len()))
            .map(|s| s.to_vec())
    };
    let differ = (0..pages).filter(|&i| page(&a, i) != page(&b, i)).count();
    (differ, pages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn page_images_are_consistent_while_writes_move_pages() {
    let node = TestNode::new("image");
    let srv = node.start().await;
    let db = srv.database().clone();
    let public = node.cfg.keys.public_bytes();
    fill(&db, 12_000);
    write_counter(&db, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer(&db, &stop, churn);
    let out = tempfile::tempdir().unwrap();
    let socket = srv.admin_socket().to_path_buf();
    let mut seen = Vec::new();
    for i in 0..4 {
        let dest = out.path().join(format!("i{i}.db"));
        let (s, d) = (socket.clone(), dest.clone());
        // Slow reader: the writer commits many times while the image streams.
        let h = tokio::task::spawn_blocking(move || take_image(&s, &d, Duration::from_millis(30)))
            .await
            .unwrap();
        assert_eq!(h.public, public);
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), h.bytes);
        let p = verify_snapshot(&dest, &public).unwrap();
        assert_eq!(p, h.positions, "image {i}: positions of the pinned commit");
        let (a, b) = counters_of_repaired(&dest);
        assert_eq!(a, b, "image {i}: the two tables disagree: torn image");
        assert_eq!(p[0].index as u64, a, "image {i}");
        seen.push(a);
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "images go forward: {seen:?}"
    );
    assert!(
        *seen.last().unwrap() < last,
        "writes went on: {seen:?} {last}"
    );

    // Quiet database: two images are the same bytes; one small commit between two
    // images changes few pages (offsets are kept, unlike a logical copy).
    let a = out.path().join("quiet-a.db");
    let b = out.path().join("quiet-b.db");
    let c = out.path().join("quiet-c.db");
    take_image(&socket, &a, Duration::ZERO);
    take_image(&socket, &b, Duration::ZERO);
    assert_eq!(
        pages_differing(&a, &b).0,
        0,
        "nothing committed, nothing differs"
    );
    write_counter(&db, last + 1);
    let h = take_image(&socket, &c, Duration::ZERO);
    assert_eq!(h.positions[0].index as u64, last + 1);
    let (differ, pages) = pages_differing(&b, &c);
    assert!(
        differ > 0 && differ * 20 < pages,
        "one commit changed {differ} of {pages} pages"
    );
    srv.stop().await;
}

/// Images of only the pages written since a token, applied to a mirror of the previous
/// image while a writer frees and reuses pages, give the very bytes of a whole image; a
/// transfer given up half way is made good by asking again since the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changed_pages_since_a_token_rebuild_the_whole_image() {
    let node = TestNode::new("image-since");
    let srv = node.start().await;
    let db = srv.database().clone();
    let public = node.cfg.keys.public_bytes();
    fill(&db, 6_000);
    write_counter(&db, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer(&db, &stop, churn);
    let out = tempfile::tempdir().unwrap();
    let mirror = out.path().join("mirror.db");
    let socket = srv.admin_socket().to_path_buf();
    let take = move |since: Option<String>, pause: u64, give_up: Option<u64>| {
        let (s, m) = (socket.clone(), mirror.clone());
        tokio::task::spawn_blocking(move || {
            take_into(
                &s,
                &m,
                since.as_deref(),
                Duration::from_millis(pause),
                give_up,
            )
        })
    };
    let check = |h: &admin::ImageHeader, what: &str| {
        let copy = out.path().join("check.db");
        std::fs::copy(out.path().join("mirror.db"), &copy).unwrap();
        let p = verify_snapshot(&copy, &public).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(p, h.positions, "{what}: positions of the pinned commit");
        let (a, b) = counters_of_repaired(&copy);
        assert_eq!(a, b, "{what}: the two tables disagree: torn image");
        a
    };
    let first = take(None, 0, None).await.unwrap().unwrap();
    assert!(!first.changed_only, "no token: a whole image");
    let mut token = first.token.clone();
    let mut seen = vec![check(&first, "whole image")];
    let mut changed = 0;
    for i in 0..5 {
        if i == 2 {
            // Given up after some pages: the mirror is torn now, the token unchanged.
            let e = take(Some(token.clone()), 0, Some(20_000))
                .await
                .unwrap()
                .unwrap_err();
            assert!(e.contains("no space left here"), "{e}");
        }
        let h = take(Some(token.clone()), 2, None).await.unwrap().unwrap();
        assert!(h.changed_only, "image {i}: the token is known");
        changed += 1;
        token = h.token.clone();
        seen.push(check(&h, &format!("changed pages {i}")));
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]) && *seen.last().unwrap() < last,
        "images go forward while writes go on: {seen:?} {last}"
    );
    // Quiet now: the mirror after one more round is the whole image, byte for byte.
    let h = take(Some(token.clone()), 0, None).await.unwrap().unwrap();
    assert!(h.changed_only);
    let whole = out.path().join("whole.db");
    let socket = srv.admin_socket().to_path_buf();
    let w = tokio::task::spawn_blocking(move || take_image(&socket, &whole, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(w.positions, h.positions);
    assert!(
        std::fs::read(out.path().join("mirror.db")).unwrap()
            == std::fs::read(out.path().join("whole.db")).unwrap(),
        "the mirror built from {changed} rounds of changed pages is not the whole image"
    );
    // A token the conode does not know (another run's, or garbage) gets a whole image.
    let h = take(Some("0123456789abcdef-7".into()), 0, None)
        .await
        .unwrap()
        .unwrap();
    assert!(!h.changed_only);
    srv.stop().await;
}

/// Counters of an image (a crash image: opened through a copy, which redb repairs).
fn counters_of_repaired(path: &Path) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    std::fs::copy(path, &copy).unwrap();
    counters_of(&copy)
}

#[tokio::test]
async fn an_image_stream_cut_short_is_an_error() {
    let node = TestNode::new("image-cut");
    let srv = node.start().await;
    fill(srv.database(), 3000);
    let socket = srv.admin_socket().to_path_buf();
    let e = tokio::task::spawn_blocking(move || {
        admin::fetch_image_blocking(&socket, None, |_, _, _| Err("disk full here".to_string()))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e, "disk full here");
    // The server noticed the reader leave and serves the next image.
    let socket = srv.admin_socket().to_path_buf();
    let mut n = 0u64;
    let h = tokio::task::spawn_blocking(move || {
        admin::fetch_image_blocking(&socket, None, |_, _, b| {
            n += b.len() as u64;
            Ok(())
        })
        .map(|h| (h, n))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(h.0.bytes, h.1);
    srv.stop().await;
}

/// Status never waits for the writers: while an image holds them (here 3 s, a slow
/// reader), Status answers at once (its allocator figures from the last time).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_answers_while_an_image_holds_the_writers() {
    let node = TestNode::new("status-image");
    let srv = node.start().await;
    // Larger than what the socket and the reader's queue hold (the image must still be
    // held on the server while the client sleeps).
    fill(srv.database(), 60_000);
    let bytes = std::fs::metadata(node.db_path()).unwrap().len();
    assert!(bytes > 16 << 20, "{bytes}");
    let server = node.cfg.server_toml();
    let socket = srv.admin_socket().to_path_buf();
    let dest = node.dir.path().join("held.img");
    let held = tokio::task::spawn_blocking(move || {
        let mut first = true;
        let mut f = std::fs::File::create(&dest).unwrap();
        admin::fetch_image_blocking(&socket, None, |_, _, b| {
            if std::mem::take(&mut first) {
                std::thread::sleep(Duration::from_secs(3));
            }
            f.write_all(b).map_err(|e| e.to_string())
        })
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No figures cached yet: the first Status must look (and not wait); then past the
    // figures' cache (1 s) again.
    for _ in 0..4 {
        let t = std::time::Instant::now();
        conode::client::status(&server, Duration::from_millis(800))
            .await
            .expect("Status answers while the writers are held");
        assert!(t.elapsed() < Duration::from_millis(800));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!held.is_finished(), "the image still held the writers");
    held.await.unwrap().expect("the image completes");
    srv.stop().await;
}

/// An `image` request whose stream is never read holds the writers at most
/// IMAGE_HOLD_LIMIT (20 s): the limit is kept where the writers are held, not only by a
/// reader thread that a full socket blocks (a write used to wait 29 s and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unread_image_releases_the_writers_within_its_limit() {
    let node = TestNode::new("image-unread");
    let srv = node.start().await;
    // Far more than the socket's buffers and the reader's queue hold.
    fill(srv.database(), 60_000);
    let mut unread = UnixStream::connect(srv.admin_socket()).unwrap();
    unread.write_all(b"image\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = srv.database().clone();
    let t = std::time::Instant::now();
    let waited = tokio::task::spawn_blocking(move || {
        let w = db.db().begin_write().unwrap();
        w.open_table(SKIPCHAIN_BLOCKS)
            .unwrap()
            .insert(&hash_of(7_000_000)[..], &b"after the image"[..])
            .unwrap();
        w.commit().unwrap();
        t.elapsed()
    })
    .await
    .unwrap();
    let limit = admin::IMAGE_HOLD_LIMIT;
    assert!(
        waited > Duration::from_secs(5),
        "the image held the writers (the write waited {waited:?})"
    );
    assert!(
        waited < limit + Duration::from_secs(3),
        "the writers were released within {limit:?} (waited {waited:?})"
    );
    // The connection is cut: reading it ends before the whole image.
    unread
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = unread.read_to_end(&mut got);
    let bytes = std::fs::metadata(node.db_path()).unwrap().len();
    assert!((got.len() as u64) < bytes, "{} of {bytes}", got.len());
    drop(unread);
    srv.stop().await;
}
