//! Seeded randomized torture of leases against layout changes (invariants 1–3), on the real
//! daemon with every data-plane WRITE held mid-copy for 15 ms (the failpoint
//! `dataplane.write.mid_copy`, so this needs the `testing` feature), longer than the 10 ms
//! break deadline, so revocations really happen under in-flight DMA.
//!
//! Each *race* runs a tagged data-plane write under a lease concurrently with a random layout
//! change of the same object (shrink, grow, punch, delete) or the holder's eviction, by
//! sessions of which half ignore recalls (so they are revoked at the deadline). After each
//! race:
//! * invariant 1 — the object's bytes equal the model: an acknowledged write happened before
//!   the layout change, a refused one left no byte, and no byte of any lease ever shows up
//!   in blocks that changed hands (every object is compared in full, periodically);
//! * invariant 3 — a lease whose range was changed has dead keys on the wire (`REVOKED`);
//! * invariant 2 is checked by `leases.rs` (grants during a recall); here grants that meet a
//!   recall must fail with `Unavailable` or come after it, and the daemon's own audit
//!   (`Testing.Audit`: every undrained key covers blocks its object still owns, no grant over
//!   a marked range) must find nothing after every race.
//!
//! Clients are impatient too: a third of the layout changes and a quarter of the acquires run
//! under a random client deadline (the RPC is dropped mid-way, as a gRPC deadline or a
//! disconnect does). A cancelled change still runs to the end on the daemon; the test then
//! repeats it without a deadline (every change here is idempotent) and waits until no layout
//! change is running, so the model stays exact. A cancelled acquire must leave no lease.
//! Every object, including those created over reused blocks, is compared with the model
//! byte for byte: a tagged byte where the model has none is a foreign byte.
//!
//! `RDAX_TORTURE_RACES` sets the count (default 1,000); `RDAX_TORTURE_SEED` the seed.

#![cfg(feature = "testing")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Daemon, Raw, client};
use rdax_client::{ErrorKind, LeaseMode, Session, SessionOptions};
use rdax_proto::dataplane::{Op, Status};
use rdax_proto::testing_pb::{AuditRequest, testing_client::TestingClient};
use rdaxd::pool::rng::SplitMix64;

const NAMES: [&str; 4] = ["o0", "o1", "o2", "o3"];
const MAX: u64 = 192 << 10;

struct Holder {
    session: Session,
    deaf: bool,
}

async fn holder(c: &rdax_client::Client, i: usize) -> Holder {
    let deaf = i % 2 == 1;
    let session = c
        .open_session_with(SessionOptions { client_name: format!("h{i}"), ignore_recalls: deaf, ..Default::default() })
        .await
        .unwrap();
    Holder { session, deaf }
}

fn sid(s: &Session) -> [u8; 16] {
    s.secret().0
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Shrink(u64),
    Grow(u64),
    Punch(u64, u64),
    Delete,
    Evict,
    Nothing,
}

async fn run(seed: u64, races: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_env(
        dir.path(),
        &["--lease-break-timeout-ms", "10", "--session-ttl-ms", "5000"],
        &[("RDAX_FAILPOINTS", "dataplane.write.mid_copy=sleep(15)")],
    );
    // Half the holders ignore recalls: revoking them is the point.
    d.allow("not returned before the break deadline");
    let c = client(&d).await;
    let mut rng = SplitMix64::new(seed);
    let mut model: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    let mut holders = Vec::new();
    for i in 0..4 {
        holders.push(holder(&c, i).await);
    }
    let mut testing = TestingClient::new(d.channel().await);
    // writes acknowledged, writes refused, keys checked dead, content checks, changes cancelled,
    // acquires cancelled, bytes compared
    let mut stats = [0u64; 7];
    for race in 0..races {
        let ctx = format!("seed {seed} race {race}");
        let name = NAMES[rng.below(NAMES.len() as u64) as usize];
        let obj = c.object("t", name).unwrap();
        if !model.contains_key(name) {
            let size = 4096 + rng.below(MAX);
            obj.create(size).await.unwrap();
            model.insert(name, vec![0; size as usize]);
        }
        if model[name].is_empty() {
            // Truncated to nothing by an earlier race: grow it back (sparse) to have a range.
            let size = 4096 + rng.below(MAX);
            obj.resize(size).await.unwrap();
            model.get_mut(name).unwrap().resize(size as usize, 0);
        }
        let size = model[name].len() as u64;
        let hi = rng.below(holders.len() as u64) as usize;
        let lo_off = rng.below(size);
        let len = 1 + rng.below((size - lo_off).min(64 << 10));
        let acquire = holders[hi].session.acquire("t", name, lo_off, len, LeaseMode::ReadWrite);
        let lease = if rng.below(4) == 0 {
            // An impatient client: the grant may be made and then dropped with the RPC.
            match tokio::time::timeout(Duration::from_micros(rng.below(3_000)), acquire).await {
                Ok(r) => r,
                Err(_) => {
                    stats[5] += 1;
                    continue;
                }
            }
        } else {
            acquire.await
        };
        let lease = match lease {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::Unavailable => continue,
            Err(e) => panic!("{ctx}: acquire: {e}"),
        };
        // The write: a tagged range inside the lease.
        let w_off = lo_off + rng.below(len);
        let w_len = 1 + rng.below(lo_off + len - w_off);
        let tag = (race % 251) as u8 + 1;
        let data = vec![tag; w_len as usize];
        let change = match rng.below(6) {
            0 => Change::Shrink(rng.below(size + 1)),
            1 => Change::Grow(size + rng.below(64 << 10)),
            2 => {
                let o = rng.below(size);
                Change::Punch(o, 1 + rng.below(size - o))
            }
            3 => Change::Delete,
            4 => Change::Evict,
            _ => Change::Nothing,
        };
        // Start the change somewhere inside the write's 15 ms hold (or just before it).
        let delay = Duration::from_micros(rng.below(16_000));
        let layout = !matches!(change, Change::Evict | Change::Nothing);
        let deadline = (layout && rng.below(3) == 0).then(|| Duration::from_micros(rng.below(20_000)));
        let apply = || async {
            match change {
                Change::Shrink(s) | Change::Grow(s) => obj.resize(s).await.map(drop),
                Change::Punch(o, l) => obj.punch_hole(o, l).await,
                Change::Delete => obj.delete().await,
                Change::Evict => c.evict_session(holders[hi].session.id(), "torture").await,
                Change::Nothing => Ok(()),
            }
        };
        let (wres, cres) = tokio::join!(lease.write(w_off, &data), async {
            tokio::time::sleep(delay).await;
            match deadline {
                Some(dl) => tokio::time::timeout(dl, apply()).await.ok(),
                None => Some(apply().await),
            }
        });
        match cres {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{ctx}: change {change:?}: {e}"),
            None => {
                // Cancelled: the daemon finishes it anyway. Repeat it (idempotent) and wait until
                // no layout change runs, so that the model below is exact.
                stats[4] += 1;
                match apply().await {
                    Ok(()) => {}
                    Err(e) if matches!(change, Change::Delete) && e.kind() == ErrorKind::NotFound => {}
                    Err(e) => panic!("{ctx}: repeated change {change:?}: {e}"),
                }
                let t0 = std::time::Instant::now();
                loop {
                    let a = testing.audit(AuditRequest {}).await.unwrap().into_inner();
                    if a.layout_changes == 0 {
                        break;
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(20),
                        "{ctx}: a layout change never finished ({})",
                        a.inside
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let detail = format!(
            "change {change:?}, write [{w_off}, +{w_len}) tag {tag} -> {:?}, lease [{lo_off}, +{len}) in {} segments, holder deaf={}",
            wres.as_ref().map_err(|e| e.kind()),
            lease.segments().len(),
            holders[hi].deaf
        );
        let ctx = format!("{ctx} ({detail})");
        // Model: an acknowledged write happened before the change (the change waited for it).
        // A refused write may have landed some of its per-segment operations (each one all or
        // nothing) before the refusal: those pieces are resolved against the daemon below.
        let mut torn: Vec<(u64, u64)> = Vec::new();
        match wres {
            Ok(()) => {
                stats[0] += 1;
                model.get_mut(name).unwrap()[w_off as usize..(w_off + w_len) as usize].copy_from_slice(&data);
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Revoked, "{ctx}: write failed with {e}");
                stats[1] += 1;
                for sg in lease.segments() {
                    let (a, b) = (sg.object_offset.max(w_off), (sg.object_offset + sg.len).min(w_off + w_len));
                    if a < b {
                        torn.push((a, b));
                    }
                }
            }
        }
        let overlapped = match change {
            Change::Shrink(s) => s < lo_off + len,
            Change::Punch(o, l) => o < lo_off + len && lo_off < o + l,
            Change::Delete | Change::Evict => true,
            Change::Grow(_) | Change::Nothing => false,
        };
        match change {
            Change::Shrink(s) | Change::Grow(s) => model.get_mut(name).unwrap().resize(s as usize, 0),
            Change::Punch(o, l) => {
                let m = model.get_mut(name).unwrap();
                let end = (o + l).min(m.len() as u64) as usize;
                m[o as usize..end].fill(0);
            }
            Change::Delete => {
                model.remove(name);
            }
            Change::Evict | Change::Nothing => {}
        }
        // Invariant 3: a changed lease's keys are dead on the wire.
        if overlapped && let Some((pool, key)) = lease.segments().iter().find_map(|s| s.target) {
            let (mut raw, st) = Raw::connect(&d.data, sid(&holders[hi].session)).await;
            if st == Status::Ok {
                let got = raw.op(Op::Read, key, lease.generation(), pool, &[], 1).await;
                assert_eq!(got, Status::Revoked, "{ctx}: a recalled lease's key still works after {change:?}");
            } else {
                assert_eq!(st, Status::BadSession, "{ctx}");
            }
            stats[2] += 1;
        }
        if matches!(change, Change::Evict) {
            holders[hi] = holder(&c, hi).await;
        } else if !holders[hi].deaf || !overlapped {
            let _ = lease.release().await;
        }
        // Resolve the pieces of a refused write: each is entirely new or entirely old, except
        // bytes the layout change removed or zeroed, which must read zero / be gone.
        if let (false, Some(m)) = (torn.is_empty(), model.get_mut(name)) {
            let got = c.object("t", name).unwrap().read(0, 0).await.unwrap();
            for (a, b) in torn {
                let zeroed = |i: u64| matches!(change, Change::Punch(o, l) if i >= o && i < o + l);
                let live: Vec<u64> = (a..b).filter(|&i| (i as usize) < m.len() && !zeroed(i)).collect();
                let all_new = live.iter().all(|&i| got[i as usize] == tag);
                let all_old = live.iter().all(|&i| got[i as usize] == m[i as usize]);
                assert!(all_new || all_old, "{ctx}: the piece [{a}, {b}) of a refused write is torn");
                if all_new {
                    live.iter().for_each(|&i| m[i as usize] = tag);
                }
            }
        }
        // Invariant 1: contents match the model (this object every race, all of them often).
        let check: Vec<&str> = if race % 25 == 24 {
            model.keys().copied().collect()
        } else {
            model.get_key_value(name).map(|(k, _)| *k).into_iter().collect()
        };
        let audit = testing.audit(AuditRequest {}).await.unwrap().into_inner();
        assert!(audit.problems.is_empty(), "{ctx}: the daemon's audit: {:?}", audit.problems);
        if race % 25 == 24 {
            // No lease outlives its race: returned, revoked, or (a cancelled acquire) given back.
            let t0 = std::time::Instant::now();
            loop {
                let live: Vec<_> = c
                    .leases(None)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|l| l.state == "active" || l.state == "breaking")
                    .collect();
                if live.is_empty() {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "{ctx}: leases left behind: {live:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for n in check {
            let got = c.object("t", n).unwrap().read(0, 0).await.unwrap();
            let want = &model[n];
            stats[6] += got.len() as u64;
            if got != *want {
                let at = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                let foreign = got.iter().zip(want.iter()).filter(|(a, b)| a != b).count();
                panic!(
                    "{ctx}: {n} differs from the model at byte {at} (len {} vs {}, {foreign} foreign bytes): found {:?}",
                    got.len(),
                    want.len(),
                    got.get(at)
                );
            }
            stats[3] += 1;
        }
    }
    println!(
        "torture: {races} races (seed {seed}): {} writes acknowledged, {} refused, {} recalled keys checked dead, \
         {} layout changes and {} acquires cancelled by client deadlines, {} content checks over {} bytes, 0 foreign bytes",
        stats[0], stats[1], stats[2], stats[4], stats[5], stats[3], stats[6]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_races() {
    let races = std::env::var("RDAX_TORTURE_RACES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let seed = std::env::var("RDAX_TORTURE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x70_27u64);
    run(seed, races).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "opt-in: 10,000 races (cargo test -p rdaxd --test torture -- --ignored)"]
async fn ten_thousand_races() {
    run(0x1_0000, 10_000).await;
}
