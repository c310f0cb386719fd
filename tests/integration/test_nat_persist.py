"""NAT state survives a daemon restart (issue 11 item 3): node1 of the reference topology
masquerades a pod's long-lived TCP connection to the external host; the daemon is stopped with
SIGTERM and started again, then killed with SIGKILL and started again. Each new process draws a
new random hash seed, so without the NAT snapshot (`<api.socket dir>/<node>.nat`) the connection's
next segment would get another node port and the external host would answer it with a RST. The
external host's socket table (`ss`) must show the same 4-tuple throughout, and no RST may cross
its interface. A corrupt snapshot is reported, counted and ignored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import DaemonHandle, Daemons, wait_for
from test_masquerade import CLIENT, EXT, NODE, PORT, masq_config, metric, metrics, peer_of, start_server

from nettopo import Host, ReferenceTopology, capture

# One connection, driven line by line from stdin: "echo X" is sent over it and the reply printed
# as one JSON line ({"ok": reply, "ms": round-trip} or {"error": ...}); EOF closes it.
LONG_CLIENT = r"""
c, f, seen = connect(DST, PORT, timeout=10)
print(json.dumps({"seen": seen}), flush=True)
for line in sys.stdin:
    word = line.strip()
    t0 = time.monotonic()
    try:
        got = ask(c, f, "echo " + word)
        print(json.dumps({"ok": got, "ms": (time.monotonic() - t0) * 1000}), flush=True)
    except OSError as e:
        print(json.dumps({"error": repr(e)}), flush=True)
        break
c.close()
"""


def snapshot_path(daemons: Daemons, node: str = "node1") -> Path:
    return Path(daemons.sockdir) / f"{node}.nat"


class Client:
    def __init__(self, pod: Host) -> None:
        code = CLIENT + f"DST, PORT = {EXT!r}, {PORT}\n" + LONG_CLIENT
        self.proc = pod.popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        self.seen = peer_of(self.read()["seen"])

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the client's socket has a 10 s timeout
        assert line, "the client exited"
        out: dict[str, Any] = json.loads(line)
        return out

    def echo(self, word: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


def server_peers(ext: Host) -> list[str]:
    """Remote ends of the established connections to the server, as the external host sees them."""
    out = ext.run(["ss", "-Htn", "state", "established", f"( sport = :{PORT} )"])
    return sorted(line.split()[-1] for line in out.splitlines() if line.strip())


def test_masqueraded_tcp_keeps_its_node_port_across_sigterm_and_sigkill(
    ref: ReferenceTopology, daemons: Daemons
) -> None:
    n1, ext, pod = ref.nodes["node1"], ref.external, ref.pods["pod1"].host
    start_server(ext, seconds=180)
    cfg = masq_config(ref, daemons)
    d: DaemonHandle = daemons.start(n1, cfg)
    client = Client(pod)
    try:
        node_ip, node_port = client.seen
        assert node_ip == NODE
        tuple_ = f"{NODE}:{node_port}"
        assert server_peers(ext) == [tuple_]
        assert client.echo("first").get("ok") == "first"
        with capture(ext, "eth0", f"tcp port {PORT} and tcp[tcpflags] & tcp-rst != 0") as rsts:
            for how in ("SIGTERM", "SIGKILL"):
                time.sleep(1.5)  # the mapping is older than 1 s: the periodic snapshot holds it
                if how == "SIGTERM":
                    code, logs = d.stop()
                    assert code == 0, logs[-3000:]
                else:
                    d.kill()
                d = daemons.start(n1, cfg)
                st = d.status()["counters"]["nat_snapshot"]
                assert st["load_error"] is None, st
                assert st["loaded"]["restored"] >= 1 and st["loaded"]["rejected"] == 0, (how, st)
                reply = client.echo(f"after-{how}")
                assert reply.get("ok") == f"after-{how}", (how, reply, d.logs()[-3000:])
                # the same 4-tuple: the external host's one connection still has the old node port
                assert server_peers(ext) == [tuple_], how
        assert rsts == [], rsts
        body = metrics(n1)
        assert metric(body, "podrouter_nat_snapshot_restored") >= 1
        assert metric(body, "podrouter_nat_snapshot_rejected") == 0
        # the snapshot is written while the table changes (0.5 s), not only at stop
        wait_for(lambda: d.counters()["nat_snapshot"]["writes"] >= 1, 5, what="a periodic snapshot write")
        assert snapshot_path(daemons).stat().st_mode & 0o777 == 0o600
    finally:
        client.close()


def test_a_corrupt_snapshot_is_reported_and_ignored(ref: ReferenceTopology, daemons: Daemons) -> None:
    n1, ext, pod = ref.nodes["node1"], ref.external, ref.pods["pod1"].host
    start_server(ext)
    cfg = masq_config(ref, daemons)
    d = daemons.start(n1, cfg)
    client = Client(pod)
    client.close()
    assert d.stop()[0] == 0
    path = snapshot_path(daemons)
    data = bytearray(path.read_bytes())
    assert data[:8] == b"PODRNAT\n" and len(data) >= 48 + 56
    data[48 + 4] ^= 0xFF  # one bit pattern inside the first entry: the checksum no longer matches
    path.write_bytes(bytes(data))
    d = daemons.start(n1, cfg)
    st = d.counters()["nat_snapshot"]
    assert st["loaded"] is None and "checksum" in (st["load_error"] or ""), st
    assert "NAT snapshot refused" in d.logs()
    assert metric(metrics(n1), "podrouter_nat_snapshot_rejected") == 1
    # ignored: masquerade works with an empty table
    client = Client(pod)
    try:
        assert client.seen[0] == NODE
        assert client.echo("fresh").get("ok") == "fresh"
    finally:
        client.close()
    # `podrouter cleanup` after a SIGKILL also removes the snapshot: the next start has an empty table
    time.sleep(1)
    d.kill()
    assert path.exists()
    r = d.cli("cleanup", "--config", str(d.config))
    assert r.returncode == 0, r.stderr
    assert not path.exists() and f"removed {path}" in r.stdout, r.stdout
