//! Seeded fault rounds on a cluster under a write workload: every round `kill -9`s a node and
//! starts it again, stops a node with SIGSTOP past its etcd lease's TTL and lets it run again,
//! and restarts etcd, each fault once every PG is healthy again (R = 2 survives one loss at a
//! time). After each fault every acknowledged write must read back byte-identical,
//! and once repair is done every replica of the map must hold it. The seed is printed;
//! `RDAX_TEST_SEED` repeats a run and `RDAX_CLUSTER_ROUNDS` (default 1) runs more rounds. A
//! second test kills two of five nodes (R = 3) at once and starts them again.
#![cfg(feature = "cluster")]

mod common;

use std::time::Duration;

use common::etcd::{
    Acked, Etcd, TTL, Workload, check_replicas, cluster, cluster_client, next, seed, wait_healthy, wait_placed,
    wait_repaired,
};
use common::{Daemon, poll};
use rdax_client::ClusterClient;

/// Every acknowledged write reads back through the client, byte-identical (no put is in
/// flight: the writers are paused or stopped).
async fn reads_back(c: &ClusterClient, acked: &Acked, after: &str) {
    for (name, (version, data)) in acked {
        let got = c.get("ns", name).await.unwrap_or_else(|e| panic!("after {after}: get {name} (v{version}): {e}"));
        assert!(
            got == *data,
            "after {after}: {name} ({} bytes) differs from acknowledged version {version}",
            got.len()
        );
    }
}

/// `Objects.Resize` of `ns/name` routed by `epoch` and `pg`, straight to `d`.
async fn resize_at(d: &Daemon, token: &str, name: &str, epoch: u64, pg: u32) -> Result<(), tonic::Status> {
    use rdax_proto::pb;
    let ch = tonic::transport::Endpoint::from_shared(d.endpoint.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = pb::objects_client::ObjectsClient::new(ch);
    let mut req = tonic::Request::new(pb::ResizeRequest {
        object: Some(pb::ObjectRef { namespace: "ns".into(), name: name.into() }),
        size: 1,
        grow_only: false,
    });
    req.set_timeout(Duration::from_secs(5));
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut().insert("rdax-map-epoch", epoch.to_string().parse().unwrap());
    req.metadata_mut().insert("rdax-pg", pg.to_string().parse().unwrap());
    c.resize(req).await.map(|_| ())
}

fn map_epoch(etcd: &Etcd) -> u64 {
    etcd.get("/rdax/pgmap", false).pop().and_then(|m| m["epoch"].as_u64()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_kills_partitions_and_etcd_restarts_lose_no_acknowledged_write() {
    let rounds: u32 = std::env::var("RDAX_CLUSTER_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let root = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(root.path());
    let (_dirs, mut nodes, token) = cluster(root.path(), &etcd, 3, 2);
    for d in &nodes {
        // Faults this test makes on purpose. A node stopped while it copies a PG holds read
        // leases on its source that it cannot return; a put's recall revokes them.
        d.allow("lost the etcd lease renewal")
            .allow("cannot register")
            .allow("repair watch ended")
            .allow("not returned before the break deadline");
    }
    let c = cluster_client(&etcd, &token).await;
    let mut rng = seed() | 1;
    let w = Workload::start(&c, rng, 3);
    w.wait_for_more(10).await;
    for round in 0..rounds {
        // 1. kill -9 a node, let the map drop it, then start it again (same pool).
        let victim = (next(&mut rng) % 3) as usize;
        eprintln!("round {round}: kill -9 n{victim}");
        nodes[victim].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
        let dead = format!("n{victim}");
        poll(Duration::from_secs(30), "a map without the killed node", || {
            etcd.get("/rdax/pgmap", false)
                .pop()
                .filter(|m| !m["nodes"].as_array().unwrap().contains(&dead.clone().into()))
        });
        w.wait_for_more(10).await;
        nodes[victim].start_again();
        poll(Duration::from_secs(30), "the node back in the map", || {
            etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 3)
        });
        w.wait_for_more(10).await;
        // R = 2 survives one fault at a time: the next comes once the copies are complete
        // again (see docs/cluster.md, "Limits": a second loss before then can lose writes).
        wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;

        // 2. SIGSTOP a node that is the primary of some PG past the TTL, then SIGCONT: it is
        // out of the map meanwhile, and when it runs again it accepts nothing routed by the map
        // it held (its fence is closed, or the epoch is stale).
        let stopped = (next(&mut rng) % 3) as usize;
        let id = format!("n{stopped}");
        c.refresh().await.unwrap();
        let before = c.view().map.clone().unwrap();
        let pg = (0..before.pgs).find(|&pg| before.replicas_of(pg).first() == Some(&id)).expect("a PG it leads");
        let name = (0..).map(|i| format!("probe-{i}")).find(|n| rdax_client::pg_of("ns", n, before.pgs) == pg).unwrap();
        eprintln!("round {round}: SIGSTOP n{stopped} (primary of PG {pg}, epoch {})", before.epoch);
        nodes[stopped].signal(libc::SIGSTOP);
        poll(Duration::from_secs(30), "a map without the stopped node", || {
            (map_epoch(&etcd) > before.epoch
                && !etcd.get("/rdax/pgmap", false)[0]["nodes"].as_array().unwrap().contains(&id.clone().into()))
            .then_some(())
        });
        w.wait_for_more(10).await;
        std::thread::sleep(TTL / 4);
        nodes[stopped].signal(libc::SIGCONT);
        let r = resize_at(&nodes[stopped], &token, &name, before.epoch, pg).await;
        let code = r.expect_err("a write routed by the map the node no longer belongs to was accepted").code();
        assert!(
            matches!(code, tonic::Code::Unavailable | tonic::Code::FailedPrecondition),
            "round {round}: refused with {code:?}"
        );
        poll(Duration::from_secs(30), "the stopped node back in the map", || {
            etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 3)
        });
        w.wait_for_more(10).await;
        wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;

        // 3. Restart etcd in the middle of the workload: nodes keep serving or fence and
        // rejoin; the client's watch reconnects.
        eprintln!("round {round}: etcd restart");
        etcd.kill();
        etcd.spawn();
        w.wait_for_more(10).await;
        let all: Vec<&Daemon> = nodes.iter().collect();
        poll(Duration::from_secs(30), "every node a member again", || {
            all.iter().all(|d| d.metric("rdax_cluster_member") == 1.0).then_some(())
        });
        let snapshot = w.pause().await;
        reads_back(&c, &snapshot, &format!("round {round}")).await;
        w.resume();
        wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
    }
    let acked = w.stop().await;
    reads_back(&c, &acked, "the last round").await;
    let all: Vec<&Daemon> = nodes.iter().collect();
    wait_repaired(&etcd, &all).await;
    check_replicas(&c, &nodes, &acked, 2).await;
    // The nodes that stood in for the killed and the stopped one delete their copies.
    wait_placed(&c, &nodes, acked.keys()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_nodes_with_three_replicas_lose_two_at_once_and_take_them_back() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, mut nodes, token) = cluster(root.path(), &etcd, 5, 3);
    for d in &nodes {
        d.allow("repair watch ended").allow("not returned before the break deadline");
    }
    let c = cluster_client(&etcd, &token).await;
    let mut rng = seed() | 1;
    let w = Workload::start(&c, rng, 3);
    w.wait_for_more(20).await;
    // Two nodes killed at once: every PG keeps at least one complete replica, and the three
    // left each hold a copy of every PG.
    let a = (next(&mut rng) % 5) as usize;
    let b = (a + 1 + (next(&mut rng) % 4) as usize) % 5;
    eprintln!("kill -9 n{a} and n{b}");
    nodes[a].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    nodes[b].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    poll(Duration::from_secs(30), "a map of the three left", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 3)
    });
    w.wait_for_more(20).await;
    let snapshot = w.pause().await;
    reads_back(&c, &snapshot, "two kills").await;
    let alive: Vec<&Daemon> = nodes.iter().enumerate().filter(|(i, _)| *i != a && *i != b).map(|(_, d)| d).collect();
    wait_repaired(&etcd, &alive).await;
    check_replicas(&c, &nodes, &snapshot, 3).await;
    w.resume();
    // Both come back with their old pools: they copy what changed, and the nodes that stood
    // in for them delete their copies.
    nodes[a].start_again();
    nodes[b].start_again();
    poll(Duration::from_secs(30), "all five in the map again", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 5)
    });
    w.wait_for_more(20).await;
    let acked = w.stop().await;
    reads_back(&c, &acked, "the return").await;
    let all: Vec<&Daemon> = nodes.iter().collect();
    wait_repaired(&etcd, &all).await;
    check_replicas(&c, &nodes, &acked, 3).await;
    wait_placed(&c, &nodes, acked.keys()).await;
}
