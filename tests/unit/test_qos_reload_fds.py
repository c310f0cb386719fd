"""Issue 10: a bandwidth reload must not leak the netlink socket of the manager it replaces.

The daemon's own reload path (`PodRegistry.restart_bandwidth`) is driven N times with no pods, which opens
and closes netlink sockets but programs nothing; the process's open file descriptors are counted
before and after.
"""

from __future__ import annotations

import os

from podrouter import config, daemon, pods

CFG = """
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
bandwidth: {node_egress_rate: 1G}
"""


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bandwidth_reload_does_not_leak_a_netlink_socket() -> None:
    d = daemon.Daemon(config.loads(CFG))
    d.pods.bandwidth = pods.make_bandwidth(d.cfg)
    assert d.pods.bandwidth is not None
    d.pods.restart_bandwidth(d.cfg)  # warm up whatever pyroute2 opens once per process
    before = _open_fds()
    for _ in range(20):
        d.pods.restart_bandwidth(d.cfg)
    after = _open_fds()
    assert d.pods.bandwidth is not None
    d.pods.bandwidth.close()
    assert after - before < 5, f"{after - before} file descriptors leaked by 20 reloads"
