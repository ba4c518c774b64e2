//! Ending leases: release and revoke, recall for layout changes, drain.
//!
//! A layout change is one task owned by the lease manager ([`LeaseManager::change_layout`]):
//!
//! ```text
//! marker on the range ─▶ recall holders ─▶ break deadline: revoke the rest ─▶ drain
//!        ─▶ the change (blocking thread) ─▶ marker lifted ─▶ result to whoever still waits
//! ```
//!
//! The RPC that asked only awaits the task's result, so a client deadline or disconnect
//! cannot lift the marker early or leave a recalled lease unrevoked. Administrator revokes
//! and shutdown's recall of everything run the same way.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rdax_proto::model::{ObjectKey, SessionId};
use rdax_proto::pb;
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

use super::{Inner, Lease, LeaseError, LeaseManager, Marker, State, lease_failpoint, overlaps};
use crate::dma::Transport;
use crate::gate::Work;
use crate::metrics::METRICS;
use crate::pool::{ObjError, Pool};

fn event(kind: pb::session_event::Kind) -> pb::SessionEvent {
    pb::SessionEvent { kind: Some(kind) }
}

/// Keeps a range marked as breaking until dropped (after the layout change). Owned by the
/// layout-change task, never by a request handler.
pub(super) struct BreakGuard {
    mgr: Arc<LeaseManager>,
    pub(super) marker: u64,
}

impl Drop for BreakGuard {
    fn drop(&mut self) {
        self.mgr.lock().markers.retain(|m| m.id != self.marker);
        self.mgr.changed.notify_waiters();
    }
}

impl LeaseManager {
    /// Kill the lease's keys and set its final state (caller holds the lock). Returns the
    /// transport to tell, once the lock is dropped.
    pub(super) fn end_locked(&self, g: &mut Inner, id: u64, state: State) -> Option<Arc<dyn Transport>> {
        let l = g.leases.get_mut(&id)?;
        self.keys.remove(&l.keys);
        let (was_live, session, nkeys) = (l.state.live(), l.session, l.keys.len());
        if was_live && l.exclusive {
            g.exclusive_live -= 1;
        }
        l.state = state;
        let transport = l.transport.clone();
        let principal = l.principal.clone();
        if was_live && let Some(u) = g.live_by_session.get_mut(&session) {
            u.leases -= 1;
            u.keys -= nkeys;
            if u.leases == 0 {
                g.live_by_session.remove(&session);
            }
        }
        if was_live && let Some(n) = g.live_by_principal.get_mut(&principal) {
            *n -= 1;
            if *n == 0 {
                g.live_by_principal.remove(&principal);
            }
        }
        transport
    }

    /// After `end_locked`, without the lock: tell the transport, wake waiters, drain.
    pub(super) fn ended(self: &Arc<Self>, id: u64, transport: Option<Arc<dyn Transport>>) {
        if let Some(t) = transport {
            t.lease_ended(id);
        }
        self.changed.notify_waiters();
        self.spawn_drain(id);
    }

    /// Revoke at once: keys dead, holder told. Drains in the background. `notable`: the
    /// holder did not do its part (returned nothing by the deadline, stopped renewing), which
    /// is logged at WARN; a revocation that follows from what someone asked for (a session
    /// that ended, an administrator) is INFO.
    pub(super) fn revoke(self: &Arc<Self>, id: u64, reason: &str, notable: bool) {
        let mut g = self.lock();
        let Some(l) = g.leases.get(&id) else { return };
        if !l.state.live() {
            return;
        }
        let (session, generation) = (l.session, l.generation);
        let transport = self.end_locked(&mut g, id, State::Revoked);
        drop(g);
        self.ended(id, transport);
        let ev =
            pb::session_event::Kind::LeaseRevoked(pb::LeaseRevoked { lease_id: id, generation, reason: reason.into() });
        self.sessions.notify(session, event(ev));
        METRICS.revokes.fetch_add(1, Relaxed);
        if notable {
            warn!(lease = id, session = %session, reason, "lease revoked");
        } else {
            info!(lease = id, session = %session, reason, "lease revoked");
        }
    }

    fn spawn_drain(self: &Arc<Self>, id: u64) {
        let m = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { m.drain(id).await });
        }
    }

    /// Wait until the lease has no operation in flight, then mark it drained and forget it.
    /// Each wait is bounded by the drain timeout; a lease that overstays it is reported and
    /// waited for again (its blocks stay out of the allocator meanwhile).
    async fn drain(&self, id: u64) {
        let Some(pins) = self.lock().leases.get(&id).map(|l| l.pins.clone()) else { return };
        let t0 = Instant::now();
        loop {
            if tokio::time::timeout(self.config().drain_timeout, pins.drained()).await.is_ok() {
                break;
            }
            if self.lock().leases.get(&id).is_none_or(|l| l.state == State::Quarantined) {
                return;
            }
            warn!(lease = id, pins = pins.count(), "lease did not drain within the drain timeout; still waiting");
        }
        METRICS.drain.observe(t0.elapsed());
        self.forget_drained(id);
    }

    /// The lease has ended and has no pin: its blocks may change hands.
    fn forget_drained(&self, id: u64) {
        let mut g = self.lock();
        if g.leases.get(&id).is_some_and(|l| !l.state.live() && l.state != State::Quarantined) {
            g.leases.remove(&id);
            g.undrained.remove_lease(id);
        }
        drop(g);
        self.changed.notify_waiters();
    }

    /// Move an active lease to BREAKING and ask its holder to return it.
    fn send_recall(&self, id: u64, l: &mut Lease, reason: &str) {
        if l.state != State::Active {
            return;
        }
        l.state = State::Breaking;
        let ev = pb::session_event::Kind::LeaseRecall(pb::LeaseRecall {
            lease_id: id,
            generation: l.generation,
            reason: reason.into(),
            deadline_ms: self.config().break_timeout.as_millis() as u64,
        });
        self.sessions.notify(l.session, event(ev));
        METRICS.recalls.fetch_add(1, Relaxed);
        info!(lease = id, session = %l.session, reason, "lease recalled");
    }

    /// Revoke every lease of a session (the session ended).
    pub fn revoke_session(self: &Arc<Self>, session: SessionId) {
        let ids: Vec<u64> = self
            .lock()
            .leases
            .iter()
            .filter(|(_, l)| l.session == session && l.state.live())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.revoke(id, "the session ended", false);
        }
    }

    /// Change the layout of `[lo, hi)` of `object`: recall the leases that cover it (new
    /// grants there wait), revoke what is not returned by the break deadline, wait until they
    /// drained, run `change` on a blocking thread, and lift the marker. All of it runs in a
    /// task owned by the manager: dropping this future only stops waiting for the result.
    pub async fn change_layout<T, F>(
        self: &Arc<Self>,
        object: ObjectKey,
        lo: u64,
        hi: u64,
        reason: &'static str,
        change: F,
    ) -> Result<T, LeaseError>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, ObjError> + Send + 'static,
    {
        let guard = self.gate.enter(Work::LayoutChange).map_err(|_| LeaseError::ShuttingDown)?;
        let m = self.clone();
        let task = tokio::spawn(
            async move {
                let _guard = guard;
                let brk = m.recall(&object, lo, hi, reason).await?;
                lease_failpoint!("layout.before_change");
                let pool = m.pool.clone();
                let r =
                    tokio::task::spawn_blocking(move || change(&pool)).await.map_err(|_| LeaseError::ShuttingDown)?;
                let _ = crate::failpoint!("layout.changed");
                drop(brk);
                Ok(r?)
            }
            .in_current_span(),
        );
        task.await.unwrap_or(Err(LeaseError::ShuttingDown))
    }

    /// Put a marker on the range, recall every live lease overlapping it, revoke what is not
    /// returned by the break deadline, and wait for all of them to drain. The guard keeps new
    /// grants off the range until dropped.
    pub(super) async fn recall(
        self: &Arc<Self>,
        object: &ObjectKey,
        lo: u64,
        hi: u64,
        reason: &str,
    ) -> Result<BreakGuard, LeaseError> {
        let (guard, targets) = self.mark_locked(&mut self.lock(), object, lo, hi, reason);
        lease_failpoint!("recall.sent");
        self.break_and_drain(&targets).await?;
        Ok(guard)
    }

    /// [`LeaseManager::recall`], but only once no other marker covers part of the range,
    /// waiting for that until the break deadline. An exclusive grant recalls this way: two of
    /// them each behind a marker of its own would each wait for the other's to lift.
    /// Refused with [`LeaseError::Exclusive`] once an exclusive lease holds the range.
    pub(super) async fn recall_alone(
        self: &Arc<Self>,
        object: &ObjectKey,
        lo: u64,
        hi: u64,
        reason: &str,
    ) -> Result<BreakGuard, LeaseError> {
        let deadline = Instant::now() + self.config().break_timeout;
        let (guard, targets) = loop {
            {
                let mut g = self.lock();
                if let Some(id) = g.exclusive_holder(object, lo, hi) {
                    return Err(LeaseError::Exclusive(id));
                }
                if !g.marked(object, lo, hi, None) {
                    break self.mark_locked(&mut g, object, lo, hi, reason);
                }
            }
            let free = |i: &Inner| !i.marked(object, lo, hi, None);
            if !self.wait_changed_until(deadline, free).await {
                return Err(self.retry_after());
            }
        };
        lease_failpoint!("recall.sent");
        self.break_and_drain(&targets).await?;
        Ok(guard)
    }

    /// Put a marker on the range and recall every lease overlapping it (the caller holds the
    /// lock); the leases to wait for.
    fn mark_locked(
        self: &Arc<Self>,
        g: &mut Inner,
        object: &ObjectKey,
        lo: u64,
        hi: u64,
        reason: &str,
    ) -> (BreakGuard, Vec<u64>) {
        let id = g.next_marker;
        g.next_marker += 1;
        g.markers.push(Marker { id, object: object.clone(), lo, hi });
        let mut targets = Vec::new();
        for (lid, l) in g.leases.iter_mut() {
            if l.object == *object && overlaps((l.lo, l.hi), (lo, hi)) && l.state != State::Drained {
                targets.push(*lid);
                self.send_recall(*lid, l, reason);
            }
        }
        (BreakGuard { mgr: self.clone(), marker: id }, targets)
    }

    /// Wait for `targets` to be returned until the break deadline, revoke the rest, drain all.
    async fn break_and_drain(self: &Arc<Self>, targets: &[u64]) -> Result<(), LeaseError> {
        if targets.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let r = self.break_and_drain_inner(targets).await;
        METRICS.recall_drained.observe(t0.elapsed());
        r
    }

    async fn break_and_drain_inner(self: &Arc<Self>, targets: &[u64]) -> Result<(), LeaseError> {
        let deadline = Instant::now() + self.config().break_timeout;
        let returned = |i: &Inner| targets.iter().all(|id| i.leases.get(id).is_none_or(|l| !l.state.live()));
        if !self.wait_changed_until(deadline, returned).await {
            for &id in targets {
                self.revoke(id, "not returned before the break deadline", true);
            }
        }
        lease_failpoint!("recall.revoked");
        let deadline = Instant::now() + self.config().drain_timeout;
        // Drained: no pin left (or quarantined: its blocks will be held for good).
        let done = |i: &Inner| {
            targets.iter().all(|id| {
                i.leases
                    .get(id)
                    .is_none_or(|l| matches!(l.state, State::Drained | State::Quarantined) || l.pins.count() == 0)
            })
        };
        loop {
            // Pins are counted outside the lock; a pin dropping to zero notifies the lease's own
            // waiters, so wait for them together with the manager's notifications (quarantine).
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.lock()) {
                break;
            }
            let pending: Vec<_> = {
                let g = self.lock();
                targets.iter().filter_map(|id| g.leases.get(id).map(|l| l.pins.clone())).collect()
            };
            let all = async {
                for p in &pending {
                    p.drained().await;
                }
            };
            tokio::select! {
                _ = all => {}
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if done(&self.lock()) {
                        break;
                    }
                    let stuck = targets
                        .iter()
                        .copied()
                        .find(|id| self.lock().leases.get(id).is_some_and(|l| l.pins.count() > 0))
                        .unwrap_or(targets[0]);
                    return Err(LeaseError::DrainTimeout(stuck));
                }
            }
        }
        {
            let mut g = self.lock();
            for id in targets {
                if let Some(l) = g.leases.get_mut(id)
                    && l.state != State::Quarantined
                {
                    l.state = State::Drained;
                    g.undrained.remove_lease(*id);
                }
            }
        }
        lease_failpoint!("recall.drained");
        Ok(())
    }

    /// Administrator revoke: recall one lease (or revoke it at once) and wait for its drain.
    /// Only this lease is affected, not others on the same range. Runs in an owned task.
    pub async fn admin_revoke(self: &Arc<Self>, id: u64, immediate: bool) -> Result<(), LeaseError> {
        if !self.lock().leases.contains_key(&id) {
            return Err(LeaseError::NotFound(id));
        }
        let guard = self.gate.enter(Work::LayoutChange).map_err(|_| LeaseError::ShuttingDown)?;
        let m = self.clone();
        let task = tokio::spawn(
            async move {
                let _guard = guard;
                if immediate {
                    m.revoke(id, "revoked by an administrator", false);
                } else if let Some(l) = m.lock().leases.get_mut(&id) {
                    m.send_recall(id, l, "recalled by an administrator");
                }
                m.break_and_drain(&[id]).await
            }
            .in_current_span(),
        );
        task.await.unwrap_or(Err(LeaseError::ShuttingDown))
    }

    /// Recall every lease (shutdown): no new grants, holders get the break timeout, then
    /// revoke and drain. Runs in an owned task.
    pub async fn recall_all(self: &Arc<Self>) {
        let targets: Vec<u64> = {
            let mut g = self.lock();
            g.shutting_down = true;
            let ids: Vec<u64> = g.leases.iter().filter(|(_, l)| l.state.live()).map(|(id, _)| *id).collect();
            for id in &ids {
                if let Some(l) = g.leases.get_mut(id) {
                    self.send_recall(*id, l, "the daemon is shutting down");
                }
            }
            ids
        };
        let m = self.clone();
        let task = tokio::spawn(async move { m.break_and_drain(&targets).await }.in_current_span());
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "shutdown drain incomplete"),
            Err(_) => warn!("shutdown drain task failed"),
        }
    }

    /// Revoke every live lease at once: this node fenced itself (its cluster membership
    /// lapsed). The fence already refuses new grants and operations. Returns how many; their
    /// drains run as for any revoke.
    pub fn fence_revoke(self: &Arc<Self>) -> usize {
        let live: Vec<u64> = self.lock().leases.iter().filter(|(_, l)| l.state.live()).map(|(id, _)| *id).collect();
        for &id in &live {
            self.revoke(id, "this node fenced itself: its cluster membership lapsed", false);
        }
        live.len()
    }

    /// Revoke leases whose TTL passed without renewal. Returns how many.
    pub fn expire(self: &Arc<Self>) -> usize {
        let now = Instant::now();
        let stale: Vec<u64> =
            self.lock().leases.iter().filter(|(_, l)| l.state.live() && l.expires < now).map(|(id, _)| *id).collect();
        for &id in &stale {
            self.revoke(id, "not renewed within the lease TTL", true);
        }
        stale.len()
    }

    /// Expire leases every quarter TTL until `cancel`.
    pub async fn reap(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.config().ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { self.expire(); }
            }
        }
    }
}
