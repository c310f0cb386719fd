"""Native next hops: their MAC addresses, and news when those (or the underlay link) change.

The datapath writes native frames straight onto the underlay with AF_PACKET, so it bypasses the
kernel's neighbour subsystem: the kernel never learns that we "use" an entry, lets it go STALE and
may garbage-collect it. We therefore (1) ask the kernel to resolve each next hop with an
RTM_NEWNEIGH carrying NTF_USE (the same as `ip neigh replace ... use`: it runs neigh_event_send(),
which starts ARP for an unknown address and re-probes a STALE one; for an IPv6 next hop the same
request starts neighbour discovery, NDP, RFC 4861), (2) listen on RTNLGRP_NEIGH
and RTNLGRP_LINK for changes, and (3) re-probe every `refresh` seconds so that a peer that moved
(a new MAC) is noticed even when nothing else talks to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK, RTMGRP_NEIGH

log = logging.getLogger("podrouter.neigh")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


NTF_USE = 0x01
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
# states whose lladdr is valid (include/net/neighbour.h NUD_VALID)
NUD_VALID = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY


class NeighborWatcher:
    """Keeps `macs` (next hop IP -> MAC) current for the addresses in `wanted` (IPv4: ARP, IPv6: NDP).

    `on_change(reason)` is called from the watcher thread whenever a wanted MAC appears, changes or
    disappears, or a link changes (MTU, state); the daemon then rebuilds and swaps its tables.
    """

    def __init__(
        self, ifindex: int, on_change: Callable[[str], None], refresh: float = 10.0, retry: float = 1.0
    ) -> None:
        self.ifindex = ifindex
        self.on_change = on_change
        self.refresh = refresh
        self.retry = retry
        self.lock = threading.Lock()
        self.wanted: set[IPAddress] = set()
        self.macs: dict[IPAddress, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Requests from the caller's thread (set_wanted, wait_resolved). The watcher thread opens its
        # own sockets: a pyroute2 (0.9) socket bound to multicast groups delivers nothing when read
        # from a thread other than the one that created it.
        self._ipr = IPRoute()
        self._thread_ipr: IPRoute | None = None
        self._last_probe: dict[IPAddress, float] = {}

    # ------------------------------------------------------------------------------- lookups

    def _req(self) -> IPRoute:
        """The request socket of the calling thread."""
        if self._thread_ipr is not None and threading.current_thread() is self._thread:
            return self._thread_ipr
        return self._ipr

    def lookup(self, ip: IPAddress) -> str | None:
        for n in self._req().get_neighbours(family=_family(ip), ifindex=self.ifindex, dst=str(ip)):
            if n["state"] & NUD_VALID and n.get_attr("NDA_LLADDR"):
                return str(n.get_attr("NDA_LLADDR"))
        return None

    def probe(self, ip: IPAddress) -> None:
        self._last_probe[ip] = time.monotonic()
        try:
            self._req().neigh(
                "replace", dst=str(ip), ifindex=self.ifindex, flags=NTF_USE, state=0, family=_family(ip)
            )
        except NetlinkError as e:
            log.debug("neighbour probe %s failed: %s", ip, e)

    def set_wanted(self, ips: set[IPAddress]) -> dict[IPAddress, str | None]:
        """Track exactly `ips`; returns their current MACs (None = not resolved yet, probing)."""
        with self.lock:
            self.wanted = set(ips)
            for ip in list(self.macs):
                if ip not in self.wanted:
                    del self.macs[ip]
            for ip in self.wanted:
                mac = self.lookup(ip)
                if mac:
                    self.macs[ip] = mac
                else:
                    self.macs.pop(ip, None)
                    self.probe(ip)
            return {ip: self.macs.get(ip) for ip in self.wanted}

    def snapshot(self) -> dict[IPAddress, str]:
        with self.lock:
            return dict(self.macs)

    def resolved(self) -> bool:
        """Whether every wanted next hop has a MAC (as of the last lookup; no netlink)."""
        with self.lock:
            return all(ip in self.macs for ip in self.wanted)

    def wait_resolved(self, timeout: float) -> bool:
        """Wait (bounded) until every wanted next hop has a MAC. Probes while waiting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                missing = [ip for ip in self.wanted if ip not in self.macs]
                for ip in missing:
                    mac = self.lookup(ip)
                    if mac:
                        self.macs[ip] = mac
                    elif time.monotonic() - self._last_probe.get(ip, 0.0) > 0.3:
                        self.probe(ip)
                if all(ip in self.macs for ip in self.wanted):
                    return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="podrouter-neigh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._ipr.close()

    def _run(self) -> None:
        mon = IPRoute()
        mon.bind(groups=RTMGRP_NEIGH | RTMGRP_LINK)
        self._thread_ipr = IPRoute()
        try:
            self._loop(mon)
        finally:
            for ipr in (mon, self._thread_ipr):
                with contextlib.suppress(Exception):
                    ipr.close()

    def _loop(self, mon: IPRoute) -> None:
        last_refresh = time.monotonic()
        # anything that changed between the caller's first lookup and the subscription above
        self.on_change("neighbour watcher started")
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([mon.fileno()], [], [], self.retry)
                reasons: set[str] = set()
                if ready:
                    for msg in mon.get():
                        reason = self._event(msg)
                        if reason:
                            reasons.add(reason)
                now = time.monotonic()
                reasons |= self._retry_missing(now)
                if now - last_refresh >= self.refresh:
                    last_refresh = now
                    with self.lock:
                        for ip in self.wanted:
                            self.probe(ip)
                for reason in sorted(reasons):
                    self.on_change(reason)
            except Exception:  # noqa: BLE001 - the watcher must survive anything netlink throws at it
                if self._stop.is_set():
                    return
                log.exception("neighbour watcher error (continuing)")
                time.sleep(self.retry)

    def _event(self, msg: object) -> str | None:
        event = msg.get("event")  # type: ignore[attr-defined]
        if event in ("RTM_NEWLINK", "RTM_DELLINK"):
            return f"link {msg.get_attr('IFLA_IFNAME')} changed"  # type: ignore[attr-defined]
        if event not in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):
            return None
        if msg["ifindex"] != self.ifindex or msg["family"] not in (socket.AF_INET, socket.AF_INET6):  # type: ignore[index]
            return None
        dst = msg.get_attr("NDA_DST")  # type: ignore[attr-defined]
        if not dst:
            return None
        ip = ipaddress.ip_address(dst)
        with self.lock:
            if ip not in self.wanted:
                return None
            old = self.macs.get(ip)
            lladdr = msg.get_attr("NDA_LLADDR")  # type: ignore[attr-defined]
            valid = event == "RTM_NEWNEIGH" and msg["state"] & NUD_VALID and lladdr  # type: ignore[index]
            if valid:
                new = str(lladdr)
                if new != old:
                    self.macs[ip] = new
                    return f"next hop {ip} is at {new}"
                return None
            # FAILED / deleted: keep using the last MAC we knew (the peer is most likely still there
            # and a transient ARP failure should not blackhole traffic) but probe again at once
            self.probe(ip)
            return None

    def _retry_missing(self, now: float) -> set[str]:
        out = set()
        with self.lock:
            for ip in self.wanted:
                if ip in self.macs:
                    continue
                mac = self.lookup(ip)
                if mac:
                    self.macs[ip] = mac
                    out.add(f"next hop {ip} resolved to {mac}")
                elif now - self._last_probe.get(ip, 0.0) >= self.retry:
                    self.probe(ip)
        return out
