//! RDMA end to end, in the lab VM (soft-RoCE on a veth pair, emulated NVDIMM): a real rdaxd
//! on a device-DAX pool serving a real client over rxe. Run by `deploy/lab/rdma-lab.sh`
//! inside the VM (CI's lab stage); ignored elsewhere because they need that machine.
//!
//! Environment (set by the script): `RDAX_LAB_DEVDAX` (e.g. /dev/dax0.0) or `RDAX_LAB_FSDAX`
//! (a directory on an fs-DAX mount), `RDAX_LAB_SERVER_IP` and `RDAX_LAB_CLIENT_IP`.
#![cfg(feature = "rdma")]

mod common;

use std::time::Duration;

use common::*;
use rdax_client::{Client, ErrorKind, LeaseMode, Session, SessionNotice, SessionOptions, Transport};

const LAB: &str = "needs the RDMA lab VM: deploy/lab/rdma-lab.sh";

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: these tests run inside the lab VM ({LAB})"))
}

/// What a raw verbs client's connection consists of.
type RawConn = (
    std::sync::Arc<rdax_verbs::EventChannel>,
    std::sync::Arc<rdax_verbs::Conn>,
    tokio::sync::mpsc::UnboundedReceiver<rdax_verbs::Received>,
    std::sync::Arc<rdax_verbs::Pd>,
);

/// A client that knows only the documented protocol connects: rdma_cm to `ep` from the lab's
/// client address, a queue pair of its own, and `private` (the connect proof) with the
/// request. Returns the event channel (which must outlive the connection), the connection,
/// its inbox and its protection domain; `Err` if the daemon does not accept.
async fn raw_connect(ep: std::net::SocketAddr, private: &[u8]) -> Result<RawConn, rdax_verbs::Error> {
    use rdax_verbs::{Conn, EventChannel, Pd, event};
    let t = Duration::from_secs(10);
    let ch = EventChannel::new().unwrap();
    let id = ch.create_id().unwrap();
    id.resolve_addr(Some(std::net::SocketAddr::new(env("RDAX_LAB_CLIENT_IP").parse().unwrap(), 0)), ep, 5000).unwrap();
    drop(ch.expect(event::ADDR_RESOLVED, t, "address").await.unwrap());
    id.resolve_route(5000).unwrap();
    drop(ch.expect(event::ROUTE_RESOLVED, t, "route").await.unwrap());
    // SAFETY: rdma_cm keeps the device context open for the process.
    let pd = unsafe { Pd::alloc(id.context()) }.unwrap();
    let (conn, inbox) = Conn::create(id, pd.clone()).unwrap();
    tokio::spawn(conn.clone().drive());
    conn.connect_with(private).unwrap();
    ch.expect(event::ESTABLISHED, t, "established").await.map(drop)?;
    Ok((ch, conn, inbox, pd))
}

/// The connect proof for a session, made now.
fn proof_now(id: [u8; 16], secret: [u8; 16]) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    rdax_proto::rdma::ConnectProof::new(id, &secret, now).encode().to_vec()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
}

/// A daemon on the lab's device-DAX namespace (formatted afresh), serving RDMA on the server IP.
fn devdax_daemon(dir: &std::path::Path, extra: &[&str]) -> Daemon {
    let dev = env("RDAX_LAB_DEVDAX");
    let out = rdaxctl().args(["mkpool", &dev, "--force"]).output().unwrap();
    assert!(out.status.success(), "mkpool {dev}: {}", String::from_utf8_lossy(&out.stderr));
    let rdma = format!("{}:0", env("RDAX_LAB_SERVER_IP"));
    let mut args = vec!["--pool", &dev, "--rdma-listen", &rdma];
    args.extend_from_slice(extra);
    let d = Daemon::start(dir, &args);
    assert!(!d.rdma.is_empty(), "no RDMA endpoint:\n{}", d.log());
    d
}

async fn rdma_session(c: &Client, name: &str, ignore_recalls: bool) -> Session {
    let opts = SessionOptions {
        client_name: name.into(),
        ignore_recalls,
        transport: Transport::Rdma,
        rdma_source: Some(env("RDAX_LAB_CLIENT_IP").parse().unwrap()),
        ..Default::default()
    };
    c.open_session_with(opts).await.unwrap()
}

async fn next_notice(s: &mut Session) -> SessionNotice {
    tokio::time::timeout(Duration::from_secs(30), s.next_notice())
        .await
        .expect("a notice in time")
        .expect("session alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_write_flush_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = devdax_daemon(dir.path(), &[]);
    let c = client(&d).await;
    let info = c.info().await.unwrap();
    assert_eq!(info.mode, "device-dax");
    let r = info.rdma.unwrap();
    assert_eq!((r.state.as_str(), r.keys.as_str()), ("serving", "memory-window"), "{r:?}");
    println!("rdma: device {} keys {} endpoint {}", r.device, r.keys, r.endpoint);

    const LEN: usize = 16 << 20;
    let obj = c.object("lab", "e2e").unwrap();
    obj.create(LEN as u64).await.unwrap();
    let s = rdma_session(&c, "e2e", false).await;
    let l = s.acquire("lab", "e2e", 0, LEN as u64, LeaseMode::ReadWrite).await.unwrap();
    assert!(l.is_rdma());
    assert!(l.segments().iter().all(|g| g.rdma.is_some_and(|(_, rkey)| rkey != 0)), "{:?}", l.segments());
    let data = pattern(LEN, 0x5a);
    l.write(0, &data).await.unwrap();
    l.flush(0, LEN as u64).await.unwrap();
    let back = l.read(0, LEN as u64).await.unwrap();
    assert!(back == data, "RDMA READ returned other bytes than RDMA WRITE wrote");
    // The daemon's own view (gRPC read of the pool) agrees.
    assert!(obj.read(0, LEN as u64).await.unwrap() == data, "the pool holds other bytes");
    // Zero-copy from and into registered buffers, through the same lease.
    let mut b = s.rdma_buffer(1 << 20).await.unwrap();
    b.as_mut_slice().copy_from_slice(&pattern(1 << 20, 0xc3));
    let (r, b) = l.write_buf(3 << 20, b, 0..1 << 20).await;
    r.unwrap();
    let mut back = s.rdma_buffer(1 << 20).await.unwrap();
    back.as_mut_slice().fill(0);
    let (r, back) = l.read_buf(3 << 20, back, 0..1 << 20).await;
    r.unwrap();
    assert!(back.as_slice() == b.as_slice(), "zero-copy READ returned other bytes than zero-copy WRITE wrote");
    l.write_persist(3 << 20, &data[3 << 20..4 << 20]).await.unwrap();
    // A read lease over the same range sees them too (a second lease on the same connection).
    let ro = s.acquire("lab", "e2e", 4096, 8192, LeaseMode::Read).await.unwrap();
    assert_eq!(ro.read(4096, 8192).await.unwrap(), &data[4096..12288]);
    ro.release().await.unwrap();
    l.release().await.unwrap();
    s.close().await.unwrap();
    // The written bytes survive a restart (they were flushed, and the pool is closed cleanly).
    drop(c);
    let mut d = d;
    d.restart();
    let c = client(&d).await;
    assert!(c.object("lab", "e2e").unwrap().read(0, LEN as u64).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_cooperative_recall() {
    let dir = tempfile::tempdir().unwrap();
    // A long break timeout: if the holder did not return the lease, the truncate would wait it out.
    let d = devdax_daemon(dir.path(), &["--lease-break-timeout-ms", "60000"]);
    let c = client(&d).await;
    let obj = c.object("lab", "recall").unwrap();
    obj.create(8 << 20).await.unwrap();
    let mut s = rdma_session(&c, "cooperative", false).await;
    let l = s.acquire("lab", "recall", 0, 8 << 20, LeaseMode::ReadWrite).await.unwrap();
    let data = pattern(8 << 20, 1);
    l.write_persist(0, &data).await.unwrap();
    let t0 = std::time::Instant::now();
    obj.resize(2 << 20).await.unwrap();
    let took = t0.elapsed();
    match next_notice(&mut s).await {
        SessionNotice::LeaseRecalled { lease_id, .. } => assert_eq!(lease_id, l.id()),
        n => panic!("expected a recall, got {n:?}"),
    }
    assert!(took < Duration::from_secs(60), "the truncate waited for the break deadline: the lease was not returned");
    assert!(!l.is_active());
    let e = l.write(0, b"late").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked);
    let log = d.log();
    assert!(log.contains("lease released"), "{log}");
    assert!(!log.contains("lease revoked"), "a cooperative holder must not be revoked:\n{log}");
    assert!(log.contains("RDMA keys invalidated") && log.contains("fenced=false"), "{log}");
    assert!(d.metric("rdax_rdma_keys_total") >= 1.0);
    assert!(d.metric("rdax_rdma_invalidations_total") >= 1.0);
    assert_eq!(d.metric("rdax_rdma_fences_total"), 0.0, "a returned lease needs no fence");
    // Re-acquire after the layout change: the kept prefix is intact.
    let l2 = s.reacquire(&l).await;
    assert!(l2.is_err(), "the old range reaches past the new size");
    let l2 = s.acquire("lab", "recall", 0, 2 << 20, LeaseMode::Read).await.unwrap();
    assert!(l2.read(0, 2 << 20).await.unwrap() == data[..2 << 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_revoked_unresponsive_client_gets_remote_access_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = devdax_daemon(dir.path(), &["--lease-break-timeout-ms", "1000"]);
    d.allow("not returned before the break deadline");
    let c = client(&d).await;
    let obj = c.object("lab", "revoke").unwrap();
    obj.create(1 << 20).await.unwrap();
    // A client that ignores recalls and keeps writing after being told its lease is revoked.
    let mut s = rdma_session(&c, "unresponsive", true).await;
    let l = s.acquire("lab", "revoke", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    let before = pattern(1 << 20, 0x11);
    l.write_persist(0, &before).await.unwrap();

    // Recall through the admin API; the holder does not answer; at the break deadline the
    // daemon revokes, invalidates the window and drains.
    c.revoke_lease(l.id(), false).await.unwrap();
    loop {
        match next_notice(&mut s).await {
            SessionNotice::LeaseRecalled { .. } => continue,
            SessionNotice::LeaseRevoked { lease_id, .. } => {
                assert_eq!(lease_id, l.id());
                break;
            }
            n => panic!("unexpected {n:?}"),
        }
    }
    poll(Duration::from_secs(30), "the lease to drain", || {
        let log = d.log();
        log.contains(&format!("lease={}", l.id())).then_some(()).filter(|_| log.contains("RDMA keys invalidated"))
    });
    // Its RDMA WRITE with the old key now fails on the client with a remote access error...
    let after = pattern(1 << 20, 0x77);
    let e = l.write(0, &after).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "{e}");
    assert!(e.to_string().contains("remote access error"), "{e}\ndaemon log:\n{}", d.log());
    // ...and not one byte reached the pool.
    assert!(obj.read(0, 1 << 20).await.unwrap() == before, "a revoked client's RDMA WRITE changed the pool");

    // The session reconnects and gets a fresh, working lease.
    let l2 = s.acquire("lab", "revoke", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    l2.write_persist(0, &after).await.unwrap();
    assert!(obj.read(0, 1 << 20).await.unwrap() == after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM with an fs-DAX mount (deploy/lab/rdma-lab.sh)"]
async fn fsdax_pool_refuses_rdma_and_serves_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = env("RDAX_LAB_FSDAX");
    let pool = format!("{mnt}/rdax.pool");
    let _ = std::fs::remove_file(&pool);
    let rdma = format!("{}:0", env("RDAX_LAB_SERVER_IP"));
    let d = Daemon::start(dir.path(), &["--pool", &pool, "--rdma-listen", &rdma]);
    d.allow("RDMA unavailable");
    let c = client(&d).await;
    let info = c.info().await.unwrap();
    assert_eq!(info.mode, "fs-dax");
    let r = info.rdma.unwrap();
    assert_eq!(r.state, "unavailable", "{r:?}");
    for w in ["filesystem-DAX", "long-term pins", "on-demand paging", "device-DAX"] {
        assert!(r.detail.contains(w), "the refusal should explain ({w}): {}", r.detail);
    }
    println!("fs-dax refusal: {}", r.detail);
    let log = d.log();
    assert_eq!(log.matches("RDMA unavailable").count(), 1, "{log}");
    assert!(d.rdma.is_empty());

    let obj = c.object("lab", "fsdax").unwrap();
    obj.create(4 << 20).await.unwrap();
    let forced = rdma_session(&c, "forced", false).await;
    let e = forced.acquire("lab", "fsdax", 0, 4096, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("filesystem-DAX"), "{e}");
    // TCP still works on the same pool.
    let s = c.open_session("tcp").await.unwrap();
    let l = s.acquire("lab", "fsdax", 0, 4 << 20, LeaseMode::ReadWrite).await.unwrap();
    assert!(!l.is_rdma());
    let data = pattern(4 << 20, 9);
    l.write_persist(0, &data).await.unwrap();
    assert!(l.read(0, 4 << 20).await.unwrap() == data);
}

/// A client that knows only the documented protocol (docs/data-plane.md): its own rdma_cm
/// connection and queue pair, HELLO by hand, keys from `Leases.Acquire` for its session, raw
/// RDMA WRITE/READ and a FLUSH frame — no SDK data path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_raw_verbs_client_with_the_documented_protocol() {
    use rdax_proto::dataplane::Status;
    use rdax_proto::rdma::{Msg, Op};
    use rdax_verbs::{RegBuf, Wr};
    use std::net::SocketAddr;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let d = devdax_daemon(dir.path(), &[]);
    let c = client(&d).await;
    let obj = c.object("lab", "raw").unwrap();
    obj.create(1 << 20).await.unwrap();
    // The session (kept alive by the SDK handle; any gRPC client could do this).
    let s = c.open_session("raw verbs").await.unwrap();
    let sid: rdax_proto::model::SessionId = s.id().parse().unwrap();
    // The session's secret, as `rdaxctl hold-session --secret-file` would hand it over.
    let secret = s.secret();

    // Connect with rdma_cm to the endpoint Pool.Info names, the connect request carrying the
    // proof of the secret (docs/data-plane.md).
    let ep: SocketAddr = c.info().await.unwrap().rdma.unwrap().endpoint.parse().unwrap();
    let t = Duration::from_secs(10);
    let (_ch, conn, mut inbox, pd) = raw_connect(ep, &proof_now(sid.0, secret.0)).await.unwrap();
    let _armed = conn.hold_armed();
    let mut call = async |m: Msg| {
        conn.exec(Wr::Send(m.encode()), None).await.unwrap();
        let raw = tokio::time::timeout(t, inbox.recv()).await.unwrap().unwrap();
        Msg::decode(&raw).unwrap()
    };

    // Keys before HELLO: refused, with the reason.
    let e = c.acquire_raw(s.id(), "lab", "raw", 0, 1 << 20, LeaseMode::ReadWrite, true).await.unwrap_err();
    assert!(e.to_string().contains("has no RDMA connection"), "{e}");
    let mut hello = Msg::request(Op::Hello, 1);
    hello.session = secret.0;
    let r = call(hello).await;
    assert_eq!((r.op, r.status, r.req_id), (Op::HelloReply, Status::Ok, 1));

    let g = c.acquire_raw(s.id(), "lab", "raw", 0, 1 << 20, LeaseMode::ReadWrite, true).await.unwrap();
    let seg = &g.segments[0];
    assert!(seg.rkey != 0 && seg.length == 1 << 20, "{g:?}");
    let buf = Arc::new(RegBuf::new(&pd, 1 << 20).unwrap());
    let data = pattern(1 << 20, 0x3c);
    // SAFETY: no request uses the buffer yet.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr(0), data.len()) };
    let w = Wr::Write { laddr: buf.addr(), lkey: buf.lkey(), len: 1 << 20, raddr: seg.rdma_addr, rkey: seg.rkey };
    conn.exec(w, Some(buf.clone())).await.unwrap();
    let mut flush = Msg::request(Op::Flush, 2);
    (flush.lease, flush.offset, flush.len) = (g.lease_id, 0, 1 << 20);
    let r = call(flush).await;
    assert_eq!((r.op, r.status, r.req_id), (Op::FlushReply, Status::Ok, 2));
    assert_eq!(d.metric("rdax_rdma_flushes_total"), 1.0);
    assert!(obj.read(0, 1 << 20).await.unwrap() == data, "the raw client's RDMA WRITE did not land");
    let back = Arc::new(RegBuf::new(&pd, 1 << 20).unwrap());
    let rd = Wr::Read { laddr: back.addr(), lkey: back.lkey(), len: 1 << 20, raddr: seg.rdma_addr, rkey: seg.rkey };
    conn.exec(rd, Some(back.clone())).await.unwrap();
    // SAFETY: the READ completed; nothing else uses the buffer.
    assert!(unsafe { std::slice::from_raw_parts(back.ptr(0), 1 << 20) } == &data[..]);

    // Released: the key dies on the NIC.
    c.release_lease(s.id(), g.lease_id).await.unwrap();
    poll(Duration::from_secs(30), "the keys to be invalidated", || {
        d.log().contains("RDMA keys invalidated").then_some(())
    });
    let w = Wr::Write { laddr: buf.addr(), lkey: buf.lkey(), len: 4096, raddr: seg.rdma_addr, rkey: seg.rkey };
    let e = conn.exec(w, Some(buf.clone())).await.unwrap_err();
    assert!(e.is_remote_access(), "{e}");
}

/// The RDMA listener's edges: a connect request without a valid proof of a session secret
/// (none, a wrong secret, a replay) is rejected before the daemon allocates a queue pair; a
/// HELLO with the listed session id, or another session's secret, is BAD_SESSION; a peer that
/// never says HELLO is closed after the op timeout; a frame with a bad magic gets a MALFORMED
/// reply; a second HELLO is answered with HELLO_REPLY MALFORMED; FLUSH of a released lease is
/// REVOKED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_rdma_peers_are_bounded_and_answered() {
    use rdax_proto::dataplane::Status;
    use rdax_proto::rdma::{Msg, Op};
    use rdax_verbs::{Wr, event};
    use std::net::SocketAddr;

    let dir = tempfile::tempdir().unwrap();
    // 1 MiB of registered RDMA memory per session, for the cap check in part 3.
    let cfg = dir.path().join("limits.toml");
    std::fs::write(&cfg, "[limits]\nmax_rdma_bytes_per_session = \"1M\"\n").unwrap();
    let d = devdax_daemon(dir.path(), &["--data-op-timeout-ms", "1500", "--config", cfg.to_str().unwrap()]);
    let c = client(&d).await;
    c.object("lab", "edges").unwrap().create(1 << 20).await.unwrap();
    let s = c.open_session("edges").await.unwrap();
    let sid: rdax_proto::model::SessionId = s.id().parse().unwrap();
    let secret = s.secret();
    let ep: SocketAddr = c.info().await.unwrap().rdma.unwrap().endpoint.parse().unwrap();
    let t = Duration::from_secs(10);
    let proof = |id: [u8; 16], key: [u8; 16]| proof_now(id, key);
    let try_connect =
        async |private: Vec<u8>| raw_connect(ep, &private).await.map(|(ch, conn, inbox, _)| (ch, conn, inbox));
    let connect = async || try_connect(proof(sid.0, secret.0)).await.unwrap();
    // The daemon's queue pairs, as the kernel counts them: `rdma resource show qp` names the
    // task that made each one (a tokio worker thread, so its thread id, not the process id).
    let daemon_qps = || {
        let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let out = std::process::Command::new("rdma").args(["resource", "show", "qp"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.windows(2).any(|p| p[0] == "pid" && tasks.iter().any(|t| t == p[1]))
            })
            .count()
    };
    // 0. No proof, a proof made with the listed id instead of the secret, a replayed proof:
    //    each rejected, with no queue pair made for it.
    let qps0 = daemon_qps();
    let good = proof(sid.0, secret.0);
    let (_ch, first, _inbox) = try_connect(good.clone()).await.unwrap();
    for (what, private) in
        [("no proof", Vec::new()), ("the id as the key", proof(sid.0, sid.0)), ("a replayed proof", good)]
    {
        let e = try_connect(private).await.err();
        assert!(e.is_some_and(|e| e.to_string().contains("REJECTED")), "{what}: not rejected");
    }
    assert_eq!(d.metric("rdax_rdma_connects_rejected_total"), 3.0);
    assert_eq!(daemon_qps(), qps0 + 1, "only the proven connection has a queue pair on the daemon");
    // A proven connection presenting the listed id, or another session's secret, in HELLO.
    {
        let _armed = first.hold_armed();
        let mut inbox = _inbox;
        let mut hello = Msg::request(Op::Hello, 1);
        hello.session = sid.0;
        first.exec(Wr::Send(hello.encode()), None).await.unwrap();
        let r = Msg::decode(&tokio::time::timeout(t, inbox.recv()).await.unwrap().unwrap()).unwrap();
        assert_eq!((r.op, r.status), (Op::HelloReply, Status::BadSession), "the session id is no credential");
    }
    let other = c.open_session("other").await.unwrap();
    {
        let (_ch, conn, mut inbox) = connect().await;
        let _armed = conn.hold_armed();
        let mut hello = Msg::request(Op::Hello, 1);
        hello.session = other.secret().0;
        conn.exec(Wr::Send(hello.encode()), None).await.unwrap();
        let r = Msg::decode(&tokio::time::timeout(t, inbox.recv()).await.unwrap().unwrap()).unwrap();
        assert_eq!(r.status, Status::BadSession, "a connection proven for one session cannot HELLO as another");
    }
    // 1. Silent: no HELLO. The daemon disconnects it after the op timeout.
    let (ch, _conn, _inbox) = connect().await;
    let t0 = std::time::Instant::now();
    let ev = ch.expect(event::DISCONNECTED, Duration::from_secs(20), "the daemon to drop a silent peer").await.unwrap();
    drop(ev);
    assert!(t0.elapsed() >= Duration::from_millis(1400), "dropped after {:?}, before the HELLO deadline", t0.elapsed());
    // 2. A bad magic: MALFORMED, with the request id, then the connection ends.
    let (_ch, conn, mut inbox) = connect().await;
    let _armed = conn.hold_armed();
    let mut junk = Msg::request(Op::Hello, 42).encode();
    junk[0] = b'X';
    conn.exec(Wr::Send(junk), None).await.unwrap();
    let r = Msg::decode(&tokio::time::timeout(t, inbox.recv()).await.unwrap().unwrap()).unwrap();
    assert_eq!((r.op, r.status, r.req_id), (Op::HelloReply, Status::Malformed, 42));
    drop(_armed);
    // 3. HELLO, a lease, its release; FLUSH of it is REVOKED; a second HELLO is refused.
    let (_ch, conn, mut inbox) = connect().await;
    let _armed = conn.hold_armed();
    let mut call = async |m: Msg| {
        conn.exec(Wr::Send(m.encode()), None).await.unwrap();
        Msg::decode(&tokio::time::timeout(t, inbox.recv()).await.unwrap().unwrap()).unwrap()
    };
    let mut hello = Msg::request(Op::Hello, 1);
    hello.session = secret.0;
    assert_eq!(call(hello).await.status, Status::Ok);
    let g = c.acquire_raw(s.id(), "lab", "edges", 0, 1 << 20, LeaseMode::ReadWrite, true).await.unwrap();
    // The session has its 1 MiB registered: one more RDMA lease is over the cap, by name.
    let e = c.acquire_raw(s.id(), "lab", "edges", 0, 4096, LeaseMode::Read, true).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("limits.max_rdma_bytes_per_session"), "{e}");
    c.release_lease(s.id(), g.lease_id).await.unwrap();
    let mut flush = Msg::request(Op::Flush, 2);
    (flush.lease, flush.offset, flush.len) = (g.lease_id, 0, 4096);
    let r = call(flush).await;
    assert_eq!((r.op, r.status), (Op::FlushReply, Status::Revoked));
    let mut again = Msg::request(Op::Hello, 3);
    again.session = secret.0;
    let r = call(again).await;
    assert_eq!((r.op, r.status, r.req_id), (Op::HelloReply, Status::Malformed, 3));
}

/// A client that abandons an RDMA `Acquire` while its window is being bound leaves no binding
/// and no pin: the grant is given back when the binder finishes, and a truncate of the range
/// then completes at once (a leaked pin would hold it to the drain timeout).
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_a_cancelled_rdma_acquire_leaves_no_binding() {
    let dir = tempfile::tempdir().unwrap();
    let d = devdax_daemon(dir.path(), &["--lease-break-timeout-ms", "60000"]);
    let c = client(&d).await;
    let mut t = Testing::new(&d).await;
    let obj = c.object("lab", "cancel").unwrap();
    obj.create(8 << 20).await.unwrap();
    let s = rdma_session(&c, "abandoner", false).await;
    // Make the session's RDMA connection (the SDK connects on its first acquire).
    s.acquire("lab", "cancel", 0, 4096, LeaseMode::Read).await.unwrap().release().await.unwrap();
    let invalidations = d.metric("rdax_rdma_invalidations_total");
    t.set("rdma.bind", "pause").await;
    let mut raw = rdax_proto::pb::leases_client::LeasesClient::new(d.channel().await);
    let req = rdax_proto::pb::AcquireRequest {
        session_id: s.id().to_string(),
        object: Some(rdax_proto::pb::ObjectRef { namespace: "lab".into(), name: "cancel".into() }),
        offset: 0,
        length: 8 << 20,
        mode: rdax_proto::pb::LeaseMode::ReadWrite as i32,
        transport: rdax_proto::pb::Transport::Rdma as i32,
        exclusive: false,
    };
    let call = tokio::spawn(async move { raw.acquire(req).await });
    t.paused_at("rdma.bind").await;
    call.abort();
    let _ = call.await;
    t.handler_dropped().await;
    t.set("rdma.bind", "off").await;
    poll(Duration::from_secs(30), "the abandoned grant to be given back and drained", || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let c = c.clone();
        std::thread::spawn(move || rt.block_on(async { c.leases(None).await.unwrap().is_empty() }))
            .join()
            .unwrap()
            .then_some(())
    });
    assert!(d.metric("rdax_rdma_invalidations_total") > invalidations, "the keys made for it were invalidated");
    assert!(d.log().contains("grant not delivered"), "{}", d.log());
    t.clean("after the cancelled acquire").await;
    let t0 = std::time::Instant::now();
    obj.resize(4096).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the truncate waited {:?}: something still pins the range",
        t0.elapsed()
    );
    // The session's RDMA connection still serves a fresh lease.
    obj.resize(8 << 20).await.unwrap();
    let l = s.acquire("lab", "cancel", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    let data = pattern(1 << 20, 9);
    l.write_persist(0, &data).await.unwrap();
    assert!(obj.read(0, 1 << 20).await.unwrap() == data);
}

/// Teardown failures injected at each step of the RDMA key teardown: where the daemon cannot
/// prove the keys dead (a failed fence, deallocation or deregistration), the lease is
/// quarantined and its blocks are never reused; a failed invalidation alone is covered by the
/// fence and drains normally.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the RDMA lab VM (deploy/lab/rdma-lab.sh)"]
async fn devdax_failed_teardown_quarantines_the_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = devdax_daemon(dir.path(), &[]);
    for a in [
        "lease quarantined",
        "quarantining them until restart",
        "fencing the client's queue pair",
        "RDMA queue pair fenced",
    ] {
        d.allow(a);
    }
    let c = client(&d).await;
    let mut t = Testing::new(&d).await;
    let cases: [(&str, &[&str], bool); 4] = [
        ("invalidation fails, the fence works", &["rdma.invalidate"], false),
        ("invalidation and fence fail", &["rdma.invalidate", "rdma.fence"], true),
        ("deallocating a window fails", &["rdma.dealloc"], true),
        ("deregistering a region fails", &["rdma.dereg"], true),
    ];
    let mut quarantined: Vec<(u64, u64)> = Vec::new();
    for (i, (what, points, quarantines)) in cases.into_iter().enumerate() {
        let name = format!("q{i}");
        let obj = c.object("lab", &name).unwrap();
        obj.create(1 << 20).await.unwrap();
        let s = rdma_session(&c, &name, false).await;
        let l = s.acquire("lab", &name, 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
        l.write_persist(0, &pattern(1 << 20, i as u8)).await.unwrap();
        let ranges: Vec<(u64, u64)> = l.segments().iter().map(|g| (g.target.unwrap().0, g.len)).collect();
        for p in points {
            t.set(p, "1*return").await;
        }
        let id = l.id();
        l.release().await.unwrap();
        let want = if quarantines { "quarantined" } else { "gone" };
        poll(Duration::from_secs(30), &format!("{what}: the lease to be {want}"), || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let c = c.clone();
            let list = std::thread::spawn(move || rt.block_on(async { c.leases(None).await.unwrap() })).join().unwrap();
            let me = list.iter().find(|x| x.lease_id == id);
            match (quarantines, me) {
                (true, Some(x)) if x.state == "quarantined" => Some(()),
                (false, None) => Some(()),
                _ => None,
            }
        });
        // The delete goes ahead either way; a quarantined lease's blocks stay out of use.
        obj.delete().await.unwrap();
        if quarantines {
            quarantined.extend(&ranges);
        }
        let st = c.stats().await.unwrap();
        let want_blocks: u64 = quarantined.iter().map(|r| r.1 / 4096).sum();
        assert_eq!(st.quarantined_blocks, want_blocks, "{what}: {st:?}");
        assert_eq!(d.metric("rdax_pool_bytes{state=\"quarantined\"}"), (want_blocks * 4096) as f64, "{what}");
        t.clean(what).await;
    }
    // Hand every free block to a new object: none of them may be a quarantined one.
    let free = c.stats().await.unwrap().free_blocks * 4096;
    let fill = c.object("lab", "fill").unwrap();
    fill.create(free).await.unwrap();
    let s = c.open_session("filler").await.unwrap();
    let l = s.acquire("lab", "fill", 0, free, LeaseMode::ReadWrite).await.unwrap();
    for g in l.segments() {
        let (p, n) = (g.target.unwrap().0, g.len);
        for &(q, m) in &quarantined {
            assert!(p + n <= q || q + m <= p, "a quarantined block [{q}, +{m}) was handed out again at [{p}, +{n})");
        }
    }
    assert_eq!(d.metric("rdax_lease_quarantined_total"), 3.0);
}
