#!/usr/bin/env bash
# rdax's NBD server next to its peers, in one run, on the same backing (files on tmpfs), each
# driven by fio's `nbd` engine (libnbd): rdaxd (release build, a volume in a pool file on
# /dev/shm), `nbdkit file` and `qemu-nbd`. Patterns: 4 KiB random read and write at QD32,
# 1 MiB sequential read and write at QD8, and 4 KiB random read at QD1 (latency). Each round
# runs every pattern on every server in turn (so a noisy moment hits all three alike); the
# table shows the median of the rounds and, in brackets, the best.
#
# Usage: scripts/bench-nbd-peers.sh [ROUNDS (default 3)] [SECONDS per run (default 5)]
# Installs fio and nbdkit if missing (apt). Prints the table and writes it to
# target/bench-nbd-peers.txt. Nothing here is a pass/fail test: read the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-5}
size=1G
need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
if ((${#need[@]})); then
  echo "bench: installing ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
fio --enghelp 2>/dev/null | grep -qx '[[:space:]]*nbd' || { echo "bench: this fio has no nbd engine" >&2; exit 2; }
cargo build --release -q -p rdaxd -p rdaxctl
work=$(mktemp -d /dev/shm/rdax-nbd-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  local port=$1 end=$((SECONDS + 30))
  until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; do
    [ $SECONDS -lt $end ] || { echo "bench: nothing listens on $port" >&2; exit 2; }
    sleep 0.05
  done
}

# rdaxd: a 1 GiB allocated volume in a pool file on tmpfs.
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"; chmod 600 "$work/token"
rport=$(free_port)
target/release/rdaxd --state-dir "$work/rdax" --pool-size 1200M --listen 127.0.0.1:0 --data-listen 127.0.0.1:0 \
  --metrics-listen off --rdma-listen off --token-file "$work/token" --ports-file "$work/ports.json" \
  --nbd-listen "127.0.0.1:$rport" --nbd-principal admin --log-level warn 2>"$work/rdaxd.log" &
pids+=($!)
wait_port "$rport"
target/release/rdaxctl --endpoint "unix:$work/rdax/rdaxd.sock" volume create bench/vol --size "$size" >/dev/null
# The peers: a file each, written in full first so that nobody reads holes.
for f in kit qemu; do dd if=/dev/zero of="$work/$f.img" bs=1M count=1024 status=none; done
kport=$(free_port); qport=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$kport" file "$work/kit.img" &
pids+=($!)
qemu-nbd -f raw -b 127.0.0.1 -p "$qport" -x peer -t -e 8 --cache=writeback "$work/qemu.img" &
pids+=($!)
wait_port "$kport"; wait_port "$qport"
declare -A uri=([rdax]="nbd://127.0.0.1:$rport/bench/vol" [nbdkit]="nbd://127.0.0.1:$kport/" [qemu-nbd]="nbd://127.0.0.1:$qport/peer")
servers=(rdax nbdkit qemu-nbd)
patterns=("randread 4k 32" "randwrite 4k 32" "read 1m 8" "write 1m 8" "randread 4k 1")
# Warm every export (and fill rdax's first-touch paths) once.
for s in "${servers[@]}"; do
  fio --name=warm --ioengine=nbd --uri="${uri[$s]}" --rw=write --bs=1m --size="$size" --iodepth=8 --output=/dev/null
done
results="$work/results.txt"; : > "$results"
for r in $(seq "$rounds"); do
  for p in "${patterns[@]}"; do
    read -r rw bs qd <<<"$p"
    for s in "${servers[@]}"; do
      fio --name=b --ioengine=nbd --uri="${uri[$s]}" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$size" \
        --time_based --runtime="$secs" --ramp_time=1 --output-format=json --output="$work/out.json"
      python3 - "$work/out.json" "$s" "$rw $bs QD$qd" "$r" >>"$results" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
p50 = side["clat_ns"]["percentile"].get("50.000000", 0) / 1000
print(f'{sys.argv[2]}\t{sys.argv[3]}\t{sys.argv[4]}\t{side["iops"]:.0f}\t{side["bw_bytes"]}\t{p50:.1f}')
PY
    done
  done
  echo "bench: round $r of $rounds done" >&2
done
busy=$(awk '{print $1}' /proc/loadavg)
python3 - "$results" "$rounds" "$secs" "$busy" <<'PY' | tee target/bench-nbd-peers.txt
import statistics, sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    s, pat, _, iops, bw, p50 = line.rstrip("\n").split("\t")
    rows[(s, pat)].append((float(iops), float(bw), float(p50)))
pats = ["randread 4k QD32", "randwrite 4k QD32", "read 1m QD8", "write 1m QD8", "randread 4k QD1"]
print(f"fio nbd engine, 1 GiB exports on tmpfs, {sys.argv[2]} rounds of {sys.argv[3]} s, load average at the end {sys.argv[4]}")
print("median [best] per server; ratio = rdax / the better peer, medians with medians")
print(f'{"pattern":<20}{"rdax":>24}{"nbdkit":>24}{"qemu-nbd":>24}{"ratio":>8}')
for pat in pats:
    cells, med = [], {}
    for s in ["rdax", "nbdkit", "qemu-nbd"]:
        v = rows[(s, pat)]
        if pat.endswith("QD1"):
            xs = [x[2] for x in v]; m = statistics.median(xs); best = min(xs); unit = "µs p50"
            cells.append(f"{m:.1f} [{best:.1f}] {unit}")
        elif "1m" in pat:
            xs = [x[1] / 1e9 for x in v]; m = statistics.median(xs); best = max(xs)
            cells.append(f"{m:.2f} [{best:.2f}] GB/s")
        else:
            xs = [x[0] / 1e3 for x in v]; m = statistics.median(xs); best = max(xs)
            cells.append(f"{m:.1f}k [{best:.1f}k] IOPS")
        med[s] = m
    if pat.endswith("QD1"):
        ratio = med["rdax"] / min(med["nbdkit"], med["qemu-nbd"])
    else:
        ratio = med["rdax"] / max(med["nbdkit"], med["qemu-nbd"])
    print(f"{pat:<20}" + "".join(f"{c:>24}" for c in cells) + f"{ratio:>7.2f}x")
print("(QD1 ratio is latency: below 1.00x is better)")
PY
