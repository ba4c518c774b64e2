"""Real rdaxd processes for the tests and the bench, started from the workspace's build, on
loopback.

The daemon binary is ``$RDAXD`` if set, else ``target/debug/rdaxd`` (then ``target/release``)
of this checkout; ``scripts/test-python.sh`` builds it. Each daemon has its own state
directory, picks free ports itself and reports them in a ports file, which is polled with a
deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE = 60.0


def rdaxd_bin() -> Path:
    env = os.environ.get("RDAXD")
    if env:
        return Path(env)
    for profile in ("debug", "release"):
        p = REPO / "target" / profile / "rdaxd"
        if p.exists():
            return p
    raise RuntimeError("no rdaxd binary: build it with `cargo build -p rdaxd` or set RDAXD")


def poll(deadline_s: float, what: str, check):
    """Call ``check`` until it returns something truthy, or fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.02)


class Daemon:
    """One rdaxd with its state in ``dir``."""

    def __init__(self, dir: Path, *, pool_size: str = "256M", extra: tuple[str, ...] = (), config: str = ""):
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.token: Optional[str] = None
        args = [
            str(rdaxd_bin()),
            "--state-dir", str(dir),
            "--listen", "127.0.0.1:0",
            "--data-listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--ports-file", str(dir / "ports.json"),
            "--pool-size", pool_size,
        ]
        if "[auth]" not in config and "--principals-file" not in extra:
            self.token = secrets.token_hex(32)
            tf = dir / "admin.token"
            tf.write_text(self.token)
            tf.chmod(0o600)
            args += ["--token-file", str(tf)]
        if config:
            cf = dir / "rdaxd.toml"
            cf.write_text(config)
            args += ["--config", str(cf)]
        args += list(extra)
        self.log_path = dir / "rdaxd.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RDAX_")}
        env["RDAX_LOG_LEVEL"] = "info"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        ports = dir / "ports.json"

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"rdaxd exited during startup ({self.proc.returncode}):\n{self.log()}")
            try:
                return json.loads(ports.read_text())
            except (OSError, ValueError):
                return None

        p = poll(START_DEADLINE, "rdaxd to report its ports", ready)
        self.grpc = p["grpc"]
        self.admin_socket = p.get("admin")
        scheme = "https" if "[tls]" in config else "http"
        self.endpoint = f"{scheme}://{self.grpc}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"rdaxd did not stop within 30 s of SIGTERM:\n{self.log()}")
        assert self.proc.returncode == 0, f"rdaxd exit status {self.proc.returncode}:\n{self.log()}"


def token_hash(token: str) -> str:
    """A principals file's form of a token: its SHA-256."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()
