//! What the node asks the shell to send or deliver, gathered while it handles an input and
//! carried out by the shell afterwards. WireGuard datagrams to one address are gathered
//! into runs of same-size datagrams, so that a run leaves in one system call (UDP GSO);
//! the run's buffer is reused, so a datagram costs one copy and no allocation.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;
use proto::{NodePublic, RegionId};

use super::peer::Via;

/// The most bytes of one run (the kernel's limit for one UDP GSO send).
pub const RUN_MAX_BYTES: usize = 64_000;
/// Emptied run buffers kept for reuse.
const SPARE_RUNS: usize = 2;

/// Same-size datagrams for one address (the last may be shorter), back to back in `buf`.
#[derive(Debug)]
pub struct Run {
    pub to: SocketAddr,
    /// The size of each datagram but perhaps the last.
    pub segment: usize,
    pub buf: Vec<u8>,
    pub count: usize,
    /// A shorter datagram was added: nothing more may follow.
    closed: bool,
}

/// Runs of datagrams being gathered: the open one, and those complete and waiting.
#[derive(Debug)]
pub struct UdpRuns {
    /// Datagrams per run at most, for IPv4 and IPv6 destinations (the sockets' GSO limits).
    max_segments: (usize, usize),
    open: Option<Run>,
    ready: VecDeque<Run>,
    spare: Vec<Vec<u8>>,
}

impl Default for UdpRuns {
    fn default() -> Self {
        UdpRuns::new(1, 1)
    }
}

impl UdpRuns {
    /// Runs of at most `v4` (`v6`) datagrams to IPv4 (IPv6) addresses.
    pub fn new(v4: usize, v6: usize) -> Self {
        UdpRuns {
            max_segments: (v4.max(1), v6.max(1)),
            open: None,
            ready: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// The sockets' limits changed (an IPv6 socket came or went).
    pub fn set_max_segments(&mut self, v4: usize, v6: usize) {
        self.max_segments = (v4.max(1), v6.max(1));
    }

    /// Adds a datagram for `to`: to the open run when it fits, else it starts a new one
    /// (the open run is then complete).
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        let max = if to.is_ipv4() {
            self.max_segments.0
        } else {
            self.max_segments.1
        };
        let fits = self.open.as_ref().is_some_and(|r| {
            r.to == to
                && !r.closed
                && datagram.len() <= r.segment
                && r.count < max
                && r.buf.len() + datagram.len() <= RUN_MAX_BYTES
        });
        if !fits {
            if let Some(r) = self.open.take() {
                self.ready.push_back(r);
            }
        }
        let spare = &mut self.spare;
        let r = self.open.get_or_insert_with(|| Run {
            to,
            segment: datagram.len(),
            buf: spare.pop().unwrap_or_default(),
            count: 0,
            closed: false,
        });
        r.buf.extend_from_slice(datagram);
        r.count += 1;
        // A shorter datagram can only be the last of a run.
        r.closed = datagram.len() < r.segment;
    }

    /// The next complete run.
    pub fn pop_ready(&mut self) -> Option<Run> {
        self.ready.pop_front()
    }

    /// The next run, complete or not (at the end of a batch of work).
    pub fn pop_any(&mut self) -> Option<Run> {
        self.ready.pop_front().or_else(|| self.open.take())
    }

    /// Gives a sent run's buffer back for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < SPARE_RUNS {
            buf.clear();
            self.spare.push(buf);
        }
    }
}

/// Everything the node wants carried out.
#[derive(Debug, Default)]
pub struct Outbox {
    /// WireGuard datagrams for direct paths, in runs.
    pub udp: UdpRuns,
    /// Single datagrams sent at once, outside runs (disco messages, cookie replies).
    pub direct: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Datagrams for a peer through a relay region.
    pub relay: VecDeque<(RegionId, NodePublic, Bytes)>,
    /// Decrypted IP packets for the host.
    pub tun: Vec<Vec<u8>>,
    /// Answers to `agentctl ping`s: the peer, the ping's transaction ID, the way it came.
    pub api_pongs: VecDeque<(NodePublic, disco::TxId, Via)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sizes(r: &Run) -> (SocketAddr, usize, usize, usize) {
        (r.to, r.segment, r.count, r.buf.len())
    }

    #[test]
    fn same_size_datagrams_to_one_address_share_a_run() {
        let (a, b) = (to("192.0.2.1:1"), to("192.0.2.2:1"));
        let mut u = UdpRuns::new(3, 3);
        for _ in 0..4 {
            u.push(a, &[1; 100]);
        }
        // The fourth did not fit (3 at most): the first run is complete.
        assert_eq!(sizes(&u.pop_ready().unwrap()), (a, 100, 3, 300));
        assert!(u.pop_ready().is_none());
        // A shorter one ends the run; anything after it starts another.
        u.push(a, &[1; 60]);
        u.push(a, &[1; 60]);
        // Another address starts another run.
        u.push(b, &[1; 100]);
        let runs: Vec<_> = std::iter::from_fn(|| u.pop_any())
            .map(|r| sizes(&r))
            .collect();
        assert_eq!(
            runs,
            vec![(a, 100, 2, 160), (a, 60, 1, 60), (b, 100, 1, 100)]
        );
    }

    #[test]
    fn a_longer_datagram_or_a_full_run_starts_a_new_one() {
        let a = to("[2001:db8::1]:1");
        let mut u = UdpRuns::new(64, 64);
        u.push(a, &[1; 100]);
        u.push(a, &[1; 200]);
        assert_eq!(sizes(&u.pop_ready().unwrap()), (a, 100, 1, 100));
        let mut u = UdpRuns::new(64, 64);
        for _ in 0..(RUN_MAX_BYTES / 1500 + 1) {
            u.push(a, &[1; 1500]);
        }
        let first = u.pop_ready().unwrap();
        assert!(first.buf.len() <= RUN_MAX_BYTES);
        assert_eq!(first.count, RUN_MAX_BYTES / 1500);
    }

    #[test]
    fn each_family_has_its_own_limit_and_buffers_are_reused() {
        let (v4, v6) = (to("192.0.2.1:1"), to("[2001:db8::1]:1"));
        let mut u = UdpRuns::new(1, 2);
        u.push(v4, &[1; 10]);
        u.push(v4, &[1; 10]);
        assert_eq!(u.pop_ready().unwrap().count, 1);
        u.pop_any();
        u.push(v6, &[1; 10]);
        u.push(v6, &[1; 10]);
        let r = u.pop_any().unwrap();
        assert_eq!(r.count, 2);
        let cap = r.buf.capacity();
        u.recycle(r.buf);
        u.push(v6, &[2; 10]);
        let r = u.pop_any().unwrap();
        assert_eq!((r.buf.capacity(), &r.buf[..]), (cap, &[2u8; 10][..]));
    }
}
