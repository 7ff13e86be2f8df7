//! The Debian package `conode-failover` under a real systemd (docs/packaging.md): the
//! package built by `scripts/package` from this build's binaries is installed inside a
//! `systemd-nspawn` container that boots this machine's own tree, and its units and
//! polkit rule are driven with `systemctl` there.
//!
//! The container: the host's root file system, bind-mounted read-only in a mount
//! namespace of the test's own (`unshare -m`, so the mount vanishes with the test), under
//! a volatile overlay (`--volatile=overlay`: every write lands in a tmpfs and is gone at
//! power-off), with a private network (`--private-network`: only its own loopback; the
//! test adds a veth pair inside it for the virtual IP's interface, never anything in the
//! host's namespaces). Its systemd boots `basic.target` with `timers.target` masked, so
//! the services enabled on the host (nginx, sshd, postgres, apt timers) do not start in
//! it; dbus and polkitd start on demand. The test talks to it with `nsenter` into the
//! container's PID 1 (the host has no systemd, hence no machined: `machinectl` and
//! `systemd-run -M` cannot reach it). It is powered off (SIGTERM to systemd-nspawn, the
//! child process the test started), or killed after a bounded wait, by a drop guard.
//!
//! Inside: `dpkg -i` the package; `conode setup` as in docs/packaging.md; `systemctl
//! start conode.service` (Type=notify: active only after READY=1), its ports listen, its
//! stop is clean, no permission or seccomp failure in its journal; the polkit rule lets
//! the user failoverd start, restart and stop conode.service and nothing else; then
//! `failoverd setup` (a pinned peer key, a peer nobody answers, the virtual IP on a veth
//! interface inside the container), `systemctl start failoverd.service`, its watchdog
//! configured and fed past `WatchdogSec`, `failoverd status` as the user failoverd, and a
//! stop whose `ExecStopPost=failoverd release-vip` succeeds ("nothing to release"); then
//! once more with what a crash of a live host leaves (the address tagged as failoverd's,
//! put there with failoverd's own code, and the conode running): the stop's
//! `release-vip`, as the user failoverd in the unit's sandbox, removes the address and
//! stops conode.service through the polkit rule.
//!
//! The second test, `a_switchover_between_two_packaged_hosts_under_systemd`, boots two
//! such containers, each in a network namespace of a `system_tests::netns::Lab` with a
//! client (`--network-namespace-path`, plus `--capability=CAP_NET_ADMIN`: systemd-nspawn
//! keeps it only with `--private-network`), the package installed and one conode identity
//! whose address is the virtual IP in both, failoverd.service running in both; then
//! `failoverd promote` on a, blocks appended through the address by the client,
//! `failoverd switchover` on b: b's failoverd, as its own user, installs the shipped
//! generation (the database `failoverd:conode 0660`), conode.service runs on b and serves
//! every block, it stopped on a, and the kernel's address events show the two never
//! held the address at once; stopping failoverd.service on b releases the address and
//! stops conode.service; a promoted again, then its failoverd killed with SIGKILL: the
//! unit's `ExecStopPost` (`failoverd release-vip`) takes the address off and stops
//! conode.service all the same. It found that `ProtectProc=invisible` in conode.service hid
//! failoverd's `/proc/PID/status` from the conode, which then refused failoverd on its
//! admin socket (it reads the client's supplementary groups there).
//!
//! Serialised with tests/deb_package.rs by an flock on [`system_tests::PACKAGE_LOCK`]: both run
//! `scripts/package` (one `target/<profile>/deb-assets/`, one `target/debian/`), and
//! deb_package installs the package on the host, whose tree the container boots.
//!
//! Needs root, `systemd-nspawn` (package systemd-container), `polkitd` and `dbus`; without
//! them it fails saying what to install (scripts/install-deps installs them), it never
//! skips.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use system_tests::{wait_bounded, Run};

/// The virtual IP's interface inside the container (a veth pair: this kernel may lack
/// the dummy driver), its address, the virtual IP and a peer that nobody answers.
const VIP_IF: &str = "vip0";
const IF_ADDR: &str = "10.77.0.1/24";
const VIP: &str = "10.77.0.100/24";
const PEER: &str = "10.77.0.2:7780";

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What, in a unit's journal, means the hardening or the permissions got in the way.
const BAD_IN_JOURNAL: [&str; 14] = [
    "Operation not permitted",
    "Permission denied",
    "permission denied",
    "refused a client",
    "EPERM",
    "EACCES",
    "SIGSYS",
    "Bad system call",
    "seccomp",
    "code=killed",
    "code=dumped",
    "Watchdog timeout",
    "Failed with result",
    "Main process exited, code=",
];

fn said(r: &Run) -> String {
    format!("{}{}", r.stdout, r.stderr)
}

/// Run `program args` on the host, bounded.
fn host(program: &str, args: &[&str], timeout: Duration) -> Run {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    wait_bounded(
        child,
        b"",
        timeout,
        &format!("{program} {}", args.join(" ")),
    )
}

/// Fail, saying what to install, when something the test needs is missing on the host
/// (the container boots the host's tree: what it runs must be installed here).
fn check_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "systemd_nspawn needs root (systemd-nspawn, nsenter, mounts in its own namespace)"
    );
    let needs = [
        ("/usr/bin/systemd-nspawn", "systemd-container"),
        ("/lib/systemd/systemd", "systemd"),
        ("/usr/lib/polkit-1/polkitd", "polkitd"),
        ("/usr/bin/dbus-daemon", "dbus"),
        ("/usr/bin/nsenter", "util-linux"),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/sbin/runuser", "util-linux"),
        ("/usr/bin/ss", "iproute2"),
        ("/usr/bin/dpkg-deb", "dpkg"),
    ];
    let missing: Vec<String> = needs
        .iter()
        .filter(|(p, _)| !Path::new(p).exists())
        .map(|(p, pkg)| format!("{p} (package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "systemd_nspawn: missing on this machine: {missing:?}; install them (apt-get install \
         systemd-container polkitd dbus; scripts/install-deps does) and run again"
    );
}

/// The package file built by `scripts/package` from this build's binaries (the caller
/// holds [`system_tests::PACKAGE_LOCK`]), copied into `work`/pkg: that directory, and the copy.
fn build_package(work: &Path) -> (PathBuf, PathBuf) {
    let into = work.join("pkg");
    std::fs::create_dir(&into).expect("mkdir pkg");
    let (deb, _) = system_tests::build_package();
    let deb = deb.to_str().expect("utf-8 path");
    let name = Path::new(deb).file_name().expect("package file name");
    let copy = into.join(name);
    std::fs::copy(deb, &copy).unwrap_or_else(|e| panic!("copy {deb}: {e}"));
    (into, copy)
}

/// What the host has of the package, its users and the test's interface: the same
/// before and after, or the container reached the host.
fn host_state() -> Vec<String> {
    let mut s = Vec::new();
    let dpkg = host(
        "dpkg-query",
        &["-W", "-f=${db:Status-Status}", "conode-failover"],
        Duration::from_secs(30),
    );
    s.push(format!("dpkg: {:?} {}", dpkg.code, dpkg.stdout.trim()));
    for u in ["conode", "failoverd"] {
        let g = host("getent", &["passwd", u], Duration::from_secs(10));
        s.push(format!("user {u}: {:?}", g.code));
    }
    for p in [
        "/etc/conode",
        "/etc/failoverd",
        "/var/lib/conode",
        "/var/lib/failoverd",
        "/usr/bin/conode",
        "/lib/systemd/system/conode.service",
        "/lib/systemd/system/failoverd.service",
        "/run/systemd/system",
        "/run/systemd/nspawn",
    ] {
        s.push(format!("{p}: {}", Path::new(p).symlink_metadata().is_ok()));
    }
    let l = host("ip", &["link", "show", VIP_IF], Duration::from_secs(10));
    s.push(format!("link {VIP_IF}: {:?}", l.code));
    s
}

/// The parent pid of `pid` (from /proc/PID/stat), and its command name.
fn ppid_and_comm(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// The child process `systemd` of `parent`, if there is one yet.
fn systemd_child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            matches!(ppid_and_comm(pid), Some((pp, comm)) if pp == parent && comm == "systemd")
        })
}

/// The container's network: its own (only `lo`), or an existing network namespace
/// (`/run/netns/NAME`, e.g. a host of a [`system_tests::netns::Lab`]) that it joins.
enum Network<'a> {
    Private,
    Namespace(&'a str),
}

/// The booted container: systemd-nspawn (our child) and the container's PID 1.
struct Container {
    name: String,
    nspawn: Child,
    leader: u32,
    log: PathBuf,
    /// Units whose journal is printed if the test fails (else the journal's last lines).
    units: Vec<&'static str>,
    // The mount point of the host's tree (empty outside our mount namespace); removed
    // after the container is gone.
    _root: tempfile::TempDir,
}

impl Container {
    fn boot(name: &str, pkg_dir: &Path, log: &Path, network: Network) -> Container {
        let root = tempfile::Builder::new()
            .prefix("conode-nspawn-root.")
            .tempdir()
            .expect("tempdir");
        let log_file = std::fs::File::create(log).expect("create the nspawn log");
        // In a mount namespace of its own (gone with systemd-nspawn): the host's root file
        // system bound read-only on the mount point (the overlay's lower layer: nothing
        // is ever written to it), and a tmpfs over /run/systemd (the host's /run is on
        // disk here: systemd-nspawn keeps its propagation directories there and would
        // leave them behind).
        let script = r#"set -e
mount --bind / "$0"
mount -o remount,bind,ro "$0"
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
exec "$@""#;
        let bind = format!("--bind-ro={}:/pkg", pkg_dir.display());
        let machine = format!("--machine={name}");
        let root_path = root.path().to_str().expect("utf-8 path").to_string();
        let network = match network {
            Network::Private => vec!["--private-network".to_string()],
            Network::Namespace(ns) => {
                let path = format!("/run/netns/{ns}");
                assert!(Path::new(&path).exists(), "no network namespace {path}");
                // systemd-nspawn keeps CAP_NET_ADMIN in the container's bounding set only
                // with --private-network (which this option excludes): without it,
                // failoverd's CAP_NET_ADMIN is not there to add the address (EPERM).
                vec![
                    format!("--network-namespace-path={path}"),
                    "--capability=CAP_NET_ADMIN".to_string(),
                ]
            }
        };
        let nspawn = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ])
            .arg(&root_path)
            .args([
                "systemd-nspawn",
                "--quiet",
                "--directory",
                &root_path,
                "--volatile=overlay",
                &machine,
                // No machined, no system bus on the host: nothing to register with.
                "--register=no",
                "--keep-unit",
                // The machine id is the host's: keep the journal inside.
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
                "--console=pipe",
                &bind,
            ])
            .args(&network)
            .args([
                "--boot",
                // The container's systemd reads these as its kernel command line.
                "systemd.unit=basic.target",
                "systemd.mask=timers.target",
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("cannot run unshare/systemd-nspawn");
        let mut c = Container {
            name: name.to_string(),
            nspawn,
            units: Vec::new(),
            leader: 0,
            log: log.to_path_buf(),
            _root: root,
        };
        // unshare and sh exec: the child is systemd-nspawn; its child `systemd` is the
        // container's PID 1.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.nspawn.try_wait().expect("try_wait") {
                panic!(
                    "systemd-nspawn exited ({st}) before the container booted:\n{}",
                    c.log_text()
                );
            }
            if let Some(pid) = systemd_child_of(c.nspawn.id()) {
                c.leader = pid;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no systemd under systemd-nspawn (pid {}) within 30 s:\n{}",
                c.nspawn.id(),
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    /// `dpkg -i` the package in `/pkg` (the host directory given to [`Container::boot`]).
    fn install(&self, deb_name: &str) {
        // man-db's trigger (seconds of mandb) has nothing to show here.
        self.ok(&["rm", "-f", "/var/lib/man-db/auto-update"]);
        self.ok(&["dpkg", "-i", &format!("/pkg/{deb_name}")]);
    }

    /// The conode's identity as docs/packaging.md sets it up: `conode setup`, then
    /// `private.toml` opened to the group conode.
    fn setup_conode(&self, host: &str, description: &str) {
        self.ok(&[
            "conode",
            "-c",
            "/etc/conode/private.toml",
            "setup",
            "--non-interactive",
            "--host",
            host,
            "--port",
            "7000",
            "--description",
            description,
        ]);
        self.ok(&["chmod", "0640", "/etc/conode/private.toml"]);
    }

    /// Write `content` to `path` inside the container (as root, `sh -c 'cat > PATH'`).
    fn write(&self, path: &str, content: &[u8]) {
        let w = self.run_with(
            &["sh", "-ec", &format!("cat > {path}")],
            content,
            Duration::from_secs(30),
        );
        assert!(w.code == Some(0), "write {path}: {}", said(&w));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `args` inside the container (all its namespaces), as root, with a clean
    /// environment; killed and the test failed past `timeout`.
    fn run_with(&self, args: &[&str], stdin: &[u8], timeout: Duration) -> Run {
        let leader = self.leader.to_string();
        let child = Command::new("nsenter")
            .args(["-t", &leader, "-a", "--", "env", "-i"])
            .args([
                format!("PATH={PATH}"),
                "LANG=C.UTF-8".into(),
                "TERM=dumb".into(),
                "SYSTEMD_PAGER=cat".into(),
                "SYSTEMD_COLORS=0".into(),
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run nsenter");
        wait_bounded(
            child,
            stdin,
            timeout,
            &format!("in the container: {}", args.join(" ")),
        )
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, b"", Duration::from_secs(60))
    }

    /// `args` must succeed; their standard output.
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            r.code == Some(0),
            "in the container: {} failed ({:?}):\n{}",
            args.join(" "),
            r.code,
            said(&r)
        );
        r.stdout
    }

    fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-ec", script])
    }

    /// `systemctl show` properties of `unit`.
    fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
        let mut args = vec!["systemctl", "show", unit];
        for p in props {
            args.push("-p");
            args.push(p);
        }
        self.ok(&args)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.show(unit, &[prop])
            .remove(prop)
            .unwrap_or_else(|| panic!("systemctl show {unit}: no {prop}"))
    }

    /// `systemctl stop UNIT`: it must end inactive, with `Result=success` and exit status
    /// 0, and a journal with nothing of [`BAD_IN_JOURNAL`]; that journal.
    fn stop_cleanly(&self, unit: &str) -> String {
        self.ok(&["systemctl", "stop", unit]);
        let p = self.show(unit, &["ActiveState", "Result", "ExecMainStatus"]);
        assert_eq!(
            (
                p["ActiveState"].as_str(),
                p["Result"].as_str(),
                p["ExecMainStatus"].as_str()
            ),
            ("inactive", "success", "0"),
            "{unit} after stop:\n{}",
            self.journal(unit)
        );
        let j = self.journal(unit);
        assert_clean_journal(unit, &j);
        j
    }

    /// The journal of `unit`, everything logged so far.
    fn journal(&self, unit: &str) -> String {
        self.ok(&["journalctl", "--sync"]);
        self.ok(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ])
    }

    /// Put [`VIP`] on [`VIP_IF`] inside the container tagged as failoverd's (IFA_PROTO
    /// 250: bookworm's `ip` cannot set it), with failoverd's own code, from a thread that
    /// entered the container's network namespace (never the host's).
    fn add_tagged_vip(&self) {
        let ns_path = format!("/proc/{}/ns/net", self.leader);
        let theirs = std::fs::metadata(&ns_path).expect("the container's netns");
        let ours = std::fs::metadata("/proc/self/ns/net").expect("our netns");
        assert!(
            (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()),
            "the container shares the host's network namespace: refusing to add an address"
        );
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&ns_path).expect("open the container's netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the container's netns");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime")
                    .block_on(async {
                        failoverd::vip::Vip::parse(VIP_IF, VIP)
                            .expect("the VIP parses")
                            .add()
                            .await
                    })
                    .expect("add the tagged VIP in the container");
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        });
    }

    /// Wait until the boot is over ("running", or "degraded": then say which units failed).
    fn wait_booted(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let r = self.run_with(
                &["systemctl", "is-system-running"],
                b"",
                Duration::from_secs(10),
            );
            last = said(&r).trim().to_string();
            match last.as_str() {
                "running" => return,
                "degraded" => {
                    let failed = self.run(&["systemctl", "--failed", "--no-legend"]);
                    eprintln!(
                        "systemd_nspawn: the container booted degraded (units of the host's tree, \
                         not the package's): {}",
                        said(&failed).trim()
                    );
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        panic!(
            "the container's systemd did not finish booting within {within:?} (last: {last:?}):\n{}",
            self.log_text()
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() && self.leader != 0 {
            if let Ok(None) = self.nspawn.try_wait() {
                let _ = self.run_with(&["journalctl", "--sync"], b"", Duration::from_secs(10));
                let mut args = vec!["journalctl", "--no-pager", "-o", "short-monotonic"];
                if self.units.is_empty() {
                    args.extend(["-b", "-n", "150"]);
                }
                for u in &self.units {
                    args.extend(["-u", u]);
                }
                let j = self.run_with(&args, b"", Duration::from_secs(10));
                eprintln!(
                    "systemd_nspawn: container {}: {}:\n{}",
                    self.name,
                    args.join(" "),
                    j.stdout
                );
            }
            eprintln!(
                "systemd_nspawn: container {}: systemd-nspawn said:\n{}",
                self.name,
                self.log_text()
            );
        }
        let nspawn = Pid::from_raw(self.nspawn.id() as i32);
        // SIGTERM: systemd-nspawn asks the container's systemd to power off.
        if let Ok(None) = self.nspawn.try_wait() {
            let _ = kill(nspawn, Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.nspawn.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("systemd_nspawn: the container did not power off within 20 s: killing it");
        // The container's PID 1 (only while it is still systemd-nspawn's child: a pid
        // of ours), then systemd-nspawn; the kernel kills the rest of its pid namespace.
        if self.leader != 0
            && matches!(ppid_and_comm(self.leader), Some((pp, _)) if pp == self.nspawn.id())
        {
            let _ = kill(Pid::from_raw(self.leader as i32), Signal::SIGKILL);
        }
        let _ = self.nspawn.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.nspawn.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "systemd_nspawn: systemd-nspawn (pid {}) still runs after SIGKILL",
            self.nspawn.id()
        );
    }
}

/// The port lines of `ss -Hltnp` that listen on `port`.
fn listening(ss: &str, port: u16) -> Vec<&str> {
    let suffix = format!(":{port}");
    ss.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|a| a.ends_with(&suffix))
        })
        .collect()
}

fn assert_clean_journal(unit: &str, journal: &str) {
    for bad in BAD_IN_JOURNAL {
        assert!(
            !journal.contains(bad),
            "the journal of {unit} says {bad:?}:\n{journal}"
        );
    }
}

/// `systemctl VERB UNIT` as `user` must be refused by polkit.
fn assert_refused(c: &Container, user: &str, verb: &str, unit: &str) {
    let r = c.run(&[
        "runuser",
        "-u",
        user,
        "--",
        "systemctl",
        "--no-ask-password",
        verb,
        unit,
    ]);
    let text = said(&r);
    assert!(
        r.code != Some(0)
            && (text.contains("Interactive authentication required")
                || text.contains("Access denied")),
        "{user}: systemctl {verb} {unit} was not refused by polkit ({:?}):\n{text}",
        r.code
    );
}

/// `systemctl VERB conode.service` as the user failoverd must succeed.
fn as_failoverd(c: &Container, verb: &str) {
    c.ok(&[
        "runuser",
        "-u",
        "failoverd",
        "--",
        "systemctl",
        "--no-ask-password",
        verb,
        "conode.service",
    ]);
}

#[test]
fn packaged_units_and_polkit_rule_work_under_systemd_in_a_container() {
    let t0 = Instant::now();
    check_prerequisites();
    let _lock = system_tests::package_lock(Duration::from_secs(600));
    let waited = t0.elapsed();

    let work = tempfile::Builder::new()
        .prefix("conode-nspawn.")
        .tempdir()
        .expect("tempdir");
    let t = Instant::now();
    let (pkg_dir, deb) = build_package(work.path());
    let built = t.elapsed();
    let recommends = host(
        "dpkg-deb",
        &["-f", deb.to_str().expect("utf-8 path"), "Recommends"],
        Duration::from_secs(30),
    );
    assert!(
        recommends.stdout.split(',').any(|p| p.trim() == "polkitd"),
        "the package does not recommend polkitd (its rule needs it): {:?}",
        recommends.stdout
    );
    let deb_name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .expect("package file name")
        .to_string();

    let before = host_state();
    let t = Instant::now();
    let c = Container::boot(
        &format!("conode-test-{}", std::process::id()),
        &pkg_dir,
        &work.path().join("nspawn.log"),
        Network::Private,
    );
    c.wait_booted(Duration::from_secs(60));
    let booted = t.elapsed();
    // The host's enabled services stay off: only basic.target was booted.
    assert_eq!(
        c.prop("multi-user.target", "ActiveState"),
        "inactive",
        "the container booted multi-user.target (the host's services)"
    );
    assert_eq!(c.sh("ip -o link show | wc -l").trim(), "1", "not only lo");

    // Install.
    let t = Instant::now();
    c.install(&deb_name);
    let installed = t.elapsed();
    let p = c.show(
        "conode.service",
        &[
            "LoadState",
            "UnitFileState",
            "ActiveState",
            "Type",
            "NotifyAccess",
        ],
    );
    assert_eq!(p["LoadState"], "loaded", "conode.service after dpkg -i");
    assert_eq!(
        p["UnitFileState"], "disabled",
        "the package enables nothing"
    );
    assert_eq!(p["ActiveState"], "inactive", "the package starts nothing");
    assert_eq!(
        (p["Type"].as_str(), p["NotifyAccess"].as_str()),
        ("notify", "main")
    );

    // The conode, as docs/packaging.md sets it up.
    c.setup_conode("127.0.0.1", "systemd_nspawn test");

    // conode.service: `systemctl start` returns once READY=1 arrived (Type=notify).
    let start = c.run(&["systemctl", "--no-ask-password", "start", "conode.service"]);
    if start.code != Some(0) {
        panic!(
            "systemctl start conode.service failed ({:?}):\n{}\njournal:\n{}",
            start.code,
            said(&start),
            c.journal("conode.service")
        );
    }
    let p = c.show(
        "conode.service",
        &["ActiveState", "SubState", "MainPID", "NRestarts"],
    );
    assert_eq!(
        (p["ActiveState"].as_str(), p["SubState"].as_str()),
        ("active", "running"),
        "conode.service after start: {p:?}"
    );
    assert_eq!(p["NRestarts"], "0", "conode.service restarted");
    let main = p["MainPID"].clone();
    assert_eq!(
        c.ok(&["stat", "-c", "%U", &format!("/proc/{main}")]).trim(),
        "conode",
        "conode.service does not run as the user conode"
    );
    let ss = c.ok(&["ss", "-Hltnp"]);
    for port in [7000, 7001] {
        let lines = listening(&ss, port);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("pid={main},")) && l.contains("\"conode\"")),
            "the conode (pid {main}) does not listen on {port}:\n{ss}"
        );
    }
    // Its metrics on loopback only (CONODE_METRICS in the unit), and they answer.
    let metrics = listening(&ss, 9102);
    assert!(
        !metrics.is_empty()
            && metrics.iter().all(|l| {
                l.split_whitespace().nth(3) == Some("127.0.0.1:9102")
                    && l.contains(&format!("pid={main},"))
            }),
        "the conode (pid {main}) does not serve its metrics on 127.0.0.1:9102 only:\n{ss}"
    );
    let scrape = c.sh("curl -sf http://127.0.0.1:9102/metrics");
    assert!(
        scrape.contains("conode_build_info") && scrape.trim_end().ends_with("# EOF"),
        "the conode's metrics do not answer: {scrape}"
    );
    let admin = c.sh("ls -l /var/lib/conode/ | grep 'admin-.*\\.sock'");
    assert!(
        admin.starts_with("srw-rw---- ") && admin.contains(" conode conode "),
        "the admin socket is not 0660 conode:conode: {admin}"
    );
    let j = c.stop_cleanly("conode.service");
    assert!(
        j.contains("Started conode.service") && j.contains("database closed cleanly"),
        "conode.service's journal lacks its start or its clean stop:\n{j}"
    );

    // The polkit rule: failoverd may start, restart and stop conode.service, nothing else.
    as_failoverd(&c, "start");
    assert_eq!(c.prop("conode.service", "ActiveState"), "active");
    assert_eq!(c.prop("polkit.service", "ActiveState"), "active");
    let pid1 = c.prop("conode.service", "MainPID");
    as_failoverd(&c, "restart");
    let pid2 = c.prop("conode.service", "MainPID");
    assert!(
        pid1 != pid2 && c.prop("conode.service", "ActiveState") == "active",
        "restart by failoverd: MainPID {pid1} then {pid2}"
    );
    as_failoverd(&c, "stop");
    assert_eq!(c.prop("conode.service", "ActiveState"), "inactive");
    assert_refused(&c, "failoverd", "start", "systemd-initctl.service");
    assert_refused(&c, "failoverd", "enable", "conode.service");
    assert_refused(&c, "conode", "start", "conode.service");
    assert_eq!(
        c.prop("conode.service", "ActiveState"),
        "inactive",
        "a refused start started the conode"
    );
    assert_eq!(c.prop("systemd-initctl.service", "ActiveState"), "inactive");

    // failoverd: the address's interface inside the container (veth: this kernel may have
    // no dummy driver), a peer's key to pin, then the configuration as in
    // docs/packaging.md.
    c.sh(&format!(
        "ip link add {VIP_IF} type veth peer name {VIP_IF}-peer
         ip link set {VIP_IF}-peer up
         ip link set {VIP_IF} up
         ip addr add {IF_ADDR} dev {VIP_IF}"
    ));
    let peer = c.ok(&[
        "failoverd",
        "-c",
        "/var/tmp/peer/failoverd.toml",
        "setup",
        "--state-dir",
        "/var/tmp/peer/state",
        "--peer",
        "10.77.0.1:7780",
        "--interface",
        VIP_IF,
    ]);
    let peer_key = peer
        .lines()
        .map(str::trim)
        .rfind(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("failoverd setup printed no public key:\n{peer}"))
        .to_string();
    c.ok(&[
        "failoverd",
        "-c",
        "/etc/failoverd/failoverd.toml",
        "setup",
        "--conode-config",
        "/etc/conode/private.toml",
        "--conode-data-dir",
        "/var/lib/conode",
        "--peer",
        PEER,
        "--peer-key",
        &peer_key,
        "--interface",
        VIP_IF,
    ]);
    let toml = c.ok(&["cat", "/etc/failoverd/failoverd.toml"]);
    let vip_at = toml.find("\n[vip]\n").expect("[vip] in failoverd.toml");
    let empty = "\naddress = \"\"\n";
    let addr_at = vip_at
        + toml[vip_at..]
            .find(empty)
            .expect("[vip] address = \"\" in failoverd.toml");
    let toml = format!(
        "{}\naddress = \"{VIP}\"\n{}",
        &toml[..addr_at],
        &toml[addr_at + empty.len()..]
    );
    c.write("/etc/failoverd/failoverd.toml", toml.as_bytes());
    c.ok(&["chown", "failoverd", "/etc/failoverd/failoverd.key"]);
    c.ok(&["chmod", "0640", "/etc/failoverd/failoverd.toml"]);
    let check = c.ok(&["failoverd", "-c", "/etc/failoverd/failoverd.toml", "check"]);
    assert!(
        check.contains(&format!("ok: vip {VIP} on {VIP_IF}")),
        "failoverd check:\n{check}"
    );

    // failoverd.service: READY=1, then the watchdog fed for longer than WatchdogSec.
    let start = c.run(&["systemctl", "start", "failoverd.service"]);
    let started = Instant::now();
    if start.code != Some(0) {
        panic!(
            "systemctl start failoverd.service failed ({:?}):\n{}\njournal:\n{}",
            start.code,
            said(&start),
            c.journal("failoverd.service")
        );
    }
    let props = [
        "ActiveState",
        "SubState",
        "MainPID",
        "NRestarts",
        "WatchdogUSec",
        "ActiveEnterTimestampMonotonic",
        "WatchdogTimestampMonotonic",
    ];
    let p = c.show("failoverd.service", &props);
    assert_eq!(
        (p["ActiveState"].as_str(), p["SubState"].as_str()),
        ("active", "running"),
        "failoverd.service after start: {p:?}"
    );
    let main = p["MainPID"].clone();
    let entered: u64 = p["ActiveEnterTimestampMonotonic"].parse().expect("µs");
    // systemctl show prints WatchdogUSec as a time span ("20s").
    let watchdog = match p["WatchdogUSec"].as_str() {
        "0" | "infinity" | "" => panic!("failoverd.service has no watchdog: {p:?}"),
        s => {
            let secs: u64 = s
                .strip_suffix('s')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("WatchdogUSec={s}: expected whole seconds"));
            Duration::from_secs(secs)
        }
    };
    assert_eq!(
        c.ok(&["stat", "-c", "%U", &format!("/proc/{main}")]).trim(),
        "failoverd",
        "failoverd.service does not run as the user failoverd"
    );
    let status = c.sh(&format!("grep -E '^Cap(Amb|Eff):' /proc/{main}/status"));
    assert!(
        status.lines().all(|l| l.ends_with("0000000000003000")),
        "failoverd's capabilities are not exactly CAP_NET_ADMIN and CAP_NET_RAW:\n{status}"
    );
    let st = c.ok(&[
        "runuser",
        "-u",
        "failoverd",
        "--",
        "failoverd",
        "-c",
        "/etc/failoverd/failoverd.toml",
        "status",
    ]);
    assert!(
        st.lines()
            .any(|l| l.starts_with("role:") && l.contains("standby")),
        "failoverd status as failoverd:\n{st}"
    );
    let past = watchdog + Duration::from_secs(3);
    if let Some(rest) = past.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let p = c.show("failoverd.service", &props);
    assert_eq!(
        (
            p["ActiveState"].as_str(),
            p["MainPID"].as_str(),
            p["NRestarts"].as_str()
        ),
        ("active", main.as_str(), "0"),
        "failoverd.service {past:?} after start (WatchdogSec {watchdog:?}): {p:?}\n{}",
        c.journal("failoverd.service")
    );
    let pinged: u64 = p["WatchdogTimestampMonotonic"].parse().expect("µs");
    assert!(
        pinged >= entered + watchdog.as_micros() as u64 / 2,
        "no WATCHDOG=1 from failoverd half a WatchdogSec after READY=1 (ready at {entered} µs, \
         last ping at {pinged} µs)"
    );

    // Stop: ExecStopPost=failoverd release-vip runs (the address is not there).
    let j = c.stop_cleanly("failoverd.service");
    let released = format!(": {VIP} is not on {VIP_IF}: nothing to release");
    let line = j
        .lines()
        .find(|l| l.ends_with(&released))
        .unwrap_or_else(|| panic!("no release-vip line ({released:?}) in the journal:\n{j}"));
    assert!(
        !line.contains(&format!("[{main}]")),
        "the release-vip line comes from the daemon, not ExecStopPost: {line}"
    );
    assert_eq!(
        c.prop("conode.service", "ActiveState"),
        "inactive",
        "stopping failoverd started the conode"
    );

    // Again, with what a crash of the live host's failoverd leaves: the address tagged as
    // failoverd's (IFA_PROTO 250) and the conode running. The ExecStopPost, as the user
    // failoverd inside the unit's sandbox, removes the address (CAP_NET_ADMIN) and stops
    // the conode (systemctl, allowed by the polkit rule).
    c.ok(&["systemctl", "start", "failoverd.service"]);
    let main = c.prop("failoverd.service", "MainPID");
    c.ok(&["systemctl", "start", "conode.service"]);
    c.add_tagged_vip();
    std::thread::sleep(Duration::from_millis(500));
    let addrs = c.ok(&["ip", "-o", "addr", "show", "dev", VIP_IF]);
    assert!(
        addrs.contains(VIP) && c.prop("conode.service", "ActiveState") == "active",
        "the standby failoverd took the tagged address or the conode away itself:\n{addrs}"
    );
    let j = c.stop_cleanly("failoverd.service");
    for said in [
        format!(": removed {VIP} from {VIP_IF}"),
        ": stopped conode.service: this host is a standby".to_string(),
    ] {
        let line = j
            .lines()
            .find(|l| l.ends_with(&said))
            .unwrap_or_else(|| panic!("no {said:?} from release-vip in the journal:\n{j}"));
        assert!(
            !line.contains(&format!("[{main}]")),
            "{said:?} comes from the daemon, not ExecStopPost: {line}"
        );
    }
    let addrs = c.ok(&["ip", "-o", "addr", "show", "dev", VIP_IF]);
    assert!(!addrs.contains(VIP), "the address is still there:\n{addrs}");
    assert_eq!(c.prop("conode.service", "ActiveState"), "inactive");
    assert_clean_journal("conode.service", &c.journal("conode.service"));
    let t = Instant::now();
    drop(c);
    let down = t.elapsed();
    let after = host_state();
    assert_eq!(before, after, "the host changed while the container ran");
    eprintln!(
        "systemd_nspawn: lock wait {:.1} s, package {:.1} s, boot {:.1} s, dpkg -i {:.1} s, \
         power-off {:.1} s, total {:.1} s",
        waited.as_secs_f64(),
        built.as_secs_f64(),
        booted.as_secs_f64(),
        installed.as_secs_f64(),
        down.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The packaged failoverd's configuration path, and its `status --json` run as root
/// inside `c` (through the control socket, `0600` the user failoverd's: root passes).
const FO_TOML: &str = "/etc/failoverd/failoverd.toml";

fn fo_status(c: &Container) -> system_tests::Json {
    system_tests::Json::parse(&c.ok(&["failoverd", "-c", FO_TOML, "status", "--json"]))
        .unwrap_or_else(|e| panic!("container {}: failoverd status --json: {e}", c.name))
}

/// `failoverd setup` as docs/packaging.md has it, with the virtual IP on `eth0` and the
/// peer at `peer`; the key pinned later. The public key it printed.
/// The role hook of the pair test (it records its capabilities).
const ROLE_HOOK: &str = "/etc/failoverd/role-hook";

fn setup_failoverd(c: &Container, peer: &str, vip: &str) -> String {
    let out = c.ok(&[
        "failoverd",
        "-c",
        FO_TOML,
        "setup",
        "--conode-config",
        "/etc/conode/private.toml",
        "--conode-data-dir",
        "/var/lib/conode",
        "--state-dir",
        "/var/lib/failoverd",
        "--peer",
        peer,
        "--interface",
        "eth0",
        "--vip",
        vip,
    ]);
    c.ok(&["chown", "failoverd", "/etc/failoverd/failoverd.key"]);
    c.ok(&["chmod", "0640", FO_TOML]);
    out.lines()
        .map(str::trim)
        .rfind(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("failoverd setup printed no public key:\n{out}"))
        .to_string()
}

/// A switchover between two packaged hosts, each a container with a real systemd in a
/// network namespace of a [`system_tests::netns::Lab`] (`--network-namespace-path`: its
/// `eth0` is the lab's cable to the bridge), one conode identity whose address is the
/// virtual IP, failoverd.service on both (as the user failoverd, `control = "systemd"`:
/// it starts and stops conode.service through the polkit rule), a client in the lab's
/// third namespace. The standby's failoverd installs the shipped generation into
/// /var/lib/conode as its own user (the database group conode, 0660), and the kernel's
/// address events (`AddrWatch`) show the two hosts never held the address at once.
#[test]
fn a_switchover_between_two_packaged_hosts_under_systemd() {
    use std::net::{IpAddr, Ipv4Addr};
    use system_tests::addrwatch::AddrWatch;
    use system_tests::netns::Lab;

    let t0 = Instant::now();
    check_prerequisites();
    let _lock = system_tests::package_lock(Duration::from_secs(600));
    let waited = t0.elapsed();
    let work = tempfile::Builder::new()
        .prefix("conode-nspawn-pair.")
        .tempdir()
        .expect("tempdir");
    let t = Instant::now();
    let (pkg_dir, deb) = build_package(work.path());
    let built = t.elapsed();
    let deb_name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .expect("package file name")
        .to_string();

    // Declared before the containers: dropped after them (the lab kills what is left in
    // its namespaces and deletes them).
    let lab = Lab::with_client("nspawnpair");
    let o = lab.a().addr().octets();
    let vip = Ipv4Addr::new(o[0], o[1], o[2], 100);
    let vip_cidr = format!("{vip}/24");
    let watch = AddrWatch::start(IpAddr::V4(vip), &[lab.a(), lab.b()]);

    let t = Instant::now();
    let pid = std::process::id();
    let mut ca = Container::boot(
        &format!("conode-pair-{pid}-a"),
        &pkg_dir,
        &work.path().join("nspawn-a.log"),
        Network::Namespace(lab.a().ns()),
    );
    let mut cb = Container::boot(
        &format!("conode-pair-{pid}-b"),
        &pkg_dir,
        &work.path().join("nspawn-b.log"),
        Network::Namespace(lab.b().ns()),
    );
    for c in [&mut ca, &mut cb] {
        c.units = vec!["failoverd.service", "conode.service"];
    }
    let deb_name = deb_name.as_str();
    std::thread::scope(|s| {
        for c in [&ca, &cb] {
            s.spawn(move || {
                c.wait_booted(Duration::from_secs(60));
                c.install(deb_name);
            });
        }
    });
    let booted = t.elapsed();
    for (c, h) in [(&ca, lab.a()), (&cb, lab.b())] {
        let addrs = c.ok(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(
            addrs.contains(&format!("{}/24", h.addr())),
            "container {} is not in {}: {addrs}",
            c.name,
            h.ns()
        );
    }

    // One identity, its address the virtual IP: made on a, copied to b as it is.
    ca.setup_conode(&vip.to_string(), "systemd_nspawn pair");
    let private = ca.ok(&["cat", "/etc/conode/private.toml"]);
    let public = ca.ok(&["cat", "/etc/conode/public.toml"]);
    cb.write("/etc/conode/private.toml", private.as_bytes());
    cb.ok(&["chmod", "0640", "/etc/conode/private.toml"]);
    for c in [&ca, &cb] {
        assert_eq!(
            c.ok(&["stat", "-c", "%U:%G %a", "/etc/conode/private.toml"])
                .trim(),
            "root:conode 640",
            "private.toml in {}",
            c.name
        );
    }
    // The client's copies (the roster names the virtual IP).
    let client_private = work.path().join("private.toml");
    let roster = work.path().join("public.toml");
    std::fs::write(&client_private, &private).expect("write private.toml");
    std::fs::write(&roster, &public).expect("write public.toml");
    assert!(public.contains(&format!("{vip}:7000")), "roster:\n{public}");

    // failoverd on both, each key pinned on the other.
    let key_a = setup_failoverd(&ca, &format!("{}:7780", lab.b().addr()), &vip_cidr);
    let key_b = setup_failoverd(&cb, &format!("{}:7780", lab.a().addr()), &vip_cidr);
    for (c, peer_key) in [(&ca, &key_b), (&cb, &key_a)] {
        let toml = c.ok(&["cat", FO_TOML]);
        assert!(toml.contains("control = \"systemd\""), "{toml}");
        let pinned = toml.replace("public_key = \"\"", &format!("public_key = \"{peer_key}\""));
        assert!(pinned != toml, "no empty public_key in {FO_TOML}:\n{toml}");
        // A role hook that records the capabilities it runs with.
        c.write(
            ROLE_HOOK,
            b"#!/bin/sh\ngrep -E '^Cap(Eff|Amb)' /proc/self/status > /var/lib/failoverd/hook-caps\n",
        );
        c.ok(&["chmod", "0755", ROLE_HOOK]);
        let pinned = pinned.replace(
            "on_role_change = \"\"",
            &format!("on_role_change = \"{ROLE_HOOK}\""),
        );
        assert!(pinned.contains(ROLE_HOOK), "no on_role_change in {FO_TOML}");
        c.write(FO_TOML, pinned.as_bytes());
        assert_eq!(
            c.ok(&[
                "stat",
                "-c",
                "%U:%G %a",
                FO_TOML,
                "/etc/failoverd/failoverd.key"
            ]),
            "root:failoverd 640\nfailoverd:failoverd 600\n",
            "failoverd's files in {}",
            c.name
        );
        let check = c.ok(&["failoverd", "-c", FO_TOML, "check"]);
        assert!(
            check.contains(&format!("ok: vip {vip_cidr} on eth0")),
            "failoverd check in {}:\n{check}",
            c.name
        );
    }
    let t = Instant::now();
    for c in [&ca, &cb] {
        let start = c.run(&["systemctl", "start", "failoverd.service"]);
        assert!(
            start.code == Some(0),
            "systemctl start failoverd.service in {} failed ({:?}):\n{}",
            c.name,
            start.code,
            said(&start)
        );
        assert_eq!(c.prop("conode.service", "ActiveState"), "inactive");
    }
    for c in [&ca, &cb] {
        system_tests::wait_until(
            &format!("failoverd in {} hears its peer", c.name),
            Duration::from_secs(20),
            || {
                fo_status(c)
                    .at(&["peer", "reachable"])
                    .and_then(|v| v.as_bool())
                    == Some(true)
            },
        );
        assert_eq!(fo_status(c).str_at(&["role"]), "standby");
    }
    assert!(watch.holders().is_empty(), "{}", watch.report());

    // Promote a: the address on a's eth0, conode.service started by failoverd.
    let out = ca.ok(&["failoverd", "-c", FO_TOML, "promote"]);
    assert!(out.contains("live under epoch"), "promote on a:\n{out}");
    // failoverd has CAP_NET_ADMIN and CAP_NET_RAW (bits 12, 13) as ambient capabilities;
    // the hook it ran has none at all.
    let main = ca.prop("failoverd.service", "MainPID");
    let own = ca.ok(&["grep", "^CapAmb", &format!("/proc/{main}/status")]);
    assert_eq!(own.trim(), "CapAmb:\t0000000000003000", "failoverd's own");
    system_tests::wait_until("a's role hook ran", Duration::from_secs(10), || {
        ca.run(&["test", "-s", "/var/lib/failoverd/hook-caps"]).code == Some(0)
    });
    assert_eq!(
        ca.ok(&["cat", "/var/lib/failoverd/hook-caps"]),
        "CapEff:\t0000000000000000\nCapAmb:\t0000000000000000\n",
        "the role hook's capabilities"
    );
    assert!(
        watch.wait_holders(&[lab.a().ns()], Duration::from_secs(10)),
        "a does not hold the address:\n{}",
        watch.report()
    );
    system_tests::wait_until(
        "conode.service active on a",
        Duration::from_secs(20),
        || ca.prop("conode.service", "ActiveState") == "active",
    );
    assert_eq!(fo_status(&ca).str_at(&["role"]), "live");
    let promoted = t.elapsed();

    // A client appends through the virtual IP.
    let conode = system_tests::conode_bin().display().to_string();
    let (cp, rp) = (client_private.display(), roster.display());
    let client = |script: &str| -> String {
        let r = lab.client().sh(script, Duration::from_secs(30));
        assert!(
            r.code == Some(0),
            "client: {script} failed ({:?}):\n{}",
            r.code,
            said(&r)
        );
        r.stdout
    };
    let data = work.path().join("blockdata");
    let mut chain = String::new();
    let mut index = 0;
    for i in 0..5 {
        std::fs::write(&data, format!("block {i} through the virtual IP")).expect("block data");
        let cmd = if chain.is_empty() {
            format!(
                "{conode} -c {cp} chain create {rp} --data {} --json",
                data.display()
            )
        } else {
            format!(
                "{conode} -c {cp} chain add {chain} --data {} --json",
                data.display()
            )
        };
        let j = system_tests::Json::parse(&client(&cmd)).expect("chain JSON");
        if chain.is_empty() {
            chain = j.str_at(&["chain"]).to_string();
        }
        index = j.at(&["index"]).and_then(|v| v.as_u64()).expect("index");
    }
    assert_eq!(index, 4, "five blocks: 0..=4");

    // a ships snapshots; b verifies them and knows a is live under its epoch.
    system_tests::wait_until(
        "b holds a verified generation and hears a live",
        Duration::from_secs(30),
        || {
            let st = fo_status(&cb);
            st.at(&["newest_generation"])
                .and_then(|v| v.as_u64())
                .is_some()
                && st.at(&["peer", "live"]).and_then(|v| v.as_bool()) == Some(true)
                && st.at(&["epoch"]).and_then(|v| v.as_u64())
                    == st.at(&["peer", "epoch"]).and_then(|v| v.as_u64())
        },
    );
    assert_eq!(
        cb.sh("ls /var/lib/conode/ | grep '\\.db$' || true").trim(),
        "",
        "b has a database before the switchover"
    );

    // Switchover, asked on b.
    let t = Instant::now();
    let out = cb.ok(&["failoverd", "-c", FO_TOML, "switchover"]);
    let switched = t.elapsed();
    assert!(out.contains("live under epoch"), "switchover on b:\n{out}");
    assert!(
        watch.wait_holders(&[lab.b().ns()], Duration::from_secs(10)),
        "b does not hold the address:\n{}",
        watch.report()
    );
    assert_eq!(fo_status(&cb).str_at(&["role"]), "live");
    assert_eq!(fo_status(&ca).str_at(&["role"]), "standby");
    system_tests::wait_until(
        "conode.service active on b",
        Duration::from_secs(20),
        || cb.prop("conode.service", "ActiveState") == "active",
    );
    system_tests::wait_until(
        "conode.service inactive on a",
        Duration::from_secs(20),
        || ca.prop("conode.service", "ActiveState") == "inactive",
    );
    // b's database is the generation failoverd installed as its own user: the file is
    // failoverd's (a link to its generation), in the data directory's group, 0660.
    let db = cb.sh("ls -1 /var/lib/conode/*.db");
    let db = db.trim();
    assert!(
        !db.is_empty() && !db.contains('\n'),
        "b's databases: {db:?}"
    );
    assert_eq!(
        cb.ok(&["stat", "-c", "%U:%G %a", db]).trim(),
        "failoverd:conode 660",
        "b's database {db} after the install"
    );
    let main = cb.prop("conode.service", "MainPID");
    assert_eq!(
        cb.ok(&["stat", "-c", "%U", &format!("/proc/{main}")])
            .trim(),
        "conode"
    );
    // Every acknowledged block, through the virtual IP, from b's conode.
    for i in 0..=index {
        client(&format!("{conode} -c {cp} chain get {chain} --index {i}"));
    }
    // And it takes a new one.
    std::fs::write(&data, "a block after the switchover").expect("block data");
    let j = system_tests::Json::parse(&client(&format!(
        "{conode} -c {cp} chain add {chain} --data {} --json",
        data.display()
    )))
    .expect("chain JSON");
    assert_eq!(j.at(&["index"]).and_then(|v| v.as_u64()), Some(index + 1));

    // Stopping failoverd on the live host releases the address and stops the conode.
    cb.ok(&["systemctl", "stop", "failoverd.service"]);
    assert!(
        watch.wait_holders(&[], Duration::from_secs(10)),
        "the address is still held after failoverd.service stopped on b:\n{}",
        watch.report()
    );
    system_tests::wait_until(
        "conode.service inactive on b",
        Duration::from_secs(20),
        || cb.prop("conode.service", "ActiveState") == "inactive",
    );

    // b's failoverd back (standby), a promoted again; then a's failoverd is killed
    // (SIGKILL: nothing of its own stop runs) and the unit's ExecStopPost
    // (`failoverd release-vip`) still takes the address off and stops the conode.
    cb.ok(&["systemctl", "start", "failoverd.service"]);
    system_tests::wait_until(
        "a hears b back as a standby",
        Duration::from_secs(30),
        || {
            let st = fo_status(&ca);
            st.at(&["peer", "reachable"]).and_then(|v| v.as_bool()) == Some(true)
                && st.at(&["peer", "live"]).and_then(|v| v.as_bool()) == Some(false)
        },
    );
    let out = ca.ok(&["failoverd", "-c", FO_TOML, "promote"]);
    assert!(
        out.contains("live under epoch"),
        "promote on a again:\n{out}"
    );
    assert!(
        watch.wait_holders(&[lab.a().ns()], Duration::from_secs(10)),
        "a does not hold the address again:\n{}",
        watch.report()
    );
    system_tests::wait_until(
        "conode.service active on a again",
        Duration::from_secs(20),
        || ca.prop("conode.service", "ActiveState") == "active",
    );
    // The main process only: the container cannot signal a whole control group.
    ca.ok(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=SIGKILL",
        "failoverd.service",
    ]);
    assert!(
        watch.wait_holders(&[], Duration::from_secs(20)),
        "the address is still held after failoverd was killed on a:\n{}",
        watch.report()
    );
    system_tests::wait_until(
        "conode.service inactive on a after the kill",
        Duration::from_secs(20),
        || ca.prop("conode.service", "ActiveState") == "inactive",
    );
    let j = ca.journal("failoverd.service");
    assert!(
        j.contains(&format!("removed {vip_cidr} from")),
        "the journal of a's failoverd.service shows no release after the kill:\n{j}"
    );
    watch.sync();
    watch.assert_no_overlap();
    for c in [&ca, &cb] {
        for unit in ["failoverd.service", "conode.service"] {
            let mut j = c.journal(unit);
            if std::ptr::eq(c, &ca) && unit == "failoverd.service" {
                // The kill above, and systemd's account of it (its main process only:
                // the container cannot signal the control group): nothing else.
                let killed = [
                    "code=killed, status=9/KILL",
                    "Failed with result 'signal'",
                    "on client request",
                    "Failed to kill control group",
                ];
                assert!(
                    j.contains(killed[0]),
                    "the kill is not in a's journal:\n{j}"
                );
                j = j
                    .lines()
                    .filter(|l| !killed.iter().any(|k| l.contains(k)))
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            // BAD_IN_JOURNAL has the admin socket's refusal ("refused a client").
            assert_clean_journal(&format!("{unit} in {}", c.name), &j);
        }
    }

    let t = Instant::now();
    drop(watch);
    drop(ca);
    drop(cb);
    let down = t.elapsed();
    eprintln!(
        "systemd_nspawn pair: lock wait {:.1} s, package {:.1} s, boot and dpkg -i {:.1} s, \
         setup to a live {:.1} s, switchover {:.1} s, power-off {:.1} s, total {:.1} s",
        waited.as_secs_f64(),
        built.as_secs_f64(),
        booted.as_secs_f64(),
        promoted.as_secs_f64(),
        switched.as_secs_f64(),
        down.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
