#!/usr/bin/env bash
# The one command that sets up a fresh machine and runs every test: formatting, lints, unit
# and integration tests, the static guest build and its dependency rules, and the VM tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "setup"
bash ci/setup.sh

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "guest: static musl release build"
bash ci/build-agent.sh

step "guest: no tokio in the dependency tree"
if cargo tree -p quantix-kvm-agent -e normal --locked --target x86_64-unknown-linux-musl | grep ' tokio v'; then
  echo "tokio is in the guest's dependency tree" >&2
  exit 1
fi

step "agent ISO: listing, manifest, reproducible bytes, install.sh in chroots per init system"
bash iso-build/test.sh --agent target/x86_64-unknown-linux-musl/release/quantix-kvm-agent

step "tests"
cargo test --workspace --locked --exclude qx-e2e
# As root: clients of another uid through setpriv (the unix socket's credential check).
cargo test --locked -p qx-node --test listen_policy -- --ignored

step "standard gRPC services: reflection and health, driven by Python's grpcio"
cargo build --locked -p qx-node --bins
bash ci/grpc-standard-test.sh
step "man pages and shell completions: qx-node, qxctl, quantix-kvm-agent"
bash ci/build-docs.sh
step "packages: qx-node .deb, agent .deb and .rpm; the .debs installed with dpkg --root"
bash ci/package-test.sh --bin-dir target/debug --agent target/x86_64-unknown-linux-musl/release/quantix-kvm-agent

step "whole-VM tests: the agent in QEMU (TCG), through qx-node"
bash ci/vm/build-image.sh
cargo build --locked -p qx-node --bins
cargo test --locked -p qx-e2e -- --test-threads=2

step "agent ISO in a VM booted without the agent: mount, install.sh, AgentReady"
bash iso-build/vm-test.sh --agent target/x86_64-unknown-linux-musl/release/quantix-kvm-agent

step "whole-VM test through libvirt: qemu:///system, agent via the domain's channel"
cargo test --locked -p qx-node --test vm_qemu -- --ignored

step "qxctl agent install through qx-node and libvirt: MountAgentIso, upgrade in the guest"
bash iso-build/node-test.sh --agent target/x86_64-unknown-linux-musl/release/quantix-kvm-agent
