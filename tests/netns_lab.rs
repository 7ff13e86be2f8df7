//! The network-namespace lab (`system_tests::netns`) that failoverd's system tests stand
//! on: two hosts joined by a veth cable, a real sshd, rsync and scp between them, and
//! the faults (link down, silent partition, packet loss, delay) those tests will inject.
//! Each fault is shown to take effect on this machine's kernel. Runs as root.
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
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

/// Send `n` numbered datagrams from `from` to `to` (a socket bound in the other host),
/// 100 µs apart so no queue overflows, and return how many distinct ones arrived.
fn datagrams_through(
    from: &system_tests::netns::Host,
    to: &system_tests::netns::Host,
    n: u32,
) -> u32 {
    let rx = to
        .in_ns(|| UdpSocket::bind((to.addr(), 0)))
        .expect("bind a UDP socket");
    let dest = rx.local_addr().unwrap();
    // Nothing more arrives once 300 ms pass without a datagram.
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    std::thread::scope(|s| {
        let counter = s.spawn(|| {
            let mut seen = std::collections::HashSet::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 64];
            while Instant::now() < deadline {
                match rx.recv(&mut buf) {
                    Ok(4) => {
                        seen.insert(u32::from_le_bytes(buf[..4].try_into().unwrap()));
                    }
                    Ok(len) => panic!("a datagram of {len} bytes, not ours"),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            }
            seen.len() as u32
        });
        from.in_ns(|| {
            let tx = UdpSocket::bind((from.addr(), 0)).expect("bind the sender");
            for i in 0..n {
                tx.send_to(&i.to_le_bytes(), dest).expect("send_to");
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        counter.join().unwrap()
    })
}

#[test]
fn loss_drops_about_that_share_of_packets_each_way_and_clear_loss_none() {
    let lab = Lab::new("loss");
    let (a, b) = (lab.a(), lab.b());
    // Neighbours resolved, so the first datagrams do not wait for ARP.
    assert_eq!(datagrams_through(a, b, 20), 20, "no loss before lab.loss");

    lab.loss(50);
    // 400 packets at 50 %: 200 expected, standard deviation 10.
    for (from, to, way) in [(a, b, "a to b"), (b, a, "b to a")] {
        let got = datagrams_through(from, to, 400);
        assert!(
            (130..=270).contains(&got),
            "with 50 % loss {got} of 400 datagrams arrived {way}: the nftables rule did \
             not take effect as it should"
        );
    }
    lab.loss(100);
    assert_eq!(
        datagrams_through(a, b, 50),
        0,
        "100 % loss lets nothing through"
    );
    lab.loss(0);
    assert_eq!(datagrams_through(a, b, 50), 50, "0 % loss loses nothing");
    lab.loss(50);

    lab.clear_loss();
    lab.clear_loss(); // harmless twice
    for (from, to, way) in [(a, b, "a to b"), (b, a, "b to a")] {
        assert_eq!(
            datagrams_through(from, to, 200),
            200,
            "no loss after clear_loss, {way}"
        );
    }
}

/// Connect from a to `to`, send `ping\n`, and read the answer; with how long it took.
fn ping(a: &system_tests::netns::Host, to: SocketAddr) -> (String, Duration) {
    a.in_ns(|| {
        let t0 = Instant::now();
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"ping\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("answer from {to}: {e}"));
        (answer, t0.elapsed())
    })
}

/// Answer `count` connections on `listener` (in b) with `pong\n` after reading `ping\n`.
fn serve_pongs(listener: &TcpListener, count: usize) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..count {
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("no connection within 20 s: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut req = String::new();
        conn.read_to_string(&mut req).unwrap();
        assert_eq!(req, "ping\n");
        conn.write_all(b"pong\n").unwrap();
    }
}

#[test]
fn a_delayed_relay_holds_each_way_for_its_delay_and_the_direct_path_stays_fast() {
    let lab = Lab::new("delay");
    let (a, b) = (lab.a(), lab.b());
    let listener = b
        .in_ns(|| TcpListener::bind((b.addr(), 0)))
        .expect("bind in b");
    let to = listener.local_addr().unwrap();
    let delay = Duration::from_millis(300);
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_pongs(&listener, 3));
        let (answer, direct) = ping(a, to);
        assert_eq!(answer, "pong\n");
        assert!(
            direct < Duration::from_millis(100),
            "without the relay a request and its answer take {direct:?}"
        );

        let relay = lab.delayed_relay(to, delay);
        assert_eq!(relay.to(), to);
        for _ in 0..2 {
            let (answer, through) = ping(a, relay.addr());
            assert_eq!(answer, "pong\n", "the relay passes the bytes unchanged");
            // The request is held once on its way to b, the answer once on its way back.
            assert!(
                through >= 2 * delay && through < 2 * delay + Duration::from_secs(2),
                "through a relay of {delay:?} each way a request and its answer took \
                 {through:?}"
            );
        }
        let t0 = Instant::now();
        drop(relay);
        assert!(
            t0.elapsed() < delay + Duration::from_secs(1),
            "the relay took {:?} to stop",
            t0.elapsed()
        );
        server.join().unwrap();
    });
}
