//! Router identities and the router ⇄ router call protocol.
//!
//! Every router has a name, the DNS name its link certificate is issued for.
//! Gateways list routers as `NAME@ADDR` and verify each router's certificate
//! against its name, so one router's certificate never passes for another's;
//! a bare `ADDR` expects the development certificate's name, [`DEV_NAME`].
//!
//! Routers forward HTTP API calls for channels they do not own to the owner
//! over QUIC with mutual TLS (ALPN [`PEER_ALPN`]), on the same endpoint the
//! gateways reach. A call is one bidirectional stream: the caller writes a
//! request and finishes its side; the callee writes the reply and finishes.
//!
//! - request: `u8` [`PEER_VERSION`], `u8` method length, the method (ASCII),
//!   then the JSON body up to the end of the stream;
//! - reply: `u16` big-endian HTTP status, then the body up to the end.
//!
//! The method `readyz` asks for the callee's readiness (200 or 503), which
//! peers probe to agree on ownership; any other method is an HTTP API method
//! (`publish`, `history`, …), answered by the callee as its own, never
//! forwarded again.

use std::net::SocketAddr;

/// ALPN of router ⇄ router calls.
pub const PEER_ALPN: &[u8] = b"switchyard-peer/1";

/// Version byte of a request.
pub const PEER_VERSION: u8 = 1;

/// The readiness method.
pub const READYZ: &str = "readyz";

/// Name of the development router certificate (`router certs` without `--names`).
pub const DEV_NAME: &str = "localhost";

/// Bytes a request or reply carries at most beside its body.
pub const HEADER_MAX: usize = 2 + u8::MAX as usize;

/// A router as gateways and peers address it: the name its certificate must
/// be valid for, and its QUIC address (also its name in the rendezvous hash).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouterAddr {
    /// DNS name in the router's certificate.
    pub name: String,
    /// UDP address of its QUIC endpoint.
    pub addr: SocketAddr,
}

impl RouterAddr {
    /// A router at `addr` with the development certificate.
    pub fn dev(addr: SocketAddr) -> Self {
        RouterAddr { name: DEV_NAME.into(), addr }
    }
}

impl std::str::FromStr for RouterAddr {
    type Err = String;

    /// `NAME@ADDR`, or `ADDR` for a router with the development certificate.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, addr) = match s.rsplit_once('@') {
            Some((n, a)) => (n.trim(), a.trim()),
            None => (DEV_NAME, s.trim()),
        };
        valid_name(name)?;
        let addr = addr.parse().map_err(|e| format!("{addr}: {e} (expected NAME@IP:PORT or IP:PORT)"))?;
        Ok(RouterAddr { name: name.to_owned(), addr })
    }
}

impl std::fmt::Display for RouterAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

impl serde::Serialize for RouterAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RouterAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether `name` can be a certificate's DNS name: 1–253 bytes of labels of
/// 1–63 letters, digits and hyphens, not starting or ending with a hyphen.
pub fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok { Ok(()) } else { Err(format!("{name:?} is not a valid router name (a DNS name)")) }
}

/// A malformed request or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Shorter than its header.
    #[error("truncated peer message")]
    Truncated,
    /// A request of another version.
    #[error("unsupported peer protocol version {0}")]
    Version(u8),
    /// A method that is not printable ASCII.
    #[error("malformed method")]
    Method,
}

/// Encodes a call of `method` with `body`.
///
/// # Panics
/// If `method` is longer than 255 bytes (methods are the API's own names).
pub fn encode_request(method: &str, body: &[u8]) -> Vec<u8> {
    let len = u8::try_from(method.len()).expect("API method names are short");
    let mut out = Vec::with_capacity(2 + method.len() + body.len());
    out.push(PEER_VERSION);
    out.push(len);
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(body);
    out
}

/// The method and body of a request.
pub fn decode_request(msg: &[u8]) -> Result<(&str, &[u8]), PeerError> {
    let [version, len, rest @ ..] = msg else { return Err(PeerError::Truncated) };
    if *version != PEER_VERSION {
        return Err(PeerError::Version(*version));
    }
    let len = usize::from(*len);
    if rest.len() < len {
        return Err(PeerError::Truncated);
    }
    let (method, body) = rest.split_at(len);
    if method.is_empty() || !method.iter().all(|b| b.is_ascii_graphic()) {
        return Err(PeerError::Method);
    }
    let method = std::str::from_utf8(method).map_err(|_| PeerError::Method)?;
    Ok((method, body))
}

/// Encodes a reply.
pub fn encode_reply(status: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The status and body of a reply.
pub fn decode_reply(msg: &[u8]) -> Result<(u16, &[u8]), PeerError> {
    let [a, b, body @ ..] = msg else { return Err(PeerError::Truncated) };
    Ok((u16::from_be_bytes([*a, *b]), body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn router_addresses_parse_with_and_without_a_name() {
        let a: RouterAddr = "router-a.example@10.0.0.1:7100".parse().unwrap();
        assert_eq!(a.name, "router-a.example");
        assert_eq!(a.addr.to_string(), "10.0.0.1:7100");
        assert_eq!(a.to_string(), "router-a.example@10.0.0.1:7100");
        let b: RouterAddr = "127.0.0.1:7100".parse().unwrap();
        assert_eq!(b, RouterAddr::dev("127.0.0.1:7100".parse().unwrap()));
        let v6: RouterAddr = "r1@[::1]:7100".parse().unwrap();
        assert_eq!(v6.addr.port(), 7100);
        for bad in [
            "",
            "r1@",
            "@127.0.0.1:1",
            "bad name@127.0.0.1:1",
            "-r@127.0.0.1:1",
            "r1@nowhere",
            "r..x@127.0.0.1:1",
        ] {
            assert!(bad.parse::<RouterAddr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let r = encode_request("publish", br#"{"channel":"c"}"#);
        assert_eq!(decode_request(&r).unwrap(), ("publish", &br#"{"channel":"c"}"#[..]));
        assert_eq!(decode_request(&encode_request(READYZ, b"")).unwrap(), (READYZ, &b""[..]));
        let a = encode_reply(503, b"draining");
        assert_eq!(decode_reply(&a).unwrap(), (503, &b"draining"[..]));
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert_eq!(decode_request(b""), Err(PeerError::Truncated));
        assert_eq!(decode_request(&[1]), Err(PeerError::Truncated));
        assert_eq!(decode_request(&[2, 1, b'x']), Err(PeerError::Version(2)));
        assert_eq!(decode_request(&[1, 5, b'a']), Err(PeerError::Truncated));
        assert_eq!(decode_request(&[1, 0]), Err(PeerError::Method));
        assert_eq!(decode_request(&[1, 2, b'a', b' ']), Err(PeerError::Method));
        assert_eq!(decode_reply(&[0]), Err(PeerError::Truncated));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
        }
    }
}
