//! The only place where server errors become gRPC status codes.
//!
//! Every handler body returns `Result<_, ApiError>` (run through [`api`]); `ApiError` wraps
//! each area's own error type, and `From<ApiError> for Status` picks the code and counts it in
//! `rdax_grpc_errors_total`. Nothing else in the daemon builds a `Status` from an error.

use rdax_proto::model::ProtocolError;
use tonic::{Code, Status};

use crate::dma::DmaError;
use crate::gate::GateClosed;
use crate::lease::LeaseError;
use crate::metrics::METRICS;
use crate::pool::ObjError;
use crate::session::SessionError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request does not decode into a valid domain value.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The pool refused.
    #[error(transparent)]
    Object(#[from] ObjError),
    /// The lease layer refused.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The session layer refused.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A transport could not make keys.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The daemon is draining: new work is refused with a retryable code.
    #[error("rdaxd is shutting down; retry against a running daemon")]
    ShuttingDown,
    /// A request stream that breaks the protocol's rules.
    #[error("{0}")]
    BadStream(&'static str),
    /// A missing or bad credential.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// An authenticated principal without the right.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request cannot be done in the object's present state (a volume with NBD clients).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Done in part, or not at all, for a reason a retry may cure (a replica that did not
    /// answer a PG primary).
    #[error("{0}")]
    Unavailable(String),
    /// A client that did not send in time.
    #[error("{0}")]
    TooSlow(&'static str),
    /// A status produced by tonic for the request's own stream (a decode error, the peer
    /// cancelling), passed on as it is.
    #[error("{}", .0.message())]
    Stream(Status),
    /// A bug: a task died.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<GateClosed> for ApiError {
    fn from(_: GateClosed) -> Self {
        ApiError::ShuttingDown
    }
}

impl From<crate::auth::Denied> for ApiError {
    fn from(d: crate::auth::Denied) -> Self {
        ApiError::PermissionDenied(d.to_string())
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        ApiError::Stream(s)
    }
}

fn obj_code(e: &ObjError) -> Code {
    match e {
        ObjError::InvalidName { .. } | ObjError::InvalidArgument(_) => Code::InvalidArgument,
        ObjError::NotFound { .. } => Code::NotFound,
        ObjError::AlreadyExists { .. } => Code::AlreadyExists,
        ObjError::OutOfRange { .. } => Code::OutOfRange,
        ObjError::NoSpace { .. }
        | ObjError::AllocCap { .. }
        | ObjError::TooManyObjects { .. }
        | ObjError::TooFragmented { .. } => Code::ResourceExhausted,
        ObjError::Closed => Code::Unavailable,
        ObjError::Storage { no_space: true, .. } => Code::ResourceExhausted,
        ObjError::Storage { no_space: false, .. } => Code::Unavailable,
    }
}

fn lease_code(e: &LeaseError) -> Code {
    use LeaseError as L;
    match e {
        L::SessionNotFound | L::NotFound(_) => Code::NotFound,
        L::NotActive(_) | L::Exclusive(_) => Code::FailedPrecondition,
        L::Breaking { .. } | L::DrainTimeout(_) | L::ShuttingDown | L::Fenced => Code::Unavailable,
        L::Invalid(_) => Code::InvalidArgument,
        L::Injected(_) => Code::Internal,
        L::Limit { .. } => Code::ResourceExhausted,
        L::Pool(o) => obj_code(o),
        L::Dma(d) => dma_code(d),
    }
}

fn dma_code(e: &DmaError) -> Code {
    match e {
        DmaError::Unavailable(_) | DmaError::NotConnected { .. } => Code::FailedPrecondition,
        DmaError::Bind(_) => Code::Unavailable,
        DmaError::Ended => Code::Aborted,
        DmaError::Limit { .. } => Code::ResourceExhausted,
    }
}

impl ApiError {
    /// The status code.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Protocol(_) | ApiError::BadStream(_) => Code::InvalidArgument,
            ApiError::Object(e) => obj_code(e),
            ApiError::Lease(e) => lease_code(e),
            ApiError::Session(e) => match e {
                SessionError::TooMany { .. } | SessionError::TooManyForPrincipal { .. } => Code::ResourceExhausted,
                SessionError::NotFound => Code::NotFound,
                SessionError::NotYours { .. } => Code::PermissionDenied,
                SessionError::ShuttingDown => Code::Unavailable,
            },
            ApiError::Dma(e) => dma_code(e),
            ApiError::ShuttingDown | ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::TooSlow(_) => Code::DeadlineExceeded,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Stream(s) => s.code(),
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        METRICS.error(code);
        let retry = match &e {
            ApiError::Lease(LeaseError::Breaking { retry_after_ms }) => Some(*retry_after_ms),
            _ => None,
        };
        let mut s = match e {
            ApiError::Stream(s) => s,
            e => Status::new(code, e.to_string()),
        };
        if let Some(ms) = retry
            && let Ok(v) = ms.to_string().parse()
        {
            s.metadata_mut().insert("retry-after-ms", v);
        }
        s
    }
}

/// Run a handler body, mapping its error to a status in the one place above.
pub async fn api<T>(body: impl Future<Output = Result<T, ApiError>>) -> Result<T, Status> {
    body.await.map_err(Status::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_deliberate_code() {
        let cases: Vec<(ApiError, Code)> = vec![
            (ObjError::InvalidArgument("x").into(), Code::InvalidArgument),
            (ObjError::NotFound { ns: "n".into(), name: "o".into() }.into(), Code::NotFound),
            (ObjError::AlreadyExists { ns: "n".into(), name: "o".into() }.into(), Code::AlreadyExists),
            (ObjError::OutOfRange { offset: 1, len: 2, size: 0, hint: "" }.into(), Code::OutOfRange),
            (ObjError::NoSpace { needed: 1, free: 0 }.into(), Code::ResourceExhausted),
            (ObjError::AllocCap { needed: 2, cap: 1 }.into(), Code::ResourceExhausted),
            (ObjError::TooManyObjects { max: 1 }.into(), Code::ResourceExhausted),
            (ObjError::Closed.into(), Code::Unavailable),
            (SessionError::ShuttingDown.into(), Code::Unavailable),
            (LeaseError::Breaking { retry_after_ms: 5 }.into(), Code::Unavailable),
            (LeaseError::NotActive(1).into(), Code::FailedPrecondition),
            (LeaseError::Fenced.into(), Code::Unavailable),
            (LeaseError::Exclusive(1).into(), Code::FailedPrecondition),
            (LeaseError::Dma(DmaError::Ended).into(), Code::Aborted),
            (DmaError::Unavailable("x".into()).into(), Code::FailedPrecondition),
            (ProtocolError::Missing("object").into(), Code::InvalidArgument),
            (GateClosed.into(), Code::Unavailable),
            (ApiError::TooSlow("x"), Code::DeadlineExceeded),
            (ApiError::Unavailable("x".into()), Code::Unavailable),
            (Status::cancelled("gone").into(), Code::Cancelled),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
        let s = Status::from(ApiError::from(LeaseError::Breaking { retry_after_ms: 7 }));
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "7");
    }
}
