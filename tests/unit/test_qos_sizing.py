"""Queue sizing and the congestion-avoidance switch (issue 16): pure functions, no kernel."""

from __future__ import annotations

import struct

from podrouter.qos import sizing
from podrouter.qos.bpf import Aqm, build_program
from podrouter.qos.config import BandwidthConfig, parse_bandwidth_config, validate_bandwidth_config


def test_congestion_avoidance_key_is_a_boolean() -> None:
    assert parse_bandwidth_config({}).congestion_avoidance is True
    assert parse_bandwidth_config({"congestion_avoidance": False}).congestion_avoidance is False
    problems = validate_bandwidth_config({"congestion_avoidance": "yes"})
    assert problems == ["bandwidth.congestion_avoidance: 'yes' is not a boolean"]


def test_bulk_queue_is_the_target_plus_headroom_of_at_least_two_gso() -> None:
    cfg = BandwidthConfig()  # max_queue_delay 5 ms
    assert sizing.egress_queue_bytes(10_000_000, cfg) == 6250 + 2 * 65536
    assert sizing.egress_queue_bytes(100_000_000, cfg) == 62500 + 2 * 65536
    assert sizing.egress_queue_bytes(1_000_000_000, cfg) == 1_250_000
    assert sizing.egress_queue_bytes(10_000_000_000, cfg) == 12_500_000


def test_tun_queue_is_sized_from_the_budget_and_bounded() -> None:
    cfg = BandwidthConfig()
    assert sizing.tun_queue_packets(10_000_000, cfg) == sizing.TUN_TXQLEN_MIN
    assert sizing.tun_queue_packets(1_000_000_000, cfg) == 412  # 625000 B / 1514
    assert sizing.tun_queue_packets(10_000_000_000, cfg) == sizing.TUN_TXQLEN_MAX
    assert sizing.tun_txqlen({"node_egress_rate": "1G"}) == 412
    assert sizing.tun_txqlen(None) == sizing.TUN_TXQLEN_MAX  # default budget 10G


def test_aqm_program_jumps_stay_inside_the_program() -> None:
    aqm = Aqm(map_fd=3, rate_bps=10_000_000, target_ns=5_000_000, interval_ns=100_000_000,
              limit_ns=105_000_000)
    for classes in (None, (0x18101, 0x14101)):
        for dscp in (None, 46):
            code = build_program(classes, dscp, aqm)
            n = len(code) // 8
            insns = [struct.unpack_from("<BBhi", code, 8 * i) for i in range(n)]
            assert insns[-1][0] == 0x95  # exit
            for pc, (op, _regs, off, _imm) in enumerate(insns):
                if op & 0x07 == 0x05 and op not in (0x85, 0x95):  # BPF_JMP class, not call/exit
                    assert 0 <= pc + 1 + off < n, (pc, off, n)
            # the map fd is loaded with the pseudo-map source register
            assert any(op == 0x18 and regs >> 4 == 1 and imm == 3 for op, regs, _o, imm in insns)
