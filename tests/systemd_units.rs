//! The systemd units and the polkit rule in `scripts/` (docs/packaging.md), checked
//! without a running systemd: `systemd-analyze verify` on copies whose `/usr/bin/`
//! paths point at the built binaries (it checks that every `Exec*` command exists), and
//! the polkit rule evaluated by Node.js against the cases it must allow and refuse.
//!
//! `systemd-analyze verify` exits 0 on an unknown key or a value it cannot parse, and
//! only says so on standard error: a unit passes here only with nothing said at all.
//! Needs `systemd-analyze` (package systemd) and `node` (scripts/install-deps installs
//! both); without them the tests fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn unit_text(name: &str) -> String {
    let p = repo().join("scripts/systemd").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `name` with `/usr/bin/conode` and `/usr/bin/failoverd` pointing at the built binaries.
fn unit_for_built_binaries(name: &str) -> String {
    unit_text(name)
        .replace(
            "/usr/bin/conode",
            system_tests::bin("conode").to_str().expect("utf-8 path"),
        )
        .replace(
            "/usr/bin/failoverd",
            system_tests::bin("failoverd").to_str().expect("utf-8 path"),
        )
}

/// Run `systemd-analyze verify --man=no` on units written into a fresh directory; the
/// exit status and everything it said.
fn verify(units: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("systemd-analyze");
    // The man pages are checked by tests/deb_package.rs, where the package installed them.
    cmd.args(["verify", "--man=no"]);
    for (name, text) in units {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write unit");
        cmd.arg(p);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run systemd-analyze ({e}): install systemd (scripts/install-deps does)")
    });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn both_units_pass_systemd_analyze_verify_with_the_built_binaries() {
    let conode = unit_for_built_binaries("conode.service");
    let failoverd = unit_for_built_binaries("failoverd.service");
    let (ok, said) = verify(&[
        ("conode.service", &conode),
        ("failoverd.service", &failoverd),
    ]);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify refused or warned (success: {ok}):\n{said}"
    );
}

#[test]
fn verify_catches_a_missing_binary_an_unknown_key_and_a_bad_value() {
    // The check above is only worth something if these fail it.
    let good = unit_for_built_binaries("failoverd.service");
    let broken = [
        (
            "a missing ExecStopPost binary",
            good.replace(
                &format!("ExecStopPost={}", system_tests::bin("failoverd").display()),
                "ExecStopPost=/nonexistent/failoverd",
            ),
        ),
        (
            "an unknown key",
            good.replace("ProtectHome=yes", "ProtectHomme=yes"),
        ),
        ("a bad value", good.replace("Type=notify", "Type=notifyy")),
    ];
    for (what, text) in broken {
        assert_ne!(text, good, "{what}: the replacement did not apply");
        let (ok, said) = verify(&[("failoverd.service", &text)]);
        assert!(
            !ok || !said.trim().is_empty(),
            "{what}: systemd-analyze verify neither failed nor warned"
        );
    }
}

/// The `Key=value` lines of a unit's section, in order (comments and blanks left out).
fn settings(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

fn the(settings: &[(String, String)], key: &str) -> Vec<String> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

#[test]
fn conode_unit_is_notify_unprivileged_and_writes_only_its_data_directory() {
    let s = settings(&unit_text("conode.service"), "Service");
    let expect = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "conode"),
        ("Group", "conode"),
        (
            "ExecStart",
            "/usr/bin/conode -c /etc/conode/private.toml server",
        ),
        ("UMask", "0007"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/conode"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("Restart", "on-failure"),
    ];
    for (k, v) in expect {
        assert_eq!(the(&s, k), [v], "conode.service {k}");
    }
    // The data directory, the group served on the admin socket (failoverd's user is in
    // it), and the metrics on loopback only.
    assert_eq!(
        the(&s, "Environment"),
        [
            "CONODE_SERVICE_PATH=/var/lib/conode",
            "CONODE_ADMIN_GROUP=conode",
            "CONODE_METRICS=127.0.0.1:9102"
        ],
        "conode.service Environment"
    );
}

#[test]
fn failoverd_unit_has_the_watchdog_release_vip_and_only_two_capabilities() {
    let s = settings(&unit_text("failoverd.service"), "Service");
    let expect = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "failoverd"),
        ("Group", "failoverd"),
        ("SupplementaryGroups", "conode"),
        (
            "ExecStart",
            "/usr/bin/failoverd -c /etc/failoverd/failoverd.toml run",
        ),
        (
            "ExecStopPost",
            "/usr/bin/failoverd -c /etc/failoverd/failoverd.toml release-vip",
        ),
        ("CapabilityBoundingSet", "CAP_NET_ADMIN CAP_NET_RAW"),
        ("AmbientCapabilities", "CAP_NET_ADMIN CAP_NET_RAW"),
        ("UMask", "0007"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
    ];
    for (k, v) in expect {
        assert_eq!(the(&s, k), [v], "failoverd.service {k}");
    }
    let watchdog = the(&s, "WatchdogSec");
    assert_eq!(
        watchdog.len(),
        1,
        "failoverd.service WatchdogSec: {watchdog:?}"
    );
}

/// Evaluate the polkit rule in Node.js with polkit's rule API (`polkit.addRule`,
/// `action.id`, `action.lookup`, `subject.user`, `polkit.Result`): for each case, the
/// rule's answer, `YES` or `none` (no answer: the defaults decide).
#[test]
fn polkit_rule_lets_only_failoverd_start_stop_restart_only_conode_service() {
    let rule = repo().join("scripts/polkit/60-conode-failoverd.rules");
    let cases = [
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-units",
            "conode.service",
            "start",
            "YES",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-units",
            "conode.service",
            "stop",
            "YES",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-units",
            "conode.service",
            "restart",
            "YES",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-units",
            "conode.service",
            "reload",
            "none",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-units",
            "ssh.service",
            "start",
            "none",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-units",
            "failoverd.service",
            "stop",
            "none",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.manage-unit-files",
            "conode.service",
            "start",
            "none",
        ),
        (
            "failoverd",
            "org.freedesktop.systemd1.reload-daemon",
            "conode.service",
            "start",
            "none",
        ),
        (
            "conode",
            "org.freedesktop.systemd1.manage-units",
            "conode.service",
            "start",
            "none",
        ),
        (
            "nobody",
            "org.freedesktop.systemd1.manage-units",
            "conode.service",
            "stop",
            "none",
        ),
    ];
    let cases_json: Vec<serde_json::Value> = cases
        .iter()
        .map(|(user, id, unit, verb, _)| {
            serde_json::json!({"user": user, "id": id, "unit": unit, "verb": verb})
        })
        .collect();
    let script = format!(
        r#"
const fs = require("fs");
const rules = [];
const polkit = {{
  Result: {{ YES: "YES", NO: "NO", AUTH_ADMIN: "AUTH_ADMIN" }},
  addRule(f) {{ rules.push(f); }},
  log() {{}},
}};
new Function("polkit", fs.readFileSync({rule}, "utf8"))(polkit);
if (rules.length !== 1) throw new Error("expected one rule, got " + rules.length);
const out = {cases}.map(c => {{
  const action = {{ id: c.id, lookup: k => ({{ unit: c.unit, verb: c.verb }})[k] }};
  const subject = {{ user: c.user, isInGroup: () => false, local: true, active: true }};
  const r = rules[0](action, subject);
  return r === undefined ? "none" : r;
}});
console.log(JSON.stringify(out));
"#,
        rule = serde_json::Value::String(rule.to_string_lossy().into_owned()),
        cases = serde_json::Value::Array(cases_json),
    );
    let out = Command::new("node")
        .arg("-e")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): scripts/install-deps installs it"));
    assert!(
        out.status.success(),
        "node could not evaluate {}: {}",
        rule.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<String> =
        serde_json::from_slice(&out.stdout).expect("node printed the answers as JSON");
    for (case, answer) in cases.iter().zip(&answers) {
        assert_eq!(answer, case.4, "polkit rule for {case:?}");
    }
    assert_eq!(answers.len(), cases.len());
}
