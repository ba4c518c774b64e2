//! Sessions: opened on a stream, kept alive in the background, resumed after a broken stream.

use std::time::Duration;

use rdax_proto::pb;
use rdax_proto::pb::session_event::Kind as Event;
use rdax_proto::pb::session_request::Kind as Req;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use rdax_proto::model::ObjectKey;

use crate::client::Client;
use crate::dataplane::ConnPool;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{Lease, LeaseInner, LeaseMode};

/// How to open a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Label shown to administrators.
    pub client_name: String,
    /// Do not return recalled leases (only report them), and keep using leases after a
    /// revocation notice. For testing revocation: a real client that does this gets its
    /// leases revoked at the break deadline and its operations refused by the daemon.
    pub ignore_recalls: bool,
    /// Which data plane leases use.
    pub transport: Transport,
    /// Local address for the RDMA connection (default: chosen by routing).
    pub rdma_source: Option<std::net::IpAddr>,
    /// TCP data plane: how long an operation polls its connection for the reply before it
    /// sleeps, while replies keep coming within that long (default 50 µs; zero: never). It
    /// saves a sleep and a wake-up per operation at queue depth 1, for CPU while it polls; at
    /// most half the cores of the process poll at once.
    pub busy_poll: std::time::Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            client_name: String::new(),
            ignore_recalls: false,
            transport: Transport::default(),
            rdma_source: None,
            busy_poll: rdax_proto::busy_poll::DEFAULT_WINDOW,
        }
    }
}

/// Which data plane a session's leases use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// RDMA when this build and the daemon both can and the connection succeeds; else TCP.
    #[default]
    Auto,
    /// Always the TCP data plane.
    Tcp,
    /// Always RDMA; acquiring fails (`ErrorKind::Unsupported`/`Connect`) if it cannot be had.
    Rdma,
}

type Registry = Arc<Mutex<HashMap<u64, Weak<LeaseInner>>>>;

/// A session's notices, taken out of it with [`Session::take_notices`].
#[derive(Debug)]
pub struct Notices(mpsc::Receiver<SessionNotice>);

impl Notices {
    /// The next notice, or `None` once the session is over and all notices were read.
    pub async fn next(&mut self) -> Option<SessionNotice> {
        self.0.recv().await
    }
}

/// What the daemon told the session (or what happened to it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionNotice {
    /// The daemon ended the session (eviction, expiry, shutdown); the text says why.
    Ended(String),
    /// The stream broke and could not be resumed within the TTL.
    Lost(String),
    /// The daemon recalled a lease; unless recalls are ignored, the SDK has already waited for
    /// its in-flight operations and released it. Re-acquire after the layout change.
    LeaseRecalled {
        /// Lease id.
        lease_id: u64,
        /// Why.
        reason: String,
    },
    /// A lease's keys stopped working (not returned in time, expired, or revoked).
    LeaseRevoked {
        /// Lease id.
        lease_id: u64,
        /// Why.
        reason: String,
    },
}

/// An open session. Keepalives are sent in the background; dropping the handle stops them
/// (the daemon then expires the session after its TTL); [`Session::close`] ends it at once.
#[derive(Debug)]
pub struct Session {
    id: String,
    /// The data-plane credential (never logged; `Debug` redacts it).
    secret: rdax_proto::model::SessionSecret,
    ttl: Duration,
    client: Client,
    registry: Registry,
    conns: Mutex<Option<(String, Arc<ConnPool>)>>,
    opts: SessionOptions,
    /// The RDMA connection once made; `Some(None)`: Auto decided on TCP.
    #[cfg(feature = "rdma")]
    rdma: tokio::sync::Mutex<Option<Option<Arc<crate::rdma::RdmaLink>>>>,
    notices: mpsc::Receiver<SessionNotice>,
    close: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

type Outbound = mpsc::Sender<pb::SessionRequest>;

async fn attach(
    client: &Client,
    open: pb::OpenSession,
) -> Result<(Outbound, tonic::Streaming<pb::SessionEvent>, pb::SessionOpened)> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::SessionRequest { kind: Some(Req::Open(open)) }).await.expect("receiver alive");
    let mut c = client.sessions.clone();
    let mut events = c.open(tonic::Request::new(ReceiverStream::new(rx))).await?.into_inner();
    match events.next().await {
        Some(Ok(pb::SessionEvent { kind: Some(Event::Opened(o)) })) => Ok((tx, events, o)),
        Some(Ok(_)) => Err(Error::new(ErrorKind::Protocol, "the first session event was not SessionOpened")),
        Some(Err(s)) => Err(s.into()),
        None => Err(Error::new(ErrorKind::Protocol, "session stream ended before SessionOpened")),
    }
}

/// The session's RDMA connection, as a lease keeps it.
#[cfg(feature = "rdma")]
type LinkHandle = Arc<crate::rdma::RdmaLink>;
#[cfg(not(feature = "rdma"))]
type LinkHandle = std::convert::Infallible;

mod batch;
pub use batch::LeaseRange;

/// A grant not yet handed to the caller: dropped, it gives the lease back.
struct Undelivered {
    grant: Option<pb::LeaseGrant>,
    client: Client,
    session_id: String,
}

impl Undelivered {
    fn take(mut self) -> pb::LeaseGrant {
        self.grant.take().expect("present until taken")
    }
}

impl Drop for Undelivered {
    fn drop(&mut self) {
        let Some(g) = self.grant.take() else { return };
        let (client, session_id) = (self.client.clone(), self.session_id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut c = client.leases.clone();
                let _ = c.release(client.request(pb::ReleaseRequest { session_id, lease_id: g.lease_id })).await;
            });
        }
    }
}

impl Session {
    pub(crate) async fn open(client: Client, opts: SessionOptions) -> Result<Self> {
        let open = pb::OpenSession { client_name: opts.client_name.clone(), resume_session_id: String::new() };
        let (tx, events, opened) = attach(&client, open).await?;
        let ttl = Duration::from_millis(opened.ttl_ms);
        let interval = Duration::from_millis(opened.keepalive_interval_ms.max(10));
        let (ntx, notices) = mpsc::channel(16);
        let (close_tx, close_rx) = oneshot::channel();
        let id = opened.session_id.clone();
        let secret = rdax_proto::model::SessionSecret::from_hex(&opened.session_secret).map_err(|_| {
            Error::new(
                ErrorKind::Protocol,
                "SessionOpened carried no session secret: the daemon is older than this client (data-plane protocol 1)",
            )
        })?;
        let registry: Registry = Arc::default();
        let ctx = Ctx {
            client: client.clone(),
            id: id.clone(),
            ttl,
            registry: registry.clone(),
            notices: ntx,
            ignore_recalls: opts.ignore_recalls,
            pending: Mutex::default(),
        };
        let task = tokio::spawn(keep_alive(ctx, interval, tx, events, close_rx));
        Ok(Self {
            id,
            secret,
            ttl,
            client,
            registry,
            conns: Mutex::new(None),
            opts,
            #[cfg(feature = "rdma")]
            rdma: tokio::sync::Mutex::new(None),
            notices,
            close: Some(close_tx),
            task,
        })
    }

    fn session_bytes(&self) -> Result<[u8; 16]> {
        Ok(self.secret.0)
    }

    #[cfg(feature = "rdma")]
    fn id_bytes(&self) -> Result<[u8; 16]> {
        let id: rdax_proto::model::SessionId = self.id.parse()?;
        Ok(id.0)
    }

    fn conn_pool(&self, endpoint: &str, tls: bool) -> Result<Arc<ConnPool>> {
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ep, p)) = g.as_ref()
            && ep == endpoint
        {
            return Ok(p.clone());
        }
        let tls = match (tls, &self.client.opts.tls) {
            (false, _) => None,
            (true, Some(t)) => Some(crate::dataplane::DataTls::new(t, endpoint)?),
            (true, None) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "the daemon's data plane at {endpoint} speaks TLS: give the CA to trust \
                         (ConnectOptions::tls, rdaxctl --ca)"
                    ),
                ));
            }
        };
        let p = Arc::new(ConnPool::new(endpoint.to_string(), self.session_bytes()?, tls, self.opts.busy_poll));
        *g = Some((endpoint.to_string(), p.clone()));
        Ok(p)
    }

    /// The RDMA connection leases should use, per the session's [`Transport`] (made on first
    /// use), or `None` for TCP.
    #[cfg(feature = "rdma")]
    async fn rdma_link(&self) -> Result<Option<Arc<crate::rdma::RdmaLink>>> {
        if self.opts.transport == Transport::Tcp {
            return Ok(None);
        }
        let mut g = self.rdma.lock().await;
        match g.as_ref() {
            Some(Some(l)) if l.is_open() => return Ok(Some(l.clone())),
            Some(None) if self.opts.transport == Transport::Auto => return Ok(None),
            _ => {}
        }
        let forced = self.opts.transport == Transport::Rdma;
        let info = self.client.info().await?;
        let r = info.rdma.unwrap_or_default();
        let made = if r.state != "serving" {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the daemon serves no RDMA ({}): {}",
                    if r.state.is_empty() { "unknown" } else { &r.state },
                    r.detail
                ),
            ))
        } else {
            crate::rdma::RdmaLink::connect(&r.endpoint, self.opts.rdma_source, self.id_bytes()?, self.session_bytes()?)
                .await
        };
        match made {
            Ok(l) => {
                tracing::debug!(endpoint = %r.endpoint, keys = %r.keys, "session uses RDMA");
                *g = Some(Some(l.clone()));
                Ok(Some(l))
            }
            Err(e) if forced => Err(e),
            Err(e) => {
                tracing::info!(error = %e, "RDMA not used; leases use the TCP data plane");
                *g = Some(None);
                Ok(None)
            }
        }
    }

    #[cfg(not(feature = "rdma"))]
    async fn rdma_link(&self) -> Result<Option<std::convert::Infallible>> {
        if self.opts.transport == Transport::Rdma {
            return Err(Error::new(ErrorKind::Unsupported, "this rdax-client was built without the `rdma` feature"));
        }
        Ok(None)
    }

    /// A buffer for zero-copy RDMA ([`crate::Lease::write_buf`], [`crate::Lease::read_buf`]),
    /// registered on this session's RDMA connection (made now if need be).
    #[cfg(feature = "rdma")]
    pub async fn rdma_buffer(&self, len: usize) -> Result<crate::RdmaBuffer> {
        let link = self
            .rdma_link()
            .await?
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, "this session does not use RDMA"))?;
        Ok(crate::RdmaBuffer { buf: link.register(len)? })
    }

    /// Acquire a lease on `[offset, offset + len)` of an object. A read-write lease allocates
    /// holes first. While the range is being recalled the daemon answers `Unavailable`; this
    /// retries (bounded) like any repeatable request.
    pub async fn acquire(&self, namespace: &str, name: &str, offset: u64, len: u64, mode: LeaseMode) -> Result<Lease> {
        self.acquire_as(namespace, name, offset, len, mode, false).await
    }

    /// Acquire an *exclusive* lease: the daemon first recalls every other lease over the range
    /// (anyone's; revoked at the break deadline if not returned), then refuses any other lease
    /// there until this one ends (`FailedPrecondition`). Refused at once while another
    /// exclusive lease overlaps. Needs the `write` right.
    pub async fn acquire_exclusive(
        &self,
        namespace: &str,
        name: &str,
        offset: u64,
        len: u64,
        mode: LeaseMode,
    ) -> Result<Lease> {
        self.acquire_as(namespace, name, offset, len, mode, true).await
    }

    async fn acquire_as(
        &self,
        namespace: &str,
        name: &str,
        offset: u64,
        len: u64,
        mode: LeaseMode,
        exclusive: bool,
    ) -> Result<Lease> {
        self.acquire_routed(namespace, name, offset, len, mode, exclusive, None).await
    }

    /// [`Session::acquire`] or [`Session::acquire_exclusive`], sending a cluster client's
    /// routing (PG map epoch and PG) with the request.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn acquire_routed(
        &self,
        namespace: &str,
        name: &str,
        offset: u64,
        len: u64,
        mode: LeaseMode,
        exclusive: bool,
        route: Option<crate::client::Route>,
    ) -> Result<Lease> {
        let object = ObjectKey::new(namespace, name)?;
        let pb_mode = match mode {
            LeaseMode::Read => pb::LeaseMode::Read,
            LeaseMode::ReadWrite => pb::LeaseMode::ReadWrite,
        };
        let link = self.rdma_link().await?;
        let transport = if link.is_some() { pb::Transport::Rdma } else { pb::Transport::Tcp };
        // The RPC runs in a task of its own and hands the grant over in a guard: if this
        // future is dropped (a caller's timeout), the grant that still arrives is released at
        // once instead of lingering until its TTL.
        let (tx, rx) = oneshot::channel();
        let (client, session_id, req_object) = (self.client.clone(), self.id.clone(), pb::ObjectRef::from(&object));
        // Only the acquire carries the routing: giving an undelivered grant back must work
        // whatever map the node has by then.
        let routed = client.routed(route);
        tokio::spawn(async move {
            let r = routed
                .retry(|| {
                    let mut c = routed.leases.clone();
                    let r = routed.request(pb::AcquireRequest {
                        session_id: session_id.clone(),
                        object: Some(req_object.clone()),
                        offset,
                        length: len,
                        mode: pb_mode as i32,
                        transport: transport as i32,
                        exclusive,
                    });
                    async move { c.acquire(r).await.map(|r| r.into_inner()) }
                })
                .await;
            let _ = tx.send(r.map(|g| Undelivered { grant: Some(g), client, session_id }));
        });
        let grant = rx.await.map_err(|_| Error::new(ErrorKind::Protocol, "the acquire task ended"))??.take();
        self.deliver(grant, object, offset, len, link)
    }

    /// Turn a grant into the caller's [`Lease`].
    fn deliver(
        &self,
        grant: pb::LeaseGrant,
        object: ObjectKey,
        offset: u64,
        len: u64,
        link: Option<LinkHandle>,
    ) -> Result<Lease> {
        let endpoint = grant
            .data_endpoints
            .first()
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "grant without a data endpoint"))?;
        let ttl = Duration::from_millis(grant.ttl_ms);
        let conns = self.conn_pool(&endpoint, grant.data_tls)?;
        #[allow(unused_mut)]
        let mut inner =
            LeaseInner::from_grant(grant, object, offset, len, self.id.clone(), self.client.clone(), conns)?;
        #[cfg(feature = "rdma")]
        {
            inner.rdma = link;
        }
        #[cfg(not(feature = "rdma"))]
        let _ = link;
        let inner = Arc::new(inner);
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).insert(inner.id, Arc::downgrade(&inner));
        Ok(Lease::new(inner, ttl))
    }

    /// Acquire the same range and mode as `old` again (after a recall and the layout change).
    pub async fn reacquire(&self, old: &Lease) -> Result<Lease> {
        let (offset, len) = old.range();
        let k = old.object();
        self.acquire(&k.namespace, &k.name, offset, len, old.mode()).await
    }

    /// The session id (a secret: it identifies this client to the data plane).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The session's secret: the credential its data-plane connections present in HELLO
    /// (TCP and RDMA). The id is a public handle; this is not. Keep it out of logs and argv.
    pub fn secret(&self) -> rdax_proto::model::SessionSecret {
        self.secret
    }

    /// The daemon's TTL for this session.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The next notice, or `None` once the session is over and all notices were read.
    pub async fn next_notice(&mut self) -> Option<SessionNotice> {
        self.notices.recv().await
    }

    /// Take the notices out of the session, to read them elsewhere (another task or thread)
    /// while the session is shared for acquiring. After this, [`Session::next_notice`]
    /// returns `None`.
    pub fn take_notices(&mut self) -> Notices {
        let (_, closed) = mpsc::channel(1);
        Notices(std::mem::replace(&mut self.notices, closed))
    }

    /// End the session now.
    pub async fn close(mut self) -> Result<()> {
        #[cfg(feature = "rdma")]
        if let Some(Some(l)) = self.rdma.lock().await.take() {
            l.close();
        }
        if let Some(c) = self.close.take() {
            let _ = c.send(());
        }
        (&mut self.task).await.map_err(|e| Error::new(ErrorKind::Other, format!("session task failed: {e}")))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ctx {
    client: Client,
    id: String,
    ttl: Duration,
    registry: Registry,
    notices: mpsc::Sender<SessionNotice>,
    ignore_recalls: bool,
    /// Recall handlers still running: their notices must precede the session's end.
    pending: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Ctx {
    /// Wait (bounded) for running recall handlers, so their notices come first.
    async fn settle(&self) {
        let handles: Vec<_> = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }

    fn lease(&self, id: u64) -> Option<Arc<LeaseInner>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).get(&id).and_then(Weak::upgrade)
    }

    /// A recall: stop new operations, wait for in-flight ones, release, then tell the app.
    fn on_recall(&self, r: pb::LeaseRecall) {
        let notices = self.notices.clone();
        let notice = SessionNotice::LeaseRecalled { lease_id: r.lease_id, reason: r.reason };
        let lease = if self.ignore_recalls { None } else { self.lease(r.lease_id) };
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|h| !h.is_finished());
        pending.push(tokio::spawn(async move {
            if let Some(l) = lease {
                l.quiesce(Duration::from_millis(r.deadline_ms)).await;
                if let Err(e) = l.release_rpc().await {
                    tracing::warn!(lease = l.id, error = %e, "releasing a recalled lease failed");
                }
            }
            let _ = notices.send(notice).await;
        }));
    }

    fn on_revoked(&self, r: pb::LeaseRevoked) {
        // A client that ignores recalls (a test stand-in for an unresponsive one) also keeps
        // using revoked leases: the daemon's own fencing is what must stop it.
        if !self.ignore_recalls
            && let Some(l) = self.lease(r.lease_id)
        {
            l.mark_ended();
        }
        let _ = self.notices.try_send(SessionNotice::LeaseRevoked { lease_id: r.lease_id, reason: r.reason });
    }
}

async fn keep_alive(
    ctx: Ctx,
    interval: Duration,
    mut tx: Outbound,
    mut events: tonic::Streaming<pb::SessionEvent>,
    mut close: oneshot::Receiver<()>,
) {
    let Ctx { client, id, ttl, .. } = &ctx;
    let notices = &ctx.notices;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = &mut close => {
                let _ = tx.send(pb::SessionRequest { kind: Some(Req::Close(pb::CloseSession {})) }).await;
                // Wait (bounded) for the server to acknowledge by ending the stream.
                let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = events.next().await {} }).await;
                return;
            }
            _ = tick.tick() => {
                seq += 1;
                let _ = tx.send(pb::SessionRequest { kind: Some(Req::Keepalive(pb::Keepalive { sequence: seq })) }).await;
            }
            ev = events.next() => match ev {
                Some(Ok(pb::SessionEvent { kind: Some(Event::Closing(c)) })) => {
                    ctx.settle().await;
                    let _ = notices.send(SessionNotice::Ended(c.reason)).await;
                    return;
                }
                Some(Ok(pb::SessionEvent { kind: Some(Event::LeaseRecall(r)) })) => ctx.on_recall(r),
                Some(Ok(pb::SessionEvent { kind: Some(Event::LeaseRevoked(r)) })) => ctx.on_revoked(r),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => match resume(client, id, *ttl).await {
                    Ok((t, e)) => { tx = t; events = e; }
                    Err(e) => {
                        let _ = notices.send(SessionNotice::Lost(e.to_string())).await;
                        return;
                    }
                },
            },
        }
    }
}

/// Reattach within the TTL, backing off between attempts.
async fn resume(client: &Client, id: &str, ttl: Duration) -> Result<(Outbound, tonic::Streaming<pb::SessionEvent>)> {
    let deadline = tokio::time::Instant::now() + ttl;
    let mut delay = Duration::from_millis(50);
    loop {
        let open = pb::OpenSession { client_name: String::new(), resume_session_id: id.into() };
        match attach(client, open).await {
            Ok((tx, events, _)) => return Ok((tx, events)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => return Err(e),
            Err(e) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
