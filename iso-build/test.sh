#!/usr/bin/env bash
# Tests of the agent ISO (called from ci/test.sh; needs root for chroot and mount):
#   1. the image builds, its listing and SHA256SUMS are what install.sh expects; both agents
#      on it (x86_64 natively, aarch64 under qemu-aarch64) answer --version and --help and
#      send a well-formed first frame to a host on a unix socket;
#   2. two builds (different temp dirs, umask and clock) give the same bytes;
#   3. install.sh runs in a busybox chroot for each init system (systemd, openrc, sysvinit,
#      busybox) under busybox ash and under bash: files land with the right modes, the service
#      definition is valid for its init, the init's CLI is asked to enable it, a re-run upgrades
#      and keeps .old, an edited agent.conf survives, --dry-run changes nothing, a tampered
#      image is refused before anything changes, uninstall removes everything it added; with
#      `uname -m` stubbed to aarch64 or arm64 install.sh picks the aarch64 binary;
#      --replace-qemu-ga stops and disables qemu-ga per init and uninstall puts it back;
# The init systems' CLIs (systemctl, rc-update, update-rc.d) are stubs that record what they
# were asked; the real-init path is covered by iso-build/vm-test.sh in a TCG VM.
#
# Usage: iso-build/test.sh [--agent PATH] [--agent-aarch64 PATH]
#   default: builds both agents with ci/build-agent.sh; with --agent alone, the aarch64 agent is
#   the one ci/build-agent.sh left in target/aarch64-unknown-linux-musl/release/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

agent=""
agent_arm=""
while [ $# -gt 0 ]; do
  case "$1" in
    --agent) agent=$2; shift 2 ;;
    --agent-aarch64) agent_arm=$2; shift 2 ;;
    *) echo "usage: iso-build/test.sh [--agent PATH] [--agent-aarch64 PATH]" >&2; exit 2 ;;
  esac
done
if [ -z "$agent" ]; then
  bash ci/build-agent.sh >&2
  agent=$root/target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
fi
[ -n "$agent_arm" ] || agent_arm=$root/target/aarch64-unknown-linux-musl/release/quantix-kvm-agent
[ -f "$agent_arm" ] || { echo "no aarch64 agent at $agent_arm (run bash ci/build-agent.sh)" >&2; exit 1; }
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 is not installed (run ci/setup.sh)" >&2; exit 1; }

[ "$(id -u)" = 0 ] || { echo "iso-build/test.sh needs root (chroot)" >&2; exit 1; }

work=$(mktemp -d /tmp/qx-iso-test.XXXXXX)
mounts=()
pty_pid=""
bg_pids=()
cleanup() {
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Agents the start tests left running inside the chroots (their exe lies under $work).
  for d in /proc/[0-9]*; do
    case "$(readlink "$d/exe" 2>/dev/null)" in
      "$work"/*) kill -9 "${d#/proc/}" 2>/dev/null || true ;;
    esac
  done
  [ -z "$pty_pid" ] || kill "$pty_pid" 2>/dev/null || true
  for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# Private copies: the shared target/ binaries may be rebuilt by someone else mid-test.
cp "$agent" "$work/agent.bin"
agent=$work/agent.bin
cp "$agent_arm" "$work/agent-aarch64.bin"
agent_arm=$work/agent-aarch64.bin

pass=0
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { pass=$((pass + 1)); echo "ok: $*"; }

version=$(awk '/^\[workspace.package\]/ {p=1; next} /^\[/ {p=0} p && /^version *=/ {gsub(/[" ]/, "", $0); sub(/^version=/, "", $0); print; exit}' Cargo.toml)

# ---- 1. build, listing, manifest ------------------------------------------------------------
export SOURCE_DATE_EPOCH=1700000000
iso=$(bash iso-build/build-iso.sh --agent "$agent" --agent-aarch64 "$agent_arm" --out "$work/out1" 2>"$work/build1.log") \
  || { cat "$work/build1.log" >&2; fail "build-iso.sh failed"; }
[ "$iso" = "$work/out1/quantix-kvm-agent-$version.iso" ] || fail "unexpected image path $iso"
[ "$(readlink "$work/out1/quantix-kvm-agent.iso")" = "quantix-kvm-agent-$version.iso" ] \
  || fail "the stable symlink does not point at the versioned image"
ok "build-iso.sh made $iso and its stable symlink"

xorriso -indev "$iso" -pvd_info 2>/dev/null | grep -qx "Volume Id    : QX_AGENT_${version//./_}" \
  || fail "volume id is not QX_AGENT_${version//./_}"
# xorriso's media report names the trees the image offers.
xorriso -indev "$iso" -toc 2>&1 | grep -qx 'ISO offers   : Rock_Ridge Joliet' || fail "the image does not offer both Rock Ridge and Joliet"
ok "volume id QX_AGENT_${version//./_}, Rock Ridge and Joliet"

xorriso -indev "$iso" -find / -type f 2>/dev/null | tr -d "'" | sed 's|^/||' | LC_ALL=C sort >"$work/listing"
expected="README
SHA256SUMS
VERSION
agent.conf
install.sh
man/quantix-kvm-agent.8
quantix-kvm-agent.aarch64
quantix-kvm-agent.x86_64
service/busybox/inittab
service/busybox/run
service/openrc/quantix-kvm-agent
service/systemd/quantix-kvm-agent.service
service/sysvinit/quantix-kvm-agent
udev/60-quantix-kvm-agent.rules
uninstall.sh"
diff -u <(echo "$expected") "$work/listing" || fail "the image's file list is not the expected one"
ok "listing: $(wc -l <"$work/listing") files, as expected"

cd_src=$work/cdrom
xorriso -osirrox on -indev "$iso" -extract / "$cd_src" >/dev/null 2>&1 || fail "cannot extract the image"
chmod -R u+w "$cd_src"
(cd "$cd_src" && sha256sum -c --quiet SHA256SUMS) || fail "SHA256SUMS does not verify"
[ "$(cut -d' ' -f3 "$cd_src/SHA256SUMS" | LC_ALL=C sort)" = "$(grep -vx SHA256SUMS "$work/listing")" ] \
  || fail "SHA256SUMS does not list every other file"
cmp -s "$cd_src/quantix-kvm-agent.x86_64" "$agent" || fail "the image's x86_64 agent is not the input binary"
cmp -s "$cd_src/quantix-kvm-agent.aarch64" "$agent_arm" || fail "the image's aarch64 agent is not the input binary"
[ "$(cat "$cd_src/VERSION")" = "$version" ] || fail "VERSION is not $version"
[ "$(stat -c %a "$cd_src/install.sh")" = 755 ] || fail "install.sh is not executable on the image"
ok "SHA256SUMS verifies and covers every file; VERSION $version; the agents are the input binaries"

# Both agents as shipped: static ELF for their machine, --version and --help, and the first
# frame a host gets on connecting (the AgentReady). aarch64 runs under qemu-aarch64 (user mode).
# The host is a python listener on a unix socket; it checks the frame header (docs/protocol.md:
# magic 51 54 58 01, big-endian length, CRC32C of the payload, CRC32C of header bytes 0..12) and
# that the payload names the version.
cat >"$work/first-frame.py" <<'PY'
import socket, struct, sys
def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c ^ 0xFFFFFFFF
path, version = sys.argv[1], sys.argv[2].encode()
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
s.settimeout(20)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(20)
buf = b""
def need(n):
    global buf
    while len(buf) < n:
        d = c.recv(65536)
        if not d:
            sys.exit("the agent closed the connection after %d bytes" % len(buf))
        buf += d
need(16)
length, pcrc, hcrc = struct.unpack(">III", buf[4:16])
if buf[0:4] != b"QTX\x01":
    sys.exit("first bytes %s are not the frame magic 51545801" % buf[0:4].hex())
if crc32c(buf[0:12]) != hcrc:
    sys.exit("header checksum mismatch")
need(16 + length)
payload = buf[16:16 + length]
if crc32c(payload) != pcrc:
    sys.exit("payload checksum mismatch")
if version not in payload:
    sys.exit("the first frame does not name version %s" % version.decode())
print("frame %d bytes" % length)
PY
elf_machine() { readelf -h "$1" | awk -F: '/Machine:/ {gsub(/^ +/, "", $2); print $2}'; }
for arch in x86_64 aarch64; do
  bin=$cd_src/quantix-kvm-agent.$arch
  run=()
  case "$arch" in
    x86_64) want="Advanced Micro Devices X86-64" ;;
    aarch64) want=AArch64; run=(qemu-aarch64) ;;
  esac
  [ "$(elf_machine "$bin")" = "$want" ] || fail "[$arch] the image's agent is a $(elf_machine "$bin") binary"
  ! readelf -lW -d "$bin" | grep -qE 'Requesting program interpreter|\(NEEDED\)' || fail "[$arch] the agent is not static"
  out=$("${run[@]}" "$bin" --version) || fail "[$arch] --version failed"
  case "$out" in
    "quantix-kvm-agent $version" | "quantix-kvm-agent $version "*) ;;
    *) fail "[$arch] --version says '$out'" ;;
  esac
  "${run[@]}" "$bin" --help >"$work/help.$arch" || fail "[$arch] --help failed"
  grep -q '^    quantix-kvm-agent - Quantix KVM guest agent$' "$work/help.$arch" || fail "[$arch] --help has no NAME line"
  grep -q -- '--connect unix:PATH' "$work/help.$arch" || fail "[$arch] --help does not list --connect"

  sock=$work/host-$arch.sock
  python3 "$work/first-frame.py" "$sock" "$version" >"$work/frame.$arch" 2>&1 &
  host_pid=$!
  bg_pids+=("$host_pid")
  i=0
  while ! grep -q listening "$work/frame.$arch" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  "${run[@]}" "$bin" --connect "unix:$sock" >"$work/agent.$arch.log" 2>&1 &
  agent_pid=$!
  bg_pids+=("$agent_pid")
  host_rc=0
  wait "$host_pid" || host_rc=$?
  kill "$agent_pid" 2>/dev/null || true
  wait "$agent_pid" 2>/dev/null || true
  [ "$host_rc" = 0 ] || { cat "$work/frame.$arch" "$work/agent.$arch.log"; fail "[$arch] the host did not get a well-formed first frame"; }
  ok "[$arch] static $want ELF, --version and --help, first frame to a unix-socket host ($(tail -n1 "$work/frame.$arch"))"
done

# Every key agent.conf shows (commented) is one the agent accepts: uncomment them all and start
# the agent on it. A bad configuration exits 2 at once; a good one keeps running until stopped.
sed -n 's/^# \([a-z_]* = .*\)$/\1/p' "$cd_src/agent.conf" >"$work/all-keys.conf"
[ "$(wc -l <"$work/all-keys.conf")" -ge 10 ] || fail "agent.conf shows fewer keys than expected"
set +e
timeout 3 "$agent" --config "$work/all-keys.conf" --connect "unix:$work/no-such.sock" >"$work/conf.log" 2>&1
rc=$?
set -e
[ "$rc" != 2 ] || { cat "$work/conf.log"; fail "the agent rejects the keys agent.conf shows"; }
echo 'no_such_key = 1' >>"$work/all-keys.conf"
set +e
timeout 3 "$agent" --config "$work/all-keys.conf" --connect "unix:$work/no-such.sock" >"$work/conf.log" 2>&1
rc=$?
set -e
[ "$rc" = 2 ] || fail "the agent accepted an unknown key (exit $rc): the check above proves nothing"
ok "every key agent.conf shows ($(wc -l <"$work/all-keys.conf") lines) is accepted by the agent"

# ---- 2. reproducible ------------------------------------------------------------------------
mkdir -p "$work/tmp2"
iso2=$(umask 077 && TMPDIR=$work/tmp2 bash iso-build/build-iso.sh --agent "$agent" --agent-aarch64 "$agent_arm" \
  --out "$work/out2" 2>"$work/build2.log") \
  || { cat "$work/build2.log" >&2; fail "second build failed"; }
cmp "$iso" "$iso2" || fail "two builds of the same inputs differ"
ok "two builds are byte-identical ($(sha256sum "$iso" | cut -c1-16)…)"
SOURCE_DATE_EPOCH=1700000001 bash iso-build/build-iso.sh --agent "$agent" --agent-aarch64 "$agent_arm" \
  --out "$work/out3" >/dev/null 2>&1
cmp -s "$iso" "$work/out3/quantix-kvm-agent-$version.iso" && fail "SOURCE_DATE_EPOCH does not reach the image"
ok "a different SOURCE_DATE_EPOCH gives a different image (the date is an input)"
unset SOURCE_DATE_EPOCH

# ---- 3. install.sh in chroots ---------------------------------------------------------------
stub() { # stub ROOT PATH: a command that records its name and arguments
  mkdir -p "$1$(dirname "$2")"
  rm -f "$1$2"
  printf '#!/bin/sh\necho "%s $*" >>/var/log/qx-stub.log\nexit 0\n' "$(basename "$2")" >"$1$2"
  chmod 0755 "$1$2"
}

make_root() { # make_root DIR INIT SHELL
  local r=$1 init=$2 sh=$3
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,var/log,media}
  mknod -m 666 "$r/dev/null" c 1 3
  mknod -m 666 "$r/dev/zero" c 1 5
  cp /bin/busybox "$r/bin/busybox"
  chroot "$r" /bin/busybox --install -s
  if [ "$sh" = bash ]; then
    cp /bin/bash "$r/bin/bash"
    ldd /bin/bash | awk '/=> \// {print $3} /^[[:space:]]*\/lib/ {print $1}' | while read -r lib; do
      mkdir -p "$r$(dirname "$lib")"
      cp -L "$lib" "$r$lib"
    done
  fi
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
  cp -a "$cd_src" "$r/media/cdrom"
  case "$init" in
    systemd)
      mkdir -p "$r/run/systemd/system" "$r/etc/udev/rules.d" "$r/etc/systemd/system"
      stub "$r" /bin/systemctl
      ;;
    openrc)
      mkdir -p "$r/run/openrc" "$r/etc/init.d"
      stub "$r" /sbin/rc-update
      stub "$r" /sbin/rc-service
      stub "$r" /sbin/openrc-run
      ;;
    sysvinit)
      rm -f "$r/sbin/init"
      printf '#!/bin/sh\n# stand-in for sysvinit init\n' >"$r/sbin/init"
      chmod 0755 "$r/sbin/init"
      printf 'id:2:initdefault:\nsi::sysinit:/etc/init.d/rcS\n' >"$r/etc/inittab"
      mkdir -p "$r/etc/init.d" "$r/etc/udev/rules.d"
      stub "$r" /usr/sbin/update-rc.d
      ;;
    busybox)
      printf '::sysinit:/etc/init.d/rcS\n::respawn:/sbin/getty 38400 tty1\n' >"$r/etc/inittab"
      ;;
  esac
  mount -t proc proc "$r/proc"
  mounts+=("$r/proc")
}

# Everything under the root except what the test itself uses, with modes and hashes.
snapshot() {
  (cd "$1" && find . -path ./proc -prune -o -path ./dev/pts -prune -o -path ./media -prune -o -path ./var/log/qx-stub.log -prune \
    -o -print | LC_ALL=C sort | while read -r f; do
    if [ -f "$f" ] && [ ! -L "$f" ]; then
      echo "$f $(stat -c %a "$f") $(sha256sum "$f" | cut -c1-16)"
    else
      echo "$f $(stat -c %F "$f")"
    fi
  done)
}

in_root() { # in_root ROOT SHELL ARGS...: run a command line in the chroot under SHELL
  local r=$1 sh=$2
  shift 2
  if [ "$sh" = bash ]; then chroot "$r" /bin/bash "$@"; else chroot "$r" /bin/sh "$@"; fi
}

mode_is() { # mode_is ROOT PATH MODE
  [ -f "$1$2" ] || fail "$2 was not installed"
  [ "$(stat -c %a "$1$2")" = "$3" ] || fail "$2 has mode $(stat -c %a "$1$2"), want $3"
}

check_service() { # check_service ROOT INIT: the definition is valid for its init
  local r=$1 init=$2
  case "$init" in
    systemd)
      mode_is "$r" /etc/systemd/system/quantix-kvm-agent.service 644
      local unit=$r/etc/systemd/system/quantix-kvm-agent.service
      if command -v systemd-analyze >/dev/null; then
        # Verify a copy whose ExecStart names the binary as seen from outside the chroot.
        mkdir -p "$work/unit"
        sed "s|/usr/local/sbin/quantix-kvm-agent|$r/usr/local/sbin/quantix-kvm-agent|" "$unit" \
          >"$work/unit/quantix-kvm-agent.service"
        local vrc=0
        SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$work/unit/quantix-kvm-agent.service" \
          >"$work/verify.log" 2>&1 || vrc=$?
        if [ "$vrc" != 0 ] || grep -q 'quantix-kvm-agent.service' "$work/verify.log"; then
          cat "$work/verify.log" >&2
          fail "systemd-analyze verify reports problems in the unit"
        fi
      fi
      grep -qx 'ExecStart=/usr/local/sbin/quantix-kvm-agent --config /etc/quantix-kvm/agent.conf' "$unit" \
        || fail "unit ExecStart is wrong"
      grep -qx 'WantedBy=multi-user.target' "$unit" || fail "unit has no [Install] WantedBy"
      grep -q 'daemon-reload' "$r/var/log/qx-stub.log" || fail "systemctl daemon-reload was not called"
      grep -qx 'systemctl enable quantix-kvm-agent.service' "$r/var/log/qx-stub.log" \
        || fail "systemctl enable was not called"
      ;;
    openrc)
      mode_is "$r" /etc/init.d/quantix-kvm-agent 755
      sh -n "$r/etc/init.d/quantix-kvm-agent" || fail "OpenRC script does not parse"
      head -n1 "$r/etc/init.d/quantix-kvm-agent" | grep -qx '#!/sbin/openrc-run' || fail "OpenRC script has the wrong interpreter"
      grep -q '^command="/usr/local/sbin/quantix-kvm-agent"' "$r/etc/init.d/quantix-kvm-agent" || fail "OpenRC command is wrong"
      grep -qx 'rc-update add quantix-kvm-agent default' "$r/var/log/qx-stub.log" || fail "rc-update add was not called"
      ;;
    sysvinit)
      mode_is "$r" /etc/init.d/quantix-kvm-agent 755
      sh -n "$r/etc/init.d/quantix-kvm-agent" || fail "init script does not parse"
      for k in '### BEGIN INIT INFO' '# Provides:          quantix-kvm-agent' '# Default-Start:     2 3 4 5' \
        '# Default-Stop:      0 1 6' '### END INIT INFO'; do
        grep -qxF "$k" "$r/etc/init.d/quantix-kvm-agent" || fail "LSB header lacks '$k'"
      done
      grep -qx 'update-rc.d quantix-kvm-agent defaults' "$r/var/log/qx-stub.log" || fail "update-rc.d was not called"
      # The script itself answers status in the chroot (no agent running: LSB status 3).
      set +e
      chroot "$r" /etc/init.d/quantix-kvm-agent status >/dev/null
      local st=$?
      set -e
      [ "$st" = 3 ] || fail "init script status returned $st, want 3 (not running)"
      ;;
    busybox)
      grep -qx '::respawn:/usr/local/sbin/quantix-kvm-agent --config /etc/quantix-kvm/agent.conf # quantix-kvm-agent' \
        "$r/etc/inittab" || fail "inittab has no respawn line for the agent"
      [ "$(grep -c quantix-kvm-agent "$r/etc/inittab")" = 1 ] || fail "inittab has more than one agent line"
      ;;
  esac
}

for sh in ash bash; do
  for init in systemd openrc sysvinit busybox; do
    r=$work/root-$init-$sh
    make_root "$r" "$init" "$sh"
    before=$(snapshot "$r")

    # --dry-run changes nothing.
    in_root "$r" "$sh" /media/cdrom/install.sh --dry-run --no-start >"$work/dry.log" 2>&1 \
      || { cat "$work/dry.log"; fail "[$init/$sh] --dry-run failed"; }
    grep -q "init $init" "$work/dry.log" || { cat "$work/dry.log"; fail "[$init/$sh] detected the wrong init system"; }
    diff <(echo "$before") <(snapshot "$r") || fail "[$init/$sh] --dry-run changed the system"

    # A tampered image is refused before anything changes.
    cp -a "$r/media/cdrom" "$r/media/bad"
    printf 'X' | dd of="$r/media/bad/quantix-kvm-agent.x86_64" bs=1 seek=1000 conv=notrunc status=none
    set +e
    in_root "$r" "$sh" /media/bad/install.sh --no-start >"$work/bad.log" 2>&1
    rc=$?
    set -e
    rm -rf "$r/media/bad"
    [ "$rc" = 3 ] || { cat "$work/bad.log"; fail "[$init/$sh] a tampered binary gave exit $rc, want 3"; }
    grep -q 'does not match SHA256SUMS' "$work/bad.log" || fail "[$init/$sh] no clear message for a tampered binary"
    [ "$(snapshot "$r")" = "$before" ] || { diff <(echo "$before") <(snapshot "$r"); fail "[$init/$sh] a refused install left files behind"; }

    # Install.
    in_root "$r" "$sh" /media/cdrom/install.sh --no-start >"$work/install.log" 2>&1 \
      || { cat "$work/install.log"; fail "[$init/$sh] install failed"; }
    mode_is "$r" /usr/local/sbin/quantix-kvm-agent 755
    mode_is "$r" /usr/local/sbin/quantix-kvm-agent-uninstall 755
    mode_is "$r" /etc/quantix-kvm/agent.conf 644
    cmp -s "$r/usr/local/sbin/quantix-kvm-agent" "$agent" || fail "[$init/$sh] installed binary differs from the agent"
    case "$init" in
      systemd | sysvinit) mode_is "$r" /etc/udev/rules.d/60-quantix-kvm-agent.rules 644 ;;
      *) [ ! -e "$r/etc/udev/rules.d/60-quantix-kvm-agent.rules" ] || fail "[$init/$sh] udev rule installed without udev" ;;
    esac
    check_service "$r" "$init"
    [ ! -e "$r/usr/local/sbin/quantix-kvm-agent.old" ] || fail "[$init/$sh] .old on a first install"
    ok "[$init/$sh] install: files, modes, service definition, enable"

    # Re-run: upgrade in place, keep .old and the operator's agent.conf.
    echo '# edited by the operator' >>"$r/etc/quantix-kvm/agent.conf"
    conf_sum=$(sha256sum <"$r/etc/quantix-kvm/agent.conf")
    in_root "$r" "$sh" /media/cdrom/install.sh --no-start >"$work/install2.log" 2>&1 \
      || { cat "$work/install2.log"; fail "[$init/$sh] re-run failed"; }
    grep -q 'upgrading quantix-kvm-agent' "$work/install2.log" || fail "[$init/$sh] re-run did not report an upgrade"
    mode_is "$r" /usr/local/sbin/quantix-kvm-agent.old 755
    cmp -s "$r/usr/local/sbin/quantix-kvm-agent.old" "$agent" || fail "[$init/$sh] .old is not the previous binary"
    [ "$(sha256sum <"$r/etc/quantix-kvm/agent.conf")" = "$conf_sum" ] || fail "[$init/$sh] re-run replaced agent.conf"
    check_service "$r" "$init"
    ok "[$init/$sh] re-run upgrades in place, keeps .old and the edited agent.conf"

    # Uninstall keeps agent.conf; the rest is exactly as before the install.
    in_root "$r" "$sh" /usr/local/sbin/quantix-kvm-agent-uninstall >"$work/un.log" 2>&1 \
      || { cat "$work/un.log"; fail "[$init/$sh] uninstall failed"; }
    after=$(snapshot "$r" | grep -v '^./etc/quantix-kvm')
    diff <(echo "$before") <(echo "$after") || fail "[$init/$sh] uninstall left changes behind"
    [ -f "$r/etc/quantix-kvm/agent.conf" ] || fail "[$init/$sh] uninstall removed agent.conf without --purge"
    case "$init" in
      systemd) grep -qx 'systemctl disable --now quantix-kvm-agent.service' "$r/var/log/qx-stub.log" || fail "[$init/$sh] not disabled" ;;
      openrc) grep -qx 'rc-update del quantix-kvm-agent default' "$r/var/log/qx-stub.log" || fail "[$init/$sh] not removed from the runlevel" ;;
      sysvinit) grep -qx 'update-rc.d -f quantix-kvm-agent remove' "$r/var/log/qx-stub.log" || fail "[$init/$sh] links not removed" ;;
    esac
    ok "[$init/$sh] uninstall removes everything it added, keeps agent.conf"

    # Install again (the kept conf stays), then remove through the ISO with --purge.
    in_root "$r" "$sh" /media/cdrom/install.sh --no-start >"$work/install3.log" 2>&1 \
      || { cat "$work/install3.log"; fail "[$init/$sh] install over a kept agent.conf failed"; }
    grep -q 'keeping the existing /etc/quantix-kvm/agent.conf' "$work/install3.log" || fail "[$init/$sh] kept conf not reported"
    in_root "$r" "$sh" /media/cdrom/install.sh --uninstall --purge >"$work/un2.log" 2>&1 \
      || { cat "$work/un2.log"; fail "[$init/$sh] install.sh --uninstall --purge failed"; }
    diff <(echo "$before") <(snapshot "$r") || fail "[$init/$sh] --uninstall --purge left changes behind"
    ok "[$init/$sh] install.sh --uninstall --purge"
  done
done

# --replace-qemu-ga: qemu-ga is stopped and kept from starting again, the way its init does it;
# the record survives an upgrade without the flag; uninstall puts qemu-ga back exactly.
for init in systemd openrc sysvinit busybox; do
  r=$work/root-qga-$init
  make_root "$r" "$init" ash
  case "$init" in
    systemd)
      mkdir -p "$r/lib/systemd/system"
      printf '[Unit]\nDescription=QEMU Guest Agent\n[Service]\nExecStart=/usr/sbin/qemu-ga\n' \
        >"$r/lib/systemd/system/qemu-guest-agent.service"
      ;;
    openrc | sysvinit)
      printf '#!/bin/sh\necho "qemu-guest-agent $*" >>/var/log/qx-stub.log\n' >"$r/etc/init.d/qemu-guest-agent"
      chmod 0755 "$r/etc/init.d/qemu-guest-agent"
      ;;
    busybox) printf '::respawn:/usr/sbin/qemu-ga -m virtio-serial\n' >>"$r/etc/inittab" ;;
  esac
  before=$(snapshot "$r")
  in_root "$r" ash /media/cdrom/install.sh --replace-qemu-ga --no-start >"$work/qga.log" 2>&1 \
    || { cat "$work/qga.log"; fail "[qga/$init] install --replace-qemu-ga failed"; }
  state=$r/var/lib/quantix-kvm-agent/installed
  grep -qx "qemu_ga=$init" "$state" || fail "[qga/$init] the state file does not record the replaced qemu-ga"
  stubbed() { grep -qxF "$1" "$r/var/log/qx-stub.log" || fail "[qga/$init] '$1' was not run"; }
  case "$init" in
    systemd) stubbed 'systemctl stop qemu-guest-agent.service'; stubbed 'systemctl mask qemu-guest-agent.service' ;;
    openrc) stubbed 'rc-service qemu-guest-agent stop'; stubbed 'rc-update del qemu-guest-agent default' ;;
    sysvinit) stubbed 'qemu-guest-agent stop'; stubbed 'update-rc.d qemu-guest-agent disable' ;;
    busybox)
      grep -qx '#qx-replaced# ::respawn:/usr/sbin/qemu-ga -m virtio-serial' "$r/etc/inittab" \
        || fail "[qga/busybox] the qemu-ga inittab line is not commented out"
      ;;
  esac
  grep -Eq '^[[:space:]]*qga_device[[:space:]]*=[[:space:]]*none' "$r/etc/quantix-kvm/agent.conf" \
    && fail "[qga/$init] the installed agent.conf turns the qemu-ga front end off"
  in_root "$r" ash /media/cdrom/install.sh --no-start >"$work/qga2.log" 2>&1 \
    || { cat "$work/qga2.log"; fail "[qga/$init] upgrade failed"; }
  grep -qx "qemu_ga=$init" "$state" || fail "[qga/$init] an upgrade forgot the replaced qemu-ga"
  in_root "$r" ash /usr/local/sbin/quantix-kvm-agent-uninstall --purge >"$work/qga-un.log" 2>&1 \
    || { cat "$work/qga-un.log"; fail "[qga/$init] uninstall failed"; }
  case "$init" in
    systemd) stubbed 'systemctl unmask qemu-guest-agent.service'; stubbed 'systemctl start qemu-guest-agent.service' ;;
    openrc) stubbed 'rc-update add qemu-guest-agent default'; stubbed 'rc-service qemu-guest-agent start' ;;
    sysvinit) stubbed 'update-rc.d qemu-guest-agent enable'; stubbed 'qemu-guest-agent start' ;;
  esac
  diff <(echo "$before") <(snapshot "$r") || fail "[qga/$init] uninstall did not restore the system (inittab included)"
  ok "[qga/$init] --replace-qemu-ga stops and disables qemu-ga; uninstall puts it back"
done

# --prefix: the binary and the service definition's path move together; uninstall follows.
r=$work/root-prefix
make_root "$r" systemd ash
before=$(snapshot "$r")
in_root "$r" ash /media/cdrom/install.sh --prefix /opt/qx --no-start >"$work/prefix.log" 2>&1 \
  || { cat "$work/prefix.log"; fail "[prefix] install failed"; }
mode_is "$r" /opt/qx/sbin/quantix-kvm-agent 755
mode_is "$r" /opt/qx/sbin/quantix-kvm-agent-uninstall 755
[ ! -e "$r/usr/local/sbin/quantix-kvm-agent" ] || fail "[prefix] installed into /usr/local too"
grep -qx 'ExecStart=/opt/qx/sbin/quantix-kvm-agent --config /etc/quantix-kvm/agent.conf' \
  "$r/etc/systemd/system/quantix-kvm-agent.service" || fail "[prefix] the unit does not name /opt/qx/sbin"
in_root "$r" ash /opt/qx/sbin/quantix-kvm-agent-uninstall --purge >"$work/prefix-un.log" 2>&1 \
  || { cat "$work/prefix-un.log"; fail "[prefix] uninstall failed"; }
diff <(echo "$before") <(snapshot "$r") || fail "[prefix] uninstall left changes behind"
ok "[prefix] --prefix /opt/qx moves the binary and the unit's ExecStart; uninstall removes /opt/qx"

# Not root: refused with exit 2 before anything changes.
set +e
chroot --userspec=1000:1000 "$r" /bin/sh /media/cdrom/install.sh --no-start >"$work/user.log" 2>&1
rc=$?
set -e
[ "$rc" = 2 ] || { cat "$work/user.log"; fail "[not root] exit $rc, want 2"; }
grep -q 'must run as root' "$work/user.log" || fail "[not root] no clear message"
diff <(echo "$before") <(snapshot "$r") || fail "[not root] a refused install changed the system"
ok "[not root] install.sh refuses with exit 2 and changes nothing"

# The architecture: with `uname -m` stubbed, install.sh picks the agent for the machine (the
# aarch64 binary itself was run under qemu-aarch64 above; here it cannot be run, so --dry-run).
# A damaged agent for the other architecture does not stop an install; the own one does.
# Under bash: the static busybox's ash runs its own uname applet before any on PATH.
r=$work/root-arch
make_root "$r" systemd bash
rm -f "$r/bin/uname"
for m in aarch64 arm64 x86_64 riscv64; do
  printf '#!/bin/sh\n[ "$1" = -m ] && { echo %s; exit 0; }\nexec /bin/busybox uname "$@"\n' "$m" >"$r/bin/uname"
  chmod 0755 "$r/bin/uname"
  set +e
  in_root "$r" bash /media/cdrom/install.sh --dry-run --no-start >"$work/arch.log" 2>&1
  rc=$?
  set -e
  case "$m" in
    aarch64 | arm64) want=aarch64 ;;
    x86_64) want=x86_64 ;;
    riscv64)
      [ "$rc" = 2 ] || { cat "$work/arch.log"; fail "[arch $m] exit $rc, want 2"; }
      grep -q 'unsupported architecture riscv64 (this ISO has agents for: aarch64 x86_64)' "$work/arch.log" \
        || { cat "$work/arch.log"; fail "[arch $m] the refusal does not name the image's agents"; }
      continue
      ;;
  esac
  [ "$rc" = 0 ] || { cat "$work/arch.log"; fail "[arch $m] --dry-run failed (exit $rc)"; }
  grep -q "for $want, init systemd" "$work/arch.log" || { cat "$work/arch.log"; fail "[arch $m] did not select $want"; }
  grep -q "would install quantix-kvm-agent.$want -> /usr/local/sbin/quantix-kvm-agent (mode 0755, sha256 verified)" \
    "$work/arch.log" || { cat "$work/arch.log"; fail "[arch $m] would not install quantix-kvm-agent.$want"; }
  [ "$(grep -c 'would install quantix-kvm-agent\.' "$work/arch.log")" = 1 ] || fail "[arch $m] more than one agent selected"
done
cp -a "$r/media/cdrom" "$r/media/bad"
printf 'X' | dd of="$r/media/bad/quantix-kvm-agent.aarch64" bs=1 seek=1000 conv=notrunc status=none
for m in aarch64 x86_64; do
  printf '#!/bin/sh\n[ "$1" = -m ] && { echo %s; exit 0; }\nexec /bin/busybox uname "$@"\n' "$m" >"$r/bin/uname"
  set +e
  in_root "$r" bash /media/bad/install.sh --dry-run --no-start >"$work/arch.log" 2>&1
  rc=$?
  set -e
  case "$m" in
    aarch64) [ "$rc" = 3 ] && grep -q 'quantix-kvm-agent.aarch64 does not match SHA256SUMS' "$work/arch.log" \
      || { cat "$work/arch.log"; fail "[arch $m] a damaged aarch64 agent gave exit $rc, want 3"; } ;;
    x86_64) [ "$rc" = 0 ] || { cat "$work/arch.log"; fail "[arch $m] a damaged aarch64 agent stopped an x86_64 install"; } ;;
  esac
done
rm -rf "$r/media/bad"
ok "[arch] uname -m aarch64 and arm64 select quantix-kvm-agent.aarch64, x86_64 the x86_64 one, riscv64 is refused (exit 2); only the selected agent's hash matters"

# ---- 4. real starts: sysvinit's own init script and busybox without a supervisor ---------------
# The port is a pty: the agent opens its slave as it would /dev/vportNpM, and install.sh must
# see that through /proc/PID/fd. A small python process holds the master and drains it.
agent_pids_under() { # agent_pids_under ROOT: pids running ROOT/usr/local/sbin/quantix-kvm-agent
  for d in /proc/[0-9]*; do
    [ "$(readlink "$d/exe" 2>/dev/null)" = "$1/usr/local/sbin/quantix-kvm-agent" ] && echo "${d#/proc/}"
  done
  return 0
}
python3 -c '
import os, pty, sys, time, tty
m, s = pty.openpty()
tty.setraw(s)
print(os.ttyname(s), flush=True)
while True:
    try:
        if not os.read(m, 65536):
            time.sleep(0.1)
    except OSError:
        time.sleep(0.1)
' >"$work/pty" &
pty_pid=$!
i=0
while [ ! -s "$work/pty" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
pts=$(cat "$work/pty")
[ -c "$pts" ] || fail "no pty for the port"

for init in sysvinit busybox; do
  sh=ash
  r=$work/start-$init
  make_root "$r" "$init" "$sh"
  mkdir -p "$r/dev/pts" "$r/dev/virtio-ports"
  mount --bind /dev/pts "$r/dev/pts"
  mounts=("$r/dev/pts" "${mounts[@]}")
  ln -s "$pts" "$r/dev/virtio-ports/org.quantix.agent.0"
  before=$(snapshot "$r")

  in_root "$r" "$sh" /media/cdrom/install.sh --timeout 30 >"$work/s1.log" 2>&1 \
    || { cat "$work/s1.log"; fail "[$init start] install failed"; }
  grep -q "has opened /dev/virtio-ports/org.quantix.agent.0" "$work/s1.log" || { cat "$work/s1.log"; fail "[$init start] port not seen"; }
  pid1=$(agent_pids_under "$r")
  [ "$(echo "$pid1" | wc -w)" = 1 ] || fail "[$init start] want one agent running, got '$pid1'"
  ls -l "/proc/$pid1/fd" | grep -q "$pts" || fail "[$init start] the agent does not hold $pts"
  ok "[$init start] install starts the agent and waits until it holds the port"

  in_root "$r" "$sh" /media/cdrom/install.sh --timeout 30 >"$work/s2.log" 2>&1 \
    || { cat "$work/s2.log"; fail "[$init start] upgrade failed"; }
  pid2=$(agent_pids_under "$r")
  [ "$(echo "$pid2" | wc -w)" = 1 ] || fail "[$init start] after upgrade want one agent, got '$pid2'"
  [ "$pid2" != "$pid1" ] || fail "[$init start] upgrade did not restart the agent"
  # Gone or a zombie (exited; the chroot has no init of its own to reap it).
  if [ -d "/proc/$pid1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid1/status" 2>/dev/null; then
    fail "[$init start] the old agent still runs"
  fi
  ok "[$init start] re-run restarts onto the new binary (pid $pid1 -> $pid2)"

  # A release whose agent cannot start: the copy's manifest is consistent (so it installs),
  # the binary only answers --version. install.sh must restore .old and exit 5.
  cp -a "$r/media/cdrom" "$r/media/broken"
  printf '#!/bin/sh\n[ "$1" = --version ] && echo "quantix-kvm-agent %s" && exit 0\nexit 1\n' "$version" \
    >"$r/media/broken/quantix-kvm-agent.x86_64"
  (cd "$r/media/broken" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | LC_ALL=C sort \
    | while read -r f; do sha256sum "$f"; done >SHA256SUMS)
  set +e
  in_root "$r" "$sh" /media/broken/install.sh --timeout 10 >"$work/s3.log" 2>&1
  rc=$?
  set -e
  rm -rf "$r/media/broken"
  [ "$rc" = 5 ] || { cat "$work/s3.log"; fail "[$init start] a release that cannot start gave exit $rc, want 5"; }
  grep -q 'rolled back' "$work/s3.log" || fail "[$init start] no rollback message"
  cmp -s "$r/usr/local/sbin/quantix-kvm-agent" "$agent" || fail "[$init start] the binary was not restored"
  pid3=$(agent_pids_under "$r")
  [ "$(echo "$pid3" | wc -w)" = 1 ] || fail "[$init start] after rollback want one agent, got '$pid3'"
  ls -l "/proc/$pid3/fd" | grep -q "$pts" || fail "[$init start] the restored agent does not hold the port"
  ok "[$init start] a new agent that does not start is rolled back to .old (exit 5), which runs again"

  in_root "$r" "$sh" /usr/local/sbin/quantix-kvm-agent-uninstall --purge >"$work/s4.log" 2>&1 \
    || { cat "$work/s4.log"; fail "[$init start] uninstall failed"; }
  i=0
  while [ -n "$(agent_pids_under "$r")" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  [ -z "$(agent_pids_under "$r")" ] || fail "[$init start] the agent still runs after uninstall"
  diff <(echo "$before") <(snapshot "$r" | grep -v '^./var/log/quantix-kvm-agent.log') \
    || fail "[$init start] uninstall left changes behind"
  ok "[$init start] uninstall stops the agent and removes everything"
done

echo "iso-build/test.sh: $pass checks passed"
