"""Everything podrouter does to the kernel's network state, spoken as netlink through pyroute2.

Product code never runs `ip` or `tc`: routes, rules, links and neighbours go through pyroute2, and
the handful of per-interface knobs that only exist as sysctls (proxy_arp, rp_filter, ip_forward) are
written to /proc/sys directly, which is per network namespace.

- `underlay`: find the underlay interface, address, MTU and gateway (after config validation).
- `plumbing`: install/remove routes, rules and sysctls, recording each in the state file.
- `neigh`: resolve native next hops to MACs and follow changes (a monitor thread).
"""

from podrouter.netlink import _pyroute2

_pyroute2.light()  # before the first pyroute2 import: the parts podrouter uses only (start-up time)

from pyroute2.iproute import IPRoute  # noqa: E402 - the light package's (podrouter's one way in)

from podrouter.netlink.constants import (  # noqa: E402
    MASQ_RULE_PRIORITY,
    MASQ_TABLE,
    RTPROT_PODROUTER,
    SUPPRESS_RULE_PRIORITY,
)
from podrouter.netlink.neigh import NeighborWatcher  # noqa: E402
from podrouter.netlink.plumbing import Plumbing, RouteSpec, RuleSpec  # noqa: E402
from podrouter.netlink.underlay import Underlay, UnderlayError, netns_id, resolve_underlay  # noqa: E402

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
