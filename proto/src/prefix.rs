//! Lists of IP prefixes as the control protocol sends them (`Addresses`, `AllowedIPs`),
//! parsed once when the message is decoded.
//!
//! One entry that does not parse does not cost the whole network map: it is set aside
//! in [`Prefixes::rejected`] for the receiver to log and count, and the rest is used. A
//! bare address (no `/len`) is taken as a host prefix, since some servers write them so.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most entries kept from one list; a longer list is cut there and the surplus counted
/// as rejected (a node routes a handful of prefixes, not millions).
pub const MAX_PREFIXES: usize = 4096;

/// A parsed prefix list. Derefs to the good entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefixes {
    list: Vec<IpNet>,
    rejected: usize,
}

impl Prefixes {
    /// How many entries of the wire list were not prefixes (or were past
    /// [`MAX_PREFIXES`]).
    pub fn rejected(&self) -> usize {
        self.rejected
    }

    /// Parses one entry: `a.b.c.d/len`, `v6/len`, or a bare address as a host prefix.
    pub fn parse_one(s: &str) -> Option<IpNet> {
        s.parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
    }
}

impl From<Vec<IpNet>> for Prefixes {
    fn from(list: Vec<IpNet>) -> Self {
        Prefixes { list, rejected: 0 }
    }
}

impl FromIterator<IpNet> for Prefixes {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        Prefixes::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl std::ops::Deref for Prefixes {
    type Target = [IpNet];
    fn deref(&self) -> &[IpNet] {
        &self.list
    }
}

impl Serialize for Prefixes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Prefixes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Prefixes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of IP prefixes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Prefixes, A::Error> {
                let mut out = Prefixes::default();
                // Entries of any JSON type are read (and rejected unless they are
                // prefix strings), so one odd entry cannot fail the whole message.
                while let Some(v) = seq.next_element::<serde_json::Value>()? {
                    match v.as_str().and_then(Prefixes::parse_one) {
                        Some(p) if out.list.len() < MAX_PREFIXES => out.list.push(p),
                        _ => out.rejected += 1,
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_entries_kept_bad_ones_counted() {
        let p: Prefixes = serde_json::from_str(
            r#"["100.64.0.1/32","fd7a:115c:a1e0::1/128","10.0.0.0/8","192.0.2.7","nonsense","1.2.3.4/33",7,null]"#,
        )
        .unwrap();
        let text: Vec<String> = p.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            text,
            [
                "100.64.0.1/32",
                "fd7a:115c:a1e0::1/128",
                "10.0.0.0/8",
                "192.0.2.7/32"
            ]
        );
        assert_eq!(p.rejected(), 4);
        // The wire form is the list of good entries.
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"["100.64.0.1/32","fd7a:115c:a1e0::1/128","10.0.0.0/8","192.0.2.7/32"]"#
        );
    }

    #[test]
    fn a_huge_list_is_cut() {
        let entries: Vec<String> = (0..MAX_PREFIXES + 10)
            .map(|i| format!("\"10.{}.{}.0/24\"", (i >> 8) & 255, i & 255))
            .collect();
        let p: Prefixes = serde_json::from_str(&format!("[{}]", entries.join(","))).unwrap();
        assert_eq!(p.len(), MAX_PREFIXES);
        assert_eq!(p.rejected(), 10);
    }

    #[test]
    fn not_a_list_is_an_error() {
        assert!(serde_json::from_str::<Prefixes>(r#""10.0.0.0/8""#).is_err());
    }
}
