//! One DERP client connection on the server: handshake, then a reader (frames in,
//! routing) and a writer (queues out, keepalives) running in one task until either ends.

use netbase::reasons::Reason as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::NodePublic;
use rand::Rng as _;
use tokio::io::{ReadHalf, WriteHalf};

use super::client::{ClientHandle, Queues, QUEUE_DEPTH};
use super::metrics::{CloseReason, DropReason};
use super::ratelimit::TokenBucket;
use super::routes::Route;
use super::{verify, Shared};
use crate::frame::{self, looks_like_disco, ty, Frame, FrameError, PeerGoneReason};
use crate::handshake::{self, ServerInfo};
use crate::io::{write_flush, BoxStream, FrameReader, ReadError};

/// Most distinct destinations a reader remembers having recorded for PeerGone.
const RECORDED_DSTS: usize = 1024;

/// Serves one upgraded connection. `prefix` holds bytes read past the HTTP head.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: BoxStream,
    prefix: BytesMut,
    remote: std::net::SocketAddr,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd, prefix, frame::MAX_CLIENT_INFO_LEN);
    let m = &shared.metrics;

    let handle = match tokio::time::timeout(
        shared.cfg.handshake_timeout,
        accept(&shared, &mut reader, &mut wr, remote),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err((reason, why))) => {
            m.closed(reason);
            tracing::info!(%remote, reason = reason.label(), %why, "refused DERP client");
            return;
        }
        Err(_) => {
            m.closed(CloseReason::Handshake);
            tracing::info!(%remote, "DERP handshake timed out");
            return;
        }
    };
    reader.set_max_len(frame::MAX_SERVER_RECV_FRAME);

    if shared.is_shutting_down() {
        m.closed(CloseReason::Shutdown);
        return;
    }
    {
        let mut routes = shared.routes();
        if routes.connection_count() >= shared.cfg.max_clients {
            drop(routes);
            m.closed(CloseReason::TooManyClients);
            tracing::warn!(%remote, max = shared.cfg.max_clients, "refused client: server full");
            return;
        }
        routes.register(handle.clone(), m);
    }
    let sent = tokio::time::timeout(
        shared.cfg.handshake_timeout,
        send_server_info(&shared, &mut wr, &handle.key),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        shared.routes().unregister(&handle, m);
        m.closed(CloseReason::Handshake);
        tracing::info!(%remote, "could not send ServerInfo");
        return;
    }
    let gauge = if handle.is_mesh {
        &m.current_mesh_clients
    } else {
        &m.current_clients
    };
    gauge.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(client = %handle.key.short(), %remote, mesh = handle.is_mesh, "client connected");

    let reason = tokio::select! {
        r = read_loop(&shared, &handle, &mut reader) => r,
        r = write_loop(&shared, &handle, &mut wr) => r,
    };
    // The writer may have stopped because of a close request: report that reason.
    let reason = match reason {
        CloseReason::Eof | CloseReason::ReadError => handle
            .queues
            .lock()
            .ok()
            .and_then(|q| q.close)
            .unwrap_or(reason),
        r => r,
    };
    handle.close(reason);
    shared.routes().unregister(&handle, m);
    gauge.fetch_sub(1, Ordering::Relaxed);
    if handle.preferred.load(Ordering::Relaxed) {
        m.current_home_clients.fetch_sub(1, Ordering::Relaxed);
    }
    m.closed(reason);
    match reason {
        CloseReason::Eof | CloseReason::Shutdown => {
            tracing::debug!(client = %handle.key.short(), reason = reason.label(), "client disconnected")
        }
        _ => {
            tracing::info!(client = %handle.key.short(), %remote, reason = reason.label(), "closed client connection")
        }
    }
}

type HandshakeFailure = (CloseReason, String);

async fn accept(
    shared: &Arc<Shared>,
    reader: &mut FrameReader<ReadHalf<BoxStream>>,
    wr: &mut WriteHalf<BoxStream>,
    remote: std::net::SocketAddr,
) -> Result<Arc<ClientHandle>, HandshakeFailure> {
    let io_fail = |e: std::io::Error| (CloseReason::Handshake, e.to_string());
    write_flush(wr, &Frame::ServerKey { key: shared.public }.to_bytes())
        .await
        .map_err(io_fail)?;
    let (t, body) = match reader.read_raw().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err((CloseReason::Handshake, "closed before ClientInfo".into())),
        Err(ReadError::Frame(e)) => return Err((CloseReason::Oversize, e.to_string())),
        Err(e) => return Err((CloseReason::Handshake, e.to_string())),
    };
    if t != ty::CLIENT_INFO {
        return Err((
            CloseReason::OutOfOrder,
            format!("first frame was type {t:#04x}, not ClientInfo"),
        ));
    }
    let (client_key, sealed) = match Frame::parse(t, body) {
        Ok(Frame::ClientInfo { key, sealed }) => (key, sealed),
        Ok(_) | Err(_) => return Err((CloseReason::BadClientInfo, "ClientInfo too short".into())),
    };
    let info = handshake::open_client_info(&shared.cfg.private_key, &client_key, &sealed)
        .map_err(|e| (CloseReason::BadClientInfo, e.to_string()))?;
    let is_mesh = match (info.mesh_key.is_empty(), &shared.cfg.mesh_key) {
        (true, _) => false,
        (false, Some(ours)) if info.mesh_key().is_some_and(|k| k.ct_eq(ours)) => true,
        (false, _) => return Err((CloseReason::BadMeshKey, "wrong mesh key".into())),
    };
    if !is_mesh {
        if let Some(v) = &shared.cfg.verify {
            if !verify::admit(shared, v, &client_key, remote.ip()).await {
                return Err((
                    CloseReason::NotAllowed,
                    format!("{} refused by the verify URL", client_key.short()),
                ));
            }
        }
    }
    Ok(Arc::new(ClientHandle::new(
        shared.next_id(),
        client_key,
        remote,
        is_mesh,
        info.is_prober,
    )))
}

/// The handshake's last frame. Sent only once the client is registered: a client that
/// has its ServerInfo may be sent to at once by a peer that just saw it connect, and a
/// packet for a client not yet in the routes would be dropped as for an unknown one.
async fn send_server_info(
    shared: &Shared,
    wr: &mut WriteHalf<BoxStream>,
    client_key: &NodePublic,
) -> std::io::Result<()> {
    let server_info = ServerInfo {
        version: frame::PROTOCOL_VERSION,
        ..Default::default()
    };
    let sealed = handshake::seal_server_info(&shared.cfg.private_key, client_key, &server_info);
    write_flush(wr, &Frame::ServerInfo { sealed }.to_bytes()).await
}

async fn read_loop(
    shared: &Arc<Shared>,
    h: &Arc<ClientHandle>,
    reader: &mut FrameReader<ReadHalf<BoxStream>>,
) -> CloseReason {
    let m = &shared.metrics;
    let mut bucket = shared.cfg.client_rate.filter(|_| !h.is_mesh).map(|r| {
        TokenBucket::new(
            r.per_second,
            r.burst.max((frame::MAX_PACKET_SIZE + 32) as f64),
            Instant::now(),
        )
    });
    let mut recorded: std::collections::HashSet<NodePublic> = Default::default();
    let mut not_here = TokenBucket::new(1.0, 3.0, Instant::now());
    // Receivers with packets queued since the last wake-up: woken once per read chunk.
    let mut to_wake: Vec<Arc<ClientHandle>> = Vec::new();
    loop {
        if !to_wake.is_empty() && !reader.frame_buffered() {
            wake_all(&mut to_wake);
        }
        let (t, body) = match reader.read_raw().await {
            Ok(Some(f)) => f,
            Ok(None) => return CloseReason::Eof,
            Err(ReadError::Frame(e @ FrameError::TooLong { .. })) => {
                tracing::info!(client = %h.key.short(), error = %e, "oversize frame");
                return CloseReason::Oversize;
            }
            Err(ReadError::Frame(_)) => return CloseReason::BadFrame,
            // A reset, or TLS without close_notify, is how many clients simply leave.
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return CloseReason::Eof
            }
            Err(_) => return CloseReason::ReadError,
        };
        let frame_len = frame::HEADER_LEN + body.len();
        m.bytes_received
            .fetch_add(frame_len as u64, Ordering::Relaxed);
        if let Some(b) = bucket.as_mut() {
            let wait = b.take(frame_len as f64, Instant::now());
            if !wait.is_zero() {
                m.rate_limited_waits.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
        }
        let frame = match Frame::parse(t, body) {
            Ok(f) => f,
            Err(e) => {
                tracing::info!(client = %h.key.short(), error = %e, "malformed frame");
                return CloseReason::BadFrame;
            }
        };
        match frame {
            Frame::SendPacket { dst, payload } => {
                m.packets_received.fetch_add(1, Ordering::Relaxed);
                let disco = looks_like_disco(&payload);
                if disco {
                    m.disco_packets_received.fetch_add(1, Ordering::Relaxed);
                }
                let record = !recorded.contains(&dst);
                let route = shared.routes().route(Some(h), h.key, dst, record);
                match route {
                    Route::Local(to) => {
                        if record && recorded.len() < RECORDED_DSTS {
                            recorded.insert(dst);
                        }
                        let queued = to.enqueue_packet(h.key, payload, m);
                        if !to_wake.iter().any(|w| Arc::ptr_eq(w, &to)) {
                            to_wake.push(to);
                        }
                        if queued >= QUEUE_DEPTH / 2 {
                            // Let the receivers' writers drain before a burst overflows a queue.
                            wake_all(&mut to_wake);
                            tokio::task::yield_now().await;
                        }
                    }
                    Route::Mesh(fwd) => {
                        if record && recorded.len() < RECORDED_DSTS {
                            recorded.insert(dst);
                        }
                        fwd.enqueue(h.key, dst, payload, m);
                    }
                    Route::Nowhere => {
                        m.drop_packet(DropReason::UnknownDest);
                        if disco && not_here.try_take(1.0, Instant::now()) {
                            let gone = Frame::PeerGone {
                                peer: dst,
                                reason: PeerGoneReason::NotHere,
                            };
                            if h.enqueue_control(gone, m) {
                                m.peer_gone_not_here_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            Frame::ForwardPacket { src, dst, payload } => {
                if !h.is_mesh {
                    return CloseReason::MeshOnly;
                }
                m.packets_received.fetch_add(1, Ordering::Relaxed);
                m.packets_forwarded_in.fetch_add(1, Ordering::Relaxed);
                let to = shared.routes().route_local(src, dst);
                match to {
                    Some(to) => {
                        let queued = to.enqueue_packet(src, payload, m);
                        if !to_wake.iter().any(|w| Arc::ptr_eq(w, &to)) {
                            to_wake.push(to);
                        }
                        if queued >= QUEUE_DEPTH / 2 {
                            wake_all(&mut to_wake);
                            tokio::task::yield_now().await;
                        }
                    }
                    None => m.drop_packet(DropReason::UnknownDestOnForward),
                }
            }
            Frame::NotePreferred { preferred } => {
                let was = h.preferred.swap(preferred, Ordering::Relaxed);
                match (was, preferred) {
                    (false, true) => m.current_home_clients.fetch_add(1, Ordering::Relaxed),
                    (true, false) => m.current_home_clients.fetch_sub(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
            Frame::Ping { data } => h.set_pong(data),
            Frame::WatchConns => {
                if !h.is_mesh {
                    return CloseReason::MeshOnly;
                }
                if h.key != shared.public {
                    shared.routes().add_watcher(h.clone(), m);
                }
            }
            Frame::ClosePeer { peer } => {
                if !h.is_mesh {
                    return CloseReason::MeshOnly;
                }
                let conns = shared.routes().connections_of(&peer);
                tracing::info!(peer = %peer.short(), by = %h.key.short(), n = conns.len(), "ClosePeer");
                for c in conns {
                    c.close(CloseReason::ClosePeer);
                }
            }
            Frame::Pong { .. } | Frame::KeepAlive | Frame::Unknown { .. } => {}
            // Frames only a server sends, or a second ClientInfo: the client is broken.
            Frame::ServerKey { .. }
            | Frame::ClientInfo { .. }
            | Frame::ServerInfo { .. }
            | Frame::RecvPacket { .. }
            | Frame::PeerGone { .. }
            | Frame::PeerPresent { .. }
            | Frame::Health { .. }
            | Frame::Restarting { .. } => {
                tracing::info!(client = %h.key.short(), frame_type = t, "frame out of order");
                return CloseReason::OutOfOrder;
            }
        }
    }
}

fn wake_all(to_wake: &mut Vec<Arc<ClientHandle>>) {
    for h in to_wake.drain(..) {
        h.wake();
    }
}

fn keepalive_interval(base: Duration) -> Duration {
    base + Duration::from_millis(rand::thread_rng().gen_range(0..5000))
}

async fn write_loop(
    shared: &Arc<Shared>,
    h: &Arc<ClientHandle>,
    wr: &mut WriteHalf<BoxStream>,
) -> CloseReason {
    let m = &shared.metrics;
    let timeout = if h.is_mesh {
        shared.cfg.mesh_write_timeout
    } else {
        shared.cfg.write_timeout
    };
    let interval = keepalive_interval(shared.cfg.keepalive);
    let keepalive = tokio::time::sleep(interval);
    tokio::pin!(keepalive);
    let mut out = Queues::default();
    let mut buf = BytesMut::new();
    loop {
        let mut send_keepalive = false;
        tokio::select! {
            biased;
            _ = h.notify.notified() => {}
            _ = &mut keepalive => {
                send_keepalive = true;
                keepalive.as_mut().reset(tokio::time::Instant::now() + interval);
                h.shrink();
            }
        }
        let close = h.take_queued(&mut out);
        let mut packets = 0u64;
        for f in out.control.drain(..) {
            f.encode(&mut buf);
        }
        if let Some(data) = out.pong.take() {
            Frame::Pong { data }.encode(&mut buf);
            m.pings_answered.fetch_add(1, Ordering::Relaxed);
        }
        for (src, payload) in out.disco.drain(..).chain(out.packets.drain(..)) {
            frame::encode_packet(&mut buf, ty::RECV_PACKET, &src, &payload);
            packets += 1;
        }
        if send_keepalive && buf.is_empty() {
            Frame::KeepAlive.encode(&mut buf);
        }
        if !buf.is_empty() {
            match tokio::time::timeout(timeout, write_flush(wr, &buf)).await {
                Ok(Ok(())) => {
                    m.bytes_sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    m.packets_sent.fetch_add(packets, Ordering::Relaxed);
                }
                Ok(Err(_)) => {
                    for _ in 0..packets {
                        m.drop_packet(DropReason::WriteError);
                    }
                    return CloseReason::WriteError;
                }
                Err(_) => {
                    for _ in 0..packets {
                        m.drop_packet(DropReason::WriteError);
                    }
                    return CloseReason::WriteTimeout;
                }
            }
            buf.clear();
            if buf.capacity() > 256 << 10 {
                buf = BytesMut::new();
            }
        }
        if let Some(reason) = close {
            // Everything queued before the close request has been written.
            return reason;
        }
        if send_keepalive {
            // Idle long enough for a keepalive: give back buffer memory.
            buf = BytesMut::new();
            out = Queues::default();
        }
    }
}
