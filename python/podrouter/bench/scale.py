"""Control-plane scale: one daemon watching thousands of nodes registered in a real etcd.

The reference topology is built in namespaces; a one-member etcd (the Debian `etcd-server` binary) runs
in R's namespace. node1's daemon discovers peers through it (tunnel mode, VXLAN); node2 runs a daemon
with static peers only (the far end of the loss stream). Simulated nodes `simNNNNN` are written under
the key layout every daemon watches (`<prefix>/nodes/<name>` = `{"name", "address", "pod_cidrs"}`),
each with an underlay address in 172.20.0.0/14 (behind R, which has no route for it: the encapsulated
probes die there) and a /24 pod CIDR in 10.0.0.0/8 outside the reference pod CIDRs.

Per size step (the registrations of one step are one etcd transaction, so the daemon sees them as one
watch message and rebuilds once):

* `serve_ms`: from the end of the last registration to the first packet that pod1 sends to an address
  of the last-registered node's pod CIDR leaving node1's eth0 VXLAN-encapsulated towards that node's
  address (captured by an AF_PACKET socket on node1's eth0, the probe stream running all along);
* `compile_ms`, `swap_ms`, `routes_ms`, `routes_changed`, `refresh_peers_ms`, `reconcile_ms`: the
  daemon's own timings of that rebuild (status "timings");
* `rss_mb`: the daemon's VmRSS.

Then a churn phase at the largest size registers one node at a time (one table swap each), and a UDP
stream pod1 -> pod2 with sequence numbers runs during every step and the churn; the receiver counts
what arrived, and `lost` must be 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLUSTER = "10.0.0.0/8"
PREFIX = "/podrouter/v1/nodes/"
ETCD_URL = "http://172.16.2.1:2379"  # R's address on node1's segment
ETCD_LOCAL = "http://127.0.0.1:2379"  # the registrar runs in R's namespace
STREAM_PORT = 5001
STREAM_PPS = 2000  # bounded: the stream measures loss, not throughput

FULL_SIZES = (1000, 2000, 5000)
QUICK_SIZES = (100, 200)


def sim_node(i: int) -> tuple[str, str, str]:
    """Simulated node i: (name, underlay address, pod CIDR)."""
    a = 1 + i
    addr = f"172.{20 + (a >> 16)}.{(a >> 8) & 255}.{a & 255}"
    cidr = f"10.{16 + (i >> 8)}.{i & 255}.0/24"
    return f"sim{i:05d}", addr, cidr


# the registrar (run in R's namespace): one txn putting nodes [start, end), prints when it returned
REGISTRAR = r"""
import base64, json, sys, time, http.client
start, end, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def b64(s): return base64.b64encode(s.encode()).decode()
def node(i):
    a = 1 + i
    return (f"sim{i:05d}", f"172.{20 + (a >> 16)}.{(a >> 8) & 255}.{a & 255}",
            f"10.{16 + (i >> 8)}.{i & 255}.0/24")
ops = []
for i in range(start, end):
    name, addr, cidr = node(i)
    v = json.dumps({"name": name, "address": addr, "pod_cidrs": [cidr]}, sort_keys=True)
    ops.append({"request_put": {"key": b64(prefix + name), "value": b64(v)}})
body = json.dumps({"success": ops})
c = http.client.HTTPConnection("127.0.0.1", 2379, timeout=30)
t0 = time.monotonic()
c.request("POST", "/v3/kv/txn", body=body, headers={"Content-Type": "application/json"})
r = c.getresponse(); data = r.read()
t1 = time.monotonic()
if r.status != 200 or b"error" in data[:200]:
    sys.exit(f"txn failed: HTTP {r.status} {data[:300]!r}")
print(json.dumps({"t_sent": t0, "t_done": t1}))
"""

# the probe's capture (node1's namespace): the first VXLAN packet to an outer destination
SNIFFER = r"""
import socket, struct, sys, time
dst, port, timeout = socket.inet_aton(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
# ETH_P_ALL: only "all protocols" sockets get a copy of outgoing frames (dev_queue_xmit_nit)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0)); s.settimeout(0.5)  # 0: keep the socket's protocol
print("ready", flush=True)
end = time.monotonic() + timeout
while time.monotonic() < end:
    try:
        f, meta = s.recvfrom(2048)
    except TimeoutError:
        continue
    if meta[2] != socket.PACKET_OUTGOING or len(f) < 42 or f[12:14] != b"\x08\x00":
        continue
    ihl = (f[14] & 15) * 4
    if f[23] == 17 and f[30:34] == dst and struct.unpack("!H", f[14 + ihl + 2:14 + ihl + 4])[0] == port:
        print(time.monotonic(), flush=True); sys.exit(0)
print("timeout", flush=True); sys.exit(1)
"""

# the probe's sender (pod1): a datagram to the target every 2 ms until stdin closes
PROBE = r"""
import socket, sys, threading, time
dst = sys.argv[1]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
while not stop.wait(0.002):
    try: s.sendto(b"probe", (dst, 9))
    except OSError: pass
"""

# the loss stream: sender (pod1) until stdin closes, then END markers; receiver (pod2)
STREAM_TX = r"""
import socket, struct, sys, threading, time
dst, port, pps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
seq, burst, t = 0, max(1, pps // 100), time.monotonic()
errors = 0
while not stop.is_set():
    for _ in range(burst):
        try: s.sendto(struct.pack("!Q", seq) + b"x" * 56, (dst, port)); seq += 1
        except OSError: errors += 1
    t += burst / pps
    time.sleep(max(0.0, t - time.monotonic()))
time.sleep(0.5)
for _ in range(5):
    s.sendto(b"END", (dst, port)); time.sleep(0.05)
print(f'{{"sent": {seq}, "send_errors": {errors}}}', flush=True)
"""
STREAM_RX = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
seen = set(); dups = 0
while True:
    try: d = s.recv(2048)
    except TimeoutError: break
    if d == b"END": break
    if len(d) >= 8:
        n = struct.unpack("!Q", d[:8])[0]
        if n in seen: dups += 1
        seen.add(n)
print(json.dumps({"received": len(seen), "duplicates": dups, "max_seq": max(seen) if seen else -1}))
"""


class ScaleError(RuntimeError):
    pass


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _wait_line(proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> str:
    """The first line `proc` prints (a `ready` handshake); raises if it dies or stays silent."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise ScaleError(f"{what}: no output after {timeout:.0f}s")
    line = proc.stdout.readline().decode().strip()
    if not line:
        err = proc.stderr.read().decode()[-500:] if proc.stderr else ""
        raise ScaleError(f"{what} exited: {err}")
    return line


def _start_etcd(r: Any, data: Path) -> subprocess.Popen[bytes]:
    """A one-member etcd in R's namespace that takes a whole size step (up to 5000 puts, about 1.5 MB)
    in one transaction (the defaults are 128 operations and 1.5 MiB)."""
    peer = "http://127.0.0.1:2380"
    proc = r.popen(
        [
            "etcd", "--name", "scale", "--data-dir", str(data),
            "--listen-client-urls", f"{ETCD_URL},{ETCD_LOCAL}", "--advertise-client-urls", ETCD_URL,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"scale={peer}",
            "--max-txn-ops", "10000", "--max-request-bytes", str(16 << 20),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    code = f"import urllib.request;urllib.request.urlopen('{ETCD_LOCAL}/health',timeout=1)"
    deadline = time.monotonic() + 20
    while r.try_run([sys.executable, "-c", code]).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ScaleError("etcd did not become healthy in 20s")
        time.sleep(0.3)
    return proc


def _configs(ref: Any, workdir: Path) -> dict[str, dict[str, Any]]:
    from podrouter.demo.cluster import node_config

    cfgs = {}
    for node, other in (("node1", "node2"), ("node2", "node1")):
        cfg = node_config(ref, node, workdir, mode="tunnel", protocol="vxlan", masquerade=False)
        cfg["cluster"] = {"pod_cidr": CLUSTER}
        cfg["peers"] = [p for p in cfg["peers"] if p["name"] == other]
        cfg["metrics"] = {"listen": None}
        cfgs[node] = cfg
    cfgs["node1"]["discovery"] = {"backend": "etcd", "etcd": {"endpoints": [ETCD_URL], "lease_ttl": 10}}
    return cfgs


def _settle(cluster: Any, want_peers: int, timeout: float) -> dict[str, Any]:
    """node1's status once it holds `want_peers` peers and no rebuild is pending."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            st = cluster.status("node1", timeout=10)
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        last = st
        if (
            len(st.get("peers", ())) == want_peers
            and st.get("timings", {}).get("last_compile_ms") is not None
        ):
            time.sleep(0.3)
            again = cluster.status("node1", timeout=10)
            if again.get("generation") == st.get("generation"):
                return again
        time.sleep(0.2)
    raise ScaleError(
        f"node1 holds {len(last.get('peers', ()))} peers after {timeout:.0f}s, expected {want_peers}"
    )


def _register(ref: Any, start: int, end: int) -> dict[str, float]:
    r = ref.router.try_run([sys.executable, "-c", REGISTRAR, str(start), str(end), PREFIX], timeout=60)
    if r.returncode != 0:
        raise ScaleError(f"registering sim{start:05d}..sim{end - 1:05d}: {r.stderr.strip()[-300:]}")
    return dict(json.loads(r.stdout))


def _step(ref: Any, cluster: Any, start: int, end: int, static_peers: int, timeout: float) -> dict[str, Any]:
    """Register nodes [start, end) in one txn; measure until the last one's CIDR is served."""
    name, addr, cidr = sim_node(end - 1)
    target = cidr.split("/")[0][:-1] + "1"
    n1, pod1 = ref.nodes["node1"], ref.pods["pod1"].host
    sniff = n1.popen([sys.executable, "-c", SNIFFER, addr, "4789", str(timeout)])
    probe: subprocess.Popen[bytes] | None = None
    try:
        _wait_line(sniff, "the capture on node1")
        probe = pod1.popen([sys.executable, "-c", PROBE, target], stdin=subprocess.PIPE)
        reg = _register(ref, start, end)
        assert sniff.stdout is not None
        line = sniff.stdout.readline().decode().strip()
        sniff.wait(timeout=5)
        if line == "timeout" or not line:
            raise ScaleError(
                f"no packet to {target} left node1 encapsulated towards {addr} in {timeout:.0f}s"
            )
        seen = float(line)
    finally:
        if probe is not None and probe.stdin is not None:
            probe.stdin.close()
            probe.wait(timeout=5)
        if sniff.poll() is None:
            sniff.kill()
            sniff.wait()
    st = _settle(cluster, end + static_peers, timeout)
    t = st.get("timings", {})
    routes_ms = t.get("last_routes_ms")
    changed = t.get("last_routes_changed")
    return {
        "nodes": end,
        "registered": end - start,
        "register_ms": round((reg["t_done"] - reg["t_sent"]) * 1000, 1),
        "serve_ms": round((seen - reg["t_done"]) * 1000, 1),
        "compile_ms": t.get("last_compile_ms"),
        "swap_ms": t.get("last_swap_ms"),
        "refresh_peers_ms": t.get("last_refresh_peers_ms"),
        "routes_ms": routes_ms,
        "routes_changed": changed,
        "routes_per_s": round(changed / routes_ms * 1000) if routes_ms and changed else None,
        "reconcile_ms": t.get("last_reconcile_ms"),
        "rss_mb": _rss_mb(int(st["pid"])),
        "generation": st.get("generation"),
        "probe": f"pod1 -> {target} seen on node1 eth0 as VXLAN to {addr} ({name})",
    }


def run(
    quick: bool, log: Any, sizes: tuple[int, ...] | None = None, churn: int | None = None
) -> dict[str, Any]:
    from podrouter.demo.cluster import Cluster
    from podrouter.demo.multi import stop_proc
    from podrouter.demo.netns import Topology, reference_topology

    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    churn = (3 if quick else 10) if churn is None else churn
    out: dict[str, Any] = {
        "sizes": list(sizes),
        "probe": "AF_PACKET capture on node1's eth0: pod1's datagram to the last-registered node's pod "
        "CIDR leaving VXLAN-encapsulated towards that node's address",
        "stream_pps": STREAM_PPS,
        "steps": [],
        "errors": [],
    }
    if shutil.which("etcd") is None:
        out["errors"].append("etcd is not installed (scripts/bootstrap.sh installs etcd-server)")
        return out
    data = Path(tempfile.mkdtemp(prefix="podrouter-scale-etcd-"))
    with Topology("bs") as topo:
        ref = reference_topology(topo)
        etcd = None
        cluster = Cluster(ref)
        rx = tx = None
        try:
            etcd = _start_etcd(ref.router, data)
            t0 = time.monotonic()
            cluster.start(_configs(ref, cluster.workdir), ready_timeout=60)
            log(f"scale: etcd and 2 daemons ready in {time.monotonic() - t0:.1f}s")
            pod2 = ref.pods["pod2"]
            rx = pod2.host.popen([sys.executable, "-c", STREAM_RX, str(STREAM_PORT), "30"])
            _wait_line(rx, "the stream receiver in pod2")
            if not ref.pods["pod1"].host.ping(pod2.ip, count=2):
                raise ScaleError("pod1 cannot ping pod2 before the registrations")
            tx = ref.pods["pod1"].host.popen(
                [sys.executable, "-c", STREAM_TX, pod2.ip, str(STREAM_PORT), str(STREAM_PPS)],
                stdin=subprocess.PIPE,
            )
            st0 = cluster.status("node1")
            out["baseline_rss_mb"] = _rss_mb(int(st0["pid"]))
            gen0 = st0["generation"]
            prev = 0
            timeout = 60.0 if quick else 180.0
            for size in sizes:
                step = _step(ref, cluster, prev, size, 1, timeout)
                out["steps"].append(step)
                log(
                    f"scale: {size} nodes: served {step['serve_ms']:.0f} ms after the last registration; "
                    f"compile {step['compile_ms']} ms, swap {step['swap_ms']} ms, "
                    f"{step['routes_changed']} routes in {step['routes_ms']} ms, RSS {step['rss_mb']} MB"
                )
                prev = size
            swaps: list[dict[str, Any]] = []
            for k in range(churn):
                # one node at a time, each a table swap at full size (rebuilds are rate-limited to 1/s)
                time.sleep(1.1)
                swaps.append(_step(ref, cluster, prev, prev + 1, 1, timeout))
                prev += 1
                log(f"scale: churn {k + 1}/{churn}: served in {swaps[-1]['serve_ms']:.0f} ms")
            if swaps:
                out["churn"] = {
                    "swaps": len(swaps),
                    "serve_ms": [s["serve_ms"] for s in swaps],
                    "compile_ms": [s["compile_ms"] for s in swaps],
                    "swap_ms": [s["swap_ms"] for s in swaps],
                    "reconcile_ms": [s["reconcile_ms"] for s in swaps],
                }
            out["generations"] = int(cluster.status("node1")["generation"]) - int(gen0)
        except Exception as e:  # noqa: BLE001 - reported in the result, the namespaces still go
            out["errors"].append(f"{type(e).__name__}: {e}")
            log(f"scale: FAILED: {type(e).__name__}: {e}")
            if cluster.daemons.get("node1"):
                out["node1_log_tail"] = cluster.daemons["node1"].log_tail(20)
        finally:
            if tx is not None:
                if tx.stdin is not None:
                    tx.stdin.close()
                try:
                    sent = json.loads(tx.stdout.readline() or b"{}") if tx.stdout else {}
                    tx.wait(timeout=10)
                except (subprocess.TimeoutExpired, ValueError):
                    sent = {}
                got: dict[str, Any] = {}
                if rx is not None:
                    try:
                        line = rx.stdout.readline() if rx.stdout else b""
                        got = json.loads(line or b"{}")
                        rx.wait(timeout=10)
                    except (subprocess.TimeoutExpired, ValueError):
                        got = {}
                if "sent" in sent and "received" in got:
                    out["stream"] = {
                        **sent,
                        **got,
                        "lost": int(sent["sent"]) - int(got["received"]),
                        "pair": "pod1->pod2 (node1 -> node2, VXLAN across R)",
                    }
                    log(f"scale: stream {sent['sent']} sent, {got['received']} received")
                else:
                    out["errors"].append(f"the loss stream did not report (sender {sent}, receiver {got})")
            cluster.close()
            if etcd is not None:
                stop_proc(etcd)
            shutil.rmtree(data, ignore_errors=True)
    steps = out["steps"]
    if steps:
        last = steps[-1]
        out["goal"] = {
            "compile_plus_swap_ms_at_largest": round((last["compile_ms"] or 0) + (last["swap_ms"] or 0), 3),
            "target_ms": 100,
        }
    return out


def table(res: dict[str, Any]) -> str:
    """The growth curve as text."""
    rows: list[tuple[str, ...]] = [
        (
            "nodes",
            "serve ms",
            "compile ms",
            "swap ms",
            "routes",
            "routes ms",
            "routes/s",
            "refresh ms",
            "RSS MB",
        )
    ]
    for s in res.get("steps", []):
        rows.append(
            tuple(
                "-" if s.get(k) is None else str(s[k])
                for k in (
                    "nodes",
                    "serve_ms",
                    "compile_ms",
                    "swap_ms",
                    "routes_changed",
                    "routes_ms",
                    "routes_per_s",
                    "refresh_peers_ms",
                    "rss_mb",
                )
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["Control-plane scale (one daemon, peers from etcd)"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    ch = res.get("churn")
    if ch:
        lines.append(
            f"churn at {res['steps'][-1]['nodes'] if res.get('steps') else '?'} nodes: {ch['swaps']} swaps, "
            f"serve ms max {max(ch['serve_ms'])}, compile ms max {max(ch['compile_ms'] or [0])}, "
            f"swap ms max {max(ch['swap_ms'] or [0])}"
        )
    st = res.get("stream")
    if st:
        lines.append(
            f"loss stream {st['pair']} at {res.get('stream_pps')} pps during all registrations: "
            f"{st['sent']} sent, {st['received']} received, {st['lost']} lost"
        )
    for e in res.get("errors", []):
        lines.append(f"  ! scale: {e}")
    return "\n".join(lines)


def plot(res: dict[str, Any], out: Path) -> Path | None:
    steps = res.get("steps") or []
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [s["nodes"] for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    curves = (
        ("compile_ms", "compile"),
        ("swap_ms", "swap"),
        ("routes_ms", "routes"),
        ("refresh_peers_ms", "peer refresh"),
        ("serve_ms", "registration -> served"),
    )
    for key, label in curves:
        ax.plot(n, [s.get(key) or 0 for s in steps], marker="o", label=label)
    ax.axhline(100, color="grey", linestyle="--", linewidth=0.8, label="100 ms goal (compile + swap)")
    ax.set_xlabel("nodes")
    ax.set_ylabel("ms")
    ax.set_title("Rebuild time per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    axes[1].plot(n, [s.get("routes_per_s") or 0 for s in steps], marker="o")
    axes[1].set_title("Kernel routes programmed per second")
    axes[1].set_xlabel("nodes")
    axes[1].grid(alpha=0.3)
    axes[2].plot(n, [s.get("rss_mb") or 0 for s in steps], marker="o")
    axes[2].set_title("Daemon RSS [MB]")
    axes[2].set_xlabel("nodes")
    axes[2].grid(alpha=0.3)
    fig.suptitle("podrouter control-plane scale: one daemon, peers registered in etcd")
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
