//! Ethernet II frames (IEEE 802.3 with an EtherType; no VLAN tags).
//!
//! Used for the inner frame of VXLAN and for AF_PACKET. Panic rules: see [`crate::wire`]; a view
//! from [`Frame::new_checked`] never panics.

use super::{Field, Rest};

/// EtherType values podrouter meets.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
    /// Transparent Ethernet Bridging: Geneve's protocol type for an inner Ethernet frame.
    pub const TEB: u16 = 0x6558;
}

mod field {
    use super::{Field, Rest};
    pub const DST: Field = 0..6;
    pub const SRC: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    pub const PAYLOAD: Rest = 14..;
}

pub const HEADER_LEN: usize = field::PAYLOAD.start;

view! {
    /// A read/write view of an Ethernet II frame.
    pub struct Frame;
    fixed_len = HEADER_LEN;
    check_len = fixed;
}

impl<T: AsRef<[u8]>> Frame<T> {
    pub fn dst_addr(&self) -> [u8; 6] {
        let mut a = [0; 6];
        a.copy_from_slice(&self.b()[field::DST]);
        a
    }

    pub fn src_addr(&self) -> [u8; 6] {
        let mut a = [0; 6];
        a.copy_from_slice(&self.b()[field::SRC]);
        a
    }

    pub fn ethertype(&self) -> u16 {
        super::be16(self.b(), field::ETHERTYPE.start)
    }

    pub fn payload(&self) -> &[u8] {
        let d = self.b();
        super::clamp(d, field::PAYLOAD.start, d.len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub fn set_dst_addr(&mut self, a: [u8; 6]) {
        self.bm()[field::DST].copy_from_slice(&a);
    }

    pub fn set_src_addr(&mut self, a: [u8; 6]) {
        self.bm()[field::SRC].copy_from_slice(&a);
    }

    pub fn set_ethertype(&mut self, t: u16) {
        self.bm()[field::ETHERTYPE].copy_from_slice(&t.to_be_bytes());
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let d = self.bm();
        let n = d.len();
        super::clamp_mut(d, field::PAYLOAD.start, n)
    }
}

/// Format a MAC address as `02:00:00:00:00:01`.
pub fn format_mac(a: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        a[0], a[1], a[2], a[3], a[4], a[5]
    )
}

/// Parse `02:00:00:00:00:01` (or with `-`); `None` for anything else.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut n = 0;
    for part in s.split([':', '-']) {
        if n == 6 || part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        out[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Error;

    // Broadcast ARP request header from 02:00:00:00:00:01.
    const FRAME: [u8; 18] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00,
        0x01, 0x08, 0x00,
    ];

    #[test]
    fn deconstruct() {
        let f = Frame::new_checked(&FRAME[..]).unwrap();
        assert_eq!(f.dst_addr(), [0xff; 6]);
        assert_eq!(f.src_addr(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.ethertype(), ethertype::ARP);
        assert_eq!(f.payload(), &[0x00, 0x01, 0x08, 0x00]);
    }

    #[test]
    fn construct() {
        let mut b = [0u8; 18];
        let mut f = Frame::new_unchecked(&mut b[..]);
        f.set_dst_addr([0xff; 6]);
        f.set_src_addr([2, 0, 0, 0, 0, 1]);
        f.set_ethertype(ethertype::ARP);
        f.payload_mut().copy_from_slice(&[0x00, 0x01, 0x08, 0x00]);
        assert_eq!(b, FRAME);
    }

    #[test]
    fn impossible_len() {
        assert_eq!(
            Frame::new_checked(&FRAME[..13]).unwrap_err(),
            Error::Truncated
        );
        assert!(Frame::new_checked(&FRAME[..14])
            .unwrap()
            .payload()
            .is_empty());
    }

    #[test]
    fn mac_text() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(format_mac([2, 0, 0, 0, 0, 10]), "02:00:00:00:00:0a");
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("0g:00:00:00:00:00"), None);
        assert_eq!(parse_mac("+1:00:00:00:00:00"), None);
    }
}
