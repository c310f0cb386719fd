"""Hostile and broken tunnel input at a running daemon: dropped, counted under the right reason, never
delivered to a pod, and the daemon keeps running (and keeps forwarding good traffic)."""

from __future__ import annotations

import struct
import subprocess
import time

import pytest
from helpers import DaemonHandle, Daemons, python_in, ref_config, wait_for
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from nettopo import Host, ReferenceTopology, capture


def inner(src: str = "10.244.2.1", dst: str = "10.244.1.1", marker: bytes = b"podrouter-bad-input") -> bytes:
    return bytes(IP(src=src, dst=dst, flags="DF") / ICMP(type=8, id=0x4242, seq=1) / marker)


def vxlan(payload: bytes, vni: int = 1) -> bytes:
    # the inner frame's EtherType follows the IP version nibble (IPv6 0x86DD, else IPv4 0x0800)
    ethertype = 0x86DD if payload[:1] and payload[0] >> 4 == 6 else 0x0800
    eth = Ether(src="02:00:00:00:02:01", dst="02:00:00:00:01:01", type=ethertype)
    return bytes(VXLAN(flags=0x08, vni=vni) / eth / payload)


def geneve(payload: bytes, vni: int = 1, options: bytes = b"", critical: bool = False) -> bytes:
    # RFC 8926 §3.4: Ver(2) OptLen(6) | O C Rsvd(6) | Protocol Type | VNI(24) Rsvd(8)
    assert len(options) % 4 == 0
    flags = 0x40 if critical else 0
    return (
        struct.pack("!BBH", len(options) // 4, flags, 0x0800)
        + struct.pack("!I", vni << 8)
        + options
        + payload
    )


def send_udp(host: Host, src: str, dst: str, port: int, payloads: list[bytes]) -> None:
    """Plain UDP datagrams from `src` (an address of `host`), so the kernel builds valid outer headers."""
    code = (
        "import socket,sys,binascii\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(({src!r},0))\n"
        "for line in sys.stdin.read().split():\n"
        f"    s.sendto(binascii.unhexlify(line),({dst!r},{port}))\n"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", host.ns, "python3", "-c", code],
        input="\n".join(p.hex() for p in payloads),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def drops(d: DaemonHandle) -> dict[str, int]:
    return {k: int(v) for k, v in (d.counters().get("drops") or {}).items()}


def expect_drop(d: DaemonHandle, before: dict[str, int], reason: str, n: int) -> None:
    wait_for(lambda: drops(d).get(reason, 0) - before.get(reason, 0) >= n, 5, what=f"{n} drops as {reason}")


@pytest.fixture
def node1(ref: ReferenceTopology, daemons: Daemons) -> DaemonHandle:
    d1 = daemons.start(ref.nodes["node1"], ref_config(ref, "node1", daemons.sockdir, mode="tunnel"))
    return d1


def test_tunnel_packets_from_a_non_peer_are_dropped(ref: ReferenceTopology, node1: DaemonHandle) -> None:
    before = drops(node1)
    with capture(ref.nodes["node1"], "veth-pod1", "icmp") as delivered:
        # R is on node1's segment but is not a peer
        send_udp(ref.router, "172.16.2.1", "172.16.2.2", 4789, [vxlan(inner())] * 5)
        send_udp(ref.router, "172.16.2.1", "172.16.2.2", 6081, [geneve(inner())] * 5)
        expect_drop(node1, before, "unknown_peer", 10)
    assert delivered == []
    assert node1.alive()


def test_inner_source_outside_the_peer_pod_cidr_is_dropped(
    ref: ReferenceTopology, node1: DaemonHandle
) -> None:
    before = drops(node1)
    with capture(ref.nodes["node1"], "veth-pod1", "icmp") as delivered:
        # from node2's real address, but claiming to be a pod of node3 / an outside host
        send_udp(
            ref.nodes["node2"],
            "172.16.3.2",
            "172.16.2.2",
            4789,
            [
                vxlan(inner(src="10.244.3.1")),
                vxlan(inner(src="203.0.113.10")),
                vxlan(inner(src="10.244.1.5")),
            ],
        )
        expect_drop(node1, before, "spoofed_inner_source", 3)
    assert delivered == []


def test_wrong_vni_and_foreign_destination_are_dropped(ref: ReferenceTopology, node1: DaemonHandle) -> None:
    before = drops(node1)
    send_udp(ref.nodes["node2"], "172.16.3.2", "172.16.2.2", 4789, [vxlan(inner(), vni=99)] * 3)
    expect_drop(node1, before, "bad_vni", 3)
    # inner destination is not one of node1's pods: a peer must not use us as a relay
    send_udp(ref.nodes["node2"], "172.16.3.2", "172.16.2.2", 4789, [vxlan(inner(dst="10.244.3.1"))] * 3)
    expect_drop(node1, before, "not_local_destination", 3)


@pytest.mark.parametrize(
    ("port", "payload", "reason"),
    [
        (4789, b"\x08\x00\x00", "truncated"),  # shorter than the 8-byte VXLAN header
        (4789, bytes(8), "bad_vxlan_flags"),  # I flag clear (RFC 7348 §5)
        (4789, vxlan(b"\x45\x00"), "truncated"),  # inner IPv4 header cut short
        (4789, vxlan(b"\x60" + bytes(5)), "truncated"),
        (4789, vxlan(b"\x75" + bytes(30)), "malformed"),  # IP version 7
        (6081, b"\x00\x00\x08", "truncated"),
        (6081, b"\x80" + bytes(7) + inner(), "geneve_version"),  # version 2
        (
            6081,
            geneve(inner(), options=struct.pack("!HBB", 0xFFFF, 0x80, 0), critical=True),
            "geneve_critical_option",
        ),  # an unknown critical option (type bit 0x80), RFC 8926 §3.5.1
        (6081, geneve(inner())[:12], "truncated"),
    ],
)
def test_malformed_tunnel_payloads_are_counted(
    ref: ReferenceTopology, node1: DaemonHandle, port: int, payload: bytes, reason: str
) -> None:
    before = drops(node1)
    with capture(ref.nodes["node1"], "veth-pod1", "icmp") as delivered:
        send_udp(ref.nodes["node2"], "172.16.3.2", "172.16.2.2", port, [payload] * 4)
        expect_drop(node1, before, reason, 4)
    assert delivered == []
    assert node1.alive()


def test_garbage_storm_does_not_stop_good_traffic(ref: ReferenceTopology, daemons: Daemons) -> None:
    """Random bytes at both tunnel ports from a peer and a stranger, then a real ping over the tunnel."""
    d1 = daemons.start(
        ref.nodes["node1"], ref_config(ref, "node1", daemons.sockdir, mode="tunnel", peers=["node2"])
    )
    daemons.start(
        ref.nodes["node2"], ref_config(ref, "node2", daemons.sockdir, mode="tunnel", peers=["node1"])
    )
    assert ref.pods["pod1"].host.ping("10.244.2.1", count=1)
    code = (
        "import os,socket,random,time\n"
        "random.seed(7)\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('172.16.3.2',0))\n"
        "for i in range(3000):\n"
        "    n=random.choice([0,1,7,8,9,15,16,22,40,60,200,1400])\n"
        "    b=bytearray(os.urandom(n))\n"
        "    if n>8 and i%2: b[0]=0x08\n"  # VXLAN I flag set: the parser goes deeper
        "    s.sendto(bytes(b),('172.16.2.2',(4789,6081)[i%2]))\n"
        "    if i%100==99: time.sleep(0.002)\n"  # paced: a full socket buffer would drop uncounted
    )
    r = python_in(ref.nodes["node2"], code)
    assert r.returncode == 0, r.stderr
    time.sleep(0.5)
    assert d1.alive()
    total = sum(drops(d1).values())
    assert total >= 2000, drops(d1)
    assert ref.pods["pod1"].host.ping("10.244.2.1", count=3)
