//! Relay connections, one per region: the home region's kept open (and marked preferred),
//! others opened on demand when a peer lives there and closed after 60 s without a write
//! (shared/PROTOCOLS.md §3.9). Each connection is a `relay::client::RelayClient` actor
//! trying the region's nodes in order; its events are forwarded, tagged with the region,
//! into one bounded channel the engine reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::relaymap::RelayMap;
use proto::{NodePrivate, NodePublic};
use relay::client::{RelayClient, RelayClientConfig, RelayEvent, RelayTarget};
use tokio::sync::mpsc;

/// A non-home connection with no write for this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// Depth of the merged event channel.
const EVENT_QUEUE: usize = 1024;

struct Conn {
    client: RelayClient,
    forwarder: tokio::task::JoinHandle<()>,
    last_write: Instant,
    connected: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

/// Counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayCounters {
    pub sent: u64,
    /// Sends dropped: no such region in the map, or the connection's queue was full.
    pub dropped_no_region: u64,
    pub dropped_queue_full: u64,
    pub opened: u64,
    pub closed_idle: u64,
}

/// The set of relay connections.
pub struct Relays {
    key: NodePrivate,
    map: RelayMap,
    home: Option<i32>,
    conns: BTreeMap<i32, Conn>,
    last_heard: BTreeMap<i32, Instant>,
    events_tx: mpsc::Sender<(i32, RelayEvent)>,
    pub counters: RelayCounters,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relays")
            .field("home", &self.home)
            .field("open", &self.conns.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The connection targets of a region: its nodes that are not STUN-only, in map order
/// (the first is preferred; the others are the failover order).
fn targets(map: &RelayMap, region: i32) -> Vec<RelayTarget> {
    map.regions
        .get(&region)
        .map(|r| {
            r.nodes
                .iter()
                .filter(|n| !n.stun_only)
                .map(RelayTarget::from_node)
                .collect()
        })
        .unwrap_or_default()
}

impl Relays {
    pub fn new(key: NodePrivate) -> (Self, mpsc::Receiver<(i32, RelayEvent)>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (
            Relays {
                key,
                map: RelayMap::default(),
                home: None,
                conns: BTreeMap::new(),
                last_heard: BTreeMap::new(),
                events_tx: tx,
                counters: RelayCounters::default(),
            },
            rx,
        )
    }

    /// A new relay map: connections to regions that left it, or whose first node
    /// changed, are closed (and reopened on demand).
    pub fn set_map(&mut self, map: RelayMap) {
        if map == self.map {
            return;
        }
        let old = std::mem::replace(&mut self.map, map);
        self.conns.retain(|region, _| {
            let before = old.regions.get(region).and_then(|r| r.nodes.first());
            let now = self.map.regions.get(region).and_then(|r| r.nodes.first());
            before == now && now.is_some()
        });
        if let Some(h) = self.home {
            self.ensure(h);
        }
    }

    pub fn map(&self) -> &RelayMap {
        &self.map
    }

    pub fn home(&self) -> Option<i32> {
        self.home
    }

    /// Makes `region` the home: connected, marked preferred; the old home unmarked.
    pub fn set_home(&mut self, region: i32) {
        if self.home == Some(region) {
            return;
        }
        if let Some(old) = self.home.and_then(|h| self.conns.get(&h)) {
            let c = old.client.clone();
            tokio::spawn(async move {
                let _ = c.set_preferred(false).await;
            });
        }
        self.home = Some(region);
        self.ensure(region);
        if let Some(c) = self.conns.get(&region) {
            let c = c.client.clone();
            tokio::spawn(async move {
                let _ = c.set_preferred(true).await;
            });
        }
    }

    fn ensure(&mut self, region: i32) -> bool {
        if self.conns.contains_key(&region) {
            return true;
        }
        let mut ts = targets(&self.map, region);
        if ts.is_empty() {
            return false;
        }
        let first = ts.remove(0);
        let mut cfg = RelayClientConfig::new(first, self.key.clone());
        cfg.alternates = ts;
        cfg.preferred = self.home == Some(region);
        cfg.backoff_max = Duration::from_secs(5);
        cfg.send_queue = 256;
        let (client, mut events) = RelayClient::spawn(cfg);
        let tx = self.events_tx.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if tx.send((region, ev)).await.is_err() {
                    return;
                }
            }
        });
        tracing::info!(region, "relay connection opened");
        self.counters.opened += 1;
        self.conns.insert(
            region,
            Conn {
                client,
                forwarder,
                last_write: Instant::now(),
                connected: false,
            },
        );
        true
    }

    /// Sends `payload` to `dst` through `region`, opening the connection if needed.
    pub fn send(&mut self, region: i32, dst: NodePublic, payload: Bytes, now: Instant) -> bool {
        if !self.ensure(region) {
            self.counters.dropped_no_region += 1;
            return false;
        }
        let Some(c) = self.conns.get_mut(&region) else {
            return false;
        };
        c.last_write = now;
        match c.client.try_send(dst, payload) {
            Ok(()) => {
                self.counters.sent += 1;
                true
            }
            Err(_) => {
                self.counters.dropped_queue_full += 1;
                false
            }
        }
    }

    /// Notes an event from `region` (for "heard from recently" and connection state).
    pub fn note_event(&mut self, region: i32, ev: &RelayEvent, now: Instant) {
        match ev {
            RelayEvent::Connected { remote, .. } => {
                if let Some(c) = self.conns.get_mut(&region) {
                    c.connected = true;
                }
                tracing::info!(region, addr = %remote, "relay connected");
                self.last_heard.insert(region, now);
            }
            RelayEvent::Disconnected { error, retry_in } => {
                if let Some(c) = self.conns.get_mut(&region) {
                    c.connected = false;
                }
                tracing::info!(region, %error, ?retry_in, "relay disconnected");
            }
            _ => {
                self.last_heard.insert(region, now);
            }
        }
    }

    /// When a frame last arrived from `region`.
    pub fn last_heard(&self, region: i32) -> Option<Instant> {
        self.last_heard.get(&region).copied()
    }

    /// Whether the connection to `region` is up.
    pub fn connected(&self, region: i32) -> bool {
        self.conns.get(&region).is_some_and(|c| c.connected)
    }

    /// Closes non-home connections idle for a minute.
    pub fn close_idle(&mut self, now: Instant) {
        let home = self.home;
        let before = self.conns.len();
        self.conns.retain(|region, c| {
            Some(*region) == home || now.saturating_duration_since(c.last_write) < IDLE_CLOSE
        });
        let closed = before - self.conns.len();
        if closed > 0 {
            tracing::debug!(closed, "closed idle relay connections");
            self.counters.closed_idle += closed as u64;
        }
    }

    /// Closes every connection and forgets the home region (`agentctl down`).
    pub fn close_all(&mut self) {
        self.conns.clear();
        self.home = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::relaymap::{RelayNode, RelayRegion};

    /// A loopback port nothing listens on (the connections keep retrying; what is
    /// tested is which ones exist).
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(9)
    }

    /// A map of `regions`, each with one node on `port` of loopback.
    fn map(regions: &[i32], closed: u16) -> RelayMap {
        let mut m = RelayMap::default();
        for &id in regions {
            m.regions.insert(
                id,
                RelayRegion {
                    region_id: id,
                    nodes: vec![RelayNode {
                        name: format!("{id}a"),
                        region_id: id,
                        host_name: "localhost".into(),
                        ipv4: "127.0.0.1".into(),
                        ipv6: "none".into(),
                        derp_port: i32::from(closed),
                        insecure_for_tests: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
        }
        m
    }

    #[tokio::test]
    async fn the_home_stays_open_and_other_regions_close_after_a_minute_without_writes() {
        let (mut r, _events) = Relays::new(NodePrivate::generate());
        let port = closed_port();
        r.set_map(map(&[901, 902], port));
        r.set_home(901);
        assert_eq!(r.counters.opened, 1);
        let peer = NodePrivate::generate().public();
        let t0 = Instant::now();
        // A peer homed elsewhere: that region is opened on demand.
        assert!(r.send(902, peer, Bytes::from_static(b"x"), t0));
        assert_eq!(r.counters.opened, 2);
        assert!(r.send(902, peer, Bytes::from_static(b"y"), t0));
        assert_eq!(r.counters.opened, 2, "one connection per region");
        r.close_idle(t0 + IDLE_CLOSE / 2);
        assert_eq!(r.counters.closed_idle, 0);
        r.close_idle(t0 + IDLE_CLOSE + Duration::from_secs(1));
        assert_eq!(r.counters.closed_idle, 1, "902 closed");
        assert_eq!(r.conns.keys().copied().collect::<Vec<_>>(), vec![901]);
        // Writing to it again opens it again.
        assert!(r.send(902, peer, Bytes::from_static(b"z"), t0));
        assert_eq!(r.counters.opened, 3);
    }

    #[tokio::test]
    async fn unknown_regions_are_counted_and_regions_that_leave_the_map_are_closed() {
        let (mut r, _events) = Relays::new(NodePrivate::generate());
        let port = closed_port();
        r.set_map(map(&[901, 902], port));
        r.set_home(901);
        let peer = NodePrivate::generate().public();
        assert!(!r.send(999, peer, Bytes::from_static(b"x"), Instant::now()));
        assert_eq!(r.counters.dropped_no_region, 1);
        assert!(r.send(902, peer, Bytes::from_static(b"x"), Instant::now()));
        r.set_map(map(&[902], port));
        assert_eq!(r.conns.keys().copied().collect::<Vec<_>>(), vec![902]);
        r.close_all();
        assert!(r.conns.is_empty());
        assert_eq!(r.home(), None);
    }
}
