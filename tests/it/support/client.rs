//! A raw HTTP/1 client: bytes written as given, responses read off the socket (Content-Length,
//! chunked, until EOF, pipelined), so tests can send what a real client library would refuse.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use std::time::Duration;

use super::PATIENCE;

/// A response read off a socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The proxy's `x-bearer-proxy-error` code, after checking the error body agrees.
    pub fn proxy_error(&self) -> Option<String> {
        let code = self.header("x-bearer-proxy-error")?.to_owned();
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.json()["error"], code.as_str());
        Some(code)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects to `addr`.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Sends `request` on a new connection and reads one response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = connect(addr).await;
    s.write_all(request).await.unwrap();
    read_response(&mut s).await.unwrap()
}

/// `GET <url>` through the proxy at `addr`, with extra header lines.
pub async fn get(addr: SocketAddr, url: &str, headers: &[&str]) -> RawResponse {
    get_within(addr, url, headers, PATIENCE).await
}

/// [`get`], waiting up to `patience` for the answer (the load tests pass
/// [`super::LOAD_PATIENCE`]).
pub async fn get_within(
    addr: SocketAddr,
    url: &str,
    headers: &[&str],
    patience: Duration,
) -> RawResponse {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    let mut req = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut s = connect(addr).await;
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::timeout(patience, read_response_inner(&mut s, &mut Vec::new()))
        .await
        .unwrap_or_else(|_| panic!("no answer to GET {url} within {patience:?}"))
        .unwrap()
}

/// Sends `request` on a new connection; the answer, and whether the peer then closed the
/// connection (within [`PATIENCE`]).
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> (RawResponse, bool) {
    let mut s = connect(addr).await;
    s.write_all(request).await.unwrap();
    let resp = read_response(&mut s).await.unwrap();
    (resp, closed(&mut s).await)
}

/// `GET http://<host><path>` through the proxy at `addr` on a new connection, checking the
/// response is never a complete message: the client's reader must hit the end of the
/// connection (or a reset) before the body is complete.
pub async fn assert_cut_short(addr: SocketAddr, host: &str, path: &str) {
    let mut s = connect(addr).await;
    s.write_all(format!("GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let err = read_response(&mut s).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{path}: {err}"
    );
}

/// Reads one response (Content-Length, chunked or until EOF). Fails if the connection ends
/// before the body does. Bytes read beyond the response are dropped: for pipelined responses
/// use [`read_pipelined`].
pub async fn read_response(s: &mut TcpStream) -> std::io::Result<RawResponse> {
    read_pipelined(s, &mut Vec::new()).await
}

/// Reads a response head only, byte by byte (a `100 Continue` or a CONNECT `200` has no body
/// framing to follow).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Reads one response, starting with the bytes in `carry` (left over from the previous
/// response on the connection) and leaving there whatever follows this one.
pub async fn read_pipelined(
    s: &mut TcpStream,
    carry: &mut Vec<u8>,
) -> std::io::Result<RawResponse> {
    tokio::time::timeout(PATIENCE, read_response_inner(s, carry))
        .await
        .map_err(|_| std::io::Error::other("timed out reading a response"))?
}

async fn read_response_inner(
    s: &mut TcpStream,
    carry: &mut Vec<u8>,
) -> std::io::Result<RawResponse> {
    let mut buf = std::mem::take(carry);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        // What follows belongs to the next response.
        *carry = rest;
        Vec::new()
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        *carry = rest.split_off(len);
        rest
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let (body, left) = read_chunked(s, rest).await?;
        *carry = left;
        body
    } else {
        s.read_to_end(&mut rest).await?;
        rest
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// A chunked body and the bytes after it (trailers are not expected).
async fn read_chunked(s: &mut TcpStream, mut buf: Vec<u8>) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(s, &mut buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .map_err(|e| std::io::Error::other(format!("bad chunk size {size_text:?}: {e}")))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            while buf.len() < 2 {
                fill(s, &mut buf).await?;
            }
            buf.drain(..2);
            return Ok((body, buf));
        }
        while buf.len() < size + 2 {
            fill(s, &mut buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = s.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Waits for the peer to close `s` (reading and discarding anything before that). Returns
/// whether it closed within [`PATIENCE`].
pub async fn closed(s: &mut TcpStream) -> bool {
    let read_all = async {
        let mut sink = [0u8; 1024];
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.is_ok()
}

/// `GET path` on an admin port (one request per connection).
pub async fn admin_get(admin: SocketAddr, path: &str) -> RawResponse {
    raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}
