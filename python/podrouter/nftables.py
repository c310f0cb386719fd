"""Keeps masquerade replies away from the node's own stack (docs/design.md §3), through libnftables.

The datapath reads replies to masqueraded flows from a filtered AF_PACKET socket on the underlay
(rust/io/src/af_packet.rs). AF_PACKET sees a *copy*: the original still goes up the node's stack,
which owns no socket on those ports and answers a TCP segment with an RST (RFC 9293 §3.10.7.1,
"if the connection does not exist") and a UDP datagram with an ICMP port unreachable. Either one
kills the translated connection at the remote end. So podrouter installs one nftables table in the
node's namespace whose only rules drop those originals:

    table ip podrouter {
      chain masquerade_replies {
        type filter hook prerouting priority raw; policy accept;
        ip daddr NODE tcp dport LO-HI counter drop
        ip daddr NODE udp dport LO-HI counter drop
      }
    }

With IPv6 masquerade (`masquerade.address6`) the same table exists in family `ip6` (`table ip6
podrouter`, rules on `ip6 daddr NODE6`): the IPv6 reply socket is bound to ETH_P_IPV6 and gets its
copy before `ipv6_rcv` runs the hook. Each family's table is present exactly while that family is
masqueraded; `remove_guard()` without a family removes both.

Why these choices:

* `prerouting` at priority `raw` (-300) runs before connection tracking (-200), so a node that has
  conntrack loaded never creates entries for packets it is about to drop. The AF_PACKET socket is
  bound to ETH_P_IP and gets its copy from the same protocol list as `ip_rcv` (which runs the hook),
  so the drop cannot hide the reply from the datapath.
* Only TCP and UDP. The node's stack does nothing harmful with an ICMP echo reply or an ICMP error
  (it finds no socket and discards them), and dropping echo replies by identifier would break a
  raw-socket `ping` on the node whose identifier (its pid) falls into the range.
* The port range never overlaps `ip_local_port_range` (checked at start), so no connection of the
  node itself uses these ports.

The table is replaced atomically: one transaction adds the table (a no-op if it exists), deletes it
and adds it again with the rules, so a leftover of a killed daemon is replaced, never duplicated.
`remove_guard()` (shutdown, `podrouter cleanup`) deletes it; it finds the table by its fixed name,
so it needs no state file.

Product code never runs `nft`: commands go to libnftables (`libnftables.so.1`, shipped with the
`nftables` package) as JSON (libnftables-json(5)) through ctypes. With the JSON output flag set,
`nft_run_cmd_from_buffer` parses its input as JSON too (libnftables 0.9.1 and later).
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import threading
from typing import Any

TABLE = "podrouter"
CHAIN = "masquerade_replies"
FAMILY = "ip"
FAMILY6 = "ip6"
FAMILIES = (FAMILY, FAMILY6)
PRIORITY_RAW = -300  # NF_IP_PRI_RAW
NFT_CTX_OUTPUT_JSON = 1 << 4  # enum nft_ctx_output_flags (libnftables.h)
LIBNFTABLES = "libnftables.so.1"  # its soname (package libnftables1: Debian 11 to 13, Ubuntu 22.04+)

_lock = threading.Lock()
_lib: Any = None
_lib_error: str | None = None
_run_lock = threading.Lock()  # every libnftables call (see run)


class NftError(Exception):
    """libnftables is missing or refused a command (the message is libnftables' own)."""


def _load() -> Any:
    global _lib, _lib_error
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        # the soname first: the dynamic loader finds it at once, while find_library runs
        # `ldconfig -p` (a fork and exec on the start's path, docs/benchmarks.md "Start-up time");
        # find_library only when that soname is missing (another ABI version)
        try:
            lib = ctypes.CDLL(LIBNFTABLES, use_errno=True)
        except OSError as first:
            from ctypes.util import find_library

            name = find_library("nftables")
            try:
                if name is None:
                    raise first
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as e:
                _lib_error = f"libnftables is not available ({e}); install the nftables package"
                return None
        vp = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = vp
        lib.nft_ctx_free.argtypes = [vp]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [vp, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [vp]
            getattr(lib, fn).restype = ctypes.c_int
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [vp]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [vp, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
        return lib


def unavailable() -> str | None:
    """Why libnftables cannot be used here, or None if it can (checked before anything is touched)."""
    _load()
    return _lib_error


def run(commands: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs one batch of JSON commands (one kernel transaction) and returns the parsed output
    (`{}` when the commands print nothing). Raises NftError with libnftables' message."""
    lib = _load()
    if lib is None:
        raise NftError(str(_lib_error))
    # One call at a time in the whole process: libnftables 1.0.6 (Debian 12) sets up and tears down
    # global tables (datatypes, realms) in nft_ctx_new/nft_ctx_free, so two threads with contexts of
    # their own (a metrics scrape reading counters while the reconcile loop syncs the guard sets)
    # crashed the daemon with an assertion in set_dtype_json. ctypes drops the GIL during the call.
    with _run_lock:
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        try:
            lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, json.dumps({"nftables": commands}).encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_free(ctx)
    if rc != 0:
        msg = " ".join(line.strip() for line in err.splitlines() if line.strip())
        raise NftError(msg or f"libnftables returned {rc}")
    return json.loads(out) if out.strip() else {}


def _table(family: str = FAMILY) -> dict[str, str]:
    return {"family": family, "name": TABLE}


def _drop_rule(node_address: str, proto: str, lo: int, hi: int, family: str = FAMILY) -> dict[str, Any]:
    def match(left: dict[str, Any], right: Any) -> dict[str, Any]:
        return {"match": {"op": "==", "left": left, "right": right}}

    return {
        "rule": {
            "family": family,
            "table": TABLE,
            "chain": CHAIN,
            "comment": f"masquerade replies ({proto}) go to the datapath only",
            "expr": [
                match({"payload": {"protocol": family, "field": "daddr"}}, node_address),
                match({"payload": {"protocol": proto, "field": "dport"}}, {"range": [lo, hi]}),
                {"counter": None},
                {"drop": None},
            ],
        }
    }


def guard_commands(
    node_address: str, port_range: tuple[int, int], family: str = FAMILY
) -> list[dict[str, Any]]:
    """The transaction `install_guard` runs (pure, for tests and `--dry-run` style inspection).

    The address must be a literal of the family's version (`ip`: IPv4, `ip6`: IPv6): libnftables
    would resolve a name through DNS."""
    if family == FAMILY:
        node_address = str(ipaddress.IPv4Address(node_address))
    elif family == FAMILY6:
        node_address = str(ipaddress.IPv6Address(node_address))
    else:
        raise ValueError(f"bad family {family!r}")
    lo, hi = (int(p) for p in port_range)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port range {lo}-{hi}")
    chain = {
        "family": family,
        "table": TABLE,
        "name": CHAIN,
        "type": "filter",
        "hook": "prerouting",
        "prio": PRIORITY_RAW,
        "policy": "accept",
    }
    t = _table(family)
    return [
        {"add": {"table": t}},
        {"delete": {"table": t}},
        {"add": {"table": t}},
        {"add": {"chain": chain}},
        {"add": _drop_rule(node_address, "tcp", lo, hi, family)},
        {"add": _drop_rule(node_address, "udp", lo, hi, family)},
    ]


def family_of(address: str) -> str:
    """The guard's family for a node address: `ip` or `ip6`."""
    return FAMILY6 if ipaddress.ip_address(address).version == 6 else FAMILY


def install_guard(node_address: str, port_range: tuple[int, int]) -> None:
    """Installs (or atomically replaces) the table of the address's family in the current network
    namespace."""
    run(guard_commands(node_address, port_range, family_of(node_address)))


def remove_guard(family: str | None = None) -> bool:
    """Deletes the table of `family` (None: of both families) if it exists. Returns True if there
    was one."""
    if unavailable() is not None:
        return False
    found = False
    for fam in (family,) if family is not None else FAMILIES:
        if guard_present(fam):
            found = True
            # add + delete: deleting a table that vanished meanwhile must not fail the teardown
            run([{"add": {"table": _table(fam)}}, {"delete": {"table": _table(fam)}}])
    return found


def guard_present(family: str = FAMILY) -> bool:
    try:
        run([{"list": {"table": _table(family)}}])
    except NftError:
        return False
    return True


def guard_counters(family: str = FAMILY) -> dict[str, int]:
    """Packets dropped so far by each rule, by protocol (`{}` when the table is absent)."""
    try:
        out = run([{"list": {"table": _table(family)}}])
    except NftError:
        return {}
    counts: dict[str, int] = {}
    for obj in out.get("nftables", []):
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if not rule:
            continue
        proto = None
        packets = 0
        for e in rule.get("expr", []):
            m = e.get("match") if isinstance(e, dict) else None
            if m and isinstance(m.get("left"), dict) and "payload" in m["left"]:
                p = m["left"]["payload"].get("protocol")
                if p in ("tcp", "udp"):
                    proto = p
            if isinstance(e, dict) and isinstance(e.get("counter"), dict):
                packets = int(e["counter"].get("packets", 0))
        if proto:
            counts[proto] = counts.get(proto, 0) + packets
    return counts


# ------------------------------------------------------------------------------ pod egress guard
#
# A second table, always present while the daemon runs (masquerade or not), checks what pods send
# before the node routes it (issue 10; docs/architecture.md, "Pod egress guard"):
#
#     table inet podrouter_pods {
#       set pod_ifaces  { type ifname; }                 # every registered pod's host interface
#       set pod_src4    { type ifname . ipv4_addr; }     # (host interface, address) of every pod
#       set pod_src6    { type ifname . ipv6_addr; }
#       set tunnel_endpoints { type ipv4_addr . inet_service; }  # peers' and our tunnel sockets
#       set tunnel_endpoints6 { type ipv6_addr . inet_service; } # the same on an IPv6 underlay
#       set node_cidrs4 { type ipv4_addr; flags interval; }       # this node's pod CIDRs
#       set node_cidrs6 { type ipv6_addr; flags interval; }
#       counter spoofed_pod_source {}
#       counter pod_tunnel_port {}
#       chain pod_egress {
#         type filter hook prerouting priority raw; policy accept;
#         iifname "podrgso*" accept                       # the GSO TAP: only the daemon writes
#         ip saddr @node_cidrs4 iifname != @pod_ifaces counter name spoofed_pod_source drop
#         ip6 saddr @node_cidrs6 iifname != @pod_ifaces counter name spoofed_pod_source drop
#         iifname != @pod_ifaces accept
#         ip6 saddr fe80::/10 accept                      # link-local: never forwarded
#         ip6 saddr :: ip6 daddr ff02::/16 accept         # DAD, MLD: never forwarded
#         meta nfproto ipv4 iifname . ip saddr != @pod_src4 counter name spoofed_pod_source drop
#         meta nfproto ipv6 iifname . ip6 saddr != @pod_src6 counter name spoofed_pod_source drop
#         ip daddr . udp dport @tunnel_endpoints counter name pod_tunnel_port drop
#         ip6 daddr . udp dport @tunnel_endpoints6 counter name pod_tunnel_port drop
#       }
#     }
#
#       set cluster_cidrs4 { type ipv4_addr; flags interval; }    # cluster (+ clustermesh) pod CIDRs
#       set cluster_cidrs6 { type ipv6_addr; flags interval; }
#       set masq_gateways4 { type ipv4_addr; }   # the underlay gateway, when masquerade is enabled
#       set masq_gateways6 { type ipv6_addr; }   # the IPv6 gateway, when IPv6 pods are masqueraded
#       set non_masq4 { type ipv4_addr; flags interval; }        # masquerade.non_masquerade_cidrs
#       set non_masq6 { type ipv6_addr; flags interval; }
#       counter pod_unrouted {}
#       chain pod_unrouted {
#         type filter hook forward priority filter; policy accept;
#         oifname "podr0" accept                          # into the datapath
#         oifname @pod_ifaces accept                      # pod to pod on this node
#         iifname "podrgso*" accept                       # the GSO TAP's frames to the underlay
#         ip saddr @node_cidrs4 ip daddr @cluster_cidrs4 counter name pod_unrouted drop
#         ip6 saddr @node_cidrs6 ip6 daddr @cluster_cidrs6 counter name pod_unrouted drop
#         ip saddr @node_cidrs4 ip daddr != @non_masq4 rt ip nexthop @masq_gateways4
#             counter name pod_unrouted drop
#         ip6 saddr @node_cidrs6 ip6 daddr != @non_masq6 rt ip6 nexthop @masq_gateways6
#             counter name pod_unrouted drop
#       }
#     }
#
# The leak guard (`pod_unrouted`): the kernel never forwards a pod's packet for another pod CIDR of
# the cluster itself (podrouter routes every one into the TUN; the datapath encapsulates or sends
# native by AF_PACKET, whose transmits bypass the forward hook), and with masquerade enabled never
# sends one to the default gateway (the masquerade steering puts every pod packet that would take
# the default route into the TUN). Such a packet only appears when podrouter's routes are missing
# (no daemon ran yet, a TUN that vanished, a route removed behind its back): it would leave
# untranslated or unencapsulated by the node's default route. The gateway rule exists per family:
# IPv4 with the underlay's IPv4 gateway, IPv6 with the IPv6 gateway masquerade resolved
# (`masquerade.address6`; a link-local gateway is kept as it is, since that is what `rt ip6 nexthop`
# reads from the route); `masquerade.non_masquerade_cidrs` of each family stay allowed. Pod traffic
# the kernel forwards by design is not touched: to on-link hosts of the underlay, to more specific
# routes of the node, to the outside when masquerade is disabled (pod addresses routable outside),
# and IPv6 to the outside when IPv6 pods are not translated (`masquerade.address6: none`, or no
# global IPv6 address: the IPv6 gateway set stays empty). The chain is left in place when the
# daemon stops (docs/operations.md), so a restart never leaks either.
#
# The first two rules cover interfaces that are no (longer a) registered pod's: a source inside this
# node's pod CIDRs is only ever legitimate from the veth of the pod that holds it (a remote peer's
# tunnel or native packets carry *its* pods' sources, masquerade replies an outside source).
# `prerouting` at `raw` runs before routing and conntrack, so a spoofed packet takes no path at
# all (native, tunnel, masquerade or to a pod of this node) and creates no conntrack entry. The
# table lives in family `inet` so one chain covers IPv4 and IPv6. Pod add/del rewrites the sets in
# one transaction (flush + add elements), so the counters and the chain stay in place.

POD_TABLE = "podrouter_pods"
POD_FAMILY = "inet"
POD_CHAIN = "pod_egress"
SPOOF_COUNTER = "spoofed_pod_source"
TUNNEL_COUNTER = "pod_tunnel_port"
LEAK_COUNTER = "pod_unrouted"
LEAK_CHAIN = "pod_unrouted"
PRIORITY_FILTER = 0  # NF_IP_PRI_FILTER
# The UDP-tunnel GSO TAP's name (rust/io/src/tap.rs: `podrgso%d`, the kernel picks the number). Only
# the daemon writes to it (pods cannot reach it), and what it writes is an encapsulated frame from the
# node's own underlay address, so both chains let it through first: its super-packets pay one
# interface-name compare instead of the set lookups (docs/benchmarks.md, issue 12, netfilter).
GSO_TAP_GLOB = "podrgso*"
_POD_SETS = {
    "pod_ifaces": "ifname",
    "pod_src4": ["ifname", "ipv4_addr"],
    "pod_src6": ["ifname", "ipv6_addr"],
    "tunnel_endpoints": ["ipv4_addr", "inet_service"],
    "tunnel_endpoints6": ["ipv6_addr", "inet_service"],
    "node_cidrs4": "ipv4_addr",
    "node_cidrs6": "ipv6_addr",
    "cluster_cidrs4": "ipv4_addr",
    "cluster_cidrs6": "ipv6_addr",
    "masq_gateways4": "ipv4_addr",
    "masq_gateways6": "ipv6_addr",
    "non_masq4": "ipv4_addr",
    "non_masq6": "ipv6_addr",
}
_INTERVAL_SETS = (
    "node_cidrs4",
    "node_cidrs6",
    "cluster_cidrs4",
    "cluster_cidrs6",
    "non_masq4",
    "non_masq6",
)


def _pod_table() -> dict[str, str]:
    return {"family": POD_FAMILY, "name": POD_TABLE}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def _iifname() -> dict[str, Any]:
    return {"meta": {"key": "iifname"}}


def _pod_rule(comment: str, *expr: dict[str, Any], chain: str = POD_CHAIN) -> dict[str, Any]:
    return {
        "add": {
            "rule": {
                "family": POD_FAMILY,
                "table": POD_TABLE,
                "chain": chain,
                "comment": comment,
                "expr": list(expr),
            }
        }
    }


def _ifname(name: str) -> str:
    # the kernel keeps at most IFNAMSIZ-1 bytes; config.py already refuses longer names
    if not name or len(name.encode()) > 15 or any(c in name for c in '/ \t\n"*'):
        raise ValueError(f"bad interface name {name!r}")
    return name


Pods = list[tuple[str, list[str]]]
Endpoints = list[tuple[str, int]]


def pod_guard_elements(
    pods: Pods,
    endpoints: Endpoints,
    node_cidrs: list[str],
    cluster_cidrs: list[str] | tuple[str, ...] = (),
    masq_gateways: list[str] | tuple[str, ...] = (),
    non_masq: list[str] | tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The commands that make the guard's sets hold exactly `pods` ((host interface, addresses)
    pairs), `endpoints` ((IPv4 or IPv6 address, UDP port) of every tunnel socket pods must not reach),
    `node_cidrs` (this node's pod CIDRs) and, for the leak guard, `cluster_cidrs` (every pod CIDR of
    the cluster and the mesh), `masq_gateways` (the gateway of each masqueraded family: the underlay's
    IPv4 gateway when masquerade is enabled, the IPv6 gateway when IPv6 pods are masqueraded; else
    empty) and `non_masq` (masquerade.non_masquerade_cidrs, both families)."""
    ifaces: set[str] = set()
    src4: set[tuple[str, str]] = set()
    src6: set[tuple[str, str]] = set()
    for ifname, addrs in pods:
        ifname = _ifname(ifname)
        ifaces.add(ifname)
        for a in addrs:
            ip = ipaddress.ip_address(a)
            (src4 if ip.version == 4 else src6).add((ifname, str(ip)))
    eps = {(str(ipaddress.ip_address(a)), int(p)) for a, p in endpoints}
    for _, port in eps:
        if not 1 <= port <= 65535:
            raise ValueError(f"bad port {port}")
    nets = [ipaddress.ip_network(c) for c in node_cidrs]
    cluster = _collapse(cluster_cidrs)
    gateways = [ipaddress.ip_address(g) for g in masq_gateways]
    nonmasq = _collapse(non_masq)

    def prefixes(version: int, among: list[Any] | None = None) -> list[Any]:
        return [
            {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
            for n in sorted(x for x in (nets if among is None else among) if x.version == version)
        ]

    elems: dict[str, list[Any]] = {
        "pod_ifaces": sorted(ifaces),
        "pod_src4": [{"concat": list(x)} for x in sorted(src4)],
        "pod_src6": [{"concat": list(x)} for x in sorted(src6)],
        "tunnel_endpoints": [{"concat": [a, p]} for a, p in sorted(eps) if ":" not in a],
        "tunnel_endpoints6": [{"concat": [a, p]} for a, p in sorted(eps) if ":" in a],
        "node_cidrs4": prefixes(4),
        "node_cidrs6": prefixes(6),
        "cluster_cidrs4": prefixes(4, cluster),
        "cluster_cidrs6": prefixes(6, cluster),
        "masq_gateways4": sorted({str(g) for g in gateways if g.version == 4}),
        "masq_gateways6": sorted({str(g) for g in gateways if g.version == 6}),
        "non_masq4": prefixes(4, nonmasq),
        "non_masq6": prefixes(6, nonmasq),
    }
    cmds: list[dict[str, Any]] = []
    for name, items in elems.items():
        ref = {"family": POD_FAMILY, "table": POD_TABLE, "name": name}
        cmds.append({"flush": {"set": ref}})
        if items:
            cmds.append({"add": {"element": {**ref, "elem": items}}})
    return cmds


def _collapse(cidrs: list[str] | tuple[str, ...]) -> list[Any]:
    """Overlapping prefixes merged (an interval set refuses overlapping elements)."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    out: list[Any] = []
    for version in (4, 6):
        out.extend(ipaddress.collapse_addresses([n for n in nets if n.version == version]))  # type: ignore[misc]
    return out


def pod_guard_commands(
    pods: Pods,
    endpoints: Endpoints,
    node_cidrs: list[str],
    cluster_cidrs: list[str] | tuple[str, ...] = (),
    masq_gateways: list[str] | tuple[str, ...] = (),
    non_masq: list[str] | tuple[str, ...] = (),
    tun: str = "podr0",
) -> list[dict[str, Any]]:
    """The transaction `install_pod_guard` runs: the table (replaced if a dead daemon left one),
    its sets filled, its counters, the chain and its rules (pure, for tests)."""
    t = _pod_table()
    cmds: list[dict[str, Any]] = [
        {"add": {"table": t}},
        {"delete": {"table": t}},
        {"add": {"table": t}},
    ]
    for name, typ in _POD_SETS.items():
        st: dict[str, Any] = {"family": POD_FAMILY, "table": POD_TABLE, "name": name, "type": typ}
        if name in _INTERVAL_SETS:
            st["flags"] = ["interval"]
        cmds.append({"add": {"set": st}})
    for name in (SPOOF_COUNTER, TUNNEL_COUNTER, LEAK_COUNTER):
        cmds.append({"add": {"counter": {"family": POD_FAMILY, "table": POD_TABLE, "name": name}}})
    cmds.append(
        {
            "add": {
                "chain": {
                    "family": POD_FAMILY,
                    "table": POD_TABLE,
                    "name": POD_CHAIN,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": PRIORITY_RAW,
                    "policy": "accept",
                }
            }
        }
    )
    ip6_saddr, ip6_daddr = _payload("ip6", "saddr"), _payload("ip6", "daddr")
    not_pod = _match(_iifname(), "@pod_ifaces", "!=")
    cmds += [
        _pod_rule(
            "the datapath's own encapsulated frames (the GSO TAP): only the daemon writes there",
            _match(_iifname(), GSO_TAP_GLOB),
            {"accept": None},
        ),
        # the address first: most packets from no pod (the underlay's, the TUN's) fail it, and the
        # family test in front of it (`meta nfproto`) is cheaper than the interface set's lookup
        _pod_rule(
            "a source of this node's pod CIDRs from no pod's interface",
            _match(_payload("ip", "saddr"), "@node_cidrs4"),
            not_pod,
            {"counter": SPOOF_COUNTER},
            {"drop": None},
        ),
        _pod_rule(
            "an IPv6 source of this node's pod CIDRs from no pod's interface",
            _match(ip6_saddr, "@node_cidrs6"),
            not_pod,
            {"counter": SPOOF_COUNTER},
            {"drop": None},
        ),
        _pod_rule(
            "not from a pod",
            _match(_iifname(), "@pod_ifaces", "!="),
            {"accept": None},
        ),
        _pod_rule(
            "IPv6 link-local source: never forwarded (NDP with the node)",
            _match(ip6_saddr, {"prefix": {"addr": "fe80::", "len": 10}}),
            {"accept": None},
        ),
        _pod_rule(
            "DAD / MLD from the unspecified address to link-scope multicast: never forwarded",
            _match(ip6_saddr, "::"),
            _match(ip6_daddr, {"prefix": {"addr": "ff02::", "len": 16}}),
            {"accept": None},
        ),
        _pod_rule(
            "IPv4 source is not the pod's own",
            _match({"meta": {"key": "nfproto"}}, "ipv4"),
            _match({"concat": [_iifname(), _payload("ip", "saddr")]}, "@pod_src4", "!="),
            {"counter": SPOOF_COUNTER},
            {"drop": None},
        ),
        _pod_rule(
            "IPv6 source is not the pod's own",
            _match({"meta": {"key": "nfproto"}}, "ipv6"),
            _match({"concat": [_iifname(), ip6_saddr]}, "@pod_src6", "!="),
            {"counter": SPOOF_COUNTER},
            {"drop": None},
        ),
        _pod_rule(
            "pods never reach a tunnel socket",
            _match({"concat": [_payload("ip", "daddr"), _payload("udp", "dport")]}, "@tunnel_endpoints"),
            {"counter": TUNNEL_COUNTER},
            {"drop": None},
        ),
        _pod_rule(
            "pods never reach a tunnel socket (IPv6 underlay)",
            _match({"concat": [ip6_daddr, _payload("udp", "dport")]}, "@tunnel_endpoints6"),
            {"counter": TUNNEL_COUNTER},
            {"drop": None},
        ),
    ]
    oifname = {"meta": {"key": "oifname"}}
    cmds += [
        {
            "add": {
                "chain": {
                    "family": POD_FAMILY,
                    "table": POD_TABLE,
                    "name": LEAK_CHAIN,
                    "type": "filter",
                    "hook": "forward",
                    "prio": PRIORITY_FILTER,
                    "policy": "accept",
                }
            }
        },
        _pod_rule("into the datapath", _match(oifname, _ifname(tun)), {"accept": None}, chain=LEAK_CHAIN),
        _pod_rule(
            "pod to pod on this node", _match(oifname, "@pod_ifaces"), {"accept": None}, chain=LEAK_CHAIN
        ),
        _pod_rule(
            "the datapath's own encapsulated frames (the GSO TAP) to the underlay",
            _match(_iifname(), GSO_TAP_GLOB),
            {"accept": None},
            chain=LEAK_CHAIN,
        ),
        _pod_rule(
            "a pod's packet for the cluster outside the datapath (podrouter's routes are missing)",
            _match(_payload("ip", "saddr"), "@node_cidrs4"),
            _match(_payload("ip", "daddr"), "@cluster_cidrs4"),
            {"counter": LEAK_COUNTER},
            {"drop": None},
            chain=LEAK_CHAIN,
        ),
        _pod_rule(
            "a pod's IPv6 packet for the cluster outside the datapath (podrouter's routes are missing)",
            _match(ip6_saddr, "@node_cidrs6"),
            _match(ip6_daddr, "@cluster_cidrs6"),
            {"counter": LEAK_COUNTER},
            {"drop": None},
            chain=LEAK_CHAIN,
        ),
        _pod_rule(
            "a pod's packet to the default gateway unmasqueraded (podrouter's steering is missing)",
            _match(_payload("ip", "saddr"), "@node_cidrs4"),
            _match(_payload("ip", "daddr"), "@non_masq4", "!="),
            _match({"rt": {"key": "nexthop", "family": "ip"}}, "@masq_gateways4"),
            {"counter": LEAK_COUNTER},
            {"drop": None},
            chain=LEAK_CHAIN,
        ),
        _pod_rule(
            "a pod's IPv6 packet to the IPv6 gateway untranslated (podrouter's steering is missing)",
            _match(ip6_saddr, "@node_cidrs6"),
            _match(ip6_daddr, "@non_masq6", "!="),
            _match({"rt": {"key": "nexthop", "family": "ip6"}}, "@masq_gateways6"),
            {"counter": LEAK_COUNTER},
            {"drop": None},
            chain=LEAK_CHAIN,
        ),
    ]
    return cmds + pod_guard_elements(pods, endpoints, node_cidrs, cluster_cidrs, masq_gateways, non_masq)


def install_pod_guard(
    pods: Pods,
    endpoints: Endpoints,
    node_cidrs: list[str],
    cluster_cidrs: list[str] | tuple[str, ...] = (),
    masq_gateways: list[str] | tuple[str, ...] = (),
    non_masq: list[str] | tuple[str, ...] = (),
    tun: str = "podr0",
) -> None:
    """Installs (or atomically replaces) the pod egress guard and the leak guard in the current
    network namespace (arguments as `pod_guard_commands`)."""
    run(pod_guard_commands(pods, endpoints, node_cidrs, cluster_cidrs, masq_gateways, non_masq, tun))


def update_pod_guard(*args: Any) -> None:
    """Rewrites the guard's sets in one transaction (the counters keep counting; arguments as
    `pod_guard_elements`)."""
    run(pod_guard_elements(*args))


def remove_pod_guard() -> bool:
    """Deletes the pod egress guard if it exists. Returns True if there was one."""
    if unavailable() is not None:
        return False
    try:
        run([{"list": {"table": _pod_table()}}])
    except NftError:
        return False
    run([{"add": {"table": _pod_table()}}, {"delete": {"table": _pod_table()}}])
    return True


def pod_guard_counters() -> dict[str, int]:
    """Packets the pod egress guard dropped, by reason (`{}` when the table is absent)."""
    try:
        out = run([{"list": {"table": _pod_table()}}])
    except NftError:
        return {}
    counts: dict[str, int] = {}
    for obj in out.get("nftables", []):
        c = obj.get("counter") if isinstance(obj, dict) else None
        if isinstance(c, dict) and c.get("name") in (SPOOF_COUNTER, TUNNEL_COUNTER, LEAK_COUNTER):
            counts[str(c["name"])] = int(c.get("packets", 0))
    return counts


__all__ = [
    "CHAIN",
    "FAMILIES",
    "FAMILY",
    "FAMILY6",
    "family_of",
    "LEAK_COUNTER",
    "POD_FAMILY",
    "POD_TABLE",
    "install_pod_guard",
    "pod_guard_commands",
    "pod_guard_counters",
    "pod_guard_elements",
    "remove_pod_guard",
    "update_pod_guard",
    "TABLE",
    "NftError",
    "guard_commands",
    "guard_counters",
    "guard_present",
    "install_guard",
    "remove_guard",
    "run",
    "unavailable",
]
