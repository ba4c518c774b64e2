//! Reading the metadata tables back and verifying them — shared by open and `check`.
//!
//! Opening a pool *is* a verification: every used slot is decoded and checksummed, every
//! extent is matched to its owner, and the allocator is rebuilt from the extents, which
//! catches doubly-owned blocks on the way. `check` runs the same code with `thorough` set and
//! keeps going after the first problem to produce a full report.

use std::collections::{BTreeMap, HashMap};

use super::alloc::{Allocator, Run};
use super::extmap::{Ext, ExtentMap};
use super::layout::{BLOCK, EXT_SLOT, ExtSlot, Geometry, MetaHeader, OBJ_SLOT, ObjSlot, SlotState};
use super::media::Media;
use super::ops::MAX_OBJECT_SIZE;

/// An object as found on media.
#[derive(Debug)]
pub struct FoundObject {
    /// Slot index.
    pub slot: u32,
    /// Decoded record.
    pub rec: ObjSlot,
    /// Its extents.
    pub map: ExtentMap,
}

/// Everything the tables say, and what is wrong with it.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Live objects by slot.
    pub objects: Vec<FoundObject>,
    /// Free object slots below the high-water mark.
    pub free_obj_slots: Vec<u32>,
    /// Free extent slots below the high-water mark.
    pub free_ext_slots: Vec<u32>,
    /// Live extents.
    pub live_extents: u64,
    /// The rebuilt free map (absent when ownership is inconsistent).
    pub allocator: Option<Allocator>,
    /// Problems, in the order found.
    pub problems: Vec<String>,
}

fn name_of(o: &ObjSlot) -> String {
    format!("{}/{}", String::from_utf8_lossy(&o.ns), String::from_utf8_lossy(&o.name))
}

/// Verify the tables described by `hdr`. With `thorough`, also verify that slots above the
/// high-water marks are free and that allocated bytes past each object's end are zero.
pub fn analyze(media: &dyn Media, geo: &Geometry, hdr: &MetaHeader, thorough: bool) -> Analysis {
    let mut a = Analysis::default();
    if hdr.obj_hwm > geo.objtab_slots || hdr.ext_hwm > geo.exttab_slots {
        a.problems.push(format!(
            "meta header high-water marks ({} objects, {} extents) exceed the tables",
            hdr.obj_hwm, hdr.ext_hwm
        ));
        return a;
    }
    if hdr.data_hwm < geo.data_start || hdr.data_hwm > geo.data_end() {
        a.problems.push(format!("data high-water mark {} is outside the data area", hdr.data_hwm));
        return a;
    }
    let by_id = scan_objects(media, geo, hdr, thorough, &mut a);
    let mut exts: HashMap<u64, Vec<Ext>> = HashMap::with_capacity(by_id.len());
    let mut used: Vec<Run> = Vec::new();
    let mut buf = vec![0u8; (EXT_SLOT * 4096) as usize];
    let ext_scan_end = if thorough { geo.exttab_slots } else { hdr.ext_hwm };
    let mut i = 0u64;
    while i < ext_scan_end {
        let n = (ext_scan_end - i).min(4096);
        let chunk = &mut buf[..(n * EXT_SLOT) as usize];
        media.read(geo.ext_slot_off(i), chunk);
        for (k, raw) in chunk.chunks_exact(EXT_SLOT as usize).enumerate() {
            let slot = i + k as u64;
            match ExtSlot::decode(raw.try_into().expect("slot"), slot) {
                SlotState::Free if slot < hdr.ext_hwm => a.free_ext_slots.push(slot as u32),
                SlotState::Free => {}
                SlotState::Damaged(why) => a.problems.push(format!("extent slot {slot}: {why}")),
                SlotState::Live(_) if slot >= hdr.ext_hwm => {
                    a.problems.push(format!("extent slot {slot} is in use above the high-water mark {}", hdr.ext_hwm))
                }
                SlotState::Live(e) => {
                    let end = e.pool_block.checked_add(e.nblocks as u64);
                    let file_end = e.file_block.checked_add(e.nblocks as u64);
                    if file_end.is_none_or(|x| x > MAX_OBJECT_SIZE / BLOCK) {
                        a.problems.push(format!(
                            "extent slot {slot}: logical blocks [{}, +{}) reach past the largest object size",
                            e.file_block, e.nblocks
                        ));
                        continue;
                    }
                    if e.pool_block < geo.data_start || end.is_none_or(|x| x > hdr.data_hwm) {
                        a.problems.push(format!(
                            "extent slot {slot}: blocks [{}, +{}) are outside the allocated data area",
                            e.pool_block, e.nblocks
                        ));
                        continue;
                    }
                    let Some(&oslot) = by_id.get(&e.owner) else {
                        a.problems.push(format!(
                            "extent slot {slot}: owner object id {} does not exist: {} blocks leaked",
                            e.owner, e.nblocks
                        ));
                        continue;
                    };
                    used.push((e.pool_block, e.nblocks as u64));
                    a.live_extents += 1;
                    exts.entry(e.owner).or_default().push(Ext {
                        file_block: e.file_block,
                        pool_block: e.pool_block,
                        nblocks: e.nblocks,
                        slot: slot as u32,
                    });
                    let _ = oslot;
                }
            }
        }
        i += n;
    }
    for o in &mut a.objects {
        let list = exts.remove(&o.rec.id).unwrap_or_default();
        let count = list.len() as u64;
        match ExtentMap::from_unsorted(list) {
            None => a.problems.push(format!("object {}: extents overlap within the object", name_of(&o.rec))),
            Some(m) => {
                let size_blocks = o.rec.size.div_ceil(BLOCK);
                if let Some(last) = m.extents().last()
                    && last.file_end() > size_blocks
                {
                    a.problems.push(format!(
                        "object {}: extents reach block {} but the size ({} bytes) ends at block {size_blocks}",
                        name_of(&o.rec),
                        last.file_end(),
                        o.rec.size
                    ));
                }
                if count > geo.max_extents_per_object {
                    a.problems.push(format!(
                        "object {}: {count} extents exceed the limit of {}",
                        name_of(&o.rec),
                        geo.max_extents_per_object
                    ));
                }
                if thorough {
                    check_tail_zero(media, o, &m, &mut a.problems);
                }
                o.map = m;
            }
        }
    }
    match Allocator::from_used(geo.data_start, geo.data_end(), &mut used) {
        Ok(al) => a.allocator = Some(al),
        Err(ov) => a.problems.push(format!(
            "blocks owned twice: run [{}, +{}) overlaps run [{}, +{}) (and possibly more)",
            ov.0.0, ov.0.1, ov.1.0, ov.1.1
        )),
    }
    a
}

fn scan_objects(
    media: &dyn Media,
    geo: &Geometry,
    hdr: &MetaHeader,
    thorough: bool,
    a: &mut Analysis,
) -> HashMap<u64, u32> {
    let mut by_id: HashMap<u64, u32> = HashMap::new();
    let mut names: BTreeMap<(Vec<u8>, Vec<u8>), u32> = BTreeMap::new();
    let end = if thorough { geo.objtab_slots } else { hdr.obj_hwm };
    let mut buf = vec![0u8; (OBJ_SLOT * 1024) as usize];
    let mut i = 0u64;
    while i < end {
        let n = (end - i).min(1024);
        let chunk = &mut buf[..(n * OBJ_SLOT) as usize];
        media.read(geo.obj_slot_off(i), chunk);
        for (k, raw) in chunk.chunks_exact(OBJ_SLOT as usize).enumerate() {
            let slot = i + k as u64;
            match ObjSlot::decode(raw.try_into().expect("slot"), slot) {
                SlotState::Free if slot < hdr.obj_hwm => a.free_obj_slots.push(slot as u32),
                SlotState::Free => {}
                SlotState::Damaged(why) => a.problems.push(format!("object slot {slot}: {why}")),
                SlotState::Live(_) if slot >= hdr.obj_hwm => {
                    a.problems.push(format!("object slot {slot} is in use above the high-water mark {}", hdr.obj_hwm))
                }
                SlotState::Live(rec) => {
                    if rec.size > MAX_OBJECT_SIZE {
                        a.problems.push(format!(
                            "object {}: size {} exceeds the largest object size {MAX_OBJECT_SIZE}",
                            name_of(&rec),
                            rec.size
                        ));
                        continue;
                    }
                    if rec.id >= hdr.next_object_id {
                        a.problems.push(format!("object {}: id {} was never handed out", name_of(&rec), rec.id));
                    }
                    if std::str::from_utf8(&rec.ns).is_err() || std::str::from_utf8(&rec.name).is_err() {
                        a.problems.push(format!("object slot {slot}: name is not UTF-8"));
                        continue;
                    }
                    if let Some(prev) = by_id.insert(rec.id, slot as u32) {
                        a.problems.push(format!("object id {} is used by slots {prev} and {slot}", rec.id));
                    }
                    if let Some(prev) = names.insert((rec.ns.clone(), rec.name.clone()), slot as u32) {
                        a.problems.push(format!("object {} appears in slots {prev} and {slot}", name_of(&rec)));
                    }
                    a.objects.push(FoundObject { slot: slot as u32, rec, map: ExtentMap::default() });
                }
            }
        }
        i += n;
    }
    by_id
}

/// Allocated bytes past an object's end must read zero (a later grow exposes them).
fn check_tail_zero(media: &dyn Media, o: &FoundObject, m: &ExtentMap, problems: &mut Vec<String>) {
    let size = o.rec.size;
    if size.is_multiple_of(BLOCK) {
        return;
    }
    if let Some(pb) = m.lookup(size / BLOCK) {
        let tail = BLOCK - size % BLOCK;
        let mut b = vec![0u8; tail as usize];
        media.read(pb * BLOCK + size % BLOCK, &mut b);
        if b.iter().any(|&x| x != 0) {
            problems.push(format!("object {}: bytes past its end are not zero", name_of(&o.rec)));
        }
    }
}
