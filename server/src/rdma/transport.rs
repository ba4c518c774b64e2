//! The rdma_cm listener, per-session connections, and the per-lease keys.
//!
//! Teardown is checked at every step. A lease's keys die in this order: LOCAL_INV of each
//! window (bounded; on failure or timeout the client's queue pair is fenced), deallocation of
//! the windows, deregistration of the regions; only then is the binding's pin on the lease
//! dropped, so the lease drains (and its blocks change hands) after the NIC can no longer
//! reach them. If a step fails — a fence, a deallocation, a deregistration — the daemon
//! cannot prove the keys dead: it keeps the pin for good, quarantines the lease (the blocks it
//! covered are never reused until restart), logs at ERROR and closes the client's connection
//! so that its queue pair is destroyed. A window bind that times out keeps its window and
//! region alive until the work request completes or is flushed (the queue pair is fenced to
//! force that); if even that does not come, they are leaked on purpose and the lease is
//! quarantined.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdax_proto::model::SessionId;
use rdax_verbs::{Access, EventChannel, Mr, Mw, Pd, event};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::RdmaStatus;
use super::peer::Peer;
use crate::config::{Config, RdmaKeys};
use crate::dma::{BindRequest, DmaError, RemoteKey};
use crate::gate::Gate;
use crate::lease::keys::PinGuard;
use crate::lease::{LeaseManager, Mode};
use crate::pool::Pool;
use crate::pool::media::PoolMode;
use crate::session::SessionManager;

/// The keys of one segment.
struct SegKey {
    mw: Option<Mw>,
    mr: Mr,
}

/// The RDMA keys of one lease.
struct Binding {
    peer: Arc<Peer>,
    session: SessionId,
    /// Bytes its keys register.
    bytes: u64,
    keys: Vec<SegKey>,
    /// Keys made (false while the binder is still working).
    bound: bool,
    /// The lease ended.
    ended: bool,
    /// Keeps the lease from draining until the keys are gone.
    pin: Option<PinGuard>,
}

/// Why RDMA cannot be served (a sentence for the log and `Pool.Info`).
#[derive(Debug, thiserror::Error)]
pub(super) enum StartError {
    /// No device, or no rdma-core.
    #[error("{0}")]
    NoDevice(String),
    /// rdma_cm failed.
    #[error("rdma_cm: {0}")]
    Cm(rdax_verbs::Error),
    /// Binding or listening failed.
    #[error("rdma.listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: rdax_verbs::Error,
    },
    /// The address belongs to no RDMA device.
    #[error(
        "rdma.listen {addr} is not an address of an RDMA netdev (devices here: {devices}); set rdma.listen to \
         the address of the netdev an RDMA device is bound to"
    )]
    NotRdmaNetdev {
        /// The address.
        addr: SocketAddr,
        /// Devices seen.
        devices: String,
    },
    /// An fs-DAX pool without ODP.
    #[error("{0}")]
    FsDax(String),
    /// The simulated test medium.
    #[error("the pool is simulated in memory (tests only)")]
    Simulated,
    /// Not mapped memory.
    #[error("the pool is not mapped memory")]
    NotMapped,
    /// A verb failed while probing.
    #[error("{0}")]
    Verbs(rdax_verbs::Error),
    /// The pool cannot be registered.
    #[error("the pool {path} cannot be registered with {device}: {source}")]
    Register {
        /// Pool path.
        path: String,
        /// Device.
        device: String,
        /// Why.
        source: rdax_verbs::Error,
    },
}

/// A binder's failure.
enum MakeError {
    /// Nothing the device may still use is left over: end the binding normally (the keys
    /// made so far are invalidated like any others).
    Failed(Vec<SegKey>, rdax_verbs::Error),
    /// A work request may still use a window or region that had to be leaked: quarantine.
    Stuck(Vec<SegKey>, rdax_verbs::Error),
}

/// The serving transport.
pub(super) struct RdmaTransport {
    pool: Arc<Pool>,
    leases: Arc<LeaseManager>,
    sessions: Arc<SessionManager>,
    gate: Gate,
    windows: bool,
    /// Register regions on demand (fs-DAX with an ODP device).
    on_demand: bool,
    endpoint: String,
    op_timeout: Duration,
    /// Connections from one source address (`limits.max_connections_per_source`).
    per_source: usize,
    /// Bytes one session may have registered (`limits.max_rdma_bytes_per_session`).
    max_bytes: u64,
    /// Authenticated connections by session.
    pub(super) by_session: Mutex<HashMap<SessionId, Arc<Peer>>>,
    /// Connections by rdma_cm id, for connection events.
    by_id: Mutex<HashMap<usize, Arc<Peer>>>,
    bindings: Mutex<HashMap<u64, Binding>>,
    /// Bytes registered per session over its bindings (for `limits.max_rdma_bytes_per_session`;
    /// lock order: `bindings` first).
    registered: Mutex<HashMap<SessionId, u64>>,
    stop: CancellationToken,
    /// The connection cap was hit (logged once per episode).
    at_cap: std::sync::atomic::AtomicBool,
    /// Connect proofs seen within their time window (each is accepted once).
    proofs: Mutex<HashMap<[u8; 16], Instant>>,
}

/// How far a connect proof's clock may be from ours.
const PROOF_WINDOW_MS: u64 = 60_000;
/// Most proofs remembered at once; past it, connects are refused until old ones age out.
const MAX_PROOFS: usize = 65_536;

/// RDMA connections (queue pairs) at once; connect requests beyond it are rejected.
pub(super) const MAX_CONNECTIONS: usize = 1024;

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport").field("endpoint", &self.endpoint).finish_non_exhaustive()
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

impl RdmaTransport {
    /// Listen on `addr` and check that the pool can be registered.
    pub(super) async fn start(
        cfg: &Config,
        addr: SocketAddr,
        pool: Arc<Pool>,
        leases: Arc<LeaseManager>,
        sessions: Arc<SessionManager>,
        gate: Gate,
    ) -> Result<(Arc<RdmaTransport>, RdmaStatus), StartError> {
        let devices = rdax_verbs::devices().map_err(|e| StartError::NoDevice(e.0))?;
        let ch = EventChannel::new().map_err(StartError::Cm)?;
        let listener = ch.create_id().map_err(StartError::Cm)?;
        listener.bind(addr).map_err(|source| StartError::Listen { addr, source })?;
        let ctx = listener.context();
        if ctx.is_null() {
            let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
            return Err(StartError::NotRdmaNetdev { addr, devices: names.join(", ") });
        }
        // SAFETY: rdma_cm keeps the device context open for the process lifetime.
        let caps = unsafe { rdax_verbs::query(ctx) };
        let media = pool.media().clone();
        let path = pool.info().path.map(|p| p.display().to_string()).unwrap_or_default();
        let on_demand = match media.mode() {
            PoolMode::FsDax if !caps.odp_rc => return Err(StartError::FsDax(fsdax_refusal(&path, &caps.name))),
            PoolMode::FsDax => true,
            PoolMode::Simulated => return Err(StartError::Simulated),
            PoolMode::DeviceDax | PoolMode::File => false,
        };
        // Prove that the pool can be registered: one block, at once released.
        // SAFETY: as above.
        let pd = unsafe { Pd::alloc(ctx) }.map_err(StartError::Verbs)?;
        let probe = media.dma_addr(0, 4096).ok_or(StartError::NotMapped)?;
        let mut access = Access::LOCAL_WRITE;
        if on_demand {
            access = access | Access::ON_DEMAND;
        }
        // SAFETY: the pool mapping outlives the region, dropped at once.
        match unsafe { pd.register(probe as *mut u8, 4096, access) } {
            Ok(mr) => mr.deregister().map_err(StartError::Verbs)?,
            Err(e) if media.mode() == PoolMode::FsDax => {
                return Err(StartError::FsDax(format!("{} ({e})", fsdax_refusal(&path, &caps.name))));
            }
            Err(source) => return Err(StartError::Register { path, device: caps.name.clone(), source }),
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
        listener.listen(128).map_err(|source| StartError::Listen { addr, source })?;
        let endpoint = SocketAddr::new(addr.ip(), listener.port()).to_string();
        let status = RdmaStatus {
            state: "serving",
            detail: String::new(),
            endpoint: endpoint.clone(),
            keys: if windows { "memory-window" } else { "memory-region" },
            device: caps.name.clone(),
        };
        let t = Arc::new(RdmaTransport {
            pool,
            leases: leases.clone(),
            sessions: sessions.clone(),
            gate,
            windows,
            on_demand,
            endpoint,
            op_timeout: cfg.data_op_timeout,
            per_source: cfg.limits.max_connections_per_source,
            max_bytes: cfg.limits.max_rdma_bytes_per_session,
            by_session: Mutex::new(HashMap::new()),
            by_id: Mutex::new(HashMap::new()),
            bindings: Mutex::new(HashMap::new()),
            registered: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            at_cap: false.into(),
            proofs: Mutex::new(HashMap::new()),
        });
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

    /// Leases (for FLUSH, which names a lease and an object range).
    pub(super) fn leases(&self) -> &Arc<LeaseManager> {
        &self.leases
    }

    /// The shutdown gate (HELLO and FLUSH).
    pub(super) fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The pool (for FLUSH).
    pub(super) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Sessions (for HELLO).
    pub(super) fn sessions(&self) -> &Arc<SessionManager> {
        &self.sessions
    }

    /// The bound on a peer's HELLO and on every reply.
    pub(super) fn op_timeout(&self) -> Duration {
        self.op_timeout
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
                let private = ev.private_data();
                drop(ev);
                self.clone().accept(cm, &private);
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

    /// Check a connect request's proof of a session secret (see
    /// [`rdax_proto::rdma::ConnectProof`]).
    fn check_proof(&self, private: &[u8]) -> Result<SessionId, &'static str> {
        let p = rdax_proto::rdma::ConnectProof::decode(private)
            .ok_or("no connect proof in the private data (clients of data-plane protocol 2 send one)")?;
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        if now.abs_diff(p.unix_ms) > PROOF_WINDOW_MS {
            return Err("the connect proof's time is more than 60 s from the daemon's clock");
        }
        let sid = SessionId(p.session);
        let secret = self.sessions.secret_of(sid).ok_or("the connect proof names no live session")?;
        if !p.verify(&secret.0) {
            return Err("the connect proof was not made with the session's secret");
        }
        let mut seen = self.proofs.lock().expect("proofs");
        let window = Duration::from_millis(2 * PROOF_WINDOW_MS);
        if seen.len() >= MAX_PROOFS / 2 {
            seen.retain(|_, t| t.elapsed() < window);
        }
        if seen.len() >= MAX_PROOFS {
            return Err("too many connect requests within the proof window");
        }
        if seen.insert(p.mac, Instant::now()).is_some() {
            return Err("the connect proof was used before (a replay)");
        }
        Ok(sid)
    }

    fn accept(self: Arc<Self>, cm: rdax_verbs::CmId, private: &[u8]) {
        // Checks before anything is allocated for the request: a proof of a session secret,
        // a cap per source and in all. A connect flood costs no QP, CQ or PD (and a proven
        // peer that never says HELLO is reaped, see `Peer`).
        let source = cm.peer_ip();
        let proven = match self.check_proof(private) {
            Ok(sid) => sid,
            Err(why) => {
                cm.reject();
                crate::metrics::METRICS.rdma_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                debug!(source = ?source, why, "RDMA connect request rejected");
                return;
            }
        };
        let (open, from_source) = {
            let m = self.by_id.lock().expect("peers");
            (m.len(), source.map_or(0, |ip| m.values().filter(|p| p.source == Some(ip)).count()))
        };
        if from_source >= self.per_source {
            cm.reject();
            crate::metrics::METRICS.rdma_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            debug!(source = ?source, cap = self.per_source, "RDMA connect request rejected: its source is at limits.max_connections_per_source");
            return;
        }
        if open >= MAX_CONNECTIONS {
            cm.reject();
            crate::metrics::METRICS.rdma_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !self.at_cap.swap(true, std::sync::atomic::Ordering::Relaxed) {
                info!(
                    cap = MAX_CONNECTIONS,
                    "RDMA connection cap reached: rejecting connect requests until one closes"
                );
            }
            return;
        }
        self.at_cap.store(false, std::sync::atomic::Ordering::Relaxed);
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
        // The daemon is the requester for its own messages (replies, recall notices). A kernel
        // without the option keeps rdma_cm's timeout: slower recovery from loss, same results.
        if let Err(e) = cm.set_ack_timeout(rdax_verbs::ACK_TIMEOUT) {
            debug!(error = %e, "RDMA: keeping rdma_cm's ACK timeout");
        }
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
        let peer = Arc::new(Peer::new(conn, key, source, proven));
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

    /// Whether `session` has an RDMA connection to bind keys on.
    pub(super) fn check(&self, session: SessionId) -> Result<Arc<Peer>, DmaError> {
        let peer = self.by_session.lock().expect("peers").get(&session).cloned();
        peer.filter(|p| !p.conn.is_closed())
            .ok_or_else(|| DmaError::NotConnected { session, endpoint: self.endpoint.clone() })
    }

    /// Make the keys of a fresh grant (called from the grant's owned task).
    pub(super) async fn bind(self: &Arc<Self>, req: BindRequest) -> Result<Vec<Option<RemoteKey>>, DmaError> {
        let peer = self.check(req.session)?;
        let keyed: Vec<(u64, u64)> = req.segments.iter().filter_map(|s| s.2.map(|p| (p, s.1))).collect();
        if keyed.is_empty() {
            return Ok(vec![None; req.segments.len()]);
        }
        let lease = req.lease;
        let pin = self.leases.pin_lease(req.session, lease).map_err(|_| DmaError::Ended)?;
        let bytes: u64 = keyed.iter().map(|k| k.1).sum();
        {
            let mut m = self.bindings.lock().expect("bindings");
            let mut reg = self.registered.lock().expect("registered");
            let held = reg.entry(req.session).or_default();
            if held.saturating_add(bytes) > self.max_bytes {
                return Err(DmaError::Limit {
                    what: "the session has as many bytes registered for RDMA as it may; release some leases",
                    cap: self.max_bytes,
                    key: "limits.max_rdma_bytes_per_session",
                });
            }
            *held += bytes;
            drop(reg);
            m.insert(
                lease,
                Binding {
                    peer: peer.clone(),
                    session: req.session,
                    bytes,
                    keys: Vec::new(),
                    bound: false,
                    ended: false,
                    pin: Some(pin),
                },
            );
        }
        let t0 = Instant::now();
        let (keys, remote) = match self.make_keys(&peer, req.mode, &keyed).await {
            Ok(x) => x,
            Err(MakeError::Failed(keys, e)) => {
                self.finish_binding(lease, keys);
                self.end(lease, "binding failed");
                return Err(DmaError::Bind(e.to_string()));
            }
            Err(MakeError::Stuck(keys, e)) => {
                self.finish_binding(lease, keys);
                self.stuck(lease, &format!("a memory-window bind neither completed nor flushed: {e}"));
                return Err(DmaError::Bind(e.to_string()));
            }
        };
        // The lease may have ended while the keys were made: then they die at once.
        let still_live = self.leases.pin_lease(req.session, lease).is_ok();
        let ended = self.finish_binding(lease, keys);
        if ended || !still_live {
            self.end(lease, "the lease ended while binding");
            return Err(DmaError::Ended);
        }
        crate::metrics::METRICS.rdma_keys.fetch_add(remote.len() as u64, std::sync::atomic::Ordering::Relaxed);
        debug!(lease, segments = remote.len(), us = t0.elapsed().as_micros() as u64, "RDMA keys bound");
        let mut it = remote.into_iter();
        Ok(req.segments.iter().map(|s| s.2.and_then(|_| it.next())).collect())
    }

    /// The binder is done: store its keys. Returns whether the lease ended meanwhile.
    fn finish_binding(&self, lease: u64, keys: Vec<SegKey>) -> bool {
        let mut m = self.bindings.lock().expect("bindings");
        let b = m.get_mut(&lease).expect("inserted by the binder; only `end` removes, after `bound`");
        b.keys = keys;
        b.bound = true;
        b.ended
    }

    async fn make_keys(
        &self,
        peer: &Arc<Peer>,
        mode: Mode,
        keyed: &[(u64, u64)],
    ) -> Result<(Vec<SegKey>, Vec<RemoteKey>), MakeError> {
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
        for &(pool_off, len) in keyed {
            let addr = media.dma_addr(pool_off, len).expect("checked at start: the pool is mapped");
            if crate::failpoint!("rdma.bind") {
                return Err(MakeError::Failed(keys, rdax_verbs::Error::Cm("injected bind failure".into())));
            }
            // SAFETY: the range is inside the pool mapping, which outlives every connection;
            // the lease's pin keeps its blocks from reuse until this region is gone.
            let mr = match unsafe { peer.conn.pd().register(addr as *mut u8, len as usize, mr_access) } {
                Ok(mr) => mr,
                Err(e) => return Err(MakeError::Failed(keys, e)),
            };
            if !self.windows {
                remote.push(RemoteKey { addr: addr as u64, rkey: mr.rkey() });
                keys.push(SegKey { mw: None, mr });
                continue;
            }
            let mut mw = match peer.conn.pd().alloc_mw() {
                Ok(mw) => mw,
                Err(e) => {
                    keys.push(SegKey { mw: None, mr });
                    return Err(MakeError::Failed(keys, e));
                }
            };
            // `None`: the bind neither completed nor was flushed.
            let r = {
                let bind = peer.conn.bind_mw(&mut mw, &mr, addr as u64, len, remote_rights);
                tokio::pin!(bind);
                match tokio::time::timeout(self.op_timeout, &mut bind).await {
                    Ok(r) => Some(r),
                    Err(_) => {
                        // The work request still names the window and the region: they must
                        // outlive it. Fence the queue pair so that it is flushed, and wait.
                        warn!(
                            qp = peer.conn.qp_num(),
                            "a memory-window bind timed out: fencing the client's queue pair"
                        );
                        self.fence(peer, "a memory-window bind timed out");
                        match tokio::time::timeout(self.op_timeout, &mut bind).await {
                            Ok(_) => Some(Err(rdax_verbs::Error::Timeout("a memory-window bind"))),
                            Err(_) => None,
                        }
                    }
                }
            };
            let Some(r) = r else {
                // The device may still use them: leak them on purpose.
                std::mem::forget(mw);
                std::mem::forget(mr);
                return Err(MakeError::Stuck(keys, rdax_verbs::Error::Timeout("a memory-window bind")));
            };
            match r {
                Ok(rkey) => {
                    remote.push(RemoteKey { addr: addr as u64, rkey });
                    keys.push(SegKey { mw: Some(mw), mr });
                }
                Err(e) => {
                    keys.push(SegKey { mw: Some(mw), mr });
                    return Err(MakeError::Failed(keys, e));
                }
            }
        }
        Ok((keys, remote))
    }

    /// A binding left the table: its bytes no longer count against its session.
    fn unregister(&self, b: &Binding) {
        let mut reg = self.registered.lock().expect("registered");
        if let Some(n) = reg.get_mut(&b.session) {
            *n = n.saturating_sub(b.bytes);
            if *n == 0 {
                reg.remove(&b.session);
            }
        }
    }

    /// The lease ended: invalidate its keys (unless its binder is still at work, which then
    /// does it), then let it drain.
    pub(super) fn end(self: &Arc<Self>, lease: u64, why: &'static str) {
        let b = {
            let mut m = self.bindings.lock().expect("bindings");
            let Some(b) = m.get_mut(&lease) else { return };
            b.ended = true;
            if !b.bound {
                return;
            }
            m.remove(&lease).expect("present")
        };
        self.unregister(&b);
        let t = self.clone();
        tokio::spawn(async move { t.invalidate(lease, b, why).await });
    }

    /// Move the client's queue pair to the error state. `false` if that failed (the caller
    /// then cannot prove the keys dead).
    fn fence(&self, peer: &Peer, why: &str) -> bool {
        crate::metrics::METRICS.rdma_fences.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if crate::failpoint_blocking!("rdma.fence") {
            error!(qp = peer.conn.qp_num(), why, "fencing the client's queue pair failed (injected)");
            return false;
        }
        match peer.fence(why) {
            Ok(()) => true,
            Err(e) => {
                error!(qp = peer.conn.qp_num(), why, error = %e, "fencing the client's queue pair failed");
                false
            }
        }
    }

    async fn invalidate(self: Arc<Self>, lease: u64, mut b: Binding, why: &'static str) {
        let t0 = Instant::now();
        let bound = (self.op_timeout / 2).max(Duration::from_millis(100));
        // `fenced`: this invalidation had to fence; `closed`: the queue pair was already
        // closed, errored or fenced, and serves no remote access any more (a type-2 window is
        // usable from its own queue pair only).
        let (mut fenced, mut closed) = (false, false);
        let mut failure: Option<String> = None;
        for k in &b.keys {
            let Some(mw) = &k.mw else { continue };
            if b.peer.conn.is_closed() {
                closed = true;
                break;
            }
            let r = if crate::failpoint!("rdma.invalidate") {
                Ok(Err(rdax_verbs::Error::Cm("injected invalidation failure".into())))
            } else {
                tokio::time::timeout(bound, b.peer.conn.local_inv(mw.rkey())).await
            };
            let why_fence = match r {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("invalidation failed: {e}"),
                Err(_) => "invalidation was not confirmed in time".to_string(),
            };
            warn!(lease, why = %why_fence, "fencing the client's queue pair");
            fenced = true;
            if !self.fence(&b.peer, &why_fence) {
                failure = Some(format!("{why_fence}, and the fence failed"));
            }
            break;
        }
        // Deallocate the windows, then deregister the regions (rxe waits for responder copies
        // that still hold a region), each step checked.
        for k in std::mem::take(&mut b.keys) {
            let SegKey { mw, mr } = k;
            if let Some(mw) = mw {
                let r = if crate::failpoint_blocking!("rdma.dealloc") {
                    std::mem::forget(mw);
                    Err("injected".to_string())
                } else {
                    mw.dealloc().map_err(|e| e.to_string())
                };
                if let Err(e) = r {
                    // A window still allocated keeps its region busy: leave the region too.
                    std::mem::forget(mr);
                    failure.get_or_insert(format!("deallocating a memory window failed: {e}"));
                    continue;
                }
            }
            let r = if crate::failpoint_blocking!("rdma.dereg") {
                std::mem::forget(mr);
                Err("injected".to_string())
            } else {
                mr.deregister().map_err(|e| e.to_string())
            };
            if let Err(e) = r {
                failure.get_or_insert(format!("deregistering a memory region failed: {e}"));
            }
        }
        let m = &crate::metrics::METRICS;
        m.rdma_invalidations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = failure {
            std::mem::forget(b.pin.take());
            self.stuck_peer(lease, &b.peer, &f);
            return;
        }
        drop(b.pin.take());
        info!(lease, why, fenced, qp_closed = closed, us = t0.elapsed().as_micros() as u64, "RDMA keys invalidated");
    }

    /// A binder could not tear down: quarantine the lease (its pin is never dropped).
    fn stuck(self: &Arc<Self>, lease: u64, why: &str) {
        let b = self.bindings.lock().expect("bindings").remove(&lease);
        if let Some(b) = &b {
            self.unregister(b);
        }
        if let Some(mut b) = b {
            std::mem::forget(b.pin.take());
            // Keys made before the stuck one are still bound: leave them allocated as well.
            std::mem::forget(std::mem::take(&mut b.keys));
            self.stuck_peer(lease, &b.peer, why);
        }
    }

    /// Quarantine `lease` and close the client's connection, so that its queue pair is
    /// destroyed once the last reference goes; the protection domain and whatever could not
    /// be released stay allocated until the process exits.
    fn stuck_peer(self: &Arc<Self>, lease: u64, peer: &Arc<Peer>, why: &str) {
        self.leases.quarantine(lease, why);
        peer.close("its RDMA keys could not be proven dead");
        self.forget(peer);
    }

    pub(super) fn shutdown(&self) {
        self.stop.cancel();
        let peers: Vec<_> = self.by_id.lock().expect("peers").values().cloned().collect();
        for p in peers {
            p.close("the daemon is shutting down");
        }
    }
}
