"""Type stub for the private Rust extension ``podrouter._native`` (rust/py).

The public Python API is ``podrouter``; this module is private and may change between releases.
Calls that can take time (building tables, starting and stopping the datapath) release the GIL;
the datapath's worker threads never touch Python.
"""

from typing import Any, final

__version__: str
# Outer UDP source ports of podrouter's tunnel senders (49152-60999); peers drop tunnel datagrams
# whose source port lies in their masquerade.port_range (`tunnel_source_port`).
TUNNEL_SOURCE_PORT_MIN: int
TUNNEL_SOURCE_PORT_MAX: int
__all__: list[str]

ENCAP_MAX_HEADROOM: int
# Bytes each encapsulation adds in front of the inner IP packet over an IPv4 underlay: VXLAN and
# Geneve with an inner Ethernet frame 50, Geneve with an IP payload 36; an IPv6 outer header adds
# OUTER_V6_EXTRA (20) more.
VXLAN_OVERHEAD: int
GENEVE_OVERHEAD: int
GENEVE_IP_OVERHEAD: int
OUTER_V6_EXTRA: int
# The core's defaults and limits the control plane copies for validation without loading this
# module (python/podrouter/config.py; tests/unit/test_native_constants.py keeps them equal).
VXLAN_PORT: int  # 4789, IANA (RFC 7348 §5)
GENEVE_PORT: int  # 6081, IANA (RFC 8926 §3.3)
MAX_VNI: int  # 2**24 - 1
MASQUERADE_PORT_RANGE: tuple[int, int]  # the default masquerade.port_range, inclusive
NAT_DEFAULT_MAX_ENTRIES: int  # the default masquerade.max_entries
NAT_MAX_ENTRIES: int  # the largest masquerade.max_entries the datapath accepts
NAT_DEFAULT_TIMEOUTS: dict[str, int]  # masquerade.timeouts key -> default seconds
PATHS: tuple[str, ...]  # the `path` label values of podrouter_packets_total

def vtep_mac(address: str) -> str:
    """The VTEP MAC podrouter synthesizes for a node with underlay address ``address``:
    ``02:70:<IPv4 bytes>`` or ``02:76:<last four bytes of the IPv6 address>``. ``ValueError`` if
    ``address`` is not an IP address."""

def check_tables(spec: dict[str, Any], settings: dict[str, Any]) -> list[tuple[str, str]]:
    """Every problem the core's rulebook finds in a table spec compiled against the engine
    settings (``Tables(spec, settings)`` raises for the first): ``(key path, message)`` pairs in
    spec terms, e.g. ``("peers[1].pod_cidrs[0]", "'10.244.1.0/25' overlaps node's pod CIDR
    '10.244.1.0/24'")``; empty when the tables compile. ``ValueError`` for a dict of the wrong
    shape."""

def check_problems(
    spec: dict[str, Any], settings: dict[str, Any]
) -> list[tuple[str, str, str | None, list[str], str]]:
    """``check_tables`` with each problem's structure: ``(code, key path, other key path or None,
    values, message)``, e.g. ``("pod_cidr_overlap", "peers[1].pod_cidrs[0]", "node.pod_cidrs[0]",
    ["10.244.1.0/25", "10.244.1.0/24"], "...")``, for callers that word a problem in their own
    terms. The codes: docs/architecture.md, "One rulebook". ``ValueError`` for a dict of the wrong
    shape."""

def admit_problems(
    spec: dict[str, Any], settings: dict[str, Any], first: int, skip: list[str] = ...
) -> list[tuple[str, str, str | None, list[str], str]]:
    """The rulebook with precedence, for admitting untrusted records: the peers from index
    ``first`` on are admitted in spec order, each against the node, the peers before ``first``
    (which always win) and those admitted before it; the problems of each refused peer, as
    ``check_problems``' tuples. Rules (codes) named in ``skip`` are not applied."""

def default_max_entries_per_pod(max_entries: int) -> int:
    """``masquerade.max_entries_per_pod`` when only ``masquerade.max_entries`` is set: an eighth of
    the table, at least 64, at most the table."""

def version() -> str:
    """The crate version, same as ``__version__``."""

@final
class Tables:
    """Compiled routing tables, immutable: the table spec dict (docs/architecture.md; what a
    swap may change) compiled against the engine's start-time settings, an engine config dict as
    ``Datapath(config)`` takes (its ``underlay_address``, ``underlay_address6``,
    ``masquerade_port_range`` and ``masquerade_address6`` are read; plan.engine_settings).

    Raises ``ValueError("<key path>: <problem>")`` for a bad spec or settings, e.g.
    ``"peers[0].pod_cidrs[0]: '10.244.2.0/33' is not a CIDR"`` or ``"nodes: unknown key"``.
    """

    @property
    def generation(self) -> int: ...
    @property
    def node_name(self) -> str: ...
    @property
    def vtep_mac(self) -> str:
        """This node's VTEP MAC, ``02:70:<underlay IPv4 bytes>`` (IPv6 underlay: ``02:76:<last four
        bytes>``): the inner Ethernet source of its
        VXLAN frames (a Flannel-style kernel peer points its neighbour and FDB entries at it)."""
    def __new__(cls, spec: dict[str, Any], settings: dict[str, Any]) -> Tables: ...
    def classify(self, packet: bytes) -> dict[str, Any]:
        """The verdict the datapath would give an IP packet leaving a local pod. Never raises for
        bad bytes: they are a drop verdict with the reason the datapath would count.

        Returns ``{"verdict": "tunnel", "peer": "node2", "protocol": "vxlan", "vni": 1,
        "remote": "172.16.3.2", "port": 4789, "vtep_mac": "02:70:ac:10:03:02", "path": "vxlan",
        "src": ..., "dst": ...}`` (``vtep_mac``, the inner Ethernet destination, for VXLAN only),
        ``{"verdict": "native", "next_hop": "172.16.2.3", "next_hop_mac": "02:..." | None,
        "path": "native", ...}``, ``{"verdict": "local", "path": "local", ...}``,
        ``{"verdict": "masquerade", "address": "<node address>", "next_hop": ..., "next_hop_mac":
        ..., "path": "masquerade", ...}`` or ``{"verdict": "drop", "reason": "no_route", ...}``.
        """
    def route_paths(self, destinations: list[str]) -> list[str | None]:
        """For each destination address inside a peer's pod CIDRs the path the tables give it
        (``"native"``, ``"vxlan"`` or ``"geneve"``), decided like ``classify`` but whether or not the
        next hop is resolved yet; ``None`` for an address outside every peer's pod CIDRs.
        ``ValueError("destinations[i]: ...")`` for one that is not an IP address."""
    def classify_ingress(
        self, outer_src: str, udp_port: int, payload: bytes, outer_tos: int = 0
    ) -> dict[str, Any]:
        """The verdict for a UDP payload received on ``udp_port`` from ``outer_src`` (the decap and
        validation checks the datapath runs): ``{"verdict": "accept", "peer": "node2",
        "protocol": "vxlan", "vni": 1, "src": ..., "dst": ..., "path": "vxlan"}`` or
        ``{"verdict": "drop", "reason": "spoofed_inner_source"}``. ``ValueError`` for a bad
        ``outer_src``."""

@final
class Datapath:
    """The I/O engine: a TUN device, tunnel UDP sockets, AF_PACKET on the underlay, worker threads.

    config keys (unknown keys are a ``ValueError`` naming them):
      underlay_address (str, required): IPv4 or IPv6 address the tunnel ports are bound on (outer
      source towards peers of its family); underlay_address6 (str | None): dual-stack underlay,
      the IPv6 address next to an IPv4 underlay_address (a second set of tunnel sockets);
      tun_name (str, default "podr0"); tun_mtu (int | None: MTU set at creation);
      tun_persist (bool, default False: TUNSETPERSIST, the device outlives the Datapath);
      underlay_ifindex (int, default 0 = no native/masquerade path); underlay_mac (str);
      vxlan_port (int, default 4789; 0 = no listener); geneve_port (int, default 6081; 0 = none);
      workers (int, default 1: one TUN queue each, IFF_MULTI_QUEUE above 1);
      offload (bool, default True: TUN TSO/USO, AF_PACKET vnet header, TUN write coalescing);
      tunnel_gso (bool, default False; the daemon passes tunnel.gso != "off": encapsulated TCP
        super-packets to the kernel whole through the UDP-tunnel GSO TAP where Linux 6.17+ and,
        per underlay family, rp_filter (IPv4) and IPv6 forwarding allow;
        counters()["offload"]["tunnel_gso"] says whether it is in use, ["tunnel_gso_error"] why
        not, or why one family of a dual-stack underlay does not use it);
      tx_sockets (int, default 8: tunnel send sockets = distinct outer source ports);
      batch (int, default 32: TUN reads / recvmmsg messages per wake-up);
      nat (dict, optional): masquerade table limits and timeouts in seconds, each optional --
        max_entries (default 1048576), tcp_syn_sent (120), tcp_established (7440),
        tcp_fin_wait (120), tcp_time_wait (120), tcp_close (10), udp_unreplied (30),
        udp_assured (120), icmp (30). Read at construction;
      masquerade_port_range ([first, last], default [61000, 65535]): the node ports of translated
        flows; masquerade_address6 (str | None): where IPv6 pods are translated to (None: not).

    The underlay addresses and the two masquerade keys are the start-time settings every table
    is compiled against (``Tables(spec, settings)``): only a restart changes them.

    The constructor creates the TUN device (the control plane then configures it with pyroute2);
    it raises ``ValueError`` for a bad config before touching anything and ``OSError`` when the
    kernel refuses (no root, name in use). Masquerade replies are read from a filtered AF_PACKET
    copy: the control plane must drop the originals (nftables, prerouting) so the kernel does not
    answer them (docs/architecture.md, "I/O engine").
    """

    def __new__(cls, config: dict[str, Any]) -> Datapath: ...
    @staticmethod
    def adopt(config: dict[str, Any], fds: dict[str, Any]) -> Datapath:
        """A datapath on fds a running predecessor or the fd keeper passed (docs/handover.md): fds
        is {"tun": [fd per worker], "rx": [[fd, ...] per worker], "masq": fd | None, "masq6":
        fd | None}; duplicated (close your own), each checked against config (OSError on a
        mismatch)."""
    def quiesce(self) -> None:
        """Stop the workers at a batch boundary, keeping every fd open (handover, old side)."""
    def resume(self) -> None:
        """Restart the workers quiesce() stopped, on the same fds."""
    def handover_fds(self) -> dict[str, Any]:
        """While quiesced: the fds to pass, shaped like adopt()'s fds (still the datapath's)."""
    def keeper_fds(self) -> dict[str, Any]:
        """Copies of the fds packets arrive on, made by the last start(), shaped like adopt()'s
        fds, for the fd keeper; the caller owns (closes) them. Empty after the first call."""
    @property
    def tun_name(self) -> str: ...
    @property
    def tun_ifindex(self) -> int: ...
    def start(self, tables: Tables) -> None:
        """Open the sockets and start the workers (``OSError`` if a port is taken, ...)."""
    def swap_tables(self, tables: Tables) -> None:
        """Atomically replace the tables (one pointer store); in-flight batches finish on the old
        ones, no packet is lost. Tables compiled against other start-time settings than this
        datapath's config (node.address / address6, masquerade.port_range / address6) raise
        ``ValueError`` naming the key (a restart applies the change) and the running tables
        stay; ``start`` refuses them likewise."""
    def counters(self) -> dict[str, Any]:
        """``{"packets": {"vxlan/egress": n, ... every path/direction}, "bytes": {...},
        "drops": {reason: n, ... every reason, incl. "tx_error"}, "nat_entries": n,
        "nat_alloc_failures": n, "nat_evictions": n, "nat_pod_limit_drops": {"pod ip": n, ... at most
        32, the highest}, "nat_pod_limit_drops_other": n, "geneve_options": [{"class": n,
        "type": n, "critical": bool, "count": n}, ... at most 16, by key], "geneve_options_other": n,
        "table_generation": n, "workers": n,
        "offload": {"tun": ["csum", "tso4", ...], "udp_gso": bool, "udp_gro": bool,
        "packet_vnet_hdr": bool, "tun_reads": n, "tun_gso_reads": n, "tun_writes": n,
        "tun_gso_writes": n, "tun_coalesced_segments": n, "udp_rx_messages": n,
        "udp_rx_gro_messages": n, "udp_tx_calls": n, "udp_tx_gso_messages": n,
        "packet_tx_calls": n, "packet_tx_gso_frames": n, "batches": n, "tap_gso_writes": n,
        "udp_rx_whole_gso": n, "tunnel_gso": bool, "tunnel_gso_error": str | None}}``.
        Packets are wire packets (a GSO super-packet counts once per segment)."""
    def monitor_start(self, flows: bool = False, sample: int = 100, rate: int = 1000) -> None:
        """Turn the event ring on: drops (and with ``flows`` one forwarded packet in ``sample``), at
        most ``rate`` events a second. Older events are not read."""
    def monitor_stop(self) -> None:
        """Turn the event ring off (drop points go back to one flag check). Idempotent."""
    def monitor_events(self, max: int = 1024) -> list[dict[str, Any]]:
        """Up to ``max`` events, oldest first: ``{"kind": "drop"|"flow", "reason", "path",
        "direction", "family", "proto", "src", "dst", "sport", "dport", "len", "outer", "time"}``."""
    def monitor_stats(self) -> dict[str, int]:
        """``{"suppressed": n, "lost": n}`` since the ring was turned on."""
    def set_nat_snapshot(self, path: str | None) -> None:
        """Keep the NAT table in the snapshot file ``path`` (None: memory only); before ``start``.
        The first start restores it before the workers run; a thread rewrites it (write + rename,
        at most every 0.5 s while the table changes); ``stop`` writes it once more."""
    def nat_snapshot_stats(self) -> dict[str, Any]:
        """``{"path", "loaded": None | {"restored", "expired", "rejected", "outside_cidrs",
        "port_range", "duplicate", "invalid", "full"}, "load_error": None | str, "writes",
        "write_errors", "last_write_error", "last_entries", "last_bytes", "last_write_us",
        "last_lock_us"}``."""
    def stop(self) -> None:
        """Stop the workers and close the sockets; the TUN stays. Idempotent."""
    def close(self) -> None:
        """Stop and close the TUN device (the kernel deletes it). Idempotent."""
    def is_running(self) -> bool:
        """True while started and every worker thread is alive."""

# Wire helpers (rust/py/src/wire.rs): tests, tooling, `explain`.
def encapsulate(inner: bytes, params: dict[str, Any]) -> bytes:
    """Outer IPv4 or IPv6 (by src/dst) + UDP + VXLAN/Geneve around ``inner``. params: protocol, vni, src, dst,
    dst_port?, inner_src_mac?, inner_dst_mac?. ``ValueError`` for bad params."""

def decapsulate(outer: bytes, protocol: str | None = None) -> dict[str, Any]:
    """``{"ok": True, "protocol", "vni", "inner", "inner_ethertype", "ecn_action", "outer_src",
    "outer_dst", "src_port", "dst_port"}`` or ``{"ok": False, "reason": ...}``."""

def parse(packet: bytes) -> dict[str, Any]:
    """The datapath's parse of an IP packet; ``ValueError(reason)`` for one it would drop."""

# Load generators (rust/py/src/blast.rs) for the benchmark suite; each blocks without the GIL.
def udp_blast(
    dst: str, port: int, size: int, seconds: float, batch: int = 64, rate_pps: int | None = None
) -> dict[str, Any]: ...
def udp_sink(bind: str, port: int, seconds: float, idle: float | None = None) -> dict[str, Any]: ...
def tcp_connect_rate(dst: str, port: int, seconds: float, threads: int = 4) -> dict[str, Any]: ...
def tcp_accept_sink(bind: str, port: int, seconds: float) -> int: ...
