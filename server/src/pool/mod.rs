//! The pool engine: one pmem region as a set of named, resizable objects.
//!
//! ```text
//!  Pool ─┬─ media      (Media: mapped DAX/file region, or simulated pmem)
//!        ├─ superblock (geometry, identity; written once)
//!        ├─ meta       (RwLock: object table in DRAM, names index)
//!        ├─ group      (the journal, and the transactions queued for its next group commit)
//!        └─ alloc      (Mutex: free extents; reached through the release hook too)
//! ```
//!
//! Every metadata change is one journal transaction ([`journal`]), committed together with
//! those of concurrent operations ([`group`]); data bytes go straight to the mapping. Lock
//! order: `meta` before `alloc`, and `meta` before the group's locks. Blocks leave an object through
//! [`ReleasedBlocks`], handed to the release hook once the metadata lock is dropped: the
//! default hook frees them at once; the lease layer holds them until every lease that covered
//! them has drained (invariant 1).
//!
//! See `docs/pool-format.md` for the on-media format.

pub mod alloc;
pub mod check;
mod data;
pub mod error;
pub mod extmap;
mod group;
pub mod journal;
pub mod layout;
pub mod media;
mod ops;
pub mod rng;
mod scan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tracing::info;

pub use error::{ObjError, OpenError};
pub use ops::{ListPage, ObjectStat, Segment};

use alloc::{Allocator, FreeStats, Run};
use extmap::ExtentMap;
use journal::{Journal, Recovered};
use layout::{
    BLOCK, FLAG_VIRGIN_ZERO, FORMAT_VERSION, FormatOptions, Geometry, MetaHeader, Superblock, SuperblockError,
};
use media::mapped::{MappedMedia, Region};
use media::{Media, Persistence, PoolMode};

/// What an open pool is and how it persists, for logs, the info RPC and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolInfo {
    /// Path of the region, if it came from one.
    pub path: Option<PathBuf>,
    /// Region kind.
    pub mode: PoolMode,
    /// Persistence method.
    pub persistence: Persistence,
    /// Pool identity.
    pub uuid: String,
    /// On-media format version.
    pub format_version: u32,
    /// Layout.
    pub geometry: Geometry,
    /// Whether opening replayed a committed transaction that a crash left unapplied.
    pub replayed_transaction: bool,
    /// Whether the previous user closed the pool cleanly ([`Pool::close`]).
    pub previous_shutdown_clean: bool,
}

/// Usage figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStats {
    /// Live objects.
    pub objects: u64,
    /// Live extents.
    pub extents: u64,
    /// Blocks in the data area.
    pub data_blocks: u64,
    /// Blocks owned by objects.
    pub used_blocks: u64,
    /// Blocks released by objects but held back (e.g. until DMA drains).
    pub held_blocks: u64,
    /// Blocks kept out of the allocator for good (until the pool is opened again), because a
    /// device's access to them could not be proven stopped.
    pub quarantined_blocks: u64,
    /// Free space.
    pub free: FreeStats,
    /// Share of free space not available as 2 MiB-aligned runs.
    pub fragmentation: f64,
    /// Journal commits since the pool was opened.
    pub journal_commits: u64,
    /// Metadata transactions made durable by them (more than `journal_commits` when
    /// concurrent operations shared a group commit).
    pub journal_transactions: u64,
}

/// Options for opening an existing pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Use CPU cache flushes instead of `msync` on an ordinary file. **Not durable** there:
    /// for benchmarks that measure the DAX code path on machines without pmem.
    pub force_cache_flush: bool,
    /// Allocate the blocks of a sparse pool file before mapping it (the daemon does; a sparse
    /// pool would fault its mapping with SIGBUS when the filesystem fills).
    pub allocate: bool,
}

/// Options for creating a pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Replace an existing pool file or overwrite a device that holds a pool.
    pub overwrite: bool,
    /// Table sizes.
    pub format: FormatOptions,
    /// As in [`OpenOptions`].
    pub force_cache_flush: bool,
    /// Leave a pool file sparse instead of allocating its blocks: only for benchmarks of pools
    /// larger than the disk (a full filesystem can then fault the mapping with SIGBUS).
    pub sparse: bool,
}

/// Blocks an object no longer references. Returned to the allocator when dropped or when
/// [`ReleasedBlocks::free`] is called — so whoever holds the value holds the blocks.
#[must_use = "dropping ReleasedBlocks frees the blocks at once"]
pub struct ReleasedBlocks {
    runs: Vec<Run>,
    alloc: Arc<Mutex<Allocator>>,
    held: Arc<AtomicU64>,
    quarantined: Arc<AtomicU64>,
}

impl std::fmt::Debug for ReleasedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleasedBlocks").field("runs", &self.runs).finish()
    }
}

impl ReleasedBlocks {
    /// The pool block runs, `(first block, count)`.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Blocks in these runs.
    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Return the blocks to the allocator now.
    pub fn free(self) {
        drop(self)
    }

    /// Never return these blocks to the allocator (until the pool is opened again): a device
    /// may still write to them. Counted in [`PoolStats::quarantined_blocks`].
    pub fn quarantine(mut self) {
        let n = self.blocks();
        self.runs.clear();
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.quarantined.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for ReleasedBlocks {
    fn drop(&mut self) {
        if self.runs.is_empty() {
            return;
        }
        let mut a = lock(&self.alloc);
        let mut n = 0;
        for &(s, l) in &self.runs {
            a.free(s, l);
            n += l;
        }
        self.held.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Receives every batch of blocks that leaves an object (see [`ReleasedBlocks`]).
pub type ReleaseHook = Arc<dyn Fn(ReleasedBlocks) + Send + Sync>;

pub(crate) struct Obj {
    pub id: u64,
    pub size: u64,
    pub created_ns: u64,
    /// Slot flags (`layout::OBJ_FLAG_*`).
    pub flags: u8,
    pub map: ExtentMap,
    /// Bumped by every change that takes blocks away (DRAM only: a grant compares it before
    /// and after reading the layout).
    pub epoch: u64,
}

pub(crate) struct Meta {
    pub hdr: MetaHeader,
    /// Indexed by object slot; `len() == hdr.obj_hwm`.
    pub objects: Vec<Option<Obj>>,
    /// `namespace \0 name` → slot. Ordered, so listing a namespace is a range scan.
    pub names: BTreeMap<Box<[u8]>, u32>,
    pub free_obj: Vec<u32>,
    pub free_ext: Vec<u32>,
    pub live_ext: u64,
}

/// An open pool.
pub struct Pool {
    media: Arc<dyn Media>,
    sb: Superblock,
    path: Option<PathBuf>,
    meta: RwLock<Meta>,
    group: group::Group,
    /// Commit at once when the journal is idle (cache-flush media; see
    /// [`group::Group::commit_now`]).
    commit_inline: bool,
    alloc: Arc<Mutex<Allocator>>,
    held: Arc<AtomicU64>,
    quarantined: Arc<AtomicU64>,
    hook: RwLock<ReleaseHook>,
    /// Set by [`Pool::close_shared`]: no change is accepted after it.
    closed: std::sync::atomic::AtomicBool,
    recovered: Recovered,
    previous_clean: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("path", &self.path).field("geometry", &self.sb.geo).finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a pool lock aborts the process (panic = abort in the daemon);
    // in tests, surface the original panic rather than a poison error.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Pool {
    /// Create a pool at `path` (a new file of `size` bytes, or a whole device-DAX device).
    pub fn create(path: &Path, size: u64, opts: CreateOptions) -> Result<Self, OpenError> {
        Geometry::compute(size, opts.format).map_err(|source| OpenError::Geometry { path: path.into(), source })?;
        let region = Region::Create { size, overwrite: opts.overwrite, sparse: opts.sparse };
        let m = MappedMedia::map(path, region, opts.force_cache_flush)?;
        let fresh = m.fresh_zero();
        if m.mode() == PoolMode::DeviceDax && !opts.overwrite {
            let mut b = [0u8; 8];
            m.read(0, &mut b);
            if b == layout::MAGIC {
                return Err(OpenError::Exists { path: path.into() });
            }
        }
        Self::format_media(Arc::new(m), fresh, opts.format, Some(path))
    }

    /// Open the pool at `path`, replaying the journal.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self, OpenError> {
        if opts.allocate {
            media::mapped::allocate_file(path)?;
        }
        let m = MappedMedia::map(path, Region::Open, opts.force_cache_flush)?;
        Self::open_media(Arc::new(m), Some(path))
    }

    /// Format `media` as an empty pool and open it. `fresh_zero` says every byte reads zero
    /// already (a new sparse file), which spares zeroing the tables and the data area.
    pub fn format_media(
        media: Arc<dyn Media>,
        fresh_zero: bool,
        opts: FormatOptions,
        path: Option<&Path>,
    ) -> Result<Self, OpenError> {
        let p = path.map_or_else(|| PathBuf::from("<memory>"), Path::to_path_buf);
        let geo =
            Geometry::compute(media.len(), opts).map_err(|source| OpenError::Geometry { path: p.clone(), source })?;
        // Invalidate any old superblock first: a crash mid-format must not leave an old
        // superblock in front of half-cleared tables.
        media.fill(0, BLOCK, 0);
        media.persist(0, BLOCK);
        if !fresh_zero {
            let meta_end = geo.data_start * BLOCK;
            media.fill(geo.meta_off, meta_end - geo.meta_off, 0);
            media.persist(geo.meta_off, meta_end - geo.meta_off);
        }
        let hdr = MetaHeader { next_object_id: 1, obj_hwm: 0, ext_hwm: 0, data_hwm: geo.data_start, clean: true };
        media.write(geo.meta_off, &hdr.encode());
        media.persist(geo.meta_off, MetaHeader::LEN as u64);
        Journal::format(media.as_ref(), &geo);
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let sb = Superblock {
            version: FORMAT_VERSION,
            flags: if fresh_zero { FLAG_VIRGIN_ZERO } else { 0 },
            uuid,
            created_ns: now_ns(),
            geo,
        };
        media.write(0, &sb.encode());
        media.persist(0, Superblock::LEN as u64);
        info!(path = %p.display(), size = geo.pool_size, data_blocks = geo.data_blocks, "formatted pool");
        Self::open_media(media, path)
    }

    /// Open the pool on `media`: verify the superblock, replay the journal, rebuild DRAM state.
    pub fn open_media(media: Arc<dyn Media>, path: Option<&Path>) -> Result<Self, OpenError> {
        let p = path.map_or_else(|| PathBuf::from("<memory>"), Path::to_path_buf);
        let sb = read_superblock(media.as_ref(), &p)?;
        let geo = sb.geo;
        let damaged = |detail: String| OpenError::Damaged { path: p.clone(), detail };
        let (mut journal, recovered) = Journal::recover(media.as_ref(), &geo).map_err(|e| damaged(e.to_string()))?;
        let hdr =
            read_meta_header(media.as_ref(), &geo).ok_or_else(|| damaged("meta header checksum mismatch".into()))?;
        let mut a = scan::analyze(media.as_ref(), &geo, &hdr, false);
        if let Some(first) = a.problems.first() {
            let more = a.problems.len() - 1;
            return Err(damaged(if more > 0 { format!("{first}; and {more} more") } else { first.clone() }));
        }
        let allocator = a.allocator.take().expect("no problems means an allocator");
        let mut objects: Vec<Option<Obj>> = Vec::new();
        objects.resize_with(hdr.obj_hwm as usize, || None);
        let mut names = BTreeMap::new();
        for o in a.objects {
            names.insert(name_key(&o.rec.ns, &o.rec.name), o.slot);
            objects[o.slot as usize] = Some(Obj {
                id: o.rec.id,
                size: o.rec.size,
                created_ns: o.rec.created_ns,
                flags: o.rec.flags,
                map: o.map,
                epoch: 0,
            });
        }
        let previous_clean = hdr.clean;
        let mut meta = Meta {
            hdr,
            objects,
            names,
            free_obj: a.free_obj_slots.into_iter().rev().collect(),
            free_ext: a.free_ext_slots.into_iter().rev().collect(),
            live_ext: a.live_extents,
        };
        if meta.hdr.clean {
            // From now until `close`, a crash is an unclean shutdown.
            meta.hdr.clean = false;
            let mut txn = journal::Txn::new();
            txn.write(geo.meta_off, &meta.hdr.encode());
            journal.commit(media.as_ref(), &txn).expect("one-record transaction fits");
        }
        let commit_inline = matches!(
            media.persistence(),
            Persistence::Clwb | Persistence::Clflushopt | Persistence::Clflush | Persistence::None
        );
        let pool = Self {
            media,
            sb,
            path: path.map(Path::to_path_buf),
            meta: RwLock::new(meta),
            group: group::Group::new(journal),
            // Simulated pmem queues every commit, so the crash tests drive group commit.
            commit_inline,
            alloc: Arc::new(Mutex::new(allocator)),
            held: Arc::new(AtomicU64::new(0)),
            quarantined: Arc::new(AtomicU64::new(0)),
            hook: RwLock::new(Arc::new(drop)),
            closed: false.into(),
            recovered,
            previous_clean,
        };
        let info = pool.info();
        info!(
            path = %p.display(), mode = %info.mode, persistence = %info.persistence,
            objects = pool.read_meta().names.len(), replayed = recovered.replayed,
            previous_shutdown_clean = previous_clean, "opened pool"
        );
        Ok(pool)
    }

    /// What this pool is and how it persists.
    pub fn info(&self) -> PoolInfo {
        PoolInfo {
            path: self.path.clone(),
            mode: self.media.mode(),
            persistence: self.media.persistence(),
            uuid: uuid::Uuid::from_bytes(self.sb.uuid).to_string(),
            format_version: self.sb.version,
            geometry: self.sb.geo,
            replayed_transaction: self.recovered.replayed,
            previous_shutdown_clean: self.previous_clean,
        }
    }

    /// Make everything written so far durable and mark the pool cleanly closed. Metadata is
    /// always durable already; this also persists object data written without the persist
    /// flag (on an `msync` pool, the whole mapping is synced; on DAX a store fence suffices
    /// because nothing is lost while the machine keeps power).
    pub fn close(self) {
        self.close_shared();
    }

    /// [`close`](Self::close) through a shared reference: whoever else still holds the pool
    /// gets [`ObjError::Closed`] from every change from now on (reads keep working). Idempotent.
    pub fn close_shared(&self) {
        let mut meta = self.write_meta();
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.media.persistence() == Persistence::Msync {
            self.media.flush(0, self.media.len());
        }
        self.media.drain();
        if let Some(e) = self.storage_failed() {
            // Not clean: the next start recovers from what the storage holds.
            tracing::error!(error = %e, "the pool is left for recovery at the next start");
            return;
        }
        meta.hdr.clean = true;
        let mut txn = journal::Txn::new();
        txn.write(self.sb.geo.meta_off, &meta.hdr.encode());
        // Behind whatever is still queued; the leader never takes `meta`, so waiting here
        // while holding it is safe.
        let t = self.group.enqueue(txn);
        self.group.wait(self.media.as_ref(), t);
        info!(path = ?self.path, "closed pool cleanly");
    }

    /// Usage and fragmentation.
    pub fn stats(&self) -> PoolStats {
        let meta = self.read_meta();
        let free = lock(&self.alloc).stats();
        let held = self.held.load(Ordering::Relaxed);
        let quarantined = self.quarantined.load(Ordering::Relaxed);
        let (commits, transactions) = self.group.figures();
        let geo = &self.sb.geo;
        PoolStats {
            objects: meta.names.len() as u64,
            extents: meta.live_ext,
            data_blocks: geo.data_blocks,
            used_blocks: geo.data_blocks - free.free_blocks - held - quarantined,
            held_blocks: held,
            quarantined_blocks: quarantined,
            fragmentation: free.fragmentation(),
            free,
            journal_commits: commits,
            journal_transactions: transactions,
        }
    }

    /// Free runs of the allocator, `(first block, count)` (for audits).
    pub fn free_runs(&self) -> Vec<Run> {
        lock(&self.alloc).free_runs().collect()
    }

    /// Replace the release hook (see [`ReleasedBlocks`]).
    pub fn set_release_hook(&self, hook: ReleaseHook) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// The medium (for data planes that copy straight into it).
    pub fn media(&self) -> &Arc<dyn Media> {
        &self.media
    }

    /// The layout.
    pub fn geometry(&self) -> &Geometry {
        &self.sb.geo
    }

    pub(crate) fn read_meta(&self) -> std::sync::RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write_meta(&self) -> std::sync::RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata write lock, unless the pool was closed (checked under the lock, which
    /// [`Pool::close_shared`] also takes).
    pub(crate) fn write_meta_open(&self) -> Result<std::sync::RwLockWriteGuard<'_, Meta>, ObjError> {
        let meta = self.write_meta();
        if self.is_closed() {
            return Err(ObjError::Closed);
        }
        self.storage_ok()?;
        Ok(meta)
    }

    /// The storage failure that stopped the pool, if any (see [`ObjError::Storage`]).
    pub fn storage_failed(&self) -> Option<ObjError> {
        self.media.failure().map(|f| ObjError::Storage { detail: f.detail, no_space: f.no_space })
    }

    pub(crate) fn storage_ok(&self) -> Result<(), ObjError> {
        self.storage_failed().map_or(Ok(()), Err)
    }

    /// Whether [`Pool::close_shared`] ran.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn release(&self, runs: Vec<Run>) {
        if runs.is_empty() {
            return;
        }
        let n: u64 = runs.iter().map(|r| r.1).sum();
        self.held.fetch_add(n, Ordering::Relaxed);
        let blocks = ReleasedBlocks {
            runs,
            alloc: self.alloc.clone(),
            held: self.held.clone(),
            quarantined: self.quarantined.clone(),
        };
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        hook(blocks);
    }
}

pub(crate) fn name_key(ns: &[u8], name: &[u8]) -> Box<[u8]> {
    let mut k = Vec::with_capacity(ns.len() + 1 + name.len());
    k.extend_from_slice(ns);
    k.push(0);
    k.extend_from_slice(name);
    k.into_boxed_slice()
}

pub(crate) fn read_superblock(media: &dyn Media, p: &Path) -> Result<Superblock, OpenError> {
    let mut b = [0u8; Superblock::LEN];
    if media.len() < Superblock::LEN as u64 {
        return Err(OpenError::NotAPool { path: p.into() });
    }
    media.read(0, &mut b);
    Superblock::decode(&b, media.len()).map_err(|e| match e {
        SuperblockError::BadMagic => OpenError::NotAPool { path: p.into() },
        SuperblockError::NewerVersion(found) => {
            OpenError::NewerVersion { path: p.into(), found, supported: FORMAT_VERSION }
        }
        SuperblockError::Checksum => {
            OpenError::Damaged { path: p.into(), detail: "superblock checksum mismatch".into() }
        }
        SuperblockError::Geometry(g) => {
            OpenError::Damaged { path: p.into(), detail: format!("superblock geometry: {g}") }
        }
    })
}

pub(crate) fn read_meta_header(media: &dyn Media, geo: &Geometry) -> Option<MetaHeader> {
    let mut b = [0u8; MetaHeader::LEN];
    media.read(geo.meta_off, &mut b);
    MetaHeader::decode(&b)
}
