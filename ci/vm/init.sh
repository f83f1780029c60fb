#!/bin/busybox sh
# /init of the test VM (built into the initramfs by ci/vm/build-image.sh).
# Mounts the kernel filesystems, loads the virtio modules, names the virtio-serial ports the way
# udev would (/dev/virtio-ports/NAME), and runs the agent under a respawn loop so tests can kill
# it and watch it come back with a new session. PID 1 stays a shell that turns the signals
# busybox poweroff/reboot/halt send into the real thing.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

# After a switch from the initramfs (qx.root=) these are mounted already: they moved along.
mounted() { grep -q " $1 " /proc/mounts 2>/dev/null; }
mounted /proc || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/run /var/log
mounted /dev/pts || mount -t devpts devpts /dev/pts
mounted /run || mount -t tmpfs tmpfs /run
mounted /tmp || mount -t tmpfs tmpfs /tmp

say() { echo "qx-init: $*" >/dev/console; }

QX_AGENT=1
QX_AGENT_ARGS=
QX_HOSTNAME=qx-guest
QX_DISK=
QX_ROOT=
QX_QGA=0
QX_IP=
for word in $(cat /proc/cmdline); do
  case "$word" in
    qx.agent=*) QX_AGENT=${word#qx.agent=} ;;
    qx.agent_args=*) QX_AGENT_ARGS=$(echo "${word#qx.agent_args=}" | tr ',' ' ') ;;
    qx.hostname=*) QX_HOSTNAME=${word#qx.hostname=} ;;
    qx.disk=*) QX_DISK=${word#qx.disk=} ;;
    qx.root=*) QX_ROOT=${word#qx.root=} ;;
    qx.qga=*) QX_QGA=${word#qx.qga=} ;;
    qx.ip=*) QX_IP=${word#qx.ip=} ;;
  esac
done

hostname "$QX_HOSTNAME"
echo "$QX_HOSTNAME" >/etc/hostname

# /qx-root marks a root filesystem switched to from the initramfs, which loaded the modules.
if [ ! -e /qx-root ]; then
  for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null || say "insmod $m failed"
  done
fi

# qx.root=DEV: the root filesystem is the ext4 disk DEV, e.g. a storage volume that holds this
# image's own tree plus a /qx-root file: mount it and switch to its /init, which then runs the
# agent from the disk. Without such a tree there, stay in the initramfs.
if [ -n "$QX_ROOT" ] && [ ! -e /qx-root ]; then
  i=0
  while [ ! -b "/dev/$QX_ROOT" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  mkdir -p /newroot
  if mount -t ext4 "/dev/$QX_ROOT" /newroot && [ -e /newroot/qx-root ] && [ -x /newroot/init ]; then
    for m in /proc /sys /dev /run /tmp; do mount --move "$m" "/newroot$m"; done
    exec switch_root /newroot /init
  fi
  say "qx.root=$QX_ROOT: no /qx-root and /init on /dev/$QX_ROOT; staying in the initramfs"
fi
ip link set lo up 2>/dev/null
if [ -n "$QX_IP" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  ip addr add "$QX_IP" dev eth0 && ip link set eth0 up || say "eth0: cannot set $QX_IP"
fi

# The ports appear asynchronously after virtio_console loads; udev is not here to name them.
name_ports() {
  mkdir -p /dev/virtio-ports
  for p in /sys/class/virtio-ports/vport*; do
    [ -f "$p/name" ] || continue
    n=$(cat "$p/name")
    [ -n "$n" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$n"
  done
}
want=org.quantix.agent.0
[ "$QX_AGENT" = 0 ] && want=
i=0
while [ $i -lt 100 ]; do
  name_ports
  [ -z "$want" ] || [ -e "/dev/virtio-ports/$want" ] && break
  sleep 0.05
  i=$((i + 1))
done
[ -z "$want" ] || [ -e "/dev/virtio-ports/$want" ] || say "port $want did not appear"

if [ -n "$QX_DISK" ]; then
  dev=${QX_DISK%%:*}
  dir=${QX_DISK#*:}
  mkdir -p "$dir"
  i=0
  while [ ! -b "/dev/$dev" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  mount -t ext4 "/dev/$dev" "$dir" || say "mount /dev/$dev on $dir failed"
  # The agent's file operations reach the test disk as well as their default places.
  mkdir -p /etc/quantix-kvm
  echo "file_allow = /tmp, /var/tmp, /home, /root, /srv, /opt, $dir" >/etc/quantix-kvm/agent.conf
fi

respawn() {
  while :; do
    "$@"
    say "$1 exited with status $?; restarting"
    sleep 0.2
  done
}

if [ "$QX_AGENT" != 0 ]; then
  # shellcheck disable=SC2086
  respawn /bin/quantix-kvm-agent $QX_AGENT_ARGS </dev/null >/dev/console 2>&1 &
fi
QGA="/usr/bin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run"
if [ "$QX_QGA" = 1 ]; then
  # shellcheck disable=SC2086
  respawn $QGA </dev/null >/dev/console 2>&1 &
elif [ "$QX_QGA" = once ]; then
  # shellcheck disable=SC2086
  $QGA </dev/null >/dev/console 2>&1 &
fi

say "up: $(uname -r) $(hostname)"
trap 'sync; poweroff -f' USR2 TERM
trap 'sync; reboot -f' INT
trap 'sync; halt -f' USR1
while :; do
  sleep 1 &
  wait $!
done
