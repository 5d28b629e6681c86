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
