//! The connection to rdaxd.

use std::future::Future;
use std::time::Duration;

use rdax_proto::model::{ObjectKey, validate_namespace};
use rdax_proto::pb;
use rdax_proto::pb::{
    admin_client::AdminClient, leases_client::LeasesClient, objects_client::ObjectsClient, pool_client::PoolClient,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, ErrorKind, Result};
use crate::object::Object;
use crate::session::{Session, SessionOptions};

/// How to connect.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Bearer token (`authorization: Bearer <token>` on every request).
    pub token: Option<String>,
    /// TLS for `https://` endpoints (required for them), and for a data plane that speaks
    /// TLS (`dataplane.tls`; then also with a `unix:` endpoint).
    pub tls: Option<TlsOptions>,
    /// Bound on establishing the connection.
    pub connect_timeout: Duration,
    /// Bound on each unary request (`None`: no bound).
    pub request_timeout: Option<Duration>,
    /// Extra attempts for a repeatable request that failed with `Unavailable`.
    pub retries: u32,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No secret in a Debug: the token is shown only as present or not.
        f.debug_struct("ConnectOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// TLS material for an `https://` endpoint (PEM).
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// CA certificates to trust: the daemon's certificate must chain to one of them.
    pub ca_pem: Vec<u8>,
    /// Client certificate chain and private key, for a daemon that requires one (mTLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check the daemon's certificate against (default: the endpoint's host).
    pub domain: Option<String>,
}

impl TlsOptions {
    /// Read the CA bundle and, if given, the client certificate and key from files.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> std::io::Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("read {}: {e}", p.display())))
        };
        let identity = match identity {
            Some((c, k)) => Some((read(c)?, read(k)?)),
            None => None,
        };
        Ok(Self { ca_pem: read(ca)?, identity, domain: None })
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            token: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(30)),
            retries: 3,
        }
    }
}

/// Adds the bearer token to every request.
#[derive(Clone, Debug)]
pub(crate) struct Token(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

pub(crate) type Svc = InterceptedService<Channel, Token>;

/// A connection to one rdaxd. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) pool: PoolClient<Svc>,
    pub(crate) objects: ObjectsClient<Svc>,
    pub(crate) sessions: pb::sessions_client::SessionsClient<Svc>,
    pub(crate) admin: AdminClient<Svc>,
    pub(crate) leases: LeasesClient<Svc>,
    pub(crate) opts: ConnectOptions,
    /// The PG map epoch and PG a cluster client routed by: sent with every request.
    pub(crate) route: Option<Route>,
}

/// Routing metadata a cluster client attaches (`rdax-map-epoch`, `rdax-pg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) epoch: u64,
    pub(crate) pg: Option<u32>,
    /// Sent by a PG's primary to the other replicas (`rdax-from-primary`).
    pub(crate) from_primary: bool,
}

impl Client {
    /// Connect to `endpoint`: `http://host:port` (a bare `host:port` means `http://`),
    /// `https://host:port` (with [`ConnectOptions::tls`]), or `unix:PATH` / `unix:///PATH`,
    /// a daemon's admin socket, where root, rdaxd's user and the members of its `admin.group`
    /// are admin without a token.
    pub async fn connect(endpoint: impl AsRef<str>, opts: ConnectOptions) -> Result<Self> {
        let ep = endpoint.as_ref();
        if let Some(path) = crate::unix::socket_path(ep) {
            // TLS options, if any, serve the data plane only (`dataplane.tls`).
            let channel = Endpoint::from_static("http://localhost")
                .connect_timeout(opts.connect_timeout)
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(32 << 20))
                .connect_with_connector(crate::unix::Connector(path.clone()))
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Unavailable, format!("connect to the admin socket {}: {e}", path.display()))
                })?;
            return Self::over(channel, opts);
        }
        let url = if ep.contains("://") { ep.to_string() } else { format!("http://{ep}") };
        let https = url.starts_with("https://");
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("bad endpoint {ep}: {e}")))?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            // Large streamed reads and writes: see the server's window settings.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20));
        match (&opts.tls, https) {
            (Some(t), true) => {
                let mut c = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca_pem));
                if let Some((cert, key)) = &t.identity {
                    c = c.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                if let Some(d) = &t.domain {
                    c = c.domain_name(d.clone());
                }
                endpoint = endpoint
                    .tls_config(c)
                    .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("TLS settings: {e}")))?;
            }
            (None, true) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{ep} is https: give the CA to trust (ConnectOptions::tls, rdaxctl --ca)"),
                ));
            }
            (Some(_), false) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("TLS settings were given but {ep} is not an https:// endpoint"),
                ));
            }
            (None, false) => {}
        }
        let channel = endpoint.connect().await?;
        Self::over(channel, opts)
    }

    fn over(channel: Channel, opts: ConnectOptions) -> Result<Self> {
        let token = match &opts.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::new(ErrorKind::InvalidArgument, "the token must be printable ASCII"))?,
            ),
            None => None,
        };
        let svc = InterceptedService::new(channel, Token(token));
        let max = 256 << 20;
        Ok(Self {
            pool: PoolClient::new(svc.clone()),
            objects: ObjectsClient::new(svc.clone()).max_decoding_message_size(max).max_encoding_message_size(max),
            sessions: pb::sessions_client::SessionsClient::new(svc.clone()),
            admin: AdminClient::new(svc.clone()),
            leases: LeasesClient::new(svc),
            opts,
            route: None,
        })
    }

    /// This connection, sending `route` with every request.
    pub(crate) fn routed(&self, route: Option<Route>) -> Self {
        Self { route, ..self.clone() }
    }

    /// This connection as a PG primary's, for rdaxd itself: every request carries map
    /// `epoch`, `pg` and `rdax-from-primary`, so that a create, resize or delete makes the
    /// replica converge to the primary's state (see `rdax_proto::cluster::FROM_PRIMARY_HEADER`).
    pub fn from_primary(&self, epoch: u64, pg: u32) -> Self {
        self.routed(Some(Route { epoch, pg: Some(pg), from_primary: true }))
    }

    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.opts.request_timeout {
            r.set_timeout(t);
        }
        if let Some(route) = self.route {
            let m = r.metadata_mut();
            m.insert(rdax_proto::cluster::EPOCH_HEADER, route.epoch.into());
            if let Some(pg) = route.pg {
                m.insert(rdax_proto::cluster::PG_HEADER, pg.into());
            }
            if route.from_primary {
                m.insert(rdax_proto::cluster::FROM_PRIMARY_HEADER, tonic::metadata::MetadataValue::from_static("1"));
            }
        }
        r
    }

    /// Run a repeatable request, retrying `Unavailable` with exponential backoff.
    pub(crate) async fn retry<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(s) => {
                    let e = Error::from(s);
                    if !e.is_transient() || attempt >= self.opts.retries {
                        return Err(e);
                    }
                    tracing::debug!(attempt, error = %e, "retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// What the daemon serves.
    pub async fn info(&self) -> Result<pb::PoolInfo> {
        self.retry(|| {
            let mut c = self.pool.clone();
            let r = self.request(pb::InfoRequest {});
            async move { c.info(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Usage figures.
    pub async fn stats(&self) -> Result<pb::PoolStats> {
        self.retry(|| {
            let mut c = self.pool.clone();
            let r = self.request(pb::StatsRequest {});
            async move { c.stats(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// A handle on an object (validates the names; does not contact the server).
    pub fn object(&self, namespace: &str, name: &str) -> Result<Object> {
        Ok(Object::new(self.clone(), ObjectKey::new(namespace, name)?))
    }

    /// One page of a namespace, in name order: the objects and the `after` for the next page.
    pub async fn list(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<pb::ObjectStat>, Option<String>)> {
        validate_namespace(namespace)?;
        let r = self
            .retry(|| {
                let mut c = self.objects.clone();
                let req = self.request(pb::ListRequest {
                    namespace: namespace.into(),
                    after: after.unwrap_or_default().into(),
                    limit,
                });
                async move { c.list(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok((r.objects, (!r.next_after.is_empty()).then_some(r.next_after)))
    }

    /// Every object of a namespace.
    pub async fn list_all(&self, namespace: &str) -> Result<Vec<pb::ObjectStat>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = self.list(namespace, after.as_deref(), 1000).await?;
            all.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(all),
            }
        }
    }

    /// One page of the objects of cluster placement group `pg` (of `pgs`), over every
    /// namespace, strictly after `after` (namespace, name); and whether more follow. What a
    /// cluster member lists when it repairs a PG.
    pub async fn list_pg(
        &self,
        pg: u32,
        pgs: u32,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<(Vec<pb::ObjectStat>, bool)> {
        let (after_namespace, after_name) = after.map(|(a, b)| (a.to_string(), b.to_string())).unwrap_or_default();
        self.retry(|| {
            let mut c = self.objects.clone();
            let req = self.request(pb::ListPgRequest {
                pg,
                pgs,
                after_namespace: after_namespace.clone(),
                after_name: after_name.clone(),
                limit,
            });
            async move { c.list_pg(req).await.map(|r| r.into_inner()) }
        })
        .await
        .map(|r| (r.objects, r.more))
    }

    /// Every object of placement group `pg` (of `pgs`), over every namespace, in (namespace,
    /// name) order.
    pub async fn list_pg_all(&self, pg: u32, pgs: u32) -> Result<Vec<pb::ObjectStat>> {
        let mut all: Vec<pb::ObjectStat> = Vec::new();
        loop {
            let after = all.last().map(|o| (o.namespace.clone(), o.name.clone()));
            let (page, more) =
                self.list_pg(pg, pgs, after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 1000).await?;
            all.extend(page);
            if !more {
                return Ok(all);
            }
        }
    }

    /// Open a session (kept alive in the background until closed or dropped).
    pub async fn open_session(&self, client_name: &str) -> Result<Session> {
        Session::open(self.clone(), SessionOptions { client_name: client_name.into(), ..Default::default() }).await
    }

    /// Open a session with options.
    pub async fn open_session_with(&self, opts: SessionOptions) -> Result<Session> {
        Session::open(self.clone(), opts).await
    }

    /// Leases of one session, or all (administrators) with `None`.
    pub async fn leases(&self, session_id: Option<&str>) -> Result<Vec<pb::LeaseInfo>> {
        self.retry(|| {
            let mut c = self.leases.clone();
            let r = self.request(pb::ListLeasesRequest { session_id: session_id.unwrap_or_default().into() });
            async move { c.list(r).await.map(|r| r.into_inner().leases) }
        })
        .await
    }

    /// Recall a lease now (administrators); revoked if not returned in time. With
    /// `immediate`, revoked at once.
    pub async fn revoke_lease(&self, lease_id: u64, immediate: bool) -> Result<()> {
        let mut c = self.admin.clone();
        c.revoke_lease(self.request(pb::RevokeLeaseRequest { lease_id, immediate })).await?;
        Ok(())
    }

    /// Low level: acquire a lease for a session this client does not hold a [`Session`]
    /// handle for (e.g. one whose RDMA connection another program made with its own verbs
    /// code). Nothing renews or releases it: see [`Client::renew_lease`] and
    /// [`Client::release_lease`]. With `rdma`, the keys are bound to that session's RDMA
    /// connection.
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire_raw(
        &self,
        session_id: &str,
        namespace: &str,
        name: &str,
        offset: u64,
        length: u64,
        mode: crate::LeaseMode,
        rdma: bool,
    ) -> Result<pb::LeaseGrant> {
        let mode = match mode {
            crate::LeaseMode::Read => pb::LeaseMode::Read,
            crate::LeaseMode::ReadWrite => pb::LeaseMode::ReadWrite,
        };
        let transport = if rdma { pb::Transport::Rdma } else { pb::Transport::Tcp };
        let mut c = self.leases.clone();
        let r = self.request(pb::AcquireRequest {
            session_id: session_id.into(),
            object: Some(pb::ObjectRef { namespace: namespace.into(), name: name.into() }),
            offset,
            length,
            mode: mode as i32,
            transport: transport as i32,
            exclusive: false,
        });
        Ok(c.acquire(r).await?.into_inner())
    }

    /// Low level: renew a lease acquired with [`Client::acquire_raw`].
    pub async fn renew_lease(&self, session_id: &str, lease_id: u64) -> Result<()> {
        let mut c = self.leases.clone();
        c.renew(self.request(pb::RenewRequest { session_id: session_id.into(), lease_id })).await?;
        Ok(())
    }

    /// Low level: release a lease acquired with [`Client::acquire_raw`].
    pub async fn release_lease(&self, session_id: &str, lease_id: u64) -> Result<()> {
        let mut c = self.leases.clone();
        c.release(self.request(pb::ReleaseRequest { session_id: session_id.into(), lease_id })).await?;
        Ok(())
    }

    /// Every session (administrators).
    pub async fn sessions(&self) -> Result<Vec<pb::SessionInfo>> {
        self.retry(|| {
            let mut c = self.admin.clone();
            let r = self.request(pb::ListSessionsRequest {});
            async move { c.list_sessions(r).await.map(|r| r.into_inner().sessions) }
        })
        .await
    }

    /// End a session now (administrators).
    pub async fn evict_session(&self, session_id: &str, reason: &str) -> Result<()> {
        let mut c = self.admin.clone();
        let r = self.request(pb::EvictSessionRequest { session_id: session_id.into(), reason: reason.into() });
        c.evict_session(r).await?;
        Ok(())
    }
}
