//! `failoverd.toml` and the key file: parsing, the commented template written by
//! `failoverd setup`, and the field-by-field checks of `failoverd check`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conode::keys::KeyPair;
use serde::Deserialize;

/// How snapshots travel to the standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Built in: chunks over the peer HTTPS port, resumable, only the chunks the standby
    /// lacks.
    Https,
    /// `rsync --no-whole-file` over ssh into the standby's inbox; the manifest follows over
    /// the peer port.
    Rsync,
    /// `scp` into the standby's inbox; the manifest follows over the peer port.
    Scp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::Rsync => "rsync",
            Transport::Scp => "scp",
        }
    }
}

/// The whole configuration, as read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's Ed25519 key (written by `failoverd setup`, mode 0600).
    pub key_file: PathBuf,
    /// generations/, staging/, inbox/, state and the control socket.
    pub state_dir: PathBuf,
    pub conode: ConodeSection,
    pub peer: PeerSection,
    #[serde(default)]
    pub listen: ListenSection,
    #[serde(default)]
    pub vip: VipSection,
    #[serde(default)]
    pub snapshot: SnapshotSection,
    #[serde(default)]
    pub ssh: SshSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConodeSection {
    /// The conode's `private.toml` (the same identity on both hosts).
    pub config: PathBuf,
    /// The conode's data directory: `<Public hex>.db` and its admin socket.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// `host:port` of the other host's failoverd peer port.
    pub address: String,
    /// The other host's failoverd public key (hex), printed by `failoverd setup` there.
    pub public_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    #[serde(default = "default_peer_listen")]
    pub peer: String,
    /// Prometheus `/metrics`; empty to turn it off.
    #[serde(default = "default_metrics_listen")]
    pub metrics: String,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            peer: default_peer_listen(),
            metrics: default_metrics_listen(),
        }
    }
}

fn default_peer_listen() -> String {
    "0.0.0.0:7770".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:7771".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// The interface that will carry the virtual IP (checked to exist).
    #[serde(default)]
    pub interface: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSection {
    /// How often the live host checks for new commits and ships a snapshot of them.
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// Generations kept on the standby (at least 1).
    #[serde(default = "default_keep")]
    pub keep: usize,
}

impl Default for SnapshotSection {
    fn default() -> Self {
        SnapshotSection {
            interval: default_interval(),
            transport: default_transport(),
            keep: default_keep(),
        }
    }
}

fn default_interval() -> String {
    "2s".into()
}
fn default_transport() -> Transport {
    Transport::Https
}
fn default_keep() -> usize {
    3
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshSection {
    /// `user@host` of the standby, for rsync and scp.
    #[serde(default)]
    pub target: String,
    /// The standby's inbox directory (its `state_dir/inbox`).
    #[serde(default)]
    pub inbox: String,
    /// Extra ssh arguments, e.g. `["-i", "/etc/failoverd/id_ed25519", "-p", "22"]`.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Parse `"250ms"`, `"2s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit: write e.g. \"2s\", \"500ms\", \"5m\""))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?} is zero"));
    }
    Ok(d)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    format!(
                        ":{}",
                        text[..s.start.min(text.len())].lines().count().max(1)
                    )
                })
                .unwrap_or_default();
            format!("{}{line}: {}", path.display(), e.message())
        })
    }

    pub fn interval(&self) -> Duration {
        parse_duration(&self.snapshot.interval).unwrap_or(Duration::from_secs(2))
    }

    pub fn peer_key(&self) -> Result<[u8; 32], String> {
        conode::keys::parse_hex32(self.peer.public_key.trim()).map_err(|e| {
            if self.peer.public_key.trim().is_empty() {
                "peer.public_key is empty: pin the other host's key (printed by `failoverd setup` there)".to_string()
            } else {
                format!("peer.public_key: {e}")
            }
        })
    }

    pub fn generations_dir(&self) -> PathBuf {
        self.state_dir.join("generations")
    }
    pub fn staging_dir(&self) -> PathBuf {
        self.state_dir.join("staging")
    }
    pub fn inbox_dir(&self) -> PathBuf {
        self.state_dir.join("inbox")
    }
    pub fn outgoing_dir(&self) -> PathBuf {
        self.state_dir.join("outgoing")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    /// The conode's identity, database path and admin socket.
    pub fn conode_paths(&self) -> Result<ConodePaths, String> {
        let pc = conode::config::PrivateConfig::load(&self.conode.config)
            .map_err(|e| format!("conode.config: {e}"))?;
        let public = pc.keys.public_bytes();
        let db = self
            .conode
            .data_dir
            .join(conode::config::db_file_name(&public));
        let admin = conode::admin::admin_socket_path(&db, &public);
        Ok(ConodePaths { public, db, admin })
    }

    /// Every problem in the configuration itself (not the environment), one line each,
    /// naming the field.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = parse_duration(&self.snapshot.interval) {
            p.push(format!("snapshot.interval: {e}"));
        }
        if self.snapshot.keep == 0 {
            p.push("snapshot.keep: must be at least 1 (generations kept on the standby)".into());
        }
        if let Err(e) = self.peer_key() {
            p.push(e);
        }
        if self.peer.address.trim().is_empty() {
            p.push("peer.address: empty: write the other host's failoverd as host:port".into());
        } else if !self.peer.address.contains(':') {
            p.push(format!(
                "peer.address: {:?} has no port: write host:port",
                self.peer.address
            ));
        }
        if let Err(e) = self.listen.peer.parse::<SocketAddr>() {
            p.push(format!(
                "listen.peer: {:?} is not ip:port ({e})",
                self.listen.peer
            ));
        }
        if !self.listen.metrics.is_empty() {
            if let Err(e) = self.listen.metrics.parse::<SocketAddr>() {
                p.push(format!(
                    "listen.metrics: {:?} is not ip:port ({e}); leave it empty to turn metrics off",
                    self.listen.metrics
                ));
            }
        }
        if !self.state_dir.is_absolute() {
            p.push(format!(
                "state_dir: {} is not an absolute path",
                self.state_dir.display()
            ));
        }
        if matches!(self.snapshot.transport, Transport::Rsync | Transport::Scp) {
            if self.ssh.target.trim().is_empty() {
                p.push(format!(
                    "ssh.target: empty, but snapshot.transport = \"{}\" needs user@standby",
                    self.snapshot.transport.name()
                ));
            }
            if !self.ssh.inbox.starts_with('/') {
                p.push(format!(
                    "ssh.inbox: {:?} must be the absolute path of the standby's inbox (its state_dir/inbox)",
                    self.ssh.inbox
                ));
            }
        }
        p
    }
}

/// Where the conode keeps things on this host.
#[derive(Debug, Clone)]
pub struct ConodePaths {
    pub public: [u8; 32],
    pub db: PathBuf,
    pub admin: PathBuf,
}

// ---------------------------------------------------------------------------------------
// The key file.

/// Read this host's key: `private = "<hex>"` and `public = "<hex>"` (TOML). Refuses a
/// file that others can read.
pub fn load_key(path: &Path) -> Result<KeyPair, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("key_file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "key_file {}: mode {:o} lets others read the key: chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct KeyFile {
        private: String,
        public: String,
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("key_file {}: {e}", path.display()))?;
    let k: KeyFile = toml::from_str(&text)
        .map_err(|e| format!("key_file {}: {}", path.display(), e.message()))?;
    KeyPair::from_go_hex(&k.private, &k.public)
        .map_err(|e| format!("key_file {}: {e}", path.display()))
}

pub fn key_file_text(k: &KeyPair) -> String {
    format!(
        "# failoverd key of this host. Keep it secret (mode 0600); pin `public` in the\n# other host's failoverd.toml (peer.public_key).\nprivate = \"{}\"\npublic = \"{}\"\n",
        k.private_hex(),
        k.public_hex()
    )
}

/// What `failoverd setup` writes, with every field explained.
pub struct TemplateArgs<'a> {
    pub key_file: &'a Path,
    pub state_dir: &'a Path,
    pub conode_config: &'a Path,
    pub conode_data_dir: &'a Path,
    pub peer_address: &'a str,
    pub peer_key: &'a str,
    pub listen_peer: &'a str,
    pub listen_metrics: &'a str,
    pub interface: &'a str,
    pub transport: Transport,
    pub ssh_target: &'a str,
    pub ssh_inbox: &'a str,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub fn template(a: &TemplateArgs) -> String {
    format!(
        r#"# failoverd configuration (written by `failoverd setup`). Check it with
#   failoverd -c THIS_FILE check

# This host's failoverd key (Ed25519), mode 0600. Its public half is pinned on the peer.
key_file = {key_file}
# failoverd's own directory: generations/ (snapshots held as standby), staging/, inbox/
# (where rsync and scp land), the control socket and the generation counter.
state_dir = {state_dir}

[conode]
# The conode's private.toml on this host: both hosts run the same identity.
config = {conode_config}
# The conode's data directory: <Public hex>.db and its admin socket live there.
data_dir = {conode_data_dir}

[peer]
# The other host's failoverd peer port, host:port.
address = {peer_address}
# The other host's failoverd public key, printed by `failoverd setup` there. Nothing is
# served to, or accepted from, a host without this key.
public_key = {peer_key}

[listen]
# Peer port (HTTPS, both sides authenticated by their pinned keys).
peer = {listen_peer}
# Prometheus metrics at http://ADDRESS/metrics; keep it on loopback, or "" for none.
metrics = {listen_metrics}

[vip]
# The interface that will carry the virtual IP.
interface = {interface}

[snapshot]
# How often the live host looks for new commits; a snapshot is shipped when the
# conode's chains moved (and at least once at start).
interval = "2s"
# "https" (built in: resumable, sends only the chunks the standby lacks),
# "rsync" (rsync --no-whole-file over ssh) or "scp". The standby verifies the same way.
transport = "{transport}"
# Verified generations kept on the standby.
keep = 3

[ssh]
# For transport = "rsync" or "scp": the standby as user@host, its inbox directory
# (the standby's state_dir + "/inbox"), and extra ssh arguments (key, port, known_hosts).
target = {ssh_target}
inbox = {ssh_inbox}
args = []
"#,
        key_file = q(&a.key_file.display().to_string()),
        state_dir = q(&a.state_dir.display().to_string()),
        conode_config = q(&a.conode_config.display().to_string()),
        conode_data_dir = q(&a.conode_data_dir.display().to_string()),
        peer_address = q(a.peer_address),
        peer_key = q(a.peer_key),
        listen_peer = q(a.listen_peer),
        listen_metrics = q(a.listen_metrics),
        interface = q(a.interface),
        transport = a.transport.name(),
        ssh_target = q(a.ssh_target),
        ssh_inbox = q(a.ssh_inbox),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args<'a>() -> TemplateArgs<'a> {
        TemplateArgs {
            key_file: Path::new("/etc/failoverd/failoverd.key"),
            state_dir: Path::new("/var/lib/failoverd"),
            conode_config: Path::new("/etc/conode/private.toml"),
            conode_data_dir: Path::new("/var/lib/conode"),
            peer_address: "10.0.0.2:7770",
            peer_key: "",
            listen_peer: "0.0.0.0:7770",
            listen_metrics: "127.0.0.1:7771",
            interface: "eth0",
            transport: Transport::Https,
            ssh_target: "",
            ssh_inbox: "",
        }
    }

    #[test]
    fn the_template_parses_and_names_what_is_missing() {
        let c = Config::parse(Path::new("f.toml"), &template(&args())).unwrap();
        assert_eq!(c.snapshot.transport, Transport::Https);
        assert_eq!(c.interval(), Duration::from_secs(2));
        let p = c.problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("peer.public_key is empty"), "{p:?}");
    }

    #[test]
    fn problems_name_their_field() {
        let mut a = args();
        a.transport = Transport::Rsync;
        a.peer_key = "zz";
        a.listen_metrics = "localhost";
        let mut text = template(&a);
        text = text.replace("interval = \"2s\"", "interval = \"2 parsecs\"");
        text = text.replace("keep = 3", "keep = 0");
        let c = Config::parse(Path::new("f.toml"), &text).unwrap();
        let p = c.problems().join("\n");
        for field in [
            "snapshot.interval",
            "snapshot.keep",
            "peer.public_key",
            "listen.metrics",
            "ssh.target",
            "ssh.inbox",
        ] {
            assert!(p.contains(field), "{field} missing from:\n{p}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_types_are_errors_with_a_line() {
        let text = template(&args()).replace("keep = 3", "keep = 3\nkepp = 4");
        let e = Config::parse(Path::new("f.toml"), &text).unwrap_err();
        assert!(e.contains("f.toml:") && e.contains("kepp"), "{e}");
        let text = template(&args()).replace("transport = \"https\"", "transport = \"ftp\"");
        let e = Config::parse(Path::new("f.toml"), &text).unwrap_err();
        assert!(e.contains("ftp"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        for bad in ["", "5", "s", "0s", "3 days", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_file_round_trip_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let k = KeyPair::generate().unwrap();
        std::fs::write(&p, key_file_text(&k)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_key(&p).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_key(&p).unwrap().public_bytes(), k.public_bytes());
    }
}
