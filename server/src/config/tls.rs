//! `[tls]`: certificate files for the gRPC listener.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Args, ConfigError};

/// `[tls]` as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct TlsSection {
    /// PEM certificate chain of the server.
    pub cert: Option<PathBuf>,
    /// PEM private key of the server.
    pub key: Option<PathBuf>,
    /// PEM CA certificates: when set, every gRPC client must present a certificate they
    /// signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// The files TLS is served from (read at start and on every reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Client CA bundle (mTLS) if any.
    pub client_ca: Option<PathBuf>,
}

/// TLS from flags over the file; `None` when neither names a certificate.
pub(super) fn resolve(args: &Args, file: &TlsSection) -> Result<Option<TlsFiles>, ConfigError> {
    let cert = args.tls_cert.clone().or(file.cert.clone());
    let key = args.tls_key.clone().or(file.key.clone());
    let client_ca = args.tls_client_ca.clone().or(file.client_ca.clone());
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key, client_ca })),
        (None, None) if client_ca.is_none() => Ok(None),
        (None, None) => Err(ConfigError::Invalid("tls.client_ca needs tls.cert and tls.key too".into())),
        _ => Err(ConfigError::Invalid("tls.cert and tls.key go together: set both or neither".into())),
    }
}
