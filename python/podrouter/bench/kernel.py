"""The kernel baselines the suite compares podrouter with, built on the reference topology.

- kernel routing: plain Linux forwarding between node1 and node3 on their shared L2 segment, one
  route per remote pod CIDR via the peer node (what Calico's BGP mode or Flannel's host-gw install).
- kernel VXLAN: a Linux `vxlan` device per node, the way Flannel's vxlan backend sets it up: one
  device with `nolearning`, an on-link route per remote pod CIDR via the remote VTEP's address, a
  permanent neighbour entry for it and an FDB entry pointing its MAC at the remote node's underlay
  address (RFC 7348 framing done by the kernel).

Pods are attached as docs/design.md §4b says (a /32 route to the pod's host veth and proxy ARP so the node
answers for 169.254.1.1), which is what podrouter does for its own pods, so only the node-to-node
part differs between a baseline and the podrouter mode it is compared with.
"""

from __future__ import annotations

from podrouter.demo.netns import ReferenceTopology

KERNEL_VXLAN_DEV = "kvx0"
KERNEL_VXLAN_MTU = 1450  # 1500 - 50 bytes of outer Ethernet/IPv4/UDP/VXLAN (RFC 7348 §5)
KERNEL_VXLAN6_MTU = 1430  # over an IPv6 underlay the outer IP header is 20 bytes longer


def attach_pods(ref: ReferenceTopology) -> None:
    """What a node does for its local pods (docs/design.md §4b), done with `ip`/`sysctl` for the baselines."""
    for pod in ref.pods.values():
        node = ref.nodes[pod.node]
        node.ip(f"route replace {pod.ip}/32 dev {pod.host_interface}")
        node.sysctl(f"net.ipv4.conf.{pod.host_interface}.proxy_arp", 1)
        # proxy ARP answers are delayed by up to proxy_delay (default 0.8 s) unless this is 0
        node.sysctl(f"net.ipv4.neigh.{pod.host_interface}.proxy_delay", 0)


def setup_kernel_routing(ref: ReferenceTopology) -> None:
    attach_pods(ref)
    # node1 <-> node3 share 172.16.2.0/24, so each is the other's on-link next hop
    ref.nodes["node1"].ip(f"route replace {ref.node_pod_cidr['node3']} via {ref.node_addr['node3']} dev eth0")
    ref.nodes["node3"].ip(f"route replace {ref.node_pod_cidr['node1']} via {ref.node_addr['node1']} dev eth0")


def setup_kernel_routing_across_r(ref: ReferenceTopology) -> None:
    """Plain forwarding across R: R holds a route per pod CIDR via its node (what BGP gives it in the
    native-bgp setup, here written by hand); the nodes reach R through their default routes."""
    attach_pods(ref)
    for name in ("node1", "node2"):
        ref.router.ip(f"route replace {ref.node_pod_cidr[name]} via {ref.node_addr[name]}")


def _vtep_mac(node: str) -> str:
    return f"02:76:78:00:00:{int(node.removeprefix('node')):02x}"


def _vtep_ip(ref: ReferenceTopology, node: str) -> str:
    # Flannel gives each VTEP the network address of its node's pod subnet (10.244.2.0 for node2)
    return ref.node_pod_cidr[node].split("/")[0]


def setup_kernel_vxlan(
    ref: ReferenceTopology, nodes: tuple[str, ...] = ("node1", "node2"), vni: int = 1, port: int = 4789
) -> None:
    attach_pods(ref)
    for name in nodes:
        h = ref.nodes[name]
        h.ip(
            f"link add {KERNEL_VXLAN_DEV} address {_vtep_mac(name)} type vxlan id {vni} "
            f"local {ref.node_addr[name]} dev eth0 dstport {port} nolearning"
        )
        v6 = ":" in ref.node_addr[name]
        h.ip(f"link set {KERNEL_VXLAN_DEV} mtu {KERNEL_VXLAN6_MTU if v6 else KERNEL_VXLAN_MTU} up")
        h.ip(f"addr add {_vtep_ip(ref, name)}/32 dev {KERNEL_VXLAN_DEV}")
        if v6:
            # an IPv6 underlay leaves the node without IPv4 routes: proxy ARP answers for the pods'
            # gateway only if it routes out another device (podrouter does the same into podr0)
            h.ip(f"route replace 169.254.1.1/32 dev {KERNEL_VXLAN_DEV}")
    for name in nodes:
        h = ref.nodes[name]
        for peer in nodes:
            if peer == name:
                continue
            vip, mac = _vtep_ip(ref, peer), _vtep_mac(peer)
            h.ip(f"route replace {ref.node_pod_cidr[peer]} via {vip} dev {KERNEL_VXLAN_DEV} onlink")
            h.ip(f"neigh replace {vip} lladdr {mac} dev {KERNEL_VXLAN_DEV} nud permanent")
            h.run(["bridge", "fdb", "append", mac, "dev", KERNEL_VXLAN_DEV, "dst", ref.node_addr[peer]])
