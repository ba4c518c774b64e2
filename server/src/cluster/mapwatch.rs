//! Every member watches the PG map: it knows the current epoch and which PGs it holds (the
//! ground the epoch checks of cluster requests will stand on), logs each new epoch, and
//! reports both as metrics.

use std::sync::atomic::Ordering::Relaxed;

use etcd_client::{Client, EventType, WatchOptions};
use std::collections::HashSet;

use tracing::info;

use super::placement::PgMap;
use super::{JoinError, Member};
use crate::metrics::METRICS;

/// When this node became a replica of each PG it holds (see `Member::held_since`).
#[derive(Debug, Default)]
pub(super) struct HeldSince {
    seen: bool,
    held: HashSet<u32>,
    since: std::collections::HashMap<u32, u64>,
}

impl HeldSince {
    /// A new map in which this node holds `mine`.
    fn update(&mut self, mine: HashSet<u32>) {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let mut since = std::collections::HashMap::new();
        for &pg in &mine {
            if self.held.contains(&pg) {
                if let Some(&t) = self.since.get(&pg) {
                    since.insert(pg, t);
                }
            } else if self.seen {
                since.insert(pg, now);
            }
        }
        (self.seen, self.held, self.since) = (true, mine, since);
    }

    /// When this node became a replica of `pg`, if this process saw it happen.
    pub(super) fn of(&self, pg: u32) -> Option<u64> {
        self.since.get(&pg).copied()
    }
}

impl Member {
    /// Follow `<prefix>/pgmap` until an etcd error: read it, then watch for new versions.
    pub(super) async fn watch_map(&self, mut client: Client) -> JoinError {
        let key = self.map_key();
        let got = match self.bounded(client.get(key.clone(), None)).await {
            Ok(g) => g,
            Err(e) => return e,
        };
        let rev = got.header().map_or(0, |h| h.revision());
        if let Some(kv) = got.kvs().first() {
            self.saw_map(kv.value());
        }
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let mut w = match self.bounded(client.watch(key, Some(opts))).await {
            Ok(w) => w,
            Err(e) => return e,
        };
        loop {
            match w.message().await {
                Ok(Some(m)) => {
                    for ev in m.events() {
                        if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                            self.saw_map(kv.value());
                        }
                    }
                    if m.canceled() {
                        return JoinError::Closed;
                    }
                }
                Ok(None) => return JoinError::Closed,
                Err(e) => return e.into(),
            }
        }
    }

    fn saw_map(&self, body: &[u8]) {
        let Ok(map) = serde_json::from_slice::<PgMap>(body) else { return };
        // etcd delivers versions in order, so the newest seen is the current one (even when
        // it is lower: an etcd rebuilt from scratch starts again at 1).
        if map.epoch == METRICS.cluster_map_epoch.load(Relaxed) {
            return;
        }
        let me = self.record.node_id.as_str();
        let mine: HashSet<u32> =
            map.pg.iter().enumerate().filter(|(_, r)| r.iter().any(|n| n == me)).map(|(pg, _)| pg as u32).collect();
        self.held_since.lock().unwrap_or_else(|e| e.into_inner()).update(mine);
        let held = map.pg.iter().filter(|r| r.iter().any(|n| n == me)).count() as u64;
        let primary = map.pg.iter().filter(|r| r.first().is_some_and(|n| n == me)).count() as u64;
        METRICS.cluster_pgs_held.store(held, Relaxed);
        METRICS.cluster_pgs_primary.store(primary, Relaxed);
        METRICS.cluster_map_epoch.store(map.epoch, Relaxed);
        self.view.set(map.epoch, me, &map.pg, &map.down);
        info!(
            node = %me, epoch = map.epoch, nodes = map.nodes.len(), pgs = map.pgs, held, primary,
            down = map.down.len(), "PG map: new epoch"
        );
    }
}
