//! failoverd failing over between two hosts in network namespaces: the virtual IP, the
//! epochs, switchover and forced promote, with real conodes (run by failoverd as
//! `nobody`), a skipchain whose leader's address is the virtual IP, and the checker of
//! record (`system_tests::addrwatch`, the kernel's own address events), which every
//! `Pair` runs over all its hosts (the client's too) from before its first failoverd
//! starts, asserting at each test's end and again when the pair is dropped that no two
//! hosts held the address at the same instant.
//!
//! Beyond the IPv4 VIP ([`Serve`]): a pair whose conode's address is an IPv6 VIP (the
//! kernel's DAD as the probe, unsolicited neighbour advertisements as the announcement),
//! and a pair with no VIP at all (a DNS name moved by the role hook).

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use system_tests::addrwatch::AddrWatch;
use system_tests::netns::{Host, Lab, Spawned};
use system_tests::{bin, conode_bin, Json};

const T: Duration = Duration::from_secs(60);
/// The notify hooks' timeout in the operations test: far above the switchover's bound.
const HOOK_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) fn fo() -> String {
    bin("failoverd").display().to_string()
}

pub(crate) fn ok(host: &Host, script: &str) -> String {
    let r = host.sh(script, T);
    assert_eq!(
        r.code,
        Some(0),
        "{script}\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    r.stdout
}

fn refused(host: &Host, script: &str) -> String {
    let r = host.sh(script, T);
    assert_eq!(
        r.code,
        Some(1),
        "{script} must be refused\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    r.stderr
}

pub(crate) use system_tests::wait_until as wait;

/// Two hosts, each with failoverd (which starts and stops the conode as `nobody`), one
/// conode identity whose `Address` is the virtual IP.
/// One pair at a time in this binary: under CI's load, pairs running side by side missed
/// their timing (two tests failed there).
static ONE_PAIR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The address a pair's conode serves on (its public `Address`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Serve {
    /// The IPv4 VIP `10.X.Y.100/24`.
    Ipv4,
    /// An IPv6 VIP `fdXX::100/64` ([`Lab::add_ipv6`] gives the hosts addresses).
    Ipv6,
    /// No `[vip] address` (a DNS name moved by a hook): the conode's address is
    /// `localhost:7000`, and each host's `on_role_change` hook appends its facts to
    /// `H/role-hook`.
    NoVip,
}

pub(crate) struct Pair {
    _one: std::sync::MutexGuard<'static, ()>,
    /// The checker of record over a, b and the client (if any), from before the first
    /// failoverd starts to the pair's drop, which asserts it. Declared before `lab`: it
    /// must be dropped first.
    pub(crate) watch: AddrWatch<'static>,
    pub(crate) lab: Lab,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) vip: Ipv4Addr,
    /// The IPv6 VIP of a pair started with [`Serve::Ipv6`].
    pub(crate) vip6: Option<Ipv6Addr>,
    pub(crate) failoverd: RefCell<[Option<Spawned>; 2]>,
    pub(crate) chain: RefCell<String>,
    pub(crate) index: Cell<u64>,
}

impl Pair {
    pub(crate) fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    pub(crate) fn host(&self, h: &str) -> &Host {
        match h {
            "a" => self.lab.a(),
            "c" => self.lab.client(),
            _ => self.lab.b(),
        }
    }

    fn start(name: &str) -> Pair {
        Pair::start_in(Lab::new(name))
    }

    /// The pair in `lab` (a and b; a client host if the lab has one).
    pub(crate) fn start_in(lab: Lab) -> Pair {
        Pair::start_serving(lab, Serve::Ipv4)
    }

    /// The pair in `lab`, its conode served as `serve` says.
    pub(crate) fn start_serving(lab: Lab, serve: Serve) -> Pair {
        let one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (lab.a(), lab.b());
        let o = a.addr().octets();
        let vip = Ipv4Addr::new(o[0], o[1], o[2], 100);
        let vip6: Option<Ipv6Addr> = (serve == Serve::Ipv6).then(|| {
            format!("{}100", lab.add_ipv6())
                .parse()
                .expect("the lab's IPv6 VIP")
        });
        let (host, listen, vip_flag) = match (serve, vip6) {
            (Serve::Ipv6, Some(v6)) => (v6.to_string(), "::", format!(" --vip {v6}/64")),
            (Serve::NoVip, _) => ("localhost".to_string(), "0.0.0.0", String::new()),
            _ => (vip.to_string(), "0.0.0.0", format!(" --vip {vip}/24")),
        };
        let d = |p: &str| dir.path().join(p).display().to_string();
        let conode = conode_bin().display().to_string();
        ok(
            a,
            &format!(
                "{conode} -c {} setup --non-interactive --host {host} --port 7000 --description failover-lab",
                d("a/co/private.toml")
            ),
        );
        // Both hosts run the same identity; it listens on all addresses of its host.
        let private = std::fs::read_to_string(dir.path().join("a/co/private.toml")).unwrap();
        let private = private
            .lines()
            .filter(|l| !l.starts_with("ListenAddress"))
            .collect::<Vec<_>>()
            .join("\n");
        let private = format!("ListenAddress = \"{listen}\"\n{private}\n");
        for h in ["a", "b"] {
            std::fs::create_dir_all(dir.path().join(format!("{h}/co"))).unwrap();
            std::fs::write(dir.path().join(format!("{h}/co/private.toml")), &private).unwrap();
            std::fs::create_dir_all(dir.path().join(format!("{h}/data"))).unwrap();
        }
        // The conodes run as nobody: their files must be theirs.
        ok(
            a,
            &format!(
                "chmod 755 {root} {root}/a {root}/b && chown -R nobody:nogroup {a} {b}",
                root = dir.path().display(),
                a = d("a/co") + " " + &d("a/data"),
                b = d("b/co") + " " + &d("b/data"),
            ),
        );
        let mut keys = Vec::new();
        for (h, host, peer) in [("a", a, b), ("b", b, a)] {
            let out = ok(host, &format!(
                "{fo} -c {cfg} setup --state-dir {state} --conode-config {co} --conode-data-dir {data} --peer {peer}:7780 --metrics 127.0.0.1:7781 --interface eth0{vip_flag}",
                fo = fo(),
                cfg = d(&format!("{h}/failoverd.toml")),
                state = d(&format!("{h}/state")),
                co = d(&format!("{h}/co/private.toml")),
                data = d(&format!("{h}/data")),
                peer = peer.addr(),
            ));
            keys.push(out.lines().last().unwrap().trim().to_string());
        }
        for (h, peer_key) in [("a", &keys[1]), ("b", &keys[0])] {
            let p = dir.path().join(format!("{h}/failoverd.toml"));
            let cfg = std::fs::read_to_string(&p)
                .unwrap()
                .replace("public_key = \"\"", &format!("public_key = \"{peer_key}\""))
                .replace("interval = \"2s\"", "interval = \"1s\"")
                .replace("control = \"systemd\"", "control = \"child\"")
                .replace(
                    "# binary = \"/usr/bin/conode\"",
                    &format!("binary = \"{}\"", conode_bin().display()),
                )
                .replace("# user = \"conode\"", "user = \"nobody\"");
            let cfg = if serve == Serve::NoVip {
                // A role hook (absolute path) that records the facts it gets.
                let script = dir.path().join(format!("{h}/role-hook.sh"));
                std::fs::write(
                    &script,
                    format!(
                        "#!/bin/sh\necho \"$FAILOVERD_ROLE $FAILOVERD_PREVIOUS_ROLE $FAILOVERD_EPOCH $FAILOVERD_CAUSE vip=$FAILOVERD_VIP\" >> {}\n",
                        d(&format!("{h}/role-hook"))
                    ),
                )
                .unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
                assert!(cfg.contains("on_role_change = \"\""), "{cfg}");
                cfg.replace(
                    "on_role_change = \"\"",
                    &format!("on_role_change = \"{}\"", script.display()),
                )
            } else {
                cfg
            };
            std::fs::write(&p, cfg).unwrap();
        }
        let mut hosts = vec![a, b];
        hosts.extend(lab.client_if_any());
        let watched = vip6.map_or(IpAddr::V4(vip), IpAddr::V6);
        let watch = AddrWatch::start_owned(watched, &hosts);
        let p = Pair {
            _one: one,
            watch,
            lab,
            dir,
            vip,
            vip6,
            failoverd: RefCell::new([None, None]),
            chain: RefCell::new(String::new()),
            index: Cell::new(0),
        };
        p.spawn_failoverd("b");
        p.spawn_failoverd("a");
        for h in ["a", "b"] {
            p.wait_peer_reachable(h, true, T);
        }
        p
    }

    pub(crate) fn spawn_failoverd(&self, h: &str) {
        self.spawn_failoverd_env(h, &[])
    }

    /// [`Pair::spawn_failoverd`] with `env` added to failoverd's environment (which the
    /// conode it starts inherits, but for systemd's notify variables).
    pub(crate) fn spawn_failoverd_env(&self, h: &str, env: &[(&str, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("failoverd-{h}.log")))
            .unwrap();
        let mut cmd = self.host(h).command(bin("failoverd"));
        cmd.arg("-c")
            .arg(self.p(&format!("{h}/failoverd.toml")))
            .arg("run")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let s = self.host(h).spawn(cmd);
        self.failoverd.borrow_mut()[usize::from(h == "b")] = Some(s);
        let (host, cfg) = (self.host(h), self.p(&format!("{h}/failoverd.toml")));
        wait(&format!("failoverd on {h}"), T, || {
            host.sh(&format!("{} -c {cfg} status", fo()), T).code == Some(0)
        });
    }

    /// Wait until `h` counts its peer reachable (or, with `false`, gone).
    pub(crate) fn wait_peer_reachable(&self, h: &str, reachable: bool, within: Duration) {
        let what = if reachable { "hears" } else { "counts gone" };
        wait(&format!("{h} {what} its peer"), within, || {
            self.status(h)
                .at(&["peer", "reachable"])
                .and_then(|v| v.as_bool())
                == Some(reachable)
        });
    }

    /// Stop `h`'s failoverd gracefully (SIGTERM) and wait until it exited.
    pub(crate) fn stop_failoverd(&self, h: &str) {
        let f = self.failoverd.borrow_mut()[usize::from(h == "b")]
            .take()
            .expect("failoverd runs");
        // The pid of a process this test started and has not reaped.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(f.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(
            f.wait_timeout(T).is_some(),
            "failoverd on {h} stops on SIGTERM"
        );
    }

    /// Wait until `h` heard that its peer is live.
    pub(crate) fn wait_peer_live(&self, h: &str) {
        // ... and has persisted the peer's epoch as its own: a request under an older
        // epoch is refused by design ("ask again").
        wait(&format!("{h} hears its peer is live"), T, || {
            let st = self.status(h);
            st.at(&["peer", "live"]).and_then(|v| v.as_bool()) == Some(true)
                && st.at(&["epoch"]).and_then(|v| v.as_u64())
                    == st.at(&["peer", "epoch"]).and_then(|v| v.as_u64())
        });
    }

    pub(crate) fn failoverd(&self, h: &str, args: &str) -> String {
        format!(
            "{} -c {} {args}",
            fo(),
            self.p(&format!("{h}/failoverd.toml"))
        )
    }

    pub(crate) fn status(&self, h: &str) -> Json {
        Json::parse(&ok(self.host(h), &self.failoverd(h, "status --json"))).unwrap()
    }

    /// `h`'s epoch, as its status shows it.
    pub(crate) fn epoch(&self, h: &str) -> u64 {
        let st = self.status(h);
        st.at(&["epoch"])
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("no epoch in {h}'s status: {}", st.0))
    }

    /// What `h` shows of the failover state: role, epoch, VIP held, the peer's epoch (two
    /// equal views: nothing changed).
    pub(crate) fn view(&self, h: &str) -> (String, u64, Option<bool>, Option<u64>) {
        let st = self.status(h);
        (
            st.str_at(&["role"]).to_string(),
            self.epoch(h),
            st.at(&["vip_held"]).and_then(|v| v.as_bool()),
            st.at(&["peer", "epoch"]).and_then(|v| v.as_u64()),
        )
    }

    /// `h`'s neighbour entry for the virtual IP: (MAC in lower case, state), if any.
    pub(crate) fn vip_neighbour(&self, h: &str) -> Option<(String, String)> {
        let out = ok(
            self.host(h),
            &format!(
                "ip neigh show {} dev eth0",
                self.vip6.map_or(IpAddr::V4(self.vip), IpAddr::V6)
            ),
        );
        let words: Vec<&str> = out.split_whitespace().collect();
        let mac = words.iter().position(|w| *w == "lladdr")?;
        Some((
            words.get(mac + 1)?.to_lowercase(),
            words.last()?.to_string(),
        ))
    }

    pub(crate) fn ns(&self, h: &str) -> String {
        self.host(h).ns().to_string()
    }

    /// Create the chain or append `n` blocks, as a client in namespace `from` talking to
    /// the virtual IP.
    pub(crate) fn grow(&self, from: &str, n: u64) {
        self.grow_sized(from, n, 0)
    }

    /// [`Pair::grow`] with blocks of `size` random bytes (a short text when 0).
    pub(crate) fn grow_sized(&self, from: &str, n: u64, size: usize) {
        for i in 0..n {
            let data = self.p("blockdata");
            if size == 0 {
                std::fs::write(&data, format!("block {i} from {from} {}", self.index.get()))
                    .unwrap();
            } else {
                ok(
                    self.host(from),
                    &format!("head -c {size} /dev/urandom > {data}"),
                );
            }
            let conode = conode_bin().display().to_string();
            let chain = self.chain.borrow().clone();
            // A client host has no conode files: any copy of the identity names the VIP.
            let from_files = if from == "c" { "a" } else { from };
            let cmd = if chain.is_empty() {
                format!(
                    "{conode} -c {} chain create {} --data {data} --json",
                    self.p(&format!("{from_files}/co/private.toml")),
                    self.p("a/co/public.toml")
                )
            } else {
                format!(
                    "{conode} -c {} chain add {chain} --data {data} --json",
                    self.p(&format!("{from_files}/co/private.toml")),
                )
            };
            let j = Json::parse(&ok(self.host(from), &cmd)).unwrap();
            if chain.is_empty() {
                *self.chain.borrow_mut() = j.str_at(&["chain"]).to_string();
            }
            self.index
                .set(j.at(&["index"]).and_then(|v| v.as_u64()).unwrap());
        }
    }

    /// Every block 0..=index is served through the virtual IP (asked from `from`).
    pub(crate) fn assert_all_blocks(&self, from: &str) {
        let conode = conode_bin().display().to_string();
        let chain = self.chain.borrow().clone();
        let from_files = if from == "c" { "a" } else { from };
        for i in 0..=self.index.get() {
            ok(
                self.host(from),
                &format!(
                    "{conode} -c {} chain get {chain} --index {i}",
                    self.p(&format!("{from_files}/co/private.toml")),
                ),
            );
        }
    }

    pub(crate) fn log(&self, h: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("failoverd-{h}.log")))
            .unwrap_or_default()
    }

    /// Fail if two namespaces of the lab held the virtual IP at any instant so far (also
    /// asserted when the pair is dropped).
    pub(crate) fn assert_no_overlap(&self) {
        self.watch.assert_no_overlap();
    }

    /// Wait (at most 5 s) until exactly the hosts `hs` ("a", "b", "c") hold the VIP.
    pub(crate) fn wait_holders(&self, hs: &[&str]) {
        let want: Vec<String> = hs.iter().map(|h| self.ns(h)).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert!(
            self.watch.wait_holders(&want, Duration::from_secs(5)),
            "holders of {}: want {hs:?}, have {:?}",
            self.vip,
            self.watch.holders()
        );
    }

    /// The pid of the conode failoverd started on `h` (its config names the host).
    pub(crate) fn conode_pid(&self, h: &str) -> Option<u32> {
        let needle = self.p(&format!("{h}/co/private.toml"));
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains(&needle) && cmd.contains("server")).then_some(pid)
        })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // The checker's verdict over the whole test (a test that fails already has its
        // message; a second panic would abort).
        let panicking = std::thread::panicking();
        let verdict = if panicking {
            Ok(())
        } else {
            self.watch.verdict()
        };
        // The conodes are children of failoverd, which is killed by the lab: stop them
        // (they were started by this test's failoverds).
        for h in ["a", "b"] {
            if let Some(pid) = self.conode_pid(h) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if panicking || verdict.is_err() || std::env::var_os("FAILOVER_TEST_LOGS").is_some() {
            for h in ["a", "b"] {
                eprintln!("----- failoverd-{h}.log\n{}", self.log(h));
            }
        }
        if let Err(e) = verdict {
            panic!("{e}");
        }
    }
}

#[test]
fn switchover_moves_the_address_and_the_chain_with_no_block_lost_and_never_two_holders() {
    let p = Pair::start("switchover");
    // Never claimed at start: no namespace held the address since before the
    // failoverds started.
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert!(
        p.watch.intervals().values().all(Vec::is_empty),
        "{:?}",
        p.watch.intervals()
    );
    // The peer port listens on the host's own address (listen.peer left to its
    // default), never on the wildcard.
    for h in [p.lab.a(), p.lab.b()] {
        let listening = ok(h, "ss -Hltn 'sport = :7780'");
        assert!(
            listening.contains(&format!("{}:7780", h.addr())),
            "{listening}"
        );
        assert!(!listening.contains("0.0.0.0:7780"), "{listening}");
    }

    let out = ok(p.lab.a(), &p.failoverd("a", "promote"));
    assert!(out.contains("live under epoch 1"), "{out}");
    p.wait_holders(&["a"]);
    assert_eq!(p.status("a").str_at(&["role"]), "live");
    assert_eq!(
        p.status("a").at(&["vip_held"]).and_then(|v| v.as_bool()),
        Some(true)
    );

    // A client on b appends through the virtual IP.
    p.grow("b", 6);
    let before = p.index.get();

    p.wait_peer_live("b");
    let t = Instant::now();
    let out = ok(p.lab.b(), &p.failoverd("b", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    let took = t.elapsed();
    p.wait_holders(&["b"]);
    let (sa, sb) = (p.status("a"), p.status("b"));
    assert_eq!(sa.str_at(&["role"]), "standby");
    assert_eq!(sb.str_at(&["role"]), "live");
    let epoch_b = sb.at(&["epoch"]).and_then(|v| v.as_u64()).unwrap();
    assert!(
        epoch_b >= 2,
        "a switchover claims under a new epoch: {epoch_b}"
    );
    // Every acknowledged block is on the new live conode; a client on a goes on.
    p.assert_all_blocks("a");
    p.grow("a", 3);
    assert_eq!(p.index.get(), before + 3);
    p.assert_all_blocks("a");

    // And back.
    p.wait_peer_live("a");
    let out = ok(p.lab.a(), &p.failoverd("a", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    p.wait_holders(&["a"]);
    p.assert_all_blocks("b");
    let epoch_a = p.epoch("a");
    assert!(epoch_a > epoch_b);

    // A switchover asked on the live host: a hands over to b, and answers once b is live.
    p.wait_peer_live("b");
    let out = ok(p.lab.a(), &p.failoverd("a", "switchover"));
    p.wait_holders(&["b"]);
    let epoch_b = p.epoch("b");
    assert!(epoch_b > epoch_a, "{epoch_b} after {epoch_a}");
    assert!(
        out.contains(&format!(
            "switchover done: the peer is live under epoch {epoch_b}; this host is standby without the address"
        )),
        "{out}"
    );
    // (a persists b's epoch as its own at its next heartbeat.)
    p.wait_peer_live("a");
    assert_eq!(
        p.view("a"),
        ("standby".into(), epoch_b, Some(false), Some(epoch_b))
    );
    assert_eq!(p.view("b").0, "live");
    assert!(p.conode_pid("a").is_none(), "a's conode stopped");
    p.assert_all_blocks("a");
    p.grow("a", 2);

    // `demote` on the live host: its conode stops, the address goes, it is standby
    // under the same epoch, and it says so in plain words. (A demote hands nothing
    // over: b ships its blocks first, so that a has them.)
    ok(p.lab.b(), &p.failoverd("b", "snapshot"));
    let conode_b = p.conode_pid("b").expect("b's conode runs");
    let out = ok(p.lab.b(), &p.failoverd("b", "demote"));
    assert_eq!(
        out.trim(),
        format!("demoted: the conode is stopped and the address removed; this host is standby at epoch {epoch_b}")
    );
    // The reply comes once the address is removed and the conode stopped.
    assert!(p.watch.holders().is_empty(), "{:?}", p.watch.holders());
    assert!(
        !std::path::Path::new(&format!("/proc/{conode_b}")).exists() && p.conode_pid("b").is_none(),
        "b's conode (pid {conode_b}) is stopped"
    );
    assert_eq!(
        p.view("b"),
        ("standby".into(), epoch_b, Some(false), Some(epoch_b))
    );
    // A standby demoted again: refused, nothing changed.
    let e = refused(p.lab.b(), &p.failoverd("b", "demote"));
    assert!(e.contains("nothing to demote"), "{e}");
    // Then the standby a can promote: a new epoch, a's conode on the blocks b shipped.
    wait("a hears b is no longer live", T, || {
        p.status("a")
            .at(&["peer", "live"])
            .and_then(|v| v.as_bool())
            == Some(false)
    });
    let out = ok(p.lab.a(), &p.failoverd("a", "promote"));
    assert!(
        out.contains(&format!("live under epoch {}", epoch_b + 1)),
        "{out}"
    );
    p.wait_holders(&["a"]);
    assert_eq!(p.view("a").0, "live");
    p.assert_all_blocks("b");
    p.grow("b", 1);
    p.assert_no_overlap();
    eprintln!("switchover a -> b answered in {took:?}");
}

#[test]
fn a_forced_promote_after_the_live_host_dies_keeps_every_shipped_block_and_the_old_host_stays_standby(
) {
    let p = Pair::start_in(Lab::with_client("forced"));
    let (mac_a, mac_b, mac_c) = (
        p.lab.a().mac().to_lowercase(),
        p.lab.b().mac().to_lowercase(),
        p.lab.client().mac().to_lowercase(),
    );
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    // A client host appends through the virtual IP: its neighbour entry for the VIP
    // names a.
    p.grow("c", 5);
    assert_eq!(
        p.vip_neighbour("c").map(|n| n.0),
        Some(mac_a.clone()),
        "the client talked to a"
    );
    // Shipped and installed on b before a dies (this chain's roster is one conode: the
    // blocks after the last snapshot would live on a's disk alone).
    ok(p.lab.a(), &p.failoverd("a", "snapshot"));

    // a's failoverd and conode are killed; the address stays on a's interface.
    let conode_a = p.conode_pid("a").expect("a's conode runs");
    if let Some(f) = p.failoverd.borrow_mut()[0].take() {
        f.kill();
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(conode_a as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    p.wait_peer_reachable("b", false, T);
    let view_b = p.view("b");

    // Without --force: refused, the peer is unreachable.
    let e = refused(p.lab.b(), &p.failoverd("b", "promote"));
    assert!(e.contains("--force"), "{e}");
    // With --force, while a still answers ARP for the address: refused, naming a's MAC.
    let e = refused(p.lab.b(), &p.failoverd("b", "promote --force"));
    assert!(
        e.to_lowercase().contains(&mac_a),
        "the refusal names the holder's MAC {mac_a}: {e}"
    );
    // Now a is gone for good: a power cut takes its address with it.
    ok(p.lab.a(), &format!("ip addr del {}/24 dev eth0", p.vip));
    p.wait_holders(&[]);
    // An impostor: another host (the client) has the address, added by hand (untagged,
    // as an operator's mistake would): refused, naming the impostor's MAC.
    ok(
        p.lab.client(),
        &format!("ip addr add {}/24 dev eth0", p.vip),
    );
    p.wait_holders(&["c"]);
    let e = refused(p.lab.b(), &p.failoverd("b", "promote --force"));
    assert!(
        e.to_lowercase().contains(&mac_c),
        "the refusal names the impostor's MAC {mac_c}: {e}"
    );
    // The refusals changed nothing: no epoch persisted, no address.
    assert_eq!(p.view("b"), view_b);
    ok(
        p.lab.client(),
        &format!("ip addr del {}/24 dev eth0", p.vip),
    );
    p.wait_holders(&[]);

    // The client has not talked to the VIP since a died: its entry still names a.
    let before = p.vip_neighbour("c");
    assert_eq!(
        before.as_ref().map(|n| n.0.as_str()),
        Some(mac_a.as_str()),
        "the client's stale entry for the VIP: {before:?}"
    );
    let out = ok(p.lab.b(), &p.failoverd("b", "promote --force"));
    assert!(out.contains("live under epoch"), "{out}");
    p.wait_holders(&["b"]);
    // b's gratuitous ARP moves the client's entry to b's MAC at once, with no traffic
    // from the client, instead of after the entry's expiry (a stale entry is kept until
    // used, then probed for 5 s and more).
    wait(
        "the client's entry for the VIP names b",
        Duration::from_secs(1),
        || p.vip_neighbour("c").is_some_and(|n| n.0 == mac_b),
    );

    // The old host comes back (rebooted: no address) and starts failoverd: it stays
    // standby and does not take the address back.
    p.spawn_failoverd("a");
    p.wait_peer_live("a");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert_eq!(p.watch.holders(), vec![p.ns("b")]);
    // Every block shipped before the death is served by b, to a client on a.
    p.assert_all_blocks("a");
    // And it receives snapshots from the new live host: b's next generation arrives,
    // verified, on a.
    let newest_a = |p: &Pair| {
        p.status("a")
            .at(&["newest_generation"])
            .and_then(|v| v.as_u64())
    };
    let had = newest_a(&p);
    p.grow("c", 2);
    ok(p.lab.b(), &p.failoverd("b", "snapshot"));
    let shipped = p
        .status("b")
        .at(&["generation"])
        .and_then(|v| v.as_u64())
        .expect("b shipped a generation");
    assert!(had < Some(shipped), "{had:?} then {shipped}");
    wait("a holds b's new generation", T, || {
        newest_a(&p) == Some(shipped)
    });
    p.grow("a", 2);
    p.assert_no_overlap();
}

#[test]
fn a_leftover_address_is_removed_at_start_unless_the_peer_confirms_it() {
    let p = Pair::start("leftover");
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    p.grow("b", 2);
    p.wait_peer_live("b");
    ok(p.lab.b(), &p.failoverd("b", "switchover"));
    p.wait_holders(&["b"]);

    // a's failoverd dies; its link goes down and a tagged copy of the address is on
    // its interface (as a crash in the middle of a claim would leave it), and failoverd
    // starts again, cut from its peer: it never claims at start, and removes the
    // leftover once the peer has not confirmed it within the grace.
    if let Some(f) = p.failoverd.borrow_mut()[0].take() {
        f.kill();
    }
    p.lab.link_down();
    // Tagged as failoverd tags it (iproute2 6.1 cannot set IFA_PROTO): added through
    // failoverd's own VIP shell, inside a's namespace.
    let vip = failoverd::vip::Vip::parse("eth0", &format!("{}/24", p.vip)).unwrap();
    p.lab.a().in_ns(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(vip.add())
            .unwrap()
    });
    assert!(ok(p.lab.a(), "ip -4 addr show dev eth0").contains(&format!("{}/", p.vip)));
    p.spawn_failoverd("a");
    wait("a removes its leftover", Duration::from_secs(15), || {
        !ok(p.lab.a(), "ip -4 addr show dev eth0").contains(&format!("{}/", p.vip))
    });
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    p.lab.link_up();
    p.wait_holders(&["b"]);
    assert!(
        p.log("a").contains("removing the leftover address"),
        "{}",
        p.log("a")
    );

    // The other half: the live host b's failoverd dies and starts again with the address
    // in place; the standby a confirms that b holds the current epoch, and b keeps the
    // address (it is never removed), under the same epoch, and is live again.
    p.wait_peer_live("a");
    let epoch_b = p.epoch("b");
    let since = |p: &Pair| p.watch.intervals()[&p.ns("b")].last().copied();
    let held = since(&p).expect("b holds the address");
    assert_eq!(held.to, None);
    if let Some(f) = p.failoverd.borrow_mut()[1].take() {
        f.kill();
    }
    p.spawn_failoverd("b");
    wait(
        "b keeps its leftover, live",
        Duration::from_secs(15),
        || p.status("b").str_at(&["role"]) == "live",
    );
    assert!(
        p.log("b").contains("keeping the leftover address"),
        "{}",
        p.log("b")
    );
    assert_eq!(
        p.view("b"),
        ("live".into(), epoch_b, Some(true), Some(epoch_b))
    );
    assert_eq!(p.view("a").0, "standby");
    assert_eq!(since(&p), Some(held), "b held the address throughout");
    // Its conode serves the chain through the address, and takes new blocks.
    p.assert_all_blocks("a");
    p.grow("a", 1);
    // The restarted failoverd stops the conode its killed predecessor started: a
    // switchover (asked on a) moves the service, every block with it.
    let conode_b = p.conode_pid("b").expect("b's conode runs");
    p.wait_peer_live("a");
    let out = ok(p.lab.a(), &p.failoverd("a", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    p.wait_holders(&["a"]);
    assert!(
        !std::path::Path::new(&format!("/proc/{conode_b}")).exists()
            || std::fs::read_to_string(format!("/proc/{conode_b}/stat")).is_ok_and(|s| s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')),
        "b's conode (pid {conode_b}) still runs"
    );
    assert!(
        p.log("b").contains(&format!(
            "stopping the conode (pid {conode_b}) an earlier failoverd started"
        )),
        "{}",
        p.log("b")
    );
    p.assert_all_blocks("b");
    p.assert_no_overlap();
}

#[test]
fn a_message_with_a_stale_or_future_epoch_or_an_unpinned_key_is_refused_and_changes_nothing() {
    let p = Pair::start("stale");
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    // A handover under epoch 0, sent by a host that has b's pinned key (a itself),
    // while b has seen epoch 1: refused, b stays standby.
    let stale = r#"{"epoch":0,"live":false,"may_hold":false,"newest_generation":null,"body":{"kind":"handover","generation":1}}"#;
    p.wait_holders(&["a"]);
    // b heard epoch 1 and persisted it as its own; a heard b's.
    p.wait_peer_live("b");
    wait("a hears b's epoch 1", Duration::from_secs(10), || {
        p.view("a").3 == Some(1)
    });
    let before = (p.view("a"), p.view("b"));
    assert_eq!(
        before,
        (
            ("live".into(), 1, Some(true), Some(1)),
            ("standby".into(), 1, Some(false), Some(1))
        )
    );
    let conf =
        failoverd::config::Config::load(std::path::Path::new(&p.p("a/failoverd.toml"))).unwrap();
    let key = failoverd::config::load_key(&conf.key_file).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // POST a body to b's /v1/core from a's namespace, with a's pinned key.
    let post = |body: Vec<u8>| {
        p.lab.a().in_ns(|| {
            rt.block_on(async {
                conode::tls::install_provider();
                let tls = conode::peer::PeerTls::new(&key).unwrap();
                failoverd::peer::PeerClient::new(
                    &tls,
                    &conf.peer.address,
                    conf.peer.public_key,
                    &conf.timeouts,
                )
                .unwrap()
                .request(reqwest::Method::POST, "/v1/core", body, "core message")
                .await
            })
        })
    };
    let answer = post(stale.as_bytes().to_vec());
    assert!(answer.is_ok(), "the message is delivered: {answer:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        p.log("b").contains("stale epoch"),
        "b logs the refusal:\n{}",
        p.log("b")
    );
    // Nothing changed, on either host: roles, epochs, the address, each one's view of
    // the other's epoch.
    assert_eq!((p.view("a"), p.view("b")), before);
    p.wait_holders(&["a"]);
    // A future epoch (far beyond anything a pair claims: a corrupt epoch file, a bug),
    // from the pinned key: refused whole, and nothing changes either; the next claim
    // is still the next epoch.
    for epoch in [1u64 << 40, u64::MAX] {
        let future = stale.replace("\"epoch\":0", &format!("\"epoch\":{epoch}"));
        let answer = post(future.into_bytes());
        assert!(answer.is_ok(), "the message is delivered: {answer:?}");
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            p.log("b").contains(&format!("future epoch {epoch}")),
            "b logs the refusal of {epoch}:\n{}",
            p.log("b")
        );
        assert_eq!((p.view("a"), p.view("b")), before);
    }
    // A handover under a new epoch from a key that is not pinned (a stranger that even
    // pins b's real key): refused at the TLS handshake, and nothing changes.
    let stranger = conode::keys::KeyPair::generate().unwrap();
    let forged = stale.replace("\"epoch\":0", "\"epoch\":2");
    let answer = p.lab.a().in_ns(|| {
        rt.block_on(async {
            let tls = conode::peer::PeerTls::new(&stranger).unwrap();
            failoverd::peer::PeerClient::new(
                &tls,
                &conf.peer.address,
                conf.peer.public_key,
                &conf.timeouts,
            )
            .unwrap()
            .request(
                reqwest::Method::POST,
                "/v1/core",
                forged.into_bytes(),
                "core message",
            )
            .await
        })
    });
    assert!(
        matches!(
            answer,
            Err(failoverd::error::PeerError::Unauthenticated { .. })
        ),
        "a stranger's message was not refused as unauthenticated: {answer:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!((p.view("a"), p.view("b")), before);
    // Garbage is refused at the door, and changes nothing either.
    let garbage = post(b"{\"epoch\":\"x\"}".to_vec());
    assert!(garbage.is_err(), "{garbage:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!((p.view("a"), p.view("b")), before);
    // The next claim is epoch 2: a switchover to b.
    let out = ok(p.lab.b(), &p.failoverd("b", "switchover"));
    assert!(out.contains("live under epoch 2"), "{out}");
    p.wait_holders(&["b"]);
    p.assert_no_overlap();
}

/// `h`'s verdict of health check `check` in its status: (passing, reason).
fn verdict(p: &Pair, h: &str, check: &str) -> Option<(bool, String)> {
    let st = p.status(h);
    st.at(&["health"])?
        .as_array()?
        .iter()
        .find(|v| v["check"] == check)
        .map(|v| {
            (
                v["ok"] == true,
                v["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// The live host's conode dies (killed; failoverd does not restart it): the live host's
/// check of its own conode and the standby's check of the live conode through the
/// address fail, each with its reason, in `status` (JSON and text) and the log; the
/// standby still hears the live failoverd. Alerts only: nobody is promoted.
#[test]
fn health_verdicts_fail_with_their_reasons_in_status_when_the_live_conode_dies() {
    let p = Pair::start("health");
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    p.grow("b", 1);
    wait("every check passes", T, || {
        verdict(&p, "a", "own_conode").is_some_and(|v| v.0)
            && verdict(&p, "b", "live_conode").is_some_and(|v| v.0)
            && verdict(&p, "b", "live_peer").is_some_and(|v| v.0)
    });
    let conode_a = p.conode_pid("a").expect("a's conode runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(conode_a as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait("a's check of its own conode fails", T, || {
        verdict(&p, "a", "own_conode").is_some_and(|v| !v.0)
    });
    wait("b's check of the live conode fails", T, || {
        verdict(&p, "b", "live_conode").is_some_and(|v| !v.0)
    });
    let (_, reason) = verdict(&p, "a", "own_conode").unwrap_or_default();
    assert!(
        reason.starts_with("the conode exited (signal: 9")
            || reason == "its admin socket does not answer",
        "{reason}"
    );
    // The first failing verdict says why: the conode exited.
    assert!(
        p.log("a")
            .contains("health OwnConode: failing (the conode exited (signal: 9"),
        "{}",
        p.log("a")
    );
    let (_, reason) = verdict(&p, "b", "live_conode").unwrap_or_default();
    assert!(
        reason.starts_with(&format!("Status at {}:7000: ", p.vip)) && reason.len() > 25,
        "{reason}"
    );
    assert!(
        p.log("b").contains("health LiveConode: failing (Status at"),
        "{}",
        p.log("b")
    );
    assert_eq!(verdict(&p, "b", "live_peer").map(|v| v.0), Some(true));
    // The text form shows them too.
    let text = ok(p.lab.b(), &p.failoverd("b", "status"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("health:") && l.contains("live_conode FAILING: Status at")),
        "{text}"
    );
    let text = ok(p.lab.a(), &p.failoverd("a", "status"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("health:") && l.contains("own_conode FAILING: ")),
        "{text}"
    );
    // They alert; they do not promote or demote.
    assert_eq!(p.view("a").0, "live");
    assert_eq!(p.view("b").0, "standby");
    p.wait_holders(&["a"]);
    p.assert_no_overlap();
}

/// Start follower conode `name` on the client host (port `port`, as nobody); returns
/// its public.toml.
fn follower(p: &Pair, name: &str, port: u16) -> String {
    let c = p.lab.client();
    let conode = conode_bin().display().to_string();
    let dir = p.p(name);
    ok(
        c,
        &format!(
            "{conode} -c {dir}/private.toml setup --non-interactive --host {} --port {port} --description {name} && mkdir -p {dir}/data && chown -R nobody:nogroup {dir}",
            c.addr()
        ),
    );
    let mut cmd = c.command("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(conode_bin())
        .arg("-c")
        .arg(format!("{dir}/private.toml"))
        .arg("server")
        .env("CONODE_SERVICE_PATH", format!("{dir}/data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ = c.spawn(cmd);
    std::fs::read_to_string(format!("{dir}/public.toml")).unwrap()
}

/// The blocks acknowledged after the standby's last generation are on the followers: a
/// forced promote after the live host died brings them back before the first new block.
#[test]
fn a_forced_promote_loses_no_acknowledged_block_while_the_followers_are_up() {
    let p = Pair::start_in(Lab::with_client("nolost"));
    // A roster of the VIP conode (leader) and two followers on the client host.
    let mut roster = std::fs::read_to_string(p.p("a/co/public.toml")).unwrap();
    roster.push_str(&follower(&p, "f1", 7010));
    roster.push_str(&follower(&p, "f2", 7020));
    std::fs::write(p.dir.path().join("roster.toml"), roster).unwrap();
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    let conode = conode_bin().display().to_string();
    let j = Json::parse(&ok(
        p.lab.client(),
        &format!(
            "echo genesis | {conode} -c {} chain create {} --data - --json",
            p.p("a/co/private.toml"),
            p.p("roster.toml")
        ),
    ))
    .unwrap();
    *p.chain.borrow_mut() = j.str_at(&["chain"]).to_string();
    p.grow("c", 4);
    // Shipped: b holds the chain up to here.
    ok(p.lab.a(), &p.failoverd("a", "snapshot"));
    let shipped = p.index.get();
    // Acknowledged after the last snapshot: on a and the followers only.
    p.grow("c", 5);
    let acknowledged = p.index.get();
    assert!(acknowledged > shipped);

    // a dies at once (failoverd and conode killed, its address gone with the power).
    let conode_a = p.conode_pid("a").expect("a's conode runs");
    if let Some(f) = p.failoverd.borrow_mut()[0].take() {
        f.kill();
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(conode_a as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    ok(p.lab.a(), &format!("ip addr del {}/24 dev eth0", p.vip));
    p.wait_peer_reachable("b", false, T);
    let out = ok(p.lab.b(), &p.failoverd("b", "promote --force"));
    assert!(out.contains("live under epoch"), "{out}");
    p.wait_holders(&["b"]);
    // Every acknowledged block, those after the shipped generation included, is served
    // by the new leader; the next block follows them.
    p.assert_all_blocks("c");
    p.grow("c", 2);
    assert_eq!(p.index.get(), acknowledged + 2);
    p.assert_no_overlap();
}

/// A client appends without pause through the virtual IP while the live host hands over:
/// every block it was told is stored is on the new live host, with the same hash (the
/// final snapshot froze the old conode: a block is acknowledged before it or refused
/// after it, never lost), and the writer goes on against the new host.
#[test]
fn blocks_appended_while_a_switchover_runs_are_all_kept() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let p = Pair::start_in(Lab::with_client("swrace"));
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    p.grow("c", 2);
    p.wait_peer_live("b");
    let chain = p.chain.borrow().clone();
    let conode = conode_bin().display().to_string();
    let private = p.p("a/co/private.toml");
    let data = p.p("racedata");
    let (stop, switched) = (AtomicBool::new(false), AtomicBool::new(false));
    let client = p.lab.client();
    // (index, hash, after the switchover) of every acknowledged block; refusals counted.
    let (acked, refused) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut acked, mut refused) = (Vec::new(), 0u32);
            for i in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::fs::write(&data, format!("race {i}")).unwrap();
                let r = client.sh(
                    &format!("{conode} -c {private} chain add {chain} --data {data} --json"),
                    Duration::from_secs(30),
                );
                match (r.code, Json::parse(&r.stdout)) {
                    (Some(0), Ok(j)) => acked.push((
                        j.at(&["index"]).and_then(|v| v.as_u64()).unwrap(),
                        j.str_at(&["hash"]).to_string(),
                        switched.load(Ordering::SeqCst),
                    )),
                    _ => refused += 1,
                }
            }
            (acked, refused)
        });
        std::thread::sleep(Duration::from_millis(500));
        let out = ok(p.lab.b(), &p.failoverd("b", "switchover"));
        assert!(out.contains("live under epoch"), "{out}");
        switched.store(true, Ordering::SeqCst);
        p.wait_holders(&["b"]);
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap()
    });
    eprintln!(
        "{} blocks acknowledged ({} after the switchover), {refused} appends refused",
        acked.len(),
        acked.iter().filter(|a| a.2).count()
    );
    assert!(
        acked.iter().any(|a| !a.2) && acked.iter().any(|a| a.2),
        "the writer was acknowledged before and after the switchover"
    );
    // Each acknowledged block, as the new live host serves it.
    for (index, hash, _) in &acked {
        let got = ok(
            client,
            &format!("{conode} -c {private} chain get {chain} --index {index} --json"),
        );
        assert!(
            got.contains(hash.as_str()),
            "block {index} ({hash}) acknowledged but not served after the switchover: {got}"
        );
    }
    p.assert_no_overlap();
}

/// Datagrams received on a Unix socket the test owns (systemd's `NOTIFY_SOCKET`), each
/// with when it arrived.
struct NotifySocket {
    path: std::path::PathBuf,
    got: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(path: std::path::PathBuf) -> NotifySocket {
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        // Ends when the test drops the last handle to `got` (checked between reads).
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while std::sync::Arc::strong_count(&g) > 1 {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    g.lock().unwrap().push((Instant::now(), text));
                }
            }
        });
        NotifySocket { path, got }
    }

    fn count(&self, what: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t == what)
            .count()
    }

    fn wait_for(&self, what: &str, within: Duration) {
        wait(
            &format!("{what} on {}", self.path.display()),
            within,
            || self.count(what) > 0,
        );
    }
}

/// `/metrics` on 127.0.0.1:`port` in `host`, by the reference parser (both parsers must
/// accept it): `name{label="v",...}` → value.
fn scrape(host: &Host, port: u16) -> std::collections::BTreeMap<String, f64> {
    system_tests::prometheus::samples(&ok(
        host,
        &format!("curl -sf http://127.0.0.1:{port}/metrics"),
    ))
}

fn sample(m: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing from the scrape: {m:?}"))
}

/// The environment a hook run saw, from the files the hook wrote (`env > FILE.$$`).
fn hook_runs(
    dir: &std::path::Path,
    prefix: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let mut runs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| {
            let env = std::fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once('='))
                .filter(|(k, _)| k.starts_with("FAILOVERD_"))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::HashMap<_, _>>();
            (e.metadata().unwrap().modified().unwrap(), env)
        })
        .collect();
    // In the order they ran (each file is written once, at the hook's start).
    runs.sort_by_key(|(t, _)| *t);
    runs.into_iter().map(|(_, env)| env).collect()
}

/// Production operations on a running pair: systemd's notify protocol (READY, watchdog
/// pings, STOPPING) against a socket the test owns; notify hooks with their facts, the
/// role hooks of both hosts hanging (15 s timeout) while a switchover completes in under
/// 5 s, then killed at their timeout; metrics of both programs on both hosts, read by
/// the reference Prometheus parser, moving with the switchover (the conode's: the old
/// live host's port gone, the new one's counters and chain height growing with the
/// blocks appended through the address); a stop of the live failoverd releasing the
/// address and the conode; `release-vip` after a kill -9.
#[test]
fn notify_hooks_metrics_and_release_on_a_running_pair() {
    let p = Pair::start("operations");
    let hooks = p.dir.path().join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    // Both standby: stop them (nothing is held), add the hooks, start them again under
    // notify sockets with a 1 s watchdog, and with the conode's metrics turned on.
    // While this file exists the role hooks hang (until killed at their timeout).
    let hang = hooks.join("hang");
    std::fs::write(&hang, "").unwrap();
    for h in ["a", "b"] {
        p.stop_failoverd(h);
        let cfg = p.dir.path().join(format!("{h}/failoverd.toml"));
        let text = std::fs::read_to_string(&cfg).unwrap();
        let hd = hooks.display();
        let text = text
            .replace(
                "on_role_change = \"\"",
                // Records its facts, then hangs while the flag is there.
                &format!(
                    "on_role_change = \"/usr/bin/env > {hd}/{h}-role.$$; if [ -e {} ]; then exec /bin/sleep 60; fi\"",
                    hang.display()
                ),
            )
            .replace(
                "on_health_change = \"\"",
                &format!("on_health_change = \"/usr/bin/env > {hd}/{h}-health.$$\""),
            )
            .replace(
                "timeout = \"10s\"",
                &format!("timeout = \"{}s\"", HOOK_TIMEOUT.as_secs()),
            );
        std::fs::write(&cfg, text).unwrap();
    }
    let notify = [
        NotifySocket::bind(p.dir.path().join("notify-a")),
        NotifySocket::bind(p.dir.path().join("notify-b")),
    ];
    for (i, h) in ["a", "b"].into_iter().enumerate() {
        p.spawn_failoverd_env(
            h,
            &[
                ("NOTIFY_SOCKET", notify[i].path.display().to_string()),
                ("WATCHDOG_USEC", "1000000".into()),
                ("CONODE_METRICS", "127.0.0.1:7782".into()),
            ],
        );
        notify[i].wait_for("READY=1", T);
    }
    for h in ["a", "b"] {
        p.wait_peer_reachable(h, true, T);
    }
    // Pings every quarter of the watchdog's second, from the decision loop.
    let pings = notify[0].count("WATCHDOG=1");
    std::thread::sleep(Duration::from_secs(2));
    let in_2s = notify[0].count("WATCHDOG=1") - pings;
    assert!((4..=20).contains(&in_2s), "{in_2s} watchdog pings in 2 s");

    // a becomes live: its role hook runs with the facts, and hangs.
    let promoted = Instant::now();
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    p.grow("b", 3);
    let epoch_a = p.epoch("a");
    wait("a's role hook ran", T, || {
        !hook_runs(&hooks, "a-role.").is_empty()
    });
    let runs = hook_runs(&hooks, "a-role.");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let r = &runs[0];
    for (k, v) in [
        ("FAILOVERD_EVENT", "role_change".to_string()),
        ("FAILOVERD_ROLE", "live".into()),
        ("FAILOVERD_PREVIOUS_ROLE", "standby".into()),
        ("FAILOVERD_CAUSE", "promote".into()),
        ("FAILOVERD_EPOCH", epoch_a.to_string()),
        ("FAILOVERD_VIP", format!("{}/24", p.vip)),
        ("FAILOVERD_PEER", format!("{}:7780", p.lab.b().addr())),
    ] {
        assert_eq!(r.get(k), Some(&v), "{k} in {r:?}");
    }
    assert!(!r.get("FAILOVERD_REASON").unwrap().is_empty());

    // Metrics of both programs on the live host, through the reference parser.
    let fa = scrape(p.lab.a(), 7781);
    assert_eq!(sample(&fa, "failoverd_role{role=\"live\"}"), 1.0);
    assert_eq!(sample(&fa, "failoverd_vip_held"), 1.0);
    assert_eq!(sample(&fa, "failoverd_epoch"), epoch_a as f64);
    assert_eq!(
        sample(&fa, "failoverd_failovers_total{cause=\"promote\"}"),
        1.0
    );
    wait("a times its own conode's health check", T, || {
        scrape(p.lab.a(), 7781)
            .get("failoverd_health_check_seconds_count{check=\"own_conode\"}")
            .is_some_and(|n| *n >= 1.0)
    });
    // A live host shows its own check's verdict, no stale one of its standby days.
    let fa = scrape(p.lab.a(), 7781);
    for stale in ["live_conode", "live_peer"] {
        let k = format!("failoverd_health{{check=\"{stale}\"}}");
        assert!(!fa.contains_key(&k), "{k} on the live host: {fa:?}");
    }
    // a's conode counted what it did as the chain's leader: the chain created, two
    // blocks appended, the chain 3 blocks high (the DB gauges are read every 2 s).
    let chain = p.chain.borrow().clone();
    let height = format!("conode_chain_height{{chain=\"{chain}\"}}");
    let stores = "conode_requests_total{method=\"StoreSkipBlock\",service=\"Skipchain\"}";
    wait("a's conode shows the chain 3 blocks high", T, || {
        scrape(p.lab.a(), 7782).get(&height) == Some(&3.0)
    });
    let ca = scrape(p.lab.a(), 7782);
    assert_eq!(sample(&ca, "conode_chains_created_total"), 1.0, "{ca:?}");
    assert_eq!(sample(&ca, "conode_blocks_appended_total"), 2.0, "{ca:?}");
    assert_eq!(sample(&ca, "conode_append_seconds_count"), 2.0, "{ca:?}");
    assert!(sample(&ca, stores) >= 3.0, "{ca:?}");
    let fb = scrape(p.lab.b(), 7781);
    assert_eq!(sample(&fb, "failoverd_role{role=\"standby\"}"), 1.0);
    assert_eq!(sample(&fb, "failoverd_health{check=\"live_conode\"}"), 1.0);

    // The switchover completes (b live, a standby, b's conode taking blocks through the
    // address) well within the hooks' timeout, while a's role hook from the promote
    // still hangs and b's hangs from the moment b is live.
    p.wait_peer_live("b");
    assert!(
        !p.log("a").contains("still running after its timeout"),
        "a's role hook hangs still"
    );
    let switched = Instant::now();
    let out = ok(p.lab.b(), &p.failoverd("b", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    p.wait_holders(&["b"]);
    assert_eq!(p.view("a").0, "standby");
    assert_eq!(p.view("b").0, "live");
    p.grow("a", 1);
    let took = switched.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a switchover with hanging hooks took {took:?} (hook timeout {HOOK_TIMEOUT:?})"
    );
    assert!(
        !p.log("a").contains("still running after its timeout"),
        "the switchover completed while a's role hook still hung: {}",
        p.log("a")
    );
    let epoch_b = p.epoch("b");
    wait("b's role hook ran", T, || {
        !hook_runs(&hooks, "b-role.").is_empty()
    });
    let rb = &hook_runs(&hooks, "b-role.")[0];
    assert_eq!(
        rb.get("FAILOVERD_CAUSE").map(String::as_str),
        Some("switchover")
    );
    assert_eq!(rb.get("FAILOVERD_EPOCH"), Some(&epoch_b.to_string()));
    // From here on the role hooks return at once.
    std::fs::remove_file(&hang).unwrap();

    // The conode's metrics moved with the switchover: a's conode stopped (its metrics
    // port is gone), b's counts the block appended through the address, and moves with
    // the next ones.
    assert!(p.conode_pid("a").is_none(), "a's conode is stopped");
    assert!(
        p.lab
            .a()
            .sh("curl -sf http://127.0.0.1:7782/metrics", T)
            .code
            != Some(0),
        "a's conode metrics port is gone"
    );
    wait("b's conode shows the chain 4 blocks high", T, || {
        scrape(p.lab.b(), 7782).get(&height) == Some(&4.0)
    });
    let cb = scrape(p.lab.b(), 7782);
    assert_eq!(sample(&cb, "conode_blocks_appended_total"), 1.0, "{cb:?}");
    assert_eq!(sample(&cb, "conode_chains_led"), 1.0, "{cb:?}");
    p.grow("a", 2);
    p.assert_all_blocks("a");
    wait("b's conode shows the chain 6 blocks high", T, || {
        scrape(p.lab.b(), 7782).get(&height) == Some(&6.0)
    });
    let cb2 = scrape(p.lab.b(), 7782);
    assert_eq!(sample(&cb2, "conode_blocks_appended_total"), 3.0, "{cb2:?}");
    assert_eq!(sample(&cb2, "conode_append_seconds_count"), 3.0, "{cb2:?}");
    assert!(
        sample(&cb2, stores) >= sample(&cb, stores) + 2.0,
        "{cb:?} then {cb2:?}"
    );
    assert!(
        sample(&cb2, "conode_db_bytes") >= sample(&cb, "conode_db_bytes"),
        "{cb:?} then {cb2:?}"
    );

    // The hanging hooks were killed at their timeout: a's, started by the promote, and
    // b's, started by the switchover (not earlier: they hung through it).
    for (h, since, what) in [("a", promoted, "promote"), ("b", switched, "switchover")] {
        wait(&format!("{h}'s role hook killed at its timeout"), T, || {
            p.log(h)
                .contains("hook on_role_change still running after its timeout")
        });
        let at = since.elapsed();
        assert!(
            at >= HOOK_TIMEOUT && at < HOOK_TIMEOUT + Duration::from_secs(10),
            "{h}'s hook killed {at:?} after the {what}"
        );
    }
    // a's second role hook (one at a time: it waited for the first) saw the handover.
    wait("a's second role hook ran", T, || {
        hook_runs(&hooks, "a-role.").len() == 2
    });
    let ra = &hook_runs(&hooks, "a-role.")[1];
    assert_eq!(
        ra.get("FAILOVERD_ROLE").map(String::as_str),
        Some("standby")
    );
    assert_eq!(
        ra.get("FAILOVERD_CAUSE").map(String::as_str),
        Some("handed_over")
    );

    // The metrics of both failoverds moved with it.
    wait("b's metrics show it live", T, || {
        let fb = scrape(p.lab.b(), 7781);
        fb.get("failoverd_role{role=\"live\"}") == Some(&1.0)
    });
    let fb = scrape(p.lab.b(), 7781);
    assert_eq!(
        sample(&fb, "failoverd_failovers_total{cause=\"switchover\"}"),
        1.0
    );
    assert_eq!(sample(&fb, "failoverd_epoch"), epoch_b as f64);
    assert_eq!(
        sample(
            &fb,
            "failoverd_hook_runs_total{hook=\"role_change\",result=\"timeout\"}"
        ),
        1.0
    );
    let role_timeouts = "failoverd_hook_runs_total{hook=\"role_change\",result=\"timeout\"}";
    wait("a counts its second role hook", T, || {
        scrape(p.lab.a(), 7781).get("failoverd_hook_runs_total{hook=\"role_change\",result=\"ok\"}")
            == Some(&1.0)
    });
    let fa = scrape(p.lab.a(), 7781);
    assert_eq!(sample(&fa, role_timeouts), 1.0);
    assert_eq!(sample(&fa, "failoverd_role{role=\"live\"}"), 0.0);
    assert_eq!(
        sample(
            &fa,
            "failoverd_role_changes_total{cause=\"handed_over\",to=\"standby\"}"
        ),
        1.0
    );

    // Stopping the live failoverd releases the address and stops the conode.
    p.stop_failoverd("b");
    notify[1].wait_for("STOPPING=1", Duration::from_secs(1));
    assert!(
        p.watch.wait_holders(&[], Duration::from_secs(1)),
        "{:?}",
        p.watch.holders()
    );
    assert!(p.conode_pid("b").is_none(), "b's conode was stopped");
    assert!(p.log("b").contains("stopping: the address is released"));

    // b comes back as standby; a promotes; a's failoverd is killed: the address stays,
    // and `release-vip` (the unit's ExecStopPost) removes it, once.
    p.spawn_failoverd("b");
    p.wait_peer_reachable("a", true, T);
    let e = refused(p.lab.a(), &p.failoverd("a", "release-vip"));
    assert!(e.contains("in use by another failoverd"), "{e}");
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    if let Some(f) = p.failoverd.borrow_mut()[0].take() {
        f.kill();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        p.watch.holders(),
        vec![p.ns("a")],
        "a kill leaves the address"
    );
    let out = ok(p.lab.a(), &p.failoverd("a", "release-vip"));
    assert!(
        out.contains(&format!("removed {}/24 from eth0", p.vip)),
        "{out}"
    );
    assert!(p.watch.wait_holders(&[], Duration::from_secs(1)));
    let out = ok(p.lab.a(), &p.failoverd("a", "release-vip"));
    assert!(out.contains("nothing to release"), "{out}");
    p.assert_no_overlap();
}

/// The pair's own checker fails a test that ends with two holders, though the test
/// asserts nothing itself: the client host adds the address by hand while a holds it,
/// and the pair's drop panics naming both.
#[test]
#[should_panic(expected = "both held it")]
fn the_pair_fails_a_test_in_which_two_hosts_held_the_address() {
    let p = Pair::start_in(Lab::with_client("overlap"));
    ok(p.lab.a(), &p.failoverd("a", "promote"));
    p.wait_holders(&["a"]);
    ok(
        p.lab.client(),
        &format!("ip addr add {}/24 dev eth0", p.vip),
    );
    p.wait_holders(&["a", "c"]);
}

#[test]
fn an_ipv6_address_moves_by_switchover_and_forced_promote_with_no_block_lost_and_never_two_holders()
{
    let p = Pair::start_serving(Lab::with_client("fo-v6"), Serve::Ipv6);
    let vip6 = p.vip6.expect("an IPv6 pair");
    assert!(p.watch.holders().is_empty(), "never claimed at start");
    let (mac_a, mac_b) = (
        p.lab.a().mac().to_lowercase(),
        p.lab.b().mac().to_lowercase(),
    );

    let out = ok(p.lab.a(), &p.failoverd("a", "promote"));
    assert!(out.contains("live under epoch 1"), "{out}");
    p.wait_holders(&["a"]);
    // The address is in service only once the kernel's DAD found no other holder.
    let shown = ok(p.lab.a(), &format!("ip -6 addr show dev eth0 to {}", vip6));
    assert!(
        shown.contains(&vip6.to_string()) && !shown.contains("tentative"),
        "{shown}"
    );
    p.grow("c", 5);
    assert_eq!(
        p.vip_neighbour("c").map(|(mac, _)| mac).as_deref(),
        Some(mac_a.as_str())
    );

    // Switchover to b: the client's neighbour entry moves at once (unsolicited
    // neighbour advertisement), every block is there, and it goes on appending.
    p.wait_peer_live("b");
    let t = std::time::Instant::now();
    let out = ok(p.lab.b(), &p.failoverd("b", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    eprintln!("IPv6 switchover a -> b answered in {:?}", t.elapsed());
    p.wait_holders(&["b"]);
    wait(
        "the client's neighbour entry names b",
        Duration::from_secs(2),
        || p.vip_neighbour("c").map(|(mac, _)| mac).as_deref() == Some(mac_b.as_str()),
    );
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert_eq!(p.status("b").str_at(&["role"]), "live");
    p.assert_all_blocks("c");
    p.grow("c", 3);

    // And back to a.
    p.wait_peer_live("a");
    let out = ok(p.lab.a(), &p.failoverd("a", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    p.wait_holders(&["a"]);
    p.assert_all_blocks("c");
    p.grow("c", 2);
    ok(p.lab.a(), &p.failoverd("a", "snapshot"));

    // a dies (failoverd and conode killed, its address gone with the power): b is
    // promoted by force, and a client on the link goes on through the same address.
    let conode_a = p.conode_pid("a").expect("a's conode runs");
    if let Some(f) = p.failoverd.borrow_mut()[0].take() {
        f.kill();
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(conode_a as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill a's conode");
    ok(p.lab.a(), &format!("ip addr del {}/64 dev eth0", vip6));
    wait("b counts a gone", T, || {
        p.status("b")
            .at(&["peer", "reachable"])
            .and_then(|v| v.as_bool())
            == Some(false)
    });
    let r = p.lab.b().sh(&p.failoverd("b", "promote"), T);
    assert_eq!(r.code, Some(1), "a plain promote with the peer gone: {r:?}");
    let t = std::time::Instant::now();
    let out = ok(p.lab.b(), &p.failoverd("b", "promote --force"));
    assert!(out.contains("live under epoch"), "{out}");
    eprintln!("IPv6 promote --force answered in {:?}", t.elapsed());
    p.wait_holders(&["b"]);
    wait(
        "the client's neighbour entry names b",
        Duration::from_secs(2),
        || p.vip_neighbour("c").map(|(mac, _)| mac).as_deref() == Some(mac_b.as_str()),
    );
    p.assert_all_blocks("c");
    p.grow("c", 2);

    // a comes back: it stays standby and never takes the address back.
    p.spawn_failoverd("a");
    p.wait_peer_live("a");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert_eq!(p.watch.holders(), vec![p.ns("b")]);
    p.assert_all_blocks("c");
    p.assert_no_overlap();
}

/// Without `[vip] address` (a DNS name moved by a hook): the role, the epoch and the
/// conode move with switchover and back, no address is added on any host, and each
/// host's role hook gets what a DNS update needs (the new role, the previous one, the
/// epoch, the cause; `FAILOVERD_VIP` empty).
#[test]
fn without_a_virtual_ip_the_role_hook_moves_the_service_name() {
    let p = Pair::start_serving(Lab::with_client("fo-dns"), Serve::NoVip);
    let addresses = |h: &str| ok(p.host(h), "ip -o addr show dev eth0 | wc -l");
    let before = [addresses("a"), addresses("b")];
    let hook = |h: &str| {
        std::fs::read_to_string(p.dir.path().join(format!("{h}/role-hook"))).unwrap_or_default()
    };
    // Wait until `h`'s hook recorded a line starting with `want`.
    let hook_ran = |h: &str, want: &str| {
        let t = std::time::Instant::now();
        while !hook(h).lines().any(|l| l.starts_with(want)) {
            assert!(
                t.elapsed() < T,
                "{h}'s role hook never recorded {want:?}: {:?}",
                hook(h)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let conode_answers = |h: &str| {
        p.host(h)
            .sh(
                &format!(
                    "{} -c {} check {}",
                    conode_bin().display(),
                    p.p(&format!("{h}/co/private.toml")),
                    p.p("a/co/public.toml")
                ),
                T,
            )
            .code
            == Some(0)
    };

    let out = ok(p.lab.a(), &p.failoverd("a", "promote"));
    assert!(out.contains("live under epoch 1"), "{out}");
    hook_ran("a", "live standby 1 promote vip=");
    assert!(conode_answers("a"), "a's conode does not answer Status");

    p.wait_peer_live("b");
    let out = ok(p.lab.b(), &p.failoverd("b", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    hook_ran("b", "live standby 2 switchover vip=");
    // Handed over under the epoch it held (the new one is the peer's).
    hook_ran("a", "standby live 1 handed_over vip=");
    assert!(conode_answers("b"), "b's conode does not answer Status");
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert!(p.conode_pid("a").is_none(), "a's conode still runs");

    p.wait_peer_live("a");
    let out = ok(p.lab.a(), &p.failoverd("a", "switchover"));
    assert!(out.contains("live under epoch 3"), "{out}");
    hook_ran("a", "live standby 3 switchover vip=");
    assert!(conode_answers("a"));
    assert!(p.conode_pid("b").is_none(), "b's conode still runs");
    // No address came or went on either host.
    assert_eq!([addresses("a"), addresses("b")], before);
}
