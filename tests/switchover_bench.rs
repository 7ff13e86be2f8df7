//! `scripts/bench failover` part 2: what a client sees of a failover. Three hosts on one
//! link (live a, standby b, a client c); a 64 MiB chain database; the client asks Status
//! through the virtual IP every 10 ms (a new WebSocket connection each time, 1 s
//! timeout). Distributions, not timed tests:
//!
//! 1. the client-visible outage of `failoverd switchover` (the longest gap between two
//!    successful Status replies around it), `FAILOVER_SWITCH_RUNS` runs (default 20),
//!    alternating direction; every other run with notify hooks that hang (each host's
//!    `on_role_change` sleeps until killed at its 5 s timeout) against the runs between
//!    (the same hook exits at once): hooks must not delay a switchover;
//! 2. the live host killed (kill -9 of failoverd and conode, and its address gone, as a
//!    power cut does), then `failoverd promote --force` on the standby: the time from the
//!    command to the client's first successful reply, `FAILOVER_FORCE_RUNS` runs
//!    (default 20), each promote 0-1 s (spread evenly) after the standby counted the
//!    peer gone, so that the operator's moment is not in step with the client's retries;
//!    and the time from the command to the address added;
//! 3. for each claim, how long after the new holder's address appeared (the kernel's
//!    address event, seen by the checker of record) the client's neighbour entry for
//!    the VIP pointed at the new holder's MAC (polled with `ip neigh` every ~5 ms: the
//!    figure's resolution).
//!
//! Every run is also checked by the address-event checker: two holders at once fail the
//! benchmark.

#[path = "failover_netns.rs"]
#[allow(dead_code, unused_imports)]
mod pair;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pair::{ok, wait, Pair};
use system_tests::addrwatch::AddrWatch;
use system_tests::netns::Lab;

/// Successful Status replies seen by the client, as instants.
type Replies = Arc<Mutex<Vec<Instant>>>;
/// Failed and slow requests: when each started, how long it took, why
/// (FAILOVER_TEST_LOGS=1 prints those of each outage).
type Failures = Arc<Mutex<Vec<(Instant, Duration, String)>>>;

/// With FAILOVER_TEST_LOGS set: the client's failed requests between `from` and `to`,
/// one line each, times from `from`.
fn print_failures(what: &str, failures: &Failures, from: Instant, to: Instant) {
    if std::env::var_os("FAILOVER_TEST_LOGS").is_none() {
        return;
    }
    let wall = std::time::SystemTime::now() - from.elapsed();
    let ms = wall
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 60_000)
        .unwrap_or(0);
    eprintln!(
        "client during the {what} (ms after the command, given at second {}.{:03} of the minute):",
        ms / 1000,
        ms % 1000
    );
    let from_early = from.checked_sub(Duration::from_secs(1)).unwrap_or(from);
    for (t, took, e) in failures
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.0 + f.1 >= from && f.0 >= from_early && f.0 <= to)
    {
        let e: String = e.chars().take(100).collect();
        let at = if *t >= from {
            format!("{}", t.duration_since(from).as_millis())
        } else {
            format!("-{}", from.duration_since(*t).as_millis())
        };
        eprintln!("  {at:>6} +{:>4}: {e}", took.as_millis());
    }
}

fn env_runs(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The client: Status through the VIP every 10 ms, in the client's namespace, until
/// `stop` (bounded by `max` anyway).
fn client(
    host: &system_tests::netns::Host,
    server: conode::config::ServerToml,
    stop: Arc<AtomicBool>,
    replies: Replies,
    failures: Failures,
    max: Duration,
) {
    host.in_ns(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t0 = Instant::now();
        rt.block_on(async {
            while !stop.load(Ordering::SeqCst) && t0.elapsed() < max {
                let t = Instant::now();
                match conode::client::status(&server, Duration::from_secs(1)).await {
                    Ok(_) => {
                        replies.lock().unwrap().push(Instant::now());
                        if t.elapsed() > Duration::from_millis(30) {
                            let e = "answered, slowly".to_string();
                            failures.lock().unwrap().push((t, t.elapsed(), e));
                        }
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push((t, t.elapsed(), e.to_string())),
                }
                let next = t + Duration::from_millis(10);
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            }
        })
    });
}

/// The longest gap between successive replies within [from, to].
fn longest_gap(replies: &Replies, from: Instant, to: Instant) -> Duration {
    let r = replies.lock().unwrap();
    let mut last: Option<Instant> = r.iter().rev().find(|&&t| t <= from).copied();
    let mut gap = Duration::ZERO;
    for &t in r.iter().filter(|&&t| t > from && t <= to) {
        if let Some(l) = last {
            gap = gap.max(t - l);
        }
        last = Some(t);
    }
    gap
}

fn first_reply_after(replies: &Replies, t: Instant, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(&r) = replies.lock().unwrap().iter().find(|&&r| r > t) {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The client's neighbour entry for the VIP as it changed: (when seen, the line).
type Neigh = Arc<Mutex<Vec<(Instant, String)>>>;

/// Record the client's neighbour entry for the VIP every ~5 ms until `stop` (bounded by
/// `max`): each change with the moment it was first seen.
fn neigh_log(
    host: &system_tests::netns::Host,
    vip: std::net::Ipv4Addr,
    stop: Arc<AtomicBool>,
    log: Neigh,
    max: Duration,
) {
    let t0 = Instant::now();
    let cmd = format!("ip neigh show {vip}");
    let mut last = String::new();
    while !stop.load(Ordering::SeqCst) && t0.elapsed() < max {
        let out = host.sh(&cmd, Duration::from_secs(5)).stdout.to_lowercase();
        if out != last {
            log.lock().unwrap().push((Instant::now(), out.clone()));
            last = out;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// When, after `since`, the client's entry first named `mac` (waits at most `within`).
fn neigh_points_at(log: &Neigh, since: Instant, mac: &str, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    let mac = mac.to_lowercase();
    loop {
        {
            let l = log.lock().unwrap();
            // The entry in force at `since`, or a later change, naming the new MAC.
            let at_since = l.iter().rev().find(|(t, _)| *t <= since);
            if let Some((_, line)) = at_since {
                if line.contains(&mac) {
                    return Some(since);
                }
            }
            if let Some((t, _)) = l.iter().find(|(t, line)| *t > since && line.contains(&mac)) {
                return Some(*t);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// When the address appeared on `ns` last (from the checker's intervals).
fn claimed_at(watch: &AddrWatch, w0: Instant, ns: &str) -> Option<Instant> {
    watch
        .intervals()
        .get(ns)
        .and_then(|v| v.last())
        .map(|i| w0 + i.from)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn report(what: &str, ms: &mut [f64], target: &str) {
    let (p50, p99) = (pct(ms, 0.5), pct(ms, 0.99));
    let max = ms.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "| {what} | {} | {p50:.0} ms | {p99:.0} ms | {max:.0} ms | {target} |",
        ms.len()
    );
}

fn other(h: &str) -> &'static str {
    if h == "a" {
        "b"
    } else {
        "a"
    }
}

fn main() {
    let switch_runs = env_runs("FAILOVER_SWITCH_RUNS", 20);
    let force_runs = env_runs("FAILOVER_FORCE_RUNS", 20);
    let p = Pair::start_in(Lab::with_client("swbench"));
    // Role hooks on both hosts that hang while the flag file exists (killed at the 5 s
    // timeout) and exit at once otherwise. Both hosts are standby: restarting is free.
    let flag = p.dir.path().join("hooks-hang");
    for h in ["a", "b"] {
        p.stop_failoverd(h);
        let cfg = p.dir.path().join(format!("{h}/failoverd.toml"));
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text
            .replace(
                "on_role_change = \"\"",
                &format!(
                    "on_role_change = \"/usr/bin/test -e {} && exec /bin/sleep 60; exit 0\"",
                    flag.display()
                ),
            )
            .replace("timeout = \"10s\"", "timeout = \"5s\"");
        std::fs::write(&cfg, text).unwrap();
    }
    for h in ["b", "a"] {
        p.spawn_failoverd(h);
    }
    for h in ["a", "b"] {
        p.wait_peer_reachable(h, true, Duration::from_secs(30));
    }
    let w0 = Instant::now();
    let watch = AddrWatch::start(IpAddr::V4(p.vip), &[p.lab.a(), p.lab.b()]);
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    assert!(watch.wait_holders(&[&p.ns("a")], Duration::from_secs(5)));
    // 64 MiB of blocks, appended by the client through the VIP.
    let t = Instant::now();
    p.grow_sized("c", 64, 1 << 20);
    ok(p.lab.a(), &p.failoverd("a", "snapshot"));
    eprintln!("64 MiB chain made and shipped in {:?}", t.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let replies: Replies = Arc::default();
    let max = Duration::from_secs(1800);
    let failures: Failures = Arc::default();
    let (s2, r2, f2) = (stop.clone(), replies.clone(), failures.clone());
    let server =
        conode::config::PrivateConfig::load(std::path::Path::new(&p.p("a/co/private.toml")))
            .unwrap()
            .server_toml();
    let neigh: Neigh = Arc::default();
    let (s3, n3) = (stop.clone(), neigh.clone());
    /// Stops the client and the poller when the measuring ends, also by a panic (the
    /// scope would otherwise wait for them).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    std::thread::scope(|sc| {
        let _stop = StopOnDrop(stop.clone());
        let host = p.lab.client();
        sc.spawn(move || client(host, server, s2, r2, f2, max));
        let vip = p.vip;
        sc.spawn(move || neigh_log(host, vip, s3, n3, max));
        wait("the client's first reply", Duration::from_secs(10), || {
            !replies.lock().unwrap().is_empty()
        });

        let mut live = "a";
        let (mut outage, mut arp) = (Vec::new(), Vec::new());
        let (mut hooked, mut unhooked) = (Vec::new(), Vec::new());
        for run in 0..switch_runs {
            let next = other(live);
            let hang = run % 2 == 1;
            if hang {
                std::fs::write(&flag, b"").unwrap();
            } else {
                let _ = std::fs::remove_file(&flag);
            }
            p.wait_peer_live(next);
            let t = Instant::now();
            ok(p.host(next), &p.failoverd(next, "switchover"));
            assert!(watch.wait_holders(&[&p.ns(next)], Duration::from_secs(5)));
            let mac = p.host(next).mac();
            let claimed = claimed_at(&watch, w0, &p.ns(next));
            let seen =
                claimed.and_then(|c| neigh_points_at(&neigh, c, &mac, Duration::from_secs(5)));
            let done = first_reply_after(&replies, Instant::now(), Duration::from_secs(10))
                .expect("the client is served after the switchover");
            std::thread::sleep(Duration::from_millis(200));
            let gap = longest_gap(&replies, t, done.max(Instant::now())).as_secs_f64() * 1e3;
            outage.push(gap);
            if hang {
                hooked.push(gap);
            } else {
                unhooked.push(gap);
            }
            print_failures("switchover", &failures, t, done);
            if let (Some(s), Some(c)) = (seen, claimed) {
                arp.push(s.saturating_duration_since(c).as_secs_f64() * 1e3);
            }
            live = next;
        }

        let _ = std::fs::remove_file(&flag);
        let (mut promote, mut claim) = (Vec::new(), Vec::new());
        for run in 0..force_runs {
            let next = other(live);
            // Shipped before the death: the forced promote installs it.
            ok(p.host(live), &p.failoverd(live, "snapshot"));
            let conode = p.conode_pid(live).expect("the live conode runs");
            let i = usize::from(live == "b");
            if let Some(f) = p.failoverd.borrow_mut()[i].take() {
                f.kill();
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(conode as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            ok(p.host(live), &format!("ip addr del {}/24 dev eth0", p.vip));
            p.wait_peer_reachable(next, false, Duration::from_secs(10));
            // The operator's moment is unrelated to the client's rhythm: without this the
            // promote would always come the peer timeout (2 s) after the kill, in step
            // with the client's attempts that wait out TCP's 1 s SYN retransmission.
            // Spread evenly over 0-1 s across the runs (379 and 1000 are coprime).
            std::thread::sleep(Duration::from_millis((run as u64 * 379) % 1000));
            let t = Instant::now();
            ok(p.host(next), &p.failoverd(next, "promote --force"));
            let first = first_reply_after(&replies, t, Duration::from_secs(30))
                .expect("the client is served after the forced promote");
            promote.push((first - t).as_secs_f64() * 1e3);
            print_failures("forced promote", &failures, t, first);
            assert!(watch.wait_holders(&[&p.ns(next)], Duration::from_secs(5)));
            let mac = p.host(next).mac();
            if let Some(c) = claimed_at(&watch, w0, &p.ns(next)) {
                claim.push(c.saturating_duration_since(t).as_secs_f64() * 1e3);
                if let Some(s) = neigh_points_at(&neigh, c, &mac, Duration::from_secs(5)) {
                    arp.push(s.saturating_duration_since(c).as_secs_f64() * 1e3);
                }
            }
            // The old host comes back as standby.
            p.spawn_failoverd(live);
            wait("both hear each other", Duration::from_secs(20), || {
                p.status(live)
                    .at(&["peer", "live"])
                    .and_then(|v| v.as_bool())
                    == Some(true)
            });
            live = next;
        }
        stop.store(true, Ordering::SeqCst);
        watch.assert_no_overlap();

        println!();
        println!("Failover as a client sees it: 3 hosts on one link, a 64 MiB chain database, Status through the VIP every 10 ms (new WebSocket connection each, 1 s timeout); probe: 3 ARP probes 30 ms apart, then 120 ms of waiting (vip.probe_*: 0.18 s; a forced promote first probes once quickly before it installs: 1 probe, 30 ms); the generation linked in as the database, not copied; heartbeat 500 ms, peer timeout 2 s; debug-free release build");
        println!();
        println!("| measure | runs | p50 | p99 | max | target |");
        println!("|---|---|---|---|---|---|");
        report(
            "switchover: client-visible outage",
            &mut outage,
            "≤ 500 ms p50, ≤ 1 s p99",
        );
        report("  of which: role hooks exiting at once", &mut unhooked, "");
        report(
            "  of which: role hooks hanging (killed at 5 s)",
            &mut hooked,
            "",
        );
        if !hooked.is_empty() && !unhooked.is_empty() {
            println!(
                "| switchover outage p50, hanging hooks / hooks exiting at once | | {:.2} | | | ≈ 1 |",
                pct(&mut hooked, 0.5) / pct(&mut unhooked, 0.5)
            );
        }
        report(
            "promote --force → client's first reply (live host killed)",
            &mut promote,
            "≤ 1 s p50",
        );
        report(
            "promote --force → the address added (the host side of the above)",
            &mut claim,
            "",
        );
        report(
            "claim → client's ARP entry on the new MAC (polled every ~5-10 ms)",
            &mut arp,
            "≤ 100 ms",
        );
    });
}
