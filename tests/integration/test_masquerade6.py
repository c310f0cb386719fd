"""IPv6 masquerade end to end (issue 14 items 4 and 5; docs/masquerade.md, "IPv6"): `podrouter run`
on node1 of the reference topology translates its IPv6 pod's traffic to an external IPv6 host
2001:db8:ff::10 behind R (R knows the underlay subnets only, never fd00:10:244::/48, so every reply
has to come back through node1's translation), on a dual-stack underlay (node1 172.16.2.2 +
2001:db8:2::2, `masquerade.address6: auto` found on the interface) and on an IPv6-only underlay
(node1 2001:db8:2::2).

One topology and one daemon per underlay kind (module-scoped, `masquerade.max_entries_per_pod: 64`
so the last test can reach the cap): TCP (a line server that reports the peer it saw, and iperf3 -t
2), UDP, ping6 with the echo identifier translated, an ICMPv6 port unreachable for a closed port
reaching the pod's socket, a capture on R's external link read by tshark (only the node's IPv6
address, never a pod address), IPv4 on each underlay (translated on the dual stack, dropped on
IPv6-only), an IPv6 connection kept across a daemon restart (NAT snapshot), the per-pod limit,
the leak guard's IPv6 gateway rule dropping pod packets once the daemon and its routes are gone,
and the `ip6 podrouter` guard and the leak guard removed by `podrouter cleanup`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import ICMP_ERRORS, DaemonHandle, Daemons, python_in, ref_config, short_dir
from test_handover import handover
from test_paths import iperf

from nettopo import Host, ReferenceTopology, Topology, capture, reference_topology

NODE6 = "2001:db8:2::2"
NODE4 = "172.16.2.2"
EXT6 = "2001:db8:ff::10"
EXT4 = ReferenceTopology.EXTERNAL_ADDR
POD6 = "fd00:10:244:1::1"
POD4 = "10.244.1.1"
PORT = 8080
CLOSED_PORT = 9
LO, HI = 61000, 65535
PER_POD = 64

# TCP: "peer IP:PORT" to each client, then echoes lines; UDP: every datagram answered with
# "peer IP:PORT <datagram>". Both families (a dual-stack socket on ::). Exits after `seconds`.
SERVER = r"""
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
def conn(c, peer):
    with c:
        c.settimeout(seconds)
        try:
            c.sendall(f"peer {peer[0]}:{peer[1]}\n".encode())
            while True:
                b = c.recv(4096)
                if not b:
                    return
                c.sendall(b)
        except OSError:
            return
def tcp():
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(64)
    while True:
        c, peer = s.accept()
        threading.Thread(target=conn, args=(c, peer), daemon=True).start()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(2048)
        host = peer[0].removeprefix("::ffff:")
        s.sendto(f"peer {host}:{peer[1]} ".encode() + data[:200], peer)
for fn in (tcp, udp):
    threading.Thread(target=fn, daemon=True).start()
print("ready", flush=True)
time.sleep(seconds)
"""

CLIENT = r"""
import errno, json, socket, struct, sys, time
def tcp(dst, port):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    c = socket.socket(fam)
    c.settimeout(5)
    c.connect((dst, port))
    f = c.makefile("rwb", buffering=0)
    seen = f.readline().decode().split()[1]
    c.sendall(b"hello-through-nat66\n")
    echo = f.readline().decode().strip()
    local = c.getsockname()[0]
    c.close()
    return dict(seen=seen, echo=echo, local=local)
def udp(dst, port, msg, timeout=3.0):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect((dst, port))
    s.send(msg.encode())
    try:
        return s.recv(2048).decode()
    except OSError as e:
        return f"error {e.errno}"
    finally:
        s.close()
"""

# A UDP datagram to a closed port: the external host answers with ICMPv6 Destination Unreachable
# (port unreachable, type 1 code 4) to the node address, quoting the translated datagram. Back in the
# pod, the kernel matches the restored quote (the pod's own address and port) to this socket:
# IPV6_RECVERR shows the error with its origin (ICMPv6), type, code and the offender's address.
UNREACH_CLIENT = ICMP_ERRORS + r"""
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
recverr(s)
s.connect((DST, PORT))
refused = False


def poll(s):
    global refused
    try:
        s.recv(100)
    except ConnectionRefusedError:
        refused = True
    except OSError:
        pass


err = icmp_error(s, probe=b"anyone?", poll=poll)
print(json.dumps(dict(err=err, refused=refused, local=s.getsockname()[0])))
"""

# One TCP connection held across a daemon restart: an echo before, then (once the file GO exists)
# another on the same connection.
HOLD_CLIENT = r"""
import json, os, socket, time
c = socket.create_connection((DST, PORT), timeout=5)
f = c.makefile("rwb", buffering=0)
seen = f.readline().decode().split()[1]
c.sendall(b"before\n")
print(json.dumps(dict(seen=seen, echo=f.readline().decode().strip())), flush=True)
deadline = time.monotonic() + 40
while not os.path.exists(GO) and time.monotonic() < deadline:
    time.sleep(0.1)
c.settimeout(10)
try:
    c.sendall(b"after\n")
    echo = f.readline().decode().strip()
except OSError as e:
    echo = f"error {e}"
print(json.dumps(dict(echo=echo)), flush=True)
"""

# UDP to many external ports from one pod: each is a new mapping until the pod's cap.
FLOOD_CLIENT = r"""
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for p in range(20000, 20000 + N):
    s.sendto(b"x", (DST, p))
    time.sleep(0.002)
print(json.dumps(dict(sent=N)))
"""


@dataclass
class Lab:
    kind: str
    ref: ReferenceTopology
    daemon: DaemonHandle
    server: subprocess.Popen[bytes]
    daemons: Daemons
    cfg: dict[str, Any]


def add_external_ipv6(ref: ReferenceTopology) -> None:
    """The external host's IPv6 side: 2001:db8:ff::/64 between R and ext (R routes only the underlay
    subnets and this one; pod CIDRs stay unknown to it)."""
    ref.router.ip("-6 addr add 2001:db8:ff::1/64 dev p-ext nodad")
    ref.external.ip(f"-6 addr add {EXT6}/64 dev eth0 nodad")
    ref.external.ip("-6 route add default via 2001:db8:ff::1")


def start_server(host: Host, seconds: float = 300) -> subprocess.Popen[bytes]:
    proc = host.popen([sys.executable, "-c", SERVER, str(PORT), str(seconds)], stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: "ready" at once, or EOF when the server dies
    proc.stdout.close()
    assert line.strip() == b"ready", f"server did not start: {line!r}"
    return proc


@pytest.fixture(scope="module", params=["dual", "v6"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    kind = request.param
    topo = Topology(f"m6{kind[0]}")
    try:
        ref = reference_topology(topo, underlay=kind)
        add_external_ipv6(ref)
        server = start_server(ref.external)
        with short_dir() as sock:
            daemons = Daemons(sock, tmp_path_factory.mktemp(f"masq6-{kind}"))
            try:
                cfg = ref_config(
                    ref,
                    "node1",
                    sock,
                    dual_stack=True,
                    peers=["node2", "node3"],
                    masquerade={"enabled": True, "max_entries_per_pod": PER_POD},
                )
                d = daemons.start(ref.nodes["node1"], cfg)
                yield Lab(kind, ref, d, server, daemons, cfg)
            finally:
                daemons.stop_all()
    finally:
        topo.close()


def in_pod(lab: Lab, code: str, timeout: float = 60) -> Any:
    r = python_in(lab.ref.pods["pod1"].host, CLIENT + code, timeout=timeout)
    assert r.returncode == 0, f"client failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


def tshark_fields(path: Path, *fields: str, display: str = "") -> list[list[str]]:
    cmd = ["tshark", "-n", "-r", str(path)]
    if display:
        cmd += ["-Y", display]
    cmd += ["-T", "fields", "-E", "separator=\t"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def pcap(host: Host, iface: str, path: Path, bpf: str) -> subprocess.Popen[bytes]:
    proc = host.popen(
        ["tcpdump", "-n", "-i", iface, "-c", "5000", "-w", str(path), *bpf.split()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc


def stop_pcap(proc: subprocess.Popen[bytes]) -> None:
    time.sleep(0.3)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------- tests


def test_tcp_udp_and_iperf3_leave_with_only_the_node_ipv6_address(lab: Lab, tmp_path: Path) -> None:
    before = lab.daemon.counters()
    path = tmp_path / "ext.pcap"
    cap = pcap(lab.ref.router, "p-ext", path, "ip6")
    try:
        out = in_pod(
            lab,
            f"""
t = tcp("{EXT6}", {PORT})
u = udp("{EXT6}", {PORT}, "udp6-hello")
print(json.dumps(dict(tcp=t, udp=u)))
""",
        )
        report = iperf(lab.ref.pods["pod1"].host, lab.ref.external, EXT6, seconds=2, port=5201)
    finally:
        stop_pcap(cap)
    # the server saw the node's IPv6 address and a port of the range; the pod never sees the NAT
    ip, _, port = out["tcp"]["seen"].rpartition(":")
    assert ip == NODE6 and LO <= int(port) <= HI, out
    assert out["tcp"]["echo"] == "hello-through-nat66" and out["tcp"]["local"] == POD6, out
    peer, _, rest = out["udp"].partition(" ")[2].partition(" ")
    uip, _, uport = peer.rpartition(":")
    assert uip == NODE6 and LO <= int(uport) <= HI and rest == "udp6-hello", out
    assert report["end"]["sum_received"]["bytes"] > 1 << 20, report["end"]
    # tshark on the external link: every IPv6 packet is between the node and the external host
    every = tshark_fields(path, "ipv6.src", "ipv6.dst", display="ipv6")
    assert not [r for r in every if any(a.startswith("fd00:") for a in r)], every
    rows = tshark_fields(path, "ipv6.src", "ipv6.dst", "tcp.srcport", "tcp.dstport", display="tcp || udp")
    assert len(rows) > 100, rows[:5]
    pairs = {(r[0], r[1]) for r in rows}
    assert pairs <= {(NODE6, EXT6), (EXT6, NODE6)}, pairs
    node_ports = {int(r[2]) for r in rows if r[0] == NODE6 and r[2]}
    assert node_ports and all(LO <= p <= HI for p in node_ports), node_ports
    c = lab.daemon.counters()
    moved = c["packets"]["masquerade/egress"] - before["packets"].get("masquerade/egress", 0)
    assert moved > 500, c["packets"]
    assert c["packets"]["masquerade/ingress"] > before["packets"].get("masquerade/ingress", 0)
    assert c["drops"]["nat_no_mapping"] == 0 and c["drops"]["nat_exhausted"] == 0, c["drops"]


def test_ping6_echo_identifier_is_translated(lab: Lab) -> None:
    pod = lab.ref.pods["pod1"].host
    echo = "icmp6 and (ip6[40] == 128 or ip6[40] == 129)"
    with capture(lab.ref.router, "p-ext", echo) as on_r, capture(pod, "eth0", echo) as on_pod:
        assert pod.ping(EXT6, count=3), "ping6 through masquerade failed"
    pat = re.compile(r"IP6 (\S+) > (\S+): ICMP6, echo (request|reply), id (\d+)")

    def parse(lines: list[str], kind: str) -> list[tuple[str, str, int]]:
        found = [m.groups() for line in lines if (m := pat.search(line))]
        return [(src, dst, int(ident)) for src, dst, k, ident in found if k == kind]

    r_reqs, pod_reqs, pod_reps = parse(on_r, "request"), parse(on_pod, "request"), parse(on_pod, "reply")
    assert r_reqs and pod_reqs and len(pod_reps) >= 3, (on_r, on_pod)
    pod_id = pod_reqs[0][2]
    for src, dst, ident in r_reqs:
        assert (src, dst) == (NODE6, EXT6), on_r
        assert LO <= ident <= HI and ident != pod_id, (ident, pod_id)
    assert all((s, d, i) == (EXT6, POD6, pod_id) for s, d, i in pod_reps), on_pod


def test_an_icmpv6_port_unreachable_reaches_the_pod_socket(lab: Lab) -> None:
    out = in_pod(lab, f"DST, PORT = {EXT6!r}, {CLOSED_PORT}\n" + UNREACH_CLIENT)
    err = out["err"]
    # SO_EE_ORIGIN_ICMP6 (3), ICMPv6 destination unreachable (1), port unreachable (4), from ext
    assert err is not None, out
    assert (err["origin"], err["type"], err["code"], err["offender"]) == (3, 1, 4, EXT6), err
    assert err["errno"] == 111 and out["local"] == POD6, out  # ECONNREFUSED


def test_ipv4_pods_on_each_underlay(lab: Lab) -> None:
    """Dual stack: IPv4 is still translated to the IPv4 node address. IPv6-only underlay: there is
    no IPv4 address to translate to, so an IPv4 pod's packet is dropped (no_route), never sent out
    with the pod's address."""
    before = lab.daemon.counters()["drops"].get("no_route", 0)
    if lab.kind == "dual":
        reply = in_pod(lab, f'print(json.dumps(udp("{EXT4}", {PORT}, "v4-hello")))')
        assert reply.startswith(f"peer {NODE4}:") and reply.endswith("v4-hello"), reply
        return
    with capture(lab.ref.router, "p-node1", "ip") as on_r:
        reply = in_pod(lab, f'print(json.dumps(udp("{EXT4}", {PORT}, "v4-hello", timeout=1.0)))')
    assert reply.startswith("error") or reply == "", reply
    assert not [ln for ln in on_r if POD4 in ln], on_r
    assert lab.daemon.counters()["drops"]["no_route"] > before


def test_an_ipv6_connection_survives_a_daemon_restart(lab: Lab, tmp_path: Path) -> None:
    """The NAT snapshot holds the IPv6 table too: SIGTERM and `podrouter run` again (1.5 s after the
    last packet, so the periodic snapshot has the mapping), and the connection still echoes. The
    successor adopts the IPv6 masquerade reply socket from the fd keeper, and a handover after it
    passes that socket on (docs/handover.md, "What is passed")."""
    go = tmp_path / "go"
    code = f"DST, PORT, GO = {EXT6!r}, {PORT}, {str(go)!r}\n" + HOLD_CLIENT
    proc = lab.ref.pods["pod1"].host.popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline() or b"{}")  # bounded: the client's 5 s timeouts
        assert first.get("echo") == "before" and first["seen"].startswith(f"{NODE6}:"), first
        time.sleep(1.5)
        code_, logs = lab.daemon.stop(cleanup=False)
        assert code_ == 0, logs[-3000:]
        lab.daemon = lab.daemons.start(lab.ref.nodes["node1"], lab.cfg)
        # the successor adopted the IPv6 masquerade reply socket the fd keeper held (replies that
        # came meanwhile were queued on it, not lost)
        took = [ln for ln in lab.daemon.logs().splitlines() if "from the fd keeper" in ln]
        assert took and "masq6" in took[0], lab.daemon.logs()[-3000:]
        st = lab.daemon.counters()["nat_snapshot"]
        assert st["load_error"] is None and st["loaded"]["rejected"] == 0, st
        assert st["loaded"]["restored"] >= 1, st
        lab.daemon = handover(lab.daemons, lab.daemon, lab.cfg)
        received = [ln for ln in lab.daemon.logs().splitlines() if "handover: received" in ln]
        assert received and "masq6" in received[0], lab.daemon.logs()[-3000:]
        go.touch()
        out, _ = proc.communicate(timeout=30)
        assert json.loads(out or b"{}").get("echo") == "after", (out, lab.daemon.logs()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_per_pod_limit_holds_for_ipv6(lab: Lab) -> None:
    n = PER_POD + 40
    in_pod(lab, f"DST, N = {EXT6!r}, {n}\n" + FLOOD_CLIENT)
    c = lab.daemon.counters()
    assert c["drops"]["nat_pod_limit"] > 0, c["drops"]
    assert c["nat_pod_limit_drops"].get(POD6, 0) >= n - PER_POD, c["nat_pod_limit_drops"]
    assert c["nat_entries"] <= PER_POD + 8, c["nat_entries"]  # the pod's 64, IPv4 flows of earlier tests


def test_the_ip6_guards_are_installed_and_cleanup_removes_them(lab: Lab) -> None:
    """The reply guard `table ip6 podrouter`, and the leak guard's IPv6 gateway rule in
    `inet podrouter_pods`: with the daemon stopped (SIGTERM, the guard stays) and its TUN gone (so
    the masquerade steering's routes are gone too), pod1's IPv6 packets for the outside follow
    node1's IPv6 default route; `rt ip6 nexthop @masq_gateways6` drops them, counted `pod_unrouted`,
    and no pod-sourced packet reaches the wire. `podrouter cleanup` then removes every table."""
    node = lab.ref.nodes["node1"]
    r = node.try_run(["nft", "list", "table", "ip6", "podrouter"])
    assert r.returncode == 0 and f"ip6 daddr {NODE6}" in r.stdout, r.stdout + r.stderr
    # the replies of the earlier tests' TCP flows were kept from the node's stack (counted drops)
    assert "packets 0 bytes 0 drop" not in r.stdout.split("tcp dport")[1].split("\n")[0], r.stdout
    v4 = node.try_run(["nft", "list", "table", "ip", "podrouter"])
    assert (v4.returncode == 0) == (lab.kind == "dual"), v4.stdout  # no IPv4 masquerade on IPv6 only
    st = lab.daemon.status()
    assert st["masquerade_address6"] == NODE6, st.get("masquerade_address6")
    pods = node.run(["nft", "list", "table", "inet", "podrouter_pods"])
    assert "rt ip6 nexthop @masq_gateways6" in pods, pods
    assert re.search(r"set masq_gateways6 \{[^}]*elements = \{ 2001:db8:2::1 \}", pods), pods
    # the IPv4 gateway only where IPv4 pods are masqueraded (dual stack)
    gw4 = re.search(r"set masq_gateways4 \{[^}]*elements = \{ 172\.16\.2\.1 \}", pods)
    assert (gw4 is not None) == (lab.kind == "dual"), pods
    code, logs = lab.daemon.stop(cleanup=False)
    assert code == 0, logs[-3000:]
    unrouted = _unrouted(node)
    node.ip("link del podr0")  # every route into it goes with it (the masquerade default route too)
    with capture(node, "eth0", "src net fd00::/8") as wire:
        assert not lab.ref.pods["pod1"].host.ping(EXT6, count=3, timeout=1)
    assert wire == [], wire[:5]
    assert _unrouted(node) >= unrouted + 3, node.run(["nft", "list", "table", "inet", "podrouter_pods"])
    r = lab.daemon.cli("cleanup", "--config", str(lab.daemon.config), timeout=30)
    assert r.returncode == 0, r.stderr + r.stdout
    for fam, table in (("ip", "podrouter"), ("ip6", "podrouter"), ("inet", "podrouter_pods")):
        assert node.try_run(["nft", "list", "table", fam, table]).returncode != 0, (fam, table)


def _unrouted(node: Host) -> int:
    """Packets the leak guard dropped (`counter pod_unrouted` of `inet podrouter_pods`)."""
    out = node.run(["nft", "list", "counter", "inet", "podrouter_pods", "pod_unrouted"])
    m = re.search(r"packets (\d+)", out)
    assert m, out
    return int(m.group(1))
