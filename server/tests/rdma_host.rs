//! The RDMA transport on a host without RDMA (every CI machine): the daemon says so once,
//! reports why in `Pool.Info`, and serves the TCP data plane; the SDK's `Auto` falls back to
//! TCP and a forced `Rdma` fails with a clear error. Built without the `rdma` feature, the
//! daemon reports RDMA as off.

mod common;

use common::*;
use rdax_client::{ErrorKind, LeaseMode, SessionOptions, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rdma_the_daemon_says_why_once_and_serves_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    d.allow("RDMA unavailable");
    let c = client(&d).await;
    let info = c.info().await.unwrap().rdma.expect("rdma status in Pool.Info");
    let log = d.log();
    if cfg!(feature = "rdma") {
        // No RDMA device on this host (or rdma-core missing): unavailable, with the reason.
        assert_eq!(info.state, "unavailable", "{info:?}");
        assert!(!info.detail.is_empty());
        assert_eq!(log.matches("RDMA unavailable").count(), 1, "said once:\n{log}");
        assert!(log.contains(&info.detail), "the log gives the same reason:\n{log}");
    } else {
        assert_eq!(info.state, "off", "{info:?}");
        assert!(info.detail.contains("without the `rdma` feature"), "{info:?}");
        assert_eq!(log.matches("RDMA off").count(), 1, "said once:\n{log}");
    }
    assert!(d.rdma.is_empty(), "no RDMA endpoint in the ports file");

    // Auto: leases over TCP, bytes round-trip.
    let obj = c.object("t", "auto").unwrap();
    obj.create(1 << 20).await.unwrap();
    let s = c.open_session("auto").await.unwrap();
    let l = s.acquire("t", "auto", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    assert!(!l.is_rdma());
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    l.write_persist(0, &data).await.unwrap();
    assert_eq!(l.read(0, 1 << 20).await.unwrap(), data);
    l.release().await.unwrap();

    // Forced RDMA: a clear error naming why, and no lease left behind.
    let opts = SessionOptions { client_name: "forced".into(), transport: Transport::Rdma, ..Default::default() };
    let s2 = c.open_session_with(opts).await.unwrap();
    let e = s2.acquire("t", "auto", 0, 4096, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains(if cfg!(feature = "rdma") { &info.detail } else { "rdma" }), "{e}");
    assert!(c.leases(None).await.unwrap().is_empty(), "no lease was granted");

    // The protocol itself refuses an RDMA lease with FAILED_PRECONDITION and the reason.
    let mut raw = rdax_proto::pb::leases_client::LeasesClient::new(d.channel().await);
    let st = raw
        .acquire(rdax_proto::pb::AcquireRequest {
            session_id: s2.id().to_string(),
            object: Some(rdax_proto::pb::ObjectRef { namespace: "t".into(), name: "auto".into() }),
            offset: 0,
            length: 4096,
            mode: rdax_proto::pb::LeaseMode::Read as i32,
            transport: rdax_proto::pb::Transport::Rdma as i32,
            exclusive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("serves no RDMA"), "{st:?}");
    assert!(c.leases(None).await.unwrap().is_empty(), "the refused grant was given back");
}
