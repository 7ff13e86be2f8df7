//! The virtual IP's IO shell (`failoverd::vip`) and the checker of record
//! (`system_tests::addrwatch`) against real kernels: two hosts in network namespaces
//! joined by a veth cable (`system_tests::netns::Lab`). Every address lives inside the
//! lab's namespaces; nothing is sent from the root namespace. Needs root: without it
//! the lab fails the test with the reason.
//!
//! The VIP of each test is `10.X.Y.100/24` in the lab's own subnet (hosts a and b are
//! `.1` and `.2`), or `fdXX::100/64` for IPv6 (the test gives both hosts an IPv6
//! address first).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use failoverd::vip::{Dad, Mac, Presence, ProbeTimers, Vip, VipError, FAILOVERD_IFA_PROTO};
use futures_util::StreamExt;
use system_tests::addrwatch::{AddrWatch, Counting};
use system_tests::netns::{Host, Lab};

/// Run `f` on a tokio runtime of its own, on a thread inside `host`'s namespace (so
/// every socket it makes is that host's).
fn on<T: Send, F: Future<Output = T>>(host: &Host, f: impl FnOnce() -> F + Send) -> T {
    host.in_ns(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(f())
    })
}

fn vip4(lab: &Lab) -> Vip {
    let o = lab.a().addr().octets();
    let addr = Ipv4Addr::new(o[0], o[1], o[2], 100);
    Vip::parse("eth0", &format!("{addr}/24")).expect("the lab's VIP parses")
}

/// Give the hosts an IPv6 address on the cable ([`Lab::add_ipv6`]) and return the VIP
/// `fdXX::100/64`.
fn vip6(lab: &Lab) -> Vip {
    let net = lab.add_ipv6();
    Vip::parse("eth0", &format!("{net}100/64")).expect("the lab's IPv6 VIP parses")
}

fn sh(h: &Host, script: &str) -> String {
    let r = h.sh(script, Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "`{script}` in {}: {}", h.ns(), r.stderr);
    r.stdout
}

fn mac(h: &Host) -> Mac {
    h.mac().parse().expect("ip shows a MAC")
}

/// `ip addr show` of eth0 in `h`.
fn addrs(h: &Host) -> String {
    sh(h, "ip addr show dev eth0")
}

/// The `IFA_PROTO` of `addr` on `h`'s interfaces, read straight from a netlink dump
/// (iproute2 6.1 does not show it), or `None` if the address is absent; `Some(0)` if
/// present without the attribute.
fn ifa_proto(h: &Host, addr: IpAddr) -> Option<u8> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::address::AddressAttribute;
    on(h, || async move {
        let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
        let task = tokio::spawn(conn);
        let all: Vec<_> = handle
            .address()
            .get()
            .set_address_filter(addr)
            .execute()
            .try_collect()
            .await
            .expect("address dump");
        task.abort();
        all.first().map(|m| {
            m.attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Protocol(p) => Some(u8::from(*p)),
                    _ => None,
                })
                .unwrap_or(0)
        })
    })
}

/// Wait (at most `limit`, in 5 ms steps) until `cond()`; returns how long it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn add_and_remove_are_idempotent_and_tagged() {
    let lab = Lab::new("vip-tag");
    let vip = vip4(&lab);
    let a = lab.a();
    on(a, || async {
        assert_eq!(vip.present().await.unwrap(), Presence::Absent);
        vip.add().await.expect("first add");
        vip.add()
            .await
            .expect("second add of our own address is Ok");
        assert_eq!(
            vip.present().await.unwrap(),
            Presence::Present {
                ours: true,
                prefix: 24,
                dad: Dad::Done
            }
        );
    });
    let shown = addrs(a);
    assert!(
        shown.contains(&format!("inet {} ", vip.cidr())),
        "the VIP is on eth0: {shown}"
    );
    assert_eq!(
        ifa_proto(a, vip.addr),
        Some(FAILOVERD_IFA_PROTO),
        "tagged with IFA_PROTO {FAILOVERD_IFA_PROTO}"
    );
    on(a, || async {
        vip.remove().await.expect("remove ours");
        vip.remove()
            .await
            .expect("removing an absent address is Ok");
        assert_eq!(vip.present().await.unwrap(), Presence::Absent);
    });
    assert!(!addrs(a).contains(&vip.addr.to_string()));
    // The host's own address was never touched.
    assert!(addrs(a).contains(&format!("inet {}/24", a.addr())));
}

#[test]
fn remove_refuses_an_address_added_by_hand() {
    let lab = Lab::new("vip-hand");
    let vip = vip4(&lab);
    let a = lab.a();
    sh(a, &format!("ip addr add {} dev eth0", vip.cidr()));
    on(a, || async {
        let p = vip.present().await.unwrap();
        assert!(
            p.is_present() && !p.is_ours(),
            "by hand: present, not ours: {p:?}"
        );
        let e = vip
            .remove()
            .await
            .expect_err("an untagged address is never removed");
        assert!(matches!(e, VipError::NotOurs { .. }), "{e:?}");
        let line = e.to_string();
        assert!(
            line.starts_with(&format!("refusing to remove {}", vip))
                && line.contains("without failoverd's tag")
                && line.contains(&format!("ip addr del {} dev eth0", vip.cidr())),
            "{line}"
        );
        let e = vip.add().await.expect_err("nor adopted by add");
        assert!(matches!(e, VipError::NotOurs { .. }), "{e:?}");
    });
    assert_eq!(ifa_proto(a, vip.addr), Some(0), "still there, untagged");
}

#[test]
fn probe_returns_the_mac_of_an_impostor() {
    let lab = Lab::new("vip-probe");
    let vip = vip4(&lab);
    sh(lab.b(), &format!("ip addr add {} dev eth0", vip.cidr()));
    let timers = ProbeTimers::default();
    let (got, took) = on(lab.a(), || async {
        let t = Instant::now();
        let got = vip.probe(timers).await.expect("probe");
        (got, t.elapsed())
    });
    assert_eq!(got, Some(mac(lab.b())), "b holds the VIP: its MAC answers");
    eprintln!("probe answered by {} after {took:?}", lab.b().mac());
    assert!(
        took < timers.total(),
        "the first answer ends the probe: {took:?} (full probe {:?})",
        timers.total()
    );
    let refusal = VipError::Held {
        vip: vip.clone(),
        mac: mac(lab.b()),
    };
    assert_eq!(
        refusal.to_string(),
        format!(
            "refusing to claim {} on eth0: host {} answered the ARP probe",
            vip.cidr(),
            lab.b().mac()
        )
    );
}

#[test]
fn probe_finds_nobody_when_the_address_is_free_in_bounded_time() {
    let lab = Lab::new("vip-free");
    let vip = vip4(&lab);
    let timers = ProbeTimers::default();
    let (got, took) = on(lab.a(), || async {
        let t = Instant::now();
        (vip.probe(timers).await.expect("probe"), t.elapsed())
    });
    assert_eq!(got, None);
    assert!(
        took >= timers.total() && took < timers.total() + Duration::from_millis(300),
        "a free address costs the probe's whole time and no more: {took:?} for {:?}",
        timers.total()
    );
    assert!(
        !addrs(lab.a()).contains(&vip.addr.to_string()),
        "a probe adds nothing"
    );
}

#[test]
fn announce_moves_a_client_neighbour_entry_at_once() {
    let lab = Lab::new("vip-garp");
    let vip = vip4(&lab);
    let (a, client) = (lab.a(), lab.b());
    // The client knew the VIP at another MAC (the old holder): a stale entry.
    let wrong = "02:00:00:00:00:99";
    sh(
        client,
        &format!(
            "ip neigh replace {} lladdr {wrong} dev eth0 nud stale",
            vip.addr
        ),
    );
    on(a, || async { vip.add().await.expect("add") });
    // Control: adding alone does not move the client's entry (Linux sends nothing for a
    // secondary address), so what moves it below is the announcement.
    std::thread::sleep(Duration::from_millis(200));
    let before = sh(client, &format!("ip neigh show {} dev eth0", vip.addr));
    assert!(before.contains(wrong), "{before}");
    on(a, || async {
        vip.announce(3, Duration::from_millis(20))
            .await
            .expect("announce");
    });
    let want = a.mac();
    let mut shown = String::new();
    let took = within(
        Duration::from_millis(500),
        "the client's entry to move",
        || {
            shown = sh(client, &format!("ip neigh show {} dev eth0", vip.addr));
            shown.contains(&want)
        },
    );
    eprintln!("client entry after {took:?}: {}", shown.trim());
    assert!(!shown.contains(wrong));
}

#[test]
fn watch_conflicts_reports_an_impostors_gratuitous_arp() {
    let lab = Lab::new("vip-watch");
    let vip = vip4(&lab);
    let (a, b) = (lab.a(), lab.b());
    let own = mac(a);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            on(a, || async {
                vip.add().await.expect("a holds the VIP");
                let mut conflicts = Box::pin(vip.watch_conflicts(own).expect("watch"));
                ready_tx.send(()).expect("the test waits");
                // Our own announcement is not a conflict.
                vip.announce(1, Duration::ZERO).await.expect("announce");
                tokio::time::timeout(Duration::from_secs(3), conflicts.next()).await
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the watch started");
        // b claims the address a holds: its gratuitous ARP is the conflict.
        on(b, || async {
            vip.announce(2, Duration::from_millis(20))
                .await
                .expect("the impostor announces")
        });
        let got = watcher.join().expect("the watcher");
        let got = got
            .expect("a conflict within 3 s")
            .expect("the stream goes on");
        assert_eq!(got.expect("no socket error"), mac(b));
    });
}

#[test]
fn checker_passes_a_clean_handover() {
    let lab = Lab::new("vip-hand-over");
    let vip = vip4(&lab);
    let (a, b) = (lab.a(), lab.b());
    let watch = AddrWatch::start(vip.addr, &[a, b]);
    let step = Duration::from_secs(5);
    on(a, || async { vip.add().await.expect("a claims") });
    assert!(watch.wait_holders(&[a.ns()], step), "{}", watch.report());
    on(a, || async { vip.remove().await.expect("a releases") });
    assert!(watch.wait_holders(&[], step), "{}", watch.report());
    on(b, || async { vip.add().await.expect("b claims") });
    assert!(watch.wait_holders(&[b.ns()], step), "{}", watch.report());
    watch.assert_no_overlap();
    let iv = watch.intervals();
    let (ia, ib) = (&iv[a.ns()], &iv[b.ns()]);
    assert_eq!((ia.len(), ib.len()), (1, 1), "{}", watch.report());
    let a_end = ia[0].to.expect("a released");
    assert!(
        a_end <= ib[0].from && ib[0].to.is_none(),
        "{}",
        watch.report()
    );
    eprintln!("handover:{}", watch.report());
}

#[test]
fn checker_fails_when_two_hosts_hold_at_once() {
    let lab = Lab::new("vip-both");
    let vip = vip4(&lab);
    let (a, b) = (lab.a(), lab.b());
    let watch = AddrWatch::start(vip.addr, &[a, b]);
    on(a, || async { vip.add().await.expect("a claims") });
    on(b, || async { vip.add().await.expect("b claims too") });
    assert!(
        watch.wait_holders(&[a.ns(), b.ns()], Duration::from_secs(5)),
        "{}",
        watch.report()
    );
    on(b, || async { vip.remove().await.expect("b releases") });
    assert!(watch.wait_holders(&[a.ns()], Duration::from_secs(5)));
    let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| watch.assert_no_overlap()));
    let msg = match verdict {
        Ok(()) => panic!("the checker passed two holders: {}", watch.report()),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "a panic without a message".into()),
    };
    eprintln!("the checker failed as it should: {msg}");
    assert!(
        msg.contains(&format!("{} and {} both held it", a.ns(), b.ns())),
        "{msg}"
    );
    assert_eq!(watch.overlaps().len(), 1);
}

#[test]
fn checker_counts_an_address_on_a_down_link_only_under_any_address() {
    let lab = Lab::new("vip-down");
    let vip = vip4(&lab);
    let (a, b) = (lab.a(), lab.b());
    let reachable = AddrWatch::start(vip.addr, &[a, b]);
    let strict = AddrWatch::start_counting(vip.addr, &[a, b], Counting::AnyAddress);
    let step = Duration::from_secs(5);
    on(a, || async { vip.add().await.expect("a claims") });
    assert!(reachable.wait_holders(&[a.ns()], step));
    assert!(strict.wait_holders(&[a.ns()], step));
    // The old live host's link goes down with the address still on it.
    lab.link_down();
    assert!(reachable.wait_holders(&[], step), "{}", reachable.report());
    assert_eq!(strict.holders(), vec![a.ns().to_string()]);
    on(a, || async { vip.remove().await.expect("a drops it") });
    assert!(strict.wait_holders(&[], step));
    lab.link_up();
    on(b, || async { vip.add().await.expect("b claims") });
    assert!(reachable.wait_holders(&[b.ns()], step));
    assert!(strict.wait_holders(&[b.ns()], step));
    reachable.assert_no_overlap();
    strict.assert_no_overlap();
    let (r, s) = (reachable.intervals(), strict.intervals());
    let (ra, sa) = (r[a.ns()][0].to.unwrap(), s[a.ns()][0].to.unwrap());
    assert!(ra < sa, "a stops counting at link down ({ra:?}) under Reachable, at removal ({sa:?}) under AnyAddress");
}

#[test]
fn checker_sees_an_address_come_back_with_its_link() {
    let lab = Lab::new("vip-back");
    let vip = vip4(&lab);
    let (a, b) = (lab.a(), lab.b());
    let watch = AddrWatch::start(vip.addr, &[a, b]);
    let step = Duration::from_secs(5);
    on(a, || async { vip.add().await.expect("a claims") });
    lab.link_down();
    assert!(watch.wait_holders(&[], step));
    // b claims while a's link is down, with a's address left on it; the link returns.
    on(b, || async { vip.add().await.expect("b claims") });
    lab.link_up();
    assert!(
        watch.wait_holders(&[a.ns(), b.ns()], step),
        "{}",
        watch.report()
    );
    assert!(
        std::panic::catch_unwind(AssertUnwindSafe(|| watch.assert_no_overlap())).is_err(),
        "two reachable holders once the link is back: {}",
        watch.report()
    );
}

#[test]
fn check_names_each_problem_in_one_line() {
    let lab = Lab::new("vip-check");
    let vip = vip4(&lab);
    let a = lab.a();
    let (good, off_subnet, no_iface) = on(a, || async {
        let off = Vip::parse("eth0", "10.9.0.1/24").unwrap();
        let none = Vip::parse("eth9", &vip.cidr()).unwrap();
        (
            failoverd::vip::check(&vip).await,
            failoverd::vip::check(&off).await,
            failoverd::vip::check(&none).await,
        )
    });
    assert_eq!(
        good,
        Ok(()),
        "root in the lab: interface, subnet and capabilities"
    );
    assert_eq!(
        off_subnet,
        Err(vec![format!(
            "vip.address 10.9.0.1/24 is in no subnet of eth0 (eth0 has {}/24): clients on \
             that link could not reach it",
            a.addr()
        )])
    );
    assert_eq!(
        no_iface,
        Err(vec![
            "vip.interface eth9 does not exist on this host".to_string()
        ])
    );
}

#[test]
fn ipv6_add_remove_with_kernel_dad() {
    let lab = Lab::new("vip6-tag");
    let vip = vip6(&lab);
    let a = lab.a();
    let watch = AddrWatch::start(vip.addr, &[lab.a(), lab.b()]);
    let first = on(a, || async {
        vip.add().await.expect("add");
        vip.add().await.expect("second add is Ok");
        vip.present().await.unwrap()
    });
    assert_eq!(
        first,
        Presence::Present {
            ours: true,
            prefix: 64,
            dad: Dad::Tentative
        },
        "the kernel's DAD runs first"
    );
    assert_eq!(ifa_proto(a, vip.addr), Some(FAILOVERD_IFA_PROTO));
    let mut last = first;
    let took = within(Duration::from_secs(5), "DAD to pass", || {
        last = on(a, || async { vip.present().await.unwrap() });
        matches!(last, Presence::Present { dad: Dad::Done, .. })
    });
    eprintln!("DAD passed after {took:?}");
    assert!(
        watch.wait_holders(&[a.ns()], Duration::from_secs(1)),
        "{}",
        watch.report()
    );
    on(a, || async {
        vip.remove().await.expect("remove");
        vip.remove().await.expect("remove again is Ok");
        assert_eq!(vip.present().await.unwrap(), Presence::Absent);
    });
    assert!(watch.wait_holders(&[], Duration::from_secs(5)));
    watch.assert_no_overlap();
}

#[test]
fn ipv6_probe_and_kernel_dad_see_a_holder() {
    let lab = Lab::new("vip6-probe");
    let vip = vip6(&lab);
    let (a, b) = (lab.a(), lab.b());
    let free = on(a, || async {
        vip.probe(ProbeTimers::default()).await.expect("probe")
    });
    assert_eq!(free, None, "nobody holds it yet");
    sh(b, &format!("ip addr add {} dev eth0 nodad", vip.cidr()));
    let watch = AddrWatch::start(vip.addr, &[a, b]);
    let got = on(a, || async {
        vip.probe(ProbeTimers::default()).await.expect("probe")
    });
    assert_eq!(got, Some(mac(b)), "b's kernel answers the DAD solicitation");
    // Claiming anyway: the kernel's own DAD fails, and a never holds it.
    on(a, || async { vip.add().await.expect("add") });
    let mut last = Presence::Absent;
    within(Duration::from_secs(5), "the kernel's DAD to fail", || {
        last = on(a, || async { vip.present().await.unwrap() });
        matches!(
            last,
            Presence::Present {
                dad: Dad::Failed,
                ..
            }
        )
    });
    assert_eq!(
        watch.holders(),
        vec![b.ns().to_string()],
        "{}",
        watch.report()
    );
    watch.assert_no_overlap();
    on(a, || async {
        vip.remove().await.expect("remove our dadfailed copy")
    });
}

#[test]
fn ipv6_announce_moves_a_client_neighbour_entry() {
    let lab = Lab::new("vip6-na");
    let vip = vip6(&lab);
    let (a, client) = (lab.a(), lab.b());
    let wrong = "02:00:00:00:00:99";
    sh(
        client,
        &format!(
            "ip -6 neigh replace {} lladdr {wrong} dev eth0 nud stale",
            vip.addr
        ),
    );
    on(a, || async { vip.add().await.expect("add") });
    // Control: the kernel's DAD alone does not move the client's entry.
    std::thread::sleep(Duration::from_millis(200));
    let before = sh(client, &format!("ip -6 neigh show {} dev eth0", vip.addr));
    assert!(before.contains(wrong), "{before}");
    on(a, || async {
        vip.announce(3, Duration::from_millis(20))
            .await
            .expect("announce");
    });
    let want = a.mac();
    let mut shown = String::new();
    within(
        Duration::from_millis(500),
        "the client's entry to move",
        || {
            shown = sh(client, &format!("ip -6 neigh show {} dev eth0", vip.addr));
            shown.contains(&want)
        },
    );
    assert!(!shown.contains(wrong), "{shown}");
}

#[test]
fn ipv6_watch_conflicts_reports_an_impostors_advertisement() {
    let lab = Lab::new("vip6-watch");
    let vip = vip6(&lab);
    let (a, b) = (lab.a(), lab.b());
    let own = mac(a);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            on(a, || async {
                vip.add().await.expect("a holds the VIP");
                let mut conflicts = Box::pin(vip.watch_conflicts(own).expect("watch"));
                ready_tx.send(()).expect("the test waits");
                // Our own advertisement is not a conflict.
                vip.announce(1, Duration::ZERO).await.expect("announce");
                tokio::time::timeout(Duration::from_secs(3), conflicts.next()).await
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the watch started");
        on(b, || async {
            vip.announce(2, Duration::from_millis(20))
                .await
                .expect("the impostor advertises")
        });
        let got = watcher.join().expect("the watcher");
        let got = got
            .expect("a conflict within 3 s")
            .expect("the stream goes on");
        assert_eq!(got.expect("no socket error"), mac(b));
    });
}

/// `failoverd check` and `failoverd run` with a `[vip]` the host cannot manage: an
/// address in no subnet of the interface (check names it; run refuses to start and adds
/// nothing), and the capabilities missing (check names both).
#[test]
fn check_and_run_refuse_an_address_they_cannot_manage() {
    let lab = Lab::new("vip-run");
    let (a, b) = (lab.a(), lab.b());
    let d = tempfile::tempdir().unwrap();
    let p = |rel: &str| d.path().join(rel).display().to_string();
    let fo = system_tests::bin("failoverd").display().to_string();
    let conode = system_tests::conode_bin().display().to_string();
    sh(
        a,
        &format!(
            "{conode} -c {} setup --non-interactive --host {} --port 7000 --description vip-run",
            p("co/private.toml"),
            a.addr()
        ),
    );
    std::fs::create_dir_all(d.path().join("data")).unwrap();
    let off = "10.9.0.1/24";
    let mut keys = Vec::new();
    for (h, peer) in [("a", b.addr()), ("b", a.addr())] {
        let out = sh(
            a,
            &format!(
                "{fo} -c {cfg} setup --state-dir {state} --conode-config {co} --conode-data-dir {data} --peer {peer}:7780 --metrics '' --interface eth0 --vip {off}",
                cfg = p(&format!("{h}/failoverd.toml")),
                state = p(&format!("{h}-state")),
                co = p("co/private.toml"),
                data = p("data"),
            ),
        );
        keys.push(out.lines().last().unwrap().trim().to_string());
    }
    let cfg = p("a/failoverd.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "public_key = \"\"",
            &format!("public_key = \"{}\"", keys[1]),
        )
        .replace("control = \"systemd\"", "control = \"child\"");
    std::fs::write(&cfg, &text).unwrap();

    let r = a.sh(&format!("{fo} -c {cfg} check"), Duration::from_secs(20));
    let said = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(1), "{said}");
    assert!(
        said.contains("error: vip.address 10.9.0.1/24 is in no subnet of eth0"),
        "{said}"
    );

    let r = a.sh(&format!("{fo} -c {cfg} run"), Duration::from_secs(30));
    assert!(r.code.is_some_and(|c| c != 0), "run started: {r:?}");
    assert!(
        r.stderr.contains("[vip] cannot be managed")
            && r.stderr.contains("10.9.0.1/24 is in no subnet of eth0"),
        "{}",
        r.stderr
    );
    assert!(!addrs(a).contains("10.9.0.1"), "{}", addrs(a));

    // In the lab's subnet, but without CAP_NET_ADMIN and CAP_NET_RAW (root's bounding
    // set without them, so its effective set lacks them too).
    let good = vip4(&lab).cidr();
    std::fs::write(&cfg, text.replace(off, &good)).unwrap();
    let r = a.sh(
        &format!("setpriv --bounding-set=-net_admin,-net_raw {fo} -c {cfg} check"),
        Duration::from_secs(20),
    );
    let said = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(r.code, Some(1), "{said}");
    for want in [
        "error: failoverd lacks CAP_NET_ADMIN",
        "error: failoverd lacks CAP_NET_RAW",
    ] {
        assert!(said.contains(want), "{want:?} missing from:\n{said}");
    }
    assert!(!said.contains("in no subnet"), "{said}");
    let r = a.sh(&format!("{fo} -c {cfg} check"), Duration::from_secs(20));
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains(&format!("ok: vip {good} on eth0")),
        "with the capabilities: {said}"
    );
}
