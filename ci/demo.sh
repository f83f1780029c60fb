#!/usr/bin/env bash
# The demo: sets up what it needs, builds everything, starts libvirtd as the tests do
# (ci/libvirt.sh) and qx-node on qemu:///system, then shows with qxctl: node info, a VM
# created and started through qx-node, its agent found through the domain's channel (info,
# live telemetry), an exec with streamed output, a file copy with a progress bar, a
# quiesced snapshot, and an agent shutdown ending in VM_STOPPED, with the event stream
# that recorded all of it. Everything it starts is stopped on exit, and the domain and its
# images are removed. Works on a fresh Debian 12 machine, as root.
#
# --no-libvirt: the same agent tour without libvirt: a bare QEMU, and qx-node with
# --libvirt-uri none and the agent socket bound by --vm-socket.
#
# Usage: bash ci/demo.sh [--no-setup] [--no-libvirt]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

setup=1
libvirt=1
for arg in "$@"; do
  case $arg in
    --no-setup) setup=0 ;;
    --no-libvirt) libvirt=0 ;;
    *) echo "usage: bash ci/demo.sh [--no-setup] [--no-libvirt]" >&2; exit 2 ;;
  esac
done

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }

if [ $setup -eq 1 ]; then
  bold "set-up (apt packages, Rust musl target)"
  bash ci/setup.sh
fi

bold "build: the static agent, the VM image, qx-node and qxctl"
bash ci/vm/build-image.sh
cargo build --locked -q -p qx-node --bins
qxnode=$root/target/debug/qx-node
qxctl_bin=$root/target/debug/qxctl

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [ $libvirt -eq 1 ]; then
  exec bash ci/demo-libvirt.sh "$qxnode" "$qxctl_bin"
fi

work=$(mktemp -d /tmp/qx-demo.XXXXXX)
qemu_pid=""
node_pid=""
cleanup() {
  local rc=$?
  [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null || true
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  if [ $rc -ne 0 ]; then
    echo "demo failed (exit $rc); guest console:" >&2
    tail -n 40 "$work/console.log" >&2 2>/dev/null || true
    echo "qx-node log:" >&2
    tail -n 40 "$work/qx-node.log" >&2 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

accel=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ] && [ -e /dev/kvm ]; then
  accel=kvm
fi

bold "boot: Debian kernel $(cat target/vm/kernel-release) + busybox initramfs + agent ($accel)"
sock=$work/agent.sock
qemu-system-x86_64 -accel "$accel" -nodefaults -no-user-config -display none -no-reboot \
  -smp 1 -m 256 -kernel target/vm/vmlinux -initrd target/vm/initramfs.cpio.gz \
  -append "console=ttyS0 panic=-1 quiet qx.hostname=demo-guest qx.agent_args=--telemetry-interval-ms=1000" \
  -serial "file:$work/console.log" \
  -device virtio-serial-pci,id=vser0 \
  -chardev "socket,id=agent0,path=$sock,server=on,wait=off" \
  -device virtserialport,bus=vser0.0,chardev=agent0,name=org.quantix.agent.0 \
  </dev/null >/dev/null 2>"$work/qemu.stderr" &
qemu_pid=$!
note "qemu pid $qemu_pid, agent channel $sock"
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done

addr=127.0.0.1:$(free_port)
"$qxnode" --listen "$addr" --insecure-listen --libvirt-uri none --vm-socket "demo=$sock" >"$work/qx-node.log" 2>&1 &
node_pid=$!
note "qx-node pid $node_pid, gRPC on $addr"

qxctl() {
  printf '\033[2m$ qxctl %s\033[0m\n' "$*"
  "$qxctl_bin" --addr "http://$addr" "$@"
}

bold "waiting for the agent to say hello"
t0=$SECONDS
until "$qxctl_bin" --addr "http://$addr" agent ping demo >/dev/null 2>&1; do
  if [ $((SECONDS - t0)) -gt 120 ]; then
    echo "the agent did not answer within 120 s" >&2
    exit 1
  fi
  sleep 0.5
done
note "agent up $((SECONDS - t0)) s after qx-node started"

bold "agent info"
qxctl agent info demo
qxctl agent ping demo

bold "live telemetry (a few seconds of qxctl watch)"
printf '\033[2m$ qxctl watch demo   (stopped after 6 s)\033[0m\n'
timeout -s INT 6 "$qxctl_bin" --addr "http://$addr" watch demo || true

bold "exec with streamed output"
qxctl exec demo -- /bin/sh -c \
  'for i in 1 2 3 4 5; do echo "step $i on $(hostname), load $(cut -d" " -f1 /proc/loadavg)"; sleep 0.4; done'

bold "file copy host -> guest with progress, checked by sha256"
head -c $((24 * 1024 * 1024)) /dev/urandom >"$work/payload.bin"
note "host sha256: $(sha256sum "$work/payload.bin" | cut -d' ' -f1)"
qxctl cp "$work/payload.bin" demo:/tmp/payload.bin
qxctl exec demo -- sha256sum /tmp/payload.bin

bold "clean shutdown through the agent"
qxctl agent shutdown demo
for _ in $(seq 300); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$qemu_pid" 2>/dev/null; then
  echo "the VM did not power off" >&2
  exit 1
fi
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=""
note "the VM powered off; QEMU exited"
bold "demo done"
