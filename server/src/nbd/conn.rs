//! The transmission phase: requests served in order on each connection, replies batched.
//!
//! Each READ and WRITE pins the export's lease for the pieces it touches (the keys of the
//! current [`View`]) until its bytes have moved, so a layout change waits for it, exactly as
//! for the TCP data plane. A pin refused because the lease just ended (recalled for a resize,
//! TRIM or delete) makes the request wait for the next lease and try again, bounded. TRIM
//! and WRITE_ZEROES punch holes through [`LeaseManager::change_layout`] — the same recall
//! path as every other layout change, which recalls this export's own lease too.
//!
//! Errors are answered in step (structured error chunks with a message when structured
//! replies were negotiated); only a request with a bad magic, or a WRITE whose payload is
//! over the maximum (it cannot be skipped safely), closes the connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use super::MAX_PAYLOAD;
use super::export::{Export, Unavailable, View};
use super::io::Io;
use super::negotiate::Negotiated;
use super::wire::{self, cflag, cmd, errno, reply, state};
use crate::busy_poll::BusyPoll;
use crate::dataplane::DpStream;
use crate::gate::{Gate, Work};
use crate::lease::{LeaseError, LeaseManager, PinGuard, Refusal};
use crate::pool::layout::BLOCK;

/// Times a request may find its lease gone and wait for the next one.
const ATTEMPTS: usize = 4;

/// Most extents in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;

/// One failed request: the NBD error and a message for people.
struct Fail(u32, String);

impl From<Unavailable> for Fail {
    fn from(u: Unavailable) -> Self {
        match u {
            Unavailable::Ended(why) => Fail(errno::ESHUTDOWN, format!("the export ended: {why}")),
            Unavailable::Timeout => Fail(errno::EIO, "the volume could not be leased in time".into()),
        }
    }
}

fn lease_fail(e: LeaseError) -> Fail {
    match e {
        LeaseError::ShuttingDown => Fail(errno::ESHUTDOWN, e.to_string()),
        LeaseError::Pool(crate::pool::ObjError::NoSpace { .. }) => Fail(errno::ENOSPC, e.to_string()),
        LeaseError::Pool(crate::pool::ObjError::AllocCap { .. }) | LeaseError::Limit { .. } => {
            Fail(errno::ENOSPC, e.to_string())
        }
        other => Fail(errno::EIO, other.to_string()),
    }
}

/// A request's pieces, pinned: `(volume offset, length, pool offset if allocated)`.
struct Pinned {
    pieces: Vec<(u64, u64, Option<u64>)>,
    _pins: Vec<PinGuard>,
}

/// What the transmission loop needs besides the connection.
pub(super) struct Served<'a> {
    pub n: Negotiated,
    pub gate: &'a Gate,
    pub wait: Duration,
    pub idle: Duration,
    pub cancel: &'a tokio_util::sync::CancellationToken,
    /// Busy polling for the next request.
    pub busy: BusyPoll<'a>,
}

impl Served<'_> {
    fn export(&self) -> &Arc<Export> {
        &self.n.attached.export
    }

    /// Serve requests until DISC, EOF, an unrecoverable error, a forced disconnect or shutdown.
    pub async fn run<S: DpStream>(&mut self, io: &mut Io<S>) -> std::io::Result<()> {
        let ex = self.export().clone();
        let mut hdr = [0u8; wire::REQUEST_LEN];
        // One idle timer for the connection, pushed out lazily: requests only note the time.
        let mut last = tokio::time::Instant::now();
        // Requests served since the connection last waited for one (busy polling's cue).
        let mut served = 0u64;
        let idle = tokio::time::sleep(self.idle);
        tokio::pin!(idle);
        loop {
            if io.buffered() < wire::REQUEST_LEN {
                // Nothing more to answer without waiting: send the replies, then wait.
                io.write_out().await?;
                // A client that sends its next request right after each reply: poll for it
                // briefly before parking (bounded; see `crate::busy_poll`). What the poll buffered is
                // taken by `fill_to` below at once; an EOF or error it met, likewise.
                let since = self.busy.waiting(std::mem::take(&mut served));
                if let Some(_slot) = self.busy.start()
                    && let Some(how) = io.poll_fill(self.busy.window())
                {
                    self.busy.polled(how);
                }
                tokio::select! {
                    biased;
                    r = io.fill_to(wire::REQUEST_LEN) => match r {
                        Ok(()) => self.busy.woke(since),
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e),
                    },
                    _ = ex.disconnect.cancelled() => {
                        info!("NBD client disconnected: the volume is being deleted or its export ended");
                        return close(io).await;
                    }
                    _ = self.cancel.cancelled() => return close(io).await,
                    _ = &mut idle => {
                        if last.elapsed() >= self.idle {
                            debug!(idle = ?self.idle, "idle NBD connection closed");
                            return close(io).await;
                        }
                        idle.as_mut().reset(last + self.idle);
                        continue;
                    }
                }
            } else if ex.disconnect.is_cancelled() || self.cancel.is_cancelled() {
                return close(io).await;
            }
            io.take(&mut hdr);
            served += 1;
            last = tokio::time::Instant::now();
            let Some(req) = wire::Request::decode(&hdr) else {
                info!("NBD request with a bad magic; closing the connection");
                return close(io).await;
            };
            tracing::trace!(kind = req.kind, flags = req.flags, offset = req.offset, len = req.len, "NBD request");
            let Ok(_op) = self.gate.enter(Work::DataOp) else {
                if req.kind == cmd::WRITE && req.len <= MAX_PAYLOAD {
                    io.skip(req.len as usize).await?;
                }
                self.error(io, &req, Fail(errno::ESHUTDOWN, "rdaxd is shutting down".into()));
                return close(io).await;
            };
            if req.flags & !cflag::KNOWN != 0 {
                if req.kind == cmd::WRITE && req.len <= MAX_PAYLOAD {
                    io.skip(req.len as usize).await?;
                }
                self.error(io, &req, Fail(errno::EINVAL, format!("unknown command flags {:#x}", req.flags)));
                continue;
            }
            let r = match req.kind {
                cmd::READ => self.read(io, &req).await?,
                cmd::WRITE => {
                    if req.len > MAX_PAYLOAD {
                        let m = format!("a write of {} bytes; at most {MAX_PAYLOAD}", req.len);
                        self.error(io, &req, Fail(errno::EOVERFLOW, m));
                        info!(len = req.len, "NBD write over the maximum payload; closing the connection");
                        return close(io).await;
                    }
                    self.write(io, &req).await?
                }
                cmd::DISC => {
                    debug!("NBD client disconnected");
                    return close(io).await;
                }
                cmd::FLUSH => ex.flush().await.map_err(|e| Fail(errno::EIO, format!("persist failed: {e}"))),
                cmd::TRIM => self.trim(&req, false).await,
                cmd::WRITE_ZEROES if req.flags & cflag::NO_HOLE != 0 => self.write_zeroes(&req).await,
                cmd::WRITE_ZEROES => self.trim(&req, true).await,
                cmd::BLOCK_STATUS => self.block_status(io, &req).await,
                other => Err(Fail(errno::EINVAL, format!("unknown command {other}"))),
            };
            let cmd = match req.kind {
                cmd::READ => 0,
                cmd::WRITE => 1,
                cmd::FLUSH => 2,
                cmd::TRIM => 3,
                cmd::WRITE_ZEROES => 4,
                cmd::BLOCK_STATUS => 5,
                _ => usize::MAX,
            };
            crate::metrics::METRICS.nbd(cmd, if r.is_ok() { req.len as u64 } else { 0 }, r.is_ok());
            match r {
                // READ, WRITE and BLOCK_STATUS answered themselves (their replies carry data
                // or must follow the payload).
                Ok(()) if matches!(req.kind, cmd::FLUSH | cmd::TRIM | cmd::WRITE_ZEROES) => self.ok(io, &req),
                Ok(()) => {}
                Err(f) => self.error(io, &req, f),
            }
            io.maybe_write_out().await?;
        }
    }

    /// Answer `req` with success and no payload.
    fn ok(&self, io: &mut Io<impl DpStream>, req: &wire::Request) {
        if self.n.structured {
            wire::chunk_header(&mut io.out, reply::FLAG_DONE, reply::NONE, req.cookie, 0);
        } else {
            wire::simple_reply(&mut io.out, 0, req.cookie);
        }
    }

    fn error(&self, io: &mut Io<impl DpStream>, req: &wire::Request, f: Fail) {
        debug!(kind = req.kind, offset = req.offset, len = req.len, error = f.0, msg = %f.1, "NBD request failed");
        if self.n.structured {
            wire::error_chunk(&mut io.out, req.cookie, f.0, &f.1);
        } else {
            wire::simple_reply(&mut io.out, f.0, req.cookie);
        }
    }

    /// `req`'s range, checked against the announced size.
    fn range(&self, req: &wire::Request) -> Result<(u64, u64), Fail> {
        let end = req.offset.checked_add(req.len as u64).filter(|&e| e <= self.n.size).ok_or_else(|| {
            Fail(
                errno::EINVAL,
                format!("{} bytes at {} runs past the end ({} bytes)", req.len, req.offset, self.n.size),
            )
        })?;
        Ok((req.offset, end))
    }

    /// Pin `[lo, hi)` under the current lease; with `write`, fill its holes first. Each fill
    /// makes progress (a hole fewer), so only the times the lease itself ended are counted.
    async fn pin(&self, lo: u64, hi: u64, write: bool) -> Result<Pinned, Fail> {
        let ex = self.export();
        let mut view = ex.view(self.wait).await?;
        let mut gone = 0;
        while gone < ATTEMPTS {
            if hi > view.size {
                let m =
                    format!("the volume is now {} bytes (it was resized); reconnect to see the new size", view.size);
                return Err(Fail(errno::EIO, m));
            }
            match self.try_pin(&view, lo, hi, write) {
                Ok(p) => return Ok(p),
                Err(PinErr::Hole(at)) => match ex.fill(&view, at).await {
                    Ok(v) => view = v,
                    Err(LeaseError::NotActive(_) | LeaseError::NotFound(_)) => {
                        gone += 1;
                        view = ex.changed_from(&view, self.wait).await?;
                    }
                    Err(e) => return Err(lease_fail(e)),
                },
                Err(PinErr::Gone) => {
                    gone += 1;
                    view = ex.changed_from(&view, self.wait).await?;
                }
                Err(PinErr::Mode) => return Err(Fail(errno::EPERM, "the export is read-only".into())),
            }
        }
        Err(Fail(errno::EIO, "the volume's lease kept changing; try again".into()))
    }

    fn try_pin(&self, view: &Arc<View>, lo: u64, hi: u64, write: bool) -> Result<Pinned, PinErr> {
        let ex = self.export();
        let mut pieces = Vec::new();
        let mut pins = Vec::new();
        let mut i = view.find(lo);
        let mut at = lo;
        while at < hi {
            let s = &view.segs[i];
            let end = hi.min(s.off + s.len);
            match s.target {
                Some((pool, key)) => {
                    let p = pool + (at - s.off);
                    pins.push(ex.pin(view, &key, p, end - at, write).map_err(|r| match r {
                        Refusal::Mode => PinErr::Mode,
                        _ => PinErr::Gone,
                    })?);
                    pieces.push((at, end - at, Some(p)));
                }
                None if write => return Err(PinErr::Hole(at)),
                None => pieces.push((at, end - at, None)),
            }
            at = end;
            i += 1;
        }
        Ok(Pinned { pieces, _pins: pins })
    }

    async fn read<S: DpStream>(&self, io: &mut Io<S>, req: &wire::Request) -> std::io::Result<Result<(), Fail>> {
        if req.len > MAX_PAYLOAD || req.len == 0 {
            return Ok(Err(Fail(errno::EINVAL, format!("a read of {} bytes; 1 to {MAX_PAYLOAD}", req.len))));
        }
        let (lo, hi) = match self.range(req) {
            Ok(r) => r,
            Err(f) => return Ok(Err(f)),
        };
        let p = match self.pin(lo, hi, false).await {
            Ok(p) => p,
            Err(f) => return Ok(Err(f)),
        };
        let media = self.export().media().clone();
        let fragment = self.n.structured && req.flags & cflag::DF == 0;
        if !self.n.structured {
            wire::simple_reply(&mut io.out, 0, req.cookie);
        } else if !fragment {
            wire::chunk_header(&mut io.out, reply::FLAG_DONE, reply::OFFSET_DATA, req.cookie, 8 + req.len);
            io.out.extend_from_slice(&lo.to_be_bytes());
        }
        let last = p.pieces.len().saturating_sub(1);
        for (i, &(off, len, pool)) in p.pieces.iter().enumerate() {
            let done = if i == last { reply::FLAG_DONE } else { 0 };
            match pool {
                Some(pool) => {
                    if fragment {
                        wire::chunk_header(&mut io.out, done, reply::OFFSET_DATA, req.cookie, 8 + len as u32);
                        io.out.extend_from_slice(&off.to_be_bytes());
                    }
                    io.send_from_pool(media.as_ref(), pool, len as usize).await?;
                }
                None if fragment => {
                    wire::chunk_header(&mut io.out, done, reply::OFFSET_HOLE, req.cookie, 12);
                    io.out.extend_from_slice(&off.to_be_bytes());
                    io.out.extend_from_slice(&(len as u32).to_be_bytes());
                }
                None => io.send_zeroes(len as usize).await?,
            }
        }
        Ok(Ok(()))
    }

    async fn write<S: DpStream>(&self, io: &mut Io<S>, req: &wire::Request) -> std::io::Result<Result<(), Fail>> {
        let checked = async {
            if !self.n.writable {
                return Err(Fail(errno::EPERM, "the export is read-only".into()));
            }
            let (lo, hi) = self.range(req)?;
            self.pin(lo, hi, true).await
        };
        let p = match checked.await {
            Ok(p) => p,
            // Consume the payload so the stream stays in step, then refuse.
            Err(f) => return io.skip(req.len as usize).await.map(|()| Err(f)),
        };
        let ex = self.export();
        let media = ex.media().clone();
        let mut ranges = Vec::with_capacity(p.pieces.len());
        for &(_, len, pool) in &p.pieces {
            let pool = pool.expect("write pieces are filled");
            io.recv_to_pool(media.as_ref(), pool, len as usize).await?;
            ex.dirty(pool, len);
            ranges.push((pool, len));
        }
        if req.flags & cflag::FUA != 0
            && let Err(e) = ex.persist(ranges).await
        {
            return Ok(Err(Fail(errno::EIO, format!("persist failed: {e}"))));
        }
        drop(p);
        self.ok(io, req);
        Ok(Ok(()))
    }

    /// WRITE_ZEROES with NO_HOLE: zeroes written into allocated blocks.
    async fn write_zeroes(&self, req: &wire::Request) -> Result<(), Fail> {
        if !self.n.writable {
            return Err(Fail(errno::EPERM, "the export is read-only".into()));
        }
        let (lo, hi) = self.range(req)?;
        let ex = self.export();
        let media = ex.media().clone();
        // In pieces of at most the maximum payload, so one request holds pins briefly.
        let mut at = lo;
        while at < hi {
            let end = hi.min(at + MAX_PAYLOAD as u64);
            let p = self.pin(at, end, true).await?;
            let mut ranges = Vec::new();
            for &(_, len, pool) in &p.pieces {
                let pool = pool.expect("write pieces are filled");
                media.fill(pool, len, 0);
                ex.dirty(pool, len);
                ranges.push((pool, len));
            }
            if req.flags & cflag::FUA != 0 {
                ex.persist(ranges).await.map_err(|e| Fail(errno::EIO, format!("persist failed: {e}")))?;
            }
            at = end;
        }
        Ok(())
    }

    /// TRIM (whole blocks inside the range are freed; the rest is left) or WRITE_ZEROES
    /// (whole blocks freed, partial ones zeroed): a punch through the recall path.
    async fn trim(&self, req: &wire::Request, zero: bool) -> Result<(), Fail> {
        if !self.n.writable {
            return Err(Fail(errno::EPERM, "the export is read-only".into()));
        }
        let (lo, hi) = self.range(req)?;
        let (lo, hi) = if zero { (lo, hi) } else { (lo.div_ceil(BLOCK) * BLOCK, hi / BLOCK * BLOCK) };
        if lo >= hi {
            return Ok(()); // TRIM is a hint; nothing whole to free
        }
        let ex = self.export();
        let key = ex.key.clone();
        let k = key.clone();
        let why = if zero { "NBD WRITE_ZEROES punches a hole" } else { "NBD TRIM punches a hole" };
        punch(ex.leases(), key, lo, hi, why, move |p| p.punch_hole(&k.namespace, &k.name, lo, hi - lo))
            .await
            .map_err(lease_fail)
    }

    async fn block_status<S: DpStream>(&self, io: &mut Io<S>, req: &wire::Request) -> Result<(), Fail> {
        if !self.n.meta {
            return Err(Fail(errno::EINVAL, "no metadata context was selected (base:allocation)".into()));
        }
        let (lo, hi) = self.range(req)?;
        if lo == hi {
            return Err(Fail(errno::EINVAL, "BLOCK_STATUS of zero bytes".into()));
        }
        let view = self.export().view(self.wait).await?;
        let hi = hi.min(view.size);
        let mut extents: Vec<(u64, u32)> = Vec::new();
        let mut i = view.find(lo);
        let mut at = lo;
        while at < hi && i < view.segs.len() {
            let s = &view.segs[i];
            let end = hi.min(s.off + s.len);
            let flags = if s.target.is_some() { 0 } else { state::HOLE | state::ZERO };
            match extents.last_mut() {
                Some(last) if last.1 == flags => last.0 += end - at,
                _ => extents.push((end - at, flags)),
            }
            at = end;
            i += 1;
        }
        // Lengths are 32 bits: split long extents at a block boundary below 4 GiB.
        let max = (u32::MAX as u64 / BLOCK) * BLOCK;
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (len, flags) in extents {
            let mut left = len;
            while left > 0 && out.len() < MAX_EXTENTS {
                let n = left.min(max);
                out.push((n as u32, flags));
                left -= n;
            }
        }
        if req.flags & cflag::REQ_ONE != 0 {
            out.truncate(1);
        }
        if out.is_empty() {
            let m = format!("the volume is now {} bytes (it was resized); reconnect to see the new size", view.size);
            return Err(Fail(errno::EIO, m));
        }
        wire::chunk_header(&mut io.out, reply::FLAG_DONE, reply::BLOCK_STATUS, req.cookie, 4 + 8 * out.len() as u32);
        io.out.extend_from_slice(&wire::BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in out {
            io.out.extend_from_slice(&len.to_be_bytes());
            io.out.extend_from_slice(&flags.to_be_bytes());
        }
        Ok(())
    }
}

enum PinErr {
    /// A write landed in a hole at this offset.
    Hole(u64),
    /// The lease ended.
    Gone,
    /// A write under a read-only lease.
    Mode,
}

async fn punch(
    leases: &Arc<LeaseManager>,
    key: rdax_proto::model::ObjectKey,
    lo: u64,
    hi: u64,
    why: &'static str,
    f: impl FnOnce(&crate::pool::Pool) -> Result<(), crate::pool::ObjError> + Send + 'static,
) -> Result<(), LeaseError> {
    leases.change_layout(key, lo, hi, why, f).await
}

/// Send what is buffered, then close the connection.
async fn close<S: DpStream>(io: &mut Io<S>) -> std::io::Result<()> {
    let _ = io.write_out().await;
    let _ = io.s.shutdown().await;
    Ok(())
}
