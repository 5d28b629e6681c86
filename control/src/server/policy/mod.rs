//! The tailnet policy file: who may reach whom. Parsed and checked once ([`Policy::parse`]),
//! then compiled for the current nodes ([`Policy::compile`]) into each node's packet
//! filter and the set of peers it may see. Pure: no I/O, no clock.
//!
//! The file is HuJSON with the sections `groups`, `hosts`, `tagOwners`, `acls`, `grants`
//! and `tests`, as Tailscale's "tailnet policy file syntax" and juanfont/headscale
//! `hscontrol/policy/v2/types.go` describe them; any other section is refused, not
//! ignored, so a rule the server would not enforce never looks enforced. Not for: SSH
//! rules, auto-approvers, posture checks, node attributes, subnet routes or exit nodes.
//!
//! - [`hujson`]: comments and trailing commas, positions kept;
//! - [`parse`]: sections into rules, names checked, `tests` run;
//! - [`compile`]: rules into per-node `FilterRule`s and peer sets.

mod compile;
mod hujson;
mod parse;

use std::fmt;
use std::net::IpAddr;

use proto::tailcfg::{FilterRule, NetPortRange, PortRange};

pub use compile::Compiled;

/// A parsed, checked policy whose `tests` all passed.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    model: parse::Model,
}

/// Why a policy file was refused and where: 1-based line, and 1-based byte column (0
/// when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

impl PolicyError {
    /// An error at byte offset `at` of `text`.
    fn at(text: &str, at: usize, reason: impl Into<String>) -> PolicyError {
        let (line, column) = hujson::position(text, at);
        PolicyError {
            line,
            column,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            0 => write!(f, "line {}: {}", self.line, self.reason),
            c => write!(f, "line {}, column {c}: {}", self.line, self.reason),
        }
    }
}

impl std::error::Error for PolicyError {}

/// A node as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: i64,
    /// The owning user's name; ignored when the node is tagged.
    pub user: String,
    pub tags: Vec<String>,
    /// Its tunnel addresses (one IPv4, one IPv6).
    pub addresses: Vec<IpAddr>,
}

impl Policy {
    /// Parses and checks HuJSON `text`, then runs its `tests`.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let root = hujson::parse(text)?;
        Ok(Policy {
            model: parse::model(text, &root)?,
        })
    }

    /// Compiles the policy for `nodes` (of several nodes with one id, the first counts).
    pub fn compile(&self, nodes: &[Identity]) -> Compiled {
        compile::compile(&self.model, nodes)
    }
}

/// Checks a tag's spelling: `tag:` and a name of letters, digits and dashes that starts
/// with a letter (as Tailscale requires).
pub fn check_tag(tag: &str) -> Result<(), String> {
    let ok = tag.strip_prefix("tag:").is_some_and(|name| {
        name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be tag:NAME (letters, digits and dashes, starting with a letter)"
        ))
    }
}

/// The filter without a policy: anything may reach anything.
pub fn allow_all() -> Vec<FilterRule> {
    vec![FilterRule {
        src_ips: vec!["*".into()],
        dst_ports: vec![NetPortRange {
            ip: "*".into(),
            bits: None,
            ports: PortRange::ANY,
        }],
        ..FilterRule::default()
    }]
}

#[cfg(test)]
mod tests;
