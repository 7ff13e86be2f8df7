//! Notify hooks (`[hooks]`): operator commands run when the role changes, a health
//! verdict changes, or another host answers for the address. They update a DNS name
//! (the alternative to a virtual IP), move a cloud floating IP, or page someone.
//!
//! A hook is a shell command line (`/bin/sh -c`), run as failoverd's user with the facts
//! in environment variables ([`Facts::env`]), never interpolated into the command. Each
//! hook (role change, health change, conflict) has a queue and a task of its own, and
//! runs one event at a time in the order they happened: the decision loop only puts an
//! event in a bounded queue and never waits for a hook, so a failing or hanging hook
//! cannot delay a safety action, nor another kind of hook (a hanging pager does not hold
//! up the role-change hook that moves a DNS name). A hook still running at `timeout` is
//! killed with its whole process group; its exit status, and the start of its output,
//! are logged. When a hook's queue is full, its oldest waiting event is dropped and
//! counted: the newest facts always run.

use std::collections::VecDeque;
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::config::HooksSection;
use crate::metrics::Metrics;

/// Events waiting for one hook; beyond this, the oldest waiting one is dropped (and
/// counted).
const QUEUE: usize = 32;
/// How much of a hook's stdout and stderr is logged.
const OUTPUT_LOGGED: usize = 2048;

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    RoleChange,
    HealthChange,
    Conflict,
}

impl Hook {
    /// The stable name: `FAILOVERD_EVENT`, the metrics' `hook` label, the config key's
    /// suffix (`on_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::RoleChange => "role_change",
            Hook::HealthChange => "health_change",
            Hook::Conflict => "conflict",
        }
    }
}

/// The facts handed to a hook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// `live` or `standby` (now).
    pub role: String,
    /// The role before the change (role changes; else the same as `role`).
    pub previous_role: String,
    pub epoch: u64,
    /// `[vip] address` ("" when unmanaged).
    pub vip: String,
    /// `[peer] address`.
    pub peer: String,
    /// Why, in words.
    pub reason: String,
    /// The stable cause of a role change (`switchover`, `forced_promote`, `demote`, ...).
    pub cause: String,
    /// Health changes: the check (`own_conode`, `live_conode`, `live_peer`) and whether it
    /// passes now.
    pub check: String,
    pub ok: Option<bool>,
    /// Conflicts: the MAC that answered, and how many conflicts so far.
    pub mac: String,
    pub conflicts: u64,
}

impl Facts {
    /// The environment of the hook.
    pub fn env(&self, hook: Hook) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("FAILOVERD_EVENT", hook.name().to_string()),
            ("FAILOVERD_ROLE", self.role.clone()),
            ("FAILOVERD_PREVIOUS_ROLE", self.previous_role.clone()),
            ("FAILOVERD_EPOCH", self.epoch.to_string()),
            ("FAILOVERD_VIP", self.vip.clone()),
            ("FAILOVERD_PEER", self.peer.clone()),
            ("FAILOVERD_REASON", self.reason.clone()),
        ];
        match hook {
            Hook::RoleChange => v.push(("FAILOVERD_CAUSE", self.cause.clone())),
            Hook::HealthChange => {
                v.push(("FAILOVERD_CHECK", self.check.clone()));
                v.push((
                    "FAILOVERD_OK",
                    if self.ok == Some(true) { "1" } else { "0" }.to_string(),
                ));
            }
            Hook::Conflict => {
                v.push(("FAILOVERD_MAC", self.mac.clone()));
                v.push(("FAILOVERD_CONFLICTS", self.conflicts.to_string()));
            }
        }
        v
    }
}

/// The way to the hook runners: [`Hooks::fire`] never waits.
#[derive(Clone)]
pub struct Hooks {
    target: Target,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
enum Target {
    /// No hook configured.
    None,
    /// One queue and one runner per configured hook (role change, health change,
    /// conflict), so that a hanging hook of one kind never holds up another kind's.
    Run(Vec<(Hook, Queue)>),
    /// Events go to a receiver instead of a runner (tests).
    #[cfg(test)]
    Capture(mpsc::Sender<(Hook, Facts)>),
}

/// The events waiting for one hook, and the wake-up of its runner (whose receiver ends
/// when every [`Hooks`] is dropped).
#[derive(Clone)]
struct Queue {
    waiting: Arc<std::sync::Mutex<VecDeque<Facts>>>,
    wake: mpsc::Sender<()>,
}

impl Hooks {
    /// Start a runner for each hook of `section` that is set. The runners end when every
    /// [`Hooks`] is dropped.
    pub fn start(section: HooksSection, metrics: Arc<Metrics>) -> Hooks {
        let mut queues = Vec::new();
        for (hook, command) in [
            (Hook::RoleChange, &section.on_role_change),
            (Hook::HealthChange, &section.on_health_change),
            (Hook::Conflict, &section.on_conflict),
        ] {
            let Some(command) = command.clone() else {
                continue;
            };
            let waiting = Arc::new(std::sync::Mutex::new(VecDeque::<Facts>::new()));
            let (wake, mut woken) = mpsc::channel::<()>(1);
            let (q, m, timeout) = (waiting.clone(), metrics.clone(), section.timeout);
            tokio::spawn(async move {
                while woken.recv().await.is_some() {
                    loop {
                        let next = q.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                        let Some(facts) = next else { break };
                        let result = run(hook, &command, &facts.env(hook), timeout).await;
                        m.hook_run(hook.name(), result.label());
                    }
                }
            });
            queues.push((hook, Queue { waiting, wake }));
        }
        Hooks {
            target: if queues.is_empty() {
                Target::None
            } else {
                Target::Run(queues)
            },
            metrics,
        }
    }

    /// Hooks whose events go to the returned receiver instead of a runner (tests).
    #[cfg(test)]
    pub fn capture(metrics: Arc<Metrics>) -> (Hooks, mpsc::Receiver<(Hook, Facts)>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Hooks {
                target: Target::Capture(tx),
                metrics,
            },
            rx,
        )
    }

    /// Queue `hook` with `facts`; returns at once. With [`QUEUE`] events of that hook
    /// waiting already, the oldest waiting one is dropped (logged and counted as
    /// `dropped`): the newest facts always reach the hook, so a role-change hook that
    /// moves a DNS name ends on the role the host has now.
    pub fn fire(&self, hook: Hook, facts: Facts) {
        let queue = match &self.target {
            Target::None => return,
            #[cfg(test)]
            Target::Capture(tx) => {
                let _ = tx.try_send((hook, facts));
                return;
            }
            Target::Run(queues) => match queues.iter().find(|(h, _)| *h == hook) {
                Some((_, q)) => q,
                None => return,
            },
        };
        let dropped = {
            let mut w = queue.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let dropped = if w.len() >= QUEUE {
                w.pop_front()
            } else {
                None
            };
            w.push_back(facts);
            dropped
        };
        if let Some(old) = dropped {
            tracing::warn!(
                "hook on_{}: {QUEUE} events wait for it (it is slow): the oldest ({}) is dropped, the newest will run",
                hook.name(),
                old.reason
            );
            self.metrics.hook_run(hook.name(), "dropped");
        }
        // A full wake-up channel means the runner is woken already.
        let _ = queue.wake.try_send(());
    }
}

/// How a hook run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RunResult {
    Ok,
    Failed(String),
    TimedOut,
}

impl RunResult {
    pub fn label(&self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Failed(_) => "failed",
            RunResult::TimedOut => "timeout",
        }
    }
}

/// Run one hook to its end or its timeout (then kill its process group).
pub async fn run(
    hook: Hook,
    command: &str,
    env: &[(&'static str, String)],
    timeout: Duration,
) -> RunResult {
    let name = hook.name();
    let t = Instant::now();
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for v in conode::sd_notify::VARIABLES {
        cmd.env_remove(v);
    }
    // Its own process group, so that a timeout kills what it started too.
    cmd.as_std_mut().process_group(0);
    without_network_capabilities(cmd.as_std_mut());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("hook on_{name} could not start: {e}");
            return RunResult::Failed(e.to_string());
        }
    };
    let pid = child.id();
    let out = child.stdout.take().map(|o| tokio::spawn(read_some(o)));
    let err = child.stderr.take().map(|e| tokio::spawn(read_some(e)));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) => Some(st),
        Ok(Err(e)) => {
            tracing::warn!("hook on_{name}: cannot wait for it: {e}");
            None
        }
        Err(_) => None,
    };
    if status.is_none() {
        if let Some(pid) = pid {
            // The group's id is the shell's pid (process_group(0)); the shell was started
            // by us and not yet reaped, so the id is still ours.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait().await;
    }
    let output = |h: Option<tokio::task::JoinHandle<String>>| async move {
        match h {
            Some(h) => tokio::time::timeout(Duration::from_secs(1), h)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default(),
            None => String::new(),
        }
    };
    let (stdout, stderr) = (output(out).await, output(err).await);
    let took = t.elapsed();
    let shown = |s: &str| {
        let s = s.trim();
        if s.is_empty() {
            String::new()
        } else {
            format!("; output: {s}")
        }
    };
    match status {
        Some(st) if st.success() => {
            tracing::info!("hook on_{name} done in {took:?}{}", shown(&stdout));
            RunResult::Ok
        }
        Some(st) => {
            tracing::warn!(
                "hook on_{name} failed ({st}) after {took:?}{}{}",
                shown(&stdout),
                shown(&stderr)
            );
            RunResult::Failed(st.to_string())
        }
        None => {
            tracing::warn!(
                "hook on_{name} still running after its timeout of {timeout:?}: killed{}",
                shown(&stderr)
            );
            RunResult::TimedOut
        }
    }
}

/// Run `cmd` without failoverd's ambient capabilities (`CAP_NET_ADMIN` and `CAP_NET_RAW`
/// under failoverd.service): a hook, rsync or scp has no business with the host's
/// addresses. Its inheritable set is not in a file's, so with the ambient set cleared it
/// starts with no capabilities at all (as root it keeps root's, as any root program).
pub fn without_network_capabilities(cmd: &mut std::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes one prctl system call (no allocation,
    // no lock, no memory shared with the parent) and reads errno through the libc
    // accessor. Clearing the ambient set never fails on kernels that have one (4.3 and
    // later); on older ones there is nothing to clear, so EINVAL is not an error.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            );
            if r == -1 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            Ok(())
        });
    }
}

/// Up to [`OUTPUT_LOGGED`] bytes of a pipe; the rest is read and dropped (so that the
/// hook never blocks on a full pipe).
async fn read_some(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = OUTPUT_LOGGED.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            role: "live".into(),
            previous_role: "standby".into(),
            epoch: 7,
            vip: "10.0.0.1/24".into(),
            peer: "10.0.0.3:7780".into(),
            reason: "forced promote by the operator".into(),
            cause: "forced_promote".into(),
            ..Facts::default()
        }
    }

    #[tokio::test]
    async fn a_hook_gets_the_facts_in_its_environment() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("env");
        let cmd = format!("env | grep ^FAILOVERD_ | sort > {}", out.display());
        let env = facts().env(Hook::RoleChange);
        let r = run(Hook::RoleChange, &cmd, &env, Duration::from_secs(10)).await;
        assert_eq!(r, RunResult::Ok);
        let got = std::fs::read_to_string(&out).unwrap();
        for want in [
            "FAILOVERD_EVENT=role_change",
            "FAILOVERD_ROLE=live",
            "FAILOVERD_PREVIOUS_ROLE=standby",
            "FAILOVERD_EPOCH=7",
            "FAILOVERD_VIP=10.0.0.1/24",
            "FAILOVERD_PEER=10.0.0.3:7780",
            "FAILOVERD_REASON=forced promote by the operator",
            "FAILOVERD_CAUSE=forced_promote",
        ] {
            assert!(
                got.lines().any(|l| l == want),
                "{want} missing from:\n{got}"
            );
        }
    }

    #[tokio::test]
    async fn a_hanging_hook_and_what_it_started_are_killed_at_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        // The shell starts a grandchild that would outlive a kill of the shell alone.
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let t = Instant::now();
        let r = run(Hook::HealthChange, &cmd, &[], Duration::from_millis(300)).await;
        assert_eq!(r, RunResult::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone (or a zombie of init's, never running again).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            if stat.is_empty() || state == Some("Z") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hook's sleep {pid} still runs: {stat}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[tokio::test]
    async fn a_failing_hook_is_reported_as_failed() {
        let r = run(
            Hook::Conflict,
            "echo no >&2; exit 3",
            &[],
            Duration::from_secs(10),
        )
        .await;
        assert!(
            matches!(r, RunResult::Failed(ref s) if s.contains('3')),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn fire_never_waits_even_when_hooks_hang() {
        let metrics = Arc::new(Metrics::new());
        let hooks = Hooks::start(
            HooksSection {
                on_role_change: Some("sleep 5".into()),
                timeout: Duration::from_secs(5),
                ..HooksSection::default()
            },
            metrics.clone(),
        );
        let t = Instant::now();
        for _ in 0..(QUEUE + 10) {
            hooks.fire(Hook::RoleChange, facts());
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        let text = metrics.encode(&crate::status::StatusView::default());
        assert!(
            text.contains("failoverd_hook_runs_total{hook=\"role_change\",result=\"dropped\"}"),
            "{text}"
        );
    }

    /// A hanging hook of one kind holds up neither another kind's hook nor the newest
    /// event of its own kind (the oldest waiting ones are dropped, never the newest).
    #[tokio::test]
    async fn a_hanging_hook_holds_up_no_other_hook_and_the_newest_event_runs() {
        let d = tempfile::tempdir().unwrap();
        let roles = d.path().join("roles");
        let metrics = Arc::new(Metrics::new());
        let hooks = Hooks::start(
            HooksSection {
                on_health_change: Some("sleep 30".into()),
                on_role_change: Some(format!(
                    "echo \"$FAILOVERD_EPOCH\" >> {}; sleep 0.2",
                    roles.display()
                )),
                timeout: Duration::from_secs(30),
                ..HooksSection::default()
            },
            metrics.clone(),
        );
        hooks.fire(Hook::HealthChange, facts());
        // Many role changes: more than the queue holds while the first one runs.
        for epoch in 1..=(QUEUE as u64 + 5) {
            hooks.fire(Hook::RoleChange, Facts { epoch, ..facts() });
        }
        let newest = (QUEUE as u64 + 5).to_string();
        let t = Instant::now();
        let ran = loop {
            let ran = std::fs::read_to_string(&roles).unwrap_or_default();
            if ran.lines().last() == Some(newest.as_str()) {
                break ran;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the newest role change never ran while the health hook hangs: {ran:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // In order, the first one (already running when the queue filled) included, and
        // the oldest waiting ones dropped.
        let epochs: Vec<u64> = ran.lines().map(|l| l.parse().unwrap()).collect();
        assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
        assert!(epochs.len() <= QUEUE + 1, "{epochs:?}");
        let text = metrics.encode(&crate::status::StatusView::default());
        assert!(
            text.contains("failoverd_hook_runs_total{hook=\"role_change\",result=\"dropped\"}"),
            "{text}"
        );
    }
}
