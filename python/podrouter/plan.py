"""Pure planning: from the config, the peers as the daemon sees them and the registered pods to the
routes the kernel gets (with per-destination MTUs) and the table spec the core compiles.

Nothing here reads or changes the machine; everything is a function of its arguments, so the unit
tests drive it without root (tests/unit/test_config_planning.py).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from podrouter import config as configmod
from podrouter import native
from podrouter.config import Config, IPAddress, IPNetwork, PeerConfig, PodConfig
from podrouter.discovery.base import Other, Verdict, cidr_index, refuse_by_rulebook
from podrouter.netlink.constants import TUN_NAME


def effective_mode(cfg: Config, peer: PeerConfig) -> str:
    return peer.mode or cfg.routing.mode


def geneve_payload(cfg: Config, peer: PeerConfig) -> str:
    """ethernet | ip: what the Geneve frames sent to `peer` carry (override or node-wide)."""
    return peer.geneve_payload or cfg.tunnel.geneve_payload


def split_by(net: IPNetwork, cuts: Iterable[IPNetwork]) -> list[IPNetwork]:
    """`net` cut into pieces so that each piece lies wholly inside or wholly outside every cut."""
    pieces: list[IPNetwork] = [net]
    for cut in cuts:
        if cut.version != net.version:
            continue
        out: list[IPNetwork] = []
        for p in pieces:
            if cut != p and cut.subnet_of(p):  # type: ignore[arg-type]
                out.append(cut)
                out.extend(p.address_exclude(cut))  # type: ignore[arg-type]
            else:
                out.append(p)
        pieces = out
    return sorted(pieces, key=lambda n: (n.version, n.network_address, n.prefixlen))


class PathOracle(Protocol):
    """The compiled tables as the route plan asks them (`_native.Tables`): which path each
    destination inside a peer's pod CIDRs takes (the core decides it, docs/architecture.md,
    decision order step 2; the plan never decides it again)."""

    def route_paths(self, destinations: list[str]) -> list[str | None]: ...


encap_overhead = native.encap_overhead


def path_mtu(
    cfg: Config, path: str, underlay_mtu: int, peer: PeerConfig | None = None, v6_outer: bool = False
) -> int:
    """The MTU the kernel may forward towards a destination on `path` (installed as RTAX_MTU); for
    Geneve to `peer` with an IP payload 14 bytes more (no inner Ethernet header). Without a peer the
    largest overhead of the path counts. `v6_outer`: the peer is reached over the IPv6 underlay (20
    more bytes of outer header)."""
    if path == "native":
        return underlay_mtu
    if cfg.tunnel.mtu is not None:
        return cfg.tunnel.mtu
    ip_payload = path == "geneve" and peer is not None and geneve_payload(cfg, peer) == "ip"
    return underlay_mtu - encap_overhead(path, v6_outer, ip_payload)


def min_tunnel_mtu(cfg: Config, underlay_mtu: int, v6_outer: bool = False) -> int:
    return min(path_mtu(cfg, p, underlay_mtu, v6_outer=v6_outer) for p in configmod.PROTOCOLS)


@dataclass(frozen=True)
class PeerView:
    """A peer as the daemon currently sees it (its next hop resolved)."""

    peer: PeerConfig
    on_link: bool
    next_hop: IPAddress | None
    next_hop_mac: str | None
    source: str = "static"


@dataclass(frozen=True)
class RoutePlan:
    dst: IPNetwork
    path: str  # native | vxlan | geneve | local | pod | cluster
    mtu: int | None
    peer: str | None = None
    dev: str | None = None


def plan_routes(
    cfg: Config,
    peers: list[PeerView],
    pods: Iterable[PodConfig],
    underlay_mtu: int,
    tables: PathOracle,
    tun: str = TUN_NAME,
    v6_underlay: bool = False,
) -> list[RoutePlan]:
    """The routes for `peers` (their pod CIDRs cut by `native_cidrs` in hybrid mode, each piece on
    the path `tables` give it, compiled from the same views), the cluster catch-all, this node's
    pod CIDRs and the pods' host routes. `v6_underlay`: this node has an IPv6 underlay address (the
    cluster catch-all then assumes the larger IPv6 outer overhead); each peer's routes use the
    overhead of its own address family."""
    out: list[RoutePlan] = []
    catch_all = min_tunnel_mtu(cfg, underlay_mtu, v6_underlay)
    pieces = [
        (view, piece)
        for view in peers
        for cidr in view.peer.pod_cidrs
        for piece in split_by(
            cidr, cfg.routing.native_cidrs if effective_mode(cfg, view.peer) == "hybrid" else ()
        )
    ]
    # a piece lies wholly inside or outside every native CIDR: its first address decides for all of it
    paths = tables.route_paths([str(piece.network_address) for _, piece in pieces])
    for (view, piece), path in zip(pieces, paths, strict=True):
        if path is None:
            # the tables do not give it to a peer (they were compiled from other views): into the
            # datapath like the rest of the cluster space, which drops it as no_route
            out.append(RoutePlan(piece, "cluster", catch_all, view.peer.name, tun))
            continue
        mtu = path_mtu(cfg, path, underlay_mtu, view.peer, view.peer.address.version == 6)
        out.append(RoutePlan(piece, path, mtu, view.peer.name, tun))
    # the rest of the cluster space goes to the datapath too, which drops it as no_route and counts it
    # (rather than letting it leak out of the default route with a pod source address)
    for cidr in (*cfg.cluster_cidrs, *mesh_space(cfg)):
        out.append(RoutePlan(cidr, "cluster", catch_all, None, tun))
    # addresses of our own pod CIDR without a registered pod: unreachable, so a packet to one gets an
    # ICMP error at once instead of bouncing TUN -> kernel -> TUN until its TTL runs out
    for cidr in cfg.node.pod_cidrs:
        out.append(RoutePlan(cidr, "local", None, None, None))
    for pod in pods:
        # docs/design.md §4b: the pod's /32 (and, dual stack, its /128) to its veth
        for addr in pod.addresses:
            out.append(RoutePlan(ipaddress.ip_network(addr), "pod", None, pod.name, pod.host_interface))
    return out


def has_ipv6(cfg: Config) -> bool:
    """Dual stack: any IPv6 pod CIDR (this node's or the cluster's)."""
    return any(n.version == 6 for n in (*cfg.node.pod_cidrs, *cfg.cluster_cidrs))


def engine_settings(
    cfg: Config, node_address: str, node_address6: str | None = None, masq_address6: str | None = None
) -> dict[str, Any]:
    """The engine's start-time settings, as keys of its config (`_native.Datapath(config)`, which
    bringup.datapath_config completes): what the datapath reads once, at start, and every table
    is compiled against (`_native.Tables(spec, settings)`). A reload that changes one of them is
    restart-only (reconcile.restart_only_changes). `masq_address6`: where IPv6 pods are translated
    to (`masquerade.address6`; None: IPv6 pods are not translated)."""
    return configmod.engine_settings(node_address, node_address6, cfg.masquerade.port_range, masq_address6)


def build_spec(
    cfg: Config,
    generation: int,
    gateway: dict[str, Any] | None,
    peers: list[PeerView],
    masq_gateway6: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The table spec dict `_native.Tables(spec, settings)` takes (docs/architecture.md): what a
    table swap may change. The node's addresses, the masquerade port range and IPv6 address are
    start-time settings (`engine_settings`). `masq_gateway6`: the IPv6 next hop of translated IPv6
    packets."""

    # a mesh peer's pod CIDRs are cluster space too (docs/clustermesh.md): routed to that peer,
    # checked on ingress, never masqueraded
    cluster = [*cfg.cluster_cidrs, *mesh_space(cfg), *mesh_cidrs(peers)]
    spec = configmod.table_spec(
        cfg.node, cluster, cfg.routing, cfg.tunnel, cfg.masquerade, [_peer_spec(v) for v in peers], generation
    )
    spec["gateway"] = gateway
    spec["masquerade"]["gateway6"] = masq_gateway6
    return spec


def _peer_spec(v: PeerView) -> dict[str, Any]:
    address, cidrs, next_hop = _peer_strings(v)
    return {
        "name": v.peer.name,
        "address": address,
        "pod_cidrs": list(cidrs),
        "mode": v.peer.mode,
        "tunnel_protocol": v.peer.tunnel_protocol,
        "on_link": v.on_link,
        "next_hop": ({"ip": next_hop, "mac": v.next_hop_mac} if next_hop is not None else None),
        "vtep_mac": v.peer.vtep_mac,
        "geneve_payload": v.peer.geneve_payload,
    }


@functools.lru_cache(maxsize=16384)
def _peer_strings(v: PeerView) -> tuple[str, tuple[str, ...], str | None]:
    # cached (a view is immutable): with thousands of peers, formatting their addresses was most of
    # a rebuild's time. Only strings are cached: every spec gets dicts of its own to change.
    return (
        str(v.peer.address),
        tuple(str(x) for x in v.peer.pod_cidrs),
        str(v.next_hop) if v.next_hop is not None else None,
    )


def mesh_space(cfg: Config) -> list[IPNetwork]:
    """The pod CIDRs declared for the mesh's remote clusters (`clustermesh.clusters[].pod_cidr`)."""
    return [n for c in cfg.clustermesh.clusters for n in c.pod_cidrs]


def mesh_cidrs(peers: Iterable[PeerView]) -> list[IPNetwork]:
    """The pod CIDRs of peers from other clusters (source `cluster:<name>`)."""
    return [c for v in peers if v.source.startswith("cluster:") for c in v.peer.pod_cidrs]


def nat_exhausted_message(cfg: Config, dropped: int, entries: int) -> str:
    """The log line for new flows the datapath refused (`nat_exhausted`). The drop reason covers
    two causes: no free port of masquerade.port_range towards one destination, and the table at
    masquerade.max_entries; the live entry count tells them apart."""
    lo, hi = cfg.masquerade.port_range
    limit = cfg.masquerade.max_entries or configmod.NAT_DEFAULT_MAX_ENTRIES
    if entries >= limit:
        return (
            f"masquerade: {dropped} new flows dropped (nat_exhausted): the translation table is full "
            f"({entries} entries, masquerade.max_entries {limit}); raise masquerade.max_entries or "
            "shorten masquerade.timeouts"
        )
    return (
        f"masquerade: {dropped} new flows dropped (nat_exhausted): port range exhausted, every port of "
        f"masquerade.port_range {lo}-{hi} is in use towards the same destination ({entries} entries in "
        "the table); widen the range or shorten masquerade.timeouts"
    )


def nat_snapshot_path(cfg: Config) -> Path:
    """The NAT snapshot file: next to the state file, `<api.socket dir>/<node>.nat`."""
    return cfg.state_path.with_name(f"{cfg.node.name}.nat")


def refuse_conflicts(
    cfg: Config, candidates: list[PeerView], settings: dict[str, Any]
) -> tuple[list[PeerView], dict[str, str]]:
    """The peers discovery offers, as the core's rulebook admits them (`rules::admit` through
    discovery/base.py `refuse_by_rulebook`, the rules `Tables::build` enforces, address family
    included): the candidates are admitted one by one in order, each against the node and the
    ones admitted before it, so earlier candidates win (static peers come first); each one with a
    problem is refused with it (its name -> why) and takes no further part, so one bad record
    never blocks the rest, nor a younger peer that conflicts only with it."""

    def spec_of(peers: list[dict[str, Any]]) -> dict[str, Any]:
        # a mesh peer's pod CIDRs are cluster space (build_spec); they lie inside mesh_space
        cluster = [*cfg.cluster_cidrs, *mesh_space(cfg), *mesh_cidrs(candidates)]
        return configmod.table_spec(cfg.node, cluster, cfg.routing, cfg.tunnel, cfg.masquerade, peers)

    kept, refused = refuse_by_rulebook(
        spec_of, settings, (), [(j, v.peer) for j, v in enumerate(candidates)], _word_conflict
    )
    rejected = {candidates[j].peer.name: why for j, why in refused.items()}
    return [candidates[j] for j, _peer in kept], rejected


def _word_conflict(prob: native.Problem, other: Other) -> Verdict:
    """A problem of the core worded for the daemon's log and `rejected_peers`: the field of the
    peer and the core's message, with the other party named by its peer name. A peer breaking
    several rules is refused for the first in `check`'s order (its pod CIDR overlaps last)."""
    v = prob.values
    field = prob.path.split(".", 1)[1] if "." in prob.path else prob.path
    held = "node" if other is None or other[0] == "node" else other[1]
    if prob.code == "pod_cidr_overlap":
        return (1, cidr_index(prob)), f"{field}: '{v[0]}' overlaps {held}'s pod CIDR '{v[1]}'"
    if prob.code in ("name_taken", "address_taken"):
        return (0, 0), f"{field}: '{v[0]}' is also {held}"
    if prob.code == "cluster_contains_peer_address":
        return (0, 0), f"address: '{v[1]}' is inside the cluster pod CIDR '{v[0]}'"
    return (0, 0), f"{field}: {prob.message}"


__all__ = [
    "PeerView",
    "RoutePlan",
    "build_spec",
    "engine_settings",
    "effective_mode",
    "encap_overhead",
    "geneve_payload",
    "has_ipv6",
    "mesh_cidrs",
    "mesh_space",
    "min_tunnel_mtu",
    "nat_exhausted_message",
    "nat_snapshot_path",
    "PathOracle",
    "path_mtu",
    "plan_routes",
    "refuse_conflicts",
    "split_by",
]
