#!/usr/bin/env bash
# The whole test suite (the README's test command). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo test --workspace --all-targets "$@"
