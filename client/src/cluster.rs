//! The cluster client (the `cluster` feature): one namespace over many rdaxd, routed by the
//! PG map that the cluster keeps in etcd.
//!
//! [`ClusterClient`] reads the registered nodes (`<prefix>/nodes/`) and the PG map
//! (`<prefix>/pgmap`) from etcd and watches both. An object's name hashes to a placement
//! group ([`pg_of`]); the map names that PG's replicas, primary first.
//! * **Create, resize and delete** go to the PG's primary only. It applies them under a lock
//!   on the object's name, has every other replica converge to the result, and answers only
//!   then: per object they are linearizable, in the primary's order, and an acknowledged one
//!   is on every replica of the map. A replica refuses a routed change that does not come
//!   from the primary.
//! * **Writes** ([`ClusterClient::put`] of a whole object, [`ClusterClient::write_at`] of a
//!   range inside one) go one-sided over the data plane to every replica at once, each under
//!   an exclusive lease of its own (taken primary first, so two writes of one range never
//!   interleave), and return only when every replica has persisted the bytes. A write that
//!   fails part-way is not acknowledged; repeating it is harmless.
//! * **Reads** go to the first replica that has the object (primary first); a replica that
//!   lacks it (one still being repaired) or cannot be reached is skipped.
//! * Every request carries the map epoch and the PG it was routed by. A replica refuses a
//!   request routed by another epoch than its own, or for a PG it does not hold; the client
//!   then refreshes the map from etcd and tries again, until the operation's deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, WatchOptions};
use futures_util::future::join_all;
use rdax_proto::cluster::{NodeRecord, PgMap, RepairAssignment, RepairDone, pg_of, repair_pending};
use rdax_proto::pb;
use tokio::sync::watch;

use crate::client::{Client, ConnectOptions, Route};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{Lease, LeaseMode};
use crate::session::{Session, SessionOptions};

mod ranges;

/// How to reach etcd beyond its URLs: TLS (`https://` URLs) and etcd's own authentication.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    /// PEM of the CA that signed etcd's server certificate (needed for `https://` URLs).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate and key this client presents (etcd's `--client-cert-auth`).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// An etcd user and its password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.ca_pem.is_some())
            .field("client_cert", &self.identity_pem.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u.as_str()))
            .finish()
    }
}

impl EtcdAccess {
    /// etcd connect options with these credentials, bounded by `connect` and `each` (every
    /// request). An expired etcd auth token is fetched again by the client.
    pub fn options(&self, connect: Duration, each: Duration) -> etcd_client::ConnectOptions {
        let mut o = etcd_client::ConnectOptions::new().with_connect_timeout(connect).with_timeout(each);
        if let Some(ca) = &self.ca_pem {
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.identity_pem {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            o = o.with_tls(tls);
        }
        if let Some((user, password)) = &self.user {
            o = o.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        o
    }
}

/// How to reach a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// etcd client URLs (`http://host:port`, or `https://host:port` with
    /// [`EtcdAccess::ca_pem`]).
    pub etcd: Vec<String>,
    /// TLS and authentication for etcd.
    pub etcd_access: EtcdAccess,
    /// The cluster's etcd key prefix (`cluster.prefix` of its daemons).
    pub prefix: String,
    /// How to connect to each node (token, TLS, per-request bounds).
    pub connect: ConnectOptions,
    /// The sessions the client opens on the nodes for its leases.
    pub session: SessionOptions,
    /// Bound on each operation, retries after refusals and map changes included.
    pub deadline: Duration,
    /// Bound on one try of an operation (a node stopped mid-write answers nothing; the data
    /// plane has no deadline of its own). Raise it for objects of more than about 1 GiB.
    pub try_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            etcd_access: EtcdAccess::default(),
            prefix: "/rdax".into(),
            // A stopped node accepts connections but never answers: keep each try short, so
            // the operation can go on to the next map.
            connect: ConnectOptions {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Some(Duration::from_secs(5)),
                ..ConnectOptions::default()
            },
            session: SessionOptions { client_name: "rdax-cluster-client".into(), ..SessionOptions::default() },
            deadline: Duration::from_secs(60),
            try_timeout: Duration::from_secs(15),
        }
    }
}

/// What the client knows of the cluster: the PG map and the registered nodes.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// The PG map (`None` until a coordinator has written one).
    pub map: Option<PgMap>,
    /// The registered nodes, by id.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// What each node was assigned to repair, and what it has finished.
    pub repair: BTreeMap<String, RepairAssignment>,
    /// See `repair`.
    pub repaired: BTreeMap<String, RepairDone>,
}

impl ClusterView {
    /// The map's epoch (0: no map).
    pub fn epoch(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.epoch)
    }

    /// Whether `node` is still copying `pg` (its copy may be incomplete or old: it is not read).
    pub fn repairing(&self, node: &str, pg: u32) -> bool {
        self.repair
            .get(node)
            .is_some_and(|a| repair_pending(a, self.repaired.get(node).unwrap_or(&RepairDone::new()), pg))
    }
}

/// One node as the client reaches it.
struct NodeConn {
    grpc: String,
    client: Client,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

struct Inner {
    opts: ClusterOptions,
    etcd: etcd_client::Client,
    view: watch::Sender<Arc<ClusterView>>,
    nodes: Mutex<HashMap<String, Arc<NodeConn>>>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.watcher.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5): two clients that collide on one object (two
/// puts of different sizes undo each other's resize) do not keep colliding in step.
fn jittered(d: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    d.mul_f64(0.5 + (r >> 11) as f64 / (1u64 << 53) as f64)
}

/// Leases a put holds on the replicas. Dropped with leases in it (a refusal part-way, or the
/// try's bound), it gives them back in a task of their own: a lease that is only dropped
/// stays granted until it expires, and would hold off every other writer of the object.
struct Held(Vec<(String, Lease)>);

impl Drop for Held {
    fn drop(&mut self) {
        let leases = std::mem::take(&mut self.0);
        if leases.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                join_all(leases.into_iter().map(|(_, l)| l.release())).await;
            });
        }
    }
}

/// A client of a whole cluster. Cheap to clone; clones share connections and the watch.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("etcd", &self.inner.opts.etcd)
            .field("epoch", &self.view().epoch())
            .finish()
    }
}

/// What a successful put did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutReceipt {
    /// The PG map epoch it was routed by.
    pub epoch: u64,
    /// The object's PG.
    pub pg: u32,
    /// The replicas that persisted it, primary first.
    pub replicas: Vec<String>,
}

fn etcd_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("etcd: {e}"))
}

/// Whether another try, perhaps on a newer map, may succeed. `Other` is in: a connection that
/// broke mid-request (a node killed under it) reports no status of the node's, and `Io` is a
/// data-plane connection reset (the client's own data is in memory).
fn retryable(e: &Error) -> bool {
    e.node_epoch().is_some()
        || matches!(
            e.kind(),
            ErrorKind::Unavailable
                | ErrorKind::Connect
                | ErrorKind::DeadlineExceeded
                | ErrorKind::Revoked
                | ErrorKind::Other
                | ErrorKind::Protocol
                | ErrorKind::Io
        )
}

impl ClusterClient {
    /// Connect to etcd, read the cluster's nodes and PG map, and keep watching them.
    pub async fn connect(opts: ClusterOptions) -> Result<Self> {
        if opts.etcd.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "no etcd endpoint given"));
        }
        let bound = opts.connect.connect_timeout.max(Duration::from_secs(1));
        let eopts = opts.etcd_access.options(bound, bound * 2);
        let etcd = tokio::time::timeout(bound * 2, etcd_client::Client::connect(&opts.etcd, Some(eopts)))
            .await
            .map_err(|_| etcd_err(format!("no answer from {:?} within {:?}", opts.etcd, bound * 2)))?
            .map_err(etcd_err)?;
        let (view, _) = watch::channel(Arc::new(ClusterView::default()));
        let inner = Arc::new(Inner { opts, etcd, view, nodes: Mutex::new(HashMap::new()), watcher: Mutex::new(None) });
        let this = Self { inner };
        this.refresh().await?;
        let weak = Arc::downgrade(&this.inner);
        let task = tokio::spawn(watch_cluster(weak));
        *this.inner.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(this)
    }

    /// The cluster as last read from etcd.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view.borrow().clone()
    }

    /// Read the nodes and the PG map from etcd now.
    pub async fn refresh(&self) -> Result<Arc<ClusterView>> {
        let v = Arc::new(read_view(&self.inner).await?);
        publish(&self.inner, v.clone());
        Ok(v)
    }

    /// The PG of an object, and its replicas in the current map (primary first).
    pub fn placement(&self, namespace: &str, name: &str) -> Option<(u32, Vec<String>)> {
        let v = self.view();
        let m = v.map.as_ref()?;
        let pg = pg_of(namespace, name, m.pgs);
        Some((pg, m.replicas_of(pg).to_vec()))
    }

    /// A connection to node `id` (as registered now).
    pub async fn node(&self, id: &str) -> Result<Client> {
        Ok(self.conn(id).await?.client.clone())
    }

    async fn conn(&self, id: &str) -> Result<Arc<NodeConn>> {
        let grpc = self
            .view()
            .nodes
            .get(id)
            .map(|r| r.grpc.clone())
            .ok_or_else(|| Error::new(ErrorKind::Unavailable, format!("node {id} is not registered")))?;
        if let Some(c) = self.inner.nodes.lock().unwrap_or_else(|e| e.into_inner()).get(id)
            && c.grpc == grpc
        {
            return Ok(c.clone());
        }
        let client = Client::connect(&grpc, self.inner.opts.connect.clone())
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("node {id} ({grpc}): {e}")))?;
        let c = Arc::new(NodeConn { grpc, client, session: tokio::sync::Mutex::new(None) });
        self.inner.nodes.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), c.clone());
        Ok(c)
    }

    /// The client's session on node `id`, opened on first use.
    async fn session(&self, c: &NodeConn) -> Result<Arc<Session>> {
        let mut s = c.session.lock().await;
        if let Some(s) = s.as_ref() {
            return Ok(s.clone());
        }
        let bound = self.inner.opts.connect.request_timeout.unwrap_or(self.inner.opts.try_timeout);
        let opened =
            tokio::time::timeout(bound, c.client.open_session_with(self.inner.opts.session.clone())).await.map_err(
                |_| Error::new(ErrorKind::Unavailable, format!("opening a session: no answer within {bound:?}")),
            )??;
        let opened = Arc::new(opened);
        *s = Some(opened.clone());
        Ok(opened)
    }

    /// Forget node `id`'s connection and session after a failure, so the next try starts
    /// afresh.
    fn forget(&self, id: &str) {
        self.inner.nodes.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Run `op` with the object's PG and replicas, refreshing the map and trying again after
    /// refusals and failures that a newer map may cure, until the deadline.
    async fn routed<T, F, Fut>(&self, namespace: &str, name: &str, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(Route, Vec<String>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        rdax_proto::model::ObjectKey::new(namespace, name)?;
        let deadline = Instant::now() + self.inner.opts.deadline;
        let mut delay = Duration::from_millis(50);
        loop {
            let v = self.view();
            let last = match v.map.as_ref() {
                None => Error::new(ErrorKind::Unavailable, "the cluster has no PG map yet"),
                Some(m) => {
                    let pg = pg_of(namespace, name, m.pgs);
                    let replicas = m.replicas_of(pg).to_vec();
                    if replicas.is_empty() {
                        Error::new(ErrorKind::Unavailable, format!("PG {pg} has no replicas"))
                    } else if let Some(waiting) = m.down_of(pg) {
                        Error::new(ErrorKind::Unavailable, down_message(pg, waiting))
                    } else {
                        let bound = self.inner.opts.try_timeout.min(deadline.saturating_duration_since(Instant::now()));
                        // Dropped at the bound, a try leaves nothing acknowledged; its leases
                        // are given back by their guards or expire.
                        match tokio::time::timeout(
                            bound,
                            op(Route { epoch: m.epoch, pg: Some(pg), from_primary: false }, replicas),
                        )
                        .await
                        {
                            Ok(Ok(t)) => return Ok(t),
                            Ok(Err(e)) if retryable(&e) => e,
                            Ok(Err(e)) => return Err(e),
                            Err(_) => Error::new(ErrorKind::Unavailable, format!("no answer within {bound:?}")),
                        }
                    }
                }
            };
            if Instant::now() + delay >= deadline {
                return Err(Error::new(
                    last.kind(),
                    format!("{what} {namespace}/{name}: gave up after {:?}: {last}", self.inner.opts.deadline),
                ));
            }
            tracing::debug!(error = %last, epoch = v.epoch(), "cluster request: refreshing the map and retrying");
            tokio::time::sleep(jittered(delay)).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            // The watch usually has the new map already; read it anyway, since a refusal may
            // come before the watch delivers.
            if let Err(e) = self.refresh().await {
                tracing::debug!(error = %e, "refreshing the PG map");
            }
        }
    }

    /// Create the object if missing, with `size` bytes (resized if it exists with another
    /// size), through the PG's primary, which has every other replica follow before it answers.
    async fn ensure(&self, route: Route, replicas: &[String], namespace: &str, name: &str, size: u64) -> Result<()> {
        let id = &replicas[0];
        let c = self.conn(id).await?;
        let obj = c.client.routed(Some(route)).object(namespace, name)?;
        let r = match obj.create(size).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let r = match obj.stat().await {
                    Ok(st) if st.size == size => Ok(()),
                    Ok(_) => obj.resize(size).await.map(drop),
                    Err(e) => Err(e),
                };
                match r {
                    // Deleted by another client since the create: the put starts again.
                    Err(e) if e.kind() == ErrorKind::NotFound && e.node_epoch().is_none() => {
                        Err(Error::new(ErrorKind::Unavailable, format!("{namespace}/{name} went meanwhile: {e}")))
                    }
                    r => r,
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &r
            && retryable(e)
        {
            self.forget(id);
        }
        r
    }

    /// Write `data` as the whole content of `namespace/name` on every replica of its PG
    /// (creating or resizing it first, through the primary), each one-sided under an exclusive
    /// lease; returns when all have persisted it.
    ///
    /// The exclusive leases are taken one replica after another in map order, primary first,
    /// and the bytes are written only once all are held and the primary still has the
    /// object at this size. Two puts of one object therefore never interleave their writes
    /// on the replicas: whichever holds the primary's lease writes everywhere, and the other
    /// is refused and tries again once it is released. The last acknowledged put is what
    /// every replica holds.
    pub async fn put(&self, namespace: &str, name: &str, data: &[u8]) -> Result<PutReceipt> {
        let len = data.len() as u64;
        self.routed(namespace, name, "put", |route, replicas| async move {
            self.ensure(route, &replicas, namespace, name, len).await?;
            if len > 0 {
                let mut leases = Held(Vec::with_capacity(replicas.len()));
                for id in &replicas {
                    // On a refusal the leases taken so far are given back (`Held`).
                    leases.0.push((id.clone(), self.lease_one(id, route, (namespace, name), 0, len).await?));
                }
                let primary = self.conn(&replicas[0]).await?;
                let st = primary.client.routed(Some(route)).object(namespace, name)?.stat().await;
                match st {
                    Ok(st) if st.size == len => {}
                    Ok(st) => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("{namespace}/{name} was resized to {} meanwhile; the put starts again", st.size),
                        ));
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound && e.node_epoch().is_none() => {
                        return Err(Error::new(ErrorKind::Unavailable, format!("{namespace}/{name} went meanwhile")));
                    }
                    Err(e) => return Err(e),
                }
                let writes = leases.0.iter().map(|(id, l)| async move {
                    let r = l.write_persist(0, data).await;
                    if let Err(e) = &r
                        && retryable(e)
                    {
                        self.forget(id);
                    }
                    r
                });
                let wrote: Result<Vec<()>> = join_all(writes).await.into_iter().collect();
                let released = join_all(std::mem::take(&mut leases.0).into_iter().map(|(_, l)| l.release())).await;
                wrote?;
                released.into_iter().collect::<Result<Vec<()>>>()?;
            }
            Ok(PutReceipt { epoch: route.epoch, pg: route.pg.unwrap_or(0), replicas })
        })
        .await
    }

    /// An exclusive read-write lease on `[offset, offset + len)` of the object on node `id`.
    async fn lease_one(&self, id: &str, route: Route, key: (&str, &str), offset: u64, len: u64) -> Result<Lease> {
        let (namespace, name) = key;
        let r = async {
            let c = self.conn(id).await?;
            let s = self.session(&c).await?;
            s.acquire_routed(namespace, name, offset, len, LeaseMode::ReadWrite, true, Some(route)).await
        }
        .await;
        match r {
            // Another writer's exclusive lease holds the range, the object went between the
            // create and the lease (a concurrent delete or a repair's cleanup), or another put
            // resized it: the whole put is tried again shortly.
            Err(e)
                if matches!(e.kind(), ErrorKind::FailedPrecondition | ErrorKind::NotFound | ErrorKind::OutOfRange)
                    && e.node_epoch().is_none() =>
            {
                if e.kind() == ErrorKind::NotFound {
                    // Or the node no longer knows the session (it expired while the node was
                    // stopped, or the node restarted): start afresh.
                    self.forget(id);
                }
                Err(Error::new(ErrorKind::Unavailable, format!("node {id}: {e}")))
            }
            Err(e) if retryable(&e) => {
                self.forget(id);
                Err(e)
            }
            r => r,
        }
    }

    /// Read the whole of `namespace/name` from the first complete replica that has it.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Vec<u8>> {
        self.routed(namespace, name, "get", |route, replicas| async move {
            let readable = self.readable(route, replicas)?;
            self.first_replica(&readable, |id| self.read_one(id, route, (namespace, name), None)).await
        })
        .await
    }

    /// The replicas a read may use: those not copying the PG (a copy in progress may be old or
    /// incomplete). None: `Unavailable`, and the read waits for repair.
    fn readable(&self, route: Route, replicas: Vec<String>) -> Result<Vec<String>> {
        let v = self.view();
        let pg = route.pg.unwrap_or(0);
        let ok: Vec<String> = replicas.into_iter().filter(|n| !v.repairing(n, pg)).collect();
        if ok.is_empty() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("every replica of PG {pg} is still being repaired"),
            ));
        }
        Ok(ok)
    }

    /// The object's metadata, from the first complete replica that has it.
    pub async fn stat(&self, namespace: &str, name: &str) -> Result<pb::ObjectStat> {
        self.routed(namespace, name, "stat", |route, replicas| self.stat_routed(route, replicas, namespace, name)).await
    }

    /// Try `op` on each replica in order; the first success wins. `NotFound` only when every
    /// replica said so; otherwise the last failure.
    async fn first_replica<'a, T, F, Fut>(&self, replicas: &'a [String], op: F) -> Result<T>
    where
        F: Fn(&'a str) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut last = None;
        let mut missing = 0;
        for id in replicas {
            match op(id).await {
                Ok(t) => return Ok(t),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    missing += 1;
                    last = Some(e);
                }
                Err(e) if retryable(&e) || e.kind() == ErrorKind::FailedPrecondition => {
                    if retryable(&e) {
                        self.forget(id);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let e = last.unwrap_or_else(|| Error::new(ErrorKind::Unavailable, "no replica answered"));
        if missing == replicas.len() || !retryable(&e) && e.kind() != ErrorKind::FailedPrecondition {
            return Err(e);
        }
        // Some replica could not answer and none had the object: a newer map may help.
        Err(Error::new(ErrorKind::Unavailable, e.to_string()))
    }

    /// Delete `namespace/name` through its PG's primary, which has every other replica follow
    /// before it answers. `NotFound` if it did not exist. A try whose outcome is unknown (no
    /// answer, or the primary deleted it but missed a replica) makes a later try's `NotFound`
    /// count as this delete's own success.
    pub async fn delete(&self, namespace: &str, name: &str) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let unknown = std::sync::atomic::AtomicBool::new(false);
        let unknown = &unknown;
        self.routed(namespace, name, "delete", |route, replicas| async move {
            let id = &replicas[0];
            let obj = self.conn(id).await?.client.routed(Some(route)).object(namespace, name)?;
            // Until an answer says otherwise, this try may take effect.
            let before = unknown.swap(true, Relaxed);
            match obj.delete().await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound && before => Ok(()),
                Err(e) => Err(self.change_failed(id, unknown, before, e)),
            }
        })
        .await
    }

    /// A try of a create or delete on node `id` failed with `e`. A definite answer, or a
    /// routing refusal, means this try did nothing: `unknown` goes back to what it was
    /// `before` it. A failure a newer try may cure drops the connection to `id`.
    fn change_failed(&self, id: &str, unknown: &std::sync::atomic::AtomicBool, before: bool, e: Error) -> Error {
        if !retryable(&e) || e.node_epoch().is_some() {
            unknown.store(before, std::sync::atomic::Ordering::Relaxed);
        }
        if retryable(&e) {
            self.forget(id);
        }
        e
    }

    /// Every object of `namespace` in the cluster, sorted by name: each node's objects of the
    /// PGs it holds in the map, merged (the primary's metadata where it answered). Fails when
    /// every replica of some PG failed to answer, rather than list it short.
    pub async fn list(&self, namespace: &str) -> Result<Vec<pb::ObjectStat>> {
        rdax_proto::model::validate_namespace(namespace)?;
        let deadline = Instant::now() + self.inner.opts.deadline;
        loop {
            let v = self.view();
            let Some(m) = v.map.clone() else {
                return Err(Error::new(ErrorKind::Unavailable, "the cluster has no PG map yet"));
            };
            let route = Route { epoch: m.epoch, pg: None, from_primary: false };
            let listed = join_all(m.nodes.iter().map(|id| async move {
                let r = async { self.conn(id).await?.client.routed(Some(route)).list_all(namespace).await }.await;
                (id.clone(), r)
            }))
            .await;
            let mut answered = std::collections::HashSet::new();
            let mut merged: BTreeMap<String, (bool, pb::ObjectStat)> = BTreeMap::new();
            let mut refused = None;
            for (id, r) in listed {
                match r {
                    Ok(list) => {
                        answered.insert(id.clone());
                        for st in list {
                            let name = st.name.clone();
                            let pg = pg_of(namespace, &name, m.pgs);
                            let r = m.replicas_of(pg);
                            if !r.contains(&id) || v.repairing(&id, pg) {
                                // A leftover of a PG this node no longer holds, or one it is
                                // still copying (what it has may be old).
                                continue;
                            }
                            let primary = r.first() == Some(&id);
                            match merged.get(&name) {
                                Some((true, _)) => {}
                                _ if primary => {
                                    merged.insert(name, (true, st));
                                }
                                Some(_) => {}
                                None => {
                                    merged.insert(name, (false, st));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        self.forget(&id);
                        refused = Some((id, e));
                    }
                }
            }
            let dark =
                (0..m.pgs).find(|&pg| m.replicas_of(pg).iter().all(|n| !answered.contains(n) || v.repairing(n, pg)));
            match (dark, refused) {
                (None, _) => return Ok(merged.into_values().map(|(_, st)| st).collect()),
                (Some(pg), Some((id, e))) => {
                    if !retryable(&e) || Instant::now() >= deadline {
                        return Err(Error::new(
                            e.kind(),
                            format!("list {namespace}: no replica of PG {pg} answered (node {id}: {e})"),
                        ));
                    }
                }
                (Some(pg), None) if m.replicas_of(pg).is_empty() => {
                    return Err(Error::new(ErrorKind::Unavailable, format!("PG {pg} has no replicas")));
                }
                (Some(pg), None) => {
                    // Every replica of it is still copying: wait for repair.
                    if Instant::now() >= deadline {
                        let why = match m.down_of(pg) {
                            Some(waiting) => down_message(pg, waiting),
                            None => format!("every replica of PG {pg} is still being repaired"),
                        };
                        return Err(Error::new(ErrorKind::Unavailable, format!("list {namespace}: {why}")));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = self.refresh().await;
        }
    }
}

/// Why a down PG serves nothing.
fn down_message(pg: u32, waiting: &[rdax_proto::cluster::Holder]) -> String {
    let nodes: Vec<&str> = waiting.iter().map(|h| h.node.as_str()).collect();
    format!(
        "PG {pg} is down: no registered node has a complete copy of it; it waits for {} to come back (or for \
         `rdaxctl cluster mark-lost`)",
        nodes.join(", ")
    )
}

/// Read the nodes and the map (one etcd read at one revision).
async fn read_view(inner: &Inner) -> Result<ClusterView> {
    let (v, _) = read_view_at(inner).await?;
    Ok(v)
}

async fn read_view_at(inner: &Inner) -> Result<(ClusterView, i64)> {
    let prefix = inner.opts.prefix.trim_end_matches('/');
    let mut kv = inner.etcd.kv_client();
    let bound = inner.opts.connect.request_timeout.unwrap_or(Duration::from_secs(5));
    let got = tokio::time::timeout(bound, kv.get(format!("{prefix}/"), Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| etcd_err(format!("no answer within {bound:?}")))?
        .map_err(etcd_err)?;
    let rev = got.header().map_or(0, |h| h.revision());
    let (nodes_key, map_key) = (format!("{prefix}/nodes/"), format!("{prefix}/pgmap"));
    let (repair_key, repaired_key) = (format!("{prefix}/repair/"), format!("{prefix}/repaired/"));
    let mut view = ClusterView::default();
    for kv in got.kvs() {
        let key = kv.key_str().unwrap_or_default();
        if key == map_key {
            view.map = serde_json::from_slice(kv.value()).ok();
        } else if key.starts_with(&nodes_key)
            && let Ok(r) = serde_json::from_slice::<NodeRecord>(kv.value())
        {
            view.nodes.insert(r.node_id.clone(), r);
        } else if let Some(n) = key.strip_prefix(&repair_key)
            && let Ok(a) = serde_json::from_slice(kv.value())
        {
            view.repair.insert(n.to_string(), a);
        } else if let Some(n) = key.strip_prefix(&repaired_key)
            && let Ok(d) = serde_json::from_slice(kv.value())
        {
            view.repaired.insert(n.to_string(), d);
        }
    }
    Ok((view, rev))
}

/// Publish a view unless it is older than the one held (a refresh racing the watch).
fn publish(inner: &Inner, v: Arc<ClusterView>) {
    inner.view.send_if_modified(|cur| {
        if v.epoch() < cur.epoch() && v.map.is_some() && cur.map.is_some() {
            // Maps only move forward, except when etcd was rebuilt from scratch; a refresh
            // that reads an older map raced a newer one and loses.
            return false;
        }
        *cur = v;
        true
    });
}

/// Keep the view current: read everything under the prefix, then watch it and read again
/// on every change; on an etcd failure, back off and start over. Ends with the client.
async fn watch_cluster(inner: std::sync::Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let prefix = format!("{}/", strong.opts.prefix.trim_end_matches('/'));
        let mut wc = strong.etcd.watch_client();
        let r: Result<()> = async {
            let (v, rev) = read_view_at(&strong).await?;
            publish(&strong, Arc::new(v));
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
            let bound = strong.opts.connect.request_timeout.unwrap_or(Duration::from_secs(5));
            let mut stream = tokio::time::timeout(bound, wc.watch(prefix.clone(), Some(opts)))
                .await
                .map_err(|_| etcd_err(format!("the watch did not start within {bound:?}")))?
                .map_err(etcd_err)?;
            let weak = Arc::downgrade(&strong);
            drop(strong);
            loop {
                match stream.message().await {
                    Ok(Some(m)) if !m.canceled() => {
                        let Some(i) = weak.upgrade() else { return Ok(()) };
                        let v = read_view(&i).await?;
                        publish(&i, Arc::new(v));
                    }
                    Ok(_) => return Err(etcd_err("the watch ended")),
                    Err(e) => return Err(etcd_err(e)),
                }
            }
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cluster watch: retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
