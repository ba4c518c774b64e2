//! The data path of the pool: reads, writes and persists of object bytes, and the physical
//! segments leases hand out. They run under the metadata read lock and wait for the durability
//! of what they saw; the one metadata change here is a write into holes, which allocates them
//! first (see [`super::ops`]).

use super::error::ObjError;
use super::layout::BLOCK;
use super::ops::{Segment, end_of, locate, not_found, validate};
use super::{Obj, Pool};

impl Pool {
    /// Read from `offset` into `buf`; returns the bytes read (short at the end of the object).
    /// Holes read as zero.
    pub fn read(&self, ns: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize, ObjError> {
        let key = validate(ns, name)?;
        self.observe(|meta| {
            let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
            let obj = meta.objects[slot as usize].as_ref().expect("live");
            if offset > obj.size {
                return Err(ObjError::range(offset, buf.len() as u64, obj.size, ""));
            }
            let n = (buf.len() as u64).min(obj.size - offset) as usize;
            let mut at = 0usize;
            for seg in segments_of(obj, offset, n as u64) {
                let dst = &mut buf[at..at + seg.len as usize];
                match seg.pool_offset {
                    Some(p) => self.media.read(p, dst),
                    None => dst.fill(0),
                }
                at += seg.len as usize;
            }
            Ok(n)
        })
    }

    /// Write `data` at `offset` (within the current size), allocating holes first. With
    /// `persist`, the bytes are durable when this returns.
    pub fn write(&self, ns: &str, name: &str, offset: u64, data: &[u8], persist: bool) -> Result<(), ObjError> {
        let key = validate(ns, name)?;
        let len = data.len() as u64;
        if self.is_closed() {
            return Err(ObjError::Closed);
        }
        // Allocated already (the common case): copy under the read lock.
        let done = self.observe(|meta| {
            let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
            let obj = meta.objects[slot as usize].as_ref().expect("live");
            let end = end_of(offset, len, obj.size)?;
            if end > obj.size {
                return Err(ObjError::range(offset, len, obj.size, "; resize the object first"));
            }
            if !obj.map.holes(offset / BLOCK, end.div_ceil(BLOCK)).is_empty() {
                return Ok(false);
            }
            self.copy_in(obj, offset, data, persist);
            Ok(true)
        })?;
        if done {
            return if persist { self.storage_ok() } else { Ok(()) };
        }
        let mut meta = self.write_meta_open()?;
        // Re-validate: the object may have changed between the two locks.
        let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
        let size = meta.objects[slot as usize].as_ref().expect("live").size;
        let end = end_of(offset, len, size)?;
        if end > size {
            return Err(ObjError::range(offset, len, size, "; resize the object first"));
        }
        let t = self.fill_holes(&mut meta, slot, ns, name, offset / BLOCK, end.div_ceil(BLOCK))?;
        // The allocation must be durable before the bytes land: blocks above the durable data
        // high-water mark are taken as never written (and not zeroed) after a crash. Waiting
        // with the lock held is safe (the commit leader never takes it), and this path (a write
        // into holes) is not the hot one.
        self.durable(t)?;
        self.copy_in(meta.objects[slot as usize].as_ref().expect("live"), offset, data, persist);
        if persist { self.storage_ok() } else { Ok(()) }
    }

    fn copy_in(&self, obj: &Obj, offset: u64, data: &[u8], persist: bool) {
        let mut at = 0usize;
        for seg in segments_of(obj, offset, data.len() as u64) {
            let p = seg.pool_offset.expect("range was allocated");
            let src = &data[at..at + seg.len as usize];
            if persist {
                self.media.write_flushed(p, src);
            } else {
                self.media.write(p, src);
            }
            at += seg.len as usize;
        }
        if persist {
            self.media.drain();
        }
    }

    /// Make `[offset, offset + len)` durable.
    pub fn persist(&self, ns: &str, name: &str, offset: u64, len: u64) -> Result<(), ObjError> {
        let key = validate(ns, name)?;
        self.observe(|meta| {
            let obj = locate(meta, &key, ns, name, offset, len, "")?;
            for seg in segments_of(obj, offset, len) {
                if let Some(p) = seg.pool_offset {
                    self.media.flush(p, seg.len);
                }
            }
            self.media.drain();
            Ok(())
        })?;
        self.storage_ok()
    }

    /// The physical layout of `[offset, offset + len)`: pool byte ranges and holes, in order.
    pub fn segments(&self, ns: &str, name: &str, offset: u64, len: u64) -> Result<Vec<Segment>, ObjError> {
        let key = validate(ns, name)?;
        self.observe(|meta| Ok(segments_of(locate(meta, &key, ns, name, offset, len, "")?, offset, len)))
    }

    /// [`segments`](Self::segments), then `f` on them while the metadata lock is still held:
    /// no layout change can come between computing the segments and whatever `f` installs
    /// (the lease layer installs keys there). `f` also gets the object's id and layout epoch.
    /// `f` must not call back into the pool.
    pub fn with_segments<R>(
        &self,
        ns: &str,
        name: &str,
        offset: u64,
        len: u64,
        f: impl FnOnce(u64, u64, &[Segment]) -> R,
    ) -> Result<R, ObjError> {
        let key = validate(ns, name)?;
        // Whatever `f` installs is handed out only after the layout it saw is durable.
        self.observe(|meta| {
            let obj = locate(meta, &key, ns, name, offset, len, "; resize the object first")?;
            Ok(f(obj.id, obj.epoch, &segments_of(obj, offset, len)))
        })
    }

    /// Every allocated run of every object: `(pool block, blocks, object id, file block)`,
    /// sorted by pool block. For audits (the lease layer checks its keys against it).
    pub fn owners(&self) -> Vec<(u64, u64, u64, u64)> {
        let meta = self.read_meta();
        let mut v: Vec<(u64, u64, u64, u64)> = meta
            .objects
            .iter()
            .flatten()
            .flat_map(|o| o.map.extents().iter().map(|e| (e.pool_block, e.nblocks as u64, o.id, e.file_block)))
            .collect();
        v.sort_unstable();
        v
    }
}

/// Byte-granular segments of `[offset, offset + len)`, merging physically adjacent pieces.
fn segments_of(obj: &Obj, offset: u64, len: u64) -> Vec<Segment> {
    if len == 0 {
        return Vec::new();
    }
    let end = offset + len;
    let mut out: Vec<Segment> = Vec::new();
    for (fb, n, pb) in obj.map.walk(offset / BLOCK, end.div_ceil(BLOCK)) {
        let lo = (fb * BLOCK).max(offset);
        let hi = ((fb + n) * BLOCK).min(end);
        let pool_offset = pb.map(|p| p * BLOCK + (lo - fb * BLOCK));
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.pool_offset, pool_offset) {
                (Some(a), Some(b)) => a + last.len == b,
                (None, None) => true,
                _ => false,
            };
            if contiguous {
                last.len += hi - lo;
                continue;
            }
        }
        out.push(Segment { offset: lo, len: hi - lo, pool_offset });
    }
    out
}
