//! The `Pool`, `Sessions` and `Admin` services.

use std::pin::Pin;
use std::time::UNIX_EPOCH;

use rdax_proto::model::{OpenSession, SessionId};
use rdax_proto::pb::session_event::Kind as Event;
use rdax_proto::pb::session_request::Kind as Req;
use rdax_proto::pb::{self, admin_server::Admin, pool_server::Pool as PoolRpc, sessions_server::Sessions};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span};

use super::status::{ApiError, api};
use super::{Shared, caller};
use crate::session::EndReason;

/// The `Pool` service.
#[derive(Clone)]
pub struct PoolService(pub Shared);

#[tonic::async_trait]
impl PoolRpc for PoolService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::PoolInfo>, Status> {
        api(async { Ok(self.info_now()) }).await
    }

    async fn stats(&self, _: Request<pb::StatsRequest>) -> Result<Response<pb::PoolStats>, Status> {
        api(async {
            let s = self.0.blocking(|p| p.stats()).await?;
            Ok(Response::new(pb::PoolStats {
                objects: s.objects,
                extents: s.extents,
                data_blocks: s.data_blocks,
                used_blocks: s.used_blocks,
                held_blocks: s.held_blocks,
                quarantined_blocks: s.quarantined_blocks,
                free_blocks: s.free.free_blocks,
                free_extents: s.free.free_extents,
                largest_free_blocks: s.free.largest_free_blocks,
                free_huge_runs: s.free.free_huge_runs,
                fragmentation: s.fragmentation,
                sessions: self.0.sessions.len() as u64,
            }))
        })
        .await
    }
}

impl PoolService {
    fn info_now(&self) -> Response<pb::PoolInfo> {
        let i = self.0.pool.info();
        let g = i.geometry;
        Response::new(pb::PoolInfo {
            path: i.path.map(|p| p.display().to_string()).unwrap_or_default(),
            mode: i.mode.to_string(),
            persistence: i.persistence.to_string(),
            uuid: i.uuid,
            format_version: i.format_version,
            pool_size: g.pool_size,
            block_size: crate::pool::layout::BLOCK,
            data_blocks: g.data_blocks,
            max_objects: g.objtab_slots,
            max_extents: g.exttab_slots,
            replayed_transaction: i.replayed_transaction,
            previous_shutdown_clean: i.previous_shutdown_clean,
            server_version: env!("CARGO_PKG_VERSION").into(),
            rdma: Some({
                let r = self.0.rdma.status();
                pb::RdmaInfo {
                    state: r.state.into(),
                    detail: r.detail.clone(),
                    endpoint: r.endpoint.clone(),
                    keys: r.keys.into(),
                    device: r.device.clone(),
                }
            }),
            nbd_endpoint: self.0.nbd_endpoint.clone(),
        })
    }
}

/// The `Sessions` service.
#[derive(Clone)]
pub struct SessionsService(pub Shared);

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SessionEvent, Status>> + Send>>;

fn event(kind: Event) -> Result<pb::SessionEvent, Status> {
    Ok(pb::SessionEvent { kind: Some(kind) })
}

#[tonic::async_trait]
impl Sessions for SessionsService {
    type OpenStream = EventStream;

    async fn open(&self, req: Request<Streaming<pb::SessionRequest>>) -> Result<Response<Self::OpenStream>, Status> {
        api(async {
            // Who is at the other end: an address, or the admin socket's local user.
            let peer: Option<std::sync::Arc<str>> = match req.extensions().get::<crate::net::ConnInfo>() {
                Some(c) if c.local.is_some() => c.local.as_ref().map(|l| match l.pid {
                    Some(pid) => format!("unix:uid={},pid={pid}", l.uid).into(),
                    None => format!("unix:uid={}", l.uid).into(),
                }),
                _ => req.remote_addr().map(|a| a.to_string().into()),
            };
            let owner = caller(&req)?.owner();
            let mut inbound = req.into_inner();
            let ttl = self.0.sessions.ttl();
            let first = tokio::time::timeout(ttl, inbound.message())
                .await
                .map_err(|_| ApiError::TooSlow("no OpenSession within the session TTL"))??
                .ok_or(ApiError::BadStream("session stream closed before OpenSession"))?;
            let Some(Req::Open(open)) = first.kind else {
                return Err(ApiError::BadStream("the first message of a session stream must be OpenSession"));
            };
            let open = OpenSession::try_from(open)?;
            let (tx, rx) = mpsc::channel(64);
            let stop = self.0.draining.child_token();
            let sessions = &self.0.sessions;
            // The secret goes out once, with a new session; a resuming client has it.
            let (id, generation, secret) = match open.resume {
                Some(id) => (id, sessions.resume(id, &owner, peer, tx.clone(), stop.clone())?, None),
                None => {
                    let (id, generation, secret) =
                        sessions.open(&owner, open.client_name, peer, tx.clone(), stop.clone())?;
                    (id, generation, Some(secret))
                }
            };
            let opened = pb::SessionOpened {
                session_id: id.to_string(),
                ttl_ms: ttl.as_millis() as u64,
                keepalive_interval_ms: self.0.cfg.keepalive_interval().as_millis() as u64,
                session_secret: secret.map(|s| s.expose_hex()).unwrap_or_default(),
            };
            let _ = tx.send(event(Event::Opened(opened))).await;
            let shared = self.0.clone();
            tokio::spawn(
                serve_stream(shared, id, generation, inbound, tx, stop)
                    .instrument(info_span!("session", session = %id)),
            );
            Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Self::OpenStream))
        })
        .await
    }
}

/// Read keepalives until the stream ends, the client closes, or the session is ended.
async fn serve_stream(
    shared: Shared,
    id: SessionId,
    generation: u64,
    mut inbound: Streaming<pb::SessionRequest>,
    tx: mpsc::Sender<Result<pb::SessionEvent, Status>>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = inbound.message() => m,
        };
        match msg {
            Ok(Some(pb::SessionRequest { kind: Some(Req::Keepalive(k)) })) => {
                if shared.sessions.touch(id).is_err() {
                    return;
                }
                let _ = tx.send(event(Event::KeepaliveAck(pb::KeepaliveAck { sequence: k.sequence }))).await;
            }
            Ok(Some(pb::SessionRequest { kind: Some(Req::Close(_)) })) => {
                let _ = shared.sessions.end(id, EndReason::Closed);
                return;
            }
            Ok(Some(_)) => {
                let _ = tx.send(Err(ApiError::BadStream("expected Keepalive or CloseSession").into())).await;
                shared.sessions.detach(id, generation);
                return;
            }
            Ok(None) | Err(_) => {
                shared.sessions.detach(id, generation);
                return;
            }
        }
    }
}

/// The `Admin` service.
#[derive(Clone)]
pub struct AdminService(pub Shared);

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        api(async {
            let sessions = self
                .0
                .sessions
                .list()
                .into_iter()
                .map(|s| pb::SessionInfo {
                    session_id: s.id.to_string(),
                    principal: s.principal.to_string(),
                    client_name: s.client_name,
                    peer: s.peer.as_deref().unwrap_or_default().to_string(),
                    opened_unix_ms: s.opened.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                    idle_ms: s.idle.as_millis() as u64,
                    connected: s.connected,
                })
                .collect();
            Ok(Response::new(pb::ListSessionsResponse { sessions }))
        })
        .await
    }

    async fn evict_session(
        &self,
        req: Request<pb::EvictSessionRequest>,
    ) -> Result<Response<pb::EvictSessionResponse>, Status> {
        api(async {
            let r = req.into_inner();
            let id: SessionId = r.session_id.parse()?;
            info!(session = %id, reason = %r.reason, "evicting session");
            self.0.sessions.end(id, EndReason::Evicted)?;
            Ok(Response::new(pb::EvictSessionResponse {}))
        })
        .await
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        api(async {
            let r = req.into_inner();
            info!(lease = r.lease_id, immediate = r.immediate, "administrator revoke");
            self.0.leases.admin_revoke(r.lease_id, r.immediate).await?;
            Ok(Response::new(pb::RevokeLeaseResponse {}))
        })
        .await
    }
}
