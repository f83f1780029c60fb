#!/usr/bin/env bash
# Builds the Quantix KVM agent ISO: an ISO 9660 image (Rock Ridge + Joliet) that operators
# attach to a VM as a CD-ROM; `sh /mnt/install.sh` inside the guest installs and starts the
# agent (iso-build/README.md).
#
# Usage: iso-build/build-iso.sh [--agent PATH] [--agent-aarch64 PATH] [--out DIR]
#   --agent PATH          the static x86_64 agent (default: both agents are built with
#                         ci/build-agent.sh)
#   --agent-aarch64 PATH  the static aarch64 agent (default: the one ci/build-agent.sh built,
#                         target/aarch64-unknown-linux-musl/release/quantix-kvm-agent)
#   --out DIR             output directory (default: target/iso)
# Each agent must report the workspace version: the one for another machine runs under
# qemu-user (qemu-aarch64, qemu-x86_64) for that check.
# Output: DIR/quantix-kvm-agent-<version>.iso and the stable symlink DIR/quantix-kvm-agent.iso.
#
# Reproducible: the same inputs give the same bytes. Every file gets mode 0644/0755, uid/gid 0
# and the mtime SOURCE_DATE_EPOCH (default: the commit time of HEAD); xorriso takes all of its
# dates from SOURCE_DATE_EPOCH too.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

agent=""
agent_arm=""
out=$root/target/iso
while [ $# -gt 0 ]; do
  case "$1" in
    --agent) agent=$2; shift 2 ;;
    --agent-aarch64) agent_arm=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-iso: unknown argument $1" >&2; exit 2 ;;
  esac
done

log() { printf 'build-iso: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

command -v xorriso >/dev/null || die "xorriso is not installed (run ci/setup.sh)"

# ---- version --------------------------------------------------------------------------------
version=$(awk '/^\[workspace.package\]/ {p=1; next} /^\[/ {p=0} p && /^version *=/ {gsub(/[" ]/, "", $0); sub(/^version=/, "", $0); print; exit}' Cargo.toml)
[[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "cannot read the workspace version from Cargo.toml (got '$version')"
volid="QX_AGENT_${version//./_}"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)
fi
export SOURCE_DATE_EPOCH
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be a number of seconds"

# ---- agent binaries -------------------------------------------------------------------------
if [ -z "$agent" ]; then
  bash ci/build-agent.sh >&2
  agent=$root/target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
fi
if [ -z "$agent_arm" ]; then
  agent_arm=$root/target/aarch64-unknown-linux-musl/release/quantix-kvm-agent
  [ -f "$agent_arm" ] || die "aarch64 agent $agent_arm not found: run bash ci/build-agent.sh, or pass --agent-aarch64"
fi

is_static() { ! readelf -l -d "$1" 2>/dev/null | grep -qE 'Requesting program interpreter|\(NEEDED\)'; }
elf_machine() { readelf -h "$1" 2>/dev/null | awk -F: '/Machine:/ {gsub(/^ +/, "", $2); print $2}'; }
# check_agent PATH ARCH ELF-MACHINE: a static binary for ARCH that reports the image's version.
check_agent() {
  local bin=$1 arch=$2 want_machine=$3 runner=() agent_version
  [ -f "$bin" ] || die "$arch agent $bin not found"
  [ "$(elf_machine "$bin")" = "$want_machine" ] || die "$bin is not an $arch ELF binary"
  is_static "$bin" || die "$bin is not statically linked"
  if [ "$(uname -m)" != "$arch" ]; then
    command -v "qemu-$arch" >/dev/null \
      || die "qemu-$arch is needed to check the $arch agent's version (package qemu-user; ci/setup.sh)"
    runner=("qemu-$arch")
  fi
  # The binary must be the version the image is named after.
  agent_version=$("${runner[@]}" "$bin" --version 2>/dev/null | head -n1 || true)
  case "$agent_version" in
    "quantix-kvm-agent $version" | "quantix-kvm-agent $version "*) ;;
    *) die "$bin reports '$agent_version', expected 'quantix-kvm-agent $version'" ;;
  esac
}
check_agent "$agent" x86_64 "Advanced Micro Devices X86-64"
check_agent "$agent_arm" aarch64 AArch64

# ---- staging tree ---------------------------------------------------------------------------
stage=$(mktemp -d "${TMPDIR:-/tmp}/qx-iso.XXXXXX")
trap 'rm -rf "$stage"' EXIT
files=iso-build/files

install -m 0755 "$agent" "$stage/quantix-kvm-agent.x86_64"
install -m 0755 "$agent_arm" "$stage/quantix-kvm-agent.aarch64"
install -m 0755 iso-build/install.sh "$stage/install.sh"
install -m 0755 iso-build/uninstall.sh "$stage/uninstall.sh"
install -m 0644 "$files/agent.conf" "$stage/agent.conf"
mkdir -p "$stage/man"   # not at the root: install.sh takes quantix-kvm-agent.* for agents
install -m 0644 guest/quantix-kvm-agent.8 "$stage/man/quantix-kvm-agent.8"
mkdir -p "$stage/service/systemd" "$stage/service/openrc" "$stage/service/sysvinit" \
  "$stage/service/busybox" "$stage/udev"
install -m 0644 "$files/service/systemd/quantix-kvm-agent.service" "$stage/service/systemd/"
install -m 0755 "$files/service/openrc/quantix-kvm-agent" "$stage/service/openrc/"
install -m 0755 "$files/service/sysvinit/quantix-kvm-agent" "$stage/service/sysvinit/"
install -m 0644 "$files/service/busybox/inittab" "$stage/service/busybox/"
install -m 0755 "$files/service/busybox/run" "$stage/service/busybox/"
install -m 0644 "$files/udev/60-quantix-kvm-agent.rules" "$stage/udev/"
printf '%s\n' "$version" >"$stage/VERSION"

sed -e "s/@VERSION_UNDERSCORED@/${version//./_}/g" -e "s/@VERSION@/$version/g" "$files/README" >"$stage/README"
chmod 0644 "$stage/VERSION" "$stage/README"

# The manifest covers every other file, in a fixed (C locale) order, in `sha256sum -c` format.
(
  cd "$stage"
  find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort | while read -r f; do
    sha256sum "$f"
  done
) >"$stage/SHA256SUMS"
chmod 0644 "$stage/SHA256SUMS"

find "$stage" -type d -exec chmod 0755 {} +
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# ---- image ----------------------------------------------------------------------------------
mkdir -p "$out"
iso=$out/quantix-kvm-agent-$version.iso
rm -f "$iso.tmp"
iso_date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d%H%M%S00)
# -R keeps the staged modes (so install.sh stays executable), -uid/-gid 0 hide the builder;
# -J adds Joliet for Windows readers. xorriso takes every date from SOURCE_DATE_EPOCH; the
# explicit options pin the ones that are not file dates.
xorriso -report_about WARNING -as mkisofs \
  -o "$iso.tmp" \
  -V "$volid" \
  -volset "$volid" \
  -A "quantix-kvm-agent $version" \
  -publisher "Quantix KVM" \
  -p "iso-build/build-iso.sh" \
  -sysid LINUX \
  -R -J -joliet-long \
  -uid 0 -gid 0 \
  --modification-date="$iso_date" \
  -iso-level 3 \
  "$stage" >&2
mv "$iso.tmp" "$iso"
ln -sfn "$(basename "$iso")" "$out/quantix-kvm-agent.iso"
log "$iso ($(stat -c %s "$iso") bytes, volume $volid, sha256 $(sha256sum "$iso" | cut -d' ' -f1))"
echo "$iso"
