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


def test_a_refused_registration_does_not_block_younger_ones_but_an_accepted_one_does() -> None:
    """The core names one earlier owner per conflict; when that owner is refused itself, the
    younger record is judged again against the rest (here: accepted node2's space)."""
    found, rejected = select(
        # refused (this node's address); its /18 holds node2's and late's CIDRs
        (PREFIX + "rogue", 1, rec("rogue", "172.16.2.2", "10.244.64.0/18")),
        (PREFIX + "node2", 2, rec("node2", "172.16.3.2", "10.244.65.0/24")),
        (PREFIX + "late", 3, rec("late", "172.16.3.3", "10.244.65.128/25")),
        (PREFIX + "other", 4, rec("other", "172.16.3.4", "10.244.66.0/24")),
    )
    assert set(found) == {"node2", "other"}, rejected
    assert rejected == {
        PREFIX + "rogue": "address 172.16.2.2 is this node's",
        PREFIX + "late": "pod CIDR 10.244.65.128/25 overlaps node2's 10.244.65.0/24",
    }


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


# ------------------------------------------------------------- the backend's own resilience


def backend(endpoint: str = "http://127.0.0.1:9") -> etcd.EtcdDiscovery:
    cfg = config.loads(f"""
node: {{name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}}
cluster: {{pod_cidr: 10.244.0.0/16}}
discovery: {{backend: etcd, etcd: {{endpoints: ['{endpoint}'], lease_ttl: 2}}}}
""")
    return etcd.EtcdDiscovery(cfg, "172.16.2.2")


def b64(s: str) -> str:
    import base64

    return base64.b64encode(s.encode()).decode()


def test_bad_watch_messages_are_skipped_and_good_ones_applied() -> None:
    d = backend()
    calls: list[str] = []
    d._on_change = calls.append
    good = {"key": b64(PREFIX + "node2"), "value": b64(rec("node2", "172.16.3.2", "10.244.2.0/24"))}
    good["create_revision"] = "7"
    for line in (
        b"garbage",
        b"[1, 2]",
        b'{"result": 5}',
        b'{"result": {"events": "x"}}',
        json.dumps(
            {
                "result": {
                    "events": [5, {"kv": {"key": "%%%"}}, {"kv": {"key": b64("x"), "create_revision": []}}]
                }
            }
        ).encode(),
        json.dumps({"result": {"header": {"revision": "nope"}, "events": [{"kv": good}]}}).encode(),
    ):
        d._watch_message(line)
    assert set(d._found) == {"node2"} and calls == ["etcd peers changed"]
    with pytest.raises(EtcdError, match="compacted"):
        d._watch_message(b'{"result": {"canceled": true, "compact_revision": "3"}}')
    with pytest.raises(EtcdError):
        d._watch_message(b'{"error": {"grpc_code": 16, "message": "etcdserver: invalid auth token"}}')
    # a deletion takes the node away again
    d._watch_message(
        json.dumps({"result": {"events": [{"type": "DELETE", "kv": {"key": good["key"]}}]}}).encode()
    )
    assert d._found == {}


def test_peer_set_notifications_are_rate_limited() -> None:
    d = backend()
    calls: list[float] = []
    d._on_change = lambda _r: calls.append(time.monotonic())
    t0 = time.monotonic()
    for _ in range(50):
        d._notify()
    assert len(calls) == 1  # the first at once, the rest coalesced into one trailing call
    deadline = time.monotonic() + 3
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(calls) == 2 and calls[1] - t0 >= etcd.NOTIFY_INTERVAL * 0.9
    time.sleep(etcd.NOTIFY_INTERVAL * 1.5)
    assert len(calls) == 2  # nothing pending: nothing more
    d._stop.set()


def test_threads_survive_a_server_that_answers_nonsense() -> None:
    """Every request gets a 200 with a JSON reply of the wrong shape: the lease and watch threads log,
    back off and keep going; status says reconnecting with the last error."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()
    served = [0]

    def serve() -> None:
        srv.settimeout(0.2)
        replies = [b'{"result": [1]}', b'{"header": 7}', b'{"ID": {"x": 1}}', b'{"kvs": "no"}', b"null"]
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            with c:
                c.recv(65536)
                c.sendall(http_reply(replies[served[0] % len(replies)]))
                served[0] += 1

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    d = backend(f"http://127.0.0.1:{srv.getsockname()[1]}")
    try:
        d.start(lambda _r: None)
        time.sleep(2.5)
        assert all(th.is_alive() for th in d._threads)
        st = d.status()
        assert st["state"] == "reconnecting" and st["last_error"] and st["lease"] is None
        assert served[0] >= 4
    finally:
        d.stop()
        stop.set()
        t.join(timeout=5)
        srv.close()
    assert not any(th.is_alive() for th in d._threads)


def test_the_resume_revision_never_runs_ahead_of_applied_events() -> None:
    """A new watch resumes after `_revision`: only events actually applied (and progress
    notifications, which promise everything up to their header) may advance it."""
    d = backend()
    d._on_change = lambda _r: None
    d._revision = 10
    d._watch_message(b'{"result": {"header": {"revision": "50"}, "created": true}}')
    assert d._revision == 10  # created: the catch-up events are still to come
    kv = {"key": b64(PREFIX + "node2"), "value": b64(rec("node2", "172.16.3.2", "10.244.2.0/24"))}
    kv |= {"create_revision": "12", "mod_revision": "12"}
    d._watch_message(json.dumps({"result": {"header": {"revision": "50"}, "events": [{"kv": kv}]}}).encode())
    assert d._revision == 12  # not 50: events 13..50 may still be on their way
    d._watch_message(b'{"result": {"header": {"revision": "60"}}}')
    assert d._revision == 60  # a progress notification


def test_the_mirror_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer cannot make the daemon hold more than MAX_NODES + 1 entries of at most MAX_VALUE bytes."""
    d = backend()
    d._on_change = lambda _r: None
    monkeypatch.setattr(etcd, "MAX_NODES", 3)

    def put(name: str, rev: int, value: str) -> bytes:
        kv = {
            "key": b64(PREFIX + name),
            "value": b64(value),
            "create_revision": str(rev),
            "mod_revision": str(rev),
        }
        return json.dumps({"result": {"events": [{"kv": kv}]}}).encode()

    d._watch_message(put("big", 5, "x" * 100_000))
    assert (
        d._kvs[PREFIX + "big"][1] == ""
        and d._rejected[PREFIX + "big"] == "value is 100000 bytes (limit 4096)"
    )
    for i in range(6):
        d._watch_message(put(f"n{i}", 10 + i, rec(f"n{i}", f"172.20.0.{i + 1}", f"10.244.{100 + i}.0/24")))
    assert len(d._kvs) == 4 and d._overflow and not d._relist_pending
    d._watch_message(
        json.dumps(
            {
                "result": {
                    "events": [{"type": "DELETE", "kv": {"key": b64(PREFIX + "n0"), "mod_revision": "30"}}]
                }
            }
        ).encode()
    )
    assert d._relist_pending  # a listing decides who moves into the window


def test_ipv6_registrations_are_discovered() -> None:
    """An IPv6 underlay: a node registers an IPv6 address and peers find it like an IPv4 one; the same
    conflict rules apply (our own address, an older registration's)."""
    cfg = config.loads("""
node: {name: node1, address: '2001:db8:2::2', pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
masquerade: {enabled: false}
""")
    found, rejected = select_peers(
        [
            (PREFIX + "node2", 5, rec("node2", "2001:db8:3::2", "10.244.2.0/24")),
            (PREFIX + "node3", 6, rec("node3", "2001:db8:2::2", "10.244.3.0/24")),
            (PREFIX + "node4", 7, rec("node4", "2001:db8:3::2", "10.244.4.0/24")),
            (PREFIX + "node5", 8, rec("node5", "fe80::5", "10.244.5.0/24")),
        ],
        cfg,
        PREFIX,
        PREFIX + "node1",
        "2001:db8:2::2",
    )
    assert str(found["node2"].address) == "2001:db8:3::2"
    assert set(found) == {"node2"}
    assert "this node's" in rejected[PREFIX + "node3"]
    assert "already node2's" in rejected[PREFIX + "node4"]
    assert "link-local" in rejected[PREFIX + "node5"]
