//! The dicts the control plane hands the bindings, as typed specs deserialized with serde.
//!
//! `Tables(spec, settings)`, `Datapath(config)` and `Datapath.adopt(config, fds)` take Python
//! dicts (`settings` is an engine config, like `config`). Each shape is a struct here (`deny_unknown_fields`: a typo never falls back to a default),
//! deserialized straight from the Python objects (pythonize) with the key path tracked
//! (serde_path_to_error), then turned into the core's and the engine's types. Every error names
//! the key path and the value: `peers[0].address: 'nope' is not an IP address`,
//! `tunnel.vni: 'one' is not an integer`, `peers[0].colour: unknown key`, `node: missing`.
//!
//! A key whose value is `None` counts as absent (its default applies), as the Python layer
//! writes optional keys that way.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use podrouter_core::nat::NatConfig;
use podrouter_core::{
    parse_mac, Cidr, GenevePayload, MasqueradeSpec, NextHop, NodeSpec, PeerSpec, RoutingMode,
    TableSpec, TunnelProto, TunnelSpec,
};
use podrouter_io::EngineConfig;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

pub(crate) fn bad(path: &str, msg: impl fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{path}: {msg}"))
}

fn join(prefix: &str, key: &str) -> String {
    match (prefix.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (_, true) => prefix.to_string(),
        _ if key.starts_with('[') => format!("{prefix}{key}"),
        _ => format!("{prefix}.{key}"),
    }
}

/// The key serde names in `msg` after `lead` (its messages for `deny_unknown_fields` and for a
/// missing field: "unknown field `x`, expected ...", "missing field `x`").
fn named<'a>(msg: &'a str, lead: &str) -> Option<&'a str> {
    msg.strip_prefix(lead)?.split('`').next()
}

/// Deserializes `obj` as `T`. An error names where it is: `prefix` and the key path inside
/// `obj` (the whole object is `prefix`, or `spec` without one).
pub(crate) fn from_py<T: DeserializeOwned>(obj: &Bound<'_, PyAny>, prefix: &str) -> PyResult<T> {
    let mut de = pythonize::Depythonizer::from_object(obj);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.path().to_string();
        let path = join(prefix, if inner == "." { "" } else { &inner });
        let msg = e.inner().to_string();
        if let Some(k) = named(&msg, "unknown field `") {
            // the path may already end at the unknown key
            let at = if inner.ends_with(k) {
                path
            } else {
                join(&path, k)
            };
            return bad(&at, "unknown key");
        }
        if let Some(k) = named(&msg, "missing field `") {
            return bad(&join(&path, k), "missing");
        }
        let at = if path.is_empty() { "spec" } else { &path };
        if msg.contains("'NoneType'") && !path.is_empty() {
            return bad(at, "missing"); // a required dict given as None
        }
        if msg.contains("'Mapping'") || msg.contains("expected struct") {
            return bad(at, "must be a dict");
        }
        bad(at, msg)
    })
}

fn quoted(s: &str) -> String {
    format!("'{s}'")
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// The visit methods of a leaf visitor for what it refuses: "`value` is not `what`", the value
/// shown as Python shows it (`'x'`, `True`, `7`, `1.5`, `None`).
macro_rules! refuse {
    ($what:expr; $($kind:ident),*) => { $(refuse!(@ $what, $kind);)* };
    (@ $what:expr, bool) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Err(E::custom(format!("{} is not {}", py_bool(v), $what)))
        }
    };
    (@ $what:expr, int) => {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(E::custom(format!("{v} is not {}", $what)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Err(E::custom(format!("{v} is not {}", $what)))
        }
    };
    (@ $what:expr, float) => {
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!("{v:?} is not {}", $what)))
        }
    };
    (@ $what:expr, str) => {
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Err(E::custom(format!("{} is not {}", quoted(v), $what)))
        }
    };
    (@ $what:expr, unit) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(E::custom(format!("None is not {}", $what)))
        }
    };
}

/// An integer of type `T`; a bool is not one (`True is not an integer`), a number outside `T`
/// is `out of range`.
pub(crate) struct Int<T>(pub T);

impl<'de, T: TryFrom<i128>> Deserialize<'de> for Int<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: TryFrom<i128>> V<T> {
            fn fit<E: de::Error>(i: i128) -> Result<Int<T>, E> {
                T::try_from(i)
                    .map(Int)
                    .map_err(|_| E::custom(format!("{i} is out of range")))
            }
        }
        impl<'de, T: TryFrom<i128>> Visitor<'de> for V<T> {
            type Value = Int<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int<T>, E> {
                Self::fit(i128::from(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int<T>, E> {
                Self::fit(i128::from(v))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Int<T>, E> {
                Self::fit(v)
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Int<T>, E> {
                i128::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
                    .and_then(Self::fit)
            }
            refuse!("an integer"; bool, float, str, unit);
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A string.
pub(crate) struct Str(pub String);

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Str;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
                Ok(Str(v.to_string()))
            }
            refuse!("a string"; bool, int, float, unit);
        }
        d.deserialize_any(V)
    }
}

/// A boolean (`True` / `False` only: `1` is not one).
pub(crate) struct Bool(pub bool);

impl<'de> Deserialize<'de> for Bool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Bool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bool, E> {
                Ok(Bool(v))
            }
            refuse!("a boolean"; int, float, str, unit);
        }
        d.deserialize_any(V)
    }
}

/// A list (or tuple) of `T`; a string is not a list of characters here.
pub(crate) struct List<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(List(out))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<List<T>, A::Error> {
                Err(de::Error::custom("must be a list"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<List<T>, E> {
                Err(E::custom("must be a list"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<List<T>, E> {
                Err(E::custom("must be a list"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<List<T>, E> {
                Err(E::custom("must be a list"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<List<T>, E> {
                Err(E::custom("must be a list"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<List<T>, E> {
                Err(E::custom("must be a list"))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<T> List<T> {
    fn into_vec<U>(self, f: impl Fn(T) -> U) -> Vec<U> {
        self.0.into_iter().map(f).collect()
    }
}

/// A value spelled as a string in the spec, and what a wrong spelling is "not".
pub(crate) trait Spelled: Sized {
    const WHAT: &'static str;
    fn spelled(s: &str) -> Option<Self>;
}

impl Spelled for IpAddr {
    const WHAT: &'static str = "an IP address";
    fn spelled(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl Spelled for Ipv6Addr {
    const WHAT: &'static str = "an IPv6 address";
    fn spelled(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl Spelled for Cidr {
    const WHAT: &'static str = "a CIDR";
    fn spelled(s: &str) -> Option<Self> {
        Cidr::from_str(s).ok()
    }
}

impl Spelled for [u8; 6] {
    const WHAT: &'static str = "a MAC address";
    fn spelled(s: &str) -> Option<Self> {
        parse_mac(s)
    }
}

impl Spelled for RoutingMode {
    const WHAT: &'static str = "one of tunnel, native, hybrid";
    fn spelled(s: &str) -> Option<Self> {
        RoutingMode::parse(s)
    }
}

impl Spelled for TunnelProto {
    const WHAT: &'static str = "one of vxlan, geneve";
    fn spelled(s: &str) -> Option<Self> {
        TunnelProto::parse(s)
    }
}

impl Spelled for GenevePayload {
    const WHAT: &'static str = "one of ethernet, ip";
    fn spelled(s: &str) -> Option<Self> {
        GenevePayload::parse(s)
    }
}

/// A string parsed as `T` (`'nope' is not an IP address`).
pub(crate) struct Parsed<T>(pub T);

impl<'de, T: Spelled> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Str(s) = Str::deserialize(d)?;
        T::spelled(&s)
            .map(Parsed)
            .ok_or_else(|| de::Error::custom(format!("{} is not {}", quoted(&s), T::WHAT)))
    }
}

fn cidrs(v: Option<List<Parsed<Cidr>>>) -> Vec<Cidr> {
    v.map(|l| l.into_vec(|c| c.0)).unwrap_or_default()
}

// ------------------------------------------------------------------------ the table spec

/// The table spec (docs/architecture.md, "Table spec"): what a swap may change, compiled by
/// `Tables::build` against the engine's start-time settings (the engine config's
/// `underlay_address`, `underlay_address6`, `masquerade_port_range`, `masquerade_address6`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableSpecIn {
    generation: Option<Int<u64>>,
    node: NodeIn,
    cluster_cidrs: Option<List<Parsed<Cidr>>>,
    mode: Option<Parsed<RoutingMode>>,
    native_cidrs: Option<List<Parsed<Cidr>>>,
    native_when_on_link: Option<Bool>,
    tunnel: Option<TunnelIn>,
    gateway: Option<NextHopIn>,
    masquerade: Option<MasqueradeIn>,
    peers: Option<List<PeerIn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeIn {
    name: Str,
    pod_cidrs: Option<List<Parsed<Cidr>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelIn {
    protocol: Option<Parsed<TunnelProto>>,
    vni: Option<Int<u32>>,
    vxlan_port: Option<Int<u16>>,
    geneve_port: Option<Int<u16>>,
    geneve_payload: Option<Parsed<GenevePayload>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NextHopIn {
    ip: Parsed<IpAddr>,
    mac: Option<Parsed<[u8; 6]>>,
}

impl NextHopIn {
    fn into_core(self) -> NextHop {
        NextHop {
            ip: self.ip.0,
            mac: self.mac.map(|m| m.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MasqueradeIn {
    enabled: Option<Bool>,
    non_masquerade_cidrs: Option<List<Parsed<Cidr>>>,
    gateway6: Option<NextHopIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerIn {
    name: Str,
    address: Parsed<IpAddr>,
    pod_cidrs: Option<List<Parsed<Cidr>>>,
    mode: Option<Parsed<RoutingMode>>,
    tunnel_protocol: Option<Parsed<TunnelProto>>,
    on_link: Option<Bool>,
    next_hop: Option<NextHopIn>,
    vtep_mac: Option<Parsed<[u8; 6]>>,
    geneve_payload: Option<Parsed<GenevePayload>>,
}

impl TableSpecIn {
    /// The core's `TableSpec`; absent keys take the core's defaults.
    pub(crate) fn into_core(self) -> PyResult<TableSpec> {
        let mut tunnel = TunnelSpec::default();
        if let Some(t) = self.tunnel {
            tunnel.protocol = t.protocol.map_or(tunnel.protocol, |p| p.0);
            tunnel.vni = t.vni.map_or(tunnel.vni, |v| v.0);
            tunnel.vxlan_port = t.vxlan_port.map_or(tunnel.vxlan_port, |v| v.0);
            tunnel.geneve_port = t.geneve_port.map_or(tunnel.geneve_port, |v| v.0);
            tunnel.geneve_payload = t.geneve_payload.map(|p| p.0).unwrap_or_default();
        }
        let mut masquerade = MasqueradeSpec::default();
        if let Some(m) = self.masquerade {
            masquerade.enabled = m.enabled.map_or(masquerade.enabled, |b| b.0);
            masquerade.non_masquerade_cidrs = cidrs(m.non_masquerade_cidrs);
            masquerade.gateway6 = m.gateway6.map(NextHopIn::into_core);
        }
        let peers = self
            .peers
            .map(|l| {
                l.into_vec(|p| PeerSpec {
                    name: p.name.0,
                    address: p.address.0,
                    pod_cidrs: cidrs(p.pod_cidrs),
                    mode: p.mode.map(|m| m.0),
                    tunnel_protocol: p.tunnel_protocol.map(|t| t.0),
                    on_link: p.on_link.is_some_and(|b| b.0),
                    next_hop: p.next_hop.map(NextHopIn::into_core),
                    vtep_mac: p.vtep_mac.map(|m| m.0),
                    geneve_payload: p.geneve_payload.map(|g| g.0),
                })
            })
            .unwrap_or_default();
        Ok(TableSpec {
            generation: self.generation.map_or(0, |g| g.0),
            node: NodeSpec {
                name: self.node.name.0,
                pod_cidrs: cidrs(self.node.pod_cidrs),
            },
            cluster_cidrs: cidrs(self.cluster_cidrs),
            mode: self.mode.map_or(RoutingMode::Tunnel, |m| m.0),
            native_cidrs: cidrs(self.native_cidrs),
            native_when_on_link: self.native_when_on_link.is_some_and(|b| b.0),
            tunnel,
            gateway: self.gateway.map(NextHopIn::into_core),
            masquerade,
            peers,
        })
    }
}

// ------------------------------------------------------------------- the engine's config

/// `Datapath(config)`: the engine's start-time settings (docs/architecture.md, "Datapath"). The
/// second argument of `Tables(spec, settings)` is one too: the tables are compiled against its
/// `underlay_address`, `underlay_address6`, `masquerade_port_range` and `masquerade_address6`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EngineIn {
    tun_name: Option<Str>,
    tun_mtu: Option<Int<u32>>,
    tun_persist: Option<Bool>,
    underlay_ifindex: Option<Int<u32>>,
    underlay_mac: Option<Parsed<[u8; 6]>>,
    underlay_address: Parsed<IpAddr>,
    underlay_address6: Option<Parsed<Ipv6Addr>>,
    vxlan_port: Option<Int<u16>>,
    geneve_port: Option<Int<u16>>,
    workers: Option<Int<usize>>,
    offload: Option<Bool>,
    tunnel_gso: Option<Bool>,
    tx_sockets: Option<Int<usize>>,
    batch: Option<Int<usize>>,
    nat: Option<NatIn>,
    masquerade_port_range: Option<List<Int<u16>>>,
    masquerade_address6: Option<Parsed<Ipv6Addr>>,
}

/// `config["nat"]`: masquerade table limits and timeouts in seconds (`masquerade.timeouts` of the
/// daemon config); absent keys keep the core's defaults (Linux conntrack's, see core `nat`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NatIn {
    max_entries: Option<Int<usize>>,
    max_entries_per_pod: Option<Int<usize>>,
    tcp_syn_sent: Option<Int<u32>>,
    tcp_established: Option<Int<u32>>,
    tcp_fin_wait: Option<Int<u32>>,
    tcp_time_wait: Option<Int<u32>>,
    tcp_close: Option<Int<u32>>,
    udp_unreplied: Option<Int<u32>>,
    udp_assured: Option<Int<u32>>,
    icmp: Option<Int<u32>>,
}

fn or<T>(v: Option<Int<T>>, default: T) -> T {
    v.map_or(default, |i| i.0)
}

impl NatIn {
    fn into_config(self, d: NatConfig) -> NatConfig {
        let max_entries = or(self.max_entries, d.max_entries);
        NatConfig {
            max_entries,
            max_entries_per_pod: or(
                self.max_entries_per_pod,
                NatConfig::default_per_pod(max_entries),
            ),
            tcp_syn_sent: or(self.tcp_syn_sent, d.tcp_syn_sent),
            tcp_established: or(self.tcp_established, d.tcp_established),
            tcp_fin_wait: or(self.tcp_fin_wait, d.tcp_fin_wait),
            tcp_time_wait: or(self.tcp_time_wait, d.tcp_time_wait),
            tcp_close: or(self.tcp_close, d.tcp_close),
            udp_unreplied: or(self.udp_unreplied, d.udp_unreplied),
            udp_assured: or(self.udp_assured, d.udp_assured),
            icmp: or(self.icmp, d.icmp),
            ..d
        }
    }
}

impl EngineIn {
    /// The engine's config, validated (`EngineConfig::validate` names the key).
    pub(crate) fn into_config(self) -> PyResult<EngineConfig> {
        let d = EngineConfig::default();
        let mut nat = match self.nat {
            None => d.nat,
            Some(n) => n.into_config(d.nat),
        };
        if let Some(List(pr)) = self.masquerade_port_range {
            let [lo, hi] = <[Int<u16>; 2]>::try_from(pr)
                .map_err(|_| bad("masquerade_port_range", "must be [first, last]"))?;
            (nat.port_lo, nat.port_hi) = (lo.0, hi.0);
        }
        let cfg = EngineConfig {
            tun_name: self.tun_name.map_or(d.tun_name, |s| s.0),
            tun_mtu: self.tun_mtu.map(|m| m.0),
            tun_persist: self.tun_persist.map_or(d.tun_persist, |b| b.0),
            underlay_ifindex: or(self.underlay_ifindex, 0),
            underlay_mac: self.underlay_mac.map_or([0; 6], |m| m.0),
            underlay_address: self.underlay_address.0,
            underlay_address6: self.underlay_address6.map(|a| a.0),
            vxlan_port: or(self.vxlan_port, d.vxlan_port),
            geneve_port: or(self.geneve_port, d.geneve_port),
            workers: or(self.workers, d.workers),
            offload: self.offload.map_or(d.offload, |b| b.0),
            tunnel_gso: self.tunnel_gso.map_or(d.tunnel_gso, |b| b.0),
            tx_sockets: or(self.tx_sockets, d.tx_sockets),
            batch: or(self.batch, d.batch),
            nat,
            masquerade_address6: self.masquerade_address6.map(|a| a.0),
        };
        cfg.validate().map_err(PyValueError::new_err)?;
        Ok(cfg)
    }
}

/// `Datapath.adopt(config, fds)`'s fds: `{"tun": [fd per worker], "rx": [[fd, ...] per worker],
/// "masq": fd or None, "masq6": fd or None}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FdsIn {
    pub tun: Option<List<Int<i32>>>,
    pub rx: Option<List<List<Int<i32>>>>,
    pub masq: Option<Int<i32>>,
    pub masq6: Option<Int<i32>>,
}
