#!/usr/bin/env bash
# Inside a lab VM booted with systemd as PID 1 (deploy/lab/lab.sh run --systemd): install
# rdaxd the way the README's "Install as a service" says, then check the unit under a real
# systemd: start and READY, the STATUS line, the admin socket as root, a principal's token
# over TCP, reload (good and broken config), log priorities in the journal, the exposure
# score, a watchdog restart, stop, and fsck. Usage (from the host, after a release build):
#   deploy/lab/lab.sh run --systemd -- deploy/lab/systemd-check.sh [BIN_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-$root/target/lab-bin}
[ -x "$bin/rdaxd" ] || bin=$root/target/release
fail=0
step() { echo "[systemd-check] $*"; }
check() { if "$@"; then step "ok: $*"; else step "FAILED: $*"; fail=1; fi; }
cd "$root"

step "systemd $(systemctl --version | head -1 | awk '{print $2}') is PID 1: $(cat /proc/1/comm)"
install -m 0755 "$bin/rdaxd" "$bin/rdaxctl" /usr/local/bin/
install -D -m 0644 deploy/sysusers.d/rdax.conf /etc/sysusers.d/rdax.conf && systemd-sysusers
install -D -m 0640 -g rdax deploy/rdaxd.toml /etc/rdax/rdaxd.toml
# A smaller pool than the default 1 GiB: the VM's root is a tmpfs.
sed -i 's/^size = "1G"/size = "256M"/' /etc/rdax/rdaxd.toml
install -m 0644 deploy/rdaxd.service /etc/systemd/system/rdaxd.service
systemctl daemon-reload
check systemctl start rdaxd
check systemctl is-active --quiet rdaxd
status=$(systemctl show -p StatusText --value rdaxd)
step "STATUS: $status"
check test -n "$status"
check test "$(stat -c '%a %U %G' /var/lib/rdax/rdaxd.sock)" = "660 rdax rdax"

# Root administers through the admin socket, without a token; TCP without one gets nothing.
check rdaxctl info
echo "hello from systemd" | rdaxctl put demo/greeting
check test "$(rdaxctl get demo/greeting)" = "hello from systemd"
rc=0; rdaxctl --endpoint http://127.0.0.1:7400 info > /dev/null 2>&1 || rc=$?
check test "$rc" = 6

# A principal's token, added on reload (the file 0640 root:rdax, as the README says).
out=$(rdaxctl --json token create ops --scope demo/:write)
# The token goes to a 0600 file, never onto a command line.
(umask 077; python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' <<< "$out" > /root/ops.token)
python3 -c 'import json,sys; print(json.load(sys.stdin)["principals_file_entry"])' <<< "$out" > /etc/rdax/principals.toml
chown root:rdax /etc/rdax/principals.toml && chmod 0640 /etc/rdax/principals.toml
sed -i 's|^# principals_file = .*|principals_file = "/etc/rdax/principals.toml"|' /etc/rdax/rdaxd.toml
check systemctl reload rdaxd
check rdaxctl --token-file /root/ops.token --endpoint http://127.0.0.1:7400 stat demo/greeting
# A broken config fails the reload, and the daemon keeps running on the old one.
cp /etc/rdax/rdaxd.toml /tmp/good.toml
echo 'bogus_key = 1' >> /etc/rdax/rdaxd.toml
rc=0; systemctl reload rdaxd || rc=$?
check test "$rc" != 0
cp /tmp/good.toml /etc/rdax/rdaxd.toml
check systemctl is-active --quiet rdaxd
check rdaxctl --token-file /root/ops.token --endpoint http://127.0.0.1:7400 stat demo/greeting

# Log priorities reach the journal: a warning (an unknown key at start) is at priority 4, so
# `-p warning` shows it and `-p err` does not.
echo 'unknown_for_the_journal = 1' >> /etc/rdax/rdaxd.toml
check systemctl restart rdaxd
check bash -c 'journalctl -u rdaxd -p warning --no-pager | grep -q "unknown config key ignored"'
check bash -c '! journalctl -u rdaxd -p err --no-pager | grep -q "unknown config key ignored"'
cp /tmp/good.toml /etc/rdax/rdaxd.toml
check systemctl restart rdaxd
# The data survived the restarts.
check test "$(rdaxctl get demo/greeting)" = "hello from systemd"

# A daemon that stops answering is killed by the watchdog (WatchdogSec=30s) and restarted.
restarts=$(systemctl show -p NRestarts --value rdaxd)
kill -STOP "$(systemctl show -p MainPID --value rdaxd)"
end=$(( $(date +%s) + 150 ))
until [ "$(systemctl show -p NRestarts --value rdaxd)" -gt "$restarts" ] && systemctl is-active --quiet rdaxd; do
  [ "$(date +%s)" -lt "$end" ] || break
  sleep 1
done
check test "$(systemctl show -p NRestarts --value rdaxd)" -gt "$restarts"
check bash -c 'journalctl -u rdaxd --no-pager | grep -qi "watchdog timeout"'
check test "$(rdaxctl get demo/greeting)" = "hello from systemd"

score=$(systemd-analyze security rdaxd --no-pager 2>/dev/null | sed -n 's/.*Overall exposure level for rdaxd.service: \([0-9.]*\).*/\1/p')
step "exposure: ${score:-unknown}"
check awk -v s="$score" 'BEGIN { exit !(s ~ /^[0-9]+(\.[0-9]+)?$/ && s + 0 <= 2.0) }'

check systemctl stop rdaxd
check bash -c '! systemctl is-active --quiet rdaxd'
check test ! -e /var/lib/rdax/rdaxd.sock
check rdaxctl fsck /var/lib/rdax/default.pool
step "done: fail=$fail"
exit $fail
