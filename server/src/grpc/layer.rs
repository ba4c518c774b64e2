//! The request gate: every rdax RPC holds a [`GateGuard`] while its handler runs, so shutdown
//! waits for in-flight requests and refuses new ones with `Unavailable`.
//!
//! A tower layer around every service rather than a line in each handler, so that no handler
//! can forget it. Health and reflection pass untouched (probes must keep working while the
//! daemon drains). Once shutdown has begun, only requests that finish work already under way
//! are admitted: `Leases.Release` (a holder returning a recalled lease).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use super::status::ApiError;
use crate::gate::{Gate, Work};

/// RPCs admitted while draining.
const WHILE_DRAINING: &[&str] = &["/rdax.v1.Leases/Release"];

/// Wraps services with the gate.
#[derive(Debug, Clone)]
pub struct GateLayer {
    gate: Gate,
    draining: CancellationToken,
}

impl GateLayer {
    /// Requests enter `gate`; once `draining` is cancelled, new ones are refused.
    pub fn new(gate: Gate, draining: CancellationToken) -> Self {
        Self { gate, draining }
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService { inner, gate: self.gate.clone(), draining: self.draining.clone() }
    }
}

/// See [`GateLayer`].
#[derive(Debug, Clone)]
pub struct GateService<S> {
    inner: S,
    gate: Gate,
    draining: CancellationToken,
}

type BoxFut<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for GateService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFut<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if !path.starts_with("/rdax.v1.") {
            return Box::pin(self.inner.call(req));
        }
        let refuse = self.draining.is_cancelled() && !WHILE_DRAINING.contains(&path);
        let guard = if refuse { None } else { self.gate.enter(Work::Request).ok() };
        let Some(guard) = guard else {
            let status = tonic::Status::from(ApiError::ShuttingDown);
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(guard);
            r
        })
    }
}
