"""The `bandwidth:` section of the node config (docs/design.md §4), validated and with defaults.

```yaml
bandwidth:
  enabled: true
  ifb_name: podr-ifb0          # the node's one IFB (egress shaping); at most 15 characters
  node_egress_rate: 10G        # the node's egress budget for shaped pods (HTB root class), a quantity
  priority_shares:             # each priority class's guaranteed share of the budget, in percent
    guaranteed: 60             #   (sum <= 100); spare capacity is lent in priority order
    burstable: 30
    besteffort: 10
  default_priority: burstable  # the class of a pod that has an egress limit but no priority annotation
  max_queue_delay: 5ms         # target queueing delay of one pod's own queue at its limit
  burst: 1ms                   # token-bucket depth of a pod's class, as time at the pod's rate
  mtu: 1500                    # the largest L3 packet a pod sends (sizes the minimum burst/queue)
  congestion_avoidance: true   # eBPF CE marking / early drop when a pod's queue exceeds max_queue_delay
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from podrouter.qos.annotations import PRIORITIES
from podrouter.qos.quantity import QuantityError, parse_quantity

__all__ = ["BandwidthConfig", "validate_bandwidth_config", "parse_bandwidth_config"]

_KEYS = {
    "enabled", "ifb_name", "node_egress_rate", "priority_shares", "default_priority",
    "max_queue_delay", "burst", "mtu", "congestion_avoidance",
}
_IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}\Z")
_DURATION = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<unit>us|ms|s)\Z")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class BandwidthConfig:
    enabled: bool = True
    ifb_name: str = "podr-ifb0"
    node_egress_bps: int = 10_000_000_000
    priority_shares: dict[str, int] = field(
        default_factory=lambda: {"guaranteed": 60, "burstable": 30, "besteffort": 10}
    )
    default_priority: str = "burstable"
    max_queue_delay_s: float = 0.005
    burst_s: float = 0.001
    mtu: int = 1500
    congestion_avoidance: bool = True


def _duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        # a bare number is milliseconds, the unit people think in for queueing delay
        return float(value) / 1000
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m["n"]) * _UNIT_S[m["unit"]]
    raise ValueError


def _parse(section: object) -> tuple[BandwidthConfig, list[str]]:
    p = "bandwidth"
    if section is None:
        return BandwidthConfig(), []
    if not isinstance(section, Mapping):
        return BandwidthConfig(), [f"{p}: {section!r} is not a mapping"]
    problems: list[str] = []
    kw: dict[str, object] = {}
    for key in section:
        if key not in _KEYS:
            problems.append(f"{p}.{key}: unknown key (known: {', '.join(sorted(_KEYS))})")
    if "enabled" in section:
        if isinstance(section["enabled"], bool):
            kw["enabled"] = section["enabled"]
        else:
            problems.append(f"{p}.enabled: {section['enabled']!r} is not a boolean")
    if "congestion_avoidance" in section:
        if isinstance(section["congestion_avoidance"], bool):
            kw["congestion_avoidance"] = section["congestion_avoidance"]
        else:
            problems.append(f"{p}.congestion_avoidance: {section['congestion_avoidance']!r} is not a boolean")
    if "ifb_name" in section:
        v = section["ifb_name"]
        if isinstance(v, str) and _IFNAME.match(v):
            kw["ifb_name"] = v
        else:
            problems.append(f"{p}.ifb_name: {v!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    if "node_egress_rate" in section:
        v = section["node_egress_rate"]
        try:
            kw["node_egress_bps"] = parse_quantity(v if isinstance(v, str) else str(v))
        except QuantityError as exc:
            problems.append(f"{p}.node_egress_rate: {exc}")
    if "priority_shares" in section:
        v = section["priority_shares"]
        if not isinstance(v, Mapping):
            problems.append(f"{p}.priority_shares: {v!r} is not a mapping")
        else:
            shares = dict(BandwidthConfig().priority_shares)
            ok = True
            for name, share in v.items():
                if name not in PRIORITIES:
                    known = ", ".join(PRIORITIES)
                    problems.append(f"{p}.priority_shares.{name}: unknown priority (known: {known})")
                    ok = False
                elif isinstance(share, bool) or not isinstance(share, int) or not 1 <= share <= 100:
                    problems.append(f"{p}.priority_shares.{name}: {share!r} is not a percentage 1..100")
                    ok = False
                else:
                    shares[name] = share
            if ok and sum(shares.values()) > 100:
                problems.append(
                    f"{p}.priority_shares: {shares!r} adds up to {sum(shares.values())}%, more than 100%"
                )
            elif ok:
                kw["priority_shares"] = shares
    if "default_priority" in section:
        v = section["default_priority"]
        if v in PRIORITIES:
            kw["default_priority"] = v
        else:
            problems.append(f"{p}.default_priority: {v!r} is not one of {', '.join(PRIORITIES)}")
    for key, attr, lo, hi in (("max_queue_delay", "max_queue_delay_s", 0.0002, 1.0),
                              ("burst", "burst_s", 0.00005, 1.0)):
        if key in section:
            v = section[key]
            try:
                seconds = _duration(v)
            except ValueError:
                problems.append(f"{p}.{key}: {v!r} is not a duration (e.g. 5ms, 500us)")
                continue
            if not lo <= seconds <= hi:
                problems.append(f"{p}.{key}: {v!r} is outside {lo * 1e3:g}ms..{hi * 1e3:g}ms")
            else:
                kw[attr] = seconds
    if "mtu" in section:
        v = section["mtu"]
        if isinstance(v, bool) or not isinstance(v, int) or not 576 <= v <= 65535:
            problems.append(f"{p}.mtu: {v!r} is not an MTU 576..65535")
        else:
            kw["mtu"] = v
    return BandwidthConfig(**kw), problems  # type: ignore[arg-type]


def validate_bandwidth_config(section: object) -> list[str]:
    """Problems with the `bandwidth:` section, each naming its key path ('bandwidth.node_egress_rate')."""
    return _parse(section)[1]


def parse_bandwidth_config(section: object) -> BandwidthConfig:
    cfg, problems = _parse(section)
    if problems:
        raise ValueError("; ".join(problems))
    return cfg
