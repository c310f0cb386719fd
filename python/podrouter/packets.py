"""Probe packets: minimal, valid IPv4/IPv6 packets for `podrouter explain` and the daemon's explain op.

Kept out of cli.py so that the daemon can build them without importing the command line.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["PROTOS", "build_packet"]

PROTOS = {"icmp": 1, "tcp": 6, "udp": 17}


def _csum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_packet(src: str, dst: str, proto: str = "icmp", dport: int = 0, sport: int = 40000) -> bytes:
    """A minimal, valid IPv4/IPv6 packet (TCP SYN, UDP with 4 bytes, or ICMP echo request)."""
    try:
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if s.version != d.version:
        raise ValueError(f"{src} and {dst} are not the same address family")
    if proto not in PROTOS:
        raise ValueError(f"protocol {proto!r} is not one of {', '.join(PROTOS)}")
    if not 0 <= dport <= 65535:
        raise ValueError(f"port {dport} is out of range")
    v6 = s.version == 6
    if proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        nh = 6
    elif proto == "udp":
        body = b"pr\0\0"
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
        nh = 17
    else:
        nh = 58 if v6 else 1
        l4 = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0x5052, 1) + b"podrouter"
    if v6:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(l4), nh)
    else:
        pseudo = s.packed + d.packed + struct.pack("!xBH", nh, len(l4))
    # ICMPv4 has no pseudo-header (RFC 792); TCP, UDP and ICMPv6 do (RFC 793, 768, 4443 §2.3)
    cs = _csum(l4) if (nh == 1) else _csum(pseudo + l4)
    off = {6: 16, 17: 6}.get(nh, 2)
    if nh == 17 and cs == 0:
        cs = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    l4 = l4[:off] + struct.pack("!H", cs) + l4[off + 2 :]
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(l4), nh, 64) + s.packed + d.packed + l4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x5052, 0x4000, 64, nh, 0, s.packed, d.packed)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4
