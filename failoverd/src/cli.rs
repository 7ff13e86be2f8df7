//! The operator's commands: `setup`, `check`, `status`, `snapshot`.
//!
//! Each returns a [`Failure`], whose [`Failure::exit_code`] is failoverd's exit status:
//! 2 for a configuration error (restarting will not help: failoverd.service does not
//! restart on 2), 1 for a command that ran and failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{self, ConfigError, RawConfig, TemplateArgs, Transport};
use crate::daemon::control_request;

/// Why a command failed; [`Failure::exit_code`] gives the exit status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    /// Bad usage or configuration: failoverd.toml missing, unreadable or invalid, a bad
    /// environment value, a key file or conode configuration that cannot be read.
    #[error("{0}")]
    Config(String),
    /// The command ran and failed: the daemon refused or did not answer, a task died.
    #[error("{0}")]
    Failed(String),
}

impl Failure {
    /// 2 for configuration errors, 1 for failures, as `failoverd --help` documents.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) => 2,
            Failure::Failed(_) => 1,
        }
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Failed(e)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e.to_string())
    }
}

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    /// Where to write the key (default: failoverd.key beside the configuration).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// failoverd's own directory (generations held as standby, the inbox, the control
    /// socket); `run` creates it.
    #[arg(long, default_value = "/var/lib/failoverd")]
    pub state_dir: PathBuf,
    /// The conode's private.toml (default: the conode's default).
    #[arg(long)]
    pub conode_config: Option<PathBuf>,
    /// The conode's data directory (default: the conode's default).
    #[arg(long)]
    pub conode_data_dir: Option<PathBuf>,
    /// The other host's failoverd peer port, host:port.
    #[arg(long, default_value = "")]
    pub peer: String,
    /// The other host's failoverd public key (hex), if already known.
    #[arg(long, default_value = "")]
    pub peer_key: String,
    /// This host's address and failoverd's peer port (not the conode's 7770/7771); empty:
    /// this host's address towards --peer, port 7780.
    #[arg(long, default_value = "")]
    pub listen: String,
    /// Where Prometheus /metrics listens (ip:port); empty turns it off.
    #[arg(long, default_value = "127.0.0.1:7781")]
    pub metrics: String,
    /// The interface that carries the virtual IP.
    #[arg(long, default_value = "eth0")]
    pub interface: String,
    /// The virtual IP with its prefix length (e.g. 10.0.0.1/24; IPv6 too): the conode's
    /// Address. Empty: no address is managed (e.g. a DNS name moved by a hook).
    #[arg(long, default_value = "")]
    pub vip: String,
    /// How snapshots travel to the standby: built-in HTTPS, or rsync/scp over ssh.
    #[arg(long, value_enum, default_value = "https")]
    pub transport: TransportArg,
    /// rsync/scp: the standby as user@host.
    #[arg(long, default_value = "")]
    pub ssh_target: String,
    /// rsync/scp: the standby's inbox directory (its state_dir/inbox).
    #[arg(long, default_value = "")]
    pub ssh_inbox: String,
    /// Replace an existing configuration and key.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TransportArg {
    /// Built in: HTTPS to the peer's failoverd, both sides pinned to their keys.
    Https,
    /// rsync over ssh into the standby's inbox.
    Rsync,
    /// scp over ssh into the standby's inbox.
    Scp,
}

pub fn setup(config_path: &Path, a: &SetupArgs) -> Result<(), Failure> {
    let key_file = a.key_file.clone().unwrap_or_else(|| {
        config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("failoverd.key")
    });
    for p in [config_path, key_file.as_path()] {
        if p.exists() && !a.force {
            return Err(Failure::Failed(format!(
                "{} exists: not overwriting it (use --force to replace it; a new key must then be pinned on the peer again)",
                p.display()
            )));
        }
    }
    if let Some(d) = config_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    let key =
        conode::keys::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let conode_config = a
        .conode_config
        .clone()
        .unwrap_or_else(|| conode::config::default_config_dir().join("private.toml"));
    let conode_data_dir = a
        .conode_data_dir
        .clone()
        .unwrap_or_else(conode::config::data_dir);
    let transport = match a.transport {
        TransportArg::Https => Transport::Https,
        TransportArg::Rsync => Transport::Rsync,
        TransportArg::Scp => Transport::Scp,
    };
    let text = config::template(&TemplateArgs {
        key_file: &key_file,
        state_dir: &a.state_dir,
        conode_config: &conode_config,
        conode_data_dir: &conode_data_dir,
        peer_address: &a.peer,
        peer_key: &a.peer_key,
        listen_peer: &a.listen,
        listen_metrics: &a.metrics,
        interface: &a.interface,
        vip: &a.vip,
        transport,
        ssh_target: &a.ssh_target,
        ssh_inbox: &a.ssh_inbox,
    });
    // Check what we are about to write parses (a bad flag value shows here, not at start).
    // What is written must parse; what is still to fill in (the peer's key, ssh for
    // rsync/scp) is listed after writing, and `failoverd check` names it again.
    // A flag value that makes an invalid configuration is bad usage (exit status 2).
    let raw = RawConfig::parse(config_path, &text)?;
    let todo = raw
        .validate(config_path, |_| None)
        .err()
        .unwrap_or_default();
    conode::config::write_atomic(&key_file, config::key_file_text(&key).as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
    conode::config::write_atomic(config_path, text.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    println!(
        "wrote {} and {} (0600)",
        config_path.display(),
        key_file.display()
    );
    for p in &todo {
        println!("to do: {p}");
    }
    println!("public key of this host (pin it as peer.public_key on the other host):");
    println!("{}", key.public_hex());
    Ok(())
}

/// Print every finding; an error if any is an error. Changes nothing.
/// Every problem is exit status 1, also a file that cannot be read or parsed: judging
/// the configuration is what `check` is for.
pub async fn check(config_path: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let raw = RawConfig::load(config_path).map_err(|e| e.to_string())?;
    let mut errors = 0;
    let mut err = |m: String| {
        println!("error: {m}");
        errors += 1;
    };
    let cfg = match raw.clone().validate(config_path, |k| std::env::var(k).ok()) {
        Ok(c) => Some(c),
        Err(problems) => {
            for p in problems {
                err(p.to_string());
            }
            None
        }
    };
    match config::load_key(&raw.key_file) {
        Ok(k) => {
            if cfg.as_ref().map(|c| c.peer.public_key) == Some(k.public_bytes()) {
                err("peer.public_key is this host's own key: pin the other host's key".into());
            } else {
                println!(
                    "ok: key_file {} (public {})",
                    raw.key_file.display(),
                    k.public_hex()
                );
            }
        }
        Err(e) => err(e),
    }
    match config::conode_paths(&raw.conode.config, &raw.conode.data_dir) {
        Ok(p) => {
            println!(
                "ok: conode.config {} (conode {})",
                raw.conode.config.display(),
                hex::encode(p.public)
            );
            if !raw.conode.data_dir.is_dir() {
                err(format!(
                    "conode.data_dir {}: not a directory",
                    raw.conode.data_dir.display()
                ));
            }
            let wait = cfg
                .as_ref()
                .map_or(Duration::from_secs(5), |c| c.timeouts.conode);
            match tokio::time::timeout(wait, conode::admin::fetch_position(&p.admin)).await {
                Ok(Ok(a)) => println!(
                    "ok: conode admin socket {} answers ({} chains): this host is live",
                    p.admin.display(),
                    a.positions.len()
                ),
                Ok(Err(e)) => println!(
                    "warning: conode admin socket {}: {e} (expected on the standby, where the conode is stopped; on the live host, start the conode)",
                    p.admin.display()
                ),
                Err(_) => println!(
                    "warning: conode admin socket {}: no answer within {wait:?}",
                    p.admin.display()
                ),
            }
        }
        Err(e) => err(e),
    }
    if !raw.vip.address.trim().is_empty() && !raw.vip.interface.is_empty() {
        match crate::vip::Vip::parse(&raw.vip.interface, &raw.vip.address) {
            Err(e) => err(format!("vip.address: {e}")),
            Ok(v) => match crate::vip::check(&v).await {
                Ok(()) => println!(
                    "ok: vip {} on {} (in one of its subnets; CAP_NET_ADMIN and CAP_NET_RAW held)",
                    v.cidr(),
                    v.interface
                ),
                Err(problems) => {
                    for p in problems {
                        err(p);
                    }
                }
            },
        }
    } else if raw.vip.interface.is_empty() {
        println!(
            "warning: vip.interface is empty: name the interface that will carry the virtual IP"
        );
    } else if Path::new("/sys/class/net")
        .join(&raw.vip.interface)
        .exists()
    {
        println!("ok: vip.interface {} exists", raw.vip.interface);
    } else {
        err(format!(
            "vip.interface: no interface named {:?} on this host",
            raw.vip.interface
        ));
    }
    // Nothing is created here: the daemon creates what is missing at start.
    if raw.state_dir.is_dir() {
        println!("ok: state_dir {}", raw.state_dir.display());
    } else if raw.state_dir.exists() {
        err(format!(
            "state_dir {}: exists but is not a directory",
            raw.state_dir.display()
        ));
    } else {
        println!(
            "ok: state_dir {} does not exist yet: `failoverd run` creates it",
            raw.state_dir.display()
        );
    }
    let tools: &[&str] = match raw.snapshot.transport {
        Transport::Https => &[],
        Transport::Rsync => &["rsync", "ssh"],
        Transport::Scp => &["scp", "ssh"],
    };
    for t in tools {
        match which(t) {
            Some(p) => println!("ok: {t} is {}", p.display()),
            None => err(format!(
                "snapshot.transport = \"{}\" needs {t}, which is not in PATH (install the Debian package {})",
                raw.snapshot.transport.name(),
                if *t == "rsync" { "rsync" } else { "openssh-client" }
            )),
        }
    }
    // Each hook's program exists and may be run (the command line itself runs only
    // when its event comes).
    for (key, command) in [
        ("hooks.on_role_change", &raw.hooks.on_role_change),
        ("hooks.on_health_change", &raw.hooks.on_health_change),
        ("hooks.on_conflict", &raw.hooks.on_conflict),
    ] {
        let Some(program) = command.split_whitespace().next() else {
            continue;
        };
        match std::fs::metadata(program) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                println!("ok: {key} runs {program}")
            }
            Ok(_) => err(format!("{key}: {program} is not an executable file")),
            Err(e) => err(format!("{key}: {program}: {e}")),
        }
    }
    if errors > 0 {
        return Err(Failure::Failed(format!(
            "{errors} problem(s) in {}",
            config_path.display()
        )));
    }
    println!("ok: {} is usable", config_path.display());
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// `println!` into a `String` (writing into a String cannot fail).
macro_rules! outln {
    ($o:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($arg)*);
    }};
}

/// Write `out` to standard output; a reader that went away (`| head`) is no error.
pub fn emit(out: &[u8]) -> Result<(), String> {
    use std::io::Write;
    match std::io::stdout().write_all(out) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to standard output: {e}"))
        }
        _ => Ok(()),
    }
}

pub async fn status(config_path: &Path, json: bool) -> Result<(), Failure> {
    let mut o = String::new();
    let raw = RawConfig::load(config_path)?;
    let v = control_request(&config::control_socket(&raw.state_dir), "status").await?;
    if json {
        outln!(o, "{v}");
        return Ok(emit(o.as_bytes())?);
    }
    let s = |k: &str| match v.get(k) {
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    };
    outln!(o, "role:       {}", s("role"));
    outln!(o, "epoch:      {}", s("epoch"));
    outln!(o, "vip held:   {}", s("vip_held"));
    outln!(o, "doing:      {}", s("doing"));
    if let Some(p) = v.get("peer").filter(|p| !p.is_null()) {
        outln!(
            o,
            "peer:       {} (epoch {}, {}, newest generation {})",
            if p["reachable"] == true {
                "reachable"
            } else {
                "unreachable"
            },
            p["epoch"],
            if p["live"] == true { "live" } else { "standby" },
            p["newest_generation"]
        );
    }
    if let Some(hs) = v.get("health").and_then(|h| h.as_array()) {
        for h in hs {
            outln!(
                o,
                "health:     {} {}: {}",
                h["check"].as_str().unwrap_or("-"),
                if h["ok"] == true { "ok" } else { "FAILING" },
                h["reason"].as_str().unwrap_or("-")
            );
        }
    }
    outln!(o, "newest verified generation: {}", s("newest_generation"));
    outln!(o, "generation: {}", s("generation"));
    outln!(o, "age:        {} s", s("age_seconds"));
    outln!(o, "size:       {} bytes", s("bytes"));
    outln!(o, "duration:   {} ms", s("duration_ms"));
    outln!(o, "transport:  {}", s("transport"));
    outln!(o, "held:       {}", s("generations_held"));
    outln!(o, "error:      {}", s("error"));
    Ok(emit(o.as_bytes())?)
}

pub async fn snapshot(config_path: &Path) -> Result<(), Failure> {
    let raw = RawConfig::load(config_path)?;
    let v = control_request(&config::control_socket(&raw.state_dir), "snapshot").await?;
    println!(
        "generation {} installed on the peer: {} bytes, {} sent over {}, {} ms",
        v["generation"],
        v["bytes"],
        v["bytes_sent"],
        v["transport"].as_str().unwrap_or("-"),
        v["duration_ms"]
    );
    Ok(())
}

/// `switchover`, `promote [--force]`, `demote`: ask the daemon, print what it did.
pub async fn command(config_path: &Path, line: &str) -> Result<(), Failure> {
    let raw = RawConfig::load(config_path)?;
    let v = control_request(&config::control_socket(&raw.state_dir), line).await?;
    println!("{}", v["message"].as_str().unwrap_or("done"));
    Ok(())
}

/// `release-vip`: the one-shot that makes sure the address is gone when the daemon is
/// not running (the unit's `ExecStopPost=`, also after a kill). It removes the address
/// only if it carries failoverd's tag, and then stops the conode unit
/// (`[conode] control = "systemd"`; a no-op when it is stopped): a host without a running
/// failoverd is a standby. An untagged copy of the address (another host's) leaves both
/// alone. Refuses
/// while a failoverd runs on this state directory (`failoverd demote` is the way then).
pub async fn release_vip(config_path: &Path) -> Result<(), Failure> {
    let cfg = crate::config::Config::load(config_path)?;
    let dir = cfg.state_dir.clone();
    let lock = tokio::task::spawn_blocking(move || crate::daemon::StateLock::acquire(&dir))
        .await
        .map_err(|e| format!("the lock task failed: {e}"))?
        .map_err(|e| {
            if e.contains("in use by another failoverd") {
                format!("{e}; while it runs, `failoverd demote` drops the address")
            } else {
                e
            }
        })?;
    match cfg.vip_cidr() {
        None => println!("no [vip] address is configured: no address to release"),
        Some(cidr) => {
            let v = crate::vip::Vip::parse(&cfg.vip.interface, &cidr).map_err(|e| e.to_string())?;
            let present = v.present().await.map_err(|e| e.to_string())?;
            if !present.is_present() {
                println!("{} is not on {}: nothing to release", v.cidr(), v.interface);
            } else if !present.is_ours() {
                // Another host's, or an operator's: neither it nor the conode is ours to touch.
                println!(
                    "{} is on {} but was not added by failoverd (no IFA_PROTO tag): left alone",
                    v.cidr(),
                    v.interface
                );
                return Ok(());
            } else {
                v.remove().await.map_err(|e| e.to_string())?;
                println!("removed {} from {}", v.cidr(), v.interface);
            }
        }
    }
    drop(lock);
    // No failoverd runs to defend the address: this host is a standby, its conode stopped.
    let paths = cfg.conode_paths().map_err(Failure::Config)?;
    let conode = crate::conode_ctl::Conode::new(cfg.conode.clone(), paths.admin, paths.db);
    match &cfg.conode.control {
        crate::config::ConodeControl::Systemd { unit } => {
            conode
                .stop(cfg.conode_timeout())
                .await
                .map_err(|e| format!("the address is released, but stopping {unit} failed: {e}"))?;
            println!("stopped {unit}: this host is a standby");
        }
        crate::config::ConodeControl::Child { .. } => {
            if conode.answers().await {
                println!("the conode (failoverd's child) still answers on its admin socket: stop it (under systemd it stops with failoverd's unit)");
            } else {
                println!("the conode does not run");
            }
        }
    }
    Ok(())
}
