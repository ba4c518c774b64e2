//! Errors of the verbs layer.

use std::io;

/// Result of a verbs call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a verbs call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A verb returned an error code.
    #[error("{op}: {source}")]
    Os {
        /// The verb.
        op: &'static str,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// A work request completed with an error status.
    #[error("{op} completed with {}", crate::wc_status_str(*status))]
    Completion {
        /// What the work request did.
        op: &'static str,
        /// `ibv_wc_status`.
        status: u32,
    },
    /// The connection is gone (with why, when known).
    #[error("the RDMA connection is closed ({0})")]
    Closed(String),
    /// rdma_cm reported something other than what was expected.
    #[error("rdma_cm: {0}")]
    Cm(String),
    /// A bounded wait ran out.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

impl Error {
    /// The errno, when a verb failed with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The target refused the access (stale or invalidated key, out of range, wrong QP).
    pub fn is_remote_access(&self) -> bool {
        matches!(self, Error::Completion { status: crate::WC_REM_ACCESS_ERR, .. })
    }
}

/// The error of a verb that returns -1 and sets errno.
pub(crate) fn last(op: &'static str) -> Error {
    Error::Os { op, source: io::Error::last_os_error() }
}

/// Map a return code that is either `-1`+errno or a positive errno (both conventions occur).
pub(crate) fn check(rc: i32, op: &'static str) -> Result<()> {
    match rc {
        0 => Ok(()),
        r if r < 0 => Err(last(op)),
        r => Err(Error::Os { op, source: io::Error::from_raw_os_error(r) }),
    }
}
