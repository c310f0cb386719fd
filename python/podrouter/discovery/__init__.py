"""Peer discovery: where the daemon learns about the other nodes.

A backend has `start(on_change)`, `peers() -> list[PeerConfig]` and `stop()`. `on_change()` is called
(from the backend's thread) whenever the peer set may have changed; the daemon then reconciles.

- `static`: the `peers:` of the config file (the embedded default).
- `etcd`: registers this node in etcd under `<prefix>/nodes/<name>` with a lease, and watches the
  prefix for the others. Peers written in the config are kept as well (and win over a discovered
  node of the same name, so a per-peer `mode` / `tunnel_protocol` override still applies).
"""

from __future__ import annotations

from podrouter.config import Config
from podrouter.discovery.base import Discovery, PeerSet
from podrouter.discovery.static import StaticDiscovery


def make(cfg: Config, node_address: str) -> Discovery:
    if cfg.discovery.backend == "etcd":
        from podrouter.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(cfg, node_address)
    return StaticDiscovery(cfg)


__all__ = ["Discovery", "PeerSet", "StaticDiscovery", "make"]
