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

impl TunDevice {
    /// Creates the device `name` (empty: the OS picks) with `v4`/10 and `v6`/48.
    pub fn create(name: &str, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> io::Result<Self> {
        let build = |offload: bool| {
            let mut b = tun_rs::DeviceBuilder::new().mtu(MTU);
            if !name.is_empty() {
                b = b.name(name);
            }
            if let Some(a) = v4 {
                b = b.ipv4(a, 10u8, None);
            }
            if let Some(a) = v6 {
                b = b.ipv6(a, 48u8);
            }
            #[cfg(target_os = "linux")]
            {
                b = b.offload(offload);
            }
            #[cfg(not(target_os = "linux"))]
            let _ = offload;
            b.build_async()
        };
        let (dev, offload) = match build(cfg!(target_os = "linux")) {
            Ok(d) => (d, cfg!(target_os = "linux")),
            Err(e) if cfg!(target_os = "linux") => {
                tracing::info!(error = %e, "TUN offloads unavailable: one packet per read");
                (build(false)?, false)
            }
            Err(e) => return Err(e),
        };
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        Ok(TunDevice { dev, name, offload })
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
