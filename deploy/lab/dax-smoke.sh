#!/usr/bin/env bash
# Inside the lab VM: rdax on a real DAX region. Usage (from the host):
#   deploy/lab/lab.sh run --devdax -- deploy/lab/dax-smoke.sh /dev/dax0.0
#   deploy/lab/lab.sh run --fsdax /mnt/pmem -- deploy/lab/dax-smoke.sh /mnt/pmem/rdax.pool
# Uses the debug binaries of this checkout (build them first: cargo build).
set -euo pipefail
pool=$1
bin=$(cd "$(dirname "$0")/../.." && pwd)/target/debug
work=$(mktemp -d)
"$bin/rdaxctl" mkpool "$pool" --size 256M --force
"$bin/rdaxctl" fsck "$pool"
"$bin/rdaxd" --pool "$pool" --listen 127.0.0.1:0 --data-listen 127.0.0.1:0 --metrics-listen off \
  --admin-socket "$work/admin.sock" --ports-file "$work/ports.json" --log-level warn &
pid=$!
for _ in $(seq 1 500); do [ -s "$work/ports.json" ] && break; sleep 0.02; done
# Root in the VM administers through the admin socket: no token.
ctl() { "$bin/rdaxctl" --endpoint "unix:$work/admin.sock" "$@"; }
ctl --json info | grep -E '"(mode|persistence)"'
head -c 5000000 /dev/urandom > "$work/in"
ctl put smoke/blob "$work/in"
ctl get smoke/blob "$work/out"
cmp "$work/in" "$work/out" && echo "dax-smoke: put/get round trip OK"
kill -TERM $pid; wait $pid
"$bin/rdaxctl" fsck "$pool"
echo "dax-smoke: PASS"
