//! Startup and shutdown of the daemon.
//!
//! Startup, in named steps: open (or create) the pool — recovery happens here —, start the
//! session reaper, build the services, report the bound address, mark health SERVING.
//!
//! Shutdown, when `shutdown` resolves, in timed stages (each logged with how long it took):
//! 1. health NOT_SERVING; new requests get `Unavailable` (holders may still return leases);
//! 2. recall every lease (holders are told), revoke at the break deadline, drain;
//! 3. close the gate: in-flight requests, data-plane operations and pool jobs finish, bounded
//!    by `shutdown.timeout_ms` counted from the start of shutdown;
//! 4. end every session, stop the data planes, stop accepting gRPC connections; connections
//!    still open after a short grace are cut (a client that stopped responding cannot keep the
//!    daemon's pool open);
//! 5. persist and close the pool cleanly.
//!
//! The exit status is a failure only if the pool could not be closed cleanly.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dataplane::DataPlane;
use crate::gate::Gate;
use crate::grpc::{self, Shared};
use crate::lease::{LeaseConfig, LeaseManager};
use crate::pool::{CreateOptions, OpenOptions, Pool};
use crate::session::SessionManager;
use crate::systemd;
use sd_notify::NotifyState;

const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// The marker that records that a pool file was created here: `<pool>.created`.
fn created_marker(pool: &Path) -> std::path::PathBuf {
    let mut name = pool.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".created");
    pool.with_file_name(name)
}

/// Write `body` to `path` crash-safely: temp file, fsync, rename, fsync the directory.
fn write_durably(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(body).with_context(|| format!("write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {} into place", tmp.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))?;
    }
    Ok(())
}

/// Open the configured pool, creating the pool file on the first start only: once a pool was
/// served from that path (a marker beside it, `<pool>.created`, says so), a missing pool is an
/// error, never a silent fresh start. Device-DAX pools have no marker (a device does not
/// vanish into an empty pool).
pub fn open_pool(cfg: &Config) -> anyhow::Result<Pool> {
    let path = &cfg.pool_path;
    let marker = created_marker(path);
    if path.exists() {
        let opts = OpenOptions { allocate: true, ..Default::default() };
        let pool = Pool::open(path, opts).with_context(|| format!("open pool {}", path.display()))?;
        // A pool made by `rdaxctl mkpool` (or before markers existed) gets its marker now.
        if path.is_file() && !marker.exists() {
            record_pool(&marker, &pool)?;
        }
        return Ok(pool);
    }
    if let Ok(text) = std::fs::read_to_string(&marker) {
        anyhow::bail!(
            "pool {} is missing, but a pool was created there before ({}: {}). Restore the file, or, to \
             start over with an empty pool on purpose, remove {} (rdaxd then creates a new pool) or create \
             one with `rdaxctl mkpool {} --size SIZE`",
            path.display(),
            marker.display(),
            text.trim(),
            marker.display(),
            path.display()
        );
    }
    if !cfg.create_pool {
        anyhow::bail!(
            "pool {} does not exist and pool.create is false; create it with `rdaxctl mkpool`",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create state directory {}", dir.display()))?;
    }
    info!(path = %path.display(), size = cfg.pool_size, disk_bytes = cfg.pool_size, "creating pool (first start): the file is allocated in full on disk");
    let pool = Pool::create(path, cfg.pool_size, CreateOptions::default())
        .with_context(|| format!("create pool {}", path.display()))?;
    record_pool(&marker, &pool)?;
    Ok(pool)
}

fn record_pool(marker: &Path, pool: &Pool) -> anyhow::Result<()> {
    let body = format!("pool uuid {}, recorded at unix time {}\n", pool.info().uuid, crate::pool::now_unix_secs());
    write_durably(marker, body.as_bytes()).with_context(|| format!("record the pool in {}", marker.display()))
}

/// Write the bound addresses as JSON, atomically (temp file, then rename).
fn write_ports_file(
    path: &Path,
    grpc: std::net::SocketAddr,
    data: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
    rdma: &str,
    admin: Option<&Path>,
    nbd: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let metrics = metrics.map_or_else(|| "null".to_string(), |m| format!("\"{m}\""));
    let rdma = if rdma.is_empty() { "null".to_string() } else { format!("\"{rdma}\"") };
    // A path is JSON-escaped by its Debug form for every printable path we create.
    let admin = admin.map_or_else(|| "null".to_string(), |p| format!("{:?}", p.display().to_string()));
    let nbd = nbd.map_or_else(|| "null".to_string(), |a| format!("\"{a}\""));
    let body = format!(
        "{{\"grpc\":\"{grpc}\",\"data\":\"{data}\",\"metrics\":{metrics},\"rdma\":{rdma},\"admin\":{admin},\"nbd\":{nbd},\"pid\":{}}}\n",
        std::process::id()
    );
    std::fs::write(&tmp, body).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {} into place", tmp.display()))?;
    Ok(())
}

/// Run the daemon until `shutdown` resolves, then shut down in order. Returns once the pool is
/// closed.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reload(cfg, listener, shutdown, reloads).await
}

/// What a reload can change in a running daemon.
struct Live {
    auth: grpc::Auth,
    tls: Option<Arc<crate::tls::Tls>>,
    sessions: Arc<SessionManager>,
    leases: Arc<LeaseManager>,
    dataplane: Arc<DataPlane>,
    shutdown_ms: Arc<std::sync::atomic::AtomicU64>,
}

fn lease_config(cfg: &Config) -> LeaseConfig {
    LeaseConfig {
        ttl: cfg.lease_ttl,
        break_timeout: cfg.lease_break_timeout,
        // In-flight operations are bounded by the op timeout (per socket wait); allow two.
        drain_timeout: cfg.data_op_timeout * 2 + Duration::from_secs(1),
        limits: cfg.limits.leases,
    }
}

/// Apply what can change without a restart: log filter, token and timeouts.
fn apply_reload(old: &Config, new: &Config, live: &Live) {
    use std::sync::atomic::Ordering::Relaxed;
    let auth = &live.auth;
    systemd::notify(&[NotifyState::Reloading]);
    if new.log_level != old.log_level {
        match crate::logging::set_filter(&new.log_level) {
            Ok(()) => info!(level = %new.log_level, "log level changed"),
            Err(e) => warn!(error = %format!("{e:#}"), "keeping the old log level"),
        }
    }
    if new.token != old.token || new.principals_file.is_some() || old.principals_file.is_some() {
        let p = new.principals.clone();
        let ended = live.sessions.end_removed_credentials(|h| p.knows(h));
        info!(principals = p.names().len(), sessions_ended = ended, "credentials reloaded");
        auth.set(p);
    }
    for k in &new.unknown_keys {
        warn!(key = %k, "unknown config key ignored");
    }
    live.sessions.set_ttl(new.session_ttl);
    live.leases.set_config(lease_config(new)); // timings and lease caps
    live.dataplane.op_timeout_ms.store(new.data_op_timeout.as_millis() as u64, Relaxed);
    live.dataplane.idle_timeout_ms.store(new.data_idle_timeout.as_millis() as u64, Relaxed);
    live.shutdown_ms.store(new.shutdown_timeout.as_millis() as u64, Relaxed);
    // Certificates are read again on every reload (a renewed certificate keeps its path).
    if let (Some(t), Some(files)) = (&live.tls, &new.tls) {
        match t.reload(files) {
            Ok(()) => info!(cert = %files.cert.display(), "TLS certificates reloaded"),
            Err(e) => error!(error = %e, "TLS certificates not reloaded; keeping the running ones"),
        }
    }
    let restart_only = new.listen != old.listen
        || new.tls.is_some() != old.tls.is_some()
        || new.data_listen != old.data_listen
        || new.data_tls != old.data_tls
        || new.admin_socket != old.admin_socket
        || new.admin_group_name != old.admin_group_name
        || new.metrics_listen != old.metrics_listen
        || new.rdma_listen != old.rdma_listen
        || new.nbd != old.nbd
        || new.cluster != old.cluster
        || new.rdma_keys != old.rdma_keys
        || new.pool_path != old.pool_path
        || new.limits != old.limits
        || new.grpc_idle_timeout != old.grpc_idle_timeout
        || new.log_format != old.log_format;
    if restart_only {
        warn!(
            "changed addresses, the admin socket, pool, limits, cluster settings, log format or TLS on/off take effect only after a restart"
        );
    }
    info!("configuration reloaded");
    systemd::notify(&[NotifyState::Ready]);
}

/// [`run`], applying each configuration received on `reloads` (SIGHUP).
pub async fn run_with_reload(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
    #[cfg(feature = "testing")]
    if let Ok(list) = std::env::var("RDAX_FAILPOINTS") {
        crate::failpoint::set_all(&list).context("set RDAX_FAILPOINTS")?;
        info!(failpoints = %list, "failpoints configured (testing build)");
    }
    let cfg = Arc::new(cfg);
    let local = listener.local_addr().context("read the bound address")?;
    let c2 = cfg.clone();
    let pool = Arc::new(tokio::task::spawn_blocking(move || open_pool(&c2)).await??);
    let info = pool.info();
    info!(
        mode = %info.mode, persistence = %info.persistence, uuid = %info.uuid,
        previous_shutdown_clean = info.previous_shutdown_clean, "pool ready"
    );
    if cfg.principals.is_empty() {
        info!(
            listen = %local,
            "no credentials configured: gRPC over TCP refuses every request; administer through the admin socket, \
             or set auth.principals_file or auth.token_file"
        );
    } else {
        info!(principals = cfg.principals.names().len(), "token authentication on");
    }
    // Bound before anything is served, so a second daemon on the same state fails early.
    let mut admin = match &cfg.admin_socket {
        Some(p) => {
            let a = crate::admin_socket::AdminSocket::bind(p, cfg.admin_group).await?;
            info!(path = %p.display(), group = cfg.admin_group, "admin socket: root, rdaxd's user and members of admin.group are admin here");
            Some(a)
        }
        None => None,
    };
    let root = CancellationToken::new();
    let gate = Gate::default();
    let sessions = Arc::new(
        SessionManager::new(cfg.session_ttl, cfg.limits.max_sessions)
            .with_principal_cap(cfg.limits.max_sessions_per_principal),
    );
    let reaper = tokio::spawn(sessions.clone().reap(root.child_token()));
    let leases = LeaseManager::new(pool.clone(), sessions.clone(), lease_config(&cfg), gate.clone());
    let lease_reaper = tokio::spawn(leases.clone().reap(root.child_token()));
    let data_listener = TcpListener::bind(cfg.data_listen)
        .await
        .with_context(|| format!("listen for the data plane on {}", cfg.data_listen))?;
    let data_local = data_listener.local_addr().context("read the data-plane address")?;
    let tls = match &cfg.tls {
        Some(files) => {
            let t = crate::tls::Tls::load(files).map_err(|e| anyhow::anyhow!("set up TLS: {e}"))?;
            info!(cert = %files.cert.display(), client_certificates = files.client_ca.is_some(), "serving gRPC over TLS");
            Some(Arc::new(t))
        }
        None => {
            if cfg.insecure_plaintext && !cfg.listen.ip().is_loopback() {
                warn!(listen = %cfg.listen, "serving gRPC WITHOUT TLS beyond loopback (--insecure-plaintext): tokens and session secrets cross the network in the clear");
            }
            None
        }
    };
    let dataplane = Arc::new(DataPlane {
        keys: leases.keys().clone(),
        sessions: sessions.clone(),
        media: pool.media().clone(),
        op_timeout_ms: (cfg.data_op_timeout.as_millis() as u64).into(),
        idle_timeout_ms: (cfg.data_idle_timeout.as_millis() as u64).into(),
        gate: gate.clone(),
        tls: if cfg.data_tls { tls.clone() } else { None },
        busy_poll: cfg.data_busy_poll,
    });
    if cfg.data_tls {
        info!(data = %data_local, "serving the TCP data plane over TLS (payloads pass a bounce buffer)");
    } else if !data_local.ip().is_loopback() {
        info!(data = %data_local, "the TCP data plane beyond loopback is not encrypted (dataplane.tls is off)");
    }
    let rdma = crate::rdma::Rdma::start(&cfg, pool.clone(), leases.clone(), sessions.clone(), gate.clone()).await;
    let data_stop = CancellationToken::new();
    let data_task = tokio::spawn(dataplane.clone().serve(
        data_listener,
        cfg.limits.max_data_connections,
        cfg.limits.max_connections_per_source,
        data_stop.clone(),
    ));
    let auth = grpc::Auth::new(cfg.principals.clone());
    let map_view = Arc::new(crate::cluster_view::MapView::new(leases.fence().clone()));
    let metrics_local = match cfg.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.with_context(|| format!("listen for metrics on {addr}"))?;
            let a = l.local_addr().context("read the metrics address")?;
            tokio::spawn(crate::metrics::serve(
                l,
                pool.clone(),
                sessions.clone(),
                leases.clone(),
                auth.clone(),
                root.child_token(),
            ));
            info!(metrics = %a, "serving Prometheus metrics on /metrics");
            Some(a)
        }
        None => None,
    };
    let registry = Arc::new(crate::nbd::Registry::default());
    let nbd_stop = CancellationToken::new();
    let nbd = match &cfg.nbd {
        Some(n) => {
            let l = TcpListener::bind(n.listen).await.with_context(|| format!("listen for NBD on {}", n.listen))?;
            let a = l.local_addr().context("read the NBD address")?;
            let srv = Arc::new(crate::nbd::NbdServer {
                deps: crate::nbd::Deps {
                    leases: leases.clone(),
                    sessions: sessions.clone(),
                    pool: pool.clone(),
                    media: pool.media().clone(),
                    gate: gate.clone(),
                    transport: dataplane.clone(),
                    exclusive: n.exclusive,
                },
                registry: registry.clone(),
                auth: auth.clone(),
                principal: n.principal.clone(),
                tls: if n.tls { tls.clone() } else { None },
                timing: crate::nbd::Timing {
                    handshake: n.handshake_timeout,
                    idle: n.idle_timeout,
                    stall: cfg.data_op_timeout,
                    lease_wait: cfg.lease_break_timeout * 2 + Duration::from_secs(5),
                    busy_poll: n.busy_poll,
                },
            });
            let task = tokio::spawn(srv.serve(
                l,
                cfg.limits.max_data_connections,
                cfg.limits.max_connections_per_source,
                nbd_stop.clone(),
            ));
            if !a.ip().is_loopback() && !n.tls {
                warn!(nbd = %a, "serving NBD beyond loopback without TLS (--insecure-plaintext): volumes cross the network in the clear");
            }
            let principal = n.principal.as_deref().unwrap_or("named by each client certificate");
            info!(nbd = %a, principal, tls = n.tls, exclusive = n.exclusive, "serving volumes over NBD");
            Some((a, task))
        }
        None => None,
    };
    let nbd_local = nbd.as_ref().map(|n| n.0);
    let shared = Shared {
        nbd: registry.clone(),
        nbd_endpoint: nbd_local.map(|a| a.to_string()).unwrap_or_default(),
        auth: auth.clone(),
        pool: pool.clone(),
        sessions: sessions.clone(),
        leases: leases.clone(),
        data_endpoint: data_local.to_string(),
        tcp: dataplane.clone(),
        rdma: rdma.clone(),
        cfg: cfg.clone(),
        draining: root.clone(),
        gate: gate.clone(),
        view: map_view.clone(),
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    let routes = grpc::routes(shared)?.add_service(health_svc);
    let stop_serving = CancellationToken::new();
    let cut = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(cfg.limits.max_concurrent_streams))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Streamed writes send 1 MiB messages: the HTTP/2 default 64 KiB window would stall
        // every message on window updates.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .layer(grpc::layer::GateLayer::new(gate.clone(), root.clone(), auth.clone(), map_view.clone()))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            incoming(
                listener,
                admin.as_mut(),
                (cfg.limits.max_grpc_connections, cfg.limits.max_connections_per_source),
                cfg.grpc_idle_timeout,
                tls.clone(),
                cut.clone(),
            ),
            stop_serving.clone().cancelled_owned(),
        );
    let mut server = tokio::spawn(server);
    // The daemon as a whole ("") and each of its services by name.
    for svc in HEALTH_SERVICES {
        health.set_service_status(svc, tonic_health::ServingStatus::Serving).await;
    }
    if let Some(p) = &cfg.ports_file {
        write_ports_file(
            p,
            local,
            data_local,
            metrics_local,
            &rdma.status().endpoint,
            admin.as_ref().map(|a| a.path()),
            nbd_local,
        )?;
    }
    let mut line = format!("rdaxd: listening grpc={local} data={data_local}");
    if let Some(p) = cfg.admin_socket.as_deref() {
        line.push_str(&format!(" admin=unix:{}", p.display()));
    }
    if let Some(a) = nbd_local {
        line.push_str(&format!(" nbd={a}"));
    }
    println!("{line}");
    info!(grpc = %local, data = %data_local, pool = %cfg.pool_path.display(), "rdaxd ready");
    #[cfg(feature = "cluster")]
    let membership = cfg.cluster.clone().map(|c| {
        let rdma_at = rdma.status().endpoint.parse::<std::net::SocketAddr>().ok();
        let record = crate::cluster::NodeRecord {
            node_id: c.node_id.clone(),
            grpc: c.advertised(local),
            data: c.advertised(data_local),
            rdma: rdma_at.map(|a| c.advertised(a)),
            capacity_bytes: pool.stats().data_blocks * crate::pool::layout::BLOCK,
            pool_uuid: info.uuid.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        // Repair writes through this daemon's own API, as any client: its admin socket when
        // it has one (admin there without a token), else its gRPC port with the peer token.
        let own = match cfg.admin_socket.as_deref() {
            Some(p) => format!("unix:{}", p.display()),
            None => format!("http://{local}"),
        };
        crate::cluster::Membership::start(c, record, leases.clone(), map_view.clone(), own)
    });
    // Both listeners accept and recovery is done: tell systemd.
    let status = systemd::status_line(&pool, &sessions, &leases);
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let watchdog =
        tokio::spawn(systemd::watchdog_and_status(pool.clone(), sessions.clone(), leases.clone(), root.child_token()));
    let shutdown_ms = Arc::new(std::sync::atomic::AtomicU64::new(cfg.shutdown_timeout.as_millis() as u64));
    let reloader = {
        let live = Live {
            auth: auth.clone(),
            tls: tls.clone(),
            sessions: sessions.clone(),
            leases: leases.clone(),
            dataplane: dataplane.clone(),
            shutdown_ms: shutdown_ms.clone(),
        };
        let mut current = (*cfg).clone();
        tokio::spawn(async move {
            while let Some(new) = reloads.recv().await {
                apply_reload(&current, &new, &live);
                current = new;
            }
        })
    };

    tokio::select! {
        _ = shutdown => {}
        r = &mut server => {
            // The server stopped on its own: that is a failure.
            root.cancel();
            r.context("gRPC server task")?.context("gRPC server")?;
            anyhow::bail!("gRPC server stopped unexpectedly");
        }
    }
    let t0 = Instant::now();
    let bound = Duration::from_millis(shutdown_ms.load(std::sync::atomic::Ordering::Relaxed));
    let deadline = tokio::time::Instant::now() + bound;
    info!(timeout = ?bound, "shutdown started");
    systemd::notify(&[NotifyState::Stopping, NotifyState::Status("shutting down: recalling leases, draining")]);
    reloader.abort();
    for svc in HEALTH_SERVICES {
        health.set_service_status(svc, tonic_health::ServingStatus::NotServing).await;
    }
    // New requests get Unavailable from here on; background loops stop.
    root.cancel();
    timed("recall leases", leases.recall_all()).await;
    let finished =
        timed("finish in-flight work", gate.close(deadline.saturating_duration_since(tokio::time::Instant::now())))
            .await;
    if !finished {
        warn!(inside = %gate.describe(), timeout = ?bound, "in-flight work did not finish within the shutdown timeout; closing its connections");
    }
    // Leave the cluster once the leases are back: the node's key goes with its etcd lease.
    #[cfg(feature = "cluster")]
    if let Some(m) = membership {
        timed("leave the cluster", m.stop()).await;
    }
    rdma.shutdown();
    data_stop.cancel();
    nbd_stop.cancel();
    sessions.shutdown();
    stop_serving.cancel();
    timed("close connections", close_connections(&mut server, &cut)).await;
    // Background loops watch the root token (cancelled above) and end by themselves.
    for (what, task) in [("session reaper", reaper), ("lease reaper", lease_reaper), ("watchdog", watchdog)] {
        if tokio::time::timeout(Duration::from_secs(1), task).await.is_err() {
            warn!(task = what, "a background task did not stop within 1 s");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), data_task).await;
    if let Some((_, task)) = nbd {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    let clean = timed("close the pool", close_pool(pool, CLOSE_BOUND)).await;
    if let Some(p) = &cfg.ports_file {
        // Nothing listens there any more.
        let _ = std::fs::remove_file(p);
    }
    info!(elapsed = ?t0.elapsed(), clean, "shutdown finished");
    if !clean {
        anyhow::bail!("close the pool cleanly within {CLOSE_BOUND:?}: it is left for recovery at the next start");
    }
    Ok(())
}

/// Names the health service answers for.
const HEALTH_SERVICES: [&str; 6] =
    ["", "rdax.v1.Pool", "rdax.v1.Objects", "rdax.v1.Sessions", "rdax.v1.Leases", "rdax.v1.Admin"];

/// How long closing the pool may take once everything else stopped.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

/// Run one shutdown stage, logging how long it took.
async fn timed<T>(stage: &'static str, f: impl Future<Output = T>) -> T {
    let t0 = Instant::now();
    info!(stage, "shutdown stage started");
    let r = f.await;
    info!(stage, elapsed = ?t0.elapsed(), "shutdown stage finished");
    r
}

/// Let the gRPC server finish gracefully for a moment, then cut the connections it still
/// serves, and wait (bounded) for it to end.
async fn close_connections(
    server: &mut tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    cut: &CancellationToken,
) {
    if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), &mut *server).await {
        return report_server(r);
    }
    info!("cutting the gRPC connections still open");
    cut.cancel();
    match tokio::time::timeout(Duration::from_secs(5), &mut *server).await {
        Ok(r) => report_server(r),
        // Its connections cannot reach the pool any more (closed next); let it be.
        Err(_) => warn!("the gRPC server did not stop within 5 s after its connections were cut"),
    }
}

fn report_server(r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "gRPC server ended with an error"),
        Err(e) => warn!(error = %e, "gRPC server task failed"),
    }
}

/// Accepted gRPC connections from TCP and the admin socket, at most `cap` open on each (see
/// [`crate::net::Acceptor`]), each with an idle timeout and cuttable by `cut` (see
/// [`crate::net::Cuttable`]); TCP ones with `TCP_NODELAY`.
/// tonic's own `tcp_nodelay` only applies when it binds the socket itself, and with Nagle on,
/// small messages such as lease recalls and unary replies wait ~40 ms for delayed ACKs.
fn incoming(
    listener: TcpListener,
    admin: Option<&mut crate::admin_socket::AdminSocket>,
    limits: (usize, usize),
    idle: Duration,
    tls: Option<Arc<crate::tls::Tls>>,
    cut: CancellationToken,
) -> impl tokio_stream::Stream<Item = std::io::Result<crate::tls::GrpcIo>> + use<> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    if let Some(a) = admin {
        a.serve(limits, idle, cut.clone(), tx.clone());
    }
    tokio::spawn(async move {
        let mut acceptor = crate::net::Acceptor::new(listener, limits.0, limits.1, "grpc");
        let stop = cut.clone();
        while let Some((s, peer, permit)) = acceptor.accept(&stop).await {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY on a gRPC connection");
            }
            let io = crate::net::Cuttable::new(s, cut.clone(), idle, Some(permit));
            let Some(tls) = tls.clone() else {
                if tx.send(Ok(crate::tls::GrpcIo::Plain(io))).await.is_err() {
                    return; // the server stopped
                }
                continue;
            };
            // The handshake runs on its own, bounded, so a slow client holds only its slot.
            let tx = tx.clone();
            tokio::spawn(async move {
                match tls.accept(io).await {
                    Ok(io) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Err(e) => tracing::info!(peer = %peer, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Close the pool (persist, mark clean) on a blocking thread, bounded. Returns whether it was
/// closed cleanly. Whoever still holds the pool gets `Closed` errors from then on.
async fn close_pool(pool: Arc<Pool>, bound: Duration) -> bool {
    let job = tokio::task::spawn_blocking(move || pool.close_shared());
    match tokio::time::timeout(bound, job).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::error!(timeout = ?bound, "closing the pool did not finish in time (a pool job is stuck)");
            false
        }
    }
}

/// Resolve on the first SIGINT or SIGTERM. Later ones are logged; SIGQUIT exits at once.
/// SIGHUP calls `on_hup` (reload), never shutdown.
pub fn shutdown_signal(on_hup: impl Fn() + Send + 'static) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut quit = signal(SignalKind::quit()).context("install SIGQUIT handler")?;
    let first = CancellationToken::new();
    let f2 = first.clone();
    tokio::spawn(async move {
        loop {
            let which = tokio::select! {
                _ = hup.recv() => {
                    info!("SIGHUP: reloading the configuration");
                    on_hup();
                    continue;
                }
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => {
                    tracing::error!("SIGQUIT: exiting at once without a clean shutdown");
                    std::process::exit(131);
                }
            };
            if f2.is_cancelled() {
                warn!(signal = which, "already shutting down");
            } else {
                info!(signal = which, "shutdown requested");
                f2.cancel();
            }
        }
    });
    Ok(first.cancelled_owned())
}
