"""metrics.py: the exposition has exactly docs/design.md §6's names, built from the counters dict format of
`_native.Datapath.counters()`, and is served over HTTP."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from podrouter.metrics import DIRECTIONS, PATHS, MetricsServer, PodrouterCollector, make_source

COUNTERS: dict[str, Any] = {
    "packets": {"vxlan/egress": 10, "native/ingress": 3},
    "bytes": {"vxlan/egress": 15000, "native/ingress": 300},
    "drops": {"unknown_peer": 4, "truncated": 1},
    "nat_entries": 7,
    "nat_alloc_failures": 0,
    "table_generation": 5,
    "offload": {},
}


def scrape(counters: dict[str, Any], peers: int = 2, limits: dict[str, int | None] | None = None) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PodrouterCollector(make_source(lambda: counters, lambda: peers, lambda: limits or {})))  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_exactly_the_contract_names() -> None:
    text = scrape(COUNTERS, limits={"web": 10_000_000, "db": None})
    samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples == {
        "podrouter_packets_total",
        "podrouter_bytes_total",
        "podrouter_drops_total",
        "podrouter_nat_entries",
        "podrouter_nat_evictions_total",
        "podrouter_nat_pod_limit_drops_total",
        "podrouter_geneve_options_total",
        "podrouter_nat_snapshot_restored",
        "podrouter_nat_snapshot_rejected",
        "podrouter_nat_snapshot_writes_total",
        "podrouter_nat_snapshot_write_errors_total",
        "podrouter_peers",
        "podrouter_pod_egress_rate_limit_bits",
        "podrouter_table_generation",
    }


def test_values_and_labels() -> None:
    fams = {f.name: f for f in text_string_to_metric_families(scrape(COUNTERS, limits={"web": 10_000_000}))}
    pk = {(s.labels["path"], s.labels["direction"]): s.value for s in fams["podrouter_packets"].samples}
    assert pk[("vxlan", "egress")] == 10 and pk[("native", "ingress")] == 3
    # every path x direction is present from the first scrape
    assert set(pk) == {(p, d) for p in PATHS for d in DIRECTIONS}
    drops = {s.labels["reason"]: s.value for s in fams["podrouter_drops"].samples}
    assert drops == {"unknown_peer": 4, "truncated": 1}
    assert fams["podrouter_nat_entries"].samples[0].value == 7
    assert fams["podrouter_peers"].samples[0].value == 2
    assert fams["podrouter_table_generation"].samples[0].value == 5
    [rate] = fams["podrouter_pod_egress_rate_limit_bits"].samples
    assert rate.labels == {"pod": "web"} and rate.value == 10_000_000


def test_nat_pressure_series_have_a_bounded_pod_label() -> None:
    counters = {
        **COUNTERS,
        "nat_evictions": 12,
        "nat_pod_limit_drops": {"10.244.1.7": 300, "10.244.1.9": 2},
        "nat_pod_limit_drops_other": 5,
    }
    fams = {f.name: f for f in text_string_to_metric_families(scrape(counters))}
    assert fams["podrouter_nat_evictions"].samples[0].value == 12
    per_pod = {s.labels["pod"]: s.value for s in fams["podrouter_nat_pod_limit_drops"].samples}
    assert per_pod == {"10.244.1.7": 300, "10.244.1.9": 2, "other": 5}
    # without any drop: one series, pod="other", at 0
    fams = {f.name: f for f in text_string_to_metric_families(scrape(COUNTERS))}
    assert {s.labels["pod"]: s.value for s in fams["podrouter_nat_pod_limit_drops"].samples} == {"other": 0}


def test_geneve_options_by_class_and_type_with_a_bounded_label_set() -> None:
    counters = {
        **COUNTERS,
        "geneve_options": [
            {"class": 0x0102, "type": 0x03, "critical": False, "count": 9},
            {"class": 0xFFFF, "type": 0x80, "critical": True, "count": 2},
        ],
        "geneve_options_other": 4,
    }
    fams = {f.name: f for f in text_string_to_metric_families(scrape(counters))}
    got = {
        (s.labels["class"], s.labels["type"], s.labels["critical"]): s.value
        for s in fams["podrouter_geneve_options"].samples
    }
    assert got == {
        ("0x0102", "0x03", "false"): 9,
        ("0xffff", "0x80", "true"): 2,
        ("other", "other", "unknown"): 4,
    }
    # nothing seen yet: one series at 0
    fams = {f.name: f for f in text_string_to_metric_families(scrape(COUNTERS))}
    assert [s.value for s in fams["podrouter_geneve_options"].samples] == [0]


def test_a_failing_source_yields_an_empty_scrape_not_an_error() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("datapath gone")

    reg = CollectorRegistry(auto_describe=False)
    reg.register(PodrouterCollector(make_source(broken, lambda: 0, dict)))  # type: ignore[arg-type]
    assert generate_latest(reg) == b""


def test_served_over_http() -> None:
    srv = MetricsServer(make_source(lambda: COUNTERS, lambda: 1, dict), ("127.0.0.1", 0))
    try:
        port = srv.address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: S310
        assert 'podrouter_packets_total{direction="egress",path="vxlan"} 10.0' in body
    finally:
        srv.close()


def test_nat_snapshot_families() -> None:
    snap = {"loaded": {"restored": 9, "rejected": 2}, "load_error": None, "writes": 4, "write_errors": 1}
    fams = {f.name: f for f in text_string_to_metric_families(scrape({**COUNTERS, "nat_snapshot": snap}))}
    assert fams["podrouter_nat_snapshot_restored"].samples[0].value == 9
    assert fams["podrouter_nat_snapshot_rejected"].samples[0].value == 2
    assert fams["podrouter_nat_snapshot_writes"].samples[0].value == 4
    assert fams["podrouter_nat_snapshot_write_errors"].samples[0].value == 1
    # a snapshot refused as a whole counts once; no snapshot at all counts nothing
    refused = {"loaded": None, "load_error": "checksum mismatch", "writes": 0, "write_errors": 0}
    fams = {f.name: f for f in text_string_to_metric_families(scrape({**COUNTERS, "nat_snapshot": refused}))}
    assert fams["podrouter_nat_snapshot_rejected"].samples[0].value == 1
    fams = {f.name: f for f in text_string_to_metric_families(scrape(COUNTERS))}
    assert fams["podrouter_nat_snapshot_rejected"].samples[0].value == 0
