//! The rdax TCP data-plane wire format (see `docs/data-plane.md`), shared by the daemon and
//! the SDK. Little-endian throughout.

/// Protocol version carried by HELLO. 2: HELLO presents the session *secret*
/// (`SessionOpened.session_secret`), not the session id.
pub const VERSION: u64 = 2;
/// Bytes of a request header.
pub const REQ_LEN: usize = 48;
/// Bytes of a response header.
pub const RESP_LEN: usize = 16;
/// Largest READ/WRITE/FLUSH length.
pub const MAX_OP_LEN: u32 = 16 << 20;

/// Request opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Bind the connection to a session.
    Hello = 1,
    /// Pool bytes → client.
    Read = 2,
    /// Client bytes → pool.
    Write = 3,
    /// Make a range durable.
    Flush = 4,
}

/// WRITE flag: persist before replying.
pub const FLAG_PERSIST: u8 = 1;

/// Response status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Unparseable frame; the connection is closed.
    Malformed = 1,
    /// An operation before HELLO; the connection is closed.
    NoHello = 2,
    /// HELLO named no live session; the connection is closed.
    BadSession = 3,
    /// The key was never granted.
    UnknownKey = 4,
    /// The key's lease was released or revoked.
    Revoked = 5,
    /// The key belongs to another session.
    WrongSession = 6,
    /// The generation does not match the lease.
    StaleGeneration = 7,
    /// The range is outside the key's segment.
    OutOfRange = 8,
    /// A write under a read-only lease.
    Mode = 9,
    /// Length above the limit; the connection is closed.
    TooLarge = 10,
    /// Unknown protocol version in HELLO; the connection is closed.
    Version = 11,
    /// The daemon is shutting down; the connection is closed.
    ShuttingDown = 12,
    /// The pool's storage failed while persisting: the data may not be durable, and the
    /// daemon accepts no change until it is restarted. The connection stays open.
    StorageFailed = 13,
}

impl Status {
    /// Decode a status byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        use Status::*;
        Some(match b {
            0 => Ok,
            1 => Malformed,
            2 => NoHello,
            3 => BadSession,
            4 => UnknownKey,
            5 => Revoked,
            6 => WrongSession,
            7 => StaleGeneration,
            8 => OutOfRange,
            9 => Mode,
            10 => TooLarge,
            11 => Version,
            12 => ShuttingDown,
            13 => StorageFailed,
            _ => return None,
        })
    }

    /// Whether the server closes the connection after sending this status.
    pub fn closes(self) -> bool {
        matches!(
            self,
            Status::Malformed
                | Status::NoHello
                | Status::BadSession
                | Status::TooLarge
                | Status::Version
                | Status::ShuttingDown
        )
    }
}

/// The request id of a header that may not decode (it sits at the same place in every
/// header), for the reply to a malformed request.
pub fn request_id(b: &[u8; REQ_LEN]) -> u32 {
    u32::from_le_bytes(b[4..8].try_into().expect("4"))
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Opcode.
    pub op: Op,
    /// Flags.
    pub flags: u8,
    /// Echoed in the response.
    pub id: u32,
    /// Key (HELLO: session id).
    pub key: [u8; 16],
    /// Lease generation (HELLO: protocol version).
    pub generation: u64,
    /// Pool byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

impl Request {
    /// Encode.
    pub fn encode(&self) -> [u8; REQ_LEN] {
        let mut b = [0u8; REQ_LEN];
        b[0] = self.op as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..24].copy_from_slice(&self.key);
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode; `None` for an unknown opcode, unknown flags or nonzero reserved bytes.
    pub fn decode(b: &[u8; REQ_LEN]) -> Option<Self> {
        let op = match b[0] {
            1 => Op::Hello,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Flush,
            _ => return None,
        };
        let flags = b[1];
        if flags & !FLAG_PERSIST != 0 || (flags != 0 && op != Op::Write) || b[2..4] != [0, 0] || b[44..48] != [0; 4] {
            return None;
        }
        Some(Self {
            op,
            flags,
            id: u32::from_le_bytes(b[4..8].try_into().expect("4")),
            key: b[8..24].try_into().expect("16"),
            generation: u64::from_le_bytes(b[24..32].try_into().expect("8")),
            offset: u64::from_le_bytes(b[32..40].try_into().expect("8")),
            len: u32::from_le_bytes(b[40..44].try_into().expect("4")),
        })
    }
}

/// Encode a response header.
pub fn response(id: u32, status: Status, len: u32) -> [u8; RESP_LEN] {
    let mut b = [0u8; RESP_LEN];
    b[0..4].copy_from_slice(&id.to_le_bytes());
    b[4] = status as u8;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b
}

/// Decode a response header: `(id, status, len)`.
pub fn decode_response(b: &[u8; RESP_LEN]) -> Option<(u32, Status, u32)> {
    Some((
        u32::from_le_bytes(b[0..4].try_into().expect("4")),
        Status::from_u8(b[4])?,
        u32::from_le_bytes(b[8..12].try_into().expect("4")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_roundtrip_and_junk_is_rejected() {
        let r =
            Request { op: Op::Write, flags: FLAG_PERSIST, id: 9, key: [3; 16], generation: 4, offset: 8192, len: 100 };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] = 9;
        assert_eq!(Request::decode(&bad), None);
        let mut bad = r.encode();
        bad[45] = 1;
        assert_eq!(Request::decode(&bad), None);
        let read_with_flag = Request { op: Op::Read, ..r };
        assert_eq!(Request::decode(&read_with_flag.encode()), None);
        assert_eq!(decode_response(&response(5, Status::Revoked, 0)), Some((5, Status::Revoked, 0)));
        for s in 0..=13 {
            assert_eq!(Status::from_u8(s).map(|x| x as u8), Some(s));
        }
        assert_eq!(Status::from_u8(14), None);
    }
}
