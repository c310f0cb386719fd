//! UDP-tunnel GSO (Linux 6.17+): one encapsulated TCP super-packet handed to the kernel whole.
//!
//! Instead of segmenting a TSO super-packet read from the TUN and sending one VXLAN / Geneve
//! datagram per segment, the I/O layer writes ONE frame to a TAP opened with `IFF_VNET_HDR`,
//! `TUNSETOFFLOAD(... | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM)` and a 24-byte vnet
//! header (`struct virtio_net_hdr_v1_hash_tunnel`):
//!
//! ```text
//! [vnet header, 24][outer Ethernet, 14][outer IPv4, 20 | IPv6, 40][outer UDP, 8][tunnel header][inner packet]
//! ```
//!
//! The kernel forwards it to the underlay and segments it only where a device cannot carry it
//! whole (a veth keeps it whole up to the peer's socket). [`build_prefix`] (IPv4 underlay) and
//! [`build_prefix6`] (IPv6 underlay) write everything in front of the UDP payload; [`whole_inner`]
//! and [`rx_hdr`] are the receiving side: a datagram the kernel delivered whole (one GSO skb of
//! type `SKB_GSO_UDP_TUNNEL[_CSUM]`: the socket gets it as ONE datagram and, unlike a GRO train,
//! without a `UDP_GRO` cmsg, since Linux reports that only for `SKB_GSO_UDP_L4`) whose inner
//! packet is a TCP super-packet with its checksum still partial, turned into one TSO write to the
//! TUN. The segment size is not on the wire: the receiver derives it from its MTU ([`rx_hdr`]).
//!
//! Layout of the 24-byte header (all fields little-endian: with the tunnel bits the kernel parses
//! the basic header as virtio 1.0, `__virtio_net_hdr_to_skb(.., little_endian = true, ..)`):
//! `flags, gso_type, hdr_len, gso_size, csum_start, csum_offset` (the 10-byte header),
//! `num_buffers` (2), `hash_value` (4), `hash_report` (2), padding (2), `outer_th_offset` (2),
//! `inner_nh_offset` (2). `csum_start` is the inner transport header; the offsets count from the
//! start of the frame (outer Ethernet). The kernel refuses (`EINVAL`) a tunnel header without
//! `NEEDS_CSUM`, with both tunnel bits or none, with UFO inside, with offsets that leave less
//! than an outer (20 or 40 bytes) or inner IP header between them, or with
//! `F_UDP_TUNNEL_CSUM` on a TAP that did not negotiate `TUN_F_UDP_TUNNEL_GSO_CSUM`
//! (`virtio_net_hdr_tnl_to_skb`).
//!
//! The outer UDP checksum. Over IPv4 it is zero (RFC 7348 / RFC 8926 allow it; the kernel VXLAN
//! device's default) and the skb is `SKB_GSO_UDP_TUNNEL`: segments get a zero checksum too. Over
//! IPv6 a zero UDP checksum is only for sockets that opted in (RFC 6935/6936: Linux drops it on a
//! socket without `UDP_NO_CHECK6_RX`, which neither podrouter's tunnel sockets nor a default
//! kernel vxlan device set; the kernel's own vxlan6 sends checksums). So the IPv6 frame carries
//! `F_UDP_TUNNEL_CSUM` (`SKB_GSO_UDP_TUNNEL_CSUM`) and the outer UDP checksum field holds the
//! pseudo-header sum of the whole datagram, not complemented (what `udp6_set_csum` leaves in a
//! GSO skb): `__skb_udp_tunnel_segment` takes the length out of it, puts each segment's back and
//! finishes every segment's checksum (or leaves that to a device that offloads it); a socket that
//! gets the skb whole sees a `CHECKSUM_PARTIAL` skb and does not verify it. A frame that the
//! kernel would not treat as GSO (one segment) would leave that seed unfinished, so
//! [`build_prefix6`] refuses it (`Unsupported`: the caller sends it through the socket).
//!
//! No I/O and no `unsafe`; every function is total on untrusted bytes (fuzzed by rust/fuzz's
//! `vnet_segment` and `egress_path` targets).

use super::csum;
use super::vnet::{flags, gso_type, OffloadError, VnetHdr, MAX_SEGMENTS};
use crate::encap::TunnelProto;

/// `sizeof(struct virtio_net_hdr_v1_hash_tunnel)`: the TAP's `TUNSETVNETHDRSZ`.
pub const TNL_HDR_LEN: usize = 24;
/// Outer Ethernet + IPv4 + UDP.
pub const OUTER_LEN: usize = 14 + 20 + 8;
/// Everything [`build_prefix`] writes in front of the UDP payload.
pub const PREFIX_LEN: usize = TNL_HDR_LEN + OUTER_LEN;
/// Offset of the outer UDP header in the frame (`outer_th_offset`).
pub const OUTER_TH: usize = 14 + 20;
/// Outer Ethernet + IPv6 + UDP.
pub const OUTER6_LEN: usize = 14 + 40 + 8;
/// Everything [`build_prefix6`] writes in front of the UDP payload.
pub const PREFIX6_LEN: usize = TNL_HDR_LEN + OUTER6_LEN;
/// Offset of the outer UDP header in an IPv6 frame.
pub const OUTER6_TH: usize = 14 + 40;
/// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4` / `_IPV6` (gso_type bits).
pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
pub const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
/// `VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM` (flags bit): the outer UDP checksum is to be finished per
/// segment (`SKB_GSO_UDP_TUNNEL_CSUM`; the TAP needs `TUN_F_UDP_TUNNEL_GSO_CSUM`).
pub const F_UDP_TUNNEL_CSUM: u8 = 8;
/// Largest UDP payload one IPv4 datagram carries.
pub const MAX_PAYLOAD: usize = 65535 - 20 - 8;
/// Largest UDP payload one IPv6 datagram carries without a jumbogram (payload length 65535).
pub const MAX_PAYLOAD6: usize = 65535 - 8;

/// The outer headers of one tunnel super-packet over an IPv4 underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// The TAP's own MAC (a frame to another MAC would be `PACKET_OTHERHOST` and dropped).
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub tos: u8,
    /// The kernel forwards the frame (TAP in, underlay out) and decrements this once.
    pub ttl: u8,
    /// IPv4 identification of the first segment (the kernel increments it per segment).
    pub id: u16,
}

/// The outer headers of one tunnel super-packet over an IPv6 underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer6 {
    /// The TAP's own MAC.
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// Traffic class: the byte the IPv4 path puts in TOS (DSCP | ECN).
    pub tclass: u8,
    /// Flow label (RFC 6438; the low 20 bits are used), as the socket path sets it; the kernel
    /// copies the outer IPv6 header, label included, into every segment.
    pub flow_label: u32,
    /// The kernel forwards the frame and decrements this once.
    pub hop_limit: u8,
}

/// The 24-byte header as the kernel reads it (for tests and the fuzz target).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TnlHdr {
    pub base: VnetHdr,
    pub outer_th: u16,
    pub inner_nh: u16,
}

impl TnlHdr {
    pub fn parse(b: &[u8]) -> Option<TnlHdr> {
        let b: &[u8; TNL_HDR_LEN] = b.get(..TNL_HDR_LEN)?.try_into().ok()?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(TnlHdr {
            base: VnetHdr {
                flags: b[0],
                gso_type: b[1],
                hdr_len: le(2),
                gso_size: le(4),
                csum_start: le(6),
                csum_offset: le(8),
            },
            outer_th: le(20),
            inner_nh: le(22),
        })
    }

    pub fn emit(&self, b: &mut [u8; TNL_HDR_LEN]) {
        let h = &self.base;
        *b = [0; TNL_HDR_LEN];
        b[0] = h.flags;
        b[1] = h.gso_type;
        b[2..4].copy_from_slice(&h.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&h.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&h.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&h.csum_offset.to_le_bytes());
        b[20..22].copy_from_slice(&self.outer_th.to_le_bytes());
        b[22..24].copy_from_slice(&self.inner_nh.to_le_bytes());
    }

    /// The checks `virtio_net_hdr_tnl_to_skb` makes (IPv4 or IPv6 outer, TCP inner) on a TAP
    /// with both `TUN_F_UDP_TUNNEL_GSO` and `TUN_F_UDP_TUNNEL_GSO_CSUM`, so a header we would
    /// write is one the kernel accepts.
    pub fn kernel_accepts(&self, frame_len: usize) -> bool {
        let h = &self.base;
        let tunnel = h.gso_type & (GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6);
        let inner = h.gso_type & !(gso_type::ECN | GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6);
        let inner_l3 = if inner == gso_type::TCPV6 { 40 } else { 20 };
        let outer_l3 = match tunnel {
            GSO_UDP_TUNNEL_IPV4 => 20,
            GSO_UDP_TUNNEL_IPV6 => 40,
            _ => return false, // none, or both
        };
        let (th, nh, cs) = (
            usize::from(self.outer_th),
            usize::from(self.inner_nh),
            usize::from(h.csum_start),
        );
        (inner == gso_type::TCPV4 || inner == gso_type::TCPV6)
            && h.flags & flags::NEEDS_CSUM != 0
            && h.flags & flags::DATA_VALID == 0
            && h.flags & !(flags::NEEDS_CSUM | F_UDP_TUNNEL_CSUM) == 0
            && th >= 14 + outer_l3
            && nh >= th + 8
            && cs >= nh + inner_l3
            && cs + usize::from(h.csum_offset) + 2 <= frame_len
            && usize::from(h.hdr_len) <= frame_len
            && h.gso_size > 0
    }
}

/// The vnet header of a frame whose outer headers (Ethernet, IP, UDP) are `outer_len` bytes and
/// end at UDP offset `outer_th`, after checking the TUN read's header `inner` against the UDP
/// payload; and the number of segments the kernel will cut. Shared by both families.
fn tnl_hdr(
    payload: &[u8],
    inner_off: usize,
    inner: &VnetHdr,
    outer_len: usize,
    outer_th: usize,
    max_payload: usize,
) -> Result<(TnlHdr, usize), OffloadError> {
    let v6 = match inner.gso_kind() {
        gso_type::TCPV4 => false,
        gso_type::TCPV6 => true,
        _ => return Err(OffloadError::Unsupported),
    };
    if !inner.needs_csum() || inner.csum_offset != 16 || inner.gso_size == 0 {
        return Err(OffloadError::Unsupported);
    }
    if payload.len() > max_payload {
        return Err(OffloadError::Malformed);
    }
    let pkt = payload.get(inner_off..).ok_or(OffloadError::Malformed)?;
    let version = pkt.first().map(|b| b >> 4).ok_or(OffloadError::Malformed)?;
    let min_l3 = if v6 { 40 } else { 20 };
    if version != if v6 { 6 } else { 4 } {
        return Err(OffloadError::Malformed);
    }
    let th = usize::from(inner.csum_start);
    if th < min_l3 {
        return Err(OffloadError::Malformed);
    }
    let doff = pkt
        .get(th + 12)
        .map(|b| usize::from(b >> 4) * 4)
        .ok_or(OffloadError::Malformed)?;
    if doff < 20 || th + doff > pkt.len() {
        return Err(OffloadError::Malformed);
    }
    let segments = (pkt.len() - th - doff).div_ceil(usize::from(inner.gso_size));
    if segments > MAX_SEGMENTS {
        return Err(OffloadError::Malformed);
    }
    let frame_off = outer_len + inner_off; // inner IP header, from the frame start
    let hdr = TnlHdr {
        base: VnetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: inner.gso_type,
            hdr_len: (frame_off + th + doff) as u16,
            gso_size: inner.gso_size,
            csum_start: (frame_off + th) as u16,
            csum_offset: 16,
        },
        outer_th: outer_th as u16,
        inner_nh: frame_off as u16,
    };
    Ok((hdr, segments))
}

/// Writes the vnet header and the outer Ethernet / IPv4 / UDP headers for the UDP payload
/// `payload` (`[tunnel header][inner packet]`, the inner IP packet at `inner_off`), whose inner
/// packet is the TCP super-packet the TUN read described with `inner` (its `csum_start` counts
/// from the inner IP header). The inner bytes are not changed: the partial TCP checksum the
/// sender's kernel left stays for the kernel to finish per segment.
///
/// `Unsupported`: not a TCP super-packet with a partial checksum (the caller segments it itself);
/// `Malformed`: offsets or lengths that do not add up, or a payload too long for one datagram.
pub fn build_prefix(
    prefix: &mut [u8; PREFIX_LEN],
    outer: &Outer,
    payload: &[u8],
    inner_off: usize,
    inner: &VnetHdr,
) -> Result<(), OffloadError> {
    let (mut hdr, _) = tnl_hdr(payload, inner_off, inner, OUTER_LEN, OUTER_TH, MAX_PAYLOAD)?;
    hdr.base.gso_type |= GSO_UDP_TUNNEL_IPV4;
    let (vh, rest) = prefix.split_at_mut(TNL_HDR_LEN);
    hdr.emit(vh.try_into().map_err(|_| OffloadError::Malformed)?);
    // Ethernet
    rest[0..6].copy_from_slice(&outer.dst_mac);
    rest[6..12].copy_from_slice(&outer.src_mac);
    rest[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: DF, as the tunnel sockets send (IP_PMTUDISC_DO is Linux's UDP default with a route
    // MTU; the kernel checks every segment against the underlay MTU on forwarding).
    let ip = &mut rest[14..34];
    let total = (20 + 8 + payload.len()) as u16;
    ip[0] = 0x45;
    ip[1] = outer.tos;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&outer.id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = outer.ttl;
    ip[9] = 17;
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&outer.src);
    ip[16..20].copy_from_slice(&outer.dst);
    let c = !csum::sum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    // UDP: no checksum (RFC 7348 / RFC 8926 allow zero over IPv4; the kernel's VXLAN default)
    let udp = &mut rest[34..42];
    udp[0..2].copy_from_slice(&outer.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&outer.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp[6..8].fill(0);
    Ok(())
}

/// [`build_prefix`] for an IPv6 underlay: outer Ethernet / IPv6 / UDP, `GSO_UDP_TUNNEL_IPV6`
/// with `F_UDP_TUNNEL_CSUM`, the outer UDP checksum field holding the pseudo-header sum of the
/// whole datagram (see the module documentation). `Unsupported` also for a super-packet of one
/// segment (the kernel would not segment it, so nothing would finish that checksum).
pub fn build_prefix6(
    prefix: &mut [u8; PREFIX6_LEN],
    outer: &Outer6,
    payload: &[u8],
    inner_off: usize,
    inner: &VnetHdr,
) -> Result<(), OffloadError> {
    let (mut hdr, segments) = tnl_hdr(
        payload,
        inner_off,
        inner,
        OUTER6_LEN,
        OUTER6_TH,
        MAX_PAYLOAD6,
    )?;
    if segments < 2 {
        return Err(OffloadError::Unsupported);
    }
    hdr.base.gso_type |= GSO_UDP_TUNNEL_IPV6;
    hdr.base.flags |= F_UDP_TUNNEL_CSUM;
    let (vh, rest) = prefix.split_at_mut(TNL_HDR_LEN);
    hdr.emit(vh.try_into().map_err(|_| OffloadError::Malformed)?);
    rest[0..6].copy_from_slice(&outer.dst_mac);
    rest[6..12].copy_from_slice(&outer.src_mac);
    rest[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let udp_len = (8 + payload.len()) as u16; // <= 65535 (MAX_PAYLOAD6)
    let ip = &mut rest[14..54];
    let first = (6u32 << 28) | (u32::from(outer.tclass) << 20) | (outer.flow_label & 0x000f_ffff);
    ip[0..4].copy_from_slice(&first.to_be_bytes());
    ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
    ip[6] = 17;
    ip[7] = outer.hop_limit;
    ip[8..24].copy_from_slice(&outer.src);
    ip[24..40].copy_from_slice(&outer.dst);
    let udp = &mut rest[54..62];
    udp[0..2].copy_from_slice(&outer.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&outer.dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    let seed = csum::pseudo_v6(&outer.src, &outer.dst, 17, u32::from(udp_len));
    udp[6..8].copy_from_slice(&seed.to_be_bytes());
    Ok(())
}

/// The offset of the inner IP packet in the UDP payload `dg` when `dg` holds exactly one tunnel
/// packet whose inner IP length fields claim all of it (a super-packet the kernel delivered
/// whole); `None` otherwise (e.g. a GRO train of wire-sized datagrams, whose first inner packet
/// ends at the first segment). Only the header lengths are read here; the caller still
/// decapsulates and validates the datagram as one.
pub fn whole_inner(dg: &[u8], proto: TunnelProto) -> Option<usize> {
    let off = match proto {
        TunnelProto::Vxlan => 8 + 14,
        TunnelProto::Geneve => {
            let opts = usize::from(dg.first()? & 0x3f) * 4;
            let ptype = u16::from_be_bytes([*dg.get(2)?, *dg.get(3)?]);
            8 + opts + if ptype == 0x6558 { 14 } else { 0 }
        }
    };
    let ip = dg.get(off..)?;
    let len = match ip.first()? >> 4 {
        4 => usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?])),
        6 => 40 + usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?])),
        _ => return None,
    };
    (len == ip.len()).then_some(off)
}

/// The TUN vnet header for a whole inner TCP super-packet `pkt` that arrived with its checksum
/// still partial: `NEEDS_CSUM` at the TCP checksum, and segmentation in pieces of `mtu` bytes
/// (IP packet size; the payload per segment is `mtu` less this packet's IP and TCP headers) when
/// the payload is longer. `None` for anything else, which the caller handles as an ordinary
/// datagram: not TCP, an IPv4 fragment, IPv6 extension headers, too small an `mtu`, or a TCP
/// checksum field that is not the pseudo-header sum of the whole packet (Linux's
/// `CHECKSUM_PARTIAL` seed: `~tcp_v4_check(len, saddr, daddr, 0)`). That last test is what tells
/// a partial checksum from a finished one (e.g. a reassembled fragmented datagram) in O(1); a
/// finished checksum that happens to equal the seed (1 in 65536) is finished again by the
/// kernel into a wrong one and the packet is dropped by the pod, never delivered corrupt.
pub fn rx_hdr(pkt: &[u8], mtu: u16) -> Option<VnetHdr> {
    let (v6, th) = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([*pkt.get(6)?, *pkt.get(7)?]);
            if ihl < 20 || *pkt.get(9)? != 6 || frag & 0x3fff != 0 {
                return None;
            }
            (false, ihl)
        }
        6 => {
            if *pkt.get(6)? != 6 {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let doff = usize::from(pkt.get(th + 12)? >> 4) * 4;
    if doff < 20 || th + doff > pkt.len() {
        return None;
    }
    let l4_len = pkt.len() - th;
    let seed = if v6 {
        csum::pseudo_v6(&pkt[8..24], &pkt[24..40], 6, l4_len as u32)
    } else {
        csum::pseudo_v4(&pkt[12..16], &pkt[16..20], 6, u16::try_from(l4_len).ok()?)
    };
    if u16::from_be_bytes([pkt[th + 16], pkt[th + 17]]) != seed {
        return None;
    }
    let gso_size = usize::from(mtu)
        .checked_sub(th + doff)
        .filter(|&g| g >= 64)?;
    let gso_size = u16::try_from(gso_size).ok()?;
    let payload = pkt.len() - th - doff;
    if payload.div_ceil(usize::from(gso_size)) > MAX_SEGMENTS {
        return None;
    }
    let mut h = VnetHdr {
        flags: flags::NEEDS_CSUM,
        gso_type: gso_type::NONE,
        hdr_len: (th + doff) as u16,
        gso_size: 0,
        csum_start: th as u16,
        csum_offset: 16,
    };
    if payload > usize::from(gso_size) {
        h.gso_type = if v6 { gso_type::TCPV6 } else { gso_type::TCPV4 };
        if pkt[th + 13] & 0x80 != 0 {
            h.gso_type |= gso_type::ECN; // CWR: the kernel keeps it on the first segment only
        }
        h.gso_size = gso_size;
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::vnet;
    use proptest::prelude::*;

    /// A TCP super-packet as the kernel hands it to the TUN: valid IPv4 header, TCP checksum
    /// field holding the pseudo-header sum (`CHECKSUM_PARTIAL`).
    fn tso(v6: bool, payload: usize, mss: u16, cwr: bool) -> (Vec<u8>, VnetHdr) {
        let l3 = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; l3 + 20 + payload];
        let total = p.len();
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd; 16]);
            p[24..40].copy_from_slice(&[0xfe; 16]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 1, 0, 2]);
            p[16..20].copy_from_slice(&[10, 2, 0, 3]);
            let c = !csum::sum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        p[l3 + 12] = 0x50;
        p[l3 + 13] = 0x18 | if cwr { 0x80 } else { 0 };
        for (i, b) in p[l3 + 20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let pseudo = if v6 {
            csum::pseudo_v6(&p[8..24], &p[24..40], 6, (total - 40) as u32)
        } else {
            csum::pseudo_v4(&p[12..16], &p[16..20], 6, (total - 20) as u16)
        };
        p[l3 + 16..l3 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: if v6 { gso_type::TCPV6 } else { gso_type::TCPV4 }
                | if cwr { gso_type::ECN } else { 0 },
            hdr_len: (l3 + 20) as u16,
            gso_size: mss,
            csum_start: l3 as u16,
            csum_offset: 16,
        };
        (p, hdr)
    }

    fn outer() -> Outer {
        Outer {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: [192, 168, 0, 1],
            dst: [192, 168, 0, 2],
            src_port: 50000,
            dst_port: 4789,
            tos: 0x02,
            ttl: 65,
            id: 7,
        }
    }

    const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const DST6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn outer6() -> Outer6 {
        Outer6 {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: SRC6,
            dst: DST6,
            src_port: 50000,
            dst_port: 4789,
            tclass: 0xb9,
            flow_label: 0xfff12345,
            hop_limit: 65,
        }
    }

    fn vxlan_payload(inner: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 22];
        p[0] = 0x08;
        p[20..22].copy_from_slice(&0x0800u16.to_be_bytes());
        p.extend_from_slice(inner);
        p
    }

    #[test]
    fn header_layout_matches_the_kernel_struct() {
        let (inner, h) = tso(false, 3000, 1400, false);
        let payload = vxlan_payload(&inner);
        let mut pre = [0u8; PREFIX_LEN];
        build_prefix(&mut pre, &outer(), &payload, 22, &h).unwrap();
        // flags, gso_type (TCPV4 | UDP_TUNNEL_IPV4)
        assert_eq!(pre[0], 1);
        assert_eq!(pre[1], 0x21);
        // csum_start: 42 outer + 22 tunnel header + 20 inner IP
        assert_eq!(u16::from_le_bytes([pre[6], pre[7]]), 84);
        assert_eq!(u16::from_le_bytes([pre[8], pre[9]]), 16);
        assert_eq!(u16::from_le_bytes([pre[4], pre[5]]), 1400);
        assert_eq!(&pre[10..20], &[0; 10]); // num_buffers, hash
        assert_eq!(u16::from_le_bytes([pre[20], pre[21]]), 34);
        assert_eq!(u16::from_le_bytes([pre[22], pre[23]]), 64);
        // outer IPv4 valid, lengths cover the payload, UDP checksum zero
        let ip = &pre[38..58];
        assert_eq!(csum::sum(ip), 0xffff);
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            28 + payload.len()
        );
        assert_eq!(&pre[62..64], &((8 + payload.len()) as u16).to_be_bytes());
        assert_eq!(&pre[64..66], &[0, 0]);
        let t = TnlHdr::parse(&pre).unwrap();
        assert!(t.kernel_accepts(OUTER_LEN + payload.len()));
    }

    #[test]
    fn refuses_what_the_kernel_would() {
        let (inner, h) = tso(false, 3000, 1400, false);
        let payload = vxlan_payload(&inner);
        let mut pre = [0u8; PREFIX_LEN];
        let udp = VnetHdr {
            gso_type: gso_type::UDP_L4,
            ..h
        };
        assert_eq!(
            build_prefix(&mut pre, &outer(), &payload, 22, &udp),
            Err(OffloadError::Unsupported)
        );
        let no_csum = VnetHdr { flags: 0, ..h };
        assert!(build_prefix(&mut pre, &outer(), &payload, 22, &no_csum).is_err());
        let v6_hdr = VnetHdr {
            gso_type: gso_type::TCPV6,
            ..h
        };
        assert_eq!(
            build_prefix(&mut pre, &outer(), &payload, 22, &v6_hdr),
            Err(OffloadError::Malformed)
        );
        let long = vec![0u8; MAX_PAYLOAD + 1];
        assert!(build_prefix(&mut pre, &outer(), &long, 22, &h).is_err());
        assert!(build_prefix(&mut pre, &outer(), &payload, payload.len(), &h).is_err());
    }

    #[test]
    fn ipv6_header_layout_matches_the_kernel_struct() {
        for v6_inner in [false, true] {
            let (inner, h) = tso(v6_inner, 3000, 1400, false);
            let payload = vxlan_payload(&inner);
            let mut pre = [0u8; PREFIX6_LEN];
            build_prefix6(&mut pre, &outer6(), &payload, 22, &h).unwrap();
            // NEEDS_CSUM | UDP_TUNNEL_CSUM; TCPV4/6 | UDP_TUNNEL_IPV6
            assert_eq!(pre[0], 1 | 8);
            assert_eq!(pre[1], if v6_inner { 0x44 } else { 0x41 });
            let l3 = if v6_inner { 40 } else { 20 };
            // csum_start: 62 outer + 22 tunnel header + inner IP
            assert_eq!(usize::from(u16::from_le_bytes([pre[6], pre[7]])), 84 + l3);
            assert_eq!(u16::from_le_bytes([pre[8], pre[9]]), 16);
            assert_eq!(u16::from_le_bytes([pre[4], pre[5]]), 1400);
            assert_eq!(&pre[10..20], &[0; 10]);
            assert_eq!(u16::from_le_bytes([pre[20], pre[21]]), 54);
            assert_eq!(u16::from_le_bytes([pre[22], pre[23]]), 84);
            let f = &pre[TNL_HDR_LEN..];
            assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1]);
            assert_eq!(&f[12..14], &[0x86, 0xdd]);
            let ip = &f[14..54];
            // version 6, traffic class 0xb9, flow label's low 20 bits
            assert_eq!(&ip[0..4], &[0x6b, 0x91, 0x23, 0x45]);
            let udp_len = 8 + payload.len();
            assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), udp_len);
            assert_eq!((ip[6], ip[7]), (17, 65));
            assert_eq!((&ip[8..24], &ip[24..40]), (&SRC6[..], &DST6[..]));
            let udp = &f[54..62];
            assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 50000);
            assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 4789);
            assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp_len);
            let seed = u16::from_be_bytes([udp[6], udp[7]]);
            assert_eq!(seed, csum::pseudo_v6(&SRC6, &DST6, 17, udp_len as u32));
            assert_ne!(seed, 0, "a zero UDP checksum is refused over IPv6");
            let t = TnlHdr::parse(&pre).unwrap();
            assert!(t.kernel_accepts(OUTER6_LEN + payload.len()));
        }
    }

    #[test]
    fn ipv6_refuses_what_the_kernel_or_the_receiver_would() {
        let (inner, h) = tso(false, 3000, 1400, false);
        let payload = vxlan_payload(&inner);
        let mut pre = [0u8; PREFIX6_LEN];
        // one segment: not GSO for the kernel, so nobody would finish the outer checksum
        let (one, h1) = tso(false, 1400, 1400, false);
        assert_eq!(
            build_prefix6(&mut pre, &outer6(), &vxlan_payload(&one), 22, &h1),
            Err(OffloadError::Unsupported)
        );
        let udp = VnetHdr {
            gso_type: gso_type::UDP_L4,
            ..h
        };
        assert_eq!(
            build_prefix6(&mut pre, &outer6(), &payload, 22, &udp),
            Err(OffloadError::Unsupported)
        );
        let long = vec![0u8; MAX_PAYLOAD6 + 1];
        assert!(build_prefix6(&mut pre, &outer6(), &long, 22, &h).is_err());
        // an IPv6 offset layout read as IPv4 (too little room for a 40-byte outer header)
        build_prefix6(&mut pre, &outer6(), &payload, 22, &h).unwrap();
        let mut t = TnlHdr::parse(&pre).unwrap();
        assert!(t.kernel_accepts(OUTER6_LEN + payload.len()));
        t.outer_th = (14 + 20) as u16;
        assert!(!t.kernel_accepts(OUTER6_LEN + payload.len()));
        let mut both = TnlHdr::parse(&pre).unwrap();
        both.base.gso_type |= GSO_UDP_TUNNEL_IPV4;
        assert!(!both.kernel_accepts(OUTER6_LEN + payload.len()));
        let mut valid = TnlHdr::parse(&pre).unwrap();
        valid.base.flags |= flags::DATA_VALID;
        assert!(!valid.kernel_accepts(OUTER6_LEN + payload.len()));
    }

    #[test]
    fn whole_inner_tells_a_super_packet_from_a_gro_train() {
        let (inner, _) = tso(false, 3000, 1400, false);
        let whole = vxlan_payload(&inner);
        assert_eq!(whole_inner(&whole, TunnelProto::Vxlan), Some(22));
        let (small, _) = tso(false, 1400, 1400, false);
        let mut train = vxlan_payload(&small);
        let one = train.clone();
        train.extend_from_slice(&one);
        assert_eq!(whole_inner(&train, TunnelProto::Vxlan), None);
        // Geneve carrying IP directly, with one 4-byte option
        let mut g = vec![0x01, 0, 0x08, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        g.extend_from_slice(&inner);
        assert_eq!(whole_inner(&g, TunnelProto::Geneve), Some(12));
        assert_eq!(whole_inner(&[], TunnelProto::Geneve), None);
    }

    proptest! {
        /// What the receiver rebuilds from the bytes alone is what the sender's TUN read said,
        /// and the built header passes the kernel's own checks.
        #[test]
        fn rx_hdr_round_trips(v6 in any::<bool>(), payload in 1usize..20000, mss in 500u16..9000,
                              cwr in any::<bool>()) {
            let (inner, h) = tso(v6, payload, mss, cwr);
            let p = vxlan_payload(&inner);
            let mut pre = [0u8; PREFIX_LEN];
            build_prefix(&mut pre, &outer(), &p, 22, &h).unwrap();
            let t = TnlHdr::parse(&pre).unwrap();
            prop_assert!(t.kernel_accepts(OUTER_LEN + p.len()));
            prop_assert_eq!(usize::from(t.inner_nh) - OUTER_LEN, 22);
            let mut pre6 = [0u8; PREFIX6_LEN];
            match build_prefix6(&mut pre6, &outer6(), &p, 22, &h) {
                Ok(()) => {
                    prop_assert!(payload > usize::from(mss));
                    let t6 = TnlHdr::parse(&pre6).unwrap();
                    prop_assert!(t6.kernel_accepts(OUTER6_LEN + p.len()));
                    prop_assert_eq!(usize::from(t6.inner_nh) - OUTER6_LEN, 22);
                    // the same inner description as over IPv4, shifted by the longer outer header
                    prop_assert_eq!(t6.base.csum_start - t.base.csum_start, 20);
                    prop_assert_eq!(t6.base.gso_size, t.base.gso_size);
                }
                Err(e) => prop_assert!(payload <= usize::from(mss) && e == OffloadError::Unsupported),
            }
            let l3 = if v6 { 40 } else { 20 };
            let r = rx_hdr(&inner, mss + l3 + 20).unwrap();
            if payload > usize::from(mss) {
                prop_assert_eq!(r, h);
                // and the kernel's segmentation of it equals ours of the original
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let (mut ra, mut rb) = (Vec::new(), Vec::new());
                vnet::segment(&inner, &r, 0, &mut a, &mut ra).unwrap();
                vnet::segment(&inner, &h, 0, &mut b, &mut rb).unwrap();
                prop_assert_eq!(a, b);
            } else {
                prop_assert_eq!(r.gso_type, gso_type::NONE);
                prop_assert!(r.needs_csum());
            }
        }

        /// The outer UDP checksum seed of an IPv6 frame, put through the kernel's arithmetic
        /// (`__skb_udp_tunnel_segment`: the whole length out, each segment's in, the sum over the
        /// segment's UDP header and payload), gives every segment a checksum that verifies.
        #[test]
        fn ipv6_seed_becomes_each_segments_checksum(payload in 2000usize..20000, mss in 500u16..1500,
                                                    label in any::<u32>(), tclass in any::<u8>(),
                                                    last in any::<u8>()) {
            let (inner, h) = tso(true, payload, mss, false);
            let p = vxlan_payload(&inner);
            let mut o = outer6();
            o.flow_label = label;
            o.tclass = tclass;
            o.src[15] = last;
            let mut pre = [0u8; PREFIX6_LEN];
            build_prefix6(&mut pre, &o, &p, 22, &h).unwrap();
            let t = TnlHdr::parse(&pre).unwrap();
            prop_assert!(t.kernel_accepts(OUTER6_LEN + p.len()));
            let udp = &pre[TNL_HDR_LEN + 54..];
            let seed = u16::from_be_bytes([udp[6], udp[7]]);
            let full = 8 + p.len() as u32;
            // csum_sub(seed, htonl(len)): one's-complement subtraction is adding the complement
            let partial = csum::add(seed, !(full as u16));
            // each segment: [UDP header][tunnel header + inner headers + mss bytes]
            let hdrs = 22 + 40 + 20;
            let seg_payload = hdrs + usize::from(mss);
            let seg_len = 8 + seg_payload as u32;
            let seg_seed = csum::add(partial, seg_len as u16);
            prop_assert_eq!(seg_seed, csum::pseudo_v6(&o.src, &o.dst, 17, seg_len));
            let body = &p[..seg_payload];
            let mut hdr = [0u8; 8];
            hdr[0..4].copy_from_slice(&udp[0..4]);
            hdr[4..6].copy_from_slice(&(seg_len as u16).to_be_bytes());
            hdr[6..8].copy_from_slice(&seg_seed.to_be_bytes());
            let check = !csum::sum_parts(&[&hdr[..], body]);
            hdr[6..8].copy_from_slice(&check.to_be_bytes());
            let total = csum::add(
                csum::pseudo_v6(&o.src, &o.dst, 17, seg_len),
                csum::sum_parts(&[&hdr[..], body]),
            );
            prop_assert_eq!(total, 0xffff);
        }

        /// A finished checksum is not taken for a partial one.
        #[test]
        fn rx_hdr_refuses_finished_checksums(v6 in any::<bool>(), payload in 1usize..5000) {
            let (mut inner, h) = tso(v6, payload, 1000, false);
            let th = usize::from(h.csum_start);
            let seed = inner.clone();
            vnet::complete_csum(&mut inner, th, 16).unwrap();
            prop_assume!(seed[th + 16..th + 18] != inner[th + 16..th + 18]);
            prop_assert_eq!(rx_hdr(&inner, 1500), None);
            prop_assert!(rx_hdr(&seed, 1500).is_some());
        }

        /// Never panics and never claims success on junk.
        #[test]
        fn total_on_junk(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                         off in 0usize..64, gt in any::<u8>(), cs in any::<u16>(), gs in any::<u16>()) {
            let h = VnetHdr { flags: 1, gso_type: gt, hdr_len: 0, gso_size: gs, csum_start: cs, csum_offset: 16 };
            let mut pre = [0u8; PREFIX_LEN];
            if build_prefix(&mut pre, &outer(), &bytes, off, &h).is_ok() {
                let t = TnlHdr::parse(&pre).unwrap();
                prop_assert!(t.kernel_accepts(OUTER_LEN + bytes.len()));
            }
            let mut pre6 = [0u8; PREFIX6_LEN];
            if build_prefix6(&mut pre6, &outer6(), &bytes, off, &h).is_ok() {
                let t = TnlHdr::parse(&pre6).unwrap();
                prop_assert!(t.kernel_accepts(OUTER6_LEN + bytes.len()));
            }
            let _ = whole_inner(&bytes, TunnelProto::Geneve);
            let _ = whole_inner(&bytes, TunnelProto::Vxlan);
            let _ = rx_hdr(&bytes, gs);
        }
    }
}
