//! failoverd's pair beyond the IPv4 virtual IP (`tests/failover_netns.rs`), in network
//! namespaces, end to end.
//!
//! An **IPv6** virtual IP: the conode's public address is `tls://[fdXX::100]:7000`, failoverd adds
//! the address and waits for the kernel's duplicate address detection (the probe),
//! announces it with unsolicited neighbour advertisements, and a client on the same
//! link (a third namespace) appends blocks through it. A switchover and back, then the
//! live host killed and a forced promote; the checker of record (the kernel's address
//! events, `system_tests::addrwatch`) watches all three namespaces throughout and fails
//! the test on any overlap. The peers talk over IPv4 (the pair's own addresses); what
//! is IPv6 here is the address clients use.
//!
//! **No virtual IP** (`[vip] address` empty: a DNS name moved by a hook, the operating
//! docs' alternative): switchover and back move the role, the epoch and the conode, no
//! address is added anywhere, and each host's `on_role_change` hook gets the facts it
//! needs to move the name.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv6Addr};
use std::process::Stdio;
use std::time::Duration;

use system_tests::addrwatch::AddrWatch;
use system_tests::netns::{Host, Lab, Spawned};
use system_tests::{bin, conode_bin, wait_until as wait, Json};

const T: Duration = Duration::from_secs(60);

fn ok(host: &Host, script: &str) -> String {
    let r = host.sh(script, T);
    assert_eq!(
        r.code,
        Some(0),
        "`{script}` in {}:\n{}{}",
        host.ns(),
        r.stdout,
        r.stderr
    );
    r.stdout
}

struct Pair6 {
    lab: Lab,
    dir: tempfile::TempDir,
    /// The IPv6 VIP; `None` for a pair without one.
    vip: Option<Ipv6Addr>,
    failoverd: RefCell<[Option<Spawned>; 2]>,
    chain: RefCell<String>,
    index: Cell<u64>,
}

impl Pair6 {
    fn vip(&self) -> Ipv6Addr {
        self.vip.expect("a pair with an IPv6 VIP")
    }

    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    fn host(&self, h: &str) -> &Host {
        match h {
            "a" => self.lab.a(),
            "b" => self.lab.b(),
            _ => self.lab.client(),
        }
    }

    fn cmd(&self, h: &str, args: &str) -> String {
        format!(
            "{} -c {} {args}",
            bin("failoverd").display(),
            self.p(&format!("{h}/failoverd.toml"))
        )
    }

    fn status(&self, h: &str) -> Json {
        Json::parse(&ok(self.host(h), &self.cmd(h, "status --json"))).expect("status JSON")
    }

    fn spawn_failoverd(&self, h: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("failoverd-{h}.log")))
            .expect("log file");
        let mut cmd = self.host(h).command(bin("failoverd"));
        cmd.arg("-c")
            .arg(self.p(&format!("{h}/failoverd.toml")))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let s = self.host(h).spawn(cmd);
        self.failoverd.borrow_mut()[usize::from(h == "b")] = Some(s);
        let status = self.cmd(h, "status");
        let host = self.host(h);
        wait(&format!("failoverd on {h}"), T, || {
            host.sh(&status, T).code == Some(0)
        });
    }

    fn wait_peer_live(&self, h: &str) {
        wait(&format!("{h} hears its peer is live"), T, || {
            let st = self.status(h);
            st.at(&["peer", "live"]).and_then(|v| v.as_bool()) == Some(true)
                && st.at(&["epoch"]).and_then(|v| v.as_u64())
                    == st.at(&["peer", "epoch"]).and_then(|v| v.as_u64())
        });
    }

    /// Create the chain or append `n` blocks from the client, through the IPv6 VIP.
    fn grow(&self, n: u64) {
        let conode = conode_bin().display().to_string();
        for i in 0..n {
            let data = self.p("blockdata");
            std::fs::write(&data, format!("v6 block {i} after {}", self.index.get()))
                .expect("write block data");
            let chain = self.chain.borrow().clone();
            let cmd = if chain.is_empty() {
                format!(
                    "{conode} -c {} chain create {} --data {data} --json",
                    self.p("a/co/private.toml"),
                    self.p("a/co/public.toml")
                )
            } else {
                format!(
                    "{conode} -c {} chain add {} --data {data} --json",
                    self.p("a/co/private.toml"),
                    chain
                )
            };
            let j = Json::parse(&ok(self.lab.client(), &cmd)).expect("chain JSON");
            if chain.is_empty() {
                *self.chain.borrow_mut() = j.str_at(&["chain"]).to_string();
            }
            self.index
                .set(j.at(&["index"]).and_then(|v| v.as_u64()).expect("index"));
        }
    }

    /// Every block is served through the VIP to the client.
    fn assert_all_blocks(&self) {
        let conode = conode_bin().display().to_string();
        let chain = self.chain.borrow().clone();
        for i in 0..=self.index.get() {
            ok(
                self.lab.client(),
                &format!(
                    "{conode} -c {} chain get {} --index {i}",
                    self.p("a/co/private.toml"),
                    chain
                ),
            );
        }
    }

    fn conode_pid(&self, h: &str) -> Option<u32> {
        let needle = self.p(&format!("{h}/co/private.toml"));
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            (cmd.contains(&needle) && cmd.contains("server")).then_some(pid)
        })
    }

    /// The client's neighbour entry for the VIP: its MAC, if it has one.
    fn client_neighbour(&self) -> Option<String> {
        let out = ok(
            self.lab.client(),
            &format!("ip -6 neigh show {} dev eth0", self.vip()),
        );
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "lladdr")?;
        words.get(at + 1).map(|m| m.to_lowercase())
    }
}

impl Drop for Pair6 {
    fn drop(&mut self) {
        // The conodes were started by this test's failoverds.
        for h in ["a", "b"] {
            if let Some(pid) = self.conode_pid(h) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if std::thread::panicking() || std::env::var_os("FAILOVER_TEST_LOGS").is_some() {
            for h in ["a", "b"] {
                let log =
                    std::fs::read_to_string(self.dir.path().join(format!("failoverd-{h}.log")))
                        .unwrap_or_default();
                eprintln!("----- failoverd-{h}.log\n{log}");
            }
        }
    }
}

/// a, b and a client on one link, each with an IPv6 address (`fdXX::1..3/64`, no DAD:
/// unique by construction); one conode identity whose address is `[fdXX::100]:7000`
/// (the VIP), or with `hook` `localhost:7000` and no VIP (`[vip] address` empty) and an
/// `on_role_change` hook that appends its facts to `H/role-hook` on each host; run by
/// failoverd on each host as `nobody`.
fn start(name: &str, hook: bool) -> Pair6 {
    let lab = Lab::with_client(name);
    let net = lab.add_ipv6();
    let vip: Option<Ipv6Addr> = if hook {
        None
    } else {
        Some(format!("{net}100").parse().expect("the lab's IPv6 VIP"))
    };
    let host = match vip {
        Some(v) => v.to_string(),
        None => "localhost".to_string(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |p: &str| dir.path().join(p).display().to_string();
    let conode = conode_bin().display().to_string();
    ok(
        lab.a(),
        &format!(
            "{conode} -c {} setup --non-interactive --host {host} --port 7000 --description failover-modes",
            d("a/co/private.toml")
        ),
    );
    let public = std::fs::read_to_string(dir.path().join("a/co/public.toml")).expect("public");
    if let Some(vip) = vip {
        assert!(
            public.contains(&format!("tls://[{vip}]:7000")),
            "the conode's address is the IPv6 VIP: {public}"
        );
    }
    // Both hosts run the same identity on all addresses (IPv6 and IPv4).
    let private = std::fs::read_to_string(dir.path().join("a/co/private.toml")).expect("private");
    let private = private
        .lines()
        .filter(|l| !l.starts_with("ListenAddress"))
        .collect::<Vec<_>>()
        .join("\n");
    let private = format!("ListenAddress = \"::\"\n{private}\n");
    for h in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(format!("{h}/co"))).expect("mkdir");
        std::fs::write(dir.path().join(format!("{h}/co/private.toml")), &private).expect("write");
        std::fs::create_dir_all(dir.path().join(format!("{h}/data"))).expect("mkdir");
    }
    ok(
        lab.a(),
        &format!(
            "chmod 755 {root} {root}/a {root}/b && chown -R nobody:nogroup {} {} {} {}",
            d("a/co"),
            d("a/data"),
            d("b/co"),
            d("b/data"),
            root = dir.path().display(),
        ),
    );
    let mut keys = Vec::new();
    for (h, host, peer) in [("a", lab.a(), lab.b()), ("b", lab.b(), lab.a())] {
        let out = ok(host, &format!(
            "{fo} -c {cfg} setup --state-dir {state} --conode-config {co} --conode-data-dir {data} --peer {peer}:7780 --metrics '' --interface eth0{vip}",
            fo = bin("failoverd").display(),
            cfg = d(&format!("{h}/failoverd.toml")),
            state = d(&format!("{h}/state")),
            co = d(&format!("{h}/co/private.toml")),
            data = d(&format!("{h}/data")),
            peer = peer.addr(),
            vip = vip.map(|v| format!(" --vip {v}/64")).unwrap_or_default(),
        ));
        keys.push(out.lines().last().expect("a key line").trim().to_string());
    }
    for (h, peer_key) in [("a", &keys[1]), ("b", &keys[0])] {
        let p = dir.path().join(format!("{h}/failoverd.toml"));
        let cfg = std::fs::read_to_string(&p)
            .expect("config")
            .replace("public_key = \"\"", &format!("public_key = \"{peer_key}\""))
            .replace("interval = \"2s\"", "interval = \"1s\"")
            .replace("control = \"systemd\"", "control = \"child\"")
            .replace(
                "# binary = \"/usr/bin/conode\"",
                &format!("binary = \"{}\"", conode_bin().display()),
            )
            .replace("# user = \"conode\"", "user = \"nobody\"");
        let cfg = if hook {
            // An executable that appends the facts the hook gets (hooks start with an
            // absolute path).
            let script = dir.path().join(format!("{h}/role-hook.sh"));
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"$FAILOVERD_ROLE $FAILOVERD_PREVIOUS_ROLE $FAILOVERD_EPOCH $FAILOVERD_CAUSE vip=$FAILOVERD_VIP\" >> {}\n",
                    d(&format!("{h}/role-hook"))
                ),
            )
            .expect("write the hook");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod the hook");
            assert!(cfg.contains("on_role_change = \"\""), "{cfg}");
            cfg.replace(
                "on_role_change = \"\"",
                &format!("on_role_change = \"{}\"", script.display()),
            )
        } else {
            cfg
        };
        std::fs::write(&p, cfg).expect("write config");
    }
    let p = Pair6 {
        lab,
        dir,
        vip,
        failoverd: RefCell::new([None, None]),
        chain: RefCell::new(String::new()),
        index: Cell::new(0),
    };
    p.spawn_failoverd("b");
    p.spawn_failoverd("a");
    for h in ["a", "b"] {
        wait(&format!("{h} hears its peer"), T, || {
            p.status(h)
                .at(&["peer", "reachable"])
                .and_then(|v| v.as_bool())
                == Some(true)
        });
    }
    p
}

#[test]
fn an_ipv6_address_moves_by_switchover_and_forced_promote_with_no_block_lost_and_never_two_holders()
{
    let p = start("fo-v6", false);
    let watch = AddrWatch::start(IpAddr::V6(p.vip()), &[p.lab.a(), p.lab.b(), p.lab.client()]);
    assert!(watch.holders().is_empty(), "never claimed at start");
    let (mac_a, mac_b) = (
        p.lab.a().mac().to_lowercase(),
        p.lab.b().mac().to_lowercase(),
    );

    let out = ok(p.lab.a(), &p.cmd("a", "promote"));
    assert!(out.contains("live under epoch 1"), "{out}");
    assert!(watch.wait_holders(&[p.lab.a().ns()], Duration::from_secs(10)));
    // The address is in service only once the kernel's DAD found no other holder.
    let shown = ok(
        p.lab.a(),
        &format!("ip -6 addr show dev eth0 to {}", p.vip()),
    );
    assert!(
        shown.contains(&p.vip().to_string()) && !shown.contains("tentative"),
        "{shown}"
    );
    p.grow(5);
    assert_eq!(p.client_neighbour().as_deref(), Some(mac_a.as_str()));

    // Switchover to b: the client's neighbour entry moves at once (unsolicited
    // neighbour advertisement), every block is there, and it goes on appending.
    p.wait_peer_live("b");
    let t = std::time::Instant::now();
    let out = ok(p.lab.b(), &p.cmd("b", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    eprintln!("IPv6 switchover a -> b answered in {:?}", t.elapsed());
    assert!(watch.wait_holders(&[p.lab.b().ns()], Duration::from_secs(10)));
    wait(
        "the client's neighbour entry names b",
        Duration::from_secs(2),
        || p.client_neighbour().as_deref() == Some(mac_b.as_str()),
    );
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert_eq!(p.status("b").str_at(&["role"]), "live");
    p.assert_all_blocks();
    p.grow(3);

    // And back to a.
    p.wait_peer_live("a");
    let out = ok(p.lab.a(), &p.cmd("a", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    assert!(watch.wait_holders(&[p.lab.a().ns()], Duration::from_secs(10)));
    p.assert_all_blocks();
    p.grow(2);
    ok(p.lab.a(), &p.cmd("a", "snapshot"));

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
    ok(p.lab.a(), &format!("ip addr del {}/64 dev eth0", p.vip()));
    wait("b counts a gone", T, || {
        p.status("b")
            .at(&["peer", "reachable"])
            .and_then(|v| v.as_bool())
            == Some(false)
    });
    let r = p.lab.b().sh(&p.cmd("b", "promote"), T);
    assert_eq!(r.code, Some(1), "a plain promote with the peer gone: {r:?}");
    let t = std::time::Instant::now();
    let out = ok(p.lab.b(), &p.cmd("b", "promote --force"));
    assert!(out.contains("live under epoch"), "{out}");
    eprintln!("IPv6 promote --force answered in {:?}", t.elapsed());
    assert!(watch.wait_holders(&[p.lab.b().ns()], Duration::from_secs(10)));
    wait(
        "the client's neighbour entry names b",
        Duration::from_secs(2),
        || p.client_neighbour().as_deref() == Some(mac_b.as_str()),
    );
    p.assert_all_blocks();
    p.grow(2);

    // a comes back: it stays standby and never takes the address back.
    p.spawn_failoverd("a");
    p.wait_peer_live("a");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert_eq!(watch.holders(), vec![p.lab.b().ns().to_string()]);
    p.assert_all_blocks();
    watch.assert_no_overlap();
}

/// Without `[vip] address` (a DNS name moved by a hook): the role, the epoch and the
/// conode move with switchover and back, no address is added on any host, and each
/// host's role hook gets what a DNS update needs (the new role, the previous one, the
/// epoch, the cause; `FAILOVERD_VIP` empty).
#[test]
fn without_a_virtual_ip_the_role_hook_moves_the_service_name() {
    let p = start("fo-dns", true);
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

    let out = ok(p.lab.a(), &p.cmd("a", "promote"));
    assert!(out.contains("live under epoch 1"), "{out}");
    hook_ran("a", "live standby 1 promote vip=");
    assert!(conode_answers("a"), "a's conode does not answer Status");

    p.wait_peer_live("b");
    let out = ok(p.lab.b(), &p.cmd("b", "switchover"));
    assert!(out.contains("live under epoch"), "{out}");
    hook_ran("b", "live standby 2 switchover vip=");
    // Handed over under the epoch it held (the new one is the peer's).
    hook_ran("a", "standby live 1 handed_over vip=");
    assert!(conode_answers("b"), "b's conode does not answer Status");
    assert_eq!(p.status("a").str_at(&["role"]), "standby");
    assert!(p.conode_pid("a").is_none(), "a's conode still runs");

    p.wait_peer_live("a");
    let out = ok(p.lab.a(), &p.cmd("a", "switchover"));
    assert!(out.contains("live under epoch 3"), "{out}");
    hook_ran("a", "live standby 3 switchover vip=");
    assert!(conode_answers("a"));
    assert!(p.conode_pid("b").is_none(), "b's conode still runs");
    // No address came or went on either host.
    assert_eq!([addresses("a"), addresses("b")], before);
}
