"""Type stub for the private Rust extension ``podrouter._native`` (rust/py).

The public Python API is ``podrouter``; this module is private and may change between releases.
"""

from typing import Any

__version__: str

class Tables:
    """Compiled routing tables, built from the table spec dict (docs/architecture.md)."""

    generation: int
    def __init__(self, spec: dict[str, Any]) -> None: ...
    def classify(self, packet: bytes) -> dict[str, Any]:
        """The verdict the datapath would give an IP packet leaving a local pod.

        Returns e.g. ``{"verdict": "tunnel", "peer": "node2", "protocol": "vxlan", "vni": 1,
        "remote": "172.16.3.2", "port": 4789}``, ``{"verdict": "native", "next_hop": "172.16.2.3",
        "next_hop_mac": "..."}``, ``{"verdict": "local"}``, ``{"verdict": "masquerade", ...}`` or
        ``{"verdict": "drop", "reason": "no_route"}``.
        """
    def classify_ingress(self, outer_src: str, udp_port: int, payload: bytes) -> dict[str, Any]:
        """The verdict for an encapsulated datagram received on a tunnel port (decap checks)."""

class Datapath:
    """The running I/O engine: a TUN device, tunnel UDP sockets, AF_PACKET on the underlay.

    config keys: tun_name (str), tun_mtu (int), underlay_ifindex (int), underlay_mac (str),
    underlay_address (str), vxlan_port (int), geneve_port (int), workers (int), offload (bool).
    The constructor creates the TUN device (the control plane then configures it with pyroute2).
    """

    def __init__(self, config: dict[str, Any]) -> None: ...
    def start(self, tables: Tables) -> None: ...
    def swap_tables(self, tables: Tables) -> None:
        """Atomically replace the tables; in-flight packets finish on the old ones."""
    def counters(self) -> dict[str, Any]:
        """{"packets": {"vxlan/egress": n, ...}, "bytes": {...}, "drops": {reason: n},
        "nat_entries": n, "nat_alloc_failures": n, "table_generation": n, "offload": {...}}"""
    def stop(self) -> None: ...
    def is_running(self) -> bool: ...

def version() -> str: ...
