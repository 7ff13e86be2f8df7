//! The conode binary as an operator uses it: setup, server, check, bad configuration.
use system_tests::*;

#[test]
fn check_reports_every_server_and_fails_if_one_is_down() {
    let a = NodeFiles::setup("node A");
    let b = NodeFiles::setup("node B");
    let _na = a.start();
    let roster = a.dir.path().join("roster.toml");
    let text = std::fs::read_to_string(a.public()).unwrap()
        + &std::fs::read_to_string(b.public()).unwrap();
    std::fs::write(&roster, text).unwrap();
    let out = std::process::Command::new(conode_bin())
        .arg("check")
        .arg(&roster)
        .args(["-t", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "B is down: {stdout}");
    assert!(stdout.contains("\"node A\"\tversion"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&format!("tls://127.0.0.1:{}\terror:", b.port))),
        "{stdout}"
    );
    let _nb = b.start();
    let (code, stdout, _) = run(&["check".as_ref(), roster.as_os_str()], &[], "");
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(stdout.lines().count(), 2);
}

fn run(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::path::Path)],
    stdin: &str,
) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new(conode_bin());
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn malformed_private_toml_gives_one_line_with_file_line_key_and_changes_nothing() {
    let n = NodeFiles::setup("bad config");
    let good = std::fs::read_to_string(n.private()).unwrap();
    let cases = [
        (
            "Description = \"bad config\"",
            "Description = bad config",
            8,
            "Description",
        ),
        (
            "Address = \"tls://127.0.0.1:",
            "Address = \"udp://127.0.0.1:",
            6,
            "Address",
        ),
        ("Public = \"", "Public = \"00", 4, "Public"),
    ];
    for (from, to, line, key) in cases {
        let bad = good.replacen(from, to, 1);
        assert_ne!(bad, good);
        std::fs::write(n.private(), &bad).unwrap();
        let (code, _, err) = run(
            &[
                "-c".as_ref(),
                n.private().as_os_str(),
                "server".as_ref(),
                "--allow-root".as_ref(),
            ],
            &[("CONODE_SERVICE_PATH", &n.data())],
            "",
        );
        assert_eq!(code, Some(2), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        let want = format!("{}:{line}: key `{key}`", n.private().display());
        assert!(
            lines[0].contains(&want),
            "expected {want:?} in {:?}",
            lines[0]
        );
        assert_eq!(
            std::fs::read_to_string(n.private()).unwrap(),
            bad,
            "the file is left as it was"
        );
        assert!(!n.data().exists(), "no database was created");
    }
    // A missing key.
    std::fs::write(n.private(), good.replace("Private = ", "#Private = ")).unwrap();
    let (code, _, err) = run(
        &[
            "-c".as_ref(),
            n.private().as_os_str(),
            "server".as_ref(),
            "--allow-root".as_ref(),
        ],
        &[],
        "",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("key `Private`: missing"), "{err}");
    // A malformed roster for check.
    let roster = n.dir.path().join("roster.toml");
    std::fs::write(
        &roster,
        "[[servers]]\n  Address = \"tls://127.0.0.1:1\"\n  Public = 42\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check".as_ref(), roster.as_os_str()], &[], "");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("roster.toml:3: key `Public`: expected a string"),
        "{err}"
    );
}

#[test]
fn server_refuses_root_without_allow_root() {
    let root = nix::unistd::geteuid().is_root();
    assert!(
        root,
        "this test checks the refusal and must run as root (CI does)"
    );
    let n = NodeFiles::setup("root");
    let (code, _, err) = run(
        &["-c".as_ref(), n.private().as_os_str(), "server".as_ref()],
        &[("CONODE_SERVICE_PATH", &n.data())],
        "",
    );
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("refusing to run as root") && err.contains("--allow-root"),
        "{err}"
    );
    assert!(!n.data().exists());
}

#[test]
fn interactive_setup_through_stdin_then_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let folder = dir.path().join("conf");
    // [address:]PORT, description, folder — as run_nodes.sh feeds the Go conode.
    let answers = format!("127.0.0.1:{port}\nInteractive node\n{}\n", folder.display());
    let (code, out, err) = run(
        &["setup".as_ref()],
        &[("XDG_CONFIG_HOME", dir.path())],
        &answers,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("Please enter the [address:]PORT"), "{out}");
    let private = folder.join("private.toml");
    let text = std::fs::read_to_string(&private).unwrap();
    assert!(
        text.contains(&format!("Address = \"tls://127.0.0.1:{port}\"")),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Again: the overwrite question, answered no, keeps the key.
    let again = format!("127.0.0.1:{port}\nx\n{}\nn\n", folder.display());
    let (code, out, _) = run(&["setup".as_ref()], &[], &again);
    assert_eq!(code, Some(2));
    assert!(out.contains("already exists. Override? [Yn]"), "{out}");
    assert_eq!(std::fs::read_to_string(&private).unwrap(), text);
    // And the written files run a conode that check can reach.
    let files = NodeFiles { dir, port };
    std::fs::create_dir_all(files.dir.path().join("co")).unwrap();
    std::fs::copy(&private, files.private()).unwrap();
    std::fs::copy(folder.join("public.toml"), files.public()).unwrap();
    let _node = files.start();
    let (code, stdout, _) = run(&["check".as_ref(), files.public().as_os_str()], &[], "");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("\"Interactive node\""), "{stdout}");
}

#[test]
fn database_goes_to_xdg_data_home_without_conode_service_path() {
    let n = NodeFiles::setup("xdg");
    let xdg = n.dir.path().join("xdg-data");
    let public = std::fs::read_to_string(n.public()).unwrap();
    let hex = public
        .lines()
        .find_map(|l| l.trim().strip_prefix("Public = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let log = std::fs::File::create(n.dir.path().join("xdg.log")).unwrap();
    let mut child = std::process::Command::new(conode_bin())
        .arg("-c")
        .arg(n.private())
        .args(["server", "--allow-root"])
        .env_remove("CONODE_SERVICE_PATH")
        .env("XDG_DATA_HOME", &xdg)
        .stderr(log)
        .spawn()
        .unwrap();
    let db = xdg.join("conode").join(format!("{hex}.db"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !db.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(db.exists(), "expected the database at {}", db.display());
}

#[test]
fn check_fails_when_a_server_answers_with_another_key_than_the_roster() {
    let a = NodeFiles::setup("impostor check");
    let other = NodeFiles::setup("other key");
    let _na = a.start();
    // A's address with another node's public key.
    let key = |p: &std::path::Path| {
        let t = std::fs::read_to_string(p).unwrap();
        t.lines()
            .find(|l| l.trim_start().starts_with("Public"))
            .unwrap()
            .to_string()
    };
    let roster = a.dir.path().join("wrong-key.toml");
    let text = std::fs::read_to_string(a.public())
        .unwrap()
        .replace(&key(&a.public()), &key(&other.public()));
    std::fs::write(&roster, text).unwrap();
    let (code, stdout, _) = run(&["check".as_ref(), roster.as_os_str()], &[], "");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("answered with another public key than the roster's"),
        "{stdout}"
    );
}

/// `Type=notify`: READY=1 once both ports listen, STOPPING=1 at SIGTERM, sent to the
/// socket systemd names in NOTIFY_SOCKET (here one the test owns).
#[test]
fn server_tells_systemd_it_is_ready_once_both_ports_listen_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let n = NodeFiles::setup("notify");
    let sock_path = n.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut node = n.start_with(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let k = sock.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..k], b"READY=1");
    // Both ports accept by then (the client WebSocket port and the conode-to-conode one).
    for port in [n.ws_port(), n.port] {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("port {port} after READY=1: {e}"));
    }
    assert!(node.stop().success());
    let k = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(&buf[..k], b"STOPPING=1");
}

/// `CONODE_ADMIN_GROUP` (set by the packaged unit): the admin socket is 0660 in that
/// group and serves processes in it (as effective or supplementary group), and still no
/// one else; an unknown group stops the conode at start.
#[test]
fn the_admin_group_opens_the_admin_socket_to_its_members_only() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let n = NodeFiles::setup("admin group");
    // nobody must reach the socket's directory.
    for d in [n.dir.path(), &n.data()] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let _node = n.start_with(&[("CONODE_ADMIN_GROUP", "nogroup")]);
    let socket = std::fs::read_dir(n.data())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".sock"))
        .expect("the admin socket");
    let m = std::fs::metadata(&socket).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), 65534, "the socket's group is nogroup");
    // Ask for the positions as uid nobody with the given groups.
    let ask = |regid: &str, groups: &str| {
        let script = format!(
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); s.sendall(b'position\\n'); print(s.makefile().read())",
            socket.display().to_string()
        );
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                &format!("--regid={regid}"),
                &format!("--groups={groups}"),
                "/usr/bin/python3",
                "-c",
                &script,
            ])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let member = ask("65534", "65534");
    assert!(member.contains("\"ok\":true"), "effective group: {member}");
    let supplementary = ask("1", "65534");
    assert!(
        supplementary.contains("\"ok\":true"),
        "supplementary group: {supplementary}"
    );
    // Outside the group: the socket's mode already stops it (EACCES), and the server's
    // own check would refuse it too.
    let stranger = ask("1", "1");
    assert!(
        stranger.contains("Permission denied") || stranger.contains("permission denied"),
        "a stranger: {stranger}"
    );

    let other = NodeFiles::setup("admin group unknown");
    let out = std::process::Command::new(conode_bin())
        .arg("-c")
        .arg(other.private())
        .args(["server", "--allow-root"])
        .env("CONODE_SERVICE_PATH", other.data())
        .env("CONODE_ADMIN_GROUP", "no-such-group-here")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CONODE_ADMIN_GROUP=\"no-such-group-here\": no such group"),
        "{err}"
    );
}
