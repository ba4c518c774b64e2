//! The RDMA transport's message frames (two-sided SEND/RECV on the same RC connection that
//! carries the one-sided RDMA READ and WRITE). Documented in `docs/data-plane.md`.
//!
//! Every frame is [`MSG_LEN`] bytes, little-endian:
//!
//! ```text
//!  0..4   magic "RDXR" (0x52445852 as LE u32 bytes b"RDXR")
//!  4      version (1)
//!  5      op: 1 HELLO, 2 HELLO_REPLY, 3 FLUSH, 4 FLUSH_REPLY
//!  6      status (replies; the data plane's status codes)
//!  7      reserved, 0
//!  8..16  request id (echoed in the reply)
//! 16..32  session id (HELLO)
//! 32..40  lease id (FLUSH)
//! 40..48  object offset (FLUSH)
//! 48..56  length (FLUSH)
//! 56..64  reserved, 0
//! ```

use crate::dataplane::Status;

/// Bytes per frame.
pub const MSG_LEN: usize = 64;
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"RDXR";
/// Protocol version.
pub const VERSION: u8 = 1;

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
        bad[4] = 2;
        assert_eq!(Msg::decode(&bad), Err(FrameError::Version(2)));
        for i in [5usize, 6, 7, 60] {
            let mut bad = b;
            bad[i] = 0xff;
            assert_eq!(Msg::decode(&bad), Err(FrameError::Malformed), "byte {i}");
        }
    }
}
