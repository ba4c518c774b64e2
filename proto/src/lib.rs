//! rdax wire types: the `rdax.v1` gRPC protocol ([`pb`]) and the validated domain types
//! built from it on receipt ([`model`]).
//!
//! Validation happens once, where a message is received: `TryFrom<pb::X>` for the domain
//! type returns a [`model::ProtocolError`], which maps to `InvalidArgument` in exactly one
//! place (`From<ProtocolError> for tonic::Status`).

pub mod busy_poll;
pub mod cluster;
pub mod credential;
pub mod dataplane;
pub mod model;
pub mod paths;
pub mod rdma;
pub mod tls_record;

/// Generated protobuf messages, clients and servers.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("rdax.v1");
}

/// The test-only `rdax.testing.v1` service (failpoints, audits). Only daemons built with the
/// `testing` feature serve it.
#[allow(missing_docs, clippy::all)]
pub mod testing_pb {
    tonic::include_proto!("rdax.testing.v1");
}

/// The protocol package.
pub const PACKAGE: &str = "rdax.v1";

/// Encoded `FileDescriptorSet` of the protocol, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rdax_descriptor.bin"));
