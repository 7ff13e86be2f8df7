//! The conode binary as an operator uses it: setup, server, check, bad configuration.
use system_tests::*;

#[test]
fn check_reports_every_server_and_fails_if_one_is_down() {
    let a = NodeFiles::setup("node A");
    let b = NodeFiles::setup("node B");
    let _na = a.start();
    let roster = a.dir.path().join("roster.toml");
    let text = std::fs::read_to_string(a.public()).unwrap() + &std::fs::read_to_string(b.public()).unwrap();
    std::fs::write(&roster, text).unwrap();
    let out = std::process::Command::new(conode_bin()).arg("check").arg(&roster).args(["-t", "3"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "B is down: {stdout}");
    assert!(stdout.contains("\"node A\"\tversion"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with(&format!("tls://127.0.0.1:{}\terror:", b.port))), "{stdout}");
    let _nb = b.start();
    let out = std::process::Command::new(conode_bin()).arg("check").arg(&roster).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}
