"""rdax: remote persistent memory, from Python.

A client for ``rdaxd`` built on the Rust SDK (PyO3): objects over gRPC, and *leases* whose
reads and writes move bytes one-sided over the SDK's data plane (TCP, or RDMA in a build with
the ``rdma`` feature), straight from and into your buffers.

    import rdax

    c = rdax.Client("http://127.0.0.1:7400", token=open("token").read().strip())
    c.put("demo/hello", b"hello pmem")
    assert c.get("demo/hello") == b"hello pmem"

    c.create("demo/big", size=1 << 30)
    with c.session() as s, s.acquire("demo/big", mode="rw") as lease:
        lease.write(0, memoryview(data), persist=True)   # no copy
        lease.read_into(0, out)                           # bytearray, numpy array, ...

Every call blocks its thread with the GIL released, so threads overlap. ``rdax.aio`` has
the same API for asyncio. Offsets given to a lease are object offsets, inside its range.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Callable, Iterator, Optional, Union

from . import _native
from ._errors import *  # noqa: F401,F403
from ._errors import __all__ as _error_names
from ._native import LeaseInfo, Notice, ObjectStat, SessionInfo
from ._native import Lease

__all__ = [
    "Client",
    "Session",
    "Lease",
    "Notice",
    "ObjectStat",
    "LeaseInfo",
    "SessionInfo",
    "RDMA",
    "default_endpoint",
    *_error_names,
]

#: Whether this build can use RDMA (built with the ``rdma`` feature).
RDMA: bool = _native.RDMA

PemSource = Union[str, "os.PathLike[str]", bytes]


def default_endpoint() -> str:
    """The endpoint used when none is given: ``$RDAX_ENDPOINT``, else the first local admin
    socket that exists (as ``rdaxctl`` picks it), else ``http://127.0.0.1:7400``."""
    return os.environ.get("RDAX_ENDPOINT") or _native.default_endpoint()


def _pem(what: str, v: Optional[PemSource]) -> Optional[bytes]:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    try:
        with open(os.fspath(v), "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"{what}: cannot read {v!r}: {e.strerror or e}") from e  # noqa: F405


def _token(token: Optional[str], token_file: Optional[Union[str, "os.PathLike[str]"]]) -> Optional[str]:
    if token is not None and token_file is not None:
        raise InvalidArgument("give token or token_file, not both")  # noqa: F405
    if token is None and token_file is None:
        token = os.environ.get("RDAX_TOKEN") or None
        token_file = os.environ.get("RDAX_TOKEN_FILE") or None
        if token is not None:
            return token
    if token_file is not None:
        try:
            with open(os.fspath(token_file), encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise InvalidArgument(f"token_file: cannot read {token_file!r}: {e.strerror or e}") from e  # noqa: F405
    return token


class Client:
    """A connection to one ``rdaxd``.

    ``endpoint``: ``http://host:port``, ``https://host:port`` (give ``ca``), or
    ``unix:/path/rdaxd.sock`` (the admin socket: no token needed for its owner). Default:
    :func:`default_endpoint`.

    ``token`` or ``token_file``: the bearer token (default ``$RDAX_TOKEN``, then
    ``$RDAX_TOKEN_FILE``). ``ca``, ``cert``, ``key``: PEM as a path or as bytes; ``cert`` and
    ``key`` make a client certificate for mutual TLS. ``domain``: the name to check the
    daemon's certificate against (default: the endpoint's host).

    Object names are ``"namespace/name"``. Raises :class:`ConnectError` when the daemon
    cannot be reached. A client is safe to share between threads.
    """

    def __init__(
        self,
        endpoint: Optional[str] = None,
        *,
        token: Optional[str] = None,
        token_file: Optional[Union[str, "os.PathLike[str]"]] = None,
        ca: Optional[PemSource] = None,
        cert: Optional[PemSource] = None,
        key: Optional[PemSource] = None,
        domain: Optional[str] = None,
        connect_timeout: float = 5.0,
        request_timeout: Optional[float] = 30.0,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self._n = _native.Client(
            self.endpoint,
            token=_token(token, token_file),
            ca_pem=_pem("ca", ca),
            cert_pem=_pem("cert", cert),
            key_pem=_pem("key", key),
            domain=domain,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
        )

    def __repr__(self) -> str:
        return f"rdax.Client({self.endpoint!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection (sessions opened from it stay usable until closed)."""
        self._n = None  # type: ignore[assignment]

    @property
    def _native(self) -> "_native.Client":
        if self._n is None:
            raise FailedPrecondition("the client is closed")  # noqa: F405
        return self._n

    # -- the pool ----------------------------------------------------------------------
    def info(self) -> dict:
        """The pool: path, mode, persistence, sizes, server version, RDMA state."""
        return self._native.info()

    def stats(self) -> dict:
        """Pool usage: objects, blocks used/free/held, fragmentation, sessions."""
        return self._native.stats()

    # -- objects -----------------------------------------------------------------------
    def create(self, name: str, size: int = 0) -> ObjectStat:
        """Create an empty (sparse) object of ``size`` bytes. :class:`AlreadyExists` if taken."""
        return self._native.create(name, size)

    def stat(self, name: str) -> ObjectStat:
        """An object's size and allocation. :class:`NotFound` if there is none."""
        return self._native.stat(name)

    def ls(self, namespace: str, *, page_size: int = 1000) -> Iterator[ObjectStat]:
        """Every object of ``namespace``, in name order, fetched ``page_size`` at a time."""
        after: Optional[str] = None
        while True:
            objects, after = self._native.list_page(namespace, after, page_size)
            yield from objects
            if after is None:
                return

    def put(self, name: str, data: object, *, persist: bool = True) -> int:
        """Replace the object's contents with ``data`` (any bytes-like object), creating it if
        needed. Durable on return unless ``persist=False``. Returns the bytes written. The
        data is copied once into the gRPC stream; a lease's ``write`` copies nothing."""
        return self._native.put(name, data, persist)

    def get(self, name: str, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The object's bytes: all of them, or ``length`` from ``offset``."""
        return self._native.get(name, offset, length)

    def rm(self, name: str, *, force: bool = False) -> None:
        """Delete the object. Leases on it are recalled first; ``force`` revokes them at once."""
        self._native.rm(name, force)

    def resize(self, name: str, size: int) -> ObjectStat:
        """Grow (sparse) or shrink the object. Leases past the new end are recalled first."""
        return self._native.resize(name, size)

    def punch(self, name: str, offset: int, length: int) -> None:
        """Free ``[offset, offset+length)``; it reads as zeros. Covering leases are recalled."""
        self._native.punch(name, offset, length)

    def flush(self, name: str, offset: int = 0, length: Optional[int] = None) -> None:
        """Make ``[offset, offset+length)`` (default: to the end) durable."""
        self._native.flush(name, offset, length)

    # -- sessions ----------------------------------------------------------------------
    def session(
        self,
        client_name: str = "python",
        *,
        ignore_recalls: bool = False,
        transport: str = "auto",
        on_notice: Optional[Callable[[Notice], None]] = None,
    ) -> "Session":
        """Open a session (use it as a context manager: it is closed on exit).

        ``transport``: ``"auto"`` (RDMA when both sides can, else TCP), ``"tcp"`` or
        ``"rdma"``. ``on_notice``: called on a background thread with each :class:`Notice`
        (recalls, revocations, the session's end); without it, read them with
        :meth:`Session.notices`. By default a recalled lease is returned at once (after its
        operations in flight); ``ignore_recalls=True`` only reports recalls, and such a lease
        is revoked at the daemon's break deadline (:class:`Revoked` from then on).
        """
        return Session(self, self._native.session(client_name, ignore_recalls, transport), on_notice)

    # -- administration ----------------------------------------------------------------
    def leases(self, session_id: Optional[str] = None) -> list[LeaseInfo]:
        """Leases of one session, or every lease (administrators)."""
        return self._native.leases(session_id)

    def revoke_lease(self, lease_id: int, *, immediate: bool = False) -> None:
        """Recall a lease now (administrators); with ``immediate``, revoke it at once."""
        self._native.revoke_lease(lease_id, immediate)

    def sessions(self) -> list[SessionInfo]:
        """Every session: id, principal, client name, peer (administrators). No secrets."""
        return self._native.sessions()

    def evict_session(self, session_id: str, reason: str = "evicted by an administrator") -> None:
        """End a session now (administrators)."""
        self._native.evict_session(session_id, reason)


class Session:
    """An open session: acquire leases through it. Kept alive in the background; closed by
    :meth:`close` or on leaving a ``with`` block (its leases end with it)."""

    def __init__(self, client: Client, native: "_native.Session", on_notice: Optional[Callable[[Notice], None]]):
        # The connection, kept even if the Client is closed: the session stays usable.
        self._client_n = client._native
        self._n = native
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if on_notice is not None:
            self._thread = threading.Thread(
                target=_pump, args=(native, on_notice, self._stop), name=f"rdax-notices-{native.id}", daemon=True
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"rdax.Session(id={self._n.id!r})"

    @property
    def id(self) -> str:
        """The session id: a public handle, shown to administrators; not a credential."""
        return self._n.id

    @property
    def ttl(self) -> float:
        """Seconds the daemon keeps the session after its stream breaks."""
        return self._n.ttl

    def acquire(
        self,
        name: str,
        offset: int = 0,
        length: Optional[int] = None,
        mode: str = "rw",
        *,
        exclusive: bool = False,
    ) -> Lease:
        """A lease on ``[offset, offset+length)`` of ``name`` (default: to the object's end).

        ``mode``: ``"r"`` or ``"rw"`` (``"rw"`` allocates holes first). ``exclusive``: recall
        every other lease over the range first and refuse new ones until this one ends. While
        the range is being recalled the daemon answers :class:`Unavailable`; this retries for
        a bounded time. Use the lease as a context manager: it is released on exit.
        """
        return self._n.acquire(self._client_n, name, offset, length, mode, exclusive)

    def next_notice(self, timeout: Optional[float] = None) -> Optional[Notice]:
        """The next notice; ``None`` if ``timeout`` seconds pass first or the session is over."""
        if self._thread is not None:
            raise FailedPrecondition("this session's notices go to its on_notice callback")  # noqa: F405
        notice, _ended = self._n.next_notice(timeout)
        return notice

    def notices(self, timeout: Optional[float] = None) -> Iterator[Notice]:
        """Notices as they come, until the session is over (or until none came for
        ``timeout`` seconds, if given)."""
        if self._thread is not None:
            raise FailedPrecondition("this session's notices go to its on_notice callback")  # noqa: F405
        while True:
            notice, ended = self._n.next_notice(timeout)
            if notice is None:
                return
            yield notice

    def close(self) -> None:
        """End the session now. Closing again does nothing."""
        self._stop.set()
        self._n.close()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except Error:  # noqa: F405
            if exc_type is None:
                raise

    def __del__(self) -> None:
        # The notice thread holds only the native session; let it end so that is freed.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def _pump(native: "_native.Session", callback: Callable[[Notice], None], stop: threading.Event) -> None:
    """Deliver notices to ``callback`` until the session is over or closed."""
    while not stop.is_set():
        try:
            notice, ended = native.next_notice(0.2)
        except Error:  # noqa: F405
            return
        if ended:
            return
        if notice is None:
            continue
        try:
            callback(notice)
        except Exception:
            print(f"rdax: the on_notice callback raised on {notice!r}:", file=sys.stderr)
            traceback.print_exc()
