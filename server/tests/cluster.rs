//! Cluster membership against a real etcd (Debian's `etcd-server`, started by each test on
//! loopback ports with its own data directory) and real rdaxd processes: registration and
//! renewal, a duplicate node id, fencing when etcd stops answering, no grant or write after a
//! stop past the etcd lease's TTL, rejoining after an etcd restart.
#![cfg(feature = "cluster")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, TTL, cluster_client, member, member_with, status};
use common::{Daemon, client, poll};

const MIB: u64 = 1 << 20;
use rdax_client::{ErrorKind, LeaseMode};

/// One registered member `n1`, an object `ns/x` of 1 MiB on it, and a session holding a
/// read-write lease over it that has written "before" at offset 0.
async fn member_with_a_lease(
    dir: &Path,
    etcd: &Etcd,
) -> (Daemon, rdax_client::Client, rdax_client::Session, rdax_client::Lease) {
    let d = member(dir, etcd, "n1");
    poll(Duration::from_secs(20), "registration", || (d.metric("rdax_cluster_member") == 1.0).then_some(()));
    let c = client(&d).await;
    c.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let s = c.open_session("t").await.unwrap();
    let lease = s.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    lease.write_persist(0, b"before").await.unwrap();
    (d, c, s, lease)
}

fn key(node: &str) -> String {
    format!("/rdax/nodes/{node}")
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_register_their_endpoints_and_keep_their_etcd_lease_alive() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Daemon> = dirs.iter().enumerate().map(|(i, d)| member(d.path(), &etcd, &format!("n{i}"))).collect();
    let records = poll(Duration::from_secs(20), "three registrations", || {
        let v = etcd.get("/rdax/nodes/", true);
        (v.len() == 3).then_some(v)
    });
    for (i, d) in nodes.iter().enumerate() {
        let r = records.iter().find(|r| r["node_id"] == format!("n{i}")).expect("each node registered");
        assert_eq!(format!("http://{}", r["grpc"].as_str().unwrap()), d.endpoint);
        assert_eq!(r["data"].as_str().unwrap(), d.data);
        assert!(r["capacity_bytes"].as_u64().unwrap() > 32 * MIB, "{r}");
        // The key is written just before the fence opens: poll, do not race it.
        poll(Duration::from_secs(10), "membership current", || (d.metric("rdax_cluster_member") == 1.0).then_some(()));
    }
    // Renewal: across two TTLs the key stays under the same etcd lease, which etcd keeps
    // topping up (it never expires: -1).
    let lease = etcd.lease_of(&key("n0"));
    assert_ne!(lease, 0, "the registration lives under an etcd lease");
    let end = Instant::now() + TTL * 2;
    while Instant::now() < end {
        assert!(etcd.ttl_of(lease) >= 0, "the etcd lease ran out while the node was healthy");
        assert_eq!(etcd.lease_of(&key("n0")), lease);
        std::thread::sleep(Duration::from_millis(200));
    }
    // A member grants leases.
    let c = client(&nodes[0]).await;
    c.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let s = c.open_session("t").await.unwrap();
    s.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap().write_persist(0, b"member").await.unwrap();
    // Leaving (SIGTERM) revokes the etcd lease: the key goes at once, not a TTL later.
    let mut n1 = nodes.into_iter().nth(1).unwrap();
    assert!(n1.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)).success());
    assert!(etcd.get(&key("n1"), false).is_empty(), "the key of a node that left is gone");
    assert!(n1.log().contains("left the cluster"), "{}", n1.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_with_the_same_node_id_is_refused_and_grants_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = member(da.path(), &etcd, "same");
    poll(Duration::from_secs(20), "the first registration", || {
        (!etcd.get(&key("same"), false).is_empty()).then_some(())
    });
    let b = member(db.path(), &etcd, "same");
    poll(Duration::from_secs(20), "the second daemon to report the clash", || {
        b.log().contains("is registered by another live daemon").then_some(())
    });
    let record = &etcd.get(&key("same"), false)[0];
    assert_eq!(format!("http://{}", record["grpc"].as_str().unwrap()), a.endpoint, "the first keeps its key");
    assert_eq!(b.metric("rdax_cluster_member"), 0.0);
    let c = client(&b).await;
    c.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let e = c.open_session("t").await.unwrap().acquire("ns", "x", 0, MIB, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("cluster membership lapsed"), "{e}");
    // One member and two replicas wanted: every PG is degraded, and the refused daemon is not
    // a node of the cluster.
    map_when(&etcd, "a map of the one member", |m| names(&m["nodes"]) == ["same"]);
    let st = status(&etcd);
    assert_eq!(
        st["pg_states"],
        serde_json::json!({"healthy": 0, "repairing": 0, "degraded": 128, "unavailable": 0, "down": 0})
    );
    assert_eq!(st["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(format!("http://{}", st["nodes"][0]["grpc"].as_str().unwrap()), a.endpoint);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_cannot_renew_fences_itself_before_etcd_forgets_it_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(dir.path());
    let nd = tempfile::tempdir().unwrap();
    let (d, c, s, lease) = member_with_a_lease(nd.path(), &etcd).await;
    // etcd stops answering (it is stopped, not gone: the connection stays up). The node must
    // fence itself within the etcd lease's TTL of its last acknowledged renewal, which was at
    // most a quarter TTL (one renewal interval) before the stop.
    let stopped = Instant::now();
    etcd.signal(libc::SIGSTOP);
    poll(TTL * 4, "the node to fence itself", || (d.metric("rdax_cluster_member") == 0.0).then_some(()));
    let fenced_after = stopped.elapsed();
    assert!(fenced_after < TTL, "fenced {fenced_after:?} after etcd stopped: etcd could have forgotten it first");
    // The refusal is immediate (a clock check); the revocation follows from the fence watcher.
    poll(TTL, "the fence to revoke the leases", || (d.metric("rdax_cluster_fences_total") == 1.0).then_some(()));
    let e = lease.write(0, b"fenced").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "a write under a fenced node's lease: {e}");
    let e = s.acquire("ns", "x", 0, MIB, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // The data already written stays readable through the control plane: fencing stops DMA
    // grants, not the daemon.
    assert_eq!(c.object("ns", "x").unwrap().read(0, 6).await.unwrap(), b"before");
    // etcd is killed and started again on the same data: the node rejoins and grants again.
    etcd.signal(libc::SIGCONT);
    etcd.kill();
    etcd.spawn();
    poll(Duration::from_secs(30), "the node to rejoin", || (d.metric("rdax_cluster_member") == 1.0).then_some(()));
    assert!(!etcd.get(&key("n1"), false).is_empty(), "registered again");
    // The lease granted before the fence stays revoked: rejoining does not bring it back.
    assert_eq!(lease.write(0, b"stale!").await.unwrap_err().kind(), ErrorKind::Revoked);
    let again = s.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    again.write_persist(0, b"after!").await.unwrap();
    assert_eq!(c.object("ns", "x").unwrap().read(0, 6).await.unwrap(), b"after!");
    assert!(d.metric("rdax_cluster_joins_total") >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_stopped_past_its_etcd_lease_accepts_no_write_and_grants_nothing_when_it_runs_again() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let nd = tempfile::tempdir().unwrap();
    let (d, c, s, lease) = member_with_a_lease(nd.path(), &etcd).await;
    let lease_id = etcd.lease_of(&key("n1"));
    let epoch = map_when(&etcd, "its map", |m| names(&m["nodes"]) == ["n1"])["epoch"].as_u64().unwrap();
    poll(Duration::from_secs(20), "the node to follow the map", || {
        (d.metric("rdax_cluster_map_epoch") == epoch as f64).then_some(())
    });
    resize_at(&d, "x", epoch, None, MIB).await.expect("a member at the map's epoch admits it");
    // SIGSTOP the daemon until etcd has forgotten it (its key went with the expired lease).
    d.signal(libc::SIGSTOP);
    poll(TTL * 10, "etcd to expire the stopped node's lease", || etcd.get(&key("n1"), false).is_empty().then_some(()));
    assert!(etcd.ttl_of(lease_id) < 0);
    d.signal(libc::SIGCONT);
    // At once, before it can have re-registered: a write under the old lease is refused, and
    // so is a request routed by the map the node belonged to.
    let r = resize_at(&d, "x", epoch, None, 2 * MIB).await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable, "a write routed by the old map");
    let e = lease.write(0, b"stale!").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "a write after the stop: {e}");
    assert_eq!(c.object("ns", "x").unwrap().read(0, 6).await.unwrap(), b"before", "the stale write landed");
    assert_eq!(c.object("ns", "x").unwrap().stat().await.unwrap().size, MIB, "the refused resize ran");
    // It rejoins under a new etcd lease.
    poll(Duration::from_secs(20), "the node to rejoin", || {
        let l = etcd.lease_of(&key("n1"));
        (l != 0 && l != lease_id).then_some(())
    });
    poll(Duration::from_secs(20), "membership current", || (d.metric("rdax_cluster_member") == 1.0).then_some(()));
    assert_eq!(lease.write(0, b"stale!").await.unwrap_err().kind(), ErrorKind::Revoked, "the old lease came back");
    s.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap().write_persist(0, b"again!").await.unwrap();
    assert_eq!(c.object("ns", "x").unwrap().read(0, 6).await.unwrap(), b"again!");
    assert!(d.log().contains("fenced:"), "{}", d.log());
}

#[test]
fn without_cluster_settings_a_daemon_reports_no_membership() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let text = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&d.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t
    };
    assert!(text.contains("rdax_leases"), "{text}");
    assert!(!text.contains("rdax_cluster_member"), "a single node reports no membership");
}

/// The PG map in etcd, once it satisfies `f`.
fn map_when(etcd: &Etcd, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    poll(Duration::from_secs(30), what, || etcd.get("/rdax/pgmap", false).pop().filter(|m| f(m)))
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn five_nodes_get_a_pg_map_and_a_new_coordinator_replaces_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Daemon> =
        dirs.iter().enumerate().map(|(i, d)| member(d.path(), &etcd, &format!("n{i}"))).collect();
    let all: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
    let before = map_when(&etcd, "a map of all five nodes", |m| names(&m["nodes"]) == all);
    assert_eq!(before["pgs"], 128);
    assert_eq!(before["replicas"], 2);
    for r in before["pg"].as_array().unwrap() {
        let r = names(r);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0] != r[1] && r.iter().all(|n| all.contains(n)), "{r:?}");
    }
    // Exactly one coordinator, and it wrote the map.
    let coord: Vec<usize> = (0..5).filter(|&i| nodes[i].metric("rdax_cluster_coordinator") == 1.0).collect();
    assert_eq!(coord.len(), 1, "coordinators: {coord:?}");
    let c = coord[0];
    assert_eq!(before["coordinator"], format!("n{c}"));
    // kill -9 the coordinator: its etcd lease expires, another member is elected and writes
    // the next epoch without it; PGs the dead node was not in keep their replicas.
    let dead = format!("n{c}");
    nodes[c].signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    let after = map_when(&etcd, "a map without the killed coordinator", |m| !names(&m["nodes"]).contains(&dead));
    assert!(after["epoch"].as_u64() > before["epoch"].as_u64(), "{after}");
    assert_ne!(after["coordinator"], before["coordinator"]);
    let new = poll(Duration::from_secs(20), "the new coordinator's own word", || {
        (0..5).filter(|&i| i != c).find(|&i| nodes[i].metric("rdax_cluster_coordinator") == 1.0)
    });
    assert_eq!(after["coordinator"], format!("n{new}"));
    for (b, a) in before["pg"].as_array().unwrap().iter().zip(after["pg"].as_array().unwrap()) {
        let (b, a) = (names(b), names(a));
        assert!(!a.contains(&dead) && a.len() == 2, "{a:?}");
        if !b.contains(&dead) {
            assert_eq!(a, b, "a PG the dead node was not in moved");
        }
    }
    // It comes back (same pool, a restart): one more epoch, and it is placed again.
    nodes[c].start_again();
    let back = map_when(&etcd, "a map with it again", |m| names(&m["nodes"]) == all);
    assert!(back["epoch"].as_u64() > after["epoch"].as_u64());
    assert_eq!(back["pg"], before["pg"], "placement is a function of the members alone");
    // What an operator sees.
    // The returning node copies its PGs back (empty ones here): repairing, then healthy.
    let st = poll(Duration::from_secs(60), "every PG healthy", || {
        let st = status(&etcd);
        (st["pg_states"]["healthy"] == 128).then_some(st)
    });
    assert_eq!(st["map"]["epoch"], back["epoch"]);
    assert_eq!(st["coordinator"], back["coordinator"]);
    assert_eq!(
        st["pg_states"],
        serde_json::json!({"healthy": 128, "repairing": 0, "degraded": 0, "unavailable": 0, "down": 0})
    );
    let up: Vec<_> = st["nodes"].as_array().unwrap().iter().filter(|n| n["state"] == "up").collect();
    assert_eq!(up.len(), 5);
    let held: u64 = up.iter().map(|n| n["pgs"].as_u64().unwrap()).sum();
    assert_eq!(held, 256, "128 PGs x 2 replicas");
    // Every member follows the map: the newest epoch, and its own share of it.
    let epoch = back["epoch"].as_f64().unwrap();
    for (i, d) in nodes.iter().enumerate() {
        poll(Duration::from_secs(20), "the member to see the newest map", || {
            (d.metric("rdax_cluster_map_epoch") == epoch).then_some(())
        });
        let me = st["nodes"].as_array().unwrap().iter().find(|n| n["node_id"] == format!("n{i}")).unwrap();
        assert_eq!(d.metric("rdax_cluster_pgs_held"), me["pgs"].as_f64().unwrap());
        assert_eq!(d.metric("rdax_cluster_pgs_primary"), me["primary_pgs"].as_f64().unwrap());
    }
    // Requests that carry the epoch: admitted at the node's epoch for a PG it holds, refused
    // for a PG it does not hold, for an older epoch (refresh) and a newer one (retry).
    let e = back["epoch"].as_u64().unwrap();
    let pgs = back["pg"].as_array().unwrap();
    let d = &nodes[0];
    // A PG n0 is the primary of: a routed resize there is n0's to apply (and to pass on). The
    // object is one of that PG (n0 would collect one of a PG it does not hold as a leftover).
    let mine = pgs.iter().position(|r| names(r).first().map(String::as_str) == Some("n0")).unwrap() as u64;
    let other = pgs.iter().position(|r| !names(r).contains(&"n0".to_string())).unwrap() as u64;
    let x = (0..).map(|i| format!("x{i}")).find(|n| u64::from(rdax_client::pg_of("ns", n, pgs.len() as u32)) == mine);
    let x = x.unwrap();
    client(d).await.object("ns", &x).unwrap().create(4096).await.unwrap();
    resize_at(d, &x, e, Some(mine), 8192).await.unwrap();
    resize_at(d, &x, e, None, 8192).await.unwrap();
    let code = |r: Result<(), tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(resize_at(d, &x, e, Some(other), 1).await), tonic::Code::FailedPrecondition);
    assert_eq!(code(resize_at(d, &x, e - 1, Some(mine), 1).await), tonic::Code::FailedPrecondition);
    assert_eq!(code(resize_at(d, &x, e + 1, Some(mine), 1).await), tonic::Code::Unavailable);
    assert_eq!(client(d).await.object("ns", &x).unwrap().stat().await.unwrap().size, 8192, "a refused resize ran");
}

/// `Objects.Resize` of `ns/name` to `size` as a cluster client sends it: with the map epoch it
/// routed by and the object's PG.
async fn resize_at(d: &Daemon, name: &str, epoch: u64, pg: Option<u64>, size: u64) -> Result<(), tonic::Status> {
    use rdax_proto::pb;
    let mut c = pb::objects_client::ObjectsClient::new(d.channel().await);
    let mut req = tonic::Request::new(pb::ResizeRequest {
        object: Some(pb::ObjectRef { namespace: "ns".into(), name: name.into() }),
        size,
        grow_only: false,
    });
    req.metadata_mut().insert("rdax-map-epoch", epoch.to_string().parse().unwrap());
    if let Some(pg) = pg {
        req.metadata_mut().insert("rdax-pg", pg.to_string().parse().unwrap());
    }
    c.resize(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_runs_on_an_etcd_with_tls_client_certificates_and_authentication() {
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start_secure(root.path());
    let sec = etcd.secure.as_ref().unwrap();
    assert!(etcd.client.starts_with("https://"));
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Daemon> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| member_with(d.path(), &etcd, &format!("n{i}"), &["--replicas", "2"], &sec.member_toml()))
        .collect();
    poll(Duration::from_secs(30), "a PG map of both nodes over TLS", || {
        etcd.get("/rdax/pgmap", false).pop().filter(|m| m["nodes"] == serde_json::json!(["n0", "n1"]))
    });
    // The cluster client and rdaxctl reach it with the same credentials.
    let c = cluster_client(&etcd, &etcd.token).await;
    let r = c.put("ns", "over-tls", b"sealed").await.unwrap();
    assert_eq!(r.replicas.len(), 2);
    assert_eq!(c.get("ns", "over-tls").await.unwrap(), b"sealed");
    let st = status(&etcd);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 2, "{st}");
    // Without the CA, without a client certificate, or without the password: refused.
    let mut opts = rdax_client::ClusterOptions { etcd: vec![etcd.client.clone()], ..Default::default() };
    opts.connect.token = Some(etcd.token.clone());
    let mut missing = Vec::new();
    let full = sec.access();
    missing.push(("no CA", rdax_client::EtcdAccess { ca_pem: None, ..full.clone() }));
    missing.push(("no client certificate", rdax_client::EtcdAccess { identity_pem: None, ..full.clone() }));
    missing.push(("no user", rdax_client::EtcdAccess { user: None, ..full.clone() }));
    let wrong = Some((sec.user.clone(), "not-the-password".to_string()));
    missing.push(("a wrong password", rdax_client::EtcdAccess { user: wrong, ..full.clone() }));
    for (what, access) in missing {
        let o = rdax_client::ClusterOptions { etcd_access: access, ..opts.clone() };
        let r = tokio::time::timeout(Duration::from_secs(20), rdax_client::ClusterClient::connect(o)).await;
        assert!(matches!(r, Ok(Err(_))), "{what}: {:?}", r.map(|r| r.map(|_| ())));
    }
    // The password reaches no log.
    for d in &nodes {
        assert!(!d.log().contains(&sec.password), "the etcd password is in a daemon's log");
    }
}
