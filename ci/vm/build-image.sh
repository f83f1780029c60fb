#!/usr/bin/env bash
# Builds the test VM image: an uncompressed Debian kernel and a small initramfs that starts the
# agent. Outputs (all under target/vm/):
#   vmlinux               uncompressed kernel, booted through its PVH entry (fast under TCG)
#   initramfs.cpio.gz     busybox + virtio/ext4 modules + quantix-kvm-agent + /init
#   kernel-release        the guest's `uname -r`, for tests that check AgentReady
#   initramfs-bench.cpio.gz  (with --bench) the same plus Debian's qemu-ga and its libraries
#
# The kernel package is fetched once with `apt-get download` (no install, no hooks) and cached
# in target/vm/cache/, so a rerun only rebuilds the initramfs (< 1 s).
#
# Environment:
#   QX_AGENT_BIN   use this agent binary instead of building it with ci/build-agent.sh
#   QX_KERNEL_PKG  a specific linux-image package name (default: what linux-image-amd64 depends on)
#
# Kernel command line understood by the image's /init (see ci/vm/init.sh):
#   qx.agent=0            boot without starting the agent
#   qx.agent_args=A,B     extra agent arguments, comma-separated
#   qx.hostname=NAME      the guest's hostname (default qx-guest)
#   qx.disk=DEV:DIR       mount DEV (e.g. vda) as ext4 on DIR once it appears
#   qx.root=DEV           switch the root to the ext4 disk DEV, which holds this image's tree
#                         plus a /qx-root file, and run its /init (and agent) from there
#   qx.qga=1|once         also run qemu-ga on org.qemu.guest_agent.0, respawned or once
#                         (bench image only)
#   qx.ip=ADDR/PREFIX     give eth0 this address and bring it up
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=$root/target/vm
cache=$out/cache
mkdir -p "$cache"

bench=0
[ "${1:-}" = "--bench" ] && bench=1

log() { printf 'build-image: %s\n' "$*" >&2; }

# ---- kernel package -------------------------------------------------------------------------
pkg=${QX_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
  # Reuse a cached package when there is one: reruns need no apt at all.
  cached=$(ls "$cache"/linux-image-6.1.0-*-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$cached" ]; then
    pkg=$(basename "$cached" | cut -d_ -f1)
  else
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
      | awk '/Depends: linux-image-6\.1\.0-[0-9]+-amd64$/ {print $2}' | head -n1)
    if [ -z "$pkg" ]; then
      pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
        | awk '{print $1}' | sort -V | tail -n1)
    fi
  fi
fi
[ -n "$pkg" ] || { log "no linux-image-6.1.0-*-amd64 package found (run ci/setup.sh)"; exit 1; }

deb=$(ls "$cache/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  log "downloading $pkg"
  (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null)
  deb=$(ls "$cache/${pkg}"_*.deb | head -n1)
fi

unpacked=$cache/$pkg
if [ ! -f "$unpacked/.done" ]; then
  log "unpacking $(basename "$deb")"
  rm -rf "$unpacked"
  dpkg-deb -x "$deb" "$unpacked"
  touch "$unpacked/.done"
fi

release=$(ls "$unpacked/lib/modules" | head -n1)
vmlinuz=$unpacked/boot/vmlinuz-$release
moddir=$unpacked/lib/modules/$release

# ---- uncompressed kernel (the kernel's scripts/extract-vmlinux method) ------------------------
if [ ! -f "$out/vmlinux" ] || [ "$(cat "$out/kernel-release" 2>/dev/null)" != "$release" ] \
  || [ "$vmlinuz" -nt "$out/vmlinux" ]; then
  log "extracting vmlinux from $(basename "$vmlinuz")"
  python3 - "$vmlinuz" "$out/vmlinux.tmp" <<'PY'
import lzma, subprocess, sys, zlib

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()

def xz(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)

def gz(blob):
    return zlib.decompressobj(31).decompress(blob)

def zst(blob):
    return subprocess.run(["zstd", "-dcq"], input=blob, capture_output=True).stdout

def lzma_alone(blob):
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)

# Same order and magics as scripts/extract-vmlinux: try each compressed stream in the image
# and keep the first that decompresses to an ELF file.
methods = [
    (b"\xfd7zXZ\x00", xz),
    (b"\x1f\x8b\x08", gz),
    (b"\x28\xb5\x2f\xfd", zst),
    (b"\x5d\x00\x00\x00", lzma_alone),
]
for magic, fn in methods:
    pos = data.find(magic)
    while pos != -1:
        try:
            img = fn(data[pos:])
        except Exception:
            img = b""
        if img[:4] == b"\x7fELF":
            open(dst, "wb").write(img)
            sys.exit(0)
        pos = data.find(magic, pos + 1)
sys.exit("no compressed ELF kernel found in " + src)
PY
  readelf -h "$out/vmlinux.tmp" | grep -q 'Type:.*EXEC' || { log "vmlinux is not an ELF executable"; exit 1; }
  readelf -n "$out/vmlinux.tmp" | grep -q 'Xen' || log "warning: vmlinux has no PVH (Xen ELF) note"
  mv "$out/vmlinux.tmp" "$out/vmlinux"
  echo "$release" >"$out/kernel-release"
fi

# ---- agent -----------------------------------------------------------------------------------
agent=${QX_AGENT_BIN:-}
if [ -z "$agent" ]; then
  bash ci/build-agent.sh >&2
  agent=$root/target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
fi
[ -x "$agent" ] || { log "agent binary $agent missing"; exit 1; }

# ---- modules in dependency order -------------------------------------------------------------
# The package ships no modules.dep usable without depmod; resolve `depends=` from each
# module's .modinfo ourselves. Roots: the virtio stack (in the order measured in
# VIRTIO-SERIAL.md), the block device, ext4 for the freeze tests, the network device.
stage=$(mktemp -d "$out/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,mnt,lib/modules,usr/bin,usr/sbin}

python3 - "$moddir" "$stage/lib/modules" >"$stage/etc/modules.order" <<'PY'
import lzma, os, re, sys

moddir, dst = sys.argv[1], sys.argv[2]
roots = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
         "virtio_pci", "virtio_console", "virtio_blk", "crc32c_generic", "ext4",
         "virtio_net"]
index = {}
for d, _, files in os.walk(os.path.join(moddir, "kernel")):
    for f in files:
        m = re.match(r"(.+)\.ko(\.xz)?$", f)
        if m:
            index[m.group(1).replace("-", "_")] = os.path.join(d, f)

def load(name):
    path = index[name]
    blob = open(path, "rb").read()
    return lzma.decompress(blob) if path.endswith(".xz") else blob

order, seen = [], set()
def visit(name):
    name = name.replace("-", "_")
    if name in seen:
        return
    seen.add(name)
    if name not in index:
        return  # built into the kernel
    blob = load(name)
    m = re.search(rb"depends=([^\x00]*)\x00", blob)
    for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
        visit(dep)
    open(os.path.join(dst, name + ".ko"), "wb").write(blob)
    order.append(name)

for r in roots:
    visit(r)
print("\n".join(order))
PY

# ---- userland --------------------------------------------------------------------------------
cp /bin/busybox "$stage/bin/busybox"
cp "$agent" "$stage/bin/quantix-kvm-agent"
cp ci/vm/init.sh "$stage/init"
cp ci/vm/chpasswd.sh "$stage/usr/sbin/chpasswd"
chmod 0755 "$stage/usr/sbin/chpasswd"
chmod 0755 "$stage/init" "$stage/bin/busybox" "$stage/bin/quantix-kvm-agent"
printf 'root:x:0:0:root:/root:/bin/sh\nqxtest:x:1000:1000:qx test user:/home/qxtest:/bin/sh\n' >"$stage/etc/passwd"
printf 'root:x:0:\nqxtest:x:1000:\n' >"$stage/etc/group"
printf 'root::19000:0:99999:7:::\nqxtest:!:19000:0:99999:7:::\n' >"$stage/etc/shadow"
chmod 0600 "$stage/etc/shadow"
mkdir -p "$stage/home/qxtest"
printf 'qx-guest\n' >"$stage/etc/hostname"
# What the agent announces as the guest's OS (AgentReady), as on any distribution.
printf '%s\n' 'NAME="Quantix test image"' 'ID=quantix-test' 'VERSION_ID=1' \
  'PRETTY_NAME="Quantix test image 1 (busybox)"' >"$stage/etc/os-release"

pack() { (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet --owner=0:0) | gzip -1 >"$1.tmp" && mv "$1.tmp" "$1"; }

pack "$out/initramfs.cpio.gz"
log "$out/vmlinux ($release), $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes)"

if [ "$bench" = 1 ]; then
  qga=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
  [ -x "$qga" ] || { log "qemu-ga is not installed (run ci/setup.sh)"; exit 1; }
  cp "$qga" "$stage/usr/bin/qemu-ga"
  # Its shared libraries, at the paths its loader looks for them.
  ldd "$qga" | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
  mkdir -p "$stage/lib64" "$stage/var/run" "$stage/usr/local/var/run"
  [ -e /lib64/ld-linux-x86-64.so.2 ] && cp -L /lib64/ld-linux-x86-64.so.2 "$stage/lib64/"
  pack "$out/initramfs-bench.cpio.gz"
  log "$out/initramfs-bench.cpio.gz ($(stat -c %s "$out/initramfs-bench.cpio.gz") bytes)"
fi
