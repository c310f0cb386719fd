"""netlink/plumbing.py against a real kernel: routes with per-destination MTUs, reconciliation after
the kernel dropped routes, sysctl bookkeeping, teardown, and cleanup after a killed process.

These run the plumbing inside a node namespace of the reference topology (a TUN made with `ip tuntap`
stands in for the one the datapath creates); the daemon tests cover the same through `podrouter run`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from helpers import our_routes, podrouter_argv, python_in, sysctl_value, write_config

from nettopo import ReferenceTopology

PRELUDE = """
import json, sys
from pathlib import Path
from pyroute2 import IPRoute
from podrouter.netlink.plumbing import Plumbing, RouteSpec, RuleSpec
ipr = IPRoute()
p = Plumbing(ipr, Path(STATE), "node1")
def want(*specs):
    return {s.key: s for s in specs}
"""


def run(ref: ReferenceTopology, state: Path, body: str) -> str:
    code = f"STATE = {str(state)!r}\n" + PRELUDE + body
    r = python_in(ref.nodes["node1"], code)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_routes_are_reconciled_against_the_kernel(ref: ReferenceTopology, tmp_path: Path) -> None:
    n1 = ref.nodes["node1"]
    n1.ip("tuntap add podr0 mode tun")
    n1.ip("link set podr0 up")
    n1.ip("route add 10.99.0.0/24 dev eth0")  # somebody else's route: never touched
    state = tmp_path / "node1.state.json"
    out = run(
        ref,
        state,
        """
errs = p.sync_routes(want(
    RouteSpec("10.244.2.0/24", oif="podr0", mtu=1450),
    RouteSpec("10.244.3.0/24", oif="podr0", mtu=1500),
    RouteSpec("10.244.1.0/24", kind="unreachable"),
    RouteSpec("10.244.1.1/32", oif="veth-pod1", scope_link=True),
    RouteSpec("10.244.1.2/32", oif="veth-missing", scope_link=True),
))
print(json.dumps(errs))
""",
    )
    assert json.loads(out) == ["route 10.244.1.2/32: interface 'veth-missing' does not exist"]
    got = our_routes(n1)
    assert got["10.244.2.0/24"]["dev"] == "podr0" and got["10.244.2.0/24"]["metrics"] == [{"mtu": 1450}]
    assert got["10.244.3.0/24"]["metrics"] == [{"mtu": 1500}]
    assert got["10.244.1.0/24"]["type"] == "unreachable"
    assert got["10.244.1.1"]["dev"] == "veth-pod1" and got["10.244.1.1"]["scope"] == "link"
    assert "10.244.1.2" not in got
    recorded = json.loads(state.read_text())
    assert {r["dst"] for r in recorded["routes"]} >= {"10.244.2.0/24", "10.244.1.1/32"}

    # the kernel drops every route through a device that goes down; the next sync puts them back,
    # changes an MTU in place and removes what is no longer wanted
    n1.ip("link set podr0 down")
    n1.ip("link set podr0 up")
    assert "10.244.2.0/24" not in our_routes(n1)
    run(
        ref,
        state,
        """
p.sync_routes(want(
    RouteSpec("10.244.2.0/24", oif="podr0", mtu=1400),
    RouteSpec("10.244.1.1/32", oif="veth-pod1", scope_link=True),
))
""",
    )
    got = our_routes(n1)
    assert set(got) == {"10.244.2.0/24", "10.244.1.1"}
    assert got["10.244.2.0/24"]["metrics"] == [{"mtu": 1400}]
    assert "10.99.0.0/24 dev eth0" in n1.ip("route show 10.99.0.0/24")


def test_teardown_restores_sysctls_and_removes_routes_and_rules(
    ref: ReferenceTopology, tmp_path: Path
) -> None:
    n1 = ref.nodes["node1"]
    before = {
        k: sysctl_value(n1, k)
        for k in ("net.ipv4.conf.veth-pod1.proxy_arp", "net.ipv4.neigh.veth-pod1.proxy_delay")
    }
    assert before["net.ipv4.conf.veth-pod1.proxy_arp"] == "0"
    state = tmp_path / "node1.state.json"
    run(
        ref,
        state,
        """
p.set_sysctl("net.ipv4.conf.veth-pod1.proxy_arp", 1)
p.set_sysctl("net.ipv4.neigh.veth-pod1.proxy_delay", 0)
p.sync_routes(want(RouteSpec("0.0.0.0/0", oif="eth0", table=77)))
p.sync_rules({RuleSpec(priority=7700, table=254, suppress_prefixlength=0),
              RuleSpec(priority=7701, table=77, src="10.244.1.0/24")})
print(open("/proc/sys/net/ipv4/conf/veth-pod1/proxy_arp").read().strip())
""",
    )
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "1"
    rules = n1.ip("rule show")
    assert "7700:\tfrom all lookup main suppress_prefixlength 0" in rules
    assert "7701:\tfrom 10.244.1.0/24 lookup 77" in rules
    assert "default@77" in our_routes(n1)
    run(
        ref,
        state,
        """
import json as j
rec = j.loads(Path(STATE).read_text())
p.state.sysctls = rec["sysctls"]
p.rules = {RuleSpec(**r) for r in rec["rules"]}
p.teardown()
""",
    )
    assert {k: sysctl_value(n1, k) for k in before} == before
    assert our_routes(n1) == {}
    assert "77" not in n1.ip("rule show")
    assert not state.exists()


def test_cleanup_undoes_a_killed_process(ref: ReferenceTopology, tmp_path: Path) -> None:
    """A process that dies without tearing down (os._exit: no finally, no atexit) leaves routes, rules
    and sysctls behind; `podrouter cleanup --config` removes them using the state file."""
    n1 = ref.nodes["node1"]
    sock = tmp_path / "node1.sock"
    cfg = write_config(
        tmp_path / "node1.yaml",
        {
            "node": {"name": "node1", "pod_cidr": "10.244.1.0/24"},
            "cluster": {"pod_cidr": "10.244.0.0/16"},
            "api": {"socket": str(sock)},
        },
    )
    state = tmp_path / "node1.state.json"
    n1.ip("tuntap add podr0 mode tun")
    n1.ip("link set podr0 up")
    r = python_in(
        n1,
        f"STATE = {str(state)!r}\n"
        + PRELUDE
        + """
p.set_sysctl("net.ipv4.conf.veth-pod1.proxy_arp", 1)
p.sync_routes(want(RouteSpec("10.244.2.0/24", oif="podr0", mtu=1450),
                   RouteSpec("10.244.1.1/32", oif="veth-pod1", scope_link=True)))
p.sync_rules({RuleSpec(priority=7701, table=77, src="10.244.1.0/24")})
import os
os._exit(9)
""",
    )
    assert r.returncode == 9, r.stderr
    assert set(our_routes(n1)) == {"10.244.2.0/24", "10.244.1.1"}
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "1"

    # cleanup from another namespace refuses: the state file names the namespace it was written in
    other = ref.nodes["node3"]
    res = other.try_run([*podrouter_argv(), "cleanup", "--config", str(cfg)])
    assert res.returncode == 1 and "another network namespace" in res.stderr
    assert state.exists()

    res = n1.try_run([*podrouter_argv(), "cleanup", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr
    assert "removed route 10.244.2.0/24" in res.stdout and "removed rule priority 7701" in res.stdout
    assert our_routes(n1) == {}
    assert "7701" not in n1.ip("rule show")
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "0"
    assert not state.exists()
    # a second run has nothing left to do
    res = n1.try_run([*podrouter_argv(), "cleanup", "--config", str(cfg)])
    assert res.returncode == 0 and res.stdout.strip() == "nothing to clean up"


def test_cleanup_without_state_still_removes_proto_77_routes(ref: ReferenceTopology, tmp_path: Path) -> None:
    n1 = ref.nodes["node1"]
    n1.ip("route add 10.244.7.0/24 dev eth0 proto 77")
    n1.ip("route add 10.244.8.0/24 dev eth0 proto static")
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "node": {"name": "node1", "pod_cidr": "10.244.1.0/24"},
            "cluster": {"pod_cidr": "10.244.0.0/16"},
            "api": {"socket": str(tmp_path / "s.sock")},
        },
    )
    res = n1.try_run([*podrouter_argv(), "cleanup", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["removed route 10.244.7.0/24"]
    assert "10.244.8.0/24" in n1.ip("route show")


def test_cli_cleanup_is_not_confused_by_a_bad_state_file(ref: ReferenceTopology, tmp_path: Path) -> None:
    n1 = ref.nodes["node1"]
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "node": {"name": "node1", "pod_cidr": "10.244.1.0/24"},
            "cluster": {"pod_cidr": "10.244.0.0/16"},
            "api": {"socket": str(tmp_path / "s.sock")},
        },
    )
    (tmp_path / "node1.state.json").write_text("{not json")
    res = n1.try_run([*podrouter_argv(), "cleanup", "--config", str(cfg)])
    assert res.returncode == 1
    assert "corrupt state file" in res.stderr and "Traceback" not in res.stderr
    assert isinstance(res, subprocess.CompletedProcess)
