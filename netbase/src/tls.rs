//! TLS configurations (rustls with the ring provider, TLS 1.2 and 1.3).
//!
//! Clients check a server by the system's roots, by extra roots, by a `sha256-raw:` pin
//! of the leaf certificate, or (tests only) not at all; servers load a certificate chain
//! and key from PEM files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

/// How a server's certificate is checked.
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

/// The crypto provider every TLS configuration of ours uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
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
                "the server certificate does not match the pinned sha256-raw hash".into(),
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

/// A server's certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read certificates from {path}: {error}")]
    ReadCerts { path: PathBuf, error: String },
    #[error("no certificates in {path}")]
    NoCerts { path: PathBuf },
    #[error("cannot read a private key from {path}: {error}")]
    ReadKey { path: PathBuf, error: String },
    #[error("certificate and key do not match or are unsupported: {0}")]
    Mismatch(rustls::Error),
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let read_err = |e: rustls::pki_types::pem::Error| TlsFileError::ReadCerts {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCerts {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A server configuration from a PEM chain and a PEM key, offering `alpn` (may be empty).
pub fn load_server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsFileError> {
    let certs = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsFileError::ReadKey {
        path: key.to_path_buf(),
        error: e.to_string(),
    })?;
    server_config(certs, key, alpn)
}

/// A server configuration from a chain and its key, offering `alpn` (may be empty).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsFileError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsFileError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsFileError::Mismatch)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> rcgen::CertifiedKey {
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap()
    }

    /// Runs one handshake between `client` and a server holding `cert`.
    async fn handshake(cert: &rcgen::CertifiedKey, verify: &TlsVerify) -> bool {
        let server = server_config(
            vec![cert.cert.der().clone()],
            PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap(),
            &[b"http/1.1"],
        )
        .unwrap();
        let client = client_config(verify).unwrap();
        let (a, b) = tokio::io::duplex(64 << 10);
        let accept = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .is_ok()
        });
        let name = ServerName::try_from("localhost").unwrap();
        let ok = tokio_rustls::TlsConnector::from(client)
            .connect(name, a)
            .await
            .is_ok();
        // The server's side ends either way once the client has answered or gone.
        let _ = accept.await;
        ok
    }

    #[tokio::test]
    async fn each_way_of_checking_accepts_the_right_server_only() {
        let cert = self_signed();
        let other = self_signed();
        let der = cert.cert.der().clone();
        assert!(handshake(&cert, &TlsVerify::Roots(vec![der.clone()])).await);
        assert!(!handshake(&other, &TlsVerify::Roots(vec![der.clone()])).await);
        assert!(handshake(&cert, &TlsVerify::PinnedSha256(cert_sha256(&der))).await);
        assert!(!handshake(&other, &TlsVerify::PinnedSha256(cert_sha256(&der))).await);
        assert!(handshake(&other, &TlsVerify::InsecureForTests).await);
        // A self-signed certificate is not trusted by the system's roots.
        assert!(!handshake(&cert, &TlsVerify::SystemRoots).await);
    }

    #[test]
    fn server_files_load_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (self_signed(), self_signed());
        let (cert, key, other_key) = (
            dir.path().join("c.pem"),
            dir.path().join("k.pem"),
            dir.path().join("o.pem"),
        );
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, a.key_pair.serialize_pem()).unwrap();
        std::fs::write(&other_key, b.key_pair.serialize_pem()).unwrap();
        let c = load_server_config(&cert, &key, &[b"h2"]).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
        let err = load_server_config(&cert, &other_key, &[]).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        let err = load_server_config(&key, &key, &[]).unwrap_err();
        assert!(err.to_string().contains("no certificates"), "{err}");
        let err = load_server_config(&dir.path().join("missing"), &key, &[]).unwrap_err();
        assert!(
            err.to_string().contains("cannot read certificates"),
            "{err}"
        );
    }
}
