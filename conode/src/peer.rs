//! The conode-to-conode port: mutual TLS 1.3 pinned to roster Ed25519 keys, and framed
//! protobuf requests.
//!
//! # Authentication
//! Each node presents a self-signed X.509 certificate whose subject public key **is** its
//! roster Ed25519 key (signed by that key; the Go-format raw scalar signs through our own
//! `SigningKey`). There is no CA: the dialer accepts the server only if the certificate's
//! key equals the key the roster gives for the address it dialed, and TLS 1.3's
//! CertificateVerify proves the peer holds the matching private key. The acceptor requires
//! a client certificate, reads its key, and requires the dialer's first frame (`PeerHello`)
//! to claim that same key. Validity dates are not used: trust comes from the pinned key,
//! not from a clock.
//!
//! # Framing
//! Every frame is `u32` big-endian length, then that many bytes of protobuf. Frames over
//! [`MAX_FRAME`] (10 MiB, as the Go conode) close the connection. After the hello, the
//! dialer sends `PeerRequest`s and reads one `PeerReply` for each, in order.
//!
//! Hosts in `Address` are resolved at every dial (never cached), so moving an address to
//! another host is transparent to peers. We do not speak the Go conode's onet protocol on
//! this port.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureAlgorithm, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::Address;
use crate::keys::KeyPair;
use crate::ws::{BoxFuture, Tracker};

/// Largest frame accepted or sent: 10 MiB.
pub const MAX_FRAME: usize = 10 << 20;
/// Dialing (TCP connect) gives up after this.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS handshake plus hello must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Authenticated inbound connections from roster members at most; more are closed (a
/// roster has tens of members, each needing a few connections).
pub const MAX_PEER_CONNECTIONS: usize = 1024;
/// Authenticated inbound connections with keys that are no member's at most (the leader
/// of a chain not held here yet sends its genesis with one): apart from the members', so
/// made-up keys cannot take theirs.
pub const MAX_OTHER_PEER_CONNECTIONS: usize = 128;
/// A request waits this long for its reply; an idle inbound connection is closed after it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Why talking to a peer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS with {addr} failed: {source} (is the roster key for this address right?)")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} refused us: {reason}")]
    Refused { addr: String, reason: String },
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge { len: usize },
    #[error("invalid message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("remote error: {0}")]
    Remote(String),
}

// ---------------------------------------------------------------------------------------
// Wire messages of this port.

/// First frame from the dialer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerHello {
    #[prost(bytes = "vec", tag = "1")]
    pub public: Vec<u8>,
    #[prost(string, tag = "2")]
    pub address: String,
}

/// The acceptor's answer to the hello: empty `error` means accepted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerWelcome {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerRequest {
    #[prost(string, tag = "1")]
    pub service: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerReply {
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
    #[prost(string, tag = "2")]
    pub error: String,
}

/// `Peer/Ping`: the built-in authenticated round trip.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(bytes = "vec", tag = "1")]
    pub nonce: Vec<u8>,
}

/// `Peer/Ping` reply: the nonce and who answered (as authenticated by TLS).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    #[prost(bytes = "vec", tag = "1")]
    pub nonce: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub responder: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub caller: Vec<u8>,
}

// ---------------------------------------------------------------------------------------
// Keys and certificates.

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn spki_of(public: &[u8; 32]) -> Vec<u8> {
    let mut v = ED25519_SPKI_PREFIX.to_vec();
    v.extend_from_slice(public);
    v
}

/// The Ed25519 key of a certificate, read from its parsed SubjectPublicKeyInfo.
fn cert_key(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    let spki = parsed.subject_public_key_info();
    let spki: &[u8] = spki.as_ref();
    if spki.len() == 44 && spki[..12] == ED25519_SPKI_PREFIX {
        let mut k = [0u8; 32];
        k.copy_from_slice(&spki[12..]);
        Ok(k)
    } else {
        Err(rustls::Error::General(
            "peer certificate key is not Ed25519".into(),
        ))
    }
}

/// Our key as a signer for rustls (handshakes) and rcgen (the self-signed certificate).
#[derive(Debug, Clone)]
struct NodeSigner(KeyPair);

impl rustls::sign::SigningKey for NodeSigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(self.clone()) as Box<dyn rustls::sign::Signer>)
    }
    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(spki_of(
            &self.0.public_bytes(),
        )))
    }
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

impl rustls::sign::Signer for NodeSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(self.0.sign(message).to_vec())
    }
    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

struct RcgenSigner {
    keys: KeyPair,
    public: [u8; 32],
}

impl rcgen::PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl rcgen::SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.keys.sign(msg).to_vec())
    }
}

/// Our self-signed certificate, bound to the roster key.
fn certified_key(keys: &KeyPair) -> Result<Arc<CertifiedKey>, String> {
    let signer = RcgenSigner {
        keys: keys.clone(),
        public: keys.public_bytes(),
    };
    let mut params =
        rcgen::CertificateParams::new(vec!["conode".to_string()]).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("Z{}", keys.public_hex()));
    let cert = params.self_signed(&signer).map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        Arc::new(NodeSigner(keys.clone())),
    )))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// Client side: the server must present exactly the expected key.
#[derive(Debug)]
struct ExpectKey {
    expected: [u8; 32],
}

impl ServerCertVerifier for ExpectKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = cert_key(end_entity)?;
        if got != self.expected {
            return Err(rustls::Error::General(format!(
                "peer presented key {} but the roster says {}",
                hex::encode(got),
                hex::encode(self.expected)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used between conodes".into(),
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: an Ed25519 client certificate. With `pinned` (failoverd's peer port), only
/// one of those keys: anybody else fails the TLS handshake and is served nothing. Without
/// (the conode port), any key; it is then matched to the hello.
#[derive(Debug)]
struct Ed25519Clients {
    pinned: Option<Vec<[u8; 32]>>,
}

impl ClientCertVerifier for Ed25519Clients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = cert_key(end_entity)?;
        if let Some(pinned) = &self.pinned {
            if !pinned.contains(&got) {
                return Err(rustls::Error::General(format!(
                    "client key {} is not pinned",
                    hex::encode(got)
                )));
            }
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used between conodes".into(),
        ))
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Our certificate as a TLS server.
#[derive(Debug)]
struct ServerCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Our certificate as a TLS client.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS material of one node for this port.
#[derive(Clone)]
pub struct PeerTls {
    keys: KeyPair,
    cert: Arc<CertifiedKey>,
    server: Arc<rustls::ServerConfig>,
}

impl PeerTls {
    pub fn new(keys: &KeyPair) -> Result<PeerTls, String> {
        let cert = certified_key(keys)?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(Ed25519Clients { pinned: None }))
            .with_cert_resolver(Arc::new(ServerCert(cert.clone())));
        Ok(PeerTls {
            keys: keys.clone(),
            cert,
            server: Arc::new(server),
        })
    }

    pub fn public(&self) -> [u8; 32] {
        self.keys.public_bytes()
    }

    /// A TLS 1.3 server configuration presenting our key-bound certificate and accepting
    /// only clients whose certificate carries one of the `pinned` Ed25519 keys (for
    /// `failoverd`'s peer port: the handshake itself refuses anybody else).
    pub fn pinned_server_config(
        &self,
        pinned: Vec<[u8; 32]>,
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(Ed25519Clients {
                pinned: Some(pinned),
            }))
            .with_cert_resolver(Arc::new(ServerCert(self.cert.clone())));
        Ok(Arc::new(cfg))
    }

    /// A TLS 1.3 client configuration presenting our certificate and accepting only a
    /// server whose certificate carries the `expected` key. Use the server name "conode".
    pub fn client_config(&self, expected: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ExpectKey { expected }))
            .with_client_cert_resolver(Arc::new(ClientCert(self.cert.clone())));
        cfg.enable_sni = false;
        Ok(Arc::new(cfg))
    }
}

// ---------------------------------------------------------------------------------------
// Framing

/// Bytes sent and received on this port, for Status (`TX_bytes`, `RX_bytes`).
#[derive(Debug, Default)]
pub struct Counters {
    pub tx: AtomicU64,
    pub rx: AtomicU64,
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    counters: &Counters,
) -> Result<Vec<u8>, PeerError> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(PeerError::FrameTooLarge { len });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    counters.rx.fetch_add(4 + len as u64, Ordering::Relaxed);
    Ok(buf)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
    counters: &Counters,
) -> Result<(), PeerError> {
    if payload.len() > MAX_FRAME {
        return Err(PeerError::FrameTooLarge { len: payload.len() });
    }
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    counters.tx.fetch_add(buf.len() as u64, Ordering::Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Dialing

/// Connect to `to` from our own roster address (`ours`, resolved) when it is one of this
/// host's addresses, of `to`'s family and scope (loopback to loopback): the members we
/// dial then know our connections by their source address before any handshake, and give
/// them the known addresses' slots ([`crate::gate`]), also right after they restarted.
/// Otherwise (the address is not here: behind NAT, a moved virtual address) the system
/// chooses, as before.
async fn connect_from(to: SocketAddr, ours: &[IpAddr]) -> std::io::Result<TcpStream> {
    let from = ours.iter().find(|ip| {
        ip.is_ipv4() == to.is_ipv4()
            && ip.is_loopback() == to.ip().is_loopback()
            && !ip.is_unspecified()
    });
    if let Some(ip) = from {
        let sock = if to.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        if sock.bind(SocketAddr::new(*ip, 0)).is_ok() {
            if let Ok(s) = sock.connect(to).await {
                return Ok(s);
            }
        }
    }
    TcpStream::connect(to).await
}

/// An authenticated connection to one peer.
pub struct PeerConn {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    counters: Arc<Counters>,
}

impl PeerConn {
    /// Resolve `addr` now, connect, run TLS expecting `expected` as the peer's key, and
    /// introduce ourselves.
    pub async fn dial(
        tls: &PeerTls,
        our_address: &Address,
        addr: &Address,
        expected: [u8; 32],
        counters: Arc<Counters>,
    ) -> Result<PeerConn, PeerError> {
        let hp = addr.host_port();
        let targets: Vec<_> = tokio::net::lookup_host(&hp)
            .await
            .map_err(|source| PeerError::Resolve {
                addr: hp.clone(),
                source,
            })?
            .collect();
        let ours = match tokio::time::timeout(
            DIAL_TIMEOUT,
            tokio::net::lookup_host(our_address.host_port()),
        )
        .await
        {
            Ok(Ok(a)) => a.map(|a| a.ip()).collect(),
            _ => Vec::new(),
        };
        let mut last = String::from("no addresses");
        let mut tcp = None;
        for t in targets {
            match tokio::time::timeout(DIAL_TIMEOUT, connect_from(t, &ours)).await {
                Ok(Ok(s)) => {
                    tcp = Some(s);
                    break;
                }
                Ok(Err(e)) => last = format!("{t}: {e}"),
                Err(_) => last = format!("{t}: timed out after {DIAL_TIMEOUT:?}"),
            }
        }
        let tcp = tcp.ok_or_else(|| PeerError::Connect {
            addr: hp.clone(),
            reason: last,
        })?;
        let _ = tcp.set_nodelay(true);
        let connector =
            TlsConnector::from(
                tls.client_config(expected)
                    .map_err(|e| PeerError::Connect {
                        addr: hp.clone(),
                        reason: e,
                    })?,
            );
        let fut = async {
            let name = ServerName::try_from("conode").expect("static name is valid");
            let mut stream =
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|source| PeerError::Tls {
                        addr: hp.clone(),
                        source,
                    })?;
            let hello = PeerHello {
                public: tls.public().to_vec(),
                address: our_address.to_string(),
            };
            write_frame(&mut stream, &hello.encode_to_vec(), &counters).await?;
            let welcome = PeerWelcome::decode(&read_frame(&mut stream, &counters).await?[..])?;
            if !welcome.error.is_empty() {
                return Err(PeerError::Refused {
                    addr: hp.clone(),
                    reason: welcome.error,
                });
            }
            Ok(stream)
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
            .await
            .map_err(|_| PeerError::Timeout(HANDSHAKE_TIMEOUT))??;
        Ok(PeerConn { stream, counters })
    }

    /// Send one request and wait for its reply.
    pub async fn request(
        &mut self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, PeerError> {
        let req = PeerRequest {
            service: service.into(),
            method: method.into(),
            payload,
        };
        let fut = async {
            write_frame(&mut self.stream, &req.encode_to_vec(), &self.counters).await?;
            let reply =
                PeerReply::decode(&read_frame(&mut self.stream, &self.counters).await?[..])?;
            if reply.error.is_empty() {
                Ok(reply.payload)
            } else {
                Err(PeerError::Remote(reply.error))
            }
        };
        tokio::time::timeout(IO_TIMEOUT, fut)
            .await
            .map_err(|_| PeerError::Timeout(IO_TIMEOUT))?
    }
}

// ---------------------------------------------------------------------------------------
// Serving

/// Handles requests that arrive on this port. `from` is the caller's authenticated key.
pub trait PeerHandler: Send + Sync + 'static {
    fn call<'a>(
        &'a self,
        from: [u8; 32],
        service: &'a str,
        method: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>>;

    /// The roster members this handler knows (the skipchain service: the members of the
    /// chains it holds): their keys get a member's slots on this port, and their
    /// addresses the known handshake slots ([`crate::gate`]). A handler that wraps
    /// another passes its answer on.
    fn members(&self) -> Option<Arc<Members>> {
        None
    }
}

/// Roster members (key and address) of the chains a conode holds, shared by the service
/// that stores rosters and the port that gives their members priority. Rosters cannot
/// change, so members are only ever added.
#[derive(Default)]
pub struct Members {
    keys: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::collections::BTreeSet<String>>>,
    changed: tokio::sync::Notify,
}

impl Members {
    /// Add members (key, address); the port resolves new addresses at once.
    pub fn add(&self, members: impl IntoIterator<Item = ([u8; 32], Address)>) {
        let mut new = false;
        {
            let mut k = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            for (key, addr) in members {
                new |= k.entry(key).or_default().insert(addr.host_port());
            }
        }
        if new {
            self.changed.notify_one();
        }
    }

    /// Whether `key` is a member's.
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    /// Every member address, `host:port`.
    pub fn host_ports(&self) -> std::collections::BTreeSet<String> {
        let k = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        k.values().flatten().cloned().collect()
    }
}

/// How often the members' addresses are resolved again (names may move).
pub const MEMBERS_REFRESH: Duration = Duration::from_secs(60);

/// Keep `gate`'s member addresses those of `members`, resolved now, at every change and
/// every [`MEMBERS_REFRESH`], until shutdown.
async fn resolve_members(
    members: Arc<Members>,
    gate: Arc<crate::gate::Gate>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let mut ips = std::collections::HashSet::new();
        for hp in members.host_ports() {
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host(&hp)).await {
                Ok(Ok(a)) => ips.extend(a.map(|a| a.ip())),
                Ok(Err(e)) => tracing::debug!("conode port: cannot resolve member {hp}: {e}"),
                Err(_) => tracing::debug!("conode port: resolving member {hp} timed out"),
            }
        }
        gate.set_members(ips);
        tokio::select! {
            _ = members.changed.notified() => {}
            _ = tokio::time::sleep(MEMBERS_REFRESH) => {}
            _ = crate::ws::stopped(&mut shutdown) => return,
        }
    }
}

/// The built-in `Peer/Ping`, and a place for services to plug in later.
pub struct BuiltinPeerHandler {
    pub public: [u8; 32],
}

impl PeerHandler for BuiltinPeerHandler {
    fn call<'a>(
        &'a self,
        from: [u8; 32],
        service: &'a str,
        method: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            match (service, method) {
                ("Peer", "Ping") => {
                    let ping = Ping::decode(payload).map_err(|e| format!("decoding Ping: {e}"))?;
                    Ok(Pong {
                        nonce: ping.nonce,
                        responder: self.public.to_vec(),
                        caller: from.to_vec(),
                    }
                    .encode_to_vec())
                }
                _ => Err(format!("no handler for {service}/{method}")),
            }
        })
    }
}

/// Routes requests to the handler registered for their service.
#[derive(Default)]
pub struct PeerRouter(pub std::collections::BTreeMap<&'static str, Arc<dyn PeerHandler>>);

impl PeerHandler for PeerRouter {
    fn call<'a>(
        &'a self,
        from: [u8; 32],
        service: &'a str,
        method: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        match self.0.get(service) {
            Some(h) => h.call(from, service, method, payload),
            None => Box::pin(async move { Err(format!("no handler for {service}/{method}")) }),
        }
    }

    fn members(&self) -> Option<Arc<Members>> {
        self.0.values().find_map(|h| h.members())
    }
}

/// Accept peers until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: PeerTls,
    handler: Arc<dyn PeerHandler>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Tracker,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let acceptor = TlsAcceptor::from(tls.server.clone());
    // Connections in their handshake take the gate's slots; only an authenticated one
    // (a conode proving the key it claims) takes one of these: a roster member's key
    // one of the members' slots, any other key one of the others'.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
    let other_slots = Arc::new(tokio::sync::Semaphore::new(MAX_OTHER_PEER_CONNECTIONS));
    let gate = crate::gate::Gate::new(PEER_GATE, []);
    let members = handler.members();
    if let Some(m) = &members {
        tokio::spawn(resolve_members(m.clone(), gate.clone(), shutdown.clone()));
    }
    let closes = Arc::new(crate::gate::Throttled::new(PEER_GATE.log_every));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    tracing::warn!("conode port: accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = crate::ws::stopped(&mut shutdown) => break,
        };
        // A handshake slot, or the connection is closed at once (see crate::gate).
        let Some(handshake) = gate.admit(from.ip(), HANDSHAKE_TIMEOUT) else {
            continue;
        };
        let open = metrics.connection(crate::metrics::Port::Peer);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let counters = counters.clone();
        let shutdown = shutdown.clone();
        let tracker = tracker.clone();
        let (gate, slots, other_slots) = (gate.clone(), slots.clone(), other_slots.clone());
        let (members, closes) = (members.clone(), closes.clone());
        tokio::spawn(async move {
            let _tracker = tracker;
            let _open = open;
            let deadline = handshake.deadline;
            let (stream, key) = match handshake_with(tcp, &acceptor, &counters, deadline).await {
                Ok(x) => x,
                Err(e) => {
                    drop(handshake);
                    gate.refuse(from.ip(), &e.to_string());
                    return;
                }
            };
            drop(handshake);
            // Only a roster member's key makes its address known: anybody can make a
            // key and authenticate with it.
            let member = members.as_ref().is_some_and(|m| m.contains(&key));
            let (slots, max, whose) = if member {
                gate.authenticated(from.ip());
                (slots, MAX_PEER_CONNECTIONS, "roster members'")
            } else {
                (other_slots, MAX_OTHER_PEER_CONNECTIONS, "non-members'")
            };
            let Ok(_permit) = slots.try_acquire_owned() else {
                gate.refuse(
                    from.ip(),
                    &format!("{max} authenticated connections with {whose} keys already open"),
                );
                return;
            };
            if let Err(e) = serve_one(stream, key, handler, counters, shutdown).await {
                if let Some(n) = closes.note() {
                    tracing::warn!(
                        "conode port: closed {n} connection(s) on an error since the last such line, the latest from {from}: {e} (one line per {:?} at most)",
                        PEER_GATE.log_every
                    );
                }
            }
        });
    }
}

/// The conode port's handshake slots (see [`crate::gate`]): the addresses of the roster
/// members of the chains held here, and those a member's key authenticated from, have
/// their own; at most 8 handshakes from one address, a member's included.
pub const PEER_GATE: crate::gate::Limits = crate::gate::Limits {
    name: "conode port",
    known: 64,
    strangers: 64,
    per_address: 8,
    pressed: Duration::from_secs(2),
    log_every: Duration::from_secs(10),
};

type PeerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// TLS, then the hello that must claim the certificate's key, within `deadline`.
async fn handshake_with(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    counters: &Counters,
    deadline: Duration,
) -> Result<(PeerStream, [u8; 32]), PeerError> {
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(deadline, async {
        let mut stream = acceptor.accept(tcp).await?;
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .ok_or_else(|| std::io::Error::other("no client certificate"))?;
        let key = cert_key(&cert).map_err(std::io::Error::other)?;
        let hello = PeerHello::decode(&read_frame(&mut stream, counters).await?[..])?;
        if hello.public != key {
            let reason = format!(
                "certificate key {} does not match the claimed identity {}",
                hex::encode(key),
                hex::encode(&hello.public)
            );
            let w = PeerWelcome {
                error: reason.clone(),
            };
            let _ = write_frame(&mut stream, &w.encode_to_vec(), counters).await;
            return Err(PeerError::Refused {
                addr: hello.address,
                reason,
            });
        }
        write_frame(
            &mut stream,
            &PeerWelcome::default().encode_to_vec(),
            counters,
        )
        .await?;
        Ok::<_, PeerError>((stream, key))
    })
    .await
    .map_err(|_| PeerError::Timeout(deadline))?
}

async fn serve_one(
    mut stream: PeerStream,
    peer: [u8; 32],
    handler: Arc<dyn PeerHandler>,
    counters: Arc<Counters>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PeerError> {
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(IO_TIMEOUT, read_frame(&mut stream, &counters)) => f,
            _ = crate::ws::stopped(&mut shutdown) => return Ok(()),
        };
        let frame = match frame {
            Err(_) => return Ok(()), // idle
            Ok(Err(PeerError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Ok(r) => r?,
        };
        let req = PeerRequest::decode(&frame[..])?;
        let reply = match handler
            .call(peer, &req.service, &req.method, &req.payload)
            .await
        {
            Ok(payload) => PeerReply {
                payload,
                error: String::new(),
            },
            Err(error) => PeerReply {
                payload: Vec::new(),
                error,
            },
        };
        write_frame(&mut stream, &reply.encode_to_vec(), &counters).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_roster_key() {
        let kp = KeyPair::generate().unwrap();
        let ck = certified_key(&kp).unwrap();
        assert_eq!(cert_key(&ck.cert[0]).unwrap(), kp.public_bytes());
        ck.keys_match().unwrap();
    }

    #[tokio::test]
    async fn frames_over_the_limit_are_refused() {
        let c = Counters::default();
        let mut data = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        data.extend_from_slice(b"xx");
        let err = read_frame(&mut &data[..], &c).await.unwrap_err();
        assert!(matches!(err, PeerError::FrameTooLarge { .. }), "{err}");
    }
}
