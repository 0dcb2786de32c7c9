//! A client of the HTTP fallback transports: a stream (`http_stream`,
//! `sse`, `uni_http_stream`, `uni_sse`) read line by line from its chunked
//! response, and `POST /emulation`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One streaming response.
pub struct Stream {
    s: TcpStream,
    /// The response status.
    pub status: u16,
    /// The response head.
    pub head: String,
    raw: Vec<u8>,
    body: Vec<u8>,
    sse: bool,
    lines: VecDeque<String>,
    /// The last chunk came (the server ended the stream cleanly).
    pub finished: bool,
    /// The socket reached its end.
    pub eof: bool,
}

/// Percent-encodes a query parameter's value.
pub fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Stream {
    /// `POST path` with `body`, read as a chunked stream of lines.
    pub fn post(addr: SocketAddr, path: &str, body: &str) -> Stream {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nOrigin: http://page.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        Self::open(addr, &req, path.contains("sse"))
    }

    /// `GET path` (query included), read as a stream of SSE events.
    pub fn get(addr: SocketAddr, path: &str) -> Stream {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
        Self::open(addr, &req, true)
    }

    fn open(addr: SocketAddr, req: &str, sse: bool) -> Stream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut st = Stream {
            s,
            status: 0,
            head: String::new(),
            raw: Vec::new(),
            body: Vec::new(),
            sse,
            lines: VecDeque::new(),
            finished: false,
            eof: false,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while st.head.is_empty() && !st.eof && Instant::now() < end {
            st.read_some(end);
            if let Some(i) = st.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                st.head = String::from_utf8_lossy(&st.raw[..i + 4]).into_owned();
                st.raw.drain(..i + 4);
                st.status = st.head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
        }
        st
    }

    fn read_some(&mut self, end: Instant) {
        let wait = end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.s.set_read_timeout(Some(wait.min(Duration::from_millis(200)))).unwrap();
        let mut buf = [0u8; 16384];
        match self.s.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => self.eof = true,
        }
    }

    /// Moves whole chunks from `raw` to `body`, and whole lines to `lines`.
    fn dechunk(&mut self) {
        loop {
            if self.finished {
                break;
            }
            let Some(nl) = self.raw.windows(2).position(|w| w == b"\r\n") else { break };
            let n = usize::from_str_radix(std::str::from_utf8(&self.raw[..nl]).unwrap().trim(), 16)
                .expect("a chunk size");
            if n == 0 {
                self.finished = true;
                self.raw.drain(..nl + 2);
                break;
            }
            if self.raw.len() < nl + 2 + n + 2 {
                break;
            }
            assert_eq!(&self.raw[nl + 2 + n..nl + 4 + n], b"\r\n", "a chunk ends with CRLF");
            let chunk: Vec<u8> = self.raw[nl + 2..nl + 2 + n].to_vec();
            self.body.extend_from_slice(&chunk);
            self.raw.drain(..nl + 4 + n);
        }
        while let Some(i) = self.body.iter().position(|&c| c == b'\n') {
            let line = String::from_utf8(self.body.drain(..=i).collect()).unwrap();
            let line = line.trim_end_matches('\n');
            if self.sse {
                if let Some(d) = line.strip_prefix("data: ") {
                    self.lines.push_back(d.to_owned());
                }
            } else if !line.is_empty() {
                self.lines.push_back(line.to_owned());
            }
        }
    }

    /// The next line (an SSE event's data line), by `end`; `None` when the
    /// stream ended or the time passed.
    pub fn next_line(&mut self, end: Instant) -> Option<String> {
        loop {
            self.dechunk();
            if let Some(l) = self.lines.pop_front() {
                return Some(l);
            }
            if self.finished || self.eof || Instant::now() >= end {
                return None;
            }
            self.read_some(end);
        }
    }

    /// The next line as JSON.
    pub fn next_json(&mut self, end: Instant) -> Option<Value> {
        self.next_line(end).map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}")))
    }

    /// Reads until a JSON line matches `want`, by `end`, keeping nothing
    /// else; panics with `what` when the stream ends or the time passes.
    pub fn until(&mut self, end: Instant, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            match self.next_json(end) {
                Some(v) if want(&v) => return v,
                Some(_) => {}
                None => panic!("{what}: stream ended ({}) or timed out; head {:?}", self.finished, self.head),
            }
        }
    }

    /// Waits for the end of the stream by `end`: whether it ended cleanly
    /// (last chunk), with the lines read on the way.
    pub fn wait_end(&mut self, end: Instant) -> (bool, Vec<String>) {
        let mut seen = Vec::new();
        while let Some(l) = self.next_line(end) {
            seen.push(l);
        }
        (self.finished, seen)
    }
}

/// `POST /emulation` of `data` for a session; the status.
pub fn emulate(addr: SocketAddr, session: &str, node: &str, data: &str) -> u16 {
    let body = serde_json::json!({"session": session, "node": node, "data": data}).to_string();
    crate::http_request(addr, "POST", "/emulation", &[("Origin", "http://page.example")], &body).0
}
