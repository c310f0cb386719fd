"""Config rules of an IPv6 / dual-stack underlay (docs/config.md, "IPv6 underlay"): IPv6 node and peer
addresses are accepted, `node.address6` only next to an IPv4 `node.address`, a peer must be of a family
the node has an underlay address in, masquerade is accepted on an IPv6 underlay (it translates IPv6
pods there, docs/masquerade.md), `masquerade.address6` is checked, and every bad value is
refused naming the key and the value. Also the MTU planning with the 20 bytes of IPv6 outer header."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from podrouter import _native, config
from podrouter.config import ConfigError
from podrouter.plan import PeerView, build_spec, engine_settings, plan_routes

V6_NODE = """
node: {name: node1, address: '2001:db8:2::2', pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
masquerade: {enabled: false}
"""
DUAL_NODE = """
node: {name: node1, address: 172.16.2.2, address6: '2001:db8:2::2', pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.loads(textwrap.dedent(text))
    return exc.value.problems


def test_ipv6_node_and_peer_addresses_are_accepted() -> None:
    cfg = config.loads(
        V6_NODE + "peers: [{name: node2, address: '2001:db8:3::2', pod_cidr: 10.244.2.0/24}]\n"
    )
    assert cfg.node.address == ipaddress.IPv6Address("2001:db8:2::2")
    assert cfg.node.address6 is None
    assert cfg.peers[0].address == ipaddress.IPv6Address("2001:db8:3::2")
    assert config.vtep_mac_of(cfg.node.address) == "02:76:00:00:00:02"


def test_dual_stack_underlay_accepts_peers_of_both_families() -> None:
    cfg = config.loads(
        DUAL_NODE
        + "peers: [{name: node2, address: '2001:db8:3::2', pod_cidr: 10.244.2.0/24},"
        + " {name: node3, address: 172.16.2.3, pod_cidr: 10.244.3.0/24}]\n"
    )
    assert cfg.node.address == ipaddress.IPv4Address("172.16.2.2")
    assert cfg.node.address6 == ipaddress.IPv6Address("2001:db8:2::2")
    assert [p.address.version for p in cfg.peers] == [6, 4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            V6_NODE + "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24}]\n",
            "peers[0].address: '172.16.3.2' is IPv4, and this node's underlay is IPv6 only",
        ),
        (
            "node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n"
            "peers: [{name: node2, address: '2001:db8:3::2', pod_cidr: 10.244.2.0/24}]\n",
            "peers[0].address: '2001:db8:3::2' is IPv6, and this node has no IPv6 underlay address",
        ),
        (
            "node: {name: node1, address: '2001:db8:2::2', address6: '2001:db8:2::3',"
            " pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\nmasquerade: {enabled: false}\n",
            "node.address6: '2001:db8:2::3': node.address '2001:db8:2::2' is already IPv6",
        ),
        (
            "node: {name: node1, address: 172.16.2.2, address6: 172.16.2.3, pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.address6: '172.16.2.3' is not an IPv6 address",
        ),
        (
            "node: {name: node1, address: 172.16.2.2, address6: 'fe80::1', pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.address6: 'fe80::1' is a link-local address",
        ),
        (
            "node: {name: node1, address: '2001:db8::g', pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.address: '2001:db8::g' is not an IP address",
        ),
        (
            "node: {name: node1, address: '::1', pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.address: '::1' is a loopback address",
        ),
        (
            "node: {name: node1, address: '2001:db8:2::2', pod_cidr: 'fd00:10:244:1::/64'}\n"
            "cluster: {pod_cidr: 'fd00:10:244::/48'}\nmasquerade: {address6: 'fd00:10:244:1::9'}\n",
            "masquerade.address6: 'fd00:10:244:1::9' is inside the cluster pod CIDR 'fd00:10:244::/48'",
        ),
        (
            DUAL_NODE + "masquerade: {address6: 10.0.0.1}\n",
            "masquerade.address6: '10.0.0.1' is not 'auto', 'none' or an IPv6 address",
        ),
        (
            DUAL_NODE + "masquerade: {address6: 'fe80::1'}\n",
            "masquerade.address6: 'fe80::1' is a link-local address",
        ),
        (
            DUAL_NODE + "masquerade: {address6: 6}\n",
            "masquerade.address6: 6 is not 'auto', 'none' or an IPv6 address",
        ),
        (
            DUAL_NODE + "peers: [{name: node2, address: '2001:db8:2::2', pod_cidr: 10.244.2.0/24}]\n",
            "peers[0].address: '2001:db8:2::2' is this node's own address",
        ),
        (
            "node: {name: node1, address: '2001:db8:2::2', pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidrs: [10.244.0.0/16, '2001:db8:2::/64']}\nmasquerade: {enabled: false}\n",
            "cluster.pod_cidrs[1]: '2001:db8:2::/64' contains this node's address 2001:db8:2::2",
        ),
    ],
)
def test_ipv6_underlay_problems_name_the_key_and_value(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_underlay_problems_at_start_check_families_not_masquerade() -> None:
    """node.address unset (resolved at start): the families are checked then; masquerade on an
    IPv6 underlay is no problem (it translates the IPv6 pods)."""
    cfg = config.loads(
        "node: {name: node1, pod_cidr: 10.244.1.0/24}\ncluster: {pod_cidr: 10.244.0.0/16}\n"
        "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24}]\n"
    )
    addr = ipaddress.IPv6Address("2001:db8:2::2")
    out = config.underlay_problems(cfg, addr, ipaddress.IPv6Network("2001:db8:2::/64"), None)
    assert any(p.startswith("peers[0].address: '172.16.3.2' is IPv4") for p in out), out
    assert not any(p.startswith("masquerade") for p in out), out


def test_masquerade_on_an_ipv6_underlay_is_accepted_and_address6_parsed() -> None:
    cfg = config.loads(
        "node: {name: node1, address: '2001:db8:2::2', pod_cidrs: [10.244.1.0/24, 'fd00:10:244:1::/64']}\n"
        "cluster: {pod_cidrs: [10.244.0.0/16, 'fd00:10:244::/48']}\n"
    )
    assert cfg.masquerade.enabled and cfg.masquerade.address6 == "auto"
    cfg = config.loads(DUAL_NODE + "masquerade: {address6: none}\n")
    assert cfg.masquerade.address6 == "none"
    cfg = config.loads(DUAL_NODE + "masquerade: {address6: '2001:db8:2::9'}\n")
    assert cfg.masquerade.address6 == ipaddress.IPv6Address("2001:db8:2::9")


def test_the_ipv6_masquerade_address_is_a_start_time_setting_and_its_next_hop_in_the_spec() -> None:
    cfg = config.loads(DUAL_NODE)
    gw6 = {"ip": "2001:db8:2::1", "mac": "02:00:00:00:00:06"}
    settings = engine_settings(cfg, "172.16.2.2", "2001:db8:2::2", "2001:db8:2::2")
    assert settings["masquerade_address6"] == "2001:db8:2::2"
    spec = build_spec(cfg, 1, None, [], gw6)
    assert "address6" not in spec["masquerade"] and spec["masquerade"]["gateway6"] == gw6
    spec = build_spec(cfg, 1, None, [])
    assert spec["masquerade"]["gateway6"] is None
    assert engine_settings(cfg, "172.16.2.2")["masquerade_address6"] is None


def test_route_mtu_takes_the_ipv6_outer_header_per_peer() -> None:
    cfg = config.loads(
        DUAL_NODE
        + "peers: [{name: node2, address: '2001:db8:3::2', pod_cidr: 10.244.2.0/24},"
        + " {name: node3, address: 172.16.3.3, pod_cidr: 10.244.3.0/24, tunnel_protocol: geneve},"
        + " {name: node4, address: '2001:db8:3::4', pod_cidr: 10.244.4.0/24, tunnel_protocol: geneve,"
        + " geneve_payload: ip}]\n"
    )
    views = [PeerView(p, False, None, None) for p in cfg.peers]
    settings = engine_settings(cfg, "172.16.2.2", "2001:db8:2::2")
    tables = _native.Tables(build_spec(cfg, 1, None, views), settings)
    plan = {str(r.dst): r.mtu for r in plan_routes(cfg, views, (), 1500, tables, v6_underlay=True)}
    assert plan["10.244.2.0/24"] == 1430  # VXLAN over IPv6: 1500 - 70
    assert plan["10.244.3.0/24"] == 1450  # Geneve (Ethernet payload) over IPv4: 1500 - 50
    assert plan["10.244.4.0/24"] == 1444  # Geneve with an IP payload over IPv6: 1500 - 36 - 20
    assert plan["10.244.0.0/16"] == 1430  # the cluster catch-all: the smallest
    spec = build_spec(cfg, 1, None, views)
    assert settings["underlay_address6"] == "2001:db8:2::2" and "address6" not in spec["node"]
    assert [p["address"] for p in spec["peers"]] == ["2001:db8:3::2", "172.16.3.3", "2001:db8:3::4"]


def test_native_tables_accept_the_ipv6_spec() -> None:
    from podrouter import _native

    cfg = config.loads(
        V6_NODE + "peers: [{name: node2, address: '2001:db8:3::2', pod_cidr: 10.244.2.0/24}]\n"
    )
    views = [PeerView(p, False, None, None) for p in cfg.peers]
    settings = engine_settings(cfg, "2001:db8:2::2")
    t = _native.Tables(build_spec(cfg, 1, None, views), settings)
    assert t.vtep_mac == "02:76:00:00:00:02"
    # a VXLAN datagram from the peer's IPv6 address is accepted, from an unknown one refused
    hdr = bytearray.fromhex("4500001c0000400040010000" + "0af40201" + "0af40101")
    total = sum(int.from_bytes(hdr[i : i + 2], "big") for i in range(0, 20, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    inner = bytes(hdr) + bytes.fromhex("0000ffff00000000")  # ICMP echo reply, checksum over zeros
    payload = bytes.fromhex("0800000000000100") + bytes(12) + b"\x08\x00" + inner
    assert t.classify_ingress("2001:db8:3::2", 4789, payload)["verdict"] == "accept"
    assert t.classify_ingress("2001:db8:3::9", 4789, payload)["reason"] == "unknown_peer"
    # a mixed spec is refused naming the key
    bad = build_spec(cfg, 1, None, views)
    bad["peers"][0]["address"] = "172.16.3.2"
    with pytest.raises(ValueError, match=r"peers\[0\]\.address"):
        _native.Tables(bad, settings)
