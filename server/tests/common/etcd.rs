//! A real etcd for cluster tests (Debian's `etcd-server`, on loopback ports with its own data
//! directory), and rdaxd members of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Daemon, poll};

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
            client: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
        };
        e.spawn();
        e
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("log")).unwrap();
        let child = Command::new("etcd")
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
        poll(Duration::from_secs(30), "etcd to be healthy", || {
            etcdctl(&self.client, &["endpoint", "health"]).status.success().then_some(())
        });
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
        let out = etcdctl(&self.client, &args);
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
        let out = etcdctl(&self.client, &["get", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["kvs"][0]["lease"].as_i64().unwrap_or(0)
    }

    /// Seconds etcd still gives `lease` (-1: it has expired).
    pub fn ttl_of(&self, lease: i64) -> i64 {
        let out = etcdctl(&self.client, &["lease", "timetolive", &format!("{lease:x}"), "-w", "json"]);
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
    // the coordinator says their copies now count as complete.
    d.allow("no complete copy of these PGs survives");
    d
}
