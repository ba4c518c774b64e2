//! Sessions: one client's liveness, kept by a stream of keepalives.
//!
//! A session is opened on a `Sessions.Open` stream and lives while keepalives arrive at least
//! once per TTL. A broken stream does not end it: the client may resume it on a new stream
//! within the TTL. Expiry, eviction, a client's close and daemon shutdown all end a session
//! the same way — [`SessionManager::end`] — which tells the client on its stream (when one is
//! attached), stops the stream, and runs the close hooks (the lease layer hooks in there).
//!
//! Time is tokio's clock, so expiry is tested on paused virtual time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rdax_proto::model::SessionId;
use rdax_proto::pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What the server sends on a session stream.
pub type EventSender = mpsc::Sender<Result<pb::SessionEvent, tonic::Status>>;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// No keepalive within the TTL.
    Expired,
    /// An administrator evicted it.
    Evicted,
    /// The client closed it.
    Closed,
    /// The daemon is shutting down.
    Shutdown,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired: no keepalive within the session TTL",
            EndReason::Evicted => "evicted by an administrator",
            EndReason::Closed => "closed by the client",
            EndReason::Shutdown => "the daemon is shutting down",
        }
    }
}

/// Session errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// At the session limit.
    #[error("the daemon has its maximum of {max} sessions")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// No such session (never existed, or ended).
    #[error("session not found (it may have expired)")]
    NotFound,
    /// Shutting down: no new sessions.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// Called with every session that ends.
pub type CloseHook = Arc<dyn Fn(SessionId, EndReason) + Send + Sync>;

struct Entry {
    client_name: String,
    peer: Option<SocketAddr>,
    opened: SystemTime,
    last_seen: Instant,
    /// The attached stream: its generation, event sender and stop token.
    stream: Option<(u64, EventSender, CancellationToken)>,
    /// Cancelled when the session ends (its data-plane connections close with it).
    ended: CancellationToken,
}

/// A snapshot of one session, for administrators.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    /// Id.
    pub id: SessionId,
    /// Client label.
    pub client_name: String,
    /// Peer address of the attached stream.
    pub peer: Option<SocketAddr>,
    /// When opened.
    pub opened: SystemTime,
    /// Since the last keepalive.
    pub idle: Duration,
    /// Whether a stream is attached.
    pub connected: bool,
}

/// All sessions of one daemon.
pub struct SessionManager {
    sessions: Mutex<HashMap<SessionId, Entry>>,
    ttl_ms: std::sync::atomic::AtomicU64,
    max: usize,
    next_gen: std::sync::atomic::AtomicU64,
    hooks: Mutex<Vec<CloseHook>>,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager").field("ttl", &self.ttl()).field("max", &self.max).finish()
    }
}

/// 128 bits from the OS random source.
pub fn random_id() -> SessionId {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source failed");
    SessionId(b)
}

impl SessionManager {
    /// A manager with the given TTL and session limit.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            ttl_ms: (ttl.as_millis() as u64).into(),
            max,
            next_gen: 1.into(),
            hooks: Mutex::new(Vec::new()),
            shutting_down: false.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `hook` for every session that ends from now on.
    pub fn on_close(&self, hook: CloseHook) {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Change the TTL (SIGHUP reload); applies to the next expiry check.
    pub fn set_ttl(&self, ttl: Duration) {
        self.ttl_ms.store(ttl.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Open a session on a new stream. Returns its id and the stream generation.
    pub fn open(
        &self,
        client_name: String,
        peer: Option<SocketAddr>,
        tx: EventSender,
        stop: CancellationToken,
    ) -> Result<(SessionId, u64), SessionError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SessionError::ShuttingDown);
        }
        let mut s = self.lock();
        if s.len() >= self.max {
            return Err(SessionError::TooMany { max: self.max });
        }
        let id = random_id();
        let generation = self.next_gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Entry {
            client_name,
            peer,
            opened: SystemTime::now(),
            last_seen: Instant::now(),
            stream: Some((generation, tx, stop)),
            ended: CancellationToken::new(),
        };
        s.insert(id, entry);
        info!(session = %id, peer = ?peer, "session opened");
        Ok((id, generation))
    }

    /// Attach a new stream to an existing session (the old stream, if any, is stopped).
    pub fn resume(
        &self,
        id: SessionId,
        peer: Option<SocketAddr>,
        tx: EventSender,
        stop: CancellationToken,
    ) -> Result<u64, SessionError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SessionError::ShuttingDown);
        }
        let mut s = self.lock();
        let e = s.get_mut(&id).ok_or(SessionError::NotFound)?;
        let generation = self.next_gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, _, old)) = e.stream.replace((generation, tx, stop)) {
            old.cancel();
        }
        e.peer = peer;
        e.last_seen = Instant::now();
        info!(session = %id, peer = ?peer, "session resumed");
        Ok(generation)
    }

    /// A keepalive arrived.
    pub fn touch(&self, id: SessionId) -> Result<(), SessionError> {
        let mut s = self.lock();
        let e = s.get_mut(&id).ok_or(SessionError::NotFound)?;
        e.last_seen = Instant::now();
        Ok(())
    }

    /// The stream of generation `generation` ended; the session lives on until its TTL.
    pub fn detach(&self, id: SessionId, generation: u64) {
        let mut s = self.lock();
        if let Some(e) = s.get_mut(&id)
            && e.stream.as_ref().is_some_and(|st| st.0 == generation)
        {
            e.stream = None;
            info!(session = %id, "session stream detached; the session lives until its TTL");
        }
    }

    /// A token cancelled when the session ends; `None` if it already has.
    pub fn ended_token(&self, id: SessionId) -> Option<CancellationToken> {
        self.lock().get(&id).map(|e| e.ended.clone())
    }

    /// Whether the session exists.
    pub fn is_live(&self, id: SessionId) -> bool {
        self.lock().contains_key(&id)
    }

    /// Send an event to the session's attached stream, if any. Returns whether it was queued.
    pub fn notify(&self, id: SessionId, event: pb::SessionEvent) -> bool {
        let tx = self.lock().get(&id).and_then(|e| e.stream.as_ref().map(|s| s.1.clone()));
        tx.is_some_and(|tx| tx.try_send(Ok(event)).is_ok())
    }

    /// End a session: tell the client, stop its stream, run the close hooks.
    pub fn end(&self, id: SessionId, reason: EndReason) -> Result<(), SessionError> {
        let entry = self.lock().remove(&id).ok_or(SessionError::NotFound)?;
        entry.ended.cancel();
        if let Some((_, tx, stop)) = entry.stream {
            let closing = pb::session_event::Kind::Closing(pb::SessionClosing { reason: reason.as_str().into() });
            let _ = tx.try_send(Ok(pb::SessionEvent { kind: Some(closing) }));
            stop.cancel();
        }
        info!(session = %id, reason = reason.as_str(), "session ended");
        let hooks = self.hooks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for h in hooks {
            h(id, reason);
        }
        Ok(())
    }

    /// End every session whose last keepalive is older than the TTL. Returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let ttl = self.ttl();
        let stale: Vec<SessionId> =
            self.lock().iter().filter(|(_, e)| now.duration_since(e.last_seen) > ttl).map(|(id, _)| *id).collect();
        stale.iter().filter(|id| self.end(**id, EndReason::Expired).is_ok()).count()
    }

    /// Refuse new sessions and end every session.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
        let ids: Vec<SessionId> = self.lock().keys().copied().collect();
        for id in ids {
            let _ = self.end(id, EndReason::Shutdown);
        }
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True with no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of every session.
    pub fn list(&self) -> Vec<SessionSummary> {
        let now = Instant::now();
        let mut v: Vec<SessionSummary> = self
            .lock()
            .iter()
            .map(|(id, e)| SessionSummary {
                id: *id,
                client_name: e.client_name.clone(),
                peer: e.peer,
                opened: e.opened,
                idle: now.duration_since(e.last_seen),
                connected: e.stream.is_some(),
            })
            .collect();
        v.sort_by_key(|s| s.opened);
        v
    }

    /// Expire sessions every quarter TTL until `cancel`.
    pub async fn reap(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.ttl() / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { self.expire(); }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> (EventSender, mpsc::Receiver<Result<pb::SessionEvent, tonic::Status>>, CancellationToken) {
        let (tx, rx) = mpsc::channel(8);
        (tx, rx, CancellationToken::new())
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_keep_a_session_and_silence_expires_it() {
        let m = Arc::new(SessionManager::new(Duration::from_secs(10), 8));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let e2 = ended.clone();
        m.on_close(Arc::new(move |id, r| e2.lock().unwrap().push((id, r))));
        let cancel = CancellationToken::new();
        tokio::spawn(m.clone().reap(cancel.clone()));
        let (tx, mut rx, stop) = stream();
        let (id, _) = m.open("a".into(), None, tx, stop.clone()).unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            m.touch(id).unwrap();
        }
        assert!(m.is_live(id), "30 s of keepalives every 6 s keep a 10 s session");
        tokio::time::sleep(Duration::from_secs(13)).await;
        assert!(!m.is_live(id), "13 s of silence expire it");
        assert_eq!(ended.lock().unwrap().as_slice(), &[(id, EndReason::Expired)]);
        assert!(stop.is_cancelled());
        let ev = rx.recv().await.unwrap().unwrap();
        assert!(matches!(ev.kind, Some(pb::session_event::Kind::Closing(_))));
        assert_eq!(m.touch(id), Err(SessionError::NotFound));
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_detached_session_can_be_resumed_within_its_ttl() {
        let m = SessionManager::new(Duration::from_secs(10), 8);
        let (tx, _rx, stop) = stream();
        let (id, generation) = m.open("a".into(), None, tx, stop).unwrap();
        m.detach(id, generation);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (tx2, _rx2, stop2) = stream();
        let gen2 = m.resume(id, None, tx2, stop2).unwrap();
        m.detach(id, generation); // a stale detach must not drop the new stream
        assert!(m.list()[0].connected);
        m.detach(id, gen2);
        assert!(!m.list()[0].connected);
        assert_eq!(m.resume(random_id(), None, stream().0, CancellationToken::new()), Err(SessionError::NotFound));
    }

    #[tokio::test]
    async fn limits_and_shutdown() {
        let m = SessionManager::new(Duration::from_secs(10), 2);
        let (a, _ra, sa) = stream();
        let (b, _rb, sb) = stream();
        m.open("a".into(), None, a, sa).unwrap();
        m.open("b".into(), None, b, sb).unwrap();
        assert_eq!(
            m.open("c".into(), None, stream().0, CancellationToken::new()),
            Err(SessionError::TooMany { max: 2 })
        );
        m.shutdown();
        assert!(m.is_empty());
        assert_eq!(m.open("d".into(), None, stream().0, CancellationToken::new()), Err(SessionError::ShuttingDown));
    }

    #[test]
    fn ids_are_random() {
        assert_ne!(random_id(), random_id());
    }
}
