//! The TUN device: the interface the OS routes 100.64.0.0/10 and fd7a:115c:a1e0::/48
//! into, with this node's addresses on it. tun-rs covers Linux (tun), macOS (utun) and
//! Windows (wintun); this file is the one place that knows it. Giving the device the
//! whole CGNAT prefix makes the kernel route every peer address to it without route
//! commands, and the device is removed when the value is dropped.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The MTU of the tunnel: Tailscale's default, so 1280 + 80 bytes of worst-case
/// IPv6 + UDP + WireGuard overhead fits a 1360-byte path.
pub const MTU: u16 = 1280;

/// A TUN device with our addresses.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    name: String,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .finish()
    }
}

impl TunDevice {
    /// Creates the device `name` (empty: the OS picks) with `v4`/10 and `v6`/48.
    pub fn create(name: &str, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> io::Result<Self> {
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
        let dev = b.build_async()?;
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        Ok(TunDevice { dev, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }

    /// Writes one IP packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet).await
    }
}
