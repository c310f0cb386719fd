//! ICMP for IPv4 (RFC 792): echo and the error messages that quote an IPv4 header.
//!
//! Panic rules: see [`crate::wire`]. [`Packet::new_checked`] proves the 8-byte header; afterwards
//! no getter panics. The quoted packet of an error is reached through
//! [`Packet::embedded_ipv4`], which checks the quoted header before handing out a view.

use super::{checksum, ipv4, Error, Field, Result};

mod field {
    use super::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    /// Destination unreachable / fragmentation needed (RFC 1191): next-hop MTU.
    pub const NEXT_HOP_MTU: Field = 6..8;
    pub const DATA: usize = 8;
}

pub const HEADER_LEN: usize = field::DATA;

pub mod msg_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const SOURCE_QUENCH: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAM_PROBLEM: u8 = 12;

    /// Messages that quote the offending datagram after the 8-byte header (RFC 792, RFC 1812
    /// §4.3.2.3); NAT must translate the quote too (RFC 5508 §7).
    pub const fn is_error(t: u8) -> bool {
        matches!(
            t,
            DEST_UNREACHABLE | SOURCE_QUENCH | REDIRECT | TIME_EXCEEDED | PARAM_PROBLEM
        )
    }
}

/// Destination-unreachable codes used by podrouter.
pub mod unreachable_code {
    pub const NET: u8 = 0;
    pub const HOST: u8 = 1;
    pub const PORT: u8 = 3;
    pub const FRAG_NEEDED: u8 = 4;
    pub const ADMIN_PROHIBITED: u8 = 13;
}

icmp_view! {
    /// A read/write view of an ICMPv4 message.
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Next-hop MTU of a "fragmentation needed" message (RFC 1191 §4).
    pub fn next_hop_mtu(&self) -> u16 {
        super::be16(self.b(), field::NEXT_HOP_MTU.start)
    }

    /// The quoted IPv4 packet of an error message, checked with
    /// [`ipv4::Packet::new_checked_header`]. `Unsupported` for a non-error message.
    pub fn embedded_ipv4(&self) -> Result<ipv4::Packet<&[u8]>> {
        if !self.is_error() {
            return Err(Error::Unsupported);
        }
        ipv4::Packet::new_checked_header(self.data())
    }

    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.b()) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_next_hop_mtu(&mut self, v: u16) {
        self.bm()[field::NEXT_HOP_MTU].copy_from_slice(&v.to_be_bytes());
    }

    /// Compute the checksum over the whole buffer (ICMPv4 has no pseudo-header).
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.b());
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    // Echo request from `ping` (id 0x1a2b, seq 1) with the 8-byte payload "abcdefgh".
    fn echo() -> Vec<u8> {
        let mut v = vec![8, 0, 0, 0, 0x1a, 0x2b, 0x00, 0x01];
        v.extend_from_slice(b"abcdefgh");
        Packet::new_unchecked(&mut v[..]).fill_checksum();
        v
    }

    #[test]
    fn deconstruct_echo() {
        let v = echo();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.msg_type(), msg_type::ECHO_REQUEST);
        assert_eq!(p.code(), 0);
        assert!(p.is_echo() && !p.is_error());
        assert_eq!(p.echo_ident(), 0x1a2b);
        assert_eq!(p.echo_seq_no(), 1);
        assert_eq!(p.data(), b"abcdefgh");
        assert!(p.verify_checksum());
        assert_eq!(p.embedded_ipv4().unwrap_err(), Error::Unsupported);
        // checksum by hand: 0800 0000 1a2b 0001 6162 6364 6566 6768
        let s: u64 = 0x0800 + 0x1a2b + 0x0001 + 0x6162 + 0x6364 + 0x6566 + 0x6768;
        assert_eq!(p.checksum(), !checksum::fold(s));
    }

    #[test]
    fn construct_echo_reply() {
        let mut v = echo();
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.set_msg_type(msg_type::ECHO_REPLY);
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(v[0], 0);
    }

    #[test]
    fn error_with_quote() {
        // Port unreachable quoting a UDP datagram 10.244.1.1:5000 -> 10.244.2.1:53.
        let mut quoted = vec![
            0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 244, 1, 1, 10, 244, 2, 1, 0x13, 0x88,
            0, 53, 0, 20, 0, 0,
        ];
        ipv4::Packet::new_unchecked(&mut quoted[..]).fill_checksum();
        let mut v = vec![3, 3, 0, 0, 0, 0, 0, 0];
        v.extend_from_slice(&quoted);
        Packet::new_unchecked(&mut v[..]).fill_checksum();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert!(p.is_error());
        let q = p.embedded_ipv4().unwrap();
        assert_eq!(q.src_addr(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(q.dst_addr(), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(q.protocol(), 17);
        assert_eq!(q.total_len(), 40);
        assert_eq!(q.payload(), &quoted[20..28]);
        // Quote cut inside the IP header.
        let p = Packet::new_checked(&v[..8 + 19]).unwrap();
        assert_eq!(p.embedded_ipv4().unwrap_err(), Error::Truncated);
    }

    #[test]
    fn frag_needed_mtu() {
        let mut v = [0u8; 8];
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.set_msg_type(msg_type::DEST_UNREACHABLE);
        p.set_code(unreachable_code::FRAG_NEEDED);
        p.set_next_hop_mtu(1450);
        assert_eq!(Packet::new_checked(&v[..]).unwrap().next_hop_mtu(), 1450);
    }

    #[test]
    fn impossible_len() {
        assert_eq!(
            Packet::new_checked(&[8u8, 0, 0, 0, 0, 0, 0][..]).unwrap_err(),
            Error::Truncated
        );
        assert!(Packet::new_checked(&[8u8, 0, 0, 0, 0, 0, 0, 0][..])
            .unwrap()
            .data()
            .is_empty());
    }
}
