"""Keeps masquerade replies away from the node's own stack (docs/design.md §3), through libnftables.

The datapath reads replies to masqueraded flows from a filtered AF_PACKET socket on the underlay
(rust/io/src/af_packet.rs). AF_PACKET sees a *copy*: the original still goes up the node's stack,
which owns no socket on those ports and answers a TCP segment with an RST (RFC 9293 §3.10.7.1,
"if the connection does not exist") and a UDP datagram with an ICMP port unreachable. Either one
kills the translated connection at the remote end. So podrouter installs one nftables table in the
node's namespace whose only rules drop those originals:

    table ip podrouter {
      chain masquerade_replies {
        type filter hook prerouting priority raw; policy accept;
        ip daddr NODE tcp dport LO-HI counter drop
        ip daddr NODE udp dport LO-HI counter drop
      }
    }

Why these choices:

* `prerouting` at priority `raw` (-300) runs before connection tracking (-200), so a node that has
  conntrack loaded never creates entries for packets it is about to drop. The AF_PACKET socket is
  bound to ETH_P_IP and gets its copy from the same protocol list as `ip_rcv` (which runs the hook),
  so the drop cannot hide the reply from the datapath.
* Only TCP and UDP. The node's stack does nothing harmful with an ICMP echo reply or an ICMP error
  (it finds no socket and discards them), and dropping echo replies by identifier would break a
  raw-socket `ping` on the node whose identifier (its pid) falls into the range.
* The port range never overlaps `ip_local_port_range` (checked at start), so no connection of the
  node itself uses these ports.

The table is replaced atomically: one transaction adds the table (a no-op if it exists), deletes it
and adds it again with the rules, so a leftover of a killed daemon is replaced, never duplicated.
`remove_guard()` (shutdown, `podrouter cleanup`) deletes it; it finds the table by its fixed name,
so it needs no state file.

Product code never runs `nft`: commands go to libnftables (`libnftables.so.1`, shipped with the
`nftables` package) as JSON (libnftables-json(5)) through ctypes. With the JSON output flag set,
`nft_run_cmd_from_buffer` parses its input as JSON too (libnftables 0.9.1 and later).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import json
import threading
from typing import Any

TABLE = "podrouter"
CHAIN = "masquerade_replies"
FAMILY = "ip"
PRIORITY_RAW = -300  # NF_IP_PRI_RAW
NFT_CTX_OUTPUT_JSON = 1 << 4  # enum nft_ctx_output_flags (libnftables.h)

_lock = threading.Lock()
_lib: Any = None
_lib_error: str | None = None


class NftError(Exception):
    """libnftables is missing or refused a command (the message is libnftables' own)."""


def _load() -> Any:
    global _lib, _lib_error
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            _lib_error = f"libnftables is not available ({e}); install the nftables package"
            return None
        vp = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = vp
        lib.nft_ctx_free.argtypes = [vp]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [vp, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [vp]
            getattr(lib, fn).restype = ctypes.c_int
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [vp]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [vp, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
        return lib


def unavailable() -> str | None:
    """Why libnftables cannot be used here, or None if it can (checked before anything is touched)."""
    _load()
    return _lib_error


def run(commands: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs one batch of JSON commands (one kernel transaction) and returns the parsed output
    (`{}` when the commands print nothing). Raises NftError with libnftables' message."""
    lib = _load()
    if lib is None:
        raise NftError(str(_lib_error))
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise NftError("nft_ctx_new failed")
    try:
        lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, json.dumps({"nftables": commands}).encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)
    if rc != 0:
        msg = " ".join(line.strip() for line in err.splitlines() if line.strip())
        raise NftError(msg or f"libnftables returned {rc}")
    return json.loads(out) if out.strip() else {}


def _table() -> dict[str, str]:
    return {"family": FAMILY, "name": TABLE}


def _drop_rule(node_address: str, proto: str, lo: int, hi: int) -> dict[str, Any]:
    def match(left: dict[str, Any], right: Any) -> dict[str, Any]:
        return {"match": {"op": "==", "left": left, "right": right}}

    return {
        "rule": {
            "family": FAMILY,
            "table": TABLE,
            "chain": CHAIN,
            "comment": f"masquerade replies ({proto}) go to the datapath only",
            "expr": [
                match({"payload": {"protocol": "ip", "field": "daddr"}}, node_address),
                match({"payload": {"protocol": proto, "field": "dport"}}, {"range": [lo, hi]}),
                {"counter": None},
                {"drop": None},
            ],
        }
    }


def guard_commands(node_address: str, port_range: tuple[int, int]) -> list[dict[str, Any]]:
    """The transaction `install_guard` runs (pure, for tests and `--dry-run` style inspection).

    The address must be a literal: libnftables would resolve a name through DNS."""
    node_address = str(ipaddress.IPv4Address(node_address))
    lo, hi = (int(p) for p in port_range)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"bad port range {lo}-{hi}")
    chain = {
        "family": FAMILY,
        "table": TABLE,
        "name": CHAIN,
        "type": "filter",
        "hook": "prerouting",
        "prio": PRIORITY_RAW,
        "policy": "accept",
    }
    return [
        {"add": {"table": _table()}},
        {"delete": {"table": _table()}},
        {"add": {"table": _table()}},
        {"add": {"chain": chain}},
        {"add": _drop_rule(node_address, "tcp", lo, hi)},
        {"add": _drop_rule(node_address, "udp", lo, hi)},
    ]


def install_guard(node_address: str, port_range: tuple[int, int]) -> None:
    """Installs (or atomically replaces) the table in the current network namespace."""
    run(guard_commands(node_address, port_range))


def remove_guard() -> bool:
    """Deletes the table if it exists. Returns True if there was one."""
    if unavailable() is not None:
        return False
    present = guard_present()
    if present:
        # add + delete: deleting a table that vanished meanwhile must not fail the teardown
        run([{"add": {"table": _table()}}, {"delete": {"table": _table()}}])
    return present


def guard_present() -> bool:
    try:
        run([{"list": {"table": _table()}}])
    except NftError:
        return False
    return True


def guard_counters() -> dict[str, int]:
    """Packets dropped so far by each rule, by protocol (`{}` when the table is absent)."""
    try:
        out = run([{"list": {"table": _table()}}])
    except NftError:
        return {}
    counts: dict[str, int] = {}
    for obj in out.get("nftables", []):
        rule = obj.get("rule") if isinstance(obj, dict) else None
        if not rule:
            continue
        proto = None
        packets = 0
        for e in rule.get("expr", []):
            m = e.get("match") if isinstance(e, dict) else None
            if m and isinstance(m.get("left"), dict) and "payload" in m["left"]:
                p = m["left"]["payload"].get("protocol")
                if p in ("tcp", "udp"):
                    proto = p
            if isinstance(e, dict) and isinstance(e.get("counter"), dict):
                packets = int(e["counter"].get("packets", 0))
        if proto:
            counts[proto] = counts.get(proto, 0) + packets
    return counts


__all__ = [
    "CHAIN",
    "TABLE",
    "NftError",
    "guard_commands",
    "guard_counters",
    "guard_present",
    "install_guard",
    "remove_guard",
    "run",
    "unavailable",
]
