"""`podrouter bench --quick` end to end: the CI smoke test of the benchmark suite.

It checks that one quick run measures every mode and writes sane figures (positive, finite, p99 >= p50),
the masquerade and shaping sections, the plots, and that nothing is left behind. It never asserts a
performance ratio: CI machines differ, and a smoke test that fails on a slow runner teaches nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import podrouter_argv

from podrouter.bench.suite import LEG_NAMES, METRICS


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.timeout(480)
def test_bench_quick_measures_every_mode(tmp_path: Path) -> None:
    before = _namespaces()
    proc = subprocess.run(
        [*podrouter_argv(), "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=460,
        check=False,
    )
    assert proc.returncode == 0, (
        f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    # progress is shown while it runs
    assert "[bench " in proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["profile"] == "quick" and result["reps"] == 1

    modes = result["modes"]
    assert set(modes) == set(LEG_NAMES)
    for name, m in modes.items():
        assert m["errors"] == [], f"{name}: {m['errors']}"
        for key in METRICS:
            s = m["summary"].get(key)
            assert s is not None, f"{name}: no {key}"
            assert s["n"] == 1
            assert math.isfinite(s["median"]) and s["median"] > 0, f"{name}: {key} = {s['median']}"
        assert m["summary"]["rtt_p99_us"]["median"] >= m["summary"]["rtt_p50_us"]["median"]
        # podrouter legs check their own counters: the traffic went the way the mode says
        if not name.startswith("kernel-routing"):
            assert m["reps"][0].get("path_ok") is True, f"{name}: path not verified"
        if m["baseline"]:
            assert set(m["ratios"]) == set(METRICS), f"{name}: ratios missing"
    for label, _, _ in METRICS.values():
        assert label in proc.stdout  # the terminal table

    masq = result["masquerade"]
    nft = masq["results"]["nftables"]
    assert nft["errors"] == []
    assert nft["summary"]["cps"]["median"] > 0 and nft["summary"]["tcp1_gbps"]["median"] > 0
    # what one connection cost the machine (bench/masq.py): some CPU, and a finite count of switches
    assert nft["summary"]["cpu_us_per_conn"]["median"] > 0
    assert math.isfinite(nft["summary"]["ctxt_per_conn"]["median"])
    assert "CPU us/conn" in proc.stdout
    if masq["podrouter_available"]:
        pr = masq["results"]["podrouter"]
        assert pr["summary"]["cps"]["median"] > 0 and pr["summary"]["tcp1_gbps"]["median"] > 0
        assert pr["summary"]["cpu_us_per_conn"]["median"] > 0
        # the daemon's NAT figures are kept with each repetition
        rep = pr["reps"][0]
        assert rep["nat_entries"] > 0 and rep["nat_alloc_failures"] >= 0, rep
    else:
        assert masq["podrouter_unavailable"], "an unavailable side must say why"
        assert "not available" in proc.stdout

    shaping = result["shaping"]
    assert shaping["available"] is True or shaping["reason"]

    # the control-plane scale leg at its quick size: simulated nodes in a real etcd, one daemon
    sc = result["scale"]
    assert sc["errors"] == [], sc["errors"]
    assert [s["nodes"] for s in sc["steps"]] == [100, 200]
    for s in sc["steps"]:
        assert s["serve_ms"] > 0 and s["compile_ms"] > 0 and s["swap_ms"] >= 0, s
        assert s["routes_changed"] == 100 and s["routes_per_s"] > 0 and s["rss_mb"] > 0, s
    assert sc["churn"]["swaps"] == 3
    assert sc["stream"]["sent"] > 0 and sc["stream"]["lost"] == 0, sc["stream"]
    assert "Control-plane scale" in proc.stdout
    assert (tmp_path / "scale.png").stat().st_size > 10_000

    assert (tmp_path / "modes.png").stat().st_size > 10_000
    left = {n for n in _namespaces() - before if n.startswith(("prbn", "prbm", "prbs"))}
    assert not left, f"namespaces left behind: {left}"


def test_bench_rejects_unknown_part(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*podrouter_argv(), "bench", "--only", "warp-drive", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "warp-drive" in proc.stderr and "kernel-vxlan" in proc.stderr
