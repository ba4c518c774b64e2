//! Object operations. Each one validates everything first (so a refused operation leaves the
//! pool as it was), then, under the metadata write lock, changes DRAM and queues exactly one
//! journal transaction (allocation may queue several, see [`Pool::allocate`]); it returns once
//! that transaction is durable (group commit, see [`super::group`]). Only a storage failure
//! can fail an operation after that point, and it stops the pool (see
//! [`Pool::storage_failed`]).
//!
//! Readers wait for the durability of what they saw ([`Pool::seen`]): nobody acts on a change
//! a crash could still take back.

use super::alloc::Run;
use super::error::{ObjError, validate_name, validate_ns};
use super::extmap::{Ext, ExtentMap, Removal};
use super::journal::{Journal, Txn};
use super::layout::{BLOCK, EXT_SLOT, ExtSlot, FLAG_VIRGIN_ZERO, Geometry, OBJ_FLAG_VOLUME, OBJ_SLOT, ObjSlot};
use super::{Meta, Obj, Pool, lock, name_key, now_ns};

/// Largest object size (keeps every byte-offset computation far from overflow).
pub const MAX_OBJECT_SIZE: u64 = 1 << 60;

/// Allocations larger than this zero their blocks without holding the metadata lock.
const ZERO_UNLOCKED_ABOVE: u64 = 16 << 20;

/// What `stat` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectStat {
    /// Object id (unique in the pool, never reused).
    pub id: u64,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Bytes backed by pool blocks (holes are not).
    pub allocated_bytes: u64,
    /// Physically contiguous pieces.
    pub extents: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// A block volume (fixed size, exported over NBD).
    pub volume: bool,
}

/// One page of a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListPage {
    /// Objects, ordered by name.
    pub objects: Vec<ObjectStat>,
    /// Pass as `after` to get the next page; `None` at the end.
    pub next: Option<String>,
}

/// A piece of an object range: backed by `[pool_offset, +len)` of the pool, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Segment {
    /// Offset within the object.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Byte offset in the pool, `None` for a hole (reads as zero).
    pub pool_offset: Option<u64>,
}

pub(super) fn validate(ns: &str, name: &str) -> Result<Box<[u8]>, ObjError> {
    validate_ns(ns)?;
    validate_name(name)?;
    Ok(name_key(ns.as_bytes(), name.as_bytes()))
}

pub(super) fn not_found(ns: &str, name: &str) -> ObjError {
    ObjError::NotFound { ns: ns.into(), name: name.into() }
}

pub(super) fn end_of(offset: u64, len: u64, size: u64) -> Result<u64, ObjError> {
    offset.checked_add(len).ok_or_else(|| ObjError::range(offset, len, size, ": offset + length overflows"))
}

/// The live object `key` names, if `[offset, offset + len)` lies within it (`hint` ends the
/// out-of-range message).
pub(super) fn locate<'m>(
    meta: &'m Meta,
    key: &[u8],
    ns: &str,
    name: &str,
    offset: u64,
    len: u64,
    hint: &'static str,
) -> Result<&'m Obj, ObjError> {
    let slot = meta.lookup(key).ok_or_else(|| not_found(ns, name))?;
    let obj = meta.objects[slot as usize].as_ref().expect("live");
    if end_of(offset, len, obj.size)? > obj.size {
        return Err(ObjError::range(offset, len, obj.size, hint));
    }
    Ok(obj)
}

impl Meta {
    fn ext_slots_available(&self, geo: &Geometry) -> u64 {
        self.free_ext.len() as u64 + (geo.exttab_slots - self.hdr.ext_hwm)
    }

    fn take_ext_slot(&mut self) -> u32 {
        self.free_ext.pop().unwrap_or_else(|| {
            self.hdr.ext_hwm += 1;
            (self.hdr.ext_hwm - 1) as u32
        })
    }

    pub(super) fn lookup(&self, key: &[u8]) -> Option<u32> {
        self.names.get(key).copied()
    }
}

fn put_ext(txn: &mut Txn, geo: &Geometry, owner: u64, e: &Ext) {
    let rec = ExtSlot { owner, file_block: e.file_block, pool_block: e.pool_block, nblocks: e.nblocks };
    txn.write(geo.ext_slot_off(e.slot as u64), &rec.encode(e.slot as u64));
}

fn put_obj(txn: &mut Txn, geo: &Geometry, slot: u32, o: &Obj, ns: &str, name: &str) {
    let rec = ObjSlot {
        id: o.id,
        size: o.size,
        created_ns: o.created_ns,
        flags: o.flags,
        ns: ns.as_bytes().to_vec(),
        name: name.as_bytes().to_vec(),
    };
    txn.write(geo.obj_slot_off(slot as u64), &rec.encode(slot as u64));
}

fn stat_of(o: &Obj, ns: &str, name: &str) -> ObjectStat {
    ObjectStat {
        id: o.id,
        namespace: ns.into(),
        name: name.into(),
        size: o.size,
        allocated_bytes: o.map.allocated_blocks() * BLOCK,
        extents: o.map.len() as u64,
        created_ns: o.created_ns,
        volume: o.flags & OBJ_FLAG_VOLUME != 0,
    }
}

impl Pool {
    /// Queue `txn` for the next group commit and return its ticket; the caller holds the
    /// metadata write lock (`_meta`), has already changed DRAM, and calls [`Pool::durable`]
    /// with the ticket once it has dropped the lock. Every operation bounds its transaction
    /// before building it (max extents per object and the allocation batch are derived from
    /// the journal size), so it always fits.
    fn commit(&self, _meta: &mut Meta, txn: Txn) -> u64 {
        if self.commit_inline { self.group.commit_now(self.media.as_ref(), txn) } else { self.group.enqueue(txn) }
    }

    /// Wait until `ticket` is durable. Fails only when the storage reported an error while
    /// persisting it; then the pool refuses every further change.
    pub(super) fn durable(&self, ticket: u64) -> Result<(), ObjError> {
        self.group.wait(self.media.as_ref(), ticket);
        self.storage_ok()
    }

    /// The ticket that covers every change visible now (read it under the metadata lock).
    fn seen(&self) -> u64 {
        self.group.queued()
    }

    /// Wait until what a reader saw (`ticket`, from [`Pool::seen`]) is durable. Reads keep
    /// working after a storage failure, so this does not report one.
    fn settle(&self, ticket: u64) {
        self.group.wait(self.media.as_ref(), ticket);
    }

    /// Run `f` under the metadata read lock, then wait until what it saw is durable.
    pub(super) fn observe<R>(&self, f: impl FnOnce(&Meta) -> R) -> R {
        let meta = self.read_meta();
        let seen = self.seen();
        let r = f(&meta);
        drop(meta);
        self.settle(seen);
        r
    }

    fn put_hdr(&self, txn: &mut Txn, meta: &Meta) {
        txn.write(self.sb.geo.meta_off, &meta.hdr.encode());
    }

    /// Create an empty (sparse) object of `size` bytes.
    pub fn create_object(&self, ns: &str, name: &str, size: u64) -> Result<ObjectStat, ObjError> {
        self.create_object_flags(ns, name, size, 0)
    }

    /// Create an empty (sparse) block volume of `size` bytes, a multiple of the block size.
    pub fn create_volume(&self, ns: &str, name: &str, size: u64) -> Result<ObjectStat, ObjError> {
        if size == 0 || !size.is_multiple_of(BLOCK) {
            return Err(ObjError::InvalidArgument("a volume's size must be a non-zero multiple of 4 KiB"));
        }
        self.create_object_flags(ns, name, size, OBJ_FLAG_VOLUME)
    }

    fn create_object_flags(&self, ns: &str, name: &str, size: u64, flags: u8) -> Result<ObjectStat, ObjError> {
        let key = validate(ns, name)?;
        if size > MAX_OBJECT_SIZE {
            return Err(ObjError::InvalidArgument("size larger than 2^60 bytes"));
        }
        let geo = &self.sb.geo;
        let mut meta = self.write_meta_open()?;
        if meta.names.contains_key(&key) {
            return Err(ObjError::AlreadyExists { ns: ns.into(), name: name.into() });
        }
        if meta.free_obj.is_empty() && meta.hdr.obj_hwm >= geo.objtab_slots {
            return Err(ObjError::TooManyObjects { max: geo.objtab_slots });
        }
        let slot = meta.free_obj.pop().unwrap_or_else(|| {
            meta.hdr.obj_hwm += 1;
            meta.objects.push(None);
            (meta.hdr.obj_hwm - 1) as u32
        });
        let obj =
            Obj { id: meta.hdr.next_object_id, size, created_ns: now_ns(), flags, map: ExtentMap::default(), epoch: 0 };
        meta.hdr.next_object_id += 1;
        let mut txn = Txn::new();
        put_obj(&mut txn, geo, slot, &obj, ns, name);
        self.put_hdr(&mut txn, &meta);
        let t = self.commit(&mut meta, txn);
        let st = stat_of(&obj, ns, name);
        meta.objects[slot as usize] = Some(obj);
        meta.names.insert(key, slot);
        drop(meta);
        self.durable(t)?;
        Ok(st)
    }

    /// Describe an object.
    pub fn stat(&self, ns: &str, name: &str) -> Result<ObjectStat, ObjError> {
        let key = validate(ns, name)?;
        self.observe(|meta| {
            let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
            Ok(stat_of(meta.objects[slot as usize].as_ref().expect("indexed slot is live"), ns, name))
        })
    }

    /// Up to `limit` block volumes of every namespace, in name order (the NBD export list).
    /// A scan over every object: volumes are few, and this runs once per `NBD_OPT_LIST`.
    pub fn volumes(&self, limit: usize) -> Vec<ObjectStat> {
        let meta = self.read_meta();
        let mut out = Vec::new();
        for (k, &slot) in &meta.names {
            let o = meta.objects[slot as usize].as_ref().expect("live");
            if o.flags & OBJ_FLAG_VOLUME == 0 {
                continue;
            }
            if out.len() == limit {
                break;
            }
            let Some(z) = k.iter().position(|&b| b == 0) else { continue };
            let (ns, name) = (String::from_utf8_lossy(&k[..z]), String::from_utf8_lossy(&k[z + 1..]));
            out.push(stat_of(o, &ns, &name));
        }
        let seen = self.seen();
        drop(meta);
        self.settle(seen);
        out
    }

    /// Up to `limit` objects of every namespace for which `keep(namespace, name)` holds, in
    /// (namespace, name) order, strictly after `after`; and whether more may follow. A scan
    /// (a cluster repair's listing of one PG).
    pub fn scan(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
        keep: impl Fn(&str, &str) -> bool,
    ) -> (Vec<ObjectStat>, bool) {
        let lo = match after {
            Some((ns, name)) => {
                let mut k = name_key(ns.as_bytes(), name.as_bytes()).into_vec();
                k.push(0); // strictly after
                std::ops::Bound::Included(k)
            }
            None => std::ops::Bound::Unbounded,
        };
        let meta = self.read_meta();
        let mut out = Vec::new();
        let mut more = false;
        for (k, &slot) in meta.names.range::<[u8], _>((lo.as_ref().map(|k| &k[..]), std::ops::Bound::Unbounded)) {
            let Some(z) = k.iter().position(|&b| b == 0) else { continue };
            let (ns, name) = (String::from_utf8_lossy(&k[..z]), String::from_utf8_lossy(&k[z + 1..]));
            if !keep(&ns, &name) {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(stat_of(meta.objects[slot as usize].as_ref().expect("live"), &ns, &name));
        }
        let seen = self.seen();
        drop(meta);
        self.settle(seen);
        (out, more)
    }

    /// List up to `limit` objects of namespace `ns` whose names sort after `after`.
    pub fn list(&self, ns: &str, after: Option<&str>, limit: usize) -> Result<ListPage, ObjError> {
        validate_ns(ns)?;
        if limit == 0 {
            return Err(ObjError::InvalidArgument("list limit must be at least 1"));
        }
        let lo = match after {
            Some(a) => {
                let mut k = name_key(ns.as_bytes(), a.as_bytes()).into_vec();
                k.push(0); // strictly after `a`
                k
            }
            None => name_key(ns.as_bytes(), b"").into_vec(),
        };
        let mut hi = ns.as_bytes().to_vec();
        hi.push(1); // every key of `ns` starts with `ns \0`
        let meta = self.read_meta();
        let mut objects = Vec::new();
        let mut more = false;
        for (k, &slot) in
            meta.names.range::<[u8], _>((std::ops::Bound::Included(&lo[..]), std::ops::Bound::Excluded(&hi[..])))
        {
            if objects.len() == limit {
                more = true;
                break;
            }
            let name = String::from_utf8_lossy(&k[ns.len() + 1..]).into_owned();
            objects.push(stat_of(meta.objects[slot as usize].as_ref().expect("live"), ns, &name));
        }
        let seen = self.seen();
        drop(meta);
        self.settle(seen);
        let next = if more { objects.last().map(|o| o.name.clone()) } else { None };
        Ok(ListPage { objects, next })
    }

    /// Change an object's size. Growing is sparse (no blocks are allocated); shrinking frees
    /// whole blocks past the new end and zeroes the rest of the last block, atomically.
    pub fn resize(&self, ns: &str, name: &str, new_size: u64) -> Result<ObjectStat, ObjError> {
        self.resize_to(ns, name, new_size, false)
    }

    /// [`Pool::resize`], but only if the object is shorter than `new_size`: decided under the
    /// metadata lock, so concurrent grows never shrink each other's work.
    pub fn grow(&self, ns: &str, name: &str, new_size: u64) -> Result<ObjectStat, ObjError> {
        self.resize_to(ns, name, new_size, true)
    }

    fn resize_to(&self, ns: &str, name: &str, new_size: u64, grow_only: bool) -> Result<ObjectStat, ObjError> {
        let key = validate(ns, name)?;
        if new_size > MAX_OBJECT_SIZE {
            return Err(ObjError::InvalidArgument("size larger than 2^60 bytes"));
        }
        let geo = &self.sb.geo;
        let mut meta = self.write_meta_open()?;
        let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
        let live = meta.objects[slot as usize].as_ref().expect("live");
        if grow_only && live.size >= new_size {
            return Ok(stat_of(live, ns, name));
        }
        let volume = live.flags & OBJ_FLAG_VOLUME != 0;
        if volume && (new_size == 0 || !new_size.is_multiple_of(BLOCK)) {
            return Err(ObjError::InvalidArgument("a volume's size must be a non-zero multiple of 4 KiB"));
        }
        let mut obj = meta.objects[slot as usize].take().expect("live");
        let mut txn = Txn::new();
        let mut removal = Removal::default();
        if new_size < obj.size {
            removal = obj.map.remove_range(new_size.div_ceil(BLOCK), u64::MAX);
            debug_assert!(removal.news.is_empty());
            if !new_size.is_multiple_of(BLOCK)
                && let Some(pb) = obj.map.lookup(new_size / BLOCK)
            {
                txn.zero(pb * BLOCK + new_size % BLOCK, BLOCK - new_size % BLOCK);
            }
        }
        if new_size < obj.size {
            obj.epoch += 1;
        }
        obj.size = new_size;
        self.apply_removal(&mut txn, &mut meta, &mut obj, &removal);
        put_obj(&mut txn, geo, slot, &obj, ns, name);
        let t = self.commit(&mut meta, txn);
        let st = stat_of(&obj, ns, name);
        meta.objects[slot as usize] = Some(obj);
        let freed = self.finish_removal(&mut meta, removal);
        drop(meta);
        self.durable_then_release(t, freed)?;
        Ok(st)
    }

    /// Deallocate `[offset, offset + len)`: whole blocks are freed, partial blocks zeroed; the
    /// size does not change. A range past the end is clipped to it.
    pub fn punch_hole(&self, ns: &str, name: &str, offset: u64, len: u64) -> Result<(), ObjError> {
        let key = validate(ns, name)?;
        if len == 0 {
            return Err(ObjError::InvalidArgument("punch length must be at least 1"));
        }
        let mut meta = self.write_meta_open()?;
        let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
        let size = meta.objects[slot as usize].as_ref().expect("live").size;
        let end = end_of(offset, len, size)?;
        if offset > size {
            return Err(ObjError::range(offset, len, size, ""));
        }
        let end = end.min(size);
        if offset == end {
            return Ok(());
        }
        let geo = &self.sb.geo;
        let mut obj = meta.objects[slot as usize].take().expect("live");
        let (first_full, end_full) = (offset.div_ceil(BLOCK), end / BLOCK);
        let mut trial = obj.map.clone();
        let removal = if first_full < end_full { trial.remove_range(first_full, end_full) } else { Removal::default() };
        // Punching the middle of an extent splits it: that needs one more extent record.
        if !removal.news.is_empty()
            && (trial.len() as u64 > geo.max_extents_per_object || meta.ext_slots_available(geo) == 0)
        {
            meta.objects[slot as usize] = Some(obj);
            return Err(ObjError::TooFragmented {
                detail: "punching would split an extent and no extent record is left".into(),
            });
        }
        let mut txn = Txn::new();
        let mut edges: Vec<(u64, u64)> = Vec::new();
        if first_full > end_full {
            edges.push((offset, end)); // within one block
        } else {
            if !offset.is_multiple_of(BLOCK) {
                edges.push((offset, first_full * BLOCK));
            }
            if !end.is_multiple_of(BLOCK) {
                edges.push((end_full * BLOCK, end));
            }
        }
        for (lo, hi) in edges {
            if let Some(pb) = obj.map.lookup(lo / BLOCK) {
                txn.zero(pb * BLOCK + lo % BLOCK, hi - lo);
            }
        }
        obj.map = trial;
        obj.epoch += 1;
        self.apply_removal(&mut txn, &mut meta, &mut obj, &removal);
        let t = self.commit(&mut meta, txn);
        meta.objects[slot as usize] = Some(obj);
        let freed = self.finish_removal(&mut meta, removal);
        drop(meta);
        self.durable_then_release(t, freed)
    }

    /// Delete an object and free its blocks.
    pub fn delete(&self, ns: &str, name: &str) -> Result<(), ObjError> {
        let key = validate(ns, name)?;
        let geo = &self.sb.geo;
        let mut meta = self.write_meta_open()?;
        let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
        let mut obj = meta.objects[slot as usize].take().expect("live");
        let removal = obj.map.remove_range(0, u64::MAX);
        let mut txn = Txn::new();
        self.apply_removal(&mut txn, &mut meta, &mut obj, &removal);
        txn.zero(geo.obj_slot_off(slot as u64), OBJ_SLOT);
        let t = self.commit(&mut meta, txn);
        meta.names.remove(&key);
        meta.free_obj.push(slot);
        let freed = self.finish_removal(&mut meta, removal);
        drop(meta);
        self.durable_then_release(t, freed)
    }

    /// Wait for `ticket`, then hand the blocks its transaction freed to the release hook: not
    /// before, or they could be reused while a crash could still give them back to their old
    /// owner. After a storage failure they stay out of the allocator (the pool takes no more
    /// changes anyway).
    fn durable_then_release(&self, ticket: u64, freed: Vec<Run>) -> Result<(), ObjError> {
        self.durable(ticket)?;
        self.release(freed);
        Ok(())
    }

    /// Turn a planned removal into slot records (new slots for split remainders).
    fn apply_removal(&self, txn: &mut Txn, meta: &mut Meta, obj: &mut Obj, r: &Removal) {
        let geo = &self.sb.geo;
        for e in &r.rewrites {
            put_ext(txn, geo, obj.id, e);
        }
        for &s in &r.clears {
            txn.zero(geo.ext_slot_off(s as u64), EXT_SLOT);
        }
        let hwm0 = meta.hdr.ext_hwm;
        for n in &r.news {
            let s = meta.take_ext_slot();
            obj.map.set_slot(n.file_block, s);
            put_ext(txn, geo, obj.id, &Ext { slot: s, ..*n });
        }
        if meta.hdr.ext_hwm != hwm0 {
            self.put_hdr(txn, meta);
        }
    }

    /// After commit: recycle cleared slots. Returns the freed blocks, for the caller to hand
    /// to the release hook once it has dropped the metadata lock (they are in nobody's map
    /// and not in the allocator meanwhile).
    #[must_use = "freed blocks go to Pool::release after the metadata lock is dropped"]
    fn finish_removal(&self, meta: &mut Meta, r: Removal) -> Vec<Run> {
        meta.live_ext = meta.live_ext + r.news.len() as u64 - r.clears.len() as u64;
        meta.free_ext.extend(r.clears);
        r.freed
    }

    /// Allocate blocks for every hole in `[offset, offset + len)` (like `fallocate`). Runs of
    /// 2 MiB or more come 2 MiB-aligned where free space allows. Newly allocated blocks read
    /// zero. A very fragmented allocation may take several transactions; a crash between them
    /// leaves some holes allocated (they still read zero), never a torn object.
    ///
    /// A large allocation zeroes its blocks with no lock held (they belong to nobody while it
    /// does), so other requests — and the watchdog — are not stalled for the seconds that
    /// zeroing gigabytes takes; the blocks are installed afterwards if the object is unchanged.
    ///
    /// Returns the object's id and layout epoch, for a caller that reads the layout later and
    /// must know whether blocks were taken away meanwhile.
    ///
    /// Refused with [`ObjError::AllocCap`] if the holes in the range add up to more than
    /// `cap` bytes.
    pub fn allocate_capped(
        &self,
        ns: &str,
        name: &str,
        offset: u64,
        len: u64,
        cap: u64,
    ) -> Result<(u64, u64), ObjError> {
        let key = validate(ns, name)?;
        for attempt in 0.. {
            let mut meta = self.write_meta_open()?;
            let slot = meta.lookup(&key).ok_or_else(|| not_found(ns, name))?;
            let o = meta.objects[slot as usize].as_ref().expect("live");
            let end = end_of(offset, len, o.size)?;
            if end > o.size {
                return Err(ObjError::range(offset, len, o.size, "; resize the object first"));
            }
            let (lo, hi, id) = (offset / BLOCK, end.div_ceil(BLOCK), o.id);
            let holes = o.map.holes(lo, hi);
            let total: u64 = holes.iter().map(|h| h.1).sum();
            if total.saturating_mul(BLOCK) > cap {
                return Err(ObjError::AllocCap { needed: total.saturating_mul(BLOCK), cap });
            }
            // Small, or contended twice already: zero under the lock, as one step.
            if total * BLOCK <= ZERO_UNLOCKED_ABOVE || attempt >= 2 {
                let t = self.fill_holes(&mut meta, slot, ns, name, lo, hi)?;
                let o = meta.objects[slot as usize].as_ref().expect("live");
                let r = (o.id, o.epoch);
                drop(meta);
                self.durable(t)?;
                return Ok(r);
            }
            let runs =
                lock(&self.alloc).alloc(total).map_err(|e| ObjError::NoSpace { needed: e.needed, free: e.free })?;
            let hwm = meta.hdr.data_hwm;
            drop(meta);
            let _ = crate::failpoint_blocking!("pool.zero_unlocked");
            self.zero_runs(&runs, hwm);
            let mut meta = match self.write_meta_open() {
                Ok(m) => m,
                Err(e) => {
                    self.give_back(&runs);
                    return Err(e);
                }
            };
            let same = meta.lookup(&key).and_then(|s| meta.objects[s as usize].as_ref().map(|o| (s, o)));
            match same {
                Some((slot, o)) if o.id == id && o.map.holes(lo, hi) == holes => {
                    let t = self.install_runs(&mut meta, slot, &holes, runs)?;
                    let o = meta.objects[slot as usize].as_ref().expect("live");
                    let r = (o.id, o.epoch);
                    drop(meta);
                    self.durable(t)?;
                    return Ok(r);
                }
                // The object changed while we zeroed: give the blocks back and start over.
                _ => self.give_back(&runs),
            }
        }
        unreachable!("the loop returns")
    }

    /// [`Pool::allocate_capped`] with no cap.
    pub fn allocate(&self, ns: &str, name: &str, offset: u64, len: u64) -> Result<(u64, u64), ObjError> {
        self.allocate_capped(ns, name, offset, len, u64::MAX)
    }

    /// Allocate the holes of file blocks `[lo, hi)`; returns the ticket to wait for.
    pub(super) fn fill_holes(
        &self,
        meta: &mut Meta,
        slot: u32,
        ns: &str,
        name: &str,
        lo: u64,
        hi: u64,
    ) -> Result<u64, ObjError> {
        let holes = meta.objects[slot as usize].as_ref().expect("live").map.holes(lo, hi);
        let total: u64 = holes.iter().map(|h| h.1).sum();
        if total == 0 {
            return Ok(self.seen());
        }
        let runs = lock(&self.alloc).alloc(total).map_err(|e| ObjError::NoSpace { needed: e.needed, free: e.free })?;
        self.zero_runs(&runs, meta.hdr.data_hwm);
        let _ = (ns, name);
        self.install_runs(meta, slot, &holes, runs)
    }

    fn give_back(&self, runs: &[Run]) {
        let mut a = lock(&self.alloc);
        runs.iter().for_each(|&(s, l)| a.free(s, l));
    }

    /// Make zeroed `runs` the blocks of `holes` of the object in `slot` (the caller holds the
    /// metadata lock, and waits for the returned ticket once it has dropped it). On failure
    /// the runs go back to the allocator.
    fn install_runs(&self, meta: &mut Meta, slot: u32, holes: &[Run], runs: Vec<Run>) -> Result<u64, ObjError> {
        let geo = &self.sb.geo;
        let pieces = lay_out(holes, &runs);
        let obj_exts = meta.objects[slot as usize].as_ref().expect("live").map.len() as u64;
        if obj_exts + pieces.len() as u64 > geo.max_extents_per_object {
            self.give_back(&runs);
            return Err(ObjError::TooFragmented {
                detail: format!("the object would exceed {} extents", geo.max_extents_per_object),
            });
        }
        if pieces.len() as u64 > meta.ext_slots_available(geo) {
            self.give_back(&runs);
            return Err(ObjError::TooFragmented {
                detail: format!("the pool's {} extent records are used up", geo.exttab_slots),
            });
        }
        let batch = ((Journal::capacity(geo.journal_len) - 1024) / 64) as usize;
        let mut obj = meta.objects[slot as usize].take().expect("live");
        let mut ticket = self.seen();
        for chunk in pieces.chunks(batch) {
            let mut txn = Txn::new();
            for &(f, p, n) in chunk {
                match obj.map.add(f, p, n) {
                    Ok(grown) => put_ext(&mut txn, geo, obj.id, &grown),
                    Err(new) => {
                        let s = meta.take_ext_slot();
                        obj.map.set_slot(f, s);
                        meta.live_ext += 1;
                        put_ext(&mut txn, geo, obj.id, &Ext { slot: s, ..new });
                    }
                }
                meta.hdr.data_hwm = meta.hdr.data_hwm.max(p + n);
            }
            self.put_hdr(&mut txn, meta);
            ticket = self.commit(meta, txn);
        }
        meta.objects[slot as usize] = Some(obj);
        Ok(ticket)
    }

    /// Blocks taken from the allocator may hold an earlier owner's bytes: zero them (durably)
    /// before any extent points at them. Blocks at or above `hwm` (the data high-water mark
    /// when they were taken) were never used since a zero-filled format and are skipped.
    fn zero_runs(&self, runs: &[Run], hwm: u64) {
        let virgin_ok = self.sb.flags & FLAG_VIRGIN_ZERO != 0;
        let m = self.media.as_ref();
        for &(s, l) in runs {
            let dirty_end = if virgin_ok { (s + l).min(hwm) } else { s + l };
            if dirty_end > s {
                m.fill(s * BLOCK, (dirty_end - s) * BLOCK, 0);
                m.flush(s * BLOCK, (dirty_end - s) * BLOCK);
            }
        }
        m.drain();
    }
}

/// Lay pool runs over logical holes, in order: `(file_block, pool_block, count)`.
fn lay_out(holes: &[Run], runs: &[Run]) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::with_capacity(holes.len() + runs.len());
    let mut ri = runs.iter().copied();
    let mut cur = ri.next();
    for &(mut f, mut need) in holes {
        while need > 0 {
            let (p, l) = cur.expect("runs cover the holes");
            let take = l.min(need);
            out.push((f, p, take));
            f += take;
            need -= take;
            cur = if take == l { ri.next() } else { Some((p + take, l - take)) };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lay_out_splits_runs_across_holes() {
        let v = lay_out(&[(0, 3), (10, 4)], &[(100, 5), (200, 2)]);
        assert_eq!(v, vec![(0, 100, 3), (10, 103, 2), (12, 200, 2)]);
    }
}
