#!/usr/bin/env bash
# Installs what building and testing rdax needs beyond the Rust toolchain. The default build
# needs only a C compiler (protobuf compilation is pure Rust). The `rdma` feature (crate
# rdax-verbs, through rdma-mummy-sys) builds a small C shim with cmake and generates bindings
# with libclang; at run time it loads libibverbs/librdmacm if they are there (rdma-core,
# ibverbs-providers), and works without them (no RDMA). The NBD tests need libnbd-bin and
# qemu-utils; the `cluster` feature protoc, and its tests etcd; the Python package a CPython
# with venv. Idempotent; apt only when missing.
set -euo pipefail
for c in rustfmt cargo-clippy; do
  command -v "$c" >/dev/null || { echo "missing $c: install the Rust toolchain with rustup (components rustfmt, clippy)" >&2; exit 1; }
done
need=()
# A C compiler: rustc links with it, and ring and aws-lc-sys (TLS) compile C with it.
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v cmake >/dev/null || need+=(cmake)
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
# The NBD tests drive rdaxd with real NBD clients: libnbd's nbdcopy and nbdinfo, qemu-img and
# qemu-io.
command -v nbdcopy >/dev/null && command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || need+=(qemu-utils)
# The `cluster` feature: the etcd client crate compiles etcd's API with protoc at build time
# (well-known types from libprotobuf-dev); its tests start their own etcd and read it with
# etcdctl.
command -v protoc >/dev/null || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
# The Python package (python/): a CPython >= 3.11 with venv and pip, and openssl for its TLS
# test's certificates. pip fetches maturin (the build backend), pytest and numpy from PyPI.
python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || need+=(python3 python3-venv python3-pip)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  # Debian's etcd-server starts a system etcd on 127.0.0.1:2379 when it is installed. The tests
  # start etcds of their own and never use it, so keep the package's service from starting
  # (policy-rc.d, for this install only, unless the host already has one).
  policy=""
  if [[ " ${need[*]} " == *" etcd-server "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy"
  fi
  rc=0
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } || rc=$?
  [ -z "$policy" ] || $sudo rm -f "$policy"
  [ "$rc" = 0 ] || exit "$rc"
fi
