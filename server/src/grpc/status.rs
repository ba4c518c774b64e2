//! The only place where server errors become gRPC status codes.

use tonic::{Code, Status};

use crate::metrics::METRICS;
use crate::pool::ObjError;
use crate::session::SessionError;

impl From<ObjError> for Status {
    fn from(e: ObjError) -> Self {
        let code = match &e {
            ObjError::InvalidName { .. } | ObjError::InvalidArgument(_) => Code::InvalidArgument,
            ObjError::NotFound { .. } => Code::NotFound,
            ObjError::AlreadyExists { .. } => Code::AlreadyExists,
            ObjError::OutOfRange { .. } => Code::OutOfRange,
            ObjError::NoSpace { .. } | ObjError::TooManyObjects { .. } | ObjError::TooFragmented { .. } => {
                Code::ResourceExhausted
            }
        };
        METRICS.error(code);
        Status::new(code, e.to_string())
    }
}

impl From<SessionError> for Status {
    fn from(e: SessionError) -> Self {
        let code = match e {
            SessionError::TooMany { .. } => Code::ResourceExhausted,
            SessionError::NotFound => Code::NotFound,
            SessionError::ShuttingDown => Code::Unavailable,
        };
        METRICS.error(code);
        Status::new(code, e.to_string())
    }
}

/// The daemon is draining: new work is refused with a retryable code.
pub fn shutting_down() -> Status {
    METRICS.error(Code::Unavailable);
    Status::unavailable("rdaxd is shutting down; retry against a running daemon")
}

impl From<crate::lease::LeaseError> for Status {
    fn from(e: crate::lease::LeaseError) -> Self {
        use crate::lease::LeaseError as L;
        let code = match &e {
            L::SessionNotFound | L::NotFound(_) => Code::NotFound,
            L::NotActive(_) => Code::FailedPrecondition,
            L::Breaking { retry_after_ms } => {
                METRICS.error(Code::Unavailable);
                let mut s = Status::new(Code::Unavailable, e.to_string());
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    s.metadata_mut().insert("retry-after-ms", v);
                }
                return s;
            }
            L::DrainTimeout(_) | L::ShuttingDown => Code::Unavailable,
            L::Invalid(_) => Code::InvalidArgument,
            L::Pool(o) => return Status::from(o.clone()),
        };
        METRICS.error(code);
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_error_has_a_deliberate_code() {
        let cases = [
            (ObjError::InvalidArgument("x"), Code::InvalidArgument),
            (ObjError::NotFound { ns: "n".into(), name: "o".into() }, Code::NotFound),
            (ObjError::AlreadyExists { ns: "n".into(), name: "o".into() }, Code::AlreadyExists),
            (ObjError::OutOfRange { offset: 1, len: 2, size: 0, hint: "" }, Code::OutOfRange),
            (ObjError::NoSpace { needed: 1, free: 0 }, Code::ResourceExhausted),
            (ObjError::TooManyObjects { max: 1 }, Code::ResourceExhausted),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
        assert_eq!(Status::from(SessionError::ShuttingDown).code(), Code::Unavailable);
    }
}
