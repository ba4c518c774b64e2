//! What cluster members and cluster clients agree on: the records kept in etcd and the
//! placement of objects on nodes.
//!
//! Placement: which nodes hold each placement group (PG), by rendezvous hashing weighted by
//! capacity. Every PG ranks every node by `w / -ln(u)`, where `u` in (0, 1) is a hash of the
//! PG and the node id and `w` the node's capacity; the R best are its replicas, best first
//! (the primary). A node's share of PGs is proportional to its capacity, and when a node joins
//! or leaves only the PGs it enters or leaves move: no other PG changes its replicas. The hash
//! is ours (FNV-1a, then SplitMix64's finaliser) so that a map computed by one version is
//! computed the same by every other, daemon or client.
//!
//! An object's PG is the same hash of its namespace and name, modulo the PG count.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// gRPC metadata key: the PG map epoch a cluster client routed a request by.
pub const EPOCH_HEADER: &str = "rdax-map-epoch";
/// gRPC metadata key: the PG of the object a cluster client's request is about.
pub const PG_HEADER: &str = "rdax-pg";
/// gRPC metadata key: a create, resize or delete that a PG's primary applies on the PG's
/// other replicas after applying it on itself. Such a request converges the replica to the
/// primary's state (a create of an existing object sets its size, a resize of a missing one
/// creates it, a delete of a missing one succeeds). Without it, a routed create, resize or
/// delete is accepted only by the PG's primary.
pub const FROM_PRIMARY_HEADER: &str = "rdax-from-primary";

/// What a node publishes about itself (JSON, the value of `<prefix>/nodes/<node_id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's id.
    pub node_id: String,
    /// gRPC endpoint (`host:port`).
    pub grpc: String,
    /// TCP data-plane endpoint.
    pub data: String,
    /// RDMA (rdma_cm) endpoint, when serving RDMA.
    pub rdma: Option<String>,
    /// Bytes of the pool's data area.
    pub capacity_bytes: u64,
    /// The pool's UUID.
    pub pool_uuid: String,
    /// rdaxd's version.
    pub version: String,
}

/// The PG map as kept in etcd (`<prefix>/pgmap`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgMap {
    /// Bumped by every change; requests will carry it.
    pub epoch: u64,
    /// Number of PGs (fixed for the cluster's life).
    pub pgs: u32,
    /// Replicas each PG should have.
    pub replicas: u8,
    /// The coordinator that wrote this map.
    pub coordinator: String,
    /// The members it was computed from, sorted.
    pub nodes: Vec<String>,
    /// For each PG, its replicas, primary first (fewer than `replicas` when the cluster has
    /// fewer nodes).
    pub pg: Vec<Vec<String>>,
    /// The pool UUID of each node in `nodes` (maps written before it was kept have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, String>,
    /// Down PGs: no registered node has a complete copy. PG → the lost nodes that had one
    /// (the last complete copies). A down PG serves nothing (members refuse requests routed to
    /// it with `UNAVAILABLE`) until one of them registers again with the same pool, or an
    /// operator marks them all lost (`<prefix>/lost/<node>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub down: BTreeMap<u32, Vec<Holder>>,
}

/// A lost node whose copy of a down PG was complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Its node id.
    pub node: String,
    /// The UUID of its pool ("" when the map it was lost from did not record it: then any
    /// pool of that node counts).
    pub pool_uuid: String,
}

impl Holder {
    /// Whether this holder is registered again, with its pool, among `live` (id → pool UUID).
    pub fn returned(&self, live: &BTreeMap<String, String>) -> bool {
        live.get(&self.node).is_some_and(|p| self.pool_uuid.is_empty() || *p == self.pool_uuid)
    }
}

impl PgMap {
    /// The replicas of `pg`, primary first (empty for a PG the map does not have).
    pub fn replicas_of(&self, pg: u32) -> &[String] {
        self.pg.get(pg as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether `other` places every PG the same way, with the same PGs down (epochs and
    /// authors aside).
    pub fn same_placement(&self, other: &PgMap) -> bool {
        self.pgs == other.pgs
            && self.replicas == other.replicas
            && self.nodes == other.nodes
            && self.pg == other.pg
            && self.down == other.down
    }

    /// The lost nodes `pg` waits for, when it is down.
    pub fn down_of(&self, pg: u32) -> Option<&[Holder]> {
        self.down.get(&pg).map(Vec::as_slice)
    }
}

/// One PG a node must copy before it counts as a full replica of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairTask {
    /// The map epoch that first assigned it (completion names it).
    pub epoch: u64,
    /// Nodes holding a complete copy, best first.
    pub sources: Vec<String>,
}

/// What a node must repair (`<prefix>/repair/<node>`, written only by the coordinator): PG →
/// task. A task is done when the node's `<prefix>/repaired/<node>` names the PG with at
/// least the task's epoch.
pub type RepairAssignment = std::collections::BTreeMap<u32, RepairTask>;

/// What a node has finished repairing (`<prefix>/repaired/<node>`, written only by that node):
/// PG → the epoch of the task it completed.
pub type RepairDone = std::collections::BTreeMap<u32, u64>;

/// A repair's progress (`<prefix>/repair-progress/<node>`, written only by that node): PG →
/// how far it got. `cursor` is the last object copied, where a restarted repair resumes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepairProgress {
    /// The task's epoch.
    pub epoch: u64,
    /// Bytes copied so far.
    pub copied_bytes: u64,
    /// Bytes of the PG's objects at the source when the copy started.
    pub total_bytes: u64,
    /// Objects copied so far, and in all.
    pub copied_objects: u64,
    /// Objects at the source when the copy started.
    pub total_objects: u64,
    /// The last object copied (namespace, name).
    pub cursor: Option<(String, String)>,
    /// When (the repairing node's clock, ns) it became a replica of the PG, if it knows:
    /// its own objects of the PG older than this and absent at the source are leftovers of an
    /// earlier time it held the PG, and are deleted.
    #[serde(default)]
    pub since_ns: Option<u64>,
}

/// Whether `node` still has to repair `pg` under `assignment` and `done`.
pub fn repair_pending(assignment: &RepairAssignment, done: &RepairDone, pg: u32) -> bool {
    assignment.get(&pg).is_some_and(|t| done.get(&pg).is_none_or(|&e| e < t.epoch))
}

/// What the coordinator decides for a new map besides placement (see [`reassign`]).
#[derive(Debug, Default, PartialEq)]
pub struct Reassigned {
    /// The repair tasks, by node.
    pub tasks: BTreeMap<String, RepairAssignment>,
    /// The PGs down in the new map (its `down`).
    pub down: BTreeMap<u32, Vec<Holder>>,
    /// PGs given up on: every node they waited for is marked lost (or no complete copy of them
    /// was known at all). What their copying replicas hold is what is left of them.
    pub given_up: Vec<u32>,
    /// Down PGs that are up again: a node they waited for registered with its pool.
    pub returned: Vec<u32>,
}

/// The repair assignments and down PGs once the map moves from `old` to `new`.
///
/// A PG's complete copies are on its replicas in either map that are registered and not
/// repairing it themselves; for a PG that was down, on the nodes it waited for that registered
/// again with their pools; and, when every replica is still copying, on the registered nodes
/// they copy from (old replicas a join moved out). Every replica the PG gains copies it from those, and a
/// replica still repairing keeps its task (with its epoch, so its progress stays valid) and
/// gets the sources of now. Tasks that are done, or of PGs the node no longer holds, go.
/// Without an `old` map there is nothing to copy.
///
/// When no complete copy of a PG is registered, the PG is *down*: it waits for the lost
/// nodes that had the last complete copies (`down`), and its replicas get tasks with no
/// source, so that nothing they hold counts as complete meanwhile. Members refuse requests
/// routed to it, so the copy that comes back is still the newest. Nodes in `marked_lost`
/// are no longer waited for: a PG that waits for nobody else is given up on, and its
/// registered replicas that were copying it count as complete from then on (objects only the
/// lost nodes held are gone).
pub fn reassign(
    old: Option<&PgMap>,
    new: &PgMap,
    current: &BTreeMap<String, RepairAssignment>,
    done: &BTreeMap<String, RepairDone>,
    live: &BTreeMap<String, String>,
    marked_lost: &BTreeSet<String>,
) -> Reassigned {
    let empty_a = RepairAssignment::new();
    let empty_d = RepairDone::new();
    let pending =
        |n: &str, pg: u32| repair_pending(current.get(n).unwrap_or(&empty_a), done.get(n).unwrap_or(&empty_d), pg);
    let mut out = Reassigned::default();
    let Some(old) = old else { return out };
    for pg in 0..new.pgs {
        let (newr, oldr) = (new.replicas_of(pg), old.replicas_of(pg));
        let was_down = old.down_of(pg);
        if oldr.is_empty() && was_down.is_none() {
            continue; // nothing could have been written to it
        }
        let held: Vec<&String> = newr
            .iter()
            .chain(oldr.iter().filter(|n| !newr.contains(n)))
            .filter(|n| live.contains_key(*n) && oldr.contains(n))
            .collect();
        let mut complete: Vec<&String> = held.iter().copied().filter(|n| !pending(n, pg)).collect();
        for h in was_down.unwrap_or(&[]) {
            if h.returned(live) && !complete.contains(&&h.node) {
                complete.push(&h.node);
            }
        }
        if was_down.is_some() && !complete.is_empty() {
            out.returned.push(pg);
        }
        // Every replica still copying: the nodes they copy from that left the PG (a join moved
        // them out) still have the complete copy the copies are made of.
        let mut moved_out: Vec<&String> = oldr
            .iter()
            .filter(|n| pending(n, pg))
            .filter_map(|n| current.get(n)?.get(&pg))
            .flat_map(|t| &t.sources)
            .filter(|s| !oldr.contains(s))
            .collect();
        moved_out.sort();
        moved_out.dedup();
        if complete.is_empty() && was_down.is_none() {
            complete = moved_out.iter().copied().filter(|n| live.contains_key(*n)).collect();
        }
        if complete.is_empty() {
            // The last complete copies: what the PG waited for already, or its replicas that
            // were complete in the old map, or the nodes its copies were made from (all lost
            // now).
            let holder =
                |n: &String| Holder { node: n.clone(), pool_uuid: old.pools.get(n).cloned().unwrap_or_default() };
            let holders: Vec<Holder> = match was_down {
                Some(h) => h.to_vec(),
                None => oldr.iter().filter(|n| !pending(n, pg)).chain(moved_out.iter().copied()).map(holder).collect(),
            };
            let waiting: Vec<Holder> = holders.iter().filter(|h| !marked_lost.contains(&h.node)).cloned().collect();
            if !waiting.is_empty() {
                out.down.insert(pg, waiting);
            } else {
                out.given_up.push(pg);
                // Nothing else is left: the copying replicas' objects are the PG's now (and
                // with none of them, the PG starts empty).
                complete = held;
                if complete.is_empty() {
                    continue;
                }
            }
        }
        for n in newr {
            if complete.contains(&n) {
                continue;
            }
            let epoch = if !oldr.contains(n) {
                new.epoch
            } else if pending(n, pg) {
                current[n][&pg].epoch
            } else {
                continue;
            };
            let sources = complete.iter().map(|s| s.to_string()).collect();
            out.tasks.entry(n.clone()).or_default().insert(pg, RepairTask { epoch, sources });
        }
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The PG of object `name` in `namespace`, of `pgs`.
pub fn pg_of(namespace: &str, name: &str, pgs: u32) -> u32 {
    let h = mix(fnv1a(namespace.as_bytes()) ^ mix(fnv1a(name.as_bytes())));
    (h % u64::from(pgs.max(1))) as u32
}

fn score(pg: u32, node: &str, weight: f64) -> f64 {
    let h = mix(fnv1a(node.as_bytes()) ^ mix(u64::from(pg) ^ 0x5047_5047_5047_5047));
    // u in (0, 1): never 0 or 1, so the logarithm is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// The replicas of each of `pgs` PGs over `nodes` (id, capacity in bytes), `replicas` each.
/// Nodes of capacity 0 hold nothing.
pub fn place(nodes: &[(String, u64)], pgs: u32, replicas: u8) -> Vec<Vec<String>> {
    let live: Vec<&(String, u64)> = nodes.iter().filter(|(_, c)| *c > 0).collect();
    (0..pgs)
        .map(|pg| {
            let mut ranked: Vec<(f64, &str)> =
                live.iter().map(|(id, cap)| (score(pg, id, *cap as f64), id.as_str())).collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            ranked.into_iter().take(usize::from(replicas)).map(|(_, id)| id.to_string()).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    #[test]
    fn every_pg_gets_distinct_replicas_primary_first() {
        let n = nodes(&[("a", 100), ("b", 100), ("c", 100)]);
        let m = place(&n, 256, 2);
        assert_eq!(m.len(), 256);
        for r in &m {
            assert_eq!(r.len(), 2);
            assert_ne!(r[0], r[1]);
        }
        let primaries = |id: &str| m.iter().filter(|r| r[0] == id).count();
        for id in ["a", "b", "c"] {
            assert!((60..=110).contains(&primaries(id)), "{id} is primary of {} of 256", primaries(id));
        }
        // Fewer nodes than replicas: every node, once.
        assert!(place(&n[..1], 8, 3).iter().all(|r| r == &vec!["a".to_string()]));
        assert!(place(&[], 8, 2).iter().all(Vec::is_empty));
    }

    #[test]
    fn shares_follow_capacity() {
        let n = nodes(&[("small", 1 << 30), ("big", 3 << 30)]);
        let m = place(&n, 4096, 1);
        let big = m.iter().filter(|r| r[0] == "big").count() as f64 / 4096.0;
        assert!((0.70..=0.80).contains(&big), "big holds {big:.3} of PGs, expected about 0.75");
        assert!(place(&nodes(&[("empty", 0), ("x", 1)]), 16, 2).iter().all(|r| r == &vec!["x".to_string()]));
    }

    #[test]
    fn a_node_leaving_or_joining_moves_only_its_own_pgs() {
        let five = nodes(&[("n0", 10), ("n1", 10), ("n2", 20), ("n3", 10), ("n4", 10)]);
        let before = place(&five, 512, 2);
        let four: Vec<_> = five.iter().filter(|(n, _)| n != "n2").cloned().collect();
        let after = place(&four, 512, 2);
        for (b, a) in before.iter().zip(&after) {
            if !b.contains(&"n2".to_string()) {
                assert_eq!(a, b, "a PG without the lost node changed");
            } else {
                // The survivor keeps its place; one replacement joins.
                let kept: Vec<_> = b.iter().filter(|n| *n != "n2").collect();
                assert!(kept.iter().all(|k| a.contains(k)), "{b:?} -> {a:?}");
            }
        }
        // Joining is the same movement backwards.
        assert_eq!(place(&five, 512, 2), before, "placement is a pure function of the members");
    }

    fn map(epoch: u64, pg: &[&[&str]]) -> PgMap {
        let mut nodes: Vec<String> = pg.iter().flat_map(|r| r.iter().map(|n| n.to_string())).collect();
        nodes.sort();
        nodes.dedup();
        let pools = nodes.iter().map(|n| (n.clone(), format!("p{n}"))).collect();
        PgMap {
            epoch,
            pgs: pg.len() as u32,
            replicas: 2,
            coordinator: "c".into(),
            nodes,
            pg: pg.iter().map(|r| r.iter().map(|n| n.to_string()).collect()).collect(),
            pools,
            down: BTreeMap::new(),
        }
    }

    /// Registered nodes, each with pool `p<id>`.
    fn live(l: &[&str]) -> BTreeMap<String, String> {
        l.iter().map(|n| (n.to_string(), format!("p{n}"))).collect()
    }

    #[test]
    fn a_replica_a_pg_gains_copies_it_from_those_with_a_complete_copy() {
        let none = BTreeMap::new();
        let nodone: BTreeMap<String, RepairDone> = BTreeMap::new();
        let unmarked = BTreeSet::new();
        // The first map: nothing to copy.
        let first = map(1, &[&["a", "b"], &["b", "c"]]);
        assert_eq!(reassign(None, &first, &none, &nodone, &live(&["a", "b", "c"]), &unmarked), Reassigned::default());
        // b dies: PG 0 gets d (from a), PG 1 gets a (from c).
        let second = map(2, &[&["a", "d"], &["c", "a"]]);
        let r = reassign(Some(&first), &second, &none, &nodone, &live(&["a", "c", "d"]), &unmarked);
        assert!(r.down.is_empty() && r.given_up.is_empty());
        assert_eq!(r.tasks["d"][&0], RepairTask { epoch: 2, sources: vec!["a".into()] });
        assert_eq!(r.tasks["a"][&1], RepairTask { epoch: 2, sources: vec!["c".into()] });
        assert_eq!(r.tasks.len(), 2);
        // Were a still copying PG 1 from c when c comes back, a keeps its task and epoch.
        let back = map(4, &[&["a", "d"], &["c", "a"]]);
        let r5 = reassign(Some(&second), &back, &r.tasks, &nodone, &live(&["a", "c", "d"]), &unmarked);
        assert_eq!(r5.tasks["a"][&1], RepairTask { epoch: 2, sources: vec!["c".into()] });
        // A node moved out of a PG by a join is still a source for it.
        let joined = map(4, &[&["e", "a"], &["a", "d"]]);
        let before = map(3, &[&["a", "d"], &["a", "d"]]);
        let r4 = reassign(Some(&before), &joined, &none, &nodone, &live(&["a", "d", "e"]), &unmarked);
        assert_eq!(r4.tasks["e"][&0].sources, vec!["a".to_string(), "d".to_string()]);
        assert_eq!(r4.tasks.len(), 1);
        assert!(repair_pending(&r4.tasks["e"], &RepairDone::new(), 0));
        assert!(!repair_pending(&r4.tasks["e"], &[(0u32, 4u64)].into(), 0));
    }

    #[test]
    fn a_pg_whose_last_complete_copy_is_lost_waits_for_it() {
        let nodone: BTreeMap<String, RepairDone> = BTreeMap::new();
        let unmarked = BTreeSet::new();
        let first = map(1, &[&["a", "b"], &["b", "c"]]);
        let second = map(2, &[&["a", "d"], &["c", "a"]]);
        let r2 = reassign(Some(&first), &second, &BTreeMap::new(), &nodone, &live(&["a", "c", "d"]), &unmarked);
        // c dies before a finished PG 1: no complete copy is registered, so PG 1 is down and
        // waits for c; a keeps its task (now without a source) and d gets one; d finished
        // PG 0, so that task goes.
        let mut third = map(3, &[&["a", "d"], &["a", "d"]]);
        let done: BTreeMap<String, RepairDone> = [("d".to_string(), [(0u32, 2u64)].into())].into();
        let r3 = reassign(Some(&second), &third, &r2.tasks, &done, &live(&["a", "d"]), &unmarked);
        let c = Holder { node: "c".into(), pool_uuid: "pc".into() };
        assert_eq!(r3.down, BTreeMap::from([(1, vec![c.clone()])]));
        assert!(r3.given_up.is_empty());
        assert_eq!(r3.tasks["a"][&1], RepairTask { epoch: 2, sources: vec![] });
        assert_eq!(r3.tasks["d"][&1], RepairTask { epoch: 3, sources: vec![] });
        assert!(!r3.tasks["d"].contains_key(&0), "done: dropped");
        third.down = r3.down.clone();
        // Another map while it is down (e joins): still down, still waiting for c.
        let mut fourth = map(4, &[&["a", "d"], &["e", "a"]]);
        let r4 = reassign(Some(&third), &fourth, &r3.tasks, &done, &live(&["a", "d", "e"]), &unmarked);
        assert_eq!(r4.down, third.down);
        assert_eq!(r4.tasks["e"][&1], RepairTask { epoch: 4, sources: vec![] });
        fourth.down = r4.down.clone();
        // c comes back with another pool (its disk was replaced): not the copy PG 1 waits for.
        let mut other = live(&["a", "c", "d", "e"]);
        other.insert("c".into(), "fresh".into());
        let fifth = map(5, &[&["a", "d"], &["c", "a"]]);
        let wiped = reassign(Some(&fourth), &fifth, &r4.tasks, &done, &other, &unmarked);
        assert_eq!(wiped.down, fourth.down);
        assert_eq!(wiped.tasks["c"][&1].sources, Vec::<String>::new());
        // c comes back with its pool: PG 1 is up, c is complete, a copies from it.
        let r5 = reassign(Some(&fourth), &fifth, &r4.tasks, &done, &live(&["a", "c", "d", "e"]), &unmarked);
        assert!(r5.down.is_empty());
        assert_eq!(r5.returned, vec![1]);
        assert!(!r5.tasks.contains_key("c"), "c holds the last complete copy");
        assert_eq!(r5.tasks["a"][&1], RepairTask { epoch: 2, sources: vec!["c".into()] });
        // Or an operator marks c lost: PG 1 is given up on, and what a and e copied is left.
        let marked = BTreeSet::from(["c".to_string()]);
        let r6 = reassign(
            Some(&fourth),
            &map(5, &[&["a", "d"], &["e", "a"]]),
            &r4.tasks,
            &done,
            &live(&["a", "d", "e"]),
            &marked,
        );
        assert!(r6.down.is_empty());
        assert_eq!(r6.given_up, vec![1]);
        assert!(r6.tasks.values().all(|t| !t.contains_key(&1)), "{:?}", r6.tasks);
    }

    #[test]
    fn copies_of_a_pg_whose_old_replicas_a_join_moved_out_go_on_from_them() {
        let (nodone, unmarked) = (BTreeMap::new(), BTreeSet::new());
        // e and f join and take PG 0 from a and d, which are its sources.
        let (before, joined) = (map(3, &[&["a", "d"]]), map(4, &[&["e", "f"]]));
        let r4 = reassign(Some(&before), &joined, &BTreeMap::new(), &nodone, &live(&["a", "d", "e", "f"]), &unmarked);
        assert_eq!(r4.tasks["f"][&0].sources, ["a", "d"]);
        // e dies before either copy is done: a and d still have the complete copy.
        let next = map(5, &[&["f", "g"]]);
        let r5 = reassign(Some(&joined), &next, &r4.tasks, &nodone, &live(&["a", "d", "f", "g"]), &unmarked);
        assert!(r5.down.is_empty() && r5.given_up.is_empty(), "{r5:?}");
        assert_eq!(r5.tasks["f"][&0], RepairTask { epoch: 4, sources: vec!["a".into(), "d".into()] });
        assert_eq!(r5.tasks["g"][&0], RepairTask { epoch: 5, sources: vec!["a".into(), "d".into()] });
        // Were a and d gone too, PG 0 would wait for them.
        let r5 = reassign(Some(&joined), &next, &r4.tasks, &nodone, &live(&["f", "g"]), &unmarked);
        assert_eq!(r5.down[&0].iter().map(|h| h.node.as_str()).collect::<Vec<_>>(), ["a", "d"]);
    }

    #[test]
    fn with_one_replica_a_lost_node_s_pgs_wait_for_it() {
        let (nodone, unmarked) = (BTreeMap::new(), BTreeSet::new());
        let first = map(1, &[&["a"], &["b"]]);
        let mut second = map(2, &[&["b"], &["b"]]);
        let r2 = reassign(Some(&first), &second, &BTreeMap::new(), &nodone, &live(&["b"]), &unmarked);
        assert_eq!(r2.down, BTreeMap::from([(0, vec![Holder { node: "a".into(), pool_uuid: "pa".into() }])]));
        assert_eq!(r2.tasks["b"][&0], RepairTask { epoch: 2, sources: vec![] });
        second.down = r2.down;
        // a restarts (same pool): PG 0 goes back to it, complete, and nothing is copied.
        let r3 = reassign(Some(&second), &first, &r2.tasks, &nodone, &live(&["a", "b"]), &unmarked);
        assert_eq!(r3, Reassigned { returned: vec![0], ..Reassigned::default() });
    }

    #[test]
    fn the_hash_is_stable_across_versions() {
        // Fixed outputs: a change here would move every object of every existing cluster.
        let got: Vec<u32> = ["a", "b", "c", "d"].iter().map(|n| pg_of("ns", n, 1 << 20)).collect();
        assert_eq!(got, vec![930511, 568077, 325188, 328799]);
        let m = place(&nodes(&[("n0", 1), ("n1", 1), ("n2", 1)]), 4, 2);
        assert_eq!(m, [["n2", "n1"], ["n2", "n1"], ["n0", "n2"], ["n2", "n0"]].map(|r| r.map(String::from).to_vec()));
    }
}
