//! The lab: a set of network namespaces wired into an internet, NAT routers and LANs, plus
//! the programs and services running in them — all owned by one [`Lab`] value and removed
//! when it drops, also while a failing test unwinds.
//!
//! Topology and addresses (all inside the lab's namespaces; nothing leaves the machine):
//!
//! ```text
//!   server 203.0.113.x ─┐                      ┌─ wan 198.51.100.x  router ── lan 10.k.0.1/24 ── hosts 10.k.0.10+
//!   public 192.0.2.x  ──┼── internet 192.0.2.1 ┤
//!   (veth or emulated)  ┘                      └─ wan … (a router behind a router's LAN: double NAT)
//! ```
//!
//! The internet namespace is a plain router. Each node attached to it gets a point-to-point
//! link (`<ip> peer 192.0.2.1`), a veth or an emulated link with delay and loss
//! ([`crate::link`]). A router's LAN is the bridge `lan` in its namespace; hosts hang off it
//! by veth. Router kinds are in [`crate::router`].
//!
//! Not here: namespace plumbing ([`crate::netns`]), process handling ([`crate::process`]).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{IoContext, LabError, Result};
use crate::link::{EmuLink, LinkParams};
use crate::netfilter::{self, Blocked, PacketCounter};
use crate::netns;
use crate::process::{self, ChildGuard, ChildIo, LogDir};
use crate::router::{self, Nat, RouterSpec};
use crate::upnp;

/// The internet router's address, the gateway of every node attached to the internet.
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The port of the lab's own STUN responder on [`INTERNET_IP`] (see [`Lab::internet_stun`]).
pub const INTERNET_STUN_PORT: u16 = 3478;

/// First host number handed out in each address pool (.1–.9 stay free for tests).
const FIRST_HOST: u8 = 10;

/// Last host number handed out in each pool.
const LAST_HOST: u8 = 250;

/// How long a miniupnpd gets to pass its STUN check and start serving.
const MINIUPNPD_START: Duration = Duration::from_secs(15);

/// Labs created by this process, for unique namespace names.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A namespace in the lab: a host, a router, the internet. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    name: String,
    ns: String,
}

impl Node {
    /// The name the test gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace's name (for `ip netns exec`).
    pub fn ns(&self) -> &str {
        &self.ns
    }
}

/// A host with one address: a server or public host on the internet, or a LAN host.
#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace.
    pub node: Node,
    /// Its address (public for servers, private for LAN hosts).
    pub ip: Ipv4Addr,
    /// Its global IPv6 address, on the LAN of a router built with [`RouterSpec::ipv6`].
    pub ip6: Option<Ipv6Addr>,
    /// The emulated link to the internet, if it has one.
    pub uplink: Option<EmuLink>,
}

impl std::ops::Deref for Host {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

/// A router between a WAN (internet or an upstream router's LAN) and its own LAN.
#[derive(Debug, Clone)]
pub struct Router {
    /// The namespace.
    pub node: Node,
    /// Address on `wan`: public when attached to the internet, private behind another router.
    pub wan_ip: Ipv4Addr,
    /// Address on `lan`: the LAN hosts' gateway.
    pub lan_ip: Ipv4Addr,
    /// The LAN subnet's network address.
    pub lan_net: Ipv4Addr,
    /// The LAN subnet's prefix length.
    pub lan_prefix: u8,
    /// The routed IPv6 /64 of the LAN, when built with [`RouterSpec::ipv6`]; its `::1`
    /// is the router.
    pub lan_net6: Option<Ipv6Addr>,
    /// What kind of router it is.
    pub spec: RouterSpec,
    /// The emulated link to the internet, if it has one.
    pub uplink: Option<EmuLink>,
}

impl Router {
    /// The LAN subnet, e.g. `10.3.0.0/24`.
    pub fn lan_subnet(&self) -> String {
        format!("{}/{}", self.lan_net, self.lan_prefix)
    }
}

impl std::ops::Deref for Router {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

/// A background thread serving a socket (STUN responder, UDP echo) until the lab drops.
#[derive(Debug)]
struct Service {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Mutable bookkeeping of a lab.
#[derive(Debug, Default)]
struct State {
    /// Namespaces made, in creation order.
    namespaces: Vec<String>,
    /// Node names in use.
    names: BTreeSet<String>,
    /// Per namespace: the next interface number.
    interfaces: BTreeMap<String, u32>,
    /// Next host number per public pool.
    next_server: u8,
    next_public: u8,
    next_wan: u8,
    /// Next LAN number `k` (`10.k.0.0/24`).
    next_lan: u8,
    /// Per router namespace: its LAN number and next host number.
    lans: BTreeMap<String, (u8, u8)>,
    /// Programs the lab itself runs (link emulators, miniupnpd).
    children: Vec<ChildGuard>,
    /// Socket services.
    services: Vec<Service>,
    /// Namespaces whose `labctl` table exists.
    labctl: BTreeSet<String>,
    /// Next packet counter number.
    next_counter: u32,
}

/// A network lab. Everything it creates is removed when it drops.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    dir: Arc<LogDir>,
    internet: Node,
    internet_stun: Mutex<Option<SocketAddrV4>>,
    state: Mutex<State>,
}

/// Whether `program` is on PATH (or in the sbin folders, which a non-login root may lack).
/// The Debian package that has `program`, for the line saying what to install.
fn package_of(program: &str) -> &'static str {
    match program {
        "conntrack" => "conntrack",
        "miniupnpd" => "miniupnpd-nftables",
        "upnpc" => "miniupnpc",
        "iperf3" => "iperf3",
        "setpriv" => "util-linux",
        "groupadd" => "passwd",
        "systemd-analyze" => "systemd",
        _ => "its Debian package",
    }
}

pub fn have_program(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .any(|dir| dir.join(program).is_file())
}

impl Lab {
    /// Makes an empty lab with its internet namespace.
    ///
    /// Fails with [`LabError::Unavailable`] when this machine cannot host a lab (not root,
    /// iproute2 or nftables missing, namespaces refused). Also removes namespaces left by
    /// earlier runs that crashed.
    pub fn new() -> Result<Lab> {
        Lab::new_requiring(&[])
    }

    /// Like [`Lab::new`], and also fails with [`LabError::Unavailable`] when one of
    /// `programs` (e.g. `miniupnpd`, `upnpc`) is not installed.
    pub fn new_requiring(programs: &[&str]) -> Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            return Err(LabError::Unavailable(
                "the lab needs root (network namespaces, nftables): run the tests with sudo"
                    .to_string(),
            ));
        }
        for (program, package) in [
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("ping", "iputils-ping"),
        ]
        .into_iter()
        .chain(programs.iter().map(|p| (*p, package_of(p))))
        {
            if !have_program(program) {
                return Err(LabError::Unavailable(format!(
                    "`{program}` is not installed (install {package}; `sudo .ci/run --deps-only` installs everything the tests need)"
                )));
            }
        }
        netns::remove_stale();
        let id = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}{}-{id}-", netns::NS_PREFIX, std::process::id());
        let lab = Lab {
            internet: Node {
                name: "internet".to_string(),
                ns: format!("{prefix}internet"),
            },
            prefix,
            dir: LogDir::new()?,
            internet_stun: Mutex::new(None),
            state: Mutex::new(State {
                next_server: FIRST_HOST,
                next_public: FIRST_HOST,
                next_wan: FIRST_HOST,
                next_lan: 1,
                ..State::default()
            }),
        };
        let internet = lab.add_node("internet").map_err(|e| match e {
            LabError::Command { .. } | LabError::Io { .. } => {
                LabError::Unavailable(format!("cannot create a network namespace: {e}"))
            }
            other => other,
        })?;
        netns::sysctl(
            &internet.ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.send_redirects", "0"),
            ],
        )?;
        Ok(lab)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The prefix of every namespace name in this lab (`agl<pid>-<n>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespaces this lab has made.
    pub fn namespaces(&self) -> Vec<String> {
        self.state().namespaces.clone()
    }

    /// The folder with this lab's logs and config files.
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The internet router.
    pub fn internet(&self) -> &Node {
        &self.internet
    }

    /// Process ids of the programs the lab itself runs (link emulators, miniupnpd).
    pub fn own_pids(&self) -> Vec<u32> {
        self.state().children.iter().map(ChildGuard::pid).collect()
    }

    // ----- nodes and links -----

    /// Makes a bare namespace (loopback up, nothing else). `name`: letters, digits, `-`, `_`.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        let valid = !name.is_empty()
            && name.len() <= 24
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(LabError::Invalid(format!(
                "bad node name {name:?}: use 1–24 letters, digits, '-' or '_'"
            )));
        }
        if !self.state().names.insert(name.to_string()) {
            return Err(LabError::Invalid(format!("node {name:?} already exists")));
        }
        let ns = format!("{}{name}", self.prefix);
        if let Err(e) = netns::create(&ns) {
            self.state().names.remove(name);
            return Err(e);
        }
        self.state().namespaces.push(ns.clone());
        // Namespaces inherit the root's IPv4 settings; strict reverse-path filtering would
        // drop legitimate asymmetric lab traffic.
        netns::sysctl(
            &ns,
            &[
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                // No duplicate address detection: a lab address is unique by construction,
                // and a tentative link-local address stalls neighbour discovery for IPv6
                // packets sent in the first second.
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        Ok(Node {
            name: name.to_string(),
            ns,
        })
    }

    /// A fresh interface name in `node`'s namespace: `<base><n>` (names are per namespace).
    fn next_interface(&self, node: &Node, base: &str) -> String {
        let mut state = self.state();
        let n = state.interfaces.entry(node.ns.clone()).or_insert(0);
        let name = format!("{base}{n}");
        *n += 1;
        name
    }

    /// Links `a` and `b` with a veth pair; `a_cidr`/`b_cidr` (e.g. `10.9.0.1/24`) are
    /// assigned and the interfaces brought up. Returns the interface names.
    pub fn link(&self, a: &Node, b: &Node, a_cidr: &str, b_cidr: &str) -> Result<(String, String)> {
        let a_if = self.next_interface(a, "eth");
        let b_if = self.next_interface(b, "eth");
        netns::ip(
            &a.ns,
            &[
                "link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &b.ns,
            ],
        )?;
        for (node, dev, cidr) in [(a, &a_if, a_cidr), (b, &b_if, b_cidr)] {
            netns::ip(&node.ns, &["addr", "add", cidr, "dev", dev])?;
            netns::ip(&node.ns, &["link", "set", dev, "up"])?;
        }
        Ok((a_if, b_if))
    }

    /// Links `a` (address `a_ip`) and `b` (address `b_ip`) point-to-point through a link
    /// emulator with `params`. Each side gets a route to the other's address.
    pub fn link_emulated(
        &self,
        a: &Node,
        a_ip: Ipv4Addr,
        b: &Node,
        b_ip: Ipv4Addr,
        params: LinkParams,
    ) -> Result<EmuLink> {
        let a_if = self.next_interface(a, "emu");
        let b_if = self.next_interface(b, "emu");
        let link = self.start_emulator(a, &a_if, b, &b_if, params)?;
        for (node, dev, ip, peer) in [(a, &a_if, a_ip, b_ip), (b, &b_if, b_ip, a_ip)] {
            netns::ip(
                &node.ns,
                &[
                    "addr",
                    "add",
                    &ip.to_string(),
                    "peer",
                    &format!("{peer}/32"),
                    "dev",
                    dev,
                ],
            )?;
            netns::ip(&node.ns, &["link", "set", dev, "up"])?;
        }
        Ok(link)
    }

    /// Starts `linkemu` with TUN device `dev_a` in `a` and `dev_b` in `b`.
    fn start_emulator(
        &self,
        a: &Node,
        dev_a: &str,
        b: &Node,
        dev_b: &str,
        params: LinkParams,
    ) -> Result<EmuLink> {
        let mut cmd = Command::new(process::linkemu()?);
        cmd.args([
            "--ns-a", &a.ns, "--dev-a", dev_a, "--ns-b", &b.ns, "--dev-b", dev_b,
        ])
        .args(["--delay-us", &params.delay_us().to_string()])
        .args(["--loss-ppm", &params.loss_ppm().to_string()]);
        let label = format!("linkemu-{}-{}", a.name, b.name);
        let mut guard = ChildGuard::spawn(&self.dir, &label, cmd, ChildIo::Control)?;
        let control = guard.take_control();
        self.state().children.push(guard);
        let (stdin, stdout) = control
            .ok_or_else(|| LabError::Invalid("linkemu started without pipes".to_string()))?;
        let link = EmuLink::new(dev_a.to_string(), dev_b.to_string(), stdin, stdout)?;
        for (node, dev) in [(a, dev_a), (b, dev_b)] {
            // Room for bursts between the kernel and the emulator (the TUN default is 500).
            netns::ip(
                &node.ns,
                &[
                    "link",
                    "set",
                    "dev",
                    dev,
                    "txqueuelen",
                    "10000",
                    "multicast",
                    "off",
                ],
            )?;
            // The lab speaks unicast IPv4 on its links; no IGMP, router solicitations or MLD
            // muddying a link's packet counts.
            let key = format!("net.ipv6.conf.{dev}.disable_ipv6");
            netns::sysctl(&node.ns, &[(key.as_str(), "1")])?;
        }
        Ok(link)
    }

    /// Adds a route in `node`: `dest` (CIDR or `default`) via `gateway`.
    pub fn add_route(&self, node: &Node, dest: &str, gateway: Ipv4Addr) -> Result<()> {
        netns::ip(
            &node.ns,
            &["route", "add", dest, "via", &gateway.to_string()],
        )
    }

    /// Turns on IPv4 forwarding in `node`.
    pub fn enable_forwarding(&self, node: &Node) -> Result<()> {
        netns::sysctl(&node.ns, &[("net.ipv4.ip_forward", "1")])
    }

    /// Connects `node` to the internet with address `ip` on interface `node_if`, by veth or
    /// an emulated link, and makes the internet its default route.
    fn attach_to_internet(
        &self,
        node: &Node,
        ip: Ipv4Addr,
        node_if: &str,
        emulated: Option<LinkParams>,
    ) -> Result<(String, Option<EmuLink>)> {
        let inet = &self.internet;
        let (inet_if, link) = match emulated {
            None => {
                let inet_if = self.next_interface(inet, "eth");
                netns::ip(
                    &inet.ns,
                    &[
                        "link", "add", &inet_if, "type", "veth", "peer", "name", node_if, "netns",
                        &node.ns,
                    ],
                )?;
                (inet_if, None)
            }
            Some(params) => {
                let inet_if = self.next_interface(inet, "emu");
                let link = self.start_emulator(inet, &inet_if, node, node_if, params)?;
                (inet_if, Some(link))
            }
        };
        let inet_ip = INTERNET_IP.to_string();
        netns::ip(
            &inet.ns,
            &[
                "addr",
                "add",
                &inet_ip,
                "peer",
                &format!("{ip}/32"),
                "dev",
                &inet_if,
            ],
        )?;
        netns::ip(&inet.ns, &["link", "set", &inet_if, "up"])?;
        netns::ip(
            &node.ns,
            &[
                "addr",
                "add",
                &ip.to_string(),
                "peer",
                &format!("{inet_ip}/32"),
                "dev",
                node_if,
            ],
        )?;
        netns::ip(&node.ns, &["link", "set", node_if, "up"])?;
        netns::ip(&node.ns, &["route", "add", "default", "via", &inet_ip])?;
        Ok((inet_if, link))
    }

    /// Gives router `node` (LAN number `lan`, WAN `wan` on the internet, whose other end
    /// is the internet's `inet_if`) routed IPv6:
    /// `2001:db8:ffff:<lan>::/64` on the WAN link, `2001:db8:<lan>::/64` on the LAN, which
    /// the internet routes to it. Returns the LAN prefix.
    fn route_ipv6(&self, node: &Node, inet_if: &str, lan: u8) -> Result<Ipv6Addr> {
        let lan = u16::from(lan);
        let (_, wan_router) =
            self.ipv6_uplink(node, "wan", inet_if, [0x2001, 0xdb8, 0xffff, lan])?;
        netns::sysctl(&node.ns, &[("net.ipv6.conf.all.forwarding", "1")])?;
        let lan_net = Ipv6Addr::new(0x2001, 0xdb8, lan, 0, 0, 0, 0, 0);
        ipv6_address(
            &node.ns,
            "lan",
            Ipv6Addr::new(0x2001, 0xdb8, lan, 0, 0, 0, 0, 1),
            None,
        )?;
        netns::ip(
            &self.internet.ns,
            &[
                "-6",
                "route",
                "add",
                &format!("{lan_net}/64"),
                "via",
                &wan_router.to_string(),
            ],
        )?;
        Ok(lan_net)
    }

    /// IPv6 on the link between the internet's `inet_if` and `node`'s `node_if`: the /64
    /// `net`, `::1` the internet's end (which forwards IPv6), `::2` the node's, with its
    /// default route through `::1`. Returns both addresses.
    fn ipv6_uplink(
        &self,
        node: &Node,
        node_if: &str,
        inet_if: &str,
        net: [u16; 4],
    ) -> Result<(Ipv6Addr, Ipv6Addr)> {
        let [a, b, c, d] = net;
        let inet6 = Ipv6Addr::new(a, b, c, d, 0, 0, 0, 1);
        let node6 = Ipv6Addr::new(a, b, c, d, 0, 0, 0, 2);
        netns::sysctl(&self.internet.ns, &[("net.ipv6.conf.all.forwarding", "1")])?;
        ipv6_address(&self.internet.ns, inet_if, inet6, None)?;
        ipv6_address(&node.ns, node_if, node6, Some(inet6))?;
        Ok((inet6, node6))
    }

    /// Connects `node` to `router`'s LAN bridge on interface `node_if`; returns its
    /// address, and its IPv6 address when the LAN has IPv6.
    fn attach_to_lan(
        &self,
        router: &Router,
        node: &Node,
        node_if: &str,
    ) -> Result<(Ipv4Addr, Option<Ipv6Addr>)> {
        let (ip, host) = {
            let mut state = self.state();
            let (lan, next) = state
                .lans
                .get_mut(&router.node.ns)
                .ok_or_else(|| LabError::Invalid(format!("{} is not a lab router", router.name)))?;
            if *next > LAST_HOST {
                return Err(LabError::Invalid(format!("LAN of {} is full", router.name)));
            }
            let ip = Ipv4Addr::new(10, *lan, 0, *next);
            *next += 1;
            (ip, ip.octets()[3])
        };
        let port = self.next_interface(&router.node, "p");
        netns::ip(
            &router.ns,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", node_if, "netns", &node.ns,
            ],
        )?;
        netns::ip(&router.ns, &["link", "set", &port, "master", "lan"])?;
        netns::ip(&router.ns, &["link", "set", &port, "up"])?;
        netns::ip(
            &node.ns,
            &[
                "addr",
                "add",
                &format!("{ip}/{}", router.lan_prefix),
                "dev",
                node_if,
            ],
        )?;
        netns::ip(&node.ns, &["link", "set", node_if, "up"])?;
        netns::ip(
            &node.ns,
            &["route", "add", "default", "via", &router.lan_ip.to_string()],
        )?;
        let ip6 = match router.lan_net6 {
            Some(net) => {
                let mut seg = net.segments();
                seg[7] = u16::from(host);
                let ip6 = Ipv6Addr::from(seg);
                seg[7] = 1;
                ipv6_address(&node.ns, node_if, ip6, Some(Ipv6Addr::from(seg)))?;
                Some(ip6)
            }
            _ => None,
        };
        Ok((ip, ip6))
    }

    /// Takes the next host number from a public pool.
    fn next_public_ip(&self, pool: fn(&mut State) -> &mut u8, base: [u8; 3]) -> Result<Ipv4Addr> {
        let mut state = self.state();
        let next = pool(&mut state);
        if *next > LAST_HOST {
            return Err(LabError::Invalid(format!(
                "address pool {}.{}.{}.0/24 is exhausted",
                base[0], base[1], base[2]
            )));
        }
        let ip = Ipv4Addr::new(base[0], base[1], base[2], *next);
        *next += 1;
        Ok(ip)
    }

    /// A server on the internet with the next address of 203.0.113.0/24 (relays, STUN, …).
    pub fn add_server(&self, name: &str) -> Result<Host> {
        self.add_internet_host(name, |s| &mut s.next_server, [203, 0, 113], None)
    }

    /// A server whose link to the internet has emulated delay and loss (`host.uplink`).
    pub fn add_server_with_link(&self, name: &str, params: LinkParams) -> Result<Host> {
        self.add_internet_host(name, |s| &mut s.next_server, [203, 0, 113], Some(params))
    }

    /// A server on the internet with the next address of 203.0.113.0/24 and, on the same
    /// plain veth, the IPv6 address `2001:db8:fffe:<n>::2` (`host.ip6`), where `n` is the
    /// last byte of its IPv4 address.
    pub fn add_server_with_ipv6(&self, name: &str) -> Result<Host> {
        let ip = self.next_public_ip(|s| &mut s.next_server, [203, 0, 113])?;
        let node = self.add_node(name)?;
        let dev = self.next_interface(&node, "eth");
        let (inet_if, uplink) = self.attach_to_internet(&node, ip, &dev, None)?;
        let n = u16::from(ip.octets()[3]);
        let (_, ip6) = self.ipv6_uplink(&node, &dev, &inet_if, [0x2001, 0xdb8, 0xfffe, n])?;
        Ok(Host {
            node,
            ip,
            ip6: Some(ip6),
            uplink,
        })
    }

    /// A host directly on the internet (no NAT) with the next address of 192.0.2.0/24.
    pub fn add_public_host(&self, name: &str) -> Result<Host> {
        self.add_internet_host(name, |s| &mut s.next_public, [192, 0, 2], None)
    }

    fn add_internet_host(
        &self,
        name: &str,
        pool: fn(&mut State) -> &mut u8,
        base: [u8; 3],
        emulated: Option<LinkParams>,
    ) -> Result<Host> {
        let ip = self.next_public_ip(pool, base)?;
        let node = self.add_node(name)?;
        let dev = self.next_interface(&node, "eth");
        let (_, uplink) = self.attach_to_internet(&node, ip, &dev, emulated)?;
        Ok(Host {
            node,
            ip,
            ip6: None,
            uplink,
        })
    }

    /// A host on `router`'s LAN (next address of its subnet, default route via the router).
    pub fn add_lan_host(&self, name: &str, router: &Router) -> Result<Host> {
        let node = self.add_node(name)?;
        let dev = self.next_interface(&node, "eth");
        let (ip, ip6) = self.attach_to_lan(router, &node, &dev)?;
        Ok(Host {
            node,
            ip,
            ip6,
            uplink: None,
        })
    }

    /// A router on the internet (WAN address from 198.51.100.0/24) with a fresh LAN.
    pub fn add_router(&self, name: &str, spec: RouterSpec) -> Result<Router> {
        self.build_router(name, spec, None)
    }

    /// A router whose WAN is on `upstream`'s LAN: two NAT routers in a row (a home router
    /// behind a carrier router) when both translate.
    pub fn add_router_behind(
        &self,
        name: &str,
        upstream: &Router,
        spec: RouterSpec,
    ) -> Result<Router> {
        self.build_router(name, spec, Some(upstream))
    }

    fn build_router(
        &self,
        name: &str,
        spec: RouterSpec,
        upstream: Option<&Router>,
    ) -> Result<Router> {
        if spec.ipv6 && (upstream.is_some() || spec.uplink.is_some()) {
            return Err(LabError::Invalid(
                "IPv6 routers attach straight to the internet over a plain veth".to_string(),
            ));
        }
        if upstream.is_some() && spec.uplink.is_some() {
            return Err(LabError::Invalid(
                "emulated uplinks connect to the internet only; put the delay on the upstream router"
                    .to_string(),
            ));
        }
        let node = self.add_node(name)?;
        netns::sysctl(
            &node.ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                // LAN traffic between bridge ports must not pass the router's forward chain.
                ("net.bridge.bridge-nf-call-iptables", "0"),
                ("net.bridge.bridge-nf-call-ip6tables", "0"),
                ("net.bridge.bridge-nf-call-arptables", "0"),
            ],
        )?;
        let lan = {
            let mut state = self.state();
            let lan = state.next_lan;
            if lan > LAST_HOST {
                return Err(LabError::Invalid("no LAN subnets left".to_string()));
            }
            state.next_lan += 1;
            state.lans.insert(node.ns.clone(), (lan, FIRST_HOST));
            lan
        };
        let lan_net = Ipv4Addr::new(10, lan, 0, 0);
        let lan_ip = Ipv4Addr::new(10, lan, 0, 1);
        let lan_prefix = 24;
        netns::ip(&node.ns, &["link", "add", "lan", "type", "bridge"])?;
        netns::ip(
            &node.ns,
            &[
                "addr",
                "add",
                &format!("{lan_ip}/{lan_prefix}"),
                "dev",
                "lan",
            ],
        )?;
        netns::ip(&node.ns, &["link", "set", "lan", "up"])?;
        let (wan_ip, uplink, inet_if) = match upstream {
            None => {
                let ip = self.next_public_ip(|s| &mut s.next_wan, [198, 51, 100])?;
                let (inet_if, link) = self.attach_to_internet(&node, ip, "wan", spec.uplink)?;
                (ip, link, Some(inet_if))
            }
            Some(up) => (self.attach_to_lan(up, &node, "wan")?.0, None, None),
        };
        let lan_net6 = match (spec.ipv6, inet_if) {
            (true, Some(inet_if)) => Some(self.route_ipv6(&node, &inet_if, lan)?),
            _ => None,
        };
        let router = Router {
            node,
            wan_ip,
            lan_ip,
            lan_net,
            lan_prefix,
            lan_net6,
            spec: spec.clone(),
            uplink,
        };
        if spec.nat == Nat::None {
            // A routed LAN: the upstream must know where it is.
            let upstream_node = upstream.map(|u| &u.node).unwrap_or(&self.internet);
            self.add_route(upstream_node, &router.lan_subnet(), wan_ip)?;
        }
        netns::nft(&router.ns, &router::ruleset(&spec))?;
        if spec.upnp {
            self.start_miniupnpd(&router)?;
        }
        Ok(router)
    }

    /// Runs miniupnpd on `router`'s LAN and waits until it serves.
    fn start_miniupnpd(&self, router: &Router) -> Result<()> {
        if !have_program("miniupnpd") {
            return Err(LabError::Unavailable(
                "miniupnpd is not installed (Debian package miniupnpd-nftables)".to_string(),
            ));
        }
        let stun = self.internet_stun()?;
        netns::nft(&router.ns, upnp::TABLES)?;
        let uuid_tail = u32::from(router.lan_net.octets()[1]);
        let conf = self
            .dir
            .path()
            .join(format!("miniupnpd-{}.conf", router.name));
        std::fs::write(
            &conf,
            upnp::config(router.lan_net, router.lan_prefix, stun, uuid_tail),
        )
        .ctx(|| format!("cannot write {}", conf.display()))?;
        let pid_file = self
            .dir
            .path()
            .join(format!("miniupnpd-{}.pid", router.name));
        let mut cmd = netns::exec_command(&router.ns, "miniupnpd");
        cmd.arg("-f").arg(&conf).arg("-d").arg("-P").arg(&pid_file);
        let label = format!("miniupnpd-{}", router.name);
        let mut guard = ChildGuard::spawn(&self.dir, &label, cmd, ChildIo::Logged)?;
        let ready = guard.wait_for_output(upnp::READY_LINE, MINIUPNPD_START);
        self.state().children.push(guard);
        ready.map(drop)
    }

    // ----- programs -----

    /// A command running `program` inside `node` (`ip netns exec`); add arguments and
    /// environment, then give it to [`Lab::spawn_command`] or run it yourself.
    pub fn command(&self, node: &Node, program: impl AsRef<OsStr>) -> Command {
        netns::exec_command(&node.ns, program)
    }

    /// Starts `program` with `args` in `node`; stdout and stderr go to the lab's log folder
    /// and are printed if the test fails. Dropping the guard stops the program.
    pub fn spawn<I, S>(
        &self,
        node: &Node,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let base = Path::new(program)
            .file_name()
            .unwrap_or(program)
            .to_string_lossy()
            .into_owned();
        let mut cmd = self.command(node, program);
        cmd.args(args);
        self.spawn_command(&format!("{}-{base}", node.name), cmd)
    }

    /// Starts a prepared command (e.g. from [`Lab::command`]) with its output captured under
    /// `label`.
    pub fn spawn_command(&self, label: &str, cmd: Command) -> Result<ChildGuard> {
        ChildGuard::spawn(&self.dir, label, cmd, ChildIo::Logged)
    }

    /// Runs `program` with `args` in `node` to completion and returns its output, whatever
    /// its exit status.
    pub fn exec<I, S>(&self, node: &Node, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(node, program);
        cmd.args(args).stdin(std::process::Stdio::null());
        cmd.output()
            .ctx(|| format!("cannot run {}", netns::describe(&cmd)))
    }

    /// Runs `program` with `args` in `node`; fails unless it exits 0. Returns its stdout.
    pub fn exec_ok<I, S>(&self, node: &Node, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(node, program);
        cmd.args(args);
        let out = netns::run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    // ----- sockets and services -----

    /// Runs `f` on a thread inside `node`'s namespace. Sockets it creates belong to the
    /// namespace and can be used from any thread afterwards (also by tokio: `from_std`).
    pub fn run_in<T, F>(&self, node: &Node, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        netns::in_netns(&node.ns, f)
    }

    /// A UDP socket bound to `addr` inside `node`.
    pub fn udp_bind(&self, node: &Node, addr: impl Into<SocketAddr>) -> Result<UdpSocket> {
        let addr = addr.into();
        self.run_in(node, move || UdpSocket::bind(addr))?
            .ctx(|| format!("cannot bind UDP {addr} in {}", node.name))
    }

    /// A TCP listener bound to `addr` inside `node`.
    pub fn tcp_listen(&self, node: &Node, addr: impl Into<SocketAddr>) -> Result<TcpListener> {
        let addr = addr.into();
        self.run_in(node, move || TcpListener::bind(addr))?
            .ctx(|| format!("cannot listen on TCP {addr} in {}", node.name))
    }

    /// A TCP connection from inside `node` to `addr`.
    pub fn tcp_connect(
        &self,
        node: &Node,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let addr = addr.into();
        self.run_in(node, move || TcpStream::connect_timeout(&addr, timeout))?
            .ctx(|| format!("cannot connect to TCP {addr} from {}", node.name))
    }

    fn start_service(
        &self,
        label: &str,
        socket: UdpSocket,
        serve: fn(&UdpSocket, &AtomicBool),
    ) -> Result<()> {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .ctx(|| format!("cannot configure {label}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(label.to_string())
            .spawn(move || serve(&socket, &flag))
            .ctx(|| format!("cannot start {label}"))?;
        self.state().services.push(Service {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Starts a STUN responder on `addr` in `node` (served by a thread until the lab drops).
    /// Returns the bound address.
    pub fn start_stun(&self, node: &Node, addr: impl Into<SocketAddr>) -> Result<SocketAddr> {
        let socket = self.udp_bind(node, addr)?;
        let bound = socket
            .local_addr()
            .ctx(|| "cannot read STUN socket address".to_string())?;
        self.start_service(&format!("stun-{}", node.name), socket, crate::stun::serve)?;
        Ok(bound)
    }

    /// Starts a UDP echo responder on `addr` in `node`. Returns the bound address.
    pub fn start_udp_echo(&self, node: &Node, addr: impl Into<SocketAddr>) -> Result<SocketAddr> {
        let socket = self.udp_bind(node, addr)?;
        let bound = socket
            .local_addr()
            .ctx(|| "cannot read echo socket address".to_string())?;
        self.start_service(&format!("echo-{}", node.name), socket, serve_echo)?;
        Ok(bound)
    }

    /// The lab's STUN responder at 192.0.2.1:3478 in the internet namespace, started on
    /// first use (miniupnpd's "am I behind NAT?" check uses it).
    pub fn internet_stun(&self) -> Result<SocketAddrV4> {
        let mut stun = self.internet_stun.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(addr) = *stun {
            return Ok(addr);
        }
        let addr = SocketAddrV4::new(INTERNET_IP, INTERNET_STUN_PORT);
        self.start_stun(&self.internet, addr)?;
        *stun = Some(addr);
        Ok(addr)
    }

    // ----- traffic controls -----

    fn ensure_labctl(&self, node: &Node) -> Result<()> {
        let mut state = self.state();
        if !state.labctl.contains(&node.ns) {
            netfilter::install(&node.ns)?;
            state.labctl.insert(node.ns.clone());
        }
        Ok(())
    }

    /// Drops UDP between `a` and `b` (both directions) as seen in `node`, until
    /// [`Lab::unblock_udp`].
    pub fn block_udp(&self, node: &Node, a: impl Into<IpAddr>, b: impl Into<IpAddr>) -> Result<()> {
        self.ensure_labctl(node)?;
        netfilter::block(&node.ns, Blocked::Udp, a.into(), b.into())
    }

    /// Lets UDP between `a` and `b` through `node` again.
    pub fn unblock_udp(
        &self,
        node: &Node,
        a: impl Into<IpAddr>,
        b: impl Into<IpAddr>,
    ) -> Result<()> {
        self.ensure_labctl(node)?;
        netfilter::unblock(&node.ns, Blocked::Udp, a.into(), b.into())
    }

    /// Drops all traffic between `a` and `b` (IPv4 or IPv6) as seen in `node`.
    pub fn block_all(&self, node: &Node, a: impl Into<IpAddr>, b: impl Into<IpAddr>) -> Result<()> {
        self.ensure_labctl(node)?;
        netfilter::block(&node.ns, Blocked::All, a.into(), b.into())
    }

    /// Lets all traffic between `a` and `b` through `node` again.
    pub fn unblock_all(
        &self,
        node: &Node,
        a: impl Into<IpAddr>,
        b: impl Into<IpAddr>,
    ) -> Result<()> {
        self.ensure_labctl(node)?;
        netfilter::unblock(&node.ns, Blocked::All, a.into(), b.into())
    }

    /// Counts UDP packets from `src` to `dst` passing through (or sent or received by)
    /// `node`, as addressed on the wire there.
    pub fn count_udp(&self, node: &Node, src: Ipv4Addr, dst: Ipv4Addr) -> Result<PacketCounter> {
        self.count_packets(
            node,
            &format!("meta l4proto udp ip saddr {src} ip daddr {dst}"),
        )
    }

    /// Counts packets matching an nftables expression (e.g. `udp dport 3478`) in `node`.
    pub fn count_packets(&self, node: &Node, filter: &str) -> Result<PacketCounter> {
        self.ensure_labctl(node)?;
        let name = {
            let mut state = self.state();
            state.next_counter += 1;
            format!("c{}", state.next_counter)
        };
        PacketCounter::install(&node.ns, &name, filter)
    }
}

/// Adds `ip`/64 on `dev` in `ns` without duplicate address detection (usable at once),
/// and, with a `gateway`, the default IPv6 route through it.
fn ipv6_address(ns: &str, dev: &str, ip: Ipv6Addr, gateway: Option<Ipv6Addr>) -> Result<()> {
    let cidr = format!("{ip}/64");
    netns::ip(ns, &["-6", "addr", "add", &cidr, "dev", dev, "nodad"])?;
    if let Some(g) = gateway {
        netns::ip(
            ns,
            &["-6", "route", "add", "default", "via", &g.to_string()],
        )?;
    }
    Ok(())
}

/// Echoes every datagram back to its sender until `stop` is set.
fn serve_echo(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = crate::recv_from(socket, &mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

impl Drop for Lab {
    #[allow(clippy::print_stderr)] // a failing test's lab says where its logs are
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // Tell every service to stop before waiting for any (each notices within 50 ms).
        for service in &state.services {
            service.stop.store(true, Ordering::Relaxed);
        }
        state.services.clear();
        while let Some(child) = state.children.pop() {
            drop(child);
        }
        for ns in state.namespaces.iter().rev() {
            if let Err(e) = netns::destroy(ns) {
                eprintln!("lab: could not remove namespace {ns}: {e}");
            }
        }
        if panicking {
            eprintln!(
                "lab {}: removed namespaces {:?}; logs were in {} (set AGENTD_LAB_KEEP=1 to keep them)",
                self.prefix,
                state.namespaces,
                self.dir.path().display()
            );
        }
    }
}
