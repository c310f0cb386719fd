"""podrouter-cni invoked exactly as a container runtime does: CNI_* environment + config on stdin.

The plugin runs inside the node's namespace (as a runtime on that node would run it), the pod is an
empty network namespace made by the test (as a runtime makes the sandbox), IPAM is the reference
host-local plugin from /usr/lib/cni. The daemon side is a small real unix-socket server speaking the
daemon's newline-delimited JSON protocol; it records registrations and, on pod_add, applies the
pod's annotations with a real BandwidthManager, so the runtime's bandwidth really shapes the pod.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import NetNS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from nettopo import Host, Topology  # noqa: E402
from podrouter.cni import host_ifname  # noqa: E402
from podrouter.qos import BandwidthManager  # noqa: E402
from qos.lab import GOODPUT_PER_FRAME, SINK_ADDR, Lab, measure  # noqa: E402

CNI_PATH = "/usr/lib/cni"


def plugin_argv() -> list[str]:
    installed = shutil.which("podrouter-cni")
    return [installed] if installed else [sys.executable, "-m", "podrouter.cni"]


class FakeDaemon:
    """A real unix-socket server with the daemon's protocol; records every request."""

    def __init__(self, path: str, mgr: BandwidthManager | None = None, refuse: bool = False) -> None:
        self.path, self.mgr, self.refuse = path, mgr, refuse
        self.requests: list[dict] = []
        self.pods: dict[str, dict] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                req = json.loads(buf)
                self.requests.append(req)
                conn.sendall(json.dumps(self._handle(req)).encode() + b"\n")

    def _handle(self, req: dict) -> dict:
        if self.refuse:
            return {"ok": False, "error": "refused by the test"}
        if req["op"] == "pod_add":
            pod = req["pod"]
            self.pods[pod["name"]] = pod
            shaping = None
            if self.mgr is not None:
                shaping = self.mgr.apply(pod["name"], pod["host_interface"], pod["ip"], pod["annotations"])
            return {"ok": True, "pod": {**pod, "shaping": shaping}}
        if req["op"] == "pod_del":
            if req["name"] not in self.pods:
                return {"ok": False, "error": f"no pod named {req['name']!r}"}
            self.pods.pop(req["name"])
            if self.mgr is not None:
                self.mgr.remove(req["name"])
            return {"ok": True, "removed": req["name"]}
        if req["op"] == "pod_list":
            return {"ok": True, "pods": list(self.pods.values())}
        return {"ok": False, "error": f"unknown op {req['op']!r}"}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def netconf(tmp: Path, sock: str, version: str = "1.0.0", bandwidth: dict | None = None) -> dict:
    conf = {
        "cniVersion": version,
        "name": "podnet",
        "type": "podrouter-cni",
        "podrouterSocket": sock,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.10"}]],
                 "dataDir": str(tmp / "ipam")},
    }
    if bandwidth is not None:
        conf["runtimeConfig"] = {"bandwidth": bandwidth}
    return conf


def invoke(node: Host, command: str, conf: dict | None, container: str, netns: str,
           ifname: str = "eth0", env_extra: dict | None = None) -> tuple[int, dict | None]:
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
        "CNI_PATH": CNI_PATH, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}",
    }
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(["ip", "netns", "exec", node.ns, *plugin_argv()], input=json.dumps(conf or {}),
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out


@pytest.fixture
def env(topo: Topology, tmp_path: Path) -> Iterator[tuple[Lab, FakeDaemon, Path]]:
    lab = Lab(topo)
    ipr = NetNS(lab.node.ns)
    mgr = BandwidthManager(ipr, {"node_egress_rate": "10G"})
    daemon = FakeDaemon(str(tmp_path / "podrouter.sock"), mgr)
    try:
        yield lab, daemon, tmp_path
    finally:
        daemon.close()
        mgr.close()
        ipr.close()


def sandbox(topo: Topology, name: str) -> tuple[Host, str]:
    host = topo.host(name)  # an empty namespace, as a runtime's pause sandbox
    return host, f"/var/run/netns/{host.ns}"


def test_version() -> None:
    proc = subprocess.run(plugin_argv(), input='{"cniVersion": "1.0.0"}', capture_output=True, text=True,
                          env={**os.environ, "CNI_COMMAND": "VERSION"},
                          timeout=30, check=False)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"cniVersion": "1.0.0",
                                       "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_add_check_del(env: tuple[Lab, FakeDaemon, Path], topo: Topology) -> None:
    lab, daemon, tmp = env
    pod, netns = sandbox(topo, "c1")
    conf = netconf(tmp, daemon.path, bandwidth={"ingressRate": 20_000_000, "ingressBurst": 400_000,
                                                "egressRate": 10_000_000, "egressBurst": 400_000})
    rc, result = invoke(lab.node, "ADD", conf, "c1", netns)
    assert rc == 0, result
    host_if = host_ifname("c1", "eth0")
    assert result["cniVersion"] == "1.0.0"
    assert result["interfaces"][0]["name"] == host_if and result["interfaces"][1] == {
        "name": "eth0", "mac": result["interfaces"][1]["mac"], "sandbox": netns}
    assert result["ips"] == [{"address": "10.244.1.10/32", "gateway": "169.254.1.1", "interface": 1}]
    # the pod side, docs/design.md §4b
    assert "inet 10.244.1.10/32" in pod.ip("addr show dev eth0")
    default = [ln for ln in pod.ip("route show").splitlines() if ln.startswith("default")]
    assert len(default) == 1 and "via 169.254.1.1 dev eth0" in default[0] and "onlink" in default[0]
    # the node side
    assert f"10.244.1.10 dev {host_if}" in lab.node.ip("route show")
    assert lab.node.run(f"cat /proc/sys/net/ipv4/conf/{host_if}/proxy_arp").strip() == "1"
    # registered, with the runtime's bandwidth as annotations
    assert daemon.pods["default.c1"] == {
        "name": "default.c1", "ip": "10.244.1.10", "host_interface": host_if,
        "annotations": {"kubernetes.io/ingress-bandwidth": "20000000",
                        "kubernetes.io/egress-bandwidth": "10000000"},
    }
    # it works: the pod reaches the sink through the node, and its egress is shaped to 10M
    assert pod.ping(SINK_ADDR)
    bps = measure(pod, lab.sink, SINK_ADDR, seconds=6)
    assert bps == pytest.approx(10e6 * GOODPUT_PER_FRAME, rel=0.05)
    # CHECK passes on a healthy pod, fails (with a CNI error) when the pod's route is gone
    conf_check = {**conf, "prevResult": result}
    rc, out = invoke(lab.node, "CHECK", conf_check, "c1", netns)
    assert (rc, out) == (0, None)
    pod.ip("route del default")
    rc, out = invoke(lab.node, "CHECK", conf_check, "c1", netns)
    assert rc == 1 and out["code"] >= 100 and "169.254.1.1" in out["msg"]
    # DEL: unregistered, veth gone, address released; a second DEL succeeds too
    rc, out = invoke(lab.node, "DEL", conf, "c1", netns)
    assert (rc, out) == (0, None)
    assert "default.c1" not in daemon.pods
    assert {"op": "pod_del", "name": "default.c1", "container_id": "c1"} in daemon.requests
    assert host_if not in lab.node.ip("link show")
    assert not (tmp / "ipam" / "podnet" / "10.244.1.10").exists()
    assert invoke(lab.node, "DEL", conf, "c1", netns) == (0, None)
    assert invoke(lab.node, "DEL", conf, "c1", "") == (0, None)  # the spec allows an empty CNI_NETNS


def test_two_pods_get_distinct_addresses_and_talk(env: tuple[Lab, FakeDaemon, Path], topo: Topology) -> None:
    lab, daemon, tmp = env
    p1, ns1 = sandbox(topo, "c2")
    p2, ns2 = sandbox(topo, "c3")
    conf = netconf(tmp, daemon.path, version="0.4.0")
    rc1, r1 = invoke(lab.node, "ADD", conf, "c2", ns1)
    rc2, r2 = invoke(lab.node, "ADD", conf, "c3", ns2)
    assert rc1 == rc2 == 0, (r1, r2)
    assert r1["cniVersion"] == "0.4.0"
    a1, a2 = r1["ips"][0]["address"].split("/")[0], r2["ips"][0]["address"].split("/")[0]
    assert a1 != a2
    assert p1.ping(a2) and p2.ping(a1)
    assert daemon.pods["default.c2"]["annotations"] == {}  # no runtime bandwidth -> unshaped


def test_errors_are_cni_json(env: tuple[Lab, FakeDaemon, Path], topo: Topology) -> None:
    lab, daemon, tmp = env
    _pod, netns = sandbox(topo, "c4")
    rc, out = invoke(lab.node, "ADD", netconf(tmp, daemon.path, version="9.9.9"), "c4", netns)
    assert rc == 1 and out["code"] == 1 and out["cniVersion"] == "1.0.0"
    rc, out = invoke(lab.node, "ADD", netconf(tmp, daemon.path), "c4", netns, env_extra={"CNI_IFNAME": None})
    assert rc == 1 and out["code"] == 4 and "CNI_IFNAME" in out["msg"]
    rc, out = invoke(lab.node, "ADD", netconf(tmp, daemon.path), "c4", "/var/run/netns/does-not-exist")
    assert rc == 1 and out["code"] == 3
    rc, out = invoke(lab.node, "ADD", netconf(tmp, daemon.path, bandwidth={"egressRate": 10}), "c4", netns)
    assert rc == 1 and out["code"] == 7 and "unreasonably small" in out["msg"]
    rc, out = invoke(lab.node, "ADD", netconf(tmp, str(tmp / "nobody.sock")), "c4", netns)
    assert rc == 1 and out["code"] == 11
    # the failed ADD undid itself: no veth left, no address kept by IPAM
    assert host_ifname("c4", "eth0") not in lab.node.ip("link show")
    assert not list((tmp / "ipam" / "podnet").glob("10.244.*"))
    proc = subprocess.run(plugin_argv(), input="{not json", capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CNI_COMMAND": "ADD"},
                          check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 6


def test_daemon_refusal_rolls_back(topo: Topology, tmp_path: Path) -> None:
    lab = Lab(topo)
    daemon = FakeDaemon(str(tmp_path / "refuse.sock"), refuse=True)
    try:
        _pod, netns = sandbox(topo, "c5")
        rc, out = invoke(lab.node, "ADD", netconf(tmp_path, daemon.path), "c5", netns)
        assert rc == 1 and "refused by the test" in out["msg"]
        assert host_ifname("c5", "eth0") not in lab.node.ip("link show")
        assert not list((tmp_path / "ipam" / "podnet").glob("10.244.*"))
    finally:
        daemon.close()
