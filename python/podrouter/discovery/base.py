"""The discovery interface, and how discovered records meet the core's rulebook
(`refuse_by_rulebook`: etcd discovery, the cluster mesh and the daemon's peer gate,
plan.refuse_conflicts)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
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
# A caller's wording of one problem: (rank, why), a record breaking several rules being refused
# for the one of lowest rank; None: the core's own message (prefixed with the field) stands.
Verdict = tuple[tuple[int, int], str] | None

_PEER_KEY = re.compile(r"^peers\[(\d+)\]")


def refuse_by_rulebook(
    spec_of: Callable[[list[dict[str, Any]]], dict[str, Any]],
    settings: Mapping[str, Any],
    fixed: Sequence[PeerConfig],
    candidates: Sequence[tuple[K, PeerConfig]],
    word: Callable[[native.Problem, Other], Verdict],
    skip: Iterable[str] = (),
) -> tuple[list[tuple[K, PeerConfig]], dict[K, str]]:
    """`candidates` (a caller's key, peer), oldest first, less those the core's rulebook refuses:
    (kept, key -> why, worded by `word`). One spec (`spec_of(peers)`) holds the `fixed` peers,
    then the candidates in order, and one call of the core's `admit` (`native.admit_problems`)
    admits the candidates one by one against the spec's node, the `fixed` peers and the
    candidates admitted before each, so the oldest wins every conflict and a refused record never
    blocks a younger one. `skip`: rules (codes) the caller does not apply. Linear in the peers."""
    statics = [spec_peer(p) for p in fixed]
    n_fixed = len(statics)
    spec = spec_of([*statics, *(spec_peer(p) for _key, p in candidates)])
    best: dict[int, tuple[tuple[int, int], str]] = {}
    for prob in native.admit_problems(spec, settings, n_fixed, skip):
        j = _subject(prob)
        if j is None or j < n_fixed:
            continue  # cannot happen: `admit` reports the candidates only
        m = _PEER_KEY.match(prob.other or "")
        other: Other = None
        if m is not None:
            k = int(m.group(1))
            other = ("fixed", fixed[k].name) if k < n_fixed else ("peer", candidates[k - n_fixed][1].name)
        elif prob.other is not None:
            other = ("node", "")
        verdict = word(prob, other)
        if verdict is None:
            field = prob.path.split(".", 1)[1] if "." in prob.path else prob.path
            verdict = (9, 0), f"{field}: {prob.message}"
        j -= n_fixed
        if j not in best or verdict[0] < best[j][0]:
            best[j] = verdict
    kept = [c for j, c in enumerate(candidates) if j not in best]
    return kept, {candidates[j][0]: why for j, (_rank, why) in best.items()}


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
