"""`podrouter demo --bgp` and `podrouter demo --clusters 2` end to end: the paths in the table come from
the daemons' counters, and nothing is left behind."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers import podrouter_argv


def _path(out: str, src: str, dst: str) -> str:
    m = re.search(rf"^{src} -> {dst}\s+(\S+)", out, re.M)
    assert m, f"no row for {src} -> {dst} in:\n{out}"
    return m.group(1)


def _run(*args: str) -> str:
    proc = subprocess.run([*podrouter_argv(), "demo", *args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"demo failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "torn down: no namespace" in proc.stdout
    return proc.stdout


@pytest.mark.timeout(300)
def test_demo_bgp_goes_native_across_r() -> None:
    out = _run("--bgp", "--no-throughput")
    assert re.search(r"^\s+10\.244\.2\.0/24\s+via 172\.16\.3\.2$", out, re.M), out
    # the plain demo tunnels these (R knows no pod CIDRs); with BGP they cross R natively
    for src, dst in (("pod1", "pod2"), ("pod2", "pod1"), ("pod3", "pod2")):
        assert _path(out, src, dst) == "native", out


@pytest.mark.timeout(300)
def test_demo_two_clusters() -> None:
    out = _run("--clusters", "2", "--no-throughput")
    assert "node1's cluster mesh: this cluster east (id 1)" in out
    assert re.search(r"west \(id 2\) connected", out), out
    assert _path(out, "pod1", "pod3") == "native"
    assert _path(out, "pod3", "pod1") == "native"
    for src, dst in (("pod1", "pod4"), ("pod2", "pod3"), ("pod4", "pod2"), ("pod1", "pod2")):
        assert _path(out, src, dst) == "vxlan", out
