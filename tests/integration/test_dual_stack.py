"""Dual-stack pods across the reference topology (docs/design.md §4 `pod_cidrs: [v4, v6]`, §4b "/32 (and
/128)"): IPv6 pod traffic over VXLAN and Geneve across R, native IPv6 on the shared L2, IPv4 at the same
time, the pods' link-local gateway, per-destination MTU (ICMPv6 packet too big from the node's kernel),
hop-limit handling and spoofed inner IPv6 sources.

Every pod of the reference topology holds `fd00:10:244:<n>::1/128` with `default via fe80::1`; the
configs here register the pods with `ips: [v4, v6]` in the cluster `[10.244.0.0/16, fd00:10:244::/48]`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, python_in, ref_config, wait_for
from test_paths import iperf

from nettopo import ReferenceTopology, capture

POD6 = {"pod1": "fd00:10:244:1::1", "pod2": "fd00:10:244:2::1", "pod3": "fd00:10:244:3::1"}
POD_NET6_BPF = "ip6 and net fd00:10:244::/48"  # a pod IPv6 address in the outer header


def start_dual(
    ref: ReferenceTopology, daemons: Daemons, nodes: tuple[str, ...], **kw: Any
) -> dict[str, DaemonHandle]:
    return {
        n: daemons.start(ref.nodes[n], ref_config(ref, n, daemons.sockdir, dual_stack=True, **kw))
        for n in nodes
    }


def routes6(d: DaemonHandle) -> dict[str, dict[str, Any]]:
    out = json.loads(d.host.ip("-6 -j -d route show proto 77") or "[]")
    return {r["dst"]: r for r in out}


def counters(d: DaemonHandle) -> tuple[dict[str, int], dict[str, int]]:
    c = d.counters()
    return dict(c.get("packets") or {}), dict(c.get("drops") or {})


def ping_both_families(ref: ReferenceTopology, a: str, b: str) -> None:
    """IPv4 and IPv6 between pods a and b at the same time, both directions."""
    results: dict[str, bool] = {}
    pods = ref.pods

    def go(key: str, src: str, dst: str) -> None:
        results[key] = pods[src].host.ping(dst, count=3)

    jobs = [
        threading.Thread(target=go, args=(f"{a}->{b} v4", a, pods[b].ip)),
        threading.Thread(target=go, args=(f"{a}->{b} v6", a, POD6[b])),
        threading.Thread(target=go, args=(f"{b}->{a} v4", b, pods[a].ip)),
        threading.Thread(target=go, args=(f"{b}->{a} v6", b, POD6[a])),
    ]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(timeout=30)
    assert results and all(results.values()) and len(results) == 4, results


# ------------------------------------------------------------------------------------------ tunnel


@pytest.mark.parametrize(("protocol", "port", "mtu"), [("vxlan", 4789, 1450), ("geneve", 6081, 1450)])
def test_ipv6_over_tunnel_across_r(
    ref: ReferenceTopology, daemons: Daemons, protocol: str, port: int, mtu: int
) -> None:
    ds = start_dual(ref, daemons, ("node1", "node2"), mode="tunnel", protocol=protocol)
    d1 = ds["node1"]
    # the kernel side: the peer's v6 pod CIDR into podr0 with the tunnel MTU, the cluster's v6 space
    # into the datapath too, the pod's /128 to its veth, and the link-local gateway on that veth
    r6 = routes6(d1)
    assert r6["fd00:10:244:2::/64"]["dev"] == "podr0" and r6["fd00:10:244:2::/64"]["metrics"][0]["mtu"] == mtu
    assert r6["fd00:10:244::/48"]["dev"] == "podr0"
    assert r6["fd00:10:244:1::1"]["dev"] == "veth-pod1"
    assert "fe80::1/64" in ref.nodes["node1"].ip("-6 -br addr show dev veth-pod1")
    assert ref.nodes["node1"].run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).strip() == "1"
    # podr0 carries IPv6 but says nothing on its own: no link-local address, no multicast (no MLD)
    assert "inet6" not in ref.nodes["node1"].ip("-6 addr show dev podr0")

    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    with (
        capture(ref.router, "p-node2", POD_NET6_BPF) as leaked,
        capture(ref.router, "p-node2", f"udp port {port}") as tunnel,
    ):
        ping_both_families(ref, "pod1", "pod2")
        iperf(pod1, pod2, POD6["pod2"])
        iperf(pod2, pod1, POD6["pod1"], port=5202)
    # R only ever sees node addresses: the IPv6 pods travel inside UDP over the IPv4 underlay
    assert leaked == [], leaked[:5]
    assert any("172.16.2.2." in ln and f"172.16.3.2.{port}:" in ln for ln in tunnel), tunnel[:5]
    assert any("172.16.3.2." in ln and f"172.16.2.2.{port}:" in ln for ln in tunnel), tunnel[:5]
    packets, drops = counters(d1)
    assert packets.get(f"{protocol}/egress", 0) > 0 and packets.get(f"{protocol}/ingress", 0) > 0
    # no IPv6 chatter of podr0 itself (router solicitations, MLD with hop limit 1) reached the datapath
    assert drops.get("ttl_exceeded", 0) == 0, drops


def test_ipv6_packet_too_big_and_hop_limit(ref: ReferenceTopology, daemons: Daemons) -> None:
    """Oversized IPv6 gets ICMPv6 packet-too-big from node1's kernel (the route MTU of the VXLAN path),
    and a packet whose hop limit runs out is dropped, never looped."""
    ds = start_dual(ref, daemons, ("node1", "node2"), mode="tunnel", protocol="vxlan")
    pod1 = ref.pods["pod1"].host
    assert pod1.ping(POD6["pod2"], count=2)
    # 1400 + 8 + 40 = 1448 <= 1450 fits; 1440 + 48 = 1488 does not, and IPv6 routers never fragment
    assert pod1.ping(POD6["pod2"], count=2, size=1400, df=True)
    assert not pod1.ping(POD6["pod2"], count=2, size=1440, df=True)
    learned = pod1.run(["ip", "-6", "route", "get", POD6["pod2"]])
    assert "mtu 1450" in learned, learned  # the pod's kernel took the packet-too-big
    # with fragmentation allowed the pod's own stack now sends 1450-byte fragments: they arrive
    assert pod1.ping(POD6["pod2"], count=2, size=1440)

    # hop limit 1: node1's kernel answers time exceeded itself; hop limit 2 reaches the datapath with
    # 1 left, which the peer's kernel could not forward: dropped and counted
    _, before = counters(ds["node1"])
    r = pod1.try_run(["ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-t", "2", POD6["pod2"]])
    assert r.returncode != 0
    _, after = counters(ds["node1"])
    assert after.get("ttl_exceeded", 0) - before.get("ttl_exceeded", 0) >= 2, after
    r = pod1.try_run(["ping", "-6", "-n", "-c", "1", "-W", "1", "-t", "1", POD6["pod2"]])
    assert "Time exceeded" in r.stdout or "Time to live exceeded" in r.stdout, r.stdout


# ------------------------------------------------------------------------------------------ native


def test_ipv6_native_on_the_shared_l2(ref: ReferenceTopology, daemons: Daemons) -> None:
    ds = start_dual(ref, daemons, ("node1", "node3"), mode="native")
    r6 = routes6(ds["node1"])
    assert r6["fd00:10:244:3::/64"]["metrics"][0]["mtu"] == 1500
    pod1, pod3 = ref.pods["pod1"].host, ref.pods["pod3"].host
    with capture(ref.router, "p-node3", "ip6 or udp") as lines:
        ping_both_families(ref, "pod1", "pod3")
        iperf(pod1, pod3, POD6["pod3"], seconds=1)
    # on the wire unchanged: the pod IPv6 addresses, sent to node3's MAC, no tunnel port
    assert any(f"{POD6['pod1']} > {POD6['pod3']}: ICMP6, echo request" in ln for ln in lines), lines[:10]
    assert any(f"{POD6['pod3']} > {POD6['pod1']}: ICMP6, echo request" in ln for ln in lines), lines[:10]
    assert not any(".4789:" in ln or ".6081:" in ln for ln in lines)
    for d in ds.values():
        packets, _ = counters(d)
        assert packets.get("native/egress", 0) > 0


# ----------------------------------------------------------------------------------------- spoofing


SPOOF = r"""
import socket, struct, sys

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def icmp6_echo(src, dst, seq):
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    body = struct.pack("!BBHHH", 128, 0, 0, 0x5151, seq) + b"spoof" * 8
    pseudo = s + d + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", csum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + s + d + body

src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for seq in range(count):
    vxlan = struct.pack("!B3xI", 0x08, 1 << 8)
    eth = bytes.fromhex("02700a0a0a0a" "027000000001") + struct.pack("!H", 0x86DD)
    sock.sendto(vxlan + eth + icmp6_echo(src, dst, seq), ("172.16.2.2", 4789))
"""


def test_spoofed_inner_ipv6_source_is_dropped(ref: ReferenceTopology, daemons: Daemons) -> None:
    """node2 is a known peer, but only for fd00:10:244:2::/64: an inner IPv6 source outside it (here
    node3's pod) is dropped and counted, and never reaches pod1; a legitimate one is delivered."""
    d1 = start_dual(ref, daemons, ("node1",), mode="tunnel", peers=["node2"])["node1"]
    n2 = ref.nodes["node2"]
    _, before = counters(d1)
    with capture(ref.pods["pod1"].host, "eth0", "icmp6 and ip6[40] == 128") as seen:
        r = python_in(n2, f"import sys; sys.argv = ['x', '{POD6['pod3']}', '{POD6['pod1']}', '5']\n{SPOOF}")
        assert r.returncode == 0, r.stderr
        wait_for(
            lambda: (
                counters(d1)[1].get("spoofed_inner_source", 0) - before.get("spoofed_inner_source", 0) >= 5
            ),
            5,
            what="5 spoofed_inner_source drops",
        )
        r = python_in(
            n2, f"import sys; sys.argv = ['x', 'fd00:10:244:2::77', '{POD6['pod1']}', '3']\n{SPOOF}"
        )
        assert r.returncode == 0, r.stderr
        wait_for(lambda: counters(d1)[0].get("vxlan/ingress", 0) >= 3, 5, what="the legitimate datagrams")
    assert not any(POD6["pod3"] in ln for ln in seen), seen
    assert any("fd00:10:244:2::77 > fd00:10:244:1::1: ICMP6, echo request" in ln for ln in seen), seen[:5]


def test_dual_stack_pod_via_api(ref: ReferenceTopology, daemons: Daemons) -> None:
    """`podrouter pod add --ip V4 --ip V6` registers both addresses; `pod del` removes the /128 and the
    link-local gateway again."""
    ds = start_dual(ref, daemons, ("node1", "node2"), mode="tunnel", pods=False)
    d1 = ds["node1"]
    ds["node2"].cli(
        "pod",
        "add",
        "pod2",
        "--ip",
        "10.244.2.1",
        "--ip",
        POD6["pod2"],
        "--host-interface",
        "veth-pod2",
        "--socket",
        ds["node2"].socket,
    )
    r = d1.cli(
        "pod",
        "add",
        "pod1",
        "--ip",
        "10.244.1.1",
        "--ip",
        POD6["pod1"],
        "--host-interface",
        "veth-pod1",
        "--socket",
        d1.socket,
    )
    assert r.returncode == 0, r.stderr
    assert POD6["pod1"] in r.stdout
    pods = {p["name"]: p for p in d1.status()["pods"]}
    assert pods["pod1"]["ips"] == ["10.244.1.1", POD6["pod1"]]
    ping_both_families(ref, "pod1", "pod2")
    # an IPv6 address outside the node's pod CIDRs is refused
    r = d1.cli(
        "pod",
        "add",
        "bad",
        "--ip",
        "10.244.1.9",
        "--ip",
        "fd00:10:244:2::9",
        "--host-interface",
        "veth-pod1",
        "--socket",
        d1.socket,
    )
    assert r.returncode != 0 and "fd00:10:244:2::9" in (r.stderr + r.stdout)
    assert d1.cli("pod", "del", "pod1", "--socket", d1.socket).returncode == 0
    assert POD6["pod1"] not in routes6(d1)
    assert "fe80::1/64" not in ref.nodes["node1"].ip("-6 -br addr show dev veth-pod1")
    code, _ = d1.stop()
    assert code == 0
    assert routes6(d1) == {}
