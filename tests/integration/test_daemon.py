"""`podrouter run` as a process in a node namespace: start, readiness, what it installs, the API, the
metrics endpoint, SIGHUP, SIGTERM (everything removed, exit 0), SIGKILL + `podrouter cleanup`, and
refusing to start (exit 2) before touching anything."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import yaml
from helpers import (
    Daemons,
    our_routes,
    podrouter_argv,
    ref_config,
    short_dir,
    sysctl_value,
    wait_for,
    write_config,
)

from nettopo import ReferenceTopology


def kernel_is_clean(ref: ReferenceTopology, node: str) -> None:
    host = ref.nodes[node]
    assert our_routes(host) == {}
    assert "podr0" not in host.ip("link show")
    rules = host.ip("rule show")
    assert "lookup 77" not in rules and "suppress_prefixlength" not in rules
    assert host.try_run(["nft", "list", "table", "ip", "podrouter"]).returncode != 0
    assert "podr-ifb0" not in host.ip("link show")


def test_start_install_status_metrics_and_sigterm_removes_everything(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1 = ref.nodes["node1"]
    proxy_before = sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp")
    cfg = ref_config(
        ref,
        "node1",
        daemons.sockdir,
        mode="hybrid",
        routing={"mode": "hybrid", "native_when_on_link": True},
        masquerade={"enabled": True, "port_range": "61000-65535"},
    )
    d = daemons.start(n1, cfg)

    # the API socket is root-only
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600

    st = d.status()
    assert st["ready"] is True and st["node"] == "node1" and st["mode"] == "hybrid"
    assert st["generation"] >= 1
    peers = {p["name"]: p for p in st["peers"]}
    assert peers["node3"]["path"] == "native" and peers["node3"]["on_link"] is True
    assert peers["node3"]["next_hop"] == "172.16.2.3" and peers["node3"]["next_hop_mac"]
    assert peers["node2"]["path"] == "vxlan" and peers["node2"]["next_hop"] == "172.16.2.1"
    assert [p["name"] for p in st["pods"]] == ["pod1"]

    # the kernel: per-destination MTUs on podr0, the pod's /32, unreachable for the rest of our CIDR
    routes = our_routes(n1)
    assert routes["10.244.2.0/24"]["dev"] == "podr0" and routes["10.244.2.0/24"]["metrics"] == [{"mtu": 1450}]
    assert routes["10.244.3.0/24"]["dev"] == "podr0" and routes["10.244.3.0/24"]["metrics"] == [{"mtu": 1500}]
    assert routes["10.244.1.1"]["dev"] == "veth-pod1"
    assert routes["10.244.1.0/24"]["type"] == "unreachable"
    assert routes["default@77"]["dev"] == "podr0"  # masquerade egress table
    assert "from 10.244.1.0/24 lookup 77" in n1.ip("rule show")
    link = json.loads(n1.ip("-j link show podr0"))[0]
    assert link["mtu"] == 1500 and "UP" in link["flags"]
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "1"
    assert sysctl_value(n1, "net.ipv4.ip_forward") == "1"

    # the metrics endpoint carries exactly the contract's families
    body = n1.run(
        [
            "python3",
            "-c",
            "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9965/metrics',"
            " timeout=5).read().decode())",
        ]
    )
    # (the text format names a counter family with or without `_total`, by client version)
    families = {
        line.split()[2].removesuffix("_total") for line in body.splitlines() if line.startswith("# TYPE")
    }
    assert families == {
        "podrouter_packets",
        "podrouter_bytes",
        "podrouter_drops",
        "podrouter_nat_entries",
        "podrouter_nat_evictions",
        "podrouter_nat_pod_limit_drops",
        "podrouter_nat_snapshot_restored",
        "podrouter_nat_snapshot_rejected",
        "podrouter_nat_snapshot_writes",
        "podrouter_nat_snapshot_write_errors",
        "podrouter_geneve_options",
        "podrouter_peers",
        "podrouter_pod_egress_rate_limit_bits",
        "podrouter_table_generation",
    }
    assert 'podrouter_packets_total{direction="egress",path="vxlan"}' in body
    assert "podrouter_peers 2.0" in body

    # explain asks the live tables
    r = d.cli(
        "explain",
        "10.244.1.1",
        "10.244.3.1",
        "--proto",
        "tcp",
        "--dport",
        "80",
        "--socket",
        d.socket,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    verdict = json.loads(r.stdout)["verdict"]
    assert verdict["verdict"] == "native" and verdict["next_hop"] == "172.16.2.3"
    assert verdict["next_hop_mac"] == peers["node3"]["next_hop_mac"]
    r = d.cli("explain", "10.244.1.1", "10.244.2.1", "--socket", d.socket)
    assert r.returncode == 0 and "tunnel" in r.stdout and "remote=172.16.3.2" in r.stdout
    # the human status
    r = d.cli("status", "--config", str(d.config))
    assert r.returncode == 0 and "ready" in r.stdout.splitlines()[0] and "node3" in r.stdout

    code, err = d.stop()
    assert code == 0, err
    kernel_is_clean(ref, "node1")
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == proxy_before
    assert not Path(d.socket).exists()
    assert not (daemons.sockdir / "node1.state.json").exists()


def test_pods_through_the_api(ref: ReferenceTopology, daemons: Daemons) -> None:
    n1 = ref.nodes["node1"]
    d = daemons.start(n1, ref_config(ref, "node1", daemons.sockdir, pods=False))
    assert d.status()["pods"] == []
    assert "10.244.1.1" not in our_routes(n1)

    r = d.cli(
        "pod",
        "add",
        "pod1",
        "--ip",
        "10.244.1.1",
        "--host-interface",
        "veth-pod1",
        "-a",
        "kubernetes.io/egress-bandwidth=10M",
        "--socket",
        d.socket,
    )
    assert r.returncode == 0, r.stderr
    assert our_routes(n1)["10.244.1.1"]["dev"] == "veth-pod1"
    shaping = {p["name"]: p["shaping"] for p in d.status()["pods"]}["pod1"]
    assert shaping["egress_bps"] == 10_000_000 and not shaping["error"]
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "1"
    # the node answers the pod's ARP for its link-local gateway (docs/design.md §4b), so the pod reaches
    # the node's own address
    assert ref.pods["pod1"].host.ping("172.16.2.2")

    # a second pod on the same node: same-node traffic is the kernel's (two /32 routes)
    ref.add_pod("node1", "pod1b", "10.244.1.2")
    r = d.cli(
        "pod", "add", "pod1b", "--ip", "10.244.1.2", "--host-interface", "veth-pod1b", "--socket", d.socket
    )
    assert r.returncode == 0, r.stderr
    assert ref.pods["pod1"].host.ping("10.244.1.2")

    listing = json.loads(d.cli("pod", "list", "--json", "--socket", d.socket).stdout)
    assert [p["name"] for p in listing] == ["pod1", "pod1b"]

    # a bad annotation is not an API error: the pod is routed, its shaping reports the problem
    r = d.cli(
        "pod",
        "add",
        "pod1b",
        "--ip",
        "10.244.1.2",
        "--host-interface",
        "veth-pod1b",
        "-a",
        "kubernetes.io/egress-bandwidth=10 furlongs",
        "--socket",
        d.socket,
    )
    assert r.returncode == 0, r.stderr
    assert "shaping error" in r.stdout and "kubernetes.io/egress-bandwidth" in r.stdout
    assert ref.pods["pod1"].host.ping("10.244.1.2", count=1)

    # errors come back as messages and exit 1; the daemon keeps running
    for args, msg in (
        (("pod1c", "--ip", "10.244.2.9", "--host-interface", "veth-x"), "not inside this node's pod CIDRs"),
        (("pod1c", "--ip", "10.244.1.9", "--host-interface", "veth-none"), "does not exist"),
        (("pod1c", "--ip", "10.244.1.2", "--host-interface", "veth-pod1b"), "already used by pod pod1b"),
    ):
        r = d.cli("pod", "add", *args, "--socket", d.socket)
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
    r = d.cli("pod", "del", "nope", "--socket", d.socket)
    assert r.returncode == 1 and "no pod named 'nope'" in r.stderr

    r = d.cli("pod", "del", "pod1b", "--socket", d.socket)
    assert r.returncode == 0
    assert "10.244.1.2" not in our_routes(n1)
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1b.proxy_arp") == "0"
    assert d.alive()


def test_bad_config_and_port_overlap_exit_2_before_touching_anything(
    ref: ReferenceTopology, tmp_path: Path
) -> None:
    n1 = ref.nodes["node1"]
    with short_dir() as sd:
        cfg = ref_config(ref, "node1", sd, routing={"mode": "hybrid", "native_cidrs": ["10.244.0.0/33"]})
        path = write_config(tmp_path / "bad.yaml", cfg)
        r = n1.try_run([*podrouter_argv(), "run", "--config", str(path)], timeout=30)
        assert r.returncode == 2
        assert r.stderr.splitlines() == ["routing.native_cidrs[0]: '10.244.0.0/33' is not a CIDR"]
        kernel_is_clean(ref, "node1")

        # the relations (the core's rulebook) are refused the same way, every problem at once
        cfg = ref_config(ref, "node1", sd)
        cfg["peers"] = [
            {"name": "node2", "address": "172.16.2.2", "pod_cidr": "10.244.2.0/24"},
            {"name": "node3", "address": "172.16.2.3", "pod_cidr": "10.244.1.0/25"},
        ]
        path = write_config(tmp_path / "rules.yaml", cfg)
        r = n1.try_run([*podrouter_argv(), "run", "--config", str(path)], timeout=30)
        assert r.returncode == 2
        assert r.stderr.splitlines() == [
            "peers[0].address: '172.16.2.2' is this node's own address",
            "peers[1].pod_cidr: '10.244.1.0/25' overlaps node's pod CIDR '10.244.1.0/24'",
        ]
        kernel_is_clean(ref, "node1")

        # the masquerade range overlapping the kernel's ephemeral ports is refused at start
        n1.sysctl("net.ipv4.ip_local_port_range", "32768 62000")
        cfg = ref_config(ref, "node1", sd, masquerade={"enabled": True, "port_range": "61000-65535"})
        path = write_config(tmp_path / "overlap.yaml", cfg)
        r = n1.try_run([*podrouter_argv(), "run", "--config", str(path)], timeout=30)
        assert r.returncode == 2, r.stderr
        assert (
            "masquerade.port_range: '61000-65535' overlaps net.ipv4.ip_local_port_range '32768 62000'"
            in r.stderr
        )
        kernel_is_clean(ref, "node1")
        assert not (sd / "node1.sock").exists()

        # an interface that is not there, an address that is not ours
        cfg = ref_config(ref, "node1", sd, node={"interface": "eth9"})
        r = n1.try_run([*podrouter_argv(), "run", "--config", str(write_config(tmp_path / "c.yaml", cfg))])
        assert r.returncode == 2 and "node.interface: 'eth9' does not exist" in r.stderr
        cfg = ref_config(ref, "node1", sd, node={"address": "172.16.2.99"})
        r = n1.try_run([*podrouter_argv(), "run", "--config", str(write_config(tmp_path / "d.yaml", cfg))])
        assert r.returncode == 2 and "node.address: '172.16.2.99' is not an address of 'eth0'" in r.stderr
        # a tunnel MTU the underlay cannot carry without fragmenting the outer packet
        cfg = ref_config(ref, "node1", sd, tunnel={"mtu": 1480})
        r = n1.try_run([*podrouter_argv(), "run", "--config", str(write_config(tmp_path / "e.yaml", cfg))])
        assert r.returncode == 2 and "tunnel.mtu: 1480 does not fit the underlay" in r.stderr
        kernel_is_clean(ref, "node1")


def test_defaults_come_from_the_default_route(ref: ReferenceTopology, daemons: Daemons) -> None:
    cfg = ref_config(ref, "node1", daemons.sockdir)
    del cfg["node"]["address"], cfg["node"]["interface"]
    d = daemons.start(ref.nodes["node1"], cfg)
    u = d.status()["underlay"]
    assert u == {"interface": "eth0", "address": "172.16.2.2", "mtu": 1500, "gateway": "172.16.2.1"}


def test_sighup_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir, peers=["node2"])
    d = daemons.start(n1, cfg)
    gen = d.status()["generation"]
    assert set(our_routes(n1)) >= {"10.244.2.0/24"} and "10.244.3.0/24" not in our_routes(n1)

    cfg["peers"].append({"name": "node3", "address": "172.16.2.3", "pod_cidr": "10.244.3.0/24"})
    write_config(d.config, cfg)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "10.244.3.0/24" in our_routes(n1), 10, what="route to node3 after SIGHUP")
    st = wait_for(lambda: (s := d.status())["generation"] > gen and s, 10, what="new tables")
    assert {p["name"] for p in st["peers"]} == {"node2", "node3"}

    # a broken file: logged, the running config stays
    d.config.write_text(yaml.safe_dump({**cfg, "routing": {"mode": "sideways"}}))
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused:" in d.logs(), 10, what="the bad reload to be refused")
    assert d.alive()
    assert {p["name"] for p in d.status()["peers"]} == {"node2", "node3"}
    write_config(d.config, cfg)  # `cleanup` after the stop reads the file too
    code, err = d.stop()
    assert code == 0
    assert "reload refused: routing.mode: 'sideways' is not one of: tunnel, native, hybrid" in err


def test_sigkill_leftovers_are_removed_by_cleanup_and_by_the_next_start(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir, masquerade={"enabled": True})
    cfg["pods"][0]["annotations"] = {"kubernetes.io/egress-bandwidth": "10M"}
    d = daemons.start(n1, cfg)
    assert "podr-ifb0" in n1.ip("link show")
    d.kill()
    # a crash leaves the node's state like a stop does (the stop contract): the persistent TUN,
    # routes, rules and sysctls
    assert "podr0" in n1.ip("link show")
    left = our_routes(n1)
    assert "10.244.1.1" in left and "10.244.1.0/24" in left
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "1"
    assert (daemons.sockdir / "node1.state.json").exists()

    r = d.cli("cleanup", "--config", str(d.config))
    assert r.returncode == 0, r.stderr
    assert "removed route 10.244.1.1/32" in r.stdout
    assert "removed shaping: podr-ifb0" in r.stdout
    assert "removed nftables table ip podrouter" in r.stdout
    assert "podr-ifb0" not in n1.ip("link show")
    kernel_is_clean(ref, "node1")
    assert sysctl_value(n1, "net.ipv4.conf.veth-pod1.proxy_arp") == "0"
    assert not Path(d.socket).exists()

    # kill again, and this time just start again: the new daemon adopts its predecessor's state
    d2 = daemons.start(n1, cfg)
    d2.kill()
    d3 = daemons.start(n1, cfg)
    assert d3.status()["ready"] and d3.status()["adopted"]
    code, err = d3.stop()
    assert code == 0, err
    assert "adopting what the previous daemon (pid" in err
    kernel_is_clean(ref, "node1")


def test_a_second_daemon_on_the_same_socket_is_refused(ref: ReferenceTopology, daemons: Daemons) -> None:
    n1 = ref.nodes["node1"]
    cfg = ref_config(ref, "node1", daemons.sockdir)
    d = daemons.start(n1, cfg)
    r = n1.try_run([*podrouter_argv(), "run", "--config", str(d.config)], timeout=30)
    assert r.returncode == 1 and "already listening" in r.stderr
    assert d.alive() and d.status()["ready"]


def test_podr0_never_carries_ipv6_link_chatter(ref: ReferenceTopology, daemons: Daemons) -> None:
    """IPv6 is disabled on podr0 before it comes up: with it enabled even briefly, the kernel's MLD
    report for the new link-local address (hop limit 1) is queued into the TUN and the datapath
    counts it as a ttl_exceeded drop."""
    d = daemons.start(ref.nodes["node1"], ref_config(ref, "node1", daemons.sockdir))
    n1 = ref.nodes["node1"]
    assert n1.run(["cat", "/proc/sys/net/ipv6/conf/podr0/disable_ipv6"]).strip() == "1"
    assert n1.ip("-6 addr show dev podr0").strip() == ""
    # the workers drained whatever was queued when they started; a late router solicitation would
    # come within rtr_solicit_delay (1 s) of the link coming up
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert d.counters()["drops"].get("ttl_exceeded", 0) == 0, d.counters()
        time.sleep(0.1)
