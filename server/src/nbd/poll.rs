//! Adaptive busy polling of NBD connections.
//!
//! A client that sends its next request soon after each reply (a queue depth of 1, or a burst
//! of them) pays a sleep and a wake-up per request when the connection parks in epoll: the
//! worker sleeps, the request's arrival wakes it (a cross-core wake-up for a client on the
//! same host), and the client's own `send` pays for that wake-up. For such a connection it is
//! cheaper to poll the socket for a few microseconds after the replies have gone out, the way
//! the kernel's `SO_BUSY_POLL` does for a NIC queue.
//!
//! The poll is bounded three ways, so it never becomes a spinning daemon:
//! - it lasts at most `window` (`nbd.busy_poll_us`, default 50 µs; 0 turns it off);
//! - a connection polls only while *hot*: its last request arrived within `window` of the
//!   replies before it, and it served one request since it last waited (a client with one
//!   request in flight). A poll that times out makes it cold; it turns hot again only when a
//!   request arrives that fast after a normal park. An idle connection therefore never polls,
//!   and one whose client pauses costs one window per pause. A client with many requests in
//!   flight does not poll either: when a poll finds a request already there, or a wait
//!   follows a batch, the connection rests from polling, its requests pile up while it
//!   sleeps, and they are served in batches, which polling would break into single requests
//!   (a fifth fewer 4 KiB reads at queue depth 32 when it did);
//! - at most [`Spinners::max`] connections poll at once (half the cores, at least one), so
//!   polling connections never hold every worker of the runtime.
//!
//! Only plain-TCP connections poll (the socket is read without the runtime's readiness);
//! TLS connections always park.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Default poll window.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);

/// Waits a connection rests from polling after a poll found a request already there.
pub const REST: u32 = 16;

/// Polls that found a request (`[0]`) and polls that timed out (`[1]`), process-wide.
pub static POLLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// How many connections may poll at once, and how many do.
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

    /// Half this host's cores, at least one.
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

/// One connection's polling state.
#[derive(Debug)]
pub struct BusyPoll<'a> {
    window: Duration,
    hot: bool,
    /// Waits left without polling (after a poll found a request already there).
    rest: u32,
    spinners: &'a Spinners,
}

impl<'a> BusyPoll<'a> {
    /// A connection's poller (cold until a request arrives within `window` of a park).
    pub fn new(window: Duration, spinners: &'a Spinners) -> Self {
        Self { window, hot: false, rest: 0, spinners }
    }

    /// Whether the next wait should poll first: hot and a poller's place is free. The place
    /// is held for the poll.
    pub fn start(&self) -> Option<Slot<'a>> {
        if !self.hot || self.rest > 0 || self.window.is_zero() {
            return None;
        }
        self.spinners.take()
    }

    /// The window of one poll.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// A poll ended. `Ready`: the client keeps several requests in flight, so the connection
    /// rests from polling for [`REST`] waits (its requests pile up and are served in batches
    /// meanwhile); `Timeout`: it is cold.
    pub fn polled(&mut self, how: Polled) {
        match how {
            Polled::Ready => self.rest = REST,
            Polled::Arrived => {
                POLLS[0].fetch_add(1, Ordering::Relaxed);
            }
            Polled::Timeout => {
                POLLS[1].fetch_add(1, Ordering::Relaxed);
                self.hot = false;
            }
        }
    }

    /// The replies to the `served` requests since the last wait are out, and the connection
    /// waits for its next request (polling first, or not): when to measure the wait from, if
    /// polling is on at all. More than one request served: the client keeps several in
    /// flight, and the connection is cold.
    pub fn waiting(&mut self, served: u64) -> Option<Instant> {
        if served > 1 {
            self.hot = false;
        }
        self.rest = self.rest.saturating_sub(1);
        (!self.window.is_zero()).then(Instant::now)
    }

    /// The next request is here: the connection is hot when it came within the window of
    /// the replies (so a poll that timed out, and the park after it, leave it cold).
    pub fn woke(&mut self, parked: Option<Instant>) {
        if let Some(t) = parked {
            self.hot = t.elapsed() <= self.window;
        }
    }
}

/// How a poll ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Something was there at the first look: the client sent it before it had our replies,
    /// so it keeps more than one request in flight.
    Ready,
    /// Something arrived during the poll.
    Arrived,
    /// Nothing arrived within the window.
    Timeout,
}

/// Poll `try_read` until it returns something other than `WouldBlock`, or `window` passes.
/// Returns the read that ended the poll and whether it was the first, `None` on timeout.
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

/// Whether the socket has something to read (data, EOF or an error), without waiting. A
/// zero-timeout `poll(2)`: unlike `recv`, it does not take the socket's lock, so a poll
/// loop does not hold up the kernel delivering the very request it waits for.
pub fn readable_now(s: &tokio::net::TcpStream) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, borrowed for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(p.revents != 0) }
}

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
    use super::*;

    #[test]
    fn a_connection_polls_only_while_hot() {
        let s = Spinners::new(4);
        let mut p = BusyPoll::new(Duration::from_millis(50), &s);
        assert!(p.start().is_none(), "a new connection is cold");
        // A request that arrives soon after a park makes it hot.
        let parked = p.waiting(1);
        assert!(parked.is_some());
        p.woke(parked);
        assert!(p.start().is_some(), "hot after a quick request");
        // Several requests served in one go: the client keeps many in flight; batches win.
        p.waiting(2);
        assert!(p.start().is_none(), "cold after a batch");
        let parked = p.waiting(1);
        p.woke(parked);
        assert!(p.start().is_some(), "hot again after a single quick request");
        // A poll that finds a request already there: rest from polling for REST waits.
        p.polled(Polled::Ready);
        for _ in 0..REST - 1 {
            assert!(p.start().is_none(), "resting");
            let t = p.waiting(1);
            p.woke(t);
        }
        assert!(p.start().is_none());
        let t = p.waiting(1);
        p.woke(t);
        assert!(p.start().is_some(), "polls again after its rest");
        // A poll that times out makes it cold again.
        p.polled(Polled::Timeout);
        assert!(p.start().is_none(), "cold after a poll that found nothing");
        // A slow request after a park keeps it cold.
        let long_ago = Instant::now().checked_sub(Duration::from_millis(200));
        p.woke(long_ago);
        assert!(p.start().is_none(), "cold after a slow request");
        let parked = p.waiting(1);
        p.woke(parked);
        p.polled(Polled::Arrived);
        assert!(p.start().is_some(), "a poll that found a request keeps it hot");
    }

    #[test]
    fn a_zero_window_never_polls() {
        let s = Spinners::new(4);
        let mut p = BusyPoll::new(Duration::ZERO, &s);
        assert_eq!(p.waiting(1), None, "no clock read when off");
        p.woke(Some(Instant::now()));
        assert!(p.start().is_none());
    }

    #[test]
    fn pollers_are_capped_and_give_their_place_back() {
        let s = Spinners::new(1);
        let mut a = BusyPoll::new(Duration::from_millis(50), &s);
        let mut b = BusyPoll::new(Duration::from_millis(50), &s);
        let (pa, pb) = (a.waiting(1), b.waiting(1));
        a.woke(pa);
        b.woke(pb);
        let held = a.start().expect("a place is free");
        assert!(b.start().is_none(), "one poller at a time");
        drop(held);
        assert!(b.start().is_some(), "the place is free again");
        assert!(Spinners::for_host().max() >= 1);
    }

    #[test]
    fn spin_ends_on_data_or_on_its_window() {
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
        let none = spin(Duration::from_millis(20), || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
        assert!(none.is_none());
        assert!(t.elapsed() >= Duration::from_millis(20), "the window is kept");
    }

    #[tokio::test]
    async fn recv_now_reads_what_is_there_and_never_blocks() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(recv_now(&s, &mut buf).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert!(!readable_now(&s).unwrap(), "nothing sent yet");
        c.write_all(b"hello").await.unwrap();
        spin(Duration::from_secs(10), || {
            if readable_now(&s)? { Ok(()) } else { Err(std::io::ErrorKind::WouldBlock.into()) }
        })
        .expect("readable once the bytes arrive")
        .0
        .unwrap();
        let (got, _) = spin(Duration::from_secs(10), || recv_now(&s, &mut buf)).expect("the bytes arrive");
        assert_eq!(&buf[..got.unwrap()], b"hello");
        drop(c);
        let eof = spin(Duration::from_secs(10), || recv_now(&s, &mut buf)).expect("EOF arrives");
        assert_eq!(eof.0.unwrap(), 0, "EOF ends a poll as a zero-length read");
    }
}
