"""The discovery interface."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

from podrouter.config import IPNetwork, PeerConfig

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


class NetIndex:
    """Disjoint networks per address family, for an O(log n) "does this overlap anything?"."""

    def __init__(self) -> None:
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._items: dict[int, list[tuple[int, int, str, IPNetwork]]] = {4: [], 6: []}

    def find(self, net: IPNetwork) -> tuple[str, IPNetwork] | None:
        s, e = int(net.network_address), int(net.broadcast_address)
        starts, items = self._starts[net.version], self._items[net.version]
        # the intervals are disjoint: only the last one starting at or before `e` can reach `s`
        i = bisect.bisect_right(starts, e)
        if i and items[i - 1][1] >= s:
            return items[i - 1][2], items[i - 1][3]
        return None

    def add(self, net: IPNetwork, owner: str) -> None:
        s = int(net.network_address)
        i = bisect.bisect_right(self._starts[net.version], s)
        self._starts[net.version].insert(i, s)
        self._items[net.version].insert(i, (s, int(net.broadcast_address), owner, net))
