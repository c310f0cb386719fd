//! Python access to podrouter-core's wire formats and tunnel framing, for tests, tooling and the
//! `explain` path: `encapsulate`, `decapsulate`, `parse`.
//!
//! These are short, bounded calls on caller-supplied bytes; they hold the GIL. Bad input never
//! panics: malformed packets come back as a `reason` (the same snake_case strings as the
//! `podrouter_drops_total{reason}` label) or a `ValueError` whose message is that reason.

use core::net::IpAddr;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use podrouter_core::encap::{self, EcnAction, EncapParams, GenevePayload, TunnelProto};
use podrouter_core::wire::{self, ethernet, L4Info};

/// Register `encapsulate`, `decapsulate` and `parse` on the native module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encapsulate, m)?)?;
    m.add_function(wrap_pyfunction!(decapsulate, m)?)?;
    m.add_function(wrap_pyfunction!(parse, m)?)?;
    m.add("ENCAP_MAX_HEADROOM", encap::MAX_HEADROOM)?;
    m.add("VXLAN_OVERHEAD", encap::VXLAN_OVERHEAD)?;
    m.add("GENEVE_OVERHEAD", encap::GENEVE_OVERHEAD)?;
    m.add("GENEVE_IP_OVERHEAD", encap::GENEVE_IP_OVERHEAD)?;
    m.add("OUTER_V6_EXTRA", encap::OUTER_V6_EXTRA)?;
    Ok(())
}

const PARAM_KEYS: [&str; 8] = [
    "protocol",
    "vni",
    "src",
    "dst",
    "dst_port",
    "inner_src_mac",
    "inner_dst_mac",
    "geneve_payload",
];
/// Inner Ethernet addresses used when the caller gives none (locally administered, RFC 7042 §2.1).
const DEFAULT_INNER_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DEFAULT_INNER_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn proto_from_str(s: &str) -> PyResult<TunnelProto> {
    TunnelProto::parse(s)
        .ok_or_else(|| PyValueError::new_err(format!("protocol: {s:?} is not 'vxlan' or 'geneve'")))
}

fn required<'py>(params: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    params
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("params: missing key {key:?}")))
}

fn ip_param(params: &Bound<'_, PyDict>, key: &str) -> PyResult<IpAddr> {
    let s: String = required(params, key)?
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{key}: must be a str")))?;
    s.parse()
        .map_err(|_| PyValueError::new_err(format!("{key}: {s:?} is not an IP address")))
}

fn mac_param(params: &Bound<'_, PyDict>, key: &str, default: [u8; 6]) -> PyResult<[u8; 6]> {
    match params.get_item(key)? {
        None => Ok(default),
        Some(v) => {
            let s: String = v
                .extract()
                .map_err(|_| PyTypeError::new_err(format!("{key}: must be a str")))?;
            ethernet::parse_mac(&s)
                .ok_or_else(|| PyValueError::new_err(format!("{key}: {s:?} is not a MAC address")))
        }
    }
}

fn encap_params(params: &Bound<'_, PyDict>) -> PyResult<EncapParams> {
    for key in params.keys() {
        let k: String = key
            .extract()
            .map_err(|_| PyTypeError::new_err("params: keys must be str"))?;
        if !PARAM_KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!("params: unknown key {k:?}")));
        }
    }
    let proto_s: String = required(params, "protocol")?
        .extract()
        .map_err(|_| PyTypeError::new_err("protocol: must be a str"))?;
    let proto = proto_from_str(&proto_s)?;
    let vni: i64 = required(params, "vni")?
        .extract()
        .map_err(|_| PyTypeError::new_err("vni: must be an int"))?;
    let vni = u32::try_from(vni)
        .ok()
        .filter(|v| *v <= wire::vxlan::MAX_VNI)
        .ok_or_else(|| PyValueError::new_err(format!("vni: {vni} is not in 0..=16777215")))?;
    let dst_port = match params.get_item("dst_port")? {
        None => proto.default_port(),
        Some(v) => v
            .extract::<u16>()
            .map_err(|_| PyValueError::new_err("dst_port: must be an int in 0..=65535"))?,
    };
    Ok(EncapParams {
        proto,
        vni,
        src: ip_param(params, "src")?,
        dst: ip_param(params, "dst")?,
        dst_port,
        inner_src_mac: mac_param(params, "inner_src_mac", DEFAULT_INNER_SRC_MAC)?,
        inner_dst_mac: mac_param(params, "inner_dst_mac", DEFAULT_INNER_DST_MAC)?,
        geneve_payload: match params.get_item("geneve_payload")? {
            None => GenevePayload::default(),
            Some(v) => {
                let s: String = v
                    .extract()
                    .map_err(|_| PyTypeError::new_err("geneve_payload: must be a str"))?;
                GenevePayload::parse(&s).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "geneve_payload: {s:?} is not 'ethernet' or 'ip'"
                    ))
                })?
            }
        },
    })
}

/// Encapsulate an inner IPv4/IPv6 packet and return the complete outer IPv4 or IPv6 packet.
///
/// `params`: `protocol` ('vxlan' | 'geneve'), `vni`, `src`, `dst` (outer addresses, both IPv4 or
/// both IPv6), optional
/// `dst_port` (default 4789 / 6081), `inner_src_mac` / `inner_dst_mac` (the inner Ethernet header
/// of VXLAN and Geneve-with-Ethernet), `geneve_payload` ('ethernet' default | 'ip').
/// Raises `ValueError` for bad parameters or an inner packet that is not IP.
#[pyfunction]
fn encapsulate<'py>(
    py: Python<'py>,
    inner: &[u8],
    params: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyBytes>> {
    let p = encap_params(params)?;
    let start = p.overhead();
    let mut buf = vec![0u8; start + inner.len()];
    buf[start..].copy_from_slice(inner);
    let r = encap::encap_full(&mut buf, start, inner.len(), &p)
        .map_err(|e| PyValueError::new_err(format!("cannot encapsulate: {e}")))?;
    Ok(PyBytes::new(py, &buf[r]))
}

fn ecn_action_str(a: EcnAction) -> &'static str {
    match a {
        EcnAction::Keep => "keep",
        EcnAction::SetCe => "set_ce",
        EcnAction::SetEct1 => "set_ect1",
    }
}

/// Validate and decapsulate an outer IPv4 + UDP tunnel packet.
///
/// The protocol comes from the UDP destination port (4789 VXLAN, 6081 Geneve) unless `protocol`
/// is given. Returns `{"ok": True, "protocol", "vni", "inner", "inner_ethertype", "ecn_action",
/// "outer_src", "outer_dst", "src_port", "dst_port"}` — `inner` with the RFC 6040 ECN action
/// already applied, i.e. exactly what podrouter would write to the TUN — or
/// `{"ok": False, "reason": "<drop reason>"}`.
#[pyfunction]
#[pyo3(signature = (outer, protocol=None))]
fn decapsulate<'py>(
    py: Python<'py>,
    outer: &[u8],
    protocol: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let forced = protocol.map(proto_from_str).transpose()?;
    let d = PyDict::new(py);
    let res = match forced {
        Some(p) => encap::decap_full_with(outer, |_| Some(p)),
        None => encap::decap_full(outer),
    };
    match res {
        Ok(o) => {
            let mut inner = outer[o.decap.inner.clone()].to_vec();
            if encap::apply_ecn(&mut inner, o.decap.ecn_action).is_err() {
                // decap validated the inner header, so this cannot fail; report it rather than panic.
                d.set_item("ok", false)?;
                d.set_item("reason", "malformed")?;
                return Ok(d);
            }
            d.set_item("ok", true)?;
            d.set_item("protocol", o.decap.proto.as_str())?;
            d.set_item("vni", o.decap.vni)?;
            d.set_item("inner", PyBytes::new(py, &inner))?;
            d.set_item("inner_ethertype", o.decap.inner_ethertype)?;
            d.set_item("ecn_action", ecn_action_str(o.decap.ecn_action))?;
            d.set_item("outer_src", o.src.to_string())?;
            d.set_item("outer_dst", o.dst.to_string())?;
            d.set_item("src_port", o.src_port)?;
            d.set_item("dst_port", o.dst_port)?;
        }
        Err(e) => {
            d.set_item("ok", false)?;
            d.set_item("reason", e.as_str())?;
        }
    }
    Ok(d)
}

/// Parse an IPv4 or IPv6 packet (no link-layer header) the way the datapath does.
///
/// Returns `version, src, dst, protocol, l4_offset, total_len, dscp, ecn, ttl, is_fragment,
/// frag_offset, sport, dport, tcp_flags, icmp_type, icmp_code, icmp_id, icmp_seq` (absent
/// values are None). Raises `ValueError(reason)` for a packet the datapath would drop.
#[pyfunction]
fn parse<'py>(py: Python<'py>, packet: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let m = wire::parse_ip(packet).map_err(|e| PyValueError::new_err(e.as_str()))?;
    let d = PyDict::new(py);
    d.set_item("version", if m.src.is_ipv4() { 4 } else { 6 })?;
    d.set_item("src", ip_str(m.src))?;
    d.set_item("dst", ip_str(m.dst))?;
    d.set_item("protocol", m.protocol)?;
    d.set_item("l4_offset", m.l4_offset)?;
    d.set_item("total_len", m.total_len)?;
    d.set_item("dscp", m.dscp)?;
    d.set_item("ecn", m.ecn)?;
    d.set_item("ttl", m.ttl)?;
    d.set_item("is_fragment", m.is_fragment)?;
    d.set_item("frag_offset", m.frag_offset)?;
    let (mut sport, mut dport, mut flags) = (None, None, None);
    let (mut ity, mut icode, mut iid, mut iseq) = (None, None, None, None);
    match m.l4 {
        L4Info::Ports {
            src,
            dst,
            tcp_flags,
        } => {
            sport = Some(src);
            dport = Some(dst);
            if m.protocol == wire::ip_proto::TCP {
                flags = Some(tcp_flags);
            }
        }
        L4Info::IcmpEcho {
            ident,
            seq,
            request,
        } => {
            let v6 = m.src.is_ipv6();
            ity = Some(match (v6, request) {
                (false, true) => wire::icmp::msg_type::ECHO_REQUEST,
                (false, false) => wire::icmp::msg_type::ECHO_REPLY,
                (true, true) => wire::icmpv6::msg_type::ECHO_REQUEST,
                (true, false) => wire::icmpv6::msg_type::ECHO_REPLY,
            });
            icode = packet.get(m.l4_offset + 1).copied();
            iid = Some(ident);
            iseq = Some(seq);
        }
        L4Info::IcmpError { msg_type, code } | L4Info::IcmpOther { msg_type, code } => {
            ity = Some(msg_type);
            icode = Some(code);
        }
        L4Info::None => {}
    }
    d.set_item("sport", sport)?;
    d.set_item("dport", dport)?;
    d.set_item("tcp_flags", flags)?;
    d.set_item("icmp_type", ity)?;
    d.set_item("icmp_code", icode)?;
    d.set_item("icmp_id", iid)?;
    d.set_item("icmp_seq", iseq)?;
    Ok(d)
}

fn ip_str(a: IpAddr) -> String {
    a.to_string()
}
