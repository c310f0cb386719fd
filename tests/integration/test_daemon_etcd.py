"""etcd discovery with a real etcd server (in R's namespace, reachable from both node subnets): nodes
find each other without static peers, a stopped node disappears at once (lease revoked), a killed
one when its lease expires, and a rogue entry is ignored."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DaemonHandle, Daemons, etcd_argv, python_in, ref_config, wait_for

from nettopo import Host, ReferenceTopology

ETCD_1 = "http://172.16.2.1:2379"  # R's address on node1/node3's segment
ETCD_2 = "http://172.16.3.1:2379"  # R's address towards node2



@pytest.fixture
def etcd(ref: ReferenceTopology, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    r = ref.router
    proc = r.popen(
        etcd_argv(tmp_path / "etcd", [ETCD_1, ETCD_2]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                r.try_run(
                    [
                        "python3",
                        "-c",
                        f"import urllib.request;urllib.request.urlopen('{ETCD_1}/health',timeout=1)",
                    ]
                ).returncode
                == 0
            ),
            20,
            interval=0.3,
            what="etcd healthy",
        )
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def etcd_cfg(ref: ReferenceTopology, node: str, sockdir: Path, endpoint: str) -> dict:
    return ref_config(
        ref,
        node,
        sockdir,
        mode="tunnel",
        peers=[],
        discovery={"backend": "etcd", "etcd": {"endpoints": [endpoint], "lease_ttl": 3}},
    )


def peer_names(d: DaemonHandle) -> dict[str, str]:
    return {p["name"]: p["source"] for p in d.status()["peers"]}


def put(host: Host, key: str, value: str) -> None:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    body = json.dumps({"key": b64(key), "value": b64(value)})
    url = ETCD_1 + "/v3/kv/put"
    r = python_in(
        host,
        "import urllib.request\n"
        f"urllib.request.urlopen(urllib.request.Request({url!r}, data={body!r}.encode()), timeout=3)",
    )
    assert r.returncode == 0, r.stderr


def test_nodes_find_each_other_through_etcd(
    ref: ReferenceTopology, daemons: Daemons, etcd: subprocess.Popen[bytes]
) -> None:
    d1 = daemons.start(ref.nodes["node1"], etcd_cfg(ref, "node1", daemons.sockdir, ETCD_1))
    d2 = daemons.start(ref.nodes["node2"], etcd_cfg(ref, "node2", daemons.sockdir, ETCD_2))
    wait_for(lambda: peer_names(d1) == {"node2": "etcd"}, 10, what="node1 discovers node2")
    wait_for(lambda: peer_names(d2) == {"node1": "etcd"}, 10, what="node2 discovers node1")
    assert ref.pods["pod1"].host.ping("10.244.2.1", count=3)
    assert d1.status()["discovery"]["connected"] is True

    # a rogue registration claiming node1's own pods is ignored
    put(
        ref.nodes["node3"],
        "/podrouter/v1/nodes/rogue",
        json.dumps({"name": "rogue", "address": "172.16.2.3", "pod_cidr": "10.244.1.0/25"}),
    )
    wait_for(
        lambda: "/podrouter/v1/nodes/rogue" in d1.status()["discovery"]["rejected"], 5, what="rogue rejected"
    )
    assert set(peer_names(d1)) == {"node2"}

    # a clean stop revokes the lease: node1 drops node2 right away
    code, _ = d2.stop()
    assert code == 0
    wait_for(lambda: peer_names(d1) == {}, 3, what="node2 gone after its SIGTERM")
    assert "10.244.2.0/24" not in ref.nodes["node1"].ip("route show proto 77")

    # a killed node disappears when its lease (3 s) expires
    d2 = daemons.start(ref.nodes["node2"], etcd_cfg(ref, "node2", daemons.sockdir, ETCD_2))
    wait_for(lambda: "node2" in peer_names(d1), 10, what="node2 back")
    d2.kill()
    t0 = time.monotonic()
    wait_for(lambda: peer_names(d1) == {}, 15, what="node2 gone after its lease expired")
    assert time.monotonic() - t0 < 12
    assert d1.alive()


def test_etcd_down_at_start_is_not_fatal(ref: ReferenceTopology, daemons: Daemons) -> None:
    """No etcd: the daemon starts with its static peers and keeps retrying in the background."""
    cfg = etcd_cfg(ref, "node1", daemons.sockdir, ETCD_1)
    cfg["peers"] = [{"name": "node3", "address": "172.16.2.3", "pod_cidr": "10.244.3.0/24"}]
    d1 = daemons.start(ref.nodes["node1"], cfg)
    st = d1.status()
    assert st["ready"] and {p["name"]: p["source"] for p in st["peers"]} == {"node3": "static"}
    assert st["discovery"]["connected"] is False
