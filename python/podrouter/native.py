"""The typed facade over the Rust extension `podrouter._native` (its types: _native.pyi).

Every caller in podrouter (daemon, cli, bench, tests) goes through these functions instead of
importing `_native` itself, so that mypy checks each call against the stub and a missing or broken
build is reported the same way everywhere: `NativeUnavailable`, a StartError with exit status 1
(the daemon prints it, the CLI prints it, nothing shows a traceback).

The extension is loaded on first use, not when this module is imported: the pure-Python tools
never need it; config loading needs it once, after the YAML's shape checks, to ask the core's
rulebook (`check_tables`) about the relations between the keys.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from podrouter.errors import EXIT_FAILURE, StartError

if TYPE_CHECKING:
    from podrouter._native import Datapath, Tables

# the `path` argument of encap_overhead
TUNNEL_PATHS = ("vxlan", "geneve")


class NativeUnavailable(StartError):
    """`podrouter._native` cannot be imported (not built, or built for another Python)."""


@functools.cache
def module() -> ModuleType:
    """The extension module itself, loaded once (deliberately lazy: see the module docstring)."""
    try:
        from podrouter import _native
    except ImportError as e:
        raise NativeUnavailable(
            [f"the podrouter datapath (podrouter._native) is not available: {e}"], EXIT_FAILURE
        ) from None
    return _native


def available() -> str | None:
    """None when the extension loads, else why not (one line)."""
    try:
        module()
    except NativeUnavailable as e:
        return str(e)
    return None


def version() -> str:
    """The Rust crates' version (`_native.__version__`)."""
    return str(module().__version__)


# ------------------------------------------------------------------------------ tables and datapath


def compile_tables(spec: Mapping[str, Any], settings: Mapping[str, Any]) -> Tables:
    """`_native.Tables(spec, settings)`: the core validates and compiles the table spec
    (plan.build_spec) against the engine's start-time settings (an engine config:
    plan.engine_settings, or the whole bringup.datapath_config); ValueError("<key path>:
    <problem>") for one it refuses."""
    tables: Tables = module().Tables(dict(spec), dict(settings))
    return tables


def check_tables(spec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`_native.check_tables(spec, settings)`: every problem the core's rulebook finds (the
    relations between the table spec and the engine settings), as (key path in spec terms,
    message) pairs; [] when `compile_tables` would succeed. ValueError for a dict of the wrong
    shape."""
    return [(str(p), str(m)) for p, m in module().check_tables(dict(spec), dict(settings))]


class Problem(NamedTuple):
    """One problem of the core's rulebook with its structure (`check_problems`): which rule
    (`code`, e.g. `address_taken`, `pod_cidr_overlap`), the offending spec key `path`, the key
    path of the other party of a relation (`other`: the earlier owner of an address or a pod
    CIDR, the peer whose address a cluster CIDR contains), the values involved (offending one
    first) and the core's own wording in spec terms (`message`)."""

    code: str
    path: str
    other: str | None
    values: tuple[str, ...]
    message: str


def check_problems(spec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[Problem]:
    """`_native.check_problems(spec, settings)`: `check_tables` with each problem's structure, for
    callers that word problems in their own terms (discovery/etcd.py names registrations, not
    spec keys). ValueError for a dict of the wrong shape."""
    return [
        Problem(str(c), str(p), None if o is None else str(o), tuple(str(v) for v in vs), str(m))
        for c, p, o, vs, m in module().check_problems(dict(spec), dict(settings))
    ]


def admit_problems(
    spec: Mapping[str, Any], settings: Mapping[str, Any], first: int, skip: Iterable[str] = ()
) -> list[Problem]:
    """`_native.admit_problems`: the core's rulebook with precedence (rules.rs `admit`). The peers
    from index `first` on are admitted one by one in spec order, each against the node, the peers
    before `first` (which always win) and those admitted before it; each refused peer's problems
    come back (a younger peer is never refused for a conflict with a refused one). `skip`: codes
    of rules not to apply."""
    found = module().admit_problems(dict(spec), dict(settings), first, list(skip))
    return [
        Problem(str(c), str(p), None if o is None else str(o), tuple(str(v) for v in vs), str(m))
        for c, p, o, vs, m in found
    ]


def route_paths(tables: Tables, destinations: Iterable[str]) -> list[str | None]:
    """The path (native | vxlan | geneve) the compiled tables give each destination address inside
    a peer's pod CIDRs, whether or not its next hop is resolved yet; None for an address outside
    every peer's pod CIDRs. One call for the whole route plan (thousands of peers)."""
    return list(tables.route_paths(list(destinations)))


def open_datapath(config: Mapping[str, Any]) -> Datapath:
    """`_native.Datapath(config)`: creates (or reattaches) the TUN; OSError when the kernel refuses."""
    dp: Datapath = module().Datapath(dict(config))
    return dp


def adopt_datapath(config: Mapping[str, Any], fds: dict[str, Any]) -> Datapath:
    """`_native.Datapath.adopt`: a datapath on the fds a running predecessor passed (handover)."""
    dp: Datapath = module().Datapath.adopt(dict(config), fds)
    return dp


# --------------------------------------------------------------------------------- the core's rules


def encap_overhead(path: str, v6_outer: bool = False, ip_payload: bool = False) -> int:
    """Outer bytes of a tunnel path (VXLAN, Geneve with an inner Ethernet frame or with
    `ip_payload`), 20 more over an IPv6 underlay: the core's numbers. KeyError for "native"."""
    n = module()
    geneve = n.GENEVE_IP_OVERHEAD if ip_payload else n.GENEVE_OVERHEAD
    base: int = {"vxlan": n.VXLAN_OVERHEAD, "geneve": geneve}[path]
    return base + (int(n.OUTER_V6_EXTRA) if v6_outer else 0)


def vtep_mac(address: str) -> str:
    """The VTEP MAC the core synthesizes for a node address (ValueError for a non-address)."""
    return str(module().vtep_mac(address))


# ------------------------------------------------------------------------------- the load generators


def has_load_generators() -> bool:
    """Whether this build registered the benchmark load generators (rust/py/src/blast.rs)."""
    return hasattr(module(), "udp_blast")


def udp_blast(
    dst: str, port: int, size: int, seconds: float, batch: int = 64, rate_pps: int | None = None
) -> dict[str, Any]:
    return dict(module().udp_blast(dst, port, size, seconds, batch, rate_pps))


def udp_sink(bind: str, port: int, seconds: float, idle: float | None = None) -> dict[str, Any]:
    return dict(module().udp_sink(bind, port, seconds, idle))


def tcp_connect_rate(dst: str, port: int, seconds: float, threads: int = 4) -> dict[str, Any]:
    return dict(module().tcp_connect_rate(dst, port, seconds, threads))


def tcp_accept_sink(bind: str, port: int, seconds: float) -> int:
    return int(module().tcp_accept_sink(bind, port, seconds))


__all__ = [
    "NativeUnavailable",
    "adopt_datapath",
    "available",
    "admit_problems",
    "check_problems",
    "check_tables",
    "Problem",
    "compile_tables",
    "encap_overhead",
    "has_load_generators",
    "module",
    "open_datapath",
    "route_paths",
    "tcp_accept_sink",
    "tcp_connect_rate",
    "udp_blast",
    "udp_sink",
    "vtep_mac",
]
