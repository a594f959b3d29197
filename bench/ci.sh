#!/usr/bin/env bash
# CI step for the benchmark harness: a --quick run (smaller sizes, one
# repetition) against the pinned peers, then a check that target/bench/
# report.json holds every figure. It never judges a figure: benchmarks print
# numbers, they do not fail on them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/system-packages.sh
. scripts/peers.sh
if ! command -v h2load >/dev/null; then
  echo "error: h2load not found; install Debian's nghttp2-client (scripts/system-packages.sh installs it, pinned)" >&2
  exit 1
fi
cargo run --locked --release -p node-agent-bench -- --quick
cargo run --locked --release -p node-agent-bench -- --check target/bench/report.json
