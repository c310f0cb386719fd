"""The fd keeper: no forwarding gap while no daemon runs (docs/handover.md, "Restarts: the fd keeper").

A daemon, once ready, starts a small process (this module's `main`, run by the same interpreter
with `-I -S`, in a session of its own, so neither a SIGKILL of the daemon nor a signal to its
process group reaches it) that holds copies of the fds packets arrive on: the TUN queues, every
worker's tunnel receive sockets and the masquerade reply sockets (the same open file descriptions,
inherited at spawn). While the daemon is
away (SIGTERM, a crash, SIGKILL) the TUN queues stay attached and the sockets bound, so pod packets
wait in the TUN queues and tunnel packets and masquerade replies in the socket buffers instead of
being dropped. The next `podrouter run` takes them from the keeper and adopts them like a handover
(`handover.parse_manifest`, `Datapath.adopt`: every byte and fd from the keeper is untrusted).

The keeper listens on `<api.socket dir>/<node.name>.keeper` (mode 0600; the listening socket is
bound by the daemon and inherited, so it answers from the moment it exists) and serves one JSON
line per connection, from its own uid only (SO_PEERCRED):

* `{"op": "take", "version": 1}`: `{"ok": true, "version": 1, "pid": N, "expect": {...}, "tun":
  [i, ...], "rx": [[i, ...], ...], "masq": i | null, "masq6": i | null}` with the fds (SCM_RIGHTS);
  `expect` is what the spawning daemon's datapath was (`handover.expectations`). The keeper keeps
  its copies: a successor that dies before it runs leaves them to the next one.
* `{"op": "drop", "version": 1}`: it closes every fd, removes its socket, answers `{"ok": true}`
  and exits. Sent by a successor whose config the fds do not fit (before it opens its own TUN
  queues), by every daemon once ready before it starts its own keeper, and by `podrouter cleanup`.
* `{"op": "ping", "version": 1}`: `{"ok": true, "pid": N, "fds": n}`.

This module is imported by the keeper process: only the standard library at the top.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging
    from types import ModuleType

    from podrouter._native import Datapath
    from podrouter.config import Config
    from podrouter.ports import KeptDatapath

VERSION = 1
MAX_LINE = 4096  # a request line
MAX_REPLY = 1 << 16  # a take answer
MAX_FDS = 253  # SCM_MAX_FD
CONN_TIMEOUT = 2.0  # the keeper's wait for a client's line; a client's wait for the keeper
SUN_PATH_MAX = 107
ROLES = ("tun", "rx", "masq", "masq6")


class KeeperError(Exception):
    """The keeper's fds cannot be used; the message says why."""


def _peer(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the other end (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def _line(conn: socket.socket, limit: int, buf: bytes = b"") -> dict[str, Any]:
    """One JSON object line from `conn` (untrusted: bounded, must be an object)."""
    while b"\n" not in buf:
        if len(buf) > limit:
            raise KeeperError("line too long")
        chunk = conn.recv(limit + 1)
        if not chunk:
            raise KeeperError("connection closed")
        buf += chunk
    try:
        obj = json.loads(buf.split(b"\n", 1)[0])
    except (ValueError, UnicodeDecodeError) as e:
        raise KeeperError(f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise KeeperError("not a JSON object")
    return obj


# --------------------------------------------------------------------------------- the keeper


def _held(spec: Any) -> dict[str, Any]:
    """The keeper's argument (from the daemon that spawned it): the fd numbers it inherited."""
    if not isinstance(spec, dict) or spec.get("version") != VERSION:
        raise ValueError("not a version 1 keeper spec")

    def fd(v: Any) -> int:
        if type(v) is not int or v < 3:
            raise ValueError(f"bad fd {v!r}")
        os.fstat(v)  # inherited and open
        return v

    rx = spec.get("rx")
    if not isinstance(rx, list) or not all(isinstance(w, list) for w in rx):
        raise ValueError("rx: not a list of lists")
    return {
        "listen": fd(spec.get("listen")),
        "path": str(spec.get("path")),
        "expect": spec.get("expect") if isinstance(spec.get("expect"), dict) else {},
        "tun": [fd(v) for v in spec.get("tun") or []],
        "rx": [[fd(v) for v in w] for w in rx],
        "masq": None if spec.get("masq") is None else fd(spec["masq"]),
        "masq6": None if spec.get("masq6") is None else fd(spec["masq6"]),
    }


def _flat(held: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The take answer's manifest (indexes) and the fds it names, in order."""
    flat: list[int] = []

    def index(fd: int) -> int:
        flat.append(fd)
        return len(flat) - 1

    manifest = {
        "ok": True,
        "version": VERSION,
        "pid": os.getpid(),
        "expect": held["expect"],
        "tun": [index(fd) for fd in held["tun"]],
        "rx": [[index(fd) for fd in w] for w in held["rx"]],
        "masq": None if held["masq"] is None else index(held["masq"]),
        "masq6": None if held["masq6"] is None else index(held["masq6"]),
    }
    return manifest, flat


def _serve_one(conn: socket.socket, held: dict[str, Any]) -> bool:
    """Answers one request; True when told to drop (the fds are closed, the socket removed)."""
    _, uid = _peer(conn)
    if uid != os.geteuid():
        _send(conn, {"ok": False, "error": "the fd keeper answers its own uid only"})
        return False
    req = _line(conn, MAX_LINE)
    op = req.get("op")
    if req.get("version") != VERSION:
        _send(conn, {"ok": False, "error": f"keeper protocol {str(req.get('version'))[:20]}, not {VERSION}"})
        return False
    manifest, flat = _flat(held)
    if op == "take":
        line = json.dumps(manifest, separators=(",", ":")).encode() + b"\n"
        socket.send_fds(conn, [line], flat)
        return False
    if op == "ping":
        _send(conn, {"ok": True, "version": VERSION, "pid": os.getpid(), "fds": len(flat)})
        return False
    if op == "drop":
        for fd in flat:
            with contextlib.suppress(OSError):
                os.close(fd)
        # before answering: the dropper may bind a new keeper's socket on this path right after
        with contextlib.suppress(OSError):
            os.unlink(held["path"])
        _send(conn, {"ok": True, "version": VERSION, "pid": os.getpid()})
        return True
    _send(conn, {"ok": False, "error": f"unknown op {str(op)[:40]!r}"})
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        held = _held(json.loads(args[0]) if len(args) == 1 else None)
    except (ValueError, OSError) as e:
        print(f"podrouter.keeper: {e} (started by the daemon, not by hand)", file=sys.stderr)
        return 2
    lst = socket.socket(fileno=held["listen"])
    # listen again: SO_PEERCRED of a connection names the process that last called listen(), so
    # from here on clients see this keeper's pid, not the daemon's that bound the socket
    lst.listen(8)
    while True:
        try:
            conn, _ = lst.accept()
        except InterruptedError:
            continue
        with conn:
            conn.settimeout(CONN_TIMEOUT)
            try:
                if _serve_one(conn, held):
                    return 0
            except (OSError, KeeperError):
                continue  # a client that went away or sent garbage: serve the next one


# ----------------------------------------------------------------------------- daemon side


def socket_path(cfg: Config) -> str:
    """`<api.socket dir>/<node.name>.keeper`, next to the state and NAT snapshot files."""
    return os.path.join(os.path.dirname(cfg.api.socket) or ".", f"{cfg.node.name}.keeper")


def _connect(path: str) -> socket.socket | None:
    """A connection to the keeper on `path`; None when there is none (a stale socket file, which
    is removed: its keeper is gone, and with it its fds)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise KeeperError(f"{path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONN_TIMEOUT)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    except BaseException:
        s.close()
        raise
    return s


def _is_keeper(pid: int) -> bool:
    """Whether `pid` runs this module (SO_PEERCRED can also name the daemon that bound the socket,
    for a connection made before the keeper listened itself; never kill that one)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"podrouter.keeper" in f.read()
    except OSError:
        return False


def _kill(pid: int) -> None:
    """The last resort for a keeper that does not answer (its pid from SO_PEERCRED, checked to be
    a keeper): its fds are released once it is gone."""
    import signal
    import time

    if not _is_keeper(pid):
        raise KeeperError(f"the fd keeper does not answer, and pid {pid} is not a keeper process")
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # our own child (a keeper this daemon started)
        time.sleep(0.01)


def drop(path: str) -> int | None:
    """Tell the keeper on `path` to let go of its fds and exit; its pid, or None if none runs.
    One that does not answer is killed. Returns once its fds are closed."""
    conn = _connect(path)
    if conn is None:
        return None
    with conn:
        pid, uid = _peer(conn)
        if uid != os.geteuid():
            raise KeeperError(f"the process on {path} (pid {pid}) runs as uid {uid}, not ours")
        try:
            _send(conn, {"op": "drop", "version": VERSION})
            reply = _line(conn, MAX_LINE)
            if reply.get("ok") is not True:
                raise KeeperError(str(reply.get("error"))[:200])
        except (OSError, KeeperError):
            _kill(pid)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return pid
    said = reply.get("pid")
    return said if type(said) is int else pid


def _expect_problems(mine: dict[str, Any], theirs: Any) -> list[str]:
    if not isinstance(theirs, dict):
        return ["expect: not an object"]
    return [
        f"{k}: the kept fds are for {str(theirs.get(k))[:80]!r}, this config has {v!r}"
        for k, v in mine.items()
        if theirs.get(k) != v
    ]


def take_fds(cfg: Config, dp_config: dict[str, Any], native: ModuleType) -> tuple[Datapath | None, int, str]:
    """(a Datapath on the keeper's fds, the keeper's pid, "") or (None, pid, why not). The keeper
    keeps its copies either way (startup.py's forward-first start uses this; `take` makes the keeper
    let go when they do not fit)."""
    from podrouter import handover

    path = socket_path(cfg)
    t0 = time.monotonic()
    try:
        conn = _connect(path)
    except (OSError, KeeperError) as e:
        return None, 0, f"fd keeper: {e}"
    if conn is None:
        return None, 0, f"no fd keeper on {path}"
    fds: list[int] = []
    pid, dp, why = 0, None, ""
    passed: dict[str, Any] = {}
    with conn:
        try:
            pid, uid = _peer(conn)
            if uid != os.geteuid():
                raise KeeperError(f"the process on {path} (pid {pid}) runs as uid {uid}, not ours")
            _send(conn, {"op": "take", "version": VERSION})
            msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REPLY, MAX_FDS)
            if not msg:
                raise KeeperError("the keeper closed the connection")
            reply = handover._read_line(conn, msg)
            if type(reply.get("pid")) is int:
                pid = reply["pid"]
            passed = handover.parse_manifest(reply, fds)
            mine = handover.expectations(cfg.node.name, dp_config)
            problems = _expect_problems(mine, reply.get("expect"))
            if problems:
                raise KeeperError("; ".join(problems))
            dp = native.Datapath.adopt(dp_config, passed)
        except Exception as e:  # noqa: BLE001 - untrusted input: whatever fails, fall back
            dp, why = None, str(e)[:1000] or type(e).__name__
        finally:
            for fd in fds:  # adopt() duplicated what it keeps
                with contextlib.suppress(OSError):
                    os.close(fd)
    if dp is not None:
        why = f"{handover.describe(passed)} ({(time.monotonic() - t0) * 1000:.1f} ms)"
    return dp, pid, why


def take(cfg: Config, dp_config: dict[str, Any], native: ModuleType, log: logging.Logger) -> Datapath | None:
    """At start, before the TUN is opened: a Datapath on the keeper's fds, or None (no keeper, or
    its fds do not fit this config: then it has let go of them, so the TUN queues and sockets this
    daemon opens are the only ones)."""
    dp, pid, why = take_fds(cfg, dp_config, native)
    if dp is None:
        if pid == 0 and why.startswith("no fd keeper"):
            return None
        if why.startswith("fd keeper: "):
            log.warning("%s; opening the datapath afresh", why)
            return None
        log.warning(
            "the fd keeper's fds (pid %d) do not fit: %s; it lets go of them and this daemon opens its own",
            pid,
            why,
        )
        try:
            drop(socket_path(cfg))
        except (OSError, KeeperError) as e:
            log.warning("fd keeper: %s", e)
        return None
    log.info("took the datapath's fds from the fd keeper (pid %d): %s", pid, why)
    return dp


def _listen(path: str) -> socket.socket:
    """The keeper's listening socket, mode 0600 from the start (bound under umask 077)."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise KeeperError(f"{path}: longer than a unix socket path can be")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    except BaseException:
        s.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(8)
    return s


# the keeper's entry: isolated and without the site hooks (`-I -S`: ~45 ms of CPU instead of ~80 on
# the reference machine), importing this module from the directory podrouter was loaded from
_ENTRY = "import sys; sys.path.insert(0, {!r}); from podrouter.keeper import main; sys.exit(main())"


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def replace(
    cfg: Config, dp: KeptDatapath | None, dp_config: dict[str, Any], log: logging.Logger
) -> int | None:
    """Once ready: the previous keeper (if any) lets go, and a new one takes this daemon's fds
    (`Datapath.keeper_fds`, the set its `start` made). Returns the new keeper's pid, or None."""
    import subprocess

    from podrouter import handover

    try:
        if dp is None:
            raise RuntimeError("no datapath")
        fds = dp.keeper_fds()
    except (AttributeError, OSError, RuntimeError) as e:
        log.warning("fd keeper: the datapath has no fds to keep (%s)", e)
        return None
    flat = [*fds["tun"], *(fd for w in fds["rx"] for fd in w)]
    flat += [fds[k] for k in ("masq", "masq6") if fds.get(k) is not None]
    if not fds["tun"]:
        return None  # a second call: the keeper has them already
    path = socket_path(cfg)
    lst: socket.socket | None = None
    try:
        old = drop(path)
        if old is not None:
            log.debug("the previous fd keeper (pid %d) let go of its fds", old)
        lst = _listen(path)
        spec = {
            "version": VERSION,
            "listen": lst.fileno(),
            "path": path,
            "expect": handover.expectations(cfg.node.name, dp_config),
            **{k: fds.get(k) for k in ROLES},
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _ENTRY.format(_package_root()),
                json.dumps(spec, separators=(",", ":")),
            ],
            pass_fds=[lst.fileno(), *flat],
            start_new_session=True,  # its own session and process group: survives the daemon
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except (OSError, KeeperError, subprocess.SubprocessError) as e:
        log.warning("no fd keeper (%s): a restart drops pod packets while no daemon runs", e)
        if lst is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return None
    finally:
        for fd in flat:
            with contextlib.suppress(OSError):
                os.close(fd)
        if lst is not None:
            lst.close()
    _children.append(proc)
    log.info("fd keeper pid %d holds %s on %s", proc.pid, handover.describe(fds), path)
    return proc.pid


_children: list[Any] = []  # the keepers this daemon started (reaped when they exit before it)


def stop(cfg: Config) -> list[str]:
    """The full removal (`podrouter cleanup`, a start that failed from scratch): the keeper lets go
    of the TUN queues and sockets and exits, so nothing keeps the TUN attached."""
    path = socket_path(cfg)
    existed = os.path.lexists(path)
    try:
        pid = drop(path)
    except (OSError, KeeperError) as e:
        return [f"could not stop the fd keeper on {path}: {e}"]
    for p in _children:
        with contextlib.suppress(Exception):
            p.poll()
    if pid is not None:
        return [f"stopped the fd keeper (pid {pid}) on {path}"]
    return [f"removed stale socket {path}"] if existed else []


if __name__ == "__main__":
    sys.exit(main())
