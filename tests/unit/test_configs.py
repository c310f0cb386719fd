"""Every example in configs/ is valid; bad configs make `podrouter check` / `run` exit 2 with one line
per problem naming the key path and the value, and never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from podrouter import config
from podrouter.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"node1-hybrid.yaml", "tunnel-geneve.yaml", "native.yaml", "etcd.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.node.name
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: ok" in result.output


def test_reference_example_describes_the_reference_topology() -> None:
    cfg = config.load(CONFIGS / "node1-hybrid.yaml")
    assert cfg.routing.mode == "hybrid" and cfg.routing.native_when_on_link
    assert {p.name: str(p.address) for p in cfg.peers} == {"node2": "172.16.3.2", "node3": "172.16.2.3"}


BASE = yaml.safe_load((CONFIGS / "node1-hybrid.yaml").read_text())

# (what to change in the reference example, the line `podrouter check` must print)
BAD = [
    (
        {"routing": {"mode": "hybrid", "native_cidrs": ["10.244.0.0/33"]}},
        "routing.native_cidrs[0]: '10.244.0.0/33' is not a CIDR",
    ),
    ({"routing": {"mode": "bgp"}}, "routing.mode: 'bgp' is not one of: tunnel, native, hybrid"),
    (
        {"routing": {"native_when_on_lnk": True}},
        "routing.native_when_on_lnk: unknown key (did you mean 'native_when_on_link'?)",
    ),
    ({"tunnel": {"protocol": "wireguard"}}, "tunnel.protocol: 'wireguard' is not one of: vxlan, geneve"),
    ({"tunnel": {"vni": 1 << 24}}, "tunnel.vni: 16777216 is out of range (0..16777215)"),
    ({"tunnel": {"port": 70000}}, "tunnel.port: 70000 is out of range (1..65535)"),
    ({"tunnel": {"mtu": "max"}}, "tunnel.mtu: 'max' is not 'auto' or an integer"),
    (
        {"masquerade": {"port_range": "65535-1024"}},
        "masquerade.port_range: '65535-1024' is empty (start 65535 is above end 1024)",
    ),
    (
        {"masquerade": {"port_range": "100-2000"}},
        "masquerade.port_range: '100-2000' must lie within 1024-65535",
    ),
    (
        {"masquerade": {"non_masquerade_cidrs": ["198.51.100.0/40"]}},
        "masquerade.non_masquerade_cidrs[0]: '198.51.100.0/40' is not a CIDR",
    ),
    (
        {"node": {"name": "node1", "pod_cidr": "10.244.1.0/24", "address": "172.16.2.256"}},
        "node.address: '172.16.2.256' is not an IP address",
    ),
    (
        {"node": {"name": "node1", "pod_cidr": "10.245.1.0/24"}},
        "node.pod_cidr: '10.245.1.0/24' is not inside the cluster pod CIDRs ['10.244.0.0/16']",
    ),
    (
        {"cluster": {"pod_cidr": "10.244.0.0/16", "service_cidr": "10.96.0.0/12"}},
        "cluster.service_cidr: unknown key (allowed: pod_cidr, pod_cidrs, name, id)",
    ),
    (
        {"peers": [{"name": "node2", "address": "172.16.3.2", "pod_cidr": "10.244.1.0/24"}]},
        "peers[0].pod_cidr: '10.244.1.0/24' overlaps node's pod CIDR '10.244.1.0/24'",
    ),
    (
        {
            "peers": [
                {"name": "node2", "address": "172.16.3.2", "pod_cidr": "10.244.2.0/24", "mode": "hybrid"}
            ]
        },
        "peers[0].mode: 'hybrid' is not one of: native, tunnel",
    ),
    (
        {"peers": [{"name": "node2", "address": "172.16.3", "pod_cidr": "10.244.2.0/24"}]},
        "peers[0].address: '172.16.3' is not an IP address",
    ),
    (
        {"discovery": {"backend": "etcd", "etcd": {"endpoints": ["etcd:2379"]}}},
        "discovery.etcd.endpoints[0]: 'etcd:2379' is not an http(s)://host:port URL",
    ),
    (
        {"discovery": {"backend": "etcd", "etcd": {"lease_ttl": 0}}},
        "discovery.etcd.lease_ttl: 0 is out of range (2..3600)",
    ),
    (
        {"pods": [{"name": "pod1", "ip": "10.244.3.1", "host_interface": "veth-pod1"}]},
        "pods[0].ip: '10.244.3.1' is not inside this node's pod CIDRs",
    ),
    ({"pods": [{"name": "pod1", "ip": "10.244.1.1"}]}, "pods[0].host_interface: is required"),
    (
        {"api": {"socket": "podrouter.sock"}},
        "api.socket: 'podrouter.sock' is not an absolute path of at most 107 bytes",
    ),
    ({"metrics": {"listen": "127.0.0.1"}}, "metrics.listen: '127.0.0.1' is not host:port"),
    ({"bandwidth": "on"}, "bandwidth: 'on' is not a mapping"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_exits_2_with_the_message(tmp_path: Path, change: dict, message: str) -> None:
    bad = {**BASE, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert message in lines, lines
    assert "Traceback" not in result.output
    # `run` refuses the same config the same way, before touching anything (no root needed to see it)
    result = CliRunner().invoke(main, ["run", "--config", str(path)])
    assert result.exit_code == 2 and message in result.stderr.splitlines()


def test_several_problems_print_one_line_each_from_the_real_entry_point(tmp_path: Path) -> None:
    bad = {**BASE, "routing": {"mode": "hybrid", "native_cidrs": ["10.244.0.0/33"]}, "tunnel": {"vni": -3}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "podrouter.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "routing.native_cidrs[0]: '10.244.0.0/33' is not a CIDR",
        "tunnel.vni: -3 is out of range (0..16777215)",
    ]
    assert proc.stdout == ""


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("node:\n  name: node1\n  pod_cidr: [10.244.1.0/24\ncluster: {}\n")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}:4:")
    assert "invalid YAML" in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read the config file" in result.stderr
