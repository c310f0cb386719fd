"""Restarts under load: how long a long-lived TCP flow stalls while node1's daemon is restarted.

For each path (native pod1 -> pod3 on the shared L2; VXLAN and Geneve pod1 -> pod2 across R) and each
restart kind (`sigterm`: the stop contract, SIGTERM then `podrouter run`; `sigkill`: a crash, then
`podrouter run`; `handover`: `podrouter run --handover` started while the old daemon runs, which
takes its datapath fds over and makes it exit, docs/handover.md), one paced TCP flow
(python/podrouter/bench/flow.py: 1 KiB every millisecond) runs from pod1 while node1's daemon is
restarted once, the successor started as soon as the predecessor has exited (with `handover`: at
once). Reported per case and repetition: whether the flow survived (same connection, every byte
delivered), its longest stall (the longest gap between two reads at the receiver: the time node1 had
no daemon plus TCP's retransmission backoff), the successor's time to forwarding (`forwarding_after`:
its workers forward, from the forwarding snapshot on a restart, python/podrouter/startup.py) and to
ready (`ready_after`), both from its process start, imports included.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from typing import Any

from podrouter.bench import measure
from podrouter.bench.suite import Profile, Progress
from podrouter.demo.cluster import Cluster, node_config, podrouter_argv
from podrouter.demo.netns import Topology, reference_topology

CASES = (
    ("native", "pod3", "native", "vxlan"),
    ("vxlan", "pod2", "tunnel", "vxlan"),
    ("geneve", "pod2", "tunnel", "geneve"),
)
KINDS = ("sigterm", "sigkill", "handover")
PORT = 7000


def _restart(cluster: Cluster, node: str, kind: str) -> tuple[float, float, float]:
    """Restart `node`'s daemon; returns how long the old one took to exit after the signal (0 with
    a handover) and the successor's forwarding_after and ready_after (seconds)."""
    d = cluster.daemons[node]
    assert d.proc is not None
    old = d.proc
    stop_s = 0.0
    if kind != "handover":
        t0 = time.monotonic()
        old.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        old.wait(timeout=20)
        stop_s = time.monotonic() - t0
    extra = ["--handover"] if kind == "handover" else []
    with open(d.log_path, "ab") as log:
        d.proc = d.host.popen(
            [*podrouter_argv(), "run", "--config", str(d.config_path), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    # handover: the old daemon answers status until the successor has taken over and it has exited
    if kind == "handover" and old.wait(timeout=60) != 0:
        raise measure.MeasureError(f"the old daemon exited {old.returncode} after the handover")
    with contextlib.suppress(ValueError):
        d.host.procs.remove(old)
    cluster.wait_ready(30)
    st = cluster.status(node)
    return stop_s, float(st.get("forwarding_after") or 0.0), float(st.get("ready_after") or 0.0)


def _one(path: str, dst_pod: str, mode: str, protocol: str, kind: str, seconds: float) -> dict[str, Any]:
    with Topology("br") as topo:
        ref = reference_topology(topo)
        dst_node = ref.pods[dst_pod].node
        with Cluster(ref) as cluster:
            cfgs = {
                n: node_config(ref, n, cluster.workdir, mode=mode, protocol=protocol, masquerade=False)
                for n in ("node1", dst_node)
            }
            cluster.start(cfgs)
            dst, src = ref.pods[dst_pod], ref.pods["pod1"].host
            flow = [measure.python(), "-m", "podrouter.bench.flow"]
            srv = dst.host.popen([*flow, "serve", dst.ip, str(PORT)])
            try:
                deadline = time.monotonic() + 10
                while not dst.host.try_run(["ss", "-Htln", f"sport = :{PORT}"]).stdout.strip():
                    if time.monotonic() > deadline or srv.poll() is not None:
                        raise measure.MeasureError(f"the flow receiver did not listen on {PORT}")
                    time.sleep(0.05)
                cli = src.popen([*flow, "send", dst.ip, str(PORT), f"{seconds:.1f}"])
                time.sleep(seconds / 3)
                stop_s, forwarding_after, ready_after = _restart(cluster, "node1", kind)
                c_out, _ = cli.communicate(timeout=seconds + 60)
                s_out, _ = srv.communicate(timeout=30)
            finally:
                if srv.poll() is None:
                    srv.kill()
                    srv.wait(timeout=5)
    sent = json.loads(c_out.decode().strip().splitlines()[-1])
    got = json.loads(s_out.decode().strip().splitlines()[-1])
    survived = bool(sent.get("ok") and got.get("ok") and got.get("bytes") == sent.get("sent"))
    return {
        "survived": survived,
        "max_stall_ms": got.get("max_gap_ms"),
        "stop_s": round(stop_s, 3),
        "forwarding_after_s": round(forwarding_after, 3),
        "ready_after_s": round(ready_after, 3),
        "sent": sent,
        "received": got,
    }


def run(prof: Profile, nreps: int, log: Progress) -> dict[str, Any]:
    seconds = 6.0 if prof.name == "quick" else 9.0
    results: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    for rep in range(nreps):
        for path, dst_pod, mode, protocol in CASES:
            for kind in KINDS:
                key = f"{path}/{kind}"
                try:
                    r = _one(path, dst_pod, mode, protocol, kind, seconds)
                except Exception as e:  # noqa: BLE001 - one failed case must not lose the others
                    errors.append(f"{key} rep {rep + 1}: {e}")
                    log(f"restart {key} rep {rep + 1}: failed: {e}")
                    continue
                results.setdefault(key, []).append(r)
                if not r["survived"]:
                    errors.append(f"{key} rep {rep + 1}: the flow died: {r['sent']} {r['received']}")
                log(
                    f"restart {key} rep {rep + 1}: {'survived' if r['survived'] else 'DIED'}, longest stall "
                    f"{r['max_stall_ms']} ms, old daemon gone after {r['stop_s']} s, successor forwarding "
                    f"after {r['forwarding_after_s']} s, ready after {r['ready_after_s']} s"
                )
        log(f"restart rep {rep + 1}/{nreps} done", step=True)
    summary = {
        key: {
            "survived": sum(1 for r in rs if r["survived"]),
            "runs": len(rs),
            "max_stall_ms": max((r["max_stall_ms"] or 0) for r in rs),
            "median_stall_ms": sorted(r["max_stall_ms"] or 0 for r in rs)[len(rs) // 2],
            "stop_s": sorted(r["stop_s"] for r in rs)[len(rs) // 2],
            "forwarding_after_s": sorted(r["forwarding_after_s"] for r in rs)[len(rs) // 2],
            "ready_after_s": sorted(r["ready_after_s"] for r in rs)[len(rs) // 2],
        }
        for key, rs in results.items()
    }
    return {"seconds": seconds, "results": results, "summary": summary, "errors": errors}


def table(result: dict[str, Any]) -> str:
    lines = [
        "restart (node1's daemon restarted under a paced TCP flow from pod1)",
        f"{'path/kind':<16} {'survived':>9} {'longest stall ms':>17} {'median stall ms':>16} "
        f"{'stop s':>7} {'forwarding after s':>19} {'ready after s':>14}",
    ]
    for key, s in result.get("summary", {}).items():
        lines.append(
            f"{key:<16} {s['survived']:>4}/{s['runs']:<4} {s['max_stall_ms']:>17} {s['median_stall_ms']:>16} "
            f"{s.get('stop_s', '-'):>7} {s.get('forwarding_after_s', '-'):>19} {s['ready_after_s']:>14}"
        )
    for e in result.get("errors", []):
        lines.append(f"  ! {e}")
    return "\n".join(lines)


__all__ = ["CASES", "KINDS", "run", "table"]
