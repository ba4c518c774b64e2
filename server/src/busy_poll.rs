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
//!   request arrives that fast after a normal park, or when a probe finds one (a cold
//!   connection polls once in [`PROBE`] waits: a client that sleeps while it waits for a
//!   reply sends its next request too late to make the connection hot, though it would be in
//!   time once both sides poll). An idle connection therefore never polls, and one whose
//!   client pauses costs one window per pause, or per [`PROBE`] requests. A client with many requests in
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use rdax_proto::busy_poll::{DEFAULT_WINDOW, Slot, Spinners};

/// What the daemon's connections share, NBD and data-plane alike.
#[derive(Debug)]
pub struct Shared {
    /// The pollers: half the cores, at least one.
    spinners: Spinners,
    /// Connections serving a request now: between its arrival and their wait for the next.
    serving: AtomicUsize,
}

impl Shared {
    /// At most `max` connections polling at once.
    pub const fn new(max: usize) -> Self {
        Self { spinners: Spinners::new(max), serving: AtomicUsize::new(0) }
    }
}

/// The daemon's.
pub static SHARED: LazyLock<Shared> = LazyLock::new(|| Shared::new(Spinners::for_host().max()));

/// One connection counted in [`Shared::serving`] while it lives.
#[derive(Debug)]
struct Serving<'a>(&'a AtomicUsize);

impl<'a> Serving<'a> {
    fn begin(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Serving(n)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A cold connection polls once in this many waits all the same (a probe).
pub const PROBE: u32 = 8;

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
    /// Waits since the last probe, while cold.
    cold: u32,
    shared: &'a Shared,
    counters: &'static Counters,
    /// Held from a request's arrival to the connection's next wait.
    serving: Option<Serving<'a>>,
}

impl<'a> BusyPoll<'a> {
    /// A connection's poller (cold until a request arrives within `window` of a park),
    /// counting its polls in `counters`.
    pub fn new(window: Duration, shared: &'a Shared, counters: &'static Counters) -> Self {
        Self { window, hot: false, rest: 0, cold: 0, shared, counters, serving: None }
    }

    /// Whether the next wait should poll first: hot (or cold for [`PROBE`] waits: a probe),
    /// not resting, no other connection serving a request, and a poller's place free. The
    /// place is held for the poll.
    pub fn start(&mut self) -> Option<Slot<'a>> {
        if self.rest > 0 || self.window.is_zero() || self.shared.serving.load(Ordering::Acquire) > 0 {
            return None;
        }
        if !self.hot {
            // A client that does not poll either wakes up late for each reply, and its
            // requests then arrive too late to make the connection hot, although they would
            // come in time once both sides poll: now and then, poll anyway.
            self.cold += 1;
            if self.cold < PROBE {
                return None;
            }
            self.cold = 0;
        }
        self.shared.spinners.take()
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
        let n = &self.shared.serving;
        self.serving.get_or_insert_with(|| Serving::begin(n));
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

    /// The daemon's order: wait (`waiting`, maybe a poll), then the request (`woke`).
    #[test]
    fn a_connection_polls_only_while_hot() {
        let s = Shared::new(4);
        let mut p = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let t = p.waiting(0);
        assert!(t.is_some());
        assert!(p.start().is_none(), "a new connection is cold");
        p.woke(t); // a request soon after the park makes it hot
        let t = p.waiting(1);
        assert!(p.start().is_some(), "hot after a quick request");
        p.polled(Polled::Arrived);
        p.woke(t);
        // Several requests served in one go: the client keeps many in flight; batches win.
        let t = p.waiting(2);
        assert!(p.start().is_none(), "cold after a batch");
        p.woke(t);
        let t = p.waiting(1);
        assert!(p.start().is_some(), "hot again after a single quick request");
        // A poll that finds a request already there: rest from polling for REST waits.
        p.polled(Polled::Ready);
        p.woke(t);
        for i in 0..REST - 1 {
            let t = p.waiting(1);
            assert!(p.start().is_none(), "resting ({i})");
            p.woke(t);
        }
        let t = p.waiting(1);
        assert!(p.start().is_some(), "polls again after its rest");
        // A poll that times out makes it cold, and a slow request keeps it so.
        let timeouts = C[1].load(Ordering::Relaxed);
        p.polled(Polled::Timeout);
        assert!(C[1].load(Ordering::Relaxed) > timeouts, "counted");
        p.woke(t.and_then(|t| t.checked_sub(Duration::from_millis(200))));
        p.waiting(1);
        assert!(p.start().is_none(), "cold after a poll that found nothing and a slow request");
    }

    #[test]
    fn a_cold_connection_probes_once_in_probe_waits() {
        let s = Shared::new(4);
        let mut p = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let polls: Vec<bool> = (0..2 * PROBE)
            .map(|_| {
                p.waiting(1);
                p.start().is_some()
            })
            .collect();
        assert_eq!(polls.iter().filter(|&&x| x).count(), 2, "{polls:?}");
        assert!(polls[PROBE as usize - 1] && polls[2 * PROBE as usize - 1]);
    }

    #[test]
    fn a_zero_window_never_polls() {
        let s = Shared::new(4);
        let mut p = BusyPoll::new(Duration::ZERO, &s, &C);
        assert_eq!(p.waiting(1), None, "no clock read when off");
        p.woke(Some(Instant::now()));
        assert!(p.start().is_none());
    }

    #[test]
    fn connections_share_the_cap() {
        let s = Shared::new(1);
        let mut a = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let mut b = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let (ta, tb) = (a.waiting(0), b.waiting(0));
        a.woke(ta);
        b.woke(tb);
        a.waiting(1);
        b.waiting(1);
        let held = a.start().expect("a place is free");
        assert!(b.start().is_none(), "one poller at a time");
        drop(held);
        assert!(b.start().is_some(), "the place is free again");
    }

    #[test]
    fn no_poll_while_another_connection_serves_a_request() {
        let s = Shared::new(4);
        let mut a = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let mut b = BusyPoll::new(Duration::from_millis(50), &s, &C);
        let (ta, tb) = (a.waiting(0), b.waiting(0));
        a.woke(ta);
        b.woke(tb); // both serve a request now, both hot
        a.waiting(1); // a's replies are out
        assert!(a.start().is_none(), "b is serving");
        b.waiting(1); // and b's
        assert!(a.start().is_some(), "nobody else is serving");
    }

    #[test]
    fn polled_of_spin() {
        assert_eq!(Polled::of(Some(true)), Polled::Ready);
        assert_eq!(Polled::of(Some(false)), Polled::Arrived);
        assert_eq!(Polled::of(None), Polled::Timeout);
    }
}
