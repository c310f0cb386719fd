"""The handover's checks of what the other daemon sends (python/podrouter/handover.py): the manifest
is untrusted, and a config that does not fit is named key by key. The fds themselves are checked in
Rust (rust/io/src/handover.rs has its tests); the flows across a real handover are in
tests/integration/test_handover.py."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest

from podrouter import handover as h


def manifest(**kw: Any) -> dict[str, Any]:
    return {"ok": True, "version": 1, "tun": [0, 1], "rx": [[2, 3], [4, 5]], "masq": 6, **kw}


FDS = [10, 11, 12, 13, 14, 15, 16]


def test_a_good_manifest_maps_indexes_to_fds() -> None:
    want = {"tun": [10, 11], "rx": [[12, 13], [14, 15]], "masq": 16, "masq6": None}
    assert h.parse_manifest(manifest(), FDS) == want
    assert h.parse_manifest(manifest(masq=None), FDS[:6])["masq"] is None
    # the IPv6 masquerade reply socket, when the sender passes it (an older sender does not)
    assert h.parse_manifest(manifest(masq6=7), [*FDS, 17])["masq6"] == 17


@pytest.mark.parametrize(
    ("change", "fds", "words"),
    [
        ({"ok": False, "error": "busy"}, FDS, "refuses: busy"),
        ({"version": 2}, FDS, "version"),
        ({"tun": [0, 0]}, FDS, "unused fd index"),  # one fd named twice
        ({"tun": [0, 7]}, FDS, "unused fd index"),  # past the received fds
        ({"tun": [0, -1]}, FDS, "unused fd index"),
        ({"tun": [0, True]}, FDS, "unused fd index"),  # bool is not an index
        ({"tun": "0"}, FDS, "not a list"),
        ({"rx": [2, 3]}, FDS, "not a list"),
        ({"rx": {"a": 1}}, FDS, "not a list of lists"),
        ({"masq": "6"}, FDS, "unused fd index"),
        ({"masq6": 6}, FDS, "unused fd index"),  # the IPv4 one's fd again
        ({}, [*FDS, 17], "8 fds received, the manifest names 7"),  # an fd nobody named
    ],
)
def test_a_bad_manifest_is_refused(change: dict[str, Any], fds: list[int], words: str) -> None:
    with pytest.raises(h.HandoverError, match=words):
        h.parse_manifest(manifest(**change), fds)


def test_mismatches_name_each_key() -> None:
    mine = h.expectations(
        "node1", {"tun_name": "podr0", "workers": 2, "vxlan_port": 4789, "geneve_port": 6081}
    )
    assert h.mismatches(mine, dict(mine)) == []
    theirs = {**mine, "vxlan_port": 4790, "node": "node2"}
    out = h.mismatches(mine, theirs)
    assert any(p.startswith("vxlan_port:") and "4789" in p and "4790" in p for p in out), out
    assert any(p.startswith("node:") for p in out), out
    assert h.mismatches(mine, "x") == ["expect: not an object"]


def test_read_line_limits_and_parses() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b'{"released": true}\n')
        assert h._read_line(a) == {"released": True}
        b.sendall(b"[1]\n")
        with pytest.raises(h.HandoverError, match="not an object"):
            h._read_line(a)
        b.sendall(b"x" * (h.MAX_LINE + 70000))
        with pytest.raises(h.HandoverError, match="too large"):
            h._read_line(a)
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises(h.HandoverError, match="closed"):
            h._read_line(a)


def test_check_without_a_daemon_says_so(tmp_path: Any) -> None:
    with pytest.raises(h.HandoverError, match="no daemon to take over from"):
        h.check(str(tmp_path / "none.sock"), {})


def test_check_reports_the_running_daemons_refusal(tmp_path: Any) -> None:
    path = str(tmp_path / "api.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def answer() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(65536)
            c.sendall(b'{"ok": false, "error": "the configs differ: vxlan_port: ..."}\n')

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(h.HandoverError, match="refuses: the configs differ"):
            h.check(path, {"node": "n"})
    finally:
        t.join(5)
        srv.close()
        os.unlink(path)
