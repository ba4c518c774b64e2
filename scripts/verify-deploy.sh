#!/usr/bin/env bash
# Check the deploy/ files: the systemd unit with `systemd-analyze verify` (installing systemd
# when it is missing), the example config with `rdaxd check-config`, the shell scripts with
# `bash -n`. Uses the debug rdaxd that the test command built.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq systemd >/dev/null; else sudo apt-get install -y systemd; fi
fi
bin="$PWD/target/debug/rdaxd"
[ -x "$bin" ] || cargo build -q -p rdaxd
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify checks that ExecStart exists: point it at the built binary.
sed "s|/usr/local/bin/rdaxd|$bin|" deploy/rdaxd.service > "$tmp/rdaxd.service"
systemd-analyze verify "$tmp/rdaxd.service"
echo "deploy: rdaxd.service verifies"
# The unit's exposure, as `systemd-analyze security` scores it (issue 12 asks for <= 2.0).
score=$(systemd-analyze security --offline=true "$tmp/rdaxd.service" 2>/dev/null | sed -n 's/.*exposure level for rdaxd.service: \([0-9.]*\).*/\1/p')
echo "deploy: rdaxd.service exposure $score (systemd-analyze security --offline)"
awk -v s="$score" 'BEGIN { exit !(s != "" && s + 0 <= 2.0) }' || { echo "deploy: exposure above 2.0" >&2; exit 1; }
"$bin" --config deploy/rdaxd.toml check-config > /dev/null
echo "deploy: rdaxd.toml is valid (no unknown keys)"
systemd-sysusers --dry-run "$PWD/deploy/sysusers.d/rdax.conf" > /dev/null 2>&1
echo "deploy: sysusers.d/rdax.conf parses (dry run)"
bash -n deploy/rxe-setup.sh
echo "deploy: scripts parse"
