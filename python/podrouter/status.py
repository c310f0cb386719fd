"""The daemon's read-only reporting: `podrouter status` (the API's `status` op), `explain`, the
datapath's counters (also what /metrics and the monitor's drop reasons read) and the pod list.

Built from the running daemon as ports.Reports describes it; nothing here changes it. Everything
but the datapath's counters and the pods' live tc counters is read under the daemon's lock, so a
status is one consistent generation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from podrouter import api as apimod
from podrouter import guards
from podrouter.config import vtep_mac_of
from podrouter.packets import build_packet
from podrouter.plan import geneve_payload, nat_exhausted_message
from podrouter.ports import Reports

log = logging.getLogger("podrouter")

NAT_LOG_INTERVAL = 10.0  # seconds between two "masquerade range exhausted" log lines


def counters(d: Reports) -> dict[str, Any]:
    """The datapath's counters ({} before it exists), the pod egress guard's drops split out."""
    dp = d.datapath
    if dp is None:
        return {}
    out = dict(dp.counters())
    with contextlib.suppress(Exception):
        out["nat_snapshot"] = dict(dp.nat_snapshot_stats())
    if d.pod_guard_key is not None:
        out["drops"] = guards.pod_guard_counters(dict(out.get("drops") or {}))
    return out


def drop_reasons(d: Reports) -> list[str]:
    """The datapath's drop reasons (the monitor's `--drop` filter checks against them)."""
    return sorted((counters(d).get("drops") or {}).keys())


def pods(d: Reports) -> list[dict[str, Any]]:
    live = d.pods.live_shaping()  # with the tc counters of this moment, outside the lock
    with d.lock:
        return d.pods.statuses(live)


def pod_limits(d: Reports) -> dict[str, int | None]:
    with d.lock:
        return d.pods.limits()


def bgp(d: Reports) -> dict[str, Any]:
    if d.bgp is None:
        return {"enabled": False}
    return dict(d.bgp.status())


def _peers(d: Reports) -> list[dict[str, Any]]:
    peer_paths: dict[str | None, set[str]] = {}
    for r in d.route_plan:
        if r.path != "pod":
            peer_paths.setdefault(r.peer, set()).add(r.path)
    return [
        {
            "name": v.peer.name,
            "address": str(v.peer.address),
            "pod_cidrs": [str(c) for c in v.peer.pod_cidrs],
            "path": "/".join(sorted(peer_paths.get(v.peer.name, ()))),
            "mode": v.peer.mode,
            "tunnel_protocol": v.peer.tunnel_protocol,
            "geneve_payload": geneve_payload(d.cfg, v.peer),
            "on_link": v.on_link,
            "next_hop": str(v.next_hop) if v.next_hop else None,
            "next_hop_mac": v.next_hop_mac,
            # the inner destination of VXLAN frames to it (configured or synthesized)
            "vtep_mac": v.peer.vtep_mac or vtep_mac_of(v.peer.address),
            "source": v.source,
        }
        for v in d.peer_views
    ]


def status(d: Reports) -> dict[str, Any]:
    """The API's `status`: what `podrouter status` prints (docs/operations.md)."""
    with d.lock:
        u = d.underlay
        assert u is not None, "status before preflight resolved the underlay"
        cfg = d.cfg
        return {
            "ready": d.ready,
            "ready_after": round(d.ready_after, 3),
            "forwarding_after": round(d.forwarding_after, 3),
            "adopted": d.adopted,
            "node": cfg.node.name,
            "pid": os.getpid(),
            "uptime": round(time.time() - d.started_at, 1),
            "config": cfg.path,
            "mode": cfg.routing.mode,
            "tunnel": {
                "protocol": cfg.tunnel.protocol,
                "vni": cfg.tunnel.vni,
                "vxlan_port": cfg.tunnel.port_for("vxlan"),
                "geneve_port": cfg.tunnel.port_for("geneve"),
                "geneve_payload": cfg.tunnel.geneve_payload,
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
                str(d.masq6.address) if d.masq6 is not None and cfg.masquerade.enabled else None
            ),
            # our VTEP MAC: the inner source of every VXLAN frame we send; a Flannel-style
            # kernel peer's neighbour and FDB entries for this node must use it
            "vtep_mac": vtep_mac_of(u.address),
            "generation": d.generation,
            "peers": _peers(d),
            "routes": [
                {"dst": str(r.dst), "path": r.path, "dev": r.dev, "mtu": r.mtu, "peer": r.peer}
                for r in d.route_plan
            ],
            "route_errors": list(d.route_errors),
            # routes podrouter wants but another owner's route holds (left alone, not installed)
            "conflicts": list(d.plumbing.conflicts) if d.plumbing is not None else [],
            "rejected_peers": dict(d.peer_rejects),
            "pods": pods(d),
            "discovery": d.discovery.status() if d.discovery else {},
            "bgp": bgp(d),
            "clustermesh": d.discovery.mesh_status() if d.discovery else {},
            "counters": counters(d),
            "timings": dict(d.timings),
        }


def explain(d: Reports, req: dict[str, Any]) -> dict[str, Any]:
    """The API's `explain`: the running tables' verdict on a packet built from the request."""
    try:
        pkt = build_packet(
            str(req.get("src")),
            str(req.get("dst")),
            str(req.get("proto", "icmp")),
            int(req.get("dport") or 0),
        )
    except (ValueError, TypeError) as e:
        raise apimod.ApiError(str(e)) from None
    with d.lock:
        tables, generation = d.tables, d.generation
    if tables is None:
        raise apimod.ApiError("no tables installed yet")
    return {"verdict": dict(tables.classify(pkt)), "generation": generation}


class NatExhaustionLog:
    """Says in the log, at most every NAT_LOG_INTERVAL seconds, when new flows are being refused
    because the masquerade range is exhausted: the metric alone is easy to miss. `check` runs on
    every turn of the daemon's loop and reads the counters at most once a second."""

    def __init__(self) -> None:
        self._checked_at = 0.0
        self._logged = 0  # the nat_exhausted count last logged
        self._logged_at = -NAT_LOG_INTERVAL

    def check(self, d: Reports) -> None:
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            c = counters(d)
            n = int((c.get("drops") or {}).get("nat_exhausted", 0))
            entries = int(c.get("nat_entries", 0) or 0)
        except Exception:  # noqa: BLE001 - a closed datapath is noticed by is_running()
            return
        if n > self._logged and now - self._logged_at >= NAT_LOG_INTERVAL:
            log.warning("%s", nat_exhausted_message(d.cfg, n - self._logged, entries))
            self._logged = n
            self._logged_at = now
