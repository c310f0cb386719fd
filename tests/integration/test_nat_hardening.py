"""A pod is an untrusted tenant of the masquerade table (issue 10): node1 of the reference topology
masquerades pod traffic to the external host, and one pod misbehaves.

(a) mid-stream TCP segments (bare ACKs) open no mapping; (b) a pod that opens flow after flow stops
at its per-pod cap and another pod still connects, and with no per-pod cap in the way a full table
evicts unanswered entries; (c) a reply RST outside the connection's window leaves the connection
alone; (d) node ports come from a random seed per daemon process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from helpers import Daemons, python_in, wait_for
from test_masquerade import (
    CLIENT,
    EXT,
    NODE,
    PORT,
    in_pod,
    masq_config,
    metric,
    metrics,
    peer_of,
    start_server,
)

from nettopo import Host, ReferenceTopology, capture


def run_in(host: Host, code: str, timeout: float = 120) -> str:
    r = python_in(host, code, timeout=timeout)
    assert r.returncode == 0, f"failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout


def drops(d: Any) -> dict[str, int]:
    return {k: int(v) for k, v in (d.counters().get("drops") or {}).items()}


def warm_up(pod: Host) -> None:
    """One UDP exchange with the server through masquerade: the node has resolved the gateway's MAC
    (until then masquerade traffic is dropped as neighbor_unresolved, not counted by the NAT rules).
    It leaves one answered entry of `pod` in the table."""
    reply, _ = in_pod(pod, f'print(json.dumps(udp("{EXT}", {PORT}, "warm-up")))')
    assert reply.endswith("warm-up"), reply


def test_bare_acks_open_no_mapping(ref: ReferenceTopology, daemons: Daemons) -> None:
    d = daemons.start(ref.nodes["node1"], masq_config(ref, daemons, max_entries=2000))
    pod = ref.pods["pod1"].host
    start_server(ref.external)
    warm_up(pod)
    before = drops(d)
    # 3000 bare ACKs (no SYN, no socket behind them) to 3000 distinct remote endpoints
    run_in(
        pod,
        """
import time
from scapy.all import IP, TCP, L3RawSocket, conf, send
conf.verb = 0
conf.L3socket = L3RawSocket  # the namespace's kernel routes it
pkts = [IP(dst=f"203.0.113.{10 + i % 10}") / TCP(sport=20000 + i % 7, dport=1000 + i // 10, flags="A",
        seq=i, ack=1) for i in range(3000)]
for i in range(0, len(pkts), 50):  # paced like UDP_FLOOD below
    send(pkts[i : i + 50])
    time.sleep(0.005)
""",
    )
    wait_for(
        lambda: drops(d).get("nat_no_mapping", 0) - before.get("nat_no_mapping", 0) >= 3000,
        30,
        what="3000 nat_no_mapping drops",
    )
    c = d.counters()
    # the old behaviour: 2000 entries, the table full; now: not one mapping (but the warm-up's)
    assert c["nat_entries"] == 1, c["nat_entries"]
    assert c["drops"]["nat_exhausted"] == 0, c["drops"]
    body = metrics(ref.nodes["node1"])
    assert metric(body, "podrouter_drops", 'reason="nat_no_mapping"') >= 3000
    # a real connection from the same pod still works
    out = in_pod(pod, f'c, f, seen = connect("{EXT}", {PORT})\nprint(json.dumps(ask(c, f, "echo ok")))')
    assert out == "ok"


UDP_FLOOD = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(4000):
    # 4000 distinct remote endpoints nobody answers (R has no such hosts)
    s.sendto(b"x", (f"203.0.113.{100 + i % 100}", 10000 + i // 100))
    if i % 50 == 49:
        time.sleep(0.005)  # paced: the TUN queue must not overflow on a busy machine (uncounted loss)
print("sent")
"""


def test_a_pod_at_its_cap_leaves_room_for_another_pod(ref: ReferenceTopology, daemons: Daemons) -> None:
    other = ref.add_pod("node1", "pod1b", "10.244.1.2")
    d = daemons.start(ref.nodes["node1"], masq_config(ref, daemons, max_entries=2000))
    start_server(ref.external)
    warm_up(ref.pods["pod1"].host)
    before = drops(d)
    assert run_in(ref.pods["pod1"].host, UDP_FLOOD).strip() == "sent"
    # default cap: max(64, 2000 / 8) = 250 entries for the flooding pod (the warm-up's and 249 more)
    wait_for(
        lambda: drops(d).get("nat_pod_limit", 0) - before.get("nat_pod_limit", 0) >= 4000 - 250,
        30,
        what="nat_pod_limit drops",
    )
    c = d.counters()
    assert c["nat_entries"] <= 250, c["nat_entries"]
    assert c["nat_pod_limit_drops"].get("10.244.1.1", 0) >= 4000 - 250, c["nat_pod_limit_drops"]
    body = metrics(ref.nodes["node1"])
    assert metric(body, "podrouter_nat_pod_limit_drops", 'pod="10.244.1.1"') >= 4000 - 250
    assert metric(body, "podrouter_drops", 'reason="nat_pod_limit"') >= 4000 - 250
    # the neighbour opens a new connection through masquerade at once
    out = in_pod(
        other.host, f'c, f, seen = connect("{EXT}", {PORT})\nprint(json.dumps([seen, ask(c, f, "echo hi")]))'
    )
    assert peer_of(out[0])[0] == NODE and out[1] == "hi", out


def test_a_full_table_evicts_unanswered_entries(ref: ReferenceTopology, daemons: Daemons) -> None:
    flooder2 = ref.add_pod("node1", "pod1c", "10.244.1.3")
    other = ref.add_pod("node1", "pod1b", "10.244.1.2")
    # two flooding pods, each under its cap of 1500, fill the 2000-entry table together
    d = daemons.start(
        ref.nodes["node1"], masq_config(ref, daemons, max_entries=2000, max_entries_per_pod=1500)
    )
    start_server(ref.external)
    for flooder in (ref.pods["pod1"].host, flooder2.host):
        warm_up(flooder)
    for flooder in (ref.pods["pod1"].host, flooder2.host):
        assert run_in(flooder, UDP_FLOOD).strip() == "sent"
    # pod1 holds 1500, pod1c 500 when the table is full (each with its answered warm-up entry, which
    # is never evicted); pod1c's next 1000 flows evict pod1's oldest unanswered ones
    wait_for(lambda: d.counters()["nat_evictions"] >= 1000, 30, what="1000 evictions")
    c = d.counters()
    assert c["nat_entries"] <= 2000 and c["drops"]["nat_exhausted"] == 0, c
    out = in_pod(
        other.host, f'c, f, seen = connect("{EXT}", {PORT})\nprint(json.dumps([seen, ask(c, f, "echo hi")]))'
    )
    assert peer_of(out[0])[0] == NODE and out[1] == "hi", out
    assert metric(metrics(ref.nodes["node1"]), "podrouter_nat_evictions") >= 1001


# A server that answers "wait N" after N seconds of silence: the connection is idle meanwhile, and the
# late line is the server's own, so it needs the mapping still open (a pod packet would re-create it).
LATE_SERVER = r"""
import socket, sys, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
def conn(c, peer):
    with c:
        c.settimeout(60)
        f = c.makefile("rwb", buffering=0)
        c.sendall(f"peer {peer[0]}:{peer[1]}\n".encode())
        for line in f:
            cmd, _, arg = line.decode().strip().partition(" ")
            if cmd == "wait":
                time.sleep(float(arg))
                c.sendall(b"late\n")
            else:
                c.sendall(line)
deadline = time.monotonic() + 90
s.settimeout(1)
while time.monotonic() < deadline:
    try:
        c, peer = s.accept()
    except socket.timeout:
        continue
    threading.Thread(target=conn, args=(c, peer), daemon=True).start()
"""

RST_PORT = 8090


def test_an_out_of_window_reply_rst_does_not_close_the_connection(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    # a short CLOSE timeout: a mapping an RST closed would be gone by the time the late line comes
    d = daemons.start(ref.nodes["node1"], masq_config(ref, daemons, timeouts={"tcp_close": 2}))
    srv = ref.external.popen([sys.executable, "-c", LATE_SERVER, str(RST_PORT)], stderr=subprocess.DEVNULL)
    assert srv.stdout is not None and srv.stdout.readline().strip() == b"ready"
    srv.stdout.close()
    pod = ref.pods["pod1"].host
    code = CLIENT + (
        f'c, f, seen = connect("{EXT}", {RST_PORT})\n'
        "print(json.dumps(seen), flush=True)\n"
        "sys.stdin.readline()\n"  # the test injects the RST here
        "c.settimeout(15)\n"
        'c.sendall(b"wait 5\\n")\n'
        "try:\n"
        "    print(json.dumps(f.readline().decode().strip()), flush=True)\n"
        "except OSError as e:\n"
        "    print(json.dumps(repr(e)), flush=True)\n"
    )
    client = subprocess.Popen(
        ["ip", "netns", "exec", pod.ns, sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        assert line, client.stderr.read() if client.stderr else ""
        _, node_port = peer_of(json.loads(line))
        before = drops(d)
        with capture(pod, "eth0", "tcp[tcpflags] & tcp-rst != 0") as at_pod:
            # two blind RSTs from the server's address and port, sequence numbers half the space
            # apart (at most one could fall into a 128 KiB window by chance)
            run_in(
                ref.external,
                f"""
import random
from scapy.all import IP, TCP, L3RawSocket, conf, send
conf.verb = 0
conf.L3socket = L3RawSocket  # the namespace's kernel routes it
x = random.getrandbits(32)
for seq in (x, (x + (1 << 31)) % (1 << 32)):
    send(IP(src="{EXT}", dst="{NODE}") / TCP(sport={RST_PORT}, dport={node_port}, flags="R", seq=seq))
""",
            )
            wait_for(
                lambda: (
                    drops(d).get("nat_rst_out_of_window", 0) - before.get("nat_rst_out_of_window", 0) >= 1
                ),
                10,
                what="an nat_rst_out_of_window drop",
            )
        assert not any("Flags [R" in x for x in at_pod), at_pod
        client.stdin.write("go\n")
        client.stdin.flush()
        # idle past the CLOSE timeout, then the server speaks first: the mapping is still there
        reply = json.loads(client.stdout.readline())
        assert reply == "late", reply
        assert drops(d).get("nat_no_mapping", 0) == before.get("nat_no_mapping", 0)
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=10)  # reaps it and closes the pipes
        srv.terminate()
        srv.wait(timeout=10)


def test_node_ports_differ_between_daemon_processes(ref: ReferenceTopology, daemons: Daemons) -> None:
    start_server(ref.external)
    pod = ref.pods["pod1"].host
    code = f"""
out = []
for sport in (40000, 40001, 40002):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    s.settimeout(3)
    s.sendto(b"seed", ("{EXT}", {PORT}))
    out.append(s.recv(256).decode().split()[1])
    s.close()
print(json.dumps(out))
"""
    seen = []
    for _ in range(2):
        d = daemons.start(ref.nodes["node1"], masq_config(ref, daemons))
        seen.append([peer_of(p) for p in in_pod(pod, code)])
        assert d.stop()[0] == 0
        # fresh tables: the NAT snapshot (test_nat_persist.py) would restore the same mappings
        (daemons.sockdir / "node1.nat").unlink(missing_ok=True)
    assert all(ip == NODE for run in seen for ip, _ in run), seen
    # same flows, fresh tables: with a constant seed the node ports would repeat exactly
    assert [p for _, p in seen[0]] != [p for _, p in seen[1]], seen
