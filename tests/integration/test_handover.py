"""Zero-gap handover (docs/handover.md): `podrouter run --handover`, started while the old daemon
forwards, takes its TUN queues and sockets over the API socket and the old daemon exits 0.

* flows survive: a long-lived TCP flow over native, VXLAN and Geneve, and a masqueraded one to the
  external host, keep their connection and every byte across a handover (their longest stall is
  measured by `podrouter bench --only restart`, kind `handover`); the masqueraded connection keeps
  its node port and the external host sees no RST;
* the successor serves status and metrics, the old daemon exits 0;
* a refused handover (a config that does not fit, or a successor that refuses the fds) leaves the
  old daemon forwarding.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, ref_config, wait_for, wait_listening, wait_ready
from test_masquerade import EXT, NODE, PORT, masq_config, metric, metrics, start_server
from test_nat_persist import Client, server_peers
from test_restart import FLOW_PATHS, PodFlow, flow_argv

from nettopo import Host, ReferenceTopology, capture

pytestmark = pytest.mark.integration


def handover(daemons: Daemons, old: DaemonHandle, cfg: dict[str, Any]) -> DaemonHandle:
    """Start a successor with --handover; wait until the old daemon exits (0) and the new one is ready."""
    new = daemons.start(old.host, cfg, extra_args=("--log-level", "debug", "--handover"))
    # `start` returned as soon as the socket answered: that may still be the old daemon
    try:
        code = old.proc.wait(timeout=60)
    except Exception:
        raise AssertionError(
            f"the old daemon did not exit:\n{old.logs()[-3000:]}\n{new.logs()[-3000:]}"
        ) from None
    assert code == 0, old.logs()[-3000:]
    wait_ready(new, 30)
    st = new.status()
    assert st["pid"] == new.proc.pid
    # forwarding (the take-over) before ready (the rest of the start: API socket, metrics, keeper)
    assert 0 < st["forwarding_after"] < st["ready_after"], (st["forwarding_after"], st["ready_after"])
    assert "took the datapath over" in new.logs(), new.logs()[-3000:]
    assert "handed over to pid" in old.logs(), old.logs()[-3000:]
    for line in (*old.logs().splitlines(), *new.logs().splitlines()):
        if "handed over to pid" in line or "took the datapath over" in line:
            print(line.split(" INFO ")[-1])
    return new


def tcp_retransmissions(host: Host) -> int:
    out = host.run(["nstat", "-az", "TcpRetransSegs"])
    return int(out.split("TcpRetransSegs")[1].split()[0])


@FLOW_PATHS
def test_tcp_flow_survives_a_handover(
    ref: ReferenceTopology, daemons: Daemons, path: str, dst_pod: str, mode: str, protocol: str
) -> None:
    flow = PodFlow(ref, daemons, dst_pod, mode, protocol)
    retrans0 = tcp_retransmissions(flow.src)
    flow.send(6)
    time.sleep(1.5)
    d1 = handover(daemons, flow.handles["node1"], flow.cfgs["node1"])
    time.sleep(0.5)
    d1 = handover(daemons, d1, flow.cfgs["node1"])  # and once more, from a daemon that took over itself
    got = flow.finish(f"{path} handovers")
    print(
        f"{path}: longest stall {got['max_gap_ms']} ms at {got['max_gap_at']} s, "
        f"{tcp_retransmissions(flow.src) - retrans0} TCP retransmissions"
    )
    assert d1.status()["ready"]
    assert d1.counters()["workers"] >= 1


def test_masqueraded_flow_keeps_its_node_port_across_a_handover(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1, ext, pod = ref.nodes["node1"], ref.external, ref.pods["pod1"].host
    start_server(ext, seconds=120)
    cfg = masq_config(ref, daemons)
    d = daemons.start(n1, cfg)
    client = Client(pod)
    srv = ext.popen(flow_argv("serve", EXT, "7001"))
    wait_listening(ext, 7001)
    try:
        node_ip, node_port = client.seen
        assert node_ip == NODE
        tuple_ = f"{NODE}:{node_port}"
        assert client.echo("first").get("ok") == "first"
        with capture(
            ext, "eth0", f"(tcp port {PORT} or tcp port 7001) and tcp[tcpflags] & tcp-rst != 0"
        ) as rsts:
            flow = pod.popen(flow_argv("send", EXT, "7001", "5"))
            time.sleep(1.5)
            d = handover(daemons, d, cfg)
            reply = client.echo("after-handover")
            assert reply.get("ok") == "after-handover", (reply, d.logs()[-3000:])
            # the same 4-tuple: the external host's connection still has its node port
            assert server_peers(ext) == [tuple_]
            f_out, f_err = flow.communicate(timeout=60)
            s_out, _ = srv.communicate(timeout=30)
        sent = json.loads(f_out.decode().strip().splitlines()[-1])
        got = json.loads(s_out.decode().strip().splitlines()[-1])
        assert sent["ok"], f"the masqueraded flow died across the handover: {sent} {f_err.decode()[-500:]}"
        assert got["ok"] and got["bytes"] == sent["sent"], (got, sent)
        print(f"masquerade: longest stall {got['max_gap_ms']} ms at {got['max_gap_at']} s")
        assert rsts == [], rsts
        # the successor serves the API and the metrics port the old daemon released
        st = d.counters()["nat_snapshot"]
        assert st["loaded"] is not None and st["loaded"]["restored"] >= 2, st
        assert metric(metrics(n1), "podrouter_nat_entries") >= 2
    finally:
        client.close()


def test_a_mismatched_handover_is_refused_and_the_old_daemon_keeps_forwarding(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel")
    d = daemons.start(n1, cfg)
    daemons.start(ref.nodes["node2"], ref_config(ref, "node2", daemons.sockdir, mode="tunnel"))
    pod1 = ref.pods["pod1"].host
    assert pod1.ping("10.244.2.1", count=2)
    other = copy.deepcopy(cfg)
    other["tunnel"]["port"] = 4790
    from helpers import podrouter_argv, write_config

    path = write_config(daemons.cfgdir / "node1-mismatch.yaml", other)
    r = n1.try_run([*podrouter_argv(), "run", "--config", str(path), "--handover"], timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "vxlan_port" in r.stderr and "4790" in r.stderr, r.stderr
    assert d.alive() and d.status()["ready"]
    assert pod1.ping("10.244.2.1", count=2), "the old daemon stopped forwarding"


# A successor that takes the fds and then refuses them (what a failed check in Datapath.adopt does).
REFUSING_CLIENT = r"""
import json, os, socket, sys
path, expect = sys.argv[1], json.loads(sys.argv[2])
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.settimeout(10)
c.connect(path)
c.sendall(json.dumps({"op": "handover", "version": 1, "expect": expect}).encode() + b"\n")
msg, fds, _, _ = socket.recv_fds(c, 65536, 253)
manifest = json.loads(msg.split(b"\n")[0])
for fd in fds:
    os.close(fd)
c.sendall(json.dumps({"ok": False, "error": "refused by the test"}).encode() + b"\n")
print(json.dumps({"fds": len(fds), "tun": len(manifest["tun"])}))
"""


def test_a_successor_that_refuses_the_fds_leaves_the_old_daemon_forwarding(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol="geneve", peers=["node2"])
    d = daemons.start(n1, cfg)
    daemons.start(
        ref.nodes["node2"], ref_config(ref, "node2", daemons.sockdir, mode="tunnel", protocol="geneve")
    )
    src, dst = ref.pods["pod1"].host, ref.pods["pod2"]
    srv = dst.host.popen(flow_argv("serve", dst.ip, "7002"))
    wait_listening(dst.host, 7002)
    cli = src.popen(flow_argv("send", dst.ip, "7002", "4"))
    time.sleep(1.0)
    st = d.status()
    expect = {
        "node": "node1",
        "tun_name": "podr0",
        "workers": st["counters"]["workers"],
        "vxlan_port": 4789,
        "geneve_port": 6081,
        "underlay_address": ref.node_addr["node1"],
        "underlay_address6": None,
        "underlay_ifindex": int(json.loads(n1.ip("-j link show eth0"))[0]["ifindex"]),
    }
    out = n1.run([sys.executable, "-c", REFUSING_CLIENT, d.socket, json.dumps(expect)])
    got_fds = json.loads(out.strip().splitlines()[-1])
    assert got_fds["tun"] == expect["workers"] and got_fds["fds"] > got_fds["tun"], got_fds
    wait_for(lambda: "forwarding resumed" in d.logs(), 10, what="the old daemon resuming")
    c_out, c_err = cli.communicate(timeout=60)
    s_out, _ = srv.communicate(timeout=30)
    sent = json.loads(c_out.decode().strip().splitlines()[-1])
    got = json.loads(s_out.decode().strip().splitlines()[-1])
    assert sent["ok"] and got["ok"] and got["bytes"] == sent["sent"], (sent, got, c_err.decode()[-500:])
    assert d.alive() and d.status()["ready"]
    assert d.status()["pid"] == d.proc.pid
