//! The peer port: HTTPS between the two failoverds, both sides pinned to each other's
//! Ed25519 key (self-signed certificates bound to the key, as on the conode port). A
//! client without the pinned key fails the TLS handshake: it gets no status, cannot
//! upload, cannot command. The client is `reqwest` (connections kept alive, the pinned
//! rustls config handed in as preconfigured TLS); the server is `hyper` 1 on the rustls
//! acceptor.
//!
//! # API (version 1; JSON answers; errors are `{"error":"<words>","cause":"<label>"}` with
//! status 4xx/5xx, the cause being a [`Cause`] label)
//! - `GET /v1/status`: the generations this host holds.
//! - `POST /v1/offer` (body: a signed manifest envelope): start or resume receiving that
//!   generation; answers `{"missing":[chunk indices],"reused_bytes":N,"installed":false}`
//!   (one index per distinct chunk content: the standby writes the same bytes wherever
//!   they recur). `"installed":true` when this very generation is installed already (a
//!   commit whose answer was lost): nothing more to send.
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
//! - `POST /v1/core` (body: a failover core message, see [`crate::wire`]): handed to this
//!   host's failover core; answers `{}`.
//!
//! The server never does file IO on the runtime's threads: frames go to a writer on a
//! blocking thread, installs and offers run through `spawn_blocking`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conode::peer::PeerTls;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::Timeouts;
use crate::error::{Cause, PeerError, StoreError};
use crate::manifest::MAX_ENVELOPE;
use crate::metrics::Metrics;
use crate::standby::{Installed, Store};
use crate::status::Status;

/// Largest chunk frame accepted (the manifest's own limit is checked after).
const MAX_FRAME: u32 = 16 << 20;
/// In a stream frame's len: no bytes follow, the frame is that many zeros.
pub const ZEROS: u32 = 1 << 31;
/// Largest answer read from the peer.
const MAX_ANSWER: u64 = MAX_ENVELOPE;
/// Frames handed to the writer thread at once (bytes), and batches queued for it.
const WRITE_BATCH: usize = 1 << 20;
const WRITE_QUEUE: usize = 4;

/// The client side: HTTPS requests to the pinned peer over kept-alive connections.
#[derive(Clone)]
pub struct PeerClient {
    address: String,
    http: reqwest::Client,
}

impl PeerClient {
    pub fn new(
        tls: &PeerTls,
        address: &str,
        peer_key: [u8; 32],
        t: &Timeouts,
    ) -> Result<PeerClient, String> {
        let tls = (*tls.client_config(peer_key)?).clone();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(t.connect)
            .read_timeout(t.io_stall)
            .timeout(t.answer)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the peer's HTTP client: {e}"))?;
        Ok(PeerClient {
            address: address.to_string(),
            http,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// One request; the peer's JSON answer, or why not. `what` names it in errors.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: impl Into<reqwest::Body>,
        what: &str,
    ) -> Result<serde_json::Value, PeerError> {
        let url = format!("https://{}{path}", self.address);
        let r = self
            .http
            .request(method, &url)
            .body(body)
            .send()
            .await
            .map_err(|e| self.failed(what, e))?;
        let status = r.status().as_u16();
        let body = read_limited(r, MAX_ANSWER).await.map_err(|e| match e {
            Ok(e) => self.failed(what, e),
            Err(n) => PeerError::Malformed {
                what: what.to_string(),
                reason: format!("an answer of more than {n} bytes"),
            },
        })?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| PeerError::Malformed {
                what: what.to_string(),
                reason: format!("not JSON ({e}; status {status})"),
            })?;
        if status != 200 {
            let reason = v
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given")
                .to_string();
            let cause = v
                .get("cause")
                .and_then(|c| c.as_str())
                .and_then(Cause::from_label)
                .unwrap_or(Cause::Peer);
            return Err(PeerError::Refused {
                what: what.to_string(),
                status,
                reason,
                cause,
            });
        }
        Ok(v)
    }

    /// A failed request in words: a TLS failure (a key not trusted) is permanent.
    fn failed(&self, what: &str, e: reqwest::Error) -> PeerError {
        if let Some(tls) = tls_error(&e) {
            return PeerError::Unauthenticated {
                address: self.address.clone(),
                reason: tls,
            };
        }
        PeerError::Unreachable {
            what: what.to_string(),
            address: self.address.clone(),
            reason: error_chain(&e),
        }
    }
}

/// Read a response body of at most `max` bytes (`Err(Err(max))` when longer).
async fn read_limited(
    mut r: reqwest::Response,
    max: u64,
) -> Result<Vec<u8>, Result<reqwest::Error, u64>> {
    let mut out = Vec::new();
    while let Some(c) = r.chunk().await.map_err(Ok)? {
        if (out.len() + c.len()) as u64 > max {
            return Err(Err(max));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// The rustls error somewhere in `e`'s causes, in words.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.to_string());
            }
        }
        cur = err.source();
    }
    None
}

/// `e` and its causes, one after the other.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------
// The server side.

/// What the peer port's handlers need.
pub struct PeerServer {
    pub store: Arc<Store>,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub timeouts: Timeouts,
    /// This host's conode admin socket: a host whose conode runs is live and takes no
    /// snapshots from its peer.
    pub admin: PathBuf,
    /// The failover driver: peer messages (`POST /v1/core`) and verified generations
    /// go there. `None` in tests of the snapshot protocol alone.
    pub events: Option<tokio::sync::mpsc::Sender<crate::event::Event>>,
    /// Who may use the handshake slots ([`conode::gate`]): the peer's address is known.
    pub gate: Arc<conode::gate::Gate>,
    /// Slots of authenticated connections (the pinned key).
    pub served: Arc<tokio::sync::Semaphore>,
}

/// The peer port's handshake slots: the port has one legitimate client, the pinned peer.
pub const PEER_GATE: conode::gate::Limits = conode::gate::Limits {
    name: "peer port",
    known: 4,
    strangers: 32,
    per_address: 4,
    pressed: std::time::Duration::from_secs(1),
    log_every: std::time::Duration::from_secs(10),
};

/// The peer port's gate: the address `peer` (`host:port`) resolves to is known (a name
/// that does not resolve gives the peer only a stranger's slots).
pub fn peer_gate(peer: &str) -> Arc<conode::gate::Gate> {
    let ip = std::net::ToSocketAddrs::to_socket_addrs(peer)
        .ok()
        .and_then(|mut a| a.next())
        .map(|a| a.ip());
    conode::gate::Gate::new(PEER_GATE, ip)
}

/// An answer: the JSON body, or a status and a refusal.
type Answer = Result<serde_json::Value, Refusal>;

struct Refusal {
    status: StatusCode,
    reason: String,
    cause: Cause,
}

impl Refusal {
    fn not_found(what: String) -> Refusal {
        Refusal {
            status: StatusCode::NOT_FOUND,
            reason: what,
            cause: Cause::Peer,
        }
    }
    fn bad_request(reason: String) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason,
            cause: Cause::Peer,
        }
    }
}

impl PeerServer {
    /// Record and answer a store refusal.
    fn refused(&self, e: StoreError) -> Refusal {
        let cause = e.cause();
        if cause == Cause::Bug {
            tracing::error!("{e}");
        } else {
            tracing::warn!("{e}");
        }
        self.metrics.failure(cause);
        self.status.set_error(e.to_string());
        Refusal {
            status: if cause == Cause::Bug || cause == Cause::Io || cause == Cause::DiskFull {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::CONFLICT
            },
            reason: e.to_string(),
            cause,
        }
    }

    /// Serve one authenticated TLS connection (several requests, kept alive).
    pub async fn serve_connection(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        from: String,
    ) {
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.timeouts.io_stall)
            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
        if let Err(e) = conn.await {
            tracing::warn!("peer port: connection from {from}: {e}");
        }
    }

    /// Answer one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let answer = self.route(&method, &path, req.into_body()).await;
        let (status, body) = match answer {
            Ok(v) => (StatusCode::OK, v),
            Err(r) => (
                r.status,
                serde_json::json!({"error": r.reason, "cause": r.cause.label()}),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        resp
    }

    async fn route(&self, method: &Method, path: &str, body: Incoming) -> Answer {
        let number = |p: &str| {
            p.parse::<u64>()
                .map_err(|_| Refusal::not_found(format!("no such path {path}")))
        };
        match (method.as_str(), path) {
            ("GET", "/v1/status") => Ok(self.status.peer_json()),
            ("GET", "/v1/hashes") => Ok(match self.store.newest() {
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
                let env = self.read_body(body, MAX_ENVELOPE).await?;
                self.refuse_if_live().await?;
                let o = self.blocking(move |st| st.offer(&env)).await?;
                Ok(
                    serde_json::json!({"missing": o.missing, "reused_bytes": o.reused_bytes, "installed": o.installed}),
                )
            }
            ("PUT", p) if p.starts_with("/v1/chunks/") => {
                let generation = number(&p["/v1/chunks/".len()..])?;
                self.receive(body, Frames::Chunks { generation }).await
            }
            ("PUT", p) if p.starts_with("/v1/stream/") => {
                let (g, b) = p["/v1/stream/".len()..]
                    .split_once('/')
                    .ok_or_else(|| Refusal::not_found(format!("no such path {p}")))?;
                let (generation, bytes) = (number(g)?, number(b)?);
                self.refuse_if_live().await?;
                self.blocking(move |st| st.begin_stream(generation, bytes))
                    .await?;
                self.receive(body, Frames::Stream { generation }).await
            }
            ("POST", p) if p.starts_with("/v1/commit/") => {
                let generation = number(&p["/v1/commit/".len()..])?;
                self.install(move |st| st.commit(generation)).await
            }
            ("POST", "/v1/core") => {
                let body = self.read_body(body, crate::wire::MAX_MESSAGE).await?;
                let m = crate::wire::decode(&body).map_err(|e| {
                    tracing::warn!("peer port: {e}");
                    Refusal::bad_request(e)
                })?;
                let Some(events) = &self.events else {
                    return Err(Refusal::not_found("no failover core here".into()));
                };
                events
                    .send(crate::event::Event::Peer(m))
                    .await
                    .map_err(|_| Refusal {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        reason: "failoverd is stopping".into(),
                        cause: Cause::Peer,
                    })?;
                Ok(serde_json::json!({}))
            }
            ("POST", "/v1/inbox") => {
                let env = self.read_body(body, MAX_ENVELOPE).await?;
                self.refuse_if_live().await?;
                self.install(move |st| st.install_inbox(&env)).await
            }
            (m, p) => Err(Refusal::not_found(format!("no such request {m} {p}"))),
        }
    }

    /// Refuse to receive snapshots while this host's own conode runs.
    async fn refuse_if_live(&self) -> Result<(), Refusal> {
        let answered = tokio::time::timeout(
            self.timeouts.conode.min(Duration::from_secs(2)),
            conode::admin::fetch_position(&self.admin),
        )
        .await;
        match answered {
            Ok(Ok(_)) => Err(Refusal {
                status: StatusCode::CONFLICT,
                reason: "this host's conode is running, so this host is live: it does not take snapshots from its peer".into(),
                cause: Cause::Conode,
            }),
            _ => Ok(()),
        }
    }

    /// A whole body of at most `max` bytes.
    async fn read_body(&self, body: Incoming, max: u64) -> Result<Vec<u8>, Refusal> {
        let mut r = BodyReader::new(body, self.timeouts.io_stall);
        r.read_to_end(max).await.map_err(Refusal::bad_request)
    }

    /// Run store work on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(self.refused(e)),
            Err(e) => Err(self.refused(StoreError::Bug(format!("store task failed: {e}")))),
        }
    }

    /// Run an install (commit or inbox); record and answer its outcome.
    async fn install(
        &self,
        f: impl FnOnce(&Store) -> Result<Installed, StoreError> + Send + 'static,
    ) -> Answer {
        let t = std::time::Instant::now();
        let i = self.blocking(f).await?;
        tracing::info!(
            "installed generation {} ({} bytes, {} chains) in {:?}",
            i.manifest.generation,
            i.manifest.bytes,
            i.manifest.positions.len(),
            t.elapsed()
        );
        self.status.installed(&i);
        // The core hears of it before the live host does (it hands over only after).
        if let Some(events) = &self.events {
            let _ = events
                .send(crate::event::Event::GenerationVerified(
                    i.manifest.generation,
                ))
                .await;
        }
        Ok(serde_json::json!({"generation": i.manifest.generation, "bytes": i.manifest.bytes}))
    }

    /// Read frames from `body` and hand them, a batch at a time, to a writer on a blocking
    /// thread, which checks and stores them. A refused frame ends the request.
    async fn receive(&self, body: Incoming, kind: Frames) -> Answer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Frame>>(WRITE_QUEUE);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let mut n = 0;
            while let Some(batch) = rx.blocking_recv() {
                for f in batch {
                    let bytes = f.data.len() as u64;
                    match (kind, f.body) {
                        (Frames::Chunks { generation }, FrameBody::Bytes) => {
                            store.put_chunk(generation, f.at as u32, &f.data)?
                        }
                        (Frames::Stream { generation }, FrameBody::Bytes) => {
                            store.put_streamed(generation, f.at, &f.data)?
                        }
                        (Frames::Stream { generation }, FrameBody::Zeros(len)) => {
                            store.put_streamed_zeros(generation, f.at, len)?
                        }
                        (Frames::Chunks { .. }, FrameBody::Zeros(_)) => {
                            return Err(StoreError::Bug(
                                "a frame of zeros reached the chunk writer".into(),
                            ))
                        }
                    }
                    metrics.chunk_received(bytes);
                    n += 1;
                }
            }
            Ok(n)
        });
        let read = read_frames(body, kind, self.timeouts.io_stall, &tx).await;
        drop(tx);
        let written = match writer.await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(self.refused(e)),
            Err(e) => Err(self.refused(StoreError::Bug(format!("writer task failed: {e}")))),
        };
        // A refused frame says more than the read it cut short.
        let n = written?;
        read.map_err(Refusal::bad_request)?;
        Ok(serde_json::json!({ "stored": n }))
    }
}

/// Which request's frames.
#[derive(Clone, Copy)]
enum Frames {
    /// `index u32 LE ‖ len u32 LE ‖ bytes` of an offered generation.
    Chunks { generation: u64 },
    /// `offset u64 LE ‖ len u32 LE ‖ bytes` of a streamed generation.
    Stream { generation: u64 },
}

enum FrameBody {
    Bytes,
    /// [`ZEROS`]: this many zero bytes, none sent.
    Zeros(u32),
}

struct Frame {
    /// Chunk index or offset.
    at: u64,
    body: FrameBody,
    data: Vec<u8>,
}

/// Read frames until the body ends (at a frame boundary), sending batches to `tx`. Stops
/// early when the writer is gone (it refused a frame).
async fn read_frames(
    body: Incoming,
    kind: Frames,
    stall: Duration,
    tx: &tokio::sync::mpsc::Sender<Vec<Frame>>,
) -> Result<(), String> {
    let mut r = BodyReader::new(body, stall);
    let h = match kind {
        Frames::Chunks { .. } => 8,
        Frames::Stream { .. } => 12,
    };
    let mut batch = Vec::new();
    let mut size = 0usize;
    let mut hdr = [0u8; 12];
    loop {
        if !r.read_exact_or_end(&mut hdr[..h]).await? {
            break;
        }
        let at = match kind {
            Frames::Chunks { .. } => u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as u64,
            Frames::Stream { .. } => u64::from_le_bytes([
                hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7],
            ]),
        };
        let n = u32::from_le_bytes([hdr[h - 4], hdr[h - 3], hdr[h - 2], hdr[h - 1]]);
        let frame = if n & ZEROS != 0 {
            if matches!(kind, Frames::Chunks { .. }) {
                return Err("a frame of zeros is only for a stream".into());
            }
            Frame {
                at,
                body: FrameBody::Zeros(n & !ZEROS),
                data: Vec::new(),
            }
        } else {
            if n > MAX_FRAME {
                return Err(format!(
                    "chunk frame of {n} bytes is over the {MAX_FRAME} accepted"
                ));
            }
            let mut data = vec![0u8; n as usize];
            if !r.read_exact_or_end(&mut data).await? && n > 0 {
                return Err("chunk frame cut short".into());
            }
            Frame {
                at,
                body: FrameBody::Bytes,
                data,
            }
        };
        size += h + frame.data.len();
        batch.push(frame);
        if size >= WRITE_BATCH {
            if tx.send(std::mem::take(&mut batch)).await.is_err() {
                return Ok(());
            }
            size = 0;
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
    Ok(())
}

/// Reads a hyper request body as bytes, each wait for data bounded by `stall`.
struct BodyReader {
    body: Incoming,
    cur: Bytes,
    stall: Duration,
    ended: bool,
}

impl BodyReader {
    fn new(body: Incoming, stall: Duration) -> BodyReader {
        BodyReader {
            body,
            cur: Bytes::new(),
            stall,
            ended: false,
        }
    }

    /// Make `cur` non-empty; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, String> {
        while self.cur.is_empty() {
            if self.ended {
                return Ok(false);
            }
            match tokio::time::timeout(self.stall, self.body.frame()).await {
                Err(_) => return Err(format!("no data for {:?}", self.stall)),
                Ok(None) => self.ended = true,
                Ok(Some(Err(e))) => return Err(format!("reading the request: {e}")),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.cur = d;
                    }
                }
            }
        }
        Ok(true)
    }

    /// Fill `out`; `Ok(false)` if the body ended before its first byte, an error if it
    /// ended in the middle.
    async fn read_exact_or_end(&mut self, out: &mut [u8]) -> Result<bool, String> {
        let mut got = 0;
        while got < out.len() {
            if !self.fill().await? {
                if got == 0 {
                    return Ok(false);
                }
                return Err("chunk frame cut short".into());
            }
            let n = (out.len() - got).min(self.cur.len());
            out[got..got + n].copy_from_slice(&self.cur[..n]);
            self.cur = self.cur.slice(n..);
            got += n;
        }
        Ok(true)
    }

    /// The rest of the body, at most `max` bytes.
    async fn read_to_end(&mut self, max: u64) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while self.fill().await? {
            if (out.len() + self.cur.len()) as u64 > max {
                return Err(format!("a body of more than {max} bytes"));
            }
            out.extend_from_slice(&self.cur);
            self.cur = Bytes::new();
        }
        Ok(out)
    }
}

/// Accept the TLS handshake of one connection to the peer port, then serve it.
pub async fn accept(server: Arc<PeerServer>, acceptor: TlsAcceptor, tcp: TcpStream, from: String) {
    let Ok(ip) = tcp.peer_addr().map(|a| a.ip()) else {
        return;
    };
    // A handshake slot, or the connection is closed at once (see conode::gate).
    let Some(handshake) = server.gate.admit(ip, server.timeouts.connect) else {
        return;
    };
    let _ = tcp.set_nodelay(true);
    match tokio::time::timeout(handshake.deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            drop(handshake);
            // Authenticated (the pinned key): one of the slots that serve requests.
            let Ok(_slot) = server.served.clone().acquire_owned().await else {
                return;
            };
            server.serve_connection(tls, from).await
        }
        Ok(Err(e)) => {
            drop(handshake);
            server
                .gate
                .refuse(ip, &format!("TLS handshake failed: {e}"));
            server.metrics.failure(Cause::Unauthenticated);
        }
        Err(_) => {
            let d = handshake.deadline;
            drop(handshake);
            server.gate.refuse(
                ip,
                &format!("did not finish the TLS handshake within {d:?}"),
            );
        }
    }
}
