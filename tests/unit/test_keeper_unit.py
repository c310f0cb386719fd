"""The fd keeper's protocol (python/podrouter/keeper.py) on a real keeper process holding real
sockets: it keeps the same open file descriptions (what was queued before a take is read from the
taken fd), answers only on its 0600 socket, survives garbage, refuses nothing but lets go when the
fds do not fit the new config, and `stop` ends it. The TUN and the restart itself are in
tests/integration/test_restart.py."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from podrouter import keeper

log = logging.getLogger("test.keeper")
DP_CONFIG = {"tun_name": "podr0", "workers": 1, "vxlan_port": 4789, "geneve_port": 0}


@pytest.fixture
def cfg() -> Iterator[Any]:
    d = Path("/tmp") / f"prk-{secrets.token_hex(4)}"  # short: sun_path is 108 bytes
    d.mkdir(mode=0o700)
    c = SimpleNamespace(api=SimpleNamespace(socket=str(d / "api.sock")), node=SimpleNamespace(name="n1"))
    try:
        yield c
    finally:
        keeper.stop(c)
        shutil.rmtree(d, ignore_errors=True)


class FakeDatapath:
    """keeper_fds() like the native Datapath's: copies the caller owns, once."""

    def __init__(self, socks: dict[str, socket.socket]) -> None:
        self.socks = socks
        self.taken = False

    def keeper_fds(self) -> dict[str, Any]:
        if self.taken:
            return {"tun": [], "rx": [], "masq": None, "masq6": None}
        self.taken = True
        dup = {k: os.dup(s.fileno()) for k, s in self.socks.items()}
        return {"tun": [dup["tun"]], "rx": [[dup["rx"]]], "masq": None, "masq6": None}


class FakeNative:
    """native.Datapath.adopt: records copies of the passed fds (the caller closes its own)."""

    def __init__(self) -> None:
        self.passed: dict[str, Any] | None = None
        native = self

        class Datapath:
            @staticmethod
            def adopt(config: dict[str, Any], fds: dict[str, Any]) -> str:
                native.passed = {
                    "tun": [os.dup(f) for f in fds["tun"]],
                    "rx": [[os.dup(f) for f in w] for w in fds["rx"]],
                    "masq6": fds["masq6"],
                }
                return "adopted"

        self.Datapath = Datapath


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def request(path: str, obj: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        c.sendall(obj)
        try:
            return c.recv(4096)
        except ConnectionResetError:  # closed with our bytes unread: a refusal too
            return b""


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
            os.kill(pid, 0)
        except (ChildProcessError, ProcessLookupError):
            return True
        time.sleep(0.02)
    return False


def test_the_keeper_hands_the_same_sockets_to_a_successor(cfg: Any) -> None:
    tun, rx = udp(), udp()
    pid = keeper.replace(cfg, FakeDatapath({"tun": tun, "rx": rx}), DP_CONFIG, log)
    assert pid is not None
    path = keeper.socket_path(cfg)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    # the daemon goes away: only the keeper holds the socket now
    addr = rx.getsockname()
    rx.close()
    tun.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.sendto(b"sent while no daemon ran", addr)
    # garbage and a wrong version do not stop it
    assert b'"ok":false' in request(path, b'{"op": "take", "version": 9}\n')
    assert request(path, b"x" * 5000) == b""
    assert b'"fds":2' in request(path, b'{"op": "ping", "version": 1}\n')
    native = FakeNative()
    assert keeper.take(cfg, DP_CONFIG, native, log) == "adopted"
    assert native.passed is not None and native.passed["masq6"] is None
    with socket.socket(fileno=native.passed["rx"][0][0]) as got:
        got.settimeout(5)
        assert got.getsockname() == addr
        assert got.recv(100) == b"sent while no daemon ran"
    os.close(native.passed["tun"][0])
    # it keeps its copies until a successor replaces it (or drops it)
    assert b'"fds":2' in request(path, b'{"op": "ping", "version": 1}\n')
    assert keeper.stop(cfg) == [f"stopped the fd keeper (pid {pid}) on {path}"]
    assert gone(pid) and not os.path.lexists(path)
    assert keeper.stop(cfg) == []


def test_fds_that_do_not_fit_are_dropped_and_a_new_keeper_replaces_the_old(cfg: Any) -> None:
    with udp() as tun, udp() as rx:
        first = keeper.replace(cfg, FakeDatapath({"tun": tun, "rx": rx}), DP_CONFIG, log)
        second = keeper.replace(cfg, FakeDatapath({"tun": tun, "rx": rx}), DP_CONFIG, log)
    assert first is not None and second is not None and first != second
    assert gone(first), "the replaced keeper exits"
    native = FakeNative()
    assert keeper.take(cfg, {**DP_CONFIG, "vxlan_port": 4790}, native, log) is None
    assert native.passed is None
    assert gone(second) and not os.path.lexists(keeper.socket_path(cfg)), "it let go of the fds"
    assert keeper.take(cfg, DP_CONFIG, native, log) is None  # no keeper: nothing to take


def test_a_stale_socket_file_is_removed(cfg: Any) -> None:
    path = keeper.socket_path(cfg)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # bound, nobody listening: what a SIGKILLed keeper leaves
    assert keeper.stop(cfg) == [f"removed stale socket {path}"]
    assert not os.path.lexists(path)


def test_the_keeper_refuses_a_bad_spec() -> None:
    assert keeper.main([]) == 2
    assert keeper.main(['{"version": 1, "listen": 1, "rx": []}']) == 2
    assert keeper.main(["not json"]) == 2
