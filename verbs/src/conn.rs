//! One reliable connection: its QP, completion queue and completion channel, with
//! completions delivered on the tokio reactor.
//!
//! Every send-queue work request is signalled; its completion resolves the future that
//! posted it. Received messages (fixed [`MSG_LEN`]-byte frames) go to an inbox channel as
//! [`Received`] values; a receive buffer is posted again only when its message has been
//! handled (the `Received` is dropped), so the peer has at most [`RECV_SLOTS`] messages in
//! flight — credits — and the inbox can never grow beyond that. A peer that sends more gets
//! RNR NAKs, retried a bounded number of times ([`RNR_RETRY`]), then its connection breaks. Closing moves the QP to the error state: the device then
//! flushes every outstanding request, so nothing waits forever and no DMA targets a buffer
//! after its future has returned.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use rdma_mummy_sys as sys;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};

use crate::cm::{BorrowedRawFd, CmId, conn_param, set_nonblocking};
use crate::error::{Error, Result, check, last};
use crate::mem::{Access, Mr, Mw, Pd, RegBuf};
use crate::slots::{NOT_POSTED, Slots};

/// Size of a message frame.
pub const MSG_LEN: usize = 64;
/// Receive buffers per connection (the peer may have this many messages in flight).
pub const RECV_SLOTS: usize = 32;
/// Send-queue depth.
pub const SEND_DEPTH: u32 = 256;
/// RDMA READs in flight per direction.
pub const RD_ATOMIC: u8 = 16;
const RECV_TAG: u64 = 1 << 63;
/// How long a poster polls the CQ itself before waiting for a completion event: at least
/// `SPIN_POLLS` polls, then until `SPIN` has passed.
const SPIN: Duration = Duration::from_micros(200);
const SPIN_POLLS: u32 = 256;

/// A message frame.
pub type Msg = [u8; MSG_LEN];

struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps completion events on (see [`Conn::hold_armed`]).
#[derive(Debug)]
pub struct ArmGuard<'a>(&'a AtomicUsize);

impl Drop for ArmGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A received message. Dropping it gives its receive buffer back to the peer (a credit).
#[derive(Debug)]
pub struct Received {
    /// The frame.
    pub msg: Msg,
    _credit: Credit,
}

impl std::ops::Deref for Received {
    type Target = Msg;
    fn deref(&self) -> &Msg {
        &self.msg
    }
}

#[derive(Debug)]
struct Credit {
    conn: std::sync::Weak<Conn>,
    slot: usize,
}

impl Drop for Credit {
    fn drop(&mut self) {
        if let Some(c) = self.conn.upgrade()
            && !c.closed.load(Ordering::Acquire)
            && c.post_recv(self.slot).is_err()
        {
            let _ = c.fence();
        }
    }
}

/// The QP's local ACK timeout exponent: a request unacknowledged for 4.096 µs × 2^14
/// (about 67 ms, perftest's default) is sent again, up to `retry_count` (7) times. Without it
/// rdma_cm takes the timeout from the path record; in the lab (rxe, Linux 6.1) a dropped
/// packet then stalled a request, and every request behind it, for seconds: 64 KiB reads at
/// depth 3 had a p99 of 4.6 s with rdma_cm's timeout and with 2^20 set, 0.18 s with 2^14
/// (the lab's read-depth sweep, `deploy/lab/read-depth.sh`).
pub const ACK_TIMEOUT: u8 = 14;

/// RNR retries before a sender whose peer has no receive posted gets an error (7 would be
/// "forever").
pub const RNR_RETRY: u8 = 6;

/// An optional bound on a wait, and what is waited for (for the error).
type Bound = Option<(Duration, &'static str)>;

/// A send-queue request as plain data (addresses as integers), so that futures holding it
/// stay `Send`.
#[derive(Debug, Clone, Copy)]
enum Posted {
    Wr(Wr),
    Bind { mw: usize, mr: usize, rkey: u32, addr: u64, len: u64, access: u32 },
    Inv(u32),
}

/// A connected (or connecting) RC queue pair.
pub struct Conn {
    afd: Option<AsyncFd<BorrowedRawFd>>,
    id: CmId,
    cq: NonNull<sys::ibv_cq>,
    ch: NonNull<sys::ibv_comp_channel>,
    pd: Arc<Pd>,
    recv: RegBuf,
    inbox: mpsc::UnboundedSender<Received>,
    /// This connection, for the credits its messages carry.
    me: std::sync::OnceLock<std::sync::Weak<Conn>>,
    /// The send queue's requests in flight (`wr_id` = slot index).
    slots: Slots,
    closed: AtomicBool,
    /// Futures waiting for a completion event.
    waiting: AtomicUsize,
    /// [`Conn::hold_armed`] guards alive.
    holds: AtomicUsize,
    why: Mutex<Option<String>>,
    closed_tx: tokio::sync::watch::Sender<bool>,
    wake: Notify,
    /// Whether requests posted while others are in flight go through one thread
    /// ([`Conn::post_from_one_thread`]), and that thread's queue once started.
    one_poster: AtomicBool,
    poster: std::sync::OnceLock<Option<std::sync::mpsc::Sender<(u64, Posted)>>>,
}

// SAFETY: verbs objects are thread-safe; mutable state is behind atomics and a mutex.
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("qp_num", &self.qp_num()).finish()
    }
}

/// One work request.
#[derive(Debug, Clone, Copy)]
pub enum Wr {
    /// SEND of a message frame (inline).
    Send(Msg),
    /// RDMA WRITE `len` bytes from local `laddr` to remote `raddr`.
    Write {
        /// Local address.
        laddr: u64,
        /// Local key.
        lkey: u32,
        /// Bytes.
        len: u32,
        /// Remote address.
        raddr: u64,
        /// Remote key.
        rkey: u32,
    },
    /// RDMA READ `len` bytes from remote `raddr` into local `laddr`.
    Read {
        /// Local address.
        laddr: u64,
        /// Local key.
        lkey: u32,
        /// Bytes.
        len: u32,
        /// Remote address.
        raddr: u64,
        /// Remote key.
        rkey: u32,
    },
}

impl Conn {
    /// Create the QP for `id` (resolved or a connection request) in `pd`.
    pub fn create(id: CmId, pd: Arc<Pd>) -> Result<(Arc<Conn>, mpsc::UnboundedReceiver<Received>)> {
        let ctx = pd.context();
        // SAFETY: an open context.
        let ch = NonNull::new(unsafe { sys::ibv_create_comp_channel(ctx) })
            .ok_or_else(|| last("ibv_create_comp_channel"))?;
        let cqe = (SEND_DEPTH as usize + RECV_SLOTS) as i32;
        // SAFETY: an open context and a live channel.
        let cq = unsafe { sys::ibv_create_cq(ctx, cqe, std::ptr::null_mut(), ch.as_ptr(), 0) };
        let Some(cq) = NonNull::new(cq) else {
            let e = last("ibv_create_cq");
            // SAFETY: created above, unused.
            unsafe { sys::ibv_destroy_comp_channel(ch.as_ptr()) };
            return Err(e);
        };
        // From here on `Conn`'s Drop cleans up, so build it before anything else can fail.
        let recv = match RegBuf::new(&pd, RECV_SLOTS * MSG_LEN) {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: created above, unused.
                unsafe {
                    sys::ibv_destroy_cq(cq.as_ptr());
                    sys::ibv_destroy_comp_channel(ch.as_ptr());
                }
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = Conn {
            afd: None,
            id,
            cq,
            ch,
            pd,
            recv,
            inbox: tx,
            me: std::sync::OnceLock::new(),
            slots: Slots::new(SEND_DEPTH as usize),
            closed: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            holds: AtomicUsize::new(0),
            why: Mutex::new(None),
            closed_tx: tokio::sync::watch::channel(false).0,
            wake: Notify::new(),
            one_poster: AtomicBool::new(false),
            poster: std::sync::OnceLock::new(),
        };
        // SAFETY: a live channel.
        let fd = unsafe { (*ch.as_ptr()).fd };
        set_nonblocking(fd)?;
        // SAFETY: the fd belongs to the channel, destroyed in Drop after `afd` is taken.
        let afd = unsafe { AsyncFd::register_with_interest(BorrowedRawFd(fd), tokio::io::Interest::READABLE) };
        c.afd =
            Some(afd.map_err(|e| Error::Os { op: "register the completion channel with tokio", source: e.into() })?);
        // SAFETY: all-zero is a valid init attr; the fields that matter are set below.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.as_ptr();
        init.recv_cq = cq.as_ptr();
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.cap = sys::ibv_qp_cap {
            max_send_wr: SEND_DEPTH,
            max_recv_wr: RECV_SLOTS as u32,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: MSG_LEN as u32,
        };
        // SAFETY: the id's device is the PD's; init is valid for the call.
        check(unsafe { sys::rdma_create_qp(c.id.raw(), c.pd.ptr.as_ptr(), &mut init) }, "rdma_create_qp")?;
        for slot in 0..RECV_SLOTS {
            c.post_recv(slot)?;
        }
        // SAFETY: a live CQ.
        check(unsafe { sys::ibv_req_notify_cq(cq.as_ptr(), 0) }, "ibv_req_notify_cq")?;
        let c = Arc::new(c);
        let _ = c.me.set(Arc::downgrade(&c));
        Ok((c, rx))
    }

    fn qp(&self) -> *mut sys::ibv_qp {
        // SAFETY: a live id.
        unsafe { (*self.id.raw()).qp }
    }

    /// The QP number.
    pub fn qp_num(&self) -> u32 {
        let qp = self.qp();
        if qp.is_null() {
            0
        } else {
            // SAFETY: a live QP.
            unsafe { (*qp).qp_num }
        }
    }

    /// The rdma_cm identifier.
    pub fn id(&self) -> &CmId {
        &self.id
    }

    /// The protection domain.
    pub fn pd(&self) -> &Arc<Pd> {
        &self.pd
    }

    fn post_recv(&self, slot: usize) -> Result<()> {
        let mut sge = sys::ibv_sge {
            addr: self.recv.addr() + (slot * MSG_LEN) as u64,
            length: MSG_LEN as u32,
            lkey: self.recv.lkey(),
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id: RECV_TAG | slot as u64,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live QP; wr and sge are valid for the call; the buffer outlives the QP.
        check(unsafe { sys::ibv_post_recv(self.qp(), &mut wr, &mut bad) }, "ibv_post_recv")
    }

    /// Accept a connection request on this QP (server side).
    pub fn accept(&self) -> Result<()> {
        let mut p = conn_param(RD_ATOMIC);
        // SAFETY: a connection-request id with its QP.
        check(unsafe { sys::rdma_accept(self.id.raw(), &mut p) }, "rdma_accept")
    }

    /// Connect (client side); ESTABLISHED arrives on the id's channel.
    pub fn connect(&self) -> Result<()> {
        self.connect_with(&[])
    }

    /// Connect, sending `private` (at most 56 bytes for RC) with the request.
    pub fn connect_with(&self, private: &[u8]) -> Result<()> {
        assert!(private.len() <= 56, "RC connect private data is at most 56 bytes");
        let mut p = conn_param(RD_ATOMIC);
        if !private.is_empty() {
            p.private_data = private.as_ptr().cast();
            p.private_data_len = private.len() as u8;
        }
        // SAFETY: a route-resolved id with its QP; `private` outlives the call, which copies it.
        check(unsafe { sys::rdma_connect(self.id.raw(), &mut p) }, "rdma_connect")
    }

    /// [`exec`](Self::exec), bounded: if a free slot or the completion does not come within
    /// `bound` (each wait), the connection is fenced (so the request is flushed; `keep` lives
    /// until then) and this fails with [`Error::Timeout`]. The bound's timer is set only when
    /// the call has to wait: a request that completes while its submitter polls (the
    /// latency-bound case) pays no clock read and no timer for it.
    pub async fn exec_within(
        &self,
        wr: Wr,
        keep: Option<Arc<dyn Any + Send + Sync>>,
        bound: Duration,
        what: &'static str,
    ) -> Result<()> {
        self.exec_bounded(wr, keep, Some((bound, what))).await
    }

    /// Post one work request and wait for its completion. `keep` is held until the device
    /// is done with the request, even if this future is dropped.
    pub async fn exec(&self, wr: Wr, keep: Option<Arc<dyn Any + Send + Sync>>) -> Result<()> {
        self.exec_bounded(wr, keep, None).await
    }

    async fn exec_bounded(&self, wr: Wr, keep: Option<Arc<dyn Any + Send + Sync>>, bound: Bound) -> Result<()> {
        let op = match wr {
            Wr::Send(_) => "SEND",
            Wr::Write { .. } => "RDMA WRITE",
            Wr::Read { .. } => "RDMA READ",
        };
        let (op, status) = self.submit(Posted::Wr(wr), op, keep, bound).await?;
        if status != 0 {
            return Err(Error::Completion { op, status });
        }
        Ok(())
    }

    /// Wait for `f` within `bound`, if any; past it, fence the connection (everything in
    /// flight is flushed) and fail.
    async fn within<F: std::future::Future>(&self, f: F, bound: Bound) -> Result<F::Output> {
        let Some((bound, what)) = bound else { return Ok(f.await) };
        match tokio::time::timeout(bound, f).await {
            Ok(r) => Ok(r),
            Err(_) => {
                self.mark_closed(&format!("{what} did not complete within {bound:?}"));
                let _ = self.fence();
                Err(Error::Timeout(what))
            }
        }
    }

    /// Build the work request for `p` and post it (synchronously: the raw WR never crosses
    /// an await point).
    fn post_now(&self, id: u64, p: &Posted) -> Result<()> {
        // SAFETY: all-zero is a valid (empty) send WR.
        let mut w: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        let mut sge = sys::ibv_sge { addr: 0, length: 0, lkey: 0 };
        match *p {
            Posted::Wr(Wr::Send(ref m)) => {
                sge = sys::ibv_sge { addr: m.as_ptr() as u64, length: MSG_LEN as u32, lkey: 0 };
                w.opcode = sys::ibv_wr_opcode::IBV_WR_SEND;
                w.send_flags = sys::ibv_send_flags::IBV_SEND_INLINE.0;
            }
            Posted::Wr(Wr::Write { laddr, lkey, len, raddr, rkey }) => {
                sge = sys::ibv_sge { addr: laddr, length: len, lkey };
                w.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                w.wr.rdma = sys::rdma_t { remote_addr: raddr, rkey };
            }
            Posted::Wr(Wr::Read { laddr, lkey, len, raddr, rkey }) => {
                sge = sys::ibv_sge { addr: laddr, length: len, lkey };
                w.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
                w.wr.rdma = sys::rdma_t { remote_addr: raddr, rkey };
            }
            Posted::Bind { mw, mr, rkey, addr, len, access } => {
                w.opcode = sys::ibv_wr_opcode::IBV_WR_BIND_MW;
                w.bind_mw_tso_union.bind_mw = sys::bind_mw_t {
                    mw: mw as *mut sys::ibv_mw,
                    rkey,
                    bind_info: sys::ibv_mw_bind_info {
                        mr: mr as *mut sys::ibv_mr,
                        addr,
                        length: len,
                        mw_access_flags: access,
                    },
                };
            }
            Posted::Inv(rkey) => {
                w.opcode = sys::ibv_wr_opcode::IBV_WR_LOCAL_INV;
                w.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
            }
        }
        if sge.length > 0 {
            w.sg_list = &mut sge;
            w.num_sge = 1;
        }
        w.wr_id = id;
        w.send_flags |= sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = std::ptr::null_mut();
        // SAFETY: a live QP; the WR, its SGE and any inline data are valid for the call (the
        // provider copies WRs and inline data at post time); windows and regions named by a
        // bind are kept alive by the caller until its completion.
        check(unsafe { sys::ibv_post_send(self.qp(), &mut w, &mut bad) }, "ibv_post_send")
    }

    async fn submit(
        &self,
        p: Posted,
        op: &'static str,
        keep: Option<Arc<dyn Any + Send + Sync>>,
        bound: Bound,
    ) -> Result<(&'static str, u32)> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed(self.closed_why()));
        }
        // A free slot is usually there at once; the bound's timer only for a wait.
        let mut take = std::pin::pin!(self.slots.take(keep));
        let t = match std::future::poll_fn(|cx| Poll::Ready(take.as_mut().poll(cx))).await {
            Poll::Ready(t) => t,
            Poll::Pending => self.within(take, bound).await?,
        };
        let mut t = t.ok_or_else(|| Error::Closed(self.closed_why()))?;
        let id = t.id();
        let alone = self.slots.inflight() == 1;
        let queued = !alone && self.one_poster.load(Ordering::Relaxed) && self.post_queued(id, p);
        if !queued && let Err(e) = self.post_now(id, &p) {
            t.unpost();
            return Err(e);
        }
        let status = |s: u32| {
            if s == NOT_POSTED { Err(Error::Closed(self.closed_why())) } else { Ok((op, s)) }
        };
        // Alone in flight (latency-bound), poll the CQ from here for a short while before
        // falling back to the completion channel: a wakeup through epoll costs system calls and
        // context switches, which dominate small-operation latency (perftest's latency tests
        // never sleep either). With other requests in flight (bandwidth-bound) the channel is
        // cheap per request, and spinning would take CPU from a software device (rxe) that
        // needs it.
        if alone {
            // The clock is read only once most requests would be done (a clock read costs
            // about as much as a poll under emulation), then every 32 polls.
            let mut spin_until = None;
            for i in 0u32.. {
                self.poll_all();
                if let Some(s) = t.try_status() {
                    return status(s);
                }
                if i >= SPIN_POLLS && i % 32 == 0 {
                    let now = std::time::Instant::now();
                    if now >= *spin_until.get_or_insert(now + SPIN) {
                        break;
                    }
                }
                std::hint::spin_loop();
            }
        }
        // Wait for the completion event: count as a waiter, arm the CQ, and look once more
        // for a completion that came before the arming.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiter = Waiter(&self.waiting);
        self.arm();
        self.poll_all();
        // On a timeout the ticket is dropped after the fence: its slot (and `keep`) stays
        // taken until the flushed completion frees it.
        status(self.within(&mut t, bound).await?)
    }

    /// From now on, a request submitted while others are in flight is posted by one thread of
    /// this connection's own instead of the submitter's (a request alone in flight is still
    /// posted at once, for latency).
    ///
    /// Why: soft-RoCE (rxe) sends a request's packets, and the responder its responses, from
    /// the CPU that posted it. Requests posted from several threads (a multi-threaded tokio
    /// runtime) leave from several CPUs, through per-CPU queues, and overtake each other; the
    /// requester takes a read response that arrives ahead of an earlier read as loss and
    /// retransmits everything after it. In the lab, 64 KiB reads at depth 3 fell to 0.4–12 MB/s
    /// (against 29–33 at depth 1) with hundreds of retransmissions; with every post from one
    /// thread they ran at 29–30 MB/s with almost none. perftest, single-threaded, does not hit
    /// this.
    pub fn post_from_one_thread(&self) {
        self.one_poster.store(true, Ordering::Relaxed);
    }

    /// Hand `p` to the posting thread (started on first use). False if there is none (the
    /// thread could not be started): the caller posts it itself.
    fn post_queued(&self, id: u64, p: Posted) -> bool {
        let tx = self.poster.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<(u64, Posted)>();
            let me = self.me.get().cloned()?;
            let spawned = std::thread::Builder::new().name("rdax-verbs-post".into()).spawn(move || {
                // Ends when the connection (and with it the sender) is gone.
                while let Ok((id, p)) = rx.recv() {
                    let Some(c) = me.upgrade() else { return };
                    if let Err(e) = c.post_now(id, &p) {
                        // The submitter sees its request fail as the connection closing.
                        c.mark_closed(&format!("posting a work request failed: {e}"));
                        let _ = c.fence();
                        c.slots.complete(id, NOT_POSTED);
                    }
                }
            });
            spawned.ok().map(|_| tx)
        });
        match tx {
            Some(tx) => tx.send((id, p)).is_ok(),
            None => false,
        }
    }

    /// Request a completion event for the next completion.
    fn arm(&self) {
        // SAFETY: a live CQ.
        unsafe { sys::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
    }

    /// Keep completion events on while the guard lives, for receives nobody polls for (a
    /// server waiting for requests, a client waiting for a reply).
    pub fn hold_armed(&self) -> ArmGuard<'_> {
        self.holds.fetch_add(1, Ordering::AcqRel);
        self.arm();
        self.poll_all();
        ArmGuard(&self.holds)
    }

    /// Bind `mw` over `[addr, addr+len)` of `mr` with `access`, tied to this QP. Returns the
    /// new rkey.
    pub async fn bind_mw(&self, mw: &mut Mw, mr: &Mr, addr: u64, len: u64, access: Access) -> Result<u32> {
        // SAFETY: a pure function on the value.
        let rkey = unsafe { sys::ibv_inc_rkey(mw.rkey) };
        let p = Posted::Bind { mw: mw.raw() as usize, mr: mr.raw() as usize, rkey, addr, len, access: access.0 };
        let (op, status) = self.submit(p, "BIND_MW", None, None).await?;
        if status != 0 {
            return Err(Error::Completion { op, status });
        }
        mw.rkey = rkey;
        Ok(rkey)
    }

    /// Invalidate a memory window bound on this QP.
    pub async fn local_inv(&self, rkey: u32) -> Result<()> {
        let (op, status) = self.submit(Posted::Inv(rkey), "LOCAL_INV", None, None).await?;
        if status != 0 {
            return Err(Error::Completion { op, status });
        }
        Ok(())
    }

    /// Why the connection closed (the first reason recorded).
    pub fn closed_why(&self) -> String {
        self.why.lock().expect("why").clone().unwrap_or_else(|| "closed".into())
    }

    fn mark_closed(&self, why: &str) {
        self.why.lock().expect("why").get_or_insert_with(|| why.to_string());
        self.closed.store(true, Ordering::Release);
        // A submitter waiting for a free slot gets the closed error now.
        self.slots.close();
        self.closed_tx.send_replace(true);
    }

    /// Resolves once the connection is closed, fenced or broken.
    pub async fn wait_closed(&self) {
        let mut rx = self.closed_tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Fence: move the QP to the error state. The device stops serving the peer's requests on
    /// it and flushes everything outstanding; the connection is closed for good.
    pub fn fence(&self) -> Result<()> {
        self.mark_closed("fenced: the queue pair was moved to the error state");
        let qp = self.qp();
        let mut r = Ok(());
        if !qp.is_null() {
            // SAFETY: all-zero is a valid attr; only the state is applied.
            let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
            attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
            // SAFETY: a live QP.
            let rc = unsafe { sys::ibv_modify_qp(qp, &mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32) };
            r = check(rc, "ibv_modify_qp(ERR)");
        }
        self.wake.notify_one();
        r
    }

    /// Close: disconnect and fence. `why` is kept for later errors.
    pub fn close(&self, why: &str) {
        if !self.closed.load(Ordering::Acquire) {
            self.mark_closed(why);
            self.id.disconnect();
        }
        // A failed fence leaves a QP that the disconnect already stopped; nothing more to do.
        let _ = self.fence();
    }

    /// True once closed or fenced.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Drive completions until the connection is closed and every request has completed
    /// (flushed). Spawn this once per connection.
    pub async fn drive(self: Arc<Self>) {
        let afd = self.afd.as_ref().expect("registered");
        loop {
            self.poll_all();
            if self.closed.load(Ordering::Acquire) && self.slots.inflight() == 0 {
                return;
            }
            tokio::select! {
                r = afd.readable() => match r {
                    Ok(mut g) => g.clear_ready(),
                    Err(_) => return,
                },
                _ = self.wake.notified() => {}
                // A flush after fencing is generated by the device without a notification on
                // some providers; look again now and then while closing.
                _ = tokio::time::sleep(Duration::from_millis(50)), if self.closed.load(Ordering::Acquire) => {}
            }
            let mut n = 0;
            loop {
                let mut cq = std::ptr::null_mut();
                let mut ctx = std::ptr::null_mut();
                // SAFETY: a non-blocking live channel.
                if unsafe { sys::ibv_get_cq_event(self.ch.as_ptr(), &mut cq, &mut ctx) } != 0 {
                    break;
                }
                n += 1;
            }
            if n > 0 {
                // SAFETY: acknowledging the events just taken.
                unsafe { sys::ibv_ack_cq_events(self.cq.as_ptr(), n) };
            }
            // Re-arm (before polling, so no completion is missed) only while someone waits for
            // an event; a poster that spins arms for itself when it stops spinning. Arming is a
            // system call on some providers, and every event costs a wakeup.
            if self.holds.load(Ordering::Acquire) > 0
                || self.waiting.load(Ordering::Acquire) > 0
                || self.closed.load(Ordering::Acquire)
            {
                self.arm();
            }
        }
    }

    fn poll_all(&self) {
        let mut wcs = [const { std::mem::MaybeUninit::<sys::ibv_wc>::uninit() }; 16];
        loop {
            // SAFETY: a live CQ and room for 16 entries.
            let n = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), 16, wcs.as_mut_ptr().cast()) };
            if n <= 0 {
                return;
            }
            for wc in &wcs[..n as usize] {
                // SAFETY: ibv_poll_cq filled the first n entries.
                let wc = unsafe { wc.assume_init_ref() };
                if wc.wr_id & RECV_TAG != 0 {
                    let slot = (wc.wr_id & !RECV_TAG) as usize;
                    if wc.status == 0 {
                        let mut m = [0u8; MSG_LEN];
                        // SAFETY: the slot is inside the receive buffer and the device is done
                        // with it (its completion is here).
                        unsafe {
                            std::ptr::copy_nonoverlapping(self.recv.ptr(slot * MSG_LEN), m.as_mut_ptr(), MSG_LEN)
                        };
                        // The buffer is posted again when the message has been handled.
                        let credit = Credit { conn: self.me.get().cloned().unwrap_or_default(), slot };
                        let _ = self.inbox.send(Received { msg: m, _credit: credit });
                    }
                    continue;
                }
                self.slots.complete(wc.wr_id, wc.status);
                if wc.status != 0 && wc.status != sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                    // The QP is in the error state now; nothing more will succeed on it.
                    self.mark_closed(&format!("a work request completed with {}", crate::wc_status_str(wc.status)));
                }
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Order: QP (no more DMA), then the reactor registration, CQ and channel; the id and
        // the receive buffer are dropped after this body.
        if !self.qp().is_null() {
            // SAFETY: our QP; nothing posts after the last Arc is gone.
            unsafe { sys::rdma_destroy_qp(self.id.raw()) };
        }
        drop(self.afd.take());
        // SAFETY: the QP using the CQ is gone; every event was acknowledged.
        unsafe {
            sys::ibv_destroy_cq(self.cq.as_ptr());
            sys::ibv_destroy_comp_channel(self.ch.as_ptr());
        }
    }
}
