#!/usr/bin/env bash
# The test command: installs the pinned peers (Envoy 1.40.0, OpenBao 2.7.2) and
# runs every test, unit and integration, against them. Extra arguments go to
# `cargo test` (e.g. ./test.sh --test envoy_mtls).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/peers.sh
echo "peers: $(envoy --version 2>&1 | grep -o 'version: [^ ]*' | head -1); $(bao version | head -1)"
exec cargo test --locked "$@"
