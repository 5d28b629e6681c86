//! The policy file's sections read into rules, every name checked, and the `tests` section
//! run against the rules.
//!
//! Facts followed (juanfont/headscale `hscontrol/policy/v2/types.go`, tailscale/tailscale
//! `tailcfg/proto_port_range.go` and `types/ipproto/ipproto.go`):
//! - a user is written with an `@` (`alice@` for the user named `alice`); a tagged node
//!   is known by its tags only, never by its user;
//! - `ALIAS:PORTS` splits at the last colon; ports are `*`, `N`, `N-M` or a comma list of
//!   those, each within 1-65535 and first <= last;
//! - protocols by IANA name or number 1-255; `icmp` is ICMPv4 (1) only, ICMPv6 is
//!   `ipv6-icmp` (58), as in both; an absent protocol means TCP, UDP, ICMPv4 and ICMPv6
//!   (the client's default for an empty `IPProto`); only TCP, UDP and SCTP take specific
//!   ports (Headscale), other protocols `*`;
//! - a grant's `ip` entry is `*`, `PORTS` or `PROTO:PORTS`; its `app` maps capability
//!   names to lists of JSON values;
//! - a test names one source and `ALIAS:PORT` destinations, over TCP unless `proto`
//!   (TCP, UDP or SCTP) says otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use proto::tailcfg::PortRange;
use serde_json::Value;

use super::hujson::{Field, Json, Kind};
use super::PolicyError;

/// What a source or destination names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Alias {
    /// `*`: any address.
    Any,
    /// The untagged nodes of the user with this name.
    User(String),
    /// The untagged nodes of this group's users (the name includes `group:`).
    Group(String),
    /// The nodes with this tag (the name includes `tag:`).
    Tag(String),
    /// `autogroup:member`: every untagged node.
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:self` (destinations only): the source user's own untagged nodes.
    SelfDevices,
    /// An address or CIDR, written directly or through `hosts`.
    Net(IpNet),
}

/// Destinations reachable over one protocol set, each with the ports it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Access {
    /// IANA protocol numbers; empty = TCP, UDP, ICMPv4, ICMPv6.
    pub proto: Vec<i64>,
    pub dst: Vec<(Alias, Vec<PortRange>)>,
}

/// One `acls` or `grants` entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Rule {
    pub src: Vec<Alias>,
    pub ip: Vec<Access>,
    /// Capabilities granted on `app_dst` (empty: none).
    pub app: BTreeMap<String, Vec<Value>>,
    pub app_dst: Vec<Alias>,
}

/// The parsed policy's content, before compiling for nodes.
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Model {
    /// `group:NAME` → user names.
    pub groups: BTreeMap<String, Vec<String>>,
    pub rules: Vec<Rule>,
}

const SECTIONS: [&str; 6] = ["groups", "hosts", "tagOwners", "acls", "grants", "tests"];
const TCP: i64 = 6;
const UDP: i64 = 17;
const SCTP: i64 = 132;
/// What an empty `IPProto` stands for: TCP, UDP, ICMPv4, ICMPv6.
const DEFAULT_PROTOS: [i64; 4] = [TCP, UDP, 1, 58];
const PROTOCOLS: [(&str, i64); 15] = [
    ("ah", 51),
    ("egp", 8),
    ("esp", 50),
    ("fc", 133),
    ("gre", 47),
    ("icmp", 1),
    ("igmp", 2),
    ("igp", 9),
    ("ip-in-ip", 4),
    ("ipv4", 4),
    ("ipv6-icmp", 58),
    ("sctp", SCTP),
    ("tcp", TCP),
    ("udp", UDP),
    ("icmpv6", 58),
];

/// Reads the policy tree `root` of `text` (for positions).
pub(super) fn model(text: &str, root: &Json) -> Result<Model, PolicyError> {
    let r = Reader {
        text,
        groups: BTreeMap::new(),
        hosts: BTreeMap::new(),
        tags: BTreeSet::new(),
    };
    r.read(root)
}

struct Reader<'t> {
    text: &'t str,
    groups: BTreeMap<String, Vec<String>>,
    hosts: BTreeMap<String, IpNet>,
    tags: BTreeSet<String>,
}

/// A test's source or destination: something with an identity of its own.
#[derive(Debug)]
enum Principal {
    User(String),
    Tag(String),
    Net(IpNet),
}

impl Reader<'_> {
    fn err(&self, at: usize, reason: impl Into<String>) -> PolicyError {
        PolicyError::at(self.text, at, reason)
    }

    fn object<'j>(&self, j: &'j Json, what: &str) -> Result<&'j [Field], PolicyError> {
        match &j.kind {
            Kind::Object(f) => Ok(f),
            _ => Err(self.err(j.at, format!("{what} must be an object"))),
        }
    }

    fn array<'j>(&self, j: &'j Json, what: &str) -> Result<&'j [Json], PolicyError> {
        match &j.kind {
            Kind::Array(a) => Ok(a),
            _ => Err(self.err(j.at, format!("{what} must be an array"))),
        }
    }

    fn string<'j>(&self, j: &'j Json, what: &str) -> Result<&'j str, PolicyError> {
        match &j.kind {
            Kind::Str(s) => Ok(s),
            _ => Err(self.err(j.at, format!("{what} must be a string"))),
        }
    }

    /// An array of strings (non-empty if `needed`), each with its offset.
    fn strings<'j>(
        &self,
        j: &'j Json,
        what: &str,
        needed: bool,
    ) -> Result<Vec<(&'j str, usize)>, PolicyError> {
        let items = self.array(j, what)?;
        if needed && items.is_empty() {
            return Err(self.err(j.at, format!("{what} must not be empty")));
        }
        items
            .iter()
            .map(|i| Ok((self.string(i, &format!("each entry of {what}"))?, i.at)))
            .collect()
    }

    /// The fields of an entry, refusing keys outside `known` and requiring `required`.
    fn entry<'j>(
        &self,
        j: &'j Json,
        what: &str,
        known: &[&str],
        required: &[&str],
    ) -> Result<BTreeMap<&'j str, &'j Json>, PolicyError> {
        let fields = self.object(j, what)?;
        if let Some(f) = fields.iter().find(|f| !known.contains(&f.key.as_str())) {
            return Err(self.err(
                f.at,
                format!(
                    "unknown key {:?} in {what} (known: {})",
                    f.key,
                    known.join(", ")
                ),
            ));
        }
        let map: BTreeMap<_, _> = fields.iter().map(|f| (f.key.as_str(), &f.value)).collect();
        if let Some(k) = required.iter().find(|k| !map.contains_key(*k)) {
            return Err(self.err(j.at, format!("{what} needs {k:?}")));
        }
        Ok(map)
    }

    fn read(mut self, root: &Json) -> Result<Model, PolicyError> {
        let top = self.object(root, "the policy")?;
        if let Some(f) = top.iter().find(|f| !SECTIONS.contains(&f.key.as_str())) {
            return Err(self.err(
                f.at,
                format!(
                    "section {:?} is not supported yet (supported: {})",
                    f.key,
                    SECTIONS.join(", ")
                ),
            ));
        }
        let section = |name: &str| top.iter().find(|f| f.key == name).map(|f| &f.value);
        if let Some(g) = section("groups") {
            self.read_groups(g)?;
        }
        if let Some(h) = section("hosts") {
            self.read_hosts(h)?;
        }
        if let Some(t) = section("tagOwners") {
            self.read_tag_owners(t)?;
        }
        let mut rules = Vec::new();
        if let Some(acls) = section("acls") {
            for a in self.array(acls, "acls")? {
                rules.push(self.read_acl(a)?);
            }
        }
        if let Some(grants) = section("grants") {
            for g in self.array(grants, "grants")? {
                rules.push(self.read_grant(g)?);
            }
        }
        let model = Model {
            groups: self.groups.clone(),
            rules,
        };
        if let Some(tests) = section("tests") {
            for t in self.array(tests, "tests")? {
                self.run_test(t, &model)?;
            }
        }
        Ok(model)
    }

    fn read_groups(&mut self, j: &Json) -> Result<(), PolicyError> {
        for f in self.object(j, "groups")? {
            if f.key.strip_prefix("group:").is_none_or(str::is_empty) {
                return Err(self.err(f.at, format!("group name {:?} must be group:NAME", f.key)));
            }
            let mut users = Vec::new();
            for m in self.array(&f.value, &f.key)? {
                let m_str = self.string(m, "a group member")?;
                match user_name(m_str) {
                    Some(u) => users.push(u),
                    None if m_str.starts_with("group:") => {
                        return Err(self.err(m.at, format!("groups may not contain groups ({m_str:?} in {})", f.key)))
                    }
                    None => {
                        return Err(self.err(
                            m.at,
                            format!("group member {m_str:?} is not a user (users are written name@ or name@domain)"),
                        ))
                    }
                }
            }
            self.groups.insert(f.key.clone(), users);
        }
        Ok(())
    }

    fn read_hosts(&mut self, j: &Json) -> Result<(), PolicyError> {
        for f in self.object(j, "hosts")? {
            if f.key.is_empty()
                || f.key == "*"
                || f.key.contains([':', '@', '/'])
                || f.key.parse::<IpAddr>().is_ok()
            {
                return Err(self.err(f.at, format!("host name {:?} must be a plain name", f.key)));
            }
            let value = self.string(&f.value, "a host")?;
            match parse_net(value) {
                Ok(Some(n)) => {
                    self.hosts.insert(f.key.clone(), n);
                }
                Ok(None) => {
                    return Err(self.err(
                        f.value.at,
                        format!("host {:?}: {value:?} is not an IP or CIDR", f.key),
                    ))
                }
                Err(e) => return Err(self.err(f.value.at, format!("host {:?}: {e}", f.key))),
            }
        }
        Ok(())
    }

    fn read_tag_owners(&mut self, j: &Json) -> Result<(), PolicyError> {
        let fields = self.object(j, "tagOwners")?;
        for f in fields {
            if let Err(e) = super::check_tag(&f.key) {
                return Err(self.err(f.at, e));
            }
            self.tags.insert(f.key.clone());
        }
        for f in fields {
            for o in self.array(&f.value, &f.key)? {
                let owner = self.string(o, "a tag owner")?;
                match self.alias(owner, false) {
                    Ok(Alias::User(_) | Alias::Group(_) | Alias::Tag(_)) => {}
                    Ok(_) => {
                        let reason = format!("tag owner {owner:?} must be a user, group or tag");
                        return Err(self.err(o.at, reason));
                    }
                    Err(e) => return Err(self.err(o.at, format!("tag owner: {e}"))),
                }
            }
        }
        Ok(())
    }

    /// An alias in a source (`dst` false) or destination, without ports.
    fn alias(&self, s: &str, dst: bool) -> Result<Alias, String> {
        if s == "*" {
            return Ok(Alias::Any);
        }
        if let Some(ag) = s.strip_prefix("autogroup:") {
            return match ag {
                "member" => Ok(Alias::Member),
                "tagged" => Ok(Alias::Tagged),
                "self" if dst => Ok(Alias::SelfDevices),
                "self" => Err("autogroup:self can only be a destination".into()),
                _ => Err(format!("{s:?} is not supported (autogroup:member, autogroup:tagged, autogroup:self are)")),
            };
        }
        if s.starts_with("group:") {
            return match self.groups.contains_key(s) {
                true => Ok(Alias::Group(s.into())),
                false => Err(format!("group {s:?} is not defined in groups")),
            };
        }
        if s.starts_with("tag:") {
            return match self.tags.contains(s) {
                true => Ok(Alias::Tag(s.into())),
                false => Err(format!("tag {s:?} is not defined in tagOwners")),
            };
        }
        if s.contains('@') {
            return user_name(s)
                .map(Alias::User)
                .ok_or_else(|| format!("user {s:?} has no name before the @"));
        }
        if let Some(n) = self.hosts.get(s) {
            return Ok(Alias::Net(*n));
        }
        match parse_net(s)? {
            Some(n) => Ok(Alias::Net(n)),
            None => Err(format!(
                "unknown alias {s:?}: not a user (name@), group:, tag:, autogroup:, host or IP"
            )),
        }
    }

    /// Aliases from an array of strings, errors pointing at the offending entry.
    fn aliases(&self, j: &Json, what: &str, dst: bool) -> Result<Vec<Alias>, PolicyError> {
        self.strings(j, what, true)?
            .into_iter()
            .map(|(s, at)| self.alias(s, dst).map_err(|e| self.err(at, e)))
            .collect()
    }

    /// `ALIAS:PORTS`, split at the last colon or after `[IPv6]`.
    fn alias_ports(&self, s: &str) -> Result<(Alias, Vec<PortRange>), String> {
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (host, ports) = rest
                .split_once("]:")
                .ok_or_else(|| format!("destination {s:?} must be [IPv6]:PORTS"))?;
            if parse_net(host).ok().flatten().is_none() {
                return Err(format!(
                    "destination {s:?}: only an IP address goes in brackets"
                ));
            }
            (host, ports)
        } else {
            s.rsplit_once(':')
                .ok_or_else(|| format!("destination {s:?} needs ports: ALIAS:PORTS"))?
        };
        let ports = match parse_ports(ports) {
            Ok(p) => p,
            Err(_) if self.alias(s, true).is_ok() => {
                return Err(format!("destination {s:?} needs ports: ALIAS:PORTS"))
            }
            Err(e) => return Err(format!("destination {s:?}: {e}")),
        };
        Ok((self.alias(host, true)?, ports))
    }

    fn read_acl(&self, j: &Json) -> Result<Rule, PolicyError> {
        let e = self.entry(
            j,
            "an acl",
            &["action", "src", "dst", "proto"],
            &["action", "src", "dst"],
        )?;
        // Required keys are there: `get` never falls back to the entry.
        let get = |k: &str| e.get(k).copied().unwrap_or(j);
        let action = self.string(get("action"), "action")?;
        if action != "accept" {
            let reason = format!("action {action:?} is not supported: acls only accept");
            return Err(self.err(get("action").at, reason));
        }
        let src = self.aliases(get("src"), "src", false)?;
        let proto = match e.get("proto") {
            Some(p) => self.proto(p)?,
            None => Vec::new(),
        };
        let mut dst = Vec::new();
        for (s, at) in self.strings(get("dst"), "dst", true)? {
            let (alias, ports) = self.alias_ports(s).map_err(|e| self.err(at, e))?;
            check_proto_ports(&proto, &ports).map_err(|e| self.err(at, e))?;
            dst.push((alias, ports));
        }
        Ok(Rule {
            src,
            ip: vec![Access { proto, dst }],
            app: BTreeMap::new(),
            app_dst: Vec::new(),
        })
    }

    /// A protocol given as a name, a number, or a number in a string; `""` is the
    /// default set (empty).
    fn proto(&self, j: &Json) -> Result<Vec<i64>, PolicyError> {
        let text = match &j.kind {
            Kind::Str(s) if s.is_empty() => return Ok(Vec::new()),
            Kind::Str(s) => s.clone(),
            Kind::Number(n) => n.to_string(),
            _ => return Err(self.err(j.at, "proto must be a protocol name or number")),
        };
        parse_proto(&text)
            .map(|p| vec![p])
            .map_err(|e| self.err(j.at, e))
    }

    fn read_grant(&self, j: &Json) -> Result<Rule, PolicyError> {
        let e = self.entry(j, "a grant", &["src", "dst", "ip", "app"], &["src", "dst"])?;
        let get = |k: &str| e.get(k).copied().unwrap_or(j);
        let src = self.aliases(get("src"), "src", false)?;
        let dst = self.aliases(get("dst"), "dst", true)?;
        // Entries grouped by protocol, in order of first appearance.
        let mut by_proto: Vec<(Vec<i64>, Vec<PortRange>)> = Vec::new();
        if let Some(ip) = e.get("ip") {
            for (s, at) in self.strings(ip, "ip", true)? {
                let (proto, ports) = parse_ip_entry(s).map_err(|e| self.err(at, e))?;
                match by_proto.iter_mut().find(|(p, _)| *p == proto) {
                    Some((_, all)) => all.extend(ports),
                    None => by_proto.push((proto, ports)),
                }
            }
        }
        let ip = by_proto
            .into_iter()
            .map(|(proto, ports)| Access {
                proto,
                dst: dst.iter().map(|a| (a.clone(), ports.clone())).collect(),
            })
            .collect();
        let mut app = BTreeMap::new();
        if let Some(a) = e.get("app") {
            for f in self.object(a, "app")? {
                if f.key.is_empty() || !f.key.contains('/') {
                    return Err(self.err(
                        f.at,
                        format!("capability name {:?} must be DOMAIN/PATH", f.key),
                    ));
                }
                let values = self.array(&f.value, &format!("capability {:?}", f.key))?;
                app.insert(f.key.clone(), values.iter().map(Json::to_value).collect());
            }
        }
        if !e.contains_key("ip") && app.is_empty() {
            return Err(self.err(j.at, "a grant needs \"ip\" or a non-empty \"app\""));
        }
        let app_dst = if app.is_empty() { Vec::new() } else { dst };
        Ok(Rule {
            src,
            ip,
            app,
            app_dst,
        })
    }

    /// A test's source or destination alias: a user, tag, host or IP.
    fn principal(&self, s: &str) -> Result<Principal, String> {
        match self.alias(s, false)? {
            Alias::User(u) => Ok(Principal::User(u)),
            Alias::Tag(t) => Ok(Principal::Tag(t)),
            Alias::Net(n) => Ok(Principal::Net(n)),
            _ => Err(format!("{s:?} in a test must be a user, tag, host or IP")),
        }
    }

    fn run_test(&self, j: &Json, model: &Model) -> Result<(), PolicyError> {
        let e = self.entry(j, "a test", &["src", "accept", "deny", "proto"], &["src"])?;
        let (line, _) = super::hujson::position(self.text, j.at);
        let src_json = e.get("src").copied().unwrap_or(j);
        let src_text = self.string(src_json, "a test's src")?;
        let src = self
            .principal(src_text)
            .map_err(|e| self.err(src_json.at, e))?;
        let proto = match e.get("proto") {
            Some(p) => {
                let p_num = self.proto(p)?.first().copied().unwrap_or(TCP);
                if ![TCP, UDP, SCTP].contains(&p_num) {
                    return Err(self.err(p.at, "a test's proto must be tcp, udp or sctp"));
                }
                p_num
            }
            None => TCP,
        };
        for (key, want) in [("accept", true), ("deny", false)] {
            let Some(list) = e.get(key) else { continue };
            for (s, at) in self.strings(list, key, false)? {
                let (dst, port) = self.test_dst(s).map_err(|e| self.err(at, e))?;
                if allowed(model, &src, &dst, port, proto) != want {
                    let verdict = if want { "denied" } else { "allowed" };
                    return Err(self.err(
                        at,
                        format!("test at line {line} failed: {src_text} to {s} is {verdict} but listed under {key:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn test_dst(&self, s: &str) -> Result<(Principal, u16), String> {
        let (host, ports) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("test destination {s:?} must be ALIAS:PORT"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let dst = self.principal(host)?;
        match parse_ports(ports).map_err(|e| format!("test destination {s:?}: {e}"))?[..] {
            [PortRange { first, last }] if first == last => Ok((dst, first)),
            _ => Err(format!("test destination {s:?} must name one port")),
        }
    }
}

/// Whether some rule lets `src` reach `dst` on `port` over `proto`, judged by names alone.
fn allowed(model: &Model, src: &Principal, dst: &Principal, port: u16, proto: i64) -> bool {
    let covers = |a: &Alias, p: &Principal, from: Option<&Principal>| match (a, p) {
        (Alias::Any, _)
        | (Alias::Member, Principal::User(_))
        | (Alias::Tagged, Principal::Tag(_)) => true,
        (Alias::User(u), Principal::User(v)) | (Alias::Tag(u), Principal::Tag(v)) => u == v,
        (Alias::Group(g), Principal::User(v)) => model.groups.get(g).is_some_and(|m| m.contains(v)),
        (Alias::SelfDevices, Principal::User(v)) => {
            matches!(from, Some(Principal::User(u)) if u == v)
        }
        (Alias::Net(n), Principal::Net(p)) => n.contains(p),
        _ => false,
    };
    model.rules.iter().any(|r| {
        r.src.iter().any(|a| covers(a, src, None))
            && r.ip.iter().any(|acc| {
                (acc.proto.contains(&proto)
                    || acc.proto.is_empty() && DEFAULT_PROTOS.contains(&proto))
                    && acc.dst.iter().any(|(a, ports)| {
                        covers(a, dst, Some(src))
                            && ports.iter().any(|r| r.first <= port && port <= r.last)
                    })
            })
    })
}

/// The user name an alias with an `@` stands for: `alice@` → `alice`, `alice@example.com`
/// → itself. None without an `@` or without a name before it.
pub(super) fn user_name(s: &str) -> Option<String> {
    let (name, domain) = s.rsplit_once('@')?;
    if name.is_empty() {
        return None;
    }
    Some(if domain.is_empty() { name } else { s }.to_string())
}

/// An IP (as a one-address prefix) or a CIDR without host bits; None if `s` is neither
/// and has no `/`.
fn parse_net(s: &str) -> Result<Option<IpNet>, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(ip)));
    }
    if !s.contains('/') {
        return Ok(None);
    }
    let n: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not a valid CIDR"))?;
    if n.trunc() != n {
        return Err(format!(
            "CIDR {s} has host bits set (the network is {})",
            n.trunc()
        ));
    }
    Ok(Some(n))
}

/// `*`, or a comma list of `N` and `N-M`.
fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    if s == "*" {
        return Ok(vec![PortRange::ANY]);
    }
    let port = |p: &str| -> Result<u16, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "port {p:?} is not a number (ports are *, N, N-M or a list)"
            ));
        }
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("port {p} is out of range (1-65535)")),
        }
    };
    s.split(',')
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (first, last) = (port(a)?, port(b)?);
            if first > last {
                return Err(format!("port range {r} runs backwards"));
            }
            Ok(PortRange { first, last })
        })
        .collect()
}

/// A protocol name (any case) or number 1-255 without leading zeros.
fn parse_proto(s: &str) -> Result<i64, String> {
    let lower = s.to_ascii_lowercase();
    if let Some((_, n)) = PROTOCOLS.iter().find(|(name, _)| *name == lower) {
        return Ok(*n);
    }
    match s.parse::<i64>() {
        Ok(n @ 1..=255) if s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0') => Ok(n),
        _ => Err(format!(
            "protocol {s:?} is not a known name or a number 1-255"
        )),
    }
}

/// Only TCP, UDP and SCTP (or the default set) take specific ports.
fn check_proto_ports(proto: &[i64], ports: &[PortRange]) -> Result<(), String> {
    let takes_ports = proto.iter().all(|p| [TCP, UDP, SCTP].contains(p));
    if takes_ports || ports.iter().all(|p| *p == PortRange::ANY) {
        return Ok(());
    }
    Err(format!(
        "protocol {} takes no ports; use *",
        proto.first().copied().unwrap_or(0)
    ))
}

/// A grant's `ip` entry: `*`, `PORTS` or `PROTO:PORTS`.
fn parse_ip_entry(s: &str) -> Result<(Vec<i64>, Vec<PortRange>), String> {
    let (proto, ports) = match s.split_once(':') {
        None => (Vec::new(), parse_ports(s)?),
        Some((p, ports)) if !ports.contains(':') => (vec![parse_proto(p)?], parse_ports(ports)?),
        Some(_) => return Err(format!("ip entry {s:?} must be *, PORTS or PROTO:PORTS")),
    };
    check_proto_ports(&proto, &ports)?;
    Ok((proto, ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn ports_lists_ranges_and_limits() {
        assert_eq!(parse_ports("*").unwrap(), vec![PortRange::ANY]);
        assert_eq!(
            parse_ports("80,443,1000-2000").unwrap(),
            vec![pr(80, 80), pr(443, 443), pr(1000, 2000)]
        );
        assert!(parse_ports("65536").unwrap_err().contains("out of range"));
        assert!(parse_ports("0").unwrap_err().contains("out of range"));
        assert!(parse_ports("90-80").unwrap_err().contains("backwards"));
        assert!(parse_ports("22,").is_err());
        assert!(parse_ports("+22").is_err());
        assert!(parse_ports("1-2-3").is_err());
    }

    #[test]
    fn protocols_by_name_and_number() {
        assert_eq!(parse_proto("TCP"), Ok(6));
        assert_eq!(parse_proto("icmp"), Ok(1));
        assert_eq!(parse_proto("ipv6-icmp"), Ok(58));
        assert_eq!(parse_proto("47"), Ok(47));
        assert!(parse_proto("0").is_err());
        assert!(parse_proto("017").is_err());
        assert!(parse_proto("256").is_err());
        assert!(parse_proto("quic").is_err());
        assert_eq!(
            parse_ip_entry("icmp:*"),
            Ok((vec![1], vec![PortRange::ANY]))
        );
        assert!(parse_ip_entry("icmp:22")
            .unwrap_err()
            .contains("takes no ports"));
        assert_eq!(parse_ip_entry("443"), Ok((vec![], vec![pr(443, 443)])));
        assert!(parse_ip_entry("tcp:1:2").is_err());
    }

    #[test]
    fn users_by_name_or_whole_address() {
        assert_eq!(user_name("alice@").as_deref(), Some("alice"));
        assert_eq!(
            user_name("alice@example.com").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(user_name("@example.com"), None);
        assert_eq!(user_name("alice"), None);
    }

    #[test]
    fn nets_refuse_host_bits() {
        assert_eq!(
            parse_net("10.0.0.0/24")
                .unwrap()
                .map(|n| n.to_string())
                .as_deref(),
            Some("10.0.0.0/24")
        );
        assert_eq!(
            parse_net("fd7a::1")
                .unwrap()
                .map(|n| n.to_string())
                .as_deref(),
            Some("fd7a::1/128")
        );
        assert_eq!(
            parse_net("10.0.0.1/24").unwrap_err(),
            "CIDR 10.0.0.1/24 has host bits set (the network is 10.0.0.0/24)"
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        assert_eq!(parse_net("web"), Ok(None));
    }
}
