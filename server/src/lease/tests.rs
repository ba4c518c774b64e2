//! Lease manager tests on paused (virtual) time, over a simulated pool.
use super::*;
use crate::pool::layout::FormatOptions;
use crate::pool::media::sim::SimMedia;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(30);
const BREAK: Duration = Duration::from_secs(5);

struct Fx {
    leases: Arc<LeaseManager>,
    sessions: Arc<SessionManager>,
    pool: Arc<Pool>,
}

fn fixture() -> Fx {
    let media = Arc::new(SimMedia::new(16 << 20));
    let pool = Arc::new(Pool::format_media(media, true, FormatOptions::default(), None).unwrap());
    for name in ["x", "y"] {
        pool.create_object("ns", name, 1 << 20).unwrap();
    }
    let sessions = Arc::new(SessionManager::new(Duration::from_secs(3600), 16));
    let cfg = LeaseConfig { ttl: TTL, break_timeout: BREAK, drain_timeout: Duration::from_secs(20) };
    let leases = LeaseManager::new(pool.clone(), sessions.clone(), cfg);
    Fx { leases, sessions, pool }
}

fn session(fx: &Fx) -> (SessionId, tokio::sync::mpsc::Receiver<Result<pb::SessionEvent, tonic::Status>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (id, _) = fx.sessions.open("t".into(), None, tx, CancellationToken::new()).unwrap();
    (id, rx)
}

fn key(ns: &str, n: &str) -> ObjectKey {
    ObjectKey::new(ns, n).unwrap()
}

fn first_key(g: &Grant) -> (u64, Key) {
    g.segments[0].target.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_renewed_expires_and_a_renewed_one_does_not() {
    let fx = fixture();
    let cancel = CancellationToken::new();
    tokio::spawn(fx.leases.clone().reap(cancel.clone()));
    let (s, _rx) = session(&fx);
    let kept = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    let lapsed = fx.leases.acquire(s, key("ns", "y"), 0, 4096, Mode::ReadWrite).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(TTL / 2).await;
        fx.leases.renew(s, kept.id).unwrap();
    }
    let (p, k) = first_key(&kept);
    assert!(fx.leases.keys().pin(&k, s, kept.generation, p, 1, true).is_ok(), "renewed lease still works after 2 TTLs");
    let (p, k) = first_key(&lapsed);
    assert_eq!(fx.leases.keys().pin(&k, s, lapsed.generation, p, 1, true).unwrap_err(), Refusal::Revoked);
    // Revoked, then drained and forgotten: either answer tells the holder it is gone.
    let e = fx.leases.renew(s, lapsed.id).unwrap_err();
    assert!(matches!(e, LeaseError::NotActive(_) | LeaseError::NotFound(_)), "{e}");
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_unreturned_lease_is_revoked_exactly_at_the_break_deadline() {
    let fx = fixture();
    let (s, mut rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let t0 = Instant::now();
    let guard = fx.leases.recall(&key("ns", "x"), 4096, u64::MAX, "truncate").await.unwrap();
    assert_eq!(t0.elapsed(), BREAK, "virtual time: the recall waits exactly the break timeout");
    drop(guard);
    let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.unwrap().kind).collect();
    assert!(matches!(kinds[0], Some(pb::session_event::Kind::LeaseRecall(_))), "{kinds:?}");
    assert!(matches!(kinds[1], Some(pb::session_event::Kind::LeaseRevoked(_))), "{kinds:?}");
    let (p, k) = first_key(&g);
    assert_eq!(fx.leases.keys().pin(&k, s, g.generation, p, 1, false).unwrap_err(), Refusal::Revoked);
}

#[tokio::test(start_paused = true)]
async fn recall_waits_for_in_flight_operations_and_ignores_unrelated_leases() {
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    let other = fx.leases.acquire(s, key("ns", "y"), 0, 4096, Mode::ReadWrite).await.unwrap();
    let (p, k) = first_key(&g);
    let pin = fx.leases.keys().pin(&k, s, g.generation, p, 4096, true).unwrap();
    let (op, ok) = first_key(&other);
    let _unrelated_pin = fx.leases.keys().pin(&ok, s, other.generation, op, 1, true).unwrap();
    let m = fx.leases.clone();
    let t0 = Instant::now();
    let recall = tokio::spawn(async move { m.recall(&key("ns", "x"), 0, u64::MAX, "delete").await.map(drop) });
    // The holder returns the lease at once, but one operation is still in flight.
    tokio::time::sleep(Duration::from_millis(10)).await;
    fx.leases.release(s, g.id).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!recall.is_finished(), "the recall must wait for the pinned operation");
    drop(pin);
    recall.await.unwrap().unwrap();
    assert!(t0.elapsed() < BREAK, "a returned lease does not wait for the deadline");
    // The unrelated lease (another object, still pinned) was neither recalled nor waited on.
    assert!(fx.leases.keys().pin(&ok, s, other.generation, op, 1, false).is_ok());
}

#[tokio::test(start_paused = true)]
async fn grants_wait_for_a_recall_and_a_stale_grant_is_never_installed() {
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let held = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::Read).await.unwrap();
    let m = fx.leases.clone();
    let recall = tokio::spawn(async move {
        let guard = m.recall(&key("ns", "x"), 0, u64::MAX, "truncate").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await; // the layout change takes a while
        drop(guard);
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let t = Instant::now();
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::Read).await;
    let done = recall.await.unwrap();
    match g {
        Ok(g) => {
            assert!(Instant::now() >= done, "granted while the range was breaking");
            assert!(g.generation > held.generation);
        }
        Err(e) => assert!(matches!(e, LeaseError::Breaking { .. }), "{e}"),
    }
    assert!(t.elapsed() >= Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_session_that_ends_loses_every_lease() {
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    fx.sessions.end(s, crate::session::EndReason::Evicted).unwrap();
    let (p, k) = first_key(&g);
    assert_eq!(fx.leases.keys().pin(&k, s, g.generation, p, 1, false).unwrap_err(), Refusal::Revoked);
    assert_eq!(fx.leases.acquire(s, key("ns", "x"), 0, 1, Mode::Read).await.unwrap_err(), LeaseError::SessionNotFound);
}

#[tokio::test(start_paused = true)]
async fn blocks_freed_under_a_live_key_are_held_until_the_lease_ends() {
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    // A buggy path that skips the recall: delete straight on the pool.
    fx.pool.delete("ns", "x").unwrap();
    assert_eq!(fx.pool.stats().held_blocks, 2, "blocks under a live key must not reach the allocator");
    fx.leases.release(s, g.id).unwrap();
    for _ in 0..100 {
        if fx.pool.stats().held_blocks == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("held blocks were not freed after the lease ended");
}
