//! SDK errors as the `rdax` package's exceptions (defined in Python, `rdax/_errors.py`, so
//! they can also derive from the matching built-in: `InvalidArgument` is a `ValueError`).

use pyo3::prelude::*;
use rdax_client::ErrorKind;

/// The exception class's name for an SDK error kind.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "InvalidArgument",
        ErrorKind::NotFound => "NotFound",
        ErrorKind::AlreadyExists => "AlreadyExists",
        ErrorKind::OutOfRange => "OutOfRange",
        ErrorKind::ResourceExhausted => "ResourceExhausted",
        ErrorKind::Unauthenticated => "Unauthenticated",
        ErrorKind::PermissionDenied => "PermissionDenied",
        ErrorKind::Unavailable => "Unavailable",
        ErrorKind::DeadlineExceeded => "DeadlineExceeded",
        ErrorKind::Connect => "ConnectError",
        ErrorKind::Protocol => "ProtocolError",
        ErrorKind::Io => "IoError",
        ErrorKind::Revoked => "Revoked",
        ErrorKind::Unsupported => "Unsupported",
        ErrorKind::FailedPrecondition => "FailedPrecondition",
        _ => "Error",
    }
}

/// An exception of class `name` (from `rdax._errors`) with `message`.
pub(crate) fn new(py: Python<'_>, name: &str, message: String) -> PyErr {
    let class = py.import("rdax._errors").and_then(|m| m.getattr(name));
    match class {
        Ok(c) => match c.call1((message,)) {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        },
        // Only if the native module was loaded without its package.
        Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
    }
}

/// The SDK error as its `rdax` exception.
pub(crate) fn to_py(py: Python<'_>, e: &rdax_client::Error) -> PyErr {
    new(py, class_name(e.kind()), e.to_string())
}

/// `rdax.InvalidArgument(message)`.
pub(crate) fn invalid(py: Python<'_>, message: impl Into<String>) -> PyErr {
    new(py, "InvalidArgument", message.into())
}

/// A non-negative integer argument as `u64`, else `rdax.InvalidArgument`.
pub(crate) fn non_negative(py: Python<'_>, what: &str, v: i64) -> PyResult<u64> {
    u64::try_from(v).map_err(|_| invalid(py, format!("{what} must not be negative (got {v})")))
}
