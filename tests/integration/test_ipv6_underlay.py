"""podrouter on an IPv6 underlay (issue 14 items 3 and 5): the reference topology re-addressed with
2001:db8::/32 (`reference_topology(underlay="v6")`: node1 2001:db8:2::2 and node3 2001:db8:2::3 on the
shared L2, node2 2001:db8:3::2 behind R, no IPv4 on any underlay link), pods dual-stack as in
test_dual_stack.py.

* VXLAN and Geneve across R over an IPv6 outer header, IPv4 and IPv6 pods, ping and a short iperf3
  TCP run, the outer headers decoded by tshark (addresses, UDP checksum present and correct, a flow
  label, the tunnel header and the inner pod addresses), the route MTU with the IPv6 overhead (VXLAN
  70, Geneve with its default Ethernet payload 70) and the pods learning it (ICMPv6 packet too big,
  ICMP fragmentation needed);
* native on the shared L2 with the next hop resolved over NDP, and hybrid (native on-link, tunnel
  across R);
* a dual-stack underlay: node1 holds both families and reaches node2 over IPv6 and node3 over IPv4;
* interop with the Linux VXLAN device over IPv6 (`local 2001:db8:3::2`), both directions;
* UDP-tunnel GSO over the IPv6 underlay (docs/architecture.md, "UDP-tunnel GSO"): a pod's TCP
  super-packet leaves node1 as ONE VXLAN / Geneve frame in IPv6 written to the `podrgso<N>` TAP,
  arrives whole at node2 (one TSO write to its TUN) or at the kernel vxlan device, and where R must
  segment it the wire frames carry a correct outer UDP checksum; on a dual-stack underlay one TAP
  carries both families.

Masquerade is left out here: test_masquerade6.py covers it on the IPv6-only and dual-stack underlays.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, etcd_argv, ref_config, wait_for
from test_interop import iperf as iperf_port
from test_paths import iperf
from test_tunnel_gso import SIZE, offload, transfer

from nettopo import Host, ReferenceTopology, Topology, reference_topology

POD4 = {"pod1": "10.244.1.1", "pod2": "10.244.2.1", "pod3": "10.244.3.1"}
POD6 = {"pod1": "fd00:10:244:1::1", "pod2": "fd00:10:244:2::1", "pod3": "fd00:10:244:3::1"}
N1, N2, N3 = "2001:db8:2::2", "2001:db8:3::2", "2001:db8:2::3"

FIELDS = [
    "ipv6.src",
    "ipv6.dst",
    "ipv6.flow",
    "ip.src",
    "ip.dst",
    "udp.srcport",
    "udp.dstport",
    "udp.checksum",
    "udp.checksum.status",
    "vxlan.vni",
    "geneve.vni",
]


@pytest.fixture
def ref6(topo: Topology) -> ReferenceTopology:
    return reference_topology(topo, underlay="v6")


@pytest.fixture
def refdual(topo: Topology) -> ReferenceTopology:
    return reference_topology(topo, underlay="dual")


def start(
    ref: ReferenceTopology, daemons: Daemons, nodes: tuple[str, ...], **kw: Any
) -> dict[str, DaemonHandle]:
    return {
        n: daemons.start(ref.nodes[n], ref_config(ref, n, daemons.sockdir, dual_stack=True, **kw))
        for n in nodes
    }


@contextlib.contextmanager
def pcap(host: Host, iface: str, bpf: str, path: Path) -> Iterator[Path]:
    """tcpdump -w on `iface` inside `host` while the block runs (the file is then tshark's)."""
    proc = host.popen(
        ["tcpdump", "-n", "-i", iface, "-c", "2000", "-w", str(path), *bpf.split()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield path
    finally:
        time.sleep(0.3)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def decode(path: Path, port: int) -> list[dict[str, list[str]]]:
    """tshark's reading of the capture: one dict per frame, repeated fields (outer, inner) as lists."""
    cmd = ["tshark", "-n", "-r", str(path), "-o", "udp.check_checksum:TRUE"]
    if port not in (4789, 6081):
        cmd += ["-d", f"udp.port=={port},vxlan"]
    cmd += ["-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split("\t")
        rows.append({k: (c.split(",") if c else []) for k, c in zip(FIELDS, cols, strict=False)})
    return rows


def ping_all(ref: ReferenceTopology, a: str, b: str) -> None:
    """IPv4 and IPv6 pod pings a <-> b, both directions, concurrently."""
    results: dict[str, bool] = {}

    def go(key: str, src: str, dst: str) -> None:
        results[key] = ref.pods[src].host.ping(dst, count=3)

    jobs = [
        threading.Thread(target=go, args=(f"{s}->{d} v{v}", s, (POD4 if v == 4 else POD6)[d]))
        for s, d in ((a, b), (b, a))
        for v in (4, 6)
    ]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(timeout=30)
    assert len(results) == 4 and all(results.values()), results


def counters(d: DaemonHandle) -> tuple[dict[str, int], dict[str, int]]:
    c = d.counters()
    return dict(c.get("packets") or {}), dict(c.get("drops") or {})


def routes(host: Host, family: str) -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in json.loads(host.ip(f"{family} -j -d route show proto 77") or "[]")}


# ------------------------------------------------------------------------------------------ tunnel


@pytest.mark.parametrize(("protocol", "port", "mtu"), [("vxlan", 4789, 1430), ("geneve", 6081, 1430)])
def test_tunnel_over_an_ipv6_underlay(
    ref6: ReferenceTopology, daemons: Daemons, tmp_path: Path, protocol: str, port: int, mtu: int
) -> None:
    ds = start(ref6, daemons, ("node1", "node2"), mode="tunnel", protocol=protocol)
    d1 = ds["node1"]
    st = d1.status()
    assert st["underlay"]["address"] == N1
    assert st["vtep_mac"] == "02:76:00:00:00:02"  # 02:76 + the last four bytes of 2001:db8:2::2
    # per-destination MTU with the IPv6 outer header: 1500 - 70 (VXLAN, Geneve with Ethernet)
    r4, r6 = routes(ref6.nodes["node1"], "-4"), routes(ref6.nodes["node1"], "-6")
    assert r4["10.244.2.0/24"]["metrics"][0]["mtu"] == mtu, r4
    assert r6["fd00:10:244:2::/64"]["metrics"][0]["mtu"] == mtu, r6

    pod1, pod2 = ref6.pods["pod1"].host, ref6.pods["pod2"].host
    iperf(pod1, pod2, POD4["pod2"], seconds=1)
    iperf(pod2, pod1, POD6["pod1"], seconds=1, port=5202)
    # the UDP checksum on the wire: veths leave it to "offload" (a partial sum travels), so for the
    # captured pings both nodes compute it in software, as a NIC without checksum offload makes them
    for n in ("node1", "node2"):
        ref6.nodes[n].run(["ethtool", "-K", "eth0", "tx", "off"])
    cap = tmp_path / "tunnel.pcap"
    with pcap(ref6.router, "p-node2", f"udp port {port}", cap):
        ping_all(ref6, "pod1", "pod2")
    rows = decode(cap, port)
    assert len(rows) >= 20, rows[:3]
    vni_key = "vxlan.vni" if protocol == "vxlan" else "geneve.vni"
    seen_inner: set[str] = set()
    for r in rows:
        # the outer header is IPv6 between the node addresses, never IPv4
        assert r["ipv6.src"][0] in (N1, N2) and r["ipv6.dst"][0] in (N1, N2), r
        assert r["udp.dstport"] == [str(port)], r
        # UDP checksum: present (mandatory over IPv6) and correct
        assert int(r["udp.checksum"][0], 16) != 0 and r["udp.checksum.status"][0] == "1", r
        assert r[vni_key] and int(r[vni_key][0], 0) == 1, r
        seen_inner.update(r["ip.src"] + r["ipv6.src"][1:])
    # both inner families travelled, from both pods
    assert {POD4["pod1"], POD4["pod2"], POD6["pod1"], POD6["pod2"]} <= seen_inner, seen_inner
    # podrouter's frames (from node1) carry a flow label from the inner flow, and different inner
    # flows get different labels
    labels = {int(r["ipv6.flow"][0], 16) for r in rows if r["ipv6.src"][0] == N1}
    assert 0 not in labels and len(labels) >= 2, labels

    packets, drops = counters(d1)
    assert packets.get(f"{protocol}/egress", 0) > 0 and packets.get(f"{protocol}/ingress", 0) > 0
    assert sum(drops.values()) == 0, drops


def test_pods_learn_the_ipv6_underlay_path_mtu(ref6: ReferenceTopology, daemons: Daemons) -> None:
    """The VXLAN route MTU over the IPv6 underlay is 1430: a bigger DF packet gets ICMP fragmentation
    needed (IPv4 pod) or ICMPv6 packet too big (IPv6 pod) from node1's kernel, and the pods' kernels
    take it; what fits passes."""
    start(ref6, daemons, ("node1", "node2"), mode="tunnel", protocol="vxlan")
    pod1 = ref6.pods["pod1"].host
    assert pod1.ping(POD4["pod2"], count=1)
    # IPv4: 1402 + 28 = 1430 fits, 1403 + 28 = 1431 does not
    assert pod1.ping(POD4["pod2"], count=2, size=1402, df=True)
    assert not pod1.ping(POD4["pod2"], count=2, size=1403, df=True)
    assert "mtu 1430" in pod1.run(["ip", "-4", "route", "get", POD4["pod2"]])
    # IPv6: 1382 + 48 = 1430 fits, 1383 + 48 does not
    assert pod1.ping(POD6["pod2"], count=2, size=1382, df=True)
    assert not pod1.ping(POD6["pod2"], count=2, size=1383, df=True)
    assert "mtu 1430" in pod1.run(["ip", "-6", "route", "get", POD6["pod2"]])


# ----------------------------------------------------------------------------------- native, hybrid


def test_native_over_an_ipv6_underlay_resolves_next_hops_over_ndp(
    ref6: ReferenceTopology, daemons: Daemons
) -> None:
    ds = start(ref6, daemons, ("node1", "node3"), mode="native")
    n3_mac = json.loads(ref6.nodes["node3"].ip("-j link show eth0"))[0]["address"]
    # the next hop is node3's IPv6 address, its MAC learnt over NDP (there is no ARP on this underlay)
    wait_for(
        lambda: {p["name"]: p for p in ds["node1"].status()["peers"]}["node3"].get("next_hop_mac") == n3_mac,
        10,
        what="node3's MAC over NDP",
    )
    peers = {p["name"]: p for p in ds["node1"].status()["peers"]}
    assert peers["node3"]["next_hop"] == N3, peers
    neigh = ref6.nodes["node1"].ip(f"-6 neigh show {N3} dev eth0")
    assert n3_mac in neigh, neigh
    assert routes(ref6.nodes["node1"], "-4")["10.244.3.0/24"]["metrics"][0]["mtu"] == 1500
    ping_all(ref6, "pod1", "pod3")
    iperf(ref6.pods["pod1"].host, ref6.pods["pod3"].host, POD6["pod3"], seconds=1)
    for d in ds.values():
        packets, drops = counters(d)
        assert packets.get("native/egress", 0) > 0
        assert drops.get("neighbor_unresolved", 0) == 0, drops


def test_hybrid_over_an_ipv6_underlay(ref6: ReferenceTopology, daemons: Daemons, tmp_path: Path) -> None:
    """Hybrid with native_when_on_link: node3 (same L2) natively, node2 (behind R) over Geneve/IPv6."""
    ds = start(
        ref6,
        daemons,
        ("node1", "node2", "node3"),
        mode="hybrid",
        protocol="geneve",
        routing={"mode": "hybrid", "native_when_on_link": True},
    )
    r4 = routes(ref6.nodes["node1"], "-4")
    assert r4["10.244.3.0/24"]["metrics"][0]["mtu"] == 1500  # native
    assert r4["10.244.2.0/24"]["metrics"][0]["mtu"] == 1430  # Geneve (Ethernet payload) over IPv6
    cap = tmp_path / "hybrid.pcap"
    with pcap(ref6.router, "p-node2", "udp port 6081", cap):
        ping_all(ref6, "pod1", "pod2")
    ping_all(ref6, "pod1", "pod3")
    rows = decode(cap, 6081)
    assert rows and all(r["ipv6.src"][0] in (N1, N2) for r in rows), rows[:3]
    packets, _ = counters(ds["node1"])
    assert packets.get("native/egress", 0) > 0 and packets.get("geneve/egress", 0) > 0, packets


# ------------------------------------------------------------------------------ dual-stack underlay


def test_dual_stack_underlay_picks_the_family_per_peer(
    refdual: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    """node1 has 172.16.2.2 and 2001:db8:2::2 (`node.address6`); it knows node2 by its IPv6 address and
    node3 by its IPv4 one. node2 runs with an IPv6 node address, node3 with an IPv4 one."""
    ref = refdual
    d1 = start_dual(ref, daemons)["node1"]
    assert d1.status()["underlay"]["address6"] == N1
    # per-destination MTU by the peer's family: 1430 over IPv6 (node2), 1450 over IPv4 (node3)
    r4 = routes(ref.nodes["node1"], "-4")
    assert (
        r4["10.244.2.0/24"]["metrics"][0]["mtu"] == 1430 and r4["10.244.3.0/24"]["metrics"][0]["mtu"] == 1450
    )

    cap2, cap3 = tmp_path / "n2.pcap", tmp_path / "n3.pcap"
    with (
        pcap(ref.router, "p-node2", "udp port 4789", cap2),
        pcap(ref.router, "p-node3", "udp port 4789", cap3),
    ):
        ping_all(ref, "pod1", "pod2")
        ping_all(ref, "pod1", "pod3")
    to2, to3 = decode(cap2, 4789), decode(cap3, 4789)
    # towards node2 the outer header is IPv6 (tshark's first ipv6.src is the outer one)
    assert to2 and all(r["ipv6.src"] and r["ipv6.src"][0] in (N1, N2) for r in to2), to2[:3]
    # towards node3 the outer header is IPv4 (tshark's first ip.src is the outer one)
    assert to3 and all(r["ip.src"][0] in ("172.16.2.2", "172.16.2.3") for r in to3), to3[:3]
    assert all(not r["ipv6.src"] or r["ipv6.src"][0].startswith("fd00:") for r in to3), to3[:3]
    packets, drops = counters(d1)
    assert packets.get("vxlan/egress", 0) > 0 and sum(drops.values()) == 0, (packets, drops)


def test_config_refuses_a_peer_of_a_family_the_node_has_no_address_in(
    ref6: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    """An IPv4 peer on an IPv6-only node: `podrouter check` exits 2 naming the key and value."""
    c = ref_config(ref6, "node1", daemons.sockdir, dual_stack=True, peers=["node2"])
    c["peers"][0]["address"] = "172.16.3.2"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(c))
    from helpers import podrouter_argv

    r = ref6.nodes["node1"].try_run([*podrouter_argv(), "check", "--config", str(path)])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "peers[0].address" in r.stderr + r.stdout and "172.16.3.2" in r.stderr + r.stdout


# ---------------------------------------------------------------------------------- etcd discovery


def test_etcd_registrations_carry_ipv6_addresses(
    ref6: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    """etcd on R, reached over the IPv6 underlay; each node registers its IPv6 address and the other
    finds it there and tunnels to it."""
    urls = ["http://[2001:db8:2::1]:2379", "http://[2001:db8:3::1]:2379"]
    proc = ref6.router.popen(
        etcd_argv(tmp_path / "etcd", urls), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        probe = f"import urllib.request;urllib.request.urlopen('{urls[0]}/health',timeout=1)"
        wait_for(
            lambda: ref6.router.try_run(["python3", "-c", probe]).returncode == 0,
            20,
            interval=0.3,
            what="etcd",
        )
        ds = {}
        for node, url in (("node1", urls[0]), ("node2", urls[1])):
            cfg = ref_config(
                ref6,
                node,
                daemons.sockdir,
                dual_stack=True,
                peers=[],
                discovery={"backend": "etcd", "etcd": {"endpoints": [url], "lease_ttl": 3}},
            )
            ds[node] = daemons.start(ref6.nodes[node], cfg)

        def peers(d: DaemonHandle) -> dict[str, Any]:
            return {p["name"]: p for p in d.status()["peers"]}

        wait_for(lambda: "node2" in peers(ds["node1"]), 10, what="node1 discovers node2")
        wait_for(lambda: "node1" in peers(ds["node2"]), 10, what="node2 discovers node1")
        assert (
            peers(ds["node1"])["node2"]["address"] == N2 and peers(ds["node1"])["node2"]["source"] == "etcd"
        )
        assert peers(ds["node2"])["node1"]["address"] == N1
        ping_all(ref6, "pod1", "pod2")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ----------------------------------------------------------------------------- kernel VXLAN interop


def test_interop_with_the_kernel_vxlan_device_over_ipv6(ref6: ReferenceTopology, daemons: Daemons) -> None:
    """node2 has no podrouter, only a Linux VXLAN device over IPv6 (`local 2001:db8:3::2`, Flannel
    style: onlink route via node1's VTEP address, permanent neighbour, FDB entry to node1's IPv6
    underlay address). node1 runs podrouter; pods talk both ways (ping and TCP)."""
    n2 = ref6.nodes["node2"]
    n2.ip(f"link add vx6 type vxlan id 1 dstport 4789 local {N2} dev eth0 nolearning")
    n2.ip("link set vx6 mtu 1430 up")
    n2_mac = str(json.loads(n2.ip("-j link show vx6"))[0]["address"])
    cfg = ref_config(ref6, "node1", daemons.sockdir, mode="tunnel", protocol="vxlan", peers=["node2"])
    cfg["peers"][0]["vtep_mac"] = n2_mac
    d1 = daemons.start(ref6.nodes["node1"], cfg)
    n1_mac = d1.status()["vtep_mac"]
    n2.ip("route add 10.244.1.0/24 via 10.244.1.0 dev vx6 onlink")
    n2.ip(f"neigh add 10.244.1.0 lladdr {n1_mac} dev vx6 nud permanent")
    n2.run(["bridge", "fdb", "add", n1_mac, "dev", "vx6", "dst", N1])
    n2.ip("route add 10.244.2.1/32 dev veth-pod2 scope link")
    # node2 has no IPv4 route at all: proxy ARP answers for the pod gateway only if it routes out
    # another device (the same route podrouter installs on an IPv6 underlay, here into vx6)
    n2.ip("route add 169.254.1.1/32 dev vx6")
    n2.sysctl("net.ipv4.conf.veth-pod2.proxy_arp", 1)
    n2.sysctl("net.ipv4.neigh.veth-pod2.proxy_delay", 0)

    pod1, pod2 = ref6.pods["pod1"].host, ref6.pods["pod2"].host
    wait_for(
        lambda: pod1.ping(POD4["pod2"], count=1, timeout=1), 10, what="pod1 -> pod2 via kernel vxlan/IPv6"
    )
    assert pod2.ping(POD4["pod1"], count=3)
    iperf_port(pod1, pod2, POD4["pod2"], 5411)
    iperf_port(pod2, pod1, POD4["pod1"], 5412)
    packets, drops = counters(d1)
    assert packets.get("vxlan/egress", 0) > 0 and packets.get("vxlan/ingress", 0) > 0
    assert sum(drops.values()) == 0, drops
    # pod1's TCP left node1 as whole super-packets (UDP-tunnel GSO over IPv6, outer UDP checksum
    # offloaded), which the kernel device took whole
    assert offload(d1)["tap_gso_writes"] > 0, offload(d1)
    stats = json.loads(n2.ip("-j -s link show vx6"))[0]["stats64"]
    assert stats["rx"]["packets"] > 0 and stats["tx"]["packets"] > 0
    assert stats["rx"]["dropped"] == 0 and stats["rx"]["errors"] == 0, stats


# --------------------------------------------------------------------- UDP-tunnel GSO over IPv6


@pytest.mark.parametrize("protocol", ["vxlan", "geneve"])
def test_tunnel_gso_over_an_ipv6_underlay(ref6: ReferenceTopology, daemons: Daemons, protocol: str) -> None:
    """node1 hands pod1's TCP super-packets (inner IPv4 and IPv6) to the kernel whole, in IPv6, through
    its GSO TAP; veths and R keep them whole, node2 takes each as one TSO write; the data arrive
    intact (SHA-256 of 24 MiB each way of the inner family)."""
    ds = start(ref6, daemons, ("node1", "node2"), mode="tunnel", protocol=protocol)
    o1 = offload(ds["node1"])
    assert o1["tunnel_gso"] is True and o1["tunnel_gso_error"] is None, o1
    pod1, pod2 = ref6.pods["pod1"].host, ref6.pods["pod2"].host
    transfer(pod1, pod2, POD4["pod2"])
    a, b = offload(ds["node1"]), offload(ds["node2"])
    assert a["tap_gso_writes"] > 0, a
    assert b["udp_rx_whole_gso"] > 0, b
    transfer(pod1, pod2, POD6["pod2"])
    a2, b2 = offload(ds["node1"]), offload(ds["node2"])
    assert a2["tap_gso_writes"] > a["tap_gso_writes"], a2
    assert b2["udp_rx_whole_gso"] > b["udp_rx_whole_gso"], b2
    packets, drops = counters(ds["node2"])
    assert packets.get(f"{protocol}/ingress", 0) >= 2 * SIZE // 1500, packets
    assert drops.get("tx_error", 0) == 0 and counters(ds["node1"])[1].get("tx_error", 0) == 0


def test_tunnel_gso_over_ipv6_where_the_kernel_must_segment(
    ref6: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    """R's link to node2 without UDP-tunnel segmentation or checksum offload: R's kernel cuts node1's
    whole frames into wire frames, which tshark decodes as IPv6 / UDP / VXLAN / TCP: outer addresses
    node1 -> node2, hop limit 63 (64 as node1's sockets send, one hop through R), a flow label, the
    outer UDP checksum present and correct (mandatory over IPv6; finished per segment from the seed
    node1 wrote), the inner TCP checksum correct, each frame within the link MTU."""
    r = ref6.router
    r.run(["ethtool", "-K", "p-node2", "tx", "off", "tx-udp_tnl-segmentation", "off"])
    r.run(["ethtool", "-K", "p-node2", "tx-udp_tnl-csum-segmentation", "off"])
    ds = start(ref6, daemons, ("node1", "node2"), mode="tunnel", protocol="vxlan")
    assert offload(ds["node1"])["tunnel_gso"] is True
    cap = tmp_path / "wire6.pcap"
    dump = r.popen(
        ["tcpdump", "-i", "p-node2", "-w", str(cap), "-U", "ip6 src", N1, "and udp dst port 4789"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        transfer(ref6.pods["pod1"].host, ref6.pods["pod2"].host, POD4["pod2"])
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(timeout=10)
    assert offload(ds["node1"])["tap_gso_writes"] > 0
    fields = ["frame.len", "ipv6.src", "ipv6.dst", "ipv6.hlim", "ipv6.flow", "udp.checksum"]
    fields += ["udp.checksum.status", "tcp.checksum.status", "vxlan.vni", "ip.dst"]
    cmd = ["tshark", "-n", "-r", str(cap), "-o", "udp.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE"]
    cmd += ["-Y", "vxlan && tcp.len > 0", "-T", "fields", "-E", "occurrence=f"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [dict(zip(fields, line.split("\t"), strict=True)) for line in out.splitlines() if line]
    assert len(rows) > SIZE // 1500 // 2, len(rows)
    mtu = int(r.run(["cat", "/sys/class/net/p-node2/mtu"]))
    assert max(int(row["frame.len"]) for row in rows) <= mtu + 14, "every frame on the wire fits the link"
    for row in rows[:: max(1, len(rows) // 500)]:
        assert (row["ipv6.src"], row["ipv6.dst"], row["ipv6.hlim"]) == (N1, N2, "63"), row
        assert int(row["ipv6.flow"], 16) != 0, row
        assert int(row["vxlan.vni"], 0) == 1 and row["ip.dst"] == POD4["pod2"], row
    # 1 = good (0 bad, 2 unverified); the outer UDP checksum is never zero over IPv6
    assert {row["udp.checksum.status"] for row in rows} == {"1"}, {row["udp.checksum.status"] for row in rows}
    assert all(int(row["udp.checksum"], 16) != 0 for row in rows)
    assert {row["tcp.checksum.status"] for row in rows} == {"1"}, {row["tcp.checksum.status"] for row in rows}


def start_dual(ref: ReferenceTopology, daemons: Daemons) -> dict[str, DaemonHandle]:
    """node1 (172.16.2.2 and 2001:db8:2::2) knowing node2 by its IPv6 address and node3 by its IPv4
    one; node2 runs with an IPv6 node address, node3 with an IPv4 one (all in tunnel mode)."""

    def cfg(node: str, address: str, peers: dict[str, str]) -> dict[str, Any]:
        c = ref_config(ref, node, daemons.sockdir, dual_stack=True, mode="tunnel", peers=list(peers))
        c["node"]["address"] = address
        for p in c["peers"]:
            p["address"] = peers[p["name"]]
        return c

    c1 = cfg("node1", "172.16.2.2", {"node2": N2, "node3": "172.16.2.3"})
    c1["node"]["address6"] = N1
    return {
        "node1": daemons.start(ref.nodes["node1"], c1),
        "node2": daemons.start(ref.nodes["node2"], cfg("node2", N2, {"node1": N1})),
        "node3": daemons.start(ref.nodes["node3"], cfg("node3", "172.16.2.3", {"node1": "172.16.2.2"})),
    }


def test_dual_stack_underlay_one_gso_tap_carries_both_families(
    refdual: ReferenceTopology, daemons: Daemons
) -> None:
    """node1 reaches node2 over IPv6 and node3 over IPv4: its one GSO TAP takes both kinds of frames,
    and each receiver gets whole super-packets."""
    ref = refdual
    ds = start_dual(ref, daemons)
    d1, d2, d3 = ds["node1"], ds["node2"], ds["node3"]
    o1 = offload(d1)
    assert o1["tunnel_gso"] is True and o1["tunnel_gso_error"] is None, o1
    pod1 = ref.pods["pod1"].host
    transfer(pod1, ref.pods["pod2"].host, POD4["pod2"])  # over IPv6
    after_v6 = offload(d1)["tap_gso_writes"]
    assert after_v6 > 0 and offload(d2)["udp_rx_whole_gso"] > 0
    transfer(pod1, ref.pods["pod3"].host, POD4["pod3"])  # over IPv4
    assert offload(d1)["tap_gso_writes"] > after_v6
    assert offload(d3)["udp_rx_whole_gso"] > 0


def test_dual_stack_rp_filter_leaves_only_ipv4_to_the_datapath(
    refdual: ReferenceTopology, daemons: Daemons
) -> None:
    """`net.ipv4.conf.all.rp_filter` != 0 on node1 would drop the TAP's IPv4 frames (their source is
    the node's own address); IPv6 has no such filter: the TAP carries IPv6 frames only, the offload
    status says why IPv4 is left out, and IPv4 peers get datagrams segmented by the datapath."""
    ref = refdual
    ref.nodes["node1"].run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2"])
    ds = start_dual(ref, daemons)
    o1 = offload(ds["node1"])
    assert o1["tunnel_gso"] is True, o1
    why = o1["tunnel_gso_error"] or ""
    assert why.startswith("IPv4 underlay") and "rp_filter" in why, o1
    pod1 = ref.pods["pod1"].host
    transfer(pod1, ref.pods["pod3"].host, POD4["pod3"])  # over IPv4: userspace segmentation
    a = offload(ds["node1"])
    assert a["tap_gso_writes"] == 0 and a["udp_tx_gso_messages"] > 0, a
    assert offload(ds["node3"])["udp_rx_whole_gso"] == 0
    transfer(pod1, ref.pods["pod2"].host, POD4["pod2"])  # over IPv6: the TAP
    assert offload(ds["node1"])["tap_gso_writes"] > 0
    assert offload(ds["node2"])["udp_rx_whole_gso"] > 0
