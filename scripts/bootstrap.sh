#!/usr/bin/env bash
# Installs everything podrouter's build, tests, demo and benchmarks need on a fresh Debian machine
# (run as root), then builds and installs the wheel. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  iproute2 iputils-ping tcpdump tshark iperf3 sockperf nftables ethtool procps
  etcd-server containernetworking-plugins bird2
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
# bird2's package enables a system-wide BIRD; podrouter and its tests start their own, one per
# namespace (docs/bgp.md), and nothing may run BGP in the root namespace
if command -v systemctl >/dev/null && systemctl is-enabled bird >/dev/null 2>&1; then
  systemctl disable --now bird >/dev/null 2>&1 || true
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  "rust-just>=1.30" "maturin>=1.5,<2" \
  "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6" "scapy>=2.5" \
  "click>=8.1" "PyYAML>=6" "pyroute2>=0.7.12" "prometheus-client>=0.19" "matplotlib>=3.7" \
  "ruff>=0.5" "mypy>=1.8" types-PyYAML

# the wheel, built by maturin from rust/py (release profile), installed like a user would
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-build-isolation .
hash -r
echo "bootstrap: podrouter $(python3 -c 'import podrouter; print(podrouter.__version__)') installed"
