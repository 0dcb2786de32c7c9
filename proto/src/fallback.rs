//! The HTTP fallback transports, sans-IO: what a client that cannot use
//! WebSocket speaks (centrifuge-js falls back to them), and the
//! unidirectional ones a plain `fetch`, `EventSource` or `curl` can consume.
//!
//! - `http_stream` (`POST`, the body holds the client's first commands):
//!   a chunked response whose every line is a reply or push.
//! - `sse` (`GET` with the commands in the `cf_connect` query parameter, or
//!   `POST` with them in the body): a `text/event-stream`; each batch of
//!   lines is one event (`data:` per line, which `EventSource` joins with
//!   `\n` again).
//! - Both are *emulated* bidirectional: the client's later commands come in
//!   `POST /emulation` requests (`{"session","node","data"}`) that the server
//!   routes to the session; the connect reply names the two.
//! - `uni_http_stream` / `uni_sse`: a `ConnectRequest` (body, or `cf_connect`
//!   for `GET` SSE) and then pushes only, in the unidirectional form (the
//!   `Push` object itself, no `{"push":…}` wrapper; the connect reply as
//!   `{"connect":{…}}`; pings as `null`).
//!
//! The gateway queues WebSocket frames (built once per publication and
//! core); [`reframe`] turns a server text frame into a transport's framing,
//! so a publication is framed once per core for each transport too, like
//! the compressed twin. Every response is HTTP/1.1 with chunked transfer
//! encoding, so a stream ends cleanly with its last chunk.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use crate::client::Disconnect;
use crate::client::reply::disconnect_push;

/// How a session's bytes travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// WebSocket frames.
    #[default]
    WebSocket,
    /// Bidirectional emulation over a chunked HTTP response.
    HttpStream,
    /// Bidirectional emulation over Server-Sent Events.
    Sse,
    /// Pushes only, over a chunked HTTP response.
    UniHttpStream,
    /// Pushes only, over Server-Sent Events.
    UniSse,
}

impl Transport {
    /// The transport's name (the proxy's `transport` field, metrics).
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::HttpStream => "http_stream",
            Transport::Sse => "sse",
            Transport::UniHttpStream => "uni_http_stream",
            Transport::UniSse => "uni_sse",
        }
    }

    /// Whether the session's client commands come through `/emulation`.
    pub fn is_emulation(self) -> bool {
        matches!(self, Transport::HttpStream | Transport::Sse)
    }

    /// Whether the session takes pushes only.
    pub fn is_uni(self) -> bool {
        matches!(self, Transport::UniHttpStream | Transport::UniSse)
    }

    /// Whether the session is an HTTP response stream (not WebSocket).
    pub fn is_http(self) -> bool {
        self != Transport::WebSocket
    }

    fn is_sse(self) -> bool {
        matches!(self, Transport::Sse | Transport::UniSse)
    }

    /// Index among the HTTP transports (0..4), for per-transport caches.
    pub fn http_index(self) -> Option<usize> {
        match self {
            Transport::WebSocket => None,
            Transport::HttpStream => Some(0),
            Transport::Sse => Some(1),
            Transport::UniHttpStream => Some(2),
            Transport::UniSse => Some(3),
        }
    }
}

/// The request methods the fallback endpoints answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `OPTIONS` (a CORS preflight).
    Options,
    /// Anything else (405).
    Other,
}

/// A complete HTTP request head, reduced to what the fallback endpoints need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method.
    pub method: HttpMethod,
    /// Request target, query included.
    pub target: String,
    /// `Origin`, if sent.
    pub origin: Option<String>,
    /// `Access-Control-Request-Headers` of a preflight, if sent.
    pub request_headers: Option<String>,
    /// `Content-Length` (0 when absent).
    pub content_length: usize,
    /// `Content-Type: application/octet-stream` (protobuf, not served: 415).
    pub binary: bool,
    /// `Connection: close` was asked.
    pub close: bool,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
}

impl HttpRequest {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Query parameter `name`, percent-decoded (`+` is a space, as
    /// `URLSearchParams` writes it); `None` when absent or not UTF-8.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_decode(v)).flatten()
        })
    }

    /// Bytes of the whole request (head and body).
    pub fn total_len(&self) -> usize {
        self.head_len + self.content_length
    }
}

/// Why a fallback request is refused, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Malformed (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A chunked request body (411: a `Content-Length` is required).
    #[error("length required")]
    LengthRequired,
    /// A body over the bound (413).
    #[error("request body too large")]
    TooLarge,
    /// A head over its bound (431).
    #[error("request header fields too large")]
    HeadTooLarge,
}

impl HttpError {
    /// HTTP status.
    pub fn status(self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::LengthRequired => 411,
            HttpError::TooLarge => 413,
            HttpError::HeadTooLarge => 431,
        }
    }
}

/// Parses a request head from the bytes received so far: `Ok(None)` until
/// the blank line. A head over `max_head` bytes or 32 lines is 431; a body
/// declared over `max_body` is 413 (before it is read); a chunked body 411.
pub fn parse_request(buf: &[u8], max_head: usize, max_body: usize) -> Result<Option<HttpRequest>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head { Err(HttpError::HeadTooLarge) } else { Ok(None) };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::BadRequest("malformed HTTP request")),
    };
    if head_len > max_head {
        return Err(HttpError::HeadTooLarge);
    }
    if req.version != Some(1) {
        return Err(HttpError::BadRequest("HTTP/1.1 required"));
    }
    let method = match req.method {
        Some("GET") => HttpMethod::Get,
        Some("POST") => HttpMethod::Post,
        Some("OPTIONS") => HttpMethod::Options,
        _ => HttpMethod::Other,
    };
    let mut out = HttpRequest {
        method,
        target: req.path.unwrap_or("/").to_owned(),
        origin: None,
        request_headers: None,
        content_length: 0,
        binary: false,
        close: false,
        head_len,
    };
    let mut length_seen = false;
    for h in req.headers.iter() {
        let value =
            std::str::from_utf8(h.value).map_err(|_| HttpError::BadRequest("non-ASCII header value"))?;
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = value.trim();
            if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
                return Err(HttpError::BadRequest("bad Content-Length"));
            }
            let n: usize = v.parse().map_err(|_| HttpError::BadRequest("bad Content-Length"))?;
            if length_seen && n != out.content_length {
                return Err(HttpError::BadRequest("conflicting Content-Length"));
            }
            length_seen = true;
            out.content_length = n;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("access-control-request-headers") {
            out.request_headers = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-type") {
            out.binary = value.trim().starts_with("application/octet-stream");
        } else if name.eq_ignore_ascii_case("connection") {
            out.close = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
    }
    if out.content_length > max_body {
        return Err(HttpError::TooLarge);
    }
    Ok(Some(out))
}

/// The path (no query) of a complete request head, unchecked otherwise:
/// which endpoint a request is for, before its head is judged.
pub fn request_path(buf: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(buf).ok()?;
    Some(req.path?.split('?').next().unwrap_or("").to_owned())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// A `POST /emulation` body: the client's commands for a session.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct EmulationRequest {
    /// The session, as the connect reply named it.
    pub session: String,
    /// The node, as the connect reply named it.
    #[serde(default)]
    pub node: String,
    /// The commands, one JSON text (lines joined by `\n`).
    pub data: String,
}

impl EmulationRequest {
    /// Decodes a body; `None` when it is not such an object.
    pub fn decode(body: &[u8]) -> Option<EmulationRequest> {
        serde_json::from_slice(body).ok()
    }
}

fn cors(out: &mut String, origin: Option<&str>) {
    if let Some(o) = origin {
        out.push_str("Access-Control-Allow-Origin: ");
        out.push_str(o);
        out.push_str("\r\nVary: Origin\r\n");
    }
}

/// The head of a stream's response (200, chunked, no caching), with CORS
/// for a cross-origin page.
pub fn stream_head(t: Transport, origin: Option<&str>) -> Vec<u8> {
    let mut out = String::with_capacity(320);
    out.push_str("HTTP/1.1 200 OK\r\nContent-Type: ");
    out.push_str(if t.is_sse() { "text/event-stream; charset=utf-8" } else { "application/json" });
    out.push_str(
        "\r\nTransfer-Encoding: chunked\r\nCache-Control: private, no-cache, no-store, must-revalidate, max-age=0\r\nPragma: no-cache\r\nExpires: 0\r\nX-Accel-Buffering: no\r\n",
    );
    cors(&mut out, origin);
    out.push_str("\r\n");
    out.into_bytes()
}

/// An answer without a body: `204 No Content` (an emulation request
/// handed to its session, or a preflight's answer) or `202 Accepted` (one
/// passed on to another gateway), keeping the connection unless `close`.
pub fn empty(status: u16, origin: Option<&str>, preflight_headers: Option<&str>, close: bool) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    out.push_str(if status == 202 { "HTTP/1.1 202 Accepted\r\n" } else { "HTTP/1.1 204 No Content\r\n" });
    cors(&mut out, origin);
    if let Some(h) = preflight_headers {
        out.push_str("Access-Control-Allow-Methods: GET, POST, OPTIONS\r\nAccess-Control-Max-Age: 600\r\n");
        if !h.is_empty() && h != "null" {
            out.push_str("Access-Control-Allow-Headers: ");
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    if close {
        out.push_str("Connection: close\r\n");
    } else if status == 202 {
        out.push_str("Content-Length: 0\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A closing error response with CORS (so the page's script sees the status).
pub fn error(status: u16, origin: Option<&str>, body: &str) -> Vec<u8> {
    let cors = origin.map(|o| [("Access-Control-Allow-Origin", o), ("Vary", "Origin")]);
    crate::ws::handshake::error_response(status, cors.as_ref().map_or(&[][..], |c| &c[..]), body)
}

fn put_chunk(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    // The chunk size is patched in once the body is known: reserve eight
    // hex digits (a chunk is far below 4 GiB), zero-padded.
    let start = out.len();
    out.put_slice(b"00000000\r\n");
    let body_start = out.len();
    body(out);
    let n = out.len() - body_start;
    let hex = format!("{n:08x}");
    out[start..start + 8].copy_from_slice(hex.as_bytes());
    out.put_slice(b"\r\n");
}

/// The unidirectional form of one line: a push without its wrapper, the
/// connect reply as `{"connect":…}`, the ping as `null`; `None` for a line
/// a unidirectional client has no use for (a reply to a command it cannot
/// send).
fn uni_line(line: &[u8]) -> Option<(&'static [u8], &[u8])> {
    if line == crate::client::reply::PING {
        return Some((b"null", b""));
    }
    if let Some(inner) = line.strip_prefix(b"{\"push\":").and_then(|l| l.strip_suffix(b"}")) {
        return Some((b"", inner));
    }
    if let Some(rest) = line.strip_prefix(b"{\"id\":") {
        let comma = rest.iter().position(|&c| c == b',')?;
        let rest = &rest[comma + 1..];
        if rest.starts_with(b"\"connect\":") {
            // `{"connect":{…}}`: the reply's own closing brace ends it.
            return Some((b"{", rest));
        }
    }
    None
}

fn put_lines(out: &mut BytesMut, t: Transport, payload: &[u8]) -> usize {
    let mut n = 0;
    for line in payload.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let (head, line) = if t.is_uni() {
            match uni_line(line) {
                Some(l) => l,
                None => continue,
            }
        } else {
            (&b""[..], line)
        };
        if t.is_sse() {
            // A bare CR ends an SSE line too: in JSON it can only be
            // whitespace outside strings (inside one it is escaped), so a
            // space keeps the event whole and means the same.
            out.put_slice(b"data: ");
            for part in [head, line] {
                out.extend(part.iter().map(|&c| if c == b'\r' { b' ' } else { c }));
            }
        } else {
            out.put_slice(head);
            out.put_slice(line);
        }
        out.put_u8(b'\n');
        n += 1;
    }
    if t.is_sse() && n > 0 {
        out.put_u8(b'\n');
    }
    n
}

/// The client-protocol lines of a `\n`-joined payload as one chunk of the
/// transport's framing; `None` when nothing in it is for this transport.
pub fn frame_lines(t: Transport, payload: &[u8]) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(payload.len() + 32);
    let mut n = 0;
    put_chunk(&mut out, |o| n = put_lines(o, t, payload));
    (n > 0).then(|| out.freeze())
}

/// A server text frame (as [`crate::ws::SharedFrame`] builds them:
/// unmasked, unfragmented, uncompressed) re-framed for an HTTP transport;
/// `None` for any other frame or one with nothing for the transport.
pub fn reframe(t: Transport, ws_frame: &[u8]) -> Option<Bytes> {
    let payload = text_payload(ws_frame)?;
    frame_lines(t, payload)
}

/// The payload of an unmasked, unfragmented text frame.
pub fn text_payload(frame: &[u8]) -> Option<&[u8]> {
    match crate::ws::SharedFrame::data_payload(frame)? {
        (crate::ws::OpCode::Text, payload) => Some(payload),
        _ => None,
    }
}

/// How a stream ends: the `disconnect` push (the client's close code and
/// reason, as a WebSocket close frame would carry them); then, apart,
/// [`LAST_CHUNK`].
pub fn ending(t: Transport, d: Disconnect) -> Bytes {
    let push = disconnect_push(d);
    let mut out = BytesMut::with_capacity(push.len() + 32);
    put_chunk(&mut out, |o| {
        put_lines(o, t, &push);
    });
    out.freeze()
}

/// The last chunk: the end of a stream's response.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::SharedFrame;

    fn dechunk(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = b;
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap(), 16).unwrap();
            rest = &rest[nl + 2..];
            if n == 0 {
                assert_eq!(rest, b"\r\n");
                return out;
            }
            out.extend_from_slice(&rest[..n]);
            assert_eq!(&rest[n..n + 2], b"\r\n");
            rest = &rest[n + 2..];
            if rest.is_empty() {
                return out;
            }
        }
    }

    #[test]
    fn a_batch_is_one_chunk_of_lines_or_one_event() {
        let frame = SharedFrame::text_lines([
            &b"{\"id\":1,\"connect\":{\"client\":\"c\"}}"[..],
            b"{\"push\":{\"channel\":\"a\",\"pub\":{\"data\":1}}}",
        ]);
        let hs = reframe(Transport::HttpStream, frame.bytes()).unwrap();
        assert_eq!(
            dechunk(&hs),
            b"{\"id\":1,\"connect\":{\"client\":\"c\"}}\n{\"push\":{\"channel\":\"a\",\"pub\":{\"data\":1}}}\n"
        );
        let sse = reframe(Transport::Sse, frame.bytes()).unwrap();
        assert_eq!(
            dechunk(&sse),
            b"data: {\"id\":1,\"connect\":{\"client\":\"c\"}}\ndata: {\"push\":{\"channel\":\"a\",\"pub\":{\"data\":1}}}\n\n"
        );
        let uni = reframe(Transport::UniHttpStream, frame.bytes()).unwrap();
        assert_eq!(
            dechunk(&uni),
            b"{\"connect\":{\"client\":\"c\"}}\n{\"channel\":\"a\",\"pub\":{\"data\":1}}\n"
        );
        let ping = reframe(Transport::UniSse, SharedFrame::text(b"{}").bytes()).unwrap();
        assert_eq!(dechunk(&ping), b"data: null\n\n");
        // A bare CR (JSON whitespace) would split an SSE event: a space.
        let cr = reframe(Transport::Sse, SharedFrame::text(b"{\"a\":\r1}").bytes()).unwrap();
        assert_eq!(dechunk(&cr), b"data: {\"a\": 1}\n\n");
        let cr = reframe(Transport::HttpStream, SharedFrame::text(b"{\"a\":\r1}").bytes()).unwrap();
        assert_eq!(dechunk(&cr), b"{\"a\":\r1}\n");
    }

    #[test]
    fn replies_a_unidirectional_client_cannot_use_are_left_out() {
        let frame = SharedFrame::text(b"{\"id\":7,\"subscribe\":{}}");
        assert!(reframe(Transport::UniHttpStream, frame.bytes()).is_none());
        assert!(reframe(Transport::HttpStream, SharedFrame::close(3001, "x").bytes()).is_none());
        assert!(reframe(Transport::HttpStream, SharedFrame::binary(b"{}").bytes()).is_none());
        let big = vec![b'x'; 70_000];
        let f = SharedFrame::text(&big);
        assert_eq!(dechunk(&reframe(Transport::HttpStream, f.bytes()).unwrap()).len(), 70_001);
    }

    #[test]
    fn a_stream_ends_with_the_disconnect_push_then_the_last_chunk() {
        let mut e = ending(Transport::HttpStream, Disconnect::SHUTDOWN).to_vec();
        e.extend_from_slice(LAST_CHUNK);
        assert_eq!(dechunk(&e), b"{\"push\":{\"disconnect\":{\"code\":3001,\"reason\":\"shutdown\"}}}\n");
        let mut e = ending(Transport::UniSse, Disconnect::SHUTDOWN).to_vec();
        e.extend_from_slice(LAST_CHUNK);
        assert_eq!(dechunk(&e), b"data: {\"disconnect\":{\"code\":3001,\"reason\":\"shutdown\"}}\n\n");
    }

    #[test]
    fn request_heads_are_bounded_and_checked() {
        let r = parse_request(
            b"POST /emulation?x=1 HTTP/1.1\r\nHost: h\r\nOrigin: http://p\r\nContent-Length: 5\r\n\r\nhello",
            8192,
            64,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.method, r.path(), r.content_length), (HttpMethod::Post, "/emulation", 5));
        assert_eq!(r.origin.as_deref(), Some("http://p"));
        assert_eq!(r.total_len(), r.head_len + 5);
        assert_eq!(parse_request(b"POST / HTTP/1.1\r\nHost: h\r\n", 8192, 64), Ok(None));
        let err = |b: &[u8]| parse_request(b, 64, 64).unwrap_err().status();
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n"), 413);
        assert_eq!(err(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), 400);
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), 400);
        assert_eq!(err(b"GET / HTTP/1.0\r\n\r\n"), 400);
        assert_eq!(err(b"\x00\x01 nonsense\r\n\r\n"), 400);
        assert_eq!(err(&[b'a'; 64]), 431);
    }

    #[test]
    fn the_connect_parameter_is_percent_decoded() {
        let r = parse_request(
            b"GET /connection/sse?cf_connect=%7B%22id%22%3A1%2C%22connect%22%3A%7B%7D%7D&x=a+b HTTP/1.1\r\n\r\n",
            8192,
            0,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.query_param("cf_connect").unwrap(), "{\"id\":1,\"connect\":{}}");
        assert_eq!(r.query_param("x").unwrap(), "a b");
        assert_eq!(r.query_param("y"), None);
        let bad = parse_request(b"GET /s?cf_connect=%zz&b=%+1 HTTP/1.1\r\n\r\n", 8192, 0).unwrap().unwrap();
        assert_eq!(bad.query_param("cf_connect"), None);
        assert_eq!(bad.query_param("b"), None);
    }

    #[test]
    fn emulation_bodies_decode_or_are_refused() {
        let r = EmulationRequest::decode(br#"{"session":"s","node":"n","data":"{\"id\":2,\"ping\":{}}"}"#)
            .unwrap();
        assert_eq!(r.data, "{\"id\":2,\"ping\":{}}");
        assert!(EmulationRequest::decode(b"{}").is_none());
        assert!(EmulationRequest::decode(b"nope").is_none());
    }
}
