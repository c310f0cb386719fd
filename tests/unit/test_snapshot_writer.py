"""The forwarding snapshot's writer thread (startup.SnapshotWriter) and how the daemon's stop uses it:
the reconcile only hands the spec over, the newest spec wins, a stop for a successor waits for the
file, a full removal leaves none behind."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from podrouter import config, daemon, startup
from recorder import Recorder

CFG = """
api: {{socket: {tmp}/n.sock, keeper: true}}
node: {{name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}}
cluster: {{pod_cidr: 10.244.0.0/16}}
"""


class Gate:
    """startup.write wrapped: records each write's generation and thread, and holds the first write
    until released (so later submits arrive while a write runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = startup.write
        self.started = threading.Event()
        self.release = threading.Event()
        self.written: list[int] = []
        self.threads: list[threading.Thread] = []
        monkeypatch.setattr(startup, "write", self.write)

    def write(self, path: Path, data: dict[str, Any]) -> None:
        self.started.set()
        assert self.release.wait(10), "never released"
        self.threads.append(threading.current_thread())
        self.real(path, data)
        self.written.append(int(data["spec"]["generation"]))


def spec(gen: int) -> dict[str, Any]:
    return {"generation": gen, "node": {"name": "node1"}, "peers": []}


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return config.loads(CFG.format(tmp=tmp_path))


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    return Gate(monkeypatch)


@pytest.fixture
def writer(cfg: config.Config) -> startup.SnapshotWriter:
    """A writer of `cfg`'s snapshot file."""
    return startup.SnapshotWriter(startup.snapshot_path(cfg))


@pytest.fixture
def made(cfg: config.Config, monkeypatch: pytest.MonkeyPatch) -> daemon.Daemon:
    """A daemon of `cfg` with a recorded datapath, between reconciles (nothing in the kernel)."""
    d = daemon.Daemon(cfg)
    d.datapath = Recorder("datapath", [])  # type: ignore[assignment]
    d.config_sha256 = "h"
    monkeypatch.setattr(d, "_datapath_config", lambda: {"tun_name": "podr0"})
    return d


def test_newest_spec_wins_and_the_caller_never_writes(
    gate: Gate, cfg: config.Config, writer: startup.SnapshotWriter
) -> None:
    writer.submit(cfg, "h", {}, spec(1))
    assert gate.started.wait(10)
    for gen in (2, 3, 4):  # while generation 1 is being written: only the newest waits
        writer.submit(cfg, "h", {}, spec(gen))
    assert not startup.snapshot_path(cfg).exists()  # the submits returned before any write finished
    gate.release.set()
    assert writer.flush(10)
    assert gate.written == [1, 4]
    assert all(t is not threading.main_thread() for t in gate.threads)
    assert json.loads(startup.snapshot_path(cfg).read_text())["spec"]["generation"] == 4
    writer.close(flush=False)
    writer.submit(cfg, "h", {}, spec(5))  # closed: ignored
    assert writer.flush(1) and gate.written == [1, 4]


def test_close_without_flush_drops_what_waits_but_finishes_a_write(
    gate: Gate, cfg: config.Config, writer: startup.SnapshotWriter
) -> None:
    writer.submit(cfg, "h", {}, spec(1))
    assert gate.started.wait(10)
    writer.submit(cfg, "h", {}, spec(2))
    threading.Timer(0.2, gate.release.set).start()
    writer.close(flush=False)  # returns only once generation 1 is on disk; 2 is never written
    assert gate.written == [1]


def test_a_failed_write_is_logged_and_the_next_one_happens(
    tmp_path: Path, cfg: config.Config, caplog: pytest.LogCaptureFixture
) -> None:
    w = startup.SnapshotWriter(tmp_path / "missing-dir" / "x.json", logging.getLogger("podrouter"))
    w.submit(cfg, "h", {}, spec(1))
    assert w.flush(10)
    assert "writing the forwarding snapshot" in caplog.text and w.writes == 0
    w.path = tmp_path / "x.json"
    w.submit(cfg, "h", {}, spec(2))
    assert w.flush(10) and w.writes == 1 and (tmp_path / "x.json").exists()
    w.close(flush=False)


@pytest.mark.parametrize("keep", [True, False])
def test_the_stop_flushes_for_a_successor_and_a_teardown_leaves_no_file(
    gate: Gate, made: daemon.Daemon, keep: bool
) -> None:
    d = made
    d.underlay = Recorder("underlay", [])  # type: ignore[assignment]
    d._write_forwarding(spec(7))
    assert gate.started.wait(10)
    threading.Timer(0.2, gate.release.set).start()
    d.shutdown(keep=keep)
    path = startup.snapshot_path(d.cfg)
    if keep:
        assert gate.written == [7] and json.loads(path.read_text())["spec"]["generation"] == 7
    else:
        # the write under way finished before the teardown removed the file: nothing brings it back
        assert gate.written == [7] and not path.exists()


def test_each_snapshot_is_handed_over_once(made: daemon.Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot is its tables' generation for a config file's hash: the reload's rewrite after a
    reconcile that installed tables (or of an unchanged file) hands nothing over again."""
    d = made
    handed: list[tuple[str, int]] = []
    monkeypatch.setattr(d.snapshots, "submit", lambda cfg, h, dp, sp: handed.append((h, sp["generation"])))
    d.generation = 1
    d._write_forwarding(spec(1))
    d._write_forwarding(spec(1))  # the reload's rewrite, the config file unchanged
    d.generation = 2
    d._write_forwarding(spec(2))  # new tables
    d.config_sha256 = "h2"
    d._write_forwarding(spec(2))  # the reload's rewrite for a changed file
    d._write_forwarding(spec(2))
    assert handed == [("h", 1), ("h", 2), ("h2", 2)]
