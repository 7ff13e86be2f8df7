//! Built-in TLS on the client WebSocket port (`WebSocketTLSCertificate[Key]` in
//! private.toml): the JavaScript client over wss://, certificate renewal without restart
//! (files rewritten in place, certbot's symlink swap), and broken pairs that must not
//! replace the certificate being served.
//!
//! Which certificate a new connection gets is read with a rustls client that trusts only
//! the test CA and returns the leaf the server sent.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use system_tests::*;

/// A renewed certificate must be served to new connections within this time.
const RENEWAL_WITHIN: Duration = Duration::from_secs(5);
const WARNING: &str = "keeping the current certificate";
const RELOADED: &str = "now served";

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(cfg)
}

/// The DER of the first certificate of a PEM chain.
fn leaf_der(fullchain_pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(fullchain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A new TLS connection to 127.0.0.1:port, verified against the test CA.
fn tls_connect(port: u16, ca_pem: &str) -> Result<TlsStream, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn =
        rustls::ClientConnection::new(client_config(ca_pem), name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(s)
}

/// The leaf certificate (DER) a new connection gets.
fn served_leaf(port: u16, ca_pem: &str) -> Result<Vec<u8>, String> {
    let s = tls_connect(port, ca_pem)?;
    let certs = s.conn.peer_certificates().ok_or("no peer certificate")?;
    Ok(certs[0].to_vec())
}

/// Poll new connections until they get `want`; returns how long it took.
fn wait_served(node: &Node, ca_pem: &str, want: &[u8], within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        if served_leaf(node.ws_port, ca_pem).is_ok_and(|d| d == want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{what}: the new certificate was not served within {within:?}; log:\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the log holds more than `before` occurrences of `needle`.
fn wait_log_count(node: &Node, needle: &str, before: usize, within: Duration, what: &str) {
    let t0 = Instant::now();
    while node.log_text().matches(needle).count() <= before {
        assert!(
            t0.elapsed() < within,
            "{what}: no new {needle:?} in the log within {within:?}; log:\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replace `path` atomically (temporary file + rename), as careful tools do.
fn write_atomic(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Point the symlink `link` at `target` atomically: new symlink renamed over the old one.
fn swap_symlink(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// A conode whose WebSocket port serves TLS from `cert`/`key` (written by the caller),
/// and a roster file that reaches it at `https://127.0.0.1:<ws port>`.
struct TlsNode {
    files: NodeFiles,
    node: Node,
    roster: PathBuf,
}

fn start_tls_node(files: NodeFiles, cert: &Path, key: &Path) -> TlsNode {
    files.set_private_key("WebSocketTLSCertificate", cert.to_str().unwrap());
    files.set_private_key(
        "WebSocketTLSCertificateKey",
        &format!("file://{}", key.display()),
    );
    let node = files.start();
    let roster = files.dir.path().join("roster-https.toml");
    let url = format!("https://127.0.0.1:{}", files.ws_port());
    std::fs::write(&roster, roster_with_url(&files.public(), &url)).unwrap();
    TlsNode {
        files,
        node,
        roster,
    }
}

impl TlsNode {
    /// The JS client over wss://, trusting the test CA; returns its JSON.
    fn js_ok(&self, ca_file: &Path) -> Json {
        let run = js_status(
            &self.roster,
            0,
            &[("NODE_EXTRA_CA_CERTS", ca_file.to_str().unwrap())],
        );
        assert!(
            run.success,
            "JS client over wss:// failed: {}\nconode log:\n{}",
            run.stderr,
            self.node.log_text()
        );
        run.json()
    }
}

/// A WebSocket on an established TLS connection, spoken by hand (RFC 6455, client side).
struct WsConn {
    s: TlsStream,
}

impl WsConn {
    fn open(port: u16, ca_pem: &str, path: &str) -> WsConn {
        let mut s = tls_connect(port, ca_pem).expect("TLS connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        s.flush().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("read the upgrade response");
            head.push(b[0]);
            assert!(head.len() < 4096, "response head too long");
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        WsConn { s }
    }

    /// Send one binary message, return the binary reply.
    fn request(&mut self, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 126);
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x82, 0x80 | body.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(body.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&frame).unwrap();
        self.s.flush().unwrap();
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h).expect("reply frame header");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.s.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                self.s.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        assert_eq!(
            h[0],
            0x82,
            "expected one final binary frame, got opcode {:#x}: {}",
            h[0],
            String::from_utf8_lossy(&payload)
        );
        payload
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn js_client_over_builtin_tls() {
    let files = NodeFiles::setup("TLS conode");
    let pki = TestPki::new();
    let tls = files.dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (chain, key) = pki.leaf("first");
    let (cert_p, key_p, ca_p) = (
        tls.join("fullchain.pem"),
        tls.join("privkey.pem"),
        tls.join("ca.pem"),
    );
    std::fs::write(&cert_p, &chain).unwrap();
    std::fs::write(&key_p, &key).unwrap();
    std::fs::write(&ca_p, &pki.ca_pem).unwrap();
    let t = start_tls_node(files, &cert_p, &key_p);

    assert_eq!(
        served_leaf(t.node.ws_port, &pki.ca_pem).unwrap(),
        leaf_der(&chain)
    );
    let j = t.js_ok(&ca_p);
    let ws = t.files.ws_port();
    assert_eq!(j.str_at(&["websocket"]), format!("wss://127.0.0.1:{ws}"));
    assert_eq!(
        j.str_at(&["serverIdentity", "public"]),
        public_key_hex(&t.files.public())
    );
    assert_eq!(
        j.str_at(&["status", "Generic", "Description"]),
        "TLS conode"
    );
    // TLS configured, no URL: the node advertises https://<Address host>:<port+1>.
    assert_eq!(
        j.str_at(&["serverIdentity", "url"]),
        format!("https://127.0.0.1:{ws}")
    );

    // Without the test CA the client refuses the certificate: TLS is really verified.
    let run = js_status(&t.roster, 0, &[]);
    assert!(!run.success, "trusted an unknown CA: {}", run.stdout);

    // The plain-WebSocket roster (public.toml, ws://) cannot talk to a TLS port.
    let run = js_status(&t.files.public(), 0, &[]);
    assert!(
        !run.success,
        "plain ws:// to a TLS port succeeded: {}",
        run.stdout
    );
}

#[test]
fn renewed_files_are_served_without_restart_and_open_connections_stay() {
    let files = NodeFiles::setup("renewal in place");
    let pki = TestPki::new();
    let tls = files.dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (chain1, key1) = pki.leaf("before renewal");
    let (cert_p, key_p, ca_p) = (
        tls.join("fullchain.pem"),
        tls.join("privkey.pem"),
        tls.join("ca.pem"),
    );
    std::fs::write(&cert_p, &chain1).unwrap();
    std::fs::write(&key_p, &key1).unwrap();
    std::fs::write(&ca_p, &pki.ca_pem).unwrap();
    let t = start_tls_node(files, &cert_p, &key_p);
    let pid = t.node.pid();
    assert_eq!(
        served_leaf(t.node.ws_port, &pki.ca_pem).unwrap(),
        leaf_der(&chain1)
    );

    // A client connected before the renewal, with one request answered.
    let public = unhex(&public_key_hex(&t.files.public()));
    let mut ws = WsConn::open(t.node.ws_port, &pki.ca_pem, "/Status/Request");
    assert!(
        contains(&ws.request(b""), &public),
        "status reply without our key"
    );

    // Renewal by rewriting both files in place (like `cp new.pem fullchain.pem`): the
    // poller may see the pair half-way, which it must reject and then retry.
    let (chain2, key2) = pki.leaf("after renewal");
    let reloads = t.node.log_text().matches(RELOADED).count();
    std::fs::write(&key_p, &key2).unwrap();
    std::fs::write(&cert_p, &chain2).unwrap();
    let took = wait_served(
        &t.node,
        &pki.ca_pem,
        &leaf_der(&chain2),
        RENEWAL_WITHIN,
        "in-place rewrite",
    );
    eprintln!("in-place rewrite served after {took:?}");
    wait_log_count(
        &t.node,
        RELOADED,
        reloads,
        Duration::from_secs(2),
        "in-place rewrite",
    );
    assert_eq!(t.node.pid(), pid);

    // The connection opened before the renewal still works.
    assert!(
        contains(&ws.request(b""), &public),
        "status reply without our key"
    );
    // And the JS client, on a new connection, gets the new certificate and its answer.
    let j = t.js_ok(&ca_p);
    assert_eq!(
        j.str_at(&["status", "Generic", "Description"]),
        "renewal in place"
    );

    // A second renewal, now replacing the files atomically (write + rename).
    let (chain3, key3) = pki.leaf("second renewal");
    write_atomic(&key_p, key3.as_bytes());
    write_atomic(&cert_p, chain3.as_bytes());
    let took = wait_served(
        &t.node,
        &pki.ca_pem,
        &leaf_der(&chain3),
        RENEWAL_WITHIN,
        "atomic replace",
    );
    eprintln!("atomic replace served after {took:?}");
    assert!(
        contains(&ws.request(b""), &public),
        "old connection dropped"
    );
}

#[test]
fn certbot_symlink_swap_is_served_without_restart() {
    let files = NodeFiles::setup("certbot layout");
    let pki = TestPki::new();
    // /etc/letsencrypt layout: live/NAME/*.pem -> ../../archive/NAME/*N.pem
    let le = files.dir.path().join("letsencrypt");
    let live = le.join("live/conode.example");
    let archive = le.join("archive/conode.example");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    let ca_p = le.join("ca.pem");
    std::fs::write(&ca_p, &pki.ca_pem).unwrap();
    let (chain1, key1) = pki.leaf("certbot 1");
    std::fs::write(archive.join("fullchain1.pem"), &chain1).unwrap();
    std::fs::write(archive.join("privkey1.pem"), &key1).unwrap();
    let rel = Path::new("../../archive/conode.example");
    std::os::unix::fs::symlink(rel.join("fullchain1.pem"), live.join("fullchain.pem")).unwrap();
    std::os::unix::fs::symlink(rel.join("privkey1.pem"), live.join("privkey.pem")).unwrap();
    let t = start_tls_node(
        files,
        &live.join("fullchain.pem"),
        &live.join("privkey.pem"),
    );
    assert_eq!(
        served_leaf(t.node.ws_port, &pki.ca_pem).unwrap(),
        leaf_der(&chain1)
    );

    // `certbot renew`: new files in archive/, then each live/ symlink swapped (new link
    // renamed over the old one), certificate first: for a moment the pair mismatches.
    let (chain2, key2) = pki.leaf("certbot 2");
    std::fs::write(archive.join("fullchain2.pem"), &chain2).unwrap();
    std::fs::write(archive.join("privkey2.pem"), &key2).unwrap();
    swap_symlink(&live.join("fullchain.pem"), &rel.join("fullchain2.pem"));
    std::thread::sleep(Duration::from_millis(300));
    swap_symlink(&live.join("privkey.pem"), &rel.join("privkey2.pem"));
    let took = wait_served(
        &t.node,
        &pki.ca_pem,
        &leaf_der(&chain2),
        RENEWAL_WITHIN,
        "symlink swap",
    );
    eprintln!("symlink swap served after {took:?}");
    let log = t.node.log_text();
    assert!(
        log.contains(RELOADED) && log.contains("live/conode.example/fullchain.pem"),
        "no reload line naming the live path:\n{log}"
    );
    let j = t.js_ok(&ca_p);
    assert_eq!(
        j.str_at(&["status", "Generic", "Description"]),
        "certbot layout"
    );
}

#[test]
fn broken_pairs_are_rejected_and_the_old_certificate_keeps_serving() {
    let files = NodeFiles::setup("broken renewals");
    let pki = TestPki::new();
    let tls = files.dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (chain_a, key_a) = pki.leaf("the good one");
    let (cert_p, key_p, ca_p) = (
        tls.join("fullchain.pem"),
        tls.join("privkey.pem"),
        tls.join("ca.pem"),
    );
    std::fs::write(&cert_p, &chain_a).unwrap();
    std::fs::write(&key_p, &key_a).unwrap();
    std::fs::write(&ca_p, &pki.ca_pem).unwrap();
    let t = start_tls_node(files, &cert_p, &key_p);
    let old = leaf_der(&chain_a);
    assert_eq!(served_leaf(t.node.ws_port, &pki.ca_pem).unwrap(), old);
    let public = unhex(&public_key_hex(&t.files.public()));
    let mut ws = WsConn::open(t.node.ws_port, &pki.ca_pem, "/Status/Request");
    assert!(contains(&ws.request(b""), &public));

    let (chain_b, key_b) = pki.leaf("the next one");
    // The leaf alone, cut in its middle: what a reader sees while a renewal is written.
    let leaf_b_pem_len = chain_b.find("-----END CERTIFICATE-----").unwrap();
    let half = &chain_b[..leaf_b_pem_len / 2];
    let dangling = tls.join("archive/does-not-exist.pem");

    let steps = [
        "half-written certificate",
        "mismatched pair (new certificate, old key)",
        "unreadable certificate (dangling symlink)",
    ];
    for (i, what) in steps.into_iter().enumerate() {
        let warnings = t.node.log_text().matches(WARNING).count();
        match i {
            0 => write_atomic(&cert_p, half.as_bytes()),
            1 => write_atomic(&cert_p, chain_b.as_bytes()),
            _ => swap_symlink(&cert_p, &dangling),
        }
        wait_log_count(&t.node, WARNING, warnings, RENEWAL_WITHIN, what);
        let log = t.node.log_text();
        let line = log.lines().rfind(|l| l.contains(WARNING)).unwrap();
        eprintln!("{what}: {line}");
        assert!(
            line.contains("fullchain.pem"),
            "{what}: the warning names no file: {line}"
        );
        // New connections still get the old certificate, a second later too.
        assert_eq!(
            served_leaf(t.node.ws_port, &pki.ca_pem).unwrap(),
            old,
            "{what}"
        );
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(
            served_leaf(t.node.ws_port, &pki.ca_pem).unwrap(),
            old,
            "{what}"
        );
        assert!(
            !t.node.log_text().contains("panicked"),
            "{what}: {}",
            t.node.log_text()
        );
        let j = t.js_ok(&ca_p);
        assert_eq!(
            j.str_at(&["status", "Generic", "Description"]),
            "broken renewals",
            "{what}"
        );
        assert!(
            contains(&ws.request(b""), &public),
            "{what}: open connection dropped"
        );
    }

    // Once a complete, matching pair is in place, it is taken.
    write_atomic(&key_p, key_b.as_bytes());
    write_atomic(&cert_p, chain_b.as_bytes());
    wait_served(
        &t.node,
        &pki.ca_pem,
        &leaf_der(&chain_b),
        RENEWAL_WITHIN,
        "repaired pair",
    );
    t.js_ok(&ca_p);
    assert!(contains(&ws.request(b""), &public));
}
