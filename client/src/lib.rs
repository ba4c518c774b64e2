//! rdax client SDK.
//!
//! Connect to `rdaxd`, manage objects, stream data in and out, and keep a session alive.
//!
//! ```no_run
//! use rdax_client::{Client, ConnectOptions};
//!
//! # async fn demo() -> rdax_client::Result<()> {
//! let client = Client::connect("http://127.0.0.1:7400", ConnectOptions::default()).await?;
//! let obj = client.object("demo", "hello")?;
//! obj.create(11).await?;
//! obj.write(0, b"hello world".to_vec(), true).await?;
//! assert_eq!(obj.read(0, 5).await?, b"hello");
//! let session = client.open_session("demo-app").await?;
//! println!("session {} (ttl {:?})", session.id(), session.ttl());
//! session.close().await?;
//! # Ok(()) }
//! ```
//!
//! Errors carry an [`ErrorKind`]; only [`ErrorKind::Unavailable`] is retried, and only for
//! requests that are safe to repeat (reads, stats, lists, resize, punch, flush).

mod client;
#[cfg(feature = "cluster")]
mod cluster;
mod dataplane;
mod error;
mod lease;
mod object;
#[cfg(feature = "rdma")]
mod rdma;
mod session;
mod unix;

pub use client::{Client, ConnectOptions, TlsOptions};
#[cfg(feature = "cluster")]
pub use cluster::{ClusterClient, ClusterOptions, ClusterView, EtcdAccess, PutReceipt};
pub use error::{Error, ErrorKind, Result};
#[cfg(feature = "rdma")]
pub use lease::RdmaBuffer;
pub use lease::{Lease, LeaseMode, LeaseSegment};
pub use object::{Object, Progress};
#[cfg(feature = "cluster")]
pub use rdax_proto::cluster::{NodeRecord, PgMap, pg_of};
pub use rdax_proto::pb;
pub use rdax_proto::pb::LeaseInfo;
pub use rdax_proto::pb::{ObjectStat, PoolInfo, PoolStats, SessionInfo};
pub use session::{LeaseRange, Notices, Session, SessionNotice, SessionOptions, Transport};
