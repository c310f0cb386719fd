"""The stop contract without a kernel (lifecycle.py, Daemon.shutdown(keep=True))."""

from __future__ import annotations

from pathlib import Path

import pytest

from podrouter import config, daemon, lifecycle, nftables
from podrouter import state as statefile
from podrouter.netlink.plumbing import Plumbing, RouteSpec, RuleSpec
from recorder import Recorder

CFG = """
node: {name: node1, address: 172.16.2.2, pod_cidr: 10.244.1.0/24}
cluster: {pod_cidr: 10.244.0.0/16}
masquerade: {enabled: true}
pods:
  - {name: cfgpod, ip: 10.244.1.9, host_interface: veth-cfg}
"""


def test_stop_for_a_successor_removes_nothing_and_marks_the_record_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    d = daemon.Daemon(config.loads(CFG))
    d.datapath = Recorder("datapath", calls)
    d.pods.bandwidth = Recorder("bandwidth", calls)
    d.discovery = Recorder("discovery", calls)
    d.plumbing = Recorder("plumbing", calls, state=Recorder("state", calls, nft_guard=True))
    d.pod_guard_key = ("x",)
    for fn in ("remove_guard", "remove_pod_guard"):
        monkeypatch.setattr(nftables, fn, lambda fn=fn: calls.append(f"nftables.{fn}"))
    monkeypatch.setattr(lifecycle, "mark_stopped", lambda p: calls.append("mark_stopped"))
    d.shutdown(keep=True)
    assert "discovery.stop{'revoke': False}" in calls, calls
    assert not [c for c in calls if c.startswith("nftables.") or c == "plumbing.teardown"], calls
    assert "bandwidth.detach" in calls and "bandwidth.close" not in calls
    # the record says "stopped" only once the TUN queues are closed (a successor attaches then)
    assert calls.index("datapath.stop") < calls.index("datapath.close") < calls.index("mark_stopped"), calls
    assert calls[-1] == "mark_stopped"


def test_adopt_takes_the_record_over(tmp_path: Path) -> None:
    rec = statefile.State(
        node="node1",
        netns="1:2",
        pid=0,
        routes=[{"dst": "10.244.2.0/24", "oif": "podr0", "mtu": 1450, "label": "vxlan"}],
        rules=[{"priority": 7701, "table": 77, "src": "10.244.1.0/24"}],
        sysctls={"net.ipv4.ip_forward": "0"},
        nft_guard=True,
    )
    p = Plumbing(None, tmp_path / "s.json", "node1")  # type: ignore[arg-type]
    lifecycle.adopt(p, rec)
    assert p.state.sysctls == {"net.ipv4.ip_forward": "0"}  # the node's own value, not the predecessor's
    assert p.state.nft_guard
    assert set(p.routes) == {(254, "10.244.2.0/24")}
    want = RouteSpec(dst="10.244.2.0/24", oif="podr0", mtu=1450, label="vxlan")
    assert p.routes[(254, "10.244.2.0/24")] == want
    assert p.rules == {RuleSpec(priority=7701, table=77, src="10.244.1.0/24")}
    saved = statefile.load(tmp_path / "s.json")
    assert saved is not None and saved.routes == [dict(p.routes[(254, "10.244.2.0/24")].__dict__)]


def test_recorded_api_pods_are_validated_again() -> None:
    cfg = config.loads(CFG)
    rec = statefile.State(
        node="node1",
        netns="1:2",
        pid=0,
        pods={
            "web": {
                "name": "web",
                "ip": "10.244.1.5",
                "ips": ["10.244.1.5"],
                "host_interface": "veth-web",
                "annotations": {},
                "source": "api",
                "cni": {"container_id": "c1", "netns": "/run/netns/x", "ifname": "eth0"},
            },
            # outside this node's pod CIDR: refused (the record is untrusted input)
            "evil": {"name": "evil", "ip": "10.9.9.9", "host_interface": "veth-evil", "source": "api"},
            # pods of the config come from the config
            "cfgpod": {"name": "cfgpod", "ip": "10.244.1.9", "host_interface": "veth-cfg", "source": "api"},
            "old": {"name": "old", "ip": "10.244.1.7", "host_interface": "veth-old", "source": "config"},
        },
    )
    got = lifecycle.recorded_api_pods(rec, cfg)
    assert [(p.name, str(p.ip), p.host_interface) for p, _ in got] == [("web", "10.244.1.5", "veth-web")]
    assert got[0][1] == {"container_id": "c1", "netns": "/run/netns/x", "ifname": "eth0"}
