//! Relay connections, one per region: the home region's kept open (and marked preferred),
//! others opened on demand when a peer lives there and closed after 60 s without a write
//! (docs/protocols.md §3.9). Each connection is a `relay::client::RelayClient` actor
//! trying the region's nodes in order (after a node goes silent or refuses, the next
//! attempt goes to the region's next node); its events are forwarded, tagged with the
//! region, into one bounded channel the engine reads. Every lost connection is counted
//! by its reason (`relay_dead_silent`, …), every move to another node of a region too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use netbase::reasons::Counts;
use proto::relaymap::RelayMap;
use proto::{NodePrivate, NodePublic, RegionId};
use relay::client::{DisconnectReason, RelayClient, RelayClientConfig, RelayEvent, RelayTarget};
use tokio::sync::mpsc;

/// A non-home connection with no write for this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// Depth of the merged event channel.
const EVENT_QUEUE: usize = 1024;

struct Conn {
    client: RelayClient,
    /// Stops with the connection.
    _forwarder: tokio_util::task::AbortOnDropHandle<()>,
    last_write: Instant,
    connected: bool,
    /// The node address of the last connection that came up.
    node: Option<SocketAddr>,
}

/// Counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayCounters {
    pub sent: u64,
    /// Sends dropped: no such region in the map, or the connection's queue was full.
    pub dropped_no_region: u64,
    pub dropped_queue_full: u64,
    pub opened: u64,
    pub closed_idle: u64,
    /// Connections lost (or attempts failed), by reason.
    pub lost: Counts<DisconnectReason>,
    /// A region's connection came back up on another of its nodes than before.
    pub node_changes: u64,
}

impl RelayCounters {
    /// Connections lost for `reason`.
    pub fn lost(&self, reason: DisconnectReason) -> u64 {
        self.lost.get(reason)
    }

    /// Every counter by name (`relay_sent`, `relay_dead_silent`, …), each even at zero.
    pub fn named(&self) -> impl Iterator<Item = (String, u64)> {
        let fixed = [
            ("relay_sent", self.sent),
            ("relay_dropped_no_region", self.dropped_no_region),
            ("relay_dropped_queue_full", self.dropped_queue_full),
            ("relay_opened", self.opened),
            ("relay_closed_idle", self.closed_idle),
            ("relay_node_changes", self.node_changes),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let lost: Vec<(String, u64)> = self
            .lost
            .iter()
            .map(|(label, n)| (format!("relay_{label}"), n))
            .collect();
        fixed.into_iter().chain(lost)
    }
}

/// The set of relay connections.
pub struct Relays {
    key: NodePrivate,
    map: RelayMap,
    home: Option<RegionId>,
    conns: BTreeMap<RegionId, Conn>,
    last_heard: BTreeMap<RegionId, Instant>,
    events_tx: mpsc::Sender<(RegionId, RelayEvent)>,
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
fn targets(map: &RelayMap, region: RegionId) -> Vec<RelayTarget> {
    map.regions
        .get(&region.get())
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
    pub fn new(key: NodePrivate) -> (Self, mpsc::Receiver<(RegionId, RelayEvent)>) {
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
            let before = old.regions.get(&region.get()).and_then(|r| r.nodes.first());
            let now = self
                .map
                .regions
                .get(&region.get())
                .and_then(|r| r.nodes.first());
            before == now && now.is_some()
        });
        if let Some(h) = self.home {
            self.ensure(h);
        }
    }

    pub fn map(&self) -> &RelayMap {
        &self.map
    }

    pub fn home(&self) -> Option<RegionId> {
        self.home
    }

    /// Makes `region` the home: connected, marked preferred; the old home unmarked.
    pub fn set_home(&mut self, region: RegionId) {
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

    fn ensure(&mut self, region: RegionId) -> bool {
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
        tracing::info!(region = %region, "relay connection opened");
        self.counters.opened += 1;
        self.conns.insert(
            region,
            Conn {
                client,
                _forwarder: tokio_util::task::AbortOnDropHandle::new(forwarder),
                last_write: Instant::now(),
                connected: false,
                node: None,
            },
        );
        true
    }

    /// Sends `payload` to `dst` through `region`, opening the connection if needed.
    pub fn send(
        &mut self,
        region: RegionId,
        dst: NodePublic,
        payload: Bytes,
        now: Instant,
    ) -> bool {
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
    pub fn note_event(&mut self, region: RegionId, ev: &RelayEvent, now: Instant) {
        match ev {
            RelayEvent::Connected { remote, .. } => {
                let mut previous = None;
                if let Some(c) = self.conns.get_mut(&region) {
                    c.connected = true;
                    previous = c.node.replace(*remote).filter(|p| p != remote);
                }
                match previous {
                    Some(previous) => {
                        self.counters.node_changes += 1;
                        // Same message as a first connect (tests and people grep for it),
                        // plus the node it left.
                        tracing::info!(region = %region, addr = %remote, moved_from = %previous, "relay connected");
                    }
                    None => tracing::info!(region = %region, addr = %remote, "relay connected"),
                }
                self.last_heard.insert(region, now);
            }
            RelayEvent::Disconnected {
                reason,
                error,
                retry_in,
            } => {
                if let Some(c) = self.conns.get_mut(&region) {
                    c.connected = false;
                }
                self.counters.lost.add(*reason);
                tracing::info!(region = %region, %reason, %error, ?retry_in, "relay disconnected");
            }
            _ => {
                self.last_heard.insert(region, now);
            }
        }
    }

    /// When a frame last arrived from `region`.
    pub fn last_heard(&self, region: RegionId) -> Option<Instant> {
        self.last_heard.get(&region).copied()
    }

    /// Whether the connection to `region` is up.
    pub fn connected(&self, region: RegionId) -> bool {
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

    fn region(id: i32) -> RegionId {
        RegionId::new(id).expect("a region ID is positive")
    }
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
        r.set_home(region(901));
        assert_eq!(r.counters.opened, 1);
        let peer = NodePrivate::generate().public();
        let t0 = Instant::now();
        // A peer homed elsewhere: that region is opened on demand.
        assert!(r.send(region(902), peer, Bytes::from_static(b"x"), t0));
        assert_eq!(r.counters.opened, 2);
        assert!(r.send(region(902), peer, Bytes::from_static(b"y"), t0));
        assert_eq!(r.counters.opened, 2, "one connection per region");
        r.close_idle(t0 + IDLE_CLOSE / 2);
        assert_eq!(r.counters.closed_idle, 0);
        r.close_idle(t0 + IDLE_CLOSE + Duration::from_secs(1));
        assert_eq!(r.counters.closed_idle, 1, "902 closed");
        assert_eq!(
            r.conns.keys().copied().collect::<Vec<_>>(),
            vec![region(901)]
        );
        // Writing to it again opens it again.
        assert!(r.send(region(902), peer, Bytes::from_static(b"z"), t0));
        assert_eq!(r.counters.opened, 3);
    }

    #[tokio::test]
    async fn unknown_regions_are_counted_and_regions_that_leave_the_map_are_closed() {
        let (mut r, _events) = Relays::new(NodePrivate::generate());
        let port = closed_port();
        r.set_map(map(&[901, 902], port));
        r.set_home(region(901));
        let peer = NodePrivate::generate().public();
        assert!(!r.send(region(999), peer, Bytes::from_static(b"x"), Instant::now()));
        assert_eq!(r.counters.dropped_no_region, 1);
        assert!(r.send(region(902), peer, Bytes::from_static(b"x"), Instant::now()));
        r.set_map(map(&[902], port));
        assert_eq!(
            r.conns.keys().copied().collect::<Vec<_>>(),
            vec![region(902)]
        );
        r.close_all();
        assert!(r.conns.is_empty());
        assert_eq!(r.home(), None);
    }

    #[tokio::test]
    async fn lost_connections_are_counted_by_reason_and_a_move_to_another_node_is_noted() {
        let (mut r, _events) = Relays::new(NodePrivate::generate());
        r.set_map(map(&[901], closed_port()));
        r.set_home(region(901));
        let now = Instant::now();
        let server_key = NodePrivate::generate().public();
        let a: SocketAddr = "203.0.113.10:443".parse().unwrap();
        let b: SocketAddr = "203.0.113.11:443".parse().unwrap();
        r.note_event(
            region(901),
            &RelayEvent::Connected {
                server_key,
                remote: a,
            },
            now,
        );
        assert!(r.connected(region(901)));
        r.note_event(
            region(901),
            &RelayEvent::Disconnected {
                reason: DisconnectReason::DeadSilent,
                error: "nothing heard".into(),
                retry_in: Duration::from_millis(100),
            },
            now,
        );
        assert!(!r.connected(region(901)));
        r.note_event(
            region(901),
            &RelayEvent::Connected {
                server_key,
                remote: b,
            },
            now,
        );
        assert_eq!(r.counters.lost(DisconnectReason::DeadSilent), 1);
        assert_eq!(r.counters.lost(DisconnectReason::Closed), 0);
        assert_eq!(r.counters.node_changes, 1);
        let named: BTreeMap<String, u64> = r.counters.named().collect();
        assert_eq!(named["relay_dead_silent"], 1);
        assert_eq!(named["relay_node_changes"], 1);
        // Every reason is listed, even at zero.
        for reason in <DisconnectReason as netbase::reasons::Reason>::ALL {
            assert!(named.contains_key(&format!("relay_{}", reason.as_str())));
        }
        // Back on the same node: not a move.
        r.note_event(
            region(901),
            &RelayEvent::Connected {
                server_key,
                remote: b,
            },
            now,
        );
        assert_eq!(r.counters.node_changes, 1);
    }
}
