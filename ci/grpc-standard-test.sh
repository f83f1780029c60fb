#!/usr/bin/env bash
# qx-node's standard gRPC services, driven by an independent client: Python's grpcio with
# grpcio-health-checking and grpcio-reflection (from PyPI, in a venv under target/).
#   1. libvirt reachable (test:///default): reflection lists and describes the services,
#      health says SERVING.
#   2. libvirt unreachable (a socket that does not exist): health says NOT_SERVING.
#   3. The Prometheus endpoint counts those calls per method and status code.
# Every qx-node it starts is stopped on exit (by pid).
#
# Usage: bash ci/grpc-standard-test.sh   (after `cargo build -p qx-node --bins`)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv=$root/target/grpc-venv
if ! "$venv/bin/python" -c 'import grpc_health, grpc_reflection' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    'grpcio==1.*' 'grpcio-health-checking==1.*' 'grpcio-reflection==1.*'
fi

qxnode=$root/target/debug/qx-node
[ -x "$qxnode" ] || { echo "grpc-standard: build qx-node first" >&2; exit 1; }
work=$(mktemp -d /tmp/qx-grpc18.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts qx-node with the given libvirt URI on free ports; sets $addr and $metrics.
start() {
  local uri=$1 log=$work/qx-node.$RANDOM.log
  addr=127.0.0.1:$(free_port)
  metrics=127.0.0.1:$(free_port)
  # Plain TCP on loopback, for the Python client: a test set-up, hence --insecure-listen.
  "$qxnode" --listen "$addr" --insecure-listen --metrics-listen "$metrics" --libvirt-uri "$uri" \
    --agent-socket-dir "$work" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    if grep -q "gRPC on" "$log"; then return 0; fi
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  cat "$log" >&2
  return 1
}

start test:///default
"$venv/bin/python" ci/grpc_standard_check.py "$addr" SERVING

start "qemu+unix:///system?socket=$work/no-libvirtd.sock"
"$venv/bin/python" ci/grpc_standard_check.py "$addr" NOT_SERVING

# The check above made two Health/Check calls answered OK and one NOT_FOUND.
scrape=$(curl -fsS "http://$metrics/metrics")
health='grpc_service="grpc.health.v1.Health",grpc_method="Check"'
for want in \
  "grpc_server_handled_total{$health,grpc_code=\"Ok\"} 2" \
  "grpc_server_handled_total{$health,grpc_code=\"NotFound\"} 1" \
  "grpc_server_handling_seconds_count{$health} 3" \
  "grpc_server_started_total{$health} 3"; do
  grep -qxF "$want" <<<"$scrape" || {
    echo "grpc-standard: the metrics endpoint lacks: $want" >&2
    grep '^grpc_server' <<<"$scrape" >&2
    exit 1
  }
done
echo "grpc-standard: RPC metrics: per-method counts by status code and latency histograms"

echo "grpc-standard: ok"
