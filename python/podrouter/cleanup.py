"""`podrouter cleanup`: remove what a stopped or killed daemon left. The stop contract
(lifecycle.py) leaves the node's forwarding state for a successor; this is the full removal."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from podrouter import api as apimod
from podrouter import keeper, lifecycle, nftables
from podrouter import state as statefile
from podrouter.config import Config
from podrouter.errors import EXIT_FAILURE, StartError
from podrouter.netlink import IPRoute
from podrouter.netlink.constants import TUN_NAME
from podrouter.netlink.plumbing import cleanup as netlink_cleanup
from podrouter.netlink.underlay import UnderlayError, netns_id, resolve_underlay
from podrouter.plan import nat_snapshot_path
from podrouter.pods import cleanup_shaping


def cleanup(cfg: Config, force: bool = False) -> list[str]:
    """Remove everything a dead daemon installed; what was removed, one line each. Refuses (StartError,
    exit 1) while a daemon runs, and for a state file written in another namespace unless `force`."""
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
            try:
                done.extend(cleanup_shaping(recorded, cfg.bandwidth.ifb_name))
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
    from podrouter.startup import snapshot_path  # the forwarding snapshot: useless without the keeper

    for p in (
        nat_snapshot_path(cfg),
        nat_snapshot_path(cfg).with_name(f"{cfg.node.name}.nat.tmp"),
        snapshot_path(cfg),
    ):
        if p.is_file():
            p.unlink()
            done.append(f"removed {p}")
    return done


def _cleanup_bgp(cfg: Config) -> list[str]:
    """Withdraw this node's prefixes from its BGP peers now (docs/bgp.md, "Stopping for good")."""
    from podrouter import bgp  # lazy: only a BGP node pays for it

    try:
        with IPRoute() as ipr:
            u = resolve_underlay(ipr, cfg.node)
        if not isinstance(u.address, ipaddress.IPv4Address):
            return [f"BGP: nothing to withdraw: the underlay address {u.address} is not IPv4"]
        return bgp.withdraw(cfg, u.address, u.on_link)
    except (UnderlayError, bgp.BgpError, OSError) as e:
        return [f"BGP: could not withdraw (the routers drop our prefixes after the restart time): {e}"]


__all__ = ["cleanup"]
