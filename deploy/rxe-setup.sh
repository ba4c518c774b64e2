#!/usr/bin/env bash
# Set up soft-RoCE (rdma_rxe) on a network interface, idempotently, and check the result.
#   deploy/rxe-setup.sh IFACE [RXE_NAME]     e.g. deploy/rxe-setup.sh eth0 rxe0
# Needs root, iproute2's `rdma` and (for the check) ibverbs-utils' `ibv_devices`.
set -euo pipefail
iface=${1:?usage: rxe-setup.sh IFACE [RXE_NAME]}
name=${2:-rxe_$iface}
[ "$(id -u)" = 0 ] || { echo "rxe-setup: run as root" >&2; exit 1; }
ip link show "$iface" >/dev/null 2>&1 || { echo "rxe-setup: no interface $iface" >&2; exit 1; }
command -v rdma >/dev/null || { echo "rxe-setup: the rdma tool is missing (apt-get install iproute2)" >&2; exit 1; }
if [ ! -d /sys/module/rdma_rxe ]; then
  command -v modprobe >/dev/null || { echo "rxe-setup: rdma_rxe is not loaded and modprobe is missing (apt-get install kmod)" >&2; exit 1; }
  # rxe needs the crc32 crypto module; without it `rdma link add` fails with ENOENT.
  modprobe crc32_generic 2>/dev/null || true
  modprobe rdma_rxe || { echo "rxe-setup: cannot load rdma_rxe (kernel without soft-RoCE?)" >&2; exit 1; }
fi
ip link set "$iface" up
existing=$(rdma link show 2>/dev/null | awk -v i="$iface" '$0 ~ ("netdev " i "( |$)") {sub(":.*", "", $2); print $2}' | head -n1)
if [ -n "$existing" ]; then
  echo "rxe-setup: $iface already has RDMA link $existing"
  name=${existing%/*}
else
  rdma link add "$name" type rxe netdev "$iface"
  echo "rxe-setup: added $name on $iface"
fi
rdma link show "$name/1" | grep -q "state ACTIVE" || { echo "rxe-setup: $name is not ACTIVE:" >&2; rdma link show "$name/1" >&2; exit 1; }
if command -v ibv_devices >/dev/null; then
  ibv_devices | grep -qw "$name" || { echo "rxe-setup: ibv_devices does not list $name" >&2; exit 1; }
fi
echo "rxe-setup: $name ready on $iface"
