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
