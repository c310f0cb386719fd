//! IPv4 (RFC 791), with options and fragments.
//!
//! Panic rules: see [`crate::wire`]. [`Packet::new_checked`] proves version 4, `IHL >= 5`, the
//! header inside the buffer, and `header_len <= total_len <= buffer length`; afterwards no getter
//! panics. [`Packet::new_checked_header`] is the weaker check for the truncated copy of an IPv4
//! packet that an ICMP error carries: the total length may exceed the buffer and `payload()` is
//! clamped to what is there.

use core::net::Ipv4Addr;

use super::{checksum, Error, Field, Result};

mod field {
    use super::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLG_OFF: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC: Field = 12..16;
    pub const DST: Field = 16..20;
}

/// Length of a header without options.
pub const HEADER_LEN: usize = field::DST.end;
/// Largest header: IHL 15.
pub const MAX_HEADER_LEN: usize = 60;

const FLAG_RESERVED: u16 = 0x8000;
const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// Option kinds with a meaning for the walker (RFC 791 §3.1).
pub mod option {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const RECORD_ROUTE: u8 = 7;
    pub const ROUTER_ALERT: u8 = 148;
}

view! {
    /// A read/write view of an IPv4 packet.
    pub struct Packet;
    fixed_len = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap after checking the header only: for the IPv4 header quoted inside an ICMP error,
    /// whose payload is cut short (RFC 792: "Internet Header + 64 bits of Original Data").
    pub fn new_checked_header(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_header()?;
        if usize::from(p.total_len()) < p.header_len() {
            return Err(Error::Malformed);
        }
        Ok(p)
    }

    fn check_header(&self) -> Result<()> {
        let len = self.b().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Error::Unsupported);
        }
        if self.header_len() < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if self.header_len() > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    /// Version 4, IHL at least 5, header and total length inside the buffer, total length not
    /// shorter than the header. A buffer longer than the total length is fine (link padding):
    /// [`Packet::payload`] stops at the total length.
    pub fn check_len(&self) -> Result<()> {
        self.check_header()?;
        let total = usize::from(self.total_len());
        if total < self.header_len() {
            return Err(Error::Malformed);
        }
        if total > self.b().len() {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.b()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn dscp(&self) -> u8 {
        self.b()[field::DSCP_ECN] >> 2
    }

    pub fn ecn(&self) -> u8 {
        self.b()[field::DSCP_ECN] & 0x03
    }

    /// The whole TOS byte: DSCP << 2 | ECN.
    pub fn tos(&self) -> u8 {
        self.b()[field::DSCP_ECN]
    }

    pub fn total_len(&self) -> u16 {
        super::be16(self.b(), field::LENGTH.start)
    }

    pub fn ident(&self) -> u16 {
        super::be16(self.b(), field::IDENT.start)
    }

    fn flg_off(&self) -> u16 {
        super::be16(self.b(), field::FLG_OFF.start)
    }

    /// The reserved flag bit (RFC 791: must be zero; RFC 3514 aside).
    pub fn reserved_flag(&self) -> bool {
        self.flg_off() & FLAG_RESERVED != 0
    }

    pub fn dont_frag(&self) -> bool {
        self.flg_off() & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        self.flg_off() & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field counts 8-byte units).
    pub fn frag_offset(&self) -> u16 {
        (self.flg_off() & OFFSET_MASK) << 3
    }

    /// Part of a fragmented datagram: MF set or a non-zero offset (RFC 791 §3.2).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// The fragment that carries the transport header.
    pub fn is_first_fragment(&self) -> bool {
        self.more_frags() && self.frag_offset() == 0
    }

    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        super::be16(self.b(), field::CHECKSUM.start)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.b()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.b()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// The header bytes (clamped to the buffer).
    pub fn header(&self) -> &[u8] {
        super::clamp(self.b(), 0, self.header_len())
    }

    /// The raw option bytes between the fixed header and the payload.
    pub fn options(&self) -> &[u8] {
        super::clamp(self.b(), HEADER_LEN, self.header_len())
    }

    /// Walk the options.
    pub fn options_iter(&self) -> OptionsIter<'_> {
        OptionsIter {
            data: self.options(),
        }
    }

    /// Every option is well formed: a kind, and unless END/NOP a length byte `>= 2` that stays
    /// inside the options area. Linux drops such packets too (`__ip_options_compile`).
    pub fn check_options(&self) -> Result<()> {
        self.options_iter().try_for_each(|o| o.map(|_| ()))
    }

    /// Payload: from the end of the header to the total length, clamped to the buffer.
    pub fn payload(&self) -> &[u8] {
        super::clamp(self.b(), self.header_len(), usize::from(self.total_len()))
    }

    /// The header checksum verifies (the sum over the header, checksum included, is all ones).
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.header()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_version(&mut self, v: u8) {
        let b = self.bm();
        b[field::VER_IHL] = (b[field::VER_IHL] & 0x0f) | (v << 4);
    }

    /// Set the header length in bytes (rounded down to 4; IHL is 4 bits).
    pub fn set_header_len(&mut self, len: usize) {
        let ihl = ((len / 4) & 0x0f) as u8;
        let b = self.bm();
        b[field::VER_IHL] = (b[field::VER_IHL] & 0xf0) | ihl;
    }

    pub fn set_dscp(&mut self, dscp: u8) {
        let b = self.bm();
        b[field::DSCP_ECN] = (b[field::DSCP_ECN] & 0x03) | (dscp << 2);
    }

    pub fn set_ecn(&mut self, ecn: u8) {
        let b = self.bm();
        b[field::DSCP_ECN] = (b[field::DSCP_ECN] & 0xfc) | (ecn & 0x03);
    }

    pub fn set_tos(&mut self, tos: u8) {
        self.bm()[field::DSCP_ECN] = tos;
    }

    pub fn set_total_len(&mut self, len: u16) {
        self.bm()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    pub fn set_ident(&mut self, id: u16) {
        self.bm()[field::IDENT].copy_from_slice(&id.to_be_bytes());
    }

    fn set_flg_off(&mut self, v: u16) {
        self.bm()[field::FLG_OFF].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_dont_frag(&mut self, on: bool) {
        let v = self.flg_off();
        self.set_flg_off(if on { v | FLAG_DF } else { v & !FLAG_DF });
    }

    pub fn set_more_frags(&mut self, on: bool) {
        let v = self.flg_off();
        self.set_flg_off(if on { v | FLAG_MF } else { v & !FLAG_MF });
    }

    /// Set the fragment offset in bytes (must be a multiple of 8; the low 3 bits are dropped).
    pub fn set_frag_offset(&mut self, bytes: u16) {
        let v = self.flg_off();
        self.set_flg_off((v & !OFFSET_MASK) | ((bytes >> 3) & OFFSET_MASK));
    }

    /// Clear all flags and the offset: an unfragmented packet that may be fragmented.
    pub fn clear_flags(&mut self) {
        self.set_flg_off(0);
    }

    pub fn set_ttl(&mut self, ttl: u8) {
        self.bm()[field::TTL] = ttl;
    }

    pub fn set_protocol(&mut self, p: u8) {
        self.bm()[field::PROTOCOL] = p;
    }

    pub fn set_checksum(&mut self, c: u16) {
        self.bm()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.bm()[field::SRC].copy_from_slice(&a.octets());
    }

    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.bm()[field::DST].copy_from_slice(&a.octets());
    }

    /// Recompute the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.header());
        self.set_checksum(c);
    }

    /// Rewrite the TOS byte, fixing the header checksum incrementally (RFC 1624).
    pub fn rewrite_tos(&mut self, tos: u8) {
        let b = self.b();
        let old = u16::from_be_bytes([b[0], b[1]]);
        let new = u16::from_be_bytes([b[0], tos]);
        let c = checksum::update16(self.checksum(), old, new);
        self.set_tos(tos);
        self.set_checksum(c);
    }

    /// Rewrite the source address, fixing the header checksum incrementally. Transport checksums
    /// that cover the pseudo-header are the caller's job.
    pub fn rewrite_src_addr(&mut self, a: Ipv4Addr) {
        let old = u32::from(self.src_addr());
        let c = checksum::update32(self.checksum(), old, u32::from(a));
        self.set_src_addr(a);
        self.set_checksum(c);
    }

    /// Rewrite the destination address, fixing the header checksum incrementally.
    pub fn rewrite_dst_addr(&mut self, a: Ipv4Addr) {
        let old = u32::from(self.dst_addr());
        let c = checksum::update32(self.checksum(), old, u32::from(a));
        self.set_dst_addr(a);
        self.set_checksum(c);
    }

    /// Decrement the TTL by one with an incremental checksum fix (RFC 1812 §5.3.1 allows it).
    /// Returns the new TTL; a TTL already 0 stays 0.
    pub fn decrement_ttl(&mut self) -> u8 {
        let b = self.b();
        let (ttl, proto) = (b[field::TTL], b[field::PROTOCOL]);
        let new_ttl = ttl.saturating_sub(1);
        let c = checksum::update16(
            self.checksum(),
            u16::from_be_bytes([ttl, proto]),
            u16::from_be_bytes([new_ttl, proto]),
        );
        self.set_ttl(new_ttl);
        self.set_checksum(c);
        new_ttl
    }

    /// Mutable payload (header end to total length, clamped).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len(), usize::from(self.total_len()));
        super::clamp_mut(self.bm(), start, end)
    }
}

/// One IPv4 option: its kind and the bytes after the kind and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Option<'a> {
    pub kind: u8,
    pub data: &'a [u8],
}

impl Ipv4Option<'_> {
    /// The copied flag (RFC 791): the option is repeated in every fragment.
    pub fn copied(&self) -> bool {
        self.kind & 0x80 != 0
    }
}

/// Iterator over IPv4 options; yields `Err(Malformed)` once and stops on a bad length.
/// END stops the walk; NOP is skipped.
#[derive(Debug, Clone)]
pub struct OptionsIter<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for OptionsIter<'a> {
    type Item = Result<Ipv4Option<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (&kind, rest) = self.data.split_first()?;
            match kind {
                option::END => {
                    self.data = &[];
                    return None;
                }
                option::NOP => {
                    self.data = rest;
                    continue;
                }
                _ => {
                    let len = rest.first().map(|&l| usize::from(l));
                    match len {
                        Some(len) if len >= 2 && len <= self.data.len() => {
                            let opt = Ipv4Option {
                                kind,
                                data: &self.data[2..len],
                            };
                            self.data = &self.data[len..];
                            return Some(Ok(opt));
                        }
                        _ => {
                            self.data = &[];
                            return Some(Err(Error::Malformed));
                        }
                    }
                }
            }
        }
    }
}

/// The parts of a plain IPv4 header that podrouter writes (no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub payload_len: usize,
    pub ttl: u8,
    pub tos: u8,
    pub ident: u16,
    pub dont_frag: bool,
}

impl Repr {
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }

    /// Read a checked packet back into a `Repr` (options are ignored, their length is not).
    pub fn parse<T: AsRef<[u8]>>(p: &Packet<T>) -> Self {
        Repr {
            src: p.src_addr(),
            dst: p.dst_addr(),
            protocol: p.protocol(),
            payload_len: usize::from(p.total_len()).saturating_sub(p.header_len()),
            ttl: p.ttl(),
            tos: p.tos(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
        }
    }

    /// Write a 20-byte header (with checksum) at the start of `p`. The caller guarantees the buffer
    /// holds at least [`HEADER_LEN`] bytes and that `payload_len + 20` fits in 16 bits; a larger
    /// payload length is an error rather than a silently wrapped total length.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Packet<T>) -> Result<()> {
        if p.b().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let total = u16::try_from(self.buffer_len()).map_err(|_| Error::Malformed)?;
        p.bm()[..HEADER_LEN].fill(0);
        p.set_version(4);
        p.set_header_len(HEADER_LEN);
        p.set_tos(self.tos);
        p.set_total_len(total);
        p.set_ident(self.ident);
        p.set_dont_frag(self.dont_frag);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src);
        p.set_dst_addr(self.dst);
        p.fill_checksum();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ip_proto;

    // 192.168.0.1 -> 192.168.0.199 UDP, total length 0x73 (captured header), plus a payload stub.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn packet() -> Vec<u8> {
        let mut v = HDR.to_vec();
        v.resize(0x73, 0xaa);
        v
    }

    #[test]
    fn deconstruct() {
        let v = packet();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.dscp(), 0);
        assert_eq!(p.ecn(), 0);
        assert_eq!(p.total_len(), 0x73);
        assert_eq!(p.ident(), 0);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert!(!p.is_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), ip_proto::UDP);
        assert_eq!(p.checksum(), 0xb861);
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 0, 199));
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 0x73 - 20);
        assert!(p.options().is_empty());
        assert_eq!(p.check_options(), Ok(()));
    }

    #[test]
    fn construct_with_repr() {
        let repr = Repr {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: ip_proto::UDP,
            payload_len: 0x73 - 20,
            ttl: 64,
            tos: 0,
            ident: 0,
            dont_frag: true,
        };
        let mut v = [0xffu8; 0x73];
        repr.emit(&mut Packet::new_unchecked(&mut v[..])).unwrap();
        assert_eq!(&v[..20], &HDR);
        assert_eq!(Repr::parse(&Packet::new_checked(&v[..]).unwrap()), repr);
    }

    #[test]
    fn emit_rejects_oversized_payload() {
        let repr = Repr {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            protocol: 0,
            payload_len: 65516,
            ttl: 1,
            tos: 0,
            ident: 0,
            dont_frag: false,
        };
        let mut v = [0u8; 20];
        assert_eq!(
            repr.emit(&mut Packet::new_unchecked(&mut v[..])),
            Err(Error::Malformed)
        );
        let mut short = [0u8; 19];
        assert_eq!(
            repr.emit(&mut Packet::new_unchecked(&mut short[..])),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn impossible_lengths() {
        let v = packet();
        assert_eq!(Packet::new_checked(&v[..19]).unwrap_err(), Error::Truncated);
        // total length says 0x73, buffer shorter
        assert_eq!(
            Packet::new_checked(&v[..0x72]).unwrap_err(),
            Error::Truncated
        );
        let mut w = v.clone();
        w[0] = 0x44; // IHL 4
        assert_eq!(Packet::new_checked(&w[..]).unwrap_err(), Error::Malformed);
        w[0] = 0x4f; // IHL 15 = 60 bytes > total length 0x73? no: 60 < 115, fine; shrink total
        w[2] = 0;
        w[3] = 40;
        assert_eq!(Packet::new_checked(&w[..]).unwrap_err(), Error::Malformed);
        w[0] = 0x65;
        assert_eq!(Packet::new_checked(&w[..]).unwrap_err(), Error::Unsupported);
        // IHL 15 in a 40-byte buffer: header runs past the end.
        let mut x = v[..40].to_vec();
        x[0] = 0x4f;
        assert_eq!(Packet::new_checked(&x[..]).unwrap_err(), Error::Truncated);
        // Longer buffer than total length (Ethernet padding) is fine; payload stops at total length.
        let mut y = v.clone();
        y.extend_from_slice(&[0; 6]);
        assert_eq!(
            Packet::new_checked(&y[..]).unwrap().payload().len(),
            0x73 - 20
        );
    }

    #[test]
    fn header_only_check_for_icmp_quotes() {
        let v = packet();
        let p = Packet::new_checked_header(&v[..28]).unwrap();
        assert_eq!(p.payload().len(), 8);
        assert_eq!(Packet::new_checked(&v[..28]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn fragments() {
        let mut v = packet();
        // MF, offset 0: first fragment.
        v[6] = 0x20;
        v[7] = 0x00;
        let p = Packet::new_checked(&v[..]).unwrap();
        assert!(p.is_fragment() && p.is_first_fragment() && !p.dont_frag());
        // offset 185 * 8 = 1480, MF clear: last fragment.
        v[6] = 0x00;
        v[7] = 185;
        let p = Packet::new_checked(&v[..]).unwrap();
        assert!(p.is_fragment() && !p.is_first_fragment());
        assert_eq!(p.frag_offset(), 1480);
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.clear_flags();
        p.set_more_frags(true);
        p.set_frag_offset(2960);
        assert_eq!((v[6], v[7]), (0x20 | (370 >> 8) as u8, (370 & 0xff) as u8));
    }

    #[test]
    fn options_walk() {
        // IHL 7: NOP, Router Alert (148, len 4, value 0), NOP, NOP, END... padded to 8 bytes.
        let mut v = vec![
            0x47, 0, 0, 28, 0, 0, 0, 0, 1, 2, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        v.extend_from_slice(&[1, 148, 4, 0, 0, 1, 0, 0]);
        let p = Packet::new_checked(&v[..]).unwrap();
        let opts: Vec<_> = p.options_iter().collect();
        assert_eq!(
            opts,
            vec![Ok(Ipv4Option {
                kind: 148,
                data: &[0, 0]
            })]
        );
        assert!(opts[0].unwrap().copied());
        // Length byte 9 runs past the options area.
        v[22] = 9;
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.check_options(), Err(Error::Malformed));
        // Length 1 is below the minimum.
        v[22] = 1;
        assert_eq!(
            Packet::new_checked(&v[..]).unwrap().check_options(),
            Err(Error::Malformed)
        );
        // Kind without a length byte at the very end.
        v[21..28].copy_from_slice(&[1, 1, 1, 1, 1, 1, 7]);
        assert_eq!(
            Packet::new_checked(&v[..]).unwrap().check_options(),
            Err(Error::Malformed)
        );
    }

    #[test]
    fn incremental_rewrites_keep_checksum_valid() {
        let mut v = packet();
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.rewrite_src_addr(Ipv4Addr::new(172, 16, 2, 2));
        p.rewrite_dst_addr(Ipv4Addr::new(203, 0, 113, 9));
        p.rewrite_tos(0xb8 | 0x03);
        assert_eq!(p.decrement_ttl(), 63);
        assert!(p.verify_checksum());
        let c = p.checksum();
        p.fill_checksum();
        assert_eq!(p.checksum(), c);
    }

    #[test]
    fn setters_never_make_getters_panic() {
        let mut v = packet();
        let mut p = Packet::new_checked(&mut v[..]).unwrap();
        p.set_header_len(60);
        p.set_total_len(0xffff);
        assert_eq!(p.payload().len(), 0x73 - 60);
        assert_eq!(p.options().len(), 40);
        p.set_header_len(0);
        assert_eq!(p.options().len(), 0);
        let _ = p.verify_checksum();
        let _ = p.payload_mut();
    }
}
