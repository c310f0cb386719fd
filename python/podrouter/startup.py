"""Forward first on restart (docs/architecture.md, "Forward first"; docs/operations.md).

A restarted `podrouter run` used to forward nothing until its whole start was done (imports of
pyroute2 and the daemon's modules, netlink dumps, the reconcile): a flow stalled for the start plus
one TCP retransmission backoff step. Now the running daemon keeps a *forwarding snapshot* next to
its state file, `<api.socket dir>/<node>.forwarding.json`, rewritten (temp file + rename) whenever
its tables change: everything the Rust workers need to forward,

    {"format": 1, "node": "node1", "config_sha256": "<hex>", "pid": 123,
     "dp_config": {...the Datapath config...}, "spec": {...the compiled table spec...},
     "nat_snapshot": "<api dir>/node1.nat", "keeper": "<api dir>/node1.keeper"}

and a restarting `podrouter run`, once its config is loaded and before it imports the daemon
(pyroute2, nftables, discovery, ...), reads it (`forward_first`), takes the TUN queue and socket fds
from the fd keeper (keeper.py), compiles the snapshot's tables and starts the workers. The normal
start then runs with the workers already forwarding: it resolves the underlay, adopts the state and
reconciles as before, keeps the running datapath when its config is the same (else stops it and
opens its own) and swaps in freshly compiled tables when they differ from the snapshot's.

The file is untrusted input: it is read without following a symlink, must be a regular file of
this uid that nobody else can write, at most MAX_BYTES, JSON of the right shape and format version,
for this node and for a config file with the same SHA-256 as the one loaded, naming the NAT
snapshot and keeper paths this config implies; the engine then validates the datapath config and the
table spec itself. Anything wrong means the normal start (the reason is logged), never a crash; and
a snapshot that passes but is out of date forwards on old tables only until the first reconcile.

No fast start when a daemon still answers on the API socket or the state file names a live pid
(the handover is for that), with --handover, or without a keeper to take the fds from.

This module is imported before the daemon: only the standard library at the top.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from podrouter import jsonfile

if TYPE_CHECKING:
    from podrouter._native import Datapath, Tables
    from podrouter.config import Config

FORMAT = 1
MAX_BYTES = 32 << 20  # a spec with thousands of peers is a few MB
SUFFIX = ".forwarding.json"
# the datapath config keys the snapshot must carry, with their types (the engine checks the values)
DP_KEYS: dict[str, type | tuple[type, ...]] = {
    "tun_name": str,
    "workers": int,
    "underlay_address": str,
    "underlay_ifindex": int,
    "vxlan_port": int,
    "geneve_port": int,
}


class SnapshotError(ValueError):
    """The forwarding snapshot is not used; the message says why."""


def process_age() -> float:
    """Seconds since this process started (from /proc: imports included), 0.0 if unknown."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # the command name may hold spaces and parentheses: fields count from the last ')'
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def snapshot_path(cfg: Config) -> Path:
    """`<api.socket dir>/<node>.forwarding.json`, next to the state file."""
    return Path(cfg.state_path).with_name(f"{cfg.node.name}{SUFFIX}")


def config_hash(path: str | os.PathLike[str] | None) -> str | None:
    """SHA-256 of the config file's bytes (None without a file or when it cannot be read)."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _nat_path(cfg: Config) -> str:
    return str(Path(cfg.state_path).with_name(f"{cfg.node.name}.nat"))


def _keeper_path(cfg: Config) -> str:
    from podrouter import keeper  # not at the top: this module is the standard library's only (above)

    return keeper.socket_path(cfg)


def payload(cfg: Config, chash: str, dp_config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The snapshot a daemon writes for the tables it runs (`spec` as compiled)."""
    return {
        "format": FORMAT,
        "node": cfg.node.name,
        "config_sha256": chash,
        "pid": os.getpid(),
        "written_at": time.time(),
        "dp_config": dp_config,
        "spec": spec,
        "nat_snapshot": _nat_path(cfg),
        "keeper": _keeper_path(cfg),
    }


def write(path: Path, data: dict[str, Any]) -> None:
    """Atomically (temp file in the same directory, then rename), mode 0600."""
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class SnapshotWriter:
    """Writes the forwarding snapshot on its own thread, latest wins.

    The reconcile hands over the tables' spec under the daemon's lock (`submit`: a reference, no
    copy; the spec is never changed after it is compiled); encoding it (1.1 MB at 5000
    peers) and the temp file + rename happen here, off the lock. A submit while a write runs
    replaces the one still waiting: only the newest spec is ever written next. `flush` waits until
    what was submitted is on disk (a stop for a successor: it starts from that file); `close` ends
    the thread, writing what waits only with `flush=True`, so a teardown can remove the file after
    it without the thread writing it again."""

    def __init__(self, path: Path, log: logging.Logger | None = None) -> None:
        self.path = path
        self._log = log
        self._cond = threading.Condition()
        self._next: tuple[Config, str, dict[str, Any], dict[str, Any]] | None = None
        self._busy = False
        self._closed = False
        self.writes = 0  # files written (tests, the timing script)
        self._thread: threading.Thread | None = None

    def submit(self, cfg: Config, chash: str, dp_config: dict[str, Any], spec: dict[str, Any]) -> None:
        with self._cond:
            if self._closed:
                return
            self._next = (cfg, chash, dp_config, spec)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="forwarding-snapshot", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits or is being written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._next is None and not self._busy, timeout)

    def close(self, flush: bool, timeout: float = 10.0) -> None:
        if flush:
            self.flush(timeout)
        with self._cond:
            self._closed = True
            self._next = None
            self._cond.notify_all()
            # a write already under way finishes first (a teardown removes the file after it)
            self._cond.wait_for(lambda: not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._next is not None or self._closed)
                if self._closed:
                    return
                assert self._next is not None
                job, self._next = self._next, None
                self._busy = True
            try:
                write(self.path, payload(*job))
                self.writes += 1
            except Exception:  # noqa: BLE001 - the next start is the normal one
                if self._log is not None:
                    self._log.exception("writing the forwarding snapshot")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def read(path: Path, cfg: Config, chash: str | None) -> dict[str, Any] | None:
    """The validated snapshot for `cfg` (whose file hashes to `chash`); None if there is none.
    Raises SnapshotError naming the problem for one that must not be used."""
    try:
        data = jsonfile.read(path, MAX_BYTES, private=True)
    except jsonfile.Refused as e:
        raise SnapshotError(str(e)) from None
    if data is None:
        return None
    return validate(data, cfg, chash)


def validate(data: Any, cfg: Config, chash: str | None) -> dict[str, Any]:
    """The checks of `read` on parsed JSON (untrusted)."""
    if not isinstance(data, dict):
        raise SnapshotError("not a JSON object")
    if data.get("format") != FORMAT:
        raise SnapshotError(f"format {str(data.get('format'))[:20]!r}, not {FORMAT}")
    if data.get("node") != cfg.node.name:
        raise SnapshotError(f"written for node {str(data.get('node'))[:80]!r}, not {cfg.node.name!r}")
    if chash is None:
        raise SnapshotError("the config file cannot be hashed")
    if data.get("config_sha256") != chash:
        raise SnapshotError("written for another version of the config file (its SHA-256 differs)")
    dp = data.get("dp_config")
    if not isinstance(dp, dict):
        raise SnapshotError("dp_config: not an object")
    for key, typ in DP_KEYS.items():
        v = dp.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise SnapshotError(f"dp_config.{key}: {str(v)[:40]!r} is not a {getattr(typ, '__name__', typ)}")
    if not 1 <= dp["workers"] <= 64:
        raise SnapshotError(f"dp_config.workers: {dp['workers']} out of range")
    if dp.get("tun_persist") is not True:
        raise SnapshotError("dp_config.tun_persist: not true")
    spec = data.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("node"), dict):
        raise SnapshotError("spec: not a table spec")
    if spec["node"].get("name") != cfg.node.name:
        raise SnapshotError("spec.node.name: not this node")
    if data.get("nat_snapshot") != _nat_path(cfg):
        raise SnapshotError(f"nat_snapshot: {str(data.get('nat_snapshot'))[:200]!r} is not this config's")
    if data.get("keeper") != _keeper_path(cfg):
        raise SnapshotError(f"keeper: {str(data.get('keeper'))[:200]!r} is not this config's")
    return data


def _daemon_running(cfg: Config) -> str | None:
    """Why a predecessor may still run (its API socket answers, or the state file names a live
    pid), else None. The normal start then says what to do."""
    sock = str(cfg.api.socket)
    if os.path.exists(sock):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(sock)
            return f"a daemon answers on {sock}"
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError as e:
            return f"{sock}: {e}"
        finally:
            s.close()
    try:
        with open(cfg.state_path, "rb") as f:
            pid = json.loads(f.read(1 << 20)).get("pid")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None  # the normal start reads (and judges) the state file
    if type(pid) is int and pid > 0 and pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
        return f"the state file names pid {pid}, which runs"
    return None


@dataclass
class FastStart:
    """What `forward_first` started: the Datapath (workers running), its tables and config."""

    datapath: Datapath
    tables: Tables
    spec: dict[str, Any]
    dp_config: dict[str, Any]
    nat_snapshot: str
    forwarding_after: float
    keeper_pid: int

    def fits(self, dp_config: dict[str, Any]) -> bool:
        """The normal start computed the same datapath config (the snapshot's came through JSON:
        tuples as lists)."""
        return spec_key(self.dp_config) == spec_key(dp_config)

    def abandon(self) -> None:
        """Stop this datapath (the keeper still holds its fds, so nothing is detached)."""
        for step in (self.datapath.stop, self.datapath.close):
            with contextlib.suppress(Exception):
                step()


def spec_key(spec: dict[str, Any]) -> str:
    """A table spec without its generation, normalised (tuples and lists alike) for comparing."""
    return json.dumps({k: v for k, v in spec.items() if k != "generation"}, sort_keys=True, default=str)


def forward_first(cfg: Config, log: logging.Logger) -> FastStart | None:
    """Start forwarding from the snapshot, before the rest of the daemon is imported; None (and why,
    in the log) when the normal start has to do it."""
    t0 = time.perf_counter()
    path = snapshot_path(cfg)
    try:
        data = read(path, cfg, config_hash(cfg.path))
    except SnapshotError as e:
        log.warning("forwarding snapshot %s not used: %s", path, e)
        return None
    if data is None:
        return None
    why = _daemon_running(cfg)
    if why is not None:
        log.info("forwarding snapshot not used: %s", why)
        return None
    from podrouter import keeper, native  # not at the top (above): only a forward-first start loads them

    spec = dict(data["spec"])
    spec["generation"] = 1
    dp_config = data["dp_config"]
    try:
        tables = native.compile_tables(spec, dp_config)
    except Exception as e:  # noqa: BLE001 - untrusted input: the engine refuses it
        log.warning("forwarding snapshot %s not used: spec: %s", path, str(e)[:300])
        return None
    dp, pid, why = keeper.take_fds(cfg, dp_config, native.module())
    if dp is None:
        log.info("forwarding snapshot not used: %s", why)
        return None
    try:
        dp.set_nat_snapshot(data["nat_snapshot"])
        dp.start(tables)
    except Exception as e:  # noqa: BLE001 - a port taken, a config the engine refuses, ...
        for step in (dp.stop, dp.close):
            with contextlib.suppress(Exception):
                step()
        log.warning("forwarding snapshot not used: the datapath did not start: %s", str(e)[:300])
        return None
    age = process_age()
    log.info(
        "took the datapath's fds from the fd keeper (pid %d): %s; forwarding from the forwarding "
        "snapshot %.3f s after the process started (%.1f ms); the rest of the start follows",
        pid,
        why,
        age,
        (time.perf_counter() - t0) * 1000,
    )
    return FastStart(dp, tables, spec, dict(dp_config), data["nat_snapshot"], age, pid)


__all__ = [
    "FORMAT",
    "FastStart",
    "SnapshotError",
    "SnapshotWriter",
    "config_hash",
    "forward_first",
    "payload",
    "process_age",
    "read",
    "remove",
    "snapshot_path",
    "spec_key",
    "validate",
    "write",
]
