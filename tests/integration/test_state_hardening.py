"""A tampered state file in a node's namespace (issue 10): `podrouter cleanup` refuses it and changes
nothing (not the file a traversal "sysctl" points at, not the routes, not the sysctls); a daemon
starting over it moves it aside, undoes nothing from it, and runs normally."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import Daemons, our_routes, podrouter_argv, python_in, ref_config, sysctl_value, write_config

from nettopo import ReferenceTopology
from podrouter import state as statefile


def tampered_record(target: Path, netns_of: str) -> dict:
    return {
        "format": 1,
        "node": "node1",
        "netns": netns_of,
        "pid": 0,
        "socket": None,
        "tun": "podr0",
        "routes": [],
        "rules": [],
        # a legitimate entry next to the hostile one: one bad entry refuses the whole record
        "sysctls": {"net.ipv4.conf.veth-pod1.proxy_arp": "1", "net/../../.." + str(target): "0"},
        "pods": {},
        "gateways6": {},
        "nft_guard": False,
    }


def netns_id_in(host) -> str:  # type: ignore[no-untyped-def]
    out = host.run(["stat", "-L", "-c", "%d:%i", "/proc/self/ns/net"]).strip()
    return out


def test_cleanup_refuses_a_tampered_record_and_changes_nothing(
    ref: ReferenceTopology, tmp_path: Path
) -> None:
    n1 = ref.nodes["node1"]
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    cfg = write_config(
        tmp_path / "node1.yaml",
        {
            "node": {"name": "node1", "pod_cidr": "10.244.1.0/24"},
            "cluster": {"pod_cidr": "10.244.0.0/16"},
            "api": {"socket": str(tmp_path / "node1.sock")},
        },
    )
    state = tmp_path / "node1.state.json"
    state.write_text(json.dumps(tampered_record(target, netns_id_in(n1))))
    n1.ip("route add 10.244.7.0/24 dev eth0 proto 77")  # a leftover cleanup would otherwise remove
    n1.run(["sysctl", "-qw", "net.ipv4.conf.veth-pod1.proxy_arp=0"])

    res = n1.try_run([*podrouter_argv(), "cleanup", "--config", str(cfg)])
    assert res.returncode == 1, res.stdout + res.stderr
    assert str(state) in res.stderr and "corrupt state file (refused, nothing was changed)" in res.stderr
    assert "Traceback" not in res.stderr
    assert target.read_text() == "precious\n"
    assert "10.244.7.0/24" in our_routes(n1)
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "0"
    assert state.exists()


def test_daemon_start_sets_a_tampered_record_aside(
    ref: ReferenceTopology, daemons: Daemons, tmp_path: Path
) -> None:
    n1 = ref.nodes["node1"]
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    cfg = ref_config(ref, "node1", daemons.sockdir, peers=["node2"])
    state = Path(cfg["api"]["socket"]).parent / "node1.state.json"
    state.write_text(json.dumps(tampered_record(target, netns_id_in(n1))))
    d = daemons.start(n1, cfg)
    assert target.read_text() == "precious\n"
    aside = state.with_name(state.name + ".refused")
    assert aside.exists() and "net/../../.." in aside.read_text()
    assert "corrupt state file" in d.logs() and "moved to" in d.logs()
    assert d.status()["ready"] and "10.244.2.0/24" in our_routes(n1)  # the node runs normally
    # a pod registered the way the CNI plugin does it (its attachment is recorded too)
    n1.ip("link add veth-cni type veth peer name veth-cni-p")
    n1.ip("link set veth-cni up")
    pod = {"name": "cnipod", "ip": "10.244.1.77", "host_interface": "veth-cni"}
    cni = {"container_id": "c0ffee01", "netns": "/run/netns/x", "ifname": "eth0"}
    r = python_in(
        n1,
        "from podrouter import api\n"
        f"print(api.request({d.socket!r}, {{'op': 'pod_add', 'pod': {pod!r}, 'cni': {cni!r}}}))",
    )
    assert r.returncode == 0 and "'ok': True" in r.stdout, r.stdout + r.stderr
    recorded = json.loads(state.read_text())  # the daemon's own record replaced it
    assert recorded["pid"] == d.proc.pid and all("/" not in k for k in recorded["sysctls"])
    # and what the daemon writes passes the validation cleanup applies (the schema cannot drift)
    loaded = statefile.load(state)
    assert (
        loaded is not None
        and loaded.sysctls == recorded["sysctls"]
        and set(loaded.pods) == {"pod1", "cnipod"}
    )
    assert loaded.pods["cnipod"]["cni"] == cni
    code, _ = d.stop()
    assert code == 0
    assert target.read_text() == "precious\n"
