"""BGP export of this node's pod CIDRs through BIRD 2 (docs/bgp.md).

podrouter does not speak BGP itself: it writes a bird.conf, runs `bird` as a child process in the
node's namespace (foreground, with a parent-death signal so a killed daemon cannot leave it behind)
and talks to it over BIRD's control socket, the line protocol `birdc` uses (`NNNN-text` lines, a
reply ends with a line whose four-digit code is followed by a space).

What BIRD is told: two static protocols with this node's IPv4 and IPv6 pod CIDRs as `unreachable`
routes (they exist only to be exported; BIRD has no kernel protocol here, so it never touches the
node's routing tables), and one BGP session per `bgp.peers[]` entry, over IPv4, exporting the IPv4
ones with `next hop self` (the node's underlay address) and, on an `ipv6` channel of the same session
(multiprotocol BGP), the IPv6 ones with the node's IPv6 address on the underlay interface as next hop:
a global one if the interface has one, else its link-local fe80:: address (direct sessions only).
Nothing is imported.

Restart without a flap: the sessions carry the graceful-restart capability. On SIGTERM the daemon
asks BIRD for `graceful restart`: it closes its sessions without a NOTIFICATION and the routers keep
the routes (marked stale) for `bgp.graceful_restart_time` seconds. The next daemon starts BIRD with
`-R`, announces the same prefixes and sends End-of-RIB, which clears the stale marks. `podrouter
cleanup` withdraws for real: it brings the sessions up once with nothing to announce (the routers
drop the stale routes on End-of-RIB) and shuts them down.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podrouter.config import Config
from podrouter.errors import EXIT_FAILURE, StartError

log = logging.getLogger("podrouter.bgp")

CONTROL_TIMEOUT = 3.0
START_TIMEOUT = 10.0
RESTART_INTERVAL = 5.0  # seconds between two attempts to restart a BIRD that died
SUN_PATH_MAX = 107
STATIC_PROTOCOL = "podr_pods4"
STATIC_PROTOCOL6 = "podr_pods6"
CONNECT_DELAY = 1  # seconds from a session's start to its first connect attempt
DAD_WAIT = 3.0  # seconds to wait for a tentative (DAD) IPv6 address of the underlay interface
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
# BIRD's reply codes (doc/reply_codes in BIRD's source): 0xxx end of a successful reply, 8xxx/9xxx
# errors; 1002 protocol summary lines, 1006 protocol details, 0014 a route count
_LINE_RE = re.compile(r"^(\d{4})([ -])(.*)$")


class BgpError(Exception):
    pass


@dataclass(frozen=True)
class BirdPaths:
    conf: Path
    ctl: Path
    pid: Path

    @classmethod
    def for_config(cls, cfg: Config) -> BirdPaths:
        """Per node, next to the daemon's state file (tests run many nodes side by side)."""
        base = cfg.state_path.parent / f"{cfg.node.name}.bird"
        return cls(Path(f"{base}.conf"), Path(f"{base}.ctl"), Path(f"{base}.pid"))


def protocol_name(i: int) -> str:
    return f"peer{i}"


def path_problems(cfg: Config) -> list[str]:
    """What keeps BGP from starting, checked before anything is installed (exit 2)."""
    if not cfg.bgp.enabled:
        return []
    out = []
    if bird_binary() is None:
        out.append("bgp.enabled: BIRD 2 ('bird') is not installed (Debian package bird2)")
    ctl = BirdPaths.for_config(cfg).ctl
    if len(str(ctl).encode()) > SUN_PATH_MAX:
        out.append(f"bgp.enabled: the BIRD control socket {ctl} is longer than {SUN_PATH_MAX} bytes")
    return out


def bird_binary() -> str | None:
    return shutil.which("bird") or next(
        (p for p in ("/usr/sbin/bird", "/sbin/bird") if os.access(p, os.X_OK)), None
    )


def announced_cidrs(
    cfg: Config, next_hop6: ipaddress.IPv6Address | None = None
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The prefixes this node announces: its IPv4 pod CIDRs, and its IPv6 ones when the underlay
    interface has an IPv6 address to give as their next hop (docs/bgp.md)."""
    return [
        n
        for n in cfg.node.pod_cidrs
        if isinstance(n, ipaddress.IPv4Network) or (next_hop6 is not None and n.version == 6)
    ]


def v6_pod_cidrs(cfg: Config) -> list[ipaddress.IPv6Network]:
    return [n for n in cfg.node.pod_cidrs if isinstance(n, ipaddress.IPv6Network)]


def carries_ipv6(next_hop6: ipaddress.IPv6Address | None, direct: bool) -> bool:
    """A session gets the ipv6 channel when it has a usable IPv6 next hop: a global address works
    for any session, a link-local one only towards an on-link (direct) peer."""
    return next_hop6 is not None and (direct or not next_hop6.is_link_local)


def underlay_ipv6(
    local_address: ipaddress.IPv4Address, wait: float = DAD_WAIT
) -> ipaddress.IPv6Address | None:
    """The IPv6 next hop for our IPv6 pod CIDRs: an address of the interface that holds the
    underlay address, global (scope universe) preferred over link-local; None if the interface has
    no IPv6 address. A tentative address (duplicate address detection still running, ~1-2 s after
    the link comes up) is waited for up to `wait` seconds, since BIRD ignores tentative addresses;
    one whose DAD failed is never used."""
    from pyroute2.iproute import IPRoute

    deadline = time.monotonic() + wait
    with IPRoute() as ipr:
        while True:
            index = next(
                (
                    m["index"]
                    for m in ipr.get_addr(family=socket.AF_INET)
                    if m.get_attr("IFA_ADDRESS") == str(local_address)
                ),
                None,
            )
            if index is None:
                return None
            ready: list[tuple[int, ipaddress.IPv6Address]] = []
            tentative = False
            for m in ipr.get_addr(family=socket.AF_INET6, index=index):
                flags = m.get_attr("IFA_FLAGS") or m["flags"]
                addr = ipaddress.IPv6Address(m.get_attr("IFA_ADDRESS"))
                if flags & IFA_F_DADFAILED:
                    continue
                if flags & IFA_F_TENTATIVE:
                    tentative = True
                    continue
                if addr.is_link_local or (m["scope"] == 0 and not addr.is_loopback):
                    ready.append((0 if not addr.is_link_local else 1, addr))
            best = min(ready)[1] if ready else None
            if not tentative or time.monotonic() >= deadline or (best and not best.is_link_local):
                return best
            time.sleep(0.1)


def render_config(
    cfg: Config,
    local_address: ipaddress.IPv4Address,
    on_link: Callable[[ipaddress.IPv4Address], bool],
    announce: bool = True,
    next_hop6: ipaddress.IPv6Address | None = None,
) -> str:
    """bird.conf for this node. `announce=False`: the same sessions with nothing to export (cleanup).
    `next_hop6`: the node's IPv6 address on the underlay interface (underlay_ipv6()); without one,
    or without IPv6 pod CIDRs, the sessions carry no ipv6 channel."""
    b = cfg.bgp
    six = bool(v6_pod_cidrs(cfg)) and next_hop6 is not None
    assert b.asn is not None
    router_id = b.router_id or local_address
    lines = [
        f"# written by podrouter for node {cfg.node.name}; regenerated on every start and reload",
        f"router id {router_id};",
        "log stderr { warning, error, fatal };",
        # the device protocol tells BIRD which addresses and links exist (sessions need it)
        "protocol device { scan time 10; }",
        f"protocol static {STATIC_PROTOCOL} {{",
        "  ipv4;",
    ]
    if announce:
        lines += [f"  route {net} unreachable;" for net in announced_cidrs(cfg) if net.version == 4]
    lines.append("}")
    if six:
        lines += [f"protocol static {STATIC_PROTOCOL6} {{", "  ipv6;"]
        if announce:
            lines += [f"  route {net} unreachable;" for net in v6_pod_cidrs(cfg)]
        lines.append("}")
    for i, p in enumerate(b.peers):
        direct = on_link(p.address)
        hop = "direct" if direct else "multihop"
        lines += [
            f"protocol bgp {protocol_name(i)} {{",
            f'  description "podrouter peer {p.address}";',
            f"  local {local_address} as {b.asn};",
            f"  neighbor {p.address} port {p.port} as {p.asn};",
            f"  {hop};",
            f"  hold time {p.hold_time};",
            f"  keepalive time {max(1, p.hold_time // 3)};",
            # the first connect goes out after `connect delay time` (default 5 s), later ones every
            # `connect retry time`; 1 s is the shortest first delay BIRD takes (it rounds 0 up)
            f"  connect delay time {min(p.connect_retry, CONNECT_DELAY)};",
            f"  connect retry time {p.connect_retry};",
            f"  error wait time {p.connect_retry}, {max(p.connect_retry, 30)};",
        ]
        if p.password is not None:
            lines.append(f'  password "{p.password}";')
        if b.graceful_restart_time > 0:
            lines += ["  graceful restart on;", f"  graceful restart time {b.graceful_restart_time};"]
        else:
            lines.append("  graceful restart off;")
        lines += [
            "  ipv4 {",
            "    import none;",
            f'    export where proto = "{STATIC_PROTOCOL}";',
            "    next hop self;",
            "  };",
        ]
        if six and carries_ipv6(next_hop6, direct):
            # multiprotocol BGP over the IPv4 session. A link-local next hop goes out as the
            # RFC 2545 pair (:: global, fe80:: link-local); BIRD takes the link-local half from the
            # session's interface, so the router installs `via fe80::... dev <link>`
            lines += [
                "  ipv6 {",
                "    import none;",
                f'    export where proto = "{STATIC_PROTOCOL6}";',
                "    next hop self;",
                f"    next hop address {next_hop6};",
                "  };",
            ]
        lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- control socket


def control(ctl: Path, command: str, timeout: float = CONTROL_TIMEOUT) -> list[tuple[int, str]]:
    """One command over BIRD's control socket: the reply as (code, text) lines. Raises BgpError
    on a connection problem or an error reply (8xxx/9xxx)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(ctl))
            f = s.makefile("rwb")
            _read_reply(f)  # the greeting: 0001 BIRD x.y.z ready.
            f.write(command.encode() + b"\n")
            f.flush()
            return _read_reply(f)
    except OSError as e:
        raise BgpError(f"BIRD control socket {ctl}: {e.strerror or e}") from None


def _read_reply(f: Any) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    code = 0
    while True:
        raw = f.readline(65536)
        if not raw:
            raise BgpError("BIRD closed the control connection")
        line = raw.decode(errors="replace").rstrip("\n")
        m = _LINE_RE.match(line)
        if m is None:
            # " text": a continuation of the previous code
            out.append((code, line[1:] if line.startswith(" ") else line))
            continue
        code, last, text = int(m.group(1)), m.group(2) == " ", m.group(3)
        out.append((code, text))
        if last:
            if code >= 8000:
                raise BgpError(f"BIRD: {text}")
            return out


def parse_protocols(reply: list[tuple[int, str]]) -> dict[str, dict[str, Any]]:
    """`show protocols all` -> {name: {state, info, bgp_state, exported, imported}}."""
    out: dict[str, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for code, text in reply:
        if code == 1002:
            fields = text.split(None, 5)
            if len(fields) < 4 or fields[0] == "Name":
                continue
            cur = {"state": fields[3], "info": fields[5].strip() if len(fields) > 5 else ""}
            out[fields[0]] = cur
        elif code == 1006 and cur is not None:
            t = text.strip()
            if t.startswith("BGP state:"):
                cur["bgp_state"] = t.split(":", 1)[1].strip()
            elif t.startswith("Routes:"):
                m = re.search(r"(\d+) imported.*?(\d+) exported", t)
                if m:  # one Routes line per channel (ipv4, ipv6): the protocol's total
                    cur["imported"] = cur.get("imported", 0) + int(m.group(1))
                    cur["exported"] = cur.get("exported", 0) + int(m.group(2))
            elif t.startswith("Last error:"):
                cur["last_error"] = t.split(":", 1)[1].strip()
    return out


# ------------------------------------------------------------------------------------- speaker


class BgpSpeaker:
    """The BIRD child of one daemon."""

    def __init__(self, cfg: Config, local_address: ipaddress.IPv4Address, on_link: Callable[..., bool]):
        self.cfg = cfg
        self.local_address = local_address
        self.on_link = on_link
        self.paths = BirdPaths.for_config(cfg)
        self.proc: subprocess.Popen[bytes] | None = None
        self._last_restart = -RESTART_INTERVAL
        self.next_hop6: ipaddress.IPv6Address | None = None

    def _render(self) -> str:
        """bird.conf; the IPv6 next hop is looked up again each time (start, SIGHUP)."""
        self.next_hop6 = underlay_ipv6(self.local_address) if v6_pod_cidrs(self.cfg) else None
        if v6_pod_cidrs(self.cfg) and self.next_hop6 is None:
            log.warning("BGP: the underlay interface has no IPv6 address: IPv6 pod CIDRs are not announced")
        return render_config(self.cfg, self.local_address, self.on_link, next_hop6=self.next_hop6)

    def start(self) -> None:
        kill_leftover(self.paths)
        write_private(self.paths.conf, self._render())
        self.proc = launch(self.paths)
        log.info(
            "BGP: bird pid %d announcing %s (IPv6 next hop %s) to %s",
            self.proc.pid,
            ", ".join(str(n) for n in announced_cidrs(self.cfg, self.next_hop6)) or "nothing",
            self.next_hop6 or "-",
            ", ".join(f"{p.address} (AS {p.asn})" for p in self.cfg.bgp.peers),
        )

    def reconfigure(self, cfg: Config) -> None:
        """SIGHUP: rewrite bird.conf and let BIRD apply the difference (a changed pod CIDR is
        withdrawn / announced without touching the sessions; a changed peer restarts its session)."""
        self.cfg = cfg
        write_private(self.paths.conf, self._render())
        reply = control(self.paths.ctl, "configure")
        log.info("BGP: %s", "; ".join(t for _, t in reply if t))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> bool:
        """Called from the daemon's loop: start BIRD again if it died (at most every RESTART_INTERVAL
        seconds; with -R and graceful restart the routers keep our routes meanwhile). True if it
        (re)started it."""
        if self.proc is None or self.proc.poll() is None:
            return False
        now = time.monotonic()
        if now - self._last_restart < RESTART_INTERVAL:
            return False
        self._last_restart = now
        log.error("BGP: bird exited with status %s; starting it again", self.proc.returncode)
        try:
            self.proc = launch(self.paths)
        except BgpError as e:
            log.error("BGP: %s", e)
            return False
        return True

    def status(self) -> dict[str, Any]:
        b = self.cfg.bgp
        sessions: list[dict[str, Any]] = []
        protos: dict[str, dict[str, Any]] = {}
        error = None
        try:
            protos = parse_protocols(control(self.paths.ctl, "show protocols all"))
        except BgpError as e:
            error = str(e)
        for i, p in enumerate(b.peers):
            st = protos.get(protocol_name(i), {})
            state = st.get("bgp_state") or st.get("info") or "unknown"
            sessions.append(
                {
                    "peer": str(p.address),
                    "asn": p.asn,
                    "state": state,
                    "up": state == "Established",
                    "exported": int(st.get("exported", 0)) if state == "Established" else 0,
                    "last_error": st.get("last_error"),
                    "ipv6": bool(v6_pod_cidrs(self.cfg))
                    and carries_ipv6(self.next_hop6, self.on_link(p.address)),
                }
            )
        # IPv6 pod CIDRs count as announced if at least one session carries the ipv6 channel
        carried6 = any(x["ipv6"] for x in sessions)
        cidrs = [str(n) for n in announced_cidrs(self.cfg, self.next_hop6 if carried6 else None)]
        up = [s for s in sessions if s["up"]]
        return {
            "enabled": True,
            "asn": b.asn,
            "router_id": str(b.router_id or self.local_address),
            "bird_pid": self.proc.pid if self.alive() and self.proc else None,
            "error": error,
            "graceful_restart_time": b.graceful_restart_time,
            "prefixes": cidrs,
            "next_hop6": str(self.next_hop6) if self.next_hop6 is not None else None,
            "not_announced": [str(n) for n in self.cfg.node.pod_cidrs if str(n) not in cidrs],
            # what at least one established session carries
            "announced_prefixes": max((s["exported"] for s in up), default=0),
            "sessions": sessions,
        }

    def stop(self) -> None:
        """Graceful restart if configured (the routers keep our routes for the restart time), else a
        clean shutdown that withdraws them."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            cmd = "graceful restart" if self.cfg.bgp.graceful_restart_time > 0 else "down"
            try:
                control(self.paths.ctl, cmd)
            except BgpError as e:
                log.warning("BGP: %s failed (%s); terminating bird", cmd, e)
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            log.info("BGP: bird stopped (%s)", cmd)
        self.proc = None
        for p in (self.paths.ctl, self.paths.pid):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def write_private(path: Path, text: str) -> None:
    """bird.conf may hold TCP-MD5 passwords: readable by root only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def launch(paths: BirdPaths, recovery: bool = True) -> subprocess.Popen[bytes]:
    """bird in the foreground, killed by the kernel if its parent (the daemon) dies."""
    bird = bird_binary()
    if bird is None:
        raise BgpError("BIRD 2 ('bird') is not installed")
    argv = [bird, "-f", "-c", str(paths.conf), "-s", str(paths.ctl), "-P", str(paths.pid)]
    if recovery:
        argv.append("-R")  # we may be the restarting side of a graceful restart
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        argv = [setpriv, "--pdeathsig", "KILL", *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BgpError(f"bird exited with status {proc.returncode} at start (see the log above)")
        try:
            control(paths.ctl, "show status", timeout=1.0)
            return proc
        except BgpError:
            time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=5)
    raise BgpError(f"bird did not open its control socket {paths.ctl} within {START_TIMEOUT:.0f}s")


def connection_refused(proto: dict[str, Any]) -> bool:
    """A session whose last connect attempt was refused (BIRD's `Last error: Socket: Connection
    refused`): the peer's address answers, but no BGP speaker listens there."""
    return "connection refused" in str(proto.get("last_error") or "").lower()


def _pid_is_bird(pid: int, paths: BirdPaths) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        any(Path(c.decode(errors="replace")).name == "bird" for c in cmd) and str(paths.ctl).encode() in cmd
    )


def kill_leftover(paths: BirdPaths) -> bool:
    """A bird of ours that outlived its daemon (only without setpriv): stop it. True if one ran."""
    try:
        pid = int(paths.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if not _pid_is_bird(pid, paths):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    return True


def withdraw(
    cfg: Config,
    local_address: ipaddress.IPv4Address,
    on_link: Callable[..., bool],
    timeout: float = 15.0,
) -> list[str]:
    """`podrouter cleanup`: make the routers forget this node's prefixes now rather than after the
    graceful-restart time. BIRD comes up once with the same sessions and nothing to announce; each
    router that kept our routes as stale drops them on our End-of-RIB; then the sessions close."""
    paths = BirdPaths.for_config(cfg)
    done = []
    if kill_leftover(paths):
        done.append("stopped a leftover bird")
    # the same channels as the running daemon had (an empty ipv6 channel withdraws the IPv6 prefixes)
    nh6 = underlay_ipv6(local_address) if v6_pod_cidrs(cfg) else None
    write_private(paths.conf, render_config(cfg, local_address, on_link, announce=False, next_hop6=nh6))
    proc = launch(paths)
    try:
        deadline = time.monotonic() + timeout
        names = [protocol_name(i) for i in range(len(cfg.bgp.peers))]
        up: set[str] = set()
        refused: set[str] = set()
        # a router that refuses the connection (nothing listens on its BGP port: its speaker is
        # stopped) cannot hold our routes; waiting for it would only run out the timeout
        while time.monotonic() < deadline and len(up | refused) < len(names) and proc.poll() is None:
            with contextlib.suppress(BgpError):
                protos = parse_protocols(control(paths.ctl, "show protocols all"))
                up = {n for n in names if protos.get(n, {}).get("bgp_state") == "Established"}
                refused = {n for n in names if n not in up and connection_refused(protos.get(n, {}))}
            time.sleep(0.1)
        if up:
            # End-of-RIB goes out right after the (empty) initial update; give it a moment on the wire
            time.sleep(1.0)
        for i, p in enumerate(cfg.bgp.peers):
            if protocol_name(i) in up:
                done.append(f"BGP: withdrew this node's prefixes from {p.address}")
            elif protocol_name(i) in refused:
                done.append(
                    f"BGP: {p.address} refused the connection (no BGP speaker listening): "
                    "nothing to withdraw there"
                )
            else:
                done.append(
                    f"BGP: {p.address} did not answer; it drops our prefixes when its "
                    f"graceful-restart timer ({cfg.bgp.graceful_restart_time}s) runs out"
                )
        with contextlib.suppress(BgpError):
            control(paths.ctl, "down")
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for f in (paths.ctl, paths.pid, paths.conf):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    return done


__all__ = [
    "BgpError",
    "BgpSpeaker",
    "BirdPaths",
    "announced_cidrs",
    "carries_ipv6",
    "control",
    "parse_protocols",
    "path_problems",
    "render_config",
    "underlay_ipv6",
    "withdraw",
]


def start_speaker(cfg: Config, address: ipaddress.IPv4Address, on_link: Callable[..., bool]) -> BgpSpeaker:
    """The daemon's start: announce this node's pod CIDRs through BIRD, once its routes are in
    place. A failure stops the start (exit 1)."""
    speaker = BgpSpeaker(cfg, address, on_link)
    try:
        speaker.start()
    except BgpError as e:
        raise StartError([f"bgp: {e}"], EXIT_FAILURE) from None
    return speaker


def reload(speaker: BgpSpeaker, old: Config, new: Config) -> None:
    """SIGHUP: reconfigure BIRD when the BGP settings or the pod CIDRs changed (a failure is logged:
    BIRD keeps announcing what it did)."""
    if old.bgp == new.bgp and old.node.pod_cidrs == new.node.pod_cidrs:
        return
    try:
        speaker.reconfigure(new)
    except BgpError as e:
        log.error("BGP reconfiguration failed: %s", e)
