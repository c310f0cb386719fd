"""`podrouter monitor`: a live view of dropped packets (and, with `--flows`, a sample of forwarded
ones), read from the datapath's event ring.

Daemon side: a `MonitorHub` turns the ring on while at least one client listens (with flows while
any client asked for them) and off when the last one leaves, so forwarding pays nothing but a flag
check when nobody watches. One reader thread drains the ring every 50 ms, names the local pods
behind the addresses and hands each event to every subscriber whose filter it passes. A subscriber
that reads too slowly loses events (counted and reported), it never slows the others or the
datapath.

Wire protocol (the API socket): `{"op": "monitor", "flows": bool, "pod": str, "reason": str,
"address": str}` turns that connection into a stream of JSON lines: first `{"ok": true,
"monitoring": {...}}`, then one `{"event": {...}}` per event and a `{"heartbeat": {"suppressed",
"lost"}}` about every second (by which the daemon notices a client that went away).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger("podrouter.monitor")

POLL_INTERVAL = 0.05
HEARTBEAT = 1.0
QUEUE_DEPTH = 10_000
DEFAULT_RATE = 1000  # events per second the datapath records at most while monitored
DEFAULT_SAMPLE = 100  # with flows: one forwarded packet in this many


class MonitorError(ValueError):
    """A bad monitor request (the message names the key and value)."""


@dataclass(frozen=True)
class Filter:
    pod: str | None = None
    reason: str | None = None
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def matches(self, ev: dict[str, Any]) -> bool:
        if self.reason is not None and ev.get("reason") != self.reason:
            return False
        if self.pod is not None and self.pod not in (ev.get("src_pod"), ev.get("dst_pod")):
            return False
        if self.address is not None:
            mine = str(self.address)
            outer = str(ev.get("outer") or "").rsplit(":", 1)[0]
            if mine not in (ev.get("src"), ev.get("dst"), outer):
                return False
        return True


def parse_request(req: dict[str, Any], reasons: list[str]) -> tuple[Filter, bool]:
    """The filter and the flows flag of a monitor request; MonitorError names a bad key."""
    flows = req.get("flows", False)
    if not isinstance(flows, bool):
        raise MonitorError(f"flows: {flows!r} is not true or false")
    pod, reason, address = req.get("pod"), req.get("reason"), req.get("address")
    if pod is not None and (not isinstance(pod, str) or not pod or len(pod) > 253):
        raise MonitorError(f"pod: {str(pod)[:80]!r} is not a pod name")
    if reason is not None and (not isinstance(reason, str) or reason not in reasons):
        raise MonitorError(
            f"reason: {str(reason)[:80]!r} is not a drop reason (one of: {', '.join(reasons)})"
        )
    addr = None
    if address is not None:
        try:
            addr = ipaddress.ip_address(address if isinstance(address, str) else "")
        except ValueError:
            raise MonitorError(f"address: {str(address)[:80]!r} is not an IP address") from None
    return Filter(pod, reason, addr), flows


@dataclass
class Subscription:
    flt: Filter
    flows: bool
    events: queue.Queue[dict[str, Any]] = field(default_factory=lambda: queue.Queue(QUEUE_DEPTH))
    lost: int = 0


class MonitorHub:
    """Turns the datapath's event ring on for as long as anyone listens; fans events out."""

    def __init__(
        self,
        datapath: Callable[[], Any],
        pod_of: Callable[[str | None], str | None],
        rate: int = DEFAULT_RATE,
        sample: int = DEFAULT_SAMPLE,
    ) -> None:
        self._datapath = datapath
        self._pod_of = pod_of
        self.rate, self.sample = rate, sample
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._ring_flows: bool | None = None  # None: the ring is off
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def subscribe(self, flt: Filter, flows: bool) -> Subscription:
        dp = self._datapath()
        if dp is None:
            raise MonitorError("the datapath is not running")
        sub = Subscription(flt, flows)
        with self._lock:
            self._subs.append(sub)
            self._sync_ring(dp)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._pump, name="podrouter-monitor", daemon=True)
                self._thread.start()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._subs.remove(sub)
            self._sync_ring(self._datapath())

    def close(self) -> None:
        with self._lock:
            self._subs.clear()
            self._sync_ring(self._datapath())
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stats(self) -> dict[str, int]:
        dp = self._datapath()
        try:
            return {k: int(v) for k, v in dict(dp.monitor_stats()).items()} if dp is not None else {}
        except Exception:  # noqa: BLE001 - a closed datapath has no stats
            return {}

    def _sync_ring(self, dp: Any) -> None:
        """Called with the lock held: the ring on (with flows if anyone wants them) or off."""
        want = None if not self._subs else any(s.flows for s in self._subs)
        if want == self._ring_flows or dp is None:
            self._ring_flows = want if dp is not None else None
            return
        try:
            if want is None:
                dp.monitor_stop()
            else:
                dp.monitor_start(flows=want, sample=self.sample, rate=self.rate)
        except Exception:  # noqa: BLE001 - a closed datapath: nothing to record anyway
            log.exception("switching the event ring failed")
        self._ring_flows = want

    def _pump(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._subs:
                    self._thread = None
                    return
                subs = list(self._subs)
            dp = self._datapath()
            events: list[dict[str, Any]] = []
            if dp is not None:
                try:
                    events = [dict(e) for e in dp.monitor_events(4096)]
                except Exception:  # noqa: BLE001 - the datapath went away: keep the clients
                    log.exception("reading the event ring failed")
            for ev in events:
                ev["src_pod"] = self._pod_of(ev.get("src"))
                ev["dst_pod"] = self._pod_of(ev.get("dst"))
                for sub in subs:
                    if ev["kind"] == "flow" and not sub.flows:
                        continue
                    if sub.flt.matches(ev):
                        try:
                            sub.events.put_nowait(ev)
                        except queue.Full:
                            sub.lost += 1
            if len(events) < 4096:
                self._stop.wait(POLL_INTERVAL)


def stream(
    hub: MonitorHub, req: dict[str, Any], reasons: list[str], send: Callable[[dict[str, Any]], bool]
) -> None:
    """The API's `monitor` op: stream events to one client until it goes away."""
    flt, flows = parse_request(req, reasons)
    sub = hub.subscribe(flt, flows)
    try:
        desc = {
            "flows": flows,
            "pod": flt.pod,
            "reason": flt.reason,
            "address": str(flt.address) if flt.address else None,
            "rate": hub.rate,
            "sample": hub.sample if flows else None,
        }
        if not send({"ok": True, "monitoring": desc}):
            return
        next_beat = time.monotonic() + HEARTBEAT
        while True:
            try:
                ev = sub.events.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                ev = None
            if ev is not None and not send({"event": ev}):
                return
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT
                if not send({"heartbeat": {**hub.stats(), "client_lost": sub.lost}}):
                    return
    finally:
        hub.unsubscribe(sub)


# ------------------------------------------------------------------------------------ the client


def _endpoint(addr: str | None, port: int) -> str:
    if addr is None:
        return "?"
    if port == 0:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def format_event(ev: dict[str, Any]) -> str:
    """One human line: time, DROP reason / FLOW, path and direction, protocol, source -> destination."""
    t = time.strftime("%H:%M:%S", time.localtime(float(ev.get("time") or 0)))
    ms = int((float(ev.get("time") or 0) % 1) * 1000)
    what = f"DROP {ev.get('reason')}" if ev.get("kind") == "drop" else "FLOW"
    path = f"{ev.get('path') or '-'}/{ev.get('direction')}"
    src = _endpoint(ev.get("src"), int(ev.get("sport") or 0))
    dst = _endpoint(ev.get("dst"), int(ev.get("dport") or 0))
    if ev.get("src_pod"):
        src += f" ({ev['src_pod']})"
    if ev.get("dst_pod"):
        dst += f" ({ev['dst_pod']})"
    outer = f" via {ev['outer']}" if ev.get("outer") else ""
    proto = ev.get("proto") or "-"
    return f"{t}.{ms:03d} {what:<28} {path:<18} {proto:<6} {src} -> {dst}{outer} len {ev.get('len')}"


def run_client(
    sock: str,
    req: dict[str, Any],
    as_json: bool,
    count: int | None,
    out: IO[str],
    timeout: float | None = None,
) -> tuple[int, str | None]:
    """Connect, print events until `count` were shown (or forever / until `timeout` seconds pass).
    Returns (events shown, an error message or None)."""
    import socket

    shown = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(json.dumps({"op": "monitor", **req}).encode() + b"\n")
        reader = s.makefile("r", encoding="utf-8")
        s.settimeout(None if deadline is None else max(0.1, deadline - time.monotonic()))
        first = json.loads(reader.readline() or "{}")
        if not first.get("ok"):
            return 0, str(first.get("error", "the daemon ended the stream"))
        while count is None or shown < count:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.settimeout(left)
            try:
                line = reader.readline()
            except TimeoutError:
                break
            if not line:
                return shown, "the daemon ended the stream"
            msg = json.loads(line)
            if "event" in msg:
                ev = msg["event"]
                out.write(json.dumps(ev, sort_keys=True) + "\n" if as_json else format_event(ev) + "\n")
                out.flush()
                shown += 1
            elif "heartbeat" in msg and not as_json:
                hb = msg["heartbeat"]
                if hb.get("suppressed") or hb.get("lost") or hb.get("client_lost"):
                    out.write(
                        f"# rate-limited {hb.get('suppressed', 0)}, lost {hb.get('lost', 0)} "
                        f"+ {hb.get('client_lost', 0)} (too slow)\n"
                    )
                    out.flush()
    return shown, None
