//! The client WebSocket port: `GET /ok`, and `/<Service>/<Method>` upgraded to a
//! WebSocket carrying one protobuf message per WebSocket message.
//!
//! Protocol, as the Go conode and the `@dedis/cothority` clients have it:
//! - a reply goes back in the same frame type as its request;
//! - an unknown service: the upgrade succeeds, then close code 4001;
//! - any error (unknown method, undecodable request, handler error): close code 1002
//!   with reason `unexpected error: …`, cut to 123 bytes on a UTF-8 boundary (a close
//!   frame's payload is at most 125 bytes, 2 of which are the code);
//! - a message over [`MAX_MESSAGE`]: close 1009; bytes that are not HTTP: `400`.
//!
//! We parse the HTTP request head ourselves (httparse) and hand the upgraded stream to
//! tungstenite: that keeps `/ok` and the WebSocket on one port with no HTTP framework.
//! Limits are here, visible: [`MAX_CONNECTIONS`], [`HEAD_TIMEOUT`], [`IDLE_TIMEOUT`].
//! This module never touches the database or the configuration files.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::metrics::{Metrics, Port, RequestLabels};

/// Largest WebSocket message (and frame) accepted: 10 MiB, as the Go conode.
pub const MAX_MESSAGE: usize = 10 << 20;
/// Open client connections at most; more are closed at accept. An idle connection costs
/// about 16 KiB (measured by `scripts/bench`), so this bounds them at about 256 MiB.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Time a client has to complete TLS and send its HTTP request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Read buffer of a WebSocket. tungstenite's default (128 KiB, zero-filled before reads)
/// made each idle connection cost ~140 KiB and showed in profiles; requests here are
/// small, and larger messages still arrive whole (the buffer is refilled).
pub const READ_BUFFER: usize = 4 * 1024;
/// A WebSocket with no message for this long is closed (1001).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections refused past [`MAX_CONNECTIONS`] are logged at most once per this, with
/// their count.
pub const REFUSALS_LOG_EVERY: Duration = Duration::from_secs(10);
/// What tungstenite may hold to write to one connection at most: one message of
/// [`MAX_MESSAGE`] and its header, beside the 128 KiB it gathers before writing. A reply that
/// does not fit fails the connection; a pong that does not fit replaces the pong waiting
/// before it. The tighter bound for a client that does not read is [`UNREAD_BUDGET`].
pub const MAX_WRITE_BUFFER: usize = MAX_MESSAGE + (256 << 10);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A service reachable as `/<name>/<Method>`. Errors are plain strings: they become
/// the close reason `unexpected error: <err>` the clients show.
pub trait Service: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The methods it answers: the `method` label values of its requests in the metrics
    /// (any other method a client names is counted as `unknown`).
    fn methods(&self) -> &'static [&'static str] {
        &[]
    }
    fn call<'a>(
        &'a self,
        method: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// The services of a node, by name.
#[derive(Default, Clone)]
pub struct Services(BTreeMap<&'static str, Arc<dyn Service>>);

impl Services {
    pub fn add(&mut self, s: Arc<dyn Service>) {
        self.0.insert(s.name(), s);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Service>> {
        self.0.get(name)
    }
    /// Sorted names, as `Available_Services` reports them.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.keys().copied().collect()
    }
}

/// Resolves once `rx` turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Held by every connection task; the server waits for all clones to drop.
pub type Tracker = mpsc::Sender<()>;

/// Serve clients on `listener` until `shutdown` turns true. In-flight requests finish;
/// idle connections are closed with 1001 ("going away").
pub async fn serve(
    listener: TcpListener,
    services: Arc<Services>,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Tracker,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refused = crate::gate::Throttled::new(REFUSALS_LOG_EVERY);
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = crate::ws::stopped(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // EMFILE and friends: wait and retry rather than spin or die.
                tracing::warn!("client port: accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(n) = refused.note() {
                tracing::warn!(
                    "client port: refused {n} connection(s) since the last such line, the latest from {peer}: {MAX_CONNECTIONS} connections already open (one line per {REFUSALS_LOG_EVERY:?} at most)"
                );
            }
            continue;
        };
        let services = services.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let tracker = tracker.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _tracker = tracker;
            let _open = metrics.connection(Port::Client);
            let _ = stream.set_nodelay(true);
            let r = match tls {
                Some(acc) => match tokio::time::timeout(HEAD_TIMEOUT, acc.accept(stream)).await {
                    Ok(Ok(s)) => handle(s, &services, shutdown, &metrics).await,
                    Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                    Err(_) => Err("TLS handshake timed out".into()),
                },
                None => handle(stream, &services, shutdown, &metrics).await,
            };
            if let Err(e) = r {
                tracing::debug!("client {peer}: {e}");
            }
        });
    }
}

/// Read the request head; returns (head length, buffer).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<(usize, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before sending a request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return Ok((len, buf)),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => return Err("request head too large".into()),
            Err(e) => return Err(format!("not an HTTP request: {e}")),
        }
    }
}

async fn respond<S: AsyncWrite + Unpin>(s: &mut S, status: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(msg.as_bytes()).await;
    let _ = s.shutdown().await;
}

struct Upgrade {
    path: String,
    accept_key: String,
}

/// What the request head asks for.
enum Head {
    Ok,
    Upgrade(Upgrade),
    Bad(&'static str, String),
}

fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(buf).is_err() {
        return Head::Bad("400 Bad Request", "not an HTTP request\n".into());
    }
    let path = req
        .path
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_string();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        if path == "/ok" && req.method == Some("GET") {
            return Head::Ok;
        }
        return Head::Bad(
            "400 Bad Request",
            "this port speaks WebSocket: /<Service>/<Method>, or GET /ok\n".into(),
        );
    }
    if header("sec-websocket-version") != Some("13") {
        return Head::Bad(
            "426 Upgrade Required",
            "WebSocket version 13 required\n".into(),
        );
    }
    let Some(key) = header("sec-websocket-key") else {
        return Head::Bad("400 Bad Request", "missing Sec-WebSocket-Key\n".into());
    };
    Head::Upgrade(Upgrade {
        path,
        accept_key: tungstenite::handshake::derive_accept_key(key.trim().as_bytes()),
    })
}

/// Cut `s` to at most `max` bytes on a UTF-8 boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: truncate_utf8(reason, 123).to_string().into(),
    }
}

/// One client connection, after TLS if any.
async fn handle<S>(
    mut s: S,
    services: &Services,
    mut shutdown: watch::Receiver<bool>,
    metrics: &Metrics,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (len, buf) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            respond(&mut s, "400 Bad Request", &format!("{e}\n")).await;
            return Err(e);
        }
        Err(_) => {
            respond(
                &mut s,
                "408 Request Timeout",
                "request head not received in time\n",
            )
            .await;
            return Err("request head timed out".into());
        }
    };
    let up = match parse_head(&buf[..len]) {
        Head::Ok => {
            respond(&mut s, "200 OK", "ok\n").await;
            return Ok(());
        }
        Head::Bad(status, body) => {
            respond(&mut s, status, &body).await;
            return Err(body.trim_end().to_string());
        }
        Head::Upgrade(u) => u,
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        up.accept_key
    );
    s.write_all(resp.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(READ_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER);
    let stream = Prefixed {
        prefix: buf[len..].to_vec(),
        inner: s,
        read: 0,
        blocked_at: None,
    };
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;

    let mut parts = up.path.trim_start_matches('/').splitn(2, '/');
    let service_name = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("").to_string();
    let Some(service) = services.get(service_name) else {
        // Counted once, as a request refused: the connection closes before any message.
        metrics.request(&RequestLabels::UNKNOWN);
        metrics.request_error(&RequestLabels::UNKNOWN);
        close(
            &mut ws,
            close_frame(CloseCode::Library(4001), "This service doesn't exist"),
        )
        .await;
        return Err(format!("unknown service {service_name:?}"));
    };
    let labels = RequestLabels::of(service.name(), service.methods(), &method);

    loop {
        let next = tokio::select! {
            m = tokio::time::timeout(IDLE_TIMEOUT, ws.next()) => m,
            _ = crate::ws::stopped(&mut shutdown) => {
                close(&mut ws, close_frame(CloseCode::Away, "server shutting down")).await;
                return Ok(());
            }
        };
        let msg = match next {
            Err(_) => {
                close(&mut ws, close_frame(CloseCode::Away, "idle for too long")).await;
                return Ok(());
            }
            Ok(None) => return Ok(()),
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(tungstenite::Error::Capacity(e)))) => {
                let reason = format!("message too big: {e} (limit {MAX_MESSAGE} bytes)");
                close(&mut ws, close_frame(CloseCode::Size, &reason)).await;
                return Err(reason);
            }
            Ok(Some(Err(tungstenite::Error::Protocol(e)))) => {
                let reason = format!("unexpected error: {e}");
                close(&mut ws, close_frame(CloseCode::Protocol, &reason)).await;
                return Err(reason);
            }
            Ok(Some(Err(e))) => return Err(e.to_string()),
        };
        let (body, text) = match &msg {
            Message::Binary(b) => (&b[..], false),
            Message::Text(t) => (t.as_bytes(), true),
            // Close: tungstenite queues the reply; the next read sends it and ends the
            // stream. Ping/Pong are answered by tungstenite itself.
            _ => continue,
        };
        metrics.request(&labels);
        match service.call(&method, body).await {
            Ok(reply) => {
                let out = if text {
                    match String::from_utf8(reply) {
                        Ok(t) => Message::text(t),
                        Err(e) => Message::binary(e.into_bytes()),
                    }
                } else {
                    Message::binary(reply)
                };
                ws.send(out).await.map_err(|e| e.to_string())?;
            }
            Err(e) => {
                metrics.request_error(&labels);
                let reason = format!("unexpected error: {e}");
                close(&mut ws, close_frame(CloseCode::Protocol, &reason)).await;
                return Err(reason);
            }
        }
    }
}

/// Send a close frame and wait briefly for the client's answer.
async fn close<S>(ws: &mut WebSocketStream<S>, frame: CloseFrame)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Bytes a client may send while what the conode has to write to it is not all written
/// (it does not read, or reads slower than it makes the conode write): past this the
/// connection is closed. tungstenite answers every ping with a pong and keeps what it
/// cannot write in memory; a ping costs its sender at least as many bytes as its pong
/// takes there, so this bounds that memory per connection. The count starts when a write
/// finds the socket unable to take everything, and is reset only once everything queued
/// was written and flushed: a client that reads a little now and then does not reset it.
/// A client that reads its answers never comes near it: the conode reads the next
/// request only once its answer to the last one was written.
pub const UNREAD_BUDGET: u64 = 64 << 10;

/// A stream that first yields bytes already read past the HTTP head, and that fails the
/// connection once the client sent [`UNREAD_BUDGET`] bytes while the writes to it were
/// behind.
struct Prefixed<S> {
    prefix: Vec<u8>,
    inner: S,
    /// Bytes read so far.
    read: u64,
    /// `read` when a write first could not take all it was given; `None` once a flush
    /// completed (tungstenite flushes only once its queue is written).
    blocked_at: Option<u64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(at) = self.blocked_at {
            if self.read - at > UNREAD_BUDGET {
                return Poll::Ready(Err(std::io::Error::other(format!(
                    "the client sent {} bytes without reading what it was sent: closing",
                    self.read - at
                ))));
            }
        }
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            self.read += n as u64;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        // Part of what tungstenite has queued stays queued: count from here.
        if !matches!(r, Poll::Ready(Ok(n)) if n == buf.len()) {
            let read = self.read;
            self.blocked_at.get_or_insert(read);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.blocked_at = None;
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bind a TCP listener with a message that says which port and why it failed.
pub async fn bind(addr: &str, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (is another conode running on it?)"
        } else {
            ""
        };
        format!("cannot bind the {what} port {addr}: {e}{hint}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Service for Echo {
        fn name(&self) -> &'static str {
            "Echo"
        }
        fn call<'a>(
            &'a self,
            _method: &'a str,
            body: &'a [u8],
        ) -> BoxFuture<'a, Result<Vec<u8>, String>> {
            Box::pin(async move { Ok(body.to_vec()) })
        }
    }

    /// A client that reads a trickle (1 KiB per ms) of what it is sent while it sends
    /// pings twice as fast: the conode's writes to it move every ms, never all. The
    /// budget used to start again at every write that moved, so such a client was never
    /// closed and its pongs piled up; now it counts until everything queued is written.
    /// The real connection handler and tungstenite, over an in-memory pipe whose 4 KiB
    /// buffers make the writes move exactly as the client reads.
    #[tokio::test]
    async fn a_client_that_reads_a_trickle_while_it_pings_is_closed() {
        let (client, server) = tokio::io::duplex(4096);
        let mut services = Services::default();
        services.add(Arc::new(Echo));
        let (_stop, stop_rx) = watch::channel(false);
        let conn = tokio::spawn(async move {
            let metrics = Metrics::new();
            handle(server, &services, stop_rx, &metrics).await
        });
        let (mut r, mut w) = tokio::io::split(client);
        w.write_all(
            b"GET /Echo/Echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            r.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        // 32 masked pings of 125 bytes each (header 2, mask 4, payload 125).
        let mut burst = Vec::new();
        for _ in 0..32 {
            burst.extend_from_slice(&[0x89, 0x80 | 125, 1, 2, 3, 4]);
            burst.extend(std::iter::repeat_n(0x55u8, 125));
        }
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        while !conn.is_finished() && started.elapsed() < Duration::from_secs(10) {
            if w.write_all(&burst).await.is_err() {
                break;
            }
            sent += burst.len() as u64;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let closed = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the conode closed the connection")
            .unwrap()
            .unwrap_err();
        reader.abort();
        assert!(closed.contains("without reading"), "{closed}");
        assert!(
            sent < UNREAD_BUDGET + (64 << 10),
            "closed only after {sent} bytes"
        );
    }

    #[test]
    fn truncates_on_utf8_boundary() {
        let s = format!("{}é", "a".repeat(122)); // é is 2 bytes: 122+2 = 124 > 123
        assert_eq!(truncate_utf8(&s, 123).len(), 122);
        assert_eq!(truncate_utf8("short", 123), "short");
    }

    #[test]
    fn head_parsing_routes_ok_upgrade_and_garbage() {
        assert!(matches!(
            parse_head(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"),
            Head::Ok
        ));
        let up = b"GET /Status/Request HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        match parse_head(up) {
            Head::Upgrade(u) => {
                assert_eq!(u.path, "/Status/Request");
                // RFC 6455's example.
                assert_eq!(u.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
            }
            _ => panic!("expected an upgrade"),
        }
        assert!(matches!(
            parse_head(b"GET /x HTTP/1.1\r\n\r\n"),
            Head::Bad("400 Bad Request", _)
        ));
        assert!(matches!(parse_head(b"\x16\x03\x01garbage"), Head::Bad(..)));
    }
}
