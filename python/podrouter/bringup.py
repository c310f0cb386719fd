"""Node bring-up: what `podrouter run` checks against this namespace before touching it (the
preflight problems, exit 2 naming key and value) and then sets up once: the datapath's TUN, its
link settings and the node's sysctls.

The daemon (daemon.py) calls these in its start order; each takes what it works on as arguments
(the netlink socket, the underlay, the plumbing that records every change for cleanup)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from podrouter import config as configmod
from podrouter import lifecycle, native
from podrouter.config import Config
from podrouter.errors import StartError
from podrouter.netlink import IPRoute, sysctl
from podrouter.netlink.constants import IFF_MULTICAST, IPV6_MIN_MTU, MASQ_TABLE, TUN_NAME
from podrouter.netlink.plumbing import RT_TABLE_MAIN, Plumbing, foreign_routes
from podrouter.netlink.underlay import Masquerade6, Underlay
from podrouter.plan import encap_overhead, engine_settings, has_ipv6, path_mtu
from podrouter.qos.sizing import tun_txqlen

if TYPE_CHECKING:
    from podrouter._native import Datapath

log = logging.getLogger("podrouter")


# --------------------------------------------------------------------------------------- preflight


def read_local_port_range() -> tuple[int, int] | None:
    raw = sysctl.read("net.ipv4.ip_local_port_range")
    if raw is None:
        return None
    lo, hi = (int(x) for x in raw.split())
    return lo, hi


def port_range_problem(cfg: Config) -> str | None:
    """docs/design.md §3: the masquerade ports must never collide with the kernel's own ephemeral ports,
    or a reply to a node-local connection could be taken for a masqueraded one (and vice versa)."""
    if not cfg.masquerade.enabled:
        return None
    local = read_local_port_range()
    if local is None:
        return None
    lo, hi = cfg.masquerade.port_range
    klo, khi = local
    if lo <= khi and klo <= hi:
        return (
            f"masquerade.port_range: '{lo}-{hi}' overlaps net.ipv4.ip_local_port_range '{klo} {khi}' "
            f"of this namespace (pick a range outside it, or narrow ip_local_port_range)"
        )
    return None


def underlay_problems(cfg: Config, u: Underlay) -> list[str]:
    """What makes `cfg` impossible on underlay `u` (at start and at every reload)."""
    problems = []
    v6 = any(a.version == 6 for a in u.addresses())
    for path in ("vxlan", "geneve"):
        # the outer packet must never be fragmented: the inner MTU plus the headers has to fit
        # (over an IPv6 underlay the outer header is 20 bytes longer)
        overhead = encap_overhead(path, v6)
        limit = u.mtu - overhead
        if cfg.tunnel.mtu is not None and cfg.tunnel.mtu > limit:
            problems.append(
                f"tunnel.mtu: {cfg.tunnel.mtu} does not fit the underlay: '{u.ifname}' MTU {u.mtu} "
                f"minus {overhead} bytes of {path} overhead{' (IPv6 outer)' if v6 else ''} is {limit}"
            )
            break
    if has_ipv6(cfg) or v6:
        # IPv6 links must carry 1280 bytes (RFC 8200 §5); the kernel refuses a smaller route MTU
        for path in ("native", *configmod.PROTOCOLS):
            if path_mtu(cfg, path, u.mtu, v6_outer=v6) < IPV6_MIN_MTU:
                tunnelled = cfg.tunnel.mtu is not None and path != "native"
                what = "tunnel.mtu" if tunnelled else "node.interface"
                problems.append(
                    f"{what}: the {path} path MTU {path_mtu(cfg, path, u.mtu, v6_outer=v6)} (underlay "
                    f"'{u.ifname}' MTU {u.mtu}) is below IPv6's minimum {IPV6_MIN_MTU}, and IPv6 pod "
                    "CIDRs or an IPv6 underlay are configured"
                )
                break
    # pod space must not swallow the underlay (its subnet, our address, the gateway); no peer
    # may be us or of a family we have no underlay address in (config.underlay_problems)
    problems.extend(configmod.underlay_problems(cfg, u.address, u.network, u.gateway, u.address6, u.network6))
    return problems


def route_conflict_problems(ipr: IPRoute, cfg: Config) -> list[str]:
    """Routes of another owner that make the config impossible (checked before anything is
    installed): one holding the /32 or /128 of a pod listed in the config (its traffic would
    go wherever that route says), or a default route in the masquerade table MASQ_TABLE (the
    masquerade steering would send pod traffic to it). Other conflicts (a peer's pod CIDR,
    this node's own pod CIDR) are reported while running and left alone (docs/config.md)."""
    foreign = foreign_routes(ipr, {RT_TABLE_MAIN, MASQ_TABLE})
    problems = []
    for i, pod in enumerate(cfg.pods):
        for addr in pod.addresses:
            key = (RT_TABLE_MAIN, str(ipaddress.ip_network(addr)))
            if key in foreign:
                problems.append(
                    f"pods[{i}].ip: '{addr}' (pod {pod.name}) is already routed by a route podrouter "
                    f"did not make: {foreign[key]}; remove it or change the pod's address"
                )
    if cfg.masquerade.enabled:
        for dflt in sorted({"0.0.0.0/0" if c.version == 4 else "::/0" for c in cfg.node.pod_cidrs}):
            if (MASQ_TABLE, dflt) in foreign:
                problems.append(
                    f"masquerade.enabled: routing table {MASQ_TABLE} (podrouter's masquerade table) "
                    f"already holds a route podrouter did not make: {foreign[(MASQ_TABLE, dflt)]}"
                )
    return problems


def bgp_problems(cfg: Config, underlay: Underlay | None) -> list[str]:
    if not cfg.bgp.enabled:
        return []
    from podrouter import bgp  # lazy: only a BGP node pays for it

    out = bgp.path_problems(cfg)
    for i, p in enumerate(cfg.bgp.peers):
        if underlay is not None and p.address == underlay.address:
            out.append(f"bgp.peers[{i}].address: '{p.address}' is this node's own address")
    return out


def masquerade_notes(cfg: Config, u: Underlay, masq6: Masquerade6 | None) -> None:
    """Log what masquerade does for each family of this node's pods (docs/masquerade.md)."""
    if not cfg.masquerade.enabled:
        return
    fams = {c.version for c in cfg.node.pod_cidrs}
    if 4 in fams and u.address.version == 6:
        log.warning(
            "masquerade: the underlay is IPv6 only, so IPv4 pods are not masqueraded (their "
            "packets leaving the cluster are dropped as no_route, never sent untranslated)"
        )
    if 6 in fams:
        if masq6 is None:
            why = (
                "masquerade.address6 is 'none'"
                if cfg.masquerade.address6 == "none"
                else f"'{u.ifname}' has no global IPv6 address"
            )
            log.warning("masquerade: IPv6 pods are not translated (%s)", why)
        else:
            log.info(
                "masquerade: IPv6 pods are translated to %s (next hop %s)",
                masq6.address,
                masq6.gateway if masq6.gateway is not None else "none: dropped as no_route",
            )


# ----------------------------------------------------------------------------------- the datapath


def workers(cfg: Config) -> int:
    """`datapath.workers`, or for `auto` one worker per two CPUs this process may run on, at most
    four: the rest is for the kernel's side of the TUN, veth and UDP paths, which costs about as much
    again (docs/benchmarks.md: a second worker on a 2-CPU node lifted four TCP streams by ~15 % and
    left one stream unchanged)."""
    if cfg.datapath.workers is not None:
        return cfg.datapath.workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 2
    return max(1, min(4, cpus // 2))


def datapath_config(cfg: Config, u: Underlay, masq6: Masquerade6 | None = None) -> dict[str, Any]:
    """The `_native.Datapath` config (the engine's start-time settings) for this node; the
    tables are compiled against it too (`_native.Tables(spec, settings)`). `masq6`: the resolved
    `masquerade.address6` (None: IPv6 pods are not translated)."""
    return {
        **engine_settings(
            cfg,
            str(u.address),
            str(u.address6) if u.address6 is not None else None,
            str(masq6.address) if masq6 is not None else None,
        ),
        "tun_name": TUN_NAME,
        "tun_mtu": u.mtu,
        # persistent: the TUN (and every route into it) outlives this process, so pod traffic
        # never follows the default route while the daemon restarts (lifecycle.py)
        "tun_persist": True,
        "underlay_ifindex": u.ifindex,
        "underlay_mac": u.mac,
        "vxlan_port": cfg.tunnel.port_for("vxlan"),
        "geneve_port": cfg.tunnel.port_for("geneve"),
        "workers": workers(cfg),
        "nat": cfg.masquerade.nat_config(),
        "offload": True,
        "tunnel_gso": cfg.tunnel.gso != "off",
    }


def open_datapath(ipr: IPRoute, dp_config: dict[str, Any]) -> Datapath:
    """Create or reattach the persistent TUN. A leftover `podr0` whose flags do not match this
    daemon's (IFF_MULTI_QUEUE: a different worker count) cannot be attached (EINVAL): it is
    deleted and made again (its routes go with it and come back with the first reconcile; the
    leak guard drops pod traffic meanwhile)."""
    try:
        return native.open_datapath(dp_config)
    except OSError as e:
        if e.errno != errno.EINVAL or lifecycle.tun_kind(ipr, TUN_NAME) != "tun":
            raise
        log.warning("%s exists with other flags (%s): deleting and re-creating it", TUN_NAME, e)
        lifecycle.remove_tun(ipr, TUN_NAME)
        return native.open_datapath(dp_config)


def nat_snapshot_report(st: Mapping[str, Any]) -> None:
    """Log what the restore did: a refused snapshot (or refused entries) is reported, counted
    (podrouter_nat_snapshot_rejected) and otherwise ignored."""
    if st.get("load_error"):
        log.error("NAT snapshot refused, starting with an empty table: %s", st["load_error"])
        return
    loaded = st.get("loaded")
    if not loaded:
        return
    log.info(
        "NAT snapshot %s: %d mappings restored, %d expired while stopped",
        st.get("path"),
        loaded["restored"],
        loaded["expired"],
    )
    if loaded["rejected"]:
        reasons = ", ".join(
            f"{k} {loaded[k]}"
            for k in ("outside_cidrs", "port_range", "duplicate", "invalid", "full")
            if loaded[k]
        )
        log.warning("NAT snapshot: %d entries refused (%s)", loaded["rejected"], reasons)


# ------------------------------------------------------------------------------------------ sysctls


def node_sysctls(ps: Plumbing, ipr: IPRoute, cfg: Config, u: Underlay, tun_idx: int) -> None:
    """The node's forwarding sysctls and podr0's, before podr0 is up (every one recorded by the
    plumbing for cleanup)."""
    ps.set_sysctl("net.ipv4.ip_forward", 1)
    # rp_filter: the effective value is max(conf/all, conf/<dev>) (ip-sysctl.rst). Packets from
    # remote pods arrive on the underlay (native) and on podr0 (decapsulated), while the reverse
    # route to their source points at podr0: strict mode (1) would drop the native ones. Loose (2)
    # still refuses sources with no route at all.
    if sysctl.read("net.ipv4.conf.all.rp_filter") == "1":
        ps.set_sysctl("net.ipv4.conf.all.rp_filter", 2)
    if sysctl.read(sysctl.conf(u.ifname, "rp_filter")) == "1":
        ps.set_sysctl(sysctl.conf(u.ifname, "rp_filter"), 2)
    ps.set_sysctl(sysctl.conf(TUN_NAME, "rp_filter"), 0)
    v6_knob = sysctl.conf(TUN_NAME, "disable_ipv6", "ipv6")
    if sysctl.read(v6_knob) is None:
        if has_ipv6(cfg):
            raise StartError(["IPv6 pod CIDRs are configured but IPv6 is disabled in this namespace"])
        return
    if not has_ipv6(cfg):
        # no IPv6 link-local chatter (router solicitations, MLD) into the datapath
        ps.set_sysctl(v6_knob, 1)
        return
    # dual stack: the node forwards IPv6, and podr0 carries IPv6 routes, so IPv6 must be on there,
    # but silent (podr0 is still down here, so nothing was sent yet). MLD: a forwarding IPv6
    # device with IFF_MULTICAST joins the all-routers groups (ff02::2, ff05::2) and reports them
    # (hop limit 1, into the datapath) once up. podr0 joined them when it was created if the
    # namespace already forwarded IPv6, and clearing the flag does not leave them; turning
    # forwarding off on podr0 while it still has the flag does. In MLDv2 a leave is itself
    # reported (twice, even after the link comes up); in MLDv1 only a group we reported is left
    # with a Done message, and podr0 never reported anything. Then the flag goes, and forwarding
    # comes back without a join (dev_forward_change only joins on IFF_MULTICAST devices).
    ps.set_sysctl(sysctl.conf(TUN_NAME, "force_mld_version", "ipv6"), 1)
    fwd = sysctl.conf(TUN_NAME, "forwarding", "ipv6")
    ps.set_sysctl(fwd, 0)
    ipr.link("set", index=tun_idx, flags=0, change=IFF_MULTICAST)
    ps.set_sysctl("net.ipv6.conf.all.forwarding", 1)
    ps.set_sysctl(fwd, 1)
    # no link-local address (so no DAD and no router solicitation), no RAs accepted
    ps.set_sysctl(sysctl.conf(TUN_NAME, "addr_gen_mode", "ipv6"), 1)
    ps.set_sysctl(sysctl.conf(TUN_NAME, "accept_ra", "ipv6"), 0)
    ps.set_sysctl(sysctl.conf(TUN_NAME, "accept_dad", "ipv6"), 0)
    ps.set_sysctl(sysctl.conf(TUN_NAME, "dad_transmits", "ipv6"), 0)
    ps.set_sysctl(sysctl.conf(TUN_NAME, "router_solicitations", "ipv6"), 0)
    ps.set_sysctl(v6_knob, 0)


def tun_up(ipr: IPRoute, tun_idx: int, cfg: Config, u: Underlay) -> None:
    """podr0 up with the underlay MTU and an explicit queue in front of the datapath (docs/qos.md),
    not the TUN's default 500 packets. The tunnel paths get their smaller MTU per destination from
    the route (RTAX_MTU), so native destinations keep the full MTU."""
    ipr.link("set", index=tun_idx, mtu=u.mtu, txqlen=tun_txqlen(cfg.bandwidth), state="up")


__all__ = [
    "bgp_problems",
    "datapath_config",
    "masquerade_notes",
    "nat_snapshot_report",
    "node_sysctls",
    "open_datapath",
    "port_range_problem",
    "read_local_port_range",
    "route_conflict_problems",
    "tun_up",
    "underlay_problems",
]
