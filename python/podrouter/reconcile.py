"""The steps of the daemon's one idempotent reconcile and the reload diffing.

A reconcile (Daemon._reconcile_locked, run on every neighbour, link, discovery or pod event and on
SIGHUP) takes the peers as discovery lists them and the kernel resolves them (`refresh_peers`),
compiles the tables from the spec (plan.build_spec), plans the routes (plan.plan_routes), turns the
plan into the kernel's routes and rules (`desired_routes`, `desired_rules`; netlink/plumbing.py makes
the kernel match) and swaps the tables into the datapath when they changed. A reload (SIGHUP) loads
the config again and keeps what only a restart can change (`reloaded_config`)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from podrouter import config as configmod
from podrouter.config import Config, IPAddress, PeerConfig
from podrouter.discovery.base import PeerSet
from podrouter.netlink import IPRoute
from podrouter.netlink.constants import (
    MASQ_RULE_PRIORITY,
    MASQ_TABLE,
    POD_GATEWAY4,
    SUPPRESS_RULE_PRIORITY,
    TUN_NAME,
)
from podrouter.netlink.plumbing import RouteSpec, RuleSpec
from podrouter.netlink.underlay import Masquerade6, Underlay, next_hops_for
from podrouter.plan import PeerView, RoutePlan, engine_settings, refuse_conflicts

log = logging.getLogger("podrouter")

READY_NEIGHBOR_WAIT = 3.0  # seconds to wait for next-hop MACs before the first tables (bounded)

RouteKey = tuple[int, str]


class PeerSource(Protocol):
    """What a reconcile reads of discovery (discovery/base.py Discovery)."""

    def peers(self) -> PeerSet: ...

    def sources(self) -> dict[str, str]: ...


class NextHopWatch(Protocol):
    """What a reconcile needs of the neighbour watcher (netlink/neigh.py NeighborWatcher)."""

    def set_wanted(self, ips: set[IPAddress]) -> Mapping[IPAddress, str | None]: ...

    def wait_resolved(self, timeout: float) -> bool: ...

    def snapshot(self) -> dict[IPAddress, str]: ...


def ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


# -------------------------------------------------------------------------------------------- peers


def refresh_peers(
    cfg: Config,
    u: Underlay,
    ipr: IPRoute,
    discovery: PeerSource,
    watcher: NextHopWatch,
    masq6: Masquerade6 | None,
    previous_rejects: Mapping[str, str],
    wait: bool,
) -> tuple[list[PeerView], dict[str, str]]:
    """The peers as this node sees them now (sorted by name, next hops and MACs resolved) and the
    ones refused, with why (each refusal logged when it is new or its reason changed)."""
    wanted: dict[str, tuple[PeerConfig, bool, IPAddress | None, str]] = {}
    sources = discovery.sources()
    own = u.addresses()
    candidates = [
        PeerView(p, False, None, None, sources.get(p.name, "static"))
        for p in discovery.peers()
        if p.address not in own and p.name != cfg.node.name  # ourselves, as seen by discovery
    ]
    # the tables refuse a peer the core's rulebook finds a problem with (overlapping pod CIDRs, a
    # family this node has no underlay address in, ...); a discovery source that slipped one through
    # must cost that peer, not the whole update (static peers come first and win)
    a6 = str(u.address6) if u.address6 is not None else None
    accepted, rejected = refuse_conflicts(cfg, candidates, engine_settings(cfg, str(u.address), a6))
    # the kernel's next hop of every peer, asked in bulk (thousands of peers with etcd)
    next_hops = next_hops_for(ipr, u, [v.peer.address for v in accepted])
    for v in accepted:
        peer = v.peer
        wanted[peer.name] = (peer, u.on_link(peer.address), next_hops[peer.address], v.source)
    for name, why in rejected.items():
        if previous_rejects.get(name) != why:
            log.warning("ignoring peer %s: %s", name, why)
    hops = {nh for (_, _, nh, _) in wanted.values() if nh is not None}
    if u.gateway is not None:
        hops.add(u.gateway)
    if u.gateway6 is not None:
        hops.add(u.gateway6)
    if masq6 is not None and masq6.gateway is not None:
        hops.add(masq6.gateway)  # resolved over NDP
    watcher.set_wanted(hops)
    if wait and hops and not watcher.wait_resolved(READY_NEIGHBOR_WAIT):
        log.warning(
            "some next hops are not resolved yet; native traffic to them is dropped "
            "(neighbor_unresolved) until they answer ARP"
        )
    macs = watcher.snapshot()
    views = [
        PeerView(peer, on_link, nh, macs.get(nh) if nh is not None else None, src)
        for (peer, on_link, nh, src) in sorted(wanted.values(), key=lambda w: w[0].name)
    ]
    return views, rejected


def gateway_spec(u: Underlay, macs: Mapping[IPAddress, str]) -> dict[str, Any] | None:
    """The spec's `gateway`: the default gateway and its MAC (None: not resolved yet)."""
    if u.gateway is None:
        return None
    return {"ip": str(u.gateway), "mac": macs.get(u.gateway)}


def masq6_spec(masq6: Masquerade6 | None, macs: Mapping[IPAddress, str]) -> dict[str, Any] | None:
    """`masquerade.gateway6` of the table spec (the address is a start-time setting:
    bringup.datapath_config)."""
    if masq6 is None or masq6.gateway is None:
        return None
    return {"ip": str(masq6.gateway), "mac": macs.get(masq6.gateway)}


# ---------------------------------------------------------------------------------- kernel routes


def desired_routes(plan: list[RoutePlan], cfg: Config, u: Underlay) -> dict[RouteKey, RouteSpec]:
    """The routes the kernel should hold for `plan` (plus the pod gateway and masquerade routes)."""
    out = {}
    for r in plan:
        if r.path == "local":
            spec = RouteSpec(dst=str(r.dst), kind="unreachable", label="local")
        elif r.path == "pod":
            spec = RouteSpec(dst=str(r.dst), oif=r.dev, scope_link=True, label=f"pod {r.peer}")
        else:
            spec = RouteSpec(dst=str(r.dst), oif=r.dev, mtu=r.mtu, label=r.path)
        out[spec.key] = spec
    if u.address.version == 6 and any(c.version == 4 for c in cfg.node.pod_cidrs):
        # IPv6 underlay: the node may have no IPv4 route at all, and proxy ARP only answers for
        # an address that routes out another device; the pods' gateway 169.254.1.1 gets one into
        # the datapath (which drops what is addressed to it; docs/architecture.md)
        spec = RouteSpec(dst=f"{POD_GATEWAY4}/32", oif=TUN_NAME, label="pod gateway")
        out[spec.key] = spec
    if cfg.masquerade.enabled:
        # the masquerade egress table: a default route into the datapath (see constants.py)
        for cidr in cfg.node.pod_cidrs:
            dflt = "0.0.0.0/0" if cidr.version == 4 else "::/0"
            spec = RouteSpec(dst=dflt, oif=TUN_NAME, mtu=u.mtu, table=MASQ_TABLE, label="masquerade")
            out[spec.key] = spec
    return out


def desired_rules(cfg: Config) -> set[RuleSpec]:
    """The policy rules that steer pod traffic leaving the cluster into the masquerade table."""
    if not cfg.masquerade.enabled:
        return set()
    rules = set()
    for cidr in cfg.node.pod_cidrs:
        fam = socket.AF_INET if cidr.version == 4 else socket.AF_INET6
        rules.add(RuleSpec(priority=SUPPRESS_RULE_PRIORITY, table=254, suppress_prefixlength=0, family=fam))
        rules.add(RuleSpec(priority=MASQ_RULE_PRIORITY, table=MASQ_TABLE, src=str(cidr), family=fam))
    return rules


# ------------------------------------------------------------------------------------------- reload


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys whose change needs a restart (a reload keeps their running value)."""
    out = []
    if new.node.name != old.node.name:
        out.append("node.name")
    if (new.node.address, new.node.address6, new.node.interface) != (
        old.node.address,
        old.node.address6,
        old.node.interface,
    ):
        out.append("node.address/node.address6/node.interface")
    if new.api != old.api:
        out.append("api.socket" if new.api.socket != old.api.socket else "api.keeper")
    if new.metrics != old.metrics:
        out.append("metrics.listen")
    # the datapath binds its UDP sockets once, at start
    if new.tunnel.port_for("vxlan") != old.tunnel.port_for("vxlan") or new.tunnel.port_for(
        "geneve"
    ) != old.tunnel.port_for("geneve"):
        out.append("tunnel.port")
    if new.discovery != old.discovery:
        out.append("discovery")
    # the workers, their TUN queues and the tunnel GSO TAP are set up once, at start
    if new.datapath != old.datapath:
        out.append("datapath.workers")
    if new.tunnel.gso != old.tunnel.gso:
        out.append("tunnel.gso")
    # the datapath sizes its NAT table, its reply filter and (with it) the nftables guard from the
    # range at start; moving the guard alone would hand live flows' replies to the node's stack
    if new.masquerade.port_range != old.masquerade.port_range:
        out.append("masquerade.port_range")
    if new.masquerade.nat_config() != old.masquerade.nat_config():
        out.append("masquerade.timeouts/max_entries/max_entries_per_pod")
    # resolved (and its gateway watched) at start, like node.address
    if new.masquerade.address6 != old.masquerade.address6:
        out.append("masquerade.address6")
    return out


def reloaded_config(old: Config, new: Config) -> Config:
    """`new` with what only a restart can change kept at its running value (each logged)."""
    fixed = restart_only_changes(old, new)
    for what in fixed:
        log.warning("%s changed: restart the daemon to apply it (keeping the running value)", what)
    new = replace(
        new,
        node=replace(
            new.node,
            name=old.node.name,
            address=old.node.address,
            address6=old.node.address6,
            interface=old.node.interface,
        ),
        api=old.api,
        metrics=old.metrics,
        tunnel=replace(
            new.tunnel,
            port=old.tunnel.port if "tunnel.port" in fixed else new.tunnel.port,
            gso=old.tunnel.gso,
        ),
        datapath=old.datapath,
        discovery=old.discovery if "discovery" in fixed else new.discovery,
        masquerade=replace(
            new.masquerade,
            port_range=old.masquerade.port_range,
            timeouts=old.masquerade.timeouts,
            max_entries=old.masquerade.max_entries,
            max_entries_per_pod=old.masquerade.max_entries_per_pod,
            address6=old.masquerade.address6,
        ),
    )
    for w in new.warnings:
        log.warning("%s", w)
    if new.bgp.enabled != old.bgp.enabled:
        log.warning("bgp.enabled changed: restart the daemon to apply it (keeping the running value)")
        new = replace(new, bgp=old.bgp)
    mesh_before = (old.cluster_name, old.cluster_id, old.clustermesh)
    if (new.cluster_name, new.cluster_id, new.clustermesh) != mesh_before:
        # the remote watches are set up once, at start (docs/clustermesh.md)
        log.warning(
            "cluster.name/cluster.id/clustermesh changed: restart the daemon to apply it "
            "(keeping the running value)"
        )
        new = replace(
            new,
            cluster_name=old.cluster_name,
            cluster_id=old.cluster_id,
            clustermesh=old.clustermesh,
        )
    return new


def load_for_reload(old: Config, underlay_problems: Callable[[Config], list[str]]) -> Config | None:
    """SIGHUP's new config, or None (each problem logged) to keep the running one."""
    path = old.path
    log.info("SIGHUP: reloading %s", path)
    try:
        new = configmod.load(path) if path else old
    except configmod.ConfigError as e:
        for p in e.problems:
            log.error("reload refused: %s", p)
        log.error("keeping the running configuration")
        return None
    problems = underlay_problems(new)
    if problems:
        for p in problems:
            log.error("reload refused: %s", p)
        return None
    return reloaded_config(old, new)


__all__ = [
    "READY_NEIGHBOR_WAIT",
    "NextHopWatch",
    "PeerSource",
    "desired_routes",
    "desired_rules",
    "gateway_spec",
    "load_for_reload",
    "masq6_spec",
    "ms_since",
    "refresh_peers",
    "reloaded_config",
    "restart_only_changes",
]
