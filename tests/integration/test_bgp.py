"""BGP export of pod CIDRs through BIRD 2 (docs/bgp.md) against a real router: R of the reference
topology runs BIRD as the fabric router (eBGP to every node, what they announce goes into R's kernel
table). With BGP, routing.mode native crosses R: pod addresses on the wire, no tunnel port. R's
table shows each pod CIDR via its node; a daemon restart does not flap R's routes (graceful
restart); a stopped-and-cleaned node's prefix is withdrawn. Dual-stack pods: the IPv6 pod CIDRs go
over the same IPv4 sessions (ipv6 channel) with the node's link-local next hop, and native IPv6
crosses R the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import Daemons, podrouter_argv, python_in, ref_config, wait_for
from test_paths import iperf

from nettopo import ReferenceTopology, capture
from podrouter.demo.fabric import NODE_ASN, Fabric, node_bgp, start_fabric

R_ADDR = {"node1": "172.16.2.1", "node2": "172.16.3.1", "node3": "172.16.2.1"}
POD6 = {"pod1": "fd00:10:244:1::1", "pod2": "fd00:10:244:2::1"}
# R's side of each node's link: node1 hangs off the bridge br0, node2 off p-node2
R_LINK = {"node1": "br0", "node2": "p-node2"}


@pytest.fixture
def fabric(ref: ReferenceTopology, daemons: Daemons) -> Iterator[Fabric]:
    f = start_fabric(
        ref.router,
        daemons.sockdir / "r",
        "172.16.2.1",
        {ref.node_addr[n]: NODE_ASN for n in ("node1", "node2")},
    )
    try:
        yield f
    finally:
        f.stop()


def bgp_cfg(
    ref: ReferenceTopology, node: str, sockdir: Path, dual_stack: bool = False, **bgp: object
) -> dict:
    return ref_config(
        ref,
        node,
        sockdir,
        mode="native",
        peers=[n for n in ("node1", "node2") if n != node],
        bgp=node_bgp(R_ADDR[node], **bgp),
        dual_stack=dual_stack,
    )


def link_local(ref: ReferenceTopology, node: str) -> str:
    """The node's fe80:: address on its underlay link (eth0), once DAD is done."""

    def get() -> str | None:
        out = json.loads(ref.nodes[node].ip("-6 -j addr show dev eth0 scope link") or "[]")
        addrs = [a for i in out for a in i.get("addr_info", []) if not a.get("tentative")]
        return addrs[0]["local"] if addrs else None

    return str(wait_for(get, 10, what=f"{node}'s link-local address"))


def bird_pids(ctl: str) -> list[int]:
    """Processes whose command line names this control socket (a node's bird)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if ctl.encode() in argv and any(a.endswith(b"bird") for a in argv[:2]):
                out.append(int(d.name))
    return out


def metrics_text(ref: ReferenceTopology, node: str) -> str:
    code = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9965/metrics', timeout=5).read().decode())"
    )
    r = python_in(ref.nodes[node], code)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_native_across_router_via_bgp(ref: ReferenceTopology, daemons: Daemons, fabric: Fabric) -> None:
    # without BGP R knows no pod CIDR: native pod1 -> pod2 dies at R
    assert fabric.routes() == {}
    d1 = daemons.start(ref.nodes["node1"], bgp_cfg(ref, "node1", daemons.sockdir, graceful_restart_time=60))
    d2 = daemons.start(ref.nodes["node2"], bgp_cfg(ref, "node2", daemons.sockdir, graceful_restart_time=60))
    fabric.wait_routes({"10.244.1.0/24": "172.16.2.2", "10.244.2.0/24": "172.16.3.2"})

    st = wait_for(lambda: (s := d1.status())["bgp"]["sessions"][0]["up"] and s, 20, what="node1's session up")
    b = st["bgp"]
    assert b["asn"] == NODE_ASN and b["router_id"] == "172.16.2.2"
    assert b["prefixes"] == ["10.244.1.0/24"] and b["announced_prefixes"] == 1
    assert b["sessions"][0]["peer"] == "172.16.2.1" and b["sessions"][0]["state"] == "Established"
    text = metrics_text(ref, "node1")
    assert 'podrouter_bgp_session_up{peer="172.16.2.1"} 1.0' in text
    assert "podrouter_bgp_announced_prefixes 1.0" in text
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # native across R: the pods' own addresses on R's wire towards node2, no tunnel port
    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"]
    with capture(ref.router, "p-node2", "ip") as lines:
        assert pod1.ping(pod2.ip, count=3)
    assert any("10.244.1.1 > 10.244.2.1: ICMP echo request" in ln for ln in lines), lines
    assert any("10.244.2.1 > 10.244.1.1: ICMP echo reply" in ln for ln in lines), lines
    assert not any(".4789" in ln or ".6081" in ln for ln in lines), lines
    # TCP as well
    srv = pod2.host.popen(
        ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        r = pod1.try_run(["iperf3", "-c", pod2.ip, "-p", "5201", "-t", "1", "-J"], timeout=20)
        assert r.returncode == 0, r.stdout[-2000:]
    finally:
        srv.kill()
        srv.wait(timeout=5)

    # BIRD dies under a running daemon: the daemon starts it again and the session comes back
    (pid,) = bird_pids(str(daemons.sockdir / "node1.bird.ctl"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: fabric.sessions()["172.16.2.2"] != "Established", 10, what="R sees node1's bird gone")
    wait_for(lambda: fabric.sessions()["172.16.2.2"] == "Established", 20, what="node1's bird back")
    assert "starting it again" in d1.logs()
    assert fabric.routes().get("10.244.1.0/24") == "172.16.2.2"

    # SIGHUP with a changed pod CIDR: the old prefix is withdrawn, the new one announced, the
    # session stays up
    cfg = yaml.safe_load(d1.config.read_text())
    cfg["node"]["pod_cidr"] = "10.244.1.0/25"
    d1.config.write_text(yaml.safe_dump(cfg))
    d1.signal(signal.SIGHUP)
    fabric.wait_routes({"10.244.1.0/24": None, "10.244.1.0/25": "172.16.2.2", "10.244.2.0/24": "172.16.3.2"})
    assert d1.status()["bgp"]["prefixes"] == ["10.244.1.0/25"]
    assert fabric.sessions()["172.16.2.2"] == "Established"

    # a crash (SIGKILL): node2's bird dies with its daemon (parent-death signal), and R keeps
    # node2's prefix for the graceful-restart window instead of dropping it
    ctl = str(daemons.sockdir / "node2.bird.ctl")
    assert bird_pids(ctl), "node2's bird is not running"
    d2.kill()
    wait_for(lambda: not bird_pids(ctl), 5, what="node2's bird gone with its daemon")
    wait_for(lambda: fabric.sessions()["172.16.3.2"] != "Established", 10, what="R sees node2 gone")
    assert fabric.routes().get("10.244.2.0/24") == "172.16.3.2"


def test_restart_keeps_routes_and_cleanup_withdraws(
    ref: ReferenceTopology, daemons: Daemons, fabric: Fabric
) -> None:
    cfg1 = bgp_cfg(ref, "node1", daemons.sockdir, graceful_restart_time=60)
    d1 = daemons.start(ref.nodes["node1"], cfg1)
    d2 = daemons.start(ref.nodes["node2"], bgp_cfg(ref, "node2", daemons.sockdir, graceful_restart_time=60))
    want = {"10.244.1.0/24": "172.16.2.2", "10.244.2.0/24": "172.16.3.2"}
    fabric.wait_routes(want)
    wait_for(lambda: d1.status()["bgp"]["announced_prefixes"] == 1, 20, what="node1 announcing")

    # restart node1's daemon while R's route table is watched: no deletion of node1's prefix
    mon = ref.router.popen(
        ["ip", "-o", "monitor", "route"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        code, logs = d1.stop(cleanup=False)  # a restart: the state (and the prefix) stays
        assert code == 0, logs[-2000:]
        assert "graceful restart" in logs
        # the session is gone, the route stays (stale) for the restart window
        wait_for(lambda: fabric.sessions()["172.16.2.2"] != "Established", 10, what="R sees node1 gone")
        assert fabric.routes().get("10.244.1.0/24") == "172.16.2.2"
        d1 = daemons.start(ref.nodes["node1"], cfg1)
        wait_for(lambda: fabric.sessions()["172.16.2.2"] == "Established", 20, what="session back")
        wait_for(lambda: d1.status()["bgp"]["announced_prefixes"] == 1, 20, what="node1 announcing again")
        time.sleep(1.0)
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=5)
    events = out.decode(errors="replace").splitlines()
    assert not [e for e in events if "10.244.1.0/24" in e and e.startswith("Deleted")], events
    assert fabric.routes() == want
    assert ref.pods["pod1"].host.ping(ref.pods["pod2"].ip)

    # stopped and cleaned: the prefix leaves R's table at once, not after the restart window
    code, _ = d1.stop(cleanup=False)
    assert code == 0
    r = d1.cli("cleanup", "--config", str(d1.config), timeout=40)
    assert r.returncode == 0, r.stderr
    assert "withdrew this node's prefixes from 172.16.2.1" in r.stdout, r.stdout
    fabric.wait_routes({"10.244.1.0/24": None, "10.244.2.0/24": "172.16.3.2"}, timeout=10)
    assert d2.alive()

    # R's speaker stopped: R refuses node2's connection, and cleanup says so at once instead of
    # waiting out its 15 s for a session that cannot come up
    fabric.stop()
    code, _ = d2.stop(cleanup=False)
    assert code == 0
    t0 = time.monotonic()
    r = d2.cli("cleanup", "--config", str(d2.config), timeout=40)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert "172.16.3.1 refused the connection" in r.stdout, r.stdout
    assert took < 12, f"cleanup took {took:.1f}s"


def test_ipv6_pod_cidrs_announced_and_native_across_router(
    ref: ReferenceTopology, daemons: Daemons, fabric: Fabric
) -> None:
    """Dual-stack pods: each node's IPv6 pod CIDR reaches R over the IPv4 session (ipv6 channel) with
    the node's IPv6 address on its link as next hop: node1 has only its link-local one, node2 also a
    global one (preferred); native IPv6 pod traffic crosses R both ways; a daemon restart keeps R's
    IPv6 route and cleanup withdraws it."""
    ref.router.ip("-6 addr add 2001:db8:3::1/64 dev p-node2 nodad")
    ref.nodes["node2"].ip("-6 addr add 2001:db8:3::2/64 dev eth0 nodad")
    ll1 = link_local(ref, "node1")
    cfg1 = bgp_cfg(ref, "node1", daemons.sockdir, dual_stack=True, graceful_restart_time=60)
    d1 = daemons.start(ref.nodes["node1"], cfg1)
    d2 = daemons.start(
        ref.nodes["node2"], bgp_cfg(ref, "node2", daemons.sockdir, dual_stack=True, graceful_restart_time=60)
    )
    want6 = {
        "fd00:10:244:1::/64": f"{ll1} dev {R_LINK['node1']}",
        "fd00:10:244:2::/64": f"2001:db8:3::2 dev {R_LINK['node2']}",
    }
    fabric.wait_routes(want6, family=6)
    fabric.wait_routes({"10.244.1.0/24": "172.16.2.2", "10.244.2.0/24": "172.16.3.2"})
    # the sessions stay IPv4: R's neighbors are the nodes' IPv4 addresses
    assert fabric.sessions() == {"172.16.2.2": "Established", "172.16.3.2": "Established"}

    b = wait_for(
        lambda: (s := d1.status()["bgp"])["announced_prefixes"] == 2 and s, 20, what="node1 announcing"
    )
    assert b["prefixes"] == ["10.244.1.0/24", "fd00:10:244:1::/64"] and b["not_announced"] == []
    assert b["next_hop6"] == ll1 and b["sessions"][0]["ipv6"] is True
    assert d2.status()["bgp"]["next_hop6"] == "2001:db8:3::2"
    assert "podrouter_bgp_announced_prefixes 2.0" in metrics_text(ref, "node1")
    assert "not announced" not in d1.cli("status", "--socket", str(d1.socket)).stdout

    # native IPv6 across R: the pods' own addresses on R's wire towards node2, no tunnel port
    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    with (
        capture(ref.router, "p-node2", "ip6 and net fd00:10:244::/48") as lines,
        capture(ref.router, "p-node2", "udp port 4789 or udp port 6081") as tunnel,
    ):
        assert pod1.ping(POD6["pod2"], count=3)
        assert pod2.ping(POD6["pod1"], count=3)
        report = iperf(pod1, pod2, POD6["pod2"], seconds=1)
    assert any("fd00:10:244:1::1 > fd00:10:244:2::1: ICMP6, echo request" in ln for ln in lines), lines[:5]
    assert any("fd00:10:244:2::1 > fd00:10:244:1::1: ICMP6, echo reply" in ln for ln in lines), lines[:5]
    assert any("fd00:10:244:1::1." in ln and "fd00:10:244:2::1.5201:" in ln for ln in lines), lines[:5]
    assert report["end"]["sum_received"]["bytes"] > 0
    assert tunnel == [], tunnel[:5]
    packets = d1.counters().get("packets") or {}
    assert packets.get("native/egress", 0) > 0, packets

    # restart node1's daemon while R's IPv6 table is watched: its v6 prefix is never deleted
    mon = ref.router.popen(
        ["ip", "-6", "-o", "monitor", "route"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        code, logs = d1.stop(cleanup=False)  # a restart: the state (and the prefix) stays
        assert code == 0, logs[-2000:]
        wait_for(lambda: fabric.sessions()["172.16.2.2"] != "Established", 10, what="R sees node1 gone")
        assert fabric.routes(6).get("fd00:10:244:1::/64") == want6["fd00:10:244:1::/64"]
        d1 = daemons.start(ref.nodes["node1"], cfg1)
        wait_for(lambda: d1.status()["bgp"]["announced_prefixes"] == 2, 20, what="node1 announcing again")
        time.sleep(1.0)
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=5)
    events = out.decode(errors="replace").splitlines()
    assert not [e for e in events if "fd00:10:244:1::/64" in e and e.startswith("Deleted")], events
    assert fabric.routes(6) == want6
    assert pod1.ping(POD6["pod2"], count=2)

    # stopped and cleaned: the v6 prefix leaves R's table at once, like the v4 one
    code, _ = d1.stop(cleanup=False)
    assert code == 0
    r = d1.cli("cleanup", "--config", str(d1.config), timeout=40)
    assert r.returncode == 0, r.stderr
    fabric.wait_routes({"fd00:10:244:1::/64": None, "fd00:10:244:2::/64": want6["fd00:10:244:2::/64"]}, 10, 6)
    fabric.wait_routes({"10.244.1.0/24": None, "10.244.2.0/24": "172.16.3.2"}, timeout=5)
    assert d2.alive()


def test_check_refuses_bad_bgp(tmp_path: Path) -> None:
    base = {
        "node": {"name": "node1", "address": "172.16.2.2", "pod_cidr": "10.244.1.0/24"},
        "cluster": {"pod_cidr": "10.244.0.0/16"},
    }
    cases = {
        "bgp.asn: 23456 is a reserved AS number": {
            "enabled": True,
            "asn": 23456,
            "peers": [{"address": "172.16.2.1", "asn": 64500}],
        },
        "bgp.peers[0].asn: 4294967296 is out of range": {
            "enabled": True,
            "asn": 64512,
            "peers": [{"address": "172.16.2.1", "asn": 4294967296}],
        },
        "bgp.peers[0].address: '172.16.2.300' is not an IP address": {
            "enabled": True,
            "asn": 64512,
            "peers": [{"address": "172.16.2.300", "asn": 1}],
        },
        "bgp.peers[0].address: '172.16.2.2' is this node's own address": {
            "enabled": True,
            "asn": 64512,
            "peers": [{"address": "172.16.2.2", "asn": 1}],
        },
        "bgp.peers: needs at least one peer": {"enabled": True, "asn": 64512},
    }
    for want, section in cases.items():
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({**base, "bgp": section}))
        r = subprocess.run([*podrouter_argv(), "check", "--config", str(p)], capture_output=True, text=True)
        assert r.returncode == 2, (want, r.stdout, r.stderr)
        assert want in r.stderr, (want, r.stderr)
