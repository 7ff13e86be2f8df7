//! Shared harness for system tests: run the real `conode` binary in a temporary
//! directory, on free loopback ports, and stop it (by its own pid) afterwards.
//!
//! The binaries must be built first (`cargo build --workspace`; `scripts/test` does it).
//! A test that cannot get what it needs panics with the reason: it never skips.
//!
//! Modules: [`netns`] (the lab of hosts in network namespaces) and [`addrwatch`] (the
//! checker of record for "at most one holder of the virtual IP").
pub mod addrwatch;
pub mod netns;
pub mod prometheus;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Path of a workspace binary next to the test executable (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace first (cargo build --workspace; scripts/test does it)",
        p.display()
    );
    p
}

pub fn conode_bin() -> PathBuf {
    bin("conode")
}

/// A port `p` such that `p` and `p+1` were both free on 127.0.0.1 a moment ago.
pub fn free_port_pair() -> u16 {
    free_port_pair_on("127.0.0.1")
}

/// A conode's files in a temporary directory, created with `conode setup`.
pub struct NodeFiles {
    pub dir: TempDir,
    pub port: u16,
}

impl NodeFiles {
    /// `conode setup --non-interactive` on 127.0.0.1 with free ports.
    pub fn setup(description: &str) -> NodeFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port_pair();
        let out = Command::new(conode_bin())
            .arg("-c")
            .arg(dir.path().join("co/private.toml"))
            .args([
                "setup",
                "--non-interactive",
                "--host",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .args(["--description", description])
            .output()
            .expect("run conode setup");
        assert!(
            out.status.success(),
            "setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NodeFiles { dir, port }
    }

    pub fn private(&self) -> PathBuf {
        self.dir.path().join("co/private.toml")
    }
    pub fn public(&self) -> PathBuf {
        self.dir.path().join("co/public.toml")
    }
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn ws_port(&self) -> u16 {
        self.port + 1
    }

    /// Rewrite one top-level key of private.toml (string value).
    pub fn set_private_key(&self, key: &str, value: &str) {
        let src = std::fs::read_to_string(self.private()).unwrap();
        let mut found = false;
        let out: Vec<String> = src
            .lines()
            .map(|l| {
                if l.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
                    found = true;
                    format!("{key} = {value:?}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert!(found, "{key} not in private.toml");
        std::fs::write(self.private(), out.join("\n") + "\n").unwrap();
    }

    /// Start `conode server` (with --allow-root: tests run as root in CI).
    pub fn start(&self) -> Node {
        self.start_with(&[])
    }

    pub fn start_with(&self, extra_env: &[(&str, &str)]) -> Node {
        self.start_with_args(&[], extra_env)
    }

    /// `conode server --allow-root EXTRA_ARGS` with `extra_env` set.
    pub fn start_with_args(&self, extra_args: &[&str], extra_env: &[(&str, &str)]) -> Node {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = self.dir.path().join(format!(
            "conode-start{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(conode_bin());
        cmd.arg("-d")
            .arg("2")
            .arg("-c")
            .arg(self.private())
            .args(["server", "--allow-root"])
            .args(extra_args)
            .env("CONODE_SERVICE_PATH", self.data())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn conode server");
        let mut node = Node {
            child: Some(child),
            log,
            ws_port: self.ws_port(),
        };
        node.wait_ready();
        node
    }
}

/// A running conode process, stopped on drop.
pub struct Node {
    child: Option<Child>,
    pub log: PathBuf,
    pub ws_port: u16,
}

impl Node {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("conode exited early ({st}): {}", self.log_text());
                }
            }
            // With TLS on the port, /ok needs TLS: the TCP accept is enough to know it runs.
            if TcpStream::connect(("127.0.0.1", self.ws_port)).is_ok()
                && self.log_text().contains("serving peers")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("conode did not start within 15s: {}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (at most 40 s).
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // The pid of a child we spawned and have not reaped yet.
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("conode did not stop within 40s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Plain HTTP GET on loopback; returns the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A test CA and a server certificate for `localhost`/127.0.0.1 signed by it, as PEM.
pub struct TestPki {
    pub ca_pem: String,
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "conode test CA");
        let ca_cert = params.self_signed(&ca_key).expect("CA cert");
        TestPki {
            ca_pem: ca_cert.pem(),
            ca_key,
            ca_params: params,
        }
    }

    /// (fullchain PEM, key PEM) for localhost and 127.0.0.1, with `cn` as common name.
    pub fn leaf(&self, cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        (
            format!("{}{}", cert.pem(), self.ca_pem),
            key.serialize_pem(),
        )
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------
// The JavaScript client (tests/js: @dedis/cothority 3.6.7 run by Node.js), rosters, JSON.

/// `tests/js`, with its `node_modules` installed; panics telling how to install it.
pub fn js_dir() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let js = manifest.join("js");
    let client = js.join("node_modules/@dedis/cothority/package.json");
    assert!(
        client.exists(),
        "{} is missing: the JavaScript client is not installed; run scripts/install-deps \
         (as root: it runs `npm ci` in {})",
        client.display(),
        js.display()
    );
    js
}

/// What one run of `node tests/js/status.js` gave.
#[derive(Debug)]
pub struct JsRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl JsRun {
    /// The JSON printed on success; panics with the client's error otherwise.
    pub fn json(&self) -> Json {
        assert!(
            self.success,
            "the JS client failed: {}{}",
            self.stderr, self.stdout
        );
        Json::parse(&self.stdout)
            .unwrap_or_else(|e| panic!("status.js printed no JSON ({e}): {}", self.stdout))
    }
}

/// Run `node tests/js/status.js ROSTER index` (the real `@dedis/cothority` client) with
/// extra environment variables; killed if it runs longer than 30 s.
pub fn js_status(roster: &Path, index: usize, env: &[(&str, &str)]) -> JsRun {
    let js = js_dir();
    let mut cmd = Command::new("node");
    cmd.arg(js.join("status.js"))
        .arg(roster)
        .arg(index.to_string())
        .current_dir(&js)
        .env("STATUS_TIMEOUT_MS", "10000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): run scripts/install-deps"));
    let r = wait_bounded(child, b"", Duration::from_secs(30), "node status.js");
    JsRun {
        success: r.code == Some(0),
        stdout: r.stdout,
        stderr: r.stderr,
    }
}

/// Feed `stdin` to `child`, collect its output, and wait for it; killed (and the test
/// failed, naming `what`) if it runs longer than `timeout`.
pub fn wait_bounded(
    mut child: std::process::Child,
    stdin: &[u8],
    timeout: Duration,
    what: &str,
) -> Run {
    let t_in = child.stdin.take().map(|mut input| {
        let data = stdin.to_vec();
        // The command may exit without reading everything (data over the limit): a
        // broken pipe here is expected.
        std::thread::spawn(move || {
            let _ = input.write_all(&data);
        })
    });
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for child") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(t) = t_in {
        let _ = t.join();
    }
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into(),
    }
}

/// The text of a `public.toml` (one `[[servers]]`) with `URL = "url"` added to the server.
pub fn roster_with_url(public_toml: &Path, url: &str) -> String {
    let src = std::fs::read_to_string(public_toml).expect("read public.toml");
    assert!(
        !src.lines()
            .any(|l| l.trim_start().to_ascii_lowercase().starts_with("url")),
        "public.toml already has a URL: {src}"
    );
    let mut out = String::new();
    for l in src.lines() {
        out.push_str(l);
        out.push('\n');
        if l.trim() == "[[servers]]" {
            out.push_str(&format!("  URL = {url:?}\n"));
        }
    }
    out
}

/// The `Public` of the first server of a `public.toml`.
pub fn public_key_hex(public_toml: &Path) -> String {
    let src = std::fs::read_to_string(public_toml).expect("read public.toml");
    src.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "Public")
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .expect("Public in public.toml")
}

/// What status.js prints, parsed, with path helpers for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct Json(pub serde_json::Value);

impl Json {
    pub fn parse(text: &str) -> Result<Json, String> {
        serde_json::from_str(text)
            .map(Json)
            .map_err(|e| e.to_string())
    }

    /// The value at `path` of object keys, if any.
    pub fn at(&self, path: &[&str]) -> Option<&serde_json::Value> {
        path.iter().try_fold(&self.0, |v, k| v.get(k))
    }

    /// The string at `path`; panics naming the path and showing the document if absent.
    pub fn str_at(&self, path: &[&str]) -> &str {
        self.at(path)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("no string at {path:?} in {}", self.0))
    }
}

// ---------------------------------------------------------------------------------------
// Several conodes on one machine (one loopback address 127.0.0.x each), kill -9, and
// bounded runs of the `conode` command line.

/// A port `p` such that `p` and `p+1` were both free on `host` a moment ago.
pub fn free_port_pair_on(host: &str) -> u16 {
    for _ in 0..200 {
        let a = TcpListener::bind((host, 0))
            .unwrap_or_else(|e| panic!("cannot bind {host}: {e} (is it a loopback address?)"));
        let p = a.local_addr().unwrap().port();
        if p < 65000 && TcpListener::bind((host, p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free pair of adjacent ports found on {host}");
}

impl NodeFiles {
    /// `conode setup --non-interactive` on loopback address `host` (127.0.0.x), with
    /// `ListenAddress = host` so that both ports bind that address only and several
    /// conodes can run on one machine.
    pub fn setup_on(description: &str, host: &str) -> NodeFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port_pair_on(host);
        let out = Command::new(conode_bin())
            .arg("-c")
            .arg(dir.path().join("co/private.toml"))
            .args(["setup", "--non-interactive", "--host", host, "--port"])
            .arg(port.to_string())
            .args(["--description", description])
            .output()
            .expect("run conode setup");
        assert!(
            out.status.success(),
            "setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n = NodeFiles { dir, port };
        n.set_private_key("ListenAddress", host);
        n
    }

    /// The host of this node's `Address` (what clients dial).
    pub fn host(&self) -> String {
        conode::config::PrivateConfig::load(&self.private())
            .unwrap_or_else(|e| panic!("{e}"))
            .address
            .host
    }

    /// Start `conode server` and wait until it accepts clients at its own `Address` host
    /// (not only 127.0.0.1, as [`NodeFiles::start`] does). Each start logs to a new file.
    pub fn start_on_host(&self) -> Node {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let host = self.host();
        let log = self.dir.path().join(format!(
            "conode-{host}-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(conode_bin())
            .arg("-d")
            .arg("2")
            .arg("-c")
            .arg(self.private())
            .args(["server", "--allow-root"])
            .env("CONODE_SERVICE_PATH", self.data())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn conode server");
        let mut node = Node {
            child: Some(child),
            log,
            ws_port: self.ws_port(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(Ok(Some(st))) = node.child.as_mut().map(|c| c.try_wait()) {
                panic!("conode exited early ({st}): {}", node.log_text());
            }
            if TcpStream::connect((host.as_str(), node.ws_port)).is_ok()
                && node.log_text().contains("serving peers")
            {
                return node;
            }
            assert!(
                Instant::now() < deadline,
                "conode on {host} did not start within 15s: {}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Node {
    /// `kill -9` this conode (by the pid of the child we spawned) and reap it: no
    /// graceful stop, as a power cut or the OOM killer would do.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // The pid of a child we spawned and have not reaped yet.
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
        c.wait().expect("wait for the killed conode")
    }
}

/// What one bounded run of a command gave.
#[derive(Debug)]
pub struct Run {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `conode ARGS` with `stdin` on its standard input; killed (and the test failed) if
/// it runs longer than `timeout`.
pub fn run_conode(args: &[&std::ffi::OsStr], stdin: &[u8], timeout: Duration) -> Run {
    run_conode_env(args, &[], stdin, timeout)
}

/// [`run_conode`] with more environment variables (e.g. `CONODE_SERVICE_PATH`).
pub fn run_conode_env(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
    stdin: &[u8],
    timeout: Duration,
) -> Run {
    let child = Command::new(conode_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conode");
    wait_bounded(child, stdin, timeout, &format!("conode {args:?}"))
}

/// The machine-wide lock of the tests that build the Debian package or install it
/// (tests/deb_package.rs, tests/systemd_nspawn.rs): both run `scripts/package`, one
/// installs on this machine, and the other boots containers from this machine's tree,
/// which must not change under them.
pub const PACKAGE_LOCK: &str = "/run/lock/system-tests-package.lock";

/// The flock on [`PACKAGE_LOCK`], waited for at most `within` (then the test fails).
pub fn package_lock(within: Duration) -> nix::fcntl::Flock<std::fs::File> {
    let deadline = Instant::now() + within;
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PACKAGE_LOCK)
            .unwrap_or_else(|e| panic!("cannot open {PACKAGE_LOCK}: {e}"));
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err((_, e)) => panic!(
                "cannot take {PACKAGE_LOCK} within {within:?} (another package test holds it): {e}"
            ),
        }
    }
}

/// The package file built by `scripts/package` from this build's binaries
/// (`target/<profile>/`, not rebuilt), and how long the build took. The caller holds
/// [`package_lock`].
pub fn build_package() -> (PathBuf, Duration) {
    // target/<profile>/conode; scripts/package takes cargo's profile name.
    let conode = bin("conode");
    bin("failoverd");
    let dir = conode
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .expect("target/<profile>/conode")
        .to_string();
    let profile = if dir == "debug" {
        "dev".to_string()
    } else {
        dir
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("scripts/package");
    let t = Instant::now();
    let child = Command::new(&script)
        .args(["--profile", &profile, "--no-build", "--", "--fast"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let out = wait_bounded(child, b"", Duration::from_secs(300), "scripts/package");
    let took = t.elapsed();
    let said = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(0), "scripts/package failed:\n{said}");
    let deb = out
        .stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("package: ").map(PathBuf::from))
        .unwrap_or_else(|| panic!("scripts/package named no package:\n{said}"));
    (deb, took)
}

/// The roster of `files` (each one's public.toml, in order: the first leads), written
/// beside the first one's files: its path, and its servers as the library reads them.
pub fn write_roster(files: &[NodeFiles]) -> (PathBuf, Vec<conode::config::ServerToml>) {
    let roster = files[0].dir.path().join("roster.toml");
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f.public()).unwrap())
        .collect();
    std::fs::write(&roster, text).unwrap();
    let servers = conode::config::Roster::load(&roster).unwrap().servers;
    (roster, servers)
}

/// Poll `f` every 100 ms until it holds; fail the test, naming `what`, after `within`.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
