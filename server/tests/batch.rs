//! Batched Acquire and Release (`Leases.AcquireBatch`, `Leases.ReleaseBatch`) against the real
//! daemon process, through the SDK and the raw RPC.

mod common;

use common::{Daemon, Raw, client};
use rdax_client::{ErrorKind, LeaseMode, LeaseRange};
use rdax_proto::dataplane::{Op, Status};
use rdax_proto::pb;

const MIB: u64 = 1 << 20;

fn range<'a>(name: &'a str, offset: u64, len: u64, mode: LeaseMode) -> LeaseRange<'a> {
    LeaseRange { namespace: "ns", name, offset, len, mode }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_range_of_a_batch_succeeds_or_fails_on_its_own_and_a_batch_release_ends_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    c.object("ns", "a").unwrap().create(MIB).await.unwrap();
    c.object("ns", "b").unwrap().create(MIB).await.unwrap();
    let s = c.open_session("batcher").await.unwrap();
    let got = s
        .acquire_batch(&[
            range("a", 0, 4096, LeaseMode::ReadWrite),
            range("missing", 0, 4096, LeaseMode::Read),
            range("b", 0, 2 * MIB, LeaseMode::Read),
            range("b", 8192, 4096, LeaseMode::ReadWrite),
            LeaseRange { namespace: "bad\0ns", name: "x", offset: 0, len: 1, mode: LeaseMode::Read },
            range("a", 0, 4096, LeaseMode::Read),
        ])
        .await
        .unwrap();
    assert_eq!(got.len(), 6);
    let kinds: Vec<Option<ErrorKind>> = got.iter().map(|r| r.as_ref().err().map(|e| e.kind())).collect();
    assert_eq!(
        kinds,
        vec![
            None,
            Some(ErrorKind::NotFound),
            Some(ErrorKind::OutOfRange),
            None,
            Some(ErrorKind::InvalidArgument),
            None
        ]
    );
    let mut got = got.into_iter();
    let (w, _, _, wb, _, r) =
        (got.next().unwrap(), got.next(), got.next(), got.next().unwrap(), got.next(), got.next().unwrap());
    let (w, wb, r) = (w.unwrap(), wb.unwrap(), r.unwrap());
    // The grants are ordinary leases: a write through one is read through another.
    w.write_persist(10, b"batched").await.unwrap();
    assert_eq!(r.read(10, 7).await.unwrap(), b"batched");
    wb.write_persist(8192, b"too").await.unwrap();
    assert_eq!(c.object("ns", "b").unwrap().read(8192, 3).await.unwrap(), b"too");
    assert_eq!(c.leases(Some(s.id())).await.unwrap().len(), 3);
    let key = w.segments()[0].target.unwrap();
    let generation = w.generation();
    // One call releases all three; a second release of the same ids is no error.
    let done = s.release_batch(vec![w, wb, r]).await.unwrap();
    assert!(done.iter().all(|r| r.is_ok()), "{done:?}");
    drained(&c, &s).await;
    let (mut raw, st) = Raw::connect(&d.data, s.secret().0).await;
    assert_eq!(st, Status::Ok);
    assert_ne!(raw.op(Op::Read, key.1, generation, key.0, &[], 8).await, Status::Ok, "a released key is dead");
    // Raw ReleaseBatch: unknown ids are reported per item, in order.
    let mut leases = pb::leases_client::LeasesClient::new(d.channel().await);
    let resp = leases
        .release_batch(pb::ReleaseBatchRequest { session_id: s.id().into(), lease_ids: vec![999_999, 999_998] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results.len(), 2);
    assert!(resp.results.iter().all(|r| r.code == tonic::Code::NotFound as i32), "{:?}", resp.results);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_batches_are_refused_whole_and_the_sdk_splits_long_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    c.object("ns", "a").unwrap().create(MIB).await.unwrap();
    let s = c.open_session("big").await.unwrap();
    let item = pb::AcquireRequest {
        session_id: s.id().into(),
        object: Some(pb::ObjectRef { namespace: "ns".into(), name: "a".into() }),
        offset: 0,
        length: 4096,
        mode: pb::LeaseMode::Read as i32,
        transport: pb::Transport::Tcp as i32,
        exclusive: false,
    };
    let mut leases = pb::leases_client::LeasesClient::new(d.channel().await);
    let e = leases.acquire_batch(pb::AcquireBatchRequest { requests: vec![item.clone(); 257] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = leases
        .release_batch(pb::ReleaseBatchRequest { session_id: s.id().into(), lease_ids: vec![1; 1025] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(c.leases(Some(s.id())).await.unwrap().is_empty(), "nothing granted");
    // 600 ranges through the SDK: three calls, 600 leases, released in one go.
    let ranges: Vec<LeaseRange> = (0..600).map(|i| range("a", (i % 256) * 4096, 4096, LeaseMode::Read)).collect();
    let got = s.acquire_batch(&ranges).await.unwrap();
    let leases_held: Vec<_> = got.into_iter().map(|r| r.unwrap()).collect();
    for (l, r) in leases_held.iter().zip(&ranges) {
        assert_eq!(l.range(), (r.offset, r.len));
    }
    assert_eq!(c.leases(Some(s.id())).await.unwrap().len(), 600);
    let done = s.release_batch(leases_held).await.unwrap();
    assert_eq!(done.len(), 600);
    assert!(done.iter().all(|r| r.is_ok()));
    drained(&c, &s).await;
}

/// Wait (bounded) until the session's released leases have drained and left the listing
/// (a release stops the keys at once; the drain runs in the background).
async fn drained(c: &rdax_client::Client, s: &rdax_client::Session) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = c.leases(Some(s.id())).await.unwrap();
        if left.is_empty() {
            return;
        }
        assert!(
            left.iter().all(|l| matches!(l.state.as_str(), "released" | "drained")),
            "a released lease is still active: {:?}",
            left.iter().map(|l| &l.state).collect::<Vec<_>>()
        );
        assert!(std::time::Instant::now() < deadline, "{} released leases did not drain within 10 s", left.len());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
