#!/usr/bin/env bash
# `qxctl agent install` end to end through a real qx-node and libvirt (qemu:///system, TCG):
# a VM whose guest installed the agent from the ISO at boot (the cdrom given at create time,
# iso-build/vm/ hook) is upgraded with `qxctl agent install VM`: MountAgentIso (forced media
# change), ExecuteInGuest of iso-build/guest-launch.sh, the agent restarts onto the new binary,
# qxctl reads the installer's exit status through the new session, EjectAgentIso.
#
# Usage: iso-build/node-test.sh [--agent PATH]
# Needs root, libvirt (started with ci/libvirt.sh), target/vm from ci/vm/build-image.sh, and the
# qx-node/qxctl debug binaries (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

agent=""
[ "${1:-}" = "--agent" ] && agent=$2
if [ -z "$agent" ]; then
  bash ci/build-agent.sh >&2
  agent=$root/target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
fi

log() { printf 'node-test: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

vm=$root/target/vm
[ -f "$vm/vmlinux" ] && [ -f "$vm/initramfs.cpio.gz" ] || QX_AGENT_BIN=$agent bash ci/vm/build-image.sh >&2
release=$(cat "$vm/kernel-release")
moddir=$(ls -d "$vm"/cache/linux-image-*/lib/modules/"$release" | head -n1)

bash ci/libvirt.sh >&2
cargo build --quiet --locked -p qx-node --bins >&2
qxctl_bin=$root/target/debug/qxctl
node_bin=$root/target/debug/qx-node

work=$(mktemp -d /tmp/qx-iso-node.XXXXXX)
chmod 0755 "$work"
vm_id=$(cat /proc/sys/kernel/random/uuid)
node_pid=""
cleanup() {
  virsh -q -c qemu:///system destroy "$vm_id" >/dev/null 2>&1 || true
  virsh -q -c qemu:///system undefine "$vm_id" >/dev/null 2>&1 || true
  [ -z "$node_pid" ] || kill "$node_pid" 2>/dev/null || true
  [ -z "$node_pid" ] || wait "$node_pid" 2>/dev/null || true
  if [ -z "${QX_KEEP:-}" ]; then rm -rf "$work"; else log "kept $work"; fi
}
trap cleanup EXIT
cp "$agent" "$work/agent.bin"
agent=$work/agent.bin

iso=$(bash iso-build/build-iso.sh --agent "$agent" --out "$work/iso" 2>"$work/build.log") \
  || { cat "$work/build.log" >&2; fail "build-iso.sh failed"; }

# The guest hook and the CD-ROM modules (libvirt puts CD-ROMs on SATA: ahci) on top of ci/vm's
# initramfs, as in vm-test.sh.
ov=$work/overlay
mkdir -p "$ov/lib/modules/iso-test" "$ov/dev"
modules="scsi_common scsi_mod libata libahci ahci ata_piix cdrom sr_mod isofs"
for m in $modules; do
  f=$(find "$moddir/kernel" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || fail "module $m not found"
  cp "$f" "$ov/lib/modules/iso-test/$m.ko"
done
echo "$modules" | tr ' ' '\n' >"$ov/lib/modules/iso-test/modules.order"
mknod -m 0666 "$ov/dev/null" c 1 3
install -m 0755 iso-build/vm/init "$ov/init"
install -m 0755 ci/vm/init.sh "$ov/init.qx"
install -m 0755 iso-build/vm/qx-iso-install.sh "$ov/qx-iso-install.sh"
(cd "$ov" && find . -print0 | cpio --null -o -H newc --quiet --owner=0:0) | gzip -1 >"$work/overlay.cpio.gz"
cat "$vm/initramfs.cpio.gz" "$work/overlay.cpio.gz" >"$work/initrd"
cp "$vm/vmlinux" "$work/vmlinux"

# ---- the daemon -------------------------------------------------------------------------------
port=$((20000 + RANDOM % 20000))
addr=127.0.0.1:$port
"$node_bin" --listen "$addr" --insecure-listen --libvirt-uri qemu:///system \
  --agent-socket-dir "$work/sock" --image-dir "$work/images" --media-dir "$work" --agent-iso "$iso" >"$work/node.log" 2>&1 &
node_pid=$!
qxctl() { "$qxctl_bin" --addr "http://$addr" "$@"; }
i=0
until qxctl vm list >/dev/null 2>&1; do
  kill -0 "$node_pid" 2>/dev/null || { cat "$work/node.log" >&2; fail "qx-node exited"; }
  [ $i -lt 300 ] || fail "qx-node did not answer"
  sleep 0.1
  i=$((i + 1))
done
log "qx-node pid $node_pid on $addr, agent ISO $(basename "$iso")"

qxctl vm create "qx-iso-node-${vm_id:0:8}" --id "$vm_id" --memory 256 --cdrom "$iso" \
  --kernel "$work/vmlinux" --initrd "$work/initrd" \
  --cmdline "console=ttyS0 panic=-1 quiet qx.agent=0 qx.hostname=qx-iso-node" --start >"$work/create.log" 2>&1 \
  || { cat "$work/create.log" "$work/node.log" >&2; fail "qxctl vm create failed"; }

# The guest installs the agent from the cdrom at boot; wait until the daemon sees it.
old_session=""
for _ in $(seq 1 900); do
  if qxctl --json agent info "$vm_id" >"$work/info.json" 2>/dev/null \
    && grep -q '"connected": true' "$work/info.json"; then
    old_session=$(sed -n 's/.*"session_id": \([0-9]*\).*/\1/p' "$work/info.json")
    break
  fi
  sleep 0.2
done
[ -n "$old_session" ] || { cat "$work/info.json" "$work/node.log" >&2; fail "the agent installed at boot never connected"; }
log "agent installed at boot is connected (session $old_session)"

# ---- the commands under test ------------------------------------------------------------------
# --print-only: the ISO goes into the drive and the command for the guest is printed, naming the
# volume of the image the daemon inserted.
version=$(basename "$iso" .iso | sed 's/^quantix-kvm-agent-//')
qxctl --json agent install "$vm_id" --print-only >"$work/print.json" 2>"$work/print.err" \
  || { cat "$work/print.err" >&2; fail "qxctl agent install --print-only failed"; }
grep -q '"installed":false' "$work/print.json" || { cat "$work/print.json" >&2; fail "--print-only claims an install"; }
grep -q "LABEL=QX_AGENT_${version//./_}" "$work/print.json" || { cat "$work/print.json" >&2; fail "the printed command names another volume"; }
grep -q "\"iso\":\"$iso\"" "$work/print.json" || { cat "$work/print.json" >&2; fail "the daemon inserted another image"; }
log "ok: --print-only inserts $(basename "$iso") and prints the guest command"

set +e
qxctl --json agent install "$vm_id" --timeout-s 180 --install-args "--timeout 60" >"$work/install.json" 2>"$work/install.err"
rc=$?
set -e
[ "$rc" = 0 ] || { cat "$work/install.err" "$work/install.json" "$work/node.log" >&2; fail "qxctl agent install exited $rc"; }
grep -q '"installed":true' "$work/install.json" || { cat "$work/install.json" >&2; fail "not installed"; }
grep -q '"installer_exit_code":0' "$work/install.json" || { cat "$work/install.json" >&2; fail "installer exit code"; }
new_session=$(sed -n 's/.*"session_id":\([0-9]*\).*/\1/p' "$work/install.json")
[ -n "$new_session" ] && [ "$new_session" != "$old_session" ] \
  || { cat "$work/install.json" >&2; fail "the agent did not restart (session $old_session -> ${new_session:-none})"; }
grep -q 'upgrading quantix-kvm-agent' "$work/install.json" || { cat "$work/install.json" >&2; fail "the install was not an upgrade"; }
grep -q '"ejected":true' "$work/install.json" || { cat "$work/install.json" >&2; fail "the ISO was not ejected"; }
log "ok: qxctl agent install upgraded the agent through qx-node (session $old_session -> $new_session), ISO ejected"
