"""The benchmark suite's pure parts: parsing tool output, aggregation, option selection, reporting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from podrouter.bench import _select, extras, measure, report
from podrouter.bench.suite import LEG_NAMES, METRICS, SETUP_NAMES, summarize
from podrouter.demo.cluster import delta_path, path_counters

SOCKPERF = """\
sockperf: [2;35m====> avg-rtt=11.278 (std-dev=3.977)[0m
sockperf: [2;35mTotal 48719 observations[0m; each percentile contains 487.19 observations
sockperf: ---> <MAX> observation =  755.659
sockperf: ---> percentile 99.999 =  755.659
sockperf: ---> percentile 99.000 =   12.678
sockperf: ---> percentile 50.000 =   10.986
sockperf: ---> <MIN> observation =   10.485
"""


def test_sockperf_percentiles_are_read_exactly() -> None:
    text = measure._ANSI.sub("", SOCKPERF)
    assert measure._sockperf_percentile(text, "50.000") == 10.986
    assert measure._sockperf_percentile(text, "99.000") == 12.678
    # 99.999 must not be taken for 99.000 (or the other way round)
    assert measure._sockperf_percentile(text, "99.999") == 755.659
    assert measure._sockperf_percentile(text, "90.000") is None


def test_summarize_median_spread_and_quartiles() -> None:
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    s4 = summarize([4.0, 1.0, 3.0, 2.0])
    assert s4["median"] == 2.5 and "q1" in s4 and s4["q1"] <= s4["median"] <= s4["q3"]


def test_path_counters_and_delta() -> None:
    before = path_counters({"packets": {"vxlan/egress": 10, "vxlan/ingress": 99, "native/egress": 5}})
    after = path_counters({"packets": {"vxlan/egress": 14, "vxlan/ingress": 500, "native/egress": 205}})
    assert before["vxlan"] == 10 and before["geneve"] == 0
    path, delta = delta_path(before, after)
    assert path == "native" and delta["native"] == 200 and delta["vxlan"] == 4
    # ingress growth never counts as the path a pod's egress took
    assert delta_path(after, after)[0] is None
    assert delta_path(before, after, minimum=1000)[0] is None
    assert path_counters({})["native"] == 0
    assert path_counters({"packets": {"geneve": {"egress": 7, "ingress": 1}}})["geneve"] == 7


def test_select_parts() -> None:
    setups, sections = _select(None, micro=False)
    assert [s.name for s in setups] == list(SETUP_NAMES) and sections == {"masquerade", "shaping", "scale"}
    setups, sections = _select(["native,kernel-routing", "masquerade"], micro=True)
    assert [s.name for s in setups] == ["kernel-routing", "native"] and sections == {"masquerade", "micro"}
    setups, _ = _select("hybrid-tunnel", micro=False)
    assert [s.name for s in setups] == ["hybrid"]
    setups, sections = _select("micro", micro=False)
    assert setups == [] and sections == {"micro"}
    setups, sections = _select("scale", micro=False)
    assert setups == [] and sections == {"scale"}
    with pytest.raises(ValueError, match="warp"):
        _select("warp", micro=False)


def test_parse_criterion(tmp_path: Path) -> None:
    d = tmp_path / "lpm" / "lookup" / "1000" / "new"
    d.mkdir(parents=True)
    (d / "estimates.json").write_text(
        json.dumps(
            {
                "mean": {
                    "point_estimate": 50.0,
                    "confidence_interval": {"lower_bound": 49.0, "upper_bound": 51.0},
                },
                "median": {"point_estimate": 48.0},
            }
        )
    )
    (d / "benchmark.json").write_text(
        json.dumps({"full_id": "lpm/lookup/1000", "throughput": {"Elements": 1}})
    )
    broken = tmp_path / "broken" / "new"
    broken.mkdir(parents=True)
    (broken / "estimates.json").write_text("{not json")
    out = extras.parse_criterion(tmp_path)
    assert len(out) == 1
    b = out[0]
    assert b["id"] == "lpm/lookup/1000" and b["median_ns"] == 48.0
    assert b["mean_lo_ns"] == 49.0 and b["mean_hi_ns"] == 51.0
    assert b["time_ns"] == 50.0  # no slope in this file: the mean is the headline
    assert b["throughput_per_s"] == pytest.approx(2e7) and b["throughput_unit"] == "elem"
    assert extras.parse_criterion(tmp_path, since=9e18) == []
    assert "lpm/lookup/1000" in report.micro_table({"benchmarks": out})


def _fake_result() -> dict:
    modes = {}
    for i, name in enumerate(LEG_NAMES):
        summary = {k: summarize([1.0 + i, 2.0 + i]) for k in METRICS}
        base = (
            None if name.startswith("kernel") else ("kernel-routing" if "native" in name else "kernel-vxlan")
        )
        modes[name] = {
            "pair": "pod1->pod3",
            "baseline": base,
            "summary": summary,
            "errors": [],
            "reps": [{"cpu_disturbed": name == "vxlan"}],
            "ratios": {"tcp1_gbps": 0.5} if base else {},
        }
    return {
        "profile": "quick",
        "reps": 2,
        "modes": modes,
        "masquerade": {
            "results": {
                "nftables": {"summary": {"cps": summarize([5000.0, 4000.0]), "tcp1_gbps": summarize([9.0])}}
            },
            "podrouter_unavailable": "no masquerade path yet",
        },
    }


def test_tables_and_plots(tmp_path: Path) -> None:
    r = _fake_result()
    table = report.modes_table(r["modes"])
    for name in LEG_NAMES:
        assert name in table
    assert "(0.50x)" in table and "*" in table
    assert "(0.50x) worse" in table  # half the baseline's throughput: the word is written out
    masq = report.masquerade_table(r["masquerade"])
    assert "4500" in masq and "not available (no masquerade path yet)" in masq
    assert "not available (why)" in report.masquerade_table({"reason": "why"})
    written = report.plots(r, tmp_path)
    assert [p.name for p in written] == ["modes.png", "masquerade.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_scale_table_and_plot(tmp_path: Path) -> None:
    from podrouter.bench import scale

    step = {
        "nodes": 1000,
        "serve_ms": 900.0,
        "compile_ms": 12.5,
        "swap_ms": 0.05,
        "routes_changed": 1000,
        "routes_ms": 80.0,
        "routes_per_s": 12500,
        "refresh_peers_ms": 40.0,
        "rss_mb": 60.1,
    }
    res = {
        "steps": [step, {**step, "nodes": 2000, "rss_mb": 70.2}],
        "churn": {"swaps": 2, "serve_ms": [500.0, 600.0], "compile_ms": [20.0, 21.0], "swap_ms": [0.1, 0.2]},
        "stream": {"pair": "pod1->pod2", "sent": 10, "received": 10, "lost": 0},
        "stream_pps": 2000,
        "errors": [],
    }
    text = scale.table(res)
    assert "12500" in text and "70.2" in text and "0 lost" in text and "2 swaps" in text
    png = scale.plot(res, tmp_path)
    assert png is not None and png.stat().st_size > 10_000
    assert scale.plot({"steps": []}, tmp_path) is None


def test_scale_sim_nodes_are_distinct_and_outside_the_reference() -> None:
    import ipaddress

    from podrouter.bench import scale

    nodes = [scale.sim_node(i) for i in range(5000)]
    assert len({n[1] for n in nodes}) == len({n[2] for n in nodes}) == 5000
    ref = ipaddress.ip_network("10.244.0.0/16")
    cluster = ipaddress.ip_network(scale.CLUSTER)
    for _, addr, cidr in nodes:
        net = ipaddress.ip_network(cidr)
        assert net.subnet_of(cluster) and not net.overlaps(ref)
        assert ipaddress.ip_address(addr) in ipaddress.ip_network("172.20.0.0/14")


def test_ovs_comparison_writes_worse_out() -> None:
    def leg(tcp1: float, rtt: float) -> dict[str, Any]:
        return {"summary": {"tcp1_gbps": {"median": tcp1}, "rtt_p50_us": {"median": rtt}}}

    text = report.ovs_comparison({"vxlan": leg(1.0, 30.0), "ovs": leg(0.5, 20.0)})
    assert text.startswith("podrouter vxlan vs OVS userspace vxlan:")
    assert "TCP 1 stream 2.00x (better)" in text and "RTT p50 1.50x (worse)" in text
    assert report.ovs_comparison({"vxlan": leg(1.0, 30.0)}) == ""


def test_worse_is_written_out_where_podrouter_is_worse() -> None:
    assert report._ratio_cell(0.5, True) == " (0.50x) worse"  # throughput: lower is worse
    assert report._ratio_cell(1.2, True) == " (1.20x)"
    assert report._ratio_cell(1.37, False) == " (1.37x) worse"  # RTT, CPU per Gbit: higher is worse
    assert report._ratio_cell(0.9, False) == " (0.90x)"
    assert report._ratio_cell(1.001, True) == " (1.00x)"  # equal within half a percent
    masq = report.masquerade_table(
        {
            "results": {
                "nftables": {"summary": {"cps": summarize([1000.0]), "tcp1_gbps": summarize([10.0])}},
                "podrouter": {"summary": {"cps": summarize([500.0]), "tcp1_gbps": summarize([10.0])}},
            },
            "ratios": {"cps": 0.5, "tcp1_gbps": 1.0},
        }
    )
    assert "500 (0.50x) worse" in masq and "10.00 (1.00x)" in masq and masq.count("worse") == 1


def test_the_masquerade_table_shows_the_cost_of_a_connection() -> None:
    """CPU microseconds and context switches per connection (bench/masq.py): lower is better, so a
    higher podrouter figure is written out as worse; a machine busy before the run is marked `*`."""
    masq = report.masquerade_table(
        {
            "results": {
                "nftables": {
                    "summary": {
                        "cps": summarize([1000.0]),
                        "cpu_us_per_conn": summarize([60.0]),
                        "ctxt_per_conn": summarize([0.5]),
                    },
                    "reps": [{"cpu_disturbed": False}],
                },
                "podrouter": {
                    "summary": {
                        "cps": summarize([500.0]),
                        "cpu_us_per_conn": summarize([110.0]),
                        "ctxt_per_conn": summarize([3.0]),
                    },
                    "reps": [{"cpu_disturbed": True}],
                },
            },
            "ratios": {"cps": 0.5, "cpu_us_per_conn": 110 / 60, "ctxt_per_conn": 6.0},
        }
    )
    assert "CPU us/conn" in masq and "ctx switches/conn" in masq
    assert "110* (1.83x) worse" in masq and "3.00 (6.00x) worse" in masq
    assert "60 " in masq and "0.50" in masq and masq.count("worse") == 3


def test_per_connection_costs() -> None:
    from podrouter.bench import masq, measure

    assert masq.per_connection(1000, 0.1, 3000) == {"cpu_us_per_conn": 100.0, "ctxt_per_conn": 3.0}
    # no connection completed: a cost per one, never a division by zero
    assert masq.per_connection(0, 0.5, 10) == {"cpu_us_per_conn": 500000.0, "ctxt_per_conn": 10.0}
    assert measure.CpuTimes.now().ctxt > 0
