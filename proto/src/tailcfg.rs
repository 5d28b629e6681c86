//! Control-protocol messages (Tailscale's `tailcfg`) with Go's exact JSON field names.
//! Unknown fields are ignored and absent ones take defaults, as Go's decoder does. Only
//! the fields agentd uses are modelled; more are added as features need them.

use serde::{Deserialize, Serialize};

use crate::keys::NodePublic;

fn is_false(b: &bool) -> bool {
    !*b
}

/// `RegisterRequest`, sent to `POST /machine/register` inside ts2021.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The client's capability version.
    #[serde(rename = "Version", default)]
    pub version: u32,
    #[serde(rename = "NodeKey", default)]
    pub node_key: NodePublic,
    /// The previous node key when rotating; the zero key otherwise.
    #[serde(rename = "OldNodeKey", default)]
    pub old_node_key: NodePublic,
    #[serde(rename = "Auth", default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RegisterAuth>,
    /// RFC 3339; a time in the past with the current key logs out. Absent = no change.
    #[serde(rename = "Expiry", default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
    /// The AuthURL of an earlier response, to wait for an interactive login.
    #[serde(rename = "Followup", default, skip_serializing_if = "String::is_empty")]
    pub followup: String,
    #[serde(rename = "Hostinfo", default, skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Hostinfo>,
    #[serde(rename = "Ephemeral", default, skip_serializing_if = "is_false")]
    pub ephemeral: bool,
}

/// `RegisterRequest.Auth`. Its `Debug` never shows the key.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAuth {
    /// A pre-auth key (`tskey-…` or Headscale's own form).
    #[serde(rename = "AuthKey", default, skip_serializing_if = "String::is_empty")]
    pub auth_key: String,
}

impl std::fmt::Debug for RegisterAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegisterAuth(<redacted>)")
    }
}

/// `RegisterResponse`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    #[serde(rename = "User", default)]
    pub user: User,
    #[serde(rename = "Login", default)]
    pub login: Login,
    #[serde(rename = "NodeKeyExpired", default)]
    pub node_key_expired: bool,
    #[serde(rename = "MachineAuthorized", default)]
    pub machine_authorized: bool,
    /// Non-empty: the user must open this URL to finish logging in.
    #[serde(rename = "AuthURL", default, skip_serializing_if = "String::is_empty")]
    pub auth_url: String,
    #[serde(rename = "Error", default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    #[serde(rename = "ID", default)]
    pub id: i64,
    #[serde(
        rename = "LoginName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub login_name: String,
    #[serde(
        rename = "DisplayName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub display_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    #[serde(rename = "ID", default)]
    pub id: i64,
    #[serde(
        rename = "LoginName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub login_name: String,
    #[serde(
        rename = "DisplayName",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub display_name: String,
}

/// `Hostinfo`: what a node says about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hostinfo {
    #[serde(
        rename = "IPNVersion",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub ipn_version: String,
    #[serde(rename = "OS", default, skip_serializing_if = "String::is_empty")]
    pub os: String,
    #[serde(rename = "Hostname", default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(rename = "GoArch", default, skip_serializing_if = "String::is_empty")]
    pub arch: String,
    #[serde(rename = "NetInfo", default, skip_serializing_if = "Option::is_none")]
    pub net_info: Option<NetInfo>,
}

/// `Hostinfo.NetInfo`: what the node measured about its network.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetInfo {
    /// The home relay region (lowest latency, with hysteresis).
    #[serde(rename = "PreferredDERP", default, skip_serializing_if = "is_zero_i32")]
    pub preferred_derp: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_request_uses_go_names() {
        let req = RegisterRequest {
            version: 113,
            node_key: NodePublic::from_bytes([1; 32]),
            auth: Some(RegisterAuth {
                auth_key: "tskey-secret".into(),
            }),
            hostinfo: Some(Hostinfo {
                hostname: "h".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"Version":113,"NodeKey":"nodekey:{}","OldNodeKey":"nodekey:{}","Auth":{{"AuthKey":"tskey-secret"}},"Hostinfo":{{"OS":"linux","Hostname":"h"}}}}"#,
                "01".repeat(32),
                "0".repeat(64)
            )
        );
        assert!(!format!("{req:?}").contains("tskey-secret"));
    }

    #[test]
    fn register_response_tolerates_extra_and_missing_fields() {
        let r: RegisterResponse = serde_json::from_str(
            r#"{"User":{"ID":3,"LoginName":"alice","Future":1},"MachineAuthorized":true,"NodeKeySignature":null}"#,
        )
        .unwrap();
        assert!(r.machine_authorized);
        assert_eq!(r.user.login_name, "alice");
        assert!(r.auth_url.is_empty());
    }
}

/// `MapRequest`, sent to `POST /machine/map`: a streaming poll (`Stream: true`) or a
/// "lite" update of endpoints, home region or disco key (`Stream: false, OmitPeers: true`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapRequest {
    #[serde(rename = "Version", default)]
    pub version: u32,
    /// `"zstd"` to receive compressed messages, empty for raw JSON.
    #[serde(rename = "Compress", default, skip_serializing_if = "String::is_empty")]
    pub compress: String,
    #[serde(rename = "KeepAlive", default, skip_serializing_if = "is_false")]
    pub keep_alive: bool,
    #[serde(rename = "NodeKey", default)]
    pub node_key: NodePublic,
    #[serde(rename = "DiscoKey", default)]
    pub disco_key: crate::keys::DiscoPublic,
    #[serde(rename = "Stream", default, skip_serializing_if = "is_false")]
    pub stream: bool,
    #[serde(rename = "Hostinfo", default, skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Hostinfo>,
    /// `ip:port` strings.
    #[serde(rename = "Endpoints", default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Parallel to `endpoints`: 1 local, 2 STUN, 3 port-mapped, 4 STUN-v4 + local port, 5 explicit.
    #[serde(
        rename = "EndpointTypes",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub endpoint_types: Vec<i32>,
    #[serde(rename = "OmitPeers", default, skip_serializing_if = "is_false")]
    pub omit_peers: bool,
}

/// A node of the network as the control server describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "ID", default)]
    pub id: i64,
    #[serde(rename = "StableID", default, skip_serializing_if = "String::is_empty")]
    pub stable_id: String,
    /// FQDN with a trailing dot.
    #[serde(rename = "Name", default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(rename = "User", default)]
    pub user: i64,
    #[serde(rename = "Key", default)]
    pub key: NodePublic,
    #[serde(rename = "KeyExpiry", default, skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<String>,
    #[serde(rename = "Machine", default)]
    pub machine: crate::keys::MachinePublic,
    /// Absent: the node does not speak disco.
    #[serde(rename = "DiscoKey", default, skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<crate::keys::DiscoPublic>,
    /// The node's own addresses as host prefixes, such as `100.64.0.5/32`.
    #[serde(rename = "Addresses", default)]
    pub addresses: crate::Prefixes,
    /// Routes to this node; `None` (JSON null or absent) means the same as `Addresses`.
    #[serde(rename = "AllowedIPs", default)]
    pub allowed_ips: Option<crate::Prefixes>,
    #[serde(rename = "Endpoints", default)]
    pub endpoints: Vec<String>,
    /// Home relay region (capability version ≥ 111).
    #[serde(rename = "HomeDERP", default, skip_serializing_if = "is_zero_i32")]
    pub home_derp: i32,
    /// Legacy form of the home region: `"127.3.3.40:<region>"`.
    #[serde(rename = "DERP", default, skip_serializing_if = "String::is_empty")]
    pub legacy_derp: String,
    #[serde(rename = "Hostinfo", default, skip_serializing_if = "Option::is_none")]
    pub hostinfo: Option<Hostinfo>,
    #[serde(rename = "Cap", default, skip_serializing_if = "is_zero_i32")]
    pub cap: i32,
    #[serde(rename = "Online", default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(rename = "LastSeen", default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(
        rename = "MachineAuthorized",
        default,
        skip_serializing_if = "is_false"
    )]
    pub machine_authorized: bool,
    #[serde(rename = "Expired", default, skip_serializing_if = "is_false")]
    pub expired: bool,
    /// ACL tags (`tag:server`); a tagged node is owned by its tags, not by its user.
    #[serde(rename = "Tags", default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// One rule of a `PacketFilter`: sources (`SrcIPs`) may reach `DstPorts` over `IPProto`
/// (empty: TCP, UDP, ICMPv4, ICMPv6), or are granted capabilities (`CapGrant`). Address
/// sets are `*`, an address, a CIDR or a range `a-b` (tailscale/tailscale
/// `tailcfg/tailcfg.go` `FilterRule`).
///
/// Fields this type does not know make a rule fail to parse, so a client skips it rather
/// than ignore a restriction it does not understand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    #[serde(rename = "SrcIPs", default)]
    pub src_ips: Vec<String>,
    /// The pre-CIDR way to widen `SrcIPs`; nobody should send it any more.
    #[serde(rename = "SrcBits", default, skip_serializing_if = "Option::is_none")]
    pub src_bits: Option<Vec<i64>>,
    #[serde(rename = "DstPorts", default, skip_serializing_if = "Vec::is_empty")]
    pub dst_ports: Vec<NetPortRange>,
    #[serde(rename = "IPProto", default, skip_serializing_if = "Vec::is_empty")]
    pub ip_proto: Vec<i64>,
    #[serde(rename = "CapGrant", default, skip_serializing_if = "Vec::is_empty")]
    pub cap_grant: Vec<CapGrant>,
}

/// Destinations of a rule: an address set and a port range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetPortRange {
    #[serde(rename = "IP", default)]
    pub ip: String,
    /// The pre-CIDR way to widen `IP`.
    #[serde(rename = "Bits", default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<i64>,
    #[serde(rename = "Ports", default)]
    pub ports: PortRange,
}

/// Ports `First` to `Last`, inclusive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    #[serde(rename = "First", default)]
    pub first: u16,
    #[serde(rename = "Last", default)]
    pub last: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };
}

/// Capabilities granted to a rule's sources on the destinations `Dsts`: capability name →
/// values (each an application-defined JSON value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapGrant {
    #[serde(rename = "Dsts", default)]
    pub dsts: Vec<String>,
    /// The older form of `CapMap`: names without values.
    #[serde(rename = "Caps", default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<String>,
    #[serde(
        rename = "CapMap",
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty"
    )]
    pub cap_map: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

impl Node {
    /// The home region from `HomeDERP`, else from the legacy `DERP` string; None if
    /// neither names one.
    pub fn home_region(&self) -> Option<crate::RegionId> {
        if let Some(r) = crate::RegionId::new(self.home_derp) {
            return Some(r);
        }
        self.legacy_derp
            .strip_prefix("127.3.3.40:")
            .and_then(|r| r.parse().ok())
            .and_then(crate::RegionId::new)
    }

    /// `AllowedIPs`, or `Addresses` when the server sent null.
    pub fn routes(&self) -> &[crate::IpNet] {
        self.allowed_ips.as_deref().unwrap_or(&self.addresses)
    }

    /// How many entries of `Addresses` and `AllowedIPs` were not prefixes.
    pub fn rejected_prefixes(&self) -> usize {
        self.addresses.rejected() + self.allowed_ips.as_ref().map_or(0, |a| a.rejected())
    }

    /// The first IPv4 and the first IPv6 address among `Addresses`.
    pub fn tunnel_addresses(&self) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
        let mut v4 = None;
        let mut v6 = None;
        for a in self.addresses.iter() {
            match a.addr() {
                std::net::IpAddr::V4(x) => v4 = v4.or(Some(x)),
                std::net::IpAddr::V6(x) => v6 = v6.or(Some(x)),
            }
        }
        (v4, v6)
    }
}

/// `PeerChange`: a partial update of one peer (`PeersChangedPatch`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerChange {
    #[serde(rename = "NodeID", default)]
    pub node_id: i64,
    #[serde(
        rename = "DERPRegion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub derp_region: Option<i32>,
    #[serde(rename = "Cap", default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<i32>,
    #[serde(rename = "Endpoints", default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(rename = "Key", default, skip_serializing_if = "Option::is_none")]
    pub key: Option<NodePublic>,
    #[serde(rename = "DiscoKey", default, skip_serializing_if = "Option::is_none")]
    pub disco_key: Option<crate::keys::DiscoPublic>,
    #[serde(rename = "Online", default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    #[serde(rename = "LastSeen", default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(rename = "KeyExpiry", default, skip_serializing_if = "Option::is_none")]
    pub key_expiry: Option<String>,
}

/// One message of the map stream. `None`/empty fields mean "unchanged".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapResponse {
    #[serde(rename = "KeepAlive", default, skip_serializing_if = "is_false")]
    pub keep_alive: bool,
    #[serde(rename = "Node", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
    #[serde(rename = "DERPMap", default, skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<crate::relaymap::RelayMap>,
    /// Non-empty: the complete peer list, replacing the previous one.
    #[serde(rename = "Peers", default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Node>,
    #[serde(
        rename = "PeersChanged",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_changed: Vec<Node>,
    #[serde(
        rename = "PeersRemoved",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_removed: Vec<i64>,
    #[serde(
        rename = "PeersChangedPatch",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub peers_changed_patch: Vec<PeerChange>,
    #[serde(
        rename = "OnlineChange",
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty"
    )]
    pub online_change: std::collections::BTreeMap<i64, bool>,
    /// Kept as raw JSON: null/absent = unchanged, `[]` = deny all.
    #[serde(
        rename = "PacketFilter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub packet_filter: Option<serde_json::Value>,
    /// Named parts of the packet filter (capability version 81): name → rules, or null
    /// to delete that part; `"*": null` first clears every part. The filter is the parts
    /// concatenated in name order, `PacketFilter` being the part named `base`.
    #[serde(
        rename = "PacketFilters",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub packet_filters: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    #[serde(rename = "Domain", default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
}
