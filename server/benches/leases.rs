//! Lease and data-plane benchmarks against a real rdaxd (started here, pool on tmpfs).
//! Prints figures and ratios to raw TCP measured in the same run; asserts nothing.
//!
//! ```text
//! cargo bench -p rdaxd --bench leases
//! ```
//! Under `cargo test` (no `--bench` flag) it runs a tiny smoke pass.
//!
//! For figures worth comparing, run it on an otherwise idle machine (`uptime` load well
//! under 0.5 before starting, no build or test in the background) and compare ratios from the
//! same run only: client, daemon and the raw TCP peer share the machine's cores, so any other
//! load moves rdax and its baseline differently.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use common::{pct, start};
use rdax_client::{Client, LeaseMode, LeaseRange, SessionOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw TCP peer that mimics the data plane's message sizes without a pool: for each
/// 48-byte header (+ `req_payload` bytes) it answers 16 bytes (+ `resp_payload`). Payloads go
/// to and come from a buffer of `span` bytes at rotating offsets, so the memory traffic is the
/// data plane's (a 256 MiB object), not a cache-resident buffer's.
async fn raw_peer(req_payload: usize, resp_payload: usize) -> SocketAddr {
    raw_peer_span(req_payload, resp_payload, 0).await
}

async fn raw_peer_span(req_payload: usize, resp_payload: usize, span: usize) -> SocketAddr {
    raw_peer_conns(req_payload, resp_payload, span, 1).await
}

/// As [`raw_peer`], with `conns` buffers of `span / conns` bytes allocated and touched before
/// any timing starts (one per expected connection).
async fn raw_peer_conns(req_payload: usize, resp_payload: usize, span: usize, conns: usize) -> SocketAddr {
    let payload = req_payload.max(resp_payload);
    let mut bufs: Vec<Vec<u8>> = (0..conns).map(|_| vec![1u8; (span / conns).max(payload)]).collect();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            s.set_nodelay(true).unwrap();
            let mut mem = bufs.pop().unwrap_or_else(|| vec![1u8; payload]);
            tokio::spawn(async move {
                let mut hdr = [0u8; 48];
                let mut at = 0usize;
                loop {
                    if s.read_exact(&mut hdr).await.is_err() {
                        return;
                    }
                    if at + payload > mem.len() {
                        at = 0;
                    }
                    if req_payload > 0 && s.read_exact(&mut mem[at..at + req_payload]).await.is_err() {
                        return;
                    }
                    if s.write_all(&[0u8; 16]).await.is_err() {
                        return;
                    }
                    if resp_payload > 0 && s.write_all(&mem[at..at + resp_payload]).await.is_err() {
                        return;
                    }
                    at += payload;
                }
            });
        }
    });
    addr
}

async fn raw_latency(req_payload: usize, resp_payload: usize, n: usize) -> Vec<f64> {
    let addr = raw_peer(req_payload, resp_payload).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = vec![1u8; 48 + req_payload];
    let mut resp = vec![0u8; 16 + resp_payload];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&req).await.unwrap();
        s.read_exact(&mut resp).await.unwrap();
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v
}

async fn raw_throughput(req_payload: usize, resp_payload: usize, qd: usize, total: usize, span: usize) -> f64 {
    let addr = raw_peer_conns(req_payload, resp_payload, span, qd).await;
    raw_throughput_at(addr, req_payload, resp_payload, qd, total, span).await
}

/// The raw peer in a process of its own (this bench binary again, with `--raw-peer`), as
/// rdaxd is: client and server then do not share one runtime's workers. Returns the figure
/// like [`raw_throughput`].
async fn raw_throughput_other_process(
    req_payload: usize,
    resp_payload: usize,
    qd: usize,
    total: usize,
    span: usize,
) -> f64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--raw-peer", &req_payload.to_string(), &resp_payload.to_string(), &span.to_string(), &qd.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: SocketAddr = line.trim().parse().unwrap();
    let r = raw_throughput_at(addr, req_payload, resp_payload, qd, total, span).await;
    drop(child.stdin.take()); // the peer exits when its stdin closes
    let _ = child.wait();
    r
}

/// `--raw-peer REQ RESP SPAN CONNS`: serve as a raw peer, print the address, run until stdin
/// closes.
async fn raw_peer_process(args: &[String]) {
    let n = |i: usize| args[i].parse::<usize>().unwrap();
    let addr = raw_peer_conns(n(0), n(1), n(2), n(3)).await;
    println!("{addr}");
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
}

async fn raw_throughput_at(
    addr: SocketAddr,
    req_payload: usize,
    resp_payload: usize,
    qd: usize,
    total: usize,
    span: usize,
) -> f64 {
    let per = total / qd;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..qd {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let req = vec![1u8; 48 + req_payload];
            let mut resp = vec![0u8; 16 + resp_payload];
            for _ in 0..per {
                s.write_all(&req).await.unwrap();
                s.read_exact(&mut resp).await.unwrap();
            }
        }));
        let _ = span;
    }
    for t in tasks {
        t.await.unwrap();
    }
    (per * qd) as f64 * req_payload.max(resp_payload) as f64 / t.elapsed().as_secs_f64() / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--raw-peer") {
        return raw_peer_process(&args[i + 1..]).await;
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let scale = |full: usize, tiny: usize| if smoke { tiny } else { full };
    println!(
        "rdax lease/data-plane bench{} — figures, not pass/fail",
        if smoke { " (smoke run: tiny, unoptimised; figures mean nothing)" } else { "" }
    );
    let d = start(&[]);
    let c = Client::connect(&d.grpc, d.opts()).await.unwrap();
    let s = c.open_session("bench").await.unwrap();

    // 4 KiB QD1 latency.
    let o = c.object("b", "lat").unwrap();
    o.create(1 << 20).await.unwrap();
    let l = s.acquire("b", "lat", 0, 1 << 20, LeaseMode::ReadWrite).await.unwrap();
    let n = scale(20_000, 50);
    let page = vec![7u8; 4096];
    for _ in 0..100 {
        l.write(0, &page).await.unwrap();
    }
    let mut wl = Vec::with_capacity(n);
    let mut rl = Vec::with_capacity(n);
    for i in 0..n {
        let off = (i % 256) as u64 * 4096;
        let t = Instant::now();
        l.write(off, &page).await.unwrap();
        wl.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        l.read(off, 4096).await.unwrap();
        rl.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut raw_w = raw_latency(4096, 0, n).await;
    let mut raw_r = raw_latency(0, 4096, n).await;
    let (w50, w99, r50, r99) = (pct(&mut wl, 0.5), pct(&mut wl, 0.99), pct(&mut rl, 0.5), pct(&mut rl, 0.99));
    let (rw50, rw99, rr50, rr99) =
        (pct(&mut raw_w, 0.5), pct(&mut raw_w, 0.99), pct(&mut raw_r, 0.5), pct(&mut raw_r, 0.99));
    println!(
        "4 KiB QD1 write: p50 {w50:.1} us  p99 {w99:.1} us | raw TCP p50 {rw50:.1} p99 {rw99:.1} | p50 ratio {:.2} [target <= 1.3]",
        w50 / rw50
    );
    println!(
        "4 KiB QD1 read:  p50 {r50:.1} us  p99 {r99:.1} us | raw TCP p50 {rr50:.1} p99 {rr99:.1} | p50 ratio {:.2} [target <= 1.3]",
        r50 / rr50
    );

    // 1 MiB QD8 throughput.
    let size = scale(256 << 20, 8 << 20) as u64;
    let big = c.object("b", "tp").unwrap();
    big.create(size).await.unwrap();
    let lb = Arc::new(s.acquire("b", "tp", 0, size, LeaseMode::ReadWrite).await.unwrap());
    let chunk = Arc::new(vec![0x5Au8; 1 << 20]);
    // Untimed warm-up: a fresh pool's pages are faulted in on first touch (tmpfs here; a
    // device-DAX pool maps them up front), which the pre-faulted raw baseline does not pay.
    let t_cold = Instant::now();
    let mut off = 0;
    while off < size {
        lb.write(off, &chunk).await.unwrap();
        off += 1 << 20;
    }
    println!(
        "1 MiB QD1 first-touch write pass: {:.0} MB/s (page faults included)",
        size as f64 / t_cold.elapsed().as_secs_f64() / 1e6
    );
    let rounds = scale(4, 1);
    for write in [true, false] {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for q in 0..8u64 {
            let (lb, chunk) = (lb.clone(), chunk.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                for r in 0..rounds as u64 {
                    let mut off = q << 20;
                    while off < size {
                        if write {
                            lb.write(off, &chunk).await.unwrap();
                        } else {
                            lb.read_into(off, &mut buf).await.unwrap();
                        }
                        off += 8 << 20;
                    }
                    let _ = r;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mbs = (size * rounds as u64) as f64 / t.elapsed().as_secs_f64() / 1e6;
        let total = (size as usize * rounds) >> 20;
        let (req, resp) = if write { (1 << 20, 0) } else { (0, 1 << 20) };
        let raw = raw_throughput(req, resp, 8, total, size as usize).await;
        let raw_hot = raw_throughput(req, resp, 8, total, 0).await;
        let raw_apart = raw_throughput_other_process(req, resp, 8, total, size as usize).await;
        println!(
            "1 MiB QD8 {}: {mbs:.0} MB/s | raw TCP, same footprint {raw:.0} MB/s (cache-hot buffer {raw_hot:.0}; \
             peer in a process of its own, as rdaxd is: {raw_apart:.0}) | ratio {:.2}, {:.2} to the separate peer [target >= {}]",
            if write { "write" } else { "read " },
            mbs / raw,
            mbs / raw_apart,
            if write { "0.9" } else { "0.95" }
        );
    }

    // Recall -> drained with 1,000 leases over 100 cooperative sessions: punch each lease's
    // range (one recall each) and time the punch, which includes recall, return, drain.
    let (sessions_n, per) = (scale(100, 4), 10usize);
    let mut holders = Vec::new();
    let mut leases = Vec::new();
    for i in 0..sessions_n {
        let name = format!("r{i}");
        c.object("b", &name).unwrap().create(per as u64 * 8192).await.unwrap();
        let hs = c.open_session(&format!("holder{i}")).await.unwrap();
        for j in 0..per {
            leases.push(hs.acquire("b", &name, j as u64 * 8192, 8192, LeaseMode::ReadWrite).await.unwrap());
        }
        holders.push(hs);
    }
    let mut lat = Vec::new();
    for i in 0..sessions_n {
        let obj = c.object("b", &format!("r{i}")).unwrap();
        for j in 0..per {
            let t = Instant::now();
            obj.punch_hole(j as u64 * 8192, 8192).await.unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "recall->drained ({} leases, {} sessions; punch latency incl. recall, return, drain): p50 {:.2} ms  p99 {:.2} ms [target p99 <= 20 ms]",
        leases.len(),
        sessions_n,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    drop(leases);
    drop(holders);

    // Revoke overshoot with an unresponsive holder (break timeout 100 ms).
    drop(d);
    let d = start(&["--lease-break-timeout-ms", "100"]);
    let c = Client::connect(&d.grpc, d.opts()).await.unwrap();
    let deaf = c
        .open_session_with(SessionOptions { client_name: "deaf".into(), ignore_recalls: true, ..Default::default() })
        .await
        .unwrap();
    let mut over = Vec::new();
    for i in 0..scale(30, 2) {
        let name = format!("d{i}");
        let o = c.object("b", &name).unwrap();
        o.create(8192).await.unwrap();
        let _l = deaf.acquire("b", &name, 0, 8192, LeaseMode::Read).await.unwrap();
        let t = Instant::now();
        o.resize(0).await.unwrap();
        over.push((t.elapsed().as_secs_f64() - 0.100) * 1e3);
    }
    println!(
        "revoke overshoot past the 100 ms deadline: p50 {:.2} ms  max {:.2} ms [target <= 5 ms]",
        pct(&mut over, 0.5),
        pct(&mut over, 1.0)
    );

    // Acquire + release pairs per second (4 concurrent sessions).
    c.object("b", "ar").unwrap().create(1 << 20).await.unwrap();
    let secs = if smoke { 0.2 } else { 3.0 };
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let s = c.open_session(&format!("ar{i}")).await.unwrap();
            let mut n = 0u64;
            while t.elapsed().as_secs_f64() < secs {
                let l = s.acquire("b", "ar", (i * 4096) % (1 << 20), 4096, LeaseMode::Read).await.unwrap();
                l.release().await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut pairs = 0;
    for t in tasks {
        pairs += t.await.unwrap();
    }
    println!(
        "acquire+release: {:.0} pairs/s (4 sessions, one range per call)",
        pairs as f64 / t.elapsed().as_secs_f64()
    );
    // The same through AcquireBatch/ReleaseBatch: 64 ranges per call.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let s = c.open_session(&format!("arb{i}")).await.unwrap();
            let ranges: Vec<LeaseRange> = (0..64u64)
                .map(|k| LeaseRange {
                    namespace: "b",
                    name: "ar",
                    offset: ((i * 64 + k) * 4096) % (1 << 20),
                    len: 4096,
                    mode: LeaseMode::Read,
                })
                .collect();
            let mut n = 0u64;
            while t.elapsed().as_secs_f64() < secs {
                let got: Vec<_> = s.acquire_batch(&ranges).await.unwrap().into_iter().map(|r| r.unwrap()).collect();
                n += got.len() as u64;
                for r in s.release_batch(got).await.unwrap() {
                    r.unwrap();
                }
            }
            n
        }));
    }
    let mut pairs = 0;
    for t in tasks {
        pairs += t.await.unwrap();
    }
    println!(
        "acquire+release, batched: {:.0} pairs/s (4 sessions, 64 ranges per AcquireBatch/ReleaseBatch) [target >= 20,000]",
        pairs as f64 / t.elapsed().as_secs_f64()
    );
}
