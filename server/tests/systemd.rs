//! rdaxd as systemd sees it: a test-owned NOTIFY_SOCKET receives READY, STATUS, WATCHDOG,
//! RELOADING and STOPPING; SIGHUP reloads the log level and the token.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::Daemon;

struct Notify(UnixDatagram);

impl Notify {
    /// The next datagram's lines, or None after `bound`.
    fn next(&self, bound: Duration) -> Option<Vec<String>> {
        self.0.set_read_timeout(Some(bound)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect())
    }

    /// Read until a datagram contains `line`; returns every line seen on the way.
    fn until(&self, line: &str, bound: Duration) -> Vec<String> {
        let end = Instant::now() + bound;
        let mut seen = Vec::new();
        while Instant::now() < end {
            if let Some(lines) = self.next(end - Instant::now()) {
                let hit = lines.iter().any(|l| l == line);
                seen.extend(lines);
                if hit {
                    return seen;
                }
            }
        }
        panic!("no {line} within {bound:?}; saw {seen:?}");
    }
}

/// The watchdog test checks ping spacing; it must not share the machine with the load test
/// in this binary, or a 2-core CI runner starves the liveness probe.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn write_token(path: &std::path::Path, token: &str) {
    std::fs::write(path, token).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn ready_status_watchdog_reload_and_stopping() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let notify = Notify(UnixDatagram::bind(&sock_path).unwrap());
    let token = dir.path().join("token");
    write_token(&token, "first-token-0123456789");
    let cfg = dir.path().join("rdaxd.toml");
    std::fs::write(&cfg, format!("[log]\nlevel = \"warn\"\n[auth]\ntoken_file = \"{}\"\n", token.display())).unwrap();
    let mut d = Daemon::start_env(
        dir.path(),
        &["--config", cfg.to_str().unwrap()],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap()), ("WATCHDOG_USEC", "2000000"), ("RDAX_LOG_LEVEL", "unset")],
    );
    d.allow("not returned before the break deadline");
    let info = |tok: &str| {
        write_token(&dir.path().join("client-token"), tok);
        d_ctl(&d, &["--token-file", dir.path().join("client-token").to_str().unwrap(), "info"])
    };
    // READY only once the gRPC port serves: right after READY, a request must succeed.
    let seen = notify.until("READY=1", Duration::from_secs(30));
    assert!(info("first-token-0123456789"), "gRPC must serve when READY=1 is sent");
    let status = seen.iter().find(|l| l.starts_with("STATUS=")).expect("STATUS with READY");
    assert!(status.contains("objects") && status.contains("sessions") && status.contains("leases"), "{status}");
    // Watchdog pings at half of WATCHDOG_USEC (1 s), from the liveness task. No gap may
    // reach WATCHDOG_USEC: that is when systemd would kill the service.
    let mut pings = Vec::new();
    let t0 = Instant::now();
    while pings.len() < 5 && t0.elapsed() < Duration::from_secs(20) {
        if let Some(lines) = notify.next(Duration::from_secs(2))
            && lines.iter().any(|l| l == "WATCHDOG=1")
        {
            pings.push(Instant::now());
        }
    }
    assert_eq!(pings.len(), 5, "watchdog pings");
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap >= Duration::from_millis(500) && gap < Duration::from_millis(2000), "ping gap {gap:?}");
    }
    // SIGHUP: new log level and new token, announced with RELOADING then READY.
    assert!(!d.log().contains("configuration reloaded"));
    write_token(&token, "second-token-0123456789");
    std::fs::write(
        &cfg,
        format!(
            "[log]\nlevel = \"info\"\n[auth]\ntoken_file = \"{}\"\n[lease]\nbreak_timeout_ms = 1234\n",
            token.display()
        ),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    let seen = notify.until("RELOADING=1", Duration::from_secs(10));
    let _ = seen;
    notify.until("READY=1", Duration::from_secs(10));
    common::poll(Duration::from_secs(10), "the reload to be logged at the new level", || {
        d.log().contains("configuration reloaded").then_some(())
    });
    assert!(!info("first-token-0123456789"), "the old token must be refused after the reload");
    // Timeouts too: a recall now carries the new break deadline.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = rdax_client::ConnectOptions { token: Some("second-token-0123456789".into()), ..Default::default() };
        let c = rdax_client::Client::connect(&d.endpoint, opts).await.unwrap();
        let s = c
            .open_session_with(rdax_client::SessionOptions {
                client_name: "deaf".into(),
                ignore_recalls: true,
                ..Default::default()
            })
            .await
            .unwrap();
        c.object("ns", "t").unwrap().create(8192).await.unwrap();
        let _l = s.acquire("ns", "t", 0, 8192, rdax_client::LeaseMode::Read).await.unwrap();
        let t = Instant::now();
        c.object("ns", "t").unwrap().resize(0).await.unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(1200) && took < Duration::from_millis(4000),
            "break deadline after reload: {took:?}"
        );
    });
    assert!(info("second-token-0123456789"));
    // SIGTERM: STOPPING, then a clean exit.
    // SAFETY: as above.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    notify.until("STOPPING=1", Duration::from_secs(10));
    let st = d.signal_and_wait(0, Duration::from_secs(30));
    assert!(st.success(), "{}", d.log());
}

fn d_ctl(d: &Daemon, args: &[&str]) -> bool {
    d.ctl(args).status.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &["--pool-size", "128M"]);
    let acked: Arc<Mutex<Vec<(String, u8)>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let c = common::client(&d).await;
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u32.. {
                let name = format!("t{t}-{i}");
                let o = c.object("load", &name).unwrap();
                if o.create(64 << 10).await.is_err() {
                    return;
                }
                let tag = (i % 250) as u8 + 1;
                if o.write(0, vec![tag; 64 << 10], true).await.is_err() {
                    return;
                }
                acked.lock().unwrap().push((name, tag));
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = d.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    assert!(!st.success());
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    // Offline check of the crashed pool, then a restart that recovers it.
    let out = common::rdaxctl().args(["fsck", d.pool_path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "fsck after SIGKILL: {}", String::from_utf8_lossy(&out.stdout));
    let d2 = Daemon::start(dir.path(), &["--pool-size", "128M"]);
    let c = common::client(&d2).await;
    assert!(!c.info().await.unwrap().previous_shutdown_clean, "the next start must see the unclean stop");
    for (name, tag) in &acked {
        let bytes = c.object("load", name).unwrap().read(0, 0).await.unwrap_or_else(|e| panic!("{name} lost: {e}"));
        assert!(bytes.len() == 64 << 10 && bytes.iter().all(|b| b == tag), "{name}: acknowledged data lost");
    }
    println!("{} acknowledged create+write pairs survived SIGKILL", acked.len());
}

/// GET a path from the metrics listener: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: rdax\r\n\r\n").as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Parse the Prometheus text format strictly: every sample belongs to a declared family and
/// has a float value. Returns `(name{labels}, value)`.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut families = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line: {line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
        let family =
            ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).filter(|f| families.contains(*f));
        assert!(families.contains(name) || family.is_some(), "sample without a TYPE: {line}");
        samples.push((series.to_string(), v));
    }
    samples
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &[]);
    let c = common::client(&d).await;
    let s = c.open_session("m").await.unwrap();
    c.object("ns", "x").unwrap().create(1 << 20).await.unwrap();
    let l = s.acquire("ns", "x", 0, 1 << 20, rdax_client::LeaseMode::ReadWrite).await.unwrap();
    l.write(0, &[1u8; 4096]).await.unwrap();
    c.object("ns", "x").unwrap().resize(4096).await.unwrap(); // recalls the lease
    assert!(c.object("ns", "missing").unwrap().stat().await.is_err());
    let addr = d.metrics.clone();
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics")).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let samples = parse_prometheus(&body);
    let get = |k: &str| {
        samples.iter().find(|(s, _)| s == k).map(|(_, v)| *v).unwrap_or_else(|| panic!("{k} missing:\n{body}"))
    };
    assert_eq!(get("rdax_pool_objects"), 1.0);
    assert_eq!(get("rdax_sessions"), 1.0);
    assert!(get("rdax_pool_bytes{state=\"used\"}") >= 4096.0);
    assert_eq!(get("rdax_dataplane_operations_total{transport=\"tcp\",op=\"write\"}"), 1.0);
    assert_eq!(get("rdax_dataplane_bytes_total{transport=\"tcp\",op=\"write\"}"), 4096.0);
    assert!(get("rdax_lease_recalls_total") >= 1.0);
    assert!(get("rdax_lease_recall_drained_seconds_count") >= 1.0);
    assert_eq!(get("rdax_grpc_errors_total{code=\"NOT_FOUND\"}"), 1.0);
    let addr = d.metrics.clone();
    let (status, _) = tokio::task::spawn_blocking(move || http_get(&addr, "/")).await.unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[test]
fn under_journald_lines_carry_their_syslog_priority() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // The harness appends the daemon's stderr to this file: make it the "journal stream".
    let log = dir.path().join("rdaxd.log");
    std::fs::write(&log, "").unwrap();
    let m = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", m.dev(), m.ino());
    let cfg = dir.path().join("rdaxd.toml");
    std::fs::write(&cfg, "[grpc]\nlisten = \"127.0.0.1:0\"\nlisten_typo = 1\n").unwrap();
    let d = Daemon::start_env(dir.path(), &["--config", cfg.to_str().unwrap()], &[("JOURNAL_STREAM", &stream)]);
    d.allow("unknown config key ignored");
    common::poll(Duration::from_secs(10), "the startup lines", || d.log().contains("serving").then_some(()));
    let text = d.log();
    let warn = text.lines().find(|l| l.contains("unknown config key ignored")).expect("the warning");
    assert!(warn.starts_with("<4>"), "{warn}");
    assert!(text.lines().filter(|l| l.contains(" INFO ")).all(|l| l.starts_with("<6>")), "{text}");
    // Without JOURNAL_STREAM (a terminal, a file), no prefix.
    let plain = tempfile::tempdir().unwrap();
    let d2 = Daemon::start(plain.path(), &[]);
    assert!(d2.log().lines().all(|l| !l.starts_with('<')), "{}", d2.log());
}
