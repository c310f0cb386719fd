"""The underlay: which interface, address, MTU and gateway this node uses, read from the namespace.

Run after config validation and before anything is installed; every problem is an `UnderlayError`
(the CLI exits 2, like a config error: the config does not fit this namespace).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podrouter.config import NodeConfig

IFA_F_SECONDARY = 0x01
RT_TABLE_MAIN = 254


class UnderlayError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Underlay:
    ifname: str
    ifindex: int
    address: ipaddress.IPv4Address
    network: ipaddress.IPv4Network  # the connected subnet of `address` (who is on-link)
    mtu: int
    mac: str
    gateway: ipaddress.IPv4Address | None  # the default route's gateway, if it leaves via this interface

    def on_link(self, addr: ipaddress.IPv4Address) -> bool:
        return addr in self.network


def netns_id() -> str:
    """An identity for the current network namespace (device:inode of /proc/self/ns/net)."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def _default_route(ipr: IPRoute) -> Any | None:
    routes = [
        r
        for r in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_MAIN)
        if r["dst_len"] == 0 and r.get_attr("RTA_OIF") is not None
    ]
    # lowest metric wins, as in the kernel's FIB for equal prefixes
    routes.sort(key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
    return routes[0] if routes else None


def resolve_underlay(ipr: IPRoute, node: NodeConfig) -> Underlay:
    problems: list[str] = []
    default = _default_route(ipr)
    if node.interface is not None:
        idx = ipr.link_lookup(ifname=node.interface)
        if not idx:
            raise UnderlayError(
                [f"node.interface: '{node.interface}' does not exist in this network namespace"]
            )
        ifindex = idx[0]
        ifname = node.interface
    else:
        if default is None:
            raise UnderlayError(
                ["node.interface: not set, and there is no IPv4 default route to take it from"]
            )
        ifindex = default.get_attr("RTA_OIF")
        ifname = ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
    link = ipr.get_links(ifindex)[0]
    mtu = int(link.get_attr("IFLA_MTU"))
    mac = link.get_attr("IFLA_ADDRESS") or ""
    if not mac or mac == "00:00:00:00:00:00":
        problems.append(f"node.interface: '{ifname}' has no Ethernet address (native paths need one)")
    if not link["flags"] & 0x1:  # IFF_UP
        problems.append(f"node.interface: '{ifname}' is down")

    addrs = []
    for a in ipr.get_addr(family=socket.AF_INET, index=ifindex):
        ip = ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL"))
        addrs.append((ip, a["prefixlen"], bool(a["flags"] & IFA_F_SECONDARY)))
    address: ipaddress.IPv4Address | None = None
    network: ipaddress.IPv4Network | None = None
    if node.address is not None:
        for ip, plen, _ in addrs:
            if ip == node.address:
                address, network = ip, ipaddress.IPv4Network(f"{ip}/{plen}", strict=False)
        if address is None:
            problems.append(f"node.address: '{node.address}' is not an address of '{ifname}'")
    else:
        primary = [x for x in addrs if not x[2]] or addrs
        if not primary:
            problems.append(f"node.address: not set, and '{ifname}' has no IPv4 address")
        else:
            ip, plen, _ = primary[0]
            address, network = ip, ipaddress.IPv4Network(f"{ip}/{plen}", strict=False)
    gateway = None
    if default is not None and default.get_attr("RTA_OIF") == ifindex and default.get_attr("RTA_GATEWAY"):
        gateway = ipaddress.IPv4Address(default.get_attr("RTA_GATEWAY"))
    if problems:
        raise UnderlayError(problems)
    assert address is not None and network is not None
    return Underlay(
        ifname=ifname, ifindex=ifindex, address=address, network=network, mtu=mtu, mac=mac, gateway=gateway
    )


def next_hop_for(
    ipr: IPRoute, underlay: Underlay, peer: ipaddress.IPv4Address
) -> ipaddress.IPv4Address | None:
    """The native next hop towards a peer node: the peer itself on-link, else the kernel's gateway.

    The kernel's own answer (RTM_GETROUTE) is used for off-link peers so that a more specific underlay
    route than the default (e.g. a rack route) is honoured; without one, the default gateway.
    """
    if underlay.on_link(peer):
        return peer
    try:
        routes = ipr.route("get", dst=str(peer))
    except NetlinkError:  # ENETUNREACH and friends: fall back to the default gateway
        return underlay.gateway
    for r in routes:
        gw = r.get_attr("RTA_GATEWAY")
        if gw and r.get_attr("RTA_OIF") == underlay.ifindex:
            return ipaddress.IPv4Address(gw)
    return underlay.gateway


def next_hops_for(
    underlay: Underlay, peers: list[ipaddress.IPv4Address]
) -> dict[ipaddress.IPv4Address, ipaddress.IPv4Address | None]:
    """`next_hop_for` of many peers at once: the kernel is asked about every off-link peer in bulk
    (a few hundred RTM_GETROUTE per system call; netlink/rtnl.py), which matters with thousands."""
    from podrouter.netlink.rtnl import Rtnl

    out: dict[ipaddress.IPv4Address, ipaddress.IPv4Address | None] = {}
    far = []
    for p in dict.fromkeys(peers):
        if underlay.on_link(p):
            out[p] = p
        else:
            far.append(p)
    if far:
        with Rtnl() as nl:
            answers = nl.next_hops([str(p) for p in far])
        for p, ans in zip(far, answers, strict=True):
            if ans is not None and ans[1] is not None and ans[0] == underlay.ifindex:
                out[p] = ipaddress.IPv4Address(ans[1])
            else:
                out[p] = underlay.gateway
    return out
