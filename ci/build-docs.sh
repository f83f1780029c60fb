#!/usr/bin/env bash
# Man pages and shell completions for qx-node (8), qxctl (1) and quantix-kvm-agent (8):
# the first two generated from their clap definitions, the agent's kept by hand in
# guest/quantix-kvm-agent.8. Every page is rendered once by man(1) with warnings as errors.
#
# Usage: bash ci/build-docs.sh [--bin-dir DIR] [--out DIR]
#   --bin-dir  where qx-node and qxctl are (default target/debug, built here if missing)
#   --out      output directory (default target/docs): man/man{1,8}/, completions/
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=target/debug
out=target/docs
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "build-docs: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ "$bin_dir" = target/debug ] && { [ ! -x "$bin_dir/qx-node" ] || [ ! -x "$bin_dir/qxctl" ]; }; then
  cargo build --locked -q -p qx-node --bins
fi

rm -rf "$out"
mkdir -p "$out/man/man8"
QX_GENERATE_DOCS_DIR=$out "$bin_dir/qx-node"
QX_GENERATE_DOCS_DIR=$out "$bin_dir/qxctl"
cp guest/quantix-kvm-agent.8 "$out/man/man8/"

# Render every page; groff warnings (bad requests, unknown escapes) fail the build.
for page in "$out"/man/man*/*; do
  warnings=$(MANWIDTH=80 man --warnings -E UTF-8 -l "$page" 2>&1 >/dev/null || true)
  if [ -n "$warnings" ]; then
    echo "build-docs: $page: $warnings" >&2
    exit 1
  fi
done
for f in qx-node.bash _qx-node qx-node.fish qxctl.bash _qxctl qxctl.fish; do
  [ -s "$out/completions/$f" ] || { echo "build-docs: no completion $f" >&2; exit 1; }
done
bash -n "$out/completions/qxctl.bash"
gzip -9n "$out"/man/man*/*
echo "build-docs: $(find "$out/man" -type f | wc -l) man pages, 6 completion files in $out"
