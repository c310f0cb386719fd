"""podrouter._native without root: version, Tables from a spec dict, classify / classify_ingress on
scapy-built packets for the docs/design.md §8 reference topology, and the errors bad input gets."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import raw

from podrouter import _native

GW_MAC = "02:00:00:00:00:01"
NODE3_MAC = "02:00:00:00:00:03"


def node1_spec() -> dict[str, Any]:
    """node1 in hybrid mode with native_when_on_link: node2 behind the router, node3 on our L2."""
    return {
        "generation": 7,
        "node": {"name": "node1", "pod_cidrs": ["10.244.1.0/24"]},
        "cluster_cidrs": ["10.244.0.0/16"],
        "mode": "hybrid",
        "native_cidrs": [],
        "native_when_on_link": True,
        "tunnel": {"protocol": "vxlan", "vni": 1, "vxlan_port": 4789, "geneve_port": 6081},
        "gateway": {"ip": "172.16.2.1", "mac": GW_MAC},
        "masquerade": {"enabled": True, "non_masquerade_cidrs": []},
        "peers": [
            {"name": "node2", "address": "172.16.3.2", "pod_cidrs": ["10.244.2.0/24"], "mode": None,
             "tunnel_protocol": None, "on_link": False, "next_hop": {"ip": "172.16.2.1", "mac": GW_MAC}},
            {"name": "node3", "address": "172.16.2.3", "pod_cidrs": ["10.244.3.0/24"], "mode": None,
             "tunnel_protocol": None, "on_link": True, "next_hop": {"ip": "172.16.2.3", "mac": NODE3_MAC}},
        ],
    }


# node1's start-time settings (an engine config: the tables are compiled against them)
NODE1 = {"underlay_address": "172.16.2.2", "masquerade_port_range": [61000, 65535]}


def tables_of(spec: Any, **settings: Any) -> Any:
    return _native.Tables(spec, {**NODE1, **settings})


@pytest.fixture(scope="module")
def tables() -> Any:
    return tables_of(node1_spec())


def from_pod1(dst: str) -> bytes:
    return raw(IP(src="10.244.1.1", dst=dst, ttl=63) / TCP(sport=40000, dport=80, flags="S"))


def test_version() -> None:
    assert _native.__version__ == _native.version()
    assert _native.__version__.count(".") == 2


def test_generation_and_repr(tables: Any) -> None:
    assert tables.generation == 7
    assert tables.node_name == "node1"
    assert "node1" in repr(tables)


def test_on_link_peer_goes_native(tables: Any) -> None:
    v = tables.classify(from_pod1("10.244.3.1"))
    assert v["verdict"] == "native"
    assert v["path"] == "native"
    assert v["next_hop"] == "172.16.2.3"
    assert v["next_hop_mac"] == NODE3_MAC


def test_off_link_peer_goes_through_the_tunnel(tables: Any) -> None:
    v = tables.classify(from_pod1("10.244.2.1"))
    assert v == {
        "verdict": "tunnel", "peer": "node2", "protocol": "vxlan", "vni": 1, "remote": "172.16.3.2",
        "port": 4789, "path": "vxlan", "src": "10.244.1.1", "dst": "10.244.2.1",
        "vtep_mac": "02:70:ac:10:03:02",  # the inner Ethernet destination: node2's synthesized VTEP MAC
    }


def test_own_pods_are_local_and_unknown_cluster_addresses_drop(tables: Any) -> None:
    assert tables.classify(from_pod1("10.244.1.20"))["verdict"] == "local"
    v = tables.classify(from_pod1("10.244.200.1"))
    assert (v["verdict"], v["reason"]) == ("drop", "no_route")


def test_outside_the_cluster_is_masqueraded_via_the_gateway(tables: Any) -> None:
    v = tables.classify(raw(IP(src="10.244.1.1", dst="203.0.113.10") / UDP(sport=5000, dport=53)))
    assert v["verdict"] == "masquerade"
    assert v["address"] == "172.16.2.2"
    assert (v["next_hop"], v["next_hop_mac"]) == ("172.16.2.1", GW_MAC)


def test_ipv6_outside_the_cluster_is_masqueraded_to_address6_via_gateway6() -> None:
    from scapy.layers.inet6 import IPv6

    spec = copy.deepcopy(node1_spec())
    spec["node"]["pod_cidrs"].append("fd00:10:244:1::/64")
    spec["cluster_cidrs"].append("fd00:10:244::/48")
    gw6 = {"ip": "2001:db8:2::1", "mac": "02:00:00:00:00:06"}
    spec["masquerade"].update(gateway6=gw6)
    t = tables_of(spec, masquerade_address6="2001:db8:2::2")
    pkt = raw(IPv6(src="fd00:10:244:1::1", dst="2001:db8:ff::10") / UDP(sport=5000, dport=53))
    v = t.classify(pkt)
    assert v["verdict"] == "masquerade" and v["address"] == "2001:db8:2::2", v
    assert (v["next_hop"], v["next_hop_mac"]) == (gw6["ip"], gw6["mac"])
    # without address6: untranslated, natively via the gateway
    spec["masquerade"].update(gateway6=None)
    assert tables_of(spec).classify(pkt)["verdict"] == "native"
    # an IPv6-only underlay: IPv4 pods have no address to be translated to
    spec["gateway"] = gw6
    spec["peers"] = []
    spec["masquerade"].update(gateway6=gw6)
    t = tables_of(spec, underlay_address="2001:db8:2::2", masquerade_address6="2001:db8:2::2")
    assert t.classify(pkt)["verdict"] == "masquerade"
    v4 = t.classify(raw(IP(src="10.244.1.1", dst="203.0.113.10") / UDP(sport=5000, dport=53)))
    assert (v4["verdict"], v4["reason"]) == ("drop", "no_route"), v4


def test_peer_protocol_override_and_mode_override() -> None:
    spec = node1_spec()
    spec["peers"][0]["tunnel_protocol"] = "geneve"
    spec["peers"][1]["mode"] = "tunnel"
    t = tables_of(spec)
    v2 = t.classify(from_pod1("10.244.2.9"))
    assert (v2["verdict"], v2["protocol"], v2["port"], v2["path"]) == ("tunnel", "geneve", 6081, "geneve")
    v3 = t.classify(from_pod1("10.244.3.9"))
    assert (v3["verdict"], v3["remote"], v3["protocol"]) == ("tunnel", "172.16.2.3", "vxlan")


@pytest.mark.parametrize("data,reason", [
    (b"", "truncated"),
    (b"\x45\x00\x00", "truncated"),
    (b"\x75" + bytes(40), "unsupported"),
])
def test_bad_bytes_are_a_drop_verdict_not_an_exception(tables: Any, data: bytes, reason: str) -> None:
    v = tables.classify(data)
    assert v["verdict"] == "drop"
    assert v["reason"] in (reason, "malformed")


def vxlan_payload(src: str, dst: str, vni: int = 1) -> bytes:
    return raw(VXLAN(vni=vni, flags=0x08) / Ether() / IP(src=src, dst=dst) / UDP(sport=1, dport=2) / b"hi")


def test_classify_ingress_accepts_a_valid_peer_datagram(tables: Any) -> None:
    v = tables.classify_ingress("172.16.3.2", 4789, vxlan_payload("10.244.2.1", "10.244.1.1"))
    assert v["verdict"] == "accept"
    assert (v["peer"], v["protocol"], v["vni"], v["path"]) == ("node2", "vxlan", 1, "vxlan")
    assert (v["src"], v["dst"]) == ("10.244.2.1", "10.244.1.1")


@pytest.mark.parametrize("outer,port,payload,reason", [
    ("198.51.100.7", 4789, vxlan_payload("10.244.2.1", "10.244.1.1"), "unknown_peer"),
    ("172.16.3.2", 4789, vxlan_payload("10.244.3.1", "10.244.1.1"), "spoofed_inner_source"),
    ("172.16.3.2", 4789, vxlan_payload("10.244.2.1", "10.244.3.1"), "not_local_destination"),
    ("172.16.3.2", 4789, vxlan_payload("10.244.2.1", "10.244.1.1", vni=9), "bad_vni"),
    ("172.16.3.2", 4789, b"\x00" * 8 + raw(Ether() / IP()), "bad_vxlan_flags"),
    ("172.16.3.2", 4789, b"\x08\x00", "truncated"),
    ("172.16.3.2", 9999, vxlan_payload("10.244.2.1", "10.244.1.1"), "unsupported"),
])
def test_classify_ingress_drops(tables: Any, outer: str, port: int, payload: bytes, reason: str) -> None:
    v = tables.classify_ingress(outer, port, payload)
    assert (v["verdict"], v["reason"]) == ("drop", reason)


def test_classify_ingress_bad_outer_address_is_a_value_error(tables: Any) -> None:
    with pytest.raises(ValueError, match="outer_src"):
        tables.classify_ingress("not-an-ip", 4789, b"")


def _set(spec: dict[str, Any], path: list[Any], value: Any) -> None:
    d: Any = spec
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


@pytest.mark.parametrize("path,value,key", [
    (["peers", 0, "pod_cidrs", 0], "10.244.2.0/33", "peers[0].pod_cidrs[0]"),
    (["node", "address"], "nope", "node.address"),
    (["mode"], "fast", "mode"),
    (["tunnel", "protocol"], "gre", "tunnel.protocol"),
    (["tunnel", "vni"], "one", "tunnel.vni"),
    (["tunnel", "vxlan_port"], 70000, "tunnel.vxlan_port"),
    (["gateway", "mac"], "zz:zz", "gateway.mac"),
    (["peers", 1, "next_hop", "ip"], "300.1.1.1", "peers[1].next_hop.ip"),
    (["masquerade", "port_range"], [1], "masquerade.port_range"),
    (["native_cidrs"], "10.0.0.0/8", "native_cidrs"),
    (["nodes"], {}, "nodes"),
    (["peers", 0, "colour"], "red", "peers[0].colour"),
    (["peers", 0, "on_link"], 1, "peers[0].on_link"),
    (["tunnel", "vni"], True, "tunnel.vni"),
    (["peers"], {"node2": {}}, "peers"),
    (["masquerade", "port_range"], "61000-65535", "masquerade.port_range"),
    (["peers", 0, "name"], None, "peers[0].name"),
])
def test_bad_spec_names_the_key(path: list[Any], value: Any, key: str) -> None:
    spec = node1_spec()
    _set(spec, path, value)
    with pytest.raises(ValueError) as e:
        tables_of(spec)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_spec_messages_say_what_is_wrong() -> None:
    """The typed spec (rust/py/src/spec.rs) names the key and says what is wrong with the value."""
    for path, value, message in [
        (["peers", 0, "colour"], "red", "peers[0].colour: unknown key"),
        (["tunnel", "vni"], True, "tunnel.vni: True is not an integer"),
        (["tunnel", "vxlan_port"], 70000, "tunnel.vxlan_port: 70000 is out of range"),
        (["native_cidrs"], "10.0.0.0/8", "native_cidrs: must be a list"),
        (["node"], None, "node: missing"),
        (["peers", 0, "on_link"], "yes", "peers[0].on_link: 'yes' is not a boolean"),
    ]:
        spec = node1_spec()
        _set(spec, path, value)
        with pytest.raises(ValueError) as e:
            tables_of(spec)
        assert str(e.value) == message
    spec = node1_spec()
    spec["peers"][0][7] = "x"  # a key that is not a string never selects a field
    with pytest.raises(ValueError, match=r"^peers\[0\]"):
        tables_of(spec)


def test_missing_node_and_non_dict_spec() -> None:
    spec = node1_spec()
    del spec["node"]
    with pytest.raises(ValueError, match=r"^node: missing"):
        tables_of(spec)
    with pytest.raises(ValueError, match="spec"):
        _native.Tables([], NODE1)  # type: ignore[arg-type]


@pytest.mark.parametrize("settings,message", [
    ({"masquerade_port_range": [1]}, "masquerade_port_range: must be [first, last]"),
    ({"masquerade_port_range": "61000-65535"}, "masquerade_port_range: must be a list"),
    ({"masquerade_port_range": [65000, 64000]}, "masquerade.port_range: [65000, 64000] is not a port range"),
    ({"underlay_address": "nope"}, "underlay_address: 'nope' is not an IP address"),
    ({"masquerade_address6": "10.0.0.1"}, "masquerade_address6: '10.0.0.1' is not an IPv6 address"),
    ({"underlay_address": "2001:db8:2::2", "underlay_address6": "2001:db8:2::3"},
     "node.address6: 2001:db8:2::3: node.address is already IPv6"),
])
def test_bad_start_time_settings_name_the_key(settings: dict[str, Any], message: str) -> None:
    """The start-time settings are not keys of the table spec (a spec that carries one is refused:
    `node.address: unknown key`) but of the engine config the tables are compiled against."""
    with pytest.raises(ValueError) as e:
        tables_of(node1_spec(), **settings)
    assert str(e.value) == message
    spec = node1_spec()
    spec["masquerade"]["port_range"] = [61000, 65535]
    with pytest.raises(ValueError, match=r"^masquerade\.port_range: unknown key$"):
        tables_of(spec)


def test_core_rejections_name_the_key() -> None:
    # A peer pod CIDR outside the cluster CIDRs is refused by the core (Tables::build).
    spec = copy.deepcopy(node1_spec())
    spec["peers"][0]["pod_cidrs"] = ["192.168.0.0/24"]
    with pytest.raises(ValueError, match=r"^peers\[0\]\.pod_cidrs"):
        tables_of(spec)


@pytest.mark.parametrize("cfg,key", [
    ({"underlay_address": "nope"}, "underlay_address"),
    ({}, "underlay_address"),
    ({"underlay_address": "172.16.2.2", "workers": 0}, "workers"),
    ({"underlay_address": "172.16.2.2", "underlay_mac": "xx"}, "underlay_mac"),
    ({"underlay_address": "172.16.2.2", "tun_mtu": 20}, "tun_mtu"),
    ({"underlay_address": "172.16.2.2", "vxlan_port": 6081}, "geneve_port"),
    ({"underlay_address": "172.16.2.2", "tun": "x"}, "tun"),
    ({"underlay_address": "172.16.2.2", "offload": "yes"}, "offload"),
])
def test_bad_datapath_config_is_refused_before_anything_is_created(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as e:
        _native.Datapath(cfg)
    assert str(e.value).startswith(f"{key}:"), str(e.value)
