"""Leases: zero-copy writes and reads on any buffer, context managers, recalls handled and
ignored, revocation."""

from __future__ import annotations

import array
import threading
import time

import pytest

import rdax

try:
    import numpy as np
except ImportError:  # scripts/test-python.sh installs it; the numpy cases need it
    np = None


def test_write_read_round_trip_on_buffers(client, ns):
    client.create(f"{ns}/obj", size=1 << 20)
    with client.session("pytest") as s:
        with s.acquire(f"{ns}/obj", 0, 1 << 20, mode="rw") as lease:
            assert (lease.offset, lease.length, lease.mode, lease.path) == (0, 1 << 20, "rw", f"{ns}/obj")
            assert lease.active and not lease.rdma
            lease.write(0, b"hello ")
            lease.write(6, bytearray(b"pmem"), persist=True)
            lease.write(10, memoryview(b"xx!yy")[2:3])
            lease.write(4096, array.array("I", [1, 2, 3, 4]))
            assert lease.read(0, 11) == b"hello pmem!"
            buf = bytearray(11)
            assert lease.read_into(0, buf) == 11 and buf == b"hello pmem!"
            view = memoryview(bytearray(8))
            lease.read_into(2, view[2:6])
            assert bytes(view) == b"\0\0llo \0\0"
            out = array.array("I", [0] * 4)
            lease.read_into(4096, out)
            assert out.tolist() == [1, 2, 3, 4]
            lease.flush()
            lease.flush(0, 4096)
            # offsets are object offsets and must stay inside the lease
            with pytest.raises(rdax.OutOfRange):
                lease.write((1 << 20) - 2, b"abc")
            with pytest.raises(rdax.InvalidArgument):
                lease.read_into(0, b"bytes are read-only")
            with pytest.raises(rdax.InvalidArgument):
                lease.write(-1, b"x")
            ids = [l.lease_id for l in client.leases(s.id)]
            assert lease.id in ids
        # released on leaving the block
        assert not lease.active
        poll_gone(client, s.id, lease.id)
        with pytest.raises(rdax.Revoked):
            lease.write(0, b"after release")
        lease.release()  # again: nothing
    assert client.get(f"{ns}/obj", 0, 11) == b"hello pmem!"


@pytest.mark.skipif(np is None, reason="numpy is not installed")
def test_numpy_arrays_zero_copy(client, ns):
    a = np.arange(1 << 16, dtype=np.float64)
    client.create(f"{ns}/np", size=a.nbytes)
    with client.session() as s, s.acquire(f"{ns}/np") as lease:
        lease.write(0, a)
        b = np.empty_like(a)
        lease.read_into(0, b)
        assert np.array_equal(a, b)
        with pytest.raises(rdax.InvalidArgument):
            lease.read_into(0, np.zeros((64, 64))[:, ::2])  # not contiguous


def test_bad_lease_arguments(client, ns):
    client.create(f"{ns}/o", size=4096)
    with client.session() as s:
        with pytest.raises(rdax.InvalidArgument):
            s.acquire(f"{ns}/o", mode="x")
        with pytest.raises(rdax.NotFound):
            s.acquire(f"{ns}/missing")
        with pytest.raises(rdax.OutOfRange):
            s.acquire(f"{ns}/o", 0, 8192)
        with s.acquire(f"{ns}/o", mode="r") as ro:
            assert ro.mode == "r"
            assert ro.read(0, 16) == bytes(16)
    with pytest.raises(rdax.FailedPrecondition):
        s.acquire(f"{ns}/o")


def poll_gone(client, session_id, lease_id, deadline=10.0):
    end = time.monotonic() + deadline
    while lease_id in [l.lease_id for l in client.leases(session_id)]:
        assert time.monotonic() < end, f"lease {lease_id} still listed after {deadline} s"
        time.sleep(0.02)


def next_of_kind(session, kind, lease_id, deadline=15.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        n = session.next_notice(timeout=max(0.0, end - time.monotonic()))
        if n is not None and n.kind == kind and n.lease_id == lease_id:
            return n
    raise AssertionError(f"no {kind!r} notice for lease {lease_id} within {deadline} s")


def test_recall_handled_returns_the_lease(client, ns):
    client.put(f"{ns}/r", b"x" * 65536)
    with client.session() as s:
        lease = s.acquire(f"{ns}/r")
        # Truncating recalls the lease; the SDK returns it at once, so the resize completes
        # well before the 1 s break deadline would revoke it.
        t0 = time.monotonic()
        client.resize(f"{ns}/r", 0)
        took = time.monotonic() - t0
        n = next_of_kind(s, "recalled", lease.id)
        assert n.reason
        assert not lease.active
        with pytest.raises(rdax.Revoked):
            lease.read(0, 1)
        assert took < 30, took  # bounded (the daemon's break deadline is 1 s)
        lease.release()


def test_recall_ignored_is_revoked_at_the_deadline(client, ns):
    client.put(f"{ns}/ig", b"y" * 65536)
    with client.session(ignore_recalls=True) as s:
        lease = s.acquire(f"{ns}/ig")
        done = threading.Event()
        resize = threading.Thread(target=lambda: (client.resize(f"{ns}/ig", 0), done.set()))
        resize.start()
        next_of_kind(s, "recalled", lease.id)
        # Ignored: the lease is kept (and still works) until the break deadline revokes it.
        next_of_kind(s, "revoked", lease.id)
        resize.join(timeout=30)
        assert done.is_set(), "the resize did not finish after the revocation"
        with pytest.raises(rdax.Revoked):
            lease.write(0, b"too late")


def test_admin_revoke_gives_revoked(client, ns):
    client.create(f"{ns}/rv", size=65536)
    with client.session() as s, s.acquire(f"{ns}/rv") as lease:
        lease.write(0, b"before")
        client.revoke_lease(lease.id, immediate=True)
        next_of_kind(s, "revoked", lease.id)
        with pytest.raises(rdax.Revoked):
            lease.write(0, b"after")


def test_on_notice_callback(client, ns):
    client.put(f"{ns}/cb", b"z" * 4096)
    got: list[rdax.Notice] = []
    seen = threading.Event()

    def on_notice(n):
        got.append(n)
        if n.kind == "recalled":
            seen.set()

    with client.session(on_notice=on_notice) as s:
        lease = s.acquire(f"{ns}/cb")
        with pytest.raises(rdax.FailedPrecondition):
            s.next_notice(timeout=0)
        client.rm(f"{ns}/cb")
        assert seen.wait(15), f"no recall notice by callback; got {got!r}"
        assert any(n.lease_id == lease.id for n in got)


def test_notices_iterator_ends_with_the_session(client, ns):
    s = client.session()
    sid = s.id
    assert any(i.session_id == sid for i in client.sessions())
    client.evict_session(sid, "pytest")
    kinds = [n.kind for n in s.notices(timeout=15)]
    assert "ended" in kinds, kinds
    s.close()


def test_a_signal_interrupts_a_blocking_call(client):
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        with client.session() as s:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                s.next_notice(timeout=20)  # a notice that will not come
            # Without the signal check the wait would run its 20 s and only then raise.
            assert time.monotonic() - t0 < 10
            # the session is still usable after the interrupted wait
            assert s.next_notice(timeout=0) is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_session_outlives_its_client(daemon, ns):
    c = rdax.Client(daemon.endpoint, token=daemon.token)
    c.create(f"{ns}/o", size=4096)
    s = c.session()
    c.close()
    with pytest.raises(rdax.FailedPrecondition):
        c.stat(f"{ns}/o")
    with s, s.acquire(f"{ns}/o") as lease:
        lease.write(0, b"still here")
        assert lease.read(0, 10) == b"still here"
    with rdax.Client(daemon.endpoint, token=daemon.token) as c2:
        c2.rm(f"{ns}/o")
