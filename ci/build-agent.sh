#!/usr/bin/env bash
# Builds the static guest agent for x86_64 and aarch64, checks that each is static and for the
# right machine, and prints the sizes.
#
#   bash ci/build-agent.sh          the product build, both architectures: what CI tests, the VM
#                                   image runs (x86_64) and the ISO ships (both)
#                                   -> target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
#                                   -> target/aarch64-unknown-linux-musl/release/quantix-kvm-agent
#   bash ci/build-agent.sh --plain  the x86_64 code linked against the prebuilt std, for
#                                   comparison -> target/plain/x86_64-unknown-linux-musl/release/
#
# The product build uses the pinned toolchain (rust-toolchain.toml) to rebuild its own std from
# its rust-src (-Zbuild-std; RUSTC_BOOTSTRAP=1 allows that on a stable compiler, as in the Linux
# kernel's build), with std's optimize_for_size code paths and without the backtrace symboliser
# (addr2line, gimli, object, miniz_oxide) that the prebuilt std always contains. The release
# profile in Cargo.toml adds opt-level "s", LTO and panic = "abort". A panic still prints its
# message and location before it aborts. -Cforce-unwind-tables=no leaves out .eh_frame (65 KB
# on x86_64): with panic = "abort" and no backtrace support nothing in the binary unwinds, so
# only a debugger or profiler reading the stripped product binary would miss them. Sizes and
# the other options measured: docs/benchmarks.md, "The agent binary".
#
# Both targets are built by one cargo run with the same flags. Rust's musl targets are
# self-contained (musl's libc.a and crt objects come with the target's rust-std), so the aarch64
# binary needs no cross toolchain: it is linked by the toolchain's own rust-lld. x86_64 keeps
# the host's cc as its linker driver, as before.
#
# RUSTC_BOOTSTRAP=1 also lets build scripts that probe for nightly features (proc-macro2,
# thiserror) find them; with the pinned compiler and Cargo.lock the outcome is fixed.
#
# std is built in its own target dir (target/agent), so the workspace's target dir is untouched
# and an unchanged tree builds nothing; the binaries are then copied to the paths everything uses.
set -euo pipefail
cd "$(dirname "$0")/.."

# target triple -> readelf's name for its machine
declare -A machine=(
  [x86_64-unknown-linux-musl]="Advanced Micro Devices X86-64"
  [aarch64-unknown-linux-musl]="AArch64"
)

case "${1:-}" in
  "")
    targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
    export CARGO_TARGET_DIR=target/agent
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld
    # Source paths end up in the binary (panic locations): name them independently of where
    # the checkout, the cargo registry and the toolchain live, so that the same sources give
    # the same bytes anywhere.
    RUSTFLAGS="--remap-path-prefix=$PWD=/qx --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
    RUSTFLAGS+=" --remap-path-prefix=$(rustc --print sysroot)=/rust"
    # No unwind tables: nothing in the agent unwinds (see the top of this file).
    RUSTFLAGS+=" -Cforce-unwind-tables=no"
    export RUSTFLAGS
    RUSTC_BOOTSTRAP=1 cargo build --release --locked -p quantix-kvm-agent \
      "${targets[@]/#/--target=}" \
      -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size
    bins=()
    for t in "${targets[@]}"; do
      built=$CARGO_TARGET_DIR/$t/release/quantix-kvm-agent
      bin=target/$t/release/quantix-kvm-agent
      # Replace by rename, never write through: a plain workspace build may have left a hard
      # link to its own output here. Unchanged bytes are left alone (and keep their mtime).
      if ! cmp -s "$built" "$bin"; then
        mkdir -p "$(dirname "$bin")"
        cp "$built" "$bin.tmp.$$"
        mv -f "$bin.tmp.$$" "$bin"
      fi
      bins+=("$t:$bin")
    done
    ;;
  --plain)
    export CARGO_TARGET_DIR=target/plain
    t=x86_64-unknown-linux-musl
    cargo build --release --locked -p quantix-kvm-agent --target "$t"
    bins=("$t:$CARGO_TARGET_DIR/$t/release/quantix-kvm-agent")
    ;;
  *)
    echo "usage: bash ci/build-agent.sh [--plain]" >&2
    exit 2
    ;;
esac

for tb in "${bins[@]}"; do
  t=${tb%%:*}
  bin=${tb#*:}
  # Static: no program interpreter and no shared libraries needed.
  headers=$(readelf -hlW -d "$bin")
  if grep -qE 'Requesting program interpreter|\(NEEDED\)' <<<"$headers"; then
    echo "the agent is not static: $bin" >&2
    exit 1
  fi
  if ! grep -qE "^ *Machine: +${machine[$t]}\$" <<<"$headers"; then
    echo "the agent is not a ${t%%-*} binary: $bin" >&2
    exit 1
  fi
  echo "agent: $bin $(stat -c %s "$bin") bytes"
done
