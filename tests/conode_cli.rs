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
