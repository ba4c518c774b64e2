//! The client side of the rdax TCP data plane: HELLO, then one operation at a time per
//! connection; connections are pooled per session and lease. When the daemon's grant says
//! `data_tls`, each connection starts with a TLS handshake against the CA of
//! [`crate::TlsOptions`].

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rdax_proto::dataplane::{self as wire, Op, Request, Status};
use rdax_proto::tls_record::{self, TlsConn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::{Error, ErrorKind, Result};

fn status_error(s: Status) -> Error {
    let kind = match s {
        Status::Revoked | Status::UnknownKey | Status::StaleGeneration => ErrorKind::Revoked,
        Status::WrongSession | Status::Mode => ErrorKind::PermissionDenied,
        Status::OutOfRange => ErrorKind::OutOfRange,
        Status::ShuttingDown => ErrorKind::Unavailable,
        Status::StorageFailed => ErrorKind::Other,
        _ => ErrorKind::Protocol,
    };
    Error::new(kind, format!("data plane refused the operation: {s:?}"))
}

/// ALPN of the data plane over TLS.
const DATA_ALPN: &[u8] = b"rdax-data";

/// How to make TLS data-plane connections: the client configuration and the name the
/// daemon's certificate must carry.
#[derive(Clone)]
pub(crate) struct DataTls {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for DataTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataTls").field("name", &self.name).finish_non_exhaustive()
    }
}

impl DataTls {
    /// From the connection's TLS options, for the data endpoint `addr` (`host:port`).
    pub fn new(opts: &crate::TlsOptions, addr: &str) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let bad = |m: String| Error::new(ErrorKind::InvalidArgument, m);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&opts.ca_pem) {
            let c = c.map_err(|e| bad(format!("the CA bundle: {e}")))?;
            roots.add(c).map_err(|e| bad(format!("the CA bundle: {e}")))?;
        }
        // AES-128-GCM first, as the daemon prefers for bulk data.
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);
        // TLS 1.3 only: after the handshake this end seals its own records
        // (`rdax_proto::tls_record`), as the daemon does.
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots);
        let mut cfg = match &opts.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("the client certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(format!("the client key: {e}")))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| bad(format!("the client certificate: {e}")))?
            }
        };
        cfg.alpn_protocols = vec![DATA_ALPN.to_vec()];
        cfg.enable_secret_extraction = true;
        let host = match &opts.domain {
            Some(d) => d.clone(),
            None => addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']).to_string(),
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| bad(format!("data-plane host {host}: {e}")))?;
        Ok(Self { config: Arc::new(cfg), name })
    }
}

/// A data-plane connection: plain TCP or TLS.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.tcp(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How long reaching the data plane may take: TCP connect, TLS handshake and HELLO together.
pub(crate) const CONNECT_BOUND: Duration = Duration::from_secs(10);

/// How long an operation may take, beyond its length at [`MIN_RATE`]: a daemon that stops
/// answering (stopped, or cut off) fails the operation instead of hanging it.
pub(crate) const OP_STALL: Duration = Duration::from_secs(30);

/// The slowest average rate an operation's payload may move at (bytes/s), as the daemon's.
const MIN_RATE: f64 = (1u64 << 20) as f64;

/// Run `f`, or fail with `DeadlineExceeded` after `bound`. The connection it used is then out
/// of step and is dropped, never pooled.
async fn bounded<T>(bound: Duration, what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(bound, f).await.map_err(|_| {
        Error::new(
            ErrorKind::DeadlineExceeded,
            format!("data-plane {what}: no answer within {} s", bound.as_secs_f64()),
        )
    })?
}

/// One connection bound to a session.
#[derive(Debug)]
pub(crate) struct DataConn {
    s: Stream,
    next_id: u32,
    /// Each operation's bound is this plus its length at [`MIN_RATE`].
    stall: Duration,
    /// How long to poll for a reply (zero: never).
    busy_poll: Duration,
    /// The last reply came within `busy_poll` of its request: poll for the next one.
    hot: bool,
    /// Operations since the last poll while cold: every [`PROBE`]th polls all the same (a
    /// daemon that sleeps between requests answers too late to make a connection hot, though
    /// it would answer in time once both sides poll).
    cold: u32,
}

/// A cold connection polls once in this many operations all the same.
const PROBE: u32 = 8;

/// Data-plane operations of this process waiting for their reply now.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One operation counted in [`IN_FLIGHT`] while it lives (dropped with the operation's
/// future, too).
struct InFlight;

impl InFlight {
    fn begin() -> Self {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The process's pollers (every session's data-plane connections): half the cores, at least
/// one.
static SPINNERS: std::sync::LazyLock<rdax_proto::busy_poll::Spinners> =
    std::sync::LazyLock::new(rdax_proto::busy_poll::Spinners::for_host);

impl DataConn {
    /// Connect and HELLO, within `bound`; operations then get `stall` plus their length at
    /// [`MIN_RATE`].
    pub async fn connect(
        addr: &str,
        session: [u8; 16],
        tls: Option<&DataTls>,
        bound: Duration,
        stall: Duration,
    ) -> Result<Self> {
        let s = bounded(bound, "connect", Self::hello(addr, session, tls)).await?;
        Ok(Self { s, next_id: 1, stall, busy_poll: Duration::ZERO, hot: false, cold: 0 })
    }

    /// The request is out: if replies have been coming quickly and no other operation of
    /// this process waits for one (it would have the CPU meanwhile), poll the socket for this
    /// one (up to the window) before the read below may sleep; a reply found that way is read
    /// without a wake-up. Returns when the wait began, to judge the next one by, and the
    /// operation's place in [`IN_FLIGHT`].
    fn await_reply(&mut self) -> (Option<std::time::Instant>, InFlight) {
        let me = InFlight::begin();
        if self.busy_poll.is_zero() {
            return (None, me);
        }
        let sent = std::time::Instant::now();
        let probe = !self.hot && {
            // Saturating: a TLS connection, or one that never finds itself alone, never
            // probes and so never resets the count.
            self.cold = self.cold.saturating_add(1);
            self.cold >= PROBE
        };
        if (self.hot || probe)
            && IN_FLIGHT.load(std::sync::atomic::Ordering::Acquire) == 1
            && let Stream::Plain(tcp) = &self.s
            && let Some(_slot) = SPINNERS.take()
        {
            use std::os::fd::AsFd;
            self.cold = 0;
            self.hot = rdax_proto::busy_poll::until_readable(tcp.as_fd(), self.busy_poll).is_some();
        }
        (Some(sent), me)
    }

    /// The reply is in: hot when it came within the window.
    fn replied(&mut self, sent: Option<std::time::Instant>) {
        if let Some(t) = sent {
            self.hot = t.elapsed() <= self.busy_poll;
        }
    }

    fn op_bound(&self, len: usize) -> Duration {
        self.stall + Duration::from_secs_f64(len as f64 / MIN_RATE)
    }

    async fn hello(addr: &str, session: [u8; 16], tls: Option<&DataTls>) -> Result<Stream> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, format!("cannot reach the data plane at {addr}: {e}")))?;
        tcp.set_nodelay(true)?;
        let s = match tls {
            None => Stream::Plain(tcp),
            Some(t) => {
                let s = tls_record::connect(t.config.clone(), t.name.clone(), tcp).await.map_err(|e| {
                    Error::new(ErrorKind::Connect, format!("TLS handshake with the data plane at {addr}: {e}"))
                })?;
                Stream::Tls(Box::new(s))
            }
        };
        let mut c = Self { s, next_id: 1, stall: Duration::ZERO, busy_poll: Duration::ZERO, hot: false, cold: 0 };
        let hello =
            Request { op: Op::Hello, flags: 0, id: 0, key: session, generation: wire::VERSION, offset: 0, len: 0 };
        c.s.write_all(&hello.encode()).await?;
        c.s.flush().await?;
        c.response(0).await?;
        Ok(c.s)
    }

    async fn response(&mut self, id: u32) -> Result<u32> {
        let mut b = [0u8; wire::RESP_LEN];
        self.s.read_exact(&mut b).await?;
        let (rid, status, len) =
            wire::decode_response(&b).ok_or_else(|| Error::new(ErrorKind::Protocol, "bad data-plane response"))?;
        // A connection-level notice (the session ended, the daemon is stopping) may come
        // instead of the reply, with request id 0: the daemon closes the connection after it.
        if rid != id && !(rid == 0 && status.closes()) {
            return Err(Error::new(ErrorKind::Protocol, format!("response {rid} for request {id}")));
        }
        if status == Status::BadSession {
            // The data plane only serves leases: a session that ended (before this connection's
            // HELLO, or under it) took every lease it held with it.
            return Err(Error::new(ErrorKind::Revoked, "the session ended: its leases were revoked"));
        }
        if status != Status::Ok {
            return Err(status_error(status));
        }
        Ok(len)
    }

    fn request(&mut self, op: Op, flags: u8, key: [u8; 16], generation: u64, offset: u64, len: usize) -> Request {
        self.next_id = self.next_id.wrapping_add(1);
        Request { op, flags, id: self.next_id, key, generation, offset, len: len as u32 }
    }

    pub async fn read(&mut self, key: [u8; 16], generation: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.request(Op::Read, 0, key, generation, offset, buf.len());
        let bound = self.op_bound(buf.len());
        bounded(bound, "read", async {
            self.s.write_all(&r.encode()).await?;
            self.s.flush().await?;
            let (sent, _waiting) = self.await_reply();
            let len = self.response(r.id).await?;
            self.replied(sent);
            if len as usize != buf.len() {
                return Err(Error::new(ErrorKind::Protocol, "short data-plane read"));
            }
            self.s.read_exact(buf).await?;
            Ok(())
        })
        .await
    }

    pub async fn write(
        &mut self,
        key: [u8; 16],
        generation: u64,
        offset: u64,
        data: &[u8],
        persist: bool,
    ) -> Result<()> {
        let flags = if persist { wire::FLAG_PERSIST } else { 0 };
        let r = self.request(Op::Write, flags, key, generation, offset, data.len());
        let bound = self.op_bound(data.len());
        bounded(bound, "write", async {
            self.s.write_all(&r.encode()).await?;
            self.s.write_all(data).await?;
            self.s.flush().await?;
            let (sent, _waiting) = self.await_reply();
            self.response(r.id).await?;
            self.replied(sent);
            Ok(())
        })
        .await
    }

    pub async fn flush(&mut self, key: [u8; 16], generation: u64, offset: u64, len: u64) -> Result<()> {
        let r = self.request(Op::Flush, 0, key, generation, offset, len as usize);
        // Persisting `len` bytes is the daemon's work, bounded like moving them.
        let bound = self.op_bound(len as usize);
        bounded(bound, "flush", async {
            self.s.write_all(&r.encode()).await?;
            self.s.flush().await?;
            self.response(r.id).await.map(drop)
        })
        .await
    }
}

/// A pooled connection older than this is not reused: the daemon closes data-plane
/// connections idle for `dataplane.idle_timeout_ms` (default 120 s), and one it closed while
/// pooled would fail the next operation.
const POOLED_MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Idle connections to one data-plane endpoint for one session.
#[derive(Debug)]
pub(crate) struct ConnPool {
    addr: String,
    session: [u8; 16],
    tls: Option<DataTls>,
    /// [`crate::SessionOptions::busy_poll`].
    busy_poll: Duration,
    idle: Mutex<Vec<(DataConn, std::time::Instant)>>,
}

impl DataConn {
    /// Still open, with nothing unread: the socket itself has nothing to read (a closed
    /// connection has its EOF; one the daemon closed with a notice has that too). Asked of
    /// the socket with `poll(2)`, not of the runtime's readiness, which may be stale.
    fn usable(&self) -> bool {
        use std::os::fd::AsFd;
        matches!(rdax_proto::busy_poll::readable_now(self.s.tcp().as_fd()), Ok(false))
    }
}

impl ConnPool {
    pub fn new(addr: String, session: [u8; 16], tls: Option<DataTls>, busy_poll: Duration) -> Self {
        Self { addr, session, tls, busy_poll, idle: Mutex::new(Vec::new()) }
    }

    pub async fn get(&self) -> Result<DataConn> {
        loop {
            let c = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match c {
                Some((c, since)) if since.elapsed() < POOLED_MAX_IDLE && c.usable() => return Ok(c),
                Some(_) => continue, // stale or closed by the daemon: drop it
                None => {
                    let tls = self.tls.as_ref();
                    let mut c = DataConn::connect(&self.addr, self.session, tls, CONNECT_BOUND, OP_STALL).await?;
                    c.busy_poll = self.busy_poll;
                    return Ok(c);
                }
            }
        }
    }

    /// Return a connection after a successful operation (a failed one may be out of step).
    pub fn put(&self, c: DataConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 16 {
            idle.push((c, std::time::Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The bounds on the SDK's side, against a real socket whose far end goes silent.
    use super::*;
    use tokio::net::TcpListener;

    /// A listener that accepts, answers HELLO if `hello`, reads what it is sent, and never
    /// answers anything else.
    async fn silent(hello: bool) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; wire::REQ_LEN];
            s.read_exact(&mut req).await.unwrap();
            if hello {
                s.write_all(&wire::response(0, Status::Ok, 0)).await.unwrap();
            }
            let mut sink = vec![0u8; 1 << 16];
            while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        addr
    }

    #[tokio::test]
    async fn a_hello_nobody_answers_fails_within_the_connect_bound() {
        let addr = silent(false).await;
        let e = DataConn::connect(&addr, [7; 16], None, Duration::from_millis(200), OP_STALL).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DeadlineExceeded, "{e}");
        assert!(e.to_string().contains("connect"), "{e}");
    }

    #[tokio::test]
    async fn operations_nobody_answers_fail_within_their_bound() {
        for op in ["read", "write", "flush"] {
            let addr = silent(true).await;
            let mut c =
                DataConn::connect(&addr, [7; 16], None, CONNECT_BOUND, Duration::from_millis(100)).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let r = match op {
                "read" => c.read([1; 16], 1, 0, &mut buf).await,
                "write" => c.write([1; 16], 1, 0, &buf, true).await,
                _ => c.flush([1; 16], 1, 0, 4096).await,
            };
            let e = r.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::DeadlineExceeded, "{op}: {e}");
            assert!(e.to_string().contains(op), "{e}");
        }
    }

    /// A pooled connection is usable while the daemon keeps it open and quiet; once the
    /// daemon closes it (idle timeout), or something unread waits on it, it is not. Asked of
    /// the socket: here the runtime never gets to see the close (the test holds its only
    /// thread), so an answer from the runtime's readiness would be stale.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_daemon_closed_or_wrote_to_is_not_reused() {
        for close in [true, false] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let (go, went) = std::sync::mpsc::channel::<()>();
            let daemon = std::thread::spawn(move || {
                use std::io::{Read, Write};
                let (mut s, _) = l.accept().unwrap();
                let mut req = [0u8; wire::REQ_LEN];
                s.read_exact(&mut req).unwrap();
                s.write_all(&wire::response(0, Status::Ok, 0)).unwrap();
                let _ = went.recv();
                if !close {
                    // A notice nobody asked for (as the daemon sends before it closes).
                    s.write_all(&wire::response(0, Status::ShuttingDown, 0)).unwrap();
                    let _ = went.recv();
                }
            });
            let c = DataConn::connect(&addr, [7; 16], None, CONNECT_BOUND, OP_STALL).await.unwrap();
            assert!(c.usable(), "open and quiet");
            go.send(()).unwrap();
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while c.usable() {
                assert!(std::time::Instant::now() < end, "close={close}: still usable after 10 s");
                std::thread::sleep(Duration::from_millis(5)); // the runtime must not run
            }
            drop(go);
            daemon.join().unwrap();
        }
    }

    #[test]
    fn the_bound_grows_with_the_length() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let c = rt.block_on(async {
            let addr = silent(true).await;
            DataConn::connect(&addr, [7; 16], None, CONNECT_BOUND, OP_STALL).await.unwrap()
        });
        assert_eq!(c.op_bound(0), OP_STALL);
        assert_eq!(c.op_bound(16 << 20), OP_STALL + Duration::from_secs(16));
    }
}
