"""BandwidthManager: per-pod egress/ingress shaping, priority classes and DSCP, all through pyroute2.

The tc objects (docs/qos.md draws the tree):

    pod veth (host side)                        node IFB (`bandwidth.ifb_name`)
    --------------------                        ------------------------------
    clsact ingress  (packets *from* the pod)    root htb 1: default 1:3
      pref 1  bpf da   skb->priority := 1:<leaf>  1:1   node budget (rate = ceil = node_egress_rate)
                       DSCP rewrite (optional)      1:10 guaranteed  prio 0  rate = share, ceil = budget
      pref 2  u32 all  mirred egress redirect       1:20 burstable   prio 1
                       -> IFB                       1:30 besteffort  prio 2
    root tbf        (packets *to* the pod)               1:3        unclassified (safety net)
      rate = ingress limit, GSO segmented                1:<leaf>   one per pod, ceil = egress limit
                                                           <leaf>: tbf segmenter or bfifo (its queue)

Why this shape:
- One IFB per node, not one per pod: the node budget and the priority classes need every shaped pod's
  traffic in one HTB tree. The redirect happens at the pod veth's ingress hook, before routing, so it
  shapes whatever the pod sends, whichever path (native, tunnel, masquerade) carries it afterwards.
  After the IFB the packet re-enters the veth's receive path (ifb_ri_tasklet sets tc_skip_classify, so
  our filters do not see it twice) and the node routes it as usual.
- Classification by skb->priority, set by the pod's own BPF filter: HTB reads it before any filter
  (htb_classify), so there are no per-pod filters on the IFB to scan, and a pod cannot borrow
  another's class by spoofing a source address. See bpf.py.
- Each leaf's queue is bounded in *bytes* (sizing.py): the queueing delay a pod inflicts on itself is
  at most limit / rate. HTB cannot split GSO super-packets, so a TBF child (at a rate far above the
  pod's ceiling, so it never shapes) segments anything larger than one bucket and holds the queue.
- Ingress shaping is a TBF root on the host veth (the veth's egress is the pod's ingress). TBF splits
  GSO packets larger than its bucket (tbf_segment), so a small bucket and a byte limit give a tight
  delay bound.
- Live changes use RTM_NEWTCLASS/RTM_NEWQDISC/RTM_NEWTFILTER with NLM_F_REPLACE (pyroute2 'replace*'),
  which the kernel applies in place (htb_change_class, tbf_change, fifo change, cls_bpf change): no
  packet of this or any other pod is dropped by the change. A priority change has to move the leaf
  to another parent, which HTB cannot do in place, so it is make-before-break: build the new leaf,
  point the BPF filter at it (one atomic filter replace), then delete the old one.

Errors never escape apply(): a bad annotation or a failed netlink call is logged, reported in the
pod's status, and the pod keeps the shaping it had.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import plugins as _tc_plugins
from pyroute2.netlink.rtnl.tcmsg import sched_pfifo

from podrouter.qos import sizing
from podrouter.qos.annotations import PRIORITIES, PodQoS, QoSRequest
from podrouter.qos.bpf import Aqm, BpfError, build_program, create_state_map, load_program, read_state
from podrouter.qos.config import BandwidthConfig, parse_bandwidth_config

__all__ = ["BandwidthManager"]

log = logging.getLogger(__name__)

# pyroute2 knows pfifo but not bfifo; both take the same `struct tc_fifo_qopt { __u32 limit; }`
# (sch_fifo.c), so the pfifo codec serves bfifo. Registering it is additive: nothing else uses it.
_tc_plugins.setdefault("bfifo", sched_pfifo)

ETH_P_ALL = 0x0003
TC_H_CLSACT = 0xFFFFFFF1
TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_H_CLSACT_EGRESS = 0xFFFFFFF3
TC_H_ROOT = 0xFFFFFFFF
HTB_ROOT = 0x10000
NODE_CLASS = 0x10001
UNCLASSIFIED_CLASS = 0x10003
PRIORITY_CLASS = {"guaranteed": 0x10010, "burstable": 0x10020, "besteffort": 0x10030}
# HTB serves borrowing leaves in prio order (0 first). Each priority class gets two levels, one for
# its pods' interactive leaves and one for their bulk leaves, so a guaranteed pod's bulk still goes
# before a burstable pod's interactive traffic, and within one pod small packets go first.
PRIORITY_PRIO = {"guaranteed": 0, "burstable": 2, "besteffort": 4}
PREF_BPF = 1
PREF_REDIRECT = 2
BPF_HANDLE = 1
# a pod's slot s names its class 1:s and its leaves 1:(s|SPARSE) and 1:(s|BULK)
FIRST_SLOT, LAST_SLOT = 0x100, 0x3FFF
SPARSE, BULK = 0x4000, 0x8000
BULK_RATE_BPS = 8000  # the bulk leaf's own (level 0) rate: everything above is borrowed
SPARSE_QUEUE_BYTES = 16 * 1024  # interactive leaf: up to ~64 small packets, never GSO
INGRESS_TOP = 0x1  # on a pod veth: 1:1 the limit, 1:4001 interactive, 1:8001 bulk
# TBF's rate is a 32-bit byte count (pyroute2 does not encode TCA_TBF_RATE64): ~34 Gbit/s.
TBF_MAX_Bps = (1 << 32) - 1
# Up to this ceiling the leaf gets a TBF segmenter (rate >= 4x the ceiling, so it never shapes);
# above it, GSO packets cost little queueing delay (64 KiB is 52 us at 10G) and a bfifo does.
SEGMENT_UP_TO_BPS = 8 * TBF_MAX_Bps // 4

# CoDel's interval: at most one early drop per interval for a pod's packets that are not ECN-capable
AQM_INTERVAL_NS = 100_000_000

_GONE = (errno.ENOENT, errno.ENODEV, errno.EINVAL, errno.ENXIO)


@dataclass
class _Pod:
    name: str
    host_interface: str
    ip: str
    annotations: dict[str, str] = field(default_factory=dict)
    qos: PodQoS = field(default_factory=PodQoS)  # what is programmed now
    error: str | None = None
    ifindex: int | None = None
    slot: int | None = None  # leaf class minor on the IFB
    slot_priority: str | None = None
    bpf: tuple[tuple[int, int] | None, int | None, int | None] | None = None  # (classes, dscp, aqm rate)
    aqm_maps: dict[str, int] = field(default_factory=dict)  # "egress"/"ingress" -> AQM state map fd
    clsact: bool = False
    redirect: bool = False
    ingress_root: bool = False
    ingress_bps: int | None = None


def _leaf_classes(slot: int) -> tuple[int, int]:
    """(bulk, interactive) classids of the pod class with minor `slot`."""
    return HTB_ROOT | slot | BULK, HTB_ROOT | slot | SPARSE


def _gone(exc: BaseException) -> bool:
    return isinstance(exc, NetlinkError) and exc.code in _GONE


class BandwidthManager:
    """Owns the node's IFB and every pod's tc state. Thread-safe (one lock; netlink calls are short)."""

    def __init__(
        self, ipr: Any, config: BandwidthConfig | Mapping[str, Any] | None, owns_ipr: bool = False
    ) -> None:
        """`ipr` is the netlink socket (IPRoute or NetNS) to program through; `config` the node's
        parsed `bandwidth:` section (a raw mapping is parsed here). With `owns_ipr`, close() closes
        it too: the daemon hands over a socket of its own at every (re)start of shaping."""
        self._ipr = ipr
        self._owns_ipr = owns_ipr
        self.config: BandwidthConfig = (
            config if isinstance(config, BandwidthConfig) else parse_bandwidth_config(dict(config or {}))
        )
        self._pods: dict[str, _Pod] = {}
        self._free_slots = list(range(LAST_SLOT, FIRST_SLOT - 1, -1))
        self._lock = threading.RLock()
        self._ifb_index: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    def apply(
        self, name: str, host_interface: str, ip: str, request: QoSRequest | Mapping[str, str] | None
    ) -> dict:
        """Make the pod's tc state match its request; returns the pod's status entry.

        The daemon passes the QoSRequest parsed where the pod entered (config, API, CNI); a plain
        annotation mapping (tests, the QoS benchmark) goes through the same QoSRequest.parse.
        """
        if not isinstance(request, QoSRequest):
            request = QoSRequest.parse(request)
        annotations = dict(request.annotations)
        with self._lock:
            pod = self._pods.get(name)
            if pod is not None and pod.host_interface != host_interface:
                # the pod came back on a new veth: nothing of the old one is worth keeping
                self._remove_locked(pod)
                pod = None
            if pod is None:
                pod = _Pod(name=name, host_interface=host_interface, ip=ip)
                self._pods[name] = pod
            pod.ip = ip
            qos, problems = request.qos, request.problems
            if problems:
                pod.error = "; ".join(problems)
                log.warning("pod %s: bad QoS annotations, keeping the previous shaping: %s", name, pod.error)
                return self._status_of(pod)
            if not self.config.enabled:
                pod.annotations, pod.error = annotations, None
                return self._status_of(pod)
            try:
                self._program(pod, qos)
            except (NetlinkError, OSError, BpfError) as exc:
                pod.error = f"tc programming failed: {exc}"
                log.error("pod %s: %s (previous shaping kept where possible)", name, pod.error)
                return self._status_of(pod)
            pod.annotations, pod.qos, pod.error = annotations, qos, None
            return self._status_of(pod)

    def remove(self, name: str) -> None:
        with self._lock:
            pod = self._pods.pop(name, None)
            if pod is not None:
                self._remove_locked(pod)

    def status(self) -> dict[str, dict]:
        with self._lock:
            egress = self._class_counters()
            return {name: self._status_of(pod, egress) for name, pod in self._pods.items()}

    def detach(self) -> None:
        """Stop managing without removing anything: the tc objects stay (a daemon stopping for a
        successor, docs/operations.md); only the netlink socket is closed."""
        with self._lock:
            if self._owns_ipr and not self._closed:
                with contextlib.suppress(OSError):
                    self._ipr.close()
            self._closed = True

    def close(self) -> None:
        with self._lock:
            for pod in list(self._pods.values()):
                self._remove_locked(pod)
            self._pods.clear()
            self._delete_ifb()
            if self._owns_ipr and not self._closed:
                # a bandwidth reload makes a new manager with a new socket: without this, every
                # reload left one netlink socket open for the life of the daemon
                with contextlib.suppress(OSError):
                    self._ipr.close()
            self._closed = True

    # ------------------------------------------------------------------ programming

    def _program(self, pod: _Pod, new: PodQoS) -> None:
        pod.ifindex = self._ifindex(pod.host_interface)
        if pod.ifindex is None:
            raise OSError(errno.ENODEV, f"host interface {pod.host_interface!r} does not exist")
        cfg = self.config
        # 1. the leaf (egress): create or change before anything points at it
        old_slot = None
        if new.egress_shaped:
            self._ensure_ifb()
            prio = new.priority or cfg.default_priority
            ceil = new.egress_bps or cfg.node_egress_bps
            if pod.slot is None:
                pod.slot = self._alloc_slot()
                pod.slot_priority = prio
                self._put_leaf(pod.slot, prio, ceil, create=True)
            elif pod.slot_priority != prio:
                old_slot, pod.slot = pod.slot, self._alloc_slot()
                pod.slot_priority = prio
                self._put_leaf(pod.slot, prio, ceil, create=True)
            else:
                self._put_leaf(pod.slot, prio, ceil, create=False)
        # 2. the veth ingress hook: BPF (class + DSCP), then the redirect
        classes = _leaf_classes(pod.slot) if new.egress_shaped and pod.slot else None
        aqm_rate = (new.egress_bps or cfg.node_egress_bps) if new.egress_shaped else None
        want_bpf = (classes, new.dscp, aqm_rate)
        if new.egress_shaped or new.dscp is not None:
            self._ensure_clsact(pod)
            if pod.bpf != want_bpf:
                self._put_bpf(pod, *want_bpf)
            if new.egress_shaped and not pod.redirect:
                self._add_redirect(pod)
        if not new.egress_shaped and pod.redirect:
            self._del_filter(pod.ifindex, TC_H_CLSACT_INGRESS, PREF_REDIRECT)
            pod.redirect = False
        if not new.egress_shaped and new.dscp is None and pod.bpf is not None:
            self._del_filter(pod.ifindex, TC_H_CLSACT_INGRESS, PREF_BPF)
            pod.bpf = None
            self._close_aqm(pod, "egress")
        # 3. retire leaves nothing points at any more
        if old_slot is not None:
            self._del_leaf(old_slot)
        if not new.egress_shaped and pod.slot is not None:
            self._del_leaf(pod.slot)
            pod.slot = pod.slot_priority = None
        # 4. ingress: HTB root on the host veth
        if new.ingress_bps is not None:
            self._put_ingress(pod, new.ingress_bps)
        elif pod.ingress_root:
            self._del_ingress(pod)
        # 5. nothing left on the hook: give the veth back as we found it
        if pod.clsact and pod.bpf is None and not pod.redirect and not pod.ingress_root:
            self._del_qdisc(pod.ifindex, TC_H_CLSACT, 0xFFFF0000)
            pod.clsact = False

    def _remove_locked(self, pod: _Pod) -> None:
        ifindex = self._ifindex(pod.host_interface)
        if ifindex is not None and ifindex == pod.ifindex:
            # delete the redirect before the leaf it feeds; clsact takes the BPF filter with it
            with self._tolerate(pod.name):
                if pod.clsact:
                    self._del_qdisc(ifindex, TC_H_CLSACT, 0xFFFF0000)
            with self._tolerate(pod.name):
                if pod.ingress_root:
                    self._del_ingress(pod)
        pod.clsact = pod.redirect = pod.ingress_root = False
        pod.bpf = pod.ingress_bps = None
        for direction in list(pod.aqm_maps):
            self._close_aqm(pod, direction)
        if pod.slot is not None:
            with self._tolerate(pod.name):
                self._del_leaf(pod.slot)
            pod.slot = pod.slot_priority = None

    @contextlib.contextmanager
    def _tolerate(self, pod: str) -> Iterator[None]:
        try:
            yield
        except NetlinkError as exc:
            if not _gone(exc):
                log.warning("pod %s: tc cleanup: %s", pod, exc)

    # ------------------------------------------------------------------ the IFB tree

    def _ensure_ifb(self) -> None:
        if self._ifb_index is not None:
            return
        ipr, cfg = self._ipr, self.config
        name = cfg.ifb_name
        existing = ipr.link_lookup(ifname=name)
        if existing:
            link = ipr.get_links(existing[0])[0]
            kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            if kind != "ifb":
                raise OSError(errno.EEXIST, f"{name} exists and is not an IFB ({kind})")
            # a previous daemon died without cleaning up: start from a known state
            ipr.link("del", index=existing[0])
        ipr.link("add", ifname=name, kind="ifb")
        idx = ipr.link_lookup(ifname=name)[0]
        try:
            # explicit queue lengths: the IFB's own queue, and HTB's direct queue, which takes the
            # device's txqueuelen when it is created (pyroute2 cannot send TCA_HTB_DIRECT_QLEN)
            ipr.link("set", index=idx, mtu=max(cfg.mtu, 1500), txqlen=sizing.HTB_DIRECT_QLEN)
            self._ifb_index = idx
            node = cfg.node_egress_bps
            ipr.tc("add", "htb", idx, HTB_ROOT, default=UNCLASSIFIED_CLASS & 0xFFFF)
            self._htb_class("add-class", NODE_CLASS, HTB_ROOT, node, node, 0)
            for prio_name in PRIORITIES:
                share = cfg.priority_shares[prio_name]
                self._htb_class("add-class", PRIORITY_CLASS[prio_name], NODE_CLASS,
                                node * share // 100, node, PRIORITY_PRIO[prio_name])
            be = cfg.priority_shares["besteffort"]
            self._htb_class("add-class", UNCLASSIFIED_CLASS, PRIORITY_CLASS["besteffort"],
                            max(8000, node * be // 10000), node, PRIORITY_PRIO["besteffort"])
            self._ipr.tc("add", "bfifo", idx, (UNCLASSIFIED_CLASS & 0xFFFF) << 16, parent=UNCLASSIFIED_CLASS,
                         limit=sizing.egress_queue_bytes(node, cfg, segmented=False))
            ipr.link("set", index=idx, txqlen=sizing.IFB_TXQLEN, state="up")
        except BaseException:
            self._delete_ifb()
            raise

    def _delete_ifb(self) -> None:
        idx = self._ifb_index
        self._ifb_index = None
        if idx is None:
            return
        try:
            self._ipr.link("del", index=idx)
        except NetlinkError as exc:
            if not _gone(exc):
                log.warning("deleting %s: %s", self.config.ifb_name, exc)

    def _htb_class(self, cmd: str, classid: int, parent: int, rate_bps: int, ceil_bps: int,
                   prio: int, ifindex: int | None = None) -> None:
        s = sizing.htb_class(rate_bps, ceil_bps, self.config)
        ifindex = self._ifb_index if ifindex is None else ifindex
        self._ipr.tc(cmd, "htb", ifindex, classid, parent=parent, rate=s.rate_Bps,
                     ceil=s.ceil_Bps, burst=s.burst, cburst=s.cburst, quantum=s.quantum, prio=prio)

    def _segmenter(self, cmd: str, ifindex: int, classid: int, ceil_bps: int, queue_bytes: int) -> None:
        """The bulk leaf's queue: a TBF that splits GSO packets and bounds the queue in bytes."""
        cfg = self.config
        handle = (classid & 0xFFFF) << 16
        if ceil_bps <= SEGMENT_UP_TO_BPS:
            # bucket >= what HTB can dequeue back to back (its cburst plus one packet), so the
            # TBF never holds a packet back; anything larger than the bucket is a GSO packet and
            # gets segmented, which keeps the byte limit meaningful at low rates. 16x the ceiling
            # refills the bucket far faster than HTB drains it and keeps the bucket long enough in
            # time for the tick rounding of pyroute2's calc_xmittime to be harmless.
            s = sizing.htb_class(ceil_bps, ceil_bps, cfg)
            self._ipr.tc(cmd, "tbf", ifindex, handle, parent=classid, rate=min(TBF_MAX_Bps, 16 * s.ceil_Bps),
                         burst=s.cburst + sizing.frame(cfg), limit=queue_bytes)
        else:
            self._ipr.tc(cmd, "bfifo", ifindex, handle, parent=classid,
                         limit=max(queue_bytes, 2 * sizing.GSO_MAX))

    def _pod_classes(self, cmd: str, ifindex: int, parent: int, top: int, ceil_bps: int, prio: int,
                     rate_bps: int) -> None:
        """A pod's class `top` (ceil = its limit) with its interactive and bulk leaves."""
        create = cmd == "add"
        ccmd = "add-class" if create else "replace-class"
        slot = top & 0xFFFF
        self._htb_class(ccmd, top, parent, rate_bps, ceil_bps, prio, ifindex)
        sparse, bulk = HTB_ROOT | slot | SPARSE, HTB_ROOT | slot | BULK
        # HTB serves every class within its own rate (level 0) before any class that borrows, and
        # prio only orders the borrowers. So the interactive leaf holds the pod's whole assured
        # rate and the bulk leaf only a token one: bulk then always borrows, and small packets
        # are never held behind it. (The other way round the interactive leaf had to borrow
        # against a bulk leaf that spent the parent's tokens at level 0: seconds of ping delay.)
        self._htb_class(ccmd, sparse, top, rate_bps, ceil_bps, prio, ifindex)
        self._htb_class(ccmd, bulk, top, BULK_RATE_BPS, ceil_bps, prio + 1, ifindex)
        self._ipr.tc(cmd if create else "replace", "bfifo", ifindex, (sparse & 0xFFFF) << 16, parent=sparse,
                     limit=SPARSE_QUEUE_BYTES)
        self._segmenter(cmd if create else "replace", ifindex, bulk, ceil_bps,
                        sizing.egress_queue_bytes(ceil_bps, self.config))

    def _put_leaf(self, slot: int, prio: str, ceil_bps: int, create: bool) -> None:
        assert self._ifb_index is not None
        parent = PRIORITY_CLASS[prio]
        class_rate = self.config.node_egress_bps * self.config.priority_shares[prio] // 100
        # the pod's assured rate is 1% of its class; everything above is borrowed, in priority
        # order, up to the pod's ceiling -- so the class rates stay the real guarantees
        rate = max(16000, min(ceil_bps, class_rate // 100))
        top = HTB_ROOT | slot
        if create:
            try:
                self._pod_classes("add", self._ifb_index, parent, top, ceil_bps, PRIORITY_PRIO[prio], rate)
            except BaseException:
                with contextlib.suppress(NetlinkError):
                    self._del_leaf(slot, free=False)
                raise
        else:
            self._pod_classes("replace", self._ifb_index, parent, top, ceil_bps, PRIORITY_PRIO[prio], rate)

    def _del_leaf(self, slot: int, free: bool = True) -> None:
        if self._ifb_index is not None:
            # leaves first: HTB refuses to delete a class that has children (EBUSY); deleting a
            # class deletes its qdisc (htb_delete -> qdisc_put)
            for minor in (slot | SPARSE, slot | BULK, slot):
                try:
                    self._ipr.tc("del-class", index=self._ifb_index, handle=HTB_ROOT | minor)
                except NetlinkError as exc:
                    if not _gone(exc):
                        raise
        if free:
            self._free_slots.append(slot)

    def _alloc_slot(self) -> int:
        if not self._free_slots:
            raise OSError(errno.ENOSPC, "no free HTB leaf class on the IFB")
        return self._free_slots.pop()

    # ------------------------------------------------------------------ the pod veth

    def _ensure_clsact(self, pod: _Pod) -> None:
        if pod.clsact:
            return
        assert pod.ifindex is not None
        try:
            self._ipr.tc("add", "clsact", pod.ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            # left by a previous daemon: our filters use fixed preferences and are replaced below
            with contextlib.suppress(NetlinkError):
                self._del_filter(pod.ifindex, TC_H_CLSACT_INGRESS, PREF_REDIRECT)
        pod.clsact = True

    def _aqm(self, pod: _Pod, direction: str, rate_bps: int | None) -> Aqm | None:
        """A fresh AQM state map for one direction of the pod, or None (disabled / not shaped).
        The previous map (if any) stays open until _swap_aqm: the old program still uses it."""
        if rate_bps is None or not self.config.congestion_avoidance:
            return None
        cfg = self.config
        target_s = max(cfg.max_queue_delay_s, 2 * sizing.frame(cfg) * 8 / rate_bps)
        limit_s = max(sizing.egress_queue_bytes(rate_bps, cfg) * 8 / rate_bps, 2 * target_s)
        target_ns = int(target_s * 1e9)
        # the drop ramp's width must stay below 2^32 ns for the program's 64-bit arithmetic
        limit_ns = min(int(limit_s * 1e9), target_ns + (1 << 31))
        return Aqm(create_state_map(), rate_bps, target_ns, AQM_INTERVAL_NS, limit_ns)

    def _swap_aqm(self, pod: _Pod, direction: str, aqm: Aqm | None) -> None:
        self._close_aqm(pod, direction)
        if aqm is not None:
            pod.aqm_maps[direction] = aqm.map_fd

    def _close_aqm(self, pod: _Pod, direction: str) -> None:
        fd = pod.aqm_maps.pop(direction, None)
        if fd is not None:
            os.close(fd)

    def _put_bpf(self, pod: _Pod, classes: tuple[int, int] | None, dscp: int | None,
                 aqm_rate: int | None) -> None:
        self._attach_bpf(pod, "egress", classes, dscp, aqm_rate)
        pod.bpf = (classes, dscp, aqm_rate)

    def _attach_bpf(self, pod: _Pod, direction: str, classes: tuple[int, int] | None, dscp: int | None,
                    aqm_rate: int | None) -> None:
        """Load the pod's classifier (with its congestion-avoidance map, if any) and attach it to the
        host veth's clsact hook for `direction`: the pod's egress is the veth's ingress hook, the pod's
        ingress the veth's egress hook."""
        aqm = self._aqm(pod, direction, aqm_rate)
        parent, name = ((TC_H_CLSACT_INGRESS, "podrouter-qos") if direction == "egress"
                        else (TC_H_CLSACT_EGRESS, "podrouter-qos-in"))
        try:
            fd = load_program(build_program(classes, dscp, aqm))
            try:
                self._ipr.tc("replace-filter", "bpf", pod.ifindex, BPF_HANDLE, parent=parent,
                             prio=PREF_BPF, protocol=ETH_P_ALL, fd=fd, name=name, direct_action=True)
            finally:
                # the filter holds its own reference to the program (and the program to its map)
                os.close(fd)
        except BaseException:
            if aqm is not None:
                os.close(aqm.map_fd)
            raise
        self._swap_aqm(pod, direction, aqm)

    def _add_redirect(self, pod: _Pod) -> None:
        assert self._ifb_index is not None
        self._ipr.tc("add-filter", "u32", pod.ifindex, parent=TC_H_CLSACT_INGRESS, prio=PREF_REDIRECT,
                     protocol=ETH_P_ALL, target=0, keys=["0x0/0x0+0"],
                     action=dict(kind="mirred", direction="egress", action="redirect",
                                 ifindex=self._ifb_index))
        pod.redirect = True

    def _put_ingress(self, pod: _Pod, rate_bps: int) -> None:
        """Root HTB on the host veth (its egress is the pod's ingress): 1:1 = the limit, with the
        same interactive / bulk split as egress, chosen by a BPF filter on the veth's clsact egress
        hook (which runs before the root qdisc, sch_handle_egress)."""
        assert pod.ifindex is not None
        ifindex = pod.ifindex
        if not pod.ingress_root:
            with contextlib.suppress(NetlinkError):
                # a root HTB left by a previous daemon would make "add" fail; start clean
                self._del_qdisc(ifindex, TC_H_ROOT, 0)
            self._add_htb_root(ifindex, default=(INGRESS_TOP | BULK) & 0xFFFF)
            pod.ingress_root = True
            try:
                self._pod_classes("add", ifindex, HTB_ROOT, HTB_ROOT | INGRESS_TOP, rate_bps, 0, rate_bps)
                self._ensure_clsact(pod)
                self._put_egress_bpf(pod, rate_bps)
            except BaseException:
                self._del_ingress(pod)
                raise
        elif pod.ingress_bps != rate_bps:
            self._pod_classes("replace", ifindex, HTB_ROOT, HTB_ROOT | INGRESS_TOP, rate_bps, 0, rate_bps)
            self._put_egress_bpf(pod, rate_bps)
        pod.ingress_bps = rate_bps

    def _add_htb_root(self, ifindex: int, default: int) -> None:
        """A root HTB whose direct queue is HTB_DIRECT_QLEN packets, not the veth's txqueuelen (1000):
        HTB copies the device's txqueuelen when it is created, so lend it ours for that moment."""
        link = self._ipr.get_links(ifindex)[0]
        old = link.get_attr("IFLA_TXQLEN")
        self._ipr.link("set", index=ifindex, txqlen=sizing.HTB_DIRECT_QLEN)
        try:
            self._ipr.tc("add", "htb", ifindex, HTB_ROOT, default=default)
        finally:
            if old is not None:
                self._ipr.link("set", index=ifindex, txqlen=old)

    def _put_egress_bpf(self, pod: _Pod, rate_bps: int | None = None) -> None:
        self._attach_bpf(pod, "ingress", _leaf_classes(INGRESS_TOP), None, rate_bps or pod.ingress_bps)

    def _del_ingress(self, pod: _Pod) -> None:
        assert pod.ifindex is not None
        if pod.clsact:
            self._del_filter(pod.ifindex, TC_H_CLSACT_EGRESS, PREF_BPF)
        self._del_qdisc(pod.ifindex, TC_H_ROOT, 0)
        pod.ingress_root, pod.ingress_bps = False, None
        self._close_aqm(pod, "ingress")

    # ------------------------------------------------------------------ netlink helpers

    def _ifindex(self, ifname: str) -> int | None:
        found = self._ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def _del_filter(self, ifindex: int, parent: int, pref: int) -> None:
        try:
            self._ipr.tc("del-filter", index=ifindex, parent=parent,
                         info=(pref << 16) | socket.htons(ETH_P_ALL))
        except NetlinkError as exc:
            if not _gone(exc):
                raise

    def _del_qdisc(self, ifindex: int, parent: int, handle: int) -> None:
        try:
            self._ipr.tc("del", index=ifindex, parent=parent, handle=handle)
        except NetlinkError as exc:
            if not _gone(exc):
                raise

    # ------------------------------------------------------------------ status

    def _class_counters(self) -> dict[int, Any]:
        if self._ifb_index is None:
            return {}
        try:
            classes = self._ipr.get_classes(index=self._ifb_index)
        except NetlinkError:
            return {}
        return {msg["handle"]: msg for msg in classes}

    def _ingress_counters(self, pod: _Pod) -> dict[str, int] | None:
        if not pod.ingress_root or pod.ifindex is None:
            return None
        try:
            classes = {msg["handle"]: msg for msg in self._ipr.get_classes(index=pod.ifindex)}
        except NetlinkError:
            return None
        return _pod_counters(classes, HTB_ROOT | INGRESS_TOP)

    def _status_of(self, pod: _Pod, egress: dict[int, Any] | None = None) -> dict:
        if egress is None:
            egress = self._class_counters() if pod.slot is not None else {}
        q = pod.qos
        return {
            "name": pod.name,
            "ip": pod.ip,
            "host_interface": pod.host_interface,
            "egress_bps": q.egress_bps,
            "ingress_bps": q.ingress_bps,
            "priority": (q.priority or self.config.default_priority) if q.egress_shaped else q.priority,
            "dscp": q.dscp,
            "error": pod.error,
            "egress_class": f"1:{pod.slot:x}" if pod.slot is not None else None,
            "egress": self._with_aqm(
                pod, "egress", _pod_counters(egress, HTB_ROOT | pod.slot) if pod.slot is not None else None
            ),
            "ingress": self._with_aqm(pod, "ingress", self._ingress_counters(pod)),
        }

    @staticmethod
    def _with_aqm(pod: _Pod, direction: str, counters: dict[str, int] | None) -> dict[str, int] | None:
        """Add the congestion-avoidance counters (CE marks, early and over-limit drops) of one direction."""
        fd = pod.aqm_maps.get(direction)
        if counters is None or fd is None:
            return counters
        with contextlib.suppress(BpfError):
            counters.update(read_state(fd))
        return counters


def _pod_counters(classes: dict[int, Any], top: int) -> dict[str, int] | None:
    """A pod's counters: what its class sent, plus what its two leaves dropped (HTB counts drops and
    overlimits at the leaf that queued the packet)."""
    if top not in classes:
        return None
    out = _counters(classes[top])
    out["drops"] = out["overlimits"] = out["backlog_bytes"] = 0
    for minor in (SPARSE, BULK):
        leaf = classes.get(top | minor)
        if leaf is not None:
            c = _counters(leaf)
            for key in ("drops", "overlimits", "backlog_bytes"):
                out[key] += c[key]
    return out


def _counters(msg: Any) -> dict[str, int]:
    stats = msg.get_attr("TCA_STATS2")
    basic = stats.get_attr("TCA_STATS_BASIC") if stats else None
    queue = stats.get_attr("TCA_STATS_QUEUE") if stats else None
    return {
        "sent_bytes": basic["bytes"] if basic else 0,
        "sent_packets": basic["packets"] if basic else 0,
        "drops": queue["drops"] if queue else 0,
        "overlimits": queue["overlimits"] if queue else 0,
        "backlog_bytes": queue["backlog"] if queue else 0,
    }


def cleanup(ipr: Any, host_interfaces: list[str], ifb_name: str = "podr-ifb0") -> list[str]:
    """Remove what a crashed daemon's BandwidthManager left behind; returns what it removed.

    Only objects that are recognisably ours are touched: the IFB of that name (and only if it is an
    IFB), a clsact whose filters include our BPF program (named podrouter-qos*), and a root HTB 1:
    carrying our ingress tree (class 1:8001).
    """
    removed: list[str] = []
    found = ipr.link_lookup(ifname=ifb_name)
    if found:
        link = ipr.get_links(found[0])[0]
        if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "ifb":
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=found[0])
                removed.append(ifb_name)
    for ifname in host_interfaces:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            continue
        ifindex = idx[0]
        ours = False
        for parent in (TC_H_CLSACT_INGRESS, TC_H_CLSACT_EGRESS):
            with contextlib.suppress(NetlinkError):
                for f in ipr.get_filters(index=ifindex, parent=parent):
                    opts = f.get_attr("TCA_OPTIONS")
                    is_bpf = opts is not None and f.get_attr("TCA_KIND") == "bpf"
                    name = opts.get_attr("TCA_BPF_NAME") if is_bpf else None
                    ours = ours or bool(name and str(name).startswith("podrouter-qos"))
        if ours:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", index=ifindex, parent=TC_H_CLSACT, handle=0xFFFF0000)
                removed.append(f"{ifname} clsact")
        with contextlib.suppress(NetlinkError):
            handles = {c["handle"] for c in ipr.get_classes(index=ifindex)}
            if HTB_ROOT | INGRESS_TOP | BULK in handles:
                ipr.tc("del", index=ifindex, parent=TC_H_ROOT, handle=0)
                removed.append(f"{ifname} root htb")
    return removed
