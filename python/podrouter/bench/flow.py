"""A long-lived TCP flow that measures its own stalls (restart tests and the `restart` bench leg).

    python -m podrouter.bench.flow serve ADDR PORT              # one connection; JSON report on EOF
    python -m podrouter.bench.flow send ADDR PORT SECONDS       # paced sender; JSON report at the end

The sender writes a 1 KiB chunk every millisecond (about 8 Mbit/s: far below any path's capacity,
so a gap is a stall, not congestion) on one connection for SECONDS, then closes it. The receiver
notes the arrival time of every read and reports the bytes received, the longest gap between two
reads (the longest stall) and the moment it began (seconds since the first byte). A reset or a
timeout ends either side with `"ok": false` and the error: the connection did not survive.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

CHUNK = 1024
INTERVAL = 0.001
IO_TIMEOUT = 30.0  # a stall longer than this is a dead flow


def serve(addr: str, port: int) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(1)
        srv.settimeout(IO_TIMEOUT)
        print("listening", file=sys.stderr, flush=True)
        conn, _ = srv.accept()
    total = 0
    first = last = 0.0
    gap, gap_at = 0.0, 0.0
    with conn:
        conn.settimeout(IO_TIMEOUT)
        try:
            while True:
                data = conn.recv(65536)
                now = time.monotonic()
                if not data:
                    break
                if total == 0:
                    first = last = now
                if now - last > gap:
                    gap, gap_at = now - last, last - first
                last = now
                total += len(data)
        except OSError as e:
            return {"ok": False, "error": str(e), "bytes": total, "max_gap_ms": round(gap * 1000, 1)}
    return {
        "ok": True,
        "bytes": total,
        "seconds": round(last - first, 3),
        "max_gap_ms": round(gap * 1000, 1),
        "max_gap_at": round(gap_at, 3),
    }


def send(addr: str, port: int, seconds: float) -> dict[str, Any]:
    chunk = b"x" * CHUNK
    sent = 0
    try:
        with socket.create_connection((addr, port), timeout=10) as s:
            s.settimeout(IO_TIMEOUT)
            end = time.monotonic() + seconds
            due = time.monotonic()
            while time.monotonic() < end:
                s.sendall(chunk)
                sent += CHUNK
                due += INTERVAL
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            s.shutdown(socket.SHUT_WR)
            # wait for the receiver to read everything (it closes on EOF)
            while s.recv(4096):
                pass
    except OSError as e:
        return {"ok": False, "error": str(e), "sent": sent}
    return {"ok": True, "sent": sent}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        report = serve(argv[1], int(argv[2]))
    elif len(argv) >= 4 and argv[0] == "send":
        report = send(argv[1], int(argv[2]), float(argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
