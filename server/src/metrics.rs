//! Prometheus metrics, rendered in the text exposition format on `GET /metrics`.
//!
//! Counters and histograms are process-wide atomics updated where things happen (lease
//! recalls and drains, data-plane operations, error statuses); gauges (pool usage, sessions,
//! leases by state) are read from their owners at scrape time. Hand-rolled rather than a crate:
//! the text format is small and this keeps the hot path to one relaxed atomic add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::lease::LeaseManager;
use crate::pool::Pool;
use crate::session::SessionManager;

const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// A histogram with fixed latency buckets (seconds).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Relaxed));
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// Data-plane operation kinds.
#[derive(Debug, Clone, Copy)]
pub enum DpOp {
    /// READ.
    Read = 0,
    /// WRITE.
    Write = 1,
    /// FLUSH.
    Flush = 2,
}

const DP_NAMES: [&str; 3] = ["read", "write", "flush"];

/// NBD commands counted, in this order.
pub const NBD_COMMANDS: [&str; 6] = ["read", "write", "flush", "trim", "write_zeroes", "block_status"];

/// Every process-wide metric.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Recall → every covering lease returned or revoked, and drained.
    pub recall_drained: Histogram,
    /// Revoke → no operation in flight.
    pub drain: Histogram,
    /// Leases recalled.
    pub recalls: AtomicU64,
    /// Leases revoked.
    pub revokes: AtomicU64,
    /// RDMA connections accepted.
    pub rdma_connections: AtomicU64,
    /// RDMA connect requests rejected (no or bad proof of a session secret, over a cap).
    pub rdma_rejected: AtomicU64,
    /// RDMA keys made (one per leased segment).
    pub rdma_keys: AtomicU64,
    /// Leases whose RDMA keys were invalidated.
    pub rdma_invalidations: AtomicU64,
    /// Client queue pairs fenced (moved to the error state).
    pub rdma_fences: AtomicU64,
    /// FLUSH messages served.
    pub rdma_flushes: AtomicU64,
    /// Leases quarantined (a transport could not prove their keys dead).
    pub quarantined_leases: AtomicU64,
    dp_ops: [AtomicU64; 3],
    dp_bytes: [AtomicU64; 3],
    dp_refusals: AtomicU64,
    nbd_requests: [AtomicU64; 6],
    nbd_bytes: [AtomicU64; 2],
    nbd_errors: AtomicU64,
    /// NBD connections in transmission now.
    pub nbd_connections: AtomicU64,
    /// Times this node registered in the cluster (the first join and every rejoin).
    pub cluster_joins: AtomicU64,
    /// Times this node fenced itself (its membership lapsed).
    pub cluster_fences: AtomicU64,
    /// 1 while this node is the cluster's elected coordinator.
    pub cluster_coordinator: AtomicU64,
    /// The newest PG map epoch this node has seen.
    pub cluster_map_epoch: AtomicU64,
    /// PGs of that map this node is a replica of, and primary of.
    pub cluster_pgs_held: AtomicU64,
    /// See `cluster_pgs_held`.
    pub cluster_pgs_primary: AtomicU64,
    /// Registered nodes, as this node last read them.
    pub cluster_nodes: AtomicU64,
    /// PGs with fewer complete replicas than the map wants (lost ones, or ones still copying).
    pub cluster_pgs_degraded: AtomicU64,
    /// PGs this node is copying (repair assigned, not finished).
    pub cluster_pgs_repairing: AtomicU64,
    /// Bytes this node copied from other members while repairing.
    pub cluster_repair_bytes: AtomicU64,
    /// This node's repair copy rate over the last PG copy step, bytes/s.
    pub cluster_repair_rate: AtomicU64,
    /// Leftover objects (of PGs this node no longer holds) it deleted.
    pub cluster_leftovers_collected: AtomicU64,
    errors: Mutex<Vec<(&'static str, u64)>>,
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

impl Metrics {
    /// A completed data-plane operation.
    pub fn dp(&self, op: DpOp, bytes: u64) {
        self.dp_ops[op as usize].fetch_add(1, Relaxed);
        self.dp_bytes[op as usize].fetch_add(bytes, Relaxed);
    }

    /// One NBD request of command `cmd` (an index into [`NBD_COMMANDS`]) moved `bytes`
    /// (READ, WRITE); `ok` false for an error reply.
    pub fn nbd(&self, cmd: usize, bytes: u64, ok: bool) {
        if let Some(c) = self.nbd_requests.get(cmd) {
            c.fetch_add(1, Relaxed);
        }
        if let Some(b) = self.nbd_bytes.get(cmd) {
            b.fetch_add(bytes, Relaxed);
        }
        if !ok {
            self.nbd_errors.fetch_add(1, Relaxed);
        }
    }

    /// A refused data-plane operation.
    pub fn dp_refused(&self) {
        self.dp_refusals.fetch_add(1, Relaxed);
    }

    /// An error returned to a gRPC client, by status code name.
    pub fn error(&self, code: tonic::Code) {
        let name = code_name(code);
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        match e.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => e.push((name, 1)),
        }
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        InvalidArgument => "INVALID_ARGUMENT",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        OutOfRange => "OUT_OF_RANGE",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Unavailable => "UNAVAILABLE",
        Unauthenticated => "UNAUTHENTICATED",
        PermissionDenied => "PERMISSION_DENIED",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        Internal => "INTERNAL",
        _ => "OTHER",
    }
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// Render every metric.
pub fn render(pool: &Pool, sessions: &SessionManager, leases: &LeaseManager) -> String {
    let m = &*METRICS;
    let mut out = String::new();
    let s = pool.stats();
    let b = crate::pool::layout::BLOCK as f64;
    gauge(
        &mut out,
        "rdax_pool_bytes",
        "Pool data area by state.",
        &[
            ("{state=\"used\"}".into(), s.used_blocks as f64 * b),
            ("{state=\"free\"}".into(), s.free.free_blocks as f64 * b),
            ("{state=\"held\"}".into(), s.held_blocks as f64 * b),
            ("{state=\"quarantined\"}".into(), s.quarantined_blocks as f64 * b),
        ],
    );
    gauge(&mut out, "rdax_pool_objects", "Objects in the pool.", &[(String::new(), s.objects as f64)]);
    gauge(
        &mut out,
        "rdax_pool_fragmentation",
        "Share of free space not available as 2 MiB-aligned runs.",
        &[(String::new(), s.fragmentation)],
    );
    counter(
        &mut out,
        "rdax_journal_commits_total",
        "Journal commits (each one a group of metadata transactions).",
        &[(String::new(), s.journal_commits)],
    );
    counter(
        &mut out,
        "rdax_journal_transactions_total",
        "Metadata transactions made durable by the journal commits.",
        &[(String::new(), s.journal_transactions)],
    );
    gauge(&mut out, "rdax_sessions", "Open sessions.", &[(String::new(), sessions.len() as f64)]);
    let list = leases.list(None);
    let by_state: Vec<(String, f64)> = ["active", "breaking", "released", "revoked", "drained", "quarantined"]
        .iter()
        .map(|st| (format!("{{state=\"{st}\"}}"), list.iter().filter(|l| l.state.as_str() == *st).count() as f64))
        .collect();
    gauge(&mut out, "rdax_leases", "Leases by state.", &by_state);
    counter(&mut out, "rdax_lease_recalls_total", "Leases recalled.", &[(String::new(), m.recalls.load(Relaxed))]);
    counter(&mut out, "rdax_lease_revokes_total", "Leases revoked.", &[(String::new(), m.revokes.load(Relaxed))]);
    counter(
        &mut out,
        "rdax_lease_quarantined_total",
        "Leases quarantined because a transport could not prove their keys dead.",
        &[(String::new(), m.quarantined_leases.load(Relaxed))],
    );
    for (name, help, v) in [
        ("rdax_rdma_connections_total", "RDMA connections accepted.", &m.rdma_connections),
        (
            "rdax_rdma_connects_rejected_total",
            "RDMA connect requests rejected before anything was allocated (no valid proof of a session secret, or over a cap).",
            &m.rdma_rejected,
        ),
        ("rdax_rdma_keys_total", "RDMA keys made (one per leased segment).", &m.rdma_keys),
        ("rdax_rdma_invalidations_total", "Leases whose RDMA keys were invalidated.", &m.rdma_invalidations),
        ("rdax_rdma_fences_total", "Client queue pairs fenced after an unconfirmed invalidation.", &m.rdma_fences),
        ("rdax_rdma_flushes_total", "RDMA FLUSH messages served.", &m.rdma_flushes),
    ] {
        counter(&mut out, name, help, &[(String::new(), v.load(Relaxed))]);
    }
    m.recall_drained.render(
        &mut out,
        "rdax_lease_recall_drained_seconds",
        "Recall until every covering lease was returned or revoked and drained.",
    );
    m.drain.render(&mut out, "rdax_lease_drain_seconds", "Waiting for in-flight operations after a lease ended.");
    let ops: Vec<(String, u64)> = DP_NAMES
        .iter()
        .zip(&m.dp_ops)
        .map(|(n, c)| (format!("{{transport=\"tcp\",op=\"{n}\"}}"), c.load(Relaxed)))
        .collect();
    counter(&mut out, "rdax_dataplane_operations_total", "Completed data-plane operations.", &ops);
    let bytes: Vec<(String, u64)> = DP_NAMES
        .iter()
        .zip(&m.dp_bytes)
        .map(|(n, c)| (format!("{{transport=\"tcp\",op=\"{n}\"}}"), c.load(Relaxed)))
        .collect();
    counter(&mut out, "rdax_dataplane_bytes_total", "Bytes moved by data-plane operations.", &bytes);
    counter(
        &mut out,
        "rdax_dataplane_refusals_total",
        "Refused data-plane operations.",
        &[("{transport=\"tcp\"}".into(), m.dp_refusals.load(Relaxed))],
    );
    let reqs: Vec<(String, u64)> =
        NBD_COMMANDS.iter().zip(&m.nbd_requests).map(|(n, c)| (format!("{{cmd=\"{n}\"}}"), c.load(Relaxed))).collect();
    counter(&mut out, "rdax_nbd_requests_total", "NBD requests answered, by command.", &reqs);
    let bytes: Vec<(String, u64)> = NBD_COMMANDS[..2]
        .iter()
        .zip(&m.nbd_bytes)
        .map(|(n, c)| (format!("{{cmd=\"{n}\"}}"), c.load(Relaxed)))
        .collect();
    counter(&mut out, "rdax_nbd_bytes_total", "Bytes read and written by NBD clients.", &bytes);
    counter(
        &mut out,
        "rdax_nbd_errors_total",
        "NBD requests answered with an error.",
        &[(String::new(), m.nbd_errors.load(Relaxed))],
    );
    for (name, polls, what) in [
        ("rdax_nbd_busy_polls_total", &crate::nbd::poll::POLLS, "NBD connections for their next request"),
        (
            "rdax_dataplane_busy_polls_total",
            &crate::dataplane::POLLS,
            "data-plane connections for their next operation",
        ),
    ] {
        counter(
            &mut out,
            name,
            &format!("Busy polls of {what}, by how they ended."),
            &[
                ("{result=\"request\"}".into(), polls[0].load(Relaxed)),
                ("{result=\"timeout\"}".into(), polls[1].load(Relaxed)),
            ],
        );
    }
    out.push_str("# HELP rdax_nbd_connections NBD connections in transmission.\n# TYPE rdax_nbd_connections gauge\n");
    out.push_str(&format!("rdax_nbd_connections {}\n", m.nbd_connections.load(Relaxed)));
    if leases.fence().enabled() {
        out.push_str(
            "# HELP rdax_cluster_member 1 while this node's cluster membership is current (it grants leases), 0 while fenced.\n# TYPE rdax_cluster_member gauge\n",
        );
        out.push_str(&format!("rdax_cluster_member {}\n", u8::from(leases.fence().is_open())));
        out.push_str("# HELP rdax_cluster_coordinator 1 while this node is the elected coordinator (it keeps the PG map).\n# TYPE rdax_cluster_coordinator gauge\n");
        out.push_str(&format!("rdax_cluster_coordinator {}\n", m.cluster_coordinator.load(Relaxed)));
        let map = [
            ("rdax_cluster_map_epoch", "The newest PG map epoch this node has seen.", &m.cluster_map_epoch),
            ("rdax_cluster_pgs_held", "PGs of that map this node is a replica of.", &m.cluster_pgs_held),
            ("rdax_cluster_pgs_primary", "PGs of that map this node is the primary of.", &m.cluster_pgs_primary),
            ("rdax_cluster_nodes", "Registered cluster nodes.", &m.cluster_nodes),
            (
                "rdax_cluster_pgs_degraded",
                "PGs with fewer complete replicas than the map wants (a replica lost, or still copying).",
                &m.cluster_pgs_degraded,
            ),
            ("rdax_cluster_pgs_repairing", "PGs this node is copying from other members.", &m.cluster_pgs_repairing),
            (
                "rdax_cluster_repair_rate_bytes",
                "This node's repair copy rate, bytes per second (0 when not copying).",
                &m.cluster_repair_rate,
            ),
        ];
        for (name, help, v) in map {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}\n", v.load(Relaxed)));
        }
        counter(
            &mut out,
            "rdax_cluster_joins_total",
            "Times this node registered in the cluster (first join and rejoins).",
            &[(String::new(), m.cluster_joins.load(Relaxed))],
        );
        counter(
            &mut out,
            "rdax_cluster_repair_bytes_total",
            "Bytes this node copied from other members while repairing.",
            &[(String::new(), m.cluster_repair_bytes.load(Relaxed))],
        );
        counter(
            &mut out,
            "rdax_cluster_leftovers_collected_total",
            "Objects of PGs this node no longer holds that it deleted once their replicas had complete copies.",
            &[(String::new(), m.cluster_leftovers_collected.load(Relaxed))],
        );
        counter(
            &mut out,
            "rdax_cluster_fences_total",
            "Times this node fenced itself because its membership lapsed.",
            &[(String::new(), m.cluster_fences.load(Relaxed))],
        );
    }
    let errors: Vec<(String, u64)> = m
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(c, n)| (format!("{{code=\"{c}\"}}"), *n))
        .collect();
    counter(&mut out, "rdax_grpc_errors_total", "Errors returned to gRPC clients, by status code.", &errors);
    out
}

/// Whether the request head carries a bearer token that may scrape (always, when the
/// principals file names no `[metrics]` tokens).
fn scrape_allowed(head: &str, auth: &crate::grpc::Auth) -> bool {
    let p = auth.principals();
    if !p.metrics_protected() {
        return true;
    }
    let token = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let (scheme, t) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| t.trim().to_string())
    });
    token.is_some_and(|t| p.metrics_allowed(&t))
}

/// Serve `GET /metrics` on `listener` until `cancel`. With `[metrics] tokens` in the
/// principals file, a scrape needs `Authorization: Bearer` with one of them (or any
/// principal's token); otherwise 401.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    sessions: Arc<SessionManager>,
    leases: Arc<LeaseManager>,
    auth: crate::grpc::Auth,
    cancel: CancellationToken,
) {
    // Scrapers are few: a small cap, so that a flood of connections costs little, and half
    // of it per source, so that one host's flood leaves room for another scraper.
    let mut acceptor = crate::net::Acceptor::new(listener, 16, 8, "metrics");
    while let Some((mut s, _, permit)) = acceptor.accept(&cancel).await {
        let (p, se, l, auth) = (pool.clone(), sessions.clone(), leases.clone(), auth.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // Read the request head (a client may send it in pieces), bounded in size and time.
            let mut req = [0u8; 1024];
            let mut n = 0;
            let head = async {
                while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut req[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), head).await.is_err() || n == 0 {
                return;
            }
            let line = String::from_utf8_lossy(&req[..n]);
            let is_metrics = line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?");
            let (status, body) = if is_metrics && !scrape_allowed(&line, &auth) {
                ("401 Unauthorized", "a metrics token is needed: Authorization: Bearer <token>\n".into())
            } else if is_metrics {
                match tokio::task::spawn_blocking(move || render(&p, &se, &l)).await {
                    Ok(b) => ("200 OK", b),
                    Err(_) => ("500 Internal Server Error", String::new()),
                }
            } else {
                ("404 Not Found", "only /metrics is served here\n".into())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            // A scraper that stops reading is dropped after a bound, like one that never asks.
            let send = async {
                s.write_all(head.as_bytes()).await?;
                s.write_all(body.as_bytes()).await
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), send).await;
            debug!("metrics scraped");
        });
    }
}
