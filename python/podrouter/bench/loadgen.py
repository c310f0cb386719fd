"""Command-line face of the native load generators, for running inside a namespace.

    ip netns exec NS python3 -m podrouter.bench.loadgen sink --port 9000 --seconds 4
    ip netns exec NS python3 -m podrouter.bench.loadgen blast --dst 10.244.3.1 --port 9000 --seconds 2

Each subcommand prints one JSON object on stdout when it ends (the native call's report) and exits 0,
or prints one line on stderr and exits 1. Every run is bounded (the native code caps it at 30 s).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from podrouter import native


def _check_native() -> None:
    why = native.available()
    if why is not None:  # pragma: no cover - depends on the install
        raise SystemExit(f"loadgen: {why}; install the wheel")
    if not native.has_load_generators():
        raise SystemExit("loadgen: this build of podrouter._native has no load generators (blast.rs)")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m podrouter.bench.loadgen")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("blast", help="send fixed-size UDP datagrams in sendmmsg batches")
    b.add_argument("--dst", required=True)
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--size", type=int, default=18, help="UDP payload bytes (18 = a 64-byte Ethernet frame)")
    b.add_argument("--seconds", type=float, required=True)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument(
        "--rate", type=int, default=None, help="datagrams per second (default: as fast as possible)"
    )
    s = sub.add_parser("sink", help="count UDP datagrams with recvmmsg")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--idle", type=float, default=None, help="stop this long after the last datagram")
    c = sub.add_parser("connect", help="open and reset TCP connections as fast as possible")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--threads", type=int, default=4)
    a = sub.add_parser("accept", help="accept and drop TCP connections")
    a.add_argument("--bind", default="0.0.0.0")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--seconds", type=float, required=True)
    args = p.parse_args(argv)
    _check_native()
    if args.cmd == "blast":
        return native.udp_blast(args.dst, args.port, args.size, args.seconds, args.batch, args.rate)
    if args.cmd == "sink":
        return native.udp_sink(args.bind, args.port, args.seconds, args.idle)
    if args.cmd == "connect":
        return native.tcp_connect_rate(args.dst, args.port, args.seconds, args.threads)
    return {"accepted": native.tcp_accept_sink(args.bind, args.port, args.seconds)}


def main(argv: list[str] | None = None) -> int:
    try:
        report = run(argv)
    except (OSError, ValueError) as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
