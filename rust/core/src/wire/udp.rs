//! UDP (RFC 768).
//!
//! Panic rules: see [`crate::wire`]. [`Packet::new_checked`] proves `8 <= length <= buffer`;
//! afterwards no getter panics.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{checksum, ip_proto, Error, Field, Result};

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

pub const HEADER_LEN: usize = field::CHECKSUM.end;

view! {
    /// A read/write view of a UDP datagram.
    pub struct Packet;
    fixed_len = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// The header is there and the length field covers it and stays inside the buffer. As Linux
    /// does (`__udp4_lib_rcv`), a buffer longer than the length field is accepted and
    /// [`Packet::payload`] stops at the length.
    pub fn check_len(&self) -> Result<()> {
        let len = self.b().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let l = usize::from(self.len());
        if l < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if l > len {
            return Err(Error::Truncated);
        }
        Ok(())
    }

    pub fn src_port(&self) -> u16 {
        super::be16(self.b(), field::SRC_PORT.start)
    }

    pub fn dst_port(&self) -> u16 {
        super::be16(self.b(), field::DST_PORT.start)
    }

    /// The length field: header plus payload.
    pub fn len(&self) -> u16 {
        super::be16(self.b(), field::LENGTH.start)
    }

    /// A length field below the header size.
    pub fn is_empty(&self) -> bool {
        usize::from(self.len()) <= HEADER_LEN
    }

    pub fn checksum(&self) -> u16 {
        super::be16(self.b(), field::CHECKSUM.start)
    }

    /// The datagram (header + payload) as far as the length field says, clamped to the buffer.
    pub fn datagram(&self) -> &[u8] {
        super::clamp(self.b(), 0, usize::from(self.len()))
    }

    pub fn payload(&self) -> &[u8] {
        super::clamp(self.b(), HEADER_LEN, usize::from(self.len()))
    }

    /// The sum of pseudo-header and datagram.
    fn sum(&self, src: IpAddr, dst: IpAddr) -> u16 {
        let d = self.datagram();
        let ph = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d4)) => {
                checksum::pseudo_header_v4(s, d4, ip_proto::UDP, d.len() as u16)
            }
            (IpAddr::V6(s), IpAddr::V6(d6)) => {
                checksum::pseudo_header_v6(s, d6, ip_proto::UDP, d.len() as u32)
            }
            (s, d) => {
                let (s, d) = (to_v6(s), to_v6(d));
                checksum::pseudo_header_v6(s, d, ip_proto::UDP, self.datagram().len() as u32)
            }
        };
        checksum::combine(&[ph, checksum::data(d)])
    }

    /// Verify the checksum. Over IPv4 a zero checksum means "not computed" and passes (RFC 768);
    /// over IPv6 zero is invalid (RFC 8200 §8.1) — tunnel receivers that allow it (RFC 6935) check
    /// for zero themselves.
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        if self.checksum() == 0 {
            return src.is_ipv4();
        }
        self.sum(src, dst) == 0xffff
    }
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, p: u16) {
        self.bm()[field::SRC_PORT].copy_from_slice(&p.to_be_bytes());
    }

    pub fn set_dst_port(&mut self, p: u16) {
        self.bm()[field::DST_PORT].copy_from_slice(&p.to_be_bytes());
    }

    pub fn set_len(&mut self, l: u16) {
        self.bm()[field::LENGTH].copy_from_slice(&l.to_be_bytes());
    }

    pub fn set_checksum(&mut self, c: u16) {
        self.bm()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    /// Compute and write the checksum. A computed zero is sent as 0xffff (RFC 768), so the result
    /// is never the "no checksum" value.
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        self.set_checksum(0);
        let c = match !self.sum(src, dst) {
            0 => 0xffff,
            c => c,
        };
        self.set_checksum(c);
    }

    /// [`Packet::fill_checksum`] for IPv4 endpoints.
    pub fn fill_checksum_v4(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.fill_checksum(IpAddr::V4(src), IpAddr::V4(dst));
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        super::clamp_mut(self.bm(), HEADER_LEN, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // DNS query 10.0.0.2:54321 -> 10.0.0.1:53, "example.com A", checksum from the capture.
    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn dgram() -> Vec<u8> {
        let mut v = vec![
            0xd4, 0x31, 0x00, 0x35, 0x00, 0x0c, 0x00, 0x00, 0x12, 0x34, 0x01, 0x00,
        ];
        Packet::new_unchecked(&mut v[..]).fill_checksum_v4(SRC, DST);
        v
    }

    #[test]
    fn deconstruct() {
        let v = dgram();
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.src_port(), 54321);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.len(), 12);
        assert_eq!(p.payload(), &[0x12, 0x34, 0x01, 0x00]);
        assert!(p.verify_checksum(SRC.into(), DST.into()));
        assert!(!p.verify_checksum(DST.into(), DST.into()));
    }

    #[test]
    fn checksum_by_hand() {
        // pseudo: 0a00 0002 0a00 0001 0011 000c ; udp: d431 0035 000c 0000 1234 0100
        let sum: u64 = 0x0a00
            + 0x0002
            + 0x0a00
            + 0x0001
            + 0x0011
            + 0x000c
            + 0xd431
            + 0x0035
            + 0x000c
            + 0x1234
            + 0x0100;
        let expect = !checksum::fold(sum);
        assert_eq!(
            Packet::new_checked(&dgram()[..]).unwrap().checksum(),
            expect
        );
    }

    #[test]
    fn construct() {
        let mut v = vec![0u8; 12];
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.set_src_port(54321);
        p.set_dst_port(53);
        p.set_len(12);
        p.payload_mut().copy_from_slice(&[0x12, 0x34, 0x01, 0x00]);
        p.fill_checksum_v4(SRC, DST);
        assert_eq!(v, dgram());
    }

    #[test]
    fn zero_checksum_rules() {
        let mut v = dgram();
        v[6] = 0;
        v[7] = 0;
        let p = Packet::new_checked(&v[..]).unwrap();
        assert!(p.verify_checksum(SRC.into(), DST.into()));
        let a6: IpAddr = "fd00::1".parse().unwrap();
        assert!(!p.verify_checksum(a6, a6));
    }

    #[test]
    fn v6_checksum_roundtrip() {
        let a: IpAddr = "fd00::1".parse().unwrap();
        let b: IpAddr = "fd00::2".parse().unwrap();
        let mut v = dgram();
        Packet::new_unchecked(&mut v[..]).fill_checksum(a, b);
        assert!(Packet::new_checked(&v[..]).unwrap().verify_checksum(a, b));
    }

    #[test]
    fn impossible_lengths() {
        let v = dgram();
        assert_eq!(Packet::new_checked(&v[..7]).unwrap_err(), Error::Truncated);
        assert_eq!(Packet::new_checked(&v[..11]).unwrap_err(), Error::Truncated);
        let mut w = v.clone();
        w[5] = 7;
        assert_eq!(Packet::new_checked(&w[..]).unwrap_err(), Error::Malformed);
        let mut x = v.clone();
        x.push(0);
        assert_eq!(Packet::new_checked(&x[..]).unwrap().payload().len(), 4);
    }
}
