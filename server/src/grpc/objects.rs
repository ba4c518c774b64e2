//! The `Objects` service. Pool work runs on blocking threads (`spawn_blocking`): a mapping
//! copy or an `msync` must not stall the async runtime, and a spawned task runs to completion
//! even when tonic drops the handler because the client went away — so no metadata change is
//! ever left half-done. Layout changes (shrink, punch, delete) are handed to the lease
//! manager, which runs recall → drain → change in a task it owns; the handler only awaits it.

use std::pin::Pin;

use rdax_proto::model::{
    CreateObject, FlushObject, ListObjects, ListPgObjects, ObjectKey, PunchHole, ReadObject, ResizeObject, WriteStart,
};
use rdax_proto::pb::{self, objects_server::Objects};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info_span};

use super::meta::{self, Op};
use super::status::{ApiError, api};
use super::{Shared, caller};
use crate::auth::Rights;
use crate::gate::Work;
use crate::pool::{ObjError, ObjectStat};

fn to_pb(s: ObjectStat) -> pb::ObjectStat {
    pb::ObjectStat {
        id: s.id,
        namespace: s.namespace,
        name: s.name,
        size: s.size,
        allocated_bytes: s.allocated_bytes,
        extents: s.extents,
        created_unix_ns: s.created_ns,
        volume: s.volume,
        nbd_clients: 0,
    }
}

/// The `Objects` service.
#[derive(Clone)]
pub struct ObjectsService(pub Shared);

impl ObjectsService {
    fn stat_pb(&self, s: ObjectStat) -> pb::ObjectStat {
        let clients = if s.volume {
            self.0.nbd.clients(&ObjectKey { namespace: s.namespace.clone(), name: s.name.clone() })
        } else {
            0
        };
        pb::ObjectStat { nbd_clients: clients as u32, ..to_pb(s) }
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Objects for ObjectsService {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Result<Response<pb::ObjectStat>, Status> {
        api(async {
            let who = caller(&req)?;
            let role = meta::role(&self.0, req.metadata(), &who)?;
            let r = CreateObject::try_from(req.into_inner())?;
            who.principal.require(Rights::WRITE, &r.key.namespace, &r.key.name)?;
            let span = info_span!("create", object = %r.key, size = r.size, volume = r.volume);
            let key = r.key.clone();
            let st = meta::apply(&self.0, role, key, Op::Create(r)).instrument(span).await?;
            Ok(Response::new(self.stat_pb(st.ok_or(ApiError::Internal("a create without a result"))?)))
        })
        .await
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> Result<Response<pb::ObjectStat>, Status> {
        api(async {
            let who = caller(&req)?;
            let key = ObjectKey::try_from(req.into_inner().object)?;
            who.principal.require(Rights::READ, &key.namespace, &key.name)?;
            let st = self.0.blocking(move |p| p.stat(&key.namespace, &key.name)).await??;
            Ok(Response::new(self.stat_pb(st)))
        })
        .await
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = ListObjects::try_from(req.into_inner())?;
            if !who.principal.allows_some_of(Rights::READ, &r.namespace) {
                return Err(ApiError::PermissionDenied(format!(
                    "principal `{}` has no `read` right on namespace `{}`",
                    who.name(),
                    r.namespace
                )));
            }
            let page = self.0.blocking(move |p| p.list(&r.namespace, r.after.as_deref(), r.limit as usize)).await??;
            // Only what the principal may read (a scope may cover part of a namespace).
            let visible = |o: &ObjectStat| who.principal.allows(Rights::READ, &o.namespace, &o.name);
            Ok(Response::new(pb::ListResponse {
                objects: page.objects.into_iter().filter(visible).map(|o| self.stat_pb(o)).collect(),
                next_after: page.next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn list_pg(&self, req: Request<pb::ListPgRequest>) -> Result<Response<pb::ListPgResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = ListPgObjects::try_from(req.into_inner())?;
            let (pg, pgs, limit) = (r.pg, r.pgs, r.limit as usize);
            let principal = who.principal.clone();
            let (objects, more) = self
                .0
                .blocking(move |p| {
                    let after = r.after.as_ref().map(|(ns, name)| (ns.as_str(), name.as_str()));
                    // Only what the principal may read: a scope that hides objects hides them here.
                    p.scan(after, limit, |ns, name| {
                        rdax_proto::cluster::pg_of(ns, name, pgs) == pg && principal.allows(Rights::READ, ns, name)
                    })
                })
                .await?;
            Ok(Response::new(pb::ListPgResponse {
                objects: objects.into_iter().map(|o| self.stat_pb(o)).collect(),
                more,
            }))
        })
        .await
    }

    async fn resize(&self, req: Request<pb::ResizeRequest>) -> Result<Response<pb::ObjectStat>, Status> {
        api(async {
            let who = caller(&req)?;
            let role = meta::role(&self.0, req.metadata(), &who)?;
            let r = ResizeObject::try_from(req.into_inner())?;
            who.principal.require(Rights::WRITE, &r.key.namespace, &r.key.name)?;
            let span = info_span!("resize", object = %r.key, size = r.size);
            let st = meta::apply(&self.0, role, r.key, Op::Resize { size: r.size, grow_only: r.grow_only })
                .instrument(span)
                .await?;
            Ok(Response::new(self.stat_pb(st.ok_or(ApiError::Internal("a resize without a result"))?)))
        })
        .await
    }

    async fn punch_hole(&self, req: Request<pb::PunchHoleRequest>) -> Result<Response<pb::PunchHoleResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = PunchHole::try_from(req.into_inner())?;
            who.principal.require(Rights::WRITE, &r.key.namespace, &r.key.name)?;
            let span = info_span!("punch_hole", object = %r.key, offset = r.range.offset, length = r.range.length);
            let (key, off, len) = (r.key.clone(), r.range.offset, r.range.length);
            let end = off.saturating_add(len);
            self.0
                .leases
                .change_layout(r.key, off, end, "a hole is being punched", move |p| {
                    p.punch_hole(&key.namespace, &key.name, off, len)
                })
                .instrument(span)
                .await?;
            Ok(Response::new(pb::PunchHoleResponse {}))
        })
        .await
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let role = meta::role(&self.0, req.metadata(), &who)?;
            let r = req.into_inner();
            let key = ObjectKey::try_from(r.object)?;
            who.principal.require(Rights::WRITE, &key.namespace, &key.name)?;
            let span = info_span!("delete", object = %key);
            meta::apply(&self.0, role, key, Op::Delete { force: r.force }).instrument(span).await?;
            Ok(Response::new(pb::DeleteResponse {}))
        })
        .await
    }

    type ReadStream = ReadStream;

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = ReadObject::try_from(req.into_inner())?;
            who.principal.require(Rights::READ, &r.key.namespace, &r.key.name)?;
            let key = r.key.clone();
            let size = self.0.blocking(move |p| p.stat(&key.namespace, &key.name)).await??.size;
            let end = match r.length {
                _ if r.offset > size => {
                    return Err(
                        ObjError::OutOfRange { offset: r.offset, len: r.length.unwrap_or(0), size, hint: "" }.into()
                    );
                }
                Some(l) if r.offset.checked_add(l).is_none_or(|e| e > size) => {
                    return Err(ObjError::OutOfRange { offset: r.offset, len: l, size, hint: "" }.into());
                }
                Some(l) => r.offset + l,
                None => size,
            };
            let max_chunk = self.0.cfg.read_chunk_bytes;
            let chunk = if r.chunk_size == 0 { max_chunk } else { (r.chunk_size as usize).min(max_chunk) };
            let (tx, rx) = mpsc::channel(4);
            let shared = self.0.clone();
            let span = info_span!("read", object = %r.key, offset = r.offset, end);
            // The stream outlives this handler: it holds its own place in the gate.
            let guard = self.0.gate.join(Work::Stream);
            tokio::spawn(
                async move {
                    let _guard = guard;
                    let mut at = r.offset;
                    while at < end {
                        let n = ((end - at) as usize).min(chunk);
                        let key = r.key.clone();
                        let res = shared
                            .blocking(move |p| {
                                let mut buf = vec![0u8; n];
                                let got = p.read(&key.namespace, &key.name, at, &mut buf)?;
                                buf.truncate(got);
                                Ok::<_, ObjError>(buf)
                            })
                            .await;
                        let item = match res {
                            Ok(Ok(data)) if data.is_empty() => break, // shrunk under us
                            Ok(Ok(data)) => Ok(pb::ReadChunk { offset: at, data }),
                            Ok(Err(e)) => Err(Status::from(ApiError::from(e))),
                            Err(e) => Err(Status::from(e)),
                        };
                        let failed = item.is_err();
                        if let Ok(c) = &item {
                            at += c.data.len() as u64;
                        }
                        if tx.send(item).await.is_err() || failed {
                            break; // client gone, or error delivered
                        }
                    }
                }
                .instrument(span),
            );
            Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Self::ReadStream))
        })
        .await
    }

    async fn write(&self, req: Request<Streaming<pb::WriteChunk>>) -> Result<Response<pb::WriteResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let mut inbound = req.into_inner();
            let first = inbound.message().await?.ok_or(ApiError::BadStream("empty write stream"))?;
            let start = WriteStart::try_from(first.header)?;
            who.principal.require(Rights::WRITE, &start.key.namespace, &start.key.name)?;
            let span = info_span!("write", object = %start.key, offset = start.offset);
            // On DAX each chunk is stored with streaming stores and drained (cheap); on an msync
            // pool one msync over the whole range at the end is far cheaper than one per chunk.
            // Either way the data is durable before the reply.
            let msync_pool = self.0.pool.media().persistence() == crate::pool::media::Persistence::Msync;
            let per_chunk_persist = start.persist && !msync_pool;
            // A write takes no lease, so an exclusive one (a mounted NBD volume, say) must keep
            // it out, as it keeps out every other holder.
            if let Some(id) = self.0.leases.exclusive_over(&start.key, start.offset, u64::MAX) {
                return Err(ApiError::Lease(crate::lease::LeaseError::Exclusive(id)));
            }
            async move {
                let mut at = start.offset;
                let mut pending = Some(first.data);
                loop {
                    let data = match pending.take() {
                        Some(d) => d,
                        None => match inbound.message().await? {
                            Some(c) if c.header.is_some() => {
                                return Err(ApiError::BadStream(
                                    "only the first message of a write stream has a header",
                                ));
                            }
                            Some(c) => c.data,
                            None => break,
                        },
                    };
                    if data.is_empty() {
                        continue;
                    }
                    let len = data.len() as u64;
                    let (key, extend, persist) = (start.key.clone(), start.extend, per_chunk_persist);
                    self.0
                        .blocking(move |p| {
                            let end =
                                at.checked_add(len).ok_or(crate::pool::ObjError::InvalidArgument("write past 2^64"))?;
                            if extend && end > p.stat(&key.namespace, &key.name)?.size {
                                p.resize(&key.namespace, &key.name, end)?;
                            }
                            p.write(&key.namespace, &key.name, at, &data, persist)
                        })
                        .await??;
                    at += len;
                }
                let key = start.key.clone();
                let (from, deferred) = (start.offset, start.persist && !per_chunk_persist);
                let size = self
                    .0
                    .blocking(move |p| {
                        if deferred && at > from {
                            p.persist(&key.namespace, &key.name, from, at - from)?;
                        }
                        p.stat(&key.namespace, &key.name)
                    })
                    .await??
                    .size;
                Ok(Response::new(pb::WriteResponse { bytes_written: at - start.offset, size }))
            }
            .instrument(span)
            .await
        })
        .await
    }

    async fn flush(&self, req: Request<pb::FlushRequest>) -> Result<Response<pb::FlushResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = FlushObject::try_from(req.into_inner())?;
            who.principal.require(Rights::WRITE, &r.key.namespace, &r.key.name)?;
            self.0
                .blocking(move |p| {
                    let size = p.stat(&r.key.namespace, &r.key.name)?.size;
                    let len = r.length.unwrap_or(size.saturating_sub(r.offset));
                    p.persist(&r.key.namespace, &r.key.name, r.offset, len)
                })
                .await??;
            Ok(Response::new(pb::FlushResponse {}))
        })
        .await
    }
}
