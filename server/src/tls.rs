//! TLS for the gRPC listener, and [`GrpcIo`], the connection type every gRPC listener feeds
//! the server: rustls with the ring provider (no C build), optional client
//! certificates (mTLS).
//!
//! The daemon terminates TLS itself rather than through tonic's `tls_config`, for two reasons:
//! the server configuration is swapped on SIGHUP ([`Tls::reload`]: new connections get the
//! new certificate, open ones keep theirs), and the client certificate's subject Common Name
//! must reach the request layer, where it can name a principal (`cert_common_names` in the
//! principals file). Each handshake runs in a task of its own with a bound, so a client that
//! stalls it holds only its own connection slot.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use crate::config::TlsFiles;
use crate::net::{ConnInfo, Cuttable};

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File { what, path: path.display().to_string(), message: e.to_string() }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The socket under an NBD TLS session, buffered both ways: rustls reads at most
/// 4 KiB per call and writes one record (at most 16 KiB) per call, which without a buffer
/// costs a system call each, hundreds per MiB.
pub type DataIo = tokio::io::BufStream<tokio::net::TcpStream>;

/// Each direction's buffer under an NBD TLS session.
pub const DATA_IO_BUFFER: usize = 256 << 10;

/// ALPN of the TCP data plane over TLS.
pub const DATA_ALPN: &[u8] = b"rdax-data";

/// NBD over TLS (`NBD_OPT_STARTTLS`) negotiates no ALPN protocol: NBD clients send none.
pub const NBD_ALPN: &[u8] = b"";

/// Build a server configuration from `files`, offering the ALPN protocol `alpn` (none for
/// [`NBD_ALPN`]). The data plane and NBD carry bulk data: they get [`data_provider`].
pub fn server_config(files: &TlsFiles, alpn: &[u8]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs("tls.cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_err("tls.key", &files.key, e))?;
    let bulk = alpn == DATA_ALPN || alpn == NBD_ALPN;
    let provider = Arc::new(if bulk { data_provider() } else { rustls::crypto::ring::default_provider() });
    // The data plane seals its own records after the handshake (`tls_record`), and that
    // record layer is TLS 1.3's.
    let versions: &[&rustls::SupportedProtocolVersion] =
        if alpn == DATA_ALPN { &[&rustls::version::TLS13] } else { rustls::DEFAULT_VERSIONS };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("tls.client_ca", ca)? {
                roots.add(c).map_err(|e| file_err("tls.client_ca", ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))?;
    if !alpn.is_empty() {
        cfg.alpn_protocols = vec![alpn.to_vec()];
    }
    if bulk {
        // Bulk data: the daemon's cipher preference (AES-128-GCM first) decides.
        cfg.ignore_client_order = true;
        // Data-plane clients do not resume sessions; a ticket would only be a record the
        // client must read before its first reply.
        cfg.send_tls13_tickets = 0;
    }
    // rustls hands the data plane's traffic secrets to `tls_record` after the handshake.
    cfg.enable_secret_extraction = alpn == DATA_ALPN;
    Ok(Arc::new(cfg))
}

/// ring's provider with AES-128-GCM preferred, for the data plane's bulk transfers: about a
/// third less work per byte than AES-256-GCM (10 rounds against 14), and still the suite most
/// TLS traffic uses.
pub fn data_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    p
}

/// The live server configurations (gRPC, and the data plane's), swapped on reload.
#[derive(Debug)]
pub struct Tls {
    config: RwLock<Arc<rustls::ServerConfig>>,
    data: RwLock<Arc<rustls::ServerConfig>>,
    nbd: RwLock<Arc<rustls::ServerConfig>>,
}

impl Tls {
    /// Load `files`.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        Ok(Tls {
            config: RwLock::new(server_config(files, b"h2")?),
            data: RwLock::new(server_config(files, DATA_ALPN)?),
            nbd: RwLock::new(server_config(files, NBD_ALPN)?),
        })
    }

    /// Load `files` again; on error the running configuration stays.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        let (c, d, n) =
            (server_config(files, b"h2")?, server_config(files, DATA_ALPN)?, server_config(files, NBD_ALPN)?);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = c;
        *self.data.write().unwrap_or_else(|e| e.into_inner()) = d;
        *self.nbd.write().unwrap_or_else(|e| e.into_inner()) = n;
        Ok(())
    }

    /// Handshake on an accepted data-plane connection, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept_data(&self, io: tokio::net::TcpStream) -> io::Result<rdax_proto::tls_record::TlsConn> {
        let config = self.data.read().unwrap_or_else(|e| e.into_inner()).clone();
        tokio::time::timeout(HANDSHAKE_TIMEOUT, rdax_proto::tls_record::accept(config, io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    /// The TLS handshake of an NBD connection after `NBD_OPT_STARTTLS`, bounded by
    /// [`HANDSHAKE_TIMEOUT`]. Returns the stream and the client certificate's Common Name.
    pub async fn accept_nbd(&self, io: tokio::net::TcpStream) -> io::Result<(TlsStream<DataIo>, Option<String>)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.nbd.read().unwrap_or_else(|e| e.into_inner()).clone());
        let io = tokio::io::BufStream::with_capacity(DATA_IO_BUFFER, DATA_IO_BUFFER, io);
        let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let cn = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c));
        Ok((s, cn))
    }

    /// Handshake on an accepted connection, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(&self, io: Cuttable) -> io::Result<GrpcIo> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.read().unwrap_or_else(|e| e.into_inner()).clone());
        let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let cn = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| common_name(c));
        Ok(GrpcIo::Tls(Box::new(s), cn.map(Arc::from)))
    }
}

/// The subject Common Name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// A gRPC connection: plain or TLS over TCP, or on the admin socket.
pub enum GrpcIo {
    /// Plaintext.
    Plain(Cuttable),
    /// TLS, with the client certificate's Common Name if one was presented.
    Tls(Box<TlsStream<Cuttable>>, Option<Arc<str>>),
    /// The admin Unix socket, with the local user it admitted.
    Local(Cuttable<tokio::net::UnixStream>, Arc<crate::auth::local::LocalPeer>),
}

impl AsyncRead for GrpcIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            GrpcIo::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
            GrpcIo::Local(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            GrpcIo::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            GrpcIo::Local(s, _) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_flush(cx),
            GrpcIo::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            GrpcIo::Local(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            GrpcIo::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            GrpcIo::Local(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for GrpcIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            GrpcIo::Plain(s) => s.connect_info(),
            GrpcIo::Tls(s, cn) => ConnInfo { client_cn: cn.clone(), ..s.get_ref().0.connect_info() },
            GrpcIo::Local(s, peer) => s.local_info(peer.clone()),
        }
    }
}
