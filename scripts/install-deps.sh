#!/usr/bin/env bash
# Installs what building and testing rdax needs beyond the Rust toolchain. Today the default
# build needs nothing else (protobuf compilation is pure Rust); the `rdma` feature will add
# cmake and libclang here. Idempotent; uses apt only when something is missing.
set -euo pipefail
need=()
for c in rustfmt cargo-clippy; do
  command -v "$c" >/dev/null || { echo "missing $c: install the Rust toolchain with rustup (components rustfmt, clippy)" >&2; exit 1; }
done
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; else sudo apt-get install -y "${need[@]}"; fi
fi
