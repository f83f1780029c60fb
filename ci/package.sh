#!/usr/bin/env bash
# Builds the packages with dpkg-deb and rpmbuild from files staged here (no cargo-deb: the
# layout is short and this way every path is in one place):
#   qx-node_<v>_amd64.deb            qx-node (/usr/sbin), qxctl (/usr/bin), the systemd unit,
#                                    /etc/quantix/qx-node.toml, man pages, completions
#   quantix-kvm-agent_<v>_amd64.deb  the static agent with the ISO's service files
#   quantix-kvm-agent-<v>-1.x86_64.rpm   (systemd unit and sysvinit script, udev rule,
#                                    agent.conf: iso-build/files/, paths moved to /usr/sbin)
#
# Usage: bash ci/package.sh [--bin-dir DIR] [--agent PATH] [--out DIR]
#   --bin-dir  qx-node and qxctl (default target/release, built if missing)
#   --agent    the static agent (default target/x86_64-unknown-linux-musl/release/quantix-kvm-agent)
#   --out      where the packages go (default target/packages)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bin_dir=target/release
agent=target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
out=target/packages
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --agent) agent=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "package: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ "$bin_dir" = target/release ] && [ ! -x "$bin_dir/qx-node" ]; then
  cargo build --locked --release -p qx-node --bins
fi
[ -x "$agent" ] || bash ci/build-agent.sh
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
work=$(mktemp -d /tmp/qx-package18.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)

bash ci/build-docs.sh --bin-dir "$bin_dir" --out "$work/docs" >/dev/null
docs=$work/docs

copyright() { # $1: package directory
  mkdir -p "$1/usr/share/doc/$2"
  printf 'Quantix KVM %s\nLicense: Apache-2.0\n' "$version" >"$1/usr/share/doc/$2/copyright"
}

# ---- qx-node + qxctl .deb ----------------------------------------------------------------
p=$work/qx-node
install -D -s -m0755 "$bin_dir/qx-node" "$p/usr/sbin/qx-node"
install -D -s -m0755 "$bin_dir/qxctl" "$p/usr/bin/qxctl"
install -D -m0644 packaging/qx-node.service "$p/lib/systemd/system/qx-node.service"
install -D -m0644 packaging/qx-node.toml "$p/etc/quantix/qx-node.toml"
install -d "$p/usr/share/man/man1" "$p/usr/share/man/man8"
cp "$docs"/man/man1/qxctl*.1.gz "$p/usr/share/man/man1/"
cp "$docs"/man/man8/qx-node.8.gz "$p/usr/share/man/man8/"
for n in qxctl qx-node; do
  install -D -m0644 "$docs/completions/$n.bash" "$p/usr/share/bash-completion/completions/$n"
  install -D -m0644 "$docs/completions/_$n" "$p/usr/share/zsh/vendor-completions/_$n"
  install -D -m0644 "$docs/completions/$n.fish" "$p/usr/share/fish/vendor_completions.d/$n.fish"
done
copyright "$p" qx-node
mkdir -p "$p/DEBIAN"
cat >"$p/DEBIAN/control" <<CTRL
Package: qx-node
Version: $version
Architecture: amd64
Maintainer: Quantix KVM <noreply@example.invalid>
Depends: libc6 (>= 2.34), libvirt0 (>= 9.0)
Recommends: libvirt-daemon-system, qemu-system-x86, qemu-utils
Section: admin
Priority: optional
Installed-Size: $(du -sk "$p" | cut -f1)
Description: Quantix node daemon (qx-node) and its command-line client (qxctl)
 Runs VMs through libvirt and reaches into them through the Quantix guest agent over
 virtio-serial; serves a gRPC API with health checking and reflection, and Prometheus
 metrics. Start it with: systemctl enable --now qx-node
CTRL
echo /etc/quantix/qx-node.toml >"$p/DEBIAN/conffiles"
# Maintainer scripts: only tell a running systemd about the unit (never when installing
# into another root, DPKG_ROOT). The daemon is enabled by the administrator.
cat >"$p/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  if [ "$1" = configure ] && [ -n "$2" ]; then systemctl try-restart qx-node.service || true; fi
fi
SCRIPT
cat >"$p/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl disable --now qx-node.service || true
fi
SCRIPT
cat >"$p/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
SCRIPT
chmod 0755 "$p"/DEBIAN/postinst "$p"/DEBIAN/prerm "$p"/DEBIAN/postrm
dpkg-deb --root-owner-group -Zxz --build "$p" "$out/qx-node_${version}_amd64.deb" >/dev/null

# ---- the agent: the ISO's service files, moved from /usr/local/sbin to /usr/sbin --------
a=$work/agent
files=iso-build/files
install -D -m0755 "$agent" "$a/usr/sbin/quantix-kvm-agent"
sed 's|/usr/local/sbin/|/usr/sbin/|g; s|installed by the agent ISO.s install.sh|from the quantix-kvm-agent package|' \
  "$files/service/systemd/quantix-kvm-agent.service" >"$work/agent.service"
install -D -m0644 "$work/agent.service" "$a/usr/lib/systemd/system/quantix-kvm-agent.service"
install -D -m0644 "$files/udev/60-quantix-kvm-agent.rules" "$a/usr/lib/udev/rules.d/60-quantix-kvm-agent.rules"
install -D -m0644 "$files/agent.conf" "$a/etc/quantix-kvm/agent.conf"
install -D -m0644 "$docs/man/man8/quantix-kvm-agent.8.gz" "$a/usr/share/man/man8/quantix-kvm-agent.8.gz"

# The RPM (systemd distributions) before the .deb adds its Debian-only parts.
rpm_stage=$work/agent-rpm
cp -a "$a" "$rpm_stage"
rpmbuild -bb --quiet \
  --define "_topdir $work/rpm" --define "_rpmdir $out" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "qx_version $version" --define "qx_arch x86_64" --define "qx_stage $rpm_stage" \
  packaging/quantix-kvm-agent.spec

# Debian also gets the sysvinit script (for hosts without systemd), as Debian policy asks.
sed 's|/usr/local/sbin/|/usr/sbin/|g' "$files/service/sysvinit/quantix-kvm-agent" >"$work/agent.init"
install -D -m0755 "$work/agent.init" "$a/etc/init.d/quantix-kvm-agent"
copyright "$a" quantix-kvm-agent
mkdir -p "$a/DEBIAN"
cat >"$a/DEBIAN/control" <<CTRL
Package: quantix-kvm-agent
Version: $version
Architecture: amd64
Maintainer: Quantix KVM <noreply@example.invalid>
Section: admin
Priority: optional
Installed-Size: $(du -sk "$a" | cut -f1)
Description: Quantix KVM guest agent
 Static, single-threaded guest agent for the Quantix KVM node daemon: serves the host
 over the virtio-serial port org.quantix.agent.0.
CTRL
printf '%s\n' /etc/quantix-kvm/agent.conf /etc/init.d/quantix-kvm-agent >"$a/DEBIAN/conffiles"
cat >"$a/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
# Enables and starts the agent under whichever init system runs (systemd, else sysvinit).
set -e
[ "$1" = configure ] || exit 0
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  systemctl enable quantix-kvm-agent.service || true
  systemctl restart quantix-kvm-agent.service || true
elif command -v update-rc.d >/dev/null 2>&1; then
  update-rc.d quantix-kvm-agent defaults >/dev/null || true
  invoke-rc.d quantix-kvm-agent restart || true
fi
SCRIPT
cat >"$a/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
[ "$1" = remove ] || exit 0
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ -d /run/systemd/system ]; then
  systemctl disable --now quantix-kvm-agent.service || true
elif [ -x /etc/init.d/quantix-kvm-agent ]; then
  invoke-rc.d quantix-kvm-agent stop || true
fi
SCRIPT
cat >"$a/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ "$1" = purge ] && command -v update-rc.d >/dev/null 2>&1; then
  update-rc.d quantix-kvm-agent remove >/dev/null || true
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
SCRIPT
chmod 0755 "$a"/DEBIAN/postinst "$a"/DEBIAN/prerm "$a"/DEBIAN/postrm
dpkg-deb --root-owner-group -Zxz --build "$a" "$out/quantix-kvm-agent_${version}_amd64.deb" >/dev/null

ls -1 "$out"
