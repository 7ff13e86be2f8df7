//! The network-namespace lab (`system_tests::netns`) that failoverd's system tests stand
//! on: two hosts joined by a veth cable, a real sshd, rsync and scp between them, and
//! the faults (link down, silent partition) those tests will inject. Runs as root.
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::netns::{Lab, Sshd};
use system_tests::Run;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

fn ns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Bytes that neither compress nor repeat (xorshift64), so rsync's delta is all we see.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn ok(r: Run, what: &str) -> Run {
    assert_eq!(
        r.code,
        Some(0),
        "{what} failed:\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    r
}

/// `sha256sum PATH` run in `host`: the hash as that host sees the file.
fn sha256_on(host: &system_tests::netns::Host, path: &Path) -> String {
    let r = ok(
        host.sh(
            &format!("sha256sum {}", path.display()),
            Duration::from_secs(20),
        ),
        "sha256sum",
    );
    r.stdout
        .split_whitespace()
        .next()
        .expect("sha256sum prints a hash")
        .to_string()
}

/// The number in rsync's `--stats` line `label: 1,234 bytes`.
fn stat(stats: &str, label: &str) -> u64 {
    let line = stats
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in rsync --stats output:\n{stats}"));
    let (_, value) = line.split_once(':').expect("label: value");
    let digits: String = value
        .split_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|e| panic!("{label:?} in {line:?}: {e}"))
}

/// `ssh TARGET true` from host a, bounded.
fn ssh_true(lab: &Lab, sshd: &Sshd) -> Run {
    let mut cmd = lab.a().command("ssh");
    cmd.args(sshd.ssh_args()).arg(sshd.target()).arg("true");
    run(cmd, "ssh true", Duration::from_secs(20))
}

fn run(mut cmd: std::process::Command, what: &str, timeout: Duration) -> Run {
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    system_tests::wait_bounded(child, b"", timeout, what)
}

#[test]
fn host_a_reaches_host_b_over_tcp_and_the_namespaces_vanish_with_the_lab() {
    let lab = Lab::new("tcp");
    let (a, b) = (lab.a(), lab.b());
    let (ns_a, ns_b) = (a.ns().to_string(), b.ns().to_string());
    assert_ne!(ns_a, ns_b);
    assert!(ns_exists(&ns_a) && ns_exists(&ns_b));

    let listener = b
        .in_ns(|| TcpListener::bind((b.addr(), 0)))
        .expect("bind in b");
    let port = listener.local_addr().unwrap().port();
    // bash's /dev/tcp, run by `ip netns exec` in a: the path tests' tools will take.
    ok(
        a.sh(
            &format!("echo hello-from-a > /dev/tcp/{}/{port}", b.addr()),
            Duration::from_secs(10),
        ),
        "bash /dev/tcp from a",
    );
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("no connection from a within 10 s: {e}"),
        }
    };
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(a.addr()),
        "the peer is host a"
    );
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello-from-a\n");

    // The lab's addresses do not exist outside it: a has no route but the cable's.
    let routes = ok(a.sh("ip -4 route", Duration::from_secs(5)), "ip route in a");
    assert_eq!(
        routes.stdout.lines().count(),
        1,
        "only the cable's /24: {}",
        routes.stdout
    );

    // Sockets keep a namespace alive: close them first, as tests should.
    drop((conn, listener));
    drop(lab);
    assert!(!ns_exists(&ns_a) && !ns_exists(&ns_b));
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !list.contains(&ns_a) && !list.contains(&ns_b),
        "ip netns list: {list}"
    );
}

#[test]
fn a_panicking_test_still_kills_its_children_and_deletes_its_namespaces() {
    let lab = Lab::new("unwind");
    let names = (lab.a().ns().to_string(), lab.b().ns().to_string());
    let mut cmd = lab.b().command("sleep");
    cmd.arg("600");
    let sleeper = lab.b().spawn(cmd);
    assert!(sleeper.try_wait().is_none(), "sleep 600 runs");

    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _lab = lab;
        panic!("a test fails while its lab is up");
    }));
    assert!(unwound.is_err());
    let st = sleeper
        .wait_timeout(Duration::from_secs(5))
        .expect("the lab reaped sleep 600");
    assert!(!st.success(), "killed, not finished: {st}");
    assert!(!ns_exists(&names.0) && !ns_exists(&names.1), "{names:?}");
}

#[test]
fn rsync_over_ssh_sends_only_the_changed_page_and_scp_copies_exactly() {
    let lab = Lab::new("rsync");
    let (a, b) = (lab.a(), lab.b());
    let tmp = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(b, &tmp.path().join("sshd"));
    // Both hosts share the file system; each side keeps to its own directory.
    let on_a = tmp.path().join("on-a");
    let on_b = tmp.path().join("on-b");
    std::fs::create_dir_all(&on_a).unwrap();
    std::fs::create_dir_all(&on_b).unwrap();

    let snap = on_a.join("snapshot.redb");
    std::fs::write(&snap, noise(4 * MIB, 0x5eed)).unwrap();
    let rsync = |what: &str| {
        let mut cmd = a.command("rsync");
        cmd.args(["--no-whole-file", "--ignore-times", "--stats", "-e"])
            .arg(sshd.ssh_command())
            .arg(&snap)
            .arg(format!("{}:{}/", sshd.target(), on_b.display()));
        ok(run(cmd, what, Duration::from_secs(60)), what).stdout
    };

    let first = rsync("first rsync");
    assert_eq!(stat(&first, "Literal data"), (4 * MIB) as u64, "{first}");
    let remote = on_b.join("snapshot.redb");
    assert_eq!(sha256_on(a, &snap), sha256_on(b, &remote));

    // One page in the middle changes, as a database commit would.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
        f.seek(SeekFrom::Start((MIB + 5 * PAGE) as u64)).unwrap();
        f.write_all(&noise(PAGE, 0xfeed)).unwrap();
    }
    assert_ne!(sha256_on(a, &snap), sha256_on(b, &remote));
    let second = rsync("second rsync");
    let literal = stat(&second, "Literal data");
    let matched = stat(&second, "Matched data");
    assert!(
        literal >= PAGE as u64 && literal <= 4 * PAGE as u64,
        "one changed page should cost about one page of literal data, got {literal}:\n{second}"
    );
    assert!(matched >= (4 * MIB - 4 * PAGE) as u64, "{second}");
    assert_eq!(sha256_on(a, &snap), sha256_on(b, &remote));

    // scp pushes a file to b and pulls it back (SFTP protocol, OpenSSH >= 9).
    let conf = on_a.join("failoverd.toml");
    std::fs::write(&conf, noise(100_000, 7)).unwrap();
    let pushed = on_b.join("pushed.toml");
    let mut cmd = a.command("scp");
    cmd.args(sshd.ssh_args())
        .arg(&conf)
        .arg(format!("{}:{}", sshd.target(), pushed.display()));
    ok(run(cmd, "scp push", Duration::from_secs(30)), "scp push");
    assert_eq!(sha256_on(a, &conf), sha256_on(b, &pushed));

    let pulled = on_a.join("pulled.toml");
    let mut cmd = a.command("scp");
    cmd.args(sshd.ssh_args())
        .arg(format!("{}:{}", sshd.target(), pushed.display()))
        .arg(&pulled);
    ok(run(cmd, "scp pull", Duration::from_secs(30)), "scp pull");
    assert_eq!(sha256_on(a, &pulled), sha256_on(a, &conf));
    assert!(
        sshd.log_text().trim().is_empty(),
        "sshd: {}",
        sshd.log_text()
    );
}

#[test]
fn link_down_fails_connections_at_once_and_link_up_restores_them() {
    let lab = Lab::new("link");
    let tmp = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(lab.b(), tmp.path());
    let to = SocketAddr::from((lab.b().addr(), 22));
    ok(ssh_true(&lab, &sshd), "ssh before link_down");

    lab.link_down();
    let t0 = Instant::now();
    let err = lab
        .a()
        .connect(to, Duration::from_secs(3))
        .expect_err("no connection over a cable that is down");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "fails at once, not by timeout: {err} after {:?}",
        t0.elapsed()
    );
    let r = ssh_true(&lab, &sshd);
    assert_eq!(r.code, Some(255), "ssh over a down link: {}", r.stderr);

    lab.link_up();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = lab.a().connect(to, Duration::from_secs(1)) {
        assert!(
            Instant::now() < deadline,
            "no connection 10 s after link_up: {e}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(ssh_true(&lab, &sshd), "ssh after link_up");
}

#[test]
fn a_partition_makes_connections_time_out_and_heal_restores_them() {
    let lab = Lab::new("partition");
    let (a, b) = (lab.a(), lab.b());
    let listener = b
        .in_ns(|| TcpListener::bind((b.addr(), 0)))
        .expect("bind in b");
    let to = listener.local_addr().unwrap();
    a.connect(to, Duration::from_secs(2))
        .expect("connect before the partition");

    lab.partition();
    let t0 = Instant::now();
    let err = a
        .connect(to, Duration::from_millis(700))
        .expect_err("no connection across a partition");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "silently dropped: {err}");
    assert!(t0.elapsed() >= Duration::from_millis(600));

    lab.heal();
    a.connect(to, Duration::from_secs(5))
        .expect("connect after heal");
}

#[test]
fn two_labs_at_once_have_their_own_namespaces_and_sshds() {
    let (l1, l2) = (Lab::new("twin"), Lab::new("twin"));
    let names = [l1.a().ns(), l1.b().ns(), l2.a().ns(), l2.b().ns()];
    for (i, n) in names.iter().enumerate() {
        assert!(!names[i + 1..].contains(n), "{n} twice in {names:?}");
    }
    let (t1, t2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, s2) = (
        Sshd::start(l1.b(), t1.path()),
        Sshd::start(l2.b(), t2.path()),
    );
    ok(ssh_true(&l1, &s1), "ssh in lab 1");
    ok(ssh_true(&l2, &s2), "ssh in lab 2");
    assert_ne!(s1.pid(), s2.pid());
}

#[test]
fn netem_delays_packets_or_names_the_missing_kernel_option() {
    let lab = Lab::new("netem");
    let (a, b) = (lab.a(), lab.b());
    let listener = b
        .in_ns(|| TcpListener::bind((b.addr(), 0)))
        .expect("bind in b");
    let to = listener.local_addr().unwrap();
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lab.netem(&["delay", "200ms"])
    }));
    match applied {
        Ok(()) => {
            // The SYN leaves a 200 ms late; the answer comes straight back.
            let t0 = Instant::now();
            a.connect(to, Duration::from_secs(5))
                .expect("connect through netem");
            assert!(
                t0.elapsed() >= Duration::from_millis(180),
                "{:?}",
                t0.elapsed()
            );
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| format!("{p:?}"));
            assert!(
                msg.contains("CONFIG_NET_SCH_NETEM"),
                "netem failed for another reason than a kernel without it: {msg}"
            );
        }
    }
    lab.clear_netem();
    let t0 = Instant::now();
    a.connect(to, Duration::from_secs(5))
        .expect("connect without netem");
    assert!(
        t0.elapsed() < Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
}
