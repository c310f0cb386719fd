"""Everything that can refuse `podrouter run`, checked before anything is installed (start-up
step 2 in daemon.py): the problems bringup.py finds in this namespace (exit 2, all of them at once),
then, without --handover, that no other daemon owns the API socket or runs on the state file
(exit 1), and with it, that the running daemon would hand over to this config (exit 2)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from podrouter import api as apimod
from podrouter import bringup, lifecycle, nftables
from podrouter import handover as handovermod
from podrouter import state as statefile
from podrouter.config import Config
from podrouter.errors import EXIT_CONFIG, EXIT_FAILURE, StartError
from podrouter.netlink import IPRoute
from podrouter.netlink.underlay import (
    Masquerade6,
    Underlay,
    UnderlayError,
    resolve_masquerade6,
    resolve_underlay,
)


@dataclass(frozen=True)
class Checked:
    """What the preflight resolved, for the start."""

    underlay: Underlay
    # masquerade.address6 and the IPv6 gateway (None: no IPv6 pods, IPv6 pods not translated)
    masq6: Masquerade6 | None


def check(cfg: Config, ipr: IPRoute, handover: bool) -> Checked:
    """The preflight. Raises StartError with every problem found."""
    problems: list[str] = []
    p = bringup.port_range_problem(cfg)
    if p:
        problems.append(p)
    underlay: Underlay | None = None
    masq6: Masquerade6 | None = None
    try:
        underlay = resolve_underlay(ipr, cfg.node)
    except UnderlayError as e:
        problems.extend(e.problems)
    if underlay is not None:
        problems.extend(bringup.underlay_problems(cfg, underlay))
        try:
            masq6 = _masquerade6(cfg, ipr, underlay)
        except UnderlayError as e:
            problems.extend(e.problems)
    if cfg.discovery.backend == "etcd":
        from podrouter.discovery.etcd import start_problems  # lazy: only an etcd node loads it

        problems.extend(start_problems(cfg))  # the TLS files load
    problems.extend(bringup.route_conflict_problems(ipr, cfg))
    why = nftables.unavailable()
    if why is not None:
        # the pod egress guard (spoofed sources, tunnel ports) is not optional
        problems.append(f"the pod egress guard needs libnftables ({why}); install nftables")
    problems.extend(bringup.bgp_problems(cfg, underlay))
    if problems or underlay is None:
        raise StartError(problems or ["the underlay did not resolve"], EXIT_CONFIG)
    checked = Checked(underlay, masq6)
    if handover:
        _handover_check(cfg, checked)
        return checked
    if apimod.socket_in_use(cfg.api.socket):
        raise StartError([f"api.socket: a daemon is already listening on {cfg.api.socket}"], EXIT_FAILURE)
    recorded = lifecycle.recorded_state(cfg)
    if (
        recorded is not None
        and recorded.pid != 0
        and statefile.pid_alive(recorded.pid)
        and recorded.pid != os.getpid()
    ):
        raise StartError(
            [f"{cfg.state_path}: daemon pid {recorded.pid} for node '{recorded.node}' is still running"],
            EXIT_FAILURE,
        )
    return checked


def _masquerade6(cfg: Config, ipr: IPRoute, u: Underlay) -> Masquerade6 | None:
    """`masquerade.address6` and the IPv6 gateway, when this node has IPv6 pods (resolved even
    with masquerade disabled: a reload may enable it). Raises UnderlayError (exit-2 problems)."""
    if not any(c.version == 6 for c in cfg.node.pod_cidrs):
        return None
    return resolve_masquerade6(ipr, u, cfg.masquerade.address6)


def _handover_check(cfg: Config, checked: Checked) -> None:
    """--handover: a daemon must answer on api.socket and accept this config, before anything
    is changed (the fds themselves are checked when they come)."""
    try:
        dp_config = bringup.datapath_config(cfg, checked.underlay, checked.masq6)
        handovermod.check(cfg.api.socket, handovermod.expectations(cfg.node.name, dp_config))
    except handovermod.HandoverError as e:
        raise StartError([f"handover: {e}"], EXIT_CONFIG) from None
