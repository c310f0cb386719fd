"""Throwaway hosts in network namespaces for the demo, the benchmark suite and the integration tests.

Every host is a network namespace; links are veth pairs created directly inside the namespaces
(`ip -n A link add ... peer ... netns B`), so nothing is ever created in, or moved through, the
root namespace. `Topology.close()` deletes every namespace it made (which also deletes the veths
and kills nothing else); it is idempotent and runs from fixtures' finalizers, the demo's signal
handler and the bench's `finally` even when something fails.

This module ships in the wheel because `podrouter demo` and `podrouter bench` build these hosts at
run time; tests/nettopo.py re-exports it for the tests. It builds *lab hosts*, not a node's datapath,
so it shells out to `ip`/`tc`/`sysctl` inside the namespaces it owns; the daemon itself never does
(it speaks netlink through pyroute2).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = [
    "Host",
    "Pod",
    "ReferenceTopology",
    "Terminated",
    "Topology",
    "capture",
    "parallel",
    "signals_unwind",
    "reference_topology",
    "sh",
]


class Terminated(BaseException):
    """SIGTERM turned into an exception, so the same `finally` (namespaces, daemons) runs as for
    Ctrl-C (KeyboardInterrupt)."""


_OWNER_PID = [os.getpid()]


def _unwind(signum: int, _frame: object) -> None:
    # Only the process that installed the handler unwinds. A child forked from it (pyroute2 forks
    # helpers to work inside other namespaces) inherits the handler; if its parent stops it with
    # SIGTERM it must simply die, not raise into a copy of our call stack and carry on as a second
    # copy of the run.
    if os.getpid() != _OWNER_PID[0]:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt` in this
    process, so whatever built lab hosts tears them down on either."""
    _OWNER_PID[0] = os.getpid()
    old = signal.signal(signal.SIGTERM, _unwind)
    old_int = signal.signal(signal.SIGINT, _unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def sh(*argv: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Host:
    """One network namespace."""

    ns: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, cmd: str | Sequence[str], check: bool = True, timeout: float = 60) -> str:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return sh("ip", "netns", "exec", self.ns, *argv, check=check, timeout=timeout)

    def try_run(self, cmd: str | Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def popen(self, cmd: str | Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def ip(self, args: str, check: bool = True) -> str:
        return sh("ip", "-n", self.ns, *shlex.split(args), check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def ping(
        self, dst: str, count: int = 2, size: int | None = None, df: bool = False, timeout: int = 2
    ) -> bool:
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout)]
        if size is not None:
            argv += ["-s", str(size)]
        if df:
            argv += ["-M", "do"]
        return self.try_run([*argv, dst], timeout=count * (timeout + 1) + 5).returncode == 0

    def stop_procs(self) -> None:
        stop_all(self.procs)
        self.procs.clear()

    def kill_remaining(self) -> None:
        """SIGKILL, by pid, what still runs in this namespace although no one here started it: a
        daemon's fd keeper (its own session) when nothing ran `podrouter cleanup`. Its sockets would
        keep the namespace alive after `ip netns del`."""
        for tok in sh("ip", "netns", "pids", self.ns, check=False).split():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(tok), signal.SIGKILL)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], grace: float = 5) -> None:
    """SIGTERM to every process at once, one shared grace period, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def parallel(calls: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Independent teardown steps in threads, every one waited for; their errors are returned, not
    raised, so that one failing step never keeps the others from running."""
    errors: list[BaseException] = []
    if len(calls) <= 1:
        for c in calls:
            try:
                c()
            except Exception as e:
                errors.append(e)
        return errors
    with ThreadPoolExecutor(max_workers=min(len(calls), 16)) as pool:
        for f in [pool.submit(c) for c in calls]:
            err = f.exception()
            if err is not None:
                errors.append(err)
    return errors


def _remove_ns(h: Host) -> None:
    h.kill_remaining()
    sh("ip", "netns", "del", h.ns, check=False)


class Topology:
    """A set of namespaces with a unique prefix; `close()` removes them all."""

    def __init__(self, tag: str = "t") -> None:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        self.prefix = f"pr{tag}{secrets.token_hex(3)}"
        self.hosts: dict[str, Host] = {}

    def host(self, name: str, forwarding: bool = False) -> Host:
        ns = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", ns)
        h = Host(ns)
        self.hosts[name] = h
        h.ip("link set lo up")
        if forwarding:
            h.sysctl("net.ipv4.ip_forward", 1)
            h.sysctl("net.ipv6.conf.all.forwarding", 1)
        return h

    def link(
        self,
        a: Host,
        a_if: str,
        b: Host,
        b_if: str,
        a_addr: str | None = None,
        b_addr: str | None = None,
        mtu: int = 1500,
    ) -> None:
        a.ip(f"link add {a_if} mtu {mtu} type veth peer name {b_if} netns {b.ns} mtu {mtu}")
        for h, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            if addr:
                h.ip(f"addr add {addr} dev {ifname}")
            h.ip(f"link set {ifname} up")

    def close(self) -> None:
        """Every host's processes get SIGTERM at once and share one grace period; then each
        namespace is emptied and deleted, all hosts in parallel (they are independent)."""
        hosts = list(self.hosts.values())
        stop_all([p for h in hosts for p in h.procs])
        for h in hosts:
            h.procs.clear()
        errors = parallel([functools.partial(_remove_ns, h) for h in hosts])
        self.hosts.clear()
        for e in errors[:1]:
            raise e

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Pod:
    name: str
    host: Host
    ip: str
    node: str
    host_interface: str
    ip6: str | None = None  # dual stack: the pod's IPv6 address (eth0 holds it as a /128)


@dataclass
class ReferenceTopology:
    """docs/design.md §8: node1 and node3 share 172.16.2.0/24; node2 sits behind R on 172.16.3.0/24.

    R knows the node subnets only (never pod CIDRs). An external host lives on 203.0.113.0/24 behind R.
    Pods are namespaces of their own, attached as docs/design.md §4b says: eth0 with a /32 and a default
    route via 169.254.1.1 onlink; the node-side veth is `veth-<pod>` (proxy ARP and the /32 route are
    podrouter's job). Dual stack: every pod also holds an IPv6 /128 (`fd00:10:244:<n>::1`, in the
    node's `node_pod_cidr6`) with an IPv6 default route via fe80::1 (podrouter puts fe80::1 on the
    node's end of the veth when the pod is registered with that address; docs/architecture.md).
    """

    topo: Topology
    router: Host
    external: Host
    nodes: dict[str, Host]
    node_addr: dict[str, str]
    node_pod_cidr: dict[str, str]
    pods: dict[str, Pod]
    node_pod_cidr6: dict[str, str] = field(default_factory=dict)
    # the IPv6 underlay addresses (2001:db8::/32) when built with underlay "v6" or "dual" (for "v6"
    # node_addr holds the same addresses: there is no IPv4 underlay then)
    node_addr6: dict[str, str] = field(default_factory=dict)

    EXTERNAL_ADDR = "203.0.113.10"
    CLUSTER_CIDR = "10.244.0.0/16"
    CLUSTER_CIDR6 = "fd00:10:244::/48"

    def node_of(self, pod: str) -> Host:
        return self.nodes[self.pods[pod].node]

    def add_pod(self, node: str, name: str, ip: str, ip6: str | None = None) -> Pod:
        host = self.topo.host(name)
        ifname = f"veth-{name}"[:15]
        self.topo.link(self.nodes[node], ifname, host, "eth0")
        host.ip(f"addr add {ip}/32 dev eth0")
        host.ip("route add 169.254.1.1 dev eth0 scope link")
        host.ip("route add default via 169.254.1.1 dev eth0 onlink")
        if ip6 is not None:
            # nodad: usable at once (a tentative address can neither send nor answer solicitations)
            host.ip(f"-6 addr add {ip6}/128 dev eth0 nodad")
            host.ip("-6 route add default via fe80::1 dev eth0")
        pod = Pod(name, host, ip, node, ifname, ip6)
        self.pods[name] = pod
        return pod


# The reference topology re-addressed for an IPv6 underlay (documentation prefix, RFC 3849): the shared
# L2 is 2001:db8:2::/64 (R ::1, node1 ::2, node3 ::3), node2's link 2001:db8:3::/64 (R ::1, node2 ::2).
UNDERLAY6 = {"node1": "2001:db8:2::2", "node2": "2001:db8:3::2", "node3": "2001:db8:2::3"}


def reference_topology(
    topo: Topology, mtu: int = 1500, with_pods: bool = True, underlay: str = "v4"
) -> ReferenceTopology:
    """`underlay`: "v4" (docs/design.md §8), "v6" (the same links with IPv6 addresses only, see
    UNDERLAY6) or "dual" (both on every underlay link)."""
    if underlay not in ("v4", "v6", "dual"):
        raise ValueError(f"underlay must be v4, v6 or dual, not {underlay!r}")
    v4, v6 = underlay != "v6", underlay != "v4"
    r = topo.host("r", forwarding=True)
    ext = topo.host("ext")
    nodes = {n: topo.host(n, forwarding=True) for n in ("node1", "node2", "node3")}
    # the shared L2 segment 172.16.2.0/24 is a bridge inside R, with R's address on it
    r.ip("link add br0 type bridge")
    r.ip(f"link set br0 mtu {mtu}")
    r.ip("link set br0 up")
    for n, port in (("node1", "p-node1"), ("node3", "p-node3")):
        topo.link(r, port, nodes[n], "eth0", mtu=mtu)
        r.ip(f"link set {port} master br0")
    topo.link(r, "p-node2", nodes["node2"], "eth0", mtu=mtu)
    if v4:
        r.ip("addr add 172.16.2.1/24 dev br0")
        r.ip("addr add 172.16.3.1/24 dev p-node2")
        nodes["node2"].ip("addr add 172.16.3.2/24 dev eth0")
        nodes["node1"].ip("addr add 172.16.2.2/24 dev eth0")
        nodes["node3"].ip("addr add 172.16.2.3/24 dev eth0")
        nodes["node1"].ip("route add default via 172.16.2.1")
        nodes["node3"].ip("route add default via 172.16.2.1")
        nodes["node2"].ip("route add default via 172.16.3.1")
    if v6:
        # nodad: usable at once (no duplicate address detection in a lab of our own)
        r.ip("-6 addr add 2001:db8:2::1/64 dev br0 nodad")
        r.ip("-6 addr add 2001:db8:3::1/64 dev p-node2 nodad")
        for n, host in nodes.items():
            host.ip(f"-6 addr add {UNDERLAY6[n]}/64 dev eth0 nodad")
            gw = "2001:db8:3::1" if n == "node2" else "2001:db8:2::1"
            host.ip(f"-6 route add default via {gw}")
    topo.link(
        r, "p-ext", ext, "eth0", a_addr="203.0.113.1/24", b_addr=f"{ReferenceTopology.EXTERNAL_ADDR}/24"
    )
    ext.ip("route add default via 203.0.113.1")
    ref = ReferenceTopology(
        topo=topo,
        router=r,
        external=ext,
        nodes=nodes,
        node_addr=dict(UNDERLAY6)
        if not v4
        else {"node1": "172.16.2.2", "node2": "172.16.3.2", "node3": "172.16.2.3"},
        node_pod_cidr={"node1": "10.244.1.0/24", "node2": "10.244.2.0/24", "node3": "10.244.3.0/24"},
        pods={},
        node_pod_cidr6={n: f"fd00:10:244:{i}::/64" for i, n in enumerate(("node1", "node2", "node3"), 1)},
        node_addr6=dict(UNDERLAY6) if v6 else {},
    )
    if with_pods:
        ref.add_pod("node1", "pod1", "10.244.1.1", "fd00:10:244:1::1")
        ref.add_pod("node2", "pod2", "10.244.2.1", "fd00:10:244:2::1")
        ref.add_pod("node3", "pod3", "10.244.3.1", "fd00:10:244:3::1")
    return ref


@contextlib.contextmanager
def capture(host: Host, iface: str, bpf: str = "", count: int = 200) -> Iterator[list[str]]:
    """tcpdump on `iface` inside `host` while the block runs; yields a list filled with the lines."""
    lines: list[str] = []
    argv = ["tcpdump", "-l", "-n", "-nn", "-i", iface, "-c", str(count), "-Q", "inout"]
    if bpf:
        argv += shlex.split(bpf)
    proc = host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let tcpdump attach before traffic starts
    try:
        yield lines
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        lines.extend(ln for ln in out.decode(errors="replace").splitlines() if ln.strip())
