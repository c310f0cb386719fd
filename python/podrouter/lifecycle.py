"""The stop contract: how a daemon hands the node's forwarding state to its successor
(docs/operations.md, "Stopping, restarting, cleaning up").

* **stop** (SIGTERM / SIGINT, `release`): the daemon's threads, sockets and workers stop, but what
  forwards pod traffic stays in the kernel: the persistent TUN (so every route into it stays), the
  routes, rules and sysctls, the nftables tables (pod egress guard, leak guard, masquerade reply
  guard), tc shaping, the etcd registration (its lease runs out its TTL) and the BGP announcements
  (graceful restart when configured). The state file stays too, with pid 0 ("stopped, nothing
  running"). While no daemon runs, a pod's packet for another node or the outside goes into the
  detached TUN and is dropped there (the kernel drops what it cannot queue to a reader); the leak
  guard drops any that the kernel would forward elsewhere.
* **adopt** (`podrouter run` finding a state file of a predecessor that is gone): the successor takes
  the record over (the sysctls' original values, routes, rules, pod addresses, registered pods),
  reattaches the TUN by name and lets the ordinary reconcile change only the difference: routes and
  rules are compared with the kernel and replaced only where they differ, so a pod route that is
  still wanted is never deleted (no flap). What the config no longer wants (a peer removed between
  runs) is deleted by the same reconcile.
* **cleanup** (`podrouter cleanup --config FILE`, and a start that fails without a predecessor): the
  full removal, TUN included.

A SIGKILLed daemon leaves the same state as a stopped one (only its pid in the record is stale);
the successor adopts it in the same way.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from podrouter import config as configmod
from podrouter import state as statefile
from podrouter.errors import EXIT_FAILURE, StartError
from podrouter.netlink.specs import RouteSpec, RuleSpec
from podrouter.netlink.underlay import netns_id
from podrouter.pods import cleanup_shaping
from podrouter.startup import process_age  # the start-up figures (status ready_after)

if TYPE_CHECKING:
    from podrouter.config import Config, PodConfig
    from podrouter.netlink import IPRoute
    from podrouter.netlink.plumbing import Plumbing

log = logging.getLogger("podrouter")


def adopt(plumbing: Plumbing, recorded: statefile.State) -> None:
    """Take a predecessor's record over in `plumbing` (a fresh Plumbing of this daemon): the
    original values of the sysctls it changed (so a stop-and-cleanup later restores the node's, not
    the predecessor's), its routes and rules (so the first reconcile deletes only the ones no longer
    wanted), its IPv6 pod gateway addresses and its masquerade guard flag."""
    st = plumbing.state
    st.sysctls = dict(recorded.sysctls)
    st.gateways6 = dict(recorded.gateways6)
    st.nft_guard = recorded.nft_guard
    with plumbing.lock:
        for raw in recorded.routes:
            spec = RouteSpec(**raw)
            plumbing.routes[spec.key] = spec
        plumbing.rules = {RuleSpec(**raw) for raw in recorded.rules}
    plumbing.save()


def take_over(plumbing: Plumbing, cfg: Config) -> statefile.State | None:
    """At start: adopt the predecessor's record in `plumbing` (this daemon's fresh one) when there
    is a valid one written in this network namespace, and remove the shaping it left (the bandwidth
    manager rebuilds tc; it does not adopt qdiscs). Returns the record adopted, or None."""
    recorded = recorded_state(cfg, set_aside=True)
    if recorded is not None and recorded.netns != netns_id():
        # sysctls and rules are per namespace: a record from elsewhere says nothing about this one
        log.warning(
            "%s was written in another network namespace (%s): not acting on it (it is replaced)",
            cfg.state_path,
            recorded.netns,
        )
        return None
    if recorded is None:
        return None
    # the first reconcile changes only what differs
    log.info(
        "adopting what the previous daemon (%s) left: %d routes, %d rules, %d pods",
        f"pid {recorded.pid}" if recorded.pid else "stopped",
        len(recorded.routes),
        len(recorded.rules),
        len(recorded.pods),
    )
    adopt(plumbing, recorded)
    for line in cleanup_shaping(recorded, cfg.bandwidth.ifb_name):
        log.info("  %s", line)
    return recorded


def recorded_api_pods(
    recorded: statefile.State, cfg: Config
) -> list[tuple[PodConfig, dict[str, str] | None]]:
    """The pods a predecessor had registered through the API (the CNI plugin), validated again like
    an API request (the record is untrusted input): they keep their routes across the restart.
    Pods of the config are registered from the config; a recorded one that no longer validates is
    logged and dropped (its route goes with the first reconcile)."""
    out: list[tuple[PodConfig, dict[str, str] | None]] = []
    names = {p.name for p in cfg.pods}
    for name, rec in recorded.pods.items():
        if rec.get("source") != "api" or name in names:
            continue
        raw = {k: v for k, v in rec.items() if k not in ("source", "cni")}
        raw.setdefault("name", name)
        pod, problems, _ = configmod.pod_from_dict(raw, cfg.node.pod_cidrs)
        if pod is None:
            log.warning("recorded pod %s not taken over: %s", name, "; ".join(problems))
            continue
        cni = rec.get("cni")
        out.append((pod, dict(cni) if isinstance(cni, dict) else None))
    return out


def mark_stopped(plumbing: Plumbing) -> None:
    """The record stays for a successor; pid 0 says no daemon runs (a reused pid cannot be
    mistaken for a live predecessor)."""
    plumbing.state.pid = 0
    plumbing.save()


def tun_kind(ipr: IPRoute, name: str) -> str | None:
    """The link kind of interface `name` ("tun" for podrouter's), None if it does not exist."""
    links = ipr.get_links(ifname=name) if ipr.link_lookup(ifname=name) else []
    if not links:
        return None
    info = links[0].get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return str(kind) if kind else "unknown"


def remove_tun(ipr: IPRoute, name: str) -> bool:
    """Delete the persistent TUN `name` (only a TUN: another kind of link with that name is not
    ours). True if one was deleted."""
    if tun_kind(ipr, name) != "tun":
        return False
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        return False
    ipr.link("del", index=idx[0])
    return True


def recorded_state(cfg: Config, set_aside: bool = False) -> statefile.State | None:
    """The predecessor's state file, validated (state.py). A corrupt or tampered one is never
    acted on; at start (`set_aside`) it is renamed to `<file>.refused` (kept for inspection) so
    that this daemon's own record can take its place."""
    try:
        return statefile.load(cfg.state_path)
    except ValueError as e:
        if not set_aside:
            log.warning("%s", e)
            return None
        aside = cfg.state_path.with_name(cfg.state_path.name + ".refused")
        try:
            os.replace(cfg.state_path, aside)
        except OSError as err:
            raise StartError([f"{e}; cannot move it aside: {err}"], EXIT_FAILURE) from None
        log.error("%s; moved to %s, its leftovers (if any) are not undone", e, aside)
        return None


def deregister_etcd(cfg: Config) -> list[str]:
    """`podrouter cleanup` with etcd discovery: delete this node's key now (a stopped daemon left it
    to its lease's TTL), so every peer drops the node at once."""
    from podrouter.discovery.etcd import EtcdClient, _b64  # lazy: only an etcd node's cleanup loads it

    key = cfg.discovery.etcd.prefix + "/nodes/" + cfg.node.name
    try:
        reply = EtcdClient(cfg.discovery.etcd).call("/v3/kv/deleterange", {"key": _b64(key)}, timeout=3.0)
    except Exception as e:  # noqa: BLE001 - cleanup goes on; the lease runs out anyway
        return [f"etcd: could not delete {key} (it expires with its lease): {e}"]
    try:
        deleted = int(reply.get("deleted", 0) or 0)
    except (TypeError, ValueError):
        deleted = 0
    return [f"removed etcd key {key}"] if deleted else []


__all__ = [
    "adopt",
    "deregister_etcd",
    "mark_stopped",
    "process_age",
    "recorded_api_pods",
    "remove_tun",
    "tun_kind",
]
