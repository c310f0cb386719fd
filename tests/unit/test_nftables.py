"""podrouter.nftables: the masquerade reply guard and the pod egress guard transactions.

The kernel side (the table really drops the originals, the daemon installs and removes it) is
tested as root in tests/integration/test_masquerade.py; here only what needs no privileges.
"""

from __future__ import annotations

import pytest

from podrouter import nftables


def test_guard_replaces_the_table_atomically_and_drops_tcp_and_udp_only() -> None:
    cmds = nftables.guard_commands("172.16.2.2", (61000, 65535))
    table = {"family": "ip", "name": "podrouter"}
    # add + delete + add in one transaction: a leftover table is replaced, a missing one created
    assert cmds[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    chain = cmds[3]["add"]["chain"]
    # before conntrack (-200), so dropped replies never create conntrack entries
    assert (chain["hook"], chain["prio"], chain["policy"]) == ("prerouting", -300, "accept")
    rules = [c["add"]["rule"] for c in cmds[4:]]
    assert len(rules) == 2
    for rule, proto in zip(rules, ("tcp", "udp"), strict=True):
        e = rule["expr"]
        assert e[0]["match"]["left"] == {"payload": {"protocol": "ip", "field": "daddr"}}
        assert e[0]["match"]["right"] == "172.16.2.2"
        assert e[1]["match"]["left"] == {"payload": {"protocol": proto, "field": "dport"}}
        assert e[1]["match"]["right"] == {"range": [61000, 65535]}
        assert e[-1] == {"drop": None}


@pytest.mark.parametrize(
    ("addr", "ports"),
    [
        ("node1.example", (61000, 65535)),  # libnftables would resolve a name through DNS
        ("2001:db8::1", (61000, 65535)),
        ("172.16.2.2", (0, 10)),
        ("172.16.2.2", (62000, 61000)),
        ("172.16.2.2", (61000, 70000)),
    ],
)
def test_guard_refuses_what_is_not_an_ipv4_literal_and_a_port_range(
    addr: str, ports: tuple[int, int]
) -> None:
    with pytest.raises(ValueError):
        nftables.guard_commands(addr, ports)


def test_the_ipv6_guard_is_the_same_table_in_family_ip6() -> None:
    cmds = nftables.guard_commands("2001:db8:2::2", (61000, 65535), nftables.FAMILY6)
    table = {"family": "ip6", "name": "podrouter"}
    assert cmds[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    assert cmds[3]["add"]["chain"]["family"] == "ip6"
    rules = [c["add"]["rule"] for c in cmds[4:]]
    assert [r["family"] for r in rules] == ["ip6", "ip6"]
    for rule, proto in zip(rules, ("tcp", "udp"), strict=True):
        e = rule["expr"]
        assert e[0]["match"]["left"] == {"payload": {"protocol": "ip6", "field": "daddr"}}
        assert e[0]["match"]["right"] == "2001:db8:2::2"
        assert e[1]["match"]["left"] == {"payload": {"protocol": proto, "field": "dport"}}
        assert e[-1] == {"drop": None}
    assert nftables.family_of("2001:db8:2::2") == "ip6" and nftables.family_of("172.16.2.2") == "ip"
    for bad, fam in (("172.16.2.2", "ip6"), ("node1.example", "ip6"), ("2001:db8::1", "inet")):
        with pytest.raises(ValueError):
            nftables.guard_commands(bad, (61000, 65535), fam)


# ------------------------------------------------------------------------------ pod egress guard


def test_pod_guard_is_a_prerouting_raw_chain_and_a_forward_leak_guard_with_named_counters() -> None:
    cmds = nftables.pod_guard_commands(
        [("veth-pod1", ["10.244.1.1", "fd00:10:244:1::1"]), ("veth-pod4", ["10.244.1.2"])],
        [("172.16.3.2", 4789), ("172.16.3.2", 6081)],
        ["10.244.1.0/24", "fd00:10:244:1::/64"],
        ["10.244.0.0/16", "10.244.2.0/24", "fd00:10:244::/48"],
        ["172.16.2.1"],
        ["192.0.2.0/24"],
    )
    table = {"family": "inet", "name": "podrouter_pods"}
    assert cmds[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert [(c["hook"], c["prio"], c["policy"]) for c in chains] == [
        ("prerouting", -300, "accept"),
        ("forward", 0, "accept"),
    ]
    counters = {c["add"]["counter"]["name"] for c in cmds if "counter" in c.get("add", {})}
    assert counters == {"spoofed_pod_source", "pod_tunnel_port", "pod_unrouted"}
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    # every drop is counted under one of the three reasons; the leak guard's in its own chain
    for rule in rules:
        expr = rule["expr"]
        if {"drop": None} in expr:
            reason = {
                "pod_egress": ("spoofed_pod_source", "pod_tunnel_port"),
                "pod_unrouted": ("pod_unrouted",),
            }
            assert any({"counter": r} in expr for r in reason[rule["chain"]]), rule
    leak = [r["expr"] for r in rules if r["chain"] == "pod_unrouted"]
    # first the two ways out that are the datapath's or a local pod's, then the drops
    assert leak[0][0]["match"]["right"] == "podr0" and leak[1][0]["match"]["right"] == "@pod_ifaces"
    assert any(
        {
            "match": {
                "op": "==",
                "left": {"rt": {"key": "nexthop", "family": "ip"}},
                "right": "@masq_gateways4",
            }
        }
        in e
        for e in leak
    )
    elems = {
        c["add"]["element"]["name"]: c["add"]["element"]["elem"]
        for c in cmds
        if "element" in c.get("add", {})
    }
    assert elems["pod_ifaces"] == ["veth-pod1", "veth-pod4"]
    assert elems["pod_src4"] == [
        {"concat": ["veth-pod1", "10.244.1.1"]},
        {"concat": ["veth-pod4", "10.244.1.2"]},
    ]
    assert elems["pod_src6"] == [{"concat": ["veth-pod1", "fd00:10:244:1::1"]}]
    assert elems["tunnel_endpoints"] == [{"concat": ["172.16.3.2", 4789]}, {"concat": ["172.16.3.2", 6081]}]
    assert elems["node_cidrs4"] == [{"prefix": {"addr": "10.244.1.0", "len": 24}}]
    # overlapping prefixes are merged (an interval set refuses them)
    assert elems["cluster_cidrs4"] == [{"prefix": {"addr": "10.244.0.0", "len": 16}}]
    assert elems["cluster_cidrs6"] == [{"prefix": {"addr": "fd00:10:244::", "len": 48}}]
    assert elems["masq_gateways4"] == ["172.16.2.1"]
    assert elems["non_masq4"] == [{"prefix": {"addr": "192.0.2.0", "len": 24}}]


def test_pod_guard_ipv6_tunnel_endpoints_go_to_their_own_set() -> None:
    cmds = nftables.pod_guard_elements([], [("2001:db8:3::2", 4789), ("172.16.3.2", 6081)], [])
    elems = {
        c["add"]["element"]["name"]: c["add"]["element"]["elem"]
        for c in cmds
        if "element" in c.get("add", {})
    }
    assert elems["tunnel_endpoints"] == [{"concat": ["172.16.3.2", 6081]}]
    assert elems["tunnel_endpoints6"] == [{"concat": ["2001:db8:3::2", 4789]}]


def test_pod_guard_update_flushes_every_set_in_one_transaction() -> None:
    cmds = nftables.pod_guard_elements([], [], [])
    # nothing registered: every set flushed, nothing added (an empty element list is an error)
    assert [c["flush"]["set"]["name"] for c in cmds] == [
        "pod_ifaces",
        "pod_src4",
        "pod_src6",
        "tunnel_endpoints",
        "tunnel_endpoints6",
        "node_cidrs4",
        "node_cidrs6",
        "cluster_cidrs4",
        "cluster_cidrs6",
        "masq_gateways4",
        "masq_gateways6",
        "non_masq4",
        "non_masq6",
    ]


def test_leak_guard_ipv6_gateway_rule_and_sets() -> None:
    """The IPv6 twin of the masquerade gateway rule: a pod's IPv6 packet (source in this node's
    IPv6 pod CIDRs, destination outside `non_masq6`) the kernel routes to the IPv6 gateway is
    dropped and counted; each family's gateways and non-masquerade CIDRs go to their own sets."""
    cmds = nftables.pod_guard_commands(
        [("veth-pod1", ["10.244.1.1", "fd00:10:244:1::1"])],
        [],
        ["10.244.1.0/24", "fd00:10:244:1::/64"],
        ["10.244.0.0/16", "fd00:10:244::/48"],
        ["2001:db8:2::1", "172.16.2.1", "fe80::1"],
        ["192.0.2.0/24", "2001:db8:99::/48", "2001:db8:99:1::/64"],
    )
    sets = {c["add"]["set"]["name"]: c["add"]["set"] for c in cmds if "set" in c.get("add", {})}
    assert sets["masq_gateways6"]["type"] == "ipv6_addr" and "flags" not in sets["masq_gateways6"]
    assert sets["non_masq6"]["type"] == "ipv6_addr" and sets["non_masq6"]["flags"] == ["interval"]
    leak = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    leak = [r for r in leak if r["chain"] == "pod_unrouted"]
    v6 = [r["expr"] for r in leak if {"match": _rt_nexthop("ip6", "@masq_gateways6")} in r["expr"]]
    assert v6 == [
        [
            {"match": {"op": "==", "left": _ip6("saddr"), "right": "@node_cidrs6"}},
            {"match": {"op": "!=", "left": _ip6("daddr"), "right": "@non_masq6"}},
            {"match": _rt_nexthop("ip6", "@masq_gateways6")},
            {"counter": "pod_unrouted"},
            {"drop": None},
        ]
    ]
    # after the accepts into the datapath and to local pods, like the IPv4 rule
    assert leak[-1]["expr"] == v6[0] and {"match": _rt_nexthop("ip", "@masq_gateways4")} in leak[-2]["expr"]
    elems = {
        c["add"]["element"]["name"]: c["add"]["element"]["elem"]
        for c in cmds
        if "element" in c.get("add", {})
    }
    assert elems["masq_gateways4"] == ["172.16.2.1"]
    # a link-local gateway is kept as it is: it is what `rt ip6 nexthop` reads from the route
    assert elems["masq_gateways6"] == ["2001:db8:2::1", "fe80::1"]
    assert elems["non_masq4"] == [{"prefix": {"addr": "192.0.2.0", "len": 24}}]
    assert elems["non_masq6"] == [{"prefix": {"addr": "2001:db8:99::", "len": 48}}]  # merged
    # no IPv6 gateway (IPv6 masquerade off): the set is flushed and left empty, the rule matches nothing
    cmds = nftables.pod_guard_elements([], [], ["fd00:10:244:1::/64"], [], ["172.16.2.1"], [])
    names = {c["add"]["element"]["name"] for c in cmds if "element" in c.get("add", {})}
    assert "masq_gateways6" not in names and "masq_gateways4" in names
    assert {"flush": {"set": {"family": "inet", "table": "podrouter_pods", "name": "masq_gateways6"}}} in cmds
    with pytest.raises(ValueError):
        nftables.pod_guard_elements([], [], [], [], ["gateway.example"], [])


def _rt_nexthop(family: str, right: str) -> dict[str, object]:
    return {"op": "==", "left": {"rt": {"key": "nexthop", "family": family}}, "right": right}


def _ip6(field: str) -> dict[str, object]:
    return {"payload": {"protocol": "ip6", "field": field}}


@pytest.mark.parametrize(
    ("pods", "endpoints"),
    [
        ([("veth-a", ["pod1.example"])], []),  # libnftables would resolve a name through DNS
        ([("", ["10.244.1.1"])], []),
        ([("a-name-longer-than-15", ["10.244.1.1"])], []),
        ([('veth"x', ["10.244.1.1"])], []),
        ([], [("node2.example", 4789)]),
        ([], [("fd00::1", 0)]),
        ([], [("172.16.3.2", 0)]),
    ],
)
def test_pod_guard_refuses_names_and_bad_values(
    pods: list[tuple[str, list[str]]], endpoints: list[tuple[str, int]]
) -> None:
    with pytest.raises(ValueError):
        nftables.pod_guard_elements(pods, endpoints, ["10.244.1.0/24"])


def test_gso_tap_frames_leave_both_chains_first() -> None:
    """The GSO TAP's frames (only the daemon writes them) pay one interface-name compare in
    prerouting, before any set lookup, and skip the leak guard's drops; the spoof checks test the
    address before the interface set (most packets from no pod fail the address)."""
    cmds = nftables.pod_guard_commands([("veth-pod1", ["10.244.1.1"])], [], ["10.244.1.0/24"])
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    tap = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "podrgso*"}}
    egress = [r["expr"] for r in rules if r["chain"] == "pod_egress"]
    assert egress[0] == [tap, {"accept": None}]
    assert [tap] == [e for e in egress[0] if "match" in e]  # the only match of the first rule
    for expr, field in zip(egress[1:3], ("@node_cidrs4", "@node_cidrs6"), strict=True):
        assert expr[0]["match"]["right"] == field
        assert expr[1]["match"] == {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@pod_ifaces"}
        assert expr[-1] == {"drop": None}
    leak = [r["expr"] for r in rules if r["chain"] == "pod_unrouted"]
    assert leak[2] == [tap, {"accept": None}]
    assert all({"drop": None} in e for e in leak[3:])
