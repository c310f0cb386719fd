"""podrouter.nftables: the transaction that keeps masquerade replies from the node's stack.

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
