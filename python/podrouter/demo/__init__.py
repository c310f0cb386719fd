"""`podrouter demo`: a small cluster in network namespaces on this machine, every path shown, then gone.

What it builds (docs/design.md §8, plus an external host and one shaped pod):

    pod1 10.244.1.1 ─ node1 172.16.2.2 ──┐        ┌── R ── node2 172.16.3.2 ─ pod2 10.244.2.1
    shaped 10.244.1.50 ┘                 ├─ L2 ───┤    (R knows node subnets only, not pod CIDRs)
    pod3 10.244.3.1 ─ node3 172.16.2.3 ──┘        └── ext 203.0.113.10 (outside the cluster)

One `podrouter run` per node, from generated configs: all three nodes in hybrid mode with
`native_when_on_link`, so node1<->node3 (same L2) go native and anything crossing R is tunnelled
(VXLAN by default); node2 and node3 override each other to Geneve (`peers[].tunnel_protocol`), and
masquerade is on, so pods reach the external host through SNAT. The path column comes from the
daemons' own counters (the delta of the source node's per-path egress packet counters across the
ping), not from what the config says should happen.

Everything is torn down at the end, on Ctrl-C, on SIGTERM and on failure; the last line says whether
any namespace was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from podrouter.demo.netns import Terminated, signals_unwind

__all__ = ["main", "build_parser", "run_demo"]

SHAPED_POD = ("shaped", "10.244.1.50", "50M")  # name, ip, kubernetes.io/egress-bandwidth


@dataclass
class Row:
    src: str
    dst: str
    dst_ip: str
    path: str
    rtt_ms: float | None
    mbps: float | None
    why: str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="podrouter demo",
        description="Build a 3-node cluster in network namespaces, run one podrouter per node, show every "
        "pod-to-pod path and which mode carried it, then remove everything.",
    )
    p.add_argument("--seconds", type=float, default=2.0, help="iperf3 duration per pair (default 2)")
    p.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip iperf3")
    p.add_argument("--bgp", action="store_true", help="R runs BIRD 2; native across R via BGP (docs/bgp.md)")
    p.add_argument(
        "--clusters",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: two meshed clusters of two nodes, each with its own etcd (docs/clustermesh.md)",
    )
    return p


def main(argv: list[str] | None = None, **opts: Any) -> int:
    """Entry point: `main(["--seconds", "1"])` (what `podrouter demo ARGS` calls) or `main(seconds=1)`."""
    if argv is not None:
        try:
            a = build_parser().parse_args(list(argv))
        except SystemExit as e:
            return int(e.code or 0)
        extra = {"bgp": a.bgp, "clusters": a.clusters}
        opts = {"seconds": a.seconds, "throughput": a.throughput, **extra, **opts}
    if opts.get("bgp") or opts.get("clusters", 1) == 2:
        from podrouter.demo import multi

        leg = multi.run_clusters_demo if opts.get("clusters", 1) == 2 else multi.run_bgp_demo
        return leg(float(opts.get("seconds", 2.0)), bool(opts.get("throughput", True)))
    return run_demo(**opts)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _why(src_node: str, dst: str, dst_node: str | None) -> str:
    if dst_node is None:
        return "outside the cluster: SNAT to the node address (masquerade)"
    if dst_node == src_node:
        return "same node: handed to the kernel"
    if {src_node, dst_node} == {"node1", "node3"}:
        return "peers share the L2 172.16.2.0/24: native (native_when_on_link)"
    if {src_node, dst_node} == {"node2", "node3"}:
        return "across R; per-peer override tunnel_protocol: geneve"
    return "across R, which cannot route pod IPs: tunnel (VXLAN, the default)"


def run_demo(seconds: float = 2.0, throughput: bool = True, **_ignored: Any) -> int:
    from podrouter.bench import measure
    from podrouter.demo.cluster import Cluster, ClusterError, delta_path, node_config
    from podrouter.demo.netns import Topology, reference_topology

    if os.geteuid() != 0:
        print("podrouter demo: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "ping", "iperf3", "ss") if shutil.which(t) is None]
    if missing:
        print(
            f"podrouter demo: missing tools: {', '.join(missing)} (scripts/bootstrap.sh installs them)",
            file=sys.stderr,
        )
        return 2
    seconds = max(1.0, min(float(seconds), 10.0))
    t_start = time.monotonic()
    topo: Topology | None = None
    cluster: Cluster | None = None
    status = 1
    with signals_unwind():
        try:
            topo = Topology("demo")
            _say(f"podrouter demo: building the cluster in network namespaces {topo.prefix}-*")
            ref = reference_topology(topo)
            name, ip, limit = SHAPED_POD
            ref.add_pod("node1", name, ip)
            ext = ref.external
            cluster = Cluster(ref)
            ann = {name: {"kubernetes.io/egress-bandwidth": limit}}
            geneve = {"tunnel_protocol": "geneve"}
            configs = {
                "node1": node_config(ref, "node1", cluster.workdir, annotations=ann),
                "node2": node_config(ref, "node2", cluster.workdir, peer_overrides={"node3": geneve}),
                "node3": node_config(ref, "node3", cluster.workdir, peer_overrides={"node2": geneve}),
            }
            _say(
                "  node1 172.16.2.2 (pod1, shaped), node3 172.16.2.3 (pod3) share one L2; node2 172.16.3.2 "
                "(pod2) is behind router R;"
            )
            _say(
                "  every node runs `podrouter run` in hybrid mode (native_when_on_link: true); node2<->node3 "
                "use Geneve, the rest VXLAN"
            )
            t0 = time.monotonic()
            cluster.start(configs)
            _say(f"  3 daemons ready in {time.monotonic() - t0:.1f}s (configs in {cluster.workdir})")
            _say()
            _say("columns: FROM -> TO: the pods (ext = 203.0.113.10, a host outside the cluster);")
            _say("         PATH: how the source node's podrouter carried it, from its own counters")
            _say("               (native = unencapsulated, vxlan/geneve = tunnelled, masquerade = SNAT);")
            _say(
                "         RTT: median ping round trip of 5 (ms); THROUGHPUT: iperf3 TCP for "
                f"{seconds:g}s (Mbit/s); WHY: the rule that chose the path"
            )
            _say()
            header = f"{'FROM -> TO':<16} {'PATH':<11} {'RTT':>8} {'THROUGHPUT':>12}  WHY"
            _say(header)
            _say("-" * len(header))
            pods = ["pod1", "pod2", "pod3"]
            pairs: list[tuple[str, str, str, str | None]] = [
                (a, b, ref.pods[b].ip, ref.pods[b].node) for a in pods for b in pods if a != b
            ]
            pairs += [(a, "ext", ref.EXTERNAL_ADDR, None) for a in pods]
            rows: list[Row] = []
            servers = {}
            for h in [*(ref.pods[p].host for p in pods), ext]:
                # one iperf3 server per destination for the whole table
                servers[h.ns] = h.popen(
                    ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            for h in [*(ref.pods[p].host for p in pods), ext]:
                _wait_listening(h, 5201)
            for src, dst, dst_ip, dst_node in pairs:
                src_pod = ref.pods[src]
                # one unmeasured echo first: ARP / neighbour resolution on the way would otherwise
                # dominate the average of a handful of pings
                measure.ping_rtt(src_pod.host, dst_ip, count=1, timeout=1)
                before = cluster.packets(src_pod.node)
                rtt = measure.ping_rtt(src_pod.host, dst_ip, count=5, interval=0.1, timeout=1)
                path, _ = delta_path(before, cluster.packets(src_pod.node), minimum=2)
                mbps = None
                if rtt is not None and throughput:
                    mbps = _iperf(src_pod.host, dst_ip, seconds)
                shown = path if (path and rtt is not None) else ("unreachable" if rtt is None else "kernel")
                row = Row(
                    src,
                    dst,
                    dst_ip,
                    shown,
                    rtt["median_ms"] if rtt else None,
                    mbps,
                    _why(src_pod.node, dst, dst_node),
                )
                rows.append(row)
                _say(
                    f"{src + ' -> ' + dst:<16} {row.path:<11} "
                    f"{(f'{row.rtt_ms:.2f} ms' if row.rtt_ms is not None else '-'):>8} "
                    f"{_thr(row, throughput):>12}  {row.why}"
                )
            _say()
            # the shaped pod: same destination as pod1 -> pod3, with an egress limit from its annotation
            limit_bps = 50e6
            base = next((r.mbps for r in rows if (r.src, r.dst) == ("pod1", "pod3")), None)
            shaped_mbps = _iperf(ref.pods[name].host, ref.pods["pod3"].ip, max(3.0, seconds))
            _say(f"shaping: pod '{name}' ({ip}) on node1 carries kubernetes.io/egress-bandwidth: {limit}")
            if shaped_mbps is None:
                _say(f"  {name} -> pod3: iperf3 failed")
            else:
                held = shaped_mbps <= limit_bps / 1e6 * 1.1
                window = max(3.0, seconds)
                _say(
                    f"  {name} -> pod3: {shaped_mbps:.1f} Mbit/s over {window:g}s (limit 50 Mbit/s: "
                    f"{'held' if held else 'NOT held'})"
                    + (f"; unshaped pod1 -> pod3: {base:.0f} Mbit/s" if base else "")
                )
            for p in servers.values():
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
            ok = all(r.path != "unreachable" for r in rows if r.dst != "ext")
            status = 0 if ok else 1
            if not ok:
                _say("\nsome pod pairs were unreachable: see the daemons' logs above the table")
        except (KeyboardInterrupt, Terminated):
            _say("\ninterrupted: tearing down")
            status = 130
        except ClusterError as e:
            print(f"podrouter demo: {e}", file=sys.stderr)
            status = 1
        finally:
            # one teardown for every demo leg (a second Ctrl-C cannot cut it short)
            from podrouter.demo.multi import _teardown

            closers = [cluster.close] if cluster is not None else []
            left = _teardown(topo, closers, t_start)
            status = status or left
    return status


def _thr(row: Row, measured: bool) -> str:
    if row.mbps is not None:
        return f"{row.mbps:.0f} Mbit/s"
    # pings came back but TCP did not: say so rather than leave a blank that reads as "not measured"
    return "TCP failed" if (measured and row.rtt_ms is not None) else "-"


def _wait_listening(host: Any, port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.try_run(["ss", "-Htln", f"sport = :{port}"], timeout=5).stdout.strip():
            return
        time.sleep(0.05)


def _iperf(src: Any, dst_ip: str, seconds: float) -> float | None:
    """Mbit/s received by a running iperf3 server at dst_ip:5201, or None."""
    import json

    secs = max(1, round(seconds))
    r = src.try_run(
        ["iperf3", "-c", dst_ip, "-p", "5201", "-t", str(secs), "-J", "--connect-timeout", "2000"],
        timeout=secs + 20,
    )
    try:
        data = json.loads(r.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
