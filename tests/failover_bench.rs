//! Benchmark: failoverd's snapshot shipping between two hosts in network namespaces, against
//! `scp` and `rsync -e ssh` moving the same file over the same link in the same run.
//!
//! `cargo build --release --workspace && cargo bench -p system-tests --bench failover`
//! (as root; `scripts/bench failover` does both). About 6 minutes.
//!
//! 1. A conode database file of `FAILOVER_BENCH_MIB` MiB (default 1024): a chain created
//!    through the conode, then half as many MiB of 64 KiB pseudo-random block records
//!    written into `skipchain_blocks` with the conode stopped (through `conode::db::Db`,
//!    the conode's own code; appending 8 000 blocks through the CLI would take many
//!    minutes), then the conode started again. redb gives each record a 128 KiB page, so
//!    about half of the page image is zeros, which failoverd does not send and scp and
//!    rsync do. failoverd runs on both hosts over HTTPS with a one-hour interval, so that
//!    only its start-up snapshot and `failoverd snapshot` ship.
//! 2. Full, `FAILOVER_BENCH_ROUNDS` times (default 3), in a rotating order: both
//!    failoverds restarted with nothing shipped, and a's start-up snapshot (page image
//!    taken, chunked, signed, shipped, verified with redb's integrity check, installed
//!    with fsync) timed until its manifest is on b; `scp` and `rsync -e ssh` of the same
//!    image file (read into the page cache first, as the conode's database is) into a new
//!    file on the standby (no fsync: they do not). The median and the smallest ratio are
//!    printed.
//! 3. 1% more data appended through `conode chain add` (64 KiB blocks), then the next
//!    snapshot against `rsync --no-whole-file -I` of the new image onto the previous one.
//!    Bytes: failoverd's chunk bytes, rsync's "Total bytes sent", and for both the bytes
//!    that left host a's interface (TLS or ssh, headers and manifest included). "Changed"
//!    is the 4 KiB pages that differ between the two images.
//! 4. RPO at default settings (2 s interval, HTTPS) with a 256 MiB database: a block is
//!    appended at varied moments; the time from just before `conode chain add` starts to
//!    the standby holding an installed generation with that block.

#[allow(dead_code, unused_imports)]
#[path = "failoverd_ship.rs"]
mod ship;

use std::path::Path;
use std::time::{Duration, Instant};

use ship::{ok, Pair};
use system_tests::netns::{Host, Sshd};

const BLOCK: usize = 64 << 10;

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the failover benchmark needs root (network namespaces)"
    );
    let mib: u64 = std::env::var("FAILOVER_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    // FAILOVER_BENCH_ONLY=shipping|rpo runs one part; =full only the full snapshot.
    let only = std::env::var("FAILOVER_BENCH_ONLY").unwrap_or_default();
    if only == "full" {
        shipping(mib, false);
        return;
    }
    if only != "rpo" {
        shipping(mib, true);
    }
    if only != "shipping" {
        rpo(256);
    }
}

struct Rng(u64);

impl Rng {
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Stop the live conode, add 64 KiB block records until they are `mib` / 2 MiB and its
/// closed file is `mib` MiB, start it again. Returns the bytes of records added.
fn fill(p: &mut Pair, mib: u64) -> u64 {
    p.conode_a.take().expect("conode a runs").kill();
    let data = p.path("a/data");
    let file = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|e| e == "db"))
        .expect("the conode's database");
    let stem = file.file_stem().unwrap().to_string_lossy().to_string();
    let public = conode::keys::parse_hex32(&stem).unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let target = mib << 20;
    let mut v = vec![0u8; BLOCK];
    let mut key = [0u8; 32];
    let mut done = 0u64;
    // Half of `mib` in records: redb gives each 64 KiB record a 128 KiB page, so the pages
    // in use are about `mib`. redb may give back the free space at the end of the file when
    // it is closed: fill until the closed file is `mib` MiB too.
    let short = |done: u64| done < target / 2 || std::fs::metadata(&file).unwrap().len() < target;
    while short(done) {
        let db = conode::db::Db::open(&file, &public).unwrap();
        while short(done) {
            let w = db.db().begin_write().unwrap();
            {
                let mut t = w.open_table(conode::db::SKIPCHAIN_BLOCKS).unwrap();
                for _ in 0..64 {
                    rng.fill(&mut key);
                    rng.fill(&mut v);
                    t.insert(&key[..], &v[..]).unwrap();
                    done += BLOCK as u64;
                }
            }
            w.commit().unwrap();
        }
    }
    p.restart_conode_a();
    done
}

fn tx_bytes(h: &Host) -> u64 {
    ok(
        h,
        &format!("cat /sys/class/net/{}/statistics/tx_bytes", h.iface()),
    )
    .trim()
    .parse()
    .unwrap()
}

/// Run `script` on `h`; its wall time and the bytes that left `h`'s interface.
fn measured(h: &Host, script: &str) -> (Duration, u64, String) {
    // Dirty pages of the step before (the fill writes a whole database) are written back
    // first, so that no step pays for another's writeback.
    ok(h, "sync");
    let before = tx_bytes(h);
    let t = Instant::now();
    let out = ok(h, script);
    let d = t.elapsed();
    (d, tx_bytes(h) - before, out)
}

fn last_bytes_sent(p: &Pair) -> u64 {
    p.status("a")
        .unwrap()
        .at(&["bytes_sent"])
        .and_then(|v| v.as_u64())
        .unwrap()
}

fn differing_bytes(a: &Path, b: &Path) -> u64 {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let pages = a.len().max(b.len()).div_ceil(4096);
    fn page(v: &[u8], i: usize) -> Option<&[u8]> {
        v.get(i * 4096..((i + 1) * 4096).min(v.len()))
    }
    (0..pages).filter(|&i| page(&a, i) != page(&b, i)).count() as u64 * 4096
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn shipping(mib: u64, increments: bool) {
    let mut p = Pair::start("fbench", "https", "1h");
    p.grow(1, BLOCK);
    let records = fill(&mut p, mib);
    let sshd = Sshd::start(p.lab.b(), &p.path("sshd"));
    let ssh = sshd.ssh_args().join(" ");
    let base = p.path("b/baseline");
    std::fs::create_dir_all(&base).unwrap();
    let image = p.p("a/state/outgoing/image.db");
    let fo = format!(
        "{} -c {} snapshot",
        system_tests::bin("failoverd").display(),
        p.p("a/failoverd.toml")
    );

    // Warm-up, not measured: on these VMs the first gigabyte or so of memory touched after
    // a pause costs two to three times the CPU, whichever program touches it; without this
    // whatever runs first pays for it.
    measured(
        p.lab.a(),
        &format!(
            "scp -q {ssh} {} {}:{}/warm.db && rm {}/warm.db",
            p.p("a/data/*.db"),
            sshd.target(),
            base.display(),
            base.display()
        ),
    );

    // Full, `rounds` times: failoverd from nothing shipped against scp and rsync of the
    // same image, in a rotating order (whoever runs first after a pause pays more on these
    // VMs), each into a file that does not exist yet.
    let rounds: usize = std::env::var("FAILOVER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let db_file = std::fs::read_dir(p.path("a/data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|e| e == "db"))
        .expect("the conode's database");
    let db_size = std::fs::metadata(&db_file).unwrap().len();
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    let mut size = 0;
    // `copy` (scp or rsync) of the warm image into a new file `name` on b.
    let baseline = |p: &Pair, name: &str, copy: &str| {
        let _ = std::fs::remove_file(base.join(name));
        warm(p.lab.a(), &image);
        let to = format!("{}:{}/{name}", sshd.target(), base.display());
        measured(p.lab.a(), &format!("{copy} {image} {to}"))
    };
    for round in 0..rounds {
        let mut fo_run = None;
        let (mut scp, mut rs) = (None, None);
        for step in 0..3 {
            match (step + round) % 3 {
                0 => fo_run = Some(full_failoverd(&mut p)),
                1 => scp = Some(baseline(&p, "scp.db", &format!("scp -q {ssh}"))),
                _ => {
                    let rsync = format!("rsync -e 'ssh {ssh}' --stats");
                    rs = Some(baseline(&p, "rsync.db", &rsync))
                }
            }
            if step == 0 && round == 0 {
                // The image the baselines copy is the one failoverd took first.
                size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
            }
        }
        let f = fo_run.expect("ran");
        let (scp, rs) = (scp.expect("ran"), rs.expect("ran"));
        let fastest = scp.0.min(rs.0);
        let ratio = fastest.as_secs_f64() / f.time.as_secs_f64();
        ratios.push(ratio);
        rows.push(format!(
            "| full #{}: failoverd {} ({} sent, {} on the wire; CPU conode {} ms, a {} ms, b {} ms) | scp {} ({} on the wire), rsync {} | {ratio:.2}× |",
            round + 1,
            secs(f.time),
            mb(f.sent),
            mb(f.wire),
            f.cpu[0],
            f.cpu[1],
            f.cpu[2],
            secs(scp.0),
            mb(scp.1),
            secs(rs.0),
        ));
    }
    // The same copy made durable, as failoverd's install is.
    let (scp_sync, _, _) = measured(
        p.lab.a(),
        &format!(
            "scp -q {ssh} {image} {t}:{b}/scp2.db && ssh {ssh} {t} sync -f {b}/scp2.db",
            t = sshd.target(),
            b = base.display()
        ),
    );
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    println!();
    println!(
        "failoverd snapshot shipping: a {} conode database file, whose page image is {} ({} of 64 KiB block records), namespaces a→b over a veth:",
        mb(db_size),
        mb(size),
        mb(records)
    );
    println!("| full snapshot: take+ship+verify+install (fsync) from nothing shipped | baselines, same round, same image | faster baseline ÷ failoverd |");
    println!("|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!(
        "| full: median of {} rounds | | {:.2}× (min {:.2}×; target ≥ 1.5×) |",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[0]
    );
    println!(
        "| full: scp, then sync -f on b (durable), once | {} | |",
        secs(scp_sync)
    );
    println!("| incremental | time | bytes sent | bytes on the wire | ratio |");
    println!("|---|---|---|---|---|");

    // 1% more, appended through the conode, three times: the standby holds `keep` (3)
    // generations from the third on and rewrites the oldest in place (steady state).
    let blocks = (size / 100).div_ceil(BLOCK as u64);
    for round in 1..=if increments { 3 } else { 0 } {
        std::fs::copy(&image, p.path("previous-image.db")).unwrap();
        p.grow(blocks, BLOCK);
        let (inc, inc_wire, _) = measured(p.lab.a(), &fo);
        let inc_sent = last_bytes_sent(&p);
        let changed = differing_bytes(&p.path("previous-image.db"), Path::new(&image));
        warm(p.lab.a(), &image);
        let (rs_inc, rs_inc_wire, out) = measured(
            p.lab.a(),
            &format!(
                "rsync -e 'ssh {ssh}' --no-whole-file -I --stats {image} {}:{}/rsync.db",
                sshd.target(),
                base.display()
            ),
        );
        let rs_inc_sent = failoverd::live::rsync_bytes_sent(&out).unwrap();
        println!("| +1% #{round} ({blocks} blocks = {}; {} of 4 KiB pages changed): failoverd | {} | {} ({:.2}× changed) | {} | {:.2}× as fast as rsync (target ≥ 2×) |", mb(blocks * BLOCK as u64), mb(changed), secs(inc), mb(inc_sent), inc_sent as f64 / changed as f64, mb(inc_wire), rs_inc.as_secs_f64() / inc.as_secs_f64());
        println!(
            "| +1% #{round}: rsync --no-whole-file | {} | {} ({:.2}× changed) | {} | |",
            secs(rs_inc),
            mb(rs_inc_sent),
            rs_inc_sent as f64 / changed as f64,
            mb(rs_inc_wire)
        );
    }
    print_log_lines(&p);
}

/// Read `file` into the page cache, unmeasured: failoverd's mirror is written around the
/// page cache, while the conode's database, which failoverd reads, is in it. The baselines
/// read from memory too.
fn warm(h: &Host, file: &str) {
    ok(h, &format!("cat {file} > /dev/null"));
}

/// One full snapshot from nothing shipped.
struct Full {
    time: Duration,
    /// Chunk bytes failoverd sent, and bytes that left a's interface.
    sent: u64,
    wire: u64,
    /// CPU ms of the conode, failoverd a and failoverd b (new processes: start-up included).
    cpu: [u64; 3],
}

/// Restart both failoverds with nothing shipped (see
/// `Pair::restart_failoverds_from_nothing`): a's start-up snapshot is a whole image. Timed
/// from a's start until the standby's generations directory holds its manifest (written
/// last, after the fsync'd install).
fn full_failoverd(p: &mut Pair) -> Full {
    let conode0 = p.cpu_ms()[0];
    let tx0 = tx_bytes(p.lab.a());
    let t = p.restart_failoverds_from_nothing();
    let gens = p.path("b/state/generations");
    let deadline = t + Duration::from_secs(300);
    loop {
        let done = std::fs::read_dir(&gens).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".manifest")))
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no generation installed on b within 300 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let time = t.elapsed();
    let cpu = p.cpu_ms();
    // a's status says what it sent once it has the standby's answer.
    let mut sent = 0;
    wait_for("a's status of the full snapshot", || {
        sent = p
            .status("a")
            .ok()
            .and_then(|s| s.at(&["bytes_sent"]).and_then(|v| v.as_u64()))
            .unwrap_or(0);
        sent > 0
    });
    Full {
        time,
        sent,
        wire: tx_bytes(p.lab.a()) - tx0,
        cpu: [cpu[0] - conode0, cpu[1], cpu[2]],
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn print_log_lines(p: &Pair) {
    for l in p
        .log("failoverd-a.log")
        .lines()
        .filter(|l| l.contains("installed on the peer"))
    {
        println!("  a: {}", l.trim());
    }
    for l in p
        .log("failoverd-b.log")
        .lines()
        .filter(|l| l.contains("integrity-checked"))
    {
        println!("  b: {}", l.trim());
    }
}

/// The index of `chain` in the newest installed generation on b.
fn installed_index(p: &Pair) -> u64 {
    let dir = p.path("b/state/generations");
    let Some(newest) = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "manifest"))
        .max()
    else {
        return 0;
    };
    let Ok(env) = std::fs::read(&newest) else {
        return 0;
    };
    let key = conode::keys::parse_hex32(&p.key_a).unwrap();
    let Ok(m) = failoverd::manifest::Manifest::open(&env, &key) else {
        return 0;
    };
    m.positions
        .iter()
        .find(|c| hex::encode(c.chain) == p.chain)
        .map(|c| c.index as u64)
        .unwrap_or(0)
}

fn rpo(mib: u64) {
    let mut p = Pair::start("frpo", "https", "2s");
    p.grow(1, BLOCK);
    fill(&mut p, mib);
    // The whole database is shipped once before measuring.
    p.snapshot();
    let size = std::fs::metadata(p.path("a/state/outgoing/image.db"))
        .unwrap()
        .len();
    let mut samples = Vec::new();
    for pause_ms in [300u64, 1700, 900, 2300, 500, 1300, 2900, 100, 1100, 2000] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        let t0 = Instant::now();
        p.grow(1, BLOCK);
        let want = p.index;
        let deadline = t0 + Duration::from_secs(60);
        while installed_index(&p) < want {
            assert!(
                Instant::now() < deadline,
                "block {want} not on the standby within 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        samples.push(t0.elapsed());
    }
    samples.sort();
    println!();
    println!(
        "RPO, a {} database, default settings (interval 2 s, https), {} appends of 64 KiB at varied moments: p50 {}, max {} (target ≤ 5 s)",
        mb(size),
        samples.len(),
        secs(samples[samples.len() / 2]),
        secs(*samples.last().unwrap())
    );
}
