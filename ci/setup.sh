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

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # No init system runs here: keep package scripts from trying to start services.
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
