"""A podrouter cluster in network namespaces: one `podrouter run` per node of the reference topology.

Shared by `podrouter demo` and `podrouter bench`. The cluster writes one YAML config per node into a
private work directory (docs/design.md §4 keys only), starts each daemon inside its node's namespace with
`ip netns exec NODE podrouter run --config FILE`, waits until each answers `status` with
`ready: true`, and reads counters through the same API socket `podrouter status --json` uses.
`close()` sends SIGTERM (the daemon stops, leaving its node state), waits, kills what is still there after
a grace period, and removes the work directory; it is idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from podrouter.demo.netns import Host, ReferenceTopology, parallel

PATHS = ("native", "vxlan", "geneve", "masquerade", "local")  # _native.PATHS (test_native_constants)


class ClusterError(RuntimeError):
    pass


def podrouter_argv() -> list[str]:
    """How to run the `podrouter` command from inside a namespace: the script next to this interpreter
    when there is one (an installed wheel), else the CLI module through this interpreter."""
    exe = Path(sys.executable).parent / "podrouter"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which("podrouter")
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "import sys; from podrouter.cli import main; sys.argv[0] = 'podrouter'; sys.exit(main())",
    ]


def node_config(
    ref: ReferenceTopology,
    node: str,
    workdir: Path,
    *,
    mode: str = "hybrid",
    protocol: str = "vxlan",
    native_when_on_link: bool = True,
    masquerade: bool = True,
    peer_overrides: dict[str, dict[str, str]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    annotations: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """One node's config (docs/design.md §4) for the reference topology.

    `peer_overrides` maps a peer name to `{"mode": ..., "tunnel_protocol": ...}`; `annotations` maps a
    pod name to its annotations. `pods` defaults to every pod of `ref` on this node.
    """
    overrides = peer_overrides or {}
    peers = []
    for name, addr in ref.node_addr.items():
        if name == node:
            continue
        peer: dict[str, Any] = {"name": name, "address": addr, "pod_cidr": ref.node_pod_cidr[name]}
        peer.update(overrides.get(name, {}))
        peers.append(peer)
    if pods is None:
        pods = [
            {
                "name": p.name,
                "ip": p.ip,
                "host_interface": p.host_interface,
                **(
                    {"annotations": dict(annotations[p.name])}
                    if annotations and p.name in annotations
                    else {}
                ),
            }
            for p in ref.pods.values()
            if p.node == node
        ]
    return {
        "node": {
            "name": node,
            "address": ref.node_addr[node],
            "interface": "eth0",
            "pod_cidr": ref.node_pod_cidr[node],
        },
        "cluster": {"pod_cidr": ref.CLUSTER_CIDR},
        "routing": {"mode": mode, "native_when_on_link": native_when_on_link},
        "tunnel": {"protocol": protocol, "vni": 1},
        "masquerade": {"enabled": masquerade},
        "peers": peers,
        "pods": pods,
        "api": {"socket": str(workdir / f"{node}.sock")},
        # each daemon runs in its own namespace, so the loopback address does not clash between them
        "metrics": {"listen": "127.0.0.1:9965"},
    }


@dataclass
class NodeDaemon:
    node: str
    host: Host
    config_path: Path
    socket: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Cluster:
    ref: ReferenceTopology
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="podrouter-lab-")))
    daemons: dict[str, NodeDaemon] = field(default_factory=dict)

    def start(self, configs: dict[str, dict[str, Any]], ready_timeout: float = 30.0) -> None:
        """Start one daemon per entry of `configs` (node name -> config dict), then wait for all."""
        for node, cfg in configs.items():
            self._start_one(node, cfg)
        self.wait_ready(ready_timeout)

    def _start_one(self, node: str, cfg: dict[str, Any]) -> None:
        host = self.ref.nodes[node]
        path = self.workdir / f"{node}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log_path = self.workdir / f"{node}.log"
        d = NodeDaemon(node, host, path, cfg["api"]["socket"], log_path)
        with open(log_path, "wb") as log:
            # a log file, not a pipe: nobody reads the daemon's output while it runs, and a full pipe
            # would block it
            d.proc = host.popen(
                [*podrouter_argv(), "run", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.daemons[node] = d

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.daemons)
        while pending:
            for node in sorted(pending):
                d = self.daemons[node]
                if d.proc is not None and d.proc.poll() is not None:
                    tail = d.log_tail()
                    last = tail.splitlines()[-1] if tail else "(no output)"
                    raise ClusterError(
                        f"the {node} daemon exited with status {d.proc.returncode}: {last}\n{tail}"
                    )
                try:
                    st = self.status(node, timeout=2)
                except (OSError, ValueError):
                    continue
                if st.get("ready"):
                    pending.discard(node)
            if not pending:
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{self.daemons[n].log_tail()}" for n in sorted(pending))
                raise ClusterError(
                    f"daemon(s) not ready after {timeout:.0f}s: {', '.join(sorted(pending))}\n{tails}"
                )
            time.sleep(0.05)  # an in-process request over the API socket: cheap to repeat

    def status(self, node: str, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's `status` reply (what `podrouter status --json` prints)."""
        from podrouter import api

        reply = api.request(self.daemons[node].socket, {"op": "status"}, timeout=timeout)
        if reply.get("ok") is False:
            raise ValueError(str(reply.get("error")))
        return reply

    def packets(self, node: str) -> dict[str, int]:
        """Egress packet counters per path of `node`'s datapath."""
        return path_counters(self.status(node).get("counters", {}), "egress")

    def close(self) -> None:
        procs = [d.proc for d in self.daemons.values() if d.proc is not None and d.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)  # the daemon stops; its node state stays (the stop contract)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        # then the full removal (routes, rules, guards, shaping, the persistent TUN), bounded; each
        # node's in its own namespace, so all of them at once
        parallel(
            [
                functools.partial(
                    d.host.try_run, [*podrouter_argv(), "cleanup", "--config", str(d.config_path)], 30
                )
                for d in self.daemons.values()
            ]
        )
        for d in self.daemons.values():
            if d.proc is not None:
                with contextlib.suppress(ValueError):
                    d.host.procs.remove(d.proc)
        self.daemons.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def path_counters(counters: dict[str, Any], direction: str = "egress") -> dict[str, int]:
    """{path: packets} for one direction from `Datapath.counters()` (`{"packets": {"vxlan/egress": n}}`)."""
    out = dict.fromkeys(PATHS, 0)
    packets = counters.get("packets", {}) if isinstance(counters, dict) else {}
    for key, value in packets.items():
        if isinstance(value, dict):  # tolerate a nested {path: {direction: n}} layout
            if key in out and isinstance(value.get(direction), int):
                out[key] += value[direction]
            continue
        path, _, d = str(key).partition("/")
        if path in out and d == direction and isinstance(value, int):
            out[path] += value
    return out


def delta_path(
    before: dict[str, int], after: dict[str, int], minimum: int = 1
) -> tuple[str | None, dict[str, int]]:
    """The path whose egress counter grew most between two snapshots (None if none grew by `minimum`)."""
    delta = {p: after.get(p, 0) - before.get(p, 0) for p in PATHS}
    best = max(delta, key=lambda p: delta[p])
    return (best if delta[best] >= minimum else None), delta
