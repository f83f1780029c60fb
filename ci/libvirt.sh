#!/usr/bin/env bash
# Starts virtlogd and libvirtd in the background (there is no systemd here) so that
# `qemu:///system` works, and waits until libvirtd answers. Idempotent: daemons already running
# are left alone, and concurrent callers (tests run in parallel) take a lock so that only one
# of them starts each daemon. QEMU runs as root: with /dev/kvm 0600, running it as libvirt-qemu makes
# libvirt re-probe QEMU on nearly every call (docs/protocol.md, "The port's measured behaviour").
#
# Usage: bash ci/libvirt.sh          start (or check) the daemons
#        bash ci/libvirt.sh stop     stop the daemons this script started (by their pid files)
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
RUN_DIR=/run/qx-libvirt
URI=qemu:///system
TIMEOUT_S=60

log() { printf 'libvirt: %s\n' "$*" >&2; }

stop() {
  for d in libvirtd virtlogd; do
    pidfile=$RUN_DIR/$d.pid
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      if kill -0 "$pid" 2>/dev/null; then
        log "stopping $d (pid $pid)"
        $SUDO kill "$pid" || true
      fi
      $SUDO rm -f "$pidfile"
    fi
  done
}

if [ "${1:-}" = "stop" ]; then
  stop
  exit 0
fi

command -v libvirtd >/dev/null || { log "libvirtd is not installed (run ci/setup.sh)"; exit 1; }

# One caller at a time from here on: two callers that both see no virtlogd would both start
# one, and the second dies on the first one's pid file. The daemons must not inherit the lock.
exec 9>"${TMPDIR:-/tmp}/qx-libvirt.lock"
flock 9

# QEMU as root, set once: replace a commented or different setting, else append.
conf=/etc/libvirt/qemu.conf
for key in user group; do
  if grep -Eq "^${key} = \"root\"" "$conf"; then
    continue
  elif grep -Eq "^#?${key} = " "$conf"; then
    $SUDO sed -i -E "0,/^#?${key} = .*/s//${key} = \"root\"/" "$conf"
  else
    echo "${key} = \"root\"" | $SUDO tee -a "$conf" >/dev/null
  fi
done

$SUDO mkdir -p "$RUN_DIR" /var/log/libvirt /var/lib/libvirt/qemu/channel/target

# A killed daemon can linger as a zombie; it does not count as running.
running() { pgrep -x -r R,S,D "$1" >/dev/null 2>&1; }

if ! running virtlogd; then
  log "starting virtlogd"
  $SUDO virtlogd --daemon --pid-file "$RUN_DIR/virtlogd.pid" 9>&-
fi
if ! running libvirtd; then
  log "starting libvirtd"
  $SUDO libvirtd --daemon --pid-file "$RUN_DIR/libvirtd.pid" 9>&-
fi

deadline=$((SECONDS + TIMEOUT_S))
until $SUDO virsh -c "$URI" version >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    log "libvirtd did not answer on $URI within ${TIMEOUT_S}s; see /var/log/libvirt/"
    exit 1
  fi
  sleep 0.5
done
log "$URI answers ($($SUDO virsh -c "$URI" version --daemon 2>/dev/null | awk '/daemon/ {print $NF}' | head -n1))"
