#!/usr/bin/env bash
# The agent ISO in a real VM (TCG unless KVM is really usable): the guest boots ci/vm's kernel
# and initramfs WITHOUT the agent (qx.agent=0), the ISO is in an IDE CD-ROM drive, the
# guest mounts it and runs install.sh under its busybox userland (no init supervisor: PID 1 is
# ci/vm's /init shell), and the host must see AgentReady from the freshly installed agent on
# the org.quantix.agent.0 chardev socket.
#
# Usage: iso-build/vm-test.sh [--agent PATH]
# Needs: target/vm/{vmlinux,initramfs.cpio.gz} from ci/vm/build-image.sh (built when missing).
#
# The extra kernel modules (IDE, SCSI CD-ROM, isofs) and the install hook come in a second cpio archive
# appended to ci/vm's initramfs (the kernel unpacks concatenated archives in order), so ci/vm's
# image itself is not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

agent=""
[ "${1:-}" = "--agent" ] && agent=$2
if [ -z "$agent" ]; then
  bash ci/build-agent.sh >&2
  agent=$root/target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
fi

log() { printf 'vm-test: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

vm=$root/target/vm
if [ ! -f "$vm/vmlinux" ] || [ ! -f "$vm/initramfs.cpio.gz" ]; then
  QX_AGENT_BIN=$agent bash ci/vm/build-image.sh >&2
fi
release=$(cat "$vm/kernel-release")
moddir=$(ls -d "$vm"/cache/linux-image-*/lib/modules/"$release" | head -n1)
[ -d "$moddir" ] || fail "kernel modules for $release not found under $vm/cache"

work=$(mktemp -d /tmp/qx-iso-vm.XXXXXX)
qemu_pid=""
cleanup() {
  [ -z "$qemu_pid" ] || kill "$qemu_pid" 2>/dev/null || true
  [ -z "$qemu_pid" ] || wait "$qemu_pid" 2>/dev/null || true
  # QX_KEEP=1 keeps the working directory (console log, initrd) for debugging.
  if [ -z "${QX_KEEP:-}" ]; then rm -rf "$work"; else log "kept $work"; fi
}
trap cleanup EXIT
# A private copy: the shared target/ binary may be rebuilt by someone else mid-test.
cp "$agent" "$work/agent.bin"
agent=$work/agent.bin

# ---- the ISO and the host helper --------------------------------------------------------------
iso=$(bash iso-build/build-iso.sh --agent "$agent" --out "$work/iso" 2>"$work/build.log") \
  || { cat "$work/build.log" >&2; fail "build-iso.sh failed"; }
(cd iso-build/vm-helper && CARGO_TARGET_DIR=$root/target cargo build --quiet) >&2 \
  || fail "cannot build iso-build/vm-helper"
helper=$root/target/debug/qx-iso-vm-helper

# ---- the overlay initramfs --------------------------------------------------------------------
ov=$work/overlay
mkdir -p "$ov/lib/modules/iso-test"
# The CD-ROM stack ci/vm's image does not carry, in load order (from each module's depends=):
# the PIIX IDE controller, SCSI CD-ROM (sr), and the ISO 9660 filesystem.
modules="scsi_common scsi_mod libata ata_piix cdrom sr_mod isofs"
echo "$modules" | tr ' ' '\n' >"$work/modules.order"
for m in $modules; do
  f=$(find "$moddir/kernel" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || fail "module $m not found"
  case "$f" in
    *.xz) xz -dc "$f" >"$ov/lib/modules/iso-test/$m.ko" ;;
    *.zst) zstd -dcq "$f" >"$ov/lib/modules/iso-test/$m.ko" ;;
    *) cp "$f" "$ov/lib/modules/iso-test/$m.ko" ;;
  esac
done
# ash opens /dev/null for every background job; /dev is not mounted when our /init forks.
mkdir -p "$ov/dev"
mknod -m 0666 "$ov/dev/null" c 1 3
install -m 0755 iso-build/vm/init "$ov/init"
install -m 0755 ci/vm/init.sh "$ov/init.qx"
install -m 0755 iso-build/vm/qx-iso-install.sh "$ov/qx-iso-install.sh"
install -m 0644 "$work/modules.order" "$ov/lib/modules/iso-test/modules.order"
(cd "$ov" && find . -print0 | cpio --null -o -H newc --quiet --owner=0:0) | gzip -1 >"$work/overlay.cpio.gz"
cat "$vm/initramfs.cpio.gz" "$work/overlay.cpio.gz" >"$work/initrd"

# ---- boot -------------------------------------------------------------------------------------
accel=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ]; then accel=kvm; fi

# boot NAME INITRD CMDLINE PORT...: starts QEMU (pid in $qemu_pid) with the ISO in a CD-ROM drive,
# one chardev socket $work/NAME-PORT.sock per virtio-serial port, the console in
# $work/NAME-console.log; waits for the sockets.
boot() {
  local name=$1 initrd=$2 cmdline=$3
  shift 3
  local ports=() i=0 p
  for p in "$@"; do
    ports+=(-chardev "socket,id=port$i,path=$work/$name-$p.sock,server=on,wait=off"
      -device "virtserialport,bus=vser0.0,chardev=port$i,name=$p")
    i=$((i + 1))
  done
  qemu-system-x86_64 -accel "$accel" -nodefaults -no-user-config -display none -no-reboot -smp 1 -m 256 \
    -kernel "$vm/vmlinux" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 ${QX_VERBOSE:-quiet} $cmdline" \
    -serial "file:$work/$name-console.log" \
    -device virtio-serial-pci,id=vser0 "${ports[@]}" \
    -drive "file=$iso,format=raw,if=ide,index=2,media=cdrom" \
    </dev/null >/dev/null 2>"$work/$name-qemu.stderr" &
  qemu_pid=$!
  log "$name: qemu ($accel) pid $qemu_pid, ISO $(basename "$iso") in an IDE CD-ROM drive"
  for p in "$@"; do
    i=0
    while [ ! -S "$work/$name-$p.sock" ]; do
      kill -0 "$qemu_pid" 2>/dev/null || { cat "$work/$name-qemu.stderr" >&2; fail "qemu exited"; }
      [ $i -lt 100 ] || fail "the chardev socket for $p did not appear"
      sleep 0.1
      i=$((i + 1))
    done
  done
}
stop_vm() {
  kill "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
}

boot auto "$work/initrd" "qx.hostname=qx-iso-test qx.agent=0" org.quantix.agent.0
sock=$work/auto-org.quantix.agent.0.sock
console=$work/auto-console.log

# The helper waits for AgentReady while the guest boots, mounts the ISO and installs; a failed
# install or a dead QEMU ends the wait early.
"$helper" ready "$sock" "${QX_READY_TIMEOUT_S:-180}" >"$work/ready" 2>"$work/helper.err" &
helper_pid=$!
while kill -0 "$helper_pid" 2>/dev/null; do
  if grep -q 'qx-iso-test: install.sh exit [1-9]' "$console" 2>/dev/null || ! kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$helper_pid" 2>/dev/null || true
    break
  fi
  sleep 0.5
done
if ! wait "$helper_pid"; then
  cat "$console" "$work/helper.err" >&2
  fail "no AgentReady from the installed agent"
fi
ready=$(cat "$work/ready")
log "AgentReady: $ready"

# The installer must have finished successfully, and the agent must be the installed copy.
i=0
while ! grep -q 'qx-iso-test: install.sh exit' "$console" && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
grep -q 'qx-iso-test: install.sh exit 0' "$console" || { cat "$console" >&2; fail "install.sh did not exit 0"; }
grep -q 'install: agent (pid [0-9]*) has opened' "$console" || { cat "$console" >&2; fail "install.sh did not see the port opened"; }
version=$(awk '/^\[workspace.package\]/ {p=1; next} /^\[/ {p=0} p && /^version *=/ {gsub(/[" ]/, "", $0); sub(/^version=/, "", $0); print; exit}' Cargo.toml)
case "$ready" in
  "agent_version=$version "*) ;;
  *) fail "AgentReady names another version: $ready (want $version)" ;;
esac
case "$ready" in
  *"hostname=qx-iso-test"*) ;;
  *) fail "AgentReady is not from this guest: $ready" ;;
esac
log "ok: the ISO installed agent $version in a VM booted without one; the host saw AgentReady"
sed -n 's/^\(qx-iso-test\|install\): /  guest: &/p' "$console" >&2

# ---- upgrade through the running agent, as `qxctl agent install` does -------------------------
# The launcher qxctl sends (iso-build/guest-launch.sh) runs through ExecRequest, starts
# install.sh detached, the installer replaces and restarts the agent that launched it; the host
# must see a new session and read the installer's exit status through the new agent.
if ! "$helper" upgrade "$sock" 120 iso-build/guest-launch.sh --timeout 60 >"$work/upgrade" 2>"$work/upgrade.err"; then
  cat "$work/upgrade.err" "$work/upgrade" "$console" >&2
  fail "upgrade through the agent failed"
fi
head -n1 "$work/upgrade" | grep -q ' installer_rc=0 ' || { cat "$work/upgrade" >&2; fail "the installer did not exit 0"; }
grep -q '^install: upgrading quantix-kvm-agent' "$work/upgrade" || { cat "$work/upgrade" >&2; fail "the re-run was not an upgrade"; }
grep -q '^install: agent (pid [0-9]*) has opened' "$work/upgrade" || { cat "$work/upgrade" >&2; fail "the upgraded agent did not open the port"; }
log "ok: upgrade through the agent: $(head -n1 "$work/upgrade" | cut -d' ' -f1-3)"
sed 's/^/  guest: /' "$work/upgrade" | tail -n +2 >&2
stop_vm

# ---- first install through qemu-guest-agent, as `qxctl agent install --qemu-ga` does ----------
# The bench image carries Debian's qemu-ga; qx.iso_auto=0 keeps our hook from installing, so
# the only way in is guest-exec of the launcher through qemu-ga.
if [ ! -f "$vm/initramfs-bench.cpio.gz" ]; then
  QX_AGENT_BIN=$agent bash ci/vm/build-image.sh --bench >&2
fi
cat "$vm/initramfs-bench.cpio.gz" "$work/overlay.cpio.gz" >"$work/initrd-qga"
boot qga "$work/initrd-qga" "qx.hostname=qx-iso-qga qx.agent=0 qx.qga=1 qx.iso_auto=0" \
  org.quantix.agent.0 org.qemu.guest_agent.0
# The guest is "up" for an operator once its CD-ROM drive exists (the hook loads its modules).
i=0
while ! grep -q 'qx-iso-test: cd-rom ready' "$work/qga-console.log" 2>/dev/null; do
  kill -0 "$qemu_pid" 2>/dev/null || { cat "$work/qga-console.log" >&2; fail "qemu exited"; }
  [ $i -lt 1800 ] || { cat "$work/qga-console.log" >&2; fail "the guest's CD-ROM drive never appeared"; }
  sleep 0.1
  i=$((i + 1))
done
if ! "$helper" qga-install "$work/qga-org.qemu.guest_agent.0.sock" 180 "$work/qga-org.quantix.agent.0.sock" \
  iso-build/guest-launch.sh --timeout 60 >"$work/qga" 2>"$work/qga.err"; then
  cat "$work/qga.err" "$work/qga" "$work/qga-console.log" >&2
  fail "install through qemu-guest-agent failed"
fi
head -n1 "$work/qga" | grep -q "^installer_rc=0 agent_version=$version .*hostname=qx-iso-qga" \
  || { cat "$work/qga" >&2; fail "the qemu-ga install did not report success from this guest"; }
grep -q '^install: agent (pid [0-9]*) has opened' "$work/qga" || { cat "$work/qga" >&2; fail "the agent did not open the port"; }
log "ok: first install through qemu-guest-agent guest-exec: $(head -n1 "$work/qga" | cut -d' ' -f1-3)"
sed 's/^/  guest: /' "$work/qga" | tail -n +2 >&2
stop_vm
