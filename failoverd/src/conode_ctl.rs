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

    /// Start the conode; Ok once it answers. A conode that answers already is told to
    /// accept writes again, in case a final image froze it (a switchover called off).
    pub async fn start(&self, within: Duration) -> Result<(), String> {
        if self.answers().await {
            return match conode::admin::thaw(&self.admin).await {
                Ok(true) => {
                    tracing::info!(
                        "the conode accepts writes again (it was frozen for a switchover)"
                    );
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(e) => Err(format!(
                    "the conode runs, but lifting its freeze failed: {e}"
                )),
            };
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
        // The conode must not speak to failoverd's service manager as failoverd.
        for v in conode::sd_notify::VARIABLES {
            cmd.env_remove(v);
        }
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
                    // Started by an earlier failoverd (killed, then restarted while this
                    // host stayed live): ours if it runs this configuration.
                    let pid = self.adoptable().await?;
                    tracing::info!(
                        "stopping the conode (pid {pid}) an earlier failoverd started: {} -c {} server",
                        self.binary_name(),
                        self.section.config.display()
                    );
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                    if !self.wait_for(false, STOP_GRACE.min(within)).await {
                        tracing::warn!(
                            "the conode (pid {pid}) did not stop within {:?} of SIGTERM: killing it",
                            STOP_GRACE.min(within)
                        );
                        // Still the same process: its admin socket still answers, and a
                        // pid is not reused while the process lives.
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    }
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

    /// The pid of the conode answering on the admin socket (from the socket's peer
    /// credentials), if it is this host's conode as failoverd starts it: `binary -c
    /// config server`, run by `conode.user`. Else why failoverd will not stop it.
    async fn adoptable(&self) -> Result<nix::unistd::Pid, String> {
        let ConodeControl::Child { user, .. } = &self.section.control else {
            return Err("not a child conode".into());
        };
        let not_ours = |why: String| {
            format!(
                "the conode answers on {} but failoverd did not start it (conode.control = \"child\"), and {why}: stop it by hand",
                self.admin.display()
            )
        };
        let stream = tokio::net::UnixStream::connect(&self.admin)
            .await
            .map_err(|e| not_ours(format!("its admin socket cannot be reached ({e})")))?;
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| not_ours(format!("its process is unknown ({e})")))?;
        let pid = nix::unistd::Pid::from_raw(cred.pid());
        let uid = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw());
        if uid != Some(cred.uid()) {
            return Err(not_ours(format!(
                "it runs as uid {}, not as conode.user {user}",
                cred.uid()
            )));
        }
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline"))
            .await
            .map_err(|e| not_ours(format!("/proc/{pid}/cmdline: {e}")))?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .filter(|a| !a.is_empty())
            .collect();
        let want = self.section.config.display().to_string();
        let runs_ours = args.windows(2).any(|w| w[0] == "-c" && w[1] == want)
            && args.last().map(String::as_str) == Some("server")
            && args.first().is_some_and(|a| {
                std::path::Path::new(a).file_name()
                    == Some(std::ffi::OsStr::new(self.binary_name()))
            });
        if runs_ours {
            Ok(pid)
        } else {
            Err(not_ours(format!(
                "pid {pid} runs {:?}, not {} -c {want} server",
                args.join(" "),
                self.binary_name()
            )))
        }
    }

    /// The file name of `conode.binary` (child mode).
    fn binary_name(&self) -> &str {
        match &self.section.control {
            ConodeControl::Child { binary, .. } => binary
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("conode"),
            ConodeControl::Systemd { .. } => "conode",
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
    /// conode's database. The conode must be stopped (its admin socket must not answer).
    ///
    /// The generation was verified when it arrived (signed manifest, chunk hashes, redb's
    /// integrity check, the conode's key) and fsynced, so this is a hard link and two
    /// renames, the shortest part of a takeover we can make it:
    /// 1. the generation's file linked beside the database (the same file: nothing is
    ///    copied); as root owner-only and given the data directory's owner, as
    ///    failoverd's own user given the data directory's group, 0660. Where the generation is
    ///    on another filesystem, a copy instead (`copy_file_range`), fsynced in the
    ///    background (the conode's first commit flushes it anyway);
    /// 2. the current database, if any, kept as `<db>.replaced` (one such file: the
    ///    previous one is replaced), by a hard link, so that the database path never
    ///    goes missing (a conode started on a missing path would create an empty one);
    /// 3. the new name renamed over the database, the directory fsynced.
    ///
    /// Returns whether the generation's file itself became the database: then the caller
    /// must give the generation up in its store ([`crate::standby::Store::forget`]),
    /// since the conode writes into that file from its start.
    pub fn install(&self, g: u64, generation_db: &Path) -> Result<bool, String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = Instant::now();
        if std::os::unix::net::UnixStream::connect(&self.admin).is_ok() {
            return Err(format!(
                "the conode is running (its admin socket {} answers): not replacing its database",
                self.admin.display()
            ));
        }
        let data = self
            .db
            .parent()
            .ok_or_else(|| format!("{}: no directory", self.db.display()))?;
        let name = self
            .db
            .file_name()
            .ok_or_else(|| format!("{}: no file name", self.db.display()))?
            .to_string_lossy()
            .to_string();
        let owner = std::fs::metadata(&self.section.data_dir)
            .map_err(|e| format!("conode.data_dir {}: {e}", self.section.data_dir.display()))?;
        let tmp = data.join(format!(".{name}.install-{g}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut linked = false;
        let staged = (|| {
            match std::fs::hard_link(generation_db, &tmp) {
                Ok(()) => linked = true,
                Err(e) => {
                    tracing::info!(
                        "cannot link generation {g} ({}) to {} ({e}): copying it",
                        generation_db.display(),
                        tmp.display()
                    );
                    std::fs::copy(generation_db, &tmp).map_err(|e| {
                        format!(
                            "cannot copy generation {g} ({}) to {}: {e}",
                            generation_db.display(),
                            tmp.display()
                        )
                    })?;
                }
            }
            if nix::unistd::geteuid().is_root() {
                // Root gives the database to the conode's user, owner-only.
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("cannot chmod {}: {e}", tmp.display()))?;
                nix::unistd::chown(
                    &tmp,
                    Some(nix::unistd::Uid::from_raw(owner.uid())),
                    Some(nix::unistd::Gid::from_raw(owner.gid())),
                )
                .map_err(|e| {
                    format!(
                        "cannot give {} to the data directory's owner: {e}",
                        tmp.display()
                    )
                })
            } else {
                // failoverd's own user (the packaged units) shares the data directory's
                // group with the conode: the database becomes the group's, 0660.
                nix::unistd::chown(&tmp, None, Some(nix::unistd::Gid::from_raw(owner.gid())))
                    .map_err(|e| {
                        format!(
                            "cannot give {} to the data directory's group (gid {}): {e}; failoverd's user must be in that group",
                            tmp.display(),
                            owner.gid()
                        )
                    })?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
                    .map_err(|e| format!("cannot chmod {}: {e}", tmp.display()))
            }
        })();
        if let Err(e) = staged {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("{e}; the current database was not touched"));
        }
        let replaced = data.join(format!("{name}.replaced"));
        // The previous replaced database is deleted after the install, not by the rename
        // over it: freeing a large file's blocks takes tens of milliseconds.
        let discarded = data.join(format!(".{name}.replaced.old"));
        let discard = replaced.exists() && std::fs::rename(&replaced, &discarded).is_ok();
        if self.db.exists() {
            let link = data.join(format!(".{name}.replaced.tmp"));
            let _ = std::fs::remove_file(&link);
            let kept = std::fs::hard_link(&self.db, &link)
                .and_then(|()| std::fs::rename(&link, &replaced));
            if let Err(e) = kept {
                let _ = std::fs::remove_file(&link);
                let _ = std::fs::remove_file(&tmp);
                return Err(format!(
                    "cannot keep the current database as {}: {e}; it was not touched",
                    replaced.display()
                ));
            }
        }
        if let Err(e) = std::fs::rename(&tmp, &self.db) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "cannot rename {} to {}: {e}; the current database was not touched",
                tmp.display(),
                self.db.display()
            ));
        }
        let renamed = t.elapsed();
        std::fs::File::open(data)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot fsync {}: {e}", data.display()))?;
        if discard {
            std::thread::spawn(move || {
                if let Err(e) = std::fs::remove_file(&discarded) {
                    tracing::warn!("cannot remove {}: {e}", discarded.display());
                }
            });
        }
        if !linked {
            let db = self.db.clone();
            std::thread::spawn(move || {
                if let Err(e) = std::fs::File::open(&db).and_then(|f| f.sync_data()) {
                    tracing::warn!("fsync of the installed database {}: {e}", db.display());
                }
            });
        }
        tracing::info!(
            "generation {g} installed as the conode's database {} ({} and renamed after {renamed:?}, directory fsynced after {:?}; the one it replaced kept as {})",
            self.db.display(),
            if linked { "linked" } else { "copied" },
            t.elapsed(),
            replaced.display()
        );
        Ok(linked)
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
