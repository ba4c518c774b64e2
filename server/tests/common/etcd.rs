//! A real etcd for cluster tests (Debian's `etcd-server`, on loopback ports with its own data
//! directory), and rdaxd members of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdax_client::{ClusterClient, ClusterOptions, ErrorKind};

use super::{Daemon, client, poll};

/// The etcd lease TTL the daemons use here: short, with room for a loaded machine's delays
/// in the quarter TTL between the fence and etcd's expiry.
pub const TTL: Duration = Duration::from_secs(3);

/// One etcd member on two free loopback ports.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    pub client: String,
    peer: String,
    /// The admin token every member of this test's cluster accepts (`token_file` holds it):
    /// members present it to each other (`cluster.peer_token_file`), and clients use it.
    pub token: String,
    pub token_file: PathBuf,
    /// For an etcd over TLS with client certificates and authentication ([`Etcd::start_secure`]).
    pub secure: Option<Secure>,
}

/// The files of a secure etcd: its CA, a client certificate, and its root user's password.
pub struct Secure {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    pub user: String,
    pub password: String,
    pub password_file: PathBuf,
}

impl Secure {
    /// The `[cluster]` lines of a member that reaches this etcd.
    pub fn member_toml(&self) -> String {
        format!(
            "etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}\netcd_user = {:?}\netcd_password_file = {:?}\n",
            self.ca, self.cert, self.key, self.user, self.password_file
        )
    }

    /// The SDK's access to this etcd.
    pub fn access(&self) -> rdax_client::EtcdAccess {
        rdax_client::EtcdAccess {
            ca_pem: Some(std::fs::read(&self.ca).unwrap()),
            identity_pem: Some((std::fs::read(&self.cert).unwrap(), std::fs::read(&self.key).unwrap())),
            user: Some((self.user.clone(), self.password.clone())),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn etcdctl(url: &str, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", url, "--command-timeout=2s"])
        .args(args)
        .output()
        .expect("etcdctl (Debian's etcd-client; scripts/install-deps.sh installs it)")
}

impl Etcd {
    pub fn start(dir: &Path) -> Self {
        let (token_file, token) = shared_token(dir);
        let mut e = Self {
            child: None,
            token,
            token_file,
            dir: dir.join("etcd"),
            client: String::new(),
            peer: String::new(),
            secure: None,
        };
        e.first_spawn("http");
        e
    }

    /// An etcd that serves clients over TLS only, requires a client certificate signed by its
    /// CA, and has authentication enabled (user `root`, a random password).
    pub fn start_secure(dir: &Path) -> Self {
        use super::certs;
        let ca = certs::ca("etcd test CA");
        let (sc, sk) = certs::leaf(&ca, "etcd", true, false);
        let (cc, ck) = certs::leaf(&ca, "rdax-member", false, false);
        let secret = |name: &str, text: &str| {
            let p = certs::write(dir, name, text);
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            p
        };
        let password = format!("etcd-pw-{:032x}", super::rand_u128());
        let secure = Secure {
            ca: certs::write(dir, "etcd-ca.pem", &ca.cert.pem()),
            server_cert: certs::write(dir, "etcd-server.pem", &sc),
            server_key: secret("etcd-server.key", &sk),
            cert: certs::write(dir, "etcd-client.pem", &cc),
            key: secret("etcd-client.key", &ck),
            user: "root".into(),
            password_file: secret("etcd-password", &format!("{password}\n")),
            password,
        };
        let (token_file, token) = shared_token(dir);
        let mut e = Self {
            child: None,
            token,
            token_file,
            dir: dir.join("etcd"),
            client: String::new(),
            peer: String::new(),
            secure: Some(secure),
        };
        e.first_spawn("https");
        let s = e.secure.as_ref().unwrap();
        let add = e.ctl_as(false, &["user", "add", "root", &format!("--new-user-password={}", s.password)]);
        assert!(add.status.success(), "etcdctl user add: {}", String::from_utf8_lossy(&add.stderr));
        let on = e.ctl_as(false, &["auth", "enable"]);
        assert!(on.status.success(), "etcdctl auth enable: {}", String::from_utf8_lossy(&on.stderr));
        e
    }

    /// etcdctl against this etcd, with its TLS files and root user when it has them.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_as(true, args)
    }

    fn ctl_as(&self, user: bool, args: &[&str]) -> std::process::Output {
        let Some(s) = &self.secure else { return etcdctl(&self.client, args) };
        let mut all = vec![
            format!("--cacert={}", s.ca.display()),
            format!("--cert={}", s.cert.display()),
            format!("--key={}", s.key.display()),
        ];
        if user {
            all.push(format!("--user={}:{}", s.user, s.password));
        }
        all.extend(args.iter().map(|a| a.to_string()));
        etcdctl(&self.client, &all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The first start, on two free ports. A port found free can be taken before etcd binds
    /// it (another test's listener, or a connection's ephemeral source port), and then etcd
    /// exits at once: such a start is tried again on fresh ports with a fresh data directory.
    fn first_spawn(&mut self, scheme: &str) {
        for attempt in 1.. {
            self.client = format!("{scheme}://127.0.0.1:{}", free_port());
            self.peer = format!("http://127.0.0.1:{}", free_port());
            match self.try_spawn() {
                Ok(()) => return,
                Err(why) if attempt < 5 => {
                    eprintln!("etcd start {attempt} failed ({why}); trying fresh ports");
                    let _ = std::fs::remove_dir_all(&self.dir);
                }
                Err(why) => panic!("etcd did not start after {attempt} tries: {why}"),
            }
        }
    }

    /// Start etcd again on the same ports and data (after [`Etcd::kill`]).
    pub fn spawn(&mut self) {
        for attempt in 1.. {
            match self.try_spawn() {
                Ok(()) => return,
                Err(why) if attempt < 3 => eprintln!("etcd restart {attempt} failed ({why}); trying again"),
                Err(why) => panic!("etcd did not restart after {attempt} tries: {why}"),
            }
        }
    }

    /// Spawn etcd and wait, bounded, until it answers health checks; `Err` (with the tail of
    /// its log) when it exits or does not become healthy in time.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("log")).unwrap();
        let mut cmd = Command::new("etcd");
        if let Some(s) = &self.secure {
            cmd.arg("--cert-file").arg(&s.server_cert).arg("--key-file").arg(&s.server_key);
            cmd.arg("--trusted-ca-file").arg(&s.ca).arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.client, "--advertise-client-urls", &self.client])
            .args(["--listen-peer-urls", &self.peer, "--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &format!("t={}", self.peer), "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/install-deps.sh installs it)");
        self.child = Some(child);
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.ctl_as(false, &["endpoint", "health"]).status.success() {
                return Ok(());
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || std::time::Instant::now() >= end {
                self.kill();
                let text = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                let state = match exited {
                    Some(status) => format!("etcd exited with {status}"),
                    None => "etcd not healthy after 30s".into(),
                };
                return Err(format!(
                    "{state}; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The values under `key` (a prefix when `prefix`).
    pub fn get(&self, key: &str, prefix: bool) -> Vec<serde_json::Value> {
        let mut args = vec!["get", key, "--print-value-only"];
        if prefix {
            args.push("--prefix");
        }
        let out = self.ctl(&args);
        assert!(out.status.success(), "etcdctl get: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).expect("a node record is JSON"))
            .collect()
    }

    /// The etcd lease `key` is attached to (0: none, or no key).
    pub fn lease_of(&self, key: &str) -> i64 {
        let out = self.ctl(&["get", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["kvs"][0]["lease"].as_i64().unwrap_or(0)
    }

    /// Seconds etcd still gives `lease` (-1: it has expired).
    pub fn ttl_of(&self, lease: i64) -> i64 {
        let out = self.ctl(&["lease", "timetolive", &format!("{lease:x}"), "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["ttl"].as_i64().unwrap_or(-1)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid: a stopped etcd must run to die.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill();
    }
}

/// A daemon in the cluster at `etcd` as `node`, with the test's short etcd lease TTL.
pub fn member(dir: &Path, etcd: &Etcd, node: &str) -> Daemon {
    member_with(dir, etcd, node, &[], "")
}

/// A token every member of a test's cluster accepts (admin), in a 0600 file under `dir`.
pub fn shared_token(dir: &Path) -> (PathBuf, String) {
    let t = format!("cluster-admin-{:032x}", super::rand_u128());
    let f = dir.join("cluster.token");
    std::fs::write(&f, &t).unwrap();
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (f, t)
}

/// [`member`] with extra flags, and extra `[cluster]` settings (TOML lines). Every member
/// accepts the cluster's shared token, and presents it to the others.
pub fn member_with(dir: &Path, etcd: &Etcd, node: &str, extra: &[&str], cluster: &str) -> Daemon {
    let cfg = dir.join("rdaxd.toml");
    let tf = etcd.token_file.to_str().unwrap();
    std::fs::write(
        &cfg,
        format!("[cluster]\nlease_ttl_ms = {}\npeer_token_file = {tf:?}\n{cluster}\n", TTL.as_millis()),
    )
    .unwrap();
    let mut args = vec!["--config", cfg.to_str().unwrap(), "--etcd", &etcd.client, "--node-id", node];
    args.extend_from_slice(&["--token-file", tf]);
    args.extend_from_slice(extra);
    let mut d = Daemon::start(dir, &args);
    d.token = Some(etcd.token.clone());
    d.allow("lost the etcd lease renewal").allow("cannot register in the cluster").allow("fenced:");
    d.allow("stopped coordinating");
    // A copy from a member that the test stops or kills fails, and is retried.
    d.allow("repair: copying the PG failed");
    // A node killed while others still copy PGs it held alone (as when the cluster forms):
    // the coordinator says those PGs are down until it comes back.
    d.allow("PGs down");
    d
}

/// `n` members `n0..` with replication `r`; waits for the map of all. Returns the cluster's
/// token too.
pub fn cluster(_root: &Path, etcd: &Etcd, n: usize, r: u8) -> (Vec<tempfile::TempDir>, Vec<Daemon>, String) {
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

pub async fn cluster_client(etcd: &Etcd, token: &str) -> ClusterClient {
    let mut opts = ClusterOptions { etcd: vec![etcd.client.clone()], ..ClusterOptions::default() };
    if let Some(s) = &etcd.secure {
        opts.etcd_access = s.access();
    }
    opts.connect.token = Some(token.to_string());
    ClusterClient::connect(opts).await.unwrap()
}

/// Content that names its object and version, so any mix-up shows.
pub fn tagged(name: &str, version: u64, len: usize) -> Vec<u8> {
    let tag = format!("[{name}#{version}]");
    tag.bytes().cycle().take(len.max(tag.len())).collect()
}

/// The bytes of `ns/name` on one node, read straight from it (no routing), or `None`.
pub async fn on_node(d: &Daemon, ns: &str, name: &str) -> Option<Vec<u8>> {
    let o = client(d).await.object(ns, name).unwrap();
    match o.stat().await {
        Ok(st) => Some(if st.size == 0 { Vec::new() } else { o.read(0, st.size).await.unwrap() }),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("stat {ns}/{name}: {e}"),
    }
}

/// The index of node `nI`.
pub fn index(id: &str) -> usize {
    id.trim_start_matches('n').parse().unwrap()
}

/// A seed for the randomised rounds: `RDAX_TEST_SEED` when set, else from the clock; printed.
pub fn seed() -> u64 {
    let s = std::env::var("RDAX_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("cluster fault test seed: {s} (RDAX_TEST_SEED={s} repeats it)");
    s
}

pub fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `rdaxctl --cluster etcd://... --json cluster status`.
pub fn status(etcd: &Etcd) -> serde_json::Value {
    let spec = etcd.client.replacen("http://", "etcd://", 1).replacen("https://", "etcds://", 1);
    let mut cmd = super::rdaxctl();
    if let Some(s) = &etcd.secure {
        cmd.arg("--etcd-ca").arg(&s.ca).arg("--etcd-cert").arg(&s.cert).arg("--etcd-key").arg(&s.key);
        cmd.args(["--etcd-user", &s.user]).arg("--etcd-password-file").arg(&s.password_file);
    }
    let out = cmd.args(["--cluster", &spec, "--json", "cluster", "status"]).output().unwrap();
    assert!(
        out.status.success(),
        "rdaxctl cluster status (build rdaxctl with --features cluster; scripts/test.sh does): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each object's last acknowledged version and its bytes.
pub type Acked = BTreeMap<String, (u64, Vec<u8>)>;

/// Writers putting tagged versions of their own 16 objects each (a third of them ranged
/// writes into the object's last version), recording every acknowledged version. A write
/// that was not acknowledged leaves its object undefined until a put of it succeeds, so a
/// writer repeats it as a whole put until one does.
pub struct Workload {
    acked: std::sync::Arc<std::sync::Mutex<Acked>>,
    puts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Writers finish their put and wait while set; `idle` counts those waiting.
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    idle: std::sync::Arc<std::sync::atomic::AtomicU64>,
    writers: Vec<tokio::task::JoinHandle<u32>>,
}

impl Workload {
    pub fn start(c: &ClusterClient, seed: u64, writers: u64) -> Self {
        let acked: std::sync::Arc<std::sync::Mutex<Acked>> = Default::default();
        let puts: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let paused: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let idle: std::sync::Arc<std::sync::atomic::AtomicU64> = Default::default();
        let writers = (0..writers)
            .map(|w| {
                let (c, acked, puts, stop) = (c.clone(), acked.clone(), puts.clone(), stop.clone());
                let (paused, idle) = (paused.clone(), idle.clone());
                let mut r = (seed ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
                tokio::spawn(async move {
                    let (mut version, mut failures) = (0u64, 0u32);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if paused.load(std::sync::atomic::Ordering::SeqCst) {
                            idle.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            while paused.load(std::sync::atomic::Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            idle.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        version += 1;
                        let name = format!("w{w}-{:02}", next(&mut r) % 16);
                        let had = acked.lock().unwrap().get(&name).map(|(_, d)| d.clone());
                        // A third of the writes patch a range of an object written before
                        // (this writer's own: nobody else writes it); the rest replace it.
                        let (data, patch) = match had {
                            Some(mut d) if next(&mut r).is_multiple_of(3) => {
                                let off = (next(&mut r) % d.len() as u64) as usize;
                                let len = 1 + (next(&mut r) % (d.len() - off) as u64) as usize;
                                let p = tagged(&name, version, len)[..len].to_vec();
                                d[off..off + len].copy_from_slice(&p);
                                (d, Some((off as u64, p)))
                            }
                            _ => (tagged(&name, version, 1 + (next(&mut r) % 300_000) as usize), None),
                        };
                        loop {
                            let r = match &patch {
                                Some((off, p)) => c.write_at("ns", &name, *off, p).await,
                                None => c.put("ns", &name, &data).await,
                            };
                            let Err(e) = r else { break };
                            // An unacknowledged write leaves the object undefined: a patch
                            // is repeated as a whole put.
                            eprintln!("write {name} v{version} not acknowledged: {e}");
                            failures += 1;
                            assert!(failures < 30, "the cluster stopped taking writes");
                            if patch.is_some() {
                                while let Err(e) = c.put("ns", &name, &data).await {
                                    eprintln!("put {name} v{version} not acknowledged: {e}");
                                    failures += 1;
                                    assert!(failures < 30, "the cluster stopped taking writes");
                                }
                                break;
                            }
                        }
                        acked.lock().unwrap().insert(name, (version, data));
                        puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        Self { acked, puts, stop, paused, idle, writers }
    }

    /// Let every writer finish its put and wait: what is acknowledged then is what the
    /// objects hold (a get concurrent with a put of the same object may see a mix of the two
    /// versions).
    pub async fn pause(&self) -> Acked {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while self.idle.load(std::sync::atomic::Ordering::SeqCst) < self.writers.len() as u64 {
            assert!(std::time::Instant::now() < deadline, "the writers did not pause within 90 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.acked()
    }

    /// Let the writers go on.
    pub fn resume(&self) {
        self.paused.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Wait (bounded) until `n` more puts are acknowledged.
    pub async fn wait_for_more(&self, n: u64) {
        let want = self.puts.load(std::sync::atomic::Ordering::Relaxed) + n;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while self.puts.load(std::sync::atomic::Ordering::Relaxed) < want {
            assert!(std::time::Instant::now() < deadline, "{n} more puts were not acknowledged within 90 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What has been acknowledged so far.
    pub fn acked(&self) -> Acked {
        self.acked.lock().unwrap().clone()
    }

    /// Stop the writers; what they had acknowledged.
    pub async fn stop(self) -> Acked {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in self.writers {
            let failures = w.await.unwrap();
            eprintln!("writer: {failures} puts not acknowledged (and repeated)");
        }
        self.acked.lock().unwrap().clone()
    }
}

/// Wait (bounded) until none of `nodes` reports a degraded PG; on a timeout, print what each
/// says of its repairs.
pub async fn wait_repaired(etcd: &Etcd, nodes: &[&Daemon]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !nodes.iter().all(|d| d.metric("rdax_cluster_pgs_degraded") == 0.0) {
        if std::time::Instant::now() > deadline {
            for d in nodes {
                let log = d.log();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains("repair") || l.contains("WARN")).collect();
                eprintln!("=== {} (degraded {})", d.dir.display(), d.metric("rdax_cluster_pgs_degraded"));
                eprintln!("{}", lines[lines.len().saturating_sub(15)..].join("\n"));
            }
            eprintln!("repair records: {:?}", etcd.get("/rdax/repair/", true));
            eprintln!("done records: {:?}", etcd.get("/rdax/repaired/", true));
            panic!("repair did not finish within 90 s (the seed is printed above)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait (bounded) until etcd's records say every PG is healthy (`rdaxctl cluster status`:
/// every replica registered, none still copying), then until no node reports one degraded.
pub async fn wait_healthy(etcd: &Etcd, nodes: &[&Daemon]) {
    poll(Duration::from_secs(90), "every PG healthy (rdaxctl cluster status)", || {
        let s = status(etcd);
        (s["pg_states"]["healthy"] == s["map"]["pgs"]).then_some(())
    });
    wait_repaired(etcd, nodes).await;
}

/// Every acknowledged object is on each of the `r` replicas the current map names,
/// byte-identical.
pub async fn check_replicas(c: &ClusterClient, nodes: &[Daemon], acked: &Acked, r: usize) {
    c.refresh().await.unwrap();
    for (name, (version, data)) in acked {
        let (_, replicas) = c.placement("ns", name).unwrap();
        assert_eq!(replicas.len(), r, "{name}: {replicas:?}");
        for id in &replicas {
            let got = on_node(&nodes[index(id)], "ns", name).await;
            assert!(
                got.as_deref() == Some(&data[..]),
                "{name} v{version} on replica {id}: {:?} bytes, want {}",
                got.map(|g| g.len()),
                data.len()
            );
        }
    }
}

/// Wait (bounded) until each of `names` in `ns` is on exactly the nodes the current map names
/// as its replicas: the others deleted their leftovers.
pub async fn wait_placed<'a>(c: &ClusterClient, nodes: &[Daemon], names: impl IntoIterator<Item = &'a String> + Clone) {
    c.refresh().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut misplaced = Vec::new();
        for name in names.clone() {
            let (_, replicas) = c.placement("ns", name).unwrap();
            for (i, d) in nodes.iter().enumerate() {
                let here = on_node(d, "ns", name).await.is_some();
                if here != replicas.contains(&format!("n{i}")) {
                    misplaced.push(format!("{name} {} n{i}", if here { "left on" } else { "missing from" }));
                }
            }
        }
        if misplaced.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "after 30 s, not where the map puts them: {misplaced:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
