#!/usr/bin/env bash
# The whole test suite (the README's test command). Extra arguments go to `cargo test`.
# `--all-targets` covers unit, integration, real-process and bench-smoke tests; it skips
# doctests, so they run in a second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc "$@"
