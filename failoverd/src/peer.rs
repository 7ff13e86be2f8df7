//! The peer port: HTTPS between the two failoverds, both sides pinned to each other's
//! Ed25519 key (self-signed certificates bound to the key, as on the conode port). A
//! client without the pinned key fails the TLS handshake: it gets no status, cannot
//! upload, cannot command.
//!
//! # API (version 1; JSON answers; errors are `{"error":"<words>"}` with status 4xx/5xx)
//! - `GET /v1/status`: the generations this host holds.
//! - `POST /v1/offer` (body: a signed manifest envelope): start or resume receiving that
//!   generation; answers `{"missing":[chunk indices],"reused_bytes":N}` (one index per
//!   distinct chunk content: the standby writes the same bytes wherever they recur).
//! - `PUT /v1/chunks/<generation>` (body: frames of `index u32 LE ‖ len u32 LE ‖ bytes`):
//!   each chunk is checked against the manifest's hash before it is written; answers
//!   `{"stored":N}`. A bad chunk ends the request with 409 and its reason.
//! - `GET /v1/hashes`: the chunk hashes of the newest generation this host holds, as
//!   `{"generation":G,"hashes":"<hex, 32 bytes each>"}` (G 0 and no hashes when none): what
//!   a live host streaming a whole image need not send.
//! - `PUT /v1/stream/<generation>/<bytes>` (body: frames of `offset u64 LE ‖ len u32 LE ‖
//!   bytes`): chunks of a whole image streamed while the live host takes it, before its
//!   manifest exists. Each frame is written at its offset and hashed; it counts only once
//!   the manifest, offered next, names that hash at that offset. A frame whose len has its
//!   top bit set ([`ZEROS`]) carries no bytes: that many zeros at that offset (a chunk of
//!   zeros, never sent). Answers `{"stored":N}`.
//! - `POST /v1/commit/<generation>`: verify and install; answers the installed generation.
//! - `POST /v1/inbox` (body: a signed envelope naming a file in the inbox): verify the file
//!   that rsync or scp delivered, and install it.

use std::sync::Arc;
use std::time::Duration;

use conode::peer::PeerTls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::http;
use crate::manifest::MAX_ENVELOPE;
use crate::state::Shared;

/// Connect timeout to the peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest chunk frame accepted (the manifest's own limit is checked after).
const MAX_FRAME: u32 = 16 << 20;
/// In a stream frame's len: no bytes follow, the frame is that many zeros.
pub const ZEROS: u32 = 1 << 31;

/// What a frame carries.
enum Body<'a> {
    Bytes(&'a [u8]),
    /// [`ZEROS`]: this many zero bytes, none sent.
    Zeros(u32),
}

/// The client side: one HTTPS request per connection to the pinned peer.
#[derive(Clone)]
pub struct PeerClient {
    address: String,
    connector: TlsConnector,
    /// How long one read or write may stall before the request is given up.
    pub io_timeout: Duration,
}

pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The JSON body, or the peer's error in words.
    pub fn json(&self, what: &str) -> Result<serde_json::Value, String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .map_err(|e| format!("{what}: the peer's answer is not JSON ({e})"))?;
        if self.status != 200 {
            let msg = v
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given");
            return Err(format!("{what}: the peer refused: {msg}"));
        }
        Ok(v)
    }
}

async fn timed<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(d, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no progress for {d:?}")),
    }
}

pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

impl PeerClient {
    pub fn new(tls: &PeerTls, address: String, peer_key: [u8; 32]) -> Result<PeerClient, String> {
        Ok(PeerClient {
            address,
            connector: TlsConnector::from(tls.client_config(peer_key)?),
            io_timeout: Duration::from_secs(30),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    async fn connect(&self) -> Result<ClientStream, String> {
        let what = format!("peer {}", self.address);
        let tcp = timed(CONNECT_TIMEOUT, &what, TcpStream::connect(&self.address)).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("conode").expect("static name is valid");
        timed(CONNECT_TIMEOUT, &what, self.connector.connect(name, tcp)).await
    }

    /// A request with a body in memory.
    pub async fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<Answer, String> {
        let mut s = self.connect().await?;
        let what = format!("{method} {path} to {}", self.address);
        timed(
            self.io_timeout,
            &what,
            http::write_request_head(&mut s, method, path, body.len() as u64),
        )
        .await?;
        for part in body.chunks(1 << 20) {
            timed(self.io_timeout, &what, s.write_all(part)).await?;
        }
        timed(self.io_timeout, &what, s.flush()).await?;
        self.answer(s, &what).await
    }

    /// Open a request whose body (`len` bytes) the caller streams with [`write_part`]
    /// and then [`finish`].
    pub async fn start(&self, method: &str, path: &str, len: u64) -> Result<ClientStream, String> {
        let mut s = self.connect().await?;
        timed(
            self.io_timeout,
            "sending to the peer",
            http::write_request_head(&mut s, method, path, len),
        )
        .await?;
        Ok(s)
    }

    pub async fn write_part(&self, s: &mut ClientStream, data: &[u8]) -> Result<(), String> {
        timed(self.io_timeout, "sending to the peer", s.write_all(data)).await
    }

    pub async fn finish(&self, mut s: ClientStream) -> Result<Answer, String> {
        timed(self.io_timeout, "sending to the peer", s.flush()).await?;
        self.answer(s, "waiting for the peer's answer").await
    }

    async fn answer(&self, s: ClientStream, what: &str) -> Result<Answer, String> {
        let mut r = BufReader::new(s);
        let head = tokio::time::timeout(
            self.io_timeout.max(Duration::from_secs(600)),
            http::read_response(&mut r),
        )
        .await
        .map_err(|_| format!("{what}: no answer"))??;
        let body =
            http::read_body(&mut r, head.content_length, MAX_ENVELOPE, self.io_timeout).await?;
        Ok(Answer {
            status: head.status,
            body,
        })
    }
}

/// Serve the peer port until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("peer port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("peer port: refusing {from}: 16 connections already open");
            continue;
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!("peer port: refused {from}: {e}");
                    shared.count_failure("unauthenticated");
                    return;
                }
                Err(_) => {
                    tracing::warn!("peer port: {from} did not finish the TLS handshake");
                    return;
                }
            };
            if let Err(e) = serve_one(tls, &shared).await {
                tracing::warn!("peer port: request from {from}: {e}");
            }
        });
    }
}

fn error_body(e: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": e })).expect("json")
}

async fn serve_one(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    shared: &Arc<Shared>,
) -> Result<(), String> {
    // Small: chunk frames larger than the buffer are read straight into place past it.
    let mut r = BufReader::with_capacity(4 << 10, tls);
    let Some(head) = http::read_request(&mut r).await? else {
        return Ok(());
    };
    let io_timeout = shared.io_timeout;
    let result: Result<serde_json::Value, (u16, String)> = match (
        head.method.as_str(),
        head.path.as_str(),
    ) {
        ("GET", "/v1/status") => Ok(shared.peer_status()),
        ("GET", "/v1/hashes") => Ok(match shared.store.newest() {
            Some(n) => {
                let mut h = Vec::with_capacity(n.manifest.chunks.len() * 32);
                for c in &n.manifest.chunks {
                    h.extend_from_slice(&c.hash);
                }
                serde_json::json!({"generation": n.manifest.generation, "hashes": hex::encode(h)})
            }
            None => serde_json::json!({"generation": 0, "hashes": ""}),
        }),
        ("POST", "/v1/offer") => {
            let body =
                http::read_body(&mut r, head.content_length, MAX_ENVELOPE, io_timeout).await?;
            match shared.refuse_if_live().await {
                Err(e) => Err((409, e)),
                Ok(()) => {
                    let store = shared.store.clone();
                    match tokio::task::spawn_blocking(move || store.offer(&body)).await {
                        Ok(Ok(o)) => Ok(
                            serde_json::json!({"missing": o.missing, "reused_bytes": o.reused_bytes}),
                        ),
                        Ok(Err(e)) => {
                            shared.refused(&e);
                            Err((409, e))
                        }
                        Err(e) => Err((500, format!("offer failed: {e}"))),
                    }
                }
            }
        }
        ("PUT", p) if p.starts_with("/v1/chunks/") => {
            match p["/v1/chunks/".len()..].parse::<u64>() {
                Err(_) => Err((404, format!("no such path {p}"))),
                Ok(generation) => {
                    receive_chunks(&mut r, head.content_length, generation, shared).await
                }
            }
        }
        ("PUT", p) if p.starts_with("/v1/stream/") => {
            let parsed = p["/v1/stream/".len()..]
                .split_once('/')
                .and_then(|(g, b)| Some((g.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            match parsed {
                None => Err((404, format!("no such path {p}"))),
                Some((generation, bytes)) => match shared.refuse_if_live().await {
                    Err(e) => Err((409, e)),
                    Ok(()) => {
                        receive_stream(&mut r, head.content_length, generation, bytes, shared).await
                    }
                },
            }
        }
        ("POST", p) if p.starts_with("/v1/commit/") => {
            match p["/v1/commit/".len()..].parse::<u64>() {
                Err(_) => Err((404, format!("no such path {p}"))),
                Ok(generation) => install(shared, move |st| st.commit(generation)).await,
            }
        }
        ("POST", "/v1/inbox") => {
            let body =
                http::read_body(&mut r, head.content_length, MAX_ENVELOPE, io_timeout).await?;
            match shared.refuse_if_live().await {
                Err(e) => Err((409, e)),
                Ok(()) => install(shared, move |st| st.install_inbox(&body)).await,
            }
        }
        (m, p) => Err((404, format!("no such request {m} {p}"))),
    };
    let mut s = r.into_inner();
    match result {
        Ok(v) => {
            http::write_response(
                &mut s,
                200,
                "application/json",
                &serde_json::to_vec(&v).expect("json"),
            )
            .await
        }
        Err((status, e)) => {
            http::write_response(&mut s, status, "application/json", &error_body(&e)).await
        }
    }
    .map_err(|e| format!("answering: {e}"))?;
    let _ = s.shutdown().await;
    Ok(())
}

/// Read the frames filling a `len`-byte body: an `H`-byte header ending in the frame's
/// length (u32 LE), then that many bytes; each goes to `each`. Returns how many.
async fn read_frames<const H: usize, R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    len: u64,
    io_timeout: Duration,
    mut each: impl FnMut(&[u8; H], Body) -> Result<(), (u16, String)>,
) -> Result<u64, (u16, String)> {
    let mut left = len;
    let mut frames = 0u64;
    let mut buf = Vec::new();
    let read = |e: std::io::Error| (400, format!("reading chunks: {e}"));
    while left > 0 {
        if left < H as u64 {
            return Err((400, "chunk frame cut short".into()));
        }
        let mut hdr = [0u8; H];
        match tokio::time::timeout(io_timeout, r.read_exact(&mut hdr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(read(e)),
            Err(_) => return Err((400, format!("no chunk data for {io_timeout:?}"))),
        }
        let n = u32::from_le_bytes(hdr[H - 4..].try_into().expect("4"));
        if n & ZEROS != 0 {
            left -= H as u64;
            each(&hdr, Body::Zeros(n & !ZEROS))?;
            frames += 1;
            continue;
        }
        if n > MAX_FRAME || (H + n as usize) as u64 > left {
            return Err((
                400,
                format!("chunk frame of {n} bytes does not fit the request"),
            ));
        }
        buf.resize(n as usize, 0);
        match tokio::time::timeout(io_timeout, r.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(read(e)),
            Err(_) => return Err((400, format!("no chunk data for {io_timeout:?}"))),
        }
        left -= (H + n as usize) as u64;
        each(&hdr, Body::Bytes(&buf))?;
        frames += 1;
    }
    Ok(frames)
}

/// Store one chunk frame's outcome: counted when stored, refused (409) with its reason.
fn stored(shared: &Shared, r: Result<(), String>, n: usize) -> Result<(), (u16, String)> {
    match r {
        Ok(()) => {
            shared.chunk_received(n as u64);
            Ok(())
        }
        Err(e) => {
            shared.refused(&e);
            Err((409, e))
        }
    }
}

/// Frames of `index u32 LE ‖ len u32 LE ‖ bytes` of offered generation `generation`.
async fn receive_chunks<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    len: u64,
    generation: u64,
    shared: &Arc<Shared>,
) -> Result<serde_json::Value, (u16, String)> {
    let n = read_frames(r, len, shared.io_timeout, |hdr: &[u8; 8], body| {
        let index = u32::from_le_bytes(hdr[..4].try_into().expect("4"));
        let Body::Bytes(data) = body else {
            return Err((400, "a frame of zeros is only for a stream".into()));
        };
        let r = shared.store.put_chunk(generation, index, data);
        stored(shared, r, data.len())
    })
    .await?;
    Ok(serde_json::json!({ "stored": n }))
}

/// Frames of `offset u64 LE ‖ len u32 LE ‖ bytes` of generation `generation` (`bytes` long),
/// streamed before its manifest.
async fn receive_stream<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    len: u64,
    generation: u64,
    bytes: u64,
    shared: &Arc<Shared>,
) -> Result<serde_json::Value, (u16, String)> {
    let store = shared.store.clone();
    let begun = tokio::task::spawn_blocking(move || store.begin_stream(generation, bytes))
        .await
        .map_err(|e| (500, format!("stream failed: {e}")))?;
    begun.map_err(|e| {
        shared.refused(&e);
        (409, e)
    })?;
    let n = read_frames(r, len, shared.io_timeout, |hdr: &[u8; 12], body| {
        let offset = u64::from_le_bytes(hdr[..8].try_into().expect("8"));
        match body {
            Body::Bytes(data) => {
                let r = shared.store.put_streamed(generation, offset, data);
                stored(shared, r, data.len())
            }
            Body::Zeros(n) => {
                let r = shared.store.put_streamed_zeros(generation, offset, n);
                stored(shared, r, 0)
            }
        }
    })
    .await?;
    Ok(serde_json::json!({ "stored": n }))
}

/// Run an install (commit or inbox) on a blocking thread; record and answer its outcome.
async fn install(
    shared: &Arc<Shared>,
    f: impl FnOnce(&crate::standby::Store) -> Result<crate::standby::Installed, String> + Send + 'static,
) -> Result<serde_json::Value, (u16, String)> {
    let store = shared.store.clone();
    let t = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(i)) => {
            shared.installed(&i, t.elapsed());
            Ok(serde_json::json!({"generation": i.manifest.generation, "bytes": i.manifest.bytes}))
        }
        Ok(Err(e)) => {
            shared.refused(&e);
            Err((409, e))
        }
        Err(e) => Err((500, format!("install failed: {e}"))),
    }
}
