"""The node daemon (`podrouter run --config FILE`).

Start-up order (nothing in the kernel is touched before step 3):

1. validate the config (config.py) -- exit 2 on any problem;
2. preflight against this namespace: the masquerade port range must not overlap
   ip_local_port_range, the underlay must resolve, a tunnel MTU override must fit the underlay,
   no other daemon may own the API socket -- exit 2 (1 if a daemon is already running);
3. clean up a dead predecessor's leftovers (its state file), create the Datapath (the TUN `podr0`),
   set the TUN up with the underlay MTU, write the sysctls, install routes, start the datapath with
   the first tables, then open the API socket and take the metrics port. `podrouter status` reports
   ready only after that; /metrics is served from just after ready (prometheus_client's import is
   not part of the start; a scrape meanwhile waits in the port's backlog).

Everything is driven by one idempotent `reconcile()`: it recomputes routes and tables from the
config, the discovered peers, the registered pods and the resolved next-hop MACs, makes the kernel
match (`Plumbing.sync_routes`) and swaps new tables into the datapath when they differ. Neighbour and
link changes, discovery updates, pod registrations and SIGHUP all end in it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from podrouter import api as apimod
from podrouter import config as configmod
from podrouter import lifecycle
from podrouter import state as statefile
from podrouter.config import Config, IPNetwork, PeerConfig, PodConfig, vtep_mac_of
from podrouter.monitor import MonitorHub
from podrouter.monitor import stream as monitor_stream
from podrouter.netlink import sysctl
from podrouter.netlink.constants import (
    IFF_MULTICAST,
    IPV6_MIN_MTU,
    MASQ_RULE_PRIORITY,
    MASQ_TABLE,
    POD_GATEWAY4,
    POD_GATEWAY6,
    SUPPRESS_RULE_PRIORITY,
    TUN_NAME,
)

log = logging.getLogger("podrouter")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
NAT_LOG_INTERVAL = 10.0  # seconds between two "masquerade range exhausted" log lines
READY_NEIGHBOR_WAIT = 3.0  # seconds to wait for next-hop MACs before the first tables (bounded)
ADOPT_DISCOVERY_WAIT = 30.0  # at most this long a predecessor's routes wait for etcd's first listing


class StartError(Exception):
    """The daemon must not start. `problems` are printed one per line; `code` is the exit status."""

    def __init__(self, problems: list[str], code: int = EXIT_CONFIG) -> None:
        self.problems = problems
        self.code = code
        super().__init__("\n".join(problems))


# ------------------------------------------------------------------------------------ pure planning


def effective_mode(cfg: Config, peer: PeerConfig) -> str:
    return peer.mode or cfg.routing.mode


def tunnel_protocol(cfg: Config, peer: PeerConfig) -> str:
    return peer.tunnel_protocol or cfg.tunnel.protocol


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


def path_for(cfg: Config, peer: PeerConfig, dst: IPNetwork, on_link: bool) -> str:
    """native | vxlan | geneve for destinations in `dst` (a piece from `split_by`), as the datapath
    decides it (docs/architecture.md, decision order step 2)."""
    mode = effective_mode(cfg, peer)
    if mode == "native":
        return "native"
    if mode == "hybrid":
        if any(dst.version == n.version and dst.subnet_of(n) for n in cfg.routing.native_cidrs):  # type: ignore[arg-type]
            return "native"
        if cfg.routing.native_when_on_link and on_link:
            return "native"
    return tunnel_protocol(cfg, peer)


def encap_overhead(path: str, v6_outer: bool = False, ip_payload: bool = False) -> int:
    """Outer bytes of a tunnel path (VXLAN, Geneve with an inner Ethernet frame or with
    `ip_payload`), 20 more over an IPv6 underlay: the core's numbers, from `_native`."""
    native = _load_native()
    geneve = native.GENEVE_IP_OVERHEAD if ip_payload else native.GENEVE_OVERHEAD
    base: int = {"vxlan": native.VXLAN_OVERHEAD, "geneve": geneve}[path]
    return base + (native.OUTER_V6_EXTRA if v6_outer else 0)


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
    next_hop: ipaddress.IPv4Address | ipaddress.IPv6Address | None
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
    tun: str = TUN_NAME,
    v6_underlay: bool = False,
) -> list[RoutePlan]:
    """`v6_underlay`: this node has an IPv6 underlay address (the cluster catch-all then assumes the
    larger IPv6 outer overhead); each peer's routes use the overhead of its own address family."""
    out: list[RoutePlan] = []
    for view in peers:
        v6_outer = view.peer.address.version == 6
        for cidr in view.peer.pod_cidrs:
            cuts = cfg.routing.native_cidrs if effective_mode(cfg, view.peer) == "hybrid" else ()
            for piece in split_by(cidr, cuts):
                path = path_for(cfg, view.peer, piece, view.on_link)
                mtu = path_mtu(cfg, path, underlay_mtu, view.peer, v6_outer)
                out.append(RoutePlan(piece, path, mtu, view.peer.name, tun))
    # the rest of the cluster space goes to the datapath too, which drops it as no_route and counts it
    # (rather than letting it leak out of the default route with a pod source address)
    for cidr in (*cfg.cluster_cidrs, *mesh_space(cfg)):
        out.append(RoutePlan(cidr, "cluster", min_tunnel_mtu(cfg, underlay_mtu, v6_underlay), None, tun))
    # addresses of our own pod CIDR without a registered pod: unreachable, so a packet to one gets an
    # ICMP error at once instead of bouncing TUN -> kernel -> TUN until its TTL runs out
    for cidr in cfg.node.pod_cidrs:
        out.append(RoutePlan(cidr, "local", None, None, None))
    for pod in pods:
        # docs/design.md §4b: the pod's /32 (and, dual stack, its /128) to its veth
        for addr in pod.addresses:
            out.append(RoutePlan(ipaddress.ip_network(addr), "pod", None, pod.name, pod.host_interface))
    return out


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def has_ipv6(cfg: Config) -> bool:
    """Dual stack: any IPv6 pod CIDR (this node's or the cluster's)."""
    return any(n.version == 6 for n in (*cfg.node.pod_cidrs, *cfg.cluster_cidrs))


def build_spec(
    cfg: Config,
    generation: int,
    node_address: str,
    gateway: dict[str, Any] | None,
    peers: list[PeerView],
    node_address6: str | None = None,
    masq_address6: str | None = None,
    masq_gateway6: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The table spec dict `_native.Tables(spec)` takes (docs/architecture.md). `masq_address6` /
    `masq_gateway6`: where IPv6 pods are translated to and the IPv6 next hop (`masquerade.address6`;
    None: IPv6 pods are not translated)."""

    def nets(xs: Iterable[IPNetwork]) -> list[str]:
        return [str(x) for x in xs]

    node: dict[str, Any] = {
        "name": cfg.node.name,
        "address": node_address,
        "pod_cidrs": nets(cfg.node.pod_cidrs),
    }
    if node_address6 is not None:
        node["address6"] = node_address6
    return {
        "generation": generation,
        "node": node,
        # a mesh peer's pod CIDRs are cluster space too (docs/clustermesh.md): routed to that peer,
        # checked on ingress, never masqueraded
        "cluster_cidrs": nets(cfg.cluster_cidrs) + nets(mesh_space(cfg)) + nets(mesh_cidrs(peers)),
        "mode": cfg.routing.mode,
        "native_cidrs": nets(cfg.routing.native_cidrs),
        "native_when_on_link": cfg.routing.native_when_on_link,
        "tunnel": {
            "protocol": cfg.tunnel.protocol,
            "vni": cfg.tunnel.vni,
            "vxlan_port": cfg.tunnel.port_for("vxlan"),
            "geneve_port": cfg.tunnel.port_for("geneve"),
            "geneve_payload": cfg.tunnel.geneve_payload,
        },
        "gateway": gateway,
        "masquerade": {
            "enabled": cfg.masquerade.enabled,
            "non_masquerade_cidrs": nets(cfg.masquerade.non_masquerade_cidrs),
            "port_range": list(cfg.masquerade.port_range),
            "address6": masq_address6,
            "gateway6": masq_gateway6,
        },
        "peers": [_peer_spec(v) for v in peers],
    }


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


def read_local_port_range() -> tuple[int, int] | None:
    raw = sysctl.read("net.ipv4.ip_local_port_range")
    if raw is None:
        return None
    lo, hi = (int(x) for x in raw.split())
    return lo, hi


def nat_snapshot_path(cfg: Config) -> Path:
    """The NAT snapshot file: next to the state file, `<api.socket dir>/<node>.nat`."""
    return cfg.state_path.with_name(f"{cfg.node.name}.nat")


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


# ----------------------------------------------------------------------------------------- the daemon


@dataclass
class PodEntry:
    pod: PodConfig
    source: str  # config | api
    shaping: dict[str, Any] = field(default_factory=dict)
    # the CNI attachment that registered it (container_id, netns, ifname), if a CNI plugin did: a DEL
    # that names another container (a late DEL of a predecessor with the same pod name) leaves it be
    cni: dict[str, str] | None = None


class _PeerIndex:
    """The peers accepted so far in one refresh, indexed so that checking the next one costs
    O(log n) instead of a scan of every accepted peer (thousands with etcd discovery)."""

    def __init__(self, cfg: Config) -> None:
        from podrouter.discovery.base import NetIndex

        self.own = NetIndex()
        for net in cfg.node.pod_cidrs:
            self.own.add(net, "this node")
        self.nets = NetIndex()
        self.names: set[str] = set()
        self.addresses: dict[Any, str] = {}

    def conflict(self, peer: PeerConfig) -> str | None:
        for net in peer.pod_cidrs:
            hit = self.own.find(net)
            if hit is not None:
                return f"pod CIDR {net} overlaps this node's {hit[1]}"
        if peer.name in self.names:
            return "duplicate name"
        if peer.address in self.addresses:
            return f"address {peer.address} is also peer {self.addresses[peer.address]}'s"
        for net in peer.pod_cidrs:
            hit = self.nets.find(net)
            if hit is not None:
                return f"pod CIDR {net} overlaps peer {hit[0]}'s {hit[1]}"
        return None

    def add(self, peer: PeerConfig) -> None:
        self.names.add(peer.name)
        self.addresses[peer.address] = peer.name
        for net in peer.pod_cidrs:
            self.nets.add(net, peer.name)


class Daemon:
    def __init__(self, cfg: Config, handover: bool = False) -> None:
        self.cfg = cfg
        # handover (docs/handover.md): `handover_mode` takes the datapath of a running daemon over;
        # `handing_over` is set while this daemon's workers are stopped for a successor; the state
        # file is this daemon's to mark stopped only while `owns_record`
        self.handover_mode = handover
        self.handing_over = False
        self.owns_record = not handover
        self.handover_server: Any = None
        self._pending: Any = None
        self.lock = threading.RLock()
        self.ready = False
        self.generation = 0
        self.started_at = time.time()
        self.pods: dict[str, PodEntry] = {}
        self.peer_views: list[PeerView] = []
        self.route_plan: list[RoutePlan] = []
        self.route_errors: list[str] = []
        self.peer_rejects: dict[str, str] = {}
        self._last_counter_check = 0.0
        self._nat_exhausted_logged = 0
        self._nat_log_at = -NAT_LOG_INTERVAL
        self._spec_key: Any = None
        # how long the last reconcile's steps took (status "timings"; docs/benchmarks.md, scale)
        self.timings: dict[str, Any] = {}
        self._pod_guard_key: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dirty: set[str] = set()
        self._hup = False
        self._exit_code = EXIT_OK
        self.ipr: Any = None
        self.underlay: Any = None
        # IPv6 masquerade (masquerade.address6 resolved at start; None: IPv6 pods not translated)
        self.masq6: Any = None
        self.plumbing: Any = None
        self.watcher: Any = None
        self.datapath: Any = None
        self.tables: Any = None
        self.discovery: Any = None
        self.bandwidth: Any = None
        self.api: apimod.ApiServer | None = None
        self.monitor: MonitorHub | None = None
        self.metrics: Any = None
        self._metrics_sock: Any = None  # the metrics port, taken before ready, served after it
        self.bgp: Any = None  # podrouter.bgp.BgpSpeaker when bgp.enabled
        self.adopted = False  # started on a predecessor's state (lifecycle.py)
        self.ready_after = 0.0  # seconds from process start to ready (status, the restart bench)
        # adopting with etcd discovery: the predecessor's routes kept until discovery has listed the
        # peers once (else the first reconcile would delete every discovered peer's route: a flap)
        self._adopt_keep: dict[Any, Any] = {}
        self._adopt_keep_until = 0.0

    # ------------------------------------------------------------------------------ start / stop

    def preflight(self) -> None:
        """Everything that can refuse to start, checked before anything is installed."""
        from pyroute2.iproute import IPRoute

        from podrouter.netlink.underlay import UnderlayError, resolve_underlay

        problems: list[str] = []
        p = port_range_problem(self.cfg)
        if p:
            problems.append(p)
        self.ipr = IPRoute()
        try:
            self.underlay = resolve_underlay(self.ipr, self.cfg.node)
        except UnderlayError as e:
            problems.extend(e.problems)
        if self.underlay is not None:
            problems.extend(self._underlay_problems(self.cfg))
            problems.extend(self._resolve_masquerade6())
        if self.cfg.discovery.backend == "etcd":
            from podrouter.discovery.etcd import start_problems

            problems.extend(start_problems(self.cfg))  # the TLS files load
        problems.extend(self._route_conflict_problems())
        from podrouter import nftables

        why = nftables.unavailable()
        if why is not None:
            # the pod egress guard (spoofed sources, tunnel ports) is not optional
            problems.append(f"the pod egress guard needs libnftables ({why}); install nftables")
        problems.extend(_bgp_problems(self.cfg, self.underlay))
        if problems:
            raise StartError(problems, EXIT_CONFIG)
        if self.handover_mode:
            self._handover_check()
            return
        if apimod.socket_in_use(self.cfg.api.socket):
            raise StartError(
                [f"api.socket: a daemon is already listening on {self.cfg.api.socket}"], EXIT_FAILURE
            )
        recorded = self._recorded_state()
        if (
            recorded is not None
            and recorded.pid != 0
            and statefile.pid_alive(recorded.pid)
            and recorded.pid != _getpid()
        ):
            raise StartError(
                [
                    f"{self.cfg.state_path}: daemon pid {recorded.pid} for node "
                    f"'{recorded.node}' is still running"
                ],
                EXIT_FAILURE,
            )

    def _handover_check(self) -> None:
        """--handover: a daemon must answer on api.socket and accept this config, before anything
        is changed (the fds themselves are checked when they come)."""
        from podrouter import handover

        try:
            want = handover.expectations(self.cfg.node.name, self._datapath_config())
            handover.check(self.cfg.api.socket, want)
        except handover.HandoverError as e:
            raise StartError([f"handover: {e}"], EXIT_CONFIG) from None

    def handed_over(self) -> None:
        """A successor runs on this daemon's datapath: stop (the stop contract) and leave the state
        file to it."""
        self.owns_record = False
        self._stop.set()
        self._wake.set()

    def _underlay_problems(self, cfg: Config) -> list[str]:
        problems = []
        u = self.underlay
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
        problems.extend(
            configmod.underlay_problems(cfg, u.address, u.network, u.gateway, u.address6, u.network6)
        )
        return problems

    def _resolve_masquerade6(self) -> list[str]:
        """`masquerade.address6` and the IPv6 gateway, when this node has IPv6 pods (resolved even
        with masquerade disabled: a reload may enable it). Problems are exit-2 start errors."""
        from podrouter.netlink.underlay import UnderlayError, resolve_masquerade6

        self.masq6 = None
        if not any(c.version == 6 for c in self.cfg.node.pod_cidrs):
            return []
        try:
            self.masq6 = resolve_masquerade6(self.ipr, self.underlay, self.cfg.masquerade.address6)
        except UnderlayError as e:
            return e.problems
        return []

    def _masquerade_notes(self) -> None:
        """Log what masquerade does for each family of this node's pods (docs/masquerade.md)."""
        cfg, u = self.cfg, self.underlay
        if not cfg.masquerade.enabled:
            return
        fams = {c.version for c in cfg.node.pod_cidrs}
        if 4 in fams and u.address.version == 6:
            log.warning(
                "masquerade: the underlay is IPv6 only, so IPv4 pods are not masqueraded (their "
                "packets leaving the cluster are dropped as no_route, never sent untranslated)"
            )
        if 6 in fams:
            m = self.masq6
            if m is None:
                why = (
                    "masquerade.address6 is 'none'"
                    if cfg.masquerade.address6 == "none"
                    else f"'{u.ifname}' has no global IPv6 address"
                )
                log.warning("masquerade: IPv6 pods are not translated (%s)", why)
            else:
                log.info(
                    "masquerade: IPv6 pods are translated to %s (next hop %s)",
                    m.address,
                    m.gateway if m.gateway is not None else "none: dropped as no_route",
                )

    def _route_conflict_problems(self) -> list[str]:
        """Routes of another owner that make the config impossible (checked before anything is
        installed): one holding the /32 or /128 of a pod listed in the config (its traffic would
        go wherever that route says), or a default route in the masquerade table MASQ_TABLE (the
        masquerade steering would send pod traffic to it). Other conflicts (a peer's pod CIDR,
        this node's own pod CIDR) are reported while running and left alone (docs/config.md)."""
        from podrouter.netlink.plumbing import RT_TABLE_MAIN, foreign_routes

        foreign = foreign_routes(self.ipr, {RT_TABLE_MAIN, MASQ_TABLE})
        problems = []
        for i, pod in enumerate(self.cfg.pods):
            for addr in pod.addresses:
                key = (RT_TABLE_MAIN, str(ipaddress.ip_network(addr)))
                if key in foreign:
                    problems.append(
                        f"pods[{i}].ip: '{addr}' (pod {pod.name}) is already routed by a route podrouter "
                        f"did not make: {foreign[key]}; remove it or change the pod's address"
                    )
        if self.cfg.masquerade.enabled:
            for dflt in sorted({"0.0.0.0/0" if c.version == 4 else "::/0" for c in self.cfg.node.pod_cidrs}):
                if (MASQ_TABLE, dflt) in foreign:
                    problems.append(
                        f"masquerade.enabled: routing table {MASQ_TABLE} (podrouter's masquerade table) "
                        f"already holds a route podrouter did not make: {foreign[(MASQ_TABLE, dflt)]}"
                    )
        return problems

    def _recorded_state(self, set_aside: bool = False) -> statefile.State | None:
        """The predecessor's state file, validated (state.py). A corrupt or tampered one is never
        acted on; at start it is renamed to `<file>.refused` (kept for inspection) so that this
        daemon's own record can take its place."""
        try:
            return statefile.load(self.cfg.state_path)
        except ValueError as e:
            if not set_aside:
                log.warning("%s", e)
                return None
            aside = self.cfg.state_path.with_name(self.cfg.state_path.name + ".refused")
            try:
                os.replace(self.cfg.state_path, aside)
            except OSError as err:
                raise StartError([f"{e}; cannot move it aside: {err}"], EXIT_FAILURE) from None
            log.error("%s; moved to %s, its leftovers (if any) are not undone", e, aside)
            return None

    def start(self) -> None:

        from podrouter import discovery
        from podrouter.netlink.neigh import NeighborWatcher
        from podrouter.netlink.plumbing import Plumbing

        cfg, u = self.cfg, self.underlay
        recorded = self._recorded_state(set_aside=True)
        from podrouter.netlink.underlay import netns_id

        if recorded is not None and recorded.netns != netns_id():
            # sysctls and rules are per namespace: a record from elsewhere says nothing about this one
            log.warning(
                "%s was written in another network namespace (%s): not acting on it (it is replaced)",
                cfg.state_path,
                recorded.netns,
            )
            recorded = None
        self.plumbing = Plumbing(self.ipr, cfg.state_path, cfg.node.name, cfg.api.socket)
        self.plumbing.state.tun = TUN_NAME
        if recorded is not None:
            # the stop contract (lifecycle.py): take the predecessor's state over in place; the first
            # reconcile changes only what differs
            log.info(
                "adopting what the previous daemon (%s) left: %d routes, %d rules, %d pods",
                f"pid {recorded.pid}" if recorded.pid else "stopped",
                len(recorded.routes),
                len(recorded.rules),
                len(recorded.pods),
            )
            lifecycle.adopt(self.plumbing, recorded)
            self.adopted = True
            if cfg.discovery.backend == "etcd":
                self._adopt_keep = dict(self.plumbing.routes)
                self._adopt_keep_until = time.monotonic() + ADOPT_DISCOVERY_WAIT
            # tc is rebuilt by the bandwidth manager (it does not adopt qdiscs): remove the old first
            for line in self._cleanup_shaping(recorded):
                log.info("  %s", line)
        self.plumbing.save()

        self.datapath = self._open_datapath()
        self._nat_snapshot_setup()
        tun_idx = getattr(self.datapath, "tun_ifindex", None) or self.plumbing.ifindex(TUN_NAME)
        if tun_idx is None:
            raise StartError([f"the datapath did not create {TUN_NAME}"], EXIT_FAILURE)
        # the TUN carries inner packets up to the underlay MTU; the tunnel paths get their smaller MTU
        # per destination from the route (RTAX_MTU), so native destinations keep the full MTU
        # sysctls first: with IPv6 still enabled, bringing podr0 up sends MLD reports / router
        # solicitations (hop limit 1) into the datapath, which would count them as ttl_exceeded
        self._node_sysctls(tun_idx)
        # an explicit queue in front of the datapath (docs/qos.md), not the TUN's default 500 packets
        from podrouter.qos.sizing import tun_txqlen

        self.ipr.link("set", index=tun_idx, mtu=u.mtu, txqlen=tun_txqlen(cfg.bandwidth), state="up")
        if self.plumbing.state.nft_guard and not cfg.masquerade.enabled:
            # a predecessor's masquerade reply guard that this config no longer wants
            from podrouter import nftables

            nftables.remove_guard()
            self.plumbing.state.nft_guard = False
            self.plumbing.save()
        self._sync_masquerade_guard(None, cfg)
        self._masquerade_notes()

        self.watcher = NeighborWatcher(u.ifindex, self._on_event)
        self.discovery = discovery.make(cfg, str(u.address))
        if cfg.clustermesh.clusters:
            from podrouter import clustermesh

            self.discovery = clustermesh.MeshDiscovery(cfg, self.discovery)
        self.bandwidth = self._make_bandwidth(cfg)
        with self.lock:
            for pod in cfg.pods:
                self._pod_install(pod, "config", raise_errors=False)
            if recorded is not None:
                for pod, cni in lifecycle.recorded_api_pods(recorded, cfg):
                    self._pod_install(pod, "api", raise_errors=False, cni=cni)
            # the guards go in before the first route (and, when adopting, with the pods already in
            # their sets, so no pod's packet is taken for a spoofed one while the table is replaced);
            # the peers are listed first (without waiting for MACs), so the guard's first sets hold
            # their tunnel endpoints and the first reconcile has no set to update (one transaction)
            self._refresh_peers(wait=False)
            self._install_pod_guard()
            if not self.watcher.resolved():
                self._refresh_peers(wait=True)
            self._reconcile_locked("start")
        if self._pending is not None:
            # the old daemon closes its API socket and metrics port once we run: wait for that
            self._pending.finish()
            self._pending = None
            self.owns_record = True
            self.plumbing.save()
        self._nat_snapshot_report()
        self.watcher.start()
        self.discovery.start(self._on_event)
        self.monitor = MonitorHub(lambda: self.datapath, self._pod_of)
        from podrouter import handover

        self.handover_server = handover.Server(self)
        raws = {"handover": self.handover_server.handle}
        self.api = apimod.ApiServer(cfg.api.socket, self._api_handlers(), self._api_streams(), raws)
        if cfg.metrics.listen is not None:
            from podrouter.metrics import listen_socket

            # the port now (a clash stops the start), the HTTP server just after ready (below)
            self._metrics_sock = listen_socket(cfg.metrics.listen)
        self._start_bgp()
        self.ready = True
        self.ready_after = lifecycle.process_age()
        log.info(
            "ready: %s mode, %d peers, %d pods, tables generation %d (%.2f s after the process started%s)",
            cfg.routing.mode,
            len(self.peer_views),
            len(self.pods),
            self.generation,
            self.ready_after,
            ", adopted" if self.adopted else "",
        )
        for err in self.route_errors:
            log.warning("%s", err)
        self._start_metrics()
        self._keeper_replace()

    # ------------------------------------------------------------------ the fd keeper (keeper.py)

    def _keeper_take(self, native: Any) -> Any:
        """At start: a Datapath on the fds the keeper held while no daemon ran, or None."""
        from podrouter import keeper

        return keeper.take(self.cfg, self._datapath_config(), native, log)

    def _keeper_replace(self) -> None:
        """Once ready: the previous keeper lets go; with api.keeper a new one holds our fds."""
        from podrouter import keeper

        try:
            if self.cfg.api.keeper:
                keeper.replace(self.cfg, self.datapath, self._datapath_config(), log)
            else:
                keeper.drop(keeper.socket_path(self.cfg))
        except Exception:  # noqa: BLE001 - the daemon runs on without a keeper
            log.exception("fd keeper")

    def _keeper_stop(self) -> None:
        """The full removal: nothing may keep the TUN's queues attached."""
        from podrouter import keeper

        for line in keeper.stop(self.cfg):
            log.info("%s", line)

    def _start_metrics(self) -> None:
        """Serve /metrics on the socket taken before ready: importing prometheus_client and
        starting its server are not part of the start (a scrape meanwhile waits in the backlog)."""
        if self._metrics_sock is None:
            return
        from podrouter.metrics import MetricsServer, make_source

        self.metrics = MetricsServer(
            make_source(self._counters, lambda: len(self.peer_views), self._pod_limits, self._bgp_status),
            sock=self._metrics_sock,
        )
        self._metrics_sock = None  # the server's now

    def _datapath_config(self) -> dict[str, Any]:
        cfg, u = self.cfg, self.underlay
        return {
            "tun_name": TUN_NAME,
            "tun_mtu": u.mtu,
            # persistent: the TUN (and every route into it) outlives this process, so pod traffic
            # never follows the default route while the daemon restarts (lifecycle.py)
            "tun_persist": True,
            "underlay_ifindex": u.ifindex,
            "underlay_mac": u.mac,
            "underlay_address": str(u.address),
            "underlay_address6": str(u.address6) if u.address6 is not None else None,
            "vxlan_port": cfg.tunnel.port_for("vxlan"),
            "geneve_port": cfg.tunnel.port_for("geneve"),
            # one worker per two cores, at most four: the rest is for the kernel's side of the
            # TUN, veth and UDP paths, which costs about as much again
            "workers": max(1, min(4, (os.cpu_count() or 2) // 2)),
            "nat": cfg.masquerade.nat_config(),
            "offload": True,
        }

    def _open_datapath(self) -> Any:
        """Create or reattach the persistent TUN. A leftover `podr0` whose flags do not match this
        daemon's (IFF_MULTI_QUEUE: a different worker count) cannot be attached (EINVAL): it is
        deleted and made again (its routes go with it and come back with the first reconcile; the
        leak guard drops pod traffic meanwhile)."""
        import errno

        native = _load_native()
        if self.handover_mode:
            from podrouter import handover

            # the old daemon's datapath, taken over at the first tables (reconcile)
            self._pending = handover.Pending(self, native)
            return self._pending
        kept = self._keeper_take(native)
        if kept is not None:
            return kept
        try:
            return native.Datapath(self._datapath_config())
        except OSError as e:
            if e.errno != errno.EINVAL or lifecycle.tun_kind(self.ipr, TUN_NAME) != "tun":
                raise
            log.warning("%s exists with other flags (%s): deleting and re-creating it", TUN_NAME, e)
            lifecycle.remove_tun(self.ipr, TUN_NAME)
            return native.Datapath(self._datapath_config())

    def _node_sysctls(self, tun_idx: int) -> None:
        u = self.underlay
        ps = self.plumbing
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
            if has_ipv6(self.cfg):
                raise StartError(["IPv6 pod CIDRs are configured but IPv6 is disabled in this namespace"])
            return
        if not has_ipv6(self.cfg):
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
        self.ipr.link("set", index=tun_idx, flags=0, change=IFF_MULTICAST)
        ps.set_sysctl("net.ipv6.conf.all.forwarding", 1)
        ps.set_sysctl(fwd, 1)
        # no link-local address (so no DAD and no router solicitation), no RAs accepted
        ps.set_sysctl(sysctl.conf(TUN_NAME, "addr_gen_mode", "ipv6"), 1)
        ps.set_sysctl(sysctl.conf(TUN_NAME, "accept_ra", "ipv6"), 0)
        ps.set_sysctl(sysctl.conf(TUN_NAME, "accept_dad", "ipv6"), 0)
        ps.set_sysctl(sysctl.conf(TUN_NAME, "dad_transmits", "ipv6"), 0)
        ps.set_sysctl(sysctl.conf(TUN_NAME, "router_solicitations", "ipv6"), 0)
        ps.set_sysctl(v6_knob, 0)

    def _guard_addresses(self, cfg: Config) -> list[str]:
        """The masquerade addresses of the families `cfg` translates: the IPv4 node address
        (none on an IPv6-only underlay) and `masquerade.address6` (with IPv6 pods)."""
        if not cfg.masquerade.enabled:
            return []
        out = [str(self.underlay.address)] if self.underlay.address.version == 4 else []
        if self.masq6 is not None:
            out.append(str(self.masq6.address))
        return out

    def _sync_masquerade_guard(self, old: Config | None, new: Config) -> None:
        """The nftables tables that keep masquerade replies from the node's own stack (nftables.py):
        one per masqueraded family (`ip`, `ip6`), present exactly while masquerade is enabled, for
        the current masquerade address and port range."""
        from podrouter import nftables

        before = (self._guard_addresses(old), old.masquerade.port_range) if old else ([], None)
        after = (self._guard_addresses(new), new.masquerade.port_range)
        if before == after:
            return
        if after[0]:
            # recorded first, so that a crash right after still gets it removed by cleanup
            self.plumbing.state.nft_guard = True
            self.plumbing.save()
            for addr in after[0]:
                nftables.install_guard(addr, new.masquerade.port_range)
                log.info(
                    "masquerade reply guard installed for %s (ports %d-%d)", addr, *new.masquerade.port_range
                )
        wanted = {nftables.family_of(a) for a in after[0]}
        for fam in nftables.FAMILIES:
            if fam not in wanted and (old is not None or self.plumbing.state.nft_guard):
                nftables.remove_guard(fam)
        if not after[0] and old is not None:
            self.plumbing.state.nft_guard = False
            self.plumbing.save()

    def _pod_guard_want(self) -> tuple[Any, ...]:
        """What the pod egress guard's sets should hold now: each registered pod's host interface
        with its addresses, every tunnel socket (each peer's and our own address, at both tunnel
        ports) that no pod may send to, and this node's pod CIDRs."""
        pods = sorted(
            (e.pod.host_interface, sorted(str(a) for a in e.pod.addresses)) for e in self.pods.values()
        )
        # two pods on one interface (a re-registration under a new name) share its entry
        merged: dict[str, list[str]] = {}
        for ifname, pod_addrs in pods:
            merged.setdefault(ifname, []).extend(pod_addrs)
        ports = sorted({self.cfg.tunnel.port_for("vxlan"), self.cfg.tunnel.port_for("geneve")})
        endpoints = {str(a) for a in self.underlay.addresses()} | {
            str(v.peer.address) for v in self.peer_views
        }
        cfg, u = self.cfg, self.underlay
        # the leak guard (nftables.py): the cluster's pod CIDRs (and the mesh's), and, with
        # masquerade, each masqueraded family's gateway no pod packet may reach untranslated: the
        # IPv4 gateway (an IPv6-only underlay has none: its IPv4 pods are never masqueraded) and
        # the IPv6 one masquerade resolved (none when IPv6 pods are not translated)
        gw4 = u.gateway if u.gateway is not None and u.gateway.version == 4 else None
        gw6 = self.masq6.gateway if self.masq6 is not None else None
        masq_gw = [str(g) for g in (gw4, gw6) if g is not None] if cfg.masquerade.enabled else []
        return (
            sorted(merged.items()),
            [(a, p) for a in sorted(endpoints) for p in ports],
            [str(c) for c in cfg.node.pod_cidrs],
            [str(c) for c in (*cfg.cluster_cidrs, *mesh_space(cfg), *mesh_cidrs(self.peer_views))],
            masq_gw,
            [str(c) for c in cfg.masquerade.non_masquerade_cidrs],
        )

    def _install_pod_guard(self) -> None:
        """The nftables table that drops pod packets with a source that is not the pod's own
        (`spoofed_pod_source`) and pod packets to a tunnel socket (`pod_tunnel_port`); nftables.py.
        Installed before the first pod route exists, its sets filled by every reconcile."""
        from podrouter import nftables

        # no state-file record needed: `podrouter cleanup` finds the table by its fixed name
        want = self._pod_guard_want()
        nftables.install_pod_guard(*want)
        self._pod_guard_key = want
        log.info("pod egress guard installed (nftables table %s %s)", nftables.POD_FAMILY, nftables.POD_TABLE)

    def _sync_pod_guard(self) -> None:
        from podrouter import nftables

        want = self._pod_guard_want()
        if want == self._pod_guard_key:
            return
        nftables.update_pod_guard(*want)
        self._pod_guard_key = want

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self._hup:
                self._hup = False
                self.reload()
            with self.lock:
                reasons, self._dirty = self._dirty, set()
            if reasons:
                # coalesce bursts (a pod add creates link + neighbour events at once)
                time.sleep(0.05)
                with self.lock:
                    reasons |= self._dirty
                    self._dirty = set()
                    try:
                        t0 = time.perf_counter()
                        self._refresh_peers(wait=False)
                        self.timings["last_refresh_peers_ms"] = _ms_since(t0)
                        self._reconcile_locked(", ".join(sorted(reasons)))
                        self.timings["last_reconcile_ms"] = _ms_since(t0)
                    except Exception:  # noqa: BLE001 - the running tables stay; the next event retries
                        log.exception(
                            "reconcile failed (%s); the datapath keeps its current tables",
                            ", ".join(sorted(reasons)),
                        )
            if self._adopt_keep and (self._discovery_synced() or time.monotonic() > self._adopt_keep_until):
                self._on_event("adopted routes")
            self._watch_counters()
            if self.bgp is not None:
                self.bgp.ensure_running()
            if self.datapath is not None and not self.datapath.is_running() and not self.handing_over:
                log.error("the datapath stopped unexpectedly; shutting down")
                self._exit_code = EXIT_FAILURE
                break
        return self._exit_code

    def _watch_counters(self) -> None:
        """Say in the log, at most every NAT_LOG_INTERVAL seconds, when new flows are being refused
        because the masquerade range is exhausted: the metric alone is easy to miss."""
        now = time.monotonic()
        if now - self._last_counter_check < 1.0:
            return
        self._last_counter_check = now
        try:
            counters = self._counters()
            n = int((counters.get("drops") or {}).get("nat_exhausted", 0))
            entries = int(counters.get("nat_entries", 0) or 0)
        except Exception:  # noqa: BLE001 - a closed datapath is noticed by is_running()
            return
        if n > self._nat_exhausted_logged and now - self._nat_log_at >= NAT_LOG_INTERVAL:
            log.warning("%s", nat_exhausted_message(self.cfg, n - self._nat_exhausted_logged, entries))
            self._nat_exhausted_logged = n
            self._nat_log_at = now

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------------- NAT persistence

    def _nat_snapshot_setup(self) -> None:
        """Keep the masquerade table in `<api.socket dir>/<node>.nat` (docs/architecture.md, "NAT
        state across restarts"): restored by the datapath's first start, before its workers run."""
        path = nat_snapshot_path(self.cfg)
        self.datapath.set_nat_snapshot(str(path))

    def _nat_snapshot_report(self) -> None:
        """Log what the restore did: a refused snapshot (or refused entries) is reported, counted
        (podrouter_nat_snapshot_rejected) and otherwise ignored."""
        st = self.datapath.nat_snapshot_stats()
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

    def _on_event(self, reason: str) -> None:
        with self.lock:
            self._dirty.add(reason)
        self._wake.set()

    def shutdown(self, keep: bool = False) -> None:
        """Stop. With `keep` (SIGTERM/SIGINT, the stop contract in lifecycle.py) the node's
        forwarding state stays for a successor: the persistent TUN, routes, rules, sysctls, the
        nftables tables, shaping, the etcd registration (left to its lease TTL) and the state file
        (pid 0). Without it (`podrouter cleanup`, a start that failed without a predecessor)
        everything installed is removed, in reverse order. Safe after a partial start.

        Full removal: the datapath's workers stop before the masquerade reply guard goes: while they
        run, a reply to a translated flow reaches both them (AF_PACKET copy) and, without the guard,
        the node's stack, which answers it with a RST / port unreachable that kills the flow. With
        the workers stopped first, the guard keeps dropping replies until nothing forwards them any
        more. The TUN itself is deleted last, after the routes into it are gone."""
        self.ready = False

        def stop_part(part: Any, method: str) -> None:
            try:
                if part is self.discovery:
                    part.stop(revoke=not keep)
                else:
                    getattr(part, method)()
            except Exception:  # noqa: BLE001 - keep tearing down
                log.exception("shutdown: %s.%s failed", type(part).__name__, method)

        # in parallel: each waits for its own thread (a server's poll interval, the neighbour
        # monitor's select timeout), and a successor can start only once this process is gone
        stoppers = [
            threading.Thread(target=stop_part, args=(part, method), name=f"stop-{method}", daemon=True)
            for part, method in (
                (self.bgp, "stop"),
                (self.metrics, "close"),
                (self.api, "close"),
                (self.monitor, "close"),
                (self.discovery, "stop"),
                (self.watcher, "stop"),
            )
            if part is not None
        ]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=15)
        if self._metrics_sock is not None:  # a start that failed between taking the port and serving
            with contextlib.suppress(OSError):
                self._metrics_sock.close()
            self._metrics_sock = None
        if self.handover_server is not None:
            self.handover_server.released()
        with self.lock:
            if self.datapath is not None:
                _go_on("stopping the datapath", self.datapath.stop)
            if keep:
                self._release()
            else:
                self._teardown()
            if self.ipr is not None:
                with contextlib.suppress(Exception):
                    self.ipr.close()

    def _release(self) -> None:
        """The stop contract: close what belongs to this process only, leave the kernel state."""
        if self.bandwidth is not None:
            _go_on("bandwidth manager detach", self.bandwidth.detach)
        if self.datapath is not None:
            # the TUN is persistent: closing the queues detaches them, the device and the routes
            # into it stay (pod packets are dropped by the detached device until a successor)
            _go_on("closing the datapath", self.datapath.close)
            self.datapath = None
        self._pod_guard_key = None
        if self.plumbing is not None and self.owns_record:
            # last: once the record says pid 0 a successor may start (its TUN attach needs our
            # queues closed, and nothing here writes the state file any more); after a handover
            # (either side of a failed one) the record is the other daemon's
            _go_on("recording the stop in the state file", lifecycle.mark_stopped, self.plumbing)

    def _teardown(self) -> None:
        from podrouter import nftables

        if self.bandwidth is not None:
            _go_on("bandwidth manager close", self.bandwidth.close)
        if self.plumbing is not None and self.plumbing.state.nft_guard:
            _go_on("removing the masquerade reply guard", nftables.remove_guard)
        if self.plumbing is not None:
            _go_on("removing routes/rules", self.plumbing.teardown)
        if self._pod_guard_key is not None:
            # after the routes: while a pod route exists, its pod's sources are checked
            _go_on("removing the pod egress guard", nftables.remove_pod_guard)
            self._pod_guard_key = None
        if self.datapath is not None:
            _go_on("closing the datapath", self.datapath.close)
            self.datapath = None
        _go_on("stopping the fd keeper", self._keeper_stop)
        if self.ipr is not None:
            # persistent: the TUN outlives the fd
            _go_on(f"deleting {TUN_NAME}", lifecycle.remove_tun, self.ipr, TUN_NAME)

    # ------------------------------------------------------------------------------- reconcile

    def _refresh_peers(self, wait: bool) -> None:
        from podrouter.netlink.underlay import next_hops_for

        u = self.underlay
        wanted: dict[
            str, tuple[PeerConfig, bool, ipaddress.IPv4Address | ipaddress.IPv6Address | None, str]
        ] = {}
        sources: dict[str, str] = getattr(self.discovery, "sources", dict)()
        rejected: dict[str, str] = {}
        taken = _PeerIndex(self.cfg)
        all_peers = self.discovery.peers()
        # the kernel's next hop of every peer, asked in bulk (thousands of peers with etcd)
        next_hops = next_hops_for(self.ipr, u, [p.address for p in all_peers])
        for peer in all_peers:
            if peer.address in u.addresses() or peer.name == self.cfg.node.name:
                continue  # ourselves, as seen by discovery
            # the tables refuse overlapping pod CIDRs; a discovery source that slipped one through
            # must cost that peer, not the whole update (static peers come first and win)
            why = configmod.peer_family_problem(peer.address, u.address, u.address6)
            why = f"address {peer.address} {why}" if why is not None else taken.conflict(peer)
            if why:
                rejected[peer.name] = why
                continue
            taken.add(peer)
            nh = next_hops[peer.address]
            wanted[peer.name] = (peer, u.on_link(peer.address), nh, sources.get(peer.name, "static"))
        for name, why in rejected.items():
            if self.peer_rejects.get(name) != why:
                log.warning("ignoring peer %s: %s", name, why)
        self.peer_rejects = rejected
        hops = {nh for (_, _, nh, _) in wanted.values() if nh is not None}
        if u.gateway is not None:
            hops.add(u.gateway)
        if u.gateway6 is not None:
            hops.add(u.gateway6)
        if self.masq6 is not None and self.masq6.gateway is not None:
            hops.add(self.masq6.gateway)  # resolved over NDP
        self.watcher.set_wanted(hops)
        if wait and hops and not self.watcher.wait_resolved(READY_NEIGHBOR_WAIT):
            log.warning(
                "some next hops are not resolved yet; native traffic to them is dropped "
                "(neighbor_unresolved) until they answer ARP"
            )
        macs = self.watcher.snapshot()
        self.peer_views = [
            PeerView(peer, on_link, nh, macs.get(nh) if nh is not None else None, src)
            for (peer, on_link, nh, src) in sorted(wanted.values(), key=lambda w: w[0].name)
        ]

    def _gateway(self) -> dict[str, Any] | None:
        u = self.underlay
        if u.gateway is None:
            return None
        return {"ip": str(u.gateway), "mac": self.watcher.snapshot().get(u.gateway)}

    def _masq6_spec(self) -> tuple[str | None, dict[str, Any] | None]:
        """`masquerade.address6` and `masquerade.gateway6` of the table spec."""
        m = self.masq6
        if m is None:
            return None, None
        if m.gateway is None:
            return str(m.address), None
        return str(m.address), {"ip": str(m.gateway), "mac": self.watcher.snapshot().get(m.gateway)}

    def _desired_routes(self) -> dict[Any, Any]:
        from podrouter.netlink.plumbing import RouteSpec

        out = {}
        for r in self.route_plan:
            if r.path == "local":
                spec = RouteSpec(dst=str(r.dst), kind="unreachable", label="local")
            elif r.path == "pod":
                spec = RouteSpec(dst=str(r.dst), oif=r.dev, scope_link=True, label=f"pod {r.peer}")
            else:
                spec = RouteSpec(dst=str(r.dst), oif=r.dev, mtu=r.mtu, label=r.path)
            out[spec.key] = spec
        if self.underlay.address.version == 6 and any(c.version == 4 for c in self.cfg.node.pod_cidrs):
            # IPv6 underlay: the node may have no IPv4 route at all, and proxy ARP only answers for
            # an address that routes out another device; the pods' gateway 169.254.1.1 gets one into
            # the datapath (which drops what is addressed to it; docs/architecture.md)
            spec = RouteSpec(dst=f"{POD_GATEWAY4}/32", oif=TUN_NAME, label="pod gateway")
            out[spec.key] = spec
        if self.cfg.masquerade.enabled:
            # the masquerade egress table: a default route into the datapath (see constants.py)
            for cidr in self.cfg.node.pod_cidrs:
                dflt = "0.0.0.0/0" if cidr.version == 4 else "::/0"
                spec = RouteSpec(
                    dst=dflt, oif=TUN_NAME, mtu=self.underlay.mtu, table=MASQ_TABLE, label="masquerade"
                )
                out[spec.key] = spec
        return out

    def _desired_rules(self) -> set[Any]:
        import socket as _s

        from podrouter.netlink.plumbing import RuleSpec

        if not self.cfg.masquerade.enabled:
            return set()
        rules = set()
        for cidr in self.cfg.node.pod_cidrs:
            fam = _s.AF_INET if cidr.version == 4 else _s.AF_INET6
            rules.add(
                RuleSpec(priority=SUPPRESS_RULE_PRIORITY, table=254, suppress_prefixlength=0, family=fam)
            )
            rules.add(RuleSpec(priority=MASQ_RULE_PRIORITY, table=MASQ_TABLE, src=str(cidr), family=fam))
        return rules

    def _discovery_synced(self) -> bool:
        try:
            return bool(self.discovery.status().get("connected", True))
        except Exception:  # noqa: BLE001
            return True

    def _reconcile_locked(self, reason: str) -> None:
        cfg = self.cfg
        for entry in self.pods.values():
            # a veth that appeared (or was re-created) since the pod was registered needs its knobs
            if self.plumbing.ifindex(entry.pod.host_interface) is not None:
                self._pod_sysctls(entry.pod)
        self.route_plan = plan_routes(
            cfg,
            self.peer_views,
            (e.pod for e in self.pods.values()),
            self.underlay.mtu,
            v6_underlay=any(a.version == 6 for a in self.underlay.addresses()),
        )
        # the guard learns a pod's addresses before its route makes the pod reachable
        self._sync_pod_guard()
        t0 = time.perf_counter()
        desired = self._desired_routes()
        if self._adopt_keep:
            if self._discovery_synced() or time.monotonic() > self._adopt_keep_until:
                self._adopt_keep = {}
                log.info("discovery has listed its peers: the predecessor's routes are reconciled")
            else:
                desired = {**self._adopt_keep, **desired}
        self.route_errors = self.plumbing.sync_routes(desired)
        self.timings["last_routes_ms"] = _ms_since(t0)
        self.timings["last_routes_changed"] = self.plumbing.last_changes
        self.plumbing.sync_rules(self._desired_rules())
        for err in self.route_errors:
            log.warning("%s", err)
        gateway = self._gateway()
        t0 = time.perf_counter()
        a6 = str(self.underlay.address6) if self.underlay.address6 is not None else None
        spec = build_spec(
            cfg, 0, str(self.underlay.address), gateway, self.peer_views, a6, *self._masq6_spec()
        )
        # the peers' part of the spec is a function of the (immutable) views: compare those instead
        # of formatting thousands of peer entries
        key = (repr({k: v for k, v in spec.items() if k != "peers"}), tuple(self.peer_views))
        if key == self._spec_key:
            return
        spec["generation"] = self.generation + 1
        native = _load_native()
        tables = native.Tables(spec)
        t1 = time.perf_counter()
        if self.tables is None:
            self.datapath.start(tables)
        else:
            self.datapath.swap_tables(tables)
        self.timings["last_compile_ms"] = round((t1 - t0) * 1000, 3)
        self.timings["last_swap_ms"] = _ms_since(t1)
        self.tables = tables
        self.generation += 1
        self._spec_key = key
        log.info(
            "tables generation %d installed (%s): %d peers, compiled in %.1f ms, swapped in %.2f ms",
            self.generation,
            reason,
            len(self.peer_views),
            self.timings["last_compile_ms"],
            self.timings["last_swap_ms"],
        )

    # ------------------------------------------------------------------------------------- SIGHUP

    def reload(self) -> None:
        path = self.cfg.path
        log.info("SIGHUP: reloading %s", path)
        try:
            new = configmod.load(path) if path else self.cfg
        except configmod.ConfigError as e:
            for p in e.problems:
                log.error("reload refused: %s", p)
            log.error("keeping the running configuration")
            return
        problems = [p for p in self._underlay_problems(new)]
        if problems:
            for p in problems:
                log.error("reload refused: %s", p)
            return
        fixed = self._restart_only_changes(new)
        for what in fixed:
            log.warning("%s changed: restart the daemon to apply it (keeping the running value)", what)
        new = replace(
            new,
            node=replace(
                new.node,
                name=self.cfg.node.name,
                address=self.cfg.node.address,
                address6=self.cfg.node.address6,
                interface=self.cfg.node.interface,
            ),
            api=self.cfg.api,
            metrics=self.cfg.metrics,
            tunnel=replace(new.tunnel, port=self.cfg.tunnel.port) if "tunnel.port" in fixed else new.tunnel,
            discovery=self.cfg.discovery if "discovery" in fixed else new.discovery,
            masquerade=replace(
                new.masquerade,
                port_range=self.cfg.masquerade.port_range,
                timeouts=self.cfg.masquerade.timeouts,
                max_entries=self.cfg.masquerade.max_entries,
                max_entries_per_pod=self.cfg.masquerade.max_entries_per_pod,
                address6=self.cfg.masquerade.address6,
            ),
        )
        for w in new.warnings:
            log.warning("%s", w)
        if new.bgp.enabled != self.cfg.bgp.enabled:
            log.warning("bgp.enabled changed: restart the daemon to apply it (keeping the running value)")
            new = replace(new, bgp=self.cfg.bgp)
        mesh_before = (self.cfg.cluster_name, self.cfg.cluster_id, self.cfg.clustermesh)
        if (new.cluster_name, new.cluster_id, new.clustermesh) != mesh_before:
            # the remote watches are set up once, at start (docs/clustermesh.md)
            log.warning(
                "cluster.name/cluster.id/clustermesh changed: restart the daemon to apply it "
                "(keeping the running value)"
            )
            new = replace(
                new,
                cluster_name=self.cfg.cluster_name,
                cluster_id=self.cfg.cluster_id,
                clustermesh=self.cfg.clustermesh,
            )
        with self.lock:
            old = self.cfg
            self.cfg = new
            self.discovery.update_config(new)
            self._reload_bgp(old, new)
            try:
                self._sync_masquerade_guard(old, new)
            except Exception:  # noqa: BLE001
                log.exception("updating the masquerade reply guard failed")
            if new.bandwidth != old.bandwidth:
                self._restart_bandwidth(new)
            old_pods = {p.name: p for p in old.pods}
            new_pods = {p.name: p for p in new.pods}
            for name, pod in old_pods.items():
                entry = self.pods.get(name)
                if entry is not None and entry.source == "config" and new_pods.get(name) != pod:
                    self._pod_remove(name)
            for name, pod in new_pods.items():
                if name not in self.pods or old_pods.get(name) != pod:
                    self._pod_install(pod, "config", raise_errors=False)
            try:
                self._refresh_peers(wait=True)
                self._reconcile_locked("SIGHUP")
            except Exception:  # noqa: BLE001
                log.exception("applying the reloaded config failed; the datapath keeps its current tables")
                return
        log.info("reload done: %d peers, %d pods", len(self.peer_views), len(self.pods))

    def _restart_only_changes(self, new: Config) -> list[str]:
        old = self.cfg
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

    # ------------------------------------------------------------------------------------- pods

    def _make_bandwidth(self, cfg: Config) -> Any:
        if not cfg.bandwidth.enabled:
            log.info("bandwidth shaping disabled (bandwidth.enabled: false)")
            return None
        from pyroute2.iproute import IPRoute

        from podrouter.qos.manager import BandwidthManager

        return BandwidthManager(IPRoute(), cfg.bandwidth, owns_ipr=True)

    def _restart_bandwidth(self, cfg: Config) -> None:
        if self.bandwidth is not None:
            self.bandwidth.close()
        self.bandwidth = self._make_bandwidth(cfg)
        for entry in self.pods.values():
            self._shape(entry)

    def _cleanup_shaping(self, recorded: statefile.State) -> list[str]:
        """Remove the tc objects a dead daemon's bandwidth manager left (the QoS module knows which)."""
        from pyroute2.iproute import IPRoute

        from podrouter.qos.manager import cleanup as qos_cleanup

        with IPRoute() as ipr:
            ifaces = [p["host_interface"] for p in recorded.pods.values()]
            removed = qos_cleanup(ipr, ifaces, ifb_name=self.cfg.bandwidth.ifb_name)
        return [f"removed shaping: {r}" for r in removed or []]

    def _shape(self, entry: PodEntry) -> None:
        pod = entry.pod
        if self.bandwidth is None:
            entry.shaping = {"enabled": False}
            return
        try:
            entry.shaping = dict(
                self.bandwidth.apply(pod.name, pod.host_interface, str(pod.ip), pod.qos)
            )
        except Exception as e:  # noqa: BLE001 - shaping trouble must not fail the pod's connectivity
            log.exception("shaping pod %s failed", pod.name)
            entry.shaping = {"error": str(e)}

    def _pod_install(
        self, pod: PodConfig, source: str, raise_errors: bool, cni: dict[str, str] | None = None
    ) -> PodEntry:
        """Register (or update) a pod: proxy ARP on its veth, its /32 route, its shaping."""
        for other in self.pods.values():
            for addr in set(other.pod.addresses) & set(pod.addresses) if other.pod.name != pod.name else ():
                msg = f"pod {pod.name}: ip {addr} is already used by pod {other.pod.name}"
                if raise_errors:
                    raise apimod.ApiError(msg)
                log.error("%s", msg)
        old = self.pods.get(pod.name)
        if old is not None and old.pod.host_interface != pod.host_interface:
            self._pod_remove(pod.name)
        if self.plumbing.ifindex(pod.host_interface) is None:
            msg = f"pod {pod.name}: host_interface '{pod.host_interface}' does not exist"
            if raise_errors:
                raise apimod.ApiError(msg)
            log.error("%s (registered; its route is installed when the interface appears)", msg)
        else:
            self._pod_sysctls(pod)
        entry = PodEntry(pod, source, cni=cni)
        self.pods[pod.name] = entry
        recorded = {**pod.as_dict(), "source": source}
        if cni:
            recorded["cni"] = cni
        self.plumbing.state.pods[pod.name] = recorded
        self.plumbing.save()
        self._shape(entry)
        return entry

    def _pod_sysctls(self, pod: PodConfig) -> None:
        ps = self.plumbing
        ifname = pod.host_interface
        # docs/design.md §4b: the pod's default gateway 169.254.1.1 exists nowhere; with proxy ARP the node
        # answers the pod's ARP for it (the kernel does because 169.254.1.1 routes out another device)
        ps.set_sysctl(sysctl.conf(ifname, "proxy_arp"), 1)
        ps.set_sysctl(sysctl.conf(ifname, "forwarding"), 1)
        # the kernel delays proxy ARP replies by a random 0..proxy_delay (80 ms default); a pod's first
        # packet should not wait for that
        ps.set_sysctl(sysctl.neigh(ifname, "proxy_delay"), 0)
        # strict reverse-path filtering on the pod's veth: its only source is the pod's /32 routed
        # back out of it. The kernel applies max(conf/all, conf/<dev>), so this is effective only
        # where conf/all stays at 0 or 1 (_node_sysctls lowers a strict `all` to loose); the
        # nftables pod egress guard checks every source regardless (docs/architecture.md)
        ps.set_sysctl(sysctl.conf(ifname, "rp_filter"), 1)
        if any(a.version == 6 for a in pod.addresses) and has_ipv6(self.cfg):
            # the IPv6 counterpart: the pod's default route is `via fe80::1 dev eth0`, and fe80::1 is
            # an address of the node's end of the veth (nodad, so it answers at once), exactly one per
            # veth (link-local addresses are per link). docs/architecture.md, "Pod attachment".
            if sysctl.read(sysctl.conf(ifname, "disable_ipv6", "ipv6")) == "1":
                ps.set_sysctl(sysctl.conf(ifname, "disable_ipv6", "ipv6"), 0)
            ps.ensure_gateway6(ifname, POD_GATEWAY6)

    def _pod_remove(self, name: str) -> PodEntry | None:
        entry = self.pods.pop(name, None)
        if entry is None:
            return None
        if self.bandwidth is not None:
            try:
                self.bandwidth.remove(name)
            except Exception:  # noqa: BLE001
                log.exception("removing shaping of pod %s failed", name)
        iface = entry.pod.host_interface
        if not any(e.pod.host_interface == iface for e in self.pods.values()):
            prefix = f"net.ipv4.conf.{iface}."
            self.plumbing.restore_sysctls(prefix)
            self.plumbing.restore_sysctls(f"net.ipv4.neigh.{iface}.")
            self.plumbing.restore_sysctls(f"net.ipv6.conf.{iface}.")
            self.plumbing.remove_gateway6(iface, POD_GATEWAY6)
        self.plumbing.state.pods.pop(name, None)
        self.plumbing.save()
        return entry

    def pod_add(self, raw: Any, cni: Any = None) -> dict[str, Any]:
        pod, problems, warnings = configmod.pod_from_dict(raw, self.cfg.node.pod_cidrs)
        if pod is None:
            raise apimod.ApiError("; ".join(problems))
        attachment = apimod.cni_attachment(cni)
        with self.lock:
            entry = self._pod_install(pod, "api", raise_errors=True, cni=attachment)
            self._reconcile_locked(f"pod {pod.name} added")
            nets = [str(ipaddress.ip_network(a)) for a in pod.addresses]
            errs = [e for e in self.route_errors if any(n in e for n in nets)]
            if errs:
                raise apimod.ApiError("; ".join(errs))
            return {"pod": self._pod_status(entry), "warnings": warnings}

    def pod_del(self, name: Any, container_id: Any = None) -> dict[str, Any]:
        if not isinstance(name, str):
            raise apimod.ApiError("pod_del needs a string 'name'")
        if container_id is not None and not apimod.valid_container_id(container_id):
            raise apimod.ApiError(f"pod_del: container_id {str(container_id)[:80]!r} is not a container ID")
        with self.lock:
            current = self.pods.get(name)
            if container_id is not None and current is not None:
                owner = (current.cni or {}).get("container_id")
                if owner != container_id:
                    # a late DEL of a sandbox this pod name has since been given to: not ours to remove
                    log.info(
                        "pod_del %s for container %s ignored: the pod belongs to %s",
                        name,
                        container_id,
                        owner or f"the {current.source}",
                    )
                    return {"removed": None, "kept": name, "owner": owner}
            entry = self._pod_remove(name)
            if entry is None:
                raise apimod.ApiError(f"no pod named {name!r}")
            self._reconcile_locked(f"pod {name} removed")
            return {"removed": name}

    def _pods_status(self) -> list[dict[str, Any]]:
        live: dict[str, Any] = {}
        if self.bandwidth is not None:
            try:
                live = dict(self.bandwidth.status())  # with the tc counters of this moment
            except Exception:  # noqa: BLE001 - status must answer even if tc cannot be read
                log.exception("reading the shaping status failed")
        out = []
        with self.lock:
            for e in sorted(self.pods.values(), key=lambda e: e.pod.name):
                st = self._pod_status(e)
                if e.pod.name in live:
                    st["shaping"] = live[e.pod.name]
                out.append(st)
        return out

    def _pod_status(self, entry: PodEntry) -> dict[str, Any]:
        out = {**entry.pod.as_dict(), "source": entry.source, "shaping": entry.shaping}
        if entry.cni:
            out["cni"] = dict(entry.cni)
        return out

    def _pod_limits(self) -> dict[str, int | None]:
        with self.lock:
            entries = list(self.pods.values())
        out: dict[str, int | None] = {}
        for e in entries:
            # after a failed update the previous shaping stays in force, and egress_bps still reports it
            val = e.shaping.get("egress_bps") if isinstance(e.shaping, dict) else None
            out[e.pod.name] = int(val) if isinstance(val, int | float) else None
        return out

    # --------------------------------------------------------------------------------- status/API

    def _counters(self) -> dict[str, Any]:
        dp = self.datapath
        if dp is None:
            return {}
        out = dict(dp.counters())
        with contextlib.suppress(Exception):
            out["nat_snapshot"] = dict(dp.nat_snapshot_stats())
        if self._pod_guard_key is not None:
            # the pod egress guard drops in nftables, before the datapath sees anything; its
            # counters join the datapath's drop reasons (podrouter_drops_total{reason=...})
            from podrouter import nftables

            try:
                guard = nftables.pod_guard_counters()
            except Exception:  # noqa: BLE001 - status must answer even if nftables cannot be read
                log.exception("reading the pod egress guard counters failed")
                guard = {}
            drops = dict(out.get("drops") or {})
            for reason in (nftables.SPOOF_COUNTER, nftables.TUNNEL_COUNTER, nftables.LEAK_COUNTER):
                drops[reason] = int(drops.get(reason, 0)) + guard.get(reason, 0)
            out["drops"] = drops
        return out

    def status(self) -> dict[str, Any]:
        with self.lock:
            u = self.underlay
            routes = [
                {"dst": str(r.dst), "path": r.path, "dev": r.dev, "mtu": r.mtu, "peer": r.peer}
                for r in self.route_plan
            ]
            peer_paths: dict[str | None, set[str]] = {}
            for r in self.route_plan:
                if r.path != "pod":
                    peer_paths.setdefault(r.peer, set()).add(r.path)
            peers = []
            for v in self.peer_views:
                paths = sorted(peer_paths.get(v.peer.name, ()))
                peers.append(
                    {
                        "name": v.peer.name,
                        "address": str(v.peer.address),
                        "pod_cidrs": [str(c) for c in v.peer.pod_cidrs],
                        "path": "/".join(paths),
                        "mode": v.peer.mode,
                        "tunnel_protocol": v.peer.tunnel_protocol,
                        "geneve_payload": geneve_payload(self.cfg, v.peer),
                        "on_link": v.on_link,
                        "next_hop": str(v.next_hop) if v.next_hop else None,
                        "next_hop_mac": v.next_hop_mac,
                        # the inner destination of VXLAN frames to it (configured or synthesized)
                        "vtep_mac": v.peer.vtep_mac or vtep_mac_of(v.peer.address),
                        "source": v.source,
                    }
                )
            return {
                "ready": self.ready,
                "ready_after": round(self.ready_after, 3),
                "adopted": self.adopted,
                "node": self.cfg.node.name,
                "pid": _getpid(),
                "uptime": round(time.time() - self.started_at, 1),
                "config": self.cfg.path,
                "mode": self.cfg.routing.mode,
                "tunnel": {
                    "protocol": self.cfg.tunnel.protocol,
                    "vni": self.cfg.tunnel.vni,
                    "vxlan_port": self.cfg.tunnel.port_for("vxlan"),
                    "geneve_port": self.cfg.tunnel.port_for("geneve"),
                    "geneve_payload": self.cfg.tunnel.geneve_payload,
                },
                "underlay": {
                    "interface": u.ifname,
                    "address": str(u.address),
                    "mtu": u.mtu,
                    "gateway": str(u.gateway) if u.gateway else None,
                    # dual-stack underlay only (node.address6)
                    **({"address6": str(u.address6)} if u.address6 is not None else {}),
                },
                # where IPv6 pods are masqueraded to (masquerade.address6), if anywhere
                "masquerade_address6": (
                    str(self.masq6.address)
                    if self.masq6 is not None and self.cfg.masquerade.enabled
                    else None
                ),
                # our VTEP MAC: the inner source of every VXLAN frame we send; a Flannel-style
                # kernel peer's neighbour and FDB entries for this node must use it
                "vtep_mac": vtep_mac_of(u.address),
                "generation": self.generation,
                "peers": peers,
                "routes": routes,
                "route_errors": list(self.route_errors),
                # routes podrouter wants but another owner's route holds (left alone, not installed)
                "conflicts": list(self.plumbing.conflicts) if self.plumbing is not None else [],
                "rejected_peers": dict(self.peer_rejects),
                "pods": self._pods_status(),
                "discovery": self.discovery.status() if self.discovery else {},
                "bgp": self._bgp_status(),
                "clustermesh": getattr(self.discovery, "mesh_status", dict)(),
                "counters": self._counters(),
                "timings": dict(self.timings),
            }

    # ------------------------------------------------------------------------------------ BGP

    def _start_bgp(self) -> None:
        """Announce this node's pod CIDRs through BIRD (docs/bgp.md), once its routes are in place."""
        if not self.cfg.bgp.enabled:
            return
        from podrouter import bgp

        assert isinstance(self.underlay.address, ipaddress.IPv4Address)  # underlay_problems: bgp needs it
        self.bgp = bgp.BgpSpeaker(self.cfg, self.underlay.address, self.underlay.on_link)
        try:
            self.bgp.start()
        except bgp.BgpError as e:
            raise StartError([f"bgp: {e}"], EXIT_FAILURE) from None

    def _reload_bgp(self, old: Config, new: Config) -> None:
        if self.bgp is None or (old.bgp == new.bgp and old.node.pod_cidrs == new.node.pod_cidrs):
            return
        from podrouter import bgp

        try:
            self.bgp.reconfigure(new)
        except bgp.BgpError as e:
            log.error("BGP reconfiguration failed: %s", e)

    def _bgp_status(self) -> dict[str, Any]:
        if self.bgp is None:
            return {"enabled": False}
        return dict(self.bgp.status())

    def explain(self, req: dict[str, Any]) -> dict[str, Any]:
        from podrouter.packets import build_packet

        try:
            pkt = build_packet(
                str(req.get("src")),
                str(req.get("dst")),
                str(req.get("proto", "icmp")),
                int(req.get("dport") or 0),
            )
        except (ValueError, TypeError) as e:
            raise apimod.ApiError(str(e)) from None
        with self.lock:
            tables = self.tables
        if tables is None:
            raise apimod.ApiError("no tables installed yet")
        return {"verdict": dict(tables.classify(pkt)), "generation": self.generation}

    def _api_handlers(self) -> dict[str, apimod.Handler]:
        return {
            "status": lambda req: self.status(),
            "pod_add": lambda req: self.pod_add(req.get("pod"), req.get("cni")),
            "pod_del": lambda req: self.pod_del(req.get("name"), req.get("container_id")),
            "pod_list": lambda req: {"pods": self._pods_status()},
            "explain": self.explain,
        }

    def _api_streams(self) -> dict[str, apimod.StreamHandler]:
        hub = self.monitor
        assert hub is not None
        return {"monitor": lambda req, send: monitor_stream(hub, req, self._native_drop_reasons(), send)}

    def _native_drop_reasons(self) -> list[str]:
        counters = self._counters()
        return sorted((counters.get("drops") or {}).keys())

    def _pod_of(self, address: str | None) -> str | None:
        """The local pod holding `address` (the monitor names pods in its events)."""
        if not address:
            return None
        with self.lock:
            for e in self.pods.values():
                if any(str(a) == address for a in e.pod.addresses):
                    return e.pod.name
        return None


def _go_on(what: str, fn: Callable[..., object], *args: object) -> None:
    """One step of stopping or tearing down: a failure is logged ("<what> failed") and the next
    step still runs."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - keep tearing down
        log.exception("%s failed", what)


def _bgp_problems(cfg: Config, underlay: Any) -> list[str]:
    if not cfg.bgp.enabled:
        return []
    from podrouter import bgp

    out = bgp.path_problems(cfg)
    for i, p in enumerate(cfg.bgp.peers):
        if underlay is not None and p.address == underlay.address:
            out.append(f"bgp.peers[{i}].address: '{p.address}' is this node's own address")
    return out


def _load_native() -> Any:
    try:
        from podrouter import _native  # type: ignore[attr-defined]
    except ImportError as e:
        raise StartError(
            [f"the podrouter datapath (podrouter._native) is not available: {e}"], EXIT_FAILURE
        ) from None
    return _native


def _getpid() -> int:
    return os.getpid()


def run(cfg: Config, handover: bool = False) -> int:
    """`podrouter run`: preflight, start, serve, tear down. Returns the exit status. With
    `handover`, take over from the daemon running on the same API socket (docs/handover.md)."""
    d = Daemon(cfg, handover)
    try:
        d.preflight()
    except StartError:
        if d.ipr is not None:
            d.ipr.close()
        raise
    # a start that fails on a predecessor's state leaves it (it still forwards, and the leak guard
    # stays); one that fails from scratch removes what it installed
    def what() -> str:
        return "leaving the adopted state" if d.adopted or handover else "removing what was installed"

    try:
        d.start()
    except StartError:
        log.error("start failed; %s", what())
        d.shutdown(keep=d.adopted or handover)
        raise
    except Exception as e:
        log.exception("start failed; %s", what())
        d.shutdown(keep=d.adopted or handover)
        raise StartError([f"start failed: {e}"], EXIT_FAILURE) from None
    except BaseException:
        d.shutdown(keep=d.adopted or handover)
        raise
    try:
        code = d.run()
    finally:
        log.info(
            "stopping: the TUN, routes, rules, guards and shaping stay for the next daemon "
            "(`podrouter cleanup` removes them)"
        )
        d.shutdown(keep=True)
        if d.handover_server is not None:
            d.handover_server.wait_sent()
    return code


def cleanup(cfg: Config, force: bool = False) -> list[str]:
    """`podrouter cleanup`: remove what a stopped or killed daemon left (the stop contract leaves
    the node's forwarding state for a successor; this is the full removal). Refuses while the
    daemon runs."""
    from pyroute2.iproute import IPRoute

    from podrouter.netlink.plumbing import cleanup as netlink_cleanup
    from podrouter.netlink.underlay import netns_id

    try:
        recorded = statefile.load(cfg.state_path)
    except ValueError as e:
        raise StartError([str(e)], EXIT_FAILURE) from None
    if apimod.socket_in_use(cfg.api.socket):
        raise StartError(
            [f"a daemon is running on {cfg.api.socket}: stop it (SIGTERM) instead"], EXIT_FAILURE
        )
    if recorded is not None and recorded.netns != netns_id() and not force:
        raise StartError(
            [
                f"{cfg.state_path} was written in another network namespace ({recorded.netns}); run cleanup "
                f"inside it (ip netns exec NODE podrouter cleanup ...), or pass --force"
            ],
            EXIT_FAILURE,
        )
    done: list[str] = []
    from podrouter import keeper, nftables

    # first: the fd keeper lets go of the TUN queues and sockets (else the TUN stays attached)
    done.extend(keeper.stop(cfg))
    # the guard tables have fixed names, so they are found even without a state file
    for fam in nftables.FAMILIES:
        try:
            if nftables.remove_guard(fam):
                done.append(f"removed nftables table {fam} {nftables.TABLE}")
        except nftables.NftError as e:
            done.append(f"could not remove nftables table {fam} {nftables.TABLE}: {e}")
    try:
        if nftables.remove_pod_guard():
            done.append(f"removed nftables table {nftables.POD_FAMILY} {nftables.POD_TABLE}")
    except nftables.NftError as e:
        done.append(f"could not remove nftables table {nftables.POD_FAMILY} {nftables.POD_TABLE}: {e}")
    with IPRoute() as ipr:
        done.extend(netlink_cleanup(ipr, recorded))
        if recorded is not None:
            d = Daemon(cfg)
            try:
                done.extend(d._cleanup_shaping(recorded))
            except Exception as e:  # noqa: BLE001
                done.append(f"removing shaping failed: {e}")
        tun = (recorded.tun if recorded is not None else None) or TUN_NAME
        kind = lifecycle.tun_kind(ipr, tun)
        if kind == "tun":
            # podrouter's TUN is persistent (the stop contract): cleanup is what deletes it
            lifecycle.remove_tun(ipr, tun)
            done.append(f"removed TUN {tun}")
        elif kind is not None:
            done.append(f"note: {tun} exists but is a {kind} link, not podrouter's TUN: left alone")
    if cfg.discovery.backend == "etcd":
        done.extend(lifecycle.deregister_etcd(cfg))
    if cfg.bgp.enabled:
        done.extend(_cleanup_bgp(cfg))
    if recorded is not None:
        statefile.remove(cfg.state_path)
        done.append(f"removed {cfg.state_path}")
    sock = Path(cfg.api.socket)
    if sock.exists() and sock.is_socket():
        sock.unlink()
        done.append(f"removed stale socket {sock}")
    done.extend(_cleanup_nat_snapshot(cfg))
    return done


def _cleanup_nat_snapshot(cfg: Config) -> list[str]:
    """`podrouter cleanup` starts the next daemon from an empty masquerade table."""
    done = []
    for p in (nat_snapshot_path(cfg), nat_snapshot_path(cfg).with_name(f"{cfg.node.name}.nat.tmp")):
        if p.is_file():
            p.unlink()
            done.append(f"removed {p}")
    return done


def _cleanup_bgp(cfg: Config) -> list[str]:
    """Withdraw this node's prefixes from its BGP peers now (docs/bgp.md, "Stopping for good")."""
    from pyroute2.iproute import IPRoute

    from podrouter import bgp
    from podrouter.netlink.underlay import UnderlayError, resolve_underlay

    try:
        with IPRoute() as ipr:
            u = resolve_underlay(ipr, cfg.node)
        if not isinstance(u.address, ipaddress.IPv4Address):
            return [f"BGP: nothing to withdraw: the underlay address {u.address} is not IPv4"]
        return bgp.withdraw(cfg, u.address, u.on_link)
    except (UnderlayError, bgp.BgpError, OSError) as e:
        return [f"BGP: could not withdraw (the routers drop our prefixes after the restart time): {e}"]


__all__ = [
    "Daemon",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "PeerView",
    "RoutePlan",
    "StartError",
    "build_spec",
    "cleanup",
    "path_for",
    "path_mtu",
    "plan_routes",
    "port_range_problem",
    "run",
    "split_by",
]
