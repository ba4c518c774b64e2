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
//! Revocation follows the lease manager: when a lease ends, its keys are invalidated
//! (LOCAL_INV of the window, then deregistration of the region). If the invalidation is not
//! confirmed within the bound, the client's queue pair is moved to the error state (fenced).
//! The lease holds a pin until this is done, so its blocks are not reused before it.
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
use crate::lease::{Grant, LeaseManager};
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

/// The remote address and key of one leased segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteKey {
    /// Address for RDMA READ/WRITE.
    pub addr: u64,
    /// rkey.
    pub rkey: u32,
}

/// Why RDMA keys could not be given.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA here.
    #[error("this daemon serves no RDMA: {0}")]
    Unavailable(String),
    /// The session has not connected over RDMA.
    #[error("session {0} has no RDMA connection: connect to {1} with rdma_cm and send HELLO first")]
    NotConnected(SessionId, String),
    /// A verb failed.
    #[error("binding the lease's RDMA keys failed: {0}")]
    Bind(String),
    /// The lease ended meanwhile.
    #[error("the lease ended while its RDMA keys were being made")]
    Ended,
}

impl From<RdmaError> for tonic::Status {
    fn from(e: RdmaError) -> Self {
        match e {
            RdmaError::Unavailable(_) | RdmaError::NotConnected(..) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            RdmaError::Bind(_) => tonic::Status::unavailable(e.to_string()),
            RdmaError::Ended => tonic::Status::aborted(e.to_string()),
        }
    }
}

/// The daemon's RDMA transport (or the reason there is none).
pub struct Rdma {
    status: RdmaStatus,
    #[cfg(feature = "rdma")]
    transport: Option<Arc<transport::Transport>>,
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
    ) -> Arc<Rdma> {
        let crate::config::RdmaListen::At(addr) = cfg.rdma_listen else {
            return Rdma::off("off", "rdma.listen is off".into());
        };
        #[cfg(feature = "rdma")]
        {
            match transport::Transport::start(cfg, addr, pool, leases, sessions).await {
                Ok((t, status)) => {
                    tracing::info!(endpoint = %status.endpoint, device = %status.device, keys = status.keys, "RDMA transport serving");
                    Arc::new(Rdma { status, transport: Some(t) })
                }
                Err(why) => {
                    tracing::warn!("RDMA unavailable: {why}; serving the TCP data plane only");
                    Rdma::off("unavailable", why)
                }
            }
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = (addr, pool, leases, sessions);
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

    /// Make RDMA keys for a fresh grant, one per segment (`None` for holes).
    pub async fn bind(&self, session: SessionId, grant: &Grant) -> Result<Vec<Option<RemoteKey>>, RdmaError> {
        #[cfg(feature = "rdma")]
        if let Some(t) = &self.transport {
            return t.bind(session, grant).await;
        }
        let _ = (session, grant);
        Err(RdmaError::Unavailable(self.status.detail.clone()))
    }

    /// Close every RDMA connection (shutdown).
    pub fn shutdown(&self) {
        #[cfg(feature = "rdma")]
        if let Some(t) = &self.transport {
            t.shutdown();
        }
    }
}
