"""The parts of the suite that live outside this package: the shaping-accuracy benchmark
(bench/qos_bench.py, owned by the QoS module) and the criterion microbenchmarks of the Rust core.

Both need the source tree (neither ships in the wheel); when it cannot be found they are reported as
not available, with the reason, and the rest of the suite still runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def source_tree() -> Path | None:
    """The podrouter checkout: from the current directory upwards, then from this file (editable
    installs). Recognised by its workspace Cargo.toml next to rust/core."""
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for d in (start, *start.parents):
            if (d / "Cargo.toml").is_file() and (d / "rust" / "core").is_dir() and (d / "bench").is_dir():
                return d
    return None


def shaping(quick: bool, log: Any) -> dict[str, Any]:
    root = source_tree()
    path = root / "bench" / "qos_bench.py" if root else None
    if path is None or not path.is_file():
        return {"available": False, "reason": "bench/qos_bench.py not found (run from the source tree)"}
    spec = importlib.util.spec_from_file_location("podrouter_qos_bench", path)
    if spec is None or spec.loader is None:
        return {"available": False, "reason": f"cannot load {path}"}
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        run = getattr(mod, "run", None)
        if not callable(run):
            return {"available": False, "reason": f"{path} has no run(quick) function"}
        log(f"shaping: running {path.name} run(quick={quick})")
        t0 = time.monotonic()
        result = run(quick=quick)
        log(f"shaping: done in {time.monotonic() - t0:.0f}s", step=True)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - another module's failure is reported, not propagated
        return {"available": False, "reason": f"{path.name} failed: {type(e).__name__}: {e}"}
    return {"available": True, "source": str(path), "result": result}


def micro(quick: bool, log: Any, timeout: float = 1800) -> dict[str, Any]:
    """Run `cargo bench -p podrouter-core --bench core` and summarise target/criterion."""
    root = source_tree()
    if root is None:
        return {"reason": "the source tree (Cargo workspace) was not found"}
    argv = ["cargo", "bench", "-p", "podrouter-core", "--bench", "core", "--", "--noplot"]
    if quick:
        argv += ["--warm-up-time", "1", "--measurement-time", "2"]
    log(f"micro: {' '.join(argv)} (in {root})")
    started = time.time()
    try:
        proc = subprocess.run(
            argv, cwd=root, stdout=sys.stderr, stderr=sys.stderr, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return {"reason": "cargo is not installed"}
    except subprocess.TimeoutExpired:
        return {"reason": f"cargo bench did not finish within {timeout:.0f}s"}
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    benches = parse_criterion(target / "criterion", since=started - 1)
    out: dict[str, Any] = {"command": " ".join(argv), "exit_status": proc.returncode, "benchmarks": benches}
    if proc.returncode != 0:
        out["reason"] = f"cargo bench exited with status {proc.returncode}"
    elif not benches:
        out["reason"] = "cargo bench ran but wrote no criterion estimates"
    log(f"micro: {len(benches)} benchmarks summarised", step=True)
    return out


def parse_criterion(root: Path, since: float | None = None) -> list[dict[str, Any]]:
    """Every `<id>/new/estimates.json` under `root` (written after `since`, if given), as flat records.

    Criterion stores point estimates and 95% confidence bounds in nanoseconds per iteration; the
    benchmark's declared throughput (bytes or elements per iteration) is in `new/benchmark.json`.
    """
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for est in sorted(root.glob("**/new/estimates.json")):
        if since is not None and est.stat().st_mtime < since:
            continue
        try:
            e = json.loads(est.read_text())
            meta_path = est.with_name("benchmark.json")
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            continue
        mean, median = e.get("mean", {}), e.get("median", {})
        if "point_estimate" not in mean or "point_estimate" not in median:
            continue
        # criterion's headline figure is the "typical" time: the slope of the linear-sampling
        # regression when it has one, else the mean
        typical = e.get("slope") if isinstance(e.get("slope"), dict) else mean

        def ci(est: dict[str, Any], bound: str) -> float:
            return float(est.get("confidence_interval", {}).get(bound, est["point_estimate"]))

        rec: dict[str, Any] = {
            "id": meta.get("full_id") or str(est.parent.parent.relative_to(root)),
            "time_ns": float(typical["point_estimate"]),
            "time_lo_ns": ci(typical, "lower_bound"),
            "time_hi_ns": ci(typical, "upper_bound"),
            "mean_ns": float(mean["point_estimate"]),
            "mean_lo_ns": ci(mean, "lower_bound"),
            "mean_hi_ns": ci(mean, "upper_bound"),
            "median_ns": float(median["point_estimate"]),
        }
        thr = meta.get("throughput")
        if isinstance(thr, dict) and thr and rec["time_ns"] > 0:
            unit, amount = next(iter(thr.items()))
            per_iter = float(amount)
            rec["throughput_unit"] = {"Bytes": "B", "BytesDecimal": "B", "Elements": "elem"}.get(unit, unit)
            rec["throughput_per_s"] = per_iter / (rec["time_ns"] * 1e-9)
        out.append(rec)
    return out
