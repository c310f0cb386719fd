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

    def update_config(self, cfg: object) -> None: ...

    def status(self) -> dict[str, object]: ...

    def stop(self) -> None: ...
