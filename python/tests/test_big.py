"""A 1 GiB transfer through one lease: one call each way, on the caller's buffers, with the
process's memory flat (no copy of the data, no per-chunk Python objects)."""

from __future__ import annotations

import resource
import time

import pytest

import rdax
from daemon import Daemon

GIB = 1 << 30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def big_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("rdaxd-big"), pool_size="1280M")
    yield d
    d.stop()


def test_one_gib_through_a_lease_with_flat_memory(big_daemon, capsys):
    c = rdax.Client(big_daemon.endpoint, token=big_daemon.token)
    c.create("big/one", size=GIB)
    src = bytearray(GIB)
    # A pattern that differs per MiB, so a misplaced chunk would show.
    pattern = bytes(range(256)) * 4096
    for i in range(0, GIB, 1 << 20):
        src[i : i + (1 << 20)] = pattern
        src[i : i + 8] = i.to_bytes(8, "little")
    dst = bytearray(GIB)
    dst[::4096] = b"\x01" * (GIB // 4096)  # touch every page: resident before measuring
    with c.session() as s, s.acquire("big/one", mode="rw") as lease:
        base, base_peak = rss_bytes(), peak_rss_bytes()
        t0 = time.monotonic()
        lease.write(0, src)
        t1 = time.monotonic()
        lease.read_into(0, dst)
        t2 = time.monotonic()
        grew, peak_grew = rss_bytes() - base, peak_rss_bytes() - max(base_peak, base)
    assert dst == src, "the bytes read back differ from those written"
    # Both 1 GiB buffers were resident before; a copy of either would add 1 GiB.
    assert grew < 64 << 20, f"resident memory grew by {grew >> 20} MiB during the transfer"
    assert peak_grew < 64 << 20, f"peak resident memory grew by {peak_grew >> 20} MiB during the transfer"
    with capsys.disabled():
        print(f"\n1 GiB lease write {GIB / (t1 - t0) / 1e6:.0f} MB/s, read_into {GIB / (t2 - t1) / 1e6:.0f} MB/s "
              f"(rss +{grew >> 20} MiB, peak +{max(peak_grew, 0) >> 20} MiB)")
    c.rm("big/one")
