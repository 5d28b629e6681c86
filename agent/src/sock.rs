//! The UDP socket WireGuard, disco and STUN share (what arrives on it is told apart by
//! `node::demux`, docs/protocols.md §2.2). The socket gets large kernel buffers: with the
//! default 208 KiB a userspace WireGuard loses 10–15 % of packets at speed.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Kernel buffer size asked for (the kernel caps it at `net.core.[rw]mem_max` unless
/// we are privileged enough for the FORCE variants, which root is).
const SOCKET_BUFFER: usize = 7 << 20;

/// Binds the shared IPv4 socket on `port` (0 = any) with large buffers.
pub fn bind_v4(port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Binds the shared IPv6 socket (IPv6 only: IPv4 has its own) on `port`, or on any port
/// when that one is taken; with large buffers. Fails on hosts without IPv6.
pub fn bind_v6(port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into();
    if s.bind(&any(port)).is_err() && port != 0 {
        s.bind(&any(0))?;
    }
    tokio::net::UdpSocket::from_std(s.into())
}

/// Batched I/O on the shared socket through quinn-udp: a run of same-size datagrams to
/// one address leaves in one system call (UDP GSO), and one receive returns many
/// datagrams (recvmmsg, and GRO coalescing on Linux). Where the platform lacks these,
/// quinn-udp falls back to one datagram per call behind the same interface.
///
/// Once this exists every receive on the socket must go through [`UdpIo::recv`]: with
/// GRO on, a plain `recv_from` could return several datagrams glued together.
pub struct UdpIo {
    sock: std::sync::Arc<tokio::net::UdpSocket>,
    state: quinn_udp::UdpSocketState,
}

impl std::fmt::Debug for UdpIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpIo")
            .field("gso_segments", &self.state.max_gso_segments())
            .field("gro_segments", &self.state.gro_segments())
            .finish()
    }
}

/// Receive buffers for [`UdpIo::recv`], reused.
pub struct RecvBuffers {
    bufs: Vec<Vec<u8>>,
    meta: Vec<quinn_udp::RecvMeta>,
    n: usize,
}

impl std::fmt::Debug for RecvBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBuffers").field("n", &self.n).finish()
    }
}

/// Buffers per receive call (each holds up to 64 KiB of coalesced datagrams).
const RECV_BUFFERS: usize = 8;

impl Default for RecvBuffers {
    fn default() -> Self {
        let count = RECV_BUFFERS.min(quinn_udp::BATCH_SIZE); // quinn-udp's is at least 1
        RecvBuffers {
            bufs: (0..count).map(|_| vec![0u8; 65_535]).collect(),
            meta: vec![quinn_udp::RecvMeta::default(); count],
            n: 0,
        }
    }
}

impl RecvBuffers {
    /// The datagrams of the last receive, with their senders.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.bufs
            .iter()
            .zip(&self.meta)
            .take(self.n)
            .flat_map(|(b, m)| {
                let stride = m.stride.max(1);
                b[..m.len.min(b.len())]
                    .chunks(stride)
                    .map(move |d| (d, m.addr))
            })
    }
}

impl UdpIo {
    pub fn new(sock: std::sync::Arc<tokio::net::UdpSocket>) -> std::io::Result<Self> {
        let state = quinn_udp::UdpSocketState::new((&*sock).into())?;
        Ok(UdpIo { sock, state })
    }

    /// Most datagrams one [`UdpIo::send_segments`] call may carry.
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Sends `contents`, a run of datagrams of `segment` bytes each (the last may be
    /// shorter), to `to`.
    pub async fn send_segments(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> std::io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        loop {
            self.sock.writable().await?;
            match self.sock.try_io(tokio::io::Interest::WRITABLE, || {
                self.state.try_send((&*self.sock).into(), &t)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    /// Receives one batch into `b`.
    pub async fn recv(&self, b: &mut RecvBuffers) -> std::io::Result<usize> {
        b.n = 0;
        loop {
            self.sock.readable().await?;
            let mut slices: Vec<std::io::IoSliceMut<'_>> = b
                .bufs
                .iter_mut()
                .map(|x| std::io::IoSliceMut::new(x))
                .collect();
            let r = self.sock.try_io(tokio::io::Interest::READABLE, || {
                self.state
                    .recv((&*self.sock).into(), &mut slices, &mut b.meta)
            });
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(n) => {
                    b.n = n;
                    return Ok(n);
                }
            }
        }
    }
}
