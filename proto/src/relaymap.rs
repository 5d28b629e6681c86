//! The relay map (Tailscale's `DERPMap`): regions of relay nodes, with the exact JSON field
//! names control servers send and `derper`/`tailscaled` expect (`RegionID`, `HostName`,
//! `STUNPort`, `omitDefaultRegions`, …). Unknown fields are ignored; empty optional fields
//! are omitted on output, as Go does.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Default STUN port when a node's `STUNPort` is 0.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// Default DERP (HTTPS) port when a node's `DERPPort` is 0.
pub const DEFAULT_DERP_PORT: u16 = 443;

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// A relay region's ID. Region IDs are positive; the wire's 0 ("none") becomes `None`
/// of an `Option<RegionId>` where it is read, so no code has to remember what 0 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(i32);

impl RegionId {
    /// The region `id`, or None for 0 (none) and negative numbers.
    pub fn new(id: i32) -> Option<RegionId> {
        (id > 0).then_some(RegionId(id))
    }

    /// The number on the wire.
    pub fn get(self) -> i32 {
        self.0
    }
}

impl std::fmt::Display for RegionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a relay map could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RelayMapError {
    #[error("cannot read relay map {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("relay map {path} is not valid DERPMap JSON: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("relay map is inconsistent: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RelayMap {
    #[serde(
        rename = "HomeParams",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub home_params: Option<HomeParams>,
    #[serde(rename = "Regions", default)]
    pub regions: BTreeMap<i32, RelayRegion>,
    #[serde(
        rename = "omitDefaultRegions",
        default,
        skip_serializing_if = "is_false"
    )]
    pub omit_default_regions: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HomeParams {
    /// Multipliers applied to a region's latency when choosing a home region (<1 favours it).
    #[serde(
        rename = "RegionScore",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub region_score: BTreeMap<i32, f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RelayRegion {
    #[serde(rename = "RegionID")]
    pub region_id: i32,
    #[serde(rename = "RegionCode", default)]
    pub region_code: String,
    #[serde(rename = "RegionName", default)]
    pub region_name: String,
    #[serde(rename = "Latitude", default, skip_serializing_if = "is_zero_f64")]
    pub latitude: f64,
    #[serde(rename = "Longitude", default, skip_serializing_if = "is_zero_f64")]
    pub longitude: f64,
    #[serde(rename = "Avoid", default, skip_serializing_if = "is_false")]
    pub avoid: bool,
    #[serde(rename = "NoMeasureNoHome", default, skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    #[serde(rename = "Nodes", default)]
    pub nodes: Vec<RelayNode>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RelayNode {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "RegionID", default)]
    pub region_id: i32,
    #[serde(rename = "HostName", default)]
    pub host_name: String,
    /// TLS name to verify instead of `HostName`; `sha256-raw:<hex>` pins the leaf certificate.
    #[serde(rename = "CertName", default, skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    /// Empty: resolve `HostName`; a non-IP string such as `"none"`: IPv4 disabled.
    #[serde(rename = "IPv4", default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(rename = "IPv6", default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// 0 = 3478, -1 = no STUN.
    #[serde(rename = "STUNPort", default, skip_serializing_if = "is_zero_i32")]
    pub stun_port: i32,
    #[serde(rename = "STUNOnly", default, skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// 0 = 443.
    #[serde(rename = "DERPPort", default, skip_serializing_if = "is_zero_i32")]
    pub derp_port: i32,
    #[serde(rename = "InsecureForTests", default, skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    #[serde(
        rename = "STUNTestIP",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub stun_test_ip: String,
    #[serde(rename = "CanPort80", default, skip_serializing_if = "is_false")]
    pub can_port_80: bool,
}

impl RelayNode {
    /// The STUN port to probe, or `None` when the node has STUN disabled.
    pub fn stun_port(&self) -> Option<u16> {
        match self.stun_port {
            0 => Some(DEFAULT_STUN_PORT),
            p if p > 0 && p <= u16::MAX as i32 => Some(p as u16),
            _ => None,
        }
    }

    /// The DERP port to dial.
    pub fn derp_port(&self) -> u16 {
        match self.derp_port {
            p if p > 0 && p <= u16::MAX as i32 => p as u16,
            _ => DEFAULT_DERP_PORT,
        }
    }

    /// How to reach the node over IPv4.
    pub fn ipv4_addr(&self) -> NodeAddr<std::net::Ipv4Addr> {
        NodeAddr::from_field(&self.ipv4)
    }

    /// How to reach the node over IPv6.
    pub fn ipv6_addr(&self) -> NodeAddr<std::net::Ipv6Addr> {
        NodeAddr::from_field(&self.ipv6)
    }
}

/// What a node's `IPv4`/`IPv6` field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAddr<T> {
    /// Use this address.
    Fixed(T),
    /// Empty field: resolve `HostName`.
    Resolve,
    /// Any non-IP string (conventionally `"none"`): this family is disabled.
    Disabled,
}

impl<T: std::str::FromStr> NodeAddr<T> {
    fn from_field(s: &str) -> Self {
        if s.is_empty() {
            NodeAddr::Resolve
        } else {
            s.parse().map_or(NodeAddr::Disabled, NodeAddr::Fixed)
        }
    }
}

impl RelayMap {
    /// Parse DERPMap JSON and check it is consistent.
    pub fn from_json(json: &str) -> Result<Self, RelayMapError> {
        let map: RelayMap = serde_json::from_str(json).map_err(|source| RelayMapError::Parse {
            path: "<inline>".into(),
            source,
        })?;
        map.validate()?;
        Ok(map)
    }

    /// Load a DERPMap JSON file.
    pub fn load(path: &Path) -> Result<Self, RelayMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| RelayMapError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let map: RelayMap = serde_json::from_str(&text).map_err(|source| RelayMapError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        map.validate()?;
        Ok(map)
    }

    /// Region keys equal their `RegionID`; every node names its region.
    pub fn validate(&self) -> Result<(), RelayMapError> {
        for (id, region) in &self.regions {
            if region.region_id != *id {
                return Err(RelayMapError::Invalid(format!(
                    "region key {id} has RegionID {}",
                    region.region_id
                )));
            }
            for node in &region.nodes {
                if node.region_id != *id {
                    return Err(RelayMapError::Invalid(format!(
                        "node {:?} is listed in region {id} but has RegionID {}",
                        node.name, node.region_id
                    )));
                }
                if node.host_name.is_empty() {
                    return Err(RelayMapError::Invalid(format!(
                        "node {:?} in region {id} has no HostName",
                        node.name
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "HomeParams": {"RegionScore": {"900": 1.0}},
      "Regions": {
        "900": {
          "RegionID": 900, "RegionCode": "myr", "RegionName": "My Region",
          "Latitude": 0, "Longitude": 0, "Avoid": false, "NoMeasureNoHome": false,
          "Nodes": [{
            "Name": "900a", "RegionID": 900, "HostName": "derp.example.com",
            "CertName": "", "IPv4": "203.0.113.10", "IPv6": "2001:db8::10",
            "STUNPort": 3478, "STUNOnly": false, "DERPPort": 443,
            "InsecureForTests": false, "STUNTestIP": "", "CanPort80": true,
            "SomeFutureField": 7
          }]
        }
      },
      "omitDefaultRegions": true
    }"#;

    #[test]
    fn parses_tailscale_derpmap_json() {
        let map = RelayMap::from_json(EXAMPLE).unwrap();
        assert!(map.omit_default_regions);
        let r = &map.regions[&900];
        assert_eq!(r.region_code, "myr");
        let n = &r.nodes[0];
        assert_eq!(n.host_name, "derp.example.com");
        assert_eq!(
            n.ipv4_addr(),
            NodeAddr::Fixed("203.0.113.10".parse().unwrap())
        );
        assert_eq!(n.stun_port(), Some(3478));
        assert_eq!(n.derp_port(), 443);
        assert!(n.can_port_80);
        assert_eq!(map.home_params.unwrap().region_score[&900], 1.0);
    }

    #[test]
    fn output_uses_go_names_and_omits_empty_fields() {
        let map = RelayMap::from_json(EXAMPLE).unwrap();
        let out = serde_json::to_string(&map).unwrap();
        assert_eq!(
            out,
            concat!(
                r#"{"HomeParams":{"RegionScore":{"900":1.0}},"Regions":{"900":{"RegionID":900,"#,
                r#""RegionCode":"myr","RegionName":"My Region","Nodes":[{"Name":"900a","#,
                r#""RegionID":900,"HostName":"derp.example.com","IPv4":"203.0.113.10","#,
                r#""IPv6":"2001:db8::10","STUNPort":3478,"DERPPort":443,"CanPort80":true}]}},"#,
                r#""omitDefaultRegions":true}"#
            )
        );
        assert_eq!(RelayMap::from_json(&out).unwrap(), map);
    }

    #[test]
    fn port_defaults_and_disabled_families() {
        let n = RelayNode {
            stun_port: -1,
            ipv4: "none".into(),
            ..Default::default()
        };
        assert_eq!(n.stun_port(), None);
        assert_eq!(n.derp_port(), 443);
        assert_eq!(n.ipv4_addr(), NodeAddr::Disabled);
        assert_eq!(n.ipv6_addr(), NodeAddr::Resolve);
        let n = RelayNode::default();
        assert_eq!(n.stun_port(), Some(3478));
    }

    #[test]
    fn load_rejects_inconsistent_region_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("map.json");
        std::fs::write(
            &p,
            EXAMPLE.replace(
                "\"RegionID\": 900, \"HostName\"",
                "\"RegionID\": 901, \"HostName\"",
            ),
        )
        .unwrap();
        let err = RelayMap::load(&p).unwrap_err();
        assert!(err.to_string().contains("RegionID 901"), "{err}");
        std::fs::write(&p, EXAMPLE).unwrap();
        assert!(RelayMap::load(&p).is_ok());
        assert!(RelayMap::load(&dir.path().join("missing.json")).is_err());
    }
}
