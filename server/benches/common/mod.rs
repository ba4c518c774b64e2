//! What the benches share: a real rdaxd started from the build (pool on tmpfs where there is
//! one), and percentiles.

#![allow(dead_code)] // each bench uses its part

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    pub child: Child,
    pub grpc: String,
    pub data: String,
    pub dir: PathBuf,
    /// The admin token the bench configured (TCP clients have no access without one).
    pub token: String,
}

impl Daemon {
    /// Connect options with the bench's token.
    pub fn opts(&self) -> rdax_client::ConnectOptions {
        rdax_client::ConnectOptions { token: Some(self.token.clone()), ..Default::default() }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start rdaxd with `extra` flags; returns once its ports file names its addresses.
pub fn start(extra: &[&str]) -> Daemon {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("rdax-bench-{}-{}", std::process::id(), extra.len()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ports = dir.join("ports.json");
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    let token = format!("bench-admin-{:032x}", u128::from_le_bytes(b));
    let token_file = dir.join("bench.token");
    std::fs::write(&token_file, &token).unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_rdaxd"))
        .args([
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .args([
            "--ports-file",
            ports.to_str().unwrap(),
            "--pool-size",
            "1G",
            "--log-level",
            "warn",
            "--max-sessions",
            "4096",
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (grpc, data) = loop {
        if let Ok(t) = std::fs::read_to_string(&ports)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
        {
            break (v["grpc"].as_str().unwrap().to_string(), v["data"].as_str().unwrap().to_string());
        }
        assert!(Instant::now() < deadline, "rdaxd did not start");
        std::thread::sleep(Duration::from_millis(10));
    };
    Daemon { child, grpc: format!("http://{grpc}"), data, dir, token }
}

/// The `p` quantile (0..=1) of `v` (sorted in place).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}
