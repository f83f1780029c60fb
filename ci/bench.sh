#!/usr/bin/env bash
# Benchmark (not a test): quantix-kvm-agent against Debian's qemu-guest-agent, side by side in
# one VM under the same conditions, and writes the table into docs/benchmarks.md between the
# vm-bench markers. Method: docs/benchmarks.md, "Agent against qemu-guest-agent".
#
# Usage: bash ci/bench.sh [--no-write]
set -euo pipefail
cd "$(dirname "$0")/.."

write=1
[ "${1:-}" = "--no-write" ] && write=0

bash ci/setup.sh
bash ci/vm/build-image.sh --bench
cargo build --release --locked -p qx-e2e --bin qx-bench

out=$(mktemp)
trap 'rm -f "$out"' EXIT
load=$(cut -d' ' -f1-3 /proc/loadavg)
target/release/qx-bench | tee "$out"

if [ "$write" = 1 ]; then
  doc=docs/benchmarks.md
  python3 - "$doc" "$out" "$load" <<'PY'
import datetime, sys
doc, table, load = sys.argv[1], open(sys.argv[2]).read().strip(), sys.argv[3]
text = open(doc).read()
begin, end = "<!-- vm-bench:begin -->", "<!-- vm-bench:end -->"
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
block = (f"{begin}\nMeasured {stamp} with `bash ci/bench.sh` (host load average {load} "
         f"when it started, on 2 cores).\n\n{table}\n{end}")
if begin in text and end in text:
    text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
else:
    text = text.rstrip() + "\n\n" + block + "\n"
open(doc, "w").write(text)
PY
  echo "bench: table written to $doc"
fi
