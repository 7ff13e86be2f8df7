//! The standby's store with real redb snapshots made by the conode's own code: install,
//! reuse of the previous generation, and every refusal leaving the previous generation
//! installed and installable.

use std::path::{Path, PathBuf};

use conode::db::{ChainPosition, SKIPCHAIN_BLOCKS};
use conode::keys::KeyPair;
use failoverd::chunk;
use failoverd::manifest::Manifest;
use failoverd::standby::Store;
use failoverd::standby::StoreError;

mod common;
use common::{manifest, Live};

/// Offer, send every missing chunk, commit. Returns the bytes sent.
fn ship(store: &Store, key: &KeyPair, m: &Manifest, file: &Path) -> Result<u64, StoreError> {
    let data = std::fs::read(file).unwrap();
    let offer = store.offer(&m.seal(key))?;
    let mut sent = 0;
    for i in offer.missing {
        let c = m.chunks[i as usize];
        store.put_chunk(
            m.generation,
            i,
            &data[c.offset as usize..(c.offset + c.len as u64) as usize],
        )?;
        sent += c.len as u64;
    }
    store.commit(m.generation)?;
    Ok(sent)
}

struct Setup {
    _tmp: tempfile::TempDir,
    live: Live,
    key: KeyPair,
    state: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let live = Live::new(tmp.path());
    let state = tmp.path().join("state");
    Setup {
        key: KeyPair::generate().unwrap(),
        live,
        state,
        _tmp: tmp,
    }
}

/// The newest installed generation is a sound database at the manifest's positions.
fn assert_installable(store: &Store, public: &[u8; 32], generation: u64) {
    let newest = store.newest().expect("a generation is installed");
    assert_eq!(newest.manifest.generation, generation);
    let before = std::fs::read(&newest.path).unwrap();
    let pos = conode::db::verify_snapshot(&newest.path, public).unwrap();
    assert_eq!(
        std::fs::read(&newest.path).unwrap(),
        before,
        "checking changes nothing"
    );
    assert_eq!(pos, newest.manifest.positions);
}

#[test]
fn full_then_incremental_sends_only_new_chunks() {
    let mut s = setup();
    s.live.append(300, 8000);
    let (f1, p1) = s.live.image("s1.db");
    let store = Store::open(&s.state, 2, s.key.public_bytes(), s.live.public).unwrap();
    let m1 = manifest(&s.key, s.live.public, 1, &f1, p1);
    let sent1 = ship(&store, &s.key, &m1, &f1).unwrap();
    let mut seen = std::collections::HashSet::new();
    let zero = |c: &failoverd::chunk::Chunk| c.hash == failoverd::chunk::zeros_hash(c.len);
    let distinct: u64 = m1
        .chunks
        .iter()
        .filter(|c| !zero(c) && seen.insert((c.len, c.hash)))
        .map(|c| c.len as u64)
        .sum();
    assert!(m1.chunks.iter().any(zero), "the image has free pages");
    assert_eq!(
        sent1, distinct,
        "the first generation is sent whole, each distinct chunk once, no chunk of zeros"
    );
    assert_installable(&store, &s.live.public, 1);
    assert_eq!(
        std::fs::read(&store.newest().unwrap().path).unwrap(),
        std::fs::read(&f1).unwrap(),
        "the install is the image"
    );

    s.live.append(3, 8000);
    let (f2, p2) = s.live.image("s2.db");
    let m2 = manifest(&s.key, s.live.public, 2, &f2, p2);
    let sent2 = ship(&store, &s.key, &m2, &f2).unwrap();
    // Page images (what failoverd ships): only the chunks around written pages.
    assert!(
        sent2 < m2.bytes / 2,
        "incremental sent {sent2} of {} bytes",
        m2.bytes
    );
    assert_installable(&store, &s.live.public, 2);

    // Keep 2: a third generation prunes the first.
    s.live.append(1, 100);
    let (f3, p3) = s.live.image("s3.db");
    s.ship(&store, 3, &f3, p3).unwrap();
    let gens: Vec<u64> = store
        .installed()
        .iter()
        .map(|g| g.manifest.generation)
        .collect();
    assert_eq!(gens, vec![2, 3]);
    // A restarted standby finds the same generations.
    drop(store);
    let store = Store::open(&s.state, 2, s.key.public_bytes(), s.live.public).unwrap();
    let gens: Vec<u64> = store
        .installed()
        .iter()
        .map(|g| g.manifest.generation)
        .collect();
    assert_eq!(gens, vec![2, 3]);
}

/// Install generation 1, then run `bad` and check it failed with `want` in its message
/// and left generation 1 installed and sound.
impl Setup {
    /// Sign generation `g` of the image `file` with `positions`, and ship it to `store`.
    fn ship(
        &self,
        store: &Store,
        g: u64,
        file: &Path,
        positions: Vec<ChainPosition>,
    ) -> Result<u64, StoreError> {
        ship(
            store,
            &self.key,
            &manifest(&self.key, self.live.public, g, file, positions),
            file,
        )
    }
}

fn refused_keeps_previous(
    bad: impl FnOnce(&mut Setup, &Store) -> Result<(), StoreError>,
    want: &str,
) {
    let mut s = setup();
    s.live.append(50, 4000);
    let (f1, p1) = s.live.image("s1.db");
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    s.ship(&store, 1, &f1, p1).unwrap();
    s.live.append(5, 4000);
    let e = bad(&mut s, &store)
        .expect_err("must be refused")
        .to_string();
    assert!(e.contains(want), "expected {want:?} in: {e}");
    assert_eq!(store.installed().len(), 1);
    assert_installable(&store, &s.live.public, 1);
    let staged = std::fs::read_dir(s.state.join("generations"))
        .unwrap()
        .count();
    assert_eq!(staged, 2, "only generation 1's file and manifest");
}

#[test]
fn a_flipped_byte_in_a_chunk_is_refused() {
    refused_keeps_previous(
        |s, store| {
            let (f, p) = s.live.snapshot("s2.db");
            let m = manifest(&s.key, s.live.public, 2, &f, p);
            let mut data = std::fs::read(&f).unwrap();
            let offer = store.offer(&m.seal(&s.key))?;
            let i = offer.missing[0];
            let c = m.chunks[i as usize];
            data[c.offset as usize + 10] ^= 1;
            store.put_chunk(
                2,
                i,
                &data[c.offset as usize..(c.offset + c.len as u64) as usize],
            )?;
            store.commit(2).map(|_| ())
        },
        "does not match its hash in the signed manifest",
    );
}

#[test]
fn a_manifest_signed_by_another_key_is_refused() {
    refused_keeps_previous(
        |s, store| {
            let (f, p) = s.live.snapshot("s2.db");
            let other = KeyPair::generate().unwrap();
            let m = manifest(&other, s.live.public, 2, &f, p);
            store.offer(&m.seal(&other)).map(|_| ())
        },
        "does not verify with the pinned peer key",
    );
}

#[test]
fn a_replayed_or_old_generation_is_refused() {
    refused_keeps_previous(
        |s, store| {
            let (f, p) = s.live.snapshot("s2.db");
            store
                .offer(&manifest(&s.key, s.live.public, 1, &f, p).seal(&s.key))
                .map(|_| ())
        },
        "not newer than generation 1",
    );
}

#[test]
fn a_snapshot_of_another_conode_is_refused() {
    refused_keeps_previous(
        |s, store| {
            let (f, p) = s.live.snapshot("s2.db");
            store
                .offer(&manifest(&s.key, [1; 32], 2, &f, p).seal(&s.key))
                .map(|_| ())
        },
        "this host's conode is",
    );
}

#[test]
fn a_snapshot_behind_the_installed_one_is_refused() {
    refused_keeps_previous(
        |s, store| {
            let (f, mut p) = s.live.snapshot("s2.db");
            p[0].index = 1;
            store
                .offer(&manifest(&s.key, s.live.public, 2, &f, p).seal(&s.key))
                .map(|_| ())
        },
        "refusing to go back",
    );
}

#[test]
fn positions_that_lie_about_the_file_are_refused() {
    refused_keeps_previous(
        |s, store| {
            let (f, mut p) = s.live.snapshot("s2.db");
            p[0].index += 100;
            s.ship(store, 2, &f, p).map(|_| ())
        },
        "differ from the signed manifest",
    );
}

#[test]
fn a_damaged_database_with_matching_hashes_fails_the_integrity_check() {
    refused_keeps_previous(
        |s, store| {
            let (f, p) = s.live.snapshot("s2.db");
            // Damage the file before hashing: the chunks match, redb's check does not.
            let mut data = std::fs::read(&f).unwrap();
            let at = data.len() / 2;
            for b in &mut data[at..at + 64] {
                *b ^= 0x5a;
            }
            std::fs::write(&f, &data).unwrap();
            s.ship(store, 2, &f, p).map(|_| ())
        },
        "damaged",
    );
}

#[test]
fn inbox_files_truncated_flipped_or_outside_are_refused() {
    for (case, want) in [
        ("truncated", "truncated"),
        ("flipped", "damaged in transit"),
        ("outside", "only a plain file name"),
        ("missing", "cannot open"),
    ] {
        refused_keeps_previous(
            |s, store| {
                let (f, p) = s.live.snapshot("s2.db");
                let mut m = manifest(&s.key, s.live.public, 2, &f, p);
                m.file = Some(
                    if case == "outside" {
                        "../generations/x.db"
                    } else {
                        "snapshot.db"
                    }
                    .into(),
                );
                let mut data = std::fs::read(&f).unwrap();
                match case {
                    "truncated" => data.truncate(data.len() - 4096),
                    "flipped" => data[5000] ^= 0x01,
                    _ => {}
                }
                if case != "missing" {
                    std::fs::write(store.inbox().join("snapshot.db"), &data).unwrap();
                }
                store.install_inbox(&m.seal(&s.key)).map(|_| ())
            },
            want,
        );
    }
}

#[test]
fn an_inbox_file_that_verifies_is_installed() {
    let mut s = setup();
    s.live.append(40, 3000);
    let (f, p) = s.live.snapshot("s1.db");
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    let mut m = manifest(&s.key, s.live.public, 1, &f, p);
    m.file = Some("snapshot.db".into());
    std::fs::copy(&f, store.inbox().join("snapshot.db")).unwrap();
    store.install_inbox(&m.seal(&s.key)).unwrap();
    assert_installable(&store, &s.live.public, 1);
}

/// A tmpfs mounted for the test, unmounted on drop (also on failure).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test mounts a small tmpfs to fill the standby's disk: run it as root"
        );
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs failed");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_refused_and_the_previous_generation_kept() {
    let mut s = setup();
    let _fs = Tmpfs::mount(&s.state, "4m");
    s.live.append(100, 8000);
    let (f1, p1) = s.live.snapshot("s1.db");
    let size1 = std::fs::metadata(&f1).unwrap().len();
    assert!(size1 < 3 << 19, "generation 1 is {size1} bytes");
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    s.ship(&store, 1, &f1, p1).unwrap();

    // Room at the offer, but the disk fills up during the transfer (another writer).
    s.live.append(1, 1000);
    let (f2, p2) = s.live.snapshot("s2.db");
    let m2 = manifest(&s.key, s.live.public, 2, &f2, p2);
    let data = std::fs::read(&f2).unwrap();
    let offer = store.offer(&m2.seal(&s.key)).unwrap();
    let filler = s.state.join("filler");
    let mut big = std::fs::File::create(&filler).unwrap();
    let chunk = vec![1u8; 16 << 10];
    use std::io::Write;
    while big.write_all(&chunk).is_ok() {}
    drop(big);
    let mut r = Ok(());
    for i in offer.missing {
        let c = m2.chunks[i as usize];
        r = store.put_chunk(
            2,
            i,
            &data[c.offset as usize..(c.offset + c.len as u64) as usize],
        );
        if r.is_err() {
            break;
        }
    }
    let e = r
        .and_then(|_| store.commit(2).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no space left"), "{e}");
    assert_installable(&store, &s.live.public, 1);
    // Space freed: the same generation ships.
    std::fs::remove_file(&filler).unwrap();
    ship(&store, &s.key, &m2, &f2).unwrap();
    assert_installable(&store, &s.live.public, 2);

    // No room for the next generation at all: refused before any chunk is sent.
    s.live.append(400, 8000);
    let (f3, p3) = s.live.snapshot("s3.db");
    let m3 = manifest(&s.key, s.live.public, 3, &f3, p3);
    let e = store.offer(&m3.seal(&s.key)).unwrap_err().to_string();
    assert!(e.contains("no space left on the standby's disk"), "{e}");
    assert_installable(&store, &s.live.public, 2);
}

impl Live {
    /// A page image of the live database (as the admin socket's `image` streams it).
    fn image(&self, name: &str) -> (PathBuf, Vec<ChainPosition>) {
        let p = self.dir.join(name);
        let img = self.db.image(None, false).unwrap();
        let mut data = vec![0u8; img.bytes as usize];
        img.read_at(&mut data, 0).unwrap();
        std::fs::write(&p, &data).unwrap();
        (p, img.positions.clone())
    }
}

#[test]
fn page_images_recycle_the_oldest_generation_and_send_only_what_changed() {
    let mut s = setup();
    let store = Store::open(&s.state, 2, s.key.public_bytes(), s.live.public).unwrap();
    s.live.append(400, 4096);
    let mut sent = Vec::new();
    let mut files = Vec::new();
    for g in 1..=4u64 {
        if g > 1 {
            s.live.append(4, 4096);
        }
        let (f, pos) = s.live.image(&format!("img{g}.db"));
        let m = manifest(&s.key, s.live.public, g, &f, pos);
        sent.push(ship(&store, &s.key, &m, &f).unwrap());
        assert_installable(&store, &s.live.public, g);
        assert_eq!(
            std::fs::read(store.newest().unwrap().path).unwrap(),
            std::fs::read(&f).unwrap(),
            "generation {g} is the image, byte for byte"
        );
        files.push((f, m));
    }
    let held: Vec<u64> = store.held().iter().map(|h| h.generation).collect();
    assert_eq!(held, vec![3, 4], "keep 2");
    let size = files[3].1.bytes;
    for (g, b) in sent.iter().enumerate().skip(1) {
        assert!(
            *b * 10 < size,
            "generation {}: {b} bytes sent of a {size}-byte image",
            g + 1
        );
    }
    // Generations 3 and 4 were written over the files of 1 and 2: nothing else is left.
    let names: Vec<String> = std::fs::read_dir(s.state.join("generations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");

    // The oldest generation's file changes on disk before it is recycled: the chunk left
    // in place no longer matches, the new generation is refused, the newest stays.
    let oldest = store.installed()[0].clone();
    let c = oldest.manifest.chunks[oldest.manifest.chunks.len() / 2];
    let mut bytes = std::fs::read(&oldest.path).unwrap();
    bytes[c.offset as usize + 10] ^= 0x40;
    std::fs::write(&oldest.path, &bytes).unwrap();
    s.live.append(2, 4096);
    let (f, pos) = s.live.image("img5.db");
    let m = manifest(&s.key, s.live.public, 5, &f, pos);
    let e = ship(&store, &s.key, &m, &f).unwrap_err().to_string();
    assert!(e.contains("no longer matches its hash"), "{e}");
    assert_installable(&store, &s.live.public, 4);
    // The next generation ships (from an empty file: one generation is left).
    let m = manifest(&s.key, s.live.public, 6, &f, m.positions.clone());
    ship(&store, &s.key, &m, &f).unwrap();
    assert_installable(&store, &s.live.public, 6);
}

/// A whole image streamed before its manifest (as the live host does while it takes one):
/// only frames whose offset, length and hash the signed manifest names count; a damaged
/// frame, a frame later overlapped, and a chunk of a recycled file that a frame wrote over
/// are asked for again, and the installed file is the image byte for byte.
#[test]
fn a_streamed_image_counts_only_the_frames_its_manifest_names() {
    let mut s = setup();
    let store = Store::open(&s.state, 2, s.key.public_bytes(), s.live.public).unwrap();
    s.live.append(300, 4096);
    let (f1, p1) = s.live.image("st1.db");
    s.ship(&store, 1, &f1, p1).unwrap();
    s.live.append(40, 4096);
    let (f2, p2) = s.live.image("st2.db");
    let m2 = manifest(&s.key, s.live.public, 2, &f2, p2);
    let data = std::fs::read(&f2).unwrap();
    let bytes = |c: &chunk::Chunk| &data[c.offset as usize..(c.offset + c.len as u64) as usize];

    let e = store.begin_stream(1, m2.bytes).unwrap_err().to_string();
    assert!(e.contains("not newer"), "{e}");
    store.begin_stream(2, m2.bytes).unwrap();
    let e = store.put_streamed(3, 0, b"x").unwrap_err().to_string();
    assert!(e.contains("not being streamed"), "{e}");
    let e = store
        .put_streamed(2, m2.bytes - 1, b"xy")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ends past"), "{e}");
    let mut bad = std::collections::BTreeSet::new();
    for (i, c) in m2.chunks.iter().enumerate() {
        let b = bytes(c);
        match i % 11 {
            // Never sent.
            0 | 5 => {
                bad.insert(i);
            }
            // Damaged on the way.
            1 => {
                let mut d = b.to_vec();
                let mid = d.len() / 2;
                d[mid] ^= 1;
                store.put_streamed(2, c.offset, &d).unwrap();
                bad.insert(i);
            }
            // Sent, then partly overwritten by a frame one byte further on.
            2 => {
                store.put_streamed(2, c.offset, b).unwrap();
                let end = (c.offset + 1 + b.len() as u64).min(m2.bytes);
                let n = (end - c.offset - 1) as usize;
                store.put_streamed(2, c.offset + 1, &b[..n]).unwrap();
                bad.insert(i);
            }
            _ => store.put_streamed(2, c.offset, b).unwrap(),
        }
    }
    let held1: std::collections::HashSet<[u8; 32]> = store.installed()[0]
        .manifest
        .chunks
        .iter()
        .map(|c| c.hash)
        .collect();
    let offer = store.offer(&m2.seal(&s.key)).unwrap();
    // Bad chunks are asked for, unless generation 1 holds their bytes (copied locally).
    let want: Vec<u32> = bad
        .iter()
        .filter(|&&i| !held1.contains(&m2.chunks[i].hash))
        .map(|&i| i as u32)
        .collect();
    assert_eq!(offer.missing, want);
    for kind in [0, 1, 2] {
        assert!(
            want.iter().any(|&i| i as usize % 11 == kind),
            "no chunk of kind {kind} among those asked for: {want:?}"
        );
    }
    for &i in &offer.missing {
        store
            .put_chunk(2, i, bytes(&m2.chunks[i as usize]))
            .unwrap();
    }
    store.commit(2).unwrap();
    assert_installable(&store, &s.live.public, 2);
    assert_eq!(std::fs::read(store.newest().unwrap().path).unwrap(), data);

    // Keep 2 is reached: the next stream is written over generation 1's file. A frame
    // of garbage lands on a chunk that file holds unchanged: that chunk is not taken as
    // in place, but asked for.
    s.live.append(5, 4096);
    let (f3, p3) = s.live.image("st3.db");
    let m3 = manifest(&s.key, s.live.public, 3, &f3, p3);
    let data3 = std::fs::read(&f3).unwrap();
    let m1 = store.installed()[0].manifest.clone();
    let same: Vec<usize> = m3
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| m1.chunks.contains(c))
        .map(|(i, _)| i)
        .collect();
    assert!(same.len() > 10, "generation 1 and 3 share chunks in place");
    let target = m3.chunks[same[same.len() / 2]];
    store.begin_stream(3, m3.bytes).unwrap();
    store
        .put_streamed(3, target.offset, &vec![0xa5; target.len as usize])
        .unwrap();
    // Overlapping garbage is not enough to count it either: the real bytes of only the
    // first half of the chunks follow.
    let half = m3.chunks.len() / 2;
    for c in &m3.chunks[..half] {
        if c.offset != target.offset {
            store
                .put_streamed(
                    3,
                    c.offset,
                    &data3[c.offset as usize..(c.offset + c.len as u64) as usize],
                )
                .unwrap();
        }
    }
    // Had the chunk under the garbage been taken as in place, the commit below would
    // refuse it ("no longer matches its hash"); it is asked for, or copied from
    // generation 2.
    let offer = store.offer(&m3.seal(&s.key)).unwrap();
    assert!(offer.missing.len() < m3.chunks.len() - half);
    for &i in &offer.missing {
        let c = m3.chunks[i as usize];
        store
            .put_chunk(
                3,
                i,
                &data3[c.offset as usize..(c.offset + c.len as u64) as usize],
            )
            .unwrap();
    }
    store.commit(3).unwrap();
    assert_installable(&store, &s.live.public, 3);
    assert_eq!(std::fs::read(store.newest().unwrap().path).unwrap(), data3);
    let held: Vec<u64> = store.held().iter().map(|h| h.generation).collect();
    assert_eq!(held, vec![2, 3]);
}

/// Chunks with the same bytes in one generation (a large value of one repeated byte, as
/// zeroed pages are after the file grew) are sent once and written everywhere.
#[test]
fn chunks_repeated_within_a_generation_are_sent_once() {
    let mut s = setup();
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    s.live.append(20, 4096);
    let (f1, p1) = s.live.image("rep1.db");
    s.ship(&store, 1, &f1, p1).unwrap();
    let w = s.live.db.db().begin_write().unwrap();
    {
        let mut b = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
        b.insert(&[9u8; 32][..], &vec![0x5a; 4 << 20][..]).unwrap();
    }
    w.commit().unwrap();
    s.live.append(1, 4096);
    let (f2, p2) = s.live.image("rep2.db");
    let m2 = manifest(&s.key, s.live.public, 2, &f2, p2);
    let mut seen = std::collections::HashSet::new();
    let repeated: u64 = m2
        .chunks
        .iter()
        .filter(|c| !seen.insert((c.len, c.hash)))
        .map(|c| c.len as u64)
        .sum();
    assert!(
        repeated > 3 << 20,
        "the image repeats chunks: {repeated} bytes"
    );
    let sent = ship(&store, &s.key, &m2, &f2).unwrap();
    assert!(
        sent + repeated <= m2.bytes,
        "{sent} bytes sent of {} with {repeated} repeated",
        m2.bytes
    );
    assert_installable(&store, &s.live.public, 2);
    assert_eq!(
        std::fs::read(store.newest().unwrap().path).unwrap(),
        std::fs::read(&f2).unwrap()
    );
}

/// Chunks of zeros stream as frames without bytes: in a new file they are zeros already
/// (never written), where a frame was written they are written, and in a recycled file
/// (whose old bytes there are not zeros) too. Every install is the image, byte for byte.
#[test]
fn zero_frames_give_zeros_in_new_and_recycled_files() {
    let mut s = setup();
    let store = Store::open(&s.state, 2, s.key.public_bytes(), s.live.public).unwrap();
    let zero = |c: &chunk::Chunk| c.hash == chunk::zeros_hash(c.len);
    let (key, public) = (s.key.clone(), s.live.public);
    let stream = |g: u64, f: &Path, p, garbage_first: bool| {
        let m = manifest(&key, public, g, f, p);
        let data = std::fs::read(f).unwrap();
        store.begin_stream(g, m.bytes).unwrap();
        let zeros: Vec<chunk::Chunk> = m.chunks.iter().copied().filter(zero).collect();
        assert!(zeros.len() > 3, "the image has chunks of zeros");
        for c in &m.chunks {
            if zero(c) {
                if garbage_first {
                    store
                        .put_streamed(g, c.offset, &vec![0x5a; c.len as usize])
                        .unwrap();
                }
                store.put_streamed_zeros(g, c.offset, c.len).unwrap();
            } else {
                let b = &data[c.offset as usize..(c.offset + c.len as u64) as usize];
                store.put_streamed(g, c.offset, b).unwrap();
            }
        }
        let offer = store.offer(&m.seal(&key)).unwrap();
        assert!(
            offer.missing.is_empty(),
            "generation {g}: {:?}",
            offer.missing
        );
        store.commit(g).unwrap();
        assert_installable(&store, &public, g);
        let got = std::fs::read(store.newest().unwrap().path).unwrap();
        let differs = got.iter().zip(&data).position(|(a, b)| a != b);
        assert!(
            got.len() == data.len() && differs.is_none(),
            "generation {g}: the install differs from the image at byte {differs:?}"
        );
        (m, zeros)
    };
    s.live.append(200, 8000);
    let (f1, p1) = s.live.image("z1.db");
    stream(1, &f1, p1, false);
    s.live.append(20, 8000);
    let (f2, p2) = s.live.image("z2.db");
    stream(2, &f2, p2, true);

    // Keep 2: generation 3 is written over generation 1's file. Make that file hold
    // non-zero bytes wherever generation 3 has zeros (as stale pages would).
    s.live.append(20, 8000);
    let (f3, p3) = s.live.image("z3.db");
    let m3 = manifest(&s.key, s.live.public, 3, &f3, p3.clone());
    let old = store.installed()[0].path.clone();
    let f = std::fs::OpenOptions::new().write(true).open(&old).unwrap();
    let old_len = f.metadata().unwrap().len();
    let mut stale = 0;
    for c in m3.chunks.iter().filter(|c| zero(c)) {
        if c.offset + c.len as u64 <= old_len {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xc3; c.len as usize], c.offset)
                .unwrap();
            stale += 1;
        }
    }
    drop(f);
    assert!(
        stale > 0,
        "generation 1's file overlaps chunks of zeros of generation 3"
    );
    stream(3, &f3, p3, false);

    // Refused: an empty frame of zeros, one past the end, one for another generation.
    s.live.append(1, 8000);
    let (f4, p4) = s.live.image("z4.db");
    let m4 = manifest(&s.key, s.live.public, 4, &f4, p4);
    store.begin_stream(4, m4.bytes).unwrap();
    for (g, at, n, why) in [
        (4, 0, 0, "empty"),
        (4, m4.bytes - 10, 16384, "ends past"),
        (5, 0, 16384, "not being streamed"),
    ] {
        let e = store.put_streamed_zeros(g, at, n).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
}

/// While fewer than `keep` generations are held, a spare copy of the newest is made after
/// each install and the next generation is written over it in place: only what changed is
/// sent, the install is the image byte for byte, a spare damaged on disk is caught by the
/// check of the chunks kept in place, and with `keep` held the oldest is recycled instead.
#[test]
fn the_next_generation_is_written_over_a_spare_copy_of_the_newest() {
    let mut s = setup();
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    s.live.append(300, 8000);
    let spares = |st: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(st.join("staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("spare-"))
            .collect()
    };
    let ship_image = |s: &mut Setup, g: u64| -> (Result<u64, StoreError>, Manifest, PathBuf) {
        let (f, pos) = s.live.image(&format!("sp{g}.db"));
        let m = manifest(&s.key, s.live.public, g, &f, pos);
        (ship(&store, &s.key, &m, &f), m, f)
    };
    let (r, m1, _) = ship_image(&mut s, 1);
    r.unwrap();
    assert_eq!(store.spare(), Some(1), "a spare of generation 1");
    assert_eq!(spares(&s.state).len(), 1);

    s.live.append(3, 8000);
    let (r, _, f2) = ship_image(&mut s, 2);
    let sent = r.unwrap();
    assert!(sent * 10 < m1.bytes, "{sent} bytes sent of {}", m1.bytes);
    assert_installable(&store, &s.live.public, 2);
    assert!(
        std::fs::read(store.newest().unwrap().path).unwrap() == std::fs::read(&f2).unwrap(),
        "generation 2 is the image, byte for byte"
    );
    assert_eq!(store.spare(), Some(2), "a spare of generation 2");
    assert_eq!(
        spares(&s.state).len(),
        1,
        "the spare of 1 became generation 2"
    );

    // The spare changes on disk: a chunk kept in place no longer matches; refused.
    let spare = s.state.join("staging").join(&spares(&s.state)[0]);
    let newest = store.newest().unwrap();
    let c = newest
        .manifest
        .chunks
        .iter()
        .find(|c| c.hash != chunk::zeros_hash(c.len) && c.offset > 0)
        .copied()
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&spare)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 7], c.offset + 100).unwrap();
    drop(f);
    s.live.append(1, 8000);
    let (r, m3, f3) = ship_image(&mut s, 3);
    let e = r.unwrap_err();
    // Disk corruption, counted as such (not as "other").
    assert_eq!(e.cause(), failoverd::error::Cause::Corruption, "{e}");
    let e = e.to_string();
    assert!(e.contains("no longer matches its hash"), "{e}");
    assert_installable(&store, &s.live.public, 2);
    assert!(spares(&s.state).is_empty(), "the damaged spare is gone");
    // Again: from an empty file this time.
    ship(&store, &s.key, &m3, &f3).unwrap();
    assert_installable(&store, &s.live.public, 3);
    assert_eq!(
        store.spare(),
        None,
        "3 generations held: the next recycles the oldest"
    );
    s.live.append(2, 8000);
    let (r, _, _) = ship_image(&mut s, 4);
    r.unwrap();
    assert_installable(&store, &s.live.public, 4);
    let held: Vec<u64> = store.held().iter().map(|h| h.generation).collect();
    assert_eq!(held, vec![2, 3, 4]);
}

/// A takeover links the newest generation's file in as the conode's database (nothing
/// copied) and the store gives it up: its manifest and name go, the generation before it
/// is the newest, a later generation still installs, and the conode's writes into the
/// file can never be taken for the generation. A restart that finds a generation whose
/// file is the conode's database (the takeover stopped before giving it up) gives it up.
#[test]
fn a_generation_linked_in_as_the_conode_database_is_given_up() {
    use std::os::unix::fs::MetadataExt;
    let mut s = setup();
    s.live.append(50, 4000);
    let (f1, p1) = s.live.image("s1.db");
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    s.ship(&store, 1, &f1, p1).unwrap();
    s.live.append(5, 4000);
    let (f2, p2) = s.live.image("s2.db");
    s.ship(&store, 2, &f2, p2).unwrap();
    let gen2 = store.newest().unwrap().path;

    let data = s.state.parent().unwrap().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("conode.db");
    std::fs::write(&db, b"the database before the takeover").unwrap();
    let conode = failoverd::conode_ctl::Conode::new(
        failoverd::config::ConodeSection {
            config: data.join("private.toml"),
            data_dir: data.clone(),
            control: failoverd::config::ConodeControl::Systemd {
                unit: "unused.service".into(),
            },
        },
        data.join("admin.sock"),
        db.clone(),
    );
    let g = std::fs::metadata(&gen2).unwrap();
    assert!(conode.install(2, &gen2).unwrap(), "same filesystem: linked");
    let m = std::fs::metadata(&db).unwrap();
    assert_eq!(
        (m.dev(), m.ino()),
        (g.dev(), g.ino()),
        "the same file, not a copy"
    );
    assert_eq!(
        std::fs::read(data.join("conode.db.replaced")).unwrap(),
        b"the database before the takeover"
    );
    assert!(store.forget(2));
    assert!(!gen2.exists());
    assert_eq!(store.newest().unwrap().manifest.generation, 1);
    assert_installable(&store, &s.live.public, 1);
    // The conode writes into its database: generation 1 and a later one are untouched.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(4096)
        .unwrap();
    s.live.append(3, 4000);
    let (f3, p3) = s.live.image("s3.db");
    s.ship(&store, 3, &f3, p3).unwrap();
    assert_installable(&store, &s.live.public, 3);
    drop(store);
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    let gens: Vec<u64> = store
        .installed()
        .iter()
        .map(|i| i.manifest.generation)
        .collect();
    assert_eq!(
        gens,
        vec![1, 3],
        "generation 2 stays given up after a restart"
    );

    // Interrupted between the link and giving the generation up: found at start.
    let gen3 = store.newest().unwrap().path;
    std::fs::remove_file(&db).unwrap();
    std::fs::hard_link(&gen3, &db).unwrap();
    drop(store);
    let store = Store::open(&s.state, 3, s.key.public_bytes(), s.live.public).unwrap();
    assert_eq!(store.forget_if_same_file(&db), Some(3));
    assert_eq!(store.newest().unwrap().manifest.generation, 1);
    assert_eq!(
        store.forget_if_same_file(&db),
        None,
        "nothing else shares it"
    );
    assert!(db.exists(), "the conode's database stays");
}
