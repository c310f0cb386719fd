//! ICMPv6 (RFC 4443): echo, errors quoting an IPv6 header, and the checksum over the IPv6
//! pseudo-header.
//!
//! Panic rules: see [`crate::wire`]. [`Packet::new_checked`] proves the 8-byte header (4 bytes of
//! type/code/checksum plus the 4-byte message body every message defined here carries);
//! afterwards no getter panics.

use core::net::Ipv6Addr;

use super::{checksum, ip_proto, ipv6, Error, Field, Result};

mod field {
    use super::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    /// Packet Too Big: MTU (RFC 4443 §3.2). Parameter Problem: pointer (§3.4).
    pub const MTU: Field = 4..8;
    pub const DATA: usize = 8;
}

pub const HEADER_LEN: usize = field::DATA;

pub mod msg_type {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAM_PROBLEM: u8 = 4;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    pub const ROUTER_SOLICIT: u8 = 133;
    pub const ROUTER_ADVERT: u8 = 134;
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    pub const NEIGHBOR_ADVERT: u8 = 136;

    /// RFC 4443 §2.1: types 0-127 are errors; the ones defined quote the offending packet.
    pub const fn is_error(t: u8) -> bool {
        matches!(
            t,
            DEST_UNREACHABLE | PACKET_TOO_BIG | TIME_EXCEEDED | PARAM_PROBLEM
        )
    }
}

icmp_view! {
    /// A read/write view of an ICMPv6 message.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// The MTU of a Packet Too Big message.
    pub fn mtu(&self) -> u32 {
        super::be32(self.b(), field::MTU.start)
    }

    /// The quoted IPv6 packet of an error message (fixed header checked; payload clamped).
    pub fn embedded_ipv6(&self) -> Result<ipv6::Packet<&[u8]>> {
        if !self.is_error() {
            return Err(Error::Unsupported);
        }
        ipv6::Packet::new_checked_header(self.data())
    }

    /// Verify the checksum over the IPv6 pseudo-header and the whole message (RFC 4443 §2.3).
    pub fn verify_checksum(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        let b = self.b();
        let ph = checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, b.len() as u32);
        checksum::combine(&[ph, checksum::data(b)]) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_mtu(&mut self, v: u32) {
        self.bm()[field::MTU].copy_from_slice(&v.to_be_bytes());
    }

    pub fn fill_checksum(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        self.set_checksum(0);
        let b = self.b();
        let ph = checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, b.len() as u32);
        let c = !checksum::combine(&[ph, checksum::data(b)]);
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (Ipv6Addr, Ipv6Addr) {
        ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
    }

    #[test]
    fn echo_roundtrip() {
        let (s, d) = addrs();
        let mut v = vec![128, 0, 0, 0, 0x12, 0x34, 0, 7, 0xde, 0xad];
        Packet::new_unchecked(&mut v[..]).fill_checksum(s, d);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert!(p.is_echo() && !p.is_error());
        assert_eq!((p.echo_ident(), p.echo_seq_no()), (0x1234, 7));
        assert_eq!(p.data(), &[0xde, 0xad]);
        assert!(p.verify_checksum(s, d));
        assert!(!p.verify_checksum(s, "fd00::3".parse().unwrap()));
        // by hand: pseudo (addresses, len 10, nh 58) + message words
        let sum: u64 = 0xfd00 + 1 + 0xfd00 + 2 + 10 + 58 + 0x8000 + 0x1234 + 7 + 0xdead;
        assert_eq!(p.checksum(), !checksum::fold(sum));
    }

    #[test]
    fn packet_too_big_quote() {
        let (s, d) = addrs();
        let mut quoted = vec![0x60, 0, 0, 0, 0x05, 0xdc, 17, 64];
        quoted.extend_from_slice(&s.octets());
        quoted.extend_from_slice(&d.octets());
        quoted.extend_from_slice(&[0x13, 0x88, 0, 53]);
        let mut v = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
        v.extend_from_slice(&quoted);
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.mtu(), 1280);
        let q = p.embedded_ipv6().unwrap();
        assert_eq!(q.src_addr(), s);
        assert_eq!(q.payload_len(), 1500);
        assert_eq!(q.payload(), &[0x13, 0x88, 0, 53]);
        assert_eq!(
            Packet::new_checked(&v[..47])
                .unwrap()
                .embedded_ipv6()
                .unwrap_err(),
            Error::Truncated
        );
    }

    #[test]
    fn impossible_len() {
        assert_eq!(
            Packet::new_checked(&[128u8, 0, 0, 0][..]).unwrap_err(),
            Error::Truncated
        );
    }
}
