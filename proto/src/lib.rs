//! rdax wire types.
//!
//! This crate will hold the `rdax.v1` protobuf definitions and the validated domain types
//! built from them (`TryFrom` on receipt). The pool engine (issue 2) does not need it yet;
//! the control-plane issue fills it in.

/// The protocol package this crate describes.
pub const PACKAGE: &str = "rdax.v1";
