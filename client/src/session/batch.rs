//! Many leases in one call: [`Session::acquire_batch`] and [`Session::release_batch`].

use std::time::Duration;

use rdax_proto::model::ObjectKey;
use rdax_proto::pb;
use tokio::sync::oneshot;

use super::{Session, Undelivered};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{Lease, LeaseMode};

/// Items one `AcquireBatch` call carries (the daemon's limit); longer lists are sent in
/// several calls.
const ACQUIRE_CHUNK: usize = 256;
/// Leases one `ReleaseBatch` call names (the daemon's limit).
const RELEASE_CHUNK: usize = 1024;
/// Rounds of re-asking for items the daemon answered `Unavailable` (their range was being
/// recalled), each after the delay it named.
const UNAVAILABLE_ROUNDS: usize = 8;

/// One range to lease, for [`Session::acquire_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRange<'a> {
    /// Namespace of the object.
    pub namespace: &'a str,
    /// Name of the object.
    pub name: &'a str,
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Read or read-write (which allocates holes first).
    pub mode: LeaseMode,
}

fn item_error(s: &pb::ItemStatus) -> Error {
    Error::from(tonic::Status::new(tonic::Code::from(s.code), s.message.clone()))
}

impl Session {
    /// Acquire many leases in as few calls as the daemon allows (256 ranges per call), for
    /// clients that take leases at a high rate. The result has one entry per range, in
    /// order: each range succeeds or fails on its own, as [`Session::acquire`] would (a range
    /// being recalled is asked for again, bounded, after the delay the daemon names). The call
    /// as a whole fails only when the daemon refuses it outright: a range outside the
    /// caller's scope (`PermissionDenied`, and nothing is granted), or the daemon unreachable.
    /// Dropping the future gives back every lease it had been granted.
    pub async fn acquire_batch(&self, ranges: &[LeaseRange<'_>]) -> Result<Vec<Result<Lease>>> {
        let mut objects = Vec::with_capacity(ranges.len());
        for r in ranges {
            objects.push(ObjectKey::new(r.namespace, r.name));
        }
        let link = self.rdma_link().await?;
        let transport = if link.is_some() { pb::Transport::Rdma } else { pb::Transport::Tcp };
        let mut out: Vec<Option<Result<Lease>>> = (0..ranges.len()).map(|_| None).collect();
        // Invalid names are those items' errors; the rest go to the daemon.
        let mut todo: Vec<usize> = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            match o {
                Ok(_) => todo.push(i),
                Err(e) => out[i] = Some(Err(Error::from(e.clone()))),
            }
        }
        for round in 0..=UNAVAILABLE_ROUNDS {
            if todo.is_empty() {
                break;
            }
            let mut again = Vec::new();
            let mut wait_ms = 0u64;
            for chunk in todo.chunks(ACQUIRE_CHUNK) {
                let requests = chunk
                    .iter()
                    .map(|&i| {
                        let (r, o) = (&ranges[i], objects[i].as_ref().expect("valid"));
                        pb::AcquireRequest {
                            session_id: self.id.clone(),
                            object: Some(pb::ObjectRef::from(o)),
                            offset: r.offset,
                            length: r.len,
                            mode: match r.mode {
                                LeaseMode::Read => pb::LeaseMode::Read,
                                LeaseMode::ReadWrite => pb::LeaseMode::ReadWrite,
                            } as i32,
                            transport: transport as i32,
                            exclusive: false,
                        }
                    })
                    .collect::<Vec<_>>();
                let results = self.acquire_chunk(requests).await?;
                if results.len() != chunk.len() {
                    return Err(Error::new(ErrorKind::Protocol, "AcquireBatch answered a different number of items"));
                }
                for (&i, res) in chunk.iter().zip(results) {
                    let (r, o) = (&ranges[i], objects[i].as_ref().expect("valid"));
                    // An `Arc` with the `rdma` feature, `Copy` without it.
                    #[allow(clippy::clone_on_copy)]
                    let link = link.clone();
                    out[i] = Some(match res {
                        Ok(g) => self.deliver(g.take(), o.clone(), r.offset, r.len, link),
                        Err(s) if s.code == tonic::Code::Unavailable as i32 && round < UNAVAILABLE_ROUNDS => {
                            wait_ms = wait_ms.max(s.retry_after_ms.max(10));
                            again.push(i);
                            continue;
                        }
                        Err(s) => Err(item_error(&s)),
                    });
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(wait_ms.min(5_000))).await;
            }
            todo = again;
        }
        Ok(out.into_iter().map(|r| r.expect("every range has a result")).collect())
    }

    /// One `AcquireBatch` call, in a task of its own: if this future is dropped, the grants
    /// that still arrive are given back.
    async fn acquire_chunk(
        &self,
        requests: Vec<pb::AcquireRequest>,
    ) -> Result<Vec<std::result::Result<Undelivered, pb::ItemStatus>>> {
        let (tx, rx) = oneshot::channel();
        let (client, session_id) = (self.client.clone(), self.id.clone());
        tokio::spawn(async move {
            let r = client
                .retry(|| {
                    let mut c = client.leases.clone();
                    let r = client.request(pb::AcquireBatchRequest { requests: requests.clone() });
                    async move { c.acquire_batch(r).await.map(|r| r.into_inner()) }
                })
                .await;
            let r = r.map(|resp| {
                resp.results
                    .into_iter()
                    .map(|item| match item.result {
                        Some(pb::acquire_result::Result::Grant(g)) => {
                            Ok(Undelivered { grant: Some(g), client: client.clone(), session_id: session_id.clone() })
                        }
                        Some(pb::acquire_result::Result::Error(s)) => Err(s),
                        None => Err(pb::ItemStatus {
                            code: tonic::Code::Internal as i32,
                            message: "an AcquireBatch result with neither grant nor error".into(),
                            retry_after_ms: 0,
                        }),
                    })
                    .collect::<Vec<_>>()
            });
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| Error::new(ErrorKind::Protocol, "the acquire task ended"))?
    }

    /// Release many leases of this session (1,024 per call), each after its in-flight
    /// operations, like [`Lease::release`]. One result per lease, in order; a lease the daemon
    /// had already ended (revoked, expired) counts as released.
    pub async fn release_batch(&self, leases: Vec<Lease>) -> Result<Vec<Result<()>>> {
        // One 30 s bound for the whole list, as for one lease, not 30 s per lease.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for l in &leases {
            l.inner.quiesce(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
        }
        let mut out = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(RELEASE_CHUNK) {
            let ids: Vec<u64> = chunk.iter().map(|l| l.id()).collect();
            let resp = self
                .client
                .retry(|| {
                    let mut c = self.client.leases.clone();
                    let r = self
                        .client
                        .request(pb::ReleaseBatchRequest { session_id: self.id.clone(), lease_ids: ids.clone() });
                    async move { c.release_batch(r).await.map(|r| r.into_inner()) }
                })
                .await?;
            if resp.results.len() != chunk.len() {
                return Err(Error::new(ErrorKind::Protocol, "ReleaseBatch answered a different number of items"));
            }
            for (l, s) in chunk.iter().zip(resp.results) {
                l.inner.mark_ended();
                let code = tonic::Code::from(s.code);
                out.push(match code {
                    tonic::Code::Ok | tonic::Code::NotFound | tonic::Code::FailedPrecondition => Ok(()),
                    _ => Err(item_error(&s)),
                });
            }
        }
        Ok(out)
    }
}
