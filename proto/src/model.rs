//! Validated domain types. Every field that arrives off the wire is checked here, once.

use crate::pb;

/// Longest namespace, bytes.
pub const MAX_NAMESPACE: usize = 64;
/// Longest object name, bytes.
pub const MAX_NAME: usize = 128;
/// Largest list page.
pub const MAX_LIST_LIMIT: u32 = 1000;
/// List page size when the request says 0.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// Longest session client name, bytes.
pub const MAX_CLIENT_NAME: usize = 128;

/// A message that can never be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A required field is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A namespace or name breaks the naming rules.
    #[error("invalid {field}: {reason}")]
    InvalidName {
        /// `namespace` or `name`.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A field has a value outside its domain.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

impl From<ProtocolError> for tonic::Status {
    fn from(e: ProtocolError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Check a namespace: 1–64 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_namespace(ns: &str) -> Result<(), ProtocolError> {
    let bad = |reason| Err(ProtocolError::InvalidName { field: "namespace", reason });
    if ns.is_empty() {
        return bad("empty");
    }
    if ns.len() > MAX_NAMESPACE {
        return bad("longer than 64 bytes");
    }
    if ns == "." || ns == ".." {
        return bad("`.` and `..` are reserved");
    }
    if !ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return bad("only ASCII letters, digits, `.`, `_` and `-` are allowed");
    }
    Ok(())
}

/// Check an object name: 1–128 bytes of UTF-8 without control characters.
pub fn validate_name(name: &str) -> Result<(), ProtocolError> {
    let bad = |reason| Err(ProtocolError::InvalidName { field: "name", reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 128 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("control characters are not allowed");
    }
    Ok(())
}

/// A validated object name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// Validate a namespace and name.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self, ProtocolError> {
        let (namespace, name) = (namespace.into(), name.into());
        validate_namespace(&namespace)?;
        validate_name(&name)?;
        Ok(Self { namespace, name })
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl TryFrom<Option<pb::ObjectRef>> for ObjectKey {
    type Error = ProtocolError;
    fn try_from(r: Option<pb::ObjectRef>) -> Result<Self, ProtocolError> {
        let r = r.ok_or(ProtocolError::Missing("object"))?;
        Self::new(r.namespace, r.name)
    }
}

impl From<&ObjectKey> for pb::ObjectRef {
    fn from(k: &ObjectKey) -> Self {
        pb::ObjectRef { namespace: k.namespace.clone(), name: k.name.clone() }
    }
}

/// A byte range whose end does not overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

impl ByteRange {
    /// Check that `offset + length` fits in 64 bits.
    pub fn new(offset: u64, length: u64) -> Result<Self, ProtocolError> {
        offset
            .checked_add(length)
            .ok_or(ProtocolError::Invalid { field: "length", reason: "offset + length overflows 64 bits" })?;
        Ok(Self { offset, length })
    }
}

/// `Create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateObject {
    /// Object.
    pub key: ObjectKey,
    /// Initial size.
    pub size: u64,
    /// A block volume.
    pub volume: bool,
    /// A volume left unallocated.
    pub sparse: bool,
}

impl TryFrom<pb::CreateRequest> for CreateObject {
    type Error = ProtocolError;
    fn try_from(r: pb::CreateRequest) -> Result<Self, ProtocolError> {
        if r.sparse && !r.volume {
            return Err(ProtocolError::Invalid { field: "sparse", reason: "only volumes have this choice" });
        }
        Ok(Self { key: r.object.try_into()?, size: r.size, volume: r.volume, sparse: r.sparse })
    }
}

/// `Resize`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeObject {
    /// Object.
    pub key: ObjectKey,
    /// New size.
    pub size: u64,
    /// Only grow: an object already at least `size` bytes long is left as it is.
    pub grow_only: bool,
}

impl TryFrom<pb::ResizeRequest> for ResizeObject {
    type Error = ProtocolError;
    fn try_from(r: pb::ResizeRequest) -> Result<Self, ProtocolError> {
        Ok(Self { key: r.object.try_into()?, size: r.size, grow_only: r.grow_only })
    }
}

/// `PunchHole`: a non-empty range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchHole {
    /// Object.
    pub key: ObjectKey,
    /// Range to deallocate.
    pub range: ByteRange,
}

impl TryFrom<pb::PunchHoleRequest> for PunchHole {
    type Error = ProtocolError;
    fn try_from(r: pb::PunchHoleRequest) -> Result<Self, ProtocolError> {
        if r.length == 0 {
            return Err(ProtocolError::Invalid { field: "length", reason: "must be at least 1" });
        }
        Ok(Self { key: r.object.try_into()?, range: ByteRange::new(r.offset, r.length)? })
    }
}

/// `List`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListObjects {
    /// Namespace.
    pub namespace: String,
    /// Start strictly after this name.
    pub after: Option<String>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

impl TryFrom<pb::ListRequest> for ListObjects {
    type Error = ProtocolError;
    fn try_from(r: pb::ListRequest) -> Result<Self, ProtocolError> {
        validate_namespace(&r.namespace)?;
        let limit = match r.limit {
            0 => DEFAULT_LIST_LIMIT,
            l if l > MAX_LIST_LIMIT => {
                return Err(ProtocolError::Invalid { field: "limit", reason: "at most 1000" });
            }
            l => l,
        };
        let after = (!r.after.is_empty()).then_some(r.after);
        Ok(Self { namespace: r.namespace, after, limit })
    }
}

/// `ListPg`: one placement group's objects, over all namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPgObjects {
    /// The PG.
    pub pg: u32,
    /// Of this many (at least 1, more than `pg`).
    pub pgs: u32,
    /// Start strictly after this (namespace, name).
    pub after: Option<(String, String)>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

impl TryFrom<pb::ListPgRequest> for ListPgObjects {
    type Error = ProtocolError;
    fn try_from(r: pb::ListPgRequest) -> Result<Self, ProtocolError> {
        if r.pgs == 0 || r.pg >= r.pgs {
            return Err(ProtocolError::Invalid { field: "pg", reason: "must be below pgs (at least 1)" });
        }
        let limit = match r.limit {
            0 => DEFAULT_LIST_LIMIT,
            l if l > MAX_LIST_LIMIT => {
                return Err(ProtocolError::Invalid { field: "limit", reason: "at most 1000" });
            }
            l => l,
        };
        let after = if r.after_namespace.is_empty() && r.after_name.is_empty() {
            None
        } else {
            validate_namespace(&r.after_namespace)?;
            Some((r.after_namespace, r.after_name))
        };
        Ok(Self { pg: r.pg, pgs: r.pgs, after, limit })
    }
}

/// `Read`: `length == None` reads to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadObject {
    /// Object.
    pub key: ObjectKey,
    /// First byte.
    pub offset: u64,
    /// Bytes, or to the end.
    pub length: Option<u64>,
    /// Requested chunk size (0 = server default).
    pub chunk_size: u32,
}

impl TryFrom<pb::ReadRequest> for ReadObject {
    type Error = ProtocolError;
    fn try_from(r: pb::ReadRequest) -> Result<Self, ProtocolError> {
        let length = (r.length != 0).then_some(r.length);
        if let Some(l) = length {
            ByteRange::new(r.offset, l)?;
        }
        Ok(Self { key: r.object.try_into()?, offset: r.offset, length, chunk_size: r.chunk_size })
    }
}

/// The header of a `Write` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteStart {
    /// Object.
    pub key: ObjectKey,
    /// Where the first byte goes.
    pub offset: u64,
    /// Persist before replying.
    pub persist: bool,
    /// Grow the object as needed.
    pub extend: bool,
}

impl TryFrom<Option<pb::WriteHeader>> for WriteStart {
    type Error = ProtocolError;
    fn try_from(h: Option<pb::WriteHeader>) -> Result<Self, ProtocolError> {
        let h = h.ok_or(ProtocolError::Missing("header (in the first message of a write stream)"))?;
        Ok(Self { key: h.object.try_into()?, offset: h.offset, persist: h.persist, extend: h.extend })
    }
}

/// `Flush`: `length == None` flushes to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushObject {
    /// Object.
    pub key: ObjectKey,
    /// First byte.
    pub offset: u64,
    /// Bytes, or to the end.
    pub length: Option<u64>,
}

impl TryFrom<pb::FlushRequest> for FlushObject {
    type Error = ProtocolError;
    fn try_from(r: pb::FlushRequest) -> Result<Self, ProtocolError> {
        let length = (r.length != 0).then_some(r.length);
        if let Some(l) = length {
            ByteRange::new(r.offset, l)?;
        }
        Ok(Self { key: r.object.try_into()?, offset: r.offset, length })
    }
}

/// A session id: 128 random bits as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::str::FromStr for SessionId {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, ProtocolError> {
        let bad = ProtocolError::Invalid { field: "session_id", reason: "must be 32 hex digits" };
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad);
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad.clone())?;
        }
        Ok(Self(out))
    }
}

/// A session's data-plane credential: 128 random bits, sent once in `SessionOpened` as 32
/// hex digits and presented by TCP and RDMA HELLO. Unlike the session id it is never logged
/// or listed: its `Debug` shows nothing of it, and it has no `Display`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionSecret(pub [u8; 16]);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

impl SessionSecret {
    /// The 32 hex digits, for the one place that must send or store them.
    pub fn expose_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 32 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, ProtocolError> {
        let id: SessionId = s
            .trim()
            .parse()
            .map_err(|_| ProtocolError::Invalid { field: "session_secret", reason: "must be 32 hex digits" })?;
        Ok(Self(id.0))
    }
}

/// The first message of a session stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSession {
    /// Label for administrators.
    pub client_name: String,
    /// Session to resume.
    pub resume: Option<SessionId>,
}

impl TryFrom<pb::OpenSession> for OpenSession {
    type Error = ProtocolError;
    fn try_from(o: pb::OpenSession) -> Result<Self, ProtocolError> {
        if o.client_name.len() > MAX_CLIENT_NAME || o.client_name.chars().any(char::is_control) {
            return Err(ProtocolError::Invalid {
                field: "client_name",
                reason: "at most 128 bytes, no control characters",
            });
        }
        let resume = if o.resume_session_id.is_empty() { None } else { Some(o.resume_session_id.parse()?) };
        Ok(Self { client_name: o.client_name, resume })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(ns: &str, name: &str) -> Option<pb::ObjectRef> {
        Some(pb::ObjectRef { namespace: ns.into(), name: name.into() })
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_namespace("tenant-1.prod_a").is_ok());
        for bad in ["", "..", "a/b", "ns space", &"x".repeat(65), "ü"] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("volume 01/ü").is_ok());
        for bad in ["", "a\nb", "\0", &"n".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ObjectKey::try_from(None), Err(ProtocolError::Missing("object")));
    }

    #[test]
    fn ranges_and_limits_are_checked_on_receipt() {
        let punch = |o, l| PunchHole::try_from(pb::PunchHoleRequest { object: obj("n", "o"), offset: o, length: l });
        assert!(punch(0, 0).is_err());
        assert!(punch(u64::MAX, 2).is_err());
        assert!(punch(5, 5).is_ok());
        let read =
            ReadObject::try_from(pb::ReadRequest { object: obj("n", "o"), offset: 1, length: u64::MAX, chunk_size: 0 });
        assert!(read.is_err());
        let list =
            |limit| ListObjects::try_from(pb::ListRequest { namespace: "n".into(), after: String::new(), limit });
        assert_eq!(list(0).unwrap().limit, DEFAULT_LIST_LIMIT);
        assert!(list(1001).is_err());
        let status: tonic::Status = punch(0, 0).unwrap_err().into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn session_ids_roundtrip_and_reject_junk() {
        let id = SessionId([0xAB; 16]);
        assert_eq!(id.to_string().parse::<SessionId>(), Ok(id));
        for bad in ["", "zz", &"g".repeat(32), &"a".repeat(31), &"é".repeat(16)] {
            assert!(bad.parse::<SessionId>().is_err(), "{bad:?}");
        }
    }
}

/// Lease access mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAccess {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// `Leases.Acquire`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireLease {
    /// Holder.
    pub session: SessionId,
    /// Object.
    pub key: ObjectKey,
    /// Range.
    pub range: ByteRange,
    /// Mode.
    pub access: LeaseAccess,
    /// Data plane: RDMA (true) or TCP.
    pub rdma: bool,
}

impl TryFrom<pb::AcquireRequest> for AcquireLease {
    type Error = ProtocolError;
    fn try_from(r: pb::AcquireRequest) -> Result<Self, ProtocolError> {
        let access = match pb::LeaseMode::try_from(r.mode) {
            Ok(pb::LeaseMode::Read) => LeaseAccess::Read,
            Ok(pb::LeaseMode::ReadWrite) => LeaseAccess::ReadWrite,
            _ => return Err(ProtocolError::Invalid { field: "mode", reason: "must be READ or READ_WRITE" }),
        };
        if r.length == 0 {
            return Err(ProtocolError::Invalid { field: "length", reason: "must be at least 1" });
        }
        Ok(Self {
            session: r.session_id.parse()?,
            key: r.object.try_into()?,
            range: ByteRange::new(r.offset, r.length)?,
            access,
            rdma: match pb::Transport::try_from(r.transport) {
                Ok(pb::Transport::Unspecified | pb::Transport::Tcp) => false,
                Ok(pb::Transport::Rdma) => true,
                Err(_) => return Err(ProtocolError::Invalid { field: "transport", reason: "must be TCP or RDMA" }),
            },
        })
    }
}
