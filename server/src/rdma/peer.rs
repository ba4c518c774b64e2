//! One client's RDMA connection: HELLO binds it to a session; FLUSH persists leased ranges.

use std::sync::{Arc, OnceLock};

use rdax_proto::dataplane::Status;
use rdax_proto::model::SessionId;
use rdax_proto::rdma::{Msg, Op};
use rdax_verbs::{Conn, Wr};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::transport::RdmaTransport;
use crate::dma::{self, HelloRefusal};
use crate::gate::Work;
use crate::lease::Refusal;

/// A client connection.
pub(super) struct Peer {
    pub(super) conn: Arc<Conn>,
    /// The rdma_cm id's address, for connection events.
    pub(super) key: usize,
    /// Where the connect request came from (for the per-source cap).
    pub(super) source: Option<std::net::IpAddr>,
    /// The session whose secret the connect request proved; HELLO must name the same.
    proven: SessionId,
    session: OnceLock<SessionId>,
}

impl Peer {
    pub(super) fn new(conn: Arc<Conn>, key: usize, source: Option<std::net::IpAddr>, proven: SessionId) -> Peer {
        Peer { conn, key, source, proven, session: OnceLock::new() }
    }

    /// The session, once HELLO was accepted.
    pub(super) fn session(&self) -> Option<SessionId> {
        self.session.get().copied()
    }

    /// Disconnect.
    pub(super) fn close(&self, why: &str) {
        if !self.conn.is_closed() {
            info!(qp = self.conn.qp_num(), session = ?self.session(), why, "RDMA connection closed");
        }
        self.conn.close(why);
    }

    /// Move the queue pair to the error state: no remote access is served on it any more.
    pub(super) fn fence(&self, why: &str) -> Result<(), rdax_verbs::Error> {
        warn!(qp = self.conn.qp_num(), session = ?self.session(), why, "RDMA queue pair fenced");
        self.conn.fence()
    }

    /// Reply, bounded: a client that never posts a receive cannot hold this task (the
    /// connection is fenced at the bound).
    async fn send(&self, m: Msg, bound: std::time::Duration) -> bool {
        self.conn.exec_within(Wr::Send(m.encode()), None, bound, "a reply SEND").await.is_ok()
    }

    /// Serve the connection's messages until it closes.
    pub(super) async fn serve(
        self: Arc<Self>,
        t: Arc<RdmaTransport>,
        mut inbox: mpsc::UnboundedReceiver<rdax_verbs::Received>,
    ) {
        // Requests arrive as receives nobody else polls for: keep completion events on.
        let armed = self.conn.hold_armed();
        let bound = t.op_timeout();
        loop {
            // A connection must say HELLO within the op timeout; after that it may idle.
            let hello_due = async {
                if self.session().is_some() {
                    std::future::pending::<()>().await
                }
                tokio::time::sleep(bound).await
            };
            // `raw` holds its receive buffer (the peer's credit) until handled below.
            let raw = tokio::select! {
                m = inbox.recv() => match m { Some(m) => m, None => break },
                _ = self.conn.wait_closed() => break,
                _ = hello_due => {
                    info!(qp = self.conn.qp_num(), "no RDMA HELLO within the op timeout; closing");
                    break;
                }
            };
            let m = match Msg::decode(&raw) {
                Ok(m) => m,
                Err(e) => {
                    info!(qp = self.conn.qp_num(), error = %e, "malformed RDMA message; replying MALFORMED and closing");
                    let _ = self.send(Msg::malformed_reply(&raw), bound).await;
                    break;
                }
            };
            match (m.op, self.session()) {
                (Op::Hello, None) => {
                    let status = match dma::hello(t.sessions(), t.gate(), m.session) {
                        // The secret of another session than the one the connect proved.
                        Ok(sid) if sid != self.proven => Status::BadSession,
                        Ok(sid) => {
                            let _ = self.session.set(sid);
                            t.register(sid, &self);
                            Status::Ok
                        }
                        Err(HelloRefusal::BadSession) => Status::BadSession,
                        Err(HelloRefusal::ShuttingDown) => Status::ShuttingDown,
                    };
                    let ok = self.send(m.reply(Op::HelloReply, status), bound).await;
                    if status != Status::Ok || !ok {
                        break;
                    }
                    debug!(session = ?self.session(), qp = self.conn.qp_num(), "RDMA HELLO accepted");
                }
                (Op::Flush, Some(sid)) => {
                    let status = flush(&t, sid, &m).await;
                    if !self.send(m.reply(Op::FlushReply, status), bound).await {
                        break;
                    }
                }
                (Op::Flush, None) => {
                    let _ = self.send(m.reply(Op::FlushReply, Status::NoHello), bound).await;
                    break;
                }
                _ => {
                    // A second HELLO, or a reply opcode sent to the daemon.
                    let _ = self.send(m.reply(Msg::reply_op(m.op), Status::Malformed), bound).await;
                    break;
                }
            }
        }
        drop(armed);
        self.close("the connection ended");
        t.forget(&self);
    }
}

/// FLUSH: persist `[offset, +len)` of a lease's object range, with the lease pinned.
async fn flush(t: &RdmaTransport, session: rdax_proto::model::SessionId, m: &Msg) -> Status {
    let Ok(_op) = t.gate().enter(Work::DataOp) else { return Status::ShuttingDown };
    let (pin, ranges) = match t.leases().pin_range(session, m.lease, m.offset, m.len) {
        Ok(x) => x,
        Err(Refusal::WrongSession) => return Status::WrongSession,
        Err(Refusal::Revoked | Refusal::Fenced) => return Status::Revoked,
        Err(Refusal::OutOfRange) => return Status::OutOfRange,
        Err(_) => return Status::UnknownKey,
    };
    let done = dma::persist(t.pool().media(), t.gate(), ranges, pin).await;
    crate::metrics::METRICS.rdma_flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match done {
        Ok(()) => Status::Ok,
        Err(dma::PersistError::Storage(_)) => Status::StorageFailed,
        Err(dma::PersistError::ShuttingDown) => Status::ShuttingDown,
    }
}
