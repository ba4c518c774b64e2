//! Cancellation at every await point, against the real daemon (needs the `testing` feature).
//!
//! For each step of a layout change (resize, punch, delete) and of a grant, a failpoint pauses
//! the daemon there; the client then abandons its RPC (the future is dropped, so tonic sends
//! RST_STREAM and the daemon drops the handler). The test waits until the daemon has really
//! dropped the handler (no request is left in its gate but the test's own audit), then checks
//! what invariants 1–3 need: a grant over the range waits for the change, no key covers a
//! freed block (the daemon's audit), the change itself happens, and an abandoned grant leaves
//! no lease.
#![cfg(feature = "testing")]

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Testing, client};
use rdax_client::{ErrorKind, LeaseMode, SessionOptions};
use rdax_proto::pb;

const MIB: u64 = 1 << 20;
const STEPS: [&str; 5] = ["recall.sent", "recall.revoked", "recall.drained", "layout.before_change", "layout.changed"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_change_abandoned_at_any_step_still_holds_off_grants_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &["--lease-break-timeout-ms", "200"]);
    d.allow("not returned before the break deadline");
    let c = client(&d).await;
    let mut t = Testing::new(&d).await;
    // The grantee waits out the change however long this machine takes between pausing and
    // releasing it: each attempt waits one break timeout (200 ms) for the range, then the SDK
    // retries `Unavailable` with back-off; the default three retries (~1.2 s in all) is
    // shorter than the audit below takes on a loaded 2-core machine.
    let patient =
        rdax_client::Client::connect(&d.endpoint, rdax_client::ConnectOptions { retries: 8, ..d.connect_options() })
            .await
            .unwrap();
    let deaf = c
        .open_session_with(SessionOptions { client_name: "deaf".into(), ignore_recalls: true, ..Default::default() })
        .await
        .unwrap();
    for (n, (step, op)) in STEPS.iter().flat_map(|s| ["resize", "punch", "delete"].map(|o| (*s, o))).enumerate() {
        let ctx = format!("{op} abandoned at {step}");
        let name = format!("o{n}");
        let obj = c.object("ns", &name).unwrap();
        obj.create(MIB).await.unwrap();
        let held = deaf.acquire("ns", &name, 0, MIB, LeaseMode::ReadWrite).await.unwrap();
        held.write(0, &[0xD1; 4096]).await.unwrap();
        t.set(step, "pause").await;
        let o2 = obj.clone();
        let call = tokio::spawn(async move {
            match op {
                "resize" => o2.resize(4096).await.map(drop),
                "punch" => o2.punch_hole(4096, MIB - 4096).await,
                _ => o2.delete().await,
            }
        });
        t.paused_at(step).await;
        call.abort();
        let _ = call.await;
        t.handler_dropped().await;
        // The range is still marked: a grant over it waits.
        let waiting = t.point("grant.waiting").await.hits;
        let name2 = name.clone();
        let s2 = patient.open_session("grantee").await.unwrap();
        let grant = tokio::spawn(async move { s2.acquire("ns", &name2, 0, MIB, LeaseMode::ReadWrite).await.map(drop) });
        let t0 = Instant::now();
        while t.point("grant.waiting").await.hits == waiting {
            assert!(!grant.is_finished(), "{ctx}: a grant was made over a breaking range");
            assert!(t0.elapsed() < Duration::from_secs(20), "{ctx}: the grant never waited");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(!grant.is_finished(), "{ctx}: a grant was made over a breaking range");
        t.clean(&ctx).await;
        t.set(step, "off").await;
        // The change ran to the end although its requester is gone.
        t.until("the change to finish", |a| a.layout_changes == 0).await;
        let r = grant.await.unwrap();
        match op {
            "resize" => {
                assert_eq!(obj.stat().await.unwrap().size, 4096, "{ctx}");
                assert!(matches!(r, Err(ref e) if e.kind() == ErrorKind::OutOfRange), "{ctx}: {r:?}");
            }
            "punch" => {
                assert_eq!(obj.stat().await.unwrap().allocated_bytes, if r.is_ok() { MIB } else { 4096 }, "{ctx}");
                assert_eq!(obj.read(0, 4096).await.unwrap(), vec![0xD1; 4096], "{ctx}: the unpunched block");
            }
            _ => assert_eq!(obj.stat().await.unwrap_err().kind(), ErrorKind::NotFound, "{ctx}"),
        }
        t.clean(&ctx).await;
        // The deaf holder's key is dead (revoked at the break deadline, or by the release here).
        assert_eq!(held.write(0, &[1]).await.unwrap_err().kind(), ErrorKind::Revoked, "{ctx}");
        let _ = held.release().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_abandoned_at_any_step_leaves_no_lease() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    let mut t = Testing::new(&d).await;
    c.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let s = c.open_session("abandoner").await.unwrap();
    for step in ["grant.allocated", "grant.installed"] {
        t.set(step, "pause").await;
        // The raw RPC (the SDK's acquire finishes its RPC in a task of its own).
        let mut raw = pb::leases_client::LeasesClient::new(d.channel().await);
        let req = pb::AcquireRequest {
            session_id: s.id().to_string(),
            object: Some(pb::ObjectRef { namespace: "ns".into(), name: "x".into() }),
            offset: 0,
            length: MIB,
            mode: pb::LeaseMode::ReadWrite as i32,
            transport: pb::Transport::Tcp as i32,
            exclusive: false,
        };
        let call = tokio::spawn(async move { raw.acquire(req).await });
        t.paused_at(step).await;
        call.abort();
        let _ = call.await;
        t.handler_dropped().await;
        t.set(step, "off").await;
        // The owned grant task finishes, finds nobody to hand the grant to, and gives it back.
        let t0 = Instant::now();
        while !c.leases(None).await.unwrap().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(20), "{step}: the abandoned grant was not given back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t.clean(step).await;
        assert!(d.log().contains("grant not delivered"), "{step}: {}", d.log());
        // Nothing is left to drain: a truncate goes through without a recall.
        let t0 = Instant::now();
        c.object("ns", "x").unwrap().resize(MIB).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "{step}");
    }
    // An abandoned AcquireBatch (raw RPC): every grant it had started is given back.
    t.set("grant.installed", "pause").await;
    let mut raw = pb::leases_client::LeasesClient::new(d.channel().await);
    let item = |offset| pb::AcquireRequest {
        session_id: s.id().to_string(),
        object: Some(pb::ObjectRef { namespace: "ns".into(), name: "x".into() }),
        offset,
        length: 4096,
        mode: pb::LeaseMode::ReadWrite as i32,
        transport: pb::Transport::Tcp as i32,
        exclusive: false,
    };
    let req = pb::AcquireBatchRequest { requests: vec![item(0), item(4096), item(8192)] };
    let call = tokio::spawn(async move { raw.acquire_batch(req).await });
    t.paused_at("grant.installed").await;
    // Let the first item finish (setting the failpoint again releases it; the second pauses),
    // so the batch is abandoned holding one finished grant and one half-made.
    t.set("grant.installed", "pause").await;
    let t0 = Instant::now();
    loop {
        let p = t.point("grant.installed").await;
        if p.hits >= 2 && p.paused == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the second item did not reach the failpoint: {p:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The first item's lease (finished, not yet handed over) and the second's (installed,
    // its keys on the way).
    assert_eq!(c.leases(None).await.unwrap().len(), 2);
    call.abort();
    let _ = call.await;
    t.handler_dropped().await;
    t.set("grant.installed", "off").await;
    let t0 = Instant::now();
    while !c.leases(None).await.unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "an abandoned batch left a lease");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.clean("grant.installed").await;
    // The SDK's own acquire, abandoned by its caller, also leaves nothing.
    t.set("grant.installed", "pause").await;
    let s = std::sync::Arc::new(s);
    let s2 = s.clone();
    let call = tokio::spawn(async move { s2.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.map(drop) });
    t.paused_at("grant.installed").await;
    call.abort();
    let _ = call.await;
    t.set("grant.installed", "off").await;
    let t0 = Instant::now();
    while !c.leases(None).await.unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the SDK did not give back a grant its caller abandoned");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
