//! The deployment the cothority README recommends: nginx terminates TLS and proxies
//! WebSocket upgrades to the conode's plain WebSocket port; clients use the roster's
//! `URL = "https://host[:port][/path/]"`. A real nginx (the Debian package) runs as our
//! child process with its own configuration, and the real JavaScript client talks to it.
//! The part of that configuration an operator writes is `docs/nginx-conode.conf`, read
//! here and filled in, so the operator's guide shows exactly what this test runs.
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use system_tests::*;

const NGINX: &str = "/usr/sbin/nginx";

/// The nginx configuration the operator's guide gives (docs/nginx-conode.conf): a `map`
/// and a `server` block for nginx's `http` context, with placeholders.
const OPERATOR_CONF: &str = include_str!("../docs/nginx-conode.conf");

/// [`OPERATOR_CONF`] with its placeholders replaced; panics if one is left or unknown,
/// so that the file and this test cannot drift apart silently.
fn operator_conf(listen: &str, server_name: &str, cert: &Path, key: &Path, ws: &str) -> String {
    let cert = cert.display().to_string();
    let key = key.display().to_string();
    let values = [
        ("@LISTEN@", listen),
        ("@SERVER_NAME@", server_name),
        ("@CERTIFICATE_KEY@", key.as_str()),
        ("@CERTIFICATE@", cert.as_str()),
        ("@CONODE_WS@", ws),
    ];
    let mut conf = OPERATOR_CONF.to_string();
    for (placeholder, value) in values {
        assert!(
            conf.contains(placeholder),
            "docs/nginx-conode.conf no longer has the placeholder {placeholder}"
        );
        conf = conf.replace(placeholder, value);
    }
    // Any `@NAME@` left (NAME in capitals and underscores) is a placeholder.
    let left: Vec<&str> = conf
        .match_indices('@')
        .filter_map(|(i, _)| {
            let rest = &conf[i + 1..];
            let end = rest.find(|c: char| !(c.is_ascii_uppercase() || c == '_'))?;
            (end > 0 && rest[end..].starts_with('@')).then(|| &rest[..end])
        })
        .collect();
    assert!(
        left.is_empty(),
        "docs/nginx-conode.conf has placeholders this test does not fill: {left:?}"
    );
    conf
}

/// A running nginx, stopped (by its pid) when dropped, also when a test panics.
struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
}

impl Nginx {
    /// Start nginx with everything (config, logs, pid, temp paths) inside `dir`,
    /// listening with TLS on 127.0.0.1:`port` and proxying to the conode's ws port.
    fn start(dir: &Path, port: u16, conode_ws_port: u16, cert: &Path, key: &Path) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: run scripts/install-deps (as root: it installs the Debian nginx package)"
        );
        let d = dir.display();
        // The operator's part (map and server block) is docs/nginx-conode.conf, the file
        // the operator's guide shows; around it, what makes nginx run inside `dir`.
        let site = operator_conf(
            &format!("127.0.0.1:{port}"),
            "localhost",
            cert,
            key,
            &format!("127.0.0.1:{conode_ws_port}"),
        );
        let conf = format!(
            r#"# written by tests/nginx_proxy.rs around docs/nginx-conode.conf
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;

{site}
}}
"#
        );
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();

        // nginx with its prefix, error log and configuration all inside `dir`.
        let nginx = || {
            let mut c = Command::new(NGINX);
            c.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf_path);
            c
        };
        let out = nginx().arg("-t").output().expect("run nginx -t");
        assert!(
            out.status.success(),
            "nginx -t rejected the configuration: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let child = nginx()
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut n = Nginx {
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = n.child.as_mut().unwrap().try_wait() {
                n.child = None;
                panic!("nginx exited at start ({st}): {}", n.error_log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {port} within 10s: {}",
                n.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// SIGTERM to the master (it stops its workers), SIGKILL after 10 s.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // The pid of our own child, not yet reaped.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn js_client_through_nginx_tls_proxy() {
    let files = NodeFiles::setup("behind nginx");
    let node = files.start(); // plain ws on port+1, as behind any proxy
    let pki = TestPki::new();
    let dir = files.dir.path().join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let (chain, key) = pki.leaf("nginx front");
    let (cert_p, key_p, ca_p) = (
        dir.join("fullchain.pem"),
        dir.join("privkey.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_p, &chain).unwrap();
    std::fs::write(&key_p, &key).unwrap();
    std::fs::write(&ca_p, &pki.ca_pem).unwrap();
    let port = free_port();
    let mut nginx = Nginx::start(&dir, port, node.ws_port, &cert_p, &key_p);
    let ca_env = [("NODE_EXTRA_CA_CERTS", ca_p.to_str().unwrap())];
    let public = public_key_hex(&files.public());

    for (url, path) in [
        (format!("https://127.0.0.1:{port}"), "/Status/Request"),
        (
            format!("https://127.0.0.1:{port}/conode/"),
            "/conode/Status/Request",
        ),
    ] {
        let roster = files.dir.path().join("roster-nginx.toml");
        std::fs::write(&roster, roster_with_url(&files.public(), &url)).unwrap();
        let run = js_status(&roster, 0, &ca_env);
        assert!(
            run.success,
            "JS client through nginx ({url}) failed: {}\nnginx error.log:\n{}\nconode log:\n{}",
            run.stderr,
            nginx.error_log(),
            node.log_text()
        );
        let j = run.json();
        assert!(
            j.str_at(&["websocket"])
                .starts_with(&format!("wss://127.0.0.1:{port}")),
            "{j:?}"
        );
        assert_eq!(j.str_at(&["serverIdentity", "public"]), public);
        assert_eq!(
            j.str_at(&["status", "Generic", "Description"]),
            "behind nginx"
        );
        assert_eq!(
            j.str_at(&["status", "Generic", "Port"]),
            files.port.to_string()
        );
        // It went through nginx: the upgrade is in its access log, answered 101.
        let access = nginx.access_log();
        assert!(
            access.contains(&format!("\"GET {path} HTTP/1.1\" 101")),
            "no upgrade of {path} in nginx's access log:\n{access}"
        );
    }

    // Without the test CA the client refuses nginx's certificate.
    let roster = files.dir.path().join("roster-nginx.toml");
    let run = js_status(&roster, 0, &[]);
    assert!(!run.success, "trusted an unknown CA: {}", run.stdout);

    // nginx stops on SIGTERM to its pid, workers included: the port is closed after.
    let st = nginx.stop().expect("nginx was running");
    assert!(
        st.success(),
        "nginx exit status {st}: {}",
        nginx.error_log()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on nginx's port after it stopped"
    );
}
