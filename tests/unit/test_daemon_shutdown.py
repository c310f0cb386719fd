"""daemon.py (and plan.py) without a kernel: the shutdown order and the masquerade exhaustion log line."""

from __future__ import annotations

import pytest

from podrouter import config, daemon, nftables, plan
from recorder import Recorder

CFG = """
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
masquerade: {port_range: 61000-61099, max_entries: 5000}
"""


def test_shutdown_stops_the_datapath_before_removing_the_masquerade_guard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    d = daemon.Daemon(config.loads(CFG))
    d.datapath = Recorder("datapath", calls)
    d.pods.bandwidth = Recorder("bandwidth", calls)
    d.plumbing = Recorder("plumbing", calls, state=Recorder("state", calls, nft_guard=True))
    monkeypatch.setattr(nftables, "remove_guard", lambda: calls.append("nftables.remove_guard"))
    d.shutdown()
    # while the workers run, a reply without the guard reaches the node's stack too (RST); with the
    # workers stopped first, the guard drops replies until nothing forwards them any more
    assert calls.index("datapath.stop") < calls.index("nftables.remove_guard"), calls
    # the TUN goes last, after the routes into it
    assert calls.index("plumbing.teardown") < calls.index("datapath.close"), calls
    assert d.datapath is None


def test_nat_exhausted_log_line_names_the_cause() -> None:
    cfg = config.loads(CFG)
    ports = plan.nat_exhausted_message(cfg, 7, 100)
    assert "7 new flows dropped" in ports and "port range exhausted" in ports and "61000-61099" in ports
    assert "table is full" not in ports
    full = plan.nat_exhausted_message(cfg, 3, 5000)
    assert "table is full" in full and "masquerade.max_entries 5000" in full
    assert "port range exhausted" not in full
    # without masquerade.max_entries, the datapath's default bound applies
    dflt = config.loads(CFG.replace(", max_entries: 5000", ""))
    assert "port range exhausted" in plan.nat_exhausted_message(dflt, 1, 5000)
    assert "table is full" in plan.nat_exhausted_message(dflt, 1, 1 << 20)
