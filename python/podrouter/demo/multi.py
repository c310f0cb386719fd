"""Two more demo legs, beside the plain demo of `podrouter.demo`:

* `podrouter demo --bgp`: the reference topology with R running BIRD 2 as the fabric router and every
  node in `routing.mode: native` with `bgp.enabled`; pod1 -> pod2 crosses R natively, where the plain
  demo had to tunnel (docs/bgp.md).
* `podrouter demo --clusters 2`: two clusters of two nodes, each with its own etcd, meshed
  (docs/clustermesh.md): east = node1 (shared L2) + node2 (behind R), west = node3 (shared L2) + node4
  (behind R); pods reach the other cluster's pods by their pod IPs.

The lab pieces (the mesh topology, its etcds and node configs) are shared with the tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from podrouter.demo.netns import (
    Host,
    ReferenceTopology,
    Terminated,
    Topology,
    reference_topology,
    sh,
    signals_unwind,
)

EAST_ETCD = ["http://172.16.2.1:2379", "http://172.16.3.1:2379", "http://172.16.4.1:2379"]
WEST_ETCD = ["http://172.16.2.1:2479", "http://172.16.3.1:2479", "http://172.16.4.1:2479"]
CLUSTERS: dict[str, dict[str, Any]] = {
    "east": {"id": 1, "cidr": "10.244.0.0/16", "etcd": EAST_ETCD, "nodes": ("node1", "node2")},
    "west": {"id": 2, "cidr": "10.245.0.0/16", "etcd": WEST_ETCD, "nodes": ("node3", "node4")},
}
POD_CIDR = {
    "node1": "10.244.1.0/24",
    "node2": "10.244.2.0/24",
    "node3": "10.245.3.0/24",
    "node4": "10.245.4.0/24",
}
NODE_ADDR = {"node1": "172.16.2.2", "node2": "172.16.3.2", "node3": "172.16.2.3", "node4": "172.16.4.2"}
_ETCD_SEGMENT = {"node1": 0, "node2": 1, "node3": 0, "node4": 2}  # which of R's addresses a node reaches


def mesh_topology(topo: Topology) -> ReferenceTopology:
    """The reference topology plus node4 behind R on 172.16.4.0/24; pod<i> on node<i>."""
    ref = reference_topology(topo, with_pods=False)
    node4 = topo.host("node4", forwarding=True)
    topo.link(ref.router, "p-node4", node4, "eth0", a_addr="172.16.4.1/24", b_addr="172.16.4.2/24")
    node4.ip("route add default via 172.16.4.1")
    ref.nodes["node4"] = node4
    ref.node_addr["node4"] = NODE_ADDR["node4"]
    for i, node in enumerate(("node1", "node2", "node3", "node4"), 1):
        ref.node_pod_cidr[node] = POD_CIDR[node]
        ref.add_pod(node, f"pod{i}", POD_CIDR[node].replace("0/24", "1"))
    return ref


def _wait(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_etcd(r: Host, name: str, data: Path, urls: list[str], peer_port: int) -> subprocess.Popen[bytes]:
    """A single-member etcd in `r`'s namespace serving `urls`."""
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
    _wait(lambda: r.try_run([sys.executable, "-c", code]).returncode == 0, 20, f"etcd {name} healthy", 0.3)
    return proc


def stop_proc(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def mesh_config(ref: ReferenceTopology, node: str, sockdir: Path, metrics: bool = False) -> dict[str, Any]:
    """`node`'s config: etcd discovery in its own cluster, the other cluster meshed in hybrid mode
    (native to its nodes on our L2, VXLAN to the rest), masquerade on."""
    mine = next(n for n, c in CLUSTERS.items() if node in c["nodes"])
    other = next(n for n in CLUSTERS if n != mine)
    me, them = CLUSTERS[mine], CLUSTERS[other]
    seg = _ETCD_SEGMENT[node]
    return {
        "node": {"name": node, "address": NODE_ADDR[node], "interface": "eth0", "pod_cidr": POD_CIDR[node]},
        "cluster": {"name": mine, "id": me["id"], "pod_cidr": me["cidr"]},
        "routing": {"mode": "tunnel", "native_when_on_link": True},
        "masquerade": {"enabled": True},
        "discovery": {"backend": "etcd", "etcd": {"endpoints": [me["etcd"][seg]], "lease_ttl": 3}},
        "clustermesh": {
            "clusters": [
                {
                    "name": other,
                    "id": them["id"],
                    "etcd": {"endpoints": [them["etcd"][seg]]},
                    "pod_cidr": them["cidr"],
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
        "metrics": {"listen": "127.0.0.1:9965" if metrics else None},
    }


# ------------------------------------------------------------------------------------------ the demos


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _preflight(tools: tuple[str, ...]) -> int:
    if os.geteuid() != 0:
        print("podrouter demo: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"podrouter demo: missing tools: {', '.join(missing)} (scripts/bootstrap.sh)", file=sys.stderr)
        return 2
    return 0


def _table(
    cluster: Any, ref: ReferenceTopology, pairs: list[tuple[str, str, str]], throughput: bool, seconds: float
) -> bool:
    from podrouter.bench import measure
    from podrouter.demo import _iperf
    from podrouter.demo.cluster import delta_path

    header = f"{'FROM -> TO':<16} {'PATH':<11} {'RTT':>8} {'THROUGHPUT':>12}  WHY"
    _say(header)
    _say("-" * len(header))
    servers = (
        [
            ref.pods[p].host.popen(
                ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for p in sorted({b for _, b, _ in pairs})
        ]
        if throughput
        else []
    )
    ok = True
    try:
        time.sleep(0.3 if throughput else 0)
        for src, dst, why in pairs:
            s = ref.pods[src]
            dst_ip = ref.pods[dst].ip
            measure.ping_rtt(s.host, dst_ip, count=1, timeout=1)
            before = cluster.packets(s.node)
            rtt = measure.ping_rtt(s.host, dst_ip, count=5, interval=0.1, timeout=1)
            path, _ = delta_path(before, cluster.packets(s.node), minimum=2)
            mbps = _iperf(s.host, dst_ip, seconds) if (rtt is not None and throughput) else None
            shown = path if (path and rtt is not None) else ("unreachable" if rtt is None else "kernel")
            ok = ok and rtt is not None
            rtt_s = f"{rtt['median_ms']:.2f} ms" if rtt else "-"
            thr = f"{mbps:.0f} Mbit/s" if mbps is not None else "-"
            _say(f"{src + ' -> ' + dst:<16} {shown:<11} {rtt_s:>8} {thr:>12}  {why}")
    finally:
        for p in servers:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
                p.wait(timeout=5)
    return ok


def _teardown(topo: Topology | None, closers: list[Callable[[], None]], t_start: float) -> int:
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = 0
    try:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                close()
        prefix = topo.prefix if topo is not None else None
        if topo is not None:
            topo.close()
        if prefix:
            left = [n for n in sh("ip", "netns", "list", check=False).split() if n.startswith(prefix)]
            if left:
                _say(f"WARNING: namespaces left behind: {' '.join(left)}")
                status = 1
            else:
                took = time.monotonic() - t_start
                _say(f"torn down: no namespace {prefix}-* left (ip netns list), {took:.0f}s in all")
    finally:
        signal.signal(signal.SIGINT, old_int)
    return status


Closers = list[Callable[[], None]]


def _run_leg(tools: tuple[str, ...], body: Callable[[Topology, Closers], int]) -> int:
    """One demo leg: preflight, a `demo` topology, `body(topo, closers)` for the status, and always
    the same teardown (closers last-first, then no namespace left), interrupted or failed."""
    from podrouter.demo.cluster import ClusterError

    rc = _preflight(tools)
    if rc:
        return rc
    t_start = time.monotonic()
    topo: Topology | None = None
    closers: Closers = []
    status = 1
    with signals_unwind():
        try:
            topo = Topology("demo")
            status = body(topo, closers)
        except (KeyboardInterrupt, Terminated):
            _say("\ninterrupted: tearing down")
            status = 130
        except (ClusterError, RuntimeError) as e:
            print(f"podrouter demo: {e}", file=sys.stderr)
            status = 1
        finally:
            status = _teardown(topo, closers, t_start) or status
    return status


def run_bgp_demo(seconds: float = 2.0, throughput: bool = True) -> int:
    """`podrouter demo --bgp`."""
    return _run_leg(
        ("ip", "ping", "iperf3", "bird"), lambda topo, closers: _bgp_leg(topo, closers, seconds, throughput)
    )


def _bgp_leg(topo: Topology, closers: Closers, seconds: float, throughput: bool) -> int:
    from podrouter.demo.cluster import Cluster, node_config
    from podrouter.demo.fabric import NODE_ASN, node_bgp, start_fabric

    _say(f"podrouter demo --bgp: building the cluster in network namespaces {topo.prefix}-*")
    ref = reference_topology(topo)
    cluster = Cluster(ref)
    closers.append(cluster.close)
    fabric = start_fabric(
        ref.router, cluster.workdir / "r", "172.16.2.1", {a: NODE_ASN for a in ref.node_addr.values()}
    )
    closers.append(fabric.stop)
    gw = {"node1": "172.16.2.1", "node2": "172.16.3.1", "node3": "172.16.2.1"}
    configs = {}
    for n in ref.nodes:
        cfg = node_config(ref, n, cluster.workdir, mode="native", native_when_on_link=False)
        cfg["bgp"] = node_bgp(gw[n])
        configs[n] = cfg
    _say("  R runs BIRD 2 (AS 64500) as the fabric router; every node runs podrouter in routing.mode")
    _say("  native with bgp.enabled (AS 64512), announcing its pod CIDR with itself as next hop")
    cluster.start(configs)
    want = {ref.node_pod_cidr[n]: ref.node_addr[n] for n in ref.nodes}
    _wait(lambda: all(fabric.routes().get(d) == gw_ for d, gw_ in want.items()), 30, "R's BGP routes")
    _say("\nR's routing table, learnt over BGP (ip route show proto bird):")
    for dst, via in sorted(fabric.routes().items()):
        _say(f"  {dst:<16} via {via}")
    st = cluster.status("node1")["bgp"]
    _say(
        f"node1: sessions {', '.join(s['peer'] + ' ' + s['state'] for s in st['sessions'])}; "
        f"announced {', '.join(st['prefixes'])}\n"
    )
    pairs = [
        (
            "pod1",
            "pod2",
            "across R: native, R learnt 10.244.2.0/24 via node2 over BGP (the plain demo tunnels)",
        ),
        ("pod2", "pod1", "across R: native, R learnt 10.244.1.0/24 via node1 over BGP"),
        ("pod3", "pod2", "across R: native via BGP"),
        ("pod1", "pod3", "shared L2: native (on-link next hop)"),
    ]
    return 0 if _table(cluster, ref, pairs, throughput, seconds) else 1


def run_clusters_demo(seconds: float = 2.0, throughput: bool = True) -> int:
    """`podrouter demo --clusters 2`."""
    return _run_leg(
        ("ip", "ping", "iperf3", "etcd"),
        lambda topo, closers: _clusters_leg(topo, closers, seconds, throughput),
    )


def _clusters_leg(topo: Topology, closers: Closers, seconds: float, throughput: bool) -> int:
    import tempfile

    from podrouter.demo.cluster import Cluster
    from podrouter.status_text import mesh_lines

    _say(f"podrouter demo --clusters 2: building two clusters in network namespaces {topo.prefix}-*")
    ref = mesh_topology(topo)
    data = Path(tempfile.mkdtemp(prefix="podrouter-etcd-"))
    closers.append(lambda: shutil.rmtree(data, ignore_errors=True))
    for name, urls, port in (("east", EAST_ETCD, 2380), ("west", WEST_ETCD, 2480)):
        p = start_etcd(ref.router, name, data / name, urls, port)
        closers.append(functools.partial(stop_proc, p))
    cluster = Cluster(ref)
    closers.append(cluster.close)  # closers run last-first: the daemons stop before the etcds
    _say("  east (id 1, 10.244.0.0/16): node1 172.16.2.2 (pod1), node2 172.16.3.2 (pod2), etcd :2379")
    _say("  west (id 2, 10.245.0.0/16): node3 172.16.2.3 (pod3), node4 172.16.4.2 (pod4), etcd :2479")
    _say("  node1/node3 share an L2; node2 and node4 are behind R. Each node watches the other")
    _say("  cluster's etcd read-only; across clusters: hybrid, native_when_on_link")
    cluster.start({n: mesh_config(ref, n, cluster.workdir) for n in ref.nodes})

    def meshed() -> bool:
        return all(len(cluster.status(n).get("peers", [])) == 3 for n in ref.nodes)

    _wait(meshed, 20, "every node to know the 3 others")
    for line in mesh_lines(cluster.status("node1")["clustermesh"]):
        _say(line.replace("cluster mesh:", "node1's cluster mesh:", 1))
    _say()
    pairs = [
        ("pod1", "pod3", "east -> west, shared L2: native (hybrid, native_when_on_link)"),
        ("pod3", "pod1", "west -> east, shared L2: native"),
        ("pod1", "pod4", "east -> west, across R: VXLAN"),
        ("pod2", "pod3", "east -> west, across R: VXLAN"),
        ("pod4", "pod2", "west -> east, across R: VXLAN"),
        ("pod1", "pod2", "inside east: VXLAN (routing.mode tunnel)"),
    ]
    status = 0 if _table(cluster, ref, pairs, throughput, seconds) else 1
    _say("\n(no masquerade across clusters: pods see each other's pod IPs)")
    return status


__all__ = [
    "CLUSTERS",
    "EAST_ETCD",
    "NODE_ADDR",
    "POD_CIDR",
    "WEST_ETCD",
    "mesh_config",
    "mesh_topology",
    "run_bgp_demo",
    "run_clusters_demo",
    "start_etcd",
    "stop_proc",
]
