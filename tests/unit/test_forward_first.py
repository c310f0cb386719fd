"""The forwarding snapshot of the forward-first restart (python/podrouter/startup.py): it round-trips,
every kind of bad or stale file is refused with a reason (it is untrusted input), `forward_first`
falls back to the normal start (None, the reason logged) whenever it cannot forward, and the
forward-first path imports none of pyroute2. The restart itself, with real workers taking the fd
keeper's fds, is in tests/integration/test_restart.py and test_handover.py."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_native import node1_spec

from podrouter import startup

DP_CONFIG: dict[str, Any] = {
    "tun_name": "podr0",
    "tun_mtu": 1500,
    "tun_persist": True,
    "underlay_ifindex": 2,
    "underlay_mac": "02:00:00:00:00:02",
    "underlay_address": "172.16.2.2",
    "underlay_address6": None,
    "vxlan_port": 4789,
    "geneve_port": 6081,
    "workers": 1,
    "nat": {"max_entries": 1024},
    "offload": True,
}


@pytest.fixture
def cfg() -> Iterator[Any]:
    d = Path("/tmp") / f"prf-{secrets.token_hex(4)}"  # short: sun_path is 108 bytes
    d.mkdir(mode=0o700)
    conf = d / "node1.yaml"
    conf.write_text("node:\n  name: node1\n")
    c = SimpleNamespace(
        path=str(conf),
        api=SimpleNamespace(socket=str(d / "api.sock"), keeper=True),
        node=SimpleNamespace(name="node1"),
        state_path=d / "node1.state.json",
    )
    try:
        yield c
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _good(cfg: Any) -> dict[str, Any]:
    chash = startup.config_hash(cfg.path)
    assert chash is not None
    return startup.payload(cfg, chash, DP_CONFIG, node1_spec() | {"node": {**node1_spec()["node"]}})


def _write(cfg: Any, data: Any) -> Path:
    path = startup.snapshot_path(cfg)
    startup.write(path, data)
    return path


def test_round_trip(cfg: Any) -> None:
    data = _good(cfg)
    path = _write(cfg, data)
    assert path == Path(cfg.state_path).with_name("node1.forwarding.json")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["node1.forwarding.json", "node1.yaml"]  # no temp
    got = startup.read(path, cfg, startup.config_hash(cfg.path))
    assert got == json.loads(json.dumps(data))
    assert got is not None and got["dp_config"]["workers"] == 1 and got["keeper"].endswith("node1.keeper")


def test_no_file_is_no_snapshot(cfg: Any) -> None:
    assert startup.read(startup.snapshot_path(cfg), cfg, startup.config_hash(cfg.path)) is None


def _drop(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    out = json.loads(json.dumps(d))
    cur = out
    for k in keys[:-1]:
        cur = cur[k]
    del cur[keys[-1]]
    return out


def _set(d: dict[str, Any], value: Any, *keys: str) -> dict[str, Any]:
    out = json.loads(json.dumps(d))
    cur = out
    for k in keys[:-1]:
        cur = cur[k]
    cur[keys[-1]] = value
    return out


BAD: list[tuple[str, Any, str]] = [
    ("list", lambda g: [g], "not a JSON object"),
    ("format", lambda g: _set(g, 2, "format"), "format '2', not 1"),
    ("no format", lambda g: _drop(g, "format"), "format 'None'"),
    ("node", lambda g: _set(g, "node2", "node"), "written for node 'node2'"),
    ("config hash", lambda g: _set(g, "0" * 64, "config_sha256"), "another version of the config"),
    ("dp_config", lambda g: _set(g, "x", "dp_config"), "dp_config: not an object"),
    ("workers type", lambda g: _set(g, "1", "dp_config", "workers"), "dp_config.workers"),
    ("workers bool", lambda g: _set(g, True, "dp_config", "workers"), "dp_config.workers"),
    ("workers range", lambda g: _set(g, 0, "dp_config", "workers"), "out of range"),
    ("tun name", lambda g: _drop(g, "dp_config", "tun_name"), "dp_config.tun_name"),
    ("ifindex", lambda g: _set(g, None, "dp_config", "underlay_ifindex"), "dp_config.underlay_ifindex"),
    ("persist", lambda g: _set(g, False, "dp_config", "tun_persist"), "tun_persist"),
    ("spec", lambda g: _set(g, [], "spec"), "spec: not a table spec"),
    ("spec node", lambda g: _set(g, "node2", "spec", "node", "name"), "spec.node.name"),
    ("nat path", lambda g: _set(g, "/etc/passwd", "nat_snapshot"), "nat_snapshot"),
    ("keeper path", lambda g: _set(g, "/tmp/other.keeper", "keeper"), "keeper"),
]


@pytest.mark.parametrize("name,mutate,reason", BAD, ids=[b[0] for b in BAD])
def test_a_bad_snapshot_is_refused_with_a_reason(cfg: Any, name: str, mutate: Any, reason: str) -> None:
    path = _write(cfg, mutate(_good(cfg)))
    with pytest.raises(startup.SnapshotError, match=reason.replace("(", r"\(")):
        startup.read(path, cfg, startup.config_hash(cfg.path))


@pytest.mark.parametrize(
    "raw,reason",
    [(b"{", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[" * 100000 + b"]" * 100000, "not JSON")],
    ids=["truncated", "not utf-8", "deep"],
)
def test_garbage_is_refused(cfg: Any, raw: bytes, reason: str) -> None:
    path = startup.snapshot_path(cfg)
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    with pytest.raises(startup.SnapshotError, match=reason):
        startup.read(path, cfg, startup.config_hash(cfg.path))


def test_a_stale_config_is_refused(cfg: Any) -> None:
    path = _write(cfg, _good(cfg))
    Path(cfg.path).write_text("node:\n  name: node1\n# edited\n")
    with pytest.raises(startup.SnapshotError, match="another version of the config"):
        startup.read(path, cfg, startup.config_hash(cfg.path))
    with pytest.raises(startup.SnapshotError, match="cannot be hashed"):
        startup.read(path, cfg, None)


def test_file_kinds_and_permissions_are_refused(cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    chash = startup.config_hash(cfg.path)
    path = startup.snapshot_path(cfg)
    real = Path(cfg.path).with_name("real.json")
    startup.write(real, _good(cfg))
    path.symlink_to(real)
    with pytest.raises(startup.SnapshotError, match="cannot open it"):
        startup.read(path, cfg, chash)  # O_NOFOLLOW
    path.unlink()
    path.mkdir()
    with pytest.raises(startup.SnapshotError, match="not a regular file"):
        startup.read(path, cfg, chash)
    path.rmdir()
    startup.write(path, _good(cfg))
    os.chmod(path, 0o622)
    with pytest.raises(startup.SnapshotError, match="writable by others"):
        startup.read(path, cfg, chash)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, 65534, -1)
        with pytest.raises(startup.SnapshotError, match="owned by uid 65534"):
            startup.read(path, cfg, chash)
        os.chown(path, 0, -1)
    monkeypatch.setattr(startup, "MAX_BYTES", 100)
    with pytest.raises(startup.SnapshotError, match="larger than 100 bytes"):
        startup.read(path, cfg, chash)


def test_spec_key_ignores_the_generation_and_tuples() -> None:
    a = node1_spec()
    b = json.loads(json.dumps(a)) | {"generation": 99}
    b["node"]["pod_cidrs"] = tuple(b["node"]["pod_cidrs"])
    assert startup.spec_key(a) == startup.spec_key(b)
    b["mode"] = "tunnel"
    assert startup.spec_key(a) != startup.spec_key(b)


def test_forward_first_falls_back_with_a_reason(cfg: Any, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.forward_first")
    caplog.set_level(logging.INFO, logger="test.forward_first")
    assert startup.forward_first(cfg, log) is None  # no snapshot: the normal start, quietly
    assert caplog.records == []

    path = _write(cfg, _set(_good(cfg), "node9", "node"))
    assert startup.forward_first(cfg, log) is None
    assert "not used: written for node 'node9'" in caplog.text

    bad_node = {"name": "node1", "colour": 1}  # the engine refuses it
    startup.write(path, _set(_good(cfg), bad_node, "spec", "node"))
    caplog.clear()
    assert startup.forward_first(cfg, log) is None
    assert "not used: spec:" in caplog.text

    startup.write(path, _good(cfg))
    caplog.clear()
    assert startup.forward_first(cfg, log) is None
    assert "not used: no fd keeper on" in caplog.text

    # a daemon still answers on the API socket: never two datapaths (the handover is for that)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(cfg.api.socket)
        s.listen(1)
        caplog.clear()
        assert startup.forward_first(cfg, log) is None
        assert "a daemon answers on" in caplog.text
    os.unlink(cfg.api.socket)

    # the state file names a live pid (ours is excluded: pid 1 always runs)
    Path(cfg.state_path).write_text(json.dumps({"pid": 1}))
    caplog.clear()
    assert startup.forward_first(cfg, log) is None
    assert "names pid 1, which runs" in caplog.text


def test_the_forward_first_path_imports_no_pyroute2() -> None:
    """Everything launch.run_daemon imports before the workers forward: the light pyroute2 package
    may be registered (netlink/__init__), but none of pyroute2 itself is loaded."""
    code = (
        "import json, sys\n"
        "import podrouter.entry\n"
        "from podrouter import config, startup, keeper, handover, native\n"
        "import podrouter.netlink.constants\n"
        "native.module()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = [m for m in mods if m.startswith("pyroute2.")]
    assert not loaded, loaded
    assert "podrouter.daemon" not in mods and "podrouter._native" in mods
