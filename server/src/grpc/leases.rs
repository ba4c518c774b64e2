//! The `Leases` service.

use rdax_proto::model::{AcquireLease, LeaseAccess, SessionId};
use rdax_proto::pb::{self, leases_server::Leases};
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use std::sync::Arc;

use super::status::{ApiError, api};
use super::{Shared, caller};
use crate::auth::Rights;
use crate::dma::{Transport, TransportKind};
use crate::lease::{GrantRequest, Mode};

fn mode_pb(m: Mode) -> i32 {
    match m {
        Mode::Read => pb::LeaseMode::Read as i32,
        Mode::ReadWrite => pb::LeaseMode::ReadWrite as i32,
    }
}

fn session(s: &str) -> Result<SessionId, ApiError> {
    Ok(s.parse()?)
}

/// The `Leases` service.
#[derive(Clone)]
pub struct LeasesService(pub Shared);

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn acquire(&self, req: Request<pb::AcquireRequest>) -> Result<Response<pb::LeaseGrant>, Status> {
        api(async {
            let who = caller(&req)?;
            let raw = req.into_inner();
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
            let span = info_span!("acquire", session = %r.session, object = %r.key, offset = r.range.offset);
            let req = GrantRequest {
                session: r.session,
                object: r.key,
                offset: r.range.offset,
                len: r.range.length,
                mode,
                exclusive,
                allocate: true,
                transport,
            };
            // The grant (lease, then transport keys) runs in a task the lease manager owns; if
            // this handler is dropped, the handle is dropped with it and the lease given back.
            let handle = self.0.leases.grant(req).instrument(span).await?;
            let g = handle.into_grant();
            let transport = match g.transport {
                TransportKind::Rdma => pb::Transport::Rdma,
                TransportKind::Tcp => pb::Transport::Tcp,
            };
            Ok(Response::new(pb::LeaseGrant {
                transport: transport as i32,
                lease_id: g.id,
                generation: g.generation,
                expires_in_ms: g.ttl.as_millis() as u64,
                ttl_ms: g.ttl.as_millis() as u64,
                mode: mode_pb(g.mode),
                data_endpoints: vec![self.0.data_endpoint.clone()],
                data_tls: self.0.cfg.data_tls,
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
            }))
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
