//! The coordinator: one member, elected through etcd's election API under its own etcd lease,
//! computes the PG map from the registered nodes ([`placement`](super::placement)) and writes
//! it again, with the next epoch, whenever membership changes.
//!
//! Every write is an etcd transaction on two conditions: the coordinator's election key still
//! has the revision it was elected with (so a coordinator that lost its lease, say while
//! stopped, cannot write), and the map has not changed since it was read. Leadership ends
//! with the member's etcd lease: when that expires, etcd deletes the election key and the next
//! candidate is elected.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use tracing::info;

use super::placement::{PgMap, place};
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
        let mut nodes: Vec<(String, u64)> = got
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok())
            .map(|r| (r.node_id, r.capacity_bytes))
            .collect();
        nodes.sort();
        let key = self.map_key();
        let cur = self.bounded(client.get(key.clone(), None)).await?;
        let (old, old_rev) = match cur.kvs().first() {
            Some(kv) => (serde_json::from_slice::<PgMap>(kv.value()).ok(), kv.mod_revision()),
            None => (None, 0),
        };
        // The PG count is fixed by the first map; the replication factor follows this
        // coordinator's configuration.
        let pgs = old.as_ref().map_or(self.cfg.pgs, |m| m.pgs);
        let want = PgMap {
            epoch: old.as_ref().map_or(1, |m| m.epoch + 1),
            pgs,
            replicas: self.cfg.replicas,
            coordinator: self.record.node_id.clone(),
            nodes: nodes.iter().map(|(n, _)| n.clone()).collect(),
            pg: place(&nodes, pgs, self.cfg.replicas),
        };
        if old.as_ref().is_some_and(|m| m.same_placement(&want)) {
            return Ok(rev);
        }
        let body = serde_json::to_string(&want).expect("a PG map serialises");
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader_key.to_vec(), CompareOp::Equal, leader_rev),
                Compare::mod_revision(key.clone(), CompareOp::Equal, old_rev),
            ])
            .and_then([TxnOp::put(key, body, None)]);
        if !self.bounded(client.txn(txn)).await?.succeeded() {
            return Err(JoinError::NotCoordinator);
        }
        info!(epoch = want.epoch, nodes = ?want.nodes, pgs, replicas = want.replicas, "PG map written");
        Ok(rev)
    }

    /// Wait until a node registers, leaves or changes after revision `rev`, then for
    /// membership to settle.
    async fn membership_changed(&self, client: &mut Client, rev: i64) -> Result<(), JoinError> {
        let prefix = format!("{}/nodes/", self.cfg.prefix);
        let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
        let mut w = self.bounded(client.watch(prefix, Some(opts))).await?;
        loop {
            match w.message().await? {
                Some(m) if !m.events().is_empty() => break,
                Some(m) if m.canceled() => return Err(JoinError::Closed),
                Some(_) => {}
                None => return Err(JoinError::Closed),
            }
        }
        // Settle: more changes within SETTLE join this one.
        while let Ok(m) = tokio::time::timeout(SETTLE, w.message()).await {
            if m?.is_none() {
                break;
            }
        }
        Ok(())
    }
}
