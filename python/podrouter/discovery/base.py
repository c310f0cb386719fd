"""The discovery interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from podrouter.config import PeerConfig

PeerSet = tuple[PeerConfig, ...]


class Discovery(Protocol):
    name: str

    def start(self, on_change: Callable[[str], None]) -> None: ...

    def peers(self) -> PeerSet: ...

    def sources(self) -> dict[str, str]:
        """Peer name -> where it came from (`static`, `etcd`, `cluster:<name>`)."""
        ...

    def update_config(self, cfg: object) -> None: ...

    def status(self) -> dict[str, object]: ...

    def mesh_status(self) -> dict[str, object]:
        """`status` -> clustermesh (docs/clustermesh.md); {} without a cluster mesh."""
        ...

    def stop(self, revoke: bool = True) -> None:
        """Stop watching. `revoke=False` (a daemon stopping for a successor) leaves this node's
        registration to run out its TTL instead of withdrawing it at once."""
        ...
