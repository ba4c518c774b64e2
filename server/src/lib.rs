//! rdaxd — the rdax daemon library.
//!
//! All daemon logic lives here; `main` stays thin. Today the library holds the pool engine
//! ([`pool`]): mapping a pmem region, the on-media format, the redo journal, the extent
//! allocator and the object operations. The control plane, leases and data planes build on it.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod pool;
