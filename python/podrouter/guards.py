"""The nftables guards the daemon keeps in step with its config and pods (nftables.py does the
nftables side): the masquerade reply guard (replies to translated flows never reach the node's own
stack) and the pod egress guard (spoofed pod sources, pod packets to a tunnel socket, pod packets
leaking out of the cluster untranslated)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from podrouter import nftables
from podrouter.config import Config, PodConfig
from podrouter.netlink.plumbing import Plumbing
from podrouter.netlink.underlay import Masquerade6, Underlay
from podrouter.plan import PeerView, mesh_cidrs, mesh_space

log = logging.getLogger("podrouter")

# what the pod egress guard's sets hold (pod_guard_want); compared to skip an unchanged update
PodGuardKey = tuple[Any, ...]


def guard_addresses(cfg: Config, u: Underlay, masq6: Masquerade6 | None) -> list[str]:
    """The masquerade addresses of the families `cfg` translates: the IPv4 node address
    (none on an IPv6-only underlay) and `masquerade.address6` (with IPv6 pods)."""
    if not cfg.masquerade.enabled:
        return []
    out = [str(u.address)] if u.address.version == 4 else []
    if masq6 is not None:
        out.append(str(masq6.address))
    return out


def sync_masquerade_guard(
    plumbing: Plumbing, old: Config | None, new: Config, u: Underlay, masq6: Masquerade6 | None
) -> None:
    """The nftables tables that keep masquerade replies from the node's own stack (nftables.py):
    one per masqueraded family (`ip`, `ip6`), present exactly while masquerade is enabled, for
    the current masquerade address and port range."""
    before = (guard_addresses(old, u, masq6), old.masquerade.port_range) if old else ([], None)
    after = (guard_addresses(new, u, masq6), new.masquerade.port_range)
    if before == after:
        return
    if after[0]:
        # recorded first, so that a crash right after still gets it removed by cleanup
        plumbing.state.nft_guard = True
        plumbing.save()
        for addr in after[0]:
            nftables.install_guard(addr, new.masquerade.port_range)
            log.info(
                "masquerade reply guard installed for %s (ports %d-%d)", addr, *new.masquerade.port_range
            )
    wanted = {nftables.family_of(a) for a in after[0]}
    for fam in nftables.FAMILIES:
        if fam not in wanted and (old is not None or plumbing.state.nft_guard):
            nftables.remove_guard(fam)
    if not after[0] and old is not None:
        plumbing.state.nft_guard = False
        plumbing.save()


def pod_guard_want(
    cfg: Config,
    u: Underlay,
    masq6: Masquerade6 | None,
    pods: Iterable[PodConfig],
    peer_views: list[PeerView],
) -> PodGuardKey:
    """What the pod egress guard's sets should hold now: each registered pod's host interface
    with its addresses, every tunnel socket (each peer's and our own address, at both tunnel
    ports) that no pod may send to, and this node's pod CIDRs."""
    by_if = sorted((p.host_interface, sorted(str(a) for a in p.addresses)) for p in pods)
    # two pods on one interface (a re-registration under a new name) share its entry
    merged: dict[str, list[str]] = {}
    for ifname, pod_addrs in by_if:
        merged.setdefault(ifname, []).extend(pod_addrs)
    ports = sorted({cfg.tunnel.port_for("vxlan"), cfg.tunnel.port_for("geneve")})
    endpoints = {str(a) for a in u.addresses()} | {str(v.peer.address) for v in peer_views}
    # the leak guard (nftables.py): the cluster's pod CIDRs (and the mesh's), and, with
    # masquerade, each masqueraded family's gateway no pod packet may reach untranslated: the
    # IPv4 gateway (an IPv6-only underlay has none: its IPv4 pods are never masqueraded) and
    # the IPv6 one masquerade resolved (none when IPv6 pods are not translated)
    gw4 = u.gateway if u.gateway is not None and u.gateway.version == 4 else None
    gw6 = masq6.gateway if masq6 is not None else None
    masq_gw = [str(g) for g in (gw4, gw6) if g is not None] if cfg.masquerade.enabled else []
    return (
        sorted(merged.items()),
        [(a, p) for a in sorted(endpoints) for p in ports],
        [str(c) for c in cfg.node.pod_cidrs],
        [str(c) for c in (*cfg.cluster_cidrs, *mesh_space(cfg), *mesh_cidrs(peer_views))],
        masq_gw,
        [str(c) for c in cfg.masquerade.non_masquerade_cidrs],
    )


def install_pod_guard(want: PodGuardKey) -> PodGuardKey:
    """The nftables table that drops pod packets with a source that is not the pod's own
    (`spoofed_pod_source`) and pod packets to a tunnel socket (`pod_tunnel_port`); nftables.py.
    Installed before the first pod route exists, its sets filled by every reconcile. No state-file
    record needed: `podrouter cleanup` finds the table by its fixed name."""
    nftables.install_pod_guard(*want)
    log.info("pod egress guard installed (nftables table %s %s)", nftables.POD_FAMILY, nftables.POD_TABLE)
    return want


def sync_pod_guard(want: PodGuardKey, installed: PodGuardKey | None) -> PodGuardKey | None:
    """Update the guard's sets when `want` differs from what is `installed`; what is installed now."""
    if want == installed:
        return installed
    nftables.update_pod_guard(*want)
    return want


def pod_guard_counters(drops: dict[str, Any]) -> dict[str, Any]:
    """The datapath's drop counters with the pod egress guard's added: it drops in nftables, before
    the datapath sees anything (podrouter_drops_total{reason=...})."""
    try:
        guard = nftables.pod_guard_counters()
    except Exception:  # noqa: BLE001 - status must answer even if nftables cannot be read
        log.exception("reading the pod egress guard counters failed")
        guard = {}
    out = dict(drops)
    for reason in (nftables.SPOOF_COUNTER, nftables.TUNNEL_COUNTER, nftables.LEAK_COUNTER):
        out[reason] = int(out.get(reason, 0)) + guard.get(reason, 0)
    return out


__all__ = [
    "PodGuardKey",
    "guard_addresses",
    "install_pod_guard",
    "pod_guard_counters",
    "pod_guard_want",
    "sync_masquerade_guard",
    "sync_pod_guard",
]
