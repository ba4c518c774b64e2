#!/usr/bin/env bash
# The whole test suite (the README's test command). Extra arguments go to `cargo test`.
# `--all-targets` covers unit, integration, real-process and bench-smoke tests; it skips
# doctests, so they run in a separate pass. The suite runs twice: as the default build
# (no RDMA or cluster code at all) and with the `rdma` and `cluster` features (on a host
# without an RDMA device, which the daemon must detect and report; the cluster tests start
# their own etcd on loopback). Both passes add rdaxd's `testing` feature: failpoints
# and the test-only Testing service, which the cancellation, torture and shutdown tests drive.
# Release builds never enable it. The RDMA end-to-end tests need the lab VM:
# deploy/lab/rdma-lab.sh (a CI stage of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== default build"
cargo test --workspace --all-targets --features rdaxd/testing "$@"
cargo test --workspace --doc "$@"
echo "== with the rdma and cluster features"
cargo test --workspace --all-targets --features rdaxd/testing,rdaxd/rdma,rdaxd/cluster,rdaxctl/rdma,rdaxctl/cluster,rdax-client/rdma "$@"
echo "== the Python package (wheel, pytest)"
RDAXD="$PWD/target/debug/rdaxd" scripts/test-python.sh
