//! The HTTP server API for the app backend: the Centrifugo-compatible subset
//! that the `cent` client uses (client-protocol.md section 7).
//!
//! `POST /api/<method>` with a JSON body and `X-API-Key` (or
//! `Authorization: apikey <key>`; a key in the URL is refused). A bad key is
//! 401, a method other than POST 405, an undecodable body 400, an
//! unknown method 404; application outcomes are 200 with `{"result":…}` or
//! `{"error":{"code","message"}}`. Backend publishes take the same path as
//! client publishes: the owning shard orders them and fans them out once per
//! interested gateway. Also serves `/metrics`, `/healthz` and `/readyz`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use proto::client::reply::{Publication, strip_newlines, write_str};
use proto::client::{Disconnect, ReplyError};
use proto::cluster::ClusterMsg;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::peers::Owner;
use crate::server::Router;
use crate::shard::{ApiOp, ShardCmd};
use proto::peer::RouterAddr;

/// Whether `given` is `secret`, in time that does not depend on where they
/// first differ (only on the length, which a key's owner chooses anyway).
pub fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    if given.len() != secret.len() {
        return false;
    }
    let diff = given.iter().zip(secret).fold(0u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)));
    diff == 0
}

/// Largest API request body (1 MiB; above: 413).
pub const MAX_BODY: usize = 1 << 20;

type Reply = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

fn error_body(e: ReplyError) -> Vec<u8> {
    let mut out = format!("{{\"error\":{{\"code\":{},\"message\":", e.code).into_bytes();
    write_str(&mut out, e.message);
    out.extend_from_slice(b"}}");
    out
}

fn result_body(result: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(result.len() + 12);
    out.extend_from_slice(b"{\"result\":");
    out.extend_from_slice(result);
    out.push(b'}');
    out
}

#[derive(Deserialize)]
struct PublishReq {
    #[serde(default)]
    channel: String,
    data: Option<Box<RawValue>>,
    #[serde(default)]
    tags: Option<HashMap<String, String>>,
    #[serde(default)]
    idempotency_key: String,
}

#[derive(Deserialize)]
struct BroadcastReq {
    #[serde(default)]
    channels: Vec<String>,
    data: Option<Box<RawValue>>,
    #[serde(default)]
    tags: Option<HashMap<String, String>>,
    #[serde(default)]
    idempotency_key: String,
}

#[derive(Deserialize)]
struct ChannelReq {
    #[serde(default)]
    channel: String,
}

#[derive(Deserialize, Default)]
struct Since {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

#[derive(Deserialize)]
struct HistoryReq {
    #[serde(default)]
    channel: String,
    #[serde(default)]
    limit: i64,
    #[serde(default)]
    since: Option<Since>,
    #[serde(default)]
    reverse: bool,
}

/// `subscribe`, `unsubscribe`, `disconnect`, `refresh`: a user (all its
/// connections, or one `client`/`session`: a session id is its client id
/// here).
#[derive(Deserialize, Default)]
struct UserReq {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    recover_since: Option<Since>,
    #[serde(default)]
    disconnect: Option<DisconnectReq>,
    #[serde(default)]
    whitelist: Option<Vec<String>>,
    #[serde(default)]
    expired: Option<bool>,
    #[serde(default)]
    expire_at: Option<u64>,
}

#[derive(Deserialize, Default)]
struct DisconnectReq {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    reason: String,
}

/// Client ids a `disconnect` may keep (more: error 107).
const MAX_WHITELIST: usize = 1024;

impl UserReq {
    /// The command for the user's gateways; `Err`: error 107.
    fn command(self, method: &str) -> Result<ClusterMsg, ReplyError> {
        let user = self.user.unwrap_or_default();
        if user.is_empty() {
            return Err(ReplyError::BAD_REQUEST);
        }
        let client = self.client.filter(|c| !c.is_empty()).or(self.session).unwrap_or_default();
        let name = self.channel.unwrap_or_default();
        let channel = || {
            proto::client::channel::ChannelName::parse(&name)
                .map(|_| name.clone())
                .map_err(|_| ReplyError::BAD_REQUEST)
        };
        Ok(match method {
            "subscribe" => {
                let since = self.recover_since.as_ref();
                ClusterMsg::SubscribeUser {
                    channel: channel()?,
                    recover: since.is_some(),
                    epoch: since.map(|s| s.epoch.clone()).unwrap_or_default(),
                    offset: since.map_or(0, |s| s.offset),
                    user,
                    client,
                }
            }
            "unsubscribe" => ClusterMsg::UnsubscribeUser { channel: channel()?, user, client },
            "disconnect" => {
                let d = self.disconnect.unwrap_or_default();
                let code = if d.code == 0 { Disconnect::FORCE_DISCONNECT.code as u32 } else { d.code };
                if !(3000..=4999).contains(&code) || d.reason.len() > 123 {
                    return Err(ReplyError::BAD_REQUEST);
                }
                let whitelist = self.whitelist.unwrap_or_default();
                if whitelist.len() > MAX_WHITELIST {
                    return Err(ReplyError::BAD_REQUEST);
                }
                ClusterMsg::DisconnectUser { user, client, code: code as u16, reason: d.reason, whitelist }
            }
            _ => ClusterMsg::RefreshUser {
                user,
                client,
                expired: self.expired.unwrap_or(false),
                expire_at: self.expire_at.unwrap_or(0),
            },
        })
    }
}

#[derive(Deserialize, Default)]
struct ChannelsReq {
    #[serde(default)]
    pattern: String,
}

fn tags_json(tags: &Option<HashMap<String, String>>) -> Option<Bytes> {
    tags.as_ref()
        .filter(|t| !t.is_empty())
        .map(|t| Bytes::from(serde_json::to_vec(t).expect("tags serialize")))
}

/// Stripped JSON data as a raw value again (it was valid JSON on the way in).
fn data_raw(data: &Bytes) -> Box<RawValue> {
    RawValue::from_string(String::from_utf8_lossy(data).into_owned()).expect("validated on the way in")
}

/// Glob match with `*` and `?` (Centrifugo's `channels` pattern).
pub fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    pattern.is_empty() || go(pattern.as_bytes(), name.as_bytes())
}

impl Router {
    async fn api_call<T>(&self, channel: &str, op: impl FnOnce(oneshot::Sender<T>) -> ApiOp) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.shard_of(channel).send(ShardCmd::Api(op(tx))).await.ok()?;
        rx.await.ok()
    }

    async fn api_publish(&self, channel: String, data: Bytes, tags: Option<Bytes>, key: String) -> Vec<u8> {
        if proto::client::channel::ChannelName::parse(&channel).is_err() {
            return error_body(ReplyError::BAD_REQUEST);
        }
        let r = self
            .api_call(&channel.clone(), |reply| ApiOp::Publish {
                channel,
                data,
                tags,
                idempotency_key: key,
                reply,
                at: std::time::Instant::now(),
            })
            .await
            .unwrap_or(Err(ReplyError::INTERNAL));
        match r {
            Ok((offset, epoch)) if offset > 0 => {
                let mut out = format!("{{\"offset\":{offset},\"epoch\":").into_bytes();
                write_str(&mut out, &epoch);
                out.push(b'}');
                result_body(&out)
            }
            Ok(_) => result_body(b"{}"),
            Err(e) => error_body(e),
        }
    }

    /// Answers a call whose channel another router owns by forwarding it
    /// there, and merges `channels` over the cluster; `None`: answer locally.
    async fn route_cluster(&self, method: &str, body: &Bytes) -> Option<Reply> {
        match method {
            "subscribe" | "unsubscribe" | "disconnect" | "refresh" => {
                let r: UserReq = serde_json::from_slice(body).ok()?;
                let key = self.namespaces().presence_channel(r.user.as_deref().unwrap_or_default());
                let Owner::Peer(peer) = self.peers().owner(&key) else { return None };
                Some(self.forward(&peer, method, body).await)
            }
            "publish" | "presence" | "presence_stats" | "history" | "history_remove" => {
                let r: ChannelReq = serde_json::from_slice(body).ok()?;
                let Owner::Peer(peer) = self.peers().owner(&r.channel) else { return None };
                Some(self.forward(&peer, method, body).await)
            }
            "channels" => {
                let local = self.dispatch(method, body, true).await.ok()?;
                let mut merged: serde_json::Value = serde_json::from_slice(&local).ok()?;
                for peer in self.peers().ready_peers() {
                    let Ok((200, b)) = self.peers().call(&peer, method, body).await else { continue };
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else { continue };
                    if let (Some(into), Some(from)) = (
                        merged.pointer_mut("/result/channels").and_then(|c| c.as_object_mut()),
                        v.pointer("/result/channels").and_then(|c| c.as_object()),
                    ) {
                        into.extend(from.clone());
                    }
                }
                Some(respond(StatusCode::OK, serde_json::to_vec(&merged).ok()?))
            }
            _ => None,
        }
    }

    /// One call forwarded to peer `peer`, answered as it answered (error 100
    /// when it could not be reached in time).
    async fn forward(&self, peer: &RouterAddr, method: &str, body: &[u8]) -> Reply {
        match self.peers().call(peer, method, body).await {
            Ok((status, body)) => {
                respond(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY), body)
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "forwarding an API call failed");
                respond(StatusCode::OK, error_body(ReplyError::INTERNAL))
            }
        }
    }

    /// Answers a call another router forwarded over the peer link (its
    /// certificate checked by the caller): always locally, and `readyz` with
    /// this router's readiness. The status and body, as the HTTP API would.
    pub async fn peer_call(&self, method: &str, body: &[u8]) -> (u16, Vec<u8>) {
        if method == proto::peer::READYZ {
            return if self.peers().draining() {
                (503, b"draining".to_vec())
            } else {
                (200, b"ready".to_vec())
            };
        }
        match self.dispatch(method, body, true).await {
            Ok(out) => (200, out),
            Err(status) => (status.as_u16(), Vec::new()),
        }
    }

    async fn dispatch(&self, method: &str, body: &[u8], forwarded: bool) -> Result<Vec<u8>, StatusCode> {
        let bad = |_| StatusCode::BAD_REQUEST;
        Ok(match method {
            "publish" => {
                let r: PublishReq = serde_json::from_slice(body).map_err(bad)?;
                let Some(data) = r.data else { return Ok(error_body(ReplyError::BAD_REQUEST)) };
                self.api_publish(
                    r.channel,
                    strip_newlines(data.get().as_bytes()),
                    tags_json(&r.tags),
                    r.idempotency_key,
                )
                .await
            }
            "broadcast" => {
                let r: BroadcastReq = serde_json::from_slice(body).map_err(bad)?;
                let Some(data) = r.data else { return Ok(error_body(ReplyError::BAD_REQUEST)) };
                let data = strip_newlines(data.get().as_bytes());
                let tags = tags_json(&r.tags);
                let mut out = b"{\"responses\":[".to_vec();
                for (i, ch) in r.channels.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let owner = if forwarded { Owner::Local } else { self.peers().owner(&ch) };
                    let one = match owner {
                        Owner::Local => {
                            self.api_publish(ch, data.clone(), tags.clone(), r.idempotency_key.clone()).await
                        }
                        Owner::Peer(peer) => {
                            let body = serde_json::json!({
                                "channel": ch,
                                "data": data_raw(&data),
                                "tags": r.tags,
                                "idempotency_key": r.idempotency_key,
                            });
                            let body = serde_json::to_vec(&body).expect("serializable");
                            match self.peers().call(&peer, "publish", &body).await {
                                // `{"result":…}` or `{"error":…}`: one broadcast response as it is.
                                Ok((200, b)) => b.to_vec(),
                                _ => error_body(ReplyError::INTERNAL),
                            }
                        }
                    };
                    out.extend(one);
                }
                out.extend_from_slice(b"]}");
                result_body(&out)
            }
            "subscribe" | "unsubscribe" | "disconnect" | "refresh" => {
                // The router owning the user's presence knows the gateways
                // holding the user: one message to each of them.
                let r: UserReq = serde_json::from_slice(body).map_err(bad)?;
                let key = self.namespaces().presence_channel(r.user.as_deref().unwrap_or_default());
                match r.command(method) {
                    Ok(msg) => match self.api_call(&key, |reply| ApiOp::User { msg, reply }).await {
                        Some(_) => result_body(b"{}"),
                        None => error_body(ReplyError::INTERNAL),
                    },
                    Err(e) => error_body(e),
                }
            }
            "presence" => {
                let r: ChannelReq = serde_json::from_slice(body).map_err(bad)?;
                let channel = r.channel;
                match self.api_call(&channel.clone(), |reply| ApiOp::Presence { channel, reply }).await {
                    Some(Ok(entries)) => result_body(&proto::client::reply::presence_result(
                        entries.iter().map(|(c, i)| (c.as_str(), &i[..])),
                    )),
                    Some(Err(e)) => error_body(e),
                    None => error_body(ReplyError::INTERNAL),
                }
            }
            "presence_stats" => {
                let r: ChannelReq = serde_json::from_slice(body).map_err(bad)?;
                let channel = r.channel;
                match self.api_call(&channel.clone(), |reply| ApiOp::PresenceStats { channel, reply }).await {
                    Some(Ok((c, u))) => {
                        result_body(format!("{{\"num_clients\":{c},\"num_users\":{u}}}").as_bytes())
                    }
                    Some(Err(e)) => error_body(e),
                    None => error_body(ReplyError::INTERNAL),
                }
            }
            "history" => {
                let r: HistoryReq = serde_json::from_slice(body).map_err(bad)?;
                let (channel, limit, reverse) = (r.channel, r.limit, r.reverse);
                let since = r.since.map(|s| (s.offset, s.epoch));
                match self
                    .api_call(&channel.clone(), |reply| ApiOp::History {
                        channel,
                        limit,
                        since,
                        reverse,
                        reply,
                    })
                    .await
                {
                    Some(Ok((pubs, epoch, top))) => result_body(&proto::client::reply::history_result(
                        &pubs as &[Publication],
                        &epoch,
                        top,
                    )),
                    Some(Err(e)) => error_body(e),
                    None => error_body(ReplyError::INTERNAL),
                }
            }
            "history_remove" => {
                let r: ChannelReq = serde_json::from_slice(body).map_err(bad)?;
                let channel = r.channel;
                match self.api_call(&channel.clone(), |reply| ApiOp::HistoryRemove { channel, reply }).await {
                    Some(Ok(())) => result_body(b"{}"),
                    Some(Err(e)) => error_body(e),
                    None => error_body(ReplyError::INTERNAL),
                }
            }
            "channels" => {
                let r: ChannelsReq = if body.iter().all(u8::is_ascii_whitespace) {
                    ChannelsReq::default()
                } else {
                    serde_json::from_slice(body).map_err(bad)?
                };
                let mut out = b"{\"channels\":{".to_vec();
                let mut first = true;
                for shard in self.shards() {
                    let (tx, rx) = oneshot::channel();
                    if shard.send(ShardCmd::Api(ApiOp::Channels { reply: tx })).await.is_err() {
                        continue;
                    }
                    for (name, clients) in rx.await.unwrap_or_default() {
                        if !glob(&r.pattern, &name) {
                            continue;
                        }
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        write_str(&mut out, &name);
                        out.extend_from_slice(format!(":{{\"num_clients\":{clients}}}").as_bytes());
                    }
                }
                out.extend_from_slice(b"}}");
                result_body(&out)
            }
            "info" => {
                let m = self.metrics();
                let mut out = b"{\"nodes\":[{\"uid\":".to_vec();
                write_str(&mut out, &format!("{:016x}", self.instance()));
                out.extend_from_slice(b",\"name\":");
                write_str(&mut out, self.id());
                out.extend_from_slice(
                    format!(
                        ",\"version\":\"{}\",\"num_clients\":0,\"num_users\":0,\"num_channels\":0,\"num_subs\":0,\"uptime\":{},\"publications\":{}}}]}}",
                        env!("CARGO_PKG_VERSION"),
                        self.started().elapsed().as_secs(),
                        m.publications.load(Ordering::Relaxed)
                    )
                    .as_bytes(),
                );
                result_body(&out)
            }
            _ => return Err(StatusCode::NOT_FOUND),
        })
    }

    /// `/readyz`: 200 when this router serves (not draining; in etcd mode
    /// registered in its newest view under a live lease), else 503 saying why.
    fn readyz(&self) -> Reply {
        let p = self.peers();
        if p.ready() {
            return respond(StatusCode::OK, "ready\n");
        }
        let why = if p.draining() {
            "draining\n"
        } else if !p.lease_live(Instant::now()) {
            "no live etcd lease\n"
        } else {
            "not in the membership view yet\n"
        };
        respond(StatusCode::SERVICE_UNAVAILABLE, why)
    }

    /// Whether the request carries the API key, in `X-API-Key` or
    /// `Authorization: apikey …` (compared in constant time). A key in the
    /// URL is refused with a message saying why.
    fn authorized(&self, req: &Request<Incoming>) -> Result<(), &'static str> {
        let key = self.api_key();
        if req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv.starts_with("api_key="))) {
            return Err("the API key is taken only from the X-API-Key or Authorization: apikey header, \
                        never from the URL (access logs keep URLs)");
        }
        let h = req.headers();
        let given = h.get("x-api-key").and_then(|v| v.to_str().ok()).or_else(|| {
            h.get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("apikey "))
                .map(str::trim)
        });
        match given {
            Some(g) if !key.is_empty() && same_secret(g.as_bytes(), key.as_bytes()) => Ok(()),
            _ => Err(""),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Reply, std::convert::Infallible> {
        let path = req.uri().path().to_owned();
        match path.as_str() {
            "/healthz" => return Ok(respond(StatusCode::OK, "ok\n")),
            "/readyz" => return Ok(self.readyz()),
            "/metrics" if self.metrics_on_api() => return Ok(respond(StatusCode::OK, self.render_metrics())),
            _ => {}
        }
        let Some(method) = path.strip_prefix("/api/").map(str::to_owned) else {
            return Ok(respond(StatusCode::NOT_FOUND, ""));
        };
        if req.method() != Method::POST {
            return Ok(respond(StatusCode::METHOD_NOT_ALLOWED, ""));
        }
        if let Err(why) = self.authorized(&req) {
            return Ok(respond(StatusCode::UNAUTHORIZED, why));
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Ok(respond(StatusCode::PAYLOAD_TOO_LARGE, "")),
        };
        let started = Instant::now();
        if self.peers().clustered()
            && let Some(r) = self.route_cluster(&method, &body).await
        {
            return Ok(r);
        }
        let r = match self.dispatch(&method, &body, false).await {
            Ok(out) => respond(StatusCode::OK, out),
            Err(status) => respond(status, ""),
        };
        tracing::debug!(method, elapsed = ?started.elapsed(), "api call");
        Ok(r)
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on the admin listener
    /// `addr` until the task is dropped.
    pub async fn serve_admin(self: Arc<Self>, addr: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "router admin listening");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let router = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let router = router.clone();
                    async move {
                        let r = match req.uri().path() {
                            "/metrics" => respond(StatusCode::OK, router.render_metrics()),
                            "/healthz" => respond(StatusCode::OK, "ok\n"),
                            "/readyz" => router.readyz(),
                            _ => respond(StatusCode::NOT_FOUND, ""),
                        };
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(io, svc)
                    .await;
            });
        }
    }

    /// Serves the HTTP API on `addr` until the task is dropped.
    pub async fn serve_api(self: Arc<Self>, addr: SocketAddr) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "router HTTP API listening");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "api accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let router = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| router.clone().handle(req));
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(io, svc)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn secrets_compare_whole() {
        assert!(super::same_secret(b"k3y", b"k3y"));
        assert!(!super::same_secret(b"k3x", b"k3y"));
        assert!(!super::same_secret(b"k3", b"k3y"));
        assert!(!super::same_secret(b"", b"k"));
    }

    #[test]
    fn globs() {
        assert!(glob("", "anything"));
        assert!(glob("chat:*", "chat:general"));
        assert!(!glob("chat:*", "typing:general"));
        assert!(glob("c?at:*", "chat:x"));
        assert!(glob("*", ""));
    }
}
