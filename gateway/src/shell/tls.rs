//! TLS (wss) on the client listener, with rustls driven by hand: the core
//! reads ciphertext with the same non-blocking `recv` into its scratch buffer
//! as for plain sockets, rustls decrypts into a second scratch buffer, and the
//! flusher moves queued frames through rustls and writes its records with
//! non-blocking sends. No task or buffer of the gateway's own is added per
//! connection; rustls keeps its connection state (and its buffers, bounded by
//! its 64 KiB default limit, empty when idle).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

use anyhow::Context;
use bytes::{Buf, Bytes, BytesMut};
use rustls::ServerConnection;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

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
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A socket as `Write` for rustls: non-blocking, no SIGPIPE.
struct Fd(RawFd);

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `send` reads at most `buf.len()` bytes from `buf`.
        let n = unsafe {
            libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

/// Reads what the socket has (one `recv` of up to `cipher`'s spare
/// capacity), decrypts it, and appends the plaintext to `plain`. A protocol
/// error is returned after rustls queued its alert (flush to send it).
pub fn read(
    conn: &mut ServerConnection,
    fd: RawFd,
    cipher: &mut BytesMut,
    plain: &mut BytesMut,
) -> io::Result<ReadTls> {
    cipher.clear();
    match recv_into(fd, cipher) {
        Ok(0) => return Ok(ReadTls::Closed),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadTls::WouldBlock),
        Err(e) => return Err(e),
    }
    let mut input: &[u8] = cipher;
    let mut closed = false;
    while !input.is_empty() {
        if conn.read_tls(&mut input)? == 0 {
            break;
        }
        let state = conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        closed |= state.peer_has_closed();
        drain_plaintext(conn, plain)?;
    }
    Ok(if closed { ReadTls::Closed } else { ReadTls::Data })
}

fn drain_plaintext(conn: &mut ServerConnection, plain: &mut BytesMut) -> io::Result<()> {
    loop {
        if plain.capacity() - plain.len() < 4096 {
            plain.reserve(16 * 1024);
        }
        let spare = plain.spare_capacity_mut();
        // SAFETY: a `MaybeUninit<u8>` slice viewed as bytes for `read` to
        // fill; only the `n` bytes it reports written are then marked
        // initialized. rustls' reader only writes into the slice.
        let dst = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), spare.len()) };
        match conn.reader().read(dst) {
            Ok(0) => return Ok(()),
            // SAFETY: `read` initialized `n` bytes after the current length.
            Ok(n) => unsafe { plain.set_len(plain.len() + n) },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Moves queued frames through rustls and writes its records without
/// blocking. Bytes count as written once rustls took them (its own buffer
/// is bounded); the result is `All` only when rustls has nothing left either.
pub fn flush(
    conn: &mut ServerConnection,
    fd: RawFd,
    queue: &mut VecDeque<Bytes>,
) -> (io::Result<Flushed>, Written) {
    let mut written = Written::default();
    loop {
        while conn.wants_write() {
            match conn.write_tls(&mut Fd(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Ok(Flushed::Blocked), written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), written),
            }
        }
        if queue.is_empty() {
            return (Ok(Flushed::All), written);
        }
        let mut took_any = false;
        while let Some(front) = queue.front_mut() {
            let n = match conn.writer().write(front) {
                Ok(n) => n,
                Err(e) => return (Err(e), written),
            };
            if n == 0 {
                break;
            }
            took_any = true;
            written.bytes += n;
            if n == front.len() {
                queue.pop_front();
                written.front_started = false;
            } else {
                front.advance(n);
                written.front_started = true;
                break;
            }
        }
        if !took_any && !conn.wants_write() {
            // rustls takes nothing and has nothing to send: it cannot make
            // progress (should not happen); report it as blocked.
            return (Ok(Flushed::Blocked), written);
        }
    }
}

/// Queues close_notify and writes what rustls holds, best effort.
pub fn close_notify(conn: &mut ServerConnection, fd: RawFd) {
    conn.send_close_notify();
    while conn.wants_write() {
        if conn.write_tls(&mut Fd(fd)).is_err() {
            break;
        }
    }
}

/// Encrypts a final answer (an HTTP refusal) and close_notify into bytes
/// to write in the clear.
pub fn seal_final(conn: &mut ServerConnection, answer: &[u8]) -> Vec<u8> {
    let _ = conn.writer().write_all(answer);
    conn.send_close_notify();
    let mut out = Vec::new();
    while conn.wants_write() {
        if conn.write_tls(&mut out).is_err() {
            break;
        }
    }
    out
}
