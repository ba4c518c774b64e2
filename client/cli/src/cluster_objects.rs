//! `rdaxctl --cluster etcd://HOST:PORT create|resize|put|get|ls|stat|rm`: objects over a whole
//! cluster, through the SDK's `ClusterClient` (routed by the PG map, writes to every replica).

use crate::Cmd;

/// Whether `cmd` has a cluster form.
pub(crate) fn is_cluster_command(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Create { .. }
            | Cmd::Resize { .. }
            | Cmd::Put { .. }
            | Cmd::Get { .. }
            | Cmd::Ls { .. }
            | Cmd::Stat { .. }
            | Cmd::Rm { .. }
    )
}

#[cfg(not(feature = "cluster"))]
pub(crate) async fn run(_cli: &crate::Cli, _urls: Vec<String>) -> Result<(), crate::Failure> {
    Err(crate::Failure::local(anyhow::anyhow!(
        "this rdaxctl was built without cluster support: build it with `--features cluster` (it needs protoc: \
         scripts/install-deps.sh installs it)"
    )))
}

#[cfg(not(feature = "cluster"))]
pub(crate) async fn bench(
    cli: &crate::Cli,
    urls: Vec<String>,
    _args: &crate::cluster::BenchArgs,
) -> Result<(), crate::Failure> {
    run(cli, urls).await
}

#[cfg(feature = "cluster")]
pub(crate) use with_etcd::{bench, run};

#[cfg(feature = "cluster")]
mod with_etcd {
    use anyhow::Context;
    use rdax_client::{ClusterClient, ClusterOptions};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::online::{connect_options, ls_emit, stat_json, stat_text};
    use crate::output::{emit, human};
    use crate::{Cli, Cmd, Failure};

    async fn connect(cli: &Cli, urls: Vec<String>) -> Result<ClusterClient, Failure> {
        let opts = ClusterOptions {
            etcd_access: crate::cluster::etcd_access(cli, &urls)?,
            etcd: urls,
            prefix: cli.cluster_prefix.clone(),
            session: cli.session_options("rdaxctl"),
            connect: rdax_client::ConnectOptions {
                connect_timeout: ClusterOptions::default().connect.connect_timeout,
                request_timeout: ClusterOptions::default().connect.request_timeout,
                ..connect_options(cli)?
            },
            ..ClusterOptions::default()
        };
        Ok(ClusterClient::connect(opts).await?)
    }

    /// `rdaxctl cluster bench`: `writers` tasks put whole objects of `size` bytes for `seconds`.
    pub(crate) async fn bench(cli: &Cli, urls: Vec<String>, a: &crate::cluster::BenchArgs) -> Result<(), Failure> {
        let c = connect(cli, urls).await?;
        let view = c.view();
        let data: std::sync::Arc<Vec<u8>> = std::sync::Arc::new((0..a.size).map(|i| (i % 251) as u8).collect());
        let end = std::time::Instant::now() + std::time::Duration::from_secs(a.seconds);
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..a.writers)
            .map(|w| {
                let (c, data, ns, objects, puts) =
                    (c.clone(), data.clone(), a.namespace.clone(), a.objects.max(1), a.puts);
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 0u32;
                    while puts.map_or(std::time::Instant::now() < end, |n| i < n) {
                        let t = std::time::Instant::now();
                        c.put(&ns, &format!("w{w}-{}", i % objects), &data).await?;
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                        i += 1;
                    }
                    Ok::<_, rdax_client::Error>(lat)
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.map_err(|e| Failure::local(anyhow::anyhow!("a writer panicked: {e}")))??);
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
        let puts = lat.len() as f64;
        let replicas = view.map.as_ref().map_or(0, |m| m.replicas);
        let v = json!({
            "nodes": view.nodes.len(), "replicas": replicas, "size": a.size, "writers": a.writers,
            "seconds": secs, "puts": lat.len(), "puts_per_s": puts / secs,
            "mib_per_s": puts * a.size as f64 / secs / f64::from(1 << 20),
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        });
        emit(cli.json, &v, || {
            format!(
                "{} puts of {} in {secs:.1} s over {} nodes (R = {replicas}, {} writers): {:.1} puts/s, {:.1} MiB/s \
                 acknowledged; latency p50 {:.2} ms, p99 {:.2} ms",
                lat.len(),
                human(a.size),
                view.nodes.len(),
                a.writers,
                puts / secs,
                puts * a.size as f64 / secs / f64::from(1 << 20),
                pct(0.5),
                pct(0.99)
            )
        });
        Ok(())
    }

    pub(crate) async fn run(cli: &Cli, urls: Vec<String>) -> Result<(), Failure> {
        let json = cli.json;
        let c = connect(cli, urls).await?;
        match &cli.cmd {
            Cmd::Create { object, size } => {
                let s = c.create(&object.ns, &object.name, *size).await?;
                emit(json, &stat_json(&s), || format!("created {}/{} ({})", s.namespace, s.name, human(s.size)));
            }
            Cmd::Resize { object, size, grow_only } => {
                let (ns, name) = (&object.ns, &object.name);
                let s = if *grow_only { c.grow(ns, name, *size).await? } else { c.resize(ns, name, *size).await? };
                emit(json, &stat_json(&s), || format!("{}/{} is now {}", s.namespace, s.name, human(s.size)));
            }
            Cmd::Put { object, file, offset, no_persist } => {
                if *no_persist {
                    return Err(Failure::invalid(anyhow::anyhow!(
                        "over a cluster, a write is acknowledged once every replica persisted it: --no-persist is \
                         for a single daemon"
                    )));
                }
                let mut data = Vec::new();
                match file.as_deref().filter(|f| f.as_os_str() != "-") {
                    Some(f) => {
                        data = tokio::fs::read(f).await.with_context(|| format!("read {}", f.display()))?;
                    }
                    None => {
                        tokio::io::stdin().read_to_end(&mut data).await.context("read stdin")?;
                    }
                }
                let r = match offset {
                    Some(off) => {
                        // As on a single daemon, the object grows to take the input.
                        let end = off.saturating_add(data.len() as u64);
                        c.grow(&object.ns, &object.name, end).await?;
                        c.write_at(&object.ns, &object.name, *off, &data).await?
                    }
                    None => c.put(&object.ns, &object.name, &data).await?,
                };
                let key = format!("{}/{}", object.ns, object.name);
                let v = json!({"object": key, "offset": offset.unwrap_or(0), "bytes": data.len(), "persisted": true,
                    "pg": r.pg, "epoch": r.epoch, "replicas": r.replicas});
                emit(json, &v, || {
                    format!(
                        "wrote {} to {key} (PG {}, epoch {}, persisted on {})",
                        human(data.len() as u64),
                        r.pg,
                        r.epoch,
                        r.replicas.join(", ")
                    )
                });
            }
            Cmd::Get { object, file, offset, length } => {
                let (ns, name) = (&object.ns, &object.name);
                let data = match (*offset, *length) {
                    (0, None) => c.get(ns, name).await?,
                    (start, Some(len)) => c.read_at(ns, name, start, len).await?,
                    (start, None) => {
                        let size = c.stat(ns, name).await?.size;
                        if start > size {
                            return Err(Failure::invalid(anyhow::anyhow!(
                                "{ns}/{name} is {size} bytes: --offset {start} is past its end"
                            )));
                        }
                        c.read_at(ns, name, start, size - start).await?
                    }
                };
                let (start, part) = (*offset, &data[..]);
                match file.as_deref().filter(|f| f.as_os_str() != "-") {
                    Some(f) => {
                        tokio::fs::write(f, part).await.with_context(|| format!("write {}", f.display()))?;
                        let key = format!("{}/{}", object.ns, object.name);
                        emit(json, &json!({"object": key, "offset": start, "bytes": part.len()}), || {
                            format!("read {} from {key}", human(part.len() as u64))
                        });
                    }
                    None => {
                        let mut out = tokio::io::stdout();
                        out.write_all(part).await.context("write stdout")?;
                        out.flush().await.context("write stdout")?;
                    }
                }
            }
            Cmd::Ls { namespace } => {
                ls_emit(json, &c.list(namespace).await?);
            }
            Cmd::Stat { object } => {
                let s = c.stat(&object.ns, &object.name).await?;
                let (pg, replicas) = c.placement(&object.ns, &object.name).unwrap_or_default();
                let mut v = stat_json(&s);
                v["pg"] = json!(pg);
                v["replicas"] = json!(replicas);
                emit(json, &v, || format!("{}\n  pg         {pg} on {}", stat_text(&s), replicas.join(", ")));
            }
            Cmd::Rm { object } => {
                c.delete(&object.ns, &object.name).await?;
                emit(json, &json!({"deleted": format!("{}/{}", object.ns, object.name)}), || {
                    format!("deleted {}/{}", object.ns, object.name)
                });
            }
            _ => unreachable!("is_cluster_command"),
        }
        Ok(())
    }
}
