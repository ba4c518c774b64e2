//! Leases: direct access to object ranges over the data plane.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use rdax_proto::model::ObjectKey;
use rdax_proto::pb;
use tokio::sync::Notify;

use crate::client::Client;
use crate::dataplane::ConnPool;
use crate::error::{Error, ErrorKind, Result};

/// Memory registered for RDMA on a session's connection: leases move bytes straight between
/// it and pmem ([`Lease::write_buf`], [`Lease::read_buf`]), without the staging copy of
/// [`Lease::write`] and [`Lease::read`]. Operations take the buffer and give it back, so the
/// NIC never touches memory the program is using.
#[cfg(feature = "rdma")]
#[derive(Debug)]
pub struct RdmaBuffer {
    pub(crate) buf: Arc<rdax_verbs::RegBuf>,
}

#[cfg(feature = "rdma")]
impl RdmaBuffer {
    /// Bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: no request uses the buffer: requests take it by value and release their
        // reference before handing it back.
        unsafe { std::slice::from_raw_parts(self.buf.ptr(0), self.buf.len()) }
    }

    /// The contents, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(Arc::get_mut(&mut self.buf).is_some(), "an RDMA buffer with a request in flight");
        // SAFETY: the only reference (checked), so neither the device nor anyone else uses it.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr(0), self.buf.len()) }
    }
}

/// Access mode of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMode {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// One physically contiguous piece of a leased range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSegment {
    /// Offset in the object.
    pub object_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Pool offset and 128-bit key; `None` for a hole (reads as zero).
    pub target: Option<(u64, [u8; 16])>,
    /// RDMA leases: remote address and rkey of the segment (valid on the session's RDMA
    /// connection only, until the lease ends).
    pub rdma: Option<(u64, u32)>,
}

/// Bytes one zero-copy RDMA request moves at most; a longer piece is split.
#[cfg(feature = "rdma")]
const MAX_RDMA_REQUEST: u64 = 16 << 20;

const ACTIVE: u8 = 0;
const RECALLED: u8 = 1;
const ENDED: u8 = 2;

#[derive(Debug)]
pub(crate) struct LeaseInner {
    pub id: u64,
    pub generation: u64,
    pub mode: LeaseMode,
    pub object: ObjectKey,
    pub offset: u64,
    pub len: u64,
    pub segments: Vec<LeaseSegment>,
    pub session_id: String,
    pub client: Client,
    pub conns: Arc<ConnPool>,
    #[cfg(feature = "rdma")]
    pub rdma: Option<Arc<crate::rdma::RdmaLink>>,
    state: AtomicU8,
    inflight: AtomicUsize,
    idle: Notify,
}

/// A granted lease. Renewed automatically while the session lives and the lease is active.
#[derive(Debug)]
pub struct Lease {
    pub(crate) inner: Arc<LeaseInner>,
    renew: tokio::task::JoinHandle<()>,
}

struct OpGuard<'a>(&'a LeaseInner);

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl LeaseInner {
    pub fn from_grant(
        g: pb::LeaseGrant,
        object: ObjectKey,
        offset: u64,
        len: u64,
        session_id: String,
        client: Client,
        conns: Arc<ConnPool>,
    ) -> Result<Self> {
        let mode = if g.mode == pb::LeaseMode::ReadWrite as i32 { LeaseMode::ReadWrite } else { LeaseMode::Read };
        let segments = g
            .segments
            .into_iter()
            .map(|s| {
                let target = if s.key.is_empty() {
                    None
                } else {
                    let k: [u8; 16] = s
                        .key
                        .as_slice()
                        .try_into()
                        .map_err(|_| Error::new(ErrorKind::Protocol, "lease key is not 16 bytes"))?;
                    Some((s.pool_offset, k))
                };
                let rdma = (s.rkey != 0 || s.rdma_addr != 0).then_some((s.rdma_addr, s.rkey));
                Ok(LeaseSegment { object_offset: s.object_offset, len: s.length, target, rdma })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            id: g.lease_id,
            generation: g.generation,
            mode,
            object,
            offset,
            len,
            segments,
            session_id,
            client,
            conns,
            #[cfg(feature = "rdma")]
            rdma: None,
            state: AtomicU8::new(ACTIVE),
            inflight: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    fn begin(&self) -> Result<OpGuard<'_>> {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let g = OpGuard(self);
        match self.state.load(Ordering::Acquire) {
            ACTIVE => Ok(g),
            RECALLED => Err(Error::new(ErrorKind::Revoked, format!("lease {} was recalled", self.id))),
            _ => Err(Error::new(ErrorKind::Revoked, format!("lease {} was released or revoked", self.id))),
        }
    }

    /// Stop new operations and wait (bounded) for in-flight ones.
    pub async fn quiesce(&self, bound: Duration) {
        let _ = self.state.compare_exchange(ACTIVE, RECALLED, Ordering::AcqRel, Ordering::Acquire);
        let wait = async {
            loop {
                let n = self.idle.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if self.inflight.load(Ordering::Acquire) == 0 {
                    return;
                }
                n.await;
            }
        };
        let _ = tokio::time::timeout(bound, wait).await;
    }

    pub fn mark_ended(&self) {
        self.state.store(ENDED, Ordering::Release);
    }

    pub fn is_active(&self) -> bool {
        self.state.load(Ordering::Acquire) == ACTIVE
    }

    /// Return the lease to the server.
    pub async fn release_rpc(&self) -> Result<()> {
        let mut c = self.client.leases.clone();
        let r = c
            .release(self.client.request(pb::ReleaseRequest { session_id: self.session_id.clone(), lease_id: self.id }))
            .await;
        self.mark_ended();
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::FailedPrecondition || s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(s.into()),
        }
    }

    /// The pieces of `[offset, offset + len)`: `(segment, offset within it, bytes)`.
    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<(&LeaseSegment, u64, u64)>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "offset + length overflows"))?;
        if offset < self.offset || end > self.offset + self.len {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("[{offset}, {end}) is outside the lease [{}, {})", self.offset, self.offset + self.len),
            ));
        }
        let mut out = Vec::new();
        for s in &self.segments {
            let (lo, hi) = (s.object_offset.max(offset), (s.object_offset + s.len).min(end));
            if lo < hi {
                out.push((s, lo - s.object_offset, hi - lo));
            }
        }
        Ok(out)
    }
}

impl Lease {
    pub(crate) fn new(inner: Arc<LeaseInner>, ttl: Duration) -> Self {
        let weak = Arc::downgrade(&inner);
        let renew = tokio::spawn(async move {
            let period = (ttl / 3).max(Duration::from_millis(10));
            loop {
                tokio::time::sleep(period).await;
                let Some(l) = weak.upgrade() else { return };
                if !l.is_active() {
                    return;
                }
                let mut c = l.client.leases.clone();
                let req = l.client.request(pb::RenewRequest { session_id: l.session_id.clone(), lease_id: l.id });
                if let Err(s) = c.renew(req).await
                    && matches!(s.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition)
                {
                    l.mark_ended();
                    return;
                }
            }
        });
        Self { inner, renew }
    }

    /// Lease id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Generation.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Mode.
    pub fn mode(&self) -> LeaseMode {
        self.inner.mode
    }

    /// The leased range as physical segments (pool offsets and keys).
    pub fn segments(&self) -> &[LeaseSegment] {
        &self.inner.segments
    }

    /// The leased object range `(offset, length)`.
    pub fn range(&self) -> (u64, u64) {
        (self.inner.offset, self.inner.len)
    }

    /// The object.
    pub fn object(&self) -> &ObjectKey {
        &self.inner.object
    }

    /// Whether new operations are accepted (not recalled, released or revoked).
    pub fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    /// Whether this lease moves bytes by RDMA (else over the TCP data plane).
    pub fn is_rdma(&self) -> bool {
        #[cfg(feature = "rdma")]
        return self.inner.rdma.is_some();
        #[cfg(not(feature = "rdma"))]
        false
    }

    /// Read `len` bytes at object offset `offset` (inside the lease) over the data plane.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        self.read_into(offset, &mut out).await?;
        Ok(out)
    }

    /// Read `buf.len()` bytes at object offset `offset` into `buf` (no allocation).
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let l = &self.inner;
        let _op = l.begin()?;
        #[cfg(feature = "rdma")]
        if let Some(link) = &l.rdma {
            return rdma_io::read(link, l.pieces(offset, buf.len() as u64)?, buf).await;
        }
        let mut at = 0usize;
        for (seg, within, n) in l.pieces(offset, buf.len() as u64)? {
            let dst = &mut buf[at..at + n as usize];
            match seg.target {
                Some((pool, key)) => {
                    for c_off in (0..n as usize).step_by(rdax_proto::dataplane::MAX_OP_LEN as usize) {
                        let m = (n as usize - c_off).min(rdax_proto::dataplane::MAX_OP_LEN as usize);
                        let mut c = l.conns.get().await?;
                        c.read(key, l.generation, pool + within + c_off as u64, &mut dst[c_off..c_off + m]).await?;
                        l.conns.put(c);
                    }
                }
                None => dst.fill(0),
            }
            at += n as usize;
        }
        Ok(())
    }

    async fn write_inner(&self, offset: u64, data: &[u8], persist: bool) -> Result<()> {
        let l = &self.inner;
        let _op = l.begin()?;
        #[cfg(feature = "rdma")]
        if let Some(link) = &l.rdma {
            rdma_io::write(link, l.pieces(offset, data.len() as u64)?, data).await?;
            if persist {
                link.flush(l.id, offset, data.len() as u64).await?;
            }
            return Ok(());
        }
        let mut at = 0usize;
        for (seg, within, n) in l.pieces(offset, data.len() as u64)? {
            let (pool, key) = seg
                .target
                .ok_or_else(|| Error::new(ErrorKind::PermissionDenied, "cannot write to a hole of a read lease"))?;
            for chunk_off in (0..n).step_by(rdax_proto::dataplane::MAX_OP_LEN as usize) {
                let m = (n - chunk_off).min(rdax_proto::dataplane::MAX_OP_LEN as u64) as usize;
                let mut c = l.conns.get().await?;
                let src = &data[at + chunk_off as usize..at + chunk_off as usize + m];
                c.write(key, l.generation, pool + within + chunk_off, src, persist).await?;
                l.conns.put(c);
            }
            at += n as usize;
        }
        Ok(())
    }

    /// Write `data` at object offset `offset` (inside the lease). Not durable until flushed.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_inner(offset, data, false).await
    }

    /// RDMA lease only: write `buf[range]` at object offset `offset` with no copy.
    #[cfg(feature = "rdma")]
    pub async fn write_buf(
        &self,
        offset: u64,
        buf: RdmaBuffer,
        range: std::ops::Range<usize>,
    ) -> (Result<()>, RdmaBuffer) {
        let r = self.zero_copy(true, offset, &buf, range).await;
        (r, buf)
    }

    /// RDMA lease only: read into `buf[range]` from object offset `offset` with no copy.
    #[cfg(feature = "rdma")]
    pub async fn read_buf(
        &self,
        offset: u64,
        buf: RdmaBuffer,
        range: std::ops::Range<usize>,
    ) -> (Result<()>, RdmaBuffer) {
        let r = self.zero_copy(false, offset, &buf, range).await;
        (r, buf)
    }

    #[cfg(feature = "rdma")]
    async fn zero_copy(&self, write: bool, offset: u64, buf: &RdmaBuffer, range: std::ops::Range<usize>) -> Result<()> {
        use futures_util::StreamExt;
        let l = &self.inner;
        let _op = l.begin()?;
        let link = l.rdma.as_ref().ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "not an RDMA lease"))?;
        if range.start > range.end || range.end > buf.len() {
            return Err(Error::new(ErrorKind::InvalidArgument, "range outside the buffer"));
        }
        let pieces = l.pieces(offset, (range.end - range.start) as u64)?;
        // One piece, one request (the common case): no stream to build and drive.
        if let [(seg, within, n)] = pieces.as_slice()
            && let (Some(_), Some((addr, rkey))) = (seg.target, seg.rdma)
            && *n <= MAX_RDMA_REQUEST
        {
            return link.zero_copy(write, addr + within, rkey, &buf.buf, range.start, *n as usize).await;
        }
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut at = range.start;
        for (seg, within, n) in pieces {
            match (seg.target, seg.rdma) {
                (Some(_), Some((addr, rkey))) => {
                    let mut c = 0u64;
                    while c < n {
                        let m = (n - c).min(MAX_RDMA_REQUEST);
                        inflight.push(link.zero_copy(
                            write,
                            addr + within + c,
                            rkey,
                            &buf.buf,
                            at + c as usize,
                            m as usize,
                        ));
                        c += m;
                    }
                }
                (None, _) if !write => {
                    // A hole reads as zeros.
                    // SAFETY: the caller's buffer, not in use by any request for this range.
                    unsafe { std::ptr::write_bytes(buf.buf.ptr(at), 0, n as usize) };
                }
                (None, _) => {
                    return Err(Error::new(ErrorKind::PermissionDenied, "cannot write to a hole of a read lease"));
                }
                (Some(_), None) => {
                    return Err(Error::new(ErrorKind::Protocol, "an RDMA lease segment without an rkey"));
                }
            }
            at += n as usize;
        }
        while let Some(r) = inflight.next().await {
            r?;
        }
        Ok(())
    }

    /// Write and make durable before returning.
    pub async fn write_persist(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_inner(offset, data, true).await
    }

    /// Make `[offset, offset + len)` durable.
    pub async fn flush(&self, offset: u64, len: u64) -> Result<()> {
        let l = &self.inner;
        let _op = l.begin()?;
        #[cfg(feature = "rdma")]
        if let Some(link) = &l.rdma {
            l.pieces(offset, len)?;
            return link.flush(l.id, offset, len).await;
        }
        for (seg, within, n) in l.pieces(offset, len)? {
            if let Some((pool, key)) = seg.target {
                let mut c = l.conns.get().await?;
                c.flush(key, l.generation, pool + within, n).await?;
                l.conns.put(c);
            }
        }
        Ok(())
    }

    /// Return the lease: waits for this handle's in-flight operations first.
    pub async fn release(self) -> Result<()> {
        self.release_shared().await
    }

    /// [`Lease::release`] through a shared handle (an `Arc<Lease>` other tasks or threads
    /// also hold): waits (bounded) for their in-flight operations, then returns the lease.
    /// Later operations on any handle fail with [`ErrorKind::Revoked`]; releasing again is
    /// harmless.
    pub async fn release_shared(&self) -> Result<()> {
        self.inner.quiesce(Duration::from_secs(30)).await;
        self.inner.release_rpc().await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// RDMA READ/WRITE of a lease's pieces, split into staging-buffer chunks and several in flight.
#[cfg(feature = "rdma")]
mod rdma_io {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    use super::LeaseSegment;
    use crate::error::{Error, ErrorKind, Result};
    use crate::rdma::{CHUNK, RdmaLink};

    const IN_FLIGHT: usize = 16;

    /// One RDMA operation: `(remote address and rkey, or None for a hole; offset in the
    /// caller's buffer; bytes)`.
    type Chunk = (Option<(u64, u32)>, usize, usize);

    fn chunks(pieces: Vec<(&LeaseSegment, u64, u64)>) -> Result<Vec<Chunk>> {
        let mut out = Vec::new();
        let mut at = 0usize;
        for (seg, within, n) in pieces {
            let key = match (seg.target, seg.rdma) {
                (None, _) => None,
                (Some(_), Some(k)) => Some(k),
                (Some(_), None) => {
                    return Err(Error::new(ErrorKind::Protocol, "an RDMA lease segment without an rkey"));
                }
            };
            let mut c = 0usize;
            while c < n as usize {
                let m = (n as usize - c).min(CHUNK);
                out.push((key.map(|(a, r)| (a + within + c as u64, r)), at + c, m));
                c += m;
            }
            at += n as usize;
        }
        Ok(out)
    }

    async fn write_one(link: &RdmaLink, key: Option<(u64, u32)>, src: &[u8]) -> Result<()> {
        let (addr, rkey) =
            key.ok_or_else(|| Error::new(ErrorKind::PermissionDenied, "cannot write to a hole of a read lease"))?;
        link.write(addr, rkey, src).await
    }

    async fn read_one(link: &RdmaLink, key: Option<(u64, u32)>, dst: &mut [u8]) -> Result<()> {
        match key {
            Some((addr, rkey)) => link.read(addr, rkey, dst).await,
            None => {
                dst.fill(0);
                Ok(())
            }
        }
    }

    pub(super) async fn write(link: &RdmaLink, pieces: Vec<(&LeaseSegment, u64, u64)>, data: &[u8]) -> Result<()> {
        let cs = chunks(pieces)?;
        if let [(key, 0, m)] = cs[..] {
            return write_one(link, key, &data[..m]).await;
        }
        let mut inflight = FuturesUnordered::new();
        for (key, at, m) in cs {
            if inflight.len() >= IN_FLIGHT
                && let Some(r) = inflight.next().await
            {
                r?;
            }
            inflight.push(write_one(link, key, &data[at..at + m]));
        }
        while let Some(r) = inflight.next().await {
            r?;
        }
        Ok(())
    }

    pub(super) async fn read(link: &RdmaLink, pieces: Vec<(&LeaseSegment, u64, u64)>, buf: &mut [u8]) -> Result<()> {
        let cs = chunks(pieces)?;
        if let [(key, 0, m)] = cs[..] {
            return read_one(link, key, &mut buf[..m]).await;
        }
        let mut inflight = FuturesUnordered::new();
        // Hand each chunk its own disjoint slice of the buffer.
        let mut rest: &mut [u8] = buf;
        let mut pos = 0usize;
        for (key, at, m) in cs {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - pos);
            let (part, tail) = tail.split_at_mut(m);
            rest = tail;
            pos = at + m;
            if inflight.len() >= IN_FLIGHT
                && let Some(r) = inflight.next().await
            {
                r?;
            }
            inflight.push(read_one(link, key, part));
        }
        while let Some(r) = inflight.next().await {
            r?;
        }
        Ok(())
    }
}
