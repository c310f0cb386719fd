"""Pod QoS: bandwidth annotations -> tc (HTB on a node IFB for egress, TBF for ingress), priority
classes and DSCP marking, programmed through pyroute2. See docs/qos.md.

This package never imports podrouter._native: the daemon, the CNI plugin and the unit tests use it
without the Rust extension.
"""

from podrouter.qos.annotations import (
    DSCP,
    EGRESS_BANDWIDTH,
    INGRESS_BANDWIDTH,
    PRIORITIES,
    PRIORITY,
    PodQoS,
    QoSRequest,
    parse_annotations,
    parse_dscp,
    validate_annotations,
)
from podrouter.qos.config import BandwidthConfig, parse_bandwidth_config, validate_bandwidth_config
from podrouter.qos.quantity import QuantityError, format_bits, parse_quantity

__all__ = [
    "BandwidthManager",
    "cleanup",
    "BandwidthConfig",
    "PodQoS",
    "QoSRequest",
    "QuantityError",
    "DSCP",
    "EGRESS_BANDWIDTH",
    "INGRESS_BANDWIDTH",
    "PRIORITIES",
    "PRIORITY",
    "format_bits",
    "parse_annotations",
    "parse_bandwidth_config",
    "parse_dscp",
    "parse_quantity",
    "validate_annotations",
    "validate_bandwidth_config",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy so that validation does not import pyroute2
    if name in ("BandwidthManager", "cleanup"):
        from podrouter.qos import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'podrouter.qos' has no attribute {name!r}")
