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
}

impl PgMap {
    /// The replicas of `pg`, primary first (empty for a PG the map does not have).
    pub fn replicas_of(&self, pg: u32) -> &[String] {
        self.pg.get(pg as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether `other` places every PG the same way (epochs and authors aside).
    pub fn same_placement(&self, other: &PgMap) -> bool {
        self.pgs == other.pgs && self.replicas == other.replicas && self.nodes == other.nodes && self.pg == other.pg
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

/// The repair assignments once the map moves from `old` to `new`: every replica a PG gains
/// copies it from the nodes that hold a complete copy (its replicas in either map that are
/// registered and not repairing it themselves), and a replica still repairing keeps its task
/// (with its epoch, so its progress stays valid) and gets the sources of now. Tasks that are
/// done, or of PGs the node no longer holds, go. Without an `old` map there is nothing to copy.
///
/// When no complete copy of a PG survives, its registered replicas that were still copying
/// hold all that is left (every write since they became replicas, and what they had copied):
/// they count as complete from then on, and the PG is returned in the second list (objects
/// that only the lost nodes held are gone).
pub fn reassign(
    old: Option<&PgMap>,
    new: &PgMap,
    current: &std::collections::BTreeMap<String, RepairAssignment>,
    done: &std::collections::BTreeMap<String, RepairDone>,
    live: &std::collections::BTreeSet<String>,
) -> (std::collections::BTreeMap<String, RepairAssignment>, Vec<u32>) {
    let empty_a = RepairAssignment::new();
    let empty_d = RepairDone::new();
    let pending =
        |n: &str, pg: u32| repair_pending(current.get(n).unwrap_or(&empty_a), done.get(n).unwrap_or(&empty_d), pg);
    let mut out: std::collections::BTreeMap<String, RepairAssignment> = Default::default();
    let mut promoted = Vec::new();
    let Some(old) = old else { return (out, promoted) };
    for pg in 0..new.pgs {
        let (newr, oldr) = (new.replicas_of(pg), old.replicas_of(pg));
        if oldr.is_empty() {
            continue; // nothing could have been written to it
        }
        let held: Vec<&String> = newr
            .iter()
            .chain(oldr.iter().filter(|n| !newr.contains(n)))
            .filter(|n| live.contains(*n) && oldr.contains(n))
            .collect();
        let mut complete: Vec<&String> = held.iter().copied().filter(|n| !pending(n, pg)).collect();
        if complete.is_empty() && !held.is_empty() {
            complete = held;
            promoted.push(pg);
        }
        for n in newr {
            let epoch = if !oldr.contains(n) {
                new.epoch
            } else if pending(n, pg) && !complete.contains(&n) {
                current[n][&pg].epoch
            } else {
                continue;
            };
            let sources = complete.iter().filter(|s| *s != &n).map(|s| s.to_string()).collect();
            out.entry(n.clone()).or_default().insert(pg, RepairTask { epoch, sources });
        }
    }
    (out, promoted)
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
        PgMap {
            epoch,
            pgs: pg.len() as u32,
            replicas: 2,
            coordinator: "c".into(),
            nodes,
            pg: pg.iter().map(|r| r.iter().map(|n| n.to_string()).collect()).collect(),
        }
    }

    #[test]
    fn a_replica_a_pg_gains_copies_it_from_those_with_a_complete_copy() {
        use std::collections::{BTreeMap, BTreeSet};
        let live = |l: &[&str]| l.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
        let none = BTreeMap::new();
        let nodone: BTreeMap<String, RepairDone> = BTreeMap::new();
        // The first map: nothing to copy.
        let first = map(1, &[&["a", "b"], &["b", "c"]]);
        assert!(reassign(None, &first, &none, &nodone, &live(&["a", "b", "c"])).0.is_empty());
        // b dies: PG 0 gets d (from a), PG 1 gets a (from c).
        let second = map(2, &[&["a", "d"], &["c", "a"]]);
        let (r, lost) = reassign(Some(&first), &second, &none, &nodone, &live(&["a", "c", "d"]));
        assert!(lost.is_empty());
        assert_eq!(r["d"][&0], RepairTask { epoch: 2, sources: vec!["a".into()] });
        assert_eq!(r["a"][&1], RepairTask { epoch: 2, sources: vec!["c".into()] });
        assert_eq!(r.len(), 2);
        // Then c dies before a finished PG 1: no complete copy is left, so a (still copying)
        // counts as complete and d copies from it; d finished PG 0, so its task goes.
        let third = map(3, &[&["a", "d"], &["a", "d"]]);
        let done: BTreeMap<String, RepairDone> = [("d".to_string(), [(0u32, 2u64)].into())].into();
        let (r3, lost) = reassign(Some(&second), &third, &r, &done, &live(&["a", "d"]));
        assert_eq!(lost, vec![1]);
        assert!(!r3.contains_key("a"), "a's task for PG 1 ends: it is what is left");
        assert_eq!(r3["d"][&1], RepairTask { epoch: 3, sources: vec!["a".into()] });
        assert!(!r3["d"].contains_key(&0), "done: dropped");
        // Were a still copying PG 1 from c when c comes back, a keeps its task and epoch.
        let back = map(4, &[&["a", "d"], &["c", "a"]]);
        let (r5, _) = reassign(Some(&second), &back, &r, &nodone, &live(&["a", "c", "d"]));
        assert_eq!(r5["a"][&1], RepairTask { epoch: 2, sources: vec!["c".into()] });
        // A node moved out of a PG by a join is still a source for it.
        let joined = map(4, &[&["e", "a"], &["a", "d"]]);
        let (r4, _) =
            reassign(Some(&map(3, &[&["a", "d"], &["a", "d"]])), &joined, &none, &nodone, &live(&["a", "d", "e"]));
        assert_eq!(r4["e"][&0].sources, vec!["a".to_string(), "d".to_string()]);
        assert_eq!(r4.len(), 1);
        assert!(repair_pending(&r4["e"], &RepairDone::new(), 0));
        assert!(!repair_pending(&r4["e"], &[(0u32, 4u64)].into(), 0));
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
