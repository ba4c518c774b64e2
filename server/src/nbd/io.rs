//! Buffered NBD connection I/O, with payloads moved straight between the socket and the
//! mapping when the connection is plain TCP.
//!
//! Reads go through one buffer: headers (and small payloads) are taken from it, and a large
//! WRITE payload takes what the buffer already holds, then `recv`s the rest directly into the
//! pool. Replies collect in an output buffer that is written out when no further request is
//! already buffered, so a client with many requests in flight gets its replies in few
//! syscalls. Every socket wait is bounded by the stall timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dataplane::DpStream;
use crate::dataplane::io::{PoolAddr, recv_exact, send_exact};
use crate::pool::media::Media;

/// Input buffer size.
const RBUF: usize = 256 << 10;
/// Payloads up to this are copied through the buffers; larger ones move directly.
pub const DIRECT_ABOVE: usize = 64 << 10;
/// Output is written out once it holds this much.
const WBUF_HIGH: usize = 256 << 10;

/// A connection's stream and buffers.
pub struct Io<S> {
    /// The stream.
    pub s: S,
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    /// Output not yet written.
    pub out: Vec<u8>,
    /// Bound on each socket wait.
    pub stall: Duration,
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "the NBD client stalled")
}

impl<S: DpStream> Io<S> {
    /// Wrap `s`.
    pub fn new(s: S, stall: Duration) -> Self {
        Self {
            s,
            rbuf: vec![0u8; RBUF].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            out: Vec::with_capacity(WBUF_HIGH),
            stall,
        }
    }

    /// The stream (for a TLS upgrade; nothing may be buffered).
    pub fn into_inner(self) -> S {
        self.s
    }

    /// Bytes read from the socket and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.rend - self.rpos
    }

    /// Make room at the end of the input buffer.
    fn compact(&mut self) {
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
        } else if self.rpos > RBUF / 2 {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        self.compact();
        let n = self.s.read(&mut self.rbuf[self.rend..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.rend += n;
        Ok(())
    }

    /// Read until at least `n` bytes are buffered (`n` at most half the buffer), without a
    /// bound (the caller's idle timer is one). Cancel-safe: nothing is consumed, and bytes
    /// read stay buffered.
    pub async fn fill_to(&mut self, n: usize) -> std::io::Result<()> {
        while self.buffered() < n {
            self.fill().await?;
        }
        Ok(())
    }

    /// Busy-poll the socket for up to `window` without yielding (see [`crate::busy_poll`]),
    /// buffering what arrives. `None` when the connection is not plain TCP (nothing is polled
    /// then). An EOF or error also ends the poll (`Ready`/`Arrived`): the next read meets it
    /// again. Called with less than a request header buffered.
    pub fn poll_fill(&mut self, window: Duration) -> Option<crate::busy_poll::Polled> {
        use std::os::fd::AsFd;
        self.compact();
        let tcp = self.s.raw()?;
        let room = &mut self.rbuf[self.rend..];
        let poll = || {
            if !rdax_proto::busy_poll::readable_now(tcp.as_fd())? {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            super::poll::recv_now(tcp, room)
        };
        let r = rdax_proto::busy_poll::spin(window, poll);
        if let Some((Ok(n), _)) = r {
            self.rend += n;
        }
        Some(crate::busy_poll::Polled::of(r.map(|(_, first)| first)))
    }

    /// Take `dst.len()` buffered bytes (the caller checked [`Io::buffered`]).
    pub fn take(&mut self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.rbuf[self.rpos..self.rpos + dst.len()]);
        self.rpos += dst.len();
    }

    /// Fill `dst`; each wait bounded by the stall timeout.
    pub async fn read_exact(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            if self.buffered() == 0 {
                if dst.len() - done >= RBUF {
                    // Large: straight into `dst`.
                    let n = tokio::time::timeout(self.stall, self.s.read(&mut dst[done..]))
                        .await
                        .map_err(|_| timed_out())??;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    done += n;
                    continue;
                }
                tokio::time::timeout(self.stall, self.fill()).await.map_err(|_| timed_out())??;
            }
            let n = (dst.len() - done).min(self.buffered());
            dst[done..done + n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
            self.rpos += n;
            done += n;
        }
        Ok(())
    }

    /// Read and drop `len` bytes (a payload that is refused).
    pub async fn skip(&mut self, mut len: usize) -> std::io::Result<()> {
        while len > 0 {
            if self.buffered() == 0 {
                tokio::time::timeout(self.stall, self.fill()).await.map_err(|_| timed_out())??;
            }
            let n = len.min(self.buffered());
            self.rpos += n;
            len -= n;
        }
        Ok(())
    }

    /// Receive `len` payload bytes into the pool at `pool_off`.
    ///
    /// The caller holds a pin over the range for the whole call.
    pub async fn recv_to_pool(&mut self, media: &dyn Media, pool_off: u64, len: usize) -> std::io::Result<()> {
        let take = len.min(self.buffered());
        if take > 0 {
            media.write(pool_off, &self.rbuf[self.rpos..self.rpos + take]);
            self.rpos += take;
        }
        let mut done = take;
        if done == len {
            return Ok(());
        }
        let rest = len - done;
        match (self.s.raw(), media.dma_addr(pool_off + done as u64, rest as u64)) {
            (Some(tcp), Some(a)) if rest > DIRECT_ABOVE => {
                // SAFETY: the range lies inside the mapping (dma_addr checked it) and the
                // caller's pin keeps it from being revoked and reused until we return.
                unsafe { recv_exact(tcp, PoolAddr(a), rest, self.stall).await }
            }
            _ => {
                while done < len {
                    tokio::time::timeout(self.stall, self.fill()).await.map_err(|_| timed_out())??;
                    let n = (len - done).min(self.buffered());
                    media.write(pool_off + done as u64, &self.rbuf[self.rpos..self.rpos + n]);
                    self.rpos += n;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Append `len` bytes of the pool at `pool_off` to the output, or, when large and the
    /// connection is plain TCP, write the output and then send them straight from the
    /// mapping. The caller holds a pin over the range for the whole call.
    pub async fn send_from_pool(&mut self, media: &dyn Media, pool_off: u64, len: usize) -> std::io::Result<()> {
        if len > DIRECT_ABOVE
            && let (Some(_), Some(a)) = (self.s.raw(), media.dma_addr(pool_off, len as u64))
        {
            self.write_out().await?;
            let tcp = self.s.raw().expect("checked");
            // SAFETY: as in `recv_to_pool`: inside the mapping and pinned by the caller.
            return unsafe { send_exact(tcp, PoolAddr(a), len, self.stall).await };
        }
        let at = self.out.len();
        self.out.resize(at + len, 0);
        media.read(pool_off, &mut self.out[at..]);
        self.maybe_write_out().await
    }

    /// Append `len` zero bytes to the output.
    pub async fn send_zeroes(&mut self, len: usize) -> std::io::Result<()> {
        let mut left = len;
        while left > 0 {
            let n = left.min(WBUF_HIGH);
            self.out.resize(self.out.len() + n, 0);
            left -= n;
            self.maybe_write_out().await?;
        }
        Ok(())
    }

    /// Write the output if it has grown large.
    pub async fn maybe_write_out(&mut self) -> std::io::Result<()> {
        if self.out.len() >= WBUF_HIGH { self.write_out().await } else { Ok(()) }
    }

    /// Write all output; bounded by the stall timeout per wait (and the whole at 1 MiB/s).
    pub async fn write_out(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let bound = self.stall + Duration::from_secs_f64(self.out.len() as f64 / (1 << 20) as f64);
        let r = tokio::time::timeout(bound, async {
            self.s.write_all(&self.out).await?;
            self.s.flush().await
        })
        .await
        .map_err(|_| timed_out())?;
        self.out.clear();
        r
    }
}
