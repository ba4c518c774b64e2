# Sourced by the lab's bench scripts (inside the VM): a fresh pool on /dev/dax0.0 and a release
# rdaxd on it, listening for RDMA and the TCP data plane on the server side of the rxe pair.
#   bench_daemon BINDIR LOG     sets bench_pid and bench_work; defines lb (rdaxctl as root,
#                               through the admin socket, no token)
#   bench_daemon_stop
# Needs S and C (the server's and the client's address).
bench_daemon() {
  local bin=$1 log=$2 end
  bench_work=$(mktemp -d)
  bench_bin=$bin
  "$bin/rdaxctl" mkpool /dev/dax0.0 --force > /dev/null || return 1
  "$bin/rdaxd" --pool /dev/dax0.0 --listen 127.0.0.1:0 --data-listen "$S:0" --rdma-listen "$S:0" \
    --admin-socket "$bench_work/admin.sock" --metrics-listen off --ports-file "$bench_work/ports.json" \
    --log-level warn 2> "$log" &
  bench_pid=$!
  end=$(( $(date +%s) + 30 ))
  until [ -s "$bench_work/ports.json" ]; do
    kill -0 "$bench_pid" 2>/dev/null && [ "$(date +%s)" -lt "$end" ] || { echo "rdaxd did not start (see $log)"; return 1; }
    sleep 0.05
  done
}
lb() { "$bench_bin/rdaxctl" --endpoint "unix:$bench_work/admin.sock" --rdma-source "$C" --json "$@"; }
bench_daemon_stop() { kill -TERM "$bench_pid"; wait "$bench_pid"; }
