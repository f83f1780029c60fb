#!/usr/bin/env bash
# The demo's main path, run by ci/demo.sh after it has built everything: libvirtd as the
# tests start it, qx-node on qemu:///system, a VM created, started, used and stopped through
# qx-node, then removed. Not meant to be run alone.
#
# Usage: bash ci/demo-libvirt.sh QX_NODE QXCTL
set -euo pipefail
cd "$(dirname "$0")/.."
qxnode=$1
qxctl_bin=$2
uri=qemu:///system

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

bold "libvirt: virtlogd and libvirtd (ci/libvirt.sh, as the tests start them)"
bash ci/libvirt.sh

work=$(mktemp -d /tmp/qx-demo18.XXXXXX)
vm_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
name=qx-demo-${vm_id:0:8}
node_pid=""
events_pid=""
cleanup() {
  local rc=$?
  [ -n "$events_pid" ] && kill "$events_pid" 2>/dev/null || true
  [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null || true
  # The domain and its snapshots, however the demo ended (nothing if it ended well).
  if virsh -q -c "$uri" dominfo "$vm_id" >/dev/null 2>&1; then
    virsh -q -c "$uri" destroy "$vm_id" >/dev/null 2>&1 || true
    virsh -q -c "$uri" undefine "$vm_id" --snapshots-metadata --nvram >/dev/null 2>&1 \
      || virsh -q -c "$uri" undefine "$vm_id" --snapshots-metadata >/dev/null 2>&1 || true
  fi
  if [ $rc -ne 0 ]; then
    echo "demo failed (exit $rc); qx-node log:" >&2
    tail -n 40 "$work/qx-node.log" >&2 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

addr=unix:$work/qx-node.sock   # the daemon's default kind of listener: a unix socket
metrics=127.0.0.1:$(free_port)
mkdir -p "$work/images" "$work/sock"
"$qxnode" --listen "$addr" --metrics-listen "$metrics" --libvirt-uri "$uri" \
  --agent-socket-dir "$work/sock" --image-dir "$work/images" --media-dir "$PWD/target/vm" >"$work/qx-node.log" 2>&1 &
node_pid=$!
for _ in $(seq 300); do
  grep -q "gRPC on" "$work/qx-node.log" && break
  kill -0 "$node_pid" 2>/dev/null || { cat "$work/qx-node.log" >&2; exit 1; }
  sleep 0.1
done
note "qx-node pid $node_pid: gRPC on $addr, metrics on http://$metrics/metrics, libvirt $uri"
# The log line comes just before the listener binds: wait until the node answers.
for _ in $(seq 100); do
  "$qxctl_bin" --addr "$addr" node info >/dev/null 2>&1 && break
  sleep 0.1
done

qxctl() {
  printf '\033[2m$ qxctl %s\033[0m\n' "$*"
  "$qxctl_bin" --addr "$addr" "$@"
}

bold "the node"
qxctl node info

# The event stream of this VM (others may share the host), from now on, shown at the end.
"$qxctl_bin" --addr "$addr" events --vm "$vm_id" >"$work/events.log" 2>&1 &
events_pid=$!

bold "a VM through qx-node: a real ext4 filesystem on a qcow2 disk, direct kernel boot"
qemu-img create -q -f raw "$work/data.raw" 64M
mkfs.ext4 -q -F "$work/data.raw"
qemu-img convert -O qcow2 "$work/data.raw" "$work/images/$name-data.qcow2"
rm -f "$work/data.raw"
qxctl vm create "$name" --id "$vm_id" --memory 256 --disk "$work/images/$name-data.qcow2" \
  --kernel "$PWD/target/vm/vmlinux" --initrd "$PWD/target/vm/initramfs.cpio.gz" \
  --cmdline "console=ttyS0 quiet qx.disk=vda:/data qx.hostname=demo-guest qx.agent_args=--telemetry-interval-ms=1000"
qxctl vm start "$name"
note "libvirt's view: $(virsh -q -c "$uri" domstate "$vm_id")," \
  "agent channel $(virsh -q -c "$uri" dumpxml "$vm_id" | grep -o "path='[^']*agent[^']*'" | head -n1)"

bold "waiting for the agent to say hello through the domain's channel"
t0=$SECONDS
until "$qxctl_bin" --addr "$addr" agent ping "$vm_id" >/dev/null 2>&1; do
  if [ $((SECONDS - t0)) -gt 180 ]; then
    echo "the agent did not answer within 180 s" >&2
    exit 1
  fi
  sleep 0.5
done
note "agent up $((SECONDS - t0)) s after the VM started"
qxctl vm status "$name"

bold "agent info"
qxctl agent info "$vm_id"

bold "live telemetry (a few seconds of qxctl watch)"
printf '\033[2m$ qxctl watch %s   (stopped after 6 s)\033[0m\n' "$vm_id"
timeout -s INT 6 "$qxctl_bin" --addr "$addr" watch "$vm_id" || true

bold "exec with streamed output"
qxctl exec "$vm_id" -- /bin/sh -c \
  'for i in 1 2 3 4 5; do echo "step $i on $(hostname), load $(cut -d" " -f1 /proc/loadavg)"; sleep 0.4; done'

bold "file copy host -> guest's ext4 disk, with progress, checked by sha256"
head -c $((16 * 1024 * 1024)) /dev/urandom >"$work/payload.bin"
note "host sha256: $(sha256sum "$work/payload.bin" | cut -d' ' -f1)"
qxctl cp "$work/payload.bin" "$vm_id:/data/payload.bin"
qxctl exec "$vm_id" -- sha256sum /data/payload.bin

bold "a quiesced snapshot: the agent freezes /data, libvirt snapshots, the agent thaws"
qxctl snapshot create "$name" demo-snap --quiesce --description "taken by ci/demo.sh"
qxctl snapshot list "$name"
qxctl fs status "$vm_id"

bold "clean shutdown through the agent"
qxctl agent shutdown "$vm_id"
t0=$SECONDS
until grep -q "vm_stopped" "$work/events.log"; do
  if [ $((SECONDS - t0)) -gt 120 ]; then
    echo "no VM_STOPPED event within 120 s" >&2
    exit 1
  fi
  sleep 0.5
done
note "libvirt's view: $(virsh -q -c "$uri" domstate "$vm_id")"

bold "the event stream of all of the above (qxctl events --vm VM)"
kill "$events_pid" 2>/dev/null || true
wait "$events_pid" 2>/dev/null || true
events_pid=""
cat "$work/events.log"

bold "RPC metrics in the Prometheus endpoint (a few lines)"
curl -fsS "http://$metrics/metrics" | grep '^grpc_server_handled_total' | head -n 8

bold "clean-up: the snapshot, the domain and its disk"
qxctl snapshot delete "$name" demo-snap
qxctl vm delete "$name" --storage
if virsh -q -c "$uri" dominfo "$vm_id" >/dev/null 2>&1; then
  echo "the domain is still defined" >&2
  exit 1
fi
# The data disk was made here and attached by path, so `--storage` leaves it alone: qx-node
# deletes only the images it created for the VM (docs/security.md). The demo removes its own.
[ -e "$work/images/$name-data.qcow2" ] || { echo "qx-node deleted an image it did not create" >&2; exit 1; }
rm -f "$work/images/$name-data.qcow2"
left=$(find "$work/images" -type f | wc -l)
[ "$left" -eq 0 ] || { echo "images left behind: $(ls "$work/images")" >&2; exit 1; }
note "no domain, no image left"
bold "demo done"
