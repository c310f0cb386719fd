"""A tiny eBPF tc classifier per pod: DSCP marking and HTB class selection, without pedit or skbedit.

Why BPF: the kernels podrouter targets here are built without act_pedit, act_skbedit and act_csum
(only act_mirred), so `tc ... action pedit ex munge ip dsfield set` cannot load. They do have
cls_bpf and the bpf(2) syscall, and pyroute2 can attach a cls_bpf filter by fd but cannot load a
program (it has no bpf(2) wrapper). So this module assembles a ~35-instruction program by hand and
loads it with one bpf(BPF_PROG_LOAD) call through ctypes; pyroute2 then attaches it (`kind="bpf"`,
direct action) to the clsact ingress hook of the pod's host-side veth.

The program, per pod (constants baked in as immediates, so no maps are needed):

1. `skb->priority = <leaf classid>` when the pod is egress-shaped. HTB looks at skb->priority before
   running any filter (sch_htb.c htb_classify: a priority equal to one of its leaf classids selects
   that leaf), so the IFB needs no per-pod u32 filter and classification is O(1). The mark is set at
   the pod's own veth, so a pod cannot pick another pod's class by spoofing a source address.
2. If a DSCP is asked for, rewrite the IPv4 TOS / IPv6 traffic-class DSCP bits (keeping ECN) with
   bpf_skb_store_bytes and fix the IPv4 header checksum with bpf_l3_csum_replace (RFC 1624
   incremental update). Done here, before routing, so every later hop sees it -- including the
   Rust encapsulator, which copies the inner DSCP into the outer VXLAN/Geneve header.
3. Return TC_ACT_UNSPEC (-1): with direct action that means "continue with the next filter", so the
   u32 + mirred filter at the next preference then redirects the packet to the IFB.

At clsact ingress cls_bpf runs with skb->data at the Ethernet header (cls_bpf_classify pushes
mac_len), so the IP header is at offset 14 on a veth.

Instruction encoding (struct bpf_insn: u8 code, u8 dst:4 src:4, s16 off, s32 imm) is the one of
little-endian hosts (x86-64, arm64), the only ones podrouter builds for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import socket
import struct
import sys
from dataclasses import dataclass

__all__ = ["Aqm", "BpfError", "build_program", "create_state_map", "load_program", "read_state",
           "TC_ACT_UNSPEC"]

TC_ACT_UNSPEC = -1
TC_ACT_SHOT = 2

# uapi/linux/bpf.h
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_PROG_LOAD = 5
BPF_MAP_TYPE_ARRAY = 2
BPF_PSEUDO_MAP_FD = 1
_HELPER_MAP_LOOKUP_ELEM = 1
_HELPER_KTIME_GET_NS = 5
_HELPER_SKB_ECN_SET_CE = 97
BPF_PROG_TYPE_SCHED_CLS = 3
_HELPER_SKB_STORE_BYTES = 9
_HELPER_L3_CSUM_REPLACE = 10
_HELPER_SKB_LOAD_BYTES = 26
_SKB_LEN = 0  # offsetof(struct __sk_buff, len)
_SKB_PROTOCOL = 16  # offsetof(struct __sk_buff, protocol)
_SKB_PRIORITY = 32  # offsetof(struct __sk_buff, priority)
_SKB_GSO_SEGS = 164  # offsetof(struct __sk_buff, gso_segs)
# headers repeated in every segment of a GSO packet: Ethernet + IPv4 + TCP with timestamps
_GSO_SEG_HEADERS = 14 + 20 + 32

_ETH_HLEN = 14
_IPV4_CSUM = _ETH_HLEN + 10
_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}


class BpfError(OSError):
    pass


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


# opcode bytes (class | size/op | source/mode)
def _mov_reg(dst: int, src: int) -> bytes:
    return _insn(0xBF, dst, src)  # ALU64 | MOV | X


def _mov_imm(dst: int, imm: int) -> bytes:
    return _insn(0xB7, dst, imm=imm)  # ALU64 | MOV | K


def _add_imm(dst: int, imm: int) -> bytes:
    return _insn(0x07, dst, imm=imm)


def _and_imm(dst: int, imm: int) -> bytes:
    return _insn(0x57, dst, imm=imm)


def _or_imm(dst: int, imm: int) -> bytes:
    return _insn(0x47, dst, imm=imm)


def _to_be16(dst: int) -> bytes:
    return _insn(0xDC, dst, imm=16)  # ALU | END | TO_BE: network order <-> logical value


def _ldx_w(dst: int, src: int, off: int) -> bytes:
    return _insn(0x61, dst, src, off)


def _ldx_h(dst: int, src: int, off: int) -> bytes:
    return _insn(0x69, dst, src, off)


def _stx_w(dst: int, src: int, off: int) -> bytes:
    return _insn(0x63, dst, src, off)


def _stx_h(dst: int, src: int, off: int) -> bytes:
    return _insn(0x6B, dst, src, off)


def _ldx_dw(dst: int, src: int, off: int) -> bytes:
    return _insn(0x79, dst, src, off)


def _stx_dw(dst: int, src: int, off: int) -> bytes:
    return _insn(0x7B, dst, src, off)


def _st_w(dst: int, off: int, imm: int) -> bytes:
    return _insn(0x62, dst, off=off, imm=imm)


def _atomic_add_dw(dst: int, src: int, off: int) -> bytes:
    return _insn(0xDB, dst, src, off, 0)  # STX | DW | ATOMIC, imm BPF_ADD: *(u64 *)(dst + off) += src


def _add_reg(dst: int, src: int) -> bytes:
    return _insn(0x0F, dst, src)


def _sub_reg(dst: int, src: int) -> bytes:
    return _insn(0x1F, dst, src)


def _mul_reg(dst: int, src: int) -> bytes:
    return _insn(0x2F, dst, src)


def _rsh_imm(dst: int, imm: int) -> bytes:
    return _insn(0x77, dst, imm=imm)


def _ld_imm64(dst: int, value: int, src: int = 0) -> bytes:
    """Two-slot 64-bit immediate load; src BPF_PSEUDO_MAP_FD makes `value` a map fd."""
    lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    return _insn(0x18, dst, src, 0, _imm32(lo)) + _insn(0, 0, 0, 0, _imm32(hi))


def _call(helper: int) -> bytes:
    return _insn(0x85, imm=helper)


def _exit() -> bytes:
    return _insn(0x95)


class _Asm:
    """Straight-line code with forward jumps to labels, resolved at the end."""

    def __init__(self) -> None:
        self.code: list[bytes | tuple[int, int, int, str]] = []
        self.labels: dict[str, int] = {}

    def emit(self, *insns: bytes) -> None:
        self.code.extend(insns)

    def jump(self, code: int, dst: int, imm: int, label: str, src: int = 0) -> None:
        self.code.append((code, dst | (src << 4), imm, label))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        # instruction slots: an item of bytes may hold several (a 64-bit load takes two)
        slot = [0]
        for item in self.code:
            slot.append(slot[-1] + (len(item) // 8 if isinstance(item, bytes) else 1))
        out = []
        for i, item in enumerate(self.code):
            if isinstance(item, bytes):
                out.append(item)
                continue
            code, regs, imm, label = item
            off = slot[self.labels[label]] - slot[i] - 1
            out.append(struct.pack("<BBhi", code, regs, off, imm))
        return b"".join(out)


def _rewrite(asm: _Asm, mask: int, bits: int) -> None:
    """Load the first 16 bits of the IP header, rewrite DSCP, store back; r8 = old, r9 = new."""
    asm.emit(
        _mov_reg(1, 6), _mov_imm(2, _ETH_HLEN), _mov_reg(3, 10), _add_imm(3, -8), _mov_imm(4, 2),
        _call(_HELPER_SKB_LOAD_BYTES),
    )
    asm.jump(0x55, 0, 0, "out")  # JNE r0, 0: too short
    asm.emit(_ldx_h(8, 10, -8), _mov_reg(9, 8), _to_be16(9), _and_imm(9, mask), _or_imm(9, bits), _to_be16(9))
    asm.jump(0x1D, 9, 0, "out", src=8)  # JEQ r9, r8: already marked, leave the packet untouched
    asm.emit(
        _stx_h(10, 9, -8),
        _mov_reg(1, 6), _mov_imm(2, _ETH_HLEN), _mov_reg(3, 10), _add_imm(3, -8), _mov_imm(4, 2),
        _mov_imm(5, 0), _call(_HELPER_SKB_STORE_BYTES),
    )


# Frames up to this many bytes (Ethernet header included) go to the pod's interactive leaf: ICMP,
# TCP ACKs, DNS, small RPCs. Bulk data is bigger (full-size segments or GSO super-packets).
SPARSE_MAX_LEN = 256


def _imm32(value: int) -> int:
    return value if value < 1 << 31 else value - (1 << 32)


@dataclass(frozen=True)
class Aqm:
    """Congestion avoidance on a virtual queue (see _emit_aqm): a pod's shaped direction."""

    map_fd: int  # BPF array map of one _STATE_SIZE-byte entry, from create_state_map()
    rate_bps: int  # the shaper's rate: the virtual queue drains at exactly this rate
    target_ns: int  # sojourn above which ECN-capable packets are CE-marked, others dropped early
    interval_ns: int  # at most one early drop per interval (non-ECN packets)
    limit_ns: int  # the real queue's byte limit as time at the rate: the virtual queue's cap


# the state map's one value: u64 virtual finish time, u64 earliest next early drop, u64 CE marks,
# u64 early drops
_STATE_SIZE = 32
_FP_SHIFT = 20  # ns per byte in fixed point, so that 10G (0.8 ns/byte) keeps 6 significant digits


def _emit_aqm(asm: _Asm, aqm: Aqm) -> None:
    """Account the packet in a virtual queue and mark or drop it when that queue is too long.

    The virtual queue is the pod's shaper seen from outside: a clock `vt` that every packet pushes
    forward by its transmission time at the pod's rate (len * 8 / rate), and that cannot fall
    behind the present. `vt - now` is then the time this packet will wait behind the pod's earlier
    packets in the shaper's queue -- the sojourn time CoDel or PIE would measure, known here at
    enqueue, which eBPF cannot otherwise see (the HTB backlog is not readable from a program).

    - interactive frames (<= SPARSE_MAX_LEN) are counted but never marked or dropped: they go to
      their own leaf and do not wait behind the bulk queue;
    - the clock never runs more than `limit` ahead: what the leaf's byte limit tail-drops (after
      the TBF segmenter has split a GSO packet, so only the excess segments) leaves the real queue
      at its limit, and the virtual one too. Dropping whole GSO packets here instead cost 40+
      segments each;
    - sojourn > target: an ECN-capable packet gets CE (bpf_skb_ecn_set_ce); any other packet is
      dropped, but at most one per `interval` (CoDel's first drop; a sender halves its window
      once per round trip anyway). A probabilistic ramp (RED/PIE-like) was tried first: it also
      hit the flow's retransmissions, which are never ECN-capable, and cost 4% of the rate;
    - per-CPU races on `vt` can lose an update (the clock then runs slightly slow): harmless.
    """
    ns_per_byte_fp = max(1, round(8e9 / aqm.rate_bps * (1 << _FP_SHIFT)))
    asm.emit(
        _st_w(10, -4, 0),
        _ld_imm64(1, aqm.map_fd, BPF_PSEUDO_MAP_FD),
        _mov_reg(2, 10), _add_imm(2, -4),
        _call(_HELPER_MAP_LOOKUP_ELEM),
    )
    asm.jump(0x15, 0, 0, "aqm_out")  # JEQ r0, 0
    asm.emit(_mov_reg(7, 0), _call(_HELPER_KTIME_GET_NS), _mov_reg(8, 0), _ldx_dw(9, 7, 0))
    asm.jump(0x2D, 9, 0, "ahead", src=8)  # JGT r9, r8 (unsigned): the queue is not empty
    asm.emit(_mov_reg(9, 8))
    asm.label("ahead")
    asm.emit(_mov_reg(2, 9), _sub_reg(2, 8), _ldx_w(3, 6, _SKB_LEN))  # r2 = sojourn, r3 = len
    asm.jump(0xA5, 3, SPARSE_MAX_LEN + 1, "account")  # JLT r3, SPARSE_MAX_LEN + 1: interactive
    asm.emit(_ld_imm64(4, aqm.target_ns))
    asm.jump(0xBD, 2, 0, "account", src=4)  # JLE r2, r4: below target
    asm.emit(_mov_reg(1, 6), _call(_HELPER_SKB_ECN_SET_CE))
    asm.jump(0x55, 0, 0, "marked")  # JNE r0, 0
    # not ECN-capable: one early drop per interval at most
    asm.emit(_ldx_dw(1, 7, 8))
    asm.jump(0x2D, 1, 0, "account", src=8)  # JGT r1, r8: the last early drop is less than an interval old
    asm.emit(_ld_imm64(1, aqm.interval_ns), _add_reg(1, 8), _stx_dw(7, 1, 8))
    asm.jump(0x05, 0, 0, "drop")
    asm.label("marked")
    asm.emit(_mov_imm(1, 1), _atomic_add_dw(7, 1, 16))
    asm.label("account")
    # the bytes the shaper will charge: a GSO packet is segmented before HTB charges it, and every
    # segment carries its own headers, which skb->len counts once (4 % of a full-size frame).
    # Counting skb->len alone made the virtual queue drain faster than the real one and fall behind
    # it (10M egress: flow RTT 16-21 ms, 800-1700 CE packets in 10 s; with this 11-16 ms, 6-9k).
    asm.emit(_ldx_w(3, 6, _SKB_GSO_SEGS))
    asm.jump(0x25, 3, 0, "gso")  # JGT r3, 0
    asm.emit(_mov_imm(3, 1))
    asm.label("gso")
    asm.emit(_add_imm(3, -1), _mov_imm(4, _GSO_SEG_HEADERS), _mul_reg(3, 4), _ldx_w(4, 6, _SKB_LEN),
             _add_reg(3, 4))
    asm.emit(
        _ld_imm64(4, ns_per_byte_fp), _mul_reg(3, 4), _rsh_imm(3, _FP_SHIFT),
        _add_reg(9, 3), _ld_imm64(4, aqm.limit_ns), _add_reg(4, 8),
    )
    asm.jump(0xBD, 9, 0, "store", src=4)  # JLE r9, r4: within the limit
    asm.emit(_mov_reg(9, 4))  # the real queue tail-drops what is over its limit: so does the clock
    asm.label("store")
    asm.emit(_stx_dw(7, 9, 0))
    asm.jump(0x05, 0, 0, "aqm_out")
    asm.label("drop")
    asm.emit(_mov_imm(1, 1), _atomic_add_dw(7, 1, 24), _mov_imm(0, TC_ACT_SHOT), _exit())
    asm.label("aqm_out")


def build_program(classes: tuple[int, int] | None, dscp: int | None, aqm: Aqm | None = None) -> bytes:
    """The bytecode for one pod hook.

    `classes` = (bulk classid, interactive classid): skb->priority becomes the interactive class for
    frames of at most SPARSE_MAX_LEN bytes and the bulk class otherwise. `dscp` (0..63) rewrites the
    DSCP of IPv4/IPv6 packets. `aqm` adds congestion avoidance (_emit_aqm). Any may be None.
    """
    if dscp is not None and not 0 <= dscp <= 63:
        raise ValueError(f"dscp {dscp} out of range")
    asm = _Asm()
    asm.emit(_mov_reg(6, 1))
    if aqm is not None:
        # first, so a dropped packet costs nothing else; the DSCP rewrite keeps the ECN bits
        _emit_aqm(asm, aqm)
    if classes is not None:
        bulk, sparse = classes
        asm.emit(_ldx_w(2, 6, _SKB_LEN), _mov_imm(3, _imm32(bulk)))
        asm.jump(0x25, 2, SPARSE_MAX_LEN, "set_class")  # JGT r2, SPARSE_MAX_LEN
        asm.emit(_mov_imm(3, _imm32(sparse)))
        asm.label("set_class")
        asm.emit(_stx_w(6, 3, _SKB_PRIORITY))
    if dscp is not None:
        asm.emit(_ldx_w(7, 6, _SKB_PROTOCOL))
        # __sk_buff.protocol holds skb->protocol, a __be16, so compare with the network-order value
        asm.jump(0x15, 7, socket.htons(0x0800), "v4")
        asm.jump(0x15, 7, socket.htons(0x86DD), "v6")
        asm.jump(0x05, 0, 0, "out")
        asm.label("v4")
        # version/IHL (8 bits) | DSCP (6) | ECN (2)
        _rewrite(asm, 0xFF03, dscp << 2)
        asm.jump(0x55, 0, 0, "out")
        asm.emit(
            _mov_reg(1, 6), _mov_imm(2, _IPV4_CSUM), _mov_reg(3, 8), _mov_reg(4, 9), _mov_imm(5, 2),
            _call(_HELPER_L3_CSUM_REPLACE),
        )
        asm.jump(0x05, 0, 0, "out")
        asm.label("v6")
        # version (4) | DSCP (6) | ECN (2) | flow label high nibble (4); no header checksum in IPv6
        _rewrite(asm, 0xF03F, dscp << 6)
    asm.label("out")
    asm.emit(_mov_imm(0, TC_ACT_UNSPEC), _exit())
    return asm.assemble()


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 64),  # the remaining fields of union bpf_attr, zeroed
    ]


_libc = None


def load_program(code: bytes, name: str = "podr_qos") -> int:
    """bpf(BPF_PROG_LOAD) a SCHED_CLS program; returns its fd (the caller closes it after attaching)."""
    global _libc
    if sys.byteorder != "little":
        raise BpfError(0, "the DSCP/classification program is encoded for little-endian hosts")
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    insns = ctypes.create_string_buffer(code, len(code))
    # The program is ours (Apache-2.0) but uses only helpers that are not gpl_only; the kernel
    # still wants a license string, and a GPL-compatible one keeps future helpers available.
    license_ = ctypes.create_string_buffer(b"Dual MIT/GPL")
    log = ctypes.create_string_buffer(65536)
    attr = _ProgLoadAttr()
    attr.prog_type = BPF_PROG_TYPE_SCHED_CLS
    attr.insn_cnt = len(code) // 8
    attr.insns = ctypes.addressof(insns)
    attr.license = ctypes.addressof(license_)
    attr.log_level = 1
    attr.log_size = len(log)
    attr.log_buf = ctypes.addressof(log)
    attr.prog_name = name.encode()[:15]
    fd = _libc.syscall(nr, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        # A failed load with log_level 1 may also fail for a too-small log (ENOSPC); retry quiet.
        if err == 28:
            attr.log_level, attr.log_size, attr.log_buf = 0, 0, 0
            fd = _libc.syscall(nr, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
            if fd >= 0:
                return int(fd)
            err = ctypes.get_errno()
        verifier = log.value.decode(errors="replace").strip().splitlines()[-5:]
        raise BpfError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}; verifier: {' | '.join(verifier)}")
    return int(fd)


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 108),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("_rest", ctypes.c_uint8 * 96),
    ]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    global _libc
    nr = _SYSCALL_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(ret)


def create_state_map() -> int:
    """A one-entry array map holding an AQM program's state (zeroed); returns its fd."""
    attr = _MapCreateAttr()
    attr.map_type, attr.key_size, attr.value_size, attr.max_entries = BPF_MAP_TYPE_ARRAY, 4, _STATE_SIZE, 1
    return _bpf(BPF_MAP_CREATE, attr)


def read_state(map_fd: int) -> dict[str, int]:
    """The counters of an AQM state map: CE marks and drops so far."""
    key = ctypes.c_uint32(0)
    value = (ctypes.c_uint64 * (_STATE_SIZE // 8))()
    attr = _MapElemAttr()
    attr.map_fd, attr.key, attr.value = map_fd, ctypes.addressof(key), ctypes.addressof(value)
    _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    return {"ecn_marked": int(value[2]), "aqm_dropped": int(value[3])}
