"""The Python control plane's modules form no import loop (docs/architecture.md, "Module graph").

Every `import` and `from ... import` in python/podrouter (top level and inside functions: a lazy
import still ties two modules together) is read with `ast` and resolved to the podrouter module it
names (`from podrouter import plan` is podrouter.plan; `from podrouter.config import Config` is
podrouter.config). A package importing its own submodules, or a submodule its package, is no edge.
Loops are found with the Rust module-graph test's Tarjan search (test_module_graph.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from test_module_graph import cycles

ROOT = Path(__file__).resolve().parents[2] / "python"

Mod = tuple[str, ...]


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(mod: str, f: Path, mods: dict[str, Path]) -> dict[str, int]:
    """The podrouter modules `mod` imports, each with the line of its first import."""
    package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + ".") and not name.startswith(mod + "."):
                found.setdefault(name, node.lineno)
    return found


def edges(root: Path) -> dict[tuple[Mod, Mod], list[str]]:
    mods = modules(root)
    out: dict[tuple[Mod, Mod], list[str]] = {}
    for mod, f in mods.items():
        for target, line in imports(mod, f, mods).items():
            out.setdefault((tuple(mod.split(".")), tuple(target.split("."))), []).append(
                f"{f.relative_to(root.parent)}:{line}"
            )
    return out


def loops(root: Path) -> list[tuple[frozenset[str], str]]:
    e = edges(root)
    found = []
    for loop, others in cycles(e):
        names = frozenset(".".join(m) for m in (*loop, *others))
        pairs = zip(loop, loop[1:] + loop[:1], strict=True)
        steps = "; ".join(f"{'.'.join(a)} -> {'.'.join(b)} ({e[a, b][0]})" for a, b in pairs)
        found.append((names, steps))
    return found


def test_the_control_plane_has_no_import_loop() -> None:
    assert edges(ROOT), "no imports found: the reader is broken"
    assert [steps for _, steps in loops(ROOT)] == []


def test_no_module_is_imported_by_computed_name() -> None:
    """`importlib.import_module(f"podrouter.{x}")` hides an edge from the loop search: every import of a
    podrouter module is a plain statement."""

    def names_podrouter(arg: ast.expr) -> bool:
        first = arg.values[0] if isinstance(arg, ast.JoinedStr) and arg.values else arg
        return isinstance(first, ast.Constant) and str(first.value).startswith("podrouter")

    hidden = [
        f"{f.relative_to(ROOT.parent)}:{node.lineno}"
        for f in sorted(ROOT.rglob("*.py"))
        for node in ast.walk(ast.parse(f.read_text(), str(f)))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "import_module"
        and node.args
        and names_podrouter(node.args[0])
    ]
    assert hidden == []


def test_cli_and_daemon_do_not_import_each_other() -> None:
    mods = modules(ROOT)
    for a, b in (("podrouter.cli", "podrouter.daemon"), ("podrouter.daemon", "podrouter.cli")):
        assert b not in imports(a, mods[a], mods), f"{a} imports {b}"
    # nothing the daemon's parts import reaches back into the daemon
    parts = ("plan", "bringup", "pods", "guards", "reconcile", "cleanup", "native", "errors", "handover")
    for part in (
        *parts,
        "preflight",
        "status",
        "shutdown",
        "podapi",
        "lifecycle",
        "startup",
        "ports",
        "keeper",
    ):
        name = f"podrouter.{part}"
        assert "podrouter.daemon" not in imports(name, mods[name], mods), f"{name} imports the daemon"


def test_the_reader_finds_a_loop(tmp_path: Path) -> None:
    """The guard can fail: a loop through a lazy `from . import` and an absolute import is found."""
    pkg = tmp_path / "podrouter"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from podrouter.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import podrouter.a\n")
    (pkg / "d.py").write_text("from podrouter import a  # no loop: nothing imports d\n")
    found = loops(tmp_path)
    assert len(found) == 1
    names, steps = found[0]
    assert names == {"podrouter.a", "podrouter.b", "podrouter.c"}
    assert "podrouter/b.py:2" in steps
