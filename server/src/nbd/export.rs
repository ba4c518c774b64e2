//! One exported volume: the lease its NBD connections share, and the registry of exports.
//!
//! The first connection to a volume makes its [`Export`]; the last one to leave ends it. An
//! export is a lease holder like any SDK client: it opens a session of its own (principal
//! `rdaxd:nbd`), takes a lease over the whole volume — read-write and, by default, exclusive
//! when the first client may write; shared read-only otherwise — and a holder task keeps it:
//! it renews the lease and the session, and when the lease is recalled (a resize, TRIM or
//! delete; another holder's exclusive grant; shutdown) it releases it and takes a new one as
//! soon as the layout change is done. Requests see the current lease as a [`View`]: while
//! there is none they wait, bounded, and a request whose pin is refused because the lease
//! just ended waits for the next view and tries again.
//!
//! Holes stay holes: the lease is granted without filling them, and a write into one fills
//! the 2 MiB-aligned piece around it ([`Export::fill`]). FLUSH persists what was written
//! since the last FLUSH on any connection (a dirty set per export), so FLUSH is consistent
//! across connections (`NBD_FLAG_CAN_MULTI_CONN`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdax_proto::model::{ObjectKey, SessionId};
use rdax_proto::pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::gate::{Gate, Work};
use crate::lease::{GrantRequest, GrantSegment, Key, LeaseError, LeaseManager, Mode};
use crate::pool::Pool;
use crate::pool::media::Media;
use crate::session::{Owner, SessionManager};

/// The principal of every export's session.
pub const PRINCIPAL: &str = "rdaxd:nbd";

/// Dirty tracking granularity for FLUSH.
const DIRTY_CHUNK: u64 = 256 << 10;

/// Holes are filled in pieces of at least this, aligned to it.
const FILL_MIN: u64 = 2 << 20;

/// Most segments a fill may add: the piece grows with the volume so that a whole volume
/// stays within the session's key cap.
const FILL_PIECES: u64 = 4096;

/// One piece of the current lease.
#[derive(Debug, Clone)]
pub struct Seg {
    /// Offset in the volume.
    pub off: u64,
    /// Bytes.
    pub len: u64,
    /// Pool offset and key; `None` for a hole.
    pub target: Option<(u64, Key)>,
}

/// The lease the export holds now.
#[derive(Debug)]
pub struct View {
    /// Lease id.
    pub lease: u64,
    /// Its generation.
    pub generation: u64,
    /// The export's session.
    pub session: SessionId,
    /// Bytes covered: the volume's size when the lease was granted.
    pub size: u64,
    /// Read-write.
    pub writable: bool,
    /// In volume order, covering `[0, size)`.
    pub segs: Vec<Seg>,
}

impl View {
    /// The index of the segment holding `off` (`off < size`).
    pub fn find(&self, off: u64) -> usize {
        self.segs.partition_point(|s| s.off + s.len <= off)
    }

    fn with_filled(&self, filled: &[GrantSegment]) -> View {
        let (lo, hi) = match (filled.first(), filled.last()) {
            (Some(a), Some(b)) => (a.object_offset, b.object_offset + b.len),
            _ => return self.clone_segs(self.segs.clone()),
        };
        let mut segs = Vec::with_capacity(self.segs.len() + filled.len() + 2);
        for s in &self.segs {
            let end = s.off + s.len;
            if end <= lo || s.off >= hi {
                segs.push(s.clone());
                continue;
            }
            // Only holes are filled, so a segment that overlaps the range is a hole; keep
            // whatever of it lies outside.
            if s.off < lo {
                segs.push(Seg { off: s.off, len: lo - s.off, target: None });
            }
            if s.off <= lo {
                segs.extend(filled.iter().map(|f| Seg { off: f.object_offset, len: f.len, target: f.target }));
            }
            if end > hi {
                segs.push(Seg { off: hi, len: end - hi, target: None });
            }
        }
        self.clone_segs(segs)
    }

    fn clone_segs(&self, segs: Vec<Seg>) -> View {
        View {
            lease: self.lease,
            generation: self.generation,
            session: self.session,
            size: self.size,
            writable: self.writable,
            segs,
        }
    }
}

/// Where the export's lease stands.
#[derive(Debug, Clone)]
pub enum Held {
    /// Being (re)acquired.
    Pending,
    /// Usable.
    Ready(Arc<View>),
    /// The export ended (volume deleted, daemon shutting down, session evicted).
    Ended(String),
}

/// What an export needs from the daemon.
#[derive(Clone)]
pub struct Deps {
    /// Leases.
    pub leases: Arc<LeaseManager>,
    /// Sessions.
    pub sessions: Arc<SessionManager>,
    /// The pool (sizes).
    pub pool: Arc<Pool>,
    /// The pool medium (the bytes).
    pub media: Arc<dyn Media>,
    /// Shutdown waits for work in it.
    pub gate: Gate,
    /// The transport named in grants (the TCP data plane: software keys, nothing to bind).
    pub transport: Arc<dyn crate::dma::Transport>,
    /// Writable exports take exclusive leases.
    pub exclusive: bool,
}

/// One exported volume.
pub struct Export {
    /// The volume.
    pub key: ObjectKey,
    /// Whether clients may write (decided by the first client's rights).
    pub writable: bool,
    deps: Deps,
    held: watch::Receiver<Held>,
    held_tx: Arc<watch::Sender<Held>>,
    /// Connections open now.
    conns: AtomicUsize,
    /// Cancelled to disconnect every client (forced delete) and end the export.
    pub disconnect: CancellationToken,
    fill_lock: tokio::sync::Mutex<()>,
    flush_lock: tokio::sync::Mutex<()>,
    dirty: Mutex<BTreeSet<u64>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("key", &self.key).field("writable", &self.writable).finish_non_exhaustive()
    }
}

/// Why a request cannot be served now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The export ended; the client should disconnect.
    Ended(String),
    /// No lease came back within the bound.
    Timeout,
}

impl Export {
    /// The current view, waiting (at most `bound`) while the lease is being re-acquired.
    pub async fn view(&self, bound: Duration) -> Result<Arc<View>, Unavailable> {
        if let Held::Ready(v) = &*self.held.borrow() {
            return Ok(v.clone()); // the common case: no waiting, no timer
        }
        self.wait_until(bound, |_| true).await
    }

    /// Wait until the view is no longer `old` (its lease ended), at most `bound`.
    pub async fn changed_from(&self, old: &Arc<View>, bound: Duration) -> Result<Arc<View>, Unavailable> {
        self.wait_until(bound, |v| !Arc::ptr_eq(v, old)).await
    }

    /// Wait, at most `bound`, for a view that `fits`, or for the export to end.
    async fn wait_until(&self, bound: Duration, fits: impl Fn(&Arc<View>) -> bool) -> Result<Arc<View>, Unavailable> {
        let mut rx = self.held.clone();
        let done = |h: &Held| match h {
            Held::Pending => false,
            Held::Ready(v) => fits(v),
            Held::Ended(_) => true,
        };
        match tokio::time::timeout(bound, rx.wait_for(done)).await {
            Ok(Ok(h)) => match &*h {
                Held::Ready(v) => Ok(v.clone()),
                Held::Ended(why) => Err(Unavailable::Ended(why.clone())),
                Held::Pending => unreachable!("waited for it to change"),
            },
            Ok(Err(_)) => Err(Unavailable::Ended("the export ended".into())),
            Err(_) => Err(Unavailable::Timeout),
        }
    }

    /// Fill the hole of `view` that holds `off`: the [`FILL_MIN`]-aligned piece around it
    /// (larger on large volumes), clipped to the hole. Returns the view to use next.
    pub async fn fill(&self, view: &Arc<View>, off: u64) -> Result<Arc<View>, LeaseError> {
        let _one = self.fill_lock.lock().await;
        // Another request may have filled it, or the lease changed, while we waited.
        if let Held::Ready(now) = &*self.held.borrow()
            && !Arc::ptr_eq(now, view)
        {
            return Ok(now.clone());
        }
        let i = view.find(off);
        let hole = &view.segs[i];
        if hole.target.is_some() {
            return Ok(view.clone());
        }
        let piece = FILL_MIN.max((view.size / FILL_PIECES).next_power_of_two());
        let lo = (off / piece * piece).max(hole.off);
        let hi = (off / piece * piece + piece).min(hole.off + hole.len);
        // Owned by a task: a request that goes away mid-fill leaves no half-keyed lease.
        let (leases, session, lease) = (self.deps.leases.clone(), view.session, view.lease);
        let filled = tokio::spawn(async move { leases.fill(session, lease, lo, hi - lo).await })
            .await
            .map_err(|_| LeaseError::ShuttingDown)??;
        let next = Arc::new(view.with_filled(&filled));
        // Publish only if the lease is still the one we filled (a recall may have replaced it).
        let published = self.held_tx.send_if_modified(|h| match h {
            Held::Ready(v) if Arc::ptr_eq(v, view) => {
                *h = Held::Ready(next.clone());
                true
            }
            _ => false,
        });
        Ok(if published { next } else { view.clone() })
    }

    /// Note `[pool_off, pool_off + len)` as written since the last FLUSH.
    pub fn dirty(&self, pool_off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        for c in pool_off / DIRTY_CHUNK..=(pool_off + len - 1) / DIRTY_CHUNK {
            d.insert(c);
        }
    }

    /// Persist everything written (and answered) since the last FLUSH, on any connection.
    /// Flushes run one at a time, so a FLUSH never answers while an earlier one that took
    /// its writes is still persisting them.
    pub async fn flush(&self) -> Result<(), String> {
        let _one = self.flush_lock.lock().await;
        let chunks = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for c in chunks {
            match ranges.last_mut() {
                Some(r) if r.0 + r.1 == c * DIRTY_CHUNK => r.1 += DIRTY_CHUNK,
                _ => ranges.push((c * DIRTY_CHUNK, DIRTY_CHUNK)),
            }
        }
        self.persist(ranges).await
    }

    /// Make pool ranges durable on a blocking thread (the task finishes even if the request
    /// goes away). Flushing cache lines or `msync`ing a range changes no byte, so it needs no
    /// pin: a range whose blocks changed hands since is flushed harmlessly.
    pub async fn persist(&self, ranges: Vec<(u64, u64)>) -> Result<(), String> {
        let media = self.deps.media.clone();
        let guard = self.deps.gate.join(Work::PoolJob);
        let len = media.len();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            for (off, n) in ranges {
                let n = n.min(len.saturating_sub(off));
                if n > 0 {
                    media.flush(off, n);
                }
            }
            media.drain();
            media.failure().map_or(Ok(()), |f| Err(f.detail))
        })
        .await
        .map_err(|_| "the daemon is shutting down".to_string())?
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.load(Relaxed)
    }

    /// The daemon's lease manager (TRIM and WRITE_ZEROES go through its layout changes).
    pub fn leases(&self) -> &Arc<LeaseManager> {
        &self.deps.leases
    }

    /// The pool medium.
    pub fn media(&self) -> &Arc<dyn Media> {
        &self.deps.media
    }

    /// Check a pin of `len` bytes at `pool_off` under `view`'s key.
    pub fn pin(
        &self,
        view: &View,
        key: &Key,
        pool_off: u64,
        len: u64,
        write: bool,
    ) -> Result<crate::lease::PinGuard, crate::lease::Refusal> {
        self.deps.leases.keys().pin(key, view.session, view.generation, pool_off, len, write)
    }
}

/// Every export, by volume.
#[derive(Default)]
pub struct Registry {
    exports: Mutex<HashMap<ObjectKey, Arc<Export>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// A connection's place in an export; leaving the last one ends the export.
pub struct Attached {
    registry: Arc<Registry>,
    /// The export.
    pub export: Arc<Export>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut m = self.registry.lock();
        if self.export.conns.fetch_sub(1, Relaxed) == 1 {
            // The last client left: end the export (its task releases the lease).
            if m.get(&self.export.key).is_some_and(|e| Arc::ptr_eq(e, &self.export)) {
                m.remove(&self.export.key);
            }
            self.export.disconnect.cancel();
        }
    }
}

/// Why a client could not attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachError {
    /// The volume is exported read-only (its first client could only read) and this client
    /// wants to write.
    ReadOnlyExport,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Arc<Export>>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Join the export of `key`, making it (and starting its holder task) if there is none.
    pub fn attach(self: &Arc<Self>, deps: &Deps, key: &ObjectKey, writable: bool) -> Result<Attached, AttachError> {
        let mut m = self.lock();
        if let Some(e) = m.get(key) {
            if writable && !e.writable {
                return Err(AttachError::ReadOnlyExport);
            }
            e.conns.fetch_add(1, Relaxed);
            return Ok(Attached { registry: self.clone(), export: e.clone() });
        }
        let (tx, rx) = watch::channel(Held::Pending);
        let e = Arc::new(Export {
            key: key.clone(),
            writable,
            deps: deps.clone(),
            held: rx,
            held_tx: Arc::new(tx),
            conns: AtomicUsize::new(1),
            disconnect: CancellationToken::new(),
            fill_lock: tokio::sync::Mutex::new(()),
            flush_lock: tokio::sync::Mutex::new(()),
            dirty: Mutex::default(),
        });
        m.insert(key.clone(), e.clone());
        let span = info_span!("nbd_export", volume = %key);
        tokio::spawn(hold(e.clone()).instrument(span));
        Ok(Attached { registry: self.clone(), export: e })
    }

    /// NBD connections open to `key` now.
    pub fn clients(&self, key: &ObjectKey) -> usize {
        self.lock().get(key).map_or(0, |e| e.connections())
    }

    /// Disconnect every client of `key` (each finishes the request it is serving), and wait,
    /// at most `bound`, until the export has let go of its lease. Returns how many clients
    /// there were.
    pub async fn disconnect(&self, key: &ObjectKey, bound: Duration) -> usize {
        let Some(e) = self.lock().remove(key) else { return 0 };
        let n = e.connections();
        e.disconnect.cancel();
        let mut rx = e.held.clone();
        let _ = tokio::time::timeout(bound, rx.wait_for(|h| matches!(h, Held::Ended(_)))).await;
        n
    }
}

/// Backoff between attempts to re-acquire a lease that another holder has.
const RETRY: Duration = Duration::from_millis(200);

/// The holder task of an export: a session, a lease, renewals, recalls.
async fn hold(e: Arc<Export>) {
    let why = hold_inner(&e).await;
    info!(reason = %why, "NBD export ended");
    e.held_tx.send_replace(Held::Ended(why));
}

async fn hold_inner(e: &Arc<Export>) -> String {
    let d = &e.deps;
    let (tx, mut events) = mpsc::channel::<Result<pb::SessionEvent, tonic::Status>>(64);
    let owner = Owner { principal: PRINCIPAL.into(), credential: None };
    let stop = CancellationToken::new();
    let name = format!("nbd export {}", e.key);
    let session = match d.sessions.open(&owner, name, None, tx, stop.clone()) {
        Ok((id, _, _)) => id,
        Err(err) => return format!("could not open the export's session: {err}"),
    };
    let Some(session_ended) = d.sessions.ended_token(session) else { return "the session ended at once".into() };
    let why = lease_loop(e, session, &mut events, &session_ended).await;
    let _ = d.sessions.end(session, crate::session::EndReason::Closed);
    why
}

async fn lease_loop(
    e: &Arc<Export>,
    session: SessionId,
    events: &mut mpsc::Receiver<Result<pb::SessionEvent, tonic::Status>>,
    session_ended: &CancellationToken,
) -> String {
    let d = &e.deps;
    let mode = if e.writable { Mode::ReadWrite } else { Mode::Read };
    let mut warned = false;
    loop {
        let (k, pool) = (e.key.clone(), d.pool.clone());
        let size = match tokio::task::spawn_blocking(move || pool.stat(&k.namespace, &k.name)).await {
            Ok(Ok(st)) => st.size,
            Ok(Err(err)) => return format!("the volume is gone: {err}"),
            Err(_) => return "the daemon is shutting down".into(),
        };
        let req = GrantRequest {
            session,
            object: e.key.clone(),
            offset: 0,
            len: size,
            mode,
            exclusive: e.writable && d.exclusive,
            allocate: false,
            transport: d.transport.clone(),
        };
        let grant = tokio::select! {
            _ = e.disconnect.cancelled() => return "every client disconnected".into(),
            _ = session_ended.cancelled() => return "the export's session was ended".into(),
            g = d.leases.grant(req) => g,
        };
        let grant = match grant {
            Ok(h) => h.into_grant(),
            // Resized between our look at its size and the grant: look again.
            Err(LeaseError::Pool(crate::pool::ObjError::OutOfRange { .. })) => continue,
            Err(LeaseError::Exclusive(_) | LeaseError::Breaking { .. }) => {
                if !warned {
                    warn!(volume = %e.key, "the volume's lease is held elsewhere or being changed; NBD requests wait until it can be leased");
                    warned = true;
                }
                tokio::select! {
                    _ = e.disconnect.cancelled() => return "every client disconnected".into(),
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
            Err(err) => return format!("the volume cannot be leased: {err}"),
        };
        warned = false;
        let view = Arc::new(View {
            lease: grant.id,
            generation: grant.generation,
            session,
            size,
            writable: e.writable,
            segs: grant.segments.iter().map(|s| Seg { off: s.object_offset, len: s.len, target: s.target }).collect(),
        });
        e.held_tx.send_replace(Held::Ready(view));
        // Keep both the lease and the session alive: whichever TTL is shorter sets the pace
        // (read again each time round: a reload may change the session TTL).
        let renew_every = || (grant.ttl.min(d.sessions.ttl()) / 3).max(Duration::from_millis(30));
        let ended = loop {
            tokio::select! {
                _ = e.disconnect.cancelled() => break Some("every client disconnected"),
                _ = session_ended.cancelled() => break Some("the export's session was ended"),
                _ = tokio::time::sleep(renew_every()) => {
                    let _ = d.sessions.touch(session);
                    if d.leases.renew(session, grant.id).is_err() {
                        break None; // revoked meanwhile: lease again
                    }
                }
                ev = events.recv() => match ev.and_then(|r| r.ok()).and_then(|ev| ev.kind) {
                    Some(pb::session_event::Kind::LeaseRecall(r)) if r.lease_id == grant.id => {
                        info!(reason = %r.reason, "the volume's lease was recalled; returning it");
                        break None;
                    }
                    Some(pb::session_event::Kind::LeaseRevoked(r)) if r.lease_id == grant.id => break None,
                    Some(_) => {}
                    None => break Some("the export's session was ended"),
                },
            }
        };
        e.held_tx.send_replace(Held::Pending);
        // In-flight requests keep their pins; the drain waits for them.
        let _ = d.leases.release(session, grant.id);
        if let Some(why) = ended {
            return why.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseConfig, LeaseLimits};
    use crate::pool::layout::FormatOptions;
    use crate::pool::media::sim::SimMedia;

    struct Fx {
        media: Arc<SimMedia>,
        deps: Deps,
        registry: Arc<Registry>,
    }

    fn fixture() -> Fx {
        let media = Arc::new(SimMedia::new(32 << 20));
        let pool = Arc::new(Pool::format_media(media.clone(), true, FormatOptions::default(), None).unwrap());
        pool.create_volume("a", "v", 8 << 20).unwrap();
        let sessions = Arc::new(SessionManager::new(Duration::from_secs(3600), 16));
        let limits = LeaseLimits {
            per_session: 8,
            total: 64,
            segments: 4096,
            keys_per_session: 4096,
            per_principal: 64,
            alloc_per_request: 64 << 20,
        };
        let cfg = LeaseConfig {
            ttl: Duration::from_secs(30),
            break_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            limits,
        };
        let gate = Gate::default();
        let leases = LeaseManager::new(pool.clone(), sessions.clone(), cfg, gate.clone());
        let deps = Deps {
            leases,
            sessions,
            media: pool.media().clone(),
            pool,
            gate,
            transport: Arc::new(crate::dma::NoBind),
            exclusive: true,
        };
        Fx { media, deps, registry: Arc::new(Registry::default()) }
    }

    /// Write `data` at volume offset `off` as a WRITE does (fill, pin, copy, note dirty).
    async fn write(ex: &Export, off: u64, data: &[u8]) -> u64 {
        let mut view = ex.view(Duration::from_secs(5)).await.unwrap();
        let i = view.find(off);
        if view.segs[i].target.is_none() {
            view = ex.fill(&view, off).await.unwrap();
        }
        let s = &view.segs[view.find(off)];
        let (pool, key) = s.target.unwrap();
        let p = pool + (off - s.off);
        let _pin = ex.pin(&view, &key, p, data.len() as u64, true).unwrap();
        ex.media().write(p, data);
        ex.dirty(p, data.len() as u64);
        p
    }

    #[tokio::test]
    async fn flush_makes_every_connections_writes_durable_and_nothing_before_it_does() {
        let fx = fixture();
        let key = ObjectKey::new("a", "v").unwrap();
        // Two connections of one export.
        let c1 = fx.registry.attach(&fx.deps, &key, true).unwrap();
        let c2 = fx.registry.attach(&fx.deps, &key, true).unwrap();
        assert!(Arc::ptr_eq(&c1.export, &c2.export));
        let a = vec![0xa5u8; 64 << 10];
        let b = vec![0x5au8; 4096];
        let pa = write(&c1.export, 0, &a).await;
        let pb = write(&c2.export, 5 << 20, &b).await;
        let durable = |p: u64, len: usize| fx.media.durable_image()[p as usize..p as usize + len].to_vec();
        assert_ne!(durable(pa, a.len()), a, "written but not flushed: not durable yet");
        assert_ne!(durable(pb, b.len()), b);
        // A FLUSH on either connection covers both.
        c2.export.flush().await.unwrap();
        assert_eq!(durable(pa, a.len()), a, "FLUSH on one connection covers another's write");
        assert_eq!(durable(pb, b.len()), b);
        // The holes filled by the writes are keyed into the one lease; the rest stays a hole.
        let view = c1.export.view(Duration::from_secs(5)).await.unwrap();
        let holes: u64 = view.segs.iter().filter(|s| s.target.is_none()).map(|s| s.len).sum();
        assert_eq!(holes, (8 << 20) - 2 * FILL_MIN, "two 2 MiB pieces filled");
        // The last connection leaving ends the export and returns its lease.
        drop((c1, c2));
        let leases = fx.deps.leases.clone();
        tokio::time::timeout(Duration::from_secs(5), async {
            while leases.list(None).iter().any(|l| l.state == crate::lease::State::Active) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the export returned its lease");
    }
}
