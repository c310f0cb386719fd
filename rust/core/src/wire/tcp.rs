//! TCP (RFC 9293) headers: ports, flags, data offset and options.
//!
//! Panic rules: see [`crate::wire`]. [`Packet::new_checked`] proves the fixed 20 bytes, a data
//! offset of at least 5 words and the whole header inside the buffer; afterwards no getter panics,
//! and the options iterator bounds-checks every option.

use core::net::IpAddr;

use super::{checksum, ip_proto, Error, Field, Result};

mod field {
    use super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ: Field = 4..8;
    pub const ACK: Field = 8..12;
    pub const OFF_NS: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
}

pub const HEADER_LEN: usize = field::URGENT.end;
pub const MAX_HEADER_LEN: usize = 60;

/// Bits of the flags byte (offset 13).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Option kinds (IANA "TCP Option Kind Numbers").
pub mod option_kind {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMP: u8 = 8;
}

view! {
    /// A read/write view of a TCP segment.
    pub struct Packet;
    fixed_len = HEADER_LEN;
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn check_len(&self) -> Result<()> {
        let len = self.b().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let h = self.header_len();
        if h < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if h > len {
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

    pub fn seq_number(&self) -> u32 {
        super::be32(self.b(), field::SEQ.start)
    }

    pub fn ack_number(&self) -> u32 {
        super::be32(self.b(), field::ACK.start)
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::OFF_NS] >> 4) * 4
    }

    /// The flags byte (CWR ECE URG ACK PSH RST SYN FIN); see [`flags`].
    pub fn flags(&self) -> u8 {
        self.b()[field::FLAGS]
    }

    pub fn syn(&self) -> bool {
        self.flags() & flags::SYN != 0
    }

    pub fn ack(&self) -> bool {
        self.flags() & flags::ACK != 0
    }

    pub fn fin(&self) -> bool {
        self.flags() & flags::FIN != 0
    }

    pub fn rst(&self) -> bool {
        self.flags() & flags::RST != 0
    }

    pub fn window_len(&self) -> u16 {
        super::be16(self.b(), field::WINDOW.start)
    }

    pub fn checksum(&self) -> u16 {
        super::be16(self.b(), field::CHECKSUM.start)
    }

    pub fn urgent_at(&self) -> u16 {
        super::be16(self.b(), field::URGENT.start)
    }

    /// Raw option bytes (clamped).
    pub fn options(&self) -> &[u8] {
        super::clamp(self.b(), HEADER_LEN, self.header_len())
    }

    pub fn options_iter(&self) -> OptionsIter<'_> {
        OptionsIter {
            data: self.options(),
        }
    }

    /// The MSS option, if present and well formed.
    pub fn mss(&self) -> Option<u16> {
        self.options_iter().find_map(|o| match o {
            Ok(TcpOption::Mss(m)) => Some(m),
            _ => None,
        })
    }

    pub fn payload(&self) -> &[u8] {
        let d = self.b();
        super::clamp(d, self.header_len(), d.len())
    }

    /// Verify the checksum over the pseudo-header and the whole buffer (header + payload).
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        segment_sum(self.b(), src, dst) == 0xffff
    }
}

fn segment_sum(seg: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    let ph = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            checksum::pseudo_header_v4(s, d, ip_proto::TCP, seg.len() as u16)
        }
        (s, d) => {
            let s6 = match s {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            let d6 = match d {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            checksum::pseudo_header_v6(s6, d6, ip_proto::TCP, seg.len() as u32)
        }
    };
    checksum::combine(&[ph, checksum::data(seg)])
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, p: u16) {
        self.bm()[field::SRC_PORT].copy_from_slice(&p.to_be_bytes());
    }

    pub fn set_dst_port(&mut self, p: u16) {
        self.bm()[field::DST_PORT].copy_from_slice(&p.to_be_bytes());
    }

    pub fn set_seq_number(&mut self, v: u32) {
        self.bm()[field::SEQ].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_ack_number(&mut self, v: u32) {
        self.bm()[field::ACK].copy_from_slice(&v.to_be_bytes());
    }

    /// Set the header length in bytes (rounded down to a multiple of 4).
    pub fn set_header_len(&mut self, len: usize) {
        let b = self.bm();
        b[field::OFF_NS] = (b[field::OFF_NS] & 0x0f) | ((((len / 4) & 0x0f) as u8) << 4);
    }

    pub fn set_flags(&mut self, f: u8) {
        self.bm()[field::FLAGS] = f;
    }

    pub fn set_window_len(&mut self, w: u16) {
        self.bm()[field::WINDOW].copy_from_slice(&w.to_be_bytes());
    }

    pub fn set_checksum(&mut self, c: u16) {
        self.bm()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    pub fn set_urgent_at(&mut self, u: u16) {
        self.bm()[field::URGENT].copy_from_slice(&u.to_be_bytes());
    }

    pub fn options_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        super::clamp_mut(self.bm(), HEADER_LEN, h)
    }

    /// Compute and write the checksum over the whole buffer.
    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        self.set_checksum(0);
        let c = !segment_sum(self.b(), src, dst);
        self.set_checksum(c);
    }
}

/// A parsed TCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption<'a> {
    Mss(u16),
    WindowScale(u8),
    SackPermitted,
    /// SACK blocks, raw (a multiple of 8 bytes).
    Sack(&'a [u8]),
    Timestamp {
        value: u32,
        echo: u32,
    },
    Unknown {
        kind: u8,
        data: &'a [u8],
    },
}

/// Iterator over TCP options: END stops, NOP is skipped, a length below 2 or past the options
/// area yields `Err(Malformed)` once and stops; known options with the wrong length are
/// `Malformed` too (RFC 9293 §3.1 fixes their sizes).
#[derive(Debug, Clone)]
pub struct OptionsIter<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for OptionsIter<'a> {
    type Item = Result<TcpOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (&kind, rest) = self.data.split_first()?;
            match kind {
                option_kind::END => {
                    self.data = &[];
                    return None;
                }
                option_kind::NOP => {
                    self.data = rest;
                    continue;
                }
                _ => {}
            }
            let len = match rest.first() {
                Some(&l) if l >= 2 && usize::from(l) <= self.data.len() => usize::from(l),
                _ => {
                    self.data = &[];
                    return Some(Err(Error::Malformed));
                }
            };
            let body = &self.data[2..len];
            self.data = &self.data[len..];
            let opt = match (kind, body.len()) {
                (option_kind::MSS, 2) => TcpOption::Mss(u16::from_be_bytes([body[0], body[1]])),
                (option_kind::WINDOW_SCALE, 1) => TcpOption::WindowScale(body[0]),
                (option_kind::SACK_PERMITTED, 0) => TcpOption::SackPermitted,
                (option_kind::SACK, n) if n & 7 == 0 && n > 0 => TcpOption::Sack(body),
                (option_kind::TIMESTAMP, 8) => TcpOption::Timestamp {
                    value: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    echo: u32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                },
                (
                    option_kind::MSS
                    | option_kind::WINDOW_SCALE
                    | option_kind::SACK_PERMITTED
                    | option_kind::SACK
                    | option_kind::TIMESTAMP,
                    _,
                ) => {
                    self.data = &[];
                    return Some(Err(Error::Malformed));
                }
                (kind, _) => TcpOption::Unknown { kind, data: body },
            };
            return Some(Ok(opt));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    // Linux SYN: 10.244.1.1:40000 -> 10.244.2.1:80, MSS 1460, SACK-perm, TS, NOP, WS 7.
    const SYN: [u8; 40] = [
        0x9c, 0x40, 0x00, 0x50, 0x11, 0x22, 0x33, 0x44, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa,
        0xf0, 0x00, 0x00, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x01,
        0x02, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x07,
    ];

    #[test]
    fn deconstruct_syn() {
        let p = Packet::new_checked(&SYN[..]).unwrap();
        assert_eq!(p.src_port(), 40000);
        assert_eq!(p.dst_port(), 80);
        assert_eq!(p.seq_number(), 0x1122_3344);
        assert_eq!(p.ack_number(), 0);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), flags::SYN);
        assert!(p.syn() && !p.ack() && !p.fin() && !p.rst());
        assert_eq!(p.window_len(), 64240);
        assert_eq!(p.mss(), Some(1460));
        let opts: Vec<_> = p.options_iter().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            vec![
                TcpOption::Mss(1460),
                TcpOption::SackPermitted,
                TcpOption::Timestamp {
                    value: 0x0001_0203,
                    echo: 0
                },
                TcpOption::WindowScale(7),
            ]
        );
        assert!(p.payload().is_empty());
    }

    #[test]
    fn construct_and_checksum() {
        let mut v = [0u8; 40];
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.set_src_port(40000);
        p.set_dst_port(80);
        p.set_seq_number(0x1122_3344);
        p.set_ack_number(0);
        p.set_header_len(40);
        p.set_flags(flags::SYN);
        p.set_window_len(64240);
        p.set_urgent_at(0);
        p.options_mut().copy_from_slice(&SYN[20..]);
        assert_eq!(v, SYN);
        let (s, d) = (
            IpAddr::V4(Ipv4Addr::new(10, 244, 1, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 244, 2, 1)),
        );
        let mut p = Packet::new_unchecked(&mut v[..]);
        p.fill_checksum(s, d);
        assert!(p.verify_checksum(s, d));
        assert!(!p.verify_checksum(d, d));
    }

    #[test]
    fn impossible_lengths() {
        assert_eq!(
            Packet::new_checked(&SYN[..19]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            Packet::new_checked(&SYN[..39]).unwrap_err(),
            Error::Truncated
        );
        let mut v = SYN;
        v[12] = 0x40; // data offset 4
        assert_eq!(Packet::new_checked(&v[..]).unwrap_err(), Error::Malformed);
    }

    #[test]
    fn bad_options() {
        let mut v = SYN;
        v[21] = 0x30; // MSS length past the options area
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.options_iter().next(), Some(Err(Error::Malformed)));
        assert_eq!(p.options_iter().count(), 1);
        let mut v = SYN;
        v[21] = 3; // MSS with length 3
        let p = Packet::new_checked(&v[..]).unwrap();
        assert_eq!(p.options_iter().next(), Some(Err(Error::Malformed)));
        let mut v = SYN;
        v[39] = 0; // WS option length 3 -> now last byte 0 only changes the value
        v[37] = 0x01; // the WS kind becomes NOP; then "03 00" -> kind 3, len 0: malformed
        let p = Packet::new_checked(&v[..]).unwrap();
        assert!(p.options_iter().any(|o| o.is_err()));
        let mut v = SYN;
        v[20] = 0; // END at the start: no options at all
        assert_eq!(
            Packet::new_checked(&v[..]).unwrap().options_iter().count(),
            0
        );
    }
}
