#!/usr/bin/env bash
# Inside the lab VM (rdma-lab.sh, VM 4): rdax volumes as the kernel's nbd devices, with ext4
# on top, on the emulated NVDIMM as device-DAX.
#   1. volume create; nbd-client (two connections); mkfs.ext4; mount; write files; sync;
#      umount; detach; fsck.ext4 -n -f comes back clean;
#   2. mount again and write files one after another, each fsync'd and then listed; kill -9
#      rdaxd in the middle; restart it; attach again: every listed file is intact, and fsck
#      is clean after the journal replay;
#   3. fio on the mounted filesystem (figures, not a pass/fail).
#   nbd-check.sh BIN_DIR OUT_DIR
set -uo pipefail
bin=$1 out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
work=/tmp/nbd-lab
mnt=/mnt/nbd
fail=0
step() { echo; echo "=== $* ($(cut -d' ' -f1 /proc/uptime) s)"; }
die() { echo "nbd-check: FAIL: $*"; fail=1; }
wait_port() {
  local end=$(( $(date +%s) + 30 ))
  until ss -Hltn "sport = :$1" | grep -q .; do
    [ "$(date +%s)" -lt "$end" ] || { echo "nothing listens on port $1"; return 1; }
    sleep 0.05
  done
}
ctl() { "$bin/rdaxctl" --endpoint "unix:$work/rdaxd.sock" "$@"; }
start_rdaxd() {
  "$bin/rdaxd" --pool /dev/dax0.0 --state-dir "$work" --listen 127.0.0.1:0 --data-listen 127.0.0.1:0 \
    --metrics-listen off --rdma-listen off --token-file "$work/token" \
    --nbd-listen 127.0.0.1:10809 --nbd-principal admin >>"$out/nbd-rdaxd.log" 2>&1 &
  pid=$!
  wait_port 10809
}
attach() { nbd-client 127.0.0.1 10809 "$1" -N lab/fs -b 4096 -C 2 || { echo "nbd-check: nbd-client $1 failed"; exit 1; }; }

mkdir -p "$work" "$mnt"
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"; chmod 600 "$work/token"
kver=$(uname -r)
# The guest has the lab kernel's modules but not the host's kmod tools: use the lab's kmod.
kmod=$root/target/lab/root/bin/kmod
(exec -a insmod "$kmod" "$root/target/lab/root/lib/modules/$kver/kernel/drivers/block/nbd.ko" nbds_max=4) \
  || { echo "nbd-check: cannot load nbd.ko"; exit 1; }
end=$(( $(date +%s) + 10 ))
until [ -b /dev/nbd1 ]; do [ "$(date +%s)" -lt "$end" ] || { echo "nbd-check: no /dev/nbd1"; exit 1; }; sleep 0.05; done

step "a pool on /dev/dax0.0, a 256 MiB volume, ext4 on /dev/nbd0"
"$bin/rdaxctl" mkpool /dev/dax0.0 --force >/dev/null || die "mkpool"
start_rdaxd
ctl volume create lab/fs --size 256M || die "volume create"
attach /dev/nbd0
mkfs.ext4 -q -F /dev/nbd0 || { echo "nbd-check: mkfs.ext4 failed"; exit 1; }
mount /dev/nbd0 "$mnt" || { echo "nbd-check: mount failed"; exit 1; }
for i in $(seq 1 16); do head -c 1048576 /dev/urandom > "$mnt/a$i"; done
sync
(cd "$mnt" && sha256sum a*) > "$work/a.sums"
ctl volume ls lab
umount "$mnt" || die "umount"
nbd-client -d /dev/nbd0
attach /dev/nbd0
fsck.ext4 -n -f /dev/nbd0 || die "fsck.ext4 after a clean umount"
mount /dev/nbd0 "$mnt" || die "mount again"
(cd "$mnt" && sha256sum -c --quiet "$work/a.sums") || die "files after remount"

step "kill -9 rdaxd while files are written and fsync'd one after another"
# The kernel reports every failed write after the kill; keep the console readable.
dmesg -n 1 2>/dev/null
: > "$work/synced"
(
  i=0
  while :; do
    i=$((i + 1))
    head -c 262144 /dev/urandom > "$work/blob" || exit 0
    cp "$work/blob" "$mnt/b$i" 2>/dev/null || exit 0
    sync "$mnt/b$i" 2>/dev/null || exit 0
    echo "$(sha256sum < "$work/blob" | cut -d' ' -f1)  b$i" >> "$work/synced"
  done
) &
writer=$!
end=$(( $(date +%s) + 60 ))
until [ "$(wc -l < "$work/synced")" -ge 20 ] || [ "$(date +%s)" -ge "$end" ]; do sleep 0.1; done
kill -9 "$pid"
echo "killed rdaxd after $(wc -l < "$work/synced") synced files"
wait "$pid" 2>/dev/null
kill -9 "$writer" 2>/dev/null; wait "$writer" 2>/dev/null
umount -l "$mnt" 2>/dev/null
nbd-client -d /dev/nbd0 >/dev/null 2>&1
[ "$(wc -l < "$work/synced")" -ge 1 ] || die "no file was synced before the kill"

step "restart, attach again (/dev/nbd1), journal replay, every synced file intact"
start_rdaxd
attach /dev/nbd1
mount /dev/nbd1 "$mnt" || die "mount after the kill"
(cd "$mnt" && sha256sum -c --quiet "$work/a.sums") || die "the first files after the kill"
(cd "$mnt" && sha256sum -c --quiet "$work/synced") || die "a synced file was lost or damaged"
echo "$(wc -l < "$work/synced") synced files intact"
umount "$mnt" || die "umount after the kill"
fsck.ext4 -n -f /dev/nbd1 || die "fsck.ext4 after the kill"

step "fio on ext4 on /dev/nbd1 (figures; the VM runs under TCG, so they say little about hardware)"
mount /dev/nbd1 "$mnt"
if command -v fio >/dev/null; then
  for p in "randread 4k 32" "randwrite 4k 32" "read 1m 8" "write 1m 8"; do
    set -- $p
    fio --name=lab --directory="$mnt" --size=64M --rw="$1" --bs="$2" --iodepth="$3" --ioengine=libaio --direct=1 \
      --runtime=5 --time_based --output-format=terse --terse-version=3 2>/dev/null \
      | awk -F';' -v p="$p" '{ printf "%-18s read %8.0f IOPS %8.1f MB/s   write %8.0f IOPS %8.1f MB/s\n", p, $8, $7/1024, $49, $48/1024 }' \
      | tee -a "$out/nbd-fio.txt"
  done
else
  echo "(fio is not installed on the host; skipped)"
fi
umount "$mnt"
nbd-client -d /dev/nbd1 >/dev/null 2>&1
kill -TERM "$pid"; wait "$pid"
echo "nbd-check: fail=$fail"
exit $fail
