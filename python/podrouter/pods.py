"""The pod registry: the pods this node routes to (from the config, the API, a CNI plugin), the
per-veth settings each needs (proxy ARP, forwarding, rp_filter, the IPv6 gateway address) and
their shaping (the bandwidth manager, qos/manager.py).

The registry changes the kernel only through the plumbing (which records every change in the state
file for cleanup and the next daemon) and the shaper; the daemon holds its lock around every call
and reconciles the routes afterwards."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from podrouter import api as apimod
from podrouter import state as statefile
from podrouter.config import Config, PodConfig
from podrouter.netlink import IPRoute, sysctl
from podrouter.netlink.constants import POD_GATEWAY6
from podrouter.netlink.plumbing import Plumbing
from podrouter.plan import has_ipv6

log = logging.getLogger("podrouter")


class Shaper(Protocol):
    """What the registry needs of the bandwidth manager (qos/manager.py BandwidthManager)."""

    def apply(self, name: str, host_interface: str, ip: str, request: Any) -> Mapping[str, Any]: ...

    def remove(self, name: str) -> None: ...

    def status(self) -> Mapping[str, Any]: ...

    def detach(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class PodEntry:
    pod: PodConfig
    source: str  # config | api
    shaping: dict[str, Any] = field(default_factory=dict)
    # the CNI attachment that registered it (container_id, netns, ifname), if a CNI plugin did: a DEL
    # that names another container (a late DEL of a predecessor with the same pod name) leaves it be
    cni: dict[str, str] | None = None

    def status(self) -> dict[str, Any]:
        out = {**self.pod.as_dict(), "source": self.source, "shaping": self.shaping}
        if self.cni:
            out["cni"] = dict(self.cni)
        return out


def make_bandwidth(cfg: Config) -> Shaper | None:
    """A bandwidth manager on a netlink socket of its own, or None with shaping disabled."""
    if not cfg.bandwidth.enabled:
        log.info("bandwidth shaping disabled (bandwidth.enabled: false)")
        return None
    from podrouter.qos.manager import BandwidthManager  # lazy: only a shaping node loads tc/BPF code

    return BandwidthManager(IPRoute(), cfg.bandwidth, owns_ipr=True)


def cleanup_shaping(recorded: statefile.State, ifb_name: str) -> list[str]:
    """Remove the tc objects a dead daemon's bandwidth manager left (the QoS module knows which)."""
    from podrouter.qos.manager import cleanup as qos_cleanup  # lazy, as in make_bandwidth

    with IPRoute() as ipr:
        ifaces = [p["host_interface"] for p in recorded.pods.values()]
        removed = qos_cleanup(ipr, ifaces, ifb_name=ifb_name)
    return [f"removed shaping: {r}" for r in removed or []]


class PodRegistry:
    """The registered pods by name. `plumbing` is set once the daemon has one (start); `cfg` follows
    reloads."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.plumbing: Plumbing | None = None
        self.bandwidth: Shaper | None = None
        self.entries: dict[str, PodEntry] = {}

    def _ps(self) -> Plumbing:
        assert self.plumbing is not None, "the pod registry is used before the daemon started"
        return self.plumbing

    def __len__(self) -> int:
        return len(self.entries)

    # ---------------------------------------------------------------------------------- changes

    def install(
        self, pod: PodConfig, source: str, raise_errors: bool, cni: dict[str, str] | None = None
    ) -> PodEntry:
        """Register (or update) a pod: proxy ARP on its veth, its /32 route, its shaping."""
        ps = self._ps()
        for other in self.entries.values():
            for addr in set(other.pod.addresses) & set(pod.addresses) if other.pod.name != pod.name else ():
                msg = f"pod {pod.name}: ip {addr} is already used by pod {other.pod.name}"
                if raise_errors:
                    raise apimod.ApiError(msg)
                log.error("%s", msg)
        old = self.entries.get(pod.name)
        if old is not None and old.pod.host_interface != pod.host_interface:
            self.remove(pod.name)
        if ps.ifindex(pod.host_interface) is None:
            msg = f"pod {pod.name}: host_interface '{pod.host_interface}' does not exist"
            if raise_errors:
                raise apimod.ApiError(msg)
            log.error("%s (registered; its route is installed when the interface appears)", msg)
        else:
            self.sysctls(pod)
        entry = PodEntry(pod, source, cni=cni)
        self.entries[pod.name] = entry
        recorded = {**pod.as_dict(), "source": source}
        if cni:
            recorded["cni"] = cni
        ps.state.pods[pod.name] = recorded
        ps.save()
        self.shape(entry)
        return entry

    def remove(self, name: str) -> PodEntry | None:
        entry = self.entries.pop(name, None)
        if entry is None:
            return None
        ps = self._ps()
        if self.bandwidth is not None:
            try:
                self.bandwidth.remove(name)
            except Exception:  # noqa: BLE001
                log.exception("removing shaping of pod %s failed", name)
        iface = entry.pod.host_interface
        if not any(e.pod.host_interface == iface for e in self.entries.values()):
            prefix = f"net.ipv4.conf.{iface}."
            ps.restore_sysctls(prefix)
            ps.restore_sysctls(f"net.ipv4.neigh.{iface}.")
            ps.restore_sysctls(f"net.ipv6.conf.{iface}.")
            ps.remove_gateway6(iface, POD_GATEWAY6)
        ps.state.pods.pop(name, None)
        ps.save()
        return entry

    def refresh_sysctls(self) -> None:
        """A veth that appeared (or was re-created) since its pod was registered needs its knobs."""
        ps = self._ps()
        for entry in self.entries.values():
            if ps.ifindex(entry.pod.host_interface) is not None:
                self.sysctls(entry.pod)

    def sysctls(self, pod: PodConfig) -> None:
        ps = self._ps()
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
        # where conf/all stays at 0 or 1 (bringup.node_sysctls lowers a strict `all` to loose); the
        # nftables pod egress guard checks every source regardless (docs/architecture.md)
        ps.set_sysctl(sysctl.conf(ifname, "rp_filter"), 1)
        if any(a.version == 6 for a in pod.addresses) and has_ipv6(self.cfg):
            # the IPv6 counterpart: the pod's default route is `via fe80::1 dev eth0`, and fe80::1 is
            # an address of the node's end of the veth (nodad, so it answers at once), exactly one per
            # veth (link-local addresses are per link). docs/architecture.md, "Pod attachment".
            if sysctl.read(sysctl.conf(ifname, "disable_ipv6", "ipv6")) == "1":
                ps.set_sysctl(sysctl.conf(ifname, "disable_ipv6", "ipv6"), 0)
            ps.ensure_gateway6(ifname, POD_GATEWAY6)

    # ---------------------------------------------------------------------------------- shaping

    def shape(self, entry: PodEntry) -> None:
        pod = entry.pod
        if self.bandwidth is None:
            entry.shaping = {"enabled": False}
            return
        try:
            entry.shaping = dict(self.bandwidth.apply(pod.name, pod.host_interface, str(pod.ip), pod.qos))
        except Exception as e:  # noqa: BLE001 - shaping trouble must not fail the pod's connectivity
            log.exception("shaping pod %s failed", pod.name)
            entry.shaping = {"error": str(e)}

    def reload_config_pods(self, old: Config, new: Config) -> None:
        """SIGHUP: the config's pods as `new` has them (changed ones reinstalled); pods registered
        through the API stay."""
        old_pods = {p.name: p for p in old.pods}
        new_pods = {p.name: p for p in new.pods}
        for name, pod in old_pods.items():
            entry = self.entries.get(name)
            if entry is not None and entry.source == "config" and new_pods.get(name) != pod:
                self.remove(name)
        for name, pod in new_pods.items():
            if name not in self.entries or old_pods.get(name) != pod:
                self.install(pod, "config", raise_errors=False)

    def restart_bandwidth(self, cfg: Config) -> None:
        """A reload changed `bandwidth:`: a new manager (its own netlink socket), every pod shaped again."""
        if self.bandwidth is not None:
            self.bandwidth.close()
        self.bandwidth = make_bandwidth(cfg)
        for entry in self.entries.values():
            self.shape(entry)

    # ----------------------------------------------------------------------------------- status

    def live_shaping(self) -> dict[str, Any]:
        """The shaping status with the tc counters of this moment (read without the daemon's lock)."""
        if self.bandwidth is None:
            return {}
        try:
            return dict(self.bandwidth.status())
        except Exception:  # noqa: BLE001 - status must answer even if tc cannot be read
            log.exception("reading the shaping status failed")
            return {}

    def statuses(self, live: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = []
        for e in sorted(self.entries.values(), key=lambda e: e.pod.name):
            st = e.status()
            if e.pod.name in live:
                st["shaping"] = live[e.pod.name]
            out.append(st)
        return out

    def limits(self) -> dict[str, int | None]:
        """Each pod's egress limit in bit/s (None: unshaped), for the metrics."""
        out: dict[str, int | None] = {}
        for e in list(self.entries.values()):
            # after a failed update the previous shaping stays in force, and egress_bps still reports it
            val = e.shaping.get("egress_bps") if isinstance(e.shaping, dict) else None
            out[e.pod.name] = int(val) if isinstance(val, int | float) else None
        return out

    def pod_of(self, address: str) -> str | None:
        """The pod holding `address` (the monitor names pods in its events)."""
        for e in self.entries.values():
            if any(str(a) == address for a in e.pod.addresses):
                return e.pod.name
        return None


__all__ = ["PodEntry", "PodRegistry", "Shaper", "cleanup_shaping", "make_bandwidth"]
