"""Configs that would cut a node off or break its datapath are refused (issue 10): masquerade ports
colliding with the tunnel, pod space swallowing the underlay, unusable peer addresses, etcd TLS/auth.
Every problem names the key and the value."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from podrouter import config
from podrouter.cli import main
from podrouter.config import TUNNEL_SOURCE_PORTS, ConfigError

BASE = """
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.loads(textwrap.dedent(text))
    return exc.value.problems


def test_tunnel_source_ports_are_disjoint_from_the_default_masquerade_range() -> None:
    lo, hi = config.DEFAULT_PORT_RANGE
    assert TUNNEL_SOURCE_PORTS == (49152, 60999)
    assert TUNNEL_SOURCE_PORTS[1] < lo <= hi
    config.loads(BASE)  # the defaults pass their own check


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("masquerade: {port_range: 4000-9000}", "the vxlan port 4789 (tunnel.port)"),
        ("masquerade: {port_range: 4000-9000}", "the geneve port 6081 (the IANA geneve port)"),
        (
            "tunnel: {port: 62000}\nmasquerade: {port_range: 61000-65535}",
            "the vxlan port 62000 (tunnel.port)",
        ),
        ("masquerade: {port_range: 50000-52000}", "the tunnel sender's outer source ports 49152-60999"),
        ("masquerade: {port_range: 60999-61999}", "the tunnel sender's outer source ports 49152-60999"),
        ("metrics: {listen: '127.0.0.1:62000'}", "the metrics port 62000 (metrics.listen)"),
    ],
)
def test_masquerade_range_must_not_cover_node_ports(extra: str, needle: str) -> None:
    probs = problems(BASE + extra + "\n")
    hits = [p for p in probs if p.startswith("masquerade.port_range: '") and needle in p]
    assert hits, probs


def test_masquerade_range_beside_the_node_ports_is_fine() -> None:
    cfg = config.loads(BASE + "masquerade: {port_range: 61000-61999}\nmetrics: {listen: '127.0.0.1:9965'}\n")
    assert cfg.masquerade.port_range == (61000, 61999)
    # disabled masquerade is still checked: a reload may enable it, and the range is restart-only
    assert problems(BASE + "masquerade: {enabled: false, port_range: 4000-9000}\n")


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0"])
def test_cluster_cidr_of_slash_zero_is_refused(cidr: str) -> None:
    text = f"""
    node: {{name: node1, pod_cidr: 10.244.1.0/24}}
    cluster: {{pod_cidrs: [10.244.0.0/16, '{cidr}']}}
    """
    if cidr == "0.0.0.0/0":
        text = "node: {name: node1, pod_cidr: 10.244.1.0/24}\ncluster: {pod_cidr: 0.0.0.0/0}\n"
    probs = problems(text)
    assert any(f"'{cidr}' covers every address" in p and p.startswith("cluster.pod_cidr") for p in probs), (
        probs
    )


def test_native_cidr_of_slash_zero_is_refused() -> None:
    probs = problems(BASE + "routing: {mode: hybrid, native_cidrs: [0.0.0.0/0]}\n")
    assert "routing.native_cidrs[0]: '0.0.0.0/0' covers every address" in probs


def test_cluster_cidr_containing_the_node_or_a_peer_address_is_refused() -> None:
    probs = problems("""
    node: {name: node1, address: 10.1.0.2, pod_cidr: 10.1.200.0/24}
    cluster: {pod_cidr: 10.0.0.0/8}
    peers:
      - {name: node2, address: 10.1.0.3, pod_cidr: 10.1.201.0/24}
    """)
    assert "cluster.pod_cidr: '10.0.0.0/8' contains this node's address 10.1.0.2 (node.address)" in probs
    assert "cluster.pod_cidr: '10.0.0.0/8' contains peers[0].address 10.1.0.3" in probs


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "is a loopback address"),
        ("224.0.0.5", "is a multicast address"),
        ("0.0.0.0", "is the unspecified address"),
        ("169.254.1.1", "is a link-local address"),
        ("255.255.255.255", "is the broadcast address"),
    ],
)
def test_unusable_peer_addresses(address: str, why: str) -> None:
    probs = problems(BASE + f"peers:\n  - {{name: node2, address: '{address}', pod_cidr: 10.244.2.0/24}}\n")
    assert f"peers[0].address: '{address}' {why}" in probs


def test_peer_with_this_nodes_address_is_refused() -> None:
    probs = problems(BASE + "peers:\n  - {name: node2, address: 172.16.2.2, pod_cidr: 10.244.2.0/24}\n")
    assert "peers[0].address: '172.16.2.2' is this node's own address" in probs


def test_underlay_problems_at_start() -> None:
    """What only the node's namespace knows (the resolved underlay) is checked before any change."""
    cfg = config.loads("""
    node: {name: node1, pod_cidr: 172.16.99.0/24}
    cluster: {pod_cidr: 172.16.0.0/16}
    peers:
      - {name: node2, address: 172.17.0.3, pod_cidr: 172.16.98.0/24}
    """)
    v4 = ipaddress.IPv4Address
    probs = config.underlay_problems(
        cfg, v4("172.16.2.2"), ipaddress.IPv4Network("172.16.2.0/24"), v4("172.16.2.1")
    )
    assert "cluster.pod_cidr: '172.16.0.0/16' contains this node's underlay address 172.16.2.2" in probs
    assert "cluster.pod_cidr: '172.16.0.0/16' contains the underlay gateway 172.16.2.1" in probs
    probs = config.underlay_problems(cfg, v4("172.17.0.3"), ipaddress.IPv4Network("172.16.0.0/12"), None)
    assert "cluster.pod_cidr: '172.16.0.0/16' overlaps the underlay subnet 172.16.0.0/12" in probs
    assert "peers[0].address: '172.17.0.3' is this node's own address" in probs
    ok = config.loads(BASE)
    assert (
        config.underlay_problems(
            ok, v4("172.16.2.2"), ipaddress.IPv4Network("172.16.2.0/24"), v4("172.16.2.1")
        )
        == []
    )


def test_etcd_tls_and_auth_keys() -> None:
    cfg = config.loads(
        BASE
        + """discovery:
  backend: etcd
  etcd:
    endpoints: ['https://10.0.0.1:2379']
    ca_file: /etc/podrouter/etcd-ca.pem
    cert_file: /etc/podrouter/node.pem
    key_file: /etc/podrouter/node.key
    username: podrouter
    password: s3cret
"""
    )
    e = cfg.discovery.etcd
    assert (e.ca_file, e.cert_file, e.key_file) == (
        "/etc/podrouter/etcd-ca.pem",
        "/etc/podrouter/node.pem",
        "/etc/podrouter/node.key",
    )
    assert (e.username, e.password) == ("podrouter", "s3cret")
    assert "s3cret" not in repr(cfg)


def test_etcd_tls_and_auth_problems() -> None:
    probs = problems(
        BASE
        + """discovery:
  backend: etcd
  etcd:
    endpoints: ['http://10.0.0.1:2379']
    ca_file: relative/ca.pem
"""
    )
    assert "discovery.etcd.ca_file: 'relative/ca.pem' is not an absolute file path" in probs
    probs = problems(BASE + "discovery: {etcd: {endpoints: ['http://10.0.0.1:2379'], cert_file: /c.pem}}\n")
    assert any(p.startswith("discovery.etcd.key_file: is required") for p in probs), probs
    probs = problems(BASE + "discovery: {etcd: {endpoints: ['http://10.0.0.1:2379'], ca_file: /ca.pem}}\n")
    want = "discovery.etcd.endpoints[0]: 'http://10.0.0.1:2379' is not https:// but ca_file"
    assert any(p.startswith(want) for p in probs), probs
    probs = problems(BASE + "discovery: {etcd: {username: podrouter}}\n")
    assert any(p.startswith("discovery.etcd.password: is required") for p in probs), probs
    probs = problems(BASE + "discovery: {etcd: {username: podrouter, password: 7}}\n")
    assert "discovery.etcd.password: (hidden) is not a non-empty string without control characters" in probs
    cfg = config.loads(BASE + "discovery: {etcd: {username: u, password: p}}\n")
    assert any("sent over plain http://" in w for w in cfg.warnings)


def test_check_cli_exits_2_naming_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent("""
        node: {name: node1, pod_cidr: 10.244.1.0/24}
        cluster: {pod_cidr: 0.0.0.0/0}
        masquerade: {port_range: 4000-9000}
        peers:
          - {name: node2, address: 127.0.0.1, pod_cidr: 10.244.2.0/24}
        """)
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 2
    out = result.output
    assert "cluster.pod_cidr: '0.0.0.0/0' covers every address" in out
    assert "masquerade.port_range: '4000-9000' overlaps the vxlan port 4789 (tunnel.port)" in out
    assert "peers[0].address: '127.0.0.1' is a loopback address" in out
