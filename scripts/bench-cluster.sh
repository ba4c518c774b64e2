#!/usr/bin/env bash
# How fast a cluster notices a dead node: etcd on loopback, NODES release rdaxd members, then
# ROUNDS times `kill -9` of one member (alternately the coordinator and another) and, from the
# kill, the time until
#   - etcd dropped its registration (its etcd lease expired): "key gone";
#   - the coordinator (a new one, if the coordinator was killed) wrote a PG map without it:
#     "degraded detected" (target: lease TTL + 1 s);
# then it is started again and the time until it is placed again is measured too. Prints the
# figures of each round and the median and worst; never fails on a figure.
#   scripts/bench-cluster.sh [ROUNDS] [NODES] [TTL_MS]     (defaults 5 3 5000)
# Polls etcd with etcdctl every 20 ms, so each time is good to about 30 ms.
set -euo pipefail
rounds=${1:-5} nodes=${2:-3} ttl_ms=${3:-5000}
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
    [ "$(date +%s)" -lt "$end" ] || { echo "bench-cluster: timed out waiting for $what" >&2; exit 1; }
    sleep 0.02
  done
}
wait_for "etcd" 30 ctl endpoint health
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"; chmod 600 "$work/token"
printf '[cluster]\nlease_ttl_ms = %s\npeer_token_file = "%s"\n' "$ttl_ms" "$work/token" > "$work/rdaxd.toml"
start() { # i
  mkdir -p "$work/n$1"
  "$bin/rdaxd" --config "$work/rdaxd.toml" --state-dir "$work/n$1" --pool-size 64M --listen 127.0.0.1:0 \
    --data-listen 127.0.0.1:0 --metrics-listen off --admin-socket off --token-file "$work/token" --etcd "$url" --node-id "n$1" \
    >> "$work/n$1.log" 2>&1 &
  pids[$1]=$!
  disown  # no "Killed" notice from the shell for the kill -9 below
}
map() { ctl get /rdax/pgmap --print-value-only; }
map_has_all() { local m; m=$(map); for ((i = 0; i < nodes; i++)); do grep -q "\"n$i\"" <<< "${m#*\"nodes\":}" || return 1; done; }
map_lacks() { local m; m=$(map); [ -n "$m" ] && ! grep -q "\"$1\"" <<< "$(sed 's/.*"nodes":\(\[[^]]*\]\).*/\1/' <<< "$m")"; }
key_gone() { [ -z "$(ctl get "/rdax/nodes/$1" --print-value-only)" ]; }
coordinator() { map | sed 's/.*"coordinator":"\([^"]*\)".*/\1/'; }
for ((i = 0; i < nodes; i++)); do start "$i"; done
wait_for "a map of all $nodes nodes" 60 map_has_all
echo "bench-cluster: $nodes nodes, etcd lease TTL $ttl_ms ms, $rounds rounds ($(nproc) cores; load $(cut -d' ' -f1 /proc/loadavg))"
gone=() degraded=() back=()
for ((r = 1; r <= rounds; r++)); do
  c=$(coordinator)
  if ((r % 2)); then victim=$c; kind=coordinator; else
    for ((i = 0; i < nodes; i++)); do [ "n$i" != "$c" ] && { victim=n$i; break; }; done; kind=member
  fi
  i=${victim#n}
  t0=$(now); kill -9 "${pids[$i]}"
  wait_for "etcd to drop $victim" 60 key_gone "$victim"; t1=$(now)
  wait_for "a map without $victim" 60 map_lacks "$victim"; t2=$(now)
  start "$i"; t3=$(now)
  wait_for "a map with $victim again" 60 map_has_all; t4=$(now)
  g=$(awk "BEGIN {print $t1 - $t0}") d=$(awk "BEGIN {print $t2 - $t0}") b=$(awk "BEGIN {print $t4 - $t3}")
  gone+=("$g") degraded+=("$d") back+=("$b")
  printf 'round %d: kill -9 %s (%s): key gone %.2f s, degraded detected %.2f s (new coordinator %s); restarted: placed again %.2f s\n' \
    "$r" "$victim" "$kind" "$g" "$d" "$(coordinator)" "$b"
done
python3 - "$ttl_ms" "${gone[*]}" "${degraded[*]}" "${back[*]}" <<'PY'
import statistics as st, sys
ttl = int(sys.argv[1]) / 1000
g, d, b = ([float(x) for x in a.split()] for a in sys.argv[2:5])
print(f"kill -> key gone: median {st.median(g):.2f} s, worst {max(g):.2f} s")
print(f"kill -> degraded detected: median {st.median(d):.2f} s, worst {max(d):.2f} s "
      f"(target <= TTL + 1 s = {ttl + 1:.2f} s{'' if max(d) <= ttl + 1 else ': TARGET MISSED'})")
print(f"restart -> placed again: median {st.median(b):.2f} s, worst {max(b):.2f} s")
PY
