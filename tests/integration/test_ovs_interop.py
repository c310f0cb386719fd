"""Interop with Open vSwitch's userspace datapath, over Geneve and over VXLAN.

The reference topology with node2 run by OVS instead of podrouter (python/podrouter/demo/ovs.py):
node1 runs podrouter in tunnel mode; node2's pod is a port of OVS's br-int, whose tunnel port talks
to node1. Pods ping and run a short iperf3 TCP test both ways, while tshark on the underlay link
(R's side of node2's wire) records the tunnel datagrams; afterwards every captured frame must decode
as the tunnel protocol with an inner Ethernet frame carrying IPv4, and none as malformed. OVS's
Geneve accepts only Ethernet payloads (protocol type 0x6558), so the Geneve case also proves that
podrouter's default framing is the interoperable one.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from helpers import Daemons, ref_config, wait_for
from test_interop import iperf

from nettopo import ReferenceTopology
from podrouter.demo.ovs import INNER_MTU, ovs_vtep

NODE1_VTEP_MAC = "02:70:ac:10:02:02"  # podrouter's synthesized VTEP MAC of 172.16.2.2: pod2's gateway MAC


def dissect(pcap: Path, proto: str) -> list[list[str]]:
    out = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-T", "fields", "-E", "separator=/t",
         "-e", "frame.protocols", "-e", "_ws.malformed", "-e", "_ws.expert.severity"],
        capture_output=True, text=True, timeout=180, check=True,
    ).stdout  # fmt: skip
    return [line.split("\t") for line in out.splitlines()]


@pytest.mark.parametrize("proto", ["geneve", "vxlan"])
def test_podrouter_talks_to_open_vswitch_userspace(
    ref: ReferenceTopology, daemons: Daemons, tmp_path: Path, proto: str
) -> None:
    # node2's frames carry 02:70:ac:10:03:02 as inner source, what node1 addresses its frames to
    ovs = ovs_vtep(ref, "node2", "node1", proto)
    try:
        cfg = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol=proto, peers=["node2"])
        d1 = daemons.start(ref.nodes["node1"], cfg)
        st = d1.status()
        assert st["vtep_mac"] == NODE1_VTEP_MAC
        assert st["tunnel"]["geneve_payload"] == "ethernet"
        pcap = tmp_path / "underlay.pcap"
        port = 6081 if proto == "geneve" else 4789
        cap = ref.router.popen(
            ["tshark", "-n", "-q", "-i", "p-node2", "-s", "160", "-f", f"udp port {port}", "-w", str(pcap)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(pcap.exists, 15, what="tshark capturing")
            time.sleep(0.5)
            pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
            wait_for(
                lambda: pod1.ping("10.244.2.1", count=1, timeout=1), 15, what=f"pod1 -> pod2 via OVS {proto}"
            )
            assert pod1.ping("10.244.2.1", count=3), ovs.stats()
            assert pod2.ping("10.244.1.1", count=3), ovs.stats()
            assert pod1.ping("10.244.2.1", count=2, size=INNER_MTU - 28, df=True)
            iperf(pod1, pod2, "10.244.2.1", 5411)
            iperf(pod2, pod1, "10.244.1.1", 5412)
            time.sleep(0.5)
        finally:
            cap.terminate()
            cap.wait(timeout=20)
        rows = dissect(pcap, proto)
        assert len(rows) > 100, f"only {len(rows)} tunnel frames captured"
        want = f"udp:{proto}:eth:ethertype:ip"
        bad = [r for r in rows if want not in r[0] or r[1] or "malformed" in r[0]]
        assert not bad, f"{len(bad)} of {len(rows)} frames do not decode as {want}: {bad[:5]}"
        # podrouter decapsulated what OVS sent, and dropped nothing as a malformed tunnel frame
        c = d1.counters()
        assert (
            c["packets"].get(f"{proto}/ingress", 0) > 100 and c["packets"].get(f"{proto}/egress", 0) > 100
        ), c
        assert c["drops"].get("malformed", 0) == 0 and c["drops"].get("unsupported_inner_protocol", 0) == 0, c
    finally:
        ovs.stop()
