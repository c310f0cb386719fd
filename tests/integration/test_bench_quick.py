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


@pytest.mark.timeout(420)
def test_bench_quick_measures_every_mode(tmp_path: Path) -> None:
    before = _namespaces()
    proc = subprocess.run(
        [*podrouter_argv(), "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
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
    if masq["podrouter_available"]:
        pr = masq["results"]["podrouter"]
        assert pr["summary"]["cps"]["median"] > 0 and pr["summary"]["tcp1_gbps"]["median"] > 0
    else:
        assert masq["podrouter_unavailable"], "an unavailable side must say why"
        assert "not available" in proc.stdout

    shaping = result["shaping"]
    assert shaping["available"] is True or shaping["reason"]

    assert (tmp_path / "modes.png").stat().st_size > 10_000
    assert not {n for n in _namespaces() - before if n.startswith(("prbn", "prbm"))}, "namespaces left behind"


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
