"""Zero-gap handover between two daemons of one node (docs/handover.md).

`podrouter run --handover` starts while the old daemon still forwards. It does its slow work first
(config, preflight, adopting the state file, routes, the pod guard, compiling the tables) with a
stand-in datapath (`Pending`), and only at the point where it would start its workers asks the old
daemon, over the API socket, for the datapath's fds:

1. client -> old: `{"op": "handover", "version": 1, "expect": {...}, "accept": ["masq6"]}`,
   `expect` being the parts of the successor's datapath config the fds must fit (`CHECK_KEYS`, the
   node name), `accept` the optional fd roles it understands (`OPTIONAL_ROLES`; an older successor
   sends none and opens those sockets itself). A successor first sends the same with
   `"check": true` at preflight, so a mismatching config is refused (exit 2) before it changes
   anything.
2. old: compares, stops its workers at a batch boundary (`Datapath.quiesce`: each finishes the batch
   in hand; the NAT snapshot file is written a last time, exact), and sends one JSON line
   `{"ok": true, "version": 1, "tun": [i, ...], "rx": [[i, ...], ...], "masq": i | null,
   "masq6": i | null}` whose numbers index the fds passed with it (SCM_RIGHTS): the TUN queues,
   each worker's tunnel receive sockets and the masquerade reply sockets (IPv4, IPv6). They stay
   open in both processes, so what arrives meanwhile waits in the TUN queues and socket buffers.
3. client: checks the line and every fd (`Datapath.adopt`: fstat, SO_DOMAIN / SO_TYPE / SO_PROTOCOL,
   bound address, TUNGETIFF name and flags), restores NAT from the snapshot the old daemon just
   wrote, starts its workers and answers `{"ok": true}`; on any problem `{"ok": false, "error": ..}`
   and it exits 2. The old daemon resumes its own workers on a refusal, on a closed connection and
   after `TIMEOUT` seconds without an answer.
4. old, after `{"ok": true}`: stops like SIGTERM (the stop contract) but leaves the state file to the
   successor, releases the API socket and the metrics port, sends `{"released": true}` and exits 0.
   The client waits for that line before it binds them.

Everything the old daemon sends is untrusted: the line is parsed with limits, every index must name
a received fd exactly once, and the fds themselves are checked in Rust.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from podrouter import native
from podrouter.errors import EXIT_CONFIG, StartError

if TYPE_CHECKING:
    from podrouter._native import Datapath, Tables
    from podrouter.ports import HandsOver, TakesOver

log = logging.getLogger("podrouter.handover")

VERSION = 1
# the old daemon resumes forwarding if the successor has not confirmed within this many seconds
TIMEOUT = 5.0
# how long a successor waits for the old daemon to release the API socket and metrics port
RELEASE_WAIT = 15.0
MAX_LINE = 1 << 16
MAX_FDS = 253  # SCM_MAX_FD
# the parts of the datapath config the passed fds must fit
CHECK_KEYS = (
    "tun_name",
    "workers",
    "vxlan_port",
    "geneve_port",
    "underlay_address",
    "underlay_address6",
    "underlay_ifindex",
)
# fd roles a manifest carries only when the receiver says it understands them
OPTIONAL_ROLES = ("masq6",)


class HandoverError(Exception):
    """The handover cannot happen; the message says why (the old daemon keeps forwarding)."""


def expectations(node: str, dp_config: dict[str, Any]) -> dict[str, Any]:
    return {"node": node, **{k: dp_config.get(k) for k in CHECK_KEYS}}


def mismatches(mine: dict[str, Any], theirs: Any) -> list[str]:
    """What in the successor's `theirs` (untrusted) differs from this daemon's `mine`."""
    if not isinstance(theirs, dict):
        return ["expect: not an object"]
    out = []
    for key, want in mine.items():
        got = theirs.get(key)
        if got != want:
            out.append(f"{key}: the running daemon has {want!r}, the new config {str(got)[:80]!r}")
    return out


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def _read_line(conn: socket.socket, buf: bytes = b"") -> dict[str, Any]:
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise HandoverError("reply too large")
        chunk = conn.recv(65536)
        if not chunk:
            raise HandoverError("the other daemon closed the connection")
        buf += chunk
    try:
        obj = json.loads(buf.split(b"\n", 1)[0])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HandoverError(f"bad reply: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HandoverError("bad reply: not an object")
    return obj


def _peer_uid(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


# ------------------------------------------------------------------------------- old daemon


class Server:
    """The old daemon's side: the `handover` API op (a raw op: it needs the socket for SCM_RIGHTS)."""

    def __init__(self, daemon: HandsOver) -> None:
        self.d = daemon
        self._lock = threading.Lock()
        self._busy = False
        self.done = False
        self._released = threading.Event()
        self._sent = threading.Event()

    def handle(self, req: dict[str, Any], conn: socket.socket) -> None:
        try:
            self._handle(req, conn)
        except OSError as e:
            log.warning("handover request: %s", e)

    def _handle(self, req: dict[str, Any], conn: socket.socket) -> None:
        pid, uid = _peer_uid(conn)
        if uid != os.geteuid():
            _send(conn, {"ok": False, "error": "a handover is only given to the daemon's own uid"})
            return
        if req.get("version") != VERSION:
            got = str(req.get("version"))[:20]
            _send(conn, {"ok": False, "error": f"handover protocol {got}, not {VERSION}"})
            return
        d = self.d
        if d.datapath is None or not d.ready:
            _send(conn, {"ok": False, "error": "this daemon is not ready"})
            return
        problems = mismatches(expectations(d.cfg.node.name, d._datapath_config()), req.get("expect"))
        if problems:
            _send(conn, {"ok": False, "error": "the configs differ: " + "; ".join(problems)})
            return
        if req.get("check"):
            _send(conn, {"ok": True, "version": VERSION, "pid": os.getpid()})
            return
        with self._lock:
            if self._busy or self.done:
                _send(conn, {"ok": False, "error": "a handover is already under way"})
                return
            self._busy = True
        try:
            self._hand_over(conn, pid, req)
        finally:
            with self._lock:
                self._busy = False

    def _hand_over(self, conn: socket.socket, pid: int, req: dict[str, Any]) -> None:
        d = self.d
        dp = d.datapath
        if dp is None:  # _handle checked it; only a daemon stopping meanwhile gets here
            _send(conn, {"ok": False, "error": "this daemon is not ready"})
            return
        with d.lock:  # no table swap or reconcile while the workers stop
            t0 = time.monotonic()
            d.handing_over = True
            try:
                dp.quiesce()
            except OSError as e:
                # a worker had died: the run loop notices the stopped datapath and exits
                d.handing_over = False
                _send(conn, {"ok": False, "error": f"the running daemon cannot hand over: {e}"})
                return
        why = ""
        try:
            fds = dp.handover_fds()
            flat: list[int] = []

            def index(fd: int) -> int:
                flat.append(fd)
                return len(flat) - 1

            accept = req.get("accept")
            manifest = {
                "ok": True,
                "version": VERSION,
                "pid": os.getpid(),
                "tun": [index(fd) for fd in fds["tun"]],
                "rx": [[index(fd) for fd in w] for w in fds["rx"]],
                "masq": None if fds["masq"] is None else index(fds["masq"]),
            }
            if isinstance(accept, list) and "masq6" in accept:
                manifest["masq6"] = None if fds.get("masq6") is None else index(fds["masq6"])
            line = json.dumps(manifest, separators=(",", ":")).encode() + b"\n"
            socket.send_fds(conn, [line], flat)
            conn.settimeout(TIMEOUT)
            reply = _read_line(conn)
            ok = reply.get("ok") is True
            if not ok:
                why = f"the new daemon refused: {str(reply.get('error'))[:300]}"
        except (OSError, HandoverError) as e:
            ok, why = False, f"{e}" if not isinstance(e, TimeoutError) else f"no answer within {TIMEOUT:g} s"
        if not ok:
            with d.lock:
                try:
                    dp.resume()
                except OSError:
                    log.exception("resuming the datapath after a failed handover")
                d.handing_over = False  # a datapath that did not resume ends the daemon (run loop)
                # the successor rewrote the state file while preparing: this daemon's record again
                with contextlib.suppress(Exception):
                    if d.plumbing is not None:
                        d.plumbing.save()
            log.error(
                "handover to pid %d failed (%s); forwarding resumed after %.1f ms",
                pid,
                why,
                (time.monotonic() - t0) * 1000,
            )
            return
        self.done = True
        log.info(
            "handed over to pid %d (workers stopped %.1f ms before it confirmed); exiting",
            pid,
            (time.monotonic() - t0) * 1000,
        )
        d.handed_over()
        # the successor binds the API socket and the metrics port once this daemon has closed them
        self._released.wait(timeout=RELEASE_WAIT)
        with contextlib.suppress(OSError):
            _send(conn, {"released": True})
        self._sent.set()

    def released(self) -> None:
        """Called by the daemon's shutdown once the API socket and the metrics port are closed."""
        self._released.set()

    def wait_sent(self, timeout: float = 5.0) -> None:
        if self.done:
            self._sent.wait(timeout)


# ------------------------------------------------------------------------------- new daemon


def check(path: str, expect: dict[str, Any]) -> None:
    """At preflight: is there a daemon on `path` that would hand over to this config?"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10.0)
            s.connect(path)
            _send(s, {"op": "handover", "version": VERSION, "check": True, "expect": expect})
            reply = _read_line(s)
    except OSError as e:
        raise HandoverError(f"no daemon to take over from on {path}: {e}") from None
    if reply.get("ok") is not True:
        raise HandoverError(f"the running daemon refuses: {str(reply.get('error'))[:1000]}")


def _index_list(v: Any, n: int, used: set[int], key: str) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_FDS:
        raise HandoverError(f"manifest {key}: not a list of fd indexes")
    out = []
    for i in v:
        if type(i) is not int or not 0 <= i < n or i in used:
            raise HandoverError(f"manifest {key}: {str(i)[:20]!r} is not an unused fd index below {n}")
        used.add(i)
        out.append(i)
    return out


def describe(passed: dict[str, Any]) -> str:
    """The roles in an `adopt` fds dict, for the logs: `1 TUN queue(s), 2 tunnel socket(s), masq`."""
    rx = sum(len(w) for w in passed["rx"])
    parts = [f"{len(passed['tun'])} TUN queue(s)", f"{rx} tunnel socket(s)"]
    parts += [k for k in ("masq", "masq6") if passed.get(k) is not None]
    return ", ".join(parts)


def parse_manifest(obj: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """The `adopt` fds dict from the old daemon's (untrusted) line and the fds that came with it:
    every index names a received fd, each exactly once, and every received fd is named."""
    if obj.get("ok") is not True:
        raise HandoverError(f"the running daemon refuses: {str(obj.get('error'))[:1000]}")
    if obj.get("version") != VERSION:
        raise HandoverError(f"manifest version {str(obj.get('version'))[:20]!r}, expected {VERSION}")
    n, used = len(fds), set[int]()
    tun = _index_list(obj.get("tun"), n, used, "tun")
    rx_raw = obj.get("rx")
    if not isinstance(rx_raw, list) or len(rx_raw) > MAX_FDS:
        raise HandoverError("manifest rx: not a list of lists")
    rx = [_index_list(w, n, used, "rx") for w in rx_raw]
    masq_raw = obj.get("masq")
    masq = None if masq_raw is None else _index_list([masq_raw], n, used, "masq")[0]
    masq6_raw = obj.get("masq6")  # absent from an older sender: this daemon opens its own
    masq6 = None if masq6_raw is None else _index_list([masq6_raw], n, used, "masq6")[0]
    if len(used) != n:
        raise HandoverError(f"{n} fds received, the manifest names {len(used)}")
    return {
        "tun": [fds[i] for i in tun],
        "rx": [[fds[i] for i in w] for w in rx],
        "masq": None if masq is None else fds[masq],
        "masq6": None if masq6 is None else fds[masq6],
    }


def take_over(
    path: str,
    expect: dict[str, Any],
    dp_config: dict[str, Any],
    tables: Tables,
    nat_snapshot: str | None,
) -> tuple[Datapath, socket.socket]:
    """Ask the daemon on `path` for its datapath and start it here. Returns the started Datapath
    and the connection (see `wait_released`). Raises HandoverError (the old daemon resumes)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        conn.settimeout(10.0)
        conn.connect(path)
        _, uid = _peer_uid(conn)
        if uid != os.geteuid():
            raise HandoverError(f"the daemon on {path} runs as uid {uid}, not ours")
        _send(conn, {"op": "handover", "version": VERSION, "expect": expect, "accept": list(OPTIONAL_ROLES)})
        msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_LINE, MAX_FDS)
        if not msg:
            raise HandoverError("the running daemon closed the connection")
        try:
            passed = parse_manifest(_read_line(conn, msg), fds)
            log.info("handover: received %s", describe(passed))
            dp = native.adopt_datapath(dp_config, passed)
            dp.set_nat_snapshot(nat_snapshot)
            dp.start(tables)
        except (OSError, ValueError, RuntimeError, HandoverError) as e:
            with contextlib.suppress(OSError):
                _send(conn, {"ok": False, "error": str(e)[:1000]})
            raise HandoverError(str(e)) from None
        _send(conn, {"ok": True, "pid": os.getpid()})
        return dp, conn
    except OSError as e:
        conn.close()
        raise HandoverError(f"handover over {path}: {e}") from None
    except BaseException:
        conn.close()
        raise
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def wait_released(conn: socket.socket) -> None:
    """Wait until the old daemon has closed the API socket and the metrics port (or is gone)."""
    try:
        conn.settimeout(RELEASE_WAIT)
        reply = _read_line(conn)
        if reply.get("released") is not True:
            log.warning("handover: unexpected line from the old daemon: %s", str(reply)[:200])
    except (OSError, HandoverError) as e:
        log.warning("handover: the old daemon did not say it released the API socket (%s)", e)
    finally:
        conn.close()


class Pending:
    """The datapath of a daemon started with --handover until its first tables: everything before
    that runs without one; `start(tables)` takes the old daemon's over and replaces this object in
    the daemon with the real Datapath."""

    tun_ifindex = None

    def __init__(self, daemon: TakesOver) -> None:
        self.d = daemon
        self.nat_snapshot: str | None = None
        self.conn: socket.socket | None = None

    def set_nat_snapshot(self, path: str | None) -> None:
        self.nat_snapshot = path

    def start(self, tables: Tables) -> None:
        d = self.d
        dp_config = d._datapath_config()
        t0 = time.monotonic()
        try:
            dp, self.conn = take_over(
                d.cfg.api.socket,
                expectations(d.cfg.node.name, dp_config),
                dp_config,
                tables,
                self.nat_snapshot,
            )
        except HandoverError as e:
            why = f"handover refused, the running daemon keeps forwarding: {e}"
            raise StartError([why], EXIT_CONFIG) from None
        d.datapath = dp
        log.info("took the datapath over from the running daemon (%.1f ms)", (time.monotonic() - t0) * 1000)

    def finish(self) -> None:
        if self.conn is not None:
            wait_released(self.conn)
            self.conn = None

    def is_running(self) -> bool:
        return False

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass

    def nat_snapshot_stats(self) -> dict[str, Any]:
        return {}
