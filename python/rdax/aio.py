"""rdax for asyncio: the synchronous API with every call awaitable.

    import rdax.aio

    async with await rdax.aio.Client.connect("http://127.0.0.1:7400", token=t) as c:
        await c.put("demo/x", b"bytes")
        async with await c.session() as s:
            async with await s.acquire("demo/x") as lease:
                await lease.write(0, b"BYTES")

How it works: each call runs the native (Rust) operation on a worker thread of the event
loop's default executor (``asyncio.to_thread``), with the GIL released for the whole
operation, so the loop keeps running and several calls overlap. Bytes still move straight
from and into your buffers: a buffer must not be resized or reused until its call returns.
Cancelling the awaiting task stops waiting at once; the operation itself finishes (bounded)
on its thread, so the daemon's state stays consistent.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Optional

import rdax

__all__ = ["Client", "Session", "Lease"]


async def _run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(f, *args, **kwargs)


class Lease:
    """An awaitable :class:`rdax.Lease` (same methods; ``async with`` releases it)."""

    def __init__(self, lease: rdax.Lease):
        self.sync = lease

    def __getattr__(self, name: str) -> Any:  # id, offset, length, mode, active, rdma, path
        return getattr(self.sync, name)

    async def write(self, offset: int, data: Any, persist: bool = False) -> None:
        await _run(self.sync.write, offset, data, persist)

    async def read_into(self, offset: int, buffer: Any) -> int:
        return await _run(self.sync.read_into, offset, buffer)

    async def read(self, offset: int, n: int) -> bytes:
        return await _run(self.sync.read, offset, n)

    async def flush(self, offset: Optional[int] = None, length: Optional[int] = None) -> None:
        await _run(self.sync.flush, offset, length)

    async def release(self) -> None:
        await _run(self.sync.release)

    async def __aenter__(self) -> "Lease":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class Session:
    """An awaitable :class:`rdax.Session`."""

    def __init__(self, session: rdax.Session):
        self.sync = session

    @property
    def id(self) -> str:
        return self.sync.id

    async def acquire(self, name: str, offset: int = 0, length: Optional[int] = None, mode: str = "rw",
                      *, exclusive: bool = False) -> Lease:
        return Lease(await _run(self.sync.acquire, name, offset, length, mode, exclusive=exclusive))

    async def next_notice(self, timeout: Optional[float] = None) -> Optional[rdax.Notice]:
        return await _run(self.sync.next_notice, timeout)

    async def notices(self, timeout: Optional[float] = None) -> AsyncIterator[rdax.Notice]:
        """Notices until the session is over (or none came for ``timeout`` seconds)."""
        while True:
            n = await self.next_notice(timeout)
            if n is None:
                return
            yield n

    async def close(self) -> None:
        await _run(self.sync.close)

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """An awaitable :class:`rdax.Client`. Make one with ``await Client.connect(...)`` (same
    arguments as :class:`rdax.Client`)."""

    def __init__(self, client: rdax.Client):
        self.sync = client

    @classmethod
    async def connect(cls, endpoint: Optional[str] = None, **kwargs: Any) -> "Client":
        return cls(await _run(rdax.Client, endpoint, **kwargs))

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sync.close()

    async def info(self) -> dict:
        return await _run(self.sync.info)

    async def stats(self) -> dict:
        return await _run(self.sync.stats)

    async def create(self, name: str, size: int = 0) -> rdax.ObjectStat:
        return await _run(self.sync.create, name, size)

    async def stat(self, name: str) -> rdax.ObjectStat:
        return await _run(self.sync.stat, name)

    async def ls(self, namespace: str, *, page_size: int = 1000) -> AsyncIterator[rdax.ObjectStat]:
        after: Optional[str] = None
        while True:
            objects, after = await _run(self.sync._native.list_page, namespace, after, page_size)
            for o in objects:
                yield o
            if after is None:
                return

    async def put(self, name: str, data: Any, *, persist: bool = True) -> int:
        return await _run(self.sync.put, name, data, persist=persist)

    async def get(self, name: str, offset: int = 0, length: Optional[int] = None) -> bytes:
        return await _run(self.sync.get, name, offset, length)

    async def rm(self, name: str, *, force: bool = False) -> None:
        await _run(self.sync.rm, name, force=force)

    async def resize(self, name: str, size: int) -> rdax.ObjectStat:
        return await _run(self.sync.resize, name, size)

    async def punch(self, name: str, offset: int, length: int) -> None:
        await _run(self.sync.punch, name, offset, length)

    async def flush(self, name: str, offset: int = 0, length: Optional[int] = None) -> None:
        await _run(self.sync.flush, name, offset, length)

    async def session(self, client_name: str = "python", **kwargs: Any) -> Session:
        return Session(await _run(self.sync.session, client_name, **kwargs))

    async def leases(self, session_id: Optional[str] = None) -> list[rdax.LeaseInfo]:
        return await _run(self.sync.leases, session_id)

    async def revoke_lease(self, lease_id: int, *, immediate: bool = False) -> None:
        await _run(self.sync.revoke_lease, lease_id, immediate=immediate)

    async def sessions(self) -> list[rdax.SessionInfo]:
        return await _run(self.sync.sessions)
