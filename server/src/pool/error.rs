//! Pool error types: one enum for opening/formatting, one for object operations.

use std::path::PathBuf;

use super::layout::GeometryError;
use super::media::mapped::MapError;

/// Why a pool could not be opened, created or checked.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Mapping the region failed or was unsafe.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The size does not allow a pool.
    #[error("{path}: {source}")]
    Geometry {
        /// The pool path.
        path: PathBuf,
        /// What is wrong.
        source: GeometryError,
    },
    /// No rdax superblock.
    #[error("{path}: not an rdax pool (no rdax superblock); create one with `rdaxctl mkpool {path} --size <SIZE>`")]
    NotAPool {
        /// The pool path.
        path: PathBuf,
    },
    /// Written by a newer rdax.
    #[error(
        "{path}: pool format version {found} is newer than this build understands (version {supported}); run a newer rdax"
    )]
    NewerVersion {
        /// The pool path.
        path: PathBuf,
        /// Version on media.
        found: u32,
        /// Version this build writes.
        supported: u32,
    },
    /// The device already holds a pool and overwriting was not requested.
    #[error("{path} already holds an rdax pool; pass --force to overwrite it (this destroys its objects)")]
    Exists {
        /// The pool path.
        path: PathBuf,
    },
    /// Metadata is damaged in a way recovery cannot explain.
    #[error(
        "{path}: pool metadata is damaged ({detail}); the pool was not opened. Run `rdaxctl fsck {path}` for a full report"
    )]
    Damaged {
        /// The pool path.
        path: PathBuf,
        /// The first problem found.
        detail: String,
    },
}

/// Why an object operation failed. Every variant leaves the pool unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjError {
    /// A namespace or name is empty, too long or has forbidden characters.
    #[error("invalid {field}: {reason}")]
    InvalidName {
        /// `namespace` or `name`.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// No such object.
    #[error("object {ns}/{name} not found")]
    NotFound {
        /// Namespace.
        ns: String,
        /// Name.
        name: String,
    },
    /// The name is taken.
    #[error("object {ns}/{name} already exists")]
    AlreadyExists {
        /// Namespace.
        ns: String,
        /// Name.
        name: String,
    },
    /// A range reaches past the end of the object (or of u64).
    #[error("range [{offset}, +{len}) is outside the object ({size} bytes){hint}")]
    OutOfRange {
        /// Range start.
        offset: u64,
        /// Range length.
        len: u64,
        /// Object size.
        size: u64,
        /// What to do about it.
        hint: &'static str,
    },
    /// An argument that can never be valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// Not enough free blocks.
    #[error("pool is full: {needed} blocks needed, {free} free")]
    NoSpace {
        /// Blocks needed.
        needed: u64,
        /// Blocks free.
        free: u64,
    },
    /// One request would allocate more than it may.
    #[error(
        "the request would allocate {needed} bytes, over the limit of {cap} (limits.max_alloc_bytes_per_request); \
         lease or write a smaller range"
    )]
    AllocCap {
        /// Bytes the request needs.
        needed: u64,
        /// The cap.
        cap: u64,
    },
    /// Every object slot is used.
    #[error("the pool holds its maximum of {max} objects; format with a larger --max-objects")]
    TooManyObjects {
        /// Capacity.
        max: u64,
    },
    /// The object or pool has run out of extent records.
    #[error("out of extent records ({detail}); free space is too fragmented for this request")]
    TooFragmented {
        /// Which limit was hit.
        detail: String,
    },
    /// The pool was closed (the daemon is shutting down).
    #[error("the pool is closed: the daemon is shutting down")]
    Closed,
    /// The storage under the pool reported an error while persisting: what was written since
    /// the last successful persist may not be durable, and no further change is accepted
    /// until the daemon is restarted (recovery then starts from what the storage holds).
    #[error("the pool's storage failed ({detail}); no change is accepted until rdaxd is restarted")]
    Storage {
        /// What failed.
        detail: String,
        /// The storage ran out of space (ENOSPC or a quota).
        no_space: bool,
    },
}

impl ObjError {
    pub(crate) fn range(offset: u64, len: u64, size: u64, hint: &'static str) -> Self {
        ObjError::OutOfRange { offset, len, size, hint }
    }
}

fn name_error(e: rdax_proto::model::ProtocolError) -> ObjError {
    match e {
        rdax_proto::model::ProtocolError::InvalidName { field, reason } => ObjError::InvalidName { field, reason },
        _ => ObjError::InvalidArgument("invalid object name"),
    }
}

/// Validate a namespace (rules in [`rdax_proto::model::validate_namespace`]).
pub fn validate_ns(ns: &str) -> Result<(), ObjError> {
    rdax_proto::model::validate_namespace(ns).map_err(name_error)
}

/// Validate an object name (rules in [`rdax_proto::model::validate_name`]).
pub fn validate_name(name: &str) -> Result<(), ObjError> {
    rdax_proto::model::validate_name(name).map_err(name_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_with_the_protocol_rules() {
        assert!(validate_ns("tenant-1.prod_a").is_ok());
        assert!(matches!(validate_ns("a/b"), Err(ObjError::InvalidName { field: "namespace", .. })));
        assert!(validate_name("volume 01/ü").is_ok());
        assert!(matches!(validate_name(""), Err(ObjError::InvalidName { field: "name", .. })));
    }
}
