//! The request layer, in front of every service. It authenticates each rdax request and
//! checks the authorization table ([`super::auth`]); a refused request never reaches a
//! handler. Then the request gate: every rdax RPC holds a place in the shutdown gate while its handler runs,
//! so shutdown waits for in-flight requests and refuses new ones with `Unavailable`. The layer
//! also counts each request on its connection until its reply (a stream included) has been
//! sent, which is what the connection's idle timeout looks at (see [`crate::net`]).
//!
//! In a cluster, a request that carries a PG map epoch is checked against what this node knows
//! of the map ([`crate::cluster_view`]) right after authentication.
//!
//! A tower layer around every service rather than a line in each handler, so that no handler
//! can forget it. Health and reflection pass untouched (probes must keep working while the
//! daemon drains). Once shutdown has begun, only requests that finish work already under way
//! are admitted: `Leases.Release` (a holder returning a recalled lease).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use super::auth::Auth;
use super::status::ApiError;
use crate::cluster_view::MapView;
use crate::gate::{Gate, Work};

/// RPCs admitted while draining.
const WHILE_DRAINING: &[&str] = &["/rdax.v1.Leases/Release"];

/// Wraps services with the gate.
#[derive(Debug, Clone)]
pub struct GateLayer {
    gate: Gate,
    draining: CancellationToken,
    auth: Auth,
    view: std::sync::Arc<MapView>,
}

impl GateLayer {
    /// Requests are checked by `auth` (and `view`, when they carry a map epoch) and enter
    /// `gate`; once `draining` is cancelled, new ones are refused.
    pub fn new(gate: Gate, draining: CancellationToken, auth: Auth, view: std::sync::Arc<MapView>) -> Self {
        Self { gate, draining, auth, view }
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = GateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            inner,
            gate: self.gate.clone(),
            draining: self.draining.clone(),
            auth: self.auth.clone(),
            view: self.view.clone(),
        }
    }
}

/// See [`GateLayer`].
#[derive(Debug, Clone)]
pub struct GateService<S> {
    inner: S,
    gate: Gate,
    draining: CancellationToken,
    auth: Auth,
    view: std::sync::Arc<MapView>,
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Every request counts on its connection until its reply is done.
        let conn = req.extensions().get::<crate::net::ConnInfo>().cloned();
        let active = conn.as_ref().map(|c| {
            // tonic's `remote_addr()` reads its own TCP info.
            if let Some(tcp) = c.tcp.clone() {
                req.extensions_mut().insert(tcp);
            }
            c.state.begin()
        });
        let path = req.uri().path().to_string();
        if path.starts_with("/rdax.") {
            match self.auth.admit(&path, req.headers(), conn.as_ref()) {
                Ok(c) => {
                    req.extensions_mut().insert(c);
                }
                Err(e) => {
                    let status = tonic::Status::from(e);
                    return Box::pin(async move { Ok(counted(status.into_http(), active)) });
                }
            }
        }
        let path = path.as_str();
        if !path.starts_with("/rdax.v1.") {
            let fut = self.inner.call(req);
            return Box::pin(async move { fut.await.map(|r| counted(r, active)) });
        }
        if let Err(status) = self.view.check(req.headers()) {
            crate::metrics::METRICS.error(status.code());
            return Box::pin(async move { Ok(counted(status.into_http(), active)) });
        }
        let refuse = self.draining.is_cancelled() && !WHILE_DRAINING.contains(&path);
        let guard = if refuse { None } else { self.gate.enter(Work::Request).ok() };
        let Some(guard) = guard else {
            let status = tonic::Status::from(ApiError::ShuttingDown);
            return Box::pin(async move { Ok(counted(status.into_http(), active)) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            drop(guard);
            r.map(|r| counted(r, active))
        })
    }
}

/// Keep `active` until the reply's body has been sent (or dropped).
fn counted(r: http::Response<Body>, active: Option<crate::net::ActiveGuard>) -> http::Response<Body> {
    match active {
        None => r,
        Some(a) => r.map(|b| Body::new(Counted { inner: b, _active: a })),
    }
}

struct Counted {
    inner: Body,
    _active: crate::net::ActiveGuard,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
