//! `check` (fsck): verify a pool end to end and report every problem found.
//!
//! Offline, the pool is mapped read-only under a copy-on-write overlay, so a committed
//! transaction can be replayed in memory — checking the state the next open would see —
//! without writing to the pool (this works on device-DAX too, which refuses private mappings). Checked: superblock (magic, version, checksum, geometry), journal (a committed
//! transaction must be intact), meta header checksum, every object and extent slot (checksum,
//! slot placement, free slots all-zero, nothing in use above the high-water marks), every
//! extent's owner (an extent without a live owner is a leak), extents within the allocated
//! data area and within their object's size, no block owned twice, allocated bytes past an
//! object's end zero, and on an open pool that DRAM free space agrees with the media.

use std::path::{Path, PathBuf};

use super::journal::{self, Journal};
use super::layout::Superblock;
use super::media::mapped::{MappedMedia, Region};
use super::media::overlay::OverlayMedia;
use super::media::pread::PreadMedia;
use super::media::{Media, PoolMode};
use super::{OpenError, Pool, lock, read_meta_header, read_superblock, scan};

/// The outcome of a check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// What was checked.
    pub path: Option<PathBuf>,
    /// True when no problem was found.
    pub clean: bool,
    /// Every problem, in the order found.
    pub problems: Vec<String>,
    /// Facts worth knowing that are not problems.
    pub notes: Vec<String>,
    /// Live objects.
    pub objects: u64,
    /// Live extents.
    pub extents: u64,
    /// Blocks in the data area.
    pub data_blocks: u64,
    /// Blocks free according to the extents.
    pub free_blocks: u64,
}

impl CheckReport {
    fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            clean: false,
            problems: Vec::new(),
            notes: Vec::new(),
            objects: 0,
            extents: 0,
            data_blocks: 0,
            free_blocks: 0,
        }
    }
}

/// Check the pool at `path` without modifying it. `Err` means there is no pool to check
/// (unreadable path, not an rdax pool, or a newer format); damage is reported in `Ok`.
///
/// A regular file is read with `pread` (a truncated or hostile image, or a hole on a full
/// tmpfs, must not be able to SIGBUS the checker); a device-DAX device, which has no `read`,
/// through a read-only shared mapping.
pub fn check_path(path: &Path) -> Result<CheckReport, OpenError> {
    let is_file = std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(false);
    let base: std::sync::Arc<dyn Media> = if is_file {
        let mode = if MappedMedia::is_fsdax_file(path) { PoolMode::FsDax } else { PoolMode::File };
        std::sync::Arc::new(PreadMedia::open(path, mode)?)
    } else {
        std::sync::Arc::new(MappedMedia::map(path, Region::ReadOnly, false)?)
    };
    let overlay = OverlayMedia::new(base);
    check_media(&overlay, Some(path))
}

/// Check a pool on any medium. Recovery runs on the medium itself: use a private mapping or a
/// copy when the pool must stay untouched.
pub fn check_media(media: &dyn Media, path: Option<&Path>) -> Result<CheckReport, OpenError> {
    let p = path.map_or_else(|| PathBuf::from("<memory>"), Path::to_path_buf);
    let mut r = CheckReport::new(path.map(Path::to_path_buf));
    let sb = match read_superblock(media, &p) {
        Ok(sb) => sb,
        Err(OpenError::Damaged { detail, .. }) => {
            r.problems.push(detail);
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    let geo = sb.geo;
    r.data_blocks = geo.data_blocks;
    r.notes.push(format!(
        "format version {}, {} bytes, {} data blocks, {} object slots, {} extent slots",
        sb.version, geo.pool_size, geo.data_blocks, geo.objtab_slots, geo.exttab_slots
    ));
    match journal::describe(media, &geo) {
        Ok(Some(seq)) => r.notes.push(format!(
            "journal: committed transaction {seq} was not yet applied; it is replayed (open does the same)"
        )),
        Ok(None) => {}
        Err(e) => {
            r.problems.push(e.to_string());
            return Ok(r);
        }
    }
    if let Err(e) = Journal::recover(media, &geo) {
        r.problems.push(e.to_string());
        return Ok(r);
    }
    let Some(hdr) = read_meta_header(media, &geo) else {
        r.problems.push("meta header checksum mismatch".into());
        return Ok(r);
    };
    let a = scan::analyze(media, &geo, &hdr, true);
    r.objects = a.objects.len() as u64;
    r.extents = a.live_extents;
    r.free_blocks = a.allocator.as_ref().map_or(0, |al| al.free_blocks());
    r.problems.extend(a.problems);
    r.clean = r.problems.is_empty();
    Ok(r)
}

impl Pool {
    /// Check this open pool's media and that DRAM state agrees with it. Holds the metadata
    /// lock for the duration, so no change runs concurrently.
    pub fn check(&self) -> CheckReport {
        let meta = self.write_meta();
        let geo = self.sb.geo;
        let mut r = CheckReport::new(self.path.clone());
        r.data_blocks = geo.data_blocks;
        let mut b = [0u8; Superblock::LEN];
        self.media.read(0, &mut b);
        if Superblock::decode(&b, self.media.len()).is_err() {
            r.problems.push("superblock no longer decodes".into());
        }
        match read_meta_header(self.media.as_ref(), &geo) {
            Some(h) if h == meta.hdr => {}
            Some(_) => r.problems.push("meta header on media differs from memory".into()),
            None => r.problems.push("meta header checksum mismatch".into()),
        }
        let a = scan::analyze(self.media.as_ref(), &geo, &meta.hdr, true);
        r.objects = a.objects.len() as u64;
        r.extents = a.live_extents;
        r.problems.extend(a.problems);
        if r.objects != meta.names.len() as u64 {
            r.problems.push(format!("{} objects on media, {} in memory", r.objects, meta.names.len()));
        }
        if let Some(al) = a.allocator {
            r.free_blocks = al.free_blocks();
            let dram_free = lock(&self.alloc).free_blocks();
            let held = self.held.load(std::sync::atomic::Ordering::Relaxed);
            let quarantined = self.quarantined.load(std::sync::atomic::Ordering::Relaxed);
            if dram_free + held + quarantined != r.free_blocks {
                r.problems.push(format!(
                    "free space disagrees: media says {} blocks free, memory has {dram_free} free + {held} held + \
                     {quarantined} quarantined",
                    r.free_blocks
                ));
            }
        }
        r.clean = r.problems.is_empty();
        r
    }
}
