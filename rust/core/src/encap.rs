//! VXLAN (RFC 7348) and Geneve (RFC 8926) encapsulation in place, and validated decapsulation.
//!
//! # Encapsulation in headroom
//!
//! The inner IP packet sits at `buf[start..start + len]`; the outer headers are written into the
//! bytes in front of it, so a packet read from the TUN at offset [`MAX_HEADROOM`] never moves.
//!
//! * [`encap_payload`] writes only what goes inside the outer UDP datagram — the tunnel header and,
//!   for VXLAN, the inner Ethernet header — for sending through a kernel UDP socket.
//! * [`encap_full`] also writes the outer IPv4 and UDP headers, for AF_PACKET / raw output and for
//!   tests. Outer UDP source port from a hash of the inner flow (RFC 7348 §5, RFC 8926 §3.3: the
//!   entropy that lets ECMP and RSS spread tunnels), outer checksum always present and correct
//!   (Linux UDP GRO does not aggregate zero-checksum tunnel datagrams), DF set, TTL 64, DSCP copied
//!   from the inner header, ECN per RFC 6040 §4.1 normal mode.
//!
//! Geneve is sent without options. By default ([`GenevePayload::Ethernet`]) it carries an inner
//! Ethernet frame (Protocol Type 0x6558, Transparent Ethernet Bridging) built exactly like
//! VXLAN's, which is what Open vSwitch, OVN, Cilium, Antrea and Linux geneve devices expect; with
//! [`GenevePayload::Ip`] the inner IP packet follows the base header directly (Protocol Type
//! 0x0800 / 0x86DD, RFC 8926 §3.4), 14 bytes shorter, understood by podrouter peers only.
//! Decapsulation accepts both.
//!
//! # Decapsulation
//!
//! [`decap_payload`] validates a tunnel header found in a UDP payload and says where the inner IP
//! packet is; [`decap_full`] first validates an outer IPv4 + UDP packet. Every rejection is a
//! [`DecapError`] whose [`DecapError::as_str`] is the stable drop reason used in metrics.
//!
//! Nothing here panics on any input: lengths are checked before any header is read or written.

use core::fmt;
use core::net::{IpAddr, Ipv6Addr};
use core::ops::Range;

use crate::wire::ethernet::{self, ethertype};
use crate::wire::ipv6::FragmentInfo;
use crate::wire::{self, checksum, ecn, geneve, ip_proto, ipv4, ipv6, udp, vxlan};

/// Which tunnel encapsulation a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TunnelProto {
    Vxlan,
    Geneve,
}

impl TunnelProto {
    /// `"vxlan"` / `"geneve"`: the config value and the metrics `path` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            TunnelProto::Vxlan => "vxlan",
            TunnelProto::Geneve => "geneve",
        }
    }

    /// Parse the config spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vxlan" => Some(TunnelProto::Vxlan),
            "geneve" => Some(TunnelProto::Geneve),
            _ => None,
        }
    }

    /// IANA UDP port: 4789 (RFC 7348 §5) or 6081 (RFC 8926 §3.3).
    pub const fn default_port(self) -> u16 {
        match self {
            TunnelProto::Vxlan => vxlan::UDP_PORT,
            TunnelProto::Geneve => geneve::UDP_PORT,
        }
    }

    /// Bytes [`encap_full`] puts in front of the inner packet with the default framing (the
    /// largest: [`EncapParams::overhead`] is never more).
    pub const fn overhead(self) -> usize {
        match self {
            TunnelProto::Vxlan => VXLAN_OVERHEAD,
            TunnelProto::Geneve => GENEVE_OVERHEAD,
        }
    }

    /// Bytes [`encap_payload`] puts in front of the inner packet (the UDP payload prefix) with the
    /// default framing (the largest: [`EncapParams::payload_overhead`] is never more).
    pub const fn payload_overhead(self) -> usize {
        match self {
            TunnelProto::Vxlan => VXLAN_PAYLOAD_OVERHEAD,
            TunnelProto::Geneve => GENEVE_PAYLOAD_OVERHEAD,
        }
    }
}

impl fmt::Display for TunnelProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a Geneve header is followed by (`tunnel.geneve_payload` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GenevePayload {
    /// Protocol Type 0x6558 and an inner Ethernet header (the interoperable default).
    #[default]
    Ethernet,
    /// Protocol Type 0x0800 / 0x86DD and the inner IP packet directly.
    Ip,
}

impl GenevePayload {
    /// `"ethernet"` / `"ip"`: the config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            GenevePayload::Ethernet => "ethernet",
            GenevePayload::Ip => "ip",
        }
    }

    /// Parse the config spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ethernet" => Some(GenevePayload::Ethernet),
            "ip" => Some(GenevePayload::Ip),
            _ => None,
        }
    }
}

/// Outer IPv4 + UDP.
pub const OUTER_HEADERS_LEN: usize = ipv4::HEADER_LEN + udp::HEADER_LEN;
/// VXLAN header + inner Ethernet header.
pub const VXLAN_PAYLOAD_OVERHEAD: usize = vxlan::HEADER_LEN + ethernet::HEADER_LEN;
/// Geneve base header, no options, inner Ethernet header ([`GenevePayload::Ethernet`]).
pub const GENEVE_PAYLOAD_OVERHEAD: usize = geneve::HEADER_LEN + ethernet::HEADER_LEN;
/// Geneve base header, no options, inner IP directly ([`GenevePayload::Ip`]).
pub const GENEVE_IP_PAYLOAD_OVERHEAD: usize = geneve::HEADER_LEN;
/// 20 + 8 + 8 + 14 = 50.
pub const VXLAN_OVERHEAD: usize = OUTER_HEADERS_LEN + VXLAN_PAYLOAD_OVERHEAD;
/// 20 + 8 + 8 + 14 = 50, like VXLAN.
pub const GENEVE_OVERHEAD: usize = OUTER_HEADERS_LEN + GENEVE_PAYLOAD_OVERHEAD;
/// 20 + 8 + 8 = 36.
pub const GENEVE_IP_OVERHEAD: usize = OUTER_HEADERS_LEN + GENEVE_IP_PAYLOAD_OVERHEAD;
/// Headroom to leave in front of every inner packet so that either encapsulation fits: the
/// largest overhead rounded up to 64 bytes, which also keeps the inner packet cache-line aligned
/// when the buffer is.
pub const MAX_HEADROOM: usize = 64;
/// Outer TTL (the Linux default `ip_default_ttl`).
pub const OUTER_TTL: u8 = 64;
/// First port of the dynamic range both RFCs ask the source port to come from (RFC 7348 §5).
pub const SOURCE_PORT_MIN: u16 = 49152;
/// Last outer source port a podrouter tunnel sender uses: the dynamic range stops short of the
/// default masquerade range (61000-65535), so that a peer can tell a tunnel sender's datagram
/// from a masqueraded pod datagram by its source port (docs/architecture.md, "Tunnel ingress
/// from pods"). Linux's own VXLAN driver picks from 32768-60999, also below 61000.
pub const SOURCE_PORT_MAX: u16 = 60999;
/// Number of ports in `SOURCE_PORT_MIN..=SOURCE_PORT_MAX`.
const SOURCE_PORT_SPAN: u32 = (SOURCE_PORT_MAX - SOURCE_PORT_MIN) as u32 + 1;

const _: () = assert!(
    VXLAN_OVERHEAD == 50
        && GENEVE_OVERHEAD == 50
        && GENEVE_IP_OVERHEAD == 36
        && MAX_HEADROOM >= VXLAN_OVERHEAD
);

/// What to write in front of an inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncapParams {
    pub proto: TunnelProto,
    /// 24-bit virtual network identifier.
    pub vni: u32,
    /// Outer source: this node's underlay address (of `dst`'s family).
    pub src: IpAddr,
    /// Outer destination: the peer's underlay address; its family is the outer header's.
    pub dst: IpAddr,
    /// Outer UDP destination port (the configured tunnel port).
    pub dst_port: u16,
    /// VXLAN and Geneve with [`GenevePayload::Ethernet`]: addresses of the inner Ethernet header.
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
    /// Geneve only: what follows the Geneve header.
    pub geneve_payload: GenevePayload,
}

impl EncapParams {
    /// Bytes [`encap_payload`] puts in front of the inner packet for these parameters.
    #[inline]
    pub const fn payload_overhead(&self) -> usize {
        match (self.proto, self.geneve_payload) {
            (TunnelProto::Geneve, GenevePayload::Ip) => GENEVE_IP_PAYLOAD_OVERHEAD,
            (p, _) => p.payload_overhead(),
        }
    }

    /// Bytes [`encap_full`] puts in front of the inner packet for these parameters: an IPv6
    /// outer header (`dst` IPv6) is 20 bytes longer than the IPv4 one.
    #[inline]
    pub const fn overhead(&self) -> usize {
        OUTER_HEADERS_LEN
            + self.payload_overhead()
            + if self.dst.is_ipv6() {
                OUTER_V6_EXTRA
            } else {
                0
            }
    }
}

/// Why encapsulation refused to write anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncapError {
    /// `start + len` is beyond the buffer.
    BadRange,
    /// Not enough bytes in front of `start`.
    Headroom { need: usize, have: usize },
    /// The inner bytes do not start with an IPv4 or IPv6 version nibble (or are empty).
    InnerNotIp,
    /// The outer packet would exceed 65535 bytes.
    TooBig,
    /// The VNI does not fit in 24 bits.
    BadVni,
    /// Outer source and destination are of different address families.
    MixedFamilies,
}

impl EncapError {
    pub const fn as_str(self) -> &'static str {
        match self {
            EncapError::BadRange => "bad_range",
            EncapError::Headroom { .. } => "headroom",
            EncapError::InnerNotIp => "inner_not_ip",
            EncapError::TooBig => "too_big",
            EncapError::BadVni => "bad_vni",
            EncapError::MixedFamilies => "mixed_families",
        }
    }
}

impl fmt::Display for EncapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncapError::Headroom { need, have } => {
                write!(f, "headroom: need {need} bytes, have {have}")
            }
            e => f.write_str(e.as_str()),
        }
    }
}

impl std::error::Error for EncapError {}

/// The EtherType of an inner IP packet from its version nibble.
fn inner_ethertype(inner: &[u8]) -> Result<u16, EncapError> {
    match inner.first().map(|b| b >> 4) {
        Some(4) => Ok(ethertype::IPV4),
        Some(6) => Ok(ethertype::IPV6),
        _ => Err(EncapError::InnerNotIp),
    }
}

fn check_args(
    buf: &[u8],
    start: usize,
    len: usize,
    params: &EncapParams,
    need: usize,
) -> Result<u16, EncapError> {
    let end = start.checked_add(len).ok_or(EncapError::BadRange)?;
    let inner = buf.get(start..end).ok_or(EncapError::BadRange)?;
    let et = inner_ethertype(inner)?;
    if params.vni > vxlan::MAX_VNI {
        return Err(EncapError::BadVni);
    }
    if start < need {
        return Err(EncapError::Headroom { need, have: start });
    }
    Ok(et)
}

/// Write the tunnel header (and for VXLAN the inner Ethernet header) in front of
/// `buf[start..start + len]`. Returns the range of the UDP payload.
pub fn encap_payload(
    buf: &mut [u8],
    start: usize,
    len: usize,
    params: &EncapParams,
) -> Result<Range<usize>, EncapError> {
    let need = params.payload_overhead();
    let et = check_args(buf, start, len, params, need)?;
    let begin = start - need;
    write_tunnel_header(&mut buf[begin..start], et, params);
    Ok(begin..start + len)
}

/// [`encap_payload`] for an inner packet the caller has just parsed with [`wire::parse_ip`]:
/// `v6` is its IP version, so the inner bytes are not read again. Writes the same bytes and
/// fails the same way (a range outside `buf`, a VNI over 24 bits, too little headroom).
#[inline]
pub fn encap_payload_parsed(
    buf: &mut [u8],
    start: usize,
    len: usize,
    v6: bool,
    params: &EncapParams,
) -> Result<Range<usize>, EncapError> {
    let end = start
        .checked_add(len)
        .filter(|&end| end <= buf.len())
        .ok_or(EncapError::BadRange)?;
    let et = if v6 { ethertype::IPV6 } else { ethertype::IPV4 };
    if params.vni > vxlan::MAX_VNI {
        return Err(EncapError::BadVni);
    }
    let head = &mut buf[..start];
    let need = params.payload_overhead();
    let headroom = EncapError::Headroom { need, have: start };
    // Fixed-size views of the header bytes: every write below has a constant offset into an
    // array of known length, so no bounds check is left in the per-packet path.
    match params.proto {
        TunnelProto::Vxlan => {
            let hdr = head
                .last_chunk_mut::<VXLAN_PAYLOAD_OVERHEAD>()
                .ok_or(headroom)?;
            write_tunnel_header(hdr, et, params);
        }
        TunnelProto::Geneve => match params.geneve_payload {
            GenevePayload::Ethernet => {
                let hdr = head
                    .last_chunk_mut::<GENEVE_PAYLOAD_OVERHEAD>()
                    .ok_or(headroom)?;
                write_tunnel_header(hdr, et, params);
            }
            GenevePayload::Ip => {
                let hdr = head
                    .last_chunk_mut::<GENEVE_IP_PAYLOAD_OVERHEAD>()
                    .ok_or(headroom)?;
                write_tunnel_header(hdr, et, params);
            }
        },
    }
    Ok(start - need..end)
}

/// `hdr` is exactly `params.payload_overhead()` bytes.
#[inline]
fn write_tunnel_header(hdr: &mut [u8], et: u16, params: &EncapParams) {
    match (params.proto, params.geneve_payload) {
        (TunnelProto::Vxlan, _) => {
            let (vx, eth) = hdr.split_at_mut(vxlan::HEADER_LEN);
            vxlan::Header::new_unchecked(vx).emit(params.vni);
            write_inner_ethernet(eth, et, params);
        }
        (TunnelProto::Geneve, GenevePayload::Ethernet) => {
            let (gn, eth) = hdr.split_at_mut(geneve::HEADER_LEN);
            geneve::Header::new_unchecked(gn).emit(params.vni, ethertype::TEB, 0);
            write_inner_ethernet(eth, et, params);
        }
        (TunnelProto::Geneve, GenevePayload::Ip) => {
            geneve::Header::new_unchecked(hdr).emit(params.vni, et, 0);
        }
    }
}

/// The inner Ethernet header of VXLAN and Geneve-with-Ethernet: the same VTEP MAC rule for both.
#[inline]
fn write_inner_ethernet(eth: &mut [u8], et: u16, params: &EncapParams) {
    let mut f = ethernet::Frame::new_unchecked(eth);
    f.set_dst_addr(params.inner_dst_mac);
    f.set_src_addr(params.inner_src_mac);
    f.set_ethertype(et);
}

/// The synthesized VTEP MAC of a node: `02:70` followed by its underlay IPv4 address, or for an
/// IPv6 underlay address `02:76` followed by its last four bytes (locally
/// administered, unicast, stable across restarts). RFC 7348 carries a whole L2 frame; podrouter
/// uses this as the inner source of every VXLAN frame it sends (so a Flannel-style kernel peer
/// points its neighbour and FDB entries for this node at it; `podrouter status` shows it as
/// `vtep_mac`) and as the inner destination towards a peer without a configured `vtep_mac`.
/// podrouter's receiver ignores the inner Ethernet header.
pub fn vxlan_inner_mac(node: IpAddr) -> [u8; 6] {
    match node {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            [0x02, 0x70, a, b, c, d]
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            [0x02, 0x76, o[12], o[13], o[14], o[15]]
        }
    }
}

/// Extra outer bytes of an IPv6 outer header over an IPv4 one (40 - 20).
pub const OUTER_V6_EXTRA: usize = ipv6::HEADER_LEN - ipv4::HEADER_LEN;
/// VXLAN over an IPv6 underlay: 40 + 8 + 8 + 14 = 70.
pub const VXLAN6_OVERHEAD: usize = VXLAN_OVERHEAD + OUTER_V6_EXTRA;
/// Geneve (inner Ethernet) over an IPv6 underlay: 40 + 8 + 8 + 14 = 70.
pub const GENEVE6_OVERHEAD: usize = GENEVE_OVERHEAD + OUTER_V6_EXTRA;

/// The outer IPv6 flow label of an inner packet: the low 20 bits of its flow hash (RFC 6438 §3:
/// a tunnel end point sets the label from the inner flow so ECMP/LAG can spread flows). Never
/// zero (zero means "no label").
pub fn outer_flow_label(inner: &[u8]) -> u32 {
    flow_label_of(flow_hash(inner))
}

/// [`outer_flow_label`] from the inner packet's flow hash ([`flow_hash_parsed`] of a parse).
#[inline]
pub fn flow_label_of(hash: u32) -> u32 {
    match hash & 0x000f_ffff {
        0 => 1,
        l => l,
    }
}

/// Write the outer IP (IPv4 or IPv6, by `params.dst`) + UDP + tunnel header in front of
/// `buf[start..start + len]`. Returns the range of the complete outer packet. The UDP checksum is
/// always computed (mandatory over IPv6, RFC 8200 §8.1); an IPv6 outer carries the inner flow's
/// label ([`outer_flow_label`]) and the traffic class [`outer_tos`] gives the IPv4 TOS.
pub fn encap_full(
    buf: &mut [u8],
    start: usize,
    len: usize,
    params: &EncapParams,
) -> Result<Range<usize>, EncapError> {
    let ip_len = match (params.src, params.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => ipv4::HEADER_LEN,
        (IpAddr::V6(_), IpAddr::V6(_)) => ipv6::HEADER_LEN,
        _ => return Err(EncapError::MixedFamilies),
    };
    let need = params.overhead();
    let et = check_args(buf, start, len, params, need)?;
    let total = need + len;
    let udp_len = total - ip_len;
    if udp_len > usize::from(u16::MAX) || (ip_len == ipv4::HEADER_LEN && total > 65535) {
        return Err(EncapError::TooBig);
    }
    let begin = start - need;
    let (sport, tos, label) = {
        let inner = &buf[start..start + len];
        (
            udp_source_port(inner),
            outer_tos(inner),
            outer_flow_label(inner),
        )
    };
    let pkt = &mut buf[begin..start + len];
    let (outer, rest) = pkt.split_at_mut(ip_len + udp::HEADER_LEN);
    write_tunnel_header(&mut rest[..params.payload_overhead()], et, params);

    {
        let mut u = udp::Packet::new_unchecked(&mut outer[ip_len..]);
        u.set_src_port(sport);
        u.set_dst_port(params.dst_port);
        u.set_len(udp_len as u16);
        u.set_checksum(0);
    }
    // The UDP checksum covers the pseudo-header, the UDP header and the whole payload
    // (tunnel header + inner packet), which lives in `rest`.
    let pseudo = match (params.src, params.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            checksum::pseudo_header_v4(s, d, ip_proto::UDP, udp_len as u16)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            checksum::pseudo_header_v6(s, d, ip_proto::UDP, udp_len as u32)
        }
        _ => return Err(EncapError::MixedFamilies),
    };
    let sum = checksum::combine(&[
        pseudo,
        checksum::data(&outer[ip_len..]),
        checksum::data(rest),
    ]);
    let c = match !sum {
        0 => 0xffff, // RFC 768: a computed zero is sent as all ones
        c => c,
    };
    udp::Packet::new_unchecked(&mut outer[ip_len..]).set_checksum(c);

    match (params.src, params.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let repr = ipv4::Repr {
                src,
                dst,
                protocol: ip_proto::UDP,
                payload_len: udp_len,
                ttl: OUTER_TTL,
                tos,
                // RFC 6864 §4.1: the ID of an atomic datagram (DF set, never fragmented) has no meaning.
                ident: 0,
                dont_frag: true,
            };
            repr.emit(&mut ipv4::Packet::new_unchecked(
                &mut outer[..ipv4::HEADER_LEN],
            ))
            .map_err(|_| EncapError::TooBig)?;
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = ipv6::Packet::new_unchecked(&mut outer[..ipv6::HEADER_LEN]);
            ip.set_version(6);
            ip.set_traffic_class(tos);
            ip.set_flow_label(label);
            ip.set_payload_len(udp_len as u16);
            ip.set_next_header(ip_proto::UDP);
            ip.set_hop_limit(OUTER_TTL);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
        }
        _ => return Err(EncapError::MixedFamilies),
    }
    Ok(begin..start + len)
}

/// The inner flow as far as it can be read without trusting the packet: addresses, protocol and
/// ports (ICMP echo: the identifier as source port). Missing parts are zero.
fn flow_tuple(inner: &[u8]) -> Option<(IpAddr, IpAddr, u8, u16, u16)> {
    let (src, dst, proto, l4) = match inner.first()? >> 4 {
        4 => {
            let p = ipv4::Packet::new_checked_header(inner).ok()?;
            let end = usize::from(p.total_len()).min(inner.len());
            let l4 = if p.is_fragment() {
                &[][..]
            } else {
                inner.get(p.header_len()..end).unwrap_or(&[])
            };
            (
                IpAddr::V4(p.src_addr()),
                IpAddr::V4(p.dst_addr()),
                p.protocol(),
                l4,
            )
        }
        6 => {
            let p = ipv6::Packet::new_checked_header(inner).ok()?;
            let (src, dst) = (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()));
            match p.walk_extension_headers() {
                // Written as a match rather than `is_none_or` to stay within the declared MSRV.
                Ok(c)
                    if matches!(
                        c.fragment,
                        None | Some(FragmentInfo {
                            offset: 0,
                            more: false,
                            ..
                        })
                    ) =>
                {
                    let end = p.total_len().min(inner.len());
                    (
                        src,
                        dst,
                        c.protocol,
                        inner.get(c.l4_offset..end).unwrap_or(&[]),
                    )
                }
                Ok(c) => (src, dst, c.protocol, &[][..]),
                Err(_) => (src, dst, p.next_header(), &[][..]),
            }
        }
        _ => return None,
    };
    let (sp, dp) = flow_ports(proto, l4);
    Some((src, dst, proto, sp, dp))
}

/// The flow's "ports" from the start of the transport header `l4` (zero where it is too short).
#[inline]
fn flow_ports(proto: u8, l4: &[u8]) -> (u16, u16) {
    let be = |o: usize| {
        l4.get(o..o + 2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
    };
    match proto {
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP => (be(0), be(2)),
        ip_proto::ICMP | ip_proto::ICMPV6 => (be(4), 0),
        _ => (0, 0),
    }
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

#[inline(always)]
fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a over the tuple bytes (addresses as 4 bytes each when both are IPv4, else 16), then
/// the MurmurHash3 finaliser.
#[inline]
fn hash_tuple(src: IpAddr, dst: IpAddr, proto: u8, sp: u16, dp: u16) -> u32 {
    let h = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => fnv1a(fnv1a(FNV_OFFSET, &s.octets()), &d.octets()),
        (s, d) => hash_v6_addrs(s, d),
    };
    hash_ports(h, proto, sp, dp)
}

/// The address part of [`hash_tuple`] for IPv6 (or mixed) addresses. Kept out of line so the
/// IPv4 path does not stage 32 address bytes it never hashes.
#[inline(never)]
fn hash_v6_addrs(s: IpAddr, d: IpAddr) -> u32 {
    fnv1a(fnv1a(FNV_OFFSET, &to_v6(s).octets()), &to_v6(d).octets())
}

#[inline(always)]
fn hash_ports(mut h: u32, proto: u8, sp: u16, dp: u16) -> u32 {
    h = fnv1a(h, &[proto]);
    h = fnv1a(h, &sp.to_be_bytes());
    h = fnv1a(h, &dp.to_be_bytes());
    fmix32(h)
}

/// A deterministic 32-bit hash of the inner 5-tuple: FNV-1a over the tuple bytes followed by the
/// MurmurHash3 finaliser so that every input bit reaches the high bits the port is taken from.
/// Unparseable input hashes its first 64 bytes.
pub fn flow_hash(inner: &[u8]) -> u32 {
    match flow_tuple(inner) {
        Some((s, d, p, sp, dp)) => hash_tuple(s, d, p, sp, dp),
        None => fmix32(fnv1a(FNV_OFFSET, &inner[..inner.len().min(64)])),
    }
}

/// [`flow_hash`] of a packet that [`wire::parse_ip`] accepted, computed from that parse instead
/// of re-reading and re-validating the headers: `inner` is the packet cut at `meta.total_len` and
/// `meta` its parse. Equal to `flow_hash(inner)` (the tests compare them): both read ports only
/// from a packet that is not a fragment (an RFC 6946 atomic fragment counts as whole), from the
/// same transport header offset.
#[inline]
pub fn flow_hash_parsed(inner: &[u8], meta: &wire::IpMeta) -> u32 {
    let (sp, dp) = match meta.l4 {
        _ if meta.is_fragment => (0, 0),
        // TCP / UDP / SCTP of a whole packet: the parse read the same two words.
        wire::L4Info::Ports { src, dst, .. } => (src, dst),
        _ => flow_ports(meta.protocol, inner.get(meta.l4_offset..).unwrap_or(&[])),
    };
    hash_tuple(meta.src, meta.dst, meta.protocol, sp, dp)
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The outer UDP source port for an inner packet: [`flow_hash`] scaled onto
/// `SOURCE_PORT_MIN..=SOURCE_PORT_MAX` (multiply-shift, so every hash bit counts), inside the
/// dynamic range RFC 7348 §5 recommends (RFC 8926 §3.3 asks the same of Geneve).
pub fn udp_source_port(inner: &[u8]) -> u16 {
    source_port_of(flow_hash(inner))
}

/// [`udp_source_port`] of a parsed packet, from [`flow_hash_parsed`].
#[inline]
pub fn udp_source_port_parsed(inner: &[u8], meta: &wire::IpMeta) -> u16 {
    source_port_of(flow_hash_parsed(inner, meta))
}

/// [`udp_source_port`] from the inner packet's flow hash.
#[inline]
pub fn source_port_of(hash: u32) -> u16 {
    // (hash * span) >> 32 < span <= 11848, so the cast and the sum cannot overflow
    SOURCE_PORT_MIN + ((u64::from(hash) * u64::from(SOURCE_PORT_SPAN)) >> 32) as u16
}

/// The inner TOS / traffic class byte, 0 if unreadable.
fn inner_tos(inner: &[u8]) -> u8 {
    match inner.first().map(|b| b >> 4) {
        Some(4) => inner.get(1).copied().unwrap_or(0),
        Some(6) if inner.len() >= 2 => (inner[0] << 4) | (inner[1] >> 4),
        _ => 0,
    }
}

/// The outer TOS byte for an inner packet: DSCP copied; ECN per RFC 6040 §4.1 normal mode — the
/// inner ECN field copied, except that CE becomes ECT(0) so a congestion mark is not duplicated on
/// decapsulation by routers that see only the outer header.
pub fn outer_tos(inner: &[u8]) -> u8 {
    outer_tos_for(inner_tos(inner))
}

/// [`outer_tos`] from the inner TOS / traffic class byte itself (`dscp << 2 | ecn` of a parse).
#[inline]
pub fn outer_tos_for(tos: u8) -> u8 {
    let e = match tos & 0x03 {
        ecn::CE => ecn::ECT0,
        e => e,
    };
    (tos & 0xfc) | e
}

/// What decapsulation must do to the inner ECN field (RFC 6040 §4.2, Figure 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EcnAction {
    /// Forward the inner header unchanged.
    Keep,
    /// Set the inner ECN field to CE (outer CE, inner ECT(0)/ECT(1)).
    SetCe,
    /// Set the inner ECN field to ECT(1) (outer ECT(1), inner ECT(0)).
    SetEct1,
}

/// RFC 6040 §4.2 decapsulation table. `Err(EcnDrop)` for outer CE with a Not-ECT inner packet:
/// the congestion signal cannot be passed on, so the packet is dropped.
pub fn ecn_decap_action(outer_ecn: u8, inner_ecn: u8) -> Result<EcnAction, DecapError> {
    Ok(match (outer_ecn & 3, inner_ecn & 3) {
        (ecn::CE, ecn::NOT_ECT) => return Err(DecapError::EcnDrop),
        (ecn::CE, ecn::ECT0 | ecn::ECT1) => EcnAction::SetCe,
        (ecn::ECT1, ecn::ECT0) => EcnAction::SetEct1,
        _ => EcnAction::Keep,
    })
}

/// Set the ECN field of an IPv4 or IPv6 header to `value`, fixing the IPv4 header checksum
/// incrementally (RFC 1624). The IPv6 header has no checksum.
pub fn set_ecn(inner: &mut [u8], value: u8) -> Result<(), wire::Error> {
    match inner.first().map(|b| b >> 4) {
        Some(4) => {
            let mut p = ipv4::Packet::new_checked_header(inner)?;
            let tos = (p.tos() & 0xfc) | (value & 3);
            p.rewrite_tos(tos);
            Ok(())
        }
        Some(6) => {
            ipv6::Packet::new_checked_header(inner)?.set_ecn(value);
            Ok(())
        }
        None => Err(wire::Error::Truncated),
        Some(_) => Err(wire::Error::Unsupported),
    }
}

/// Mark the inner packet Congestion Experienced (see [`set_ecn`]).
pub fn set_ecn_ce(inner: &mut [u8]) -> Result<(), wire::Error> {
    set_ecn(inner, ecn::CE)
}

/// Apply an [`EcnAction`] to the inner packet.
pub fn apply_ecn(inner: &mut [u8], action: EcnAction) -> Result<(), wire::Error> {
    match action {
        EcnAction::Keep => Ok(()),
        EcnAction::SetCe => set_ecn(inner, ecn::CE),
        EcnAction::SetEct1 => set_ecn(inner, ecn::ECT1),
    }
}

/// Why an encapsulated packet was dropped. [`DecapError::as_str`] is the stable metrics reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecapError {
    Truncated,
    Malformed,
    /// VXLAN without the I flag (RFC 7348 §5).
    BadVxlanFlags,
    /// Geneve version other than 0 (RFC 8926 §3.4).
    GeneveVersion,
    /// A Geneve option with the critical bit that we do not understand (RFC 8926 §3.5.1).
    GeneveCriticalOption,
    /// A Geneve OAM frame (O bit): control traffic, not data to forward.
    GeneveOam,
    /// Inner payload is neither IPv4 nor IPv6.
    UnsupportedInnerProtocol,
    /// Outer IPv4 header or UDP checksum wrong.
    BadOuterChecksum,
    /// Outer CE over a Not-ECT inner packet (RFC 6040 §4.2).
    EcnDrop,
    /// Outer IPv4 fragment: podrouter sends DF and does not reassemble.
    OuterFragment,
    /// Outer packet is not IPv4 / UDP to a tunnel port.
    Unsupported,
}

impl DecapError {
    pub const fn as_str(self) -> &'static str {
        match self {
            DecapError::Truncated => "truncated",
            DecapError::Malformed => "malformed",
            DecapError::BadVxlanFlags => "bad_vxlan_flags",
            DecapError::GeneveVersion => "geneve_version",
            DecapError::GeneveCriticalOption => "geneve_critical_option",
            DecapError::GeneveOam => "geneve_oam",
            DecapError::UnsupportedInnerProtocol => "unsupported_inner_protocol",
            DecapError::BadOuterChecksum => "bad_outer_checksum",
            DecapError::EcnDrop => "ecn_drop",
            DecapError::OuterFragment => "outer_fragment",
            DecapError::Unsupported => "unsupported",
        }
    }

    /// Every variant, for tests and metrics pre-registration.
    pub const ALL: [DecapError; 11] = [
        DecapError::Truncated,
        DecapError::Malformed,
        DecapError::BadVxlanFlags,
        DecapError::GeneveVersion,
        DecapError::GeneveCriticalOption,
        DecapError::GeneveOam,
        DecapError::UnsupportedInnerProtocol,
        DecapError::BadOuterChecksum,
        DecapError::EcnDrop,
        DecapError::OuterFragment,
        DecapError::Unsupported,
    ];
}

impl From<wire::Error> for DecapError {
    fn from(e: wire::Error) -> Self {
        match e {
            wire::Error::Truncated => DecapError::Truncated,
            wire::Error::Malformed => DecapError::Malformed,
            wire::Error::Unsupported => DecapError::Unsupported,
            wire::Error::BadChecksum => DecapError::BadOuterChecksum,
            wire::Error::UnknownCriticalOption => DecapError::GeneveCriticalOption,
        }
    }
}

impl fmt::Display for DecapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for DecapError {}

/// A validated tunnel payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decap {
    pub proto: TunnelProto,
    pub vni: u32,
    /// Where the inner IP packet is, relative to the buffer given to the decap function. It ends
    /// where the inner IP header's length says (link padding after it is excluded).
    pub inner: Range<usize>,
    /// 0x0800 or 0x86DD.
    pub inner_ethertype: u16,
    pub ecn_action: EcnAction,
}

/// Validate the tunnel header at the start of a UDP payload and locate the inner IP packet.
///
/// VXLAN: I flag set, inner Ethernet type IPv4 / IPv6. Geneve: version 0, not OAM, options inside
/// Opt Len, no critical option (podrouter understands none), Protocol Type IPv4 / IPv6 or
/// Transparent Ethernet Bridging carrying IPv4 / IPv6. In both: the inner IP header's version
/// matches the EtherType and its length fits in the payload. `outer_ecn` drives
/// [`Decap::ecn_action`]. The inner IPv4 header checksum and transport header are not checked
/// here: the datapath runs [`crate::wire::parse_ip`] on the inner packet next, which does.
pub fn decap_payload(
    proto: TunnelProto,
    payload: &[u8],
    outer_ecn: u8,
) -> Result<Decap, DecapError> {
    let (vni, offset, et) = match proto {
        TunnelProto::Vxlan => {
            let h = vxlan::Header::new_checked(payload)?;
            h.check_valid().map_err(|_| DecapError::BadVxlanFlags)?;
            let f = ethernet::Frame::new_checked(h.payload())?;
            (h.vni(), VXLAN_PAYLOAD_OVERHEAD, f.ethertype())
        }
        TunnelProto::Geneve => {
            let h = geneve::Header::new_checked(payload)?;
            if h.version() != 0 {
                return Err(DecapError::GeneveVersion);
            }
            match h.check_valid(|_, _| false) {
                Ok(()) => {}
                Err(wire::Error::UnknownCriticalOption) => {
                    return Err(DecapError::GeneveCriticalOption)
                }
                Err(_) => return Err(DecapError::Malformed),
            }
            if h.oam() {
                return Err(DecapError::GeneveOam);
            }
            match h.protocol_type() {
                ethertype::TEB => {
                    let f = ethernet::Frame::new_checked(h.payload())?;
                    (
                        h.vni(),
                        h.header_len() + ethernet::HEADER_LEN,
                        f.ethertype(),
                    )
                }
                et => (h.vni(), h.header_len(), et),
            }
        }
    };
    let inner = payload.get(offset..).ok_or(DecapError::Truncated)?;
    let version = inner.first().map(|b| b >> 4).ok_or(DecapError::Truncated)?;
    match (et, version) {
        (ethertype::IPV4, 4) | (ethertype::IPV6, 6) => {}
        (ethertype::IPV4 | ethertype::IPV6, _) => return Err(DecapError::Malformed),
        _ => return Err(DecapError::UnsupportedInnerProtocol),
    }
    let (len, inner_ecn) = match et {
        ethertype::IPV4 => {
            let p = ipv4::Packet::new_checked(inner).map_err(inner_err)?;
            (usize::from(p.total_len()), p.ecn())
        }
        ethertype::IPV6 => {
            let p = ipv6::Packet::new_checked(inner).map_err(inner_err)?;
            (p.total_len(), p.ecn())
        }
        _ => return Err(DecapError::UnsupportedInnerProtocol),
    };
    let ecn_action = ecn_decap_action(outer_ecn, inner_ecn)?;
    Ok(Decap {
        proto,
        vni,
        inner: offset..offset + len,
        inner_ethertype: et,
        ecn_action,
    })
}

/// A version nibble that disagrees with the EtherType makes the payload malformed, not an
/// unsupported protocol.
fn inner_err(e: wire::Error) -> DecapError {
    match e {
        wire::Error::Unsupported => DecapError::Malformed,
        e => e.into(),
    }
}

/// A validated outer packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OuterDecap {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// `decap.inner` is relative to the outer packet.
    pub decap: Decap,
}

/// Validate an outer IPv4 or IPv6 + UDP packet and its tunnel payload; the protocol is chosen
/// from the UDP destination port (4789 VXLAN, 6081 Geneve).
pub fn decap_full(outer: &[u8]) -> Result<OuterDecap, DecapError> {
    decap_full_with(outer, |port| match port {
        vxlan::UDP_PORT => Some(TunnelProto::Vxlan),
        geneve::UDP_PORT => Some(TunnelProto::Geneve),
        _ => None,
    })
}

/// [`decap_full`] with a caller-chosen port map (configured tunnel ports). An IPv6 outer packet
/// must carry UDP directly (extension headers, fragments included, are `unsupported`: a tunnel
/// sender has no reason to add any) and a non-zero, correct UDP checksum (RFC 8200 §8.1; the
/// zero-checksum exception of RFC 6935 is not taken, as the Linux default).
pub fn decap_full_with(
    outer: &[u8],
    proto_for_port: impl Fn(u16) -> Option<TunnelProto>,
) -> Result<OuterDecap, DecapError> {
    let (src, dst, l4, ecn_bits, base): (IpAddr, IpAddr, &[u8], u8, usize) =
        match outer.first().map(|b| b >> 4) {
            Some(6) => {
                let ip = ipv6::Packet::new_checked(outer)?;
                if ip.next_header() != ip_proto::UDP {
                    return Err(DecapError::Unsupported);
                }
                let (s, d) = (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()));
                (
                    s,
                    d,
                    &outer[ipv6::HEADER_LEN..ip.total_len()],
                    ip.ecn(),
                    ipv6::HEADER_LEN,
                )
            }
            _ => {
                let ip = ipv4::Packet::new_checked(outer)?;
                if !ip.verify_checksum() {
                    return Err(DecapError::BadOuterChecksum);
                }
                if ip.is_fragment() {
                    return Err(DecapError::OuterFragment);
                }
                if ip.protocol() != ip_proto::UDP {
                    return Err(DecapError::Unsupported);
                }
                let (s, d) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
                let (h, t) = (ip.header_len(), usize::from(ip.total_len()));
                (s, d, &outer[h..t], ip.ecn(), h)
            }
        };
    let u = udp::Packet::new_checked(l4)?;
    // A zero checksum is "none" over IPv4 (RFC 768) and refused over IPv6; anything else must verify.
    if !u.verify_checksum(src, dst) {
        return Err(DecapError::BadOuterChecksum);
    }
    let proto = proto_for_port(u.dst_port()).ok_or(DecapError::Unsupported)?;
    let mut decap = decap_payload(proto, u.payload(), ecn_bits)?;
    let base = base + udp::HEADER_LEN;
    decap.inner = decap.inner.start + base..decap.inner.end + base;
    Ok(OuterDecap {
        src,
        dst,
        src_port: u.src_port(),
        dst_port: u.dst_port(),
        decap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    const NODE1: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 16, 2, 2));
    const NODE2: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 16, 3, 2));

    fn params(proto: TunnelProto) -> EncapParams {
        EncapParams {
            proto,
            vni: 1,
            src: NODE1,
            dst: NODE2,
            dst_port: proto.default_port(),
            inner_src_mac: [0x02, 0, 0, 0, 0, 0x01],
            inner_dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            geneve_payload: GenevePayload::Ethernet,
        }
    }

    fn geneve_ip_params() -> EncapParams {
        EncapParams {
            geneve_payload: GenevePayload::Ip,
            ..params(TunnelProto::Geneve)
        }
    }

    /// 10.244.1.1 -> 10.244.2.1 UDP 5000 -> 53, 4 payload bytes, tos 0xb8 | `ecn`.
    fn inner_udp(ecn_bits: u8) -> Vec<u8> {
        // IPv4: tos, total length 32, id 7, DF, TTL 64, UDP, checksum filled below.
        let mut v = vec![0x45, 0xb8 | ecn_bits, 0, 32, 0, 7, 0x40, 0, 64, 17, 0, 0];
        v.extend_from_slice(&[10, 244, 1, 1, 10, 244, 2, 1]);
        // UDP 5000 -> 53, length 12, checksum filled below, payload 1 2 3 4.
        v.extend_from_slice(&[0x13, 0x88, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4]);
        ipv4::Packet::new_unchecked(&mut v[..]).fill_checksum();
        udp::Packet::new_unchecked(&mut v[20..])
            .fill_checksum_v4(Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 2, 1));
        v
    }

    fn in_headroom(inner: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; MAX_HEADROOM];
        b.extend_from_slice(inner);
        b
    }

    /// The whole outer packet `encap_full` builds around `inner`.
    fn encapsulated(inner: &[u8], proto: TunnelProto) -> Vec<u8> {
        let mut b = in_headroom(inner);
        let r = encap_full(&mut b, MAX_HEADROOM, inner.len(), &params(proto)).unwrap();
        b[r].to_vec()
    }

    fn params6(proto: TunnelProto) -> EncapParams {
        EncapParams {
            src: "2001:db8:2::2".parse().unwrap(),
            dst: "2001:db8:3::2".parse().unwrap(),
            ..params(proto)
        }
    }

    /// IPv6 outer header: version 6, the inner DSCP/ECN as traffic class, the inner flow's label,
    /// UDP next header, hop limit 64, a non-zero UDP checksum that verifies, 70 bytes of
    /// overhead; and `decap_full` reads the same packet back (addresses, ports, inner range).
    #[test]
    fn ipv6_outer_encap_and_decap() {
        for (proto, overhead) in [
            (TunnelProto::Vxlan, VXLAN6_OVERHEAD),
            (TunnelProto::Geneve, GENEVE6_OVERHEAD),
        ] {
            assert_eq!(params6(proto).overhead(), overhead);
            let inner = inner_udp(ecn::ECT0);
            let mut b = vec![0u8; 80];
            b.extend_from_slice(&inner);
            let r = encap_full(&mut b, 80, inner.len(), &params6(proto)).unwrap();
            assert_eq!(r, 80 - overhead..80 + inner.len());
            let o = b[r].to_vec();
            let ip = ipv6::Packet::new_checked(&o[..]).unwrap();
            assert_eq!(ip.version(), 6);
            assert_eq!(ip.traffic_class(), 0xb8 | ecn::ECT0);
            assert_eq!(ip.flow_label(), outer_flow_label(&inner));
            assert_ne!(ip.flow_label(), 0);
            assert_eq!(ip.next_header(), ip_proto::UDP);
            assert_eq!(ip.hop_limit(), OUTER_TTL);
            assert_eq!(usize::from(ip.payload_len()), o.len() - 40);
            let u = udp::Packet::new_checked(ip.payload()).unwrap();
            assert_ne!(u.checksum(), 0);
            let (s, d) = (params6(proto).src, params6(proto).dst);
            assert!(u.verify_checksum(s, d));
            assert_eq!(u.dst_port(), proto.default_port());
            let dec = decap_full(&o).unwrap();
            assert_eq!((dec.src, dec.dst), (s, d));
            assert_eq!(dec.src_port, udp_source_port(&inner));
            assert_eq!(&o[dec.decap.inner.clone()], &inner[..]);
            assert_eq!(dec.decap.vni, 1);
            // Mandatory checksum over IPv6: zero is refused, so is a wrong one.
            let mut zero = o.clone();
            zero[46..48].fill(0);
            assert_eq!(decap_full(&zero), Err(DecapError::BadOuterChecksum));
            let mut bad = o.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x55;
            assert_eq!(decap_full(&bad), Err(DecapError::BadOuterChecksum));
            // An extension header in front of UDP (here: hop-by-hop) is not a tunnel packet.
            let mut ext = o.clone();
            ext[6] = 0;
            assert_eq!(decap_full(&ext), Err(DecapError::Unsupported));
            // Truncations never panic and never succeed.
            for n in 0..o.len() {
                assert!(decap_full(&o[..n]).is_err(), "cut at {n}");
            }
        }
        // Mixed outer families are refused.
        let inner = inner_udp(0);
        let mut b = in_headroom(&inner);
        let mixed = EncapParams {
            dst: NODE2,
            ..params6(TunnelProto::Geneve)
        };
        assert_eq!(
            encap_full(&mut b, MAX_HEADROOM, inner.len(), &mixed),
            Err(EncapError::MixedFamilies)
        );
        // VXLAN over IPv6 needs 70 bytes of headroom, more than MAX_HEADROOM.
        assert_eq!(
            encap_full(
                &mut b,
                MAX_HEADROOM,
                inner.len(),
                &params6(TunnelProto::Vxlan)
            ),
            Err(EncapError::Headroom {
                need: 70,
                have: MAX_HEADROOM
            })
        );
    }

    // Expected VXLAN frame for inner_udp(0), built field by field from RFC 7348 Figure 1.
    #[test]
    fn vxlan_golden_bytes() {
        let inner = inner_udp(0);
        let mut b = in_headroom(&inner);
        let r = encap_full(
            &mut b,
            MAX_HEADROOM,
            inner.len(),
            &params(TunnelProto::Vxlan),
        )
        .unwrap();
        assert_eq!(r, MAX_HEADROOM - 50..MAX_HEADROOM + inner.len());
        let o = &b[r];
        let sport = udp_source_port(&inner);
        assert!(sport >= 49152);
        let total = (50 + inner.len()) as u16;
        let mut want = vec![
            0x45, 0xb8, 0, 0, 0, 0, 0x40, 0x00, 64, 17, 0, 0, 172, 16, 2, 2, 172, 16, 3, 2,
        ];
        want[2..4].copy_from_slice(&total.to_be_bytes());
        want.extend_from_slice(&sport.to_be_bytes());
        want.extend_from_slice(&[0x12, 0xb5]);
        want.extend_from_slice(&(total - 20).to_be_bytes());
        want.extend_from_slice(&[0, 0]); // checksum, compared separately
        want.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
        want.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        want.extend_from_slice(&inner);
        assert_eq!(&o[..10], &want[..10]);
        assert_eq!(&o[12..26], &want[12..26]);
        assert_eq!(&o[28..], &want[28..]);
        let ip = ipv4::Packet::new_checked(o).unwrap();
        assert!(ip.verify_checksum());
        let u = udp::Packet::new_checked(ip.payload()).unwrap();
        assert_ne!(u.checksum(), 0);
        assert!(u.verify_checksum(NODE1, NODE2));
    }

    #[test]
    fn geneve_golden_bytes() {
        let inner = inner_udp(0);
        // Default: Transparent Ethernet Bridging, then the same inner Ethernet header as VXLAN.
        let mut b = in_headroom(&inner);
        let r = encap_payload(
            &mut b,
            MAX_HEADROOM,
            inner.len(),
            &params(TunnelProto::Geneve),
        )
        .unwrap();
        assert_eq!(r.start, MAX_HEADROOM - 22);
        assert_eq!(&b[r.clone()][..8], &[0x00, 0x00, 0x65, 0x58, 0, 0, 1, 0]);
        assert_eq!(
            &b[r.clone()][8..22],
            &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]
        );
        assert_eq!(&b[r][22..], &inner[..]);
        // The parsed-packet variant writes the same bytes.
        let mut b2 = in_headroom(&inner);
        let r2 = encap_payload_parsed(
            &mut b2,
            MAX_HEADROOM,
            inner.len(),
            false,
            &params(TunnelProto::Geneve),
        )
        .unwrap();
        assert_eq!(b2, b);
        assert_eq!(r2.start, MAX_HEADROOM - 22);
        // `ip`: the inner IP packet right after the base header.
        let mut b = in_headroom(&inner);
        let r = encap_payload(&mut b, MAX_HEADROOM, inner.len(), &geneve_ip_params()).unwrap();
        assert_eq!(r.start, MAX_HEADROOM - 8);
        assert_eq!(&b[r.clone()][..8], &[0x00, 0x00, 0x08, 0x00, 0, 0, 1, 0]);
        assert_eq!(&b[r][8..], &inner[..]);
        let mut b2 = in_headroom(&inner);
        let r2 = encap_payload_parsed(
            &mut b2,
            MAX_HEADROOM,
            inner.len(),
            false,
            &geneve_ip_params(),
        )
        .unwrap();
        assert_eq!((b2, r2.start), (b, MAX_HEADROOM - 8));
        assert_eq!(geneve_ip_params().overhead(), GENEVE_IP_OVERHEAD);
        assert_eq!(params(TunnelProto::Geneve).overhead(), 50);
        let mut b = in_headroom(&inner);
        let r = encap_payload(
            &mut b,
            MAX_HEADROOM,
            inner.len(),
            &params(TunnelProto::Vxlan),
        )
        .unwrap();
        assert_eq!(r.start, MAX_HEADROOM - 22);
        assert_eq!(&b[r.start..r.start + 8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn roundtrip_both_protocols() {
        for (proto, gp) in [
            (TunnelProto::Vxlan, GenevePayload::Ethernet),
            (TunnelProto::Geneve, GenevePayload::Ethernet),
            (TunnelProto::Geneve, GenevePayload::Ip),
        ] {
            for e in 0..4 {
                let inner = inner_udp(e);
                let p = EncapParams {
                    geneve_payload: gp,
                    ..params(proto)
                };
                let mut b = in_headroom(&inner);
                let r = encap_full(&mut b, MAX_HEADROOM, inner.len(), &p).unwrap();
                let o = b[r].to_vec();
                assert_eq!(o.len(), p.overhead() + inner.len());
                let d = decap_full(&o).unwrap();
                assert_eq!(
                    (d.src, d.dst, d.dst_port),
                    (NODE1, NODE2, proto.default_port())
                );
                assert_eq!(d.decap.proto, proto);
                assert_eq!(d.decap.vni, 1);
                assert_eq!(d.decap.inner_ethertype, ethertype::IPV4);
                assert_eq!(d.decap.ecn_action, EcnAction::Keep);
                assert_eq!(&o[d.decap.inner.clone()], &inner[..]);
            }
        }
    }

    #[test]
    fn outer_tos_rfc6040() {
        assert_eq!(outer_tos(&inner_udp(ecn::NOT_ECT)), 0xb8);
        assert_eq!(outer_tos(&inner_udp(ecn::ECT0)), 0xb8 | ecn::ECT0);
        assert_eq!(outer_tos(&inner_udp(ecn::ECT1)), 0xb8 | ecn::ECT1);
        assert_eq!(outer_tos(&inner_udp(ecn::CE)), 0xb8 | ecn::ECT0);
        // IPv6: traffic class 0x2e << 2 | CE
        let v6 = [0x60 | (0xbb >> 4), 0xb0, 0, 0];
        assert_eq!(outer_tos(&v6), 0xb8 | ecn::ECT0);
        assert_eq!(outer_tos(&[]), 0);
    }

    #[test]
    fn ecn_decap_table() {
        use ecn::*;
        let drop = Err(DecapError::EcnDrop);
        // rows: inner Not-ECT, ECT(0), ECT(1), CE; columns: outer Not-ECT, ECT(0), ECT(1), CE
        let table = [
            [
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                drop,
            ],
            [
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                Ok(EcnAction::SetEct1),
                Ok(EcnAction::SetCe),
            ],
            [
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                Ok(EcnAction::SetCe),
            ],
            [
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
                Ok(EcnAction::Keep),
            ],
        ];
        for (i, inner) in [NOT_ECT, ECT0, ECT1, CE].into_iter().enumerate() {
            for (j, outer) in [NOT_ECT, ECT0, ECT1, CE].into_iter().enumerate() {
                assert_eq!(
                    ecn_decap_action(outer, inner),
                    table[i][j],
                    "inner {inner} outer {outer}"
                );
            }
        }
    }

    #[test]
    fn decap_applies_ce() {
        let mut o = encapsulated(&inner_udp(ecn::ECT0), TunnelProto::Vxlan);
        // A congested router marks the outer header CE.
        ipv4::Packet::new_unchecked(&mut o[..]).rewrite_tos(0xb8 | ecn::CE);
        let d = decap_full(&o).unwrap();
        assert_eq!(d.decap.ecn_action, EcnAction::SetCe);
        let inner_range = d.decap.inner.clone();
        apply_ecn(&mut o[inner_range.clone()], d.decap.ecn_action).unwrap();
        let p = ipv4::Packet::new_checked(&o[inner_range]).unwrap();
        assert_eq!(p.ecn(), ecn::CE);
        assert!(p.verify_checksum());
        // Not-ECT inner under an outer CE is dropped.
        let mut o = encapsulated(&inner_udp(ecn::NOT_ECT), TunnelProto::Geneve);
        ipv4::Packet::new_unchecked(&mut o[..]).rewrite_tos(0xb8 | ecn::CE);
        assert_eq!(decap_full(&o).unwrap_err(), DecapError::EcnDrop);
    }

    #[test]
    fn set_ecn_ce_v6() {
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[1] = 0x20; // traffic class 0x02: ECT(0)
        set_ecn_ce(&mut v6).unwrap();
        assert_eq!(ipv6::Packet::new_checked(&v6[..]).unwrap().ecn(), ecn::CE);
        assert_eq!(set_ecn_ce(&mut []), Err(wire::Error::Truncated));
        assert_eq!(set_ecn_ce(&mut [0x45; 10]), Err(wire::Error::Truncated));
        assert_eq!(set_ecn_ce(&mut [0x15; 40]), Err(wire::Error::Unsupported));
    }

    #[test]
    fn encap_errors() {
        let inner = inner_udp(0);
        let p = params(TunnelProto::Vxlan);
        let g = params(TunnelProto::Geneve);
        let n = inner.len();
        let at = |start: usize| {
            let mut b = vec![0u8; start];
            b.extend_from_slice(&inner);
            b
        };
        type Encap = fn(&mut [u8], usize, usize, &EncapParams) -> Result<Range<usize>, EncapError>;
        let gi = geneve_ip_params();
        let cases: [(Encap, &EncapParams, usize); 6] = [
            (encap_full, &p, 50),
            (encap_payload, &p, 22),
            (encap_full, &g, 50),
            (encap_payload, &g, 22),
            (encap_full, &gi, 36),
            (encap_payload, &gi, 8),
        ];
        for (f, params, need) in cases {
            let have = need - 1;
            assert_eq!(
                f(&mut at(have), have, n, params),
                Err(EncapError::Headroom { need, have }),
                "{:?} need {need}",
                params.proto
            );
        }
        // Exactly enough headroom works.
        assert_eq!(encap_full(&mut at(50), 50, n, &p), Ok(0..50 + n));
        assert_eq!(encap_payload(&mut at(22), 22, n, &g), Ok(0..22 + n));
        assert_eq!(encap_payload(&mut at(8), 8, n, &gi), Ok(0..8 + n));
        let mut b = in_headroom(&inner);
        assert_eq!(
            encap_full(&mut b, MAX_HEADROOM, n + 1, &p),
            Err(EncapError::BadRange)
        );
        assert_eq!(
            encap_full(&mut b, usize::MAX, 2, &p),
            Err(EncapError::BadRange)
        );
        assert_eq!(
            encap_full(&mut b, MAX_HEADROOM, 0, &p),
            Err(EncapError::InnerNotIp)
        );
        let mut big = vec![0u8; MAX_HEADROOM + 65500];
        big[MAX_HEADROOM] = 0x45;
        assert_eq!(
            encap_full(&mut big, MAX_HEADROOM, 65500, &p),
            Err(EncapError::TooBig)
        );
        let mut bad_vni = p;
        bad_vni.vni = 1 << 24;
        assert_eq!(
            encap_full(&mut b, MAX_HEADROOM, n, &bad_vni),
            Err(EncapError::BadVni)
        );
        // Nothing written on error.
        assert_eq!(&b[..MAX_HEADROOM], &[0u8; MAX_HEADROOM][..]);
    }

    #[test]
    fn source_port_is_per_flow() {
        let a = inner_udp(0);
        let mut b = a.clone();
        b[20] = 0x13;
        b[21] = 0x89; // another source port
        assert_eq!(udp_source_port(&a), udp_source_port(&inner_udp(ecn::CE)));
        assert_ne!(flow_hash(&a), flow_hash(&b));
        for p in [
            udp_source_port(&a),
            udp_source_port(&b),
            udp_source_port(&[]),
            udp_source_port(&[0xff; 3]),
        ] {
            assert!((SOURCE_PORT_MIN..=SOURCE_PORT_MAX).contains(&p));
        }
    }

    #[test]
    fn source_port_range_ends() {
        // the extreme hashes land on the first and the last port, never past 60999 (the default
        // masquerade range starts at 61000)
        assert_eq!(source_port_of(0), SOURCE_PORT_MIN);
        assert_eq!(source_port_of(u32::MAX), SOURCE_PORT_MAX);
        let mut seen_high = false;
        for i in 0..100_000u32 {
            let p = source_port_of(fmix32(i));
            assert!((SOURCE_PORT_MIN..=SOURCE_PORT_MAX).contains(&p));
            seen_high |= p > 60_000;
        }
        assert!(seen_high);
    }

    fn vxlan_payload(flags: u8, ethertype_: u16, inner: &[u8]) -> Vec<u8> {
        let mut v = vec![flags, 0, 0, 0, 0, 0, 5, 0];
        v.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
        v.extend_from_slice(&ethertype_.to_be_bytes());
        v.extend_from_slice(inner);
        v
    }

    #[test]
    fn vxlan_decap_rejections() {
        let inner = inner_udp(0);
        let ok =
            decap_payload(TunnelProto::Vxlan, &vxlan_payload(0x08, 0x0800, &inner), 0).unwrap();
        assert_eq!(ok.vni, 5);
        assert_eq!(ok.inner, 22..22 + inner.len());
        let good = vxlan_payload(0x08, 0x0800, &inner);
        let rejected = [
            (
                vxlan_payload(0x00, 0x0800, &inner),
                DecapError::BadVxlanFlags,
            ),
            (
                vxlan_payload(0x08, 0x0806, &inner),
                DecapError::UnsupportedInnerProtocol,
            ),
            (vxlan_payload(0x08, 0x86dd, &inner), DecapError::Malformed),
            (
                vxlan_payload(0x08, 0x0800, &inner[..30]),
                DecapError::Truncated,
            ),
            (good[..7].to_vec(), DecapError::Truncated),
            (good[..21].to_vec(), DecapError::Truncated),
        ];
        for (i, (payload, want)) in rejected.iter().enumerate() {
            let got = decap_payload(TunnelProto::Vxlan, payload, 0);
            assert_eq!(got.unwrap_err(), *want, "case {i}");
        }
        // Padding after the inner packet (a VTEP that pads frames to 60 bytes) is excluded.
        let mut padded = vxlan_payload(0x08, 0x0800, &inner);
        padded.extend_from_slice(&[0; 14]);
        assert_eq!(
            decap_payload(TunnelProto::Vxlan, &padded, 0).unwrap().inner,
            22..22 + inner.len()
        );
    }

    fn geneve_payload(b0: u8, b1: u8, proto: u16, opts: &[u8], inner: &[u8]) -> Vec<u8> {
        let mut v = vec![b0, b1, 0, 0, 0, 0, 9, 0];
        v[2..4].copy_from_slice(&proto.to_be_bytes());
        v.extend_from_slice(opts);
        v.extend_from_slice(inner);
        v
    }

    #[test]
    fn geneve_decap_rules() {
        let inner = inner_udp(0);
        let opt = [0x01, 0x02, 0x03, 0x01, 0xaa, 0xbb, 0xcc, 0xdd];
        let d = decap_payload(
            TunnelProto::Geneve,
            &geneve_payload(2, 0, 0x0800, &opt, &inner),
            0,
        )
        .unwrap();
        assert_eq!((d.vni, d.inner.clone()), (9, 16..16 + inner.len()));
        // TEB carrying IPv4.
        let mut eth = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        eth.extend_from_slice(&inner);
        let d = decap_payload(
            TunnelProto::Geneve,
            &geneve_payload(0, 0, 0x6558, &[], &eth),
            0,
        )
        .unwrap();
        assert_eq!(d.inner, 22..22 + inner.len());
        let mut crit = opt;
        crit[2] = 0x83;
        let mut long = opt;
        long[3] = 2; // 8 data bytes in a 4-byte area
                     // (byte 0, byte 1, protocol type, options, inner, expected error)
        #[allow(clippy::type_complexity)]
        let rejected: [(u8, u8, u16, &[u8], &[u8], DecapError); 8] = [
            (0x40, 0, 0x0800, &[], &inner, DecapError::GeneveVersion),
            (
                2,
                0x40,
                0x0800,
                &crit,
                &inner,
                DecapError::GeneveCriticalOption,
            ),
            (
                2,
                0x00,
                0x0800,
                &crit,
                &inner,
                DecapError::GeneveCriticalOption,
            ),
            (0, 0x80, 0x0800, &[], &inner, DecapError::GeneveOam),
            (2, 0, 0x0800, &long, &inner, DecapError::Malformed),
            (3, 0, 0x0800, &[], &[], DecapError::Truncated),
            (
                0,
                0,
                0x0806,
                &[],
                &inner,
                DecapError::UnsupportedInnerProtocol,
            ),
            (0, 0, 0x0800, &[], &[], DecapError::Truncated),
        ];
        for (i, &(b0, b1, proto, opts, inner, want)) in rejected.iter().enumerate() {
            let got = decap_payload(
                TunnelProto::Geneve,
                &geneve_payload(b0, b1, proto, opts, inner),
                0,
            );
            assert_eq!(got.unwrap_err(), want, "case {i}");
        }
    }

    #[test]
    fn decap_full_rejections() {
        let good = encapsulated(&inner_udp(0), TunnelProto::Vxlan);
        let mut o = good.clone();
        o[10] ^= 1;
        assert_eq!(decap_full(&o).unwrap_err(), DecapError::BadOuterChecksum);
        let mut o = good.clone();
        *o.last_mut().unwrap() ^= 0x55; // corrupt inner payload: UDP checksum fails
        assert_eq!(decap_full(&o).unwrap_err(), DecapError::BadOuterChecksum);
        // A zero UDP checksum is accepted over IPv4.
        let mut o = good.clone();
        o[26] = 0;
        o[27] = 0;
        assert!(decap_full(&o).is_ok());
        let mut o = good.clone();
        o[22..24].copy_from_slice(&1234u16.to_be_bytes());
        o[26] = 0;
        o[27] = 0;
        assert_eq!(decap_full(&o).unwrap_err(), DecapError::Unsupported);
        assert_eq!(
            decap_full_with(&o, |_| Some(TunnelProto::Vxlan))
                .unwrap()
                .decap
                .vni,
            1
        );
        let mut o = good.clone();
        {
            let mut ip = ipv4::Packet::new_unchecked(&mut o[..]);
            ip.set_more_frags(true);
            ip.fill_checksum();
        }
        assert_eq!(decap_full(&o).unwrap_err(), DecapError::OuterFragment);
        assert_eq!(
            decap_full(&good[..good.len() - 1]).unwrap_err(),
            DecapError::Truncated
        );
        assert_eq!(decap_full(&[]).unwrap_err(), DecapError::Truncated);
    }

    #[test]
    fn reasons_are_stable_and_unique() {
        let mut names: Vec<_> = DecapError::ALL.iter().map(|e| e.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DecapError::ALL.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        assert_eq!(TunnelProto::parse("geneve"), Some(TunnelProto::Geneve));
        assert_eq!(TunnelProto::parse("gre"), None);
    }
}
