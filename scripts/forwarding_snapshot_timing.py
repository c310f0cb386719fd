"""What the forwarding snapshot (startup.py) costs a reconcile at N peers (default 5000).

A timing script, not a test: no kernel, no root. It builds the table spec of N tunnel peers with
plan.build_spec, then times, median of --reps:

- build_spec itself (for scale: the reconcile pays it on every event);
- `inline`: what the reconcile paid under the daemon's lock before (startup.payload + startup.write:
  the JSON encoding of the whole spec and the temp file + rename);
- `submit`: what it pays now (startup.SnapshotWriter.submit: a hand-over to the writer thread;
  the encoding and write happen there, off the lock, latest wins);
- `written`: submit until the file is on disk (the writer's flush), for comparison with `inline`.

    python scripts/forwarding_snapshot_timing.py [--peers 5000] [--reps 15]

Figures are ratios within one run; give the load average with them (the script prints it).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from podrouter import config, startup
from podrouter.config import PeerConfig
from podrouter.plan import PeerView, build_spec

CFG = """
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.0.0.0/24}
cluster: {pod_cidr: 10.0.0.0/8}
"""


def peers(n: int) -> list[PeerView]:
    out = []
    for i in range(1, n + 1):
        addr = ipaddress.IPv4Address(0xAC100000 + 10 + i)  # 172.16.0.x ...
        cidr = ipaddress.IPv4Network((0x0A000000 + (i << 8), 24))  # 10.(i>>8).(i&255).0/24
        p = PeerConfig(name=f"node{i + 1}", address=addr, pod_cidrs=(cidr,))
        out.append(PeerView(p, False, ipaddress.IPv4Address("172.16.0.1"), "02:00:00:00:00:01"))
    return out


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="podrouter-fwd-") as tmp:
        cfg = config.loads(CFG.replace("node: {", f"api: {{socket: {tmp}/n.sock}}\nnode: {{"))
        views = peers(args.peers)
        gw = {"ip": "172.16.0.1", "mac": "02:00:00:00:00:01"}
        dp_config = {"tun_name": "podr0", "workers": 1, "underlay_address": "172.16.2.2"}
        path = Path(tmp) / "node1.forwarding.json"
        spec = build_spec(cfg, 1, gw, views)
        t_build = median_ms(lambda: build_spec(cfg, 1, gw, views), args.reps)

        def inline() -> None:
            startup.write(path, startup.payload(cfg, "0" * 64, dp_config, spec))

        t_inline = median_ms(inline, args.reps)
        size = path.stat().st_size
        path.unlink()
        writer = startup.SnapshotWriter(path)
        try:
            t_submit = median_ms(lambda: writer.submit(cfg, "0" * 64, dp_config, spec), args.reps)
            writer.flush()

            def written() -> None:
                writer.submit(cfg, "0" * 64, dp_config, spec)
                writer.flush()

            t_written = median_ms(written, args.reps)
        finally:
            writer.close(flush=True)
        assert len(json.loads(path.read_bytes())["spec"]["peers"]) == args.peers  # the writer wrote it
    print(f"peers {args.peers}, snapshot {size / 1e6:.2f} MB, median of {args.reps}")
    print(f"  build_spec                      {t_build:8.2f} ms")
    print(f"  inline payload+write (before)   {t_inline:8.2f} ms  (under the lock)")
    print(f"  writer.submit (after)           {t_submit:8.3f} ms  (under the lock)")
    print(f"  submit until written (thread)   {t_written:8.2f} ms  (off the lock)")
    print(f"  under-lock ratio after/before   {t_submit / t_inline:8.4f}")
    print(f"  load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
