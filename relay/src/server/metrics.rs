//! relayd's counters and their Prometheus text exposition (`/metrics`).
//!
//! Every drop and every forced close has a named reason; adding a reason means adding a
//! variant here, so `/metrics` always lists all of them (zeros included).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use netbase::reasons::AtomicCounts;

netbase::reasons! {
    /// Why a packet was dropped.
    pub enum DropReason {
    UnknownDest => "unknown_dest",
    UnknownDestOnForward => "unknown_dest_on_fwd",
    QueueHead => "queue_head",
    MeshQueueFull => "mesh_queue_full",
    WriteError => "write_error",
    Gone => "gone",
    ControlQueueFull => "control_queue_full",
    }
}

netbase::reasons! {
    /// Why a connection was closed.
    pub enum CloseReason {
    Eof => "eof",
    ReadError => "read_error",
    BadFrame => "bad_frame",
    Oversize => "oversize_frame",
    OutOfOrder => "out_of_order_frame",
    Handshake => "handshake",
    BadClientInfo => "bad_client_info",
    BadMeshKey => "bad_mesh_key",
    NotAllowed => "verify_refused",
    Revoked => "verify_revoked",
    MeshOnly => "mesh_only_frame",
    WriteTimeout => "write_timeout",
    WriteError => "write_error",
    ClosePeer => "close_peer",
    TooManyClients => "too_many_clients",
    Shutdown => "shutdown",
    }
}

/// All relayd counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    pub accepts: AtomicU64,
    pub accepts_rate_limited: AtomicU64,
    pub current_connections: AtomicI64,
    pub current_clients: AtomicI64,
    pub current_mesh_clients: AtomicI64,
    pub current_home_clients: AtomicI64,
    pub current_watchers: AtomicI64,
    pub mesh_links_up: AtomicI64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub packets_received: AtomicU64,
    pub packets_sent: AtomicU64,
    pub disco_packets_received: AtomicU64,
    pub packets_forwarded_out: AtomicU64,
    pub packets_forwarded_in: AtomicU64,
    pub peer_gone_disconnected_sent: AtomicU64,
    pub peer_gone_not_here_sent: AtomicU64,
    pub pings_answered: AtomicU64,
    pub rate_limited_waits: AtomicU64,
    pub stun_requests: AtomicU64,
    pub stun_bad: AtomicU64,
    pub verify_allowed: AtomicU64,
    pub verify_denied: AtomicU64,
    pub verify_errors: AtomicU64,
    drops: AtomicCounts<DropReason>,
    closes: AtomicCounts<CloseReason>,
}

impl Metrics {
    pub fn drop_packet(&self, reason: DropReason) {
        self.drops.add(reason);
    }
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason)
    }
    pub fn closed(&self, reason: CloseReason) {
        self.closes.add(reason);
    }
    pub fn closes(&self, reason: CloseReason) -> u64 {
        self.closes.get(reason)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut one = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP relayd_{name} {help}");
            let _ = writeln!(out, "# TYPE relayd_{name} {kind}");
            let _ = writeln!(out, "relayd_{name} {v}");
        };
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
        one(
            "accepts_total",
            "counter",
            "TCP connections accepted.",
            c(&self.accepts),
        );
        one(
            "accepts_rate_limited_total",
            "counter",
            "Connections closed at once by the accept-rate limit.",
            c(&self.accepts_rate_limited),
        );
        one(
            "connections",
            "gauge",
            "Open TCP connections (any state).",
            g(&self.current_connections),
        );
        one(
            "clients",
            "gauge",
            "Handshaken DERP clients, mesh peers excluded.",
            g(&self.current_clients),
        );
        one(
            "mesh_clients",
            "gauge",
            "Handshaken DERP connections holding the mesh key.",
            g(&self.current_mesh_clients),
        );
        one(
            "home_clients",
            "gauge",
            "Clients that said this relay is their home (NotePreferred).",
            g(&self.current_home_clients),
        );
        one(
            "watchers",
            "gauge",
            "Mesh peers watching this relay's connections.",
            g(&self.current_watchers),
        );
        one(
            "mesh_links_up",
            "gauge",
            "Outgoing mesh links currently connected.",
            g(&self.mesh_links_up),
        );
        one(
            "bytes_received_total",
            "counter",
            "DERP bytes read from clients (frame headers included).",
            c(&self.bytes_received),
        );
        one(
            "bytes_sent_total",
            "counter",
            "DERP bytes written to clients.",
            c(&self.bytes_sent),
        );
        one(
            "packets_received_total",
            "counter",
            "SendPacket and ForwardPacket frames received.",
            c(&self.packets_received),
        );
        one(
            "packets_sent_total",
            "counter",
            "RecvPacket frames written to clients.",
            c(&self.packets_sent),
        );
        one(
            "disco_packets_received_total",
            "counter",
            "Received packets that were disco messages.",
            c(&self.disco_packets_received),
        );
        one(
            "packets_forwarded_out_total",
            "counter",
            "Packets sent to another relay of the region over the mesh.",
            c(&self.packets_forwarded_out),
        );
        one(
            "packets_forwarded_in_total",
            "counter",
            "Packets received from another relay of the region over the mesh.",
            c(&self.packets_forwarded_in),
        );
        one(
            "pings_answered_total",
            "counter",
            "Ping frames answered with a Pong.",
            c(&self.pings_answered),
        );
        one(
            "rate_limited_waits_total",
            "counter",
            "Times a client's reads were paused by its receive rate limit.",
            c(&self.rate_limited_waits),
        );
        one(
            "stun_requests_total",
            "counter",
            "STUN binding requests answered.",
            c(&self.stun_requests),
        );
        one(
            "stun_bad_requests_total",
            "counter",
            "UDP datagrams on the STUN port that were not binding requests.",
            c(&self.stun_bad),
        );
        let _ = writeln!(
            out,
            "# HELP relayd_peer_gone_sent_total PeerGone frames sent, by reason."
        );
        let _ = writeln!(out, "# TYPE relayd_peer_gone_sent_total counter");
        let _ = writeln!(
            out,
            "relayd_peer_gone_sent_total{{reason=\"disconnected\"}} {}",
            c(&self.peer_gone_disconnected_sent)
        );
        let _ = writeln!(
            out,
            "relayd_peer_gone_sent_total{{reason=\"not_here\"}} {}",
            c(&self.peer_gone_not_here_sent)
        );
        let _ = writeln!(
            out,
            "# HELP relayd_verify_total Client verification answers, by result."
        );
        let _ = writeln!(out, "# TYPE relayd_verify_total counter");
        let _ = writeln!(
            out,
            "relayd_verify_total{{result=\"allowed\"}} {}",
            c(&self.verify_allowed)
        );
        let _ = writeln!(
            out,
            "relayd_verify_total{{result=\"denied\"}} {}",
            c(&self.verify_denied)
        );
        let _ = writeln!(
            out,
            "relayd_verify_total{{result=\"error\"}} {}",
            c(&self.verify_errors)
        );
        let _ = writeln!(
            out,
            "# HELP relayd_packets_dropped_total Packets dropped, by reason."
        );
        let _ = writeln!(out, "# TYPE relayd_packets_dropped_total counter");
        for (label, n) in self.drops.iter() {
            let _ = writeln!(
                out,
                "relayd_packets_dropped_total{{reason=\"{label}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP relayd_connections_closed_total DERP connections closed, by reason."
        );
        let _ = writeln!(out, "# TYPE relayd_connections_closed_total counter");
        for (label, n) in self.closes.iter() {
            let _ = writeln!(
                out,
                "relayd_connections_closed_total{{reason=\"{label}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_reason_with_counts() {
        let m = Metrics::default();
        m.drop_packet(DropReason::QueueHead);
        m.drop_packet(DropReason::QueueHead);
        m.closed(CloseReason::BadFrame);
        let text = m.render();
        assert!(text.contains("relayd_packets_dropped_total{reason=\"queue_head\"} 2\n"));
        assert!(text.contains("relayd_packets_dropped_total{reason=\"unknown_dest\"} 0\n"));
        assert!(text.contains("relayd_connections_closed_total{reason=\"bad_frame\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("relayd_"), "{line}");
            assert!(value.parse::<i64>().is_ok(), "{line}");
        }
    }
}
