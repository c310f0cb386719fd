"""etcd discovery through etcd's v3 JSON gateway (HTTP or HTTPS, standard library only).

This node is registered as `<prefix>/nodes/<name>` = `{"name", "address", "pod_cidrs"}`, attached to a
lease of `lease_ttl` seconds that a thread keeps alive (every ttl/3). If the daemon dies the lease
expires and every other node drops it. A daemon stopping for a successor (SIGTERM, docs/operations.md)
leaves the lease to run out (the successor re-registers the key under its own lease, so peers see
no change); `podrouter cleanup` deletes the key at once. A second thread
lists the prefix, then watches it from the next revision (a streaming POST /v3/watch, one JSON object
per line) and re-lists after any error or compaction, so a missed event can only delay an update,
never lose it.

Hardening (docs/security.md, "etcd"):

* Every request has a connect and read timeout and a deadline for the whole reply; replies are read
  with a size limit (`MAX_REPLY`, one watch message `MAX_WATCH_MESSAGE`).
* Watch liveness: a watch that stays silent for `watch_idle` seconds (the lease TTL, at most 30 s) is
  dropped and a new one opened on a new connection, from the last revision applied (etcd replays
  what came since; a compacted history cancels it and the prefix is re-listed), since a half-open
  connection (a stalled proxy, a frozen server) looks exactly like a quiet one. A failure shows as
  discovery state `reconnecting` in `status`, with the age of the last event and the restart count.
* Every reply and every entry is validated; a malformed one is logged and skipped. Both threads
  catch every exception, log it and retry with backoff: nothing an etcd writer sends can stop the
  lease keepalive (which would get this node dropped everywhere) or the watch.
* Entries are untrusted: each is validated like a `peers[]` entry of the config (and must be at
  most `MAX_VALUE` bytes). Conflicts are the core's rulebook (`discovery.base.refuse_by_rulebook`,
  docs/architecture.md "One rulebook"), settled by etcd's create revision, oldest first: an entry
  whose address is this node's, a static peer's or an older entry's, or inside the cluster pod
  CIDRs, or whose pod CIDRs leave the cluster's or overlap this node's, a static peer's or an older
  entry's, is refused with a reason (`status`: `discovery.rejected`). A newcomer therefore cannot
  take over or knock out a live node.
* Peer-set notifications to the daemon (each a table rebuild) are rate-limited to one per
  `NOTIFY_INTERVAL`, the last one always delivered.
* TLS (`ca_file`, `cert_file`/`key_file`) and etcd v3 authentication (`username`/`password`: a token
  from /v3/auth/authenticate sent as the `Authorization` header, fetched again when etcd says it
  expired).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from podrouter import native
from podrouter.config import Config, EtcdConfig, PeerConfig, _Validator, engine_settings, table_spec
from podrouter.discovery.base import Other, PeerSet, Verdict, cidr_index, refuse_by_rulebook

log = logging.getLogger("podrouter.discovery.etcd")

REQUEST_TIMEOUT = 3.0  # seconds: connect, each read, and the whole reply of one request
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
MAX_REPLY = 16 << 20  # bytes of one reply (a range of MAX_NODES small records is far below)
MAX_WATCH_MESSAGE = 4 << 20  # bytes of one watch message (etcd's default request limit is 1.5 MiB)
MAX_VALUE = 4096  # bytes of one node record (ours is about 100)
MAX_NODES = 8192  # entries under the prefix considered, oldest first (the scale bench runs 5000)
WATCH_IDLE_MAX = 30.0  # seconds
NOTIFY_INTERVAL = 1.0  # seconds between two peer-set notifications (table rebuilds)
GRPC_UNAUTHENTICATED = 16


class EtcdError(Exception):
    pass


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: Any) -> str:
    """A base64 field of a reply as text; raises ValueError if it is not base64 of UTF-8."""
    if s is None:
        return ""
    if not isinstance(s, str):
        raise ValueError(f"{s!r} is not a base64 string")
    try:
        return base64.b64decode(s, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(f"not base64 of UTF-8 text: {e}") from None


def _int(v: Any, what: str) -> int:
    """An int64 field of a reply (the gateway sends them as strings); raises ValueError."""
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError(f"{what}: {v!r} is not an integer")
    n = int(v)
    if not 0 <= n < 1 << 63:
        raise ValueError(f"{what}: {v!r} is out of range")
    return n


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's clientv3.GetPrefixRangeEnd)."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1]).decode("latin-1")
    return "\0"


def tls_context(e: EtcdConfig) -> ssl.SSLContext | None:
    """The client TLS context for https endpoints (None if every endpoint is http). Raises
    `EtcdError` naming the config key whose file cannot be used."""
    if not any(ep.startswith("https://") for ep in e.endpoints):
        return None
    try:
        ctx = ssl.create_default_context(cafile=e.ca_file)
    except (OSError, ssl.SSLError) as err:
        raise EtcdError(f"discovery.etcd.ca_file: {e.ca_file!r}: cannot load the CA: {err}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if e.cert_file is not None:
        try:
            ctx.load_cert_chain(e.cert_file, e.key_file)
        except (OSError, ssl.SSLError) as err:
            raise EtcdError(
                f"discovery.etcd.cert_file: {e.cert_file!r} / key_file {e.key_file!r}: cannot load the "
                f"client certificate: {err}"
            ) from None
    return ctx


def start_problems(cfg: Config) -> list[str]:
    """What `podrouter run` checks before touching anything (exit 2): the TLS files load."""
    if cfg.discovery.backend != "etcd":
        return []
    try:
        tls_context(cfg.discovery.etcd)
    except EtcdError as err:
        return [str(err)]
    return []


def _read_limited(resp: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise EtcdError("reply not complete in time (a stalled or slow peer)")
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise EtcdError(f"reply larger than {limit} bytes")
        chunks.append(chunk)


def _auth_failure(err: Any) -> bool:
    """An etcd error that means "get a new token" (simple tokens expire, JWTs too)."""
    if isinstance(err, dict):
        code = err.get("code", err.get("grpc_code"))
        text = f"{err.get('message', '')} {err.get('error', '')}"
    else:
        code, text = None, str(err)
    return (
        code == GRPC_UNAUTHENTICATED or "invalid auth token" in text or "token" in text and "expired" in text
    )


class EtcdClient:
    """The few v3 gateway calls we need, failing over between endpoints."""

    def __init__(self, e: EtcdConfig | tuple[str, ...], tls: ssl.SSLContext | None = None) -> None:
        if isinstance(e, tuple):
            e = EtcdConfig(endpoints=e)
        self.endpoints = list(e.endpoints)
        self._current = 0
        self.tls = tls if tls is not None else tls_context(e)
        self.username = e.username
        self._password = e.password
        self._token: str | None = None
        self._token_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current % len(self.endpoints)]

    def rotate(self) -> None:
        self._current += 1

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        parts = urlsplit(self.endpoint)
        host, port = parts.hostname or "127.0.0.1", parts.port or 2379
        if parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        token = self.token()
        if token:
            h["Authorization"] = token
        return h

    def token(self) -> str | None:
        if self.username is None:
            return None
        with self._token_lock:
            if self._token is None:
                reply = self._post(
                    "/v3/auth/authenticate",
                    {"name": self.username, "password": self._password},
                    {"Content-Type": "application/json"},
                    REQUEST_TIMEOUT,
                    64 << 10,
                )
                if "error" in reply or "code" in reply:
                    raise EtcdError(f"authentication as {self.username!r} failed: {self._message(reply)}")
                tok = reply.get("token")
                if not isinstance(tok, str) or not tok or len(tok) > 8192 or not tok.isprintable():
                    raise EtcdError("authentication: the reply has no usable token")
                self._token = tok
                log.info("authenticated to etcd as %s", self.username)
            return self._token

    def forget_token(self) -> None:
        with self._token_lock:
            self._token = None

    @staticmethod
    def _message(reply: dict[str, Any]) -> str:
        msg = reply.get("message") or reply.get("error")
        return str(msg)[:300]

    def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float, limit: int
    ) -> dict[str, Any]:
        conn = self.connection(timeout)
        # `timeout` bounds the connect and each read; the whole reply gets a few of them
        deadline = time.monotonic() + 3 * timeout
        try:
            conn.request("POST", path, body=json.dumps(body), headers=headers)
            resp = conn.getresponse()
            try:
                raw = _read_limited(resp, limit, deadline)
            finally:
                resp.close()
        finally:
            conn.close()
        try:
            reply = json.loads(raw)
        except (ValueError, RecursionError):
            text = "".join(c if c.isprintable() else " " for c in raw[:200].decode("utf-8", "replace"))
            raise EtcdError(f"{path}: HTTP {resp.status}, not JSON: {text.strip()!r}") from None
        if not isinstance(reply, dict):
            raise EtcdError(f"{path}: HTTP {resp.status}, not a JSON object")
        if resp.status != 200 and "error" not in reply and "code" not in reply:
            raise EtcdError(f"{path}: HTTP {resp.status}")
        return reply

    def call(
        self, path: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT, limit: int = MAX_REPLY
    ) -> dict[str, Any]:
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            for attempt in (0, 1):
                try:
                    reply = self._post(path, body, self.headers(), timeout, limit)
                except (OSError, http.client.HTTPException, EtcdError) as e:
                    last = e
                    break  # the next endpoint
                if ("error" in reply or "code" in reply) and "result" not in reply:
                    if attempt == 0 and self.username is not None and _auth_failure(reply):
                        log.info("etcd auth token expired; authenticating again")
                        self.forget_token()
                        continue
                    raise EtcdError(f"{path}: {self._message(reply)}")
                return reply
            self.rotate()
            if self.username is not None:
                self.forget_token()  # tokens are per member (simple tokens are not replicated)
        raise EtcdError(f"{path}: no etcd endpoint answered ({last})")


# ------------------------------------------------------------------------------- peer selection


class _Oversize(str):
    """What the mirror keeps of a value over MAX_VALUE bytes: nothing but its size."""

    size: int = 0


def _mirror_value(value: str) -> str:
    size = len(value.encode())
    if size <= MAX_VALUE:
        return value
    big = _Oversize("")
    big.size = size
    return big


def parse_entry(key: str, value: str, prefix: str) -> tuple[PeerConfig | None, str | None]:
    """One node record, validated like a config peer: (peer, None) or (None, why)."""
    size = value.size if isinstance(value, _Oversize) else len(value.encode())
    if size > MAX_VALUE:
        return None, f"value is {size} bytes (limit {MAX_VALUE})"
    return _parse_small(key, value, prefix)


@functools.lru_cache(maxsize=2 * MAX_NODES)
def _parse_small(key: str, value: str, prefix: str) -> tuple[PeerConfig | None, str | None]:
    # cached: the peer set is recomputed from every entry after each change
    name = key[len(prefix) :]
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return None, "value is not a JSON object"
    v = _Validator()
    raw = {k: data[k] for k in ("name", "address", "pod_cidr", "pod_cidrs") if k in data}
    peer = v.peer(key, raw)
    if v.problems or peer is None:
        return None, "; ".join(v.problems) or "not a node record"
    if peer.name != name:
        return None, f"name {peer.name!r} does not match the key"
    return peer, None


def select_peers(
    entries: Iterable[tuple[str, int, str]],
    cfg: Config,
    prefix: str,
    own_key: str,
    own_address: str,
) -> tuple[dict[str, PeerConfig], dict[str, str]]:
    """The usable discovered peers (by name) and the refused entries (key -> why) from `entries` =
    (key, create_revision, value). The oldest registration wins every conflict, and this node and the
    static peers win over all of them.

    Each record's own shape is checked here (`parse_entry`); its relations with this node, the
    static peers and the other records are the core's rulebook (`native.check_problems`, the rules
    `Tables::build` enforces), asked about one spec of this node, the static peers and the records,
    oldest first, and worded here by etcd key (`_why`)."""
    static = {p.name for p in cfg.peers}
    candidates: list[tuple[str, PeerConfig]] = []
    rejected: dict[str, str] = {}
    ordered = sorted(entries, key=lambda e: (e[1], e[0]))
    for n, (key, _rev, value) in enumerate(ordered):
        if key == own_key or not key.startswith(prefix):
            continue
        if n >= MAX_NODES:
            rejected[key] = f"more than {MAX_NODES} entries under {prefix} (the oldest are used)"
            continue
        peer, why = parse_entry(key, value, prefix)
        if peer is None:
            rejected[key] = why or "invalid"
            continue
        if peer.name in static:
            continue  # a static peer of that name wins (its per-peer overrides apply)
        candidates.append((key, peer))
    try:
        address = str(ipaddress.ip_address(own_address))
    except ValueError:
        address = "0.0.0.0"  # not known: the core skips its checks against the node's address
    settings = engine_settings(address, None, cfg.masquerade.port_range, None)

    def spec_of(peers: list[dict[str, Any]]) -> dict[str, Any]:
        return table_spec(cfg.node, cfg.cluster_cidrs, cfg.routing, cfg.tunnel, cfg.masquerade, peers)

    kept, refused = refuse_by_rulebook(spec_of, settings, cfg.peers, candidates, _why, _SKIP)
    rejected.update(refused)
    return {peer.name: peer for _key, peer in kept}, rejected


# The core's rules a discovered record can break (native.Problem.code), in the order a record's
# reason is chosen when it breaks several: its address first, then its pod CIDRs in order.
# `address_family` (an IPv6 record on a node without an IPv6 underlay address) is left to
# plan.refuse_conflicts, which knows the node's resolved `node.address6`.
_ADDRESS_RULES = {"address_is_node": 0, "address_taken": 1, "cluster_contains_peer_address": 2}
_CIDR_RULES = {"pod_cidr_outside_cluster": 0, "pod_cidr_overlap": 1}
_SKIP = ("address_family",)


def _owner(other: Other) -> str:
    if other is None or other[0] == "node":
        return "this node"
    return f"static peer {other[1]}" if other[0] == "fixed" else other[1]


def _why(prob: native.Problem, other: Other) -> Verdict:
    """A problem of the core worded for an etcd record ("address X is already node2's")."""
    v = prob.values
    if prob.code in _ADDRESS_RULES:
        rank = (0, _ADDRESS_RULES[prob.code])
        if prob.code == "address_is_node":
            return rank, f"address {v[0]} is this node's"
        if prob.code == "address_taken":
            return rank, f"address {v[0]} is already {_owner(other)}'s"
        return rank, f"address {v[1]} is inside the cluster pod CIDR {v[0]}"
    if prob.code in _CIDR_RULES:
        rank = (1, 2 * cidr_index(prob) + _CIDR_RULES[prob.code])
        if prob.code == "pod_cidr_outside_cluster":
            return rank, f"pod CIDR {v[0]} is outside the cluster pod CIDRs"
        return rank, f"pod CIDR {v[0]} overlaps {_owner(other)}'s {v[1]}"
    if prob.code == "name_taken":
        return (2, 0), f"name {v[0]} is already {_owner(other)}'s"
    return None  # the core's message stands


# -------------------------------------------------------------------------------------- backend


class EtcdDiscovery:
    name = "etcd"

    def __init__(self, cfg: Config, node_address: str) -> None:
        self.cfg = cfg
        e = cfg.discovery.etcd
        self.prefix = e.prefix + "/nodes/"
        self.ttl = e.lease_ttl
        self.watch_idle = float(min(WATCH_IDLE_MAX, max(2, e.lease_ttl)))
        self.key = self.prefix + cfg.node.name
        self.node_address = node_address
        self.value = json.dumps(
            {
                "name": cfg.node.name,
                "address": node_address,
                "pod_cidrs": [str(c) for c in cfg.node.pod_cidrs],
            },
            sort_keys=True,
        )
        self.client = EtcdClient(e)
        self.lock = threading.Lock()
        self._static: PeerSet = cfg.peers
        self._kvs: dict[str, tuple[int, str]] = {}  # our mirror of the prefix: key -> (create rev, value)
        self._overflow = False  # entries beyond MAX_NODES exist (the newest are not mirrored)
        self._relist_pending = False  # the mirror needs a fresh listing (see _apply_events)
        self._last_list = 0.0
        self._found: dict[str, PeerConfig] = {}
        self._rejected: dict[str, str] = {}  # key -> why (logged once per distinct reason)
        self._lease: str | None = None
        self._revision = 0
        self._state = "connecting"
        self._last_event = 0.0  # monotonic time of the last watch message or successful re-list
        self._watch_restarts = 0
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_conn: http.client.HTTPConnection | None = None
        self._on_change: Callable[[str], None] = lambda _r: None
        self._notify_lock = threading.Lock()
        self._last_notify = -NOTIFY_INTERVAL
        self._notify_timer: threading.Timer | None = None

    # ------------------------------------------------------------------------------- interface

    def start(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        try:
            self._register()
        except (EtcdError, OSError, http.client.HTTPException, ValueError) as e:
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

    def mesh_status(self) -> dict[str, object]:
        return {}

    def update_config(self, cfg: object) -> None:
        assert isinstance(cfg, Config)
        with self.lock:
            self.cfg = cfg
            self._static = cfg.peers
        self._recompute()

    def status(self) -> dict[str, object]:
        with self.lock:
            age = round(time.monotonic() - self._last_event, 1) if self._last_event else None
            return {
                "backend": "etcd",
                "endpoint": self.client.endpoint,
                "state": self._state,
                "connected": self._state == "connected",
                "tls": self.client.tls is not None,
                "auth": self.client.username is not None,
                "key": self.key,
                "lease": self._lease,
                "revision": self._revision,
                "last_event_age": age,
                "watch_idle": self.watch_idle,
                "watch_restarts": self._watch_restarts,
                "last_error": self._last_error,
                "discovered": sorted(self._found),
                "rejected": dict(self._rejected),
            }

    def stop(self, revoke: bool = True) -> None:
        self._stop.set()
        with self._notify_lock:
            if self._notify_timer is not None:
                self._notify_timer.cancel()
        conn = self._watch_conn
        if conn is not None and conn.sock is not None:
            # a blocked recv() in the watch thread returns once the socket is shut down
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        if self._lease is not None and revoke:
            try:
                # revoking deletes our key now instead of after lease_ttl: peers drop us at once
                self.client.call("/v3/lease/revoke", {"ID": self._lease}, timeout=2.0)
            except (EtcdError, OSError, http.client.HTTPException, ValueError) as e:
                log.warning("could not revoke the etcd lease (it expires in %ds): %s", self.ttl, e)

    # ------------------------------------------------------------------------------ registration

    def _register(self) -> None:
        grant = self.client.call("/v3/lease/grant", {"TTL": self.ttl})
        lease = grant.get("ID")
        if isinstance(lease, int | str) and not isinstance(lease, bool):
            lease = str(lease)
        if not isinstance(lease, str) or not lease.isdigit() or lease == "0":
            raise EtcdError(f"lease grant refused: {str(grant)[:200]}")
        self.client.call("/v3/kv/put", {"key": _b64(self.key), "value": _b64(self.value), "lease": lease})
        with self.lock:
            self._lease = lease
        log.info("registered %s in etcd (lease %s, ttl %ds)", self.key, lease, self.ttl)

    def _keepalive_loop(self) -> None:
        interval = max(0.5, self.ttl / 3)
        delay = interval if self._lease else 1.0
        backoff = BACKOFF_MIN
        while not self._stop.wait(delay):
            try:
                if self._lease is None:
                    self._register()
                else:
                    reply = self.client.call("/v3/lease/keepalive", {"ID": self._lease})
                    result = reply.get("result", reply)
                    if not isinstance(result, dict):
                        raise EtcdError(f"keepalive: unexpected reply {str(reply)[:200]}")
                    if _int(result.get("TTL", 0) or 0, "TTL") <= 0:
                        # the lease expired (etcd unreachable for longer than the TTL): our key is gone
                        log.warning("etcd lease %s expired; registering again", self._lease)
                        with self.lock:
                            self._lease = None
                        self._register()
                delay = interval
                backoff = BACKOFF_MIN
            except Exception as e:  # noqa: BLE001 - nothing may end this thread: the lease would expire
                if self._stop.is_set():
                    return
                log.warning("etcd keepalive failed: %s (retrying in %.1fs)", e, backoff)
                delay = backoff
                backoff = min(BACKOFF_MAX, backoff * 2, max(0.5, self.ttl / 3))

    # ------------------------------------------------------------------------------------ watch

    def _set_state(self, state: str, error: str | None = None) -> None:
        with self.lock:
            if self._state != state:
                log.info("etcd discovery: %s%s", state, f" ({error})" if error else "")
            self._state = state
            if error is not None:
                self._last_error = error

    def _watch_loop(self) -> None:
        backoff = BACKOFF_MIN
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list or self._relist_pending:
                    # at most one listing per NOTIFY_INTERVAL, however the prefix churns
                    self._stop.wait(max(0.0, self._last_list + NOTIFY_INTERVAL - time.monotonic()))
                    self._resync()
                    need_list = False
                    self._set_state("connected")
                backoff = BACKOFF_MIN
                with self.lock:
                    revision = self._revision
                # returns after watch_idle seconds of silence: watch again from the last revision
                # applied (etcd replays what came since; a compacted one cancels -> re-list)
                self._watch(revision + 1)
            except Exception as e:  # noqa: BLE001 - nothing may end this thread (logged, retried)
                if self._stop.is_set():
                    return
                need_list = True
                self._set_state("reconnecting", str(e)[:300])
                level = logging.WARNING if isinstance(e, EtcdError | OSError) else logging.ERROR
                log.log(
                    level, "etcd watch: %s (retrying in %.1fs)", e, backoff, exc_info=level == logging.ERROR
                )
                self.client.rotate()
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            with self.lock:
                self._watch_restarts += 1

    def _resync(self) -> int:
        reply = self.client.call(
            "/v3/kv/range",
            {
                "key": _b64(self.prefix),
                "range_end": _b64(prefix_end(self.prefix)),
                "sort_target": "CREATE",
                "sort_order": "ASCEND",
                "limit": MAX_NODES + 1,
            },
        )
        header = reply.get("header")
        if not isinstance(header, dict):
            raise EtcdError(f"range: reply without a header: {str(reply)[:200]}")
        revision = _int(header.get("revision", 0), "revision")
        raw_kvs = reply.get("kvs") or []
        if not isinstance(raw_kvs, list):
            raise EtcdError("range: kvs is not a list")
        kvs: dict[str, tuple[int, str]] = {}
        malformed = 0
        for kv in raw_kvs:
            try:
                key, rev, value = self._kv(kv)
            except ValueError as e:
                malformed += 1
                log.warning("etcd range: skipping a malformed entry: %s", e)
                continue
            kvs[key] = (rev, _mirror_value(value))
        more = bool(reply.get("more"))
        with self.lock:
            self._overflow = more
            self._relist_pending = False
            self._last_list = time.monotonic()
            self._kvs = kvs
            self._revision = revision
            self._last_event = time.monotonic()
        self._recompute()
        own = kvs.get(self.key)
        if (own is None or own[1] != self.value) and self._lease is not None:
            self._reput()
        return revision

    @staticmethod
    def _kv(kv: Any) -> tuple[str, int, str]:
        if not isinstance(kv, dict):
            raise ValueError(f"{str(kv)[:100]} is not a key-value object")
        key = _unb64(kv.get("key"))
        if not key:
            raise ValueError("empty key")
        return key, _int(kv.get("create_revision", 0), "create_revision"), _unb64(kv.get("value"))

    def _watch(self, start_revision: int) -> None:
        conn = self.client.connection(REQUEST_TIMEOUT)
        self._watch_conn = conn
        try:
            body = json.dumps(
                {
                    "create_request": {
                        "key": _b64(self.prefix),
                        "range_end": _b64(prefix_end(self.prefix)),
                        "start_revision": str(start_revision),
                        "progress_notify": True,
                    }
                }
            )
            conn.request("POST", "/v3/watch", body=body, headers=self.client.headers())
            resp = conn.getresponse()
            if resp.status != 200:
                if resp.status == 401:
                    self.client.forget_token()
                raise EtcdError(f"watch: HTTP {resp.status}")
            self._set_state("connected")
            assert conn.sock is not None
            # a quiet watch and a dead connection look the same: after watch_idle seconds without a
            # message, watch again on a new connection (a frozen server then fails to answer that)
            conn.sock.settimeout(self.watch_idle)
            while not self._stop.is_set():
                try:
                    line = resp.readline(MAX_WATCH_MESSAGE + 1)
                except TimeoutError:
                    log.debug("etcd watch quiet for %.0fs: watching again", self.watch_idle)
                    return
                if not line:
                    raise EtcdError("watch stream closed")
                if len(line) > MAX_WATCH_MESSAGE:
                    raise EtcdError(f"watch message larger than {MAX_WATCH_MESSAGE} bytes")
                with self.lock:
                    self._last_event = time.monotonic()
                self._watch_message(line)
                if self._relist_pending:
                    return
        finally:
            self._watch_conn = None
            conn.close()

    def _watch_message(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            log.warning("etcd watch: skipping a message that is not JSON (%d bytes)", len(line))
            return
        if not isinstance(msg, dict):
            log.warning("etcd watch: skipping a message that is not an object")
            return
        if "error" in msg:
            if _auth_failure(msg["error"]):
                self.client.forget_token()
            raise EtcdError(f"watch: {str(msg['error'])[:300]}")
        result = msg.get("result")
        if not isinstance(result, dict):
            log.warning("etcd watch: skipping a message without a result")
            return
        if result.get("canceled") or result.get("compact_revision"):
            raise EtcdError(f"watch canceled (compacted at {result.get('compact_revision')})")
        self._apply_events(result)

    def _apply_events(self, result: dict[str, Any]) -> None:
        events = result.get("events") or []
        if not isinstance(events, list):
            log.warning("etcd watch: events is not a list; skipped")
            return
        reput = False
        touched = False
        with self.lock:
            applied = self._revision
            for ev in events:
                try:
                    if not isinstance(ev, dict):
                        raise ValueError("event is not an object")
                    key, rev, value = self._kv(ev.get("kv"))
                    applied = max(applied, _int(ev["kv"].get("mod_revision", 0), "mod_revision"))
                except ValueError as e:
                    log.warning("etcd watch: skipping a malformed event: %s", e)
                    continue
                if not key.startswith(self.prefix):
                    continue
                deleted = ev.get("type") == "DELETE"
                if key == self.key:
                    # our registration deleted or overwritten by somebody: write it again
                    reput = reput or deleted or value != self.value
                if deleted:
                    touched = self._kvs.pop(key, None) is not None or touched
                    if self._overflow:
                        # an entry ignored for the limit may be inside it now: list again (the
                        # range is bounded to the oldest MAX_NODES + 1)
                        self._relist_pending = True
                elif key not in self._kvs and len(self._kvs) > MAX_NODES:
                    # a new key has the newest create revision: beyond the limit, it loses anyway
                    if not self._overflow:
                        log.warning(
                            "more than %d entries under %s: ignoring the newest", MAX_NODES, self.prefix
                        )
                    self._overflow = True
                else:
                    self._kvs[key] = (rev, _mirror_value(value))
                    touched = True
            header = result.get("header")
            if not events and not result.get("created") and isinstance(header, dict):
                # a progress notification: every event up to the header's revision was sent
                with contextlib.suppress(ValueError):
                    applied = max(applied, _int(header.get("revision", 0), "revision"))
            # the revision up to which every event has been applied (where a new watch resumes);
            # not a message's header revision, which can run ahead of the events still to come
            self._revision = applied
        if touched:
            self._recompute()
        if reput and self._lease is not None and not self._stop.is_set():
            self._reput()

    def _recompute(self) -> None:
        with self.lock:
            entries = [(k, rev, v) for k, (rev, v) in self._kvs.items()]
            cfg = self.cfg
        found, rejected = select_peers(entries, cfg, self.prefix, self.key, self.node_address)
        self._publish(found, rejected)

    def _refused_label(self) -> str:
        """How a log line names the registry an entry was refused from."""
        return "etcd entry"

    def _publish(self, found: dict[str, PeerConfig], rejected: dict[str, str]) -> None:
        """Store one selection: log each entry refused anew (or for a new reason), keep the usable
        peers and the refusals for `status`, and tell the daemon when the usable set changed."""
        with self.lock:
            for key, why in rejected.items():
                if self._rejected.get(key) != why:
                    log.warning("ignoring %s %s: %s", self._refused_label(), key, why)
            changed = found != self._found
            self._found = found
            self._rejected = rejected
        if changed:
            self._notify()

    def _notify(self) -> None:
        """Tell the daemon, at most once per NOTIFY_INTERVAL (each call rebuilds its tables); a change
        inside the interval is delivered when it ends."""
        with self._notify_lock:
            if self._notify_timer is not None:
                return  # already scheduled: it reads the newest peer set when it fires
            wait = self._last_notify + NOTIFY_INTERVAL - time.monotonic()
            if wait > 0:
                self._notify_timer = threading.Timer(wait, self._notify_fire)
                self._notify_timer.daemon = True
                self._notify_timer.start()
                return
            self._last_notify = time.monotonic()
        self._on_change("etcd peers changed")

    def _notify_fire(self) -> None:
        with self._notify_lock:
            self._notify_timer = None
            self._last_notify = time.monotonic()
        if not self._stop.is_set():
            self._on_change("etcd peers changed")

    def _reput(self) -> None:
        # somebody deleted or overwrote our key (or a compaction race): write it again under our lease
        try:
            self.client.call(
                "/v3/kv/put", {"key": _b64(self.key), "value": _b64(self.value), "lease": self._lease}
            )
            log.warning("re-registered %s in etcd (it was deleted or overwritten)", self.key)
        except (EtcdError, OSError, http.client.HTTPException, ValueError) as e:
            log.warning("could not re-register %s: %s", self.key, e)


__all__ = [
    "EtcdClient",
    "EtcdDiscovery",
    "EtcdError",
    "parse_entry",
    "prefix_end",
    "select_peers",
    "start_problems",
    "tls_context",
]
