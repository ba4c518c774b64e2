//! `[limits]`: every cap the daemon enforces (invariant 8), in one place. Going over one gives
//! `RESOURCE_EXHAUSTED` (or, for connections, a wait in the backlog or a closed socket), and
//! the message names the key.

use serde::Deserialize;

use super::{Args, ConfigError, SizeValue, parse_size};
use crate::lease::LeaseLimits;

/// `[limits]` as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct LimitsSection {
    /// Most sessions.
    pub max_sessions: Option<usize>,
    /// Most sessions of one principal.
    pub max_sessions_per_principal: Option<usize>,
    /// Most live leases of one principal's sessions.
    pub max_leases_per_principal: Option<usize>,
    /// Largest message.
    pub max_message_bytes: Option<usize>,
    /// Most streams per connection.
    pub max_concurrent_streams: Option<u32>,
    /// Most gRPC connections.
    pub max_grpc_connections: Option<usize>,
    /// Most data-plane connections.
    pub max_data_connections: Option<usize>,
    /// Most connections from one source address, per listener.
    pub max_connections_per_source: Option<usize>,
    /// Most live leases per session.
    pub max_leases_per_session: Option<usize>,
    /// Most leases in all.
    pub max_leases: Option<usize>,
    /// Most segments per lease.
    pub max_segments_per_lease: Option<usize>,
    /// Most keys (RDMA: memory regions) over one session's live leases.
    pub max_keys_per_session: Option<usize>,
    /// Most bytes one session may have registered for RDMA.
    pub max_rdma_bytes_per_session: Option<SizeValue>,
    /// Most bytes one request may allocate.
    pub max_alloc_bytes_per_request: Option<SizeValue>,
}

/// The caps the daemon runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most sessions.
    pub max_sessions: usize,
    /// Most sessions of one principal.
    pub max_sessions_per_principal: usize,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
    /// Most streams per connection.
    pub max_concurrent_streams: u32,
    /// Most gRPC connections.
    pub max_grpc_connections: usize,
    /// Most data-plane connections.
    pub max_data_connections: usize,
    /// Most connections from one source address, on each listener (gRPC, data plane,
    /// metrics, RDMA).
    pub max_connections_per_source: usize,
    /// Lease caps.
    pub leases: LeaseLimits,
    /// Most bytes of the pool one session may have registered with the RDMA device.
    pub max_rdma_bytes_per_session: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self::resolve(&Args::default(), &LimitsSection::default()).expect("the defaults are valid")
    }
}

fn size(v: &Option<SizeValue>, key: &str, default: u64) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(SizeValue::Bytes(b)) => Ok(*b),
        Some(SizeValue::Text(t)) => parse_size(t).map_err(|e| ConfigError::Invalid(format!("{key}: {e}"))),
    }
}

impl Limits {
    /// Flags over the file over the defaults, each checked.
    pub(super) fn resolve(args: &Args, file: &LimitsSection) -> Result<Self, ConfigError> {
        let invalid = ConfigError::Invalid;
        let max_message_bytes = args.max_message_bytes.or(file.max_message_bytes).unwrap_or(4 << 20);
        if !(64 << 10..=256 << 20).contains(&max_message_bytes) {
            return Err(invalid("limits.max_message_bytes must be between 64 KiB and 256 MiB".into()));
        }
        let l = Limits {
            max_sessions: args.max_sessions.or(file.max_sessions).unwrap_or(1024),
            max_sessions_per_principal: file.max_sessions_per_principal.unwrap_or(1024),
            max_message_bytes,
            max_concurrent_streams: args.max_concurrent_streams.or(file.max_concurrent_streams).unwrap_or(256),
            max_grpc_connections: args.max_grpc_connections.or(file.max_grpc_connections).unwrap_or(1024),
            max_data_connections: args.max_data_connections.or(file.max_data_connections).unwrap_or(1024),
            max_connections_per_source: file.max_connections_per_source.unwrap_or(256),
            leases: LeaseLimits {
                per_session: args.max_leases_per_session.or(file.max_leases_per_session).unwrap_or(4096),
                total: args.max_leases.or(file.max_leases).unwrap_or(65_536),
                segments: args.max_segments_per_lease.or(file.max_segments_per_lease).unwrap_or(4096),
                keys_per_session: file.max_keys_per_session.unwrap_or(65_536),
                per_principal: file.max_leases_per_principal.unwrap_or(65_536),
                alloc_per_request: size(
                    &file.max_alloc_bytes_per_request,
                    "limits.max_alloc_bytes_per_request",
                    64 << 30,
                )?,
            },
            max_rdma_bytes_per_session: size(
                &file.max_rdma_bytes_per_session,
                "limits.max_rdma_bytes_per_session",
                1 << 40,
            )?,
        };
        for (name, v) in [
            ("limits.max_sessions", l.max_sessions as u64),
            ("limits.max_sessions_per_principal", l.max_sessions_per_principal as u64),
            ("limits.max_leases_per_principal", l.leases.per_principal as u64),
            ("limits.max_concurrent_streams", u64::from(l.max_concurrent_streams)),
            ("limits.max_grpc_connections", l.max_grpc_connections as u64),
            ("limits.max_data_connections", l.max_data_connections as u64),
            ("limits.max_connections_per_source", l.max_connections_per_source as u64),
            ("limits.max_leases_per_session", l.leases.per_session as u64),
            ("limits.max_leases", l.leases.total as u64),
            ("limits.max_segments_per_lease", l.leases.segments as u64),
            ("limits.max_keys_per_session", l.leases.keys_per_session as u64),
            ("limits.max_rdma_bytes_per_session", l.max_rdma_bytes_per_session),
        ] {
            if v == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
        }
        if l.leases.alloc_per_request < 4096 {
            return Err(invalid("limits.max_alloc_bytes_per_request must be at least one block (4096)".into()));
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Limits, ConfigError> {
        let file: LimitsSection = toml::from_str(toml_text).unwrap();
        Limits::resolve(&Args::default(), &file)
    }

    #[test]
    fn defaults_and_sizes() {
        let d = Limits::default();
        assert_eq!(d.max_connections_per_source, 256);
        assert_eq!(d.leases.keys_per_session, 65_536);
        assert_eq!(d.leases.alloc_per_request, 64 << 30);
        let l = parse("max_rdma_bytes_per_session = \"2G\"\nmax_alloc_bytes_per_request = 1048576\n").unwrap();
        assert_eq!(l.max_rdma_bytes_per_session, 2 << 30);
        assert_eq!(l.leases.alloc_per_request, 1 << 20);
    }

    #[test]
    fn zero_and_nonsense_are_refused_by_name() {
        for (text, key) in [
            ("max_connections_per_source = 0", "limits.max_connections_per_source"),
            ("max_keys_per_session = 0", "limits.max_keys_per_session"),
            ("max_rdma_bytes_per_session = \"lots\"", "limits.max_rdma_bytes_per_session"),
            ("max_alloc_bytes_per_request = 100", "limits.max_alloc_bytes_per_request"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
