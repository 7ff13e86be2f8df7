//! `failoverd::unreach::answer_strays` against real kernels: hosts a and b and a client c
//! in network namespaces on one bridge (`system_tests::netns::Lab::with_client`).
//!
//! Each test puts the VIP on a by hand, lets c reach it once (so c's neighbour entry for
//! the VIP points at a's MAC), and takes it off a again: c's connection attempts still
//! go to a. The control shows the problem: nothing answers them, a connect times out.
//! Then, with `answer_strays` running in a, the same connect fails at once with
//! EHOSTUNREACH, and the ICMP error that ended it is read on c's link: from a's MAC and
//! a's own address (never the VIP), quoting the SYN for the VIP. Needs root: without it
//! the lab fails the test with the reason.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use failoverd::arp::{Frame, PacketSocket, ETH_P_IP, ETH_P_IPV6};
use failoverd::unreach::answer_strays;
use failoverd::vip::Vip;
use system_tests::netns::{Host, Lab};

/// The port c tries on the VIP.
const PORT: u16 = 7770;
/// How long `answer_strays` runs in each test.
const WINDOW: Duration = Duration::from_secs(3);
/// The control's connect timeout: below TCP's 1 s SYN retransmission, far above a
/// round trip on the bridge.
const CONTROL_WAIT: Duration = Duration::from_millis(600);
/// The connect timeout while a answers: an answer that came only for a retransmitted
/// SYN (1 s) would be too late.
const ANSWERED_WAIT: Duration = Duration::from_millis(900);
/// How soon the connect must fail while a answers.
const AT_ONCE: Duration = Duration::from_millis(200);
/// EHOSTUNREACH on Linux.
const EHOSTUNREACH: i32 = 113;

/// Run `f` on a tokio runtime of its own, on a thread inside `host`'s namespace.
fn on<T: Send, F: Future<Output = T>>(host: &Host, f: impl FnOnce() -> F + Send) -> T {
    host.in_ns(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(f())
    })
}

fn sh(h: &Host, script: &str) -> String {
    let r = h.sh(script, Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "`{script}` in {}: {}", h.ns(), r.stderr);
    r.stdout
}

/// The interface index of eth0 in `h`.
fn ifindex(h: &Host) -> u32 {
    let out = sh(h, "cat /sys/class/net/eth0/ifindex");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("an ifindex for eth0 in {}: {out:?}", h.ns()))
}

/// Wait (at most 5 s) until `h` has an `AF_PACKET` datagram socket for `ethertype`:
/// `answer_strays` is listening.
fn wait_for_packet_socket(h: &Host, ethertype: u16) {
    let want = format!("{ethertype:04x}");
    let start = Instant::now();
    loop {
        // /proc/thread-self/net is the namespace of the thread that reads it.
        let table = h
            .in_ns(|| std::fs::read_to_string("/proc/thread-self/net/packet"))
            .expect("/proc/thread-self/net/packet");
        // sk RefCnt Type Proto Iface ...: Type 2 is SOCK_DGRAM.
        let listening = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&"2") && f.get(3) == Some(&want.as_str())
        });
        if listening {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "answer_strays opened no packet socket for {want} in {} within 5 s: {table}",
            h.ns()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The IPv4 VIP `10.X.Y.100/24` in the lab's subnet (a is `.1`, c is `.3`).
fn vip4(lab: &Lab) -> Vip {
    let o = lab.a().addr().octets();
    let addr = Ipv4Addr::new(o[0], o[1], o[2], 100);
    Vip::parse("eth0", &format!("{addr}/24")).expect("the lab's VIP parses")
}

/// Give the hosts an IPv6 address ([`Lab::add_ipv6`]), and return a's and c's with the
/// VIP `fdXX::100/64`.
fn vip6(lab: &Lab) -> (Vip, Ipv6Addr, Ipv6Addr) {
    let net = lab.add_ipv6();
    let addr = |n: u32| -> Ipv6Addr {
        format!("{net}{n}")
            .parse()
            .expect("the lab's IPv6 address parses")
    };
    let vip = Vip::parse("eth0", &format!("{net}100/64")).expect("the lab's IPv6 VIP parses");
    (vip, addr(1), addr(3))
}

/// The ICMP error c received, as read on c's link.
#[derive(Debug)]
struct Seen {
    from_mac: String,
    src: IpAddr,
    dst: IpAddr,
    kind: (u8, u8),
    /// Destination address and TCP destination port of the quoted packet.
    quoted_to: Option<SocketAddr>,
}

/// The ICMP (IPv4) or ICMPv6 error in `frame`, if it is one.
fn icmp_error(frame: &Frame) -> Option<Seen> {
    let p = &frame.payload;
    let from_mac = frame.from.to_string();
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            if *p.get(9)? != 1 {
                return None;
            }
            let ip4 = |i: usize| -> Option<IpAddr> {
                let o: [u8; 4] = p.get(i..i + 4)?.try_into().ok()?;
                Some(IpAddr::from(o))
            };
            let icmp = p.get(ihl..)?;
            let inner = icmp.get(8..)?;
            let inner_ihl = usize::from(inner.first()? & 0x0f) * 4;
            let port = inner.get(inner_ihl + 2..inner_ihl + 4)?;
            let quoted_dst: [u8; 4] = inner.get(16..20)?.try_into().ok()?;
            Some(Seen {
                from_mac,
                src: ip4(12)?,
                dst: ip4(16)?,
                kind: (*icmp.first()?, *icmp.get(1)?),
                quoted_to: Some(SocketAddr::new(
                    IpAddr::from(quoted_dst),
                    u16::from_be_bytes([port[0], port[1]]),
                )),
            })
        }
        6 => {
            if *p.get(6)? != 58 {
                return None;
            }
            let ip6 = |b: &[u8], i: usize| -> Option<IpAddr> {
                let o: [u8; 16] = b.get(i..i + 16)?.try_into().ok()?;
                Some(IpAddr::from(o))
            };
            let icmp = p.get(40..)?;
            // Errors are types 0 to 127; Neighbour Discovery and echo are not.
            if *icmp.first()? >= 128 {
                return None;
            }
            let inner = icmp.get(8..)?;
            let port = inner.get(42..44)?;
            Some(Seen {
                from_mac,
                src: ip6(p, 8)?,
                dst: ip6(p, 24)?,
                kind: (*icmp.first()?, *icmp.get(1)?),
                quoted_to: Some(SocketAddr::new(
                    ip6(inner, 24)?,
                    u16::from_be_bytes([port[0], port[1]]),
                )),
            })
        }
        _ => None,
    }
}

/// From c: connect to `to` (at most `wait`), with a packet socket on c's link open
/// first; returns the connect's outcome, how long it took, and the first ICMP error
/// c received (read for at most 1 s after the connect).
fn connect_and_watch(
    c: &Host,
    to: SocketAddr,
    wait: Duration,
) -> (io::Result<std::net::TcpStream>, Duration, Option<Seen>) {
    let index = ifindex(c);
    let ethertype = if to.is_ipv4() { ETH_P_IP } else { ETH_P_IPV6 };
    on(c, || async move {
        let sock = PacketSocket::open(index, ethertype).expect("a packet socket in c");
        let t = Instant::now();
        // Blocking here is fine: the kernel queues c's frames in `sock` meanwhile.
        let outcome = std::net::TcpStream::connect_timeout(&to, wait);
        let took = t.elapsed();
        let seen = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let frame = sock.recv().await.expect("read c's link");
                if let Some(seen) = icmp_error(&frame) {
                    return seen;
                }
            }
        })
        .await
        .ok();
        (outcome, took, seen)
    })
}

/// The test itself, for either family: `own` is a's address on eth0, `client` c's.
fn stray_connects_fail_at_once(lab: &Lab, vip: &Vip, own: IpAddr, client: IpAddr) {
    let (a, c) = (lab.a(), lab.client());
    let to = SocketAddr::new(vip.addr, PORT);
    let nodad = if vip.addr.is_ipv6() { " nodad" } else { "" };
    sh(a, &format!("ip addr add {} dev eth0{nodad}", vip.cidr()));
    // c reaches the VIP on a once: its neighbour entry for the VIP is a's MAC.
    let listener = a
        .in_ns(|| TcpListener::bind(to))
        .expect("a listens on the VIP");
    c.connect(to, Duration::from_secs(5))
        .expect("c reaches the VIP while a holds it");
    drop(listener);
    let neigh = sh(c, &format!("ip neigh show {} dev eth0", vip.addr));
    assert!(
        neigh.contains(&a.mac()),
        "c's entry for the VIP points at a ({}): {neigh}",
        a.mac()
    );
    sh(a, &format!("ip addr del {} dev eth0", vip.cidr()));

    // Control: a drops the SYN without a word, and c would wait for its retransmission.
    let (outcome, took, seen) = connect_and_watch(c, to, CONTROL_WAIT);
    let e = outcome.expect_err("nobody holds the VIP: the control connect cannot succeed");
    assert_eq!(
        e.kind(),
        io::ErrorKind::TimedOut,
        "without answers the connect times out (after {took:?}): {e}"
    );
    assert!(seen.is_none(), "nothing answers the SYN: {seen:?}");
    eprintln!("control: connect to {to} timed out after {took:?}, no ICMP seen");

    std::thread::scope(|s| {
        let answering = s.spawn(|| {
            let t = Instant::now();
            let answered = on(a, || answer_strays(vip, WINDOW));
            (answered, t.elapsed())
        });
        let ethertype = if vip.addr.is_ipv4() {
            ETH_P_IP
        } else {
            ETH_P_IPV6
        };
        wait_for_packet_socket(a, ethertype);
        let (outcome, took, seen) = connect_and_watch(c, to, ANSWERED_WAIT);
        // Linux aborts a SYN-SENT connection on ICMP host unreachable (IPv4) and on
        // ICMPv6 address unreachable alike: both are EHOSTUNREACH.
        let e = outcome.expect_err("nobody holds the VIP: the connect cannot succeed");
        assert_eq!(
            (e.kind(), e.raw_os_error()),
            (io::ErrorKind::HostUnreachable, Some(EHOSTUNREACH)),
            "the connect fails with EHOSTUNREACH (after {took:?}): {e}"
        );
        assert!(
            took < AT_ONCE,
            "the connect fails at once: {took:?} (limit {AT_ONCE:?})"
        );
        eprintln!("answered: connect to {to} failed after {took:?}: {e}");
        let seen = seen.expect("c received the ICMP error");
        let want_kind = if vip.addr.is_ipv4() { (3, 1) } else { (1, 3) };
        assert_eq!(seen.kind, want_kind, "{seen:?}");
        assert_eq!(seen.from_mac, a.mac(), "sent by a: {seen:?}");
        assert_eq!(
            (seen.src, seen.dst),
            (own, client),
            "from a's own address (never the VIP) to c: {seen:?}"
        );
        assert_eq!(
            seen.quoted_to,
            Some(to),
            "quoting the SYN for the VIP: {seen:?}"
        );

        let (answered, ran) = answering.join().expect("the answering thread");
        let answered = answered.expect("answer_strays");
        eprintln!("answer_strays answered {answered} in {ran:?}");
        assert!(answered >= 1, "it counts what it answered: {answered}");
        assert!(
            ran >= WINDOW && ran < WINDOW + Duration::from_secs(1),
            "it ends by itself when its window has passed: {ran:?} for {WINDOW:?}"
        );
    });
}

#[test]
fn ipv4_stray_connect_fails_at_once_with_host_unreachable() {
    let lab = Lab::with_client("unreach4");
    let vip = vip4(&lab);
    let own = IpAddr::V4(lab.a().addr());
    let client = IpAddr::V4(lab.client().addr());
    stray_connects_fail_at_once(&lab, &vip, own, client);
}

#[test]
fn ipv6_stray_connect_fails_at_once_with_address_unreachable() {
    let lab = Lab::with_client("unreach6");
    let (vip, own, client) = vip6(&lab);
    stray_connects_fail_at_once(&lab, &vip, IpAddr::V6(own), IpAddr::V6(client));
}

#[test]
fn refuses_to_answer_while_the_vip_is_on_the_interface() {
    let lab = Lab::new("unreach-held");
    let vip = vip4(&lab);
    let a = lab.a();
    sh(a, &format!("ip addr add {} dev eth0", vip.cidr()));
    let t = Instant::now();
    let got = on(a, || answer_strays(&vip, WINDOW));
    let e = got.expect_err("a holds the VIP: answering for it would break its connections");
    assert!(
        e.starts_with(&format!(
            "refusing to answer connection attempts for {}",
            vip.addr
        )) && e.contains("still on eth0"),
        "{e}"
    );
    assert!(t.elapsed() < WINDOW, "refused at once: {:?}", t.elapsed());
}
