//! The UDP socket WireGuard, disco and STUN share, and the demultiplexer of what arrives
//! on it (shared/PROTOCOLS.md §2.2). The socket gets large kernel buffers: with the
//! default 208 KiB a userspace WireGuard loses 10–15 % of packets at speed.

use std::net::{Ipv4Addr, SocketAddr};

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

/// What a datagram on the shared socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Disco,
    WireGuard,
    Unknown,
}

/// Classifies a datagram: STUN binding response, disco (magic + minimum length), or
/// WireGuard (message types 1–4 with three zero bytes).
pub fn classify(pkt: &[u8]) -> Kind {
    if netcheck::stun::looks_like_response(pkt) {
        Kind::Stun
    } else if disco::looks_like_disco(pkt) {
        Kind::Disco
    } else if pkt.len() >= 4 && (1..=4).contains(&pkt[0]) && pkt[1..4] == [0, 0, 0] {
        Kind::WireGuard
    } else {
        Kind::Unknown
    }
}
