"""Objects over gRPC: round trips, listing, and typed errors for bad arguments."""

from __future__ import annotations

import pytest

import rdax


def test_put_get_stat_round_trip(client, ns):
    data = bytes(range(256)) * 1000
    assert client.put(f"{ns}/a", data) == len(data)
    assert client.get(f"{ns}/a") == data
    st = client.stat(f"{ns}/a")
    assert (st.namespace, st.name, st.path, st.size) == (ns, "a", f"{ns}/a", len(data))
    assert st.allocated_bytes >= len(data)
    assert client.get(f"{ns}/a", offset=10, length=5) == data[10:15]
    # put replaces: the object ends up exactly as long as the new data
    client.put(f"{ns}/a", bytearray(b"short"))
    assert client.get(f"{ns}/a") == b"short"
    # any buffer: a memoryview slice
    client.put(f"{ns}/a", memoryview(data)[100:200])
    assert client.get(f"{ns}/a") == data[100:200]
    client.put(f"{ns}/empty", b"")
    assert client.get(f"{ns}/empty") == b""
    client.rm(f"{ns}/a")
    client.rm(f"{ns}/empty")
    with pytest.raises(rdax.NotFound):
        client.stat(f"{ns}/a")


def test_create_resize_punch_ls_rm(client, ns):
    st = client.create(f"{ns}/sparse", size=1 << 20)
    assert st.size == 1 << 20 and st.allocated_bytes == 0
    with pytest.raises(rdax.AlreadyExists):
        client.create(f"{ns}/sparse")
    client.put(f"{ns}/full", b"\xff" * (256 << 10))
    client.punch(f"{ns}/full", 0, 128 << 10)
    got = client.get(f"{ns}/full")
    assert got[: 128 << 10] == bytes(128 << 10) and got[128 << 10 :] == b"\xff" * (128 << 10)
    assert client.resize(f"{ns}/sparse", 4096).size == 4096
    for i in range(5):
        client.create(f"{ns}/n{i}")
    names = [s.name for s in client.ls(ns, page_size=2)]
    assert names == sorted(names) == ["full", "n0", "n1", "n2", "n3", "n4", "sparse"]
    client.flush(f"{ns}/full")
    for n in names:
        client.rm(f"{ns}/{n}")
    assert list(client.ls(ns)) == []


def test_pool_info_and_stats(client):
    info = client.info()
    assert info["pool_size"] > 0 and info["block_size"] > 0 and info["server_version"]
    assert client.stats()["data_blocks"] == info["data_blocks"]


@pytest.mark.parametrize(
    "call",
    [
        lambda c, ns: c.create("no-slash"),
        lambda c, ns: c.create("/x"),
        lambda c, ns: c.create("bad ns/x"),
        lambda c, ns: c.create(f"{ns}/x", size=-1),
        lambda c, ns: c.get(f"{ns}/x", offset=-5),
        lambda c, ns: c.punch(f"{ns}/x", -1, 10),
        lambda c, ns: c.session(transport="carrier-pigeon"),
        lambda c, ns: list(c.ls("bad ns")),
    ],
)
def test_bad_arguments_raise_invalid_argument(client, ns, call):
    with pytest.raises(rdax.InvalidArgument) as e:
        call(client, ns)
    # the typed error is also the matching built-in
    assert isinstance(e.value, ValueError) and isinstance(e.value, rdax.Error)


def test_missing_object_and_type_errors(client, ns):
    with pytest.raises(rdax.NotFound) as e:
        client.get(f"{ns}/nothing-here")
    assert isinstance(e.value, LookupError)
    with pytest.raises(TypeError):
        client.put(f"{ns}/x", 12345)  # not bytes-like
    with pytest.raises(TypeError):
        client.put(f"{ns}/x", "text is not bytes")


def test_connect_failure_is_connect_error(ns):
    with pytest.raises(rdax.ConnectError) as e:
        rdax.Client("http://127.0.0.1:1", connect_timeout=2)
    assert isinstance(e.value, ConnectionError)


def test_admin_socket_needs_no_token(daemon, ns):
    with rdax.Client("unix:" + daemon.admin_socket) as c:
        c.put(f"{ns}/via-socket", b"local")
        assert c.get(f"{ns}/via-socket") == b"local"
        c.rm(f"{ns}/via-socket")


def test_a_forked_child_gets_an_error_not_a_hang(client, ns):
    import os
    import time

    client.put(f"{ns}/f", b"x")
    pid = os.fork()
    if pid == 0:  # the child: must fail fast with rdax.Error
        code = 3
        try:
            client.stat(f"{ns}/f")
            code = 1
        except rdax.Error as e:
            code = 0 if "fork" in str(e) else 2
        except BaseException:
            code = 4
        os._exit(code)
    end = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child's call hung")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0, status
    # the parent is unaffected
    assert client.get(f"{ns}/f") == b"x"
    client.rm(f"{ns}/f")
