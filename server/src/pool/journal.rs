//! The redo journal: every metadata change is one transaction.
//!
//! ```text
//! journal area
//! +0   state word (u64): seq << 1 | COMMITTED      <- the only commit point, one 8-byte store
//! +64  header: magic "RDJL", crc32c, seq, record count, record bytes
//! +96  records: { kind u32, len u32, offset u64, payload (writes only, padded to 8) } ...
//! ```
//!
//! Commit, with a persist barrier (flush + fence) after each step:
//! 1. write header and records, persist;
//! 2. store `seq << 1 | 1` in the state word, persist — **the transaction is now committed**;
//! 3. apply the records in place, persist;
//! 4. store `seq << 1` (retired), persist — replay will not touch it again.
//!
//! Recovery replays a committed, unretired transaction (idempotent: records are absolute
//! byte images or zero fills) and discards anything else. Retiring matters because data
//! stores (which bypass the journal) may land in blocks a replayed zero record would wipe.

use super::layout::{BLOCK, Geometry};
use super::media::Media;

const HDR: u64 = 64;
const RECS: u64 = 96;
const MAGIC: u32 = u32::from_le_bytes(*b"RDJL");
const KIND_WRITE: u32 = 1;
const KIND_ZERO: u32 = 2;
const REC_HDR: u64 = 16;

/// One redo record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
}

impl Rec {
    fn range(&self) -> (u64, u64) {
        match self {
            Rec::Write { off, data } => (*off, data.len() as u64),
            Rec::Zero { off, len } => (*off, *len),
        }
    }

    fn encoded_len(&self) -> u64 {
        match self {
            Rec::Write { data, .. } => REC_HDR + (data.len() as u64).div_ceil(8) * 8,
            Rec::Zero { .. } => REC_HDR,
        }
    }
}

/// A transaction being built. Nothing reaches the medium until [`Journal::commit`].
#[derive(Debug, Default)]
pub struct Txn {
    recs: Vec<Rec>,
    bytes: u64,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record that `data` must be stored at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let r = Rec::Write { off, data: data.to_vec() };
        self.bytes += r.encoded_len();
        self.recs.push(r);
    }

    /// Record that `len` bytes at `off` must become zero.
    pub fn zero(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        assert!(len <= u32::MAX as u64, "zero record too long");
        self.bytes += REC_HDR;
        self.recs.push(Rec::Zero { off, len });
    }

    /// Append `other`'s records after this one's (group commit: the records of several
    /// operations, applied in the order the operations changed DRAM). A write that an appended
    /// write of the same range replaces, with nothing overlapping in between, is dropped —
    /// every operation rewrites the meta header, and a group needs it once. Only the last few
    /// records are searched: the header record of the previous operation is among them.
    pub fn append(&mut self, other: Txn) {
        const LOOK_BACK: usize = 16;
        for r in other.recs {
            if let Rec::Write { off, data } = &r {
                let (lo, hi) = (*off, *off + data.len() as u64);
                let floor = self.recs.len().saturating_sub(LOOK_BACK);
                for i in (floor..self.recs.len()).rev() {
                    let (o, l) = self.recs[i].range();
                    if o == lo && o + l == hi && matches!(self.recs[i], Rec::Write { .. }) {
                        let old = self.recs.remove(i);
                        self.bytes -= old.encoded_len();
                        break;
                    }
                    if o < hi && lo < o + l {
                        break; // an overlapping record in between: keep both
                    }
                }
            }
            self.bytes += r.encoded_len();
            self.recs.push(r);
        }
    }

    /// Encoded bytes of the records.
    pub fn encoded_len(&self) -> u64 {
        self.bytes
    }

    /// True when the transaction changes nothing.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }
}

/// The transaction does not fit the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("transaction of {needed} bytes does not fit the {capacity}-byte journal")]
pub struct TooLarge {
    /// Bytes needed.
    pub needed: u64,
    /// Bytes available for records.
    pub capacity: u64,
}

/// The journal is damaged in a way a crash cannot explain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal: {0}")]
pub struct JournalDamage(pub String);

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Sequence number of the last transaction.
    pub seq: u64,
    /// Whether a committed transaction was replayed.
    pub replayed: bool,
}

/// The journal of one open pool.
#[derive(Debug)]
pub struct Journal {
    off: u64,
    len: u64,
    seq: u64,
}

impl Journal {
    /// Bytes available for records in a journal of `journal_len` bytes.
    pub fn capacity(journal_len: u64) -> u64 {
        journal_len - RECS
    }

    /// Reset the journal of a pool being formatted.
    pub fn format(media: &dyn Media, geo: &Geometry) {
        media.fill(geo.journal_off, RECS, 0);
        media.persist(geo.journal_off, RECS);
    }

    /// Replay or discard whatever a crash left, and return the open journal.
    pub fn recover(media: &dyn Media, geo: &Geometry) -> Result<(Self, Recovered), JournalDamage> {
        let (seq, pending) = inspect(media, geo)?;
        let mut j = Self { off: geo.journal_off, len: geo.journal_len, seq };
        let replayed = pending.is_some();
        if let Some(recs) = pending {
            apply(media, &recs);
            j.retire(media);
        }
        Ok((j, Recovered { seq, replayed }))
    }

    /// Commit `txn` durably and apply it. On return the change is durable and in place.
    pub fn commit(&mut self, media: &dyn Media, txn: &Txn) -> Result<(), TooLarge> {
        let capacity = Self::capacity(self.len);
        if txn.bytes > capacity {
            return Err(TooLarge { needed: txn.bytes, capacity });
        }
        if txn.is_empty() {
            return Ok(());
        }
        let seq = self.seq + 1;
        let mut buf = Vec::with_capacity((RECS - HDR + txn.bytes) as usize);
        buf.resize((RECS - HDR) as usize, 0);
        for r in &txn.recs {
            match r {
                Rec::Write { off, data } => {
                    buf.extend_from_slice(&KIND_WRITE.to_le_bytes());
                    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
                    buf.extend_from_slice(&off.to_le_bytes());
                    buf.extend_from_slice(data);
                    buf.resize(buf.len().div_ceil(8) * 8, 0);
                }
                Rec::Zero { off, len } => {
                    buf.extend_from_slice(&KIND_ZERO.to_le_bytes());
                    buf.extend_from_slice(&(*len as u32).to_le_bytes());
                    buf.extend_from_slice(&off.to_le_bytes());
                }
            }
        }
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[8..16].copy_from_slice(&seq.to_le_bytes());
        buf[16..20].copy_from_slice(&(txn.recs.len() as u32).to_le_bytes());
        buf[20..24].copy_from_slice(&(txn.bytes as u32).to_le_bytes());
        let crc = crc32c::crc32c(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        media.write(self.off + HDR, &buf);
        media.persist(self.off + HDR, buf.len() as u64);
        media.write_u64_atomic(self.off, (seq << 1) | 1);
        media.persist(self.off, 8);
        self.seq = seq;
        apply(media, &txn.recs);
        self.retire(media);
        Ok(())
    }

    fn retire(&mut self, media: &dyn Media) {
        media.write_u64_atomic(self.off, self.seq << 1);
        media.persist(self.off, 8);
    }

    /// Bytes of the journal area.
    pub fn area_len(&self) -> u64 {
        self.len
    }

    /// Last sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Read the journal without changing anything: the last sequence number and, when a committed
/// transaction awaits replay, its records.
fn inspect(media: &dyn Media, geo: &Geometry) -> Result<(u64, Option<Vec<Rec>>), JournalDamage> {
    let state = media.read_u64(geo.journal_off);
    let seq = state >> 1;
    if state & 1 == 0 {
        return Ok((seq, None));
    }
    let mut hdr = [0u8; (RECS - HDR) as usize];
    media.read(geo.journal_off + HDR, &mut hdr);
    let magic = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
    let crc = u32::from_le_bytes(hdr[4..8].try_into().expect("4"));
    let hseq = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
    let nrec = u32::from_le_bytes(hdr[16..20].try_into().expect("4"));
    let bytes = u32::from_le_bytes(hdr[20..24].try_into().expect("4")) as u64;
    if magic != MAGIC || hseq != seq {
        return Err(JournalDamage(format!("committed transaction {seq} has no matching header")));
    }
    if bytes > Journal::capacity(geo.journal_len) {
        return Err(JournalDamage(format!("transaction {seq} claims {bytes} bytes")));
    }
    let mut body = vec![0u8; bytes as usize];
    media.read(geo.journal_off + RECS, &mut body);
    if crc32c::crc32c_append(crc32c::crc32c(&hdr[8..]), &body) != crc {
        return Err(JournalDamage(format!("committed transaction {seq} fails its checksum")));
    }
    let recs = decode(&body, nrec, geo).map_err(|e| JournalDamage(format!("transaction {seq}: {e}")))?;
    Ok((seq, Some(recs)))
}

fn decode(body: &[u8], nrec: u32, geo: &Geometry) -> Result<Vec<Rec>, String> {
    // Every record takes at least its header: a count beyond that is damage, not a reason to
    // reserve memory for 2^32 records.
    if nrec as u64 > body.len() as u64 / REC_HDR {
        return Err(format!("{nrec} records cannot fit in {} bytes", body.len()));
    }
    let mut recs = Vec::with_capacity(nrec as usize);
    let mut at = 0usize;
    for i in 0..nrec {
        let h = body.get(at..at.saturating_add(REC_HDR as usize)).ok_or(format!("record {i} truncated"))?;
        let kind = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4")) as u64;
        let off = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        at += REC_HDR as usize;
        if !target_allowed(geo, off, len) {
            return Err(format!("record {i} targets [{off}, +{len}) outside the metadata and data areas"));
        }
        match kind {
            KIND_WRITE => {
                let padded = len.div_ceil(8) as usize * 8;
                let data =
                    body.get(at..at.saturating_add(len as usize)).ok_or(format!("record {i} payload truncated"))?;
                recs.push(Rec::Write { off, data: data.to_vec() });
                at = at.saturating_add(padded);
            }
            KIND_ZERO => recs.push(Rec::Zero { off, len }),
            k => return Err(format!("record {i} has unknown kind {k}")),
        }
    }
    Ok(recs)
}

/// A record may target the meta header, the tables or the data area — never the superblock or
/// the journal itself.
fn target_allowed(geo: &Geometry, off: u64, len: u64) -> bool {
    let Some(end) = off.checked_add(len) else { return false };
    let journal = geo.journal_off..geo.journal_off + geo.journal_len;
    off >= BLOCK && end <= geo.pool_size && (end <= journal.start || off >= journal.end)
}

fn apply(media: &dyn Media, recs: &[Rec]) {
    let mut ranges = Vec::with_capacity(recs.len());
    for r in recs {
        match r {
            Rec::Write { off, data } => media.write(*off, data),
            Rec::Zero { off, len } => media.fill(*off, *len, 0),
        }
        ranges.push(r.range());
    }
    media.flush_ranges(&mut ranges);
    media.drain();
}

/// A read-only look at the journal, for `check`.
pub fn describe(media: &dyn Media, geo: &Geometry) -> Result<Option<u64>, JournalDamage> {
    Ok(inspect(media, geo)?.1.map(|_| media.read_u64(geo.journal_off) >> 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::layout::FormatOptions;
    use crate::pool::media::sim::SimMedia;

    fn setup() -> (SimMedia, Geometry) {
        let geo = Geometry::compute(16 << 20, FormatOptions::default()).unwrap();
        let m = SimMedia::new(geo.pool_size);
        Journal::format(&m, &geo);
        (m, geo)
    }

    #[test]
    fn committed_transactions_apply_and_survive_every_crash_point() {
        let (m, geo) = setup();
        let target = geo.objtab_off;
        // Find how many barriers a commit takes, then crash before each one.
        let (mut j, _) = Journal::recover(&m, &geo).unwrap();
        let before = m.drains();
        let mut t = Txn::new();
        t.write(target, &[0xAA; 100]);
        t.zero(target + 200, 50);
        j.commit(&m, &t).unwrap();
        let barriers = m.drains() - before;
        assert_eq!(barriers, 4);
        for crash_at in 0..barriers {
            for seed in 0..20 {
                let (m, geo) = setup();
                m.write(target + 200, &[0x55; 50]);
                m.persist(target + 200, 50);
                let (mut j, _) = Journal::recover(&m, &geo).unwrap();
                m.arm_crash(crash_at, seed);
                j.commit(&m, &t).unwrap();
                let img = m.take_crash_image().unwrap();
                let m2 = SimMedia::from_image(img);
                Journal::recover(&m2, &geo).unwrap();
                let mut a = [0u8; 100];
                let mut z = [0u8; 50];
                m2.read(target, &mut a);
                m2.read(target + 200, &mut z);
                let applied = a == [0xAA; 100] && z == [0; 50];
                let absent = a == [0; 100] && z == [0x55; 50];
                assert!(applied || absent, "torn transaction at barrier {crash_at}, seed {seed}");
                if crash_at >= 2 {
                    assert!(applied, "committed transaction lost at barrier {crash_at}, seed {seed}");
                }
            }
        }
    }

    #[test]
    fn appending_drops_only_a_write_that_is_wholly_replaced_with_nothing_overlapping_between() {
        let (_, geo) = setup();
        let (h, o) = (geo.meta_off, geo.objtab_off);
        let mut a = Txn::new();
        a.write(o, &[1; 8]);
        a.write(h, &[1; 64]);
        let mut b = Txn::new();
        b.write(o + 256, &[2; 8]);
        b.write(h, &[2; 64]);
        a.append(b);
        assert_eq!(a.recs.len(), 3, "the first header write is replaced");
        assert!(matches!(&a.recs[2], Rec::Write { off, data } if *off == h && data[0] == 2));
        assert_eq!(a.encoded_len(), a.recs.iter().map(Rec::encoded_len).sum::<u64>());
        // A zero overlapping the range in between: both writes stay.
        let mut c = Txn::new();
        c.zero(h + 8, 8);
        c.write(h, &[3; 64]);
        a.append(c);
        assert_eq!(a.recs.len(), 5);
        // A write of a different length: both stay.
        let mut d = Txn::new();
        d.write(h, &[4; 32]);
        a.append(d);
        assert_eq!(a.recs.len(), 6);
    }

    #[test]
    fn oversized_and_hostile_transactions_are_refused() {
        let (m, geo) = setup();
        let (mut j, _) = Journal::recover(&m, &geo).unwrap();
        let mut t = Txn::new();
        t.write(geo.objtab_off, &vec![1u8; geo.journal_len as usize]);
        assert!(j.commit(&m, &t).is_err());
        assert!(!target_allowed(&geo, 0, 8), "superblock");
        assert!(!target_allowed(&geo, geo.journal_off + 8, 8), "journal");
        assert!(!target_allowed(&geo, u64::MAX - 2, 8), "overflow");
        assert!(target_allowed(&geo, geo.objtab_off, 256));
    }

    #[test]
    fn a_damaged_committed_transaction_is_reported_not_replayed() {
        let (m, geo) = setup();
        let (mut j, _) = Journal::recover(&m, &geo).unwrap();
        let mut t = Txn::new();
        t.write(geo.objtab_off, &[1; 8]);
        j.commit(&m, &t).unwrap();
        // Pretend the commit word is set again while the records are garbage.
        m.write_u64_atomic(geo.journal_off, (j.seq() << 1) | 1);
        m.write(geo.journal_off + RECS, &[0xFF; 16]);
        assert!(Journal::recover(&m, &geo).is_err());
    }

    #[test]
    fn a_crafted_record_count_is_damage_not_an_allocation() {
        let geo = Geometry::compute(64 << 20, Default::default()).unwrap();
        let e = decode(&[0u8; 64], u32::MAX, &geo).unwrap_err();
        assert!(e.contains("cannot fit"), "{e}");
        // A record whose length points past the body is truncated, not a panic.
        let mut body = vec![0u8; 32];
        body[0..4].copy_from_slice(&KIND_WRITE.to_le_bytes());
        body[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        body[8..16].copy_from_slice(&geo.meta_off.to_le_bytes());
        assert!(decode(&body, 1, &geo).is_err());
    }
}
