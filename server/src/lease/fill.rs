//! Read-write leases that leave holes as holes, and filling them later.
//!
//! An SDK grant fills every hole of a read-write range at grant time, so each segment it hands
//! out has a key. An internal holder that serves a sparse range — the NBD server, whose
//! volumes may be sparse and whose TRIM makes holes — asks for a grant with
//! [`GrantRequest::allocate`](super::GrantRequest) off: holes come back unkeyed, and the holder
//! calls [`LeaseManager::fill`] for the hole a write lands in. That allocates the blocks and
//! keys them into the *same* lease (same id and generation), under the pool's metadata lock
//! like a grant, so a layout change cannot come between reading the new layout and keying it.
//! A lease being recalled is not filled (its holder is about to return it).

use std::sync::Arc;

use rdax_proto::model::SessionId;

use super::{GrantSegment, LeaseError, LeaseManager, Mode, State, keys, overlaps};

impl LeaseManager {
    /// Allocate the holes of `[offset, offset + len)` in the active read-write lease `id` of
    /// `session`, and key the new blocks into it. Returns the segments of that range (every
    /// one keyed). The range must lie inside the lease and must not overlap a segment the
    /// lease already keys differently (the caller fills a hole it saw in its grant).
    pub async fn fill(
        self: &Arc<Self>,
        session: SessionId,
        id: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<GrantSegment>, LeaseError> {
        let end = offset.checked_add(len).ok_or(LeaseError::Invalid("offset + length overflows"))?;
        let object = {
            let mut g = self.lock();
            let l = self.owned(&mut g, session, id)?;
            if l.state != State::Active {
                return Err(LeaseError::NotActive(id));
            }
            if l.mode != Mode::ReadWrite {
                return Err(LeaseError::Invalid("only a read-write lease can be filled"));
            }
            if len == 0 || offset < l.lo || end > l.hi {
                return Err(LeaseError::Invalid("the range to fill is not inside the lease"));
            }
            l.object.clone()
        };
        let (k, cap) = (object.clone(), self.config().limits.alloc_per_request);
        self.blocking(move |p| p.allocate_capped(&k.namespace, &k.name, offset, len, cap)).await??;
        let this = self.clone();
        self.blocking(move |p| {
            p.with_segments(&object.namespace, &object.name, offset, len, |oid, _epoch, segs| {
                this.key_filled(session, id, oid, segs)
            })
        })
        .await??
    }

    /// Key `segs` (the filled range's layout, read under the metadata lock) into lease `id`.
    fn key_filled(
        &self,
        session: SessionId,
        id: u64,
        object_id: u64,
        segs: &[crate::pool::Segment],
    ) -> Result<Vec<GrantSegment>, LeaseError> {
        let mut g = self.lock();
        let l = self.owned(&mut g, session, id)?;
        if l.state != State::Active || l.object_id != object_id {
            return Err(LeaseError::NotActive(id));
        }
        let (generation, pins, mode) = (l.generation, l.pins.clone(), l.mode);
        let mut out = Vec::with_capacity(segs.len());
        let mut entries = Vec::new();
        let mut keyed = Vec::new();
        for s in segs {
            let Some(p) = s.pool_offset else {
                return Err(LeaseError::NotActive(id)); // punched meanwhile: a recall follows
            };
            // Filled already (by another request of the same holder): the key it got.
            if let Some(i) = l.segs.iter().position(|&(o, n, q)| (o, n, q) == (s.offset, s.len, p)) {
                let key = l.keys[i];
                out.push(GrantSegment { object_offset: s.offset, len: s.len, target: Some((p, key)), remote: None });
                continue;
            }
            if l.segs.iter().any(|&(o, n, _)| overlaps((o, o + n), (s.offset, s.offset + s.len))) {
                return Err(LeaseError::Invalid("the range to fill overlaps segments the lease keys already"));
            }
            let key = keys::random_key();
            let e = keys::KeyEntry {
                lease: id,
                session,
                generation,
                pool_lo: p,
                pool_hi: p + s.len,
                mode,
                pins: pins.clone(),
            };
            entries.push((key, e));
            keyed.push((s.offset, s.len, p, key));
            out.push(GrantSegment { object_offset: s.offset, len: s.len, target: Some((p, key)), remote: None });
        }
        let limits = self.config().limits;
        let used = g.live_by_session.get(&session).copied().unwrap_or_default();
        if used.keys + keyed.len() > limits.keys_per_session {
            let what = "the session's leases hold as many keys as they may";
            return Err(LeaseError::Limit { what, cap: limits.keys_per_session, key: "limits.max_keys_per_session" });
        }
        let l = g.leases.get_mut(&id).expect("checked above");
        for &(o, n, p, key) in &keyed {
            l.segs.push((o, n, p));
            l.keys.push(key);
        }
        for &(_, n, p, _) in &keyed {
            g.undrained.insert(id, p, p + n);
        }
        if let Some(u) = g.live_by_session.get_mut(&session) {
            u.keys += keyed.len();
        }
        self.keys.insert(entries);
        Ok(out)
    }
}
