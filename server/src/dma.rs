//! The data-plane side of leases, common to every transport.
//!
//! "One trait, several transports; the lease manager does not know which one carried a pin"
//! (DESIGN.md). Every transport moves bytes under leases granted by the lease manager:
//! * the **TCP data plane** checks every operation against the lease manager's key table
//!   (its keys are the 128-bit software keys in each grant) and pins the lease per operation;
//! * the **RDMA transport** makes keys a NIC checks on its own (memory windows or regions),
//!   so it holds one pin per lease for as long as those keys may work, and drops it only
//!   after it has made them dead.
//!
//! What they share lives here: the [`Transport`] trait the lease manager calls, the one
//! HELLO policy ([`hello`]) and the one persist path ([`persist`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use rdax_proto::model::SessionId;

use crate::gate::{Gate, Work};
use crate::lease::Mode;
use crate::lease::keys::PinGuard;
use crate::pool::media::Media;
use crate::session::SessionManager;

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// The rdax TCP data plane.
    Tcp,
    /// RDMA verbs.
    Rdma,
}

impl TransportKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}

/// The remote address and key of one leased segment (RDMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// Address for RDMA READ/WRITE.
    pub addr: u64,
    /// rkey.
    pub rkey: u32,
}

/// What a transport needs to make keys for a fresh grant.
#[derive(Debug, Clone)]
pub struct BindRequest {
    /// Lease id.
    pub lease: u64,
    /// Holder.
    pub session: SessionId,
    /// Mode.
    pub mode: Mode,
    /// Every segment in object order: `(object offset, length, pool offset)`; `None` for a
    /// hole of a read lease (no key).
    pub segments: Vec<(u64, u64, Option<u64>)>,
}

/// Why a transport could not make keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// This daemon does not serve the transport.
    #[error("this daemon serves no RDMA: {0}")]
    Unavailable(String),
    /// The session has not connected over the transport.
    #[error("session {session} has no RDMA connection: connect to {endpoint} with rdma_cm and send HELLO first")]
    NotConnected {
        /// The session.
        session: SessionId,
        /// Where to connect.
        endpoint: String,
    },
    /// A device operation failed.
    #[error("binding the lease's RDMA keys failed: {0}")]
    Bind(String),
    /// The lease ended while its keys were being made.
    #[error("the lease ended while its RDMA keys were being made")]
    Ended,
    /// A cap was reached.
    #[error("{what}: the limit is {cap} ({key})")]
    Limit {
        /// What is at its limit.
        what: &'static str,
        /// The cap.
        cap: u64,
        /// Its config key.
        key: &'static str,
    },
}

/// A boxed future, for the object-safe trait.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One way of moving bytes under leases.
pub trait Transport: Send + Sync + 'static {
    /// Which one.
    fn kind(&self) -> TransportKind;

    /// Whether `session` can get keys on this transport now (before a grant is made).
    fn check(&self, session: SessionId) -> Result<(), DmaError>;

    /// Make keys for a fresh grant: one per keyed segment, `None` for holes (and for every
    /// segment on a transport whose keys are the grant's software keys). Runs in a task the
    /// grant owns, so it is never cut short by a client going away. A transport that keeps
    /// keys alive pins the lease with [`crate::lease::LeaseManager::pin_lease`] first.
    fn bind(self: Arc<Self>, req: BindRequest) -> BoxFuture<Result<Vec<Option<RemoteKey>>, DmaError>>;

    /// The lease ended (released, revoked, expired): make this transport's keys for it dead,
    /// then drop its pin. A transport that cannot prove its keys dead keeps the pin and calls
    /// [`crate::lease::LeaseManager::quarantine`]. Must not block.
    fn lease_ended(&self, lease: u64);
}

/// A transport with nothing to bind and nothing to check, for unit tests of lease holders.
#[cfg(test)]
pub struct NoBind;

#[cfg(test)]
impl Transport for NoBind {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }
    fn check(&self, _: SessionId) -> Result<(), DmaError> {
        Ok(())
    }
    fn bind(self: Arc<Self>, req: BindRequest) -> BoxFuture<Result<Vec<Option<RemoteKey>>, DmaError>> {
        Box::pin(async move { Ok(vec![None; req.segments.len()]) })
    }
    fn lease_ended(&self, _: u64) {}
}

/// Why a HELLO was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    /// No such session.
    #[error("no live session with that credential")]
    BadSession,
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// The one HELLO policy of every data plane: the connection presents its session credential;
/// it is bound to that session if the session is live and the daemon is not shutting down.
/// A data plane may hold several connections per session (TCP) or one (RDMA: keys are bound
/// to the queue pair, so the newest connection of a session replaces the older one).
///
/// The credential is the session's *secret* (`SessionOpened.session_secret`), never its id:
/// ids are listed and logged.
pub fn hello(sessions: &SessionManager, gate: &Gate, credential: [u8; 16]) -> Result<SessionId, HelloRefusal> {
    if gate.is_closed() {
        return Err(HelloRefusal::ShuttingDown);
    }
    sessions.by_secret(&rdax_proto::model::SessionSecret(credential)).ok_or(HelloRefusal::BadSession)
}

/// Why a persist did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The runtime is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The storage reported an error (latched: the pool accepts no change any more).
    #[error("the pool's storage failed: {0}")]
    Storage(String),
}

/// The one persist path: make pool ranges durable (cache-line write-back and a fence on DAX,
/// `msync` otherwise) on a blocking thread, with the lease pinned until done, so neither a
/// CLWB loop over megabytes nor an `msync` stalls the async runtime. The caller holds an
/// admitted data-plane operation's place in the gate; the persist counts as part of it.
pub async fn persist(
    media: &Arc<dyn Media>,
    gate: &Gate,
    ranges: Vec<(u64, u64)>,
    pin: PinGuard,
) -> Result<(), PersistError> {
    let guard = gate.join(Work::PoolJob);
    let media = media.clone();
    tokio::task::spawn_blocking(move || {
        let _keep = (pin, guard);
        for (off, len) in ranges {
            media.flush(off, len);
        }
        media.drain();
        media.failure().map_or(Ok(()), |f| Err(PersistError::Storage(f.detail)))
    })
    .await
    .map_err(|_| PersistError::ShuttingDown)?
}
