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
from test_bad_input import inner, send_udp, vxlan

from nettopo import Host, ReferenceTopology, Topology, capture
from podrouter.demo.multi import (
    EAST_ETCD,
    NODE_ADDR,
    WEST_ETCD,
    mesh_config,
    mesh_topology,
    start_etcd,
    stop_proc,
)


@pytest.fixture
def mesh(topo: Topology) -> ReferenceTopology:
    return mesh_topology(topo)


@pytest.fixture
def etcds(mesh: ReferenceTopology, tmp_path: Path) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["east"] = start_etcd(mesh.router, "east", tmp_path / "east", EAST_ETCD, 2380)
        procs["west"] = start_etcd(mesh.router, "west", tmp_path / "west", WEST_ETCD, 2480)
        yield procs
    finally:
        for p in procs.values():
            stop_proc(p)


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


def test_two_clusters(
    mesh: ReferenceTopology, daemons: Daemons, etcds: dict[str, Any], tmp_path: Path
) -> None:
    ds = {n: daemons.start(mesh.nodes[n], mesh_config(mesh, n, daemons.sockdir)) for n in NODE_ADDR}
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

    # the ingress checks apply to mesh peers: west's node4 (a known peer) cannot send packets from
    # east's pod addresses, nor from its fellow west node's, into node1's pods
    before = {k: int(v) for k, v in d1.counters()["drops"].items()}
    with capture(mesh.nodes["node1"], "veth-pod1", "icmp") as delivered:
        send_udp(
            mesh.nodes["node4"],
            "172.16.4.2",
            "172.16.2.2",
            4789,
            [vxlan(inner(src="10.244.2.1")), vxlan(inner(src="10.245.3.1")), vxlan(inner(src="10.244.1.9"))],
        )
        wait_for(
            lambda: (
                d1.counters()["drops"].get("spoofed_inner_source", 0) - before.get("spoofed_inner_source", 0)
                >= 3
            ),
            5,
            what="3 spoofed packets dropped",
        )
    assert delivered == []

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
    # and so is one outside west's declared pod space (clustermesh.clusters[].pod_cidr)
    put(
        mesh.nodes["node3"],
        WEST_ETCD[0],
        "/podrouter/v1/nodes/stray",
        json.dumps({"name": "stray", "address": "172.16.2.8", "pod_cidr": "10.246.0.0/24"}),
    )
    wait_for(
        lambda: "/podrouter/v1/nodes/stray" in mesh_nodes(d1, "west")["rejected"], 10, what="stray refused"
    )
    assert (
        "outside cluster west's pod CIDRs (10.245.0.0/16)"
        in (mesh_nodes(d1, "west")["rejected"]["/podrouter/v1/nodes/stray"])
    )
    # west's space without a known node is dropped by the datapath (no_route), never masqueraded
    assert "dev podr0" in mesh.nodes["node1"].ip("route show 10.245.0.0/16")
    before = d1.counters()
    assert not pods["pod1"].host.ping("10.245.9.1", count=2, timeout=1)
    after = d1.counters()
    assert after["drops"].get("no_route", 0) - before["drops"].get("no_route", 0) >= 2
    assert after["packets"].get("masquerade/egress", 0) == before["packets"].get("masquerade/egress", 0)
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

    # west's etcd comes back: the watch re-lists and the mesh is connected again
    etcds["west"] = start_etcd(mesh.router, "west", tmp_path / "west", WEST_ETCD, 2480)
    wait_for(lambda: mesh_nodes(d1, "west")["connected"], 20, what="node1 reconnects to west's etcd")
    wait_for(
        lambda: set(mesh_nodes(d1, "west")["nodes"]) == {"node3", "node4"}, 20, what="west's nodes after it"
    )
    assert mesh_nodes(d1, "west")["state"] == "connected"
    assert pods["pod1"].host.ping("10.245.4.1", count=2)
