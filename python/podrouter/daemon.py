"""The node daemon (`podrouter run --config FILE`): the Daemon that wires the parts together.

Start-up order (nothing in the kernel is touched before step 3):

1. validate the config (config.py) -- exit 2 on any problem;
2. preflight against this namespace (preflight.py, bringup.py): the masquerade port range must not overlap
   ip_local_port_range, the underlay must resolve, a tunnel MTU override must fit the underlay,
   no other daemon may own the API socket -- exit 2 (1 if a daemon is already running);
3. adopt a dead predecessor's state (its state file: lifecycle.py), create the Datapath (the TUN `podr0`),
   set the TUN up with the underlay MTU, write the sysctls, install routes, start the datapath with
   the first tables, then open the API socket and take the metrics port. `podrouter status` reports
   ready only after that; /metrics is served from just after ready (prometheus_client's import is
   not part of the start; a scrape meanwhile waits in the port's backlog).

Everything is driven by one idempotent `reconcile()`: it recomputes routes and tables from the
config, the discovered peers, the registered pods and the resolved next-hop MACs, makes the kernel
match (`Plumbing.sync_routes`) and swaps new tables into the datapath when they differ. Neighbour and
link changes, discovery updates, pod registrations and SIGHUP all end in it.

Where the parts live: plan.py (pure planning: routes, MTUs, the table spec), preflight.py (every
start refusal), bringup.py (preflight problems, the TUN, sysctls), lifecycle.py (the stop contract:
adopting a predecessor's record, pid 0), pods.py (the pod registry and its shaping), guards.py (the
nftables guards), reconcile.py (the reconcile steps, reload diffing), status.py (status, explain,
counters), podapi.py (pod_add / pod_del), shutdown.py (the stop choreography), startup.py (the
forwarding snapshot and its writer thread), cleanup.py (`podrouter cleanup`), native.py (the typed
facade over the Rust extension), errors.py (StartError and the exit statuses), ports.py (what
status.py, podapi.py, shutdown.py, handover.py and keeper.py use of the Daemon).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from podrouter import api as apimod
from podrouter import (
    bringup,
    discovery,
    guards,
    keeper,
    lifecycle,
    native,
    nftables,
    podapi,
    preflight,
    shutdown,
    startup,
    status,
)
from podrouter import handover as handovermod
from podrouter import metrics as metricsmod
from podrouter.cleanup import cleanup
from podrouter.config import Config
from podrouter.discovery.base import Discovery
from podrouter.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, StartError
from podrouter.monitor import MonitorHub
from podrouter.monitor import stream as monitor_stream
from podrouter.netlink import IPRoute
from podrouter.netlink.constants import TUN_NAME
from podrouter.netlink.neigh import NeighborWatcher
from podrouter.netlink.plumbing import Plumbing, RouteSpec
from podrouter.netlink.underlay import (
    Masquerade6,
    Underlay,
)
from podrouter.plan import (
    PeerView,
    RoutePlan,
    build_spec,
    encap_overhead,
    nat_exhausted_message,
    nat_snapshot_path,
    path_mtu,
    plan_routes,
    split_by,
)
from podrouter.pods import PodEntry, PodRegistry, make_bandwidth
from podrouter.reconcile import (
    desired_routes,
    desired_rules,
    gateway_spec,
    load_for_reload,
    masq6_spec,
    ms_since,
    refresh_peers,
)

if TYPE_CHECKING:
    from podrouter._native import Datapath, Tables
    from podrouter.bgp import BgpSpeaker

log = logging.getLogger("podrouter")

ADOPT_DISCOVERY_WAIT = 30.0  # at most this long a predecessor's routes wait for etcd's first listing


class Daemon:
    def __init__(self, cfg: Config, handover: bool = False, fast: startup.FastStart | None = None) -> None:
        self.cfg = cfg
        # forward first (startup.py): the datapath `podrouter run` started from the forwarding
        # snapshot before importing this module; taken over (or stopped) by _open_datapath
        self.fast = fast
        self._fast_spec: str | None = None  # its table spec (startup.spec_key) until the first reconcile
        self.config_sha256 = startup.config_hash(cfg.path)
        # handover (docs/handover.md): `handover_mode` takes the datapath of a running daemon over;
        # `handing_over` is set while this daemon's workers are stopped for a successor; the state
        # file is this daemon's to mark stopped only while `owns_record`
        self.handover_mode = handover
        self.handing_over = False
        self.owns_record = not handover
        self.handover_server: handovermod.Server | None = None
        self._pending: handovermod.Pending | None = None
        self.lock = threading.RLock()
        self.ready = False
        self.generation = 0
        self.started_at = time.time()
        self.pods = PodRegistry(cfg)
        self.peer_views: list[PeerView] = []
        self.route_plan: list[RoutePlan] = []
        self.route_errors: list[str] = []
        self.peer_rejects: dict[str, str] = {}
        self._nat_log = status.NatExhaustionLog()
        self._spec_key: tuple[str, tuple[PeerView, ...]] | None = None
        # how long the last reconcile's steps took (status "timings"; docs/benchmarks.md, scale)
        self.timings: dict[str, Any] = {}
        self.pod_guard_key: guards.PodGuardKey | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dirty: set[str] = set()
        self._hup = False
        self._exit_code = EXIT_OK
        self.ipr: IPRoute | None = None
        self.underlay: Underlay | None = None
        # IPv6 masquerade (masquerade.address6 resolved at start; None: IPv6 pods not translated)
        self.masq6: Masquerade6 | None = None
        self.plumbing: Plumbing | None = None
        self.watcher: NeighborWatcher | None = None
        # with --handover None until the first tables: `_pending` then takes the running daemon's over
        self.datapath: Datapath | None = None
        self.tables: Tables | None = None
        self.discovery: Discovery | None = None
        self.api: apimod.ApiServer | None = None
        self.monitor: MonitorHub | None = None
        self.metrics: metricsmod.MetricsServer | None = None
        # the metrics port, taken before ready, served after it
        self.metrics_sock: socket.socket | None = None
        self.bgp: BgpSpeaker | None = None  # when bgp.enabled
        self.adopted = False  # started on a predecessor's state (lifecycle.py)
        self.ready_after = 0.0  # seconds from process start to ready (status, the restart bench)
        # seconds from process start to the workers forwarding (forward first: well before ready)
        self.forwarding_after = 0.0
        self._last_spec: dict[str, Any] | None = None  # of the tables running (the forwarding snapshot)
        # writes the forwarding snapshot off the lock (latest wins); flushed or dropped by the stop
        self.snapshots = startup.SnapshotWriter(startup.snapshot_path(cfg), log)
        self._snapshot_mark: tuple[str, int] | None = None  # (config hash, generation) last written
        self.quick_exit = False  # stopped by a signal: launch.py may end the process at once (quick_stop)
        # adopting with etcd discovery: the predecessor's routes kept until discovery has listed the
        # peers once (else the first reconcile would delete every discovered peer's route: a flap)
        self._adopt_keep: dict[tuple[int, str], RouteSpec] = {}
        self._adopt_keep_until = 0.0

    # the parts, once start() made them (each used only after)

    def _u(self) -> Underlay:
        assert self.underlay is not None, "used before preflight resolved the underlay"
        return self.underlay

    def _ipr(self) -> IPRoute:
        assert self.ipr is not None, "used before preflight"
        return self.ipr

    def _ps(self) -> Plumbing:
        assert self.plumbing is not None, "used before start"
        return self.plumbing

    def _dp(self) -> Datapath:
        assert self.datapath is not None, "used before start"
        return self.datapath

    # ------------------------------------------------------------------------------------- start

    def preflight(self) -> None:
        """Everything that can refuse to start, checked before anything is installed (preflight.py)."""
        self.ipr = IPRoute()
        checked = preflight.check(self.cfg, self.ipr, self.handover_mode)
        self.underlay, self.masq6 = checked.underlay, checked.masq6

    def start(self) -> None:
        cfg, u, ipr = self.cfg, self._u(), self._ipr()
        self.plumbing = ps = Plumbing(ipr, cfg.state_path, cfg.node.name, cfg.api.socket)
        self.pods.plumbing = ps
        ps.state.tun = TUN_NAME
        # the stop contract (lifecycle.py): take the predecessor's state over in place
        recorded = lifecycle.take_over(ps, cfg)
        if recorded is not None:
            self.adopted = True
            if cfg.discovery.backend == "etcd":
                self._adopt_keep = dict(ps.routes)
                self._adopt_keep_until = time.monotonic() + ADOPT_DISCOVERY_WAIT
        ps.save()

        self._open_datapath()
        self._nat_snapshot_setup()
        tun_idx = self.datapath.tun_ifindex if self.datapath is not None else ps.ifindex(TUN_NAME)
        if not tun_idx:
            raise StartError([f"the datapath did not create {TUN_NAME}"], EXIT_FAILURE)
        # sysctls first: with IPv6 still enabled, bringing podr0 up sends MLD reports / router
        # solicitations (hop limit 1) into the datapath, which would count them as ttl_exceeded
        bringup.node_sysctls(ps, ipr, cfg, u, tun_idx)
        bringup.tun_up(ipr, tun_idx, cfg, u)
        if ps.state.nft_guard and not cfg.masquerade.enabled:
            # a predecessor's masquerade reply guard that this config no longer wants
            nftables.remove_guard()
            ps.state.nft_guard = False
            ps.save()
        guards.sync_masquerade_guard(ps, None, cfg, u, self.masq6)
        bringup.masquerade_notes(cfg, u, self.masq6)

        self.watcher = NeighborWatcher(u.ifindex, self._on_event)
        self.discovery = discovery.make(cfg, str(u.address))
        if cfg.clustermesh.clusters:
            from podrouter import clustermesh  # lazy: only a mesh node loads it

            self.discovery = clustermesh.MeshDiscovery(cfg, self.discovery)
        self.pods.bandwidth = make_bandwidth(cfg)
        with self.lock:
            for pod in cfg.pods:
                self.pods.install(pod, "config", raise_errors=False)
            if recorded is not None:
                for pod, cni in lifecycle.recorded_api_pods(recorded, cfg):
                    self.pods.install(pod, "api", raise_errors=False, cni=cni)
            # the guards go in before the first route (and, when adopting, with the pods already in
            # their sets, so no pod's packet is taken for a spoofed one while the table is replaced);
            # the peers are listed first (without waiting for MACs), so the guard's first sets hold
            # their tunnel endpoints and the first reconcile has no set to update (one transaction)
            self._refresh_peers(wait=False)
            self.pod_guard_key = guards.install_pod_guard(self._pod_guard_want())
            if not self.watcher.resolved():
                self._refresh_peers(wait=True)
            self._reconcile_locked("start")
        if self._pending is not None:
            # the old daemon closes its API socket and metrics port once we run: wait for that
            self._pending.finish()
            self._pending = None
            self.owns_record = True
            ps.save()
        self._nat_snapshot_report()
        self.watcher.start()
        self.discovery.start(self._on_event)
        self.monitor = MonitorHub(lambda: self.datapath, self._pod_of)
        self.handover_server = handovermod.Server(self)
        raws: dict[str, apimod.RawHandler] = {"handover": self.handover_server.handle}
        self.api = apimod.ApiServer(cfg.api.socket, self._api_handlers(), self._api_streams(), raws)
        if cfg.metrics.listen is not None:
            # the port now (a clash stops the start), the HTTP server just after ready (below)
            self.metrics_sock = metricsmod.listen_socket(cfg.metrics.listen)
        self._start_bgp()
        self.ready = True
        self.ready_after = lifecycle.process_age()
        log.info(
            "ready: %s mode, %d peers, %d pods, tables generation %d (%.2f s after the process started%s)",
            cfg.routing.mode,
            len(self.peer_views),
            len(self.pods),
            self.generation,
            self.ready_after,
            ", adopted" if self.adopted else "",
        )
        for err in self.route_errors:
            log.warning("%s", err)
        self._start_metrics()
        self._keeper_replace()

    def _datapath_config(self) -> dict[str, Any]:
        return bringup.datapath_config(self.cfg, self._u(), self.masq6)

    def _open_datapath(self) -> None:
        """The datapath (bringup.open_datapath), or with --handover the pending take-over of the
        running daemon's, which happens at the first tables (reconcile)."""
        if self.handover_mode:
            self._pending = handovermod.Pending(self)
            return
        dp_config = self._datapath_config()
        fast, self.fast = self.fast, None
        if fast is not None:
            if fast.fits(dp_config):
                # the workers forward already (startup.py): keep them; the first reconcile swaps in
                # fresh tables only if they differ from the snapshot's
                self.datapath, self.tables = fast.datapath, fast.tables
                self._fast_spec = startup.spec_key(fast.spec)
                self.forwarding_after = fast.forwarding_after
                return
            log.warning("the forwarding snapshot's datapath config is out of date: restarting the datapath")
            fast.abandon()
        # the fds the fd keeper held while no daemon ran (keeper.py), else the TUN opened afresh
        kept = keeper.take(self.cfg, dp_config, native.module(), log)
        self.datapath = kept if kept is not None else bringup.open_datapath(self._ipr(), dp_config)

    def _nat_snapshot_setup(self) -> None:
        """Keep the masquerade table in `<api.socket dir>/<node>.nat` (docs/architecture.md, "NAT
        state across restarts"): restored by the datapath's first start, before its workers run."""
        path = str(nat_snapshot_path(self.cfg))
        if self._fast_spec is not None:
            return  # forward first: set before its start (startup.py), which restored the table
        if self._pending is not None:
            self._pending.set_nat_snapshot(path)
        else:
            self._dp().set_nat_snapshot(path)

    def _nat_snapshot_report(self) -> None:
        bringup.nat_snapshot_report(self._dp().nat_snapshot_stats())

    # bgp.py is imported only by a BGP node: it is not among the start's imports (test_startup.py)
    def _start_bgp(self) -> None:
        """Announce this node's pod CIDRs through BIRD (docs/bgp.md), once its routes are in place."""
        if self.cfg.bgp.enabled:
            from podrouter import bgp  # lazy: only a BGP node pays for it

            u = self._u()
            assert isinstance(u.address, ipaddress.IPv4Address)  # underlay_problems: bgp needs it
            self.bgp = bgp.start_speaker(self.cfg, u.address, u.on_link)

    def _start_metrics(self) -> None:
        """Serve /metrics on the socket taken before ready: importing prometheus_client and
        starting its server are not part of the start (a scrape meanwhile waits in the backlog)."""
        if self.metrics_sock is None:
            return
        self.metrics = metricsmod.MetricsServer(
            metricsmod.make_source(
                lambda: status.counters(self),
                lambda: len(self.peer_views),
                lambda: status.pod_limits(self),
                lambda: status.bgp(self),
            ),
            sock=self.metrics_sock,
        )
        self.metrics_sock = None  # the server's now

    def _keeper_replace(self) -> None:
        """Once ready: the previous keeper lets go; with api.keeper a new one holds our fds."""
        try:
            if self.cfg.api.keeper:
                keeper.replace(self.cfg, self.datapath, self._datapath_config(), log)
            else:
                keeper.drop(keeper.socket_path(self.cfg))
        except Exception:  # noqa: BLE001 - the daemon runs on without a keeper
            log.exception("fd keeper")

    # ------------------------------------------------------------------------------------- serve

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            if self._hup:
                self._hup = False
                self.reload()
            with self.lock:
                reasons, self._dirty = self._dirty, set()
            if reasons:
                # coalesce bursts (a pod add creates link + neighbour events at once)
                time.sleep(0.05)
                with self.lock:
                    reasons |= self._dirty
                    self._dirty = set()
                    try:
                        t0 = time.perf_counter()
                        self._refresh_peers(wait=False)
                        self.timings["last_refresh_peers_ms"] = ms_since(t0)
                        self._reconcile_locked(", ".join(sorted(reasons)))
                        self.timings["last_reconcile_ms"] = ms_since(t0)
                    except Exception:  # noqa: BLE001 - the running tables stay; the next event retries
                        log.exception(
                            "reconcile failed (%s); the datapath keeps its current tables",
                            ", ".join(sorted(reasons)),
                        )
            if self._adopt_keep and (self._discovery_synced() or time.monotonic() > self._adopt_keep_until):
                self._on_event("adopted routes")
            self._nat_log.check(self)
            if self.bgp is not None:
                self.bgp.ensure_running()
            if self.datapath is not None and not self.datapath.is_running() and not self.handing_over:
                log.error("the datapath stopped unexpectedly; shutting down")
                self._exit_code = EXIT_FAILURE
                break
        return self._exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self.quick_exit = True
            self._stop.set()
        self._wake.set()

    def _on_event(self, reason: str) -> None:
        with self.lock:
            self._dirty.add(reason)
        self._wake.set()

    def handed_over(self) -> None:
        """A successor runs on this daemon's datapath: stop (the stop contract) and leave the state
        file to it."""
        self.owns_record = False
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------------------- reconcile

    def _refresh_peers(self, wait: bool) -> None:
        assert self.discovery is not None and self.watcher is not None, "used before start"
        self.peer_views, self.peer_rejects = refresh_peers(
            self.cfg,
            self._u(),
            self._ipr(),
            self.discovery,
            self.watcher,
            self.masq6,
            self.peer_rejects,
            wait,
        )

    def _discovery_synced(self) -> bool:
        if self.discovery is None:
            return True
        try:
            return bool(self.discovery.status().get("connected", True))
        except Exception:  # noqa: BLE001
            return True

    def _reconcile_locked(self, reason: str) -> None:
        cfg, u, ps = self.cfg, self._u(), self._ps()
        assert self.watcher is not None, "used before start"
        self.pods.refresh_sysctls()
        # the tables first (installed last): the route plan asks them which path each peer
        # destination takes, so a route's MTU always follows the datapath's decision
        macs = self.watcher.snapshot()
        t0 = time.perf_counter()
        spec = build_spec(cfg, 0, gateway_spec(u, macs), self.peer_views, masq6_spec(self.masq6, macs))
        # the peers' part of the spec is a function of the (immutable) views: compare those instead
        # of formatting thousands of peer entries
        key = (repr({k: v for k, v in spec.items() if k != "peers"}), tuple(self.peer_views))
        tables = self.tables if key == self._spec_key else None
        kept = False
        if tables is None and self._fast_spec is not None and self.tables is not None:
            # forward first: the snapshot's tables run; the same spec needs no compile and no swap
            kept = startup.spec_key(spec) == self._fast_spec
            self._fast_spec = None
            if kept:
                tables = self.tables
                self.timings["last_compile_ms"] = 0.0
        if tables is None:
            spec["generation"] = self.generation + 1
            # against the engine's own start-time settings: a swap cannot disagree with them
            tables = native.compile_tables(spec, self._datapath_config())
            self.timings["last_compile_ms"] = ms_since(t0)
        self.route_plan = plan_routes(
            cfg,
            self.peer_views,
            (e.pod for e in self.pods.entries.values()),
            u.mtu,
            tables,
            v6_underlay=any(a.version == 6 for a in u.addresses()),
        )
        # the guard learns a pod's addresses before its route makes the pod reachable
        self.pod_guard_key = guards.sync_pod_guard(self._pod_guard_want(), self.pod_guard_key)
        t0 = time.perf_counter()
        desired = desired_routes(self.route_plan, cfg, u)
        if self._adopt_keep:
            if self._discovery_synced() or time.monotonic() > self._adopt_keep_until:
                self._adopt_keep = {}
                log.info("discovery has listed its peers: the predecessor's routes are reconciled")
            else:
                desired = {**self._adopt_keep, **desired}
        self.route_errors = ps.sync_routes(desired)
        self.timings["last_routes_ms"] = ms_since(t0)
        self.timings["last_routes_changed"] = ps.last_changes
        ps.sync_rules(desired_rules(cfg))
        for err in self.route_errors:
            log.warning("%s", err)
        if tables is self.tables and not kept:
            return
        t1 = time.perf_counter()
        if kept:
            pass  # already running (forward first)
        elif self.tables is None:
            if self._pending is not None:
                self._pending.start(tables)  # takes the running daemon's datapath over (handover)
            else:
                self._dp().start(tables)
            self.forwarding_after = lifecycle.process_age()
        else:
            self._dp().swap_tables(tables)
        self.timings["last_swap_ms"] = ms_since(t1)
        self.tables = tables
        self.generation += 1
        self._spec_key = key
        log.info(
            "tables generation %d %s (%s): %d peers, compiled in %.1f ms, swapped in %.2f ms",
            self.generation,
            "kept from the forwarding snapshot" if kept else "installed",
            reason,
            len(self.peer_views),
            self.timings["last_compile_ms"],
            self.timings["last_swap_ms"],
        )
        self._write_forwarding(spec)

    def _pod_guard_want(self) -> guards.PodGuardKey:
        pods = (e.pod for e in self.pods.entries.values())
        return guards.pod_guard_want(self.cfg, self._u(), self.masq6, pods, self.peer_views)

    def _write_forwarding(self, spec: dict[str, Any]) -> None:
        """The forwarding snapshot for the next `podrouter run` (startup.py): with the fd keeper
        only (the forward-first start takes its fds), once this daemon runs the datapath, when the
        tables changed or (a reload) the config file's hash."""
        self._last_spec = spec
        if not self.cfg.api.keeper or self.config_sha256 is None or self._pending is not None:
            return
        # a snapshot is its tables (generation) for a config file (hash): each is written once
        mark = (self.config_sha256, self.generation)
        if self.datapath is not None and mark != self._snapshot_mark:
            self._snapshot_mark = mark
            # under the lock only a hand-over: the encoding (1.1 MB at 5000 peers) and the
            # write happen on the writer's thread (scripts/forwarding_snapshot_timing.py)
            self.snapshots.submit(self.cfg, self.config_sha256, self._datapath_config(), spec)

    # ------------------------------------------------------------------------------------- SIGHUP

    def reload(self) -> None:
        new = load_for_reload(self.cfg, lambda c: bringup.underlay_problems(c, self._u()))
        if new is None:
            return
        assert self.discovery is not None, "used before start"
        with self.lock:
            old = self.cfg
            self.cfg = self.pods.cfg = new
            self.discovery.update_config(new)
            self._reload_bgp(old, new)
            try:
                guards.sync_masquerade_guard(self._ps(), old, new, self._u(), self.masq6)
            except Exception:  # noqa: BLE001
                log.exception("updating the masquerade reply guard failed")
            if new.bandwidth != old.bandwidth:
                self.pods.restart_bandwidth(new)
            self.pods.reload_config_pods(old, new)
            self.config_sha256 = startup.config_hash(new.path)
            try:
                self._refresh_peers(wait=True)
                self._reconcile_locked("SIGHUP")
            except Exception:  # noqa: BLE001
                log.exception("applying the reloaded config failed; the datapath keeps its current tables")
                return
            if self._last_spec is not None:
                self._write_forwarding(self._last_spec)  # the same tables, if the config's hash changed
        log.info("reload done: %d peers, %d pods", len(self.peer_views), len(self.pods))

    def _reload_bgp(self, old: Config, new: Config) -> None:
        if self.bgp is not None:
            from podrouter import bgp  # lazy: only a BGP node pays for it

            bgp.reload(self.bgp, old, new)

    # ---------------------------------------------------------------------------------------- API

    def _api_handlers(self) -> dict[str, apimod.Handler]:
        return {
            "status": lambda req: status.status(self),
            "pod_add": lambda req: podapi.add(self, req.get("pod"), req.get("cni")),
            "pod_del": lambda req: podapi.delete(self, req.get("name"), req.get("container_id")),
            "pod_list": lambda req: {"pods": status.pods(self)},
            "explain": lambda req: status.explain(self, req),
        }

    def _api_streams(self) -> dict[str, apimod.StreamHandler]:
        hub = self.monitor
        assert hub is not None
        return {"monitor": lambda req, send: monitor_stream(hub, req, status.drop_reasons(self), send)}

    def _pod_of(self, address: str | None) -> str | None:
        """The local pod holding `address` (the monitor names pods in its events)."""
        if not address:
            return None
        with self.lock:
            return self.pods.pod_of(address)

    # -------------------------------------------------------------------- stop (shutdown.py)

    def quick_stop(self, grace: float = shutdown.QUICK_STOP_GRACE) -> None:
        """SIGTERM/SIGINT, the short way (shutdown.quick_stop)."""
        shutdown.quick_stop(self, grace)

    def shutdown(self, keep: bool = False) -> None:
        """Stop, keeping the node's forwarding state for a successor or not (shutdown.shutdown)."""
        shutdown.shutdown(self, keep)


def run(
    cfg: Config,
    handover: bool = False,
    fast: startup.FastStart | None = None,
    quick_exit: Callable[[int], object] | None = None,
) -> int:
    """`podrouter run`: preflight, start, serve, tear down. Returns the exit status. With
    `handover`, take over from the daemon running on the same API socket (docs/handover.md).
    `fast`: the datapath startup.forward_first started (forward first). `quick_exit`: called with
    the exit status after a quick stop on SIGTERM/SIGINT (launch.py: os._exit) instead of the full
    shutdown."""
    d = Daemon(cfg, handover, fast)
    try:
        d.preflight()
    except StartError:
        if d.fast is not None:
            d.fast.abandon()  # the keeper still holds the fds: nothing is detached
        if d.ipr is not None:
            d.ipr.close()
        raise

    # a start that fails on a predecessor's state leaves it (it still forwards, and the leak guard
    # stays); one that fails from scratch removes what it installed
    def what() -> str:
        return "leaving the adopted state" if d.adopted or handover else "removing what was installed"

    try:
        d.start()
    except StartError:
        log.error("start failed; %s", what())
        d.shutdown(keep=d.adopted or handover)
        raise
    except Exception as e:
        log.exception("start failed; %s", what())
        d.shutdown(keep=d.adopted or handover)
        raise StartError([f"start failed: {e}"], EXIT_FAILURE) from None
    except BaseException:
        d.shutdown(keep=d.adopted or handover)
        raise
    try:
        code = d.run()
    finally:
        log.info(
            "stopping: the TUN, routes, rules, guards and shaping stay for the next daemon "
            "(`podrouter cleanup` removes them)"
        )
        if quick_exit is not None and d.quick_exit and not d.handing_over and d.owns_record:
            d.quick_stop()
            quick_exit(d._exit_code)
        d.shutdown(keep=True)
        if d.handover_server is not None:
            d.handover_server.wait_sent()
    return code


# the names tests, bench and docs import from podrouter.daemon (each defined in its own module)
__all__ = [
    "Daemon",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "PeerView",
    "PodEntry",
    "RoutePlan",
    "StartError",
    "build_spec",
    "cleanup",
    "encap_overhead",
    "nat_exhausted_message",
    "path_mtu",
    "plan_routes",
    "run",
    "split_by",
]
