"""End to end: a runtime's ADD/DEL through podrouter-cni against a real `podrouter run` daemon.

The node namespace runs the daemon (bandwidth shaping on); the plugin registers the pod over the
daemon's real API socket with the runtime's bandwidth; the daemon's bandwidth manager shapes it;
`podrouter status` shows the pod's limits and tc counters; DEL removes the pod and its tc state.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from helpers import Daemons  # noqa: E402
from test_cni import invoke, netconf, sandbox  # noqa: E402

from nettopo import Topology  # noqa: E402
from podrouter.cni import host_ifname  # noqa: E402
from qos.lab import NODE_SINK_ADDR, SINK_ADDR, Lab, measure, tc  # noqa: E402


def _pods(d: Any) -> dict[str, Any]:
    pods = d.status()["pods"]
    return {p["name"]: p for p in pods} if isinstance(pods, list) else dict(pods)


def _sent(host: Any, klass: str) -> int:
    """Bytes sent by one class of the node's IFB, from `tc -s` (the daemon's status is a snapshot)."""
    out = tc(host, "-s class show dev podr-e2e0")
    m = re.search(rf"class htb {re.escape(klass)} .*?\n Sent (\d+) bytes", out)
    assert m, out
    return int(m.group(1))


def test_cni_with_real_daemon(topo: Topology, daemons: Daemons, tmp_path: Path) -> None:
    lab = Lab(topo)
    sock = str(daemons.sockdir / "node.sock")
    cfg = {
        "node": {"name": "node", "address": NODE_SINK_ADDR, "interface": "eth0", "pod_cidr": "10.244.1.0/24"},
        "cluster": {"pod_cidr": "10.244.0.0/16"},
        "routing": {"mode": "tunnel"},
        "masquerade": {"enabled": False},
        "peers": [],
        "bandwidth": {"enabled": True, "node_egress_rate": "10G", "ifb_name": "podr-e2e0"},
        "api": {"socket": sock},
        "metrics": {"listen": "127.0.0.1:9965"},
    }
    # info, not debug: at debug pyroute2 logs every netlink message, and a test that does not drain
    # the daemon's stderr pipe would block the daemon once the pipe is full
    d = daemons.start(lab.node, cfg, extra_args=("--log-level", "info"))
    pod, netns = sandbox(topo, "c9")
    conf = netconf(tmp_path, sock, bandwidth={"egressRate": 20_000_000, "egressBurst": 4294967295})
    rc, result = invoke(lab.node, "ADD", conf, "c9", netns)
    assert rc == 0, (result, d.logs()[-3000:])
    host_if = host_ifname("c9", "eth0")
    entry = _pods(d)["default.c9"]
    assert entry["host_interface"] == host_if
    assert entry["shaping"]["egress_bps"] == 20_000_000 and entry["shaping"]["error"] is None
    assert pod.ping(SINK_ADDR)
    # The shaper's own output rate, from the daemon's status (L2 bytes of the pod's class) over a
    # steady window of a saturating flow. Goodput at the sink also depends on the daemon's datapath
    # for non-cluster destinations, which is not what this test is about.
    load = threading.Thread(target=measure, args=(pod, lab.sink, SINK_ADDR, 5, 5401))
    load.start()
    try:
        time.sleep(2)
        b0, t0 = _sent(lab.node, entry["shaping"]["egress_class"]), time.monotonic()
        time.sleep(2)
        b1, t1 = _sent(lab.node, entry["shaping"]["egress_class"]), time.monotonic()
    finally:
        load.join(timeout=60)
    assert (b1 - b0) * 8 / (t1 - t0) == pytest.approx(20e6, rel=0.05)
    assert "ceil 20Mbit" in tc(lab.node, "class show dev podr-e2e0")
    rc, out = invoke(lab.node, "CHECK", {**conf, "prevResult": result}, "c9", netns)
    assert (rc, out) == (0, None)
    rc, out = invoke(lab.node, "DEL", conf, "c9", netns)
    assert (rc, out) == (0, None)
    assert "default.c9" not in _pods(d)
    assert "ceil 20Mbit" not in tc(lab.node, "class show dev podr-e2e0")
    assert host_if not in lab.node.ip("link show")


def test_late_del_of_a_predecessor_keeps_the_successor(
    topo: Topology, daemons: Daemons, tmp_path: Path
) -> None:
    """A pod name handed to a new sandbox: the runtime's late DEL of the old one must not remove it."""
    lab = Lab(topo)
    sock = str(daemons.sockdir / "node.sock")
    cfg = {
        "node": {"name": "node", "address": NODE_SINK_ADDR, "interface": "eth0", "pod_cidr": "10.244.1.0/24"},
        "cluster": {"pod_cidr": "10.244.0.0/16"},
        "routing": {"mode": "tunnel"},
        "masquerade": {"enabled": False},
        "peers": [],
        "api": {"socket": sock},
        "metrics": {"listen": "127.0.0.1:9965"},
    }
    d = daemons.start(lab.node, cfg, extra_args=("--log-level", "info"))
    conf = netconf(tmp_path, sock)
    same_name = {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"}
    _old_host, old_ns = sandbox(topo, "s1")
    rc, _ = invoke(lab.node, "ADD", conf, "sandbox-old", old_ns, env_extra=same_name)
    assert rc == 0
    assert _pods(d)["default.web"]["cni"]["container_id"] == "sandbox-old"
    new_host, new_ns = sandbox(topo, "s2")
    rc, result = invoke(lab.node, "ADD", conf, "sandbox-new", new_ns, env_extra=same_name)
    assert rc == 0, result
    entry = _pods(d)["default.web"]
    assert entry["cni"] == {"container_id": "sandbox-new", "netns": new_ns, "ifname": "eth0"}
    assert entry["host_interface"] == host_ifname("sandbox-new", "eth0")
    # the late DEL of the old sandbox: succeeds (DEL is idempotent) and leaves the successor alone
    assert invoke(lab.node, "DEL", conf, "sandbox-old", "", env_extra=same_name) == (0, None)
    entry = _pods(d)["default.web"]
    assert entry["cni"]["container_id"] == "sandbox-new"
    assert f"{entry['ip']} dev {entry['host_interface']}" in lab.node.ip("route show")
    assert host_ifname("sandbox-old", "eth0") not in lab.node.ip("link show")
    assert new_host.ping(SINK_ADDR)
    rc, out = invoke(
        lab.node, "CHECK", {**conf, "prevResult": result}, "sandbox-new", new_ns, env_extra=same_name
    )
    assert (rc, out) == (0, None)
    # the successor's own DEL removes it
    assert invoke(lab.node, "DEL", conf, "sandbox-new", new_ns, env_extra=same_name) == (0, None)
    assert "default.web" not in _pods(d)
