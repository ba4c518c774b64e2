//! Exclusive leases, and the lease listing.
//!
//! An exclusive grant waits until no other marker covers its range (another exclusive grant
//! or a layout change under way), then puts a marker on it (new grants there wait), recalls every other
//! holder, revokes what is not returned by the break deadline and waits for the drain, the
//! same sequence as a layout change ([`super::recall`]); then it is granted past its own
//! marker, which lifts once the lease is in place. From then on the lease itself keeps every
//! other grant off its range ([`Inner::exclusive_holder`]) until it ends.

use std::sync::Arc;

use rdax_proto::model::{ObjectKey, SessionId};
use tokio::time::Instant;
use tracing::info;

use super::{Grant, GrantRequest, Inner, LeaseError, LeaseManager, LeaseSummary, lease_failpoint, overlaps};

impl Inner {
    /// A live exclusive lease over part of the range.
    pub(super) fn exclusive_holder(&self, object: &ObjectKey, lo: u64, hi: u64) -> Option<u64> {
        if self.exclusive_live == 0 {
            return None; // the common case, and no scan over every lease on the grant path
        }
        self.leases
            .iter()
            .find(|(_, l)| l.exclusive && l.state.live() && l.object == *object && overlaps((l.lo, l.hi), (lo, hi)))
            .map(|(id, _)| *id)
    }
}

impl LeaseManager {
    /// An exclusive grant: refused at once over another live exclusive lease; otherwise a
    /// marker on the range (new grants there wait), every other holder recalled, revoked at
    /// the break deadline and drained, then the grant under that marker, which lifts once the
    /// lease is in place (from then on the lease itself keeps others off).
    pub(super) async fn acquire_exclusive(self: &Arc<Self>, req: &GrantRequest) -> Result<Grant, LeaseError> {
        let end = req.offset.checked_add(req.len).ok_or(LeaseError::Invalid("offset + length overflows"))?;
        if let Some(id) = self.lock().exclusive_holder(&req.object, req.offset, end) {
            return Err(LeaseError::Exclusive(id));
        }
        // Behind no other marker: two exclusive grants of one range must not each wait for
        // the other's marker; the second waits for the first, then finds its lease.
        let brk = self.recall_alone(&req.object, req.offset, end, "an exclusive lease was requested").await?;
        lease_failpoint!("exclusive.recalled");
        let how = super::How { own: Some(brk.marker), allocate: req.allocate };
        // Installed exclusive (a grant past its own marker is one), under the lock that
        // inserts it.
        let g = self.acquire_with(req.session, req.object.clone(), req.offset, req.len, req.mode, how).await?;
        // A place to pause only: failing here would strand the lease just installed.
        let _ = crate::failpoint!("exclusive.installed");
        drop(brk);
        info!(lease = g.id, session = %req.session, object = %req.object, "lease is exclusive");
        Ok(g)
    }

    /// The live exclusive lease over part of `[lo, hi)` of `object`, if any (writes that take
    /// no lease, such as `Objects.Write`, are refused under one).
    pub fn exclusive_over(&self, object: &ObjectKey, lo: u64, hi: u64) -> Option<u64> {
        self.lock().exclusive_holder(object, lo, hi)
    }

    /// Leases, optionally of one session.
    pub fn list(&self, session: Option<SessionId>) -> Vec<LeaseSummary> {
        let now = Instant::now();
        let mut v: Vec<LeaseSummary> = self
            .lock()
            .leases
            .iter()
            .filter(|(_, l)| session.is_none_or(|s| s == l.session))
            .map(|(id, l)| LeaseSummary {
                id: *id,
                session: l.session,
                object: l.object.clone(),
                offset: l.lo,
                len: l.hi - l.lo,
                mode: l.mode,
                generation: l.generation,
                state: l.state,
                pins: l.pins.count(),
                expires_in_ms: if l.expires >= now {
                    (l.expires - now).as_millis() as i64
                } else {
                    -((now - l.expires).as_millis() as i64)
                },
                exclusive: l.exclusive,
            })
            .collect();
        v.sort_by_key(|l| l.id);
        v
    }
}
