"""Cluster mesh: route to the pods of other clusters by their pod IPs (docs/clustermesh.md).

Each `clustermesh.clusters[]` entry names a remote cluster and its etcd. A `RemoteCluster` watches
that etcd's `<prefix>/nodes/` read-only (the same list + watch as etcd discovery, without
registering anything there) and turns every remote node into a peer named `<cluster>.<node>`, with
the cluster's `mode` / `tunnel_protocol` as its per-peer override. `MeshDiscovery` wraps this
node's own discovery and adds those peers after the local ones, so the daemon routes them by the
same per-destination rules, and the datapath's ingress checks (outer source a known peer, inner
source inside that peer's pod CIDRs) apply to them unchanged.

Remote entries are untrusted. One is refused, with the reason in `status`, when it is malformed,
when a pod CIDR overlaps this cluster's pod CIDRs (a node of another cluster cannot claim ours), or
when it overlaps a node already accepted from another cluster (the earlier cluster in the list
wins); the rest of the mesh keeps working. When a remote etcd cannot be reached the last known
nodes of that cluster stay (the watch keeps what it had and re-lists once etcd answers again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from podrouter.config import Config, IPNetwork, MeshClusterConfig, PeerConfig
from podrouter.discovery.base import Discovery, PeerSet
from podrouter.discovery.etcd import MAX_NODES, EtcdDiscovery, parse_entry

log = logging.getLogger("podrouter.clustermesh")

SOURCE_PREFIX = "cluster:"


def peer_name(cluster: str, node: str) -> str:
    return f"{cluster}.{node}"


def is_mesh_source(source: str) -> bool:
    return source.startswith(SOURCE_PREFIX)


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)  # type: ignore[arg-type]


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
        with self.lock:
            for key, why in rejected.items():
                if self._rejected.get(key) != why:
                    log.warning("cluster mesh %s: ignoring %s: %s", self.mesh.name, key, why)
            changed = found != self._found
            self._found = found
            self._rejected = rejected
        if changed:
            self._notify()

    def _select(self, entries: list[tuple[str, int, str]]) -> tuple[dict[str, PeerConfig], dict[str, str]]:
        accepted: dict[str, PeerConfig] = {}
        rejected: dict[str, str] = {}
        addresses: dict[Any, str] = {}
        for n, (key, _rev, value) in enumerate(entries):  # oldest registration first: it wins
            if not key.startswith(self.prefix):
                continue
            if n >= MAX_NODES:
                rejected[key] = f"more than {MAX_NODES} entries under {self.prefix} (the oldest are used)"
                continue
            peer, why = parse_entry(key, value, self.prefix)
            if peer is None:
                rejected[key] = why or "invalid"
                continue
            why = self._conflict(peer, accepted)
            if why is None and peer.address in addresses:
                why = f"address {peer.address} is already {addresses[peer.address]}'s"
            if why is not None:
                rejected[key] = why
                continue
            accepted[peer.name] = peer
            addresses[peer.address] = peer.name
        return accepted, rejected

    def _conflict(self, peer: PeerConfig, accepted: dict[str, PeerConfig]) -> str | None:
        space = self.mesh.pod_cidrs
        for net in peer.pod_cidrs:
            # a claim on our own space first: it is the one that matters
            for own in self.local_cluster_cidrs:
                if _overlaps(net, own):
                    return f"pod CIDR {net} overlaps this cluster's ({self.local_name}) pod CIDR {own}"
            if space and not any(net.version == s.version and net.subnet_of(s) for s in space):  # type: ignore[arg-type]
                declared = ", ".join(str(s) for s in space)
                return f"pod CIDR {net} is outside cluster {self.mesh.name}'s pod CIDRs ({declared})"
        for other in accepted.values():
            if other.name != peer.name and any(
                _overlaps(n, o) for n in peer.pod_cidrs for o in other.pod_cidrs
            ):
                return f"pod CIDRs overlap those of {self.mesh.name} node {other.name}"
        return None

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
        out: list[PeerConfig] = []
        rejects: dict[str, str] = {}
        taken: list[tuple[str, IPNetwork]] = []
        for r in self.remotes:
            c = r.mesh
            for node, p in sorted(r.nodes().items()):
                name = peer_name(c.name, node)
                clash = next(
                    ((who, o) for n in p.pod_cidrs for who, o in taken if _overlaps(n, o)),
                    None,
                )
                if clash is not None:
                    rejects[name] = f"pod CIDRs overlap {clash[0]}'s {clash[1]} (an earlier cluster wins)"
                    continue
                taken.extend((name, n) for n in p.pod_cidrs)
                out.append(
                    replace(
                        p,
                        name=name,
                        mode=c.mode,
                        tunnel_protocol=c.tunnel_protocol,
                        geneve_payload=c.geneve_payload,
                    )
                )
        return out, rejects

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
