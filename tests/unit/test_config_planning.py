"""From a config to routes (with per-destination MTUs) and the table spec: the daemon's pure planning."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, UDP

from podrouter import _native, config
from podrouter.plan import (
    PeerView,
    RoutePlan,
    build_spec,
    engine_settings,
    path_mtu,
    plan_routes,
    refuse_conflicts,
    split_by,
)

REF = """
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
peers:
  - {name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24}
  - {name: node3, address: 172.16.2.3, pod_cidr: 10.244.3.0/24}
"""
N = ipaddress.ip_network


def views(cfg: config.Config) -> list[PeerView]:
    on_link = {"node2": False, "node3": True}
    nh = {"node2": ipaddress.IPv4Address("172.16.2.1"), "node3": ipaddress.IPv4Address("172.16.2.3")}
    return [PeerView(p, on_link[p.name], nh[p.name], "02:00:00:00:00:0" + p.name[-1]) for p in cfg.peers]


def settings(cfg: config.Config) -> dict[str, Any]:
    """node1's start-time settings (the engine config keys the tables are compiled against)."""
    return engine_settings(cfg, "172.16.2.2")


def compiled(cfg: config.Config, peer_views: list[PeerView]) -> Any:
    """The tables the plan asks for each destination's path, compiled from the same views."""
    return _native.Tables(build_spec(cfg, 0, None, peer_views), settings(cfg))


def plan(cfg: config.Config, peer_views: list[PeerView] | None = None) -> list[RoutePlan]:
    peer_views = views(cfg) if peer_views is None else peer_views
    return plan_routes(cfg, peer_views, cfg.pods, 1500, compiled(cfg, peer_views))


def paths(cfg: config.Config) -> dict[str, tuple[str, int | None]]:
    return {str(r.dst): (r.path, r.mtu) for r in plan(cfg)}


def test_split_by_cuts_only_where_a_cut_lies_inside() -> None:
    assert split_by(N("10.244.2.0/24"), [N("10.244.0.0/17")]) == [N("10.244.2.0/24")]
    assert split_by(N("10.244.2.0/24"), [N("10.244.2.0/25")]) == [N("10.244.2.0/25"), N("10.244.2.128/25")]
    pieces = split_by(N("10.244.2.0/24"), [N("10.244.2.64/26"), N("fd00::/8")])
    assert pieces == [N("10.244.2.0/26"), N("10.244.2.64/26"), N("10.244.2.128/25")]
    # the pieces always cover the original exactly
    assert sum(p.num_addresses for p in pieces) == 256


def test_tunnel_mode_mtus_are_underlay_minus_overhead() -> None:
    cfg = config.loads(REF)
    got = paths(cfg)
    assert got["10.244.2.0/24"] == ("vxlan", 1450)
    assert got["10.244.3.0/24"] == ("vxlan", 1450)
    assert got["10.244.1.0/24"] == ("local", None)
    # the cluster catch-all takes the smallest tunnel MTU (the datapath drops it as no_route anyway)
    assert got["10.244.0.0/16"] == ("cluster", 1450)
    # Geneve carries an inner Ethernet frame by default: 50 bytes like VXLAN; 36 with an IP payload
    cfg = config.loads(REF + "tunnel: {protocol: geneve}\n")
    assert paths(cfg)["10.244.2.0/24"] == ("geneve", 1450)
    cfg = config.loads(REF + "tunnel: {protocol: geneve, geneve_payload: ip}\n")
    assert paths(cfg)["10.244.2.0/24"] == ("geneve", 1464)
    # the catch-all takes the largest overhead whatever the payload
    assert paths(cfg)["10.244.0.0/16"] == ("cluster", 1450)


def test_hybrid_on_link_goes_native_with_the_full_mtu() -> None:
    cfg = config.loads(REF + "routing: {mode: hybrid, native_when_on_link: true}\n")
    got = paths(cfg)
    assert got["10.244.3.0/24"] == ("native", 1500)
    assert got["10.244.2.0/24"] == ("vxlan", 1450)


def test_hybrid_native_cidr_splits_a_peer_cidr() -> None:
    cfg = config.loads(REF + "routing: {mode: hybrid, native_cidrs: [10.244.2.0/25]}\n")
    got = paths(cfg)
    assert got["10.244.2.0/25"] == ("native", 1500)
    assert got["10.244.2.128/25"] == ("vxlan", 1450)
    assert got["10.244.3.0/24"] == ("vxlan", 1450)  # native_when_on_link is off


def test_per_peer_overrides() -> None:
    cfg = config.loads("""
node: {name: node1, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
routing: {mode: native}
peers:
  - {name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, mode: tunnel, tunnel_protocol: geneve}
  - {name: node3, address: 172.16.2.3, pod_cidr: 10.244.3.0/24}
""")
    got = paths(cfg)
    assert got["10.244.2.0/24"] == ("geneve", 1450)
    assert got["10.244.3.0/24"] == ("native", 1500)
    # the peer's own mode wins over on-link: the tables say so for every address of its CIDR
    on_link = [replace(v, on_link=True) for v in views(cfg)]
    assert compiled(cfg, on_link).route_paths(["10.244.2.0", "10.244.2.255"]) == ["geneve", "geneve"]
    # an address no peer owns has no peer path (the cluster catch-all takes it)
    assert compiled(cfg, on_link).route_paths(["10.244.9.1", "10.244.1.1"]) == [None, None]
    with pytest.raises(ValueError, match=r"destinations\[0\]: '10.244.2.0/24' is not an IP address"):
        compiled(cfg, on_link).route_paths(["10.244.2.0/24"])


def test_per_peer_geneve_payload_override_sets_the_route_mtu_and_the_spec() -> None:
    cfg = config.loads("""
node: {name: node1, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
tunnel: {protocol: geneve}
peers:
  - {name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, geneve_payload: ip}
  - {name: node3, address: 172.16.2.3, pod_cidr: 10.244.3.0/24}
""")
    assert cfg.tunnel.geneve_payload == "ethernet"
    assert [p.geneve_payload for p in cfg.peers] == ["ip", None]
    got = paths(cfg)
    assert got["10.244.2.0/24"] == ("geneve", 1464)
    assert got["10.244.3.0/24"] == ("geneve", 1450)
    spec = build_spec(cfg, 1, None, views(cfg))
    assert [p["geneve_payload"] for p in spec["peers"]] == ["ip", None]
    # the datapath takes the spec and encapsulates per peer
    t = _native.Tables(spec, settings(cfg))
    v2 = t.classify(raw(IP(src="10.244.1.5", dst="10.244.2.5") / UDP(sport=1000, dport=53)))
    v3 = t.classify(raw(IP(src="10.244.1.5", dst="10.244.3.5") / UDP(sport=1000, dport=53)))
    assert (v2["geneve_payload"], v3["geneve_payload"]) == ("ip", "ethernet")
    assert "vtep_mac" not in v2 and v3["vtep_mac"] == "02:70:ac:10:02:03"


def test_tunnel_mtu_override_applies_to_tunnel_paths_only() -> None:
    cfg = config.loads(REF + "routing: {mode: hybrid, native_when_on_link: true}\ntunnel: {mtu: 1400}\n")
    assert path_mtu(cfg, "vxlan", 1500) == 1400 and path_mtu(cfg, "native", 1500) == 1500
    got = paths(cfg)
    assert got["10.244.2.0/24"] == ("vxlan", 1400) and got["10.244.3.0/24"] == ("native", 1500)


def test_pods_get_host_routes_to_their_veth() -> None:
    cfg = config.loads(REF + "pods: [{name: web, ip: 10.244.1.10, host_interface: veth-web}]\n")
    [pod] = [r for r in plan(cfg) if r.path == "pod"]
    assert (str(pod.dst), pod.dev, pod.peer) == ("10.244.1.10/32", "veth-web", "web")


def test_spec_has_the_documented_shape() -> None:
    cfg = config.loads(
        REF + "routing: {mode: hybrid, native_when_on_link: true}\n"
        "masquerade: {non_masquerade_cidrs: [198.51.100.0/24], port_range: 62000-63000}\n"
    )
    spec = build_spec(cfg, 7, {"ip": "172.16.2.1", "mac": "02:00:00:00:00:01"}, views(cfg))
    assert spec["generation"] == 7
    assert spec["node"] == {"name": "node1", "pod_cidrs": ["10.244.1.0/24"]}
    assert spec["cluster_cidrs"] == ["10.244.0.0/16"]
    assert spec["mode"] == "hybrid" and spec["native_when_on_link"] is True
    assert spec["tunnel"] == {
        "protocol": "vxlan",
        "vni": 1,
        "vxlan_port": 4789,
        "geneve_port": 6081,
        "geneve_payload": "ethernet",
    }
    assert spec["masquerade"] == {
        "enabled": True,
        "non_masquerade_cidrs": ["198.51.100.0/24"],
        "gateway6": None,
    }
    # what the engine reads only at start is not in the swappable spec but in its config
    assert engine_settings(cfg, "172.16.2.2") == {
        "underlay_address": "172.16.2.2",
        "underlay_address6": None,
        "masquerade_port_range": [62000, 63000],
        "masquerade_address6": None,
    }
    node3 = spec["peers"][1]
    assert node3 == {
        "name": "node3",
        "address": "172.16.2.3",
        "pod_cidrs": ["10.244.3.0/24"],
        "mode": None,
        "tunnel_protocol": None,
        "on_link": True,
        "next_hop": {"ip": "172.16.2.3", "mac": "02:00:00:00:00:03"},
        "vtep_mac": None,
        "geneve_payload": None,
    }


# ------------------------------------- the plan's routes agree with the datapath's classifier

CROSS = [
    REF,
    REF + "routing: {mode: hybrid, native_when_on_link: true}\n",
    REF + "routing: {mode: hybrid, native_cidrs: [10.244.2.0/25]}\ntunnel: {protocol: geneve}\n",
    REF + "routing: {mode: native}\n",
    """
node: {name: node1, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
routing: {mode: hybrid, native_cidrs: [10.244.0.0/17]}
peers:
  - {name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, mode: tunnel, tunnel_protocol: geneve}
  - {name: node3, address: 172.16.2.3, pod_cidr: 10.244.200.0/24}
  - {name: node4, address: 172.16.2.4, pod_cidr: 10.244.4.0/24, mode: native}
""",
]


def test_route_paths_match_the_datapath_verdicts() -> None:
    """Every route's path (which decides its MTU) is what `_native.Tables.classify` says for the first
    and last address of that route -- the route MTU can never disagree with the path taken (the plan
    asks the tables for one address of each piece: the pieces must not straddle a native CIDR)."""
    from podrouter import _native
    from podrouter.cli import build_packet

    for text in CROSS:
        cfg = config.loads(text)
        peer_views = [
            PeerView(
                p,
                str(p.address).startswith("172.16.2."),
                ipaddress.IPv4Address("172.16.2.1"),
                "02:00:00:00:00:01",
            )
            for p in cfg.peers
        ]
        spec = build_spec(cfg, 1, {"ip": "172.16.2.1", "mac": "02:00:00:00:00:01"}, peer_views)
        tables = _native.Tables(spec, settings(cfg))
        for r in plan_routes(cfg, peer_views, (), 1500, tables):
            if r.path not in ("native", "vxlan", "geneve"):
                continue
            for addr in (r.dst.network_address + 1, r.dst.broadcast_address - 1):
                v = tables.classify(build_packet("10.244.1.1", str(addr), "udp", 53))
                got = v["verdict"] if v["verdict"] == "native" else v.get("protocol")
                assert got == r.path, (text, str(r.dst), addr, v)


def test_peer_vtep_mac_reaches_the_tables_as_the_vxlan_inner_destination() -> None:
    from podrouter import _native
    from podrouter.cli import build_packet

    cfg = config.loads(
        REF.replace("pod_cidr: 10.244.2.0/24}", "pod_cidr: 10.244.2.0/24, vtep_mac: '3A:1F:9C:44:05:E1'}")
    )
    spec = build_spec(cfg, 1, None, views(cfg))
    assert [p["vtep_mac"] for p in spec["peers"]] == ["3a:1f:9c:44:05:e1", None]
    tables = _native.Tables(spec, settings(cfg))
    # our own VTEP MAC: the synthesized one of our underlay address, as config.vtep_mac_of says
    assert tables.vtep_mac == "02:70:ac:10:02:02" == config.vtep_mac_of(ipaddress.IPv4Address("172.16.2.2"))
    v2 = tables.classify(build_packet("10.244.1.1", "10.244.2.1", "udp", 53))
    v3 = tables.classify(build_packet("10.244.1.1", "10.244.3.1", "udp", 53))
    assert (v2["protocol"], v2["vtep_mac"]) == ("vxlan", "3a:1f:9c:44:05:e1")
    assert v3["vtep_mac"] == "02:70:ac:10:02:03"  # no vtep_mac: the peer's synthesized one
    spec["peers"][0]["vtep_mac"] = "not-a-mac"
    with pytest.raises(ValueError, match=r"peers\[0\]\.vtep_mac: 'not-a-mac' is not a MAC address"):
        _native.Tables(spec, settings(cfg))


DUAL = """
node: {name: node1, address: 172.16.2.2, pod_cidrs: [10.244.1.0/24, 'fd00:10:244:1::/64']}
cluster: {pod_cidrs: [10.244.0.0/16, 'fd00:10:244::/48']}
routing: {mode: hybrid, native_when_on_link: true}
peers:
  - {name: node2, address: 172.16.3.2, pod_cidrs: [10.244.2.0/24, 'fd00:10:244:2::/64']}
  - {name: node3, address: 172.16.2.3, pod_cidrs: [10.244.3.0/24, 'fd00:10:244:3::/64']}
pods: [{name: web, ips: [10.244.1.10, 'fd00:10:244:1::a'], host_interface: veth-web}]
"""


def test_dual_stack_routes_carry_the_path_mtu_for_both_families() -> None:
    cfg = config.loads(DUAL)
    p = paths(cfg)
    assert p["fd00:10:244:2::/64"] == ("vxlan", 1450)
    assert p["fd00:10:244:3::/64"] == ("native", 1500)
    assert p["fd00:10:244::/48"] == ("cluster", 1450)
    assert p["fd00:10:244:1::/64"] == ("local", None)
    pods = {str(r.dst): r.dev for r in plan(cfg) if r.path == "pod"}
    assert pods == {"10.244.1.10/32": "veth-web", "fd00:10:244:1::a/128": "veth-web"}
    spec = build_spec(cfg, 1, None, views(cfg))
    assert spec["node"]["pod_cidrs"] == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert spec["peers"][0]["pod_cidrs"] == ["10.244.2.0/24", "fd00:10:244:2::/64"]


def offered(name: str, address: str, cidr: str) -> PeerView:
    """A peer as discovery offers it."""
    peer = config.PeerConfig(name, ipaddress.ip_address(address), (N(cidr),))
    return PeerView(peer, False, None, None, "etcd")


def test_discovered_peers_are_refused_one_by_one_by_the_core() -> None:
    """refresh_peers' gate (plan.refuse_conflicts): the core's rulebook names each conflicting
    peer; that peer alone is refused, the others are kept, and earlier peers (static first) win."""
    cfg = config.loads(REF)
    candidates = [
        *(PeerView(p, False, None, None) for p in cfg.peers),
        offered("squatter", "172.16.5.9", "10.244.2.0/25"),  # inside node2's pod CIDR
        offered("thief", "172.16.3.2", "10.244.50.0/24"),  # node2's address
        offered("local", "172.16.5.10", "10.244.1.0/26"),  # inside this node's pod CIDR
        offered("far", "2001:db8::9", "10.244.51.0/24"),  # no IPv6 underlay address here
        offered("node2", "172.16.5.11", "10.244.52.0/24"),  # node2's name
        offered("fine", "172.16.5.12", "10.244.53.0/24"),
        offered("inner", "172.16.5.13", "10.244.2.128/26"),  # inside the squatter's only
    ]
    kept, rejected = refuse_conflicts(cfg, candidates, settings(cfg))
    assert [v.peer.name for v in kept] == ["node2", "node3", "fine"]
    assert rejected == {
        "squatter": "pod_cidrs[0]: '10.244.2.0/25' overlaps node2's pod CIDR '10.244.2.0/24'",
        "thief": "address: '172.16.3.2' is also node2",
        "local": "pod_cidrs[0]: '10.244.1.0/26' overlaps node's pod CIDR '10.244.1.0/24'",
        "far": "address: '2001:db8::9' is IPv6, and this node has no IPv6 underlay address "
        "(node.address 172.16.2.2; set node.address6)",
        "node2": "name: 'node2' is also node2",
        "inner": "pod_cidrs[0]: '10.244.2.128/26' overlaps node2's pod CIDR '10.244.2.0/24'",
    }
    # what is kept compiles
    _native.Tables(build_spec(cfg, 0, None, kept), settings(cfg))
    assert refuse_conflicts(cfg, kept, settings(cfg)) == (kept, {})


def test_a_refused_peer_never_blocks_a_younger_one() -> None:
    """refresh_peers' gate admits the candidates one by one (the core's rules::admit): a peer
    whose only conflict is with a peer refused before it is kept, whatever the rule (pod CIDR,
    address); the address-family rule still applies."""
    cfg = config.loads(REF)
    candidates = [
        *(PeerView(p, False, None, None) for p in cfg.peers),
        offered("thief", "172.16.3.2", "10.244.50.0/24"),  # node2's address: refused
        offered("heir", "172.16.5.20", "10.244.50.0/25"),  # inside the thief's pod CIDR only
        offered("squatter", "172.16.5.21", "10.244.2.0/25"),  # inside node2's pod CIDR: refused
        offered("tenant", "172.16.5.21", "10.244.60.0/24"),  # the squatter's address only
        offered("far", "2001:db8::9", "10.244.61.0/24"),  # no IPv6 underlay address here: refused
        offered("near", "172.16.5.22", "10.244.61.0/24"),  # the far one's pod CIDR only
        offered("late", "172.16.5.23", "10.244.61.0/26"),  # inside the near one's, admitted before
    ]
    kept, rejected = refuse_conflicts(cfg, candidates, settings(cfg))
    assert [v.peer.name for v in kept] == ["node2", "node3", "heir", "tenant", "near"]
    assert rejected == {
        "thief": "address: '172.16.3.2' is also node2",
        "squatter": "pod_cidrs[0]: '10.244.2.0/25' overlaps node2's pod CIDR '10.244.2.0/24'",
        "far": "address: '2001:db8::9' is IPv6, and this node has no IPv6 underlay address "
        "(node.address 172.16.2.2; set node.address6)",
        "late": "pod_cidrs[0]: '10.244.61.0/26' overlaps near's pod CIDR '10.244.61.0/24'",
    }
    _native.Tables(build_spec(cfg, 0, None, kept), settings(cfg))
    assert refuse_conflicts(cfg, kept, settings(cfg)) == (kept, {})


def test_a_peer_address_inside_the_cluster_is_refused_not_compiled() -> None:
    """A peer whose address lies in the cluster pod CIDRs (a problem the core files under
    `cluster_cidrs[i]`) is refused by name, so what is kept still compiles."""
    cfg = config.loads(REF)
    candidates = [
        *(PeerView(p, False, None, None) for p in cfg.peers),
        offered("inside", "10.244.90.1", "10.244.62.0/24"),
        offered("fine", "172.16.5.12", "10.244.53.0/24"),
    ]
    kept, rejected = refuse_conflicts(cfg, candidates, settings(cfg))
    assert [v.peer.name for v in kept] == ["node2", "node3", "fine"]
    assert rejected == {"inside": "address: '10.244.90.1' is inside the cluster pod CIDR '10.244.0.0/16'"}
    _native.Tables(build_spec(cfg, 0, None, kept), settings(cfg))
