#!/usr/bin/env bash
# Inside the lab VM (booted with --pmem, see rdma-lab.sh): rdax leases next to an NVMe-oF
# peer on the same rxe pair and the same emulated NVDIMM.
#   nvmf-bench.sh BINDIR OUTDIR
# 1. The NVDIMM as a block device (/dev/pmem0), exported by the kernel's nvmet-rdma target on
#    rxe0 and attached by the kernel's nvme-rdma host on rxe1 (nvme-cli); fio drives
#    /dev/nvmeXnY with O_DIRECT.
# 2. The NVDIMM as device-DAX, an rdax pool on it, and `rdaxctl lease-bench` doing the same
#    pattern over RDMA from registered buffers.
# Patterns: 4 KiB random read and write at QD1 and QD16, 64 KiB sequential read and write at
# QD4, over the same 16 MiB span. The table lands in OUTDIR/nvmf-summary.txt. Figures never
# fail the stage; a failed run does.
set -uo pipefail
bin=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
S=10.77.0.1 C=10.77.0.2
secs=${LAB_BENCH_SECONDS:-3}
span=16M
nqn=nqn.2026-12.dev.rdax:lab
fail=0
step() { echo; echo "=== $* ($(cut -d' ' -f1 /proc/uptime) s)"; }
die() { echo "nvmf-bench: $*"; exit 1; }
# name rw bs qd -> the six patterns, as fio and lease-bench name them
patterns=(
  "rr4k1 randread 4k 1" "rw4k1 randwrite 4k 1"
  "rr4k16 randread 4k 16" "rw4k16 randwrite 4k 16"
  "sr64k4 read 64k 4" "sw64k4 write 64k 4"
)

# ib_read_lat at 4 KiB before and after: the VM's drift between the two halves, in the table.
gauge() {
  timeout 60 ib_read_lat -d rxe0 -x 1 -s 4096 -n 2000 -p 18700 > "$out/nvmf-ib_read_lat.$1.server.txt" 2>&1 & local sp=$!
  local end=$(( $(date +%s) + 20 ))
  until ss -Hltn "sport = :18700" | grep -q .; do kill -0 $sp 2>/dev/null && [ "$(date +%s)" -lt "$end" ] || break; sleep 0.05; done
  timeout 60 ib_read_lat -d rxe1 -x 1 -s 4096 -n 2000 -p 18700 $S > "$out/nvmf-ib_read_lat.$1.txt" 2>&1
  wait $sp
}
gauge before
step "NVMe-oF: nvmet-rdma target on /dev/pmem0 (rxe0), nvme-rdma host (rxe1)"
ndctl create-namespace -f -e namespace0.0 -m fsdax > /dev/null || die "ndctl: no /dev/pmem0"
# The guest has the lab kernel's modules but not the host's kmod tools: use the lab's kmod.
(exec -a modprobe "$root/target/lab/root/bin/kmod" -a nvmet nvmet-rdma nvme-rdma) || die "cannot load nvmet-rdma/nvme-rdma"
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config || die "no configfs"
cfg=/sys/kernel/config/nvmet
sub=$cfg/subsystems/$nqn
mkdir "$sub" && echo 1 > "$sub/attr_allow_any_host" || die "nvmet: subsystem"
mkdir "$sub/namespaces/1" && echo /dev/pmem0 > "$sub/namespaces/1/device_path" && echo 1 > "$sub/namespaces/1/enable" \
  || die "nvmet: namespace on /dev/pmem0"
mkdir "$cfg/ports/1" || die "nvmet: port"
echo rdma > "$cfg/ports/1/addr_trtype"; echo ipv4 > "$cfg/ports/1/addr_adrfam"
echo $S > "$cfg/ports/1/addr_traddr"; echo 4420 > "$cfg/ports/1/addr_trsvcid"
ln -s "$sub" "$cfg/ports/1/subsystems/" || die "nvmet: enable the port"
nvme connect -t rdma -a $S -s 4420 -n $nqn --host-traddr $C --hostnqn "$(nvme gen-hostnqn)" \
  > "$out/nvme-connect.txt" 2>&1 || { cat "$out/nvme-connect.txt"; die "nvme connect failed"; }
dev=""
end=$(( $(date +%s) + 20 ))
until [ -n "$dev" ]; do
  for b in /sys/block/nvme*; do
    [ -e "$b" ] && grep -qx "$nqn" "$b/device/subsysnqn" 2>/dev/null && dev=/dev/$(basename "$b")
  done
  [ -n "$dev" ] || { [ "$(date +%s)" -lt "$end" ] || die "no NVMe namespace appeared for $nqn"; sleep 0.05; }
done
until [ -b "$dev" ]; do [ "$(date +%s)" -lt "$end" ] || die "$dev is not a block device"; sleep 0.05; done
for c in /sys/class/nvme/nvme*; do
  grep -qx "$nqn" "$c/subsysnqn" 2>/dev/null && echo "attached $dev: $(basename "$c") $(cat "$c/transport") $(cat "$c/address")"
done
for p in "${patterns[@]}"; do
  set -- $p
  fio --name="$1" --filename="$dev" --size=$span --direct=1 --ioengine=libaio --rw="$2" --bs="$3" --iodepth="$4" \
    --runtime="$secs" --time_based --lat_percentiles=1 --output-format=json > "$out/nvmf-fio.$1.json" 2> "$out/nvmf-fio.$1.err" \
    || { echo "fio $1 failed: $(tail -n 1 "$out/nvmf-fio.$1.err")"; fail=1; }
done
nvme disconnect -n $nqn > /dev/null || fail=1
rm "$cfg/ports/1/subsystems/$nqn"; rmdir "$cfg/ports/1"
echo 0 > "$sub/namespaces/1/enable"; rmdir "$sub/namespaces/1" "$sub"

step "rdax: a pool on /dev/dax0.0, lease-bench over RDMA, the same patterns"
ndctl create-namespace -f -e namespace0.0 -m devdax > /dev/null || die "ndctl: no /dev/dax0.0"
. "$here/bench-daemon.sh"
bench_daemon "$bin" "$out/rdaxd-nvmf.log" || exit 1
for p in "${patterns[@]}"; do
  set -- $p
  op=read; case $2 in *write) op=write;; esac
  rnd=(); case $2 in rand*) rnd=(--random);; esac
  lb --transport rdma lease-bench --op $op "${rnd[@]}" --size "$3" --depth "$4" --region $span --seconds "$secs" \
    > "$out/nvmf-rdax.$1.json" 2> "$out/nvmf-rdax.$1.err" || { echo "lease-bench $1 failed: $(tail -n 1 "$out/nvmf-rdax.$1.err")"; fail=1; }
done
bench_daemon_stop
gauge after

python3 - "$out" "${patterns[@]}" <<'PY' | tee "$out/nvmf-summary.txt"
import json, sys
out, pats = sys.argv[1], [p.split() for p in sys.argv[2:]]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
print("rdax leases (RDMA, registered buffers) vs NVMe-oF (nvmet-rdma + nvme-rdma, fio O_DIRECT libaio),")
print("same rxe pair and NVDIMM, one after the other in one TCG VM run (it drifts ±10-30 %).")
print("rdax writes are RDMA WRITEs with no flush per operation; nvmet's complete after the pmem")
print("driver's flushing copy. Latency is fio's total latency (lat_percentiles) and lease-bench's")
print("per-operation time, both p50.")
def gauge(when):
    try:
        for line in open(f"{out}/nvmf-ib_read_lat.{when}.txt"):
            c = line.split()
            if len(c) > 4 and c[0] == "4096" and c[1].isdigit():
                return float(c[4])
    except OSError:
        pass
    return None
g = [gauge("before"), gauge("after")]
g = ["n/a" if v is None else f"{v:.2f}" for v in g]
print(f"drift gauge, ib_read_lat 4 KiB typical (us): {g[0]} before NVMe-oF, {g[1]} after rdax")
print(f"{'pattern':<22}{'nvmf IOPS':>11}{'rdax IOPS':>11}{'rdax/nvmf':>11}{'nvmf p50 us':>13}{'rdax p50 us':>13}{'nvmf/rdax':>11}")
missed = []
for name, rw, bs, qd in pats:
    f, r = load(f"{out}/nvmf-fio.{name}.json"), load(f"{out}/nvmf-rdax.{name}.json")
    fi = fl = ri = rl = None
    if f:
        j = f["jobs"][0]["write" if "write" in rw else "read"]
        fi, fl = j["iops"], j["lat_ns"]["percentile"]["50.000000"] / 1e3
    if r:
        ri, rl = r["ops_per_s"], r["lat_us_p50"]
    n = lambda v, p=0: "n/a" if v is None else f"{v:.{p}f}"
    ratio = ri / fi if fi and ri is not None else None
    lower = fl / rl if fl and rl else None
    label = f"{rw} {bs} QD{qd}"
    print(f"{label:<22}{n(fi):>11}{n(ri):>11}{n(ratio, 2):>11}{n(fl, 1):>13}{n(rl, 1):>13}{n(lower, 2):>11}")
    if bs == "4k" and (ratio is None or ratio < 1.0 or (qd == "1" and (lower is None or lower < 1.0))):
        missed.append(label)
print("target (4 KiB: rdax >= 1.0x nvmet-rdma in IOPS, and at QD1 in latency): "
      + (f"TARGET MISSED: {', '.join(missed)}" if missed else "met in this run"))
PY
echo "nvmf-bench: fail=$fail"
exit $fail
