//! The fence: whether this node may grant leases and serve operations under them.
//!
//! A single node always may. A cluster member may only while its membership is current: until
//! a deadline that each renewal of its etcd lease pushes forward ([`Fence::open_until`]). The
//! check is a clock comparison made on the spot, not a flag some task sets, so a node that was
//! stopped (SIGSTOP, a long pause) and runs again refuses at once, before anything else of it
//! has had a chance to run. Revoking the leases already granted is the membership's job when
//! the deadline passes (`LeaseManager::fence_revoke`).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The origin of the fence's clock.
static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn ticks(t: Instant) -> u64 {
    t.saturating_duration_since(*BASE).as_nanos().min(u64::MAX as u128) as u64
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Fence {
    /// Set once: this node's leases depend on its membership.
    enabled: AtomicBool,
    /// While enabled: open until this instant (nanoseconds after `BASE`; 0: closed).
    until: AtomicU64,
    /// Wakes whoever waits for the deadline to move.
    moved: Notify,
}

impl Fence {
    /// Make grants depend on membership, closed until the first [`Fence::open_until`].
    pub fn enable(&self) {
        LazyLock::force(&BASE);
        self.enabled.store(true, Ordering::Release);
    }

    /// Whether membership governs this node at all.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Open until `t` (only ever later: a slow renewal answer cannot shorten it).
    pub fn open_until(&self, t: Instant) {
        self.until.fetch_max(ticks(t), Ordering::AcqRel);
        self.moved.notify_waiters();
    }

    /// Close now (the membership is known lost).
    pub fn close(&self) {
        self.until.store(0, Ordering::Release);
        self.moved.notify_waiters();
    }

    /// Whether grants and operations are allowed now.
    pub fn is_open(&self) -> bool {
        !self.enabled() || ticks(Instant::now()) < self.until.load(Ordering::Acquire)
    }

    /// How long it stays open from now (zero when closed; `None` when not enabled).
    pub fn remaining(&self) -> Option<Duration> {
        self.enabled()
            .then(|| Duration::from_nanos(self.until.load(Ordering::Acquire).saturating_sub(ticks(Instant::now()))))
    }

    /// While open: wait until the deadline moves or passes, whichever comes first. While
    /// closed: wait until it moves.
    pub async fn changed_or_due(&self) {
        let n = self.moved.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        match self.remaining() {
            Some(d) if !d.is_zero() => {
                let _ = tokio::time::timeout(d, n).await;
            }
            _ => n.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_node_is_never_fenced() {
        let f = Fence::default();
        assert!(f.is_open());
        assert_eq!(f.remaining(), None);
    }

    #[test]
    fn a_member_is_open_only_until_its_deadline() {
        let f = Fence::default();
        f.enable();
        assert!(!f.is_open(), "closed until the first renewal");
        f.open_until(Instant::now() + Duration::from_secs(60));
        assert!(f.is_open());
        // A late answer to an older renewal does not shorten it.
        f.open_until(Instant::now() + Duration::from_secs(1));
        assert!(f.remaining().unwrap() > Duration::from_secs(30));
        f.close();
        assert!(!f.is_open());
        f.open_until(Instant::now() - Duration::from_millis(1));
        assert!(!f.is_open(), "a deadline in the past is closed");
    }

    #[tokio::test]
    async fn waiting_ends_when_the_deadline_passes_or_moves() {
        let f = std::sync::Arc::new(Fence::default());
        f.enable();
        // Closed: until it moves.
        let g = f.clone();
        let waiter = tokio::spawn(async move { g.changed_or_due().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a closed fence's wait ended without a move");
        f.open_until(Instant::now() + Duration::from_millis(30));
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("opening wakes the waiter").unwrap();
        let t = Instant::now();
        f.changed_or_due().await;
        assert!(t.elapsed() >= Duration::from_millis(25), "returned before the deadline");
        f.open_until(Instant::now() + Duration::from_secs(60));
        let g = f.clone();
        let waiter = tokio::spawn(async move { g.changed_or_due().await });
        tokio::task::yield_now().await;
        f.open_until(Instant::now() + Duration::from_secs(120));
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("a move wakes the waiter").unwrap();
    }
}
