//! NBD connections' busy polling ([`crate::busy_poll`]): their counters, and the one
//! non-blocking `recv` a poll reads the request with.

use std::sync::atomic::AtomicU64;

/// NBD polls that found a request (`[0]`) and polls that timed out (`[1]`), process-wide.
pub static POLLS: crate::busy_poll::Counters = [AtomicU64::new(0), AtomicU64::new(0)];

/// One non-blocking `recv` into `buf`, straight on the socket (the runtime's readiness is
/// neither consulted nor changed: it may still report the socket readable, and its next read
/// then meets `WouldBlock` and waits for the next event, as after any spurious wake-up).
pub fn recv_now(s: &tokio::net::TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes, and the
    // kernel writes at most that many; the fd is the stream's own, open while `s` is borrowed.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdax_proto::busy_poll::spin;

    use super::*;

    #[tokio::test]
    async fn recv_now_reads_what_is_there_and_never_blocks() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(recv_now(&s, &mut buf).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        c.write_all(b"hello").await.unwrap();
        let (got, _) = spin(Duration::from_secs(10), || recv_now(&s, &mut buf)).expect("the bytes arrive");
        assert_eq!(&buf[..got.unwrap()], b"hello");
        drop(c);
        let eof = spin(Duration::from_secs(10), || recv_now(&s, &mut buf)).expect("EOF arrives");
        assert_eq!(eof.0.unwrap(), 0, "EOF ends a poll as a zero-length read");
    }
}
