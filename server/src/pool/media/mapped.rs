//! Mapping a pool region: device-DAX, a file on a DAX filesystem, or an ordinary file.
//!
//! * **device-DAX** (`/dev/daxX.Y`): size and alignment come from sysfs; the mapping is
//!   aligned to the device's alignment (2 MiB or 1 GiB) as the driver requires. Stores are
//!   made durable with cache-line write-back; `msync` does not work there (EINVAL).
//! * **fs-DAX**: a regular file mapped `MAP_SHARED_VALIDATE | MAP_SYNC`, which the kernel only
//!   accepts when page faults can never leave dirty filesystem metadata behind; then cache
//!   write-back alone is durable. `EOPNOTSUPP` means the file is not DAX.
//! * **file**: any other regular file (development mode); durability by `msync(MS_SYNC)`.
//!
//! Every mapping starts on a 2 MiB boundary so that 2 MiB-aligned pool offsets are 2 MiB
//! aligned in virtual memory too (PMD-sized DAX faults, seed 001).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::mm::{MapFlags, MsyncFlags, ProtFlags};

use super::flush::{self, CACHE_LINE};
use super::{Media, Persistence, PoolMode, check_range};

/// `STATX_ATTR_DAX` from `linux/stat.h`.
const STATX_ATTR_DAX: u64 = 0x0020_0000;
/// Virtual alignment of every mapping.
pub const MAP_ALIGN: usize = 2 << 20;
const PAGE: u64 = 4096;

/// How to obtain the region.
#[derive(Debug, Clone, Copy)]
pub enum Region {
    /// Open an existing region.
    Open,
    /// Create a new pool file of `size` bytes (for a device, use the whole device).
    /// With `overwrite`, an existing regular file is truncated and recreated.
    Create {
        /// Bytes; ignored for device-DAX, which uses the whole device.
        size: u64,
        /// Replace an existing file.
        overwrite: bool,
        /// Leave the file sparse instead of allocating its blocks (benchmarks of pools larger
        /// than the disk; a full filesystem can then fault the mapping).
        sparse: bool,
    },
    /// Map shared but read-only (`PROT_READ`): offline checks, which replay the journal into
    /// an [`super::overlay::OverlayMedia`] instead of the pool. (`MAP_PRIVATE` would be simpler,
    /// but device-DAX refuses private mappings.)
    ReadOnly,
}

/// Why a region could not be mapped safely.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A system call failed.
    #[error("{path}: failed to {op}: {source}")]
    Io {
        /// The region path.
        path: PathBuf,
        /// What was being done, as a verb phrase.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The pool file exists and overwriting was not requested.
    #[error("{path} already exists; pass --force to overwrite it (this destroys what it holds)")]
    Exists {
        /// The region path.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a device-DAX character device.
    #[error("{path}: not a regular file or a device-DAX character device ({detail})")]
    Unsupported {
        /// The region path.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// The filesystem has no room for the pool's blocks.
    #[error(
        "{path}: not enough free space to allocate {needed} bytes for the pool ({free} bytes free on its \
         filesystem); free space or put the pool on a larger filesystem (a pool file is fully allocated so that \
         a full disk can never fault its mapping)"
    )]
    NoSpace {
        /// The region path.
        path: PathBuf,
        /// Bytes that had to be allocated.
        needed: u64,
        /// Bytes free on the filesystem.
        free: u64,
    },
    /// The filesystem says the file is DAX but refuses `MAP_SYNC`.
    #[error(
        "{path}: the filesystem reports the file as DAX but refuses mmap(MAP_SYNC) ({source}); \
         stores to it could not be made durable safely. Mount the filesystem with `-o dax=always` \
         on a pmem device with a kernel that supports MAP_SYNC, or keep development pools on a \
         non-DAX filesystem"
    )]
    DaxWithoutMapSync {
        /// The region path.
        path: PathBuf,
        /// The mmap error.
        source: io::Error,
    },
}

/// A mapped pool region.
pub struct MappedMedia {
    base: NonNull<u8>,
    len: usize,
    mode: PoolMode,
    persistence: Persistence,
    /// True when the region was created here from nothing: every byte reads zero.
    fresh_zero: bool,
    /// False for a [`Region::ReadOnly`] mapping: stores are a bug and are refused loudly.
    writable: bool,
    /// The first failed `msync`.
    failed: std::sync::OnceLock<super::StorageFailure>,
    _file: File,
}

// SAFETY: `MappedMedia` owns a shared mapping that lives until drop; the raw pointer is only
// dereferenced through bounds-checked copies. Concurrent stores to the same bytes are the
// engine's business (it serialises metadata; data ranges behave like shared memory).
unsafe impl Send for MappedMedia {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for MappedMedia {}

impl std::fmt::Debug for MappedMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedMedia")
            .field("len", &self.len)
            .field("mode", &self.mode)
            .field("persistence", &self.persistence)
            .finish()
    }
}

impl MappedMedia {
    /// Map `path` as described by `region`. `force_cache_flush` replaces `msync` with the
    /// CPU's cache write-back on an ordinary file: only for benchmarks that want to measure a
    /// DAX-style code path on a machine without pmem — it is **not durable** on such a file.
    pub fn map(path: &Path, region: Region, force_cache_flush: bool) -> Result<Self, MapError> {
        let io_err = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| MapError::Io { path, op, source }
        };
        let (file, fresh_zero) = open_file(path, region)?;
        let meta = file.metadata().map_err(io_err("stat the region"))?;
        let private = matches!(region, Region::ReadOnly);
        let ft = meta.file_type();
        if ft.is_char_device() {
            let (size, align) = device_dax_geometry(path, meta.rdev())?;
            let flags = shared_flags(private, true);
            let base = map_aligned(&file, size, align.max(MAP_ALIGN), flags, private)
                .or_else(|_| map_aligned(&file, size, align.max(MAP_ALIGN), shared_flags(private, false), private))
                .map_err(io_err("map the device-DAX region"))?;
            return Ok(Self::new(base, size, PoolMode::DeviceDax, cache_or_none(private), fresh_zero, file));
        }
        if !ft.is_file() {
            return Err(MapError::Unsupported { path: path.to_path_buf(), detail: format!("{ft:?}") });
        }
        let size = usize::try_from(meta.len() / PAGE * PAGE).map_err(|_| MapError::Unsupported {
            path: path.to_path_buf(),
            detail: "file larger than the address space".into(),
        })?;
        if size == 0 {
            return Err(MapError::Unsupported { path: path.to_path_buf(), detail: "empty file".into() });
        }
        let statx_dax = statx_says_dax(path);
        if private {
            let base =
                map_aligned(&file, size, MAP_ALIGN, MapFlags::SHARED, true).map_err(io_err("map the pool file"))?;
            let mode = if statx_dax { PoolMode::FsDax } else { PoolMode::File };
            return Ok(Self::new(base, size, mode, Persistence::None, fresh_zero, file));
        }
        match map_aligned(&file, size, MAP_ALIGN, shared_flags(private, true), false) {
            Ok(base) => Ok(Self::new(base, size, PoolMode::FsDax, cache_or_none(private), fresh_zero, file)),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && !statx_dax => {
                let base = map_aligned(&file, size, MAP_ALIGN, shared_flags(private, false), false)
                    .map_err(io_err("map the pool file"))?;
                let persistence = if private {
                    Persistence::None
                } else if force_cache_flush {
                    flush::detect()
                } else {
                    Persistence::Msync
                };
                Ok(Self::new(base, size, PoolMode::File, persistence, fresh_zero, file))
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Err(MapError::DaxWithoutMapSync { path: path.to_path_buf(), source: e })
            }
            Err(e) => Err(io_err("map the pool file")(e)),
        }
    }

    fn new(
        base: NonNull<u8>,
        len: usize,
        mode: PoolMode,
        persistence: Persistence,
        fresh_zero: bool,
        file: File,
    ) -> Self {
        let writable = persistence != Persistence::None;
        Self { base, len, mode, persistence, fresh_zero, writable, failed: std::sync::OnceLock::new(), _file: file }
    }

    /// Whether `path` is a file on a DAX filesystem (statx says so).
    pub fn is_fsdax_file(path: &Path) -> bool {
        statx_says_dax(path)
    }

    /// True when this region was created from nothing (all bytes zero).
    pub fn fresh_zero(&self) -> bool {
        self.fresh_zero
    }

    fn ptr(&self, off: u64, len: u64) -> *mut u8 {
        check_range(off, len, self.len as u64);
        // SAFETY: `off + len <= self.len` (checked above), so the result stays inside the
        // mapping that starts at `base`.
        unsafe { self.base.as_ptr().add(off as usize) }
    }
}

fn cache_or_none(private: bool) -> Persistence {
    if private { Persistence::None } else { flush::detect() }
}

fn shared_flags(read_only: bool, sync: bool) -> MapFlags {
    match (read_only, sync) {
        (true, _) => MapFlags::SHARED,
        (false, true) => MapFlags::SHARED_VALIDATE | MapFlags::SYNC,
        (false, false) => MapFlags::SHARED,
    }
}

fn open_file(path: &Path, region: Region) -> Result<(File, bool), MapError> {
    let io_err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| MapError::Io { path, op, source }
    };
    match region {
        Region::Open => {
            let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open the pool"))?;
            Ok((f, false))
        }
        Region::ReadOnly => {
            let f = OpenOptions::new().read(true).open(path).map_err(io_err("open the pool"))?;
            Ok((f, false))
        }
        Region::Create { size, overwrite, sparse } => {
            if let Ok(m) = std::fs::metadata(path)
                && m.file_type().is_char_device()
            {
                let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open the device"))?;
                return Ok((f, false));
            }
            let mut o = OpenOptions::new();
            o.read(true).write(true).mode(0o600);
            if overwrite {
                o.create(true).truncate(true);
            } else {
                o.create_new(true);
            }
            let f = o.open(path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    MapError::Exists { path: path.to_path_buf() }
                } else {
                    io_err("create the pool file")(e)
                }
            })?;
            f.set_len(size).map_err(io_err("size the pool file"))?;
            if sparse {
                return Ok((f, true));
            }
            if let Err(e) = allocate(path, &f, 0, size) {
                drop(f);
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            Ok((f, true))
        }
    }
}

fn free_bytes(file: &File) -> u64 {
    rustix::fs::fstatvfs(file).map_or(0, |v| v.f_bavail.saturating_mul(v.f_frsize))
}

/// Give `[off, off + len)` of the file real blocks (reading zero), so that no store through
/// the mapping can ever need the filesystem to find room: on a full filesystem such a store
/// would fault with SIGBUS. Falls back to writing zeros where `fallocate` is not supported.
fn allocate(path: &Path, file: &File, off: u64, len: u64) -> Result<(), MapError> {
    use rustix::fs::FallocateFlags;
    let no_space = || MapError::NoSpace { path: path.to_path_buf(), needed: len, free: free_bytes(file) };
    // Refuse up front: a fallocate that cannot succeed may fill the filesystem before failing.
    if free_bytes(file) < len {
        return Err(no_space());
    }
    match rustix::fs::fallocate(file, FallocateFlags::empty(), off, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => Err(no_space()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = off;
            while at < off + len {
                let n = ((off + len - at) as usize).min(zeros.len());
                match file.write_all_at(&zeros[..n], at) {
                    Ok(()) => at += n as u64,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Err(no_space()),
                    Err(source) => {
                        return Err(MapError::Io {
                            path: path.to_path_buf(),
                            op: "write zeros into the pool file",
                            source,
                        });
                    }
                }
            }
            file.sync_all().map_err(|source| MapError::Io {
                path: path.to_path_buf(),
                op: "fsync the pool file",
                source,
            })
        }
        Err(e) => Err(MapError::Io { path: path.to_path_buf(), op: "allocate the pool file", source: e.into() }),
    }
}

/// A pool file without all its blocks (made sparse by an older rdax, or copied without them)
/// gets them allocated before it is mapped (the daemon does this on open), with progress in
/// the log; without room, this fails. (The block count decides: SEEK_HOLE reports ext4's
/// allocated-but-unwritten extents as holes.)
pub fn allocate_file(path: &Path) -> Result<(), MapError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| MapError::Io { path, op, source }
    };
    let meta = std::fs::metadata(path).map_err(io("stat the pool"))?;
    if !meta.is_file() {
        return Ok(()); // a device has no holes
    }
    let file = OpenOptions::new().write(true).open(path).map_err(io("open the pool"))?;
    allocate_holes(path, &file, meta.len())
}

fn allocate_holes(path: &Path, file: &File, size: u64) -> Result<(), MapError> {
    use std::os::unix::fs::MetadataExt;
    let allocated = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    if allocated >= size {
        return Ok(());
    }
    let missing = size - allocated;
    tracing::info!(path = %path.display(), bytes = missing, "the pool file is sparse: allocating its blocks on disk");
    if free_bytes(file) < missing {
        return Err(MapError::NoSpace { path: path.to_path_buf(), needed: missing, free: free_bytes(file) });
    }
    let mut at = 0;
    while at < size {
        let n = (size - at).min(1 << 30);
        allocate(path, file, at, n)?;
        at += n;
        if at < size {
            tracing::info!(path = %path.display(), done = at, total = size, "allocating the pool file");
        }
    }
    tracing::info!(path = %path.display(), bytes = missing, "the pool file is fully allocated");
    Ok(())
}

/// Size and alignment of a device-DAX character device, from sysfs.
fn device_dax_geometry(path: &Path, rdev: u64) -> Result<(usize, usize), MapError> {
    let (maj, min) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let dir = PathBuf::from(format!("/sys/dev/char/{maj}:{min}"));
    let subsystem = std::fs::read_link(dir.join("subsystem")).ok();
    let is_dax = subsystem.as_ref().and_then(|p| p.file_name()).is_some_and(|n| n == "dax");
    let size = read_sysfs_u64(&dir.join("size"));
    match (is_dax, size) {
        (true, Some(size)) if size > 0 => {
            let align = read_sysfs_u64(&dir.join("align"))
                .or_else(|| read_sysfs_u64(&dir.join("device/align")))
                .unwrap_or(MAP_ALIGN as u64);
            Ok((size as usize, align as usize))
        }
        _ => Err(MapError::Unsupported {
            path: path.to_path_buf(),
            detail: format!("character device {maj}:{min} is not a device-DAX instance (see {})", dir.display()),
        }),
    }
}

fn read_sysfs_u64(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Whether statx reports `STATX_ATTR_DAX` for the file.
fn statx_says_dax(path: &Path) -> bool {
    use rustix::fs::{AtFlags, CWD, StatxFlags, statx};
    match statx(CWD, path, AtFlags::empty(), StatxFlags::BASIC_STATS) {
        Ok(st) => st.stx_attributes_mask.bits() & STATX_ATTR_DAX != 0 && st.stx_attributes.bits() & STATX_ATTR_DAX != 0,
        Err(_) => false,
    }
}

/// Map `len` bytes of `file` at a virtual address aligned to `align`.
fn map_aligned(file: &File, len: usize, align: usize, flags: MapFlags, read_only: bool) -> io::Result<NonNull<u8>> {
    let prot = if read_only { ProtFlags::READ } else { ProtFlags::READ | ProtFlags::WRITE };
    let reserve = len.checked_add(align).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: an anonymous PROT_NONE reservation at a kernel-chosen address cannot alias any
    // existing Rust object.
    let r = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            reserve,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }?;
    let r_addr = r as usize;
    let aligned = (r_addr + align - 1) & !(align - 1);
    // SAFETY: `[aligned, aligned + len)` lies inside the reservation we own, so MAP_FIXED only
    // replaces our own PROT_NONE pages.
    let mapped = unsafe { rustix::mm::mmap(aligned as *mut _, len, prot, flags | MapFlags::FIXED, file, 0) };
    match mapped {
        Ok(p) => {
            // SAFETY: head and tail are the unused parts of our own reservation.
            unsafe {
                if aligned > r_addr {
                    let _ = rustix::mm::munmap(r, aligned - r_addr);
                }
                let tail = aligned + len;
                if r_addr + reserve > tail {
                    let _ = rustix::mm::munmap(tail as *mut _, r_addr + reserve - tail);
                }
            }
            Ok(NonNull::new(p.cast::<u8>()).expect("mmap returned null"))
        }
        Err(e) => {
            // SAFETY: the whole reservation is ours and nothing else was mapped into it.
            unsafe {
                let _ = rustix::mm::munmap(r, reserve);
            }
            Err(e.into())
        }
    }
}

impl Drop for MappedMedia {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is the mapping created in `map`, and no references into it
        // outlive `self` (all access is by copy).
        unsafe {
            let _ = rustix::mm::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl Media for MappedMedia {
    fn len(&self) -> u64 {
        self.len as u64
    }

    fn read(&self, off: u64, dst: &mut [u8]) {
        let p = self.ptr(off, dst.len() as u64);
        // SAFETY: `p..p + dst.len()` is inside the mapping (checked by `ptr`); `dst` is a
        // distinct Rust buffer, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
    }

    fn write(&self, off: u64, src: &[u8]) {
        assert!(self.writable, "store to a read-only mapping");
        let p = self.ptr(off, src.len() as u64);
        // SAFETY: as in `read`, with the direction reversed.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
    }

    fn fill(&self, off: u64, len: u64, byte: u8) {
        assert!(self.writable, "store to a read-only mapping");
        let p = self.ptr(off, len);
        // SAFETY: `p..p + len` is inside the mapping (checked by `ptr`).
        unsafe { std::ptr::write_bytes(p, byte, len as usize) };
    }

    fn write_u64_atomic(&self, off: u64, value: u64) {
        assert!(self.writable, "store to a read-only mapping");
        assert_eq!(off % 8, 0, "atomic word must be 8-byte aligned");
        let p = self.ptr(off, 8).cast::<u64>();
        // SAFETY: `p` is inside the mapping, 8-byte aligned (mapping base is page aligned);
        // a volatile aligned u64 store is a single `mov`.
        unsafe { std::ptr::write_volatile(p, value.to_le()) };
    }

    fn write_flushed(&self, off: u64, src: &[u8]) {
        assert!(self.writable, "store to a read-only mapping");
        match self.persistence {
            Persistence::Clwb | Persistence::Clflushopt | Persistence::Clflush => {
                let p = self.ptr(off, src.len() as u64);
                // SAFETY: `p..p + src.len()` is inside the mapping (checked by `ptr`), `src` is
                // a distinct Rust buffer, and the method came from `detect()`.
                unsafe { flush::copy_flushed(self.persistence, p, src.as_ptr(), src.len()) }
            }
            _ => {
                self.write(off, src);
                self.flush(off, src.len() as u64);
            }
        }
    }

    fn flush(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let p = self.ptr(off, len);
        match self.persistence {
            Persistence::Clwb | Persistence::Clflushopt | Persistence::Clflush => {
                // SAFETY: the range is inside the mapping; the method came from `detect()`.
                unsafe { flush::flush_lines(self.persistence, p, len as usize) }
            }
            Persistence::Msync => {
                let start = off / PAGE * PAGE;
                let end = (off + len).div_ceil(PAGE) * PAGE;
                let end = end.min(self.len as u64);
                // SAFETY: `[start, end)` is page aligned and inside the mapping.
                let r = unsafe {
                    rustix::mm::msync(
                        self.base.as_ptr().add(start as usize).cast(),
                        (end - start) as usize,
                        MsyncFlags::SYNC,
                    )
                };
                if let Err(e) = r {
                    // The data may not be durable, and (as with fsync errors in databases) a
                    // retry would not tell: latch the failure; the pool refuses every further
                    // change and is not marked clean.
                    let f = super::StorageFailure {
                        detail: format!("msync: {e}"),
                        no_space: e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT,
                    };
                    if self.failed.set(f).is_ok() {
                        tracing::error!(error = %e, "msync of the pool failed: durability can no longer be promised; refusing changes until restart");
                    }
                }
            }
            Persistence::None | Persistence::Simulated => {}
        }
    }

    fn flush_ranges(&self, ranges: &mut [(u64, u64)]) {
        if self.persistence != Persistence::Msync {
            for &(off, len) in ranges.iter() {
                self.flush(off, len);
            }
            return;
        }
        // One msync per cluster of ranges: a call costs far more than walking the clean
        // pages between the ranges of one cluster.
        const GAP: u64 = 1 << 20;
        ranges.sort_unstable();
        let mut span: Option<(u64, u64)> = None;
        for &(off, len) in ranges.iter().filter(|r| r.1 > 0) {
            span = match span {
                Some((s, e)) if off <= e + GAP => Some((s, e.max(off + len))),
                Some((s, e)) => {
                    self.flush(s, e - s);
                    Some((off, off + len))
                }
                None => Some((off, off + len)),
            };
        }
        if let Some((s, e)) = span {
            self.flush(s, e - s);
        }
    }

    fn drain(&self) {
        if matches!(self.persistence, Persistence::Clwb | Persistence::Clflushopt | Persistence::Clflush) {
            flush::sfence();
        }
    }

    fn dma_addr(&self, off: u64, len: u64) -> Option<usize> {
        Some(self.ptr(off, len) as usize)
    }

    fn failure(&self) -> Option<super::StorageFailure> {
        self.failed.get().cloned()
    }

    fn mode(&self) -> PoolMode {
        self.mode
    }

    fn persistence(&self) -> Persistence {
        self.persistence
    }
}

#[allow(dead_code)]
const _: () = assert!(CACHE_LINE == 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_file_maps_as_file_mode_with_msync_and_is_2mib_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pool");
        let m = MappedMedia::map(&p, Region::Create { size: 4 << 20, overwrite: false, sparse: false }, false).unwrap();
        assert_eq!(m.mode(), PoolMode::File);
        assert_eq!(m.persistence(), Persistence::Msync);
        assert!(m.fresh_zero());
        assert_eq!(m.base.as_ptr() as usize % MAP_ALIGN, 0);
        m.write(4096, b"hello");
        m.persist(4096, 5);
        drop(m);
        let m = MappedMedia::map(&p, Region::Open, false).unwrap();
        let mut b = [0u8; 5];
        m.read(4096, &mut b);
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn pool_files_are_fully_allocated_and_holes_are_filled_on_open() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pool");
        let m = MappedMedia::map(&p, Region::Create { size: 8 << 20, overwrite: false, sparse: false }, false).unwrap();
        drop(m);
        let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(allocated(&p) >= 8 << 20, "created pool files own their blocks ({} allocated)", allocated(&p));
        // A sparse file (as older rdax made them) gets its blocks allocated when opened.
        let sparse = dir.path().join("sparse");
        std::fs::File::create(&sparse).unwrap().set_len(8 << 20).unwrap();
        assert!(allocated(&sparse) < 8 << 20);
        allocate_file(&sparse).unwrap();
        assert!(allocated(&sparse) >= 8 << 20, "every hole was allocated");
        drop(MappedMedia::map(&sparse, Region::Open, false).unwrap());
    }

    #[test]
    fn create_refuses_an_existing_file_without_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pool");
        std::fs::write(&p, b"precious").unwrap();
        let e =
            MappedMedia::map(&p, Region::Create { size: 4 << 20, overwrite: false, sparse: false }, false).unwrap_err();
        assert!(matches!(e, MapError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn a_read_only_mapping_reads_and_refuses_stores() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pool");
        let m = MappedMedia::map(&p, Region::Create { size: 1 << 20, overwrite: false, sparse: false }, false).unwrap();
        m.write(8, b"abc");
        m.persist(8, 3);
        drop(m);
        let m = MappedMedia::map(&p, Region::ReadOnly, false).unwrap();
        assert_eq!(m.persistence(), Persistence::None);
        let mut b = [0u8; 3];
        m.read(8, &mut b);
        assert_eq!(&b, b"abc");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.write(0, b"x")));
        assert!(r.is_err(), "a store must be refused");
    }

    #[test]
    fn a_character_device_that_is_not_dax_is_refused() {
        let e = MappedMedia::map(Path::new("/dev/null"), Region::Open, false).unwrap_err();
        assert!(matches!(e, MapError::Unsupported { .. }), "{e}");
    }

    #[test]
    fn forced_cache_flush_uses_the_cpu_method() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pool");
        let m = MappedMedia::map(&p, Region::Create { size: 1 << 20, overwrite: false, sparse: false }, true).unwrap();
        assert_eq!(m.persistence(), flush::detect());
        m.fill(100, 5000, 0xAB);
        m.persist(100, 5000);
        let mut b = vec![0u8; 5000];
        m.read(100, &mut b);
        assert!(b.iter().all(|&x| x == 0xAB));
    }
}
