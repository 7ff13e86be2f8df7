//! The Debian package `conode-failover` (docs/packaging.md), on this machine: built by
//! `scripts/package` from the binaries of this build, installed with `dpkg -i`, checked
//! (files, users, groups, owners and modes, the binaries and every command's man page
//! from their installed places, `systemd-analyze verify` on the installed units, the
//! permission model between the two users), removed (configuration, data and users stay), then
//! purged (nothing of it stays).
//!
//! Needs root and a machine where the package, its users and its directories do not
//! exist yet (CI: a throwaway machine). It refuses to start, touching nothing, when any
//! of them exists, and purges the package in a drop guard, so a failure half-way leaves
//! nothing behind. It only ever touches what the package created.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

const PACKAGE: &str = "conode-failover";
const USERS: [&str; 2] = ["conode", "failoverd"];

/// The directories the package makes: path, owner, group, mode.
const DIRS: [(&str, &str, &str, u32); 4] = [
    ("/etc/conode", "root", "conode", 0o2750),
    ("/var/lib/conode", "conode", "conode", 0o2770),
    ("/etc/failoverd", "root", "failoverd", 0o2750),
    ("/var/lib/failoverd", "failoverd", "failoverd", 0o750),
];

/// The files the package ships: path and mode (all owned by root).
const FILES: [(&str, u32); 18] = [
    ("/usr/bin/conode", 0o755),
    ("/usr/bin/failoverd", 0o755),
    ("/lib/systemd/system/conode.service", 0o644),
    ("/lib/systemd/system/failoverd.service", 0o644),
    (
        "/usr/share/polkit-1/rules.d/60-conode-failoverd.rules",
        0o644,
    ),
    ("/usr/share/man/man1/conode.1.gz", 0o644),
    ("/usr/share/man/man1/failoverd.1.gz", 0o644),
    ("/usr/share/bash-completion/completions/conode", 0o644),
    ("/usr/share/bash-completion/completions/failoverd", 0o644),
    ("/usr/share/zsh/vendor-completions/_conode", 0o644),
    ("/usr/share/zsh/vendor-completions/_failoverd", 0o644),
    ("/usr/share/fish/vendor_completions.d/conode.fish", 0o644),
    ("/usr/share/fish/vendor_completions.d/failoverd.fish", 0o644),
    ("/usr/share/doc/conode-failover/README.md", 0o644),
    ("/usr/share/doc/conode-failover/packaging.md", 0o644),
    ("/usr/share/doc/conode-failover/operators-guide.md", 0o644),
    ("/usr/share/doc/conode-failover/metrics-conode.md", 0o644),
    ("/usr/share/doc/conode-failover/copyright", 0o644),
];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn must(program: &str, args: &[&str]) -> Output {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        said(&out)
    );
    out
}

/// dpkg's status of the package: "installed", "config-files", "not-installed", …, or
/// None when dpkg never heard of it.
fn package_status() -> Option<String> {
    let out = run("dpkg-query", &["-W", "-f=${db:Status-Status}", PACKAGE]);
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn user_exists(name: &str) -> bool {
    run("getent", &["passwd", name]).status.success()
}

fn group_exists(name: &str) -> bool {
    run("getent", &["group", name]).status.success()
}

/// Everything the package would create that exists now (users, groups, paths).
fn present() -> Vec<String> {
    let mut found = Vec::new();
    for u in USERS {
        if user_exists(u) {
            found.push(format!("user {u}"));
        }
        if group_exists(u) {
            found.push(format!("group {u}"));
        }
    }
    let paths = DIRS.iter().map(|d| d.0).chain(FILES.iter().map(|f| f.0));
    for p in paths {
        if Path::new(p).symlink_metadata().is_ok() {
            found.push(p.to_string());
        }
    }
    found
}

/// Where the package puts the man pages the installed binaries generate
/// (`generate man --dir`): /usr/share/man/man1/NAME.1.gz.
fn installed_man_pages() -> Vec<String> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut pages = Vec::new();
    for program in ["/usr/bin/conode", "/usr/bin/failoverd"] {
        let out = must(
            program,
            &[
                "generate",
                "man",
                "--dir",
                dir.path().to_str().expect("utf-8 path"),
            ],
        );
        for path in String::from_utf8_lossy(&out.stdout).lines() {
            let name = Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_else(|| panic!("{program} generate man --dir printed {path:?}"));
            pages.push(format!("/usr/share/man/man1/{name}.gz"));
        }
    }
    pages
}

/// Purges the package when dropped, if it is on the machine: the test installed it
/// (it refused to start otherwise).
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        match package_status().as_deref() {
            None | Some("not-installed") => {}
            Some(status) => {
                eprintln!("deb_package: cleaning up: dpkg --purge {PACKAGE} (it was {status})");
                let out = run("dpkg", &["--purge", PACKAGE]);
                if !out.status.success() {
                    eprintln!(
                        "deb_package: dpkg --purge {PACKAGE} failed ({}): {}; remove it by hand",
                        out.status,
                        said(&out)
                    );
                }
            }
        }
    }
}

fn name_of_uid(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

fn name_of_gid(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

/// (owner, group, mode with the setuid/setgid/sticky bits) of `path`.
fn owner_group_mode(path: &str) -> (String, String, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (
        name_of_uid(m.uid()),
        name_of_gid(m.gid()),
        m.mode() & 0o7777,
    )
}

/// `program args` as `user` (runuser): whether it succeeded.
fn as_user(user: &str, script: &str) -> bool {
    run("runuser", &["-u", user, "--", "sh", "-c", script])
        .status
        .success()
}

#[test]
fn package_installs_users_dirs_and_units_keeps_data_on_remove_and_purge_leaves_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "deb_package needs root (dpkg -i, users): run it as root on a throwaway machine, as CI does"
    );
    // Held until the end, after the purge guard (dropped first, being declared later).
    let _lock = system_tests::package_lock(std::time::Duration::from_secs(600));
    if let Some(status) = package_status() {
        assert!(
            status == "not-installed",
            "{PACKAGE} is already on this machine (dpkg status {status:?}): refusing to touch \
             it; purge it first (dpkg --purge {PACKAGE}) if it is a leftover"
        );
    }
    let before = present();
    assert!(
        before.is_empty(),
        "refusing to run: these already exist and the package would take them over, then \
         purge them: {before:?}"
    );

    let (deb, took) = system_tests::build_package();
    eprintln!(
        "deb_package: scripts/package built {} in {:.1} s",
        deb.display(),
        took.as_secs_f64()
    );

    let _purge = PurgeOnDrop;
    must("dpkg", &["-i", deb.to_str().expect("utf-8 path")]);
    assert_eq!(package_status().as_deref(), Some("installed"));

    // Files, owners and modes.
    for (path, mode) in FILES {
        assert_eq!(
            owner_group_mode(path),
            ("root".into(), "root".into(), mode),
            "{path}"
        );
    }
    for (path, owner, group, mode) in DIRS {
        assert_eq!(
            owner_group_mode(path),
            (owner.into(), group.into(), mode),
            "{path}"
        );
    }

    // System users without a login shell; failoverd also in the group conode.
    for (user, home) in [
        ("conode", "/var/lib/conode"),
        ("failoverd", "/var/lib/failoverd"),
    ] {
        let u = nix::unistd::User::from_name(user)
            .expect("getpwnam")
            .unwrap_or_else(|| panic!("user {user} missing after install"));
        assert!(
            u.uid.as_raw() < 1000,
            "{user}: uid {} is not a system uid",
            u.uid
        );
        assert_eq!(u.shell, Path::new("/usr/sbin/nologin"), "{user} shell");
        assert_eq!(u.dir, Path::new(home), "{user} home");
        assert_eq!(name_of_gid(u.gid.as_raw()), user, "{user} primary group");
    }
    let groups = String::from_utf8_lossy(&must("id", &["-nG", "failoverd"]).stdout).to_string();
    assert!(
        groups.split_whitespace().any(|g| g == "conode"),
        "failoverd is not in the group conode: {groups}"
    );
    let groups = String::from_utf8_lossy(&must("id", &["-nG", "conode"]).stdout).to_string();
    assert_eq!(
        groups.split_whitespace().collect::<Vec<_>>(),
        ["conode"],
        "conode's groups"
    );

    // The installed binaries run; the man pages render.
    let v = must("/usr/bin/conode", &["--version"]);
    assert!(
        String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")),
        "conode --version: {}",
        said(&v)
    );
    let h = must("/usr/bin/failoverd", &["--help"]);
    assert!(
        String::from_utf8_lossy(&h.stdout).contains("release-vip")
            || String::from_utf8_lossy(&h.stdout).contains("switchover"),
        "failoverd --help: {}",
        said(&h)
    );
    // Every page the installed binaries generate (one per command) is installed, root's,
    // 0644, and renders with its exit statuses.
    let pages = installed_man_pages();
    for want in [
        "conode.1.gz",
        "conode-chain-create.1.gz",
        "failoverd-promote.1.gz",
    ] {
        assert!(
            pages.iter().any(|p| p.ends_with(&format!("/{want}"))),
            "{want} is not among the pages: {pages:?}"
        );
    }
    for page in &pages {
        assert_eq!(
            owner_group_mode(page),
            ("root".into(), "root".into(), 0o644),
            "{page}"
        );
        let out = Command::new("man")
            .args(["-P", "cat", "-l", page])
            .env("MANWIDTH", "80")
            .output()
            .expect("run man");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("NAME") && text.contains("EXIT STATUS"),
            "man -l {page} ({}):\n{}",
            out.status,
            said(&out)
        );
    }

    // The installed units, as systemd would read them (ExecStart binaries and man pages
    // resolved on this machine). Silence is the only pass.
    let out = run(
        "systemd-analyze",
        &[
            "verify",
            "/lib/systemd/system/conode.service",
            "/lib/systemd/system/failoverd.service",
        ],
    );
    assert!(
        out.status.success() && said(&out).trim().is_empty(),
        "systemd-analyze verify on the installed units ({}):\n{}",
        out.status,
        said(&out)
    );

    // The permission model (docs/packaging.md), step by step as an operator does it.
    must(
        "/usr/bin/conode",
        &[
            "-c",
            "/etc/conode/private.toml",
            "setup",
            "--non-interactive",
            "--host",
            "127.0.0.1",
            "--port",
            "7770",
            "--description",
            "deb_package test",
        ],
    );
    must("chmod", &["0640", "/etc/conode/private.toml"]);
    assert_eq!(
        owner_group_mode("/etc/conode/private.toml"),
        ("root".into(), "conode".into(), 0o640),
        "private.toml after setup and chmod (the setgid directory gives it the group)"
    );
    assert!(
        as_user("conode", "cat /etc/conode/private.toml >/dev/null"),
        "the conode cannot read its private.toml"
    );
    assert!(
        as_user("failoverd", "cat /etc/conode/private.toml >/dev/null"),
        "failoverd cannot read the conode's private.toml"
    );
    assert!(
        !as_user("nobody", "cat /etc/conode/private.toml >/dev/null"),
        "nobody can read the conode's private.toml"
    );
    assert!(
        !as_user("conode", ": >/etc/conode/written-by-conode"),
        "the conode can write its configuration directory"
    );
    assert!(
        as_user(
            "failoverd",
            "umask 0007 && : >/var/lib/conode/.probe && rm /var/lib/conode/.probe"
        ),
        "failoverd cannot create and remove files in /var/lib/conode (installs need it)"
    );
    assert!(
        !as_user("conode", ": >/var/lib/failoverd/written-by-conode"),
        "the conode can write failoverd's state directory"
    );
    assert!(
        !as_user("nobody", "ls /var/lib/conode"),
        "nobody can list the conode's data directory"
    );

    // remove: the binaries, units and rule go; configuration, data and users stay.
    must("dpkg", &["-r", PACKAGE]);
    assert_eq!(package_status().as_deref(), Some("config-files"));
    for (path, _) in FILES {
        assert!(!Path::new(path).exists(), "{path} left after dpkg -r");
    }
    for page in &pages {
        assert!(!Path::new(page).exists(), "{page} left after dpkg -r");
    }
    for (path, ..) in DIRS {
        assert!(Path::new(path).is_dir(), "{path} gone after dpkg -r");
    }
    assert!(
        Path::new("/etc/conode/private.toml").is_file(),
        "dpkg -r deleted the conode's key"
    );
    for u in USERS {
        assert!(user_exists(u), "user {u} gone after dpkg -r");
    }

    // purge: nothing stays.
    must("dpkg", &["--purge", PACKAGE]);
    assert!(
        matches!(package_status().as_deref(), None | Some("not-installed")),
        "dpkg still knows {PACKAGE}: {:?}",
        package_status()
    );
    let left = present();
    assert!(left.is_empty(), "left after dpkg --purge: {left:?}");
}
