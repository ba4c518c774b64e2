//! Limits and hostile conditions against the real daemon: connection caps, idle timeouts, a
//! full filesystem under the pool, lease caps.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Daemon, Raw, client};
use rdax_client::{ErrorKind, LeaseMode};
use rdax_proto::dataplane::Status;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn session_bytes(s: &rdax_client::Session) -> [u8; 16] {
    s.secret().0
}

/// Whether a raw TCP connection was closed by the peer within `bound`.
fn closed_within(s: &mut std::net::TcpStream, bound: Duration) -> bool {
    s.set_read_timeout(Some(bound)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a reply or a GOAWAY: keep reading
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true, // reset
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--grpc-idle-timeout-ms", "400", "--data-idle-timeout-ms", "400"]);
    // A gRPC connection that never sends a request, and a data-plane connection that never
    // says HELLO, are both closed.
    let mut grpc = std::net::TcpStream::connect(d.endpoint.trim_start_matches("http://")).unwrap();
    let t0 = Instant::now();
    assert!(closed_within(&mut grpc, Duration::from_secs(10)), "an idle gRPC connection stays open");
    assert!(t0.elapsed() >= Duration::from_millis(350), "closed after {:?}, before its idle timeout", t0.elapsed());
    let mut silent = std::net::TcpStream::connect(&d.data).unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(15)), "a data-plane connection without HELLO stays open");
    // A session's stream keeps its connection (keepalives are a request in progress), and an
    // idle data-plane connection after HELLO is closed, the SDK reconnecting as needed.
    let c = client(&d).await;
    let s = c.open_session("busy").await.unwrap();
    c.object("ns", "x").unwrap().create(1 << 20).await.unwrap();
    let l = s.acquire("ns", "x", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    l.write(0, b"before").await.unwrap();
    let (mut raw, st) = Raw::connect(&d.data, session_bytes(&s)).await;
    assert_eq!(st, Status::Ok);
    tokio::time::sleep(Duration::from_millis(1200)).await; // three idle timeouts, on purpose
    let mut b = [0u8; 1];
    let r = tokio::io::AsyncReadExt::read(&mut raw.0, &mut b).await;
    assert!(matches!(r, Ok(0) | Err(_)), "the idle data-plane connection was closed: {r:?}");
    assert!(c.sessions().await.unwrap().iter().any(|x| x.session_id == s.id() && x.connected), "the session lived on");
    l.write(0, b"after!").await.unwrap();
    assert_eq!(l.read(0, 6).await.unwrap(), b"after!");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_caps_hold_and_release() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--max-data-connections", "2"]);
    let c = client(&d).await;
    let s = c.open_session("capped").await.unwrap();
    let sid = session_bytes(&s);
    let (_a, st) = Raw::connect(&d.data, sid).await;
    assert_eq!(st, Status::Ok);
    let (b, st) = Raw::connect(&d.data, sid).await;
    assert_eq!(st, Status::Ok);
    // The third waits in the backlog: no HELLO reply while two are open.
    let third = {
        let data = d.data.clone();
        tokio::spawn(async move { Raw::connect(&data, sid).await.1 })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "a third connection was served over the cap of 2");
    drop(b);
    let st = tokio::time::timeout(Duration::from_secs(10), third).await.expect("served once one closed").unwrap();
    assert_eq!(st, Status::Ok);
    assert!(d.log().contains("at the connection cap"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_cannot_take_leases_without_end() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--max-leases-per-session", "50"]);
    let c = client(&d).await;
    c.object("ns", "x").unwrap().create(1 << 20).await.unwrap();
    let greedy = c.open_session("greedy").await.unwrap();
    let mut held = Vec::new();
    let e = loop {
        match greedy.acquire("ns", "x", 0, 4096, LeaseMode::Read).await {
            Ok(l) => held.push(l),
            Err(e) => break e,
        }
        assert!(held.len() <= 50, "more leases than the cap");
    };
    assert_eq!(held.len(), 50);
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("limits.max_leases_per_session"), "{e}");
    // Others are unaffected.
    let other = c.open_session("other").await.unwrap();
    other.acquire("ns", "x", 0, 4096, LeaseMode::Read).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_source_cannot_take_a_listener_and_one_grant_cannot_allocate_without_bound() {
    let dir = tmp();
    let cfg = dir.path().join("rdaxd.toml");
    std::fs::write(
        &cfg,
        "[limits]\nmax_connections_per_source = 2\nmax_alloc_bytes_per_request = \"1M\"\nmax_keys_per_session = 3\n",
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let c = client(&d).await;
    let s = c.open_session("one-host").await.unwrap();
    let sid = session_bytes(&s);
    // The SDK's own connections count too; take what is left of the share from 127.0.0.1.
    let mut mine = Vec::new();
    let over = loop {
        let mut t = std::net::TcpStream::connect(&d.data).unwrap();
        if closed_within(&mut t, Duration::from_millis(300)) {
            break t;
        }
        mine.push(t);
        assert!(mine.len() <= 2, "more than 2 data-plane connections from one address");
    };
    drop(over);
    // Another address still gets in and is served.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = other.connect(d.data.parse().unwrap()).await.unwrap();
    let (_raw, st) = Raw::hello(stream, sid).await;
    assert_eq!(st, Status::Ok, "a second source is not held back by the first");
    // Closing one gives the slot back.
    mine.pop();
    common::poll(Duration::from_secs(10), "a freed per-source slot", || {
        let mut t = std::net::TcpStream::connect(&d.data).unwrap();
        (!closed_within(&mut t, Duration::from_millis(200))).then_some(())
    });
    // A read-write grant over 1 MiB + 4 KiB of holes is over the allocation cap.
    c.object("ns", "big").unwrap().create(4 << 20).await.unwrap();
    let e = s.acquire("ns", "big", 0, (1 << 20) + 4096, LeaseMode::ReadWrite).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("limits.max_alloc_bytes_per_request"), "{e}");
    assert_eq!(c.stats().await.unwrap().used_blocks, 0, "the refused grant allocated nothing");
    // Within it, granted. Then one-block leases, a key each, up to the session's 3 keys.
    let l = s.acquire("ns", "big", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    let mut keys = l.segments().iter().filter(|g| g.target.is_some()).count();
    let mut held = Vec::new();
    let e = loop {
        match s.acquire("ns", "big", held.len() as u64 * 4096, 4096, LeaseMode::Read).await {
            Ok(x) => {
                keys += 1;
                held.push(x);
            }
            Err(e) => break e,
        }
        assert!(keys <= 3, "more keys than the cap");
    };
    assert_eq!(keys, 3);
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("limits.max_keys_per_session"), "{e}");
    // Released keys count no more.
    held.pop().unwrap().release().await.unwrap();
    s.acquire("ns", "big", 0, 4096, LeaseMode::Read).await.unwrap();
}

/// Mount a tmpfs of `mb` MiB at `dir` (root only). `None` when this host cannot.
fn tmpfs(dir: &std::path::Path, mb: u64) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs", dir.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(dir.to_path_buf()))
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_filesystem_cannot_crash_the_daemon_or_lose_data() {
    let dir = tmp();
    let mnt = dir.path().join("small");
    let Some(_m) = tmpfs(&mnt, 48) else {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs this as root)");
        return;
    };
    // A pool larger than the filesystem is refused at start, naming the problem.
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--state-dir", mnt.to_str().unwrap(), "--pool-size", "64M", "--listen", "127.0.0.1:0"])
        .args(["--data-listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not enough free space"), "{err}");
    assert!(!mnt.join("default.pool").exists(), "no half-made pool is left");
    // A pool that fits is allocated in full; then the rest of the filesystem fills up.
    let mut d = Daemon::start(&mnt, &["--pool-size", "16M"]);
    let mut filler = std::fs::File::create(mnt.join("filler")).unwrap();
    let chunk = vec![0xEEu8; 1 << 20];
    while filler.write_all(&chunk).is_ok() {}
    let c = client(&d).await;
    let o = c.object("ns", "full").unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    o.create(data.len() as u64).await.unwrap();
    o.write(0, data.clone(), true).await.unwrap();
    let s = c.open_session("dp").await.unwrap();
    let l = s.acquire("ns", "full", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    l.write_persist(0, &data[..1 << 20]).await.unwrap();
    l.release().await.unwrap();
    assert!(o.read(0, 0).await.unwrap() == data);
    let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(st.success(), "{}", d.log());
    // fsck reads the pool without a mapping; the next start opens it on the full filesystem.
    let out = common::rdaxctl().args(["fsck", d.pool_path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let d = Daemon::start(&mnt, &["--pool-size", "16M"]);
    let c = client(&d).await;
    assert!(c.object("ns", "full").unwrap().read(0, 0).await.unwrap() == data);
}
