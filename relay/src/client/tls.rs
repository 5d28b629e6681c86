//! TLS for relay clients (rustls with the ring provider): system roots, extra roots,
//! a `sha256-raw:` pin of the leaf certificate, or no verification for tests.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// How a relay's certificate is checked.
#[derive(Clone)]
pub enum TlsVerify {
    /// The operating system's trusted roots.
    SystemRoots,
    /// These roots only (a private CA, or a test's self-signed certificate).
    Roots(Vec<CertificateDer<'static>>),
    /// Accept exactly the leaf certificate whose SHA-256 is this (`CertName: sha256-raw:<hex>`).
    PinnedSha256([u8; 32]),
    /// Accept any certificate (`InsecureForTests`). Never in production.
    InsecureForTests,
}

impl std::fmt::Debug for TlsVerify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsVerify::SystemRoots => f.write_str("SystemRoots"),
            TlsVerify::Roots(r) => write!(f, "Roots({})", r.len()),
            TlsVerify::PinnedSha256(h) => write!(f, "PinnedSha256({})", hex::encode(h)),
            TlsVerify::InsecureForTests => f.write_str("InsecureForTests"),
        }
    }
}

/// TLS settings for one relay.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// SNI and the name the certificate must carry.
    pub server_name: String,
    pub verify: TlsVerify,
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!(error = %e, "could not load some system root certificates");
            }
            let (added, ignored) = store.add_parsable_certificates(loaded.certs);
            tracing::debug!(added, ignored, "loaded system root certificates");
            Arc::new(store)
        })
        .clone()
}

/// The client configuration for these settings.
pub fn client_config(verify: &TlsVerify) -> Result<Arc<ClientConfig>, rustls::Error> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match verify {
        TlsVerify::SystemRoots => builder
            .with_root_certificates(system_roots())
            .with_no_client_auth(),
        TlsVerify::Roots(certs) => {
            let mut store = RootCertStore::empty();
            for c in certs {
                store.add(c.clone())?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
        TlsVerify::PinnedSha256(hash) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                hash: *hash,
                provider: provider(),
                check_hash: true,
            }))
            .with_no_client_auth(),
        TlsVerify::InsecureForTests => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                hash: [0; 32],
                provider: provider(),
                check_hash: false,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// SHA-256 of a certificate's DER, the value a `sha256-raw:` pin names.
pub fn cert_sha256(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// Checks the leaf's hash (or nothing, for tests) and always the handshake signatures.
#[derive(Debug)]
struct PinnedVerifier {
    hash: [u8; 32],
    provider: Arc<CryptoProvider>,
    check_hash: bool,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check_hash && cert_sha256(end_entity) != self.hash {
            return Err(rustls::Error::General(
                "relay certificate does not match the pinned sha256-raw hash".into(),
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
