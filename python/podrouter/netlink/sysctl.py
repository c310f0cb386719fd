"""The few knobs that exist only as sysctls, read and written through /proc/sys.

/proc/sys/net is per network namespace (the namespace of the process that opens the file), so a
daemon started with `ip netns exec NODE` only ever changes its node's namespace.
"""

from __future__ import annotations

from pathlib import Path

PROC_SYS = Path("/proc/sys")


def key_path(key: str) -> Path:
    """'net.ipv4.conf.veth-a.proxy_arp' -> /proc/sys/net/ipv4/conf/veth-a/proxy_arp.

    Interface names may contain dots (`eth0.100`), so the conf/neigh interface component is kept
    whole: the key is split as net.<family>.<conf|neigh>.<ifname>.<knob>.
    """
    parts = key.split(".")
    if len(parts) >= 5 and parts[0] == "net" and parts[2] in ("conf", "neigh"):
        parts = [*parts[:3], ".".join(parts[3:-1]), parts[-1]]
    return PROC_SYS.joinpath(*parts)


def read(key: str) -> str | None:
    """The current value, or None when the key does not exist (e.g. the interface is gone)."""
    try:
        return key_path(key).read_text().strip()
    except FileNotFoundError:
        return None


def write(key: str, value: str | int) -> None:
    key_path(key).write_text(f"{value}\n")


def conf(ifname: str, knob: str, family: str = "ipv4") -> str:
    return f"net.{family}.conf.{ifname}.{knob}"


def neigh(ifname: str, knob: str, family: str = "ipv4") -> str:
    return f"net.{family}.neigh.{ifname}.{knob}"
