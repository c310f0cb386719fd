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
    return host.popen(["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-O", str(omit), "-J"])


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


def measure(sender: Host, receiver: Host, dst: str, seconds: int = 5, port: int = 5201) -> float:
    """Goodput in bit/s of one TCP flow sender -> receiver, measured on the receiver."""
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


def ping_rtts(host: Host, dst: str, count: int, interval: float = 0.05) -> list[float]:
    """RTTs in ms of `count` pings (lost ones are missing)."""
    out = host.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", dst], check=False,
                   timeout=count * interval + 30)
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)]


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
