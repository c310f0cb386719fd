"""How big each bucket and queue is, and why (docs/qos.md has the worked numbers).

Everything here counts what the qdiscs count: skb->len at the shaping point, i.e. the Ethernet frame
without FCS, preamble and inter-frame gap (14 bytes of header over the IP packet). A pod limited to
R bit/s therefore gets R bit/s of Ethernet frames; TCP goodput is R * MSS / (MTU + 14), e.g. 1448/1514
= 95.6% of R with timestamps, which is what the tests allow for.

Rules, for a class whose ceiling is R bytes/s (R = bits / 8):

- frame = mtu + 14: the largest non-GSO frame.
- burst (HTB buffer and cbuffer, TBF buffer) = max(R * burst_time, 2 * frame). The bucket only has to
  absorb the lateness of the qdisc watchdog (tens to a few hundred microseconds under load): tokens
  earned while the timer was late are capped at the bucket, so a bucket shorter than the timer slack
  would lose rate. 1 ms at R covers that with margin and keeps the overshoot after idle to 1 ms of
  traffic; two frames is the floor so a full-size frame always fits.
- queue (the leaf bfifo / TBF limit, bytes) = R * max_queue_delay + max(R * max_queue_delay,
  2 * gso_frame) for the
  egress leaf, where gso_frame = 64 KiB is the largest GSO super-packet a veth hands over (HTB cannot
  segment, so a queue smaller than one super-packet would drop it whole). For ingress TBF segments
  GSO packets bigger than its bucket (tbf_segment), so its queue is max(R * max_queue_delay, 4 * frame).
  A byte-limited FIFO (bfifo) bounds the pod's own queueing delay to limit / R, independent of
  packet sizes, which a packet-count pfifo cannot.
- quantum = clamp(R * 1 ms, frame, 200000): the DRR share when siblings of one priority borrow
  together, proportional to their limits; at least one frame (HTB's DRR needs it to make progress
  per round), at most the 200000 above which the kernel warns that quantum is big.
"""

from __future__ import annotations

from dataclasses import dataclass

from podrouter.qos.config import BandwidthConfig

ETH_HLEN = 14
GSO_MAX = 65536
HTB_QUANTUM_MAX = 200_000


@dataclass(frozen=True)
class ClassSizing:
    rate_Bps: int
    ceil_Bps: int
    burst: int
    cburst: int
    quantum: int


def frame(cfg: BandwidthConfig) -> int:
    return cfg.mtu + ETH_HLEN


def bucket(bytes_per_s: float, cfg: BandwidthConfig) -> int:
    return int(max(bytes_per_s * cfg.burst_s, 2 * frame(cfg)))


def quantum(bytes_per_s: float, cfg: BandwidthConfig) -> int:
    return int(min(max(bytes_per_s * 0.001, frame(cfg)), HTB_QUANTUM_MAX))


def htb_class(rate_bps: int, ceil_bps: int, cfg: BandwidthConfig) -> ClassSizing:
    rate_Bps = max(1, rate_bps // 8)
    ceil_Bps = max(rate_Bps, ceil_bps // 8)
    return ClassSizing(
        rate_Bps=rate_Bps,
        ceil_Bps=ceil_Bps,
        burst=bucket(rate_Bps, cfg),
        cburst=bucket(ceil_Bps, cfg),
        quantum=quantum(ceil_Bps, cfg),
    )


QUEUE_MIN_FRAMES = 3
# The bulk queue holds max_queue_delay plus headroom: congestion avoidance (bpf.py) marks or drops
# from max_queue_delay on, so TCP keeps a standing queue near it, and the headroom (another
# max_queue_delay, at least two GSO super-packets) absorbs the bursts that arrive before the sender
# has reacted. With the headroom only max(2 x target, 2 GSO), a 100M flow lost ~1000 segments a
# second to tail drops (target 62.5 KB + one 64 KiB burst filled the 128 KiB queue).
QUEUE_LIMIT_TARGETS = 2


def egress_queue_bytes(ceil_bps: int, cfg: BandwidthConfig, segmented: bool = True) -> int:
    """Bulk queue: must take a whole GSO burst (a sender's TCP hands the veth 64 KiB at once when
    its min RTT is below 512 us, tcp_tso_autosize) plus what is already queued, else TCP loses most
    of every burst; so at least two super-packets whatever the rate."""
    target = ceil_bps / 8 * cfg.max_queue_delay_s
    return int(max(target * QUEUE_LIMIT_TARGETS, target + 2 * GSO_MAX))


def ingress_queue_bytes(rate_bps: int, cfg: BandwidthConfig) -> int:
    return int(max(rate_bps / 8 * cfg.max_queue_delay_s, QUEUE_MIN_FRAMES * frame(cfg)))


# Queues that are not shaping queues, but would otherwise take a default (docs/qos.md, "Every queue"):
# - HTB's direct queue (packets classified to the qdisc itself, 1:0): nothing of ours sends there,
#   so it gets a token size instead of the device's txqueuelen (1000 on a veth);
# - the IFB's own queue between HTB and the IFB tasklet: packets already shaped, drained at CPU speed.
HTB_DIRECT_QLEN = 16
IFB_TXQLEN = 32
TUN_TXQLEN_MIN, TUN_TXQLEN_MAX = 64, 512


def tun_queue_packets(node_rate_bps: int, cfg: BandwidthConfig) -> int:
    """txqueuelen of the datapath's TUN (its qdisc and ring): the node's egress budget for
    max_queue_delay in full frames, within [64, 512]. Pod traffic reaches the TUN already shaped, so
    this queue only fills when the datapath falls behind; then it bounds that wait."""
    packets = int(node_rate_bps / 8 * cfg.max_queue_delay_s / frame(cfg))
    return max(TUN_TXQLEN_MIN, min(TUN_TXQLEN_MAX, packets))


def tun_txqlen(bandwidth_section: object) -> int:
    """tun_queue_packets for a node config's `bandwidth:` section (defaults if it is absent)."""
    from podrouter.qos.config import parse_bandwidth_config

    cfg = (
        bandwidth_section
        if isinstance(bandwidth_section, BandwidthConfig)
        else parse_bandwidth_config(bandwidth_section or {})
    )
    return tun_queue_packets(cfg.node_egress_bps, cfg)
