//! One ts2021 connection on the server: HTTP/2 over Noise, serving `/machine/register`
//! and `/machine/map` for the machine the handshake authenticated.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use proto::tailcfg::{Login, MapRequest, MapResponse, RegisterRequest, RegisterResponse, User};
use proto::MachinePublic;

use super::mapper::{delta, full_map};
use super::store::Registration;
use super::{now_unix, Shared};
use crate::dial::BoxStream;
use crate::mapframe;
use crate::stream::NoiseStream;

/// Largest request body.
const MAX_BODY: usize = 1 << 20;

pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: NoiseStream<BoxStream>,
    machine: MachinePublic,
    version: u16,
    remote: SocketAddr,
) {
    let mut conn = match h2::server::handshake(stream).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, error = %e, "HTTP/2 handshake over ts2021 failed");
            return;
        }
    };
    tracing::debug!(%remote, machine = %machine.short(), version, "ts2021 session");
    while let Some(req) = conn.accept().await {
        let (request, respond) = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%remote, machine = %machine.short(), error = %e, "closed ts2021 connection");
                break;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(shared, machine, request, respond).await {
                tracing::debug!(machine = %machine.short(), error = %e, "control request failed");
            }
        });
    }
}

type Respond = h2::server::SendResponse<Bytes>;

async fn read_body(body: &mut h2::RecvStream) -> Result<Option<Vec<u8>>, h2::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
        if out.len() > MAX_BODY {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Sends `data` honouring HTTP/2 flow control (a slow client slows only itself).
async fn send_all(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(c) => c?,
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}

fn response(status: u16, content_type: &str) -> http::Response<()> {
    http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(())
        .unwrap_or_default()
}

async fn reply(mut respond: Respond, status: u16, body: Vec<u8>) -> Result<(), h2::Error> {
    let mut send = respond.send_response(response(status, "application/json"), body.is_empty())?;
    if !body.is_empty() {
        send_all(&mut send, Bytes::from(body), true).await?;
    }
    Ok(())
}

async fn handle(
    shared: Arc<Shared>,
    machine: MachinePublic,
    request: http::Request<h2::RecvStream>,
    respond: Respond,
) -> Result<(), h2::Error> {
    let path = request.uri().path().to_string();
    let mut body = request.into_body();
    let Some(bytes) = read_body(&mut body).await? else {
        return reply(respond, 413, b"{\"error\":\"body over 1 MiB\"}".to_vec()).await;
    };
    match path.as_str() {
        "/machine/register" => {
            let Ok(req) = serde_json::from_slice::<RegisterRequest>(&bytes) else {
                return reply(
                    respond,
                    400,
                    b"{\"error\":\"malformed RegisterRequest\"}".to_vec(),
                )
                .await;
            };
            let resp = register(&shared, machine, &req).await;
            reply(respond, 200, serde_json::to_vec(&resp).unwrap_or_default()).await
        }
        "/machine/map" => {
            let Ok(req) = serde_json::from_slice::<MapRequest>(&bytes) else {
                return reply(
                    respond,
                    400,
                    b"{\"error\":\"malformed MapRequest\"}".to_vec(),
                )
                .await;
            };
            map(shared, machine, req, respond).await
        }
        _ => reply(respond, 404, b"{\"error\":\"not found\"}".to_vec()).await,
    }
}

async fn register(
    shared: &Shared,
    machine: MachinePublic,
    req: &RegisterRequest,
) -> RegisterResponse {
    let now = now_unix();
    let refused = |why: String| {
        shared
            .metrics
            .registrations_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(machine = %machine.short(), reason = %why, "registration refused");
        RegisterResponse {
            error: why,
            ..Default::default()
        }
    };
    // Logout: an expiry in the past with the current key.
    if let Some(exp) = req
        .expiry
        .as_deref()
        .and_then(|e| humantime::parse_rfc3339(e).ok())
    {
        let exp = exp
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if exp <= now {
            if let Ok(Some(n)) = shared.store.node_by_machine_key(&machine) {
                if n.node_key == req.node_key {
                    let _ = shared.store.expire_node(n.id, now);
                    let _ = shared.refresh().await;
                    tracing::info!(node = n.id, "node logged out");
                    return RegisterResponse {
                        node_key_expired: true,
                        ..Default::default()
                    };
                }
            }
        }
    }
    let hostname = req
        .hostinfo
        .as_ref()
        .map(|h| h.hostname.as_str())
        .filter(|h| !h.is_empty())
        .unwrap_or("node");
    let hostname: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let os: String = req
        .hostinfo
        .as_ref()
        .map(|h| h.os.as_str())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(32)
        .collect();
    let auth_key = req
        .auth
        .as_ref()
        .map(|a| a.auth_key.as_str())
        .filter(|k| !k.is_empty());
    let reg = Registration {
        machine_key: machine,
        node_key: req.node_key,
        old_node_key: req.old_node_key,
        hostname: &hostname,
        os: &os,
        auth_key,
        now,
    };
    match shared.store.register(&reg) {
        Ok(Ok(node)) => {
            shared.metrics.registrations.fetch_add(1, Ordering::Relaxed);
            let _ = shared.refresh().await;
            tracing::info!(node = node.id, ip = %node.ipv4, machine = %machine.short(), "node registered");
            let user = shared
                .store
                .users()
                .ok()
                .and_then(|u| u.into_iter().find(|u| u.id == node.user_id));
            let name = user.map(|u| u.name).unwrap_or_default();
            RegisterResponse {
                user: User {
                    id: node.user_id,
                    login_name: name.clone(),
                    display_name: name.clone(),
                },
                login: Login {
                    id: node.user_id,
                    login_name: name.clone(),
                    display_name: name,
                },
                machine_authorized: true,
                node_key_expired: node.is_expired(now),
                ..Default::default()
            }
        }
        Ok(Err(refusal)) => refused(refusal.to_string()),
        Err(e) => refused(format!(
            "controld could not register this node ({e}); try again"
        )),
    }
}

fn encode_message(resp: &MapResponse, zstd: bool) -> Bytes {
    let json = serde_json::to_vec(resp).unwrap_or_default();
    let body = if zstd {
        mapframe::compress(&json)
    } else {
        json
    };
    let mut out = Vec::with_capacity(body.len() + 4);
    mapframe::encode(&body, &mut out);
    Bytes::from(out)
}

async fn map(
    shared: Arc<Shared>,
    machine: MachinePublic,
    req: MapRequest,
    respond: Respond,
) -> Result<(), h2::Error> {
    let node = match shared.store.node_by_machine_key(&machine) {
        Ok(Some(n)) if n.node_key == req.node_key => n,
        Ok(_) => {
            return reply(
                respond,
                403,
                b"{\"error\":\"node key not registered to this machine\"}".to_vec(),
            )
            .await
        }
        Err(_) => {
            return reply(
                respond,
                500,
                b"{\"error\":\"database unavailable\"}".to_vec(),
            )
            .await
        }
    };
    let now = now_unix();
    if node.is_expired(now) {
        return reply(
            respond,
            403,
            b"{\"error\":\"node key expired: log in again\"}".to_vec(),
        )
        .await;
    }
    // Record what the node reports about itself.
    let home = req
        .hostinfo
        .as_ref()
        .and_then(|h| h.net_info.as_ref())
        .map(|n| n.preferred_derp)
        .filter(|r| *r > 0)
        .unwrap_or(node.home_derp);
    let disco = if req.disco_key.is_zero() {
        node.disco_key
    } else {
        Some(req.disco_key)
    };
    let endpoints = if req.endpoints.is_empty() && req.stream {
        node.endpoints.clone()
    } else {
        req.endpoints.clone()
    };
    if disco != node.disco_key
        || endpoints != node.endpoints
        || home != node.home_derp
        || !req.stream
    {
        let _ = shared
            .store
            .update_node_status(node.id, disco.as_ref(), &endpoints, home, now);
    }
    if !req.stream {
        shared.metrics.lite_updates.fetch_add(1, Ordering::Relaxed);
        let _ = shared.refresh().await;
        return reply(respond, 200, Vec::new()).await;
    }

    shared.metrics.map_streams.fetch_add(1, Ordering::Relaxed);
    shared.set_online(node.id, true);
    let _ = shared.refresh().await;
    let result = stream_map(&shared, node.id, &req, respond).await;
    shared.set_online(node.id, false);
    let _ = shared.refresh().await;
    result
}

async fn stream_map(
    shared: &Arc<Shared>,
    id: i64,
    req: &MapRequest,
    mut respond: Respond,
) -> Result<(), h2::Error> {
    let zstd = req.compress == "zstd";
    let mut rx = shared.snapshot.subscribe();
    let mut last = rx.borrow_and_update().clone();
    // Encoded at once and dropped: the full map holds every peer, and a stream lives long.
    let Some(first) = full_map(&last, id, &shared.settings).map(|m| encode_message(&m, zstd))
    else {
        return reply(respond, 403, b"{\"error\":\"node is gone\"}".to_vec()).await;
    };
    let mut send = respond.send_response(response(200, "application/octet-stream"), false)?;
    send_all(&mut send, first, false).await?;
    shared.metrics.map_messages.fetch_add(1, Ordering::Relaxed);
    let keepalive = encode_message(
        &MapResponse {
            keep_alive: true,
            ..Default::default()
        },
        zstd,
    );
    let mut tick = tokio::time::interval(shared.cfg.keepalive);
    tick.tick().await;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let snap = rx.borrow_and_update().clone();
                if !snap.wire.contains_key(&id) {
                    // Deleted: end the stream; the client will find it cannot register.
                    send.send_data(Bytes::new(), true)?;
                    return Ok(());
                }
                if let Some(d) = delta(&last, &snap, id) {
                    send_all(&mut send, encode_message(&d, zstd), false).await?;
                    shared.metrics.map_messages.fetch_add(1, Ordering::Relaxed);
                }
                last = snap;
            }
            _ = tick.tick() => {
                send_all(&mut send, keepalive.clone(), false).await?;
            }
            reset = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                let _ = reset;
                return Ok(());
            }
        }
    }
}
