#!/usr/bin/env bash
# Boots the test image by hand, console on this terminal (Ctrl-A X quits QEMU), the agent's
# port as a unix socket you can hand to qx-node (--vm-socket NAME=SOCKET). The tests use the
# Rust harness in e2e/src/qemu.rs instead, which owns its QEMUs by pid.
#
# Usage: bash ci/vm/run-vm.sh [SOCKET] [extra kernel command-line words, e.g. qx.agent=0]
set -euo pipefail
cd "$(dirname "$0")/../.."
sock=${1:-/tmp/qx-vm.agent.sock}
shift || true
[ -f target/vm/vmlinux ] || bash ci/vm/build-image.sh
accel=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ] && [ -e /dev/kvm ]; then
  accel=kvm
fi
rm -f "$sock"
echo "run-vm: agent socket $sock ($accel); Ctrl-A X quits" >&2
exec qemu-system-x86_64 -accel "$accel" -nodefaults -no-user-config -display none -no-reboot \
  -smp 1 -m 256 -kernel target/vm/vmlinux -initrd target/vm/initramfs.cpio.gz \
  -append "console=ttyS0 panic=-1 quiet $*" \
  -serial mon:stdio \
  -device virtio-serial-pci,id=vser0 \
  -chardev "socket,id=agent0,path=$sock,server=on,wait=off" \
  -device virtserialport,bus=vser0.0,chardev=agent0,name=org.quantix.agent.0
