//! The extent allocator: free space as a set of free extents, never a per-block structure.
//!
//! DRAM cost is two B-tree entries per *free extent* (by start, and by (length, start)), so a
//! pool full of 2 MiB extents costs almost nothing and a fragmented one costs in proportion to
//! its fragments, not its size. Policy:
//! * a request of at least 2 MiB is served first from 2 MiB-aligned runs (PMD-sized DAX
//!   mappings, seed 001), smallest suitable free extent first;
//! * the rest by best fit (the smallest free extent that holds it), which keeps large free
//!   extents whole;
//! * when no single free extent fits, the largest ones are taken in turn (a fragmented result).
//!
//! Freed ranges coalesce with their neighbours.

use std::collections::{BTreeMap, BTreeSet};

use super::layout::HUGE_BLOCKS;

/// A run of pool blocks: `(first block, count)`.
pub type Run = (u64, u64);

/// Not enough free space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{needed} blocks requested, {free} free")]
pub struct NoSpace {
    /// Blocks requested.
    pub needed: u64,
    /// Blocks free.
    pub free: u64,
}

/// Free-space figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct FreeStats {
    /// Free blocks.
    pub free_blocks: u64,
    /// Free extents.
    pub free_extents: u64,
    /// Blocks in the largest free extent.
    pub largest_free_blocks: u64,
    /// 2 MiB-aligned 2 MiB runs available.
    pub free_huge_runs: u64,
}

impl FreeStats {
    /// Share of free space that cannot be handed out as 2 MiB-aligned runs (0 = none, 1 = all).
    pub fn fragmentation(&self) -> f64 {
        if self.free_blocks == 0 {
            return 0.0;
        }
        1.0 - (self.free_huge_runs * HUGE_BLOCKS) as f64 / self.free_blocks as f64
    }
}

/// Free-space map of one pool's data area.
#[derive(Debug, Clone)]
pub struct Allocator {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
    free: u64,
    range: (u64, u64),
}

/// Two used runs overlap: a block is owned twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap(pub Run, pub Run);

impl Allocator {
    /// An allocator for blocks `[start, end)` in which the sorted-or-not `used` runs are taken.
    pub fn from_used(start: u64, end: u64, used: &mut [Run]) -> Result<Self, Overlap> {
        used.sort_unstable();
        let mut a = Self { by_start: BTreeMap::new(), by_len: BTreeSet::new(), free: 0, range: (start, end) };
        let mut cursor = start;
        let mut prev: Option<Run> = None;
        for &(s, n) in used.iter() {
            if let Some(p) = prev
                && s < p.0 + p.1
            {
                return Err(Overlap(p, (s, n)));
            }
            if s > cursor {
                a.insert(cursor, s - cursor);
            }
            cursor = cursor.max(s + n);
            prev = Some((s, n));
        }
        if end > cursor {
            a.insert(cursor, end - cursor);
        }
        Ok(a)
    }

    fn insert(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
        self.free += len;
    }

    fn remove(&mut self, start: u64, len: u64) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
        self.free -= len;
    }

    /// Take `[at, at + len)` out of the free extent `(start, flen)` that contains it.
    fn carve(&mut self, (start, flen): Run, at: u64, len: u64) {
        debug_assert!(at >= start && at + len <= start + flen);
        self.remove(start, flen);
        if at > start {
            self.insert(start, at - start);
        }
        if start + flen > at + len {
            self.insert(at + len, start + flen - (at + len));
        }
    }

    /// Allocate `n` blocks (all or nothing). Returns the runs in the order they should be laid
    /// out in the object (2 MiB-aligned runs first).
    pub fn alloc(&mut self, n: u64) -> Result<Vec<Run>, NoSpace> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > self.free {
            return Err(NoSpace { needed: n, free: self.free });
        }
        let mut out = Vec::new();
        let mut need = n;
        let mut want_huge = need / HUGE_BLOCKS;
        let mut cursor = (HUGE_BLOCKS, 0u64);
        while want_huge > 0 {
            let Some(&(flen, fstart)) = self.by_len.range(cursor..).next() else { break };
            cursor = (flen, fstart + 1);
            let aligned = fstart.div_ceil(HUGE_BLOCKS) * HUGE_BLOCKS;
            let avail = (fstart + flen).saturating_sub(aligned) / HUGE_BLOCKS;
            let k = avail.min(want_huge);
            if k == 0 {
                continue;
            }
            self.carve((fstart, flen), aligned, k * HUGE_BLOCKS);
            out.push((aligned, k * HUGE_BLOCKS));
            want_huge -= k;
            need -= k * HUGE_BLOCKS;
        }
        while need > 0 {
            let fit = self.by_len.range((need, 0)..).next().copied();
            let (flen, fstart) = match fit {
                Some(f) => f,
                None => *self.by_len.iter().next_back().expect("free > 0 checked above"),
            };
            let take = flen.min(need);
            self.carve((fstart, flen), fstart, take);
            out.push((fstart, take));
            need -= take;
        }
        Ok(out)
    }

    /// Return a run to the free map, merging with free neighbours.
    ///
    /// Panics if the run is outside the data area or overlaps free space: that would be a
    /// double free, and continuing would hand one block to two owners.
    pub fn free(&mut self, start: u64, len: u64) {
        assert!(
            len > 0 && start >= self.range.0 && start + len <= self.range.1,
            "free of [{start}, +{len}) outside the data area"
        );
        let (mut s, mut l) = (start, len);
        if let Some((&ps, &pl)) = self.by_start.range(..=start).next_back() {
            assert!(ps + pl <= start, "double free: [{start}, +{len}) overlaps free [{ps}, +{pl})");
            if ps + pl == start {
                self.remove(ps, pl);
                s = ps;
                l += pl;
            }
        }
        if let Some((&ns, &nl)) = self.by_start.range(start..).next() {
            assert!(ns >= start + len, "double free: [{start}, +{len}) overlaps free [{ns}, +{nl})");
            if ns == start + len {
                self.remove(ns, nl);
                l += nl;
            }
        }
        self.insert(s, l);
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> u64 {
        self.free
    }

    /// Iterate free runs in address order.
    pub fn free_runs(&self) -> impl Iterator<Item = Run> + '_ {
        self.by_start.iter().map(|(&s, &l)| (s, l))
    }

    /// Free-space figures.
    pub fn stats(&self) -> FreeStats {
        let huge = self
            .by_len
            .range((HUGE_BLOCKS, 0)..)
            .map(|&(l, s)| (s + l).saturating_sub(s.div_ceil(HUGE_BLOCKS) * HUGE_BLOCKS) / HUGE_BLOCKS)
            .sum();
        FreeStats {
            free_blocks: self.free,
            free_extents: self.by_start.len() as u64,
            largest_free_blocks: self.by_len.iter().next_back().map_or(0, |&(l, _)| l),
            free_huge_runs: huge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::rng::SplitMix64;

    #[test]
    fn large_requests_get_aligned_runs_and_small_ones_best_fit() {
        // Data area starts off-alignment so an unaligned head exists.
        let mut a = Allocator::from_used(100, 100 + 4 * 512 + 50, &mut []).unwrap();
        let runs = a.alloc(2 * 512 + 3).unwrap();
        assert_eq!(runs[0].0 % 512, 0, "{runs:?}");
        assert_eq!(runs[0].1, 1024);
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), 1027);
        // Best fit: a 5-block hole is used for a 5-block request before a large extent.
        let mut b = Allocator::from_used(0, 1000, &mut [(0, 10), (15, 100)]).unwrap();
        assert_eq!(b.alloc(5).unwrap(), vec![(10, 5)]);
    }

    #[test]
    fn fragmented_requests_take_several_runs_and_no_space_is_all_or_nothing() {
        let mut a = Allocator::from_used(0, 100, &mut [(10, 10), (30, 10), (50, 50)]).unwrap();
        // Free: [0, 10), [20, 30), [40, 50).
        assert_eq!(a.free_blocks(), 30);
        assert_eq!(a.alloc(31), Err(NoSpace { needed: 31, free: 30 }));
        assert_eq!(a.free_blocks(), 30);
        let runs = a.alloc(25).unwrap();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), 25);
        assert_eq!(a.free_blocks(), 5);
    }

    #[test]
    fn overlap_is_detected() {
        assert!(Allocator::from_used(0, 100, &mut [(10, 10), (15, 2)]).is_err());
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = Allocator::from_used(0, 100, &mut [(0, 50)]).unwrap();
        a.free(40, 20);
    }

    /// Seeded random alloc/free against a bitmap model: never a block twice, frees coalesce.
    #[test]
    fn random_alloc_free_matches_a_bitmap_model() {
        for seed in 0..20u64 {
            let mut rng = SplitMix64::new(seed);
            let (lo, hi) = (512u64, 512 + 8192);
            let mut a = Allocator::from_used(lo, hi, &mut []).unwrap();
            let mut owned = vec![false; (hi - lo) as usize];
            let mut live: Vec<Vec<Run>> = Vec::new();
            for _ in 0..400 {
                if rng.chance(3, 5) || live.is_empty() {
                    let n = if rng.chance(1, 4) { 512 + rng.below(1500) } else { 1 + rng.below(40) };
                    match a.alloc(n) {
                        Ok(runs) => {
                            assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), n, "seed {seed}");
                            for &(s, l) in &runs {
                                for b in s..s + l {
                                    assert!(!owned[(b - lo) as usize], "seed {seed}: block {b} twice");
                                    owned[(b - lo) as usize] = true;
                                }
                            }
                            live.push(runs);
                        }
                        Err(e) => assert!(e.free < n),
                    }
                } else {
                    let i = rng.below(live.len() as u64) as usize;
                    for (s, l) in live.swap_remove(i) {
                        a.free(s, l);
                        for b in s..s + l {
                            owned[(b - lo) as usize] = false;
                        }
                    }
                }
                let free_model = owned.iter().filter(|&&o| !o).count() as u64;
                assert_eq!(a.free_blocks(), free_model, "seed {seed}");
                // Coalescing: no two free runs touch.
                let runs: Vec<Run> = a.free_runs().collect();
                assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0), "seed {seed}");
            }
        }
    }
}
