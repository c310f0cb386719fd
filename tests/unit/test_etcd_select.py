"""etcd entries are untrusted: the oldest registration wins every conflict, hostile records are
refused with a reason, and the etcd client bounds what a server (or something posing as one) can
make it read or wait for. The daemon against a real etcd: tests/integration/test_etcd_hardening.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from podrouter import config
from podrouter.discovery import etcd
from podrouter.discovery.etcd import EtcdClient, EtcdError, select_peers

PREFIX = "/podrouter/v1/nodes/"
CFG = config.loads("""
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidrs: [10.244.0.0/16, 'fd00:10:244::/48']}
peers:
  - {name: static1, address: 172.16.2.9, pod_cidr: 10.244.9.0/24}
""")


def rec(name: str, address: str, *cidrs: str) -> str:
    return json.dumps({"name": name, "address": address, "pod_cidrs": list(cidrs)})


def select(*entries: tuple[str, int, str]) -> tuple[dict[str, config.PeerConfig], dict[str, str]]:
    return select_peers(entries, CFG, PREFIX, PREFIX + "node1", "172.16.2.2")


def test_valid_entries_are_discovered_and_our_own_key_is_skipped() -> None:
    found, rejected = select(
        (PREFIX + "node1", 1, rec("node1", "172.16.2.2", "10.244.1.0/24")),
        (PREFIX + "node2", 5, rec("node2", "172.16.3.2", "10.244.2.0/24", "fd00:10:244:2::/64")),
        (PREFIX + "node3", 6, rec("node3", "172.16.2.3", "10.244.3.0/24")),
    )
    assert set(found) == {"node2", "node3"} and rejected == {}


def test_first_writer_by_create_revision_wins() -> None:
    # listed newest first: the order of the reply must not matter, only the create revision
    entries = [
        (PREFIX + "thief", 9, rec("thief", "172.16.3.2", "10.244.20.0/24")),  # node2's address
        (PREFIX + "squat", 8, rec("squat", "172.16.5.5", "10.244.2.128/25")),  # inside node2's CIDR
        (PREFIX + "node2", 3, rec("node2", "172.16.3.2", "10.244.2.0/24")),
    ]
    found, rejected = select(*entries)
    assert set(found) == {"node2"}
    assert rejected[PREFIX + "thief"] == "address 172.16.3.2 is already node2's"
    assert rejected[PREFIX + "squat"] == "pod CIDR 10.244.2.128/25 overlaps node2's 10.244.2.0/24"
    # when node2 leaves, the next oldest claimant of the space gets it
    found, rejected = select(*entries[:2])
    assert set(found) == {"squat", "thief"} or set(found) == {"squat"}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("{not json", "value is not a JSON object"),
        ('["node9"]', "value is not a JSON object"),
        ("x" * 5000, "value is 5000 bytes (limit 4096)"),
        (rec("other", "172.16.5.9", "10.244.5.0/24"), "name 'other' does not match the key"),
        (rec("node9", "172.16.2.2", "10.244.5.0/24"), "address 172.16.2.2 is this node's"),
        (rec("node9", "172.16.2.9", "10.244.5.0/24"), "address 172.16.2.9 is already static peer static1's"),
        (rec("node9", "127.0.0.1", "10.244.5.0/24"), "is a loopback address"),
        (rec("node9", "10.244.7.1", "10.244.5.0/24"), "is inside the cluster pod CIDR 10.244.0.0/16"),
        (
            rec("node9", "172.16.5.9", "10.245.0.0/24"),
            "pod CIDR 10.245.0.0/24 is outside the cluster pod CIDRs",
        ),
        (
            rec("node9", "172.16.5.9", "10.244.0.0/22"),
            "pod CIDR 10.244.0.0/22 overlaps this node's 10.244.1.0/24",
        ),
        (rec("node9", "172.16.5.9", "10.244.9.0/25"), "overlaps static peer static1's 10.244.9.0/24"),
    ],
)
def test_hostile_entries_are_refused_with_a_reason(value: str, why: str) -> None:
    found, rejected = select(
        (PREFIX + "node9", 4, value), (PREFIX + "node2", 5, rec("node2", "172.16.3.2", "10.244.2.0/24"))
    )
    assert set(found) == {"node2"}
    assert why in rejected[PREFIX + "node9"], rejected


def test_many_entries_are_bounded_and_fast() -> None:
    entries = [
        (
            PREFIX + f"n{i}",
            i + 10,
            rec(f"n{i}", f"172.20.{i // 250}.{i % 250 + 1}", f"10.244.{i // 16 + 16}.{(i % 16) * 16}/28"),
        )
        for i in range(3000)
    ]
    t0 = time.monotonic()
    found, rejected = select(*entries)
    assert len(found) == 3000 and not rejected
    assert time.monotonic() - t0 < 5


# -------------------------------------------------------------------- a hostile HTTP "etcd"


@pytest.fixture
def hostile() -> Iterator[tuple[str, list[bytes]]]:
    """A TCP server that answers each request with the next canned reply (None: never answers)."""
    replies: list[bytes] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            conns.append(c)
            c.recv(65536)
            reply = replies.pop(0) if replies else b""
            if reply:
                c.sendall(reply)
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", replies
    finally:
        stop.set()
        t.join(timeout=5)
        for c in conns:
            c.close()
        srv.close()


def http_reply(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


def test_client_bounds_size_and_time(
    hostile: tuple[str, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, replies = hostile
    client = EtcdClient((url,))
    monkeypatch.setattr(etcd, "MAX_REPLY", 1000)
    replies.append(http_reply(b'{"x": "' + b"a" * 5000 + b'"}'))
    with pytest.raises(EtcdError, match="larger than 1000 bytes"):
        client.call("/v3/kv/range", {}, limit=etcd.MAX_REPLY)
    replies.append(http_reply(b"[1, 2, 3]"))
    with pytest.raises(EtcdError, match="not a JSON object"):
        client.call("/v3/kv/range", {})
    replies.append(http_reply(b"<html>"))
    with pytest.raises(EtcdError, match="not JSON"):
        client.call("/v3/kv/range", {})
    replies.append(http_reply(b'{"error": "etcdserver: permission denied", "code": 7}', "403 Forbidden"))
    with pytest.raises(EtcdError, match="permission denied"):
        client.call("/v3/kv/range", {})
    # a server that accepts and never answers: the call gives up after its timeout
    t0 = time.monotonic()
    with pytest.raises(EtcdError, match="no etcd endpoint answered"):
        client.call("/v3/kv/range", {}, timeout=0.5)
    assert time.monotonic() - t0 < 3
