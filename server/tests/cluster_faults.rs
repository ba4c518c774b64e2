//! Seeded fault rounds on a cluster under a write workload: every round `kill -9`s a node and
//! starts it again, stops a node with SIGSTOP past its etcd lease's TTL and lets it run again,
//! and restarts etcd, each fault once every PG is healthy again (R = 2 survives one loss at a
//! time). After each fault every acknowledged write must read back byte-identical,
//! and once repair is done every replica of the map must hold it. The seed is printed;
//! `RDAX_TEST_SEED` repeats a run and `RDAX_CLUSTER_ROUNDS` (default 1) runs more rounds. A
//! second test kills two of five nodes (R = 3) at once and starts them again; a third loses
//! the only copy of PGs (R = 1), which then wait for it, and then gives up on it.
#![cfg(feature = "cluster")]

mod common;

use std::time::Duration;

use common::etcd::{
    Acked, Etcd, TTL, Workload, check_replicas, cluster, cluster_client, next, seed, status, tagged, wait_healthy,
    wait_placed, wait_repaired,
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
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
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
    // The copies made as the cluster formed are complete: two losses at once leave every PG
    // a complete copy.
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
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

/// `rdaxctl --cluster … cluster mark-lost NODE [--yes]`.
fn mark_lost(etcd: &Etcd, node: &str, yes: bool) -> std::process::Output {
    let spec = etcd.client.replacen("http://", "etcd://", 1);
    let mut cmd = common::rdaxctl();
    cmd.args(["--cluster", &spec, "--json", "cluster", "mark-lost", node]);
    if yes {
        cmd.arg("--yes");
    }
    cmd.output().unwrap()
}

/// With one replica, a killed node's PGs are down until it comes back: nothing reads or writes
/// them on the node that stands in, and when the node returns with its pool every object is
/// there. Killed again and marked lost, its PGs come up (empty) on the other node.
#[tokio::test(flavor = "multi_thread")]
async fn pgs_whose_only_copy_is_lost_wait_for_it_and_keep_their_objects() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, mut nodes, token) = cluster(root.path(), &etcd, 2, 1);
    for d in &nodes {
        d.allow("no complete copy of these PGs is left");
    }
    let c = cluster_client(&etcd, &token).await;
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
    let mut acked = Acked::new();
    for i in 0..24 {
        let name = format!("o{i}");
        let data = tagged(&name, 1, 3000 + i * 512);
        c.put("ns", &name, &data).await.unwrap();
        acked.insert(name, (1, data));
    }
    let on_n1: Vec<String> = acked.keys().filter(|n| c.placement("ns", n).unwrap().1 == ["n1"]).cloned().collect();
    assert!(on_n1.len() >= 2, "n1 holds {on_n1:?}");

    let kill_n1 = |nodes: &mut Vec<Daemon>| {
        nodes[1].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
        poll(Duration::from_secs(30), "a map without n1 whose PGs wait for it", || {
            etcd.get("/rdax/pgmap", false).pop().filter(|m| {
                m["nodes"] == serde_json::json!(["n0"]) && m["down"].as_object().is_some_and(|d| !d.is_empty())
            })
        })
    };
    let map = kill_n1(&mut nodes);
    let s = status(&etcd);
    assert!(s["pg_states"]["down"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["down"][0]["waiting_for"], serde_json::json!(["n1"]), "{s}");
    // Refused by the client, and by n0 for a client that routes by the map anyway.
    let mut opts = rdax_client::ClusterOptions { etcd: vec![etcd.client.clone()], ..Default::default() };
    opts.connect.token = Some(token.clone());
    opts.deadline = Duration::from_secs(2);
    let impatient = rdax_client::ClusterClient::connect(opts).await.unwrap();
    let e = impatient.get("ns", &on_n1[0]).await.unwrap_err();
    assert!(e.kind() == rdax_client::ErrorKind::Unavailable && e.to_string().contains("is down"), "{e}");
    let e = impatient.put("ns", &on_n1[0], b"lost?").await.unwrap_err();
    assert!(e.kind() == rdax_client::ErrorKind::Unavailable && e.to_string().contains("is down"), "{e}");
    let pgs = map["pgs"].as_u64().unwrap() as u32;
    let pg = rdax_client::pg_of("ns", &on_n1[0], pgs);
    let r = resize_at(&nodes[0], &token, &on_n1[0], map["epoch"].as_u64().unwrap(), pg).await;
    let e = r.expect_err("a down PG's object was resized");
    assert!(e.code() == tonic::Code::Unavailable && e.message().contains("is down"), "{e:?}");

    // n1 comes back with its pool: its PGs are up on it again, with every object.
    nodes[1].start_again();
    poll(Duration::from_secs(30), "n1 back and nothing down", || {
        etcd.get("/rdax/pgmap", false)
            .pop()
            .filter(|m| m["nodes"].as_array().unwrap().len() == 2 && m.get("down").is_none())
    });
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
    reads_back(&c, &acked, "n1's return").await;
    check_replicas(&c, &nodes, &acked, 1).await;

    // Lost for good: mark-lost without --yes changes nothing, with --yes the PGs come up on n0.
    kill_n1(&mut nodes);
    let out = mark_lost(&etcd, "n1", false);
    assert_eq!(out.status.code(), Some(10), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(etcd.get("/rdax/lost/", true).is_empty());
    let out = mark_lost(&etcd, "n0", true);
    assert_eq!(out.status.code(), Some(10), "n0 is registered: {}", String::from_utf8_lossy(&out.stdout));
    let out = mark_lost(&etcd, "n1", true);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    poll(Duration::from_secs(30), "nothing down, and the mark spent", || {
        (etcd.get("/rdax/pgmap", false).pop().is_some_and(|m| m.get("down").is_none())
            && etcd.get("/rdax/lost/", true).is_empty())
        .then_some(())
    });
    wait_repaired(&etcd, &[&nodes[0]]).await;
    c.put("ns", &on_n1[0], b"after n1").await.unwrap();
    assert_eq!(c.get("ns", &on_n1[0]).await.unwrap(), b"after n1");
    let e = c.get("ns", &on_n1[1]).await.unwrap_err();
    assert_eq!(e.kind(), rdax_client::ErrorKind::NotFound, "{e}");
}

/// R = 2, and the second loss comes while the first is being repaired (copies are slowed to
/// 1 MiB/s): the PGs whose last complete copy went with the second node wait for it, and
/// when both come back every object reads back and is on both replicas.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_loss_during_repair_loses_nothing_once_the_node_returns() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Daemon> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| common::etcd::member_with(d.path(), &etcd, &format!("n{i}"), &[], "repair_mib_per_s = 1"))
        .collect();
    for d in &nodes {
        d.allow("repair watch ended").allow("not returned before the break deadline");
    }
    let c = cluster_client(&etcd, &etcd.token).await;
    poll(Duration::from_secs(30), "a PG map of the three", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 3)
    });
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
    let mut acked = Acked::new();
    for i in 0..24 {
        let name = format!("o{i}");
        let data = tagged(&name, 1, 256 << 10);
        c.put("ns", &name, &data).await.unwrap();
        acked.insert(name, (1, data));
    }
    // n0 goes; n1 and n2 copy its PGs from each other at 1 MiB/s, and n1 goes too.
    nodes[0].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    poll(Duration::from_secs(30), "a map without n0", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"] == serde_json::json!(["n1", "n2"]))
    });
    nodes[1].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    let map = poll(Duration::from_secs(30), "a map of n2 alone", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"] == serde_json::json!(["n2"]))
    });
    let down = map["down"].as_object().expect("PGs n2 was still copying from n1 are down");
    assert!(down.values().all(|h| h[0]["node"] == "n1"), "{map}");
    nodes[1].start_again();
    nodes[0].start_again();
    poll(Duration::from_secs(30), "all three back and nothing down", || {
        etcd.get("/rdax/pgmap", false)
            .pop()
            .filter(|m| m["nodes"].as_array().unwrap().len() == 3 && m.get("down").is_none())
    });
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
    reads_back(&c, &acked, "both returned").await;
    check_replicas(&c, &nodes, &acked, 2).await;
    wait_placed(&c, &nodes, acked.keys()).await;
}
