"""Type stubs for the native module (the Rust SDK under PyO3). Use the ``rdax`` package."""

from typing import Optional

from typing_extensions import Buffer

RDMA: bool

def default_endpoint() -> str: ...

class ObjectStat:
    """An object's metadata."""

    id: int
    namespace: str
    name: str
    size: int
    allocated_bytes: int
    extents: int
    created_unix_ns: int
    volume: bool
    @property
    def path(self) -> str:
        """``namespace/name``."""

class LeaseInfo:
    """A lease as the daemon lists it."""

    lease_id: int
    session_id: str
    path: str
    offset: int
    length: int
    mode: str
    generation: int
    state: str
    exclusive: bool
    expires_in_ms: int

class SessionInfo:
    """A session as the daemon lists it (no secret is in it)."""

    session_id: str
    client_name: str
    principal: str
    peer: str
    opened_unix_ms: int
    idle_ms: int
    connected: bool

class Notice:
    """Something the daemon told a session, or that happened to it."""

    kind: str
    """``"recalled"``, ``"revoked"``, ``"ended"`` or ``"lost"``."""
    lease_id: Optional[int]
    """The lease, for ``"recalled"`` and ``"revoked"``."""
    reason: str

class Lease:
    """A lease on ``[offset, offset+length)`` of an object. Offsets given to its methods are
    object offsets inside that range. A context manager: released on exit. Safe to use
    from several threads at once."""

    @property
    def id(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def path(self) -> str:
        """``namespace/name`` of the object."""
    @property
    def mode(self) -> str:
        """``"r"`` or ``"rw"``."""
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def active(self) -> bool:
        """False once recalled, released or revoked."""
    @property
    def rdma(self) -> bool:
        """Whether bytes move over RDMA (else the TCP data plane)."""
    def write(self, offset: int, data: Buffer, persist: bool = False) -> None:
        """Write ``data`` (bytes, bytearray, memoryview, array, numpy array: any C-contiguous
        buffer) at ``offset``, straight from its memory. Durable on return with ``persist``;
        otherwise once flushed."""
    def read_into(self, offset: int, buffer: Buffer) -> int:
        """Fill the writable ``buffer`` from ``offset``, in place. Returns the bytes read."""
    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset``, read straight into a new ``bytes``."""
    def flush(self, offset: Optional[int] = None, length: Optional[int] = None) -> None:
        """Make ``[offset, offset+length)`` durable (default: the whole lease)."""
    def release(self) -> None:
        """Return the lease (after this handle's operations in flight). Idempotent."""
    def __enter__(self) -> "Lease": ...
    def __exit__(self, exc_type: object = None, exc: object = None, tb: object = None) -> bool: ...

class Session:
    @property
    def id(self) -> str: ...
    @property
    def ttl(self) -> float: ...
    def acquire(
        self,
        client: Client,
        name: str,
        offset: int = 0,
        length: Optional[int] = None,
        mode: str = "rw",
        exclusive: bool = False,
    ) -> Lease: ...
    def next_notice(self, timeout: Optional[float] = None) -> tuple[Optional[Notice], bool]: ...
    def close(self) -> None: ...

class Client:
    def __init__(
        self,
        endpoint: str,
        token: Optional[str] = None,
        ca_pem: Optional[bytes] = None,
        cert_pem: Optional[bytes] = None,
        key_pem: Optional[bytes] = None,
        domain: Optional[str] = None,
        connect_timeout: float = 5.0,
        request_timeout: Optional[float] = 30.0,
    ) -> None: ...
    def info(self) -> dict: ...
    def stats(self) -> dict: ...
    def create(self, name: str, size: int = 0) -> ObjectStat: ...
    def stat(self, name: str) -> ObjectStat: ...
    def resize(self, name: str, size: int) -> ObjectStat: ...
    def punch(self, name: str, offset: int, length: int) -> None: ...
    def rm(self, name: str, force: bool = False) -> None: ...
    def flush(self, name: str, offset: int = 0, length: Optional[int] = None) -> None: ...
    def list_page(
        self, namespace: str, after: Optional[str] = None, limit: int = 1000
    ) -> tuple[list[ObjectStat], Optional[str]]: ...
    def put(self, name: str, data: Buffer, persist: bool = True) -> int: ...
    def get(self, name: str, offset: int = 0, length: Optional[int] = None) -> bytes: ...
    def session(self, client_name: str = "python", ignore_recalls: bool = False, transport: str = "auto") -> Session: ...
    def leases(self, session_id: Optional[str] = None) -> list[LeaseInfo]: ...
    def revoke_lease(self, lease_id: int, immediate: bool = False) -> None: ...
    def sessions(self) -> list[SessionInfo]: ...
    def evict_session(self, session_id: str, reason: str = ...) -> None: ...
