//! The table spec: the plain-Rust mirror of the dict the control plane hands to
//! `_native.Tables(spec, settings)` ([`TableSpec`] and its parts: what a table swap may change),
//! the engine's start-time [`EngineSettings`] the tables are compiled against (what only a
//! restart changes), the [`Cidr`] and MAC spellings they use, and [`SpecError`], the key path
//! and message of a value the tables refuse. Compiling a spec into lookup tables is
//! `crate::classify`'s job; this module only describes one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::encap::{GenevePayload, TunnelProto};

/// Index of a peer in [`TableSpec::peers`] (and [`crate::classify::Tables::peers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

/// Index into [`crate::classify::Tables::next_hops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NextHopId(pub u32);

/// Routing mode, node-wide (`routing.mode`) or as a peer override (`peers[].mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RoutingMode {
    #[default]
    Tunnel,
    Native,
    Hybrid,
}

impl RoutingMode {
    /// The config spelling: `tunnel`, `native`, `hybrid`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Tunnel => "tunnel",
            RoutingMode::Native => "native",
            RoutingMode::Hybrid => "hybrid",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tunnel" => Some(RoutingMode::Tunnel),
            "native" => Some(RoutingMode::Native),
            "hybrid" => Some(RoutingMode::Hybrid),
            _ => None,
        }
    }
}

/// An IP prefix, `addr/len`. Parsing normalises host bits away (`10.244.1.7/24` is
/// `10.244.1.0/24`); the control plane validates spelling before it gets here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub(crate) addr: IpAddr,
    pub(crate) len: u8,
}

impl Cidr {
    /// `None` if `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let (addr, max) = match addr {
            IpAddr::V4(a) => {
                let m = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len.min(32)))
                };
                (IpAddr::V4(Ipv4Addr::from(u32::from(a) & m)), 32)
            }
            IpAddr::V6(a) => {
                let m = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len.min(128)))
                };
                (IpAddr::V6((u128::from(a) & m).into()), 128)
            }
        };
        (len <= max).then_some(Cidr { addr, len })
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// True if `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(ip, self.len).is_some_and(|c| c.addr == self.addr)
    }

    /// True if `other` lies entirely inside this prefix.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// First and last address as 128-bit integers (IPv4 in the low 32 bits) for overlap sweeps.
    pub(crate) fn bounds(&self) -> (bool, u128, u128) {
        match self.addr {
            IpAddr::V4(a) => {
                let lo = u128::from(u32::from(a));
                (false, lo, lo + (u128::from(u32::MAX) >> self.len))
            }
            IpAddr::V6(a) => {
                let lo = u128::from(a);
                (
                    true,
                    lo,
                    lo | u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0),
                )
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a CIDR");
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        Cidr::new(addr, len).ok_or_else(bad)
    }
}

/// Parses `02:00:00:00:00:01` (also `-` separated).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC address as `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// A next hop on the underlay: its address and, once the control plane resolved it, its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHop {
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
}

/// `node` in the spec. Its underlay addresses are start-time settings ([`EngineSettings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub pod_cidrs: Vec<Cidr>,
}

/// What the engine reads once, at start, and the tables are compiled against
/// (`Tables::build(spec, settings)`): a table swap cannot change them, since the tables of a
/// running engine are always compiled against its own settings. In the bindings they are keys
/// of the engine config (`Datapath(config)`); a reload that changes them is restart-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EngineSettings {
    /// The node's underlay address (`node.address`, IPv4 or IPv6): the outer source of tunnels
    /// to peers of its family, the tunnel sockets' bind address and (IPv4) the masquerade
    /// address and the reply filter's.
    pub address: IpAddr,
    /// Dual-stack underlay (`node.address6`): the IPv6 underlay address when `address` is IPv4
    /// (the outer source of tunnels to IPv6 peers). Must be `None` when `address` is IPv6.
    pub address6: Option<Ipv6Addr>,
    /// Inclusive node port range of translated flows (`masquerade.port_range`): the NAT tables
    /// and the reply filters are sized from it.
    pub port_range: (u16, u16),
    /// The node's IPv6 masquerade address (`masquerade.address6`). `None`: IPv6 pods are not
    /// translated (their packets leave with their own address).
    pub masquerade_address6: Option<Ipv6Addr>,
}

impl EngineSettings {
    /// Settings for a node at `address`: no IPv6 underlay or masquerade address, the default
    /// port range.
    pub fn new(address: IpAddr) -> Self {
        EngineSettings {
            address,
            address6: None,
            port_range: crate::nat::DEFAULT_PORT_RANGE,
            masquerade_address6: None,
        }
    }

    /// Refuses (with the config key) an empty or reversed port range, or an `address6` next to
    /// an IPv6 `address`: the first of [`EngineSettings::problems`].
    pub fn validate(&self) -> Result<(), SpecError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every problem of these settings alone (their relations with a table spec are
    /// `crate::rules::check`'s).
    pub fn problems(&self) -> Vec<SpecError> {
        let mut out = Vec::new();
        let (lo, hi) = self.port_range;
        if lo == 0 || lo > hi {
            out.push(SpecError::rule(
                "port_range",
                "masquerade.port_range",
                None,
                vec![lo.to_string(), hi.to_string()],
                format!("[{lo}, {hi}] is not a port range"),
            ));
        }
        if let (IpAddr::V6(_), Some(a6)) = (self.address, self.address6) {
            out.push(SpecError::rule(
                "address6_beside_ipv6",
                "node.address6",
                Some("node.address".into()),
                vec![a6.to_string(), self.address.to_string()],
                format!("{a6}: node.address is already IPv6"),
            ));
        }
        out
    }

    /// The IPv4 masquerade address: `address` when it is IPv4, `0.0.0.0` on an IPv6-only
    /// underlay (which has no IPv4 masquerade).
    pub fn address4(&self) -> Ipv4Addr {
        match self.address {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        }
    }

    /// The outer source towards an underlay address of `remote`'s family, if this node has one.
    pub fn source_for(&self, remote: IpAddr) -> Option<IpAddr> {
        match (self.address, remote) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => Some(self.address),
            (IpAddr::V4(_), IpAddr::V6(_)) => self.address6.map(IpAddr::V6),
            (IpAddr::V6(_), IpAddr::V4(_)) => None,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// `tunnel` in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelSpec {
    pub protocol: TunnelProto,
    pub vni: u32,
    pub vxlan_port: u16,
    pub geneve_port: u16,
    /// What Geneve frames this node sends carry (peers may override it); both kinds are always
    /// received.
    pub geneve_payload: GenevePayload,
}

impl Default for TunnelSpec {
    fn default() -> Self {
        TunnelSpec {
            protocol: TunnelProto::Vxlan,
            vni: 1,
            vxlan_port: TunnelProto::Vxlan.default_port(),
            geneve_port: TunnelProto::Geneve.default_port(),
            geneve_payload: GenevePayload::Ethernet,
        }
    }
}

impl TunnelSpec {
    /// The configured UDP port of `proto`.
    pub fn port(&self, proto: TunnelProto) -> u16 {
        match proto {
            TunnelProto::Vxlan => self.vxlan_port,
            TunnelProto::Geneve => self.geneve_port,
        }
    }

    /// The protocol spoken on a configured port, if any.
    pub fn proto_for_port(&self, port: u16) -> Option<TunnelProto> {
        if port == self.vxlan_port {
            Some(TunnelProto::Vxlan)
        } else if port == self.geneve_port {
            Some(TunnelProto::Geneve)
        } else {
            None
        }
    }
}

/// `masquerade` in the spec: what a swap may change (the port range and the IPv6 masquerade
/// address are start-time [`EngineSettings`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MasqueradeSpec {
    pub enabled: bool,
    pub non_masquerade_cidrs: Vec<Cidr>,
    /// The IPv6 next hop of translated IPv6 packets (the underlay's IPv6 default gateway, its MAC
    /// resolved over NDP). `None` with a masquerade address6 set: such packets are dropped
    /// `no_route`.
    pub gateway6: Option<NextHop>,
}

/// One entry of `peers` in the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// The peer's underlay address (tunnel destination, expected outer source on ingress), IPv4 or
    /// IPv6: its family picks the outer header family towards this peer.
    pub address: IpAddr,
    pub pod_cidrs: Vec<Cidr>,
    pub mode: Option<RoutingMode>,
    pub tunnel_protocol: Option<TunnelProto>,
    /// The peer shares our L2 subnet (hybrid `native_when_on_link`).
    pub on_link: bool,
    /// Where native packets to this peer go: the peer itself when on-link, else the gateway.
    /// `None`: the gateway is used if the peer is not on-link.
    pub next_hop: Option<NextHop>,
    /// The inner Ethernet destination of VXLAN frames to this peer: the MAC of the peer's VTEP
    /// (a stock Linux vxlan device, as Flannel runs it, only accepts frames addressed to its own
    /// MAC). `None`: the address podrouter synthesizes for the peer
    /// ([`crate::encap::vxlan_inner_mac`] of its underlay address), what a podrouter peer uses.
    pub vtep_mac: Option<[u8; 6]>,
    /// Override of `tunnel.geneve_payload` for Geneve frames sent to this peer.
    pub geneve_payload: Option<GenevePayload>,
}

/// The plain-Rust mirror of the dict the control plane hands to `_native.Tables(spec, settings)`
/// (docs/architecture.md, "Table spec"): what a table swap may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub generation: u64,
    pub node: NodeSpec,
    pub cluster_cidrs: Vec<Cidr>,
    pub mode: RoutingMode,
    pub native_cidrs: Vec<Cidr>,
    pub native_when_on_link: bool,
    pub tunnel: TunnelSpec,
    /// The underlay default gateway: native next hop for off-link peers and for destinations
    /// outside the cluster.
    pub gateway: Option<NextHop>,
    pub masquerade: MasqueradeSpec,
    pub peers: Vec<PeerSpec>,
}

/// A spec the core refuses, with the key path of the offending value. The rulebook's problems
/// ([`crate::rules::check`]) also carry their structure, so that a caller can word them in its
/// own terms (an etcd registration rather than a spec key): which rule (`code`), the other party
/// of a relation (`other`) and the values involved (`values`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// Key path in the spec, e.g. `peers[1].pod_cidrs[0]`.
    pub path: String,
    pub message: String,
    /// The rule broken, a stable snake_case name (`address_taken`, `pod_cidr_overlap`, ...;
    /// `invalid` for a value the spec cannot hold at all). The list: docs/architecture.md,
    /// "One rulebook".
    pub code: &'static str,
    /// The key path of the other party of a relation, if any: the earlier owner of an address
    /// or a pod CIDR, the peer whose address a cluster CIDR contains, the node's address key.
    pub other: Option<String>,
    /// The values involved, the offending one first (e.g. a pod CIDR, then the one it overlaps).
    pub values: Vec<String>,
}

impl SpecError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            path: path.into(),
            message: message.into(),
            code: "invalid",
            other: None,
            values: Vec::new(),
        }
    }

    /// A problem of rule `code` with its other party and values ([`SpecError::other`],
    /// [`SpecError::values`]).
    pub(crate) fn rule(
        code: &'static str,
        path: impl Into<String>,
        other: Option<String>,
        values: Vec<String>,
        message: impl Into<String>,
    ) -> Self {
        SpecError {
            code,
            other,
            values,
            ..SpecError::new(path, message)
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for SpecError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_and_mac_parsing() {
        assert_eq!(c("10.244.1.7/24").to_string(), "10.244.1.0/24");
        assert_eq!(c("fd00::1/64").to_string(), "fd00::/64");
        assert!("10.244.0.0/33".parse::<Cidr>().is_err());
        assert!("10.244.0.0".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert_eq!(
            "10.0.0.0/x".parse::<Cidr>().unwrap_err(),
            "'10.0.0.0/x' is not a CIDR"
        );
        assert!(c("10.244.0.0/16").covers(&c("10.244.3.0/24")));
        assert!(!c("10.244.3.0/24").covers(&c("10.244.0.0/16")));
        assert!(c("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(!c("0.0.0.0/0").contains(ip("::1")));
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02-00-00-00-00-0A"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:xyz"), None);
        assert_eq!(format_mac(&[2, 0, 0, 0, 0, 10]), "02:00:00:00:00:0a");
    }
}
