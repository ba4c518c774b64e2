//! rdma_cm: event channels, identifiers and their events, driven by tokio.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdma_mummy_sys as sys;
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result, check, last};

/// A raw fd that is not closed on drop (its owner closes it).
#[derive(Debug)]
pub(crate) struct BorrowedRawFd(pub RawFd);

impl AsRawFd for BorrowedRawFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is involved.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(last("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

/// An rdma_cm event channel whose events are awaited on the tokio reactor.
pub struct EventChannel {
    // Declared first: deregistered from the reactor before the channel closes the fd.
    afd: AsyncFd<BorrowedRawFd>,
    ch: NonNull<sys::rdma_event_channel>,
}

// SAFETY: librdmacm calls are thread-safe; the channel pointer is only read.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl std::fmt::Debug for EventChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventChannel").field("fd", &self.afd.get_ref().0).finish()
    }
}

impl EventChannel {
    /// A new channel (must be called inside a tokio runtime).
    pub fn new() -> Result<Arc<EventChannel>> {
        // SAFETY: no arguments; NULL on failure.
        let p = unsafe { sys::rdma_create_event_channel() };
        let ch = NonNull::new(p).ok_or_else(|| last("rdma_create_event_channel"))?;
        // SAFETY: a live channel.
        let fd = unsafe { (*p).fd };
        let close = || {
            // SAFETY: created above and not shared yet.
            unsafe { sys::rdma_destroy_event_channel(p) }
        };
        if let Err(e) = set_nonblocking(fd) {
            close();
            return Err(e);
        }
        // SAFETY: the fd stays open until the channel is destroyed, which happens in Drop
        // after the registration (declared first) is gone.
        match unsafe { AsyncFd::register_with_interest(BorrowedRawFd(fd), tokio::io::Interest::READABLE) } {
            Ok(afd) => Ok(Arc::new(EventChannel { afd, ch })),
            Err(e) => {
                close();
                Err(Error::Os { op: "register the rdma_cm channel with tokio", source: e.into() })
            }
        }
    }

    /// A new RC (port space TCP) identifier on this channel.
    pub fn create_id(self: &Arc<Self>) -> Result<CmId> {
        let mut id = std::ptr::null_mut();
        // SAFETY: the channel is live; id is written on success.
        let rc = unsafe {
            sys::rdma_create_id(self.ch.as_ptr(), &mut id, std::ptr::null_mut(), sys::rdma_port_space::RDMA_PS_TCP)
        };
        check(rc, "rdma_create_id")?;
        Ok(CmId { id: NonNull::new(id).expect("rdma_create_id returned NULL"), _ch: self.clone() })
    }

    fn try_next(&self) -> Option<Result<CmEvent>> {
        let mut ev = std::ptr::null_mut();
        // SAFETY: non-blocking channel; ev written on success.
        let rc = unsafe { sys::rdma_get_cm_event(self.ch.as_ptr(), &mut ev) };
        if rc == 0 {
            return Some(Ok(CmEvent { ev: NonNull::new(ev).expect("event") }));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return None;
        }
        Some(Err(Error::Os { op: "rdma_get_cm_event", source: e }))
    }

    /// The next event.
    pub async fn next(&self) -> Result<CmEvent> {
        loop {
            if let Some(r) = self.try_next() {
                return r;
            }
            let mut g = self.afd.readable().await.map_err(|e| Error::Os { op: "rdma_cm channel", source: e })?;
            g.clear_ready();
        }
    }

    /// The next event, which must be `want` for `id`; bounded by `timeout`.
    pub async fn expect(&self, want: u32, timeout: Duration, what: &'static str) -> Result<CmEvent> {
        let ev = tokio::time::timeout(timeout, self.next()).await.map_err(|_| Error::Timeout(what))??;
        if ev.kind() != want || ev.status() != 0 {
            return Err(Error::Cm(format!(
                "{what}: got {} (status {}) instead of {}",
                event_str(ev.kind()),
                ev.status(),
                event_str(want)
            )));
        }
        Ok(ev)
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id holds an Arc to the channel, so none is left.
        unsafe { sys::rdma_destroy_event_channel(self.ch.as_ptr()) };
    }
}

/// Name of an rdma_cm event type.
pub fn event_str(kind: u32) -> String {
    // SAFETY: returns a static string for any value.
    unsafe { std::ffi::CStr::from_ptr(sys::rdma_event_str(kind)) }.to_string_lossy().into_owned()
}

/// Event types rdax handles.
pub mod event {
    use rdma_mummy_sys::rdma_cm_event_type as t;
    /// Address resolved.
    pub const ADDR_RESOLVED: u32 = t::RDMA_CM_EVENT_ADDR_RESOLVED;
    /// Route resolved.
    pub const ROUTE_RESOLVED: u32 = t::RDMA_CM_EVENT_ROUTE_RESOLVED;
    /// A client asks to connect.
    pub const CONNECT_REQUEST: u32 = t::RDMA_CM_EVENT_CONNECT_REQUEST;
    /// Connected.
    pub const ESTABLISHED: u32 = t::RDMA_CM_EVENT_ESTABLISHED;
    /// The peer refused.
    pub const REJECTED: u32 = t::RDMA_CM_EVENT_REJECTED;
    /// Disconnected.
    pub const DISCONNECTED: u32 = t::RDMA_CM_EVENT_DISCONNECTED;
    /// The device went away.
    pub const DEVICE_REMOVAL: u32 = t::RDMA_CM_EVENT_DEVICE_REMOVAL;
    /// Timewait over; the id may be destroyed.
    pub const TIMEWAIT_EXIT: u32 = t::RDMA_CM_EVENT_TIMEWAIT_EXIT;
}

/// One rdma_cm event; acknowledged on drop.
pub struct CmEvent {
    ev: NonNull<sys::rdma_cm_event>,
}

// SAFETY: the event is plain data until acknowledged.
unsafe impl Send for CmEvent {}

impl CmEvent {
    /// `rdma_cm_event_type`.
    pub fn kind(&self) -> u32 {
        // SAFETY: a live event.
        unsafe { (*self.ev.as_ptr()).event }
    }
    /// Status (0 = ok).
    pub fn status(&self) -> i32 {
        // SAFETY: a live event.
        unsafe { (*self.ev.as_ptr()).status }
    }
    /// The identifier the event is about (for CONNECT_REQUEST: the new one).
    pub fn id_ptr(&self) -> *mut sys::rdma_cm_id {
        // SAFETY: a live event.
        unsafe { (*self.ev.as_ptr()).id }
    }
    /// The private data of a connection event (CONNECT_REQUEST: what the client sent with
    /// `rdma_connect`), copied out. Over RoCE it may come padded with zeros.
    pub fn private_data(&self) -> Vec<u8> {
        // SAFETY: a live event; for connection events `param.conn` is the union's active
        // member, and its data (`private_data_len` bytes) lives until the event is
        // acknowledged, which is after this copy.
        unsafe {
            let p = &(*self.ev.as_ptr()).param.conn;
            if p.private_data.is_null() {
                return Vec::new();
            }
            std::slice::from_raw_parts(p.private_data as *const u8, usize::from(p.private_data_len)).to_vec()
        }
    }

    /// Take ownership of a CONNECT_REQUEST's new identifier.
    pub fn take_request(&self, ch: &Arc<EventChannel>) -> CmId {
        assert_eq!(self.kind(), event::CONNECT_REQUEST);
        CmId { id: NonNull::new(self.id_ptr()).expect("request id"), _ch: ch.clone() }
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: every event from rdma_get_cm_event is acknowledged exactly once.
        unsafe { sys::rdma_ack_cm_event(self.ev.as_ptr()) };
    }
}

/// An rdma_cm identifier (with its QP once one is created).
pub struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    _ch: Arc<EventChannel>,
}

// SAFETY: librdmacm calls are thread-safe.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

impl std::fmt::Debug for CmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmId").field("id", &self.id).finish()
    }
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as _)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as _)
        }
    }
}

impl CmId {
    pub(crate) fn raw(&self) -> *mut sys::rdma_cm_id {
        self.id.as_ptr()
    }

    /// The id's address: what [`CmEvent::id_ptr`] returns for its events.
    pub fn raw_addr(&self) -> usize {
        self.id.as_ptr() as usize
    }

    /// The device context this id is bound to (NULL before bind/resolve, or for a wildcard).
    pub fn context(&self) -> *mut sys::ibv_context {
        // SAFETY: a live id.
        unsafe { (*self.id.as_ptr()).verbs }
    }

    /// Bind to a local address.
    pub fn bind(&self, addr: SocketAddr) -> Result<()> {
        let (mut ss, _) = sockaddr(addr);
        // SAFETY: ss is a valid sockaddr for the call's duration.
        check(
            unsafe { sys::rdma_bind_addr(self.raw(), (&mut ss as *mut libc::sockaddr_storage).cast()) },
            "rdma_bind_addr",
        )
    }

    /// Listen for connection requests.
    pub fn listen(&self, backlog: i32) -> Result<()> {
        // SAFETY: a bound id.
        check(unsafe { sys::rdma_listen(self.raw(), backlog) }, "rdma_listen")
    }

    /// The local port (after bind).
    pub fn port(&self) -> u16 {
        // SAFETY: a live id; the address is inside it and read while it lives.
        let sa = unsafe { sys::rdma_get_local_addr(&*self.raw()) };
        // sin_port and sin6_port sit at the same offset, right after the family.
        // SAFETY: both sockaddr_in and sockaddr_in6 start with family then port.
        let port = unsafe { (*(sa as *const libc::sockaddr as *const libc::sockaddr_in)).sin_port };
        u16::from_be(port)
    }

    /// The peer's IP address (of a connect request, or of a connected id), if it is IPv4 or
    /// IPv6.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        // SAFETY: a live id; the address is inside it and read while it lives.
        let sa = unsafe { sys::rdma_get_peer_addr(&*self.raw()) } as *const libc::sockaddr;
        // SAFETY: the family tells which sockaddr the storage holds; both fit in it.
        unsafe {
            match i32::from((*sa).sa_family) {
                libc::AF_INET => {
                    let a = &*(sa as *const libc::sockaddr_in);
                    Some(std::net::IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let a = &*(sa as *const libc::sockaddr_in6);
                    Some(std::net::IpAddr::from(a.sin6_addr.s6_addr).to_canonical())
                }
                _ => None,
            }
        }
    }

    /// Start resolving `dst` (from `src` when given).
    pub fn resolve_addr(&self, src: Option<SocketAddr>, dst: SocketAddr, timeout_ms: i32) -> Result<()> {
        let (mut d, _) = sockaddr(dst);
        let mut s = src.map(|s| sockaddr(s).0);
        let sp = s.as_mut().map_or(std::ptr::null_mut(), |s| (s as *mut libc::sockaddr_storage).cast());
        // SAFETY: both addresses are valid for the call.
        check(
            unsafe {
                sys::rdma_resolve_addr(self.raw(), sp, (&mut d as *mut libc::sockaddr_storage).cast(), timeout_ms)
            },
            "rdma_resolve_addr",
        )
    }

    /// Start resolving the route.
    pub fn resolve_route(&self, timeout_ms: i32) -> Result<()> {
        // SAFETY: an id with a resolved address.
        check(unsafe { sys::rdma_resolve_route(self.raw(), timeout_ms) }, "rdma_resolve_route")
    }

    /// The local ACK timeout of the QP this id connects: 4.096 µs × 2^`exp` before the
    /// requester retransmits an unacknowledged request (rdma_cm otherwise takes it from the
    /// path record). Set after address resolution, before the route is resolved (client) or
    /// the request accepted (server).
    pub fn set_ack_timeout(&self, exp: u8) -> Result<()> {
        // From rdma_cma.h: option level RDMA_OPTION_ID, option RDMA_OPTION_ID_ACK_TIMEOUT.
        const RDMA_OPTION_ID: i32 = 0;
        const RDMA_OPTION_ID_ACK_TIMEOUT: i32 = 3;
        let mut v = exp;
        // SAFETY: a live id; the option is a u8 valid for the call, which copies it.
        check(
            unsafe {
                sys::rdma_set_option(
                    self.raw(),
                    RDMA_OPTION_ID,
                    RDMA_OPTION_ID_ACK_TIMEOUT,
                    (&raw mut v).cast(),
                    std::mem::size_of::<u8>(),
                )
            },
            "rdma_set_option(ACK_TIMEOUT)",
        )
    }

    /// Refuse a connection request (before any QP or PD is made for it); the peer gets
    /// REJECTED. Dropping the id afterwards destroys it.
    pub fn reject(&self) {
        // SAFETY: a connection-request id; an error only means the peer is already gone.
        unsafe { sys::rdma_reject(self.raw(), std::ptr::null(), 0) };
    }

    /// Disconnect (idempotent from rdax's point of view).
    pub fn disconnect(&self) {
        // SAFETY: a live id; an error only means it was not connected.
        unsafe { sys::rdma_disconnect(self.raw()) };
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the QP (if any) is destroyed by its owner before the id is dropped; every
        // event of this id has been acknowledged (CmEvent acknowledges on drop).
        unsafe { sys::rdma_destroy_id(self.id.as_ptr()) };
    }
}

/// Connection parameters: RDMA READ depth both ways, retries, and the QP's initiator depth.
pub(crate) fn conn_param(depth: u8) -> sys::rdma_conn_param {
    sys::rdma_conn_param {
        private_data: std::ptr::null(),
        private_data_len: 0,
        responder_resources: depth,
        initiator_depth: depth,
        flow_control: 0,
        retry_count: 7,
        rnr_retry_count: crate::conn::RNR_RETRY,
        srq: 0,
        qp_num: 0,
    }
}
