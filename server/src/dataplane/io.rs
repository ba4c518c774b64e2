//! Moving bytes between a TCP socket and mapped pool memory without a bounce buffer.
//!
//! `recv(2)`/`send(2)` are given the mapped address directly, so the kernel copies between
//! the socket buffers and pmem once. No Rust reference to pool memory is ever created: other
//! leases' DMA may touch neighbouring bytes concurrently, and the kernel, not Rust code, is
//! what reads or writes the range.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Wait for the socket, at most `stall` (no byte moved for that long: the peer stalled).
async fn progress(stall: Duration, ready: impl std::future::Future<Output = io::Result<()>>) -> io::Result<()> {
    tokio::time::timeout(stall, ready)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer stalled mid-operation"))?
}

/// An address inside the mapped pool, carried across `.await` points.
#[derive(Debug, Clone, Copy)]
pub struct PoolAddr(pub usize);

/// Receive exactly `len` bytes from `s` into `addr..addr + len`; fails if no byte arrives for
/// `stall`.
///
/// # Safety
/// `addr..addr + len` must be inside a live mapping for the duration of the call, and the
/// caller must hold a pin that keeps the range from being reused.
pub async unsafe fn recv_exact(s: &TcpStream, addr: PoolAddr, len: usize, stall: Duration) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        progress(stall, s.readable()).await?;
        let r = s.try_io(Interest::READABLE, || {
            // SAFETY: the destination is inside the caller's pinned mapping (function contract);
            // the kernel writes at most `len - done` bytes there.
            let n = unsafe { libc::recv(s.as_raw_fd(), (addr.0 + done) as *mut libc::c_void, len - done, 0) };
            if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Send exactly `len` bytes from `addr..addr + len` to `s`; fails if no byte leaves for
/// `stall`.
///
/// # Safety
/// As for [`recv_exact`].
pub async unsafe fn send_exact(s: &TcpStream, addr: PoolAddr, len: usize, stall: Duration) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        progress(stall, s.writable()).await?;
        let r = s.try_io(Interest::WRITABLE, || {
            // SAFETY: the source is inside the caller's pinned mapping (function contract);
            // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(s.as_raw_fd(), (addr.0 + done) as *const libc::c_void, len - done, libc::MSG_NOSIGNAL)
            };
            if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
        });
        match r {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn raw_copies_move_every_byte() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        let d2 = data.clone();
        let peer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&d2).await.unwrap();
            let mut back = vec![0u8; d2.len()];
            c.read_exact(&mut back).await.unwrap();
            back
        });
        let (s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; data.len()];
        let a = PoolAddr(buf.as_mut_ptr() as usize);
        // SAFETY: `buf` outlives both calls and is not otherwise accessed meanwhile.
        unsafe {
            recv_exact(&s, a, buf.len(), Duration::from_secs(10)).await.unwrap();
            send_exact(&s, a, buf.len(), Duration::from_secs(10)).await.unwrap();
        }
        assert_eq!(buf, data);
        assert_eq!(peer.await.unwrap(), data);
    }
}
