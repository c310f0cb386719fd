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

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podrouter.config import IPAddress, IPNetwork, NodeConfig

IFA_F_SECONDARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
RT_TABLE_MAIN = 254


class UnderlayError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Underlay:
    ifname: str
    ifindex: int
    address: IPAddress  # IPv4, or IPv6 on an IPv6-only underlay
    network: IPNetwork  # the connected subnet of `address` (who is on-link)
    mtu: int
    mac: str
    # the default route's gateway (of `address`'s family), if it leaves via this interface
    gateway: IPAddress | None
    # dual-stack underlay (node.address6): the IPv6 address, its subnet and the IPv6 default gateway
    address6: ipaddress.IPv6Address | None = None
    network6: ipaddress.IPv6Network | None = None
    gateway6: ipaddress.IPv6Address | None = None

    def on_link(self, addr: IPAddress) -> bool:
        if addr.version == self.network.version:
            return addr in self.network
        return self.network6 is not None and addr in self.network6

    def gateway_for(self, addr: IPAddress) -> IPAddress | None:
        """The default gateway towards an off-link underlay address of `addr`'s family."""
        if addr.version == self.address.version:
            return self.gateway
        return self.gateway6 if addr.version == 6 else None

    def addresses(self) -> list[IPAddress]:
        """The addresses the tunnel sockets are bound on."""
        return [self.address] + ([self.address6] if self.address6 is not None else [])


def netns_id() -> str:
    """An identity for the current network namespace (device:inode of /proc/self/ns/net)."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def _default_route(ipr: IPRoute, family: int = socket.AF_INET) -> Any | None:
    routes = [
        r
        for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN)
        if r["dst_len"] == 0 and r.get_attr("RTA_OIF") is not None
    ]
    # lowest metric wins, as in the kernel's FIB for equal prefixes
    routes.sort(key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
    return routes[0] if routes else None


def _addresses(ipr: IPRoute, family: int, ifindex: int) -> list[tuple[IPAddress, int, bool]]:
    """(address, prefix length, secondary) of `ifindex` in `family`; for IPv6 only global ones that
    passed DAD (a link-local or tentative address cannot be a tunnel end point)."""
    out: list[tuple[IPAddress, int, bool]] = []
    for a in ipr.get_addr(family=family, index=ifindex):
        raw = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
        if not raw:
            continue
        ip = ipaddress.ip_address(raw)
        flags = a.get_attr("IFA_FLAGS") or a["flags"]
        if ip.version == 6 and (
            a["scope"] != RT_SCOPE_UNIVERSE or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
        ):
            continue
        out.append((ip, a["prefixlen"], bool(a["flags"] & IFA_F_SECONDARY)))
    return out


def _gateway(ipr: IPRoute, family: int, ifindex: int, default: Any = None) -> Any | None:
    """The `family` default route's gateway if that route leaves by `ifindex` (`default`: that
    route when the caller already has it, saving a dump)."""
    if default is None:
        default = _default_route(ipr, family)
    if default is not None and default.get_attr("RTA_OIF") == ifindex and default.get_attr("RTA_GATEWAY"):
        return ipaddress.ip_address(default.get_attr("RTA_GATEWAY"))
    return None


def resolve_underlay(ipr: IPRoute, node: NodeConfig) -> Underlay:
    problems: list[str] = []
    default = _default_route(ipr) or _default_route(ipr, socket.AF_INET6)
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
                ["node.interface: not set, and there is no IPv4 or IPv6 default route to take it from"]
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

    addrs4 = _addresses(ipr, socket.AF_INET, ifindex)
    addrs6 = _addresses(ipr, socket.AF_INET6, ifindex)

    def find(key: str, want: IPAddress) -> tuple[IPAddress, IPNetwork] | None:
        for ip, plen, _ in addrs4 if want.version == 4 else addrs6:
            if ip == want:
                return ip, ipaddress.ip_network(f"{ip}/{plen}", strict=False)
        problems.append(f"{key}: '{want}' is not an address of '{ifname}'")
        return None

    found: tuple[IPAddress, IPNetwork] | None = None
    if node.address is not None:
        found = find("node.address", node.address)
    else:
        # IPv4 first (as before IPv6 underlays existed), else the first global IPv6 address
        primary = [x for x in addrs4 if not x[2]] or addrs4 or addrs6
        if not primary:
            problems.append(f"node.address: not set, and '{ifname}' has no IPv4 or global IPv6 address")
        else:
            ip, plen, _ = primary[0]
            found = ip, ipaddress.ip_network(f"{ip}/{plen}", strict=False)
    found6: tuple[IPAddress, IPNetwork] | None = None
    if node.address6 is not None:
        found6 = find("node.address6", node.address6)
        if found is not None and found[0].version == 6:
            problems.append(
                f"node.address6: '{node.address6}' given, but the node address {found[0]} is IPv6"
            )
    if problems:
        raise UnderlayError(problems)
    assert found is not None
    address, network = found
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    a6: ipaddress.IPv6Address | None = None
    n6: ipaddress.IPv6Network | None = None
    g6: Any = None
    if found6 is not None:
        f_addr, f_net = found6
        assert isinstance(f_addr, ipaddress.IPv6Address) and isinstance(f_net, ipaddress.IPv6Network)
        a6, n6 = f_addr, f_net
        g6 = _gateway(ipr, socket.AF_INET6, ifindex)
    return Underlay(
        ifname=ifname,
        ifindex=ifindex,
        address=address,
        network=network,
        mtu=mtu,
        mac=mac,
        gateway=_gateway(ipr, family, ifindex, default if default and default["family"] == family else None),
        address6=a6,
        network6=n6,
        gateway6=g6,
    )


@dataclass(frozen=True)
class Masquerade6:
    """Where IPv6 pods are translated to (`masquerade.address6`) and the IPv6 next hop their
    translated packets take (the IPv6 default gateway on the underlay interface, if any)."""

    address: ipaddress.IPv6Address
    gateway: ipaddress.IPv6Address | None


def resolve_masquerade6(ipr: IPRoute, underlay: Underlay, want: Any) -> Masquerade6 | None:
    """`masquerade.address6` in this namespace: "none" -> None; "auto" -> the node's IPv6
    underlay address (node.address on an IPv6 underlay, else node.address6), else the interface's
    first global IPv6 address, else None (nothing to translate IPv6 pods to); an explicit address
    must be a global IPv6 address of the underlay interface (replies must reach it there and the
    kernel must answer NDP for it), else UnderlayError."""
    if want == "none":
        return None
    own = [a for a, _, _ in _addresses(ipr, socket.AF_INET6, underlay.ifindex)]
    addr: Any
    if want == "auto":
        if underlay.address.version == 6:
            addr = underlay.address
        elif underlay.address6 is not None:
            addr = underlay.address6
        elif own:
            addr = own[0]
        else:
            return None
    else:
        addr = ipaddress.IPv6Address(str(want))
        if addr not in own:
            raise UnderlayError(
                [f"masquerade.address6: '{addr}' is not a global IPv6 address of '{underlay.ifname}'"]
            )
    if underlay.address.version == 6:
        gw = underlay.gateway
    else:
        gw = underlay.gateway6 or _gateway(ipr, socket.AF_INET6, underlay.ifindex)
    assert isinstance(addr, ipaddress.IPv6Address)
    return Masquerade6(addr, gw if isinstance(gw, ipaddress.IPv6Address) else None)


def next_hop_for(ipr: IPRoute, underlay: Underlay, peer: IPAddress) -> IPAddress | None:
    """The native next hop towards a peer node: the peer itself on-link, else the kernel's gateway.
    An IPv6 peer gets an IPv6 next hop (its MAC is then resolved over NDP).

    The kernel's own answer (RTM_GETROUTE) is used for off-link peers so that a more specific underlay
    route than the default (e.g. a rack route) is honoured; without one, the default gateway.
    """
    if underlay.on_link(peer):
        return peer
    fallback = underlay.gateway_for(peer)
    try:
        routes = ipr.route("get", dst=str(peer))
    except NetlinkError:  # ENETUNREACH and friends: fall back to the default gateway
        return fallback
    for r in routes:
        gw = r.get_attr("RTA_GATEWAY")
        if gw and r.get_attr("RTA_OIF") == underlay.ifindex:
            return ipaddress.ip_address(gw)
    return fallback


def next_hops_for(
    ipr: IPRoute, underlay: Underlay, peers: list[IPAddress]
) -> dict[IPAddress, IPAddress | None]:
    """`next_hop_for` of many peers at once: the kernel is asked about every off-link IPv4 peer in bulk
    (a few hundred RTM_GETROUTE per system call; netlink/rtnl.py), which matters with thousands.
    IPv6 peers are asked one at a time (`next_hop_for`)."""
    from podrouter.netlink.rtnl import Rtnl

    out: dict[IPAddress, IPAddress | None] = {}
    far: list[IPAddress] = []
    for p in dict.fromkeys(peers):
        if underlay.on_link(p):
            out[p] = p
        elif p.version == 6:
            out[p] = next_hop_for(ipr, underlay, p)
        else:
            far.append(p)
    if far:
        with Rtnl() as nl:
            answers = nl.next_hops([str(p) for p in far])
        for p, ans in zip(far, answers, strict=True):
            if ans is not None and ans[1] is not None and ans[0] == underlay.ifindex:
                out[p] = ipaddress.ip_address(ans[1])
            else:
                out[p] = underlay.gateway_for(p)
    return out
