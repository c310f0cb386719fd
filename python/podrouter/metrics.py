"""Prometheus metrics (docs/design.md §6; the names are a contract).

A custom Collector on a registry of its own, so `/metrics` carries exactly the contract's families
(no default process/platform collectors) and every scrape reads the datapath's counters at that
moment instead of mirroring them into client-side counters.

prometheus_client is imported only when something is collected or served, not with this module:
the daemon takes its port with `listen_socket` before it is ready (a clash is still a start error)
and starts serving on that socket just after (`MetricsServer(sock=...)`), so the library's import
is not part of the start (docs/benchmarks.md, "Start-up time"). A scrape that arrives in between
waits in the socket's backlog.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("podrouter.metrics")

PATHS = ("native", "vxlan", "geneve", "masquerade", "local")  # _native.PATHS (test_native_constants)
DIRECTIONS = ("egress", "ingress")


class Source(Protocol):
    def counters(self) -> dict[str, Any]: ...
    def peer_count(self) -> int: ...
    def pod_egress_limits(self) -> dict[str, int | None]: ...
    def bgp_status(self) -> dict[str, Any]: ...


def bgp_families(status: dict[str, Any]) -> Iterator[Metric]:
    """podrouter_bgp_session_up{peer} and podrouter_bgp_announced_prefixes (docs/bgp.md); nothing
    when BGP is off."""
    if not status.get("enabled"):
        return
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily(
        "podrouter_bgp_session_up", "1 if the BGP session to the peer is established.", labels=["peer"]
    )
    for s in status.get("sessions") or []:
        up.add_metric([str(s.get("peer"))], 1.0 if s.get("up") else 0.0)
    ann = GaugeMetricFamily(
        "podrouter_bgp_announced_prefixes", "Pod CIDRs this node announces on its established BGP sessions."
    )
    ann.add_metric([], float(status.get("announced_prefixes", 0) or 0))
    yield from (up, ann)


class PodrouterCollector:
    def __init__(self, source: Source) -> None:
        self.source = source

    def describe(self) -> Iterator[Metric]:
        # an explicit (empty-valued) description keeps registration from calling collect() early
        yield from self._families({}, 0, {})

    def collect(self) -> Iterator[Metric]:
        try:
            counters = self.source.counters()
            peers = self.source.peer_count()
            limits = self.source.pod_egress_limits()
        except Exception:  # noqa: BLE001 - a scrape must never take the daemon down
            log.exception("metrics scrape failed")
            return
        yield from self._families(counters, peers, limits)
        try:
            yield from bgp_families(self.source.bgp_status())
        except Exception:  # noqa: BLE001 - a scrape must never take the daemon down
            log.exception("metrics scrape of the BGP status failed")

    @staticmethod
    def _families(counters: dict[str, Any], peers: int, limits: dict[str, int | None]) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        packets = CounterMetricFamily(
            "podrouter_packets",
            "Packets through the datapath, by path and direction.",
            labels=["path", "direction"],
        )
        nbytes = CounterMetricFamily(
            "podrouter_bytes",
            "Bytes through the datapath (IP packet length), by path and direction.",
            labels=["path", "direction"],
        )
        for family, key in ((packets, "packets"), (nbytes, "bytes")):
            values: dict[str, int] = dict(counters.get(key) or {})
            # every contract series is present from the first scrape, at 0 until used
            for path in PATHS:
                for direction in DIRECTIONS:
                    values.setdefault(f"{path}/{direction}", 0)
            for label, n in sorted(values.items()):
                path, _, direction = label.partition("/")
                family.add_metric([path, direction], float(n))
        drops = CounterMetricFamily("podrouter_drops", "Packets dropped, by reason.", labels=["reason"])
        for reason, n in sorted((counters.get("drops") or {}).items()):
            drops.add_metric([reason], float(n))
        nat = GaugeMetricFamily("podrouter_nat_entries", "Live masquerade (SNAT) connection entries.")
        nat.add_metric([], float(counters.get("nat_entries", 0) or 0))
        evictions = CounterMetricFamily(
            "podrouter_nat_evictions",
            "Masquerade entries that never saw a reply, evicted because the table was full.",
        )
        evictions.add_metric([], float(counters.get("nat_evictions", 0) or 0))
        # Bounded label set: the datapath names at most 32 pod addresses (the highest counts) and
        # sums the rest under pod="other".
        pod_limit = CounterMetricFamily(
            "podrouter_nat_pod_limit_drops",
            "New masquerade flows refused because the pod held masquerade.max_entries_per_pod entries.",
            labels=["pod"],
        )
        for pod, n in sorted((counters.get("nat_pod_limit_drops") or {}).items()):
            pod_limit.add_metric([pod], float(n))
        pod_limit.add_metric(["other"], float(counters.get("nat_pod_limit_drops_other", 0) or 0))
        # Bounded label set: the datapath names the first 16 (class, type) keys it saw and sums the
        # rest under class="other", type="other" (the keys come from the underlay, i.e. from anyone).
        gopts = CounterMetricFamily(
            "podrouter_geneve_options",
            "Geneve options received, by option class and type (critical: the type's high bit).",
            labels=["class", "type", "critical"],
        )
        for o in counters.get("geneve_options") or []:
            gopts.add_metric(
                [f"0x{o['class']:04x}", f"0x{o['type']:02x}", "true" if o["critical"] else "false"],
                float(o["count"]),
            )
        gopts.add_metric(["other", "other", "unknown"], float(counters.get("geneve_options_other", 0) or 0))
        snap = counters.get("nat_snapshot") or {}
        loaded = snap.get("loaded") or {}
        restored = GaugeMetricFamily(
            "podrouter_nat_snapshot_restored", "Masquerade entries restored from the NAT snapshot at start."
        )
        restored.add_metric([], float(loaded.get("restored", 0) or 0))
        # a snapshot refused as a whole counts 1 (its entries were never looked at)
        rejected = GaugeMetricFamily(
            "podrouter_nat_snapshot_rejected",
            "NAT snapshot entries refused at start (1 for a snapshot refused as a whole).",
        )
        whole = 1.0 if snap.get("load_error") else 0.0
        rejected.add_metric([], float(loaded.get("rejected", 0) or 0) + whole)
        writes = CounterMetricFamily("podrouter_nat_snapshot_writes", "NAT snapshot files written.")
        writes.add_metric([], float(snap.get("writes", 0) or 0))
        write_errors = CounterMetricFamily(
            "podrouter_nat_snapshot_write_errors", "NAT snapshot writes that failed."
        )
        write_errors.add_metric([], float(snap.get("write_errors", 0) or 0))
        yield from (restored, rejected, writes, write_errors)
        peer_g = GaugeMetricFamily("podrouter_peers", "Peer nodes currently known.")
        peer_g.add_metric([], float(peers))
        rate = GaugeMetricFamily(
            "podrouter_pod_egress_rate_limit_bits",
            "Egress rate limit applied to a pod, in bits per second.",
            labels=["pod"],
        )
        for pod, bits in sorted(limits.items()):
            if bits is not None:
                rate.add_metric([pod], float(bits))
        gen = GaugeMetricFamily("podrouter_table_generation", "Generation of the tables the datapath runs.")
        gen.add_metric([], float(counters.get("table_generation", 0) or 0))
        yield from (packets, nbytes, drops, nat, evictions, pod_limit, gopts, peer_g, rate, gen)


def listen_socket(listen: tuple[str, int]) -> socket.socket:
    """A TCP socket bound to `listen` (host, port) and listening, as the HTTP server would make it
    (the address family from getaddrinfo, SO_REUSEADDR, a backlog of 5), with the standard library
    only. Raises OSError (the port is taken, the address is not ours)."""
    host, port = listen
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(5)
    except BaseException:
        sock.close()
        raise
    return sock


def _http_server(sock: socket.socket, app: Any) -> Any:
    """A threading WSGI server (one daemon thread per request, no request log) on the already
    listening `sock`."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's signature
            pass

    class _Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = sock.family

        def server_bind(self) -> None:
            # adopt `sock` in place of the fresh socket TCPServer made; what HTTPServer's and
            # WSGIServer's server_bind set besides binding is set here the same way
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
            host, port = self.server_address[:2]
            self.server_name = socket.getfqdn(str(host))
            self.server_port = port
            self.setup_environ()

        def server_activate(self) -> None:
            pass  # `sock` is listening already

    server = _Server(sock.getsockname()[:2], _Quiet)
    server.set_app(app)
    return server


class MetricsServer:
    """`/metrics` over HTTP on `listen` (host, port), or on `sock` from `listen_socket`, served by a
    daemon thread."""

    def __init__(
        self, source: Source, listen: tuple[str, int] | None = None, sock: socket.socket | None = None
    ) -> None:
        if sock is None:
            if listen is None:
                raise ValueError("MetricsServer needs listen or sock")
            sock = listen_socket(listen)
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app

            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(PodrouterCollector(source))  # type: ignore[arg-type]
            self._server = _http_server(sock, make_wsgi_app(self.registry))
        except BaseException:
            sock.close()
            raise
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="podrouter-metrics", daemon=True
        )
        self._thread.start()
        self.address = self._server.server_address

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def make_source(
    counters: Callable[[], dict[str, Any]],
    peers: Callable[[], int],
    limits: Callable[[], dict[str, int | None]],
    bgp: Callable[[], dict[str, Any]] | None = None,
) -> Source:
    class _S:
        def counters(self) -> dict[str, Any]:
            return counters()

        def peer_count(self) -> int:
            return peers()

        def pod_egress_limits(self) -> dict[str, int | None]:
            return limits()

        def bgp_status(self) -> dict[str, Any]:
            return bgp() if bgp is not None else {"enabled": False}

    return _S()


__all__ = [
    "DIRECTIONS",
    "PATHS",
    "MetricsServer",
    "PodrouterCollector",
    "Source",
    "listen_socket",
    "make_source",
]
