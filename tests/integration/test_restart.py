"""The stop contract across daemon restarts (docs/operations.md, "Stopping, restarting, cleaning up"):
SIGTERM and SIGKILL leave the node's forwarding state, `podrouter run` adopts it in place.

* no leak: while pods send, captures on node1's underlay and on the external host's link through a
  SIGTERM+run and a SIGKILL+run find no packet with a pod source address (in tunnel mode every
  pod packet on the underlay is encapsulated; outside traffic is masqueraded);
* no route flap: `ip monitor route` in node1 during both restarts shows no deletion of a route podrouter
  still wants;
* no datagram lost: the fd keeper (python/podrouter/keeper.py) holds node1's TUN queues and sockets
  while no daemon runs, so paced numbered UDP streams pod1 -> pod2, pod1 -> outside (masqueraded)
  and pod2 -> pod1 lose nothing across SIGTERM+run and SIGKILL+run (without it the detached TUN
  drops pod1's datagrams and the unbound tunnel port pod2's);
* flows survive: a long-lived TCP flow over native, VXLAN and Geneve keeps its connection through
  SIGTERM+run and SIGKILL+run (its longest stall is measured by `podrouter bench --only restart`);
* convergence: a peer removed from the config between runs loses its route on start;
* a keeper whose fds do not fit the new config (another tunnel port) lets go of them;
* cleanup is the full removal (TUN and fd keeper included) and says "nothing to clean up" when run
  again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, our_routes, ref_config, wait_listening

from nettopo import Host, ReferenceTopology, capture

pytestmark = pytest.mark.integration

POD_SRC_BPF = "src net 10.244.0.0/16"  # the outer header only: a bare pod packet on the wire

# numbered UDP datagrams to port 9999 of each destination, one every `pace` seconds for `seconds`;
# prints how many went to each. A send error is not retried: the receiver misses that number.
UDP_SEQ_SEND = """
import socket, sys, time
pace, seconds = float(sys.argv[1]), float(sys.argv[2])
dsts = [(a, 9999) for a in sys.argv[3:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, t = 0, time.monotonic()
end = t + seconds
while t < end:
    for d in dsts:
        try:
            s.sendto(str(n).encode(), d)
        except OSError:
            pass  # no route (EHOSTUNREACH / ENETUNREACH) while nothing routes: that is not a leak
    n += 1
    t += pace
    time.sleep(max(0.0, t - time.monotonic()))
print(n)
"""

# the distinct numbers UDP_SEQ_SEND's datagrams carried to port 9999 here within `seconds`
UDP_SEQ_RECV = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
got = set()
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        got.add(int(s.recv(64)))
    except (TimeoutError, ValueError):
        pass
print(len(got))
"""
# 10 ms: node1's TUN queue (512 packets) takes pod1's two streams (200/s) for 2.5 s without a daemon
SEQ_PACE = "0.01"


def seq_receiver(host: Host, seconds: float) -> subprocess.Popen[bytes]:
    proc = host.popen([sys.executable, "-c", UDP_SEQ_RECV, str(seconds)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return proc


def last_int(proc: subprocess.Popen[bytes]) -> int:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return int(out.decode().split()[-1])


def restart(daemons: Daemons, h: DaemonHandle, cfg: dict[str, Any], kind: str, away: float) -> DaemonHandle:
    """Stop node's daemon (SIGTERM: the stop contract; SIGKILL: a crash), stay away `away` seconds,
    start a new one on the same config and wait until it is ready."""
    if kind == "sigterm":
        assert h.terminate() == 0, h.logs()[-2000:]
    else:
        h.kill()
    time.sleep(away)
    return daemons.start(h.host, cfg)


def assert_forwarded_first(h: DaemonHandle) -> float:
    """The successor forwarded from the forwarding snapshot (python/podrouter/startup.py) before it
    was ready: `forwarding_after` is reported and below `ready_after`. Returns it."""
    st = h.status()
    logs = h.logs()
    assert "forwarding from the forwarding snapshot" in logs, logs[-3000:]
    assert 0 < st["forwarding_after"] < st["ready_after"], (st["forwarding_after"], st["ready_after"])
    assert "tables generation 1 kept from the forwarding snapshot" in logs, logs[-3000:]
    return float(st["forwarding_after"])


def flow_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "podrouter.bench.flow", *args]


def test_no_leak_no_route_flap_and_no_loss_across_restarts(ref: ReferenceTopology, daemons: Daemons) -> None:
    n1, ext = ref.nodes["node1"], ref.external
    cfg1 = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", masquerade={"enabled": True})
    d1 = daemons.start(n1, cfg1)
    daemons.start(ref.nodes["node2"], ref_config(ref, "node2", daemons.sockdir, mode="tunnel"))
    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    assert pod1.ping("10.244.2.1", count=2), "pod1 -> pod2 before the restarts"
    assert pod1.ping(ref.EXTERNAL_ADDR, count=2), "pod1 -> outside before the restarts"
    wanted = set(our_routes(n1))
    seconds = 8.0
    # the receivers listen well past the senders' end: starting the captures can take seconds under load
    receivers = {n: seq_receiver(h, seconds + 6) for n, h in (("pod2", pod2), ("ext", ext), ("pod1", pod1))}
    monitor = n1.popen(["ip", "monitor", "route"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    took = []
    try:
        with (
            capture(n1, "eth0", POD_SRC_BPF, count=1000) as underlay,
            capture(ext, "eth0", POD_SRC_BPF, count=1000) as outside,
        ):
            argv = [sys.executable, "-c", UDP_SEQ_SEND, SEQ_PACE, str(seconds)]
            out1 = pod1.popen([*argv, "10.244.2.1", ref.EXTERNAL_ADDR], stdout=subprocess.PIPE)
            back = pod2.popen([*argv, "10.244.1.1"], stdout=subprocess.PIPE)
            time.sleep(1.0)
            d1 = restart(daemons, d1, cfg1, "sigterm", away=0.5)
            took.append(d1.logs())
            assert_forwarded_first(d1)
            time.sleep(1.0)
            d1 = restart(daemons, d1, cfg1, "sigkill", away=0.5)
            took.append(d1.logs())
            assert_forwarded_first(d1)
            sent_out, sent_back = last_int(out1), last_int(back)
    finally:
        monitor.send_signal(signal.SIGINT)
        events, _ = monitor.communicate(timeout=5)
    got = {name: last_int(p) for name, p in receivers.items()}
    assert underlay == [], f"bare pod packets on node1's underlay during the restarts: {underlay[:5]}"
    assert outside == [], f"pod source addresses on the external link during the restarts: {outside[:5]}"
    # both successors started on the fds the keeper held, and nothing was lost meanwhile
    for logs in took:
        assert "took the datapath's fds from the fd keeper" in logs, logs[-3000:]
    assert sent_out > 300 and sent_back > 300, (sent_out, sent_back)
    assert got == {"pod2": sent_out, "ext": sent_out, "pod1": sent_back}, (got, sent_out, sent_back)
    # the config did not change: any deletion of one of podrouter's routes is a flap
    lines = events.decode(errors="replace").splitlines()
    flapped = [ln for ln in lines if ln.startswith("Deleted") and "proto 77" in ln]
    assert flapped == [], f"routes podrouter wants were deleted during the restarts: {flapped}"
    assert set(our_routes(n1)) == wanted
    assert d1.status()["ready"]
    assert pod1.ping("10.244.2.1", count=2) and pod1.ping(ref.EXTERNAL_ADDR, count=2)


# The paths a long-lived pod flow takes in the restart and handover tests.
FLOW_PATHS = pytest.mark.parametrize(
    ("path", "dst_pod", "mode", "protocol"),
    [
        ("native", "pod3", "native", "vxlan"),  # node1 -> node3 on the shared L2
        ("vxlan", "pod2", "tunnel", "vxlan"),  # node1 -> node2 across R
        ("geneve", "pod2", "tunnel", "geneve"),
    ],
)


class PodFlow:
    """node1 and `dst_pod`'s node running, and a paced TCP flow (podrouter.bench.flow) from pod1 to
    `dst_pod` once `send` is called; `finish` asserts every byte arrived on the same connection."""

    def __init__(
        self, ref: ReferenceTopology, daemons: Daemons, dst_pod: str, mode: str, protocol: str
    ) -> None:
        nodes = ("node1", ref.pods[dst_pod].node)
        self.cfgs = {
            n: ref_config(
                ref, n, daemons.sockdir, mode=mode, protocol=protocol, peers=[o for o in nodes if o != n]
            )
            for n in nodes
        }
        self.handles = {n: daemons.start(ref.nodes[n], self.cfgs[n]) for n in nodes}
        self.src: Host = ref.pods["pod1"].host
        self.dst = ref.pods[dst_pod]
        self.srv = self.dst.host.popen(flow_argv("serve", self.dst.ip, "7000"))
        wait_listening(self.dst.host, 7000)
        self.cli: subprocess.Popen[bytes] | None = None

    def send(self, seconds: int) -> None:
        self.cli = self.src.popen(flow_argv("send", self.dst.ip, "7000", str(seconds)))

    def finish(self, across: str) -> dict[str, Any]:
        assert self.cli is not None
        c_out, c_err = self.cli.communicate(timeout=60)
        s_out, _ = self.srv.communicate(timeout=30)
        sent = json.loads(c_out.decode().strip().splitlines()[-1])
        got: dict[str, Any] = json.loads(s_out.decode().strip().splitlines()[-1])
        assert sent["ok"], f"the flow died across the {across}: {sent} {c_err.decode()[-500:]}"
        assert got["ok"] and got["bytes"] == sent["sent"], (got, sent)
        return got


@FLOW_PATHS
def test_tcp_flow_survives_sigterm_and_sigkill(
    ref: ReferenceTopology, daemons: Daemons, path: str, dst_pod: str, mode: str, protocol: str
) -> None:
    flow = PodFlow(ref, daemons, dst_pod, mode, protocol)
    flow.send(7)
    time.sleep(1.5)
    d1 = restart(daemons, flow.handles["node1"], flow.cfgs["node1"], "sigterm", away=0.5)
    fwd = [assert_forwarded_first(d1)]
    time.sleep(1.5)
    d1 = restart(daemons, d1, flow.cfgs["node1"], "sigkill", away=0.5)
    fwd.append(assert_forwarded_first(d1))
    got = flow.finish(f"{path} restarts")
    print(f"{path}: longest stall {got['max_gap_ms']} ms at {got['max_gap_at']} s, forwarding after {fwd} s")
    assert d1.status()["ready"]


def test_start_converges_a_removed_peer_and_cleanup_removes_everything(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel")
    d1 = daemons.start(n1, cfg)
    assert {"10.244.2.0/24", "10.244.3.0/24"} <= set(our_routes(n1))
    assert d1.terminate() == 0
    # the stop contract: everything stays
    assert {"10.244.2.0/24", "10.244.3.0/24", "10.244.1.1"} <= set(our_routes(n1))
    assert "persist on" in n1.run(["ip", "-d", "link", "show", "podr0"])
    assert n1.try_run(["nft", "list", "table", "inet", "podrouter_pods"]).returncode == 0
    state = json.loads(Path(daemons.sockdir / "node1.state.json").read_text())
    assert state["pid"] == 0
    # node3 removed from the config: the next start drops its route, keeps the rest; the VXLAN port
    # changed too, so the fd keeper's sockets do not fit: it lets go of them, the new daemon binds
    cfg2 = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", peers=["node2"])
    cfg2["tunnel"]["port"] = 4790
    d1 = daemons.start(n1, cfg2)
    routes = set(our_routes(n1))
    assert "10.244.2.0/24" in routes and "10.244.3.0/24" not in routes, routes
    logs = d1.logs()
    assert "adopting what the previous daemon (stopped) left" in logs
    # another config file: its forwarding snapshot is refused, the normal start opens the datapath
    assert "forwarding snapshot" in logs and "another version of the config file" in logs, logs[-3000:]
    assert "fds (pid" in logs and "do not fit: vxlan_port" in logs, logs[-3000:]
    assert "fd keeper pid" in logs, logs[-3000:]  # and a new keeper holds this daemon's fds
    udp = n1.run(["ss", "-Huan"])
    assert f"{ref.node_addr['node1']}:4789 " not in udp and ":4790 " in udp, udp
    r = d1.cli("cleanup", "--config", str(d1.config))
    assert r.returncode == 1 and "running" in r.stderr, "cleanup refuses while a daemon runs"
    d1.kill()
    r = d1.cli("cleanup", "--config", str(d1.config))
    assert r.returncode == 0, r.stderr
    assert "removed TUN podr0" in r.stdout and "stopped the fd keeper" in r.stdout, r.stdout
    assert our_routes(n1) == {}
    assert n1.try_run(["ip", "link", "show", "podr0"]).returncode != 0
    assert n1.try_run(["nft", "list", "table", "inet", "podrouter_pods"]).returncode != 0
    r = d1.cli("cleanup", "--config", str(d1.config))
    assert r.returncode == 0 and "nothing to clean up" in r.stdout, r.stdout


def test_leak_guard_drops_unrouted_pod_packets(ref: ReferenceTopology, daemons: Daemons) -> None:
    """The belt under the braces: with the daemon stopped and its TUN gone (deleted by hand: what a
    pre-persistence daemon left), pod packets follow node1's default route; the leak guard in
    `inet podrouter_pods` drops and counts them instead of letting them out untranslated."""
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", masquerade={"enabled": True})
    d1 = daemons.start(n1, cfg)
    assert d1.terminate() == 0
    n1.ip("link del podr0")  # every route into it goes with it (the masquerade default route too)
    assert "10.244.2.0/24" not in our_routes(n1)
    pod1 = ref.pods["pod1"].host
    with capture(n1, "eth0", POD_SRC_BPF) as wire:
        assert not pod1.ping("10.244.2.1", count=3, timeout=1)  # another node's pod
        assert not pod1.ping(ref.EXTERNAL_ADDR, count=3, timeout=1)  # the outside, by the gateway
    assert wire == [], wire[:5]
    table = n1.run(["nft", "list", "table", "inet", "podrouter_pods"])
    counter = table[table.index("counter pod_unrouted") :].splitlines()[1]
    assert "packets 0 " not in counter, table
