//! Collecting leftovers: this node's objects of PGs it no longer holds.
//!
//! A map that moves a PG away from this node leaves its objects of that PG in the pool: the
//! PG's new replicas may be copying from them (an old replica is a repair source). Once the
//! PG is *complete* without this node (every replica the map names is registered and has no
//! repair pending for it), they are leftovers, and the repair loop deletes them when it has
//! nothing to copy. Each delete is a layout change like any other (the leases on the object
//! are recalled, and none is granted meanwhile), and it happens only if, at that moment, the
//! newest map this node has seen is still the one the decision was made on and still gives
//! the PG to others. A map that gives the PG back stops the collection; the PG's repair on
//! this node then refreshes or deletes what is left.
//!
//! A pool in a cluster belongs to the cluster: an object made here by a single-node client, of
//! a PG this node does not hold, is collected too. Block volumes are left alone (an NBD export
//! on this node may be using one).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rdax_proto::cluster::pg_of;
use rdax_proto::model::ObjectKey;
use tracing::{info, warn};

use super::Member;
use super::repair::{Snapshot, complete};
use crate::lease::LeaseError;
use crate::metrics::METRICS;
use crate::pool::ObjError;

/// Objects listed from the pool per blocking step.
const PAGE: usize = 512;

/// What a collection pass decided about the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pass {
    /// Every leftover of the PGs released at this epoch is gone: nothing to do until the map
    /// or a PG's completeness changes.
    Done { epoch: u64, released: Vec<bool> },
    /// Not finished (this node's map is not the snapshot's yet, a delete failed, or the map
    /// moved on meanwhile): try again soon.
    Again,
}

impl Member {
    /// Delete this node's objects of the PGs that `snap` shows complete elsewhere (see the
    /// module docs). `last` is what the previous pass finished; the same again is skipped.
    pub(super) async fn collect_leftovers(&self, snap: &Snapshot, last: &Pass) -> Pass {
        let Some(map) = &snap.map else { return Pass::Again };
        if self.view.epoch() != Some(map.epoch) {
            // This node's own view (which its requests are checked against) has not caught
            // up with etcd's map yet, or is ahead of this snapshot.
            return Pass::Again;
        }
        let me = &self.record.node_id;
        let released: Vec<bool> =
            (0..map.pgs).map(|pg| !map.replicas_of(pg).iter().any(|n| n == me) && complete(snap, pg)).collect();
        let done = Pass::Done { epoch: map.epoch, released: released.clone() };
        if *last == done || !released.contains(&true) {
            return done;
        }
        let (epoch, pgs) = (map.epoch, map.pgs);
        let released = Arc::new(released);
        let (mut objects, mut bytes, mut failed) = (0u64, 0u64, false);
        let mut after: Option<(String, String)> = None;
        'scan: loop {
            let pool = self.leases.pool().clone();
            let (r, from) = (released.clone(), after.clone());
            let page = tokio::task::spawn_blocking(move || {
                let from = from.as_ref().map(|(ns, name)| (ns.as_str(), name.as_str()));
                pool.scan(from, PAGE, |ns, name| r[pg_of(ns, name, pgs) as usize])
            })
            .await;
            let Ok((page, more)) = page else { return Pass::Again };
            for st in &page {
                after = Some((st.namespace.clone(), st.name.clone()));
                if st.volume {
                    continue;
                }
                let pg = pg_of(&st.namespace, &st.name, pgs);
                match self.drop_leftover(&st.namespace, &st.name, epoch, pg).await {
                    Ok(Some(size)) => {
                        objects += 1;
                        bytes += size;
                        METRICS.cluster_leftovers_collected.fetch_add(1, Relaxed);
                    }
                    Ok(None) if !self.view.released(epoch, pg) => {
                        // The map moved on: the next pass decides on the new one.
                        failed = true;
                        break 'scan;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(object = %format!("{}/{}", st.namespace, st.name), error = %e,
                            "cluster: could not delete a leftover of a PG this node no longer holds; retrying");
                        failed = true;
                    }
                }
            }
            if !more {
                break;
            }
        }
        if objects > 0 {
            let pgs_released = released.iter().filter(|r| **r).count();
            info!(
                epoch,
                objects,
                bytes,
                pgs_released,
                "cluster: deleted leftovers of PGs this node no longer holds (their replicas have complete copies)"
            );
        }
        if failed { Pass::Again } else { done }
    }

    /// Delete `ns/name` if this node's map is still `epoch` and still gives `pg` to others;
    /// its size if deleted, `None` if not (the map moved, it is a volume, or it is gone).
    async fn drop_leftover(&self, ns: &str, name: &str, epoch: u64, pg: u32) -> Result<Option<u64>, LeaseError> {
        let Ok(key) = ObjectKey::new(ns, name) else { return Ok(None) };
        let view = self.view.clone();
        let (n, o) = (ns.to_string(), name.to_string());
        let r = self
            .leases
            .change_layout(key, 0, u64::MAX, "the object is a leftover of a PG this node no longer holds", move |p| {
                // Under the recall's marker: no lease is granted on it until this returns.
                if !view.released(epoch, pg) {
                    return Ok(None);
                }
                let st = p.stat(&n, &o)?;
                if st.volume {
                    return Ok(None);
                }
                p.delete(&n, &o)?;
                Ok(Some(st.size))
            })
            .await;
        match r {
            Err(LeaseError::Pool(ObjError::NotFound { .. })) => Ok(None),
            r => r,
        }
    }
}
