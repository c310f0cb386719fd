"""Where `podrouter run` spends its start (docs/benchmarks.md, "Start-up time"). Run as root:

    python bench/startup_profile.py [--reps 5] [--json OUT]

Builds the reference topology in network namespaces (python/podrouter/demo/netns.py), starts node1's
and node2's daemons (tunnel mode, VXLAN, as the restart bench), then restarts node1's daemon `--reps`
times the way the restart bench does (SIGTERM, then `podrouter run` adopting the state) and
`--reps` times from scratch (`podrouter cleanup` first), each through a wrapper that times every
start phase: the wrapper imports the modules the start needs up front (so "imports" is their whole
cost and the phases below are the work alone), then wraps the daemon's start steps with timers.
Every figure is the median over the repetitions, in milliseconds; "interpreter" is process start to
the wrapper's first line (the interpreter and its site hooks), "ready_after" is `status.ready_after`,
"forwarding_after" `status.forwarding_after` (the workers forwarding: from the forwarding snapshot
on an adopting restart, python/podrouter/startup.py). The wrapper's imports come first, so its
forwarding_after includes them: the "plain" runs (`--reps` more SIGTERM restarts of the plain
`podrouter run`, no wrapper) give the real forward-first figure. "stop" is SIGTERM to the old
daemon's exit (the quick stop), for every run.
Also prints `python -X importtime` for the same imports (its own process, in the namespace).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from podrouter.demo.cluster import Cluster, node_config, podrouter_argv
from podrouter.demo.netns import Topology, reference_topology

# the wrapper runs in the daemon's namespace as `python WRAPPER OUT run --config FILE`
WRAPPER = r"""
import os, sys, time, json, threading
def age():
    with open("/proc/self/stat", "rb") as f:
        start = int(f.read().rsplit(b")", 1)[1].split()[19])
    with open("/proc/uptime", "rb") as f:
        up = float(f.read().split()[0])
    return (up - start / os.sysconf("SC_CLK_TCK")) * 1000
a0 = age()
T = [("interpreter", 0, 0.0, a0)]  # (phase, depth, started at ms after process start, took ms)
out_path = sys.argv.pop(1)
i0 = time.perf_counter()
try:
    import podrouter.entry as entry  # the click-free `run`
except ImportError:
    import podrouter.cli as entry  # before it
from podrouter import config, daemon, discovery, lifecycle, nftables, state, api, monitor
from podrouter.netlink import neigh, plumbing, underlay, rtnl
import podrouter.qos.sizing, podrouter.qos.manager, podrouter._native
import pyroute2.iproute
T.append(("imports", 0, a0, (time.perf_counter() - i0) * 1000))
depth = [0]
def timed(owner, name, label=None):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        if threading.current_thread() is not threading.main_thread():
            return fn(*a, **k)
        d = depth[0]; depth[0] += 1
        at, t0 = age(), time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            depth[0] = d
            T.append((label or name, d, at, (time.perf_counter() - t0) * 1000))
    setattr(owner, name, wrapper)
D = daemon.Daemon
timed(config, "load", "config load")
for n in ("preflight", "start", "_route_conflict_problems", "_recorded_state", "_open_datapath",
          "_nat_snapshot_setup", "_node_sysctls", "_sync_masquerade_guard", "_make_bandwidth",
          "_pod_install", "_install_pod_guard", "_refresh_peers", "_reconcile_locked", "_start_bgp",
          "_start_metrics"):
    if hasattr(D, n):
        timed(D, n)
# since the daemon's split (daemon.py wires bringup/guards/pods/reconcile): the steps are functions
# of those modules, timed where the daemon looks them up
import importlib
def _mod(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
for owner, n in ((_mod("podrouter.bringup"), "route_conflict_problems"),
                 (_mod("podrouter.bringup"), "node_sysctls"),
                 (_mod("podrouter.guards"), "sync_masquerade_guard"),
                 (_mod("podrouter.guards"), "install_pod_guard"),
                 (daemon, "make_bandwidth"),
                 (getattr(_mod("podrouter.pods"), "PodRegistry", None), "install")):
    if owner is not None and hasattr(owner, n):
        timed(owner, n)
timed(underlay, "resolve_underlay"); timed(underlay, "next_hops_for")
for owner, n in ((daemon, "resolve_underlay"), (_mod("podrouter.reconcile"), "next_hops_for")):
    if owner is not None and hasattr(owner, n):
        timed(owner, n)
timed(nftables, "unavailable", "nftables.unavailable")
timed(api, "socket_in_use"); timed(api.ApiServer, "__init__", "ApiServer()")
timed(lifecycle, "adopt", "lifecycle.adopt")
timed(plumbing.Plumbing, "__init__", "Plumbing()"); timed(plumbing.Plumbing, "save", "state save")
timed(plumbing.Plumbing, "sync_routes"); timed(plumbing.Plumbing, "sync_rules")
timed(neigh.NeighborWatcher, "__init__", "NeighborWatcher()")
timed(neigh.NeighborWatcher, "set_wanted"); timed(neigh.NeighborWatcher, "wait_resolved")
timed(neigh.NeighborWatcher, "start", "watcher.start")
timed(discovery, "make", "discovery.make")
timed(podrouter._native, "Tables", "native.Tables()")
timed(pyroute2.iproute, "IPRoute", "IPRoute()"); timed(neigh, "IPRoute", "IPRoute()")
orig_start = D.start
def start(self):
    try:
        orig_start(self)
    finally:
        T.append(("forwarding_after", 0, 0.0, getattr(self, "forwarding_after", 0.0) * 1000))
        T.append(("ready_after", 0, 0.0, self.ready_after * 1000))
        with open(out_path, "w") as f:
            json.dump(T, f)
D.start = start
sys.argv[0] = "podrouter"
entry.main()
"""

IMPORTS = """
try:
    import podrouter.entry
except ImportError:
    import podrouter.cli
from podrouter import config, daemon, discovery, lifecycle, nftables, state, api, monitor
from podrouter.netlink import neigh, plumbing, underlay, rtnl
import podrouter.qos.sizing, podrouter.qos.manager, podrouter._native, pyroute2.iproute
"""


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            time.sleep(0.05)
            return list(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("no phase record")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write every run's phases here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podrouter-startup-"))
    wrapper = work / "wrap.py"
    wrapper.write_text(WRAPPER)
    runs: dict[str, list[list[Any]]] = {"adopt": [], "fresh": [], "plain": []}
    with Topology("su") as topo:
        ref = reference_topology(topo)
        with Cluster(ref) as cluster:
            cfgs = {
                n: node_config(ref, n, cluster.workdir, mode="tunnel", protocol="vxlan", masquerade=False)
                for n in ("node1", "node2")
            }
            cluster.start(cfgs)
            d = cluster.daemons["node1"]
            imp = d.host.try_run([sys.executable, "-X", "importtime", "-c", IMPORTS])
            (work / "importtime.txt").write_text(imp.stderr)
            for rep in range(3 * args.reps):
                kind = ("adopt", "fresh", "plain")[rep % 3]
                assert d.proc is not None
                t0 = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                d.proc.wait(timeout=20)
                stop = ("stop", 0, -1.0, (time.monotonic() - t0) * 1000)
                d.host.procs.remove(d.proc)
                if kind == "fresh":
                    d.host.run([*podrouter_argv(), "cleanup", "--config", str(d.config_path)])
                out = work / f"run{rep}.json"
                argv = [*podrouter_argv(), "run", "--config", str(d.config_path)]
                if kind != "plain":
                    argv = [sys.executable, str(wrapper), str(out), *argv[-3:]]
                with open(d.log_path, "ab") as log:
                    d.proc = d.host.popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
                if kind != "plain":
                    runs[kind].append([stop, *_wait_file(out, d.proc)])
                    cluster.wait_ready(30)
                else:
                    cluster.wait_ready(30)
                    st = cluster.status("node1")
                    runs[kind].append(
                        [
                            stop,
                            ("forwarding_after", 0, 0.0, float(st.get("forwarding_after") or 0) * 1000),
                            ("ready_after", 0, 0.0, float(st.get("ready_after") or 0) * 1000),
                        ]
                    )
                time.sleep(0.5)
    for kind, rs in runs.items():
        print(f"\n{kind} ({len(rs)} runs): phase, median ms (wall) [min-max], calls per run")
        first: dict[tuple[str, int], float] = {}
        values: dict[tuple[str, int], list[float]] = {}
        calls: dict[tuple[str, int], int] = {}
        for r in rs:
            per: dict[tuple[str, int], float] = {}
            for name, depth, at, ms in r:
                key = (name, depth)
                first[key] = min(first.get(key, at), at)
                per[key] = per.get(key, 0.0) + ms
                calls[key] = calls.get(key, 0) + 1
            for key, v in per.items():
                values.setdefault(key, []).append(v)
        last = ("forwarding_after", "ready_after")
        for key in sorted(
            first, key=lambda k: (k[0] in last, last.index(k[0]) if k[0] in last else 0, first[k], k[1])
        ):
            vs = values[key]
            print(
                f"  {'  ' * key[1]}{key[0]:<34} {statistics.median(vs):8.1f}  [{min(vs):.1f}-{max(vs):.1f}]"
                f"  x{calls[key] / len(rs):g}"
            )
    print(f"\nimporttime: {work / 'importtime.txt'}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
