"""The few knobs that exist only as sysctls, read and written through /proc/sys.

/proc/sys/net is per network namespace (the namespace of the process that opens the file), so a
daemon started with `ip netns exec NODE` only ever changes its node's namespace.

Keys reach this module from the daemon's own code but also from the state file, which `podrouter
cleanup` reads back (and which anyone with write access to its directory could edit). So:

* every key is parsed strictly (`net.<family>.<conf|neigh>.<ifname>.<knob>` or a fixed global key),
  the interface name checked like the kernel's `dev_valid_name` (1-15 bytes, no '/', ':', whitespace,
  not '.' or '..'), the other components `[a-z0-9_]+`, and the resulting path must resolve inside
  /proc/sys;
* `write` only writes the keys podrouter itself sets (`ALLOWED_*` below, derived from bringup.py and pods.py),
  only integer values, and opens an existing file without following a symlink and without creating
  anything. Anything else raises `SysctlError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROC_SYS = Path("/proc/sys")

# the sysctls podrouter sets (bringup.node_sysctls, pods.PodRegistry.sysctls); a new one must be added here
ALLOWED_GLOBAL = frozenset(
    {
        "net.ipv4.ip_forward",
        "net.ipv4.conf.all.rp_filter",
        "net.ipv6.conf.all.forwarding",
    }
)
# per-device knobs: (family, conf|neigh) -> knobs, for a real device name (not 'all' or 'default')
ALLOWED_PER_DEVICE: dict[tuple[str, str], frozenset[str]] = {
    ("ipv4", "conf"): frozenset({"rp_filter", "proxy_arp", "forwarding"}),
    ("ipv4", "neigh"): frozenset({"proxy_delay"}),
    ("ipv6", "conf"): frozenset(
        {
            "disable_ipv6",
            "forwarding",
            "force_mld_version",
            "addr_gen_mode",
            "accept_ra",
            "accept_dad",
            "dad_transmits",
            "router_solicitations",
        }
    ),
}

_COMPONENT_RE = re.compile(r"^[a-z0-9_]+$")
# the kernel's dev_valid_name(): < IFNAMSIZ (16) bytes, not '.'/'..', no '/', ':' or whitespace
_IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")
_VALUE_RE = re.compile(r"^-?[0-9]{1,20}$")


class SysctlError(ValueError):
    """A key or value podrouter refuses to touch."""


def valid_ifname(name: str) -> bool:
    return (
        isinstance(name, str)
        and bool(_IFNAME_RE.fullmatch(name))
        and name not in (".", "..")
        and len(name.encode()) <= 15
    )


def _split(key: str) -> list[str]:
    """The path components of `key`, each checked; raises SysctlError."""
    if not isinstance(key, str) or not key or len(key) > 256:
        raise SysctlError(f"sysctl key {key!r} is not a dotted sysctl name")
    parts = key.split(".")
    if len(parts) >= 5 and parts[0] == "net" and parts[2] in ("conf", "neigh"):
        # interface names may contain dots (`eth0.100`): net.<family>.<conf|neigh>.<ifname>.<knob>
        dev = ".".join(parts[3:-1])
        if not valid_ifname(dev):
            raise SysctlError(f"sysctl key {key!r}: {dev!r} is not a valid interface name")
        parts = [*parts[:3], dev, parts[-1]]
        plain = [*parts[:3], parts[4]]
    else:
        plain = parts
    for c in plain:
        if not _COMPONENT_RE.fullmatch(c):
            raise SysctlError(f"sysctl key {key!r}: component {c!r} is not [a-z0-9_]+")
    return parts


def key_path(key: str) -> Path:
    """'net.ipv4.conf.veth-a.proxy_arp' -> /proc/sys/net/ipv4/conf/veth-a/proxy_arp, checked to resolve
    inside /proc/sys (raises SysctlError otherwise)."""
    path = PROC_SYS.joinpath(*_split(key))
    resolved = path.resolve()
    if not resolved.is_relative_to(PROC_SYS.resolve()):
        raise SysctlError(f"sysctl key {key!r} resolves outside {PROC_SYS}: {resolved}")
    return path


def allowed(key: str) -> str | None:
    """None if podrouter may write `key`, else why not."""
    try:
        parts = _split(key)
    except SysctlError as e:
        return str(e)
    if key in ALLOWED_GLOBAL:
        return None
    if len(parts) == 5 and parts[0] == "net":
        knobs = ALLOWED_PER_DEVICE.get((parts[1], parts[2]))
        if knobs is not None and parts[4] in knobs and parts[3] not in ("all", "default"):
            return None
    return f"sysctl key {key!r} is not one podrouter sets"


def valid_value(value: str | int) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(_VALUE_RE.fullmatch(value.strip())))


def read(key: str) -> str | None:
    """The current value, or None when the key does not exist (e.g. the interface is gone)."""
    try:
        return key_path(key).read_text().strip()
    except FileNotFoundError:
        return None


def write(key: str, value: str | int) -> None:
    """Write an allowed key (see the module doc); never creates a file or follows a symlink."""
    why = allowed(key)
    if why is not None:
        raise SysctlError(why)
    if not valid_value(value):
        raise SysctlError(f"sysctl {key}: value {value!r} is not an integer")
    path = key_path(key)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, f"{str(value).strip()}\n".encode())
    finally:
        os.close(fd)


def conf(ifname: str, knob: str, family: str = "ipv4") -> str:
    return f"net.{family}.conf.{ifname}.{knob}"


def neigh(ifname: str, knob: str, family: str = "ipv4") -> str:
    return f"net.{family}.neigh.{ifname}.{knob}"
