# Sourced by test.sh and bench/ci.sh: installs the Debian packages the tests
# and the benchmark use, pinned to the versions they were written against:
# podman + runc build and run the container image (tests/ops/deploy/);
# nghttp2-client's h2load drives cached serving in the benchmark (bench/ci.sh);
# prometheus (with promtool) checks and unit-tests the alert rules and runs
# them against a real agent (tests/ops/monitoring/); the tests start their
# own server in a temp dir on a loopback port. On a machine with systemd the
# package also starts a prometheus service on :9090 (and, through its
# recommended node-exporter, :9100), which the tests neither use nor mind.
# apt is not touched when exactly these versions are installed already; else
# it runs as root, or through sudo.
SYSTEM_PACKAGES=(
  podman=4.3.1+ds1-8+deb12u1+b3
  runc=1.1.5+ds1-1+deb12u1
  nghttp2-client=1.52.0-1+deb12u3
  prometheus=2.42.0+ds-5+deb12u1
)

system_packages_missing() {
  local spec have
  for spec in "${SYSTEM_PACKAGES[@]}"; do
    have=$(dpkg-query -W -f='${db:Status-Status} ${Version}' "${spec%%=*}" 2>/dev/null || true)
    [ "$have" = "installed ${spec#*=}" ] || echo "$spec"
  done
}

if [ -n "$(system_packages_missing)" ]; then
  if [ "$(id -u)" = 0 ]; then
    SYSTEM_PACKAGES_SUDO=()
  else
    SYSTEM_PACKAGES_SUDO=(sudo)
  fi
  echo "installing Debian packages: $(system_packages_missing | tr '\n' ' ')" >&2
  if ! "${SYSTEM_PACKAGES_SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
    ! "${SYSTEM_PACKAGES_SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --allow-downgrades "${SYSTEM_PACKAGES[@]}" >/dev/null; then
    echo "error: cannot install the Debian packages ${SYSTEM_PACKAGES[*]}" >&2
    return 1 2>/dev/null || exit 1
  fi
  if [ -n "$(system_packages_missing)" ]; then
    echo "error: still not installed as pinned: $(system_packages_missing | tr '\n' ' ')" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
