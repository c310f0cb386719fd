"""A fabric router for the lab: BIRD 2 in a router's namespace, eBGP to each node, importing what
the nodes announce into its kernel table (docs/bgp.md). Used by the BGP tests, the demo and the bench;
the node side is podrouter's own (podrouter.bgp).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podrouter.bgp import BgpError, control, parse_protocols
from podrouter.demo.netns import Host

FABRIC_ASN = 64500
NODE_ASN = 64512
HOLD_TIME = 6  # short timers keep the lab quick (docs/testing.md)
CONNECT_RETRY = 1


@dataclass
class Fabric:
    host: Host
    proc: subprocess.Popen[bytes]
    ctl: Path
    neighbors: dict[str, int]

    def sessions(self) -> dict[str, str]:
        """neighbor address -> BGP state as R sees it."""
        try:
            protos = parse_protocols(control(self.ctl, "show protocols all"))
        except BgpError:
            return {}
        return {addr: protos.get(_proto(addr), {}).get("bgp_state", "down") for addr in self.neighbors}

    def routes(self, family: int = 4) -> dict[str, str]:
        """R's kernel routes learnt from BIRD: destination -> gateway (IPv6: "gateway dev link",
        the next hops being link-local)."""
        out = self.host.try_run(["ip", f"-{family}", "-j", "route", "show", "proto", "bird"])
        if out.returncode != 0 or not out.stdout.strip():
            return {}
        if family == 4:
            return {r["dst"]: r.get("gateway", "") for r in json.loads(out.stdout)}
        return {r["dst"]: f"{r.get('gateway', '')} dev {r.get('dev', '')}" for r in json.loads(out.stdout)}

    def wait_routes(
        self, want: dict[str, str | None], timeout: float = 30, family: int = 4
    ) -> dict[str, str]:
        """Until R's table matches `want` (dst -> gateway as routes() shows it; None: absent). Bounded."""
        deadline = time.monotonic() + timeout
        got: dict[str, str] = {}
        while time.monotonic() < deadline:
            got = self.routes(family)
            if all(got.get(d) == gw for d, gw in want.items()):
                return got
            time.sleep(0.2)
        raise AssertionError(f"R's routes {got} never matched {want} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BgpError):
                control(self.ctl, "down")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _proto(addr: str) -> str:
    return "n_" + addr.replace(".", "_")


def fabric_config(router_id: str, neighbors: dict[str, int], asn: int = FABRIC_ASN) -> str:
    lines = [
        f"router id {router_id};",
        "log stderr { warning, error, fatal };",
        "protocol device { scan time 10; }",
        # what BGP learns goes into R's main tables; nothing of the kernel's goes back out
        "protocol kernel { ipv4 { import none; export all; }; }",
        "protocol kernel { ipv6 { import none; export all; }; }",
    ]
    for addr, peer_as in neighbors.items():
        lines += [
            f"protocol bgp {_proto(addr)} {{",
            f"  neighbor {addr} as {peer_as};",
            f"  local as {asn};",
            f"  hold time {HOLD_TIME}; connect delay time 1; connect retry time {CONNECT_RETRY};",
            "  error wait time 1, 5;",
            "  graceful restart on;",
            "  ipv4 { import all; export none; };",
            # the nodes' IPv6 pod CIDRs over the same IPv4 session (multiprotocol BGP); their next
            # hop is the node's link-local address, used as is (gateway direct, the default for a
            # direct session): `via fe80::... dev <link>`
            "  ipv6 { import all; export none; };",
            "}",
        ]
    return "\n".join(lines) + "\n"


def start_fabric(
    host: Host, rundir: Path, router_id: str, neighbors: dict[str, int], asn: int = FABRIC_ASN
) -> Fabric:
    """BIRD on `host` with one eBGP session per neighbor (address -> its AS)."""
    bird = shutil.which("bird") or "/usr/sbin/bird"
    rundir.mkdir(parents=True, exist_ok=True)
    conf, ctl = rundir / "fabric.conf", rundir / "fabric.ctl"
    conf.write_text(fabric_config(router_id, neighbors, asn))
    proc = host.popen(
        [bird, "-f", "-c", str(conf), "-s", str(ctl), "-P", str(rundir / "fabric.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the fabric's bird exited with {proc.returncode}")
        try:
            control(ctl, "show status", timeout=1.0)
            return Fabric(host, proc, ctl, dict(neighbors))
        except BgpError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the fabric's bird did not open its control socket")


def node_bgp(peer: str, **extra: Any) -> dict[str, Any]:
    """A node's `bgp:` section towards the fabric router at `peer`, with the lab's short timers."""
    return {
        "enabled": True,
        "asn": NODE_ASN,
        "peers": [
            {"address": peer, "asn": FABRIC_ASN, "hold_time": HOLD_TIME, "connect_retry": CONNECT_RETRY}
        ],
        **extra,
    }


__all__ = ["FABRIC_ASN", "NODE_ASN", "Fabric", "fabric_config", "node_bgp", "start_fabric"]
