"""The node configuration (docs/design.md §4): YAML in, typed frozen dataclasses out.

`load(path)` validates *everything* before returning and collects every problem it finds, so a user
fixes a broken file in one round. Each problem names the key path and the bad value, e.g.
``routing.native_cidrs[0]: '10.244.0.0/33' is not a CIDR``. Unknown keys are errors (a typo such as
``nativ_cidrs`` would otherwise silently fall back to a default), and so are duplicate keys, which
PyYAML would otherwise resolve by keeping the last one.

The relations between the keys that become the routing tables (pod CIDRs inside the cluster and
disjoint, peers unique and not this node, pod space clear of the node's and the peers' addresses,
...) are not checked here: they are the Rust core's one rulebook (rust/core/src/rules.rs), asked once
per load through `native.check_tables` after the shape checks, and its problems come back under the
keys the user wrote (`SpecKeys`). This module checks the YAML's shape, types and key names, and the
relations that are not the table spec's (pods, the masquerade range against the node's ports, the
mesh declaration, BGP).

Nothing here touches the kernel: defaults that depend on the running namespace (the underlay
interface and address) stay ``None`` and are resolved by the daemon after validation
(`podrouter.netlink.resolve_underlay`). Annotation problems on `pods[]` are *warnings*: the pod is
still registered (without shaping), exactly as a bad annotation arriving through the API would be.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from podrouter import native
from podrouter.qos.annotations import QoSRequest
from podrouter.qos.config import BandwidthConfig, parse_bandwidth_config, validate_bandwidth_config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = ("tunnel", "native", "hybrid")
PEER_MODES = ("native", "tunnel")
PROTOCOLS = ("vxlan", "geneve")
# what a Geneve frame carries: an inner Ethernet frame (protocol type 0x6558, what OVS/OVN, Cilium,
# Antrea and Linux geneve devices speak) or the inner IP packet directly (podrouter peers only)
GENEVE_PAYLOADS = ("ethernet", "ip")
# Copies of the core's defaults and limits (this module validates configs without loading
# podrouter._native); tests/unit/test_native_constants.py checks each equals the _native value named
# beside it.
# IANA: RFC 7348 §5, RFC 8926 §3.3 (VXLAN_PORT, GENEVE_PORT)
DEFAULT_PORTS = {"vxlan": 4789, "geneve": 6081}
BACKENDS = ("static", "etcd")
DEFAULT_SOCKET = "/run/podrouter/podrouter.sock"
DEFAULT_METRICS = "127.0.0.1:9965"
DEFAULT_PORT_RANGE = (61000, 65535)  # MASQUERADE_PORT_RANGE
# The outer UDP source ports of the tunnel sender (VXLAN/Geneve, RFC 7348 §5 / RFC 8926 §3.3: a hash
# of the inner flow, for ECMP entropy). The datapath draws them from exactly this range, and the decap
# path can then tell a peer's tunnel datagram from a masqueraded pod datagram by its source port; so
# masquerade.port_range must stay disjoint from it (the default 61000-65535 is).
TUNNEL_SOURCE_PORTS = (49152, 60999)  # TUNNEL_SOURCE_PORT_MIN, TUNNEL_SOURCE_PORT_MAX
# Linux interface names are at most IFNAMSIZ-1 = 15 bytes and may not contain '/', ':' or whitespace
_IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")
# podrouter's own UDP-tunnel GSO TAP is `podrgso<N>` (rust/io/src/tap.rs); the pod guard accepts frames
# in on it before any pod check (nftables.GSO_TAP_GLOB), so no pod's veth or underlay may be named so
RESERVED_IFNAME_PREFIX = "podrgso"
# node and pod names end up in etcd keys, metric labels and file names: keep them boring (RFC 1123-ish)
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
VNI_MAX = (1 << 24) - 1  # both VXLAN and Geneve carry a 24-bit VNI (MAX_VNI)


class ConfigError(Exception):
    """A configuration that must not be used. `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ----------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class NodeConfig:
    name: str
    # IPv4 or IPv6 (an IPv6 underlay); None: the primary address of `interface`, at start (IPv4 if it
    # has one, else its first global IPv6 address)
    address: IPAddress | None
    interface: str | None  # None: the interface holding the default route, at start
    pod_cidrs: tuple[IPNetwork, ...]
    # a dual-stack underlay: the node's IPv6 underlay address next to an IPv4 `address` (tunnels to
    # IPv6 peers leave from it); None: tunnels go to peers of `address`'s family only
    address6: ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class RoutingConfig:
    mode: str = "tunnel"
    native_cidrs: tuple[IPNetwork, ...] = ()
    native_when_on_link: bool = False


@dataclass(frozen=True)
class TunnelConfig:
    protocol: str = "vxlan"
    port: int = DEFAULT_PORTS["vxlan"]
    vni: int = 1
    mtu: int | None = None  # None = auto: underlay MTU minus the encapsulation overhead
    geneve_payload: str = "ethernet"
    # "auto": encapsulated TCP super-packets go to the kernel whole (UDP-tunnel GSO TAP, Linux
    # 6.17+, IPv4 underlay) where it can; "off": always segmented in the datapath
    gso: str = "auto"

    def port_for(self, protocol: str) -> int:
        """The UDP port of `protocol`: `tunnel.port` for the configured one, the IANA port otherwise."""
        return self.port if protocol == self.protocol else DEFAULT_PORTS[protocol]


# Masquerade entry timeouts in seconds (the datapath's defaults follow Linux conntrack; see
# docs/config.md). 0 would make every mapping dead on arrival; a year is past any sane timeout. The
# keys are those of NAT_DEFAULT_TIMEOUTS.
NAT_TIMEOUTS = (
    "tcp_syn_sent",
    "tcp_established",
    "tcp_fin_wait",
    "tcp_time_wait",
    "tcp_close",
    "udp_unreplied",
    "udp_assured",
    "icmp",
)
NAT_TIMEOUT_MAX = 366 * 86400
NAT_MAX_ENTRIES = 1 << 26  # the datapath's bound, about 100 bytes per entry (NAT_MAX_ENTRIES)
NAT_DEFAULT_MAX_ENTRIES = 1 << 20  # the datapath's default (NAT_DEFAULT_MAX_ENTRIES)


def default_max_entries_per_pod(max_entries: int) -> int:
    """`masquerade.max_entries_per_pod` when unset: an eighth of the table (at least eight pods can
    be at their cap at once and the table still has room), at least 64, at most the table. The
    datapath computes the same (core `NatConfig::default_per_pod`, `_native.default_max_entries_per_pod`)."""
    return min(max(max_entries // 8, 64), max_entries)


@dataclass(frozen=True)
class MasqueradeConfig:
    enabled: bool = True
    non_masquerade_cidrs: tuple[IPNetwork, ...] = ()
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    timeouts: Mapping[str, int] = field(default_factory=dict)  # only the ones set; others: defaults
    max_entries: int | None = None
    max_entries_per_pod: int | None = None
    # the node's IPv6 masquerade address: "auto" (the underlay interface's global IPv6 address,
    # resolved at start), "none" (IPv6 pods are not translated) or an address of that interface
    address6: ipaddress.IPv6Address | str = "auto"

    def nat_config(self) -> dict[str, int]:
        """The datapath's `nat` config (only what the config sets; the datapath derives the per-pod
        cap from `max_entries` when it is not set, see `default_max_entries_per_pod`)."""
        out = dict(self.timeouts)
        if self.max_entries is not None:
            out["max_entries"] = self.max_entries
        if self.max_entries_per_pod is not None:
            out["max_entries_per_pod"] = self.max_entries_per_pod
        return out

    def effective_max_entries_per_pod(self) -> int:
        """The per-pod cap in force."""
        if self.max_entries_per_pod is not None:
            return self.max_entries_per_pod
        return default_max_entries_per_pod(self.max_entries or NAT_DEFAULT_MAX_ENTRIES)


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: IPAddress  # IPv4 or IPv6: its family picks the outer header family towards this peer
    pod_cidrs: tuple[IPNetwork, ...]
    mode: str | None = None
    tunnel_protocol: str | None = None
    # the MAC of the peer's VXLAN device (lower case), the inner destination of our VXLAN frames to
    # it; None: podrouter's synthesized one (vtep_mac_of), right for a podrouter peer
    vtep_mac: str | None = None
    # override of tunnel.geneve_payload for the Geneve frames sent to this peer
    geneve_payload: str | None = None


def vtep_mac_of(address: IPAddress) -> str:
    """The VTEP MAC podrouter synthesizes for a node: 02:70 and the underlay IPv4 address, or 02:76
    and the last four bytes of an IPv6 one. The rule is the core's (`encap::vxlan_inner_mac`, as
    `_native.vtep_mac`); the native module is loaded on first use, so validating a config does not
    load it."""
    return native.vtep_mac(str(address))


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/podrouter/v1"
    lease_ttl: int = 10
    # TLS (https endpoints): the CA that signs etcd's server certificate (None: the system's CAs), and
    # the client certificate + key for etcd's --client-cert-auth
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # etcd v3 authentication (a user with read/write on the prefix); both or neither
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DiscoveryConfig:
    backend: str = "static"
    etcd: EtcdConfig = field(default_factory=EtcdConfig)


@dataclass(frozen=True)
class PodConfig:
    name: str
    ip: IPAddress
    host_interface: str
    # the pod's annotations, parsed once here (podrouter.qos.QoSRequest): the bandwidth manager gets
    # this value, never the raw mapping; a bad annotation is a warning and leaves previous shaping
    qos: QoSRequest = field(default_factory=QoSRequest)
    # every address of the pod, `ip` first, at most one per family (dual stack: `ips: [v4, v6]`);
    # empty for a single-stack pod (just `ip`)
    ips: tuple[IPAddress, ...] = ()

    @property
    def annotations(self) -> Mapping[str, str]:
        return self.qos.annotations

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        return self.ips or (self.ip,)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ip": str(self.ip),
            "ips": [str(a) for a in self.addresses],
            "host_interface": self.host_interface,
            "annotations": dict(self.annotations),
        }


@dataclass(frozen=True)
class ApiConfig:
    socket: str = DEFAULT_SOCKET
    # the fd keeper (docs/handover.md): holds the datapath's fds while no daemon runs
    keeper: bool = True


MAX_WORKERS = 64  # datapath.workers: one TUN queue per worker (the kernel allows 256 per TUN)


@dataclass(frozen=True)
class DatapathConfig:
    # datapath.workers: how many forwarding threads (each with its own TUN queue and tunnel sockets);
    # None ("auto"): one per two CPUs this process may run on, at most four (docs/config.md says why)
    workers: int | None = None


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", 9965)  # None: no metrics endpoint


# BGP (docs/bgp.md). AS numbers: 0, 23456 (AS_TRANS, RFC 6793), 65535 and 4294967295 (RFC 7300) are
# reserved and never a speaker's own AS
ASN_MAX = (1 << 32) - 1
ASN_RESERVED = (0, 23456, 65535, ASN_MAX)
BGP_DEFAULT_HOLD = 90  # RFC 4271 §10 suggests 90 s
BGP_DEFAULT_CONNECT_RETRY = 5
BGP_DEFAULT_RESTART_TIME = 120
# a TCP-MD5 key is at most 80 bytes (RFC 2385 implementations, TCP_MD5SIG_MAXKEYLEN); it is written
# into bird.conf inside double quotes, so quotes and backslashes are refused
_BGP_PASSWORD_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e ]{1,80}$")


@dataclass(frozen=True)
class BgpPeerConfig:
    address: ipaddress.IPv4Address
    asn: int
    port: int = 179
    password: str | None = None
    hold_time: int = BGP_DEFAULT_HOLD
    connect_retry: int = BGP_DEFAULT_CONNECT_RETRY


@dataclass(frozen=True)
class BgpConfig:
    enabled: bool = False
    asn: int | None = None
    router_id: ipaddress.IPv4Address | None = None  # None: auto (the node's underlay address)
    peers: tuple[BgpPeerConfig, ...] = ()
    graceful_restart_time: int = BGP_DEFAULT_RESTART_TIME  # 0: no graceful restart


@dataclass(frozen=True)
class MeshClusterConfig:
    name: str
    id: int
    etcd: EtcdConfig
    mode: str = "tunnel"
    tunnel_protocol: str | None = None
    geneve_payload: str | None = None
    # the remote cluster's whole pod space (optional): its nodes must lie inside, and it stays
    # routed into the datapath (never masqueraded) even while none of its nodes is known
    pod_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class ClusterMeshConfig:
    clusters: tuple[MeshClusterConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    cluster_cidrs: tuple[IPNetwork, ...]
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    masquerade: MasqueradeConfig = field(default_factory=MasqueradeConfig)
    peers: tuple[PeerConfig, ...] = ()
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    bandwidth: BandwidthConfig = field(default_factory=BandwidthConfig)
    pods: tuple[PodConfig, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    warnings: tuple[str, ...] = ()  # problems that do not stop the daemon (bad pod annotations)
    path: str | None = None
    bgp: BgpConfig = field(default_factory=BgpConfig)
    cluster_name: str | None = None  # cluster.name, needed by clustermesh
    cluster_id: int | None = None  # cluster.id (1..255)
    clustermesh: ClusterMeshConfig = field(default_factory=ClusterMeshConfig)
    datapath: DatapathConfig = field(default_factory=DatapathConfig)

    @property
    def state_path(self) -> Path:
        """Where the daemon records what it installed: next to the API socket, named after the node."""
        return Path(self.api.socket).parent / f"{self.node.name}.state.json"


# ------------------------------------------------------------------------------------------ YAML input


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            ) from None
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen[key] = loader.construct_object(value_node, deep=deep)  # type: ignore[no-untyped-call]
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# libyaml's parser when PyYAML was built with it (about 8x faster on a node config: start-up time,
# docs/benchmarks.md); the constructor, and so the duplicate-key check, is the same Python code
_StrictCLoader: Any = None
if getattr(yaml, "__with_libyaml__", False):

    class _StrictCParser(yaml.CSafeLoader):
        """The C-parser twin of _StrictLoader."""

    _StrictCParser.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    _StrictCLoader = _StrictCParser


def _parse(text: str) -> Any:
    """The YAML document in `text`. With libyaml parsed by its C parser; a document that parser
    refuses is parsed again by PyYAML's own, so that every error message (and anything the two
    parsers might disagree on) is PyYAML's, exactly as without libyaml."""
    if _StrictCLoader is not None:
        try:
            return yaml.load(text, Loader=_StrictCLoader)  # noqa: S506 - a SafeLoader
        except Exception:  # noqa: BLE001 - whatever it was, PyYAML's parser says it (or accepts it)
            pass
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises `ConfigError` listing every problem found (the
    relations between the keys are the core's rulebook: `native.NativeUnavailable`, a StartError,
    when podrouter._native cannot be loaded)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError([f"{p}: cannot read the config file: {reason}"]) from None
    return loads(text, source=str(p))


def loads(text: str, source: str = "<config>") -> Config:
    """Validate a config given as YAML text (`source` names it in messages)."""
    try:
        data = _parse(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: invalid YAML: {e}"]) from None
    cfg = from_dict(data)
    return _with_path(cfg, source)


def _with_path(cfg: Config, source: str) -> Config:
    return replace(cfg, path=source)


def from_dict(data: Any) -> Config:
    """Validate an already parsed config (a mapping). Raises `ConfigError`."""
    v = _Validator()
    cfg = v.config(data)
    if v.problems or cfg is None:
        raise ConfigError(v.problems or ["the config is empty"])
    return cfg


# -------------------------------------------------------------------------------------------- helpers


def _q(value: Any) -> str:
    """A bad value as the user wrote it, quoted the Python way (`'10.244.0.0/33'`, `7`, `None`)."""
    return repr(value)


def parse_port_range(value: Any) -> tuple[tuple[int, int] | None, str | None]:
    """'lo-hi' -> ((lo, hi), None) or (None, reason)."""
    if not isinstance(value, str):
        return None, "is not a port range 'lo-hi'"
    m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", value)
    if not m:
        return None, "is not a port range 'lo-hi'"
    lo, hi = int(m.group(1)), int(m.group(2))
    # below 1024 are privileged/well-known ports the node's own services use
    if not (1024 <= lo <= 65535 and 1024 <= hi <= 65535):
        return None, "must lie within 1024-65535"
    if lo > hi:
        return None, f"is empty (start {lo} is above end {hi})"
    return (lo, hi), None


def parse_listen(value: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' -> (host, port); None if malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})", value) or re.fullmatch(
        r"([^:\[\]]+):(\d{1,5})", value
    )
    if not m:
        return None
    host, port = m.group(1), int(m.group(2))
    if port > 65535:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            return None
    return host, port


class _Validator:
    """Walks the parsed YAML, collecting problems instead of stopping at the first one."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.indices: dict[str, list[int]] = {}  # list path -> the original index of each valid item

    # --- primitives (each returns None after recording a problem) ---

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def mapping(
        self, path: str, value: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any] | None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.bad(path, f"{_q(value)} is not a mapping")
            return None
        # unknown keys are recorded but the known ones are still checked, so one run reports everything
        for key in value:
            if not isinstance(key, str):
                self.bad(path or "config", f"key {_q(key)} is not a string")
            elif key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (allowed: {', '.join(allowed)})"
                self.bad(f"{path}.{key}" if path else key, f"unknown key{suggestion}")
        for key in required:
            if value.get(key) is None:
                self.bad(f"{path}.{key}" if path else key, "is required")
        return value

    def string(self, path: str, value: Any) -> str | None:
        if not isinstance(value, str) or not value:
            self.bad(path, f"{_q(value)} is not a non-empty string")
            return None
        return value

    def boolean(self, path: str, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.bad(path, f"{_q(value)} is not a boolean (true or false)")
            return None
        return value

    def integer(self, path: str, value: Any, lo: int, hi: int) -> int | None:
        # bool is an int subclass in Python: `vni: true` must not become VNI 1
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, f"{_q(value)} is not an integer")
            return None
        if not lo <= value <= hi:
            self.bad(path, f"{_q(value)} is out of range ({lo}..{hi})")
            return None
        return value

    def choice(self, path: str, value: Any, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            self.bad(path, f"{_q(value)} is not one of: {', '.join(choices)}")
            return None
        return str(value)

    def name(self, path: str, value: Any) -> str | None:
        if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
            self.bad(path, f"{_q(value)} is not a valid name (letters, digits, '.', '_', '-'; at most 63)")
            return None
        return value

    def mac(self, path: str, value: Any) -> str | None:
        """A unicast Ethernet address, 'xx:xx:xx:xx:xx:xx'; returned in lower case."""
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 12:34:56:... of decimal digits as a base-60 number
            self.bad(
                path, f"{_q(value)} is not a MAC address (quote it: YAML reads unquoted aa:bb:.. as a number)"
            )
            return None
        if not isinstance(value, str) or not _MAC_RE.fullmatch(value):
            self.bad(path, f"{_q(value)} is not a MAC address (xx:xx:xx:xx:xx:xx)")
            return None
        mac = value.lower()
        if int(mac[:2], 16) & 1:
            self.bad(path, f"{_q(value)} is a multicast address (a VTEP MAC is unicast)")
            return None
        if mac == "00:00:00:00:00:00":
            self.bad(path, f"{_q(value)} is the zero address")
            return None
        return mac

    def ifname(self, path: str, value: Any) -> str | None:
        if not isinstance(value, str) or not _IFNAME_RE.fullmatch(value) or value in (".", ".."):
            self.bad(
                path, f"{_q(value)} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            )
            return None
        if value.startswith(RESERVED_IFNAME_PREFIX):
            self.bad(
                path,
                f"{_q(value)} is reserved: interface names starting with '{RESERVED_IFNAME_PREFIX}' are "
                "podrouter's GSO TAP",
            )
            return None
        return value

    def address(self, path: str, value: Any, v4_only: bool = False) -> IPAddress | None:
        try:
            if not isinstance(value, str):
                raise ValueError
            addr = ipaddress.ip_address(value)
        except ValueError:
            self.bad(path, f"{_q(value)} is not an IP address")
            return None
        if v4_only and addr.version != 4:
            self.bad(path, f"{_q(value)} is not an IPv4 address (the underlay is IPv4)")
            return None
        return addr

    def cidr(self, path: str, value: Any) -> IPNetwork | None:
        if not isinstance(value, str) or "/" not in value:
            self.bad(path, f"{_q(value)} is not a CIDR")
            return None
        try:
            return ipaddress.ip_network(value, strict=True)
        except ValueError:
            pass
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            self.bad(path, f"{_q(value)} is not a CIDR")
            return None
        self.bad(path, f"{_q(value)} has host bits set (did you mean '{net}'?)")
        return None

    def cidr_list(self, path: str, value: Any) -> tuple[IPNetwork, ...] | None:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.bad(path, f"{_q(value)} is not a list of CIDRs")
            return None
        out = [self.cidr(f"{path}[{i}]", item) for i, item in enumerate(value)]
        if any(n is None for n in out):
            return None
        return tuple(n for n in out if n is not None)

    def one_or_many_cidrs(self, path: str, m: dict[str, Any], required: bool) -> tuple[IPNetwork, ...] | None:
        """`pod_cidr: X` or `pod_cidrs: [X, Y]` (dual stack: at most one per address family)."""
        single, many = m.get("pod_cidr"), m.get("pod_cidrs")
        if single is not None and many is not None:
            self.bad(f"{path}.pod_cidrs", "give either pod_cidr or pod_cidrs, not both")
            return None
        if single is None and many is None:
            if required:
                self.bad(f"{path}.pod_cidr", "is required")
            return None
        if single is not None:
            net = self.cidr(f"{path}.pod_cidr", single)
            return (net,) if net is not None else None
        nets = self.cidr_list(f"{path}.pod_cidrs", many)
        if nets is None:
            return None
        if not nets:
            self.bad(f"{path}.pod_cidrs", "must not be empty")
            return None
        for version in (4, 6):
            if sum(1 for n in nets if n.version == version) > 1:
                self.bad(
                    f"{path}.pod_cidrs", f"{_q([str(n) for n in nets])} has more than one IPv{version} CIDR"
                )
                return None
        return nets

    # --- sections ---

    def config(self, data: Any) -> Config | None:
        top = (
            "node",
            "cluster",
            "routing",
            "tunnel",
            "masquerade",
            "peers",
            "discovery",
            "bandwidth",
            "pods",
            "api",
            "metrics",
            "bgp",
            "clustermesh",
            "datapath",
        )
        if data is None:
            self.bad("config", "the file is empty")
            return None
        if not isinstance(data, dict):
            self.bad("config", f"the top level must be a mapping, not {type(data).__name__}")
            return None
        m = self.mapping("", data, top, required=("node", "cluster"))
        if m is None:
            return None
        node = self.node(m.get("node")) if m.get("node") is not None else None
        cluster = self.cluster(m.get("cluster")) if m.get("cluster") is not None else None
        routing = self.routing(m.get("routing"))
        tunnel = self.tunnel(m.get("tunnel"))
        masq = self.masquerade(m.get("masquerade"))
        peers = self.peers(m.get("peers"))
        discovery = self.discovery(m.get("discovery"))
        bandwidth = self.bandwidth(m.get("bandwidth"))
        pods = self.pods(m.get("pods"))
        api = self.api(m.get("api"))
        metrics = self.metrics(m.get("metrics"))
        datapath = self.datapath(m.get("datapath"))
        bgp = self.bgp(m.get("bgp"), node)
        cluster_ident = self.cluster_identity(m.get("cluster"))
        mesh = self.clustermesh(m.get("clustermesh"), cluster_ident, cluster or ())
        if mesh is not None and any(c.mode == "hybrid" for c in mesh.clusters):
            # a hybrid mesh cluster uses routing.native_cidrs / native_when_on_link too
            self.warnings = [w for w in self.warnings if not w.startswith("routing: native_cidrs and")]
        if node is not None and cluster is not None:
            # relations are checked on whatever parsed, so one run reports those problems too: the
            # table spec's by the core's rulebook, the pods' here
            self.rulebook_checks(node, cluster, routing, tunnel, peers or (), masq)
            self.pod_checks(node, cluster, pods or (), masq)
        self.port_checks(tunnel, masq, metrics)
        if self.problems:
            return None
        assert node is not None and cluster is not None and routing is not None and tunnel is not None
        assert masq is not None and peers is not None and discovery is not None and bandwidth is not None
        assert pods is not None and api is not None and metrics is not None and datapath is not None
        return Config(
            node=node,
            cluster_cidrs=cluster,
            routing=routing,
            tunnel=tunnel,
            masquerade=masq,
            peers=peers,
            discovery=discovery,
            bandwidth=bandwidth,
            pods=pods,
            api=api,
            metrics=metrics,
            warnings=tuple(self.warnings),
            bgp=bgp or BgpConfig(),
            cluster_name=cluster_ident[0],
            cluster_id=cluster_ident[1],
            clustermesh=mesh or ClusterMeshConfig(),
            datapath=datapath,
        )

    def node(self, value: Any) -> NodeConfig | None:
        m = self.mapping(
            "node", value, ("name", "address", "address6", "interface", "pod_cidr", "pod_cidrs"), ("name",)
        )
        if m is None:
            return None
        name = self.name("node.name", m["name"]) if m.get("name") is not None else None
        address = self.address("node.address", m["address"]) if m.get("address") is not None else None
        bad_address = m.get("address") is not None and address is None
        address6 = self.address("node.address6", m["address6"]) if m.get("address6") is not None else None
        bad_address = bad_address or (m.get("address6") is not None and address6 is None)
        if address6 is not None and address6.version != 6:
            self.bad("node.address6", f"'{address6}' is not an IPv6 address")
            bad_address = True
        elif address6 is not None and address is not None and address.version == 6:
            self.bad(
                "node.address6",
                f"'{address6}': node.address '{address}' is already IPv6 (address6 is the IPv6 address "
                "of a dual-stack underlay whose node.address is IPv4)",
            )
            bad_address = True
        iface = self.ifname("node.interface", m["interface"]) if m.get("interface") is not None else None
        bad_iface = m.get("interface") is not None and iface is None
        cidrs = self.one_or_many_cidrs("node", m, required=True)
        if name is None or cidrs is None or bad_address or bad_iface:
            return None
        for key, a in (("node.address", address), ("node.address6", address6)):
            why = unusable_node_address(a) if a is not None else None
            if why is not None:
                self.bad(key, f"'{a}' {why}")
                return None
        assert address6 is None or isinstance(address6, ipaddress.IPv6Address)
        return NodeConfig(name=name, address=address, interface=iface, pod_cidrs=cidrs, address6=address6)

    def cluster(self, value: Any) -> tuple[IPNetwork, ...] | None:
        m = self.mapping("cluster", value, ("pod_cidr", "pod_cidrs", "name", "id"))
        if m is None:
            return None
        return self.one_or_many_cidrs("cluster", m, required=True)

    def routing(self, value: Any) -> RoutingConfig | None:
        m = self.mapping("routing", value, ("mode", "native_cidrs", "native_when_on_link"))
        if m is None:
            return None
        mode = self.choice("routing.mode", m.get("mode", "tunnel"), MODES)
        native = self.cidr_list("routing.native_cidrs", m.get("native_cidrs"))
        on_link = self.boolean("routing.native_when_on_link", m.get("native_when_on_link", False))
        if mode is None or native is None or on_link is None:
            return None
        if mode != "hybrid" and (native or on_link):
            self.warnings.append(
                f"routing: native_cidrs and native_when_on_link only apply to mode hybrid (mode is {mode})"
            )
        return RoutingConfig(mode=mode, native_cidrs=native, native_when_on_link=on_link)

    def tunnel(self, value: Any) -> TunnelConfig | None:
        m = self.mapping("tunnel", value, ("protocol", "port", "vni", "mtu", "geneve_payload", "gso"))
        if m is None:
            return None
        proto = self.choice("tunnel.protocol", m.get("protocol", "vxlan"), PROTOCOLS)
        port = self.integer("tunnel.port", m["port"], 1, 65535) if m.get("port") is not None else 0
        vni = self.integer("tunnel.vni", m.get("vni", 1), 0, VNI_MAX)
        payload = self.choice("tunnel.geneve_payload", m.get("geneve_payload", "ethernet"), GENEVE_PAYLOADS)
        raw_gso = m.get("gso", "auto")
        # YAML 1.1 reads a bare off / on as a boolean
        raw_gso = {False: "off", True: "auto"}.get(raw_gso, raw_gso) if isinstance(raw_gso, bool) else raw_gso
        gso = self.choice("tunnel.gso", raw_gso, ("auto", "off"))
        raw_mtu = m.get("mtu", "auto")
        mtu: int | None = None
        mtu_ok = True
        if raw_mtu != "auto":
            # 576: the smallest datagram every IPv4 host must accept (RFC 791); below that TCP stalls
            mtu = self.integer("tunnel.mtu", raw_mtu, 576, 65535) if not isinstance(raw_mtu, str) else None
            if isinstance(raw_mtu, str):
                self.bad("tunnel.mtu", f"{_q(raw_mtu)} is not 'auto' or an integer")
            mtu_ok = mtu is not None
        if proto is None or port is None or vni is None or not mtu_ok or payload is None or gso is None:
            return None
        return TunnelConfig(
            protocol=proto,
            port=port or DEFAULT_PORTS[proto],
            vni=vni,
            mtu=mtu,
            geneve_payload=payload,
            gso=gso,
        )

    def masquerade(self, value: Any) -> MasqueradeConfig | None:
        m = self.mapping(
            "masquerade",
            value,
            (
                "enabled",
                "non_masquerade_cidrs",
                "port_range",
                "timeouts",
                "max_entries",
                "max_entries_per_pod",
                "address6",
            ),
        )
        if m is None:
            return None
        address6: ipaddress.IPv6Address | str | None = "auto"
        raw6 = m.get("address6", "auto")
        if raw6 is None or raw6 in ("auto", "none"):
            address6 = "auto" if raw6 is None else raw6
        else:
            a6 = None
            if isinstance(raw6, str):
                try:
                    a6 = ipaddress.IPv6Address(raw6)
                except ValueError:
                    a6 = None
            why = unusable_node_address(a6) if a6 is not None else None
            if a6 is None:
                self.bad("masquerade.address6", f"{_q(raw6)} is not 'auto', 'none' or an IPv6 address")
                address6 = None
            elif why is not None:
                self.bad("masquerade.address6", f"'{a6}' {why}")
                address6 = None
            else:
                address6 = a6
        enabled = self.boolean("masquerade.enabled", m.get("enabled", True))
        nonmasq = self.cidr_list("masquerade.non_masquerade_cidrs", m.get("non_masquerade_cidrs"))
        rng: tuple[int, int] | None = DEFAULT_PORT_RANGE
        if m.get("port_range") is not None:
            rng, why = parse_port_range(m["port_range"])
            if why:
                self.bad("masquerade.port_range", f"{_q(m['port_range'])} {why}")
        timeouts: dict[str, int] | None = {}
        t = self.mapping("masquerade.timeouts", m.get("timeouts"), NAT_TIMEOUTS)
        if t is None:
            timeouts = None
        else:
            for key, raw in t.items():
                if key in NAT_TIMEOUTS:
                    n = self.integer(f"masquerade.timeouts.{key}", raw, 1, NAT_TIMEOUT_MAX)
                    if n is None:
                        timeouts = None
                    elif timeouts is not None:
                        timeouts[key] = n
        max_entries = None
        if m.get("max_entries") is not None:
            max_entries = self.integer("masquerade.max_entries", m["max_entries"], 1, NAT_MAX_ENTRIES)
            if max_entries is None:
                return None
        per_pod = None
        if m.get("max_entries_per_pod") is not None:
            table = max_entries or NAT_DEFAULT_MAX_ENTRIES
            per_pod = self.integer("masquerade.max_entries_per_pod", m["max_entries_per_pod"], 1, table)
            if per_pod is None:
                return None
        if enabled is None or nonmasq is None or rng is None or timeouts is None or address6 is None:
            return None
        return MasqueradeConfig(
            enabled=enabled,
            non_masquerade_cidrs=nonmasq,
            port_range=rng,
            timeouts=timeouts,
            max_entries=max_entries,
            max_entries_per_pod=per_pod,
            address6=address6,
        )

    def peer(self, path: str, value: Any) -> PeerConfig | None:
        m = self.mapping(
            path,
            value,
            (
                "name",
                "address",
                "pod_cidr",
                "pod_cidrs",
                "mode",
                "tunnel_protocol",
                "vtep_mac",
                "geneve_payload",
            ),
            ("name", "address"),
        )
        if m is None:
            return None
        name = self.name(f"{path}.name", m["name"]) if m.get("name") is not None else None
        addr = self.address(f"{path}.address", m["address"]) if m.get("address") is not None else None
        cidrs = self.one_or_many_cidrs(path, m, required=True)
        mode = self.choice(f"{path}.mode", m["mode"], PEER_MODES) if m.get("mode") is not None else None
        proto = (
            self.choice(f"{path}.tunnel_protocol", m["tunnel_protocol"], PROTOCOLS)
            if m.get("tunnel_protocol") is not None
            else None
        )
        vtep_mac = self.mac(f"{path}.vtep_mac", m["vtep_mac"]) if m.get("vtep_mac") is not None else None
        payload = self.geneve_payload(path, m)
        if (
            name is None
            or addr is None
            or cidrs is None
            or (m.get("mode") is not None and mode is None)
            or (m.get("tunnel_protocol") is not None and proto is None)
            or (m.get("vtep_mac") is not None and vtep_mac is None)
            or (m.get("geneve_payload") is not None and payload is None)
        ):
            return None
        why = unusable_node_address(addr)
        if why is not None:
            self.bad(f"{path}.address", f"'{addr}' {why}")
            return None
        return PeerConfig(
            name=name,
            address=addr,
            pod_cidrs=cidrs,
            mode=mode,
            tunnel_protocol=proto,
            vtep_mac=vtep_mac,
            geneve_payload=payload,
        )

    def geneve_payload(self, path: str, m: dict[str, Any]) -> str | None:
        """The optional per-peer / per-cluster `geneve_payload` override."""
        if m.get("geneve_payload") is None:
            return None
        return self.choice(f"{path}.geneve_payload", m["geneve_payload"], GENEVE_PAYLOADS)

    def peers(self, value: Any) -> tuple[PeerConfig, ...] | None:
        return self._list("peers", value, self.peer)

    def _list(self, path: str, value: Any, item: Callable[[str, Any], Any]) -> tuple[Any, ...] | None:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.bad(path, f"{_q(value)} is not a list")
            return None
        # the valid items are returned even when others failed, for the cross checks; the failures are
        # already in self.problems, so the config as a whole is still rejected
        out = [(i, item(f"{path}[{i}]", v)) for i, v in enumerate(value)]
        self.indices[path] = [i for i, x in out if x is not None]
        return tuple(x for _, x in out if x is not None)

    def discovery(self, value: Any) -> DiscoveryConfig | None:
        m = self.mapping("discovery", value, ("backend", "etcd"))
        if m is None:
            return None
        backend = self.choice("discovery.backend", m.get("backend", "static"), BACKENDS)
        e = self.mapping(
            "discovery.etcd",
            m.get("etcd"),
            ("endpoints", "prefix", "lease_ttl", "ca_file", "cert_file", "key_file", "username", "password"),
        )
        if e is None or backend is None:
            return None
        endpoints: list[str] = []
        raw_eps = e.get("endpoints", list(EtcdConfig.endpoints))
        eps_ok = True
        if not isinstance(raw_eps, list) or not raw_eps:
            self.bad("discovery.etcd.endpoints", f"{_q(raw_eps)} is not a non-empty list of URLs")
            eps_ok = False
        else:
            for i, ep in enumerate(raw_eps):
                parts = urlsplit(ep) if isinstance(ep, str) else None
                try:
                    port_ok = parts is not None and (parts.port is None or parts.port > 0)
                except ValueError:
                    port_ok = False
                if (
                    parts is None
                    or parts.scheme not in ("http", "https")
                    or not parts.hostname
                    or not port_ok
                ):
                    self.bad(f"discovery.etcd.endpoints[{i}]", f"{_q(ep)} is not an http(s)://host:port URL")
                    eps_ok = False
                else:
                    endpoints.append(ep.rstrip("/"))
        prefix = e.get("prefix", EtcdConfig.prefix)
        prefix_ok = isinstance(prefix, str) and prefix.startswith("/") and len(prefix) > 1
        if not prefix_ok:
            self.bad("discovery.etcd.prefix", f"{_q(prefix)} is not a key prefix starting with '/'")
        # etcd's minimum lease TTL is about 2 s (it is raised to the election timeout); an hour is plenty
        ttl = self.integer("discovery.etcd.lease_ttl", e.get("lease_ttl", EtcdConfig.lease_ttl), 2, 3600)
        secure = self.etcd_security(e, endpoints if eps_ok else [])
        if not eps_ok or not prefix_ok or ttl is None or secure is None:
            return None
        return DiscoveryConfig(
            backend=backend, etcd=EtcdConfig(tuple(endpoints), prefix.rstrip("/"), ttl, **secure)
        )

    def etcd_security(self, e: dict[str, Any], endpoints: list[str]) -> dict[str, str | None] | None:
        """`discovery.etcd` TLS files and credentials (the files are opened at start, not here)."""
        out: dict[str, str | None] = {}
        ok = True
        for key in ("ca_file", "cert_file", "key_file"):
            raw = e.get(key)
            if raw is None:
                out[key] = None
            elif not isinstance(raw, str) or not raw.startswith("/") or "\0" in raw:
                self.bad(f"discovery.etcd.{key}", f"{_q(raw)} is not an absolute file path")
                ok = False
            else:
                out[key] = raw
        if ok and (out["cert_file"] is None) != (out["key_file"] is None):
            missing = "key_file" if out["key_file"] is None else "cert_file"
            self.bad(
                f"discovery.etcd.{missing}",
                "is required with cert_file/key_file (a client certificate and its key)",
            )
            ok = False
        if ok and any(out.values()):
            for i, ep in enumerate(endpoints):
                if not ep.startswith("https://"):
                    self.bad(
                        f"discovery.etcd.endpoints[{i}]",
                        f"{_q(ep)} is not https:// but ca_file/cert_file/key_file are set",
                    )
                    ok = False
        for key in ("username", "password"):
            raw = e.get(key)
            if raw is None:
                out[key] = None
            elif not isinstance(raw, str) or not raw or any(ord(c) < 32 for c in raw):
                shown = _q(raw) if key == "username" else "(hidden)"
                self.bad(
                    f"discovery.etcd.{key}", f"{shown} is not a non-empty string without control characters"
                )
                ok = False
            else:
                out[key] = raw
        if ok and (out["username"] is None) != (out["password"] is None):
            missing = "password" if out["password"] is None else "username"
            self.bad(f"discovery.etcd.{missing}", "is required with username/password (etcd authentication)")
            ok = False
        if ok and out["username"] is not None and any(ep.startswith("http://") for ep in endpoints):
            self.warnings.append(
                "discovery.etcd.password: sent over plain http:// endpoints (use https:// with ca_file)"
            )
        return out if ok else None

    def bandwidth(self, value: Any) -> BandwidthConfig | None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.bad("bandwidth", f"{_q(value)} is not a mapping")
            return None
        problems = validate_bandwidth_config(dict(value))
        for msg in problems:
            self.problems.append(msg if msg.startswith("bandwidth") else f"bandwidth: {msg}")
        return None if problems else parse_bandwidth_config(dict(value))

    def pod(self, path: str, value: Any) -> PodConfig | None:
        m = self.mapping(
            path, value, ("name", "ip", "ips", "host_interface", "annotations"), ("name", "host_interface")
        )
        if m is None:
            return None
        name = self.name(f"{path}.name", m["name"]) if m.get("name") is not None else None
        ips = self.pod_addresses(path, m)
        ip = ips[0] if ips else None
        iface = (
            self.ifname(f"{path}.host_interface", m["host_interface"]) if m.get("host_interface") else None
        )
        ann = m.get("annotations") or {}
        ann_ok = True
        request = QoSRequest()
        if not isinstance(ann, dict):
            self.bad(f"{path}.annotations", f"{_q(ann)} is not a mapping")
            ann_ok = False
        else:
            for k, v in ann.items():
                # Kubernetes annotations are string -> string; YAML makes `10M` a string but `1000` an int
                if not isinstance(k, str) or not isinstance(v, str | int) or isinstance(v, bool):
                    self.bad(f"{path}.annotations", f"{_q(k)}: {_q(v)} is not a string annotation")
                    ann_ok = False
            if ann_ok:
                request = QoSRequest.parse({k: str(v) for k, v in ann.items()})
                for msg in request.problems:
                    self.warnings.append(f"{path}.annotations: {msg} (the pod is added without shaping)")
        if name is None or ip is None or iface is None or not ann_ok:
            return None
        dual = ips if ips and len(ips) > 1 else ()
        return PodConfig(name=name, ip=ip, host_interface=iface, qos=request, ips=dual)

    def pod_addresses(self, path: str, m: dict[str, Any]) -> tuple[IPAddress, ...] | None:
        """`ip` (one address) and/or `ips` (dual stack: at most one per family): all of the pod's
        addresses, `ip` (else `ips[0]`) first. None after a problem."""
        out: list[IPAddress] = []
        ok = True
        if m.get("ip") is not None:
            a = self.address(f"{path}.ip", m["ip"])
            ok = a is not None
            if a is not None:
                out.append(a)
        raw = m.get("ips")
        if raw is not None:
            if not isinstance(raw, list) or not raw:
                self.bad(f"{path}.ips", f"{_q(raw)} is not a non-empty list of IP addresses")
                return None
            for j, v in enumerate(raw):
                a = self.address(f"{path}.ips[{j}]", v)
                if a is None:
                    ok = False
                elif a not in out:
                    if any(b.version == a.version for b in out):
                        self.bad(
                            f"{path}.ips[{j}]",
                            f"'{a}': at most one address per family (one IPv4, one IPv6)",
                        )
                        ok = False
                    else:
                        out.append(a)
        elif m.get("ip") is None:
            self.bad(f"{path}.ip", "is required")
            return None
        return tuple(out) if ok and out else None

    def pods(self, value: Any) -> tuple[PodConfig, ...] | None:
        return self._list("pods", value, self.pod)

    def api(self, value: Any) -> ApiConfig | None:
        m = self.mapping("api", value, ("socket", "keeper"))
        if m is None:
            return None
        sock = m.get("socket", DEFAULT_SOCKET)
        # sun_path is 108 bytes including the terminating NUL (unix(7))
        if not isinstance(sock, str) or not sock.startswith("/") or len(sock.encode()) > 107 or "\0" in sock:
            self.bad("api.socket", f"{_q(sock)} is not an absolute path of at most 107 bytes")
            return None
        keeper = self.boolean("api.keeper", m.get("keeper", True))
        if keeper is None:
            return None
        return ApiConfig(socket=sock, keeper=keeper)

    def datapath(self, value: Any) -> DatapathConfig | None:
        m = self.mapping("datapath", value, ("workers",))
        if m is None:
            return None
        raw = m.get("workers", "auto")
        if raw == "auto":
            return DatapathConfig(workers=None)
        workers = self.integer("datapath.workers", raw, 1, MAX_WORKERS)
        if workers is None:
            return None
        return DatapathConfig(workers=workers)

    def metrics(self, value: Any) -> MetricsConfig | None:
        m = self.mapping("metrics", value, ("listen",))
        if m is None:
            return None
        if "listen" in m and m["listen"] is None:
            return MetricsConfig(listen=None)
        raw = m.get("listen", DEFAULT_METRICS)
        listen = parse_listen(raw) if isinstance(raw, str) else None
        if listen is None:
            self.bad("metrics.listen", f"{_q(raw)} is not host:port")
            return None
        return MetricsConfig(listen=listen)

    # --- BGP and cluster mesh (docs/bgp.md, docs/clustermesh.md) ---

    def asn(self, path: str, value: Any) -> int | None:
        n = self.integer(path, value, 1, ASN_MAX - 1)
        if n is not None and n in ASN_RESERVED:
            self.bad(path, f"{_q(value)} is a reserved AS number (0, 23456, 65535, 4294967295)")
            return None
        return n

    def bgp(self, value: Any, node: NodeConfig | None) -> BgpConfig | None:
        m = self.mapping("bgp", value, ("enabled", "asn", "router_id", "peers", "graceful_restart_time"))
        if m is None:
            return None
        enabled = self.boolean("bgp.enabled", m.get("enabled", False))
        asn = self.asn("bgp.asn", m["asn"]) if m.get("asn") is not None else None
        rid_raw = m.get("router_id", "auto")
        router_id: ipaddress.IPv4Address | None = None
        rid_ok = True
        if rid_raw != "auto":
            a = self.address("bgp.router_id", rid_raw, v4_only=True)
            rid_ok = a is not None
            if isinstance(a, ipaddress.IPv4Address):
                router_id = a
        gr = self.integer(
            "bgp.graceful_restart_time", m.get("graceful_restart_time", BGP_DEFAULT_RESTART_TIME), 0, 4095
        )  # the capability carries 12 bits (RFC 4724 §3)
        peers = self._list("bgp.peers", m.get("peers"), self.bgp_peer)
        if enabled:
            if m.get("asn") is None:
                self.bad("bgp.asn", "is required when bgp.enabled is true")
            if not m.get("peers"):
                self.bad("bgp.peers", "needs at least one peer when bgp.enabled is true")
        seen: dict[ipaddress.IPv4Address, int] = {}
        idx = self.indices.get("bgp.peers", [])
        for i, p in zip(idx, peers or (), strict=True):
            if p.address in seen:
                self.bad(f"bgp.peers[{i}].address", f"'{p.address}' is also bgp.peers[{seen[p.address]}]")
            seen.setdefault(p.address, i)
            if node is not None and node.address is not None and p.address == node.address:
                self.bad(f"bgp.peers[{i}].address", f"'{p.address}' is this node's own address")
        if enabled is None or not rid_ok or gr is None or peers is None:
            return None
        if m.get("asn") is not None and asn is None:
            return None
        return BgpConfig(enabled=enabled, asn=asn, router_id=router_id, peers=peers, graceful_restart_time=gr)

    def bgp_peer(self, path: str, value: Any) -> BgpPeerConfig | None:
        m = self.mapping(
            path,
            value,
            ("address", "asn", "port", "password", "hold_time", "connect_retry"),
            ("address", "asn"),
        )
        if m is None:
            return None
        addr = (
            self.address(f"{path}.address", m["address"], v4_only=True)
            if m.get("address") is not None
            else None
        )
        if addr is not None and (addr.is_unspecified or addr.is_multicast or addr.is_loopback):
            self.bad(f"{path}.address", f"{_q(m['address'])} is not a unicast address of a router")
            addr = None
        asn = self.asn(f"{path}.asn", m["asn"]) if m.get("asn") is not None else None
        port = self.integer(f"{path}.port", m.get("port", 179), 1, 65535)
        password = m.get("password")
        if password is not None and (
            not isinstance(password, str) or not _BGP_PASSWORD_RE.fullmatch(password)
        ):
            # never echo a secret back: name the key and what is wrong only
            self.bad(f"{path}.password", "is not 1-80 printable ASCII characters without '\"' or '\\'")
            return None
        # RFC 4271 §4.2: the hold time is 0 (no keepalives) or at least 3 seconds
        hold = self.integer(f"{path}.hold_time", m.get("hold_time", BGP_DEFAULT_HOLD), 3, 65535)
        retry = self.integer(
            f"{path}.connect_retry", m.get("connect_retry", BGP_DEFAULT_CONNECT_RETRY), 1, 65535
        )
        if addr is None or asn is None or port is None or hold is None or retry is None:
            return None
        assert isinstance(addr, ipaddress.IPv4Address)
        return BgpPeerConfig(
            address=addr, asn=asn, port=port, password=password, hold_time=hold, connect_retry=retry
        )

    def cluster_identity(self, value: Any) -> tuple[str | None, int | None]:
        if not isinstance(value, dict):
            return None, None
        name = self.name("cluster.name", value["name"]) if value.get("name") is not None else None
        cid = self.integer("cluster.id", value["id"], 1, 255) if value.get("id") is not None else None
        return name, cid

    def clustermesh(
        self, value: Any, ident: tuple[str | None, int | None], cluster: tuple[IPNetwork, ...]
    ) -> ClusterMeshConfig | None:
        m = self.mapping("clustermesh", value, ("clusters",))
        if m is None:
            return None
        clusters = self._list("clustermesh.clusters", m.get("clusters"), self.mesh_cluster)
        if clusters is None:
            return None
        if m.get("clusters"):
            for key, v in (("cluster.name", ident[0]), ("cluster.id", ident[1])):
                if v is None:
                    self.bad(key, "is required when clustermesh.clusters is set (unique in the mesh)")
        names: dict[str, str] = {}
        ids: dict[int, str] = {}
        if ident[0] is not None:
            names[ident[0]] = "cluster.name"
        if ident[1] is not None:
            ids[ident[1]] = "cluster.id"
        idx = self.indices.get("clustermesh.clusters", [])
        spaces: list[tuple[str, IPNetwork]] = [("cluster.pod_cidr", n) for n in cluster]
        for i, c in zip(idx, clusters, strict=True):
            path = f"clustermesh.clusters[{i}]"
            for net in c.pod_cidrs:
                for owner, other in spaces:
                    if net.version == other.version and net.overlaps(other):  # type: ignore[arg-type]
                        self.bad(f"{path}.pod_cidr", f"'{net}' overlaps {owner} '{other}'")
                spaces.append((f"{path}.pod_cidr", net))
            if c.name in names:
                self.bad(f"{path}.name", f"{_q(c.name)} is also {names[c.name]}")
            names.setdefault(c.name, f"{path}.name")
            if c.id in ids:
                self.bad(f"{path}.id", f"{_q(c.id)} is also {ids[c.id]}")
            ids.setdefault(c.id, f"{path}.id")
        return ClusterMeshConfig(clusters=clusters)

    def mesh_cluster(self, path: str, value: Any) -> MeshClusterConfig | None:
        m = self.mapping(
            path,
            value,
            ("name", "id", "etcd", "mode", "tunnel_protocol", "geneve_payload", "pod_cidr", "pod_cidrs"),
            ("name", "id", "etcd"),
        )
        if m is None:
            return None
        name = self.name(f"{path}.name", m["name"]) if m.get("name") is not None else None
        cid = self.integer(f"{path}.id", m["id"], 1, 255) if m.get("id") is not None else None
        mode = self.choice(f"{path}.mode", m.get("mode", "tunnel"), MODES)
        proto = (
            self.choice(f"{path}.tunnel_protocol", m["tunnel_protocol"], PROTOCOLS)
            if m.get("tunnel_protocol") is not None
            else None
        )
        etcd = None
        if m.get("etcd") is not None:
            # the same keys and checks as discovery.etcd (TLS/auth included), reported under this path
            sub = _Validator()
            d = sub.discovery({"backend": "etcd", "etcd": m["etcd"]})
            for msg in sub.problems:
                self.problems.append(msg.replace("discovery.etcd", f"{path}.etcd", 1))
            etcd = d.etcd if d is not None and not sub.problems else None
        space: tuple[IPNetwork, ...] | None = ()
        if m.get("pod_cidr") is not None or m.get("pod_cidrs") is not None:
            space = self.one_or_many_cidrs(path, m, required=False)
        if name is None or cid is None or mode is None or etcd is None or space is None:
            return None
        payload = self.geneve_payload(path, m)
        if m.get("tunnel_protocol") is not None and proto is None:
            return None
        if m.get("geneve_payload") is not None and payload is None:
            return None
        return MeshClusterConfig(
            name=name,
            id=cid,
            etcd=etcd,
            mode=mode,
            tunnel_protocol=proto,
            geneve_payload=payload,
            pod_cidrs=space,
        )

    # --- relations between sections ---

    def port_checks(
        self, tunnel: TunnelConfig | None, masq: MasqueradeConfig | None, metrics: MetricsConfig | None
    ) -> None:
        """The masquerade ports are the node's own source ports towards the outside: a translated
        flow on a port the node also listens or sends on would take that port's replies (or hand
        them to the wrong place). Checked even with masquerade disabled (a reload can enable it)."""
        if masq is None or masq.port_range is None:
            return
        lo, hi = masq.port_range
        shown = f"'{lo}-{hi}'"
        taken: list[tuple[int, int, str]] = []
        if tunnel is not None:
            for proto in PROTOCOLS:
                port = tunnel.port_for(proto)
                where = "tunnel.port" if proto == tunnel.protocol else f"the IANA {proto} port"
                taken.append((port, port, f"the {proto} port {port} ({where})"))
            taken.append(
                (
                    *TUNNEL_SOURCE_PORTS,
                    "the tunnel sender's outer source ports "
                    f"{TUNNEL_SOURCE_PORTS[0]}-{TUNNEL_SOURCE_PORTS[1]}",
                )
            )
        if metrics is not None and metrics.listen is not None:
            port = metrics.listen[1]
            taken.append((port, port, f"the metrics port {port} (metrics.listen)"))
        for a, b, what in taken:
            if lo <= b and a <= hi:
                self.bad("masquerade.port_range", f"{shown} overlaps {what}")

    def rulebook_checks(
        self,
        node: NodeConfig,
        cluster: tuple[IPNetwork, ...],
        routing: RoutingConfig | None,
        tunnel: TunnelConfig | None,
        peers: tuple[PeerConfig, ...],
        masq: MasqueradeConfig | None,
    ) -> None:
        """The relations between the keys that become the table spec and the engine settings
        (pod CIDRs inside the cluster and disjoint, peers unique and not this node, pod space
        clear of underlay addresses, ...) are the core's rulebook (rust/core/src/rules.rs): the
        spec of what parsed (sections that did not parse take their defaults) goes to it once,
        and each problem it finds comes back under the YAML key the user wrote."""
        peer_idx = self.indices.get("peers", list(range(len(peers))))
        masq = masq or MasqueradeConfig()
        spec = table_spec(
            node,
            cluster,
            routing or RoutingConfig(),
            tunnel or TunnelConfig(),
            masq,
            [
                {"name": p.name, "address": str(p.address), "pod_cidrs": [str(n) for n in p.pod_cidrs]}
                for p in peers
            ],
        )
        a6 = str(masq.address6) if isinstance(masq.address6, ipaddress.IPv6Address) else None
        if node.address is None:
            # resolved at start (and the tables compiled against it then): either family may fit
            settings = engine_settings("0.0.0.0", "::", masq.port_range, a6)
        else:
            n6 = str(node.address6) if node.address6 is not None else None
            settings = engine_settings(str(node.address), n6, masq.port_range, a6)
        keys = SpecKeys(node, cluster, peers, peer_idx)
        for path, message in native.check_tables(spec, settings):
            self.bad(keys.key(path), keys.message(message))

    def pod_checks(
        self,
        node: NodeConfig,
        cluster: tuple[IPNetwork, ...],
        pods: tuple[PodConfig, ...],
        masq: MasqueradeConfig | None,
    ) -> None:
        """What is not the table spec's: the pods under `pods:` (unique, inside this node's pod
        CIDRs) and the warning for non_masquerade_cidrs inside the cluster."""

        def in_cluster(net: IPNetwork) -> bool:
            return any(net.version == c.version and net.subnet_of(c) for c in cluster)  # type: ignore[arg-type]

        for i, net in enumerate(masq.non_masquerade_cidrs if masq else ()):
            if in_cluster(net):
                self.warnings.append(
                    f"masquerade.non_masquerade_cidrs[{i}]: '{net}' is cluster pod space "
                    "(never masqueraded anyway)"
                )
        pod_names: dict[str, int] = {}
        pod_ips: dict[IPAddress, int] = {}
        pod_idx = self.indices.get("pods", list(range(len(pods))))
        for i, pod in zip(pod_idx, pods, strict=True):
            path = f"pods[{i}]"
            if pod.name in pod_names:
                self.bad(f"{path}.name", f"{_q(pod.name)} is also pods[{pod_names[pod.name]}]")
            pod_names.setdefault(pod.name, i)
            key = "ip" if len(pod.addresses) == 1 else "ips"
            for addr in pod.addresses:
                if addr in pod_ips:
                    self.bad(f"{path}.{key}", f"'{addr}' is also pods[{pod_ips[addr]}]")
                pod_ips.setdefault(addr, i)
                if not any(addr in n for n in node.pod_cidrs):
                    self.bad(f"{path}.{key}", f"'{addr}' is not inside this node's pod CIDRs")


# ------------------------------------------------------------------ the table spec and the rulebook


def table_spec(
    node: NodeConfig,
    cluster_cidrs: Iterable[IPNetwork],
    routing: RoutingConfig,
    tunnel: TunnelConfig,
    masq: MasqueradeConfig,
    peers: list[dict[str, Any]],
    generation: int = 0,
) -> dict[str, Any]:
    """The table spec dict `_native.Tables(spec, settings)` and `_native.check_tables` take
    (docs/architecture.md, "Table spec"), from the config's sections and `peers` (spec dicts);
    plan.build_spec adds what the node resolves (next hops, gateways, mesh space)."""
    return {
        "generation": generation,
        "node": {"name": node.name, "pod_cidrs": [str(x) for x in node.pod_cidrs]},
        "cluster_cidrs": [str(x) for x in cluster_cidrs],
        "mode": routing.mode,
        "native_cidrs": [str(x) for x in routing.native_cidrs],
        "native_when_on_link": routing.native_when_on_link,
        "tunnel": {
            "protocol": tunnel.protocol,
            "vni": tunnel.vni,
            "vxlan_port": tunnel.port_for("vxlan"),
            "geneve_port": tunnel.port_for("geneve"),
            "geneve_payload": tunnel.geneve_payload,
        },
        "gateway": None,
        "masquerade": {
            "enabled": masq.enabled,
            "non_masquerade_cidrs": [str(x) for x in masq.non_masquerade_cidrs],
            "gateway6": None,
        },
        "peers": peers,
    }


def engine_settings(
    address: str, address6: str | None, port_range: tuple[int, int], masq_address6: str | None
) -> dict[str, Any]:
    """The engine's start-time settings as keys of its config (`_native.Datapath(config)`): what
    the datapath reads once, at start, and every table is compiled against."""
    return {
        "underlay_address": address,
        "underlay_address6": address6,
        "masquerade_port_range": list(port_range),
        "masquerade_address6": masq_address6,
    }


_SPEC_INDEX = re.compile(r"^(node\.pod_cidrs|cluster_cidrs|native_cidrs)\[(\d+)\]")
_SPEC_PEER = re.compile(r"^peers\[(\d+)\]\.(.*)$")
_PEER_REF = re.compile(r"\bpeers\[(\d+)\]")


class SpecKeys:
    """The core's key paths (spec terms: `peers[2].pod_cidrs[0]`, `cluster_cidrs[1]`) as the YAML
    keys the user wrote (`peers[3].pod_cidr` when the config skipped a broken peers[2],
    `cluster.pod_cidr`, `routing.native_cidrs[1]`)."""

    def __init__(
        self,
        node: NodeConfig,
        cluster: tuple[IPNetwork, ...],
        peers: tuple[PeerConfig, ...],
        peer_index: list[int],
    ) -> None:
        self.node, self.cluster, self.peers, self.peer_index = node, cluster, peers, peer_index

    def peer(self, j: int) -> str:
        return f"peers[{self.peer_index[j] if j < len(self.peer_index) else j}]"

    def key(self, path: str) -> str:
        m = _SPEC_INDEX.match(path)
        if m is not None:
            i = int(m.group(2))
            if m.group(1) == "node.pod_cidrs":
                return "node.pod_cidr" if len(self.node.pod_cidrs) == 1 else path
            if m.group(1) == "cluster_cidrs":
                return "cluster.pod_cidr" if len(self.cluster) == 1 else f"cluster.pod_cidrs[{i}]"
            return f"routing.{path}"
        m = _SPEC_PEER.match(path)
        if m is not None:
            j, rest = int(m.group(1)), m.group(2)
            if rest.startswith("pod_cidrs[") and j < len(self.peers) and len(self.peers[j].pod_cidrs) == 1:
                rest = "pod_cidr"
            return f"{self.peer(j)}.{rest}"
        if path in ("tunnel.vxlan_port", "tunnel.geneve_port"):
            return "tunnel.port"
        return path

    def message(self, message: str) -> str:
        return _PEER_REF.sub(lambda m: self.peer(int(m.group(1))), message)


# ------------------------------------------------------------------------------ address-space rules


def unusable_node_address(addr: IPAddress) -> str | None:
    """Why `addr` cannot be a node's underlay address (ours, a peer's, or one from etcd), or None.
    A tunnel or native next hop there would loop back into this node or spray a segment."""
    if addr.is_unspecified:
        return "is the unspecified address"
    if addr.is_loopback:
        return "is a loopback address"
    if addr.is_multicast:
        return "is a multicast address"
    if addr.is_link_local:
        return "is a link-local address"
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return "is the broadcast address"
    return None


def underlay_problems(
    cfg: Config,
    address: IPAddress,
    network: IPNetwork,
    gateway: IPAddress | None,
    address6: ipaddress.IPv6Address | None = None,
    network6: ipaddress.IPv6Network | None = None,
) -> list[str]:
    """Cluster pod space against the underlay as resolved at start (node.address/interface may be
    defaults, known only in the node's namespace): it must not overlap the underlay's connected
    subnet nor contain the node's address or its gateway; every static peer must be of a family the
    node has an underlay address in. Checked before anything is installed. (Masquerade on an
    IPv6-only underlay translates IPv6 pods only: docs/masquerade.md.)"""
    out: list[str] = []
    sides: list[tuple[IPAddress, IPNetwork]] = [(address, network)]
    if address6 is not None and network6 is not None:
        sides.append((address6, network6))
    for i, net in enumerate(cfg.cluster_cidrs):
        key = "cluster.pod_cidr" if len(cfg.cluster_cidrs) == 1 else f"cluster.pod_cidrs[{i}]"
        for addr, subnet in sides:
            if net.version != addr.version:
                continue
            if addr in net:
                out.append(f"{key}: '{net}' contains this node's underlay address {addr}")
            elif net.overlaps(subnet):  # type: ignore[arg-type]
                out.append(f"{key}: '{net}' overlaps the underlay subnet {subnet}")
        if gateway is not None and gateway.version == net.version and gateway in net:
            out.append(f"{key}: '{net}' contains the underlay gateway {gateway}")
    # the static peers against the resolved addresses: the core's rulebook (not ours, not of a
    # family this node has no underlay address in); the rest of its rules were asked at load
    peers = [
        {"name": p.name, "address": str(p.address), "pod_cidrs": [str(n) for n in p.pod_cidrs]}
        for p in cfg.peers
    ]
    spec = table_spec(cfg.node, cfg.cluster_cidrs, cfg.routing, cfg.tunnel, cfg.masquerade, peers)
    settings = engine_settings(
        str(address), str(address6) if address6 is not None else None, cfg.masquerade.port_range, None
    )
    keys = SpecKeys(cfg.node, cfg.cluster_cidrs, cfg.peers, list(range(len(cfg.peers))))
    try:
        found = native.check_tables(spec, settings)
    except ValueError as e:
        found = [("tables", str(e))]
    out.extend(f"{keys.key(p)}: {keys.message(m)}" for p, m in found if not p.startswith("cluster_cidrs["))
    if cfg.bgp.enabled and address.version != 4:
        out.append(
            f"bgp.enabled: BGP speaks from an IPv4 node address, and the underlay address is {address}"
        )
    return out


def pod_from_dict(
    value: Any, node_pod_cidrs: tuple[IPNetwork, ...]
) -> tuple[PodConfig | None, list[str], list[str]]:
    """Validate a pod given through the API: (pod, problems, warnings)."""
    v = _Validator()
    pod = v.pod("pod", value)
    if pod is not None:
        for addr in pod.addresses:
            if not any(addr in n for n in node_pod_cidrs):
                v.bad(
                    "pod.ip" if addr == pod.ip else "pod.ips",
                    f"'{addr}' is not inside this node's pod CIDRs {[str(n) for n in node_pod_cidrs]}",
                )
                pod = None
                break
    return (pod if not v.problems else None), v.problems, v.warnings
