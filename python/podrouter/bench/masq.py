"""Masquerade: podrouter's SNAT against the kernel's nftables masquerade, same topology, same load.

pod1 (node1) talks to the external host 203.0.113.10 behind R, which cannot route pod addresses, so
the only way back is through node1's translation. Two figures per side: new TCP connections per
second (the native connect-rate generator, 4 threads, each connection reset on close so no TIME_WAIT
piles up; this exercises the NAT's allocation path) and bulk TCP throughput (iperf3, 1 stream).

Beside the rate, each side's cost per new connection: the machine's busy CPU microseconds and
context switches (/proc/stat) per completed connection during the connect run, so what limits the
rate is visible (docs/benchmarks.md, "Masquerade new connections"). Both are machine-wide: a
machine busy before the run (> DISTURBED_CPU) is flagged (`cpu_disturbed`, `*` in the table).

The podrouter side runs only when the daemon actually translates: the suite starts node1 with
`masquerade.enabled: true`, pings the external host from pod1 and requires the daemon's masquerade
counter to move. Anything else is reported as "not available" with the reason, never as a figure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from podrouter.bench import kernel, measure
from podrouter.bench.suite import DISTURBED_CPU, Profile, Progress, summarize
from podrouter.demo.cluster import Cluster, delta_path, node_config
from podrouter.demo.netns import ReferenceTopology, Topology, reference_topology, sh

ACCEPT_PORT = 8080
NFT_TABLE = "podrouter_bench_masq"


def _nft_masquerade(ref: ReferenceTopology) -> None:
    kernel.attach_pods(ref)
    node = ref.nodes["node1"]
    rules = f"""
table ip {NFT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {ref.CLUSTER_CIDR} ip daddr != {ref.CLUSTER_CIDR} oifname "eth0" masquerade
  }}
}}
"""
    sh("ip", "netns", "exec", node.ns, "nft", "-f", "-", input=rules)


# the per-side figures summarised, and whether a higher value is better
FIGURES = {"cps": True, "tcp1_gbps": True, "cpu_us_per_conn": False, "ctxt_per_conn": False}


def per_connection(connections: int, cpu_busy_s: float, ctxt: int) -> dict[str, float]:
    """What one completed connection cost the machine: busy CPU microseconds and context switches."""
    n = max(1, connections)
    return {"cpu_us_per_conn": cpu_busy_s * 1e6 / n, "ctxt_per_conn": ctxt / n}


def _connect_rate(ref: ReferenceTopology, seconds: float, threads: int = 4) -> dict[str, Any]:
    ext, pod = ref.external, ref.pods["pod1"].host
    loadgen = [measure.python(), "-m", "podrouter.bench.loadgen"]
    with measure.server(
        ext, [*loadgen, "accept", "--port", str(ACCEPT_PORT), "--seconds", f"{seconds + 10:.1f}"], ACCEPT_PORT
    ):
        r = pod.try_run(
            [
                *loadgen,
                "connect",
                "--dst",
                ref.EXTERNAL_ADDR,
                "--port",
                str(ACCEPT_PORT),
                "--seconds",
                f"{seconds:.1f}",
                "--threads",
                str(threads),
            ],
            timeout=seconds + 20,
        )
    if r.returncode != 0:
        why = r.stderr.strip()[:300]
        raise measure.MeasureError(f"connect generator failed (exit {r.returncode}): {why}")
    rep = json.loads(r.stdout)
    if rep["connections"] <= 0:
        raise measure.MeasureError(f"no connection completed ({rep['errors']} errors)")
    return rep


def _measure(
    ref: ReferenceTopology,
    prof: Profile,
    log: Progress,
    label: str,
    nat: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`nat`: the podrouter daemon's counters (its NAT figures are kept with the rep)."""
    pod = ref.pods["pod1"].host
    out: dict[str, Any] = {"errors": []}
    try:
        background = measure.background_cpu(prof.background_seconds)
        before = nat() if nat else {}
        cpu0 = measure.CpuTimes.now()
        c = _connect_rate(ref, prof.tcp_seconds)
        cpu = measure.CpuTimes.now() - cpu0
        out["cps"] = c["cps"]
        out["connect_errors"] = c["errors"]
        out.update(per_connection(c["connections"], cpu.busy, cpu.ctxt))
        out["background_cpu"] = background
        out["cpu_disturbed"] = background > DISTURBED_CPU
        if nat:
            after = nat()
            # the port range is what a 4-thread client to one endpoint could exhaust: how full it
            # got, and whether a new flow ever found no port
            out["nat_entries"] = after.get("nat_entries", 0)
            out["nat_alloc_failures"] = after.get("nat_alloc_failures", 0) - before.get(
                "nat_alloc_failures", 0
            )
        log(
            f"masquerade/{label}: {c['cps']:.0f} new connections/s ({c['errors']} errors), "
            f"{out['cpu_us_per_conn']:.0f} CPU us and {out['ctxt_per_conn']:.2f} context switches "
            f"per connection{' (machine busy before)' if out['cpu_disturbed'] else ''}"
        )
    except (measure.MeasureError, ValueError, KeyError) as e:
        out["errors"].append(f"connect rate: {e}")
        log(f"masquerade/{label}: connect rate FAILED: {e}")
    try:
        t = measure.tcp_throughput(pod, ref.external, ref.EXTERNAL_ADDR, prof.tcp_seconds, 1)
        out["tcp1_gbps"] = t["gbps"]
        log(f"masquerade/{label}: TCP 1 stream {t['gbps']:.2f} Gbit/s")
    except measure.MeasureError as e:
        out["errors"].append(f"TCP: {e}")
        log(f"masquerade/{label}: TCP FAILED: {e}")
    return out


def _nftables_rep(prof: Profile, log: Progress) -> dict[str, Any]:
    with Topology("bm") as topo:
        ref = reference_topology(topo)
        _nft_masquerade(ref)
        if not measure.ping_rtt(ref.pods["pod1"].host, ref.EXTERNAL_ADDR, count=2):
            return {"errors": ["pod1 cannot reach the external host through nftables masquerade"]}
        return _measure(ref, prof, log, "nftables")


def _podrouter_rep(prof: Profile, log: Progress) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None) or (None, why podrouter masquerade is not available)."""
    with Topology("bm") as topo:
        ref = reference_topology(topo)
        with Cluster(ref) as cluster:
            cfgs = {
                n: node_config(ref, n, cluster.workdir, mode="hybrid", masquerade=True) for n in ref.nodes
            }
            try:
                cluster.start(cfgs)
            except Exception as e:  # noqa: BLE001 - a daemon that rejects or fails the config
                return None, f"the daemon did not start with masquerade.enabled: {str(e).splitlines()[0]}"
            before = cluster.packets("node1")
            ok = measure.ping_rtt(ref.pods["pod1"].host, ref.EXTERNAL_ADDR, count=3)
            path, delta = delta_path(before, cluster.packets("node1"))
            if path != "masquerade" or not ok:
                return None, (
                    f"pod1 -> {ref.EXTERNAL_ADDR} ping {'answered' if ok else 'got no reply'}, "
                    f"daemon counters moved {delta} (no masquerade path yet)"
                )
            # ICMP alone is not enough: the figures are TCP, so handshakes must come back, every one
            # of them (a masquerade whose replies are sometimes answered by the node's own stack
            # with a RST is not available yet, it is broken; its figures would mean nothing)
            try:
                probe = _connect_rate(ref, 1.0, threads=1)
            except (measure.MeasureError, ValueError, KeyError) as e:
                return None, f"ping is translated, but TCP through the masquerade fails ({e})"
            if probe["errors"]:
                total = probe["connections"] + probe["errors"]
                return None, (
                    f"ping is translated, but {probe['errors']} of {total} TCP handshakes through the "
                    f"masquerade failed within 1 s"
                )

            def counters() -> dict[str, Any]:
                try:
                    return dict(cluster.status("node1").get("counters", {}))
                except (OSError, ValueError):  # the figures of the rep do not depend on it
                    return {}

            return _measure(ref, prof, log, "podrouter", counters), None


def run(prof: Profile, reps: int, log: Progress) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"nftables": [], "podrouter": []}
    unavailable: str | None = None
    for rep in range(1, reps + 1):
        log(f"masquerade: rep {rep}/{reps}: nftables")
        try:
            runs["nftables"].append(_nftables_rep(prof, log))
        except Exception as e:  # noqa: BLE001
            runs["nftables"].append({"errors": [f"{type(e).__name__}: {e}"]})
        if unavailable is None:
            log(f"masquerade: rep {rep}/{reps}: podrouter")
            t0 = time.monotonic()
            res, unavailable = _podrouter_rep(prof, log)
            if res is not None:
                runs["podrouter"].append(res)
            else:
                log(f"masquerade: podrouter not available: {unavailable} ({time.monotonic() - t0:.0f}s)")
        log(f"masquerade: rep {rep}/{reps} done", step=True)
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        summary = {}
        for key in FIGURES:
            vals = [r[key] for r in rs if isinstance(r.get(key), int | float)]
            if vals:
                summary[key] = summarize(vals)
        results[name] = {
            "summary": summary,
            "reps": rs,
            "errors": [e for r in rs for e in r.get("errors", [])],
        }
    ratios = {}
    if "podrouter" in results and "nftables" in results:
        for key in FIGURES:
            a = results["podrouter"]["summary"].get(key)
            b = results["nftables"]["summary"].get(key)
            if a and b and b["median"]:
                ratios[key] = a["median"] / b["median"]
    out: dict[str, Any] = {
        "results": results,
        "ratios": ratios,
        "podrouter_available": "podrouter" in results,
    }
    if unavailable:
        out["podrouter_unavailable"] = unavailable
    return out
