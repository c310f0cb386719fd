"""Static discovery: the peers are exactly the config's `peers:` (re-read on SIGHUP)."""

from __future__ import annotations

from collections.abc import Callable

from podrouter.config import Config
from podrouter.discovery.base import PeerSet


class StaticDiscovery:
    name = "static"

    def __init__(self, cfg: Config) -> None:
        self._peers: PeerSet = cfg.peers

    def start(self, on_change: Callable[[str], None]) -> None:
        pass  # nothing changes between reloads

    def peers(self) -> PeerSet:
        return self._peers

    def sources(self) -> dict[str, str]:
        return dict.fromkeys((p.name for p in self._peers), "static")

    def update_config(self, cfg: object) -> None:
        assert isinstance(cfg, Config)
        self._peers = cfg.peers

    def status(self) -> dict[str, object]:
        return {"backend": "static", "peers": len(self._peers)}

    def mesh_status(self) -> dict[str, object]:
        return {}

    def stop(self, revoke: bool = True) -> None:
        pass
