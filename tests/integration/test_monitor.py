"""`podrouter monitor` against a running daemon: known drops (spoofed tunnel input from a non-peer,
a truncated VXLAN datagram from a peer) show up with their reason, addresses, ports, protocol, path
and pod; filters by pod, reason and address; `--flows` shows forwarded packets; bad filters exit 2."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, podrouter_argv, ref_config
from test_bad_input import inner, send_udp, vxlan

from nettopo import ReferenceTopology


@pytest.fixture
def nodes(ref: ReferenceTopology, daemons: Daemons) -> dict[str, DaemonHandle]:
    return {
        n: daemons.start(ref.nodes[n], ref_config(ref, n, daemons.sockdir, mode="tunnel", peers=[o]))
        for n, o in (("node1", "node2"), ("node2", "node1"))
    }


def monitor(d: DaemonHandle, *args: str) -> subprocess.Popen[bytes]:
    return d.host.popen([*podrouter_argv(), "monitor", "--socket", d.socket, *args])


def collect(proc: subprocess.Popen[bytes], send: Any, timeout: float = 30) -> tuple[int, str, str]:
    """Keep provoking (`send()` every 0.5 s) until the monitor exits (it stops after --count)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        send()
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    return proc.returncode, out.decode(), err.decode()


def spoof_from_router(ref: ReferenceTopology) -> None:
    # R is on node1's segment but is not a peer; the inner packet claims to come from pod2
    send_udp(ref.router, "172.16.2.1", "172.16.2.2", 4789, [vxlan(inner())])


def test_monitor_shows_a_spoofed_packet_with_its_reason(
    nodes: dict[str, DaemonHandle], ref: ReferenceTopology
) -> None:
    d1 = nodes["node1"]
    before = int(d1.counters()["drops"]["unknown_peer"])
    proc = monitor(d1, "--json", "--count", "2", "--timeout", "40")
    rc, out, err = collect(proc, lambda: spoof_from_router(ref))
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2
    ev = events[0]
    assert ev["kind"] == "drop" and ev["reason"] == "unknown_peer"
    assert (ev["path"], ev["direction"], ev["proto"]) == ("vxlan", "ingress", "icmp")
    assert (ev["src"], ev["dst"], ev["dst_pod"]) == ("10.244.2.1", "10.244.1.1", "pod1")
    assert ev["outer"].startswith("172.16.2.1:") and ev["family"] == 4 and ev["len"] > 0
    assert int(d1.counters()["drops"]["unknown_peer"]) >= before + 2


def test_monitor_truncated_vxlan_and_filters(nodes: dict[str, DaemonHandle], ref: ReferenceTopology) -> None:
    d1 = nodes["node1"]

    def provoke() -> None:
        spoof_from_router(ref)  # unknown_peer, from 172.16.2.1: filtered out below
        send_udp(ref.nodes["node2"], "172.16.3.2", "172.16.2.2", 4789, [b"\x08\x00\x00"])  # truncated

    proc = monitor(d1, "--json", "--count", "3", "--reason", "truncated", "--address", "172.16.3.2")
    rc, out, err = collect(proc, provoke)
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 3 and {e["reason"] for e in events} == {"truncated"}
    ev = events[0]
    # nothing inside to read: the outer datagram's addresses and ports
    assert (ev["src"], ev["dst"], ev["proto"], ev["dport"], ev["path"]) == (
        "172.16.3.2",
        "172.16.2.2",
        "udp",
        4789,
        "vxlan",
    )
    assert ev["sport"] == int(ev["outer"].rsplit(":", 1)[1])
    # by pod: only events touching pod1 (the spoofed packets are addressed to it), in the human form
    proc = monitor(d1, "--pod", "pod1", "--count", "1")
    rc, out, err = collect(proc, provoke)
    assert rc == 0, err
    line = out.strip()
    assert "DROP unknown_peer" in line and "10.244.1.1 (pod1)" in line and "via 172.16.2.1:" in line, line


def test_monitor_flows_samples_forwarded_packets(
    nodes: dict[str, DaemonHandle], ref: ReferenceTopology
) -> None:
    d1 = nodes["node1"]
    pod1 = ref.pods["pod1"].host

    def traffic() -> None:
        pod1.run(
            ["ping", "-n", "-q", "-c", "200", "-i", "0.002", "-W", "1", ref.pods["pod2"].ip], check=False
        )

    proc = monitor(d1, "--json", "--flows", "--count", "2", "--address", ref.pods["pod2"].ip)
    rc, out, err = collect(proc, traffic)
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {e["kind"] for e in events} == {"flow"}
    assert {e["path"] for e in events} == {"vxlan"}
    pods = {(e["src_pod"], e["dst"]) for e in events if e["direction"] == "egress"} | {
        (e["dst_pod"], e["src"]) for e in events if e["direction"] == "ingress"
    }
    assert pods <= {("pod1", ref.pods["pod2"].ip)}


def test_monitor_refuses_bad_filters(nodes: dict[str, DaemonHandle]) -> None:
    d1 = nodes["node1"]
    r = d1.host.try_run([*podrouter_argv(), "monitor", "--socket", d1.socket, "--reason", "no_such_reason"])
    assert r.returncode == 2 and "reason: 'no_such_reason' is not a drop reason" in r.stderr, r.stderr
    r = d1.host.try_run([*podrouter_argv(), "monitor", "--socket", d1.socket, "--address", "10.1.2"])
    assert r.returncode == 2 and "--address: '10.1.2' is not an IP address" in r.stderr, r.stderr
    # a monitor that ends turns recording off again; the daemon keeps forwarding
    r = d1.host.try_run([*podrouter_argv(), "monitor", "--socket", d1.socket, "--timeout", "1"])
    assert r.returncode == 0, r.stderr
    assert d1.alive()


def test_monitor_is_rate_limited_under_a_flood(
    nodes: dict[str, DaemonHandle], ref: ReferenceTopology
) -> None:
    d1 = nodes["node1"]
    before = int(d1.counters()["drops"]["unknown_peer"])
    proc = monitor(d1, "--reason", "unknown_peer", "--timeout", "8")
    time.sleep(3)  # connected and recording (the CLI starts in well under a second)
    send_udp(ref.router, "172.16.2.1", "172.16.2.2", 4789, [vxlan(inner())] * 6000)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    drops = [ln for ln in lines if "DROP unknown_peer" in ln]
    limited = [ln for ln in lines if ln.startswith("# rate-limited")]
    counted = int(d1.counters()["drops"]["unknown_peer"]) - before
    # at most 1000 events a second are recorded; the rest are reported as rate-limited
    assert 0 < len(drops) <= 1000 * 3, len(drops)
    assert limited, lines[-5:]
    suppressed = max(int(ln.split()[2].rstrip(",")) for ln in limited)
    assert suppressed > 0
    # every drop the counters saw was either shown or counted as rate-limited
    assert counted >= len(drops) + suppressed > 1000, (counted, len(drops), suppressed)
