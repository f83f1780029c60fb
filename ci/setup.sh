#!/usr/bin/env bash
# Installs everything the build, the tests and the demo need on a fresh Debian 12 machine.
# Idempotent: a second run only checks. Safe to run as root; uses sudo otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT_PACKAGES=(
  pkg-config libvirt-dev            # the host's `virt` crate links libvirt
  libvirt-daemon-system libvirt-clients
  qemu-system-x86 qemu-utils        # VM tests (TCG) and qcow2 images
  busybox-static cpio               # the test initramfs
  e2fsprogs util-linux              # ext4 images for freeze/trim tests
  xorriso                           # the agent ISO
  openssl                           # certificates for the host's mutual-TLS test
  python3                           # iso-build/test.sh: the pty standing in for the agent port
  qemu-user                         # qemu-aarch64: the ISO's aarch64 agent runs in its build and test
  qemu-guest-agent                  # the incumbent, for the side-by-side benchmark
  ca-certificates curl
  binutils                          # readelf: VM image and static-agent checks
  python3-venv                      # ci/grpc-standard-test.sh: grpcio from PyPI in a venv
  rpm                               # rpmbuild: ci/package.sh's agent RPM
)

# Every command that the build, the tests, the demo and the benchmark run, and the package that
# provides it. A package's status is not enough: installing one package can quietly remove
# another (a machine that came with a newer qemu-utils loses it, and qemu-img with it, when
# bookworm's qemu-system-x86 goes in), so the commands themselves are checked after installing.
COMMANDS=(
  qemu-img:qemu-utils
  qemu-system-x86_64:qemu-system-x86
  qemu-aarch64:qemu-user
  qemu-ga:qemu-guest-agent
  virsh:libvirt-clients
  libvirtd:libvirt-daemon-system
  virtlogd:libvirt-daemon-system
  pkg-config:pkg-config
  busybox:busybox-static
  cpio:cpio
  mkfs.ext4:e2fsprogs
  debugfs:e2fsprogs
  losetup:util-linux
  setpriv:util-linux
  xorriso:xorriso
  openssl:openssl
  python3:python3
  curl:curl
  readelf:binutils
  rpmbuild:rpm
  man:man-db
  xz:xz-utils
)
# The QEMU packages share one version; apt resolves them together, at the version of the
# configured archive, so that none of them is dropped to satisfy another.
QEMU_FAMILY=(qemu-system-x86 qemu-system-common qemu-utils qemu-user qemu-guest-agent)

export PATH="$PATH:/usr/sbin:/sbin"
have() { command -v "$1" >/dev/null 2>&1; }
missing_commands() {
  local entry
  for entry in "${COMMANDS[@]}"; do have "${entry%%:*}" || echo "$entry"; done
  pkg-config --exists libvirt 2>/dev/null || echo "pkg-config libvirt:libvirt-dev"
  python3 -c 'import ensurepip, venv' 2>/dev/null || echo "python3 -m venv:python3-venv"
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
while read -r entry; do
  [ -n "$entry" ] && missing+=("${entry##*:}")
done < <(missing_commands)

if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  for p in "${missing[@]}"; do
    case " ${QEMU_FAMILY[*]} " in
      *" $p "*)
        # One QEMU package to install means the whole family, pinned to one version.
        version=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: *//p')
        [ -n "$version" ] && [ "$version" != "(none)" ] || {
          echo "setup: no qemu-system-x86 package in the configured apt sources" >&2
          exit 1
        }
        for q in "${QEMU_FAMILY[@]}"; do missing+=("$q=$version"); done
        break
        ;;
    esac
  done
  # The pinned family replaces its unpinned names; anything else is installed as named.
  install=()
  for p in "${missing[@]}"; do
    case "$p" in *=*) install+=("$p") ;; *)
      case " ${QEMU_FAMILY[*]} " in *" $p "*) ;; *) install+=("$p") ;; esac ;;
    esac
  done
  mapfile -t install < <(printf '%s\n' "${install[@]}" | sort -u)
  echo "setup: installing ${install[*]}"
  # No init system runs here: keep package scripts from trying to start services.
  $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "${install[@]}" >/dev/null
fi

still=$(missing_commands)
if [ -n "$still" ]; then
  while read -r entry; do
    echo "setup: the command ${entry%%:*} is still missing after installing package ${entry##*:}" >&2
  done <<<"$still"
  exit 1
fi

# The toolchain, its components and the musl targets are pinned in rust-toolchain.toml; rust-src
# is there because ci/build-agent.sh rebuilds std from it. Install whatever of them is missing.
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
read -r -a rust_targets <<<"$(sed -n 's/^targets *= *\[\(.*\)\]/\1/p' rust-toolchain.toml | tr -d '",')"
[ ${#rust_targets[@]} -gt 0 ] || { echo "setup: no targets in rust-toolchain.toml" >&2; exit 1; }
if ! grep -q "^$toolchain-" <<<"$(rustup toolchain list)"; then
  echo "setup: installing Rust $toolchain"
  rustup toolchain install "$toolchain" --profile minimal --no-self-update
fi
installed=$(rustup component list --installed --toolchain "$toolchain")
components=()
for c in rustfmt clippy rust-src; do
  grep -qE "^$c(-|$)" <<<"$installed" || components+=("$c")
done
if [ ${#components[@]} -gt 0 ]; then
  echo "setup: adding Rust components ${components[*]}"
  rustup component add --toolchain "$toolchain" "${components[@]}"
fi
installed=$(rustup target list --installed --toolchain "$toolchain")
targets=()
for t in "${rust_targets[@]}"; do
  grep -qx "$t" <<<"$installed" || targets+=("$t")
done
if [ ${#targets[@]} -gt 0 ]; then
  echo "setup: adding Rust targets ${targets[*]}"
  rustup target add --toolchain "$toolchain" "${targets[@]}"
fi

echo "setup: ok"
