//! rdax client SDK.
//!
//! The gRPC SDK arrives with the control-plane issue. Today the crate only re-exports the
//! protocol package name so that the workspace graph (proto ← client ← cli) is in place.

pub use rdax_proto::PACKAGE;
