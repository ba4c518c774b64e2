//! The test-only `rdax.testing.v1.Testing` service: failpoints and audits over gRPC, so that
//! real-process tests can pause the daemon at a chosen step. Compiled only with `testing`.

use rdax_proto::testing_pb::{self as tpb, testing_server::Testing};
use tonic::{Request, Response, Status};

use super::Shared;
use super::status::{ApiError, api};

struct TestingService(Shared);

/// The service, for the router.
pub(super) fn service(shared: Shared) -> tpb::testing_server::TestingServer<impl Testing> {
    tpb::testing_server::TestingServer::new(TestingService(shared))
}

#[tonic::async_trait]
impl Testing for TestingService {
    async fn set_failpoint(
        &self,
        req: Request<tpb::SetFailpointRequest>,
    ) -> Result<Response<tpb::SetFailpointResponse>, Status> {
        api(async {
            let r = req.into_inner();
            crate::failpoint::set(&r.name, &r.action).map_err(|_| ApiError::BadStream("bad failpoint action"))?;
            tracing::info!(name = %r.name, action = %r.action, "failpoint set");
            Ok(Response::new(tpb::SetFailpointResponse {}))
        })
        .await
    }

    async fn list_failpoints(
        &self,
        _: Request<tpb::ListFailpointsRequest>,
    ) -> Result<Response<tpb::ListFailpointsResponse>, Status> {
        let failpoints = crate::failpoint::list()
            .into_iter()
            .map(|s| tpb::Failpoint { name: s.name, action: s.action, hits: s.hits, paused: s.paused })
            .collect();
        Ok(Response::new(tpb::ListFailpointsResponse { failpoints }))
    }

    async fn audit(&self, _: Request<tpb::AuditRequest>) -> Result<Response<tpb::AuditResponse>, Status> {
        api(async {
            let leases = self.0.leases.clone();
            let problems = self.0.blocking(move |_| leases.audit()).await?;
            let gate = &self.0.gate;
            Ok(Response::new(tpb::AuditResponse {
                problems,
                layout_changes: gate.count(crate::gate::Work::LayoutChange) as u64,
                inside: gate.describe(),
            }))
        })
        .await
    }
}
