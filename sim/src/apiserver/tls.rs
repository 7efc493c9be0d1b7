//! TLS like a real cluster: a fresh CA per simulator, a serving certificate for loopback,
//! and client certificates signed by the same CA as an alternative to bearer tokens.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Certificate generation or TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not build a key or certificate.
    #[error("failed to generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls rejected the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("invalid client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// The simulator's certificate authority and the identities of certificates it issued.
pub struct ClusterTls {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// Client certificates by DER, mapped to the user they authenticate.
    client_users: RwLock<HashMap<Vec<u8>, String>>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls").finish_non_exhaustive()
    }
}

impl ClusterTls {
    /// Generates a new CA.
    pub fn generate() -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "spate-sim-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            client_users: RwLock::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM, for `certificate-authority-data`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a client certificate authenticating as `user`.
    pub fn issue_client_certificate(&self, user: &str) -> Result<IssuedCertificate, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        self.client_users
            .write()
            .insert(cert.der().to_vec(), user.to_owned());
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The user a verified client certificate authenticates as.
    pub fn client_user(&self, cert: &CertificateDer<'_>) -> Option<String> {
        self.client_users.read().get(cert.as_ref()).cloned()
    }

    /// A rustls server configuration serving a certificate for `127.0.0.1` and `localhost`,
    /// accepting (but not requiring) client certificates from this CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "spate-sim-apiserver");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.der().clone(), self.ca_der.clone()], key_der)?;
        Ok(config)
    }
}
