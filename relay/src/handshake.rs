//! The DERP handshake messages: ClientInfo (client → server) and ServerInfo
//! (server → client), JSON sealed in a NaCl box between the client's node key and the
//! server's key. Field names are exactly those Go emits (`meshKey`, `version`,
//! `CanAckPings`, `IsProber`, `AppName`); unknown fields are tolerated.

use bytes::Bytes;
use proto::nacl::SharedBox;
use proto::{MeshKey, NodePrivate, NodePublic};
use serde::{Deserialize, Serialize};

use crate::frame::PROTOCOL_VERSION;

fn is_zero(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// What a client tells the server about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Mesh PSK as bare hex; grants WatchConns, ForwardPacket and ClosePeer.
    #[serde(rename = "meshKey", default, skip_serializing_if = "String::is_empty")]
    pub mesh_key: String,
    #[serde(rename = "version", default, skip_serializing_if = "is_zero")]
    pub version: u32,
    #[serde(rename = "CanAckPings", default)]
    pub can_ack_pings: bool,
    #[serde(rename = "IsProber", default, skip_serializing_if = "is_false")]
    pub is_prober: bool,
    #[serde(rename = "AppName", default, skip_serializing_if = "String::is_empty")]
    pub app_name: String,
}

impl ClientInfo {
    /// What a regular client sends: `{"version":2,"CanAckPings":true}`.
    pub fn regular() -> Self {
        ClientInfo {
            version: PROTOCOL_VERSION,
            can_ack_pings: true,
            ..Default::default()
        }
    }

    /// The mesh key, if one was sent and it parses.
    pub fn mesh_key(&self) -> Option<MeshKey> {
        if self.mesh_key.is_empty() {
            None
        } else {
            self.mesh_key.parse().ok()
        }
    }
}

/// What the server tells the client after accepting it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    #[serde(rename = "version", default, skip_serializing_if = "is_zero")]
    pub version: u32,
    #[serde(
        rename = "TokenBucketBytesPerSecond",
        default,
        skip_serializing_if = "is_zero_u64"
    )]
    pub token_bucket_bytes_per_second: u64,
    #[serde(
        rename = "TokenBucketBytesBurst",
        default,
        skip_serializing_if = "is_zero_u64"
    )]
    pub token_bucket_bytes_burst: u64,
}

/// Why a handshake message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("sealed {0} does not open with the expected keys")]
    DoesNotOpen(&'static str),
    #[error("{0} is not valid JSON: {1}")]
    BadJson(&'static str, String),
}

/// Seals a ClientInfo from `client` to `server` (the ClientInfo frame's body after the key).
pub fn seal_client_info(client: &NodePrivate, server: &NodePublic, info: &ClientInfo) -> Bytes {
    let json = serde_json::to_vec(info).unwrap_or_default();
    Bytes::from(SharedBox::new(&client.to_bytes(), server.as_bytes()).seal(&json))
}

/// Opens a ClientInfo that `client` sealed to this server.
pub fn open_client_info(
    server: &NodePrivate,
    client: &NodePublic,
    sealed: &[u8],
) -> Result<ClientInfo, HandshakeError> {
    let json = SharedBox::new(&server.to_bytes(), client.as_bytes())
        .open(sealed)
        .map_err(|_| HandshakeError::DoesNotOpen("ClientInfo"))?;
    serde_json::from_slice(&json).map_err(|e| HandshakeError::BadJson("ClientInfo", e.to_string()))
}

/// Seals a ServerInfo from `server` to `client`.
pub fn seal_server_info(server: &NodePrivate, client: &NodePublic, info: &ServerInfo) -> Bytes {
    let json = serde_json::to_vec(info).unwrap_or_default();
    Bytes::from(SharedBox::new(&server.to_bytes(), client.as_bytes()).seal(&json))
}

/// Opens a ServerInfo that `server` sealed to this client.
pub fn open_server_info(
    client: &NodePrivate,
    server: &NodePublic,
    sealed: &[u8],
) -> Result<ServerInfo, HandshakeError> {
    let json = SharedBox::new(&client.to_bytes(), server.as_bytes())
        .open(sealed)
        .map_err(|_| HandshakeError::DoesNotOpen("ServerInfo"))?;
    serde_json::from_slice(&json).map_err(|e| HandshakeError::BadJson("ServerInfo", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_info_json_uses_go_names() {
        assert_eq!(
            serde_json::to_string(&ClientInfo::regular()).unwrap(),
            r#"{"version":2,"CanAckPings":true}"#
        );
        let full = ClientInfo {
            mesh_key: "ab".repeat(32),
            version: 2,
            can_ack_pings: true,
            is_prober: true,
            app_name: "probe".into(),
        };
        assert_eq!(
            serde_json::to_string(&full).unwrap(),
            format!(
                r#"{{"meshKey":"{}","version":2,"CanAckPings":true,"IsProber":true,"AppName":"probe"}}"#,
                "ab".repeat(32)
            )
        );
        // CanAckPings is always present, even when false.
        assert_eq!(
            serde_json::to_string(&ClientInfo::default()).unwrap(),
            r#"{"CanAckPings":false}"#
        );
    }

    #[test]
    fn client_info_tolerates_unknown_fields_and_missing_ones() {
        let ci: ClientInfo =
            serde_json::from_str(r#"{"version":2,"CanAckPings":true,"Future":[1,2]}"#).unwrap();
        assert_eq!(ci, ClientInfo::regular());
        let ci: ClientInfo = serde_json::from_str("{}").unwrap();
        assert_eq!(ci, ClientInfo::default());
    }

    #[test]
    fn server_info_json_uses_go_names() {
        let si = ServerInfo {
            version: 2,
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&si).unwrap(), r#"{"version":2}"#);
        let si = ServerInfo {
            version: 2,
            token_bucket_bytes_per_second: 1000,
            token_bucket_bytes_burst: 2000,
        };
        assert_eq!(
            serde_json::to_string(&si).unwrap(),
            r#"{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":2000}"#
        );
    }

    #[test]
    fn client_info_seals_and_opens_only_with_right_keys() {
        let client = NodePrivate::generate();
        let server = NodePrivate::generate();
        let sealed = seal_client_info(&client, &server.public(), &ClientInfo::regular());
        let ci = open_client_info(&server, &client.public(), &sealed).unwrap();
        assert_eq!(ci, ClientInfo::regular());
        let other = NodePrivate::generate();
        assert_eq!(
            open_client_info(&server, &other.public(), &sealed),
            Err(HandshakeError::DoesNotOpen("ClientInfo"))
        );
        let si = seal_server_info(&server, &client.public(), &ServerInfo::default());
        assert_eq!(
            open_server_info(&client, &server.public(), &si).unwrap(),
            ServerInfo::default()
        );
    }
}
