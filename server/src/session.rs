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
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rdax_proto::model::{SessionId, SessionSecret};
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
    /// The credential it was opened with was removed (a reload).
    CredentialRemoved,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired: no keepalive within the session TTL",
            EndReason::Evicted => "evicted by an administrator",
            EndReason::Closed => "closed by the client",
            EndReason::Shutdown => "the daemon is shutting down",
            EndReason::CredentialRemoved => "the credential it was opened with was removed",
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
    /// One principal's session cap.
    #[error("principal `{principal}` has its maximum of {max} sessions (limits.max_sessions_per_principal)")]
    TooManyForPrincipal {
        /// Who.
        principal: Arc<str>,
        /// The limit.
        max: usize,
    },
    /// No such session (never existed, or ended).
    #[error("session not found (it may have expired)")]
    NotFound,
    /// The session belongs to another principal.
    #[error("session {session} belongs to another principal")]
    NotYours {
        /// The session.
        session: SessionId,
    },
    /// Shutting down: no new sessions.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// Who opens a session: the principal, and the hash of the token it presented.
#[derive(Debug, Clone)]
pub struct Owner {
    /// The principal's name.
    pub principal: Arc<str>,
    /// SHA-256 of its token (`None` for a certificate or the admin socket).
    pub credential: Option<[u8; 32]>,
}

impl Owner {
    /// An owner with no token, for unit tests.
    #[cfg(test)]
    pub fn anonymous() -> Owner {
        Owner { principal: "anonymous".into(), credential: None }
    }
}

/// Called with every session that ends.
pub type CloseHook = Arc<dyn Fn(SessionId, EndReason) + Send + Sync>;

struct Entry {
    /// Who opened it; only they may act for it.
    principal: Arc<str>,
    /// SHA-256 of the token it was opened with (`None` without tokens): a reload that removes
    /// the token ends the session.
    credential: Option<[u8; 32]>,
    secret: SessionSecret,
    client_name: String,
    peer: Option<Arc<str>>,
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
    /// Who opened it.
    pub principal: Arc<str>,
    /// Client label.
    pub client_name: String,
    /// Peer address of the attached stream.
    pub peer: Option<Arc<str>>,
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
    /// Secret → session, for HELLO (lock order: `sessions` first).
    by_secret: Mutex<HashMap<SessionSecret, SessionId>>,
    ttl_ms: std::sync::atomic::AtomicU64,
    max: usize,
    max_per_principal: usize,
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
            by_secret: Mutex::new(HashMap::new()),
            ttl_ms: (ttl.as_millis() as u64).into(),
            max,
            max_per_principal: max,
            next_gen: 1.into(),
            hooks: Mutex::new(Vec::new()),
            shutting_down: false.into(),
        }
    }

    /// Cap the sessions of one principal (`limits.max_sessions_per_principal`).
    pub fn with_principal_cap(mut self, n: usize) -> Self {
        self.max_per_principal = n;
        self
    }

    fn secrets(&self) -> std::sync::MutexGuard<'_, HashMap<SessionSecret, SessionId>> {
        self.by_secret.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Open a session for `owner` on a new stream. Returns its id, the stream generation and
    /// the session's secret.
    pub fn open(
        &self,
        owner: &Owner,
        client_name: String,
        peer: Option<Arc<str>>,
        tx: EventSender,
        stop: CancellationToken,
    ) -> Result<(SessionId, u64, SessionSecret), SessionError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SessionError::ShuttingDown);
        }
        let mut s = self.lock();
        if s.len() >= self.max {
            return Err(SessionError::TooMany { max: self.max });
        }
        if s.values().filter(|e| e.principal == owner.principal).count() >= self.max_per_principal {
            return Err(SessionError::TooManyForPrincipal {
                principal: owner.principal.clone(),
                max: self.max_per_principal,
            });
        }
        let id = random_id();
        let secret = SessionSecret(random_id().0);
        let generation = self.next_gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Entry {
            principal: owner.principal.clone(),
            credential: owner.credential,
            secret,
            client_name,
            peer: peer.clone(),
            opened: SystemTime::now(),
            last_seen: Instant::now(),
            stream: Some((generation, tx, stop)),
            ended: CancellationToken::new(),
        };
        s.insert(id, entry);
        self.secrets().insert(secret, id);
        info!(session = %id, principal = %owner.principal, peer = peer.as_deref().unwrap_or("-"), "session opened");
        Ok((id, generation, secret))
    }

    /// The session whose secret this is (HELLO).
    pub fn by_secret(&self, secret: &SessionSecret) -> Option<SessionId> {
        self.secrets().get(secret).copied()
    }

    /// The session's secret (for the RDMA connect proof, which the daemon checks with it).
    pub fn secret_of(&self, id: SessionId) -> Option<SessionSecret> {
        self.lock().get(&id).map(|e| e.secret)
    }

    /// `Ok` if `principal` owns the session.
    pub fn check_owner(&self, id: SessionId, principal: &str) -> Result<(), SessionError> {
        match self.lock().get(&id) {
            None => Err(SessionError::NotFound),
            Some(e) if &*e.principal == principal => Ok(()),
            Some(_) => Err(SessionError::NotYours { session: id }),
        }
    }

    /// The sessions of `principal`.
    pub fn sessions_of(&self, principal: &str) -> std::collections::HashSet<SessionId> {
        self.lock().iter().filter(|(_, e)| &*e.principal == principal).map(|(id, _)| *id).collect()
    }

    /// The session's principal.
    pub fn owner(&self, id: SessionId) -> Option<Arc<str>> {
        self.lock().get(&id).map(|e| e.principal.clone())
    }

    /// End every session opened with a token for which `still_valid` is false (a reload
    /// removed it). Returns how many.
    pub fn end_removed_credentials(&self, still_valid: impl Fn(&[u8; 32]) -> bool) -> usize {
        let gone: Vec<SessionId> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.credential.is_some_and(|c| !still_valid(&c)))
            .map(|(id, _)| *id)
            .collect();
        gone.iter().filter(|id| self.end(**id, EndReason::CredentialRemoved).is_ok()).count()
    }

    /// Attach a new stream to an existing session (the old stream, if any, is stopped).
    pub fn resume(
        &self,
        id: SessionId,
        owner: &Owner,
        peer: Option<Arc<str>>,
        tx: EventSender,
        stop: CancellationToken,
    ) -> Result<u64, SessionError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(SessionError::ShuttingDown);
        }
        let mut s = self.lock();
        let e = s.get_mut(&id).ok_or(SessionError::NotFound)?;
        if e.principal != owner.principal {
            return Err(SessionError::NotYours { session: id });
        }
        let generation = self.next_gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, _, old)) = e.stream.replace((generation, tx, stop)) {
            old.cancel();
        }
        info!(session = %id, peer = peer.as_deref().unwrap_or("-"), "session resumed");
        e.peer = peer;
        e.last_seen = Instant::now();
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
        self.secrets().remove(&entry.secret);
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
                principal: e.principal.clone(),
                client_name: e.client_name.clone(),
                peer: e.peer.clone(),
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
        let (id, _, _) = m.open(&Owner::anonymous(), "a".into(), None, tx, stop.clone()).unwrap();
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
        let (id, generation, _) = m.open(&Owner::anonymous(), "a".into(), None, tx, stop).unwrap();
        m.detach(id, generation);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (tx2, _rx2, stop2) = stream();
        let other = Owner { principal: "mallory".into(), credential: None };
        let (tx3, _rx3, stop3) = stream();
        assert_eq!(m.resume(id, &other, None, tx3, stop3), Err(SessionError::NotYours { session: id }));
        let gen2 = m.resume(id, &Owner::anonymous(), None, tx2, stop2).unwrap();
        m.detach(id, generation); // a stale detach must not drop the new stream
        assert!(m.list()[0].connected);
        m.detach(id, gen2);
        assert!(!m.list()[0].connected);
        assert_eq!(
            m.resume(random_id(), &Owner::anonymous(), None, stream().0, CancellationToken::new()),
            Err(SessionError::NotFound)
        );
    }

    #[tokio::test]
    async fn limits_and_shutdown() {
        let m = SessionManager::new(Duration::from_secs(10), 2);
        let (a, _ra, sa) = stream();
        let (b, _rb, sb) = stream();
        let anon = Owner::anonymous();
        m.open(&anon, "a".into(), None, a, sa).unwrap();
        m.open(&anon, "b".into(), None, b, sb).unwrap();
        assert_eq!(
            m.open(&anon, "c".into(), None, stream().0, CancellationToken::new()).unwrap_err(),
            SessionError::TooMany { max: 2 }
        );
        m.shutdown();
        assert!(m.is_empty());
        assert_eq!(
            m.open(&anon, "d".into(), None, stream().0, CancellationToken::new()).unwrap_err(),
            SessionError::ShuttingDown
        );
    }

    #[tokio::test]
    async fn sessions_belong_to_their_principal_and_are_found_by_secret() {
        let m = SessionManager::new(Duration::from_secs(10), 8).with_principal_cap(2);
        let alice = Owner { principal: "alice".into(), credential: Some([1; 32]) };
        let bob = Owner { principal: "bob".into(), credential: Some([2; 32]) };
        let (id, _, secret) = m.open(&alice, "a".into(), None, stream().0, CancellationToken::new()).unwrap();
        assert_eq!(m.by_secret(&secret), Some(id));
        assert_eq!(m.by_secret(&SessionSecret(id.0)), None, "the id is no credential");
        assert_ne!(secret.0, id.0);
        assert_eq!(m.check_owner(id, "alice"), Ok(()));
        assert_eq!(m.check_owner(id, "bob"), Err(SessionError::NotYours { session: id }));
        assert_eq!(&*m.list()[0].principal, "alice");
        m.open(&alice, "b".into(), None, stream().0, CancellationToken::new()).unwrap();
        let e = m.open(&alice, "c".into(), None, stream().0, CancellationToken::new()).unwrap_err();
        assert!(e.to_string().contains("limits.max_sessions_per_principal"), "{e}");
        let (bobs, _, _) = m.open(&bob, "d".into(), None, stream().0, CancellationToken::new()).unwrap();
        // A reload that removes alice's token ends her sessions, and only hers.
        assert_eq!(m.end_removed_credentials(|h| *h == [2; 32]), 2);
        assert!(m.is_live(bobs) && !m.is_live(id));
        assert_eq!(m.by_secret(&secret), None, "an ended session's secret is forgotten");
    }

    #[test]
    fn ids_are_random() {
        assert_ne!(random_id(), random_id());
    }
}
