"""The daemon's record of what it installed, so that `podrouter cleanup` can undo a killed daemon.

One JSON file per node (`Config.state_path`, next to the API socket), rewritten atomically
(write to a temporary file, rename) with every change, so a crash of the daemon at any point
leaves either the old or the new record, never half of one. No fsync: like the NAT snapshot, the
record has to outlive the process, not the machine. Everything it describes (routes, rules,
sysctls, the TUN, nftables tables, tc) lives in the kernel and is gone after a reboot, and the page
cache survives a killed process; an fsync per change cost 1-2 ms or more on a busy disk, a dozen
times in a start from scratch (docs/benchmarks.md, "Start-up time"). A record
torn by a power loss is refused at the next start (not JSON) and set aside, with nothing to undo.
It records the network namespace it was written in: cleanup refuses to act on a record from
another namespace.

The file is read back by `podrouter cleanup` and by a daemon starting after a crash, and both act on
it as root, so it is treated as untrusted input: `load` refuses (ValueError naming the file and the
problem, before anything is changed) a file that is not a regular file, is larger than
`MAX_BYTES`, is not JSON, has an unknown or missing key or a value of the wrong type, or names a
sysctl podrouter does not set (netlink.sysctl's allow-list), a bad interface name, a rule outside
podrouter's priorities or a gateway address other than podrouter's. One bad entry refuses the file:
a tampered record is not half-trusted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from podrouter import jsonfile
from podrouter.netlink import sysctl
from podrouter.netlink.constants import MASQ_RULE_PRIORITY, MASQ_TABLE, POD_GATEWAY6, SUPPRESS_RULE_PRIORITY
from podrouter.netlink.specs import RouteSpec, RuleSpec

FORMAT = 1
# a node with thousands of pods writes well under 1 MiB; anything far larger is not ours
MAX_BYTES = 16 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$")
_RULE_PRIORITIES = (SUPPRESS_RULE_PRIORITY, MASQ_RULE_PRIORITY)
_RULE_TABLES = (MASQ_TABLE, 254)


@dataclass
class State:
    node: str
    netns: str
    pid: int
    socket: str | None = None
    tun: str | None = None
    routes: list[dict[str, Any]] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)
    # sysctl key -> the value before podrouter changed it (restored on exit and by cleanup)
    sysctls: dict[str, str] = field(default_factory=dict)
    # pod name -> {"ip", "ips", "host_interface", "annotations", "source"}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # interface -> the link-local pod gateway address podrouter put on it (dual-stack pods' veths)
    gateways6: dict[str, str] = field(default_factory=dict)
    nft_guard: bool = False  # the masquerade reply guard (nftables table ip podrouter) is installed
    format: int = FORMAT

    def to_json(self) -> str:
        # shallow (every field is plain JSON already) and one key per line at the top only: asdict()'s
        # deep copy and an indented dump (pure Python) took seconds with thousands of routes
        top = {f.name: getattr(self, f.name) for f in fields(self)}
        return "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(top[k])}" for k in sorted(top)) + "\n}\n"

    @classmethod
    def from_dict(cls, data: Any) -> State:
        """A validated State; raises ValueError naming the first problem."""
        if not isinstance(data, dict):
            raise ValueError("the top level is not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a podrouter state file of format {FORMAT} (format {data.get('format')!r})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        for key in ("node", "netns", "pid"):
            if key not in data:
                raise ValueError(f"{key}: missing")
        _validate(data)
        return cls(**data)


def _bad(key: str, value: Any, what: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return ValueError(f"{key}: {shown} {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(key: str, v: Any, pattern: re.Pattern[str] | None = None, max_len: int = 256) -> None:
    if not isinstance(v, str) or len(v) > max_len or (pattern is not None and not pattern.fullmatch(v)):
        raise _bad(key, v, "is not a valid value here")


def _ifname(key: str, v: Any) -> None:
    if not isinstance(v, str) or not sysctl.valid_ifname(v):
        raise _bad(key, v, "is not a valid interface name")


def _cidr(key: str, v: Any) -> None:
    try:
        if not isinstance(v, str):
            raise ValueError
        ipaddress.ip_network(v)
    except ValueError:
        raise _bad(key, v, "is not a CIDR") from None


def _validate(d: dict[str, Any]) -> None:
    _str("node", d["node"], _NAME_RE)
    _str("netns", d["netns"], re.compile(r"^[0-9]+:[0-9]+$"), 64)
    if not _is_int(d["pid"]) or d["pid"] < 0:
        raise _bad("pid", d["pid"], "is not a process id")
    sock = d.get("socket")
    if sock is not None and (not isinstance(sock, str) or not sock.startswith("/") or len(sock) > 107):
        raise _bad("socket", sock, "is not an absolute socket path")
    if d.get("tun") is not None:
        _ifname("tun", d["tun"])
    if not isinstance(d.get("nft_guard", False), bool):
        raise _bad("nft_guard", d["nft_guard"], "is not a boolean")
    # the route and rule records are `asdict` of netlink.specs' RouteSpec / RuleSpec: their fields are
    # the allowed keys (the ones checked below by type and value, any other field a plain scalar)
    scalar = (str, int, bool, type(None))
    routes = d.get("routes", [])
    if not isinstance(routes, list):
        raise _bad("routes", routes, "is not a list")
    route_types: dict[str, type | tuple[type, ...]] = {
        "dst": str,
        "kind": str,
        "oif": (str, type(None)),
        "mtu": (int, type(None)),
        "table": int,
        "scope_link": bool,
        "label": str,
    }
    for i, r in enumerate(routes):
        if not isinstance(r, dict) or set(r) - {f.name for f in fields(RouteSpec)}:
            raise _bad(f"routes[{i}]", r, "is not a route record")
        for k, v in r.items():
            if not isinstance(v, route_types.get(k, scalar)):
                raise _bad(f"routes[{i}].{k}", v, "has the wrong type")
        _cidr(f"routes[{i}].dst", r.get("dst"))
        if r.get("oif") is not None:
            _ifname(f"routes[{i}].oif", r["oif"])
    rules = d.get("rules", [])
    if not isinstance(rules, list):
        raise _bad("rules", rules, "is not a list")
    for i, r in enumerate(rules):
        allowed_keys = {f.name for f in fields(RuleSpec)}
        if not isinstance(r, dict) or set(r) - allowed_keys or not {"priority", "table"} <= set(r):
            raise _bad(f"rules[{i}]", r, "is not a rule record")
        if not all(isinstance(v, scalar) for v in r.values()):
            raise _bad(f"rules[{i}]", r, "has a value that is not a plain scalar")
        if r["priority"] not in _RULE_PRIORITIES or not _is_int(r["priority"]):
            raise _bad(f"rules[{i}].priority", r["priority"], f"is not one of podrouter's {_RULE_PRIORITIES}")
        if r["table"] not in _RULE_TABLES or not _is_int(r["table"]):
            raise _bad(f"rules[{i}].table", r["table"], f"is not one of podrouter's {_RULE_TABLES}")
        if r.get("src") is not None:
            _cidr(f"rules[{i}].src", r["src"])
        sup = r.get("suppress_prefixlength")
        if sup is not None and (not _is_int(sup) or not 0 <= sup <= 128):
            raise _bad(f"rules[{i}].suppress_prefixlength", sup, "is not a prefix length")
        if r.get("family", 2) not in (2, 10) or not _is_int(r.get("family", 2)):
            raise _bad(f"rules[{i}].family", r.get("family"), "is not AF_INET or AF_INET6")
    sysctls = d.get("sysctls", {})
    if not isinstance(sysctls, dict):
        raise _bad("sysctls", sysctls, "is not a mapping")
    for k, v in sysctls.items():
        why = sysctl.allowed(k)
        if why is not None:
            raise ValueError(f"sysctls: {why}")
        if not isinstance(v, str) or not sysctl.valid_value(v):
            raise _bad(f"sysctls[{k!r}]", v, "is not an integer value")
    pods = d.get("pods", {})
    if not isinstance(pods, dict):
        raise _bad("pods", pods, "is not a mapping")
    pod_keys = {"name", "ip", "ips", "host_interface", "annotations", "source", "cni"}
    for name, p in pods.items():
        _str("pods", name, _NAME_RE)
        if not isinstance(p, dict) or set(p) - pod_keys or "host_interface" not in p:
            raise _bad(f"pods[{name!r}]", p, "is not a pod record")
        _ifname(f"pods[{name!r}].host_interface", p["host_interface"])
        ann = p.get("annotations", {})
        if not isinstance(ann, dict) or not all(
            isinstance(a, str) and isinstance(b, str) for a, b in ann.items()
        ):
            raise _bad(f"pods[{name!r}].annotations", ann, "is not a string mapping")
        for k in ("name", "ip", "source"):
            if k in p and not isinstance(p[k], str):
                raise _bad(f"pods[{name!r}].{k}", p[k], "is not a string")
        cni = p.get("cni")
        if cni is not None and (
            not isinstance(cni, dict)
            or set(cni) - {"container_id", "netns", "ifname"}
            or not all(isinstance(v, str) and len(v) <= 4096 for v in cni.values())
        ):
            raise _bad(f"pods[{name!r}].cni", cni, "is not a CNI attachment record")
        if "ips" in p and (not isinstance(p["ips"], list) or not all(isinstance(a, str) for a in p["ips"])):
            raise _bad(f"pods[{name!r}].ips", p["ips"], "is not a list of addresses")
    gws = d.get("gateways6", {})
    if not isinstance(gws, dict):
        raise _bad("gateways6", gws, "is not a mapping")
    for ifname, addr in gws.items():
        _ifname("gateways6", ifname)
        if addr != POD_GATEWAY6:
            raise _bad(f"gateways6[{ifname!r}]", addr, f"is not podrouter's pod gateway {POD_GATEWAY6}")


def save(path: Path, state: State) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())  # no fsync (module doc): closed, then renamed into place
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load(path: Path) -> State | None:
    """The recorded state, or None if there is no file. Raises ValueError, naming the file and the
    problem, for a corrupt or tampered one (see the module doc)."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"{path}: corrupt state file (refused, nothing was changed): {why}")

    try:
        data = jsonfile.read(path, MAX_BYTES)
    except jsonfile.Refused as e:
        raise refuse(str(e)) from None
    if data is None:
        return None
    try:
        return State.from_dict(data)
    except (ValueError, TypeError) as e:
        raise refuse(str(e)) from None


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
