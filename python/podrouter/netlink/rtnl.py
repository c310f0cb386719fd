"""Bulk rtnetlink: many route requests per system call, for thousands of peer routes.

pyroute2 costs about half a millisecond per request (build, send, wait for the answer, parse), so a
node with 5000 peers spent seconds installing their routes one by one, and as long again asking the
kernel for the next hop of each peer. Here the requests are packed by the hundred into one datagram
(the kernel answers every message of it in order), each with its own sequence number, and the
answers are matched by that number. Only the few message types podrouter needs are built and
parsed, by hand (netlink(7), rtnetlink(7)); anything else in a reply is skipped.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_METRICS = 8
RTA_TABLE = 15
RTAX_MTU = 2

_NLH = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTM = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTA = struct.Struct("=HH")
BATCH = 200  # requests per datagram (each well under 100 bytes; answers up to ~150 bytes each)
RCVBUF = 4 << 20


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTA.size + len(payload)
    return _RTA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size:
            break
        out[kind & 0x3FFF] = data[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3
    return out


@dataclass(frozen=True)
class Route:
    """One route of a dump: what podrouter compares and reports."""

    family: int
    table: int
    dst: str  # a CIDR
    proto: int
    type: int
    oif: int | None
    gateway: str | None
    mtu: int | None


@dataclass(frozen=True)
class RouteRequest:
    """A replace (`op` "replace") or delete (`op` "del") of one route."""

    op: str
    dst: str  # a CIDR
    table: int
    proto: int
    type: int = 1  # RTN_UNICAST (ignored by a delete, which matches any type)
    scope: int = 0
    oif: int | None = None
    mtu: int | None = None

    def encode(self, seq: int) -> bytes:
        net = ipaddress.ip_network(self.dst)
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        attrs = _attr(RTA_DST, net.network_address.packed) + _attr(RTA_TABLE, struct.pack("=I", self.table))
        if self.op == "del":
            kind, flags = RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK
            rtm = _RTM.pack(family, net.prefixlen, 0, 0, min(self.table, 252), self.proto, self.scope, 0, 0)
        else:
            kind, flags = RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
            rtm = _RTM.pack(
                family, net.prefixlen, 0, 0, min(self.table, 252), self.proto, self.scope, self.type, 0
            )
            if self.oif is not None:
                attrs += _attr(RTA_OIF, struct.pack("=I", self.oif))
            if self.mtu is not None:
                attrs += _attr(RTA_METRICS, _attr(RTAX_MTU, struct.pack("=I", self.mtu)))
        body = rtm + attrs
        return _NLH.pack(_NLH.size + len(body), kind, flags, seq, 0) + body


class Rtnl:
    """One NETLINK_ROUTE socket of the calling thread's namespace (create it where you use it)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, 0))
        except OSError:
            self.sock.close()
            raise
        self.seq = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _messages(self) -> Iterable[tuple[int, int, bytes]]:
        """(type, seq, payload) of every message of the next datagram."""
        data = self.sock.recv(1 << 20)
        off = 0
        while off + _NLH.size <= len(data):
            length, kind, _flags, seq, _pid = _NLH.unpack_from(data, off)
            if length < _NLH.size:
                break
            yield kind, seq, data[off + _NLH.size : off + length]
            off += (length + 3) & ~3

    def _exchange(self, requests: Sequence[bytes | None]) -> list[tuple[int, bytes]]:
        """Send each request (encoded with the sequence number its position gets; None = skip) and
        return per request (error code, reply payload): code 0 and the reply for a get, code 0 for
        an acknowledged change, else the errno."""
        out: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
        for start in range(0, len(requests), BATCH):
            chunk = range(start, min(len(requests), start + BATCH))
            base = self.seq
            self.seq += BATCH
            pending: set[int] = set()
            blob = bytearray()
            for i in chunk:
                msg = requests[i]
                if msg is None:
                    continue
                seq = base + i - start
                # the sequence number sits at offset 8 of the header
                blob += msg[:8] + struct.pack("=I", seq) + msg[12:]
                pending.add(seq)
            if not pending:
                continue
            self.sock.send(bytes(blob))
            while pending:
                for kind, seq, payload in self._messages():
                    if seq not in pending:
                        continue
                    i = start + seq - base
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EIO
                        out[i] = (code, out[i][1])
                        pending.discard(seq)
                    elif kind == NLMSG_DONE:
                        pending.discard(seq)
                    else:
                        # a get's answer (no ack follows it: the request did not ask for one)
                        out[i] = (0, payload)
                        pending.discard(seq)
        return out

    def change(self, requests: Sequence[RouteRequest]) -> list[int]:
        """Apply route replaces/deletes in bulk; the errno of each (0 = done)."""
        return [code for code, _ in self._exchange([r.encode(0) for r in requests])]

    def next_hops(self, addresses: Sequence[str]) -> list[tuple[int | None, str | None] | None]:
        """The kernel's route to each IPv4 address (RTM_GETROUTE): (oif, gateway), or None when it
        has none (ENETUNREACH and friends)."""
        reqs = []
        for a in addresses:
            body = _RTM.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, socket.inet_aton(a))
            reqs.append(_NLH.pack(_NLH.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, 0, 0) + body)
        out: list[tuple[int | None, str | None] | None] = []
        for code, payload in self._exchange(reqs):
            if code or len(payload) < _RTM.size:
                out.append(None)
                continue
            at = _attrs(payload, _RTM.size)
            oif = struct.unpack("=I", at[RTA_OIF])[0] if len(at.get(RTA_OIF, b"")) == 4 else None
            gw = socket.inet_ntoa(at[RTA_GATEWAY]) if len(at.get(RTA_GATEWAY, b"")) == 4 else None
            out.append((oif, gw))
        return out

    def dump_routes(self, family: int) -> list[Route]:
        """Every route of `family` in every table."""
        seq = self.seq
        self.seq += 1
        body = _RTM.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        head = _NLH.pack(_NLH.size + len(body), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        self.sock.send(head + body)
        routes: list[Route] = []
        alen = 16 if family == socket.AF_INET6 else 4
        while True:
            for kind, mseq, payload in self._messages():
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return routes
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EIO
                    raise OSError(code, os.strerror(code))
                if kind != RTM_NEWROUTE or len(payload) < _RTM.size:
                    continue
                fam, dst_len, _s, _t, table, proto, _scope, rtype, _f = _RTM.unpack_from(payload)
                at = _attrs(payload, _RTM.size)
                if RTA_TABLE in at and len(at[RTA_TABLE]) == 4:
                    table = struct.unpack("=I", at[RTA_TABLE])[0]
                raw = at.get(RTA_DST, b"\0" * alen)
                if len(raw) != alen:
                    raw = b"\0" * alen
                if alen == 4 and dst_len <= 32:
                    # the kernel refuses host bits under the prefix, so this is ip_network's form
                    # (and ten times cheaper, which counts with thousands of routes)
                    dst = f"{socket.inet_ntoa(raw)}/{dst_len}"
                else:
                    dst = str(ipaddress.ip_network(f"{ipaddress.ip_address(raw)}/{dst_len}", strict=False))
                oif = struct.unpack("=I", at[RTA_OIF])[0] if len(at.get(RTA_OIF, b"")) == 4 else None
                gwraw = at.get(RTA_GATEWAY)
                gw = str(ipaddress.ip_address(gwraw)) if gwraw and len(gwraw) == alen else None
                mtu = None
                if RTA_METRICS in at:
                    mraw = _attrs(at[RTA_METRICS], 0).get(RTAX_MTU, b"")
                    if len(mraw) == 4:
                        mtu = struct.unpack("=I", mraw)[0] or None
                routes.append(Route(fam, table, dst, proto, rtype, oif, gw, mtu))
