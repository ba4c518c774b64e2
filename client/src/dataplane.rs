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
        Status::BadSession => ErrorKind::NotFound,
        Status::ShuttingDown => ErrorKind::Unavailable,
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
        if rid != id {
            return Err(Error::new(ErrorKind::Protocol, format!("response {rid} for request {id}")));
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

/// Idle connections to one data-plane endpoint for one session.
#[derive(Debug)]
pub(crate) struct ConnPool {
    addr: String,
    session: [u8; 16],
    idle: Mutex<Vec<DataConn>>,
}

impl ConnPool {
    pub fn new(addr: String, session: [u8; 16]) -> Self {
        Self { addr, session, idle: Mutex::new(Vec::new()) }
    }

    pub async fn get(&self) -> Result<DataConn> {
        let c = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match c {
            Some(c) => Ok(c),
            None => DataConn::connect(&self.addr, self.session).await,
        }
    }

    /// Return a connection after a successful operation (a failed one may be out of step).
    pub fn put(&self, c: DataConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < 16 {
            idle.push(c);
        }
    }
}
