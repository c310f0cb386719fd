"""Integration fixtures: throwaway hosts in network namespaces (tests/nettopo.py).

These tests need root. They are never skipped: without root they fail loudly, because CI runs as root
and a skipped integration test would hide a broken datapath.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Daemons, short_dir

from nettopo import ReferenceTopology, Topology, reference_topology


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (CI runs them as root); run `just test` as root")
    t = Topology("it")
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def ref(topo: Topology) -> ReferenceTopology:
    """The docs/design.md §8 reference topology with pod1 (node1), pod2 (node2), pod3 (node3)."""
    return reference_topology(topo)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """podrouter daemons the test starts in node namespaces; all are stopped when the test ends, also
    when it fails. Their API sockets live in a short directory (sun_path holds 108 bytes)."""
    with short_dir() as d:
        ds = Daemons(d, tmp_path)
        try:
            yield ds
        finally:
            ds.stop_all()
