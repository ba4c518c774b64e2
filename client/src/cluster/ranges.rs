//! Creates, resizes and grows, and writes and reads of a byte range, over a cluster.
//!
//! A ranged write ([`ClusterClient::write_at`]) is a put of part of an existing object: the
//! same exclusive leases, taken one replica after another primary first, but on the range
//! only, so writes of disjoint ranges of one object go on side by side while writes of
//! overlapping ranges are ordered by the primary's lease. It never changes the size.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use futures_util::future::join_all;
use rdax_proto::pb;

use super::{ClusterClient, Held, PutReceipt, retryable};
use crate::client::Route;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::LeaseMode;

impl ClusterClient {
    /// Create `namespace/name` with `size` bytes (reading zero) through its PG's primary,
    /// which has every other replica follow before it answers. `AlreadyExists` if it exists,
    /// unless an earlier try of this call had no answer and the object now has `size` bytes
    /// (that try made it).
    pub async fn create(&self, namespace: &str, name: &str, size: u64) -> Result<pb::ObjectStat> {
        let unknown = AtomicBool::new(false);
        let unknown = &unknown;
        self.routed(namespace, name, "create", |route, replicas| async move {
            let id = &replicas[0];
            let obj = self.conn(id).await?.client.routed(Some(route)).object(namespace, name)?;
            let before = unknown.swap(true, Relaxed);
            match obj.create(size).await {
                Ok(st) => Ok(st),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && before => match obj.stat().await {
                    Ok(st) if st.size == size => Ok(st),
                    _ => Err(e),
                },
                Err(e) => Err(self.change_failed(id, unknown, before, e)),
            }
        })
        .await
    }

    /// Set the size of `namespace/name` through its PG's primary (bytes past the old end read
    /// zero; a shrink first recalls the leases past the new end, on every replica). `NotFound`
    /// if it does not exist.
    pub async fn resize(&self, namespace: &str, name: &str, size: u64) -> Result<pb::ObjectStat> {
        self.resize_with(namespace, name, size, false).await
    }

    /// Grow `namespace/name` to `size` bytes through its PG's primary, unless it is at least
    /// that long already (then it is left as it is). The primary decides under the object's
    /// name lock, so concurrent grows (writers extending an object before their ranged
    /// writes) never shrink each other's work. `NotFound` if it does not exist.
    pub async fn grow(&self, namespace: &str, name: &str, size: u64) -> Result<pb::ObjectStat> {
        self.resize_with(namespace, name, size, true).await
    }

    async fn resize_with(&self, namespace: &str, name: &str, size: u64, grow_only: bool) -> Result<pb::ObjectStat> {
        self.routed(namespace, name, "resize", |route, replicas| async move {
            let id = &replicas[0];
            let obj = self.conn(id).await?.client.routed(Some(route)).object(namespace, name)?;
            let r = if grow_only { obj.grow(size).await } else { obj.resize(size).await };
            if let Err(e) = &r
                && retryable(e)
            {
                self.forget(id);
            }
            r
        })
        .await
    }

    /// Write `data` at `offset` into the existing `namespace/name` on every replica of its PG,
    /// each one-sided under an exclusive lease of the range; returns when all have persisted
    /// it. The range must lie inside the object (`OutOfRange` otherwise: [`grow`] it first);
    /// `NotFound` if it does not exist.
    ///
    /// A replica that is still copying the PG and has not reached this object yet is not
    /// written: its copy reads the object from a complete replica under a lease that this
    /// write's lease excludes, so it brings these bytes too.
    ///
    /// [`grow`]: ClusterClient::grow
    pub async fn write_at(&self, namespace: &str, name: &str, offset: u64, data: &[u8]) -> Result<PutReceipt> {
        let len = data.len() as u64;
        let end = offset.checked_add(len).ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "range overflows"))?;
        self.routed(namespace, name, "write", |route, replicas| async move {
            let pg = route.pg.unwrap_or(0);
            let size = self.stat_routed(route, replicas.clone(), namespace, name).await?.size;
            if end > size {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "{namespace}/{name} is {size} bytes: a write of [{offset}, {end}) reaches past its end (grow \
                         it first)"
                    ),
                ));
            }
            let receipt = PutReceipt { epoch: route.epoch, pg, replicas: replicas.clone() };
            if len == 0 {
                return Ok(receipt);
            }
            let mut leases = Held(Vec::with_capacity(replicas.len()));
            for id in &replicas {
                if self.view().repairing(id, pg) && !self.has(id, route, namespace, name).await? {
                    continue;
                }
                // On a refusal the leases taken so far are given back (`Held`).
                leases.0.push((id.clone(), self.lease_one(id, route, (namespace, name), offset, len).await?));
            }
            let writes = leases.0.iter().map(|(id, l)| async move {
                let r = l.write_persist(offset, data).await;
                if let Err(e) = &r
                    && retryable(e)
                {
                    self.forget(id);
                }
                r
            });
            let wrote: Result<Vec<()>> = join_all(writes).await.into_iter().collect();
            let released = join_all(std::mem::take(&mut leases.0).into_iter().map(|(_, l)| l.release())).await;
            wrote?;
            released.into_iter().collect::<Result<Vec<()>>>()?;
            Ok(receipt)
        })
        .await
    }

    /// Read `len` bytes at `offset` of `namespace/name` from the first complete replica that
    /// has it. `OutOfRange` if the range reaches past the end.
    pub async fn read_at(&self, namespace: &str, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        offset.checked_add(len).ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "range overflows"))?;
        self.routed(namespace, name, "read", |route, replicas| async move {
            let readable = self.readable(route, replicas)?;
            self.first_replica(&readable, |id| self.read_one(id, route, (namespace, name), Some((offset, len)))).await
        })
        .await
    }

    /// The object's metadata from the first complete replica that has it.
    pub(super) async fn stat_routed(
        &self,
        route: Route,
        replicas: Vec<String>,
        namespace: &str,
        name: &str,
    ) -> Result<pb::ObjectStat> {
        let readable = self.readable(route, replicas)?;
        self.first_replica(&readable, |id| async move {
            self.conn(id).await?.client.routed(Some(route)).object(namespace, name)?.stat().await
        })
        .await
    }

    /// Whether node `id` has the object.
    async fn has(&self, id: &str, route: Route, namespace: &str, name: &str) -> Result<bool> {
        let obj = self.conn(id).await?.client.routed(Some(route)).object(namespace, name)?;
        match obj.stat().await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound && e.node_epoch().is_none() => Ok(false),
            Err(e) => {
                if retryable(&e) {
                    self.forget(id);
                }
                Err(e)
            }
        }
    }

    /// Read `range` (offset, length; all of it when `None`) of the object on node `id` under a
    /// read lease.
    pub(super) async fn read_one(
        &self,
        id: &str,
        route: Route,
        key: (&str, &str),
        range: Option<(u64, u64)>,
    ) -> Result<Vec<u8>> {
        let (namespace, name) = key;
        let c = self.conn(id).await?;
        let size = c.client.routed(Some(route)).object(namespace, name)?.stat().await?.size;
        let (offset, len) = range.unwrap_or((0, size));
        if offset + len > size {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{namespace}/{name} is {size} bytes: [{offset}, {}) reaches past its end", offset + len),
            ));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let s = self.session(&c).await?;
        let lease = match s.acquire_routed(namespace, name, offset, len, LeaseMode::Read, false, Some(route)).await {
            Ok(l) => l,
            // Deleted since the stat, or the node no longer knows the session: try again
            // afresh (the stat then tells which).
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.forget(id);
                return Err(Error::new(ErrorKind::Unavailable, format!("node {id}: {e}")));
            }
            // Shrunk since the stat: the stat of the next try tells.
            Err(e) if e.kind() == ErrorKind::OutOfRange => {
                return Err(Error::new(ErrorKind::Unavailable, format!("node {id}: {e}")));
            }
            Err(e) => return Err(e),
        };
        let data = lease.read(offset, len).await;
        let _ = lease.release().await;
        data
    }
}
