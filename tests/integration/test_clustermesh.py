"""Cluster mesh (docs/clustermesh.md): two clusters of two nodes each, each cluster with its own real
etcd (both in R's namespace, on different ports). east = node1 (on the shared L2) + node2 (behind R),
west = node3 (on the shared L2) + node4 (behind R, on a segment of its own). Every node watches the
other cluster's etcd read-only; pods reach each other across clusters by their pod IPs, over the
tunnel and natively where the rules allow it (hybrid + native_when_on_link between node1 and node3),
never masqueraded; a rogue west entry claiming east's pod CIDR is refused while the mesh keeps
working; a remote etcd outage keeps the last known nodes."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, python_in, wait_for

from nettopo import Host, ReferenceTopology, Topology, capture, reference_topology

EAST_ETCD = ["http://172.16.2.1:2379", "http://172.16.3.1:2379", "http://172.16.4.1:2379"]
WEST_ETCD = ["http://172.16.2.1:2479", "http://172.16.3.1:2479", "http://172.16.4.1:2479"]
CLUSTERS = {
    "east": {"id": 1, "cidr": "10.244.0.0/16", "etcd": EAST_ETCD, "nodes": ("node1", "node2")},
    "west": {"id": 2, "cidr": "10.245.0.0/16", "etcd": WEST_ETCD, "nodes": ("node3", "node4")},
}
POD_CIDR = {
    "node1": "10.244.1.0/24",
    "node2": "10.244.2.0/24",
    "node3": "10.245.3.0/24",
    "node4": "10.245.4.0/24",
}
ADDR = {"node1": "172.16.2.2", "node2": "172.16.3.2", "node3": "172.16.2.3", "node4": "172.16.4.2"}


@pytest.fixture
def mesh(topo: Topology) -> ReferenceTopology:
    ref = reference_topology(topo, with_pods=False)
    node4 = topo.host("node4", forwarding=True)
    topo.link(ref.router, "p-node4", node4, "eth0", a_addr="172.16.4.1/24", b_addr="172.16.4.2/24")
    node4.ip("route add default via 172.16.4.1")
    ref.nodes["node4"] = node4
    ref.node_addr["node4"] = ADDR["node4"]
    for i, node in enumerate(("node1", "node2", "node3", "node4"), 1):
        ref.node_pod_cidr[node] = POD_CIDR[node]
        ref.add_pod(node, f"pod{i}", POD_CIDR[node].replace("0/24", "1"))
    return ref


def start_etcd(r: Host, name: str, data: Path, urls: list[str], peer_port: int) -> subprocess.Popen[bytes]:
    peer = f"http://127.0.0.1:{peer_port}"
    proc = r.popen(
        [
            "etcd",
            "--name", name,
            "--data-dir", str(data),
            "--listen-client-urls", ",".join(urls),
            "--advertise-client-urls", urls[0],
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    code = f"import urllib.request;urllib.request.urlopen('{urls[0]}/health',timeout=1)"
    wait_for(lambda: r.try_run(["python3", "-c", code]).returncode == 0, 20, 0.3, f"etcd {name} healthy")
    return proc


@pytest.fixture
def etcds(mesh: ReferenceTopology, tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["east"] = start_etcd(mesh.router, "east", tmp_path / "east", EAST_ETCD, 2380)
        procs["west"] = start_etcd(mesh.router, "west", tmp_path / "west", WEST_ETCD, 2480)
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


def mesh_config(ref: ReferenceTopology, node: str, sockdir: Path) -> dict[str, Any]:
    mine = next(n for n, c in CLUSTERS.items() if node in c["nodes"])
    other = next(n for n in CLUSTERS if n != mine)
    me, them = CLUSTERS[mine], CLUSTERS[other]
    seg = {"node1": 0, "node2": 1, "node3": 0, "node4": 2}[node]  # the etcd address this node reaches
    return {
        "node": {"name": node, "address": ADDR[node], "interface": "eth0", "pod_cidr": POD_CIDR[node]},
        "cluster": {"name": mine, "id": me["id"], "pod_cidr": me["cidr"]},
        "routing": {"mode": "tunnel", "native_when_on_link": True},
        "masquerade": {"enabled": True},
        "discovery": {"backend": "etcd", "etcd": {"endpoints": [me["etcd"][seg]], "lease_ttl": 3}},
        "clustermesh": {
            "clusters": [
                # hybrid + native_when_on_link: native to the other cluster's nodes on our L2
                {
                    "name": other,
                    "id": them["id"],
                    "etcd": {"endpoints": [them["etcd"][seg]]},
                    "mode": "hybrid",
                }
            ]
        },
        "pods": [
            {"name": p.name, "ip": p.ip, "host_interface": p.host_interface}
            for p in ref.pods.values()
            if p.node == node
        ],
        "api": {"socket": str(sockdir / f"{node}.sock")},
        "metrics": {"listen": None},
    }


def mesh_nodes(d: DaemonHandle, cluster: str) -> dict[str, Any]:
    for c in d.status()["clustermesh"]["clusters"]:
        if c["name"] == cluster:
            return dict(c)
    raise AssertionError(f"no cluster {cluster} in status")


def put(host: Host, url: str, key: str, value: str) -> None:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    body = json.dumps({"key": b64(key), "value": b64(value)})
    req = f"urllib.request.Request({url + '/v3/kv/put'!r}, data={body!r}.encode())"
    code = f"import urllib.request\nurllib.request.urlopen({req}, timeout=3)"
    r = python_in(host, code)
    assert r.returncode == 0, r.stderr


def test_two_clusters(mesh: ReferenceTopology, daemons: Daemons, etcds: dict[str, Any]) -> None:
    ds = {n: daemons.start(mesh.nodes[n], mesh_config(mesh, n, daemons.sockdir)) for n in ADDR}
    d1 = ds["node1"]
    wait_for(
        lambda: set(mesh_nodes(d1, "west")["nodes"]) == {"node3", "node4"}, 15, what="node1 sees west's nodes"
    )
    west = mesh_nodes(d1, "west")
    assert west["state"] == "connected" and west["id"] == 2
    assert west["nodes"]["node4"] == {"address": "172.16.4.2", "pod_cidrs": ["10.245.4.0/24"]}
    for d in ds.values():
        wait_for(lambda d=d: len(d.status()["peers"]) == 3, 15, what="every node has 3 peers")
    peers = {p["name"]: p for p in d1.status()["peers"]}
    assert peers["node2"]["source"] == "etcd" and peers["west.node3"]["source"] == "cluster:west"
    assert peers["west.node3"]["path"] == "native" and peers["west.node4"]["path"] == "vxlan"
    assert d1.status()["clustermesh"]["cluster"] == {"name": "east", "id": 1}

    pods = {name: p for name, p in mesh.pods.items()}
    # across clusters: pod1 -> pod3 native on the shared L2, pod addresses on the wire (no masquerade)
    with capture(mesh.router, "p-node3", "icmp or udp port 4789") as lines:
        assert pods["pod1"].host.ping("10.245.3.1", count=3)
    assert any("10.244.1.1 > 10.245.3.1: ICMP echo request" in ln for ln in lines), lines
    assert not any(".4789" in ln for ln in lines), lines
    # pod1 -> pod4 (behind R) and pod2 -> pod3: over the VXLAN tunnel, inner pod addresses kept
    with capture(mesh.nodes["node4"], "eth0", "udp port 4789") as lines:
        assert pods["pod1"].host.ping("10.245.4.1", count=3)
    assert any("172.16.2.2" in ln and "172.16.4.2.4789" in ln for ln in lines), lines
    assert pods["pod2"].host.ping("10.245.3.1", count=2)
    assert pods["pod4"].host.ping("10.244.2.1", count=2)
    # TCP across clusters
    srv = pods["pod3"].host.popen(
        ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        r = pods["pod2"].host.try_run(["iperf3", "-c", "10.245.3.1", "-p", "5201", "-t", "1"], timeout=20)
        assert r.returncode == 0, r.stdout[-2000:]
    finally:
        srv.kill()
        srv.wait(timeout=5)
    # what pod3 saw came from pod1's own address: masquerade never applies to mesh CIDRs
    with capture(pods["pod3"].host, "eth0", "icmp") as lines:
        assert pods["pod1"].host.ping("10.245.3.1", count=2)
    assert any("10.244.1.1 > 10.245.3.1" in ln for ln in lines), lines
    assert d1.counters()["drops"].get("spoofed_inner_source", 0) == 0

    # a west node claiming east's pod CIDR is refused; the rest of the mesh keeps working
    put(
        mesh.nodes["node3"],
        WEST_ETCD[0],
        "/podrouter/v1/nodes/rogue",
        json.dumps({"name": "rogue", "address": "172.16.2.9", "pod_cidr": "10.244.1.0/25"}),
    )
    wait_for(
        lambda: "/podrouter/v1/nodes/rogue" in mesh_nodes(d1, "west")["rejected"], 10, what="rogue refused"
    )
    why = mesh_nodes(d1, "west")["rejected"]["/podrouter/v1/nodes/rogue"]
    assert "overlaps this cluster's (east) pod CIDR 10.244.0.0/16" in why, why
    assert "west.rogue" not in {p["name"] for p in d1.status()["peers"]}
    assert pods["pod1"].host.ping("10.245.4.1", count=2)

    # west's etcd goes away: east keeps the last known west nodes and keeps routing to them
    etcds["west"].terminate()
    etcds["west"].wait(timeout=10)
    wait_for(lambda: not mesh_nodes(d1, "west")["connected"], 15, what="node1 notices west's etcd is gone")
    west = mesh_nodes(d1, "west")
    assert west["state"] == "unreachable, keeping 2 last known nodes", west
    assert {p["name"] for p in d1.status()["peers"]} == {"node2", "west.node3", "west.node4"}
    assert pods["pod1"].host.ping("10.245.4.1", count=2)
    assert pods["pod2"].host.ping("10.245.3.1", count=2)
