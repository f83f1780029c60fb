#!/usr/bin/env bash
# Builds the static guest agent, checks that it is static and prints its size.
#
#   bash ci/build-agent.sh          the product build: what CI tests, the VM image runs and the
#                                   ISO ships -> target/x86_64-unknown-linux-musl/release/
#   bash ci/build-agent.sh --plain  the same code linked against the prebuilt std, for comparison
#                                   -> target/plain/x86_64-unknown-linux-musl/release/
#
# The product build uses the pinned toolchain (rust-toolchain.toml) to rebuild its own std from
# its rust-src (-Zbuild-std; RUSTC_BOOTSTRAP=1 allows that on a stable compiler, as in the Linux
# kernel's build), with std's optimize_for_size code paths and without the backtrace symboliser
# (addr2line, gimli, object, miniz_oxide) that the prebuilt std always contains. The release
# profile in Cargo.toml adds opt-level "s", LTO and panic = "abort". A panic still prints its
# message and location before it aborts. Sizes and the other options measured:
# docs/benchmarks.md, "The agent binary".
#
# RUSTC_BOOTSTRAP=1 also lets build scripts that probe for nightly features (proc-macro2,
# thiserror) find them; with the pinned compiler and Cargo.lock the outcome is fixed.
#
# std is built in its own target dir (target/agent), so the workspace's target dir is untouched
# and an unchanged tree builds nothing; the binary is then copied to the path everything uses.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
bin=target/$target/release/quantix-kvm-agent

case "${1:-}" in
  "")
    export CARGO_TARGET_DIR=target/agent
    RUSTC_BOOTSTRAP=1 cargo build --release --locked -p quantix-kvm-agent --target "$target" \
      -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size
    built=$CARGO_TARGET_DIR/$target/release/quantix-kvm-agent
    # Replace by rename, never write through: a plain workspace build may have left a hard link
    # to its own output here. Unchanged bytes are left alone (and keep their mtime).
    if ! cmp -s "$built" "$bin"; then
      mkdir -p "$(dirname "$bin")"
      cp "$built" "$bin.tmp.$$"
      mv -f "$bin.tmp.$$" "$bin"
    fi
    ;;
  --plain)
    export CARGO_TARGET_DIR=target/plain
    cargo build --release --locked -p quantix-kvm-agent --target "$target"
    bin=$CARGO_TARGET_DIR/$target/release/quantix-kvm-agent
    ;;
  *)
    echo "usage: bash ci/build-agent.sh [--plain]" >&2
    exit 2
    ;;
esac

# Static: no program interpreter and no shared libraries needed.
headers=$(readelf -lW -d "$bin")
if grep -qE 'Requesting program interpreter|\(NEEDED\)' <<<"$headers"; then
  echo "the agent is not static: $bin" >&2
  exit 1
fi
echo "agent: $bin $(stat -c %s "$bin") bytes"
