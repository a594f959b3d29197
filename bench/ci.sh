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
# Built here and run directly, not through `cargo run`: the harness builds
# node-agent with the same command, which then finds it fresh; under `cargo
# run` it would inherit cargo's CARGO_* variables, which ring's build script
# watches, and rebuild ring and every crate above it, twice.
cargo build --locked --release -p node-agent --bin node-agent
cargo build --locked --release -p node-agent-bench
target/release/node-agent-bench --quick
target/release/node-agent-bench --check target/bench/report.json
