"""UDP-tunnel GSO (docs/architecture.md, "UDP-tunnel GSO"): a pod's TCP super-packet leaves node1
as ONE encapsulated super-packet written to the `podrgso<N>` TAP, the kernel forwards it whole or
segments it where a device cannot carry it, and node2 takes a datagram delivered whole as one TSO
write to its TUN. Checked with a checksummed transfer, the offload counters, and tshark on a link
where the kernel must segment (so the frames on it are real wire frames); plus the fallbacks
(`tunnel.gso: off`, `rp_filter` on)."""

from __future__ import annotations

import hashlib
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, ref_config, wait_listening

from nettopo import Host, ReferenceTopology

SIZE = 24 * 1024 * 1024
PORT = 5301


def start(ref: ReferenceTopology, daemons: Daemons, protocol: str, **kw: Any) -> dict[str, DaemonHandle]:
    nodes = ("node1", "node2")
    cfg = {n: ref_config(ref, n, daemons.sockdir, mode="tunnel", protocol=protocol, **kw) for n in nodes}
    return {n: daemons.start(ref.nodes[n], c) for n, c in cfg.items()}


def transfer(client: Host, server: Host, server_ip: str) -> None:
    """SIZE pseudo-random bytes pod -> pod over TCP; the receiver's SHA-256 must match."""
    data = hashlib.shake_256(b"podrouter tunnel gso").digest(SIZE)
    want = hashlib.sha256(data).hexdigest()
    srv_code = textwrap.dedent(
        f"""
        import hashlib, socket
        fam = socket.AF_INET6 if ":" in "{server_ip}" else socket.AF_INET
        s = socket.create_server(("{server_ip}", {PORT}), family=fam)
        c, _ = s.accept(); h = hashlib.sha256(); n = 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            h.update(b); n += len(b)
        print(n, h.hexdigest())
        """
    )
    srv = server.popen(["python3", "-c", srv_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(server, PORT)
        cli_code = textwrap.dedent(
            f"""
            import hashlib, socket, sys
            data = hashlib.shake_256(b"podrouter tunnel gso").digest({SIZE})
            s = socket.create_connection(("{server_ip}", {PORT}), timeout=20)
            s.sendall(data); s.shutdown(socket.SHUT_WR); s.recv(1)
            """
        )
        r = client.try_run(["python3", "-c", cli_code], timeout=60)
        assert r.returncode == 0, r.stderr
        raw_out, raw_err = srv.communicate(timeout=30)
        out, err = raw_out.decode(), raw_err.decode()
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(timeout=5)
    assert out.split() == [str(SIZE), want], (out, err)


def offload(d: DaemonHandle) -> dict[str, Any]:
    return dict(d.counters()["offload"])


@pytest.mark.parametrize("protocol", ["vxlan", "geneve"])
def test_gso_path_carries_tcp_intact(ref: ReferenceTopology, daemons: Daemons, protocol: str) -> None:
    ds = start(ref, daemons, protocol)
    o1 = offload(ds["node1"])
    assert o1["tunnel_gso"] is True, o1
    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    transfer(pod1, pod2, "10.244.2.1")
    a, b = offload(ds["node1"]), offload(ds["node2"])
    # the super-packets went whole to the TAP and arrived whole (veths and R keep GSO skbs)
    assert a["tap_gso_writes"] > 0, a
    assert b["udp_rx_whole_gso"] > 0, b
    assert ds["node2"].counters()["packets"][f"{protocol}/ingress"] >= SIZE // 1500
    assert ds["node2"].counters()["drops"].get("tx_error", 0) == 0


def test_kernel_segments_where_it_must(ref: ReferenceTopology, daemons: Daemons, tmp_path: Path) -> None:
    """R's link to node2 without UDP-tunnel segmentation offload: the kernel segments there, so the
    capture holds real wire frames, which tshark decodes as VXLAN / TCP with good checksums, each
    within the link MTU; the transfer is intact."""
    r = ref.router
    # no UDP-tunnel segmentation and no checksum offload: the kernel segments in software and
    # finishes every checksum, as before a physical NIC (with checksum offload left on, a veth
    # would pass the segments on CHECKSUM_PARTIAL: their TCP checksum fields would hold seeds)
    r.run(["ethtool", "-K", "p-node2", "tx", "off", "tx-udp_tnl-segmentation", "off"])
    r.run(["ethtool", "-K", "p-node2", "tx-udp_tnl-csum-segmentation", "off"])
    ds = start(ref, daemons, "vxlan")
    pcap = tmp_path / "wire.pcap"
    dump = r.popen(
        ["tcpdump", "-i", "p-node2", "-w", str(pcap), "-U", "udp dst port 4789"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        transfer(ref.pods["pod1"].host, ref.pods["pod2"].host, "10.244.2.1")
        time.sleep(0.5)
    finally:
        dump.terminate()
        dump.wait(timeout=10)
    assert offload(ds["node1"])["tap_gso_writes"] > 0
    fields = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            "vxlan && tcp.len > 0",
            "-T",
            "fields",
            "-e",
            "frame.len",
            "-e",
            "tcp.checksum.status",
            "-e",
            "ip.checksum.status",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    rows = [f.split("\t") for f in fields if f]
    assert len(rows) > SIZE // 1500 // 2, len(rows)
    mtu = int(r.run(["cat", "/sys/class/net/p-node2/mtu"]))
    assert max(int(row[0]) for row in rows) <= mtu + 14, "every frame on the wire fits the link"
    # tcp.checksum.status: 1 = good (0 would be bad, 2 unverified); both IP headers good
    assert {row[1] for row in rows} == {"1"}, {row[1] for row in rows}
    assert all(set(row[2].split(",")) == {"1"} for row in rows), rows[:3]


def test_gso_off_segments_in_the_datapath(ref: ReferenceTopology, daemons: Daemons) -> None:
    ds = start(ref, daemons, "vxlan", tunnel={"protocol": "vxlan", "gso": "off"})
    transfer(ref.pods["pod1"].host, ref.pods["pod2"].host, "10.244.2.1")
    a = offload(ds["node1"])
    assert a["tunnel_gso"] is False and a["tap_gso_writes"] == 0, a
    assert a["udp_tx_gso_messages"] > 0, a
    assert offload(ds["node2"])["udp_rx_whole_gso"] == 0


def test_rp_filter_on_falls_back(ref: ReferenceTopology, daemons: Daemons) -> None:
    """With `net.ipv4.conf.all.rp_filter` != 0 the TAP's frames (source: the node's own address)
    would be dropped: the datapath does not use it, says why, and segments itself."""
    n1 = ref.nodes["node1"]
    n1.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2"])
    ds = start(ref, daemons, "vxlan")
    a = offload(ds["node1"])
    assert a["tunnel_gso"] is False, a
    assert "rp_filter" in (a["tunnel_gso_error"] or ""), a
    transfer(ref.pods["pod1"].host, ref.pods["pod2"].host, "10.244.2.1")
    assert offload(ds["node1"])["tap_gso_writes"] == 0


def test_receiver_with_gso_off_takes_whole_datagrams(ref: ReferenceTopology, daemons: Daemons) -> None:
    """The receive side does not depend on the setting (the upgrade order: receivers first)."""
    off = {"protocol": "vxlan", "gso": "off"}
    sender = ref_config(ref, "node1", daemons.sockdir, mode="tunnel", protocol="vxlan")
    receiver = ref_config(ref, "node2", daemons.sockdir, mode="tunnel", tunnel=off)
    d1 = daemons.start(ref.nodes["node1"], sender)
    d2 = daemons.start(ref.nodes["node2"], receiver)
    transfer(ref.pods["pod1"].host, ref.pods["pod2"].host, "10.244.2.1")
    assert offload(d1)["tap_gso_writes"] > 0
    b = offload(d2)
    assert b["tunnel_gso"] is False and b["udp_rx_whole_gso"] > 0, b


def test_ipv6_pods_over_the_gso_path(ref: ReferenceTopology, daemons: Daemons) -> None:
    """TCP/IPv6 super-packets (inner GSO_TCPV6) inside the IPv4 underlay's tunnel GSO."""
    ds = start(ref, daemons, "vxlan", dual_stack=True)
    pod2 = ref.pods["pod2"]
    assert pod2.ip6
    transfer(ref.pods["pod1"].host, pod2.host, pod2.ip6)
    assert offload(ds["node1"])["tap_gso_writes"] > 0
    assert offload(ds["node2"])["udp_rx_whole_gso"] > 0


def test_datapath_workers_sets_the_worker_count(ref: ReferenceTopology, daemons: Daemons) -> None:
    """`datapath.workers: 2`: node1 runs two forwarding threads on two TUN queues, and a transfer
    over the tunnel is intact (flows stay on one queue, so nothing is reordered into corruption)."""
    ds = start(ref, daemons, "vxlan", datapath={"workers": 2})
    pid = ds["node1"].proc.pid  # `ip netns exec` execs the daemon itself
    tasks = Path(f"/proc/{pid}/task").iterdir()
    names = sorted((t / "comm").read_text().strip() for t in tasks)
    assert [n for n in names if n.startswith("podr-worker")] == ["podr-worker-0", "podr-worker-1"], names
    transfer(ref.pods["pod1"].host, ref.pods["pod2"].host, "10.244.2.1")


def test_small_udp_datagrams_leave_merged_and_arrive_intact(ref: ReferenceTopology, daemons: Daemons) -> None:
    """Bursts of small datagrams of one flow: node1 sends each TUN batch's run as ONE UDP GSO
    message (udp_tx_gso_messages, with tunnel GSO on, is only these runs: TCP goes to the TAP),
    node2 writes each received run to its TUN as one UDP GSO packet (no TCP in this test), and
    pod2 gets every datagram it gets whole, in order, with its own payload."""
    ds = start(ref, daemons, "vxlan")
    pod1, pod2 = ref.pods["pod1"].host, ref.pods["pod2"].host
    n, port = 4000, 5302
    srv_code = textwrap.dedent(
        f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.bind(("10.244.2.1", {port})); s.settimeout(3)
        got = []
        try:
            while True:
                got.append(s.recv(2048))
        except TimeoutError:
            pass
        seqs = []
        for d in got:
            seq = int(d[:6])
            assert d == b"%06d" % seq + bytes([65 + seq % 26]) * 12, d
            seqs.append(seq)
        print(len(seqs), int(seqs == sorted(seqs)))
        """
    )
    srv = pod2.popen(["python3", "-c", srv_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        cli_code = textwrap.dedent(
            f"""
            import socket, time
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for burst in range({n} // 50):
                for k in range(50):
                    seq = burst * 50 + k
                    s.sendto(b"%06d" % seq + bytes([65 + seq % 26]) * 12, ("10.244.2.1", {port}))
                time.sleep(0.002)
            """
        )
        r = pod1.try_run(["python3", "-c", cli_code], timeout=60)
        assert r.returncode == 0, r.stderr
        out, err = srv.communicate(timeout=30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(timeout=5)
    count, ordered = (int(x) for x in out.decode().split())
    assert count >= n * 9 // 10 and ordered == 1, (out, err)
    a, b = offload(ds["node1"]), offload(ds["node2"])
    assert a["udp_tx_gso_messages"] > 0, a
    # node2 wrote the runs to its TUN as UDP GSO packets (the pod's socket segmented them)
    assert b["tun_gso_writes"] > 0 and b["tun_coalesced_segments"] > b["tun_gso_writes"], b
