"""The CLI without a running daemon: the API client/server, readiness exit codes, explain's packets."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from podrouter import api
from podrouter.cli import build_packet, main


@pytest.fixture
def short_dir(tmp_path: Path) -> Path:
    # unix socket paths are limited to 107 bytes; pytest's tmp_path can be long
    d = Path("/tmp") / f"prcli{os.getpid()}{threading.get_ident() % 1000}"
    d.mkdir(exist_ok=True)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


class FakeDaemonState:
    def __init__(self) -> None:
        self.ready = False
        self.pods: dict[str, dict[str, Any]] = {}


def serve(path: Path, st: FakeDaemonState) -> api.ApiServer:
    def status(_req: dict[str, Any]) -> dict[str, Any]:
        return {
            "ready": st.ready,
            "node": "n1",
            "mode": "tunnel",
            "peers": [],
            "routes": [],
            "pods": list(st.pods.values()),
            "counters": {},
            "underlay": {},
            "tunnel": {},
            "generation": 3,
        }

    def pod_add(req: dict[str, Any]) -> dict[str, Any]:
        pod = req["pod"]
        if pod["name"] in st.pods:
            raise api.ApiError(f"pod {pod['name']} exists")
        st.pods[pod["name"]] = {**pod, "shaping": {}}
        return {"pod": st.pods[pod["name"]], "warnings": ["w1"]}

    def boom(_req: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("kaboom")

    return api.ApiServer(
        str(path),
        {
            "status": status,
            "pod_add": pod_add,
            "boom": boom,
            "pod_list": lambda r: {"pods": list(st.pods.values())},
            "pod_del": lambda r: {"pod": st.pods.pop(r["name"])},
        },
    )


def test_socket_is_0600_and_removed_on_close(short_dir: Path) -> None:
    path = short_dir / "a.sock"
    srv = serve(path, FakeDaemonState())
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600
        assert api.socket_in_use(str(path))
    finally:
        srv.close()
    assert not path.exists()
    assert not api.socket_in_use(str(path))


def test_protocol_errors_are_json_replies_and_the_server_survives(short_dir: Path) -> None:
    path = short_dir / "b.sock"
    srv = serve(path, FakeDaemonState())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            f = s.makefile("rwb")
            for line in (
                b"not json\n",
                b"[1,2]\n",
                b'{"op": "nope"}\n',
                b'{"op": "boom"}\n',
                b'{"op": "status"}\n',
            ):
                f.write(line)
                f.flush()
            replies = [json.loads(f.readline()) for _ in range(5)]
        assert [r["ok"] for r in replies] == [False, False, False, False, True]
        assert replies[0]["error"].startswith("bad request: not JSON")
        assert replies[2]["error"].startswith("unknown op 'nope'")
        assert replies[3]["error"] == "internal error: kaboom"
        assert replies[4]["generation"] == 3
    finally:
        srv.close()


def test_status_exit_code_is_readiness(short_dir: Path) -> None:
    path = short_dir / "c.sock"
    st = FakeDaemonState()
    srv = serve(path, st)
    try:
        r = CliRunner().invoke(main, ["status", "--socket", str(path)])
        assert r.exit_code == 1 and "NOT READY" in r.output
        st.ready = True
        r = CliRunner().invoke(main, ["status", "--socket", str(path), "--json"])
        assert r.exit_code == 0
        assert json.loads(r.output)["node"] == "n1"
    finally:
        srv.close()
    r = CliRunner().invoke(main, ["status", "--socket", str(path)])
    assert r.exit_code == 1 and "no daemon at" in r.stderr


def test_status_finds_the_socket_through_the_config(short_dir: Path, tmp_path: Path) -> None:
    path = short_dir / "d.sock"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"node: {{name: n1, pod_cidr: 10.244.1.0/24}}\ncluster: {{pod_cidr: 10.244.0.0/16}}\n"
        f"api: {{socket: {path}}}\n"
    )
    st = FakeDaemonState()
    st.ready = True
    srv = serve(path, st)
    try:
        r = CliRunner().invoke(main, ["status", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
    finally:
        srv.close()


def test_pod_add_and_list_through_the_api(short_dir: Path) -> None:
    path = short_dir / "e.sock"
    st = FakeDaemonState()
    srv = serve(path, st)
    try:
        r = CliRunner().invoke(
            main,
            [
                "pod",
                "add",
                "web",
                "--ip",
                "10.244.1.5",
                "--host-interface",
                "veth-web",
                "-a",
                "kubernetes.io/egress-bandwidth=10M",
                "--socket",
                str(path),
            ],
        )
        assert r.exit_code == 0, r.output
        assert st.pods["web"]["annotations"] == {"kubernetes.io/egress-bandwidth": "10M"}
        assert "warning: w1" in r.stderr
        r = CliRunner().invoke(
            main, ["pod", "add", "web", "--ip", "10.244.1.5", "--host-interface", "v", "--socket", str(path)]
        )
        assert r.exit_code == 1 and "error: pod web exists" in r.stderr
        r = CliRunner().invoke(main, ["pod", "list", "--json", "--socket", str(path)])
        assert [p["name"] for p in json.loads(r.output)] == ["web"]
        r = CliRunner().invoke(
            main,
            [
                "pod",
                "add",
                "x",
                "--ip",
                "1.2.3.4",
                "--host-interface",
                "v",
                "-a",
                "novalue",
                "--socket",
                str(path),
            ],
        )
        assert r.exit_code == 2 and "is not KEY=VALUE" in r.stderr
    finally:
        srv.close()


def test_explain_needs_a_config_or_a_socket() -> None:
    r = CliRunner().invoke(main, ["explain", "10.244.1.1", "10.244.2.1"])
    assert r.exit_code == 2 and "--config" in r.stderr


def test_explain_rejects_bad_addresses(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["explain", "10.244.1.1", "fd00::1", "--socket", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not the same address family" in r.stderr


def test_demo_and_bench_are_registered() -> None:
    r = CliRunner().invoke(main, ["--help"])
    for cmd in ("run", "status", "pod", "cleanup", "check", "explain", "demo", "bench"):
        assert cmd in r.output


# ---------------------------------------------------------------------------- explain's packets


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_built_ipv4_packets_have_valid_checksums(proto: str) -> None:
    raw = build_packet("10.244.1.1", "10.244.2.1", proto, 8080)
    pkt = IP(raw)
    assert pkt.src == "10.244.1.1" and pkt.dst == "10.244.2.1" and pkt.len == len(raw)
    assert pkt.flags == "DF" and pkt.ttl == 64
    # scapy recomputes checksums for a rebuilt copy with the checksum fields cleared
    clean = IP(raw)
    del clean.chksum
    layer = {"tcp": TCP, "udp": UDP, "icmp": ICMP}[proto]
    del clean[layer].chksum
    rebuilt = IP(bytes(clean))
    assert rebuilt.chksum == pkt.chksum
    assert rebuilt[layer].chksum == pkt[layer].chksum
    if proto != "icmp":
        assert pkt[layer].dport == 8080


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_built_ipv6_packets_have_valid_checksums(proto: str) -> None:
    raw = build_packet("fd00::1", "fd00::2", proto, 53)
    pkt = IPv6(raw)
    assert pkt.plen == len(raw) - 40
    layer = {"tcp": TCP, "udp": UDP, "icmp": ICMPv6EchoRequest}[proto]
    field = "cksum" if proto == "icmp" else "chksum"
    clean = IPv6(raw)
    delattr(clean[layer], field)
    rebuilt = IPv6(bytes(clean))
    assert getattr(pkt[layer], field) == getattr(rebuilt[layer], field)


def test_build_packet_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        build_packet("10.0.0.1", "nope")
    with pytest.raises(ValueError):
        build_packet("10.0.0.1", "10.0.0.2", "sctp")


def test_explain_offline_from_a_config() -> None:
    cfg = str(Path(__file__).resolve().parents[2] / "configs" / "tunnel-geneve.yaml")
    r = CliRunner().invoke(main, ["explain", "10.244.1.1", "10.244.2.1", "--config", cfg, "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["verdict"]
    assert v["verdict"] == "tunnel" and v["protocol"] == "geneve" and v["remote"] == "172.16.3.2"
    assert v["port"] == 6081 and v["vni"] == 42
    r = CliRunner().invoke(
        main, ["explain", "10.244.1.1", "10.244.3.9", "--config", cfg, "--proto", "tcp", "--dport", "443"]
    )
    assert r.exit_code == 0 and "tunnel" in r.stdout and "protocol=vxlan" in r.stdout
    r = CliRunner().invoke(main, ["explain", "10.244.1.1", "10.244.1.7", "--config", cfg])
    assert r.exit_code == 0 and r.stdout.startswith("10.244.1.1 -> 10.244.1.7 icmp: local")
    r = CliRunner().invoke(main, ["explain", "10.244.1.1", "10.244.99.1", "--config", cfg, "--json"])
    v = json.loads(r.stdout)["verdict"]
    assert (v["verdict"], v["reason"]) == ("drop", "no_route")  # cluster space without a peer


@pytest.mark.parametrize(
    ("command", "options"),
    [("demo", ("--seconds", "--no-throughput")), ("bench", ("--quick", "--reps", "--only", "--no-plots"))],
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_demo_and_bench_help_shows_their_own_options(
    command: str, options: tuple[str, ...], flag: str
) -> None:
    # click would answer --help itself with the bare wrapper command (no options); the command's own
    # argparse parser must get it, print its options and exit 0 without running anything
    r = CliRunner().invoke(main, [command, flag])
    assert r.exit_code == 0, r.output
    assert f"usage: podrouter {command}" in r.output
    for opt in options:
        assert opt in r.output, (opt, r.output)


def test_the_top_level_help_still_lists_demo_and_bench() -> None:
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    assert "demo" in r.output and "bench" in r.output


# ------------------------------------------------------------------------------- CLI conventions


def _commands() -> list[tuple[str, ...]]:
    import click

    out: list[tuple[str, ...]] = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        out.append(path)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))

    walk(main, ())
    return out


def test_version_names_the_package_version() -> None:
    from importlib.metadata import version

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0
    assert r.output.strip() == f"podrouter {version('podrouter')}"


@pytest.mark.parametrize("width", [80, 100])
def test_every_command_has_a_whole_one_line_help(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # click cuts a docstring's first sentence with "..." when it does not fit the listing; every
    # command carries a short_help that fits an 80-column terminal whole
    monkeypatch.setenv("COLUMNS", str(width))
    groups = [p for p in _commands() if p in {(), ("pod",)}]
    assert len(_commands()) >= 12
    for path in groups:
        r = CliRunner().invoke(main, [*path, "--help"], terminal_width=width)
        assert r.exit_code == 0, r.output
        listing = r.output.split("Commands:", 1)[1]
        lines = [ln for ln in listing.splitlines() if ln.strip()]
        assert lines and all("..." not in ln and "…" not in ln for ln in lines), listing
        assert all(len(ln.split(None, 1)) == 2 for ln in lines), listing


def test_check_json_reports_a_good_and_a_bad_config(tmp_path: Path) -> None:
    good = Path(__file__).resolve().parents[2] / "configs" / "native.yaml"
    r = CliRunner().invoke(main, ["check", "--config", str(good), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["node"] and doc["mode"] in {"tunnel", "native", "hybrid"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("  name: node1", "  name: node1\n  bogus_key: 7", 1))
    r = CliRunner().invoke(main, ["check", "--config", str(bad), "--json"])
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and any("node.bogus_key" in p for p in doc["problems"])


def test_pod_add_and_del_json(short_dir: Path) -> None:
    path = short_dir / "j.sock"
    st = FakeDaemonState()
    srv = serve(path, st)
    try:
        r = CliRunner().invoke(
            main,
            ["pod", "add", "web", "--ip", "10.244.1.5", "--host-interface", "veth-web", "--socket",
             str(path), "--json"],
        )
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["pod"]["name"] == "web" and doc["warnings"] == ["w1"]
        r = CliRunner().invoke(main, ["pod", "del", "web", "--socket", str(path), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["removed"] == "web" and "web" not in st.pods
    finally:
        srv.close()


def test_bench_json_keeps_stdout_for_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    from podrouter.bench import main as bench_main

    assert bench_main(["--json", "--only", "no-such-part"]) == 2
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"ok": False, "exit": 2}
    assert "unknown part" in cap.err


def test_check_compiles_the_tables_with_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    # `check` hands the config's table spec to the datapath's own compiler (the one rulebook) and
    # reports what it refuses, exit 2, before anything runs
    from podrouter import cli, plan

    good = Path(__file__).resolve().parents[2] / "configs" / "node1-hybrid.yaml"
    r = CliRunner().invoke(main, ["check", "--config", str(good)])
    assert r.exit_code == 0 and "tables compiled" in r.output, r.output
    real = plan.build_spec

    def broken(*a: Any, **kw: Any) -> dict[str, Any]:
        spec = real(*a, **kw)
        spec["peers"][0]["pod_cidrs"] = ["10.244.2.0/33"]
        return spec

    monkeypatch.setattr(plan, "build_spec", broken)
    assert any("10.244.2.0/33" in p for p in cli.compile_problems(configmod_load(good)))
    r = CliRunner().invoke(main, ["check", "--config", str(good), "--json"])
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and any(p.startswith("tables: ") and "/33" in p for p in doc["problems"])


def configmod_load(path: Path) -> Any:
    from podrouter import config as configmod

    return configmod.load(str(path))


def test_check_reports_every_table_problem_at_once_under_the_yaml_keys(tmp_path: Path) -> None:
    # the relations are the core's rulebook; `check` lists all of them in one run, each under the key
    # the user wrote (node.pod_cidr, the original peers[] index past a broken entry) with the value
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.9.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
routing: {mode: hybrid, native_cidrs: [10.99.0.0/16]}
peers:
  - {name: broken, address: nope, pod_cidr: 10.244.2.0/24}
  - {name: node2, address: 172.16.2.2, pod_cidr: 10.244.2.0/24}
  - {name: node2, address: 172.16.3.3, pod_cidr: 10.244.2.0/25}
""")
    r = CliRunner().invoke(main, ["check", "--config", str(cfg), "--json"])
    assert r.exit_code == 2, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert doc["problems"] == [
        "peers[0].address: 'nope' is not an IP address",
        "routing.native_cidrs[0]: '10.99.0.0/16' does not overlap the cluster pod CIDRs",
        "node.pod_cidr: '10.9.1.0/24' is not inside the cluster pod CIDRs ['10.244.0.0/16']",
        "peers[1].address: '172.16.2.2' is this node's own address",
        "peers[2].name: 'node2' is also peers[1]",
        "peers[2].pod_cidr: '10.244.2.0/25' overlaps peers[1]'s pod CIDR '10.244.2.0/24'",
    ]
