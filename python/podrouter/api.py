"""The daemon's control socket: newline-delimited JSON over a unix stream socket.

Requests are one JSON object per line, `{"op": "status"}`, `{"op": "pod_add", "pod": {...}}`,
`{"op": "pod_del", "name": "web"}`, `{"op": "pod_list"}`, `{"op": "explain", "src": ..., "dst": ...}`;
the CNI plugin adds `"cni": {"container_id": ..., "netns": ..., "ifname": ...}` to pod_add and
`"container_id"` to pod_del, which then removes the pod only if that container registered it;
each gets one line back, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. A connection may carry
any number of requests. The socket is created mode 0600 (only root may register pods) and removed
when the daemon exits.

`request()` is the client side, shared by the CLI and the CNI plugin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("podrouter.api")

MAX_LINE = 1 << 20  # a request larger than 1 MiB is not a pod registration


_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}\Z")
_IFNAME = re.compile(r"[^/\s:]{1,15}\Z")


def valid_container_id(value: Any) -> bool:
    """CNI spec: CNI_CONTAINERID is alphanumeric with underscore, dot and hyphen, non-empty."""
    return isinstance(value, str) and _CONTAINER_ID.match(value) is not None


def cni_attachment(raw: Any) -> dict[str, str] | None:
    """The `cni` object of a pod_add request, checked (it comes from a runtime): None if absent."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(f"cni: {str(raw)[:80]!r} is not an object")
    unknown = sorted(set(raw) - {"container_id", "netns", "ifname"})
    if unknown:
        raise ApiError(f"cni.{unknown[0][:40]}: unknown key")
    cid, netns, ifname = raw.get("container_id"), raw.get("netns", ""), raw.get("ifname", "")
    if not valid_container_id(cid):
        raise ApiError(f"cni.container_id: {str(cid)[:80]!r} is not a CNI container ID")
    if not isinstance(netns, str) or len(netns) > 4096 or "\0" in netns:
        raise ApiError(f"cni.netns: {str(netns)[:80]!r} is not a path")
    if not isinstance(ifname, str) or (ifname and _IFNAME.match(ifname) is None):
        raise ApiError(f"cni.ifname: {str(ifname)[:80]!r} is not an interface name")
    return {"container_id": str(cid), "netns": netns, "ifname": ifname}


class ApiError(Exception):
    """A request failed: the message goes back to the client as {"ok": false, "error": msg}."""


Handler = Callable[[dict[str, Any]], dict[str, Any]]
# A streaming op: called with the request and a `send(obj) -> bool` (False once the client is gone);
# it owns the connection until it returns, then the connection is closed (podrouter.monitor).
StreamHandler = Callable[[dict[str, Any], Callable[[dict[str, Any]], bool]], None]
# A raw op: called with the request and the connected socket itself (SCM_RIGHTS; podrouter.handover);
# it owns the connection until it returns.
RawHandler = Callable[[dict[str, Any], socket.socket], None]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(
        self,
        path: str,
        handlers: dict[str, Handler],
        streams: dict[str, StreamHandler],
        raws: dict[str, RawHandler] | None = None,
    ) -> None:
        self.handlers = handlers
        self.streams = streams
        self.raws = raws or {}
        super().__init__(path, _Conn, bind_and_activate=False)


class _Conn(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            try:
                line = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_LINE:
                self._send({"ok": False, "error": "request too large"})
                return
            if not line.strip():
                continue
            raw = self._raw_for(line)
            if raw is not None:
                try:
                    raw[1](raw[0], self.connection)
                except Exception:  # noqa: BLE001 - a bad raw request must never kill the daemon
                    log.exception("API op %s failed", raw[0]["op"])
                return
            stream = self._stream_for(line)
            if stream is not None:
                self._run_stream(*stream)
                return
            self._send(self.dispatch(line))

    def _stream_for(self, line: bytes) -> tuple[dict[str, Any], StreamHandler] | None:
        if not self.server.streams:
            return None
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(req, dict) and isinstance(req.get("op"), str) and req["op"] in self.server.streams:
            return req, self.server.streams[req["op"]]
        return None

    def _raw_for(self, line: bytes) -> tuple[dict[str, Any], RawHandler] | None:
        if not self.server.raws or b'"op"' not in line:
            return None
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(req, dict) and isinstance(req.get("op"), str) and req["op"] in self.server.raws:
            return req, self.server.raws[req["op"]]
        return None

    def _run_stream(self, req: dict[str, Any], fn: StreamHandler) -> None:
        def send(obj: dict[str, Any]) -> bool:
            try:
                self.wfile.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                return False
            return True

        try:
            fn(req, send)
        except (ApiError, ValueError) as e:
            send({"ok": False, "error": str(e)})
        except Exception as e:  # noqa: BLE001 - a bad stream request must never kill the daemon
            log.exception("API stream %s failed", req["op"])
            send({"ok": False, "error": f"internal error: {e}"})

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"bad request: not JSON ({e})"}
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "bad request: expected an object with a string 'op'"}
        handler = self.server.handlers.get(req["op"])
        if handler is None:
            ops = ", ".join(sorted({*self.server.handlers, *self.server.streams}))
            return {"ok": False, "error": f"unknown op {req['op']!r} (ops: {ops})"}
        try:
            reply = handler(req)
        except ApiError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a bad request must never kill the daemon
            log.exception("API op %s failed", req["op"])
            return {"ok": False, "error": f"internal error: {e}"}
        return {"ok": True, **reply}

    def _send(self, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
            self.wfile.flush()


class ApiServer:
    def __init__(
        self,
        path: str,
        handlers: dict[str, Handler],
        streams: dict[str, StreamHandler] | None = None,
        raws: dict[str, RawHandler] | None = None,
    ) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if os.path.exists(path) and not socket_in_use(path):
            # left by a daemon that was killed: nobody listens on it any more
            os.unlink(path)
        self._server = _Server(path, handlers, streams or {}, raws)
        # bind under a umask that makes the socket 0600 from its first moment: a chmod after bind()
        # would leave a window in which any local user could connect and register pods
        old = os.umask(0o177)
        try:
            self._server.server_bind()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, name="podrouter-api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def socket_in_use(path: str) -> bool:
    """True if a live daemon listens on `path`; a leftover socket file nobody listens on is False."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        s.close()
    return True


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply. Raises OSError if the daemon cannot be reached and
    ApiError if the reply is not JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 * MAX_LINE:
                raise ApiError("reply too large")
    try:
        reply = json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"bad reply from the daemon: {e}") from None
    if not isinstance(reply, dict):
        raise ApiError("bad reply from the daemon: not an object")
    return reply
