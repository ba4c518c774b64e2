#!/usr/bin/env bash
# The RDMA lab stage: build rdax with the `rdma` feature (release), then in two lab VM runs
#   1. device-DAX: verbs facts, the RDMA end-to-end tests, and the bench next to
#      ib_write_bw / ib_read_lat / iperf3 on the same rxe pair and veth;
#   2. fs-DAX: the registration refusal, and the tests that RDMA is refused and TCP serves;
#   3. systemd as PID 1: the hardened unit installed and driven as the README says
#      (deploy/lab/systemd-check.sh);
#   4. block volumes: ext4 on the kernel's nbd device, kill -9 during writes, fsck
#      (deploy/lab/nbd-check.sh);
#   5. an NVMe-oF peer: nvmet-rdma + nvme-rdma on the NVDIMM and the rxe pair, fio next to
#      rdax leases doing the same patterns (deploy/lab/nvmf-bench.sh; skipped by --no-bench).
# Results (logs, figures) land in $LAB_OUT (default target/lab-out). Needs root for the
# one-time `lab.sh setup` and the tools below (apt). Usage: deploy/lab/rdma-lab.sh [--no-bench]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${LAB_OUT:-$root/target/lab-out}
bench=1
[ "${1:-}" = --no-bench ] && bench=0
t0=$(date +%s)
lap() { echo "== rdma-lab: $* ($(( $(date +%s) - t0 )) s)"; }
cd "$root"
if [ ! -f "${LAB:-$root/target/lab}/initramfs.cpio.gz" ]; then
  lap "setting up the lab (once)"
  if [ "$(id -u)" = 0 ]; then "$here/lab.sh" setup; else sudo -E "$here/lab.sh" setup; fi
fi
# VMs 4 and 5 run the host's nbd-client, mkfs/fsck, fio and nvme-cli (the guest's root is the host's).
if ! command -v nbd-client >/dev/null || ! command -v fio >/dev/null || ! command -v mkfs.ext4 >/dev/null \
  || ! command -v nvme >/dev/null; then
  lap "installing nbd-client, fio, e2fsprogs and nvme-cli (for VMs 4 and 5)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -E"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nbd-client fio e2fsprogs nvme-cli >/dev/null
fi
lap "building (release, --features rdma)"
feats=rdaxd/rdma,rdaxctl/rdma
cargo build --release -p rdaxd -p rdaxctl -p rdax-verbs --features "$feats"
# The bench runs the release binaries as users get them; keep them aside, because the test
# binary below is built with `testing` (failpoints), which rebuilds target/release/rdaxd.
mkdir -p target/lab-bin
cp target/release/rdaxd target/release/rdaxctl target/release/rdax-rdma-probe target/lab-bin/
testbin=$(cargo test --release -p rdaxd --features rdaxd/rdma,rdaxd/testing --test rdma_lab --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*rdma_lab[^"]*\)".*/\1/p' | tail -1)
[ -x "$testbin" ] || { echo "rdma-lab: could not build the rdma_lab test binary" >&2; exit 2; }
rm -rf "$out"; mkdir -p "$out"
rc=0
lap "VM 1: device-DAX"
"$here/lab.sh" run --devdax --rw "$out" --timeout 900 -- env LAB_BENCH=$bench "$here/in-vm.sh" devdax "$testbin" "$out" || rc=1
lap "VM 2: fs-DAX"
"$here/lab.sh" run --fsdax /mnt/pmem --rw "$out" --timeout 600 -- "$here/in-vm.sh" fsdax "$testbin" "$out" /mnt/pmem || rc=1
lap "VM 3: systemd as PID 1, the unit installed as the README says"
"$here/lab.sh" run --systemd --timeout 600 -- "$here/systemd-check.sh" "$root/target/lab-bin" || rc=1
lap "VM 4: block volumes: ext4 on the kernel's nbd device, kill -9 during writes"
"$here/lab.sh" run --devdax --rw "$out" --timeout 600 -- "$here/nbd-check.sh" "$root/target/lab-bin" "$out" || rc=1
if [ $bench = 1 ]; then
  lap "VM 5: an NVMe-oF peer (nvmet-rdma) next to rdax leases"
  "$here/lab.sh" run --pmem 1G --rw "$out" --timeout 600 -- "$here/nvmf-bench.sh" "$root/target/lab-bin" "$out" || rc=1
fi
[ -f "$out/nbd-fio.txt" ] && { echo "fio on ext4 on /dev/nbd1 (TCG VM):"; cat "$out/nbd-fio.txt"; }
[ -f "$out/bench-summary.txt" ] && { echo; cat "$out/bench-summary.txt"; }
[ -f "$out/nvmf-summary.txt" ] && { echo; cat "$out/nvmf-summary.txt"; }
lap "done (status $rc)"
exit $rc
