"""config.py: parsing, defaults, and every problem reported with its key path and bad value."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from podrouter import config
from podrouter.config import ConfigError

MINIMAL = """
node: {name: node1, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.loads(textwrap.dedent(text))
    return exc.value.problems


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = config.loads(MINIMAL)
    assert cfg.node.name == "node1"
    assert cfg.node.address is None and cfg.node.interface is None  # resolved at start
    assert cfg.node.pod_cidrs == (ipaddress.ip_network("10.244.1.0/24"),)
    assert cfg.routing.mode == "tunnel"
    assert cfg.routing.native_cidrs == () and cfg.routing.native_when_on_link is False
    assert cfg.tunnel.protocol == "vxlan" and cfg.tunnel.port == 4789 and cfg.tunnel.vni == 1
    assert cfg.tunnel.mtu is None  # auto
    assert cfg.masquerade.enabled is True and cfg.masquerade.port_range == (61000, 65535)
    assert cfg.discovery.backend == "static"
    assert cfg.discovery.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert cfg.discovery.etcd.prefix == "/podrouter/v1" and cfg.discovery.etcd.lease_ttl == 10
    assert cfg.bandwidth.enabled is True
    assert cfg.api.socket == "/run/podrouter/podrouter.sock" and cfg.api.keeper is True
    assert cfg.metrics.listen == ("127.0.0.1", 9965)
    assert cfg.peers == () and cfg.pods == () and cfg.warnings == ()


def test_tunnel_gso_defaults_to_auto_and_can_be_turned_off() -> None:
    assert config.loads(MINIMAL).tunnel.gso == "auto"
    assert config.loads(MINIMAL + "tunnel: {gso: off}\n").tunnel.gso == "off"
    assert config.loads(MINIMAL + "tunnel: {gso: 'off'}\n").tunnel.gso == "off"
    assert config.loads(MINIMAL + "tunnel: {gso: on}\n").tunnel.gso == "auto"


def test_datapath_workers_auto_or_a_count_bad_values_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from podrouter import bringup

    cfg = config.loads(MINIMAL)
    assert cfg.datapath.workers is None  # auto
    monkeypatch.setattr(bringup.os, "sched_getaffinity", lambda pid: set(range(6)))
    assert bringup.workers(cfg) == 3  # one per two CPUs of the affinity mask
    monkeypatch.setattr(bringup.os, "sched_getaffinity", lambda pid: {0})
    assert bringup.workers(cfg) == 1
    monkeypatch.setattr(bringup.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert bringup.workers(cfg) == 4
    assert config.loads(MINIMAL + "datapath: {workers: auto}\n").datapath.workers is None
    two = config.loads(MINIMAL + "datapath: {workers: 2}\n")
    assert two.datapath.workers == 2 and bringup.workers(two) == 2
    assert problems(MINIMAL + "datapath: {workers: 0}\n") == ["datapath.workers: 0 is out of range (1..64)"]
    assert problems(MINIMAL + "datapath: {workers: true}\n") == ["datapath.workers: True is not an integer"]
    assert problems(MINIMAL + "datapath: {workers: many}\n") == ["datapath.workers: 'many' is not an integer"]
    assert problems(MINIMAL + "datapath: {threads: 2}\n")[0].startswith("datapath.threads")


def test_a_reload_keeps_the_running_workers_and_tunnel_gso() -> None:
    from podrouter import reconcile

    old = config.loads(MINIMAL)
    new = config.loads(MINIMAL + "datapath: {workers: 3}\ntunnel: {gso: off}\n")
    assert reconcile.restart_only_changes(old, new) == ["datapath.workers", "tunnel.gso"]
    kept = reconcile.reloaded_config(old, new)
    assert kept.datapath == old.datapath and kept.tunnel.gso == "auto"


def test_geneve_port_defaults_to_6081_and_the_other_protocol_keeps_its_iana_port() -> None:
    cfg = config.loads(MINIMAL + "tunnel: {protocol: geneve}\n")
    assert cfg.tunnel.port == 6081
    assert cfg.tunnel.port_for("geneve") == 6081 and cfg.tunnel.port_for("vxlan") == 4789
    cfg = config.loads(MINIMAL + "tunnel: {protocol: vxlan, port: 8472}\n")
    assert cfg.tunnel.port_for("vxlan") == 8472 and cfg.tunnel.port_for("geneve") == 6081


def test_full_example_from_the_design_document() -> None:
    cfg = config.loads("""
node:
  name: node1
  address: 172.16.2.2
  interface: eth0
  pod_cidr: 10.244.1.0/24
cluster:
  pod_cidr: 10.244.0.0/16
routing:
  mode: hybrid
  native_cidrs: [10.244.0.0/17]
  native_when_on_link: false
tunnel: {protocol: vxlan, port: 4789, vni: 1, mtu: auto}
masquerade: {enabled: true, non_masquerade_cidrs: [], port_range: 61000-65535}
peers:
  - {name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, mode: tunnel, tunnel_protocol: geneve}
discovery:
  backend: static
  etcd: {endpoints: ['http://127.0.0.1:2379'], prefix: /podrouter/v1, lease_ttl: 10}
bandwidth: {enabled: true}
pods:
  - name: web
    ip: 10.244.1.10
    host_interface: veth-web
    annotations: {kubernetes.io/egress-bandwidth: 10M, kubernetes.io/ingress-bandwidth: 50M}
api: {socket: /run/podrouter/podrouter.sock}
metrics: {listen: '127.0.0.1:9965'}
""")
    assert cfg.node.address == ipaddress.IPv4Address("172.16.2.2")
    assert cfg.peers[0].mode == "tunnel" and cfg.peers[0].tunnel_protocol == "geneve"
    assert cfg.pods[0].annotations["kubernetes.io/egress-bandwidth"] == "10M"
    assert cfg.routing.native_cidrs == (ipaddress.ip_network("10.244.0.0/17"),)


def test_dual_stack_pod_cidrs() -> None:
    cfg = config.loads("""
node: {name: n1, pod_cidrs: [10.244.1.0/24, 'fd00:10:244:1::/64']}
cluster: {pod_cidrs: [10.244.0.0/16, 'fd00:10:244::/48']}
pods: [{name: p, ip: 'fd00:10:244:1::5', host_interface: veth-p}]
""")
    assert [n.version for n in cfg.node.pod_cidrs] == [4, 6]
    assert cfg.pods[0].ip.version == 6


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "routing: {mode: hybrid, native_cidrs: [10.244.0.0/33]}",
            "routing.native_cidrs[0]: '10.244.0.0/33' is not a CIDR",
        ),
        (
            "routing: {mode: hybrid, native_cidrs: [10.244.3.1/24]}",
            "routing.native_cidrs[0]: '10.244.3.1/24' has host bits set (did you mean '10.244.3.0/24'?)",
        ),
        ("routing: {nativ_cidrs: []}", "routing.nativ_cidrs: unknown key (did you mean 'native_cidrs'?)"),
        ("routing: {mode: fast}", "routing.mode: 'fast' is not one of: tunnel, native, hybrid"),
        ("tunnel: {protocol: gre}", "tunnel.protocol: 'gre' is not one of: vxlan, geneve"),
        ("tunnel: {geneve_payload: eth}", "tunnel.geneve_payload: 'eth' is not one of: ethernet, ip"),
        ("tunnel: {gso: fast}", "tunnel.gso: 'fast' is not one of: auto, off"),
        ("tunnel: {vni: 16777216}", "tunnel.vni: 16777216 is out of range (0..16777215)"),
        ("tunnel: {vni: true}", "tunnel.vni: True is not an integer"),
        ("tunnel: {port: 0}", "tunnel.port: 0 is out of range (1..65535)"),
        ("tunnel: {mtu: 100}", "tunnel.mtu: 100 is out of range (576..65535)"),
        ("tunnel: {mtu: automatic}", "tunnel.mtu: 'automatic' is not 'auto' or an integer"),
        ("masquerade: {port_range: 65000-61000}", "masquerade.port_range: '65000-61000' is empty"),
        ("masquerade: {port_range: 80-90}", "masquerade.port_range: '80-90' must lie within 1024-65535"),
        ("masquerade: {port_range: 61000}", "masquerade.port_range: 61000 is not a port range 'lo-hi'"),
        ("masquerade: {enabled: yes please}", "masquerade.enabled: 'yes please' is not a boolean"),
        (
            "masquerade: {timeouts: {tcp_established: 0}}",
            "masquerade.timeouts.tcp_established: 0 is out of range (1..31622400)",
        ),
        (
            "masquerade: {timeouts: {tcp_estab: 60}}",
            "masquerade.timeouts.tcp_estab: unknown key (did you mean 'tcp_established'?)",
        ),
        ("masquerade: {max_entries: 0}", "masquerade.max_entries: 0 is out of range (1..67108864)"),
        (
            "masquerade: {max_entries: 1000, max_entries_per_pod: 1001}",
            "masquerade.max_entries_per_pod: 1001 is out of range (1..1000)",
        ),
        (
            "masquerade: {max_entries_per_pod: 0}",
            "masquerade.max_entries_per_pod: 0 is out of range (1..1048576)",
        ),
        (
            "masquerade: {max_entries_per_pod: many}",
            "masquerade.max_entries_per_pod: 'many' is not an integer",
        ),
        ("discovery: {backend: consul}", "discovery.backend: 'consul' is not one of: static, etcd"),
        (
            "discovery: {etcd: {endpoints: ['127.0.0.1:2379']}}",
            "discovery.etcd.endpoints[0]: '127.0.0.1:2379' is not an http(s)://host:port URL",
        ),
        ("discovery: {etcd: {lease_ttl: 1}}", "discovery.etcd.lease_ttl: 1 is out of range (2..3600)"),
        ("discovery: {etcd: {prefix: podrouter}}", "discovery.etcd.prefix: 'podrouter' is not a key prefix"),
        ("api: {socket: relative.sock}", "api.socket: 'relative.sock' is not an absolute path"),
        ("api: {keeper: 'no'}", "api.keeper: 'no' is not a boolean"),
        ("metrics: {listen: 9965}", "metrics.listen: 9965 is not host:port"),
        ("metrics: {listen: 'localhost:99999'}", "metrics.listen: 'localhost:99999' is not host:port"),
        ("bandwidth: {enabled: maybe}", "bandwidth.enabled"),
        ("peers: [{name: node2, address: 172.16.3.2}]", "peers[0].pod_cidr: is required"),
        (
            "peers: [{name: node2, address: '2001:db8::zz', pod_cidr: 10.244.2.0/24}]",
            "peers[0].address: '2001:db8::zz' is not an IP address",
        ),
        (
            "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, mode: hybrid}]",
            "peers[0].mode: 'hybrid' is not one of: native, tunnel",
        ),
        (
            "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, tunnel_protocol: ipip}]",
            "peers[0].tunnel_protocol: 'ipip' is not one of: vxlan, geneve",
        ),
        (
            "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, geneve_payload: 0x6558}]",
            "peers[0].geneve_payload: 25944 is not one of: ethernet, ip",
        ),
        (
            "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.244.1.128/25}]",
            "peers[0].pod_cidr: '10.244.1.128/25' overlaps node's pod CIDR '10.244.1.0/24'",
        ),
        (
            "peers: [{name: node2, address: 172.16.3.2, pod_cidr: 10.99.0.0/24}]",
            "peers[0].pod_cidr: '10.99.0.0/24' is not inside the cluster pod CIDRs",
        ),
        (
            "peers: [{name: node1, address: 172.16.3.2, pod_cidr: 10.244.2.0/24}]",
            "peers[0].name: 'node1' is this node's own name",
        ),
        (
            "peers: [{name: a, address: 172.16.3.2, pod_cidr: 10.244.2.0/24},"
            " {name: a, address: 172.16.3.3, pod_cidr: 10.244.3.0/24}]",
            "peers[1].name: 'a' is also peers[0]",
        ),
        (
            "peers: [{name: a, address: 172.16.3.2, pod_cidr: 10.244.2.0/24},"
            " {name: b, address: 172.16.3.2, pod_cidr: 10.244.3.0/24}]",
            "peers[1].address: '172.16.3.2' is also peers[0]",
        ),
        ("peers: {node2: 172.16.3.2}", "peers: {'node2': '172.16.3.2'} is not a list"),
        (
            "pods: [{name: web, ip: 10.244.9.9, host_interface: veth-web}]",
            "pods[0].ip: '10.244.9.9' is not inside this node's pod CIDRs",
        ),
        (
            "pods: [{name: web, ip: 10.244.1.9, host_interface: a-very-long-interface-name}]",
            "pods[0].host_interface: 'a-very-long-interface-name' is not a valid interface name",
        ),
        (
            "pods: [{name: web, ip: 10.244.1.9, host_interface: veth-web, annotations: [a]}]",
            "pods[0].annotations: ['a'] is not a mapping",
        ),
        (
            "pods: [{name: a, ip: 10.244.1.9, host_interface: v1},"
            " {name: a, ip: 10.244.1.8, host_interface: v2}]",
            "pods[1].name: 'a' is also pods[0]",
        ),
        (
            "pods: [{name: a, ip: 10.244.1.9, host_interface: v1},"
            " {name: b, ip: 10.244.1.9, host_interface: v2}]",
            "pods[1].ip: '10.244.1.9' is also pods[0]",
        ),
        (
            "pods: [{name: 'bad name!', ip: 10.244.1.9, host_interface: v1}]",
            "pods[0].name: 'bad name!' is not a valid name",
        ),
        ("colour: blue", "colour: unknown key"),
    ],
)
def test_each_problem_names_the_key_path_and_the_bad_value(snippet: str, expected: str) -> None:
    found = problems(MINIMAL + snippet + "\n")
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_are_collected_in_one_run() -> None:
    found = problems("""
node: {name: node1, pod_cidr: 10.244.1.0/24, adress: 1.2.3.4}
cluster: {pod_cidr: 10.244.0.0/16}
routing: {mode: hybrid, native_cidrs: [10.244.0.0/33]}
tunnel: {vni: -1}
masquerade: {port_range: 1-2}
peers:
  - {name: node2, address: nope, pod_cidr: 10.244.2.0/24}
  - {name: node3, address: 172.16.2.3, pod_cidr: 10.244.1.0/25}
""")
    assert found == [
        "node.adress: unknown key (did you mean 'address'?)",
        "routing.native_cidrs[0]: '10.244.0.0/33' is not a CIDR",
        "tunnel.vni: -1 is out of range (0..16777215)",
        "masquerade.port_range: '1-2' must lie within 1024-65535",
        "peers[0].address: 'nope' is not an IP address",
        # relations are still checked on the entries that parsed, under their original index
        "peers[1].pod_cidr: '10.244.1.0/25' overlaps node's pod CIDR '10.244.1.0/24'",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "config: the file is empty"),
        ("- a\n- b\n", "config: the top level must be a mapping, not list"),
        ("cluster: {pod_cidr: 10.244.0.0/16}\n", "node: is required"),
        ("node: {name: n}\ncluster: {pod_cidr: 10.244.0.0/16}\n", "node.pod_cidr: is required"),
        ("node: {name: n, pod_cidr: 10.244.1.0/24}\n", "cluster: is required"),
        (
            "node: {name: n, pod_cidr: 10.9.1.0/24}\ncluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.pod_cidr: '10.9.1.0/24' is not inside the cluster pod CIDRs",
        ),
        (
            "node: {name: n, pod_cidr: 10.244.1.0/24, pod_cidrs: [10.244.1.0/24]}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.pod_cidrs: give either pod_cidr or pod_cidrs, not both",
        ),
        (
            "node: {name: n, pod_cidrs: [10.244.1.0/24, 10.244.2.0/24]}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.pod_cidrs: ['10.244.1.0/24', '10.244.2.0/24'] has more than one IPv4 CIDR",
        ),
        (
            "node: {name: n, pod_cidr: 10.244.1.0/24}\nnode: {name: m}\ncluster: {pod_cidr: 10.244.0.0/16}\n",
            "<config>:2:1: invalid YAML: duplicate key 'node' (line 2)",
        ),
        ("node: {name: n, pod_cidr: [\n", "<config>:2:1: invalid YAML"),
        (
            "node: {name: n, address: 300.1.1.1, pod_cidr: 10.244.1.0/24}\n"
            "cluster: {pod_cidr: 10.244.0.0/16}\n",
            "node.address: '300.1.1.1' is not an IP address",
        ),
    ],
)
def test_structural_problems(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_unreadable_file_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as exc:
        config.load(tmp_path / "missing.yaml")
    assert exc.value.problems == [
        f"{tmp_path / 'missing.yaml'}: cannot read the config file: No such file or directory"
    ]


def test_native_cidrs_outside_hybrid_is_a_warning_not_an_error() -> None:
    cfg = config.loads(MINIMAL + "routing: {mode: tunnel, native_cidrs: [10.244.0.0/17]}\n")
    assert cfg.warnings and "only apply to mode hybrid" in cfg.warnings[0]


def test_integer_annotation_values_become_strings() -> None:
    cfg = config.loads(
        MINIMAL + "pods: [{name: a, ip: 10.244.1.2, host_interface: v, annotations: {x/y: 1000}}]\n"
    )
    assert cfg.pods[0].annotations == {"x/y": "1000"}


def test_pod_from_dict_checks_the_node_pod_cidr() -> None:
    cidrs = (ipaddress.ip_network("10.244.1.0/24"),)
    pod, errs, _ = config.pod_from_dict({"name": "a", "ip": "10.244.1.7", "host_interface": "veth-a"}, cidrs)
    assert pod is not None and not errs
    pod, errs, _ = config.pod_from_dict({"name": "a", "ip": "10.244.2.7", "host_interface": "veth-a"}, cidrs)
    assert pod is None and errs[0].startswith("pod.ip: '10.244.2.7' is not inside this node's pod CIDRs")
    pod, errs, _ = config.pod_from_dict({"name": "a", "ip": "10.244.1.7"}, cidrs)
    assert pod is None and errs == ["pod.host_interface: is required"]
    pod, errs, _ = config.pod_from_dict("web", cidrs)
    assert pod is None and errs == ["pod: 'web' is not a mapping"]


def test_state_path_lives_next_to_the_socket() -> None:
    cfg = config.loads(MINIMAL + "api: {socket: /tmp/x/node1.sock}\n")
    assert str(cfg.state_path) == "/tmp/x/node1.state.json"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("61000-65535", (61000, 65535)),
        ("1024-1024", (1024, 1024)),
        (" 2000 - 3000 ", (2000, 3000)),
        ("1023-2000", None),
        ("3000-2000", None),
        ("a-b", None),
        ("61000", None),
        (61000, None),
    ],
)
def test_parse_port_range(value: object, ok: tuple[int, int] | None) -> None:
    assert config.parse_port_range(value)[0] == ok


def test_masquerade_timeouts_reach_the_datapath_config_only_when_set() -> None:
    cfg = config.loads(MINIMAL)
    assert cfg.masquerade.nat_config() == {}
    cfg = config.loads(MINIMAL + "masquerade: {timeouts: {udp_unreplied: 5, icmp: 3}, max_entries: 4096}\n")
    assert cfg.masquerade.nat_config() == {"udp_unreplied": 5, "icmp": 3, "max_entries": 4096}


def test_masquerade_per_pod_cap_defaults_to_an_eighth_of_the_table() -> None:
    cfg = config.loads(MINIMAL)
    assert "max_entries_per_pod" not in cfg.masquerade.nat_config()
    assert cfg.masquerade.effective_max_entries_per_pod() == (1 << 20) // 8
    cfg = config.loads(MINIMAL + "masquerade: {max_entries: 2000}\n")
    assert cfg.masquerade.effective_max_entries_per_pod() == 250
    cfg = config.loads(MINIMAL + "masquerade: {max_entries: 100}\n")
    assert cfg.masquerade.effective_max_entries_per_pod() == 64  # at least 64 ...
    cfg = config.loads(MINIMAL + "masquerade: {max_entries: 10}\n")
    assert cfg.masquerade.effective_max_entries_per_pod() == 10  # ... at most the table
    cfg = config.loads(MINIMAL + "masquerade: {max_entries: 4096, max_entries_per_pod: 100}\n")
    assert cfg.masquerade.nat_config() == {"max_entries": 4096, "max_entries_per_pod": 100}


def test_peer_vtep_mac_is_validated_and_normalised() -> None:
    cfg = config.loads(
        MINIMAL
        + """
peers:
  - {name: node2, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, vtep_mac: "3A:1F:9C:44:05:E1"}
  - {name: node3, address: 172.16.3.3, pod_cidr: 10.244.3.0/24}
"""
    )
    assert cfg.peers[0].vtep_mac == "3a:1f:9c:44:05:e1"
    assert cfg.peers[1].vtep_mac is None  # the synthesized one is used
    assert config.vtep_mac_of(ipaddress.IPv4Address("172.16.3.2")) == "02:70:ac:10:03:02"
    got = problems(
        MINIMAL
        + """
peers:
  - {name: a, address: 172.16.3.2, pod_cidr: 10.244.2.0/24, vtep_mac: "3a:1f:9c:44:05"}
  - {name: b, address: 172.16.3.3, pod_cidr: 10.244.3.0/24, vtep_mac: "01:00:5e:00:00:01"}
  - {name: c, address: 172.16.3.4, pod_cidr: 10.244.4.0/24, vtep_mac: 12:34:56:12:34:56}
  - {name: d, address: 172.16.3.5, pod_cidr: 10.244.5.0/24, vtep_mac: "00:00:00:00:00:00"}
  - {name: e, address: 172.16.3.6, pod_cidr: 10.244.6.0/24, vtep_mac: "0g:00:00:00:00:01"}
"""
    )
    assert got[0] == "peers[0].vtep_mac: '3a:1f:9c:44:05' is not a MAC address (xx:xx:xx:xx:xx:xx)"
    assert got[1] == "peers[1].vtep_mac: '01:00:5e:00:00:01' is a multicast address (a VTEP MAC is unicast)"
    # YAML 1.1 reads unquoted digit groups as a base-60 number: say so instead of a bare number
    assert got[2].startswith("peers[2].vtep_mac: ") and "quote it" in got[2]
    assert got[3] == "peers[3].vtep_mac: '00:00:00:00:00:00' is the zero address"
    assert got[4].startswith("peers[4].vtep_mac: '0g:00:00:00:00:01' is not a MAC address")
    assert len(got) == 5, got


DUAL_HEAD = """
node: {name: n1, pod_cidrs: [10.244.1.0/24, 'fd00:10:244:1::/64']}
cluster: {pod_cidrs: [10.244.0.0/16, 'fd00:10:244::/48']}
"""


def test_dual_stack_pod_ips() -> None:
    cfg = config.loads(
        DUAL_HEAD
        + "pods:\n"
        + "  - {name: a, ips: [10.244.1.5, 'fd00:10:244:1::5'], host_interface: veth-a}\n"
        + "  - {name: b, ip: 10.244.1.6, ips: ['fd00:10:244:1::6'], host_interface: veth-b}\n"
        + "  - {name: c, ip: 10.244.1.7, host_interface: veth-c}\n"
    )
    a, b, c = cfg.pods
    assert [str(x) for x in a.addresses] == ["10.244.1.5", "fd00:10:244:1::5"] and str(a.ip) == "10.244.1.5"
    assert [str(x) for x in b.addresses] == ["10.244.1.6", "fd00:10:244:1::6"]
    assert c.addresses == (c.ip,) and c.ips == ()
    assert a.as_dict()["ips"] == ["10.244.1.5", "fd00:10:244:1::5"]


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        (
            "[{name: a, ips: [10.244.1.5, 10.244.1.6], host_interface: veth-a}]",
            "pods[0].ips[1]: '10.244.1.6': at most one address per family (one IPv4, one IPv6)",
        ),
        (
            "[{name: a, ips: [], host_interface: veth-a}]",
            "pods[0].ips: [] is not a non-empty list of IP addresses",
        ),
        (
            "[{name: a, ips: [10.244.1.5, 'fd00:10:244:2::5'], host_interface: veth-a}]",
            "pods[0].ips: 'fd00:10:244:2::5' is not inside this node's pod CIDRs",
        ),
        (
            "[{name: a, ips: [10.244.1.5, 'fd00:10:244:1::5'], host_interface: veth-a},"
            " {name: b, ips: [10.244.1.6, 'fd00:10:244:1::5'], host_interface: veth-b}]",
            "pods[1].ips: 'fd00:10:244:1::5' is also pods[0]",
        ),
        ("[{name: a, host_interface: veth-a}]", "pods[0].ip: is required"),
    ],
)
def test_dual_stack_pod_ip_problems(pods: str, expected: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.loads(DUAL_HEAD + f"pods: {pods}\n")
    assert expected in e.value.problems, e.value.problems


def test_api_pod_with_two_families() -> None:
    nets = (ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd00:10:244:1::/64"))
    raw = {"name": "p", "ips": ["10.244.1.9", "fd00:10:244:1::9"], "host_interface": "veth-p"}
    pod, errs, _ = config.pod_from_dict(raw, nets)
    assert errs == [] and pod is not None and len(pod.addresses) == 2
    pod, errs, _ = config.pod_from_dict({**raw, "ips": ["10.244.1.9", "fd00:10:244:7::9"]}, nets)
    assert pod is None and len(errs) == 1
    assert errs[0].startswith("pod.ips: 'fd00:10:244:7::9' is not inside this node's pod CIDRs")


def test_interface_names_of_the_gso_tap_are_reserved() -> None:
    """`podrgso*` is podrouter's GSO TAP (docs/config.md): the pod guard accepts frames in on it
    before any pod check, so no pod veth (the config, the API or CNI, a recorded pod taken over at
    start: all pod_from_dict) and no underlay interface may take such a name."""
    from podrouter import nftables

    assert nftables.GSO_TAP_GLOB == config.RESERVED_IFNAME_PREFIX + "*"
    reserved = "is reserved: interface names starting with 'podrgso' are podrouter's GSO TAP"
    got = problems(MINIMAL + "pods: [{name: web, ip: 10.244.1.9, host_interface: podrgso0}]\n")
    assert got == [f"pods[0].host_interface: 'podrgso0' {reserved}"]
    underlay = MINIMAL.replace("pod_cidr: 10.244.1.0/24}", "pod_cidr: 10.244.1.0/24, interface: podrgso1}")
    got = problems(underlay)
    assert got == [f"node.interface: 'podrgso1' {reserved}"]
    cidrs = (ipaddress.ip_network("10.244.1.0/24"),)
    pod, errs, _ = config.pod_from_dict({"name": "a", "ip": "10.244.1.7", "host_interface": "podrgso"}, cidrs)
    assert pod is None and errs == [f"pod.host_interface: 'podrgso' {reserved}"]
    for name in ("podrgs0", "vethpodrgso", "podr-gso0"):  # only the prefix is reserved
        pod, errs, _ = config.pod_from_dict({"name": "a", "ip": "10.244.1.7", "host_interface": name}, cidrs)
        assert pod is not None and pod.host_interface == name and not errs
