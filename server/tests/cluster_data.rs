//! Objects over a cluster: the SDK's `ClusterClient` and `rdaxctl --cluster` against a real
//! etcd and real rdaxd members on loopback. Routing by the PG map, writes on every replica,
//! listing across nodes, and acknowledged writes surviving a `kill -9`.
#![cfg(feature = "cluster")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::etcd::{
    Etcd, Workload, check_replicas, cluster, cluster_client, index, member_with, next, on_node, seed, status, tagged,
    wait_healthy, wait_placed, wait_repaired,
};
use common::{Daemon, poll};
use rdax_client::ErrorKind;

#[tokio::test(flavor = "multi_thread")]
async fn put_get_list_stat_and_delete_across_three_nodes_with_two_replicas() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, nodes, token) = cluster(root.path(), &etcd, 3, 2);
    let c = cluster_client(&etcd, &token).await;
    let epoch = c.view().epoch();
    assert!(epoch > 0 && c.view().nodes.len() == 3, "{:?}", c.view());
    // Objects of several sizes, one empty and one of several data-plane chunks of 1 MiB.
    let sizes = [0usize, 1, 4095, 4096, 65_537, 3 << 20];
    let mut want = BTreeMap::new();
    for i in 0..24 {
        let name = format!("obj-{i:02}");
        let data = tagged(&name, 1, sizes[i % sizes.len()]);
        let r = c.put("ns", &name, &data).await.unwrap();
        assert_eq!(r.replicas.len(), 2);
        assert_eq!(Some((r.pg, r.replicas.clone())), c.placement("ns", &name));
        want.insert(name, (data, r.replicas));
    }
    // Each object is on exactly its two replicas, byte-identical, and on no other node.
    let mut spread = [0usize; 3];
    for (name, (data, replicas)) in &want {
        for (i, d) in nodes.iter().enumerate() {
            let got = on_node(d, "ns", name).await;
            if replicas.contains(&format!("n{i}")) {
                assert!(
                    got.as_deref() == Some(&data[..]),
                    "{name} on its replica n{i}: {:?} bytes",
                    got.map(|g| g.len())
                );
                spread[i] += 1;
            } else {
                assert!(got.is_none(), "{name} on n{i}, which is not its replica");
            }
        }
        assert!(&c.get("ns", name).await.unwrap() == data, "{name} through the cluster client");
        assert_eq!(c.stat("ns", name).await.unwrap().size, data.len() as u64);
    }
    assert!(spread.iter().all(|&n| n > 0), "every node holds some objects: {spread:?}");
    // Overwrite with another size: every replica follows.
    let new = tagged("obj-03", 2, 10_000);
    c.put("ns", "obj-03", &new).await.unwrap();
    for id in &want["obj-03"].1 {
        assert!(on_node(&nodes[index(id)], "ns", "obj-03").await.as_deref() == Some(&new[..]));
    }
    // Listing merges the nodes: each object once, sorted.
    let listed: Vec<String> = c.list("ns").await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(listed, want.keys().cloned().collect::<Vec<_>>());
    assert!(c.list("other").await.unwrap().is_empty());
    // Delete: gone from every replica; a second delete and a get say NotFound.
    for name in ["obj-00", "obj-05", "obj-11"] {
        c.delete("ns", name).await.unwrap();
        for d in &nodes {
            assert!(on_node(d, "ns", name).await.is_none());
        }
        assert_eq!(c.delete("ns", name).await.unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(c.get("ns", name).await.unwrap_err().kind(), ErrorKind::NotFound);
    }
    assert_eq!(c.list("ns").await.unwrap().len(), want.len() - 3);
    // A request routed by an old epoch is refused by the node, naming its own epoch: that is
    // what makes the client refresh.
    let (pg, replicas) = c.placement("ns", "obj-01").unwrap();
    let d = &nodes[index(&replicas[0])];
    let stale = stat_at(d, &token, epoch - 1, pg).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert_eq!(stale.metadata().get("rdax-map-epoch").unwrap().to_str().unwrap(), epoch.to_string());
    stat_at(d, &token, epoch, pg).await.unwrap();
}

/// `Objects.Create` of `ns/name`, routed by `epoch` and `pg`, straight to `d`.
async fn create_at(d: &Daemon, token: &str, name: &str, epoch: u64, pg: u32) -> Result<(), tonic::Status> {
    create_marked(d, token, name, epoch, pg, false).await
}

/// [`create_at`] marked as a primary's change (`rdax-from-primary`).
async fn converge_at(d: &Daemon, token: &str, name: &str, epoch: u64, pg: u32) -> Result<(), tonic::Status> {
    create_marked(d, token, name, epoch, pg, true).await
}

async fn create_marked(
    d: &Daemon,
    token: &str,
    name: &str,
    epoch: u64,
    pg: u32,
    from_primary: bool,
) -> Result<(), tonic::Status> {
    use rdax_proto::pb;
    let ch = tonic::transport::Endpoint::from_shared(d.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut c = pb::objects_client::ObjectsClient::new(ch);
    let mut req = tonic::Request::new(pb::CreateRequest {
        object: Some(pb::ObjectRef { namespace: "ns".into(), name: name.into() }),
        size: 4096,
        ..Default::default()
    });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut().insert("rdax-map-epoch", epoch.to_string().parse().unwrap());
    req.metadata_mut().insert("rdax-pg", pg.to_string().parse().unwrap());
    if from_primary {
        req.metadata_mut().insert("rdax-from-primary", "1".parse().unwrap());
    }
    c.create(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_resizes_and_deletes_are_ordered_by_the_pg_primary() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, nodes, token) = cluster(root.path(), &etcd, 3, 3);
    let c = cluster_client(&etcd, &token).await;
    let epoch = c.view().epoch();
    // A routed create sent to a replica that is not the PG's primary is refused, naming the
    // node's epoch, and nothing is made anywhere.
    let (pg, replicas) = c.placement("ns", "direct").unwrap();
    assert_eq!(replicas.len(), 3);
    let refused = create_at(&nodes[index(&replicas[1])], &token, "direct", epoch, pg).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("primary"), "{refused:?}");
    assert_eq!(refused.metadata().get("rdax-map-epoch").unwrap().to_str().unwrap(), epoch.to_string());
    for d in &nodes {
        assert!(on_node(d, "ns", "direct").await.is_none());
    }
    // The same create at the primary: when it answers, every replica has the object.
    create_at(&nodes[index(&replicas[0])], &token, "direct", epoch, pg).await.unwrap();
    for d in &nodes {
        assert_eq!(on_node(d, "ns", "direct").await.map(|b| b.len()), Some(4096));
    }
    // Clients racing puts (of several sizes) and deletes on a few names: once they stop,
    // every replica holds the same objects with the same bytes, because each create, resize
    // and delete took effect on all of them in the primary's order, and puts of one object
    // do not interleave their writes.
    let names = ["race-a", "race-b", "race-c"];
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let c = cluster_client(&etcd, &token).await;
        tasks.push(tokio::spawn(async move {
            let mut x = seed() ^ (w + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for v in 0..25 {
                let name = names[(next(&mut x) % 3) as usize];
                if next(&mut x).is_multiple_of(3) {
                    match c.delete("ns", name).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => panic!("delete {name}: {e}"),
                    }
                } else {
                    let len = (next(&mut x) % 3 * 4096 + 1) as usize;
                    c.put("ns", name, &tagged(name, w * 100 + v, len)).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for name in names {
        let mut seen = Vec::new();
        for d in &nodes {
            seen.push(on_node(d, "ns", name).await);
        }
        let sizes: Vec<Option<usize>> = seen.iter().map(|s| s.as_ref().map(Vec::len)).collect();
        assert!(seen.iter().all(|s| *s == seen[0]), "{name}: the replicas disagree (sizes {sizes:?})");
        match &seen[0] {
            Some(b) => assert!(c.get("ns", name).await.unwrap() == *b),
            None => assert_eq!(c.stat("ns", name).await.unwrap_err().kind(), ErrorKind::NotFound),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_member_may_send_a_primary_s_change() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    // A principal with `write` on `ns/` besides the members' shared token.
    let out = common::rdaxctl().args(["--json", "token", "create", "writer", "--scope", "ns/:write"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let writer = v["token"].as_str().unwrap().to_string();
    let pf = root.path().join("principals.toml");
    std::fs::write(&pf, v["principals_file_entry"].as_str().unwrap()).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Daemon> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let args = ["--replicas", "2", "--principals-file", pf.to_str().unwrap()];
            member_with(d.path(), &etcd, &format!("n{i}"), &args, "")
        })
        .collect();
    poll(Duration::from_secs(30), "a PG map of every node", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 3)
    });
    let c = cluster_client(&etcd, &writer).await;
    let (pg, replicas) = c.placement("ns", "skip").unwrap();
    let epoch = c.view().epoch();
    let second = &nodes[index(&replicas[1])];
    // The writer may write, but not skip the primary's ordering on a replica.
    let refused = converge_at(second, &writer, "skip", epoch, pg).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("rdax-from-primary"), "{refused:?}");
    assert!(on_node(second, "ns", "skip").await.is_none());
    // A member's principal (the shared peer token) may.
    converge_at(second, &etcd.token, "skip", epoch, pg).await.unwrap();
    assert_eq!(on_node(second, "ns", "skip").await.map(|b| b.len()), Some(4096));
    // And the writer's own puts go through the primary as usual.
    c.put("ns", "mine", b"through the primary").await.unwrap();
    assert_eq!(c.get("ns", "mine").await.unwrap(), b"through the primary");
}

/// `Objects.Stat` of `ns/obj-01` routed by `epoch` and `pg`.
async fn stat_at(d: &Daemon, token: &str, epoch: u64, pg: u32) -> Result<(), tonic::Status> {
    use rdax_proto::pb;
    let ch = tonic::transport::Endpoint::from_shared(d.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut c = pb::objects_client::ObjectsClient::new(ch);
    let mut req = tonic::Request::new(pb::StatRequest {
        object: Some(pb::ObjectRef { namespace: "ns".into(), name: "obj-01".into() }),
    });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut().insert("rdax-map-epoch", epoch.to_string().parse().unwrap());
    req.metadata_mut().insert("rdax-pg", pg.to_string().parse().unwrap());
    c.stat(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn rdaxctl_puts_gets_lists_stats_and_removes_over_the_cluster() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, nodes, token) = cluster(root.path(), &etcd, 3, 2);
    let spec = etcd.client.replacen("http://", "etcd://", 1);
    let tf = etcd.token_file.clone();
    let ctl = |args: &[&str]| {
        let out = common::rdaxctl()
            .args(["--cluster", &spec, "--token-file", tf.to_str().unwrap(), "--json"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let input = root.path().join("in.bin");
    let data = tagged("cli", 1, 200_000);
    std::fs::write(&input, &data).unwrap();
    let (code, out, err) = ctl(&["put", "ns/from-cli", input.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let put: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(put["bytes"], 200_000);
    let replicas: Vec<String> = serde_json::from_value(put["replicas"].clone()).unwrap();
    assert_eq!(replicas.len(), 2);
    for id in &replicas {
        assert!(on_node(&nodes[index(id)], "ns", "from-cli").await.as_deref() == Some(&data[..]));
    }
    let output = root.path().join("out.bin");
    let (code, _, err) = ctl(&["get", "ns/from-cli", output.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(&output).unwrap() == data);
    let (code, out, _) = ctl(&["get", "ns/from-cli", "-", "--offset", "5", "--length", "7"]);
    assert!(code == Some(0) && out[..] == data[5..12]);
    let (_, out, _) = ctl(&["ls", "ns"]);
    let ls: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["name"], "from-cli");
    let (_, out, _) = ctl(&["stat", "ns/from-cli"]);
    let st: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!((st["size"].as_u64(), &st["replicas"]), (Some(200_000), &put["replicas"]));
    // A ranged write inside the object, and a ranged read of it; one past the end is refused.
    let patch = root.path().join("patch.bin");
    std::fs::write(&patch, tagged("patch", 1, 1000)).unwrap();
    let (code, _, err) = ctl(&["put", "ns/from-cli", patch.to_str().unwrap(), "--offset", "100"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = ctl(&["get", "ns/from-cli", "-", "--offset", "100", "--length", "1000"]);
    assert!(code == Some(0) && out == tagged("patch", 1, 1000), "{err}");
    let (code, out, _) = ctl(&["get", "ns/from-cli", "-", "--offset", "1100"]);
    assert!(code == Some(0) && out[..] == data[1100..]);
    // Past the end, the object grows to take it, as on a single daemon.
    let (code, _, err) = ctl(&["put", "ns/from-cli", patch.to_str().unwrap(), "--offset", "199500"]);
    assert_eq!(code, Some(0), "{err}");
    for id in &replicas {
        let got = on_node(&nodes[index(id)], "ns", "from-cli").await.unwrap();
        assert_eq!(got.len(), 200_500, "on {id}");
        assert!(got[100..1100] == tagged("patch", 1, 1000)[..] && got[1100..199_500] == data[1100..199_500], "on {id}");
        assert!(got[199_500..] == tagged("patch", 1, 1000)[..], "on {id}");
    }
    // Resize (and a grow that would shrink, which leaves it) and create over the cluster.
    let (code, out, err) = ctl(&["resize", "ns/from-cli", "300000"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap()["size"], 300_000);
    let (_, out, _) = ctl(&["resize", "--grow-only", "ns/from-cli", "1000"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap()["size"], 300_000);
    let (code, _, err) = ctl(&["create", "ns/made", "--size", "4096"]);
    assert_eq!(code, Some(0), "{err}");
    let (pg, made_on) = {
        let (_, out, _) = ctl(&["stat", "ns/made"]);
        let st: serde_json::Value = serde_json::from_slice(&out).unwrap();
        (st["pg"].clone(), serde_json::from_value::<Vec<String>>(st["replicas"].clone()).unwrap())
    };
    assert!(pg.is_u64());
    for id in &made_on {
        assert_eq!(on_node(&nodes[index(id)], "ns", "made").await.map(|b| b.len()), Some(4096), "on {id}");
    }
    assert_eq!(ctl(&["create", "ns/made", "--size", "4096"]).0, Some(4), "already exists");
    let (code, _, err) = ctl(&["rm", "ns/from-cli"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(ctl(&["stat", "ns/from-cli"]).0, Some(3), "not found");
    // Commands that have no cluster form say so.
    let (code, out, err) = ctl(&["info"]);
    let said = format!("{}{err}", String::from_utf8_lossy(&out));
    assert_eq!(code, Some(5), "{said}");
    assert!(said.contains("--endpoint"), "{said}");
    drop(token);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_node_during_writes_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, mut nodes, token) = cluster(root.path(), &etcd, 3, 2);
    let c = cluster_client(&etcd, &token).await;
    // The copies made as the cluster formed are complete (R = 2 survives one loss of a
    // complete copy).
    wait_healthy(&etcd, &nodes.iter().collect::<Vec<_>>()).await;
    let mut rng = seed() | 1;
    // Half the seeds kill the coordinator: a new one is elected, writes the map, and repair
    // goes on under it.
    let coordinator = (0..3).find(|&i| nodes[i].metric("rdax_cluster_coordinator") == 1.0);
    let victim = match coordinator {
        Some(i) if next(&mut rng).is_multiple_of(2) => i,
        _ => (next(&mut rng) % 3) as usize,
    };
    eprintln!("killing n{victim} (coordinator: {coordinator:?})");
    let w = Workload::start(&c, rng, 3);
    w.wait_for_more(20).await;
    nodes[victim].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    let dead = format!("n{victim}");
    poll(Duration::from_secs(30), "a map without the killed node", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| !m["nodes"].as_array().unwrap().contains(&dead.clone().into()))
    });
    // Writes go on under the new map.
    w.wait_for_more(20).await;
    let acked = w.stop().await;
    assert!(acked.len() >= 10, "{} objects written", acked.len());
    // Every acknowledged write reads back byte-identical through the client.
    for (name, (version, data)) in &acked {
        let got = c.get("ns", name).await.unwrap_or_else(|e| panic!("get {name} (v{version}): {e}"));
        assert!(got == *data, "{name}: read back differs from acknowledged version {version}");
    }
    // Repair restores two copies, byte-identical.
    let alive: Vec<&Daemon> = nodes.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, d)| d).collect();
    wait_repaired(&etcd, &alive).await;
    assert!(alive.iter().map(|d| d.metric("rdax_cluster_repair_bytes_total")).sum::<f64>() > 0.0, "nothing was copied");
    check_replicas(&c, &nodes, &acked, 2).await;
    assert_eq!(status(&etcd)["pg_states"]["healthy"], 128);
    let new = (0..3).filter(|&i| i != victim).find(|&i| nodes[i].metric("rdax_cluster_coordinator") == 1.0);
    assert!(new.is_some(), "a coordinator among the survivors");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joining_node_takes_pgs_ranged_writes_during_its_copy_reach_it_and_the_others_delete_theirs() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (mut dirs, mut nodes, token) = cluster(root.path(), &etcd, 3, 2);
    let c = cluster_client(&etcd, &token).await;
    let mut want = BTreeMap::new();
    for i in 0..48 {
        let name = format!("obj-{i:02}");
        let data = tagged(&name, 1, 64_000 + i);
        c.put("ns", &name, &data).await.unwrap();
        want.insert(name, data);
    }
    // A fourth node joins. It becomes a replica of some PGs in place of one of the others,
    // copies them (slowly, at 1 MiB/s), and once it has, the node it displaced deletes its
    // copies. Meanwhile a writer patches the head of every object over and over: a ranged
    // write skips the new replica only while it has no copy of that object yet.
    let dir = tempfile::tempdir().unwrap();
    nodes.push(member_with(dir.path(), &etcd, "n3", &["--replicas", "2"], "repair_mib_per_s = 1"));
    dirs.push(dir);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let patcher = {
        let (c, stop, names) = (c.clone(), stop.clone(), want.keys().cloned().collect::<Vec<_>>());
        tokio::spawn(async move {
            let mut last = BTreeMap::new();
            for v in 2.. {
                for name in &names {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return last;
                    }
                    c.write_at("ns", name, 0, &tagged(name, v, 64)).await.unwrap();
                    last.insert(name.clone(), v);
                }
            }
            unreachable!()
        })
    };
    poll(Duration::from_secs(30), "a map with the fourth node", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"].as_array().unwrap().len() == 4)
    });
    let all: Vec<&Daemon> = nodes.iter().collect();
    wait_repaired(&etcd, &all).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let patched = patcher.await.unwrap();
    assert!(patched.values().any(|&v| v > 2), "the writer went round more than once: {patched:?}");
    for (name, v) in &patched {
        let data = want.get_mut(name).unwrap();
        data[..64].copy_from_slice(&tagged(name, *v, 64));
    }
    wait_placed(&c, &nodes, want.keys()).await;
    assert!(want.keys().any(|n| c.placement("ns", n).unwrap().1.contains(&"n3".to_string())), "n3 holds some");
    let collected: f64 = nodes[..3].iter().map(|d| d.metric("rdax_cluster_leftovers_collected_total")).sum();
    assert!(collected > 0.0, "the old nodes deleted what moved");
    assert_eq!(nodes[3].metric("rdax_cluster_leftovers_collected_total"), 0.0);
    for (name, data) in &want {
        assert!(c.get("ns", name).await.unwrap() == *data, "{name} reads back");
        for id in c.placement("ns", name).unwrap().1 {
            assert!(on_node(&nodes[index(&id)], "ns", name).await.as_deref() == Some(&data[..]), "{name} on {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ranged_writes_and_reads_reach_every_replica_and_overlapping_ones_never_interleave() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, nodes, token) = cluster(root.path(), &etcd, 3, 2);
    let c = cluster_client(&etcd, &token).await;
    const SLICE: usize = 128 << 10;
    assert_eq!(c.create("ns", "big", 8 * SLICE as u64).await.unwrap().size, 8 * SLICE as u64);
    assert_eq!(c.create("ns", "big", 4096).await.unwrap_err().kind(), ErrorKind::AlreadyExists);
    // Eight writers of disjoint slices at once: all of them land, on both replicas.
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.write_at("ns", "big", w * SLICE as u64, &tagged(&format!("slice-{w}"), 1, SLICE)).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().replicas.len(), 2);
    }
    let want: Vec<u8> = (0..8).flat_map(|w| tagged(&format!("slice-{w}"), 1, SLICE)).collect();
    let (_, replicas) = c.placement("ns", "big").unwrap();
    for id in &replicas {
        assert!(on_node(&nodes[index(id)], "ns", "big").await.unwrap() == want, "on {id}");
    }
    assert!(c.read_at("ns", "big", 3 * SLICE as u64 + 7, 5000).await.unwrap()[..] == want[3 * SLICE + 7..][..5000]);
    // Outside the object, or no object: refused, and nothing changes.
    let past = c.write_at("ns", "big", 8 * SLICE as u64 - 10, &[1; 11]).await.unwrap_err();
    assert_eq!(past.kind(), ErrorKind::OutOfRange, "{past}");
    assert_eq!(c.read_at("ns", "big", 8 * SLICE as u64, 1).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(c.write_at("ns", "none", 0, &[1]).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(c.resize("ns", "none", 1).await.unwrap_err().kind(), ErrorKind::NotFound);
    // Grown through the primary: the new bytes read zero on both replicas and take writes.
    assert_eq!(c.resize("ns", "big", 9 * SLICE as u64).await.unwrap().size, 9 * SLICE as u64);
    c.write_at("ns", "big", 9 * SLICE as u64 - 3, b"end").await.unwrap();
    for id in &replicas {
        let got = on_node(&nodes[index(id)], "ns", "big").await.unwrap();
        assert!(got[..want.len()] == want[..], "on {id}");
        assert!(got[want.len()..got.len() - 3].iter().all(|&b| b == 0) && got.ends_with(b"end"), "on {id}");
    }
    // A grow never shrinks. Appenders that each grow the object to the end of their own range
    // and then write it: the object ends as long as the furthest, with every range intact.
    assert_eq!(c.grow("ns", "big", SLICE as u64).await.unwrap().size, 9 * SLICE as u64);
    let base = 9 * SLICE as u64;
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let off = base + w * 1000;
            c.grow("ns", "big", off + 1000).await.unwrap();
            c.write_at("ns", "big", off, &[w as u8 + 1; 1000]).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for id in &replicas {
        let got = on_node(&nodes[index(id)], "ns", "big").await.unwrap();
        assert_eq!(got.len() as u64, base + 4000, "on {id}");
        for w in 0..4usize {
            let at = base as usize + w * 1000;
            assert!(got[at..at + 1000].iter().all(|&b| b == w as u8 + 1), "appender {w} on {id}");
        }
    }
    // Writers of one overlapping range: each write is whole on every replica, so the range
    // ends uniform (one writer's byte) and the same on both.
    let mut tasks = Vec::new();
    for w in 1..=4u8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                c.write_at("ns", "big", 1000, &vec![w; SLICE]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut seen = Vec::new();
    for id in &replicas {
        seen.push(on_node(&nodes[index(id)], "ns", "big").await.unwrap()[1000..1000 + SLICE].to_vec());
    }
    assert!(seen[0].iter().all(|&b| b == seen[0][0]) && (1..=4).contains(&seen[0][0]), "interleaved");
    assert!(seen[1] == seen[0], "the replicas disagree");
}
