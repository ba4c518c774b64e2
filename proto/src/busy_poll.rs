//! Busy polling of a socket: the primitives the daemon's connections (NBD, the TCP data
//! plane) and the SDK's data-plane connections share.
//!
//! A request/reply exchange at a queue depth of one pays a sleep and a wake-up at each end
//! when the waiting side parks in epoll; polling the socket for a few microseconds instead,
//! the way the kernel's `SO_BUSY_POLL` does for a NIC queue, saves both. Each user decides
//! *when* to poll (see the daemon's `busy_poll` module and the SDK's data-plane connection);
//! this module bounds *how*: a poll lasts at most its window, and at most [`Spinners::max`]
//! threads of a process poll at once.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The poll window the daemon and the SDK use unless told otherwise.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

/// Call `try_read` until it returns something other than `WouldBlock`, or `window` passes.
/// Returns the result that ended the poll and whether it came at the first call (something
/// was there before the poll began), `None` on timeout.
pub fn spin<T>(
    window: Duration,
    mut try_read: impl FnMut() -> std::io::Result<T>,
) -> Option<(std::io::Result<T>, bool)> {
    let end = Instant::now() + window;
    let mut first = true;
    loop {
        match try_read() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => first = false,
            other => return Some((other, first)),
        }
        if Instant::now() >= end {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// Whether `fd` has something to read (data, EOF or an error), without waiting. A
/// zero-timeout `poll(2)`: unlike `recv`, it does not take the socket's lock, so a polling
/// loop does not hold up the kernel delivering the very bytes it waits for.
pub fn readable_now(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, borrowed for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(p.revents != 0) }
}

/// Poll until `fd` is readable or `window` passes: `Some(first)` once readable (`first`: it
/// already was), `None` on timeout. An error of `poll(2)` itself ends the poll as readable, so
/// that the caller's read meets it.
pub fn until_readable(fd: BorrowedFd<'_>, window: Duration) -> Option<bool> {
    let r = spin(window, || match readable_now(fd) {
        Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
        Ok(true) => Ok(()),
        Err(e) => Err(e),
    });
    r.map(|(_, first)| first)
}

/// How many threads may poll at once, and how many do.
#[derive(Debug)]
pub struct Spinners {
    max: usize,
    now: AtomicUsize,
}

impl Spinners {
    /// At most `max` pollers at once.
    pub const fn new(max: usize) -> Self {
        Self { max, now: AtomicUsize::new(0) }
    }

    /// Half this host's cores, at least one: polling never holds every core (or every worker
    /// of a runtime with a worker per core).
    pub fn for_host() -> Self {
        Self::new((std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1))
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place among the pollers, if one is free.
    pub fn take(&self) -> Option<Slot<'_>> {
        self.now
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self))
    }
}

/// A place among the pollers; given back on drop.
#[derive(Debug)]
pub struct Slot<'a>(&'a Spinners);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn spin_ends_on_a_result_or_on_its_window() {
        let mut calls = 0;
        let r = spin(Duration::from_secs(5), || {
            calls += 1;
            if calls < 3 { Err(std::io::ErrorKind::WouldBlock.into()) } else { Ok(7) }
        });
        let (got, first) = r.unwrap();
        assert_eq!((got.unwrap(), first), (7, false));
        assert_eq!(calls, 3);
        let (_, first) = spin(Duration::from_secs(5), || Ok(1)).unwrap();
        assert!(first, "something there at the first look");
        let e = spin(Duration::from_secs(5), || Err::<(), _>(std::io::ErrorKind::ConnectionReset.into()));
        assert_eq!(e.unwrap().0.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset, "errors end the poll");
        let t = Instant::now();
        assert!(spin(Duration::from_millis(20), || Err::<(), _>(std::io::ErrorKind::WouldBlock.into())).is_none());
        assert!(t.elapsed() >= Duration::from_millis(20), "the window is kept");
    }

    #[test]
    fn pollers_are_capped_and_give_their_place_back() {
        let s = Spinners::new(1);
        let held = s.take().expect("a place is free");
        assert!(s.take().is_none(), "one poller at a time");
        drop(held);
        assert!(s.take().is_some(), "the place is free again");
        assert!(Spinners::for_host().max() >= 1);
    }

    #[test]
    fn a_socket_is_readable_once_bytes_or_eof_arrive() {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(!readable_now(s.as_fd()).unwrap(), "nothing sent yet");
        assert_eq!(until_readable(s.as_fd(), Duration::from_millis(5)), None, "a poll times out");
        c.write_all(b"x").unwrap();
        assert!(until_readable(s.as_fd(), Duration::from_secs(10)).is_some(), "readable once the byte arrives");
        assert_eq!(until_readable(s.as_fd(), Duration::from_secs(10)), Some(true), "and at the first look now");
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut &s, &mut b).unwrap();
        drop(c);
        assert!(until_readable(s.as_fd(), Duration::from_secs(10)).is_some(), "EOF is readable");
    }
}
