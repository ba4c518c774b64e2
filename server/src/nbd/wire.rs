//! NBD wire constants and message encodings (NetworkBlockDevice/nbd `doc/proto.md`): the
//! fixed newstyle handshake, option replies, requests, and simple and structured replies.
//! Everything here is pure: bytes in, bytes out.

/// `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flags.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// FLUSH and FUA act across every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Options.
pub mod opt {
    /// End haggling, no error reporting.
    pub const EXPORT_NAME: u32 = 1;
    /// End the session.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export (`NBD_OPT_LIST`).
    pub const SERVER: u32 = 2;
    /// One piece of information (`NBD_OPT_INFO`, `NBD_OPT_GO`).
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Invalid option data.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// TLS first.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// `NBD_INFO_*`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A description.
    pub const DESCRIPTION: u16 = 2;
    /// Block-size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES: write the zeroes, do not punch.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ: do not fragment.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Every flag this server knows.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE;
}

/// Structured reply types.
pub mod reply {
    /// No payload (final).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error, with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Final chunk.
    pub const FLAG_DONE: u16 = 1;
}

/// Error values.
pub mod errno {
    /// Not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads zero.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// One option reply.
pub fn opt_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

impl Request {
    /// Decode a header; `None` if the magic is wrong (the stream is out of step).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if u32::from_be_bytes(b[0..4].try_into().expect("4")) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4")),
        })
    }
}

/// A simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// A structured reply chunk header, for a payload of `len` bytes that follows.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A structured error chunk (final), with a message for people.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    chunk_header(out, reply::FLAG_DONE, reply::ERROR, cookie, 6 + msg.len() as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max_payload: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max_payload.to_be_bytes());
    b
}

/// A reader over option data that refuses to run past its end.
pub struct Fields<'a>(pub &'a [u8]);

impl<'a> Fields<'a> {
    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_at_checked(2)?;
        self.0 = t;
        Some(u16::from_be_bytes(h.try_into().ok()?))
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }

    /// Whether everything was read.
    pub fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// The export name and information requests of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_go(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut f = Fields(data);
    let n = f.u32()? as usize;
    let name = f.bytes(n)?;
    let count = f.u16()? as usize;
    let mut reqs = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        reqs.push(f.u16()?);
    }
    f.done().then_some((name, reqs))
}

/// The export name and queries of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut f = Fields(data);
    let n = f.u32()? as usize;
    let name = f.bytes(n)?;
    let count = f.u32()? as usize;
    let mut queries = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let l = f.u32()? as usize;
        queries.push(f.bytes(l)?);
    }
    f.done().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_and_bad_magic_is_refused() {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&cflag::FUA.to_be_bytes());
        b[6..8].copy_from_slice(&cmd::WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::decode(&b).unwrap();
        assert_eq!((r.flags, r.kind, r.cookie, r.offset, r.len), (cflag::FUA, cmd::WRITE, 7, 4096, 512));
        b[0] ^= 1;
        assert_eq!(Request::decode(&b), None);
    }

    #[test]
    fn go_and_meta_options_parse_and_truncations_do_not() {
        let mut d = Vec::new();
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"a/vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(parse_go(&d), Some((&b"a/vol"[..], vec![info::BLOCK_SIZE, info::NAME])));
        for cut in 0..d.len() {
            assert_eq!(parse_go(&d[..cut]), None, "cut at {cut}");
        }
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_go(&long), None, "trailing bytes");
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_go(&huge), None, "a name length past the data");

        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.push(b'x');
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(parse_meta(&m), Some((&b"x"[..], vec![BASE_ALLOCATION.as_bytes()])));
        assert_eq!(parse_meta(&m[..m.len() - 1]), None);
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let mut o = Vec::new();
        opt_reply(&mut o, opt::GO, rep::ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(&o[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let mut e = Vec::new();
        error_chunk(&mut e, 9, errno::EINVAL, "past the end");
        assert_eq!(e.len(), 20 + 6 + 12);
        assert_eq!(u16::from_be_bytes([e[4], e[5]]), reply::FLAG_DONE);
        assert_eq!(u16::from_be_bytes([e[6], e[7]]), reply::ERROR);
        assert_eq!(u32::from_be_bytes(e[16..20].try_into().unwrap()), 18);
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
    }
}
