"""What the daemon's collaborators need of it, as Protocols (typed collaborators, not `Any`).

handover.py and keeper.py are handed the daemon (or parts of it); they name here the few attributes
and calls they use, so mypy checks the daemon against them and a reader sees the whole contact
surface in one place. Only types: importing this module costs nothing at run time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from podrouter._native import Datapath
    from podrouter.config import Config


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
