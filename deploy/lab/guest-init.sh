#!/bin/busybox sh
# PID 1 of the lab VM: load modules, mount the host's root read-only under a tmpfs overlay,
# chroot into it and run the job; then power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
groups=base; grep -q labpmem /proc/cmdline && groups="base pmem"
for g in $groups; do for m in $(cat /load.$g); do
  insmod /mod/$m 2>/tmp/e || echo "[lab] insmod $m: $(cat /tmp/e)"
done; done
for a in $(cat /proc/cmdline); do case $a in labjob=*) JOB=${a#labjob=};; labmods=*) MODS=${a#labmods=};; esac; done
mkdir -p /lower /upper /root
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /lower || { echo "[lab] no host root"; poweroff -f; }
# Modules loaded later (by the guest's tools) come from the unpacked kernel package.
mkdir -p /lib/modules && mount --bind /lower$MODS /lib/modules && echo /bin/modprobe > /proc/sys/kernel/modprobe
mount -t tmpfs -o mode=755 tmpfs /upper && mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /root || { echo "[lab] no overlay"; poweroff -f; }
R=/root
mount -t proc proc $R/proc; mount -t sysfs sysfs $R/sys; mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm $R/run $R/usr/lib/modules
mount -t devpts devpts $R/dev/pts; mount -t tmpfs tmpfs $R/dev/shm; mount -t tmpfs tmpfs $R/run
mount --bind /lib/modules $R/usr/lib/modules
mkdir -p $R$JOB && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none job $R$JOB
if [ -f $R$JOB/rw_path ]; then RW=$(cat $R$JOB/rw_path); mkdir -p $R$RW; mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none rw $R$RW; fi
ip link set lo up
if grep -q labsystemd /proc/cmdline; then
  # systemd as PID 1 (lab.sh run --systemd): the job runs as a unit, writes its status and
  # powers the VM off itself.
  cat > $R/etc/systemd/system/lab-job.service <<UNIT
[Unit]
Description=rdax lab job
After=basic.target
[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
ExecStart=/bin/bash -c 'cd $JOB && /bin/bash $JOB/job.sh; echo \$\$? > $JOB/rc; sync; systemctl --force --force poweroff'
UNIT
  # The host's root is a container image: without this systemd thinks it runs in docker
  # and would ignore what the kernel command line says.
  rm -f $R/.dockerenv $R/run/.containerenv
  # /tmp is the host's (a CI clone lives there): no fresh tmpfs over it, and no boot-time
  # clean-up, which would hide it all behind overlay whiteouts (tmpfiles' `D /tmp`).
  ln -sf /dev/null $R/etc/systemd/system/tmp.mount
  mkdir -p $R/etc/tmpfiles.d
  printf 'd /tmp 1777 root root -\nd /var/tmp 1777 root root -\n' > $R/etc/tmpfiles.d/tmp.conf
  exec chroot $R /lib/systemd/systemd --unit=lab-job.service --show-status=false
fi
chroot $R /bin/bash -c "cd $JOB && exec /bin/bash $JOB/job.sh" > /dev/console 2>&1 < /dev/null
echo $? > $R$JOB/rc
sync; umount $R$JOB 2>/dev/null; [ -n "$RW" ] && umount $R$RW 2>/dev/null
poweroff -f
