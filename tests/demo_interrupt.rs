//! `scripts/demo` removes everything it made when interrupted (Ctrl-C) in the middle of a
//! run: its namespaces, the processes it started (failoverd, the conodes, its loops),
//! and it exits with status 130. The run is interrupted once the pair, the followers
//! and the client's append loop all run. Needs root and the debug binaries
//! (`cargo build --workspace`); it fails, never skips, without them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line names `needle` (the demo's run directory).
fn processes_naming(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// `ip netns list`.
fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned()
}

#[test]
fn an_interrupted_demo_removes_its_namespaces_and_processes() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let run = tempfile::tempdir().expect("tempdir");
    let demo_dir = run.path().join("demo");
    let needle = demo_dir.display().to_string();
    let mut child = Command::new("bash")
        .arg(repo.join("scripts/demo"))
        .arg("--once")
        .env("DEMO_PROFILE", "debug")
        .env("DEMO_NO_BUILD", "1")
        .env("DEMO_DIR", &demo_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run scripts/demo");
    let pid = child.id();
    let prefix = format!("fodemo-{pid}-");
    // Read its lines on a thread; the test waits for the moment to interrupt.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let go = line.contains("the client appends a block every");
                seen.push(line);
                if go {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the demo never reached its append loop:\n{}",
                    seen.join("\n")
                );
            }
        }
    }
    // Everything runs now: the demo's namespaces exist, and its processes.
    std::thread::sleep(Duration::from_secs(2));
    let ns = netns_list();
    assert!(
        ns.lines().filter(|l| l.starts_with(&prefix)).count() >= 6,
        "the demo's namespaces {prefix}* are not all there:\n{ns}"
    );
    assert!(
        !processes_naming(&needle).is_empty(),
        "no process of the demo names {needle}"
    );

    // Ctrl-C (to the script, which started everything else).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT the demo");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the demo") {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the demo did not end within 60 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = reader.join();
    assert_eq!(status.code(), Some(130), "{status}");
    let ns = netns_list();
    assert!(
        !ns.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left behind:\n{ns}"
    );
    let left = processes_naming(&needle);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}
