//! Every deadline of the control client, each with the reason for its value. A control
//! server (or a middlebox in front of it) that accepts a connection and then says nothing
//! must cost one of these, never a session stuck "connecting"; the session then redials
//! with its capped, jittered backoff.
//!
//! The steps before the map stream share one budget shape: a server that is there at all
//! answers each of them within a round trip or two, so 10 s is generous even on a lossy
//! satellite link, and a stalled server shows up as `Retrying` within about 10 s.

use std::time::Duration;

/// TCP connect. Linux resends an unanswered SYN after 1 s and 3 s more (7 s in all), so
/// 10 s lets three SYNs try on a lossy path; the kernel's own limit (about 2 min) would
/// keep the session "connecting" far longer than any reachable server needs.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake (`https://` control URLs): two round trips and a certificate chain.
/// A listener that accepted TCP but does not speak TLS is caught here.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `GET /key`, from writing the request until the whole answer (≤ 64 KiB) is read:
/// one round trip and a few hundred bytes of JSON.
pub const KEY_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// `POST /ts2021` until the connection carries HTTP/2: the 101, the 51-byte Noise response
/// and the optional early payload. One round trip and one Diffie-Hellman on the server.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);
/// `POST /machine/register` with an auth key (or a known node key): the server checks
/// the key and writes one row. Longer than the steps above because it is real server
/// work (a database, perhaps an external auth check), still well under a minute.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
/// A `Followup` register is held by the server until a person finishes logging in, so
/// it may take minutes. After this long without an answer the connection itself is
/// suspect (HTTP/2 here sends no pings), and the session redials and registers again.
pub const LOGIN_WAIT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// From sending the streaming map request until its first message is decoded. The first
/// message is the heaviest answer (every peer, the relay map, DNS), so this allows more
/// than the small steps, and still fails a stalled server long before the 120 s watchdog.
pub const MAP_START_TIMEOUT: Duration = Duration::from_secs(30);
/// A map stream with no message (keep-alives included) for this long is dead. Servers send
/// a keep-alive every ~60 s (Headscale: 50 s + up to 9 s); tailscaled uses the same 120 s.
pub const MAP_WATCHDOG: Duration = Duration::from_secs(120);
/// One lite map update (endpoints, home region, disco key): a small request the server
/// only stores. It runs beside the map stream, so waiting for it never stalls the netmap;
/// past this long it is abandoned and sent again later.
pub const LITE_UPDATE_TIMEOUT: Duration = Duration::from_secs(15);
/// First wait before resending a lite update that failed; doubled per failure in a row…
pub const LITE_RETRY_MIN: Duration = Duration::from_secs(1);
/// …up to this, so a server that keeps refusing lite updates gets one a minute, not a
/// stream of them, while the map stream stays up.
pub const LITE_RETRY_MAX: Duration = Duration::from_secs(60);
