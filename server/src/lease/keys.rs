//! The key table: what the data plane checks on every operation, and the pins that make
//! draining possible.
//!
//! A data-plane operation presents `(key, generation, pool offset, length, read|write)` and
//! its connection's session. [`KeyTable::pin`] checks all of it and increments the lease's pin
//! count *while holding the table's read lock*; revocation removes keys under the write lock.
//! So once `remove` returns, no new pin can be taken with those keys, and the pins already
//! taken are exactly the operations in flight — [`Pins::drained`] waits for them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rdax_proto::model::SessionId;
use tokio::sync::Notify;

/// A 128-bit data-plane key.
pub type Key = [u8; 16];

/// Remembered revoked keys (for a precise error), bounded.
const TOMBSTONES: usize = 65_536;

/// Access mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// In-flight operations of one lease.
#[derive(Debug, Default)]
pub struct Pins {
    count: AtomicU64,
    zero: Notify,
}

impl Pins {
    /// Operations in flight.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Take a pin (the caller has checked that the lease is live, under the lock that ends it).
    pub(crate) fn pin(self: &Arc<Self>, lease: u64) -> PinGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        PinGuard { pins: self.clone(), lease }
    }

    /// Wait until no operation is in flight.
    pub async fn drained(&self) {
        loop {
            let n = self.zero.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            n.await;
        }
    }
}

/// Held for the duration of one data-plane operation.
#[derive(Debug)]
pub struct PinGuard {
    pins: Arc<Pins>,
    /// The lease the operation runs under.
    pub lease: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.pins.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.pins.zero.notify_waiters();
        }
    }
}

/// What a key grants.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// Lease id.
    pub lease: u64,
    /// Owning session.
    pub session: SessionId,
    /// Lease generation.
    pub generation: u64,
    /// Pool byte range `[lo, hi)` of the segment.
    pub pool_lo: u64,
    /// End of the range.
    pub pool_hi: u64,
    /// Access mode.
    pub mode: Mode,
    /// The lease's pins.
    pub pins: Arc<Pins>,
}

/// Why a data-plane operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such key (never granted, or forged).
    #[error("unknown key")]
    UnknownKey,
    /// The key's lease was released or revoked.
    #[error("the lease was revoked or released")]
    Revoked,
    /// The key belongs to another session.
    #[error("the key belongs to another session")]
    WrongSession,
    /// The generation does not match the lease's.
    #[error("stale lease generation")]
    StaleGeneration,
    /// The range is not inside the key's segment.
    #[error("range outside the leased segment")]
    OutOfRange,
    /// A write under a read-only lease.
    #[error("the lease does not allow writes")]
    Mode,
    /// This node is fenced (a cluster member whose membership lapsed); its leases are being
    /// revoked.
    #[error("this node is fenced: its cluster membership lapsed")]
    Fenced,
}

#[derive(Default)]
struct Table {
    live: HashMap<Key, KeyEntry>,
    dead: HashMap<Key, ()>,
    dead_order: VecDeque<Key>,
}

/// All live keys.
#[derive(Default)]
pub struct KeyTable {
    t: RwLock<Table>,
    fence: Arc<super::fence::Fence>,
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable").finish_non_exhaustive()
    }
}

/// A fresh random key.
pub fn random_key() -> Key {
    let mut k = [0u8; 16];
    getrandom::fill(&mut k).expect("the OS random source failed");
    k
}

impl KeyTable {
    /// The fence every operation passes first.
    pub fn fence(&self) -> &Arc<super::fence::Fence> {
        &self.fence
    }

    /// Check an operation and pin its lease.
    pub fn pin(
        &self,
        key: &Key,
        session: SessionId,
        generation: u64,
        off: u64,
        len: u64,
        write: bool,
    ) -> Result<PinGuard, Refusal> {
        if !self.fence.is_open() {
            return Err(Refusal::Fenced);
        }
        let t = self.t.read().unwrap_or_else(|e| e.into_inner());
        let Some(e) = t.live.get(key) else {
            return Err(if t.dead.contains_key(key) { Refusal::Revoked } else { Refusal::UnknownKey });
        };
        if e.session != session {
            return Err(Refusal::WrongSession);
        }
        if e.generation != generation {
            return Err(Refusal::StaleGeneration);
        }
        let end = off.checked_add(len).ok_or(Refusal::OutOfRange)?;
        if off < e.pool_lo || end > e.pool_hi {
            return Err(Refusal::OutOfRange);
        }
        if write && e.mode != Mode::ReadWrite {
            return Err(Refusal::Mode);
        }
        Ok(e.pins.pin(e.lease))
    }

    /// Make keys live.
    pub fn insert(&self, entries: Vec<(Key, KeyEntry)>) {
        let mut t = self.t.write().unwrap_or_else(|e| e.into_inner());
        t.live.extend(entries);
    }

    /// Kill keys: from the moment this returns, `pin` refuses them.
    pub fn remove(&self, keys: &[Key]) {
        let mut t = self.t.write().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if t.live.remove(k).is_some() {
                t.dead.insert(*k, ());
                t.dead_order.push_back(*k);
                if t.dead_order.len() > TOMBSTONES
                    && let Some(old) = t.dead_order.pop_front()
                {
                    t.dead.remove(&old);
                }
            }
        }
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.t.read().unwrap_or_else(|e| e.into_inner()).live.len()
    }

    /// True without live keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(session: SessionId, mode: Mode, pins: Arc<Pins>) -> KeyEntry {
        KeyEntry { lease: 1, session, generation: 7, pool_lo: 4096, pool_hi: 8192, mode, pins }
    }

    #[test]
    fn every_check_is_applied() {
        let t = KeyTable::default();
        let (s, other) = (SessionId([1; 16]), SessionId([2; 16]));
        let (k, ro) = (random_key(), random_key());
        let pins = Arc::new(Pins::default());
        t.insert(vec![(k, entry(s, Mode::ReadWrite, pins.clone())), (ro, entry(s, Mode::Read, pins.clone()))]);
        assert!(t.pin(&k, s, 7, 4096, 4096, true).is_ok());
        assert_eq!(t.pin(&random_key(), s, 7, 4096, 1, false).unwrap_err(), Refusal::UnknownKey);
        assert_eq!(t.pin(&k, other, 7, 4096, 1, false).unwrap_err(), Refusal::WrongSession);
        assert_eq!(t.pin(&k, s, 6, 4096, 1, false).unwrap_err(), Refusal::StaleGeneration);
        assert_eq!(t.pin(&k, s, 7, 4095, 1, false).unwrap_err(), Refusal::OutOfRange);
        assert_eq!(t.pin(&k, s, 7, 8000, 200, false).unwrap_err(), Refusal::OutOfRange);
        assert_eq!(t.pin(&k, s, 7, u64::MAX, 2, false).unwrap_err(), Refusal::OutOfRange);
        assert_eq!(t.pin(&ro, s, 7, 4096, 1, true).unwrap_err(), Refusal::Mode);
        assert!(t.pin(&ro, s, 7, 4096, 1, false).is_ok());
        t.remove(&[k]);
        assert_eq!(t.pin(&k, s, 7, 4096, 1, false).unwrap_err(), Refusal::Revoked);
        assert_eq!(pins.count(), 0, "guards dropped");
    }

    #[tokio::test]
    async fn drained_waits_for_every_pin() {
        let t = Arc::new(KeyTable::default());
        let s = SessionId([1; 16]);
        let k = random_key();
        let pins = Arc::new(Pins::default());
        t.insert(vec![(k, entry(s, Mode::ReadWrite, pins.clone()))]);
        let g1 = t.pin(&k, s, 7, 4096, 1, true).unwrap();
        let g2 = t.pin(&k, s, 7, 4096, 1, true).unwrap();
        t.remove(&[k]);
        let p = pins.clone();
        let waiter = tokio::spawn(async move { p.drained().await });
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g2);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
