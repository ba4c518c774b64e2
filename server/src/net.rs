//! Listeners and connections with bounds: a connection cap taken before `accept`, back-off on
//! accept errors, and, for gRPC, an idle timeout and a cut at shutdown.
//!
//! * [`Acceptor`] takes a permit of its listener's cap *before* accepting (mini-redis's
//!   pattern), so at the cap new connections wait in the kernel's backlog instead of costing a
//!   file descriptor; the permit lives as long as the connection. Accept errors (EMFILE,
//!   ENFILE, ENOBUFS) back off 10 ms → 20 ms → … → 5 s instead of spinning, and are logged
//!   once per back-off step, not once per attempt. A second cap bounds the connections from
//!   one source address (`limits.max_connections_per_source`): past it, a new connection is
//!   closed as soon as it is accepted, so one host cannot take the whole listener. (The style guide's 1 → 64 s is for servers
//!   that can afford to stop accepting for a minute; a storage daemon's clients cannot.)
//! * tonic runs every accepted connection in a task of its own, which stopping the server does
//!   not end: a client that stopped reading (SIGSTOP, a dead host) would keep its connection —
//!   and the handlers and pool references behind it — alive. Every accepted gRPC stream is a
//!   [`Cuttable`]: once its token is cancelled, reads and writes fail, hyper drops the
//!   connection, and what it held goes with it. It is also closed after `grpc.idle_timeout_ms`
//!   with no request in progress (the request gate counts them, streamed replies included).
//! * Both work for the TCP listeners and for the admin Unix socket ([`Listen`]): there the
//!   "source" is the peer's user id.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A listening socket an [`Acceptor`] takes connections from.
pub trait Listen: Send + Sync + 'static {
    /// An accepted connection.
    type Stream: Send;
    /// Who is at the other end (an address, a user's credentials).
    type Peer: Send;
    /// What the per-source cap counts by.
    type Source: Eq + std::hash::Hash + Copy + std::fmt::Display + std::fmt::Debug + Send + Sync + 'static;
    /// Accept one connection.
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
    /// The source `peer` counts against.
    fn source(peer: &Self::Peer) -> Self::Source;
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;
    type Source = IpAddr;

    fn accept_one(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        self.accept()
    }

    fn source(peer: &SocketAddr) -> IpAddr {
        peer.ip().to_canonical()
    }
}

/// Open connections per source.
#[derive(Debug)]
struct Sources<K>(Mutex<HashMap<K, usize>>);

impl<K: Eq + std::hash::Hash> Sources<K> {
    fn release(&self, k: &K) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                m.remove(k);
            }
        }
    }
}

/// What an accepted connection holds of its listener's caps; dropped with the connection.
pub struct Permit {
    _cap: OwnedSemaphorePermit,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            r();
        }
    }
}

/// A listener with a connection cap, a cap per source, and accept back-off.
#[derive(Debug)]
pub struct Acceptor<L: Listen = TcpListener> {
    listener: L,
    permits: Arc<Semaphore>,
    cap: usize,
    per_source: usize,
    sources: Arc<Sources<L::Source>>,
    what: &'static str,
    backoff: Duration,
    at_cap_logged: bool,
    /// Connections refused for their source since the last log line about it.
    source_refused: u64,
    source_logged: Option<Instant>,
}

impl<L: Listen> Acceptor<L> {
    /// Bound `listener` to `cap` open connections, `per_source` of them from one source;
    /// `what` names it in logs.
    pub fn new(listener: L, cap: usize, per_source: usize, what: &'static str) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            per_source: per_source.max(1),
            sources: Arc::new(Sources(Mutex::default())),
            what,
            backoff: BACKOFF_MIN,
            at_cap_logged: false,
            source_refused: 0,
            source_logged: None,
        }
    }

    /// Count `src` in, unless it is at its cap.
    fn admit(&mut self, src: L::Source) -> bool {
        let mut m = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(src).or_default();
        if *n >= self.per_source {
            drop(m);
            self.source_refused += 1;
            // One line per minute at most, with the count since the last one.
            if self.source_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                info!(
                    listener = self.what,
                    source = %src,
                    cap = self.per_source,
                    refused = self.source_refused,
                    "source at its connection cap (limits.max_connections_per_source): closing new connections from it"
                );
                self.source_logged = Some(Instant::now());
                self.source_refused = 0;
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.cap - self.permits.available_permits()
    }

    /// The next connection and the permit it holds, or `None` once `cancel` fires.
    pub async fn accept(&mut self, cancel: &CancellationToken) -> Option<(L::Stream, L::Peer, Permit)> {
        loop {
            if self.permits.available_permits() == 0 && !self.at_cap_logged {
                info!(
                    listener = self.what,
                    cap = self.cap,
                    "at the connection cap: new connections wait until one closes"
                );
                self.at_cap_logged = true;
            }
            let permit = tokio::select! {
                _ = cancel.cancelled() => return None,
                p = self.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let r = tokio::select! {
                _ = cancel.cancelled() => return None,
                r = self.listener.accept_one() => r,
            };
            match r {
                Ok((s, peer)) => {
                    self.backoff = BACKOFF_MIN;
                    if self.permits.available_permits() > 0 {
                        self.at_cap_logged = false;
                    }
                    let src = L::source(&peer);
                    if !self.admit(src) {
                        drop(s); // closed at once; its permit goes back below
                        continue;
                    }
                    let sources = self.sources.clone();
                    let release = Box::new(move || sources.release(&src));
                    return Some((s, peer, Permit { _cap: permit, release: Some(release) }));
                }
                Err(e) => {
                    drop(permit);
                    if self.backoff == BACKOFF_MIN || self.backoff == BACKOFF_MAX {
                        warn!(listener = self.what, error = %e, backoff = ?self.backoff, "accept failed; backing off");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// What a gRPC connection is doing, shared by its stream and the request gate.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Requests in progress, including streamed replies still being sent.
    active: AtomicUsize,
    /// Bumped whenever a request ends, so an idle timer knows to start over.
    ended: AtomicUsize,
}

impl ConnState {
    /// Count a request until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }
}

/// A request in progress on a connection.
#[derive(Debug)]
pub struct ActiveGuard(Arc<ConnState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connect info every gRPC request carries (in its extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Addresses, as tonic's own TCP info (`None` on the admin socket).
    pub tcp: Option<tonic::transport::server::TcpConnectInfo>,
    /// On the admin socket: the local user it admitted.
    pub local: Option<Arc<crate::auth::local::LocalPeer>>,
    /// The connection's request count.
    pub state: Arc<ConnState>,
    /// The TLS client certificate's subject Common Name, if one was verified.
    pub client_cn: Option<Arc<str>>,
}

/// A stream whose I/O fails once `cut` is cancelled, or once it has had no request in
/// progress for its idle timeout.
pub struct Cuttable<S = TcpStream> {
    inner: S,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    state: Arc<ConnState>,
    idle: Duration,
    idle_timer: Pin<Box<Sleep>>,
    /// `ConnState::ended` when the timer was last armed, and whether it was idle then.
    armed_at: (usize, bool),
    _permit: Option<Permit>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Cuttable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuttable").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S> Cuttable<S> {
    /// Wrap `inner`; cancelling `cut` ends it, and so do `idle` without requests. The permit
    /// (of the listener's cap) is released with the connection.
    pub fn new(inner: S, cut: CancellationToken, idle: Duration, permit: Option<Permit>) -> Self {
        Self {
            inner,
            cut: Box::pin(cut.cancelled_owned()),
            state: Arc::default(),
            idle,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            armed_at: (0, true),
            _permit: permit,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed by shutdown"));
        }
        // The timer runs from the moment the connection became idle: re-arm it whenever that
        // moment changed (a request started or ended since it was armed).
        let now_state = (self.state.ended.load(Ordering::Acquire), self.state.active.load(Ordering::Acquire) == 0);
        if now_state != self.armed_at {
            self.armed_at = now_state;
            let d = self.idle;
            self.idle_timer.as_mut().reset(Instant::now() + d);
        }
        if self.idle_timer.as_mut().poll(cx).is_ready() {
            if self.armed_at.1 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection closed"));
            }
            let d = self.idle;
            self.idle_timer.as_mut().reset(Instant::now() + d);
            let _ = self.idle_timer.as_mut().poll(cx);
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cuttable<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cuttable<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Cuttable<TcpStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo { tcp: Some(self.inner.connect_info()), local: None, state: self.state.clone(), client_cn: None }
    }
}

impl Cuttable<tokio::net::UnixStream> {
    /// The connect info of an admin-socket connection whose peer `local` was admitted.
    pub fn local_info(&self, local: Arc<crate::auth::local::LocalPeer>) -> ConnInfo {
        ConnInfo { tcp: None, local: Some(local), state: self.state.clone(), client_cn: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (client, s)
    }

    #[tokio::test]
    async fn a_cut_ends_a_pending_read() {
        let (mut client, s) = pair().await;
        let cut = CancellationToken::new();
        let mut c = Cuttable::new(s, cut.clone(), Duration::from_secs(3600), None);
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        let reader = tokio::spawn(async move { c.read(&mut b).await });
        tokio::task::yield_now().await;
        assert!(!reader.is_finished(), "no data: the read waits");
        cut.cancel();
        let e = reader.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_request_in_progress_for_the_timeout() {
        let (_client, s) = pair().await;
        let mut c = Cuttable::new(s, CancellationToken::new(), Duration::from_secs(10), None);
        let state = c.state.clone();
        let busy = state.begin();
        let mut b = [0u8; 1];
        // A request in progress keeps the connection however long it takes.
        assert!(tokio::time::timeout(Duration::from_secs(25), c.read(&mut b)).await.is_err());
        drop(busy);
        let t0 = Instant::now();
        let e = c.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(10), "closed one idle timeout after the last request");
    }

    #[tokio::test]
    async fn the_cap_is_taken_before_accept() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Acceptor::new(l, 1, 1, "test");
        let cancel = CancellationToken::new();
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (_s1, _, p1) = a.accept(&cancel).await.unwrap();
        assert_eq!(a.open(), 1);
        let _c2 = TcpStream::connect(addr).await.unwrap(); // waits in the backlog
        let second = tokio::time::timeout(Duration::from_millis(100), a.accept(&cancel)).await;
        assert!(second.is_err(), "at the cap nothing more is accepted");
        drop(p1);
        let (_s2, _, _p2) = a.accept(&cancel).await.unwrap();
        assert_eq!(a.open(), 1);
    }

    #[tokio::test]
    async fn one_source_is_capped_and_its_slots_come_back() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut a = Acceptor::new(l, 8, 2, "test");
        let cancel = CancellationToken::new();
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (_s1, _, p1) = a.accept(&cancel).await.unwrap();
        let (_s2, _, _p2) = a.accept(&cancel).await.unwrap();
        // The third from 127.0.0.1 is accepted and closed at once, so the peer reads EOF.
        let mut c3 = TcpStream::connect(addr).await.unwrap();
        // From another loopback address, still admitted.
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let _c4 = other.connect(addr).await.unwrap();
        let (_s4, peer, _p4) = a.accept(&cancel).await.unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.2");
        let mut b = [0u8; 1];
        use tokio::io::AsyncReadExt;
        assert_eq!(c3.read(&mut b).await.unwrap(), 0, "the over-cap connection is closed");
        assert_eq!(a.open(), 3);
        drop(p1);
        let _c5 = TcpStream::connect(addr).await.unwrap();
        let (_s5, peer, _p5) = a.accept(&cancel).await.unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.1", "a closed connection gives its source slot back");
    }
}
