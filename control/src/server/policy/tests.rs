//! Policies parsed and compiled end to end, checked against the filters and peer sets
//! they must produce.

use std::collections::BTreeSet;

use proto::tailcfg::CapGrant;

use super::*;

/// Node `n`: 100.64.0.n and fd7a:115c:a1e0::n.
fn node(n: u8, user: &str, tags: &[&str]) -> Identity {
    Identity {
        id: i64::from(n),
        user: user.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        addresses: vec![
            format!("100.64.0.{n}").parse().unwrap(),
            format!("fd7a:115c:a1e0::{n:x}").parse().unwrap(),
        ],
    }
}

/// alice has 1 and 2, bob 3, carol 4; 5 is tag:server and 6 tag:db (both alice's).
fn tailnet() -> Vec<Identity> {
    vec![
        node(1, "alice", &[]),
        node(2, "alice", &[]),
        node(3, "bob", &[]),
        node(4, "carol", &[]),
        node(5, "alice", &["tag:server"]),
        node(6, "alice", &["tag:db"]),
    ]
}

const TAGS: &str = r#""tagOwners": {"tag:server": ["alice@"], "tag:db": ["tag:server"]},"#;

fn ips(nodes: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| format!("100.64.0.{n}")).collect();
    v.extend(nodes.iter().map(|n| format!("fd7a:115c:a1e0::{n:x}")));
    v
}

fn ports(ips: &[String], first: u16, last: u16) -> Vec<NetPortRange> {
    ips.iter()
        .map(|ip| NetPortRange {
            ip: ip.clone(),
            bits: None,
            ports: PortRange { first, last },
        })
        .collect()
}

fn ids(v: &[i64]) -> BTreeSet<i64> {
    v.iter().copied().collect()
}

fn compiled(text: &str) -> Compiled {
    Policy::parse(text)
        .unwrap_or_else(|e| panic!("{e}"))
        .compile(&tailnet())
}

fn refused(text: &str) -> PolicyError {
    Policy::parse(text).expect_err("the policy must be refused")
}

#[test]
fn alice_reaches_the_server_on_tcp_22_only_and_carol_nothing() {
    let c = compiled(&format!(
        r#"{{
  // who owns the servers
  {TAGS}
  /* only alice, only ssh */
  "acls": [
    {{"action": "accept", "src": ["alice@"], "dst": ["tag:server:22"], "proto": "tcp",}},
  ],
}}"#
    ));
    let want = FilterRule {
        src_ips: ips(&[1, 2]),
        dst_ports: ports(&ips(&[5]), 22, 22),
        ip_proto: vec![6],
        ..FilterRule::default()
    };
    assert_eq!(
        c.filter_for(5),
        vec![want],
        "the tagged server is not alice's"
    );
    assert_eq!(c.filter_for(4), vec![]);
    assert_eq!(c.filter_for(1), vec![]);
    assert_eq!(c.peers_of(4), &ids(&[]));
    assert_eq!(c.peers_of(1), &ids(&[5]));
    assert_eq!(c.peers_of(5), &ids(&[1, 2]));
    assert!(c.may_see(2, 5) && !c.may_see(4, 5) && !c.may_see(1, 2));
    assert_eq!(c.filter_for(99), vec![]);
    assert!(c.peers_of(99).is_empty());
}

#[test]
fn syntax_errors_report_their_line() {
    let e = refused("{\n  \"acls\": [\n    {\"action\": \"accept\" \"src\": []}\n  ]\n}");
    assert_eq!(e.line, 3, "{e}");
    assert!(e.to_string().starts_with("line 3, column "), "{e}");
}

#[test]
fn groups_hosts_and_cidrs_resolve() {
    let c = compiled(&format!(
        r#"{{
  "groups": {{"group:admins": ["alice@", "bob@"]}},
  "hosts": {{"office": "192.168.1.0/24", "nas": "100.64.0.4"}},
  {TAGS}
  "acls": [
    {{"action": "accept", "src": ["group:admins", "office"], "dst": ["tag:db:5432", "192.168.2.7:80"]}},
    {{"action": "accept", "src": ["10.0.0.0/8"], "dst": ["nas:445"]}},
  ],
}}"#
    ));
    let mut src = ips(&[1, 2, 3]);
    src.insert(3, "192.168.1.0/24".into());
    let db = c.filter_for(6);
    assert_eq!(db.len(), 1);
    assert_eq!(db[0].src_ips, src);
    assert_eq!(db[0].dst_ports, ports(&ips(&[6]), 5432, 5432));
    assert!(db[0].ip_proto.is_empty(), "no proto: the default set");
    let nas = c.filter_for(4);
    assert_eq!(nas.len(), 1);
    assert_eq!(nas[0].src_ips, vec!["10.0.0.0/8".to_string()]);
    assert_eq!(
        nas[0].dst_ports,
        ports(&["100.64.0.4".into()], 445, 445),
        "a host dst opens only the addresses it covers"
    );
    assert_eq!(c.peers_of(6), &ids(&[1, 2, 3]));
    assert_eq!(c.peers_of(4), &ids(&[]));
}

#[test]
fn host_bits_ranges_and_ports_are_checked_with_their_line() {
    let bad = |dst: &str| {
        refused(&format!(
            "{{\n{TAGS}\n\"acls\": [\n  {{\"action\": \"accept\", \"src\": [\"*\"],\n   \"dst\": [\"{dst}\"]}}]}}"
        ))
    };
    let e = bad("10.0.0.1/24:22");
    assert_eq!((e.line, e.column), (5, 12), "{e}");
    assert!(
        e.reason.contains("CIDR 10.0.0.1/24 has host bits set"),
        "{e}"
    );
    assert!(bad("tag:server:70000").reason.contains("out of range"));
    assert!(bad("tag:server:90-80").reason.contains("backwards"));
    assert!(bad("tag:server").reason.contains("needs ports"));
    assert!(bad("[tag:server]:22").reason.contains("brackets"));
    let e = refused("{\"hosts\": {\"lab\": \"10.0.0.1/8\"}}");
    assert!(e.reason.contains("host bits"), "{e}");
}

#[test]
fn ipv6_destinations_bare_bracketed_and_cidr() {
    let c = compiled(
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": [
            "fd7a:115c:a1e0::5:22", "[fd7a:115c:a1e0::6]:80,443", "fd7a:115c:a1e0::/48:1000-2000"]}]}"#,
    );
    let f = c.filter_for(6);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].src_ips, vec!["*".to_string()]);
    let v6 = vec!["fd7a:115c:a1e0::6".to_string()];
    let mut want = ports(&v6, 80, 80);
    want.extend(ports(&v6, 443, 443));
    want.extend(ports(&v6, 1000, 2000));
    assert_eq!(f[0].dst_ports, want);
    assert_eq!(
        c.filter_for(5)[0].dst_ports[0],
        ports(&["fd7a:115c:a1e0::5".into()], 22, 22)[0]
    );
    assert_eq!(c.peers_of(1), &ids(&[2, 3, 4, 5, 6]), "* reaches everyone");
}

#[test]
fn members_reach_tagged_but_not_each_other() {
    let c = compiled(&format!(
        r#"{{{TAGS} "acls": [{{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:tagged:*"]}}]}}"#
    ));
    let f = c.filter_for(5);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].src_ips, ips(&[1, 2, 3, 4]));
    assert_eq!(f[0].dst_ports, ports(&ips(&[5]), 0, 65535));
    assert_eq!(c.filter_for(1), vec![]);
    assert_eq!(c.peers_of(1), &ids(&[5, 6]));
    assert_eq!(c.peers_of(6), &ids(&[1, 2, 3, 4]));
}

#[test]
fn self_reaches_only_the_users_own_untagged_nodes() {
    let c = compiled(&format!(
        r#"{{{TAGS} "acls": [{{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]}}]}}"#
    ));
    let f = c.filter_for(1);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].src_ips, ips(&[1, 2]));
    assert_eq!(f[0].dst_ports, ports(&ips(&[1]), 22, 22));
    assert_eq!(c.filter_for(4)[0].src_ips, ips(&[4]));
    assert_eq!(c.filter_for(5), vec![], "tagged nodes are nobody's self");
    assert_eq!(c.peers_of(1), &ids(&[2]));
    assert_eq!(c.peers_of(3), &ids(&[]));
    let e =
        refused(r#"{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}"#);
    assert!(e.reason.contains("only be a destination"), "{e}");
}

#[test]
fn users_with_a_domain_match_the_whole_name() {
    let p = Policy::parse(
        r#"{"acls": [{"action": "accept", "src": ["dave@example.com", "erin@"], "dst": ["*:*"]}]}"#,
    )
    .unwrap();
    let nodes = [
        node(1, "dave@example.com", &[]),
        node(2, "dave", &[]),
        node(3, "erin", &[]),
        node(4, "frank", &[]),
    ];
    let f = p.compile(&nodes).filter_for(4);
    assert_eq!(f[0].src_ips, ips(&[1, 3]));
}

#[test]
fn unknown_names_are_refused_at_their_line() {
    for (alias, why) in [
        ("group:nope", "group \"group:nope\" is not defined"),
        ("tag:nope", "tag \"tag:nope\" is not defined"),
        ("nas", "unknown alias \"nas\""),
        ("autogroup:internet", "not supported"),
    ] {
        let e = refused(&format!(
            "{{\n\"acls\": [\n {{\"action\": \"accept\",\n  \"src\": [\"*\", \"{alias}\"], \"dst\": [\"*:*\"]}}]}}"
        ));
        assert_eq!((e.line, e.column), (4, 16), "{alias}: {e}");
        assert!(e.reason.contains(why), "{e}");
    }
    let e = refused("{\"groups\": {\"group:a\": [\"group:b\"]}}");
    assert!(e.reason.contains("groups may not contain groups"), "{e}");
    let e = refused("{\"tagOwners\": {\"tag:a\": [\"group:x\"]}}");
    assert!(e.reason.contains("not defined"), "{e}");
}

#[test]
fn unsupported_sections_and_keys_are_refused() {
    let e = refused("{\n  \"acls\": [],\n  \"ssh\": []\n}");
    assert_eq!((e.line, e.column), (3, 3));
    assert!(
        e.reason.starts_with("section \"ssh\" is not supported yet"),
        "{e}"
    );
    assert!(refused("{\"autoApprovers\": {}}")
        .reason
        .contains("\"autoApprovers\""));
    let e =
        refused(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "users": []}]}"#);
    assert!(e.reason.contains("unknown key \"users\""), "{e}");
    let e = refused(r#"{"acls": [{"action": "drop", "src": ["*"], "dst": ["*:*"]}]}"#);
    assert!(e.reason.contains("only accept"), "{e}");
    let e = refused(r#"{"grants": [{"src": ["*"], "dst": ["*"], "via": ["tag:x"]}]}"#);
    assert!(e.reason.contains("unknown key \"via\""), "{e}");
    assert!(refused(r#"{"grants": [{"src": ["*"], "dst": ["*"]}]}"#)
        .reason
        .contains("needs \"ip\""));
}

#[test]
fn acl_protocols_icmp_is_v4_only_and_takes_no_ports() {
    let c = compiled(&format!(
        r#"{{{TAGS} "acls": [{{"action": "accept", "src": ["bob@"], "dst": ["tag:server:*"], "proto": "icmp"}},
                       {{"action": "accept", "src": ["bob@"], "dst": ["tag:server:*"], "proto": 58}},
                       {{"action": "accept", "src": ["bob@"], "dst": ["tag:server:22"], "proto": ""}}]}}"#
    ));
    let protos: Vec<_> = c.filter_for(5).into_iter().map(|r| r.ip_proto).collect();
    assert_eq!(
        protos,
        vec![vec![1], vec![58], vec![]],
        "\"\" is the default set"
    );
    let e = refused(&format!(
        r#"{{{TAGS} "acls": [{{"action": "accept", "src": ["*"], "dst": ["tag:server:22"], "proto": "icmp"}}]}}"#
    ));
    assert!(e.reason.contains("takes no ports"), "{e}");
}

#[test]
fn grants_compile_ip_by_protocol_and_app_to_cap_grants() {
    let c = compiled(&format!(
        r#"{{
  "groups": {{"group:web": ["bob@"]}},
  {TAGS}
  "grants": [
    {{"src": ["alice@"], "dst": ["tag:server"], "ip": ["tcp:22", "udp:53", "icmp:*", "443", "tcp:80-81"]}},
    {{"src": ["group:web"], "dst": ["tag:server"], "app": {{"example.com/cap/web": [{{"path": "/admin"}}, 7]}}}},
  ],
}}"#
    ));
    let f = c.filter_for(5);
    let server = ips(&[5]);
    let net = |proto: Vec<i64>, dst: Vec<NetPortRange>| FilterRule {
        src_ips: ips(&[1, 2]),
        dst_ports: dst,
        ip_proto: proto,
        ..FilterRule::default()
    };
    let mut tcp = ports(&server[..1], 22, 22);
    tcp.extend(ports(&server[..1], 80, 81));
    tcp.extend(ports(&server[1..], 22, 22));
    tcp.extend(ports(&server[1..], 80, 81));
    let cap = FilterRule {
        src_ips: ips(&[3]),
        cap_grant: vec![CapGrant {
            dsts: vec!["100.64.0.5/32".into(), "fd7a:115c:a1e0::5/128".into()],
            cap_map: [(
                "example.com/cap/web".to_string(),
                vec![serde_json::json!({"path": "/admin"}), serde_json::json!(7)],
            )]
            .into(),
            ..CapGrant::default()
        }],
        ..FilterRule::default()
    };
    let want = vec![
        net(vec![6], tcp),
        net(vec![17], ports(&server, 53, 53)),
        net(vec![1], ports(&server, 0, 65535)),
        net(vec![], ports(&server, 443, 443)),
        cap,
    ];
    assert_eq!(f, want);
    assert_eq!(c.peers_of(3), &ids(&[5]), "a capability makes peers too");
    assert_eq!(c.peers_of(5), &ids(&[1, 2, 3]));
}

const TESTED: &str = r#"{
  "groups": {"group:ops": ["bob@"]},
  "hosts": {"office": "192.168.1.0/24"},
  "tagOwners": {"tag:server": ["group:ops"]},
  "acls": [
    {"action": "accept", "src": ["alice@", "group:ops"], "dst": ["tag:server:22"]},
    {"action": "accept", "src": ["office"], "dst": ["tag:server:443"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
  "tests": [
    {"src": "alice@", "accept": ["tag:server:22", "alice@:8080"], "deny": ["tag:server:80", "bob@:22"]},
    {"src": "bob@", "proto": "udp", "accept": ["tag:server:22"]},
    {"src": "192.168.1.9", "accept": ["tag:server:443"], "deny": ["tag:server:22"]},
    {"src": "tag:server", "deny": ["alice@:22"]},
    MORE
  ],
}"#;

#[test]
fn tests_section_passes_and_a_failing_test_names_its_line() {
    Policy::parse(&TESTED.replace("MORE", "")).unwrap_or_else(|e| panic!("{e}"));
    let e = refused(&TESTED.replace(
        "MORE",
        "{\"src\": \"bob@\",\n     \"deny\": [\"tag:server:22\"]},",
    ));
    assert_eq!(e.line, 16, "{e}");
    assert!(e.reason.starts_with("test at line 15 failed"), "{e}");
    assert!(e.reason.contains("tag:server:22"), "{e}");
    let e = refused(&TESTED.replace(
        "MORE",
        "{\"src\": \"carol@\", \"accept\": [\"office:443\"]},",
    ));
    assert!(e.reason.contains("is denied"), "{e}");
    let e = refused(&TESTED.replace(
        "MORE",
        "{\"src\": \"alice@\", \"accept\": [\"tag:server:1-2\"]},",
    ));
    assert!(e.reason.contains("one port"), "{e}");
    let e = refused(&TESTED.replace("MORE", "{\"src\": \"group:ops\", \"accept\": []},"));
    assert!(e.reason.contains("must be a user, tag, host or IP"), "{e}");
}

#[test]
fn allow_all_opens_everything() {
    let a = allow_all();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].src_ips, vec!["*".to_string()]);
    assert_eq!(a[0].dst_ports[0].ip, "*");
    assert_eq!(a[0].dst_ports[0].ports, PortRange::ANY);
}

#[test]
fn a_thousand_nodes_and_a_hundred_rules_compile() {
    let mut text = String::from("{\"tagOwners\": {");
    for t in 0..10 {
        text += &format!("\"tag:t{t}\": [],");
    }
    text += "}, \"acls\": [";
    for r in 0..100 {
        let (src, dst) = match r % 4 {
            0 => (
                format!("u{}@", r % 50),
                format!("tag:t{}:{}", r % 10, 1000 + r),
            ),
            1 => ("autogroup:member".into(), format!("tag:t{}:*", r % 10)),
            2 => ("*".into(), "autogroup:self:22".into()),
            _ => (format!("tag:t{}", r % 10), "100.64.0.0/10:443".into()),
        };
        text += &format!("{{\"action\": \"accept\", \"src\": [\"{src}\"], \"dst\": [\"{dst}\"]}},");
    }
    text += "]}";
    let nodes: Vec<Identity> = (0..1000u32)
        .map(|i| Identity {
            id: i64::from(i),
            user: format!("u{}", i % 50),
            tags: match i % 5 {
                0 => vec![format!("tag:t{}", i % 10)],
                _ => vec![],
            },
            addresses: vec![
                std::net::Ipv4Addr::from(0x6440_0000 + i).into(),
                std::net::Ipv6Addr::from(0xfd7a_115c_a1e0_u128 << 80 | u128::from(i)).into(),
            ],
        })
        .collect();
    let c = Policy::parse(&text).unwrap().compile(&nodes);
    for id in [0, 1, 499, 999] {
        assert!(!c.peers_of(id).contains(&id));
        for rule in c.filter_for(id) {
            let own: Vec<String> = nodes[id as usize]
                .addresses
                .iter()
                .map(|a| a.to_string())
                .collect();
            assert!(
                rule.dst_ports.iter().all(|d| own.contains(&d.ip)),
                "narrowed to the node"
            );
            assert!(!rule.src_ips.is_empty());
        }
    }
    // Everything reaches every node on 443 (rules 3, 7, ... from tags to the CGNAT range).
    assert!(c.peers_of(1).len() >= 100);
    let self_rule = c
        .filter_for(1)
        .into_iter()
        .find(|r| r.dst_ports[0].ports.first == 22);
    assert_eq!(
        self_rule.map(|r| r.src_ips.len()),
        Some(2 * 20),
        "u1's 20 untagged nodes"
    );
}

#[test]
fn mangled_policies_never_panic_and_compile_consistently() {
    use rand::{Rng, SeedableRng};
    let base = TESTED.replace("MORE", "").replace(
        "\"tests\"",
        "\"grants\": [{\"src\": [\"group:ops\"], \"dst\": [\"tag:server\", \"autogroup:self\"], \"ip\": [\"icmp:*\", \"22\"], \"app\": {\"a.com/b\": [1]}}],\n  \"tests\"",
    );
    Policy::parse(&base).unwrap_or_else(|e| panic!("{e}"));
    let tokens = [
        "\"",
        ",",
        ":",
        "/*",
        "//",
        "*",
        "]",
        "}",
        "[",
        "tag:server",
        "65536",
        "\n",
        "@",
        "-",
        "::",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let nodes = tailnet();
    let mut parsed = 0;
    for _ in 0..3000 {
        let mut text = base.clone();
        for _ in 0..rng.gen_range(1..4) {
            let mut at = rng.gen_range(0..=text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            match rng.gen_range(0..3) {
                0 => text.insert_str(at, tokens[rng.gen_range(0..tokens.len())]),
                1 => drop(text.drain(at..(at + rng.gen_range(1..8)).min(text.len()))),
                _ => text.replace_range(at..at, &base[..rng.gen_range(0..base.len() / 4)]),
            }
        }
        let Ok(p) = Policy::parse(&text) else {
            let e = Policy::parse(&text).unwrap_err();
            assert!(e.line >= 1 && e.line <= text.split('\n').count(), "{e}");
            continue;
        };
        parsed += 1;
        let c = p.compile(&nodes);
        for n in &nodes {
            let own: Vec<String> = n.addresses.iter().map(|a| a.to_string()).collect();
            assert!(c
                .filter_for(n.id)
                .iter()
                .all(|r| r.dst_ports.iter().all(|d| own.contains(&d.ip))));
            assert!(c
                .peers_of(n.id)
                .iter()
                .all(|p| *p != n.id && c.may_see(*p, n.id)));
        }
    }
    assert!(parsed > 20, "some mangled policies still parse ({parsed})");
}
