"""How the daemon stops (the stop contract: lifecycle.py, docs/architecture.md).

Three ways, each safe after a partial start:

- `quick_stop`: SIGTERM/SIGINT under `podrouter run` (launch.py then ends the process with os._exit):
  only what a successor needs from this process is done;
- `shutdown(keep=True)`: the stop contract the long way: everything this process opened is closed,
  the node's forwarding state (TUN, routes, rules, sysctls, guards, shaping, the state file with pid 0,
  the forwarding snapshot) stays for a successor;
- `shutdown(keep=False)` (`podrouter cleanup`, a start that failed without a predecessor): everything
  installed is removed, in reverse order.

The daemon is taken as ports.Stops describes it; the parts closed are set to None.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

from podrouter import keeper, lifecycle, nftables, startup
from podrouter.netlink.constants import TUN_NAME
from podrouter.ports import Stops

log = logging.getLogger("podrouter")

QUICK_STOP_GRACE = 0.5  # seconds a quick stop waits for the workers to finish their batch
PART_STOP_TIMEOUT = 15.0  # seconds each part's own thread gets to stop


def go_on(what: str, fn: Callable[..., object], *args: object) -> None:
    """One step of stopping or tearing down: a failure is logged ("<what> failed") and the next
    step still runs."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - keep tearing down
        log.exception("%s failed", what)


def quick_stop(d: Stops, grace: float = QUICK_STOP_GRACE) -> None:
    """SIGTERM/SIGINT, the stop contract the short way: nothing of the node's forwarding state is
    removed, so only what a successor needs from this process is done: the forwarding snapshot's
    last write is waited for, the workers stop at a batch boundary, writing the NAT snapshot a last
    time (`quiesce`, waited for at most `grace` seconds), BIRD gets its graceful restart, and the
    state file says pid 0. The fd keeper already holds the TUN queues and sockets; the API socket,
    the metrics port, netlink sockets and threads go with the process."""
    d.ready = False
    if d.api is not None:
        # no client connects to a daemon that is going (the listening fd goes with the process)
        with contextlib.suppress(OSError):
            os.unlink(d.cfg.api.socket)
    # a successor starts from that file: the tables this daemon runs, not older ones
    go_on("writing the forwarding snapshot", d.snapshots.close, True, grace)
    if d.bgp is not None:
        go_on("stopping BGP", d.bgp.stop)
    dp = d.datapath
    if dp is not None:
        t = threading.Thread(target=go_on, args=("stopping the workers", dp.quiesce), daemon=True)
        t.start()
        t.join(timeout=grace)
        if t.is_alive():
            log.warning("the workers did not stop within %.0f ms; exiting anyway", grace * 1000)
    if d.plumbing is not None and d.owns_record:
        go_on("recording the stop in the state file", lifecycle.mark_stopped, d.plumbing)


def shutdown(d: Stops, keep: bool = False) -> None:
    """Stop. With `keep` (SIGTERM/SIGINT, the stop contract in lifecycle.py) the node's
    forwarding state stays for a successor: the persistent TUN, routes, rules, sysctls, the
    nftables tables, shaping, the etcd registration (left to its lease TTL), the forwarding
    snapshot and the state file (pid 0). Without it everything installed is removed, in reverse
    order. Safe after a partial start.

    Full removal: the datapath's workers stop before the masquerade reply guard goes: while they
    run, a reply to a translated flow reaches both them (AF_PACKET copy) and, without the guard,
    the node's stack, which answers it with a RST / port unreachable that kills the flow. With
    the workers stopped first, the guard keeps dropping replies until nothing forwards them any
    more. The TUN itself is deleted last, after the routes into it are gone."""
    d.ready = False
    if d.fast is not None:  # a start that failed before it took the forward-first datapath
        d.fast.abandon()  # (idempotent: the start that took it over no longer holds it here)
    # the last tables' snapshot is written for a successor; a full removal deletes the file below,
    # once no write can bring it back
    go_on("writing the forwarding snapshot", d.snapshots.close, keep)
    _stop_threads(d, keep)
    if d.metrics_sock is not None:  # a start that failed between taking the port and serving
        with contextlib.suppress(OSError):
            d.metrics_sock.close()
        d.metrics_sock = None
    if d.handover_server is not None:
        d.handover_server.released()
    with d.lock:
        if d.datapath is not None:
            go_on("stopping the datapath", d.datapath.stop)
        if keep:
            _release(d)
        else:
            _teardown(d)
        if d.ipr is not None:
            with contextlib.suppress(Exception):
                d.ipr.close()


def _stop_threads(d: Stops, keep: bool) -> None:
    """The parts with threads of their own, in parallel: each waits for its own thread (a server's
    poll interval, the neighbour monitor's select timeout), and a successor can start only once
    this process is gone. The etcd registration is revoked only on a full removal."""
    discovery = d.discovery
    steps: list[tuple[str, Callable[[], object]]] = []
    if d.bgp is not None:
        steps.append(("BgpSpeaker.stop", d.bgp.stop))
    if d.metrics is not None:
        steps.append(("MetricsServer.close", d.metrics.close))
    if d.api is not None:
        steps.append(("ApiServer.close", d.api.close))
    if d.monitor is not None:
        steps.append(("MonitorHub.close", d.monitor.close))
    if discovery is not None:
        steps.append(("discovery.stop", lambda: discovery.stop(revoke=not keep)))
    if d.watcher is not None:
        steps.append(("NeighborWatcher.stop", d.watcher.stop))
    stoppers = [
        threading.Thread(target=go_on, args=(f"shutdown: {name}", fn), name=f"stop-{name}", daemon=True)
        for name, fn in steps
    ]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(timeout=PART_STOP_TIMEOUT)


def _release(d: Stops) -> None:
    """The stop contract: close what belongs to this process only, leave the kernel state."""
    if d.pods.bandwidth is not None:
        go_on("bandwidth manager detach", d.pods.bandwidth.detach)
    if d.datapath is not None:
        # the TUN is persistent: closing the queues detaches them, the device and the routes
        # into it stay (pod packets are dropped by the detached device until a successor)
        go_on("closing the datapath", d.datapath.close)
        d.datapath = None
    d.pod_guard_key = None
    if d.plumbing is not None and d.owns_record:
        # last: once the record says pid 0 a successor may start (its TUN attach needs our
        # queues closed, and nothing here writes the state file any more); after a handover
        # (either side of a failed one) the record is the other daemon's
        go_on("recording the stop in the state file", lifecycle.mark_stopped, d.plumbing)


def _teardown(d: Stops) -> None:
    """Everything installed is removed, the TUN last."""
    if d.pods.bandwidth is not None:
        go_on("bandwidth manager close", d.pods.bandwidth.close)
    if d.plumbing is not None and d.plumbing.state.nft_guard:
        go_on("removing the masquerade reply guard", nftables.remove_guard)
    if d.plumbing is not None:
        go_on("removing routes/rules", d.plumbing.teardown)
    if d.pod_guard_key is not None:
        # after the routes: while a pod route exists, its pod's sources are checked
        go_on("removing the pod egress guard", nftables.remove_pod_guard)
        d.pod_guard_key = None
    if d.datapath is not None:
        go_on("closing the datapath", d.datapath.close)
        d.datapath = None
    go_on("stopping the fd keeper", _keeper_stop, d)
    go_on("removing the forwarding snapshot", startup.remove, startup.snapshot_path(d.cfg))
    if d.ipr is not None:
        # persistent: the TUN outlives the fd
        go_on(f"deleting {TUN_NAME}", lifecycle.remove_tun, d.ipr, TUN_NAME)


def _keeper_stop(d: Stops) -> None:
    """The full removal: nothing may keep the TUN's queues attached."""
    for line in keeper.stop(d.cfg):
        log.info("%s", line)
