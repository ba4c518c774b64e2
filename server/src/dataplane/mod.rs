//! The rdax TCP data plane: one-sided READ / WRITE / FLUSH on leased pool ranges.
//!
//! A connection starts with HELLO (the session credential, checked by the one HELLO policy in
//! [`crate::dma::hello`]), then carries pipelined operations, answered in order. Every
//! operation is checked against the key table and holds a pin for its whole duration
//! (including the socket copy and any persist), so revocation can wait for it, and a place in
//! the shutdown gate. A malformed frame gets an error response and the connection is closed;
//! nothing else is affected. Every socket wait is bounded by the operation timeout, so a
//! stalled client cannot hold a pin (and with it a layout change) forever. Persisting runs on
//! a blocking thread ([`crate::dma::persist`]), never on the async runtime.
//!
//! With `dataplane.tls` every connection starts with a TLS handshake (the gRPC certificate,
//! ALPN `rdax-data`, TLS 1.3, bounded like gRPC's). Plaintext connections move payloads
//! between the socket and the mapping in the kernel ([`io`]). TLS ones seal and open their own
//! records ([`rdax_proto::tls_record`]), and payloads move with one copy between the mapping and
//! the record. Any other stream (NBD's) passes them through a bounce buffer of at most
//! [`BOUNCE`] bytes per operation.

pub mod io;

use std::sync::Arc;
use std::time::Duration;

use rdax_proto::model::SessionId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::dma::{
    self, BindRequest, BoxFuture, DmaError, HelloRefusal, PersistError, RemoteKey, Transport, TransportKind,
};
use crate::gate::{Gate, Work};
use crate::lease::{KeyTable, Refusal};
use crate::metrics::{DpOp, METRICS};
use crate::pool::media::Media;
use crate::session::SessionManager;
use rdax_proto::dataplane::{self as wire, Op, REQ_LEN, Request, Status};

/// What the data plane needs.
pub struct DataPlane {
    /// Live keys.
    pub keys: Arc<KeyTable>,
    /// Sessions, for HELLO.
    pub sessions: Arc<SessionManager>,
    /// The pool medium.
    pub media: Arc<dyn Media>,
    /// Bound on each socket wait within an operation, in milliseconds (reloadable).
    pub op_timeout_ms: std::sync::atomic::AtomicU64,
    /// A connection with no operation for this long is closed, in milliseconds (reloadable).
    pub idle_timeout_ms: std::sync::atomic::AtomicU64,
    /// Every operation holds a place in it.
    pub gate: Gate,
    /// TLS for every connection (`dataplane.tls`), if on.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// How long a hot connection busy-polls for its next operation (zero: never;
    /// [`crate::busy_poll`]).
    pub busy_poll: Duration,
}

/// Data-plane polls that found an operation (`[0]`) and polls that timed out (`[1]`).
pub static POLLS: crate::busy_poll::Counters =
    [std::sync::atomic::AtomicU64::new(0), std::sync::atomic::AtomicU64::new(0)];

/// The largest bounce buffer one operation on a stream with neither a raw socket nor our
/// record layer (NBD over rustls) uses.
pub const BOUNCE: usize = 1 << 20;

/// A data-plane or NBD connection: plain TCP (payloads copied by the kernel straight between
/// the socket and the mapping), our TLS record layer (one copy between record and mapping), or
/// another TLS stream (NBD's: payloads through a bounce buffer).
pub trait DpStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The socket, when payload bytes may move between it and the mapping directly.
    fn raw(&self) -> Option<&TcpStream>;

    /// Our own TLS record layer, when payload bytes may move between its records and the
    /// mapping directly.
    fn records(&mut self) -> Option<&mut rdax_proto::tls_record::TlsConn> {
        None
    }
}

impl DpStream for TcpStream {
    fn raw(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl DpStream for tokio_rustls::server::TlsStream<crate::tls::DataIo> {
    fn raw(&self) -> Option<&TcpStream> {
        None
    }
}

impl DpStream for rdax_proto::tls_record::TlsConn {
    fn raw(&self) -> Option<&TcpStream> {
        None
    }

    fn records(&mut self) -> Option<&mut rdax_proto::tls_record::TlsConn> {
        Some(self)
    }
}

/// The TCP data plane as a lease transport: its keys are the grant's software keys, which
/// live in the lease manager's key table and die with the lease under the manager's lock, so
/// there is nothing to bind and nothing to invalidate here.
impl Transport for DataPlane {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn check(&self, _session: SessionId) -> Result<(), DmaError> {
        Ok(())
    }

    fn bind(self: Arc<Self>, req: BindRequest) -> BoxFuture<Result<Vec<Option<RemoteKey>>, DmaError>> {
        Box::pin(async move { Ok(vec![None; req.segments.len()]) })
    }

    fn lease_ended(&self, _lease: u64) {}
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").field("op_timeout_ms", &self.op_timeout_ms).finish_non_exhaustive()
    }
}

fn refusal_status(r: Refusal) -> Status {
    METRICS.dp_refused();
    match r {
        Refusal::UnknownKey => Status::UnknownKey,
        // A fenced node is revoking every lease: to the client, the same thing.
        Refusal::Revoked | Refusal::Fenced => Status::Revoked,
        Refusal::WrongSession => Status::WrongSession,
        Refusal::StaleGeneration => Status::StaleGeneration,
        Refusal::OutOfRange => Status::OutOfRange,
        Refusal::Mode => Status::Mode,
    }
}

type Res = std::io::Result<()>;

/// The slowest average rate a payload may move at, beyond the first op timeout (bytes/s).
pub const MIN_RATE: u64 = 1 << 20;

impl DataPlane {
    /// Accept connections until `cancel`, at most `cap` at a time and `per_source` from one
    /// address.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cap: usize,
        per_source: usize,
        cancel: CancellationToken,
    ) {
        let mut acceptor = crate::net::Acceptor::new(listener, cap, per_source, "data plane");
        while let Some((stream, peer, permit)) = acceptor.accept(&cancel).await {
            let dp = self.clone();
            let c = cancel.clone();
            tokio::spawn(
                async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    let r = match dp.tls.clone() {
                        None => dp.connection(stream, c).await,
                        Some(tls) => match tls.accept_data(stream).await {
                            Ok(s) => dp.connection(s, c).await,
                            Err(e) => {
                                info!(error = %e, "data-plane TLS handshake failed");
                                return;
                            }
                        },
                    };
                    match r {
                        Ok(()) => debug!("data-plane connection closed"),
                        Err(e) => info!(error = %e, "data-plane connection ended"),
                    }
                }
                .instrument(info_span!("dataplane", peer = %peer)),
            );
        }
    }

    fn stall(&self) -> Duration {
        Duration::from_millis(self.op_timeout_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A wait for a small, fixed amount of data (a header): bounded by the op timeout.
    async fn bounded<T>(&self, f: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
        tokio::time::timeout(self.stall(), f)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "data-plane operation timed out"))?
    }

    /// A payload transfer of `len` bytes: each socket wait is bounded by the op timeout (inside
    /// `f`), and the whole transfer by the op timeout plus `len` at [`MIN_RATE`], so a peer
    /// that trickles cannot hold a pin for ever, and a slow but steady one is not cut off.
    async fn transfer<T>(
        &self,
        len: usize,
        f: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        let bound = self.stall() + Duration::from_secs_f64(len as f64 / MIN_RATE as f64);
        tokio::time::timeout(bound, f).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "data-plane transfer below the minimum rate")
        })?
    }

    async fn connection<S: DpStream>(&self, mut s: S, cancel: CancellationToken) -> Res {
        let mut hdr = [0u8; REQ_LEN];
        self.bounded(s.read_exact(&mut hdr)).await?;
        let Some(hello) = Request::decode(&hdr) else {
            return reply_close(&mut s, wire::request_id(&hdr), Status::Malformed).await;
        };
        if hello.op != Op::Hello {
            return reply_close(&mut s, hello.id, Status::NoHello).await;
        }
        if hello.offset != 0 || hello.len != 0 {
            // The documented HELLO has these zero; anything else is not one of our clients.
            return reply_close(&mut s, hello.id, Status::Malformed).await;
        }
        if hello.generation != wire::VERSION {
            return reply_close(&mut s, hello.id, Status::Version).await;
        }
        let session = match dma::hello(&self.sessions, &self.gate, hello.key) {
            Ok(s) => s,
            Err(HelloRefusal::BadSession) => return reply_close(&mut s, hello.id, Status::BadSession).await,
            Err(HelloRefusal::ShuttingDown) => return reply_close(&mut s, hello.id, Status::ShuttingDown).await,
        };
        // The connection lives as long as its session (and closes when the session ends).
        let Some(session_ended) = self.sessions.ended_token(session) else {
            return reply_close(&mut s, hello.id, Status::BadSession).await;
        };
        s.write_all(&wire::response(hello.id, Status::Ok, 0)).await?;
        // TLS keeps what the socket did not take yet; push it out before waiting to read.
        self.bounded(s.flush()).await?;
        debug!(session = %session, "data-plane connection bound");
        // TLS payloads pass through this, grown on first use and kept for the connection.
        let mut bounce = Vec::new();
        let mut busy = crate::busy_poll::BusyPoll::new(self.busy_poll, &crate::busy_poll::SHARED, &POLLS);
        loop {
            let idle = Duration::from_millis(self.idle_timeout_ms.load(std::sync::atomic::Ordering::Relaxed));
            // A client whose next operation follows each reply closely: poll for it briefly
            // before parking (bounded; see `crate::busy_poll`). The read below then finds it
            // at once (or the runtime's next look at its events does, without a sleep).
            let since = busy.waiting(1);
            if let Some(_slot) = busy.start()
                && let Some(tcp) = s.raw()
            {
                use std::os::fd::AsFd;
                busy.polled(crate::busy_poll::Polled::of(rdax_proto::busy_poll::until_readable(
                    tcp.as_fd(),
                    busy.window(),
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return reply_close(&mut s, 0, Status::ShuttingDown).await,
                _ = session_ended.cancelled() => return reply_close(&mut s, 0, Status::BadSession).await,
                _ = tokio::time::sleep(idle) => {
                    debug!(idle = ?idle, "idle data-plane connection closed");
                    let _ = s.shutdown().await;
                    return Ok(());
                }
                r = s.read_exact(&mut hdr) => {
                    if let Err(e) = r {
                        return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
                    }
                    busy.woke(since);
                }
            }
            let Some(req) = Request::decode(&hdr) else {
                return reply_close(&mut s, wire::request_id(&hdr), Status::Malformed).await;
            };
            if req.len > wire::MAX_OP_LEN {
                return reply_close(&mut s, req.id, Status::TooLarge).await;
            }
            let Ok(_op) = self.gate.enter(Work::DataOp) else {
                return reply_close(&mut s, req.id, Status::ShuttingDown).await;
            };
            match req.op {
                Op::Hello => return reply_close(&mut s, req.id, Status::Malformed).await,
                Op::Read => self.read(&mut s, session, &req, &mut bounce).await?,
                Op::Write => self.write(&mut s, session, &req, &mut bounce).await?,
                Op::Flush => self.flush(&mut s, session, &req).await?,
            }
            self.bounded(s.flush()).await?;
        }
    }

    async fn read<S: DpStream>(&self, s: &mut S, session: SessionId, r: &Request, bounce: &mut Vec<u8>) -> Res {
        let pin = match self.keys.pin(&r.key, session, r.generation, r.offset, r.len as u64, false) {
            Ok(p) => p,
            Err(e) => return s.write_all(&wire::response(r.id, refusal_status(e), 0)).await,
        };
        s.write_all(&wire::response(r.id, Status::Ok, r.len)).await?;
        let addr = self.media.dma_addr(r.offset, r.len as u64);
        if let (Some(tcp), Some(a)) = (s.raw(), addr) {
            let len = r.len as usize;
            // SAFETY: the range lies inside the key's segment, which is inside the mapping,
            // and `pin` keeps it from being revoked-and-reused until the copy is done.
            let send = unsafe { io::send_exact(tcp, io::PoolAddr(a), len, self.stall()) };
            self.transfer(len, send).await?
        } else if let Some(tls) = s.records() {
            let media = &self.media;
            let send = tls.send_with(r.len as usize, |at, b| media.read(r.offset + at as u64, b));
            self.transfer(r.len as usize, send).await?
        } else {
            let len = r.len as usize;
            let buf = grown(bounce, len);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len());
                self.media.read(r.offset + done as u64, &mut buf[..n]);
                self.transfer(n, s.write_all(&buf[..n])).await?;
                done += n;
            }
        }
        drop(pin);
        METRICS.dp(DpOp::Read, r.len as u64);
        Ok(())
    }

    async fn write<S: DpStream>(&self, s: &mut S, session: SessionId, r: &Request, bounce: &mut Vec<u8>) -> Res {
        let pin = match self.keys.pin(&r.key, session, r.generation, r.offset, r.len as u64, true) {
            Ok(p) => p,
            Err(e) => {
                // Consume the payload so the stream stays in step, then refuse.
                let mut left = r.len as u64;
                let mut sink = vec![0u8; (left as usize).min(1 << 20)];
                while left > 0 {
                    let n = (left as usize).min(sink.len());
                    self.transfer(n, s.read_exact(&mut sink[..n])).await?;
                    left -= n as u64;
                }
                return s.write_all(&wire::response(r.id, refusal_status(e), 0)).await;
            }
        };
        let len = r.len as usize;
        if let (Some(tcp), Some(a)) = (s.raw(), self.media.dma_addr(r.offset, r.len as u64)) {
            // Testing builds copy in two halves with a failpoint between them, so tests can
            // hold a WRITE mid-copy with its pin held (the kernel's `bio_delay` idea).
            let half = if cfg!(feature = "testing") { len / 2 } else { len };
            // SAFETY: as in `read`; the pin covers both halves and anything between them.
            self.transfer(half, unsafe { io::recv_exact(tcp, io::PoolAddr(a), half, self.stall()) }).await?;
            if crate::failpoint!("dataplane.write.mid_copy") {
                return Err(std::io::Error::other("injected failure mid-copy"));
            }
            if half < len {
                let rest = len - half;
                // SAFETY: as above, second half of the same pinned range.
                let recv = unsafe { io::recv_exact(tcp, io::PoolAddr(a + half), rest, self.stall()) };
                self.transfer(rest, recv).await?;
            }
        } else if let Some(tls) = s.records() {
            let media = &self.media;
            let recv = tls.recv_with(len, |at, b| media.write(r.offset + at as u64, b));
            self.transfer(len, recv).await?
        } else {
            let buf = grown(bounce, len);
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len());
                self.transfer(n, s.read_exact(&mut buf[..n])).await?;
                self.media.write(r.offset + done as u64, &buf[..n]);
                done += n;
            }
        }
        if r.flags & wire::FLAG_PERSIST != 0 {
            match dma::persist(&self.media, &self.gate, vec![(r.offset, r.len as u64)], pin).await {
                Ok(()) => {}
                Err(PersistError::Storage(_)) => {
                    return s.write_all(&wire::response(r.id, Status::StorageFailed, 0)).await;
                }
                Err(PersistError::ShuttingDown) => return reply_close(s, r.id, Status::ShuttingDown).await,
            }
        } else {
            drop(pin);
        }
        METRICS.dp(DpOp::Write, r.len as u64);
        s.write_all(&wire::response(r.id, Status::Ok, 0)).await
    }

    async fn flush<S: DpStream>(&self, s: &mut S, session: SessionId, r: &Request) -> Res {
        let status = match self.keys.pin(&r.key, session, r.generation, r.offset, r.len as u64, false) {
            Ok(pin) => match dma::persist(&self.media, &self.gate, vec![(r.offset, r.len as u64)], pin).await {
                Ok(()) => {
                    METRICS.dp(DpOp::Flush, r.len as u64);
                    Status::Ok
                }
                Err(PersistError::Storage(_)) => Status::StorageFailed,
                Err(PersistError::ShuttingDown) => Status::ShuttingDown,
            },
            Err(e) => refusal_status(e),
        };
        s.write_all(&wire::response(r.id, status, 0)).await
    }
}

/// `bounce`, at least `min(len, BOUNCE)` long.
fn grown(bounce: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let want = len.clamp(1, BOUNCE);
    if bounce.len() < want {
        bounce.resize(want, 0);
    }
    &mut bounce[..want]
}

async fn reply_close<S: DpStream>(s: &mut S, id: u32, status: Status) -> Res {
    let _ = s.write_all(&wire::response(id, status, 0)).await;
    let _ = s.shutdown().await;
    Ok(())
}
