#!/bin/busybox sh
# The guest half of iso-build/vm-test.sh: waits until /init.qx has mounted /dev and loaded the
# virtio modules, loads the CD-ROM stack, mounts the agent ISO (in the IDE CD-ROM drive,
# /dev/sr0) read-only and runs its install.sh, as an operator would. Every line goes to the serial console, where
# the host looks for "qx-iso-test: install.sh exit N".
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
bb=/bin/busybox
i=0
while { [ ! -e /bin/sh ] || [ ! -c /dev/console ] || [ ! -d /sys/class/virtio-ports ]; } && [ $i -lt 600 ]; do
  $bb sleep 0.1
  i=$((i + 1))
done
exec >/dev/console 2>&1
say() { echo "qx-iso-test: $*"; }
for m in $(cat /lib/modules/iso-test/modules.order); do
  grep -q "^$m " /proc/modules || insmod "/lib/modules/iso-test/$m.ko" || say "insmod $m failed"
done
i=0
while [ ! -b /dev/sr0 ] && [ $i -lt 300 ]; do
  sleep 0.1
  i=$((i + 1))
done
[ -b /dev/sr0 ] || { say "no /dev/sr0"; exit 1; }
# qx.iso_auto=0: only make the ISO mountable; the host starts the installer (qemu-ga test).
if grep -qw 'qx.iso_auto=0' /proc/cmdline; then
  say "cd-rom ready; waiting for the host to start the installer"
  exit 0
fi
mkdir -p /mnt/cdrom
mount -t iso9660 -o ro /dev/sr0 /mnt/cdrom || { say "mount failed"; exit 1; }
say "mounted $(cat /mnt/cdrom/VERSION) from /dev/sr0"
sh /mnt/cdrom/install.sh --timeout 60
rc=$?
say "install.sh exit $rc"
