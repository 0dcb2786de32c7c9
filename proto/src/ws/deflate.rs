//! permessage-deflate (RFC 7692), the shape that keeps "encode once" true.
//!
//! The server always answers with `server_no_context_takeover` and
//! `client_no_context_takeover`: every message, in both directions, is
//! compressed from an empty window. So one compressed frame is valid for every
//! recipient (the [`Deflater`] lives per core, not per connection) and inbound
//! messages inflate with a pooled [`Inflater`] that is reset between messages.
//! A client that asks for a server window under 15 bits is accepted with that
//! value echoed, and then served uncompressed messages (RSV1 clear), which
//! RFC 7692 allows: the shared compressed frame uses the full window.
//! zlib state is about 256 KiB for deflate and 40 KiB for inflate: keeping one
//! per connection would cost more than the connection itself.
//!
//! Inflation is bounded by the maximum message size, so a decompression bomb
//! ends in close 1009 after at most `max_message` bytes of output.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::WsError;

/// The trailer every compressed message drops and every inflater re-appends.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor per message (always true when we serve).
    pub server_no_context_takeover: bool,
    /// The client resets its compressor per message (always true when we serve).
    pub client_no_context_takeover: bool,
    /// The largest server window the client accepts, if it named one (8–15).
    pub server_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// What a Switchyard server answers to an offer with no server window limit.
    pub const SERVER: DeflateParams = DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        server_max_window_bits: None,
    };

    /// Whether the server may send compressed messages: only with the full
    /// 15-bit window, the one the shared per-core compressor uses.
    pub fn server_compresses(&self) -> bool {
        matches!(self.server_max_window_bits, None | Some(15))
    }

    /// The `Sec-WebSocket-Extensions` value for a response.
    pub fn response_header(&self) -> String {
        let mut s = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            s.push_str(&format!("; server_max_window_bits={bits}"));
        }
        s
    }
}

/// One extension in a `Sec-WebSocket-Extensions` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionOffer {
    /// Extension token, lower-cased.
    pub name: String,
    /// Parameters, names lower-cased, values unquoted.
    pub params: Vec<(String, Option<String>)>,
}

/// Parses a `Sec-WebSocket-Extensions` header value; malformed entries are skipped.
pub fn parse_extensions(value: &str) -> Vec<ExtensionOffer> {
    value
        .split(',')
        .filter_map(|ext| {
            let mut parts = ext.split(';').map(str::trim);
            let name = parts.next()?.to_ascii_lowercase();
            if name.is_empty() {
                return None;
            }
            let params = parts
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => {
                        (k.trim().to_ascii_lowercase(), Some(v.trim().trim_matches('"').to_owned()))
                    }
                    None => (p.to_ascii_lowercase(), None),
                })
                .collect();
            Some(ExtensionOffer { name, params })
        })
        .collect()
}

fn window_bits_ok(v: &Option<String>, required: bool) -> bool {
    match v {
        None => !required,
        Some(s) => matches!(s.parse::<u8>(), Ok(8..=15)) && !s.starts_with('0'),
    }
}

/// Picks a permessage-deflate offer from the client's extension headers: the
/// first acceptable one that lets the server compress, else the first
/// acceptable one. An offer is declined if it repeats a parameter, names an
/// unknown one or has a malformed window size. A server window under 15 bits
/// is echoed and honoured by never compressing toward that client.
pub fn negotiate(offers: &[ExtensionOffer]) -> Option<DeflateParams> {
    let mut acceptable = offers.iter().filter_map(accept_offer);
    let first = acceptable.next()?;
    if first.server_compresses() {
        return Some(first);
    }
    Some(acceptable.find(DeflateParams::server_compresses).unwrap_or(first))
}

fn accept_offer(offer: &ExtensionOffer) -> Option<DeflateParams> {
    if offer.name != "permessage-deflate" {
        return None;
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut params = DeflateParams::SERVER;
    for (k, v) in &offer.params {
        if seen.contains(&k.as_str()) {
            return None;
        }
        seen.push(k);
        let ok = match k.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => v.is_none(),
            "server_max_window_bits" => {
                params.server_max_window_bits = v.as_deref().and_then(|b| b.parse().ok());
                window_bits_ok(v, true)
            }
            "client_max_window_bits" => window_bits_ok(v, false),
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(params)
}

/// The client's side: the offer loadgen sends and the check of the answer.
pub mod client {
    use super::{DeflateParams, parse_extensions};

    /// The offer a Switchyard client sends.
    pub const OFFER: &str = "permessage-deflate; client_no_context_takeover; client_max_window_bits";

    /// Reads the server's answer. `Err` when the server answered with
    /// parameters a client did not offer or cannot honour.
    pub fn accept(header: &str) -> Result<Option<DeflateParams>, &'static str> {
        let exts = parse_extensions(header);
        let mut out = None;
        for e in exts {
            if e.name != "permessage-deflate" || out.is_some() {
                return Err("unexpected extension in response");
            }
            let mut p = DeflateParams {
                server_no_context_takeover: false,
                client_no_context_takeover: false,
                server_max_window_bits: None,
            };
            for (k, v) in e.params {
                match (k.as_str(), v) {
                    ("server_no_context_takeover", None) => p.server_no_context_takeover = true,
                    ("client_no_context_takeover", None) => p.client_no_context_takeover = true,
                    ("server_max_window_bits", Some(b)) => p.server_max_window_bits = b.parse().ok(),
                    ("client_max_window_bits", Some(_)) => {}
                    _ => return Err("bad permessage-deflate parameter"),
                }
            }
            out = Some(p);
        }
        Ok(out)
    }
}

/// A compressor that starts every message from an empty window. One per core.
pub struct Deflater {
    inner: Compress,
    out: Vec<u8>,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").finish_non_exhaustive()
    }
}

impl Default for Deflater {
    fn default() -> Self {
        Self::new(Compression::fast())
    }
}

impl Deflater {
    /// A raw-deflate compressor with a 15-bit window at `level`.
    pub fn new(level: Compression) -> Self {
        Deflater { inner: Compress::new(level, false), out: Vec::new() }
    }

    /// Compresses one whole message, without the `00 00 ff ff` trailer.
    pub fn compress(&mut self, payload: &[u8]) -> Vec<u8> {
        self.inner.reset();
        self.out.clear();
        self.out.reserve(payload.len() / 2 + 64);
        let mut input = payload;
        loop {
            if self.out.len() == self.out.capacity() {
                self.out.reserve(self.out.capacity().max(64));
            }
            let before = self.inner.total_in();
            self.inner
                .compress_vec(input, &mut self.out, FlushCompress::Sync)
                .expect("raw deflate of a slice cannot fail");
            input = &input[(self.inner.total_in() - before) as usize..];
            if input.is_empty() && self.out.len() < self.out.capacity() {
                break;
            }
        }
        if self.out.ends_with(&TAIL) {
            self.out.truncate(self.out.len() - TAIL.len());
        }
        std::mem::take(&mut self.out)
    }
}

/// A bounded decompressor, reset for every message. One per core.
pub struct Inflater {
    inner: Decompress,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// A raw-deflate decompressor with a 15-bit window.
    pub fn new() -> Self {
        Inflater { inner: Decompress::new(false) }
    }

    /// Inflates one message; more than `max` bytes of output is
    /// [`WsError::TooBig`], corrupt input is [`WsError::BadCompression`].
    pub fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<Bytes, WsError> {
        self.inner.reset(false);
        let mut out: Vec<u8> = Vec::with_capacity((compressed.len() * 4).clamp(64, max + 1));
        for part in [compressed, &TAIL[..]] {
            let mut input = part;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(WsError::TooBig("inflated message too big"));
                    }
                    let grow = out.capacity().max(64).min(max + 1 - out.len());
                    out.reserve_exact(grow);
                }
                let before_in = self.inner.total_in();
                let before_out = out.len();
                let status = self
                    .inner
                    .decompress_vec(input, &mut out, FlushDecompress::Sync)
                    .map_err(|_| WsError::BadCompression)?;
                let consumed = (self.inner.total_in() - before_in) as usize;
                input = &input[consumed..];
                if out.len() > max {
                    return Err(WsError::TooBig("inflated message too big"));
                }
                let stalled = consumed == 0 && out.len() == before_out;
                if status == Status::StreamEnd
                    || (input.is_empty() && out.len() < out.capacity())
                    || (stalled && out.len() < out.capacity())
                {
                    break;
                }
            }
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_first_acceptable_offer() {
        let offers = parse_extensions(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits",
        );
        assert_eq!(negotiate(&offers), Some(DeflateParams::SERVER));
        let offers = parse_extensions("permessage-deflate; server_max_window_bits=10");
        let accepted = negotiate(&offers).unwrap();
        assert_eq!(accepted.server_max_window_bits, Some(10));
        assert!(!accepted.server_compresses());
        assert!(accepted.response_header().ends_with("; server_max_window_bits=10"));
        let offers = parse_extensions("permessage-deflate; server_max_window_bits=15");
        assert!(negotiate(&offers).unwrap().server_compresses());
        let offers = parse_extensions("permessage-deflate; client_max_window_bits");
        assert_eq!(negotiate(&offers), Some(DeflateParams::SERVER));
        assert!(DeflateParams::SERVER.server_compresses());
        for bad in ["server_max_window_bits=7", "server_max_window_bits", "server_max_window_bits=015"] {
            let offers = parse_extensions(&format!("permessage-deflate; {bad}"));
            assert_eq!(negotiate(&offers), None, "{bad}");
        }
        let offers = parse_extensions("permessage-deflate; foo");
        assert_eq!(negotiate(&offers), None);
        let offers =
            parse_extensions("permessage-deflate; client_no_context_takeover; client_no_context_takeover");
        assert_eq!(negotiate(&offers), None);
        let offers = parse_extensions("x-webkit-deflate-frame");
        assert_eq!(negotiate(&offers), None);
        assert_eq!(
            DeflateParams::SERVER.response_header(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn roundtrip_and_shared_across_inflaters() {
        let mut d = Deflater::default();
        let msg = br#"{"push":{"channel":"chat:1","pub":{"data":{"text":"hello hello hello"},"offset":7}}}"#;
        let c = d.compress(msg);
        assert!(!c.ends_with(&TAIL));
        // Two independent inflaters (two recipients) read the same bytes.
        for _ in 0..2 {
            let mut i = Inflater::new();
            assert_eq!(&i.inflate(&c, 1 << 16).unwrap()[..], &msg[..]);
        }
        // The same inflater is reusable across messages.
        let mut i = Inflater::new();
        for _ in 0..3 {
            assert_eq!(&i.inflate(&c, 1 << 16).unwrap()[..], &msg[..]);
        }
    }

    #[test]
    fn bomb_is_bounded() {
        let mut d = Deflater::new(Compression::best());
        let zeros = vec![0u8; 10 << 20];
        let c = d.compress(&zeros);
        assert!(c.len() < 64 << 10);
        let mut i = Inflater::new();
        assert_eq!(i.inflate(&c, 1 << 16), Err(WsError::TooBig("inflated message too big")));
    }

    #[test]
    fn garbage_is_bad_compression() {
        let mut i = Inflater::new();
        assert!(matches!(i.inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1024), Err(WsError::BadCompression)));
    }

    #[test]
    fn client_accepts_server_answer() {
        assert_eq!(
            client::accept(&DeflateParams::SERVER.response_header()).unwrap(),
            Some(DeflateParams::SERVER)
        );
        let narrow = DeflateParams { server_max_window_bits: Some(9), ..DeflateParams::SERVER };
        assert_eq!(client::accept(&narrow.response_header()).unwrap(), Some(narrow));
        assert!(client::accept("permessage-deflate; bogus").is_err());
    }
}
