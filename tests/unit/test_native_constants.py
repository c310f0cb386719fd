"""The numbers the Rust core decides, as `_native` exports them, and the copies the control plane keeps
for validating configs without loading `_native` (python/podrouter/config.py): each copy equals the
native value, and the values are the documented ones (docs/architecture.md, "Constants")."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from podrouter import _native, config, metrics, native
from podrouter.demo import cluster


def test_config_copies_equal_the_native_values() -> None:
    assert config.DEFAULT_PORTS == {"vxlan": _native.VXLAN_PORT, "geneve": _native.GENEVE_PORT}
    assert config.DEFAULT_PORT_RANGE == _native.MASQUERADE_PORT_RANGE
    assert config.TUNNEL_SOURCE_PORTS == (_native.TUNNEL_SOURCE_PORT_MIN, _native.TUNNEL_SOURCE_PORT_MAX)
    assert config.VNI_MAX == _native.MAX_VNI
    assert config.NAT_DEFAULT_MAX_ENTRIES == _native.NAT_DEFAULT_MAX_ENTRIES
    assert config.NAT_MAX_ENTRIES == _native.NAT_MAX_ENTRIES
    assert tuple(_native.NAT_DEFAULT_TIMEOUTS) == config.NAT_TIMEOUTS
    assert metrics.PATHS == cluster.PATHS == _native.PATHS
    for n in (0, 1, 63, 64, 65, 511, 512, 513, 4096, config.NAT_DEFAULT_MAX_ENTRIES, config.NAT_MAX_ENTRIES):
        assert config.default_max_entries_per_pod(n) == _native.default_max_entries_per_pod(n), n


def test_native_values_are_the_documented_ones() -> None:
    assert (_native.VXLAN_PORT, _native.GENEVE_PORT) == (4789, 6081)
    assert _native.MASQUERADE_PORT_RANGE == (61000, 65535)
    assert (_native.TUNNEL_SOURCE_PORT_MIN, _native.TUNNEL_SOURCE_PORT_MAX) == (49152, 60999)
    assert _native.MAX_VNI == (1 << 24) - 1
    assert (_native.NAT_DEFAULT_MAX_ENTRIES, _native.NAT_MAX_ENTRIES) == (1 << 20, 1 << 26)
    assert _native.NAT_DEFAULT_TIMEOUTS == {
        "tcp_syn_sent": 120,
        "tcp_established": 7440,
        "tcp_fin_wait": 120,
        "tcp_time_wait": 120,
        "tcp_close": 10,
        "udp_unreplied": 30,
        "udp_assured": 120,
        "icmp": 30,
    }
    overheads = (
        _native.VXLAN_OVERHEAD,
        _native.GENEVE_OVERHEAD,
        _native.GENEVE_IP_OVERHEAD,
        _native.OUTER_V6_EXTRA,
    )
    assert overheads == (50, 50, 36, 20)


def test_daemon_overheads_come_from_the_core() -> None:
    assert native.encap_overhead("vxlan") == _native.VXLAN_OVERHEAD
    assert native.encap_overhead("geneve") == _native.GENEVE_OVERHEAD
    assert native.encap_overhead("geneve", ip_payload=True) == _native.GENEVE_IP_OVERHEAD
    assert native.encap_overhead("vxlan", v6_outer=True) == 70
    assert native.encap_overhead("geneve", v6_outer=True, ip_payload=True) == 56
    with pytest.raises(KeyError):
        native.encap_overhead("native")


@pytest.mark.parametrize(
    ("address", "mac"),
    [
        ("172.16.3.2", "02:70:ac:10:03:02"),
        ("10.0.0.255", "02:70:0a:00:00:ff"),
        ("fd00:172:16::2", "02:76:00:00:00:02"),
        ("2001:db8::a:bcde:f012", "02:76:bc:de:f0:12"),
    ],
)
def test_vtep_mac_rule(address: str, mac: str) -> None:
    assert _native.vtep_mac(address) == mac
    assert config.vtep_mac_of(ipaddress.ip_address(address)) == mac


def test_vtep_mac_refuses_what_is_no_address() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        _native.vtep_mac("172.16.3")


def test_validating_a_config_does_not_load_native() -> None:
    """The copies exist so that importing config (and `podrouter check`'s validation) stays free of
    the native module; vtep_mac_of loads it on first use only."""
    code = (
        "import sys; from podrouter import config; "
        "assert 'podrouter._native' not in sys.modules, 'config imported _native'; "
        "import ipaddress; config.vtep_mac_of(ipaddress.ip_address('10.1.2.3')); "
        "assert 'podrouter._native' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
