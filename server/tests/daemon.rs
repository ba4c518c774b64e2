//! The real daemon process, driven through the SDK and through rdaxctl.

mod common;

use common::{Daemon, client, poll};
use rdax_client::{ErrorKind, SessionNotice};
use std::time::Duration;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_object_operation_through_the_sdk() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    let info = c.info().await.unwrap();
    assert_eq!(info.mode, "file");
    let o = c.object("ns", "obj").unwrap();
    let st = o.create(10 << 20).await.unwrap();
    assert_eq!((st.size, st.allocated_bytes), (10 << 20, 0));
    // Streamed write and read of 6 MiB (several chunks each way).
    let data: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    assert_eq!(o.write(1234, data.clone(), true).await.unwrap(), data.len() as u64);
    assert_eq!(o.read(1234, data.len() as u64).await.unwrap(), data);
    let head = o.read(0, 1234).await.unwrap();
    assert!(head.iter().all(|&b| b == 0), "unwritten bytes read zero");
    o.flush(0, 0).await.unwrap();
    o.punch_hole(1234, 4096 * 3).await.unwrap();
    assert!(o.read(1234, 4096 * 3).await.unwrap().iter().all(|&b| b == 0));
    let st = o.resize(4096).await.unwrap();
    assert_eq!(st.size, 4096);
    assert_eq!(o.read(0, 0).await.unwrap().len(), 4096);
    for i in 0..5 {
        c.object("ns", &format!("o{i}")).unwrap().create(i).await.unwrap();
    }
    let (page, next) = c.list("ns", None, 2).await.unwrap();
    assert_eq!(page.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["o0", "o1"]);
    assert_eq!(next.as_deref(), Some("o1"));
    assert_eq!(c.list_all("ns").await.unwrap().len(), 6);
    o.delete().await.unwrap();
    assert_eq!(o.stat().await.unwrap_err().kind(), ErrorKind::NotFound);
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.objects, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_serves_and_reflection_lists_the_services() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let ch = tonic::transport::Endpoint::from_shared(d.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    for svc in ["rdax.v1.Pool", "rdax.v1.Objects", "rdax.v1.Sessions", "rdax.v1.Leases", "rdax.v1.Admin"] {
        let r = h.check(tonic_health::pb::HealthCheckRequest { service: svc.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{svc}");
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["rdax.v1.Objects", "rdax.v1.Pool", "rdax.v1.Sessions", "rdax.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn data_survives_a_restart_and_the_clean_shutdown_is_seen() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    let o = c.object("keep", "me").unwrap();
    o.create(3).await.unwrap();
    o.write(0, b"abc".to_vec(), false).await.unwrap(); // not persisted: a clean stop must still keep it
    d.restart();
    let c = client(&d).await;
    assert!(c.info().await.unwrap().previous_shutdown_clean);
    assert_eq!(c.object("keep", "me").unwrap().read(0, 0).await.unwrap(), b"abc");
    assert!(d.log().contains("closed pool cleanly"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let c = client(&d).await;
    let o = c.object("ns", "o").unwrap();
    o.create(100).await.unwrap();
    o.write(0, vec![7; 100], true).await.unwrap();
    let before = (c.stats().await.unwrap(), o.stat().await.unwrap());
    // Bypass the SDK's own validation to reach the server with raw messages.
    let mut raw = rdax_proto::pb::objects_client::ObjectsClient::new(d.channel().await);
    let r = |ns: &str, n: &str| Some(rdax_proto::pb::ObjectRef { namespace: ns.into(), name: n.into() });
    use rdax_proto::pb::*;
    use tonic::Code;
    let cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        (
            "empty name",
            Code::InvalidArgument,
            raw.create(CreateRequest { object: r("ns", ""), size: 1, ..Default::default() }).await.map(drop),
        ),
        (
            "bad namespace",
            Code::InvalidArgument,
            raw.create(CreateRequest { object: r("a/b", "x"), size: 1, ..Default::default() }).await.map(drop),
        ),
        (
            "long name",
            Code::InvalidArgument,
            raw.stat(StatRequest { object: r("ns", &"n".repeat(200)) }).await.map(drop),
        ),
        ("no object", Code::InvalidArgument, raw.stat(StatRequest { object: None }).await.map(drop)),
        ("unknown object", Code::NotFound, raw.stat(StatRequest { object: r("ns", "missing") }).await.map(drop)),
        (
            "exists",
            Code::AlreadyExists,
            raw.create(CreateRequest { object: r("ns", "o"), size: 1, ..Default::default() }).await.map(drop),
        ),
        (
            "huge size",
            Code::InvalidArgument,
            raw.create(CreateRequest { object: r("ns", "h"), size: u64::MAX, ..Default::default() }).await.map(drop),
        ),
        (
            "overflowing punch",
            Code::InvalidArgument,
            raw.punch_hole(PunchHoleRequest { object: r("ns", "o"), offset: u64::MAX, length: 2 }).await.map(drop),
        ),
        (
            "zero punch",
            Code::InvalidArgument,
            raw.punch_hole(PunchHoleRequest { object: r("ns", "o"), offset: 0, length: 0 }).await.map(drop),
        ),
        (
            "read past end",
            Code::OutOfRange,
            raw.read(ReadRequest { object: r("ns", "o"), offset: 50, length: 1 << 40, chunk_size: 0 }).await.map(drop),
        ),
        (
            "read overflow",
            Code::InvalidArgument,
            raw.read(ReadRequest { object: r("ns", "o"), offset: 5, length: u64::MAX, chunk_size: 0 }).await.map(drop),
        ),
        (
            "flush past end",
            Code::OutOfRange,
            raw.flush(FlushRequest { object: r("ns", "o"), offset: 0, length: 101 }).await.map(drop),
        ),
        (
            "list limit",
            Code::InvalidArgument,
            raw.list(ListRequest { namespace: "ns".into(), after: String::new(), limit: 5000 }).await.map(drop),
        ),
        (
            "resize huge",
            Code::InvalidArgument,
            raw.resize(ResizeRequest { object: r("ns", "o"), size: u64::MAX, grow_only: false }).await.map(drop),
        ),
    ];
    for (what, code, res) in cases {
        let s = res.expect_err(what);
        assert_eq!(s.code(), code, "{what}: {s:?}");
    }
    // A write past the end, and a write stream without a header.
    let chunk = WriteChunk {
        header: Some(WriteHeader { object: r("ns", "o"), offset: 90, persist: false, extend: false }),
        data: vec![1; 20],
    };
    let s = raw.write(tokio_stream::iter(vec![chunk])).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    let s = raw.write(tokio_stream::iter(vec![WriteChunk { header: None, data: vec![1] }])).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let after = (c.stats().await.unwrap(), o.stat().await.unwrap());
    assert_eq!(before, after, "bad requests must change nothing");
    assert_eq!(o.read(0, 0).await.unwrap(), vec![7; 100]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_required_when_configured() {
    let dir = tmp();
    let tf = dir.path().join("token");
    std::fs::write(&tf, "s3cret-token-0123456789\n").unwrap();
    std::fs::set_permissions(&tf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = Daemon::start(dir.path(), &["--token-file", tf.to_str().unwrap()]);
    for token in [None, Some("wrong-token-0123456789")] {
        let opts = rdax_client::ConnectOptions { token: token.map(str::to_string), ..Default::default() };
        let c = rdax_client::Client::connect(&d.endpoint, opts).await.unwrap();
        assert_eq!(c.info().await.unwrap_err().kind(), ErrorKind::Unauthenticated, "{token:?}");
        assert_eq!(c.object("ns", "x").unwrap().create(1).await.unwrap_err().kind(), ErrorKind::Unauthenticated);
    }
    let opts = rdax_client::ConnectOptions { token: Some("s3cret-token-0123456789".into()), ..Default::default() };
    let c = rdax_client::Client::connect(&d.endpoint, opts).await.unwrap();
    assert_eq!(c.list_all("ns").await.unwrap().len(), 0, "nothing was created by the refused requests");
    // rdaxctl with the token file.
    let out = d.ctl(&["--token-file", tf.to_str().unwrap(), "info"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.ctl(&["info"]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_keepalive_evict_expire_and_limits() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--session-ttl-ms", "600", "--max-sessions", "2"]);
    let c = client(&d).await;
    let mut a = c.open_session("alpha").await.unwrap();
    assert_eq!(a.ttl(), Duration::from_millis(600));
    let b = c.open_session("beta").await.unwrap();
    let e = c.open_session("gamma").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    // Keepalives hold alpha well past its TTL.
    let list_has = |id: String| {
        let c = c.clone();
        async move { c.sessions().await.unwrap().iter().any(|s| s.session_id == id) }
    };
    // Keepalives hold it for three TTLs (virtual-time tests cover the logic; this checks the
    // real loop): polled, each look must find it listed and recently heard from.
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(1800) {
        let list = c.sessions().await.unwrap();
        let me = list.iter().find(|s| s.session_id == a.id()).expect("keepalives must keep the session");
        assert!(me.idle_ms < 600, "no keepalive within the TTL: idle {} ms", me.idle_ms);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Evict alpha: its holder is told.
    c.evict_session(a.id(), "test").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), a.next_notice()).await.unwrap();
    assert!(matches!(n, Some(SessionNotice::Ended(ref r)) if r.contains("evicted")), "{n:?}");
    // Beta stops sending keepalives (handle dropped): it expires after its TTL.
    let bid = b.id().to_string();
    drop(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while list_has(bid.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "session did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.log().contains("expired"), "{}", d.log());
    assert_eq!(c.evict_session(&bid, "gone").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(c.evict_session("not-hex", "x").await.unwrap_err().kind(), ErrorKind::InvalidArgument);
}

/// Wait until a put into `name` is under way (the object exists and has blocks).
fn wait_for_put(d: &Daemon, name: &str) {
    poll(Duration::from_secs(30), "the put to start writing", || {
        let out = d.ctl(&["--json", "stat", name]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["allocated_bytes"].as_u64()? > 0).then_some(())
    });
}

fn fsck_clean(d: &Daemon) {
    let out = common::rdaxctl().args(["fsck", d.pool_path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "fsck: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn sigterm_during_a_put_lets_it_finish_within_the_shutdown_bound() {
    use std::io::Write;
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &[]);
    let data: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    // The put reads from a pipe the test holds, so it is provably still in flight when
    // SIGTERM arrives: its second half is written only after shutdown has started.
    let mut put = d
        .rdaxctl()
        .args(["put", "ns/big", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = put.stdin.take().unwrap();
    let (first, rest) = data.split_at(8 << 20);
    stdin.write_all(first).unwrap();
    stdin.flush().unwrap();
    wait_for_put(&d, "ns/big");
    d.signal(libc::SIGTERM);
    poll(Duration::from_secs(10), "shutdown to start", || d.log().contains("shutdown started").then_some(()));
    stdin.write_all(rest).unwrap();
    drop(stdin);
    let st = d.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "rdaxd exit {st}\n{}", d.log());
    let put_status = put.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(put.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(put_status.success(), "the in-flight put finishes during shutdown: {err}\n{}", d.log());
    let log = d.log();
    assert!(log.contains("shutdown finished"), "{log}");
    assert!(log.contains("closed pool cleanly"), "{log}");
    fsck_clean(&d);
    // Every byte is there after a restart.
    let d = Daemon::start(dir.path(), &[]);
    let out = dir.path().join("back.bin");
    let got = d.ctl(&["get", "ns/big", out.to_str().unwrap()]);
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert!(std::fs::read(&out).unwrap() == data, "the put's bytes differ after the restart");
}

#[test]
fn sigterm_during_a_put_that_cannot_finish_fails_it_cleanly() {
    use std::io::Write;
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &["--shutdown-timeout-ms", "500"]);
    d.allow("in-flight work did not finish within the shutdown timeout");
    // A put from a pipe that the test keeps open: it cannot finish by itself.
    let mut put = d
        .rdaxctl()
        .args(["put", "ns/slow", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = put.stdin.take().unwrap();
    stdin.write_all(&vec![0xA5u8; 4 << 20]).unwrap();
    stdin.flush().unwrap();
    wait_for_put(&d, "ns/slow");
    let t0 = std::time::Instant::now();
    let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    let took = t0.elapsed();
    assert!(st.success(), "the pool is still closed cleanly: exit {st}\n{}", d.log());
    assert!(took < Duration::from_secs(10), "the stalled put does not hold shutdown past its bound ({took:?})");
    // The client notices when it next sends (it is blocked on its input until then).
    let _ = stdin.write_all(&[0xA5; 1 << 20]);
    drop(stdin);
    let put_status = put.wait().unwrap();
    assert!(!put_status.success(), "the cut-off put reports failure");
    let log = d.log();
    assert!(log.contains("in-flight work did not finish within the shutdown timeout"), "{log}");
    assert!(log.contains("closed pool cleanly"), "{log}");
    fsck_clean(&d);
}

#[test]
fn rdaxctl_commands_and_exit_codes() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &[]);
    let ok = |args: &[&str]| {
        let o = d.ctl(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let code = |args: &[&str]| d.ctl(args).status.code();
    ok(&["create", "cli/a", "--size", "1M"]);
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    ok(&["put", "cli/f", input.to_str().unwrap()]);
    let output = dir.path().join("out.bin");
    ok(&["get", "cli/f", output.to_str().unwrap()]);
    assert_eq!(std::fs::read(&output).unwrap(), data);
    let part = d.ctl(&["get", "cli/f", "-", "--offset", "10", "--length", "5"]);
    assert_eq!(part.stdout, &data[10..15]);
    let v: serde_json::Value = serde_json::from_str(&ok(&["--json", "ls", "cli"])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    ok(&["resize", "cli/f", "4096"]);
    ok(&["punch", "cli/f", "0", "100"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&["--json", "stat", "cli/f"])).unwrap();
    assert_eq!(v["size"], 4096);
    ok(&["rm", "cli/a"]);
    assert_eq!(code(&["stat", "cli/a"]), Some(3));
    assert_eq!(code(&["create", "cli/f"]), Some(4));
    assert_eq!(code(&["get", "cli/f", "-", "--offset", "9999"]), Some(5));
    assert_eq!(code(&["create", "bad ns/x"]), Some(2));
    let v: serde_json::Value = serde_json::from_str(&ok(&["--json", "info"])).unwrap();
    assert_eq!(v["mode"], "file");
    let unreachable = common::rdaxctl().args(["--endpoint", "http://127.0.0.1:1", "info"]).output().unwrap();
    assert_eq!(unreachable.status.code(), Some(7));
    let comp = ok(&["completions", "bash"]);
    assert!(comp.contains("rdaxctl"));
    // lease-bench over the TCP data plane, random 4 KiB reads, two in flight: it moves bytes,
    // says what it ran, and cleans up its object.
    let args = ["--json", "--transport", "tcp", "lease-bench", "--op", "read", "--random", "--size", "4K"];
    let v: serde_json::Value =
        serde_json::from_str(&ok(&[&args[..], &["--depth", "2", "--region", "256K", "--seconds", "0.3"]].concat()))
            .unwrap();
    assert_eq!(
        (v["transport"].as_str(), v["random"].as_bool(), v["size"].as_u64()),
        (Some("tcp"), Some(true), Some(4096))
    );
    assert!(v["ops"].as_f64().unwrap() > 0.0 && v["ops_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(code(&["stat", "rdax-bench/lease-bench"]), Some(3));
}

#[test]
fn unknown_config_keys_are_reported() {
    let dir = tmp();
    let cfg = dir.path().join("rdaxd.toml");
    std::fs::write(&cfg, "[grpc]\nlisten = \"127.0.0.1:0\"\nlisten_typo = 1\n").unwrap();
    let d = Daemon::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    d.allow("unknown config key ignored");
    assert!(d.log().contains("unknown config key ignored") && d.log().contains("grpc.listen_typo"), "{}", d.log());
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "a configuration error has its own exit status");
    assert!(String::from_utf8_lossy(&out.stderr).contains("grpc.listen_typo"));
    // The daemon itself, with a configuration that can never work: 78 too (the unit's
    // RestartPreventExitStatus), not the generic failure.
    std::fs::write(&cfg, "[limits]\nmax_sessions = 0\n").unwrap();
    let out = refused_start(&cfg, dir.path());
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    // A valid one passes `check-config --quiet` silently (the unit's ExecReload).
    std::fs::write(&cfg, "[grpc]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--config", cfg.to_str().unwrap(), "check-config", "--quiet"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // An admin group that does not exist here is a warning, not an error (it may exist only
    // where the daemon runs), and the daemon itself refuses it.
    std::fs::write(&cfg, "[grpc]\nlisten = \"127.0.0.1:0\"\n[admin]\ngroup = \"rdax-test-no-such-group\"\n").unwrap();
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--config", cfg.to_str().unwrap(), "check-config", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("warning") && err.contains("no such group"), "{err}");
    let out = refused_start(&cfg, dir.path());
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Start rdaxd with `cfg` and wait (bounded) for it to exit, as a daemon refusing its
/// configuration must; one that starts instead is killed and fails the test.
fn refused_start(cfg: &std::path::Path, state: &std::path::Path) -> std::process::Output {
    let mut child = std::process::Command::new(common::rdaxd_bin())
        .args(["--config", cfg.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("rdaxd started instead of refusing its configuration: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_refused_with_a_clear_status() {
    let dir = tmp();
    let d = Daemon::start(dir.path(), &["--max-message-bytes", "131072"]);
    let c = client(&d).await;
    let o = c.object("ns", "o").unwrap();
    o.create(1 << 20).await.unwrap();
    // The SDK sends 1 MiB messages; the daemon accepts at most 128 KiB.
    let e = o.write(0, vec![1; 1 << 20], false).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    assert!(e.to_string().contains("too large"), "{e}");
    assert_eq!(o.stat().await.unwrap().allocated_bytes, 0, "nothing was written");
    // Reads adapt: chunks stay under the limit.
    assert_eq!(o.read(0, 0).await.unwrap().len(), 1 << 20);
}

#[test]
fn sigquit_exits_at_once_and_the_next_start_recovers() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &[]);
    d.allow("SIGQUIT: exiting at once");
    let st = d.signal_and_wait(libc::SIGQUIT, Duration::from_secs(10));
    assert_eq!(st.code(), Some(131), "{}", d.log());
    assert!(!d.log().contains("closed pool cleanly"));
    let d2 = Daemon::start(dir.path(), &[]);
    d2.allow("SIGQUIT: exiting at once"); // the same log file
    let out = d2.ctl(&["--json", "info"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["previous_shutdown_clean"], false);
}

#[test]
fn check_config_reports_the_resolved_config_without_secrets() {
    let dir = tmp();
    let token = "tok-check-config-must-not-print-this";
    let tf = dir.path().join("token");
    std::fs::write(&tf, token).unwrap();
    std::fs::set_permissions(&tf, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = dir.path().join("rdaxd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[grpc]\nlisten = \"127.0.0.1:7999\"\n[auth]\ntoken_file = {:?}\n[lease]\nttl_ms = 30000\n[nbd]\nlisten = \"127.0.0.1:10809\"\nprincipal = \"admin\"\n",
            tf.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "grpc       127.0.0.1:7999 plaintext",
        "auth       1 principal(s): admin",
        "lease      TTL 30 s",
        "nbd        127.0.0.1:10809 TLS off, exclusive leases for writers on, principal admin",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    assert!(!text.contains(token) && !String::from_utf8_lossy(&out.stderr).contains(token), "{text}");
}

#[test]
fn the_example_config_documents_only_real_keys() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rdaxd.toml");
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--config", example.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A crash just before or just after a journal commit (failpoint `exit`): the next start
/// recovers, and the change is either fully absent or fully there (invariant 4).
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_on_either_side_of_a_journal_commit_recovers_atomically() {
    for (point, code, present) in [("journal.before_commit", 42, false), ("journal.after_commit", 43, true)] {
        let dir = tmp();
        let mut d = Daemon::start(dir.path(), &[]);
        let c = client(&d).await;
        let a = c.object("ns", "a").unwrap();
        a.create(1 << 20).await.unwrap();
        a.write(0, vec![0xAB; 1 << 20], true).await.unwrap();
        common::Testing::new(&d).await.set(point, &format!("exit({code})")).await;
        // The delete of `a` crashes the daemon mid-way.
        assert!(a.delete().await.is_err(), "{point}: the request cannot be acknowledged");
        let st = d.signal_and_wait(0, Duration::from_secs(20));
        assert_eq!(st.code(), Some(code), "{point}: {}", d.log());
        drop(c);
        let mut d = Daemon::start(dir.path(), &[]);
        let c = client(&d).await;
        let info = c.info().await.unwrap();
        assert!(!info.previous_shutdown_clean, "{point}");
        match c.object("ns", "a").unwrap().read(0, 0).await {
            Ok(bytes) => {
                assert!(!present, "{point}: the committed delete was lost");
                assert!(bytes == vec![0xAB; 1 << 20], "{point}: the object survived, but not whole");
            }
            Err(e) => {
                assert!(present, "{point}: an uncommitted delete took effect ({e})");
                assert_eq!(e.kind(), ErrorKind::NotFound, "{point}: {e}");
            }
        }
        drop(c);
        let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
        assert!(st.success(), "{point}: {}", d.log());
        fsck_clean(&d);
    }
}

#[test]
fn a_deleted_pool_is_not_silently_replaced() {
    let dir = tmp();
    let mut d = Daemon::start(dir.path(), &[]);
    assert!(d.ctl(&["create", "ns/kept", "--size", "4096"]).status.success());
    let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(st.success());
    let pool = d.pool_path();
    let marker = dir.path().join("default.pool.created");
    assert!(marker.exists(), "the first start records the pool it created");
    assert!(!dir.path().join("ports.json").exists(), "the ports file goes with the daemon");
    std::fs::remove_file(&pool).unwrap();
    // The next start refuses, naming the file and how to start over on purpose.
    let mut child = std::process::Command::new(common::rdaxd_bin())
        .args(["--state-dir", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "off", "--pool-size", "64M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = poll(Duration::from_secs(30), "rdaxd to refuse", || child.try_wait().unwrap());
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!st.success(), "{err}");
    assert!(err.contains("is missing, but a pool was created there before"), "{err}");
    assert!(err.contains(marker.to_str().unwrap()) && err.contains("rdaxctl mkpool"), "{err}");
    assert!(!pool.exists(), "nothing was created");
    // Removing the marker is the way to start over with an empty pool.
    std::fs::remove_file(&marker).unwrap();
    let d = Daemon::start(dir.path(), &[]);
    assert_eq!(d.ctl(&["stat", "ns/kept"]).status.code(), Some(3), "a new, empty pool");
}
