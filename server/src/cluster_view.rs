//! What this node knows of the cluster's PG map, and the check every request that carries a
//! map epoch passes (in the request layer, before any handler).
//!
//! A cluster client names the PG map epoch it routed by (`rdax-map-epoch`) and the PG of the
//! object (`rdax-pg`). The node refuses the request, before any handler runs, when:
//! * it is not a member now: its fence is closed (`UNAVAILABLE`), or it is no cluster member at
//!   all (`FAILED_PRECONDITION`);
//! * the client's epoch is older than the node's (`FAILED_PRECONDITION`: refresh the map), or
//!   newer (`UNAVAILABLE`: the node has not seen it yet; retry);
//! * at the same epoch, the node is not a replica of that PG (`FAILED_PRECONDITION`).
//!
//! Requests without the header (single-node clients) pass untouched.

use std::sync::{Arc, RwLock};

use tonic::Status;

use crate::lease::Fence;

pub use rdax_proto::cluster::{EPOCH_HEADER, PG_HEADER};

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
}

/// See the module docs.
#[derive(Debug)]
pub struct MapView {
    fence: Arc<Fence>,
    known: RwLock<Option<Known>>,
}

impl MapView {
    /// A view that refuses on `fence` too.
    pub fn new(fence: Arc<Fence>) -> Self {
        Self { fence, known: RwLock::new(None) }
    }

    /// A new map: its epoch, and for each PG whether this node is one of its replicas.
    pub fn set(&self, epoch: u64, held: Vec<bool>) {
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = Some(Known { epoch, held });
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
        v.set(5, vec![true, false]);
        assert_eq!(v.epoch(), Some(5));
        assert_eq!(code(&v, Some("5"), Some("0")), None);
        assert_eq!(code(&v, Some("5"), None), None);
        assert_eq!(code(&v, Some("4"), Some("0")), Some(Code::FailedPrecondition), "stale");
        let refusal = v.check(&headers(Some("4"), None)).unwrap_err();
        assert_eq!(refusal.metadata().get(EPOCH_HEADER).unwrap(), "5", "a routing refusal names the node's epoch");
        assert_eq!(code(&v, Some("6"), Some("0")), Some(Code::Unavailable), "ahead of the node");
        assert_eq!(code(&v, Some("5"), Some("1")), Some(Code::FailedPrecondition), "not a replica");
        assert_eq!(code(&v, Some("5"), Some("2")), Some(Code::InvalidArgument), "no such PG");
        assert_eq!(code(&v, Some("five"), None), Some(Code::InvalidArgument));
        fence.close();
        assert_eq!(code(&v, Some("5"), Some("0")), Some(Code::Unavailable), "a lapsed member refuses");
    }
}
