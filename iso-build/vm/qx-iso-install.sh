#!/bin/busybox sh
# The guest half of iso-build/vm-test.sh: waits until /init.qx has mounted /dev and loaded the
# virtio modules, loads isofs, mounts the agent ISO (attached as virtio-blk /dev/vda) read-only
# and runs its install.sh, as an operator would. Every line goes to the serial console, where
# the host looks for "qx-iso-test: install.sh exit N".
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
bb=/bin/busybox
i=0
while { [ ! -b /dev/vda ] || [ ! -e /bin/sh ] || [ ! -c /dev/console ]; } && [ $i -lt 600 ]; do
  $bb sleep 0.1
  i=$((i + 1))
done
exec >/dev/console 2>&1
say() { echo "qx-iso-test: $*"; }
[ -b /dev/vda ] || { say "no /dev/vda"; exit 1; }
for m in cdrom isofs; do
  grep -q "^$m " /proc/modules || insmod "/lib/modules/iso-test/$m.ko" || say "insmod $m failed"
done
# qx.iso_auto=0: only make the ISO mountable; the host starts the installer (qemu-ga test).
if grep -qw 'qx.iso_auto=0' /proc/cmdline; then
  say "modules loaded; waiting for the host to start the installer"
  exit 0
fi
mkdir -p /mnt/cdrom
mount -t iso9660 -o ro /dev/vda /mnt/cdrom || { say "mount failed"; exit 1; }
say "mounted $(cat /mnt/cdrom/VERSION) from /dev/vda"
sh /mnt/cdrom/install.sh --timeout 60
rc=$?
say "install.sh exit $rc"
