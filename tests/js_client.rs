//! The public JavaScript client `@dedis/cothority` 3.6.7 (tests/js, run by Node.js) asks a
//! real conode for its status over the plain WebSocket port and decodes every field.
use system_tests::*;

#[test]
fn js_client_reads_the_status_of_a_plain_conode() {
    let files = NodeFiles::setup("JS client's conode");
    let _node = files.start();

    // public.toml exactly as setup wrote it: no URL, so the client dials ws://host:port+1.
    let run = js_status(&files.public(), 0, &[]);
    let j = run.json();
    assert_eq!(
        j.str_at(&["websocket"]),
        format!("ws://127.0.0.1:{}", files.ws_port())
    );

    // The identity: the client parsed the tagged point ("ed.point" + 32 bytes) and the
    // required fields; the key is the one setup wrote.
    let public = public_key_hex(&files.public());
    assert_eq!(public.len(), 64, "{public}");
    assert_eq!(j.str_at(&["serverIdentity", "public"]), public);
    assert_eq!(
        j.str_at(&["serverIdentity", "publicTagged"]),
        format!("{}{public}", hex_of(b"ed.point"))
    );
    assert_eq!(
        j.str_at(&["serverIdentity", "address"]),
        format!("tls://127.0.0.1:{}", files.port)
    );
    assert_eq!(
        j.str_at(&["serverIdentity", "description"]),
        "JS client's conode"
    );
    assert_eq!(j.str_at(&["serverIdentity", "url"]), "");
    assert_eq!(
        j.str_at(&["serverIdentity", "id"]).len(),
        32,
        "16-byte UUID"
    );

    // Generic.
    let generic = |k: &str| j.str_at(&["status", "Generic", k]).to_string();
    let services = generic("Available_Services");
    assert!(
        services.split(',').any(|s| s == "Status"),
        "Available_Services: {services}"
    );
    let mut sorted: Vec<&str> = services.split(',').collect();
    sorted.sort_unstable();
    assert_eq!(sorted.join(","), services, "sorted, comma-joined");
    for k in ["TX_bytes", "RX_bytes"] {
        let v = generic(k);
        v.parse::<u64>()
            .unwrap_or_else(|e| panic!("{k} = {v:?} is not a byte count: {e}"));
    }
    let uptime = generic("Uptime");
    assert!(
        uptime.ends_with('s') && uptime.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "Uptime is a Go duration: {uptime:?}"
    );
    assert!(!generic("System").is_empty());
    assert_eq!(generic("Host"), "127.0.0.1");
    assert_eq!(generic("Port"), files.port.to_string());
    assert_eq!(generic("Description"), "JS client's conode");
    assert_eq!(generic("ConnType"), "tls");

    // Db: figures of the open database.
    assert_eq!(j.str_at(&["status", "Db", "Open"]), "true");
    let bytes = j.str_at(&["status", "Db", "FileBytes"]);
    assert!(
        bytes.parse::<u64>().is_ok_and(|n| n > 0),
        "Db.FileBytes = {bytes:?}"
    );

    // Conode: the version, lower-case key.
    let version = j.str_at(&["status", "Conode", "version"]);
    assert!(!version.is_empty(), "Conode.version is empty");
    assert!(j.at(&["status", "Generic", "Version"]).is_none());
}

#[test]
fn js_client_reports_a_conode_that_is_down() {
    let files = NodeFiles::setup("nobody home");
    // Not started: the client must fail (non-zero exit, an error), not hang or succeed.
    let run = js_status(&files.public(), 0, &[]);
    assert!(!run.success, "succeeded with no conode: {}", run.stdout);
    assert!(
        run.stderr.contains("status.js:"),
        "no error message: {}",
        run.stderr
    );
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
