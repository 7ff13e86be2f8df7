//! The conode's Prometheus metrics, from real `conode` processes scraped over real HTTP:
//! the text parses with the Python `prometheus_client` OpenMetrics parser (and its classic
//! text parser), counters move by what was done (requests by service and method, blocks
//! appended, chain heights), the endpoint survives garbage and silent clients, a bad
//! address stops the start, and the Grafana dashboard names only metrics that exist.
//!
//! Needs `/usr/bin/python3` with `prometheus_client` (Debian: python3-prometheus-client);
//! without it the tests fail, they do not skip.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use conode::config::{Roster, ServerToml};
use conode::skipchain::{block, client};
use system_tests::prometheus::{parse, Sample};
use system_tests::*;

/// Longest one client request may take.
const CALL: Duration = Duration::from_secs(30);

/// One scrape, parsed by the real parser.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`, if any.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// As [`Scrape::get`], 0 when absent (a counter whose labels were never used).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Documented names of the families: a counter's with `_total`.
    fn documented_names(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .map(|s| match s.kind.as_str() {
                "counter" => format!("{}_total", s.family),
                _ => s.family.clone(),
            })
            .collect()
    }
}

/// Send `request` to 127.0.0.1:`port` and return the whole response (read until close).
fn http(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it read everything (a head too large).
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /metrics`, checked (status, content type) and parsed.
fn scrape(port: u16) -> Scrape {
    let resp = http(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: application/openmetrics-text\r\n\r\n",
    );
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response from the metrics port: {resp:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains(&format!("Content-Type: {}", conode::metrics::CONTENT_TYPE)),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    assert_eq!(length, body.len(), "Content-Length");
    Scrape {
        text: body.to_string(),
        samples: parse(body),
    }
}

/// Scrape until `ok` holds (the database gauges are read every 2 s), at most 15 s.
fn scrape_until(port: u16, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(port);
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not so after 15 s:\n{}",
            s.text
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A WebSocket upgrade of `/Status/Request` on the client port, left open.
fn open_websocket(ws_port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", ws_port)).expect("connect to the client port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /Status/Request HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).expect("the upgrade answer");
        assert!(
            n == 1,
            "closed during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn block_on<T>(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = T>) -> T {
    rt.block_on(async { tokio::time::timeout(CALL, f).await })
        .expect("request did not finish in time")
}

/// The repository's root (this crate is `tests/`).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The conode metric names documented in `docs/metrics-conode.md` (its reference table).
fn documented_conode_names() -> BTreeSet<String> {
    let path = repo().join("docs/metrics-conode.md");
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let names: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `conode_"))
        .filter_map(|l| l.split_once('`'))
        .map(|(n, _)| format!("conode_{n}"))
        .collect();
    assert!(names.len() > 10, "no reference table in {}", path.display());
    names
}

/// `n` conodes on 127.0.0.1 and the library roster of all of them (member 0 leads).
fn cluster(n: usize) -> (Vec<NodeFiles>, Vec<ServerToml>, PathBuf) {
    let files: Vec<NodeFiles> = (0..n)
        .map(|i| NodeFiles::setup(&format!("member {i}")))
        .collect();
    let (roster, servers) = write_roster(&files);
    (files, servers, roster)
}

#[test]
fn metrics_count_requests_blocks_heights_and_connections_and_parse_as_openmetrics() {
    const APPENDS: usize = 3;
    const STATUS: usize = 2;
    let (files, servers, _roster) = cluster(3);
    let leader_port = free_port();
    let follower_port = free_port();
    // The leader's flag wins over a bad CONODE_METRICS; a follower takes the variable.
    let leader_addr = format!("127.0.0.1:{leader_port}");
    let follower_addr = format!("127.0.0.1:{follower_port}");
    let mut nodes = vec![
        files[0].start_with_args(
            &["--metrics", &leader_addr],
            &[("CONODE_METRICS", "not an address")],
        ),
        files[1].start_with(&[("CONODE_METRICS", &follower_addr)]),
        files[2].start(),
    ];
    let rt = runtime();

    let before = scrape(leader_port);
    // Every request series exists at 0 before the first request.
    assert_eq!(
        before.get(
            "conode_requests_total",
            &[("service", "Skipchain"), ("method", "GetUpdateChain")]
        ),
        Some(0.0),
        "{}",
        before.text
    );
    assert_eq!(before.must("conode_db_writable", &[]), 1.0);
    assert!(before.must("conode_db_bytes", &[]) > 0.0);
    assert!(before.must("conode_db_free_bytes", &[]) > 0.0);
    assert!(before.must("conode_start_time_seconds", &[]) > 1.7e9);
    assert_eq!(before.must("conode_chains", &[]), 0.0);

    // A chain of 1 + APPENDS blocks, and STATUS Status requests.
    let roster = block::roster_from_config(&Roster {
        servers: servers.clone(),
    });
    let g =
        block_on(&rt, client::create(roster, b"genesis".to_vec(), 0, 0)).expect("chain created");
    for i in 0..APPENDS {
        block_on(
            &rt,
            client::append(&servers[0], &g.hash, vec![i as u8; 100]),
        )
        .unwrap_or_else(|e| panic!("append {i}: {e}"));
    }
    for _ in 0..STATUS {
        block_on(
            &rt,
            conode::client::status(&servers[0], Duration::from_secs(10)),
        )
        .expect("status");
    }
    // A method and a service the conode does not have: counted as "unknown", with errors.
    let bad_method = block_on(
        &rt,
        conode::client::call(&servers[0], "Skipchain", "NoSuchMethod", Vec::new()),
    );
    assert!(bad_method.is_err(), "{bad_method:?}");
    let bad_service = block_on(
        &rt,
        conode::client::call(&servers[0], "NoSuchService", "Evil", Vec::new()),
    );
    assert!(bad_service.is_err(), "{bad_service:?}");

    let chain = hex::encode(&g.hash);
    let height = (1 + APPENDS) as f64;
    let after = scrape_until(leader_port, "the leader's chain height", |s| {
        s.get("conode_chain_height", &[("chain", &chain)]) == Some(height)
    });
    assert_eq!(
        after.documented_names(),
        documented_conode_names(),
        "the names exported and those in docs/metrics-conode.md differ"
    );
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.count(name, labels) - before.count(name, labels)
    };
    let store = [("service", "Skipchain"), ("method", "StoreSkipBlock")];
    assert_eq!(delta("conode_requests_total", &store), (1 + APPENDS) as f64);
    assert_eq!(delta("conode_request_errors_total", &store), 0.0);
    let status = [("service", "Status"), ("method", "Request")];
    assert_eq!(delta("conode_requests_total", &status), STATUS as f64);
    let unknown_method = [("service", "Skipchain"), ("method", "unknown")];
    assert_eq!(delta("conode_requests_total", &unknown_method), 1.0);
    assert_eq!(delta("conode_request_errors_total", &unknown_method), 1.0);
    let unknown = [("service", "unknown"), ("method", "unknown")];
    assert_eq!(delta("conode_requests_total", &unknown), 1.0);
    assert_eq!(delta("conode_request_errors_total", &unknown), 1.0);
    assert!(
        !after.text.contains("NoSuch") && !after.text.contains("Evil"),
        "a client's names became label values:\n{}",
        after.text
    );
    assert_eq!(delta("conode_blocks_appended_total", &[]), APPENDS as f64);
    assert_eq!(delta("conode_chains_created_total", &[]), 1.0);
    assert_eq!(
        delta("conode_append_seconds_count", &[]),
        APPENDS as f64,
        "one latency per append"
    );
    assert!(after.must("conode_append_seconds_sum", &[]) > 0.0);
    assert_eq!(
        after.must("conode_append_seconds_bucket", &[("le", "+Inf")]),
        after.must("conode_append_seconds_count", &[])
    );
    assert_eq!(after.must("conode_chains", &[]), 1.0);
    assert_eq!(after.must("conode_chains_led", &[]), 1.0);
    assert_eq!(after.must("conode_blocks", &[]), height);
    assert_eq!(after.must("conode_chain_height_max", &[]), height);
    assert_eq!(after.must("conode_db_writable", &[]), 1.0);
    assert!(
        after.must("conode_figures_time_seconds", &[])
            >= before.must("conode_figures_time_seconds", &[])
    );

    // The follower (metrics from CONODE_METRICS) holds the chain but leads none: no
    // per-chain series; the leader dialed its conode-to-conode port.
    let follower = scrape_until(follower_port, "the follower's chain height", |s| {
        s.get("conode_chain_height_max", &[]) == Some(height)
    });
    assert_eq!(follower.must("conode_chains", &[]), 1.0);
    assert_eq!(follower.must("conode_chains_led", &[]), 0.0);
    assert_eq!(
        follower.get("conode_chain_height", &[("chain", &chain)]),
        None
    );
    assert_eq!(follower.count("conode_blocks_appended_total", &[]), 0.0);
    assert!(
        follower.must("conode_open_connections", &[("port", "peer")]) >= 1.0,
        "the leader's connections to the follower:\n{}",
        follower.text
    );

    // A client connected shows in the client port's gauge, and leaves it when gone.
    let ws = open_websocket(files[0].ws_port());
    let open = scrape_until(leader_port, "an open client connection", |s| {
        s.get("conode_open_connections", &[("port", "client")]) >= Some(1.0)
    });
    let with_client = open.must("conode_open_connections", &[("port", "client")]);
    drop(ws);
    scrape_until(leader_port, "the client connection closed", |s| {
        s.get("conode_open_connections", &[("port", "client")]) < Some(with_client)
    });

    for n in &mut nodes {
        assert!(n.stop().success(), "conode stopped cleanly");
    }
}

#[test]
fn the_metrics_port_answers_garbage_and_slow_clients_and_the_conode_keeps_serving() {
    let files = NodeFiles::setup("garbage");
    let port = free_port();
    let mut node = files.start_with(&[("CONODE_METRICS", &format!("127.0.0.1:{port}"))]);
    let status_of = |resp: &str| resp.lines().next().unwrap_or("").to_string();

    let r = http(
        port,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    );
    assert!(
        r.is_empty() || status_of(&r).starts_with("HTTP/1.1 400"),
        "garbage: {r:?}"
    );
    let r = http(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status_of(&r).starts_with("HTTP/1.1 405"), "{r:?}");
    let r = http(port, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status_of(&r).starts_with("HTTP/1.1 404"), "{r:?}");
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while huge.len() < 64 * 1024 {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let r = http(port, &huge);
    assert!(
        r.is_empty() || status_of(&r).starts_with("HTTP/1.1 431"),
        "a 64 KiB head: {:?}",
        status_of(&r)
    );

    // A silent client gets 408 within the request timeout (5 s), not never.
    let t = Instant::now();
    let r = http(port, b"");
    assert!(status_of(&r).starts_with("HTTP/1.1 408"), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());

    // Scrapes at once are bounded: with every slot held by a silent client, one more
    // connection is closed at once; once they leave, scrapes are served again.
    let silent: Vec<TcpStream> = (0..conode::metrics::MAX_SCRAPES)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = http(port, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        r.is_empty(),
        "a scrape past the limit was served: {:?}",
        status_of(&r)
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(silent);
    // The server sees the silent clients' close by itself, a moment later: until then a
    // scrape may still find every slot taken (and be closed at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(port, b"GET /metrics HTTP/1.1\r\n\r\n").is_empty() {
        assert!(
            Instant::now() < deadline,
            "scrapes not served again within 10 s of the silent clients leaving"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = scrape(port);
    assert_eq!(s.must("conode_db_writable", &[]), 1.0);

    // The conode itself kept serving.
    let rt = runtime();
    let server = Roster::load(&files.public())
        .expect("the node's public.toml")
        .servers
        .remove(0);
    let st = block_on(
        &rt,
        conode::client::status(&server, Duration::from_secs(10)),
    );
    assert!(st.is_ok(), "Status after the garbage: {st:?}");
    assert!(node.stop().success(), "conode stopped cleanly");
}

#[test]
fn a_bad_metrics_address_stops_the_start_with_a_clear_error() {
    let files = NodeFiles::setup("bad address");
    let private = files.private();
    let data = files.data();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut all: Vec<&std::ffi::OsStr> = vec!["-c".as_ref(), private.as_os_str()];
        all.extend(
            ["server", "--allow-root"]
                .iter()
                .map(|a| -> &std::ffi::OsStr { a.as_ref() }),
        );
        all.extend(args.iter().map(|a| -> &std::ffi::OsStr { a.as_ref() }));
        let mut envs: Vec<(&str, &std::ffi::OsStr)> =
            vec![("CONODE_SERVICE_PATH", data.as_os_str())];
        envs.extend(env.iter().map(|(k, v)| (*k, std::ffi::OsStr::new(*v))));
        run_conode_env(&all, &envs, b"", Duration::from_secs(20))
    };
    let r = run(&["--metrics", "localhost:9102"], &[]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("--metrics \"localhost:9102\" is not an IP:port address"),
        "{r:?}"
    );
    let r = run(&[], &[("CONODE_METRICS", "9102")]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("CONODE_METRICS \"9102\""), "{r:?}");
    // A port already taken: the start fails and says which port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let r = run(&["--metrics", &addr], &[]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("cannot bind the metrics port {addr}")),
        "{r:?}"
    );
}

/// Metric names in a PromQL expression (identifiers of ours).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        if word(b[i]) && (i == 0 || !word(b[i - 1])) {
            let start = i;
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            let w = &expr[start..i];
            if w.starts_with("conode_") || w.starts_with("failoverd_") {
                out.push(w.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// failoverd's metric names, as it registers them (with their type's suffixes).
fn failoverd_names() -> BTreeSet<String> {
    let path = repo().join("failoverd/src/metrics.rs");
    let src = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut names = BTreeSet::new();
    for part in src.split("registry.register(").skip(1) {
        if let Some(name) = part.split('"').nth(1) {
            names.insert(name.to_string());
        }
    }
    assert!(
        names.len() > 10,
        "no registrations found in {}",
        path.display()
    );
    names
}

#[test]
fn the_grafana_dashboard_is_json_and_names_only_metrics_that_exist() {
    let path = repo().join("scripts/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let conode = documented_conode_names();
    let failoverd = failoverd_names();
    // A series name is a documented name, or a registered one with its type's suffix.
    let known = |n: &str| {
        if conode.contains(n) {
            return true;
        }
        let bases = [n, n.trim_end_matches("_total")]
            .into_iter()
            .chain(
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| n.strip_suffix(s)),
            )
            .collect::<Vec<_>>();
        bases.iter().any(|b| failoverd.contains(*b))
            || ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| n.strip_suffix(s))
                .any(|b| conode.contains(b))
    };
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(
        exprs.len() > 20,
        "few expressions in the dashboard: {exprs:?}"
    );
    let mut used = BTreeSet::new();
    for e in &exprs {
        for n in metric_names(e) {
            assert!(
                known(&n),
                "the dashboard uses {n}, which is not exported: {e}"
            );
            used.insert(n);
        }
    }
    for must in [
        "conode_requests_total",
        "conode_append_seconds_bucket",
        "conode_chain_height",
        "conode_db_writable",
        "failoverd_role",
        "failoverd_epoch",
        "failoverd_vip_held",
        "failoverd_health",
        "failoverd_snapshot_age_seconds",
        "failoverd_health_check_seconds_bucket",
        "failoverd_failovers_total",
    ] {
        assert!(
            used.contains(must),
            "the dashboard has no panel with {must}"
        );
    }
    // Every panel has a unique id and a data source.
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
    }
}
