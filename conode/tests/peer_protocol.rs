//! The conode-to-conode port: authentication pinned to roster keys, and bad input.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestNode;
use conode::config::Address;
use conode::keys::KeyPair;
use conode::peer::{
    self, Counters, PeerConn, PeerError, PeerHello, PeerTls, PeerWelcome, Ping, Pong,
};
use prost::Message;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn ping(from: &TestNode, to: &TestNode, expect: [u8; 32]) -> Result<Pong, PeerError> {
    let tls = PeerTls::new(&from.cfg.keys).unwrap();
    let mut c = PeerConn::dial(
        &tls,
        &from.cfg.address,
        &to.cfg.address,
        expect,
        Arc::new(Counters::default()),
    )
    .await?;
    let reply = c
        .request(
            "Peer",
            "Ping",
            Ping {
                nonce: b"n0nce".to_vec(),
            }
            .encode_to_vec(),
        )
        .await?;
    Ok(Pong::decode(&reply[..]).unwrap())
}

#[tokio::test]
async fn two_conodes_exchange_an_authenticated_message() {
    conode::tls::install_provider();
    let a = TestNode::new("A");
    let b = TestNode::new("B");
    let (sa, sb) = (a.start().await, b.start().await);
    let pong = ping(&a, &b, b.cfg.keys.public_bytes()).await.unwrap();
    assert_eq!(pong.nonce, b"n0nce");
    assert_eq!(pong.responder, b.cfg.keys.public_bytes(), "B answered");
    assert_eq!(
        pong.caller,
        a.cfg.keys.public_bytes(),
        "B saw A's authenticated key"
    );
    let back = ping(&b, &a, a.cfg.keys.public_bytes()).await.unwrap();
    assert_eq!(back.responder, a.cfg.keys.public_bytes());
    sa.stop().await;
    sb.stop().await;
}

#[tokio::test]
async fn dialer_refuses_a_server_presenting_another_key() {
    conode::tls::install_provider();
    let a = TestNode::new("A");
    let b = TestNode::new("B");
    let sb = b.start().await;
    let other = KeyPair::generate().unwrap();
    let err = ping(&a, &b, other.public_bytes()).await.unwrap_err();
    assert!(matches!(err, PeerError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("roster key"), "{err}");
    sb.stop().await;
}

#[tokio::test]
async fn address_host_names_are_resolved_at_dial() {
    conode::tls::install_provider();
    let a = TestNode::new("A");
    let b = TestNode::with_host("B", "localhost");
    let sb = b.start().await;
    assert_eq!(
        b.cfg.address.to_string(),
        format!("tls://localhost:{}", b.cfg.address.port)
    );
    let pong = ping(&a, &b, b.cfg.keys.public_bytes()).await.unwrap();
    assert_eq!(pong.responder, b.cfg.keys.public_bytes());
    sb.stop().await;
}

/// Accepts any server: lets the test act as a rogue client.
#[derive(Debug)]
struct AnyServer;
impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ]
    }
}

/// A rogue client: presents a certificate for its own fresh key (of `alg`), or none.
async fn rogue_connect(
    target: &TestNode,
    alg: Option<&'static rcgen::SignatureAlgorithm>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    Ok(rogue_connect_key(target, alg).await?.0)
}

/// As `rogue_connect`, also returning the raw public key the client presents.
async fn rogue_connect_key(
    target: &TestNode,
    alg: Option<&'static rcgen::SignatureAlgorithm>,
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>)> {
    use rcgen::PublicKeyData;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut raw = Vec::new();
    let cfg = match alg {
        Some(alg) => {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            raw = kp.der_bytes().to_vec();
            let cert = rcgen::CertificateParams::new(vec!["rogue".to_string()])
                .unwrap()
                .self_signed(&kp)
                .unwrap();
            let key = PrivatePkcs8KeyDer::from(kp.serialize_der());
            builder
                .with_client_auth_cert(vec![cert.der().clone()], key.into())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(("127.0.0.1", target.cfg.address.port)).await?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("conode").unwrap(), tcp)
        .await?;
    // TLS 1.3 client auth failures surface on the first read.
    s.flush().await?;
    Ok((s, raw))
}

#[tokio::test]
async fn a_client_claiming_an_identity_whose_key_it_lacks_is_refused() {
    conode::tls::install_provider();
    let victim = TestNode::new("victim");
    let b = TestNode::new("B");
    let sb = b.start().await;
    let mut s = rogue_connect(&b, Some(&rcgen::PKCS_ED25519)).await.unwrap();
    let c = Counters::default();
    let hello = PeerHello {
        public: victim.cfg.keys.public_bytes().to_vec(),
        address: victim.cfg.address.to_string(),
    };
    peer::write_frame(&mut s, &hello.encode_to_vec(), &c)
        .await
        .unwrap();
    let w = PeerWelcome::decode(&peer::read_frame(&mut s, &c).await.unwrap()[..]).unwrap();
    assert!(
        w.error.contains("does not match the claimed identity"),
        "{}",
        w.error
    );
    // And nothing more is served on that connection.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The honest node still gets through.
    ping(&victim, &b, b.cfg.keys.public_bytes()).await.unwrap();
    sb.stop().await;
}

async fn refused_at_tls(s: std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>) -> bool {
    match s {
        Err(_) => true,
        Ok(mut s) => {
            let hello = PeerHello {
                public: vec![0; 32],
                address: String::new(),
            };
            let c = Counters::default();
            let _ = peer::write_frame(&mut s, &hello.encode_to_vec(), &c).await;
            peer::read_frame(&mut s, &c).await.is_err()
        }
    }
}

#[tokio::test]
async fn clients_without_an_ed25519_certificate_are_refused() {
    conode::tls::install_provider();
    let b = TestNode::new("B");
    let sb = b.start().await;
    assert!(
        refused_at_tls(rogue_connect(&b, None).await).await,
        "no certificate must be refused"
    );
    assert!(
        refused_at_tls(rogue_connect(&b, Some(&rcgen::PKCS_ECDSA_P256_SHA256)).await).await,
        "a non-Ed25519 key must be refused"
    );
    sb.stop().await;
}

#[tokio::test]
async fn garbage_oversized_and_invalid_frames_close_only_that_connection() {
    conode::tls::install_provider();
    let a = TestNode::new("A");
    let b = TestNode::new("B");
    let sb = b.start().await;
    // Garbage instead of TLS.
    let mut g = TcpStream::connect(("127.0.0.1", b.cfg.address.port))
        .await
        .unwrap();
    g.write_all(b"GET / HTTP/1.0\r\n\r\n not tls at all")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), g.read_to_end(&mut out))
        .await
        .unwrap()
        .ok();
    ping(&a, &b, b.cfg.keys.public_bytes()).await.unwrap();

    // An authenticated peer (its hello claims the key it really holds), then an oversized
    // frame header, or an invalid protobuf: that connection is closed, nothing is answered.
    let invalid = {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend_from_slice(&[0xff, 0xff, 0xff]);
        v
    };
    let oversized = ((peer::MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    for bad in [oversized, invalid] {
        let (mut s, own_key) = rogue_connect_key(&b, Some(&rcgen::PKCS_ED25519))
            .await
            .unwrap();
        assert_eq!(own_key.len(), 32);
        let c = Counters::default();
        let hello = PeerHello {
            public: own_key,
            address: "tls://127.0.0.1:1".into(),
        };
        peer::write_frame(&mut s, &hello.encode_to_vec(), &c)
            .await
            .unwrap();
        let w = PeerWelcome::decode(&peer::read_frame(&mut s, &c).await.unwrap()[..]).unwrap();
        assert_eq!(w.error, "", "an honest hello is welcome");
        s.write_all(&bad).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert_eq!(n, 0, "no reply to a bad frame: the connection is closed");
        ping(&a, &b, b.cfg.keys.public_bytes()).await.unwrap();
    }
    sb.stop().await;
}

#[tokio::test]
async fn half_open_peer_connection_is_dropped_and_others_are_served() {
    conode::tls::install_provider();
    let a = TestNode::new("A");
    let b = TestNode::new("B");
    let sb = b.start().await;
    let mut idle = TcpStream::connect(("127.0.0.1", b.cfg.address.port))
        .await
        .unwrap();
    ping(&a, &b, b.cfg.keys.public_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let limit = peer::HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    tokio::time::timeout(limit, idle.read_to_end(&mut buf))
        .await
        .expect("dropped after the handshake timeout")
        .ok();
    sb.stop().await;
}

#[test]
fn tls_address_is_what_peers_dial() {
    let a = Address::parse("tls://conode.example.org:7770").unwrap();
    assert_eq!(a.host_port(), "conode.example.org:7770");
}
