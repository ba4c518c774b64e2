//! The RDMA transport: the same leases as the TCP data plane, with keys a NIC checks.
//!
//! A client connects with rdma_cm (one RC queue pair per session), sends HELLO with its
//! session id, and then acquires leases with `transport = RDMA`. For each segment of such a
//! lease the daemon registers the segment as its own memory region in the client
//! connection's protection domain and — when the device has type-2 memory windows — binds a
//! window over it on the client's queue pair (`keys = memory-window`); otherwise the region's
//! own rkey is the key (`keys = memory-region`). Either way a key opens exactly one segment,
//! for one client. The client then moves bytes with one-sided RDMA READ and WRITE, and asks
//! for persistence with a FLUSH message (see `docs/data-plane.md`).
//!
//! Revocation follows the lease manager: when a lease ends, its keys are invalidated (LOCAL_INV
//! of each window, then deallocation of the windows and deregistration of the regions, every
//! step checked). If an invalidation is not confirmed within the bound, the client's queue pair
//! is fenced (moved to the error state) and its outstanding requests flushed. The binding holds
//! a pin on the lease until all of this succeeded; if any step fails, the pin is kept for good
//! and the lease quarantined, so the blocks it covered are never reused (see `transport.rs`).
//!
//! Keys are made in the grant's owned task ([`crate::lease::LeaseManager::grant`]), so a
//! cancelled Acquire cannot leave a binding or a pin behind.
//!
//! Built without the `rdma` feature, or on a host without an RDMA device, the daemon says so
//! once and serves TCP only; `Pool.Info` reports why.

#[cfg(feature = "rdma")]
mod peer;
#[cfg(feature = "rdma")]
mod transport;

use std::sync::Arc;

use rdax_proto::model::SessionId;

use crate::config::Config;
use crate::dma::{BindRequest, BoxFuture, DmaError, RemoteKey, Transport, TransportKind};
use crate::gate::Gate;
use crate::lease::LeaseManager;
use crate::pool::Pool;
use crate::session::SessionManager;

/// What `Pool.Info` says about RDMA.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaStatus {
    /// "serving", "unavailable" or "off".
    pub state: &'static str,
    /// Why not serving.
    pub detail: String,
    /// Listener address.
    pub endpoint: String,
    /// "memory-window" or "memory-region".
    pub keys: &'static str,
    /// Device name.
    pub device: String,
}

/// The daemon's RDMA transport (or the reason there is none).
pub struct Rdma {
    status: RdmaStatus,
    #[cfg(feature = "rdma")]
    transport: Option<Arc<transport::RdmaTransport>>,
}

impl std::fmt::Debug for Rdma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rdma").field("status", &self.status).finish_non_exhaustive()
    }
}

impl Rdma {
    fn off(state: &'static str, detail: String) -> Arc<Rdma> {
        Arc::new(Rdma {
            status: RdmaStatus { state, detail, ..Default::default() },
            #[cfg(feature = "rdma")]
            transport: None,
        })
    }

    /// Start serving RDMA if this build, host and pool can; otherwise log why, once.
    pub async fn start(
        cfg: &Config,
        pool: Arc<Pool>,
        leases: Arc<LeaseManager>,
        sessions: Arc<SessionManager>,
        gate: Gate,
    ) -> Arc<Rdma> {
        let crate::config::RdmaListen::At(addr) = cfg.rdma_listen else {
            return Rdma::off("off", "rdma.listen is off".into());
        };
        #[cfg(feature = "rdma")]
        {
            match transport::RdmaTransport::start(cfg, addr, pool, leases, sessions, gate).await {
                Ok((t, status)) => {
                    tracing::info!(endpoint = %status.endpoint, device = %status.device, keys = status.keys, "RDMA transport serving");
                    Arc::new(Rdma { status, transport: Some(t) })
                }
                Err(why) => {
                    let why = why.to_string();
                    // With `rdma.listen = auto` this is the normal outcome on a host without
                    // RDMA; an address the operator named deserves a warning.
                    if cfg.rdma_explicit {
                        tracing::warn!("RDMA unavailable: {why}; serving the TCP data plane only");
                    } else {
                        tracing::info!("RDMA unavailable: {why}; serving the TCP data plane only");
                    }
                    Rdma::off("unavailable", why)
                }
            }
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = (addr, pool, leases, sessions, gate);
            tracing::info!(
                "RDMA off: this rdaxd was built without the `rdma` feature; serving the TCP data plane only"
            );
            Rdma::off("off", "built without the `rdma` feature".into())
        }
    }

    /// What to report.
    pub fn status(&self) -> &RdmaStatus {
        &self.status
    }

    /// Close every RDMA connection (shutdown).
    pub fn shutdown(&self) {
        #[cfg(feature = "rdma")]
        if let Some(t) = &self.transport {
            t.shutdown();
        }
    }
}

/// The RDMA transport as the lease manager sees it (or, without one, a transport that says why
/// it cannot make keys).
impl Transport for Rdma {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn check(&self, session: SessionId) -> Result<(), DmaError> {
        #[cfg(feature = "rdma")]
        if let Some(t) = &self.transport {
            return t.check(session).map(drop);
        }
        let _ = session;
        Err(DmaError::Unavailable(self.status.detail.clone()))
    }

    fn bind(self: Arc<Self>, req: BindRequest) -> BoxFuture<Result<Vec<Option<RemoteKey>>, DmaError>> {
        #[cfg(feature = "rdma")]
        if let Some(t) = self.transport.clone() {
            return Box::pin(async move { t.bind(req).await });
        }
        let _ = req;
        let detail = self.status.detail.clone();
        Box::pin(async move { Err(DmaError::Unavailable(detail)) })
    }

    fn lease_ended(&self, lease: u64) {
        #[cfg(feature = "rdma")]
        if let Some(t) = &self.transport {
            t.end(lease, "the lease ended");
        }
        let _ = lease;
    }
}
