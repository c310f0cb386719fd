"""Prometheus for real: promtool lints the live /metrics, a Prometheus server scrapes a running daemon,
PromQL over its HTTP API sees the traffic and the drops; the example alert rules and Grafana dashboard
in docs/ are checked against what the daemon exports.

The server is Debian's `prometheus`, started by the test inside node1's namespace on 127.0.0.1 with a
temporary TSDB and a 1 s scrape interval (never the packaged service), and stopped at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import DaemonHandle, Daemons, python_in, ref_config, wait_for, wait_listening
from test_bad_input import inner, send_udp, vxlan

from nettopo import ReferenceTopology

DOCS = Path(__file__).resolve().parents[2] / "docs"
ALERTS = DOCS / "prometheus" / "alerts.yml"
ALERTS_TEST = DOCS / "prometheus" / "alerts_test.yml"
DASHBOARD = DOCS / "grafana" / "podrouter.json"
METRICS = "127.0.0.1:9965"
PROM_PORT = 9090


def http_get(host: Any, url: str) -> str:
    r = python_in(
        host,
        "import urllib.request, sys\n"
        f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())",
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def exported_names(text: str) -> set[str]:
    """Metric names a Prometheus text exposition declares (`# TYPE`; a counter's samples carry _total)
    or carries samples of; a family with no series yet (no shaped pod) is declared all the same."""
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[:2] == ["#", "TYPE"]:
            counter = parts[3] == "counter" and not parts[2].endswith("_total")
            names.add(parts[2] + "_total" if counter else parts[2])
    return names


class Prometheus:
    def __init__(self, host: Any, base: Path) -> None:
        self.host, self.base = host, base
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "podrouter", "static_configs": [{"targets": [METRICS]}]}],
        }
        (base / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = (base / "prometheus.log").open("wb")
        self.proc = host.popen(
            [
                "prometheus",
                f"--config.file={base / 'prometheus.yml'}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        wait_listening(host, PROM_PORT, timeout=30)

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        reply = json.loads(http_get(self.host, f"http://127.0.0.1:{PROM_PORT}/api/v1/{path}?{query}"))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        finally:
            self.log.close()


@pytest.fixture
def scraped(
    ref: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> Iterator[tuple[DaemonHandle, Prometheus]]:
    d1 = daemons.start(
        ref.nodes["node1"], ref_config(ref, "node1", daemons.sockdir, mode="tunnel", peers=["node2"])
    )
    daemons.start(
        ref.nodes["node2"], ref_config(ref, "node2", daemons.sockdir, mode="tunnel", peers=["node1"])
    )
    prom = Prometheus(ref.nodes["node1"], tmp_path)
    try:
        yield d1, prom
    finally:
        prom.close()


def test_promtool_checks_the_live_metrics(ref: ReferenceTopology, daemons: Daemons) -> None:
    daemons.start(ref.nodes["node1"], ref_config(ref, "node1", daemons.sockdir, mode="tunnel"))
    text = http_get(ref.nodes["node1"], f"http://{METRICS}/metrics")
    assert "podrouter_packets_total" in text
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr)


def test_alert_rules_check_and_unit_tests() -> None:
    r = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, (r.stdout, r.stderr)
    r = subprocess.run(
        ["promtool", "test", "rules", ALERTS_TEST.name],
        cwd=ALERTS_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, (r.stdout, r.stderr)
    names = {rule["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]}
    assert {
        "PodrouterDatapathDown",
        "PodrouterDropsRising",
        "PodrouterNatTableNearFull",
        "PodrouterPeersMissing",
        "PodrouterBgpSessionDown",
    } <= names


def test_prometheus_scrapes_a_running_daemon(
    scraped: tuple[DaemonHandle, Prometheus], ref: ReferenceTopology
) -> None:
    d1, prom = scraped
    wait_for(
        lambda: [s for s in prom.query('up{job="podrouter"}') if s["value"][1] == "1"], 30, 0.5, "a scrape"
    )
    # traffic over the tunnel, and packets dropped for a named reason (VXLAN from a non-peer)
    pod1 = ref.pods["pod1"].host
    assert pod1.ping(ref.pods["pod2"].ip, count=10)
    send_udp(ref.router, "172.16.2.1", "172.16.2.2", 4789, [vxlan(inner())] * 7)

    def vxlan_rate() -> list[dict[str, Any]]:
        rows = prom.query('rate(podrouter_packets_total{path="vxlan", direction="egress"}[10s])')
        return [r for r in rows if float(r["value"][1]) > 0]

    rows = wait_for(vxlan_rate, 30, 0.5, "a nonzero VXLAN egress rate")
    assert rows[0]["metric"]["job"] == "podrouter" and rows[0]["metric"]["instance"] == METRICS

    def unknown_peer() -> float:
        rows = prom.query("sum by (reason) (podrouter_drops_total)")
        return sum(float(r["value"][1]) for r in rows if r["metric"].get("reason") == "unknown_peer")

    wait_for(lambda: unknown_peer() >= 7, 30, 0.5, "7 unknown_peer drops in Prometheus")
    assert unknown_peer() == d1.counters()["drops"]["unknown_peer"]
    # every path x direction series is there from the start
    series = prom.query("podrouter_packets_total")
    assert len({(s["metric"]["path"], s["metric"]["direction"]) for s in series}) >= 10
    assert [float(s["value"][1]) for s in prom.query("podrouter_peers")] == [1.0]
    # the example rules load and evaluate against the real series without errors
    groups = wait_for(
        lambda: [
            g
            for g in prom.api("rules")["groups"]
            if g["rules"] and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in g["rules"])
        ],
        30,
        0.5,
        "rules evaluated",
    )
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    assert not [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]


def test_grafana_dashboard_uses_exported_metrics(
    scraped: tuple[DaemonHandle, Prometheus], ref: ReferenceTopology
) -> None:
    _d1, prom = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names(http_get(ref.nodes["node1"], f"http://{METRICS}/metrics"))
    wait_for(lambda: prom.query('up{job="podrouter"}'), 30, 0.5, "a scrape")
    assert ref.pods["pod1"].host.ping(ref.pods["pod2"].ip, count=3)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) == len(dashboard["panels"]) >= 6
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\b(podrouter_[a-z_]+)\b", expr))
        assert names or "up{" in expr, expr
        assert names <= exported, (expr, names - exported)
        used |= names
        # each panel's query is valid PromQL that the server evaluates (Grafana's variables filled in)
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        result = prom.query(concrete)
        if "pod_egress_rate_limit" not in expr:  # no shaped pod in this topology
            wait_for(lambda c=concrete: prom.query(c), 30, 0.5, f"data for {concrete}")
        assert isinstance(result, list)
    # the dashboard covers every family the daemon exports
    assert {n.removesuffix("_total") for n in exported} <= {n.removesuffix("_total") for n in used}
