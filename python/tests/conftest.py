"""Fixtures: real rdaxd processes (see daemon.py), on loopback."""

from __future__ import annotations

import hashlib

import pytest

from daemon import Daemon


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    """A daemon with an admin token and a 1 s break deadline, shared by the session's tests."""
    d = Daemon(tmp_path_factory.mktemp("rdaxd"), extra=("--lease-break-timeout-ms", "1000"))
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    import rdax

    with rdax.Client(daemon.endpoint, token=daemon.token) as c:
        yield c


@pytest.fixture
def ns(request):
    """A namespace of the test's own (names are safe: letters, digits and dashes)."""
    return "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
