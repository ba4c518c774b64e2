//! Sessions: opened on a stream, kept alive in the background, resumed after a broken stream.

use std::time::Duration;

use rdax_proto::pb;
use rdax_proto::pb::session_event::Kind as Event;
use rdax_proto::pb::session_request::Kind as Req;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};

/// What the daemon told the session (or what happened to it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionNotice {
    /// The daemon ended the session (eviction, expiry, shutdown); the text says why.
    Ended(String),
    /// The stream broke and could not be resumed within the TTL.
    Lost(String),
}

/// An open session. Keepalives are sent in the background; dropping the handle stops them
/// (the daemon then expires the session after its TTL); [`Session::close`] ends it at once.
#[derive(Debug)]
pub struct Session {
    id: String,
    ttl: Duration,
    notices: mpsc::Receiver<SessionNotice>,
    close: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

type Outbound = mpsc::Sender<pb::SessionRequest>;

async fn attach(
    client: &Client,
    open: pb::OpenSession,
) -> Result<(Outbound, tonic::Streaming<pb::SessionEvent>, pb::SessionOpened)> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::SessionRequest { kind: Some(Req::Open(open)) }).await.expect("receiver alive");
    let mut c = client.sessions.clone();
    let mut events = c.open(tonic::Request::new(ReceiverStream::new(rx))).await?.into_inner();
    match events.next().await {
        Some(Ok(pb::SessionEvent { kind: Some(Event::Opened(o)) })) => Ok((tx, events, o)),
        Some(Ok(_)) => Err(Error::new(ErrorKind::Protocol, "the first session event was not SessionOpened")),
        Some(Err(s)) => Err(s.into()),
        None => Err(Error::new(ErrorKind::Protocol, "session stream ended before SessionOpened")),
    }
}

impl Session {
    pub(crate) async fn open(client: Client, client_name: &str) -> Result<Self> {
        let (tx, events, opened) =
            attach(&client, pb::OpenSession { client_name: client_name.into(), resume_session_id: String::new() })
                .await?;
        let ttl = Duration::from_millis(opened.ttl_ms);
        let interval = Duration::from_millis(opened.keepalive_interval_ms.max(10));
        let (ntx, notices) = mpsc::channel(16);
        let (close_tx, close_rx) = oneshot::channel();
        let id = opened.session_id.clone();
        let task = tokio::spawn(keep_alive(client, id.clone(), ttl, interval, tx, events, ntx, close_rx));
        Ok(Self { id, ttl, notices, close: Some(close_tx), task })
    }

    /// The session id (a secret: it identifies this client to the data plane).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The daemon's TTL for this session.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The next notice, or `None` once the session is over and all notices were read.
    pub async fn next_notice(&mut self) -> Option<SessionNotice> {
        self.notices.recv().await
    }

    /// End the session now.
    pub async fn close(mut self) -> Result<()> {
        if let Some(c) = self.close.take() {
            let _ = c.send(());
        }
        (&mut self.task).await.map_err(|e| Error::new(ErrorKind::Other, format!("session task failed: {e}")))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn keep_alive(
    client: Client,
    id: String,
    ttl: Duration,
    interval: Duration,
    mut tx: Outbound,
    mut events: tonic::Streaming<pb::SessionEvent>,
    notices: mpsc::Sender<SessionNotice>,
    mut close: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = &mut close => {
                let _ = tx.send(pb::SessionRequest { kind: Some(Req::Close(pb::CloseSession {})) }).await;
                // Wait (bounded) for the server to acknowledge by ending the stream.
                let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = events.next().await {} }).await;
                return;
            }
            _ = tick.tick() => {
                seq += 1;
                let _ = tx.send(pb::SessionRequest { kind: Some(Req::Keepalive(pb::Keepalive { sequence: seq })) }).await;
            }
            ev = events.next() => match ev {
                Some(Ok(pb::SessionEvent { kind: Some(Event::Closing(c)) })) => {
                    let _ = notices.send(SessionNotice::Ended(c.reason)).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => match resume(&client, &id, ttl).await {
                    Ok((t, e)) => { tx = t; events = e; }
                    Err(e) => {
                        let _ = notices.send(SessionNotice::Lost(e.to_string())).await;
                        return;
                    }
                },
            },
        }
    }
}

/// Reattach within the TTL, backing off between attempts.
async fn resume(client: &Client, id: &str, ttl: Duration) -> Result<(Outbound, tonic::Streaming<pb::SessionEvent>)> {
    let deadline = tokio::time::Instant::now() + ttl;
    let mut delay = Duration::from_millis(50);
    loop {
        let open = pb::OpenSession { client_name: String::new(), resume_session_id: id.into() };
        match attach(client, open).await {
            Ok((tx, events, _)) => return Ok((tx, events)),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(e),
            Err(e) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
