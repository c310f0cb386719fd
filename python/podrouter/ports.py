"""What the daemon's collaborators need of it, as Protocols (typed collaborators, not `Any`).

handover.py, keeper.py, status.py, podapi.py and shutdown.py are handed the daemon (or parts of
it); they name here the attributes and calls they use, so mypy checks the daemon against them and a
reader sees the whole contact surface in one place. Only types: importing this module costs nothing
at run time (its imports are for the type checker only), and none of those modules imports the
daemon.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import socket

    from podrouter._native import Datapath, Tables
    from podrouter.api import ApiServer
    from podrouter.bgp import BgpSpeaker
    from podrouter.config import Config
    from podrouter.discovery.base import Discovery
    from podrouter.metrics import MetricsServer
    from podrouter.monitor import MonitorHub
    from podrouter.netlink import IPRoute
    from podrouter.netlink.neigh import NeighborWatcher
    from podrouter.netlink.plumbing import Plumbing
    from podrouter.netlink.underlay import Masquerade6, Underlay
    from podrouter.plan import PeerView, RoutePlan
    from podrouter.pods import PodRegistry


class SavesState(Protocol):
    """The plumbing, as a handover that failed late uses it: write this daemon's state file again."""

    def save(self) -> None: ...


class HandsOver(Protocol):
    """The running daemon, as the `handover` API op (handover.Server) uses it."""

    # written by the handover: True while the workers are quiesced for a successor
    handing_over: bool

    @property
    def cfg(self) -> Config: ...

    @property
    def ready(self) -> bool: ...

    @property
    def datapath(self) -> Datapath | None: ...

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """Held while the workers stop: no table swap or reconcile meanwhile."""
        ...

    @property
    def plumbing(self) -> SavesState | None: ...

    def _datapath_config(self) -> dict[str, Any]: ...

    def handed_over(self) -> None:
        """A successor runs on this daemon's datapath: stop and leave its state to the successor."""
        ...


class TakesOver(Protocol):
    """The daemon started with --handover, as handover.Pending uses it until its first tables."""

    # set to the datapath taken over from the running daemon
    datapath: Datapath | None

    @property
    def cfg(self) -> Config: ...

    def _datapath_config(self) -> dict[str, Any]: ...


class KeptDatapath(Protocol):
    """A datapath whose fds the fd keeper (keeper.py) holds while no daemon runs."""

    def keeper_fds(self) -> dict[str, Any]: ...


class Reports(Protocol):
    """The running daemon, as the read-only reporting (status.py: `status`, `explain`, the counters
    and what /metrics serves) reads it. Everything but the datapath's counters is read under `lock`."""

    @property
    def cfg(self) -> Config: ...

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def ready_after(self) -> float: ...

    @property
    def forwarding_after(self) -> float: ...

    @property
    def adopted(self) -> bool: ...

    @property
    def started_at(self) -> float: ...

    @property
    def generation(self) -> int: ...

    @property
    def underlay(self) -> Underlay | None: ...

    @property
    def masq6(self) -> Masquerade6 | None: ...

    @property
    def peer_views(self) -> list[PeerView]: ...

    @property
    def peer_rejects(self) -> dict[str, str]: ...

    @property
    def route_plan(self) -> list[RoutePlan]: ...

    @property
    def route_errors(self) -> list[str]: ...

    @property
    def timings(self) -> dict[str, Any]: ...

    @property
    def plumbing(self) -> Plumbing | None: ...

    @property
    def pods(self) -> PodRegistry: ...

    @property
    def discovery(self) -> Discovery | None: ...

    @property
    def bgp(self) -> BgpSpeaker | None: ...

    @property
    def datapath(self) -> Datapath | None: ...

    @property
    def tables(self) -> Tables | None: ...

    @property
    def pod_guard_key(self) -> tuple[Any, ...] | None:
        """The pod egress guard's contents (None: no guard, its drops are not split out)."""
        ...


class Abandons(Protocol):
    """A forward-first datapath (startup.FastStart) that the start did not take over."""

    def abandon(self) -> None: ...


class ClosesWriter(Protocol):
    """The forwarding snapshot's writer thread (startup.SnapshotWriter)."""

    def close(self, flush: bool, timeout: float = 10.0) -> None: ...


class AwaitsRelease(Protocol):
    """The old daemon's side of a handover (handover.Server): told when the API socket and the
    metrics port are closed, so the successor may bind them."""

    def released(self) -> None: ...


class Stops(Protocol):
    """The daemon, as its stop choreography (shutdown.py) takes it apart. The attributes it sets
    are the parts it closed (None after) and `ready`."""

    ready: bool
    datapath: Datapath | None
    # the metrics port taken before ready, not yet handed to the metrics server
    metrics_sock: socket.socket | None
    pod_guard_key: tuple[Any, ...] | None

    @property
    def cfg(self) -> Config: ...

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    @property
    def fast(self) -> Abandons | None:
        """A forward-first datapath not taken over (a start that failed early)."""
        ...

    @property
    def owns_record(self) -> bool:
        """The state file is this daemon's to mark stopped (not after a handover)."""
        ...

    @property
    def bgp(self) -> BgpSpeaker | None: ...

    @property
    def metrics(self) -> MetricsServer | None: ...

    @property
    def api(self) -> ApiServer | None: ...

    @property
    def monitor(self) -> MonitorHub | None: ...

    @property
    def discovery(self) -> Discovery | None: ...

    @property
    def watcher(self) -> NeighborWatcher | None: ...

    @property
    def handover_server(self) -> AwaitsRelease | None: ...

    @property
    def pods(self) -> PodRegistry: ...

    @property
    def plumbing(self) -> Plumbing | None: ...

    @property
    def ipr(self) -> IPRoute | None: ...

    @property
    def snapshots(self) -> ClosesWriter: ...


class ServesPods(Protocol):
    """The daemon, as the API's pod operations (podapi.py) change it: under `lock`, the registry
    and then a reconcile, whose route errors the answer reports."""

    @property
    def cfg(self) -> Config: ...

    @property
    def lock(self) -> AbstractContextManager[Any]: ...

    @property
    def pods(self) -> PodRegistry: ...

    @property
    def route_errors(self) -> list[str]: ...

    def _reconcile_locked(self, reason: str) -> None: ...
