//! The SDK's error: an opaque value with a [`ErrorKind`] to match on.

use tonic::Code;

/// What went wrong, as something to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A bad name, size or range; fix the request.
    InvalidArgument,
    /// The object or session does not exist.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// A range reaches past the end of an object.
    OutOfRange,
    /// The pool is full or a limit was hit.
    ResourceExhausted,
    /// Missing or wrong token.
    Unauthenticated,
    /// The token is not allowed to do this.
    PermissionDenied,
    /// The daemon is shutting down or unreachable for now: transient.
    Unavailable,
    /// A deadline passed.
    DeadlineExceeded,
    /// The connection could not be made.
    Connect,
    /// The server or the SDK broke a rule of the protocol.
    Protocol,
    /// A local I/O error (reading or writing a file or stream).
    Io,
    /// The lease was recalled, released or revoked: its keys no longer work. Re-acquire.
    Revoked,
    /// This build, host or daemon cannot do what was asked (e.g. RDMA was forced but is not
    /// available).
    Unsupported,
    /// The request conflicts with the state of the range or lease (`FAILED_PRECONDITION`):
    /// another session's exclusive lease holds the range, the lease already ended, or RDMA
    /// keys were asked for without an RDMA connection. The message says which.
    FailedPrecondition,
    /// Anything else the server reported.
    Other,
}

/// An SDK error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// A cluster member's PG map epoch, when it refused a request for its routing.
    node_epoch: Option<u64>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None, node_epoch: None }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// When a cluster member refused the request because of how it was routed (a stale or
    /// too-new PG map epoch, or a node that is not the PG's replica): that member's epoch.
    /// The cluster client refreshes its map and retries.
    pub fn node_epoch(&self) -> Option<u64> {
        self.node_epoch
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable)
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        let kind = match s.code() {
            Code::InvalidArgument => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::OutOfRange => ErrorKind::OutOfRange,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Other,
        };
        // The status message is the whole story; keeping the Status as a source would repeat
        // it in every `{:#}` rendering.
        let message = if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() };
        let node_epoch = s
            .metadata()
            .get(rdax_proto::cluster::EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Self { kind, message, source: None, node_epoch }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Self {
            kind: ErrorKind::Connect,
            message: format!("cannot connect to rdaxd: {e}"),
            source: Some(Box::new(e)),
            node_epoch: None,
        }
    }
}

impl From<rdax_proto::model::ProtocolError> for Error {
    fn from(e: rdax_proto::model::ProtocolError) -> Self {
        Self { kind: ErrorKind::InvalidArgument, message: e.to_string(), source: Some(Box::new(e)), node_epoch: None }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self { kind: ErrorKind::Io, message: e.to_string(), source: Some(Box::new(e)), node_epoch: None }
    }
}

/// SDK result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
