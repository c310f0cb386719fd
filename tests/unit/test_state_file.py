"""The state file is untrusted input (issue 10): a record edited to name a sysctl outside /proc/sys,
a corrupt or oversized file, wrong types or unknown keys are refused before anything is written, and
only the sysctls podrouter itself sets can ever be written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from podrouter import bringup, config, daemon, pods
from podrouter import state as statefile
from podrouter.cli import main
from podrouter.netlink import sysctl


def good_record() -> dict[str, Any]:
    st = statefile.State(
        node="node1", netns="4:4026531840", pid=123, socket="/run/podrouter/x.sock", tun="podr0"
    )
    st.sysctls = {
        "net.ipv4.ip_forward": "0",
        "net.ipv4.conf.all.rp_filter": "1",
        "net.ipv4.conf.veth-pod1.proxy_arp": "0",
        "net.ipv4.neigh.veth-pod1.proxy_delay": "80",
        "net.ipv6.conf.podr0.disable_ipv6": "0",
        "net.ipv4.conf.eth0.100.rp_filter": "1",  # a VLAN device: dots in the interface name
    }
    st.rules = [
        {"priority": 7701, "table": 77, "src": "10.244.1.0/24", "suppress_prefixlength": None, "family": 2}
    ]
    st.routes = [
        {
            "dst": "10.244.2.0/24",
            "kind": "unicast",
            "oif": "podr0",
            "mtu": 1450,
            "table": 254,
            "scope_link": False,
            "label": "vxlan",
        }
    ]
    st.pods = {
        "pod1": {
            "name": "pod1",
            "ip": "10.244.1.1",
            "ips": ["10.244.1.1"],
            "host_interface": "veth-pod1",
            "annotations": {},
            "source": "api",
            # what the CNI plugin's registration adds (docs/cni.md)
            "cni": {"container_id": "0123abcd", "netns": "/run/netns/cni-1", "ifname": "eth0"},
        }
    }
    st.gateways6 = {"veth-pod1": "fe80::1"}
    return json.loads(st.to_json())


def write(tmp_path: Path, data: Any) -> Path:
    p = tmp_path / "node1.state.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_a_record_podrouter_writes_loads_back(tmp_path: Path) -> None:
    rec = good_record()
    st = statefile.load(write(tmp_path, rec))
    assert st is not None and st.sysctls == rec["sysctls"] and st.pods == rec["pods"]
    assert statefile.load(tmp_path / "absent.json") is None


def traversal_key(target: Path) -> str:
    # what issue 10 found: a "sysctl" whose dotted name walks out of /proc/sys
    return "net/../../.." + str(target)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r, t: r["sysctls"].update({traversal_key(t): "1"}), "is not [a-z0-9_]+"),
        (lambda r, t: r["sysctls"].update({"kernel.core_pattern": "1"}), "is not one podrouter sets"),
        (lambda r, t: r["sysctls"].update({"net.ipv4.conf.all.proxy_arp": "1"}), "is not one podrouter sets"),
        (
            lambda r, t: r["sysctls"].update({"net.ipv4.conf.../proxy_arp": "1"}),
            "is not a valid interface name",
        ),
        (
            lambda r, t: r["sysctls"].update({"net.ipv4.conf.averyveryverylongname.rp_filter": "1"}),
            "interface",
        ),
        (lambda r, t: r["sysctls"].update({"net.ipv4.ip_forward": "1; reboot"}), "is not an integer value"),
        (lambda r, t: r["sysctls"].update({"net.ipv4.ip_forward": 1}), "is not an integer value"),
        (lambda r, t: r.update({"sysctls": ["net.ipv4.ip_forward"]}), "is not a mapping"),
        (lambda r, t: r.update({"pid": "123"}), "is not a process id"),
        (lambda r, t: r.update({"evil": 1}), "unknown keys ['evil']"),
        (lambda r, t: r.pop("netns"), "netns: missing"),
        (lambda r, t: r.update({"format": 2}), "format 2"),
        (lambda r, t: r["rules"].append({"priority": 0, "table": 254}), "rules[1].priority"),
        (lambda r, t: r["rules"].append({"priority": 7700, "table": 255}), "rules[1].table"),
        (lambda r, t: r["gateways6"].update({"eth0": "2001:db8::1"}), "pod gateway"),
        (lambda r, t: r["pods"]["pod1"].update({"host_interface": "../../x"}), "interface name"),
        (lambda r, t: r["routes"][0].update({"mtu": "big"}), "routes[0].mtu"),
        (lambda r, t: r["routes"][0].update({"evil": 1}), "is not a route record"),
        (lambda r, t: r["rules"][0].update({"evil": 1}), "is not a rule record"),
        (lambda r, t: r["pods"]["pod1"]["cni"].update({"evil": "x"}), "not a CNI attachment record"),
        (lambda r, t: r.update({"tun": "a/b"}), "tun: 'a/b'"),
    ],
)
def test_tampered_records_are_refused(tmp_path: Path, mutate: Any, needle: str) -> None:
    rec = good_record()
    mutate(rec, tmp_path / "target")
    with pytest.raises(ValueError) as exc:
        statefile.load(write(tmp_path, rec))
    msg = str(exc.value)
    assert msg.startswith(
        f"{tmp_path / 'node1.state.json'}: corrupt state file (refused, nothing was changed): "
    )
    assert needle in msg


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("\xff\xfe", "not JSON"),
        ("[" * 100000, "not JSON"),
    ],
)
def test_corrupt_files_are_refused(tmp_path: Path, content: str, needle: str) -> None:
    with pytest.raises(ValueError, match=r"corrupt state file") as exc:
        statefile.load(write(tmp_path, content))
    assert needle in str(exc.value)


def test_huge_and_non_regular_files_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "node1.state.json"
    with p.open("wb") as f:
        f.truncate(statefile.MAX_BYTES + 10)
    with pytest.raises(ValueError, match="larger than"):
        statefile.load(p)
    p.unlink()
    os.mkfifo(p)  # a reader would block forever on a FIFO nobody writes
    with pytest.raises(ValueError, match="not a regular file"):
        statefile.load(p)
    p.unlink()
    p.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps(good_record()))
    with pytest.raises(ValueError, match="corrupt state file"):
        statefile.load(p)


def test_sysctl_write_refuses_what_podrouter_does_not_set(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("original\n")
    for key in (
        traversal_key(target),
        "kernel.core_pattern",
        "net.ipv4.conf.default.proxy_arp",
        "net.ipv4.tcp_syncookies",
    ):
        with pytest.raises(sysctl.SysctlError):
            sysctl.write(key, 1)
    with pytest.raises(sysctl.SysctlError, match="not an integer"):
        sysctl.write("net.ipv4.ip_forward", "1\nkernel.x=1")
    assert target.read_text() == "original\n"
    assert sysctl.allowed("net.ipv4.conf.veth-pod1.proxy_arp") is None
    assert sysctl.allowed("net.ipv6.conf.podr0.accept_ra") is None
    assert sysctl.key_path("net.ipv4.conf.eth0.100.rp_filter") == Path(
        "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
    )


def test_every_sysctl_the_daemon_sets_is_allowed() -> None:
    """The allow-list is derived from the modules that set sysctls (bringup.py: the node's and podr0's,
    pods.py: each pod's veth): each key they set must pass (or the daemon breaks)."""
    import re

    src = Path(bringup.__file__).read_text() + Path(pods.__file__).read_text()
    knobs = set(
        re.findall(r'sysctl\.(conf|neigh)\((?:[a-z_.]+|TUN_NAME), "([a-z_0-9]+)"(?:, "(ipv[46])")?\)', src)
    )
    assert len(knobs) >= 10, knobs
    for kind, knob, family in knobs:
        key = f"net.{family or 'ipv4'}.{kind}.veth-x.{knob}"
        assert sysctl.allowed(key) is None, key
    for key in re.findall(r'set_sysctl\("([a-z0-9_.]+)"', src):
        assert sysctl.allowed(key) is None, key


def test_cleanup_with_a_traversal_record_writes_nothing(tmp_path: Path) -> None:
    """The issue-10 case end to end: `podrouter cleanup` refuses the record, exit 1, message naming the
    file and the key; the file the record pointed at is untouched (and nothing else is attempted)."""
    target = tmp_path / "target"
    target.write_text("original\n")
    rec = good_record()
    rec["sysctls"] = {traversal_key(target): "0"}
    sock = tmp_path / "node1.sock"
    cfg_path = tmp_path / "node1.yaml"
    cfg_path.write_text(
        "node: {name: node1, pod_cidr: 10.244.1.0/24}\ncluster: {pod_cidr: 10.244.0.0/16}\n"
        f"api: {{socket: '{sock}'}}\n"
    )
    state_path = config.load(cfg_path).state_path
    write(tmp_path, rec)
    assert state_path == tmp_path / "node1.state.json"
    with pytest.raises(daemon.StartError) as exc:
        daemon.cleanup(config.load(cfg_path))
    assert exc.value.code == daemon.EXIT_FAILURE
    result = CliRunner().invoke(main, ["cleanup", "--config", str(cfg_path)])
    assert result.exit_code == 1
    assert str(state_path) in result.output and "is not [a-z0-9_]+" in result.output
    assert target.read_text() == "original\n"
    assert state_path.exists()  # kept for inspection
