"""Routes, policy rules and sysctls: install what the daemon wants, remove what it no longer wants.

Routes are reconciled against the *kernel*, not against memory: `sync_routes(desired)` dumps every
route carrying `proto 77` and replaces, adds or deletes until the kernel matches.

Own only what we made: podrouter's routes carry `proto 77` (RTPROT_PODROUTER) and its policy rules
`protocol 77` (FRA_PROTOCOL); deletes name that protocol, and the kernel then matches nothing else.
A route of another owner with a prefix podrouter wants in the same table is a *conflict*: podrouter
never `replace`s it (a replace would overwrite it), installs nothing for that prefix, and reports it
(`sync_routes` returns it, `podrouter status` lists it under "route_conflicts"). This also repairs
what the kernel removed behind our back (IPv4 drops every route through an interface that goes down,
and a re-created pod veth comes back without its /32). Every change is recorded in the state file
before the call returns, so a SIGKILL at any point leaves a record `podrouter cleanup` can undo.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from podrouter import state as statefile
from podrouter.netlink import sysctl
from podrouter.netlink.constants import IFA_F_NODAD, RTPROT_PODROUTER
from podrouter.netlink.rtnl import Route, RouteRequest, Rtnl
from podrouter.netlink.specs import RT_TABLE_MAIN, RouteSpec, RuleSpec
from podrouter.netlink.underlay import netns_id

log = logging.getLogger("podrouter.netlink")

RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
_TYPES = {"unicast": RTN_UNICAST, "blackhole": RTN_BLACKHOLE, "unreachable": RTN_UNREACHABLE}
_TYPE_NAMES = {v: k for k, v in _TYPES.items()}
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
# fib_table_delete() matches any scope only when asked with RT_SCOPE_NOWHERE (as `ip route del` does);
# scope 0 would match universe-scope routes only and leave a pod's link-scope /32 behind
RT_SCOPE_NOWHERE = 255
# iproute2's names of the routing protocols a conflict report is likely to show (rtnetlink.h)
_PROTO_NAMES = {1: "redirect", 2: "kernel", 3: "boot", 4: "static", 11: "zebra", 12: "bird", 16: "dhcp"}


class PlumbingError(Exception):
    pass


def _route_key(msg: Any) -> tuple[int, str]:
    family = msg["family"]
    dst = msg.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    table = msg.get_attr("RTA_TABLE") or msg["table"]
    return (table, str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)))


def _route_mtu(msg: Any) -> int | None:
    metrics = msg.get_attr("RTA_METRICS")
    if metrics is None:
        return None
    mtu = metrics.get_attr("RTAX_MTU")
    return int(mtu) if mtu else None


_ROUTE_FIELDS = tuple(f.name for f in fields(RouteSpec))


class Plumbing:
    """Owns every kernel object the daemon creates in its namespace (except the TUN and tc objects)."""

    def __init__(self, ipr: IPRoute, state_path: Path, node: str, socket_path: str | None = None) -> None:
        self.ipr = ipr
        self.lock = threading.RLock()
        self.state_path = state_path
        self.state = statefile.State(node=node, netns=netns_id(), pid=os.getpid(), socket=socket_path)
        self.routes: dict[tuple[int, str], RouteSpec] = {}
        self.rules: set[RuleSpec] = set()
        self.conflicts: list[str] = []  # desired routes another owner's route holds (not installed)
        self.last_changes = 0  # routes the last sync_routes added, replaced or deleted

    # ------------------------------------------------------------------------------ bookkeeping

    def save(self) -> None:
        with self.lock:
            # not asdict(): its deep copy costs more than everything else with thousands of routes
            self.state.routes = [{n: getattr(r, n) for n in _ROUTE_FIELDS} for r in self.routes.values()]
            self.state.rules = [asdict(r) for r in sorted(self.rules, key=lambda r: r.priority)]
            statefile.save(self.state_path, self.state)

    def ifindex(self, name: str) -> int | None:
        idx = self.ipr.link_lookup(ifname=name)
        return idx[0] if idx else None

    # ------------------------------------------------------------------------------------ routes

    def kernel_routes(self) -> dict[tuple[int, str], tuple[str, int | None, int | None]]:
        """Every route in the namespace carrying our protocol: key -> (kind, oif, mtu)."""
        return self._kernel_view(_dump_all())[0]

    @staticmethod
    def _kernel_view(
        routes: list[Route], tables: set[int] | None = None
    ) -> tuple[dict[tuple[int, str], tuple[str, int | None, int | None]], dict[tuple[int, str], Route]]:
        """Our routes (key -> (kind, oif, mtu)) and, in `tables`, every other owner's (key -> route)."""
        ours: dict[tuple[int, str], tuple[str, int | None, int | None]] = {}
        foreign: dict[tuple[int, str], Route] = {}
        for r in routes:
            key = (r.table, r.dst)
            if r.proto == RTPROT_PODROUTER:
                kind = _TYPE_NAMES.get(r.type, str(r.type))
                ours[key] = (kind, r.oif if kind == "unicast" else None, r.mtu)
            elif tables is not None and r.table in tables:
                foreign.setdefault(key, r)
        return ours, foreign

    def foreign_routes(self, tables: set[int]) -> dict[tuple[int, str], str]:
        """Routes in `tables` that podrouter did not make (any protocol but ours): key -> a
        description for the conflict report."""
        return foreign_routes(self.ipr, tables)

    def _request(self, spec: RouteSpec, ifindex: int | None) -> dict[str, Any]:
        net = ipaddress.ip_network(spec.dst)
        kw: dict[str, Any] = {
            "family": spec.family,
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "table": spec.table,
            "proto": RTPROT_PODROUTER,
            "type": spec.kind,
        }
        if spec.kind == "unicast":
            kw["oif"] = ifindex
            kw["scope"] = RT_SCOPE_LINK if spec.scope_link else RT_SCOPE_UNIVERSE
        if spec.mtu is not None:
            kw["metrics"] = {"RTAX_MTU": spec.mtu}
        return kw

    def sync_routes(self, desired: dict[tuple[int, str], RouteSpec]) -> list[str]:
        """Make the kernel's proto-77 routes equal `desired`, leaving every other owner's routes
        alone. Returns one message per route it could not install (its interface does not exist,
        or another owner's route holds the prefix: `self.conflicts`); the others are installed
        regardless."""
        errors: list[str] = []
        conflicts: list[str] = []
        with self.lock:
            actual, foreign_raw = self._kernel_view(_dump_all(), {k[0] for k in desired})
            foreign = {k: _describe(self.ipr, r) for k, r in foreign_raw.items() if k in desired}
            # record intent first: if we die half-way, cleanup still knows about everything we touch
            intent = {**{k: v for k, v in self.routes.items() if k in actual}, **desired}
            if intent != self.routes:
                self.routes = intent
                self.save()
            # one lookup per interface, not per route (thousands of peer routes share podr0)
            indexes: dict[str, int | None] = {}
            requests: list[RouteRequest] = []
            specs: list[RouteSpec] = []
            for key, spec in desired.items():
                ifindex = None
                if spec.kind == "unicast":
                    if spec.oif and spec.oif not in indexes:
                        indexes[spec.oif] = self.ifindex(spec.oif)
                    ifindex = indexes.get(spec.oif) if spec.oif else None
                    if ifindex is None:
                        errors.append(f"route {spec.dst}: interface '{spec.oif}' does not exist")
                        continue
                if key in foreign:
                    # never replace (or shadow) a route we did not make; one of ours for the same
                    # prefix (installed before the other appeared) stays as it is
                    conflicts.append(
                        f"route {spec.dst}"
                        + (f" table {spec.table}" if spec.table != RT_TABLE_MAIN else "")
                        + f" ({spec.label or spec.kind}): not installed, the kernel already has "
                        f"{foreign[key]} (not podrouter's; left alone)"
                    )
                    continue
                if actual.get(key) == spec.kernel_view(ifindex):
                    continue
                requests.append(_replace_request(spec, ifindex))
                specs.append(spec)
            stale = sorted(actual.keys() - desired.keys())
            requests.extend(_delete_request(key) for key in stale)
            # thousands of peer routes: in bulk, a few hundred per system call (netlink/rtnl.py)
            with Rtnl() as nl:
                codes = nl.change(requests)
            changes = 0
            for i, code in enumerate(codes):
                if i < len(specs):
                    if code:
                        spec = specs[i]
                        errors.append(f"route {spec.dst} dev {spec.oif}: {os.strerror(code)}")
                    else:
                        changes += 1
                elif code in (0, errno.ESRCH, errno.ENOENT):
                    changes += 1
                else:
                    table, dst = stale[i - len(specs)]
                    raise PlumbingError(f"deleting route {dst} table {table}: {os.strerror(code)}")
            self.last_changes = changes
            if self.routes != desired:
                self.routes = dict(desired)
                self.save()
            for c in conflicts:
                if c not in self.conflicts:
                    log.warning("%s", c)
            self.conflicts = conflicts
        return errors + conflicts

    def _delete_route(self, key: tuple[int, str]) -> None:
        table, dst = key
        net = ipaddress.ip_network(dst)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        try:
            self.ipr.route(
                "del",
                family=family,
                dst=str(net.network_address),
                dst_len=net.prefixlen,
                table=table,
                proto=RTPROT_PODROUTER,
                scope=RT_SCOPE_NOWHERE,
            )
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise

    # ------------------------------------------------------------------------------------- rules

    def kernel_rules(self) -> set[RuleSpec]:
        """Our policy rules in the kernel: those carrying protocol 77 (a rule of another owner at
        the same priority is not ours, however alike)."""
        out = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_rules(family=family):
                if msg.get_attr("FRA_PROTOCOL") != RTPROT_PODROUTER:
                    continue
                prio = msg.get_attr("FRA_PRIORITY") or 0
                src = msg.get_attr("FRA_SRC")
                sup = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
                out.add(
                    RuleSpec(
                        priority=prio,
                        table=msg.get_attr("FRA_TABLE") or msg["table"],
                        src=str(ipaddress.ip_network(f"{src}/{msg['src_len']}")) if src else None,
                        suppress_prefixlength=None if sup in (None, 0xFFFFFFFF) else sup,
                        family=family,
                    )
                )
        return out

    def sync_rules(self, desired: set[RuleSpec]) -> None:
        with self.lock:
            self.rules |= desired
            self.save()
            actual = self.kernel_rules()
            for rule in actual - desired:
                self._delete_rule(rule)
            for rule in desired - actual:
                self.ipr.rule("add", **rule.request())
            self.rules = set(desired)
            self.save()

    def _delete_rule(self, rule: RuleSpec) -> None:
        try:
            self.ipr.rule("del", **rule.request())
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

    # ----------------------------------------------------------------------------------- sysctls

    def set_sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl, remembering the value it had before the first change (restored at exit)."""
        with self.lock:
            current = sysctl.read(key)
            if current is None:
                raise PlumbingError(f"sysctl {key} does not exist")
            if key not in self.state.sysctls:
                self.state.sysctls[key] = current
                self.save()
            if current != str(value):
                sysctl.write(key, value)

    def forget_sysctls(self, prefix: str) -> None:
        """Drop the record of sysctls under `prefix` (an interface that is gone took them with it)."""
        with self.lock:
            for key in [k for k in self.state.sysctls if k.startswith(prefix)]:
                del self.state.sysctls[key]
            self.save()

    def restore_sysctls(self, prefix: str = "") -> None:
        with self.lock:
            for key in [k for k in self.state.sysctls if k.startswith(prefix)]:
                value = self.state.sysctls.pop(key)
                try:
                    if sysctl.read(key) is not None:
                        sysctl.write(key, value)
                except OSError as e:
                    log.warning("could not restore %s=%s: %s", key, value, e)
            self.save()

    # ------------------------------------------------------------------- IPv6 pod gateway address

    def ensure_gateway6(self, ifname: str, address: str) -> None:
        """`address`/64 on `ifname`, without DAD (it must answer the pod's neighbour solicitation at
        once). Idempotent: the kernel drops manual IPv6 addresses when a link goes down, and the next
        reconcile puts it back. Recorded first, so cleanup finds it after a crash."""
        with self.lock:
            idx = self.ifindex(ifname)
            if idx is None:
                return
            if self.state.gateways6.get(ifname) != address:
                self.state.gateways6[ifname] = address
                self.save()
            _addr_gateway6(self.ipr, "replace", idx, address)

    def remove_gateway6(self, ifname: str, address: str | None = None) -> None:
        with self.lock:
            recorded = self.state.gateways6.pop(ifname, None)
            address = address or recorded
            if address is None:
                return
            idx = self.ifindex(ifname)
            if idx is not None:
                _addr_gateway6(self.ipr, "del", idx, address)
            self.save()

    # ---------------------------------------------------------------------------------- teardown

    def teardown(self) -> None:
        """Remove every route and rule we own, restore sysctls, delete the state file."""
        with self.lock:
            for ifname in list(self.state.gateways6):
                self.remove_gateway6(ifname)
            for key in self.kernel_routes():
                self._delete_route(key)
            for rule in self.kernel_rules():
                self._delete_rule(rule)
            self.routes.clear()
            self.rules.clear()
            self.restore_sysctls()
            statefile.remove(self.state_path)


def _dump_all() -> list[Route]:
    with Rtnl() as nl:
        return nl.dump_routes(socket.AF_INET) + nl.dump_routes(socket.AF_INET6)


def _replace_request(spec: RouteSpec, ifindex: int | None) -> RouteRequest:
    unicast = spec.kind == "unicast"
    return RouteRequest(
        "replace",
        spec.dst,
        spec.table,
        RTPROT_PODROUTER,
        type=_TYPES[spec.kind],
        scope=RT_SCOPE_LINK if unicast and spec.scope_link else RT_SCOPE_UNIVERSE,
        oif=ifindex if unicast else None,
        mtu=spec.mtu,
    )


def _delete_request(key: tuple[int, str]) -> RouteRequest:
    # naming our protocol: the kernel then matches nothing of another owner's
    return RouteRequest("del", key[1], key[0], RTPROT_PODROUTER, scope=RT_SCOPE_NOWHERE)


def _describe(ipr: IPRoute, r: Route) -> str:
    """`10.244.2.0/24 dev eth9 proto static` (the conflict report's view of a foreign route)."""
    kind = _TYPE_NAMES.get(r.type, f"type {r.type}")
    desc = [r.dst] if kind == "unicast" else [kind, r.dst]
    if r.gateway:
        desc.append(f"via {r.gateway}")
    if r.oif:
        names = ipr.get_links(r.oif)
        desc.append(f"dev {names[0].get_attr('IFLA_IFNAME') if names else r.oif}")
    desc.append(f"proto {_PROTO_NAMES.get(r.proto, r.proto)}")
    return " ".join(desc)


def foreign_routes(ipr: IPRoute, tables: set[int]) -> dict[tuple[int, str], str]:
    """Routes in `tables` of any protocol but podrouter's, keyed like RouteSpec.key, with a short
    description (`10.244.2.0/24 dev eth9 proto static`)."""
    _, foreign = Plumbing._kernel_view(_dump_all(), tables)
    return {k: _describe(ipr, r) for k, r in foreign.items()}


def cleanup(ipr: IPRoute, recorded: statefile.State | None) -> list[str]:
    """Undo what a (dead) daemon left in *this* namespace. Returns a line per thing removed."""
    done: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family):
            if msg["proto"] != RTPROT_PODROUTER:
                continue
            table, dst = _route_key(msg)
            try:
                ipr.route(
                    "del",
                    family=family,
                    dst=dst.split("/")[0],
                    dst_len=msg["dst_len"],
                    table=table,
                    proto=RTPROT_PODROUTER,
                    scope=RT_SCOPE_NOWHERE,
                )
                done.append(f"removed route {dst}" + (f" table {table}" if table != RT_TABLE_MAIN else ""))
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT):
                    raise
    if recorded is None:
        return done
    for raw in recorded.rules:
        rule = RuleSpec(**raw)  # request() names protocol 77: another owner's rule never matches
        try:
            ipr.rule("del", **rule.request())
            done.append(f"removed rule priority {rule.priority}")
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise
    for ifname, address in recorded.gateways6.items():
        idx = ipr.link_lookup(ifname=ifname)
        if idx and _addr_gateway6(ipr, "del", idx[0], address):
            done.append(f"removed {address}/64 from {ifname}")
    for key, value in recorded.sysctls.items():
        if sysctl.read(key) is None:
            continue  # its interface is gone
        try:
            sysctl.write(key, value)
            done.append(f"restored {key}={value}")
        except OSError as e:
            done.append(f"could not restore {key}={value}: {e}")
    return done


def _addr_gateway6(ipr: IPRoute, op: str, ifindex: int, address: str) -> bool:
    """Add (replace) or delete the link-local pod gateway address; False when there was none to
    delete (or the interface vanished meanwhile)."""
    kw: dict[str, Any] = {"index": ifindex, "address": address, "prefixlen": 64, "family": socket.AF_INET6}
    if op != "del":
        kw["flags"] = IFA_F_NODAD
    try:
        ipr.addr(op, **kw)
    except NetlinkError as e:
        if e.code in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT, errno.ESRCH):
            return False
        raise
    return True
