//! Lease manager tests on paused (virtual) time, over a simulated pool.
use super::*;
use crate::dma::BindRequest;
use crate::pool::layout::FormatOptions;
use crate::pool::media::sim::SimMedia;
use rdax_proto::pb;
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
    let cfg = LeaseConfig {
        ttl: TTL,
        break_timeout: BREAK,
        drain_timeout: Duration::from_secs(20),
        limits: LeaseLimits {
            per_session: 3,
            total: 5,
            segments: 4096,
            keys_per_session: 4,
            per_principal: 100,
            alloc_per_request: 1 << 20,
        },
    };
    let leases = LeaseManager::new(pool.clone(), sessions.clone(), cfg, Gate::default());
    Fx { leases, sessions, pool }
}

fn session(fx: &Fx) -> (SessionId, tokio::sync::mpsc::Receiver<Result<pb::SessionEvent, tonic::Status>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (id, _, _) =
        fx.sessions.open(&crate::session::Owner::anonymous(), "t".into(), None, tx, CancellationToken::new()).unwrap();
    (id, rx)
}

fn key(ns: &str, n: &str) -> ObjectKey {
    ObjectKey::new(ns, n).unwrap()
}

fn first_key(g: &Grant) -> (u64, Key) {
    g.segments[0].target.unwrap()
}

/// A layout change that changes nothing (the sequence around it is what is tested).
async fn noop_change(fx: &Fx, object: &str, lo: u64, hi: u64) -> Result<(), LeaseError> {
    fx.leases.change_layout(key("ns", object), lo, hi, "test", |_| Ok(())).await
}

/// Keeps tests that configure failpoints from running beside this one (see
/// `failpoint::TEST_LOCK`).
async fn shared() -> impl Drop {
    #[cfg(feature = "testing")]
    let g = crate::failpoint::TEST_LOCK.read().await;
    #[cfg(not(feature = "testing"))]
    let g = Box::new(());
    g
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_renewed_expires_and_a_renewed_one_does_not() {
    let _fp = shared().await;
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
    // Revoked with no operation in flight: drained and forgotten by now.
    assert_eq!(fx.leases.renew(s, lapsed.id).unwrap_err(), LeaseError::NotFound(lapsed.id));
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_unreturned_lease_is_revoked_exactly_at_the_break_deadline() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, mut rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let t0 = Instant::now();
    noop_change(&fx, "x", 4096, u64::MAX).await.unwrap();
    assert_eq!(t0.elapsed(), BREAK, "virtual time: the recall waits exactly the break timeout");
    let kinds: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.unwrap().kind).collect();
    assert!(matches!(kinds[0], Some(pb::session_event::Kind::LeaseRecall(_))), "{kinds:?}");
    assert!(matches!(kinds[1], Some(pb::session_event::Kind::LeaseRevoked(_))), "{kinds:?}");
    let (p, k) = first_key(&g);
    assert_eq!(fx.leases.keys().pin(&k, s, g.generation, p, 1, false).unwrap_err(), Refusal::Revoked);
}

#[tokio::test(start_paused = true)]
async fn recall_waits_for_in_flight_operations_and_ignores_unrelated_leases() {
    let _fp = shared().await;
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
    let change = tokio::spawn(async move { m.change_layout(key("ns", "x"), 0, u64::MAX, "delete", |_| Ok(())).await });
    // The holder returns the lease at once, but one operation is still in flight.
    tokio::time::sleep(Duration::from_millis(10)).await;
    fx.leases.release(s, g.id).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!change.is_finished(), "the change must wait for the pinned operation");
    drop(pin);
    change.await.unwrap().unwrap();
    assert!(t0.elapsed() < BREAK, "a returned lease does not wait for the deadline");
    // The unrelated lease (another object, still pinned) was neither recalled nor waited on.
    assert!(fx.leases.keys().pin(&ok, s, other.generation, op, 1, false).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_grant_waits_for_the_layout_change_and_sees_the_new_layout() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let held = fx.leases.acquire(s, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let m = fx.leases.clone();
    // Punch the held range; the change itself takes a second.
    let change = tokio::spawn(async move {
        m.change_layout(key("ns", "x"), 0, 8192, "punch", |p| {
            std::thread::sleep(Duration::from_millis(200));
            p.punch_hole("ns", "x", 0, 8192)
        })
        .await
        .unwrap();
        Instant::now()
    });
    until("the recall", || fx.leases.list(None).iter().any(|l| l.state == State::Breaking)).await;
    fx.leases.release(s, held.id).unwrap();
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 8192, Mode::Read).await.unwrap();
    let done = change.await.unwrap();
    assert!(Instant::now() >= done, "granted only after the change finished");
    assert!(g.generation > held.generation);
    assert!(g.segments.iter().all(|s| s.target.is_none()), "the grant sees the punched layout: {:?}", g.segments);
    assert!(fx.leases.audit().is_empty(), "{:?}", fx.leases.audit());
}

#[tokio::test(start_paused = true)]
async fn a_grant_behind_an_unreturned_lease_comes_only_after_its_revocation() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let deaf = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::Read).await.unwrap();
    let m = fx.leases.clone();
    let t0 = Instant::now();
    let change =
        tokio::spawn(async move { m.change_layout(key("ns", "x"), 0, u64::MAX, "truncate", |_| Ok(())).await });
    until("the recall", || fx.leases.list(None).iter().any(|l| l.state == State::Breaking)).await;
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::Read).await.unwrap();
    assert_eq!(t0.elapsed(), BREAK, "the grant waited for the revocation at the break deadline");
    let st = fx.leases.list(None);
    assert!(st.iter().all(|l| l.id != deaf.id || l.state == State::Drained || l.state == State::Revoked), "{st:?}");
    assert!(g.generation > deaf.generation);
    change.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn lease_caps_are_enforced_and_counted_down_when_leases_end() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, _ra) = session(&fx);
    let (b, _rb) = session(&fx);
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(fx.leases.acquire(a, key("ns", "x"), i * 4096, 4096, Mode::Read).await.unwrap());
    }
    let e = fx.leases.acquire(a, key("ns", "x"), 0, 1, Mode::Read).await.unwrap_err();
    assert!(matches!(e, LeaseError::Limit { key: "limits.max_leases_per_session", cap: 3, .. }), "{e}");
    assert!(e.to_string().contains("limits.max_leases_per_session"), "{e}");
    // Another session may still lease, up to the daemon's total.
    fx.leases.acquire(b, key("ns", "y"), 0, 1, Mode::Read).await.unwrap();
    fx.leases.acquire(b, key("ns", "y"), 0, 1, Mode::Read).await.unwrap();
    let e = fx.leases.acquire(b, key("ns", "y"), 0, 1, Mode::Read).await.unwrap_err();
    assert!(matches!(e, LeaseError::Limit { key: "limits.max_leases", cap: 5, .. }), "{e}");
    // A released lease frees its place once it drained.
    fx.leases.release(a, held[0].id).unwrap();
    until("the released lease to drain", || fx.leases.list(None).len() == 4).await;
    fx.leases.acquire(a, key("ns", "x"), 0, 1, Mode::Read).await.unwrap();
    let e = fx.leases.acquire(b, key("ns", "y"), 0, 1, Mode::Read).await.unwrap_err();
    assert!(matches!(e, LeaseError::Limit { key: "limits.max_leases", .. }), "the total is full again: {e}");
}

#[tokio::test(start_paused = true)]
async fn a_sessions_keys_are_capped_across_its_leases() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, _ra) = session(&fx);
    let (b, _rb) = session(&fx);
    // Interleave allocations so that x's first two blocks are not adjacent in the pool: a
    // lease over both then has two segments, and two keys.
    for (name, off) in [("x", 0), ("y", 0), ("x", 4096)] {
        let g = fx.leases.acquire(b, key("ns", name), off, 4096, Mode::ReadWrite).await.unwrap();
        fx.leases.release(b, g.id).unwrap();
    }
    until("the allocating leases to drain", || fx.leases.list(None).is_empty()).await;
    let two = fx.leases.acquire(a, key("ns", "x"), 0, 8192, Mode::Read).await.unwrap();
    assert_eq!(two.segments.iter().filter(|s| s.target.is_some()).count(), 2);
    fx.leases.acquire(a, key("ns", "x"), 0, 8192, Mode::Read).await.unwrap();
    // Four keys held, the cap: a third lease with a key is refused, naming the key.
    let e = fx.leases.acquire(a, key("ns", "y"), 0, 4096, Mode::Read).await.unwrap_err();
    assert!(matches!(e, LeaseError::Limit { key: "limits.max_keys_per_session", cap: 4, .. }), "{e}");
    // A lease over a hole has no key, so it still fits.
    fx.leases.acquire(a, key("ns", "y"), 8192, 4096, Mode::Read).await.unwrap();
    // Ending a lease gives its keys back at once.
    fx.leases.release(a, two.id).unwrap();
    fx.leases.acquire(a, key("ns", "y"), 0, 4096, Mode::Read).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_grant_may_allocate_up_to_its_cap() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, _ra) = session(&fx);
    fx.pool.create_object("ns", "big", 2 << 20).unwrap();
    let free0 = fx.pool.stats().free.free_blocks;
    let e = fx.leases.acquire(a, key("ns", "big"), 0, (1 << 20) + 4096, Mode::ReadWrite).await.unwrap_err();
    assert!(e.to_string().contains("limits.max_alloc_bytes_per_request"), "{e}");
    assert!(matches!(e, LeaseError::Pool(ObjError::AllocCap { needed: 1052672, cap: 1048576 })), "{e:?}");
    assert_eq!(fx.pool.stats().free.free_blocks, free0, "a refused grant allocates nothing");
    // Up to the cap, granted; and what is allocated already does not count again.
    fx.leases.acquire(a, key("ns", "big"), 0, 1 << 20, Mode::ReadWrite).await.unwrap();
    fx.leases.acquire(a, key("ns", "big"), 0, (1 << 20) + 4096, Mode::ReadWrite).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_session_that_ends_loses_every_lease() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    fx.sessions.end(s, crate::session::EndReason::Evicted).unwrap();
    let (p, k) = first_key(&g);
    assert_eq!(fx.leases.keys().pin(&k, s, g.generation, p, 1, false).unwrap_err(), Refusal::Revoked);
    assert_eq!(fx.leases.acquire(s, key("ns", "x"), 0, 1, Mode::Read).await.unwrap_err(), LeaseError::SessionNotFound);
}

#[tokio::test(start_paused = true)]
async fn blocks_freed_under_an_undrained_lease_are_held_until_it_drains() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let g = fx.leases.acquire(s, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let (p, k) = first_key(&g);
    let in_flight = fx.leases.keys().pin(&k, s, g.generation, p, 8192, true).unwrap();
    // Released (keys dead) while an operation is still mid-copy ...
    fx.leases.release(s, g.id).unwrap();
    // ... and a buggy path that skips the recall deletes the object.
    fx.pool.delete("ns", "x").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fx.pool.stats().held_blocks, 2, "blocks under an undrained lease must not reach the allocator");
    drop(in_flight);
    until("the held blocks to be freed", || fx.pool.stats().held_blocks == 0).await;
    assert_eq!(fx.pool.stats().quarantined_blocks, 0);
}

/// A transport whose keys work without the daemon (like RDMA): it pins each lease it binds,
/// and drops the pin when told the lease ended — unless told to fail its teardown, when it
/// quarantines the lease and keeps the pin.
struct Nic {
    leases: std::sync::Weak<LeaseManager>,
    pins: Mutex<HashMap<u64, PinGuard>>,
    fail_teardown: std::sync::atomic::AtomicBool,
    bind_gate: tokio::sync::Semaphore,
}

impl Transport for Nic {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }
    fn check(&self, _: SessionId) -> Result<(), DmaError> {
        Ok(())
    }
    fn bind(self: Arc<Self>, req: BindRequest) -> crate::dma::BoxFuture<Result<Vec<Option<RemoteKey>>, DmaError>> {
        Box::pin(async move {
            let m = self.leases.upgrade().unwrap();
            let pin = m.pin_lease(req.session, req.lease).map_err(|_| DmaError::Ended)?;
            self.pins.lock().unwrap().insert(req.lease, pin);
            // Binding takes as long as the test wants.
            let _permit = self.bind_gate.acquire().await.unwrap();
            Ok(req.segments.iter().map(|s| s.2.map(|p| RemoteKey { addr: p, rkey: 7 })).collect())
        })
    }
    fn lease_ended(&self, lease: u64) {
        if self.fail_teardown.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(pin) = self.pins.lock().unwrap().remove(&lease) {
                std::mem::forget(pin);
                self.leases.upgrade().unwrap().quarantine(lease, "test: teardown failed");
            }
        } else {
            self.pins.lock().unwrap().remove(&lease);
        }
    }
}

fn nic(fx: &Fx, binds: usize) -> Arc<Nic> {
    Arc::new(Nic {
        leases: Arc::downgrade(&fx.leases),
        pins: Mutex::default(),
        fail_teardown: false.into(),
        bind_gate: tokio::sync::Semaphore::new(binds),
    })
}

fn grant_req(s: SessionId, object: &str, len: u64, t: Arc<Nic>) -> GrantRequest {
    GrantRequest {
        session: s,
        object: key("ns", object),
        offset: 0,
        len,
        mode: Mode::ReadWrite,
        exclusive: false,
        allocate: true,
        transport: t,
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_dropped_mid_bind_leaves_no_lease_and_no_pin() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let t = nic(&fx, 0); // every bind waits
    let fut = fx.leases.grant(grant_req(s, "x", 8192, t.clone()));
    let r = tokio::time::timeout(Duration::from_millis(50), fut).await;
    assert!(r.is_err(), "the bind is still waiting when the requester gives up");
    assert_eq!(fx.leases.list(None).len(), 1, "the owned task still holds the grant");
    t.bind_gate.add_permits(1);
    until("the abandoned grant to be given back", || fx.leases.list(None).is_empty()).await;
    assert!(t.pins.lock().unwrap().is_empty(), "the transport was told and dropped its pin");
    // The range is free for a layout change at once: nothing to drain.
    let t0 = Instant::now();
    noop_change(&fx, "x", 0, u64::MAX).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    // A delivered grant carries the transport's keys and stays.
    let h = fx.leases.grant(grant_req(s, "x", 8192, t.clone())).await.unwrap();
    let g = h.into_grant();
    assert_eq!(g.transport, TransportKind::Rdma);
    assert!(g.segments.iter().all(|s| s.remote.is_some()));
    assert_eq!(fx.leases.list(None).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_teardown_quarantines_the_blocks_for_good() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    let t = nic(&fx, 1000);
    t.fail_teardown.store(true, std::sync::atomic::Ordering::Relaxed);
    let g = fx.leases.grant(grant_req(s, "x", 1 << 20, t.clone())).await.unwrap().into_grant();
    let blocks: u64 = g.segments.iter().map(|s| s.len / 4096).sum();
    assert_eq!(blocks, 256);
    // The holder returns the lease, but the transport cannot prove its keys dead.
    fx.leases.release(s, g.id).unwrap();
    assert_eq!(fx.leases.list(None)[0].state, State::Quarantined);
    // A delete still goes ahead (it does not wait for a pin that will never drop) ...
    fx.leases.change_layout(key("ns", "x"), 0, u64::MAX, "delete", |p| p.delete("ns", "x")).await.unwrap();
    // ... and the blocks are quarantined, never reused.
    let st = fx.pool.stats();
    assert_eq!((st.quarantined_blocks, st.held_blocks), (blocks, 0));
    let free = st.free.free_blocks;
    fx.pool.create_object("ns", "z", free * 4096).unwrap();
    fx.pool.allocate("ns", "z", 0, free * 4096).unwrap();
    let quarantined: Vec<(u64, u64)> = g.segments.iter().map(|s| (s.target.unwrap().0 / 4096, s.len / 4096)).collect();
    for (pb, n, _, _) in fx.pool.owners() {
        for &(q, m) in &quarantined {
            assert!(pb + n <= q || q + m <= pb, "a quarantined block was given to another object");
        }
    }
    assert!(matches!(
        fx.pool.create_object("ns", "w", 4096).and_then(|_| fx.pool.allocate("ns", "w", 0, 4096)),
        Err(ObjError::NoSpace { .. })
    ));
    assert!(fx.pool.check().clean, "{:?}", fx.pool.check().problems);
}

/// Every await point of a layout change: drop the requester there; the sequence must finish
/// (the change happens), no grant may be installed over the range before it has, and no key
/// may cover a freed block.
#[cfg(feature = "testing")]
mod cancelled {
    use super::*;
    use crate::failpoint;

    const STEPS: [&str; 5] =
        ["recall.sent", "recall.revoked", "recall.drained", "layout.before_change", "layout.changed"];

    async fn paused_at(step: &str) {
        until(step, || failpoint::list().iter().any(|p| p.name == step && p.paused > 0)).await;
    }

    /// Found by the NBD bench (a client reconnecting as its export's session closed): the
    /// lease was marked exclusive in a second step, after the grant, and a session that ended
    /// in between left nothing to mark — the daemon aborted on "just granted".
    #[tokio::test]
    async fn an_exclusive_lease_whose_session_ends_as_it_is_installed_ends_with_it() {
        let _g = failpoint::TEST_LOCK.write().await;
        failpoint::reset();
        let fx = fixture();
        let (b, _brx) = session(&fx);
        failpoint::set("exclusive.installed", "pause").unwrap();
        let m = fx.leases.clone();
        let grant = tokio::spawn(async move { m.grant(exclusive_req(b, 0, 4096)).await });
        paused_at("exclusive.installed").await;
        assert!(fx.leases.exclusive_over(&key("ns", "x"), 0, 4096).is_some(), "exclusive from the moment it exists");
        fx.sessions.end(b, crate::session::EndReason::Evicted).unwrap();
        until("the lease to end", || fx.leases.list(Some(b)).iter().all(|l| !l.state.live())).await;
        failpoint::set("exclusive.installed", "off").unwrap();
        let r = grant.await.expect("the grant's task finishes");
        assert!(r.is_ok(), "granted, then ended with its session: {:?}", r.err());
        assert_eq!(fx.leases.exclusive_over(&key("ns", "x"), 0, 4096), None, "an ended lease keeps nobody off");
        let (c, _crx) = session(&fx);
        fx.leases.acquire(c, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
        failpoint::reset();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_layout_change_still_holds_off_grants_until_done() {
        let _g = failpoint::TEST_LOCK.write().await;
        for step in STEPS {
            for change in ["shrink", "punch", "delete"] {
                failpoint::reset();
                let fx = fixture();
                let (s, _rx) = session(&fx);
                let (deaf, _rx2) = session(&fx);
                let held = fx.leases.acquire(deaf, key("ns", "x"), 0, 1 << 20, Mode::ReadWrite).await.unwrap();
                let old: Vec<u64> = held.segments.iter().map(|s| s.target.unwrap().0).collect();
                failpoint::set(step, "pause").unwrap();
                let m = fx.leases.clone();
                // The requester gives up while the sequence is paused at `step`.
                let waiter = tokio::spawn(async move {
                    m.change_layout(key("ns", "x"), 4096, u64::MAX, "test", move |p| match change {
                        "shrink" => p.resize("ns", "x", 4096).map(drop),
                        "punch" => p.punch_hole("ns", "x", 4096, (1 << 20) - 4096),
                        _ => p.delete("ns", "x"),
                    })
                    .await
                });
                paused_at(step).await;
                waiter.abort();
                let _ = waiter.await;
                // The holder returns the lease now (if it was not revoked yet), so that what
                // follows the step does not wait for the break deadline.
                let _ = fx.leases.release(deaf, held.id);
                // A grant over the range must wait for the change, whatever the requester did.
                let m = fx.leases.clone();
                let grant =
                    tokio::spawn(async move { m.acquire(s, key("ns", "x"), 0, 1 << 20, Mode::ReadWrite).await });
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(!grant.is_finished(), "{change} dropped at {step}: a grant was made over a breaking range");
                assert!(fx.leases.audit().is_empty(), "{change} at {step}: {:?}", fx.leases.audit());
                failpoint::set(step, "off").unwrap();
                let r = grant.await.unwrap();
                // The change happened: the old range is gone (or the object is).
                match change {
                    "delete" => assert!(matches!(r, Err(LeaseError::Pool(ObjError::NotFound { .. }))), "{r:?}"),
                    _ => assert!(
                        matches!(r, Err(LeaseError::Pool(ObjError::OutOfRange { .. }))) || change == "punch",
                        "{change}: {r:?}"
                    ),
                }
                if let Ok(g) = r {
                    // After a punch the grant re-allocates: never over the deaf holder's old blocks
                    // while they could still be written, which the audit checks.
                    assert!(g.segments.iter().all(|s| s.target.is_some()));
                }
                assert!(fx.leases.audit().is_empty(), "{change} at {step}: {:?}", fx.leases.audit());
                let (p0, k0) = (old[0], held.segments[0].target.unwrap().1);
                assert_eq!(
                    fx.leases.keys().pin(&k0, deaf, held.generation, p0, 1, true).unwrap_err(),
                    Refusal::Revoked
                );
            }
        }
        failpoint::reset();
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_dropped_at_each_step_leaves_nothing_behind() {
        let _g = failpoint::TEST_LOCK.write().await;
        for step in ["grant.allocated", "grant.installed", "grant.bound"] {
            failpoint::reset();
            let fx = fixture();
            let (s, _rx) = session(&fx);
            let t = nic(&fx, 1000);
            failpoint::set(step, "pause").unwrap();
            let m = fx.leases.clone();
            let req = grant_req(s, "x", 8192, t.clone());
            let waiter = tokio::spawn(async move { m.grant(req).await.map(|h| h.into_grant()) });
            paused_at(step).await;
            waiter.abort();
            let _ = waiter.await;
            failpoint::set(step, "off").unwrap();
            until("the abandoned grant to be given back", || fx.leases.list(None).is_empty()).await;
            assert!(t.pins.lock().unwrap().is_empty(), "{step}: the transport kept a pin");
            assert!(fx.leases.audit().is_empty(), "{step}: {:?}", fx.leases.audit());
            // Nothing is left to drain: a delete goes through at once.
            let t0 = Instant::now();
            noop_change(&fx, "x", 0, u64::MAX).await.unwrap();
            assert_eq!(t0.elapsed(), Duration::ZERO, "{step}");
        }
        failpoint::reset();
    }
}

/// A transport with nothing to bind, like the TCP data plane.
use crate::dma::NoBind as Plain;

fn exclusive_req(s: SessionId, offset: u64, len: u64) -> GrantRequest {
    GrantRequest {
        session: s,
        object: key("ns", "x"),
        offset,
        len,
        mode: Mode::ReadWrite,
        exclusive: true,
        allocate: true,
        transport: Arc::new(Plain),
    }
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_lease_recalls_the_others_and_keeps_new_ones_off_until_it_ends() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, mut arx) = session(&fx);
    let (b, _brx) = session(&fx);
    let (c, _crx) = session(&fx);
    let shared_a = fx.leases.acquire(a, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let unrelated = fx.leases.acquire(a, key("ns", "y"), 0, 8192, Mode::ReadWrite).await.unwrap();
    // B asks for [4096, 12288) exclusively: A's overlapping lease is recalled; A returns it.
    let m = fx.leases.clone();
    let t0 = Instant::now();
    let want = tokio::spawn(async move { m.grant(exclusive_req(b, 4096, 8192)).await.map(|h| h.into_grant()) });
    let ev = arx.recv().await.unwrap().unwrap();
    assert!(matches!(&ev.kind, Some(pb::session_event::Kind::LeaseRecall(r)) if r.lease_id == shared_a.id), "{ev:?}");
    fx.leases.release(a, shared_a.id).unwrap();
    let ex = want.await.unwrap().unwrap();
    assert!(t0.elapsed() < BREAK, "a returned lease does not wait for the deadline");
    // The other object's lease was not touched.
    assert!(fx.leases.renew(a, unrelated.id).is_ok());
    // Nobody else gets a lease over any part of it, shared or exclusive; outside it, yes.
    for (s, lo, len) in [(a, 0, 8192), (c, 12_000, 4096), (b, 4096, 4096)] {
        let e = fx.leases.acquire(s, key("ns", "x"), lo, len, Mode::Read).await.unwrap_err();
        assert_eq!(e, LeaseError::Exclusive(ex.id), "[{lo}, +{len})");
    }
    assert_eq!(fx.leases.grant(exclusive_req(c, 0, 4097)).await.unwrap_err(), LeaseError::Exclusive(ex.id));
    let beside = fx.leases.acquire(c, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    assert!(fx.leases.list(Some(b)).iter().all(|l| l.exclusive), "listed as exclusive");
    assert!(!fx.leases.list(Some(c)).iter().any(|l| l.exclusive));
    // Once it ends, the range is anyone's again.
    fx.leases.release(b, ex.id).unwrap();
    fx.leases.acquire(a, key("ns", "x"), 4096, 8192, Mode::ReadWrite).await.unwrap();
    fx.leases.release(c, beside.id).unwrap();
}

#[tokio::test(start_paused = true)]
async fn two_exclusive_grants_of_one_range_at_once_give_one_lease_and_a_prompt_refusal() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, mut arx) = session(&fx);
    let (b, _brx) = session(&fx);
    let (c, _crx) = session(&fx);
    let held = fx.leases.acquire(a, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let t0 = Instant::now();
    let (mb, mc) = (fx.leases.clone(), fx.leases.clone());
    let gb = tokio::spawn(async move { mb.grant(exclusive_req(b, 0, 8192)).await.map(|h| h.into_grant()) });
    let gc = tokio::spawn(async move { mc.grant(exclusive_req(c, 4096, 8192)).await.map(|h| h.into_grant()) });
    // The holder is asked to return its lease, and does.
    let ev = arx.recv().await.unwrap().unwrap();
    assert!(matches!(&ev.kind, Some(pb::session_event::Kind::LeaseRecall(r)) if r.lease_id == held.id), "{ev:?}");
    fx.leases.release(a, held.id).unwrap();
    let (rb, rc) = (gb.await.unwrap(), gc.await.unwrap());
    // Neither waited for the other's marker until the deadline: one got the lease, and the
    // other was refused for it.
    assert!(t0.elapsed() < BREAK, "virtual time: {:?}", t0.elapsed());
    match (rb, rc) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => assert_eq!(lost, LeaseError::Exclusive(won.id)),
        (rb, rc) => panic!("want one grant and one refusal: {:?} and {:?}", rb.map(|g| g.id), rc.map(|g| g.id)),
    }
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_grant_revokes_an_unreturned_lease_at_the_deadline_and_a_layout_change_still_recalls_it() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, _arx) = session(&fx);
    let (b, mut brx) = session(&fx);
    let kept = fx.leases.acquire(a, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    let t0 = Instant::now();
    let ex = fx.leases.grant(exclusive_req(b, 0, 1 << 20)).await.unwrap().into_grant();
    assert_eq!(t0.elapsed(), BREAK, "virtual time: the holder that did not return it is revoked at the deadline");
    let (p, k) = first_key(&kept);
    assert_eq!(fx.leases.keys().pin(&k, a, kept.generation, p, 1, true).unwrap_err(), Refusal::Revoked);
    // A resize or punch is not held off by an exclusive lease: it recalls it like any other.
    noop_change(&fx, "x", 0, 4096).await.unwrap();
    let kinds: Vec<_> = std::iter::from_fn(|| brx.try_recv().ok()).map(|e| e.unwrap().kind).collect();
    assert!(kinds.iter().any(|k| matches!(k, Some(pb::session_event::Kind::LeaseRecall(r)) if r.lease_id == ex.id)));
    let (p, k) = first_key(&ex);
    assert_eq!(fx.leases.keys().pin(&k, b, ex.generation, p, 1, true).unwrap_err(), Refusal::Revoked);
    // Revoked, it holds nothing: a new grant over the range is not refused for it.
    fx.leases.acquire(a, key("ns", "x"), 0, 4096, Mode::Read).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_grant_given_up_mid_recall_leaves_no_lease_and_no_marker() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, _arx) = session(&fx);
    let (b, _brx) = session(&fx);
    fx.leases.acquire(a, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    // The requester gives up while the recall waits for the holder.
    let r = tokio::time::timeout(BREAK / 2, fx.leases.grant(exclusive_req(b, 0, 4096))).await;
    assert!(r.is_err(), "still recalling");
    // The owned task finishes the recall, grants, finds nobody to hand it to and releases it.
    tokio::time::sleep(BREAK * 2).await;
    until("the abandoned exclusive lease to be gone", || {
        fx.leases.list(Some(b)).iter().all(|l| !l.state.live()) && fx.leases.lock().markers.is_empty()
    })
    .await;
    fx.leases.acquire(a, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn grants_are_refused_at_once_once_shutdown_recalled_everything() {
    let _fp = shared().await;
    let fx = fixture();
    let (a, _arx) = session(&fx);
    let (b, _brx) = session(&fx);
    // A returned lease whose DMA is still in flight (a pin held): a grant over it would wait
    // for the drain.
    let g = fx.leases.acquire(a, key("ns", "x"), 0, 8192, Mode::ReadWrite).await.unwrap();
    let (pool, k) = first_key(&g);
    let _pin = fx.leases.keys().pin(&k, a, g.generation, pool, 4096, true).unwrap();
    fx.leases.release(a, g.id).unwrap();
    fx.leases.recall_all().await;
    // Refused now, not after the pin or a deadline: shutdown waits for every grant in flight.
    let r = tokio::time::timeout(Duration::from_millis(1), fx.leases.grant(exclusive_req(b, 0, 4096))).await;
    assert_eq!(r.expect("refused at once").unwrap_err(), LeaseError::ShuttingDown);
}

#[tokio::test]
async fn a_closed_fence_refuses_grants_and_operations_and_fence_revoke_ends_every_lease() {
    let _fp = shared().await;
    let fx = fixture();
    let (s, _rx) = session(&fx);
    fx.leases.fence().enable();
    let e = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::Read).await.unwrap_err();
    assert_eq!(e, LeaseError::Fenced, "a member not yet registered grants nothing");
    fx.leases.fence().open_until(std::time::Instant::now() + Duration::from_secs(600));
    let a = fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::ReadWrite).await.unwrap();
    let b = fx.leases.acquire(s, key("ns", "y"), 0, 4096, Mode::ReadWrite).await.unwrap();
    let ((pa, ka), (pb_, kb)) = (first_key(&a), first_key(&b));
    assert!(fx.leases.keys().pin(&ka, s, a.generation, pa, 1, true).is_ok());
    // Closed (its deadline passed, as after a SIGSTOP): refused on the spot, before any revoke.
    fx.leases.fence().close();
    assert_eq!(fx.leases.keys().pin(&ka, s, a.generation, pa, 1, true).unwrap_err(), Refusal::Fenced);
    assert_eq!(fx.leases.pin_lease(s, b.id).unwrap_err(), Refusal::Fenced);
    assert_eq!(fx.leases.fence_revoke(), 2);
    // Open again (rejoined): new grants work, the revoked leases stay dead.
    fx.leases.fence().open_until(std::time::Instant::now() + Duration::from_secs(600));
    assert_eq!(fx.leases.keys().pin(&kb, s, b.generation, pb_, 1, true).unwrap_err(), Refusal::Revoked);
    assert!(fx.leases.acquire(s, key("ns", "x"), 0, 4096, Mode::Read).await.is_ok());
    assert_eq!(fx.leases.fence_revoke(), 1, "only the live lease");
}
