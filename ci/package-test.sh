#!/usr/bin/env bash
# Builds the packages (ci/package.sh) and installs the .debs with dpkg into an empty root
# (--root, scripts run chrootless with DPKG_ROOT set): checks the files dpkg lists, the
# conffiles, the systemd units (systemd-analyze verify where it exists), that the installed
# binaries answer --version, and the RPM's file list. Then removes them again with dpkg.
#
# Usage: bash ci/package-test.sh [--bin-dir DIR] [--agent PATH]   (as ci/package.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp -d /tmp/qx-pkgtest18.XXXXXX)
trap 'rm -rf "$out"' EXIT
bash ci/package.sh --out "$out/pkgs" "$@" >/dev/null
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
fail() { echo "package-test: FAIL: $*" >&2; exit 1; }

r=$out/root
mkdir -p "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates"
: >"$r/var/lib/dpkg/status"
# The empty root has no libc6 or libvirt0: dependencies are forced, and said so in the log.
dpkg --root="$r" --log=/dev/null --force-depends --force-script-chrootless \
  -i "$out/pkgs/qx-node_${version}_amd64.deb" "$out/pkgs/quantix-kvm-agent_${version}_amd64.deb" \
  >"$out/dpkg.log" 2>&1 || { cat "$out/dpkg.log" >&2; fail "dpkg -i"; }

status=$(dpkg-query --root="$r" -W -f='${Package} ${Version} ${Status}\n')
for p in qx-node quantix-kvm-agent; do
  grep -qx "$p $version install ok installed" <<<"$status" || fail "$p not installed: $status"
done
for f in /usr/sbin/qx-node /usr/bin/qxctl /lib/systemd/system/qx-node.service \
  /etc/quantix/qx-node.toml /usr/share/man/man8/qx-node.8.gz /usr/share/man/man1/qxctl.1.gz \
  /usr/share/man/man1/qxctl-exec.1.gz /usr/share/bash-completion/completions/qxctl \
  /usr/share/zsh/vendor-completions/_qxctl /usr/share/fish/vendor_completions.d/qxctl.fish \
  /usr/sbin/quantix-kvm-agent /usr/lib/systemd/system/quantix-kvm-agent.service \
  /etc/init.d/quantix-kvm-agent /usr/lib/udev/rules.d/60-quantix-kvm-agent.rules \
  /etc/quantix-kvm/agent.conf /usr/share/man/man8/quantix-kvm-agent.8.gz; do
  [ -e "$r$f" ] || fail "$f missing from the installed root"
  dpkg-query --root="$r" -S "$f" >/dev/null || fail "$f not owned by a package"
done
grep -qx /etc/quantix/qx-node.toml "$r/var/lib/dpkg/info/qx-node.conffiles" || fail "qx-node.toml is not a conffile"

unit=$r/lib/systemd/system/qx-node.service
for line in Type=notify 'ExecStart=/usr/sbin/qx-node --config /etc/quantix/qx-node.toml' \
  Restart=on-failure NoNewPrivileges=yes ProtectSystem=strict; do
  grep -qxF "$line" "$unit" || fail "qx-node.service lacks $line"
done
grep -q '^ExecStart=/usr/sbin/quantix-kvm-agent ' "$r/usr/lib/systemd/system/quantix-kvm-agent.service" \
  || fail "the agent unit does not start /usr/sbin/quantix-kvm-agent"
grep -q /usr/local "$r/etc/init.d/quantix-kvm-agent" && fail "the agent init script names /usr/local"
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify resolves ExecStart= against the real root: point it at the installed binaries.
  for u in lib/systemd/system/qx-node.service usr/lib/systemd/system/quantix-kvm-agent.service; do
    sed "s|^ExecStart=/|ExecStart=$r/|" "$r/$u" >"$out/$(basename "$u")"
    msg=$(systemd-analyze verify --man=no "$out/$(basename "$u")" 2>&1 | grep -v 'libvirtd.service\|virtqemud.service' || true)
    [ -z "$msg" ] || fail "systemd-analyze verify $(basename "$u"): $msg"
  done
fi

# The installed binaries run (qx-node and qxctl link the host's libvirt).
for b in usr/sbin/qx-node usr/bin/qxctl usr/sbin/quantix-kvm-agent; do
  v=$("$r/$b" --version) || fail "$b --version failed"
  grep -q "$version" <<<"$v" || fail "$b --version says $v"
done
# The configuration the package ships is one qx-node accepts.
cfg_check=$("$r/usr/sbin/qx-node" --config "$r/etc/quantix/qx-node.toml" --listen 127.0.0.1:bad 2>&1 || true)
grep -q 'is neither unix:/PATH nor IP:PORT' <<<"$cfg_check" || fail "the packaged qx-node.toml is refused: $cfg_check"

rpmfiles=$(rpm -qlp "$out"/pkgs/quantix-kvm-agent-"$version"-1.x86_64.rpm 2>/dev/null)
for f in /usr/sbin/quantix-kvm-agent /usr/lib/systemd/system/quantix-kvm-agent.service \
  /etc/quantix-kvm/agent.conf /usr/share/man/man8/quantix-kvm-agent.8.gz; do
  grep -qx "$f" <<<"$rpmfiles" || fail "the RPM lacks $f"
done
rpm -qp --configfiles "$out"/pkgs/quantix-kvm-agent-"$version"-1.x86_64.rpm 2>/dev/null \
  | grep -qx /etc/quantix-kvm/agent.conf || fail "agent.conf is not an RPM config file"

dpkg --root="$r" --log=/dev/null --force-script-chrootless --purge qx-node quantix-kvm-agent >/dev/null
[ ! -e "$r/usr/sbin/qx-node" ] && [ ! -e "$r/etc/quantix/qx-node.toml" ] || fail "purge left files"
echo "package-test: ok ($(cd "$out/pkgs" && ls | tr '\n' ' '))"
