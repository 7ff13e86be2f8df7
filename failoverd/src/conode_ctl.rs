//! Starting and stopping this host's conode, and bringing a verified generation into its
//! data directory: the effects `StartConode`, `StopConode` and `InstallGeneration` of the
//! failover core, carried out one at a time by the daemon.
//!
//! Two ways to run the conode (`[conode] control`):
//! - `"child"`: failoverd starts `binary -c config server` itself as a supervised child
//!   process running as `user` (never root), with `CONODE_SERVICE_PATH` set to the data
//!   directory, and stops it with SIGTERM (SIGKILL after [`STOP_GRACE`]).
//! - `"systemd"`: `systemctl start|stop UNIT`.
//!
//! Either way "started" means the conode's admin socket answers, and "stopped" that it
//! does not (and, for a child, that the process exited). This module decides nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{ConodeControl, ConodeSection};

/// How long a stopping conode gets after SIGTERM before SIGKILL (it drains in-flight
/// requests for up to 30 s).
pub const STOP_GRACE: Duration = Duration::from_secs(35);

/// Runs and stops the conode as configured.
pub struct Conode {
    section: ConodeSection,
    admin: PathBuf,
    db: PathBuf,
    child: tokio::sync::Mutex<Option<tokio::process::Child>>,
}

impl Conode {
    pub fn new(section: ConodeSection, admin: PathBuf, db: PathBuf) -> Conode {
        Conode {
            section,
            admin,
            db,
            child: tokio::sync::Mutex::new(None),
        }
    }

    /// The conode's admin socket answers now.
    pub async fn answers(&self) -> bool {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                conode::admin::fetch_position(&self.admin)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Wait (at most `within`) until the admin socket answers (`want` true) or stops
    /// answering (`want` false).
    async fn wait_for(&self, want: bool, within: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.answers().await == want {
                return true;
            }
            if t.elapsed() >= within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start the conode (nothing to do if it answers already); Ok once it answers.
    pub async fn start(&self, within: Duration) -> Result<(), String> {
        if self.answers().await {
            return Ok(());
        }
        match &self.section.control {
            ConodeControl::Systemd { unit } => systemctl("start", unit).await?,
            ConodeControl::Child { binary, user } => {
                let mut child = self.child.lock().await;
                if let Some(c) = child.as_mut() {
                    if c.try_wait()
                        .map_err(|e| format!("conode child: {e}"))?
                        .is_none()
                    {
                        // Running but not answering yet: wait below.
                    } else {
                        *child = None;
                    }
                }
                if child.is_none() {
                    *child = Some(self.spawn_child(binary, user)?);
                }
            }
        }
        if self.wait_for(true, within).await {
            tracing::info!(
                "conode started: its admin socket {} answers",
                self.admin.display()
            );
            Ok(())
        } else {
            Err(format!(
                "the conode was started but its admin socket {} did not answer within {within:?}: see its log",
                self.admin.display()
            ))
        }
    }

    fn spawn_child(&self, binary: &Path, user: &str) -> Result<tokio::process::Child, String> {
        let u = nix::unistd::User::from_name(user)
            .map_err(|e| format!("conode.user {user:?}: {e}"))?
            .ok_or_else(|| format!("conode.user {user:?}: no such user on this host"))?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("-c")
            .arg(&self.section.config)
            .arg("server")
            .env("CONODE_SERVICE_PATH", &self.section.data_dir)
            .stdin(std::process::Stdio::null())
            .uid(u.uid.as_raw())
            .gid(u.gid.as_raw())
            .kill_on_drop(false);
        let c = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} as {user}: {e}", binary.display()))?;
        tracing::info!(
            "started the conode (pid {}) as {user}: {} -c {} server",
            c.id().unwrap_or(0),
            binary.display(),
            self.section.config.display()
        );
        Ok(c)
    }

    /// Stop the conode; Ok once it no longer answers (and a child exited).
    pub async fn stop(&self, within: Duration) -> Result<(), String> {
        match &self.section.control {
            ConodeControl::Systemd { unit } => systemctl("stop", unit).await?,
            ConodeControl::Child { .. } => {
                let mut child = self.child.lock().await;
                if let Some(mut c) = child.take() {
                    if let Some(pid) = c.id() {
                        let pid = nix::unistd::Pid::from_raw(pid as i32);
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                    }
                    match tokio::time::timeout(STOP_GRACE.min(within), c.wait()).await {
                        Ok(Ok(status)) => tracing::info!("the conode stopped ({status})"),
                        Ok(Err(e)) => return Err(format!("waiting for the conode: {e}")),
                        Err(_) => {
                            tracing::warn!(
                                "the conode did not stop within {:?} of SIGTERM: killing it",
                                STOP_GRACE.min(within)
                            );
                            let _ = c.kill().await;
                        }
                    }
                } else if self.answers().await {
                    return Err(format!(
                        "the conode answers on {} but failoverd did not start it (conode.control = \"child\"): stop it by hand, or let failoverd start it",
                        self.admin.display()
                    ));
                }
            }
        }
        if self.wait_for(false, within).await {
            Ok(())
        } else {
            Err(format!(
                "the conode still answers on {} after being stopped",
                self.admin.display()
            ))
        }
    }

    /// Notice a child that exited by itself (`Some(status)` once).
    pub async fn reap(&self) -> Option<String> {
        let mut child = self.child.lock().await;
        let exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(st) = exited {
            *child = None;
            return Some(st.to_string());
        }
        None
    }

    /// Put the verified generation file `generation_db` (generation `g`) in place as the
    /// conode's database, as `conode restore` does: the conode must be stopped, the
    /// current database is kept as `<hex>.db.before-restore-<unix seconds>`, and the new
    /// file gets the data directory's owner.
    pub fn install(&self, g: u64, generation_db: &Path, state_dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let cfg = conode::config::PrivateConfig::load(&self.section.config)
            .map_err(|e| format!("conode.config: {e}"))?;
        let dir = state_dir.join(format!("install-{g}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let name = self
            .db
            .file_name()
            .ok_or_else(|| format!("{}: no file name", self.db.display()))?;
        let staged = dir.join(name);
        // A hard link when the state and data directories share a filesystem (the
        // generation is never written again: a later one recycles the file only after
        // renaming it away), else a copy.
        if std::fs::hard_link(generation_db, &staged).is_err() {
            std::fs::copy(generation_db, &staged)
                .map_err(|e| format!("cannot copy {}: {e}", generation_db.display()))?;
        }
        std::fs::copy(&self.section.config, dir.join("private.toml"))
            .map_err(|e| format!("cannot copy {}: {e}", self.section.config.display()))?;
        let r = conode::backup::restore(&cfg, &self.db, &dir, true);
        let _ = std::fs::remove_dir_all(&dir);
        r.map_err(|e| format!("installing generation {g}: {e}"))?;
        let owner = std::fs::metadata(&self.section.data_dir)
            .map_err(|e| format!("conode.data_dir {}: {e}", self.section.data_dir.display()))?;
        nix::unistd::chown(
            &self.db,
            Some(nix::unistd::Uid::from_raw(owner.uid())),
            Some(nix::unistd::Gid::from_raw(owner.gid())),
        )
        .map_err(|e| {
            format!(
                "cannot give {} to the data directory's owner: {e}",
                self.db.display()
            )
        })?;
        tracing::info!(
            "generation {g} installed as the conode's database {}",
            self.db.display()
        );
        Ok(())
    }

    pub fn db(&self) -> &Path {
        &self.db
    }
}

async fn systemctl(verb: &str, unit: &str) -> Result<(), String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("systemctl")
            .arg(verb)
            .arg(unit)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| format!("systemctl {verb} {unit} did not finish within 60 s"))?
    .map_err(|e| format!("cannot run systemctl {verb} {unit}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl {verb} {unit} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
