//! A simulated network for the node: several [`Node`]s, a relay region, NAT routers and
//! links with seeded loss and delay, all in one thread with simulated time. Each node's
//! outbox is carried by the simulation (UDP through the NAT models, relay sends through
//! the relay), so whole scenarios — relay first then direct, a direct path dying and
//! coming back, a peer claiming another's disco key — run in milliseconds and the same
//! seed gives the same network.
//!
//! WireGuard (boringtun) keeps its own clock inside; the scenarios here stay well within
//! its rekey times, so only the node's own timers matter, and those run on simulated time.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proto::tailcfg::Node as NetmapNode;
use proto::{DiscoPrivate, NodePrivate, NodePublic, RegionId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::core::Node;

/// The one relay region of the simulation.
fn region() -> RegionId {
    RegionId::new(1).expect("positive")
}

/// How a device reaches the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// A public address, no NAT and no firewall.
    Public,
    /// Endpoint-independent mapping (one public port for every destination), inbound
    /// only from addresses it has sent to: an "easy" NAT, direct paths work.
    EndpointIndependent,
    /// A new public port per destination: a "hard" NAT; two of them never go direct.
    EndpointDependent,
    /// UDP does not pass at all: only the relay works.
    UdpBlocked,
}

const PORT: u16 = 41641;

/// One simulated device.
struct Device {
    node: Node,
    nat: Nat,
    /// Its own (private, behind a NAT) socket address.
    local: SocketAddr,
    /// Its router's public address.
    wan: IpAddr,
    /// The public port for each destination (one entry for every destination under an
    /// endpoint-independent NAT).
    mappings: BTreeMap<Option<SocketAddr>, u16>,
    /// Remote addresses it sent to (inbound filter of a NAT).
    contacted: BTreeSet<SocketAddr>,
    /// The tunnel address.
    ip: Ipv4Addr,
    /// IP packets the node delivered to the host.
    delivered: Vec<Vec<u8>>,
    /// Whether UDP to and from it is cut (a dead direct path), besides the NAT.
    udp_cut: bool,
    next_port: u16,
}

/// A packet on its way.
#[derive(Debug)]
enum Wire {
    /// UDP between public addresses.
    Udp {
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
    },
    /// Through the relay to `to`, from `from`.
    Relay {
        from: NodePublic,
        to: NodePublic,
        data: Vec<u8>,
    },
}

#[derive(Debug)]
struct InFlight {
    due: Instant,
    seq: u64,
    wire: Wire,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    // Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// Counts of what the network carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub udp: u64,
    pub relay: u64,
    pub udp_filtered: u64,
    pub lost: u64,
}

/// The simulated network.
pub struct Net {
    now: Instant,
    devices: Vec<Device>,
    by_key: BTreeMap<NodePublic, usize>,
    flight: BinaryHeap<InFlight>,
    seq: u64,
    rng: StdRng,
    /// Loss per packet, 0..1.
    loss: f64,
    /// One-way delay: fixed part and random extra.
    delay: (Duration, Duration),
    next_wg_tick: Instant,
    pub carried: Carried,
    /// Times a node's next timer was already due right after its timers ran (a timer
    /// firing in a loop would show here).
    pub stuck_timers: u64,
}

impl Net {
    /// A network with `nats.len()` devices (device `i` has tunnel address 100.64.0.i+1),
    /// each with an allow-all packet filter.
    pub fn new(seed: u64, nats: &[Nat]) -> Net {
        let mut net = Net::without_filters(seed, nats);
        for i in 0..net.devices.len() {
            net.give_filter(
                i,
                Some(serde_json::json!([{
                    "SrcIPs": ["*"],
                    "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]
                }])),
            );
        }
        net
    }

    /// A network whose devices have no packet filter yet (as right after they start).
    pub fn without_filters(seed: u64, nats: &[Nat]) -> Net {
        let start = Instant::now();
        let mut net = Net {
            now: start,
            devices: Vec::new(),
            by_key: BTreeMap::new(),
            flight: BinaryHeap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            loss: 0.0,
            delay: (Duration::from_millis(10), Duration::ZERO),
            next_wg_tick: start,
            carried: Carried::default(),
            stuck_timers: 0,
        };
        for (i, nat) in nats.iter().enumerate() {
            let n = u8::try_from(i + 1).expect("a few devices");
            let me = NodePrivate::generate();
            let key = me.public();
            let node = Node::new(me, DiscoPrivate::generate(), start);
            let local = match nat {
                Nat::Public => SocketAddr::from(([203, 0, 113, n], PORT)),
                _ => SocketAddr::from(([192, 168, n, 2], PORT)),
            };
            net.by_key.insert(key, i);
            net.devices.push(Device {
                node,
                nat: *nat,
                local,
                wan: IpAddr::from([198, 51, 100, n]),
                mappings: BTreeMap::new(),
                contacted: BTreeSet::new(),
                ip: Ipv4Addr::new(100, 64, 0, n),
                delivered: Vec::new(),
                udp_cut: false,
                next_port: 50_000,
            });
        }
        for i in 0..net.devices.len() {
            let eps = net.endpoints_of(i);
            let now = net.now;
            let d = &mut net.devices[i];
            d.node.set_relay_regions([region()]);
            d.node.set_ipv6(false, false);
            d.node.set_endpoints(eps, now);
        }
        net.give_netmaps(|_, n| n);
        net
    }

    /// Device `i` gets `filter` as its `PacketFilter` (a network starts with allow-all).
    pub fn give_filter(&mut self, i: usize, filter: Option<serde_json::Value>) {
        let d = &mut self.devices[i];
        let local = vec![proto::IpNet::from(IpAddr::V4(d.ip))];
        d.node.set_filter(filter.as_ref(), local);
    }

    pub fn with_loss(mut self, loss: f64, delay: Duration, jitter: Duration) -> Net {
        self.loss = loss;
        self.delay = (delay, jitter);
        self
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn key(&self, i: usize) -> NodePublic {
        self.devices[i].node.public_key()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.devices[i].node
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.devices[i].node
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.devices[i].ip
    }

    /// What device `i` would learn as its endpoints (what STUN would tell it, and its own
    /// address).
    fn endpoints_of(&self, i: usize) -> Vec<SocketAddr> {
        let d = &self.devices[i];
        match d.nat {
            Nat::Public => vec![d.local],
            // The port STUN saw; under an endpoint-dependent NAT it is good for the STUN
            // server only.
            Nat::EndpointIndependent => vec![
                SocketAddr::new(d.wan, 40_000 + u16::from(d.ip.octets()[3])),
                d.local,
            ],
            Nat::EndpointDependent => vec![SocketAddr::new(d.wan, 45_000), d.local],
            Nat::UdpBlocked => vec![d.local],
        }
    }

    /// Every device gets a network map of all the others, each entry passed through
    /// `edit(viewer, entry)` first.
    pub fn give_netmaps(&mut self, edit: impl Fn(usize, NetmapNode) -> NetmapNode) {
        let entries: Vec<NetmapNode> = (0..self.devices.len())
            .map(|i| {
                let d = &self.devices[i];
                NetmapNode {
                    id: i64::try_from(i + 1).unwrap_or(0),
                    key: d.node.public_key(),
                    disco_key: Some(d.node.disco_public()),
                    name: format!("dev{i}.sim."),
                    addresses: vec![proto::IpNet::from(IpAddr::V4(d.ip))].into(),
                    endpoints: self.endpoints_of(i).iter().map(|e| e.to_string()).collect(),
                    home_derp: 1,
                    ..Default::default()
                }
            })
            .collect();
        let now = self.now;
        for i in 0..self.devices.len() {
            let map: Vec<NetmapNode> = entries
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, e)| edit(i, e.clone()))
                .collect();
            self.devices[i].node.apply_netmap(&map, now);
        }
        self.after_input_all();
    }

    /// Cuts (or restores) UDP to and from device `i`.
    pub fn cut_udp(&mut self, i: usize, cut: bool) {
        self.devices[i].udp_cut = cut;
    }

    /// Device `from` sends an IP packet to tunnel address `to` with `payload`.
    pub fn send_ip(&mut self, from: usize, to: Ipv4Addr, payload: &[u8]) {
        let src = self.devices[from].ip;
        self.send_raw_ip(from, src, to, payload);
    }

    /// Device `from` sends an IP packet with any source address.
    pub fn send_raw_ip(&mut self, from: usize, src: Ipv4Addr, to: Ipv4Addr, payload: &[u8]) {
        let packet = ipv4(src, to, payload);
        let now = self.now;
        self.devices[from].node.handle_tun_packet(&packet, now);
        self.after_input(from);
    }

    /// The packets device `i` delivered to its host so far (and forgets them).
    pub fn take_delivered(&mut self, i: usize) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.devices[i].delivered)
    }

    /// Whether `i`'s path to `j` is direct (and trusted: no relay copy).
    pub fn direct(&self, i: usize, j: usize) -> bool {
        let k = self.key(j);
        self.devices[i].node.peers().get(&k).is_some_and(|p| {
            let t = p.path().send_targets(self.now);
            t.udp.is_some() && !t.relay
        })
    }

    /// Runs the network for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(next) = self.next_event().filter(|t| *t <= end) {
            self.now = self.now.max(next);
            self.step();
        }
        self.now = end;
        self.step();
    }

    /// Runs until `cond` holds or `limit` passes; true when it held.
    pub fn run_until(&mut self, limit: Duration, mut cond: impl FnMut(&mut Net) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.run_for(Duration::from_millis(50).min(end - self.now));
        }
        cond(self)
    }

    fn next_event(&self) -> Option<Instant> {
        let packets = self.flight.peek().map(|p| p.due);
        let timers = self
            .devices
            .iter()
            .filter_map(|d| d.node.next_peer_wake())
            .min();
        [packets, timers, Some(self.next_wg_tick)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Delivers what is due, runs the timers that are due, carries out the outboxes.
    fn step(&mut self) {
        while self.flight.peek().is_some_and(|p| p.due <= self.now) {
            let Some(p) = self.flight.pop() else { break };
            self.arrive(p.wire);
        }
        if self.now >= self.next_wg_tick {
            let now = self.now;
            for d in &mut self.devices {
                d.node.tick_wireguard(now);
            }
            self.next_wg_tick = now + Duration::from_millis(250);
        }
        self.after_input_all();
    }

    fn after_input_all(&mut self) {
        for i in 0..self.devices.len() {
            self.after_input(i);
        }
    }

    /// What the engine does after every input: held packets, disco timers, the outbox.
    fn after_input(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.devices[i].node;
        node.flush_stalled(now);
        node.drive_peers(now);
        if node.next_peer_wake().is_some_and(|t| t <= now) {
            self.stuck_timers += 1;
        }
        self.carry_out(i);
    }

    fn carry_out(&mut self, i: usize) {
        let key = self.key(i);
        let mut sends: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut relays = Vec::new();
        {
            let d = &mut self.devices[i];
            let out = &mut d.node.out;
            sends.extend(out.direct.drain(..));
            while let Some(run) = out.udp.pop_any() {
                for seg in run.buf.chunks(run.segment) {
                    sends.push((run.to, seg.to_vec()));
                }
                out.udp.recycle(run.buf);
            }
            relays.extend(out.relay.drain(..));
            d.delivered.append(&mut out.tun);
            out.api_pongs.clear();
        }
        for (to, data) in sends {
            self.send_udp(i, to, data);
        }
        for (r, to, data) in relays {
            assert_eq!(r, region(), "only one region exists");
            self.launch(Wire::Relay {
                from: key,
                to,
                data: data.to_vec(),
            });
        }
    }

    /// UDP from device `i` to `to`: through its NAT, onto the wire.
    fn send_udp(&mut self, i: usize, to: SocketAddr, data: Vec<u8>) {
        let d = &mut self.devices[i];
        if d.udp_cut || d.nat == Nat::UdpBlocked {
            self.carried.udp_filtered += 1;
            return;
        }
        let from = match d.nat {
            Nat::Public => d.local,
            Nat::EndpointIndependent | Nat::EndpointDependent => {
                let dest = (d.nat == Nat::EndpointDependent).then_some(to);
                let port = match d.mappings.get(&dest) {
                    Some(p) => *p,
                    None => {
                        let p = if d.nat == Nat::EndpointIndependent {
                            40_000 + u16::from(d.ip.octets()[3])
                        } else {
                            d.next_port += 1;
                            d.next_port
                        };
                        d.mappings.insert(dest, p);
                        p
                    }
                };
                SocketAddr::new(d.wan, port)
            }
            Nat::UdpBlocked => return,
        };
        d.contacted.insert(to);
        self.launch(Wire::Udp { from, to, data });
    }

    fn launch(&mut self, wire: Wire) {
        let data = match &wire {
            Wire::Udp { data, .. } | Wire::Relay { data, .. } => data,
        };
        // WireGuard resends a lost handshake message on its own clock, which is real
        // time, not the simulation's: handshake messages are never lost here (data and
        // disco messages are).
        let handshake = data.len() >= 4 && (1..=3).contains(&data[0]) && data[1..4] == [0, 0, 0];
        if self.loss > 0.0 && !handshake && self.rng.gen_bool(self.loss) {
            self.carried.lost += 1;
            return;
        }
        let jitter = if self.delay.1.is_zero() {
            Duration::ZERO
        } else {
            self.delay.1.mul_f64(self.rng.gen::<f64>())
        };
        self.seq += 1;
        self.flight.push(InFlight {
            due: self.now + self.delay.0 + jitter,
            seq: self.seq,
            wire,
        });
    }

    fn arrive(&mut self, wire: Wire) {
        let now = self.now;
        match wire {
            Wire::Relay { from, to, data } => {
                let Some(&j) = self.by_key.get(&to) else {
                    return;
                };
                self.carried.relay += 1;
                self.devices[j]
                    .node
                    .handle_relay(region(), from, &data, now);
                self.after_input(j);
            }
            Wire::Udp { from, to, data } => {
                let Some(j) = self.owner_of(to) else {
                    self.carried.udp_filtered += 1;
                    return;
                };
                let d = &self.devices[j];
                let allowed = !d.udp_cut
                    && match d.nat {
                        Nat::Public => true,
                        Nat::EndpointIndependent | Nat::EndpointDependent => {
                            d.contacted.contains(&from)
                        }
                        Nat::UdpBlocked => false,
                    };
                if !allowed {
                    self.carried.udp_filtered += 1;
                    return;
                }
                self.carried.udp += 1;
                self.devices[j].node.handle_udp(&data, from, now);
                self.after_input(j);
            }
        }
    }

    /// The device a public address leads to.
    fn owner_of(&self, to: SocketAddr) -> Option<usize> {
        self.devices.iter().position(|d| match d.nat {
            Nat::Public => d.local == to,
            _ => d.wan == to.ip() && d.mappings.values().any(|p| *p == to.port()),
        })
    }
}

/// A minimal IPv4 packet (UDP protocol number, no checksum) from `src` to `dst`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(20 + payload.len()).expect("small packet");
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// (source, destination, payload) of a delivered packet.
fn parts(p: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    let a = |r: std::ops::Range<usize>| {
        let b: [u8; 4] = p[r].try_into().expect("4 bytes");
        Ipv4Addr::from(b)
    };
    (a(12..16), a(16..20), p[20..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::super::filter::Deny;
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Sends `payload` from `a` to `b` until `b` delivers it (a sender that retries, as
    /// TCP would), within `limit`. True when it arrived.
    fn deliver(net: &mut Net, a: usize, b: usize, payload: &[u8], limit: Duration) -> bool {
        let to = net.ip(b);
        let end = net.now() + limit;
        while net.now() < end {
            net.send_ip(a, to, payload);
            let got = net.run_until(Duration::from_millis(500), |n| {
                n.devices[b].delivered.iter().any(|p| parts(p).2 == payload)
            });
            if got {
                return true;
            }
        }
        false
    }

    #[test]
    fn relay_first_then_direct() {
        let mut net = Net::new(1, &[Nat::EndpointIndependent, Nat::EndpointIndependent]);
        // The first packet goes as soon as there is a handshake: through the relay.
        assert!(deliver(&mut net, 0, 1, b"first", 2 * S));
        assert!(net.carried.relay > 0, "{:?}", net.carried);
        // With traffic flowing, disco finds the direct path.
        let direct = net.run_until(10 * S, |n| {
            n.send_ip(0, n.ip(1), b"more");
            n.direct(0, 1) && n.direct(1, 0)
        });
        assert!(direct, "no direct path: {:?}", net.carried);
        let before = net.carried;
        assert!(deliver(&mut net, 0, 1, b"over udp", 2 * S));
        assert!(deliver(&mut net, 1, 0, b"and back", 2 * S));
        assert_eq!(
            net.carried.relay, before.relay,
            "data went through the relay"
        );
        assert_eq!(net.stuck_timers, 0);
    }

    #[test]
    fn two_hard_nats_stay_on_the_relay_and_work() {
        let mut net = Net::new(2, &[Nat::EndpointDependent, Nat::EndpointDependent]);
        assert!(deliver(&mut net, 0, 1, b"hello", 2 * S));
        net.run_until(15 * S, |n| {
            n.send_ip(0, n.ip(1), b"traffic");
            false
        });
        assert!(!net.direct(0, 1));
        assert!(deliver(&mut net, 1, 0, b"still works", 2 * S));
    }

    #[test]
    fn a_dead_direct_path_falls_back_to_the_relay_and_returns() {
        let mut net = Net::new(3, &[Nat::Public, Nat::EndpointIndependent]);
        assert!(deliver(&mut net, 0, 1, b"warm up", 2 * S));
        assert!(net.run_until(10 * S, |n| {
            n.send_ip(0, n.ip(1), b"xxxx");
            n.direct(0, 1)
        }));
        // The direct path dies (UDP cut at device 1): traffic goes on through the relay
        // within the trust window and the silence check.
        net.cut_udp(1, true);
        let start = net.now();
        assert!(deliver(&mut net, 0, 1, b"during the outage", 12 * S));
        let outage = net.now() - start;
        assert!(outage <= 12 * S, "took {outage:?}");
        assert!(!net.direct(0, 1));
        // UDP comes back: direct again.
        net.cut_udp(1, false);
        assert!(net.run_until(20 * S, |n| {
            n.send_ip(0, n.ip(1), b"yyyy");
            n.direct(0, 1)
        }));
        assert_eq!(net.stuck_timers, 0);
    }

    #[test]
    fn udp_blocked_peers_use_the_relay() {
        let mut net = Net::new(4, &[Nat::UdpBlocked, Nat::Public]);
        assert!(deliver(&mut net, 0, 1, b"aaaa", 2 * S));
        assert!(deliver(&mut net, 1, 0, b"bbbb", 2 * S));
        assert_eq!(net.carried.udp, 0);
        assert!(!net.direct(1, 0));
    }

    #[test]
    fn a_disco_key_claimed_by_two_peers_is_nobodys() {
        let mut net = Net::new(5, &[Nat::Public, Nat::Public, Nat::Public]);
        // Device 0's map says device 2 has device 1's disco key.
        let disco_of_1 = net.node(1).disco_public();
        net.give_netmaps(|viewer, mut n| {
            if viewer == 0 && n.id == 3 {
                n.disco_key = Some(disco_of_1);
            }
            n
        });
        assert_eq!(net.node(0).counters.disco_key_conflicts, 1);
        // Data still flows (WireGuard does not need disco), through the relay: 0 ignores
        // every disco message signed with that key, so device 2 cannot steer 0's path to
        // device 1, and no path to 1 is confirmed.
        assert!(deliver(&mut net, 0, 1, b"relay only", 2 * S));
        net.run_until(12 * S, |n| {
            n.send_ip(0, n.ip(1), b"xxxx");
            false
        });
        assert!(!net.direct(0, 1));
        assert!(net.node(0).counters.disco_unknown_sender > 0);
        // The key belongs to neither claimant: device 2 gets no direct path from 0 either,
        // and its data flows through the relay.
        assert!(deliver(&mut net, 0, 2, b"to the other claimant", 2 * S));
        assert!(!net.direct(0, 2));
        // Devices that are not in the dispute go direct as usual.
        assert!(net.run_until(12 * S, |n| {
            n.send_ip(1, n.ip(2), b"xxxx");
            n.direct(1, 2)
        }));
    }

    #[test]
    fn a_packet_from_an_address_the_peer_does_not_own_is_dropped() {
        let mut net = Net::new(6, &[Nat::Public, Nat::Public, Nat::Public]);
        assert!(deliver(&mut net, 1, 0, b"hello", 2 * S));
        net.take_delivered(0);
        // Device 1 sends with device 2's address as the source.
        let (ip0, ip2) = (net.ip(0), net.ip(2));
        net.send_raw_ip(1, ip2, ip0, b"spoofed");
        net.run_for(S);
        assert!(net.take_delivered(0).is_empty());
        assert_eq!(
            net.node(0).counters.wg_drop.get("source not allowed"),
            Some(&1)
        );
    }

    /// A UDP payload (the sim's packets are UDP) with its ports in front.
    fn udp_payload(sport: u16, dport: u16, body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(body);
        p
    }

    fn delivered_bodies(net: &mut Net, i: usize) -> Vec<Vec<u8>> {
        net.take_delivered(i).iter().map(|p| parts(p).2).collect()
    }

    #[test]
    fn the_packet_filter_lets_in_what_its_rules_allow_and_counts_the_rest() {
        let mut net = Net::new(9, &[Nat::Public, Nat::Public, Nat::Public]);
        // Device 0 may be reached by device 1 on UDP 53 only; device 2 not at all.
        net.give_filter(
            0,
            Some(serde_json::json!([{
                "SrcIPs": [net.ip(1).to_string()],
                "DstPorts": [{"IP": net.ip(0).to_string(), "Ports": {"First": 53, "Last": 53}}],
                "IPProto": [17]
            }])),
        );
        let ip0 = net.ip(0);
        let ok = udp_payload(4000, 53, b"dns");
        assert!(deliver(&mut net, 1, 0, &ok, 2 * S));
        net.take_delivered(0);
        net.send_ip(1, ip0, &udp_payload(4000, 80, b"web"));
        net.send_ip(2, ip0, &udp_payload(4000, 53, b"dns from 2"));
        net.run_for(2 * S);
        assert!(delivered_bodies(&mut net, 0).is_empty());
        let denied = |net: &Net, j: usize| net.node(0).peers().get(&net.key(j)).unwrap().denied();
        assert_eq!((denied(&net, 1), denied(&net, 2)), (1, 1));
        assert_eq!(net.node(0).counters.filter_denied.get(Deny::NoRule), 2);
        // The filter does not bind device 0's own sending: its packets reach device 2.
        assert!(deliver(&mut net, 0, 2, &udp_payload(1, 2, b"out"), 2 * S));
    }

    #[test]
    fn replies_to_flows_a_device_opened_pass_its_deny_all_filter() {
        let mut net = Net::new(10, &[Nat::Public, Nat::Public]);
        net.give_filter(1, Some(serde_json::json!([])));
        let ip1 = net.ip(1);
        // Device 0 cannot open anything to device 1 ...
        net.send_ip(0, ip1, &udp_payload(53, 5000, b"unasked"));
        net.run_for(2 * S);
        assert!(delivered_bodies(&mut net, 1).is_empty());
        // ... but device 1's query gets its answer, and only from the port it asked.
        assert!(deliver(
            &mut net,
            1,
            0,
            &udp_payload(5000, 53, b"query"),
            2 * S
        ));
        net.send_ip(0, ip1, &udp_payload(53, 5000, b"answer"));
        net.send_ip(0, ip1, &udp_payload(54, 5000, b"other port"));
        net.run_for(S);
        let got = delivered_bodies(&mut net, 1);
        assert_eq!(got, vec![udp_payload(53, 5000, b"answer")]);
    }

    #[test]
    fn until_a_filter_arrives_nothing_comes_in() {
        let mut net = Net::without_filters(11, &[Nat::Public, Nat::Public]);
        assert_eq!(net.node(1).filter().rule_count(), (None, 0));
        let ip1 = net.ip(1);
        net.give_filter(1, None);
        net.send_ip(0, ip1, &udp_payload(1, 2, b"too early"));
        net.run_for(2 * S);
        assert!(delivered_bodies(&mut net, 1).is_empty());
        assert!(net.node(1).counters.filter_denied.get(Deny::NoFilterYet) > 0);
        // null keeps what is there (nothing); the first filter opens it.
        net.give_filter(1, Some(serde_json::Value::Null));
        net.give_filter(1, Some(serde_json::json!([{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}])));
        assert!(deliver(&mut net, 0, 1, &udp_payload(1, 2, b"now"), 2 * S));
    }

    #[test]
    fn an_expired_peer_is_cut_off_both_ways() {
        let mut net = Net::new(12, &[Nat::Public, Nat::Public]);
        assert!(deliver(
            &mut net,
            0,
            1,
            &udp_payload(1, 2, b"before"),
            2 * S
        ));
        // Device 1's map marks device 0 expired.
        let k0 = net.key(0);
        net.give_netmaps(|viewer, mut n| {
            n.expired = viewer == 1 && n.key == k0;
            n
        });
        net.take_delivered(1);
        let (ip0, ip1) = (net.ip(0), net.ip(1));
        net.send_ip(0, ip1, &udp_payload(1, 2, b"after"));
        net.send_ip(1, ip0, &udp_payload(2, 1, b"to expired"));
        net.run_for(2 * S);
        assert!(delivered_bodies(&mut net, 1).is_empty());
        assert!(delivered_bodies(&mut net, 0).is_empty());
        assert!(net.node(1).counters.filter_denied.get(Deny::PeerExpired) > 0);
        assert_eq!(net.node(1).counters.send_peer_expired, 1);
    }

    #[test]
    fn packets_are_held_until_a_path_exists_then_sent() {
        let mut net = Net::new(7, &[Nat::UdpBlocked, Nat::UdpBlocked]);
        // No relay region known yet and no UDP: nothing can go.
        net.node_mut(0).set_relay_regions([]);
        let ip1 = net.ip(1);
        net.send_ip(0, ip1, b"held");
        net.run_for(S);
        assert!(net.node(0).counters.send_no_path > 0);
        assert!(net.take_delivered(1).is_empty());
        // The relay map arrives: the held handshake goes, and with it the packet.
        net.node_mut(0).set_relay_regions([region()]);
        assert!(net.run_until(3 * S, |n| n.devices[1]
            .delivered
            .iter()
            .any(|p| parts(p).2 == b"held")));
    }

    #[test]
    fn the_peer_cap_holds_in_a_network_map() {
        let mut net = Net::new(8, &[Nat::Public, Nat::Public]);
        let extra: Vec<NetmapNode> = (0..super::super::peers::MAX_PEERS + 5)
            .map(|i| NetmapNode {
                id: 1000 + i as i64,
                key: NodePrivate::generate().public(),
                ..Default::default()
            })
            .collect();
        let map: Vec<NetmapNode> = std::iter::once(NetmapNode {
            id: 2,
            key: net.key(1),
            disco_key: Some(net.node(1).disco_public()),
            addresses: vec![proto::IpNet::from(IpAddr::V4(net.ip(1)))].into(),
            home_derp: 1,
            ..Default::default()
        })
        .chain(extra)
        .collect();
        let now = net.now();
        let change = net.node_mut(0).apply_netmap(&map, now);
        assert_eq!(change.over_limit, 6);
        assert_eq!(net.node(0).peers().len(), super::super::peers::MAX_PEERS);
        // The known peer came first and kept its place: traffic to it flows.
        assert!(deliver(&mut net, 0, 1, b"within the cap", 2 * S));
    }

    /// Many seeds, random NATs, loss and delay: no packet reaches the wrong device or
    /// carries a source its sender does not own, every message to a reachable peer
    /// arrives (its sender retrying, as TCP would), and no timer fires in a loop.
    #[test]
    fn randomized_networks_keep_the_invariants() {
        let kinds = [
            Nat::Public,
            Nat::EndpointIndependent,
            Nat::EndpointDependent,
            Nat::UdpBlocked,
        ];
        for seed in 0..24u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let n = rng.gen_range(2..=3);
            let nats: Vec<Nat> = (0..n)
                .map(|_| kinds[rng.gen_range(0..kinds.len())])
                .collect();
            let loss = [0.0, 0.01, 0.05][rng.gen_range(0..3)];
            let mut net = Net::new(seed, &nats).with_loss(
                loss,
                Duration::from_millis(rng.gen_range(1..40)),
                Duration::from_millis(rng.gen_range(0..20)),
            );
            for round in 0..6 {
                let a = rng.gen_range(0..n);
                let b = (a + rng.gen_range(1..n)) % n;
                let msg = format!("seed {seed} round {round} {a}->{b}").into_bytes();
                assert!(
                    deliver(&mut net, a, b, &msg, 20 * S),
                    "seed {seed} ({nats:?}, loss {loss}): {msg:?} never arrived; {:?}",
                    net.carried
                );
                net.run_for(Duration::from_millis(rng.gen_range(0..3000)));
                for d in 0..n {
                    for p in net.take_delivered(d) {
                        let (src, dst, _) = parts(&p);
                        assert_eq!(dst, net.ip(d), "seed {seed}: delivered to the wrong device");
                        assert!(
                            (0..n).any(|s| s != d && net.ip(s) == src),
                            "seed {seed}: a source nobody owns"
                        );
                    }
                }
            }
            assert_eq!(net.stuck_timers, 0, "seed {seed}: a timer fired in a loop");
        }
    }
}
