//! TLS next to plaintext, against two real rdaxd processes started here (one with a
//! certificate this bench makes, gRPC and the TCP data plane both over TLS): gRPC unary
//! request rate and streamed put/get throughput, then 1 MiB QD8 lease writes and reads on the
//! data plane, in the same run, interleaved. Prints figures; asserts nothing.
//!
//! ```text
//! cargo bench -p rdaxd --bench tls
//! cargo bench -p rdaxd --bench tls -- --data-only    # the data plane only
//! cargo bench -p rdaxd --bench tls -- --tls-data     # TLS data plane only: for a profiler
//! ```
//! Under `cargo test` (no `--bench` flag) it runs a tiny smoke pass.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::start;
use rdax_client::{Client, ConnectOptions, LeaseMode, TlsOptions};

/// MB/s of 1 MiB lease operations, 8 in flight, over `size` bytes `rounds` times: (write, read).
async fn data_plane_rate(c: &Client, size: u64, rounds: u64) -> (f64, f64) {
    let o = c.object("bench", "dp").unwrap();
    let _ = o.delete().await;
    o.create(size).await.unwrap();
    let s = c.open_session("dp-bench").await.unwrap();
    let l = Arc::new(s.acquire("bench", "dp", 0, size, LeaseMode::ReadWrite).await.unwrap());
    let chunk = Arc::new(vec![0x5Au8; 1 << 20]);
    // Untimed first touch: page faults are not what is compared.
    let mut off = 0;
    while off < size {
        l.write(off, &chunk).await.unwrap();
        off += 1 << 20;
    }
    let mut out = [0.0; 2];
    for (i, write) in [true, false].into_iter().enumerate() {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for q in 0..8u64 {
            let (l, chunk) = (l.clone(), chunk.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                for _ in 0..rounds {
                    let mut off = q << 20;
                    while off < size {
                        if write {
                            l.write(off, &chunk).await.unwrap();
                        } else {
                            l.read_into(off, &mut buf).await.unwrap();
                        }
                        off += 8 << 20;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        out[i] = (size * rounds) as f64 / t.elapsed().as_secs_f64() / 1e6;
    }
    Arc::try_unwrap(l).expect("the tasks are done").release().await.unwrap();
    s.close().await.unwrap();
    (out[0], out[1])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Stat calls per second from `clients` connections for `secs`.
async fn unary_rate(clients: &[Client], secs: f64) -> f64 {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let o = c.object("bench", "fixed").unwrap();
            let mut n = 0u64;
            while t0.elapsed().as_secs_f64() < secs {
                o.stat().await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// MB/s of one streamed put, then one get, of `len` bytes.
async fn stream_rate(c: &Client, len: usize) -> (f64, f64) {
    let o = c.object("bench", "big").unwrap();
    let _ = o.delete().await;
    o.create(len as u64).await.unwrap();
    let data = vec![0x5au8; len];
    let t = Instant::now();
    o.write(0, data, false).await.unwrap();
    let put = len as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let back = o.read(0, 0).await.unwrap();
    let get = back.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
    (put, get)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |name: &str| std::env::args().any(|a| a == name);
    let smoke = !arg("--bench");
    let tls_data = arg("--tls-data");
    let data_only = tls_data || arg("--data-only");
    let (secs, len, nclients) = if smoke { (0.2, 1 << 20, 2) } else { (3.0, 256 << 20, 8) };
    println!(
        "rdax TLS bench{} — figures, not pass/fail",
        if smoke { " (smoke run: tiny, unoptimised; figures mean nothing)" } else { "" }
    );
    // A CA and a server certificate for 127.0.0.1.
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cp, kp) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cp, cert.pem()).unwrap();
    std::fs::write(&kp, key.serialize_pem()).unwrap();
    let plain = start(&[]);
    let tls = start(&["--tls-cert", cp.to_str().unwrap(), "--tls-key", kp.to_str().unwrap(), "--data-tls"]);
    let tls_opts = || ConnectOptions {
        tls: Some(TlsOptions { ca_pem: ca.pem().into_bytes(), ..Default::default() }),
        ..tls.opts()
    };
    let mut results = Vec::new();
    let grpc_runs = match data_only {
        true => vec![],
        false => vec![
            ("plaintext", plain.grpc.clone(), plain.opts()),
            ("TLS", tls.grpc.replace("http://", "https://"), tls_opts()),
        ],
    };
    for (name, ep, opts) in grpc_runs {
        let mut clients = Vec::new();
        for _ in 0..nclients {
            clients.push(Client::connect(&ep, opts.clone()).await.unwrap());
        }
        clients[0].object("bench", "fixed").unwrap().create(4096).await.ok();
        let _ = unary_rate(&clients, secs / 4.0).await; // warm up
        let rate = unary_rate(&clients, secs).await;
        let (put, get) = stream_rate(&clients[0], len).await;
        println!(
            "  {name:<10} unary stat {rate:>9.0} calls/s ({nclients} connections)  put {put:>7.0} MB/s  get {get:>7.0} MB/s"
        );
        results.push((rate, put, get));
    }
    if let [p, t] = results[..] {
        println!(
            "  TLS / plaintext: unary {:.2}×  put {:.2}×  get {:.2}× (one run; 2 cores shared by both ends)",
            t.0 / p.0,
            t.1 / p.1,
            t.2 / p.2
        );
    }

    // The TCP data plane: plaintext moves payloads socket <-> mapping in the kernel; TLS
    // seals and opens records in user space, one copy between record and mapping.
    // Interleaved, three rounds each.
    let (size, rounds, reps) = if smoke { (8u64 << 20, 1, 1) } else { (256u64 << 20, 4, 3) };
    let plain_c = Client::connect(&plain.grpc, plain.opts()).await.unwrap();
    let tls_c = Client::connect(tls.grpc.replace("http://", "https://"), tls_opts()).await.unwrap();
    let (mut pw, mut pr, mut tw, mut tr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if tls_data {
        for _ in 0..reps {
            let (w, r) = data_plane_rate(&tls_c, size, rounds).await;
            println!("  TLS        write {w:>7.0}  read {r:>7.0} MB/s");
        }
        return;
    }
    for _ in 0..reps {
        let (w, r) = data_plane_rate(&plain_c, size, rounds).await;
        pw.push(w);
        pr.push(r);
        let (w, r) = data_plane_rate(&tls_c, size, rounds).await;
        tw.push(w);
        tr.push(r);
    }
    println!("data plane, 1 MiB QD8 over {} MiB x{rounds}, {reps} interleaved rounds (MB/s):", size >> 20);
    println!("  plaintext  write {pw:>7.0?}  read {pr:>7.0?}");
    println!("  TLS        write {tw:>7.0?}  read {tr:>7.0?}");
    let (mpw, mpr, mtw, mtr) = (median(pw), median(pr), median(tw), median(tr));
    println!(
        "  TLS / plaintext, median against median: write {:.2}×  read {:.2}× [target >= 0.6]",
        mtw / mpw,
        mtr / mpr
    );
}
