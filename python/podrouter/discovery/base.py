"""The discovery interface, and how discovered records meet the core's rulebook
(`refuse_by_rulebook`: etcd discovery and the cluster mesh)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from podrouter import native
from podrouter.config import PeerConfig

PeerSet = tuple[PeerConfig, ...]


class Discovery(Protocol):
    name: str

    def start(self, on_change: Callable[[str], None]) -> None: ...

    def peers(self) -> PeerSet: ...

    def sources(self) -> dict[str, str]:
        """Peer name -> where it came from (`static`, `etcd`, `cluster:<name>`)."""
        ...

    def update_config(self, cfg: object) -> None: ...

    def status(self) -> dict[str, object]: ...

    def mesh_status(self) -> dict[str, object]:
        """`status` -> clustermesh (docs/clustermesh.md); {} without a cluster mesh."""
        ...

    def stop(self, revoke: bool = True) -> None:
        """Stop watching. `revoke=False` (a daemon stopping for a successor) leaves this node's
        registration to run out its TTL instead of withdrawing it at once."""
        ...


# ------------------------------------------------------------------ records judged by the core's rulebook


K = TypeVar("K")

# The other party of a problem (`native.Problem.other`) as a caller words it: ("node", "") for a
# key of the spec's node, ("fixed", name) for a peer that always wins (a static peer),
# ("peer", name) for an older candidate; None for a problem without one.
Other = tuple[str, str] | None
# A caller's verdict on one problem: None to ignore it, else (rank, why): a record breaking several
# rules is refused for the one of lowest rank.
Verdict = tuple[tuple[int, int], str] | None

_PEER_KEY = re.compile(r"^peers\[(\d+)\]")


def refuse_by_rulebook(
    spec_of: Callable[[list[dict[str, Any]]], dict[str, Any]],
    settings: Mapping[str, Any],
    fixed: Sequence[PeerConfig],
    candidates: Sequence[tuple[K, PeerConfig]],
    word: Callable[[native.Problem, Other], Verdict],
) -> tuple[list[tuple[K, PeerConfig]], dict[K, str]]:
    """`candidates` (a caller's key, peer), oldest first, less those the core's rulebook
    (`native.check_problems`, the rules `Tables::build` enforces) refuses against the spec's node,
    the `fixed` peers and the older candidates: (kept, key -> why, worded by `word`).

    One spec (`spec_of(peers)`) holds the `fixed` peers, then every candidate in order. The core
    names the later party of every conflict at its path and the earlier one as `other`, so one
    pass in spec order settles precedence: a problem counts unless its other party is a candidate
    refused in that pass. A problem skipped for that reason may hide another (the core names one
    earlier owner per CIDR), so the survivors are asked again, without the refused, until nothing
    changes: one or two calls in practice, each linear in the peers (plus a sort)."""
    statics = [spec_peer(p) for p in fixed]
    n_fixed = len(statics)
    kept = list(candidates)
    rejected: dict[K, str] = {}
    while kept:
        spec = spec_of([*statics, *(spec_peer(p) for _key, p in kept)])
        by_peer: dict[int, list[native.Problem]] = {}
        for prob in native.check_problems(spec, settings):
            j = _subject(prob)
            if j is not None and j >= n_fixed:
                by_peer.setdefault(j - n_fixed, []).append(prob)
        bad: dict[int, str] = {}
        again = False
        for j in sorted(by_peer):
            best: tuple[tuple[int, int], str] | None = None
            for prob in by_peer[j]:
                m = _PEER_KEY.match(prob.other or "")
                other: Other = None
                if m is not None:
                    k = int(m.group(1))
                    if k - n_fixed in bad:
                        again = True  # its other party is refused: it may win once that one is gone
                        continue
                    other = ("fixed", fixed[k].name) if k < n_fixed else ("peer", kept[k - n_fixed][1].name)
                elif prob.other is not None:
                    other = ("node", "")
                verdict = word(prob, other)
                if verdict is not None and (best is None or verdict[0] < best[0]):
                    best = verdict
            if best is not None:
                bad[j] = best[1]
        for j, why in bad.items():
            rejected[kept[j][0]] = why
        kept = [c for j, c in enumerate(kept) if j not in bad]
        if not (bad and again):
            break
    return kept, rejected


def _subject(prob: native.Problem) -> int | None:
    """The spec index of the peer a problem is about: the one at its key path, or for a cluster
    CIDR that contains a peer's address, that peer."""
    path = prob.other if prob.code == "cluster_contains_peer_address" else prob.path
    m = _PEER_KEY.match(path or "")
    return int(m.group(1)) if m is not None else None


def cidr_index(prob: native.Problem) -> int:
    """Which of its peer's pod CIDRs a problem is about (0 when it is about none)."""
    m = re.search(r"\.pod_cidrs\[(\d+)\]$", prob.path)
    return int(m.group(1)) if m is not None else 0


def spec_peer(peer: PeerConfig) -> dict[str, Any]:
    """What the rulebook reads of a peer (name, address, pod CIDRs), as a table spec's peer."""
    address, cidrs = _spec_strings(peer)
    return {"name": peer.name, "address": address, "pod_cidrs": list(cidrs)}


@functools.lru_cache(maxsize=16384)
def _spec_strings(peer: PeerConfig) -> tuple[str, tuple[str, ...]]:
    # cached (a peer is immutable; discovery's parsed records are cached too): the spec is rebuilt
    # after every change of thousands of records
    return str(peer.address), tuple(str(c) for c in peer.pod_cidrs)
