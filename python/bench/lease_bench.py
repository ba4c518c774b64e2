"""1 MiB lease write and read throughput from Python next to the Rust SDK, in one run.

Starts one rdaxd (``$RDAXD``), then alternates rounds of ``rdaxctl lease-bench`` (the Rust
SDK) and the same loop in Python through ``rdax.Lease.write`` / ``read_into``: same size,
same region (64 MiB, cycled in order), same depth (operations in flight: Python runs one
thread per operation in flight), same seconds, over the TCP data plane. Prints each round and
the medians and bests, and the Python/Rust ratios (median/median, best/best). Nothing passes
or fails.

    python lease_bench.py --rdaxctl target/release/rdaxctl [--seconds 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import rdax  # noqa: E402
from daemon import Daemon  # noqa: E402

MIB = 1 << 20


def python_round(c: rdax.Client, ns: str, op: str, size: int, region: int, depth: int, seconds: float) -> float:
    slots = max(1, region // size)
    region = slots * size
    name = f"{ns}/py-lease-bench"
    try:
        c.rm(name)
    except rdax.NotFound:
        pass
    c.create(name, region)
    with c.session("python lease-bench", transport="tcp") as s, s.acquire(name, 0, region, "rw") as lease:
        fill = bytearray(b"\xa5" * size)
        for off in range(0, region, size):  # written once, so reads read real blocks
            lease.write(off, fill)
        counts = [0] * depth
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()

        def worker(t: int) -> None:
            buf = bytearray(size)
            n = t
            done = 0
            while time.perf_counter() < deadline:
                off = (n % slots) * size
                if op == "read":
                    lease.read_into(off, buf)
                else:
                    lease.write(off, fill)
                n += depth
                done += 1
            counts[t] = done

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(depth)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.perf_counter() - start
    c.rm(name)
    return sum(counts) * size / secs / 1e6


def rust_round(rdaxctl: str, d: Daemon, ns: str, op: str, size: int, region: int, depth: int, seconds: float) -> float:
    env = dict(os.environ, RDAX_TOKEN=d.token or "")
    out = subprocess.run(
        [rdaxctl, "--endpoint", d.endpoint, "--transport", "tcp", "--json", "lease-bench", "--op", op,
         "--size", str(size), "--depth", str(depth), "--seconds", str(seconds), "--region", str(region),
         "--namespace", ns],
        env=env, check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)["mb_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rdaxctl", required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=MIB)
    ap.add_argument("--region", type=int, default=64 * MIB)
    ap.add_argument("--depths", default="1,4")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rdax-pybench-") as tmp:
        d = Daemon(Path(tmp), pool_size="512M")
        try:
            c = rdax.Client(d.endpoint, token=d.token)
            print(f"rdaxd {d.endpoint}; {a.size} B per op, region {a.region >> 20} MiB, {a.seconds} s per round, "
                  f"{a.rounds} rounds alternating Rust/Python; {os.cpu_count()} CPUs; "
                  f"load average {os.getloadavg()[0]:.2f} at start")
            for depth in (int(x) for x in a.depths.split(",")):
                for op in ("write", "read"):
                    rust, py = [], []
                    for r in range(a.rounds):
                        rust.append(rust_round(a.rdaxctl, d, "bench-rs", op, a.size, a.region, depth, a.seconds))
                        py.append(python_round(c, "bench-py", op, a.size, a.region, depth, a.seconds))
                        print(f"  {op:5} depth {depth} round {r + 1}: Rust {rust[-1]:8.1f} MB/s  Python {py[-1]:8.1f} MB/s")
                    mr, mp = statistics.median(rust), statistics.median(py)
                    br, bp = max(rust), max(py)
                    print(f"{op:5} depth {depth}: median Rust {mr:.1f} Python {mp:.1f} MB/s -> {mp / mr:.3f}x; "
                          f"best Rust {br:.1f} Python {bp:.1f} -> {bp / br:.3f}x")
            print(f"load average {os.getloadavg()[0]:.2f} at end")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
