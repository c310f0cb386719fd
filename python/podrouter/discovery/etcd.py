"""etcd discovery through etcd's v3 JSON gateway (plain HTTP, standard library only).

This node is registered as `<prefix>/nodes/<name>` = `{"name", "address", "pod_cidrs"}`, attached to a
lease of `lease_ttl` seconds that a thread keeps alive (every ttl/3). If the daemon dies the lease
expires and every other node drops it; on a clean exit the lease is revoked at once. A second thread
lists the prefix, then watches it from the next revision (a streaming POST /v3/watch, one JSON object
per line) and re-lists after any error or compaction, so a missed event can only delay an update,
never lose it.

Entries from etcd are untrusted input: each is validated like a `peers[]` entry of the config and
ignored (with a log line) if it is malformed, claims a pod CIDR outside the cluster, or overlaps
this node's or another peer's pod CIDRs.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import socket
import threading
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from podrouter.config import Config, PeerConfig, _Validator
from podrouter.discovery.base import PeerSet

log = logging.getLogger("podrouter.discovery.etcd")

REQUEST_TIMEOUT = 3.0
BACKOFF_MAX = 5.0


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's clientv3.GetPrefixRangeEnd)."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1]).decode("latin-1")
    return "\0"


class EtcdError(Exception):
    pass


class EtcdClient:
    """The few v3 gateway calls we need, failing over between endpoints."""

    def __init__(self, endpoints: tuple[str, ...]) -> None:
        self.endpoints = list(endpoints)
        self._current = 0

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current % len(self.endpoints)]

    def rotate(self) -> None:
        self._current += 1

    def call(self, path: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            req = urllib.request.Request(
                self.endpoint + path,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - configured http(s) URL
                    reply = json.loads(r.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                last = e
                self.rotate()
                continue
            if not isinstance(reply, dict):
                raise EtcdError(f"{path}: unexpected reply {reply!r}")
            if "error" in reply and "result" not in reply:
                raise EtcdError(f"{path}: {reply.get('message') or reply['error']}")
            return reply
        raise EtcdError(f"{path}: no etcd endpoint answered ({last})")


class EtcdDiscovery:
    name = "etcd"

    def __init__(self, cfg: Config, node_address: str) -> None:
        self.cfg = cfg
        e = cfg.discovery.etcd
        self.prefix = e.prefix + "/nodes/"
        self.ttl = e.lease_ttl
        self.key = self.prefix + cfg.node.name
        self.value = json.dumps(
            {
                "name": cfg.node.name,
                "address": node_address,
                "pod_cidrs": [str(c) for c in cfg.node.pod_cidrs],
            },
            sort_keys=True,
        )
        self.client = EtcdClient(e.endpoints)
        self.lock = threading.Lock()
        self._static: PeerSet = cfg.peers
        self._found: dict[str, PeerConfig] = {}
        self._rejected: dict[str, str] = {}  # key -> why (logged once per distinct reason)
        self._lease: str | None = None
        self._revision = 0
        self._connected = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_conn: http.client.HTTPConnection | None = None
        self._on_change: Callable[[str], None] = lambda _r: None

    # ------------------------------------------------------------------------------- interface

    def start(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        try:
            self._register()
        except EtcdError as e:
            # etcd being down must not keep the node from routing with what it knows (static peers)
            log.warning("etcd registration failed, retrying in the background: %s", e)
        for target, name in (
            (self._keepalive_loop, "podrouter-etcd-lease"),
            (self._watch_loop, "podrouter-etcd-watch"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def peers(self) -> PeerSet:
        with self.lock:
            static_names = {p.name for p in self._static}
            found = [p for n, p in sorted(self._found.items()) if n not in static_names]
            return tuple(self._static) + tuple(found)

    def sources(self) -> dict[str, str]:
        with self.lock:
            out = {n: "etcd" for n in self._found}
            out.update({p.name: "static" for p in self._static})
            return out

    def update_config(self, cfg: object) -> None:
        assert isinstance(cfg, Config)
        with self.lock:
            self.cfg = cfg
            self._static = cfg.peers

    def status(self) -> dict[str, object]:
        with self.lock:
            return {
                "backend": "etcd",
                "endpoint": self.client.endpoint,
                "connected": self._connected,
                "key": self.key,
                "lease": self._lease,
                "revision": self._revision,
                "discovered": sorted(self._found),
                "rejected": dict(self._rejected),
            }

    def stop(self) -> None:
        self._stop.set()
        conn = self._watch_conn
        if conn is not None and conn.sock is not None:
            # a blocked recv() in the watch thread returns once the socket is shut down
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        if self._lease is not None:
            try:
                # revoking deletes our key now instead of after lease_ttl: peers drop us at once
                self.client.call("/v3/lease/revoke", {"ID": self._lease}, timeout=2.0)
            except EtcdError as e:
                log.warning("could not revoke the etcd lease (it expires in %ds): %s", self.ttl, e)

    # ------------------------------------------------------------------------------ registration

    def _register(self) -> None:
        grant = self.client.call("/v3/lease/grant", {"TTL": self.ttl})
        lease = str(grant.get("ID", ""))
        if not lease or lease == "0":
            raise EtcdError(f"lease grant refused: {grant}")
        self.client.call("/v3/kv/put", {"key": _b64(self.key), "value": _b64(self.value), "lease": lease})
        with self.lock:
            self._lease = lease
        log.info("registered %s in etcd (lease %s, ttl %ds)", self.key, lease, self.ttl)

    def _keepalive_loop(self) -> None:
        interval = max(0.5, self.ttl / 3)
        while not self._stop.wait(interval if self._lease else 1.0):
            try:
                if self._lease is None:
                    self._register()
                    continue
                reply = self.client.call("/v3/lease/keepalive", {"ID": self._lease})
                result = reply.get("result", reply)
                if int(result.get("TTL", 0) or 0) <= 0:
                    # the lease expired (etcd unreachable for longer than the TTL): our key is gone
                    log.warning("etcd lease %s expired; registering again", self._lease)
                    self._lease = None
                    self._register()
            except (EtcdError, ValueError) as e:
                log.warning("etcd keepalive failed: %s", e)

    # ------------------------------------------------------------------------------------ watch

    def _watch_loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                revision = self._resync()
                with self.lock:
                    self._connected = True
                backoff = 0.2
                self._watch(revision + 1)
            except (EtcdError, OSError, http.client.HTTPException, ValueError) as e:
                if self._stop.is_set():
                    return
                with self.lock:
                    self._connected = False
                log.warning("etcd watch: %s (retrying in %.1fs)", e, backoff)
                self.client.rotate()
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def _resync(self) -> int:
        reply = self.client.call(
            "/v3/kv/range", {"key": _b64(self.prefix), "range_end": _b64(prefix_end(self.prefix))}
        )
        # the oldest registration wins a conflict (a newcomer cannot take over a live node's CIDR)
        ordered = sorted(reply.get("kvs", []), key=lambda kv: int(kv.get("create_revision", 0)))
        kvs = {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in ordered}
        revision = int(reply.get("header", {}).get("revision", 0))
        found: dict[str, PeerConfig] = {}
        for key, value in kvs.items():
            peer = self._parse(key, value, found)
            if peer is not None:
                found[peer.name] = peer
        with self.lock:
            changed = found != self._found
            self._found = found
            self._revision = revision
        if changed:
            self._on_change("etcd peers changed")
        if self.key not in kvs and self._lease is not None:
            self._reput()
        return revision

    def _watch(self, start_revision: int) -> None:
        parts = urlsplit(self.client.endpoint)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname or "127.0.0.1", parts.port or 2379, timeout=REQUEST_TIMEOUT)
        self._watch_conn = conn
        try:
            body = json.dumps(
                {
                    "create_request": {
                        "key": _b64(self.prefix),
                        "range_end": _b64(prefix_end(self.prefix)),
                        "start_revision": str(start_revision),
                    }
                }
            )
            conn.request("POST", "/v3/watch", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"watch: HTTP {resp.status}")
            assert conn.sock is not None
            conn.sock.settimeout(None)  # a watch is quiet for as long as nothing changes
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    raise EtcdError("watch stream closed")
                msg = json.loads(line)
                if "error" in msg:
                    raise EtcdError(f"watch: {msg['error']}")
                result = msg.get("result", {})
                if result.get("canceled") or result.get("compact_revision"):
                    raise EtcdError(f"watch canceled (compacted at {result.get('compact_revision')})")
                self._apply_events(result)
        finally:
            self._watch_conn = None
            conn.close()

    def _apply_events(self, result: dict[str, Any]) -> None:
        events = result.get("events") or []
        if not events:
            return
        changed = False
        reput = False
        for ev in events:
            kv = ev.get("kv", {})
            key = _unb64(kv.get("key", ""))
            deleted = ev.get("type") == "DELETE"
            if key == self.key:
                reput = deleted and self._lease is not None and not self._stop.is_set()
                continue
            if not key.startswith(self.prefix):
                continue
            name = key[len(self.prefix) :]
            with self.lock:
                accepted = dict(self._found)
            peer = None if deleted else self._parse(key, _unb64(kv.get("value", "")), accepted)
            with self.lock:
                before = self._found.get(name)
                if peer is None:
                    self._found.pop(name, None)
                    if deleted:
                        self._rejected.pop(key, None)
                else:
                    self._found[peer.name] = peer
                changed = changed or before != self._found.get(name)
        with self.lock:
            self._revision = int(result.get("header", {}).get("revision", self._revision))
            recheck = changed and bool(self._rejected)
        if recheck:
            # a node left: an entry rejected for overlapping it may be acceptable now
            self._resync()
        if reput:
            self._reput()
        if changed:
            self._on_change("etcd peers changed")

    def _reput(self) -> None:
        # somebody deleted our key (or a compaction race): write it again under our lease
        with contextlib.suppress(EtcdError):
            self.client.call(
                "/v3/kv/put", {"key": _b64(self.key), "value": _b64(self.value), "lease": self._lease}
            )

    # ------------------------------------------------------------------------------- validation

    def _parse(self, key: str, value: str, accepted: dict[str, PeerConfig]) -> PeerConfig | None:
        """A discovered node, validated like a config peer; None (logged once) if unusable."""
        if key == self.key or not key.startswith(self.prefix):
            return None
        name = key[len(self.prefix) :]
        why = None
        peer = None
        try:
            data = json.loads(value)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            why = "value is not a JSON object"
        else:
            v = _Validator()
            raw = {k: data[k] for k in ("name", "address", "pod_cidr", "pod_cidrs") if k in data}
            peer = v.peer(key, raw)
            if v.problems:
                why = "; ".join(v.problems)
            elif peer is not None and peer.name != name:
                why = f"name {peer.name!r} does not match the key"
            elif peer is not None:
                why = self._conflict(peer, accepted)
        with self.lock:
            if why is not None:
                if self._rejected.get(key) != why:
                    log.warning("ignoring etcd entry %s: %s", key, why)
                self._rejected[key] = why
                return None
            self._rejected.pop(key, None)
        return peer

    def _conflict(self, peer: PeerConfig, accepted: dict[str, PeerConfig]) -> str | None:
        cfg = self.cfg
        for net in peer.pod_cidrs:
            if not any(net.version == c.version and net.subnet_of(c) for c in cfg.cluster_cidrs):  # type: ignore[arg-type]
                return f"pod CIDR {net} is outside the cluster pod CIDRs"
            for own in cfg.node.pod_cidrs:
                if net.version == own.version and net.overlaps(own):  # type: ignore[arg-type]
                    return f"pod CIDR {net} overlaps this node's {own}"
            for other in self._static:
                if other.name != peer.name and any(
                    net.version == o.version and net.overlaps(o)
                    for o in other.pod_cidrs  # type: ignore[arg-type]
                ):
                    return f"pod CIDR {net} overlaps static peer {other.name}"
        for other in accepted.values():
            if other.name != peer.name and any(
                n.version == o.version and n.overlaps(o)  # type: ignore[arg-type]
                for n in peer.pod_cidrs
                for o in other.pod_cidrs
            ):
                return f"pod CIDRs overlap those of {other.name}"
        return None


__all__ = ["EtcdClient", "EtcdDiscovery", "EtcdError", "prefix_end"]
