"""Issue 10: what a pod sends is checked before the node routes it, tunnels cannot be fed from inside
a pod, and podrouter touches only the routes and rules it made.

* Egress source guard: a packet from a pod's host veth must carry one of that pod's registered
  addresses (IPv4 and IPv6), else nftables drops it and counts `spoofed_pod_source`, whatever path
  it would have taken (tunnel, native, masquerade, to a pod of the same node).
* No tunnel from inside: a pod's datagram to a peer's (or this node's) tunnel port is dropped and
  counted `pod_tunnel_port`; and a peer drops a tunnel datagram whose outer source port lies in the
  masquerade range (`tunnel_source_port`), which is what a masqueraded pod datagram looks like.
* Own only what we made: a route or rule of another owner survives a daemon's run and SIGTERM and
  is reported; one that makes the config impossible stops the start with exit 2.

Layout: the reference topology plus pod4 on node1 (pod1's neighbour). node1 runs hybrid mode with
native_when_on_link (node3 native on the shared L2, node2 tunnelled across R) and masquerade, dual
stack everywhere.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, podrouter_argv, ref_config, wait_for, write_config
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_bad_input import geneve, send_udp
from test_paths import iperf

from nettopo import Host, ReferenceTopology, capture

PORT = 9999
MARK = b"podrouter-guard"
EXT = ReferenceTopology.EXTERNAL_ADDR
POD4, POD4_6 = "10.244.1.2", "fd00:10:244:1::2"


def send_raw(host: Host, packets: list[tuple[bytes, str]]) -> None:
    """Whole IP packets (header included, any source) from `host` through raw sockets, routed by the
    host's kernel like any other packet it sends."""
    code = (
        "import socket,sys,binascii\n"
        "s4=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n"
        "s6=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n"
        "for line in sys.stdin.read().split():\n"
        "    pkt,dst=line.split(',')\n"
        "    s=s6 if ':' in dst else s4\n"
        "    s.sendto(binascii.unhexlify(pkt),(dst,0))\n"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", host.ns, "python3", "-c", code],
        input="\n".join(f"{p.hex()},{d}" for p, d in packets),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def udp4(src: str, dst: str, tag: str) -> tuple[bytes, str]:
    return bytes(IP(src=src, dst=dst) / UDP(sport=40000, dport=PORT) / (MARK + tag.encode())), dst


def udp6(src: str, dst: str, tag: str) -> tuple[bytes, str]:
    return bytes(IPv6(src=src, dst=dst) / UDP(sport=40000, dport=PORT) / (MARK + tag.encode())), dst


def inner_ping(src: str, dst: str) -> bytes:
    return bytes(IP(src=src, dst=dst, flags="DF") / ICMP(type=8, id=0x4711, seq=1) / MARK)


def vxlan_frame(inner: bytes) -> bytes:
    eth = Ether(src="02:70:ac:10:02:02", dst="02:70:ac:10:03:02", type=0x0800)
    return bytes(VXLAN(flags=0x08, vni=1) / eth / inner)


def drops(d: DaemonHandle) -> dict[str, int]:
    return {k: int(v) for k, v in (d.counters().get("drops") or {}).items()}


def metric_drops(d: DaemonHandle, reason: str) -> float:
    """podrouter_drops_total{reason=...} as /metrics serves it (the daemon's metrics port)."""
    r = d.host.try_run(["curl", "-s", "--max-time", "5", "http://127.0.0.1:9965/metrics"], timeout=15)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        if line.startswith(f'podrouter_drops_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no podrouter_drops_total for {reason}:\n{r.stdout[-2000:]}")


@pytest.fixture
def lab(ref: ReferenceTopology, daemons: Daemons) -> dict[str, DaemonHandle]:
    ref.add_pod("node1", "pod4", POD4, POD4_6)
    kw: dict[str, Any] = {"routing": {"mode": "hybrid", "native_when_on_link": True}}
    out = {
        "node1": daemons.start(
            ref.nodes["node1"],
            ref_config(ref, "node1", daemons.sockdir, dual_stack=True, masquerade={"enabled": True}, **kw),
        )
    }
    for n in ("node2", "node3"):
        cfg = ref_config(ref, n, daemons.sockdir, dual_stack=True, **kw)
        cfg["metrics"] = {"listen": None}
        out[n] = daemons.start(ref.nodes[n], cfg)
    return out


def test_spoofed_pod_sources_are_dropped_on_every_path(
    ref: ReferenceTopology, lab: dict[str, DaemonHandle]
) -> None:
    n1 = lab["node1"]
    pod1 = ref.pods["pod1"].host
    pod2, pod3, pod4 = (ref.pods[p] for p in ("pod2", "pod3", "pod4"))
    # the lab is what the test says: pod2 tunnelled, pod3 native
    paths = {p["name"]: p["path"] for p in n1.status()["peers"]}
    assert paths == {"node2": "vxlan", "node3": "native"}, paths
    before = drops(n1).get("spoofed_pod_source", 0)
    spoofed = [
        udp4(POD4, pod2.ip, "neighbour-tunnel"),  # as the co-located pod4, across the tunnel
        udp4("10.244.1.77", pod2.ip, "cidr-tunnel"),  # an unregistered address of our pod CIDR
        udp4(POD4, pod3.ip, "neighbour-native"),  # native path to node3
        udp4("10.244.1.77", pod3.ip, "cidr-native"),
        udp4("198.51.100.7", EXT, "outside-masq"),  # an outside address towards the external host
        udp4(POD4, EXT, "neighbour-masq"),  # pod4's address, which would be masqueraded
        udp4(pod2.ip, pod4.ip, "remote-same-node"),  # a remote pod's address, to a pod of this node
        udp6(POD4_6, pod2.ip6 or "", "neighbour6-tunnel"),
        udp6("fd00:10:244:1::77", pod3.ip6 or "", "cidr6-native"),
        udp6(pod2.ip6 or "", POD4_6, "remote6-same-node"),
    ]
    bpf = f"udp port {PORT}"
    with (
        capture(pod2.host, "eth0", bpf) as at2,
        capture(pod3.host, "eth0", bpf) as at3,
        capture(pod4.host, "eth0", bpf) as at4,
        capture(ref.external, "eth0", bpf) as at_ext,
    ):
        for _ in range(3):
            send_raw(pod1, spoofed)
    leaked = [x for x in (*at2, *at3, *at4, *at_ext) if f".{PORT}:" in x or f".{PORT} " in x]
    assert not leaked, leaked
    n = wait_for(
        lambda: (
            (drops(n1).get("spoofed_pod_source", 0) - before >= 3 * len(spoofed))
            and drops(n1)["spoofed_pod_source"]
        ),
        10,
        what="spoofed_pod_source to count every spoofed packet",
    )
    assert n - before == 3 * len(spoofed), (n, before)
    assert metric_drops(n1, "spoofed_pod_source") >= n
    # the same datagrams with pod1's own addresses go through (the capture proves the guard, not
    # the path, stopped the others)
    own = [
        udp4(ref.pods["pod1"].ip, pod2.ip, "own-tunnel"),
        udp4(ref.pods["pod1"].ip, pod3.ip, "own-native"),
        udp4(ref.pods["pod1"].ip, pod4.ip, "own-same-node"),
        udp6(ref.pods["pod1"].ip6 or "", pod2.ip6 or "", "own6-tunnel"),
    ]
    with (
        capture(pod2.host, "eth0", bpf) as at2,
        capture(pod3.host, "eth0", bpf) as at3,
        capture(pod4.host, "eth0", bpf) as at4,
    ):
        send_raw(pod1, own)
    assert any("10.244.1.1.40000 > 10.244.2.1" in x for x in at2), at2
    assert any("fd00:10:244:1::1.40000 > fd00:10:244:2::1" in x for x in at2), at2
    assert any("10.244.1.1.40000 > 10.244.3.1" in x for x in at3), at3
    assert any("10.244.1.1.40000 > 10.244.1.2" in x for x in at4), at4
    assert drops(n1).get("spoofed_pod_source", 0) == n


def test_pods_cannot_reach_tunnel_ports(ref: ReferenceTopology, lab: dict[str, DaemonHandle]) -> None:
    n1, n2 = lab["node1"], lab["node2"]
    pod1, pod2 = ref.pods["pod1"], ref.pods["pod2"]
    before = drops(n1).get("pod_tunnel_port", 0)
    # pod1 hand-builds tunnel frames whose inner packet claims pod4's address (inside node1's pod
    # CIDR, as a peer's decap check demands) and sends them as ordinary UDP: with masquerade they
    # would leave with node1's address, i.e. as node1's tunnel sender
    frame_v = vxlan_frame(inner_ping(POD4, pod2.ip))
    frame_g = geneve(inner_ping(POD4, pod2.ip))
    node1, node2 = ref.node_addr["node1"], ref.node_addr["node2"]
    with capture(pod2.host, "eth0", "icmp") as at2, capture(ref.router, "p-node2", "udp") as wire:
        for _ in range(3):
            send_udp(pod1.host, pod1.ip, node2, 4789, [frame_v])
            send_udp(pod1.host, pod1.ip, node2, 6081, [frame_g])
            send_udp(pod1.host, pod1.ip, node1, 4789, [frame_v])  # our own tunnel port
    assert not [x for x in at2 if POD4 in x], at2
    assert not [x for x in wire if ".4789:" in x or ".6081:" in x], wire
    n = wait_for(
        lambda: drops(n1).get("pod_tunnel_port", 0) - before >= 9 and drops(n1)["pod_tunnel_port"],
        10,
        what="pod_tunnel_port to count the smuggled frames",
    )
    assert n - before == 9
    assert metric_drops(n1, "pod_tunnel_port") >= n
    # legitimate traffic still flows: tunnel, native, masquerade, same node, IPv6
    assert pod1.host.ping(pod2.ip, count=2)
    assert pod1.host.ping(ref.pods["pod3"].ip, count=2)
    assert pod1.host.ping(POD4, count=2)
    assert pod1.host.ping(EXT, count=2)
    assert pod1.host.ping(pod2.ip6 or "", count=2)
    iperf(pod1.host, pod2.host, pod2.ip, seconds=1)
    iperf(pod1.host, ref.pods["pod3"].host, ref.pods["pod3"].ip, seconds=1, port=5202)
    assert drops(n2).get("tunnel_source_port", 0) == 0


def test_tunnel_datagram_from_masquerade_port_is_dropped(
    ref: ReferenceTopology, lab: dict[str, DaemonHandle]
) -> None:
    """What a masqueraded pod datagram looks like at the peer: node1's address, a source port in the
    masquerade range (61000-65535). node2 drops it (`tunnel_source_port`); the same frame from a
    port of the kernel VXLAN range (32768-60999) is delivered."""
    n2 = lab["node2"]
    node1_host, pod2 = ref.nodes["node1"], ref.pods["pod2"]
    node1, node2 = ref.node_addr["node1"], ref.node_addr["node2"]
    frame = vxlan_frame(inner_ping(POD4, pod2.ip))

    def send_from(sport: int) -> None:
        code = (
            "import socket,binascii,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(({node1!r},{sport}))\n"
            f"s.sendto(binascii.unhexlify(sys.argv[1]),({node2!r},4789))\n"
        )
        node1_host.run(["python3", "-c", code, frame.hex()])

    before = drops(n2).get("tunnel_source_port", 0)
    with capture(pod2.host, "eth0", "icmp") as at2:
        for sport in (61000, 62000, 65535):
            send_from(sport)
    assert not [x for x in at2 if POD4 in x], at2
    wait_for(
        lambda: drops(n2).get("tunnel_source_port", 0) - before == 3,
        10,
        what="tunnel_source_port to count 3 datagrams",
    )
    with capture(pod2.host, "eth0", "icmp") as at2:
        send_from(33000)
    assert [x for x in at2 if f"{POD4} > {pod2.ip}" in x], at2


def test_guard_follows_pod_registration(ref: ReferenceTopology, lab: dict[str, DaemonHandle]) -> None:
    """A pod registered through the API is allowed its address at once; after pod_del its address is
    spoofed again (the set follows the registry in one transaction each)."""
    n1 = lab["node1"]
    pod2 = ref.pods["pod2"]
    pod5 = ref.add_pod("node1", "pod5", "10.244.1.5")
    add = n1.cli(
        "pod", "add", "pod5", "--socket", n1.socket, "--ip", pod5.ip, "--host-interface", pod5.host_interface
    )
    assert add.returncode == 0, add.stderr
    sets = json.loads(n1.host.run(["nft", "-j", "list", "set", "inet", "podrouter_pods", "pod_src4"]))
    elems = [e for o in sets["nftables"] if "set" in o for e in o["set"].get("elem", [])]
    assert {"concat": ["veth-pod5", "10.244.1.5"]} in elems, elems
    assert pod5.host.ping(pod2.ip, count=2)
    before = drops(n1).get("spoofed_pod_source", 0)
    assert n1.cli("pod", "del", "--socket", n1.socket, "pod5").returncode == 0
    with capture(pod2.host, "eth0", f"udp port {PORT}") as at2:
        send_raw(pod5.host, [udp4(pod5.ip, pod2.ip, "after-del")])
    assert not [x for x in at2 if f".{PORT}" in x], at2
    wait_for(lambda: drops(n1).get("spoofed_pod_source", 0) > before, 10, what="the drop counted")


# ------------------------------------------------------------------------------ own only what we made


def test_foreign_route_and_rule_survive_run_and_sigterm(ref: ReferenceTopology, daemons: Daemons) -> None:
    n1 = ref.nodes["node1"]
    # another owner routes node2's pod CIDR (proto static) and has a rule at podrouter's priority
    n1.ip("route add 10.244.2.0/24 via 172.16.2.3 proto static")
    n1.ip("rule add priority 7700 from 192.0.2.0/24 lookup main")
    d = daemons.start(n1, ref_config(ref, "node1", daemons.sockdir, masquerade={"enabled": True}))
    st = d.status()
    assert any("10.244.2.0/24" in c and "proto static" in c for c in st["conflicts"]), st["conflicts"]
    assert "10.244.2.0/24 via 172.16.2.3 dev eth0 proto static" in n1.ip("route show 10.244.2.0/24")
    assert "proto 77" not in n1.ip("route show 10.244.2.0/24")
    rules = n1.ip("rule show")
    assert "from 192.0.2.0/24 lookup main" in rules
    assert "7701:\tfrom 10.244.1.0/24 lookup 77 proto 77" in rules, rules
    # the rest of the plan is installed
    assert "10.244.3.0/24 dev podr0" in n1.ip("route show 10.244.3.0/24")
    code, logs = d.stop()
    assert code == 0, logs[-2000:]
    assert "10.244.2.0/24" in logs and "not podrouter's" in logs
    assert "10.244.2.0/24 via 172.16.2.3 dev eth0 proto static" in n1.ip("route show 10.244.2.0/24")
    rules = n1.ip("rule show")
    assert "7700:\tfrom 192.0.2.0/24 lookup main" in rules, rules
    assert "proto 77" not in rules and "lookup 77" not in rules
    assert not n1.ip("route show proto 77").strip()
    # the nftables tables went with the daemon
    tables = n1.run(["nft", "list", "tables"])
    assert "podrouter" not in tables, tables


def test_foreign_route_for_a_configured_pod_exits_2(
    ref: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    n1 = ref.nodes["node1"]
    n1.ip("route add 10.244.1.1/32 via 172.16.2.3 proto static")
    cfg = ref_config(ref, "node1", daemons.sockdir)
    path = write_config(tmp_path / "node1.yaml", cfg)
    r = n1.try_run([*podrouter_argv(), "run", "--config", str(path)], timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "pods[0].ip: '10.244.1.1'" in r.stderr and "proto static" in r.stderr, r.stderr
    # nothing was installed, the foreign route is as it was
    assert not n1.ip("route show proto 77").strip()
    assert "podr0" not in n1.ip("link show")
    assert "10.244.1.1 via 172.16.2.3 dev eth0 proto static" in n1.ip("route show 10.244.1.1")
