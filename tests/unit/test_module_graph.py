"""The Rust crates' modules form no loop: no module uses one that (directly or through others) uses it
back (docs/architecture.md, "Module map").

The graph is read from the sources: every `crate::…`, `super::…`, `self::…` and `$crate::…` path outside
comments and string literals, including the trees of `use` items, names the file module it reaches (the
longest prefix that is a file). A module reaching an ancestor or a descendant of itself is a parent/child
link and not an edge (a submodule may use its parent's helpers; a parent declares and re-exports its
children). Any other reference is an edge between the two modules' ancestors that are siblings
(`crate::wire::ipv4` using `crate::nat` is an edge wire -> nat), so loops are found at every level of
the tree: among the crate's top-level modules and among the files of each directory module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CRATES = [ROOT / "rust" / "core" / "src", ROOT / "rust" / "io" / "src"]

Mod = tuple[str, ...]
Edge = tuple[Mod, Mod]

_LEXEME = re.compile(
    r"""
    (?P<line_comment>//[^\n]*)
  | (?P<block_comment>/\*)
  | (?P<raw_string>b?r(?P<hashes>\#*)")
  | (?P<string>b?"(?:\\.|[^"\\])*")
  | (?P<char>b?'(?:\\u\{[0-9a-fA-F]+\}|\\.|[^\\'\n])')
  | (?P<ident>\$?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<path_sep>::)
  | (?P<punct>[{}(),;*])
  | (?P<newline>\n)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def tokens(src: str) -> Iterator[tuple[str, int]]:
    """(token, line) pairs of the code: identifiers, `::` and the punctuation a path or a `use` tree
    needs; comments, string and char literals are dropped."""
    line, pos = 1, 0
    while pos < len(src):
        m = _LEXEME.match(src, pos)
        assert m is not None
        kind = m.lastgroup
        text = m.group(0)
        pos = m.end()
        if kind == "block_comment":
            depth = 1
            while depth and pos < len(src):
                if src.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif src.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    line += src[pos] == "\n"
                    pos += 1
            continue
        if kind == "raw_string":
            close = '"' + m.group("hashes")
            end = src.find(close, pos)
            end = len(src) if end < 0 else end + len(close)
            line += src.count("\n", pos, end)
            pos = end
            continue
        if kind == "newline":
            line += 1
            continue
        line += text.count("\n")
        if kind in ("ident", "path_sep", "punct"):
            yield text, line


def file_modules(src_dir: Path) -> dict[Mod, Path]:
    """Module path (without `crate`) of every .rs file of a crate: lib.rs is (), x.rs and x/mod.rs are
    ("x",), x/y.rs is ("x", "y")."""
    mods: dict[Mod, Path] = {}
    for f in sorted(src_dir.rglob("*.rs")):
        parts = f.relative_to(src_dir).with_suffix("").parts
        if parts[-1] in ("lib", "main", "mod"):
            parts = parts[:-1]
        mods[tuple(parts)] = f
    return mods


def _use_tree(toks: list[tuple[str, int]], i: int, prefix: list[str]) -> tuple[list[list[str]], int]:
    """Paths of the `use` tree starting at toks[i]; returns them and the index after the tree."""
    path = list(prefix)
    out: list[list[str]] = []
    while i < len(toks):
        t = toks[i][0]
        if t == "{":
            i += 1
            while toks[i][0] != "}":
                sub, i = _use_tree(toks, i, path)
                out += sub
                if toks[i][0] == ",":
                    i += 1
            return out, i + 1
        if t == "*":
            return [path], i + 1
        if t == "::":
            i += 1
            continue
        if t in (",", "}", ";"):
            return [path], i
        if t == "as":  # `x as y`: the path is x
            return [path], i + 2
        if t != "self" or not path:  # `a::{self}` is `a`
            path.append(t)
        i += 1
    return [path], i


def references(src: str) -> Iterator[tuple[list[str], int, Mod]]:
    """(path, line, inline module stack) of every absolute-ish path (`crate::`, `$crate::`, `super::`,
    `self::`) in a file, `use` trees expanded."""
    toks = list(tokens(src))
    inline: list[tuple[str, int]] = []  # (name, brace depth at which its body opened)
    depth = 0
    i = 0
    while i < len(toks):
        t, line = toks[i]
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if inline and inline[-1][1] == depth + 1:
                inline.pop()
        elif t == "mod" and i + 2 < len(toks) and toks[i + 2][0] == "{":
            inline.append((toks[i + 1][0], depth + 1))
        elif t == "use":
            paths, j = _use_tree(toks, i + 1, [])
            for p in paths:
                if p and p[0] in ("crate", "$crate", "super", "self"):
                    yield p, line, tuple(n for n, _ in inline)
            i = j
            continue
        elif (
            t in ("crate", "$crate", "super", "self")
            and i + 1 < len(toks)
            and toks[i + 1][0] == "::"
            and (i == 0 or toks[i - 1][0] != "::")
        ):
            p = [t]
            j = i + 1
            while j + 1 < len(toks) and toks[j][0] == "::" and re.match(r"\w", toks[j + 1][0]):
                p.append(toks[j + 1][0])
                j += 2
            yield p, line, tuple(n for n, _ in inline)
            i = j
            continue
        i += 1


def resolve(path: list[str], here: Mod, mods: dict[Mod, Path]) -> Mod | None:
    """The file module a path reaches from module `here` (a file module plus inline modules)."""
    if path[0] in ("crate", "$crate"):
        target = list(path[1:])
    else:
        cur = list(here)
        k = 0
        while k < len(path) and path[k] in ("super", "self"):
            if path[k] == "super":
                if not cur:
                    return None
                cur.pop()
            k += 1
        target = cur + path[k:]
    for n in range(len(target), -1, -1):
        if tuple(target[:n]) in mods:
            return tuple(target[:n])
    return None


def module_edges(src_dir: Path) -> dict[Edge, list[str]]:
    """Sibling edges (from, to) of a crate with `file:line` of the references that make each."""
    mods = file_modules(src_dir)
    edges: dict[Edge, list[str]] = {}
    for mod, f in mods.items():
        for path, line, inline in references(f.read_text()):
            target = resolve(path, mod + inline, mods)
            if target is None or target[: len(mod)] == mod or mod[: len(target)] == target:
                continue
            k = 0
            while mod[k] == target[k]:
                k += 1
            edge = (mod[: k + 1], target[: k + 1])
            where = f.relative_to(ROOT if f.is_relative_to(ROOT) else src_dir)
            edges.setdefault(edge, []).append(f"{where}:{line}")
    return edges


def cycles(edges: dict[Edge, list[str]]) -> list[tuple[list[Mod], list[Mod]]]:
    """For every strongly connected group of modules (Tarjan): one shortest loop through its first
    member, as a node list whose last node uses the first, and the group's other members."""
    graph: dict[Mod, list[Mod]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[Mod, int] = {}
    low: dict[Mod, int] = {}
    stack: list[Mod] = []
    on_stack: set[Mod] = set()
    groups: list[set[Mod]] = []

    def visit(v: Mod) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    found = []
    for group in groups:
        start = min(group)
        prev: dict[Mod, Mod] = {start: start}
        frontier = [start]
        last: Mod | None = None
        while last is None:  # breadth first back to `start`, inside the group
            nxt = []
            for v in frontier:
                if start in graph[v]:
                    last = v
                    break
                for w in graph[v]:
                    if w in group and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        loop = [last]
        while loop[-1] != start:
            loop.append(prev[loop[-1]])
        loop.reverse()
        found.append((loop, sorted(group - set(loop))))
    return found


def describe(found: tuple[list[Mod], list[Mod]], edges: dict[Edge, list[str]]) -> str:
    """`loop: crate::a -> crate::b (file:line); crate::b -> crate::a (file:line)`, then the other
    modules caught in the same tangle."""

    def name(m: Mod) -> str:
        return "::".join(("crate", *m))

    loop, others = found
    steps = [
        f"{name(a)} -> {name(b)} ({edges[a, b][0]})" for a, b in zip(loop, loop[1:] + loop[:1], strict=True)
    ]
    also = f" (also in the tangle: {', '.join(map(name, others))})" if others else ""
    return "loop: " + "; ".join(steps) + also


@pytest.mark.parametrize("src_dir", CRATES, ids=lambda p: p.parent.name)
def test_crate_modules_form_no_loop(src_dir: Path) -> None:
    edges = module_edges(src_dir)
    assert edges, f"no module references found in {src_dir}: the reader is broken"
    assert [describe(c, edges) for c in cycles(edges)] == []


def test_the_reader_finds_a_loop(tmp_path: Path) -> None:
    """The guard can fail: a two-module loop (through a `use` tree) and a three-module loop (through
    an expression path and `super::`) inside a directory module are reported, with file and line;
    comments, strings, tests' `super::*` and a child using its parent are not edges."""
    (tmp_path / "lib.rs").write_text("pub mod a;\npub mod b;\npub mod d;\n")
    (tmp_path / "a.rs").write_text(
        'use crate::{b::{self, X}, wire};\n// crate::d::Z\nconst S: &str = "crate::d::Z";\n'
        "#[cfg(test)]\nmod tests {\n    use super::*;\n}\n"
    )
    (tmp_path / "b.rs").write_text("pub fn f() -> u8 {\n    crate::a::g()\n}\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mod.rs").write_text("mod p;\nmod q;\nmod r;\npub use self::p::P;\n")
    (tmp_path / "d" / "p.rs").write_text("use super::q::Q;\nuse super::Helper;\n")
    (tmp_path / "d" / "q.rs").write_text("fn f() { super::r::go() }\n")
    (tmp_path / "d" / "r.rs").write_text("fn g() { let _ = '{'; crate::d::p::P::new(); }\n")
    edges = module_edges(tmp_path)
    assert set(edges) == {
        (("a",), ("b",)),
        (("b",), ("a",)),
        (("d", "p"), ("d", "q")),
        (("d", "q"), ("d", "r")),
        (("d", "r"), ("d", "p")),
    }
    found = sorted(describe(c, edges) for c in cycles(edges))
    assert len(found) == 2
    assert found[0].startswith("loop: crate::a -> crate::b (")
    assert "a.rs:1" in found[0] and "b.rs:2" in found[0]
    assert found[1].startswith("loop: crate::d::p -> crate::d::q (")
    assert "crate::d::r -> crate::d::p" in found[1]
