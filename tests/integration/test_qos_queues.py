"""Bounded queues and congestion avoidance under sustained load (issue 16, items 2, 4 and 6).

A pod saturates its 10M limit for 30 s in one direction while the qdisc statistics of every queue the
bandwidth manager made are sampled twice a second. Each queue must have an explicit limit sized from
the rate and `max_queue_delay` (no qdisc inheriting a 1000-packet default), and the backlog seen must
stay within that bound. The egress flow is ECN-capable and must be CE-marked by the eBPF virtual
queue; the ingress flow is not and must see early drops instead. No timing is asserted: only queue
statistics and counters.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from nettopo import Topology  # noqa: E402
from podrouter.qos import BandwidthManager  # noqa: E402
from qos.lab import GOODPUT_PER_FRAME, SINK_ADDR, Lab, measure, measure_flow  # noqa: E402

pytestmark = pytest.mark.integration

RATE = 10_000_000
MAX_QUEUE_DELAY = 0.005
GSO_MAX = 65536
SATURATION_S = 30
EGRESS = "kubernetes.io/egress-bandwidth"
INGRESS = "kubernetes.io/ingress-bandwidth"


def bound_bytes(rate_bps: int) -> int:
    """The queue bound docs/qos.md promises for a pod's bulk leaf: its limit for max_queue_delay (the
    congestion-avoidance target) plus as much again, at least two GSO super-packets, as headroom."""
    target = rate_bps / 8 * MAX_QUEUE_DELAY
    return int(target + max(target, 2 * GSO_MAX))


@pytest.fixture
def lab(topo: Topology) -> Lab:
    return Lab.two_pods(topo)


@pytest.fixture
def mgr(lab: Lab) -> Iterator[BandwidthManager]:
    ipr = NetNS(lab.node.ns)
    m = BandwidthManager(ipr, {"node_egress_rate": "1G", "max_queue_delay": "5ms"}, owns_ipr=True)
    try:
        yield m
    finally:
        m.close()


def _qdiscs(lab: Lab, dev: str) -> list[dict]:
    return json.loads(lab.node.run(["tc", "-s", "-j", "qdisc", "show", "dev", dev]))


def _saturate_and_sample(lab: Lab, direction: str, devs: list[str]) -> tuple[dict, dict[tuple, int]]:
    """Run one 30 s flow at the pod's limit; return the flow's figures and the largest backlog (bytes)
    seen per (device, qdisc kind, handle)."""
    pa = lab.pods["pa"]
    result: dict = {}

    def flow() -> None:
        if direction == "egress":
            result.update(measure_flow(pa.host, lab.sink, SINK_ADDR, seconds=SATURATION_S, port=5331))
        else:
            result.update(measure_flow(lab.sink, pa.host, pa.ip, seconds=SATURATION_S, port=5332))

    t = threading.Thread(target=flow)
    t.start()
    peak: dict[tuple, int] = {}
    try:
        while t.is_alive():
            for dev in devs:
                for q in _qdiscs(lab, dev):
                    key = (dev, q["kind"], q["handle"])
                    peak[key] = max(peak.get(key, 0), int(q.get("backlog", 0)))
            time.sleep(0.5)
    finally:
        t.join(timeout=SATURATION_S + 60)
    return result, peak


def _assert_explicit_limits(lab: Lab, dev: str) -> None:
    for q in _qdiscs(lab, dev):
        kind, opts = q["kind"], q.get("options", {})
        assert kind not in ("pfifo", "pfifo_fast"), f"{dev}: {kind} {q['handle']} takes a default queue"
        if kind == "htb":
            assert opts.get("direct_qlen") == 16, f"{dev}: htb direct queue {opts}"
        if kind == "bfifo":
            assert opts["limit"] <= max(bound_bytes(1_000_000_000), 16 * 1024), f"{dev}: {q}"


def _txqlen(lab: Lab, dev: str) -> int:
    return int(json.loads(lab.node.run(["ip", "-j", "link", "show", dev]))[0]["txqlen"])


def test_egress_backlog_stays_within_its_bound_and_ecn_flows_get_ce(lab: Lab, mgr: BandwidthManager) -> None:
    pa = lab.pods["pa"]
    for host in (pa.host, lab.sink):
        host.sysctl("net.ipv4.tcp_ecn", 1)
    assert mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M"})["error"] is None
    ifb = mgr.config.ifb_name
    _assert_explicit_limits(lab, ifb)
    assert _txqlen(lab, ifb) == 32
    flow, peak = _saturate_and_sample(lab, "egress", [ifb])
    leaf_peaks = {k: v for k, v in peak.items() if k[1] in ("tbf", "bfifo")}
    assert max(leaf_peaks.values()) > 0, f"the flow never queued: not saturated? {peak}"
    for key, backlog in leaf_peaks.items():
        assert backlog <= bound_bytes(RATE), f"{key}: backlog {backlog} over {bound_bytes(RATE)}"
    st = mgr.status()["pa"]["egress"]
    assert st["ecn_marked"] > 0, st
    assert flow["ce_packets"] > 0, flow
    # the shaping still delivers the limit (goodput within 5% of 10M less L2 overhead)
    assert abs(flow["bps"] / (RATE * GOODPUT_PER_FRAME) - 1) < 0.05, flow


def test_ingress_backlog_stays_within_its_bound_and_other_flows_drop_early(
    lab: Lab, mgr: BandwidthManager
) -> None:
    pa = lab.pods["pa"]
    for host in (pa.host, lab.sink):
        host.sysctl("net.ipv4.tcp_ecn", 0)
    assert mgr.apply("pa", pa.host_interface, pa.ip, {INGRESS: "10M"})["error"] is None
    _assert_explicit_limits(lab, pa.host_interface)
    flow, peak = _saturate_and_sample(lab, "ingress", [pa.host_interface])
    leaf_peaks = {k: v for k, v in peak.items() if k[1] in ("tbf", "bfifo")}
    assert max(leaf_peaks.values()) > 0, f"the flow never queued: not saturated? {peak}"
    for key, backlog in leaf_peaks.items():
        assert backlog <= bound_bytes(RATE), f"{key}: backlog {backlog} over {bound_bytes(RATE)}"
    st = mgr.status()["pa"]["ingress"]
    assert st["ecn_marked"] == 0 and st["aqm_dropped"] > 0, st
    assert abs(flow["bps"] / (RATE * GOODPUT_PER_FRAME) - 1) < 0.05, flow


def test_limits_apply_to_pods_on_the_same_node(lab: Lab, mgr: BandwidthManager) -> None:
    """Unlike a shaper on the node's uplink (Cilium's bandwidth manager), a pod's limits hold for
    traffic to and from a pod on the same node: the egress redirect sits on the pod's own veth, before
    routing, and the ingress HTB on the veth towards the pod."""
    pa, pb = lab.pods["pa"], lab.pods["pb"]
    assert mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M"})["error"] is None
    assert mgr.apply("pb", pb.host_interface, pb.ip, {INGRESS: "20M"})["error"] is None
    expected = RATE * GOODPUT_PER_FRAME
    got = measure(pa.host, pb.host, pb.ip, seconds=5, port=5333)  # pa egress 10M governs
    assert abs(got / expected - 1) < 0.05, f"pa -> pb {got / 1e6:.2f} Mbit/s, expected {expected / 1e6:.2f}"
    assert mgr.apply("pa", pa.host_interface, pa.ip, {})["error"] is None  # pa unshaped now
    got = measure(pa.host, pb.host, pb.ip, seconds=5, port=5334)  # pb ingress 20M governs
    assert abs(got / (2 * expected) - 1) < 0.05, f"pa -> pb {got / 1e6:.2f} Mbit/s"
    # and the same-node traffic went through the shapers' classes (counted there)
    st = mgr.status()
    assert st["pb"]["ingress"]["sent_bytes"] > 10_000_000, st["pb"]
