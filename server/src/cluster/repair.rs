//! Repair: a node copies the PGs the coordinator assigned to it (`<prefix>/repair/<node>`)
//! from a member that holds a complete copy, then says so (`<prefix>/repaired/<node>`).
//!
//! The copy runs as a client of both daemons, through the same leases every client uses: for
//! each object of the PG (the source's `ListPg`), an exclusive read-write lease on this node's
//! copy and a read lease on the source's, then one-sided reads and writes in 1 MiB steps,
//! paced to `cluster.repair_mib_per_s`. A cluster client's write takes exclusive leases on
//! every replica, so it and a copy of the same object exclude each other: whichever comes
//! second waits (the copy retries; the write is refused and retried by the client), and a
//! write that recalls the copy's read lease makes the copy start that object again. Objects of
//! the PG that this node holds but the source no longer has (deleted meanwhile, or left from
//! an earlier time this node held the PG) are deleted here at the end. Objects of PGs this
//! node no longer holds are collected once those PGs are complete elsewhere
//! ([`super::collect`]).
//!
//! Progress (`<prefix>/repair-progress/<node>`) is written about once a second; a copy that
//! was interrupted (the node restarted, or lost etcd) resumes after the last object it
//! finished. This node lists the PG's objects before it has a complete copy; cluster clients
//! skip a replica that does not have an object.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, WatchOptions};
use rdax_client::{ConnectOptions, ErrorKind, LeaseMode, Session, SessionOptions};
use tracing::{info, warn};

use super::placement::{NodeRecord, PgMap, RepairAssignment, RepairDone, RepairProgress, RepairTask, repair_pending};
use super::{JoinError, Member};
use crate::metrics::METRICS;

const STEP: u64 = 1 << 20;
/// How long one object may keep failing (a writer holding it, a recall) before the PG's copy
/// is retried from the top.
const OBJECT_BOUND: Duration = Duration::from_secs(30);
/// Bound on opening a session with a member, and on each 1 MiB step of a copy.
const PEER_BOUND: Duration = Duration::from_secs(10);

/// Connections and sessions by endpoint, kept while copies succeed.
type Peers = BTreeMap<String, (rdax_client::Client, Arc<Session>)>;

/// What a node reads of the cluster for repair, at one etcd revision.
#[derive(Default)]
pub(super) struct Snapshot {
    rev: i64,
    pub(super) map: Option<PgMap>,
    nodes: BTreeMap<String, NodeRecord>,
    assigned: BTreeMap<String, RepairAssignment>,
    done: BTreeMap<String, RepairDone>,
    progress: BTreeMap<u32, RepairProgress>,
}

#[derive(Debug, thiserror::Error)]
enum RepairError {
    #[error(transparent)]
    Etcd(#[from] JoinError),
    #[error("{0}")]
    Copy(String),
}

impl From<rdax_client::Error> for RepairError {
    fn from(e: rdax_client::Error) -> Self {
        RepairError::Copy(e.to_string())
    }
}

/// Whether PG `pg` has as many complete replicas as the replication factor: every replica
/// the map names is registered and has no repair of it pending.
pub(super) fn complete(s: &Snapshot, pg: u32) -> bool {
    let Some(m) = &s.map else { return false };
    let r = m.replicas_of(pg);
    let (empty_a, empty_d) = (RepairAssignment::new(), RepairDone::new());
    r.len() >= usize::from(m.replicas)
        && r.iter().all(|n| {
            s.nodes.contains_key(n)
                && !repair_pending(s.assigned.get(n).unwrap_or(&empty_a), s.done.get(n).unwrap_or(&empty_d), pg)
        })
}

/// PGs with fewer complete replicas than the replication factor: a replica not registered,
/// fewer nodes than the factor, or a replica still copying.
fn degraded(s: &Snapshot) -> u64 {
    let Some(m) = &s.map else { return 0 };
    (0..m.pgs).filter(|&pg| !complete(s, pg)).count() as u64
}

impl Member {
    /// Copy what is assigned to this node, one PG at a time, and keep the repair metrics;
    /// with nothing to copy, collect the leftovers of PGs this node no longer holds. Runs
    /// until an etcd error.
    pub(super) async fn repair(&self, mut client: Client) -> JoinError {
        let mut last_error = String::new();
        let mut peers = Peers::new();
        let mut collected = super::collect::Pass::Again;
        loop {
            let snap = match self.snapshot(&mut client).await {
                Ok(s) => s,
                Err(e) => return e,
            };
            let me = self.record.node_id.clone();
            let mine = snap.assigned.get(&me).cloned().unwrap_or_default();
            let done = snap.done.get(&me).cloned().unwrap_or_default();
            let held = |pg: u32| snap.map.as_ref().is_some_and(|m| m.replicas_of(pg).contains(&me));
            let todo: Vec<(u32, RepairTask)> = mine
                .iter()
                .filter(|(pg, _)| repair_pending(&mine, &done, **pg) && held(**pg))
                .map(|(pg, t)| (*pg, t.clone()))
                .collect();
            METRICS.cluster_nodes.store(snap.nodes.len() as u64, Relaxed);
            METRICS.cluster_pgs_degraded.store(degraded(&snap), Relaxed);
            METRICS.cluster_pgs_repairing.store(todo.len() as u64, Relaxed);
            // A task with no registered source (a down PG, waiting for a lost node) waits for
            // a new assignment and does not hold up the others.
            let next = todo.iter().find(|(_, t)| t.sources.iter().any(|s| snap.nodes.contains_key(s))).cloned();
            let Some((pg, task)) = next else {
                METRICS.cluster_repair_rate.store(0, Relaxed);
                // Nothing to copy: no session lingers on the other members meanwhile.
                peers.clear();
                collected = self.collect_leftovers(&snap, &collected).await;
                let changed = self.changed_after(&mut client, snap.rev);
                let r = if collected == super::collect::Pass::Again {
                    // Look again soon even if etcd has nothing new (this node's map was behind).
                    tokio::time::timeout(Duration::from_secs(1), changed).await.unwrap_or(Ok(()))
                } else {
                    changed.await
                };
                if let Err(e) = r {
                    return e;
                }
                continue;
            };
            let started = Instant::now();
            let r = self.repair_pg(&mut client, &mut peers, &snap, pg, &task).await;
            if r.is_err() {
                // Connections and sessions start afresh after a failure (a source that went
                // away, a session it expired).
                peers.clear();
            }
            match r {
                Ok((objects, bytes)) => {
                    last_error.clear();
                    self.repair_created.lock().unwrap_or_else(|e| e.into_inner()).retain(|(p, _), _| *p != pg);
                    let mut done = done;
                    done.insert(pg, task.epoch);
                    let body = serde_json::to_string(&done).expect("serialises");
                    if let Err(e) = self.bounded(client.put(self.repair_key("repaired", &me), body, None)).await {
                        return e;
                    }
                    info!(
                        pg,
                        epoch = task.epoch,
                        objects,
                        bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "repair: PG copied; this node is a complete replica of it"
                    );
                }
                Err(RepairError::Etcd(e)) => return e,
                Err(RepairError::Copy(msg)) => {
                    if msg != last_error {
                        warn!(pg, error = %msg, "repair: copying the PG failed; retrying");
                        last_error = msg;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Everything repair needs, in one etcd read.
    async fn snapshot(&self, client: &mut Client) -> Result<Snapshot, JoinError> {
        let prefix = format!("{}/", self.cfg.prefix);
        let got = self.bounded(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let mut s = Snapshot { rev: got.header().map_or(0, |h| h.revision()), ..Snapshot::default() };
        let progress_key = self.repair_key("repair-progress", &self.record.node_id);
        for kv in got.kvs() {
            let (Ok(key), v) = (kv.key_str(), kv.value()) else { continue };
            let Some(rest) = key.strip_prefix(&prefix) else { continue };
            if rest == "pgmap" {
                s.map = serde_json::from_slice(v).ok();
            } else if let Some(n) = rest.strip_prefix("nodes/") {
                if let Ok(r) = serde_json::from_slice(v) {
                    s.nodes.insert(n.to_string(), r);
                }
            } else if let Some(n) = rest.strip_prefix("repair/") {
                if let Ok(a) = serde_json::from_slice(v) {
                    s.assigned.insert(n.to_string(), a);
                }
            } else if let Some(n) = rest.strip_prefix("repaired/") {
                if let Ok(d) = serde_json::from_slice(v) {
                    s.done.insert(n.to_string(), d);
                }
            } else if key == progress_key {
                s.progress = serde_json::from_slice(v).unwrap_or_default();
            }
        }
        Ok(s)
    }

    /// Wait for any change under the prefix after `rev` (other than this node's own progress).
    async fn changed_after(&self, client: &mut Client, rev: i64) -> Result<(), JoinError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
        let mut w = self.bounded(client.watch(format!("{}/", self.cfg.prefix), Some(opts))).await?;
        let own = self.repair_key("repair-progress", &self.record.node_id);
        loop {
            match w.message().await? {
                Some(m) if m.canceled() => return Err(JoinError::Closed),
                Some(m) if m.events().iter().any(|e| e.kv().and_then(|kv| kv.key_str().ok()) != Some(own.as_str())) => {
                    return Ok(());
                }
                Some(_) => {}
                None => return Err(JoinError::Closed),
            }
        }
    }

    fn peer_options(&self) -> ConnectOptions {
        ConnectOptions {
            token: self.cfg.peer_token.as_ref().map(|t| t.to_string()),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Some(Duration::from_secs(10)),
            ..ConnectOptions::default()
        }
    }

    /// A connection and a session to `endpoint` (this node's own, or a source's), kept across
    /// PGs: one PG's copy of an empty PG is then a listing or two, not two connections and
    /// two sessions.
    async fn peer(
        &self,
        peers: &mut Peers,
        endpoint: &str,
    ) -> Result<(rdax_client::Client, Arc<Session>), RepairError> {
        if let Some(p) = peers.get(endpoint) {
            return Ok(p.clone());
        }
        let opts = if endpoint.starts_with("unix:") { ConnectOptions::default() } else { self.peer_options() };
        let c = rdax_client::Client::connect(endpoint, opts).await?;
        let sopts =
            SessionOptions { client_name: format!("rdax-repair-{}", self.record.node_id), ..Default::default() };
        // A stopped peer accepts the connection and never answers.
        let s = tokio::time::timeout(PEER_BOUND, c.open_session_with(sopts))
            .await
            .map_err(|_| RepairError::Copy(format!("{endpoint}: no session within {PEER_BOUND:?}")))??;
        let s = Arc::new(s);
        peers.insert(endpoint.to_string(), (c.clone(), s.clone()));
        Ok((c, s))
    }

    /// Copy PG `pg` from the first registered source; (objects, bytes) copied.
    async fn repair_pg(
        &self,
        etcd: &mut Client,
        peers: &mut Peers,
        snap: &Snapshot,
        pg: u32,
        task: &RepairTask,
    ) -> Result<(u64, u64), RepairError> {
        let map = snap.map.as_ref().ok_or_else(|| RepairError::Copy("no PG map".into()))?;
        let Some(source) = task.sources.iter().find(|s| snap.nodes.contains_key(*s)) else {
            return Err(RepairError::Copy(format!(
                "no member with a complete copy of PG {pg} is registered (sources: {:?}); its objects can come back \
                 only with one of them",
                task.sources
            )));
        };
        if self.cfg.peer_token.is_none() {
            return Err(RepairError::Copy(
                "cluster.peer_token_file is not set: this node has no credential to copy from other members".into(),
            ));
        }
        let (src, src_s) = self.peer(peers, &snap.nodes[source].grpc).await?;
        let (local, local_s) = self.peer(peers, &self.local.clone()).await?;
        let objects = src.list_pg_all(pg, map.pgs).await?;
        let mut p = snap.progress.get(&pg).filter(|p| p.epoch == task.epoch).cloned().unwrap_or_default();
        let resumed = p.cursor.clone();
        if p.epoch != task.epoch || p.total_objects == 0 && p.cursor.is_none() {
            let since = p.since_ns.or_else(|| self.held_since.lock().unwrap_or_else(|e| e.into_inner()).of(pg));
            p = RepairProgress {
                epoch: task.epoch,
                total_bytes: objects.iter().map(|o| o.size).sum(),
                total_objects: objects.len() as u64,
                since_ns: since,
                ..RepairProgress::default()
            };
            // Kept at once: a restarted copy must not take the restart for the time this node
            // became a replica.
            self.save_progress(etcd, pg, &p).await?;
        }
        info!(pg, source = %source, objects = objects.len(), resume_after = ?resumed, "repair: copying the PG");
        // This host's clock stamps the objects created here. One created since this node became
        // a replica of the PG is a client's: never overwritten or deleted. Without that moment
        // (this process did not see it happen), every object is copied and none deleted.
        let c = Copier {
            member: self,
            src,
            local,
            src_s,
            local_s,
            since: p.since_ns.unwrap_or(0),
            created: self
                .repair_created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((pg, task.epoch))
                .or_default()
                .clone(),
        };
        let mut saved = Instant::now();
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut first_after_cursor = resumed.is_some();
        for o in &objects {
            let at = (o.namespace.clone(), o.name.clone());
            if p.cursor.as_ref().is_some_and(|c| at <= *c) {
                continue;
            }
            // The first object after the cursor may be the one an earlier run was copying.
            let copied = c.object(&o.namespace, &o.name, std::mem::take(&mut first_after_cursor)).await?;
            n += 1;
            bytes += copied;
            p.copied_bytes += copied;
            p.copied_objects += 1;
            p.cursor = Some(at);
            if saved.elapsed() >= Duration::from_secs(1) {
                self.save_progress(etcd, pg, &p).await?;
                saved = Instant::now();
            }
        }
        // What this node holds of the PG and the source does not: deleted there meanwhile, or
        // left from an earlier time this node held it.
        let have: BTreeSet<(String, String)> = objects.iter().map(|o| (o.namespace.clone(), o.name.clone())).collect();
        for o in c.local.list_pg_all(pg, map.pgs).await? {
            if have.contains(&(o.namespace.clone(), o.name.clone())) || c.clients(&o) {
                continue;
            }
            if c.gone_at_source(&o.namespace, &o.name).await {
                c.drop_leftover(&o.namespace, &o.name).await?;
            } else {
                // Created at the source after the listing: copy it too.
                bytes += c.object(&o.namespace, &o.name, false).await?;
                n += 1;
            }
        }
        // The progress record is done with: the completion says the rest.
        let key = self.repair_key("repair-progress", &self.record.node_id);
        self.bounded(etcd.delete(key, None)).await?;
        Ok((n, bytes))
    }

    async fn save_progress(&self, etcd: &mut Client, pg: u32, p: &RepairProgress) -> Result<(), JoinError> {
        let body = serde_json::to_string(&BTreeMap::from([(pg, p.clone())])).expect("serialises");
        self.bounded(etcd.put(self.repair_key("repair-progress", &self.record.node_id), body, None)).await?;
        Ok(())
    }

    async fn copy_range(
        &self,
        from: &rdax_client::Lease,
        to: &rdax_client::Lease,
        size: u64,
    ) -> rdax_client::Result<()> {
        let rate = self.cfg.repair_rate;
        let mut off = 0;
        while off < size {
            let step = STEP.min(size - off);
            let t = Instant::now();
            // The data plane has no deadline of its own, and a stopped source never answers.
            let stalled =
                || rdax_client::Error::from(tonic::Status::unavailable(format!("no progress within {PEER_BOUND:?}")));
            let data = tokio::time::timeout(PEER_BOUND, from.read(off, step)).await.map_err(|_| stalled())??;
            tokio::time::timeout(PEER_BOUND, to.write_persist(off, &data)).await.map_err(|_| stalled())??;
            off += step;
            METRICS.cluster_repair_bytes.fetch_add(step, Relaxed);
            // Pace to the configured rate: each step takes at least step / rate.
            if rate > 0 {
                let want = Duration::from_secs_f64(step as f64 / rate as f64);
                if let Some(rest) = want.checked_sub(t.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
            let took = t.elapsed().as_secs_f64().max(1e-6);
            METRICS.cluster_repair_rate.store((step as f64 / took) as u64, Relaxed);
        }
        Ok(())
    }
}

/// One PG copy's connections and what it knows of this node's stint as the PG's replica.
struct Copier<'a> {
    member: &'a Member,
    src: rdax_client::Client,
    local: rdax_client::Client,
    src_s: Arc<Session>,
    local_s: Arc<Session>,
    /// See `RepairProgress::since_ns` (0: unknown).
    since: u64,
    /// Objects this process's copies of the task created here (young, but not a client's).
    created: Arc<std::sync::Mutex<BTreeSet<(String, String)>>>,
}

impl Copier<'_> {
    /// Copy one object under leases (see the module docs); the bytes copied. `again`: copy it
    /// even if it looks like a client's (it was being copied when an earlier run stopped).
    async fn object(&self, ns: &str, name: &str, again: bool) -> Result<u64, RepairError> {
        let deadline = Instant::now() + OBJECT_BOUND;
        loop {
            match self.once(ns, name, again).await {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::NotFound && self.gone_at_source(ns, name).await => {
                    self.drop_leftover(ns, name).await?;
                    return Ok(0);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(object = %format!("{ns}/{name}"), error = %e, "repair: object copy retried");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(RepairError::Copy(format!("{ns}/{name}: {e}"))),
            }
        }
    }

    /// Whether the source says it has no `ns/name` now.
    async fn gone_at_source(&self, ns: &str, name: &str) -> bool {
        match self.src.object(ns, name) {
            Ok(o) => o.stat().await.is_err_and(|e| e.kind() == ErrorKind::NotFound),
            Err(_) => false,
        }
    }

    /// Whether this node's `st` was written by a client in this stint as a replica: then it is
    /// as new as anything the source has, and is left alone.
    fn clients(&self, st: &rdax_client::ObjectStat) -> bool {
        self.since > 0
            && st.created_unix_ns >= self.since
            && !self
                .created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&(st.namespace.clone(), st.name.clone()))
    }

    /// Delete this node's `ns/name`, which the source does not have, if it is older than this
    /// stint (a leftover); a client's is kept.
    async fn drop_leftover(&self, ns: &str, name: &str) -> Result<(), RepairError> {
        let mine = self.local.object(ns, name)?;
        match mine.stat().await {
            Ok(st) if self.since > 0 && st.created_unix_ns < self.since => match mine.delete().await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            },
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn once(&self, ns: &str, name: &str, again: bool) -> Result<u64, rdax_client::Error> {
        let size = self.src.object(ns, name)?.stat().await?.size;
        let mine = self.local.object(ns, name)?;
        match mine.create(size).await {
            Ok(_) => {
                self.created.lock().unwrap_or_else(|e| e.into_inner()).insert((ns.to_string(), name.to_string()));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let st = mine.stat().await?;
                if !again && self.clients(&st) {
                    return Ok(0);
                }
                if st.size != size {
                    mine.resize(size).await?;
                }
            }
            Err(e) => return Err(e),
        }
        if size == 0 {
            return Ok(0);
        }
        let to = self.local_s.acquire_exclusive(ns, name, 0, size, LeaseMode::ReadWrite).await?;
        let from = match self.src_s.acquire(ns, name, 0, size, LeaseMode::Read).await {
            Ok(l) => l,
            Err(e) => {
                let _ = to.release().await;
                return Err(e);
            }
        };
        let r = self.member.copy_range(&from, &to, size).await;
        let _ = from.release().await;
        let _ = to.release().await;
        r.map(|()| size)
    }
}
