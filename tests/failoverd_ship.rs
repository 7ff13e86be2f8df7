//! failoverd shipping snapshots between two hosts in network namespaces: a real conode
//! with a growing skipchain on host a (live), failoverd on both, a real sshd on host b
//! (standby) for rsync and scp. The standby's newest generation is restored into a conode
//! on b that must serve the chain up to the position its manifest records.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use system_tests::netns::{Host, Lab, Spawned, Sshd};
use system_tests::{bin, conode_bin, Json};

const T: Duration = Duration::from_secs(60);

fn failoverd_bin() -> PathBuf {
    bin("failoverd")
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

pub(crate) struct Pair {
    pub(crate) lab: Lab,
    pub(crate) dir: tempfile::TempDir,
    _sshd: Option<Sshd>,
    pub(crate) conode_a: Option<Spawned>,
    failoverd: Vec<Spawned>,
    pub(crate) chain: String,
    pub(crate) index: u64,
    pub(crate) key_a: String,
}

impl Pair {
    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub(crate) fn p(&self, p: &str) -> String {
        self.path(p).display().to_string()
    }

    pub(crate) fn start(name: &str, transport: &str, interval: &str) -> Pair {
        Pair::start_in(Lab::new(name), transport, interval)
    }

    /// [`Pair::start`] in `lab` (which may have a third host).
    pub(crate) fn start_in(lab: Lab, transport: &str, interval: &str) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).display().to_string();
        let (a, b) = (lab.a(), lab.b());
        let conode = conode_bin().display().to_string();
        let fo = failoverd_bin().display().to_string();
        // The conode's identity, used on both hosts.
        ok(
            a,
            &format!(
                "{conode} -c {} setup --non-interactive --host {} --port 7000 --description live",
                d("a/co/private.toml"),
                a.addr()
            ),
        );
        let private = std::fs::read_to_string(dir.path().join("a/co/private.toml")).unwrap();
        let private = private
            .lines()
            .map(|l| {
                if l.starts_with("ListenAddress") {
                    "ListenAddress = \"0.0.0.0\"".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        let private = if private.contains("ListenAddress") {
            private
        } else {
            format!("ListenAddress = \"0.0.0.0\"\n{private}")
        };
        for h in ["a", "b"] {
            std::fs::create_dir_all(dir.path().join(format!("{h}/co"))).unwrap();
            std::fs::write(dir.path().join(format!("{h}/co/private.toml")), &private).unwrap();
            std::fs::create_dir_all(dir.path().join(format!("{h}/data"))).unwrap();
        }
        let sshd = (transport != "https").then(|| Sshd::start(b, &dir.path().join("sshd")));
        let mut keys = Vec::new();
        for (h, host, peer) in [("a", a, b), ("b", b, a)] {
            let (target, inbox) = match &sshd {
                Some(s) => (s.target(), d("b/state/inbox")),
                None => (String::new(), String::new()),
            };
            let out = ok(host, &format!(
                "{fo} -c {cfg} setup --state-dir {state} --conode-config {co} --conode-data-dir {data} --peer {peer}:7770 --listen {me}:7770 --metrics 127.0.0.1:7771 --interface eth0 --transport {transport} --ssh-target '{target}' --ssh-inbox '{inbox}'",
                cfg = d(&format!("{h}/failoverd.toml")),
                state = d(&format!("{h}/state")),
                co = d(&format!("{h}/co/private.toml")),
                data = d(&format!("{h}/data")),
                peer = peer.addr(),
                me = host.addr(),
            ));
            keys.push(out.lines().last().unwrap().trim().to_string());
        }
        for (h, peer_key) in [("a", &keys[1]), ("b", &keys[0])] {
            let p = dir.path().join(format!("{h}/failoverd.toml"));
            let mut cfg = std::fs::read_to_string(&p).unwrap();
            cfg = cfg.replace("public_key = \"\"", &format!("public_key = \"{peer_key}\""));
            cfg = cfg.replace("interval = \"2s\"", &format!("interval = \"{interval}\""));
            if let Some(s) = &sshd {
                let args: Vec<String> = s.ssh_args().iter().map(|a| format!("{a:?}")).collect();
                cfg = cfg.replace("args = []", &format!("args = [{}]", args.join(", ")));
            }
            std::fs::write(&p, cfg).unwrap();
        }
        let conode_a = start_conode_a(&lab, dir.path());
        let mut p = Pair {
            lab,
            dir,
            _sshd: sshd,
            conode_a: Some(conode_a),
            failoverd: Vec::new(),
            chain: String::new(),
            index: 0,
            key_a: keys[0].clone(),
        };
        // b first, answering before a starts: a's start-up snapshot finds its peer up.
        let fb = p.spawn_failoverd("b");
        p.wait_failoverd("b");
        let fa = p.spawn_failoverd("a");
        p.wait_failoverd("a");
        p.failoverd = vec![fa, fb];
        p
    }

    /// Start `failoverd run` on host `h` ("a" or "b"), its log appended to
    /// `failoverd-<h>.log`.
    fn spawn_failoverd(&self, h: &str) -> Spawned {
        let host = if h == "a" { self.lab.a() } else { self.lab.b() };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("failoverd-{h}.log")))
            .unwrap();
        let mut cmd = host.command(failoverd_bin());
        cmd.arg("-c")
            .arg(self.path(&format!("{h}/failoverd.toml")))
            .arg("run")
            .env("FAILOVERD_IO_TIMEOUT_MS", "3000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        host.spawn(cmd)
    }

    /// Wait until failoverd on `h` answers on its control socket.
    fn wait_failoverd(&self, h: &str) {
        let host = if h == "a" { self.lab.a() } else { self.lab.b() };
        let fo = failoverd_bin().display().to_string();
        let cfg = self.p(&format!("{h}/failoverd.toml"));
        wait(&format!("failoverd on {h}"), || {
            host.sh(&format!("{fo} -c {cfg} status"), T).code == Some(0)
        });
    }

    /// Start both failoverds again from nothing shipped: both are stopped, the live host's
    /// mirror and the standby's generations are removed, b starts, then a, whose start-up
    /// snapshot is a whole image. Returns once a's process is spawned, with its start
    /// time; the caller waits for the install (used by the benchmark).
    #[allow(dead_code)]
    pub(crate) fn restart_failoverds_from_nothing(&mut self) -> std::time::Instant {
        for f in self.failoverd.drain(..) {
            f.kill();
        }
        let _ = std::fs::remove_dir_all(self.path("a/state/outgoing"));
        for d in ["b/state/generations", "b/state/staging"] {
            let _ = std::fs::remove_dir_all(self.path(d));
        }
        let fb = self.spawn_failoverd("b");
        self.wait_failoverd("b");
        ok(self.lab.a(), "sync");
        let t = std::time::Instant::now();
        let fa = self.spawn_failoverd("a");
        self.failoverd = vec![fa, fb];
        t
    }

    /// Start the live conode again (after `conode_a` was killed; used by the benchmark).
    #[allow(dead_code)]
    pub(crate) fn restart_conode_a(&mut self) {
        assert!(self.conode_a.is_none(), "the live conode runs already");
        self.conode_a = Some(start_conode_a(&self.lab, self.dir.path()));
    }

    /// CPU time (user + system, ms) used so far by the live conode, failoverd on a and
    /// failoverd on b (used by the benchmark).
    #[allow(dead_code)]
    pub(crate) fn cpu_ms(&self) -> [u64; 3] {
        let of = |pid: u32| -> u64 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            // Fields after the command name (in parentheses): utime and stime are 14 and 15.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<u64> = rest
                .split(' ')
                .skip(11)
                .take(2)
                .map(|v| v.parse().unwrap())
                .collect();
            let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .unwrap_or(1)
                .max(1) as u64;
            (f[0] + f[1]) * 1000 / hz
        };
        [
            of(self.conode_a.as_ref().expect("conode a runs").pid()),
            of(self.failoverd[0].pid()),
            of(self.failoverd[1].pid()),
        ]
    }

    pub(crate) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// `failoverd status --json` on host `h`.
    pub(crate) fn status(&self, h: &str) -> Result<Json, String> {
        let host = if h == "a" { self.lab.a() } else { self.lab.b() };
        let r = host.sh(
            &format!(
                "{} -c {} status --json",
                failoverd_bin().display(),
                self.p(&format!("{h}/failoverd.toml"))
            ),
            T,
        );
        if r.code != Some(0) {
            return Err(r.stderr);
        }
        Json::parse(&r.stdout)
    }

    pub(crate) fn snapshot(&self) -> String {
        ok(
            self.lab.a(),
            &format!(
                "{} -c {} snapshot",
                failoverd_bin().display(),
                self.p("a/failoverd.toml")
            ),
        )
    }

    pub(crate) fn chain_cmd(&self, args: &str) -> Json {
        let out = ok(
            self.lab.a(),
            &format!(
                "{} -c {} chain {args} --json",
                conode_bin().display(),
                self.p("a/co/private.toml")
            ),
        );
        Json::parse(&out).unwrap()
    }

    /// Create the chain or append `n` blocks of `size` random bytes.
    pub(crate) fn grow(&mut self, n: u64, size: usize) {
        let data = self.p("blockdata");
        for _ in 0..n {
            ok(
                self.lab.a(),
                &format!("head -c {size} /dev/urandom > {data}"),
            );
            let j = if self.chain.is_empty() {
                let j = self.chain_cmd(&format!(
                    "create {} --data {data}",
                    self.p("a/co/public.toml")
                ));
                self.chain = j.str_at(&["chain"]).to_string();
                j
            } else {
                self.chain_cmd(&format!("add {} --data {data}", self.chain))
            };
            self.index = j.at(&["index"]).and_then(|v| v.as_u64()).unwrap();
        }
    }

    fn metrics(&self, host: &Host) -> String {
        ok(host, "exec 3<>/dev/tcp/127.0.0.1/7771; printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3")
    }

    /// Restore b's newest generation into a conode on b and return the chain's latest
    /// index it serves, and the index the generation's manifest records.
    pub(crate) fn restore_on_b(&mut self) -> (u64, u64) {
        let b = self.lab.b();
        let st = self.status("b").unwrap();
        let generation = st
            .at(&["generation"])
            .and_then(|v| v.as_u64())
            .expect("b holds a generation");
        let gdir = self.path("b/state/generations");
        let env = std::fs::read(gdir.join(format!("{generation:020}.manifest"))).unwrap();
        let key = conode::keys::parse_hex32(&self.key_a).unwrap();
        let m = failoverd::manifest::Manifest::open(&env, &key).unwrap();
        let recorded = m
            .positions
            .iter()
            .find(|p| hex::encode(p.chain) == self.chain)
            .expect("chain in manifest")
            .index as u64;
        // The live host is gone.
        if let Some(c) = self.conode_a.take() {
            c.kill();
        }
        let restore = self.path("restore");
        std::fs::create_dir_all(&restore).unwrap();
        std::fs::copy(
            gdir.join(format!("{generation:020}.db")),
            restore.join(conode::config::db_file_name(&m.conode)),
        )
        .unwrap();
        std::fs::copy(self.path("b/co/private.toml"), restore.join("private.toml")).unwrap();
        ok(
            b,
            &format!(
                "CONODE_SERVICE_PATH={} {} -c {} restore {}",
                self.p("b/data"),
                conode_bin().display(),
                self.p("b/co/private.toml"),
                restore.display()
            ),
        );
        let mut cmd = b.command(conode_bin());
        cmd.args(["-d", "2", "-c"])
            .arg(self.path("b/co/private.toml"))
            .args(["server", "--allow-root"])
            .env("CONODE_SERVICE_PATH", self.path("b/data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("conode-b.log")).unwrap());
        let _conode_b = b.spawn(cmd);
        wait("conode on b", || {
            b.connect(
                format!("{}:7001", b.addr()).parse().unwrap(),
                Duration::from_secs(1),
            )
            .is_ok()
        });
        // Ask it through a roster that has b's address for the same key.
        let roster = std::fs::read_to_string(self.path("a/co/public.toml"))
            .unwrap()
            .replace(
                &self.lab.a().addr().to_string(),
                &self.lab.b().addr().to_string(),
            );
        std::fs::write(self.path("roster-b.toml"), roster).unwrap();
        let out = ok(
            b,
            &format!(
                "{} -c {} chain update {} --roster {} --json",
                conode_bin().display(),
                self.p("b/co/private.toml"),
                self.chain,
                self.p("roster-b.toml")
            ),
        );
        let up = Json::parse(&out).unwrap();
        let last = up.0.as_array().unwrap().last().unwrap()["index"]
            .as_u64()
            .unwrap();
        (last, recorded)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for l in [
                "failoverd-a.log",
                "failoverd-b.log",
                "conode-a.log",
                "conode-b.log",
            ] {
                eprintln!("----- {l}\n{}", self.log(l));
            }
        }
        for f in &self.failoverd {
            let _ = f.try_wait();
        }
    }
}

/// The live conode on host a, serving `dir/a/data`; returns once its port answers.
fn start_conode_a(lab: &Lab, dir: &Path) -> Spawned {
    let a = lab.a();
    let mut cmd = a.command(conode_bin());
    cmd.args(["-d", "2", "-c"])
        .arg(dir.join("a/co/private.toml"))
        .args(["server", "--allow-root"])
        .env("CONODE_SERVICE_PATH", dir.join("a/data"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("conode-a.log"))
                .unwrap(),
        );
    let conode_a = a.spawn(cmd);
    wait(&format!("conode on {}", a.addr()), || {
        a.connect(
            format!("{}:7001", a.addr()).parse().unwrap(),
            Duration::from_secs(1),
        )
        .is_ok()
    });
    conode_a
}

pub(crate) fn wait(what: &str, f: impl FnMut() -> bool) {
    system_tests::wait_until(what, Duration::from_secs(20), f)
}

fn num(j: &Json, k: &str) -> u64 {
    j.at(&[k])
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("{k} missing in {:?}", j.0))
}

/// Over HTTPS: full, then incremental (only missing chunks), periodic shipping of new
/// commits, metrics, an unauthenticated client refused, and a restore on the standby.
#[test]
fn https_ships_verified_generations_that_restore_on_the_standby() {
    let mut p = Pair::start("https", "https", "1s");
    p.grow(1, 200_000);
    p.grow(20, 100_000);
    p.snapshot();
    let a0 = p.status("a").unwrap();
    assert_eq!(
        a0.str_at(&["role"]),
        "standby",
        "never live before a promote"
    );
    assert_eq!(num(&a0, "epoch"), 0);
    let fo = failoverd_bin().display().to_string();
    // Bring-up: a's conode runs and shipped the newest generation, so a promote there
    // makes it live under epoch 1 (no address managed in this pair); b stays standby.
    let promoted = ok(
        p.lab.a(),
        &format!("{fo} -c {} promote", p.p("a/failoverd.toml")),
    );
    assert!(promoted.contains("epoch 1"), "{promoted}");
    let a1 = p.status("a").unwrap();
    assert_eq!(a1.str_at(&["role"]), "live");
    assert_eq!(num(&a1, "epoch"), 1);
    wait("b hears epoch 1", || {
        p.status("b")
            .map(|b| b.at(&["peer", "epoch"]).and_then(|v| v.as_u64()) == Some(1))
            .unwrap_or(false)
    });
    let b1 = p.status("b").unwrap();
    assert_eq!(b1.str_at(&["role"]), "standby");
    let g1 = num(&b1, "generation");

    // A second daemon on a's state directory is refused at once, naming the first; the
    // first keeps its control socket and keeps shipping.
    let second = p.lab.a().sh(
        &format!("{fo} -c {} run", p.p("a/failoverd.toml")),
        Duration::from_secs(10),
    );
    assert_eq!(second.code, Some(1), "{second:?}");
    assert!(
        second
            .stderr
            .contains("is in use by another failoverd (pid"),
        "{}",
        second.stderr
    );
    p.grow(1, 10_000);
    p.snapshot();
    assert!(num(&p.status("b").unwrap(), "generation") > g1);
    let check_a = ok(
        p.lab.a(),
        &format!("{fo} -c {} check", p.p("a/failoverd.toml")),
    );
    assert!(
        check_a.contains("this host is live") && check_a.contains("is usable"),
        "{check_a}"
    );
    let check_b = ok(
        p.lab.b(),
        &format!("{fo} -c {} check", p.p("b/failoverd.toml")),
    );
    assert!(
        check_b.contains("warning: conode admin socket"),
        "{check_b}"
    );
    assert_eq!(num(&a1, "generation"), g1);

    // More commits: the loop ships them by itself, sending only what b lacks.
    p.grow(3, 100_000);
    wait("the periodic snapshot of the new blocks", || {
        p.status("a")
            .ok()
            .is_some_and(|s| s.at(&["generation"]).and_then(|v| v.as_u64()).unwrap_or(0) > g1)
    });
    let a2 = p.status("a").unwrap();
    assert!(
        num(&a2, "bytes_sent") < num(&a2, "bytes"),
        "incremental sent {:?}",
        a2.0
    );
    assert!(num(&a2, "reused_bytes") > 0, "{:?}", a2.0);
    assert_eq!(a2.str_at(&["transport"]), "https");

    // Metrics, on loopback of each host.
    let ma = p.metrics(p.lab.a());
    for m in [
        "failoverd_snapshot_generation",
        "failoverd_snapshot_age_seconds",
        "failoverd_snapshot_bytes ",
        "failoverd_snapshot_duration_seconds",
        "failoverd_snapshot_bytes_sent_total",
        "failoverd_role{role=\"live\"} 1",
    ] {
        assert!(ma.contains(m), "{m} missing:\n{ma}");
    }
    let mb = p.metrics(p.lab.b());
    assert!(mb.contains("failoverd_role{role=\"standby\"} 1"), "{mb}");

    // A client without the pinned key gets nothing: TLS with another key, plain HTTP.
    let b_addr = p.lab.b().addr();
    let a_cfg = std::fs::read_to_string(p.path("a/failoverd.toml")).unwrap();
    let err = p.lab.a().in_ns(move || {
        conode::tls::install_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let stranger = conode::keys::KeyPair::generate().unwrap();
            let tls = conode::peer::PeerTls::new(&stranger).unwrap();
            // It even pins b's real key: b still refuses it.
            let c = failoverd::config::Config::parse(Path::new("a"), &a_cfg, |_| None).unwrap();
            let client = failoverd::peer::PeerClient::new(
                &tls,
                &format!("{b_addr}:7770"),
                c.peer.public_key,
                &c.timeouts,
            )
            .unwrap();
            client
                .request(reqwest::Method::GET, "/v1/status", "", "status")
                .await
                .err()
        })
    });
    let err = err.expect("a stranger got an answer");
    // Reported as a key not trusted, at once: retrying will not help.
    assert!(
        matches!(err, failoverd::error::PeerError::Unauthenticated { .. }) && err.is_permanent(),
        "{err:?}"
    );
    let plain = p.lab.a().sh(&format!("exec 3<>/dev/tcp/{b_addr}/7770; printf 'GET /v1/status HTTP/1.1\\r\\n\\r\\n' >&3; timeout 5 cat <&3"), T);
    assert!(
        !plain.stdout.contains("generations"),
        "plain HTTP got: {}",
        plain.stdout
    );
    wait("the refusal counted", || {
        p.metrics(p.lab.b())
            .contains("failoverd_snapshot_failures_total{cause=\"unauthenticated\"}")
    });

    // The start-up snapshot was a whole image, streamed to b while it was taken.
    let streamed = |line: &str| -> (u64, u64, u64) {
        let num_before = |suffix: &str| -> u64 {
            let end = line
                .find(suffix)
                .unwrap_or_else(|| panic!("{suffix:?} in {line}"));
            let start = line[..end].rfind(' ').unwrap() + 1;
            line[start..end].parse().unwrap()
        };
        (
            num_before(" bytes streamed"),
            num_before(" bytes, "),
            num_before(" reused"),
        )
    };
    let log = p.log("failoverd-a.log");
    let first = log.lines().find(|l| l.contains("whole image")).unwrap();
    // All of it came in the stream (chunks of zeros as frames without bytes): nothing was
    // left for the offer, no chunk was sent after it.
    let (s, _, _) = streamed(first);
    assert!(
        s > 0 && first.contains(" 0 left for the offer") && first.contains(" 0 chunks sent"),
        "the whole image streamed: {first}"
    );
    // The conode restarts: its next image is whole again (the token it gave is from
    // before), and only the chunks b lacks are streamed while it is taken.
    let seen = log.len();
    p.conode_a.take().expect("conode a runs").kill();
    p.restart_conode_a();
    p.grow(2, 100_000);
    let want = p.index;
    p.snapshot();
    let log = p.log("failoverd-a.log");
    let line = log[seen..]
        .lines()
        .find(|l| l.contains("installed on the peer") && l.contains("whole image"))
        .unwrap_or_else(|| panic!("no whole image after the restart:\n{}", &log[seen..]));
    let (s, bytes, _) = streamed(line);
    assert!(
        s > 0 && s * 4 < bytes,
        "only what b lacks is streamed: {line}"
    );

    // A final snapshot, then the live host dies and b restores its newest generation.
    p.snapshot();
    let (served, recorded) = p.restore_on_b();
    assert_eq!(
        recorded, want,
        "the manifest records the last acknowledged block"
    );
    assert_eq!(
        served, recorded,
        "the restored conode serves the chain up to the manifest's position"
    );
}

fn ssh_transport(transport: &str) {
    let mut p = Pair::start(transport, transport, "1s");
    p.grow(1, 100_000);
    p.grow(10, 100_000);
    p.snapshot();
    p.grow(2, 100_000);
    let want = p.index;
    p.snapshot();
    let a = p.status("a").unwrap();
    assert_eq!(a.str_at(&["transport"]), transport);
    let g = num(&a, "generation");
    assert_eq!(num(&p.status("b").unwrap(), "generation"), g);
    assert!(p.path("b/state/inbox/snapshot.db").exists());
    let (served, recorded) = p.restore_on_b();
    assert_eq!(recorded, want);
    assert_eq!(served, recorded);
}

#[test]
fn rsync_ships_verified_generations() {
    ssh_transport("rsync");
}

#[test]
fn scp_ships_verified_generations() {
    ssh_transport("scp");
}

/// The cable is cut in the middle of an HTTPS transfer: the transfer resumes and no chunk
/// is stored twice.
#[test]
fn an_interrupted_transfer_resumes_without_resending_stored_chunks() {
    // No periodic snapshot: the one below is the only transfer.
    let mut p = Pair::start("resume", "https", "1h");
    p.grow(1, 1_000_000);
    p.grow(19, 1_000_000);
    // 40 Mbit/s from a to b: the ~20 MB snapshot takes several seconds.
    ok(
        p.lab.a(),
        "tc qdisc replace dev eth0 root tbf rate 40mbit burst 64kb latency 500ms",
    );
    let fo = failoverd_bin().display().to_string();
    let cfg = p.p("a/failoverd.toml");
    let a = p.lab.a();
    let received = || -> u64 {
        p.metrics(p.lab.b())
            .lines()
            .find_map(|l| l.strip_prefix("failoverd_chunks_received_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // The snapshot failoverd takes at start (before the chain grew) is already counted.
    let before = received();
    let child = std::thread::scope(|s| {
        let h = s.spawn(|| a.sh(&format!("{fo} -c {cfg} snapshot"), Duration::from_secs(120)));
        // Cut once chunks are flowing, for longer than the 3 s I/O timeout.
        wait("chunks arriving on b", || received() > before);
        p.lab.partition();
        std::thread::sleep(Duration::from_secs(5));
        p.lab.heal();
        h.join().unwrap()
    });
    assert_eq!(child.code, Some(0), "{child:?}");
    let log = p.log("failoverd-a.log");
    assert!(log.contains("resuming"), "no resume in the log:\n{log}");
    let st = p.status("b").unwrap();
    let g = num(&st, "generation");
    let env = std::fs::read(p.path(&format!("b/state/generations/{g:020}.manifest"))).unwrap();
    let m =
        failoverd::manifest::Manifest::open(&env, &conode::keys::parse_hex32(&p.key_a).unwrap())
            .unwrap();
    // Each chunk b did not hold was stored once: b copied what its previous generation
    // held, and chunks repeated within the image came once.
    let key = conode::keys::parse_hex32(&p.key_a).unwrap();
    let prev = std::fs::read(p.path(&format!("b/state/generations/{:020}.manifest", g - 1)))
        .map(|env| failoverd::manifest::Manifest::open(&env, &key).unwrap());
    let held: std::collections::HashSet<[u8; 32]> = prev
        .map(|m| m.chunks.iter().map(|c| c.hash).collect())
        .unwrap_or_default();
    let lacked: std::collections::HashSet<[u8; 32]> = m
        .chunks
        .iter()
        .filter(|c| c.hash != failoverd::chunk::zeros_hash(c.len))
        .map(|c| c.hash)
        .filter(|h| !held.contains(h))
        .collect();
    assert_eq!(
        received() - before,
        lacked.len() as u64,
        "chunks stored more than once (or missing)"
    );
    ok(p.lab.a(), "tc qdisc del dev eth0 root");
    let (served, recorded) = p.restore_on_b();
    assert_eq!(served, recorded);
}

/// `setup` refuses to overwrite; `check` names every problem by its field and fails.
#[test]
fn setup_and_check_name_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("f.toml");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(failoverd_bin())
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let state = d.path().join("state").display().to_string();
    let co = d.path().join("nowhere/private.toml").display().to_string();
    let (code, out) = run(&[
        "setup",
        "--state-dir",
        &state,
        "--conode-config",
        &co,
        "--interface",
        "nosuchif0",
        "--transport",
        "rsync",
        "--peer",
        "10.0.0.2:7770",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let key = out.lines().last().unwrap().trim().to_string();
    assert_eq!(key.len(), 64, "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.path().join("failoverd.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (code, out) = run(&["setup"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("exists: not overwriting"), "{out}");
    let (code, out) = run(&["check"]);
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "error: peer.public_key: empty",
        "error: ssh.target",
        "error: ssh.inbox",
        "error: conode.config",
        "error: vip.interface: no interface named \"nosuchif0\"",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    assert!(
        !Path::new(&state).exists(),
        "check created the state directory: it must change nothing"
    );
    // Hooks: a program that is missing, one that is not executable, one that runs.
    let plain = d.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "on_role_change = \"\"",
            "on_role_change = \"/nonexistent/move-dns --zone x\"",
        )
        .replace(
            "on_health_change = \"\"",
            &format!("on_health_change = \"{}\"", plain.display()),
        )
        .replace("on_conflict = \"\"", "on_conflict = \"/bin/true\"");
    std::fs::write(&cfg, text).unwrap();
    let (code, out) = run(&["check"]);
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "error: hooks.on_role_change: /nonexistent/move-dns: No such file",
        "is not an executable file",
        "ok: hooks.on_conflict runs /bin/true",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap() + "bogus = 1\n").unwrap();
    let (code, out) = run(&["check"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("f.toml:") && out.contains("bogus"), "{out}");
    // Every other command: a configuration error is exit status 2.
    let (code, out) = run(&["status"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("bogus"), "{out}");
}

/// Strangers holding half-open connections against the standby's peer port (40 from one
/// address, 40 more from others, each reopened as the standby closes it) no longer stop
/// snapshots: the handshake slots of strangers are apart from the peer's and from the
/// slots of authenticated connections, and the refusals are logged once per interval,
/// not once each. (40 such connections used to hold all 16 slots: snapshots failed, "gave
/// up generation 6 after 8 attempts", or waited 7 s.)
#[test]
fn snapshots_ship_while_strangers_hold_half_open_connections_to_the_peer_port() {
    use std::net::TcpStream;
    let mut p = Pair::start_in(Lab::with_client("strangers"), "https", "1h");
    p.grow(1, 1000);
    let peer_port = format!("{}:7770", p.lab.b().addr());
    let o = p.lab.b().addr().octets();
    for k in 0..40 {
        ok(
            p.lab.client(),
            &format!(
                "ip addr add {}.{}.{}.{}/24 dev eth0",
                o[0],
                o[1],
                o[2],
                200 + k
            ),
        );
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let opened = std::sync::atomic::AtomicUsize::new(0);
    // The live host's failoverd starts again once the strangers are in place: it needs
    // new connections to the peer port (a kept-alive one would not need a slot).
    let old_a = p.failoverd.remove(0);
    old_a.kill();
    let (took, new_a) = std::thread::scope(|s| {
        let client = p.lab.client();
        let (stop, opened, peer_port) = (&stop, &opened, &peer_port);
        s.spawn(move || {
            client.in_ns(|| {
                // 40 from the client's own address, 40 from other addresses of its (added
                // in its namespace only).
                let mut held: Vec<Option<TcpStream>> = (0..80).map(|_| None).collect();
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                    for (i, slot) in held.iter_mut().enumerate() {
                        let alive = slot.as_ref().is_some_and(|c| {
                            c.set_nonblocking(true).is_ok()
                                && matches!(c.peek(&mut [0u8; 1]), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
                        });
                        if !alive {
                            *slot = stranger(i, peer_port);
                            if slot.is_some() {
                                opened.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        });
        // Strangers in place before the snapshots.
        wait("strangers connected", || {
            opened.load(std::sync::atomic::Ordering::SeqCst) >= 80
        });
        std::thread::sleep(Duration::from_secs(6));
        let t = Instant::now();
        let new_a = p.spawn_failoverd("a");
        p.wait_failoverd("a");
        eprintln!("failoverd on a answering after {:?}", t.elapsed());
        let mut took = Vec::new();
        for i in 0..4 {
            let data = p.p("blockdata");
            ok(p.lab.a(), &format!("head -c 1000 /dev/urandom > {data}"));
            p.chain_cmd(&format!("add {} --data {data}", p.chain));
            let t = Instant::now();
            p.snapshot();
            took.push(t.elapsed());
            eprintln!(
                "snapshot {i} with strangers holding connections: {:?}",
                t.elapsed()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (took, new_a)
    });
    p.failoverd.insert(0, new_a);
    let reopened = opened.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("stranger connections opened: {reopened}");
    assert!(reopened > 80, "the standby closed strangers' connections");
    for t in &took {
        assert!(
            *t < Duration::from_secs(5),
            "a snapshot took {t:?} while strangers held connections"
        );
    }
    let log = p.log("failoverd-b.log");
    let lines = log
        .lines()
        .filter(|l| l.contains("peer port: refused"))
        .count();
    assert!(lines >= 1, "the refusals are logged:\n{log}");
    assert!(
        lines <= 15,
        "{lines} refusal lines for {reopened} connections: not rate-limited"
    );
}

/// A stranger's connection to `to` (never a byte sent): from the host's own address for
/// `i` < 40, else from x.y.z.(200 + i % 40) of the same subnet (added to the client's
/// interface, in its namespace).
fn stranger(i: usize, to: &str) -> Option<std::net::TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let to: std::net::SocketAddr = to.parse().ok()?;
    if i < 40 {
        return std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok();
    }
    let (std::net::IpAddr::V4(v4), port) = (to.ip(), to.port()) else {
        return None;
    };
    let o = v4.octets();
    let from = std::net::Ipv4Addr::new(o[0], o[1], o[2], 200 + (i % 40) as u8);
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .ok()?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .ok()?;
    connect(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(v4, port)),
    )
    .ok()?;
    Some(std::net::TcpStream::from(fd))
}
