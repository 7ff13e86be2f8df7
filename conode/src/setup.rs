//! `conode setup`: create a key pair and write `private.toml` (0600) and `public.toml`.
//!
//! The interactive dialogue follows the Go conode's prompts and defaults (port 7770,
//! `tls://` address, description, folder, "Override? [Yn]"). Where Go fetches the public
//! IP from the internet, we ask for it. Nothing is written until every answer is in, and
//! an existing `private.toml` is never replaced without an explicit yes (interactive) or
//! `--force` (non-interactive): it holds the node's identity.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use crate::config::{write_atomic, Address, PrivateConfig, Roster, Scheme};
use crate::keys::KeyPair;

pub const DEFAULT_PORT: u16 = 7770;

fn ask(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    prompt: &str,
    default: &str,
) -> Result<String, String> {
    write!(out, "\n{prompt} [{default}]: ").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let a = line.trim();
    Ok(if a.is_empty() {
        default.to_string()
    } else {
        a.to_string()
    })
}

/// Parse `[address:]PORT`: returns (host if given, port).
pub fn parse_host_port(s: &str) -> Result<(Option<String>, u16), String> {
    let bad =
        || format!("{s:?} is not [address:]PORT (for example 7770 or conode.example.org:7770)");
    if let Ok(p) = s.parse::<u16>() {
        return if p == 0 || p == u16::MAX {
            Err(bad())
        } else {
            Ok((None, p))
        };
    }
    let a = Address::parse(&format!("tls://{s}")).map_err(|_| bad())?;
    if a.host.is_empty() || a.port == u16::MAX {
        return Err(bad());
    }
    Ok((Some(a.host), a.port))
}

/// The `--host` of a non-interactive setup: an IP address (an IPv6 one with or without
/// brackets) or a DNS name; required, since other nodes reach this one there.
pub fn server_host(host: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("--host is required with --non-interactive: the IP address or DNS name other nodes reach this one at (for example --host conode.example.org)".into());
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        if ip.is_unspecified() {
            return Err(format!(
                "--host {host}: the unspecified address is not one other nodes can reach"
            ));
        }
        return Ok(ip.to_string());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "--host {host:?} is neither an IP address nor a DNS name (letters, digits and '-' in dot-separated labels)"
        ));
    }
    Ok(name.to_string())
}

/// Write both files into `dir`.
pub fn write_files(private_path: &Path, cfg: &PrivateConfig) -> Result<PathBuf, String> {
    let dir = private_path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let public_path = dir.join("public.toml");
    write_atomic(private_path, cfg.to_toml().as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", private_path.display()))?;
    let roster = Roster {
        servers: vec![cfg.server_toml()],
    };
    write_atomic(&public_path, roster.to_toml().as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", public_path.display()))?;
    Ok(public_path)
}

/// The interactive dialogue. Returns the path of the written private.toml.
pub fn interactive(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    default_dir: &Path,
) -> Result<PathBuf, String> {
    let _ = writeln!(out, "Setting up a cothority-server.");
    let hp = ask(
        input,
        out,
        "Please enter the [address:]PORT for incoming to bind to and where other nodes will be able to contact you.",
        &DEFAULT_PORT.to_string(),
    )?;
    let (host, port) = parse_host_port(&hp)?;
    let host = match host {
        Some(h) => h,
        None => ask(
            input,
            out,
            "IP-address or host name where your server can be reached",
            "127.0.0.1",
        )?,
    };
    let address = Address {
        scheme: Scheme::Tls,
        host,
        port,
    };
    let keys = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let _ = writeln!(out, "Public key: {}", keys.public_hex());
    let description = ask(
        input,
        out,
        "Give a description of the cothority",
        "New cothority",
    )?;
    let dir = PathBuf::from(ask(
        input,
        out,
        "Please enter a folder for the configuration files",
        &default_dir.display().to_string(),
    )?);
    let private_path = dir.join("private.toml");
    for f in [private_path.clone(), dir.join("public.toml")] {
        if f.exists() {
            let a = ask(
                input,
                out,
                &format!(
                    "Configuration file {} already exists. Override? [Yn]",
                    f.display()
                ),
                "Y",
            )?;
            if !a.eq_ignore_ascii_case("y") && !a.eq_ignore_ascii_case("yes") {
                return Err(format!(
                    "{} exists and was kept; nothing was written",
                    f.display()
                ));
            }
        }
    }
    let cfg = PrivateConfig::new(keys, address, description);
    let public_path = write_files(&private_path, &cfg)?;
    let _ = writeln!(
        out,
        "Success! You can now use the conode with the config file {}\nSaved a group definition snippet for your server at {}\n{}\nAll configurations saved, ready to serve signatures now.",
        private_path.display(),
        public_path.display(),
        Roster { servers: vec![cfg.server_toml()] }.to_toml()
    );
    Ok(private_path)
}

/// `setup --non-interactive`.
pub fn non_interactive(
    private_path: &Path,
    host: &str,
    port: u16,
    description: &str,
    force: bool,
) -> Result<PathBuf, String> {
    if private_path.exists() && !force {
        return Err(format!(
            "{} already exists and holds this node's identity: not overwriting it (remove it first, or pass --force)",
            private_path.display()
        ));
    }
    if port == 0 || port == u16::MAX {
        return Err(format!(
            "--port {port}: must be 1..65534 (the WebSocket port is port+1)"
        ));
    }
    let host = server_host(host)?;
    let keys = KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let address = Address {
        scheme: Scheme::Tls,
        host,
        port,
    };
    let cfg = PrivateConfig::new(keys, address, description.to_string());
    write_files(private_path, &cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn interactive_writes_both_files_with_go_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfgdir = dir.path().join("co1");
        let answers = format!("\n127.0.0.2\nMy node\n{}\n", cfgdir.display());
        let mut out = Vec::new();
        let p = interactive(&mut answers.as_bytes(), &mut out, dir.path()).unwrap();
        let c = PrivateConfig::load(&p).unwrap();
        assert_eq!(c.address.to_string(), "tls://127.0.0.2:7770");
        assert_eq!(c.description, "My node");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let r = Roster::load(&cfgdir.join("public.toml")).unwrap();
        assert_eq!(r.servers[0].public, c.keys.public_bytes());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("[address:]PORT"), "{text}");
    }

    #[test]
    fn interactive_keeps_existing_files_when_told_no() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("private.toml");
        std::fs::write(&p, "precious").unwrap();
        let answers = format!("h.example:7000\nd\n{}\nn\n", dir.path().display());
        let e = interactive(&mut answers.as_bytes(), &mut Vec::new(), dir.path()).unwrap_err();
        assert!(e.contains("nothing was written"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
    }

    #[test]
    fn non_interactive_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("private.toml");
        non_interactive(&p, "127.0.0.1", 7000, "x", false).unwrap();
        let before = std::fs::read_to_string(&p).unwrap();
        assert!(non_interactive(&p, "127.0.0.1", 7000, "x", false).is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), before);
        non_interactive(&p, "127.0.0.1", 7000, "x", true).unwrap();
        assert_ne!(std::fs::read_to_string(&p).unwrap(), before);
    }

    #[test]
    fn a_non_interactive_setup_needs_a_reachable_host() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("private.toml");
        for bad in [
            "",
            "0.0.0.0",
            "::",
            "a b",
            "x/y",
            "-a.example",
            "a..b",
            "tls://a",
            "a:1",
        ] {
            let e = non_interactive(&p, bad, 7770, "d", false).unwrap_err();
            assert!(e.contains("--host"), "{bad:?}: {e}");
            assert!(!p.exists(), "{bad:?}: nothing written");
        }
        for (good, stored) in [
            ("conode.example.org", "tls://conode.example.org:7770"),
            ("10.0.0.1", "tls://10.0.0.1:7770"),
            ("[fd00::1]", "tls://[fd00::1]:7770"),
            ("fd00::1", "tls://[fd00::1]:7770"),
        ] {
            non_interactive(&p, good, 7770, "d", true).unwrap();
            let c = PrivateConfig::load(&p).unwrap();
            assert_eq!(c.address.to_string(), stored);
        }
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("7770").unwrap(), (None, 7770));
        assert_eq!(
            parse_host_port("a.example:1").unwrap(),
            (Some("a.example".into()), 1)
        );
        assert!(parse_host_port("nonsense").is_err());
        assert!(parse_host_port("0").is_err());
    }
}
