//! The peer protocol over real TLS and HTTP, between the live host's shipper and a real
//! standby store behind `PeerServer`: answers that break the protocol are clear, final
//! errors, and the next snapshot ships.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conode::keys::KeyPair;
use conode::peer::PeerTls;
use failoverd::config::Timeouts;
use failoverd::error::{PeerError, ShipError};
use failoverd::metrics::Metrics;
use failoverd::peer::{PeerClient, PeerServer};
use failoverd::standby::Store;
use failoverd::status::Status;
use http_body_util::{BodyExt, Full};

mod common;
use common::{manifest, Live};

fn timeouts() -> Timeouts {
    Timeouts {
        io_stall: Duration::from_secs(5),
        connect: Duration::from_secs(5),
        answer: Duration::from_secs(60),
        conode: Duration::from_secs(1),
    }
}

/// A standby whose first answer to an offer names a chunk the manifest does not have;
/// every other request is answered by the real peer server. Returns its address and how
/// many offers it saw.
async fn forging_standby(
    server: Arc<PeerServer>,
    tls: &PeerTls,
    live_key: [u8; 32],
) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(tls.pinned_server_config(vec![live_key]).unwrap());
    let offers = Arc::new(AtomicUsize::new(0));
    let seen = offers.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (acceptor, server, seen) = (acceptor.clone(), server.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (server, seen) = (server.clone(), seen.clone());
                        async move {
                            if req.uri().path() == "/v1/offer"
                                && seen.fetch_add(1, Ordering::SeqCst) == 0
                            {
                                let _ = req.into_body().collect().await;
                                let forged = r#"{"missing":[999999],"reused_bytes":0}"#;
                                return Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    Full::new(Bytes::from(forged)),
                                ));
                            }
                            Ok(server.handle(req).await)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, offers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_naming_a_chunk_out_of_range_is_a_clear_error_and_shipping_goes_on() {
    conode::tls::install_provider();
    let d = tempfile::tempdir().unwrap();
    let mut live = Live::new(d.path());
    live.append(40, 4000);
    let (file, positions) = live.snapshot("s1.db");
    let (live_key, standby_key) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());

    let store = Arc::new(
        Store::open(
            &d.path().join("state"),
            3,
            live_key.public_bytes(),
            live.public,
        )
        .unwrap(),
    );
    let server = Arc::new(PeerServer {
        store: store.clone(),
        status: Arc::new(Status::new(store.clone())),
        metrics: Arc::new(Metrics::new()),
        timeouts: timeouts(),
        admin: d.path().join("no-conode.sock"),
        events: None,
        gate: failoverd::peer::peer_gate("127.0.0.1:1"),
        served: Arc::new(tokio::sync::Semaphore::new(16)),
    });
    let standby_tls = PeerTls::new(&standby_key).unwrap();
    let (addr, offers) = forging_standby(server, &standby_tls, live_key.public_bytes()).await;

    let client = PeerClient::new(
        &PeerTls::new(&live_key).unwrap(),
        &addr,
        standby_key.public_bytes(),
        &timeouts(),
    )
    .unwrap();
    let metrics = Metrics::new();
    let m = manifest(&live_key, live.public, 1, &file, positions);
    let env = m.seal(&live_key);

    let t = Instant::now();
    let e = failoverd::live::ship_https(&client, &metrics, &m, env.clone(), Path::new(&file))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ShipError::Peer(PeerError::Malformed { .. })),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&format!(
            "asks for chunk 999999, but the manifest has {} chunks",
            m.chunks.len()
        )),
        "{e}"
    );
    // Final at once: no resumed attempts (they wait 1 s and more).
    assert_eq!(offers.load(Ordering::SeqCst), 1);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(store.newest().is_none());

    // The next attempt, answered honestly, installs the generation.
    failoverd::live::ship_https(&client, &metrics, &m, env, Path::new(&file))
        .await
        .unwrap();
    assert_eq!(store.newest().unwrap().manifest.generation, 1);
    assert_eq!(offers.load(Ordering::SeqCst), 2);
}
