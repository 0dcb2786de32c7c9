//! TLS (wss) on the client listener. rustls runs the handshake through its
//! unbuffered API, fed from the core's scratch buffer; once the handshake is
//! done, rustls hands over the traffic secrets and keeps only what a key
//! update needs ([`KernelConnection`]), and the record layer is the
//! gateway's own: TLS 1.3 records sealed and opened with ring's AEADs,
//! straight between the core's scratch buffers and the socket.
//!
//! That is what keeps an idle wss session small: no rustls buffers, no
//! expanded AEAD keys (a key is expanded per read or flush, ~0.2 µs), only
//! the key material, the sequence numbers and rustls' key schedule (~1 KB
//! in all; `benches/scripts/idle_memory.py --tls`). A partly received
//! record or a partly sent flush is kept per connection only while it
//! lasts.
//!
//! Only TLS 1.3 is offered (the record layer is 1.3's: RFC 8446 §5).

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use anyhow::Context;
use bytes::{Buf, Bytes, BytesMut};
use ring::aead;
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError};
use rustls::{ConnectionTrafficSecrets, Error as TlsError};

use super::socket::{Flushed, Written, recv_into};
use crate::config::TlsConfig;

/// The listener's TLS configuration, if TLS is configured.
pub fn server_config(cfg: &TlsConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        if cfg.cert.is_some() || cfg.key.is_some() {
            anyhow::bail!("tls.cert and tls.key go together");
        }
        return Ok(None);
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The record layer after the handshake is ours (module docs).
    config.enable_secret_extraction = true;
    Ok(Some(Arc::new(config)))
}

/// A record's header: type, legacy version, length.
const HEADER: usize = 5;
/// The most plaintext a record carries (RFC 8446 §5.1).
const MAX_PLAIN: usize = 16 * 1024;
/// The longest record payload a peer may send (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// The most handshake bytes held while waiting for the rest of a message
/// (rustls' own bound on a handshake message is 64 KiB).
const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024 + HEADER;
/// Plaintext sealed per flush round: the bound on what one connection keeps
/// sealed but unsent (rustls' buffered API kept up to 64 KiB too).
const FLUSH_BUDGET: usize = 64 * 1024;
/// The spare room a read needs: one whole record.
pub const READ_ROOM: usize = HEADER + MAX_CIPHERTEXT;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions sent on errors (RFC 8446 §6).
mod alert {
    pub(super) const CLOSE_NOTIFY: u8 = 0;
    pub(super) const UNEXPECTED_MESSAGE: u8 = 10;
    pub(super) const BAD_RECORD_MAC: u8 = 20;
    pub(super) const RECORD_OVERFLOW: u8 = 22;
    pub(super) const ILLEGAL_PARAMETER: u8 = 47;
    pub(super) const DECODE_ERROR: u8 = 50;
}

/// A wss session's TLS state: 16 bytes in its slot, the rest boxed.
pub enum Tls {
    /// rustls drives the handshake.
    Handshaking(Box<Handshake>),
    /// The record layer is ours.
    Open(Box<Open>),
    /// Failed, or the handshake's hand-over failed: nothing more goes in or out.
    Dead,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Handshaking(_) => "Tls::Handshaking",
            Tls::Open(_) => "Tls::Open",
            Tls::Dead => "Tls::Dead",
        })
    }
}

/// A connection in its handshake.
pub struct Handshake {
    conn: UnbufferedServerConnection,
    /// Records received but not yet complete.
    incoming: Vec<u8>,
    /// Handshake records not yet sent.
    outgoing: Vec<u8>,
    /// Frames queued before the handshake finished (a refusal), sealed
    /// once it has.
    early: VecDeque<Bytes>,
    /// The session ended before the handshake did: close once `early` is out.
    shutdown: bool,
}

/// An established connection: rustls' key schedule, and our record layer.
pub struct Open {
    kernel: KernelConnection<ServerConnectionData>,
    tx: Keys,
    rx: Keys,
    /// A record received in part.
    incoming: Vec<u8>,
    /// Sealed records not yet sent (at most one flush round's).
    outgoing: Vec<u8>,
    /// Sealed records before this many need a key update (the suite's
    /// confidentiality limit).
    tx_limit: u64,
    /// close_notify and the write side's shutdown are due once everything
    /// queued is out (the session ended during the handshake).
    shutdown: bool,
    /// The peer asked for our key update: sealed at the next flush, ahead
    /// of any application data (one answer however often it asks).
    tx_update_due: bool,
    /// KeyUpdates received since the last application data (bounded, as
    /// rustls bounds them).
    key_updates: u8,
    /// Our close_notify is sealed: nothing more is.
    closed: bool,
}

/// The most KeyUpdates in a row without application data between them.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;

/// One direction's traffic keys and its record sequence number.
struct Keys {
    alg: &'static aead::Algorithm,
    key: [u8; 32],
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Key material does not outlive the connection in freed memory.
        for b in self.key.iter_mut().chain(self.iv.iter_mut()) {
            // SAFETY: a valid, aligned, exclusive reference to a byte.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, TlsError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(TlsError::General("a cipher suite the record layer does not know".into())),
        };
        let (k, i) = (key.as_ref(), iv.as_ref());
        if k.len() != alg.key_len() || i.len() != aead::NONCE_LEN {
            return Err(TlsError::General("traffic secrets of the wrong length".into()));
        }
        let mut keys = Keys { alg, key: [0; 32], iv: [0; aead::NONCE_LEN], seq };
        keys.key[..k.len()].copy_from_slice(k);
        keys.iv.copy_from_slice(i);
        Ok(keys)
    }

    /// The expanded key, for one read or flush.
    fn expand(&self) -> aead::LessSafeKey {
        let key = aead::UnboundKey::new(self.alg, &self.key[..self.alg.key_len()])
            .expect("the key length was checked in Keys::new");
        aead::LessSafeKey::new(key)
    }

    /// The per-record nonce: the IV with the sequence number XORed into
    /// its last 8 bytes (RFC 8446 §5.3).
    fn nonce(&self) -> aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        aead::Nonce::assume_unique_for_key(n)
    }
}

/// Seals one record of `typ` with `body` onto `out`.
fn seal(keys: &mut Keys, key: &aead::LessSafeKey, typ: u8, body: &[&[u8]], out: &mut Vec<u8>) {
    let start = out.len();
    let len: usize = body.iter().map(|b| b.len()).sum::<usize>() + 1 + keys.alg.tag_len();
    let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
    out.extend_from_slice(&header);
    for b in body {
        out.extend_from_slice(b);
    }
    out.push(typ);
    let nonce = keys.nonce();
    keys.seq += 1;
    let tag = key
        .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut out[start + HEADER..])
        .expect("a record within the AEAD's length limits");
    out.extend_from_slice(tag.as_ref());
}

/// What one read of a TLS socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadTls {
    /// Plaintext (possibly none: handshake records) was appended.
    Data,
    /// The peer closed (TCP end of stream or close_notify).
    Closed,
    /// Nothing to read now.
    WouldBlock,
}

/// Why a connection's TLS failed (its alert, if any, is queued).
#[derive(Debug)]
pub struct Failed(pub String);

impl Tls {
    /// A connection whose handshake starts now.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<Tls, TlsError> {
        Ok(Tls::Handshaking(Box::new(Handshake {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            early: VecDeque::new(),
            shutdown: false,
        })))
    }

    /// Whether the connection has records to send besides its queue.
    pub fn wants_write(&self) -> bool {
        match self {
            Tls::Handshaking(h) => !h.outgoing.is_empty(),
            Tls::Open(o) => !o.outgoing.is_empty() || o.tx_update_due,
            Tls::Dead => false,
        }
    }

    /// Whether the handshake is done.
    #[cfg(test)]
    fn is_open(&self) -> bool {
        matches!(self, Tls::Open(_))
    }

    /// Reads what the socket has (one `recv` into `cipher`, after the part
    /// of a record kept from before), decrypts it and appends the plaintext
    /// to `plain`. On an error, the alert is queued: flush to send it.
    pub fn read(&mut self, fd: RawFd, cipher: &mut BytesMut, plain: &mut BytesMut) -> io::Result<ReadTls> {
        cipher.clear();
        let kept = match self {
            Tls::Handshaking(h) => &h.incoming,
            Tls::Open(o) => &o.incoming,
            Tls::Dead => return Ok(ReadTls::Closed),
        };
        cipher.reserve(kept.len() + READ_ROOM);
        cipher.extend_from_slice(kept);
        match recv_into(fd, cipher) {
            Ok(0) => return Ok(ReadTls::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadTls::WouldBlock),
            Err(e) => return Err(e),
        }
        self.receive(cipher, plain).map_err(|Failed(why)| io::Error::new(io::ErrorKind::InvalidData, why))
    }

    /// Processes the records in `buf` (all the connection has received
    /// and not processed), keeping an incomplete record's bytes.
    fn receive(&mut self, buf: &mut [u8], plain: &mut BytesMut) -> Result<ReadTls, Failed> {
        let mut at = 0;
        if let Tls::Handshaking(h) = self {
            match h.advance(buf, plain)? {
                Advanced::Blocked(used) => {
                    let rest = &buf[used..];
                    if rest.len() > MAX_HANDSHAKE_BUFFER {
                        return Err(Failed("handshake message too long".into()));
                    }
                    h.incoming = rest.to_vec();
                    return Ok(ReadTls::Data);
                }
                Advanced::Closed => {
                    *self = Tls::Dead;
                    return Ok(ReadTls::Closed);
                }
                Advanced::Done(used) => {
                    at = used;
                    self.open()?;
                }
            }
        }
        let Tls::Open(o) = self else { return Ok(ReadTls::Closed) };
        let (used, closed) = o.receive(&mut buf[at..], plain)?;
        let rest = &buf[at + used..];
        o.incoming = if closed || rest.is_empty() { Vec::new() } else { rest.to_vec() };
        Ok(if closed { ReadTls::Closed } else { ReadTls::Data })
    }

    /// The handshake is done: rustls hands over the secrets.
    fn open(&mut self) -> Result<(), Failed> {
        let Tls::Handshaking(h) = std::mem::replace(self, Tls::Dead) else { return Ok(()) };
        let Handshake { conn, outgoing, early, shutdown, .. } = *h;
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(|e| Failed(e.to_string()))?;
        let Some(suite) = kernel.negotiated_cipher_suite().tls13() else {
            return Err(Failed("a TLS 1.2 connection on a TLS 1.3 listener".into()));
        };
        let tx_limit = suite.common.confidentiality_limit;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let tx = Keys::new(tx_seq, tx).map_err(|e| Failed(e.to_string()))?;
        let rx = Keys::new(rx_seq, rx).map_err(|e| Failed(e.to_string()))?;
        let mut open = Box::new(Open {
            kernel,
            tx,
            rx,
            incoming: Vec::new(),
            outgoing,
            tx_limit,
            shutdown,
            tx_update_due: false,
            key_updates: 0,
            closed: false,
        });
        if !early.is_empty() {
            let key = open.tx.expand();
            for frame in &early {
                for chunk in frame.chunks(MAX_PLAIN) {
                    open.seal_data(&key, &[chunk]);
                }
            }
        }
        *self = Tls::Open(open);
        Ok(())
    }

    /// Writes the connection's own records, then moves queued frames
    /// through the record layer and writes them, without blocking. Bytes
    /// count as written once sealed (at most one round's are kept); the
    /// result is `All` only when nothing sealed is left either.
    pub fn flush(
        &mut self,
        fd: RawFd,
        queue: &mut VecDeque<Bytes>,
        scratch: &mut Vec<u8>,
    ) -> (io::Result<Flushed>, Written) {
        let mut written = Written::default();
        match self {
            Tls::Dead => (Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS failed")), written),
            Tls::Handshaking(h) => {
                // Only a refusal is queued before the upgrade: it is sealed
                // once the handshake is done.
                while let Some(f) = queue.pop_front() {
                    written.bytes += f.len();
                    h.early.push_back(f);
                }
                (send_kept(fd, &mut h.outgoing), written)
            }
            Tls::Open(o) => {
                if std::mem::take(&mut o.tx_update_due)
                    && let Err(Failed(why)) = o.update_tx()
                {
                    return (Err(io::Error::other(why)), written);
                }
                let before = o.outgoing.len();
                let kept = send_kept(fd, &mut o.outgoing);
                written.sent = o.outgoing.len() < before;
                match kept {
                    Ok(Flushed::All) => {}
                    other => return (other, written),
                }
                loop {
                    while queue.front().is_some_and(|f| f.is_empty()) {
                        queue.pop_front();
                    }
                    if queue.is_empty() {
                        if o.shutdown {
                            // The end the session asked for during the
                            // handshake: close_notify, then the write side
                            // once it is out.
                            if !o.closed {
                                o.alert(alert::CLOSE_NOTIFY);
                            }
                            let sent = send_kept(fd, &mut o.outgoing);
                            if matches!(sent, Ok(Flushed::All)) {
                                o.shutdown = false;
                                // SAFETY: plain syscall on the session's open socket.
                                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                            }
                            return (sent, written);
                        }
                        return (Ok(Flushed::All), written);
                    }
                    scratch.clear();
                    let mut key = o.tx.expand();
                    let mut round = 0;
                    while round < FLUSH_BUDGET && !queue.is_empty() {
                        match o.rekey_if_due(&key, scratch) {
                            Ok(false) => {}
                            Ok(true) => key = o.tx.expand(),
                            Err(Failed(why)) => return (Err(io::Error::other(why)), written),
                        }
                        let (took, front_started) = o.seal_queue(&key, queue, scratch, FLUSH_BUDGET - round);
                        round += took;
                        written.bytes += took;
                        written.front_started = front_started;
                    }
                    match send(fd, scratch) {
                        Ok(n) if n == scratch.len() => {}
                        Ok(n) => {
                            o.outgoing = scratch[n..].to_vec();
                            return (Ok(Flushed::Blocked), written);
                        }
                        Err(e) => return (Err(e), written),
                    }
                }
            }
        }
    }

    /// Sends what the connection itself has to send (an alert after an
    /// error), best effort.
    pub fn flush_alert(&mut self, fd: RawFd) {
        let out = match self {
            Tls::Handshaking(h) => &mut h.outgoing,
            Tls::Open(o) => &mut o.outgoing,
            Tls::Dead => return,
        };
        let _ = send_kept(fd, out);
    }

    /// The session ends its write side: seals close_notify and writes what
    /// the connection holds, best effort. Whether the socket's write side
    /// may be shut now: not during the handshake, where what was queued (a
    /// refusal) goes out once it is done, then close_notify and the
    /// shutdown (with the session's linger as the bound).
    pub fn close_notify(&mut self, fd: RawFd) -> bool {
        match self {
            Tls::Open(o) => {
                o.alert(alert::CLOSE_NOTIFY);
                let _ = send_kept(fd, &mut o.outgoing);
                true
            }
            Tls::Handshaking(h) => {
                h.shutdown = true;
                false
            }
            Tls::Dead => true,
        }
    }
}

/// How far a handshake got with the bytes it was given.
enum Advanced {
    /// It needs more; the first `usize` bytes were used.
    Blocked(usize),
    /// Done; the first `usize` bytes were used, the rest are records for
    /// the record layer.
    Done(usize),
    /// The peer closed.
    Closed,
}

impl Handshake {
    fn advance(&mut self, buf: &mut [u8], plain: &mut BytesMut) -> Result<Advanced, Failed> {
        let mut at = 0;
        loop {
            // Once the client's Finished is in, rustls gets no more records:
            // what follows it (application data, a KeyUpdate) is for our
            // record layer. rustls would act on a KeyUpdate itself and keep
            // its answer where the hand-over does not look. It still emits
            // its session tickets, then `WriteTraffic`.
            let mut none: [u8; 0] = [];
            let input: &mut [u8] = if self.conn.is_handshaking() { &mut buf[at..] } else { &mut none };
            let status = self.conn.process_tls_records(input);
            let discard = status.discard;
            let state = match status.state {
                Ok(s) => s,
                Err(e) => {
                    self.queue_alert(buf, at + discard);
                    return Err(Failed(e.to_string()));
                }
            };
            let mut done = false;
            let mut extra = 0;
            match state {
                ConnectionState::EncodeTlsData(mut enc) => {
                    let start = self.outgoing.len();
                    let mut room = 2048;
                    loop {
                        self.outgoing.resize(start + room, 0);
                        match enc.encode(&mut self.outgoing[start..]) {
                            Ok(n) => {
                                self.outgoing.truncate(start + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
                            Err(e) => {
                                self.outgoing.truncate(start);
                                return Err(Failed(e.to_string()));
                            }
                        }
                    }
                }
                // The records are ours to send with the next flush.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => return Ok(Advanced::Blocked(at + discard)),
                ConnectionState::ReadTraffic(mut r) => {
                    // Application data sealed under the handshake's last keys,
                    // read by rustls.
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(|e| Failed(e.to_string()))?;
                        plain.extend_from_slice(rec.payload);
                        extra += rec.discard;
                    }
                }
                // The handshake is complete (the server's half-RTT data is
                // off, rustls' default: `WriteTraffic` comes only then).
                ConnectionState::WriteTraffic(_) => done = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => return Ok(Advanced::Closed),
                other => return Err(Failed(format!("unexpected TLS state {other:?}"))),
            }
            at += discard + extra;
            if done {
                return Ok(Advanced::Done(at));
            }
        }
    }

    /// After rustls failed the handshake: its alert, if it has one.
    fn queue_alert(&mut self, buf: &mut [u8], at: usize) {
        let at = at.min(buf.len());
        let status = self.conn.process_tls_records(&mut buf[at..]);
        if let Ok(ConnectionState::EncodeTlsData(mut enc)) = status.state {
            let start = self.outgoing.len();
            self.outgoing.resize(start + 64, 0);
            let n = enc.encode(&mut self.outgoing[start..]).unwrap_or(0);
            self.outgoing.truncate(start + n);
        }
    }
}

impl Open {
    /// Opens the whole records at the front of `buf`, appending application
    /// data to `plain`: the bytes used, and whether the peer closed.
    fn receive(&mut self, buf: &mut [u8], plain: &mut BytesMut) -> Result<(usize, bool), Failed> {
        let mut at = 0;
        let mut key: Option<aead::LessSafeKey> = None;
        while buf.len() - at >= HEADER {
            let header: [u8; HEADER] = buf[at..at + HEADER].try_into().expect("HEADER bytes");
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != APPLICATION_DATA {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a record in the clear after the handshake"));
            }
            if len > MAX_CIPHERTEXT {
                return Err(self.fail(alert::RECORD_OVERFLOW, "a record longer than 2^14 + 256"));
            }
            if buf.len() - at - HEADER < len {
                break;
            }
            let body = &mut buf[at + HEADER..at + HEADER + len];
            at += HEADER + len;
            let k = key.get_or_insert_with(|| self.rx.expand());
            let nonce = self.rx.nonce();
            let Ok(inner) = k.open_in_place(nonce, aead::Aad::from(header), body) else {
                return Err(self.fail(alert::BAD_RECORD_MAC, "a record that does not decrypt"));
            };
            self.rx.seq += 1;
            // The content type is the last non-zero byte (RFC 8446 §5.4).
            let Some(end) = inner.iter().rposition(|&b| b != 0) else {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a record without a content type"));
            };
            if inner.len() > MAX_PLAIN + 1 {
                return Err(self.fail(alert::RECORD_OVERFLOW, "a record with more than 2^14 bytes"));
            }
            let (content, typ) = (&inner[..end], inner[end]);
            match typ {
                APPLICATION_DATA => {
                    self.key_updates = 0;
                    plain.extend_from_slice(content);
                }
                ALERT => {
                    if content.len() != 2 {
                        return Err(self.fail(alert::DECODE_ERROR, "an alert that is not two bytes"));
                    }
                    if content[1] == alert::CLOSE_NOTIFY {
                        return Ok((at, true));
                    }
                    // Any other alert ends the connection (RFC 8446 §6.2).
                    return Err(Failed(format!("the peer sent alert {content:?}")));
                }
                HANDSHAKE => {
                    if self.post_handshake(content)? {
                        key = None;
                    }
                }
                _ => return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a record of an unknown content type")),
            }
        }
        Ok((at, false))
    }

    /// Handles the handshake messages of one record after the handshake:
    /// only KeyUpdate is allowed from a client. Whether the receive keys
    /// changed.
    fn post_handshake(&mut self, mut messages: &[u8]) -> Result<bool, Failed> {
        if messages.is_empty() {
            return Err(self.fail(alert::UNEXPECTED_MESSAGE, "an empty handshake record"));
        }
        let mut rekeyed = false;
        while !messages.is_empty() {
            let &[typ, a, b, c, ref rest @ ..] = messages else {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a handshake message split across records"));
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if rest.len() < len {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a handshake message split across records"));
            }
            let (body, after) = rest.split_at(len);
            messages = after;
            if typ != KEY_UPDATE {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "a handshake message other than KeyUpdate"));
            }
            let requested = match body {
                [0] => false,
                [1] => true,
                [_] => return Err(self.fail(alert::ILLEGAL_PARAMETER, "a KeyUpdate with an unknown request")),
                _ => return Err(self.fail(alert::DECODE_ERROR, "a KeyUpdate of the wrong length")),
            };
            if !messages.is_empty() {
                // A key change must end its record (RFC 8446 §5.1).
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "data after a KeyUpdate in its record"));
            }
            self.key_updates += 1;
            if self.key_updates > MAX_KEY_UPDATES_IN_A_ROW {
                return Err(self.fail(alert::UNEXPECTED_MESSAGE, "too many KeyUpdates without data"));
            }
            let (seq, secrets) = self.kernel.update_rx_secret().map_err(|e| Failed(e.to_string()))?;
            self.rx = Keys::new(seq, secrets).map_err(|e| Failed(e.to_string()))?;
            rekeyed = true;
            // Answered at the next flush, once however often asked.
            self.tx_update_due |= requested && !self.closed;
        }
        Ok(rekeyed)
    }

    /// Sends KeyUpdate (update_not_requested) under the current keys and
    /// moves to the next ones.
    fn update_tx(&mut self) -> Result<(), Failed> {
        if self.closed {
            return Ok(());
        }
        let key = self.tx.expand();
        let mut out = std::mem::take(&mut self.outgoing);
        let updated = self.key_update(&key, &mut out);
        self.outgoing = out;
        updated
    }

    /// Seals KeyUpdate (update_not_requested) onto `out` under the current
    /// keys (`key` is their expansion) and moves to the next ones.
    fn key_update(&mut self, key: &aead::LessSafeKey, out: &mut Vec<u8>) -> Result<(), Failed> {
        seal(&mut self.tx, key, HANDSHAKE, &[&[KEY_UPDATE, 0, 0, 1, 0]], out);
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(|e| Failed(e.to_string()))?;
        self.tx = Keys::new(seq, secrets).map_err(|e| Failed(e.to_string()))?;
        Ok(())
    }

    /// Seals application data onto `outgoing` (a refusal queued during the
    /// handshake).
    fn seal_data(&mut self, key: &aead::LessSafeKey, body: &[&[u8]]) {
        seal(&mut self.tx, key, APPLICATION_DATA, body, &mut self.outgoing);
    }

    /// Seals frames from the front of `queue` into one record of at most
    /// `budget` (and 2^14) bytes on `out`: the bytes taken, and whether the
    /// front frame is now partly taken.
    fn seal_queue(
        &mut self,
        key: &aead::LessSafeKey,
        queue: &mut VecDeque<Bytes>,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> (usize, bool) {
        let room = budget.min(MAX_PLAIN);
        let mut parts: [&[u8]; 16] = [&[]; 16];
        let (mut n, mut took) = (0, 0);
        for f in queue.iter() {
            if n == parts.len() || took == room {
                break;
            }
            let take = f.len().min(room - took);
            parts[n] = &f[..take];
            n += 1;
            took += take;
        }
        seal(&mut self.tx, key, APPLICATION_DATA, &parts[..n], out);
        let mut left = took;
        let mut front_started = false;
        while left > 0 {
            let front = queue.front_mut().expect("sealed bytes come from queued frames");
            if left >= front.len() {
                left -= front.len();
                queue.pop_front();
            } else {
                front.advance(left);
                left = 0;
                front_started = true;
            }
        }
        // Empty frames carry nothing: they go, so every call makes progress.
        while queue.front().is_some_and(|f| f.is_empty()) {
            queue.pop_front();
        }
        (took, front_started)
    }

    /// At the suite's confidentiality limit (one record short of it): a key
    /// update sealed onto `out` under the spent keys, and the next keys in
    /// place. Whether the keys changed; an error (only TLS 1.3 is offered,
    /// where key updates always work) fails the connection rather than
    /// seal past the limit.
    fn rekey_if_due(&mut self, key: &aead::LessSafeKey, out: &mut Vec<u8>) -> Result<bool, Failed> {
        if self.tx.seq.saturating_add(1) < self.tx_limit {
            return Ok(false);
        }
        self.key_update(key, out)?;
        Ok(true)
    }

    /// Seals an alert onto `outgoing` (a fatal one for errors).
    fn alert(&mut self, description: u8) {
        if self.closed {
            return;
        }
        let level = if description == alert::CLOSE_NOTIFY { 1 } else { 2 };
        let key = self.tx.expand();
        seal(&mut self.tx, &key, ALERT, &[&[level, description]], &mut self.outgoing);
        // After close_notify or a fatal alert nothing more is sealed.
        self.closed = true;
    }

    fn fail(&mut self, description: u8, why: &str) -> Failed {
        self.alert(description);
        Failed(why.into())
    }
}

/// Sends `out` without blocking, keeping what the socket did not take.
fn send_kept(fd: RawFd, out: &mut Vec<u8>) -> io::Result<Flushed> {
    if out.is_empty() {
        return Ok(Flushed::All);
    }
    let n = send(fd, out)?;
    if n == out.len() {
        *out = Vec::new();
        Ok(Flushed::All)
    } else {
        out.drain(..n);
        Ok(Flushed::Blocked)
    }
}

/// One non-blocking send (no SIGPIPE): the bytes taken, 0 when the socket
/// is full.
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `send` reads at most `buf.len()` bytes from `buf`.
        let n = unsafe {
            libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use bytes::{Bytes, BytesMut};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::{Flushed, ReadTls, Tls};

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Our server end and a rustls client, over a socket pair.
    struct Pair {
        server: Tls,
        sfd: UnixStream,
        client: rustls::ClientConnection,
        cfd: UnixStream,
        cipher: BytesMut,
        scratch: Vec<u8>,
    }

    impl Pair {
        fn new() -> Pair {
            let (server, client) = configs();
            let (sfd, cfd) = UnixStream::pair().unwrap();
            sfd.set_nonblocking(true).unwrap();
            cfd.set_nonblocking(true).unwrap();
            Pair {
                server: Tls::new(server).unwrap(),
                sfd,
                client: rustls::ClientConnection::new(client, ServerName::try_from("localhost").unwrap())
                    .unwrap(),
                cfd,
                cipher: BytesMut::with_capacity(32 * 1024),
                scratch: Vec::new(),
            }
        }

        fn open() -> Pair {
            let mut p = Pair::new();
            p.handshake();
            p
        }

        fn client_send(&mut self) {
            while self.client.wants_write() {
                self.client.write_tls(&mut self.cfd).unwrap();
            }
        }

        /// Reads until the socket is empty: the plaintext and the last result.
        fn server_read(&mut self) -> (std::io::Result<ReadTls>, Vec<u8>) {
            let mut plain = BytesMut::new();
            loop {
                match self.server.read(self.sfd.as_raw_fd(), &mut self.cipher, &mut plain) {
                    Ok(ReadTls::Data) => continue,
                    other => return (other, plain.to_vec()),
                }
            }
        }

        fn server_flush(&mut self, queue: &mut VecDeque<Bytes>) -> (Flushed, usize) {
            let (r, w) = self.server.flush(self.sfd.as_raw_fd(), queue, &mut self.scratch);
            (r.unwrap(), w.bytes)
        }

        fn server_flush_written(&mut self, queue: &mut VecDeque<Bytes>) -> (Flushed, super::Written) {
            let (r, w) = self.server.flush(self.sfd.as_raw_fd(), queue, &mut self.scratch);
            (r.unwrap(), w)
        }

        /// Reads what the client has; `Err` for a TLS error (an alert).
        fn client_read(&mut self) -> Result<Vec<u8>, rustls::Error> {
            let mut out = Vec::new();
            loop {
                let more = match self.client.read_tls(&mut self.cfd) {
                    Ok(0) => false,
                    Ok(_) => {
                        self.client.process_new_packets()?;
                        true
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                    Err(e) if e.kind() == std::io::ErrorKind::Other => {
                        // rustls' plaintext buffer is full: drain it first.
                        true
                    }
                    Err(e) => panic!("{e}"),
                };
                match self.client.reader().read_to_end(&mut out) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                    Err(e) => panic!("{e}"),
                }
                if !more {
                    return Ok(out);
                }
            }
        }

        /// Reads at most `limit` bytes of records, and what they decrypt to.
        fn client_read_some(&mut self, limit: u64) -> Vec<u8> {
            let mut raw = Read::take(&self.cfd, limit);
            match self.client.read_tls(&mut raw) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            self.client.process_new_packets().unwrap();
            let mut out = Vec::new();
            let _ = self.client.reader().read_to_end(&mut out);
            out
        }

        /// Runs the handshake: the application data the client got with it.
        fn handshake(&mut self) -> Vec<u8> {
            let mut got = Vec::new();
            for _ in 0..10 {
                self.client_send();
                let (r, plain) = self.server_read();
                assert_eq!(r.unwrap(), ReadTls::WouldBlock);
                assert!(plain.is_empty());
                self.server_flush(&mut VecDeque::new());
                got.extend(self.client_read().unwrap());
                if self.server.is_open() && !self.client.is_handshaking() {
                    return got;
                }
            }
            panic!("the handshake did not finish");
        }

        fn open_state(&mut self) -> &mut super::Open {
            match &mut self.server {
                Tls::Open(o) => o,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn data_goes_both_ways_through_our_record_layer() {
        let mut p = Pair::open();
        p.client.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        p.client_send();
        let (r, plain) = p.server_read();
        assert_eq!(r.unwrap(), ReadTls::WouldBlock);
        assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n");
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut queue: VecDeque<Bytes> =
            [Bytes::from_static(b"abc"), Bytes::from(big.clone()), Bytes::from_static(b"z")].into();
        let (flushed, n) = p.server_flush(&mut queue);
        assert_eq!((flushed, n), (Flushed::All, 40_004));
        assert!(queue.is_empty());
        let got = p.client_read().unwrap();
        assert_eq!(got.len(), 40_004);
        assert_eq!(&got[..3], b"abc");
        assert_eq!(&got[3..40_003], &big[..]);
        assert_eq!(got[40_003], b'z');
    }

    #[test]
    fn records_split_anywhere_are_put_back_together() {
        let mut p = Pair::open();
        p.client.writer().write_all(&[7u8; 20_000]).unwrap();
        p.client.writer().write_all(b"tail").unwrap();
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).unwrap();
        }
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            (&p.sfd).flush().unwrap();
            (&p.cfd).write_all(chunk).unwrap();
            let (r, plain) = p.server_read();
            assert_eq!(r.unwrap(), ReadTls::WouldBlock);
            got.extend(plain);
        }
        assert_eq!(got.len(), 20_004);
        assert!(got[..20_000].iter().all(|&b| b == 7));
        assert_eq!(&got[20_000..], b"tail");
        assert!(p.open_state().incoming.is_empty(), "no partial record is kept once it is complete");
    }

    #[test]
    fn a_client_key_update_is_answered_and_both_directions_take_the_new_keys() {
        let mut p = Pair::open();
        let rx_before = p.open_state().rx.key;
        let tx_before = p.open_state().tx.key;
        // rustls asks for the peer's update too (update_requested).
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer().write_all(b"after").unwrap();
        p.client_send();
        let (r, plain) = p.server_read();
        assert_eq!(r.unwrap(), ReadTls::WouldBlock);
        assert_eq!(plain, b"after");
        assert_ne!(p.open_state().rx.key, rx_before);
        // Our answer goes at the next flush, ahead of the data.
        assert!(p.server.wants_write());
        let mut queue: VecDeque<Bytes> = [Bytes::from_static(b"reply")].into();
        assert_eq!(p.server_flush(&mut queue).0, Flushed::All);
        assert_ne!(p.open_state().tx.key, tx_before);
        assert_eq!(p.client_read().unwrap(), b"reply");
    }

    #[test]
    fn the_server_updates_its_keys_before_the_confidentiality_limit() {
        let mut p = Pair::open();
        let o = p.open_state();
        o.tx_limit = o.tx.seq + 3;
        let before = o.tx.key;
        let mut expected = Vec::new();
        for i in 0..10u8 {
            let mut queue: VecDeque<Bytes> = [Bytes::from(vec![i; 100])].into();
            expected.extend(vec![i; 100]);
            assert_eq!(p.server_flush(&mut queue).0, Flushed::All);
        }
        let o = p.open_state();
        assert_ne!(o.tx.key, before, "the keys were updated");
        assert!(o.tx.seq < 3, "no key sealed past its limit: seq {}", o.tx.seq);
        assert_eq!(p.client_read().unwrap(), expected);
    }

    #[test]
    fn a_tampered_record_fails_with_bad_record_mac() {
        let mut p = Pair::open();
        p.client.writer().write_all(b"hello").unwrap();
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).unwrap();
        }
        let last = wire.len() - 3;
        wire[last] ^= 1;
        (&p.cfd).write_all(&wire).unwrap();
        let (r, plain) = p.server_read();
        assert!(r.is_err());
        assert!(plain.is_empty());
        p.server.flush_alert(p.sfd.as_raw_fd());
        let err = p.client_read().unwrap_err();
        assert_eq!(err, rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac));
    }

    #[test]
    fn a_record_in_the_clear_after_the_handshake_is_an_unexpected_message() {
        let mut p = Pair::open();
        (&p.cfd).write_all(&[21, 3, 3, 0, 2, 1, 0]).unwrap();
        let (r, _) = p.server_read();
        assert!(r.is_err());
        p.server.flush_alert(p.sfd.as_raw_fd());
        let err = p.client_read().unwrap_err();
        assert_eq!(err, rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage));
    }

    #[test]
    fn an_oversized_record_is_a_record_overflow() {
        let mut p = Pair::open();
        (&p.cfd).write_all(&[23, 3, 3, 0x41, 0x01]).unwrap();
        let (r, _) = p.server_read();
        assert!(r.is_err());
        p.server.flush_alert(p.sfd.as_raw_fd());
        let err = p.client_read().unwrap_err();
        assert_eq!(err, rustls::Error::AlertReceived(rustls::AlertDescription::RecordOverflow));
    }

    #[test]
    fn close_notify_from_the_client_reads_as_closed_and_ours_reaches_it() {
        let mut p = Pair::open();
        p.client.writer().write_all(b"last").unwrap();
        p.client.send_close_notify();
        p.client_send();
        let (r, plain) = p.server_read();
        assert_eq!(r.unwrap(), ReadTls::Closed);
        assert_eq!(plain, b"last");
        p.server.close_notify(p.sfd.as_raw_fd());
        p.client_read().unwrap();
        assert!(p.client.process_new_packets().unwrap().peer_has_closed());
    }

    #[test]
    fn an_answer_queued_before_the_handshake_goes_out_after_it() {
        let mut p = Pair::new();
        let answer = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        let mut queue: VecDeque<Bytes> = [Bytes::from_static(answer)].into();
        let (_, n) = p.server_flush(&mut queue);
        assert_eq!(n, answer.len());
        // The session ends (a refusal lingers): not before the answer is out.
        assert!(!p.server.close_notify(p.sfd.as_raw_fd()));
        let mut got = p.handshake();
        assert_eq!(p.server_flush(&mut VecDeque::new()).0, Flushed::All);
        got.extend(p.client_read().unwrap());
        assert_eq!(got, answer);
        assert!(p.client.process_new_packets().unwrap().peer_has_closed(), "close_notify after the answer");
    }

    #[test]
    fn a_full_socket_keeps_one_round_sealed_and_the_rest_queued() {
        let mut p = Pair::open();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut queue: VecDeque<Bytes> = [Bytes::from(big.clone())].into();
        let mut got = Vec::new();
        let mut total = 0;
        let mut progress_without_bytes = 0;
        for _ in 0..1000 {
            let before = p.open_state().outgoing.len();
            let (flushed, w) = p.server_flush_written(&mut queue);
            let n = w.bytes;
            total += n;
            let kept = p.open_state().outgoing.len();
            if n == 0 && kept < before {
                // Records of an earlier round went out: progress, for the
                // write timeout, though no queued byte was taken.
                assert!(w.sent, "progress is reported");
                progress_without_bytes += 1;
            }
            assert!(kept <= super::FLUSH_BUDGET + 4 * 64, "sealed but unsent: {kept}");
            // A slow reader: a few KB at a time.
            got.extend(p.client_read_some(5000));
            if flushed == Flushed::All {
                break;
            }
        }
        got.extend(p.client_read().unwrap());
        assert_eq!(total, big.len());
        assert_eq!(got, big);
        assert!(progress_without_bytes > 0, "the socket filled up at least once");
    }

    #[test]
    fn a_key_update_in_the_flight_of_the_clients_finished_is_ours_to_answer() {
        let mut p = Pair::new();
        for _ in 0..10 {
            if !p.client.is_handshaking() {
                break;
            }
            p.client_send();
            let _ = p.server_read();
            p.server_flush(&mut VecDeque::new());
            p.client_read().unwrap();
        }
        assert!(!p.client.is_handshaking() && !p.server.is_open());
        // Finished, KeyUpdate (update_requested) and data in one flight.
        p.client.refresh_traffic_keys().unwrap();
        p.client.writer().write_all(b"hi").unwrap();
        p.client_send();
        let (r, plain) = p.server_read();
        assert_eq!(r.unwrap(), ReadTls::WouldBlock);
        assert_eq!(plain, b"hi");
        let mut queue: VecDeque<Bytes> = [Bytes::from_static(b"reply")].into();
        assert_eq!(p.server_flush(&mut queue).0, Flushed::All);
        assert_eq!(p.client_read().unwrap(), b"reply");
    }

    #[test]
    fn key_updates_without_data_are_answered_once_and_cut_after_32() {
        let mut p = Pair::open();
        let mut failed = None;
        for i in 0..100 {
            p.client.refresh_traffic_keys().unwrap();
            p.client_send();
            let (r, _) = p.server_read();
            let o = p.open_state();
            assert!(o.outgoing.len() < 64, "answers do not pile up: {}", o.outgoing.len());
            if r.is_err() {
                failed = Some(i);
                break;
            }
            assert!(o.tx_update_due);
        }
        assert_eq!(failed, Some(32), "the 33rd KeyUpdate in a row fails the connection");
        p.server.flush_alert(p.sfd.as_raw_fd());
        let err = p.client_read().unwrap_err();
        assert_eq!(err, rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage));
    }

    #[test]
    fn empty_frames_in_the_queue_are_dropped_not_sealed_forever() {
        let mut p = Pair::open();
        let mut queue: VecDeque<Bytes> = [Bytes::new(), Bytes::from_static(b"x"), Bytes::new()].into();
        assert_eq!(p.server_flush(&mut queue), (Flushed::All, 1));
        assert!(queue.is_empty());
        assert_eq!(p.client_read().unwrap(), b"x");
    }

    #[test]
    fn an_idle_wss_connection_keeps_under_a_kilobyte_of_tls_state() {
        let mut p = Pair::open();
        assert_eq!(std::mem::size_of::<Option<Tls>>(), 16);
        let o = p.open_state();
        assert!(o.incoming.capacity() == 0 && o.outgoing.capacity() == 0);
        assert!(std::mem::size_of::<super::Open>() <= 768, "{}", std::mem::size_of::<super::Open>());
    }
}
