//! The HTTP/1.1 upgrade (RFC 6455 §4), both sides, incrementally.
//!
//! [`parse_request`] is called with everything received so far; it returns
//! `Ok(None)` until the blank line arrives, and refuses a request larger than
//! [`HandshakeLimits::max_header_bytes`] *before* it is complete, so a client
//! cannot make the server buffer an unbounded header. Every refusal is a
//! [`HandshakeError`] that knows its HTTP status and renders its response.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::{Digest, Sha1};

use super::deflate::{self, DeflateParams, ExtensionOffer};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Bounds on an upgrade request.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// Bytes up to and including the blank line (default 8 KiB; above: 431).
    pub max_header_bytes: usize,
    /// Header lines (default 32, at most 64; above: 431).
    pub max_headers: usize,
}

impl HandshakeLimits {
    /// The default [`HandshakeLimits::max_header_bytes`] (8 KiB), also the
    /// bound of the HTTP fallbacks' request heads.
    pub const DEFAULT_HEADER_BYTES: usize = 8192;
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits { max_header_bytes: Self::DEFAULT_HEADER_BYTES, max_headers: 32 }
    }
}

/// A valid upgrade request, reduced to what the server needs afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request target, query included.
    pub path: String,
    /// `Sec-WebSocket-Key` as sent.
    pub key: String,
    /// `Sec-WebSocket-Protocol` tokens, in the client's order.
    pub protocols: Vec<String>,
    /// `Sec-WebSocket-Extensions` offers, in the client's order.
    pub extensions: Vec<ExtensionOffer>,
    /// `Origin`, if sent (browsers always send it).
    pub origin: Option<String>,
    /// `Host`.
    pub host: String,
}

impl UpgradeRequest {
    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    /// The value of query parameter `name`, if present (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        let q = self.path.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }

    /// The first offered subprotocol that is in `supported`.
    pub fn select_protocol<'a>(&self, supported: &[&'a str]) -> Option<&'a str> {
        self.protocols.iter().find_map(|p| supported.iter().find(|s| s.eq_ignore_ascii_case(p)).copied())
    }

    /// The permessage-deflate parameters to accept, if the client offered an acceptable one.
    pub fn negotiate_deflate(&self) -> Option<DeflateParams> {
        deflate::negotiate(&self.extensions)
    }
}

/// Why an upgrade request was refused; each carries its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Malformed HTTP or a missing/invalid WebSocket header (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Not a GET (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No `Upgrade: websocket` (426, advertising websocket).
    #[error("upgrade required")]
    UpgradeRequired,
    /// `Sec-WebSocket-Version` other than 13 (426, advertising 13).
    #[error("unsupported websocket version")]
    UnsupportedVersion,
    /// Header section over the byte or line limit (431).
    #[error("request header fields too large")]
    TooLarge,
}

impl HandshakeError {
    /// HTTP status code of the answer.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::BadRequest(_) => 400,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::UpgradeRequired | HandshakeError::UnsupportedVersion => 426,
            HandshakeError::TooLarge => 431,
        }
    }

    /// The full HTTP response to send before closing.
    pub fn response(&self) -> Vec<u8> {
        let extra: &[(&str, &str)] = match self {
            HandshakeError::MethodNotAllowed => &[("Allow", "GET")],
            HandshakeError::UpgradeRequired => &[("Upgrade", "websocket")],
            HandshakeError::UnsupportedVersion => {
                &[("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")]
            }
            _ => &[],
        };
        let body = self.to_string();
        error_response(self.status(), extra, &body)
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A complete, closing HTTP error response with a plain-text body.
pub fn error_response(status: u16, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    out.push_str("Content-Type: text/plain\r\nConnection: close\r\n");
    out.push_str(&format!("Content-Length: {}\r\n\r\n{}", body.len(), body));
    out.into_bytes()
}

/// The 503 admission control sends in a storm; the caller picks `retry_after_secs`
/// (the gateway: a slot of the refused client's own, see [`crate::backoff::RetrySchedule`]).
pub fn service_unavailable(retry_after_secs: u32) -> Vec<u8> {
    let secs = retry_after_secs.to_string();
    error_response(503, &[("Retry-After", &secs)], "overloaded, retry later")
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID);
    B64.encode(h.finalize())
}

/// The 101 response that completes the upgrade.
pub fn switching_protocols(key: &str, protocol: Option<&str>, deflate: Option<&DeflateParams>) -> Vec<u8> {
    let mut out = String::with_capacity(160);
    out.push_str("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.push_str(&accept_key(key));
    out.push_str("\r\n");
    if let Some(p) = protocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    if let Some(d) = deflate {
        out.push_str("Sec-WebSocket-Extensions: ");
        out.push_str(&d.response_header());
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses an upgrade request from the bytes received so far.
/// `Ok(Some((request, consumed)))` when complete; bytes after `consumed` are
/// already WebSocket frames.
pub fn parse_request(
    buf: &[u8],
    limits: &HandshakeLimits,
) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let max_headers = limits.max_headers.min(headers.len());
    let mut req = httparse::Request::new(&mut headers[..max_headers]);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_header_bytes {
                Err(HandshakeError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::BadRequest("malformed HTTP request")),
    };
    if consumed > limits.max_header_bytes {
        return Err(HandshakeError::TooLarge);
    }
    if req.method != Some("GET") {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::BadRequest("HTTP/1.1 required"));
    }
    let path = req.path.unwrap_or("/").to_owned();
    let mut host = None;
    let mut upgrade = false;
    let mut connection = false;
    let mut version = None;
    let mut key: Option<&str> = None;
    let mut protocols = Vec::new();
    let mut extensions = Vec::new();
    let mut origin = None;
    for h in req.headers.iter() {
        let value =
            std::str::from_utf8(h.value).map_err(|_| HandshakeError::BadRequest("non-ASCII header value"))?;
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HandshakeError::BadRequest("duplicate Host"));
            }
            host = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            if version.is_some() {
                return Err(HandshakeError::BadRequest("duplicate Sec-WebSocket-Version"));
            }
            version = Some(value.trim());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(HandshakeError::BadRequest("duplicate Sec-WebSocket-Key"));
            }
            key = Some(value.trim());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocols.extend(value.split(',').map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            extensions.extend(deflate::parse_extensions(value));
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(value.to_owned());
        }
    }
    let host = host.ok_or(HandshakeError::BadRequest("missing Host"))?;
    if !upgrade {
        return Err(HandshakeError::UpgradeRequired);
    }
    if !connection {
        return Err(HandshakeError::BadRequest("Connection must include Upgrade"));
    }
    match version {
        Some("13") => {}
        Some(_) => return Err(HandshakeError::UnsupportedVersion),
        None => return Err(HandshakeError::BadRequest("missing Sec-WebSocket-Version")),
    }
    let key = key.ok_or(HandshakeError::BadRequest("missing Sec-WebSocket-Key"))?;
    match B64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadRequest("Sec-WebSocket-Key must be 16 bytes of base64")),
    }
    Ok(Some((UpgradeRequest { path, key: key.to_owned(), protocols, extensions, origin, host }, consumed)))
}

/// The values of the headers named in `names` (any case) in a complete
/// upgrade request (what [`parse_request`] accepted, so already bounded),
/// in request order, each as `(name as listed, value)`; a header that occurs
/// twice is listed twice. The gateway forwards these to the app backend's
/// proxy hooks (`Cookie`, `Authorization`, `X-Forwarded-For`, ...).
pub fn headers_named(buf: &[u8], names: &[String]) -> Vec<(String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(buf), Ok(httparse::Status::Complete(_))) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for h in req.headers.iter() {
        let Some(name) = names.iter().find(|n| n.eq_ignore_ascii_case(h.name)) else { continue };
        if let Ok(value) = std::str::from_utf8(h.value) {
            out.push((name.clone(), value.to_owned()));
        }
    }
    out
}

/// The client side of the upgrade (loadgen and tests).
pub mod client {
    use super::*;

    /// What the client offered, kept to check the server's answer.
    #[derive(Debug, Clone)]
    pub struct ClientHandshake {
        /// The `Sec-WebSocket-Key` sent.
        pub key: String,
        /// Whether permessage-deflate was offered.
        pub offered_deflate: bool,
    }

    /// A successful 101.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ServerAccept {
        /// The subprotocol the server chose.
        pub protocol: Option<String>,
        /// permessage-deflate, if the server accepted it.
        pub deflate: Option<DeflateParams>,
    }

    /// Why the server's answer was not a usable 101.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum ClientHandshakeError {
        /// The server answered with another status (e.g. 503 with `Retry-After`).
        #[error("server refused the upgrade with status {status}")]
        Rejected {
            /// The HTTP status.
            status: u16,
            /// `Retry-After` in seconds, when present.
            retry_after: Option<u32>,
        },
        /// A 101 that does not satisfy RFC 6455 §4.1.
        #[error("invalid upgrade response: {0}")]
        Invalid(&'static str),
        /// The response header section is too large.
        #[error("response too large")]
        TooLarge,
    }

    /// Builds the upgrade request. `nonce` is the 16 random bytes of the key.
    pub fn request(
        host: &str,
        path: &str,
        nonce: [u8; 16],
        protocols: &[&str],
        deflate: bool,
    ) -> (Vec<u8>, ClientHandshake) {
        let key = B64.encode(nonce);
        let mut out = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if !protocols.is_empty() {
            out.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", protocols.join(", ")));
        }
        if deflate {
            out.push_str(&format!("Sec-WebSocket-Extensions: {}\r\n", deflate::client::OFFER));
        }
        out.push_str("\r\n");
        (out.into_bytes(), ClientHandshake { key, offered_deflate: deflate })
    }

    impl ClientHandshake {
        /// Parses the server's answer from the bytes received so far.
        pub fn parse_response(
            &self,
            buf: &[u8],
        ) -> Result<Option<(ServerAccept, usize)>, ClientHandshakeError> {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let consumed = match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    return if buf.len() > 16384 { Err(ClientHandshakeError::TooLarge) } else { Ok(None) };
                }
                Err(_) => return Err(ClientHandshakeError::Invalid("malformed HTTP response")),
            };
            let find = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
            };
            let status = resp.code.unwrap_or(0);
            if status != 101 {
                let retry_after = find("retry-after").and_then(|v| v.trim().parse().ok());
                return Err(ClientHandshakeError::Rejected { status, retry_after });
            }
            if !find("upgrade").is_some_and(|v| has_token(v, "websocket")) {
                return Err(ClientHandshakeError::Invalid("missing Upgrade: websocket"));
            }
            if !find("connection").is_some_and(|v| has_token(v, "upgrade")) {
                return Err(ClientHandshakeError::Invalid("missing Connection: Upgrade"));
            }
            if find("sec-websocket-accept").map(str::trim) != Some(accept_key(&self.key).as_str()) {
                return Err(ClientHandshakeError::Invalid("wrong Sec-WebSocket-Accept"));
            }
            let deflate = match find("sec-websocket-extensions") {
                None => None,
                Some(_) if !self.offered_deflate => {
                    return Err(ClientHandshakeError::Invalid("extension not offered"));
                }
                Some(v) => deflate::client::accept(v).map_err(ClientHandshakeError::Invalid)?,
            };
            let protocol = find("sec-websocket-protocol").map(|p| p.trim().to_owned());
            Ok(Some((ServerAccept { protocol, deflate }, consumed)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "GET /connection/websocket?cf_ws_frame_ping_pong=true HTTP/1.1\r\nHost: localhost\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: centrifuge-json\r\nOrigin: http://example.com\r\n\r\n";

    #[test]
    fn rfc_accept_key() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_at_every_split() {
        let bytes = REQ.as_bytes();
        for split in 0..bytes.len() {
            assert_eq!(parse_request(&bytes[..split], &HandshakeLimits::default()), Ok(None));
        }
        let (req, n) = parse_request(bytes, &HandshakeLimits::default()).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(req.path_only(), "/connection/websocket");
        assert_eq!(req.query_param("cf_ws_frame_ping_pong"), Some("true"));
        assert_eq!(req.select_protocol(&["centrifuge-json"]), Some("centrifuge-json"));
        assert_eq!(req.origin.as_deref(), Some("http://example.com"));
    }

    #[test]
    fn named_headers_are_kept_for_the_proxy() {
        let req = REQ.replace("\r\n\r\n", "\r\ncookie: a=1\r\nCookie: b=2\r\nX-Other: no\r\n\r\n");
        let names = vec!["Cookie".to_string(), "Origin".to_string()];
        let got = headers_named(req.as_bytes(), &names);
        let want = [("Origin", "http://example.com"), ("Cookie", "a=1"), ("Cookie", "b=2")];
        assert_eq!(got, want.map(|(n, v)| (n.to_string(), v.to_string())));
        assert!(headers_named(&req.as_bytes()[..20], &names).is_empty(), "an incomplete request has none");
    }

    fn refuse(req: &str) -> u16 {
        parse_request(req.as_bytes(), &HandshakeLimits::default()).unwrap_err().status()
    }

    #[test]
    fn refusals_carry_their_status() {
        assert_eq!(refuse(&REQ.replace("GET", "POST")), 405);
        assert_eq!(refuse(&REQ.replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(refuse(&REQ.replace("Upgrade: WebSocket\r\n", "")), 426);
        assert_eq!(refuse(&REQ.replace("keep-alive, Upgrade", "keep-alive")), 400);
        assert_eq!(refuse(&REQ.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(refuse(&REQ.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=")), 400);
        assert_eq!(refuse(&REQ.replace("Host: localhost\r\n", "")), 400);
        assert_eq!(refuse("GARBAGE\x01\r\n\r\n"), 400);
        let big = REQ.replace("Origin:", &format!("X-Pad: {}\r\nOrigin:", "a".repeat(9000)));
        assert_eq!(refuse(&big), 431);
        // An unfinished header already over the limit is refused before it ends.
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(refuse(&partial), 431);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(refuse(&REQ.replace("Origin:", &format!("{many}Origin:"))), 431);
        let e = HandshakeError::UnsupportedVersion.response();
        let text = String::from_utf8(e).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 ") && text.contains("Sec-WebSocket-Version: 13\r\n"));
        let text = String::from_utf8(service_unavailable(7)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 ") && text.contains("Retry-After: 7\r\n"));
    }

    #[test]
    fn client_and_server_agree() {
        let (req, hs) = client::request("127.0.0.1:1", "/connection/websocket", [7; 16], &[], true);
        let (parsed, _) = parse_request(&req, &HandshakeLimits::default()).unwrap().unwrap();
        let deflate = parsed.negotiate_deflate();
        assert_eq!(deflate, Some(DeflateParams::SERVER));
        let resp = switching_protocols(&parsed.key, None, deflate.as_ref());
        let (accept, n) = hs.parse_response(&resp).unwrap().unwrap();
        assert_eq!(n, resp.len());
        assert_eq!(accept.deflate, Some(DeflateParams::SERVER));
        let err = hs.parse_response(&service_unavailable(3)).unwrap_err();
        assert_eq!(err, client::ClientHandshakeError::Rejected { status: 503, retry_after: Some(3) });
        let bad = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None, None);
        assert!(matches!(hs.parse_response(&bad), Err(client::ClientHandshakeError::Invalid(_))));
    }
}
