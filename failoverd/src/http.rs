//! The little HTTP/1.1 failoverd needs: one request per connection, bodies with
//! `Content-Length` only (no chunked encoding), heads of at most [`MAX_HEAD`] bytes.
//! Used for the peer port (inside TLS) and for `/metrics`.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAX_HEAD: usize = 16 * 1024;
/// Time allowed for a request or response head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Head {
    /// Method (request) or empty (response).
    pub method: String,
    /// Path (request) or empty (response).
    pub path: String,
    /// Status (response) or 0 (request).
    pub status: u16,
    pub content_length: u64,
}

async fn read_raw_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, String> {
    let mut head = Vec::new();
    let fut = async {
        loop {
            let before = head.len();
            let n = (&mut *r)
                .take((MAX_HEAD - head.len()) as u64 + 1)
                .read_until(b'\n', &mut head)
                .await
                .map_err(|e| format!("reading the HTTP head: {e}"))?;
            if n == 0 {
                if head.is_empty() {
                    return Ok(false);
                }
                return Err("connection closed in the middle of an HTTP head".to_string());
            }
            if head.len() > MAX_HEAD {
                return Err(format!("HTTP head longer than {MAX_HEAD} bytes"));
            }
            let line = &head[before..];
            if line == b"\r\n" || line == b"\n" {
                return Ok(true);
            }
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, fut).await {
        Ok(Ok(true)) => Ok(Some(head)),
        Ok(Ok(false)) => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no complete HTTP head within {HEAD_TIMEOUT:?}")),
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<u64, String> {
    let mut len = 0u64;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad Content-Length")?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported: send Content-Length".into());
        }
    }
    Ok(len)
}

/// Read a request head; `Ok(None)` if the connection closed before one started.
pub async fn read_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Head>, String> {
    let Some(raw) = read_raw_head(r).await? else {
        return Ok(None);
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete HTTP request head".into()),
        Err(e) => return Err(format!("malformed HTTP request: {e}")),
    }
    Ok(Some(Head {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        status: 0,
        content_length: content_length(req.headers)?,
    }))
}

/// Read a response head.
pub async fn read_response<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Head, String> {
    let raw = read_raw_head(r)
        .await?
        .ok_or("the peer closed the connection without answering")?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete HTTP response head".into()),
        Err(e) => return Err(format!("malformed HTTP response: {e}")),
    }
    Ok(Head {
        method: String::new(),
        path: String::new(),
        status: resp.code.unwrap_or(0),
        content_length: content_length(resp.headers)?,
    })
}

/// Read a whole body of at most `max` bytes.
pub async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    len: u64,
    max: u64,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    if len > max {
        return Err(format!("body of {len} bytes is over the {max} accepted"));
    }
    let mut body = vec![0u8; len as usize];
    match tokio::time::timeout(timeout, r.read_exact(&mut body)).await {
        Ok(Ok(_)) => Ok(body),
        Ok(Err(e)) => Err(format!("reading a body of {len} bytes: {e}")),
        Err(_) => Err(format!(
            "a body of {len} bytes did not arrive within {timeout:?}"
        )),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Write a complete response and flush it (the connection then closes).
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// Write a request head (the body follows, `len` bytes).
pub async fn write_request_head<W: AsyncWrite + Unpin>(
    w: &mut W,
    method: &str,
    path: &str,
    len: u64,
) -> std::io::Result<()> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: failoverd\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    w.write_all(head.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn request_and_response_heads() {
        let mut r =
            BufReader::new(&b"POST /v1/offer HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..]);
        let h = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(
            (h.method.as_str(), h.path.as_str(), h.content_length),
            ("POST", "/v1/offer", 5)
        );
        assert_eq!(
            read_body(&mut r, 5, 10, HEAD_TIMEOUT).await.unwrap(),
            b"hello"
        );

        let mut out = Vec::new();
        write_response(&mut out, 409, "application/json", b"{}")
            .await
            .unwrap();
        let h = read_response(&mut BufReader::new(&out[..])).await.unwrap();
        assert_eq!((h.status, h.content_length), (409, 2));
    }

    #[tokio::test]
    async fn garbage_and_oversize_heads_are_errors() {
        let mut r = BufReader::new(&b"\x16\x03\x01garbage\r\n\r\n"[..]);
        assert!(read_request(&mut r)
            .await
            .unwrap_err()
            .contains("malformed"));
        let big = vec![b'a'; MAX_HEAD + 10];
        let mut r = BufReader::new(&big[..]);
        assert!(read_request(&mut r).await.unwrap_err().contains("longer"));
        let mut r = BufReader::new(&b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..]);
        assert!(read_request(&mut r)
            .await
            .unwrap_err()
            .contains("Transfer-Encoding"));
        let mut r = BufReader::new(&b""[..]);
        assert!(read_request(&mut r).await.unwrap().is_none());
        let mut r = BufReader::new(&b"x"[..]);
        assert!(read_body(&mut r, 100, 10, HEAD_TIMEOUT)
            .await
            .unwrap_err()
            .contains("over"));
    }
}
