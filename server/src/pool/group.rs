//! Group commit: the transactions of concurrent operations share one journal commit.
//!
//! An operation changes DRAM and queues its transaction under the metadata write lock, so the
//! queue is in the order DRAM changed; it gets a *ticket* (its position in that order). It
//! then drops the lock and waits for its ticket to be durable: the first waiter to take the
//! journal becomes the leader, takes every queued transaction, and commits them as one (or as
//! few as the journal's size allows); whoever queued meanwhile waits for the leader to finish
//! and then leads the next group. Nothing waits for company — a lone operation commits at
//! once — so an operation's latency is bounded by at most one commit ahead of its own.
//!
//! Nothing is acknowledged before its ticket is durable, and a reader that saw DRAM waits for
//! the ticket it saw (see [`Group::queued`]), so no caller acts on a change a crash could take
//! back. Blocks an operation frees are handed to the release hook only after its ticket is
//! durable, so they cannot be reused (and overwritten) while a crash could still give them
//! back to their old owner.
//!
//! Lock order: the metadata lock, then `journal`, then `queue` (the leader takes `journal`
//! then `queue`, never the metadata lock, and holds no other lock of the group's while it
//! commits).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use super::journal::{Journal, Txn};
use super::lock;
use super::media::Media;

/// The journal and the transactions queued for it.
#[derive(Debug)]
pub(crate) struct Group {
    journal: Mutex<Journal>,
    queue: Mutex<Queue>,
    /// Whether a leader is committing, and how many followers wait on `done`.
    leading: Mutex<Leading>,
    done: Condvar,
    /// Tickets handed out (the last one).
    queued: AtomicU64,
    /// Tickets durable (every ticket up to this one).
    durable: AtomicU64,
    /// Commits so far and transactions they carried (for the figures in `stats`).
    commits: AtomicU64,
}

/// Ends a leader's turn, even if its commit panicked (a bug): followers must not wait for a
/// leader that is gone.
struct Lead<'a>(&'a Group);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.leading);
        st.leading = false;
        // A lone operation (the common case on an idle pool) pays no wake-up call.
        if st.waiting > 0 {
            self.0.done.notify_all();
        }
    }
}

#[derive(Debug, Default)]
struct Leading {
    leading: bool,
    waiting: usize,
}

#[derive(Debug, Default)]
struct Queue {
    txns: Vec<Txn>,
    last: u64,
}

impl Group {
    pub(crate) fn new(journal: Journal) -> Self {
        Self {
            journal: Mutex::new(journal),
            queue: Mutex::default(),
            leading: Mutex::default(),
            done: Condvar::new(),
            queued: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        }
    }

    /// Commit `txn` at once if nothing is queued and no commit is running, else queue it;
    /// return its ticket either way. The caller holds the metadata write lock, so nobody can
    /// queue meanwhile. For media whose commit costs a few cache-line flushes (DAX): there,
    /// queueing and waking cost more than committing, and the lock is held for as long as
    /// the old one-commit-per-operation design held it. Not for `msync` media, where holding
    /// the metadata lock through a commit would keep every other operation from queueing.
    pub(crate) fn commit_now(&self, media: &dyn Media, txn: Txn) -> u64 {
        let Ok(mut journal) = self.journal.try_lock() else { return self.enqueue(txn) };
        let mut q = lock(&self.queue);
        if !q.txns.is_empty() || txn.is_empty() {
            drop(q);
            drop(journal);
            return self.enqueue(txn);
        }
        q.last += 1;
        let t = q.last;
        self.queued.store(t, Ordering::Release);
        // No leader can be between taking the queue and publishing `durable`: it would hold
        // the journal. One that takes it after us reads `last >= t`.
        self.commit_one(media, &mut journal, &txn);
        self.durable.store(t, Ordering::Release);
        t
    }

    /// Queue `txn` and return its ticket. The caller holds the metadata write lock.
    pub(crate) fn enqueue(&self, txn: Txn) -> u64 {
        if txn.is_empty() {
            return self.queued();
        }
        let mut q = lock(&self.queue);
        q.txns.push(txn);
        q.last += 1;
        self.queued.store(q.last, Ordering::Release);
        q.last
    }

    /// The last ticket handed out. Read under the metadata lock, it covers every change the
    /// reader can see.
    pub(crate) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    /// Block until `ticket` is durable, leading commits as needed. Persist failures are the
    /// medium's to report (`Media::failure`); the caller checks.
    ///
    /// Followers sleep on a condition variable that the leader signals once, for all of them
    /// (queueing them on the journal's mutex instead would wake them one by one, and a
    /// follower woken late would lead a group of one).
    pub(crate) fn wait(&self, media: &dyn Media, ticket: u64) {
        if self.durable.load(Ordering::Acquire) >= ticket {
            return;
        }
        let mut st = lock(&self.leading);
        loop {
            if self.durable.load(Ordering::Acquire) >= ticket {
                return;
            }
            if st.leading {
                st.waiting += 1;
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                st.waiting -= 1;
                continue;
            }
            st.leading = true;
            drop(st);
            let lead = Lead(self);
            self.lead(media);
            drop(lead);
            st = lock(&self.leading);
        }
    }

    /// Commit everything queued (the caller is the only leader).
    fn lead(&self, media: &dyn Media) {
        let mut journal = lock(&self.journal);
        let (txns, last) = {
            let mut q = lock(&self.queue);
            (std::mem::take(&mut q.txns), q.last)
        };
        if let [one] = &txns[..] {
            self.commit_one(media, &mut journal, one);
            self.durable.store(last, Ordering::Release);
            return;
        }
        let capacity = Journal::capacity(journal.area_len());
        let mut group = Txn::new();
        for t in txns {
            if !group.is_empty() && group.encoded_len() + t.encoded_len() > capacity {
                self.commit_one(media, &mut journal, &group);
                group = Txn::new();
            }
            group.append(t);
        }
        self.commit_one(media, &mut journal, &group);
        self.durable.store(last, Ordering::Release);
    }

    fn commit_one(&self, media: &dyn Media, journal: &mut Journal, txn: &Txn) {
        if txn.is_empty() {
            return;
        }
        // Tests pause, delay or crash (`exit`) the process on either side of a commit.
        let _ = crate::failpoint_blocking!("journal.before_commit");
        // Every operation bounds its own transaction by the journal's size, and a group is
        // cut before it outgrows it, so this cannot fail.
        journal.commit(media, txn).expect("transaction sized within the journal");
        self.commits.fetch_add(1, Ordering::Relaxed);
        let _ = crate::failpoint_blocking!("journal.after_commit");
    }

    /// Journal commits so far and operations (tickets) made durable by them.
    pub(crate) fn figures(&self) -> (u64, u64) {
        (self.commits.load(Ordering::Relaxed), self.durable.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::layout::{FormatOptions, Geometry};
    use crate::pool::media::sim::SimMedia;

    fn setup() -> (SimMedia, Geometry, Group) {
        let geo = Geometry::compute(16 << 20, FormatOptions::default()).unwrap();
        let m = SimMedia::new(geo.pool_size);
        Journal::format(&m, &geo);
        let (j, _) = Journal::recover(&m, &geo).unwrap();
        (m, geo, Group::new(j))
    }

    fn write(off: u64, data: &[u8]) -> Txn {
        let mut t = Txn::new();
        t.write(off, data);
        t
    }

    #[test]
    fn queued_transactions_share_one_commit_and_apply_in_order() {
        let (m, geo, g) = setup();
        let at = geo.objtab_off;
        let t1 = g.enqueue(write(at, &[1; 64]));
        let t2 = g.enqueue(write(at + 32, &[2; 64]));
        let mut z = Txn::new();
        z.zero(at + 60, 8);
        let t3 = g.enqueue(z);
        assert_eq!((t1, t2, t3), (1, 2, 3));
        let before = m.drains();
        g.wait(&m, t1); // the first waiter commits everything queued
        assert_eq!(m.drains() - before, 4, "one commit's barriers for three transactions");
        assert_eq!(g.figures(), (1, 3));
        g.wait(&m, t3); // already durable: nothing more
        assert_eq!(m.drains() - before, 4);
        let mut got = [0u8; 96];
        m.read(at, &mut got);
        assert_eq!(&got[..32], &[1; 32]);
        assert_eq!(&got[32..60], &[2; 28]);
        assert_eq!(&got[60..68], &[0; 8]);
        assert_eq!(&got[68..96], &[2; 28]);
        // And it is durable: a power cut now keeps all three.
        let m2 = SimMedia::from_image(m.durable_image());
        Journal::recover(&m2, &geo).unwrap();
        let mut again = [0u8; 96];
        m2.read(at, &mut again);
        assert_eq!(again, got);
    }

    #[test]
    fn commit_now_commits_at_once_when_idle_and_queues_behind_others() {
        let (m, geo, g) = setup();
        let at = geo.objtab_off;
        let t1 = g.commit_now(&m, write(at, &[1; 8]));
        assert_eq!(t1, 1);
        assert!(g.durable.load(Ordering::Acquire) >= t1, "committed at once");
        assert_eq!(m.read_u64(at), u64::from_le_bytes([1; 8]));
        // Something queued: it goes behind, in order, and commits with it.
        let t2 = g.enqueue(write(at, &[2; 8]));
        let t3 = g.commit_now(&m, write(at, &[3; 8]));
        assert_eq!((t2, t3), (2, 3));
        assert!(g.durable.load(Ordering::Acquire) < t3, "queued, not committed");
        g.wait(&m, t3);
        assert_eq!(m.read_u64(at), u64::from_le_bytes([3; 8]), "applied in order");
        assert_eq!(g.figures(), (2, 3));
        let img = SimMedia::from_image(m.durable_image());
        assert_eq!(img.read_u64(at), u64::from_le_bytes([3; 8]));
    }

    #[test]
    fn a_group_too_large_for_the_journal_is_cut_into_several_commits() {
        let (m, geo, g) = setup();
        let capacity = Journal::capacity(geo.journal_len);
        let piece = (capacity * 2 / 5) as usize; // two fit in one commit, three do not
        assert!(geo.objtab_off > geo.journal_off || geo.objtab_off + 5 * piece as u64 <= geo.journal_off);
        let mut last = 0;
        for i in 0..5u64 {
            last = g.enqueue(write(geo.objtab_off + i * piece as u64, &vec![i as u8 + 1; piece - 64]));
        }
        g.wait(&m, last);
        let (commits, txns) = g.figures();
        assert_eq!(txns, 5);
        assert_eq!(commits, 3, "2 + 2 + 1");
        for i in 0..5u64 {
            let mut b = [0u8; 1];
            m.read(geo.objtab_off + i * piece as u64, &mut b);
            assert_eq!(b[0], i as u8 + 1);
        }
    }

    #[test]
    fn concurrent_waiters_all_return_durable() {
        let (m, geo, g) = setup();
        let g = std::sync::Arc::new(g);
        let m = std::sync::Arc::new(m);
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let (g, m) = (g.clone(), m.clone());
                std::thread::spawn(move || {
                    for k in 0..50u64 {
                        let t = g.enqueue(write(geo.objtab_off + (i * 50 + k) * 8, &(i * 50 + k + 1).to_le_bytes()));
                        g.wait(m.as_ref(), t);
                        assert!(g.durable.load(Ordering::Acquire) >= t);
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(g.figures().1, 400);
        let img = SimMedia::from_image(m.durable_image());
        for n in 0..400u64 {
            assert_eq!(img.read_u64(geo.objtab_off + n * 8), n + 1);
        }
    }
}
