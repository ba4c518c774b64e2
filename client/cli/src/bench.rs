//! `rdaxctl bench`: unary ops/s with concurrent clients and streamed put/get throughput.
//! Prints figures; there is nothing to pass or fail.

use std::time::{Duration, Instant};

use rdax_client::Client;
use serde_json::json;

use crate::Failure;

/// Bench parameters.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds per unary measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Object size for put/get.
    #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "256M")]
    size: u64,
    /// Namespace to work in (objects are removed afterwards).
    #[arg(long, default_value = "rdax-bench")]
    namespace: String,
}

/// Run `op` on every client in a loop for `secs`; returns operations per second.
async fn hammer<F, Fut>(clients: &[Client], secs: f64, op: F) -> Result<f64, Failure>
where
    F: Fn(Client, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), rdax_client::Error>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, op) = (c.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                op(c.clone(), i, n).await?;
                n += 1;
            }
            Ok::<u64, rdax_client::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| Failure::local(e.into()))??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

pub(crate) async fn run(cli: &crate::Cli, client: &Client, args: &BenchArgs, json_out: bool) -> Result<(), Failure> {
    let ns = args.namespace.clone();
    // One connection per client: a single HTTP/2 connection would serialise on one socket.
    let mut conns = Vec::new();
    for _ in 0..args.clients.max(1) {
        conns.push(crate::online::connect(cli).await?);
    }
    let target = client.object(&ns, "stat-target")?;
    let _ = target.delete().await;
    target.create(4096).await?;
    let stat_ns = ns.clone();
    let stat_rate = hammer(&conns, args.seconds, move |c, _, _| {
        let ns = stat_ns.clone();
        async move { c.object(&ns, "stat-target")?.stat().await.map(drop) }
    })
    .await?;
    let cd_ns = ns.clone();
    let pair_rate = hammer(&conns, args.seconds, move |c, i, n| {
        let ns = cd_ns.clone();
        async move {
            let o = c.object(&ns, &format!("cd-{i}-{n}"))?;
            o.create(4096).await?;
            o.delete().await
        }
    })
    .await?;
    let data = vec![0x5Au8; args.size as usize];
    let o = client.object(&ns, "stream")?;
    let _ = o.delete().await;
    o.create(args.size).await?;
    let t = Instant::now();
    o.write_from(0, std::io::Cursor::new(data), false, true, None).await?;
    let put_mbs = args.size as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    let mut sink = tokio::io::sink();
    let got = o.read_to(0, 0, &mut sink, None).await?;
    let get_mbs = got as f64 / t.elapsed().as_secs_f64() / 1e6;
    o.delete().await?;
    target.delete().await?;
    let info = client.info().await?;
    let v = json!({
        "clients": args.clients, "pool_mode": info.mode, "persistence": info.persistence,
        "stat_per_s": stat_rate, "create_delete_pairs_per_s": pair_rate,
        "put_mb_per_s": put_mbs, "get_mb_per_s": get_mbs, "object_bytes": args.size,
    });
    crate::output::emit(json_out, &v, || {
        format!(
            "pool: {} ({})\nunary stat:            {stat_rate:>10.0} ops/s   ({} clients) [target >= 10,000]\ncreate+delete pairs:   {pair_rate:>10.0} pairs/s ({} clients)\nput (persist) {:>4} MiB: {put_mbs:>10.0} MB/s [target >= 500]\nget           {:>4} MiB: {get_mbs:>10.0} MB/s [target >= 500]",
            info.mode,
            info.persistence,
            args.clients,
            args.clients,
            args.size >> 20,
            args.size >> 20
        )
    });
    Ok(())
}

/// `rdaxctl lease-bench` parameters.
#[derive(clap::Args, Debug)]
pub(crate) struct LeaseBenchArgs {
    /// Operation: write (no flush per op) or read.
    #[arg(long, value_parser = ["write", "read"], default_value = "write")]
    op: String,
    /// Bytes per operation.
    #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "64K")]
    size: u64,
    /// Operations in flight (1 measures latency).
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Size of the leased object region the operations cycle over.
    #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "64M")]
    region: u64,
    /// Namespace to work in (the object is removed afterwards).
    #[arg(long, default_value = "rdax-bench")]
    namespace: String,
    /// RDMA: copy through the SDK's staging buffers (`Lease::write`/`read`) instead of moving
    /// bytes straight from registered buffers (`Lease::write_buf`/`read_buf`).
    #[arg(long)]
    copy: bool,
    /// Pick each operation's slot at random (uniform, as fio's randread/randwrite do) instead
    /// of cycling through the region's slots in order.
    #[arg(long)]
    random: bool,
}

/// Bandwidth or latency through one lease, over whichever data plane the session chose.
pub(crate) async fn lease_bench(
    cli: &crate::Cli,
    client: &Client,
    a: &LeaseBenchArgs,
    json_out: bool,
) -> Result<(), Failure> {
    use std::sync::Arc;
    let size = a.size.max(1);
    // Cycle over at most 4096 slots: enough to defeat caching effects, small enough to fill.
    let slots = (a.region / size).clamp(1, 4096);
    let region = slots * size;
    let o = client.object(&a.namespace, "lease-bench")?;
    let _ = o.delete().await;
    o.create(region).await?;
    let s = client.open_session_with(cli.session_options("rdaxctl lease-bench")).await?;
    let l = Arc::new(s.acquire(&a.namespace, "lease-bench", 0, region, rdax_client::LeaseMode::ReadWrite).await?);
    let transport = if l.is_rdma() { "rdma" } else { "tcp" };
    let fill = vec![0xA5u8; size as usize];
    if a.op == "read" {
        let block = vec![0xA5u8; 1 << 20];
        for off in (0..region).step_by(1 << 20) {
            let n = (region - off).min(1 << 20) as usize;
            l.write(off, &block[..n]).await?;
        }
    }
    // Warm up (connections, first-touch of the region) before the clock starts.
    for i in 0..slots.min(a.depth as u64 * 2) {
        l.write(i * size, &fill).await?;
    }
    #[cfg(feature = "rdma")]
    let zero_copy = l.is_rdma() && !a.copy;
    #[cfg(not(feature = "rdma"))]
    let zero_copy = false;
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..a.depth.max(1) {
        let (l, fill, read, random) = (l.clone(), fill.clone(), a.op == "read", a.random);
        let depth = a.depth.max(1) as u64;
        #[cfg(feature = "rdma")]
        let mut rbuf = if zero_copy {
            let mut b = s.rdma_buffer(size as usize).await?;
            b.as_mut_slice().fill(0xA5);
            Some(b)
        } else {
            None
        };
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut buf = vec![0u8; size as usize];
            let mut n = t as u64;
            // xorshift64: cheap, and good enough to spread offsets; one seed per task.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            // One clock read per operation (its end is the next one's start), as perftest
            // reads its cycle counter once per iteration: in the lab's TCG VM a clock read
            // costs about 0.5 µs, which three reads per operation would add to rdax's latency.
            let mut s = Instant::now();
            while s < deadline {
                let slot = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % slots
                } else {
                    n % slots
                };
                let off = slot * size;
                #[cfg(feature = "rdma")]
                if let Some(b) = rbuf.take() {
                    let (r, b) = if read {
                        l.read_buf(off, b, 0..size as usize).await
                    } else {
                        l.write_buf(off, b, 0..size as usize).await
                    };
                    r?;
                    rbuf = Some(b);
                    let now = Instant::now();
                    lat.push((now - s).as_nanos() as u64);
                    s = now;
                    n += depth;
                    continue;
                }
                if read {
                    l.read_into(off, &mut buf).await?;
                } else {
                    l.write(off, &fill).await?;
                }
                let now = Instant::now();
                lat.push((now - s).as_nanos() as u64);
                s = now;
                n += depth;
            }
            Ok::<Vec<u64>, rdax_client::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| Failure::local(e.into()))??);
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0) as f64 / 1e3;
    let ops = lat.len() as f64;
    let mbs = ops * size as f64 / secs / 1e6;
    if let Ok(l) = Arc::try_unwrap(l) {
        l.release().await?;
    }
    s.close().await?;
    o.delete().await?;
    let v = json!({
        "transport": transport, "zero_copy": zero_copy, "op": a.op, "size": size, "depth": a.depth, "seconds": secs,
        "random": a.random, "ops": ops, "ops_per_s": ops / secs, "mb_per_s": mbs, "lat_us_p50": pct(0.5), "lat_us_p99": pct(0.99),
        "lat_us_min": pct(0.0), "lat_us_avg": lat.iter().sum::<u64>() as f64 / ops.max(1.0) / 1e3,
    });
    crate::output::emit(json_out, &v, || {
        format!(
            "{transport}{} {} {size} B x depth {}: {mbs:.2} MB/s, {:.0} ops/s, latency us min {:.1} p50 {:.1} p99 {:.1}",
            if zero_copy { " (zero-copy)" } else { "" },
            a.op,
            a.depth,
            ops / secs,
            pct(0.0),
            pct(0.5),
            pct(0.99)
        )
    });
    Ok(())
}
