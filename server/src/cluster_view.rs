//! What this node knows of the cluster's PG map, and the check every request that carries a
//! map epoch passes (in the request layer, before any handler).
//!
//! A cluster client names the PG map epoch it routed by (`rdax-map-epoch`) and the PG of the
//! object (`rdax-pg`). The node refuses the request, before any handler runs, when:
//! * it is not a member now: its fence is closed (`UNAVAILABLE`), or it is no cluster member at
//!   all (`FAILED_PRECONDITION`);
//! * the client's epoch is older than the node's (`FAILED_PRECONDITION`: refresh the map), or
//!   newer (`UNAVAILABLE`: the node has not seen it yet; retry);
//! * at the same epoch, the node is not a replica of that PG (`FAILED_PRECONDITION`), or the
//!   PG is down: no registered node has a complete copy (`UNAVAILABLE`).
//!
//! Requests without the header (single-node clients) pass untouched.
//!
//! A routed create, resize or delete is the PG primary's to order ([`MapView::meta_role`]):
//! the primary applies it under a lock on the object's name, then has every other replica of
//! the PG converge to the result ([`Forward`], marked with `rdax-from-primary`), and answers
//! only then. So per object, these changes take effect on every replica in one order, the
//! primary's, and a change a client saw acknowledged is on every replica of that map.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock};

use rdax_proto::model::ObjectKey;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::lease::Fence;

pub use rdax_proto::cluster::{EPOCH_HEADER, FROM_PRIMARY_HEADER, Holder, PG_HEADER};

/// A metadata change a PG's primary has the other replicas converge to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaChange {
    /// The object exists with this size (created if missing, resized if it has another).
    Exists {
        /// Bytes.
        size: u64,
        /// A block volume (when it has to be created).
        volume: bool,
    },
    /// The object does not exist (deleted if present).
    Absent,
}

/// What a primary uses to reach the other replicas of a PG (the cluster module's peer
/// connections).
pub trait Forward: Send + Sync + std::fmt::Debug {
    /// Have `node` converge `key` to `change`, routed by (`epoch`, `pg`). Bounded.
    fn converge(
        self: Arc<Self>,
        node: String,
        epoch: u64,
        pg: u32,
        key: ObjectKey,
        change: MetaChange,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
}

/// What a create, resize or delete is on this node.
///
/// Only a request that names a PG (`rdax-pg`) is the primary's to order; one with an epoch
/// alone passed the membership check and is applied here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaRole {
    /// Not routed (a single-node client, or repair): applied here alone.
    Local,
    /// From the PG's primary: this replica converges to the primary's state.
    FromPrimary,
    /// This node is the PG's primary: apply here, then on `others`.
    Primary {
        /// The map epoch it was routed by.
        epoch: u64,
        /// The object's PG.
        pg: u32,
        /// The PG's other replicas, in map order.
        others: Vec<String>,
    },
}

/// One lock per object name, for a primary's ordering of metadata changes; an entry lives
/// while someone holds or waits for it.
#[derive(Debug, Default)]
struct NameLocks(std::sync::Mutex<HashMap<ObjectKey, Arc<tokio::sync::Mutex<()>>>>);

/// A held name lock (see [`MapView::lock_name`]).
#[derive(Debug)]
pub struct NameGuard {
    locks: Arc<NameLocks>,
    key: ObjectKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        let mut m = self.locks.0.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Nobody else holds or waits for it (each waiter holds a clone): forget it.
        if m.get(&self.key).is_some_and(|l| Arc::strong_count(l) == 1) {
            m.remove(&self.key);
        }
    }
}

/// A refusal that names the node's own epoch (`rdax-map-epoch` in its metadata), so the client
/// knows the refusal is about routing and how far behind or ahead it is.
fn routing(mut s: Status, node_epoch: u64) -> Status {
    if let Ok(v) = node_epoch.to_string().parse() {
        s.metadata_mut().insert(EPOCH_HEADER, v);
    }
    s
}

#[derive(Debug)]
struct Known {
    epoch: u64,
    held: Vec<bool>,
    /// For each PG this node is the primary of, the other replicas.
    others: Vec<Option<Vec<String>>>,
    /// Down PGs: the lost nodes each waits for.
    down: HashMap<u32, Vec<String>>,
}

/// See the module docs.
#[derive(Debug)]
pub struct MapView {
    fence: Arc<Fence>,
    known: RwLock<Option<Known>>,
    locks: Arc<NameLocks>,
    forward: OnceLock<Arc<dyn Forward>>,
}

impl MapView {
    /// A view that refuses on `fence` too.
    pub fn new(fence: Arc<Fence>) -> Self {
        Self { fence, known: RwLock::new(None), locks: Arc::default(), forward: OnceLock::new() }
    }

    /// A new map: its epoch, for each PG its replicas (primary first), and its down PGs;
    /// `me` is this node.
    pub fn set(&self, epoch: u64, me: &str, pg: &[Vec<String>], down: &BTreeMap<u32, Vec<Holder>>) {
        let held = pg.iter().map(|r| r.iter().any(|n| n == me)).collect();
        let others = pg.iter().map(|r| (r.first().map(String::as_str) == Some(me)).then(|| r[1..].to_vec())).collect();
        let down = down.iter().map(|(pg, h)| (*pg, h.iter().map(|h| h.node.clone()).collect())).collect();
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = Some(Known { epoch, held, others, down });
    }

    /// How this node reaches the other replicas of the PGs it is the primary of (set once, by
    /// the cluster membership).
    pub fn set_forward(&self, f: Arc<dyn Forward>) {
        let _ = self.forward.set(f);
    }

    /// The peer connections, if this node is a cluster member.
    pub fn forward(&self) -> Option<Arc<dyn Forward>> {
        self.forward.get().cloned()
    }

    /// Wait for, and hold, the ordering lock of `key`.
    pub async fn lock_name(&self, key: &ObjectKey) -> NameGuard {
        let lock = self.locks.0.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
        let guard = lock.lock_owned().await;
        NameGuard { locks: self.locks.clone(), key: key.clone(), guard: Some(guard) }
    }

    /// What a create, resize or delete with these headers is here: local (not routed), a
    /// primary's change to converge to, or this node's to order as the PG's primary. A routed
    /// change to a replica that is not the primary is refused (`FAILED_PRECONDITION` with the
    /// node's epoch: the client's map is behind, or it skipped the primary). Runs after
    /// [`MapView::check`] admitted the request.
    pub fn meta_role(&self, headers: &MetadataMap) -> Result<MetaRole, Status> {
        let num = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u64>().ok());
        let Some(epoch) = num(EPOCH_HEADER) else { return Ok(MetaRole::Local) };
        if headers.get(FROM_PRIMARY_HEADER).is_some() {
            return Ok(MetaRole::FromPrimary);
        }
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let Some(k) = known.as_ref() else {
            return Err(Status::unavailable("this node has not seen a PG map yet; retry"));
        };
        // An epoch without a PG: checked for membership at that epoch only, applied here.
        let Some(pg) = num(PG_HEADER) else { return Ok(MetaRole::Local) };
        if epoch != k.epoch {
            // The map moved since the request layer admitted the request.
            return Err(routing(
                Status::failed_precondition(format!(
                    "the PG map moved to epoch {} while the request (epoch {epoch}) waited; refresh and retry",
                    k.epoch
                )),
                k.epoch,
            ));
        }
        match k.others.get(pg as usize) {
            Some(Some(others)) => Ok(MetaRole::Primary { epoch, pg: pg as u32, others: others.clone() }),
            _ => Err(routing(
                Status::failed_precondition(format!(
                    "this node is not the primary of PG {pg} in epoch {epoch}: creates, resizes and deletes go to the \
                     primary; refresh the map and retry"
                )),
                k.epoch,
            )),
        }
    }

    /// Whether the newest map this node has seen is `epoch` and makes it no replica of `pg`:
    /// its objects of `pg` are leftovers then. Asked again just before each leftover is
    /// deleted, so that a map that gives the PG back stops the collection.
    pub fn released(&self, epoch: u64, pg: u32) -> bool {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.as_ref().is_some_and(|k| k.epoch == epoch && k.held.get(pg as usize) == Some(&false))
    }

    /// The epoch of the newest map this node has seen.
    pub fn epoch(&self) -> Option<u64> {
        self.known.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|k| k.epoch)
    }

    /// Admit a request with these headers, or say why not.
    pub fn check(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let Some(v) = headers.get(EPOCH_HEADER) else { return Ok(()) };
        let parse = |v: &http::HeaderValue, what: &str| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Status::invalid_argument(format!("{what}: not a number")))
        };
        let want = parse(v, EPOCH_HEADER)?;
        if !self.fence.enabled() {
            return Err(Status::failed_precondition(
                "this rdaxd is not a cluster member: send cluster requests to the nodes the PG map names",
            ));
        }
        if !self.fence.is_open() {
            return Err(Status::unavailable("this node's cluster membership lapsed; retry on another replica"));
        }
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let Some(k) = known.as_ref() else {
            return Err(Status::unavailable("this node has not seen a PG map yet; retry"));
        };
        if want < k.epoch {
            return Err(routing(
                Status::failed_precondition(format!(
                    "stale PG map: epoch {want}, this node has {}; refresh the map and retry",
                    k.epoch
                )),
                k.epoch,
            ));
        }
        if want > k.epoch {
            return Err(routing(
                Status::unavailable(format!(
                    "this node has not seen PG map epoch {want} yet (it has {}); retry",
                    k.epoch
                )),
                k.epoch,
            ));
        }
        if let Some(pg) = headers.get(PG_HEADER) {
            let pg = parse(pg, PG_HEADER)?;
            match k.held.get(pg as usize) {
                None => return Err(Status::invalid_argument(format!("PG {pg} does not exist in epoch {want}"))),
                Some(false) => {
                    return Err(routing(
                        Status::failed_precondition(format!(
                            "this node is not a replica of PG {pg} in epoch {want}; refresh the map and retry"
                        )),
                        k.epoch,
                    ));
                }
                Some(true) => {}
            }
            if let Some(waiting) = k.down.get(&(pg as u32)) {
                return Err(Status::unavailable(format!(
                    "PG {pg} is down: no registered node has a complete copy of it; it waits for {} to come back \
                     (or for `rdaxctl cluster mark-lost`)",
                    waiting.join(", ")
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tonic::Code;

    fn headers(epoch: Option<&str>, pg: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(e) = epoch {
            h.insert(EPOCH_HEADER, e.parse().unwrap());
        }
        if let Some(p) = pg {
            h.insert(PG_HEADER, p.parse().unwrap());
        }
        h
    }

    fn code(v: &MapView, epoch: Option<&str>, pg: Option<&str>) -> Option<Code> {
        v.check(&headers(epoch, pg)).err().map(|s| s.code())
    }

    #[test]
    fn requests_are_admitted_only_at_the_nodes_epoch_and_for_its_pgs() {
        let fence = Arc::new(Fence::default());
        let v = MapView::new(fence.clone());
        assert_eq!(code(&v, None, None), None, "no header: a single-node request");
        assert_eq!(code(&v, Some("1"), None), Some(Code::FailedPrecondition), "not a member at all");
        fence.enable();
        assert_eq!(code(&v, Some("1"), None), Some(Code::Unavailable), "fenced");
        fence.open_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(code(&v, Some("1"), None), Some(Code::Unavailable), "no map seen yet");
        v.set(5, "me", &[vec!["me".into(), "b".into()], vec!["b".into()]], &BTreeMap::new());
        assert_eq!(v.epoch(), Some(5));
        assert!(v.released(5, 1) && !v.released(5, 0), "PG 1 is b's alone; this node holds PG 0");
        assert!(!v.released(4, 1) && !v.released(6, 1), "only at the node's own epoch");
        assert!(!v.released(5, 2), "no such PG");
        assert_eq!(code(&v, Some("5"), Some("0")), None);
        assert_eq!(code(&v, Some("5"), None), None);
        assert_eq!(code(&v, Some("4"), Some("0")), Some(Code::FailedPrecondition), "stale");
        let refusal = v.check(&headers(Some("4"), None)).unwrap_err();
        assert_eq!(refusal.metadata().get(EPOCH_HEADER).unwrap(), "5", "a routing refusal names the node's epoch");
        assert_eq!(code(&v, Some("6"), Some("0")), Some(Code::Unavailable), "ahead of the node");
        assert_eq!(code(&v, Some("5"), Some("1")), Some(Code::FailedPrecondition), "not a replica");
        assert_eq!(code(&v, Some("5"), Some("2")), Some(Code::InvalidArgument), "no such PG");
        assert_eq!(code(&v, Some("five"), None), Some(Code::InvalidArgument));
        let down = BTreeMap::from([(0, vec![Holder { node: "lost".into(), pool_uuid: String::new() }])]);
        v.set(6, "me", &[vec!["me".into(), "b".into()], vec!["b".into()]], &down);
        let refusal = v.check(&headers(Some("6"), Some("0"))).unwrap_err();
        assert_eq!(refusal.code(), Code::Unavailable, "a down PG serves nothing");
        assert!(refusal.message().contains("PG 0 is down") && refusal.message().contains("lost"), "{refusal:?}");
        assert_eq!(code(&v, Some("6"), None), None, "a request without a PG is not about it");
        fence.close();
        assert_eq!(code(&v, Some("5"), Some("0")), Some(Code::Unavailable), "a lapsed member refuses");
    }

    #[test]
    fn only_the_primary_orders_a_routed_change_and_a_primary_s_change_is_converged_to() {
        let v = MapView::new(Arc::new(Fence::default()));
        v.set(5, "me", &[vec!["me".into(), "b".into(), "c".into()], vec!["b".into(), "me".into()]], &BTreeMap::new());
        let role = |epoch: Option<&str>, pg: Option<&str>| v.meta_role(&MetadataMap::from_headers(headers(epoch, pg)));
        assert_eq!(role(None, None).unwrap(), MetaRole::Local, "not routed");
        assert_eq!(role(Some("5"), None).unwrap(), MetaRole::Local, "an epoch without a PG");
        assert_eq!(
            role(Some("5"), Some("0")).unwrap(),
            MetaRole::Primary { epoch: 5, pg: 0, others: vec!["b".into(), "c".into()] }
        );
        let refused = role(Some("5"), Some("1")).unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "a replica that is not the primary");
        assert_eq!(refused.metadata().get(EPOCH_HEADER).unwrap(), "5");
        assert_eq!(role(Some("4"), Some("0")).unwrap_err().code(), Code::FailedPrecondition, "the map moved");
        let mut h = headers(Some("5"), Some("1"));
        h.insert(FROM_PRIMARY_HEADER, "1".parse().unwrap());
        assert_eq!(v.meta_role(&MetadataMap::from_headers(h)).unwrap(), MetaRole::FromPrimary);
    }

    #[tokio::test]
    async fn a_name_lock_orders_its_holders_and_goes_when_nobody_wants_it() {
        let v = Arc::new(MapView::new(Arc::new(Fence::default())));
        let key = ObjectKey::new("ns", "o").unwrap();
        let first = v.lock_name(&key).await;
        let (v2, k2) = (v.clone(), key.clone());
        let second = tokio::spawn(async move { v2.lock_name(&k2).await });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the second holder waits for the first");
        drop(first);
        let second = second.await.unwrap();
        assert_eq!(v.locks.0.lock().unwrap().len(), 1);
        drop(second);
        assert!(v.locks.0.lock().unwrap().is_empty(), "an unwanted lock is forgotten");
    }
}
