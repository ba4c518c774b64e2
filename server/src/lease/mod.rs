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
//! Every layout change (shrink, punch, delete) goes through [`LeaseManager::change_layout`],
//! which runs the whole sequence in one task it owns — breaking marker on the range, recall,
//! revoke at the break deadline, drain, the change itself, marker lifted — so a client that
//! goes away mid-way cannot cut it short (see `recall.rs`). Grants that overlap a marker wait
//! (bounded by the break timeout) and then fail with `Unavailable` and a retry delay.
//!
//! A grant computes its segments and installs its keys in one step under the pool's metadata
//! lock, after checking for markers and the object's layout epoch (second line of defence):
//! no layout change can come between reading the layout and handing out keys for it. The
//! release hook (third line, `hold.rs`) keeps freed blocks out of the allocator while any
//! lease that covered them has not drained.
//!
//! A grant for a transport with device-checked keys (RDMA) also runs in an owned task
//! ([`LeaseManager::grant`]); the caller gets a [`GrantHandle`] that gives the lease back if
//! it is dropped before the grant reached the client.

mod exclusive;
mod fence;
mod fill;
mod grant;
mod hold;
pub mod keys;
mod limits;
mod recall;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdax_proto::model::{ObjectKey, SessionId};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info};

pub use fence::Fence;
pub use grant::GrantHandle;
pub use keys::{Key, KeyTable, Mode, PinGuard, Pins, Refusal};
pub use limits::LeaseLimits;
use limits::Usage;

use crate::dma::{DmaError, RemoteKey, Transport, TransportKind};
use crate::gate::{Gate, Work};
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
    /// Caps.
    pub limits: LeaseLimits,
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
    /// Ended, but a transport could not prove its keys dead: the lease never drains and the
    /// blocks it covered are never reused (until the pool is opened again).
    Quarantined,
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
            State::Quarantined => "quarantined",
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
    /// This node fenced itself: it is a cluster member whose membership lapsed.
    #[error(
        "this node grants no leases: its cluster membership lapsed (etcd unreachable, or its etcd lease expired); retry later or use another replica"
    )]
    Fenced,
    /// A failure injected by a test (failpoint).
    #[error("injected failure at {0}")]
    Injected(&'static str),
    /// An exclusive lease holds (part of) the range.
    #[error("the range is held by exclusive lease {0}; it must be released first")]
    Exclusive(u64),
    /// A cap was reached.
    #[error("{what}: the limit is {cap} ({key})")]
    Limit {
        /// What is at its limit.
        what: &'static str,
        /// The cap.
        cap: usize,
        /// Its config key.
        key: &'static str,
    },
    /// The pool refused.
    #[error(transparent)]
    Pool(#[from] ObjError),
    /// The transport could not make keys.
    #[error(transparent)]
    Dma(#[from] DmaError),
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
    /// The transport's own key (RDMA), if it made one.
    pub remote: Option<RemoteKey>,
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
    /// The transport the keys are for.
    pub transport: TransportKind,
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
    /// An exclusive lease.
    pub exclusive: bool,
}

/// What a grant asks for.
#[derive(Clone)]
pub struct GrantRequest {
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
    /// Exclusive: recall every other holder of the range first, and keep new overlapping
    /// grants off it until this lease ends.
    pub exclusive: bool,
    /// Read-write only: fill the range's holes at grant time (SDK grants always do). Off, holes
    /// come back unkeyed, for [`LeaseManager::fill`] later (see `fill.rs`).
    pub allocate: bool,
    /// The transport that makes the keys.
    pub transport: Arc<dyn Transport>,
}

struct Lease {
    session: SessionId,
    object: ObjectKey,
    /// The pool's id of the object when granted (names can be reused).
    object_id: u64,
    lo: u64,
    hi: u64,
    mode: Mode,
    generation: u64,
    state: State,
    expires: Instant,
    keys: Vec<Key>,
    /// `(object offset, length, pool offset)` of every keyed segment.
    segs: Vec<(u64, u64, u64)>,
    pins: Arc<Pins>,
    /// The newest marker id when granted (for audits: no grant may overlap an older marker).
    granted_after_marker: u64,
    /// The transport holding keys for it beyond the key table.
    transport: Option<Arc<dyn Transport>>,
    /// The principal of its session (for the per-principal cap).
    principal: Arc<str>,
    /// Exclusive: no other lease may be granted over its range while it is live.
    exclusive: bool,
}

struct Marker {
    id: u64,
    object: ObjectKey,
    lo: u64,
    hi: u64,
}

#[derive(Default)]
struct Inner {
    leases: HashMap<u64, Lease>,
    /// Breaking markers. Keyed by name, not object id, so that neither a grant nor a recall
    /// needs a pool lookup first; a delete-and-recreate under the same name is covered
    /// conservatively.
    markers: Vec<Marker>,
    /// Pool ranges of every lease that has not drained.
    undrained: hold::RangeIndex,
    /// Live leases and their keys per session (for the per-session caps).
    live_by_session: HashMap<SessionId, Usage>,
    /// Live leases per principal.
    live_by_principal: HashMap<Arc<str>, usize>,
    /// Live exclusive leases, so that grants skip the search for one when there is none.
    exclusive_live: usize,
    next_id: u64,
    next_generation: u64,
    next_marker: u64,
    shutting_down: bool,
}

impl Inner {
    /// Why a lease id not in the table is refused: ids only grow, so one below the next id was
    /// granted once and has ended (and drained).
    fn gone(&self, id: u64) -> Refusal {
        if id > 0 && id < self.next_id { Refusal::Revoked } else { Refusal::UnknownKey }
    }

    fn marked(&self, object: &ObjectKey, lo: u64, hi: u64, except: Option<u64>) -> bool {
        self.markers.iter().any(|m| Some(m.id) != except && m.object == *object && overlaps((m.lo, m.hi), (lo, hi)))
    }
}

/// The lease manager of one daemon.
pub struct LeaseManager {
    inner: Mutex<Inner>,
    keys: Arc<KeyTable>,
    changed: Notify,
    pool: Arc<Pool>,
    sessions: Arc<SessionManager>,
    cfg: Mutex<LeaseConfig>,
    gate: Gate,
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager").field("cfg", &self.config()).finish_non_exhaustive()
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Reach a failpoint that can fail a lease step.
macro_rules! lease_failpoint {
    ($name:literal) => {
        if $crate::failpoint!($name) {
            return Err(LeaseError::Injected($name));
        }
    };
}
pub(crate) use lease_failpoint;

impl LeaseManager {
    /// The pool the leases are of.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// A manager over `pool`, notifying holders through `sessions`. Revokes a session's
    /// leases when the session ends. Its owned tasks (layout changes, grants) hold `gate`.
    pub fn new(pool: Arc<Pool>, sessions: Arc<SessionManager>, cfg: LeaseConfig, gate: Gate) -> Arc<Self> {
        let m = Arc::new(Self {
            inner: Mutex::new(Inner { next_id: 1, next_generation: 1, next_marker: 1, ..Default::default() }),
            keys: Arc::new(KeyTable::default()),
            changed: Notify::new(),
            pool,
            sessions: sessions.clone(),
            cfg: Mutex::new(cfg),
            gate,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key table (for the TCP data plane).
    pub fn keys(&self) -> &Arc<KeyTable> {
        &self.keys
    }

    /// The fence grants and operations pass (always open on a single node).
    pub fn fence(&self) -> &Arc<Fence> {
        self.keys.fence()
    }

    /// The shutdown gate its tasks hold.
    pub fn gate(&self) -> &Gate {
        &self.gate
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

    fn retry_after(&self) -> LeaseError {
        LeaseError::Breaking { retry_after_ms: self.config().break_timeout.as_millis() as u64 / 2 + 1 }
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

    /// Grant a lease on `[offset, offset + len)` of `object` to `session`, with keys for the
    /// TCP data plane only.
    pub async fn acquire(
        self: &Arc<Self>,
        session: SessionId,
        object: ObjectKey,
        offset: u64,
        len: u64,
        mode: Mode,
    ) -> Result<Grant, LeaseError> {
        self.acquire_with(session, object, offset, len, mode, How { own: None, allocate: true }).await
    }

    /// [`LeaseManager::acquire`], past the marker `how.own` (an exclusive grant's own recall),
    /// filling holes or not.
    async fn acquire_with(
        self: &Arc<Self>,
        session: SessionId,
        object: ObjectKey,
        offset: u64,
        len: u64,
        mode: Mode,
        how: How,
    ) -> Result<Grant, LeaseError> {
        let own = how.own;
        if !self.sessions.is_live(session) {
            return Err(LeaseError::SessionNotFound);
        }
        if len == 0 {
            return Err(LeaseError::Invalid("lease length must be at least 1"));
        }
        let end = offset.checked_add(len).ok_or(LeaseError::Invalid("offset + length overflows"))?;
        let deadline = Instant::now() + self.config().break_timeout;
        loop {
            if let Some(id) = self.lock().exclusive_holder(&object, offset, end) {
                return Err(LeaseError::Exclusive(id));
            }
            let free = |i: &Inner| !i.marked(&object, offset, end, own);
            if !free(&self.lock()) {
                let _ = crate::failpoint!("grant.waiting");
                if !self.wait_changed_until(deadline, free).await {
                    return Err(self.retry_after());
                }
            }
            // Allocate (read-write) and note the object's layout epoch; then, under the
            // metadata lock, read the segments and install the keys in one step.
            // (Nothing to allocate: one trip to the pool, below, does it all — it checks the
            // range against the size the same way.)
            let (k, cap) = (object.clone(), self.config().limits.alloc_per_request);
            let expect = match mode {
                Mode::ReadWrite if how.allocate => {
                    self.blocking(move |p| {
                        let size = p.stat(&k.namespace, &k.name)?.size;
                        if end > size {
                            return Err(ObjError::OutOfRange { offset, len, size, hint: "; resize the object first" });
                        }
                        p.allocate_capped(&k.namespace, &k.name, offset, len, cap).map(Some)
                    })
                    .await??
                }
                Mode::ReadWrite | Mode::Read => None,
            };
            lease_failpoint!("grant.allocated");
            let (k, this) = (object.clone(), self.clone());
            let installed = self
                .blocking(move |p| {
                    // Lock order: pool metadata, then leases, then keys. (The release hook takes
                    // leases with no metadata lock held.)
                    p.with_segments(&k.namespace, &k.name, offset, len, |id, epoch, segs| {
                        this.install_locked(
                            Install { session, object: &k, id, epoch, offset, end, mode, expect, own },
                            segs,
                        )
                    })
                })
                .await??;
            match installed? {
                Some(g) => return Ok(g),
                // A layout change ran meanwhile: compute the segments again, within the same
                // bound, so a stream of recalls cannot keep a grant spinning.
                None if Instant::now() >= deadline => return Err(self.retry_after()),
                None => continue,
            }
        }
    }

    /// Install a lease over `segs`, the object's current layout (the caller holds the pool's
    /// metadata lock). `Ok(None)`: a recall began, or the layout changed since the range was
    /// allocated; the caller retries.
    fn install_locked(&self, a: Install<'_>, segs: &[crate::pool::Segment]) -> Result<Option<Grant>, LeaseError> {
        let mut g = self.lock();
        if g.shutting_down {
            return Err(LeaseError::ShuttingDown);
        }
        // Checked under the lock `fence_revoke` takes: a grant installed after the fence
        // closed is refused here, one installed before is revoked there.
        if !self.keys.fence().is_open() {
            return Err(LeaseError::Fenced);
        }
        if g.marked(a.object, a.offset, a.end, a.own) {
            return Ok(None);
        }
        if let Some(id) = g.exclusive_holder(a.object, a.offset, a.end) {
            return Err(LeaseError::Exclusive(id));
        }
        // Second line of defence: the layout this grant allocated is still the layout.
        if a.expect.is_some_and(|e| e != (a.id, a.epoch)) {
            return Ok(None);
        }
        if !self.sessions.is_live(a.session) {
            return Err(LeaseError::SessionNotFound);
        }
        let limits = self.config().limits;
        let used = g.live_by_session.get(&a.session).copied().unwrap_or_default();
        if used.leases >= limits.per_session {
            let what = "the session holds as many leases as it may";
            return Err(LeaseError::Limit { what, cap: limits.per_session, key: "limits.max_leases_per_session" });
        }
        if g.leases.len() >= limits.total {
            let what = "the daemon holds as many leases as it may";
            return Err(LeaseError::Limit { what, cap: limits.total, key: "limits.max_leases" });
        }
        if segs.len() > limits.segments {
            let what = "the range is in more pieces than one lease may have; lease a smaller range";
            return Err(LeaseError::Limit { what, cap: limits.segments, key: "limits.max_segments_per_lease" });
        }
        let principal = self.sessions.owner(a.session).ok_or(LeaseError::SessionNotFound)?;
        if g.live_by_principal.get(&principal).copied().unwrap_or(0) >= limits.per_principal {
            let what = "the principal's sessions hold as many leases as they may";
            return Err(LeaseError::Limit { what, cap: limits.per_principal, key: "limits.max_leases_per_principal" });
        }
        let nkeys = segs.iter().filter(|s| s.pool_offset.is_some()).count();
        if used.keys + nkeys > limits.keys_per_session {
            let what = "the session's leases hold as many keys as they may; release some, or lease fewer pieces";
            return Err(LeaseError::Limit { what, cap: limits.keys_per_session, key: "limits.max_keys_per_session" });
        }
        let u = g.live_by_session.entry(a.session).or_default();
        u.leases += 1;
        u.keys += nkeys;
        *g.live_by_principal.entry(principal.clone()).or_default() += 1;
        let id = g.next_id;
        g.next_id += 1;
        let generation = g.next_generation;
        g.next_generation += 1;
        let pins = Arc::new(Pins::default());
        let mut segments = Vec::with_capacity(segs.len());
        let mut entries = Vec::new();
        let mut keyed = Vec::new();
        for s in segs {
            let target = s.pool_offset.map(|p| {
                let key = keys::random_key();
                let e = keys::KeyEntry {
                    lease: id,
                    session: a.session,
                    generation,
                    pool_lo: p,
                    pool_hi: p + s.len,
                    mode: a.mode,
                    pins: pins.clone(),
                };
                entries.push((key, e));
                keyed.push((s.offset, s.len, p));
                (p, key)
            });
            segments.push(GrantSegment { object_offset: s.offset, len: s.len, target, remote: None });
        }
        let key_list = entries.iter().map(|e| e.0).collect();
        self.keys.insert(entries);
        for &(_, len, p) in &keyed {
            g.undrained.insert(id, p, p + len);
        }
        let granted_after_marker = g.next_marker - 1;
        let ttl = self.config().ttl;
        // Exclusive from the moment it exists, under the same lock: marked afterwards, the
        // lease could end (its session closing on another thread) before it was marked.
        let exclusive = a.own.is_some();
        if exclusive {
            g.exclusive_live += 1;
        }
        g.leases.insert(
            id,
            Lease {
                session: a.session,
                object: a.object.clone(),
                object_id: a.id,
                lo: a.offset,
                hi: a.end,
                mode: a.mode,
                generation,
                state: State::Active,
                expires: Instant::now() + ttl,
                keys: key_list,
                segs: keyed,
                pins,
                granted_after_marker,
                transport: None,
                principal,
                exclusive,
            },
        );
        info!(lease = id, session = %a.session, object = %a.object, offset = a.offset, len = a.end - a.offset, generation, "lease granted");
        Ok(Some(Grant { id, generation, mode: a.mode, ttl, transport: TransportKind::Tcp, segments }))
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Pool) -> T + Send + 'static) -> Result<T, LeaseError> {
        let guard = self.gate.enter(Work::PoolJob).map_err(|_| LeaseError::ShuttingDown)?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&pool)
        })
        .await
        .map_err(|_| LeaseError::ShuttingDown)
    }

    fn owned<'a>(&self, g: &'a mut Inner, session: SessionId, id: u64) -> Result<&'a mut Lease, LeaseError> {
        match g.leases.get_mut(&id) {
            Some(l) if l.session == session => Ok(l),
            _ => Err(LeaseError::NotFound(id)),
        }
    }

    /// Push the expiry out by the TTL.
    pub fn renew(&self, session: SessionId, id: u64) -> Result<Duration, LeaseError> {
        let ttl = self.config().ttl;
        let mut g = self.lock();
        let l = self.owned(&mut g, session, id)?;
        if !l.state.live() {
            return Err(LeaseError::NotActive(id));
        }
        l.expires = Instant::now() + ttl;
        Ok(ttl)
    }

    /// The holder returns the lease: its keys stop working now; it drains in the background.
    pub fn release(self: &Arc<Self>, session: SessionId, id: u64) -> Result<(), LeaseError> {
        let mut g = self.lock();
        let l = self.owned(&mut g, session, id)?;
        if !l.state.live() {
            return Err(LeaseError::NotActive(id));
        }
        let transport = self.end_locked(&mut g, id, State::Released);
        drop(g);
        self.ended(id, transport);
        info!(lease = id, "lease released");
        Ok(())
    }

    /// Pin a live lease of `session` for as long as the guard is held (a transport whose keys
    /// work without asking the daemon holds one such pin while they may work).
    pub fn pin_lease(&self, session: SessionId, id: u64) -> Result<PinGuard, Refusal> {
        let g = self.lock();
        let l = g.leases.get(&id).ok_or_else(|| g.gone(id))?;
        if l.session != session {
            return Err(Refusal::WrongSession);
        }
        if !l.state.live() {
            return Err(Refusal::Revoked);
        }
        if !self.keys.fence().is_open() {
            return Err(Refusal::Fenced);
        }
        Ok(l.pins.pin(id))
    }

    /// Pin a live lease of `session` and map `[offset, offset + len)` of its object range to
    /// pool ranges (FLUSH over a transport that names leases, not keys). The range must lie
    /// inside keyed segments.
    pub fn pin_range(
        &self,
        session: SessionId,
        id: u64,
        offset: u64,
        len: u64,
    ) -> Result<(PinGuard, Vec<(u64, u64)>), Refusal> {
        let g = self.lock();
        let l = g.leases.get(&id).ok_or_else(|| g.gone(id))?;
        if l.session != session {
            return Err(Refusal::WrongSession);
        }
        if !l.state.live() {
            return Err(Refusal::Revoked);
        }
        if !self.keys.fence().is_open() {
            return Err(Refusal::Fenced);
        }
        let end = offset.checked_add(len).ok_or(Refusal::OutOfRange)?;
        let mut out = Vec::new();
        let mut covered = 0;
        for &(o, n, p) in &l.segs {
            let (lo, hi) = (offset.max(o), end.min(o + n));
            if lo < hi {
                out.push((p + (lo - o), hi - lo));
                covered += hi - lo;
            }
        }
        if covered != len {
            return Err(Refusal::OutOfRange);
        }
        Ok((l.pins.pin(id), out))
    }

    /// A transport could not prove a lease's keys dead: the lease never drains, and blocks
    /// it covered are never given to anyone (until the pool is opened again). A layout change
    /// waiting for it goes ahead; the release hook quarantines the freed blocks.
    pub fn quarantine(self: &Arc<Self>, id: u64, why: &str) {
        let mut g = self.lock();
        let Some(l) = g.leases.get(&id) else { return };
        let live = l.state.live();
        let transport = if live { self.end_locked(&mut g, id, State::Quarantined) } else { None };
        let l = g.leases.get_mut(&id).expect("present");
        l.state = State::Quarantined;
        let blocks: u64 = l.segs.iter().map(|s| s.1.div_ceil(crate::pool::layout::BLOCK)).sum();
        drop(g);
        crate::metrics::METRICS.quarantined_leases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        error!(
            lease = id,
            why,
            blocks,
            "lease quarantined: its keys could not be proven dead; the blocks it covers will not be reused until restart"
        );
        self.changed.notify_waiters();
        if let Some(t) = transport {
            t.lease_ended(id);
        }
    }
}

/// How a grant treats markers and holes.
#[derive(Clone, Copy)]
struct How {
    /// The marker an exclusive grant put up itself, which it may pass.
    own: Option<u64>,
    /// Fill holes (read-write).
    allocate: bool,
}

/// The arguments of one key installation.
struct Install<'a> {
    session: SessionId,
    object: &'a ObjectKey,
    id: u64,
    epoch: u64,
    offset: u64,
    end: u64,
    mode: Mode,
    /// `(object id, layout epoch)` seen when the range was allocated.
    expect: Option<(u64, u64)>,
    /// The marker an exclusive grant put up itself, which it may pass. Only exclusive grants
    /// have one: the lease is installed exclusive.
    own: Option<u64>,
}

#[cfg(test)]
mod tests;
