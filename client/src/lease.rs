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
}

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
                Ok(LeaseSegment { object_offset: s.object_offset, len: s.length, target })
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

    /// Write and make durable before returning.
    pub async fn write_persist(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_inner(offset, data, true).await
    }

    /// Make `[offset, offset + len)` durable.
    pub async fn flush(&self, offset: u64, len: u64) -> Result<()> {
        let l = &self.inner;
        let _op = l.begin()?;
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
        self.inner.quiesce(Duration::from_secs(30)).await;
        self.inner.release_rpc().await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
    }
}
