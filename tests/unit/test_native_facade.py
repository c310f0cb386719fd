"""podrouter.native, the typed facade over podrouter._native: the stub (_native.pyi) that mypy checks
every caller against names exactly what the extension exports, and the facade's calls are the
extension's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import raw
from test_native import NODE1, node1_spec

from podrouter import _native, native

STUB = Path(__file__).resolve().parents[2] / "python" / "podrouter" / "_native.pyi"


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    """Top-level names of the stub, and each class's members."""
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            top.add(node.name)
            members[node.name] = {
                n.name for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("__")
            }
    return top, members


def test_the_stub_names_what_the_extension_exports() -> None:
    top, members = stub_names()
    public = {n for n in dir(_native) if not n.startswith("_")} | {"__version__", "__all__"}
    assert top == public, (sorted(top - public), sorted(public - top))
    for cls, names in members.items():
        have = {n for n in dir(getattr(_native, cls)) if not n.startswith("_")}
        assert names == have, (cls, sorted(names - have), sorted(have - names))


def test_the_facade_calls_the_extension() -> None:
    spec = node1_spec()
    pkt = raw(IP(src="10.244.1.1", dst="10.244.2.9") / TCP(dport=80))
    assert dict(native.compile_tables(spec, NODE1).classify(pkt)) == dict(
        _native.Tables(spec, NODE1).classify(pkt)
    )
    assert native.version() == _native.__version__
    assert native.vtep_mac("172.16.3.2") == _native.vtep_mac("172.16.3.2")
    assert native.available() is None
    assert native.has_load_generators() == hasattr(_native, "udp_blast")
    with pytest.raises(ValueError, match="peers\\[0\\].pod_cidrs\\[0\\]"):
        native.compile_tables(
            {**spec, "peers": [{**spec["peers"][0], "pod_cidrs": ["10.244.2.0/33"]}]}, NODE1
        )


def test_check_problems_is_check_tables_with_structure() -> None:
    """The structured rulebook answer (what etcd discovery words by registration) and the plain
    one (what config.py maps to YAML keys) are the same problems in the same order."""
    spec = node1_spec()
    late = {**spec["peers"][0], "name": "late", "pod_cidrs": ["10.244.2.128/25"]}
    n = len(spec["peers"])
    spec = {**spec, "peers": [*spec["peers"], late]}
    plain = native.check_tables(spec, NODE1)
    rich = native.check_problems(spec, NODE1)
    assert plain and [(p.path, p.message) for p in rich] == plain
    assert rich == [
        native.Problem(c, p, o, tuple(v), m) for c, p, o, v, m in _native.check_problems(spec, NODE1)
    ]
    by_code = {p.code: p for p in rich}
    taken = by_code["address_taken"]
    assert (taken.path, taken.other) == (f"peers[{n}].address", "peers[0].address")
    overlap = by_code["pod_cidr_overlap"]
    assert (overlap.path, overlap.other) == (f"peers[{n}].pod_cidrs[0]", "peers[0].pod_cidrs[0]")
    assert overlap.values == ("10.244.2.128/25", "10.244.2.0/24")


def test_a_missing_extension_is_one_start_error() -> None:
    """Without the extension the facade raises NativeUnavailable (a StartError, exit 1) naming it,
    never an ImportError traceback; importing the facade alone does not load the extension."""
    code = (
        "import sys\n"
        "sys.modules['podrouter._native'] = None  # an import of it now fails\n"
        "from podrouter import native\n"
        "from podrouter.errors import StartError\n"
        "assert native.available() is not None and 'podrouter._native' in native.available()\n"
        "try:\n"
        "    native.compile_tables({}, {})\n"
        "except StartError as e:\n"
        "    assert e.code == 1, e.code\n"
        "    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "refused"
