#!/usr/bin/env bash
# Python vs Rust SDK: 1 MiB lease write and read throughput, in one run against one release
# rdaxd (python/bench/lease_bench.py). Builds rdaxd and rdaxctl (release) and the wheel into
# target/bench-venv. Arguments go to lease_bench.py (--seconds, --rounds, --depths).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cargo build --release -q -p rdaxd -p rdaxctl
venv=$root/target/bench-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --force-reinstall --no-deps ./python
RDAXD=$root/target/release/rdaxd "$venv/bin/python" python/bench/lease_bench.py --rdaxctl "$root/target/release/rdaxctl" "$@"
