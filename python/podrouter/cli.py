"""The `podrouter` command line (docs/design.md §5).

Exit statuses: 0 success; 1 failure (daemon unreachable or not ready, API error, datapath trouble);
2 bad input (config problems, bad arguments) -- always before anything in the kernel was touched.
A user never sees a traceback for bad input: each problem is one line on stderr.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from typing import Any, NoReturn

import click

from podrouter import api as apimod
from podrouter import config as configmod
from podrouter import launch, native
from podrouter.errors import StartError
from podrouter.packets import PROTOS, build_packet
from podrouter.status_text import mesh_lines

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


# one error style and one config loading for every command, the click-free `run` included
_fail = launch.fail
_load_config = launch.load_config


def _socket_path(config: str | None, sock: str | None) -> str:
    if sock:
        return sock
    if config:
        return _load_config(config).api.socket
    return configmod.DEFAULT_SOCKET


def _call(sock: str, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    try:
        reply = apimod.request(sock, req, timeout=timeout)
    except FileNotFoundError:
        _fail(f"no daemon at {sock} (is `podrouter run` running?)", EXIT_FAILURE)
    except (ConnectionRefusedError, OSError) as e:
        _fail(f"cannot reach the daemon at {sock}: {e.strerror or e}", EXIT_FAILURE)
    except apimod.ApiError as e:
        _fail(str(e), EXIT_FAILURE)
    if not reply.get("ok"):
        _fail(f"error: {reply.get('error', 'unknown error')}", EXIT_FAILURE)
    return reply


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), help="The node's config file."
)
socket_option = click.option(
    "--socket",
    "sock",
    type=click.Path(dir_okay=False),
    help="The daemon's API socket (default: the config's api.socket).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="podrouter", prog_name="podrouter", message="%(prog)s %(version)s")
def main() -> None:
    """podrouter: a per-node pod router (native, VXLAN, Geneve, masquerade).

    Every command that reports something takes --json (one JSON document on stdout); errors are one
    line each on stderr; exit 0 success, 1 failure, 2 bad input (before any kernel change).
    Shell completion: eval "$(_PODROUTER_COMPLETE=bash_source podrouter)" (zsh_source, fish_source).
    """


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")


# ------------------------------------------------------------------------------------------ run/check


@main.command(short_help="Run the node daemon until SIGTERM/SIGINT.")
@click.option(
    "--config", "config", required=True, type=click.Path(dir_okay=False), help="The node's config file."
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--handover",
    is_flag=True,
    help="Take over from the daemon on the same api.socket without a forwarding gap (docs/handover.md).",
)
def run(config: str, log_level: str, handover: bool) -> None:
    """Run the node daemon until SIGTERM/SIGINT. Stopping leaves the node's routes, TUN and guards for
    the next `run`, which adopts them; `podrouter cleanup` removes them. With --handover it starts
    while the old daemon runs and takes its datapath over; the old one then exits 0."""
    # the console script runs a plain `run` without click (podrouter/entry.py); both end here
    launch.run_daemon(config, log_level, handover)


@main.command(short_help="Validate a config file (exit 2 naming each problem).")
@click.option(
    "--config", "config", required=True, type=click.Path(dir_okay=False), help="The node's config file."
)
@json_option
def check(config: str, as_json: bool) -> None:
    """Validate a config file (exit 0 if it is good, 2 with one line per problem if not).

    With --json a bad config prints {"ok": false, "problems": [...]} on stdout (still exit 2).
    """
    cfg: configmod.Config | None = None
    try:
        loaded = configmod.load(config)
    except configmod.ConfigError as e:
        problems = list(e.problems)
    except StartError as e:  # the core's rulebook (podrouter._native) cannot be loaded
        _fail(e.problems, e.code)
    else:
        if not as_json:
            for w in loaded.warnings:
                click.echo(f"warning: {w}", err=True)
        cfg, problems = loaded, compile_problems(loaded)
    if problems or cfg is None:
        if as_json:
            _emit_json({"ok": False, "config": config, "problems": problems})
            sys.exit(EXIT_USAGE)
        _fail(problems, EXIT_USAGE)
    if as_json:
        _emit_json(
            {
                "ok": True,
                "tables": "compiled",
                "config": config,
                "node": cfg.node.name,
                "mode": cfg.routing.mode,
                "peers": len(cfg.peers),
                "pods": len(cfg.pods),
                "warnings": list(cfg.warnings),
                "bgp": {"asn": cfg.bgp.asn, "peers": [str(p.address) for p in cfg.bgp.peers]}
                if cfg.bgp.enabled
                else None,
                "clustermesh": [c.name for c in cfg.clustermesh.clusters],
            }
        )
        return
    click.echo(
        f"{config}: ok (node {cfg.node.name}, {cfg.routing.mode} mode, {len(cfg.peers)} peers, "
        f"{len(cfg.pods)} pods; tables compiled)"
    )
    if cfg.bgp.enabled:
        peers = ", ".join(f"{p.address} (AS {p.asn})" for p in cfg.bgp.peers)
        click.echo(f"  bgp: AS {cfg.bgp.asn} announcing to {peers}")
    if cfg.clustermesh.clusters:
        others = ", ".join(f"{c.name} (id {c.id})" for c in cfg.clustermesh.clusters)
        click.echo(f"  cluster mesh: {cfg.cluster_name} (id {cfg.cluster_id}) with {others}")


# ------------------------------------------------------------------------------------------- status


@main.command(short_help="Mode, peers, routes, pods, counters (exit 0 once ready).")
@config_option
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status as JSON.")
def status(config: str | None, sock: str | None, as_json: bool) -> None:
    """Mode, peers, routes and their paths, pods and their shaping, counters.

    Exits 0 once the daemon has installed its tables, 1 before that or if it cannot be reached.
    """
    path = _socket_path(config, sock)
    reply = _call(path, {"op": "status"}, timeout=5.0)
    if as_json:
        reply.pop("ok", None)
        click.echo(json.dumps(reply, indent=2, sort_keys=True))
    else:
        click.echo(format_status(reply))
    sys.exit(EXIT_OK if reply.get("ready") else EXIT_FAILURE)


def format_status(s: dict[str, Any]) -> str:
    u = s.get("underlay", {})
    t = s.get("tunnel", {})
    lines = [
        f"node {s.get('node')}  {'ready' if s.get('ready') else 'NOT READY'}  mode {s.get('mode')}  "
        f"tunnel {t.get('protocol')} vni {t.get('vni')}  tables generation {s.get('generation')}",
        f"underlay {u.get('interface')} {u.get('address')} mtu {u.get('mtu')} "
        f"gateway {u.get('gateway') or '-'}  vtep mac {s.get('vtep_mac') or '-'}",
        "",
        "peers:",
    ]
    for p in s.get("peers", []):
        nh = p.get("next_hop") or "-"
        mac = p.get("next_hop_mac") or "unresolved"
        lines.append(
            f"  {p['name']:<12} {p['address']:<15} {','.join(p['pod_cidrs']):<20} "
            f"{p['path']:<14} next hop {nh} ({mac}){'  on-link' if p.get('on_link') else ''}"
        )
    if not s.get("peers"):
        lines.append("  (none)")
    lines.extend(_discovery_lines(s.get("discovery") or {}))
    lines += ["", "routes:"]
    for r in s.get("routes", []):
        mtu = f"mtu {r['mtu']}" if r.get("mtu") else ""
        lines.append(
            f"  {r['dst']:<20} {r['path']:<8} {r.get('dev') or '':<16} {mtu:<9} {r.get('peer') or ''}"
        )
    for e in s.get("route_errors", []):
        lines.append(f"  ! {e}")
    lines += ["", "pods:"]
    for p in s.get("pods", []):
        lines.append(
            f"  {p['name']:<16} {_pod_ips(p):<15} {p['host_interface']:<15} {_shaping_text(p.get('shaping'))}"
        )
    if not s.get("pods"):
        lines.append("  (none)")
    c = s.get("counters") or {}
    lines += ["", "counters:"]
    for key in ("packets", "bytes"):
        items = ", ".join(f"{k}={v}" for k, v in sorted((c.get(key) or {}).items()) if v)
        lines.append(f"  {key}: {items or '-'}")
    drops = ", ".join(f"{k}={v}" for k, v in sorted((c.get("drops") or {}).items()) if v)
    lines.append(f"  drops: {drops or '-'}")
    lines.append(f"  nat entries: {c.get('nat_entries', 0)}, evicted: {c.get('nat_evictions', 0)}")
    capped = ", ".join(f"{k}={v}" for k, v in sorted((c.get("nat_pod_limit_drops") or {}).items()) if v)
    if capped:
        lines.append(f"  nat pod limit drops: {capped}")
    lines += _bgp_lines(s.get("bgp") or {}) + mesh_lines(s.get("clustermesh") or {})
    return "\n".join(lines)


def _bgp_lines(b: dict[str, Any]) -> list[str]:
    if not b.get("enabled"):
        return []
    out = [
        "",
        f"bgp: AS {b.get('asn')}  router id {b.get('router_id')}  announcing "
        f"{', '.join(b.get('prefixes') or []) or '-'} ({b.get('announced_prefixes', 0)} on the wire)"
        f"  graceful restart {b.get('graceful_restart_time')}s",
    ]
    if b.get("not_announced"):
        out.append(f"  not announced (no IPv6 next hop): {', '.join(b['not_announced'])}")
    if b.get("error"):
        out.append(f"  ! {b['error']}")
    for x in b.get("sessions") or []:
        err = f"  last error: {x['last_error']}" if x.get("last_error") else ""
        out.append(f"  {x['peer']:<15} AS {x['asn']:<10} {x['state']:<12} exported {x['exported']}{err}")
    return out


def _discovery_lines(d: dict[str, Any]) -> list[str]:
    """etcd discovery health: its state, how fresh the peer set is, and the entries it refused."""
    if d.get("backend") != "etcd":
        return []
    age = d.get("last_event_age")
    fresh = f"last event {age}s ago" if age is not None else "no event yet"
    line = (
        f"discovery etcd {d.get('state')} via {d.get('endpoint')}  {fresh}  "
        f"watch restarts {d.get('watch_restarts', 0)}"
    )
    if d.get("last_error") and d.get("state") != "connected":
        line += f"  last error: {d['last_error']}"
    out = [line]
    for key, why in sorted((d.get("rejected") or {}).items()):
        out.append(f"  refused {key}: {why}")
    return out


def _shaping_text(sh: Any) -> str:
    if not isinstance(sh, dict) or not sh:
        return "-"
    if sh.get("error"):
        return f"shaping error: {sh['error']}"
    if sh.get("enabled") is False:
        return "not shaped"
    return " ".join(f"{k}={v}" for k, v in sorted(sh.items()) if v is not None)


# ----------------------------------------------------------------------------------------------- pod


@main.group(short_help="Register, remove and list pods (add, del, list).")
def pod() -> None:
    """Register pods with the running daemon (the CNI plugin uses the same API)."""


def _pod_ips(p: dict[str, Any]) -> str:
    return ",".join(p.get("ips") or [str(p.get("ip"))])


@pod.command("add", short_help="Register a pod: route, proxy ARP, shaping.")
@click.argument("name")
@click.option(
    "--ip",
    "ips",
    required=True,
    multiple=True,
    help="The pod's address (inside this node's pod CIDRs); dual stack: give it twice, v4 and v6.",
)
@click.option("--host-interface", required=True, help="The node end of the pod's veth.")
@click.option(
    "--annotation",
    "-a",
    "annotations",
    multiple=True,
    metavar="KEY=VALUE",
    help="A pod annotation, e.g. kubernetes.io/egress-bandwidth=10M (repeatable).",
)
@config_option
@socket_option
@json_option
def pod_add(
    name: str,
    ips: tuple[str, ...],
    host_interface: str,
    annotations: tuple[str, ...],
    config: str | None,
    sock: str | None,
    as_json: bool,
) -> None:
    """Register a pod: its /32 route, proxy ARP on its veth, its bandwidth shaping."""
    ann: dict[str, str] = {}
    for a in annotations:
        k, sep, v = a.partition("=")
        if not sep or not k:
            _fail(f"--annotation: {a!r} is not KEY=VALUE", EXIT_USAGE)
        ann[k] = v
    reply = _call(
        _socket_path(config, sock),
        {
            "op": "pod_add",
            "pod": {
                "name": name,
                "ip": ips[0],
                **({"ips": list(ips)} if len(ips) > 1 else {}),
                "host_interface": host_interface,
                "annotations": ann,
            },
        },
    )
    if as_json:
        reply.pop("ok", None)
        _emit_json(reply)
        return
    for w in reply.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    p = reply.get("pod", {})
    click.echo(
        f"added {p.get('name')} {','.join(p.get('ips') or [str(p.get('ip'))])} on {p.get('host_interface')}: "
        f"{_shaping_text(p.get('shaping'))}"
    )


@pod.command("del", short_help="Unregister a pod (route, proxy ARP, shaping).")
@click.argument("name")
@config_option
@socket_option
@json_option
def pod_del(name: str, config: str | None, sock: str | None, as_json: bool) -> None:
    """Unregister a pod (removes its route, proxy ARP and shaping)."""
    reply = _call(_socket_path(config, sock), {"op": "pod_del", "name": name})
    if as_json:
        reply.pop("ok", None)
        _emit_json({"removed": name, **reply})
        return
    click.echo(f"removed {name}")


@pod.command("list", short_help="List registered pods.")
@config_option
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the pods as a JSON list.")
def pod_list(config: str | None, sock: str | None, as_json: bool) -> None:
    """List registered pods."""
    reply = _call(_socket_path(config, sock), {"op": "pod_list"})
    pods = reply.get("pods", [])
    if as_json:
        click.echo(json.dumps(pods, indent=2, sort_keys=True))
        return
    for p in pods:
        click.echo(
            f"{p['name']:<16} {_pod_ips(p):<15} {p['host_interface']:<15} {p.get('source', ''):<7} "
            f"{_shaping_text(p.get('shaping'))}"
        )


# ------------------------------------------------------------------------------------------- cleanup


@main.command(short_help="Remove everything podrouter installed on this node.")
@click.option(
    "--config", "config", required=True, type=click.Path(dir_okay=False), help="The node's config file."
)
@click.option("--force", is_flag=True, help="Act even if the state was recorded in another namespace.")
@json_option
def cleanup(config: str, force: bool, as_json: bool) -> None:
    """Remove everything a stopped, crashed or killed daemon left (run it in the node's namespace)."""
    from podrouter.cleanup import cleanup as clean_node  # lazy: only this command needs netlink

    cfg = _load_config(config)
    try:
        done = clean_node(cfg, force=force)
    except StartError as e:
        _fail(e.problems, e.code)
    if as_json:
        _emit_json({"removed": list(done), "clean_before": not done})
        return
    for line in done:
        click.echo(line)
    if not done:
        click.echo("nothing to clean up")


# ------------------------------------------------------------------------------------------- explain


def compile_problems(cfg: configmod.Config) -> list[str]:
    """Check the config's whole table spec (mesh space included) offline with the datapath's own
    compiler (the core's rulebook): every problem it finds, or []. config.load asked the same
    rulebook about the config's own keys already (and named the YAML keys). Nothing on this
    machine is read or changed; every peer is taken as off-link, as a node sees them before its
    underlay is up."""
    from podrouter import plan  # lazy: planning loads the netlink package, most commands need neither
    from podrouter.plan import PeerView

    address = str(cfg.node.address) if cfg.node.address else "0.0.0.0"
    # node.address unset: its family is known only at start (peers of both families may fit then)
    a6 = cfg.node.address6 if cfg.node.address else ipaddress.IPv6Address("::")
    spec = plan.build_spec(cfg, 0, None, [PeerView(p, False, None, None) for p in cfg.peers])
    settings = plan.engine_settings(cfg, address, str(a6) if a6 is not None else None)
    try:
        return [f"tables: {path}: {message}" for path, message in native.check_tables(spec, settings)]
    except ValueError as e:
        return [f"tables: {e}"]


def offline_spec(cfg: configmod.Config) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Tables spec and engine settings (plan.engine_settings) from a config alone, reading (never
    changing) this namespace where it can."""
    from podrouter import plan  # lazy, as in compile_problems
    from podrouter.plan import PeerView

    notes: list[str] = []
    address = str(cfg.node.address) if cfg.node.address else None
    gateway = None
    peers: list[PeerView] = []
    underlay = None
    try:
        from pyroute2.iproute import IPRoute

        from podrouter.netlink.neigh import NUD_VALID
        from podrouter.netlink.underlay import UnderlayError, next_hop_for, resolve_underlay

        with IPRoute() as ipr:
            try:
                underlay = resolve_underlay(ipr, cfg.node)
            except UnderlayError:
                underlay = None
            if underlay is not None:

                def mac_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
                    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
                    for n in ipr.get_neighbours(family=fam, dst=str(ip)):
                        if n["state"] & NUD_VALID and n.get_attr("NDA_LLADDR"):
                            return str(n.get_attr("NDA_LLADDR"))
                    return None

                address = str(underlay.address)
                if underlay.gateway is not None:
                    gateway = {"ip": str(underlay.gateway), "mac": mac_of(underlay.gateway)}
                for p in cfg.peers:
                    nh = next_hop_for(ipr, underlay, p.address)
                    peers.append(PeerView(p, underlay.on_link(p.address), nh, mac_of(nh) if nh else None))
    except OSError:
        underlay = None
    if underlay is None:
        notes.append(
            "the underlay is not visible here (run inside the node's namespace, or use --socket): "
            "every peer is taken as off-link and next-hop MACs as unknown"
        )
        peers = [PeerView(p, False, None, None) for p in cfg.peers]
    if address is None:
        address = "0.0.0.0"
    a6 = underlay.address6 if underlay is not None else cfg.node.address6
    settings = plan.engine_settings(cfg, address, str(a6) if a6 is not None else None)
    return plan.build_spec(cfg, 0, gateway, peers), settings, notes


@main.command(short_help="Which path a packet from SRC to DST takes, and why.")
@click.argument("src")
@click.argument("dst")
@click.option("--proto", default="icmp", type=click.Choice(sorted(PROTOS)), show_default=True)
@click.option("--dport", default=0, type=click.IntRange(0, 65535), help="Destination port (tcp/udp).")
@config_option
@socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def explain(
    src: str, dst: str, proto: str, dport: int, config: str | None, sock: str | None, as_json: bool
) -> None:
    """The datapath's verdict for a packet from SRC to DST (a local pod sending)."""
    if not config and not sock:
        _fail("explain needs --config FILE (offline) or --socket PATH (ask the running daemon)", EXIT_USAGE)
    try:
        pkt = build_packet(src, dst, proto, dport)
    except ValueError as e:
        _fail(f"error: {e}", EXIT_USAGE)
    notes: list[str] = []
    if sock:
        reply = _call(sock, {"op": "explain", "src": src, "dst": dst, "proto": proto, "dport": dport})
        verdict = reply["verdict"]
    else:
        assert config is not None
        cfg = _load_config(config)
        spec, settings, notes = offline_spec(cfg)
        why = native.available()
        if why is not None:
            _fail(why, EXIT_FAILURE)
        try:
            verdict = dict(native.compile_tables(spec, settings).classify(pkt))
        except (ValueError, TypeError) as e:
            _fail(f"error: {e}", EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps({"verdict": verdict, "notes": notes}, indent=2, sort_keys=True))
        return
    what = f"{src} -> {dst} {proto}" + (f"/{dport}" if proto != "icmp" else "")
    details = " ".join(f"{k}={v}" for k, v in verdict.items() if k != "verdict")
    click.echo(f"{what}: {verdict.get('verdict')}" + (f" ({details})" if details else ""))
    for n in notes:
        click.echo(f"note: {n}", err=True)


# -------------------------------------------------------------------------------------- demo / bench


def _exit_with(code: int | None) -> NoReturn:
    """Exit with what the demo's or the bench's `main` returned (they parse their own arguments)."""
    sys.exit(int(code or 0))


# ------------------------------------------------------------------------------------------ monitor


@main.command(short_help="Stream dropped packets live (reason, addresses, pod).")
@config_option
@socket_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option("--flows", is_flag=True, help="Also show a sample of forwarded packets.")
@click.option("--pod", help="Only events to or from this pod.")
@click.option("--reason", help="Only drops for this reason (e.g. unknown_peer, ttl_exceeded).")
@click.option("--address", help="Only events with this address (source, destination or tunnel sender).")
@click.option("--count", type=click.IntRange(min=1), help="Exit after this many events.")
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Exit after this many seconds.")
def monitor(
    config: str | None,
    sock: str | None,
    as_json: bool,
    flows: bool,
    pod: str | None,
    reason: str | None,
    address: str | None,
    count: int | None,
    timeout: float | None,
) -> None:
    """A live stream of dropped packets: reason, addresses, ports, protocol, path, pod.

    Recording starts when the first monitor connects and stops when the last one leaves; the
    datapath records at most 1000 events a second (the rest are reported as rate-limited).
    """
    from podrouter import monitor as mon

    if address is not None:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            _fail(f"--address: {address!r} is not an IP address", EXIT_USAGE)
    path = _socket_path(config, sock)
    req: dict[str, Any] = {"flows": flows}
    for key, value in (("pod", pod), ("reason", reason), ("address", address)):
        if value is not None:
            req[key] = value
    try:
        _shown, error = mon.run_client(path, req, as_json, count, sys.stdout, timeout)
    except FileNotFoundError:
        _fail(f"no daemon at {path} (is `podrouter run` running?)", EXIT_FAILURE)
    except (ConnectionRefusedError, OSError) as e:
        _fail(f"cannot reach the daemon at {path}: {e.strerror or e}", EXIT_FAILURE)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except ValueError as e:
        _fail(f"bad reply from the daemon: {e}", EXIT_FAILURE)
    if error is not None:
        _fail(
            f"error: {error}",
            EXIT_USAGE if error.startswith(("reason:", "pod:", "address:", "flows:")) else EXIT_FAILURE,
        )


# add_help_option=False: `--help` / `-h` go through to the demo's own parser, which lists its options
@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    short_help="A small cluster in namespaces: every path shown, then removed.",
)
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Build a small cluster in network namespaces, show every pod-to-pod path, tear it down."""
    from podrouter import demo as demomod  # lazy: namespaces and subprocesses, only this command

    _exit_with(demomod.main(list(ctx.args)))


# add_help_option=False: `--help` / `-h` go through to the bench's own parser, which lists its options
@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    short_help="The benchmark suite: modes, masquerade, shaping vs baselines.",
)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """The benchmark suite (mode comparison, masquerade vs nftables, shaping accuracy)."""
    from podrouter import bench as benchmod  # lazy, as the demo

    _exit_with(benchmod.main(list(ctx.args)))


if __name__ == "__main__":
    main()
