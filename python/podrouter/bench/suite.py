"""The mode comparison: kernel baselines and podrouter's modes measured the same way in one run.

Every (setup, repetition) gets a fresh reference topology (docs/design.md §8), so no state leaks from one
mode into the next, and the repetitions are interleaved across setups (rep 1 of every setup, then
rep 2, ...) so that a slow phase of this shared machine spreads over all modes instead of penalising
one.

A *setup* is what gets built (kernel routes, kernel VXLAN devices, or podrouter daemons with a given
config); a *leg* is one measured pod pair on it. Hybrid has two legs: node1's native path to node3 and
its tunnel to node2, both served by the same daemon at the same time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from podrouter.bench import kernel, measure
from podrouter.demo.cluster import Cluster, delta_path, node_config
from podrouter.demo.netns import ReferenceTopology, Topology, parallel, reference_topology

NATIVE_PAIR = ("pod1", "pod3")  # node1 -> node3, shared L2: where native routing works
TUNNEL_PAIR = ("pod1", "pod2")  # node1 -> node2 across R, which knows no pod CIDRs: tunnels only

# busy CPU seconds per second on the machine before a setup starts above which CPU figures are
# flagged: something else (a build, another benchmark) was competing for the CPUs
DISTURBED_CPU = 0.25

# metric key -> (label, unit, higher_is_better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "tcp1_gbps": ("TCP 1 stream", "Gbit/s", True),
    "tcp4_gbps": ("TCP 4 streams", "Gbit/s", True),
    "udp_kpps": ("UDP 64B frames", "kpps", True),
    "rtt_p50_us": ("RTT p50", "us", False),
    "rtt_p99_us": ("RTT p99", "us", False),
    "cpu_s_per_gbit": ("CPU per Gbit", "s/Gbit", False),
}


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int
    tcp_seconds: float
    udp_seconds: float
    rtt_seconds: float
    background_seconds: float
    udp_size: int = 18  # UDP payload 18 B = IPv4 46 B = a 64-byte Ethernet frame with FCS


PROFILES = {
    "full": Profile("full", reps=3, tcp_seconds=5, udp_seconds=3, rtt_seconds=3, background_seconds=1.0),
    # a smoke test: every code path once, figures only roughly right (CI; must stay under 3 minutes
    # together with the shaping benchmark's own quick run)
    "quick": Profile("quick", reps=1, tcp_seconds=1, udp_seconds=1, rtt_seconds=1, background_seconds=0.3),
}


@dataclass(frozen=True)
class Leg:
    name: str  # the mode's name in the report and the JSON
    pair: tuple[str, str]
    baseline: str | None  # the kernel leg this one is compared with
    expect_path: str  # native | vxlan | geneve | kernel | kernel-vxlan
    description: str


@dataclass(frozen=True)
class Setup:
    name: str
    legs: tuple[Leg, ...]
    kind: str  # kernel-routing | kernel-vxlan | kernel-routing-r | ovs | podrouter
    daemon: dict[str, Any] = field(default_factory=dict)  # node_config() keyword arguments
    underlay: str = "v4"  # reference_topology(underlay=...): v4 | v6


SETUPS: tuple[Setup, ...] = (
    Setup(
        "kernel-routing",
        (
            Leg(
                "kernel-routing",
                NATIVE_PAIR,
                None,
                "kernel",
                "Linux forwarding, route per pod CIDR via the on-link peer node",
            ),
        ),
        "kernel-routing",
    ),
    Setup(
        "kernel-vxlan",
        (
            Leg(
                "kernel-vxlan",
                TUNNEL_PAIR,
                None,
                "kernel-vxlan",
                "Linux vxlan device per node, Flannel-style (nolearning, static FDB)",
            ),
        ),
        "kernel-vxlan",
    ),
    Setup(
        "native",
        (Leg("native", NATIVE_PAIR, "kernel-routing", "native", "podrouter routing.mode native"),),
        "podrouter",
        {"mode": "native"},
    ),
    Setup(
        "vxlan",
        (Leg("vxlan", TUNNEL_PAIR, "kernel-vxlan", "vxlan", "podrouter routing.mode tunnel, VXLAN"),),
        "podrouter",
        {"mode": "tunnel", "protocol": "vxlan"},
    ),
    Setup(
        "geneve",
        (Leg("geneve", TUNNEL_PAIR, "kernel-vxlan", "geneve", "podrouter routing.mode tunnel, Geneve"),),
        "podrouter",
        {"mode": "tunnel", "protocol": "geneve"},
    ),
    Setup(
        "hybrid",
        (
            Leg(
                "hybrid-native",
                NATIVE_PAIR,
                "kernel-routing",
                "native",
                "podrouter hybrid, native_when_on_link: the on-link peer",
            ),
            Leg(
                "hybrid-tunnel",
                TUNNEL_PAIR,
                "kernel-vxlan",
                "vxlan",
                "podrouter hybrid, native_when_on_link: the peer behind R (VXLAN)",
            ),
        ),
        "podrouter",
        {"mode": "hybrid", "protocol": "vxlan", "native_when_on_link": True},
    ),
)
SETUPS += (
    Setup(
        "kernel-routing-r",
        (
            Leg(
                "kernel-routing-r",
                TUNNEL_PAIR,
                None,
                "kernel",
                "Linux forwarding across R, R holding a route per pod CIDR via its node",
            ),
        ),
        "kernel-routing-r",
    ),
    Setup(
        "native-bgp",
        (
            Leg(
                "native-bgp",
                TUNNEL_PAIR,
                "kernel-routing-r",
                "native",
                "podrouter routing.mode native across R, pod CIDRs announced to R over BGP (BIRD 2)",
            ),
        ),
        "podrouter",
        {"mode": "native", "bgp": True},
    ),
)
SETUPS += (
    Setup(
        "ovs",
        (
            Leg(
                "ovs",
                TUNNEL_PAIR,
                "kernel-vxlan",
                "ovs-vxlan",
                "Open vSwitch userspace datapath (netdev) VXLAN on node1 and node2, offloads off on the "
                "veths facing OVS, pod MTU 1450",
            ),
        ),
        "ovs",
    ),
)
# The IPv6 underlay (2001:db8::/32, docs/config.md "IPv6 underlay"): opt-in (`--only underlay6`, or a
# setup's name), not part of the default run, which must stay short enough for CI's quick smoke test.
UNDERLAY6_SETUPS: tuple[Setup, ...] = (
    Setup(
        "kernel-vxlan6",
        (
            Leg(
                "kernel-vxlan6",
                TUNNEL_PAIR,
                None,
                "kernel-vxlan",
                "Linux vxlan device per node over the IPv6 underlay (local 2001:db8::), Flannel-style",
            ),
        ),
        "kernel-vxlan",
        underlay="v6",
    ),
    Setup(
        "vxlan6",
        (
            Leg(
                "vxlan6",
                TUNNEL_PAIR,
                "kernel-vxlan6",
                "vxlan",
                "podrouter routing.mode tunnel, VXLAN over the IPv6 underlay",
            ),
        ),
        "podrouter",
        {"mode": "tunnel", "protocol": "vxlan"},
        underlay="v6",
    ),
)
ALL_SETUPS = SETUPS + UNDERLAY6_SETUPS
SETUP_NAMES = tuple(s.name for s in SETUPS)
LEG_NAMES = tuple(leg.name for s in SETUPS for leg in s.legs)


class Progress:
    """Progress lines on stderr: `[bench 0:42 3/14] vxlan rep 1/3: TCP 4 streams 3.21 Gbit/s`."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.stream = stream or sys.stderr

    def __call__(self, msg: str, step: bool = False) -> None:
        if step:
            self.done += 1
        el = int(time.monotonic() - self.t0)
        print(
            f"[bench {el // 60}:{el % 60:02d} {self.done}/{self.total}] {msg}", file=self.stream, flush=True
        )


def _kernel_vxlan_tx(ref: ReferenceTopology, node: str) -> int:
    r = ref.nodes[node].try_run(["cat", f"/sys/class/net/{kernel.KERNEL_VXLAN_DEV}/statistics/tx_packets"])
    return int(r.stdout.strip() or 0) if r.returncode == 0 else 0


def measure_leg(
    ref: ReferenceTopology,
    leg: Leg,
    prof: Profile,
    log: Progress,
    path_snapshot: Callable[[], Any] | None,
    path_check: Callable[[Any], tuple[bool, str]] | None,
    background: float,
) -> dict[str, Any]:
    """All metrics of one leg, one repetition. Failures of single metrics are recorded, not raised."""
    a, b = ref.pods[leg.pair[0]], ref.pods[leg.pair[1]]
    res: dict[str, Any] = {"errors": []}
    if not measure.ping_rtt(a.host, b.ip, count=3, interval=0.2):
        res["errors"].append(f"{a.name} cannot ping {b.name} ({b.ip}): the path is broken")
        return res
    cpu_busy = wall = 0.0
    gbits = 0.0
    for streams, key in ((1, "tcp1_gbps"), (4, "tcp4_gbps")):
        try:
            snap = path_snapshot() if path_snapshot else None
            t = measure.tcp_throughput(a.host, b.host, b.ip, prof.tcp_seconds, streams)
            if path_check is not None and snap is not None:
                ok, why = path_check(snap)
                res.setdefault("path_ok", True)
                if not ok:
                    res["path_ok"] = False
                    res["errors"].append(f"TCP {streams}: {why}")
            res[key] = t["gbps"]
            res[f"tcp{streams}_retransmits"] = t["retransmits"]
            cpu_busy += t["cpu_busy_s"]
            wall += t["wall_s"]
            gbits += t["bytes"] * 8 / 1e9
            log(
                f"{leg.name}: TCP {streams} stream{'s' if streams > 1 else ''} {t['gbps']:.2f} Gbit/s "
                f"({t['retransmits']} retransmits)"
            )
        except measure.MeasureError as e:
            res["errors"].append(f"TCP {streams}: {e}")
            log(f"{leg.name}: TCP {streams} FAILED: {e}")
    if gbits > 0:
        # system-wide busy CPU seconds during the TCP runs (softirq for kernel modes, the daemons'
        # threads for podrouter, and iperf3 itself in both). No background is subtracted: on a
        # saturated machine our load displaces the background, so a subtraction would be wrong too.
        # A busy machine is flagged instead (DISTURBED_CPU) and the table marks the figure.
        res["cpu_s_per_gbit"] = cpu_busy / gbits
        res["cpu_busy_s"] = cpu_busy
        res["gbits"] = gbits
        res["cpu_disturbed"] = background > DISTURBED_CPU
    try:
        u = measure.udp_rate(a.host, b.host, b.ip, prof.udp_seconds, size=prof.udp_size)
        res["udp_kpps"] = u["rx_pps"] / 1e3
        res["udp_tx_kpps"] = u["tx_pps"] / 1e3
        res["udp_delivered"] = u["delivered"]
        log(
            f"{leg.name}: UDP {u['rx_pps'] / 1e3:.0f} kpps received "
            f"(sender offered {u['tx_pps'] / 1e3:.0f} kpps)"
        )
    except (measure.MeasureError, OSError, ValueError, KeyError) as e:
        res["errors"].append(f"UDP: {e}")
        log(f"{leg.name}: UDP FAILED: {e}")
    try:
        r = measure.rtt_sockperf(a.host, b.host, b.ip, prof.rtt_seconds)
        res["rtt_p50_us"], res["rtt_p99_us"] = r["p50_us"], r["p99_us"]
        log(f"{leg.name}: RTT p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us")
    except measure.MeasureError as e:
        res["errors"].append(f"RTT: {e}")
        log(f"{leg.name}: RTT FAILED: {e}")
    return res


class Teardowns:
    """Tear-downs that run in one background thread while the next setup is being built: every setup
    has its own topology (namespaces with a prefix of their own) and its own work directory (API
    sockets, state files, the fabric's BIRD), so building one never touches what the previous one
    is removing. `wait()` comes before anything is measured, so no measurement overlaps a teardown;
    it re-raises what a teardown raised. `close()` waits for the last one."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-teardown")
        self._pending: list[Future[None]] = []

    def submit(self, fn: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(fn))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if errors:
            raise RuntimeError(f"tearing down the previous setup failed: {errors[0]}") from errors[0]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def run_setup(
    setup: Setup, prof: Profile, log: Progress, teardowns: Teardowns | None = None
) -> dict[str, dict[str, Any]]:
    """Build `setup` on a fresh topology, measure each leg once, tear everything down: at once, or,
    with `teardowns`, in the background while the caller builds the next setup (the previous
    setup's teardown is waited for before this one measures anything)."""
    out: dict[str, dict[str, Any]] = {}
    topo = Topology("bn")
    try:
        ref = reference_topology(topo, underlay=setup.underlay)
    except BaseException:
        topo.close()
        raise
    cluster: Cluster | None = None
    fabric: Any = None
    vteps: list[Any] = []
    try:
        if setup.kind == "kernel-routing":
            kernel.setup_kernel_routing(ref)
        elif setup.kind == "kernel-vxlan":
            kernel.setup_kernel_vxlan(ref)
        elif setup.kind == "kernel-routing-r":
            kernel.setup_kernel_routing_across_r(ref)
        elif setup.kind == "ovs":
            from podrouter.demo.ovs import ovs_vtep

            vteps.append(ovs_vtep(ref, "node1", "node2", "vxlan"))
            vteps.append(ovs_vtep(ref, "node2", "node1", "vxlan"))
        else:
            cluster = Cluster(ref)
            opts = {k: v for k, v in setup.daemon.items() if k != "bgp"}
            cfgs = {n: node_config(ref, n, cluster.workdir, masquerade=False, **opts) for n in ref.nodes}
            # A/B of the UDP-tunnel GSO path in one build (docs/benchmarks.md): tunnel.gso
            gso = os.environ.get("PODROUTER_BENCH_TUNNEL_GSO")
            if gso:
                for node_cfg in cfgs.values():
                    node_cfg["tunnel"]["gso"] = gso
            if setup.daemon.get("bgp"):
                fabric = _bgp_fabric(ref, cluster, cfgs)
            t0 = time.monotonic()
            cluster.start(cfgs)
            if fabric is not None:
                fabric.wait_routes({ref.node_pod_cidr[n]: ref.node_addr[n] for n in ref.nodes})
            log(f"{setup.name}: 3 daemons ready in {time.monotonic() - t0:.1f}s")
        if teardowns is not None:
            teardowns.wait()  # the previous setup is gone before anything is measured
        background = measure.background_cpu(prof.background_seconds)
        for leg in setup.legs:
            snapshot: Callable[[], Any] | None
            check: Callable[[Any], tuple[bool, str]] | None
            if cluster is not None:
                c, src_node, want = cluster, ref.pods[leg.pair[0]].node, leg.expect_path

                def snapshot(c: Cluster = c, n: str = src_node) -> Any:
                    return c.packets(n)

                def check(
                    before: Any, c: Cluster = c, n: str = src_node, want: str = want
                ) -> tuple[bool, str]:
                    got, delta = delta_path(before, c.packets(n), minimum=100)
                    return got == want, f"expected the {want} path, counters moved {delta}"
            elif setup.kind == "kernel-vxlan":
                src_node = ref.pods[leg.pair[0]].node

                def snapshot(n: str = src_node) -> Any:
                    return _kernel_vxlan_tx(ref, n)

                def check(before: Any, n: str = src_node) -> tuple[bool, str]:
                    d = _kernel_vxlan_tx(ref, n) - before
                    return d >= 100, f"{kernel.KERNEL_VXLAN_DEV} sent only {d} packets"
            elif vteps:
                vtep = vteps[0]

                def snapshot(v: Any = vtep) -> Any:
                    return v.tunnel_tx()

                def check(before: Any, v: Any = vtep) -> tuple[bool, str]:
                    d = v.tunnel_tx() - before
                    return d >= 100, f"OVS's tunnel port sent only {d} packets"
            else:
                snapshot = check = None
            res = measure_leg(ref, leg, prof, log, snapshot, check, background)
            res["background_cpu"] = background
            out[leg.name] = res
    except Exception as e:  # noqa: BLE001 - one broken setup must not stop the others
        msg = f"{type(e).__name__}: {e}"
        log(f"{setup.name}: setup FAILED: {msg}")
        for leg in setup.legs:
            out.setdefault(leg.name, {"errors": []})["errors"].append(f"setup: {msg}")
        if not isinstance(e, RuntimeError | OSError):
            traceback.print_exc(file=sys.stderr)
    finally:

        def teardown() -> None:
            try:
                for err in parallel([v.stop for v in vteps])[:1]:
                    raise err
                if fabric is not None:
                    fabric.stop()
                if cluster is not None:
                    cluster.close()
            finally:
                topo.close()

        if teardowns is None:
            teardown()
        else:
            teardowns.submit(teardown)
    return out


def _bgp_fabric(ref: ReferenceTopology, cluster: Cluster, cfgs: dict[str, dict[str, Any]]) -> Any:
    """R runs BIRD 2 as the fabric router; every node config gets a `bgp:` section (docs/bgp.md)."""
    from podrouter.demo.fabric import NODE_ASN, node_bgp, start_fabric

    fabric = start_fabric(
        ref.router, cluster.workdir / "r", "172.16.2.1", {a: NODE_ASN for a in ref.node_addr.values()}
    )
    gateway = {"node1": "172.16.2.1", "node2": "172.16.3.1", "node3": "172.16.2.1"}
    for n, cfg in cfgs.items():
        cfg["bgp"] = node_bgp(gateway[n])
    return fabric


def summarize(values: list[float]) -> dict[str, float | int]:
    vs = sorted(values)
    s: dict[str, float | int] = {"median": statistics.median(vs), "min": vs[0], "max": vs[-1], "n": len(vs)}
    if len(vs) >= 4:
        q = statistics.quantiles(vs, n=4)
        s["q1"], s["q3"] = q[0], q[2]
    return s


def run_modes(setups: list[Setup], prof: Profile, reps: int, log: Progress) -> dict[str, Any]:
    legs = {leg.name: (s, leg) for s in setups for leg in s.legs}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in legs}
    teardowns = Teardowns()
    try:
        for rep in range(1, reps + 1):
            for s in setups:
                log(f"{s.name}: rep {rep}/{reps}: building")
                for name, res in run_setup(s, prof, log, teardowns).items():
                    res["rep"] = rep
                    runs[name].append(res)
                log(f"{s.name}: rep {rep}/{reps} done", step=True)
    finally:
        teardowns.close()  # the last setup's teardown, also when interrupted
    modes: dict[str, Any] = {}
    for name, (s, leg) in legs.items():
        summary = {}
        for key in METRICS:
            vals = [r[key] for r in runs[name] if isinstance(r.get(key), int | float)]
            if vals:
                summary[key] = summarize(vals)
        modes[name] = {
            "setup": s.name,
            "description": leg.description,
            "pair": f"{leg.pair[0]}->{leg.pair[1]}",
            "baseline": leg.baseline,
            "expected_path": leg.expect_path,
            "summary": summary,
            "reps": runs[name],
            "errors": [e for r in runs[name] for e in r.get("errors", [])],
        }
    for m in modes.values():
        base = modes.get(m["baseline"]) if m["baseline"] else None
        m["ratios"] = {}
        if base is None:
            continue
        for key in METRICS:
            if key in m["summary"] and key in base["summary"] and base["summary"][key]["median"]:
                m["ratios"][key] = m["summary"][key]["median"] / base["summary"][key]["median"]
    return modes
