"""`podrouter demo` end to end: the table shows the path each pod pair really took, the shaped pod
holds its limit, and nothing is left behind, also when the demo is interrupted."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from helpers import podrouter_argv


def _demo_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("prdemo")]


def _path(out: str, src: str, dst: str) -> str:
    m = re.search(rf"^{src} -> {dst}\s+(\S+)", out, re.M)
    assert m, f"no row for {src} -> {dst} in:\n{out}"
    return m.group(1)


@pytest.mark.timeout(300)
def test_demo_shows_paths_and_cleans_up() -> None:
    assert not _demo_namespaces(), "a previous demo left namespaces behind"
    proc = subprocess.run(
        [*podrouter_argv(), "demo"], capture_output=True, text=True, timeout=240, check=False
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    # the hybrid decision, read back from the daemons' counters
    assert _path(out, "pod1", "pod3") == "native"
    assert _path(out, "pod3", "pod1") == "native"
    assert _path(out, "pod1", "pod2") == "vxlan"
    assert _path(out, "pod2", "pod1") == "vxlan"
    # the per-peer override between node2 and node3
    assert _path(out, "pod3", "pod2") == "geneve"
    assert _path(out, "pod2", "pod3") == "geneve"
    # leaving the cluster: masquerade where the datapath has it; otherwise the pod address cannot come
    # back through R, and the demo must say so rather than invent a path
    for pod in ("pod1", "pod2", "pod3"):
        assert _path(out, pod, "ext") in ("masquerade", "unreachable")
    # every reachable pair shows an RTT and a throughput figure
    for row in re.findall(r"^pod\d -> pod\d\s+\S+\s+([0-9.]+) ms\s+([0-9.]+) Mbit/s", out, re.M):
        assert float(row[0]) > 0 and float(row[1]) > 0
    assert len(re.findall(r"^pod\d -> pod\d\s+\S+\s+[0-9.]+ ms\s+[0-9.]+ Mbit/s", out, re.M)) == 6
    m = re.search(r"shaped -> pod3: ([0-9.]+) Mbit/s .*limit 50 Mbit/s: held", out)
    assert m, f"shaped pod line missing or limit not held:\n{out}"
    assert 10 < float(m.group(1)) <= 55
    assert "torn down: no namespace" in out
    assert not _demo_namespaces()


@pytest.mark.timeout(120)
def test_demo_interrupted_leaves_nothing() -> None:
    proc = subprocess.Popen(
        [*podrouter_argv(), "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # wait until the namespaces exist and the daemons are starting, then press Ctrl-C
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_demo_namespaces()) < 6:
            time.sleep(0.2)
        assert _demo_namespaces(), "the demo never built its namespaces"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, f"{proc.returncode}\n{out}\n{err}"
    assert "interrupted" in out
    assert not _demo_namespaces()
