//! The release hook: blocks that leave an object go back to the allocator only when no lease
//! that covered them is still undrained (invariant 1, third line of defence), and never when
//! one was quarantined.
//!
//! Every layout change recalls and drains first, so the hook normally finds nothing and frees
//! at once. If it finds an undrained lease (a path that forgot to recall — a bug, logged), it
//! holds the blocks until that lease drains; if the lease was quarantined, the blocks are
//! quarantined with it. The lookup is an interval index over the pool ranges of undrained
//! leases, O(log n + overlaps), and the hook runs after the pool has dropped its metadata
//! lock (the blocks are in no object's map and not in the allocator meanwhile), so neither
//! the lookup nor the lease lock it takes ever stalls other pool requests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tracing::error;

use super::{LeaseManager, State};
use crate::pool::ReleasedBlocks;
use crate::pool::layout::BLOCK;

/// Pool byte ranges `[lo, hi)` of undrained leases.
#[derive(Debug, Default)]
pub(super) struct RangeIndex {
    /// `(lo, lease)` → hi.
    by_lo: BTreeMap<(u64, u64), u64>,
    /// `lease` → its `lo`s.
    by_lease: BTreeMap<u64, Vec<u64>>,
    /// Multiset of range lengths (the longest bounds how far back an overlap can start).
    lens: BTreeMap<u64, usize>,
}

impl RangeIndex {
    pub(super) fn insert(&mut self, lease: u64, lo: u64, hi: u64) {
        if self.by_lo.insert((lo, lease), hi).is_none() {
            self.by_lease.entry(lease).or_default().push(lo);
            *self.lens.entry(hi - lo).or_default() += 1;
        }
    }

    pub(super) fn remove_lease(&mut self, lease: u64) {
        for lo in self.by_lease.remove(&lease).unwrap_or_default() {
            if let Some(hi) = self.by_lo.remove(&(lo, lease))
                && let Some(n) = self.lens.get_mut(&(hi - lo))
            {
                *n -= 1;
                if *n == 0 {
                    self.lens.remove(&(hi - lo));
                }
            }
        }
    }

    /// Leases with a range overlapping `[lo, hi)`.
    pub(super) fn overlapping(&self, lo: u64, hi: u64, out: &mut BTreeSet<u64>) {
        let Some((&longest, _)) = self.lens.last_key_value() else { return };
        let from = lo.saturating_sub(longest);
        for (&(_, lease), &end) in self.by_lo.range((from, 0)..(hi, 0)) {
            if end > lo {
                out.insert(lease);
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_lo.len()
    }
}

impl LeaseManager {
    pub(super) fn install_release_hook(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let rt = tokio::runtime::Handle::try_current().ok();
        self.pool.set_release_hook(Arc::new(move |blocks: ReleasedBlocks| {
            let Some(m) = weak.upgrade() else { return drop(blocks) };
            m.on_release(blocks, rt.as_ref());
        }));
    }

    /// Leases (undrained, and whether any of them is quarantined) covering `blocks`.
    fn holders(&self, blocks: &ReleasedBlocks) -> (BTreeSet<u64>, bool) {
        let g = self.lock();
        let mut ids = BTreeSet::new();
        for &(s, l) in blocks.runs() {
            g.undrained.overlapping(s * BLOCK, (s + l) * BLOCK, &mut ids);
        }
        let quarantined = ids.iter().any(|id| g.leases.get(id).is_some_and(|l| l.state == State::Quarantined));
        (ids, quarantined)
    }

    fn on_release(self: &Arc<Self>, blocks: ReleasedBlocks, rt: Option<&tokio::runtime::Handle>) {
        let (ids, quarantined) = self.holders(&blocks);
        if ids.is_empty() {
            return blocks.free();
        }
        if quarantined {
            error!(runs = ?blocks.runs(), leases = ?ids, "freed blocks are covered by a quarantined lease: quarantining them until restart");
            return blocks.quarantine();
        }
        error!(runs = ?blocks.runs(), leases = ?ids, "BUG: freed blocks are covered by leases that have not drained; holding them until those leases drain");
        let Some(rt) = rt else {
            // No runtime to wait on: keep the blocks out of the allocator until restart.
            return blocks.quarantine();
        };
        let m = self.clone();
        rt.spawn(async move {
            loop {
                let n = m.changed.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                let (ids, quarantined) = m.holders(&blocks);
                if quarantined {
                    return blocks.quarantine();
                }
                if ids.is_empty() {
                    return blocks.free();
                }
                // Every lease ends by its TTL and drains within the drain timeout; wake up
                // now and then in case a notification was missed.
                let _ = tokio::time::timeout(m.config().ttl, n).await;
            }
        });
    }

    /// Check the lease table against the pool (for tests and debugging): every undrained,
    /// unquarantined lease's keyed blocks belong to its object at the same place, or are
    /// held out of the allocator; no live lease was granted over a range that was already
    /// marked as breaking. Returns the problems found.
    pub fn audit(&self) -> Vec<String> {
        let owners = self.pool.owners();
        let free = self.pool.free_runs();
        let mut problems = Vec::new();
        let g = self.lock();
        for (id, l) in &g.leases {
            if matches!(l.state, State::Drained | State::Quarantined) {
                continue;
            }
            for &(obj_off, len, pool_off) in &l.segs {
                let (b0, b1) = (pool_off / BLOCK, (pool_off + len).div_ceil(BLOCK));
                for b in b0..b1 {
                    let file_block = obj_off / BLOCK + (b - b0);
                    let i = owners.partition_point(|o| o.0 + o.1 <= b);
                    let owner = owners.get(i).filter(|o| o.0 <= b);
                    match owner {
                        Some(&(pb, _, oid, fb)) if oid == l.object_id && fb + (b - pb) == file_block => {}
                        Some(&(_, _, oid, _)) => problems.push(format!(
                            "lease {id} ({}) on {} covers pool block {b}, which belongs to object id {oid}",
                            l.state.as_str(),
                            l.object
                        )),
                        None if free.iter().any(|&(s, n)| s <= b && b < s + n) => problems.push(format!(
                            "lease {id} ({}) on {} covers pool block {b}, which is free in the allocator",
                            l.state.as_str(),
                            l.object
                        )),
                        None if l.state.live() => problems.push(format!(
                            "live lease {id} on {} covers pool block {b}, which its object no longer owns",
                            l.object
                        )),
                        None => {} // held by the release hook until this lease drains
                    }
                }
            }
        }
        for m in &g.markers {
            for (id, l) in &g.leases {
                if l.state.live()
                    && l.object == m.object
                    && super::overlaps((l.lo, l.hi), (m.lo, m.hi))
                    && l.granted_after_marker >= m.id
                {
                    problems.push(format!("lease {id} on {} was granted over breaking marker {}", l.object, m.id));
                }
            }
        }
        let indexed: usize =
            g.leases.values().filter(|l| !matches!(l.state, State::Drained)).map(|l| l.segs.len()).sum();
        if indexed != g.undrained.len() {
            problems.push(format!("undrained index has {} ranges, leases have {indexed}", g.undrained.len()));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_found_across_lengths() {
        let mut ix = RangeIndex::default();
        ix.insert(1, 0, 1 << 30); // one long range
        ix.insert(2, 8192, 12288);
        ix.insert(3, 1 << 31, (1 << 31) + 4096);
        let q = |ix: &RangeIndex, lo, hi| {
            let mut s = BTreeSet::new();
            ix.overlapping(lo, hi, &mut s);
            s.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(q(&ix, 8192, 8193), vec![1, 2]);
        assert_eq!(q(&ix, 12288, 16384), vec![1]);
        assert_eq!(q(&ix, 1 << 30, 1 << 31), Vec::<u64>::new());
        assert_eq!(q(&ix, (1 << 31) + 4095, 1 << 32), vec![3]);
        ix.remove_lease(1);
        assert_eq!(q(&ix, 0, 8192), Vec::<u64>::new());
        assert_eq!(q(&ix, 0, 1 << 40), vec![2, 3]);
        ix.remove_lease(2);
        ix.remove_lease(3);
        assert_eq!(ix.len(), 0);
        assert!(ix.lens.is_empty());
    }
}
