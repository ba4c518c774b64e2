#!/usr/bin/env bash
# Inside the lab VM (see rdma-lab.sh): the RDMA end-to-end tests, the verbs facts, and
# (device-DAX run) the bench next to perftest and iperf3.
#   in-vm.sh devdax|fsdax TESTBIN OUTDIR
set -uo pipefail
kind=$1 testbin=$2 out=$3
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
S=10.77.0.1 C=10.77.0.2
export RDAX_LAB_SERVER_IP=$S RDAX_LAB_CLIENT_IP=$C RUST_BACKTRACE=1
fail=0
step() { echo; echo "=== $* ($(cut -d' ' -f1 /proc/uptime) s)"; }

# Wait (bounded) until something listens on TCP port $1.
wait_port() {
  local end=$(( $(date +%s) + ${2:-20} ))
  until ss -Hltn "sport = :$1" | grep -q .; do
    [ "$(date +%s)" -lt "$end" ] || { echo "nothing listens on port $1"; return 1; }
    sleep 0.05
  done
}

step "verbs facts (rdax-rdma-probe)"
"$bin/rdax-rdma-probe" || fail=1
"$bin/rdax-rdma-probe" --pair $S $C || fail=1

if [ "${LAB_TESTS:-1}" = 0 ]; then
  echo "(tests skipped: LAB_TESTS=0)"
elif [ "$kind" = devdax ]; then
  export RDAX_LAB_DEVDAX=/dev/dax0.0
  step "device-DAX registration"
  "$bin/rdax-rdma-probe" --reg /dev/dax0.0 $S || fail=1
  step "RDMA end-to-end tests (device-DAX)"
  "$testbin" --ignored --test-threads=1 devdax_ 2>&1 | tee "$out/tests-devdax.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || fail=1
else
  export RDAX_LAB_FSDAX=$4
  step "fs-DAX registration"
  head -c 4194304 /dev/zero > "$RDAX_LAB_FSDAX/probe.bin"
  "$bin/rdax-rdma-probe" --reg "$RDAX_LAB_FSDAX/probe.bin" $S || fail=1
  rm -f "$RDAX_LAB_FSDAX/probe.bin"
  step "RDMA end-to-end tests (fs-DAX)"
  "$testbin" --ignored --test-threads=1 fsdax_ 2>&1 | tee "$out/tests-fsdax.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || fail=1
fi
[ "$kind" = devdax ] && [ "${LAB_BENCH:-1}" = 1 ] || { echo "in-vm: fail=$fail"; exit $fail; }

step "bench: perftest and iperf3 vs rdax, same rxe pair and veth"
secs=${LAB_BENCH_SECONDS:-8}
perf() { # name port server-args -- client-args
  local name=$1 port=$2; shift 2; local s=() c=()
  while [ "$1" != "--" ]; do s+=("$1"); shift; done; shift; c=("$@")
  timeout 120 "${s[@]}" -p "$port" > "$out/$name.server.txt" 2>&1 & local sp=$!
  wait_port "$port" || return 1
  timeout 120 "${c[@]}" -p "$port" > "$out/$name.txt" 2>&1; local rc=$?
  wait $sp
  return $rc
}
perf ib_write_bw 18515 ib_write_bw -d rxe0 -x 1 -s 65536 -D "$secs" -- ib_write_bw -d rxe1 -x 1 -s 65536 -D "$secs" $S
perf ib_read_lat 18516 ib_read_lat -d rxe0 -x 1 -- ib_read_lat -d rxe1 -x 1 $S
timeout 60 iperf3 -s -B $S -p 5201 -1 > "$out/iperf3.server.txt" 2>&1 & sp=$!
wait_port 5201 && timeout 60 iperf3 -c $S -B $C -p 5201 -t "$secs" > "$out/iperf3.txt" 2>&1; wait $sp

work=$(mktemp -d)
"$bin/rdaxctl" mkpool /dev/dax0.0 --force > /dev/null
"$bin/rdaxd" --pool /dev/dax0.0 --listen 127.0.0.1:0 --data-listen $S:0 --rdma-listen $S:0 --allow-no-token \
  --metrics-listen off --ports-file "$work/ports.json" --log-level warn 2> "$out/rdaxd-bench.log" &
dpid=$!
end=$(( $(date +%s) + 30 ))
until [ -s "$work/ports.json" ]; do [ "$(date +%s)" -lt "$end" ] || { echo "rdaxd did not start"; exit 1; }; sleep 0.05; done
ep=http://$(sed -E 's/.*"grpc":"([^"]+)".*/\1/' "$work/ports.json")
lb() { "$bin/rdaxctl" --endpoint "$ep" --rdma-source $C --json "$@"; }
lb --transport rdma lease-bench --op write --size 64K --depth 16 --seconds "$secs" > "$out/rdax-rdma-write.json" || fail=1
lb --transport rdma lease-bench --op read --size 2 --depth 1 --seconds "$secs" > "$out/rdax-rdma-read-lat.json" || fail=1
lb --transport tcp lease-bench --op write --size 1M --depth 4 --seconds "$secs" > "$out/rdax-tcp-write.json" || fail=1
kill -TERM $dpid; wait $dpid

jq_num() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))[sys.argv[2]], 2))' "$1" "$2"; }
perf_bw=$(awk '/^ *65536/ {print $4}' "$out/ib_write_bw.txt" | tail -1)          # BW average, MB/sec (2^20)
perf_lat=$(awk '/^ *2 +[0-9]/ {print $5}' "$out/ib_read_lat.txt" | tail -1)        # t_typical, usec
iperf=$(awk '/receiver/ {print $7, $8}' "$out/iperf3.txt" | tail -1)
rdax_bw=$(jq_num "$out/rdax-rdma-write.json" mb_per_s)                              # 10^6 B/s
rdax_lat=$(jq_num "$out/rdax-rdma-read-lat.json" lat_us_p50)
rdax_tcp=$(jq_num "$out/rdax-tcp-write.json" mb_per_s)
{
  echo "RDMA WRITE 64 KiB:  ib_write_bw ${perf_bw} MiB/s = $(awk -v b="$perf_bw" 'BEGIN{printf "%.2f", b*1.048576}') MB/s;  rdax ${rdax_bw} MB/s;  ratio $(awk -v r="$rdax_bw" -v b="$perf_bw" 'BEGIN{ if (b>0) printf "%.3f", r/(b*1.048576); else print "n/a" }') (target >= 0.9)"
  echo "RDMA READ latency:  ib_read_lat typical ${perf_lat} us;  rdax p50 ${rdax_lat} us;  ratio $(awk -v r="$rdax_lat" -v b="$perf_lat" 'BEGIN{ if (b>0) printf "%.3f", r/b; else print "n/a" }') (target <= 1.1)"
  echo "TCP over the veth:  iperf3 ${iperf};  rdax TCP data plane write 1 MiB x4 ${rdax_tcp} MB/s = $(awk -v r="$rdax_tcp" 'BEGIN{printf "%.3f", r*8/1000}') Gbit/s"
} | tee "$out/bench-summary.txt"
echo "in-vm: fail=$fail"
exit $fail
