//! TLS settings for one relay: the name it is reached by and how its certificate is
//! checked (the checks themselves are `netbase::tls`).

pub use netbase::tls::{cert_sha256, client_config, TlsVerify};

/// TLS settings for one relay.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// SNI and the name the certificate must carry.
    pub server_name: String,
    pub verify: TlsVerify,
}
