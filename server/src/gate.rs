//! The shutdown gate: every unit of work that must finish before the pool closes holds a
//! [`GateGuard`]; shutdown closes the gate (no new guards) and waits for the guards to go.
//!
//! Modelled on neon's `utils::sync::gate::Gate`. Guards are counted per kind of work, so a
//! shutdown that waits can say what it waits for ("2 grpc requests, 1 data-plane operation").
//! Entering is one atomic add (the data plane enters per operation); closing is idempotent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// What a guard is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A gRPC request being handled.
    Request,
    /// A job on a blocking thread that uses the pool.
    PoolJob,
    /// One data-plane operation (TCP or RDMA).
    DataOp,
    /// A layout change (recall → drain → change), owned by the lease manager.
    LayoutChange,
    /// A grant being made (lease, then transport keys).
    Grant,
    /// A streamed reply being produced.
    Stream,
}

const KINDS: [Work; 6] = [Work::Request, Work::PoolJob, Work::DataOp, Work::LayoutChange, Work::Grant, Work::Stream];

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::Request => "grpc requests",
            Work::PoolJob => "pool jobs",
            Work::DataOp => "data-plane operations",
            Work::LayoutChange => "layout changes",
            Work::Grant => "grants",
            Work::Stream => "streamed replies",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    closed: AtomicBool,
    total: AtomicUsize,
    by_kind: [AtomicUsize; KINDS.len()],
    empty: Notify,
}

/// The gate. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<Inner>);

/// The gate is closed: the daemon is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the daemon is shutting down")]
pub struct GateClosed;

/// Keeps the gate from finishing its close while held.
#[derive(Debug)]
#[must_use = "the work is only counted while the guard is held"]
pub struct GateGuard {
    gate: Arc<Inner>,
    kind: Work,
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.gate.by_kind[self.kind as usize].fetch_sub(1, Ordering::AcqRel);
        if self.gate.total.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.empty.notify_waiters();
        }
    }
}

impl Gate {
    /// Enter for `kind` of work, unless the gate is closed.
    pub fn enter(&self, kind: Work) -> Result<GateGuard, GateClosed> {
        // Count first, then check: `close` sets the flag first, then waits for the count, so
        // every guard it does not wait for sees the flag and leaves.
        self.0.total.fetch_add(1, Ordering::AcqRel);
        self.0.by_kind[kind as usize].fetch_add(1, Ordering::AcqRel);
        let g = GateGuard { gate: self.0.clone(), kind };
        if self.0.closed.load(Ordering::Acquire) {
            return Err(GateClosed);
        }
        Ok(g)
    }

    /// Count work done on behalf of work already inside (a pool job of an admitted request):
    /// never refused, so admitted work can finish after the gate started closing.
    pub fn join(&self, kind: Work) -> GateGuard {
        self.0.total.fetch_add(1, Ordering::AcqRel);
        self.0.by_kind[kind as usize].fetch_add(1, Ordering::AcqRel);
        GateGuard { gate: self.0.clone(), kind }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// Guards held now.
    pub fn inside(&self) -> usize {
        self.0.total.load(Ordering::Acquire)
    }

    /// Guards of one kind held now.
    pub fn count(&self, kind: Work) -> usize {
        self.0.by_kind[kind as usize].load(Ordering::Acquire)
    }

    /// What is inside, e.g. `2 grpc requests, 1 pool jobs`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = KINDS
            .iter()
            .filter_map(|k| {
                let n = self.0.by_kind[*k as usize].load(Ordering::Acquire);
                (n > 0).then(|| format!("{n} {}", k.name()))
            })
            .collect();
        if parts.is_empty() { "nothing".into() } else { parts.join(", ") }
    }

    /// Refuse new guards from now on (idempotent).
    pub fn start_close(&self) {
        self.0.closed.store(true, Ordering::Release);
    }

    /// Close and wait until every guard is gone, or `bound` passes. Logs what is still inside
    /// every second. Returns whether the gate emptied.
    pub async fn close(&self, bound: Duration) -> bool {
        self.start_close();
        let deadline = tokio::time::Instant::now() + bound;
        let mut next_log = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let n = self.0.empty.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.inside() == 0 {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if now >= next_log {
                tracing::info!(inside = %self.describe(), "waiting for in-flight work to finish");
                next_log = now + Duration::from_secs(1);
            }
            let _ = tokio::time::timeout_at(deadline.min(next_log), n).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn close_waits_for_guards_and_refuses_new_ones() {
        let g = Gate::default();
        let a = g.enter(Work::Request).unwrap();
        let b = g.enter(Work::DataOp).unwrap();
        assert_eq!(g.describe(), "1 grpc requests, 1 data-plane operations");
        let g2 = g.clone();
        let closing = tokio::spawn(async move { g2.close(Duration::from_secs(60)).await });
        tokio::task::yield_now().await;
        assert_eq!(g.enter(Work::Request).unwrap_err(), GateClosed);
        assert_eq!(g.inside(), 2, "a refused entry is not counted");
        drop(a);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!closing.is_finished(), "one guard is still held");
        drop(b);
        assert!(closing.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn close_is_bounded() {
        let g = Gate::default();
        let _held = g.enter(Work::PoolJob).unwrap();
        let t0 = tokio::time::Instant::now();
        assert!(!g.close(Duration::from_secs(3)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert!(g.close(Duration::ZERO).await.eq(&false));
    }
}
