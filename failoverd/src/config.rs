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

/// `failoverd.toml` as written: strings, checked by [`RawConfig::validate`] into a
/// [`Config`]. Unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This host's Ed25519 key (written by `failoverd setup`, mode 0600).
    pub key_file: PathBuf,
    /// generations/, staging/, inbox/, state and the control socket.
    pub state_dir: PathBuf,
    pub conode: RawConode,
    pub peer: RawPeer,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub vip: RawVip,
    #[serde(default)]
    pub snapshot: RawSnapshot,
    #[serde(default)]
    pub ssh: RawSsh,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub failover: RawFailover,
    #[serde(default)]
    pub hooks: RawHooks,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHooks {
    #[serde(default)]
    pub on_role_change: String,
    #[serde(default)]
    pub on_health_change: String,
    #[serde(default)]
    pub on_conflict: String,
    #[serde(default = "defaults::hook_timeout")]
    pub timeout: String,
}

impl Default for RawHooks {
    fn default() -> Self {
        RawHooks {
            on_role_change: String::new(),
            on_health_change: String::new(),
            on_conflict: String::new(),
            timeout: defaults::hook_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConode {
    pub config: PathBuf,
    pub data_dir: PathBuf,
    #[serde(default = "defaults::control")]
    pub control: String,
    #[serde(default = "defaults::unit")]
    pub unit: String,
    #[serde(default = "defaults::binary")]
    pub binary: PathBuf,
    #[serde(default = "defaults::user")]
    pub user: String,
}

/// The conode of this host.
#[derive(Debug, Clone)]
pub struct ConodeSection {
    /// The conode's `private.toml` (the same identity on both hosts).
    pub config: PathBuf,
    /// The conode's data directory: `<Public hex>.db` and its admin socket.
    pub data_dir: PathBuf,
    /// How failoverd starts and stops it.
    pub control: ConodeControl,
}

/// How failoverd starts and stops the conode (`[conode] control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConodeControl {
    /// `systemctl start|stop unit`.
    Systemd { unit: String },
    /// A child process of failoverd running `binary` as `user` (not root).
    Child { binary: PathBuf, user: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVip {
    #[serde(default)]
    pub interface: String,
    #[serde(default)]
    pub address: String,
    #[serde(default = "defaults::probe_count")]
    pub probe_count: u32,
    #[serde(default = "defaults::probe_interval")]
    pub probe_interval: String,
    #[serde(default = "defaults::probe_wait")]
    pub probe_wait: String,
}

impl Default for RawVip {
    fn default() -> Self {
        RawVip {
            interface: String::new(),
            address: String::new(),
            probe_count: defaults::probe_count(),
            probe_interval: defaults::probe_interval(),
            probe_wait: defaults::probe_wait(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    #[serde(default = "defaults::heartbeat")]
    pub heartbeat: String,
    #[serde(default = "defaults::peer_timeout")]
    pub peer_timeout: String,
    #[serde(default = "defaults::handover_timeout")]
    pub handover_timeout: String,
}

impl Default for RawFailover {
    fn default() -> Self {
        RawFailover {
            heartbeat: defaults::heartbeat(),
            peer_timeout: defaults::peer_timeout(),
            handover_timeout: defaults::handover_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub address: String,
    pub public_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    #[serde(default = "defaults::listen_peer")]
    pub peer: String,
    #[serde(default = "defaults::listen_metrics")]
    pub metrics: String,
}

impl Default for RawListen {
    fn default() -> Self {
        RawListen {
            peer: defaults::listen_peer(),
            metrics: defaults::listen_metrics(),
        }
    }
}

/// The virtual IP.
#[derive(Debug, Clone)]
pub struct VipSection {
    /// The interface that carries it.
    pub interface: String,
    /// `address/prefix`; `None` when `[vip] address` is empty (no address is managed:
    /// a claim then only starts the conode).
    pub address: Option<(std::net::IpAddr, u8)>,
    /// The ARP probe before a claim: this many probes, this far apart, then this wait.
    pub probe_count: u32,
    pub probe_interval: Duration,
    pub probe_wait: Duration,
}

/// `[hooks]`, validated (run by [`crate::hooks`]).
#[derive(Debug, Clone, Default)]
pub struct HooksSection {
    /// Run when the role changed (live ↔ standby), once the change is complete.
    pub on_role_change: Option<String>,
    /// Run when a health verdict changed (and on a first verdict that fails).
    pub on_health_change: Option<String>,
    /// Run when another MAC answered ARP for the address this host holds.
    pub on_conflict: Option<String>,
    /// How long a hook may run before it is killed.
    pub timeout: Duration,
}

impl HooksSection {
    pub fn any(&self) -> bool {
        self.on_role_change.is_some()
            || self.on_health_change.is_some()
            || self.on_conflict.is_some()
    }
}

/// The failover core's timers (`[failover]`).
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// How often this host tells the peer its state.
    pub heartbeat: Duration,
    /// The peer is unreachable after this long without a word.
    pub peer_timeout: Duration,
    /// How long either side of a switchover waits for the other.
    pub handover_timeout: Duration,
}

/// Parse `"10.0.0.1/24"` or `"fd00::1/64"`.
pub fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (a, p) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("{s:?} has no prefix length: write e.g. \"10.0.0.1/24\""))?;
    let addr: std::net::IpAddr = a
        .parse()
        .map_err(|e| format!("{a:?} is not an IP address ({e})"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| format!("{p:?} is not a prefix length of 0 to {max}"))?;
    Ok((addr, prefix))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshot {
    #[serde(default = "defaults::interval")]
    pub interval: String,
    #[serde(default = "defaults::transport")]
    pub transport: Transport,
    #[serde(default = "defaults::keep")]
    pub keep: usize,
}

impl Default for RawSnapshot {
    fn default() -> Self {
        RawSnapshot {
            interval: defaults::interval(),
            transport: defaults::transport(),
            keep: defaults::keep(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub inbox: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "defaults::ssh_timeout")]
    pub timeout: String,
}

impl Default for RawSsh {
    fn default() -> Self {
        RawSsh {
            target: String::new(),
            inbox: String::new(),
            args: Vec::new(),
            timeout: defaults::ssh_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default = "defaults::io_stall")]
    pub io_stall: String,
    #[serde(default = "defaults::connect")]
    pub connect: String,
    #[serde(default = "defaults::answer")]
    pub answer: String,
    #[serde(default = "defaults::conode")]
    pub conode: String,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            io_stall: defaults::io_stall(),
            connect: defaults::connect(),
            answer: defaults::answer(),
            conode: defaults::conode(),
        }
    }
}

/// The defaults, each beside the check of its field in [`RawConfig::validate`].
mod defaults {
    use super::Transport;
    pub fn listen_peer() -> String {
        String::new()
    }
    pub fn listen_metrics() -> String {
        "127.0.0.1:7781".into()
    }
    pub fn interval() -> String {
        "2s".into()
    }
    pub fn transport() -> Transport {
        Transport::Https
    }
    pub fn keep() -> usize {
        3
    }
    pub fn ssh_timeout() -> String {
        "1h".into()
    }
    pub fn io_stall() -> String {
        "30s".into()
    }
    pub fn connect() -> String {
        "5s".into()
    }
    pub fn answer() -> String {
        "10m".into()
    }
    pub fn conode() -> String {
        "5s".into()
    }
    pub fn control() -> String {
        "systemd".into()
    }
    pub fn unit() -> String {
        "conode.service".into()
    }
    pub fn binary() -> std::path::PathBuf {
        "/usr/bin/conode".into()
    }
    pub fn user() -> String {
        "conode".into()
    }
    pub fn heartbeat() -> String {
        "500ms".into()
    }
    pub fn peer_timeout() -> String {
        "2s".into()
    }
    pub fn handover_timeout() -> String {
        "150s".into()
    }
    pub fn probe_count() -> u32 {
        3
    }
    pub fn probe_interval() -> String {
        "30ms".into()
    }
    pub fn probe_wait() -> String {
        "120ms".into()
    }
    pub fn hook_timeout() -> String {
        "10s".into()
    }
}

/// The environment variable that overrides `timeouts.io_stall` (milliseconds).
pub const IO_TIMEOUT_ENV: &str = "FAILOVERD_IO_TIMEOUT_MS";

/// The validated configuration: durations, socket addresses and keys, parsed once.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub key_file: PathBuf,
    pub state_dir: PathBuf,
    pub conode: ConodeSection,
    pub peer: Peer,
    pub listen: Listen,
    pub vip: VipSection,
    pub snapshot: Snapshot,
    pub ssh: Ssh,
    pub timeouts: Timeouts,
    pub failover: Failover,
    pub hooks: HooksSection,
}

#[derive(Debug, Clone)]
pub struct Peer {
    /// `host:port` of the other host's failoverd peer port (a name is resolved at each
    /// connection).
    pub address: String,
    /// The other host's failoverd public key.
    pub public_key: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct Listen {
    /// The peer port's address; `None` (`peer = ""`, the default): the address this host
    /// reaches the peer from, port [`DEFAULT_PEER_PORT`] ([`Listen::peer_addr`]).
    pub peer: Option<SocketAddr>,
    /// Prometheus `/metrics`; `None` when turned off (`metrics = ""`).
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// How often the live host checks for new commits and ships a snapshot of them.
    pub interval: Duration,
    pub transport: Transport,
    /// Generations kept on the standby (at least 1).
    pub keep: usize,
}

#[derive(Debug, Clone)]
pub struct Ssh {
    /// `user@host` of the standby, for rsync and scp.
    pub target: String,
    /// The standby's inbox directory (its `state_dir/inbox`).
    pub inbox: String,
    /// Extra ssh arguments, e.g. `["-i", "/etc/failoverd/id_ed25519", "-p", "22"]`.
    pub args: Vec<String>,
    /// How long one rsync or scp run may take before it is killed.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long one read or write on the peer port may make no progress.
    pub io_stall: Duration,
    /// TCP connect plus TLS handshake to the peer.
    pub connect: Duration,
    /// How long to wait for the peer's answer once a request is sent (an install of a
    /// large generation is verified before the answer).
    pub answer: Duration,
    /// How long the conode's admin socket may take to say where its chains are.
    pub conode: Duration,
}

/// One thing wrong with the configuration, naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `section.key` (or the environment variable).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file is missing or unreadable (permissions, a directory).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Larger than any configuration (e.g. `-c /dev/zero`).
    #[error("{} is over {MAX_CONFIG_BYTES} bytes: not a failoverd configuration", path.display())]
    TooLarge { path: PathBuf },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// Parsed, but values are out of range or inconsistent: each problem names its field.
    #[error("{} has {} problem(s) (run `failoverd check`):\n  {}", path.display(), problems.len(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// The peer port when `listen.peer` is left to its default.
pub const DEFAULT_PEER_PORT: u16 = 7780;

impl Listen {
    /// Where the peer port listens: `listen.peer`, or by default this host's own address
    /// towards the peer (the source address the kernel picks for `peer`, found with an
    /// unconnected UDP socket: nothing is sent), port [`DEFAULT_PEER_PORT`]. Never the
    /// wildcard by default: the peer port has one legitimate client, the other host.
    pub fn peer_addr(
        &self,
        peer: &str,
        vip: Option<std::net::IpAddr>,
    ) -> Result<SocketAddr, String> {
        if let Some(a) = self.peer {
            return Ok(a);
        }
        let why = |e: &dyn std::fmt::Display| {
            format!(
                "listen.peer is not set and this host's address towards the peer {peer} cannot be found ({e}): set listen.peer = \"THIS_HOST:{DEFAULT_PEER_PORT}\""
            )
        };
        let to = std::net::ToSocketAddrs::to_socket_addrs(peer)
            .map_err(|e| why(&e))?
            .next()
            .ok_or_else(|| why(&"it resolves to no address"))?;
        let any: SocketAddr = if to.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let routed = std::net::UdpSocket::bind(any)
            .and_then(|udp| {
                udp.connect(to)?;
                udp.local_addr()
            })
            .map(|a| a.ip());
        let own = match routed {
            Ok(ip) => ip,
            // No route now (the link is down at boot, say): the address of an interface
            // whose subnet holds the peer's.
            Err(e) => same_subnet(to.ip(), vip).ok_or_else(|| why(&e))?,
        };
        Ok(SocketAddr::new(own, DEFAULT_PEER_PORT))
    }
}

/// An address of this host in a subnet that holds `peer` (a link that is down keeps its
/// addresses), not the virtual IP `vip`.
fn same_subnet(peer: std::net::IpAddr, vip: Option<std::net::IpAddr>) -> Option<std::net::IpAddr> {
    use std::net::IpAddr;
    let bits = |ip: IpAddr| -> u128 {
        match ip {
            IpAddr::V4(v) => u32::from(v) as u128,
            IpAddr::V6(v) => u128::from(v),
        }
    };
    nix::ifaddrs::getifaddrs().ok()?.find_map(|i| {
        let (addr, mask): (IpAddr, IpAddr) = match (i.address?, i.netmask?) {
            (a, m) if a.as_sockaddr_in().is_some() => (
                a.as_sockaddr_in()?.ip().into(),
                m.as_sockaddr_in()?.ip().into(),
            ),
            (a, m) => (
                a.as_sockaddr_in6()?.ip().into(),
                m.as_sockaddr_in6()?.ip().into(),
            ),
        };
        (addr.is_ipv4() == peer.is_ipv4()
            && !addr.is_loopback()
            && Some(addr) != vip
            && bits(addr) & bits(mask) == bits(peer) & bits(mask))
        .then_some(addr)
    })
}

/// A configuration file is small; this bounds what `load` reads.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

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
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?} is zero"));
    }
    Ok(d)
}

/// The dotted key (`snapshot.keep`) whose `key = value` line holds byte `at` of `text`,
/// for errors that point at a value without naming its key (a wrong type).
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[start..end];
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// Read a file of at most [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    let n = f
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if n as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

impl RawConfig {
    /// Read and parse (not validate) `path`.
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        Self::parse(path, &read_bounded(path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1)),
            message: match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) => format!("{key}: {}", e.message()),
                None => e.message().to_string(),
            },
        })
    }

    /// Check every field, with `env` for the environment (`std::env::var` in the daemon);
    /// every problem found, one per field.
    pub fn validate(
        self,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| {
            problems.push(Problem {
                field: field.to_string(),
                message,
            })
        };
        let duration =
            |field: &str, s: &str, bad: &mut dyn FnMut(&str, String)| match parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    bad(field, e);
                    Duration::ZERO
                }
            };
        let interval = duration("snapshot.interval", &self.snapshot.interval, &mut bad);
        let ssh_timeout = duration("ssh.timeout", &self.ssh.timeout, &mut bad);
        let mut io_stall = duration("timeouts.io_stall", &self.timeouts.io_stall, &mut bad);
        let connect = duration("timeouts.connect", &self.timeouts.connect, &mut bad);
        let answer = duration("timeouts.answer", &self.timeouts.answer, &mut bad);
        let conode_t = duration("timeouts.conode", &self.timeouts.conode, &mut bad);
        let heartbeat = duration("failover.heartbeat", &self.failover.heartbeat, &mut bad);
        let peer_timeout = duration(
            "failover.peer_timeout",
            &self.failover.peer_timeout,
            &mut bad,
        );
        let hook_timeout = duration("hooks.timeout", &self.hooks.timeout, &mut bad);
        if parse_duration(&self.hooks.timeout).is_ok()
            && !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&hook_timeout)
        {
            bad(
                "hooks.timeout",
                format!(
                    "{:?}: between 100ms and 10m (a hook never delays failover, but a stuck one blocks the hooks after it)",
                    self.hooks.timeout
                ),
            );
        }
        let mut hook = |field: &str, command: &str| -> Option<String> {
            let command = command.trim();
            if command.is_empty() {
                return None;
            }
            let first = command.split_whitespace().next().unwrap_or("");
            if !first.starts_with('/') {
                bad(
                    field,
                    format!("{first:?}: start the command with an absolute path (hooks run with the service's minimal environment)"),
                );
            }
            Some(command.to_string())
        };
        let hooks = HooksSection {
            on_role_change: hook("hooks.on_role_change", &self.hooks.on_role_change),
            on_health_change: hook("hooks.on_health_change", &self.hooks.on_health_change),
            on_conflict: hook("hooks.on_conflict", &self.hooks.on_conflict),
            timeout: hook_timeout,
        };
        let handover_timeout = duration(
            "failover.handover_timeout",
            &self.failover.handover_timeout,
            &mut bad,
        );
        if !heartbeat.is_zero() && peer_timeout < heartbeat * 3 {
            bad(
                "failover.peer_timeout",
                format!(
                    "{peer_timeout:?} is shorter than 3 heartbeats ({:?}): one lost heartbeat would make the peer look gone",
                    heartbeat * 3
                ),
            );
        }
        let control = match self.conode.control.as_str() {
            "systemd" => {
                if self.conode.unit.trim().is_empty() {
                    bad(
                        "conode.unit",
                        "empty: name the conode's systemd unit".into(),
                    );
                }
                ConodeControl::Systemd {
                    unit: self.conode.unit.clone(),
                }
            }
            "child" => {
                if self.conode.user.trim().is_empty() || self.conode.user == "root" {
                    bad(
                        "conode.user",
                        format!(
                            "{:?}: the conode runs as a non-root user (e.g. \"conode\")",
                            self.conode.user
                        ),
                    );
                }
                ConodeControl::Child {
                    binary: self.conode.binary.clone(),
                    user: self.conode.user.clone(),
                }
            }
            other => {
                bad(
                    "conode.control",
                    format!("{other:?}: write \"systemd\" or \"child\""),
                );
                ConodeControl::Systemd {
                    unit: String::new(),
                }
            }
        };
        let probe_interval = duration("vip.probe_interval", &self.vip.probe_interval, &mut bad);
        let probe_wait = duration("vip.probe_wait", &self.vip.probe_wait, &mut bad);
        if !(1..=10).contains(&self.vip.probe_count) {
            bad(
                "vip.probe_count",
                format!("{} probes: write 1 to 10", self.vip.probe_count),
            );
        }
        let vip_address = if self.vip.address.trim().is_empty() {
            None
        } else {
            match parse_cidr(&self.vip.address) {
                Ok(a) => Some(a),
                Err(e) => {
                    bad("vip.address", e);
                    None
                }
            }
        };
        if vip_address.is_some() && self.vip.interface.trim().is_empty() {
            bad(
                "vip.interface",
                "empty, but vip.address is set: name the interface that carries it".into(),
            );
        }
        if let Some(v) = env(IO_TIMEOUT_ENV) {
            match v.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => io_stall = Duration::from_millis(ms),
                _ => bad(
                    IO_TIMEOUT_ENV,
                    format!("{v:?} is not a positive number of milliseconds (it overrides timeouts.io_stall): fix or unset it"),
                ),
            }
        }
        if self.snapshot.keep == 0 {
            bad(
                "snapshot.keep",
                "must be at least 1 (generations kept on the standby)".into(),
            );
        }
        let key = self.peer.public_key.trim();
        let public_key = if key.is_empty() {
            bad(
                "peer.public_key",
                "empty: pin the other host's key (printed by `failoverd setup` there)".into(),
            );
            [0; 32]
        } else {
            conode::keys::parse_hex32(key).unwrap_or_else(|e| {
                bad("peer.public_key", e.to_string());
                [0; 32]
            })
        };
        let address = self.peer.address.trim().to_string();
        if address.is_empty() {
            bad(
                "peer.address",
                "empty: write the other host's failoverd as host:port".into(),
            );
        } else if address
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            bad(
                "peer.address",
                format!("{address:?} is not host:port (e.g. \"10.0.0.2:7780\")"),
            );
        }
        let listen_peer = if self.listen.peer.trim().is_empty() {
            None
        } else {
            Some(self.listen.peer.parse::<SocketAddr>().unwrap_or_else(|e| {
                bad(
                    "listen.peer",
                    format!(
                        "{:?} is not ip:port ({e}); or \"\" for this host's address towards the peer",
                        self.listen.peer
                    ),
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }))
        };
        let metrics = if self.listen.metrics.trim().is_empty() {
            None
        } else {
            match self.listen.metrics.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    bad(
                        "listen.metrics",
                        format!(
                            "{:?} is not ip:port ({e}); leave it empty to turn metrics off",
                            self.listen.metrics
                        ),
                    );
                    None
                }
            }
        };
        if !self.state_dir.is_absolute() {
            bad(
                "state_dir",
                format!("{} is not an absolute path", self.state_dir.display()),
            );
        }
        if matches!(self.snapshot.transport, Transport::Rsync | Transport::Scp) {
            if self.ssh.target.trim().is_empty() {
                bad(
                    "ssh.target",
                    format!(
                        "empty, but snapshot.transport = \"{}\" needs user@standby",
                        self.snapshot.transport.name()
                    ),
                );
            }
            if !self.ssh.inbox.starts_with('/') {
                bad(
                    "ssh.inbox",
                    format!(
                        "{:?} must be the absolute path of the standby's inbox (its state_dir/inbox)",
                        self.ssh.inbox
                    ),
                );
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            path: path.to_path_buf(),
            key_file: self.key_file,
            state_dir: self.state_dir,
            conode: ConodeSection {
                config: self.conode.config,
                data_dir: self.conode.data_dir,
                control,
            },
            peer: Peer {
                address,
                public_key,
            },
            listen: Listen {
                peer: listen_peer,
                metrics,
            },
            vip: VipSection {
                interface: self.vip.interface,
                address: vip_address,
                probe_count: self.vip.probe_count,
                probe_interval,
                probe_wait,
            },
            snapshot: Snapshot {
                interval,
                transport: self.snapshot.transport,
                keep: self.snapshot.keep,
            },
            ssh: Ssh {
                target: self.ssh.target,
                inbox: self.ssh.inbox,
                args: self.ssh.args,
                timeout: ssh_timeout,
            },
            timeouts: Timeouts {
                io_stall,
                connect,
                answer,
                conode: conode_t,
            },
            failover: Failover {
                heartbeat,
                peer_timeout,
                handover_timeout,
            },
            hooks,
        })
    }
}

impl Config {
    /// Read, parse and validate `path` (with this process's environment).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(path, &read_bounded(path)?, |k| std::env::var(k).ok())
    }

    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        RawConfig::parse(path, text)?
            .validate(path, env)
            .map_err(|problems| ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
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

    /// The conode's identity, database path and admin socket.
    pub fn conode_paths(&self) -> Result<ConodePaths, String> {
        conode_paths(&self.conode.config, &self.conode.data_dir)
    }

    /// `[vip] address` as written ("10.0.0.1/24"); `None` when no address is managed.
    pub fn vip_cidr(&self) -> Option<String> {
        self.vip.address.map(|(a, p)| format!("{a}/{p}"))
    }

    /// How long starting or stopping the conode may take: `timeouts.conode`, at least
    /// 30 s (a conode drains for up to 30 s).
    pub fn conode_timeout(&self) -> Duration {
        self.timeouts.conode.max(Duration::from_secs(30))
    }
}

/// `state_dir/control.sock`.
pub fn control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// The conode's identity, database path and admin socket.
pub fn conode_paths(config: &Path, data_dir: &Path) -> Result<ConodePaths, String> {
    let pc =
        conode::config::PrivateConfig::load(config).map_err(|e| format!("conode.config: {e}"))?;
    let public = pc.keys.public_bytes();
    let db = data_dir.join(conode::config::db_file_name(&public));
    let admin = conode::admin::admin_socket_path(&db, &public);
    Ok(ConodePaths { public, db, admin })
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
    // Bounded as a configuration file is: a key file is some 150 bytes.
    let text = read_bounded(path).map_err(|e| match e {
        ConfigError::TooLarge { .. } => format!(
            "key_file {}: over {MAX_CONFIG_BYTES} bytes: not a failoverd key file",
            path.display()
        ),
        ConfigError::Read { source, .. } => format!("key_file {}: {source}", path.display()),
        e => format!("key_file {}: {e}", path.display()),
    })?;
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
    /// `[vip] address` ("" for none).
    pub vip: &'a str,
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
# How failoverd starts and stops the conode: "systemd" (systemctl start|stop unit) or
# "child" (failoverd runs `binary -c config server` as `user`, never root).
control = "systemd"
unit = "conode.service"
# binary = "/usr/bin/conode"
# user = "conode"

[peer]
# The other host's failoverd peer port, host:port.
address = {peer_address}
# The other host's failoverd public key, printed by `failoverd setup` there. Nothing is
# served to, or accepted from, a host without this key.
public_key = {peer_key}

[listen]
# Peer port (HTTPS, both sides authenticated by their pinned keys): ip:port, or "" for
# this host's own address towards the peer, port 7780 (never the wildcard by default).
peer = {listen_peer}
# Prometheus metrics at http://ADDRESS/metrics; keep it on loopback, or "" for none.
metrics = {listen_metrics}

[vip]
# The interface that carries the virtual IP, and the address with its prefix length
# (e.g. "10.0.0.1/24"; IPv6 too). Only the live host holds it; failoverd tags it so it
# never removes an address it did not add.
interface = {interface}
address = {vip}
# The ARP probe before every claim (RFC 5227 style, shortened): probes this far apart,
# then a wait for answers. Any answer refuses the claim.
probe_count = 3
probe_interval = "30ms"
probe_wait = "120ms"

[failover]
# How often each host tells the other its state, and how long without a word before
# the peer counts as unreachable (then `promote` needs --force).
heartbeat = "500ms"
peer_timeout = "2s"
# How long either side of a switchover waits for the other.
handover_timeout = "150s"

[hooks]
# Commands run (by /bin/sh -c, as failoverd's user) when this host's role changes, a
# health verdict changes, or another host answers for the address: e.g. to move a DNS
# name or a cloud floating IP, or to page someone. The facts are in the environment:
# FAILOVERD_EVENT (role_change, health_change, conflict), FAILOVERD_ROLE,
# FAILOVERD_PREVIOUS_ROLE, FAILOVERD_EPOCH, FAILOVERD_VIP, FAILOVERD_PEER,
# FAILOVERD_REASON; FAILOVERD_CAUSE (role changes: switchover, promote, forced_promote,
# demote, handed_over, higher_epoch, ...); FAILOVERD_CHECK and FAILOVERD_OK (health);
# FAILOVERD_MAC and FAILOVERD_CONFLICTS (conflicts). Hooks run one at a time beside the
# decision loop and never delay it; one still running at `timeout` is killed.
on_role_change = ""
on_health_change = ""
on_conflict = ""
timeout = "10s"

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
# How long one rsync or scp run may take before it is killed.
timeout = "1h"

[timeouts]
# How long one read or write on the peer port may make no progress before the request
# is given up (the transfer then resumes). FAILOVERD_IO_TIMEOUT_MS overrides it.
io_stall = "30s"
# TCP connect and TLS handshake to the peer.
connect = "5s"
# How long to wait for the peer's answer to a request (an install is verified first).
answer = "10m"
# How long the conode's admin socket may take to answer.
conode = "5s"
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
        vip = q(a.vip),
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
            peer_address: "10.0.0.2:7780",
            peer_key: "",
            listen_peer: "",
            listen_metrics: "127.0.0.1:7781",
            interface: "eth0",
            vip: "",
            transport: Transport::Https,
            ssh_target: "",
            ssh_inbox: "",
        }
    }

    const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn problems(text: &str, env: impl Fn(&str) -> Option<String>) -> Vec<Problem> {
        match Config::parse(Path::new("f.toml"), text, env) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn the_template_validates_into_durations_addresses_and_keys() {
        let p = problems(&template(&args()), no_env);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].field, "peer.public_key");
        let mut a = args();
        a.peer_key = KEY;
        let c = Config::parse(Path::new("f.toml"), &template(&a), no_env).unwrap();
        assert_eq!(c.snapshot.transport, Transport::Https);
        assert_eq!(c.snapshot.interval, Duration::from_secs(2));
        assert_eq!(c.peer.public_key, [1; 32]);
        assert_eq!(c.listen.peer, None, "this host's address towards the peer");
        assert_eq!(c.listen.metrics, Some("127.0.0.1:7781".parse().unwrap()));
        // A file without [listen] gets ports that are not the conode's (7770, 7771).
        let bare = Config::parse(
            Path::new("f.toml"),
            &format!("key_file = \"/k\"\nstate_dir = \"/s\"\n[conode]\nconfig = \"/c\"\ndata_dir = \"/d\"\n[peer]\naddress = \"h:1\"\npublic_key = \"{KEY}\"\n"),
            no_env,
        )
        .unwrap();
        assert_eq!(bare.listen.peer, None);
        assert_eq!(DEFAULT_PEER_PORT, 7780);
        assert_eq!(bare.listen.metrics.map(|m| m.port()), Some(7781));
        assert_eq!(c.timeouts.io_stall, Duration::from_secs(30));
        assert_eq!(c.timeouts.answer, Duration::from_secs(600));
        assert_eq!(c.ssh.timeout, Duration::from_secs(3600));
        // A file without the optional sections gets the same defaults.
        let bare = format!(
            "key_file = \"/k\"\nstate_dir = \"/s\"\n[conode]\nconfig = \"/c\"\ndata_dir = \"/d\"\n[peer]\naddress = \"h:1\"\npublic_key = \"{KEY}\"\n"
        );
        let b = Config::parse(Path::new("f.toml"), &bare, no_env).unwrap();
        assert_eq!(b.timeouts.io_stall, c.timeouts.io_stall);
        assert_eq!(b.timeouts.connect, Duration::from_secs(5));
        assert_eq!(b.snapshot.keep, 3);
    }

    #[test]
    fn problems_name_their_field() {
        let mut a = args();
        a.transport = Transport::Rsync;
        a.peer_key = "zz";
        a.listen_metrics = "localhost";
        a.peer_address = "standby";
        let mut text = template(&a);
        text = text.replace("interval = \"2s\"", "interval = \"2 parsecs\"");
        text = text.replace("keep = 3", "keep = 0");
        text = text.replace("io_stall = \"30s\"", "io_stall = \"0s\"");
        text = text.replace("timeout = \"1h\"", "timeout = \"soon\"");
        text = text.replace("answer = \"10m\"", "answer = \"10\"");
        let fields: Vec<String> = problems(&text, no_env)
            .into_iter()
            .map(|p| p.field)
            .collect();
        for field in [
            "snapshot.interval",
            "snapshot.keep",
            "peer.public_key",
            "peer.address",
            "listen.metrics",
            "ssh.target",
            "ssh.inbox",
            "ssh.timeout",
            "timeouts.io_stall",
            "timeouts.answer",
        ] {
            assert!(
                fields.iter().any(|f| f == field),
                "{field} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn a_bad_io_timeout_in_the_environment_is_refused_by_name() {
        let mut a = args();
        a.peer_key = KEY;
        let text = template(&a);
        for bad in ["", "soon", "0", "-5", "3s"] {
            let p = problems(&text, |k| (k == IO_TIMEOUT_ENV).then(|| bad.to_string()));
            assert_eq!(p.len(), 1, "{bad:?}: {p:?}");
            assert_eq!(p[0].field, IO_TIMEOUT_ENV, "{bad:?}");
            assert!(p[0].message.contains("milliseconds"), "{}", p[0]);
        }
        let c = Config::parse(Path::new("f.toml"), &text, |k| {
            (k == IO_TIMEOUT_ENV).then(|| "1500".to_string())
        })
        .unwrap();
        assert_eq!(c.timeouts.io_stall, Duration::from_millis(1500));
    }

    #[test]
    fn hooks_are_optional_absolute_and_bounded() {
        let mut a = args();
        a.peer_key = KEY;
        let text = template(&a);
        let c = Config::parse(Path::new("f.toml"), &text, no_env).unwrap();
        assert!(!c.hooks.any());
        assert_eq!(c.hooks.timeout, Duration::from_secs(10));
        let text2 = text.replace(
            "on_role_change = \"\"",
            "on_role_change = \"/usr/local/bin/move-dns --zone example.org\"",
        );
        let c = Config::parse(Path::new("f.toml"), &text2, no_env).unwrap();
        assert_eq!(
            c.hooks.on_role_change.as_deref(),
            Some("/usr/local/bin/move-dns --zone example.org")
        );
        let bad = text
            .replace("on_conflict = \"\"", "on_conflict = \"page-me now\"")
            .replace("timeout = \"10s\"", "timeout = \"1h\"");
        let p = problems(&bad, no_env);
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["hooks.timeout", "hooks.on_conflict"], "{p:?}");
        assert!(p[1].message.contains("absolute path"), "{}", p[1]);
    }

    #[test]
    fn unknown_fields_and_bad_types_are_errors_with_a_line() {
        let text = template(&args()).replace("keep = 3", "keep = 3\nkepp = 4");
        let e = Config::parse(Path::new("f.toml"), &text, no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml:") && e.contains("kepp"), "{e}");
        let text = template(&args()).replace("transport = \"https\"", "transport = \"ftp\"");
        let e = Config::parse(Path::new("f.toml"), &text, no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp"), "{e}");
        // A value of the wrong type: the error names its key, not only the types.
        let text = template(&args()).replace("keep = 3", "keep = \"three\"");
        let e = Config::parse(Path::new("f.toml"), &text, no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshot.keep: invalid type"), "{e}");
    }

    #[test]
    fn an_endless_file_is_refused_without_reading_it_all() {
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn the_peer_port_listens_on_this_hosts_address_towards_the_peer_by_default() {
        let l = Listen {
            peer: None,
            metrics: None,
        };
        let a = l.peer_addr("127.0.0.5:7780", None).unwrap();
        assert!(a.ip().is_loopback() && !a.ip().is_unspecified(), "{a}");
        assert_eq!(a.port(), DEFAULT_PEER_PORT);
        let e = l.peer_addr("no-such-host.invalid:7780", None).unwrap_err();
        assert!(e.contains("set listen.peer"), "{e}");
        let set = Listen {
            peer: Some("10.0.0.1:7790".parse().unwrap()),
            metrics: None,
        };
        assert_eq!(
            set.peer_addr("x:1", None).unwrap().to_string(),
            "10.0.0.1:7790"
        );
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

    /// A key file is read up to the configuration files' cap, not to its end: a huge
    /// file (sparse here, 64 MiB of zeros) is refused with a clear error instead of read
    /// into memory. `/dev/zero` itself is refused before, by its mode.
    #[test]
    fn key_file_reads_are_capped() {
        use std::os::unix::fs::PermissionsExt;
        let e = load_key(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_key(&p).unwrap_err();
        assert!(
            e.contains(&format!(
                "over {MAX_CONFIG_BYTES} bytes: not a failoverd key file"
            )),
            "{e}"
        );
    }
}
