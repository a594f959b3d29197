#!/usr/bin/env bash
# Builds node-agent's container image FROM scratch (see Containerfile) with
# podman, and optionally runs it. These are the exact commands CI runs
# (tests/ops/deploy/ calls this script).
#
#   scripts/image.sh [--binary PATH] [--tag TAG] [--smoke]
#
#   --binary PATH  put this node-agent binary in the image instead of building
#                  `cargo build --release --locked` (the tests pass the one they
#                  built; it links the same libraries)
#   --tag TAG      image name (default localhost/node-agent:<version>)
#   --smoke        then run `node-agent --version` in the image, as the image's
#                  user, read-only, without capabilities or network
#
# Needs podman and runc (Debian: apt-get install -y podman runc).
# PODMAN_RUN_FLAGS holds the flags every `podman run` of the image needs on
# the machine (printed by `scripts/image.sh --print-run-flags`).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=""
TAG=""
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BIN="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --print-run-flags) PRINT_FLAGS=1; shift ;;
    *) echo "usage: $0 [--binary PATH] [--tag TAG] [--smoke]" >&2; exit 2 ;;
  esac
done

# On the CI machines podman's default runtime (crun) refuses their hybrid
# cgroup layout ("cgroups in hybrid mode not supported") and raising
# RLIMIT_NOFILE/RLIMIT_NPROC to podman's defaults is not permitted; runc and
# explicit limits work there and everywhere else.
PODMAN_RUN_FLAGS="${PODMAN_RUN_FLAGS:---runtime runc --ulimit nofile=16384:16384 --ulimit nproc=4096:4096}"
if [ "${PRINT_FLAGS:-0}" = 1 ]; then
  echo "$PODMAN_RUN_FLAGS"
  exit 0
fi

if [ -z "$BIN" ]; then
  cargo build --release --locked --bin node-agent
  BIN=target/release/node-agent
fi
VERSION=$("$BIN" --version | awk '{print $2}')
TAG="${TAG:-localhost/node-agent:$VERSION}"

CTX=$(mktemp -d "${TMPDIR:-/tmp}/node-agent-image.XXXXXX")
trap 'rm -rf "$CTX"' EXIT
ROOT="$CTX/rootfs"
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc/ssl/certs" "$ROOT/tmp"
chmod 1777 "$ROOT/tmp"

# The binary, without its debug symbols.
cp "$BIN" "$ROOT/usr/local/bin/node-agent"
strip "$ROOT/usr/local/bin/node-agent"

# Every shared library it links, at the path the loader looks for it.
for lib in $(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done

# The non-root user, name resolution through files then DNS (glibc's nss_files
# and nss_dns are part of libc.so.6), and the system's CA certificates so
# that a Vault with a publicly trusted certificate needs no VAULT_TLS_ROOT_CERT.
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:node-agent:/nonexistent:/sbin/nologin\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ROOT/etc/group"
printf 'hosts: files dns\n' >"$ROOT/etc/nsswitch.conf"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi

cp Containerfile "$CTX/Containerfile"
podman build --quiet \
  --label org.opencontainers.image.title=node-agent \
  --label org.opencontainers.image.version="$VERSION" \
  --tag "$TAG" --file "$CTX/Containerfile" "$CTX" >/dev/null
echo "built $TAG ($(du -sh "$ROOT" | cut -f1) of files)"

if [ "$SMOKE" = 1 ]; then
  # shellcheck disable=SC2086
  podman run --rm $PODMAN_RUN_FLAGS --network none --read-only --cap-drop ALL "$TAG" --version
fi
