//! Real-process harness: start `rdaxd` on 127.0.0.1:0, learn its port from the ports file
//! (polled with a deadline, never a fixed sleep), drive it, stop it with signals.

#![allow(dead_code)]

pub mod certs;
#[cfg(feature = "cluster")]
pub mod etcd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdax_proto::dataplane::{self as wire, Op, Request, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Daemon {
    child: Option<Child>,
    pub endpoint: String,
    pub data: String,
    pub metrics: String,
    /// RDMA endpoint, empty when not serving.
    pub rdma: String,
    /// NBD address, empty when not serving.
    pub nbd: String,
    pub envs: Vec<(String, String)>,
    pub dir: PathBuf,
    pub args: Vec<String>,
    /// The admin token the harness configured (`None` when the test set up credentials of
    /// its own): TCP clients have no access without one.
    pub token: Option<String>,
    /// The admin socket, from the ports file.
    pub admin_socket: Option<PathBuf>,
    /// WARN/ERROR messages this test expects (substrings), beyond [`ALWAYS_ALLOWED`].
    allowed: std::sync::Mutex<Vec<String>>,
}

/// WARN/ERROR lines any test may produce: none so far. A test that provokes a warning on
/// purpose says so with [`Daemon::allow`]; any other WARN or ERROR line in the daemon's log
/// fails the test when the `Daemon` is dropped (neon's `allowed_errors`).
pub const ALWAYS_ALLOWED: &[&str] = &[];

/// Poll `f` every few milliseconds until it returns `Some` or `deadline` passes.
pub fn poll<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn rdaxd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rdaxd"))
}

/// `rdaxctl` sits next to `rdaxd` when the workspace is built (`cargo test --workspace`).
pub fn rdaxctl() -> Command {
    let p = rdaxd_bin().with_file_name("rdaxctl");
    assert!(p.exists(), "{} is missing: build it with `cargo build -p rdaxctl` (scripts/test.sh does)", p.display());
    Command::new(p)
}

impl Daemon {
    /// Start rdaxd with its state in `dir` and extra flags.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_env(dir, extra, &[])
    }

    /// Start with extra environment variables.
    pub fn start_env(dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_with(dir, extra, envs, true)
    }

    /// Start with no credential configured at all (the embedded default's auth).
    pub fn start_bare(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(dir, extra, &[], false)
    }

    fn start_with(dir: &Path, extra: &[&str], envs: &[(&str, &str)], harness_token: bool) -> Self {
        let mut args: Vec<String> = vec![
            "--state-dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--ports-file".into(),
            dir.join("ports.json").display().to_string(),
            "--data-listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if !extra.contains(&"--pool-size") {
            args.extend(["--pool-size".to_string(), "64M".to_string()]);
        }
        // Unless the test brings its own credentials, one admin token (in a 0600 file, never
        // on argv), since TCP clients get nothing without a credential.
        let config_auth = extra
            .iter()
            .position(|a| *a == "--config")
            .and_then(|i| std::fs::read_to_string(extra.get(i + 1)?).ok())
            .is_some_and(|t| t.contains("[auth]"));
        let own_auth = config_auth
            || extra.iter().any(|a| ["--token-file", "--principals-file"].contains(a))
            || envs.iter().any(|(k, _)| *k == "RDAX_TOKEN" || *k == "RDAX_TOKEN_FILE" || *k == "RDAX_PRINCIPALS_FILE");
        let token = (harness_token && !own_auth).then(|| {
            let t = format!("harness-admin-{:032x}", rand_u128());
            let f = dir.join("harness.token");
            std::fs::write(&f, &t).unwrap();
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            args.extend(["--token-file".to_string(), f.display().to_string()]);
            t
        });
        args.extend(extra.iter().map(|s| s.to_string()));
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Self {
            child: None,
            endpoint: String::new(),
            data: String::new(),
            metrics: String::new(),
            rdma: String::new(),
            nbd: String::new(),
            envs,
            dir: dir.to_path_buf(),
            args,
            token,
            admin_socket: None,
            allowed: Default::default(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let ports = self.dir.join("ports.json");
        let _ = std::fs::remove_file(&ports);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("rdaxd.log")).unwrap();
        let mut cmd = Command::new(rdaxd_bin());
        cmd.args(&self.args).env_remove("RDAX_TOKEN").env("RDAX_LOG_LEVEL", "info");
        for (k, v) in &self.envs {
            // `unset` removes a variable the harness would otherwise set.
            if v == "unset" {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("spawn rdaxd");
        self.child = Some(child);
        let addr = poll(START_DEADLINE, "rdaxd to report its port", || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("rdaxd exited during startup ({status}):\n{}", self.log());
            }
            let text = std::fs::read_to_string(&ports).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            let metrics = v["metrics"].as_str().unwrap_or_default().to_string();
            let rdma = v["rdma"].as_str().unwrap_or_default().to_string();
            let admin = v["admin"].as_str().map(PathBuf::from);
            let nbd = v["nbd"].as_str().unwrap_or_default().to_string();
            Some((v["grpc"].as_str()?.to_string(), v["data"].as_str()?.to_string(), metrics, rdma, admin, nbd))
        });
        self.nbd = addr.5;
        self.admin_socket = addr.4;
        self.endpoint = format!("http://{}", addr.0);
        self.data = addr.1;
        self.metrics = addr.2;
        self.rdma = addr.3;
    }

    /// Start again with the same arguments, after it exited.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "rdaxd is still running");
        self.spawn();
    }

    /// Stop with SIGTERM and start again with the same arguments.
    pub fn restart(&mut self) {
        let st = self.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
        assert!(st.success(), "rdaxd exit status {st}\n{}", self.log());
        self.spawn();
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Send `sig` and wait (bounded) for the exit.
    pub fn signal_and_wait(&mut self, sig: i32, bound: Duration) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(bound)
    }

    /// Send `sig` without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait (bounded) for the exit.
    pub fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let st = poll(bound, "rdaxd to exit", || child.try_wait().unwrap());
        self.child = None;
        st
    }

    /// Expect WARN/ERROR lines containing `pattern`.
    pub fn allow(&self, pattern: &str) -> &Self {
        self.allowed.lock().unwrap().push(pattern.to_string());
        self
    }

    /// WARN and ERROR lines of the log that no allow-list entry covers.
    pub fn unexpected_log_lines(&self) -> Vec<String> {
        let allowed = self.allowed.lock().unwrap();
        self.log()
            .lines()
            .filter(|l| {
                let level = l.split_whitespace().nth(1).unwrap_or_default();
                (level == "WARN" || level == "ERROR")
                    && !ALWAYS_ALLOWED.iter().any(|a| l.contains(a))
                    && !allowed.iter().any(|a| l.contains(a.as_str()))
            })
            .map(str::to_string)
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("rdaxd.log")).unwrap_or_default()
    }

    pub fn pool_path(&self) -> PathBuf {
        self.dir.join("default.pool")
    }

    /// One sample of the Prometheus text served on the metrics address.
    pub fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("metrics listener");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: rdax\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
    }

    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.rdaxctl().args(args).output().expect("run rdaxctl")
    }

    /// `rdaxctl` pointed at this daemon's TCP endpoint with its harness token (in the
    /// environment, as a user would pass it, never on argv).
    pub fn rdaxctl(&self) -> Command {
        let mut c = rdaxctl();
        c.arg("--endpoint").arg(&self.endpoint);
        if let Some(t) = &self.token {
            c.env("RDAX_TOKEN", t);
        }
        c
    }

    /// Connect options carrying the harness token.
    pub fn connect_options(&self) -> rdax_client::ConnectOptions {
        rdax_client::ConnectOptions { token: self.token.clone(), ..Default::default() }
    }

    /// A raw tonic channel to the daemon that sends the harness token, for checks the SDK
    /// would never let through.
    pub async fn channel(&self) -> Authed {
        let ch = tonic::transport::Endpoint::from_shared(self.endpoint.clone()).unwrap().connect().await.unwrap();
        let header = self.token.as_ref().map(|t| format!("Bearer {t}").parse().unwrap());
        tonic::service::interceptor::InterceptedService::new(ch, TokenHeader(header))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Had it exited by itself before the test let go of it?
        let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // The state directory goes with the test: keep the evidence in its output.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_ON_FAILURE).collect();
            let status = exited.map_or("still running".to_string(), |s| format!("had exited: {s}"));
            eprintln!(
                "--- rdaxd at {} ({status}), last {} log lines ---\n{}",
                self.endpoint,
                tail.len(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        } else {
            let bad = self.unexpected_log_lines();
            assert!(
                bad.is_empty(),
                "unexpected WARN/ERROR lines in the log of rdaxd at {}:\n{}",
                self.endpoint,
                bad.join("\n")
            );
        }
    }
}

/// How much of a daemon's log a failing test prints.
const LOG_TAIL_ON_FAILURE: usize = 40;

pub async fn client(d: &Daemon) -> rdax_client::Client {
    rdax_client::Client::connect(&d.endpoint, d.connect_options()).await.expect("connect")
}

/// A channel that sends a bearer token with every request.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenHeader>;

/// Adds `authorization: Bearer …` when set.
#[derive(Clone)]
pub struct TokenHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenHeader {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    }
}

/// 128 random bits (from the kernel), for tokens.
pub fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    u128::from_le_bytes(b)
}

/// A raw data-plane connection, for checks the SDK would never let through.
pub struct Raw(pub tokio::net::TcpStream);

impl Raw {
    pub async fn connect(addr: &str, session: [u8; 16]) -> (Self, Status) {
        Self::hello(tokio::net::TcpStream::connect(addr).await.unwrap(), session).await
    }

    /// HELLO on a connected stream.
    pub async fn hello(mut s: tokio::net::TcpStream, session: [u8; 16]) -> (Self, Status) {
        let hello =
            Request { op: Op::Hello, flags: 0, id: 1, key: session, generation: wire::VERSION, offset: 0, len: 0 };
        s.write_all(&hello.encode()).await.unwrap();
        let mut r = Raw(s);
        let st = r.status(1).await;
        (r, st)
    }

    pub async fn status(&mut self, id: u32) -> Status {
        let mut b = [0u8; wire::RESP_LEN];
        self.0.read_exact(&mut b).await.unwrap();
        let (rid, st, _) = wire::decode_response(&b).unwrap();
        assert_eq!(rid, id);
        st
    }

    pub async fn op(
        &mut self,
        op: Op,
        key: [u8; 16],
        generation: u64,
        offset: u64,
        payload: &[u8],
        len: u32,
    ) -> Status {
        let r = Request { op, flags: 0, id: 7, key, generation, offset, len };
        self.0.write_all(&r.encode()).await.unwrap();
        if op == Op::Write {
            self.0.write_all(payload).await.unwrap();
        }
        let st = self.status(7).await;
        if op == Op::Read && st == Status::Ok {
            let mut sink = vec![0u8; len as usize];
            self.0.read_exact(&mut sink).await.unwrap();
        }
        st
    }
}

#[cfg(feature = "testing")]
use rdax_proto::testing_pb::{self as tpb, testing_client::TestingClient};

/// The daemon's test-only `Testing` service (failpoints, audits), in `testing` builds.
#[cfg(feature = "testing")]
pub struct Testing(pub TestingClient<Authed>);

#[cfg(feature = "testing")]
impl Testing {
    pub async fn new(d: &Daemon) -> Self {
        Testing(TestingClient::new(d.channel().await))
    }

    pub async fn set(&mut self, name: &str, action: &str) {
        let req = tpb::SetFailpointRequest { name: name.into(), action: action.into() };
        self.0.set_failpoint(req).await.unwrap();
    }

    pub async fn point(&mut self, name: &str) -> tpb::Failpoint {
        let list = self.0.list_failpoints(tpb::ListFailpointsRequest {}).await.unwrap().into_inner();
        list.failpoints.into_iter().find(|f| f.name == name).unwrap_or_default()
    }

    pub async fn until(&mut self, what: &str, mut f: impl FnMut(&tpb::AuditResponse) -> bool) -> tpb::AuditResponse {
        let t0 = Instant::now();
        loop {
            let a = self.0.audit(tpb::AuditRequest {}).await.unwrap().into_inner();
            if f(&a) {
                return a;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}: {a:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub async fn paused_at(&mut self, name: &str) {
        let t0 = Instant::now();
        while self.point(name).await.paused == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "nothing paused at {name}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The abandoned handler is gone: no request is in the gate (the Testing service is not
    /// gated, so the audit itself does not count).
    pub async fn handler_dropped(&mut self) {
        self.until("the daemon to drop the abandoned handler", |a| !a.inside.contains("grpc requests")).await;
    }

    pub async fn clean(&mut self, ctx: &str) {
        let a = self.0.audit(tpb::AuditRequest {}).await.unwrap().into_inner();
        assert!(a.problems.is_empty(), "{ctx}: {:?}", a.problems);
    }
}
