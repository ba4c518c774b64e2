//! Layout leases over the TCP data plane, against the real daemon process.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Raw, client};
use rdax_client::{ErrorKind, LeaseMode, SessionNotice, SessionOptions};
use rdax_proto::dataplane::{self as wire, Op, Request, Status};
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

async fn next_notice(s: &mut rdax_client::Session) -> SessionNotice {
    tokio::time::timeout(Duration::from_secs(20), s.next_notice())
        .await
        .expect("a notice in time")
        .expect("session alive")
}

fn session_bytes(s: &rdax_client::Session) -> [u8; 16] {
    s.secret().0
}

#[tokio::test(flavor = "multi_thread")]
async fn cooperative_recall_returns_the_lease_and_the_truncate_completes() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let a = client(&d).await;
    let mut sa = a.open_session("A").await.unwrap();
    a.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let lease = sa.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    assert!(lease.segments().iter().all(|s| s.target.is_some()), "a read-write grant allocates");
    lease.write_persist(100, b"written over the data plane").await.unwrap();
    assert_eq!(lease.read(100, 27).await.unwrap(), b"written over the data plane");
    // Visible through the control plane too: the same pool bytes.
    assert_eq!(a.object("ns", "x").unwrap().read(100, 27).await.unwrap(), b"written over the data plane");
    let b = client(&d).await;
    let t0 = Instant::now();
    b.object("ns", "x").unwrap().resize(4096).await.unwrap();
    let took = t0.elapsed();
    assert!(
        matches!(next_notice(&mut sa).await, SessionNotice::LeaseRecalled { lease_id, .. } if lease_id == lease.id())
    );
    assert!(
        took < Duration::from_secs(4),
        "a cooperative holder returns well before the 5 s break deadline ({took:?})"
    );
    let e = lease.write(0, b"late").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "{e}");
    // The key itself is dead on the wire.
    let seg = lease.segments()[0].target.unwrap();
    let (mut raw, st) = Raw::connect(&d.data, session_bytes(&sa)).await;
    assert_eq!(st, Status::Ok);
    assert_eq!(raw.op(Op::Read, seg.1, lease.generation(), seg.0, &[], 8).await, Status::Revoked);
    // Re-acquire what is left after the layout change.
    let again = sa.acquire("ns", "x", 0, 4096, LeaseMode::Read).await.unwrap();
    assert_eq!(again.read(100, 7).await.unwrap(), b"written");
    assert!(again.generation() > lease.generation(), "generations only grow");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unresponsive_holder_is_revoked_at_the_deadline() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--lease-break-timeout-ms", "700"]);
    d.allow("not returned before the break deadline");
    let a = client(&d).await;
    let mut sa = a
        .open_session_with(SessionOptions { client_name: "deaf".into(), ignore_recalls: true, ..Default::default() })
        .await
        .unwrap();
    a.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let lease = sa.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    let seg = lease.segments()[0].target.unwrap();
    let b = client(&d).await;
    let t0 = Instant::now();
    b.object("ns", "x").unwrap().resize(0).await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(650), "the truncate waits for the deadline ({took:?})");
    assert!(took < Duration::from_secs(5), "and not much longer ({took:?})");
    let mut saw_revoked = false;
    for _ in 0..2 {
        if let SessionNotice::LeaseRevoked { lease_id, .. } = next_notice(&mut sa).await {
            saw_revoked |= lease_id == lease.id();
        }
    }
    assert!(saw_revoked);
    let (mut raw, _) = Raw::connect(&d.data, session_bytes(&sa)).await;
    assert_eq!(raw.op(Op::Write, seg.1, lease.generation(), seg.0, &[1; 16], 16).await, Status::Revoked);
    assert_eq!(lease.read(0, 1).await.unwrap_err().kind(), ErrorKind::Revoked);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_forbidden_operation_is_refused_and_the_daemon_stays_up() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    let sa = c.open_session("A").await.unwrap();
    let sb = c.open_session("B").await.unwrap();
    c.object("ns", "x").unwrap().create(64 << 10).await.unwrap();
    let rw = sa.acquire("ns", "x", 0, 8192, LeaseMode::ReadWrite).await.unwrap();
    let ro = sa.acquire("ns", "x", 8192, 8192, LeaseMode::Read).await.unwrap();
    let (pool, key) = rw.segments()[0].target.unwrap();
    let g = rw.generation();
    let (mut a, st) = Raw::connect(&d.data, session_bytes(&sa)).await;
    assert_eq!(st, Status::Ok);
    assert_eq!(a.op(Op::Write, key, g, pool, &[9; 8], 8).await, Status::Ok);
    assert_eq!(a.op(Op::Read, key, g + 1, pool, &[], 8).await, Status::StaleGeneration);
    assert_eq!(a.op(Op::Read, [0x42; 16], g, pool, &[], 8).await, Status::UnknownKey, "forged key");
    assert_eq!(a.op(Op::Read, key, g, pool + 8190, &[], 8).await, Status::OutOfRange);
    assert_eq!(a.op(Op::Read, key, g, pool.wrapping_sub(1), &[], 8).await, Status::OutOfRange);
    let (ro_pool, ro_key) =
        ro.segments()[0].target.or(ro.segments().last().unwrap().target).map_or((0, [0; 16]), |t| t);
    if ro_key != [0; 16] {
        assert_eq!(a.op(Op::Write, ro_key, ro.generation(), ro_pool, &[1; 4], 4).await, Status::Mode);
    }
    // Another session presenting A's key.
    let (mut b, _) = Raw::connect(&d.data, session_bytes(&sb)).await;
    assert_eq!(b.op(Op::Read, key, g, pool, &[], 8).await, Status::WrongSession);
    // No HELLO, a bad session, a malformed frame and an oversized length close the connection.
    let (_, st) = Raw::connect(&d.data, [0xEE; 16]).await;
    assert_eq!(st, Status::BadSession);
    let mut s = tokio::net::TcpStream::connect(&d.data).await.unwrap();
    s.write_all(&Request { op: Op::Read, flags: 0, id: 3, key, generation: g, offset: pool, len: 8 }.encode())
        .await
        .unwrap();
    assert_eq!(Raw(s).status(3).await, Status::NoHello);
    let mut junk = [0xFFu8; wire::REQ_LEN];
    junk[4..8].copy_from_slice(&9u32.to_le_bytes());
    b.0.write_all(&junk).await.unwrap();
    assert_eq!(b.status(9).await, Status::Malformed, "the reply echoes the malformed header's request id");
    // A HELLO with its unused fields set is not a HELLO of ours.
    let mut s = tokio::net::TcpStream::connect(&d.data).await.unwrap();
    let hello = Request {
        op: Op::Hello,
        flags: 0,
        id: 5,
        key: session_bytes(&sa),
        generation: wire::VERSION,
        offset: 1,
        len: 0,
    };
    s.write_all(&hello.encode()).await.unwrap();
    assert_eq!(Raw(s).status(5).await, Status::Malformed);
    let (mut big, _) = Raw::connect(&d.data, session_bytes(&sa)).await;
    let r = Request { op: Op::Read, flags: 0, id: 4, key, generation: g, offset: pool, len: wire::MAX_OP_LEN + 1 };
    big.0.write_all(&r.encode()).await.unwrap();
    assert_eq!(big.status(4).await, Status::TooLarge);
    // The good connection and the daemon are unharmed; nothing was written by the refusals.
    assert_eq!(a.op(Op::Read, key, g, pool, &[], 8).await, Status::Ok);
    assert_eq!(c.object("ns", "x").unwrap().read(0, 8).await.unwrap(), vec![9; 8]);
    assert_eq!(c.object("ns", "x").unwrap().read(8192, 4).await.unwrap(), vec![0; 4]);
    c.info().await.unwrap();
}

#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread")]
async fn dma_held_mid_copy_drains_before_blocks_are_reused() {
    let dir = tmp();
    let d = Daemon::start_env(
        dir.path(),
        &["--lease-break-timeout-ms", "400"],
        &[("RDAX_FAILPOINTS", "dataplane.write.mid_copy=sleep(300)")],
    );
    d.allow("not returned before the break deadline");
    let c = client(&d).await;
    let sa = c
        .open_session_with(SessionOptions { client_name: "A".into(), ignore_recalls: true, ..Default::default() })
        .await
        .unwrap();
    let x = c.object("ns", "x").unwrap();
    x.create(2 * MIB).await.unwrap();
    let lease = sa.acquire("ns", "x", 0, 2 * MIB, LeaseMode::ReadWrite).await.unwrap();
    let old_segments: Vec<(u64, u64)> = lease.segments().iter().map(|s| (s.target.unwrap().0, s.len)).collect();
    // A writes tagged 64 KiB chunks in a loop; each is held mid-copy for 300 ms.
    let writer = tokio::spawn(async move {
        let mut seq = 0u64;
        loop {
            let mut tag = [0u8; 16];
            tag[..8].copy_from_slice(b"WRITER-A");
            tag[8..].copy_from_slice(&seq.to_le_bytes());
            let chunk: Vec<u8> = tag.iter().cycle().take(64 << 10).copied().collect();
            let off = (seq * (64 << 10)) % (2 * MIB);
            if let Err(e) = lease.write(off, &chunk).await {
                return (seq, e.kind());
            }
            seq += 1;
        }
    });
    // Truncate while A's writes are in flight (wait until one is pinned).
    common::poll(Duration::from_secs(10), "a pinned write", || {
        let c = c.clone();
        let pinned = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async { c.leases(None).await.unwrap().iter().any(|l| l.pins > 0) })
        });
        pinned.join().unwrap().then_some(())
    });
    x.resize(0).await.unwrap();
    // The truncate returned only after A's writes drained. Give the freed blocks to C.
    let y = c.object("ns", "y").unwrap();
    let free = c.stats().await.unwrap().free_blocks * 4096;
    y.create(free).await.unwrap();
    let sc = c.open_session("C").await.unwrap();
    let lc = sc.acquire("ns", "y", 0, free, LeaseMode::ReadWrite).await.unwrap();
    let reused = lc.segments().iter().any(|s| {
        let (p, n) = (s.target.unwrap().0, s.len);
        old_segments.iter().any(|&(q, m)| p < q + m && q < p + n)
    });
    assert!(reused, "the test must hand A's old blocks to C");
    let (seq, kind) = tokio::time::timeout(Duration::from_secs(20), writer).await.unwrap().unwrap();
    assert!(seq >= 1, "A wrote under its lease first");
    assert_eq!(kind, ErrorKind::Revoked);
    // C's object must hold no byte of A's: all zero (C has not written yet).
    let mut off = 0;
    while off < free {
        let n = (free - off).min(8 * MIB);
        let bytes = y.read(off, n).await.unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "A's bytes reached reused blocks near offset {off}");
        off += n;
    }
    lc.write_persist(0, b"C").await.unwrap();
}

/// The daemon's `Testing` service (testing builds).
#[cfg(feature = "testing")]
async fn testing(d: &Daemon) -> rdax_proto::testing_pb::testing_client::TestingClient<common::Authed> {
    rdax_proto::testing_pb::testing_client::TestingClient::new(d.channel().await)
}

#[cfg(feature = "testing")]
async fn failpoint(d: &Daemon, name: &str, action: &str) {
    let req = rdax_proto::testing_pb::SetFailpointRequest { name: name.into(), action: action.into() };
    testing(d).await.set_failpoint(req).await.unwrap();
}

#[cfg(feature = "testing")]
async fn paused_at(d: &Daemon, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = testing(d).await.list_failpoints(rdax_proto::testing_pb::ListFailpointsRequest {}).await.unwrap();
        if list.into_inner().failpoints.iter().any(|f| f.name == name && f.paused > 0) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing paused at {name}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread")]
async fn no_grant_overlaps_a_range_while_it_is_recalled() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--lease-break-timeout-ms", "800"]);
    d.allow("not returned before the break deadline");
    let c = client(&d).await;
    let sa = c
        .open_session_with(SessionOptions { client_name: "deaf".into(), ignore_recalls: true, ..Default::default() })
        .await
        .unwrap();
    c.object("ns", "x").unwrap().create(MIB).await.unwrap();
    let held = sa.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    // Hold the truncate just before its layout change, after the recall and revocation, so
    // that the range stays marked for as long as the test needs.
    failpoint(&d, "layout.before_change", "pause").await;
    let t_start = Instant::now();
    let truncating = {
        let c = c.clone();
        tokio::spawn(async move { c.object("ns", "x").unwrap().resize(4096).await.map(|s| s.size) })
    };
    let sb = c.open_session("B").await.unwrap();
    // While the holder is being recalled: outside the range, granted at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.leases(None).await.unwrap().iter().any(|l| l.state == "breaking") {
        assert!(Instant::now() < deadline, "recall did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    sb.acquire("ns", "x", 0, 4096, LeaseMode::Read).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(500), "an unrelated range must not wait ({:?})", t.elapsed());
    // Overlapping it: waits its whole bound (the break timeout) and fails with Unavailable.
    let t = Instant::now();
    let e = sb.acquire("ns", "x", 0, 8192, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(t.elapsed() >= Duration::from_millis(750), "refused after {:?}, before its bound", t.elapsed());
    // The truncate waits at the failpoint: by now the deaf holder was revoked at its deadline.
    paused_at(&d, "layout.before_change").await;
    assert!(t_start.elapsed() >= Duration::from_millis(750), "the deaf holder holds the truncate to the deadline");
    assert!(!truncating.is_finished());
    let (pool, key) = held.segments()[0].target.unwrap();
    let (mut raw, _) = Raw::connect(&d.data, session_bytes(&sa)).await;
    assert_eq!(raw.op(Op::Read, key, held.generation(), pool, &[], 8).await, Status::Revoked);
    failpoint(&d, "layout.before_change", "off").await;
    assert_eq!(truncating.await.unwrap().unwrap(), 4096);
    // After the change the range is gone.
    let e = sb.acquire("ns", "x", 0, 8192, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_session_loses_its_leases() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--session-ttl-ms", "400"]);
    let c = client(&d).await;
    let s = c.open_session("short").await.unwrap();
    c.object("ns", "x").unwrap().create(8192).await.unwrap();
    let l = s.acquire("ns", "x", 0, 8192, LeaseMode::ReadWrite).await.unwrap();
    let bytes = s.secret().0;
    let (pool, key) = l.segments()[0].target.unwrap();
    let g = l.generation();
    drop(s); // keepalives stop
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.leases(None).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the lease outlived its session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, st) = Raw::connect(&d.data, bytes).await;
    assert_eq!(st, Status::BadSession);
    // The lost session's key is dead: presented on another session's connection, it is
    // refused as revoked (a live key would be refused as belonging to another session).
    let other = c.open_session("other").await.unwrap();
    let (mut raw, st) = Raw::connect(&d.data, session_bytes(&other)).await;
    assert_eq!(st, Status::Ok);
    assert_eq!(raw.op(Op::Write, key, g, pool, &[7; 8], 8).await, Status::Revoked);
    assert_eq!(raw.op(Op::Read, key, g, pool, &[], 8).await, Status::Revoked);
}

#[test]
fn rdaxctl_lease_hold_list_and_revoke() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    assert!(d.ctl(&["create", "ns/x", "--size", "1M"]).status.success());
    let mut hold = d
        .rdaxctl()
        .args(["--json", "lease", "hold", "ns/x", "--rw"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lease: serde_json::Value = common::poll(Duration::from_secs(20), "the held lease to be listed", || {
        let out = d.ctl(&["--json", "lease", "list"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.first().cloned()
    });
    assert_eq!(lease["state"], "active");
    assert_eq!(lease["object"], "ns/x");
    assert_eq!(lease["mode"], "read-write");
    let id = lease["lease_id"].as_u64().unwrap().to_string();
    let out = d.ctl(&["lease", "revoke", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The holder honours the recall and exits.
    let st = common::poll(Duration::from_secs(20), "the holder to exit", || hold.try_wait().unwrap());
    assert!(st.success());
    let mut text = String::new();
    std::io::Read::read_to_string(hold.stdout.as_mut().unwrap(), &mut text).unwrap();
    assert!(text.contains("LeaseRecalled"), "{text}");
    let out = d.ctl(&["--json", "lease", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.as_array().unwrap().is_empty(), "{v}");
    assert_eq!(d.ctl(&["lease", "revoke", "999"]).status.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_recalls_held_leases_and_exits_cleanly() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    let mut s = c.open_session("holder").await.unwrap();
    c.object("ns", "x").unwrap().create(8192).await.unwrap();
    let l = s.acquire("ns", "x", 0, 8192, LeaseMode::ReadWrite).await.unwrap();
    l.write_persist(0, b"before shutdown").await.unwrap();
    let st = tokio::task::spawn_blocking(move || {
        let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
        (st, d)
    });
    let n = next_notice(&mut s).await;
    assert!(matches!(n, SessionNotice::LeaseRecalled { ref reason, .. } if reason.contains("shutting down")), "{n:?}");
    let (st, d) = st.await.unwrap();
    assert!(st.success(), "{}", d.log());
    assert!(d.log().contains("closed pool cleanly"), "{}", d.log());
    let out = common::rdaxctl().args(["fsck", d.pool_path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_stopped_client_cannot_keep_the_pool_open_at_shutdown() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &["--lease-break-timeout-ms", "300", "--shutdown-timeout-ms", "2000"]);
    d.allow("not returned before the break deadline");
    assert!(d.ctl(&["create", "ns/x", "--size", "1M"]).status.success());
    let mut hold = d
        .rdaxctl()
        .args(["lease", "hold", "ns/x", "--rw"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::poll(Duration::from_secs(20), "the held lease to be listed", || {
        let out = d.ctl(&["--json", "lease", "list"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (!v.as_array()?.is_empty()).then_some(())
    });
    // The holder stops responding (its process is stopped, its connections stay open).
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(hold.id() as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    let took = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(hold.id() as i32, libc::SIGCONT) };
    let _ = hold.kill();
    let _ = hold.wait();
    assert!(st.success(), "exit {st}\n{}", d.log());
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}\n{}", d.log());
    let log = d.log();
    assert!(log.contains("closed pool cleanly"), "{log}");
    assert!(!log.contains("leaving it for recovery"), "{log}");
    let d2 = Daemon::start(dir.path(), &[]);
    d2.allow("not returned before the break deadline"); // the same log file
    let out = d2.ctl(&["--json", "info"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["previous_shutdown_clean"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_steady_writer_is_served_and_a_stalled_one_is_cut() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--data-op-timeout-ms", "300"]);
    let c = client(&d).await;
    let sa = c.open_session("slow").await.unwrap();
    c.object("ns", "x").unwrap().create(4 * MIB).await.unwrap();
    let l = sa.acquire("ns", "x", 0, 4 * MIB, LeaseMode::ReadWrite).await.unwrap();
    let (pool, key) = l.segments()[0].target.unwrap();
    assert_eq!(l.segments()[0].len, 4 * MIB, "one segment");
    // 4 MiB in 256 KiB pieces every 100 ms: 1.6 s in all, far above the 300 ms op timeout,
    // but no wait is longer than it and the rate is well above 1 MiB/s.
    let (mut raw, _) = Raw::connect(&d.data, session_bytes(&sa)).await;
    let r = Request { op: Op::Write, flags: 0, id: 11, key, generation: l.generation(), offset: pool, len: 4 << 20 };
    raw.0.write_all(&r.encode()).await.unwrap();
    let t0 = Instant::now();
    for i in 0..16u8 {
        raw.0.write_all(&vec![i; 256 << 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(raw.status(11).await, Status::Ok, "a steady writer is not cut off");
    assert!(t0.elapsed() > Duration::from_millis(1500));
    assert_eq!(c.object("ns", "x").unwrap().read(15 * (256 << 10), 4).await.unwrap(), vec![15; 4]);
    // One that stops mid-payload loses its connection after the op timeout, and its pin.
    let (mut raw, _) = Raw::connect(&d.data, session_bytes(&sa)).await;
    let r = Request { op: Op::Write, flags: 0, id: 12, key, generation: l.generation(), offset: pool, len: 1 << 20 };
    raw.0.write_all(&r.encode()).await.unwrap();
    raw.0.write_all(&[7; 4096]).await.unwrap();
    let mut b = [0u8; 1];
    let got = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut raw.0, &mut b)).await;
    assert!(matches!(got, Ok(Ok(0)) | Ok(Err(_))), "the stalled connection was closed: {got:?}");
    common::poll(Duration::from_secs(10), "the pin to be released", || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let c = c.clone();
        let pins =
            std::thread::spawn(move || rt.block_on(async { c.leases(None).await.unwrap()[0].pins })).join().unwrap();
        (pins == 0).then_some(())
    });
}

#[test]
fn hold_session_reports_recalls_and_stays_up() {
    use std::io::BufRead;
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    assert!(d.ctl(&["create", "ns/x", "--size", "1M"]).status.success());
    let mut hold = d
        .rdaxctl()
        .args(["--json", "hold-session", "--name", "verbs-client"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(hold.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let sid = first["session_id"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(client(&d));
    // Another program holds a lease for that session, as a verbs client would.
    let g = rt.block_on(c.acquire_raw(&sid, "ns", "x", 0, MIB, LeaseMode::Read, false)).unwrap();
    for round in 0..2 {
        // A truncate recalls it: hold-session prints the recall, and stays up.
        let c2 = c.clone();
        let truncate =
            rt.spawn(async move { c2.object("ns", "x").unwrap().resize(if round == 0 { 4096 } else { 0 }).await });
        let ev: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(ev["event"], "lease_recalled", "{ev}");
        assert_eq!(
            ev["lease_id"].as_u64(),
            Some(if round == 0 { g.lease_id } else { ev["lease_id"].as_u64().unwrap() })
        );
        rt.block_on(c.release_lease(&sid, ev["lease_id"].as_u64().unwrap())).unwrap();
        rt.block_on(truncate).unwrap().unwrap();
        assert!(hold.try_wait().unwrap().is_none(), "hold-session exited on a recall");
        if round == 0 {
            rt.block_on(c.object("ns", "x").unwrap().resize(MIB)).unwrap();
            rt.block_on(c.acquire_raw(&sid, "ns", "x", 0, MIB, LeaseMode::Read, false)).unwrap();
        }
    }
    assert!(rt.block_on(c.sessions()).unwrap().iter().any(|s| s.session_id == sid), "the session lives on");
    let _ = hold.kill();
    let _ = hold.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exclusive_lease_takes_the_range_from_other_holders_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &["--lease-break-timeout-ms", "300"]);
    d.allow("not returned before the break deadline");
    let c = client(&d).await;
    c.object("ns", "vol").unwrap().create(4 * MIB).await.unwrap();
    let a = c.open_session("shared-writer").await.unwrap();
    let b = c.open_session("exclusive-writer").await.unwrap();
    // A holds a shared lease: it is recalled (the SDK returns it; else it is revoked at the
    // break deadline), and its keys die.
    let la = a.acquire("ns", "vol", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    let lb = b.acquire_exclusive("ns", "vol", 0, 4 * MIB, LeaseMode::ReadWrite).await.unwrap();
    let e = la.write(0, b"late").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Revoked, "{e}");
    lb.write(0, b"mine").await.unwrap();
    // Nobody else gets any part of the range, and says why.
    for (off, len) in [(0, MIB), (3 * MIB, 4096)] {
        let e = a.acquire("ns", "vol", off, len, LeaseMode::Read).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
        assert!(e.to_string().contains(&format!("exclusive lease {}", lb.id())), "{e}");
    }
    let e = a.acquire_exclusive("ns", "vol", MIB, MIB, LeaseMode::ReadWrite).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    let listed = c.leases(Some(b.id())).await.unwrap();
    assert!(listed.iter().any(|l| l.lease_id == lb.id() && l.exclusive), "{listed:?}");
    lb.release().await.unwrap();
    let again = a.acquire("ns", "vol", 0, 4096, LeaseMode::Read).await.unwrap();
    assert_eq!(again.read(0, 4).await.unwrap(), b"mine");
}

/// Sequential 4 KiB writes and reads through one lease until `until` (asked every 64 pairs,
/// so that asking does not slow the operations), each read checked; bounded.
async fn sequential_ops(lease: &rdax_client::Lease, until: impl Fn() -> bool, deadline: Duration) -> u64 {
    let end = Instant::now() + deadline;
    let mut n = 0u64;
    loop {
        assert!(Instant::now() < end, "timed out after {deadline:?} of sequential operations ({n} done)");
        for _ in 0..64 {
            let data = [(n % 251) as u8; 4096];
            let off = (n % 64) * 4096;
            lease.write(off, &data).await.unwrap();
            assert_eq!(lease.read(off, 4096).await.unwrap(), data, "operation {n} reads back");
            n += 1;
        }
        if until() {
            return n;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_plane_connection_whose_operations_follow_its_replies_busy_polls_and_one_with_polling_off_never_does() {
    let polls = |d: &Daemon, r: &str| d.metric(&format!("rdax_dataplane_busy_polls_total{{result=\"{r}\"}}"));
    for (window, expect_polls) in [(1000u64, true), (0, false)] {
        let dir = tmp();
        let conf = dir.path().join("rdaxd.toml");
        std::fs::write(&conf, format!("[dataplane]\nbusy_poll_us = {window}\n")).unwrap();
        let d = Daemon::start(dir.path(), &["--config", conf.to_str().unwrap()]);
        let c = client(&d).await;
        c.object("ns", "x").unwrap().create(MIB).await.unwrap();
        // The SDK polls too (its default); the daemon's counters say what the daemon did.
        let s = c.open_session("seq").await.unwrap();
        let lease = s.acquire("ns", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
        if expect_polls {
            // Polls find operations (bounded: on a loaded machine some gaps exceed the window).
            sequential_ops(&lease, || polls(&d, "request") >= 20.0, Duration::from_secs(60)).await;
        } else {
            let rounds = std::sync::atomic::AtomicU32::new(0);
            let n = sequential_ops(
                &lease,
                || rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= 8,
                Duration::from_secs(60),
            )
            .await;
            assert_eq!(n, 8 * 64);
            assert_eq!(polls(&d, "request") + polls(&d, "timeout"), 0.0, "no polls with busy_poll_us = 0");
        }
    }
}
