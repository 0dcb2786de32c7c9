//! An app backend for the proxy hooks: a real HTTP/1.1 server on loopback
//! (keep-alive, `Content-Length` bodies, a thread per connection) whose
//! answers a test decides, and which records every call it got.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// One call the backend got.
#[derive(Debug, Clone)]
pub struct Call {
    /// Request path (the hook's endpoint path).
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Value,
}

impl Call {
    /// The value of header `name` (lower-case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|h| h.0 == name).map(|h| h.1.as_str())
    }
}

/// What the backend answers.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
    /// Waits this long first (a slow backend).
    pub delay: Duration,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn json(v: Value) -> Reply {
        Reply { status: 200, body: v.to_string(), delay: Duration::ZERO }
    }
}

type Handler = dyn Fn(&Call) -> Reply + Send + Sync;

/// A running backend; stops accepting when dropped.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Starts a backend answering with `handler`.
    pub fn start(handler: impl Fn(&Call) -> Reply + Send + Sync + 'static) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (c, st) = (calls.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (c, h) = (c.clone(), handler.clone());
                std::thread::spawn(move || serve(conn, &c, &*h));
            }
        });
        Backend { addr, calls, stop }
    }

    /// `http://ADDR/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls so far to `path`.
    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.path == path).collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, calls: &Mutex<Vec<Call>>, handler: &Handler) {
    let mut out = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((n, v)) = h.split_once(':') else { continue };
            let (n, v) = (n.trim().to_ascii_lowercase(), v.trim().to_owned());
            if n == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((n, v));
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let call = Call { path, headers, body: serde_json::from_slice(&body).unwrap_or(Value::Null) };
        calls.lock().unwrap().push(call.clone());
        let reply = handler(&call);
        std::thread::sleep(reply.delay);
        // One write: a head and a body in two segments would wait for
        // the client's delayed acknowledgement (Nagle).
        let answer = format!(
            "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            reply.status,
            reply.body.len(),
            reply.body
        );
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}
