"""The route and rule podrouter owns, as values: what the plan wants (reconcile.py), what the
plumbing installs (plumbing.py) and what the state file records (state.py checks a record's keys
against these fields). No netlink here, so the state file's reader needs none of the plumbing.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from podrouter.netlink.constants import RTPROT_PODROUTER

RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class RouteSpec:
    """One route podrouter owns. `oif` is an interface *name* (indexes change when a veth is re-made)."""

    dst: str  # a CIDR, normalised by ipaddress
    kind: str = "unicast"  # unicast | unreachable | blackhole
    oif: str | None = None
    mtu: int | None = None  # RTAX_MTU: the kernel's forwarding path honours it (ip_dst_mtu_maybe_forward)
    table: int = RT_TABLE_MAIN
    scope_link: bool = False
    label: str = ""  # why it exists (shown by `podrouter status`), not sent to the kernel

    @property
    def key(self) -> tuple[int, str]:
        return (self.table, self.dst)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.dst else socket.AF_INET

    def kernel_view(self, ifindex: int | None) -> tuple[str, int | None, int | None]:
        return (self.kind, ifindex if self.kind == "unicast" else None, self.mtu)


@dataclass(frozen=True)
class RuleSpec:
    priority: int
    table: int
    src: str | None = None  # a CIDR
    suppress_prefixlength: int | None = None
    family: int = socket.AF_INET

    def request(self) -> dict[str, Any]:
        # FRA_PROTOCOL: the rule is recognised as ours by it, and a delete that names it matches
        # only rules carrying it (fib_nl_delrule compares the protocol when one is given)
        kw: dict[str, Any] = {
            "family": self.family,
            "priority": self.priority,
            "table": self.table,
            "protocol": RTPROT_PODROUTER,
        }
        if self.src is not None:
            net = ipaddress.ip_network(self.src)
            kw.update(src=str(net.network_address), src_len=net.prefixlen)
        if self.suppress_prefixlength is not None:
            kw["suppress_prefixlen"] = self.suppress_prefixlength
        return kw
