//! Cluster membership in etcd (`[cluster]`, the `cluster` feature).
//!
//! The node registers `<prefix>/nodes/<node_id>` (its [`NodeRecord`]: endpoints, capacity)
//! under an etcd lease and renews that lease every quarter TTL. Each renewal etcd
//! acknowledges opens the lease manager's [`Fence`](crate::lease::Fence) until three quarters
//! of the TTL after the renewal was *sent*; etcd counts the TTL from when it *received* it, so
//! the node stops granting at least a quarter TTL before etcd can forget it, and revokes its
//! leases then (the fence watcher). A node that is not registered grants nothing.
//!
//! When the connection breaks (etcd restarted, a partition), the node reconnects and renews
//! the same etcd lease if etcd still has it; if not (it expired), it registers again under a
//! new one: it rejoins. A registration left by this node's own previous run (same pool
//! UUID: it cannot be alive, since this process holds the pool) is replaced; one by another
//! daemon under the same node id is refused and reported until it goes away.
//!
//! Everything here runs in two tasks that own their state; [`Membership::stop`] ends them
//! and revokes the etcd lease, so the others see the node leave at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod collect;
mod coordinator;
mod forward;
mod mapwatch;
mod repair;
pub use rdax_proto::cluster as placement;
pub use rdax_proto::cluster::NodeRecord;

use crate::cluster_view::MapView;
use crate::config::Cluster;
use crate::lease::LeaseManager;
use crate::metrics::METRICS;

/// Why the etcd side failed.
#[derive(Debug, thiserror::Error)]
enum JoinError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "node id `{id}` is registered by another live daemon (gRPC {grpc}, pool {pool}); give this one another --node-id"
    )]
    Duplicate { id: String, grpc: String, pool: String },
    #[error("the etcd lease expired")]
    Expired,
    #[error("etcd closed the stream")]
    Closed,
    #[error("no longer the coordinator (its election key or the PG map changed)")]
    NotCoordinator,
}

/// etcd connect options with this node's TLS and etcd authentication (`cluster.etcd_ca`,
/// `etcd_cert`/`etcd_key`, `etcd_user`/`etcd_password_file`). An expired etcd auth token is
/// fetched again by the client.
pub(crate) fn etcd_options(cfg: &Cluster) -> ConnectOptions {
    let a = &cfg.etcd_access;
    let mut o = ConnectOptions::new();
    if let Some(ca) = &a.ca_pem {
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        if let Some((cert, key)) = &a.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key.as_bytes()));
        }
        o = o.with_tls(tls);
    }
    if let Some((user, password)) = &a.user {
        o = o.with_user(user.clone(), password.to_string()).with_auto_token_refresh(true);
    }
    o
}

/// A running membership.
#[derive(Debug)]
pub struct Membership {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Member {
    /// Registered at least once (before that there is nothing to fence).
    joined: AtomicBool,
    /// Fenced since the fence last closed: its leases were revoked.
    fenced: AtomicBool,
    cfg: Cluster,
    key: String,
    value: String,
    record: NodeRecord,
    leases: Arc<LeaseManager>,
    /// What the request layer checks cluster requests against.
    view: Arc<MapView>,
    /// This daemon's own endpoint for repair's writes (its admin socket when it has one).
    local: String,
    /// For each PG this node holds: when (this host's clock, ns) it first saw a map that made
    /// it a replica, after one that did not. Unknown for the PGs of the first map this process
    /// saw. Every object a client created here in this stint as a replica is younger (the
    /// node refuses requests routed by a map it has not seen).
    held_since: std::sync::Mutex<mapwatch::HeldSince>,
    /// The objects this process's repair created here, by (PG, task epoch): young, but not a
    /// client's. Kept across tries of one task, so that a copy that fails part-way (its source
    /// lost) and starts again from another source copies them again rather than keep them.
    repair_created: std::sync::Mutex<BTreeMap<(u32, u64), Arc<Created>>>,
}

/// Objects (namespace, name) a repair created here.
type Created = std::sync::Mutex<BTreeSet<(String, String)>>;

impl Membership {
    /// Enable the fence (nothing is granted until the node is registered) and start joining.
    /// `local` is this daemon's own endpoint, for repair to write through.
    pub fn start(
        cfg: Cluster,
        record: NodeRecord,
        leases: Arc<LeaseManager>,
        view: Arc<MapView>,
        local: String,
    ) -> Self {
        leases.fence().enable();
        view.set_forward(Arc::new(forward::Peers::new(cfg.clone())));
        let cancel = CancellationToken::new();
        let value = serde_json::to_string(&record).expect("a node record serialises");
        let m = Arc::new(Member {
            joined: false.into(),
            fenced: false.into(),
            key: cfg.node_key(),
            cfg,
            value,
            record,
            leases,
            view,
            local,
            held_since: Default::default(),
            repair_created: Default::default(),
        });
        info!(
            node = %m.record.node_id, etcd = ?m.cfg.etcd, ttl = ?m.cfg.lease_ttl, replicas = m.cfg.replicas,
            "joining the cluster (no lease is granted until this node is registered)"
        );
        let tasks = vec![tokio::spawn(m.clone().run(cancel.clone())), tokio::spawn(m.watch_fence(cancel.clone()))];
        Self { cancel, tasks }
    }

    /// Leave: stop renewing and revoke the etcd lease (bounded), so the node's key goes at once.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(Duration::from_secs(3), t).await.is_err() {
                warn!("a cluster membership task did not stop within 3 s");
            }
        }
    }
}

impl Drop for Membership {
    /// Dropped without [`Membership::stop`] (the daemon failing on its way out): the tasks end
    /// too, revoking the etcd lease as `stop` does if the runtime still runs them; otherwise
    /// the key goes when the etcd lease expires.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// An etcd lease this node holds, and the connection renewing it.
struct Held {
    client: Client,
    lease: i64,
}

impl Member {
    /// A bound on one etcd request.
    fn rpc_bound(&self) -> Duration {
        self.cfg.keepalive_interval().max(Duration::from_millis(500))
    }

    async fn bounded<T>(&self, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, JoinError> {
        let b = self.rpc_bound();
        Ok(tokio::time::timeout(b, f).await.map_err(|_| JoinError::Timeout(b))??)
    }

    async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut lease: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        let mut last_error = String::new();
        let mut client_for_leave: Option<Client> = None;
        loop {
            let attempt = async {
                let held = self.join(lease).await?;
                lease = Some(held.lease);
                client_for_leave = Some(held.client.clone());
                Ok::<_, JoinError>(held)
            };
            let r = tokio::select! {
                _ = cancel.cancelled() => break,
                r = attempt => r,
            };
            match r {
                Ok(held) => {
                    backoff = Duration::from_millis(100);
                    last_error.clear();
                    METRICS.cluster_joins.fetch_add(1, Relaxed);
                    self.joined.store(true, Relaxed);
                    info!(node = %self.record.node_id, key = %self.key, "registered in the cluster: granting leases");
                    let stand = self.stand(held.client.clone(), held.lease);
                    let follow = self.follow_map(held.client.clone());
                    let repair = self.keep_repairing(held.client.clone());
                    let e = tokio::select! {
                        _ = cancel.cancelled() => break,
                        e = self.renew(held) => e,
                        _ = stand => unreachable!("standing for coordinator never ends by itself"),
                        _ = follow => unreachable!("following the PG map never ends by itself"),
                        _ = repair => unreachable!("repairing never ends by itself"),
                    };
                    if matches!(e, JoinError::Expired) {
                        lease = None;
                    }
                    warn!(node = %self.record.node_id, error = %e, "lost the etcd lease renewal; reconnecting");
                }
                Err(e) => {
                    let msg = e.to_string();
                    if msg != last_error {
                        warn!(node = %self.record.node_id, error = %msg, "cannot register in the cluster; retrying");
                        last_error = msg;
                    }
                    if matches!(e, JoinError::Expired) {
                        lease = None;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.cfg.keepalive_interval());
        }
        self.leases.fence().close();
        if let (Some(id), Some(mut c)) = (lease, client_for_leave) {
            match self.bounded(c.lease_revoke(id)).await {
                Ok(_) => info!(node = %self.record.node_id, "left the cluster (etcd lease revoked)"),
                Err(e) => {
                    warn!(node = %self.record.node_id, error = %e, "could not revoke the etcd lease; it expires by itself")
                }
            }
        }
    }

    /// Connect, renew `lease` if etcd still has it or grant a new one, and make sure the
    /// node's key is there under it. Opens the fence.
    async fn join(&self, lease: Option<i64>) -> Result<Held, JoinError> {
        let opts = etcd_options(&self.cfg)
            .with_connect_timeout(self.rpc_bound())
            .with_keep_alive(self.cfg.keepalive_interval(), self.rpc_bound());
        let mut client = self.bounded(Client::connect(&self.cfg.etcd, Some(opts))).await?;
        let sent = Instant::now();
        let (id, ttl) = match lease {
            Some(id) => {
                let r = self.bounded(client.lease_time_to_live(id, None)).await?;
                if r.ttl() <= 0 {
                    return Err(JoinError::Expired);
                }
                // Renew before trusting it: the remaining TTL is etcd's, counted from earlier.
                let (mut keeper, mut stream) = self.bounded(client.lease_keep_alive(id)).await?;
                self.bounded(keeper.keep_alive()).await?;
                match self.bounded(stream.message()).await? {
                    Some(r) if r.ttl() > 0 => (id, r.ttl()),
                    Some(_) => return Err(JoinError::Expired),
                    None => return Err(JoinError::Closed),
                }
            }
            None => {
                let r = self.bounded(client.lease_grant(self.cfg.lease_ttl.as_secs() as i64, None)).await?;
                (r.id(), r.ttl())
            }
        };
        if let Err(e) = self.register(&mut client, id).await {
            if lease.is_none() {
                // A lease granted for a registration that failed would only wait out its TTL.
                let _ = self.bounded(client.lease_revoke(id)).await;
            }
            return Err(e);
        }
        // Whatever was granted before the fence closed goes before it opens again, whichever
        // of this and the fence watcher sees the closed fence first.
        if !self.leases.fence().is_open() {
            self.fence_now();
        }
        self.leases.fence().open_until(sent + member_for(ttl));
        Ok(Held { client, lease: id })
    }

    /// Put the node's key under `lease` unless it is there already.
    async fn register(&self, client: &mut Client, lease: i64) -> Result<(), JoinError> {
        let put = || TxnOp::put(self.key.clone(), self.value.clone(), Some(PutOptions::new().with_lease(lease)));
        let txn = Txn::new()
            .when([Compare::create_revision(self.key.clone(), CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(self.key.clone(), None)]);
        let r = self.bounded(client.txn(txn)).await?;
        if r.succeeded() {
            return Ok(());
        }
        let Some(TxnOpResponse::Get(g)) = r.op_responses().into_iter().next() else { return Ok(()) };
        let Some(kv) = g.kvs().first() else { return Ok(()) };
        if kv.lease() == lease && kv.value() == self.value.as_bytes() {
            return Ok(());
        }
        let other: Option<NodeRecord> = serde_json::from_slice(kv.value()).ok();
        let ours = other.as_ref().is_some_and(|o| o.pool_uuid == self.record.pool_uuid);
        if !ours && kv.lease() != lease {
            let (grpc, pool) = other.map(|o| (o.grpc, o.pool_uuid)).unwrap_or_else(|| ("?".into(), "?".into()));
            return Err(JoinError::Duplicate { id: self.record.node_id.clone(), grpc, pool });
        }
        // This pool's previous run (dead: this process holds the pool), or our own key with
        // other contents: replace it, unless it changed meanwhile.
        let (old_lease, rev) = (kv.lease(), kv.mod_revision());
        let txn = Txn::new().when([Compare::mod_revision(self.key.clone(), CompareOp::Equal, rev)]).and_then([put()]);
        if !self.bounded(client.txn(txn)).await?.succeeded() {
            return Err(JoinError::Closed);
        }
        if old_lease != 0 && old_lease != lease {
            let _ = self.bounded(client.lease_revoke(old_lease)).await;
            info!(node = %self.record.node_id, "replaced the registration this pool's previous run left");
        }
        Ok(())
    }

    /// Stand for coordinator for as long as the held lease is renewed (the caller drops this
    /// when renewal ends): after each loss of leadership or etcd error, stand again.
    async fn stand(&self, client: Client, lease: i64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let e = self.coordinate(client.clone(), lease).await;
            warn!(node = %self.record.node_id, error = %e, "stopped coordinating; standing again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.keepalive_interval());
        }
    }

    /// Follow the PG map for as long as the held lease is renewed; after an etcd error, again.
    async fn follow_map(&self, client: Client) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let e = self.watch_map(client.clone()).await;
            info!(node = %self.record.node_id, error = %e, "PG map watch ended; watching again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.keepalive_interval());
        }
    }

    /// Repair what is assigned to this node, again after each etcd error.
    async fn keep_repairing(&self, client: Client) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let e = self.repair(client.clone()).await;
            info!(node = %self.record.node_id, error = %e, "repair watch ended; watching again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.keepalive_interval());
        }
    }

    /// Renew the held lease every quarter TTL until renewal fails; each acknowledged renewal
    /// opens the fence further. Returns why it stopped.
    async fn renew(&self, mut held: Held) -> JoinError {
        let (mut keeper, mut stream) = match self.bounded(held.client.lease_keep_alive(held.lease)).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        let mut tick = tokio::time::interval(self.cfg.keepalive_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Send times of the renewals not answered yet, oldest first (etcd answers in order).
        let mut sent: VecDeque<Instant> = VecDeque::new();
        let mut last_answer = Instant::now();
        loop {
            let stalled = tokio::time::sleep_until((last_answer + self.cfg.member_for()).into());
            tokio::select! {
                _ = tick.tick() => {
                    if sent.len() >= 16 {
                        sent.pop_front();
                    }
                    sent.push_back(Instant::now());
                    if let Err(e) = self.bounded(keeper.keep_alive()).await {
                        return e;
                    }
                }
                m = stream.message() => match m {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        let at = sent.pop_front().unwrap_or(last_answer);
                        last_answer = Instant::now();
                        self.leases.fence().open_until(at + member_for(r.ttl()));
                    }
                    Ok(Some(_)) => return JoinError::Expired,
                    Ok(None) => return JoinError::Closed,
                    Err(e) => return e.into(),
                },
                _ = stalled => return JoinError::Timeout(self.cfg.member_for()),
            }
        }
    }

    /// The fence is closed: revoke every lease, once per closing (the fence already refuses
    /// new grants and operations).
    fn fence_now(&self) {
        if self.joined.load(Relaxed) && !self.fenced.swap(true, Relaxed) {
            let n = self.leases.fence_revoke();
            METRICS.cluster_fences.fetch_add(1, Relaxed);
            warn!(
                node = %self.record.node_id, revoked = n,
                "fenced: no etcd lease renewal was acknowledged in time; refusing leases and revoked every lease"
            );
        }
    }

    /// When the fence's deadline passes, revoke every lease; say when it opens again.
    async fn watch_fence(self: Arc<Self>, cancel: CancellationToken) {
        let fence = self.leases.fence().clone();
        loop {
            if !fence.is_open() {
                self.fence_now();
            } else if self.fenced.swap(false, Relaxed) {
                info!(node = %self.record.node_id, "membership current again: granting leases");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = fence.changed_or_due() => {}
            }
        }
    }
}

/// How long after sending a renewal etcd acknowledged with `ttl` seconds the node stays a member.
fn member_for(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64) * 3 / 4
}
