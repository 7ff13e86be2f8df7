//! A client of the WebSocket protocol, as the Go and JS clients use it: one new
//! connection per request, `ws://host:port+1/...` or the server's `URL`.
//!
//! `wss://` servers are verified against the system's trust store (and `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` when set), like any HTTPS client. This module never writes files.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::config::{join_host_port, Roster, ServerToml};
use crate::proto::StatusResponse;
use crate::ws::MAX_MESSAGE;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CFG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CFG.get_or_init(|| {
        crate::tls::install_provider();
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(format!(
                "no trusted CA certificates found (system store or SSL_CERT_FILE): {:?}",
                found.errors.first().map(|e| e.to_string())
            ));
        }
        Ok(Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    })
    .clone()
}

/// How an error from [`call`] starts when the server answered with a refusal (a close
/// frame with its reason) rather than the request failing on the way.
pub const REFUSED_BY_SERVER: &str = "closed by the server";

/// Whether an error from [`call`] is the server's own answer (it refused the request),
/// as opposed to a failure to reach it or to complete the exchange.
pub fn refused_by_server(err: &str) -> bool {
    err.starts_with(REFUSED_BY_SERVER)
}

/// Send one request to `server` and return the reply's bytes.
pub async fn call(
    server: &ServerToml,
    service: &str,
    method: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let url = server.web_url()?;
    let endpoint = url.ws_endpoint(service, method);
    let hp = join_host_port(&url.host, url.port);
    let tcp = TcpStream::connect(&hp)
        .await
        .map_err(|e| format!("cannot connect to {hp}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if url.tls {
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| format!("{}: not a valid TLS name: {e}", url.host))?;
        let s = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {hp} failed: {e}"))?;
        Box::new(s)
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE));
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(endpoint.as_str(), stream, Some(config))
            .await
            .map_err(|e| format!("WebSocket handshake with {endpoint} failed: {e}"))?;
    ws.send(Message::binary(body))
        .await
        .map_err(|e| format!("sending to {endpoint}: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                let _ = ws.close(None).await;
                return Ok(b.to_vec());
            }
            Some(Ok(Message::Text(t))) => {
                let _ = ws.close(None).await;
                return Ok(t.as_bytes().to_vec());
            }
            Some(Ok(Message::Close(Some(f)))) => {
                return Err(format!(
                    "{REFUSED_BY_SERVER} ({}): {}",
                    u16::from(f.code),
                    f.reason
                ))
            }
            Some(Ok(Message::Close(None))) | None => {
                return Err("connection closed without a reply".into())
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("reading from {endpoint}: {e}")),
        }
    }
}

/// Ask `server` for its status, within `timeout`.
pub async fn status(server: &ServerToml, timeout: Duration) -> Result<StatusResponse, String> {
    let reply = tokio::time::timeout(timeout, call(server, "Status", "Request", Vec::new()))
        .await
        .map_err(|_| format!("no answer within {}s", timeout.as_secs_f32()))??;
    StatusResponse::decode(&reply[..]).map_err(|e| format!("invalid Status reply: {e}"))
}

/// `conode check`: ask every server in parallel; one line per server. Returns whether all
/// answered.
pub async fn check(roster: &Roster, timeout: Duration, out: &mut impl std::io::Write) -> bool {
    let results =
        futures_util::future::join_all(roster.servers.iter().map(|s| status(s, timeout))).await;
    let mut all = true;
    for (s, r) in roster.servers.iter().zip(results) {
        let line = match r {
            Ok(resp) => {
                let get = |sec: &str, k: &str| {
                    resp.status
                        .get(sec)
                        .and_then(|st| st.field.get(k))
                        .cloned()
                        .unwrap_or_else(|| "?".into())
                };
                let claimed = resp
                    .serveridentity
                    .as_ref()
                    .and_then(|si| crate::proto::untag_point(&si.public));
                if claimed != Some(s.public) {
                    all = false;
                    format!(
                        "{}\terror: answered with another public key than the roster's ({})",
                        s.address,
                        claimed.map(hex::encode).unwrap_or_else(|| "none".into())
                    )
                } else {
                    format!(
                        "{}\t{:?}\tversion {}\tuptime {}",
                        s.address,
                        get("Generic", "Description"),
                        get("Conode", "version"),
                        get("Generic", "Uptime")
                    )
                }
            }
            Err(e) => {
                all = false;
                format!("{}\terror: {e}", s.address)
            }
        };
        let _ = writeln!(out, "{line}");
    }
    all
}
