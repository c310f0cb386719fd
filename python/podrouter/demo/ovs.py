"""Open vSwitch's userspace datapath as a tunnel peer inside a lab node namespace (tests, bench).

`OvsNode` starts its own `ovsdb-server` and `ovs-vswitchd` (datapath_type=netdev: this kernel has no
openvswitch module) in one node's namespace, with private run/db/log directories and unix sockets,
and turns the node into a VTEP:

* `br-phy` holds the node's underlay interface as a port and takes over its address, its MAC
  (`other_config:hwaddr`) and its default route; OVS's own route and ARP tables get the peer and the
  gateway (`ovs/route/add`, `tnl/arp/set`). The kernel is kept off the underlay interface and the
  pod's veth by a netdev ingress chain that drops (OVS reads both with packet sockets first).
* `br-int` holds one tunnel port (`type=geneve` or `vxlan`, VNI `key`, `remote_ip`, `dst_port`) and
  the pod's veth; two flows route between them: frames from the tunnel get the pod's MAC as
  destination, frames from the pod get this node's VTEP MAC as source (the pod's gateway MAC is
  the peer's VTEP MAC, a static neighbour entry), as podrouter and Flannel do it.
* Offloads are turned off on every veth end that faces OVS: OVS reads them with AF_PACKET without a
  virtio-net header, so a CHECKSUM_PARTIAL or GSO frame would reach it unfinished.

`stop()` kills both daemons by PID and removes the directory; it runs on any failure of `start()`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from podrouter.config import DEFAULT_PORTS, vtep_mac_of
from podrouter.demo.netns import Host, ReferenceTopology

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
# the pods' MTU behind an OVS VTEP: 1500 minus 50 bytes of VXLAN or Geneve+Ethernet overhead
INNER_MTU = 1450
# each node's underlay gateway in the reference topology, and R's interface that holds it
GATEWAYS = {
    "node1": ("172.16.2.1", "br0"),
    "node2": ("172.16.3.1", "p-node2"),
    "node3": ("172.16.2.1", "br0"),
}
# R's port facing each node
R_PORTS = {"node1": "p-node1", "node2": "p-node2", "node3": "p-node3"}
# offload features OVS's packet sockets cannot take (checksum, scatter-gather, segmentation, GRO)
OFFLOADS_OFF = (
    "tx off sg off tso off gso off gro off tx-udp-segmentation off "
    "tx-udp_tnl-segmentation off tx-udp_tnl-csum-segmentation off"
)


def offloads_off(host: Host, ifname: str) -> None:
    """Turn the offloads off on `ifname` (features the device does not have are ignored)."""
    host.try_run(["ethtool", "-K", ifname, *OFFLOADS_OFF.split()])


def _mac(host: Host, ifname: str) -> str:
    return str(json.loads(host.ip(f"-j link show {ifname}"))[0]["address"])


@dataclass
class OvsNode:
    """A node whose tunnel endpoint is Open vSwitch (userspace datapath) instead of podrouter."""

    host: Host
    proto: str  # geneve | vxlan
    local_addr: str  # this node's underlay address with prefix, e.g. 172.16.3.2/24
    gateway: str  # the underlay gateway
    gateway_mac: str
    remote: str  # the peer's underlay address
    vni: int = 1
    underlay_if: str = "eth0"
    pod_if: str = ""  # the pod's veth end in this namespace
    pod_mac: str = ""
    vtep_mac: str = ""  # this node's VTEP MAC (inner source of what it sends)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ovs", dir="/tmp")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return DEFAULT_PORTS[self.proto]

    def _env(self) -> list[str]:
        d = self.dir
        return ["env", f"OVS_RUNDIR={d}", f"OVS_DBDIR={d}", f"OVS_LOGDIR={d}", f"OVS_SYSCONFDIR={d}"]

    def vsctl(self, *args: str) -> str:
        return self.host.run(
            [*self._env(), "ovs-vsctl", f"--db=unix:{self.dir}/db.sock", "--timeout=10", *args]
        )

    def appctl(self, *args: str) -> str:
        return self.host.run([*self._env(), "ovs-appctl", "-t", f"{self.dir}/vswitchd.ctl", *args])

    def ofctl(self, *args: str) -> str:
        return self.host.run([*self._env(), "ovs-ofctl", *args])

    def _daemon(self, argv: list[str], ready: Path) -> None:
        proc = self.host.popen([*self._env(), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {err[-400:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not create {ready}")
            time.sleep(0.05)

    def start(self) -> OvsNode:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        d, h = self.dir, self.host
        h.run(["ovsdb-tool", "create", f"{d}/conf.db", SCHEMA])
        self._daemon(
            [
                "ovsdb-server",
                f"{d}/conf.db",
                f"--remote=punix:{d}/db.sock",
                f"--unixctl={d}/ovsdb.ctl",
                "--log-file=" + f"{d}/ovsdb-server.log",
                "-vconsole:off",
            ],
            d / "db.sock",
        )
        self.vsctl("--no-wait", "init")
        self._daemon(
            [
                "ovs-vswitchd",
                f"unix:{d}/db.sock",
                f"--unixctl={d}/vswitchd.ctl",
                "--log-file=" + f"{d}/ovs-vswitchd.log",
                "-vconsole:off",
            ],
            d / "vswitchd.ctl",
        )
        ul = self.underlay_if
        ul_mac = _mac(h, ul)
        for ifname in (ul, self.pod_if):
            offloads_off(h, ifname)
        # br-phy: the underlay interface as a port, its address, MAC and default route on the bridge
        self.vsctl(
            "add-br",
            "br-phy",
            "--",
            "set",
            "bridge",
            "br-phy",
            "datapath_type=netdev",
            f"other_config:hwaddr={ul_mac}",
        )
        self.vsctl("add-port", "br-phy", ul)
        h.ip(f"addr flush dev {ul}")
        h.ip(f"addr add {self.local_addr} dev br-phy")
        h.ip("link set br-phy up")
        h.ip(f"route replace default via {self.gateway} dev br-phy")
        # the kernel must not see tunnel datagrams or pod frames: OVS owns both interfaces
        h.sysctl("net.ipv4.ip_forward", 0)
        rules = (
            "table netdev ovslab {\n"
            f" chain ul {{ type filter hook ingress device {ul} priority 0; policy drop; }}\n"
            f" chain pod {{ type filter hook ingress device {self.pod_if} priority 0; policy drop; }}\n"
            "}\n"
        )
        (d / "lab.nft").write_text(rules)
        h.run(["nft", "-f", f"{d}/lab.nft"])
        self.appctl("ovs/route/add", f"{self.remote}/32", "br-phy", self.gateway)
        self.appctl("tnl/arp/set", "br-phy", self.gateway, self.gateway_mac)
        # br-int: the tunnel port and the pod
        self.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev")
        self.vsctl(
            "add-port",
            "br-int",
            "tun0",
            "--",
            "set",
            "interface",
            "tun0",
            f"type={self.proto}",
            f"options:remote_ip={self.remote}",
            f"options:key={self.vni}",
            f"options:dst_port={self.port}",
        )
        self.vsctl("add-port", "br-int", self.pod_if)
        self.ofctl("del-flows", "br-int")
        self.ofctl(
            "add-flow",
            "br-int",
            f"priority=10,in_port=tun0,ip,actions=mod_dl_dst:{self.pod_mac},output:{self.pod_if}",
        )
        self.ofctl(
            "add-flow",
            "br-int",
            f"priority=10,in_port={self.pod_if},ip,actions=mod_dl_src:{self.vtep_mac},output:tun0",
        )

    def tunnel_tx(self) -> int:
        """Packets the pod-to-tunnel flow sent into the tunnel (the userspace datapath keeps no
        interface statistics for tunnel ports)."""
        out = self.ofctl("dump-flows", "br-int", f"in_port={self.pod_if}")
        return sum(int(m) for m in re.findall(r"n_packets=(\d+)", out))

    def stats(self) -> str:
        """OVS's datapath coverage counters (drops and tunnel-pop errors show up here)."""
        return self.appctl("coverage/show")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stderr is not None:
                proc.stderr.close()
        self.procs.clear()
        self.host.try_run(["nft", "delete", "table", "netdev", "ovslab"])
        shutil.rmtree(self.dir, ignore_errors=True)


def ovs_vtep(ref: ReferenceTopology, node: str, peer: str, proto: str, vni: int = 1) -> OvsNode:
    """Make `node` of the reference topology an OVS VTEP towards `peer` (podrouter or OVS) and start
    it. The node's pods must be attached already (only the first one is bridged); each gets MTU
    `INNER_MTU`, no offloads, and the peer's VTEP MAC as its gateway's MAC. R's port facing the node
    loses its offloads too."""
    h, r = ref.nodes[node], ref.router
    pod = next(p for p in ref.pods.values() if p.node == node)
    offloads_off(r, R_PORTS[node])
    offloads_off(pod.host, "eth0")
    pod.host.ip(f"link set eth0 mtu {INNER_MTU}")
    h.ip(f"link set {pod.host_interface} mtu {INNER_MTU}")
    peer_addr = ref.node_addr[peer]
    pod.host.ip(
        f"neigh replace 169.254.1.1 lladdr {vtep_mac_of(IPv4Address(peer_addr))} dev eth0 nud permanent"
    )
    gateway, r_if = GATEWAYS[node]
    return OvsNode(
        host=h,
        proto=proto,
        local_addr=f"{ref.node_addr[node]}/24",
        gateway=gateway,
        gateway_mac=_mac(r, r_if),
        remote=peer_addr,
        vni=vni,
        pod_if=pod.host_interface,
        pod_mac=_mac(pod.host, "eth0"),
        vtep_mac=vtep_mac_of(IPv4Address(ref.node_addr[node])),
    ).start()
