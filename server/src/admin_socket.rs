//! The admin Unix socket (`admin.socket`): gRPC for local administrators without a token.
//!
//! It serves the same services as the TCP listener, through the same request layer; what
//! differs is how a caller is known. Every connection's peer is checked against
//! [`crate::auth::local`] as it is accepted: root, rdaxd's user and the members of
//! `admin.group` become the principal `local:<user>` with every right; anyone else is closed
//! at once. The socket file is created mode 0600, or 0660 and given to `admin.group`,
//! replaces a stale one left by a crash (never a live one, and never a file that is not a
//! socket), and is removed at shutdown.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::local::{self, Me, PeerCredentials};
use crate::net::{Acceptor, Cuttable, Listen};
use crate::tls::GrpcIo;

/// How long naming a peer (a password-database lookup) may take before its uid is used.
const NAME_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

impl Listen for UnixListener {
    type Stream = UnixStream;
    type Peer = PeerCredentials;
    type Source = u32;

    async fn accept_one(&self) -> io::Result<(UnixStream, PeerCredentials)> {
        let (s, _) = self.accept().await?;
        let creds = local::peer_credentials(s.as_fd())?;
        Ok((s, creds))
    }

    fn source(peer: &PeerCredentials) -> u32 {
        peer.uid
    }
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the path.
    #[error("admin socket {0}: another process is serving it (is another rdaxd running?)")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("admin socket {0}: the path exists and is not a socket; remove it or set admin.socket")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("admin socket {path}: {what}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The step.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// The bound socket; its file is removed when this is dropped.
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    group: Option<u32>,
}

impl AdminSocket {
    /// Bind `path` (mode 0600; 0660 and owned by `group` when given), replacing a stale socket
    /// file.
    pub async fn bind(path: &Path, group: Option<u32>) -> Result<AdminSocket, SocketError> {
        let io = |what: &'static str| move |source| SocketError::Io { path: path.into(), what, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            std::fs::create_dir_all(dir).map_err(io("create its directory"))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                // A live daemon answers; a stale file from a crash refuses the connection.
                if UnixStream::connect(path).await.is_ok() {
                    return Err(SocketError::InUse(path.into()));
                }
                std::fs::remove_file(path).map_err(io("remove the stale socket"))?;
                info!(path = %path.display(), "removed a stale admin socket (left by an unclean stop)");
            }
            Ok(_) => return Err(SocketError::NotASocket(path.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspect the path")(e)),
        }
        let listener = UnixListener::bind(path).map_err(io("bind"))?;
        let mode = match group {
            Some(g) => {
                rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(g)))
                    .map_err(|e| io("give it to admin.group")(e.into()))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod"))?;
        Ok(AdminSocket { path: path.into(), listener: Some(listener), group })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections until `cut` fires, at most `cap` open (`per_user` of one user),
    /// each closed after `idle` without a request, and send the admitted ones to the server.
    pub fn serve(
        &mut self,
        limits: (usize, usize),
        idle: Duration,
        cut: CancellationToken,
        tx: mpsc::Sender<io::Result<GrpcIo>>,
    ) {
        let listener = self.listener.take().expect("served once");
        let me = Me { group: self.group, ..Me::current() };
        tokio::spawn(async move {
            let mut acceptor = Acceptor::new(listener, limits.0, limits.1, "admin socket");
            while let Some((s, creds, permit)) = acceptor.accept(&cut).await {
                if !local::may_administer(me, &creds) {
                    warn!(
                        uid = creds.uid,
                        pid = creds.pid,
                        "admin socket: refused a peer that is neither root, rdaxd's user nor a member of admin.group"
                    );
                    continue;
                }
                let (tx, cut) = (tx.clone(), cut.clone());
                // Naming the peer may consult NSS (LDAP, say): off the accept loop, bounded.
                tokio::spawn(async move {
                    let uid = creds.uid;
                    let lookup = tokio::task::spawn_blocking(move || local::user_name(uid));
                    let name = match tokio::time::timeout(NAME_LOOKUP_TIMEOUT, lookup).await {
                        Ok(Ok(n)) => n,
                        _ => uid.to_string(),
                    };
                    let peer = Arc::new(local::admitted(&creds, &name));
                    let io = Cuttable::new(s, cut, idle, Some(permit));
                    let _ = tx.send(Ok(GrpcIo::Local(io, peer))).await;
                });
            }
        });
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "could not remove the admin socket");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/rdaxd.sock");
        let a = AdminSocket::bind(&path, None).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "no group: owner only");
        assert!(matches!(AdminSocket::bind(&path, None).await, Err(SocketError::InUse(_))), "a live socket stays");
        drop(a);
        assert!(!path.exists(), "removed when dropped");
        // A socket file nobody listens on is stale.
        let lone = dir.path().join("lone.sock");
        drop(std::os::unix::net::UnixListener::bind(&lone).unwrap());
        let c = AdminSocket::bind(&lone, None).await.unwrap();
        assert!(UnixStream::connect(&lone).await.is_ok(), "the stale file was replaced by a live socket");
        drop(c);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(AdminSocket::bind(&file, None).await, Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"x", "a file in the way is left alone");
    }
}
