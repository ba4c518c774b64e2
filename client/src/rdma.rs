//! The RDMA side of a session: one RC connection to the daemon's rdma_cm endpoint, HELLO,
//! staging buffers for RDMA READ/WRITE, and FLUSH messages.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdax_proto::dataplane::Status;
use rdax_proto::rdma::{Msg, Op};
use rdax_verbs::{Conn, EventChannel, Pd, RegBuf, Wr, event};
use tokio::sync::{Semaphore, oneshot};

use crate::error::{Error, ErrorKind, Result};

/// Bound on any one RDMA work request's completion: past it the connection is fenced (the
/// request is flushed, its buffer kept until then) and the call fails. RC retries normally
/// turn a dead peer into an error long before.
const OP_BOUND: Duration = Duration::from_secs(30);

/// Bytes per staging buffer (an RDMA operation moves at most this much).
pub(crate) const CHUNK: usize = 256 << 10;
/// Staging buffers per session (operations in flight).
const STAGING: usize = 32;

fn verbs_err(what: &str, e: rdax_verbs::Error) -> Error {
    if e.is_remote_access() {
        return Error::new(
            ErrorKind::Revoked,
            format!(
                "{what}: remote access error: the daemon refused the key (the lease was revoked or its range exceeded)"
            ),
        );
    }
    let kind = if matches!(e, rdax_verbs::Error::Closed(_)) { ErrorKind::Revoked } else { ErrorKind::Connect };
    Error::new(kind, format!("{what}: {e}"))
}

/// A session's RDMA connection.
pub(crate) struct RdmaLink {
    conn: Arc<Conn>,
    _ch: Arc<EventChannel>,
    staging: Mutex<Vec<Arc<RegBuf>>>,
    free: Semaphore,
    replies: Arc<Mutex<HashMap<u64, oneshot::Sender<Msg>>>>,
    next: AtomicU64,
}

impl std::fmt::Debug for RdmaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaLink").field("qp", &self.conn.qp_num()).finish()
    }
}

impl RdmaLink {
    /// Connect to `endpoint` (from `source` when given) and bind the connection to `session`.
    /// Connect to the daemon's RDMA endpoint for session `id`, proving its `secret` in the
    /// connect request and presenting it in HELLO.
    pub(crate) async fn connect(
        endpoint: &str,
        source: Option<IpAddr>,
        session_id: [u8; 16],
        session: [u8; 16],
    ) -> Result<Arc<RdmaLink>> {
        fn e(w: &'static str) -> impl Fn(rdax_verbs::Error) -> Error {
            move |x| Error::new(ErrorKind::Connect, format!("RDMA {w}: {x}"))
        }
        rdax_verbs::devices().map_err(|x| Error::new(ErrorKind::Unsupported, format!("RDMA: {x}")))?;
        let dst: SocketAddr =
            endpoint.parse().map_err(|_| Error::new(ErrorKind::Protocol, format!("bad RDMA endpoint {endpoint:?}")))?;
        let t = Duration::from_secs(10);
        let ch = EventChannel::new().map_err(e("event channel"))?;
        let id = ch.create_id().map_err(e("rdma_create_id"))?;
        id.resolve_addr(source.map(|ip| SocketAddr::new(ip, 0)), dst, 5000).map_err(e("address resolution"))?;
        drop(ch.expect(event::ADDR_RESOLVED, t, "address resolution").await.map_err(e("address resolution"))?);
        // A kernel without the option keeps rdma_cm's timeout: slower recovery, same results.
        if let Err(x) = id.set_ack_timeout(rdax_verbs::ACK_TIMEOUT) {
            tracing::debug!(error = %x, "RDMA: keeping rdma_cm's ACK timeout");
        }
        id.resolve_route(5000).map_err(e("route resolution"))?;
        drop(ch.expect(event::ROUTE_RESOLVED, t, "route resolution").await.map_err(e("route resolution"))?);
        // SAFETY: rdma_cm keeps the resolved device context open for the process lifetime.
        let pd = unsafe { Pd::alloc(id.context()) }.map_err(e("ibv_alloc_pd"))?;
        let (conn, mut inbox) = Conn::create(id, pd.clone()).map_err(e("queue pair"))?;
        // The caller's runtime may run its requests on many threads; keep them in order.
        conn.post_from_one_thread();
        tokio::spawn(conn.clone().drive());
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let proof = rdax_proto::rdma::ConnectProof::new(session_id, &session, now).encode();
        conn.connect_with(&proof).map_err(e("rdma_connect"))?;
        if let Err(x) = ch.expect(event::ESTABLISHED, t, "connection").await {
            conn.close("the connection was not established");
            return Err(e("connect")(x));
        }
        let mut staging = Vec::with_capacity(STAGING);
        for _ in 0..STAGING {
            staging.push(Arc::new(RegBuf::new(&pd, CHUNK).map_err(e("staging buffer"))?));
        }
        let replies: Arc<Mutex<HashMap<u64, oneshot::Sender<Msg>>>> = Arc::default();
        let link = Arc::new(RdmaLink {
            conn: conn.clone(),
            _ch: ch.clone(),
            staging: Mutex::new(staging),
            free: Semaphore::new(STAGING),
            replies: replies.clone(),
            next: AtomicU64::new(1),
        });
        // Route replies to their requests; watch for the daemon disconnecting.
        let c2 = conn.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbox.recv() => {
                        let Some(raw) = m else { break };
                        let Ok(m) = Msg::decode(&raw) else { c2.close("the daemon sent a malformed message"); break };
                        if let Some(tx) = replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&m.req_id) {
                            let _ = tx.send(m);
                        }
                    }
                    ev = ch.next() => match ev {
                        Ok(ev) if ev.kind() == event::DISCONNECTED || ev.kind() == event::DEVICE_REMOVAL => {
                            let why = format!("rdma_cm: {}", rdax_verbs::event_str(ev.kind()));
                            drop(ev);
                            c2.close(&why);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    },
                    _ = c2.wait_closed() => break,
                }
            }
            replies.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        let mut hello = Msg::request(Op::Hello, 0);
        hello.session = session;
        let r = link.call(hello).await?;
        if r.status != Status::Ok {
            link.conn.close("HELLO was refused");
            return Err(Error::new(ErrorKind::Connect, format!("RDMA HELLO refused: {:?}", r.status)));
        }
        Ok(link)
    }

    /// Whether the connection still works.
    pub(crate) fn is_open(&self) -> bool {
        !self.conn.is_closed()
    }

    /// Close the connection.
    pub(crate) fn close(&self) {
        self.conn.close("the session closed");
    }

    async fn call(&self, mut m: Msg) -> Result<Msg> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        m.req_id = id;
        let (tx, rx) = oneshot::channel();
        self.replies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        // The reply is a receive: keep completion events on until it is here.
        let _armed = self.conn.hold_armed();
        if let Err(e) = self.conn.exec_within(Wr::Send(m.encode()), None, OP_BOUND, "a SEND to the daemon").await {
            self.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            return Err(verbs_err("RDMA SEND", e));
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Error::new(ErrorKind::Connect, "the RDMA connection closed")),
            Err(_) => Err(Error::new(ErrorKind::DeadlineExceeded, "no reply from the daemon over RDMA within 30 s")),
        }
    }

    async fn buffer(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, Arc<RegBuf>)> {
        let p = self.free.acquire().await.map_err(|_| Error::new(ErrorKind::Connect, "RDMA link closed"))?;
        let b = self.staging.lock().unwrap_or_else(|e| e.into_inner()).pop().expect("a permit means a free buffer");
        Ok((p, b))
    }

    fn give_back(&self, b: Arc<RegBuf>) {
        self.staging.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }

    /// RDMA WRITE `src` to `raddr` (at most [`CHUNK`] bytes).
    pub(crate) async fn write(&self, raddr: u64, rkey: u32, src: &[u8]) -> Result<()> {
        debug_assert!(src.len() <= CHUNK);
        let (_p, b) = self.buffer().await?;
        // SAFETY: the buffer is ours (taken from the free list) and no request uses it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.ptr(0), src.len()) };
        let wr = Wr::Write { laddr: b.addr(), lkey: b.lkey(), len: src.len() as u32, raddr, rkey };
        let r = self.conn.exec_within(wr, Some(b.clone()), OP_BOUND, "an RDMA operation").await;
        self.give_back(b);
        r.map_err(|e| verbs_err("RDMA WRITE", e))
    }

    /// RDMA READ `dst.len()` bytes (at most [`CHUNK`]) from `raddr`.
    pub(crate) async fn read(&self, raddr: u64, rkey: u32, dst: &mut [u8]) -> Result<()> {
        debug_assert!(dst.len() <= CHUNK);
        let (_p, b) = self.buffer().await?;
        let wr = Wr::Read { laddr: b.addr(), lkey: b.lkey(), len: dst.len() as u32, raddr, rkey };
        let r = self.conn.exec_within(wr, Some(b.clone()), OP_BOUND, "an RDMA operation").await;
        if r.is_ok() {
            // SAFETY: the READ completed into the buffer; nothing else uses it.
            unsafe { std::ptr::copy_nonoverlapping(b.ptr(0), dst.as_mut_ptr(), dst.len()) };
        }
        self.give_back(b);
        r.map_err(|e| verbs_err("RDMA READ", e))
    }

    /// A buffer registered with this connection's protection domain.
    pub(crate) fn register(&self, len: usize) -> Result<Arc<RegBuf>> {
        RegBuf::new(self.conn.pd(), len)
            .map(Arc::new)
            .map_err(|e| Error::new(ErrorKind::ResourceExhausted, format!("register an RDMA buffer: {e}")))
    }

    /// RDMA WRITE (`write`) or READ straight from/into a registered buffer: `len` bytes at
    /// `at` in `buf` to/from `raddr`.
    pub(crate) async fn zero_copy(
        &self,
        write: bool,
        raddr: u64,
        rkey: u32,
        buf: &Arc<RegBuf>,
        at: usize,
        len: usize,
    ) -> Result<()> {
        let (laddr, lkey, len) = (buf.addr() + at as u64, buf.lkey(), len as u32);
        let wr = if write {
            Wr::Write { laddr, lkey, len, raddr, rkey }
        } else {
            Wr::Read { laddr, lkey, len, raddr, rkey }
        };
        let keep: Arc<dyn std::any::Any + Send + Sync> = buf.clone();
        self.conn
            .exec_within(wr, Some(keep), OP_BOUND, "an RDMA operation")
            .await
            .map_err(|e| verbs_err(if write { "RDMA WRITE" } else { "RDMA READ" }, e))
    }

    /// Ask the daemon to persist `[offset, offset+len)` of a lease (GPSPM-style).
    pub(crate) async fn flush(&self, lease: u64, offset: u64, len: u64) -> Result<()> {
        let mut m = Msg::request(Op::Flush, 0);
        m.lease = lease;
        m.offset = offset;
        m.len = len;
        let r = self.call(m).await?;
        match r.status {
            Status::Ok => Ok(()),
            Status::Revoked | Status::UnknownKey => {
                Err(Error::new(ErrorKind::Revoked, format!("flush refused: lease {lease} was released or revoked")))
            }
            s => Err(Error::new(ErrorKind::Protocol, format!("flush refused: {s:?}"))),
        }
    }
}

impl Drop for RdmaLink {
    fn drop(&mut self) {
        self.conn.close("the session's RDMA link was dropped");
    }
}
