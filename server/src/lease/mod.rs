//! Layout leases: the right of a session to DMA into or out of an object range.
//!
//! ```text
//! grant ─▶ ACTIVE ──renew──▶ ACTIVE
//!            │ release ───────────────────────────▶ RELEASED ─┐
//!            │ ttl passes without renew ──────────▶ REVOKED ──┤
//!            │ recall ─▶ BREAKING ─ release ──────▶ RELEASED ─┤
//!            │              └─ break deadline ────▶ REVOKED ──┤
//!            └───────────────────────────────────────────────▶ pins = 0 ─▶ DRAINED
//! ```
//!
//! A layout change (shrink, punch, delete) calls [`LeaseManager::recall`] first. Recall puts
//! a *breaking marker* on the range of the object (by name) and bumps its layout epoch (so no grant that was
//! computed before can be installed), asks every overlapping holder to return its lease on its
//! session stream, revokes what is not returned by the break deadline (keys stop working at
//! once), and waits until every covering lease has no operation in flight. Only then does it
//! return a [`BreakGuard`]; the caller changes the layout and drops the guard, which lifts the
//! marker. Grants that overlap a marker wait (bounded by the break timeout) and then fail
//! with `Unavailable` and a retry delay.
//!
//! Concurrent grants that must allocate the same chunk do not race: allocation runs under the
//! pool's metadata lock, which serialises it; a hashed per-(object, chunk) lock would only pay
//! off once allocation itself runs in parallel, which the pool does not do yet.

pub mod keys;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdax_proto::model::{ObjectKey, SessionId};
use rdax_proto::pb;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

pub use keys::{Key, KeyTable, Mode, Pins, Refusal};

use crate::metrics::METRICS;
use crate::pool::{ObjError, Pool};
use crate::session::SessionManager;

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// A lease not renewed for this long is revoked.
    pub ttl: Duration,
    /// How long a holder has to return a recalled lease.
    pub break_timeout: Duration,
    /// Bound on waiting for in-flight operations after revoke.
    pub drain_timeout: Duration,
}

/// Lease states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Usable.
    Active,
    /// Recalled; still usable until returned or revoked.
    Breaking,
    /// Returned by the holder.
    Released,
    /// Taken away.
    Revoked,
    /// Released or revoked, and no operation in flight.
    Drained,
}

impl State {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Breaking => "breaking",
            State::Released => "released",
            State::Revoked => "revoked",
            State::Drained => "drained",
        }
    }

    fn live(self) -> bool {
        matches!(self, State::Active | State::Breaking)
    }
}

/// Lease errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The session does not exist.
    #[error("session not found (it may have expired)")]
    SessionNotFound,
    /// No such lease for this session.
    #[error("lease {0} not found")]
    NotFound(u64),
    /// The lease is no longer active.
    #[error("lease {0} was released or revoked")]
    NotActive(u64),
    /// The range is being recalled.
    #[error("the range is being recalled for a layout change; retry in {retry_after_ms} ms")]
    Breaking {
        /// Suggested delay.
        retry_after_ms: u64,
    },
    /// In-flight operations did not finish in time; the layout change was not made.
    #[error("in-flight operations on lease {0} did not drain in time; the layout change was not made")]
    DrainTimeout(u64),
    /// A bad argument.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The pool refused.
    #[error(transparent)]
    Pool(#[from] ObjError),
}

/// One piece of a grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantSegment {
    /// Offset in the object.
    pub object_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Pool offset and key; `None` for a hole in a read lease.
    pub target: Option<(u64, Key)>,
}

/// A granted lease.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Lease id.
    pub id: u64,
    /// Generation.
    pub generation: u64,
    /// Mode.
    pub mode: Mode,
    /// Time to live.
    pub ttl: Duration,
    /// Segments in object order.
    pub segments: Vec<GrantSegment>,
}

/// A lease, for listings.
#[derive(Debug, Clone)]
pub struct LeaseSummary {
    /// Lease id.
    pub id: u64,
    /// Holder.
    pub session: SessionId,
    /// Object.
    pub object: ObjectKey,
    /// Range start.
    pub offset: u64,
    /// Range length.
    pub len: u64,
    /// Mode.
    pub mode: Mode,
    /// Generation.
    pub generation: u64,
    /// State.
    pub state: State,
    /// Operations in flight.
    pub pins: u64,
    /// Until expiry (negative: overdue).
    pub expires_in_ms: i64,
}

struct Lease {
    session: SessionId,
    object: ObjectKey,
    lo: u64,
    hi: u64,
    mode: Mode,
    generation: u64,
    state: State,
    expires: Instant,
    keys: Vec<Key>,
    pins: Arc<Pins>,
}

#[derive(Default)]
struct Inner {
    leases: HashMap<u64, Lease>,
    /// Breaking markers: (marker id, object, lo, hi). Keyed by name, not object id, so that
    /// neither a grant nor a recall needs a pool lookup first; a delete-and-recreate under the
    /// same name is covered conservatively.
    markers: Vec<(u64, ObjectKey, u64, u64)>,
    /// Per-object layout epoch, bumped by every recall.
    epochs: HashMap<ObjectKey, u64>,
    next_id: u64,
    next_generation: u64,
    next_marker: u64,
    shutting_down: bool,
}

/// The lease manager of one daemon.
pub struct LeaseManager {
    inner: Mutex<Inner>,
    keys: Arc<KeyTable>,
    changed: Notify,
    pool: Arc<Pool>,
    sessions: Arc<SessionManager>,
    cfg: Mutex<LeaseConfig>,
    remote: std::sync::OnceLock<Arc<dyn RemoteKeys>>,
}

/// A transport whose keys are checked by hardware rather than by [`KeyTable::pin`] (RDMA: a
/// NIC honours a memory key without asking the daemon). It holds a pin on each lease it has
/// keys for, and is told when the lease ends so that it can invalidate them; the lease
/// drains only once it drops that pin.
pub trait RemoteKeys: Send + Sync {
    /// The lease's keys died (released, revoked or expired): invalidate the transport's keys
    /// for it, then drop its pin.
    fn lease_ended(&self, lease: u64);
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager").field("cfg", &self.config()).finish_non_exhaustive()
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn event(kind: pb::session_event::Kind) -> pb::SessionEvent {
    pb::SessionEvent { kind: Some(kind) }
}

/// Keeps a range marked as breaking until dropped (after the layout change).
#[must_use = "the layout change must happen while the guard is held"]
pub struct BreakGuard {
    mgr: Arc<LeaseManager>,
    marker: u64,
}

impl Drop for BreakGuard {
    fn drop(&mut self) {
        self.mgr.lock().markers.retain(|m| m.0 != self.marker);
        self.mgr.changed.notify_waiters();
    }
}

impl LeaseManager {
    /// A manager over `pool`, notifying holders through `sessions`. Revokes a session's
    /// leases when the session ends.
    pub fn new(pool: Arc<Pool>, sessions: Arc<SessionManager>, cfg: LeaseConfig) -> Arc<Self> {
        let m = Arc::new(Self {
            inner: Mutex::new(Inner { next_id: 1, next_generation: 1, next_marker: 1, ..Default::default() }),
            keys: Arc::new(KeyTable::default()),
            changed: Notify::new(),
            pool,
            sessions: sessions.clone(),
            cfg: Mutex::new(cfg),
            remote: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&m);
        sessions.on_close(Arc::new(move |sid, _reason| {
            if let Some(m) = weak.upgrade() {
                m.revoke_session(sid);
            }
        }));
        m.install_release_hook();
        m
    }

    /// Defence in depth for invariant 1: every layout change recalls and drains first, so
    /// freed blocks are never covered by a live key. If one ever is (a path that forgot to
    /// recall), the blocks are held until no live key covers them — they are never reused
    /// under DMA — and the bug is logged.
    fn install_release_hook(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let rt = tokio::runtime::Handle::try_current().ok();
        self.pool.set_release_hook(Arc::new(move |blocks: crate::pool::ReleasedBlocks| {
            let Some(m) = weak.upgrade() else { return drop(blocks) };
            if !m.covered(&blocks) {
                return drop(blocks);
            }
            tracing::error!(runs = ?blocks.runs(), "BUG: freed blocks are covered by live lease keys; holding them until those leases end");
            match &rt {
                Some(rt) => {
                    rt.spawn(async move {
                        loop {
                            let n = m.changed.notified();
                            tokio::pin!(n);
                            n.as_mut().enable();
                            if !m.covered(&blocks) {
                                return drop(blocks);
                            }
                            // Bounded: every lease ends by its TTL at the latest.
                            let _ = tokio::time::timeout(m.config().ttl, n).await;
                        }
                    });
                }
                // No runtime to wait on: keep the blocks out of the allocator until restart.
                None => std::mem::forget(blocks),
            }
        }));
    }

    fn covered(&self, blocks: &crate::pool::ReleasedBlocks) -> bool {
        use crate::pool::layout::BLOCK;
        blocks.runs().iter().any(|&(s, l)| self.keys.covers(s * BLOCK, (s + l) * BLOCK))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Install the remote-key transport (once).
    pub fn set_remote(&self, remote: Arc<dyn RemoteKeys>) {
        let _ = self.remote.set(remote);
    }

    /// The lease's TCP keys are dead: tell the remote-key transport too.
    fn remote_ended(&self, id: u64) {
        if let Some(r) = self.remote.get() {
            r.lease_ended(id);
        }
    }

    /// The key table (for the data plane).
    pub fn keys(&self) -> &Arc<KeyTable> {
        &self.keys
    }

    /// The configuration.
    pub fn config(&self) -> LeaseConfig {
        *self.cfg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace the timing (SIGHUP reload). Leases already granted keep their expiry until
    /// their next renewal; recalls already running keep their deadline.
    pub fn set_config(&self, cfg: LeaseConfig) {
        *self.cfg.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    async fn wait_changed_until(&self, deadline: Instant, mut done: impl FnMut(&Inner) -> bool) -> bool {
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if done(&self.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return done(&self.lock());
            }
        }
    }

    /// Grant a lease on `[offset, offset + len)` of `object` to `session`.
    pub async fn acquire(
        &self,
        session: SessionId,
        object: ObjectKey,
        offset: u64,
        len: u64,
        mode: Mode,
    ) -> Result<Grant, LeaseError> {
        if !self.sessions.is_live(session) {
            return Err(LeaseError::SessionNotFound);
        }
        if len == 0 {
            return Err(LeaseError::Invalid("lease length must be at least 1"));
        }
        let end = offset.checked_add(len).ok_or(LeaseError::Invalid("offset + length overflows"))?;
        let deadline = Instant::now() + self.config().break_timeout;
        loop {
            let free = |i: &Inner| !i.markers.iter().any(|m| m.1 == object && overlaps((m.2, m.3), (offset, end)));
            if !self.wait_changed_until(deadline, free).await {
                return Err(LeaseError::Breaking {
                    retry_after_ms: self.config().break_timeout.as_millis() as u64 / 2 + 1,
                });
            }
            let epoch = self.lock().epochs.get(&object).copied().unwrap_or(0);
            let k = object.clone();
            // One trip to a blocking thread: check the range, allocate holes (read-write), and
            // read the layout.
            let segs = self
                .blocking(move |p| {
                    let size = p.stat(&k.namespace, &k.name)?.size;
                    if end > size {
                        return Err(ObjError::OutOfRange { offset, len, size, hint: "; resize the object first" });
                    }
                    if mode == Mode::ReadWrite {
                        p.allocate(&k.namespace, &k.name, offset, len)?;
                    }
                    p.segments(&k.namespace, &k.name, offset, len)
                })
                .await??;
            let mut g = self.lock();
            if g.shutting_down {
                return Err(LeaseError::ShuttingDown);
            }
            if g.epochs.get(&object).copied().unwrap_or(0) != epoch || !free(&g) {
                drop(g);
                // A layout change ran meanwhile: compute the segments again — within the same
                // bound, so a stream of recalls cannot keep a grant spinning.
                if Instant::now() >= deadline {
                    return Err(LeaseError::Breaking {
                        retry_after_ms: self.config().break_timeout.as_millis() as u64 / 2 + 1,
                    });
                }
                continue;
            }
            if !self.sessions.is_live(session) {
                return Err(LeaseError::SessionNotFound);
            }
            let id = g.next_id;
            g.next_id += 1;
            let generation = g.next_generation;
            g.next_generation += 1;
            let pins = Arc::new(Pins::default());
            let mut segments = Vec::with_capacity(segs.len());
            let mut entries = Vec::new();
            for s in segs {
                let target = s.pool_offset.map(|p| {
                    let key = keys::random_key();
                    let e = keys::KeyEntry {
                        lease: id,
                        session,
                        generation,
                        pool_lo: p,
                        pool_hi: p + s.len,
                        mode,
                        pins: pins.clone(),
                    };
                    entries.push((key, e));
                    (p, key)
                });
                segments.push(GrantSegment { object_offset: s.offset, len: s.len, target });
            }
            let key_list = entries.iter().map(|e| e.0).collect();
            self.keys.insert(entries);
            g.leases.insert(
                id,
                Lease {
                    session,
                    object: object.clone(),
                    lo: offset,
                    hi: end,
                    mode,
                    generation,
                    state: State::Active,
                    expires: Instant::now() + self.config().ttl,
                    keys: key_list,
                    pins,
                },
            );
            info!(lease = id, session = %session, object = %object, offset, len, generation, "lease granted");
            return Ok(Grant { id, generation, mode, ttl: self.config().ttl, segments });
        }
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Pool) -> T + Send + 'static) -> Result<T, LeaseError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(&pool)).await.map_err(|_| LeaseError::ShuttingDown)
    }

    fn owned(&self, g: &Inner, session: SessionId, id: u64) -> Result<(), LeaseError> {
        match g.leases.get(&id) {
            Some(l) if l.session == session => Ok(()),
            _ => Err(LeaseError::NotFound(id)),
        }
    }

    /// Push the expiry out by the TTL.
    pub fn renew(&self, session: SessionId, id: u64) -> Result<Duration, LeaseError> {
        let mut g = self.lock();
        self.owned(&g, session, id)?;
        let l = g.leases.get_mut(&id).expect("checked");
        if !l.state.live() {
            return Err(LeaseError::NotActive(id));
        }
        l.expires = Instant::now() + self.config().ttl;
        Ok(self.config().ttl)
    }

    /// The holder returns the lease: its keys stop working now; it drains in the background.
    pub fn release(self: &Arc<Self>, session: SessionId, id: u64) -> Result<(), LeaseError> {
        let mut g = self.lock();
        self.owned(&g, session, id)?;
        let l = g.leases.get_mut(&id).expect("checked");
        if !l.state.live() {
            return Err(LeaseError::NotActive(id));
        }
        self.end_locked(l, State::Released);
        drop(g);
        self.remote_ended(id);
        self.changed.notify_waiters();
        self.spawn_drain(id);
        info!(lease = id, "lease released");
        Ok(())
    }

    /// Kill the lease's keys and set its final state (caller holds the lock).
    fn end_locked(&self, l: &mut Lease, state: State) {
        self.keys.remove(&l.keys);
        l.state = state;
    }

    /// Revoke at once: keys dead, holder told. Drains in the background.
    fn revoke(self: &Arc<Self>, id: u64, reason: &str) {
        let mut g = self.lock();
        let Some(l) = g.leases.get_mut(&id) else { return };
        if !l.state.live() {
            return;
        }
        self.end_locked(l, State::Revoked);
        let (session, generation) = (l.session, l.generation);
        drop(g);
        self.remote_ended(id);
        self.changed.notify_waiters();
        let ev =
            pb::session_event::Kind::LeaseRevoked(pb::LeaseRevoked { lease_id: id, generation, reason: reason.into() });
        self.sessions.notify(session, event(ev));
        METRICS.revokes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        warn!(lease = id, session = %session, reason, "lease revoked");
        self.spawn_drain(id);
    }

    fn spawn_drain(self: &Arc<Self>, id: u64) {
        let m = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { m.drain(id).await });
        }
    }

    /// Wait (bounded) until the lease has no operation in flight, then mark it drained and
    /// forget it.
    async fn drain(&self, id: u64) -> bool {
        let Some(pins) = self.lock().leases.get(&id).map(|l| l.pins.clone()) else { return true };
        let t0 = Instant::now();
        let ok = tokio::time::timeout(self.config().drain_timeout, pins.drained()).await.is_ok();
        METRICS.drain.observe(t0.elapsed());
        if ok {
            self.lock().leases.remove(&id);
            self.changed.notify_waiters();
        } else {
            warn!(lease = id, pins = pins.count(), "lease did not drain within the drain timeout");
        }
        ok
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
        METRICS.recalls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
            self.revoke(id, "the session ended");
        }
    }

    /// Recall every live lease overlapping `[lo, hi)` of object `object_id`, revoke what is not
    /// returned by the break deadline, and wait for all of them to drain. The returned guard
    /// keeps new grants off the range until the caller has changed the layout.
    pub async fn recall(
        self: &Arc<Self>,
        object: &ObjectKey,
        lo: u64,
        hi: u64,
        reason: &str,
    ) -> Result<BreakGuard, LeaseError> {
        let (guard, targets) = {
            let mut g = self.lock();
            let marker = g.next_marker;
            g.next_marker += 1;
            g.markers.push((marker, object.clone(), lo, hi));
            *g.epochs.entry(object.clone()).or_insert(0) += 1;
            let mut targets = Vec::new();
            for (id, l) in g.leases.iter_mut() {
                if l.object == *object && overlaps((l.lo, l.hi), (lo, hi)) {
                    targets.push(*id);
                    self.send_recall(*id, l, reason);
                }
            }
            (BreakGuard { mgr: self.clone(), marker }, targets)
        };
        self.break_and_drain(&targets).await?;
        Ok(guard)
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
                self.revoke(id, "not returned before the break deadline");
            }
        }
        for &id in targets {
            let pins = self.lock().leases.get(&id).map(|l| l.pins.clone());
            if let Some(p) = pins
                && tokio::time::timeout(self.config().drain_timeout, p.drained()).await.is_err()
            {
                return Err(LeaseError::DrainTimeout(id));
            }
            if let Some(l) = self.lock().leases.get_mut(&id) {
                l.state = State::Drained;
            }
        }
        Ok(())
    }

    /// Administrator revoke: recall one lease (or revoke it at once) and wait for its drain.
    /// Only this lease is affected, not others on the same range.
    pub async fn admin_revoke(self: &Arc<Self>, id: u64, immediate: bool) -> Result<(), LeaseError> {
        {
            let mut g = self.lock();
            let l = g.leases.get_mut(&id).ok_or(LeaseError::NotFound(id))?;
            if !immediate {
                self.send_recall(id, l, "recalled by an administrator");
            }
        }
        if immediate {
            self.revoke(id, "revoked by an administrator");
        }
        self.break_and_drain(&[id]).await
    }

    /// Recall every lease (shutdown): holders get the break timeout, then revoke and drain.
    pub async fn recall_all(self: &Arc<Self>) {
        let targets: Vec<u64> = {
            let mut g = self.lock();
            g.shutting_down = true;
            let mut t = Vec::new();
            for (id, l) in g.leases.iter_mut().filter(|(_, l)| l.state.live()) {
                self.send_recall(*id, l, "the daemon is shutting down");
                t.push(*id);
            }
            t
        };
        if let Err(e) = self.break_and_drain(&targets).await {
            warn!(error = %e, "shutdown drain incomplete");
        }
    }

    /// Revoke leases whose TTL passed without renewal. Returns how many.
    pub fn expire(self: &Arc<Self>) -> usize {
        let now = Instant::now();
        let stale: Vec<u64> =
            self.lock().leases.iter().filter(|(_, l)| l.state.live() && l.expires < now).map(|(id, _)| *id).collect();
        for &id in &stale {
            self.revoke(id, "not renewed within the lease TTL");
        }
        stale.len()
    }

    /// Expire leases every quarter TTL until `cancel`.
    pub async fn reap(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.config().ttl / 4);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { self.expire(); }
            }
        }
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
            })
            .collect();
        v.sort_by_key(|l| l.id);
        v
    }
}

#[cfg(test)]
mod tests;
