//! The `Leases` service.

use rdax_proto::model::{AcquireLease, LeaseAccess, SessionId};
use rdax_proto::pb::{self, leases_server::Leases};
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use super::Shared;
use crate::lease::Mode;

fn mode_pb(m: Mode) -> i32 {
    match m {
        Mode::Read => pb::LeaseMode::Read as i32,
        Mode::ReadWrite => pb::LeaseMode::ReadWrite as i32,
    }
}

fn session(s: &str) -> Result<SessionId, Status> {
    s.parse().map_err(Status::from)
}

/// The `Leases` service.
#[derive(Clone)]
pub struct LeasesService(pub Shared);

#[tonic::async_trait]
impl Leases for LeasesService {
    async fn acquire(&self, req: Request<pb::AcquireRequest>) -> Result<Response<pb::LeaseGrant>, Status> {
        if self.0.draining.is_cancelled() {
            return Err(super::status::shutting_down());
        }
        let r = AcquireLease::try_from(req.into_inner())?;
        let mode = match r.access {
            LeaseAccess::Read => Mode::Read,
            LeaseAccess::ReadWrite => Mode::ReadWrite,
        };
        let span = info_span!("acquire", session = %r.session, object = %r.key, offset = r.range.offset);
        let g = self.0.leases.acquire(r.session, r.key, r.range.offset, r.range.length, mode).instrument(span).await?;
        let remote = if r.rdma {
            match self.0.rdma.bind(r.session, &g).await {
                Ok(k) => k,
                Err(e) => {
                    // Nothing was handed out: give the lease back at once.
                    let _ = self.0.leases.release(r.session, g.id);
                    return Err(e.into());
                }
            }
        } else {
            vec![None; g.segments.len()]
        };
        let transport = if r.rdma { pb::Transport::Rdma } else { pb::Transport::Tcp };
        Ok(Response::new(pb::LeaseGrant {
            transport: transport as i32,
            lease_id: g.id,
            generation: g.generation,
            expires_in_ms: g.ttl.as_millis() as u64,
            ttl_ms: g.ttl.as_millis() as u64,
            mode: mode_pb(g.mode),
            data_endpoints: vec![self.0.data_endpoint.clone()],
            segments: g
                .segments
                .into_iter()
                .zip(remote)
                .map(|(s, rk)| pb::LeaseSegment {
                    object_offset: s.object_offset,
                    length: s.len,
                    pool_offset: s.target.map_or(0, |t| t.0),
                    key: s.target.map_or_else(Vec::new, |t| t.1.to_vec()),
                    rdma_addr: rk.map_or(0, |k| k.addr),
                    rkey: rk.map_or(0, |k| k.rkey),
                })
                .collect(),
        }))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let r = req.into_inner();
        let ttl = self.0.leases.renew(session(&r.session_id)?, r.lease_id)?;
        Ok(Response::new(pb::RenewResponse { expires_in_ms: ttl.as_millis() as u64 }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = req.into_inner();
        self.0.leases.release(session(&r.session_id)?, r.lease_id)?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn list(&self, req: Request<pb::ListLeasesRequest>) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let r = req.into_inner();
        let filter = if r.session_id.is_empty() { None } else { Some(session(&r.session_id)?) };
        let leases = self
            .0
            .leases
            .list(filter)
            .into_iter()
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
            })
            .collect();
        Ok(Response::new(pb::ListLeasesResponse { leases }))
    }
}
