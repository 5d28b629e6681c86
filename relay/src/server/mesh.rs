//! The region mesh: for every other relay of the region, a DERP client that connects
//! with this server's own key and the mesh PSK, watches that relay's connections
//! (WatchConns → PeerPresent / PeerGone) and carries ForwardPacket frames to it. A packet
//! for a client of another node therefore takes exactly one mesh hop. A broken link's
//! routes are forgotten at once and the link is re-dialled after `mesh_retry`. A link
//! whose peer goes silent (blackholed, no FIN or RST) is found out as a client's
//! connection is: a Ping after a short silence, dead without an answer (see
//! `client::liveness`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proto::NodePublic;
use tokio::sync::Notify;

use super::metrics::{DropReason, Metrics};
use super::Shared;
use crate::client::liveness::{Liveness, LivenessAction, LivenessConfig};
use crate::client::{connect, RelayConn, RelayTarget};
use crate::frame::{Frame, PROTOCOL_VERSION};
use crate::handshake::ClientInfo;

/// Packets queued towards one mesh peer.
const MESH_QUEUE: usize = 4096;
/// Write timeout on a mesh link.
const MESH_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Default)]
struct Pending {
    packets: VecDeque<(NodePublic, NodePublic, Bytes)>,
    pong: Option<[u8; 8]>,
    /// Our own liveness ping, when the peer has been silent.
    ping: Option<[u8; 8]>,
}

/// The sending side of one mesh link, shared by every route learned from it.
#[derive(Debug)]
pub(crate) struct MeshForwarder {
    pub link_id: u64,
    pending: Mutex<Pending>,
    notify: Notify,
}

impl MeshForwarder {
    pub fn new(link_id: u64) -> Self {
        MeshForwarder {
            link_id,
            pending: Mutex::new(Pending::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a ForwardPacket; drops it (counted) when the link is backed up.
    pub fn enqueue(&self, src: NodePublic, dst: NodePublic, payload: Bytes, metrics: &Metrics) {
        {
            let mut p = self.lock();
            if p.packets.len() >= MESH_QUEUE {
                metrics.drop_packet(DropReason::MeshQueueFull);
                return;
            }
            p.packets.push_back((src, dst, payload));
        }
        self.notify.notify_one();
    }

    fn set_pong(&self, data: [u8; 8]) {
        self.lock().pong = Some(data);
        self.notify.notify_one();
    }

    fn set_ping(&self, data: [u8; 8]) {
        self.lock().ping = Some(data);
        self.notify.notify_one();
    }

    fn clear(&self) {
        *self.lock() = Pending::default();
    }
}

pub(crate) async fn run_link(shared: Arc<Shared>, link_id: u64, target: RelayTarget) {
    let fwd = Arc::new(MeshForwarder::new(link_id));
    let mut shutdown = shared.shutdown.clone();
    let Some(mesh_key) = shared.cfg.mesh_key.clone() else {
        tracing::error!("mesh peers configured without a mesh key; not meshing");
        return;
    };
    let info = ClientInfo {
        mesh_key: mesh_key.to_hex(),
        version: PROTOCOL_VERSION,
        can_ack_pings: true,
        ..Default::default()
    };
    let name = format!("{}:{}", target.host, target.port);
    loop {
        match connect(&target, &shared.cfg.private_key, &info).await {
            Ok(conn) if conn.server_key == shared.public => {
                tracing::info!(peer = %name, "mesh peer is this server itself; not meshing with it");
                return;
            }
            Ok(conn) => {
                tracing::info!(peer = %name, key = %conn.server_key.short(), "mesh link up");
                shared.metrics.mesh_links_up.fetch_add(1, Ordering::Relaxed);
                let why = tokio::select! {
                    why = serve_link(&shared, &fwd, conn) => why,
                    _ = shutdown.changed() => "shutting down".to_string(),
                };
                shared.metrics.mesh_links_up.fetch_sub(1, Ordering::Relaxed);
                shared.routes().remove_link_routes(link_id, &shared.metrics);
                fwd.clear();
                tracing::warn!(peer = %name, reason = %why, retry_in = ?shared.cfg.mesh_retry, "mesh link down");
            }
            Err(e) => {
                tracing::warn!(peer = %name, error = %e, retry_in = ?shared.cfg.mesh_retry, "cannot reach mesh peer");
            }
        }
        if shared.is_shutting_down() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.cfg.mesh_retry) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn serve_link(shared: &Arc<Shared>, fwd: &Arc<MeshForwarder>, conn: RelayConn) -> String {
    let RelayConn {
        mut reader,
        mut writer,
        ..
    } = conn;
    if let Err(e) = writer.send(&Frame::WatchConns).await {
        return e.to_string();
    }
    let m = &shared.metrics;
    let now = || tokio::time::Instant::now().into_std();
    let liveness = std::sync::Mutex::new(Liveness::new(LivenessConfig::default(), now()));
    let lock = || liveness.lock().unwrap_or_else(|p| p.into_inner());
    let read_side = async {
        loop {
            let frame = reader.recv().await;
            if frame.is_ok() {
                lock().on_frame(now());
            }
            match frame {
                Err(e) => return e.to_string(),
                Ok(Frame::PeerPresent { peer, .. }) if peer != shared.public => {
                    shared.routes().add_mesh_route(peer, fwd);
                }
                Ok(Frame::PeerGone { peer, .. }) => {
                    shared.routes().remove_mesh_route(peer, fwd.link_id, m);
                }
                Ok(Frame::Ping { data }) => fwd.set_pong(data),
                Ok(_) => {}
            }
        }
    };
    let watchdog = async {
        loop {
            let Some(at) = lock().poll_timeout() else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            let action = lock().handle_timeout(now());
            match action {
                Some(LivenessAction::SendPing(data)) => fwd.set_ping(data),
                Some(LivenessAction::Dead { silent_for }) => {
                    return format!(
                        "nothing from the mesh peer for {silent_for:?}, not even an answer to a ping"
                    );
                }
                None => {}
            }
        }
    };
    let write_side = async {
        loop {
            fwd.notify.notified().await;
            let (packets, pong, ping) = {
                let mut p = fwd.lock();
                (std::mem::take(&mut p.packets), p.pong.take(), p.ping.take())
            };
            if let Some(data) = pong {
                writer.queue(&Frame::Pong { data });
            }
            if let Some(data) = ping {
                writer.queue(&Frame::Ping { data });
            }
            let n = packets.len() as u64;
            for (src, dst, payload) in packets {
                writer.queue(&Frame::ForwardPacket { src, dst, payload });
            }
            match tokio::time::timeout(MESH_WRITE_TIMEOUT, writer.flush()).await {
                Ok(Ok(())) => {
                    m.packets_forwarded_out.fetch_add(n, Ordering::Relaxed);
                }
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return "write to mesh peer timed out".to_string(),
            }
        }
    };
    tokio::select! {
        why = read_side => why,
        why = watchdog => why,
        why = write_side => why,
    }
}
