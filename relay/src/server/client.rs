//! A connected client as the rest of the server sees it: identity, flags and the bounded
//! queues its writer drains. Packets for a client go into one of two queues of
//! [`QUEUE_DEPTH`] (disco separate, so path discovery survives a full data queue); when a
//! queue is full the oldest packet is dropped. Control frames (PeerGone, PeerPresent) have
//! their own bounded queue.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use proto::NodePublic;
use tokio::sync::Notify;

use super::metrics::{CloseReason, DropReason, Metrics};
use crate::frame::{looks_like_disco, Frame};

/// Depth of each per-client packet queue (derper uses 32).
pub const QUEUE_DEPTH: usize = 32;
/// Control frames queued for a regular client.
const CONTROL_DEPTH_CLIENT: usize = 256;
/// Control frames queued for a mesh watcher (the initial PeerPresent dump of every client).
pub const CONTROL_DEPTH_WATCHER: usize = 1 << 20;

#[derive(Debug, Default)]
pub(crate) struct Queues {
    pub packets: VecDeque<(NodePublic, Bytes)>,
    pub disco: VecDeque<(NodePublic, Bytes)>,
    pub control: VecDeque<Frame>,
    pub pong: Option<[u8; 8]>,
    pub close: Option<CloseReason>,
}

impl Queues {
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
            && self.disco.is_empty()
            && self.control.is_empty()
            && self.pong.is_none()
    }
}

#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub id: u64,
    pub key: NodePublic,
    pub remote: SocketAddr,
    pub is_mesh: bool,
    pub is_prober: bool,
    pub queues: Mutex<Queues>,
    pub notify: Notify,
    /// Other connections with the same key exist: sends must update "last writer is active".
    pub has_dups: AtomicBool,
    pub preferred: AtomicBool,
    pub is_watcher: AtomicBool,
}

impl ClientHandle {
    pub fn new(
        id: u64,
        key: NodePublic,
        remote: SocketAddr,
        is_mesh: bool,
        is_prober: bool,
    ) -> Self {
        ClientHandle {
            id,
            key,
            remote,
            is_mesh,
            is_prober,
            queues: Mutex::new(Queues::default()),
            notify: Notify::new(),
            has_dups: AtomicBool::new(false),
            preferred: AtomicBool::new(false),
            is_watcher: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a packet from `src` without waking the writer (the caller batches wake-ups
    /// with [`ClientHandle::wake`]); drops the oldest queued packet when full. Returns the
    /// queue's length afterwards so a busy sender can yield to this client's writer.
    pub fn enqueue_packet(&self, src: NodePublic, payload: Bytes, metrics: &Metrics) -> usize {
        let len;
        {
            let mut q = self.lock();
            if q.close.is_some() {
                metrics.drop_packet(DropReason::Gone);
                return 0;
            }
            let queue = if looks_like_disco(&payload) {
                &mut q.disco
            } else {
                &mut q.packets
            };
            if queue.len() >= QUEUE_DEPTH {
                queue.pop_front();
                metrics.drop_packet(DropReason::QueueHead);
            }
            queue.push_back((src, payload));
            len = queue.len();
        }
        len
    }

    /// Wakes the writer after quiet enqueues.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Queues a control frame (PeerGone, PeerPresent).
    pub fn enqueue_control(&self, frame: Frame, metrics: &Metrics) -> bool {
        {
            let mut q = self.lock();
            let cap = if self.is_watcher.load(Ordering::Relaxed) {
                CONTROL_DEPTH_WATCHER
            } else {
                CONTROL_DEPTH_CLIENT
            };
            if q.close.is_some() || q.control.len() >= cap {
                metrics.drop_packet(DropReason::ControlQueueFull);
                return false;
            }
            q.control.push_back(frame);
        }
        self.notify.notify_one();
        true
    }

    /// Queues a Pong; a second ping before the first Pong is written is ignored.
    pub fn set_pong(&self, data: [u8; 8]) {
        let mut q = self.lock();
        if q.pong.is_none() {
            q.pong = Some(data);
            drop(q);
            self.notify.notify_one();
        }
    }

    /// Asks the connection to end; its writer flushes what is queued first.
    pub fn close(&self, reason: CloseReason) {
        let mut q = self.lock();
        if q.close.is_none() {
            q.close = Some(reason);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Moves everything queued into `out` (whose deques are empty); returns a close request.
    pub fn take_queued(&self, out: &mut Queues) -> Option<CloseReason> {
        let mut q = self.lock();
        std::mem::swap(&mut q.control, &mut out.control);
        std::mem::swap(&mut q.disco, &mut out.disco);
        std::mem::swap(&mut q.packets, &mut out.packets);
        out.pong = q.pong.take();
        q.close
    }

    /// Frees queue memory of an idle client.
    pub fn shrink(&self) {
        let mut q = self.lock();
        if q.is_empty() {
            q.packets = VecDeque::new();
            q.disco = VecDeque::new();
            q.control = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_drops_oldest_and_disco_has_its_own_queue() {
        let m = Metrics::default();
        let h = ClientHandle::new(
            1,
            NodePublic::default(),
            "127.0.0.1:1".parse().unwrap(),
            false,
            false,
        );
        for i in 0..(QUEUE_DEPTH + 3) {
            h.enqueue_packet(NodePublic::default(), Bytes::from(vec![i as u8; 10]), &m);
        }
        let mut disco = vec![0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
        disco.resize(100, 0);
        h.enqueue_packet(NodePublic::default(), Bytes::from(disco), &m);
        assert_eq!(m.drops(DropReason::QueueHead), 3);
        let mut out = Queues::default();
        assert_eq!(h.take_queued(&mut out), None);
        assert_eq!(out.packets.len(), QUEUE_DEPTH);
        assert_eq!(out.packets[0].1[0], 3, "the three oldest were dropped");
        assert_eq!(out.disco.len(), 1);
        h.close(CloseReason::Shutdown);
        h.enqueue_packet(NodePublic::default(), Bytes::from_static(b"x"), &m);
        assert_eq!(m.drops(DropReason::Gone), 1);
        assert_eq!(
            h.take_queued(&mut Queues::default()),
            Some(CloseReason::Shutdown)
        );
    }

    #[test]
    fn only_one_pong_is_pending() {
        let h = ClientHandle::new(
            1,
            NodePublic::default(),
            "127.0.0.1:1".parse().unwrap(),
            false,
            false,
        );
        h.set_pong([1; 8]);
        h.set_pong([2; 8]);
        let mut out = Queues::default();
        h.take_queued(&mut out);
        assert_eq!(out.pong, Some([1; 8]));
    }
}
