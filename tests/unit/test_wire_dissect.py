"""Cross-check podrouter's VXLAN / Geneve framing against two independent dissectors.

Frames built by ``podrouter._native.encapsulate`` are written to a pcap (LINKTYPE_RAW: the record
starts at the outer IPv4 header) and read back by tshark and by scapy; both must agree with what we
asked for: VNI, outer and inner addresses, UDP ports, checksums. The other direction: frames that
scapy builds, good and deliberately broken, go through ``decapsulate`` and come back with the inner
packet or with the drop reason.

No root needed. tshark is a hard requirement (it is the independent judge here): if it is missing
the tests fail rather than skip.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from scapy.contrib.geneve import GENEVE, GeneveOptions
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, RouterAlert
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from podrouter import _native

NODE1 = "172.16.2.2"
NODE2 = "172.16.3.2"
POD1 = "10.244.1.1"
POD2 = "10.244.2.1"
POD1_V6 = "fd00:10:244:1::1"
POD2_V6 = "fd00:10:244:2::1"

LINKTYPE_RAW = 101

# tshark column order for -T fields; -E occurrence=a joins repeated fields (outer,inner) with ','.
FIELDS = [
    "frame.protocols",
    "ip.src",
    "ip.dst",
    "ip.flags.df",
    "ip.ttl",
    "ip.dsfield.dscp",
    "ip.checksum.status",
    "ipv6.src",
    "ipv6.dst",
    "udp.srcport",
    "udp.dstport",
    "udp.checksum.status",
    "vxlan.vni",
    "vxlan.flag_i",
    "geneve.vni",
    "geneve.version",
    "geneve.proto_type",
    "eth.type",
    "icmp.ident",
    "tcp.srcport",
    "tcp.dstport",
]


def tshark_path() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.fail(
            "tshark is required for tests/unit/test_wire_dissect.py (apt-get install tshark); "
            "it is the independent dissector these tests compare against"
        )
    return path


def write_pcap(path: Path, packets: Iterable[bytes]) -> None:
    """Classic little-endian pcap, LINKTYPE_RAW (each record is an IP packet)."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, pkt in enumerate(packets):
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(pkt), len(pkt)))
            f.write(pkt)


def dissect(tmp_path: Path, packets: list[bytes]) -> list[dict[str, list[str]]]:
    """Run tshark over the packets; one dict per frame, each field a list (outer first)."""
    pcap = tmp_path / "frames.pcap"
    write_pcap(pcap, packets)
    cmd = [
        tshark_path(),
        "-n",
        "-r",
        str(pcap),
        "-o",
        "udp.check_checksum:TRUE",
        "-o",
        "ip.check_checksum:TRUE",
        "-T",
        "fields",
        "-E",
        "separator=\t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ]
    for field in FIELDS:
        cmd += ["-e", field]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split("\t")
        assert len(cols) == len(FIELDS), line
        rows.append({name: (col.split(",") if col else []) for name, col in zip(FIELDS, cols, strict=True)})
    assert len(rows) == len(packets)
    return rows


def num(text: str) -> int:
    """tshark prints some integer fields in decimal and some in hex (geneve.vni, eth.type)."""
    return int(text, 0)


def params(protocol: str, vni: int) -> dict[str, object]:
    return {"protocol": protocol, "vni": vni, "src": NODE1, "dst": NODE2}


def inner_packets() -> list[tuple[str, bytes]]:
    return [
        ("icmp", bytes(IP(src=POD1, dst=POD2, tos=0xB8) / ICMP(id=0x4242, seq=7) / Raw(b"x" * 24))),
        (
            "tcp",
            bytes(IP(src=POD1, dst=POD2) / TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460)])),
        ),
        ("udp", bytes(IP(src=POD1, dst=POD2) / UDP(sport=5353, dport=53) / Raw(b"q" * 30))),
        ("udp6", bytes(IPv6(src=POD1_V6, dst=POD2_V6) / UDP(sport=5353, dport=53) / Raw(b"v6"))),
    ]


@pytest.mark.parametrize(
    ("protocol", "port", "payload"),
    [("vxlan", 4789, "ethernet"), ("geneve", 6081, "ethernet"), ("geneve", 6081, "ip")],
)
def test_tshark_and_scapy_agree_with_encapsulate(
    tmp_path: Path, protocol: str, port: int, payload: str
) -> None:
    inners = inner_packets()
    outers = [
        _native.encapsulate(raw, {**params(protocol, 0xABCDE), "geneve_payload": payload})
        for _, raw in inners
    ]
    rows = dissect(tmp_path, outers)

    for (kind, inner), outer, row in zip(inners, outers, rows, strict=True):
        protos = row["frame.protocols"][0].split(":")
        assert protos[:3] == ["raw", "ip", "udp"], protos
        assert protocol in protos, protos
        # Outer header: our addresses, DF, TTL 64, both checksums verified good (status 1).
        assert row["ip.src"][0] == NODE1 and row["ip.dst"][0] == NODE2
        assert row["ip.flags.df"][0] == "1" and row["ip.ttl"][0] == "64"
        assert row["ip.checksum.status"][0] == "1"
        assert row["udp.dstport"][0] == str(port)
        assert 49152 <= int(row["udp.srcport"][0]) <= 65535
        assert row["udp.checksum.status"][0] == "1", "outer UDP checksum must be present and correct"
        if protocol == "vxlan":
            assert [num(v) for v in row["vxlan.vni"]] == [0xABCDE]
            assert row["vxlan.flag_i"] == ["1"]
            assert num(row["eth.type"][0]) == (0x86DD if kind == "udp6" else 0x0800)
        else:
            assert [num(v) for v in row["geneve.vni"]] == [0xABCDE]
            assert row["geneve.version"] == ["0"]
            et = 0x86DD if kind == "udp6" else 0x0800
            if payload == "ethernet":
                # Transparent Ethernet Bridging, then the same inner Ethernet header as VXLAN's
                assert [num(v) for v in row["geneve.proto_type"]] == [0x6558]
                assert num(row["eth.type"][0]) == et
            else:
                assert [num(v) for v in row["geneve.proto_type"]] == [et]
                assert row["eth.type"] == []  # the inner IP packet directly
        # Inner packet as tshark sees it.
        if kind == "udp6":
            assert row["ipv6.src"] == [POD1_V6] and row["ipv6.dst"] == [POD2_V6]
            assert row["udp.dstport"][1] == "53"
            assert row["udp.checksum.status"][1] == "1"
        else:
            assert row["ip.src"][1] == POD1 and row["ip.dst"][1] == POD2
            assert row["ip.checksum.status"][1] == "1"
        if kind == "icmp":
            assert num(row["icmp.ident"][0]) == 0x4242
            assert row["ip.dsfield.dscp"] == ["46", "46"], "outer DSCP is copied from the inner header"
        if kind == "tcp":
            assert (row["tcp.srcport"], row["tcp.dstport"]) == (["40000"], ["80"])

        # scapy, independently: the same fields, and the inner bytes unchanged.
        o = IP(outer)
        assert (o.src, o.dst, o.ttl, o[UDP].dport) == (NODE1, NODE2, 64, port)
        check = IP(bytes(outer))
        del check.chksum
        del check[UDP].chksum
        rebuilt = IP(bytes(check))
        assert (rebuilt.chksum, rebuilt[UDP].chksum) == (o.chksum, o[UDP].chksum)
        if protocol == "vxlan":
            assert o[VXLAN].vni == 0xABCDE and o[VXLAN].flags & 0x08
            assert bytes(o[VXLAN].payload.payload) == inner
        else:
            assert o[GENEVE].vni == 0xABCDE and o[GENEVE].optionlen == 0
            if payload == "ethernet":
                assert o[GENEVE].proto == 0x6558 and bytes(o[GENEVE].payload.payload) == inner
            else:
                assert bytes(o[GENEVE].payload) == inner


@pytest.mark.parametrize(("protocol", "port"), [("vxlan", 4789), ("geneve", 6081)])
def test_tshark_reads_an_ipv6_outer_header(tmp_path: Path, protocol: str, port: int) -> None:
    """IPv6 underlay: outer IPv6 between the node addresses, hop limit 64, the inner DSCP/ECN as
    traffic class, a non-zero flow label from the inner flow, and a present, correct UDP checksum."""
    n1, n2 = "2001:db8:2::2", "2001:db8:3::2"
    inners = inner_packets()
    outers = [
        _native.encapsulate(raw, {"protocol": protocol, "vni": 7, "src": n1, "dst": n2}) for _, raw in inners
    ]
    cmd = [tshark_path(), "-n", "-r", str(tmp_path / "v6.pcap"), "-o", "udp.check_checksum:TRUE"]
    write_pcap(tmp_path / "v6.pcap", outers)
    fields = ["ipv6.src", "ipv6.dst", "ipv6.hlim", "ipv6.tclass", "ipv6.flow", "udp.dstport"]
    fields += ["udp.checksum.status", "vxlan.vni" if protocol == "vxlan" else "geneve.vni"]
    cmd += ["-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert len(out) == len(outers)
    labels = set()
    for (kind, _), line in zip(inners, out, strict=True):
        src, dst, hlim, tclass, flow, dport, csum, vni = line.split("\t")
        assert (src, dst, hlim, dport, csum) == (n1, n2, "64", str(port), "1"), line
        assert num(vni) == 7
        assert num(tclass) == (0xB8 if kind == "icmp" else 0)
        assert num(flow) != 0
        labels.add(num(flow))
    assert len(labels) >= 3, labels  # different inner flows, different labels
    # and decapsulate() reads it back
    d = _native.decapsulate(outers[0])
    assert d["ok"] and d["outer_src"] == n1 and d["vni"] == 7


def test_udp_source_port_follows_inner_flow() -> None:
    a = bytes(IP(src=POD1, dst=POD2) / UDP(sport=1000, dport=53))
    b = bytes(IP(src=POD1, dst=POD2) / UDP(sport=1001, dport=53))
    sport = [IP(_native.encapsulate(x, params("vxlan", 1)))[UDP].sport for x in (a, a, b)]
    assert sport[0] == sport[1]
    # Different flows should spread; a collision for these two is possible in principle, so also
    # check across many flows that more than one port is used.
    ports = {
        IP(_native.encapsulate(bytes(IP(src=POD1, dst=POD2) / UDP(sport=p, dport=53)), params("geneve", 1)))[
            UDP
        ].sport
        for p in range(1000, 1064)
    }
    assert len(ports) > 32
    assert all(49152 <= p <= 65535 for p in ports)


def vxlan_frame(
    inner_l3: bytes | None = None, flags: int = 0x08, ethertype: int = 0x0800, tos: int = 0
) -> bytes:
    inner_l3 = inner_l3 if inner_l3 is not None else bytes(IP(src=POD2, dst=POD1) / ICMP(id=9) / Raw(b"pong"))
    pkt = (
        IP(src=NODE2, dst=NODE1, tos=tos)
        / UDP(sport=50001, dport=4789)
        / VXLAN(flags=flags, vni=77)
        / Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01", type=ethertype)
        / Raw(inner_l3)
    )
    return bytes(pkt)


def geneve_frame(
    inner: bytes, *, proto: int = 0x0800, options: list[GeneveOptions] | None = None, **kw: int
) -> bytes:
    pkt = (
        IP(src=NODE2, dst=NODE1)
        / UDP(sport=50002, dport=6081)
        / GENEVE(vni=0x123456, proto=proto, options=options or [], **kw)
        / Raw(inner)
    )
    return bytes(pkt)


def test_decapsulate_scapy_vxlan() -> None:
    inner = bytes(IP(src=POD2, dst=POD1) / ICMP(id=9) / Raw(b"pong"))
    d = _native.decapsulate(vxlan_frame(inner))
    assert d["ok"], d
    assert (d["protocol"], d["vni"], d["inner"]) == ("vxlan", 77, inner)
    assert (d["outer_src"], d["outer_dst"], d["src_port"], d["dst_port"]) == (NODE2, NODE1, 50001, 4789)
    assert d["inner_ethertype"] == 0x0800 and d["ecn_action"] == "keep"
    inner6 = bytes(IPv6(src=POD2_V6, dst=POD1_V6) / UDP(sport=1, dport=2))
    d = _native.decapsulate(vxlan_frame(inner6, ethertype=0x86DD))
    assert d["ok"] and d["inner"] == inner6 and d["inner_ethertype"] == 0x86DD


def test_decapsulate_scapy_geneve_with_options() -> None:
    inner = bytes(IP(src=POD2, dst=POD1) / TCP(sport=80, dport=40000, flags="SA"))
    opts = [GeneveOptions(classid=0x0102, type=0x01, data=b"\x0a\x0b\x0c\x0d")]
    d = _native.decapsulate(geneve_frame(inner, options=opts))
    assert d["ok"], d
    assert (d["protocol"], d["vni"], d["inner"]) == ("geneve", 0x123456, inner)
    # Transparent Ethernet Bridging payload carrying IPv4 is accepted too.
    eth = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01", type=0x0800) / Raw(inner))
    d = _native.decapsulate(geneve_frame(eth, proto=0x6558))
    assert d["ok"] and d["inner"] == inner


def test_decapsulate_reasons_for_malformed_frames() -> None:
    inner = bytes(IP(src=POD2, dst=POD1) / UDP(sport=1, dport=2) / Raw(b"data"))
    arp = bytes(ARP(psrc=POD2, pdst=POD1))
    crit = [GeneveOptions(classid=0x0102, type=0x81, data=b"\x00\x00\x00\x00")]
    cases = {
        "bad_vxlan_flags": vxlan_frame(inner, flags=0x00),
        "unsupported_inner_protocol": vxlan_frame(arp, ethertype=0x0806),
        "geneve_critical_option": geneve_frame(inner, options=crit, critical=1),
        "geneve_version": geneve_frame(inner, version=1),
        "geneve_oam": geneve_frame(inner, oam=1),
        "truncated": vxlan_frame(inner)[:60],
    }
    broken = bytearray(vxlan_frame(inner))
    broken[-1] ^= 0xFF  # payload corrupted after the UDP checksum was computed
    cases["bad_outer_checksum"] = bytes(broken)
    for reason, frame in cases.items():
        d = _native.decapsulate(frame)
        assert d == {"ok": False, "reason": reason}, (reason, d)


def test_decapsulate_ecn_rfc6040() -> None:
    ect0 = bytes(IP(src=POD2, dst=POD1, tos=0x02) / UDP(sport=1, dport=2))
    d = _native.decapsulate(vxlan_frame(ect0, tos=0x03))  # outer CE
    assert d["ok"] and d["ecn_action"] == "set_ce"
    marked = IP(d["inner"])
    assert marked.tos & 0x03 == 0x03
    recomputed = IP(d["inner"])
    del recomputed.chksum
    assert IP(bytes(recomputed)).chksum == marked.chksum, "incremental checksum update must be exact"
    not_ect = bytes(IP(src=POD2, dst=POD1, tos=0x00) / UDP(sport=1, dport=2))
    assert _native.decapsulate(vxlan_frame(not_ect, tos=0x03)) == {"ok": False, "reason": "ecn_drop"}
    # Encapsulation side (RFC 6040 §4.1): inner CE is sent as outer ECT(0).
    ce = bytes(IP(src=POD1, dst=POD2, tos=0xB8 | 0x03) / UDP(sport=1, dport=2))
    assert IP(_native.encapsulate(ce, params("vxlan", 1))).tos == 0xB8 | 0x02


def test_decapsulate_forced_protocol_and_unknown_port() -> None:
    inner = bytes(IP(src=POD2, dst=POD1) / UDP(sport=1, dport=2))
    frame = bytes(
        IP(src=NODE2, dst=NODE1)
        / UDP(sport=50003, dport=8472)
        / VXLAN(vni=3)
        / Ether(type=0x0800)
        / Raw(inner)
    )
    assert _native.decapsulate(frame) == {"ok": False, "reason": "unsupported"}
    d = _native.decapsulate(frame, protocol="vxlan")
    assert d["ok"] and d["vni"] == 3 and d["inner"] == inner


def test_encapsulate_rejects_bad_params() -> None:
    inner = bytes(IP(src=POD1, dst=POD2) / UDP())
    with pytest.raises(ValueError, match="protocol"):
        _native.encapsulate(inner, {**params("vxlan", 1), "protocol": "gre"})
    with pytest.raises(ValueError, match="vni"):
        _native.encapsulate(inner, params("vxlan", 1 << 24))
    with pytest.raises(ValueError, match="src"):
        _native.encapsulate(inner, {**params("vxlan", 1), "src": "10.0.0.256"})
    with pytest.raises(ValueError, match="unknown key"):
        _native.encapsulate(inner, {**params("vxlan", 1), "vnid": 2})
    with pytest.raises(ValueError, match="missing key"):
        _native.encapsulate(inner, {"protocol": "vxlan", "vni": 1, "src": NODE1})
    with pytest.raises(ValueError, match="inner_not_ip"):
        _native.encapsulate(b"\x00" * 20, params("geneve", 1))
    custom = _native.encapsulate(
        inner, {**params("vxlan", 1), "dst_port": 8472, "inner_dst_mac": "02:aa:bb:cc:dd:ee"}
    )
    o = IP(custom)
    assert o[UDP].dport == 8472
    assert bytes(o[UDP].payload)[8:14] == bytes.fromhex("02aabbccddee")


def test_parse_matches_scapy() -> None:
    syn = bytes(IP(src=POD1, dst=POD2, ttl=63, tos=0x2E << 2 | 1) / TCP(sport=40000, dport=443, flags="S"))
    p = _native.parse(syn)
    assert (p["version"], p["src"], p["dst"], p["protocol"]) == (4, POD1, POD2, 6)
    assert (p["sport"], p["dport"], p["tcp_flags"]) == (40000, 443, 0x02)
    assert (p["ttl"], p["dscp"], p["ecn"], p["l4_offset"], p["total_len"]) == (63, 0x2E, 1, 20, len(syn))
    assert p["is_fragment"] is False and p["icmp_id"] is None

    ping = bytes(IP(src=POD1, dst=POD2) / ICMP(type=8, id=0x1234, seq=5))
    p = _native.parse(ping)
    assert (p["icmp_type"], p["icmp_code"], p["icmp_id"], p["icmp_seq"]) == (8, 0, 0x1234, 5)
    assert p["sport"] is None

    frag = bytes(
        IPv6(src=POD1_V6, dst=POD2_V6, hlim=5)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / IPv6ExtHdrFragment(id=7, m=1, offset=0)
        / UDP(sport=9, dport=10)
        / Raw(b"z" * 16)
    )
    p = _native.parse(frag)
    assert (p["version"], p["protocol"], p["l4_offset"], p["ttl"]) == (6, 17, 56, 5)
    assert p["is_fragment"] is True and (p["sport"], p["dport"]) == (9, 10)

    later = bytes(IP(src=POD1, dst=POD2, frag=185, proto=17) / Raw(b"rest-of-datagram"))
    p = _native.parse(later)
    assert p["is_fragment"] is True and p["frag_offset"] == 1480 and p["sport"] is None

    bad = bytearray(syn)
    bad[10] ^= 0xFF
    rejects = [
        (b"", "truncated"),
        (syn[:19], "truncated"),
        (bytes(bad), "bad_checksum"),
        (b"\x55" * 20, "unsupported"),
    ]
    for data, reason in rejects:
        with pytest.raises(ValueError, match=f"^{reason}$"):
            _native.parse(data)
