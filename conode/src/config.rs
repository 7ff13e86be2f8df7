//! `private.toml`, `public.toml` (rosters) and the default paths, as the Go conode has them.
//!
//! Reading is lenient where Go is (keys matched case-insensitively, `URL`/`Url`/`url`,
//! `Suite` defaulting to `Ed25519`, `[Services.*]` tables kept verbatim) and strict about
//! what would break a node (bad hex, a `Public` that does not match `Private`, a bad
//! `Address`). Every error is one line naming the file, the line and the key.
//!
//! Writing follows the layout of Go's TOML encoder (BurntSushi): two comment lines, simple
//! keys in struct order with empty strings written, then the tables indented two spaces per
//! level. Files are replaced atomically (temp file, fsync, rename, fsync of the directory)
//! so a crash never leaves a half-written `private.toml`. This module never binds a socket
//! or opens the database.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::keys::{self, KeyPair};

/// A configuration problem, shown to the operator as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ": key `{k}`")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

/// `tls://` or `tcp://`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Tls,
    Tcp,
}

/// A conode `Address`: `tls://host:port` or `tcp://host:port`. The host may be a DNS
/// name; it is resolved at every dial, never cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, String> {
        let (scheme, rest) = if let Some(r) = s.strip_prefix("tls://") {
            (Scheme::Tls, r)
        } else if let Some(r) = s.strip_prefix("tcp://") {
            (Scheme::Tcp, r)
        } else {
            return Err(format!(
                "{s:?} is not an address: expected tls://host:port or tcp://host:port"
            ));
        };
        let (host, port) = split_host_port(rest)
            .ok_or_else(|| format!("{s:?} is not an address: expected tls://host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
        Ok(Address {
            scheme,
            host: host.to_string(),
            port,
        })
    }

    /// `host:port`, with brackets around IPv6 literals, for dialing.
    pub fn host_port(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.scheme {
            Scheme::Tls => "tls",
            Scheme::Tcp => "tcp",
        };
        write!(f, "{s}://{}", self.host_port())
    }
}

fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(r) = s.strip_prefix('[') {
        let (h, rest) = r.split_once(']')?;
        let p = rest.strip_prefix(':')?;
        Some((h, p))
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        Some((h, p))
    }
}

pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A client-facing URL (`http[s]://host[:port][/path]`), as used in `URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path without a trailing slash ("" for the root).
    pub path: String,
}

impl WebUrl {
    pub fn parse(s: &str) -> Result<WebUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{s:?} must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match split_host_port(authority) {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{s:?}: port {p:?} is not a number"))?,
            ),
            None => (
                authority.trim_start_matches('[').trim_end_matches(']'),
                default_port,
            ),
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(WebUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// The WebSocket URL of `<Service>/<Method>` under this base.
    pub fn ws_endpoint(&self, service: &str, method: &str) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!(
            "{scheme}://{}{}/{service}/{method}",
            join_host_port(&self.host, self.port),
            self.path
        )
    }
}

// ---------------------------------------------------------------------------------------
// Reading helpers: case-insensitive keys, errors with line numbers.

struct Doc<'a> {
    path: &'a Path,
    src: &'a str,
}

impl Doc<'_> {
    fn err(&self, key: Option<&str>, line: Option<usize>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            key: key.map(str::to_string),
            msg: msg.into(),
        }
    }

    /// The first line at or after `from` (1-based) that assigns `key`, if any.
    fn key_line(&self, key: &str, from: usize) -> Option<usize> {
        self.src
            .lines()
            .enumerate()
            .skip(from.saturating_sub(1))
            .find(|(_, l)| {
                l.split_once('=')
                    .is_some_and(|(k, _)| k.trim().trim_matches('"').eq_ignore_ascii_case(key))
            })
            .map(|(i, _)| i + 1)
    }

    fn parse(&self) -> Result<Table, ConfigError> {
        toml::from_str::<Table>(self.src).map_err(|e| {
            let line = e.span().map(|s| {
                self.src[..s.start.min(self.src.len())]
                    .matches('\n')
                    .count()
                    + 1
            });
            let key = line.and_then(|l| {
                let text = self.src.lines().nth(l - 1)?;
                let (k, _) = text.split_once('=')?;
                Some(k.trim().trim_matches('"').to_string())
            });
            let msg = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string();
            self.err(
                key.as_deref(),
                line,
                format!("invalid TOML: {msg}; nothing was changed"),
            )
        })
    }
}

/// Find `key` in `t`: exact match first, then case-insensitive (as Go's decoder does).
fn get<'t>(t: &'t Table, key: &str) -> Option<(&'t String, &'t Value)> {
    t.get_key_value(key)
        .or_else(|| t.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)))
}

/// A string field; `Ok(None)` if absent.
fn get_str(
    doc: &Doc,
    t: &Table,
    key: &str,
    from_line: usize,
) -> Result<Option<String>, ConfigError> {
    match get(t, key) {
        None => Ok(None),
        Some((_, Value::String(s))) => Ok(Some(s.clone())),
        Some((k, v)) => Err(doc.err(
            Some(k),
            doc.key_line(k, from_line),
            format!("expected a string, found {}", v.type_str()),
        )),
    }
}

fn require_str(doc: &Doc, t: &Table, key: &str, from_line: usize) -> Result<String, ConfigError> {
    get_str(doc, t, key, from_line)?
        .ok_or_else(|| doc.err(Some(key), None, "missing (this key is required)"))
}

fn check_suite(doc: &Doc, t: &Table, from_line: usize) -> Result<String, ConfigError> {
    let suite = get_str(doc, t, "Suite", from_line)?.unwrap_or_else(|| "Ed25519".into());
    if suite != "Ed25519" {
        return Err(doc.err(
            Some("Suite"),
            doc.key_line("Suite", from_line),
            format!("suite {suite:?} is not supported: only \"Ed25519\" is"),
        ));
    }
    Ok(suite)
}

fn parse_address(doc: &Doc, t: &Table, from_line: usize) -> Result<Address, ConfigError> {
    let s = require_str(doc, t, "Address", from_line)?;
    Address::parse(&s).map_err(|m| doc.err(Some("Address"), doc.key_line("Address", from_line), m))
}

/// Known top-level keys of private.toml, in the order the Go encoder writes them.
const PRIVATE_KEYS: [&str; 10] = [
    "Suite",
    "Public",
    "Private",
    "Address",
    "ListenAddress",
    "Description",
    "URL",
    "WebSocketTLSCertificate",
    "WebSocketTLSCertificateKey",
    "Services",
];

// ---------------------------------------------------------------------------------------
// private.toml

/// A conode's `private.toml`.
#[derive(Debug, Clone)]
pub struct PrivateConfig {
    pub keys: KeyPair,
    pub address: Address,
    pub listen_address: String,
    pub description: String,
    pub url: String,
    pub ws_tls_certificate: String,
    pub ws_tls_certificate_key: String,
    /// `[Services.*]` tables, kept verbatim (we do not use their keys yet).
    pub services: Option<Table>,
    /// Top-level keys we do not know, kept so a rewrite loses nothing.
    pub extra: Table,
}

impl PrivateConfig {
    pub fn new(keys: KeyPair, address: Address, description: String) -> PrivateConfig {
        PrivateConfig {
            keys,
            address,
            listen_address: String::new(),
            description,
            url: String::new(),
            ws_tls_certificate: String::new(),
            ws_tls_certificate_key: String::new(),
            services: None,
            extra: Table::new(),
        }
    }

    pub fn load(path: &Path) -> Result<PrivateConfig, ConfigError> {
        let src = read_file(path)?;
        let c = Self::parse(path, &src)?;
        for w in c.unknown_keys(path, &src) {
            tracing::warn!("{w}");
        }
        Ok(c)
    }

    /// One line per top-level key of `private.toml` this conode does not know (kept and
    /// written back, since the Go conode's files may carry keys of its own, but never
    /// used): a misspelt `ListenAdress` is found here, not by a listener on the wrong port.
    pub fn unknown_keys(&self, path: &Path, src: &str) -> Vec<String> {
        let doc = Doc { path, src };
        self.extra
            .keys()
            .map(|k| {
                let line = doc
                    .key_line(k, 1)
                    .map(|l| format!(" (line {l})"))
                    .unwrap_or_default();
                let near = PRIVATE_KEYS
                    .iter()
                    .find(|p| edit_distance(&p.to_ascii_lowercase(), &k.to_ascii_lowercase()) <= 2)
                    .map(|p| format!(": did you mean {p}?"))
                    .unwrap_or_default();
                format!(
                    "{}: unknown key {k}{line} is kept but not used{near}",
                    path.display()
                )
            })
            .collect()
    }

    pub fn parse(path: &Path, src: &str) -> Result<PrivateConfig, ConfigError> {
        let doc = Doc { path, src };
        let t = doc.parse()?;
        check_suite(&doc, &t, 1)?;
        let public = require_str(&doc, &t, "Public", 1)?;
        let private = require_str(&doc, &t, "Private", 1)?;
        let keys = KeyPair::from_go_hex(&private, &public).map_err(|e| {
            let key = match e {
                keys::KeyError::BadPoint => "Public",
                keys::KeyError::BadHex(_) if keys::parse_hex32(&private).is_ok() => "Public",
                keys::KeyError::Mismatch { .. } => "Public",
                _ => "Private",
            };
            doc.err(Some(key), doc.key_line(key, 1), e.to_string())
        })?;
        let address = parse_address(&doc, &t, 1)?;
        let listen_address = get_str(&doc, &t, "ListenAddress", 1)?.unwrap_or_default();
        let description = get_str(&doc, &t, "Description", 1)?.unwrap_or_default();
        let url = get_str(&doc, &t, "URL", 1)?.unwrap_or_default();
        if !url.is_empty() {
            WebUrl::parse(&url).map_err(|m| doc.err(Some("URL"), doc.key_line("URL", 1), m))?;
        }
        let ws_tls_certificate =
            get_str(&doc, &t, "WebSocketTLSCertificate", 1)?.unwrap_or_default();
        let ws_tls_certificate_key =
            get_str(&doc, &t, "WebSocketTLSCertificateKey", 1)?.unwrap_or_default();
        if ws_tls_certificate.is_empty() != ws_tls_certificate_key.is_empty() {
            let missing = if ws_tls_certificate.is_empty() {
                "WebSocketTLSCertificate"
            } else {
                "WebSocketTLSCertificateKey"
            };
            return Err(doc.err(
                Some(missing),
                None,
                "empty while the other WebSocket TLS key is set: set both or neither",
            ));
        }
        let services = match get(&t, "Services") {
            None => None,
            Some((_, Value::Table(s))) => Some(s.clone()),
            Some((k, v)) => {
                return Err(doc.err(
                    Some(k),
                    doc.key_line(k, 1),
                    format!("expected a table, found {}", v.type_str()),
                ))
            }
        };
        if !listen_address.is_empty() {
            parse_listen(&listen_address, address.port)
                .map_err(|m| doc.err(Some("ListenAddress"), doc.key_line("ListenAddress", 1), m))?;
        }
        let extra = t
            .iter()
            .filter(|(k, _)| !PRIVATE_KEYS.iter().any(|p| p.eq_ignore_ascii_case(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(PrivateConfig {
            keys,
            address,
            listen_address,
            description,
            url,
            ws_tls_certificate,
            ws_tls_certificate_key,
            services,
            extra,
        })
    }

    /// The file as the Go conode would write it (BurntSushi layout).
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# This file contains your private key.\n# Do not give it away lightly!\n",
        );
        let simple = [
            ("Suite", "Ed25519".to_string()),
            ("Public", self.keys.public_hex()),
            ("Private", self.keys.private_hex()),
            ("Address", self.address.to_string()),
            ("ListenAddress", self.listen_address.clone()),
            ("Description", self.description.clone()),
            ("URL", self.url.clone()),
            ("WebSocketTLSCertificate", self.ws_tls_certificate.clone()),
            (
                "WebSocketTLSCertificateKey",
                self.ws_tls_certificate_key.clone(),
            ),
        ];
        for (k, v) in simple {
            out.push_str(&format!("{k} = {}\n", Value::String(v)));
        }
        write_table_body(&mut out, &self.extra, &[], 0);
        if let Some(s) = &self.services {
            write_table(&mut out, s, &["Services".to_string()], 0);
        }
        out
    }

    /// This node's entry for `public.toml`.
    pub fn server_toml(&self) -> ServerToml {
        let services = self.services.as_ref().map(|s| {
            s.iter()
                .map(|(name, v)| {
                    let mut t = Table::new();
                    if let Value::Table(svc) = v {
                        for key in ["Public", "Suite"] {
                            if let Some((k, v)) = get(svc, key) {
                                t.insert(k.clone(), v.clone());
                            }
                        }
                    }
                    (name.clone(), Value::Table(t))
                })
                .collect()
        });
        ServerToml {
            address: self.address.clone(),
            public: self.keys.public_bytes(),
            description: self.description.clone(),
            url: self.url.clone(),
            services,
        }
    }

    /// Where the conode-to-conode listener binds (`ListenAddress` rules of the Go conode).
    pub fn listen_addr(&self) -> Result<String, String> {
        if self.listen_address.is_empty() {
            return Ok(join_host_port("0.0.0.0", self.address.port));
        }
        parse_listen(&self.listen_address, self.address.port)
    }

    /// Whether the WebSocket port serves TLS itself.
    pub fn ws_tls(&self) -> bool {
        !self.ws_tls_certificate_key.is_empty()
    }

    /// Where the client WebSocket listener binds: the port of `URL` if set, else
    /// `Address` port + 1. The host is `0.0.0.0` as in Go, or the host of
    /// `ListenAddress` when one is set (so several conodes can share a machine).
    pub fn ws_listen_addr(&self) -> Result<String, String> {
        let port = if self.url.is_empty() {
            self.address
                .port
                .checked_add(1)
                .ok_or("Address port 65535 leaves no room for the WebSocket port (port+1)")?
        } else {
            WebUrl::parse(&self.url)?.port
        };
        let host = if self.listen_address.is_empty() {
            "0.0.0.0".to_string()
        } else {
            let l = parse_listen(&self.listen_address, self.address.port)?;
            split_host_port(&l)
                .map(|(h, _)| h.to_string())
                .unwrap_or_default()
        };
        Ok(join_host_port(&host, port))
    }

    /// The URL clients should use, as reported in `ServerIdentity.URL`: `URL`, or
    /// `https://host:port+1` when built-in TLS is configured, else empty.
    pub fn advertised_url(&self) -> String {
        if !self.url.is_empty() {
            self.url.clone()
        } else if self.ws_tls() {
            format!(
                "https://{}",
                join_host_port(&self.address.host, self.address.port.saturating_add(1))
            )
        } else {
            String::new()
        }
    }
}

fn parse_listen(l: &str, port: u16) -> Result<String, String> {
    if l.parse::<std::net::IpAddr>().is_ok() {
        return Ok(join_host_port(l, port));
    }
    match split_host_port(l) {
        Some((h, p)) if p.parse::<u16>().is_ok() => {
            Ok(join_host_port(h, p.parse().unwrap_or(port)))
        }
        _ => Err(format!(
            "{l:?} is neither an IP nor IP:port (empty means all interfaces)"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// public.toml and rosters

/// One `[[servers]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerToml {
    pub address: Address,
    pub public: [u8; 32],
    pub description: String,
    pub url: String,
    pub services: Option<Table>,
}

impl ServerToml {
    /// The base URL for clients: `URL` if set, else `ws://host:port+1` semantics.
    pub fn web_url(&self) -> Result<WebUrl, String> {
        if !self.url.is_empty() {
            return WebUrl::parse(&self.url);
        }
        Ok(WebUrl {
            tls: false,
            host: self.address.host.clone(),
            port: self
                .address
                .port
                .checked_add(1)
                .ok_or("address port 65535 has no port+1")?,
            path: String::new(),
        })
    }
}

/// A roster: one or more `public.toml` concatenated.
#[derive(Debug, Clone, PartialEq)]
pub struct Roster {
    pub servers: Vec<ServerToml>,
}

impl Roster {
    pub fn load(path: &Path) -> Result<Roster, ConfigError> {
        let src = read_file(path)?;
        Self::parse(path, &src)
    }

    pub fn parse(path: &Path, src: &str) -> Result<Roster, ConfigError> {
        let doc = Doc { path, src };
        let t = doc.parse()?;
        let servers = match get(&t, "servers") {
            Some((_, Value::Array(a))) => a,
            Some((k, _)) => {
                return Err(doc.err(Some(k), None, "expected [[servers]] entries"));
            }
            None => return Err(doc.err(Some("servers"), None, "no [[servers]] entry")),
        };
        // Line where each [[servers]] block starts, to point errors at the right one.
        let starts: Vec<usize> = src
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                l.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("[[servers]]")
            })
            .map(|(i, _)| i + 1)
            .collect();
        let mut out = Vec::new();
        for (i, v) in servers.iter().enumerate() {
            let from = starts.get(i).copied().unwrap_or(1);
            let Value::Table(s) = v else {
                return Err(doc.err(Some("servers"), Some(from), "entry is not a table"));
            };
            check_suite(&doc, s, from)?;
            let address = parse_address(&doc, s, from)?;
            let public_hex = require_str(&doc, s, "Public", from)?;
            let public = keys::parse_public(&public_hex)
                .map_err(|e| doc.err(Some("Public"), doc.key_line("Public", from), e.to_string()))?
                .to_bytes();
            let description = get_str(&doc, s, "Description", from)?.unwrap_or_default();
            let url = get_str(&doc, s, "URL", from)?.unwrap_or_default();
            if !url.is_empty() {
                WebUrl::parse(&url)
                    .map_err(|m| doc.err(Some("URL"), doc.key_line("URL", from), m))?;
            }
            let services = match get(s, "Services") {
                Some((_, Value::Table(t))) => Some(t.clone()),
                _ => None,
            };
            out.push(ServerToml {
                address,
                public,
                description,
                url,
                services,
            });
        }
        Ok(Roster { servers: out })
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            out.push_str("[[servers]]\n");
            let mut simple = vec![
                ("Address", s.address.to_string()),
                ("Suite", "Ed25519".to_string()),
                ("Public", hex::encode(s.public)),
                ("Description", s.description.clone()),
            ];
            if !s.url.is_empty() {
                simple.push(("URL", s.url.clone()));
            }
            for (k, v) in simple {
                out.push_str(&format!("  {k} = {}\n", Value::String(v)));
            }
            if let Some(svc) = &s.services {
                write_table(
                    &mut out,
                    svc,
                    &["servers".to_string(), "Services".to_string()],
                    1,
                );
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// Writing

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

/// Simple keys of `t` (not sub-tables), at `indent`.
fn write_table_body(out: &mut String, t: &Table, path: &[String], indent: usize) {
    let pad = "  ".repeat(indent);
    for (k, v) in t {
        if !matches!(v, Value::Table(_)) {
            out.push_str(&format!("{pad}{} = {}\n", toml_key(k), v));
        }
    }
    for (k, v) in t {
        if let Value::Table(sub) = v {
            let mut p = path.to_vec();
            p.push(k.clone());
            write_table(out, sub, &p, indent);
        }
    }
}

fn write_table(out: &mut String, t: &Table, path: &[String], indent: usize) {
    let pad = "  ".repeat(indent);
    let name: Vec<String> = path.iter().map(|k| toml_key(k)).collect();
    out.push_str(&format!("\n{pad}[{}]\n", name.join(".")));
    write_table_body(out, t, path, indent + 1);
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    let err = |msg: String| ConfigError {
        path: path.to_path_buf(),
        line: None,
        key: None,
        msg,
    };
    let bytes = read_capped(path, MAX_CONFIG_BYTES).map_err(err)?;
    String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))
}

/// Levenshtein distance (short strings: configuration keys).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The largest configuration file read (a roster of thousands of servers is far less).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Read `path`, refusing one longer than `max` bytes without reading past it (so that
/// `-c /dev/zero` is an error, not a process that eats all memory).
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "longer than {} MiB: not a configuration file",
            max >> 20
        ));
    }
    Ok(bytes)
}

/// Replace `path` atomically with `contents` and `mode`: temp file in the same directory,
/// fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------------------
// Paths

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$XDG_CONFIG_HOME/conode`, else `~/.config/conode`.
pub fn default_config_dir() -> PathBuf {
    env_dir("XDG_CONFIG_HOME")
        .unwrap_or_else(|| home().join(".config"))
        .join("conode")
}

/// `$CONODE_SERVICE_PATH`, else `$XDG_DATA_HOME/conode`, else `~/.local/share/conode`.
pub fn data_dir() -> PathBuf {
    env_dir("CONODE_SERVICE_PATH").unwrap_or_else(|| {
        env_dir("XDG_DATA_HOME")
            .unwrap_or_else(|| home().join(".local/share"))
            .join("conode")
    })
}

/// `<Public hex>.db`: the database file of `public`, in a data or backup directory.
pub fn db_file_name(public: &[u8; 32]) -> String {
    format!("{}.db", hex::encode(public))
}

/// `<data dir>/<Public hex>.db`.
pub fn db_path(public: &[u8; 32]) -> PathBuf {
    data_dir().join(db_file_name(public))
}

/// A certificate location from `WebSocketTLSCertificate[Key]`: a path or `file://path`.
pub fn cert_path(s: &str) -> Result<PathBuf, String> {
    if let Some(p) = s.strip_prefix("file://") {
        Ok(PathBuf::from(p))
    } else if s.starts_with("string://") {
        Err("string:// certificates are not supported: put the PEM in a file (it can then be renewed without a restart)".into())
    } else {
        Ok(PathBuf::from(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_PRIVATE: &str = r#"# This file contains your private key.
# Do not give it away lightly!
Suite = "Ed25519"
Public = "5866666666666666666666666666666666666666666666666666666666666666"
Private = "0100000000000000000000000000000000000000000000000000000000000000"
Address = "tls://203.0.113.7:7770"
ListenAddress = ""
Description = "My conode"
Url = "https://conode.example.org"
WebSocketTLSCertificate = ""
WebSocketTLSCertificateKey = ""

[Services]
  [Services.ByzCoin]
    Suite = "bn256.adapter"
    Public = "aa"
    Private = "bb"
  [Services.Skipchain]
    Suite = "bn256.adapter"
    Public = "cc"
    Private = "dd"
"#;

    fn p() -> &'static Path {
        Path::new("private.toml")
    }

    #[test]
    fn go_private_toml_loads_and_round_trips_services() {
        let c = PrivateConfig::parse(p(), GO_PRIVATE).unwrap();
        assert_eq!(c.address.port, 7770);
        assert_eq!(c.url, "https://conode.example.org");
        let written = c.to_toml();
        let again = PrivateConfig::parse(p(), &written).unwrap();
        assert_eq!(again.services, c.services);
        assert!(written.contains("  [Services.ByzCoin]\n    Private = \"bb\""));
        assert!(written.contains("URL = \"https://conode.example.org\""));
        assert!(written.starts_with("# This file contains your private key.\n"));
    }

    #[test]
    fn keys_are_case_insensitive() {
        let src = GO_PRIVATE
            .replace("Address =", "address =")
            .replace("Public =", "PUBLIC =");
        let c = PrivateConfig::parse(p(), &src).unwrap();
        assert_eq!(c.address.host, "203.0.113.7");
    }

    #[test]
    fn syntax_error_names_file_line_and_key() {
        let src = GO_PRIVATE.replace("Description = \"My conode\"", "Description = My conode");
        let e = PrivateConfig::parse(p(), &src).unwrap_err();
        assert_eq!(e.line, Some(8), "{e}");
        assert_eq!(e.key.as_deref(), Some("Description"), "{e}");
        let line = e.to_string();
        assert!(
            line.starts_with("private.toml:8: key `Description`: invalid TOML"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn bad_public_names_its_line() {
        let src = GO_PRIVATE.replace("58666666", "48666666");
        let e = PrivateConfig::parse(p(), &src).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(4), Some("Public")), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_a_line_and_kept() {
        let src = GO_PRIVATE.replace(
            "Address = \"tls://203.0.113.7:7770\"\n",
            "Address = \"tls://203.0.113.7:7770\"\nListenAdress = \"127.0.0.3\"\nGoOnly = 1\n",
        );
        let c = PrivateConfig::parse(p(), &src).unwrap();
        assert!(c.listen_address.is_empty(), "the misspelt key is not used");
        let w = c.unknown_keys(p(), &src);
        assert_eq!(w.len(), 2, "{w:?}");
        let listen = w.iter().find(|l| l.contains("ListenAdress")).unwrap();
        assert!(listen.contains("(line 7)"), "{listen}");
        assert!(listen.contains("did you mean ListenAddress?"), "{listen}");
        let go = w.iter().find(|l| l.contains("GoOnly")).unwrap();
        assert!(!go.contains("did you mean"), "{go}");
        assert!(c.to_toml().contains("GoOnly = 1"), "kept when written back");
        assert!(PrivateConfig::parse(p(), GO_PRIVATE)
            .unwrap()
            .unknown_keys(p(), GO_PRIVATE)
            .is_empty());
    }

    #[test]
    fn an_endless_file_is_refused_without_reading_it_all() {
        let e = PrivateConfig::load(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("longer than 4 MiB"), "{e}");
        let e = Roster::load(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("longer than 4 MiB"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let src = GO_PRIVATE.replace("Address = \"tls://203.0.113.7:7770\"\n", "");
        let e = PrivateConfig::parse(p(), &src).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("Address"));
        assert!(e.to_string().contains("missing"));
    }

    #[test]
    fn bad_address_is_named() {
        let src = GO_PRIVATE.replace("tls://203.0.113.7:7770", "udp://x:1");
        let e = PrivateConfig::parse(p(), &src).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(6), Some("Address")),
            "{e}"
        );
    }

    #[test]
    fn ws_port_follows_url_then_port_plus_one() {
        let mut c = PrivateConfig::parse(p(), GO_PRIVATE).unwrap();
        assert_eq!(c.ws_listen_addr().unwrap(), "0.0.0.0:443");
        c.url.clear();
        assert_eq!(c.ws_listen_addr().unwrap(), "0.0.0.0:7771");
        c.listen_address = "127.0.0.3".into();
        assert_eq!(c.ws_listen_addr().unwrap(), "127.0.0.3:7771");
        assert_eq!(c.listen_addr().unwrap(), "127.0.0.3:7770");
        c.ws_tls_certificate = "/c.pem".into();
        c.ws_tls_certificate_key = "/k.pem".into();
        assert_eq!(c.advertised_url(), "https://203.0.113.7:7771");
    }

    #[test]
    fn roster_parses_concatenated_public_tomls() {
        let a = PrivateConfig::parse(p(), GO_PRIVATE).unwrap();
        let one = Roster {
            servers: vec![a.server_toml()],
        }
        .to_toml();
        let two = format!("{one}{one}");
        let r = Roster::parse(Path::new("roster.toml"), &two).unwrap();
        assert_eq!(r.servers.len(), 2);
        assert_eq!(r.servers[1].address.port, 7770);
        let svc = r.servers[0].services.as_ref().unwrap();
        let bc = svc["ByzCoin"].as_table().unwrap();
        assert!(
            bc.get("Private").is_none(),
            "public.toml must not carry private keys"
        );
    }

    #[test]
    fn roster_error_points_into_the_right_server() {
        let src = "[[servers]]\n  Address = \"tls://a:1\"\n  Public = \"5866666666666666666666666666666666666666666666666666666666666666\"\n[[servers]]\n  Address = \"tls://b\"\n  Public = \"00\"\n";
        let e = Roster::parse(Path::new("r.toml"), src).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("Address")),
            "{e}"
        );
    }

    #[test]
    fn web_url_parses() {
        let u = WebUrl::parse("https://h.example/conode/").unwrap();
        assert_eq!(
            u.ws_endpoint("Status", "Request"),
            "wss://h.example:443/conode/Status/Request"
        );
        assert!(WebUrl::parse("h.example/conode").is_err());
    }
}
