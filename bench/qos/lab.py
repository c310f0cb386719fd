"""A QoS lab in network namespaces: one node, pods attached as docs/design.md §4b says, and a sink.

    pod-a 10.244.1.2 --veth--+
    pod-b 10.244.1.3 --veth--+-- node (forwarding) -- 198.51.100.1 ---- 198.51.100.2 sink
    ...                      |

Traffic from a pod to the sink crosses the node's routing, exactly like pod egress on a real node;
traffic from the sink to a pod leaves the node on the pod's host veth (the pod's ingress). Measurements
use iperf3 with the result taken on the receiver, `-O 1` so the first second (slow start, queue fill)
is not counted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass

from podrouter.demo.netns import Host, Topology

SINK_ADDR = "198.51.100.2"
NODE_SINK_ADDR = "198.51.100.1"
# TCP payload per Ethernet frame at MTU 1500 with timestamps: 1448 of 1514 bytes. The shapers count
# Ethernet frames (skb->len, no FCS/preamble), iperf3 counts payload, so the expected goodput of a
# pod limited to R is R * 1448 / 1514 (95.6% of R).
GOODPUT_PER_FRAME = 1448 / 1514


@dataclass
class LabPod:
    name: str
    host: Host
    ip: str
    host_interface: str


class Lab:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.node = topo.host("node", forwarding=True)
        self.sink = topo.host("sink")
        topo.link(self.node, "eth0", self.sink, "eth0",
                  a_addr=f"{NODE_SINK_ADDR}/24", b_addr=f"{SINK_ADDR}/24")
        self.sink.ip(f"route add 10.244.0.0/16 via {NODE_SINK_ADDR}")
        # proxy ARP answers for 169.254.1.1 only if the node has a route to it through another
        # interface: the default route (towards the sink, as a node's towards its gateway)
        self.node.ip(f"route add default via {SINK_ADDR}")
        self.pods: dict[str, LabPod] = {}

    def add_pod(self, name: str, ip: str, wire_node: bool = True) -> LabPod:
        host = self.topo.host(name)
        ifname = f"veth-{name}"[:15]
        self.topo.link(self.node, ifname, host, "eth0")
        host.ip(f"addr add {ip}/32 dev eth0")
        host.ip("route add 169.254.1.1 dev eth0 scope link")
        host.ip("route add default via 169.254.1.1 dev eth0 onlink")
        if wire_node:
            # what the daemon does per docs/design.md §4b: /32 route to the host veth and proxy ARP
            self.node.ip(f"route add {ip}/32 dev {ifname}")
            self.node.sysctl(f"net.ipv4.conf.{ifname}.proxy_arp", 1)
        pod = LabPod(name, host, ip, ifname)
        self.pods[name] = pod
        return pod

    @classmethod
    def two_pods(cls, topo: Topology) -> Lab:
        """The node with pods pa (10.244.1.2) and pb (10.244.1.3) that the shaping tests share."""
        lab = cls(topo)
        lab.add_pod("pa", "10.244.1.2")
        lab.add_pod("pb", "10.244.1.3")
        return lab


def iperf_server(host: Host, port: int) -> subprocess.Popen[bytes]:
    proc = host.popen(["iperf3", "-s", "-1", "-p", str(port), "-J"], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if f":{port} " in host.run("ss -Htln", check=False):
            break
        time.sleep(0.05)
    return proc


def iperf_client(host: Host, dst: str, port: int, seconds: int, omit: int = 1) -> subprocess.Popen[bytes]:
    pin = ["-A", "0"] if PIN_BULK and _CPUS > 1 else []
    return host.popen(["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-O", str(omit), "-J", *pin])


def receiver_bps(server: subprocess.Popen[bytes], timeout: float) -> float:
    """Goodput seen by the receiving iperf3 server over its whole one-second intervals after the
    omitted one.

    The server's omit timer is not synchronised with the client's: bytes sent in the client's
    omitted second that the server receives after its own omit boundary land in the first counted
    interval (we saw it read 8.3..11.2 Mbit/s against a steady 9.56 at a 10M limit). That interval
    is therefore skipped as well, as is the sub-second tail after the last full interval.
    """
    out, _err = server.communicate(timeout=timeout)
    data = json.loads(out.decode() or "{}")
    if "error" in data:
        raise RuntimeError(f"iperf3 server: {data['error']}")
    counted = [i["sum"] for i in data["intervals"] if not i["sum"].get("omitted")]
    steady = [s for s in counted[1:] if s["seconds"] >= 0.5]
    if not steady:
        return float(data["end"]["sum_received"]["bits_per_second"])
    return sum(s["bytes"] for s in steady) * 8 / sum(s["seconds"] for s in steady)


def kernel_rx_bytes(host: Host, port: int) -> tuple[int, int]:
    """TCP payload bytes the host's kernel has received in order on the connections to its local
    `port` (`tcpi_bytes_received`, by `ss -ti`): what arrived, when it arrived, however late the
    receiving process reads it; and the out-of-order segments they have received so far
    (`tcpi_rcv_ooopack`, which ss prints only when nonzero). While a sequence hole is open every
    arriving segment is out of order and the in-order count stands still, then jumps when the
    retransmission fills the hole: a reader must not take it then (qos_bench._rx_counter)."""
    out = host.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], check=False)
    return (sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out)),
            sum(int(n) for n in re.findall(r"rcv_ooopack:(\d+)", out)))


def measure(sender: Host, receiver: Host, dst: str, seconds: int = 5, port: int = 5201) -> float:
    """Goodput in bit/s of one TCP flow sender -> receiver, measured on the receiver by iperf3 (see
    receiver_bps; on a loaded machine a late reader can inflate it, docs/qos.md "The +6.46 % case")."""
    server = iperf_server(receiver, port)
    client = iperf_client(sender, dst, port, seconds)
    try:
        client.communicate(timeout=seconds + 20)
        return receiver_bps(server, timeout=seconds + 20)
    finally:
        for p in (client, server):
            if p.poll() is None:
                p.kill()
                p.wait()


def measure_flow(
    sender: Host, receiver: Host, dst: str, seconds: int = 5, port: int = 5201
) -> dict[str, float]:
    """One TCP flow sender -> receiver: goodput (bit/s, on the receiver, as measure()), the sender's
    retransmitted segments and mean smoothed RTT (ms, from tcp_info: the standing queue the flow
    sees), and the CE-marked packets the receiver's stack counted (IpExtInCEPkts) during the run."""
    ce_before = ce_packets(receiver)
    server = iperf_server(receiver, port)
    client = iperf_client(sender, dst, port, seconds)
    try:
        out, _err = client.communicate(timeout=seconds + 20)
        ended_at = time.monotonic()
        bps = receiver_bps(server, timeout=seconds + 20)
    finally:
        for p in (client, server):
            if p.poll() is None:
                p.kill()
                p.wait()
    data = json.loads(out.decode() or "{}")
    sent = data.get("end", {}).get("sum_sent", {})
    streams = data.get("end", {}).get("streams", [{}])
    rtt_us = streams[0].get("sender", {}).get("mean_rtt", 0) if streams else 0
    return {
        "bps": bps,
        "retransmits": float(sent.get("retransmits", 0)),
        "flow_rtt_ms": rtt_us / 1000,
        "ce_packets": float(ce_packets(receiver) - ce_before),
        "ended_at": ended_at,  # time.monotonic() when the sending iperf3 exited
    }


def ce_packets(host: Host) -> int:
    """IP packets with the CE codepoint received by the host's stack so far (nstat IpExtInCEPkts)."""
    out = host.run(["nstat", "-az", "--json", "IpExtInCEPkts"], check=False)
    try:
        return int(json.loads(out)["kernel"].get("IpExtInCEPkts", 0))
    except (ValueError, KeyError, TypeError):
        return 0


def ping_rtts(host: Host, dst: str, count: int, interval: float = 0.05) -> list[float]:
    """RTTs in ms of `count` pings (lost ones are missing)."""
    out = host.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", dst], check=False,
                   timeout=count * interval + 30)
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)]


# The request/response pair. Both ends enable SO_TIMESTAMPNS, so every TCP read also returns the
# kernel's receive timestamp of the data (taken when the packet enters the receiving namespace's
# backlog, as for ping's SO_TIMESTAMP; CLOCK_REALTIME, the clock of time.time_ns(), one clock for all
# namespaces of the machine). The server writes its turnaround -- from the kernel's receipt of the
# request to its own send of the reply -- into the reply's first 8 bytes, so the client can split
# each round trip into: the network (both directions, shaping included), the server's turnaround
# (its wake-up and Python), and its own wake-up (its namespace's softirq, scheduler, Python).
_SO_TIMESTAMPNS = 35  # asm-generic/socket.h SO_TIMESTAMPNS_OLD, also the SCM type; not in Python's socket
RR_BYTES = 64

# The probe's processes (this echo server and the client below) run at real-time priority
# (SCHED_FIFO @PRIO@) for both implementations. On this two-CPU lab both iperf3 ends of the
# saturating flow share the CPUs with them, and this kernel (CONFIG_PREEMPT_NONE, HZ=250) can leave
# a woken SCHED_OTHER task runnable for a whole tick: the probe then measures the lab's CPU
# scheduler, not the shaping (docs/qos.md). A latency-sensitive pod on a node has CPUs of its own
# (Kubernetes' static CPU manager policy for a guaranteed pod); real-time priority is the nearest
# equivalent here.
#
# On a machine with more than one CPU the probe also gets a CPU of its own, as the static CPU manager
# policy would give it: the probe's two processes run on the last CPU and the bulk flow's sender (the
# iperf3 client, in both directions) on CPU 0 (`iperf3 -A 0`, in the benchmark: PIN_BULK), so the
# flow's transmit and softirq work (a veth delivers on the sending CPU) stay off the probe's CPU.
# Without this the probe's wake-up waited behind that softirq work (up to
# net.core.netdev_budget_usecs, 2 ms, per round): run 5 measured `rr` p99 2.21 ms at 100M egress of
# which the network part was 0.47 ms. The receiving iperf3 is left free: pinned beside its sender,
# one CPU could no longer carry 1 Gbit/s (run 6 read -3.08 % at 1G egress, the reference -2.76 %).
RR_PRIORITY = 10
_CPUS = os.cpu_count() or 1
RR_CPU = _CPUS - 1
# The pinning is the benchmark's (qos_bench.run sets PIN_BULK): the integration tests, whose flows
# share the lab with each other and with the rest of the suite, lost 6-10 % of their rate with two
# senders on one CPU (CI, 2026-12-01), so they leave the scheduler free.
PIN_BULK = False
_RR_PRIO = """
import os
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(@PRIO@))
except (AttributeError, PermissionError):
    pass
if @PIN@:
    os.sched_setaffinity(0, {@CPU@})
""".replace("@PRIO@", str(RR_PRIORITY)).replace("@PIN@", str(_CPUS > 1)).replace("@CPU@", str(RR_CPU))

_RR_SERVER = _RR_PRIO + """
import socket, struct, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, @TS@, 1)  # before any packet of the connection arrives
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.setsockopt(socket.SOL_SOCKET, @TS@, 1)
while True:
    got, rx = 0, 0
    while got < @N@:
        d, anc, _f, _a = c.recvmsg(@N@ - got, 256)
        if not d:
            sys.exit(0)
        got += len(d)
        for _lvl, typ, data in anc:
            if typ == @TS@:
                sec, ns = struct.unpack("qq", data[:16])
                rx = sec * 10**9 + ns
    turn = time.time_ns() - rx if rx else -1
    c.sendall(struct.pack("<q", turn) + b"r" * (@N@ - 8))
""".replace("@TS@", str(_SO_TIMESTAMPNS)).replace("@N@", str(RR_BYTES))

_RR_CLIENT = _RR_PRIO + """
import json, socket, struct, sys, time
dst, port, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, @TS@, 1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.settimeout(5)
c.connect((dst, port))
out = []
# paced by the clock, not by sleeping `interval` after each round: the rounds' own time (~5 ms each
# with the wake-ups) would stretch 1150 rounds of 50 ms to 64 s, past the end of the load
start = time.monotonic()
# one untimed round trip first: the first exchange of a connection came without a receive
# timestamp in our runs (the kernel enables timestamping when the first socket asks for it)
for i in range(count + 1):
    t0 = time.time_ns()
    c.sendall(b"q" * @N@)
    got, rx = b"", 0
    while len(got) < @N@:
        d, anc, _f, _a = c.recvmsg(@N@ - len(got), 256)
        if not d:
            break
        got += d
        for _lvl, typ, data in anc:
            if typ == @TS@:
                sec, ns = struct.unpack("qq", data[:16])
                rx = sec * 10**9 + ns
    t1 = time.time_ns()
    if len(got) < @N@:
        break
    turn = struct.unpack("<q", got[:8])[0]
    if i == 0:
        continue
    # total, the server's turnaround, the client's wake-up (ms); -1 where no timestamp came
    out.append([(t1 - t0) / 1e6, turn / 1e6 if turn >= 0 else -1, (t1 - rx) / 1e6 if rx else -1])
    time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
print(json.dumps(out))
""".replace("@TS@", str(_SO_TIMESTAMPNS)).replace("@N@", str(RR_BYTES))


@dataclass
class RrSample:
    """One request/response round trip, ms."""

    total: float  # what the client process measured: send() to the reply read
    server: float  # the echo server's turnaround: kernel receipt of the request to its send()
    client_wake: float  # kernel receipt of the reply in the client's namespace to the read's return

    @property
    def client_seen(self) -> float:
        """The round trip as the client sees it from a server that answers at once (a server on a
        machine of its own): the total less the lab echo server's turnaround."""
        return self.total - self.server

    @property
    def network(self) -> float:
        """Kernel to kernel, both directions, shaping included: what ping's RTT measures."""
        return self.total - self.server - self.client_wake


def rr_samples(client: Host, server: Host, dst: str, count: int, interval: float = 0.05,
               port: int = 5400) -> list[RrSample]:
    """`count` small TCP request/responses (64 bytes each way, TCP_NODELAY, one connection opened
    before the first) from `client` to an echo server on `server`, each split with kernel receive
    timestamps (see _RR_SERVER)."""
    srv = server.popen(["python3", "-c", _RR_SERVER, str(port)])
    try:
        assert srv.stdout is not None
        srv.stdout.readline()  # "ready"
        out = client.run(["python3", "-c", _RR_CLIENT, dst, str(port), str(count), str(interval)],
                         check=False, timeout=count * (interval + 2) + 30)
        try:
            rows = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return []
        return [RrSample(float(t), float(s), float(w)) for t, s, w in rows if s >= 0 and w >= 0]
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.communicate()


def rr_latencies(client: Host, server: Host, dst: str, count: int, interval: float = 0.05,
                 port: int = 5400) -> list[float]:
    """The totals (ms) of rr_samples: what the client process measured, the lab server's
    turnaround included."""
    return [s.total for s in rr_samples(client, server, dst, count, interval, port)]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def tc(host: Host, args: str) -> str:
    return host.run(["tc", *shlex.split(args)], check=False)


REFERENCE_BANDWIDTH_PLUGIN = "/usr/lib/cni/bandwidth"


def reference_bandwidth(lab: Lab, pod: LabPod, command: str, egress_bps: int | None = None,
                        ingress_bps: int | None = None, burst_bits: int | None = None) -> str:
    """Run the reference CNI `bandwidth` plugin as a chained plugin for `pod`, as a runtime would.

    It runs in the node's namespace (it programs the host veth and creates its own IFB there), with
    the previous plugin's result naming the host and container interfaces. The burst is what the
    caller passes; its TBF queue is then rate * 25 ms + burst (the plugin's fixed latency).
    """
    bw: dict[str, int] = {}
    if egress_bps:
        bw |= {"egressRate": egress_bps, "egressBurst": burst_bits or egress_bps // 100}
    if ingress_bps:
        bw |= {"ingressRate": ingress_bps, "ingressBurst": burst_bits or ingress_bps // 100}
    netns = f"/var/run/netns/{pod.host.ns}"
    conf = {
        "cniVersion": "1.0.0",
        "name": "qos-reference",
        "type": "bandwidth",
        "runtimeConfig": {"bandwidth": bw},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": pod.host_interface},
                {"name": "eth0", "sandbox": netns},
            ],
            "ips": [{"address": f"{pod.ip}/32", "interface": 1}],
        },
    }
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"ref-{pod.name}",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    proc = subprocess.run(["ip", "netns", "exec", lab.node.ns, REFERENCE_BANDWIDTH_PLUGIN],
                          input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"bandwidth plugin {command} failed: {proc.stdout} {proc.stderr}")
    return proc.stdout
