"""Turning a benchmark result into a terminal table and PNG plots (the JSON is the result itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from podrouter.bench.suite import METRICS


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "kpps":
        return f"{v:.0f}"
    if unit == "us":
        return f"{v:.1f}"
    if unit == "s/Gbit":
        return f"{v:.2f}"
    return f"{v:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=False))
    )
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
            )
        )
    return "\n".join(out)


def _verdict(r: float, higher_better: bool) -> str:
    """podrouter's ratio to its baseline in words: "worse" is written out wherever it is worse."""
    if abs(r - 1) < 0.005:
        return "equal"
    return "better" if (r > 1) == higher_better else "worse"


def _ratio_cell(r: float, higher_better: bool) -> str:
    """` (0.50x) worse`: the ratio, and the word where podrouter is worse than its baseline."""
    return f" ({r:.2f}x)" + (" worse" if _verdict(r, higher_better) == "worse" else "")


def modes_table(modes: dict[str, Any]) -> str:
    headers = ["mode (pair)"] + [f"{label} [{unit}]" for label, unit, _ in METRICS.values()]
    rows = []
    for name, m in modes.items():
        row = [f"{name} ({m['pair']})"]
        for key, (_, unit, higher_better) in METRICS.items():
            s = m["summary"].get(key)
            if s is None:
                row.append("FAILED" if m["errors"] else "-")
                continue
            cell = _fmt(s["median"], unit)
            if key == "cpu_s_per_gbit" and any(r.get("cpu_disturbed") for r in m["reps"]):
                cell += "*"
            if s["n"] > 1:
                cell += f" ±{_spread_pct(s):.0f}%"
            r = m["ratios"].get(key)
            if r is not None:
                cell += _ratio_cell(r, higher_better)
            row.append(cell)
        rows.append(row)
    return _table(headers, rows)


def _spread_pct(s: dict[str, Any]) -> float:
    """Half the min-max range as a percentage of the median."""
    med = s["median"] or 1e-12
    return 50.0 * (s["max"] - s["min"]) / abs(med)


LEGEND = (
    "Each cell: the median over the repetitions, ±half the min-max range in % of the median (shown when\n"
    "there is more than one repetition), and in parentheses the ratio to the matching kernel baseline\n"
    "(podrouter native and hybrid-native vs kernel-routing; vxlan, geneve, hybrid-tunnel vs kernel-vxlan;\n"
    "native-bgp vs kernel-routing-r, both across R; ovs, Open vSwitch's userspace VXLAN, vs kernel-vxlan;\n"
    'vxlan6 vs kernel-vxlan6 over the IPv6 underlay), followed by "worse" where podrouter is worse.\n'
    "Higher is better for TCP and UDP, lower is better for RTT and CPU per Gbit. UDP counts what the\n"
    "receiver got from the batched sender (18-byte payload = 64-byte Ethernet frames). CPU per Gbit is\n"
    "system-wide busy CPU time (all processes, softirq, the daemons, iperf3 itself) during the TCP runs\n"
    "divided by the gigabits delivered; * = the machine was already busy (> 0.25 CPU) before the\n"
    "setup started, so that figure includes someone else's work."
)


def ovs_comparison(modes: dict[str, Any]) -> str:
    """podrouter's VXLAN against Open vSwitch's userspace VXLAN, metric by metric, with the verdict
    written out ("worse" where podrouter is worse); empty unless both legs were measured."""
    pr, ovs = modes.get("vxlan"), modes.get("ovs")
    if not pr or not ovs:
        return ""
    parts = []
    for key, (label, _, higher_better) in METRICS.items():
        a, b = pr["summary"].get(key), ovs["summary"].get(key)
        if not a or not b or not b["median"]:
            continue
        r = a["median"] / b["median"]
        parts.append(f"{label} {r:.2f}x ({_verdict(r, higher_better)})")
    return "podrouter vxlan vs OVS userspace vxlan: " + ", ".join(parts) if parts else ""


def masquerade_table(masq: dict[str, Any]) -> str:
    if not masq.get("results"):
        return f"masquerade vs nftables: not available ({masq.get('reason', 'not run')})"
    # (key, format, higher is better); the per-connection costs are machine-wide (bench/masq.py)
    cols = [
        ("cps", "{:.0f}", True),
        ("tcp1_gbps", "{:.2f}", True),
        ("cpu_us_per_conn", "{:.0f}", False),
        ("ctxt_per_conn", "{:.2f}", False),
    ]
    headers = ["masquerade", "new conn/s", "TCP 1 stream [Gbit/s]", "CPU us/conn", "ctx switches/conn"]
    rows = []
    for name in ("nftables", "podrouter"):
        r = masq["results"].get(name)
        if r is None:
            rows.append([name] + ["-"] * len(cols))
            continue
        ratio = masq.get("ratios", {}) if name == "podrouter" else {}
        disturbed = any(rep.get("cpu_disturbed") for rep in r.get("reps", []))
        row = [name]
        for key, fmt, higher_better in cols:
            v = r["summary"].get(key, {}).get("median")
            cell = "-" if v is None else fmt.format(v)
            if v is not None and key == "cpu_us_per_conn" and disturbed:
                cell += "*"
            if key in ratio:
                cell += _ratio_cell(ratio[key], higher_better)
            row.append(cell)
        rows.append(row)
    text = _table(headers, rows)
    if masq.get("podrouter_unavailable"):
        text += f"\npodrouter masquerade: not available ({masq['podrouter_unavailable']})"
    return text


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix, d)]


def shaping_text(shaping: dict[str, Any], limit: int = 40) -> str:
    """The QoS benchmark's own result, shown as it comes: scalars as `key: value`, lists of records
    (its per-rate summary) one record per line."""
    if not shaping.get("available"):
        return f"shaping accuracy: not available ({shaping.get('reason', 'not run')})"
    result = shaping.get("result", {})
    lines = ["shaping accuracy (bench/qos_bench.py):"]
    records: list[str] = []
    has_summary = isinstance(result, dict) and isinstance(result.get("summary"), list)
    for k, v in _flatten(result):
        if isinstance(v, list):
            if (k == "summary") if has_summary else len(v) <= 12:
                for item in v:
                    if isinstance(item, dict):
                        records.append("  " + " ".join(f"{ik}={_short(iv)}" for ik, iv in item.items()))
            continue
        lines.append(f"  {k}: {_short(v)}")
    lines.extend(records)
    if has_summary:
        lines.append("  (every measurement is in result.json under shaping.result)")
    if len(lines) > limit:
        lines = [*lines[:limit], f"  ... {len(lines) - limit} more lines in the JSON"]
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def micro_table(micro: dict[str, Any]) -> str:
    if not micro.get("benchmarks"):
        return f"criterion microbenchmarks: {micro.get('reason', 'none found')}"
    headers = ["benchmark", "time [95% CI]", "median", "throughput"]
    rows = []
    for b in micro["benchmarks"]:
        thr = b.get("throughput_per_s")
        rows.append(
            [
                b["id"],
                f"{_ns(b['time_ns'])} [{_ns(b['time_lo_ns'])}, {_ns(b['time_hi_ns'])}]",
                _ns(b["median_ns"]),
                f"{thr / 1e6:.2f} M{b.get('throughput_unit', '')}/s" if thr else "",
            ]
        )
    return _table(headers, rows)


def _ns(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f} ms"
    if v >= 1e3:
        return f"{v / 1e3:.2f} us"
    return f"{v:.1f} ns"


# ------------------------------------------------------------------------------------------- plots


def plots(result: dict[str, Any], out: Path) -> list[Path]:
    """PNG bar charts (median, min-max whiskers) into `out`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe when DISPLAY is set to something unreachable
    import matplotlib.pyplot as plt

    written: list[Path] = []
    modes = result.get("modes", {})
    if modes:
        names = list(modes)
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        for ax, (key, (label, unit, higher)) in zip(axes.flat, METRICS.items(), strict=False):
            meds, lo, hi, colors = [], [], [], []
            for n in names:
                s = modes[n]["summary"].get(key)
                med = s["median"] if s else 0.0
                meds.append(med)
                lo.append(med - s["min"] if s else 0.0)
                hi.append(s["max"] - med if s else 0.0)
                colors.append("#999999" if n.startswith("kernel") else "#1f77b4")
            x = range(len(names))
            ax.bar(x, meds, yerr=[lo, hi], color=colors, capsize=3)
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{label} [{unit}] ({'higher' if higher else 'lower'} is better)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(
            f"podrouter bench ({result.get('profile')}, {result.get('reps')} rep(s)): "
            "grey = kernel baselines, blue = podrouter; whiskers = min..max"
        )
        fig.tight_layout()
        p = out / "modes.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    masq = result.get("masquerade", {})
    if masq.get("results"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 4))
        for ax, (key, label) in zip(
            axes, (("cps", "new connections/s"), ("tcp1_gbps", "TCP 1 stream Gbit/s")), strict=False
        ):
            names = [n for n in ("nftables", "podrouter") if n in masq["results"]]
            stats = [masq["results"][n]["summary"].get(key) for n in names]
            vals = [st["median"] if st else 0.0 for st in stats]
            err = [
                [st["median"] - st["min"] if st else 0.0 for st in stats],
                [st["max"] - st["median"] if st else 0.0 for st in stats],
            ]
            ax.bar(names, vals, yerr=err, capsize=3, color=["#999999", "#1f77b4"][: len(names)])
            ax.set_title(label)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("masquerade: podrouter vs nftables (median, whiskers = min..max)")
        fig.tight_layout()
        p = out / "masquerade.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written
