"""Pod QoS annotations: what a pod asks for, validated strictly.

| annotation                        | value                                                  |
|-----------------------------------|--------------------------------------------------------|
| `kubernetes.io/egress-bandwidth`  | a Kubernetes quantity in bit/s, 1k..1P (quantity.py)   |
| `kubernetes.io/ingress-bandwidth` | the same                                               |
| `podrouter.io/priority`           | `guaranteed` / `burstable` / `besteffort`              |
| `podrouter.io/dscp`               | 0..63, or EF, VA, AF11..AF43, CS0..CS7 (RFC 2474/2597/3246/5865) |

Other annotations (a pod has many) are ignored. Priority and DSCP names are case-insensitive, as the
tools that print them (tc, Wireshark) are; quantities are not, as in Kubernetes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from podrouter.qos.quantity import QuantityError, parse_quantity

__all__ = [
    "EGRESS_BANDWIDTH",
    "INGRESS_BANDWIDTH",
    "PRIORITY",
    "DSCP",
    "PRIORITIES",
    "PodQoS",
    "QoSRequest",
    "parse_annotations",
    "parse_dscp",
    "validate_annotations",
]

EGRESS_BANDWIDTH = "kubernetes.io/egress-bandwidth"
INGRESS_BANDWIDTH = "kubernetes.io/ingress-bandwidth"
PRIORITY = "podrouter.io/priority"
DSCP = "podrouter.io/dscp"

PRIORITIES = ("guaranteed", "burstable", "besteffort")

# RFC 2474 class selectors CSx = x << 3; RFC 2597 AFxy = 8x + 2y (x in 1..4, y in 1..3);
# RFC 3246 EF = 46; RFC 5865 VOICE-ADMIT = 44.
_DSCP_NAMES: dict[str, int] = {"EF": 46, "VA": 44}
_DSCP_NAMES.update({f"CS{x}": x << 3 for x in range(8)})
_DSCP_NAMES.update({f"AF{x}{y}": 8 * x + 2 * y for x in range(1, 5) for y in range(1, 4)})
_DSCP_NAMES["BE"] = 0


@dataclass(frozen=True)
class PodQoS:
    """The validated request of one pod; None means "not asked for"."""

    egress_bps: int | None = None
    ingress_bps: int | None = None
    priority: str | None = None
    dscp: int | None = None

    @property
    def egress_shaped(self) -> bool:
        """Whether the pod's egress goes through the node's IFB at all.

        A pod with no egress limit but a priority still goes through, so that it competes for the
        node budget in its priority class; a pod with neither is left alone (not limited at all).
        """
        return self.egress_bps is not None or self.priority is not None


def parse_dscp(value: str) -> int:
    text = value.strip()
    if re.fullmatch(r"[0-9]{1,2}", text):
        n = int(text)
        if n <= 63:
            return n
        raise ValueError(f"{value!r} is out of range (DSCP is 0..63)")
    if re.fullmatch(r"0x[0-9a-fA-F]{1,2}", text):
        n = int(text, 16)
        if n <= 63:
            return n
        raise ValueError(f"{value!r} is out of range (DSCP is 0..63)")
    named = _DSCP_NAMES.get(text.upper())
    if named is None:
        raise ValueError(f"{value!r} is not a DSCP (0..63, EF, VA, AFxy, CSx)")
    return named


def _parse(annotations: Mapping[str, object]) -> tuple[PodQoS, list[str]]:
    problems: list[str] = []
    if not isinstance(annotations, Mapping):
        return PodQoS(), [f"annotations: {annotations!r} is not a mapping"]
    fields: dict[str, object] = {}
    for key, attr in ((EGRESS_BANDWIDTH, "egress_bps"), (INGRESS_BANDWIDTH, "ingress_bps")):
        if key not in annotations:
            continue
        raw = annotations[key]
        if not isinstance(raw, str):
            problems.append(f"{key}: {raw!r} is not a string")
            continue
        try:
            fields[attr] = parse_quantity(raw)
        except QuantityError as exc:
            problems.append(f"{key}: {exc}")
    if PRIORITY in annotations:
        raw = annotations[PRIORITY]
        if isinstance(raw, str) and raw.strip().lower() in PRIORITIES:
            fields["priority"] = raw.strip().lower()
        else:
            problems.append(f"{PRIORITY}: {raw!r} is not one of {', '.join(PRIORITIES)}")
    if DSCP in annotations:
        raw = annotations[DSCP]
        if not isinstance(raw, str):
            problems.append(f"{DSCP}: {raw!r} is not a string")
        else:
            try:
                fields["dscp"] = parse_dscp(raw)
            except ValueError as exc:
                problems.append(f"{DSCP}: {exc}")
    return PodQoS(**fields), problems  # type: ignore[arg-type]


@dataclass(frozen=True)
class QoSRequest:
    """A pod's annotations parsed once, at the boundary where they enter (config, API, CNI).

    `annotations` keeps the pod's own words (status shows them); `qos` is the validated request;
    `problems` names every bad annotation and its value. A request with problems is still carried to
    the bandwidth manager, which reports them and keeps the pod's previous shaping.
    """

    annotations: Mapping[str, str] = field(default_factory=dict)
    qos: PodQoS = field(default_factory=PodQoS)
    problems: tuple[str, ...] = ()

    @classmethod
    def parse(cls, annotations: Mapping[str, object] | None) -> QoSRequest:
        raw = annotations if annotations is not None else {}
        qos, problems = _parse(raw)
        kept = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
        return cls(annotations=kept, qos=qos, problems=tuple(problems))

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_annotations(annotations: Mapping[str, object]) -> list[str]:
    """Problems with the pod's QoS annotations, each naming the key and the bad value; [] if fine."""
    return list(QoSRequest.parse(annotations).problems)


def parse_annotations(annotations: Mapping[str, object]) -> PodQoS:
    """The pod's validated request; raises ValueError with every problem if any annotation is bad."""
    req = QoSRequest.parse(annotations)
    if req.problems:
        raise ValueError("; ".join(req.problems))
    return req.qos
