"""BGP and cluster-mesh pieces that need no root: the config keys and their messages, the bird.conf
podrouter writes (checked by BIRD itself with `bird -p`), the control-socket reply parser, the metric
families and the mesh's overlap rules."""

# ruff: noqa: E501  (the case tables read best one case per line)
from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from podrouter import bgp, clustermesh, config
from podrouter.config import ConfigError, PeerConfig
from podrouter.discovery import etcd
from podrouter.metrics import bgp_families

BASE = """
node: {name: node1, address: 172.16.2.2, pod_cidrs: [10.244.1.0/24, "fd00:10:244:1::/64"]}
cluster: {name: east, id: 1, pod_cidrs: [10.244.0.0/16, "fd00:10:244::/48"]}
"""
GOOD_BGP = """
bgp:
  enabled: true
  asn: 64512
  graceful_restart_time: 60
  peers:
    - {address: 172.16.2.1, asn: 64500, hold_time: 6, connect_retry: 1, password: "s3cr et"}
    - {address: 10.9.9.9, asn: 64512}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.loads(textwrap.dedent(BASE + text))
    return exc.value.problems


def test_bgp_keys_and_defaults() -> None:
    cfg = config.loads(BASE + GOOD_BGP)
    b = cfg.bgp
    assert b.enabled and b.asn == 64512 and b.router_id is None and b.graceful_restart_time == 60
    assert b.peers[0].address == ipaddress.IPv4Address("172.16.2.1") and b.peers[0].hold_time == 6
    assert b.peers[1].port == 179 and b.peers[1].hold_time == 90 and b.peers[1].connect_retry == 5
    assert config.loads(BASE).bgp.enabled is False


@pytest.mark.parametrize(
    ("section", "want"),
    [
        ("bgp: {enabled: true, asn: 0, peers: [{address: 1.2.3.4, asn: 1}]}", "bgp.asn: 0 is out of range"),
        ("bgp: {enabled: true, asn: 65535, peers: [{address: 1.2.3.4, asn: 1}]}", "bgp.asn: 65535 is a reserved"),
        ("bgp: {enabled: true, asn: 'x', peers: [{address: 1.2.3.4, asn: 1}]}", "bgp.asn: 'x' is not an integer"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 1.2.3.4, asn: 23456}]}", "bgp.peers[0].asn: 23456"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 'fe80::1', asn: 2}]}", "bgp.peers[0].address: 'fe80::1'"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 224.0.0.5, asn: 2}]}", "is not a unicast address"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 172.16.2.2, asn: 2}]}", "this node's own address"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 1.2.3.4, asn: 2}, {address: 1.2.3.4, asn: 3}]}",
         "bgp.peers[1].address: '1.2.3.4' is also bgp.peers[0]"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 1.2.3.4, asn: 2, hold_time: 1}]}", "hold_time: 1"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 1.2.3.4, asn: 2, hold: 9}]}", "did you mean 'hold_time'"),
        ("bgp: {enabled: true, asn: 1, peers: [{address: 1.2.3.4}]}", "bgp.peers[0].asn: is required"),
        ("bgp: {enabled: true, peers: [{address: 1.2.3.4, asn: 2}]}", "bgp.asn: is required"),
        ("bgp: {enabled: true, asn: 1}", "bgp.peers: needs at least one peer"),
        ("bgp: {enabled: true, asn: 1, router_id: 300.0.0.1, peers: [{address: 1.2.3.4, asn: 2}]}",
         "bgp.router_id: '300.0.0.1'"),
        ("bgp: {graceful_restart_time: 5000}", "bgp.graceful_restart_time: 5000 is out of range"),
    ],
)  # fmt: skip
def test_bad_bgp_is_refused_with_key_and_value(section: str, want: str) -> None:
    got = problems(section)
    assert any(want in p for p in got), got


def test_a_bad_password_is_refused_without_echoing_it() -> None:
    got = problems('bgp: {enabled: true, asn: 1, peers: [{address: 1.2.3.4, asn: 2, password: "ab\\"cd"}]}')
    assert got == ["bgp.peers[0].password: is not 1-80 printable ASCII characters without '\"' or '\\'"]


def test_clustermesh_keys_and_refusals() -> None:
    mesh = """
    clustermesh:
      clusters:
        - {name: west, id: 2, etcd: {endpoints: ["http://10.0.0.5:2379"], prefix: /w}, mode: hybrid}
    """
    cfg = config.loads(BASE + textwrap.dedent(mesh))
    assert (cfg.cluster_name, cfg.cluster_id) == ("east", 1)
    (c,) = cfg.clustermesh.clusters
    assert (c.name, c.id, c.mode, c.tunnel_protocol) == ("west", 2, "hybrid", None)
    assert c.etcd.endpoints == ("http://10.0.0.5:2379",) and c.etcd.prefix == "/w"
    bad = """
    clustermesh:
      clusters:
        - {name: east, id: 1, etcd: {endpoints: ["http://x:1"]}}
        - {name: north, id: 256, etcd: {endpoints: ["ftp://x"]}}
        - {name: south, id: 3, etcd: {endpoints: ["http://x:1"]}, mode: warp}
        - {name: west, id: 4, etcd: {endpoints: ["http://x:1"]}, pod_cidr: 10.244.128.0/17}
    """
    got = problems(textwrap.dedent(bad))
    assert "clustermesh.clusters[0].name: 'east' is also cluster.name" in got
    assert "clustermesh.clusters[0].id: 1 is also cluster.id" in got
    assert "clustermesh.clusters[1].id: 256 is out of range (1..255)" in got
    assert "clustermesh.clusters[1].etcd.endpoints[0]: 'ftp://x' is not an http(s)://host:port URL" in got
    assert "clustermesh.clusters[2].mode: 'warp' is not one of: tunnel, native, hybrid" in got
    assert (
        "clustermesh.clusters[3].pod_cidr: '10.244.128.0/17' overlaps cluster.pod_cidr '10.244.0.0/16'" in got
    )
    no_ident = "node: {name: n, pod_cidr: 10.244.1.0/24}\ncluster: {pod_cidr: 10.244.0.0/16}\n"
    with pytest.raises(ConfigError) as exc:
        config.loads(no_ident + "clustermesh: {clusters: [{name: w, id: 2, etcd: {}}]}")
    assert (
        "cluster.name: is required when clustermesh.clusters is set (unique in the mesh)"
        in exc.value.problems
    )


def test_bird_conf_is_what_bird_accepts(tmp_path: Path) -> None:
    cfg = config.loads(BASE + GOOD_BGP)
    local = ipaddress.IPv4Address("172.16.2.2")

    def on_link(a: ipaddress.IPv4Address) -> bool:
        return str(a).startswith("172.16.2.")

    # no IPv6 address on the underlay interface: IPv4 only, no ipv6 channel
    text = bgp.render_config(cfg, local, on_link)
    assert "route 10.244.1.0/24 unreachable;" in text
    assert "fd00" not in text and "ipv6" not in text
    assert "neighbor 172.16.2.1 port 179 as 64500;" in text and "  direct;" in text
    assert "neighbor 10.9.9.9 port 179 as 64512;" in text and "  multihop;" in text
    assert "graceful restart time 60;" in text and "next hop self;" in text and "import none;" in text
    # the first connect after 1 s (BIRD's default is 5 s), then every connect_retry seconds
    assert text.count("connect delay time 1;") == 2 and "connect retry time 1;" in text
    assert bgp.announced_cidrs(cfg) == [ipaddress.ip_network("10.244.1.0/24")]
    empty = bgp.render_config(cfg, local, lambda a: True, announce=False)
    assert "route " not in empty

    # a link-local next hop: the v6 pod CIDR goes out on the ipv6 channel of the direct session only
    # (a link-local address means nothing to a multihop peer)
    ll = ipaddress.IPv6Address("fe80::a8c1:abff:fe00:1")
    text6 = bgp.render_config(cfg, local, on_link, next_hop6=ll)
    assert "protocol static podr_pods6 {\n  ipv6;\n  route fd00:10:244:1::/64 unreachable;\n}" in text6
    peer0, peer1 = text6.split("protocol bgp peer0")[1].split("protocol bgp peer1")
    assert "  ipv6 {" in peer0 and f"next hop address {ll};" in peer0
    assert 'export where proto = "podr_pods6";' in peer0 and "local 172.16.2.2 as 64512;" in peer0
    assert "ipv6" not in peer1
    assert bgp.announced_cidrs(cfg, ll) == [
        ipaddress.ip_network("10.244.1.0/24"),
        ipaddress.ip_network("fd00:10:244:1::/64"),
    ]
    # a global one serves every session
    glob = ipaddress.IPv6Address("2001:db8::2")
    text6g = bgp.render_config(cfg, local, on_link, next_hop6=glob)
    assert text6g.count("next hop address 2001:db8::2;") == 2
    assert bgp.carries_ipv6(glob, direct=False) and not bgp.carries_ipv6(ll, direct=False)
    assert not bgp.carries_ipv6(None, direct=True)
    # cleanup: the same channels, nothing in them (End-of-RIB on ipv6 too drops the stale routes)
    empty6 = bgp.render_config(cfg, local, on_link, announce=False, next_hop6=ll)
    assert (
        "route " not in empty6
        and "protocol static podr_pods6" in empty6
        and "next hop address fe80::" in empty6
    )
    # no IPv6 pod CIDR: no ipv6 channel even with an IPv6 address
    v4only = config.loads(BASE.replace(', "fd00:10:244:1::/64"', "") + GOOD_BGP)
    assert "ipv6" not in bgp.render_config(v4only, local, on_link, next_hop6=ll)

    bird = shutil.which("bird") or "/usr/sbin/bird"
    for i, t in enumerate((text, empty, text6, text6g, empty6)):
        f = tmp_path / f"b{i}.conf"
        f.write_text(t)
        r = subprocess.run([bird, "-p", "-c", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, (r.stderr, t)


def test_status_lists_ipv6_cidrs_without_a_carrying_session(tmp_path: Path) -> None:
    """What status reports before BIRD answers (no control socket here): IPv6 pod CIDRs count as
    announced only if some session carries the ipv6 channel."""
    cfg = config.loads(BASE + GOOD_BGP + f"api: {{socket: {tmp_path}/api.sock}}\n")
    local = ipaddress.IPv4Address("172.16.2.2")
    sp = bgp.BgpSpeaker(cfg, local, lambda a: str(a).startswith("172.16.2."))
    sp.next_hop6 = ipaddress.IPv6Address("fe80::1")  # link-local: only the direct peer0 carries it
    st = sp.status()
    assert st["error"] and st["prefixes"] == ["10.244.1.0/24", "fd00:10:244:1::/64"] and st["not_announced"] == []
    assert [x["ipv6"] for x in st["sessions"]] == [True, False] and st["next_hop6"] == "fe80::1"
    sp.on_link = lambda a: False  # both peers multihop: nobody can use a link-local next hop
    st = sp.status()
    assert st["prefixes"] == ["10.244.1.0/24"] and st["not_announced"] == ["fd00:10:244:1::/64"]
    sp.next_hop6 = None
    assert sp.status()["not_announced"] == ["fd00:10:244:1::/64"] and sp.status()["next_hop6"] is None


def test_control_reply_parser() -> None:
    import io

    raw = (
        b"2002-Name       Proto      Table      State  Since         Info\n"
        b"1002-peer0      BGP        ---        up     12:00:00.000  Established   \n"
        b"1006-  BGP state:          Established\n"
        b"        Neighbor address: 172.16.2.1\n"
        b"      Channel ipv4\n"
        b"      Routes:         0 imported, 1 exported, 0 preferred\n"
        b"      Channel ipv6\n"
        b"      Routes:         0 imported, 1 exported, 0 preferred\n"
        b"1002-peer1      BGP        ---        start  12:00:00.000  Active        Socket: Connection refused\n"
        b"1006-  BGP state:          Active\n"
        b"      Last error:       Socket: Connection refused\n"
        b"0000 \n"
    )
    reply = bgp._read_reply(io.BytesIO(raw))
    protos = bgp.parse_protocols(reply)
    assert protos["peer0"]["bgp_state"] == "Established" and protos["peer0"]["exported"] == 2
    assert (
        protos["peer1"]["state"] == "start" and protos["peer1"]["last_error"] == "Socket: Connection refused"
    )
    # cleanup stops waiting for a peer whose connection was refused, not for one that is up
    assert bgp.connection_refused(protos["peer1"]) and not bgp.connection_refused(protos["peer0"])
    assert not bgp.connection_refused({"last_error": "Hold timer expired"}) and not bgp.connection_refused({})
    with pytest.raises(bgp.BgpError, match="syntax error"):
        bgp._read_reply(io.BytesIO(b"9001 syntax error, unexpected CF_SYM_UNDEFINED\n"))
    with pytest.raises(bgp.BgpError):
        bgp._read_reply(io.BytesIO(b"1002-truncated\n"))


def test_metric_families() -> None:
    status: dict[str, Any] = {
        "enabled": True,
        "announced_prefixes": 1,
        "sessions": [{"peer": "172.16.2.1", "up": True}, {"peer": "10.9.9.9", "up": False}],
    }
    fams = {f.name: f for f in bgp_families(status)}
    up = {s.labels["peer"]: s.value for s in fams["podrouter_bgp_session_up"].samples}
    assert up == {"172.16.2.1": 1.0, "10.9.9.9": 0.0}
    assert fams["podrouter_bgp_announced_prefixes"].samples[0].value == 1.0
    assert list(bgp_families({"enabled": False})) == []


class _Local:
    name = "static"

    def __init__(self, peers: tuple[PeerConfig, ...]) -> None:
        self._peers = peers

    def peers(self) -> tuple[PeerConfig, ...]:
        return self._peers

    def sources(self) -> dict[str, str]:
        return {p.name: "static" for p in self._peers}


def _peer(name: str, addr: str, cidr: str) -> PeerConfig:
    return PeerConfig(name, ipaddress.IPv4Address(addr), (ipaddress.ip_network(cidr),))


def test_mesh_refuses_claims_on_our_space_and_cross_cluster_overlaps() -> None:
    text = BASE + textwrap.dedent("""
    clustermesh:
      clusters:
        - {name: west, id: 2, etcd: {endpoints: ["http://127.0.0.1:1"]}}
        - {name: north, id: 3, etcd: {endpoints: ["http://127.0.0.1:1"]}, mode: native, tunnel_protocol: geneve, geneve_payload: ip}
    """)  # fmt: skip
    cfg = config.loads(text)
    m = clustermesh.MeshDiscovery(cfg, _Local((_peer("node2", "172.16.3.2", "10.244.2.0/24"),)))  # type: ignore[arg-type]
    west, north = m.remotes
    # west's registry: one good node, one claiming east's space (refused by the remote's own check)
    assert west._conflict(_peer("rogue", "172.16.9.9", "10.244.1.0/25"), {}) == (
        "pod CIDR 10.244.1.0/25 overlaps this cluster's (east) pod CIDR 10.244.0.0/16"
    )
    west._found = {"node3": _peer("node3", "172.16.2.3", "10.245.3.0/24")}
    north._found = {
        "n1": _peer("n1", "172.16.5.2", "10.245.3.128/25"),  # overlaps west's node3: refused
        "n2": _peer("n2", "172.16.5.3", "10.246.2.0/24"),
    }
    peers = {p.name: p for p in m.peers()}
    assert set(peers) == {"node2", "west.node3", "north.n2"}
    assert peers["north.n2"].mode == "native" and peers["north.n2"].tunnel_protocol == "geneve"
    assert peers["north.n2"].geneve_payload == "ip" and peers["west.node3"].geneve_payload is None
    assert peers["west.node3"].mode == "tunnel"
    assert m.sources()["west.node3"] == "cluster:west" and m.sources()["node2"] == "static"
    st = m.mesh_status()
    assert st["cluster"] == {"name": "east", "id": 1}
    (n,) = [c for c in st["clusters"] if c["name"] == "north"]
    assert "north.n1" in n["rejected"] and "west.node3" in n["rejected"]["north.n1"]
    assert n["state"] == "unreachable, keeping 2 last known nodes"


def test_a_remote_registry_is_judged_by_the_core_oldest_first() -> None:
    """A remote cluster's records against this cluster's space, its declared space and each other
    (the core's rules, worded per cluster); a refused older record does not block a younger one."""
    text = BASE + textwrap.dedent("""
    clustermesh:
      clusters:
        - {name: west, id: 2, etcd: {endpoints: ["http://127.0.0.1:1"]}, pod_cidrs: [10.245.0.0/16]}
    """)  # fmt: skip
    (west,) = clustermesh.MeshDiscovery(config.loads(text), _Local(())).remotes
    pre = west.prefix

    def rec(name: str, address: str, cidr: str) -> tuple[str, str]:
        return pre + name, json.dumps({"name": name, "address": address, "pod_cidrs": [cidr]})

    entries = [
        rec("claim", "172.16.9.1", "10.244.0.0/15"),  # holds our space (and the next one's)
        rec("a", "172.16.9.2", "10.245.1.0/24"),
        rec("b", "172.16.9.3", "10.245.1.128/25"),  # inside a's
        rec("c", "172.16.9.2", "10.245.2.0/24"),  # a's address
        rec("d", "172.16.9.4", "10.246.0.0/24"),  # outside west's declared space
        rec("e", "10.245.9.9", "10.245.3.0/24"),  # its address is inside west's pod space
        rec("f", "172.16.9.5", "10.245.4.0/24"),
    ]
    found, rejected = west._select([(k, i + 1, v) for i, (k, v) in enumerate(entries)])
    assert set(found) == {"a", "f"}, rejected
    assert rejected == {
        pre + "claim": "pod CIDR 10.244.0.0/15 overlaps this cluster's (east) pod CIDR 10.244.0.0/16",
        pre + "b": "pod CIDRs overlap those of west node a",
        pre + "c": "address 172.16.9.2 is already a's",
        pre + "d": "pod CIDR 10.246.0.0/24 is outside cluster west's pod CIDRs (10.245.0.0/16)",
        pre + "e": "address 10.245.9.9 is inside cluster west's pod CIDR 10.245.0.0/16",
    }


def test_refusals_are_logged_once_per_reason_by_each_registry(caplog: pytest.LogCaptureFixture) -> None:
    """The local etcd registry and a remote cluster's store a selection the same way (one
    `EtcdDiscovery._publish`): a refused key is logged when it is new or its reason changed, each
    with its own registry's label, and the daemon hears only of a changed usable set."""
    text = BASE + textwrap.dedent("""
    clustermesh:
      clusters:
        - {name: west, id: 2, etcd: {endpoints: ["http://127.0.0.1:1"]}}
    """)  # fmt: skip
    (west,) = clustermesh.MeshDiscovery(config.loads(text), _Local(())).remotes
    local = etcd.EtcdDiscovery(config.loads(BASE), "172.16.2.2")
    for reg, label in ((local, "etcd entry"), (west, "cluster mesh west entry")):
        calls: list[str] = []
        reg._on_change = calls.append
        caplog.clear()
        node = {"n3": _peer("n3", "172.16.2.3", "10.245.3.0/24")}
        reg._publish(node, {"k/a": "bad A"})
        reg._publish(node, {"k/a": "bad A"})  # the same: no second line, no second notice
        reg._publish(node, {"k/a": "bad B", "k/b": "bad"})
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [f"ignoring {label} k/a: bad A", f"ignoring {label} k/a: bad B", f"ignoring {label} k/b: bad"]
        assert len(calls) == 1 and reg._found == node and reg._rejected == {"k/a": "bad B", "k/b": "bad"}
        reg._stop.set()
