//! The TUN device: the interface the OS routes 100.64.0.0/10 and fd7a:115c:a1e0::/48
//! into, with this node's addresses on it. tun-rs covers Linux (tun), macOS (utun) and
//! Windows (wintun); this file is the one place that knows it. Giving the device the
//! whole CGNAT prefix makes the kernel route every peer address to it without route
//! commands, and the device is removed when the value is dropped.
//!
//! On Linux the device is opened with offloads (virtio-net header, TSO/USO): one read
//! returns a TCP or UDP "super-packet" of up to 64 KiB that tun-rs splits into MTU-sized
//! packets, and one write takes a batch that tun-rs coalesces (GRO) back into as few
//! super-packets as it can. That is where a userspace tunnel's speed comes from: the
//! per-packet system call goes away. Elsewhere (or if the kernel refuses offloads) it
//! reads and writes one packet at a time through the same interface.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The MTU of the tunnel: Tailscale's default, so 1280 + 80 bytes of worst-case
/// IPv6 + UDP + WireGuard overhead fits a 1360-byte path.
pub const MTU: u16 = 1280;

/// Bytes kept free in front of each packet written (room for the virtio-net header).
const HEADROOM: usize = 16;
/// Room of each write buffer: GRO coalesces a run of TCP segments into the buffer of the
/// first one, up to 64 KiB, and only where that buffer already has the capacity.
const WRITE_BUFFER: usize = 65_535 + 2 * HEADROOM;

/// Most packets one read or write handles.
pub const BATCH: usize = 128;

/// A TUN device with our addresses.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    name: String,
    offload: bool,
    /// The interface index it was created with (Unix), to tell it from a device of the
    /// same name made later by someone else.
    index: Option<u32>,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("offload", &self.offload)
            .finish()
    }
}

/// Buffers for [`TunDevice::recv_batch`], reused from read to read.
pub struct RecvBatch {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))] // offload reads: Linux only
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            raw: vec![0u8; 65_535 + HEADROOM],
            bufs: (0..BATCH)
                .map(|_| vec![0u8; usize::from(MTU) + 64])
                .collect(),
            sizes: vec![0; BATCH],
            n: 0,
        }
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("n", &self.n).finish()
    }
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch").finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// The packets of the last read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs
            .iter()
            .zip(&self.sizes)
            .take(self.n)
            .map(|(b, n)| &b[..*n])
    }
}

/// State kept between [`TunDevice::send_batch`] calls: the coalescing tables and the
/// write buffers (allocated on first use, then reused; a buffer's pages become resident
/// only as far as coalescing fills them).
#[derive(Default)]
pub struct SendBatch {
    #[cfg(target_os = "linux")]
    gro: Option<tun_rs::GROTable>,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))] // offload writes: Linux only
    bufs: Vec<Vec<u8>>,
}

/// A step of setting up the TUN device that the OS refused, with its error.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}{}", hint(.source))]
pub struct TunError {
    /// What was being done, e.g. `creating the TUN device "agentd0"`.
    pub op: String,
    #[source]
    pub source: io::Error,
}

/// The OS's index of the interface `name`, if it exists (None where we cannot tell).
#[cfg(unix)]
fn interface_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

#[cfg(not(unix))]
fn interface_index(_: &str) -> Option<u32> {
    None
}

/// What to do about an error, where the kernel's word says it: "needs root" only when
/// the kernel said EPERM.
#[cfg(unix)]
fn hint(e: &io::Error) -> &'static str {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EPERM) => " (agentd needs root or CAP_NET_ADMIN, and access to /dev/net/tun)",
        Some(Errno::ENOENT) => {
            " (no /dev/net/tun: load the tun module with `modprobe tun`, or pass the device into the container)"
        }
        _ => "",
    }
}

#[cfg(not(unix))]
fn hint(_: &io::Error) -> &'static str {
    ""
}

impl TunDevice {
    /// Creates the device `name` (empty: the OS picks), up, with `v4`/10 on it. The
    /// IPv6 address is added separately ([`TunDevice::add_v6`]): a host without IPv6
    /// refuses it, and the device must work without.
    pub fn create(name: &str, v4: Option<Ipv4Addr>) -> Result<Self, TunError> {
        let build = |offload: bool| {
            let mut b = tun_rs::DeviceBuilder::new().mtu(MTU);
            if !name.is_empty() {
                b = b.name(name);
            }
            #[cfg(target_os = "linux")]
            {
                b = b.offload(offload);
            }
            #[cfg(not(target_os = "linux"))]
            let _ = offload;
            b.build_async()
        };
        let creating = |source| TunError {
            op: format!("creating the TUN device {name:?}"),
            source,
        };
        let (dev, offload) = match build(cfg!(target_os = "linux")) {
            Ok(d) => (d, cfg!(target_os = "linux")),
            Err(e) if cfg!(target_os = "linux") => {
                tracing::info!(error = %e, "TUN offloads unavailable: one packet per read");
                (build(false).map_err(creating)?, false)
            }
            Err(e) => return Err(creating(e)),
        };
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        if let Some(a) = v4 {
            dev.set_network_address(a, 10u8, None)
                .map_err(|source| TunError {
                    op: format!("setting the tunnel address {a}/10 on {name}"),
                    source,
                })?;
        }
        let index = interface_index(&name);
        Ok(TunDevice {
            dev,
            name,
            offload,
            index,
        })
    }

    /// Whether the device still exists (`ip link del` removes it under us; reads then
    /// fail and writes vanish).
    pub fn still_there(&self) -> bool {
        match self.index {
            Some(i) => interface_index(&self.name) == Some(i),
            None => true,
        }
    }

    /// Adds the tunnel's IPv6 address (`v6`/48).
    pub fn add_v6(&self, v6: Ipv6Addr) -> Result<(), TunError> {
        self.dev
            .add_address_v6(v6, 48u8)
            .map_err(|source| TunError {
                op: format!("adding the tunnel address {v6}/48 to {}", self.name),
                source,
            })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether reads and writes go in batches through the kernel's offloads.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Reads one packet, or (with offloads) a batch of them, into `b`.
    pub async fn recv_batch(&self, b: &mut RecvBatch) -> io::Result<usize> {
        b.n = 0;
        #[cfg(target_os = "linux")]
        if self.offload {
            let n = self
                .dev
                .recv_multiple(&mut b.raw, &mut b.bufs, &mut b.sizes, 0)
                .await?;
            b.n = n;
            return Ok(n);
        }
        let n = self.dev.recv(&mut b.bufs[0]).await?;
        b.sizes[0] = n;
        b.n = 1;
        Ok(1)
    }

    /// Writes a batch of IP packets (with offloads: coalesced into as few writes as
    /// GRO allows).
    pub async fn send_batch(&self, s: &mut SendBatch, packets: &[Vec<u8>]) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if self.offload {
            let n = packets.len();
            while s.bufs.len() < n {
                s.bufs.push(Vec::with_capacity(WRITE_BUFFER));
            }
            for (b, p) in s.bufs.iter_mut().zip(packets) {
                b.clear();
                b.resize(HEADROOM, 0);
                b.extend_from_slice(p);
            }
            let gro = s.gro.get_or_insert_with(tun_rs::GROTable::new);
            self.dev
                .send_multiple(gro, &mut s.bufs[..n], HEADROOM)
                .await?;
            return Ok(());
        }
        let _ = (s, WRITE_BUFFER, HEADROOM);
        let mut first_err = None;
        for p in packets {
            if let Err(e) = self.dev.send(p).await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
