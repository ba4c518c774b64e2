//! Grants in a task the lease manager owns, handed over as a [`GrantHandle`] that gives the
//! lease back if it is dropped before the grant reached its holder.

use std::sync::Arc;

use rdax_proto::model::SessionId;
use tracing::{Instrument, info};

use super::{Grant, GrantRequest, How, LeaseError, LeaseManager, lease_failpoint};
use crate::dma::{BindRequest, DmaError, TransportKind};
use crate::gate::Work;

/// A grant on its way to the client: dropping it gives the lease back, so a grant whose RPC
/// was cancelled leaves nothing behind. [`GrantHandle::into_grant`] hands it over for good.
#[must_use = "dropping a GrantHandle releases the lease"]
pub struct GrantHandle {
    mgr: Arc<LeaseManager>,
    session: SessionId,
    grant: Option<Grant>,
}

impl std::fmt::Debug for GrantHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantHandle").field("grant", &self.grant).finish_non_exhaustive()
    }
}

impl GrantHandle {
    /// The grant.
    pub fn grant(&self) -> &Grant {
        self.grant.as_ref().expect("present until taken")
    }

    /// Hand the grant to the client: from now on only the holder (or its TTL) ends it.
    pub fn into_grant(mut self) -> Grant {
        self.grant.take().expect("present until taken")
    }
}

impl Drop for GrantHandle {
    fn drop(&mut self) {
        if let Some(g) = self.grant.take() {
            info!(lease = g.id, "grant not delivered (the request was cancelled or failed); giving it back");
            let _ = self.mgr.release(self.session, g.id);
        }
    }
}

impl LeaseManager {
    /// Grant a lease and have `req.transport` make its keys, in a task this manager owns.
    /// The returned handle gives the lease back if dropped; dropping *this future* also gives
    /// it back (the task finishes either way, so no half-made binding or pin is left).
    pub async fn grant(self: &Arc<Self>, req: GrantRequest) -> Result<GrantHandle, LeaseError> {
        if !self.sessions.is_live(req.session) {
            return Err(LeaseError::SessionNotFound);
        }
        // Refused at once during shutdown: an exclusive grant would otherwise first wait for
        // the recalled leases to drain, holding shutdown up.
        if self.lock().shutting_down {
            return Err(LeaseError::ShuttingDown);
        }
        if !self.fence().is_open() {
            return Err(LeaseError::Fenced);
        }
        req.transport.check(req.session)?;
        let guard = self.gate.enter(Work::Grant).map_err(|_| LeaseError::ShuttingDown)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let m = self.clone();
        tokio::spawn(
            async move {
                let _guard = guard;
                // If the requester is gone, the handle is dropped with the message: released.
                let _ = tx.send(m.grant_owned(req).await);
            }
            .in_current_span(),
        );
        rx.await.unwrap_or(Err(LeaseError::ShuttingDown))
    }

    async fn grant_owned(self: &Arc<Self>, req: GrantRequest) -> Result<GrantHandle, LeaseError> {
        let g = if req.exclusive {
            self.acquire_exclusive(&req).await?
        } else {
            let how = How { own: None, allocate: req.allocate };
            self.acquire_with(req.session, req.object.clone(), req.offset, req.len, req.mode, how).await?
        };
        let id = g.id;
        let mut handle = GrantHandle { mgr: self.clone(), session: req.session, grant: Some(g) };
        lease_failpoint!("grant.installed");
        let kind = req.transport.kind();
        if kind != TransportKind::Tcp {
            {
                let mut inner = self.lock();
                let l = inner.leases.get_mut(&id).filter(|l| l.state.live()).ok_or(DmaError::Ended)?;
                l.transport = Some(req.transport.clone());
            }
            let g = handle.grant();
            let segments =
                g.segments.iter().map(|s| (s.object_offset, s.len, s.target.map(|(p, _)| p))).collect::<Vec<_>>();
            let bind = BindRequest { lease: id, session: req.session, mode: req.mode, segments };
            let remote = req.transport.clone().bind(bind).await?;
            lease_failpoint!("grant.bound");
            let g = handle.grant.as_mut().expect("present");
            g.transport = kind;
            for (s, r) in g.segments.iter_mut().zip(remote) {
                s.remote = r;
            }
        }
        Ok(handle)
    }
}
