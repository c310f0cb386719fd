"""Shaping benchmark: podrouter's bandwidth manager beside the reference CNI `bandwidth` plugin.

For each rate (10M, 100M, 1G) and direction (pod egress, pod ingress), on the same namespace lab
(bench/qos/lab.py: a node, one pod attached as docs/design.md §4b says, a sink), each implementation in
turn shapes the pod; we measure

- accuracy: TCP goodput measured by iperf3 on the receiver (`-O 1`), against the limit less the L2
  overhead (goodput = limit * 1448/1514); reported as the signed error in percent;
- latency under load: ping RTT p50/p99 from the pod to the sink while the pod saturates its own limit.

The reference plugin (/usr/lib/cni/bandwidth, Debian containernetworking-plugins) is run as a chained
CNI plugin on the pod's veth, with the same burst podrouter uses for the rate (max(rate * 1 ms,
2 frames)); its TBF queue is then rate * 25 ms + burst (the plugin's fixed latency).

    python bench/qos_bench.py --quick        # 2 s per measurement, ~1 minute
    python bench/qos_bench.py                # 10 s per measurement
    python bench/qos_bench.py --json out.json

`run(quick) -> dict` is the entry point for the suite runner.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for bench/qos/ (the installed podrouter package is used as is)
    sys.path.insert(0, str(HERE))

from podrouter.demo.netns import Topology  # noqa: E402
from qos.lab import (  # noqa: E402
    GOODPUT_PER_FRAME,
    SINK_ADDR,
    Lab,
    measure,
    percentile,
    ping_rtts,
    reference_bandwidth,
)

RATES = {"10M": 10_000_000, "100M": 100_000_000, "1G": 1_000_000_000}
DIRECTIONS = ("egress", "ingress")
IMPLS = ("podrouter", "reference")


def _burst_bits(rate_bps: int) -> int:
    return max(rate_bps // 1000, 2 * 1514 * 8)


def _one(impl: str, direction: str, rate_name: str, seconds: int, pings: int) -> dict[str, Any]:
    from pyroute2 import NetNS

    from podrouter.qos import BandwidthManager

    rate = RATES[rate_name]
    with Topology("qb") as topo:
        lab = Lab(topo)
        pod = lab.add_pod("pod", "10.244.1.2")
        mgr = ipr = None
        try:
            if impl == "podrouter":
                ipr = NetNS(lab.node.ns)
                mgr = BandwidthManager(ipr, {"node_egress_rate": "10G"})
                key = f"kubernetes.io/{direction}-bandwidth"
                st = mgr.apply("pod", pod.host_interface, pod.ip, {key: str(rate)})
                if st["error"]:
                    raise RuntimeError(st["error"])
            else:
                kw = {"egress_bps": rate} if direction == "egress" else {"ingress_bps": rate}
                reference_bandwidth(lab, pod, "ADD", burst_bits=_burst_bits(rate), **kw)
            assert pod.host.ping(SINK_ADDR)
            result: dict[str, float] = {}

            def load() -> None:
                if direction == "egress":
                    result["bps"] = measure(pod.host, lab.sink, SINK_ADDR, seconds=seconds)
                else:
                    result["bps"] = measure(lab.sink, pod.host, pod.ip, seconds=seconds)

            t = threading.Thread(target=load)
            t.start()
            time.sleep(1.5)  # past iperf3's omitted second: the queue is at its steady state
            interval = max(0.02, (seconds - 2.5) / pings)
            rtts = ping_rtts(pod.host, SINK_ADDR, pings, interval)
            t.join(timeout=seconds + 60)
            bps = result["bps"]
            expected = rate * GOODPUT_PER_FRAME
            return {
                "impl": impl, "direction": direction, "rate": rate_name, "rate_bps": rate,
                "goodput_bps": round(bps), "expected_goodput_bps": round(expected),
                "error_pct": round((bps / expected - 1) * 100, 2),
                "ping_p50_ms": round(percentile(rtts, 50), 3), "ping_p99_ms": round(percentile(rtts, 99), 3),
                "ping_sent": pings, "ping_received": len(rtts),
            }
        finally:
            if mgr is not None:
                mgr.close()
            if ipr is not None:
                ipr.close()


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 2 if quick else 10
    pings = 25 if quick else 150
    rows = [
        _one(impl, direction, rate, seconds, pings)
        for rate in RATES for direction in DIRECTIONS for impl in IMPLS
    ]
    summary = []
    for rate in RATES:
        for direction in DIRECTIONS:
            by_impl = {r["impl"]: r for r in rows if (r["rate"], r["direction"]) == (rate, direction)}
            ours, ref = by_impl["podrouter"], by_impl["reference"]
            summary.append({
                "rate": rate, "direction": direction,
                "podrouter_error_pct": ours["error_pct"], "reference_error_pct": ref["error_pct"],
                "accuracy_at_least_as_good": abs(ours["error_pct"]) <= max(abs(ref["error_pct"]), 1.0),
                "p99_ratio": (round(ref["ping_p99_ms"] / ours["ping_p99_ms"], 1)
                              if ours["ping_p99_ms"] else None),
            })
    return {
        "benchmark": "qos",
        "quick": quick,
        "seconds_per_measurement": seconds,
        "command": "python bench/qos_bench.py" + (" --quick" if quick else ""),
        "goodput_per_frame": GOODPUT_PER_FRAME,
        "results": rows,
        "summary": summary,
    }


def table(report: dict[str, Any]) -> str:
    lines = [f"{'rate':>5} {'dir':>7} {'impl':>9} {'goodput':>12} {'error':>7} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'pings':>6}"]
    for r in report["results"]:
        lines.append(
            f"{r['rate']:>5} {r['direction']:>7} {r['impl']:>9} {r['goodput_bps'] / 1e6:>9.2f} M "
            f"{r['error_pct']:>+6.2f}% {r['ping_p50_ms']:>8.3f} {r['ping_p99_ms']:>8.3f} "
            f"{r['ping_received']:>3}/{r['ping_sent']}"
        )
    lines.append("")
    for s in report["summary"]:
        lines.append(
            f"{s['rate']:>5} {s['direction']:>7}: error {s['podrouter_error_pct']:+.2f}% "
            f"vs {s['reference_error_pct']:+.2f}%"
            f" ({'ok' if s['accuracy_at_least_as_good'] else 'WORSE'}), p99 {s['p99_ratio']}x lower"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 s measurements instead of 10 s")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    report = run(quick=args.quick)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
