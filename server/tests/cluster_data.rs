//! Objects over a cluster: the SDK's `ClusterClient` and `rdaxctl --cluster` against a real
//! etcd and real rdaxd members on loopback. Routing by the PG map, writes on every replica,
//! listing across nodes, and acknowledged writes surviving a `kill -9`.
#![cfg(feature = "cluster")]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::etcd::{Etcd, member_with};
use common::{Daemon, client, poll};
use rdax_client::{ClusterClient, ClusterOptions, ErrorKind};

/// `n` members `n0..` with replication `r`; waits for the map of all. Returns the cluster's
/// token too.
fn cluster(_root: &Path, etcd: &Etcd, n: usize, r: u8) -> (Vec<tempfile::TempDir>, Vec<Daemon>, String) {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let replicas = r.to_string();
    let nodes = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| member_with(d.path(), etcd, &format!("n{i}"), &["--replicas", replicas.as_str()], ""))
        .collect();
    let all: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    poll(Duration::from_secs(30), "a PG map of every node", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"] == serde_json::json!(all))
    });
    (dirs, nodes, etcd.token.clone())
}

async fn cluster_client(etcd: &Etcd, token: &str) -> ClusterClient {
    let mut opts = ClusterOptions { etcd: vec![etcd.client.clone()], ..ClusterOptions::default() };
    opts.connect.token = Some(token.to_string());
    ClusterClient::connect(opts).await.unwrap()
}

/// Content that names its object and version, so any mix-up shows.
fn tagged(name: &str, version: u64, len: usize) -> Vec<u8> {
    let tag = format!("[{name}#{version}]");
    tag.bytes().cycle().take(len.max(tag.len())).collect()
}

/// The bytes of `ns/name` on one node, read straight from it (no routing), or `None`.
async fn on_node(d: &Daemon, ns: &str, name: &str) -> Option<Vec<u8>> {
    let o = client(d).await.object(ns, name).unwrap();
    match o.stat().await {
        Ok(st) => Some(if st.size == 0 { Vec::new() } else { o.read(0, st.size).await.unwrap() }),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("stat {ns}/{name}: {e}"),
    }
}

/// The index of node `nI`.
fn index(id: &str) -> usize {
    id.trim_start_matches('n').parse().unwrap()
}

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

/// A seed for the randomised rounds: `RDAX_TEST_SEED` when set, else from the clock; printed.
fn seed() -> u64 {
    let s = std::env::var("RDAX_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("cluster fault test seed: {s} (RDAX_TEST_SEED={s} repeats it)");
    s
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Each object's last acknowledged version and its bytes.
type Acked = BTreeMap<String, (u64, Vec<u8>)>;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_a_node_during_writes_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path());
    let (_dirs, mut nodes, token) = cluster(root.path(), &etcd, 3, 2);
    let c = cluster_client(&etcd, &token).await;
    let mut rng = seed() | 1;
    let victim = (next(&mut rng) % 3) as usize;
    // Writers put tagged versions of 16 objects; every acknowledged version is recorded.
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        let mut r = rng ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        writers.push(tokio::spawn(async move {
            let mut version = 0u64;
            let mut failures = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                version += 1;
                let name = format!("w{w}-{:02}", next(&mut r) % 16);
                let data = tagged(&name, version, 1 + (next(&mut r) % 300_000) as usize);
                // A put that was not acknowledged leaves the object undefined until a put of
                // it succeeds, as any failed write does: repeat it until one does.
                loop {
                    match c.put("ns", &name, &data).await {
                        Ok(_) => break,
                        Err(e) => {
                            eprintln!("put {name} v{version} not acknowledged: {e}");
                            failures += 1;
                            assert!(failures < 20, "the cluster stopped taking writes");
                        }
                    }
                }
                acked.lock().unwrap().insert(name, (version, data));
            }
            failures
        }));
    }
    let count = || acked.lock().unwrap().len();
    poll(Duration::from_secs(60), "writes before the kill", || (count() >= 20).then_some(()));
    nodes[victim].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    let dead = format!("n{victim}");
    poll(Duration::from_secs(30), "a map without the killed node", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| !m["nodes"].as_array().unwrap().contains(&dead.clone().into()))
    });
    // Writes go on under the new map.
    let after_kill = acked.lock().unwrap().values().map(|(v, _)| *v).sum::<u64>();
    poll(Duration::from_secs(60), "writes after the new map", || {
        (acked.lock().unwrap().values().map(|(v, _)| *v).sum::<u64>() > after_kill + 20).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let failures = w.await.unwrap();
        // Puts may fail while the dead node is still in the map; none may be lost once acked.
        eprintln!("writer: {failures} puts not acknowledged");
    }
    // Every acknowledged write reads back byte-identical, through the client and on every
    // surviving replica of its PG that the write reached.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 10, "{} objects written", acked.len());
    for (name, (version, data)) in &acked {
        let got = c.get("ns", name).await.unwrap_or_else(|e| panic!("get {name} (v{version}): {e}"));
        assert!(got == *data, "{name}: read back differs from acknowledged version {version}");
    }
    // Repair restores two copies: every survivor reports no degraded PG, and then every
    // object is on both replicas of the current map, byte-identical.
    let alive: Vec<&Daemon> = nodes.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, d)| d).collect();
    let repaired = std::time::Instant::now() + Duration::from_secs(90);
    while !alive.iter().all(|d| d.metric("rdax_cluster_pgs_degraded") == 0.0) {
        if std::time::Instant::now() > repaired {
            for d in &alive {
                let log = d.log();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains("repair") || l.contains("WARN")).collect();
                eprintln!("=== {} (degraded {})", d.dir.display(), d.metric("rdax_cluster_pgs_degraded"));
                eprintln!("{}", lines[lines.len().saturating_sub(15)..].join("\n"));
            }
            eprintln!("repair records: {:?}", etcd.get("/rdax/repair/", true));
            eprintln!("done records: {:?}", etcd.get("/rdax/repaired/", true));
            panic!("repair did not finish within 90 s (seed printed above)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alive.iter().map(|d| d.metric("rdax_cluster_repair_bytes_total")).sum::<f64>() > 0.0, "nothing was copied");
    c.refresh().await.unwrap();
    for (name, (version, data)) in &acked {
        let (_, replicas) = c.placement("ns", name).unwrap();
        assert_eq!(replicas.len(), 2, "{name}: {replicas:?}");
        for id in &replicas {
            let got = on_node(&nodes[index(id)], "ns", name).await;
            assert!(
                got.as_deref() == Some(&data[..]),
                "{name} v{version} on replica {id} after repair: {:?} bytes, want {}",
                got.map(|g| g.len()),
                data.len()
            );
        }
    }
    let st = status(&etcd);
    assert_eq!(st["pg_states"]["healthy"], 128, "{st}");
}

/// `rdaxctl --cluster etcd://... --json cluster status`.
fn status(etcd: &Etcd) -> serde_json::Value {
    let spec = etcd.client.replacen("http://", "etcd://", 1);
    let out = common::rdaxctl().args(["--cluster", &spec, "--json", "cluster", "status"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
