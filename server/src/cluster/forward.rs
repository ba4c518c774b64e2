//! A PG primary's reach to the PG's other replicas: after it applied a create, resize or
//! delete under the object's name lock, it has each of them converge to the result
//! ([`crate::cluster_view::Forward`]) before it answers the client.
//!
//! A replica's gRPC endpoint comes from its registration (`<prefix>/nodes/<id>`), read from
//! etcd when first needed and kept with the connection until a change to it fails (the node
//! may have restarted on another port). The primary authenticates with the cluster's peer
//! token, as repair does.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdax_client::{ConnectOptions, ErrorKind};
use rdax_proto::model::ObjectKey;

use super::placement::NodeRecord;
use crate::cluster_view::{Forward, MetaChange};
use crate::config::Cluster;

/// Bound on one replica's change, its etcd lookup and connect included.
const BOUND: Duration = Duration::from_secs(10);

/// See the module docs.
pub(super) struct Peers {
    cfg: Cluster,
    etcd: tokio::sync::Mutex<Option<etcd_client::Client>>,
    /// Node id → its connection.
    conns: Mutex<HashMap<String, rdax_client::Client>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("etcd", &self.cfg.etcd).finish_non_exhaustive()
    }
}

impl Peers {
    pub(super) fn new(cfg: Cluster) -> Self {
        Self { cfg, etcd: tokio::sync::Mutex::new(None), conns: Mutex::new(HashMap::new()) }
    }

    /// Node `id`'s gRPC endpoint, from its registration.
    async fn endpoint(&self, id: &str) -> Result<String, String> {
        let mut etcd = self.etcd.lock().await;
        if etcd.is_none() {
            let opts = super::etcd_options(&self.cfg)
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(3));
            *etcd = Some(etcd_client::Client::connect(&self.cfg.etcd, Some(opts)).await.map_err(|e| e.to_string())?);
        }
        let c = etcd.as_mut().expect("connected above");
        let key = format!("{}/nodes/{id}", self.cfg.prefix);
        let got = match c.get(key, None).await {
            Ok(g) => g,
            Err(e) => {
                *etcd = None;
                return Err(format!("etcd: {e}"));
            }
        };
        let kv = got.kvs().first().ok_or_else(|| format!("node {id} is not registered"))?;
        let rec: NodeRecord =
            serde_json::from_slice(kv.value()).map_err(|e| format!("node {id}'s registration: {e}"))?;
        Ok(rec.grpc)
    }

    async fn conn(&self, id: &str) -> Result<rdax_client::Client, String> {
        if let Some(c) = self.conns.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(c.clone());
        }
        let grpc = self.endpoint(id).await?;
        let opts = ConnectOptions {
            token: self.cfg.peer_token.as_ref().map(|t| t.to_string()),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Some(BOUND),
            retries: 0,
            ..ConnectOptions::default()
        };
        let c = rdax_client::Client::connect(&grpc, opts).await.map_err(|e| format!("{grpc}: {e}"))?;
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), c.clone());
        Ok(c)
    }

    async fn apply(&self, node: &str, epoch: u64, pg: u32, key: &ObjectKey, change: MetaChange) -> Result<(), String> {
        let c = self.conn(node).await?.from_primary(epoch, pg);
        let obj = c.object(&key.namespace, &key.name).map_err(|e| e.to_string())?;
        let r = match change {
            // The replica converges: an existing object takes the size, a missing one is made.
            MetaChange::Exists { size, volume: false } => obj.create(size).await.map(drop),
            MetaChange::Exists { size, volume: true } => obj.create_volume(size, true).await.map(drop),
            // The primary decided: a replica's NBD clients of the volume are disconnected.
            MetaChange::Absent => obj.delete_force().await,
        };
        r.map_err(|e| {
            if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Connect | ErrorKind::Other | ErrorKind::Io) {
                self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(node);
            }
            e.to_string()
        })
    }
}

impl Forward for Peers {
    fn converge(
        self: Arc<Self>,
        node: String,
        epoch: u64,
        pg: u32,
        key: ObjectKey,
        change: MetaChange,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> {
        Box::pin(async move {
            match tokio::time::timeout(BOUND, self.apply(&node, epoch, pg, &key, change)).await {
                Ok(r) => r.map_err(|e| format!("replica {node}: {e}")),
                Err(_) => {
                    self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&node);
                    Err(format!("replica {node}: no answer within {BOUND:?}"))
                }
            }
        })
    }
}
