"""`podrouter bench`: the benchmark suite (docs/design.md §5, docs/benchmarks.md).

In one run, on the reference topology built in network namespaces: kernel routing, kernel VXLAN,
podrouter native, VXLAN, Geneve and hybrid, each measured the same way (TCP 1 and 4 streams, small
UDP datagrams from a batched sender, RTT p50/p99, CPU seconds per gigabit); then masquerade versus
nftables, the shaping-accuracy benchmark and, with `--micro`, the criterion microbenchmarks.

Output: progress lines on stderr, tables on stdout, and `result.json` plus PNG plots in the output
directory (default `bench/results/<timestamp>/`). The exit status is 0 when every selected mode
produced every figure, 1 when something failed (the JSON says what), 2 on bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from podrouter import native
from podrouter.demo.netns import Terminated, signals_unwind

__all__ = ["build_parser", "main", "run_suite"]

SECTIONS = ("masquerade", "shaping", "scale", "micro", "restart")


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]

    try:
        pr_version = native.version()
    except native.NativeUnavailable:
        pr_version = "native module missing"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "podrouter": pr_version,
        "iperf3": version(["iperf3", "--version"]),
        "sockperf": version(["sockperf", "--version"]).replace("sockperf, ", ""),
        "loadavg_at_start": os.getloadavg(),
    }


def _select(only: str | Iterable[str] | None, micro: bool) -> tuple[list[Any], set[str]]:
    from podrouter.bench.suite import ALL_SETUPS, SETUPS, UNDERLAY6_SETUPS

    if only is None or only == "" or only == ():
        return list(SETUPS), {"masquerade", "shaping", "scale"} | ({"micro"} if micro else set())
    names = [n.strip() for part in ([only] if isinstance(only, str) else only) for n in part.split(",")]
    setups: list[Any] = []
    sections: set[str] = {"micro"} if micro else set()
    for n in filter(None, names):
        if n in SECTIONS:
            sections.add(n)
            continue
        if n == "modes":
            matched = list(SETUPS)
        elif n == "kernel":
            matched = [s for s in SETUPS if s.kind != "podrouter"]
        elif n == "podrouter":
            matched = [s for s in SETUPS if s.kind == "podrouter"]
        elif n == "underlay6":
            matched = list(UNDERLAY6_SETUPS)
        else:
            matched = [s for s in ALL_SETUPS if n == s.name or n in (leg.name for leg in s.legs)]
        if not matched:
            names = [s.name for s in ALL_SETUPS]
            known = ", ".join([*names, "modes", "kernel", "podrouter", "underlay6", *SECTIONS])
            raise ValueError(f"--only: unknown part {n!r} (known: {known})")
        setups.extend(s for s in matched if s not in setups)
    # canonical order: the baselines first, so the table reads top-down
    return sorted(setups, key=list(ALL_SETUPS).index), sections


def _default_out() -> Path:
    from podrouter.bench.extras import source_tree

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = source_tree() or Path.cwd()
    return base / "bench" / "results" / stamp


def _preflight() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("the benchmark builds network namespaces: run it as root")
    for tool in ("ip", "iperf3", "sockperf", "ss", "nft", "ping"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (scripts/bootstrap.sh installs it)")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="podrouter bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--quick", action="store_true", help="1 repetition, short runs (CI smoke test, < 3 min)")
    p.add_argument("--out", help="output directory (default bench/results/<timestamp>)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    p.add_argument(
        "--only",
        action="append",
        help="comma-separated parts: kernel-routing, kernel-vxlan, native, vxlan, geneve, hybrid, "
        "kernel-vxlan6, vxlan6 (underlay6: both; IPv6 underlay, not in the default run), "
        "kernel, podrouter, modes, masquerade, shaping, scale, micro, restart (not run by default)",
    )
    p.add_argument("--micro", action="store_true", help="also run and summarise the criterion benchmarks")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="print the result document (result.json) on stdout; progress and tables go to stderr",
    )
    return p


def main(argv: list[str] | None = None, **opts: Any) -> int:
    """Entry point: `main(["--quick"])` (what `podrouter bench ARGS` calls) or `main(quick=True, ...)`."""
    if argv is not None:
        try:
            a = build_parser().parse_args(list(argv))
        except SystemExit as e:  # --help, or bad options (argparse already printed why)
            return int(e.code or 0)
        opts = {
            "quick": a.quick,
            "out": a.out,
            "reps": a.reps,
            "only": a.only,
            "micro": a.micro,
            "plots": a.plots,
            **opts,
        }
        if a.as_json:
            # the tables and the progress move to stderr; stdout carries exactly one JSON document,
            # the run's result.json (its directory fixed here, so it is known afterwards)
            out = Path(opts["out"]) if opts.get("out") else _default_out()
            with contextlib.redirect_stdout(sys.stderr):
                rc = run_suite(**{**opts, "out": out})
            path = out / "result.json"
            doc = json.loads(path.read_text()) if path.is_file() else {"ok": False, "exit": rc}
            print(json.dumps(doc, indent=2))
            return rc
    return run_suite(**opts)


def run_suite(
    quick: bool = False,
    out: str | Path | None = None,
    reps: int | None = None,
    only: str | Iterable[str] | None = None,
    micro: bool = False,
    plots: bool = True,
    **_ignored: Any,
) -> int:
    """Run the suite; returns the exit status (0 all figures, 1 something failed, 2 bad options)."""
    from podrouter.bench import report
    from podrouter.bench.suite import PROFILES, Progress, run_modes

    prof = PROFILES["quick" if quick else "full"]
    nreps = prof.reps if reps is None else int(reps)
    if nreps < 1 or nreps > 50:
        print("podrouter bench: --reps must be between 1 and 50", file=sys.stderr)
        return 2
    try:
        setups, sections = _select(only, micro)
    except ValueError as e:
        print(f"podrouter bench: {e}", file=sys.stderr)
        return 2
    needs_netns = bool(setups) or bool(sections & {"masquerade", "shaping", "scale", "restart"})
    problems = _preflight() if needs_netns else []
    if problems:
        for p in problems:
            print(f"podrouter bench: {p}", file=sys.stderr)
        return 2
    out_dir = Path(out) if out else _default_out()
    out_dir.mkdir(parents=True, exist_ok=True)

    steps = (
        nreps * len(setups)
        + (nreps if "masquerade" in sections else 0)
        + len(sections & {"shaping", "scale", "micro"})
        + (nreps if "restart" in sections else 0)
    )
    log = Progress(max(1, steps))
    result: dict[str, Any] = {
        "format": 1,
        "command": shlex.join(["podrouter", "bench", *sys.argv[2:]])
        if sys.argv[1:2] == ["bench"]
        else shlex.join(sys.argv),
        "profile": prof.name,
        "reps": nreps,
        "params": {
            "tcp_seconds": prof.tcp_seconds,
            "udp_seconds": prof.udp_seconds,
            "rtt_seconds": prof.rtt_seconds,
            "udp_payload_bytes": prof.udp_size,
            "native_pair": "pod1->pod3 (node1->node3, shared L2)",
            "tunnel_pair": "pod1->pod2 (node1->node2, across R)",
        },
        "machine": _machine(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    json_path = out_dir / "result.json"

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")

    failed = False
    t0 = time.monotonic()
    log(f"profile {prof.name}, {nreps} rep(s), output {out_dir}")
    with signals_unwind():
        try:
            if setups:
                _check_loadgen(log)
                result["modes"] = run_modes(setups, prof, nreps, log)
                failed |= any(m["errors"] or len(m["summary"]) < 6 for m in result["modes"].values())
                save()
            if "masquerade" in sections:
                from podrouter.bench import masq

                result["masquerade"] = masq.run(prof, nreps, log)
                failed |= any(r["errors"] for r in result["masquerade"]["results"].values())
                save()
            if "shaping" in sections:
                from podrouter.bench import extras

                result["shaping"] = extras.shaping(quick, log)
                save()
            if "scale" in sections:
                from podrouter.bench import scale

                result["scale"] = scale.run(quick, log)
                log("scale done", step=True)
                lost = result["scale"].get("stream", {}).get("lost")
                failed |= bool(result["scale"]["errors"]) or lost != 0
                save()
            if "restart" in sections:
                from podrouter.bench import restart

                result["restart"] = restart.run(prof, nreps, log)
                failed |= bool(result["restart"]["errors"])
                save()
            if "micro" in sections:
                from podrouter.bench import extras

                result["micro"] = extras.micro(quick, log)
                failed |= "reason" in result["micro"]
                save()
        except (KeyboardInterrupt, Terminated):
            result["interrupted"] = True
            save()
            print(f"\npodrouter bench: interrupted; partial results in {json_path}", file=sys.stderr)
            return 130
    result["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    save()

    print()
    if "modes" in result:
        print(report.modes_table(result["modes"]))
        print()
        print(report.LEGEND)
        if report.ovs_comparison(result["modes"]):
            print(report.ovs_comparison(result["modes"]))
        for name, m in result["modes"].items():
            for err in dict.fromkeys(m["errors"]):
                print(f"  ! {name}: {err}")
        print()
    if "masquerade" in result:
        print(report.masquerade_table(result["masquerade"]))
        print()
    if "shaping" in result:
        print(report.shaping_text(result["shaping"]))
        print()
    if "scale" in result:
        from podrouter.bench import scale

        print(scale.table(result["scale"]))
        print()
    if "restart" in result:
        from podrouter.bench import restart

        print(restart.table(result["restart"]))
        print()
    if "micro" in result:
        print(report.micro_table(result["micro"]))
        print()
    if plots:
        try:
            written = report.plots(result, out_dir)
            if "scale" in result:
                from podrouter.bench import scale

                png = scale.plot(result["scale"], out_dir)
                if png is not None:
                    written.append(png)
            result["plots"] = [p.name for p in written]
            save()
        except ImportError as e:
            print(f"podrouter bench: no plots (matplotlib missing: {e})", file=sys.stderr)
    print(f"results: {json_path}  ({result['elapsed_s']:.0f}s)")
    return 1 if failed else 0


def _check_loadgen(log: Any) -> None:
    why = native.available()
    if why is not None:
        log(f"WARNING: {why}: UDP figures will be missing")
        return
    if not native.has_load_generators():
        log(
            "WARNING: this podrouter._native has no udp_blast (rust/py/src/blast.rs not registered): "
            "UDP figures will be missing"
        )
