"""Start-up budget, guarded by structure (docs/benchmarks.md, "Start-up time"): what `podrouter run`
imports before it is ready, and the click-free `run` of the console script (podrouter/entry.py)
behaving exactly like click's. No timing assertions: the checks look at sys.modules in a fresh
interpreter and compare the two paths' output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from podrouter import metrics
from podrouter.entry import fast_run_args

# everything `podrouter run` imports up to ready: the console script's module, the daemon, and the
# modules Daemon.preflight/start import inside their functions (static discovery, no BGP)
START_IMPORTS = """
import json, sys
import podrouter.entry
from podrouter import config, daemon, discovery, lifecycle, nftables, state, api, monitor, metrics
from podrouter.netlink import neigh, plumbing, underlay, rtnl, sysctl
import podrouter.qos.sizing, podrouter.qos.manager, pyroute2.iproute
from podrouter.netlink import _pyroute2
print(json.dumps({"modules": sorted(sys.modules), "light": _pyroute2.is_light()}))
"""

# imported only after ready (prometheus_client: the metrics server), by other commands (click), or
# never by the daemon (the rest of pyroute2: IPDB/NDB, ethtool, wireless, conntrack)
NOT_BEFORE_READY = ("click", "prometheus_client", "pyroute2.ndb", "pyroute2.ethtool", "pyroute2.nftables")


def _fresh(code: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_run_imports_nothing_it_does_not_need_before_ready() -> None:
    got = _fresh(START_IMPORTS)
    modules = set(got["modules"])  # type: ignore[arg-type]
    offending = sorted(m for m in modules if m.split(".")[0] in NOT_BEFORE_READY or m in NOT_BEFORE_READY)
    offending += sorted(m for m in modules for p in NOT_BEFORE_READY if "." in p and m.startswith(p))
    assert not offending, f"imported before ready: {offending}"
    # pyroute2's own __init__ (every part of the library) never ran: the light package only
    assert got["light"] is True
    # the daemon's modules are there (the check above looked at the right thing)
    assert {"podrouter.daemon", "podrouter.config", "yaml", "pyroute2.iproute"} <= modules


def test_libnftables_loads_by_its_soname_without_find_library() -> None:
    """The pod egress guard's probe (`nftables.unavailable`, in preflight) loads libnftables by its
    soname: `ctypes.util.find_library` runs `ldconfig -p` (a fork and exec) and is only the fallback."""
    got = _fresh(
        "import ctypes.util, json\n"
        "def refuse(name):\n"
        "    raise AssertionError('find_library called')\n"
        "ctypes.util.find_library = refuse\n"
        "from podrouter import nftables\n"
        "print(json.dumps({'why': nftables.unavailable(), 'loaded': nftables._lib is not None}))\n"
    )
    assert got == {"why": None, "loaded": True}


def test_the_state_file_is_written_without_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh start writes the state file a dozen times; each write is a rename of a complete
    temporary file, never an fsync (state.py: the record has to outlive the process, not the machine)."""
    from podrouter import state

    def refuse(fd: int) -> None:
        raise AssertionError("fsync called")

    monkeypatch.setattr(os, "fsync", refuse)
    path = tmp_path / "n1.state.json"
    st = state.State(node="n1", netns="1:2", pid=0)
    state.save(path, st)
    st.sysctls["net.ipv4.ip_forward"] = "0"
    state.save(path, st)
    loaded = state.load(path)
    assert loaded is not None and loaded.sysctls == {"net.ipv4.ip_forward": "0"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_the_metrics_module_imports_prometheus_client_only_to_serve() -> None:
    got = _fresh(
        "import json, sys; import podrouter.metrics; print(json.dumps({'modules': sorted(sys.modules)}))"
    )
    assert not [m for m in got["modules"] if str(m).startswith("prometheus_client")]  # type: ignore[union-attr]


def test_metrics_served_on_a_port_taken_earlier() -> None:
    sock = metrics.listen_socket(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # taken: a second listener on the same port is refused (the start fails on a clash, as before)
    with pytest.raises(OSError):
        metrics.listen_socket(("127.0.0.1", port))
    # a scrape before the server runs waits in the backlog and is answered once it does
    early = socket.create_connection(("127.0.0.1", port), timeout=5)
    srv = metrics.MetricsServer(
        metrics.make_source(lambda: {"packets": {"vxlan/egress": 3}}, lambda: 2, dict), sock=sock
    )
    try:
        early.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := early.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and b"podrouter_peers 2.0" in reply
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: S310
        assert 'podrouter_packets_total{direction="egress",path="vxlan"} 3.0' in body
        assert srv.address[1] == port
    finally:
        early.close()
        srv.close()


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["run", "--config", "c.yaml"], ("c.yaml", "info")),
        (["run", "--config=c.yaml"], ("c.yaml", "info")),
        (["run", "--log-level", "debug", "--config", "c.yaml"], ("c.yaml", "debug")),
        (["run", "--config", "c.yaml", "--log-level=error"], ("c.yaml", "error")),
        # everything else is click's to parse and report
        (["run"], None),
        (["run", "--config"], None),
        (["run", "--config", ""], None),
        (["run", "--config", "--log-level"], None),
        (["run", "--config", "c.yaml", "--config", "d.yaml"], None),
        (["run", "--config", "c.yaml", "--log-level", "DEBUG"], None),
        (["run", "--config", "c.yaml", "--log-level", "trace"], None),
        (["run", "--config", "c.yaml", "--help"], None),
        (["run", "--config", "c.yaml", "-h"], None),
        (["run", "--config", "c.yaml", "--"], None),
        (["run", "--config", "c.yaml", "extra"], None),
        (["run", "--conf", "c.yaml"], None),
        (["status", "--config", "c.yaml"], None),
        (["--version"], None),
        ([], None),
    ],
)
def test_fast_run_takes_only_what_click_would_accept_as_is(
    args: list[str], want: tuple[str, str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("_PODROUTER_COMPLETE", raising=False)
    assert fast_run_args(args) == want


def test_fast_run_leaves_odd_paths_and_completion_to_click(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("_PODROUTER_COMPLETE", raising=False)
    assert fast_run_args(["run", "--config", str(tmp_path)]) is None  # a directory
    cfg = tmp_path / "c.yaml"
    cfg.write_text("node: {}\n")
    assert fast_run_args(["run", "--config", str(cfg)]) == (str(cfg), "info")
    if os.geteuid() != 0:  # root reads anything: click's "not readable" cannot happen
        cfg.chmod(0)
        assert fast_run_args(["run", "--config", str(cfg)]) is None
    monkeypatch.setenv("_PODROUTER_COMPLETE", "bash_source")
    assert fast_run_args(["run", "--config", str(tmp_path / "missing.yaml")]) is None


def _entry(args: list[str]) -> tuple[int, str, str, bool]:
    """Run the console script's main() with `args` in a fresh interpreter: status, stdout, stderr
    and whether click was imported."""
    code = (
        "import sys, json\n"
        f"sys.argv = ['podrouter', *{args!r}]\n"
        "from podrouter import entry\n"
        "try:\n"
        "    entry.main()\n"
        "    rc = 0\n"
        "except SystemExit as e:\n"
        "    rc = e.code if isinstance(e.code, int) else 1\n"
        "sys.stdout.flush()\n"
        "print('\\n' + json.dumps({'rc': rc, 'click': 'click' in sys.modules}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    *out, last = p.stdout.rstrip("\n").split("\n")
    r = json.loads(last)
    return r["rc"], "\n".join(out).strip(), p.stderr, r["click"]


def _click(args: list[str]) -> tuple[int, str, str]:
    code = "import sys\nfrom podrouter.cli import main\nsys.argv[0] = 'podrouter'\nmain()\n"
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout.strip(), p.stderr


@pytest.mark.parametrize(
    "case",
    ["missing", "duplicate-key", "bad-value", "directory", "bad-level", "no-config"],
)
def test_run_fails_the_same_with_or_without_click(tmp_path: Path, case: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  name: n1\n  name: n2\n")
    worse = tmp_path / "worse.yaml"
    worse.write_text("node: {name: 'bad name!', pod_cidr: 10.244.1.0/33}\n")
    args = {
        "missing": ["run", "--config", str(tmp_path / "missing.yaml")],
        "duplicate-key": ["run", "--config", str(bad), "--log-level", "debug"],
        "bad-value": ["run", f"--config={worse}"],
        "directory": ["run", "--config", str(tmp_path)],
        "bad-level": ["run", "--config", str(bad), "--log-level", "loud"],
        "no-config": ["run"],
    }[case]
    rc, out, err, used_click = _entry(args)
    assert (rc, out, err) == _click(args)
    assert rc == 2 and err.strip()
    # the plain forms never import click; what they cannot take goes to click, which reports it
    assert used_click == (case in ("directory", "bad-level", "no-config"))


def test_the_console_script_is_the_click_free_entry() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["podrouter"] == "podrouter.entry:main"
