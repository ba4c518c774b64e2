//! The on-media format: geometry, superblock, meta header, object and extent slots.
//!
//! All integers are little-endian; every record carries a CRC32C. See `docs/pool-format.md`
//! for the picture. Records are encoded and decoded by hand (no `transmute`), so a damaged
//! pool can never produce undefined behaviour, only a decode error.

/// Pool block size.
pub const BLOCK: u64 = 4096;
/// Blocks per 2 MiB (the PMD size the allocator aligns large runs to).
pub const HUGE_BLOCKS: u64 = 512;
/// The superblock magic.
pub const MAGIC: [u8; 8] = *b"RDAXPOOL";
/// The format version this code writes and understands.
pub const FORMAT_VERSION: u32 = 1;
/// Smallest pool accepted.
pub const MIN_POOL_SIZE: u64 = 16 << 20;
/// Bytes of an object slot.
pub const OBJ_SLOT: u64 = 256;
/// Bytes of an extent slot.
pub const EXT_SLOT: u64 = 32;
/// Longest namespace, bytes.
pub const MAX_NS: usize = 64;
/// Longest object name, bytes.
pub const MAX_NAME: usize = 128;
/// Superblock flag: the data area read as zero when the pool was made, so blocks above the
/// data high-water mark need no zeroing before first use.
pub const FLAG_VIRGIN_ZERO: u32 = 1;

const META_MAGIC: u32 = u32::from_le_bytes(*b"RDMH");
const OBJ_LIVE: u32 = u32::from_le_bytes(*b"OBJ1");
/// Object flag (slot byte 34): the object is a block volume (fixed size, exported over NBD).
pub const OBJ_FLAG_VOLUME: u8 = 1;
/// Every object flag this version knows; a slot with another bit set is refused as damaged
/// rather than served with a meaning we do not know.
const OBJ_FLAGS_KNOWN: u8 = OBJ_FLAG_VOLUME;

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Where everything lives in a pool. Fixed at format time, stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    /// Usable pool bytes (a multiple of [`BLOCK`]).
    pub pool_size: u64,
    /// Byte offset of the meta header block.
    pub meta_off: u64,
    /// Byte offset and length of the journal.
    pub journal_off: u64,
    /// Journal bytes.
    pub journal_len: u64,
    /// Byte offset of the object table.
    pub objtab_off: u64,
    /// Object slots.
    pub objtab_slots: u64,
    /// Byte offset of the extent table.
    pub exttab_off: u64,
    /// Extent slots.
    pub exttab_slots: u64,
    /// First block of the data area (2 MiB aligned).
    pub data_start: u64,
    /// Blocks in the data area.
    pub data_blocks: u64,
    /// Most extents one object may have (bounded so any one operation fits the journal).
    pub max_extents_per_object: u64,
}

/// Choices made when a pool is formatted; `None` picks a default from the size.
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// Object slots (the most objects the pool can hold).
    pub max_objects: Option<u64>,
    /// Extent slots (the most extents across all objects).
    pub max_extents: Option<u64>,
}

/// Why a geometry cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// Below [`MIN_POOL_SIZE`].
    #[error("{size} bytes is below the minimum pool size of {MIN_POOL_SIZE} bytes (16 MiB)")]
    TooSmall {
        /// Offered size.
        size: u64,
    },
    /// Metadata would not leave room for data.
    #[error("the requested tables ({objects} objects, {extents} extents) leave no room for data in {size} bytes")]
    NoRoom {
        /// Offered size.
        size: u64,
        /// Object slots asked for.
        objects: u64,
        /// Extent slots asked for.
        extents: u64,
    },
    /// Decoded fields disagree with each other.
    #[error("geometry fields are inconsistent with each other")]
    Inconsistent,
    /// The pool claims more bytes than its region has.
    #[error("pool claims {claimed} bytes but the region has {region}")]
    LargerThanRegion {
        /// What the superblock says.
        claimed: u64,
        /// What the region has.
        region: u64,
    },
    /// A format version that never existed.
    #[error("format version 0")]
    VersionZero,
}

impl Geometry {
    /// Lay out a pool of `size` bytes.
    pub fn compute(size: u64, opts: FormatOptions) -> Result<Self, GeometryError> {
        let pool_size = size / BLOCK * BLOCK;
        if pool_size < MIN_POOL_SIZE {
            return Err(GeometryError::TooSmall { size });
        }
        let journal_len: u64 = if pool_size >= 1 << 30 { 4 << 20 } else { 1 << 20 };
        let objects = opts.max_objects.unwrap_or((pool_size / (256 << 10)).clamp(1024, 16 << 20));
        let rough_blocks = pool_size / BLOCK;
        let extents = opts.max_extents.unwrap_or((rough_blocks / 8).clamp(4096, 256 << 20));
        let meta_off = BLOCK;
        let journal_off = 2 * BLOCK;
        let objtab_off = journal_off + journal_len;
        // Checked throughout: a crafted superblock can ask for any table size.
        let no_room = GeometryError::NoRoom { size, objects, extents };
        let table = |n: u64, slot: u64| n.checked_mul(slot).map(|b| b.div_ceil(BLOCK) * BLOCK);
        let exttab_off = table(objects, OBJ_SLOT).and_then(|b| objtab_off.checked_add(b)).ok_or(no_room.clone())?;
        let meta_end = table(extents, EXT_SLOT).and_then(|b| exttab_off.checked_add(b)).ok_or(no_room.clone())?;
        let data_off = meta_end.div_ceil(HUGE_BLOCKS * BLOCK) * (HUGE_BLOCKS * BLOCK);
        if objects == 0 || extents == 0 || data_off.checked_add(HUGE_BLOCKS * BLOCK).is_none_or(|e| e > pool_size) {
            return Err(no_room);
        }
        Ok(Self {
            pool_size,
            meta_off,
            journal_off,
            journal_len,
            objtab_off,
            objtab_slots: objects,
            exttab_off,
            exttab_slots: extents,
            data_start: data_off / BLOCK,
            data_blocks: (pool_size - data_off) / BLOCK,
            max_extents_per_object: journal_len / 64,
        })
    }

    /// One past the last data block.
    pub fn data_end(&self) -> u64 {
        self.data_start + self.data_blocks
    }

    /// Byte offset of object slot `i`.
    pub fn obj_slot_off(&self, i: u64) -> u64 {
        self.objtab_off + i * OBJ_SLOT
    }

    /// Byte offset of extent slot `i`.
    pub fn ext_slot_off(&self, i: u64) -> u64 {
        self.exttab_off + i * EXT_SLOT
    }

    /// Checks a decoded geometry against the size of the medium it came from.
    pub fn sane(&self, media_len: u64) -> Result<(), GeometryError> {
        let expect = Self::compute(
            self.pool_size,
            FormatOptions { max_objects: Some(self.objtab_slots), max_extents: Some(self.exttab_slots) },
        )?;
        if expect != *self {
            return Err(GeometryError::Inconsistent);
        }
        if self.pool_size > media_len {
            return Err(GeometryError::LargerThanRegion { claimed: self.pool_size, region: media_len });
        }
        Ok(())
    }
}

/// The pool's identity and geometry, in block 0. Written once, at format time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format version.
    pub version: u32,
    /// Flags (`FLAG_*`).
    pub flags: u32,
    /// Pool identity.
    pub uuid: [u8; 16],
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Layout.
    pub geo: Geometry,
}

/// Why a superblock was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockError {
    /// Not an rdax pool.
    BadMagic,
    /// Written by a newer rdax.
    NewerVersion(u32),
    /// Checksum mismatch.
    Checksum,
    /// Fields that cannot be right.
    Geometry(GeometryError),
}

impl Superblock {
    /// Encoded size.
    pub const LEN: usize = 256;

    /// Encode with checksum.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, self.flags);
        b[16..32].copy_from_slice(&self.uuid);
        let g = &self.geo;
        for (i, v) in [
            g.pool_size,
            g.meta_off,
            g.journal_off,
            g.journal_len,
            g.objtab_off,
            g.objtab_slots,
            g.exttab_off,
            g.exttab_slots,
            g.data_start,
            g.data_blocks,
            g.max_extents_per_object,
            self.created_ns,
        ]
        .into_iter()
        .enumerate()
        {
            put_u64(&mut b, 32 + 8 * i, v);
        }
        let crc = crc32c::crc32c(&b[..252]);
        put_u32(&mut b, 252, crc);
        b
    }

    /// Decode and verify (magic, version, checksum, geometry against `media_len`).
    pub fn decode(b: &[u8; Self::LEN], media_len: u64) -> Result<Self, SuperblockError> {
        if b[0..8] != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let version = get_u32(b, 8);
        if crc32c::crc32c(&b[..252]) != get_u32(b, 252) {
            // A newer version may have moved the checksum; report the version first.
            if version > FORMAT_VERSION {
                return Err(SuperblockError::NewerVersion(version));
            }
            return Err(SuperblockError::Checksum);
        }
        if version > FORMAT_VERSION {
            return Err(SuperblockError::NewerVersion(version));
        }
        if version == 0 {
            return Err(SuperblockError::Geometry(GeometryError::VersionZero));
        }
        let f = |i: usize| get_u64(b, 32 + 8 * i);
        let geo = Geometry {
            pool_size: f(0),
            meta_off: f(1),
            journal_off: f(2),
            journal_len: f(3),
            objtab_off: f(4),
            objtab_slots: f(5),
            exttab_off: f(6),
            exttab_slots: f(7),
            data_start: f(8),
            data_blocks: f(9),
            max_extents_per_object: f(10),
        };
        geo.sane(media_len).map_err(SuperblockError::Geometry)?;
        Ok(Self { version, flags: get_u32(b, 12), uuid: b[16..32].try_into().expect("16"), created_ns: f(11), geo })
    }
}

/// Mutable pool-wide counters, in block 1; changed only through the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetaHeader {
    /// Next object id to hand out (ids are never reused).
    pub next_object_id: u64,
    /// Object slots at or above this index have never been used.
    pub obj_hwm: u64,
    /// Extent slots at or above this index have never been used.
    pub ext_hwm: u64,
    /// Data blocks at or above this absolute block have never been allocated since format.
    pub data_hwm: u64,
    /// The pool was closed cleanly and has not been opened for writing since.
    pub clean: bool,
}

impl MetaHeader {
    /// Encoded size.
    pub const LEN: usize = 64;

    /// Encode with checksum.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        put_u32(&mut b, 0, META_MAGIC);
        put_u64(&mut b, 8, self.next_object_id);
        put_u64(&mut b, 16, self.obj_hwm);
        put_u64(&mut b, 24, self.ext_hwm);
        put_u64(&mut b, 32, self.data_hwm);
        put_u64(&mut b, 40, self.clean as u64);
        let crc = crc32c::crc32c(&b[8..]);
        put_u32(&mut b, 4, crc);
        b
    }

    /// Decode and verify the checksum.
    pub fn decode(b: &[u8; Self::LEN]) -> Option<Self> {
        if get_u32(b, 0) != META_MAGIC || crc32c::crc32c(&b[8..]) != get_u32(b, 4) {
            return None;
        }
        Some(Self {
            next_object_id: get_u64(b, 8),
            obj_hwm: get_u64(b, 16),
            ext_hwm: get_u64(b, 24),
            data_hwm: get_u64(b, 32),
            clean: get_u64(b, 40) == 1,
        })
    }
}

/// A live object slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjSlot {
    /// Object id (never reused within a pool).
    pub id: u64,
    /// Logical size in bytes.
    pub size: u64,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: u64,
    /// Flags ([`OBJ_FLAG_VOLUME`]).
    pub flags: u8,
    /// Namespace bytes.
    pub ns: Vec<u8>,
    /// Name bytes.
    pub name: Vec<u8>,
}

/// What an object slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState<T> {
    /// All zero: never used or freed.
    Free,
    /// A valid record.
    Live(T),
    /// Neither zero nor a valid record.
    Damaged(&'static str),
}

fn slot_crc(index: u64, body: &[u8]) -> u32 {
    // The slot index is part of the checksum, so a record copied to the wrong slot is caught.
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), body)
}

impl ObjSlot {
    /// Encode for slot `index`.
    pub fn encode(&self, index: u64) -> [u8; OBJ_SLOT as usize] {
        assert!(self.ns.len() <= MAX_NS && self.name.len() <= MAX_NAME);
        let mut b = [0u8; OBJ_SLOT as usize];
        put_u32(&mut b, 0, OBJ_LIVE);
        put_u64(&mut b, 8, self.id);
        put_u64(&mut b, 16, self.size);
        put_u64(&mut b, 24, self.created_ns);
        b[32] = self.ns.len() as u8;
        b[33] = self.name.len() as u8;
        b[34] = self.flags;
        b[64..64 + self.ns.len()].copy_from_slice(&self.ns);
        b[64 + self.ns.len()..64 + self.ns.len() + self.name.len()].copy_from_slice(&self.name);
        let crc = slot_crc(index, &b[8..]);
        put_u32(&mut b, 4, crc);
        b
    }

    /// Decode slot `index`.
    pub fn decode(b: &[u8; OBJ_SLOT as usize], index: u64) -> SlotState<Self> {
        let kind = get_u32(b, 0);
        if kind == 0 {
            return if b.iter().all(|&x| x == 0) { SlotState::Free } else { SlotState::Damaged("free slot not zero") };
        }
        if kind != OBJ_LIVE {
            return SlotState::Damaged("unknown slot kind");
        }
        if slot_crc(index, &b[8..]) != get_u32(b, 4) {
            return SlotState::Damaged("checksum mismatch");
        }
        let (nl, ml) = (b[32] as usize, b[33] as usize);
        if nl == 0 || nl > MAX_NS || ml == 0 || ml > MAX_NAME {
            return SlotState::Damaged("name length out of range");
        }
        let id = get_u64(b, 8);
        if id == 0 {
            return SlotState::Damaged("object id 0");
        }
        if b[34] & !OBJ_FLAGS_KNOWN != 0 {
            return SlotState::Damaged("unknown object flags");
        }
        SlotState::Live(Self {
            id,
            size: get_u64(b, 16),
            created_ns: get_u64(b, 24),
            flags: b[34],
            ns: b[64..64 + nl].to_vec(),
            name: b[64 + nl..64 + nl + ml].to_vec(),
        })
    }
}

/// A live extent slot: `nblocks` pool blocks from `pool_block` hold the object's logical
/// blocks from `file_block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtSlot {
    /// Owning object id (never 0).
    pub owner: u64,
    /// First logical block within the object.
    pub file_block: u64,
    /// First absolute pool block.
    pub pool_block: u64,
    /// Length in blocks (> 0).
    pub nblocks: u32,
}

impl ExtSlot {
    /// Encode for slot `index`.
    pub fn encode(&self, index: u64) -> [u8; EXT_SLOT as usize] {
        let mut b = [0u8; EXT_SLOT as usize];
        put_u64(&mut b, 0, self.owner);
        put_u64(&mut b, 8, self.file_block);
        put_u64(&mut b, 16, self.pool_block);
        put_u32(&mut b, 24, self.nblocks);
        let crc = slot_crc(index, &b[..28]);
        put_u32(&mut b, 28, crc);
        b
    }

    /// Decode slot `index`.
    pub fn decode(b: &[u8; EXT_SLOT as usize], index: u64) -> SlotState<Self> {
        let owner = get_u64(b, 0);
        if owner == 0 {
            return if b.iter().all(|&x| x == 0) { SlotState::Free } else { SlotState::Damaged("free slot not zero") };
        }
        if slot_crc(index, &b[..28]) != get_u32(b, 28) {
            return SlotState::Damaged("checksum mismatch");
        }
        let nblocks = get_u32(b, 24);
        if nblocks == 0 {
            return SlotState::Damaged("zero-length extent");
        }
        SlotState::Live(Self { owner, file_block: get_u64(b, 8), pool_block: get_u64(b, 16), nblocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_keeps_areas_disjoint_and_data_2mib_aligned() {
        for size in [MIN_POOL_SIZE, 64 << 20, 1 << 30, 3 << 30, 1 << 40] {
            let g = Geometry::compute(size, FormatOptions::default()).unwrap();
            assert!(g.meta_off + BLOCK <= g.journal_off);
            assert!(g.journal_off + g.journal_len <= g.objtab_off);
            assert!(g.objtab_off + g.objtab_slots * OBJ_SLOT <= g.exttab_off);
            assert!(g.exttab_off + g.exttab_slots * EXT_SLOT <= g.data_start * BLOCK);
            assert_eq!(g.data_start % HUGE_BLOCKS, 0);
            assert_eq!(g.data_end() * BLOCK, g.pool_size);
            g.sane(size).unwrap();
        }
        assert!(matches!(
            Geometry::compute(MIN_POOL_SIZE - 1, FormatOptions::default()),
            Err(GeometryError::TooSmall { .. })
        ));
        let huge = FormatOptions { max_objects: Some(1 << 20), max_extents: None };
        assert!(matches!(Geometry::compute(MIN_POOL_SIZE, huge), Err(GeometryError::NoRoom { .. })));
    }

    #[test]
    fn superblock_roundtrips_and_rejects_damage() {
        let geo = Geometry::compute(64 << 20, FormatOptions::default()).unwrap();
        let sb = Superblock { version: FORMAT_VERSION, flags: FLAG_VIRGIN_ZERO, uuid: [7; 16], created_ns: 5, geo };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b, 64 << 20).unwrap(), sb);
        let mut bad = b;
        bad[40] ^= 1;
        assert_eq!(Superblock::decode(&bad, 64 << 20), Err(SuperblockError::Checksum));
        let mut newer = sb.clone();
        newer.version = FORMAT_VERSION + 1;
        assert_eq!(Superblock::decode(&newer.encode(), 64 << 20), Err(SuperblockError::NewerVersion(2)));
        let mut magic = b;
        magic[0] = b'X';
        assert_eq!(Superblock::decode(&magic, 64 << 20), Err(SuperblockError::BadMagic));
        assert!(matches!(Superblock::decode(&b, 32 << 20), Err(SuperblockError::Geometry(_))));
    }

    #[test]
    fn slots_roundtrip_and_detect_misplacement_and_damage() {
        let o = ObjSlot {
            id: 3,
            size: 12345,
            created_ns: 9,
            flags: OBJ_FLAG_VOLUME,
            ns: b"ns".to_vec(),
            name: b"obj".to_vec(),
        };
        let b = o.encode(4);
        assert_eq!(ObjSlot::decode(&b, 4), SlotState::Live(o));
        assert!(matches!(ObjSlot::decode(&b, 5), SlotState::Damaged(_)));
        assert_eq!(ObjSlot::decode(&[0; 256], 4), SlotState::Free);
        let e = ExtSlot { owner: 3, file_block: 1, pool_block: 600, nblocks: 2 };
        let eb = e.encode(10);
        assert_eq!(ExtSlot::decode(&eb, 10), SlotState::Live(e));
        let mut torn = eb;
        torn[17] ^= 0x40;
        assert!(matches!(ExtSlot::decode(&torn, 10), SlotState::Damaged(_)));
        let h = MetaHeader { next_object_id: 2, obj_hwm: 1, ext_hwm: 3, data_hwm: 900, clean: true };
        assert_eq!(MetaHeader::decode(&h.encode()), Some(h));
    }

    #[test]
    fn crafted_table_sizes_are_refused_not_overflowed() {
        for (o, e) in
            [(u64::MAX, 4096), (4096, u64::MAX), (u64::MAX / OBJ_SLOT + 1, 4096), (u64::MAX / 2, u64::MAX / 2)]
        {
            let r = Geometry::compute(1 << 30, FormatOptions { max_objects: Some(o), max_extents: Some(e) });
            assert!(matches!(r, Err(GeometryError::NoRoom { .. })), "{o} {e}: {r:?}");
        }
    }
}
