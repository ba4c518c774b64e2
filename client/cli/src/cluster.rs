//! `rdaxctl --cluster etcd://HOST:PORT cluster status`: the cluster as etcd records it, read
//! straight from etcd (no daemon is asked): the registered nodes, the coordinator, the PG map
//! and how many PGs have all their replicas.

use crate::Failure;

/// `rdaxctl cluster ...`.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ClusterCmd {
    /// Nodes and their state (up: registered; lost: in the PG map but no longer registered),
    /// the coordinator, and the PGs: healthy (every replica up and complete), repairing (a
    /// replica still copying; progress shown per copy), degraded (fewer replicas up than the
    /// replication factor), unavailable (none up), down (no registered node has a complete
    /// copy: it serves nothing until a node it waits for comes back).
    Status,
    /// Give up on a lost node: the down PGs that wait for it (and for no other node) come up
    /// with what their copying replicas hold, and objects only that node had are gone. Refused
    /// while the node is registered or when no down PG waits for it.
    MarkLost {
        /// The node id.
        node: String,
        /// Do it (without: say what would be given up, and change nothing).
        #[arg(long)]
        yes: bool,
    },
    /// Put objects over the cluster for a while and report throughput and latency (a
    /// benchmark: every put goes to every replica and is persisted there).
    Bench(BenchArgs),
}

/// `rdaxctl cluster bench`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Bytes per object (each put writes one whole object).
    #[arg(long, value_parser = rdaxd::config::parse_size, default_value = "1M")]
    pub size: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    pub writers: u32,
    /// Distinct objects each writer cycles through.
    #[arg(long, default_value_t = 16)]
    pub objects: u32,
    /// Namespace to write in.
    #[arg(long, default_value = "bench")]
    pub namespace: String,
    /// Stop each writer after this many puts instead of after --seconds (with --objects N and
    /// --puts N, every object is written once: a fill).
    #[arg(long)]
    pub puts: Option<u32>,
}

/// etcd client URLs from `--cluster etcd://HOST:PORT[,HOST:PORT...]`.
pub(crate) fn etcd_urls(spec: &str) -> Result<Vec<String>, Failure> {
    let (scheme, rest) = match (spec.strip_prefix("etcd://"), spec.strip_prefix("etcds://")) {
        (Some(r), _) => ("http", r),
        (_, Some(r)) => ("https", r),
        _ => {
            return Err(Failure::invalid(anyhow::anyhow!(
                "--cluster `{spec}`: expected etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)"
            )));
        }
    };
    let hosts: Vec<&str> = rest.trim_end_matches('/').split(',').filter(|h| !h.is_empty()).collect();
    let urls: Vec<String> = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
    if hosts.is_empty() || hosts.iter().any(|h| !h.contains(':')) {
        return Err(Failure::invalid(anyhow::anyhow!("--cluster `{spec}`: every etcd member as HOST:PORT")));
    }
    Ok(urls)
}

/// TLS and authentication for etcd from `--etcd-*` (files read here; a password never comes
/// from argv).
#[cfg(feature = "cluster")]
pub(crate) fn etcd_access(cli: &crate::Cli, urls: &[String]) -> Result<rdax_client::EtcdAccess, Failure> {
    use anyhow::Context;
    let tls = urls.iter().any(|u| u.starts_with("https://"));
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).with_context(|| format!("{what} {}", p.display())).map_err(Failure::local)
    };
    let ca_pem = match (&cli.etcd_ca, tls) {
        (Some(p), true) => Some(read(p, "--etcd-ca")?),
        (None, true) => {
            return Err(Failure::invalid(anyhow::anyhow!(
                "etcds:// needs --etcd-ca, the PEM of the CA that signed etcd's certificate"
            )));
        }
        (Some(_), false) => {
            return Err(Failure::invalid(anyhow::anyhow!("--etcd-ca is for etcds:// (etcd over TLS)")));
        }
        (None, false) => None,
    };
    let identity = match (&cli.etcd_cert, &cli.etcd_key) {
        (None, None) => None,
        (Some(c), Some(k)) if tls => Some((read(c, "--etcd-cert")?, read(k, "--etcd-key")?)),
        (Some(_), Some(_)) => {
            return Err(Failure::invalid(anyhow::anyhow!("--etcd-cert is for etcds:// (etcd over TLS)")));
        }
        _ => return Err(Failure::invalid(anyhow::anyhow!("--etcd-cert and --etcd-key go together"))),
    };
    let user = match (&cli.etcd_user, &cli.etcd_password_file) {
        (None, None) => None,
        (Some(u), Some(p)) => {
            let pw = String::from_utf8(read(p, "--etcd-password-file")?)
                .map_err(|_| Failure::invalid(anyhow::anyhow!("--etcd-password-file: not UTF-8")))?;
            Some((u.clone(), pw.strip_suffix('\n').unwrap_or(&pw).to_string()))
        }
        _ => return Err(Failure::invalid(anyhow::anyhow!("--etcd-user and --etcd-password-file go together"))),
    };
    Ok(rdax_client::EtcdAccess { ca_pem, identity_pem: identity, user })
}

#[cfg(not(feature = "cluster"))]
pub(crate) async fn run(_cli: &crate::Cli, _urls: Vec<String>, _cmd: &ClusterCmd, _json: bool) -> Result<(), Failure> {
    Err(Failure::local(anyhow::anyhow!(
        "this rdaxctl was built without cluster support: build it with `--features cluster` (it needs protoc: \
         scripts/install-deps.sh installs it)"
    )))
}

#[cfg(feature = "cluster")]
pub(crate) use with_etcd::run;

#[cfg(feature = "cluster")]
mod with_etcd {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
    use rdax_proto::cluster::{NodeRecord, PgMap, RepairAssignment, RepairDone, RepairProgress, repair_pending};
    use serde_json::json;

    use super::ClusterCmd;
    use crate::Failure;
    use crate::output::{emit, human};

    const BOUND: Duration = Duration::from_secs(5);

    fn unreachable(e: impl std::fmt::Display) -> Failure {
        Failure::unavailable(anyhow::anyhow!("etcd: {e}"))
    }

    async fn bounded<T>(f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, Failure> {
        tokio::time::timeout(BOUND, f)
            .await
            .map_err(|_| unreachable(format!("no answer within {BOUND:?}")))?
            .map_err(unreachable)
    }

    pub(crate) async fn run(cli: &crate::Cli, urls: Vec<String>, cmd: &ClusterCmd, json: bool) -> Result<(), Failure> {
        let prefix = cli.cluster_prefix.trim_end_matches('/');
        let opts = super::etcd_access(cli, &urls)?.options(BOUND, BOUND);
        let mut c = bounded(Client::connect(&urls, Some(opts))).await?;
        match cmd {
            ClusterCmd::Status => status(&mut c, urls, prefix, json).await,
            ClusterCmd::MarkLost { node, yes } => mark_lost(&mut c, prefix, node, *yes, json).await,
            ClusterCmd::Bench(_) => unreachable!("bench runs over the cluster client"),
        }
    }

    async fn read_map(c: &mut Client, prefix: &str) -> Result<(Option<PgMap>, i64), Failure> {
        let got = bounded(c.get(format!("{prefix}/pgmap"), None)).await?;
        Ok(match got.kvs().first() {
            Some(kv) => (serde_json::from_slice(kv.value()).ok(), kv.mod_revision()),
            None => (None, 0),
        })
    }

    /// `cluster mark-lost NODE [--yes]`.
    async fn mark_lost(c: &mut Client, prefix: &str, node: &str, yes: bool, json: bool) -> Result<(), Failure> {
        let (map, map_rev) = read_map(c, prefix).await?;
        let Some(map) = map else {
            return Err(Failure::precondition(anyhow::anyhow!("the cluster has no PG map: nothing waits for {node}")));
        };
        let node_key = format!("{prefix}/nodes/{node}");
        if !bounded(c.get(node_key.clone(), None)).await?.kvs().is_empty() {
            return Err(Failure::precondition(anyhow::anyhow!("node {node} is registered: it is not lost")));
        }
        let waiting: Vec<u32> =
            map.down.iter().filter(|(_, h)| h.iter().any(|h| h.node == node)).map(|(pg, _)| *pg).collect();
        if waiting.is_empty() {
            return Err(Failure::precondition(anyhow::anyhow!(
                "no down PG waits for {node} (map epoch {}): nothing to give up",
                map.epoch
            )));
        }
        let given_up: Vec<u32> =
            waiting.iter().copied().filter(|pg| map.down[pg].iter().all(|h| h.node == node)).collect();
        let v =
            json!({"node": node, "epoch": map.epoch, "waiting_pgs": waiting, "given_up_pgs": given_up, "marked": yes});
        if !yes {
            emit(json, &v, || {
                format!(
                    "{} PGs wait for {node}; marking it lost gives up on {} of them ({}): they come up with what their \
                     copying replicas hold, and objects only {node} had are gone. Run again with --yes to do it.",
                    waiting.len(),
                    given_up.len(),
                    list(&given_up)
                )
            });
            return Err(Failure::precondition(anyhow::anyhow!("not marked: --yes not given")));
        }
        // Only while the node is still unregistered and the map is the one read.
        let txn = Txn::new()
            .when([
                Compare::create_revision(node_key, CompareOp::Equal, 0),
                Compare::mod_revision(format!("{prefix}/pgmap"), CompareOp::Equal, map_rev),
            ])
            .and_then([TxnOp::put(format!("{prefix}/lost/{node}"), v.to_string(), None)]);
        if !bounded(c.txn(txn)).await?.succeeded() {
            return Err(Failure::precondition(anyhow::anyhow!(
                "the cluster changed meanwhile ({node} registered, or a new PG map): look again"
            )));
        }
        emit(json, &v, || {
            format!(
                "marked {node} lost: the coordinator gives up on {} PGs ({}) with its next map",
                given_up.len(),
                list(&given_up)
            )
        });
        Ok(())
    }

    fn list(pgs: &[u32]) -> String {
        let s: Vec<String> = pgs.iter().map(u32::to_string).collect();
        if s.is_empty() { "none".into() } else { s.join(", ") }
    }

    async fn status(c: &mut Client, urls: Vec<String>, prefix: &str, json: bool) -> Result<(), Failure> {
        let got = bounded(c.get(format!("{prefix}/nodes/"), Some(GetOptions::new().with_prefix()))).await?;
        let up: BTreeMap<String, NodeRecord> = got
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok())
            .map(|r| (r.node_id.clone(), r))
            .collect();
        let (map, _) = read_map(c, prefix).await?;
        // No leader is not an error: a cluster with no member has none.
        let coordinator = match tokio::time::timeout(BOUND, c.leader(format!("{prefix}/coordinator"))).await {
            Ok(Ok(r)) => r.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string),
            _ => None,
        };
        let assigned: BTreeMap<String, RepairAssignment> = read_all(c, prefix, "repair").await?;
        let done: BTreeMap<String, RepairDone> = read_all(c, prefix, "repaired").await?;
        let progress: BTreeMap<String, BTreeMap<u32, RepairProgress>> = read_all(c, prefix, "repair-progress").await?;
        let copying = |n: &str, pg: u32| {
            assigned.get(n).is_some_and(|a| repair_pending(a, done.get(n).unwrap_or(&RepairDone::new()), pg))
        };
        let (mut healthy, mut degraded, mut unavailable, mut repairing, mut down) = (0u32, 0u32, 0u32, 0u32, 0u32);
        let mut held: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        if let Some(m) = &map {
            let want = usize::from(m.replicas);
            for (pg, r) in m.pg.iter().enumerate() {
                let live = r.iter().filter(|n| up.contains_key(*n)).count();
                let complete = r.iter().filter(|n| up.contains_key(*n) && !copying(n, pg as u32)).count();
                match live {
                    _ if m.down_of(pg as u32).is_some() => down += 1,
                    0 => unavailable += 1,
                    n if n < want || r.len() < want => degraded += 1,
                    _ if complete < live => repairing += 1,
                    _ => healthy += 1,
                }
                for (i, n) in r.iter().enumerate() {
                    let e = held.entry(n.as_str()).or_default();
                    e.0 += 1;
                    e.1 += u32::from(i == 0);
                }
            }
        }
        let mut names: Vec<&str> = up.keys().map(String::as_str).collect();
        if let Some(m) = &map {
            names.extend(m.nodes.iter().map(String::as_str).filter(|n| !up.contains_key(*n)));
        }
        names.sort_unstable();
        names.dedup();
        let nodes: Vec<serde_json::Value> = names
            .iter()
            .map(|n| {
                let r = up.get(*n);
                let (pgs, primary) = held.get(n).copied().unwrap_or_default();
                json!({
                    "node_id": n, "state": if r.is_some() { "up" } else { "lost" },
                    "grpc": r.map(|r| r.grpc.clone()), "data": r.map(|r| r.data.clone()),
                    "rdma": r.and_then(|r| r.rdma.clone()), "capacity_bytes": r.map(|r| r.capacity_bytes),
                    "pgs": pgs, "primary_pgs": primary,
                })
            })
            .collect();
        let v = json!({
            "etcd": urls, "prefix": prefix, "coordinator": coordinator, "nodes": nodes,
            "map": map.as_ref().map(|m| json!({"epoch": m.epoch, "pgs": m.pgs, "replicas": m.replicas})),
            "pg_states": {"healthy": healthy, "repairing": repairing, "degraded": degraded, "unavailable": unavailable,
                "down": down},
            "down": map.as_ref().map_or(vec![], |m| m.down.iter().map(|(pg, h)| json!({"pg": pg,
                "waiting_for": h.iter().map(|h| h.node.as_str()).collect::<Vec<_>>()})).collect::<Vec<_>>()),
            "repair": repair_json(&progress),
        });
        emit(json, &v, || {
            let lost = nodes.iter().filter(|n| n["state"] == "lost").count();
            let mut out = format!(
                "cluster {prefix} at {}: {} up, {lost} lost; coordinator {}\n",
                urls.join(","),
                up.len(),
                coordinator.as_deref().unwrap_or("none")
            );
            match &map {
                Some(m) => out.push_str(&format!(
                    "PG map epoch {}: {} PGs x {} replicas: {healthy} healthy, {repairing} repairing, {degraded} \
                     degraded, {unavailable} unavailable, {down} down\n",
                    m.epoch, m.pgs, m.replicas
                )),
                None => out.push_str("no PG map yet\n"),
            }
            out.push_str(&format!(
                "{:<16} {:<5} {:<24} {:>10} {:>6} {:>8}",
                "NODE", "STATE", "GRPC", "CAPACITY", "PGS", "PRIMARY"
            ));
            for n in &nodes {
                out.push_str(&format!(
                    "\n{:<16} {:<5} {:<24} {:>10} {:>6} {:>8}",
                    n["node_id"].as_str().unwrap_or_default(),
                    n["state"].as_str().unwrap_or_default(),
                    n["grpc"].as_str().unwrap_or("-"),
                    n["capacity_bytes"].as_u64().map_or("-".into(), human),
                    n["pgs"].as_u64().unwrap_or(0),
                    n["primary_pgs"].as_u64().unwrap_or(0)
                ));
            }
            for (node, p) in &progress {
                for (pg, p) in p {
                    out.push_str(&format!("\nrepair {node} PG {pg}: {}", bar(p)));
                }
            }
            if let Some(m) = &map {
                // Grouped by the nodes they wait for.
                let mut by: BTreeMap<Vec<&str>, Vec<u32>> = BTreeMap::new();
                for (pg, h) in &m.down {
                    by.entry(h.iter().map(|h| h.node.as_str()).collect()).or_default().push(*pg);
                }
                for (nodes, pgs) in by {
                    out.push_str(&format!(
                        "\ndown: {} PGs ({}) wait for {} (no registered node has a complete copy; or `cluster \
                         mark-lost`)",
                        pgs.len(),
                        list(&pgs),
                        nodes.join(", ")
                    ));
                }
            }
            out
        });
        Ok(())
    }

    /// `[#####.....]  40% 12.0 MiB of 30.0 MiB, 3 of 8 objects`.
    fn bar(p: &RepairProgress) -> String {
        let frac = if p.total_bytes > 0 {
            p.copied_bytes as f64 / p.total_bytes as f64
        } else if p.total_objects > 0 {
            p.copied_objects as f64 / p.total_objects as f64
        } else {
            0.0
        }
        .clamp(0.0, 1.0);
        let filled = (frac * 30.0).round() as usize;
        format!(
            "[{}{}] {:>3.0}% {} of {}, {} of {} objects",
            "#".repeat(filled),
            ".".repeat(30 - filled),
            frac * 100.0,
            human(p.copied_bytes),
            human(p.total_bytes),
            p.copied_objects,
            p.total_objects
        )
    }

    fn repair_json(progress: &BTreeMap<String, BTreeMap<u32, RepairProgress>>) -> serde_json::Value {
        let list: Vec<serde_json::Value> = progress
            .iter()
            .flat_map(|(node, m)| {
                m.iter().map(move |(pg, p)| {
                    json!({"node": node, "pg": pg, "epoch": p.epoch, "copied_bytes": p.copied_bytes,
                        "total_bytes": p.total_bytes, "copied_objects": p.copied_objects,
                        "total_objects": p.total_objects})
                })
            })
            .collect();
        json!(list)
    }

    /// Every node's record under `<prefix>/<what>/`.
    async fn read_all<T: serde::de::DeserializeOwned>(
        c: &mut Client,
        prefix: &str,
        what: &str,
    ) -> Result<BTreeMap<String, T>, Failure> {
        let p = format!("{prefix}/{what}/");
        let got = bounded(c.get(p.clone(), Some(GetOptions::new().with_prefix()))).await?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let node = kv.key_str().ok()?.strip_prefix(&p)?.to_string();
                Some((node, serde_json::from_slice(kv.value()).ok()?))
            })
            .collect())
    }
}
