#!/usr/bin/env bash
# The rdax lab: a throw-away Linux VM (Debian 12 kernel, qemu under TCG, no NIC) with
# soft-RoCE (rdma_rxe on a veth pair) and an emulated NVDIMM, whose root filesystem is this
# host's own (9p, read-only, under a tmpfs overlay), so host-built binaries run inside at the
# same paths.
#
#   deploy/lab/lab.sh setup                     download qemu + kernel (.debs, never installed),
#                                               build the initramfs; about 90 MB, once
#   deploy/lab/lab.sh run [opts] -- CMD ARGS    boot, set up rxe (+ pmem), run CMD as root, exit
#                                               with its status (124 timeout, 125 VM died)
# run options (or environment):
#   --pmem SIZE   (LAB_PMEM)    emulated NVDIMM of SIZE, kept in $LAB/pmem.img between runs
#   --devdax      (LAB_DEVDAX=1) reconfigure it as device-DAX (/dev/dax0.0) before CMD
#   --fsdax DIR   (LAB_FSDAX)   reconfigure as fs-DAX, mkfs.ext4 and mount -o dax on DIR
#   --rw DIR      (LAB_RW)      share host DIR read-write at the same path (results out)
#   --timeout S   (LAB_TIMEOUT, default 900)
#   --systemd     (LAB_SYSTEMD=1) boot systemd as PID 1 and run CMD as a unit of it
# Inside: veth0 10.77.0.1 (rxe0) <-> veth1 10.77.0.2 (rxe1), GID index 1 (RoCE v2).
# Nothing leaves the VM: qemu runs with -nic none.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
LAB=${LAB:-$(cd "$HERE/../.." && pwd)/target/lab}
X=$LAB/root        # the unpacked .debs
die() { echo "lab: $*" >&2; exit 2; }

setup() {
  [ "$(id -u)" = 0 ] || die "setup needs root (apt-get)"
  mkdir -p "$LAB/debs/partial" "$X"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Tools the guest runs come from the host's root: install them on the host.
  apt-get install -y -qq --no-install-recommends ibverbs-utils perftest ndctl daxctl iperf3 rdma-core iproute2 nbd-client fio e2fsprogs nvme-cli >/dev/null
  # qemu and the kernel are only downloaded and unpacked: installing qemu-system-x86 would
  # replace this machine's qemu-utils, and linux-image pulls in udev and initramfs-tools.
  apt-get install -y -qq --no-install-recommends --download-only -o Dir::Cache::archives="$LAB/debs" qemu-system-x86 >/dev/null
  local kpkg
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  (cd "$LAB/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static kmod)
  for d in "$LAB"/debs/*.deb; do dpkg -x "$d" "$X"; done
  local kver
  kver=$(ls "$X/lib/modules" | head -n1)
  (exec -a depmod "$X/bin/kmod" -b "$X" "$kver")
  # An uncompressed kernel boots straight (PVH) and skips seconds of decompression under TCG.
  python3 - "$X/boot/vmlinuz-$kver" "$X/boot/vmlinux-$kver" <<'PY'
import lzma, sys
blob = open(sys.argv[1], "rb").read()
start = blob.find(b"\xfd7zXZ\x00")
open(sys.argv[2], "wb").write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob[start:]))
PY
  build_initramfs "$kver"
  echo "lab: ready (kernel $kver) in $LAB"
}

# The modules (with dependencies, in load order) the init needs before the root is mounted.
modules_for() {
  local kver=$1; shift
  mkdir -p "$LAB/no-modprobe.d"
  for m in "$@"; do
    (exec -a modprobe "$X/bin/kmod" -d "$X" -S "$kver" -C "$LAB/no-modprobe.d" --show-depends "$m") | awk '$1 == "insmod" {print $2}'
  done
}

build_initramfs() {
  local kver=$1 dir="$LAB/initramfs"
  rm -rf "$dir"; mkdir -p "$dir"/{bin,mod,proc,sys,dev,tmp}
  cp "$X/bin/busybox" "$dir/bin/"
  : > "$dir/load.base"; : > "$dir/load.pmem"
  local group f
  for group in base pmem; do
    local mods
    if [ $group = base ]; then
      mods="virtio_pci 9pnet_virtio 9p overlay veth crc32_generic crc32_pclmul rdma_rxe ib_uverbs rdma_ucm"
    else
      mods="nfit nd_pmem dax_pmem device_dax"
    fi
    # shellcheck disable=SC2086
    modules_for "$kver" $mods | while read -r p; do
      f=$(basename "$p")
      grep -qx "$f" "$dir/load.base" "$dir/load.pmem" 2>/dev/null || { echo "$f" >> "$dir/load.$group"; cp "$p" "$dir/mod/"; }
    done
  done
  cp "$HERE/guest-init.sh" "$dir/init"
  chmod +x "$dir/init"
  (cd "$dir" && find . | "$X/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$LAB/initramfs.cpio.gz"
}

run() {
  local pmem=${LAB_PMEM:-} devdax=${LAB_DEVDAX:-} fsdax=${LAB_FSDAX:-} rw=${LAB_RW:-} timeout=${LAB_TIMEOUT:-900}
  local systemd=${LAB_SYSTEMD:-}
  while [ $# -gt 0 ]; do
    case $1 in
      --pmem) pmem=$2; shift 2;;
      --devdax) devdax=1; shift;;
      --fsdax) fsdax=$2; shift 2;;
      --rw) rw=$2; shift 2;;
      --timeout) timeout=$2; shift 2;;
      --systemd) systemd=1; shift;;
      --) shift; break;;
      *) break;;
    esac
  done
  [ $# -ge 1 ] || die "usage: lab.sh run [opts] -- CMD [ARGS...]"
  [ -f "$LAB/initramfs.cpio.gz" ] || die "run 'deploy/lab/lab.sh setup' first"
  { [ -n "$devdax" ] || [ -n "$fsdax" ]; } && [ -z "$pmem" ] && pmem=1G
  local kver job
  kver=$(ls "$X/lib/modules" | head -n1)
  # An edited init must not meet a stale initramfs.
  [ "$HERE/guest-init.sh" -nt "$LAB/initramfs.cpio.gz" ] && build_initramfs "$kver"
  job=$(mktemp -d "$LAB/job.XXXXXX")
  trap 'rm -rf "$job"' EXIT
  {
    echo "#!/bin/bash"
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
    printf 'DEVDAX=%q FSDAX=%q\n' "$devdax" "$fsdax"
    cat "$HERE/guest-setup.sh"
    printf '%q ' "$@"; echo
  } > "$job/job.sh"
  [ -n "$rw" ] && echo "$rw" > "$job/rw_path"
  local machine=q35 mem=3G append="" extra=()
  if [ -n "$pmem" ]; then
    local img=$LAB/pmem.img
    [ -f "$img" ] || truncate -s "$pmem" "$img"
    machine=q35,nvdimm=on; mem="3G,slots=2,maxmem=64G"; append="labpmem"
    extra+=(-object "memory-backend-file,id=pm,share=on,mem-path=$img,size=$pmem" -device nvdimm,id=nv0,memdev=pm)
  fi
  [ -n "$rw" ] && extra+=(-virtfs "local,path=$rw,mount_tag=rw,security_model=none,multidevs=remap")
  # systemd starts only the job and what it needs: the host root's own enabled units are not
  # this VM's (guest-init.sh passes --unit=lab-job.service).
  [ -n "$systemd" ] && append="$append labsystemd"
  set +e
  LD_LIBRARY_PATH="$X/usr/lib/x86_64-linux-gnu:$X/lib/x86_64-linux-gnu" \
  timeout --foreground -k 10 "$timeout" "$X/usr/bin/qemu-system-x86_64" -L "$X/usr/share/qemu" -L "$X/usr/share/seabios" \
    -bios "$X/usr/share/qemu/qboot.rom" -machine "$machine" -accel tcg,thread=multi,tb-size=512 -cpu max -smp 2 -m "$mem" \
    -nodefaults -no-user-config -nographic -no-reboot -nic none -serial stdio -monitor none \
    -kernel "$X/boot/vmlinux-$kver" -initrd "$LAB/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off tsc=reliable clocksource=tsc labjob=$job labmods=$X/lib/modules $append" \
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$job,mount_tag=job,security_model=none" \
    "${extra[@]}" < /dev/null
  local q=$?
  set -e
  [ -f "$job/rc" ] && exit "$(cat "$job/rc")"
  echo "lab: the VM ended without a result (qemu status $q)" >&2
  [ $q = 124 ] && exit 124
  exit 125
}

case ${1:-} in
  setup) setup;;
  run) shift; run "$@";;
  *) die "usage: lab.sh setup | lab.sh run [--pmem SIZE] [--devdax | --fsdax DIR] [--rw DIR] -- CMD [ARGS...]";;
esac
