"""Interop with the Linux kernel's VXLAN device, set up the way Flannel's vxlan backend does it:
node2 has no podrouter, only `vxlan0` (VNI 1, port 4789, nolearning) with a static FDB entry, a
permanent neighbour entry and an onlink route per remote pod CIDR. node1 runs podrouter in tunnel
mode with VXLAN. Pods talk both ways (ping and TCP)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemons, ref_config, short_dir, wait_for

from nettopo import ReferenceTopology

FLANNEL_MAC_NODE1 = "0e:00:00:00:01:01"  # what node2 believes node1's VTEP MAC is (podrouter ignores it)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with short_dir() as d:
        ds = Daemons(d, tmp_path)
        try:
            yield ds
        finally:
            ds.stop_all()


def inner_dst_mac_of_podrouter(ref: ReferenceTopology) -> str:
    """The inner Ethernet destination podrouter puts in VXLAN frames to node2, read off the wire.

    A kernel VXLAN device delivers a decapsulated frame only if its destination MAC is the device's
    own (anything else is PACKET_OTHERHOST, which IP drops), so node2's vxlan0 must carry that MAC,
    just as Flannel publishes each node's VtepMAC to the others.
    """
    sniffer = ref.nodes["node2"].popen(
        [
            "python3",
            "-c",
            "import sys\n"
            "from scapy.all import sniff\n"
            "from scapy.layers.vxlan import VXLAN\n"
            "from scapy.layers.l2 import Ether\n"
            "p = sniff(iface='eth0', filter='udp dst port 4789', count=1, timeout=15,\n"
            "          started_callback=lambda: print('ready', flush=True))\n"
            "print(p[0][VXLAN][Ether].dst if p else '', flush=True)\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert sniffer.stdout is not None
    assert sniffer.stdout.readline().strip() == b"ready"  # scapy takes a while to import
    ref.pods["pod1"].host.ping("10.244.2.1", count=2, timeout=1)
    out, err = sniffer.communicate(timeout=20)
    mac = out.decode().strip()
    assert mac, f"no VXLAN frame from podrouter seen on node2: {err.decode()[-400:]}"
    return mac


def flannel_style_node2(ref: ReferenceTopology, vtep_mac: str) -> None:
    n2 = ref.nodes["node2"]
    n2.ip("link add vxlan0 type vxlan id 1 dstport 4789 local 172.16.3.2 dev eth0 nolearning")
    n2.ip(f"link set vxlan0 address {vtep_mac} mtu 1450 up")
    # node1's pod CIDR: via node1's "VTEP address" (the .0 of its CIDR, as Flannel does), onlink
    n2.ip("route add 10.244.1.0/24 via 10.244.1.0 dev vxlan0 onlink")
    n2.ip(f"neigh add 10.244.1.0 lladdr {FLANNEL_MAC_NODE1} dev vxlan0 nud permanent")
    n2.run(["bridge", "fdb", "add", FLANNEL_MAC_NODE1, "dev", "vxlan0", "dst", "172.16.2.2"])
    # what a CNI plugin does for pod2 on a node without podrouter
    n2.ip("route add 10.244.2.1/32 dev veth-pod2 scope link")
    n2.sysctl("net.ipv4.conf.veth-pod2.proxy_arp", 1)
    n2.sysctl("net.ipv4.neigh.veth-pod2.proxy_delay", 0)


def test_podrouter_vxlan_talks_to_the_kernel_vxlan_device(ref: ReferenceTopology, daemons: Daemons) -> None:
    d1 = daemons.start(
        ref.nodes["node1"],
        ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol="vxlan", peers=["node2"]),
    )
    flannel_style_node2(ref, inner_dst_mac_of_podrouter(ref))
    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    wait_for(lambda: pod1.ping("10.244.2.1", count=1, timeout=1), 10, what="pod1 -> pod2 via kernel vxlan")
    assert pod1.ping("10.244.2.1", count=3)
    assert pod2.ping("10.244.1.1", count=3)

    # TCP both ways (iperf3, bounded)
    for client, server, ip, port in ((pod1, pod2, "10.244.2.1", 5401), (pod2, pod1, "10.244.1.1", 5402)):
        srv = server.popen(
            ["iperf3", "-s", "-1", "-B", ip, "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.4)
            r = client.try_run(
                ["iperf3", "-c", ip, "-p", str(port), "-t", "2", "-J", "--connect-timeout", "3000"],
                timeout=30,
            )
            assert r.returncode == 0, r.stdout[-400:]
            assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 0
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait(timeout=5)

    c = d1.counters()["packets"]
    assert c.get("vxlan/egress", 0) > 0 and c.get("vxlan/ingress", 0) > 0
    # the kernel device really did the work on node2
    stats = json.loads(ref.nodes["node2"].ip("-j -s link show vxlan0"))[0]["stats64"]
    assert stats["rx"]["packets"] > 0 and stats["tx"]["packets"] > 0
