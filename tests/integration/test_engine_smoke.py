"""The I/O engine end to end: two nodes in network namespaces, one veth between them, a Datapath in
each (created in-process by a small child Python running inside the node's namespace), the TUN
configured with pyroute2, and real traffic: ping and a bounded TCP transfer (which exercises TSO
reads, userspace segmentation, UDP GSO/GRO and TUN write coalescing), checked through counters.

Pods are addresses on the nodes' loopback (10.244.1.1 on node A, 10.244.2.1 on node B) so the test
needs nothing but the engine: the kernel routes A's traffic for 10.244.2.0/24 into A's TUN, and
delivers what B's engine writes into B's TUN locally.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytestmark = pytest.mark.integration


CHILD = r"""
import json, sys
from pyroute2 import IPRoute
from podrouter import _native

cfg = json.loads(sys.argv[1])
dp = _native.Datapath(cfg["datapath"])
# no IPv6 link-local chatter (router solicitations, MLD) into the datapath, as the daemon does
with open(f"/proc/sys/net/ipv6/conf/{dp.tun_name}/disable_ipv6", "w") as f:
    f.write("1")
with IPRoute() as ipr:
    idx = ipr.link_lookup(ifname=dp.tun_name)[0]
    assert idx == dp.tun_ifindex
    ipr.link("set", index=idx, state="up")
    for r in cfg["routes"]:
        ipr.route("add", dst=r["dst"], oif=idx, prefsrc=r["src"])
# the tables are compiled against the engine's own start-time settings (its config)
dp.start(_native.Tables(cfg["spec"], cfg["datapath"]))
print("READY", dp.is_running(), flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "counters":
        print(json.dumps(dp.counters()), flush=True)
    elif cmd == "swap":
        try:
            # `swap <spec>`, or `swap {"spec": ..., "settings": {...}}`: tables compiled against
            # other start-time settings than the engine's
            obj = json.loads(arg)
            spec, other = (obj["spec"], obj["settings"]) if "settings" in obj else (obj, {})
            dp.swap_tables(_native.Tables(spec, {**cfg["datapath"], **other}))
        except ValueError as e:
            print("REFUSED", e, flush=True)
        else:
            print("OK", flush=True)
    elif cmd == "running":
        print(json.dumps(dp.is_running()), flush=True)
    elif cmd == "quit":
        break
dp.stop()
print(json.dumps({"running": dp.is_running()}), flush=True)
dp.close()
"""


def sh(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def must(*argv: str) -> str:
    p = sh(*argv)
    assert p.returncode == 0, f"{' '.join(argv)}: {p.stderr}"
    return p.stdout


@dataclass
class Node:
    ns: str
    name: str
    address: str
    pod_cidr: str
    pod_ip: str
    proc: subprocess.Popen[str] | None = None
    stderr: list[str] = field(default_factory=list)

    def link(self) -> dict[str, Any]:
        out: list[dict[str, Any]] = json.loads(must("ip", "-n", self.ns, "-j", "link", "show", "eth0"))
        return out[0]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *argv, timeout=timeout)

    def ask(self, cmd: str) -> str:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        err = "" if line or self.proc.stderr is None else self.proc.stderr.read()
        assert line, f"{self.name}: the datapath process died: {err}"
        return line.strip()

    def counters(self) -> dict[str, Any]:
        c: dict[str, Any] = json.loads(self.ask("counters"))
        return c


def launch(n: Node, spec: dict[str, Any], routes: list[str], mtu: int) -> None:
    """Start a Datapath for node `n` in its namespace; `routes` are sent into the TUN from the pod IP."""
    link = n.link()
    cfg = {
        "datapath": {
            "tun_name": "podr0",
            "tun_mtu": mtu,
            "underlay_ifindex": link["ifindex"],
            "underlay_mac": link["address"],
            "underlay_address": n.address,
            "workers": 1,
            "offload": True,
        },
        "spec": spec,
        "routes": [{"dst": r, "src": n.pod_ip} for r in routes],
    }
    n.proc = subprocess.Popen(
        ["ip", "netns", "exec", n.ns, sys.executable, "-c", CHILD, json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert n.proc.stdout is not None
    line = n.proc.stdout.readline().strip()
    if line != "READY True":
        n.proc.kill()
        err = n.proc.stderr.read() if n.proc.stderr else ""
        n.proc.wait(timeout=5)
        raise AssertionError(f"{n.name}: datapath did not start: {line!r} {err}")


def stop(n: Node) -> None:
    if n.proc is not None and n.proc.poll() is None:
        try:
            out = n.ask("quit")
            assert json.loads(out) == {"running": False}
            n.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - teardown must go on
            n.proc.kill()
            n.proc.wait(timeout=5)
    if n.proc is not None:
        for f in (n.proc.stdin, n.proc.stdout, n.proc.stderr):
            if f is not None:
                f.close()


def iperf(client: str, server: str, server_ns: str, src: str, nbytes: int,
          reverse: bool = False) -> dict[str, Any]:
    """A bounded iperf3 transfer (by size and time) from `src` in `client` to `server` in `server_ns`."""
    argv = ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", server]
    srv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        p = sh("ip", "netns", "exec", client, "iperf3", "-c", server, "-B", src, "-n", str(nbytes), "-J",
               "--connect-timeout", "3000", *(["-R"] if reverse else []), timeout=30)
        assert p.returncode == 0, f"iperf3 failed: {p.stdout[-500:]} {p.stderr[-500:]}"
        result: dict[str, Any] = json.loads(p.stdout)["end"]
        return result
    finally:
        srv.kill()
        srv.wait(timeout=5)


class Pair:
    """Nodes A (172.16.2.2, pods 10.244.1.0/24) and B (172.16.2.3, pods 10.244.2.0/24) on one L2."""

    def __init__(self) -> None:
        prefix = f"pr-h3-{secrets.token_hex(3)}"
        self.a = Node(f"{prefix}-a", "node1", "172.16.2.2", "10.244.1.0/24", "10.244.1.1")
        self.b = Node(f"{prefix}-b", "node2", "172.16.2.3", "10.244.2.0/24", "10.244.2.1")
        for n in (self.a, self.b):
            must("ip", "netns", "add", n.ns)
            must("ip", "-n", n.ns, "link", "set", "lo", "up")
        must("ip", "-n", self.a.ns, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", self.b.ns)
        for n in (self.a, self.b):
            must("ip", "-n", n.ns, "addr", "add", f"{n.address}/24", "dev", "eth0")
            must("ip", "-n", n.ns, "addr", "add", f"{n.pod_ip}/32", "dev", "lo")
            must("ip", "-n", n.ns, "link", "set", "eth0", "up")
            # UDP GRO on the receiving veth needs its NAPI path (Linux >= 5.13 turns it on with GRO).
            sh("ip", "netns", "exec", n.ns, "ethtool", "-K", "eth0", "gro", "on")

    def peer_of(self, n: Node) -> Node:
        return self.b if n is self.a else self.a

    def spec(self, n: Node, mode: str = "tunnel", protocol: str = "vxlan", generation: int = 1,
             peer_cidr: str | None = None) -> dict[str, Any]:
        p = self.peer_of(n)
        return {
            "generation": generation,
            "node": {"name": n.name, "pod_cidrs": [n.pod_cidr]},
            "cluster_cidrs": ["10.244.0.0/16"],
            "mode": mode,
            "native_cidrs": [],
            "native_when_on_link": False,
            "tunnel": {"protocol": protocol, "vni": 7, "vxlan_port": 4789, "geneve_port": 6081},
            "gateway": None,
            "masquerade": {"enabled": False, "non_masquerade_cidrs": []},
            "peers": [{
                "name": p.name, "address": p.address, "pod_cidrs": [peer_cidr or p.pod_cidr],
                "mode": None, "tunnel_protocol": None, "on_link": True,
                "next_hop": {"ip": p.address, "mac": p.link()["address"]},
            }],
        }

    def start(self, mode: str = "tunnel", protocol: str = "vxlan",
              specs: dict[str, Any] | None = None) -> None:
        for n in (self.a, self.b):
            spec = (specs or {}).get(n.name) or self.spec(n, mode, protocol)
            # tunnel paths lose 50 bytes (VXLAN, Geneve with an Ethernet payload) to the outer headers
            launch(n, spec, [self.peer_of(n).pod_cidr], 1500 if mode == "native" else 1450)

    def ping(self, count: int = 3) -> bool:
        p = self.a.run("ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-I", self.a.pod_ip,
                       self.b.pod_ip, timeout=count * 2 + 5)
        return p.returncode == 0

    def tcp_transfer(self, nbytes: int = 32 << 20) -> dict[str, Any]:
        return iperf(self.a.ns, self.b.pod_ip, self.b.ns, self.a.pod_ip, nbytes)

    def close(self) -> None:
        for n in (self.a, self.b):
            stop(n)
        for n in (self.a, self.b):
            sh("ip", "netns", "del", n.ns)


@pytest.fixture
def pair() -> Iterator[Pair]:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (CI runs them as root)")
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def nonzero(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


@pytest.mark.parametrize("protocol", ["vxlan", "geneve"])
def test_tunnel_ping_and_tcp(pair: Pair, protocol: str) -> None:
    pair.start("tunnel", protocol)
    assert pair.ping(), "ping through the tunnel failed"
    end = pair.tcp_transfer()
    assert end["sum_sent"]["bytes"] >= 32 << 20
    ca, cb = pair.a.counters(), pair.b.counters()
    # MSS-sized segments went out encapsulated and came in decapsulated (iperf3 returns once the
    # last bytes are in its socket buffer, so some may still be on the way: hence the margins)
    assert ca["packets"][f"{protocol}/egress"] > (32 << 20) // 1500 // 2
    # (the last window may still be in flight when iperf3 returns)
    assert cb["packets"][f"{protocol}/ingress"] >= ca["packets"][f"{protocol}/egress"] * 0.9
    assert cb["packets"][f"{protocol}/egress"] > 0 and ca["packets"][f"{protocol}/ingress"] > 0
    assert nonzero(ca["packets"]).keys() <= {f"{protocol}/egress", f"{protocol}/ingress"}
    assert cb["bytes"][f"{protocol}/ingress"] >= (32 << 20) // 2
    # the kernel handed us TSO super-packets, and we sent UDP GSO trains
    assert ca["offload"]["tun_gso_reads"] > 0, ca["offload"]
    assert ca["offload"]["udp_tx_gso_messages"] > 0, ca["offload"]
    # no validation drop on the way (IPv6 router solicitations on the TUN are `no_route`)
    for c in (ca, cb):
        assert set(nonzero(c["drops"])) <= {"no_route"}, c["drops"]
    assert ca["table_generation"] == 1


def test_native_ping_and_tcp(pair: Pair) -> None:
    pair.start("native")
    assert pair.ping(), "native ping failed"
    pair.tcp_transfer()
    ca, cb = pair.a.counters(), pair.b.counters()
    assert ca["packets"]["native/egress"] > (32 << 20) // 1500 // 2
    assert cb["packets"]["native/egress"] > 0
    # TSO super-packets went to AF_PACKET whole, with their vnet header (the kernel segments)
    assert ca["offload"]["packet_vnet_hdr"] is True
    assert ca["offload"]["packet_tx_gso_frames"] > 0, ca["offload"]
    assert nonzero(ca["packets"]).keys() == {"native/egress"}


def test_validation_drops_then_table_swap_heals(pair: Pair) -> None:
    # B believes A's pods live in 10.244.9.0/24: everything A sends is a spoofed inner source.
    specs = {"node2": pair.spec(pair.b, peer_cidr="10.244.9.0/24")}
    pair.start("tunnel", "vxlan", specs)
    assert not pair.ping(count=2)
    cb = pair.b.counters()
    assert cb["drops"]["spoofed_inner_source"] >= 2
    assert cb["packets"]["vxlan/ingress"] == 0
    assert pair.b.ask("swap " + json.dumps(pair.spec(pair.b, generation=2))) == "OK"
    assert pair.ping(count=3), "ping failed after the table swap"
    cb = pair.b.counters()
    assert cb["table_generation"] == 2
    assert cb["packets"]["vxlan/ingress"] >= 3


def test_a_swap_that_changes_start_time_settings_is_refused(pair: Pair) -> None:
    """The masquerade port range and the node address are read at start (NAT table, reply sockets)
    and are not part of the table spec: tables compiled against other settings than the engine's
    are refused naming the key, and the running tables stay."""
    pair.start("tunnel", "vxlan")
    moved = {"spec": pair.spec(pair.b, generation=2), "settings": {"masquerade_port_range": [40000, 50000]}}
    reply = pair.b.ask("swap " + json.dumps(moved))
    want = "REFUSED masquerade.port_range: (40000, 50000) differs from (61000, 65535)"
    assert reply.startswith(want), reply
    renamed = {"spec": pair.spec(pair.b, generation=3), "settings": {"underlay_address": "172.16.9.9"}}
    reply = pair.b.ask("swap " + json.dumps(renamed))
    assert reply.startswith("REFUSED node.address: 172.16.9.9 differs from"), reply
    assert pair.b.counters()["table_generation"] == 1
    assert pair.ping(count=2), "the datapath stopped forwarding after a refused swap"
    assert pair.b.ask("swap " + json.dumps(pair.spec(pair.b, generation=4))) == "OK"
    assert pair.b.counters()["table_generation"] == 4


@pytest.fixture
def masq() -> Iterator[tuple[Node, str]]:
    """Node A (172.16.2.2, pod 10.244.1.1) and an external host E (gateway 172.16.2.1, 203.0.113.10)."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (CI runs them as root)")
    prefix = f"pr-h3-{secrets.token_hex(3)}"
    node = Node(f"{prefix}-a", "node1", "172.16.2.2", "10.244.1.0/24", "10.244.1.1")
    ext = f"{prefix}-e"
    try:
        for ns in (node.ns, ext):
            must("ip", "netns", "add", ns)
            must("ip", "-n", ns, "link", "set", "lo", "up")
        must("ip", "-n", node.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", ext)
        must("ip", "-n", node.ns, "addr", "add", "172.16.2.2/24", "dev", "eth0")
        must("ip", "-n", ext, "addr", "add", "172.16.2.1/24", "dev", "eth0")
        must("ip", "-n", node.ns, "addr", "add", "10.244.1.1/32", "dev", "lo")
        must("ip", "-n", ext, "addr", "add", "203.0.113.10/32", "dev", "lo")
        for ns in (node.ns, ext):
            must("ip", "-n", ns, "link", "set", "eth0", "up")
        # The engine reads replies from an AF_PACKET copy; the originals must not reach the node's
        # own stack, which would answer them with RSTs (the control plane's job in the daemon).
        rules = """table ip prh3 {
  chain pre {
    type filter hook prerouting priority raw;
    ip daddr 172.16.2.2 tcp dport 61000-65535 drop
    ip daddr 172.16.2.2 udp dport 61000-65535 drop
  }
}
"""
        p = subprocess.run(["ip", "netns", "exec", node.ns, "nft", "-f", "-"], input=rules, text=True,
                           capture_output=True, timeout=10, check=False)
        assert p.returncode == 0, p.stderr
        yield node, ext
    finally:
        stop(node)
        for ns in (node.ns, ext):
            sh("ip", "netns", "del", ns)


def test_masquerade_ping_and_tcp_both_ways(masq: tuple[Node, str]) -> None:
    node, ext = masq
    ext_mac = json.loads(must("ip", "-n", ext, "-j", "link", "show", "eth0"))[0]["address"]
    spec = {
        "generation": 1,
        "node": {"name": "node1", "pod_cidrs": ["10.244.1.0/24"]},
        "cluster_cidrs": ["10.244.0.0/16"], "mode": "tunnel", "native_cidrs": [],
        "native_when_on_link": False,
        "tunnel": {"protocol": "vxlan", "vni": 7, "vxlan_port": 4789, "geneve_port": 6081},
        "gateway": {"ip": "172.16.2.1", "mac": ext_mac},
        "masquerade": {"enabled": True, "non_masquerade_cidrs": []},
        "peers": [],
    }
    launch(node, spec, ["203.0.113.0/24"], 1500)
    p = node.run("ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", node.pod_ip, "203.0.113.10")
    assert p.returncode == 0, "ping through masquerade failed"
    up = iperf(node.ns, "203.0.113.10", ext, node.pod_ip, 16 << 20)
    down = iperf(node.ns, "203.0.113.10", ext, node.pod_ip, 16 << 20, reverse=True)
    assert up["sum_sent"]["bytes"] >= 16 << 20 and down["sum_sent"]["bytes"] >= 16 << 20
    c = node.counters()
    assert c["packets"]["masquerade/egress"] > (16 << 20) // 1500 // 2
    assert c["packets"]["masquerade/ingress"] > (16 << 20) // 1500 // 2
    assert nonzero(c["packets"]).keys() == {"masquerade/egress", "masquerade/ingress"}
    assert c["nat_entries"] >= 3  # the ping and two TCP connections (plus iperf3's control)
    assert nonzero(c["drops"]) == {}, c["drops"]
    # the pod's TSO super-packets were translated once and left whole
    assert c["offload"]["packet_tx_gso_frames"] > 0, c["offload"]


def test_worker_ends_when_the_tun_is_deleted(pair: Pair) -> None:
    """A TUN deleted underneath the datapath ends its worker (no busy loop on a dead fd), so
    `is_running()` turns false and the daemon can notice."""
    pair.start("tunnel", "vxlan")
    assert pair.a.ask("running") == "true"
    must("ip", "-n", pair.a.ns, "link", "del", "podr0")
    deadline = time.monotonic() + 5
    while pair.a.ask("running") == "true" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pair.a.ask("running") == "false"
    assert pair.b.ask("running") == "true"
