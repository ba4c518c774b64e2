//! The NBD server: rdax volumes as network block devices for qemu, libnbd (`nbdcopy`,
//! `nbdinfo`, fio's `nbd` engine) and the kernel's `nbd-client`.
//!
//! The protocol is NetworkBlockDevice/nbd `doc/proto.md`, implemented here rather than taken
//! from a crate: it is small, and what matters is how requests meet leases (`conn.rs`), which
//! no crate would do for us. Fixed newstyle negotiation only (`negotiate.rs`); structured
//! replies; READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with `NO_HOLE`), DISC, FUA and
//! BLOCK_STATUS over `base:allocation`; multi-conn. Block sizes: any byte alignment works,
//! 4 KiB is preferred, payloads are at most [`MAX_PAYLOAD`].
//!
//! NBD has no credential of its own, so every client of the listener acts as one configured
//! principal (`nbd.principal`), or, with `nbd.tls` and client certificates, as the principal
//! its certificate's Common Name names: it sees the volumes that principal may read, writes
//! those it may write, and gets a read-only export where it may only read. With `nbd.tls`
//! every client must start TLS (`NBD_OPT_STARTTLS`) before anything else. The listener is bounded
//! like the others: a connection cap (total and per source), accept back-off, a handshake
//! timeout, an idle timeout and a bound on every socket wait.

mod conn;
pub mod export;
mod io;
mod negotiate;
pub mod poll;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

pub use export::{Deps, Registry};

/// The largest READ or WRITE payload (the protocol's recommended ceiling, 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Timings of the NBD listener.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The whole handshake.
    pub handshake: Duration,
    /// A connection with no request for this long is closed.
    pub idle: Duration,
    /// Each socket wait within a request.
    pub stall: Duration,
    /// How long a request waits for the volume's lease (while it is being re-acquired).
    pub lease_wait: Duration,
    /// How long a hot connection busy-polls for its next request (zero: never;
    /// [`crate::busy_poll`]).
    pub busy_poll: Duration,
}

/// The NBD server of one daemon.
pub struct NbdServer {
    /// What exports use.
    pub deps: Deps,
    /// The exports.
    pub registry: Arc<Registry>,
    /// The credential check (for `nbd.principal`'s rights, reloadable).
    pub auth: crate::grpc::Auth,
    /// The principal every client acts as; `None`: each client certificate names its own.
    pub principal: Option<String>,
    /// TLS, required of every client (`nbd.tls`).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Timings.
    pub timing: Timing,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").field("principal", &self.principal).field("timing", &self.timing).finish()
    }
}

impl NbdServer {
    /// Accept connections until `cancel`, at most `cap` at a time and `per_source` from one
    /// address.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        cap: usize,
        per_source: usize,
        cancel: CancellationToken,
    ) {
        let mut acceptor = crate::net::Acceptor::new(listener, cap, per_source, "nbd");
        while let Some((stream, peer, permit)) = acceptor.accept(&cancel).await {
            let srv = self.clone();
            let c = cancel.clone();
            tokio::spawn(
                async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    match srv.connection(stream, &c).await {
                        Ok(()) => debug!("NBD connection closed"),
                        Err(e) => info!(error = %e, "NBD connection ended"),
                    }
                }
                .instrument(info_span!("nbd", peer = %peer)),
            );
        }
    }

    async fn connection(&self, stream: tokio::net::TcpStream, cancel: &CancellationToken) -> std::io::Result<()> {
        use negotiate::{Outcome, TlsState};
        let handshake = self.timing.handshake;
        let mut io = io::Io::new(stream, self.timing.stall);
        let first = tokio::time::timeout(handshake, async {
            let Some(no_zeroes) = self.greet(&mut io).await? else { return Ok((Outcome::Closed, false)) };
            let (state, principal) = match &self.tls {
                Some(_) => (TlsState::Required, None),
                None => match self.named_principal() {
                    Some(p) => (TlsState::Off, Some(p)),
                    None => return Ok((Outcome::Closed, no_zeroes)),
                },
            };
            let o = self.haggle(&mut io, principal.as_ref(), state, no_zeroes).await?;
            Ok::<_, std::io::Error>((o, no_zeroes))
        });
        let (outcome, no_zeroes) = match first.await {
            Ok(r) => r?,
            Err(_) => {
                info!(timeout = ?handshake, "NBD handshake timed out");
                return Ok(());
            }
        };
        match outcome {
            Outcome::Closed => Ok(()),
            Outcome::Go(n) => self.transmit(io, n, cancel).await,
            Outcome::StartTls => {
                if io.buffered() > 0 {
                    info!("NBD client sent data before the TLS handshake; closing");
                    return Ok(());
                }
                let tls = self.tls.clone().expect("STARTTLS is accepted only with TLS configured");
                let (s, cn) = match tls.accept_nbd(io.into_inner()).await {
                    Ok(r) => r,
                    Err(e) => {
                        info!(error = %e, "NBD TLS handshake failed");
                        return Ok(());
                    }
                };
                let principal = match (&self.principal, &cn) {
                    (Some(_), _) => self.named_principal(),
                    (None, Some(cn)) => self.auth.principals().by_common_name(cn),
                    (None, None) => None,
                };
                let Some(principal) = principal else {
                    info!(
                        common_name = cn.as_deref().unwrap_or("-"),
                        "NBD client certificate names no principal; closing"
                    );
                    return Ok(());
                };
                let mut io = io::Io::new(s, self.timing.stall);
                let again =
                    tokio::time::timeout(handshake, self.haggle(&mut io, Some(&principal), TlsState::On, no_zeroes));
                match again.await {
                    Ok(Ok(Outcome::Go(n))) => self.transmit(io, n, cancel).await,
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        info!(timeout = ?handshake, "NBD handshake timed out");
                        Ok(())
                    }
                }
            }
        }
    }

    /// `nbd.principal`, looked up now (principals reload on SIGHUP).
    fn named_principal(&self) -> Option<Arc<crate::auth::Principal>> {
        let name = self.principal.as_deref()?;
        let p = self.auth.principals().by_name(name);
        if p.is_none() {
            warn!(principal = %name, "nbd.principal is not a configured principal; refusing NBD clients");
        }
        p
    }

    async fn transmit<S: crate::dataplane::DpStream>(
        &self,
        mut io: io::Io<S>,
        n: negotiate::Negotiated,
        cancel: &CancellationToken,
    ) -> std::io::Result<()> {
        info!(volume = %n.attached.export.key, writable = n.writable, size = n.size, structured = n.structured, "NBD client attached");
        let mut served = conn::Served {
            n,
            gate: &self.deps.gate,
            wait: self.timing.lease_wait,
            idle: self.timing.idle,
            cancel,
            busy: crate::busy_poll::BusyPoll::new(self.timing.busy_poll, &crate::busy_poll::SHARED, &poll::POLLS),
        };
        struct Counted;
        impl Drop for Counted {
            fn drop(&mut self) {
                crate::metrics::METRICS.nbd_connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        crate::metrics::METRICS.nbd_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _counted = Counted;
        served.run(&mut io).await
    }
}
