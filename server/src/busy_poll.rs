//! When a daemon connection busy-polls for its next request (NBD, the TCP data plane).
//!
//! A client that sends its next request soon after each reply (a queue depth of 1, or a burst
//! of them) pays a sleep and a wake-up per request when the connection parks in epoll: the
//! worker sleeps, the request's arrival wakes it (a cross-core wake-up for a client on the
//! same host), and the client's own `send` pays for that wake-up. For such a connection it is
//! cheaper to poll the socket for a few microseconds after the replies have gone out
//! ([`rdax_proto::busy_poll`]).
//!
//! The poll is bounded three ways, so it never becomes a spinning daemon:
//! - it lasts at most `window` (`nbd.busy_poll_us`, `dataplane.busy_poll_us`; default 50 µs;
//!   0 turns it off);
//! - a connection polls only while *hot*: its last request arrived within `window` of the
//!   replies before it, and it served one request since it last waited (a client with one
//!   request in flight). A poll that times out makes it cold; it turns hot again only when a
//!   request arrives that fast after a normal park. An idle connection therefore never polls,
//!   and one whose client pauses costs one window per pause. A client with many requests in
//!   flight does not poll either: when a poll finds a request already there, or a wait
//!   follows a batch, the connection rests from polling, its requests pile up while it
//!   sleeps, and they are served in batches, which polling would break into single requests
//!   (a fifth fewer 4 KiB NBD reads at queue depth 32 when it did);
//! - a connection polls only while no other connection is serving a request: with work
//!   elsewhere the CPU has something better to do than wait, and a poll would hold up that
//!   work (the SDK's sixteen connections at depth 16 each look like depth 1 to the daemon;
//!   polling them cost a quarter of their 4 KiB operations);
//! - at most [`Spinners::max`] connections poll at once (half the cores, at least one), so
//!   polling connections never hold every worker of the runtime.
//!
//! Only plain-TCP connections poll (the socket is looked at without the runtime's
//! readiness); TLS connections always park.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use rdax_proto::busy_poll::{DEFAULT_WINDOW, Slot, Spinners};

/// The daemon's pollers, NBD and data-plane connections alike: half the cores, at least one.
pub static SPINNERS: LazyLock<Spinners> = LazyLock::new(Spinners::for_host);

/// Connections serving a request now: between its arrival and their wait for the next.
static SERVING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One connection counted in [`SERVING`] while it lives.
#[derive(Debug)]
struct Serving;

impl Serving {
    fn begin() -> Self {
        SERVING.fetch_add(1, Ordering::AcqRel);
        Serving
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits a connection rests from polling after a poll found a request already there.
pub const REST: u32 = 16;

/// Polls that found a request (`[0]`) and polls that timed out (`[1]`).
pub type Counters = [AtomicU64; 2];

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

impl Polled {
    /// From [`rdax_proto::busy_poll::spin`]'s answer: `Some(first)` or `None` on timeout.
    pub fn of(first: Option<bool>) -> Self {
        match first {
            Some(true) => Polled::Ready,
            Some(false) => Polled::Arrived,
            None => Polled::Timeout,
        }
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
    counters: &'static Counters,
    /// Held from a request's arrival to the connection's next wait.
    serving: Option<Serving>,
}

impl<'a> BusyPoll<'a> {
    /// A connection's poller (cold until a request arrives within `window` of a park),
    /// counting its polls in `counters`.
    pub fn new(window: Duration, spinners: &'a Spinners, counters: &'static Counters) -> Self {
        Self { window, hot: false, rest: 0, spinners, counters, serving: None }
    }

    /// Whether the next wait should poll first: hot, not resting, no other connection
    /// serving a request, and a poller's place free. The place is held for the poll.
    pub fn start(&self) -> Option<Slot<'a>> {
        if !self.hot || self.rest > 0 || self.window.is_zero() || SERVING.load(Ordering::Acquire) > 0 {
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
                self.counters[0].fetch_add(1, Ordering::Relaxed);
            }
            Polled::Timeout => {
                self.counters[1].fetch_add(1, Ordering::Relaxed);
                self.hot = false;
            }
        }
    }

    /// The replies to the `served` requests since the last wait are out, and the connection
    /// waits for its next request (polling first, or not): when to measure the wait from, if
    /// polling is on at all. More than one request served: the client keeps several in
    /// flight, and the connection is cold.
    pub fn waiting(&mut self, served: u64) -> Option<Instant> {
        self.serving = None;
        if served > 1 {
            self.hot = false;
        }
        self.rest = self.rest.saturating_sub(1);
        (!self.window.is_zero()).then(Instant::now)
    }

    /// The next request is here: the connection is hot when it came within the window of
    /// the replies (so a poll that timed out, and the park after it, leave it cold).
    pub fn woke(&mut self, parked: Option<Instant>) {
        self.serving.get_or_insert_with(Serving::begin);
        if let Some(t) = parked {
            self.hot = t.elapsed() <= self.window;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    static C: Counters = [AtomicU64::new(0), AtomicU64::new(0)];

    #[test]
    fn a_connection_polls_only_while_hot() {
        let s = Spinners::new(4);
        let mut p = BusyPoll::new(Duration::from_millis(50), &s, &C);
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
        let timeouts = C[1].load(Ordering::Relaxed);
        p.polled(Polled::Timeout);
        assert_eq!(C[1].load(Ordering::Relaxed), timeouts + 1, "counted");
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
        let mut p = BusyPoll::new(Duration::ZERO, &s, &C);
        assert_eq!(p.waiting(1), None, "no clock read when off");
        p.woke(Some(Instant::now()));
        assert!(p.start().is_none());
    }

    #[test]
    fn connections_share_the_cap() {
        let s = Spinners::new(1);
        let mut a = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let mut b = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let (pa, pb) = (a.waiting(1), b.waiting(1));
        a.woke(pa);
        b.woke(pb);
        let held = a.start().expect("a place is free");
        assert!(b.start().is_none(), "one poller at a time");
        drop(held);
        assert!(b.start().is_some(), "the place is free again");
    }

    #[test]
    fn no_poll_while_another_connection_serves_a_request() {
        let s = Spinners::new(4);
        let mut a = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let mut b = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let pa = a.waiting(1);
        a.woke(pa);
        let pb = b.waiting(1);
        b.woke(pb); // b serves a request now
        a.waiting(1);
        assert!(a.start().is_none(), "b is serving");
        b.waiting(1); // b's reply is out
        assert!(a.start().is_some(), "nobody else is serving");
    }

    #[test]
    fn polled_of_spin() {
        assert_eq!(Polled::of(Some(true)), Polled::Ready);
        assert_eq!(Polled::of(Some(false)), Polled::Arrived);
        assert_eq!(Polled::of(None), Polled::Timeout);
    }
}
