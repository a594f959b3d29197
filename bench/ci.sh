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
# CI checks that every measurement runs and lands in the report; it judges
# no figure. So it runs the debug build the tests have just made (the
# dependencies are optimised in it, see Cargo.toml's dev profile), rather
# than building everything again in release, which takes minutes on 2 cores;
# the report names the binary it measured. The figures docs/benchmarks.md
# records come from full runs of a release build (cargo run --release -p
# node-agent-bench). Built here and run directly, not through `cargo run`:
# under it the harness would inherit cargo's CARGO_* variables, which ring's
# build script watches, and rebuild ring and every crate above it.
cargo build --locked -p node-agent --bin node-agent
cargo build --locked -p node-agent-bench
target/debug/node-agent-bench --quick --agent-bin target/debug/node-agent
target/debug/node-agent-bench --check target/bench/report.json
