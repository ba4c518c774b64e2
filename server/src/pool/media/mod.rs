//! The medium a pool lives on, and how bytes on it are made durable.
//!
//! Every byte the pool engine stores goes through [`Media`]: `write`, `fill`, and then
//! `flush` + `drain` (or `persist`, which is both). Routing all stores through one small
//! trait keeps the `unsafe` in two places ([`mapped`] and [`flush`]) and lets the crash tests
//! substitute [`sim::SimMedia`], which records every store that has not been flushed yet and
//! can "lose power" with an arbitrary subset of them applied.

pub mod flush;
pub mod mapped;
pub mod overlay;
pub mod pread;
pub mod sim;

use serde::Serialize;

/// What kind of region a pool is mapped from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// A device-DAX character device (`/dev/daxX.Y`).
    DeviceDax,
    /// A file on a DAX-mounted filesystem, mapped with `MAP_SYNC`.
    FsDax,
    /// An ordinary file (development mode): persistence by `msync`.
    File,
    /// Simulated pmem in memory (tests only).
    Simulated,
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::DeviceDax => "device-dax",
            PoolMode::FsDax => "fs-dax",
            PoolMode::File => "file",
            PoolMode::Simulated => "simulated",
        })
    }
}

/// How stores are made durable on a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Persistence {
    /// `CLWB` per cache line, then `SFENCE`.
    Clwb,
    /// `CLFLUSHOPT` per cache line, then `SFENCE`.
    Clflushopt,
    /// `CLFLUSH` per cache line (serialising), then `SFENCE`.
    Clflush,
    /// `msync(MS_SYNC)` of the touched pages.
    Msync,
    /// Nothing: a private, read-only-in-effect mapping used by offline checks.
    None,
    /// The simulated-pmem backend's own bookkeeping.
    Simulated,
}

impl std::fmt::Display for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Persistence::Clwb => "clwb+sfence",
            Persistence::Clflushopt => "clflushopt+sfence",
            Persistence::Clflush => "clflush+sfence",
            Persistence::Msync => "msync",
            Persistence::None => "none (private mapping)",
            Persistence::Simulated => "simulated",
        })
    }
}

/// A byte-addressable, persistent medium.
///
/// Offsets are byte offsets from the start of the pool. Every method panics on an
/// out-of-range access: callers validate user input long before they get here, so an
/// out-of-range access is a bug in the engine, and continuing would corrupt the pool.
pub trait Media: Send + Sync + 'static {
    /// Size of the medium in bytes.
    fn len(&self) -> u64;
    /// Never true for a pool (kept for the `len` convention).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `dst.len()` bytes at `off` into `dst`.
    fn read(&self, off: u64, dst: &mut [u8]);
    /// Store `src` at `off`. Not durable until flushed and drained.
    fn write(&self, off: u64, src: &[u8]);
    /// Store `len` copies of `byte` at `off`. Not durable until flushed and drained.
    fn fill(&self, off: u64, len: u64, byte: u8);
    /// Store one aligned 8-byte word with a single store, so that a power failure leaves
    /// either the old or the new value (x86 guarantees 8-byte failure atomicity).
    fn write_u64_atomic(&self, off: u64, value: u64);
    /// Store `src` at `off` and start its write-back: durable after the next [`Media::drain`].
    /// Mappings with cache-line persistence use non-temporal stores for the whole lines (the
    /// data never lingers in the cache, so no second pass of write-backs is needed).
    fn write_flushed(&self, off: u64, src: &[u8]) {
        self.write(off, src);
        self.flush(off, src.len() as u64);
    }
    /// Start writing back the cache lines covering `[off, off + len)`.
    fn flush(&self, off: u64, len: u64);
    /// [`Media::flush`] of every range in `ranges` (any order; the vector may be reordered).
    /// A medium whose flush is a system call per range (`msync`) merges nearby ranges into
    /// one call.
    fn flush_ranges(&self, ranges: &mut [(u64, u64)]) {
        for &(off, len) in ranges.iter() {
            self.flush(off, len);
        }
    }
    /// Wait until every flush issued so far has reached the persistence domain.
    fn drain(&self);
    /// `flush` + `drain`.
    fn persist(&self, off: u64, len: u64) {
        self.flush(off, len);
        self.drain();
    }
    /// The address of `[off, off + len)` in this process, for transports that let the kernel
    /// or a NIC copy straight into the mapping. `None` when the medium is not mapped memory.
    fn dma_addr(&self, off: u64, len: u64) -> Option<usize> {
        let _ = (off, len);
        None
    }
    /// The first error the storage reported while persisting, if any. Latched: once a
    /// persist failed, durability of anything written since cannot be promised.
    fn failure(&self) -> Option<StorageFailure> {
        None
    }
    /// The region kind.
    fn mode(&self) -> PoolMode;
    /// The persistence method.
    fn persistence(&self) -> Persistence;
    /// Read one little-endian u64.
    fn read_u64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(off, &mut b);
        u64::from_le_bytes(b)
    }
}

/// A persist the storage could not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageFailure {
    /// What failed, e.g. `msync: No space left on device`.
    pub detail: String,
    /// Out of space (ENOSPC, EDQUOT).
    pub no_space: bool,
}

/// Panics unless `[off, off + len)` lies inside a medium of `size` bytes.
#[inline]
pub(crate) fn check_range(off: u64, len: u64, size: u64) {
    let end = off.checked_add(len).expect("media range overflows u64");
    assert!(end <= size, "media access [{off}, {end}) beyond size {size}");
}
