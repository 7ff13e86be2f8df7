//! The operator's commands: `setup`, `check`, `status`, `snapshot`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{self, Config, TemplateArgs, Transport};
use crate::daemon::control_request;

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    /// Where to write the key (default: failoverd.key beside the configuration).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
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
    #[arg(long, default_value = "0.0.0.0:7770")]
    pub listen: String,
    #[arg(long, default_value = "127.0.0.1:7771")]
    pub metrics: String,
    #[arg(long, default_value = "eth0")]
    pub interface: String,
    #[arg(long, value_enum, default_value = "https")]
    pub transport: TransportArg,
    #[arg(long, default_value = "")]
    pub ssh_target: String,
    #[arg(long, default_value = "")]
    pub ssh_inbox: String,
    /// Replace an existing configuration and key.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TransportArg {
    Https,
    Rsync,
    Scp,
}

pub fn setup(config_path: &Path, a: &SetupArgs) -> Result<(), String> {
    let key_file = a.key_file.clone().unwrap_or_else(|| {
        config_path
            .parent()
            .unwrap_or(Path::new("."))
            .join("failoverd.key")
    });
    for p in [config_path, key_file.as_path()] {
        if p.exists() && !a.force {
            return Err(format!(
                "{} exists: not overwriting it (use --force to replace it; a new key must then be pinned on the peer again)",
                p.display()
            ));
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
        transport,
        ssh_target: &a.ssh_target,
        ssh_inbox: &a.ssh_inbox,
    });
    // Check what we are about to write parses (a bad flag value shows here, not at start).
    Config::parse(config_path, &text)?;
    conode::config::write_atomic(&key_file, config::key_file_text(&key).as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
    conode::config::write_atomic(config_path, text.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    println!(
        "wrote {} and {} (0600)",
        config_path.display(),
        key_file.display()
    );
    println!("public key of this host (pin it as peer.public_key on the other host):");
    println!("{}", key.public_hex());
    Ok(())
}

/// Print every finding; an error if any is an error.
pub async fn check(config_path: &Path) -> Result<(), String> {
    let cfg = Config::load(config_path)?;
    let mut errors = 0;
    let mut err = |m: String| {
        println!("error: {m}");
        errors += 1;
    };
    for p in cfg.problems() {
        err(p);
    }
    match config::load_key(&cfg.key_file) {
        Ok(k) => {
            if cfg.peer_key().ok() == Some(k.public_bytes()) {
                err("peer.public_key is this host's own key: pin the other host's key".into());
            } else {
                println!(
                    "ok: key_file {} (public {})",
                    cfg.key_file.display(),
                    k.public_hex()
                );
            }
        }
        Err(e) => err(e),
    }
    match cfg.conode_paths() {
        Ok(p) => {
            println!(
                "ok: conode.config {} (conode {})",
                cfg.conode.config.display(),
                hex::encode(p.public)
            );
            if !cfg.conode.data_dir.is_dir() {
                err(format!(
                    "conode.data_dir {}: not a directory",
                    cfg.conode.data_dir.display()
                ));
            }
            match tokio::time::timeout(Duration::from_secs(5), conode::admin::fetch_position(&p.admin)).await {
                Ok(Ok(a)) => println!(
                    "ok: conode admin socket {} answers ({} chains): this host is live",
                    p.admin.display(),
                    a.positions.len()
                ),
                Ok(Err(e)) => println!(
                    "warning: conode admin socket {}: {e} (expected on the standby, where the conode is stopped; on the live host, start the conode)",
                    p.admin.display()
                ),
                Err(_) => println!("warning: conode admin socket {}: no answer within 5 s", p.admin.display()),
            }
        }
        Err(e) => err(e),
    }
    if cfg.vip.interface.is_empty() {
        println!(
            "warning: vip.interface is empty: name the interface that will carry the virtual IP"
        );
    } else if Path::new("/sys/class/net")
        .join(&cfg.vip.interface)
        .exists()
    {
        println!("ok: vip.interface {} exists", cfg.vip.interface);
    } else {
        err(format!(
            "vip.interface: no interface named {:?} on this host",
            cfg.vip.interface
        ));
    }
    match std::fs::create_dir_all(&cfg.state_dir) {
        Ok(()) => println!("ok: state_dir {}", cfg.state_dir.display()),
        Err(e) => err(format!("state_dir {}: {e}", cfg.state_dir.display())),
    }
    let tools: &[&str] = match cfg.snapshot.transport {
        Transport::Https => &[],
        Transport::Rsync => &["rsync", "ssh"],
        Transport::Scp => &["scp", "ssh"],
    };
    for t in tools {
        match which(t) {
            Some(p) => println!("ok: {t} is {}", p.display()),
            None => err(format!(
                "snapshot.transport = \"{}\" needs {t}, which is not in PATH (install the Debian package {})",
                cfg.snapshot.transport.name(),
                if *t == "rsync" { "rsync" } else { "openssh-client" }
            )),
        }
    }
    if errors > 0 {
        return Err(format!("{errors} problem(s) in {}", config_path.display()));
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

pub async fn status(config_path: &Path, json: bool) -> Result<(), String> {
    let cfg = Config::load(config_path)?;
    let v = control_request(&cfg.control_socket(), "status").await?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let s = |k: &str| match v.get(k) {
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    };
    println!("role:       {}", s("role"));
    println!("epoch:      {}", s("epoch"));
    println!("generation: {}", s("generation"));
    println!("age:        {} s", s("age_seconds"));
    println!("size:       {} bytes", s("bytes"));
    println!("duration:   {} ms", s("duration_ms"));
    println!("transport:  {}", s("transport"));
    println!("held:       {}", s("generations_held"));
    println!("error:      {}", s("error"));
    Ok(())
}

pub async fn snapshot(config_path: &Path) -> Result<(), String> {
    let cfg = Config::load(config_path)?;
    let v = control_request(&cfg.control_socket(), "snapshot").await?;
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
