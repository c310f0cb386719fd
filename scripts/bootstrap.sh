#!/usr/bin/env bash
# Installs everything podrouter's build, tests, demo and benchmarks need on a fresh Debian machine
# (run as root), then builds and installs the wheel. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iproute2 iputils-ping tcpdump tshark iperf3 sockperf nftables ethtool procps
  etcd-server etcd-client containernetworking-plugins bird2
  podman runc busybox-static prometheus openvswitch-switch
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; the default (no) is what we want
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bird2's package enables a system-wide BIRD as well; podrouter and its tests start their own, one per
# namespace (docs/bgp.md), and nothing may run BGP in the root namespace.
if [ -d /run/systemd/system ] && systemctl is-enabled bird >/dev/null 2>&1; then
  systemctl disable --now bird >/dev/null 2>&1 || true
fi

# The Debian prometheus package enables a system-wide service; the tests start their own servers
# (on loopback inside namespaces), so where systemd runs the packaged one is stopped and disabled.
if [ -d /run/systemd/system ] && systemctl is-enabled prometheus >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# Python: one dependency list, pyproject.toml. First its build requirements ([build-system] requires,
# read from the file), because the wheel is built without isolation; then the wheel itself, built by
# maturin from rust/py (release profile) and installed like a user would, with the extras the tests,
# the benchmarks and the linters need ([project.optional-dependencies]).
PIP=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore)
mapfile -t build_requires < <(python3 -c '
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))')
"${PIP[@]}" "${build_requires[@]}"
"${PIP[@]}" --no-build-isolation ".[test,bench,dev]"
hash -r
echo "bootstrap: podrouter $(python3 -c 'import podrouter; print(podrouter.__version__)') installed"
