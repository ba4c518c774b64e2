#!/usr/bin/env bash
# Inside the lab VM (device-DAX): RDMA READ with requests in flight, rdax next to ib_read_bw
# on the same rxe pair, with both devices' error counters before and after each run.
#   read-depth.sh BINDIR OUTDIR [SIZE] [DEPTHS...]
# Prints one line per run; the figures land in OUTDIR/read-depth.SIZE.txt and .jsonl. Nothing passes or fails
# on a figure: the script fails only if an rdax run fails. perftest is the reference, not the
# thing under test: when it fails (it does, now and then, on a soft-RoCE pair under TCG) its
# figure is n/a and the line says why.
set -uo pipefail
bin=$1 out=$2 size=${3:-65536}
shift 3 2>/dev/null || shift $#
depths=("$@")
[ ${#depths[@]} -gt 0 ] || depths=(1 2 3 4 8 16)
S=10.77.0.1 C=10.77.0.2
secs=${LAB_BENCH_SECONDS:-3}
fail=0
counters() { # dev -> "name=value ..." for the counters that are not zero
  local d=/sys/class/infiniband/$1/ports/1/hw_counters
  [ -d "$d" ] || return 0
  for f in "$d"/*; do v=$(cat "$f"); [ "$v" != 0 ] && printf '%s=%s ' "$(basename "$f")" "$v"; done
}
delta() { # before after -> the counters that moved
  python3 - "$1" "$2" <<'PY'
import sys
a = dict(kv.split("=") for kv in sys.argv[1].split())
b = dict(kv.split("=") for kv in sys.argv[2].split())
moved = {k: int(v) - int(a.get(k, 0)) for k, v in b.items() if int(v) != int(a.get(k, 0))}
keep = ("err", "rnr", "retry", "seq", "dup", "timeout", "drop")
print(" ".join(f"{k}+{v}" for k, v in sorted(moved.items()) if any(w in k for w in keep)) or "-")
PY
}
netdrops() { # per-CPU backlog drops (softnet_stat column 2, hex) and veth drop counters
  local sd=0 l
  while read -r l; do set -- $l; sd=$((sd + 16#$2)); done < /proc/net/softnet_stat
  printf 'backlog_drop=%s ' "$sd"
  for v in veth0 veth1; do
    printf '%s_tx_drop=%s %s_rx_drop=%s ' $v "$(cat /sys/class/net/$v/statistics/tx_dropped)" \
      $v "$(cat /sys/class/net/$v/statistics/rx_dropped)"
  done
}
snap() { echo "$(counters rxe0) $(netdrops)|$(counters rxe1)"; }
moved() { # before-snapshot -> "rxe0: ... rxe1: ..."
  local now; now=$(snap)
  echo "rxe0: $(delta "${1%%|*}" "${now%%|*}")  rxe1: $(delta "${1#*|}" "${now#*|}")"
}
port=18600
# READ_DEPTH_SYSCTL="net.core.netdev_max_backlog=10000 ...": try the runs under other settings.
for kv in ${READ_DEPTH_SYSCTL:-}; do sysctl -qw "$kv" || fail=1; done
. "$(dirname "$0")/bench-daemon.sh"
bench_daemon "$bin" "$out/rdaxd-read-depth.log" || exit 1
: > "$out/read-depth.$size.txt"
: > "$out/read-depth.$size.jsonl"
for d in "${depths[@]}"; do
  port=$((port + 1))
  b=$(snap)
  timeout 60 ib_read_bw -d rxe0 -x 1 -s "$size" -D "$secs" -o "$d" -p $port > "$out/ib_read_bw.o$d.server.txt" 2>&1 & sp=$!
  until ss -Hltn "sport = :$port" | grep -q .; do kill -0 $sp 2>/dev/null || break; sleep 0.05; done
  timeout 60 ib_read_bw -d rxe1 -x 1 -s "$size" -D "$secs" -o "$d" -p $port $S > "$out/ib_read_bw.o$d.txt" 2>&1; ibrc=$?
  wait $sp
  ib=$(awk -v s="$size" '$1 == s && $2 ~ /^[0-9]+$/ {printf "%.2f", $5 * s; exit}' "$out/ib_read_bw.o$d.txt")
  why=""
  [ -n "$ib" ] || why=" (ib_read_bw exit $ibrc: $(grep -v '^[[:space:]]*$' "$out/ib_read_bw.o$d.txt" | tail -n 1 | cut -c1-120))"
  line="size $size depth $d: ib_read_bw ${ib:-n/a} MB/s$why [$(moved "$b")]"
  b=$(snap)
  r=$(lb --transport rdma lease-bench --op read --size "$size" --depth "$d" --region 4M --seconds "$secs") || fail=1
  line+="; rdax $(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print("%.2f MB/s p50 %.0f us p99 %.0f us" % (j["mb_per_s"], j["lat_us_p50"], j["lat_us_p99"]))' "$r" 2>/dev/null || echo n/a) [$(moved "$b")]"
  echo "$line" | tee -a "$out/read-depth.$size.txt"
  python3 -c 'import json,sys
try: r = json.loads(sys.argv[4])
except ValueError: r = {}
print(json.dumps({"size": int(sys.argv[1]), "depth": int(sys.argv[2]), "ib_read_bw_mb_per_s": float(sys.argv[3]) if sys.argv[3] else None,
  "rdax_mb_per_s": r.get("mb_per_s"), "rdax_lat_us_p50": r.get("lat_us_p50"), "rdax_lat_us_p99": r.get("lat_us_p99")}))' \
    "$size" "$d" "${ib:-}" "${r:-}" >> "$out/read-depth.$size.jsonl"
done
bench_daemon_stop
dmesg | grep -i rxe | tail -20 > "$out/read-depth.dmesg.txt"
[ -s "$out/read-depth.dmesg.txt" ] && { echo "dmesg (rxe):"; cat "$out/read-depth.dmesg.txt"; }
exit $fail
