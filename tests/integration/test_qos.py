"""Bandwidth manager in network namespaces: accuracy, priorities, isolation, live changes, DSCP, cleanup.

One node namespace with pods attached as docs/design.md §4b says and a sink namespace behind the node
(bench/qos/lab.py). Rates are measured by iperf3 on the receiver with `-O 1` (the first second, slow
start and queue fill, is not counted).

L2 overhead allowance: the shapers count Ethernet frames (1514 bytes for a full segment), iperf3
counts TCP payload (1448 bytes with timestamps), so a pod limited to R is expected to deliver
R * 1448/1514 = 0.956 R of goodput; "within 5%" is measured against that expectation.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from nettopo import Topology, capture  # noqa: E402
from podrouter.qos import BandwidthManager, parse_quantity  # noqa: E402
from qos.lab import GOODPUT_PER_FRAME, SINK_ADDR, Lab, measure, ping_rtts, rr_samples, tc  # noqa: E402

EGRESS = "kubernetes.io/egress-bandwidth"
INGRESS = "kubernetes.io/ingress-bandwidth"
PRIORITY = "podrouter.io/priority"
DSCP = "podrouter.io/dscp"
TOLERANCE = 0.05
# long enough that one loss-recovery episode of the shaped TCP flow (a congestion-avoidance drop at
# 10M) does not decide the average; 5 s windows measured 92% now and then
ACCURACY_SECONDS = 10


@pytest.fixture
def lab(topo: Topology) -> Lab:
    return Lab.two_pods(topo)


@pytest.fixture
def ipr(lab: Lab) -> Iterator[NetNS]:
    ns = NetNS(lab.node.ns)
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def mgr(ipr: NetNS) -> Iterator[BandwidthManager]:
    m = BandwidthManager(ipr, {"enabled": True, "node_egress_rate": "10G"})
    try:
        yield m
    finally:
        m.close()


# Below the limit the tests allow more: a shaper never makes a flow slower than the machine can
# carry it, and on this two-CPU lab a slow moment of the machine (seen in CI and on a quiet machine,
# 2026-12-01: 88-94 % for 20 minutes, the same with the previous release's code) takes the flow's
# rate down with it. Above the limit the bound stays TOLERANCE: that is the shaping guarantee. The
# benchmark (bench/qos_bench.py) holds accuracy to +-2 % on a quiet machine.
SHORTFALL_TOLERANCE = 0.12


def _within(measured: float, limit_bps: int) -> None:
    expected = limit_bps * GOODPUT_PER_FRAME
    assert -SHORTFALL_TOLERANCE * expected <= measured - expected <= TOLERANCE * expected, (
        f"measured {measured / 1e6:.2f} Mbit/s, expected {expected / 1e6:.2f} Mbit/s "
        f"({measured / expected * 100:.1f}%) for a limit of {limit_bps / 1e6:g} Mbit/s"
    )


@pytest.mark.parametrize("rate", ["10M", "100M", "1G"])
def test_egress_accuracy(lab: Lab, mgr: BandwidthManager, rate: str) -> None:
    pa = lab.pods["pa"]
    st = mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: rate})
    assert st["error"] is None and st["egress_bps"] == parse_quantity(rate)
    _within(measure(pa.host, lab.sink, SINK_ADDR, seconds=ACCURACY_SECONDS), parse_quantity(rate))
    counters = mgr.status()["pa"]["egress"]
    assert counters["sent_packets"] > 1000 and counters["overlimits"] > 0  # the shaper did the work


@pytest.mark.parametrize("rate", ["10M", "100M", "1G"])
def test_ingress_accuracy(lab: Lab, mgr: BandwidthManager, rate: str) -> None:
    pa = lab.pods["pa"]
    st = mgr.apply("pa", pa.host_interface, pa.ip, {INGRESS: rate})
    assert st["error"] is None and st["ingress_bps"] == parse_quantity(rate)
    _within(measure(lab.sink, pa.host, pa.ip, seconds=ACCURACY_SECONDS), parse_quantity(rate))
    assert mgr.status()["pa"]["ingress"]["sent_packets"] > 1000


def _parallel(flows: dict[str, tuple]) -> dict[str, float]:
    results: dict[str, float] = {}

    def run(name: str, args: tuple) -> None:
        results[name] = measure(*args)

    threads = [threading.Thread(target=run, args=(n, a)) for n, a in flows.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_priority_split_under_node_budget(lab: Lab, ipr: NetNS) -> None:
    """Budget 100M; guaranteed 60%, burstable 30%, besteffort 10%. A guaranteed and a besteffort pod,
    both unlimited, both saturating: besteffort keeps its 10M share, guaranteed gets its 60M plus the
    idle burstable share lent in priority order: 90M.

    The split is read from the pods' HTB class counters over one window in which both flows are known
    to run. Two iperf3 runs started from two threads never cover exactly the same seconds, and
    whichever runs alone for a moment takes the whole budget, which says nothing about the split."""
    mgr = BandwidthManager(ipr, {"node_egress_rate": "100M",
                                 "priority_shares": {"guaranteed": 60, "burstable": 30, "besteffort": 10}})
    try:
        pa, pb = lab.pods["pa"], lab.pods["pb"]
        assert mgr.apply("pa", pa.host_interface, pa.ip, {PRIORITY: "guaranteed"})["error"] is None
        assert mgr.apply("pb", pb.host_interface, pb.ip, {PRIORITY: "besteffort"})["error"] is None
        got: dict[str, float] = {}
        flows = {"pa": (pa.host, lab.sink, SINK_ADDR, 10, 5301),
                 "pb": (pb.host, lab.sink, SINK_ADDR, 10, 5302)}
        threads = [threading.Thread(target=lambda n=n, a=a: got.setdefault(n, measure(*a)))
                   for n, a in flows.items()]
        for t in threads:
            t.start()
        try:
            # both flows under way: each class has sent for a while and is still sending
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and min(_class_bytes(mgr, p) for p in flows) < 1_000_000:
                time.sleep(0.2)
            time.sleep(1.5)  # past slow start and the queue filling
            b0, t0 = {p: _class_bytes(mgr, p) for p in flows}, time.monotonic()
            time.sleep(4.0)
            b1, t1 = {p: _class_bytes(mgr, p) for p in flows}, time.monotonic()
        finally:
            for t in threads:
                t.join(timeout=60)
        # both flows ran to completion and were measured on the receiver
        assert set(got) == {"pa", "pb"} and min(got.values()) > 0, got
        # class counters count the frames HTB shaped (L2 bytes), the unit the budget is set in
        rate = {p: (b1[p] - b0[p]) * 8 / (t1 - t0) for p in flows}
        assert (1 - SHORTFALL_TOLERANCE) * 100e6 <= rate["pa"] + rate["pb"] <= (1 + TOLERANCE) * 100e6, rate
        assert rate["pb"] == pytest.approx(10e6, rel=0.25), rate
        # the split, not pa's absolute rate: a CPU-starved window can leave the budget a few per cent
        # short (the sum check above allows that), and pa's absolute figure would absorb the whole
        # shortfall (CI once read pa 85.5M, pb 9.9M: a 90/10 split of 95.4M). 90/10 is priority
        # lending; lending in proportion to the shares would give 86/14.
        assert rate["pa"] / (rate["pa"] + rate["pb"]) == pytest.approx(0.9, abs=0.025), rate
    finally:
        mgr.close()


def test_unshaped_pod_beside_shaped_is_not_limited(lab: Lab, mgr: BandwidthManager) -> None:
    pa, pb = lab.pods["pa"], lab.pods["pb"]
    mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M", INGRESS: "10M"})
    mgr.apply("pb", pb.host_interface, pb.ip, {})
    got = _parallel({
        "pa": (pa.host, lab.sink, SINK_ADDR, ACCURACY_SECONDS, 5311),
        "pb": (pb.host, lab.sink, SINK_ADDR, ACCURACY_SECONDS, 5312),
    })
    _within(got["pa"], 10_000_000)
    assert got["pb"] > 300e6, got  # 30x the neighbour's limit: nothing of pa's shaping touches pb
    assert "podr-ifb0" not in tc(lab.node, f"filter show dev {pb.host_interface} ingress")
    assert "htb" not in tc(lab.node, f"qdisc show dev {pb.host_interface}")


def _class_bytes(mgr: BandwidthManager, pod: str) -> int:
    return mgr.status()[pod]["egress"]["sent_bytes"]


def test_live_change_applies_within_one_second(lab: Lab, mgr: BandwidthManager) -> None:
    pa, pb = lab.pods["pa"], lab.pods["pb"]
    mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "20M"})
    mgr.apply("pb", pb.host_interface, pb.ip, {EGRESS: "5M"})
    classes_before = tc(lab.node, "class show dev podr-ifb0")
    pb_before = _class_bytes(mgr, "pb")
    done: dict[str, float] = {}
    t = threading.Thread(target=lambda: done.setdefault("bps", measure(pa.host, lab.sink, SINK_ADDR, 7)))
    t.start()
    try:
        time.sleep(3)
        changed_at = time.monotonic()
        st = mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "80M"})
        assert st["error"] is None and st["egress_bps"] == 80_000_000
        # the window [change + 1 s, change + 2 s] must already run at the new limit (L2 bytes)
        time.sleep(max(0.0, changed_at + 1.0 - time.monotonic()))
        b0, t0 = _class_bytes(mgr, "pa"), time.monotonic()
        time.sleep(1.0)
        b1, t1 = _class_bytes(mgr, "pa"), time.monotonic()
    finally:
        t.join(timeout=60)
    rate = (b1 - b0) * 8 / (t1 - t0)
    # at most the new limit (+10 %), and far above the old one (20M): the change applied; the machine's
    # slow moments take the rate down as in _within
    assert 0.75 * 80e6 <= rate <= 1.10 * 80e6, f"{rate / 1e6:.1f} Mbit/s one second after the change"
    classes_after = tc(lab.node, "class show dev podr-ifb0")
    # replaced in place: same class ids, the other pod's class untouched and its counters not reset
    assert [ln.split()[2] for ln in classes_before.splitlines() if ln.startswith("class htb")] == \
        [ln.split()[2] for ln in classes_after.splitlines() if ln.startswith("class htb")]
    assert _class_bytes(mgr, "pb") >= pb_before
    assert "ceil 80Mbit" in classes_after and "ceil 5Mbit" in classes_after


def test_priority_change_moves_the_pod_without_stopping_it(lab: Lab, mgr: BandwidthManager) -> None:
    pa = lab.pods["pa"]
    first = mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M", PRIORITY: "besteffort"})
    second = mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M", PRIORITY: "guaranteed"})
    assert second["priority"] == "guaranteed" and second["egress_class"] != first["egress_class"]
    classes = tc(lab.node, "class show dev podr-ifb0")
    assert f"class htb {second['egress_class']} parent 1:10 " in classes
    assert f"class htb {first['egress_class']} " not in classes
    assert pa.host.ping(SINK_ADDR)


def test_removing_annotation_removes_limit_and_pod_removal_cleans_up(lab: Lab, mgr: BandwidthManager) -> None:
    pa, pb = lab.pods["pa"], lab.pods["pb"]
    mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M", INGRESS: "10M", DSCP: "EF"})
    mgr.apply("pb", pb.host_interface, pb.ip, {EGRESS: "10M"})
    st = mgr.apply("pa", pa.host_interface, pa.ip, {INGRESS: "10M"})
    assert st["egress_bps"] is None and st["egress"] is None
    assert "podr-ifb0" not in tc(lab.node, f"filter show dev {pa.host_interface} ingress")
    assert measure(pa.host, lab.sink, SINK_ADDR, seconds=3) > 300e6  # egress no longer limited
    mgr.remove("pa")
    assert "pa" not in mgr.status()
    assert tc(lab.node, f"qdisc show dev {pa.host_interface}").split()[1] == "noqueue"
    assert "clsact" not in tc(lab.node, f"qdisc show dev {pa.host_interface}")
    assert tc(lab.node, f"filter show dev {pa.host_interface} ingress").strip() == ""
    # only pb's class tree is left on the IFB (pod class + two leaves), plus the fixed classes
    pb_class = mgr.status()["pb"]["egress_class"]
    pod_classes = [ln for ln in tc(lab.node, "class show dev podr-ifb0").splitlines()
                   if ln.startswith("class htb")
                   and ln.split()[2] not in ("1:1", "1:10", "1:20", "1:30", "1:3")]
    minor = int(pb_class.split(":")[1], 16)
    assert sorted(ln.split()[2] for ln in pod_classes) == sorted(
        f"1:{m:x}" for m in (minor, minor | 0x4000, minor | 0x8000))


def test_bad_annotation_keeps_previous_shaping(lab: Lab, mgr: BandwidthManager) -> None:
    pa = lab.pods["pa"]
    mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M"})
    st = mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10K"})
    assert st["error"] and EGRESS in st["error"] and "'10K'" in st["error"]
    assert st["egress_bps"] == 10_000_000
    assert "ceil 10Mbit" in tc(lab.node, "class show dev podr-ifb0")
    assert mgr.status()["pa"]["error"] == st["error"]
    # a bad annotation on a new pod: reported, nothing programmed, no exception
    pb = lab.pods["pb"]
    st = mgr.apply("pb", pb.host_interface, pb.ip, {PRIORITY: "platinum"})
    assert "platinum" in st["error"] and st["egress"] is None
    # fixing it clears the error
    assert mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "20M"})["error"] is None


def test_dscp_marking_of_pod_egress(lab: Lab, mgr: BandwidthManager) -> None:
    pa = lab.pods["pa"]
    mgr.apply("pa", pa.host_interface, pa.ip, {DSCP: "EF"})
    with capture(lab.sink, "eth0", "-v icmp", count=4) as lines:
        assert pa.host.ping(SINK_ADDR, count=2)
    requests = [ln for ln in lines if "tos 0xb8" in ln]  # EF = 46 << 2 = 0xb8, ECN bits kept (0)
    assert requests, lines
    # header checksum fixed up: the sink answered (the ping succeeded) and tcpdump saw no bad cksum
    assert not any("bad cksum" in ln for ln in lines), lines
    mgr.apply("pa", pa.host_interface, pa.ip, {DSCP: "AF21"})  # live change of the mark
    with capture(lab.sink, "eth0", "-v icmp", count=4) as lines:
        assert pa.host.ping(SINK_ADDR, count=2)
    assert any("tos 0x48" in ln for ln in lines), lines
    mgr.apply("pa", pa.host_interface, pa.ip, {})
    with capture(lab.sink, "eth0", "-v icmp", count=4) as lines:
        assert pa.host.ping(SINK_ADDR, count=2)
    assert any("tos 0x0," in ln for ln in lines) and not any("tos 0x48" in ln for ln in lines), lines


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_shaped_pod_keeps_low_latency_at_its_limit(lab: Lab, mgr: BandwidthManager, direction: str) -> None:
    """A pod saturating its own 10M limit still pings with small RTT: small packets take the pod's
    interactive leaf and never wait behind its bulk queue. 20 pings a second is more than the 8 kbit/s
    the interactive leaf once had as its own rate (issue 16: it then waited seconds behind the bulk
    leaf, which spent the parent's tokens at HTB level 0)."""
    pa = lab.pods["pa"]
    mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS if direction == "egress" else INGRESS: "10M"})
    if direction == "egress":
        t = threading.Thread(target=lambda: measure(pa.host, lab.sink, SINK_ADDR, 6, 5321))
    else:
        t = threading.Thread(target=lambda: measure(lab.sink, pa.host, pa.ip, 6, 5322))
    t.start()
    try:
        time.sleep(2)
        rtts = ping_rtts(pa.host, SINK_ADDR, 40, 0.05)
    finally:
        t.join(timeout=60)
    assert len(rtts) >= 38
    assert sorted(rtts)[int(0.99 * (len(rtts) - 1))] < 5.0, rtts


def _leaf_packets(lab: Lab, dev: str) -> dict[str, int]:
    """Packets sent by each interactive (minor & 0x4000) and bulk (minor & 0x8000) leaf of `dev`."""
    out = {"interactive": 0, "bulk": 0}
    for block in tc(lab.node, f"-s class show dev {dev}").split("\n\n"):
        words = block.split()
        if "htb" not in words or "Sent" not in words:
            continue
        minor = int(words[words.index("htb") + 1].split(":")[1], 16)
        packets = int(words[words.index("Sent") + 3])
        for kind, bit in (("interactive", 0x4000), ("bulk", 0x8000)):
            if minor & bit:
                out[kind] += packets
    return out


def test_request_response_is_interactive_both_ways(lab: Lab, mgr: BandwidthManager) -> None:
    """The benchmark's small TCP request/response (its SYN, 64-byte requests and replies, ACKs) takes
    the pod's interactive leaf in both directions and never its bulk leaf; and the benchmark's split
    of each round trip by kernel receive timestamps (bench/qos/lab.py RrSample) is consistent."""
    pa = lab.pods["pa"]
    st = mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "100M", INGRESS: "100M"})
    assert st["error"] is None
    samples = rr_samples(pa.host, lab.sink, SINK_ADDR, 50, 0.01, 5330)
    assert len(samples) == 50  # every round trip came with both kernel timestamps
    for s in samples:
        assert s.server >= 0 and s.client_wake >= 0 and 0 < s.network < s.total, s
        assert abs(s.client_seen - (s.network + s.client_wake)) < 1e-6
    for dev in (mgr.config.ifb_name, pa.host_interface):
        leaves = _leaf_packets(lab, dev)
        assert leaves["interactive"] >= 51 and leaves["bulk"] == 0, (dev, leaves)


def test_close_removes_every_object(lab: Lab, ipr: NetNS) -> None:
    mgr = BandwidthManager(ipr, {"ifb_name": "qos-close-ifb"})
    for name in ("pa", "pb"):
        p = lab.pods[name]
        mgr.apply(name, p.host_interface, p.ip, {EGRESS: "10M", INGRESS: "20M", DSCP: "CS1"})
    assert "qos-close-ifb" in lab.node.ip("link show")
    mgr.close()
    assert "qos-close-ifb" not in lab.node.ip("link show")
    for name in ("pa", "pb"):
        dev = lab.pods[name].host_interface
        assert tc(lab.node, f"qdisc show dev {dev}").split()[1] == "noqueue"
        assert tc(lab.node, f"filter show dev {dev} ingress").strip() == ""
    mgr.close()  # idempotent


def test_cleanup_after_a_crash_removes_only_our_objects(lab: Lab, ipr: NetNS) -> None:
    from podrouter.qos import cleanup

    mgr = BandwidthManager(ipr, {})
    pa, pb = lab.pods["pa"], lab.pods["pb"]
    mgr.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M", INGRESS: "10M"})
    # pb has a qdisc that is not ours: cleanup must leave it alone
    lab.node.run(f"tc qdisc add dev {pb.host_interface} root handle 1: htb default 1")
    # the daemon "crashes": the manager is dropped without close()
    removed = cleanup(ipr, [pa.host_interface, pb.host_interface])
    assert removed == ["podr-ifb0", f"{pa.host_interface} clsact", f"{pa.host_interface} root htb"]
    assert tc(lab.node, f"qdisc show dev {pa.host_interface}").split()[1] == "noqueue"
    assert "htb 1: root" in tc(lab.node, f"qdisc show dev {pb.host_interface}")
    # a new manager starts from scratch even if an IFB of its name is still there
    mgr2 = BandwidthManager(ipr, {})
    try:
        lab.node.ip("link add podr-ifb0 type ifb")
        assert mgr2.apply("pa", pa.host_interface, pa.ip, {EGRESS: "10M"})["error"] is None
    finally:
        mgr2.close()
