//! The RDMA transport's message frames (two-sided SEND/RECV on the same RC connection that
//! carries the one-sided RDMA READ and WRITE). Documented in `docs/data-plane.md`.
//!
//! Every frame is [`MSG_LEN`] bytes, little-endian:
//!
//! ```text
//!  0..4   magic "RDXR" (0x52445852 as LE u32 bytes b"RDXR")
//!  4      version (2)
//!  5      op: 1 HELLO, 2 HELLO_REPLY, 3 FLUSH, 4 FLUSH_REPLY
//!  6      status (replies; the data plane's status codes)
//!  7      reserved, 0
//!  8..16  request id (echoed in the reply)
//! 16..32  session secret (HELLO)
//! 32..40  lease id (FLUSH)
//! 40..48  object offset (FLUSH)
//! 48..56  length (FLUSH)
//! 56..64  reserved, 0
//! ```

use crate::dataplane::Status;
use hmac::{Hmac, Mac};

/// Bytes of the connect proof a client sends as the private data of its connect request.
pub const PROOF_LEN: usize = 48;
/// Magic of the connect proof.
pub const PROOF_MAGIC: [u8; 4] = *b"RDXC";

/// Proof that a connect request comes from a holder of the session's secret, checked by the
/// daemon before it allocates anything for the connection (protection domain, CQ, QP):
///
/// ```text
///  0..4   magic "RDXC"
///  4      version (2)
///  5..8   0
///  8..24  session id (the public handle: it tells the daemon whose secret to check with)
/// 24..32  the client's clock, Unix milliseconds (LE)
/// 32..48  HMAC-SHA256(key = session secret, "rdax-rdma-connect" | session id | time),
///         first 16 bytes
/// ```
///
/// The daemon accepts a time within 60 s of its own clock and each proof once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectProof {
    /// The session id.
    pub session: [u8; 16],
    /// Unix milliseconds when made.
    pub unix_ms: u64,
    /// The truncated HMAC.
    pub mac: [u8; 16],
}

fn proof_mac(secret: &[u8; 16], session: &[u8; 16], unix_ms: u64) -> [u8; 16] {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"rdax-rdma-connect");
    m.update(session);
    m.update(&unix_ms.to_le_bytes());
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

impl ConnectProof {
    /// A proof for `session` made with its secret at `unix_ms`.
    pub fn new(session: [u8; 16], secret: &[u8; 16], unix_ms: u64) -> Self {
        Self { session, unix_ms, mac: proof_mac(secret, &session, unix_ms) }
    }

    /// The bytes to send.
    pub fn encode(&self) -> [u8; PROOF_LEN] {
        let mut b = [0u8; PROOF_LEN];
        b[0..4].copy_from_slice(&PROOF_MAGIC);
        b[4] = VERSION;
        b[8..24].copy_from_slice(&self.session);
        b[24..32].copy_from_slice(&self.unix_ms.to_le_bytes());
        b[32..48].copy_from_slice(&self.mac);
        b
    }

    /// Parse private data (which may be padded with zeros past [`PROOF_LEN`]).
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < PROOF_LEN || b[0..4] != PROOF_MAGIC || b[4] != VERSION || b[5..8] != [0; 3] {
            return None;
        }
        if b[PROOF_LEN..].iter().any(|&x| x != 0) {
            return None;
        }
        Some(Self {
            session: b[8..24].try_into().expect("16 bytes"),
            unix_ms: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
            mac: b[32..48].try_into().expect("16 bytes"),
        })
    }

    /// Whether the proof was made with `secret` (compared in constant time).
    pub fn verify(&self, secret: &[u8; 16]) -> bool {
        let want = proof_mac(secret, &self.session, self.unix_ms);
        want.iter().zip(&self.mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Bytes per frame.
pub const MSG_LEN: usize = 64;
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"RDXR";
/// Protocol version.
pub const VERSION: u8 = 2;

/// Frame kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Client → daemon, first frame: bind this connection to a session.
    Hello = 1,
    /// Daemon → client.
    HelloReply = 2,
    /// Client → daemon: persist a leased range written by RDMA WRITE.
    Flush = 3,
    /// Daemon → client, once the range is persistent (or refused).
    FlushReply = 4,
}

/// One frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    /// Kind.
    pub op: Op,
    /// Reply status.
    pub status: Status,
    /// Echoed in the reply.
    pub req_id: u64,
    /// HELLO: the session.
    pub session: [u8; 16],
    /// FLUSH: the lease.
    pub lease: u64,
    /// FLUSH: offset in the object.
    pub offset: u64,
    /// FLUSH: bytes.
    pub len: u64,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not an rdax frame.
    #[error("bad magic")]
    Magic,
    /// Another protocol version.
    #[error("unsupported version {0}")]
    Version(u8),
    /// Unknown op or status, or non-zero reserved bytes.
    #[error("malformed frame")]
    Malformed,
}

impl Msg {
    /// A request frame.
    pub fn request(op: Op, req_id: u64) -> Msg {
        Msg { op, status: Status::Ok, req_id, session: [0; 16], lease: 0, offset: 0, len: 0 }
    }

    /// The reply to this request.
    pub fn reply(&self, op: Op, status: Status) -> Msg {
        Msg { op, status, ..Msg::request(op, self.req_id) }
    }

    /// Encode.
    pub fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.op as u8;
        b[6] = self.status as u8;
        b[8..16].copy_from_slice(&self.req_id.to_le_bytes());
        b[16..32].copy_from_slice(&self.session);
        b[32..40].copy_from_slice(&self.lease.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// The error reply to a frame that does not decode: MALFORMED, with the request id read
    /// from where every frame has it, and the reply opcode the frame's op asked for (FLUSH_REPLY
    /// when it names none).
    pub fn malformed_reply(b: &[u8; MSG_LEN]) -> Msg {
        let req_id = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let op = if b[5] == Op::Hello as u8 { Op::HelloReply } else { Op::FlushReply };
        Msg::request(op, req_id).reply(op, Status::Malformed)
    }

    /// The reply opcode for a request opcode.
    pub fn reply_op(op: Op) -> Op {
        match op {
            Op::Hello | Op::HelloReply => Op::HelloReply,
            Op::Flush | Op::FlushReply => Op::FlushReply,
        }
    }

    /// Decode.
    pub fn decode(b: &[u8; MSG_LEN]) -> Result<Msg, FrameError> {
        if b[0..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        if b[4] != VERSION {
            return Err(FrameError::Version(b[4]));
        }
        let op = match b[5] {
            1 => Op::Hello,
            2 => Op::HelloReply,
            3 => Op::Flush,
            4 => Op::FlushReply,
            _ => return Err(FrameError::Malformed),
        };
        let status = Status::from_u8(b[6]).ok_or(FrameError::Malformed)?;
        if b[7] != 0 || b[56..64].iter().any(|&x| x != 0) {
            return Err(FrameError::Malformed);
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        Ok(Msg {
            op,
            status,
            req_id: u(8..16),
            session: b[16..32].try_into().expect("16 bytes"),
            lease: u(32..40),
            offset: u(40..48),
            len: u(48..56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_proofs_verify_with_their_secret_only() {
        let (sid, secret) = ([7u8; 16], [9u8; 16]);
        let p = ConnectProof::new(sid, &secret, 1_700_000_000_000);
        let mut wire = p.encode().to_vec();
        wire.resize(56, 0); // RoCE pads private data
        let q = ConnectProof::decode(&wire).unwrap();
        assert_eq!(q, p);
        assert!(q.verify(&secret));
        assert!(!q.verify(&[8u8; 16]), "another secret");
        assert!(!ConnectProof { unix_ms: p.unix_ms + 1, ..p }.verify(&secret), "the time is covered");
        assert!(!ConnectProof { session: [6; 16], ..p }.verify(&secret), "the session is covered");
        for bad in [&wire[..40], &[0u8; 56][..]] {
            assert!(ConnectProof::decode(bad).is_none());
        }
        let mut junk = wire.clone();
        junk[50] = 1;
        assert!(ConnectProof::decode(&junk).is_none(), "padding must be zeros");
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut m = Msg::request(Op::Flush, 77);
        m.lease = 9;
        m.offset = 4096;
        m.len = 1 << 20;
        m.session = [3; 16];
        let b = m.encode();
        assert_eq!(&b[0..4], b"RDXR");
        assert_eq!(Msg::decode(&b), Ok(m));
        let r = m.reply(Op::FlushReply, Status::Revoked);
        assert_eq!((r.req_id, r.status, r.op), (77, Status::Revoked, Op::FlushReply));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(Msg::decode(&bad), Err(FrameError::Magic));
        let mut bad = b;
        bad[4] = 1; // version 1 HELLO carried the session id
        assert_eq!(Msg::decode(&bad), Err(FrameError::Version(1)));
        for i in [5usize, 6, 7, 60] {
            let mut bad = b;
            bad[i] = 0xff;
            assert_eq!(Msg::decode(&bad), Err(FrameError::Malformed), "byte {i}");
        }
    }
}
