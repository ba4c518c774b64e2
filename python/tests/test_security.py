"""TLS and tokens: a daemon with a certificate (data plane over TLS too) and a principals
file; a scoped token stays in its scope; a missing or wrong token is refused."""

from __future__ import annotations

import secrets
import subprocess

import pytest

import rdax
from daemon import Daemon, token_hash


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 it signed, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=rdax pytest CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem", cwd=d)
    (d / "server.key").chmod(0o600)
    # A second CA that signed nothing here: trusting it must fail.
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=other CA", "-keyout", "other.key", "-out", "other.pem", cwd=d)
    return d


@pytest.fixture(scope="module")
def secure(tmp_path_factory, pki):
    admin, alice = secrets.token_hex(32), secrets.token_hex(32)
    d = tmp_path_factory.mktemp("rdaxd-tls")
    principals = d / "principals.toml"
    principals.write_text(
        f'[[principal]]\nname = "admin"\ntokens = ["{token_hash(admin)}"]\nscopes = [":admin"]\n\n'
        f'[[principal]]\nname = "alice"\ntokens = ["{token_hash(alice)}"]\nscopes = ["alice/:write", "shared/:read"]\n'
    )
    principals.chmod(0o600)
    config = (
        f'[tls]\ncert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n\n'
        f'[dataplane]\ntls = true\n\n'
        f'[auth]\nprincipals_file = "{principals}"\n'
    )
    daemon = Daemon(d, config=config)
    yield daemon, admin, alice
    daemon.stop()


def test_tls_and_token_round_trip_with_lease(secure, pki):
    daemon, admin, alice = secure
    assert daemon.endpoint.startswith("https://")
    with rdax.Client(daemon.endpoint, token=alice, ca=pki / "ca.pem") as c:
        c.put("alice/doc", b"secret text")
        assert c.get("alice/doc") == b"secret text"
        # the data plane over TLS: a lease's bytes are encrypted too
        with c.session() as s, s.acquire("alice/doc", mode="rw") as lease:
            lease.write(0, b"SECRET")
            assert lease.read(0, 11) == b"SECRET text"
        c.rm("alice/doc")


def test_ca_as_pem_bytes_and_token_file(secure, pki, tmp_path):
    daemon, admin, _ = secure
    tf = tmp_path / "token"
    tf.write_text(admin + "\n")
    with rdax.Client(daemon.endpoint, token_file=tf, ca=(pki / "ca.pem").read_bytes()) as c:
        assert c.info()["pool_size"] > 0


def test_scopes_give_permission_denied(secure, pki):
    daemon, admin, alice = secure
    with rdax.Client(daemon.endpoint, token=admin, ca=pki / "ca.pem") as a:
        a.put("shared/readme", b"read me")
    with rdax.Client(daemon.endpoint, token=alice, ca=pki / "ca.pem") as c:
        assert c.get("shared/readme") == b"read me"
        for call in (
            lambda: c.put("shared/readme", b"overwrite"),
            lambda: c.create("bob/x"),
            lambda: c.get("bob/x"),
            lambda: c.sessions(),
        ):
            with pytest.raises(rdax.PermissionDenied):
                call()
        with c.session() as s:
            with pytest.raises(rdax.PermissionDenied):
                s.acquire("shared/readme", mode="rw")
            with s.acquire("shared/readme", mode="r") as lease:
                assert lease.read(0, 7) == b"read me"


def test_missing_or_wrong_token_is_unauthenticated(secure, pki, monkeypatch):
    daemon, _, _ = secure
    monkeypatch.delenv("RDAX_TOKEN", raising=False)
    monkeypatch.delenv("RDAX_TOKEN_FILE", raising=False)
    for token in (None, secrets.token_hex(32)):
        with rdax.Client(daemon.endpoint, token=token, ca=pki / "ca.pem") as c:
            with pytest.raises(rdax.Unauthenticated):
                c.stat("alice/anything")


def test_untrusted_certificate_is_refused(secure, pki):
    daemon, admin, _ = secure
    with pytest.raises((rdax.ConnectError, rdax.Unavailable)):
        c = rdax.Client(daemon.endpoint, token=admin, ca=pki / "other.pem", connect_timeout=5)
        c.info()
    with pytest.raises(rdax.InvalidArgument):
        rdax.Client(daemon.endpoint, token=admin, cert=pki / "server.pem")  # cert without key or ca
    with pytest.raises(rdax.InvalidArgument):
        rdax.Client(daemon.endpoint, token=admin, ca=pki / "no-such-file.pem")
