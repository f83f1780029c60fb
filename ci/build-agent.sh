#!/usr/bin/env bash
# Builds the static guest agent and prints its size.
#
#   bash ci/build-agent.sh          the product build: pinned stable toolchain, musl, release
#                                   profile for size -> target/x86_64-unknown-linux-musl/release/
#   bash ci/build-agent.sh --small  the same code with std rebuilt for size and panics that abort
#                                   without a message (nightly: -Zbuild-std, panic=immediate-abort)
#                                   -> target/small/x86_64-unknown-linux-musl/release/
#
# The small build drops std's panic message and backtrace machinery (about 340 KB). It needs the
# nightly toolchain with its rust-src and musl target; it is measured in docs/benchmarks.md but
# is not what CI tests or the ISO ships.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl

if [ "${1:-}" = "--small" ]; then
  rustup component add rust-src --toolchain nightly >/dev/null
  rustup target add "$target" --toolchain nightly >/dev/null
  export CARGO_TARGET_DIR=target/small
  RUSTFLAGS="-Zunstable-options -Cpanic=immediate-abort" \
    cargo +nightly build --release --locked -p quantix-kvm-agent --target "$target" \
    -Zbuild-std=std,panic_abort
  bin=target/small/$target/release/quantix-kvm-agent
else
  cargo build --release --locked -p quantix-kvm-agent --target "$target"
  bin=target/$target/release/quantix-kvm-agent
fi

if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "the agent is not static" >&2
  exit 1
fi
echo "agent: $bin $(stat -c %s "$bin") bytes"
