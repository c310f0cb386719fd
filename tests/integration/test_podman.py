"""A real container runtime: Podman (CNI network backend) starts containers on a podrouter node.

node1 of the reference topology runs `podrouter run` (hybrid: node3 native, node2 over VXLAN;
masquerade on; bandwidth shaping on) and Podman, whose network namespace is node1's (`nsenter --net`,
so the plugin's host-side veth ends in node1 while Podman's own files stay where the test put them).
The network is a conflist with podrouter-cni and host-local IPAM; containers run from a busybox-static
root filesystem (`--rootfs`), so nothing is pulled. All Podman state (storage, run dir, tmp dir, network
config, IPAM data) lives in a per-test directory; containers get a per-test cgroup parent, removed at
the end. The one global thing Podman's CNI library writes is its result cache under /var/lib/cni
(entries removed at DEL; the directories, if the test created them, are removed at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import DaemonHandle, Daemons, ref_config, short_dir, wait_for

from nettopo import Host, ReferenceTopology, capture

CNI_PLUGINS = "/usr/lib/cni"
CNI_CACHE = Path("/var/lib/cni")
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ip", "ping", "sleep", "cat", "wget", "nc", "true")
NET = "podnet"
IFB = "podr-pm0"  # the shaping IFB inside node1's namespace
RATE = 50_000_000  # the network's egress rate for every container (runtimeConfig in the conflist)


@dataclass
class Podman:
    """`podman` inside a node's network namespace, with every path of its own under `base`."""

    node: Host
    base: Path
    sock: str
    cgroup_parent: str

    @property
    def netconf_dir(self) -> Path:
        return self.base / "net"

    @property
    def rootfs(self) -> Path:
        return self.base / "rootfs"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.base / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf"),
            "TMPDIR": str(self.base / "tmp"),
        }

    def run(self, *args: str, check: bool = True, timeout: float = 90) -> str:
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.node.ns}",
            "podman",
            "--root",
            str(self.base / "root"),
            "--runroot",
            str(self.base / "runroot"),
            "--storage-driver",
            "vfs",
            "--tmpdir",
            str(self.base / "tmp"),
            *args,
        ]
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def start(self, name: str) -> str:
        """A container that sleeps, on the podrouter network; returns its ID."""
        return self.run(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NET,
            "--cgroup-parent",
            self.cgroup_parent,
            "--rootfs",
            str(self.rootfs),
            "/bin/sleep",
            "600",
        ).strip()

    def exec(self, name: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [
            "nsenter",
            f"--net=/run/netns/{self.node.ns}",
            "podman",
            "--root",
            str(self.base / "root"),
            "--runroot",
            str(self.base / "runroot"),
            "--storage-driver",
            "vfs",
            "--tmpdir",
            str(self.base / "tmp"),
            "exec",
            name,
            *cmd,
        ]
        return subprocess.run(
            argv, capture_output=True, text=True, env=self.env(), timeout=timeout, check=False
        )

    def ping(self, name: str, dst: str) -> bool:
        return self.exec(name, "ping", "-c", "2", "-W", "2", dst).returncode == 0

    def address(self, name: str) -> str:
        info = json.loads(self.run("inspect", name))[0]
        return str(info["NetworkSettings"]["Networks"][NET]["IPAddress"])

    def sandbox(self, name: str) -> str:
        return str(json.loads(self.run("inspect", name))[0]["NetworkSettings"]["SandboxKey"])


def _write_setup(base: Path, sock: str, cgroup_parent: str) -> None:
    for d in ("root", "runroot", "tmp", "net", "plugins", "ipam", "rootfs/bin"):
        (base / d).mkdir(parents=True, exist_ok=True)
    # the container image: busybox-static and its applets, nothing else
    shutil.copy2(BUSYBOX, base / "rootfs/bin/busybox")
    for applet in APPLETS:
        (base / "rootfs/bin" / applet).symlink_to("busybox")
    # the plugin directory: the reference plugins and podrouter-cni (run by this test's interpreter)
    for plugin in Path(CNI_PLUGINS).iterdir():
        (base / "plugins" / plugin.name).symlink_to(plugin)
    wrapper = base / "plugins/podrouter-cni"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m podrouter.cni "$@"\n')
    wrapper.chmod(0o755)
    (base / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{base}/runroot"\ngraphroot = "{base}/root"\n'
    )
    # runc and cgroupfs work on cgroup v1, hybrid and v2 hosts; explicit ulimits below the host's
    # (a container runtime without CAP_SYS_RESOURCE may not raise them); no default network
    (base / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        "[network]\n"
        'network_backend = "cni"\n'
        f'cni_plugin_dirs = ["{base}/plugins"]\n'
        f'network_config_dir = "{base}/net"\n'
        f'default_network = "{NET}"\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'runtime = "runc"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{base}/tmp/events.log"\n'
        f'tmp_dir = "{base}/tmp"\n'
        f'static_dir = "{base}/root/libpod"\n'
        f'volume_path = "{base}/root/volumes"\n'
    )
    conflist = {
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [
            {
                "type": "podrouter-cni",
                "podrouterSocket": sock,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.100"}]],
                    "dataDir": str(base / "ipam"),
                },
                # Podman passes no bandwidth of its own: a fixed per-network rate, as runtimeConfig
                "runtimeConfig": {"bandwidth": {"egressRate": RATE, "egressBurst": RATE // 8}},
            }
        ],
    }
    (base / "net" / f"{NET}.conflist").write_text(json.dumps(conflist, indent=2))


def _cgroup_dirs(parent: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    found = [p for p in root.glob(f"*/{parent.strip('/')}") if p.is_dir()]
    direct = root / parent.strip("/")
    return [*found, direct] if direct.is_dir() else found


def _rmdir_tree(path: Path) -> None:
    """cgroup directories are removed with rmdir, deepest first (their files cannot be unlinked)."""
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@pytest.fixture
def node1_with_podman(
    ref: ReferenceTopology, daemons: Daemons
) -> Iterator[tuple[Podman, dict[str, DaemonHandle]]]:
    hybrid = {"mode": "hybrid", "native_when_on_link": True}
    ds = {}
    ds["node1"] = daemons.start(
        ref.nodes["node1"],
        ref_config(
            ref,
            "node1",
            daemons.sockdir,
            mode="hybrid",
            routing=hybrid,
            masquerade={"enabled": True},
            bandwidth={"enabled": True, "node_egress_rate": "1G", "ifb_name": IFB},
        ),
        extra_args=("--log-level", "info"),
    )
    for n in ("node2", "node3"):
        ds[n] = daemons.start(
            ref.nodes[n],
            ref_config(ref, n, daemons.sockdir, mode="hybrid", routing=hybrid),
            extra_args=("--log-level", "info"),
        )
    cache_existed = CNI_CACHE.exists()
    runc_state_existed = Path("/run/runc").exists()
    with short_dir() as base:
        pm = Podman(ref.nodes["node1"], base, ds["node1"].socket, f"/podrouter-test-{secrets.token_hex(4)}")
        _write_setup(base, pm.sock, pm.cgroup_parent)
        try:
            yield pm, ds
        finally:
            pm.run("rm", "-a", "-f", "-t", "0", check=False)
            for d in _cgroup_dirs(pm.cgroup_parent):
                _rmdir_tree(d)
            if not cache_existed:
                _rmdir_tree(CNI_CACHE)
            if not runc_state_existed:
                with contextlib.suppress(OSError):
                    Path("/run/runc").rmdir()


def _pods(d: DaemonHandle) -> dict[str, Any]:
    return {p["name"]: p for p in d.status()["pods"]}


def _invoke(
    pm: Podman, command: str, container_id: str, name: str, netns: str, extra: dict[str, object] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run podrouter-cni the way a runtime does: this network's first plugin config on stdin, the CNI
    variables in the environment, inside the node's network namespace."""
    conf = json.loads((pm.netconf_dir / f"{NET}.conflist").read_text())
    plugin = {**conf["plugins"][0], "cniVersion": conf["cniVersion"], "name": conf["name"], **(extra or {})}
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(pm.base / "plugins"),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME={name}",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{pm.node.ns}", str(pm.base / "plugins/podrouter-cni")],
        input=json.dumps(plugin),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _late_del(pm: Podman, container_id: str, name: str) -> subprocess.CompletedProcess[str]:
    """DEL for a container as a runtime sends it (the sandbox is gone: CNI_NETNS empty)."""
    return _invoke(pm, "DEL", container_id, name, "")


def _check(pm: Podman, container_id: str, name: str) -> subprocess.CompletedProcess[str]:
    """CHECK as a runtime runs it: the config and the ADD result from libcni's cache for this attachment."""
    cached = json.loads((CNI_CACHE / "results" / f"{NET}-{container_id}-eth0").read_text())
    return _invoke(pm, "CHECK", container_id, name, pm.sandbox(name), {"prevResult": cached["result"]})


def test_podman_containers_on_a_podrouter_node(
    node1_with_podman: tuple[Podman, dict[str, DaemonHandle]], ref: ReferenceTopology
) -> None:
    pm, ds = node1_with_podman
    node1 = ds["node1"]
    cid = pm.start("web")
    ip = pm.address("web")
    assert ip.startswith("10.244.1.1"), ip
    entry = _pods(node1)["web"]  # Podman passes the container name as K8S_POD_NAME
    assert entry["ip"] == ip and entry["cni"]["container_id"] == cid and entry["cni"]["ifname"] == "eth0"
    host_if = entry["host_interface"]
    assert f"{ip} dev {host_if}" in ref.nodes["node1"].ip("route show")
    assert entry["shaping"]["egress_bps"] == RATE and entry["shaping"]["error"] is None
    assert "ceil 50Mbit" in ref.nodes["node1"].run(f"tc class show dev {IFB}")
    # inside: the address as /32 and the default route via the link-local gateway
    inside = pm.exec("web", "ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in inside, inside
    # reach pods on other nodes (node3 natively on the shared L2, node2 over VXLAN) and the outside
    paths = {p["name"]: p["path"] for p in node1.status()["peers"]}
    assert paths == {"node2": "vxlan", "node3": "native"}
    assert pm.ping("web", ref.pods["pod3"].ip)
    assert pm.ping("web", ref.pods["pod2"].ip)
    # R never routes pod CIDRs: a reply from the outside comes back only to the masqueraded address
    with capture(ref.external, "eth0", "icmp") as seen:
        assert pm.ping("web", ref.EXTERNAL_ADDR)
    translated = f"{ref.node_addr['node1']} > {ref.EXTERNAL_ADDR}: ICMP echo request"
    assert any(translated in ln for ln in seen), seen
    assert not any(ip in ln for ln in seen)
    # and they reach it
    assert ref.pods["pod2"].host.ping(ip) and ref.pods["pod3"].host.ping(ip)
    # CHECK on Podman's attachment, with the result libcni cached at ADD
    r = _check(pm, cid, "web")
    assert r.returncode == 0 and not r.stdout.strip(), (r.stdout, r.stderr)
    # podman rm: DEL removes the pod from podrouter (registration, route, shaping) and the veth
    pm.run("rm", "-f", "-t", "0", "web")
    assert "web" not in _pods(node1)
    assert ip not in ref.nodes["node1"].ip("route show")
    assert host_if not in ref.nodes["node1"].ip("link show")
    assert "ceil 50Mbit" not in ref.nodes["node1"].run(f"tc class show dev {IFB}")


def test_podman_restart_under_the_same_name_survives_a_late_del(
    node1_with_podman: tuple[Podman, dict[str, DaemonHandle]], ref: ReferenceTopology
) -> None:
    pm, ds = node1_with_podman
    node1 = ds["node1"]
    old = pm.start("app")
    pm.run("rm", "-f", "-t", "0", "app")
    new = pm.start("app")
    assert new != old
    ip = pm.address("app")
    assert _pods(node1)["app"]["cni"]["container_id"] == new
    # the runtime's late (repeated) DEL of the predecessor: same pod name, older container ID
    r = _late_del(pm, old, "app")
    assert r.returncode == 0 and not r.stdout.strip(), (r.stdout, r.stderr)
    entry = wait_for(lambda: _pods(node1).get("app"), timeout=5, what="app still registered")
    assert entry["cni"]["container_id"] == new and entry["ip"] == ip
    assert f"{ip} dev {entry['host_interface']}" in ref.nodes["node1"].ip("route show")
    assert pm.ping("app", ref.pods["pod3"].ip)
    assert ref.pods["pod2"].host.ping(ip)
    # the successor's own DEL still removes it
    pm.run("rm", "-f", "-t", "0", "app")
    assert "app" not in _pods(node1)
