//! The client WebSocket port against bad and good input, with real sockets.
mod common;

use std::time::Duration;

use common::TestNode;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn connect(node: &TestNode, path: &str) -> Ws {
    let tcp = TcpStream::connect(("127.0.0.1", node.cfg.address.port + 1))
        .await
        .unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(node.ws_url(path), tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// The next close frame (code, reason), within 15 s.
async fn close_of(ws: &mut Ws) -> (u16, String) {
    let fut = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(e) => return (0, e.to_string()),
            }
        }
        (1006, String::new())
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .expect("a close frame within 15s")
}

async fn status_ok(node: &TestNode) -> conode::proto::StatusResponse {
    let mut ws = connect(node, "/Status/Request").await;
    ws.send(Message::binary(Vec::new())).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Binary(b) = m else {
        panic!("expected a binary reply, got {m:?}")
    };
    conode::proto::StatusResponse::decode(&b[..]).unwrap()
}

#[tokio::test]
async fn status_reply_carries_our_identity_and_sections() {
    let node = TestNode::new("ws test");
    let srv = node.start().await;
    let r = status_ok(&node).await;
    let si = r.serveridentity.unwrap();
    assert_eq!(
        conode::proto::untag_point(&si.public),
        Some(node.cfg.keys.public_bytes())
    );
    assert_eq!(&si.public[..8], b"ed.point");
    assert_eq!(
        si.id,
        conode::keys::server_identity_id(&node.cfg.keys.public_bytes()).to_vec()
    );
    for s in ["Generic", "Db", "Conode"] {
        assert!(r.status.contains_key(s), "missing section {s}");
    }
    let g = &r.status["Generic"].field;
    assert_eq!(g["Available_Services"], "Skipchain,Status");
    assert_eq!(g["Port"], node.cfg.address.port.to_string());
    assert_eq!(r.status["Db"].field["Open"], "true");
    srv.stop().await;
}

#[tokio::test]
async fn ok_path_answers_ok() {
    let node = TestNode::new("ok");
    let srv = node.start().await;
    let mut s = TcpStream::connect(("127.0.0.1", node.cfg.address.port + 1))
        .await
        .unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(out.ends_with("\r\n\r\nok\n"), "{out}");
    srv.stop().await;
}

#[tokio::test]
async fn unknown_service_closes_with_4001() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut ws = connect(&node, "/NoSuchService/Request").await;
    assert_eq!(
        close_of(&mut ws).await,
        (4001, "This service doesn't exist".into())
    );
    srv.stop().await;
}

#[tokio::test]
async fn unknown_method_and_invalid_protobuf_close_with_1002() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut ws = connect(&node, "/Status/NoSuchMethod").await;
    ws.send(Message::binary(Vec::new())).await.unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1002);
    assert_eq!(
        reason,
        "unexpected error: The requested message hasn't been registered: NoSuchMethod"
    );

    let mut ws = connect(&node, "/Status/Request").await;
    ws.send(Message::binary(vec![0xff, 0xff, 0xff]))
        .await
        .unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1002);
    assert!(
        reason.starts_with("unexpected error: decoding Request:"),
        "{reason}"
    );
    assert!(reason.len() <= 123);
    status_ok(&node).await;
    srv.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009_and_others_are_served() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut ws = connect(&node, "/Status/Request").await;
    let _ = ws.send(Message::binary(vec![0u8; (10 << 20) + 1])).await;
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, u16::from(CloseCode::Size), "{reason}");
    assert!(reason.contains("too big"), "{reason}");
    status_ok(&node).await;
    srv.stop().await;
}

#[tokio::test]
async fn garbage_bytes_get_400_and_others_are_served() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut s = TcpStream::connect(("127.0.0.1", node.cfg.address.port + 1))
        .await
        .unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 400 Bad Request"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    status_ok(&node).await;
    srv.stop().await;
}

#[tokio::test]
async fn half_open_connection_is_closed_and_does_not_block_others() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut s = TcpStream::connect(("127.0.0.1", node.cfg.address.port + 1))
        .await
        .unwrap();
    s.write_all(b"GET /Status/Request HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Meanwhile everyone else is served.
    for _ in 0..3 {
        status_ok(&node).await;
    }
    let mut out = Vec::new();
    let limit = conode::ws::HEAD_TIMEOUT + Duration::from_secs(5);
    tokio::time::timeout(limit, s.read_to_end(&mut out))
        .await
        .expect("closed after the head timeout")
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_with_1001_and_closes_the_database() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut idle = connect(&node, "/Status/Request").await;
    idle.send(Message::binary(Vec::new())).await.unwrap();
    assert!(matches!(idle.next().await, Some(Ok(Message::Binary(_)))));
    let stopping = tokio::spawn(srv.stop());
    assert_eq!(close_of(&mut idle).await.0, 1001);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    // The file is closed: it opens again, and the port is free.
    conode::db::Db::open(&node.db_path(), &node.cfg.keys.public_bytes()).unwrap();
    assert!(TcpStream::connect(("127.0.0.1", node.cfg.address.port + 1))
        .await
        .is_err());
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    let node = TestNode::new("x");
    let srv = node.start().await;
    let mut ws = connect(&node, "/Status/Request").await;
    ws.send(Message::binary(Vec::new())).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Binary(_)))));
    ws.close(None).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "expected the server's close frame, got {answer:?}"
    );
    srv.stop().await;
}

/// Answers `/Slow/Echo` after a pause: a request that is in flight when the server stops.
struct Slow;
impl conode::ws::Service for Slow {
    fn name(&self) -> &'static str {
        "Slow"
    }
    fn call<'a>(
        &'a self,
        _method: &'a str,
        body: &'a [u8],
    ) -> conode::ws::BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(body.to_vec())
        })
    }
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let node = TestNode::new("x");
    let srv = conode::server::Server::start_with(
        node.cfg.clone(),
        node.db_path(),
        vec![std::sync::Arc::new(Slow)],
    )
    .await
    .unwrap();
    let mut ws = connect(&node, "/Slow/Echo").await;
    ws.send(Message::binary(b"still here".to_vec()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // the request is being handled
    let stopping = tokio::spawn(srv.stop());
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    match reply {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"still here"),
        other => panic!("the in-flight request must be answered, got {other:?}"),
    }
    assert_eq!(
        close_of(&mut ws).await.0,
        1001,
        "then the connection is closed"
    );
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    conode::db::Db::open(&node.db_path(), &node.cfg.keys.public_bytes()).unwrap();
}
