//! The coordinator: one member, elected through etcd's election API under its own etcd lease,
//! computes the PG map from the registered nodes ([`placement`](super::placement)) and writes
//! it again, with the next epoch, whenever membership changes.
//!
//! Every write is an etcd transaction on two conditions: the coordinator's election key still
//! has the revision it was elected with (so a coordinator that lost its lease, say while
//! stopped, cannot write), and the map has not changed since it was read. Leadership ends
//! with the member's etcd lease: when that expires, etcd deletes the election key and the next
//! candidate is elected.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use tracing::{info, warn};

use super::placement::{PgMap, RepairAssignment, RepairDone, place, reassign};
use super::{JoinError, Member, NodeRecord};
use crate::metrics::METRICS;

/// How long membership must be quiet before the map is recomputed (a burst of joins, or a
/// node's leave and rejoin, makes one epoch, not several).
const SETTLE: Duration = Duration::from_millis(200);

impl Member {
    fn election(&self) -> String {
        format!("{}/coordinator", self.cfg.prefix)
    }

    pub(super) fn map_key(&self) -> String {
        format!("{}/pgmap", self.cfg.prefix)
    }

    /// Stand for coordinator under `lease` and, once elected, keep the PG map current. Runs
    /// until an etcd error or the loss of leadership; the caller drops it when the lease's
    /// renewal ends.
    pub(super) async fn coordinate(&self, mut client: Client, lease: i64) -> JoinError {
        // Waits as long as another member leads: that is the point of standing.
        let leader = match client.campaign(self.election(), self.record.node_id.clone(), lease).await {
            Ok(r) => match r.leader() {
                Some(l) => l.clone(),
                None => return JoinError::Closed,
            },
            Err(e) => return e.into(),
        };
        METRICS.cluster_coordinator.store(1, Relaxed);
        info!(node = %self.record.node_id, "elected coordinator: keeping the PG map");
        let e = loop {
            let rev = match self.update_map(&mut client, leader.key(), leader.rev()).await {
                Ok(rev) => rev,
                Err(e) => break e,
            };
            if let Err(e) = self.membership_changed(&mut client, rev).await {
                break e;
            }
        };
        METRICS.cluster_coordinator.store(0, Relaxed);
        e
    }

    /// Compute the map from the registered nodes and write it if it differs. Returns the
    /// revision the nodes were read at.
    async fn update_map(&self, client: &mut Client, leader_key: &[u8], leader_rev: i64) -> Result<i64, JoinError> {
        let prefix = format!("{}/nodes/", self.cfg.prefix);
        let got = self.bounded(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let rev = got.header().map_or(0, |h| h.revision());
        let mut registered: Vec<NodeRecord> =
            got.kvs().iter().filter_map(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok()).collect();
        registered.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let nodes: Vec<(String, u64)> = registered.iter().map(|r| (r.node_id.clone(), r.capacity_bytes)).collect();
        let live: BTreeMap<String, String> =
            registered.iter().map(|r| (r.node_id.clone(), r.pool_uuid.clone())).collect();
        let key = self.map_key();
        let cur = self.bounded(client.get(key.clone(), None)).await?;
        let (old, old_rev) = match cur.kvs().first() {
            Some(kv) => (serde_json::from_slice::<PgMap>(kv.value()).ok(), kv.mod_revision()),
            None => (None, 0),
        };
        // The PG count is fixed by the first map; the replication factor follows this
        // coordinator's configuration.
        let pgs = old.as_ref().map_or(self.cfg.pgs, |m| m.pgs);
        let mut want = PgMap {
            epoch: old.as_ref().map_or(1, |m| m.epoch + 1),
            pgs,
            replicas: self.cfg.replicas,
            coordinator: self.record.node_id.clone(),
            nodes: nodes.iter().map(|(n, _)| n.clone()).collect(),
            pg: place(&nodes, pgs, self.cfg.replicas),
            pools: live.clone(),
            down: BTreeMap::new(),
        };
        // Repair and down PGs: who must copy which PG, from whom, and which PGs wait for a
        // lost node. Written with the map, in one transaction, so no map exists whose new
        // replicas are not told to copy.
        let current: BTreeMap<String, RepairAssignment> = self.read_all(client, "repair").await?;
        let done: BTreeMap<String, RepairDone> = self.read_all(client, "repaired").await?;
        let marks: BTreeMap<String, serde_json::Value> = self.read_all(client, "lost").await?;
        let marked: BTreeSet<String> = marks.keys().cloned().collect();
        let r = reassign(old.as_ref(), &want, &current, &done, &live, &marked);
        want.down = r.down;
        // A mark is done with once no down PG waits for that node (or it registered again).
        let spent: Vec<&String> = marks
            .keys()
            .filter(|n| live.contains_key(*n) || !want.down.values().flatten().any(|h| &h.node == *n))
            .collect();
        if old.as_ref().is_some_and(|m| m.same_placement(&want)) {
            if !spent.is_empty() {
                let ops: Vec<TxnOp> = spent.iter().map(|n| TxnOp::delete(self.repair_key("lost", n), None)).collect();
                let txn = Txn::new()
                    .when([Compare::create_revision(leader_key.to_vec(), CompareOp::Equal, leader_rev)])
                    .and_then(ops);
                if !self.bounded(client.txn(txn)).await?.succeeded() {
                    return Err(JoinError::NotCoordinator);
                }
            }
            return Ok(rev);
        }
        let next = r.tasks;
        if !r.given_up.is_empty() {
            warn!(
                epoch = want.epoch, pgs = ?r.given_up,
                "no complete copy of these PGs is left (the nodes that had one are marked lost, or none is known): the replicas that were \
                 still copying them now count as complete, and objects only the lost nodes held are gone"
            );
        }
        let newly_down: Vec<u32> =
            want.down.keys().copied().filter(|pg| old.as_ref().is_none_or(|m| m.down_of(*pg).is_none())).collect();
        if !newly_down.is_empty() {
            let waiting: BTreeSet<&str> =
                newly_down.iter().flat_map(|pg| &want.down[pg]).map(|h| h.node.as_str()).collect();
            warn!(
                epoch = want.epoch, pgs = ?newly_down, waiting_for = ?waiting,
                "PGs down: no registered node has a complete copy; they serve nothing until one of the nodes they wait \
                 for registers again with its pool (or `rdaxctl cluster mark-lost NODE` gives up on it)"
            );
        }
        if !r.returned.is_empty() {
            info!(epoch = want.epoch, pgs = ?r.returned, "PGs up again: a node with their last complete copy is back");
        }
        let body = serde_json::to_string(&want).expect("a PG map serialises");
        let mut ops = vec![TxnOp::put(key.clone(), body, None)];
        for (n, a) in &next {
            if current.get(n) != Some(a) {
                ops.push(TxnOp::put(self.repair_key("repair", n), serde_json::to_string(a).expect("serialises"), None));
            }
        }
        for n in current.keys().filter(|n| !next.contains_key(*n)) {
            ops.push(TxnOp::delete(self.repair_key("repair", n), None));
        }
        for n in spent {
            ops.push(TxnOp::delete(self.repair_key("lost", n), None));
        }
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader_key.to_vec(), CompareOp::Equal, leader_rev),
                Compare::mod_revision(key, CompareOp::Equal, old_rev),
            ])
            .and_then(ops);
        if !self.bounded(client.txn(txn)).await?.succeeded() {
            return Err(JoinError::NotCoordinator);
        }
        let tasks: usize = next.values().map(BTreeMap::len).sum();
        info!(
            epoch = want.epoch, nodes = ?want.nodes, pgs, replicas = want.replicas, repairs = tasks,
            "PG map written"
        );
        Ok(rev)
    }

    /// `<prefix>/<what>/<node>` for a repair record.
    pub(super) fn repair_key(&self, what: &str, node: &str) -> String {
        format!("{}/{what}/{node}", self.cfg.prefix)
    }

    /// Every node's record under `<prefix>/<what>/`, by node id (unreadable ones skipped).
    pub(super) async fn read_all<T: serde::de::DeserializeOwned>(
        &self,
        client: &mut Client,
        what: &str,
    ) -> Result<BTreeMap<String, T>, JoinError> {
        let prefix = format!("{}/{what}/", self.cfg.prefix);
        let got = self.bounded(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let node = kv.key_str().ok()?.strip_prefix(&prefix)?.to_string();
                Some((node, serde_json::from_slice(kv.value()).ok()?))
            })
            .collect())
    }

    /// Wait until a node registers, leaves or changes, or is marked lost, after revision `rev`,
    /// then for those changes to settle.
    async fn membership_changed(&self, client: &mut Client, rev: i64) -> Result<(), JoinError> {
        let (nodes, lost) = (format!("{}/nodes/", self.cfg.prefix), format!("{}/lost/", self.cfg.prefix));
        let relevant = |m: &etcd_client::WatchResponse| {
            m.events()
                .iter()
                .filter_map(|e| e.kv()?.key_str().ok())
                .any(|k| k.starts_with(&nodes) || k.starts_with(&lost))
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
        let mut w = self.bounded(client.watch(format!("{}/", self.cfg.prefix), Some(opts))).await?;
        loop {
            match w.message().await? {
                Some(m) if m.canceled() => return Err(JoinError::Closed),
                Some(m) if relevant(&m) => break,
                Some(_) => {}
                None => return Err(JoinError::Closed),
            }
        }
        // Settle: more such changes within SETTLE join this one.
        let mut quiet_since = tokio::time::Instant::now();
        while let Ok(m) = tokio::time::timeout_at(quiet_since + SETTLE, w.message()).await {
            match m? {
                None => break,
                Some(m) if relevant(&m) => quiet_since = tokio::time::Instant::now(),
                Some(_) => {}
            }
        }
        Ok(())
    }
}
