//! DERP frames: the 5-byte header codec and the typed frames of protocol version 2.
//!
//! Pure bytes in, values out: no sockets, no clocks. [`decode`] takes whole frames off the
//! front of a buffer, enforcing the caller's length limit before any body is buffered, and
//! [`Frame::parse`] checks each type's exact body rules. Unknown frame types parse to
//! [`Frame::Unknown`] so readers can skip them, as the protocol requires. Not for: the
//! handshake's crypto (see `handshake`) or any I/O (see `io`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use proto::NodePublic;

/// Frame header: type (1 byte) ‖ big-endian body length (4 bytes).
pub const HEADER_LEN: usize = 5;
/// Largest payload of SendPacket / RecvPacket / ForwardPacket (keys excluded).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame a client accepts from a server.
pub const MAX_CLIENT_RECV_FRAME: usize = 1 << 20;
/// Largest ClientInfo frame a server accepts; also its smallest (key + nonce).
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
pub const MIN_CLIENT_INFO_LEN: usize = KEY_LEN + proto::nacl::NONCE_LEN;
/// Largest frame a server accepts once the handshake is done (ForwardPacket is the largest).
pub const MAX_SERVER_RECV_FRAME: usize = 2 * KEY_LEN + MAX_PACKET_SIZE;
/// Ping bodies the server accepts (it echoes the first 8 bytes).
pub const MAX_PING_LEN: usize = 1000;
/// `"DERP🔑"`, the magic at the start of a ServerKey frame.
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
pub const PROTOCOL_VERSION: u32 = 2;
const KEY_LEN: usize = 32;

/// Frame type bytes.
pub mod ty {
    pub const SERVER_KEY: u8 = 0x01;
    pub const CLIENT_INFO: u8 = 0x02;
    pub const SERVER_INFO: u8 = 0x03;
    pub const SEND_PACKET: u8 = 0x04;
    pub const RECV_PACKET: u8 = 0x05;
    pub const KEEP_ALIVE: u8 = 0x06;
    pub const NOTE_PREFERRED: u8 = 0x07;
    pub const PEER_GONE: u8 = 0x08;
    pub const PEER_PRESENT: u8 = 0x09;
    pub const FORWARD_PACKET: u8 = 0x0A;
    pub const WATCH_CONNS: u8 = 0x10;
    pub const CLOSE_PEER: u8 = 0x11;
    pub const PING: u8 = 0x12;
    pub const PONG: u8 = 0x13;
    pub const HEALTH: u8 = 0x14;
    pub const RESTARTING: u8 = 0x15;
}

/// Why a peer is gone (PeerGone reason byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// The peer left the whole region.
    Disconnected,
    /// The server has no connection for that key.
    NotHere,
    /// A reason byte this implementation does not know.
    Other(u8),
}

impl PeerGoneReason {
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Disconnected => 0x00,
            Self::NotHere => 0x01,
            Self::Other(b) => b,
        }
    }
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Disconnected,
            0x01 => Self::NotHere,
            b => Self::Other(b),
        }
    }
}

/// PeerPresent flag bits.
pub mod present_flags {
    pub const REGULAR: u8 = 0x01;
    pub const MESH_PEER: u8 = 0x02;
    pub const PROBER: u8 = 0x04;
    pub const NOT_IDEAL: u8 = 0x08;
}

/// A decoded frame. Payloads share the frame body's buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    ServerKey {
        key: NodePublic,
    },
    ClientInfo {
        key: NodePublic,
        sealed: Bytes,
    },
    ServerInfo {
        sealed: Bytes,
    },
    SendPacket {
        dst: NodePublic,
        payload: Bytes,
    },
    RecvPacket {
        src: NodePublic,
        payload: Bytes,
    },
    KeepAlive,
    NotePreferred {
        preferred: bool,
    },
    PeerGone {
        peer: NodePublic,
        reason: PeerGoneReason,
    },
    PeerPresent {
        peer: NodePublic,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    ForwardPacket {
        src: NodePublic,
        dst: NodePublic,
        payload: Bytes,
    },
    WatchConns,
    ClosePeer {
        peer: NodePublic,
    },
    Ping {
        data: [u8; 8],
    },
    Pong {
        data: [u8; 8],
    },
    Health {
        problem: String,
    },
    Restarting {
        reconnect_in_ms: u32,
        try_for_ms: u32,
    },
    /// A type this implementation does not know; its body was skipped.
    Unknown {
        frame_type: u8,
    },
}

/// A frame that breaks the protocol. The connection it came on must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame type {frame_type:#04x} has length {len}, over the limit of {max}")]
    TooLong {
        frame_type: u8,
        len: usize,
        max: usize,
    },
    #[error("frame type {frame_type:#04x} has a malformed body of {len} bytes")]
    BadBody { frame_type: u8, len: usize },
    #[error("ServerKey frame lacks the DERP magic")]
    BadMagic,
}

/// Takes one complete frame off the front of `buf` as `(type, body)`.
///
/// `Ok(None)` means more bytes are needed. The length limit is checked as soon as the
/// header is in, so an oversize frame is refused before its body is read.
pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<(u8, Bytes)>, FrameError> {
    let Some(len) = pending_len(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let frame_type = buf[0];
    buf.advance(HEADER_LEN);
    // Copy the body out so the read buffer is never pinned by a queued packet.
    let body = Bytes::copy_from_slice(&buf[..len]);
    buf.advance(len);
    Ok(Some((frame_type, body)))
}

/// The body length of the frame at the front of `buf`, once its header is complete.
pub fn pending_len(buf: &[u8], max_len: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > max_len {
        return Err(FrameError::TooLong {
            frame_type: buf[0],
            len,
            max: max_len,
        });
    }
    Ok(Some(len))
}

fn key_at(b: &[u8], at: usize) -> NodePublic {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&b[at..at + KEY_LEN]);
    NodePublic::from_bytes(k)
}

impl Frame {
    /// Checks a frame body against its type's rules.
    pub fn parse(frame_type: u8, body: Bytes) -> Result<Frame, FrameError> {
        let len = body.len();
        let bad = || FrameError::BadBody { frame_type, len };
        Ok(match frame_type {
            ty::SERVER_KEY => {
                if len < MAGIC.len() + KEY_LEN {
                    return Err(bad());
                }
                if body[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                Frame::ServerKey {
                    key: key_at(&body, MAGIC.len()),
                }
            }
            ty::CLIENT_INFO => {
                if len < MIN_CLIENT_INFO_LEN {
                    return Err(bad());
                }
                Frame::ClientInfo {
                    key: key_at(&body, 0),
                    sealed: body.slice(KEY_LEN..),
                }
            }
            ty::SERVER_INFO => {
                if len < proto::nacl::OVERHEAD {
                    return Err(bad());
                }
                Frame::ServerInfo { sealed: body }
            }
            ty::SEND_PACKET | ty::RECV_PACKET => {
                if len < KEY_LEN || len - KEY_LEN > MAX_PACKET_SIZE {
                    return Err(bad());
                }
                let key = key_at(&body, 0);
                let payload = body.slice(KEY_LEN..);
                if frame_type == ty::SEND_PACKET {
                    Frame::SendPacket { dst: key, payload }
                } else {
                    Frame::RecvPacket { src: key, payload }
                }
            }
            ty::KEEP_ALIVE => Frame::KeepAlive,
            ty::NOTE_PREFERRED => {
                if len != 1 {
                    return Err(bad());
                }
                Frame::NotePreferred {
                    preferred: body[0] != 0,
                }
            }
            ty::PEER_GONE => {
                if len < KEY_LEN {
                    return Err(bad());
                }
                let reason = body.get(KEY_LEN).copied().unwrap_or(0);
                Frame::PeerGone {
                    peer: key_at(&body, 0),
                    reason: PeerGoneReason::from_byte(reason),
                }
            }
            ty::PEER_PRESENT => {
                if len < KEY_LEN {
                    return Err(bad());
                }
                let mut addr = None;
                let mut flags = 0;
                if len >= KEY_LEN + 18 {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&body[KEY_LEN..KEY_LEN + 16]);
                    let port = u16::from_be_bytes([body[KEY_LEN + 16], body[KEY_LEN + 17]]);
                    let ip = Ipv6Addr::from(ip);
                    // An unspecified address with port 0 is how "no address" encodes.
                    if !(ip.is_unspecified() && port == 0) {
                        let ip = match ip.to_ipv4_mapped() {
                            Some(v4) => IpAddr::V4(v4),
                            None => IpAddr::V6(ip),
                        };
                        addr = Some(SocketAddr::new(ip, port));
                    }
                    if len > KEY_LEN + 18 {
                        flags = body[KEY_LEN + 18];
                    }
                }
                Frame::PeerPresent {
                    peer: key_at(&body, 0),
                    addr,
                    flags,
                }
            }
            ty::FORWARD_PACKET => {
                if len < 2 * KEY_LEN || len - 2 * KEY_LEN > MAX_PACKET_SIZE {
                    return Err(bad());
                }
                Frame::ForwardPacket {
                    src: key_at(&body, 0),
                    dst: key_at(&body, KEY_LEN),
                    payload: body.slice(2 * KEY_LEN..),
                }
            }
            ty::WATCH_CONNS => {
                if len != 0 {
                    return Err(bad());
                }
                Frame::WatchConns
            }
            ty::CLOSE_PEER => {
                if len != KEY_LEN {
                    return Err(bad());
                }
                Frame::ClosePeer {
                    peer: key_at(&body, 0),
                }
            }
            ty::PING | ty::PONG => {
                if !(8..=MAX_PING_LEN).contains(&len) {
                    return Err(bad());
                }
                let mut data = [0u8; 8];
                data.copy_from_slice(&body[..8]);
                if frame_type == ty::PING {
                    Frame::Ping { data }
                } else {
                    Frame::Pong { data }
                }
            }
            ty::HEALTH => Frame::Health {
                problem: String::from_utf8_lossy(&body).into_owned(),
            },
            ty::RESTARTING => {
                if len < 8 {
                    return Err(bad());
                }
                Frame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    try_for_ms: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                }
            }
            other => Frame::Unknown { frame_type: other },
        })
    }

    /// Appends this frame's wire bytes to `out`. `Unknown` encodes as an empty frame of its type.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Frame::ServerKey { key } => {
                put_header(out, ty::SERVER_KEY, MAGIC.len() + KEY_LEN);
                out.put_slice(&MAGIC);
                out.put_slice(key.as_bytes());
            }
            Frame::ClientInfo { key, sealed } => {
                put_header(out, ty::CLIENT_INFO, KEY_LEN + sealed.len());
                out.put_slice(key.as_bytes());
                out.put_slice(sealed);
            }
            Frame::ServerInfo { sealed } => {
                put_header(out, ty::SERVER_INFO, sealed.len());
                out.put_slice(sealed);
            }
            Frame::SendPacket { dst, payload } => encode_packet(out, ty::SEND_PACKET, dst, payload),
            Frame::RecvPacket { src, payload } => encode_packet(out, ty::RECV_PACKET, src, payload),
            Frame::KeepAlive => put_header(out, ty::KEEP_ALIVE, 0),
            Frame::NotePreferred { preferred } => {
                put_header(out, ty::NOTE_PREFERRED, 1);
                out.put_u8(u8::from(*preferred));
            }
            Frame::PeerGone { peer, reason } => {
                put_header(out, ty::PEER_GONE, KEY_LEN + 1);
                out.put_slice(peer.as_bytes());
                out.put_u8(reason.to_byte());
            }
            Frame::PeerPresent { peer, addr, flags } => {
                put_header(out, ty::PEER_PRESENT, KEY_LEN + 16 + 2 + 1);
                out.put_slice(peer.as_bytes());
                let (ip, port) = match addr {
                    Some(a) => (
                        match a.ip() {
                            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                            IpAddr::V6(v6) => v6,
                        },
                        a.port(),
                    ),
                    None => (Ipv6Addr::UNSPECIFIED, 0),
                };
                out.put_slice(&ip.octets());
                out.put_u16(port);
                out.put_u8(*flags);
            }
            Frame::ForwardPacket { src, dst, payload } => {
                put_header(out, ty::FORWARD_PACKET, 2 * KEY_LEN + payload.len());
                out.put_slice(src.as_bytes());
                out.put_slice(dst.as_bytes());
                out.put_slice(payload);
            }
            Frame::WatchConns => put_header(out, ty::WATCH_CONNS, 0),
            Frame::ClosePeer { peer } => {
                put_header(out, ty::CLOSE_PEER, KEY_LEN);
                out.put_slice(peer.as_bytes());
            }
            Frame::Ping { data } => {
                put_header(out, ty::PING, 8);
                out.put_slice(data);
            }
            Frame::Pong { data } => {
                put_header(out, ty::PONG, 8);
                out.put_slice(data);
            }
            Frame::Health { problem } => {
                put_header(out, ty::HEALTH, problem.len());
                out.put_slice(problem.as_bytes());
            }
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                put_header(out, ty::RESTARTING, 8);
                out.put_u32(*reconnect_in_ms);
                out.put_u32(*try_for_ms);
            }
            Frame::Unknown { frame_type } => put_header(out, *frame_type, 0),
        }
    }

    /// The wire bytes of this frame.
    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }
}

/// Appends a frame header.
pub fn put_header(out: &mut BytesMut, frame_type: u8, len: usize) {
    out.reserve(HEADER_LEN + len);
    out.put_u8(frame_type);
    out.put_u32(len as u32);
}

/// Appends a key-addressed packet frame (SendPacket or RecvPacket) without building a `Frame`.
pub fn encode_packet(out: &mut BytesMut, frame_type: u8, key: &NodePublic, payload: &[u8]) {
    put_header(out, frame_type, KEY_LEN + payload.len());
    out.put_slice(key.as_bytes());
    out.put_slice(payload);
}

/// Whether a payload is a disco message (magic `TS💬` and at least the 62-byte wrapper).
pub fn looks_like_disco(payload: &[u8]) -> bool {
    const DISCO_MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
    payload.len() >= 62 && payload[..6] == DISCO_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodePublic {
        NodePublic::from_bytes([b; 32])
    }

    fn hex_of(f: &Frame) -> String {
        hex::encode(f.to_bytes())
    }

    fn round_trip(f: Frame) {
        let mut buf = f.to_bytes();
        let (t, body) = decode(&mut buf, MAX_CLIENT_RECV_FRAME).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(Frame::parse(t, body).unwrap(), f);
    }

    const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn golden_server_key() {
        let f = Frame::ServerKey { key: k(0x11) };
        assert_eq!(hex_of(&f), format!("0100000028{}{K1}", "44455250f09f9491"));
        round_trip(f);
    }

    #[test]
    fn golden_client_and_server_info() {
        let sealed = Bytes::from(vec![0xAB; 41]);
        let f = Frame::ClientInfo {
            key: k(0x11),
            sealed: sealed.clone(),
        };
        assert_eq!(hex_of(&f), format!("0200000049{K1}{}", "ab".repeat(41)));
        round_trip(f);
        let f = Frame::ServerInfo { sealed };
        assert_eq!(hex_of(&f), format!("0300000029{}", "ab".repeat(41)));
        round_trip(f);
    }

    #[test]
    fn golden_send_recv_forward_packet() {
        let p = Bytes::from_static(b"\x01\x02\x03");
        let f = Frame::SendPacket {
            dst: k(0x11),
            payload: p.clone(),
        };
        assert_eq!(hex_of(&f), format!("0400000023{K1}010203"));
        round_trip(f);
        let f = Frame::RecvPacket {
            src: k(0x22),
            payload: p.clone(),
        };
        assert_eq!(hex_of(&f), format!("0500000023{K2}010203"));
        round_trip(f);
        let f = Frame::ForwardPacket {
            src: k(0x11),
            dst: k(0x22),
            payload: p,
        };
        assert_eq!(hex_of(&f), format!("0a00000043{K1}{K2}010203"));
        round_trip(f);
    }

    #[test]
    fn golden_small_frames() {
        assert_eq!(hex_of(&Frame::KeepAlive), "0600000000");
        round_trip(Frame::KeepAlive);
        let f = Frame::NotePreferred { preferred: true };
        assert_eq!(hex_of(&f), "070000000101");
        round_trip(f);
        let f = Frame::NotePreferred { preferred: false };
        assert_eq!(hex_of(&f), "070000000100");
        round_trip(f);
        assert_eq!(hex_of(&Frame::WatchConns), "1000000000");
        round_trip(Frame::WatchConns);
        let f = Frame::ClosePeer { peer: k(0x11) };
        assert_eq!(hex_of(&f), format!("1100000020{K1}"));
        round_trip(f);
        let f = Frame::Ping { data: *b"12345678" };
        assert_eq!(hex_of(&f), "12000000083132333435363738");
        round_trip(f);
        let f = Frame::Pong { data: *b"12345678" };
        assert_eq!(hex_of(&f), "13000000083132333435363738");
        round_trip(f);
        let f = Frame::Health {
            problem: "bad".into(),
        };
        assert_eq!(hex_of(&f), "1400000003626164");
        round_trip(f);
        let f = Frame::Restarting {
            reconnect_in_ms: 500,
            try_for_ms: 10_000,
        };
        assert_eq!(hex_of(&f), "1500000008000001f400002710");
        round_trip(f);
    }

    #[test]
    fn golden_peer_gone_and_present() {
        let f = Frame::PeerGone {
            peer: k(0x11),
            reason: PeerGoneReason::NotHere,
        };
        assert_eq!(hex_of(&f), format!("0800000021{K1}01"));
        round_trip(f);
        // Reason is optional on read: absent means Disconnected.
        let mut buf = BytesMut::from(&hex::decode(format!("0800000020{K1}")).unwrap()[..]);
        let (t, b) = decode(&mut buf, 100).unwrap().unwrap();
        assert_eq!(
            Frame::parse(t, b).unwrap(),
            Frame::PeerGone {
                peer: k(0x11),
                reason: PeerGoneReason::Disconnected
            }
        );
        let f = Frame::PeerPresent {
            peer: k(0x11),
            addr: Some("192.0.2.1:443".parse().unwrap()),
            flags: present_flags::REGULAR,
        };
        assert_eq!(
            hex_of(&f),
            format!("0900000033{K1}00000000000000000000ffffc000020101bb01")
        );
        round_trip(f);
        let f = Frame::PeerPresent {
            peer: k(0x11),
            addr: Some("[2001:db8::1]:7".parse().unwrap()),
            flags: present_flags::MESH_PEER,
        };
        round_trip(f);
        // No address encodes as [::]:0 and reads back as none.
        round_trip(Frame::PeerPresent {
            peer: k(0x11),
            addr: None,
            flags: 0,
        });
        // Old servers sent only the key.
        let short = Frame::parse(ty::PEER_PRESENT, Bytes::from(vec![0x11; 32])).unwrap();
        assert_eq!(
            short,
            Frame::PeerPresent {
                peer: k(0x11),
                addr: None,
                flags: 0
            }
        );
        // ... and survives re-encoding (found by the frame_reader fuzz target).
        round_trip(short);
    }

    #[test]
    fn server_accepts_long_ping_and_echoes_first_eight() {
        let mut body = b"abcdefgh".to_vec();
        body.extend_from_slice(&[0u8; 992]);
        assert_eq!(
            Frame::parse(ty::PING, Bytes::from(body)).unwrap(),
            Frame::Ping { data: *b"abcdefgh" }
        );
        assert!(Frame::parse(ty::PING, Bytes::from(vec![0u8; 1001])).is_err());
        assert!(Frame::parse(ty::PING, Bytes::from(vec![0u8; 7])).is_err());
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let cases: &[(u8, usize)] = &[
            (ty::SERVER_KEY, 39),
            (ty::CLIENT_INFO, 55),
            (ty::SEND_PACKET, 31),
            (ty::SEND_PACKET, 32 + MAX_PACKET_SIZE + 1),
            (ty::FORWARD_PACKET, 63),
            (ty::NOTE_PREFERRED, 0),
            (ty::NOTE_PREFERRED, 2),
            (ty::PEER_GONE, 31),
            (ty::WATCH_CONNS, 1),
            (ty::CLOSE_PEER, 33),
            (ty::RESTARTING, 7),
        ];
        for &(t, len) in cases {
            assert!(
                Frame::parse(t, Bytes::from(vec![0u8; len])).is_err(),
                "type {t:#x} len {len}"
            );
        }
        assert_eq!(
            Frame::parse(ty::SERVER_KEY, Bytes::from(vec![0u8; 40])),
            Err(FrameError::BadMagic)
        );
    }

    #[test]
    fn unknown_types_are_skipped_not_errors() {
        let mut buf = BytesMut::from(&b"\x7f\x00\x00\x00\x03abc\x06\x00\x00\x00\x00"[..]);
        let (t, b) = decode(&mut buf, 100).unwrap().unwrap();
        assert_eq!(
            Frame::parse(t, b).unwrap(),
            Frame::Unknown { frame_type: 0x7f }
        );
        let (t, b) = decode(&mut buf, 100).unwrap().unwrap();
        assert_eq!(Frame::parse(t, b).unwrap(), Frame::KeepAlive);
    }

    #[test]
    fn decode_waits_for_whole_frame_and_refuses_oversize_early() {
        let full = Frame::SendPacket {
            dst: k(1),
            payload: Bytes::from_static(b"xyz"),
        }
        .to_bytes();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut part, 1000).unwrap(), None);
            assert_eq!(part.len(), cut, "partial input is not consumed");
        }
        let mut hdr = BytesMut::from(&b"\x04\x00\x10\x00\x01"[..]);
        assert_eq!(
            decode(&mut hdr, MAX_SERVER_RECV_FRAME),
            Err(FrameError::TooLong {
                frame_type: 4,
                len: 0x0010_0001,
                max: MAX_SERVER_RECV_FRAME
            })
        );
    }

    #[test]
    fn disco_detection_needs_magic_and_wrapper_length() {
        let mut p = vec![0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
        p.resize(61, 0);
        assert!(!looks_like_disco(&p));
        p.push(0);
        assert!(looks_like_disco(&p));
        p[0] = 0;
        assert!(!looks_like_disco(&p));
    }
}
