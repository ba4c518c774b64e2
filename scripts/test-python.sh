#!/usr/bin/env bash
# The Python package's tests: build the wheel (pip, with maturin as the build backend), install
# it into a fresh venv, check it imports with no Rust toolchain on PATH, then run pytest against
# real rdaxd processes. pytest's exit code 5 (no tests collected) is a failure.
# RDAXD=PATH uses that daemon binary (scripts/test.sh passes the one it built); else this
# builds target/debug/rdaxd. Extra arguments go to pytest.
set -euo pipefail
# A relative RDAXD is relative to where this was started, not to python/ where pytest runs.
if [ -n "${RDAXD:-}" ]; then
  RDAXD=$(realpath "$RDAXD")
  export RDAXD
fi
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${RDAXD:-}" ]; then
  cargo build -q -p rdaxd
  export RDAXD=$root/target/debug/rdaxd
fi
venv=$root/target/python-venv
wheels=$root/target/wheels
rm -rf "$venv" "$wheels"
python3 -m venv "$venv"
echo "== build the wheel"
"$venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$wheels" ./python
ls -l "$wheels"
"$venv/bin/pip" install --quiet "$wheels"/rdax-*.whl pytest numpy
echo "== import without the Rust toolchain"
env -i PATH=/usr/bin:/bin HOME=/nonexistent "$venv/bin/python" -c \
  'import rdax, rdax.aio; print("rdax imports:", rdax.__file__, "rdma:", rdax.RDMA)'
echo "== pytest"
rc=0
(cd "$root/python" && "$venv/bin/pytest" -q -p no:cacheprovider tests "$@") || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
