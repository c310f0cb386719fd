"""podrouter-cni: a CNI 1.0 plugin (ADD, DEL, CHECK, VERSION) that attaches a pod to podrouter.

A container runtime runs it with the CNI_* environment variables and the network config on stdin:

    {
      "cniVersion": "1.0.0", "name": "podnet", "type": "podrouter-cni",
      "podrouterSocket": "/run/podrouter/podrouter.sock",
      "mtu": 1500,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]},
      "capabilities": {"bandwidth": true},
      "runtimeConfig": {"bandwidth": {"ingressRate": 10000000, "ingressBurst": 100000,
                                      "egressRate": 10000000, "egressBurst": 100000}}
    }

ADD: veth pair (host end `pr<hash of the container id>`, pod end CNI_IFNAME created directly inside
CNI_NETNS, so no name ever clashes on the node); the address from the IPAM plugin (the reference
`host-local`, run as a CNI plugin from CNI_PATH with this same config); the pod wired as docs/design.md §4b
says (its address as /32, `default via 169.254.1.1 dev eth0 onlink`; on the node a /32 route to the
host veth and proxy ARP on it); then the pod registered with the podrouter daemon over its unix
socket (`{"op": "pod_add", ...}`), with the runtime's `runtimeConfig.bandwidth` turned into the
`kubernetes.io/{ingress,egress}-bandwidth` annotations the bandwidth manager reads. A failure half-way
undoes what was done, so the runtime can retry.

DEL is idempotent (CNI spec: it must succeed when things are already gone). CHECK verifies the pod
interface and address, the node side and the registration. Results and errors are the spec's JSON on
stdout; errors exit 1 with a CNI error code.

All netlink goes through pyroute2; the only other process is the IPAM plugin, as the spec requires.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from podrouter import api

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
GATEWAY = "169.254.1.1"
DEFAULT_SOCKET = "/run/podrouter/podrouter.sock"
EGRESS = "kubernetes.io/egress-bandwidth"
INGRESS = "kubernetes.io/ingress-bandwidth"

# CNI spec 1.0, "Error": well-known codes
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_PLUGIN = 100  # 100+ are plugin-specific

_POD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# ------------------------------------------------------------------------------ inputs


def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(E_INVALID_ENV, f"{name} is not set")
    return value


def _cni_args() -> dict[str, str]:
    out: dict[str, str] = {}
    for part in os.environ.get("CNI_ARGS", "").split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def host_ifname(container_id: str, ifname: str) -> str:
    """A stable, unique host-side name: 'pr' + 12 hex of sha256(container id, ifname) (14 chars)."""
    return "pr" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def pod_name(container_id: str) -> str:
    """The pod's name in podrouter: `namespace.name` from a Kubernetes runtime's CNI_ARGS, the
    container name alone when only K8S_POD_NAME is given (Podman passes just that), else `cni-` and
    the start of the container ID."""
    args = _cni_args()
    ns, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    if ns and name and _POD_NAME.match(f"{ns}.{name}"):
        return f"{ns}.{name}"
    if name and not ns and _POD_NAME.match(name):
        return name
    return f"cni-{re.sub(r'[^A-Za-z0-9]', '', container_id)[:12] or 'pod'}"


def _rate(bw: Mapping[str, Any], key: str) -> int | None:
    value = bw.get(key)
    if value in (None, 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CniError(E_INVALID_CONFIG, f"runtimeConfig.bandwidth.{key}: {value!r} is not a rate in bit/s")
    return value


def bandwidth_annotations(conf: Mapping[str, Any]) -> dict[str, str]:
    """runtimeConfig.bandwidth (bits per second, as kubelet/containerd pass them) -> annotations.

    Bursts (bits) are validated but not used: podrouter sizes each bucket from the rate so that a
    pod's queueing delay stays small (docs/qos.md); a runtime's "burst" (containerd passes 2^32-1,
    i.e. "no limit") would defeat that.
    """
    bw = (conf.get("runtimeConfig") or {}).get("bandwidth") or {}
    if not isinstance(bw, Mapping):
        raise CniError(E_INVALID_CONFIG, f"runtimeConfig.bandwidth: {bw!r} is not an object")
    out: dict[str, str] = {}
    for rate_key, burst_key, annotation in (("ingressRate", "ingressBurst", INGRESS),
                                            ("egressRate", "egressBurst", EGRESS)):
        rate = _rate(bw, rate_key)
        _rate(bw, burst_key)
        if rate is not None:
            out[annotation] = str(rate)
    if out:
        # same bounds as the annotations (kubelet: 1k..1P); fail at ADD, not silently later
        # parsed here once, at the runtime's boundary; what crosses the API socket is the request's
        # annotations, which the daemon parses again only because it trusts no client (API boundary)
        from podrouter.qos.annotations import QoSRequest

        request = QoSRequest.parse(out)
        if request.problems:
            raise CniError(E_INVALID_CONFIG, "runtimeConfig.bandwidth: " + "; ".join(request.problems))
        return dict(request.annotations)
    return out


def _load_conf(raw: str) -> dict[str, Any]:
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CniError(E_DECODE, f"network config is not JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "network config is not a JSON object")
    version = conf.get("cniVersion", "")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if not isinstance(conf.get("ipam"), dict) or not conf["ipam"].get("type"):
        raise CniError(E_INVALID_CONFIG, "ipam: an IPAM plugin section with a 'type' is required")
    sock = conf.get("podrouterSocket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock:
        raise CniError(E_INVALID_CONFIG, f"podrouterSocket: {sock!r} is not a path")
    mtu = conf.get("mtu", 1500)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535:
        raise CniError(E_INVALID_CONFIG, f"mtu: {mtu!r} is not an MTU 576..65535")
    return conf


# ------------------------------------------------------------------------------ IPAM


def _find_plugin(kind: str) -> str:
    if "/" in kind:
        raise CniError(E_INVALID_CONFIG, f"ipam.type: {kind!r} is not a plugin name")
    for directory in _env("CNI_PATH").split(os.pathsep):
        path = os.path.join(directory, kind)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CniError(E_INVALID_CONFIG, f"IPAM plugin {kind!r} not found in CNI_PATH")


def ipam(command: str, conf: Mapping[str, Any]) -> dict[str, Any] | None:
    """Run the IPAM plugin as the spec says: same environment (CNI_COMMAND = command), same config."""
    plugin = _find_plugin(conf["ipam"]["type"])
    env = dict(os.environ, CNI_COMMAND=command)
    proc = subprocess.run([plugin], input=json.dumps(conf), capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    if proc.returncode != 0:
        try:
            err = json.loads(proc.stdout)
            raise CniError(int(err.get("code", E_PLUGIN)), f"IPAM {command}: {err.get('msg', '')}",
                           str(err.get("details", "")))
        except (json.JSONDecodeError, AttributeError):
            raise CniError(E_PLUGIN, f"IPAM {command} failed", (proc.stdout + proc.stderr).strip()) from None
    if command != "ADD":
        return None
    try:
        return dict(json.loads(proc.stdout))
    except (json.JSONDecodeError, TypeError, ValueError):
        raise CniError(E_DECODE, "IPAM result is not JSON", proc.stdout[:200]) from None


def _ipam_address(result: Mapping[str, Any]) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    for entry in result.get("ips") or []:
        try:
            return ipaddress.ip_interface(entry["address"]).ip
        except (KeyError, TypeError, ValueError):
            continue
    raise CniError(E_PLUGIN, "IPAM returned no address", json.dumps(result)[:200])


# ------------------------------------------------------------------------------ daemon


def daemon_request(path: str, request: Mapping[str, Any], timeout: float = 30) -> dict[str, Any]:
    """One request on the daemon's API socket (podrouter.api), with failures as CNI errors: an
    absent or refusing daemon is "try again later" (the runtime retries), anything else is I/O."""
    try:
        return api.request(path, dict(request), timeout)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise CniError(E_TRY_AGAIN, f"podrouter daemon not reachable at {path}: {exc.strerror}") from None
    except OSError as exc:
        raise CniError(E_IO, f"talking to the podrouter daemon at {path}: {exc}") from None
    except api.ApiError as exc:
        raise CniError(E_IO, f"the podrouter daemon sent a bad reply: {exc}") from None


# ------------------------------------------------------------------------------ netlink


def _ipr() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _netns(path: str) -> Any:
    from pyroute2 import NetNS

    if not os.path.exists(path):
        raise CniError(E_UNKNOWN_CONTAINER, f"CNI_NETNS {path!r} does not exist")
    return NetNS(path)


def _sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _wire_pod(netns: str, ifname: str, ip: Any, mtu: int) -> str:
    """Inside the pod: address /32 (/128), link up, the link-local gateway and the default route."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _netns(netns) as ns:
        idx = ns.link_lookup(ifname=ifname)[0]
        lo = ns.link_lookup(ifname="lo")
        if lo:
            ns.link("set", index=lo[0], state="up")
        plen = 32 if ip.version == 4 else 128
        ns.addr("add", index=idx, address=str(ip), prefixlen=plen)
        ns.link("set", index=idx, state="up", mtu=mtu)
        if ip.version == 4:
            ns.route("add", dst=f"{GATEWAY}/32", oif=idx, scope=253)  # RT_SCOPE_LINK
            ns.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=idx, flags=4)  # RTNH_F_ONLINK
        else:
            try:
                ns.route("add", dst="::/0", gateway="fe80::1", oif=idx)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        return str(ns.get_links(idx)[0].get_attr("IFLA_ADDRESS"))


def _wire_node(host_if: str, ip: Any, mtu: int) -> tuple[int, str]:
    from podrouter.netlink.constants import RTPROT_PODROUTER

    with _ipr() as ipr:
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.link("set", index=idx, state="up", mtu=mtu)
        plen = 32 if ip.version == 4 else 128
        # podrouter's own protocol: the daemon takes this route over when the pod is registered (a
        # route of any other protocol for the pod's address would be another owner's, left alone)
        ipr.route("replace", dst=f"{ip}/{plen}", oif=idx, proto=RTPROT_PODROUTER)
        mac = str(ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS"))
    if ip.version == 4:
        # the node answers ARP for 169.254.1.1 on this veth (docs/design.md §4b)
        _sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/proxy_arp", "1")
    else:
        _sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/proxy_ndp", "1")
    return idx, mac


def _delete_link(host_if: str) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=host_if)
        if not found:
            return False
        try:
            # deleting one end deletes the pair, and the kernel drops routes through it
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise
        return True


# ------------------------------------------------------------------------------ commands


def cmd_add(conf: dict[str, Any]) -> dict[str, Any]:
    from pyroute2.netlink.exceptions import NetlinkError

    container_id = _env("CNI_CONTAINERID")
    netns = _env("CNI_NETNS")
    ifname = _env("CNI_IFNAME")
    _env("CNI_PATH")
    if not os.path.exists(netns):
        raise CniError(E_UNKNOWN_CONTAINER, f"CNI_NETNS {netns!r} does not exist")
    annotations = bandwidth_annotations(conf)
    mtu = conf.get("mtu", 1500)
    host_if = host_ifname(container_id, ifname)
    name = pod_name(container_id)
    sock = conf.get("podrouterSocket", DEFAULT_SOCKET)

    result = ipam("ADD", conf)
    assert result is not None
    undo: list[Any] = [lambda: ipam("DEL", conf)]
    try:
        ip = _ipam_address(result)
        with _ipr() as ipr:
            if ipr.link_lookup(ifname=host_if):
                # a previous ADD of this container that the runtime did not DEL: start again
                ipr.link("del", index=ipr.link_lookup(ifname=host_if)[0])
            try:
                ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": ifname, "net_ns_fd": netns})
            except NetlinkError as exc:
                raise CniError(E_PLUGIN, f"creating veth {host_if} <-> {ifname}: {exc}") from None
        undo.append(lambda: _delete_link(host_if))
        pod_mac = _wire_pod(netns, ifname, ip, mtu)
        _host_idx, host_mac = _wire_node(host_if, ip, mtu)
        reply = daemon_request(sock, {"op": "pod_add", "pod": {
            "name": name, "ip": str(ip), "host_interface": host_if, "annotations": annotations,
        }, "cni": {"container_id": container_id, "netns": netns, "ifname": ifname}})
        if not reply.get("ok"):
            raise CniError(E_PLUGIN, f"podrouter refused pod {name}: {reply.get('error', 'no reason given')}")
    except BaseException:
        for step in reversed(undo):
            # best effort: the original error is the one to report
            with contextlib.suppress(Exception):
                step()
        raise
    plen = 32 if ip.version == 4 else 128
    out: dict[str, Any] = {
        "cniVersion": conf["cniVersion"],
        "interfaces": [
            {"name": host_if, "mac": host_mac},
            {"name": ifname, "mac": pod_mac, "sandbox": netns},
        ],
        "ips": [{"address": f"{ip}/{plen}", "gateway": GATEWAY if ip.version == 4 else "fe80::1",
                 "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0" if ip.version == 4 else "::/0",
                    "gw": GATEWAY if ip.version == 4 else "fe80::1"}],
    }
    if conf["cniVersion"].startswith("0.3"):
        out["ips"][0]["version"] = str(ip.version)
    if result.get("dns"):
        out["dns"] = result["dns"]
    return out


def cmd_del(conf: dict[str, Any]) -> None:
    container_id = _env("CNI_CONTAINERID")
    ifname = _env("CNI_IFNAME")
    _env("CNI_PATH")
    host_if = host_ifname(container_id, ifname)
    name = pod_name(container_id)
    sock = conf.get("podrouterSocket", DEFAULT_SOCKET)
    # unregister first so the daemon removes its tc state while the veth still exists; the container
    # ID makes a late DEL of a predecessor (same pod name, older sandbox) leave the successor alone
    if os.path.exists(sock):
        reply = daemon_request(sock, {"op": "pod_del", "name": name, "container_id": container_id})
        if not reply.get("ok") and "no pod named" not in str(reply.get("error", "")):
            raise CniError(E_PLUGIN, f"podrouter refused to remove pod {name}: {reply.get('error')}")
    _delete_link(host_if)
    ipam("DEL", conf)


def cmd_check(conf: dict[str, Any]) -> None:
    container_id = _env("CNI_CONTAINERID")
    netns = _env("CNI_NETNS")
    ifname = _env("CNI_IFNAME")
    _env("CNI_PATH")
    host_if = host_ifname(container_id, ifname)
    prev = conf.get("prevResult") or {}
    want = [ipaddress.ip_interface(e["address"]).ip for e in prev.get("ips") or [] if "address" in e]
    with _netns(netns) as ns:
        found = ns.link_lookup(ifname=ifname)
        if not found:
            raise CniError(E_PLUGIN, f"{ifname} is missing in {netns}")
        have = {ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ns.get_addr(index=found[0])}
        missing = [str(ip) for ip in want if ip not in have]
        if missing:
            raise CniError(E_PLUGIN, f"{ifname} in {netns} lacks {', '.join(missing)}")
        if not [r for r in ns.get_routes(family=socket.AF_INET) if r.get_attr("RTA_GATEWAY") == GATEWAY]:
            raise CniError(E_PLUGIN, f"no default route via {GATEWAY} in {netns}")
    with _ipr() as ipr:
        if not ipr.link_lookup(ifname=host_if):
            raise CniError(E_PLUGIN, f"host interface {host_if} is missing")
    ipam("CHECK", conf)
    sock = conf.get("podrouterSocket", DEFAULT_SOCKET)
    reply = daemon_request(sock, {"op": "pod_list"})
    pods = reply.get("pods", [])
    mine = [p for p in pods if isinstance(p, dict) and p.get("name") == pod_name(container_id)] if isinstance(
        pods, list) else []
    if reply.get("ok") and not mine:
        raise CniError(E_PLUGIN, f"pod {pod_name(container_id)} is not registered with podrouter")
    owner = (mine[0].get("cni") or {}).get("container_id") if mine else None
    if owner is not None and owner != container_id:
        raise CniError(E_PLUGIN, f"pod {pod_name(container_id)} is registered to container {owner}, "
                       f"not {container_id}")


def run(stdin: str) -> tuple[int, str]:
    """One invocation; returns (exit status, stdout)."""
    command = os.environ.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            return 0, json.dumps({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})
        if command not in ("ADD", "DEL", "CHECK"):
            raise CniError(E_INVALID_ENV, f"CNI_COMMAND {command!r} is not ADD, DEL, CHECK or VERSION")
        conf = _load_conf(stdin)
        version = conf["cniVersion"]
        if command == "ADD":
            return 0, json.dumps(cmd_add(conf))
        if command == "DEL":
            cmd_del(conf)
        else:
            if version in ("0.3.0", "0.3.1"):
                raise CniError(E_INCOMPATIBLE_VERSION,
                               f"CHECK needs cniVersion 0.4.0 or later, not {version}")
            cmd_check(conf)
        return 0, ""
    except CniError as exc:
        err = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
        if exc.details:
            err["details"] = exc.details
        return 1, json.dumps(err)
    except Exception as exc:  # noqa: BLE001 - a runtime must get the spec's JSON, never a traceback
        return 1, json.dumps({"cniVersion": version, "code": E_PLUGIN, "msg": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    status, out = run(sys.stdin.read())
    if out:
        sys.stdout.write(out + "\n")
    sys.exit(status)


if __name__ == "__main__":
    main()
