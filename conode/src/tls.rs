//! Built-in TLS on the client WebSocket port, with certificate renewal without restart.
//!
//! The certificate and key files (`WebSocketTLSCertificate[Key]`, a path or `file://path`)
//! are re-read every [`POLL_INTERVAL`]. Content is compared, not timestamps, so any way of
//! replacing them works: rewriting in place, rename, or certbot's symlink swap
//! (`live/x/fullchain.pem` → `archive/x/fullchainN.pem`). A new pair is used only if the
//! chain parses, the key parses, and the key matches the leaf certificate; otherwise the
//! current certificate keeps serving and one warning says why (a half-written file is
//! simply retried at the next poll, when it is complete). New connections get a new
//! certificate within one poll interval; established connections are not disturbed.
//!
//! This module never writes to the certificate files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// How often the files are re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Install the one crypto provider of the workspace (ring). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A PEM error in words (the library's Display shows markers as raw bytes).
fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "incomplete PEM: no \"-----END {}-----\" line (half-written or truncated file?)",
            String::from_utf8_lossy(&end_marker)
        ),
        E::IllegalSectionStart { line } => {
            format!("bad PEM BEGIN line {:?}", String::from_utf8_lossy(&line))
        }
        E::NoItemsFound => "no PEM item of the expected kind".into(),
        other => other.to_string(),
    }
}

/// Parse a PEM chain and key and check they belong together.
pub fn load_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file: {}", pem_error(e)))?;
    if chain.is_empty() {
        return Err("certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("key file holds no usable private key: {}", pem_error(e)))?;
    let provider = rustls::crypto::ring::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("certificate and key do not belong together: {e}"))?;
    Ok(ck)
}

/// Serves the current certificate to every new TLS handshake.
#[derive(Debug)]
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the last poll saw, to act (and log) once per change.
    last_seen: Mutex<Seen>,
}

/// What a poll found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Both files read: their contents.
    Pair(Vec<u8>, Vec<u8>),
    /// A file could not be read: why.
    Unreadable(String),
}

/// The largest certificate or key file read (a chain of a few certificates is some KiB;
/// the files are read again every second, so one that is not a PEM file must not make
/// the conode read without end: `/dev/zero`, a log by mistake).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

fn read(p: &Path) -> Result<Vec<u8>, String> {
    crate::config::read_capped(p, MAX_PEM_BYTES).map_err(|e| format!("{}: {e}", p.display()))
}

impl CertReloader {
    /// Load the pair; an error here stops the server from starting (nothing to serve).
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<CertReloader>, String> {
        let c = read(&cert_path)?;
        let k = read(&key_path)?;
        let ck = load_pair(&c, &k).map_err(|e| {
            format!(
                "WebSocket TLS pair {} / {}: {e}",
                cert_path.display(),
                key_path.display()
            )
        })?;
        Ok(Arc::new(CertReloader {
            cert_path,
            key_path,
            current: RwLock::new(Arc::new(ck)),
            last_seen: Mutex::new(Seen::Pair(c, k)),
        }))
    }

    /// Re-read the files. `None` if unchanged since the last try, else whether the new pair
    /// was taken.
    pub fn poll_once(&self) -> Option<Result<(), String>> {
        let now = match (read(&self.cert_path), read(&self.key_path)) {
            (Ok(c), Ok(k)) => Seen::Pair(c, k),
            // Unreadable (mid-swap, dangling link): retried at every poll, logged once.
            (Err(e), _) | (_, Err(e)) => Seen::Unreadable(e),
        };
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return None;
            }
            *seen = now.clone();
        }
        let (c, k) = match now {
            Seen::Pair(c, k) => (c, k),
            Seen::Unreadable(e) => return Some(Err(e)),
        };
        match load_pair(&c, &k) {
            Ok(ck) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                Some(Ok(()))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Poll until shutdown, logging every change.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::ws::stopped(&mut shutdown) => return,
            }
            let me = self.clone();
            let r = tokio::task::spawn_blocking(move || me.poll_once()).await;
            match r {
                Ok(Some(Ok(()))) => tracing::info!(
                    "WebSocket TLS: new certificate from {} now served to new connections",
                    self.cert_path.display()
                ),
                Ok(Some(Err(e))) => tracing::warn!(
                    "WebSocket TLS: keeping the current certificate: the pair {} / {} was rejected: {e}; it is re-read every {}s",
                    self.cert_path.display(),
                    self.key_path.display(),
                    POLL_INTERVAL.as_secs()
                ),
                Ok(None) => {}
                Err(e) => tracing::error!("WebSocket TLS poll task failed: {e}; this is a bug"),
            }
        }
    }

    /// A server configuration that asks this reloader at every handshake.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_no_client_auth().with_cert_resolver(self.clone()))
        .expect("ring supports the default protocol versions");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        (cert.pem(), kp.serialize_pem())
    }

    #[test]
    fn reloader_takes_good_pairs_and_keeps_the_old_one_on_bad_ones() {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair("one.test");
        let (c2, k2) = pair("two.test");
        let cp = dir.path().join("fullchain.pem");
        let kp = dir.path().join("privkey.pem");
        std::fs::write(&cp, &c1).unwrap();
        std::fs::write(&kp, &k1).unwrap();
        let r = CertReloader::new(cp.clone(), kp.clone()).unwrap();
        let first = r.current.read().unwrap().cert[0].clone();
        assert!(r.poll_once().is_none(), "unchanged files are not reloaded");

        // Mismatched pair: certificate two with key one.
        std::fs::write(&cp, &c2).unwrap();
        assert!(r
            .poll_once()
            .unwrap()
            .unwrap_err()
            .contains("do not belong together"));
        assert_eq!(r.current.read().unwrap().cert[0], first);

        // Half-written certificate.
        std::fs::write(&cp, &c2[..c2.len() / 2]).unwrap();
        std::fs::write(&kp, &k2).unwrap();
        let e = r.poll_once().unwrap().unwrap_err();
        assert!(
            e.contains("incomplete PEM: no \"-----END CERTIFICATE-----\" line"),
            "{e}"
        );
        assert_eq!(r.current.read().unwrap().cert[0], first);

        // Completed: taken.
        std::fs::write(&cp, &c2).unwrap();
        r.poll_once().unwrap().unwrap();
        assert_ne!(r.current.read().unwrap().cert[0], first);
    }

    /// A certificate or key path that names an endless file (read again every second)
    /// is refused after `MAX_PEM_BYTES`, at start and at a reload, with a clear error;
    /// the pair in use is kept.
    #[test]
    fn endless_certificate_or_key_files_are_refused() {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pair("one.test");
        let cp = dir.path().join("fullchain.pem");
        let kp = dir.path().join("privkey.pem");
        std::fs::write(&cp, &c1).unwrap();
        std::fs::write(&kp, &k1).unwrap();
        let zero = PathBuf::from("/dev/zero");
        for (c, k) in [(zero.clone(), kp.clone()), (cp.clone(), zero.clone())] {
            let e = CertReloader::new(c, k).unwrap_err();
            assert!(e.contains("/dev/zero: longer than 1 MiB"), "{e}");
        }
        let r = CertReloader::new(cp.clone(), kp.clone()).unwrap();
        let first = r.current.read().unwrap().cert[0].clone();
        std::fs::remove_file(&kp).unwrap();
        std::os::unix::fs::symlink(&zero, &kp).unwrap();
        let e = r.poll_once().unwrap().unwrap_err();
        assert!(e.contains("longer than 1 MiB"), "{e}");
        assert_eq!(r.current.read().unwrap().cert[0], first);
    }
}
