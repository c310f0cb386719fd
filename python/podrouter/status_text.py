"""Status text shared by `podrouter status` (cli.py) and the demo (demo/multi.py), so the demo
prints exactly what the command prints without importing the CLI."""

from __future__ import annotations

from typing import Any


def mesh_lines(m: dict[str, Any]) -> list[str]:
    """The cluster mesh section of `podrouter status`: this cluster, then each remote cluster with its
    nodes and the entries it refused; nothing when no cluster is meshed."""
    if not m.get("clusters"):
        return []
    me = m.get("cluster") or {}
    out = ["", f"cluster mesh: this cluster {me.get('name')} (id {me.get('id')})"]
    for c in m["clusters"]:
        out.append(f"  {c['name']} (id {c['id']}) {c['state']}  {c['mode']}  etcd {c['endpoint']}")
        for n, v in (c.get("nodes") or {}).items():
            out.append(f"    {n:<14} {v['address']:<15} {','.join(v['pod_cidrs'])}")
        for k, why in (c.get("rejected") or {}).items():
            out.append(f"    ! refused {k}: {why}")
    return out
