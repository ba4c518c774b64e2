"""The exceptions rdax raises: one per error kind of the Rust SDK, all under :class:`Error`."""

from __future__ import annotations

__all__ = [
    "Error",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "OutOfRange",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "Unavailable",
    "DeadlineExceeded",
    "ConnectError",
    "ProtocolError",
    "IoError",
    "Revoked",
    "Unsupported",
    "FailedPrecondition",
]


class Error(Exception):
    """Anything rdax reports. The message says what happened; the class says what to do."""


class InvalidArgument(Error, ValueError):
    """A bad name, size, range, mode or buffer: fix the call."""


class NotFound(Error, LookupError):
    """The object or session does not exist."""


class AlreadyExists(Error):
    """The name is taken."""


class OutOfRange(Error, IndexError):
    """A range reaches past the end of the object or outside the lease."""


class ResourceExhausted(Error):
    """The pool is full, or a limit was hit."""


class Unauthenticated(Error, PermissionError):
    """No credential, or a wrong one (token, client certificate)."""


class PermissionDenied(Error, PermissionError):
    """The credential is valid but its scopes do not allow this (or the session is another
    principal's)."""


class Unavailable(Error):
    """The daemon is shutting down, busy recalling the range, or unreachable for now:
    transient, retry later."""


class DeadlineExceeded(Error, TimeoutError):
    """A deadline passed."""


class ConnectError(Error, ConnectionError):
    """The connection could not be made (wrong endpoint, daemon down, TLS refused)."""


class ProtocolError(Error):
    """The daemon or the client broke a rule of the protocol (a bug: please report it)."""


class IoError(Error, OSError):
    """A local I/O error."""


class Revoked(Error):
    """The lease was recalled, released or revoked: its keys no longer work. Acquire again."""


class Unsupported(Error):
    """This build, host or daemon cannot do this (e.g. RDMA asked for but not available)."""


class FailedPrecondition(Error):
    """The request conflicts with the state of the range, lease or session (another
    session's exclusive lease holds the range, the session is closed, ...)."""
