"""rdax.aio: the same operations from asyncio, overlapping on the event loop."""

from __future__ import annotations

import asyncio

import pytest

import rdax
import rdax.aio


def test_aio_round_trip_and_overlap(daemon, ns):
    async def main():
        c = await rdax.aio.Client.connect(daemon.endpoint, token=daemon.token)
        async with c:
            # several puts at once on the loop
            await asyncio.gather(*(c.put(f"{ns}/o{i}", bytes([i]) * 4096) for i in range(8)))
            names = [o.name async for o in c.ls(ns)]
            assert names == [f"o{i}" for i in range(8)]
            assert await c.get(f"{ns}/o3") == b"\x03" * 4096
            async with await c.session() as s:
                async with await s.acquire(f"{ns}/o5", mode="rw") as lease:
                    await lease.write(0, b"async")
                    buf = bytearray(5)
                    assert await lease.read_into(0, buf) == 5 and buf == b"async"
                    assert lease.active
            with pytest.raises(rdax.NotFound):
                await c.stat(f"{ns}/none")
            for i in range(8):
                await c.rm(f"{ns}/o{i}")

    asyncio.run(main())
