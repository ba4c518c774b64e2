//! The client side of the rdax TCP data plane: HELLO, then one operation at a time per
//! connection; connections are pooled per session and lease.

use std::sync::Mutex;

use rdax_proto::dataplane::{self as wire, Op, Request, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// One connection bound to a session.
#[derive(Debug)]
pub(crate) struct DataConn {
    s: TcpStream,
    next_id: u32,
}

impl DataConn {
    pub async fn connect(addr: &str, session: [u8; 16]) -> Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Connect, format!("cannot reach the data plane at {addr}: {e}")))?;
        s.set_nodelay(true)?;
        let mut c = Self { s, next_id: 1 };
        let hello =
            Request { op: Op::Hello, flags: 0, id: 0, key: session, generation: wire::VERSION, offset: 0, len: 0 };
        c.s.write_all(&hello.encode()).await?;
        c.response(0).await?;
        Ok(c)
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
        self.s.write_all(&r.encode()).await?;
        let len = self.response(r.id).await?;
        if len as usize != buf.len() {
            return Err(Error::new(ErrorKind::Protocol, "short data-plane read"));
        }
        self.s.read_exact(buf).await?;
        Ok(())
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
        self.s.write_all(&r.encode()).await?;
        self.s.write_all(data).await?;
        self.response(r.id).await.map(drop)
    }

    pub async fn flush(&mut self, key: [u8; 16], generation: u64, offset: u64, len: u64) -> Result<()> {
        let r = self.request(Op::Flush, 0, key, generation, offset, len as usize);
        self.s.write_all(&r.encode()).await?;
        self.response(r.id).await.map(drop)
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
    idle: Mutex<Vec<(DataConn, std::time::Instant)>>,
}

impl DataConn {
    /// Still open, with nothing unread (a closed connection reads EOF at once).
    fn usable(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl ConnPool {
    pub fn new(addr: String, session: [u8; 16]) -> Self {
        Self { addr, session, idle: Mutex::new(Vec::new()) }
    }

    pub async fn get(&self) -> Result<DataConn> {
        loop {
            let c = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match c {
                Some((c, since)) if since.elapsed() < POOLED_MAX_IDLE && c.usable() => return Ok(c),
                Some(_) => continue, // stale or closed by the daemon: drop it
                None => return DataConn::connect(&self.addr, self.session).await,
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
