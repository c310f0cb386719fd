"""Geneve options on receive (RFC 8926 §3.5): scapy builds Geneve frames with options and sends
them from node2's namespace (no podrouter there) at node1's Geneve port. A frame whose options are
all non-critical is delivered to pod1 and its options are counted by (class, type); a frame with an
unknown critical option is dropped (`geneve_critical_option`) and its option counted too. Both
payload kinds are received: an inner Ethernet frame (protocol type 0x6558) and a bare IP packet
(0x0800). The counters show in `podrouter status --json` and in /metrics."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import Daemons, python_in, ref_config, wait_for

from nettopo import ReferenceTopology

SENDER = textwrap.dedent(
    """
    import sys
    from scapy.contrib.geneve import GENEVE, GeneveOptions
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.sendrecv import send

    def frame(payload, options, eth):
        inner = IP(src="10.244.2.1", dst="10.244.1.1") / UDP(sport=4000, dport=5500) / payload
        if eth:
            inner = Ether(src="02:70:ac:10:03:02", dst="02:70:ac:10:02:02") / inner
        g = GENEVE(vni=1, proto=0x6558 if eth else 0x0800, options=options)
        return IP(src="172.16.3.2", dst="172.16.2.2") / UDP(sport=50000, dport=6081) / g / inner

    noncrit = [
        GeneveOptions(classid=0x0102, type=0x03, data=b"abcd"),
        GeneveOptions(classid=0x0104, type=0x7F, data=b""),
    ]
    crit = [GeneveOptions(classid=0x0102, type=0x83, data=b"abcdefgh")]
    pkts = []
    for _ in range(3):
        pkts.append(frame(b"noncritical-eth", noncrit, True))
        pkts.append(frame(b"noncritical-ip", noncrit, False))
        pkts.append(frame(b"critical-eth", crit, True))
    send(pkts, verbose=False)
    """
)

# pod1 listens for the inner datagrams and prints each payload on its own line
LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.244.1.1", 5500))
    s.settimeout(4)
    try:
        while True:
            print(s.recv(2048).decode(errors="replace"), flush=True)
    except socket.timeout:
        pass
    """
)


def options(counters: dict[str, object]) -> dict[tuple[int, int], int]:
    return {(o["class"], o["type"]): o["count"] for o in counters["geneve_options"]}  # type: ignore[attr-defined,index]


def test_geneve_options_counted_noncritical_delivered_critical_dropped(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol="geneve", peers=["node2"])
    cfg["metrics"] = {"listen": "127.0.0.1:9464"}
    d1 = daemons.start(ref.nodes["node1"], cfg)
    before = d1.counters()
    assert before["geneve_options"] == [] and before["geneve_options_other"] == 0
    crit_before = before["drops"].get("geneve_critical_option", 0)

    pod1 = ref.pods["pod1"].host
    listener = pod1.popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ":5500 " in pod1.run(["ss", "-Huln"]) + " ", 10, 0.05, "pod1's UDP listener")
        r = python_in(ref.nodes["node2"], SENDER)
        assert r.returncode == 0, r.stderr
        out, err = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    got = out.decode().split()
    # non-critical options: delivered, with either payload kind; the critical one never
    assert got.count("noncritical-eth") == 3 and got.count("noncritical-ip") == 3, (got, err)
    assert "critical-eth" not in got

    c = wait_for(
        lambda: (x := d1.counters()) and options(x).get((0x0102, 0x83)) == 3 and x, 10, what="counts"
    )
    assert options(c) == {(0x0102, 0x03): 6, (0x0104, 0x7F): 6, (0x0102, 0x83): 3}
    assert [o["critical"] for o in c["geneve_options"] if o["type"] == 0x83] == [True]
    assert c["drops"]["geneve_critical_option"] - crit_before == 3
    assert c["packets"]["geneve/ingress"] >= 6

    r = python_in(
        ref.nodes["node1"],
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())",
    )
    metrics = r.stdout
    assert 'podrouter_geneve_options_total{class="0x0102",critical="true",type="0x83"} 3.0' in metrics
    assert 'podrouter_geneve_options_total{class="0x0102",critical="false",type="0x03"} 6.0' in metrics
