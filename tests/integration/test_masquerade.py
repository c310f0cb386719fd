"""Masquerade end to end (issue 4, docs/design.md §2-§3): `podrouter run` on node1 of the reference
topology translates pod traffic to the external host 203.0.113.10 behind R, which knows node
subnets only, so every reply has to come back through node1's translation.

The external host runs a small TCP + UDP server (SERVER below, bounded lifetime) that tells each
client the address and port it saw. Clients run inside pod namespaces. Captures on R and node1 show
what is on the wire; counters come from `podrouter status --json` and /metrics.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ICMP_ERRORS,
    DaemonHandle,
    Daemons,
    our_routes,
    podrouter_argv,
    python_in,
    ref_config,
    wait_for,
    write_config,
)

from nettopo import Host, ReferenceTopology, capture

NODE = "172.16.2.2"
EXT = ReferenceTopology.EXTERNAL_ADDR
PORT = 8080
LO, HI = 61000, 65535

# ------------------------------------------------------------------------------------ the server

# Line protocol, one thread per TCP connection: the server speaks first ("peer IP:PORT"), so a reply
# reaches the node before the pod has sent any data (the case a node RST would kill); then
# "echo X" -> "X", "get N" -> N bytes of a fixed pattern, "put N" + N bytes -> "sha256 HEX".
# UDP: every datagram is answered with "peer IP:PORT <datagram>". Exits after `seconds`.
SERVER = r"""
import hashlib, socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
PATTERN = bytes(range(256)) * 256
def tcp_conn(c, peer):
    with c:
        c.settimeout(seconds)
        f = c.makefile("rwb", buffering=0)
        try:
            c.sendall(f"peer {peer[0]}:{peer[1]}\n".encode())
            while True:
                line = f.readline()
                if not line:
                    return
                cmd, _, arg = line.decode().strip().partition(" ")
                if cmd == "echo":
                    c.sendall((arg + "\n").encode())
                elif cmd == "get":
                    n = int(arg)
                    while n > 0:
                        chunk = PATTERN[: min(n, len(PATTERN))]
                        c.sendall(chunk)
                        n -= len(chunk)
                elif cmd == "put":
                    n, h = int(arg), hashlib.sha256()
                    while n > 0:
                        b = c.recv(min(n, 1 << 16))
                        if not b:
                            return
                        h.update(b)
                        n -= len(b)
                    c.sendall(f"sha256 {h.hexdigest()}\n".encode())
        except OSError:
            return
def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(512)
    while True:
        c, peer = s.accept()
        threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(f"peer {peer[0]}:{peer[1]} ".encode() + data[:200], peer)
for fn in (tcp, udp):
    threading.Thread(target=fn, daemon=True).start()
print("ready", flush=True)
time.sleep(seconds)
"""

# Client helpers, prepended to the code each test runs inside a pod namespace.
CLIENT = r"""
import hashlib, json, socket, struct, sys, time
PATTERN = bytes(range(256)) * 256
def connect(dst, port, timeout=5.0):
    c = socket.create_connection((dst, port), timeout=timeout)
    f = c.makefile("rwb", buffering=0)
    greeting = f.readline().decode().split()
    return c, f, greeting[1]
def ask(c, f, line):
    c.sendall((line + "\n").encode())
    return f.readline().decode().rstrip("\n")
def get(c, f, n):
    c.sendall(f"get {n}\n".encode())
    h, left = hashlib.sha256(), n
    while left > 0:
        b = c.recv(min(left, 1 << 16))
        if not b:
            raise RuntimeError(f"EOF with {left} bytes left")
        h.update(b)
        left -= len(b)
    return h.hexdigest()
def put(c, f, n):
    c.sendall(f"put {n}\n".encode())
    data = (PATTERN * (n // len(PATTERN) + 1))[:n]
    c.sendall(data)
    return f.readline().decode().split()[1], hashlib.sha256(data).hexdigest()
def pattern_sha(n):
    return hashlib.sha256((PATTERN * (n // len(PATTERN) + 1))[:n]).hexdigest()
def udp(dst, port, msg, timeout=3.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect((dst, port))
    s.send(msg.encode())
    reply = s.recv(2048).decode()
    local = s.getsockname()
    s.close()
    return reply, local
"""


def start_server(host: Host, port: int = PORT, seconds: float = 120) -> subprocess.Popen[bytes]:
    proc = host.popen([sys.executable, "-c", SERVER, str(port), str(seconds)], stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the server prints "ready" at once or dies (EOF)
    proc.stdout.close()  # it prints nothing else; the Topology stops it with the namespaces
    assert line.strip() == b"ready", f"server did not start: {line!r}"
    return proc


def in_pod(pod: Host, code: str, timeout: float = 60) -> Any:
    """Runs CLIENT + code in the pod; the code prints one JSON document, which is returned."""
    r = python_in(pod, CLIENT + code, timeout=timeout)
    assert r.returncode == 0, f"client failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


def peer_of(greeting: str) -> tuple[str, int]:
    ip, _, port = greeting.rpartition(":")
    return ip, int(port)


def metrics(host: Host) -> str:
    return host.run(
        [
            sys.executable,
            "-c",
            "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9965/metrics',"
            " timeout=5).read().decode())",
        ]
    )


def metric(body: str, name: str, labels: str = "") -> float:
    """The value of one series (`labels` like 'reason="nat_exhausted"'), 0 when absent."""
    pat = re.compile(
        rf"^{re.escape(name)}(?:_total)?{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    )
    for line in body.splitlines():
        m = pat.match(line)
        if m:
            return float(m.group(1))
    return 0.0


def nft_table(host: Host) -> str:
    r = host.try_run(["nft", "list", "table", "ip", "podrouter"])
    return r.stdout if r.returncode == 0 else ""


# ---------------------------------------------------------------------------------------- fixtures



@pytest.fixture
def server(ref: ReferenceTopology) -> subprocess.Popen[bytes]:
    return start_server(ref.external)


def masq_config(ref: ReferenceTopology, daemons: Daemons, **masquerade: Any) -> dict[str, Any]:
    return ref_config(
        ref, "node1", daemons.sockdir, peers=["node2", "node3"], masquerade={"enabled": True, **masquerade}
    )


def start_node1(ref: ReferenceTopology, daemons: Daemons, **masquerade: Any) -> DaemonHandle:
    return daemons.start(ref.nodes["node1"], masq_config(ref, daemons, **masquerade))


# ------------------------------------------------------------------------------------------- tests


def test_tcp_and_udp_are_translated_to_the_node_address_and_replies_reach_the_pod(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    d = start_node1(ref, daemons)
    pod = ref.pods["pod1"].host
    n = 4 << 20
    out = in_pod(
        pod,
        f"""
c, f, seen = connect("{EXT}", {PORT})
local = c.getsockname()
echo = ask(c, f, "echo hello-through-nat")
down = get(c, f, {n})
up = put(c, f, {n})
c.close()
reply, ulocal = udp("{EXT}", {PORT}, "udp-hello")
print(json.dumps(dict(seen=seen, local=local, echo=echo, down=down, want=pattern_sha({n}), up=up,
                      reply=reply, ulocal=ulocal)))
""",
    )
    ip, port = peer_of(out["seen"])
    # the server saw the node, on a port of the masquerade range; the pod never sees the translation
    assert ip == NODE and LO <= port <= HI, out
    assert out["local"][0] == "10.244.1.1"
    assert out["echo"] == "hello-through-nat"
    # 4 MiB each way arrive intact: NAT's checksum updates hold on GRO'd / offloaded packets too
    assert out["down"] == out["want"]
    assert out["up"][0] == out["up"][1]
    uip, uport_s = out["reply"].split()[1].rsplit(":", 1)
    assert uip == NODE and LO <= int(uport_s) <= HI and out["reply"].endswith("udp-hello"), out
    assert out["ulocal"][0] == "10.244.1.1"

    c = d.counters()
    assert c["packets"]["masquerade/egress"] > n // 1500 // 2
    assert c["packets"]["masquerade/ingress"] > n // 1500 // 2
    assert c["nat_entries"] >= 2  # the TCP connection and the UDP flow (neither has expired)
    assert c["drops"]["nat_exhausted"] == 0 and c["drops"]["nat_no_mapping"] == 0, c["drops"]


def test_icmp_echo_identifier_is_translated(ref: ReferenceTopology, daemons: Daemons) -> None:
    start_node1(ref, daemons)
    pod = ref.pods["pod1"].host
    with (
        capture(ref.router, "p-node1", "icmp") as on_r,
        capture(pod, "eth0", "icmp") as on_pod,
    ):
        assert pod.ping(EXT, count=3), "ping through masquerade failed"
    req = re.compile(r"IP (\S+) > (\S+): ICMP echo request, id (\d+)")
    rep = re.compile(r"IP (\S+) > (\S+): ICMP echo reply, id (\d+)")
    r_reqs = [m.groups() for line in on_r if (m := req.search(line))]
    pod_reqs = [m.groups() for line in on_pod if (m := req.search(line))]
    pod_reps = [m.groups() for line in on_pod if (m := rep.search(line))]
    assert r_reqs and pod_reqs, (on_r, on_pod)
    pod_id = pod_reqs[0][2]
    # on the wire behind the node: the node address and an identifier from the masquerade range
    for src, dst, ident in r_reqs:
        assert (src, dst) == (NODE, EXT), on_r
        assert LO <= int(ident) <= HI and ident != pod_id, (ident, pod_id)
    # back in the pod: replies to the pod's own address and identifier
    assert len(pod_reps) >= 3
    assert all((s, d_, i) == (EXT, "10.244.1.1", pod_id) for s, d_, i in pod_reps), on_pod


PMTU_CLIENT = ICMP_ERRORS + r"""
import json
IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
recverr(s)
s.connect((DST, PORT))
s.send(b"x" * 1472)  # a 1500-byte DF datagram: fits every link up to R, not R -> ext
err = icmp_error(s, seconds=5)
print(json.dumps(dict(err=err, mtu=s.getsockopt(socket.IPPROTO_IP, IP_MTU))))
"""

TTL_CLIENT = ICMP_ERRORS + r"""
import json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
recverr(s)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, TTL)
s.connect((DST, PORT))
# a few probes, like traceroute (R rate-limits its ICMP errors)
print(json.dumps(dict(err=icmp_error(s, probe=b"probe"))))
"""

SO_EE_ORIGIN_ICMP = 2


def test_fragmentation_needed_reaches_the_pod_so_path_mtu_discovery_works(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    start_node1(ref, daemons)
    pod = ref.pods["pod1"].host
    # the narrow link is behind R: R must send "fragmentation needed" (RFC 1191) to the node address
    ref.router.ip("link set p-ext mtu 1400")
    out = in_pod(pod, f"DST, PORT = {EXT!r}, {PORT}\n" + PMTU_CLIENT)
    err = out["err"]
    # the translated ICMP error matched the pod's own socket (address and port restored in the quote)
    assert err is not None, "no ICMP fragmentation-needed came back to the pod"
    assert err["origin"] == SO_EE_ORIGIN_ICMP and (err["type"], err["code"]) == (3, 4), err
    assert err["info"] == 1400 and err["errno"] == 90, err  # EMSGSIZE, next-hop MTU from R
    assert out["mtu"] == 1400, out  # the pod's kernel learned the path MTU

    # TCP: the pod's 1460-byte segments do not fit; without the translated errors this stalls
    n = 2 << 20
    res = in_pod(
        pod,
        f"""
c, f, seen = connect("{EXT}", {PORT}, timeout=15)
up = put(c, f, {n})
c.close()
print(json.dumps(dict(up=up)))
""",
        timeout=40,
    )
    assert res["up"][0] == res["up"][1]
    # ICMP echo, to a second address of the external host (the pod has no path MTU for it yet):
    # ping -M do prints R's "fragmentation needed", translated back to the pod's echo identifier
    ref.external.ip("addr add 203.0.113.11/24 dev eth0")
    r = pod.try_run(
        ["ping", "-n", "-c", "2", "-i", "0.3", "-W", "2", "-M", "do", "-s", "1472", "203.0.113.11"],
        timeout=20,
    )
    assert "Frag needed and DF set (mtu = 1400)" in r.stdout, r.stdout + r.stderr


def test_time_exceeded_from_a_router_behind_the_node_reaches_the_pod(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    d = start_node1(ref, daemons)
    pod = ref.pods["pod1"].host
    # TTL 2: node1 forwards it (2 -> 1), R cannot (traceroute's second hop), so R answers the node
    # address with "time exceeded" quoting the translated datagram
    out = in_pod(pod, f"DST, PORT, TTL = {EXT!r}, {PORT}, 2\n" + TTL_CLIENT)
    err = out["err"]
    assert err is not None, f"no time-exceeded from R reached the pod; drops: {d.counters()['drops']}"
    assert err["origin"] == SO_EE_ORIGIN_ICMP and (err["type"], err["code"]) == (11, 0), err
    assert err["offender"] == "172.16.2.1", err
    # the same for an echo request (what `traceroute -I` / `ping -t` use)
    r = pod.try_run(["ping", "-n", "-c", "2", "-i", "0.3", "-W", "2", "-t", "2", EXT], timeout=20)
    assert "Time to live exceeded" in r.stdout, r.stdout + r.stderr
    # TTL 3 gets through to the server
    out = in_pod(pod, f'r, _ = udp("{EXT}", {PORT}, "ttl3")\nprint(json.dumps(r))')
    assert out.endswith("ttl3")


def test_non_masquerade_destinations_keep_the_pod_source(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    # the network behind R routes pod CIDRs here (so 203.0.113.0/24 needs no masquerade)
    ref.router.ip("route add 10.244.1.0/24 via 172.16.2.2")
    d = start_node1(ref, daemons, non_masquerade_cidrs=["203.0.113.0/24"])
    pod = ref.pods["pod1"].host
    with capture(ref.router, "p-ext", f"host {EXT} and port {PORT}") as on_r:
        out = in_pod(
            pod,
            f"""
c, f, seen = connect("{EXT}", {PORT})
echo = ask(c, f, "echo plain")
c.close()
reply, _ = udp("{EXT}", {PORT}, "plain-udp")
print(json.dumps(dict(seen=seen, echo=echo, reply=reply)))
""",
        )
    assert peer_of(out["seen"])[0] == "10.244.1.1", out
    assert out["echo"] == "plain" and out["reply"].startswith("peer 10.244.1.1:")
    srcs = {
        m.group(1)
        for line in on_r
        if (m := re.search(r"IP (\d+\.\d+\.\d+\.\d+)\.\d+ > " + re.escape(EXT), line))
    }
    assert srcs == {"10.244.1.1"}, on_r
    c = d.counters()
    assert c["packets"]["native/egress"] > 0
    assert c["packets"]["masquerade/egress"] == 0 and c["nat_entries"] == 0


MANY_CLIENT = r"""
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
home = os.open("/proc/self/ns/net", os.O_RDONLY)
socks = []
for ns in NAMESPACES:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {ns}")
    socks.append(socket.socket())  # a socket stays in the namespace it was created in
    os.close(fd)
libc.setns(home, CLONE_NEWNET)
results, errors = [None] * len(socks), []
barrier = threading.Barrier(len(socks))
def one(i, s):
    try:
        s.settimeout(10)
        barrier.wait(timeout=20)  # all connects at once
        s.connect((DST, PORT))
        f = s.makefile("rwb", buffering=0)
        seen = f.readline().decode().split()[1]
        results[i] = [s.getsockname()[0], seen]
    except Exception as e:
        errors.append(f"{i}: {e!r}")
threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(socks)]
for t in threads: t.start()
for t in threads: t.join(30)
# every connection is open at the same time now; each must still carry data
echoes = []
for i, s in enumerate(socks):
    if results[i] is None:
        continue
    try:
        s.sendall(f"echo pod{i}\n".encode())
        echoes.append(s.makefile("rb", buffering=0).readline().decode().strip())
    except Exception as e:
        errors.append(f"echo {i}: {e!r}")
print(json.dumps(dict(results=results, echoes=echoes, errors=errors)), flush=True)
sys.stdin.readline()  # keep the connections open until the test has looked at the node
for s in socks: s.close()
"""


@pytest.mark.slow
def test_fifty_pods_connect_at_once(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    pods = [ref.add_pod("node1", f"m{i:02d}", f"10.244.1.{100 + i}") for i in range(50)]
    d = start_node1(ref, daemons, port_range="61000-65535")
    assert len(d.status()["pods"]) == 51
    code = CLIENT + f"DST, PORT = {EXT!r}, {PORT}\nNAMESPACES = {[p.host.ns for p in pods]!r}\n" + MANY_CLIENT
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        out = json.loads(line)
        assert out["errors"] == [], out["errors"]
        seen = [peer_of(r[1]) for r in out["results"]]
        assert sorted(r[0] for r in out["results"]) == sorted(p.ip for p in pods)
        # all from the node address; one remote endpoint, so 50 distinct node ports
        assert {ip for ip, _ in seen} == {NODE}
        ports = {port for _, port in seen}
        assert len(ports) == 50 and all(LO <= p <= HI for p in ports)
        assert sorted(out["echoes"]) == sorted(f"pod{i}" for i in range(50))
        assert d.counters()["nat_entries"] >= 50
        proc.stdin.write(b"done\n")
        proc.stdin.flush()
        proc.wait(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for s in (proc.stdin, proc.stdout, proc.stderr):
            if s is not None:
                s.close()


HOLD_CLIENT = r"""
conns = []
for i in range(N):
    c, f, seen = connect(DST, PORT, timeout=5)
    conns.append((c, f, seen))
print(json.dumps([seen for _, _, seen in conns]), flush=True)
line = sys.stdin.readline().strip()
while line:
    if line == "echo":  # every held connection still works
        print(json.dumps([ask(c, f, "echo still-here") for c, f, _ in conns]), flush=True)
    elif line == "reset":  # close with RST (SO_LINGER 0): the mappings go to TCP CLOSE
        for c, f, _ in conns:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            f.close()  # the socket closes (and sends its RST) only once its file object is gone too
            c.close()
        print(json.dumps("reset"), flush=True)
    line = sys.stdin.readline().strip()
"""


class Held:
    """A client process in a pod holding N TCP connections to the server, driven line by line."""

    def __init__(self, pod: Host, n: int, port: int = PORT) -> None:
        code = CLIENT + f"DST, PORT, N = {EXT!r}, {port}, {n}\n" + HOLD_CLIENT
        self.proc = pod.popen([sys.executable, "-c", code], stdin=subprocess.PIPE)

    def read(self, timeout: float = 20) -> Any:
        assert self.proc.stdout is not None
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else b""
        if not line:
            err = (
                self.proc.stderr.read().decode() if self.proc.poll() is not None and self.proc.stderr else ""
            )
            raise AssertionError(f"client gave no answer: {err[-2000:]}")
        return json.loads(line)

    def say(self, line: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()


def try_connect(pod: Host, port: int = PORT, timeout: float = 2.5) -> str | None:
    """The greeting of a new connection, or None when it could not be made."""
    out = in_pod(
        pod,
        f"""
try:
    c, f, seen = connect("{EXT}", {port}, timeout={timeout})
    c.close()
except OSError:
    seen = None
print(json.dumps(seen))
""",
    )
    return out  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_tiny_port_range_is_exhausted_then_recovers(ref: ReferenceTopology, daemons: Daemons) -> None:
    server = start_server(ref.external)
    second = start_server(ref.external, port=PORT + 1)
    n1 = ref.nodes["node1"]
    d = start_node1(ref, daemons, port_range="61000-61003")
    pod = ref.pods["pod1"].host
    held = Held(pod, 4)
    try:
        seen = [peer_of(s) for s in held.read()]
        assert {p for _, p in seen} == {61000, 61001, 61002, 61003}
        # the range is full towards 203.0.113.10:8080: the next flow is dropped and counted ...
        assert try_connect(pod) is None
        c = d.counters()
        assert c["drops"]["nat_exhausted"] >= 1 and c["nat_alloc_failures"] >= 1, c["drops"]
        body = metrics(n1)
        assert metric(body, "podrouter_drops", 'reason="nat_exhausted"') >= 1
        assert metric(body, "podrouter_nat_entries") >= 4
        # ... existing flows keep working ...
        assert held.say("echo") == ["still-here"] * 4
        # ... the mapping is endpoint-dependent: another remote port still gets a node port ...
        other = try_connect(pod, port=PORT + 1)
        assert other is not None and peer_of(other)[1] in range(61000, 61004)
        # ... and a rate-limited log line says what happened
        logs = d.logs()
        assert "nat_exhausted" in logs and "61000-61003" in logs, logs[-2000:]

        # closed with RST, the mappings expire after the TCP CLOSE timeout (10 s): new flows succeed
        assert held.say("reset") == "reset"
        greeting = wait_for(
            lambda: try_connect(pod, timeout=1.0), 25, interval=0.5, what="a new flow after expiry"
        )
        assert peer_of(greeting)[0] == NODE
    finally:
        held.close()
        for p in (server, second):
            p.terminate()


@pytest.mark.slow
def test_short_configured_timeouts_expire_entries(ref: ReferenceTopology, daemons: Daemons) -> None:
    start_server(ref.external)
    d = start_node1(
        ref,
        daemons,
        port_range="61000-61001",
        timeouts={"udp_unreplied": 2, "udp_assured": 3, "icmp": 2, "tcp_established": 4},
    )
    pod = ref.pods["pod1"].host
    # two UDP flows fill the two ports towards the server; a third is dropped
    out = in_pod(
        pod,
        f"""
socks, replies = [], []
for i in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.5)
    s.connect(("{EXT}", {PORT}))
    s.send(b"u%d" % i)
    try:
        replies.append(s.recv(256).decode())
    except socket.timeout:
        replies.append(None)
    socks.append(s)
print(json.dumps(replies))
""",
    )
    assert out[0] is not None and out[1] is not None and out[2] is None, out
    assert d.counters()["drops"]["nat_exhausted"] >= 1
    # assured UDP expires after 3 s (the default would be 120 s): the table empties ...
    wait_for(lambda: d.counters()["nat_entries"] == 0, 10, interval=0.5, what="UDP entries to expire")
    # ... and a new flow gets a port again
    reply, _ = in_pod(pod, f'print(json.dumps(udp("{EXT}", {PORT}, "again")))')
    assert reply.endswith("again")
    wait_for(lambda: d.counters()["nat_entries"] == 0, 10, interval=0.5, what="the UDP entry to expire")
    # an idle established TCP connection expires 4 s after its last packet (default: 7440 s)
    held = Held(pod, 1)
    try:
        held.read()
        t0 = time.monotonic()
        assert d.counters()["nat_entries"] == 1
        wait_for(
            lambda: d.counters()["nat_entries"] == 0, 15, interval=0.2, what="the idle TCP entry to expire"
        )
        # (the NAT clock counts whole seconds and the sweep runs about once a second)
        assert 2.5 <= time.monotonic() - t0 <= 8, time.monotonic() - t0
    finally:
        held.close()


TICK_CLIENT = r"""
c, f, seen = connect(DST, PORT, timeout=5)
c.settimeout(3)
ok, errors = 0, []
start = time.monotonic()
for i in range(N):
    try:
        if ask(c, f, f"echo tick{i}") == f"tick{i}":
            ok += 1
        else:
            errors.append(i)
    except OSError as e:
        errors.append(f"{i}: {e!r}")
        break
    time.sleep(0.1)
c.close()
print(json.dumps(dict(ok=ok, errors=errors, seen=seen, seconds=time.monotonic() - start)))
"""


def test_a_tcp_connection_survives_a_table_swap_and_sighup(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    n1 = ref.nodes["node1"]
    cfg = masq_config(ref, daemons)
    cfg["peers"] = [p for p in cfg["peers"] if p["name"] == "node2"]
    d = daemons.start(n1, cfg)
    gen = d.status()["generation"]
    pod = ref.pods["pod1"].host
    ticks = 60  # ~6 s of one message every 100 ms
    code = CLIENT + f"DST, PORT, N = {EXT!r}, {PORT}, {ticks}\n" + TICK_CLIENT
    client = pod.popen([sys.executable, "-c", code])
    try:
        wait_for(lambda: d.counters()["nat_entries"] >= 1, 5, what="the connection's NAT entry")
        time.sleep(1)
        # a peer change: node3 joins, the daemon swaps new tables into the running datapath
        cfg["peers"].append({"name": "node3", "address": "172.16.2.3", "pod_cidr": "10.244.3.0/24"})
        write_config(d.config, cfg)
        d.signal(signal.SIGHUP)
        st = wait_for(lambda: (s := d.status())["generation"] > gen and s, 10, what="new tables after SIGHUP")
        assert {p["name"] for p in st["peers"]} == {"node2", "node3"}
        assert st["counters"]["nat_entries"] >= 1 and "nat_alloc_failures" in st["counters"]
        body = metrics(n1)
        assert metric(body, "podrouter_nat_entries") >= 1
        assert metric(body, "podrouter_table_generation") == st["generation"]
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, err.decode()[-2000:]
    res = json.loads(out)
    assert res["errors"] == [] and res["ok"] == ticks, res
    assert peer_of(res["seen"])[0] == NODE
    assert d.alive()


def test_a_port_range_change_waits_for_a_restart(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    """The datapath builds its NAT table and reply filter from the range at start, so SIGHUP keeps
    the running range, and with it the nftables guard: a guard moved to the new range would hand
    the replies of every live connection to the node's stack, which resets them."""
    n1 = ref.nodes["node1"]
    cfg = masq_config(ref, daemons, port_range="61000-62999")
    d = daemons.start(n1, cfg)
    pod = ref.pods["pod1"].host
    held = Held(pod, 2)
    try:
        assert all(61000 <= peer_of(s)[1] <= 62999 for s in held.read())
        cfg["masquerade"]["port_range"] = "63000-65535"
        write_config(d.config, cfg)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "masquerade.port_range changed" in d.logs(), 10, what="the restart warning")
        assert "tcp dport 61000-62999" in nft_table(n1), nft_table(n1)
        assert held.say("echo") == ["still-here"] * 2
        fresh = try_connect(pod)
        assert fresh is not None and 61000 <= peer_of(fresh)[1] <= 62999
    finally:
        held.close()


def test_port_range_overlapping_ip_local_port_range_refuses_to_start(
    ref: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    n1 = ref.nodes["node1"]
    n1.sysctl("net.ipv4.ip_local_port_range", "40000 61500")
    cfg = ref_config(ref, "node1", daemons.sockdir, masquerade={"enabled": True, "port_range": "61000-61999"})
    path = write_config(tmp_path / "overlap.yaml", cfg)
    r = n1.try_run([*podrouter_argv(), "run", "--config", str(path)], timeout=30)
    assert r.returncode == 2, r.stderr
    assert (
        "masquerade.port_range: '61000-61999' overlaps net.ipv4.ip_local_port_range '40000 61500'" in r.stderr
    ), r.stderr
    # nothing was touched: no TUN, no routes or rules, no nftables table, no socket, no state file
    assert our_routes(n1) == {}
    assert "podr0" not in n1.ip("link show")
    assert "lookup 77" not in n1.ip("rule show")
    assert nft_table(n1) == ""
    assert list(daemons.sockdir.iterdir()) == []
    # the range right above the kernel's is fine, and the guard covers exactly it
    cfg["masquerade"]["port_range"] = "61501-65535"
    d = daemons.start(n1, cfg)
    assert "tcp dport 61501-65535" in nft_table(n1)
    code, logs = d.stop()
    assert code == 0, logs[-2000:]


def test_the_node_never_answers_masquerade_replies(
    ref: ReferenceTopology, daemons: Daemons, server: subprocess.Popen[bytes]
) -> None:
    n1 = ref.nodes["node1"]
    d = start_node1(ref, daemons)
    table = nft_table(n1)
    assert "tcp dport 61000-65535" in table and "udp dport 61000-65535" in table, table
    pod = ref.pods["pod1"].host
    # RSTs or ICMP port-unreachables the node itself would send towards the server
    bpf = f"src host {NODE} and ((tcp[tcpflags] & tcp-rst != 0) or icmp[icmptype] == icmp-unreach)"
    with capture(n1, "eth0", bpf) as from_node:
        out = in_pod(
            pod,
            f"""
res = []
for i in range(5):
    c, f, seen = connect("{EXT}", {PORT})
    res.append(ask(c, f, f"echo n{{i}}"))
    c.close()
for i in range(5):
    res.append(udp("{EXT}", {PORT}, f"u{{i}}")[0].split()[-1])
print(json.dumps(res))
""",
        )
        time.sleep(0.5)
    assert out == [f"n{i}" for i in range(5)] + [f"u{i}" for i in range(5)]
    assert [line for line in from_node if " IP " in line] == [], from_node
    # the originals did arrive and were dropped before the node's stack saw them
    r = n1.run(["nft", "-j", "list", "table", "ip", "podrouter"])
    counters = [
        e["counter"]["packets"]
        for o in json.loads(r)["nftables"]
        if "rule" in o
        for e in o["rule"]["expr"]
        if "counter" in e
    ]
    assert counters[0] >= 10 and counters[1] >= 5, counters  # tcp (greeting, echo, FIN...), udp

    # SIGTERM removes the table with everything else
    code, logs = d.stop()
    assert code == 0, logs[-2000:]
    assert nft_table(n1) == ""


def test_cleanup_removes_the_table_a_killed_daemon_left(ref: ReferenceTopology, daemons: Daemons) -> None:
    n1 = ref.nodes["node1"]
    d = start_node1(ref, daemons)
    assert nft_table(n1)
    d.kill()
    assert nft_table(n1), "the table outlives a SIGKILL (that is what cleanup is for)"
    r = d.cli("cleanup", "--config", str(d.config))
    assert r.returncode == 0, r.stderr
    assert nft_table(n1) == ""
    assert "podrouter" in r.stdout and "nftables" in r.stdout


# the node's own UDP socket (an ephemeral port, outside the masquerade range) to a closed port of the
# external host: the host answers the node address with ICMP port unreachable, which the node's stack
# turns into ECONNREFUSED on the socket
NODE_UDP_TO_CLOSED_PORT = f"""
import json, socket
out = []
for i in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(("{EXT}", 9))
    s.send(b"x")
    try:
        s.recv(100)
        out.append("answered")
    except ConnectionRefusedError:
        out.append("refused")
    except OSError as e:
        out.append(repr(e))
    out.append(s.getsockname()[1])
    s.close()
print(json.dumps(out))
"""


@pytest.mark.parametrize("enabled", [False, True], ids=["masquerade-off", "masquerade-on"])
def test_icmp_errors_about_the_nodes_own_traffic_are_left_to_the_kernel(
    ref: ReferenceTopology, daemons: Daemons, enabled: bool
) -> None:
    """Off: no reply socket at all. On: the reply filter takes only ICMP errors quoting a packet we
    translated (source port / echo identifier in the range). Either way an error about the node's own
    connection is the kernel's business and no `nat_no_mapping` drop."""
    d = daemons.start(
        ref.nodes["node1"],
        ref_config(ref, "node1", daemons.sockdir, peers=["node2", "node3"], masquerade={"enabled": enabled}),
    )
    r = python_in(ref.nodes["node1"], NODE_UDP_TO_CLOSED_PORT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # the kernel got every error (the socket saw ECONNREFUSED), from ports outside the range
    assert out[0::2] == ["refused"] * 3, out
    assert all(not LO <= p <= HI for p in out[1::2]), out
    # give worker 0 time to count anything it was (wrongly) handed: its AF_PACKET copy was queued
    # before the kernel's own delivery, and it wakes as soon as it is
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert d.counters()["drops"].get("nat_no_mapping", 0) == 0, d.counters()["drops"]
        time.sleep(0.1)
