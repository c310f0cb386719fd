"""The Kubernetes quantity grammar, the QoS annotations and the `bandwidth:` config section.

Table-driven: each row is one case of the grammar (k8s.io/apimachinery resource.Quantity) and the
kubelet bandwidth bounds (1k..1P, checked on the value rounded up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from podrouter.qos import (
    DSCP,
    EGRESS_BANDWIDTH,
    INGRESS_BANDWIDTH,
    PRIORITY,
    QuantityError,
    parse_annotations,
    parse_dscp,
    parse_quantity,
    validate_annotations,
    validate_bandwidth_config,
)
from podrouter.qos.bpf import build_program
from podrouter.qos.config import parse_bandwidth_config

ACCEPTED = [
    ("1k", 1_000),
    ("1000", 1_000),
    ("10M", 10_000_000),
    ("100M", 100_000_000),
    ("1G", 1_000_000_000),
    ("1.5G", 1_500_000_000),
    ("2T", 2 * 10**12),
    ("1P", 10**15),
    ("1Ki", 1024),
    ("1Mi", 1024**2),
    ("1.5Mi", 1_572_864),
    ("10Gi", 10 * 1024**3),
    ("1e6", 1_000_000),
    ("1E6", 1_000_000),
    ("1e+6", 1_000_000),
    ("2.5e3", 2_500),
    ("1e15", 10**15),
    ("0.1e4", 1_000),
    ("+10M", 10_000_000),
    ("10.", 10),  # below the bound: covered in REFUSED; here only as a grammar row, see below
    (".5M", 500_000),
    ("1000000m", 1_000),  # milli: one million milli-bits is 1000
    ("999.5", 1_000),  # rounded up to 1000, then checked: kubelet accepts it
    ("1000.1", 1_001),  # rounded up, never down
    ("1.0000001k", 1_001),
    ("0001k", 1_000),
]

REFUSED = [
    ("", "no digits"),
    ("k", "unreasonably small"),  # Kubernetes reads a missing number as zero
    (".", "unreasonably small"),
    ("1K", "not a quantity"),  # suffixes are case-sensitive: K is not k
    ("1KI", "not a quantity"),
    ("1mi", "not a quantity"),
    ("1Mb", "not a quantity"),
    ("1 M", "not a quantity"),
    (" 1M", "not a quantity"),
    ("1M ", "not a quantity"),
    ("1M\n", "not a quantity"),
    ("1e", "not a quantity"),
    ("1e1.5", "not a quantity"),
    ("1.2.3", "not a quantity"),
    ("--1", "not a quantity"),
    ("0x10", "not a quantity"),
    ("ten", "not a quantity"),
    ("1Mbit", "not a quantity"),
    ("10m", "unreasonably small"),  # ten milli-bits per second: the classic mistake
    ("999", "unreasonably small"),
    ("998.9", "unreasonably small"),  # rounds up to 999
    ("0", "unreasonably small"),
    ("-10M", "unreasonably small"),
    ("1e-3", "unreasonably small"),
    ("1e-999999999", "unreasonably small"),
    ("1000000000000001", "unreasonably large"),
    ("1.0000001P", "unreasonably large"),
    ("1E", "unreasonably large"),  # one exa
    ("1Pi", "unreasonably large"),  # 2^50 > 10^15
    ("2e15", "unreasonably large"),
    ("1e999999999", "unreasonably large"),
    ("9" * 200, "unreasonably large"),
]


@pytest.mark.parametrize(("text", "value"), [r for r in ACCEPTED if r[1] >= 1000])
def test_quantity_accepted(text: str, value: int) -> None:
    assert parse_quantity(text) == value


def test_quantity_unbounded_grammar() -> None:
    assert parse_quantity("10.", minimum=None) == 10
    assert parse_quantity("1m", minimum=None) == 1  # 0.001 rounded up
    assert parse_quantity("-1.5", minimum=None) == -2  # away from zero, as Quantity.Value() does
    assert parse_quantity("1E", maximum=None) == 10**18
    assert parse_quantity("1Ei", maximum=None) == 2**60


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_quantity_refused(text: str, reason: str) -> None:
    with pytest.raises(QuantityError, match=reason):
        parse_quantity(text)


def test_quantity_rejects_non_strings() -> None:
    with pytest.raises(QuantityError):
        parse_quantity(10_000_000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("63", 63), ("46", 46), ("EF", 46), ("ef", 46), ("AF11", 10), ("AF41", 34), ("af43", 38),
     ("CS0", 0), ("CS1", 8), ("CS6", 48), ("CS7", 56), ("VA", 44), ("0x2e", 46)],
)
def test_dscp_accepted(text: str, value: int) -> None:
    assert parse_dscp(text) == value


@pytest.mark.parametrize("text", ["64", "-1", "AF51", "AF14", "AF10", "CS8", "XX", "", "4 6", "0x40"])
def test_dscp_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dscp(text)


def test_annotations_parse_all() -> None:
    qos = parse_annotations({
        EGRESS_BANDWIDTH: "10M", INGRESS_BANDWIDTH: "1Gi", PRIORITY: "Guaranteed", DSCP: "AF21",
        "unrelated.example/annotation": "whatever",
    })
    assert (qos.egress_bps, qos.ingress_bps, qos.priority, qos.dscp) == (10**7, 2**30, "guaranteed", 18)
    assert qos.egress_shaped


def test_annotations_empty_means_unshaped() -> None:
    qos = parse_annotations({})
    assert qos.egress_bps is None and qos.ingress_bps is None and not qos.egress_shaped
    assert parse_annotations({PRIORITY: "besteffort"}).egress_shaped  # competes for the node budget


def test_validate_names_key_and_value() -> None:
    problems = validate_annotations({
        EGRESS_BANDWIDTH: "10K", INGRESS_BANDWIDTH: "10m", PRIORITY: "gold", DSCP: "99",
    })
    assert len(problems) == 4
    joined = "\n".join(problems)
    bad = ((EGRESS_BANDWIDTH, "10K"), (INGRESS_BANDWIDTH, "10m"), (PRIORITY, "gold"), (DSCP, "99"))
    for key, value in bad:
        assert any(p.startswith(f"{key}:") and repr(value) in p for p in problems), joined
    assert validate_annotations({EGRESS_BANDWIDTH: "10M"}) == []
    assert validate_annotations({EGRESS_BANDWIDTH: 10}) == [f"{EGRESS_BANDWIDTH}: 10 is not a string"]
    with pytest.raises(ValueError, match="gold"):
        parse_annotations({PRIORITY: "gold"})


def test_bandwidth_config_defaults_and_values() -> None:
    assert validate_bandwidth_config(None) == []
    assert validate_bandwidth_config({"enabled": True}) == []
    cfg = parse_bandwidth_config({
        "enabled": True, "node_egress_rate": "1G", "ifb_name": "ifb-node1",
        "priority_shares": {"guaranteed": 65, "besteffort": 5}, "max_queue_delay": "2ms", "burst": 500,
        "default_priority": "besteffort", "mtu": 9000,
    })
    assert cfg.node_egress_bps == 10**9 and cfg.ifb_name == "ifb-node1"
    assert cfg.priority_shares == {"guaranteed": 65, "burstable": 30, "besteffort": 5}
    assert cfg.max_queue_delay_s == pytest.approx(0.002) and cfg.burst_s == pytest.approx(0.5)
    assert cfg.default_priority == "besteffort" and cfg.mtu == 9000


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"enabled": "yes"}, "bandwidth.enabled: 'yes'"),
        ({"node_egress_rate": "10K"}, "bandwidth.node_egress_rate: '10K'"),
        ({"node_egress_rate": "1m"}, "bandwidth.node_egress_rate: '1m' is unreasonably small"),
        ({"ifb_name": "a-name-that-is-too-long"}, "bandwidth.ifb_name: 'a-name-that-is-too-long'"),
        ({"ifb_name": "bad/name"}, "bandwidth.ifb_name"),
        ({"priority_shares": {"gold": 10}}, "bandwidth.priority_shares.gold: unknown priority"),
        ({"priority_shares": {"guaranteed": 0}}, "bandwidth.priority_shares.guaranteed: 0"),
        ({"priority_shares": {"guaranteed": 90, "burstable": 20}}, "more than 100%"),
        ({"default_priority": "gold"}, "bandwidth.default_priority: 'gold'"),
        ({"max_queue_delay": "5 parsecs"}, "bandwidth.max_queue_delay: '5 parsecs'"),
        ({"max_queue_delay": "10s"}, "bandwidth.max_queue_delay: '10s' is outside"),
        ({"mtu": 100}, "bandwidth.mtu: 100"),
        ({"node_egres_rate": "1G"}, "bandwidth.node_egres_rate: unknown key"),
        ([1, 2], "bandwidth: [1, 2] is not a mapping"),
    ],
)
def test_bandwidth_config_problems(section: object, needle: str) -> None:
    problems = validate_bandwidth_config(section)
    assert any(needle in p for p in problems), problems


def test_bpf_program_shapes() -> None:
    # 8-byte instructions; the program ends in "r0 = -1 (TC_ACT_UNSPEC); exit"
    for classes, dscp in (((0x18100, 0x14100), None), (None, 46), ((0x18100, 0x14100), 0), (None, None)):
        code = build_program(classes, dscp)
        assert len(code) % 8 == 0
        assert code[-8:] == bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
        assert code[-16:-8] == bytes([0xB7, 0, 0, 0]) + (-1).to_bytes(4, "little", signed=True)
    with pytest.raises(ValueError):
        build_program(None, 64)


def test_a_pod_config_carries_its_request_parsed_once(tmp_path: Path) -> None:
    # the config parses a pod's annotations into one typed QoSRequest; the bandwidth manager is
    # handed that value (daemon._shape), so nothing downstream parses the raw mapping again
    from podrouter import config as configmod
    from podrouter.qos import QoSRequest
    from podrouter.qos.config import BandwidthConfig

    base = (Path(__file__).resolve().parents[2] / "configs" / "native.yaml").read_text()
    good = tmp_path / "good.yaml"
    good.write_text(
        base
        + "\nbandwidth:\n  node_egress_rate: 1G\npods:\n  - name: web\n    ip: 10.244.1.5\n"
        "    host_interface: veth-web\n    annotations:\n      kubernetes.io/egress-bandwidth: 10M\n"
        "      podrouter.io/priority: Guaranteed\n      example.com/other: x\n"
    )
    cfg = configmod.load(str(good))
    assert isinstance(cfg.bandwidth, BandwidthConfig) and cfg.bandwidth.node_egress_bps == 10**9
    req = cfg.pods[0].qos
    assert isinstance(req, QoSRequest) and req.ok
    assert req.qos.egress_bps == 10_000_000 and req.qos.priority == "guaranteed"
    assert cfg.pods[0].annotations["example.com/other"] == "x"  # the pod's own words are kept
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("egress-bandwidth: 10M", "egress-bandwidth: 10Q"))
    cfg = configmod.load(str(bad))
    assert not cfg.pods[0].qos.ok and "10Q" in cfg.pods[0].qos.problems[0]
    assert any("pods[0].annotations" in w and "10Q" in w for w in cfg.warnings)
