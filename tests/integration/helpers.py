"""Daemon launch helpers for the integration tests: configs for the reference topology, starting a
`podrouter run` inside a node's namespace, waiting (bounded) for readiness, stopping it cleanly.

Every daemon started here is registered with a `Daemons` fixture object that stops it at teardown,
also when the test failed; `Topology.close()` would kill it anyway when the namespaces go.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nettopo import Host, ReferenceTopology, parallel


def podrouter_argv() -> list[str]:
    """The `podrouter` entry point installed beside this interpreter (a venv's), else the one on PATH,
    else the module run by this interpreter."""
    beside = Path(sys.executable).parent / "podrouter"
    if beside.is_file():
        return [str(beside)]
    exe = shutil.which("podrouter")
    return [exe] if exe else [sys.executable, "-m", "podrouter.cli"]


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    d = Path("/tmp") / f"prt-{secrets.token_hex(4)}"
    d.mkdir(mode=0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def ref_config(
    ref: ReferenceTopology,
    node: str,
    sockdir: Path,
    /,  # so that `node={...}` can override keys of the node section
    *,
    mode: str = "tunnel",
    protocol: str = "vxlan",
    peers: list[str] | None = None,
    pods: bool = True,
    dual_stack: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """A config for `node` of the reference topology (its pods registered through `pods:`).
    `dual_stack`: `pod_cidrs: [v4, v6]` everywhere and pods registered with `ips: [v4, v6]`."""
    others = [n for n in ref.nodes if n != node] if peers is None else peers

    def cidrs(n: str) -> dict[str, Any]:
        if dual_stack:
            return {"pod_cidrs": [ref.node_pod_cidr[n], ref.node_pod_cidr6[n]]}
        return {"pod_cidr": ref.node_pod_cidr[n]}

    def pod_entry(p: Any) -> dict[str, Any]:
        if dual_stack and p.ip6:
            return {"name": p.name, "ips": [p.ip, p.ip6], "host_interface": p.host_interface}
        return {"name": p.name, "ip": p.ip, "host_interface": p.host_interface}

    cfg: dict[str, Any] = {
        "node": {
            "name": node,
            "address": ref.node_addr[node],
            "interface": "eth0",
            **cidrs(node),
        },
        "cluster": {"pod_cidrs": [ref.CLUSTER_CIDR, ref.CLUSTER_CIDR6]}
        if dual_stack
        else {"pod_cidr": ref.CLUSTER_CIDR},
        "routing": {"mode": mode},
        "tunnel": {"protocol": protocol},
        "masquerade": {"enabled": False},
        "peers": [{"name": n, "address": ref.node_addr[n], **cidrs(n)} for n in others],
        "pods": [pod_entry(p) for p in ref.pods.values() if p.node == node]
        if pods
        else [],
        "api": {"socket": str(sockdir / f"{node}.sock")},
        "metrics": {"listen": "127.0.0.1:9965"},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class DaemonHandle:
    host: Host
    config: Path
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path  # the daemon's stderr goes to a file: a full pipe nobody reads would block its logging

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return self.host.try_run([*podrouter_argv(), *args], timeout=timeout)

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "--json", "--socket", self.socket)
        if r.returncode not in (0, 1) or not r.stdout.strip():
            raise AssertionError(f"status failed ({r.returncode}): {r.stderr}")
        return json.loads(r.stdout)

    def counters(self) -> dict[str, Any]:
        return self.status()["counters"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        # `ip netns exec` execs the command, so the Popen pid is the daemon itself
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (what a crash looks like)."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15, cleanup: bool = True) -> tuple[int, str]:
        """SIGTERM, wait (bounded), then (unless `cleanup=False`) `podrouter cleanup`: a stopped
        daemon leaves the node's forwarding state for a successor (docs/operations.md), cleanup is
        the full removal. Returns (the daemon's exit status, everything it logged)."""
        self.terminate(timeout)
        if cleanup:
            r = self.cli("cleanup", "--config", str(self.config), timeout=30)
            if r.returncode != 0:
                raise AssertionError(f"cleanup after stop failed ({r.returncode}): {r.stderr}{r.stdout}")
        return self.proc.returncode, self.logs()

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait (bounded); the daemon's state stays (no cleanup). Returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(
                f"daemon did not exit within {timeout}s of SIGTERM:\n{self.logs()[-3000:]}"
            ) from None
        return self.proc.returncode

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Daemons:
    """Starts daemons and stops whatever is still running at teardown."""

    def __init__(self, sockdir: Path, cfgdir: Path) -> None:
        self.sockdir = sockdir
        self.cfgdir = cfgdir
        self.handles: list[DaemonHandle] = []

    def start(
        self,
        host: Host,
        cfg: dict[str, Any],
        ready_timeout: float = 30,
        name: str | None = None,
        extra_args: tuple[str, ...] = ("--log-level", "debug"),
    ) -> DaemonHandle:
        stem = f"{name or cfg['node']['name']}-{secrets.token_hex(2)}"
        path = write_config(self.cfgdir / f"{stem}.yaml", cfg)
        log = self.cfgdir / f"{stem}.log"
        with log.open("wb") as err:
            proc = host.popen(
                [*podrouter_argv(), "run", "--config", str(path), *extra_args],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        h = DaemonHandle(host, path, cfg["api"]["socket"], proc, log)
        self.handles.append(h)
        wait_ready(h, ready_timeout)
        return h

    def stop_all(self) -> None:
        """Stop what still runs, then clean up every node a daemon ran on (a stopped or killed
        daemon leaves its state for a successor; the namespaces may outlive this fixture). The
        nodes are independent: all daemons get SIGTERM at once, and each node's cleanups run in a
        thread of their own (one node's in order, newest first); every one is waited for."""
        parallel([h.terminate for h in self.handles if h.alive()])
        per_node: dict[str, list[DaemonHandle]] = {}
        done: set[tuple[str, str]] = set()
        for h in reversed(self.handles):
            key = (h.host.ns, h.socket)
            if key not in done:
                done.add(key)
                per_node.setdefault(h.host.ns, []).append(h)

        def clean(hs: list[DaemonHandle]) -> None:
            for h in hs:
                with contextlib.suppress(Exception):
                    h.cli("cleanup", "--config", str(h.config), timeout=30)

        parallel([functools.partial(clean, hs) for hs in per_node.values()])


def wait_ready(h: DaemonHandle, timeout: float) -> None:
    """Poll `podrouter status` until it exits 0 (docs/design.md §4b readiness); bounded."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not h.alive():
            raise AssertionError(f"daemon exited with {h.proc.returncode} before ready:\n{h.logs()[-3000:]}")
        r = h.cli("status", "--socket", h.socket, timeout=10)
        if r.returncode == 0:
            return
        last = r.stderr or r.stdout
        time.sleep(0.1)  # each `status` is a process of its own (~75 ms)
    h.proc.kill()
    h.proc.wait(timeout=5)
    raise AssertionError(
        f"daemon not ready after {timeout}s (last status: {last.strip()}):\n{h.logs()[-3000:]}"
    )


def routes(host: Host, table: str = "main") -> list[dict[str, Any]]:
    return json.loads(host.ip(f"-j -d route show table {table}") or "[]")


def our_routes(host: Host) -> dict[str, dict[str, Any]]:
    """Routes with podrouter's protocol (77), keyed by destination."""
    out = {}
    for tbl in ("main", "77"):
        text = host.try_run(["ip", "-j", "-d", "route", "show", "table", tbl, "proto", "77"])
        # a table that was never created (or is empty again) makes `ip` fail: no routes there
        for r in json.loads(text.stdout) if text.returncode == 0 and text.stdout.strip() else []:
            out[r["dst"] if tbl == "main" else f"{r['dst']}@{tbl}"] = r
    return out


def sysctl_value(host: Host, key: str) -> str:
    return host.run(["sysctl", "-n", key]).strip()


def wait_for(pred: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def python_in(host: Host, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python code inside the host's namespace with this interpreter (and this podrouter)."""
    env = dict(os.environ)
    return subprocess.run(
        ["ip", "netns", "exec", host.ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# Source for scripts run in a pod (python_in): the ICMP errors the pod's kernel matched to one of its
# UDP sockets, which is how a test sees that a translated ICMP / ICMPv6 error (its quote restored to
# the pod's own address and port) reached the right socket. `recverr(s)` right after creating the
# socket (an error that arrives before is not queued), then `icmp_error(s, ...)`.
ICMP_ERRORS = r"""
import socket, struct, time


def _recverr(s):
    return (socket.IPPROTO_IPV6, 25) if s.family == socket.AF_INET6 else (socket.IPPROTO_IP, 11)


def recverr(s):
    s.setsockopt(*_recverr(s), 1)  # IP_RECVERR / IPV6_RECVERR


def icmp_error(s, probe=None, probes=3, seconds=6.0, poll=None):
    # The first error queued for the connected socket `s`: dict(errno, origin, type, code, info,
    # offender), or None after `seconds`. `probe`: bytes sent once a second, at most `probes` times;
    # `poll(s)`: called after each second of waiting.
    level, opt = _recverr(s)
    s.setblocking(False)
    deadline, sent, err = time.monotonic() + seconds, 0, None
    while err is None and time.monotonic() < deadline:
        if probe is not None and sent < probes:
            s.send(probe)
            sent += 1
        end = time.monotonic() + 1
        while err is None and time.monotonic() < end:
            try:
                _, anc, _, _ = s.recvmsg(2048, 1024, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                time.sleep(0.05)
                continue
            for lvl, typ, data in anc:
                if (lvl, typ) == (level, opt):
                    # struct sock_extended_err, then the offender's sockaddr (linux/errqueue.h)
                    ee_errno, origin, etype, code, _pad, info, _data = struct.unpack("=IBBBBII", data[:16])
                    if level == socket.IPPROTO_IPV6:
                        offender = socket.inet_ntop(socket.AF_INET6, data[16 + 8 : 16 + 24])
                    else:
                        offender = socket.inet_ntoa(data[16 + 4 : 16 + 8])
                    err = dict(errno=ee_errno, origin=origin, type=etype, code=code)
                    err.update(info=info, offender=offender)
        if poll is not None:
            poll(s)
    return err
"""


def wait_listening(host: Host, port: int, timeout: float = 10) -> None:
    """Waits until a TCP socket listens on `port` in `host` (a server started with popen is not
    ready when popen returns; a fixed sleep is too short on a busy machine and wasted on an idle one)."""
    wait_for(
        lambda: any(
            fields[3].endswith(f":{port}")
            for fields in (line.split() for line in host.run(["ss", "-Htln"]).splitlines())
            if len(fields) > 3
        ),
        timeout,
        interval=0.05,
        what=f"a listener on port {port}",
    )


def etcd_argv(data_dir: Path, client_urls: list[str], *extra: str) -> list[str]:
    """A one-member etcd serving `client_urls` (the first one advertised), its peer port on loopback."""
    peer = "http://127.0.0.1:2380"
    return [
        "etcd", "--name", "t", "--data-dir", str(data_dir),
        "--listen-client-urls", ",".join(client_urls), "--advertise-client-urls", client_urls[0],
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
        *extra,
    ]  # fmt: skip
