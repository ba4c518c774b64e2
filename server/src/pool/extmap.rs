//! One object's extent map: logical blocks → pool blocks, sorted, non-overlapping.
//!
//! Each entry remembers the extent-table slot that stores it, so a change to the map can be
//! turned into exactly the slot writes that describe it. The map is pure DRAM logic; the
//! caller turns the returned plans into journal records.

use super::alloc::Run;

/// A physically contiguous piece of an object. 24 bytes of DRAM per extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext {
    /// First logical block.
    pub file_block: u64,
    /// First pool block.
    pub pool_block: u64,
    /// Length in blocks.
    pub nblocks: u32,
    /// Extent-table slot holding this extent ([`NO_SLOT`] until one is assigned).
    pub slot: u32,
}

/// Placeholder for an extent that still needs a slot.
pub const NO_SLOT: u32 = u32::MAX;

impl Ext {
    /// One past the last logical block.
    pub fn file_end(&self) -> u64 {
        self.file_block + self.nblocks as u64
    }
}

/// How removing a logical range changes the map.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// Extents that keep their slot with new contents.
    pub rewrites: Vec<Ext>,
    /// Slots that become free.
    pub clears: Vec<u32>,
    /// Remainders that need a new slot (`slot == NO_SLOT`).
    pub news: Vec<Ext>,
    /// Pool runs no longer referenced.
    pub freed: Vec<Run>,
}

/// One object's extents, sorted by `file_block`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    exts: Vec<Ext>,
}

impl ExtentMap {
    /// A map from unsorted extents; returns `None` if logical ranges overlap.
    pub fn from_unsorted(mut exts: Vec<Ext>) -> Option<Self> {
        exts.sort_unstable_by_key(|e| e.file_block);
        if exts.windows(2).any(|w| w[0].file_end() > w[1].file_block) {
            return None;
        }
        exts.shrink_to_fit();
        Some(Self { exts })
    }

    /// The extents.
    pub fn extents(&self) -> &[Ext] {
        &self.exts
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.exts.len()
    }

    /// True when nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.exts.is_empty()
    }

    /// Allocated blocks.
    pub fn allocated_blocks(&self) -> u64 {
        self.exts.iter().map(|e| e.nblocks as u64).sum()
    }

    /// Index of the first extent ending after `block`.
    fn first_after(&self, block: u64) -> usize {
        self.exts.partition_point(|e| e.file_end() <= block)
    }

    /// The pool block holding logical `block`, if allocated.
    pub fn lookup(&self, block: u64) -> Option<u64> {
        let e = self.exts.get(self.first_after(block))?;
        (e.file_block <= block).then(|| e.pool_block + (block - e.file_block))
    }

    /// Walk `[lo, hi)` in logical order as `(logical start, len, Some(pool start) | None)`.
    pub fn walk(&self, lo: u64, hi: u64) -> Vec<(u64, u64, Option<u64>)> {
        let mut out = Vec::new();
        let mut at = lo;
        for e in &self.exts[self.first_after(lo)..] {
            if at >= hi || e.file_block >= hi {
                break;
            }
            if e.file_block > at {
                out.push((at, e.file_block - at, None));
                at = e.file_block;
            }
            let end = e.file_end().min(hi);
            out.push((at, end - at, Some(e.pool_block + (at - e.file_block))));
            at = end;
        }
        if at < hi {
            out.push((at, hi - at, None));
        }
        out
    }

    /// Unallocated logical runs within `[lo, hi)`.
    pub fn holes(&self, lo: u64, hi: u64) -> Vec<Run> {
        self.walk(lo, hi).into_iter().filter(|w| w.2.is_none()).map(|w| (w.0, w.1)).collect()
    }

    /// Plan the removal of logical `[lo, hi)` and apply it to this map. Extents that need a
    /// new slot are returned in `news` and must be given one with [`ExtentMap::set_slot`].
    pub fn remove_range(&mut self, lo: u64, hi: u64) -> Removal {
        let mut r = Removal::default();
        if lo >= hi {
            return r;
        }
        let first = self.first_after(lo);
        let mut last = first;
        while last < self.exts.len() && self.exts[last].file_block < hi {
            last += 1;
        }
        let mut keep = Vec::new();
        for e in &self.exts[first..last] {
            let cut_lo = e.file_block.max(lo);
            let cut_hi = e.file_end().min(hi);
            r.freed.push((e.pool_block + (cut_lo - e.file_block), cut_hi - cut_lo));
            let left = (e.file_block < lo).then(|| Ext { nblocks: (lo - e.file_block) as u32, ..*e });
            let right = (e.file_end() > hi).then(|| Ext {
                file_block: hi,
                pool_block: e.pool_block + (hi - e.file_block),
                nblocks: (e.file_end() - hi) as u32,
                slot: e.slot,
            });
            match (left, right) {
                (Some(l), Some(rt)) => {
                    r.rewrites.push(l);
                    keep.push(l);
                    let n = Ext { slot: NO_SLOT, ..rt };
                    r.news.push(n);
                    keep.push(n);
                }
                (Some(x), None) | (None, Some(x)) => {
                    r.rewrites.push(x);
                    keep.push(x);
                }
                (None, None) => r.clears.push(e.slot),
            }
        }
        self.exts.splice(first..last, keep);
        r
    }

    /// Give the extent starting at logical `file_block` its slot.
    pub fn set_slot(&mut self, file_block: u64, slot: u32) {
        let i = self.first_after(file_block);
        assert_eq!(self.exts[i].file_block, file_block);
        self.exts[i].slot = slot;
    }

    /// Map logical `[file_block, +n)` (a hole) to pool `pool_block`. If the extent just before
    /// it continues both logically and physically, it grows instead and is returned as
    /// `Ok(rewritten)`; otherwise the new extent is returned as `Err(new)` with `NO_SLOT`.
    pub fn add(&mut self, file_block: u64, pool_block: u64, n: u64) -> Result<Ext, Ext> {
        let i = self.first_after(file_block);
        debug_assert!(self.exts.get(i).is_none_or(|e| e.file_block >= file_block + n), "add over allocated range");
        if i > 0 {
            let p = &mut self.exts[i - 1];
            if p.file_end() == file_block
                && p.pool_block + p.nblocks as u64 == pool_block
                && p.nblocks as u64 + n <= u32::MAX as u64
            {
                p.nblocks += n as u32;
                return Ok(*p);
            }
        }
        let e = Ext { file_block, pool_block, nblocks: n as u32, slot: NO_SLOT };
        self.exts.insert(i, e);
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(f: u64, p: u64, n: u32, s: u32) -> Ext {
        Ext { file_block: f, pool_block: p, nblocks: n, slot: s }
    }

    #[test]
    fn walk_and_holes() {
        let m = ExtentMap::from_unsorted(vec![ext(10, 100, 5, 1), ext(0, 50, 2, 0)]).unwrap();
        assert_eq!(m.walk(0, 20), vec![(0, 2, Some(50)), (2, 8, None), (10, 5, Some(100)), (15, 5, None)]);
        assert_eq!(m.holes(1, 12), vec![(2, 8)]);
        assert_eq!(m.lookup(12), Some(102));
        assert_eq!(m.lookup(5), None);
        assert!(ExtentMap::from_unsorted(vec![ext(0, 1, 5, 0), ext(4, 9, 1, 1)]).is_none());
    }

    #[test]
    fn punching_the_middle_splits_into_a_rewrite_and_a_new_extent() {
        let mut m = ExtentMap::from_unsorted(vec![ext(0, 100, 10, 7)]).unwrap();
        let r = m.remove_range(3, 6);
        assert_eq!(r.rewrites, vec![ext(0, 100, 3, 7)]);
        assert_eq!(r.news, vec![ext(6, 106, 4, NO_SLOT)]);
        assert_eq!(r.freed, vec![(103, 3)]);
        assert!(r.clears.is_empty());
        m.set_slot(6, 9);
        assert_eq!(m.extents(), &[ext(0, 100, 3, 7), ext(6, 106, 4, 9)]);
    }

    #[test]
    fn removing_across_extents_clears_and_trims() {
        let mut m = ExtentMap::from_unsorted(vec![ext(0, 100, 4, 1), ext(4, 200, 4, 2), ext(8, 300, 4, 3)]).unwrap();
        let r = m.remove_range(2, 9);
        assert_eq!(r.clears, vec![2]);
        assert_eq!(r.rewrites, vec![ext(0, 100, 2, 1), ext(9, 301, 3, 3)]);
        assert_eq!(r.freed, vec![(102, 2), (200, 4), (300, 1)]);
        assert_eq!(m.allocated_blocks(), 5);
        let r = m.remove_range(0, u64::MAX);
        assert_eq!(r.clears, vec![1, 3]);
        assert!(m.is_empty());
    }

    #[test]
    fn add_merges_contiguous_neighbours() {
        let mut m = ExtentMap::default();
        assert!(m.add(0, 500, 4).is_err());
        m.set_slot(0, 1);
        assert_eq!(m.add(4, 504, 4), Ok(ext(0, 500, 8, 1)));
        assert!(m.add(8, 900, 1).is_err());
        assert_eq!(m.len(), 2);
    }
}
