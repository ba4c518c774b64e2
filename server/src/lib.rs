//! rdaxd — the rdax daemon library.
//!
//! All daemon logic lives here; `main` stays thin. Modules: [`pool`] (the pmem pool engine:
//! mapping, on-media format, journal, allocator, objects), [`config`], [`session`],
//! [`grpc`] (the control plane and its one error-to-status mapping), [`lifecycle`] (startup,
//! ordered shutdown, signals) and [`logging`].
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod dataplane;
pub mod grpc;
pub mod lease;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod pool;
pub mod rdma;
pub mod session;
pub mod systemd;

pub use lifecycle::run;
