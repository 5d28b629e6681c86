//! One peer as the engine sees it: its WireGuard session, its disco key and sealing box,
//! and its path-selection state (from the `disco` crate), plus what the netmap says about
//! it (addresses, endpoints, home region). It turns disco decisions into datagrams to
//! send; the engine does the sending.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use disco::path::{Action, PathState, Via as PathVia};
use disco::{DiscoBox, Message};
use proto::tailcfg::Node;
use proto::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic};

use crate::wg::WgPeer;

/// Where a disco message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Udp(SocketAddr),
    Relay(i32),
}

/// Something the engine must send for this peer.
#[derive(Debug)]
pub enum PeerEvent {
    SendUdp {
        to: SocketAddr,
        packet: Vec<u8>,
    },
    /// Through the relay region (0 = the peer's home region).
    SendRelay {
        region: i32,
        packet: Vec<u8>,
    },
}

/// Why a disco message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoDrop {
    Bad,
    CallMeMaybeNotViaRelay,
}

/// Replies waiting to be sent (pongs), bounded.
const MAX_PENDING: usize = 64;
/// WireGuard datagrams held while the peer has no path at all (no home region known
/// yet, no direct address): sent as soon as one appears. A handshake initiation and a
/// few packets behind it are all that is worth keeping.
pub const MAX_STALLED: usize = 16;

pub struct Peer {
    pub key: NodePublic,
    pub index: u32,
    pub wg: WgPeer,
    pub disco_key: Option<DiscoPublic>,
    disco_box: Option<DiscoBox>,
    pub path: PathState,
    pub allowed_ips: Vec<String>,
    pub home_region: i32,
    pub name: String,
    /// Pongs to send, and where.
    pending: VecDeque<(Via, Message)>,
    /// Transaction IDs of pings sent for the local API (`agentctl ping`), bounded.
    pub api_pings: std::collections::BTreeSet<disco::TxId>,
    /// Their answers, for the engine to collect.
    pub api_pongs: VecDeque<(disco::TxId, Via)>,
    /// When we last sent a WireGuard handshake initiation.
    pub last_initiation: Option<Instant>,
    /// Path selection just found a direct path.
    pub went_direct: bool,
    /// Datagrams waiting for a path (bounded by [`MAX_STALLED`]).
    pub stalled: VecDeque<bytes::Bytes>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("key", &self.key.short())
            .field("home_region", &self.home_region)
            .finish_non_exhaustive()
    }
}

fn endpoints(node: &Node) -> Vec<SocketAddr> {
    node.endpoints
        .iter()
        .filter_map(|e| e.parse::<SocketAddr>().ok())
        // `[::ffff:a.b.c.d]:p` is an IPv4 endpoint: it goes out on the IPv4 socket.
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .collect()
}

impl Peer {
    pub fn new(
        node: &Node,
        me: &NodePrivate,
        disco: &DiscoPrivate,
        index: u32,
        now: Instant,
    ) -> Self {
        let mut path = PathState::new(rand::random(), now);
        path.set_endpoints(&endpoints(node), now);
        path.set_relay(node.home_region() > 0);
        Peer {
            key: node.key,
            index,
            wg: WgPeer::new(me, &node.key, index),
            disco_key: node.disco_key,
            disco_box: node.disco_key.map(|d| DiscoBox::new(disco, &d)),
            path,
            allowed_ips: node.routes().to_vec(),
            home_region: node.home_region(),
            name: node.name.clone(),
            pending: VecDeque::new(),
            stalled: VecDeque::new(),
            last_initiation: None,
            went_direct: false,
            api_pings: Default::default(),
            api_pongs: VecDeque::new(),
        }
    }

    /// A newer netmap entry for this peer: the WireGuard session is kept.
    pub fn update(&mut self, node: &Node, disco: &DiscoPrivate, now: Instant) {
        if node.disco_key != self.disco_key {
            // A restarted peer: new disco key, so old paths and pings mean nothing.
            self.disco_key = node.disco_key;
            self.disco_box = node.disco_key.map(|d| DiscoBox::new(disco, &d));
            self.path = PathState::new(rand::random(), now);
        }
        let eps = endpoints(node);
        let known = self.path.candidates();
        let changed = node.home_region() != self.home_region
            || eps.iter().any(|e| !known.iter().any(|(a, _)| a == e));
        self.path.set_endpoints(&eps, now);
        self.path.set_relay(node.home_region() > 0);
        self.allowed_ips = node.routes().to_vec();
        self.home_region = node.home_region();
        if changed {
            // A new way to reach the peer: look for a direct path again at once.
            self.path.rediscover(now);
        }
        self.name = node.name.clone();
    }

    /// Holds a datagram that found no path; false (and nothing held) when full.
    pub fn stall(&mut self, datagram: bytes::Bytes) -> bool {
        if self.stalled.len() >= MAX_STALLED {
            return false;
        }
        self.stalled.push_back(datagram);
        true
    }

    /// Whether the peer's disco has something to send now (see `PathState::on_data_sent`).
    pub fn on_data_sent(&mut self, now: Instant) -> bool {
        self.path.on_data_sent(now)
    }

    /// Where a datagram goes now: (UDP address, also via relay).
    pub fn send_targets(&self, now: Instant) -> (Option<SocketAddr>, bool) {
        let t = self.path.send_targets(now);
        (t.udp, t.relay || t.udp.is_none())
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.path.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.path.handle_timeout(now);
    }

    /// Opens and handles a disco message from this peer.
    pub fn handle_disco(
        &mut self,
        pkt: &[u8],
        via: Via,
        relay_src: Option<NodePublic>,
        now: Instant,
    ) -> Result<(), DiscoDrop> {
        let Some(bx) = &self.disco_box else {
            return Err(DiscoDrop::Bad);
        };
        let msg = bx.open(pkt).map_err(|_| DiscoDrop::Bad)?;
        tracing::debug!(peer = %self.key.short(), ?via, ?msg, "disco received");
        match msg {
            Message::Ping { tx_id, .. } => {
                let src = match via {
                    Via::Udp(a) => a,
                    // Over a relay the "source" is the relay's magic address.
                    Via::Relay(r) => {
                        SocketAddr::from(([127, 3, 3, 40], u16::try_from(r).unwrap_or(0)))
                    }
                };
                // The pong goes back the way the ping came.
                if self.pending.len() < MAX_PENDING {
                    self.pending.push_back((via, Message::Pong { tx_id, src }));
                }
                let pv = match via {
                    Via::Udp(a) => PathVia::Udp(a),
                    Via::Relay(r) => PathVia::Relay(r),
                };
                self.path.on_ping(pv, tx_id, now);
            }
            Message::Pong { tx_id, src } => {
                if self.api_pings.remove(&tx_id) {
                    // An answer to `agentctl ping`: the engine reports it.
                    if self.api_pongs.len() < MAX_PENDING {
                        self.api_pongs.push_back((tx_id, via));
                    }
                } else if let Via::Udp(from) = via {
                    self.path.on_pong(from, tx_id, src, now);
                }
            }
            Message::CallMeMaybe { endpoints } => {
                // Honoured only over a relay, from the node that owns this disco key.
                if !matches!(via, Via::Relay(_)) || relay_src != Some(self.key) {
                    return Err(DiscoDrop::CallMeMaybeNotViaRelay);
                }
                self.path.on_call_me_maybe(&endpoints, now);
            }
            _ => {}
        }
        Ok(())
    }

    /// A sealed disco ping with `tx_id` (for `agentctl ping`); None without a disco key.
    pub fn seal_ping(
        &mut self,
        my_disco: &DiscoPublic,
        my_node: &NodePublic,
        tx_id: disco::TxId,
    ) -> Option<Vec<u8>> {
        let bx = self.disco_box.as_ref()?;
        if self.api_pings.len() >= MAX_PENDING {
            // Oldest-first is not tracked; a full set means pings went unanswered.
            self.api_pings.clear();
        }
        self.api_pings.insert(tx_id);
        Some(bx.seal(
            my_disco,
            &Message::Ping {
                tx_id,
                node_key: Some(*my_node),
                padding: 0,
            },
        ))
    }

    /// The next datagram to send for this peer: pongs first, then what path selection
    /// asks for (pings, call-me-maybe).
    pub fn poll_event(
        &mut self,
        my_disco: &DiscoPublic,
        my_node: &NodePublic,
        my_endpoints: &[SocketAddr],
    ) -> Option<PeerEvent> {
        let bx = self.disco_box.as_ref()?;
        if let Some((via, msg)) = self.pending.pop_front() {
            let packet = bx.seal(my_disco, &msg);
            return Some(match via {
                Via::Udp(to) => PeerEvent::SendUdp { to, packet },
                Via::Relay(region) => PeerEvent::SendRelay { region, packet },
            });
        }
        loop {
            match self.path.poll_action()? {
                Action::SendPing { to, tx_id } => {
                    let msg = Message::Ping {
                        tx_id,
                        node_key: Some(*my_node),
                        padding: 0,
                    };
                    return Some(PeerEvent::SendUdp {
                        to,
                        packet: bx.seal(my_disco, &msg),
                    });
                }
                Action::SendCallMeMaybe => {
                    let msg = Message::CallMeMaybe {
                        endpoints: my_endpoints.to_vec(),
                    };
                    return Some(PeerEvent::SendRelay {
                        region: 0,
                        packet: bx.seal(my_disco, &msg),
                    });
                }
                Action::PathChanged(p) => {
                    self.went_direct |= matches!(p, disco::path::Path::Direct(_));
                    tracing::info!(peer = %self.key.short(), name = %self.name, path = %p, "path changed");
                }
            }
        }
    }
}
