//! The `Leases` service.

use rdax_proto::model::{AcquireLease, LeaseAccess, ProtocolError, SessionId};
use rdax_proto::pb::{self, leases_server::Leases};
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument, info_span};

use std::sync::Arc;

use super::status::{ApiError, api};
use super::{Caller, Shared, caller};
use crate::auth::Rights;
use crate::dma::{Transport, TransportKind};
use crate::lease::{Grant, GrantHandle, GrantRequest, Mode};

fn mode_pb(m: Mode) -> i32 {
    match m {
        Mode::Read => pb::LeaseMode::Read as i32,
        Mode::ReadWrite => pb::LeaseMode::ReadWrite as i32,
    }
}

fn session(s: &str) -> Result<SessionId, ApiError> {
    Ok(s.parse()?)
}

/// Items one `AcquireBatch` may carry.
pub const MAX_ACQUIRE_BATCH: usize = 256;
/// Leases one `ReleaseBatch` may name.
pub const MAX_RELEASE_BATCH: usize = 1024;

/// The `Leases` service.
#[derive(Clone)]
pub struct LeasesService(pub Shared);

impl LeasesService {
    /// Parse and authorize one Acquire: the right on the object, and the session the caller's.
    fn authorize(&self, who: &Caller, raw: pb::AcquireRequest) -> Result<GrantRequest, ApiError> {
        let exclusive = raw.exclusive;
        let r = AcquireLease::try_from(raw)?;
        let mode = match r.access {
            LeaseAccess::Read => Mode::Read,
            LeaseAccess::ReadWrite => Mode::ReadWrite,
        };
        // An exclusive lease takes the range from everyone else: a writer's right.
        let right = if mode == Mode::ReadWrite || exclusive { Rights::WRITE } else { Rights::READ };
        who.principal.require(right, &r.key.namespace, &r.key.name)?;
        self.0.sessions.check_owner(r.session, who.name())?;
        let transport = if r.rdma { self.0.rdma.clone() as Arc<dyn Transport> } else { self.0.tcp.clone() };
        Ok(GrantRequest {
            session: r.session,
            object: r.key,
            offset: r.range.offset,
            len: r.range.length,
            mode,
            exclusive,
            allocate: true,
            transport,
        })
    }
}

/// Grant `req` and describe the grant for the wire.
async fn grant(shared: &Shared, req: GrantRequest) -> Result<pb::LeaseGrant, ApiError> {
    Ok(describe(shared, grant_handle(shared, req).await?.into_grant()))
}

/// Grant `req`. The grant (lease, then transport keys) runs in a task the lease manager owns;
/// if this future, or the handle it returns, is dropped, the lease is given back.
async fn grant_handle(shared: &Shared, req: GrantRequest) -> Result<GrantHandle, ApiError> {
    let span = info_span!("acquire", session = %req.session, object = %req.object, offset = req.offset);
    Ok(shared.leases.grant(req).instrument(span).await?)
}

/// A grant, for the wire.
fn describe(shared: &Shared, g: Grant) -> pb::LeaseGrant {
    let transport = match g.transport {
        TransportKind::Rdma => pb::Transport::Rdma,
        TransportKind::Tcp => pb::Transport::Tcp,
    };
    pb::LeaseGrant {
        transport: transport as i32,
        lease_id: g.id,
        generation: g.generation,
        expires_in_ms: g.ttl.as_millis() as u64,
        ttl_ms: g.ttl.as_millis() as u64,
        mode: mode_pb(g.mode),
        data_endpoints: vec![shared.data_endpoint.clone()],
        data_tls: shared.cfg.data_tls,
        segments: g
            .segments
            .into_iter()
            .map(|s| pb::LeaseSegment {
                object_offset: s.object_offset,
                length: s.len,
                pool_offset: s.target.map_or(0, |t| t.0),
                key: s.target.map_or_else(Vec::new, |t| t.1.to_vec()),
                rdma_addr: s.remote.map_or(0, |k| k.addr),
                rkey: s.remote.map_or(0, |k| k.rkey),
            })
            .collect(),
    }
}

/// One batch item's error, as the single-item call would have returned it.
fn item_status(e: ApiError) -> pb::ItemStatus {
    let s = Status::from(e);
    let retry_after_ms =
        s.metadata().get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    pb::ItemStatus { code: s.code() as i32, message: s.message().to_string(), retry_after_ms }
}

fn failed(e: ApiError) -> pb::AcquireResult {
    pb::AcquireResult { result: Some(pb::acquire_result::Result::Error(item_status(e))) }
}

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn acquire(&self, req: Request<pb::AcquireRequest>) -> Result<Response<pb::LeaseGrant>, Status> {
        api(async {
            let who = caller(&req)?;
            let req = self.authorize(&who, req.into_inner())?;
            Ok(Response::new(grant(&self.0, req).await?))
        })
        .await
    }

    async fn acquire_batch(
        &self,
        req: Request<pb::AcquireBatchRequest>,
    ) -> Result<Response<pb::AcquireBatchResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let items = req.into_inner().requests;
            if items.len() > MAX_ACQUIRE_BATCH {
                return Err(ApiError::Protocol(ProtocolError::Invalid {
                    field: "requests",
                    reason: "more than 256 items in one AcquireBatch",
                }));
            }
            // Everything is authorized before anything is granted (all or nothing); an item
            // that does not parse is that item's error, like any other.
            let prepared: Vec<Result<GrantRequest, ApiError>> = items
                .into_iter()
                .map(|raw| match self.authorize(&who, raw) {
                    Err(e) if matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated) => Err(e),
                    r => Ok(r),
                })
                .collect::<Result<_, _>>()?;
            // One after another, in order, as if each were its own call: a later item sees what
            // an earlier one allocated. The handles are kept until every item is done, so a
            // handler dropped at any await (a deadline, a disconnect) gives back every lease
            // it had been granted; only the finished response hands them over.
            let mut handles: Vec<Result<GrantHandle, ApiError>> = Vec::with_capacity(prepared.len());
            for p in prepared {
                handles.push(match p {
                    Ok(req) => grant_handle(&self.0, req).await,
                    Err(e) => Err(e),
                });
            }
            let results = handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => pb::AcquireResult {
                        result: Some(pb::acquire_result::Result::Grant(describe(&self.0, h.into_grant()))),
                    },
                    Err(e) => failed(e),
                })
                .collect();
            Ok(Response::new(pb::AcquireBatchResponse { results }))
        })
        .await
    }

    async fn release_batch(
        &self,
        req: Request<pb::ReleaseBatchRequest>,
    ) -> Result<Response<pb::ReleaseBatchResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = req.into_inner();
            if r.lease_ids.len() > MAX_RELEASE_BATCH {
                return Err(ApiError::Protocol(ProtocolError::Invalid {
                    field: "lease_ids",
                    reason: "more than 1024 leases in one ReleaseBatch",
                }));
            }
            let sid = session(&r.session_id)?;
            self.0.sessions.check_owner(sid, who.name())?;
            let results = r
                .lease_ids
                .into_iter()
                .map(|id| match self.0.leases.release(sid, id) {
                    Ok(()) => pb::ItemStatus::default(),
                    Err(e) => item_status(e.into()),
                })
                .collect();
            Ok(Response::new(pb::ReleaseBatchResponse { results }))
        })
        .await
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = req.into_inner();
            let sid = session(&r.session_id)?;
            self.0.sessions.check_owner(sid, who.name())?;
            let ttl = self.0.leases.renew(sid, r.lease_id)?;
            Ok(Response::new(pb::RenewResponse { expires_in_ms: ttl.as_millis() as u64 }))
        })
        .await
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = req.into_inner();
            let sid = session(&r.session_id)?;
            self.0.sessions.check_owner(sid, who.name())?;
            self.0.leases.release(sid, r.lease_id)?;
            Ok(Response::new(pb::ReleaseResponse {}))
        })
        .await
    }

    async fn list(&self, req: Request<pb::ListLeasesRequest>) -> Result<Response<pb::ListLeasesResponse>, Status> {
        api(async {
            let who = caller(&req)?;
            let r = req.into_inner();
            let filter = if r.session_id.is_empty() { None } else { Some(session(&r.session_id)?) };
            if let Some(sid) = filter {
                self.0.sessions.check_owner(sid, who.name())?;
            }
            // Without a session: an administrator sees every lease, anyone else their own.
            // (One look at the session table, not one per lease.)
            let mine = (!who.principal.has_everywhere(Rights::ADMIN)).then(|| self.0.sessions.sessions_of(who.name()));
            let leases = self
                .0
                .leases
                .list(filter)
                .into_iter()
                .filter(|l| mine.as_ref().is_none_or(|m| m.contains(&l.session)))
                .map(|l| pb::LeaseInfo {
                    lease_id: l.id,
                    session_id: l.session.to_string(),
                    object: Some((&l.object).into()),
                    offset: l.offset,
                    length: l.len,
                    mode: mode_pb(l.mode),
                    generation: l.generation,
                    state: l.state.as_str().into(),
                    pins: l.pins,
                    expires_in_ms: l.expires_in_ms,
                    exclusive: l.exclusive,
                })
                .collect();
            Ok(Response::new(pb::ListLeasesResponse { leases }))
        })
        .await
    }
}
