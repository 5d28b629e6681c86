//! agentd's local API: HTTP/1.1 + JSON on a Unix socket, versioned paths. These are the
//! documents it serves, shared by agentd (the server) and agentctl (the client).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/status` | [`Status`] |
//! | GET | `/v1/whois?ip=100.64.0.2` | [`PeerStatus`] of the peer owning the address (404 if none) |
//! | GET | `/v1/ping?peer=bob&timeout_ms=2000` | [`PingResult`] (504 when no pong came) |
//! | GET | `/v1/netcheck` | [`NetcheckResult`] (a fresh report) |
//! | GET | `/v1/version` | [`Version`] |
//! | POST | `/v1/down` | `{"state":"down"}`: disconnected from control, tunnel removed; the daemon keeps running |
//! | POST | `/v1/up` | `{"state":"up"}`: connected again |
//!
//! Errors are `{"error": "…"}` with a 4xx/5xx status.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where agentd listens by default: the system socket [`SYSTEM_SOCKET`] when it runs as
/// root (the service's runtime directory), otherwise `$XDG_RUNTIME_DIR/agentd.sock`,
/// otherwise `<tmp>/agentd-<uid>.sock`; on Windows the named pipe [`WINDOWS_PIPE`].
/// `AGENTD_SOCKET` overrides it.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTD_SOCKET") {
        return PathBuf::from(p);
    }
    #[cfg(windows)]
    {
        PathBuf::from(WINDOWS_PIPE)
    }
    #[cfg(not(windows))]
    {
        if is_root() {
            PathBuf::from(SYSTEM_SOCKET)
        } else {
            user_socket_path()
        }
    }
}

/// Where agentctl looks by default: the system daemon's socket when there is one (any
/// user in the `agentd` group may use it), else where a daemon of this user would listen
/// ([`default_socket_path`]). `AGENTD_SOCKET` overrides it.
pub fn default_client_socket_path() -> PathBuf {
    #[cfg(not(windows))]
    {
        if std::env::var_os("AGENTD_SOCKET").is_none()
            && std::path::Path::new(SYSTEM_SOCKET).exists()
        {
            return PathBuf::from(SYSTEM_SOCKET);
        }
    }
    default_socket_path()
}

/// The local API's named pipe on Windows. Under `ProtectedPrefix\Administrators` only an
/// administrator (or the service, as LocalSystem) can create it, so no other user can
/// squat the name.
pub const WINDOWS_PIPE: &str = r"\\.\pipe\ProtectedPrefix\Administrators\agentd\agentd";

/// The system daemon's socket (its service's runtime directory).
#[cfg(target_os = "linux")]
pub const SYSTEM_SOCKET: &str = "/run/agentd/agentd.sock";
/// The system daemon's socket (its service's runtime directory).
#[cfg(all(unix, not(target_os = "linux")))]
pub const SYSTEM_SOCKET: &str = "/var/run/agentd/agentd.sock";

#[cfg(not(windows))]
fn user_socket_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("agentd.sock");
    }
    std::env::temp_dir().join(format!("agentd-{}.sock", user_tag()))
}

#[cfg(unix)]
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(not(any(unix, windows)))]
fn is_root() -> bool {
    false
}

#[cfg(not(windows))]
fn user_tag() -> String {
    #[cfg(unix)]
    {
        nix::unistd::geteuid().to_string()
    }
    #[cfg(not(unix))]
    {
        std::env::var("USER").unwrap_or_else(|_| "user".into())
    }
}

/// A query-string value, percent-encoded: letters, digits and `-._~` stay, every other
/// byte becomes `%XX` (so names with spaces, `&` or non-ASCII letters survive the trip).
pub fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of `key` in a query string (`a=1&b=2`), percent-decoded (`+` is a space).
/// None when the key is missing or its value is not valid percent-encoded UTF-8.
pub fn query_value(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)?;
    let mut bytes = Vec::with_capacity(raw.len());
    let mut it = raw.bytes();
    while let Some(b) = it.next() {
        match b {
            b'%' => {
                let hi = char::from(it.next()?).to_digit(16)?;
                let lo = char::from(it.next()?).to_digit(16)?;
                bytes.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            b'+' => bytes.push(b' '),
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).ok()
}

/// agentd's state as a whole (Tailscale's backend states, by the same names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    /// Not yet running: no netmap yet.
    #[default]
    Starting,
    /// A person must open `auth_url` to add this device.
    NeedsLogin,
    Running,
    /// `agentctl down`.
    Stopped,
    /// A state this agentctl does not know (a newer agentd).
    #[serde(other)]
    Unknown,
}

/// The control session's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlState {
    Connecting,
    Connected,
    NeedsLogin,
    /// The last attempt failed (`control_error` says why); redialling with backoff.
    Retrying,
    /// The server refused this device; a new key is needed.
    Refused,
    /// `agentctl down`.
    Stopped,
    /// Not said (an older agentd), or a state this agentctl does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

/// How packets reach a peer now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerPath {
    Direct,
    Relay,
    /// No way to reach it yet.
    #[default]
    None,
    /// A path this agentctl does not know (a newer agentd).
    #[serde(other)]
    Unknown,
}

/// Which way a ping's pong came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PingVia {
    Direct,
    #[default]
    Relay,
    /// A way this agentctl does not know (a newer agentd).
    #[serde(other)]
    Unknown,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// agentd's version.
    pub version: String,
    pub state: BackendState,
    /// The login URL while `state` is `NeedsLogin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_url: Option<String>,
    /// The control server's URL and whether we are connected to it.
    pub control_url: String,
    pub control_connected: bool,
    /// The control session's state (`unknown` from an agentd older than this field).
    #[serde(default)]
    pub control_state: ControlState,
    /// Why the last attempt failed, while `control_state` is `retrying` or `refused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_error: Option<String>,
    #[serde(rename = "self")]
    pub me: SelfStatus,
    pub peers: Vec<PeerStatus>,
    /// What agentd counted: drops by reason (`tun_no_route`, `wg_drop: bad mac1`, …) and
    /// relay traffic.
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// This device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub node_key: String,
    pub addresses: Vec<String>,
    pub os: String,
    /// Our endpoints as advertised to peers.
    pub endpoints: Vec<String>,
    pub home_region: Option<i32>,
    pub home_region_name: Option<String>,
    /// Round trip to the home region at the last netcheck, ms.
    pub home_latency_ms: Option<f64>,
    pub tun: Option<String>,
    /// Why the tunnel has no IPv6 on this host (None: it has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_off: Option<String>,
}

/// One peer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub node_key: String,
    pub addresses: Vec<String>,
    pub os: String,
    /// What control says (None: it did not say).
    pub online: Option<bool>,
    pub path: PeerPath,
    /// The direct address, when `path` is `direct`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<String>,
    /// The peer's home relay region (ID and name), through which relayed traffic goes.
    pub relay_region: Option<i32>,
    pub relay_region_name: Option<String>,
    /// Why the path is what it is (e.g. why it is relayed).
    pub reason: String,
    /// Seconds since the last WireGuard handshake (None: none yet).
    pub last_handshake_secs: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets from this peer the packet filter refused.
    #[serde(default)]
    pub denied: u64,
    /// The control server marked the peer's key expired: traffic with it is cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
}

/// `GET /v1/filter`: the packet filter in force (`agentctl debug filter`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterStatus {
    /// False until the control server has sent a filter (everything inbound is denied).
    pub received: bool,
    /// One line per rule (`accept tcp from 100.64.0.2/32 to 100.64.0.1/32:22`) and per
    /// capability grant.
    pub rules: Vec<String>,
    /// Rules of the filter that could not be read: not enforced, so what they would
    /// allow stays denied.
    pub skipped: usize,
    /// What inbound packets may be addressed to.
    pub local: Vec<String>,
    /// UDP/SCTP flows this device opened, whose replies are let in.
    pub flows: usize,
    pub flows_evicted: u64,
    /// Refused inbound packets by reason.
    pub denied: std::collections::BTreeMap<String, u64>,
}

/// `GET /v1/ping?peer=NAME_OR_IP&timeout_ms=N`: one disco ping, answered by the first
/// pong (through the relay or directly, whichever the current path uses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub peer: String,
    pub address: String,
    pub via: PingVia,
    /// The peer's address the pong came from, when direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_region: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_region_name: Option<String>,
    pub latency_ms: f64,
}

/// `GET /v1/netcheck`: a fresh report from agentd's own socket (the one its peers see).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetcheckResult {
    /// The report in Tailscale's JSON form (latencies in nanoseconds) plus `NATType`.
    pub report: serde_json::Value,
    /// The same, the way `agentctl netcheck` prints it.
    pub text: String,
}

/// `GET /v1/version`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    pub api: u32,
}

/// The error document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {

    #[test]
    fn query_values_round_trip_through_percent_encoding() {
        for v in [
            "bob",
            "my laptop",
            "a&b=c",
            "fd7a:115c:a1e0::1",
            "straße",
            "100%",
        ] {
            let q = format!("x=1&peer={}&y=2", super::encode_query_value(v));
            assert!(!q.contains(' '));
            assert_eq!(super::query_value(&q, "peer").as_deref(), Some(v), "{q}");
        }
        assert_eq!(
            super::query_value("peer=a+b", "peer").as_deref(),
            Some("a b")
        );
        assert_eq!(
            super::query_value("ip=100.64.0.1", "ip").as_deref(),
            Some("100.64.0.1")
        );
        assert_eq!(super::query_value("x=1", "peer"), None);
        // Malformed escapes and invalid UTF-8 are refused, not guessed at.
        for bad in ["peer=%", "peer=%4", "peer=%zz", "peer=%FF"] {
            assert_eq!(super::query_value(bad, "peer"), None, "{bad}");
        }
    }
    use super::*;

    #[test]
    fn status_round_trips_and_uses_self() {
        let s = Status {
            version: "0.1.0".into(),
            state: BackendState::Running,
            me: SelfStatus {
                name: "a".into(),
                ..Default::default()
            },
            peers: vec![PeerStatus {
                name: "b".into(),
                path: PeerPath::Relay,
                relay_region: Some(901),
                ..Default::default()
            }],
            ..Default::default()
        };
        let j = serde_json::to_string(&s).unwrap_or_default();
        assert!(j.contains("\"self\":{"), "{j}");
        let back: Status = serde_json::from_str(&j).unwrap_or_default();
        assert_eq!(back, s);
    }

    /// The states travel as the same words as before (scripts read them), and a word
    /// this side does not know is `Unknown`, not an error.
    #[test]
    fn states_are_the_documented_words_and_unknown_ones_parse() {
        assert_eq!(word(&PeerPath::Direct), "direct");
        assert_eq!(word(&PeerPath::None), "none");
        assert_eq!(word(&PingVia::Relay), "relay");
        assert_eq!(word(&BackendState::NeedsLogin), "NeedsLogin");
        assert_eq!(word(&ControlState::NeedsLogin), "needs-login");
        assert_eq!(word(&ControlState::Retrying), "retrying");
        let p: PeerPath = serde_json::from_str("\"peer-relay\"").unwrap_or(PeerPath::None);
        assert_eq!(p, PeerPath::Unknown);
        let c: ControlState =
            serde_json::from_str("\"sleeping\"").unwrap_or(ControlState::Connected);
        assert_eq!(c, ControlState::Unknown);
        // An older agentd's status (no control_state) still parses.
        let old = r#"{"version":"0","state":"Running","control_url":"","control_connected":true,
            "self":{"name":"","node_key":"","addresses":[],"os":"","endpoints":[],
            "home_region":null,"home_region_name":null,"home_latency_ms":null,"tun":null},
            "peers":[]}"#;
        let s: Status = serde_json::from_str(old).unwrap_or_default();
        assert_eq!(
            (s.state, s.control_state),
            (BackendState::Running, ControlState::Unknown)
        );
    }

    /// The word an enum above travels as.
    fn word<T: Serialize>(x: &T) -> String {
        serde_json::to_value(x)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }
}
