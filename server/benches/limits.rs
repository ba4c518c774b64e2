//! Limits under load, against a real rdaxd (started here): what a bystander sees while another
//! client holds leases up to its cap and keeps asking for more, and what idle connections
//! cost. Prints figures; asserts nothing.
//!
//! ```text
//! cargo bench -p rdaxd --bench limits
//! ```
//! Under `cargo test` (no `--bench` flag) it runs a tiny smoke pass. For figures that mean
//! something, run it on an otherwise idle machine and say so when it was not.

mod common;

use std::time::{Duration, Instant};

use common::{pct, start};
use rdax_client::{Client, ErrorKind, LeaseMode};

/// CPU seconds (user + system) the process has used, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Latencies (µs) of `n` rounds of stat + create + delete by a client of its own.
async fn bystander(c: &Client, n: usize, tag: &str) -> Vec<f64> {
    let mut lat = Vec::with_capacity(n * 3);
    c.object("by", "fixed").unwrap().create(4096).await.ok();
    for i in 0..n {
        let name = format!("{tag}{i}");
        let o = c.object("by", &name).unwrap();
        let t = Instant::now();
        c.object("by", "fixed").unwrap().stat().await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        o.create(4096).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        o.delete().await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat
}

fn line(what: &str, lat: &mut [f64]) -> (f64, f64) {
    let (p50, p99) = (pct(lat, 0.5), pct(lat, 0.99));
    println!("  {what:<44} p50 {p50:8.1} µs  p99 {p99:8.1} µs  ({} calls)", lat.len());
    (p50, p99)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let scale = |full: usize, tiny: usize| if smoke { tiny } else { full };
    println!(
        "rdax limits bench{} — figures, not pass/fail",
        if smoke { " (smoke run: tiny, unoptimised; figures mean nothing)" } else { "" }
    );
    // Room for the idle connections below, in this process and the daemon it starts.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }

    // 1. A client at its lease cap, still asking, next to a bystander.
    let cap = scale(4096, 64);
    let cap_s = cap.to_string();
    let d = start(&["--max-leases-per-session", &cap_s]);
    let pid = d.child.id();
    let c = Client::connect(&d.grpc, d.opts()).await.unwrap();
    let rounds = scale(2000, 20);
    let _ = bystander(&c, rounds / 10, "warm").await;
    println!("pool-operation latency of a bystander (stat, create, delete; 2 worker threads):");
    let mut alone = bystander(&c, rounds, "a").await;
    let (a50, a99) = line("alone", &mut alone);
    let greedy = Client::connect(&d.grpc, d.opts()).await.unwrap();
    let s = std::sync::Arc::new(greedy.open_session("greedy").await.unwrap());
    for i in 0..64 {
        greedy.object("g", &format!("o{i}")).unwrap().create(1 << 20).await.unwrap();
    }
    let mut held = Vec::with_capacity(cap);
    let t = Instant::now();
    while held.len() < cap {
        let i = held.len();
        held.push(
            s.acquire("g", &format!("o{}", i % 64), (i / 64 % 256) as u64 * 4096, 4096, LeaseMode::Read).await.unwrap(),
        );
    }
    println!("  (the greedy session took its {cap} leases in {:.2} s)", t.elapsed().as_secs_f64());
    let mut idle_cap = bystander(&c, rounds, "i").await;
    let (i50, i99) = line("beside a client holding its cap, idle", &mut idle_cap);
    println!("  ratio beside-idle/alone: p50 {:.2}×  p99 {:.2}×", i50 / a50, i99 / a99);
    let stop = flag();
    let mut askers = Vec::new();
    for _ in 0..4 {
        let (s, stop) = (s.clone(), stop.clone());
        askers.push(tokio::spawn(async move {
            let mut refused = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match s.acquire("g", "o0", 0, 4096, LeaseMode::Read).await {
                    Err(e) if e.kind() == ErrorKind::ResourceExhausted => refused += 1,
                    other => panic!("over the cap: {other:?}"),
                }
            }
            refused
        }));
    }
    let cpu0 = cpu_secs(pid);
    let t = Instant::now();
    let mut beside = bystander(&c, rounds, "b").await;
    let busy = (cpu_secs(pid) - cpu0) / t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for a in askers {
        refused += a.await.unwrap();
    }
    let (b50, b99) = line("beside a client at its cap, 4 tasks asking", &mut beside);
    println!(
        "  ratio beside/alone: p50 {:.2}×  p99 {:.2}×; {refused} acquires refused meanwhile, {:.0}/s; daemon CPU {:.0} % of a core",
        b50 / a50,
        b99 / a99,
        refused as f64 / t.elapsed().as_secs_f64(),
        busy * 100.0
    );
    drop(held);
    drop(s);
    drop(d);

    // 2. Idle connections: gRPC and data plane, spread over 8 loopback source addresses
    //    (the per-source cap is 256 by default).
    let n = scale(1000, 40);
    let d = start(&[]);
    let pid = d.child.id();
    let c = Client::connect(&d.grpc, d.opts()).await.unwrap();
    let _ = bystander(&c, rounds / 10, "warm").await;
    let mut before = bystander(&c, rounds / 2, "c").await;
    let grpc_addr: std::net::SocketAddr = d.grpc.trim_start_matches("http://").parse().unwrap();
    let data_addr: std::net::SocketAddr = d.data.parse().unwrap();
    let mut idle = Vec::with_capacity(2 * n);
    for i in 0..2 * n {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.0.{}:0", 1 + i % 8).parse().unwrap()).unwrap();
        idle.push(sock.connect(if i % 2 == 0 { grpc_addr } else { data_addr }).await.unwrap());
    }
    // Let the accepts finish before measuring.
    let settle = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < 2 * n && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu0 = cpu_secs(pid);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(scale(5, 1) as u64)).await; // the measurement window
    let idle_cpu = (cpu_secs(pid) - cpu0) / t.elapsed().as_secs_f64();
    let mut during = bystander(&c, rounds / 2, "d").await;
    println!("{n} idle gRPC + {n} idle data-plane connections (8 source addresses):");
    println!(
        "  daemon CPU while they sit: {:.2} % of a core [target < 5 %]; daemon fds {}",
        idle_cpu * 100.0,
        open_fds(pid)
    );
    let (b50, _) = line("bystander before", &mut before);
    let (d50, _) = line("bystander with them open", &mut during);
    println!("  ratio p50 with/before: {:.2}×", d50 / b50);
    drop(idle);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}
