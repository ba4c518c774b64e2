//! The lease layer's caps (`[limits]` keys) and what each session uses of them.

/// Caps on leases (invariant 8: memory per session and per lease is bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseLimits {
    /// Live leases of one session (`limits.max_leases_per_session`).
    pub per_session: usize,
    /// Leases in the daemon, live or still draining (`limits.max_leases`).
    pub total: usize,
    /// Segments, and so keys, in one lease (`limits.max_segments_per_lease`).
    pub segments: usize,
    /// Keys of one session's live leases (`limits.max_keys_per_session`).
    pub keys_per_session: usize,
    /// Live leases of one principal's sessions (`limits.max_leases_per_principal`).
    pub per_principal: usize,
    /// Bytes one read-write grant may allocate (`limits.max_alloc_bytes_per_request`). Writes
    /// allocate at most one message at a time, so grants are the requests this bounds.
    pub alloc_per_request: u64,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        Self {
            per_session: 4096,
            total: 65_536,
            segments: 4096,
            keys_per_session: 65_536,
            per_principal: 65_536,
            alloc_per_request: 64 << 30,
        }
    }
}

/// What one session's live leases hold, for its caps.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Usage {
    pub(super) leases: usize,
    pub(super) keys: usize,
}
