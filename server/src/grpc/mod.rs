//! The gRPC control plane: services, authentication and the one error-to-status mapping.

mod auth;
mod control;
pub mod layer;
mod leases;
mod meta;
mod objects;
pub mod status;
#[cfg(feature = "testing")]
mod testing;

use std::sync::Arc;

use rdax_proto::pb::{
    admin_server::AdminServer, leases_server::LeasesServer, objects_server::ObjectsServer, pool_server::PoolServer,
    sessions_server::SessionsServer,
};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub use auth::{Auth, Caller, caller};

use crate::config::Config;
use crate::gate::{Gate, Work};
use crate::pool::Pool;
use crate::session::SessionManager;

/// What every handler shares.
#[derive(Clone)]
pub struct Shared {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Sessions.
    pub sessions: Arc<SessionManager>,
    /// Leases.
    pub leases: Arc<crate::lease::LeaseManager>,
    /// The data plane's address, handed out with every grant.
    pub data_endpoint: String,
    /// The TCP data plane, as the transport of TCP grants.
    pub tcp: Arc<dyn crate::dma::Transport>,
    /// The RDMA transport (or why there is none).
    pub rdma: Arc<crate::rdma::Rdma>,
    /// The NBD exports (empty when the NBD server is off).
    pub nbd: Arc<crate::nbd::Registry>,
    /// The NBD server's address ("" when off).
    pub nbd_endpoint: String,
    /// The credential check (shared, reloadable).
    pub auth: Auth,
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Cancelled when the daemon starts shutting down.
    pub draining: CancellationToken,
    /// Work that shutdown waits for.
    pub gate: Gate,
    /// What this node knows of the cluster's PG map (and its peers, as a PG primary).
    pub view: Arc<crate::cluster_view::MapView>,
}

impl Shared {
    /// Run pool work on a blocking thread. It completes even if the caller is dropped, and
    /// counts in the gate (as part of the request that asked for it, so it is never refused
    /// once the request was admitted).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pool) -> T + Send + 'static,
    ) -> Result<T, status::ApiError> {
        let guard = self.gate.join(Work::PoolJob);
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&pool)
        })
        .await
        .map_err(|_| status::ApiError::Internal("a pool task failed"))
    }
}

/// The rdax services, plus health and reflection (open, so that probes and `grpcurl list`
/// work without credentials; they reveal no data). The request layer in front of them all
/// authenticates every rdax request (see [`layer`]).
pub fn routes(shared: Shared) -> anyhow::Result<Routes> {
    let max = shared.cfg.limits.max_message_bytes;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rdax_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rdax_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut routes = Routes::default();
    routes = routes
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(PoolServer::new(control::PoolService(shared.clone())))
        .add_service(
            ObjectsServer::new(objects::ObjectsService(shared.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(SessionsServer::new(control::SessionsService(shared.clone())))
        .add_service(LeasesServer::new(leases::LeasesService(shared.clone())))
        .add_service(AdminServer::new(control::AdminService(shared.clone())));
    #[cfg(feature = "testing")]
    {
        routes = routes.add_service(testing::service(shared));
    }
    #[cfg(not(feature = "testing"))]
    drop(shared);
    Ok(routes)
}
