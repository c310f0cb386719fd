//! VXLAN (RFC 7348 §5): an 8-byte header in front of an inner Ethernet frame, over UDP 4789.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//!
//! Receive policy: the I flag MUST be set (RFC 7348 §5: "The I flag MUST be set to 1 for a valid
//! VXLAN Network ID"); reserved bits MUST be ignored on receipt, and we do so (Linux instead
//! drops packets with unknown flags, see `vxlan_rcv`; we follow the RFC so that a sender using the
//! Group Policy extension bits still interoperates). [`Header::check_valid`] implements the policy.
//!
//! Panic rules: see [`crate::wire`]. [`Header::new_checked`] proves 8 bytes; afterwards no getter
//! panics.

use super::{Error, Field, Result};

mod field {
    use super::Field;
    pub const FLAGS: usize = 0;
    pub const RESERVED1: Field = 1..4;
    pub const VNI: Field = 4..7;
    pub const RESERVED2: usize = 7;
    pub const PAYLOAD: usize = 8;
}

pub const HEADER_LEN: usize = field::PAYLOAD;
/// IANA-assigned UDP port (RFC 7348 §5).
pub const UDP_PORT: u16 = 4789;
/// The I flag in the first byte.
pub const FLAG_I: u8 = 0x08;
/// Largest VNI: 24 bits.
pub const MAX_VNI: u32 = 0x00ff_ffff;

view! {
    /// A read/write view of a VXLAN header and what follows it.
    pub struct Header;
    fixed_len = HEADER_LEN;
    check_len = fixed;
}

impl<T: AsRef<[u8]>> Header<T> {
    /// The receive policy of the module docs: the I flag is set. Reserved bits are ignored.
    pub fn check_valid(&self) -> Result<()> {
        if self.i_flag() {
            Ok(())
        } else {
            Err(Error::Malformed)
        }
    }

    pub fn flags(&self) -> u8 {
        self.b()[field::FLAGS]
    }

    pub fn i_flag(&self) -> bool {
        self.flags() & FLAG_I != 0
    }

    /// Any reserved bit set (flags other than I, the 24 reserved bits, the last byte).
    pub fn reserved_bits_set(&self) -> bool {
        let b = self.b();
        b[field::FLAGS] & !FLAG_I != 0
            || b[field::RESERVED1].iter().any(|&x| x != 0)
            || b[field::RESERVED2] != 0
    }

    pub fn vni(&self) -> u32 {
        let v = &self.b()[field::VNI];
        u32::from_be_bytes([0, v[0], v[1], v[2]])
    }

    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        let d = self.b();
        super::clamp(d, field::PAYLOAD, d.len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Write a header as RFC 7348 asks a sender to: I set, every reserved bit zero. The VNI is
    /// truncated to 24 bits.
    pub fn emit(&mut self, vni: u32) {
        let b = self.bm();
        b[..HEADER_LEN].fill(0);
        b[field::FLAGS] = FLAG_I;
        let v = (vni & MAX_VNI).to_be_bytes();
        b[field::VNI].copy_from_slice(&v[1..]);
    }

    pub fn set_flags(&mut self, f: u8) {
        self.bm()[field::FLAGS] = f;
    }

    pub fn set_vni(&mut self, vni: u32) {
        let v = (vni & MAX_VNI).to_be_bytes();
        self.bm()[field::VNI].copy_from_slice(&v[1..]);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let d = self.bm();
        let n = d.len();
        super::clamp_mut(d, field::PAYLOAD, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // VNI 4096 as Linux sends it: 08 00 00 00 00 10 00 00, then an inner frame.
    const HDR: [u8; 10] = [0x08, 0, 0, 0, 0x00, 0x10, 0x00, 0x00, 0xaa, 0xbb];

    #[test]
    fn deconstruct() {
        let h = Header::new_checked(&HDR[..]).unwrap();
        assert!(h.i_flag());
        assert_eq!(h.vni(), 4096);
        assert!(!h.reserved_bits_set());
        assert_eq!(h.check_valid(), Ok(()));
        assert_eq!(h.payload(), &[0xaa, 0xbb]);
    }

    #[test]
    fn construct() {
        let mut b = [0xffu8; 10];
        let mut h = Header::new_unchecked(&mut b[..]);
        h.emit(4096);
        h.payload_mut().copy_from_slice(&[0xaa, 0xbb]);
        assert_eq!(b, HDR);
        let mut h = Header::new_unchecked(&mut b[..]);
        h.set_vni(0x1ff_ffff);
        assert_eq!(Header::new_checked(&b[..]).unwrap().vni(), MAX_VNI);
    }

    #[test]
    fn flags_policy() {
        let mut b = HDR;
        b[0] = 0x00;
        assert_eq!(
            Header::new_checked(&b[..]).unwrap().check_valid(),
            Err(Error::Malformed)
        );
        // Reserved bits (G bit of VXLAN-GBP, a reserved byte) are ignored on receipt.
        b[0] = 0x88;
        b[7] = 0x01;
        let h = Header::new_checked(&b[..]).unwrap();
        assert!(h.reserved_bits_set());
        assert_eq!(h.check_valid(), Ok(()));
        assert_eq!(h.vni(), 4096);
    }

    #[test]
    fn impossible_len() {
        assert_eq!(
            Header::new_checked(&HDR[..7]).unwrap_err(),
            Error::Truncated
        );
        assert!(Header::new_checked(&HDR[..8]).unwrap().payload().is_empty());
    }
}
