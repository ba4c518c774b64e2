#!/usr/bin/env bash
# Replication figures for a cluster on loopback (etcd plus release rdaxd members, TCP data
# plane), printed, never judged:
#   1. per-node efficiency: `rdaxctl cluster bench` (1 MiB puts, 4 writers) against 1, 2 and 3
#      nodes with R = 1: acknowledged MiB/s, and that divided by the nodes;
#   2. the cost of R = 2 against R = 1 for 1 MiB writes on 3 nodes (same bench);
#   3. repair: with R = 2 and FILL_MIB of objects written, `kill -9` of one node, then the time
#      to degraded-detected (a PG map without it), to fully repaired (every PG healthy again in
#      `rdaxctl cluster status`), and the repair rate (bytes the survivors copied / copy time).
# On a 2-core machine every daemon, etcd and the client share the cores: the figures are
# CPU-bound, and say so.
#   scripts/bench-replication.sh [SECONDS] [FILL_MIB] [REPAIR_MIB_PER_S]   (defaults 5 256 0 = unbounded)
set -euo pipefail
secs=${1:-5} fill=${2:-256} rate=${3:-0} ttl_ms=5000
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -q -p rdaxd -p rdaxctl --features rdaxd/cluster,rdaxctl/cluster
bin=$PWD/target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${etcd_pid:-}" ] && kill "$etcd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cport=$(free_port) pport=$(free_port)
url=http://127.0.0.1:$cport
etcd --name b --data-dir "$work/etcd" --listen-client-urls "$url" --advertise-client-urls "$url" \
  --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
  --initial-cluster "b=http://127.0.0.1:$pport" --log-level error > "$work/etcd.log" 2>&1 &
etcd_pid=$!
ctl() { ETCDCTL_API=3 etcdctl --endpoints "$url" --command-timeout=2s "$@"; }
now() { date +%s.%N; }
wait_for() { # what, deadline seconds, command...
  local what=$1 end; end=$(( $(date +%s) + $2 )); shift 2
  until "$@" > /dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "bench-replication: timed out waiting for $what" >&2; exit 1; }
    sleep 0.05
  done
}
wait_for "etcd" 30 ctl endpoint health
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"; chmod 600 "$work/token"
prefix=/none
start() { # i replicas
  mkdir -p "$work/$prefix/n$1"
  printf '[cluster]\nlease_ttl_ms = %s\nprefix = "%s"\npeer_token_file = "%s"\nrepair_mib_per_s = %s\n' \
    "$ttl_ms" "$prefix" "$work/token" "$rate" > "$work/$prefix/n$1.toml"
  "$bin/rdaxd" --config "$work/$prefix/n$1.toml" --state-dir "$work/$prefix/n$1" --pool-size 1G \
    --listen 127.0.0.1:0 --data-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --admin-socket off \
    --ports-file "$work/$prefix/n$1/ports.json" --token-file "$work/token" \
    --etcd "$url" --node-id "n$1" --replicas "$2" >> "$work/$prefix/n$1.log" 2>&1 &
  pids[$1]=$!
  disown
}
stop_all() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; pids=(); }
rctl() { "$bin/rdaxctl" --cluster "etcd://127.0.0.1:$cport" --cluster-prefix "$prefix" --token-file "$work/token" "$@"; }
status() { rctl --json cluster status; }
all_healthy() { status | python3 -c 'import json,sys; s=json.load(sys.stdin)["pg_states"]; sys.exit(0 if s["healthy"]==128 else 1)'; }
map_nodes() { ctl get "$prefix/pgmap" --print-value-only | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))'; }
map_has() { [ "$(map_nodes 2>/dev/null || echo 0)" = "$1" ]; }
cluster_of() { # nodes replicas
  stop_all; prefix=/bench-n$1-r$2
  for ((i = 0; i < $1; i++)); do start "$i" "$2"; done
  wait_for "a map of $1 nodes" 60 map_has "$1"
  wait_for "no repair pending" 120 nothing_repairing
}
nothing_repairing() { status | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["pg_states"]["repairing"]==0 else 1)'; }
bench() { rctl --json cluster bench --size 1M --seconds "$secs" --writers 4 "$@"; }
metric_sum() { # name
  python3 - "$work/$prefix" "$1" <<'PY'
import glob, json, sys, urllib.request
total = 0.0
for p in glob.glob(sys.argv[1] + "/n*/ports.json"):
    try:
        m = json.load(open(p))["metrics"]
        for line in urllib.request.urlopen(f"http://{m}/metrics", timeout=2).read().decode().splitlines():
            if line.startswith(sys.argv[2] + " "):
                total += float(line.split()[1])
    except Exception:
        pass
print(total)
PY
}
report() { # label bench-json nodes [R=1 MiB/s to compare with]
  python3 - "$@" <<'PY'
import json, sys
label, b, n, base = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m, l = b["mib_per_s"], b["latency_ms"]
line = (f"{label}: {m:.1f} MiB/s acknowledged ({m / n:.1f} per node), {b['puts_per_s']:.1f} puts/s, "
        f"p50 {l['p50']:.2f} ms, p99 {l['p99']:.2f} ms")
if base:
    line += f"; throughput R=2 / R=1 (3 nodes) {m / float(base):.2f}"
print(line)
PY
}
echo "bench-replication: $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg); 1 MiB puts, 4 writers, $secs s each"
declare -A mib
for n in 1 2 3; do
  cluster_of "$n" 1
  out=$(bench); mib[$n]=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["mib_per_s"])' "$out")
  report "R=1, $n node(s)" "$out" "$n" ""
done
cluster_of 3 2
out=$(bench)
report "R=2, 3 nodes" "$out" 3 "${mib[3]}"
# Repair: fill (every object written once), then kill one node.
objects=$(( fill / 4 ))
rctl --json cluster bench --size 1M --writers 4 --objects "$objects" --puts "$objects" --namespace fill > /dev/null
listed=$(rctl --json ls fill | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
copied0=$(metric_sum rdax_cluster_repair_bytes_total)
victim=2
t0=$(now); kill -9 "${pids[$victim]}"
wait_for "a map without n$victim" 60 map_has 2; t1=$(now)
wait_for "every PG healthy again" 600 all_healthy; t2=$(now)
copied=$(awk "BEGIN {print $(metric_sum rdax_cluster_repair_bytes_total) - $copied0}")
python3 - "$t0" "$t1" "$t2" "$copied" "$listed" "$ttl_ms" "$rate" <<'PY'
import sys
t0, t1, t2, copied = (float(x) for x in sys.argv[1:5])
listed, ttl, rate = int(sys.argv[5]), int(sys.argv[6]) / 1000, int(sys.argv[7])
print(f"repair: {listed} objects of 1 MiB in namespace fill (R=2, 3 nodes), kill -9 n2:")
print(f"  kill -> degraded detected {t1 - t0:.2f} s (target <= TTL + 1 s = {ttl + 1:.1f} s)")
print(f"  kill -> fully repaired {t2 - t0:.2f} s; copied {copied / 2**20:.1f} MiB in {t2 - t1:.2f} s: "
      f"{copied / 2**20 / max(t2 - t1, 1e-9):.1f} MiB/s (repair_mib_per_s = {rate or 'unbounded'})")
PY
