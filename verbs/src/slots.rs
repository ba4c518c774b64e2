//! The send queue's request slots: a fixed slab, one slot per work request in flight, whose
//! index is the request's `wr_id`. The completion handler writes the status into the slot and
//! wakes its owner through an [`AtomicWaker`]; no map, no per-request channel or allocation.
//!
//! A slot's life: free → posted (taken by a submitter, its request on the queue) → done
//! (the completion is in) → free (the owner has read the status). An owner that gives up
//! before the completion (its future dropped) marks the slot abandoned, and the completion
//! frees it: a slot, and whatever it keeps alive (the request's buffers), is reused only after
//! the device is done with it.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::Semaphore;

/// What a request keeps alive until its completion (its buffers, a window).
pub(crate) type Keep = Arc<dyn Any + Send + Sync>;

/// The status a slot gets when its request was never posted (the posting thread failed):
/// not a verbs status (those are small).
pub(crate) const NOT_POSTED: u32 = u32::MAX;

const FREE: u64 = 0;
const POSTED: u64 = 1;
const ABANDONED: u64 = 2;
const DONE: u64 = 3;

fn done(status: u32) -> u64 {
    DONE | (u64::from(status) << 8)
}

struct Slot {
    /// FREE, POSTED, ABANDONED, or DONE with the status in bits 8..40.
    state: AtomicU64,
    waker: AtomicWaker,
    keep: Mutex<Option<Keep>>,
}

/// A fixed number of request slots.
pub(crate) struct Slots {
    slots: Box<[Slot]>,
    free: Mutex<Vec<u32>>,
    /// One permit per free slot, for submitters waiting for one.
    permits: Semaphore,
    /// Requests taken and not yet completed.
    inflight: AtomicUsize,
}

impl Slots {
    pub(crate) fn new(n: usize) -> Self {
        let slots = (0..n)
            .map(|_| Slot { state: AtomicU64::new(FREE), waker: AtomicWaker::new(), keep: Mutex::new(None) })
            .collect();
        Self {
            slots,
            free: Mutex::new((0..n as u32).rev().collect()),
            permits: Semaphore::new(n),
            inflight: AtomicUsize::new(0),
        }
    }

    /// Requests taken and not yet completed.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// Take a free slot (waiting for one if all are in use) for a request that keeps `keep`
    /// alive until its completion. `None` once [`close`](Self::close)d.
    pub(crate) async fn take(&self, keep: Option<Keep>) -> Option<Ticket<'_>> {
        self.permits.acquire().await.ok()?.forget();
        let idx = self.free.lock().expect("free slots").pop().expect("a permit means a free slot");
        let s = &self.slots[idx as usize];
        *s.keep.lock().expect("slot keep") = keep;
        s.state.store(POSTED, Ordering::Release);
        self.inflight.fetch_add(1, Ordering::AcqRel);
        Some(Ticket { slots: self, idx, settled: false })
    }

    /// Refuse further takes.
    pub(crate) fn close(&self) {
        self.permits.close();
    }

    /// The completion for request `id` is in: release what it kept, then hand the owner its
    /// status (or free the slot if the owner is gone). Ignores an id that is not a taken slot.
    pub(crate) fn complete(&self, id: u64, status: u32) {
        let Some(s) = usize::try_from(id).ok().and_then(|i| self.slots.get(i)) else { return };
        let mut cur = s.state.load(Ordering::Acquire);
        if cur != POSTED && cur != ABANDONED {
            return; // not a request in flight (a stray or repeated id)
        }
        // Release before the owner can see the status: it may then expect to hold the only
        // reference. (While the request is in flight nobody else touches `keep`.)
        drop(s.keep.lock().expect("slot keep").take());
        // The owner may abandon the slot meanwhile (POSTED → ABANDONED), nothing else.
        while let Err(now) = s.state.compare_exchange(cur, done(status), Ordering::AcqRel, Ordering::Acquire) {
            cur = now;
        }
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        if cur == ABANDONED {
            self.release(id as u32);
        } else {
            s.waker.wake();
        }
    }

    fn release(&self, idx: u32) {
        self.slots[idx as usize].state.store(FREE, Ordering::Release);
        self.free.lock().expect("free slots").push(idx);
        self.permits.add_permits(1);
    }
}

/// A taken slot: its request's id, and a future of the request's completion status.
/// Dropping it before the completion leaves the slot to the completion.
pub(crate) struct Ticket<'a> {
    slots: &'a Slots,
    idx: u32,
    settled: bool,
}

impl Ticket<'_> {
    /// The `wr_id` to post the request with.
    pub(crate) fn id(&self) -> u64 {
        u64::from(self.idx)
    }

    fn slot(&self) -> &Slot {
        &self.slots.slots[self.idx as usize]
    }

    /// The status if the completion is in (then the slot is free again).
    pub(crate) fn try_status(&mut self) -> Option<u32> {
        if self.settled {
            return None;
        }
        let st = self.slot().state.load(Ordering::Acquire);
        if st & 0xff != DONE {
            return None;
        }
        self.settled = true;
        self.slots.release(self.idx);
        Some((st >> 8) as u32)
    }

    /// The request was not posted after all: free the slot now.
    pub(crate) fn unpost(mut self) {
        self.settled = true;
        drop(self.slot().keep.lock().expect("slot keep").take());
        self.slots.inflight.fetch_sub(1, Ordering::AcqRel);
        self.slots.release(self.idx);
    }
}

impl Future for Ticket<'_> {
    type Output = u32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
        if let Some(s) = self.try_status() {
            return Poll::Ready(s);
        }
        self.slot().waker.register(cx.waker());
        // Look again: the completion may have come between the first look and the register.
        match self.try_status() {
            Some(s) => Poll::Ready(s),
            None => Poll::Pending,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Still in flight: the completion frees the slot. Already done: free it here.
        if self.slot().state.compare_exchange(POSTED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.slots.release(self.idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    fn kept() -> (Keep, Arc<AtomicBool>) {
        let f = Arc::new(AtomicBool::new(false));
        (Arc::new(Flag(f.clone())), f)
    }

    #[tokio::test]
    async fn a_completion_wakes_its_owner_with_the_status_and_frees_the_slot() {
        let s = Arc::new(Slots::new(2));
        let (keep, released) = kept();
        let t = s.take(Some(keep)).await.unwrap();
        let id = t.id();
        assert_eq!(s.inflight(), 1);
        let s2 = s.clone();
        let done = tokio::spawn(async move {
            tokio::task::yield_now().await;
            s2.complete(id, 7);
        });
        assert_eq!(t.await, 7);
        done.await.unwrap();
        assert!(released.load(Ordering::Acquire), "what the request kept is released at its completion");
        assert_eq!(s.inflight(), 0);
        assert_eq!(s.free.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_abandoned_slot_stays_taken_until_its_completion() {
        let s = Slots::new(1);
        let (keep, released) = kept();
        let t = s.take(Some(keep)).await.unwrap();
        let id = t.id();
        drop(t);
        // The device may still use the request's buffers: nothing is released or reused.
        assert!(!released.load(Ordering::Acquire));
        assert!(tokio::time::timeout(Duration::from_millis(20), s.take(None)).await.is_err(), "slot reused early");
        s.complete(id, 0);
        assert!(released.load(Ordering::Acquire));
        let again = tokio::time::timeout(Duration::from_secs(5), s.take(None)).await.expect("slot freed").unwrap();
        assert_eq!(again.id(), id);
        again.unpost();
        assert_eq!(s.inflight(), 0);
    }

    #[tokio::test]
    async fn a_full_slab_makes_takers_wait_and_closing_refuses_them() {
        let s = Arc::new(Slots::new(1));
        let mut t = s.take(None).await.unwrap();
        let s2 = s.clone();
        let waiter = tokio::spawn(async move { s2.take(None).await.map(|t| t.id()) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let id = t.id();
        s.complete(id, 0);
        assert_eq!(t.try_status(), Some(0));
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap(), Some(id));
        s.close();
        assert!(s.take(None).await.is_none());
    }

    #[tokio::test]
    async fn stray_completions_change_nothing() {
        let s = Slots::new(2);
        s.complete(99, 0);
        s.complete(1, 0);
        let mut t = s.take(None).await.unwrap();
        assert_eq!(t.try_status(), None);
        s.complete(t.id(), 5);
        s.complete(t.id(), 6);
        assert_eq!(t.try_status(), Some(5));
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn completions_racing_owners_on_threads_lose_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let s = Arc::new(Slots::new(4));
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let s2 = s.clone();
        let completer = std::thread::spawn(move || {
            while let Ok(id) = rx.recv() {
                s2.complete(id, (id % 3) as u32);
            }
        });
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                let mut tasks = Vec::new();
                for n in 0..8u64 {
                    let (s, tx) = (s.clone(), tx.clone());
                    tasks.push(tokio::spawn(async move {
                        for i in 0..2_000u64 {
                            let t = s.take(None).await.unwrap();
                            let id = t.id();
                            tx.send(id).unwrap();
                            if (n + i) % 5 == 0 {
                                drop(t); // abandoned: the completion frees it
                            } else {
                                assert_eq!(t.await, (id % 3) as u32);
                            }
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            })
            .await
            .expect("a slot was lost: takers waited for ever")
        });
        drop(tx);
        completer.join().unwrap();
        assert_eq!(s.inflight(), 0);
        assert_eq!(s.free.lock().unwrap().len(), 4, "every slot came back");
    }
}
