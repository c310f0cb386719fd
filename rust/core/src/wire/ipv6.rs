//! IPv6 (RFC 8200) and its extension header chain.
//!
//! Panic rules: see [`crate::wire`]. [`Packet::new_checked`] proves version 6 and
//! `40 + payload length <= buffer length`; afterwards no getter panics, and
//! [`Packet::walk_extension_headers`] bounds-checks every header it steps over.

use core::net::Ipv6Addr;

use super::{ip_proto, Error, Field, Result};

mod field {
    use super::Field;
    pub const VER_TC_FLOW: Field = 0..4;
    pub const LENGTH: Field = 4..6;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Field = 8..24;
    pub const DST: Field = 24..40;
}

pub const HEADER_LEN: usize = field::DST.end;
/// Upper bound on extension headers walked; a chain longer than this is treated as malformed
/// rather than walked at per-packet cost (RFC 8200 §4.1 lists at most 8 in practice; RFC 7112
/// asks that the whole chain fit in the first fragment).
pub const MAX_EXT_HEADERS: usize = 12;
/// Length of the Fragment header (RFC 8200 §4.5).
pub const FRAGMENT_HEADER_LEN: usize = 8;

view! {
    /// A read/write view of an IPv6 packet.
    pub struct Packet;
    fixed_len = HEADER_LEN;
}

/// What a Fragment header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragmentInfo {
    /// Offset of the Fragment header itself from the start of the packet.
    pub header_offset: usize,
    /// Fragment offset in bytes.
    pub offset: u16,
    pub more: bool,
    pub ident: u32,
}

impl FragmentInfo {
    /// An atomic fragment (offset 0, M clear, RFC 6946): the whole datagram, to be treated as
    /// unfragmented.
    pub fn is_atomic(&self) -> bool {
        self.offset == 0 && !self.more
    }
}

/// The result of walking the extension header chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtChain {
    /// The upper-layer protocol: the Next Header value that ended the walk (TCP, UDP, ICMPv6, ESP,
    /// No Next Header, ...).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the packet. For a non-first fragment it
    /// is where the fragment data starts (which is not a header).
    pub l4_offset: usize,
    /// The Fragment header, if the chain holds one.
    pub fragment: Option<FragmentInfo>,
    /// A Hop-by-Hop Options header is present.
    pub hop_by_hop: bool,
    /// Number of extension headers walked.
    pub count: usize,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap after checking the fixed header only: for the quoted packet inside an ICMPv6 error,
    /// whose payload is cut short (RFC 4443 §3.1). `payload()` is clamped to the buffer.
    pub fn new_checked_header(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        if p.b().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if p.version() != 6 {
            return Err(Error::Unsupported);
        }
        Ok(p)
    }

    /// Version 6 and the payload length inside the buffer. A longer buffer is fine (padding).
    pub fn check_len(&self) -> Result<()> {
        let len = self.b().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 6 {
            return Err(Error::Unsupported);
        }
        if self.total_len() > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.b()[0] >> 4
    }

    pub fn traffic_class(&self) -> u8 {
        let b = self.b();
        (b[0] << 4) | (b[1] >> 4)
    }

    pub fn dscp(&self) -> u8 {
        self.traffic_class() >> 2
    }

    pub fn ecn(&self) -> u8 {
        self.traffic_class() & 0x03
    }

    pub fn flow_label(&self) -> u32 {
        super::be32(self.b(), field::VER_TC_FLOW.start) & 0x000f_ffff
    }

    pub fn payload_len(&self) -> u16 {
        super::be16(self.b(), field::LENGTH.start)
    }

    /// Header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    pub fn next_header(&self) -> u8 {
        self.b()[field::NXT_HDR]
    }

    pub fn hop_limit(&self) -> u8 {
        self.b()[field::HOP_LIMIT]
    }

    pub fn src_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[field::SRC]);
        Ipv6Addr::from(a)
    }

    pub fn dst_addr(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.b()[field::DST]);
        Ipv6Addr::from(a)
    }

    /// Everything after the fixed header up to the payload length (clamped).
    pub fn payload(&self) -> &[u8] {
        super::clamp(self.b(), HEADER_LEN, self.total_len())
    }

    /// Walk Hop-by-Hop, Routing, Fragment, Destination Options and AH headers to the upper layer.
    ///
    /// Rules (RFC 8200 §4): Hop-by-Hop only directly after the fixed header; at most one Fragment
    /// header; every header inside the payload length; after a non-first fragment's Fragment
    /// header the walk stops (the rest is data). ESP and No Next Header end the walk. A Routing
    /// header of type 0 with segments left is refused (RFC 5095). Any violation is `Malformed`,
    /// running past the end `Truncated`.
    pub fn walk_extension_headers(&self) -> Result<ExtChain> {
        let data = self.b();
        let end = self.total_len().min(data.len());
        let mut nh = self.next_header();
        let mut off = HEADER_LEN;
        let mut chain = ExtChain {
            protocol: nh,
            l4_offset: off,
            fragment: None,
            hop_by_hop: false,
            count: 0,
        };
        loop {
            let hdr_len = match nh {
                ip_proto::HOP_BY_HOP | ip_proto::IPV6_ROUTING | ip_proto::IPV6_DEST_OPTS => {
                    if nh == ip_proto::HOP_BY_HOP {
                        if chain.count != 0 {
                            return Err(Error::Malformed);
                        }
                        chain.hop_by_hop = true;
                    }
                    let len_byte = *data
                        .get(off + 1)
                        .filter(|_| off + 2 <= end)
                        .ok_or(Error::Truncated)?;
                    let len = (usize::from(len_byte) + 1) * 8;
                    if nh == ip_proto::IPV6_ROUTING {
                        // Routing header: type at +2, segments left at +3 (inside the 8 bytes).
                        if off + 4 > end {
                            return Err(Error::Truncated);
                        }
                        if data[off + 2] == 0 && data[off + 3] != 0 {
                            return Err(Error::Unsupported);
                        }
                    }
                    len
                }
                ip_proto::AH => {
                    // RFC 4302 §2.2: Payload Len is in 4-byte words, minus 2.
                    let len_byte = *data
                        .get(off + 1)
                        .filter(|_| off + 2 <= end)
                        .ok_or(Error::Truncated)?;
                    (usize::from(len_byte) + 2) * 4
                }
                ip_proto::IPV6_FRAGMENT => {
                    if chain.fragment.is_some() {
                        return Err(Error::Malformed);
                    }
                    if off + FRAGMENT_HEADER_LEN > end {
                        return Err(Error::Truncated);
                    }
                    let off_flags = super::be16(data, off + 2);
                    let info = FragmentInfo {
                        header_offset: off,
                        offset: off_flags & 0xfff8,
                        more: off_flags & 1 != 0,
                        ident: super::be32(data, off + 4),
                    };
                    chain.fragment = Some(info);
                    if info.offset != 0 {
                        chain.count += 1;
                        chain.protocol = data[off];
                        chain.l4_offset = off + FRAGMENT_HEADER_LEN;
                        return Ok(chain);
                    }
                    FRAGMENT_HEADER_LEN
                }
                _ => {
                    chain.protocol = nh;
                    chain.l4_offset = off;
                    return Ok(chain);
                }
            };
            if off + hdr_len > end {
                return Err(Error::Truncated);
            }
            chain.count += 1;
            if chain.count > MAX_EXT_HEADERS {
                return Err(Error::Malformed);
            }
            nh = data[off];
            off += hdr_len;
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version(&mut self, v: u8) {
        let b = self.bm();
        b[0] = (b[0] & 0x0f) | (v << 4);
    }

    pub fn set_traffic_class(&mut self, tc: u8) {
        let b = self.bm();
        b[0] = (b[0] & 0xf0) | (tc >> 4);
        b[1] = (b[1] & 0x0f) | (tc << 4);
    }

    pub fn set_ecn(&mut self, ecn: u8) {
        let tc = (self.traffic_class() & 0xfc) | (ecn & 0x03);
        self.set_traffic_class(tc);
    }

    pub fn set_dscp(&mut self, dscp: u8) {
        let tc = (self.traffic_class() & 0x03) | (dscp << 2);
        self.set_traffic_class(tc);
    }

    pub fn set_flow_label(&mut self, label: u32) {
        let b = self.bm();
        b[1] = (b[1] & 0xf0) | ((label >> 16) as u8 & 0x0f);
        b[2] = (label >> 8) as u8;
        b[3] = label as u8;
    }

    pub fn set_payload_len(&mut self, len: u16) {
        self.bm()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    pub fn set_next_header(&mut self, nh: u8) {
        self.bm()[field::NXT_HDR] = nh;
    }

    pub fn set_hop_limit(&mut self, h: u8) {
        self.bm()[field::HOP_LIMIT] = h;
    }

    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.bm()[field::SRC].copy_from_slice(&a.octets());
    }

    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.bm()[field::DST].copy_from_slice(&a.octets());
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        super::clamp_mut(self.bm(), HEADER_LEN, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walk the extension headers of a packet that must pass `new_checked`.
    fn walk(v: &[u8]) -> Result<ExtChain> {
        Packet::new_checked(v).unwrap().walk_extension_headers()
    }

    fn base(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 40];
        v[0] = 0x60;
        v[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        v[6] = next;
        v[7] = 64;
        v[8..24].copy_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).octets());
        v[24..40].copy_from_slice(&Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn deconstruct_fixed_header() {
        // 6 | TC 0xb9 | flow 0x12345: 0x6b 0x91 0x23 0x45
        let mut v = base(ip_proto::UDP, &[0; 8]);
        v[0..4].copy_from_slice(&[0x6b, 0x91, 0x23, 0x45]);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0xb9);
        assert_eq!(p.dscp(), 0xb9 >> 2);
        assert_eq!(p.ecn(), 1);
        assert_eq!(p.flow_label(), 0x12345);
        assert_eq!(p.payload_len(), 8);
        assert_eq!(p.next_header(), ip_proto::UDP);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), "fd00::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn construct_fixed_header() {
        let mut v = [0u8; 40];
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.set_version(6);
        p.set_traffic_class(0xb9);
        p.set_flow_label(0x12345);
        p.set_payload_len(0);
        p.set_next_header(59);
        p.set_hop_limit(1);
        assert_eq!(&v[..4], &[0x6b, 0x91, 0x23, 0x45]);
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.set_ecn(3);
        p.set_dscp(0x2e);
        assert_eq!(Packet::new_checked(&v[..]).unwrap().traffic_class(), 0xbb);
    }

    #[test]
    fn impossible_lengths() {
        let v = base(ip_proto::UDP, &[0; 8]);
        assert_eq!(Packet::new_checked(&v[..39]).unwrap_err(), Error::Truncated);
        assert_eq!(Packet::new_checked(&v[..47]).unwrap_err(), Error::Truncated);
        let mut w = v.clone();
        w[0] = 0x40;
        assert_eq!(Packet::new_checked(&w[..]).unwrap_err(), Error::Unsupported);
    }

    #[test]
    fn walk_hbh_dest_frag_udp() {
        // HBH (8 bytes: next=60, len 0, PadN 4) -> DestOpts (8) -> Fragment(first, M) -> UDP.
        let mut pl = vec![ip_proto::IPV6_DEST_OPTS, 0, 1, 4, 0, 0, 0, 0];
        pl.extend_from_slice(&[ip_proto::IPV6_FRAGMENT, 0, 1, 4, 0, 0, 0, 0]);
        pl.extend_from_slice(&[ip_proto::UDP, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]);
        pl.extend_from_slice(&[0x13, 0x88, 0x00, 0x35, 0x00, 0x10, 0, 0]);
        let v = base(ip_proto::HOP_BY_HOP, &pl);
        let c = walk(&v).unwrap();
        assert_eq!(c.protocol, ip_proto::UDP);
        assert_eq!(c.l4_offset, 64);
        assert!(c.hop_by_hop);
        assert_eq!(c.count, 3);
        let f = c.fragment.unwrap();
        assert_eq!(
            (f.header_offset, f.offset, f.more, f.ident),
            (56, 0, true, 0xdeadbeef)
        );
    }

    #[test]
    fn walk_later_fragment_stops() {
        let pl = [ip_proto::TCP, 0, 0x05, 0xc8, 0, 0, 0, 7, 0xaa, 0xbb];
        let v = base(ip_proto::IPV6_FRAGMENT, &pl);
        let c = walk(&v).unwrap();
        assert_eq!(c.protocol, ip_proto::TCP);
        assert_eq!(c.l4_offset, 48);
        let f = c.fragment.unwrap();
        assert_eq!(f.offset, 0x05c8);
        assert!(!f.more);
        assert!(!f.is_atomic());
    }

    #[test]
    fn walk_ah_and_routing() {
        // Routing type 4 (SRH-like), len 0, segments left 0 -> AH (len 1 => 12 bytes) -> ICMPv6.
        let mut pl = vec![ip_proto::AH, 0, 4, 0, 0, 0, 0, 0];
        pl.extend_from_slice(&[ip_proto::ICMPV6, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        pl.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
        let v = base(ip_proto::IPV6_ROUTING, &pl);
        let c = walk(&v).unwrap();
        assert_eq!(
            (c.protocol, c.l4_offset, c.count),
            (ip_proto::ICMPV6, 60, 2)
        );
        // Routing type 0 with segments left is refused (RFC 5095).
        let mut w = v.clone();
        w[42] = 0;
        w[43] = 1;
        assert_eq!(walk(&w), Err(Error::Unsupported));
    }

    #[test]
    fn walk_rejects_bad_chains() {
        // HBH after another header.
        let pl = [
            ip_proto::HOP_BY_HOP,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            ip_proto::UDP,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let v = base(ip_proto::IPV6_DEST_OPTS, &pl);
        assert_eq!(walk(&v), Err(Error::Malformed));
        // Header length past the payload.
        let v = base(
            ip_proto::IPV6_DEST_OPTS,
            &[ip_proto::UDP, 1, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(walk(&v), Err(Error::Truncated));
        // No room for even the next-header byte.
        let v = base(ip_proto::IPV6_DEST_OPTS, &[]);
        assert_eq!(walk(&v), Err(Error::Truncated));
        let v = base(ip_proto::IPV6_FRAGMENT, &[ip_proto::UDP, 0, 0, 0]);
        assert_eq!(walk(&v), Err(Error::Truncated));
        // Two fragment headers.
        let pl = [44, 0, 0, 1, 0, 0, 0, 1, 17, 0, 0, 1, 0, 0, 0, 1];
        let v = base(ip_proto::IPV6_FRAGMENT, &pl);
        assert_eq!(walk(&v), Err(Error::Malformed));
        // A chain of 13 destination-options headers.
        let mut pl = Vec::new();
        for _ in 0..13 {
            pl.extend_from_slice(&[ip_proto::IPV6_DEST_OPTS, 0, 1, 4, 0, 0, 0, 0]);
        }
        let v = base(ip_proto::IPV6_DEST_OPTS, &pl);
        assert_eq!(walk(&v), Err(Error::Malformed));
    }

    #[test]
    fn no_next_header_and_esp_end_walk() {
        let v = base(ip_proto::IPV6_NO_NEXT, &[]);
        let c = walk(&v).unwrap();
        assert_eq!((c.protocol, c.l4_offset), (ip_proto::IPV6_NO_NEXT, 40));
        let v = base(ip_proto::ESP, &[0; 16]);
        assert_eq!(walk(&v).unwrap().protocol, ip_proto::ESP);
    }
}
