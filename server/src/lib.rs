//! rdaxd — the rdax daemon library.
//!
//! All daemon logic lives here; `main` stays thin. Modules: [`pool`] (the pmem pool engine:
//! mapping, on-media format, journal, allocator, objects), [`lease`] (layout leases, recall,
//! drain), [`dma`] (what every data-plane transport shares), [`dataplane`] (TCP) and
//! [`rdma`], [`gate`] (shutdown drains through it), [`config`], [`session`], [`grpc`] (the
//! control plane and its one error-to-status mapping), [`auth`] (principals, scopes, and the
//! table of what each RPC needs), [`lifecycle`] (startup, ordered
//! shutdown, signals) and [`logging`]. With the `testing` feature, [`failpoint`] too.
#![deny(clippy::undocumented_unsafe_blocks)]

/// Reach a failpoint from async code: `true` if the site must fail. Always `false` (and
/// compiled to nothing) without the `testing` feature.
#[macro_export]
#[doc(hidden)]
macro_rules! failpoint {
    ($name:literal) => {{
        #[cfg(feature = "testing")]
        let fired = $crate::failpoint::hit($name).await;
        #[cfg(not(feature = "testing"))]
        let fired = false;
        fired
    }};
}

/// Reach a failpoint from blocking code (see [`failpoint!`]).
#[macro_export]
#[doc(hidden)]
macro_rules! failpoint_blocking {
    ($name:literal) => {{
        #[cfg(feature = "testing")]
        let fired = $crate::failpoint::hit_blocking($name);
        #[cfg(not(feature = "testing"))]
        let fired = false;
        fired
    }};
}

pub mod admin_socket;
pub mod auth;
pub mod busy_poll;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod cluster_view;
pub mod config;
pub mod dataplane;
pub mod dma;
#[cfg(feature = "testing")]
pub mod failpoint;
pub mod gate;
pub mod grpc;
pub mod lease;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod pool;
pub mod rdma;
pub mod session;
pub mod systemd;
pub mod tls;

pub use lifecycle::run;
