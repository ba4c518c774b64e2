//! Simulated pmem for power-failure tests (the idea behind PMDK's pmreorder).
//!
//! The medium keeps two images: what the CPU sees (`visible`) and what is guaranteed to have
//! reached the persistence domain (`durable`). A store marks its cache lines dirty. `flush`
//! snapshots the dirty lines it covers (the write-back has started, with the contents of that
//! moment); `drain` makes those snapshots durable. A line that was never flushed may or may
//! not have been evicted by the cache when the power fails.
//!
//! A crash is armed at the N-th `drain` (a persist barrier). When it fires, *before* that
//! barrier takes effect, the crash image is built from `durable` plus, for every dirty or
//! in-flight line and independently for every 8-byte word in it (x86's failure-atomicity
//! unit), a seeded-random choice among the values that word could hold: the durable one, the
//! snapshot being written back, or the current one. The engine keeps running after that (its
//! later results are simply not "acknowledged" from the test's point of view); the test
//! reopens the pool on [`SimMedia::from_image`] of the crash image.

use std::sync::Mutex;

use super::flush::CACHE_LINE;
use super::{Media, Persistence, PoolMode, check_range};
use crate::pool::rng::SplitMix64;

const LINE: usize = CACHE_LINE as usize;

struct State {
    visible: Vec<u8>,
    durable: Vec<u8>,
    /// One bit per cache line: stored to since its last flush.
    dirty: Vec<u64>,
    /// Lines whose write-back has started but not been drained: (line index, contents).
    in_flight: Vec<(usize, [u8; LINE])>,
    drains: u64,
    crash_at: Option<(u64, u64)>,
    crash_image: Option<Vec<u8>>,
}

/// A simulated persistent medium. See the module documentation.
pub struct SimMedia {
    state: Mutex<State>,
    len: u64,
}

impl std::fmt::Debug for SimMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimMedia").field("len", &self.len).finish()
    }
}

impl SimMedia {
    /// A zero-filled medium of `len` bytes (rounded up to a cache line).
    pub fn new(len: u64) -> Self {
        Self::from_image(vec![0; len.div_ceil(CACHE_LINE) as usize * LINE])
    }

    /// A medium whose durable and visible contents are `image` (a reboot after a crash).
    pub fn from_image(image: Vec<u8>) -> Self {
        assert_eq!(image.len() % LINE, 0, "image must be whole cache lines");
        let lines = image.len() / LINE;
        let len = image.len() as u64;
        Self {
            state: Mutex::new(State {
                durable: image.clone(),
                visible: image,
                dirty: vec![0; lines.div_ceil(64)],
                in_flight: Vec::new(),
                drains: 0,
                crash_at: None,
                crash_image: None,
            }),
            len,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock is a test failure already; keep the data for the report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arm a power failure just before the `at`-th future drain (0 = the next one), with the
    /// surviving subset of unflushed stores chosen by `seed`.
    pub fn arm_crash(&self, at: u64, seed: u64) {
        let mut s = self.lock();
        let at = s.drains + at;
        s.crash_at = Some((at, seed));
        s.crash_image = None;
    }

    /// Number of drains (persist barriers) so far.
    pub fn drains(&self) -> u64 {
        self.lock().drains
    }

    /// True once an armed crash has fired.
    pub fn crashed(&self) -> bool {
        self.lock().crash_image.is_some()
    }

    /// The crash image, once the armed crash has fired.
    pub fn take_crash_image(&self) -> Option<Vec<u8>> {
        self.lock().crash_image.take()
    }

    /// Cut the power now: the image a reboot would see, with unflushed stores chosen by `seed`.
    pub fn power_cut_now(&self, seed: u64) -> Vec<u8> {
        build_crash_image(&self.lock(), seed)
    }

    /// The durable image only (every unflushed store lost).
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }
}

fn build_crash_image(s: &State, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let mut img = s.durable.clone();
    let mut choose_words = |line: usize, candidates: &[&[u8]]| {
        let base = line * LINE;
        for w in (0..LINE).step_by(8) {
            let pick = candidates[rng.below(candidates.len() as u64) as usize];
            img[base + w..base + w + 8].copy_from_slice(&pick[w..w + 8]);
        }
    };
    for (line, snap) in &s.in_flight {
        let base = *line * LINE;
        let durable = &s.durable[base..base + LINE];
        let visible = &s.visible[base..base + LINE];
        choose_words(*line, &[durable, &snap[..], visible]);
    }
    for (word_idx, &word) in s.dirty.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let line = word_idx * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let base = line * LINE;
            choose_words(line, &[&s.durable[base..base + LINE], &s.visible[base..base + LINE]]);
        }
    }
    img
}

fn mark_dirty(s: &mut State, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = (off / CACHE_LINE) as usize;
    let last = ((off + len - 1) / CACHE_LINE) as usize;
    for line in first..=last {
        s.dirty[line / 64] |= 1 << (line % 64);
    }
}

impl Media for SimMedia {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, off: u64, dst: &mut [u8]) {
        check_range(off, dst.len() as u64, self.len);
        let s = self.lock();
        dst.copy_from_slice(&s.visible[off as usize..off as usize + dst.len()]);
    }

    fn write(&self, off: u64, src: &[u8]) {
        check_range(off, src.len() as u64, self.len);
        let mut s = self.lock();
        s.visible[off as usize..off as usize + src.len()].copy_from_slice(src);
        mark_dirty(&mut s, off, src.len() as u64);
    }

    fn fill(&self, off: u64, len: u64, byte: u8) {
        check_range(off, len, self.len);
        let mut s = self.lock();
        s.visible[off as usize..(off + len) as usize].fill(byte);
        mark_dirty(&mut s, off, len);
    }

    fn write_u64_atomic(&self, off: u64, value: u64) {
        assert_eq!(off % 8, 0, "atomic word must be 8-byte aligned");
        self.write(off, &value.to_le_bytes());
    }

    fn flush(&self, off: u64, len: u64) {
        check_range(off, len, self.len);
        if len == 0 {
            return;
        }
        let mut s = self.lock();
        let first = (off / CACHE_LINE) as usize;
        let last = ((off + len - 1) / CACHE_LINE) as usize;
        for line in first..=last {
            let bit = 1u64 << (line % 64);
            if s.dirty[line / 64] & bit != 0 {
                s.dirty[line / 64] &= !bit;
                let mut snap = [0u8; LINE];
                snap.copy_from_slice(&s.visible[line * LINE..(line + 1) * LINE]);
                s.in_flight.push((line, snap));
            }
        }
    }

    fn drain(&self) {
        let mut s = self.lock();
        if let Some((at, seed)) = s.crash_at
            && s.drains == at
        {
            let img = build_crash_image(&s, seed);
            s.crash_image = Some(img);
            s.crash_at = None;
        }
        s.drains += 1;
        let in_flight = std::mem::take(&mut s.in_flight);
        for (line, snap) in in_flight {
            s.durable[line * LINE..(line + 1) * LINE].copy_from_slice(&snap);
        }
    }

    fn mode(&self) -> PoolMode {
        PoolMode::Simulated
    }

    fn persistence(&self) -> Persistence {
        Persistence::Simulated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_stores_survive_and_unflushed_ones_may_not() {
        let m = SimMedia::new(4096);
        m.write(0, &[1u8; 64]);
        m.persist(0, 64);
        m.write(64, &[2u8; 64]);
        let lost = m.durable_image();
        assert_eq!(&lost[0..64], &[1u8; 64]);
        assert_eq!(&lost[64..128], &[0u8; 64]);
        // Across seeds, the unflushed line is sometimes kept, sometimes lost, sometimes torn.
        let (mut kept, mut torn) = (false, false);
        for seed in 0..2000 {
            let img = m.power_cut_now(seed);
            assert_eq!(&img[0..64], &[1u8; 64], "a persisted line must survive");
            let twos = img[64..128].iter().filter(|&&b| b == 2).count();
            kept |= twos == 64;
            torn |= twos != 0 && twos != 64;
            assert_eq!(twos % 8, 0, "tearing happens at 8-byte granularity");
        }
        assert!(kept && torn);
    }

    #[test]
    fn a_flush_without_drain_is_not_yet_durable_and_captures_contents_at_flush_time() {
        let m = SimMedia::new(4096);
        m.write(0, &[1u8; 8]);
        m.flush(0, 8);
        m.write(0, &[3u8; 8]);
        assert_eq!(&m.durable_image()[0..8], &[0u8; 8]);
        m.drain();
        // The drain made the flushed snapshot durable, not the later store.
        assert_eq!(&m.durable_image()[0..8], &[1u8; 8]);
    }

    #[test]
    fn an_armed_crash_fires_before_the_chosen_barrier() {
        let m = SimMedia::new(4096);
        m.arm_crash(1, 7);
        m.write(0, &[9u8; 8]);
        m.persist(0, 8); // barrier 0: takes effect
        m.write(8, &[5u8; 8]);
        m.flush(8, 8);
        m.drain(); // barrier 1: crash fires before it
        let img = m.take_crash_image().expect("crash fired");
        assert_eq!(&img[0..8], &[9u8; 8]);
        assert!(img[8..16] == [5u8; 8] || img[8..16] == [0u8; 8]);
        assert_eq!(m.drains(), 2);
    }
}
