"""Cluster mesh: route to the pods of other clusters by their pod IPs (docs/clustermesh.md).

Each `clustermesh.clusters[]` entry names a remote cluster and its etcd. A `RemoteCluster` watches
that etcd's `<prefix>/nodes/` read-only (the same list + watch as etcd discovery, without
registering anything there) and turns every remote node into a peer named `<cluster>.<node>`, with
the cluster's `mode` / `tunnel_protocol` as its per-peer override. `MeshDiscovery` wraps this
node's own discovery and adds those peers after the local ones, so the daemon routes them by the
same per-destination rules, and the datapath's ingress checks (outer source a known peer, inner
source inside that peer's pod CIDRs) apply to them unchanged.

Remote entries are untrusted. One is refused, with the reason in `status`, when it is malformed,
when a pod CIDR overlaps this cluster's pod CIDRs (a node of another cluster cannot claim ours) or
lies outside its cluster's declared `pod_cidrs`, when its address is an older node's of that
cluster or inside its declared pod space, or when it overlaps a node already accepted from the
same cluster (the oldest wins) or from another cluster (the earlier cluster in the list wins); the
rest of the mesh keeps working.
These relations are the core's rulebook (`discovery.base.refuse_by_rulebook`), worded here. When a
remote etcd cannot be reached the last known nodes of that cluster stay (the watch keeps what it
had and re-lists once etcd answers again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from podrouter.config import Config, MeshClusterConfig, PeerConfig, engine_settings, table_spec
from podrouter.discovery.base import Discovery, Other, PeerSet, Verdict, cidr_index, refuse_by_rulebook
from podrouter.discovery.etcd import MAX_NODES, EtcdDiscovery, parse_entry
from podrouter.native import Problem

log = logging.getLogger("podrouter.clustermesh")

SOURCE_PREFIX = "cluster:"


def peer_name(cluster: str, node: str) -> str:
    return f"{cluster}.{node}"


def is_mesh_source(source: str) -> bool:
    return source.startswith(SOURCE_PREFIX)


def _unknown_node(cfg: Config) -> dict[str, Any]:
    """Engine settings without this node's address: remote nodes are judged against this
    cluster's pod space and each other, never against this node's underlay."""
    return engine_settings("0.0.0.0", None, cfg.masquerade.port_range, None)


# between clusters only pod CIDRs must be disjoint (each cluster's own registry was judged by the
# rest; its space and addresses are its own)
_CROSS_SKIP = (
    "name_is_node",
    "name_taken",
    "address_is_node",
    "address_family",
    "address_taken",
    "cluster_contains_peer_address",
    "pod_cidr_outside_cluster",
)


def _cross_why(prob: Problem, other: Other) -> Verdict:
    """The one rule between clusters: pod CIDRs of nodes of different clusters are disjoint."""
    if prob.code == "pod_cidr_overlap" and other is not None and other[0] == "peer":
        return (
            cidr_index(prob),
            0,
        ), f"pod CIDRs overlap {other[1]}'s {prob.values[1]} (an earlier cluster wins)"
    return None


class RemoteCluster(EtcdDiscovery):
    """A read-only watch of one remote cluster's node registry."""

    def __init__(self, cfg: Config, mesh: MeshClusterConfig) -> None:
        remote = replace(cfg, discovery=replace(cfg.discovery, backend="etcd", etcd=mesh.etcd), peers=())
        super().__init__(remote, "0.0.0.0")
        self.mesh = mesh
        self.local_cluster_cidrs = cfg.cluster_cidrs
        self.local_name = cfg.cluster_name
        # never our own key: nothing in the remote registry is "this node"
        self.key = ""

    def start(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        t = threading.Thread(target=self._watch_loop, name=f"podrouter-mesh-{self.mesh.name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _reput(self) -> None:  # read-only: never writes to a remote etcd
        return

    def _recompute(self) -> None:
        """The remote cluster's usable nodes from the mirrored registry (replaces the local-cluster
        rules of etcd discovery: a remote node is judged against this cluster's space instead)."""
        with self.lock:
            entries = sorted(((k, rev, v) for k, (rev, v) in self._kvs.items()), key=lambda e: (e[1], e[0]))
        found, rejected = self._select(entries)
        self._publish(found, rejected)

    def _refused_label(self) -> str:
        return f"cluster mesh {self.mesh.name} entry"

    def _select(self, entries: list[tuple[str, int, str]]) -> tuple[dict[str, PeerConfig], dict[str, str]]:
        """The remote cluster's usable nodes and its refused keys (key -> why) from `entries`, oldest
        registration first (it wins): each record's shape here (`parse_entry`), its relations with
        this cluster's pod space and the older records the core's (`_refuse`)."""
        candidates: list[tuple[str, PeerConfig]] = []
        rejected: dict[str, str] = {}
        for n, (key, _rev, value) in enumerate(entries):
            if not key.startswith(self.prefix):
                continue
            if n >= MAX_NODES:
                rejected[key] = f"more than {MAX_NODES} entries under {self.prefix} (the oldest are used)"
                continue
            peer, why = parse_entry(key, value, self.prefix)
            if peer is None:
                rejected[key] = why or "invalid"
                continue
            candidates.append((key, peer))
        kept, refused = self._refuse((), candidates)
        rejected.update(refused)
        return {peer.name: peer for _key, peer in kept}, rejected

    def _conflict(self, peer: PeerConfig, accepted: dict[str, PeerConfig]) -> str | None:
        """Why `peer` is refused next to the `accepted` nodes of this remote cluster (which win), or
        None."""
        _kept, rejected = self._refuse(tuple(accepted.values()), [(peer.name, peer)])
        return rejected.get(peer.name)

    def _refuse(
        self, fixed: tuple[PeerConfig, ...], candidates: list[tuple[str, PeerConfig]]
    ) -> tuple[list[tuple[str, PeerConfig]], dict[str, str]]:
        """The core's rulebook on the remote nodes: one spec whose node holds this cluster's pod
        CIDRs (a remote node claiming them overlaps "the node's") and whose cluster CIDRs are the
        remote cluster's declared `pod_cidrs` (its nodes must lie inside; undeclared: anywhere)."""
        node = replace(self.cfg.node, pod_cidrs=tuple(self.local_cluster_cidrs))

        def spec_of(peers: list[dict[str, Any]]) -> dict[str, Any]:
            c = self.cfg
            return table_spec(node, self.mesh.pod_cidrs, c.routing, c.tunnel, c.masquerade, peers)

        # names may repeat across clusters (ours too); the node's address is not known here
        skip = ["name_is_node", "address_family", "address_is_node"]
        if not self.mesh.pod_cidrs:
            skip.append("pod_cidr_outside_cluster")  # no declared space: anywhere outside ours
        return refuse_by_rulebook(spec_of, _unknown_node(self.cfg), fixed, candidates, self._why, skip)

    def _why(self, prob: Problem, other: Other) -> Verdict:
        """A problem of the core worded for a remote record; the order of rank: a claim on our own
        space first (it is the one that matters), then the declared space, per pod CIDR; then the
        other remote nodes' pod CIDRs and addresses."""
        v = prob.values
        if prob.code == "pod_cidr_overlap" and other is not None:
            if other[0] == "node":
                return (0, 2 * cidr_index(prob)), (
                    f"pod CIDR {v[0]} overlaps this cluster's ({self.local_name}) pod CIDR {v[1]}"
                )
            return (1, 0), f"pod CIDRs overlap those of {self.mesh.name} node {other[1]}"
        if prob.code == "pod_cidr_outside_cluster" and self.mesh.pod_cidrs:
            declared = ", ".join(str(s) for s in self.mesh.pod_cidrs)
            return (0, 2 * cidr_index(prob) + 1), (
                f"pod CIDR {v[0]} is outside cluster {self.mesh.name}'s pod CIDRs ({declared})"
            )
        if prob.code == "address_taken" and other is not None:
            return (2, 0), f"address {v[0]} is already {other[1]}'s"
        if prob.code == "cluster_contains_peer_address":
            return (3, 0), f"address {v[1]} is inside cluster {self.mesh.name}'s pod CIDR {v[0]}"
        return None  # the core's message stands

    def nodes(self) -> dict[str, PeerConfig]:
        with self.lock:
            return dict(self._found)

    def view(self) -> dict[str, Any]:
        with self.lock:
            connected = self._state == "connected"
            return {
                "name": self.mesh.name,
                "id": self.mesh.id,
                "endpoint": self.client.endpoint,
                "state": "connected"
                if connected
                else (
                    f"unreachable, keeping {len(self._found)} last known nodes"
                    if self._found
                    else "unreachable"
                ),
                "connected": connected,
                "revision": self._revision,
                "mode": self.mesh.mode,
                "pod_cidrs": [str(c) for c in self.mesh.pod_cidrs],
                "tunnel_protocol": self.mesh.tunnel_protocol,
                "nodes": {
                    n: {"address": str(p.address), "pod_cidrs": [str(c) for c in p.pod_cidrs]}
                    for n, p in sorted(self._found.items())
                },
                "rejected": dict(self._rejected),
            }


def _tagged(on_change: Callable[[str], None], tag: str) -> Callable[[str], None]:
    return lambda reason: on_change(f"{tag}: {reason}")


class MeshDiscovery:
    """This node's discovery plus the peers of every remote cluster."""

    name = "mesh"

    def __init__(self, cfg: Config, local: Discovery) -> None:
        self.cfg = cfg
        self.local = local
        self.remotes = [RemoteCluster(cfg, c) for c in cfg.clustermesh.clusters]
        self.lock = threading.Lock()
        self._cross_rejects: dict[str, str] = {}  # peer name -> why (an overlap between clusters)

    def start(self, on_change: Callable[[str], None]) -> None:
        self.local.start(on_change)
        for r in self.remotes:
            r.start(_tagged(on_change, f"cluster {r.mesh.name}"))

    def _mesh_peers(self) -> tuple[list[PeerConfig], dict[str, str]]:
        """Every remote cluster's nodes as peers (`<cluster>.<node>`, with the cluster's overrides),
        less those whose pod CIDRs overlap a node of an earlier cluster in the list (it wins): the
        core's overlap rule (`refuse_by_rulebook`) on one spec of them all, in that order."""
        candidates: list[tuple[str, PeerConfig]] = []
        for r in self.remotes:
            c = r.mesh
            for node, p in sorted(r.nodes().items()):
                name = peer_name(c.name, node)
                peer = replace(
                    p,
                    name=name,
                    mode=c.mode,
                    tunnel_protocol=c.tunnel_protocol,
                    geneve_payload=c.geneve_payload,
                )
                candidates.append((name, peer))
        cfg = self.cfg
        nobody = replace(cfg.node, pod_cidrs=())

        def spec_of(peers: list[dict[str, Any]]) -> dict[str, Any]:
            return table_spec(nobody, (), cfg.routing, cfg.tunnel, cfg.masquerade, peers)

        kept, rejects = refuse_by_rulebook(
            spec_of, _unknown_node(cfg), (), candidates, _cross_why, _CROSS_SKIP
        )
        return [p for _name, p in kept], rejects

    def peers(self) -> PeerSet:
        local = tuple(self.local.peers())
        mesh, rejects = self._mesh_peers()
        with self.lock:
            for name, why in rejects.items():
                if self._cross_rejects.get(name) != why:
                    log.warning("cluster mesh: ignoring %s: %s", name, why)
            self._cross_rejects = rejects
        return local + tuple(mesh)

    def sources(self) -> dict[str, str]:
        out: dict[str, str] = dict(self.local.sources())
        for r in self.remotes:
            for node in r.nodes():
                out[peer_name(r.mesh.name, node)] = SOURCE_PREFIX + r.mesh.name
        return out

    def update_config(self, cfg: object) -> None:
        assert isinstance(cfg, Config)
        self.cfg = cfg
        self.local.update_config(cfg)

    def status(self) -> dict[str, object]:
        return self.local.status()

    def mesh_status(self) -> dict[str, object]:
        """`status` -> clustermesh: this cluster, then each remote cluster with its nodes and state."""
        clusters = []
        with self.lock:
            cross = dict(self._cross_rejects)
        for r in self.remotes:
            v = r.view()
            prefix = f"{r.mesh.name}."
            v["rejected"].update({k: why for k, why in cross.items() if k.startswith(prefix)})
            clusters.append(v)
        return {"cluster": {"name": self.cfg.cluster_name, "id": self.cfg.cluster_id}, "clusters": clusters}

    def stop(self, revoke: bool = True) -> None:
        for r in self.remotes:
            r.stop()
        self.local.stop(revoke=revoke)


__all__ = ["MeshDiscovery", "RemoteCluster", "is_mesh_source", "peer_name"]
