//! A copy-on-write overlay over a read-only medium, page by page.
//!
//! Offline checks replay the journal into this overlay so that the state the next open would
//! see can be verified without writing a byte to the pool (works on device-DAX, which refuses
//! private mappings).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Media, Persistence, PoolMode, check_range};

const PAGE: u64 = 4096;

/// Reads fall through to `base` except where this overlay was written.
pub struct OverlayMedia {
    base: Arc<dyn Media>,
    pages: Mutex<HashMap<u64, Box<[u8; PAGE as usize]>>>,
}

impl std::fmt::Debug for OverlayMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayMedia").finish_non_exhaustive()
    }
}

impl OverlayMedia {
    /// An empty overlay on `base`.
    pub fn new(base: Arc<dyn Media>) -> Self {
        Self { base, pages: Mutex::new(HashMap::new()) }
    }

    /// Pages written so far.
    pub fn dirty_pages(&self) -> usize {
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Apply `f(page bytes, range within the page)` to every page of `[off, off + len)`,
    /// materialising pages from the base first.
    fn modify(&self, off: u64, len: u64, mut f: impl FnMut(&mut [u8], u64)) {
        check_range(off, len, self.base.len());
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = off;
        while at < off + len {
            let page = at / PAGE;
            let within = at % PAGE;
            let n = (PAGE - within).min(off + len - at);
            let p = pages.entry(page).or_insert_with(|| {
                let mut b = Box::new([0u8; PAGE as usize]);
                let plen = PAGE.min(self.base.len() - page * PAGE) as usize;
                self.base.read(page * PAGE, &mut b[..plen]);
                b
            });
            f(&mut p[within as usize..(within + n) as usize], at - off);
            at += n;
        }
    }
}

impl Media for OverlayMedia {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn read(&self, off: u64, dst: &mut [u8]) {
        check_range(off, dst.len() as u64, self.base.len());
        self.base.read(off, dst);
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if pages.is_empty() {
            return;
        }
        let end = off + dst.len() as u64;
        for page in off / PAGE..end.div_ceil(PAGE) {
            if let Some(p) = pages.get(&page) {
                let lo = (page * PAGE).max(off);
                let hi = ((page + 1) * PAGE).min(end);
                dst[(lo - off) as usize..(hi - off) as usize]
                    .copy_from_slice(&p[(lo - page * PAGE) as usize..(hi - page * PAGE) as usize]);
            }
        }
    }

    fn write(&self, off: u64, src: &[u8]) {
        self.modify(off, src.len() as u64, |dst, at| dst.copy_from_slice(&src[at as usize..at as usize + dst.len()]));
    }

    fn fill(&self, off: u64, len: u64, byte: u8) {
        self.modify(off, len, |dst, _| dst.fill(byte));
    }

    fn write_u64_atomic(&self, off: u64, value: u64) {
        self.write(off, &value.to_le_bytes());
    }

    fn flush(&self, _off: u64, _len: u64) {}

    fn drain(&self) {}

    fn mode(&self) -> PoolMode {
        self.base.mode()
    }

    fn persistence(&self) -> Persistence {
        Persistence::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::media::sim::SimMedia;

    #[test]
    fn writes_stay_in_the_overlay_and_reads_merge() {
        let base = Arc::new(SimMedia::new(4 * PAGE));
        base.write(0, &[1u8; (4 * PAGE) as usize]);
        let o = OverlayMedia::new(base.clone());
        o.write(PAGE - 2, &[9u8; 4]); // straddles two pages
        o.fill(3 * PAGE, 10, 7);
        let mut all = vec![0u8; (4 * PAGE) as usize];
        o.read(0, &mut all);
        assert_eq!(&all[(PAGE - 3) as usize..(PAGE + 3) as usize], &[1, 9, 9, 9, 9, 1]);
        assert_eq!(&all[(3 * PAGE) as usize..(3 * PAGE + 11) as usize], &[7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 1]);
        assert_eq!(o.dirty_pages(), 3);
        let mut b = vec![0u8; (4 * PAGE) as usize];
        base.read(0, &mut b);
        assert!(b.iter().all(|&x| x == 1), "the base is never written");
    }
}
