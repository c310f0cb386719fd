"""One measurement between two hosts: TCP throughput (iperf3), UDP forwarding rate (the batched native
load generator), RTT (sockperf ping-pong, or ping) and system CPU time from /proc/stat.

Every server a measurement starts is stopped before it returns, also on failure, and every client
call has a timeout, so a broken path costs at most a few seconds and never leaves a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from podrouter.demo.netns import Host

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class MeasureError(RuntimeError):
    """A measurement that produced no figure (the path is broken or a tool failed)."""


# ------------------------------------------------------------------------------------------- CPU time

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTimes:
    """System-wide CPU seconds from the first line of /proc/stat (all CPUs, all namespaces), and the
    machine's context switches."""

    busy: float  # user + nice + system + irq + softirq + steal
    idle: float  # idle + iowait
    irq: float  # irq + softirq: packet processing that no process is charged for
    steal: float  # time the hypervisor ran something else while this guest's vCPUs had work
    ctxt: int = 0  # context switches (the `ctxt` line)

    @staticmethod
    def now() -> CpuTimes:
        with open("/proc/stat") as f:
            fields = f.readline().split()
            ctxt = next((int(line.split()[1]) for line in f if line.startswith("ctxt ")), 0)
        # cpu user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
        # included in user (proc(5)), so it is not added again.
        v = [int(x) for x in fields[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = v
        return CpuTimes(
            busy=(user + nice + system + irq + softirq + steal) / _CLK_TCK,
            idle=(idle + iowait) / _CLK_TCK,
            irq=(irq + softirq) / _CLK_TCK,
            steal=steal / _CLK_TCK,
            ctxt=ctxt,
        )

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy - other.busy, self.idle - other.idle, self.irq - other.irq,
                        self.steal - other.steal, self.ctxt - other.ctxt)


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` (all their threads) so far; vanished pids count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may contain spaces and parentheses: split after the last ')'
        rest = stat[stat.rindex(")") + 2 :].split()
        total += int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)
    return total / _CLK_TCK


def background_cpu(seconds: float = 1.0) -> float:
    """Busy CPU seconds per second while nothing of ours runs: other users of this shared machine."""
    a, t0 = CpuTimes.now(), time.monotonic()
    time.sleep(seconds)
    return (CpuTimes.now() - a).busy / max(1e-3, time.monotonic() - t0)


# ------------------------------------------------------------------------------------------- helpers


def python() -> str:
    """The interpreter running us; inside `ip netns exec` the same file system is visible."""
    return sys.executable or "python3"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 3) -> tuple[str, str]:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    return out.decode(errors="replace"), err.decode(errors="replace")


@contextlib.contextmanager
def server(
    host: Host, argv: Sequence[str], port: int, proto: str = "tcp", wait: float = 5.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in `host` until the block ends; returns once something listens on `port`."""
    proc = host.popen(list(argv))
    try:
        flag = "-Htln" if proto == "tcp" else "-Huln"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                _, err = _stop(proc)
                raise MeasureError(f"{argv[0]} exited at start: {err.strip()[:300]}")
            r = host.try_run(["ss", flag, f"sport = :{port}"], timeout=5)
            if r.stdout.strip():
                break
            time.sleep(0.05)
        else:
            raise MeasureError(f"{argv[0]} did not listen on {proto}/{port} within {wait:.0f}s")
        yield proc
    finally:
        _stop(proc)
        with contextlib.suppress(ValueError):
            host.procs.remove(proc)


# ------------------------------------------------------------------------------------------- TCP


def tcp_throughput(
    src: Host, dst: Host, dst_ip: str, seconds: float, streams: int, port: int = 5201
) -> dict[str, Any]:
    """iperf3 TCP from `src` to `dst_ip` for `seconds`; receiver-side bytes and rate, and CPU time."""
    secs = max(1, round(seconds))
    with server(dst, ["iperf3", "-s", "-1", "-p", str(port), "-B", dst_ip], port):
        before, t0 = CpuTimes.now(), time.monotonic()
        r = src.try_run(
            [
                "iperf3",
                "-c",
                dst_ip,
                "-p",
                str(port),
                "-t",
                str(secs),
                "-P",
                str(streams),
                "-J",
                "--connect-timeout",
                "3000",
            ],
            timeout=secs + 30,
        )
        cpu = CpuTimes.now() - before
        wall = time.monotonic() - t0
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise MeasureError(f"iperf3 gave no JSON (exit {r.returncode}): {r.stderr.strip()[:300]}") from e
    if "error" in data:
        raise MeasureError(f"iperf3: {data['error']}")
    end = data.get("end", {})
    recv = end.get("sum_received", {})
    sent = end.get("sum_sent", {})
    rx_bytes = int(recv.get("bytes", 0))
    if rx_bytes <= 0:
        raise MeasureError("iperf3 moved no data")
    # iperf3 reports its own CPU use (client "host", server "remote") in percent of the test time
    util = end.get("cpu_utilization_percent", {})
    tool_cpu = (float(util.get("host_total", 0.0)) + float(util.get("remote_total", 0.0))) / 100 * secs
    return {
        "gbps": float(recv.get("bits_per_second", 0.0)) / 1e9,
        "bytes": rx_bytes,
        "seconds": float(recv.get("seconds", secs)),
        "retransmits": int(sent.get("retransmits", 0)),
        "cpu_busy_s": cpu.busy,
        "cpu_irq_s": cpu.irq,
        "cpu_tool_s": tool_cpu,
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------------------- UDP


def udp_rate(
    src: Host, dst: Host, dst_ip: str, seconds: float, size: int = 18, port: int = 9000
) -> dict[str, Any]:
    """Small-datagram forwarding rate: the batched sender in `src`, the receiver counts in `dst`.

    The receiver's count is the figure: what the path delivered, not what the sender offered.
    """
    loadgen = [python(), "-m", "podrouter.bench.loadgen"]
    # the sink may listen well past the sender's end (a slow start), but stops 0.5 s after the
    # last datagram, so the generous bound costs nothing
    sink = dst.popen(
        [
            *loadgen,
            "sink",
            "--bind",
            dst_ip,
            "--port",
            str(port),
            "--seconds",
            f"{seconds + 4.0:.2f}",
            "--idle",
            "0.5",
        ]
    )
    try:
        # the sink is a fresh interpreter: give it time to bind. Datagrams sent earlier are refused
        # (counted as sender errors) and do not distort the receive rate, which is taken from the
        # first to the last datagram the sink saw.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if sink.poll() is not None:
                break
            if dst.try_run(["ss", "-Huln", f"sport = :{port}"], timeout=5).stdout.strip():
                break
            time.sleep(0.05)
        r = src.try_run(
            [
                *loadgen,
                "blast",
                "--dst",
                dst_ip,
                "--port",
                str(port),
                "--size",
                str(size),
                "--seconds",
                f"{seconds:.2f}",
            ],
            timeout=seconds + 20,
        )
        if r.returncode != 0:
            raise MeasureError(f"blast failed: {r.stderr.strip()[:300]}")
        tx = json.loads(r.stdout)
        try:
            out, err = sink.communicate(timeout=seconds + 15)
        except subprocess.TimeoutExpired:
            out, err = b"", b"timeout"
    finally:
        sout, serr = _stop(sink)
        with contextlib.suppress(ValueError):
            dst.procs.remove(sink)
    text = (out.decode(errors="replace") if out else "") or sout
    try:
        rx = json.loads(text.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as e:
        raise MeasureError(
            f"sink gave no report: {(err or b'').decode(errors='replace')[:300]}{serr[:300]}"
        ) from e
    if rx["packets"] <= 0:
        raise MeasureError(f"no datagram arrived (sender offered {tx['packets']})")
    return {
        "rx_pps": float(rx["pps"]),
        "rx_packets": int(rx["packets"]),
        "tx_pps": float(tx["pps"]),
        "tx_packets": int(tx["packets"]),
        "delivered": rx["packets"] / max(1, tx["packets"]),
        "size": size,
    }


# ------------------------------------------------------------------------------------------- RTT


def _sockperf_percentile(text: str, name: str) -> float | None:
    m = re.search(rf"percentile\s+{re.escape(name)}\s*=\s*([0-9.]+)", text)
    return float(m.group(1)) if m else None


def rtt_sockperf(src: Host, dst: Host, dst_ip: str, seconds: float, port: int = 11111) -> dict[str, Any]:
    """UDP ping-pong with sockperf (one message in flight); full round-trip times in microseconds."""
    secs = max(1, round(seconds))
    with server(dst, ["sockperf", "sr", "-i", dst_ip, "-p", str(port)], port, proto="udp"):
        r = src.try_run(
            ["sockperf", "pp", "-i", dst_ip, "-p", str(port), "-t", str(secs), "--full-rtt", "-m", "64"],
            timeout=secs + 20,
        )
    text = _ANSI.sub("", r.stdout + r.stderr)
    p50, p99 = _sockperf_percentile(text, "50.000"), _sockperf_percentile(text, "99.000")
    m = re.search(r"avg-rtt=([0-9.]+)", text)
    n = re.search(r"Total (\d+) observations", text)
    if p50 is None or p99 is None or not n or int(n.group(1)) == 0:
        raise MeasureError(f"sockperf gave no percentiles (exit {r.returncode}): {text.strip()[-300:]}")
    return {
        "p50_us": p50,
        "p99_us": p99,
        "avg_us": float(m.group(1)) if m else None,
        "samples": int(n.group(1)),
    }


def ping_rtt(
    src: Host, dst_ip: str, count: int = 5, interval: float = 0.2, timeout: int = 2
) -> dict[str, Any] | None:
    """ICMP echo; returns {"median_ms", "avg_ms", "min_ms", "max_ms", "loss"} or None when nothing
    came back. The median is what a handful of pings can say reliably on a busy machine."""
    r = src.try_run(
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout), dst_ip],
        timeout=count * (interval + timeout) + 5,
    )
    times = [float(t) for t in re.findall(r"time=([0-9.]+) ms", r.stdout)]
    loss = re.search(r"([0-9.]+)% packet loss", r.stdout)
    if not times:
        return None
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "avg_ms": sum(times) / len(times),
        "max_ms": max(times),
        "loss": float(loss.group(1)) / 100 if loss else None,
    }
