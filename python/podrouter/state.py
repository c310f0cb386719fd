"""The daemon's record of what it installed, so that `podrouter cleanup` can undo a killed daemon.

One JSON file per node (`Config.state_path`, next to the API socket), rewritten atomically
(write to a temporary file, fsync, rename) after every change, so a crash at any point leaves either
the old or the new record, never half of one. It records the network namespace it was written in:
cleanup refuses to act on a record from another namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1


@dataclass
class State:
    node: str
    netns: str
    pid: int
    socket: str | None = None
    tun: str | None = None
    routes: list[dict[str, Any]] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)
    # sysctl key -> the value before podrouter changed it (restored on exit and by cleanup)
    sysctls: dict[str, str] = field(default_factory=dict)
    # pod name -> {"ip", "ips", "host_interface", "annotations", "source"}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # interface -> the link-local pod gateway address podrouter put on it (dual-stack pods' veths)
    gateways6: dict[str, str] = field(default_factory=dict)
    nft_guard: bool = False  # the masquerade reply guard (nftables table ip podrouter) is installed
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> State:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a podrouter state file of format {FORMAT}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def save(path: Path, state: State) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load(path: Path) -> State | None:
    """The recorded state, or None if there is no file. Raises ValueError for a corrupt one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return State.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: corrupt state file: {e}") from None


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
