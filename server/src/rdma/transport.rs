//! The rdma_cm listener, per-session connections, and the per-lease keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdax_proto::model::SessionId;
use rdax_verbs::{Access, EventChannel, Mr, Mw, Pd, event};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::peer::Peer;
use super::{RdmaError, RdmaStatus, RemoteKey};
use crate::config::{Config, RdmaKeys};
use crate::lease::keys::PinGuard;
use crate::lease::{Grant, LeaseManager, Mode, RemoteKeys};
use crate::pool::Pool;
use crate::pool::media::PoolMode;
use crate::session::SessionManager;

/// The keys of one segment.
struct SegKey {
    /// Declared first: the window is invalidated/deallocated before its region goes.
    mw: Option<Mw>,
    _mr: Mr,
}

/// The RDMA keys of one lease.
struct Binding {
    session: SessionId,
    peer: Arc<Peer>,
    /// (object offset, length, pool offset) of each keyed segment, for FLUSH.
    segments: Vec<(u64, u64, u64)>,
    keys: Vec<SegKey>,
    /// Keys made (false while the binder is still working).
    bound: bool,
    /// The lease ended.
    ended: bool,
    /// Keeps the lease from draining until the keys are gone.
    pin: Option<PinGuard>,
}

/// The serving transport.
pub(super) struct Transport {
    pool: Arc<Pool>,
    leases: Arc<LeaseManager>,
    sessions: Arc<SessionManager>,
    windows: bool,
    /// Register regions on demand (fs-DAX with an ODP device).
    on_demand: bool,
    endpoint: String,
    op_timeout: Duration,
    /// Authenticated connections by session.
    pub(super) by_session: Mutex<HashMap<SessionId, Arc<Peer>>>,
    /// Connections by rdma_cm id, for connection events.
    by_id: Mutex<HashMap<usize, Arc<Peer>>>,
    bindings: Mutex<HashMap<u64, Binding>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

fn fsdax_refusal(path: &str, device: &str) -> String {
    format!(
        "the pool {path} is on filesystem-DAX, and RDMA needs its pages registered with the NIC: the kernel \
         refuses long-term pins of fs-DAX pages (a file's blocks can move under truncate or reflink while a NIC \
         holds them), so an ordinary registration fails (EOPNOTSUPP), and device {device} has no on-demand paging \
         (ODP) to register without pinning. Put the pool on device-DAX (ndctl create-namespace -m devdax) to serve \
         it over RDMA"
    )
}

impl Transport {
    /// Listen on `addr` and check that the pool can be registered. `Err` is a sentence for
    /// the log and `Pool.Info`.
    pub(super) async fn start(
        cfg: &Config,
        addr: SocketAddr,
        pool: Arc<Pool>,
        leases: Arc<LeaseManager>,
        sessions: Arc<SessionManager>,
    ) -> Result<(Arc<Transport>, RdmaStatus), String> {
        let devices = rdax_verbs::devices().map_err(|e| e.0)?;
        let ch = EventChannel::new().map_err(|e| format!("rdma_cm: {e}"))?;
        let listener = ch.create_id().map_err(|e| format!("rdma_cm: {e}"))?;
        listener.bind(addr).map_err(|e| format!("rdma.listen {addr}: {e}"))?;
        let ctx = listener.context();
        if ctx.is_null() {
            let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
            return Err(format!(
                "rdma.listen {addr} is not an address of an RDMA netdev (devices here: {}); set rdma.listen to \
                 the address of the netdev an RDMA device is bound to",
                names.join(", ")
            ));
        }
        // SAFETY: rdma_cm keeps the device context open for the process lifetime.
        let caps = unsafe { rdax_verbs::query(ctx) };
        let media = pool.media().clone();
        let path = pool.info().path.map(|p| p.display().to_string()).unwrap_or_default();
        let on_demand = match media.mode() {
            PoolMode::FsDax if !caps.odp_rc => return Err(fsdax_refusal(&path, &caps.name)),
            PoolMode::FsDax => true,
            PoolMode::Simulated => return Err("the pool is simulated in memory (tests only)".into()),
            PoolMode::DeviceDax | PoolMode::File => false,
        };
        // Prove that the pool can be registered: one block, at once released.
        // SAFETY: as above.
        let pd = unsafe { Pd::alloc(ctx) }.map_err(|e| e.to_string())?;
        let probe = media.dma_addr(0, 4096).ok_or("the pool is not mapped memory")?;
        let mut access = Access::LOCAL_WRITE;
        if on_demand {
            access = access | Access::ON_DEMAND;
        }
        // SAFETY: the pool mapping outlives the region, dropped at once.
        match unsafe { pd.register(probe as *mut u8, 4096, access) } {
            Ok(mr) => drop(mr),
            Err(e) if media.mode() == PoolMode::FsDax => {
                return Err(format!("{} ({e})", fsdax_refusal(&path, &caps.name)));
            }
            Err(e) => return Err(format!("the pool {path} cannot be registered with {}: {e}", caps.name)),
        }
        drop(pd);
        let windows = match cfg.rdma_keys {
            RdmaKeys::Auto | RdmaKeys::Window if caps.mw_type2 && caps.max_mw > 0 => true,
            RdmaKeys::Window => {
                warn!(device = %caps.name, "rdma.keys = window, but the device has no type-2 memory windows: using a memory region per lease");
                false
            }
            _ => false,
        };
        listener.listen(128).map_err(|e| format!("rdma.listen {addr}: {e}"))?;
        let endpoint = SocketAddr::new(addr.ip(), listener.port()).to_string();
        let status = RdmaStatus {
            state: "serving",
            detail: String::new(),
            endpoint: endpoint.clone(),
            keys: if windows { "memory-window" } else { "memory-region" },
            device: caps.name.clone(),
        };
        let t = Arc::new(Transport {
            pool,
            leases: leases.clone(),
            sessions: sessions.clone(),
            windows,
            on_demand,
            endpoint,
            op_timeout: cfg.data_op_timeout,
            by_session: Mutex::new(HashMap::new()),
            by_id: Mutex::new(HashMap::new()),
            bindings: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        leases.set_remote(Arc::new(Hook(Arc::downgrade(&t))));
        let weak = Arc::downgrade(&t);
        sessions.on_close(Arc::new(move |sid, _| {
            if let Some(t) = weak.upgrade() {
                let peer = t.by_session.lock().expect("peers").remove(&sid);
                if let Some(p) = peer {
                    p.close("the session ended");
                }
            }
        }));
        tokio::spawn(t.clone().listen(ch, listener));
        Ok((t, status))
    }

    /// The pool (for FLUSH).
    pub(super) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Sessions (for HELLO).
    pub(super) fn sessions(&self) -> &Arc<SessionManager> {
        &self.sessions
    }

    async fn listen(self: Arc<Self>, ch: Arc<EventChannel>, listener: rdax_verbs::CmId) {
        loop {
            let ev = tokio::select! {
                _ = self.stop.cancelled() => break,
                ev = ch.next() => ev,
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    warn!(error = %e, "rdma_cm event channel failed; RDMA stops");
                    break;
                }
            };
            let (kind, id) = (ev.kind(), ev.id_ptr() as usize);
            if kind == event::CONNECT_REQUEST {
                let cm = ev.take_request(&ch);
                drop(ev);
                self.clone().accept(cm);
                continue;
            }
            // Acknowledge before acting: destroying an id waits for its events' acks.
            drop(ev);
            match kind {
                event::ESTABLISHED => {
                    if let Some(p) = self.by_id.lock().expect("peers").get(&id) {
                        debug!(qp = p.conn.qp_num(), "RDMA connection established");
                    }
                }
                event::DEVICE_REMOVAL => {
                    warn!("the RDMA device was removed; closing every RDMA connection");
                    self.shutdown();
                }
                _ => {
                    let peer = self.by_id.lock().expect("peers").remove(&id);
                    if let Some(p) = peer {
                        p.close(&format!("rdma_cm: {}", rdax_verbs::event_str(kind)));
                    }
                }
            }
        }
        drop(listener);
    }

    fn accept(self: Arc<Self>, cm: rdax_verbs::CmId) {
        // One protection domain per client connection: its regions and windows are usable
        // from its queue pair only.
        // SAFETY: the request id's context is the listener's device, open for the process.
        let pd = match unsafe { Pd::alloc(cm.context()) } {
            Ok(pd) => pd,
            Err(e) => {
                warn!(error = %e, "RDMA connection refused");
                return;
            }
        };
        let key = cm.raw_addr();
        let (conn, inbox) = match rdax_verbs::Conn::create(cm, pd) {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "RDMA connection refused");
                return;
            }
        };
        tokio::spawn(conn.clone().drive());
        if let Err(e) = conn.accept() {
            warn!(error = %e, "rdma_accept failed");
            conn.close("rdma_accept failed");
            return;
        }
        crate::metrics::METRICS.rdma_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let peer = Arc::new(Peer::new(conn, key));
        self.by_id.lock().expect("peers").insert(key, peer.clone());
        tokio::spawn(peer.serve(self.clone(), inbox));
    }

    /// Called by a peer once HELLO named a live session. The newest connection of a session
    /// wins (the session id is its credential): an older one — a client that restarted, or
    /// whose queue pair broke — is closed, and its keys end.
    pub(super) fn register(self: &Arc<Self>, session: SessionId, peer: &Arc<Peer>) {
        let old = self.by_session.lock().expect("peers").insert(session, peer.clone());
        if let Some(old) = old.filter(|o| !Arc::ptr_eq(o, peer)) {
            old.close("replaced by a newer RDMA connection of the same session");
            self.forget(&old);
        }
    }

    /// A peer went away: forget it and end its keys.
    pub(super) fn forget(self: &Arc<Self>, peer: &Arc<Peer>) {
        self.by_id.lock().expect("peers").remove(&peer.key);
        if let Some(s) = peer.session() {
            let mut m = self.by_session.lock().expect("peers");
            if m.get(&s).is_some_and(|p| Arc::ptr_eq(p, peer)) {
                m.remove(&s);
            }
        }
        // Keys bound on a dead queue pair are dead; release them (the lease stays, for TCP).
        let dead: Vec<u64> = self
            .bindings
            .lock()
            .expect("bindings")
            .iter()
            .filter(|(_, b)| Arc::ptr_eq(&b.peer, peer))
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.end(id, "the RDMA connection closed");
        }
    }

    /// FLUSH: the pool ranges of `[offset, offset+len)` of a lease held by `session`.
    pub(super) fn flush_ranges(
        &self,
        session: SessionId,
        lease: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, rdax_proto::dataplane::Status> {
        use rdax_proto::dataplane::Status;
        let m = self.bindings.lock().expect("bindings");
        let b = m.get(&lease).ok_or(Status::UnknownKey)?;
        if b.session != session {
            return Err(Status::WrongSession);
        }
        if b.ended {
            return Err(Status::Revoked);
        }
        let end = offset.checked_add(len).ok_or(Status::OutOfRange)?;
        let mut out = Vec::new();
        let mut covered = 0;
        for &(o, l, p) in &b.segments {
            let (lo, hi) = (offset.max(o), end.min(o + l));
            if lo < hi {
                out.push((p + (lo - o), hi - lo));
                covered += hi - lo;
            }
        }
        // Holes of a read lease have no keys; a flush must lie inside written segments.
        if covered != len {
            return Err(Status::OutOfRange);
        }
        Ok(out)
    }

    pub(super) async fn bind(
        self: &Arc<Self>,
        session: SessionId,
        grant: &Grant,
    ) -> Result<Vec<Option<RemoteKey>>, RdmaError> {
        let peer = self.by_session.lock().expect("peers").get(&session).cloned();
        let Some(peer) = peer.filter(|p| !p.conn.is_closed()) else {
            return Err(RdmaError::NotConnected(session, self.endpoint.clone()));
        };
        let keyed: Vec<_> =
            grant.segments.iter().filter_map(|s| s.target.map(|(p, k)| (s.object_offset, s.len, p, k))).collect();
        if keyed.is_empty() {
            return Ok(vec![None; grant.segments.len()]);
        }
        let (_, _, p0, k0) = keyed[0];
        let pin = self.leases.keys().pin(&k0, session, grant.generation, p0, 1, false).map_err(|_| RdmaError::Ended)?;
        self.bindings.lock().expect("bindings").insert(
            grant.id,
            Binding {
                session,
                peer: peer.clone(),
                segments: keyed.iter().map(|&(o, l, p, _)| (o, l, p)).collect(),
                keys: Vec::new(),
                bound: false,
                ended: false,
                pin: Some(pin),
            },
        );
        let t0 = Instant::now();
        let made = self.make_keys(&peer, grant.mode, &keyed).await;
        let (keys, remote) = match made {
            Ok(x) => x,
            Err(e) => {
                if let Some(b) = self.bindings.lock().expect("bindings").get_mut(&grant.id) {
                    b.bound = true;
                }
                self.end(grant.id, "binding failed");
                return Err(RdmaError::Bind(e.to_string()));
            }
        };
        let still_live = self.leases.keys().pin(&k0, session, grant.generation, p0, 1, false).is_ok();
        {
            let mut m = self.bindings.lock().expect("bindings");
            let b = m.get_mut(&grant.id).expect("inserted above; only `end` removes, after `bound`");
            b.keys = keys;
            b.bound = true;
            if !b.ended && still_live {
                crate::metrics::METRICS.rdma_keys.fetch_add(remote.len() as u64, std::sync::atomic::Ordering::Relaxed);
                debug!(
                    lease = grant.id,
                    segments = remote.len(),
                    us = t0.elapsed().as_micros() as u64,
                    "RDMA keys bound"
                );
                let mut it = remote.into_iter();
                return Ok(grant.segments.iter().map(|s| s.target.and_then(|_| it.next())).collect());
            }
        }
        self.end(grant.id, "the lease ended while binding");
        Err(RdmaError::Ended)
    }

    async fn make_keys(
        &self,
        peer: &Arc<Peer>,
        mode: Mode,
        keyed: &[(u64, u64, u64, crate::lease::keys::Key)],
    ) -> Result<(Vec<SegKey>, Vec<RemoteKey>), rdax_verbs::Error> {
        let remote_rights =
            if mode == Mode::ReadWrite { Access::REMOTE_READ | Access::REMOTE_WRITE } else { Access::REMOTE_READ };
        let mut mr_access = Access::LOCAL_WRITE;
        if self.windows {
            mr_access = mr_access | Access::MW_BIND;
        } else {
            mr_access = mr_access | remote_rights;
        }
        if self.on_demand {
            mr_access = mr_access | Access::ON_DEMAND;
        }
        let media = self.pool.media();
        let (mut keys, mut remote) = (Vec::new(), Vec::new());
        for &(_, len, pool_off, _) in keyed {
            let addr = media.dma_addr(pool_off, len).expect("checked at start: the pool is mapped");
            // SAFETY: the range is inside the pool mapping, which outlives every connection;
            // the lease's pin keeps its blocks from reuse until this region is gone.
            let mr = unsafe { peer.conn.pd().register(addr as *mut u8, len as usize, mr_access) }?;
            if self.windows {
                let mut mw = peer.conn.pd().alloc_mw()?;
                let bind = peer.conn.bind_mw(&mut mw, &mr, addr as u64, len, remote_rights);
                let rkey = tokio::time::timeout(self.op_timeout, bind)
                    .await
                    .map_err(|_| rdax_verbs::Error::Timeout("a memory-window bind"))??;
                remote.push(RemoteKey { addr: addr as u64, rkey });
                keys.push(SegKey { mw: Some(mw), _mr: mr });
            } else {
                remote.push(RemoteKey { addr: addr as u64, rkey: mr.rkey() });
                keys.push(SegKey { mw: None, _mr: mr });
            }
        }
        Ok((keys, remote))
    }

    /// The lease ended: invalidate its keys (unless its binder is still at work, which then
    /// does it), then let it drain.
    fn end(self: &Arc<Self>, lease: u64, why: &'static str) {
        let b = {
            let mut m = self.bindings.lock().expect("bindings");
            let Some(b) = m.get_mut(&lease) else { return };
            b.ended = true;
            if !b.bound {
                return;
            }
            m.remove(&lease).expect("present")
        };
        let t = self.clone();
        tokio::spawn(async move { t.invalidate(lease, b, why).await });
    }

    async fn invalidate(&self, lease: u64, mut b: Binding, why: &'static str) {
        let t0 = Instant::now();
        let bound = (self.op_timeout / 2).max(Duration::from_millis(100));
        // `fenced`: this invalidation had to fence; `closed`: the queue pair was already
        // closed, errored or fenced, and serves no remote access any more.
        let (mut fenced, mut closed) = (false, false);
        for k in &b.keys {
            let Some(mw) = &k.mw else { continue };
            if b.peer.conn.is_closed() {
                closed = true;
                break;
            }
            match tokio::time::timeout(bound, b.peer.conn.local_inv(mw.rkey())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(lease, error = %e, "invalidation of an RDMA key failed: fencing the client's queue pair");
                    b.peer.fence("invalidation failed");
                    fenced = true;
                    break;
                }
                Err(_) => {
                    warn!(
                        lease,
                        "invalidation of an RDMA key was not confirmed in time: fencing the client's queue pair"
                    );
                    b.peer.fence("invalidation timed out");
                    fenced = true;
                    break;
                }
            }
        }
        // Deallocate windows, then deregister regions (rxe waits for responder copies that
        // still hold the region), and only then let the lease drain.
        drop(std::mem::take(&mut b.keys));
        drop(b.pin.take());
        let m = &crate::metrics::METRICS;
        m.rdma_invalidations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if fenced {
            m.rdma_fences.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        info!(lease, why, fenced, qp_closed = closed, us = t0.elapsed().as_micros() as u64, "RDMA keys invalidated");
    }

    pub(super) fn shutdown(&self) {
        self.stop.cancel();
        let peers: Vec<_> = self.by_id.lock().expect("peers").values().cloned().collect();
        for p in peers {
            p.close("the daemon is shutting down");
        }
    }
}

/// The lease manager's view of the transport.
struct Hook(std::sync::Weak<Transport>);

impl RemoteKeys for Hook {
    fn lease_ended(&self, lease: u64) {
        if let Some(t) = self.0.upgrade() {
            t.end(lease, "the lease ended");
        }
    }
}
