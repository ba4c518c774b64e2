//! The rdax TCP data plane: one-sided READ / WRITE / FLUSH on leased pool ranges.
//!
//! A connection starts with HELLO (the session id), then carries pipelined operations,
//! answered in order. Every operation is checked against the key table and holds a pin for its
//! whole duration (including the socket copy), so revocation can wait for it. A malformed
//! frame gets an error response and the connection is closed; nothing else is affected.
//! Every socket wait is bounded by the operation timeout, so a stalled client cannot hold a
//! pin (and with it a layout change) forever.

pub mod io;

use std::sync::Arc;
use std::time::Duration;

use rdax_proto::model::SessionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

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
    /// Test-only fault injection (the kernel's `bio_delay` idea): hold every WRITE this long
    /// halfway through its copy, pin held. Set by `RDAX_TEST_WRITE_DELAY_MS`; never in production.
    pub write_delay: Option<Duration>,
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
        Refusal::Revoked => Status::Revoked,
        Refusal::WrongSession => Status::WrongSession,
        Refusal::StaleGeneration => Status::StaleGeneration,
        Refusal::OutOfRange => Status::OutOfRange,
        Refusal::Mode => Status::Mode,
    }
}

type Res = std::io::Result<()>;

impl DataPlane {
    /// Accept connections until `cancel`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken) {
        if let Some(d) = self.write_delay {
            warn!(delay = ?d, "TEST FAULT INJECTION: every data-plane WRITE is held mid-copy");
        }
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!(error = %e, "data-plane accept failed"); continue; }
                },
            };
            let dp = self.clone();
            let c = cancel.clone();
            tokio::spawn(
                async move {
                    let _ = stream.set_nodelay(true);
                    match dp.connection(stream, c).await {
                        Ok(()) => debug!("data-plane connection closed"),
                        Err(e) => info!(error = %e, "data-plane connection ended"),
                    }
                }
                .instrument(info_span!("dataplane", peer = %peer)),
            );
        }
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
        tokio::time::timeout(Duration::from_millis(self.op_timeout_ms.load(std::sync::atomic::Ordering::Relaxed)), f)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "data-plane operation timed out"))?
    }

    async fn connection(&self, mut s: TcpStream, cancel: CancellationToken) -> Res {
        let mut hdr = [0u8; REQ_LEN];
        self.bounded(s.read_exact(&mut hdr)).await?;
        let Some(hello) = Request::decode(&hdr) else { return reply_close(&mut s, 0, Status::Malformed).await };
        if hello.op != Op::Hello {
            return reply_close(&mut s, hello.id, Status::NoHello).await;
        }
        if hello.generation != wire::VERSION {
            return reply_close(&mut s, hello.id, Status::Version).await;
        }
        let session = SessionId(hello.key);
        if !self.sessions.is_live(session) {
            return reply_close(&mut s, hello.id, Status::BadSession).await;
        }
        s.write_all(&wire::response(hello.id, Status::Ok, 0)).await?;
        debug!(session = %session, "data-plane connection bound");
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return reply_close(&mut s, 0, Status::ShuttingDown).await,
                r = s.read_exact(&mut hdr) => {
                    if let Err(e) = r {
                        return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
                    }
                }
            }
            let Some(req) = Request::decode(&hdr) else { return reply_close(&mut s, 0, Status::Malformed).await };
            if req.len > wire::MAX_OP_LEN {
                return reply_close(&mut s, req.id, Status::TooLarge).await;
            }
            match req.op {
                Op::Hello => return reply_close(&mut s, req.id, Status::Malformed).await,
                Op::Read => self.read(&mut s, session, &req).await?,
                Op::Write => self.write(&mut s, session, &req).await?,
                Op::Flush => self.flush(&mut s, session, &req).await?,
            }
        }
    }

    async fn read(&self, s: &mut TcpStream, session: SessionId, r: &Request) -> Res {
        let pin = match self.keys.pin(&r.key, session, r.generation, r.offset, r.len as u64, false) {
            Ok(p) => p,
            Err(e) => return s.write_all(&wire::response(r.id, refusal_status(e), 0)).await,
        };
        s.write_all(&wire::response(r.id, Status::Ok, r.len)).await?;
        let addr = self.media.dma_addr(r.offset, r.len as u64);
        match addr {
            // SAFETY: the range lies inside the key's segment, which is inside the mapping, and
            // `pin` keeps it from being revoked-and-reused until the copy is done.
            Some(a) => self.bounded(unsafe { io::send_exact(s, io::PoolAddr(a), r.len as usize) }).await?,
            None => {
                let mut buf = vec![0u8; r.len as usize];
                self.media.read(r.offset, &mut buf);
                self.bounded(s.write_all(&buf)).await?;
            }
        }
        drop(pin);
        METRICS.dp(DpOp::Read, r.len as u64);
        Ok(())
    }

    async fn write(&self, s: &mut TcpStream, session: SessionId, r: &Request) -> Res {
        let pin = match self.keys.pin(&r.key, session, r.generation, r.offset, r.len as u64, true) {
            Ok(p) => p,
            Err(e) => {
                // Consume the payload so the stream stays in step, then refuse.
                let mut left = r.len as u64;
                let mut sink = vec![0u8; (left as usize).min(1 << 20)];
                while left > 0 {
                    let n = (left as usize).min(sink.len());
                    self.bounded(s.read_exact(&mut sink[..n])).await?;
                    left -= n as u64;
                }
                return s.write_all(&wire::response(r.id, refusal_status(e), 0)).await;
            }
        };
        let len = r.len as usize;
        match self.media.dma_addr(r.offset, r.len as u64) {
            Some(a) => {
                let half = if self.write_delay.is_some() { len / 2 } else { len };
                // SAFETY: as in `read`; the pin covers both halves and the delay between them.
                self.bounded(unsafe { io::recv_exact(s, io::PoolAddr(a), half) }).await?;
                if let Some(d) = self.write_delay {
                    tokio::time::sleep(d).await;
                    // SAFETY: as above, second half of the same pinned range.
                    self.bounded(unsafe { io::recv_exact(s, io::PoolAddr(a + half), len - half) }).await?;
                }
            }
            None => {
                let mut buf = vec![0u8; len];
                self.bounded(s.read_exact(&mut buf)).await?;
                self.media.write(r.offset, &buf);
            }
        }
        if r.flags & wire::FLAG_PERSIST != 0 {
            self.media.persist(r.offset, r.len as u64);
        }
        drop(pin);
        METRICS.dp(DpOp::Write, r.len as u64);
        s.write_all(&wire::response(r.id, Status::Ok, 0)).await
    }

    async fn flush(&self, s: &mut TcpStream, session: SessionId, r: &Request) -> Res {
        let status = match self.keys.pin(&r.key, session, r.generation, r.offset, r.len as u64, false) {
            Ok(pin) => {
                self.media.persist(r.offset, r.len as u64);
                drop(pin);
                METRICS.dp(DpOp::Flush, r.len as u64);
                Status::Ok
            }
            Err(e) => refusal_status(e),
        };
        s.write_all(&wire::response(r.id, status, 0)).await
    }
}

async fn reply_close(s: &mut TcpStream, id: u32, status: Status) -> Res {
    let _ = s.write_all(&wire::response(id, status, 0)).await;
    let _ = s.shutdown().await;
    Ok(())
}
