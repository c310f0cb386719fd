"""Everything podrouter does to the kernel's network state, spoken as netlink through pyroute2.

Product code never runs `ip` or `tc`: routes, rules, links and neighbours go through pyroute2, and
the handful of per-interface knobs that only exist as sysctls (proxy_arp, rp_filter, ip_forward) are
written to /proc/sys directly, which is per network namespace.

- `underlay`: find the underlay interface, address, MTU and gateway (after config validation).
- `plumbing`: install/remove routes, rules and sysctls, recording each in the state file.
- `neigh`: resolve native next hops to MACs and follow changes (a monitor thread).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from podrouter.netlink import _pyroute2
from podrouter.netlink.constants import (
    MASQ_RULE_PRIORITY,
    MASQ_TABLE,
    RTPROT_PODROUTER,
    SUPPRESS_RULE_PRIORITY,
)

# before the first pyroute2 import: the parts podrouter uses only (start-up time). Cheap (a spec
# lookup): pyroute2 itself is imported when one of the names below is first used, so that importing
# `podrouter.netlink.constants` (config, plan, the forward-first start in startup.py) costs none of it
_pyroute2.light()

if TYPE_CHECKING:
    from pyroute2.iproute import IPRoute

    from podrouter.netlink.neigh import NeighborWatcher
    from podrouter.netlink.plumbing import Plumbing, RouteSpec, RuleSpec
    from podrouter.netlink.underlay import Underlay, UnderlayError, netns_id, resolve_underlay

# name -> the module it comes from, imported on first use (PEP 562)
_LAZY = {
    "IPRoute": "pyroute2.iproute",  # the light package's (podrouter's one way in)
    "NeighborWatcher": "podrouter.netlink.neigh",
    "Plumbing": "podrouter.netlink.plumbing",
    "RouteSpec": "podrouter.netlink.plumbing",
    "RuleSpec": "podrouter.netlink.plumbing",
    "Underlay": "podrouter.netlink.underlay",
    "UnderlayError": "podrouter.netlink.underlay",
    "netns_id": "podrouter.netlink.underlay",
    "resolve_underlay": "podrouter.netlink.underlay",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'podrouter.netlink' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


__all__ = [
    "IPRoute",
    "MASQ_RULE_PRIORITY",
    "MASQ_TABLE",
    "RTPROT_PODROUTER",
    "SUPPRESS_RULE_PRIORITY",
    "NeighborWatcher",
    "Plumbing",
    "RouteSpec",
    "RuleSpec",
    "Underlay",
    "UnderlayError",
    "netns_id",
    "resolve_underlay",
]
