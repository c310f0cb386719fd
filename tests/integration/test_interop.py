"""Interop with the Linux kernel's VXLAN device, set up exactly as Flannel's vxlan backend does it:
node2 has no podrouter, only `flannel.1` (VNI 1, port 4789, nolearning) with the RANDOM MAC the
kernel gave it, an onlink route for node1's pod CIDR via node1's "VTEP address" (the .0 of its CIDR),
a permanent neighbour entry for that address with node1's VTEP MAC, and an FDB entry sending that MAC
to node1's underlay address. node1 runs podrouter in tunnel mode with VXLAN and knows node2's VTEP
MAC from its config (`peers[].vtep_mac`), as Flannel publishes each node's VtepMAC; node1's own VTEP
MAC is the one `podrouter status` reports. Pods talk both ways (ping and TCP)."""

from __future__ import annotations

import json
import subprocess

from helpers import Daemons, ref_config, wait_for, wait_listening

from nettopo import Host, ReferenceTopology


def flannel_vxlan_device(ref: ReferenceTopology) -> str:
    """Creates node2's `flannel.1` with the kernel's random MAC; returns that MAC."""
    n2 = ref.nodes["node2"]
    n2.ip("link add flannel.1 type vxlan id 1 dstport 4789 local 172.16.3.2 dev eth0 nolearning")
    n2.ip("link set flannel.1 mtu 1450 up")
    return str(json.loads(n2.ip("-j link show flannel.1"))[0]["address"])


def flannel_routes_to_node1(ref: ReferenceTopology, node1_vtep_mac: str) -> None:
    n2 = ref.nodes["node2"]
    # node1's pod CIDR: via node1's "VTEP address" (the .0 of its CIDR, as Flannel does), onlink
    n2.ip("route add 10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink")
    n2.ip(f"neigh add 10.244.1.0 lladdr {node1_vtep_mac} dev flannel.1 nud permanent")
    n2.run(["bridge", "fdb", "add", node1_vtep_mac, "dev", "flannel.1", "dst", "172.16.2.2"])
    # what a CNI plugin does for pod2 on a node without podrouter
    n2.ip("route add 10.244.2.1/32 dev veth-pod2 scope link")
    n2.sysctl("net.ipv4.conf.veth-pod2.proxy_arp", 1)
    n2.sysctl("net.ipv4.neigh.veth-pod2.proxy_delay", 0)


def iperf(client: Host, server: Host, ip: str, port: int) -> None:
    """A short iperf3 TCP run; the server is ready once it listens (no fixed sleep)."""
    srv = server.popen(
        ["iperf3", "-s", "-1", "-B", ip, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(server, port)
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


def test_podrouter_vxlan_talks_to_a_flannel_style_kernel_vxlan_device(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n2_vtep_mac = flannel_vxlan_device(ref)
    # the device keeps the kernel's random MAC: nothing on node2 is adapted to podrouter
    assert n2_vtep_mac != "02:70:ac:10:03:02"
    cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol="vxlan", peers=["node2"])
    cfg["peers"][0]["vtep_mac"] = n2_vtep_mac
    d1 = daemons.start(ref.nodes["node1"], cfg)
    st = d1.status()
    node1_vtep_mac = st["vtep_mac"]
    assert node1_vtep_mac == "02:70:ac:10:02:02"  # 02:70 + 172.16.2.2, documented in docs/config.md
    assert [p["vtep_mac"] for p in st["peers"]] == [n2_vtep_mac]
    flannel_routes_to_node1(ref, node1_vtep_mac)

    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    wait_for(lambda: pod1.ping("10.244.2.1", count=1, timeout=1), 10, what="pod1 -> pod2 via kernel vxlan")
    assert pod1.ping("10.244.2.1", count=3)
    assert pod2.ping("10.244.1.1", count=3)
    iperf(pod1, pod2, "10.244.2.1", 5401)
    iperf(pod2, pod1, "10.244.1.1", 5402)

    c = d1.counters()
    assert c["packets"].get("vxlan/egress", 0) > 0 and c["packets"].get("vxlan/ingress", 0) > 0
    assert sum(c["drops"].values()) == 0, c["drops"]
    # the kernel device really did the work on node2, and dropped nothing of ours
    stats = json.loads(ref.nodes["node2"].ip("-j -s link show flannel.1"))[0]["stats64"]
    assert stats["rx"]["packets"] > 0 and stats["tx"]["packets"] > 0
    assert stats["rx"]["dropped"] == 0 and stats["rx"]["errors"] == 0, stats


def test_without_the_peers_vtep_mac_the_kernel_device_drops_our_frames(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    """The reason `peers[].vtep_mac` exists: frames to the synthesized MAC are not the kernel
    device's (PACKET_OTHERHOST), so IP on node2 never sees them."""
    flannel_vxlan_device(ref)
    d1 = daemons.start(
        ref.nodes["node1"],
        ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol="vxlan", peers=["node2"]),
    )
    flannel_routes_to_node1(ref, d1.status()["vtep_mac"])
    assert not ref.pods["pod1"].host.ping("10.244.2.1", count=2, timeout=1)
    assert d1.counters()["packets"].get("vxlan/egress", 0) >= 2  # sent, but not accepted
