#!/usr/bin/env bash
# Builds the static guest agent and prints its size. Output: target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p quantix-kvm-agent --target x86_64-unknown-linux-musl
bin=target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "the agent is not static" >&2
  exit 1
fi
echo "agent: $bin $(stat -c %s "$bin") bytes"
