//! Geneve (RFC 8926 §3): an 8-byte base header, variable-length TLV options, then the payload
//! whose type the Protocol Type field names, over UDP 6081.
//!
//! ```text
//! |Ver|  Opt Len  |O|C|    Rsvd.  |          Protocol Type        |
//! |        Virtual Network Identifier (VNI)       |    Reserved   |
//! |                    Variable-Length Options                    |
//! option: | Option Class (16) | Type (8) |R|R|R| Length (5) | data (Length × 4 bytes) |
//! ```
//!
//! Receive policy ([`Header::check_valid`]): version MUST be 0 (§3.4: a packet with an unknown
//! version MUST be dropped); every option must fit inside `Opt Len`; an option whose type has the
//! critical bit (0x80) that the receiver does not understand means the packet MUST be dropped
//! (§3.5.1). We walk the options whether or not the C bit is set: a sender that sets a critical
//! option but not C is not trusted to have meant it. Reserved bits are ignored on receipt (§3.4).
//!
//! Panic rules: see [`crate::wire`]. [`Header::new_checked`] proves the base header and the whole
//! options area inside the buffer; afterwards no getter panics, and the option iterator
//! bounds-checks every option against the options area.

use super::{Error, Field, Result};

mod field {
    use super::Field;
    pub const VER_OPTLEN: usize = 0;
    pub const FLAGS: usize = 1;
    pub const PROTOCOL: Field = 2..4;
    pub const VNI: Field = 4..7;
    pub const RESERVED: usize = 7;
    pub const OPTIONS: usize = 8;
}

pub const HEADER_LEN: usize = field::OPTIONS;
/// Largest base header plus options: Opt Len is 6 bits of 4-byte words.
pub const MAX_HEADER_LEN: usize = HEADER_LEN + 63 * 4;
/// IANA-assigned UDP port (RFC 8926 §3.3).
pub const UDP_PORT: u16 = 6081;
pub const FLAG_OAM: u8 = 0x80;
pub const FLAG_CRITICAL: u8 = 0x40;
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Option type bit meaning "critical" (§3.5).
pub const OPTION_CRITICAL: u8 = 0x80;
/// Option header: class, type, length.
pub const OPTION_HEADER_LEN: usize = 4;

view! {
    /// A read/write view of a Geneve header and what follows it.
    pub struct Header;
    fixed_len = HEADER_LEN;
}

/// One option TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneveOption<'a> {
    pub class: u16,
    pub opt_type: u8,
    pub data: &'a [u8],
}

impl GeneveOption<'_> {
    pub fn is_critical(&self) -> bool {
        self.opt_type & OPTION_CRITICAL != 0
    }
}

impl<T: AsRef<[u8]>> Header<T> {
    /// The base header and the whole options area fit in the buffer.
    pub fn check_len(&self) -> Result<()> {
        let len = self.b().len();
        if len < HEADER_LEN || self.header_len() > len {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }

    /// The receive policy of the module docs; `understood(class, type)` says which options this
    /// receiver implements (podrouter implements none, so it passes `|_, _| false`).
    pub fn check_valid(&self, understood: impl Fn(u16, u8) -> bool) -> Result<()> {
        if self.version() != 0 {
            return Err(Error::Unsupported);
        }
        for opt in self.options_iter() {
            let opt = opt?;
            if opt.is_critical() && !understood(opt.class, opt.opt_type) {
                return Err(Error::UnknownCriticalOption);
            }
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.b()[field::VER_OPTLEN] >> 6
    }

    /// Opt Len in 4-byte words.
    pub fn opt_len_words(&self) -> u8 {
        self.b()[field::VER_OPTLEN] & 0x3f
    }

    /// Base header plus options, in bytes.
    pub fn header_len(&self) -> usize {
        HEADER_LEN + usize::from(self.opt_len_words()) * 4
    }

    /// O bit: an OAM (control) packet, not to be forwarded as data (§3.4).
    pub fn oam(&self) -> bool {
        self.b()[field::FLAGS] & FLAG_OAM != 0
    }

    /// C bit: critical options are present.
    pub fn critical(&self) -> bool {
        self.b()[field::FLAGS] & FLAG_CRITICAL != 0
    }

    pub fn protocol_type(&self) -> u16 {
        super::be16(self.b(), field::PROTOCOL.start)
    }

    pub fn vni(&self) -> u32 {
        let v = &self.b()[field::VNI];
        u32::from_be_bytes([0, v[0], v[1], v[2]])
    }

    pub fn reserved_bits_set(&self) -> bool {
        let b = self.b();
        b[field::FLAGS] & 0x3f != 0 || b[field::RESERVED] != 0
    }

    /// The raw options area (clamped).
    pub fn options(&self) -> &[u8] {
        super::clamp(self.b(), field::OPTIONS, self.header_len())
    }

    pub fn options_iter(&self) -> OptionsIter<'_> {
        OptionsIter {
            data: self.options(),
        }
    }

    /// What follows the options (clamped).
    pub fn payload(&self) -> &[u8] {
        let d = self.b();
        super::clamp(d, self.header_len(), d.len())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Write a base header: version 0, no O/C bits, reserved zero, `opt_len_words` of options
    /// (whose bytes the caller writes through [`Header::options_mut`]). VNI truncated to 24 bits,
    /// option length to 6 bits.
    pub fn emit(&mut self, vni: u32, protocol_type: u16, opt_len_words: u8) {
        let b = self.bm();
        b[..HEADER_LEN].fill(0);
        b[field::VER_OPTLEN] = opt_len_words & 0x3f;
        b[field::PROTOCOL].copy_from_slice(&protocol_type.to_be_bytes());
        let v = (vni & MAX_VNI).to_be_bytes();
        b[field::VNI].copy_from_slice(&v[1..]);
    }

    pub fn set_version(&mut self, v: u8) {
        let b = self.bm();
        b[field::VER_OPTLEN] = (b[field::VER_OPTLEN] & 0x3f) | (v << 6);
    }

    pub fn set_oam(&mut self, on: bool) {
        let b = self.bm();
        b[field::FLAGS] = if on {
            b[field::FLAGS] | FLAG_OAM
        } else {
            b[field::FLAGS] & !FLAG_OAM
        };
    }

    pub fn set_critical(&mut self, on: bool) {
        let b = self.bm();
        b[field::FLAGS] = if on {
            b[field::FLAGS] | FLAG_CRITICAL
        } else {
            b[field::FLAGS] & !FLAG_CRITICAL
        };
    }

    pub fn set_protocol_type(&mut self, p: u16) {
        self.bm()[field::PROTOCOL].copy_from_slice(&p.to_be_bytes());
    }

    pub fn set_vni(&mut self, vni: u32) {
        let v = (vni & MAX_VNI).to_be_bytes();
        self.bm()[field::VNI].copy_from_slice(&v[1..]);
    }

    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        super::clamp_mut(self.bm(), field::OPTIONS, end)
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        let d = self.bm();
        let n = d.len();
        super::clamp_mut(d, start, n)
    }
}

/// Write one option TLV at the start of `buf`; returns its length. `data` must be a multiple of
/// 4 bytes and at most 124 (the 5-bit length field); otherwise, or if `buf` is too short,
/// `Malformed` / `Truncated` and nothing is written.
pub fn emit_option(buf: &mut [u8], class: u16, opt_type: u8, data: &[u8]) -> Result<usize> {
    if data.len() & 3 != 0 || data.len() > 31 * 4 {
        return Err(Error::Malformed);
    }
    let total = OPTION_HEADER_LEN + data.len();
    let out = buf.get_mut(..total).ok_or(Error::Truncated)?;
    out[0..2].copy_from_slice(&class.to_be_bytes());
    out[2] = opt_type;
    out[3] = (data.len() / 4) as u8;
    out[4..].copy_from_slice(data);
    Ok(total)
}

/// Iterator over Geneve options; an option that runs past the options area yields
/// `Err(Malformed)` once and the walk stops.
#[derive(Debug, Clone)]
pub struct OptionsIter<'a> {
    data: &'a [u8],
}

impl<'a> Iterator for OptionsIter<'a> {
    type Item = Result<GeneveOption<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.is_empty() {
            return None;
        }
        let d = self.data;
        if d.len() < OPTION_HEADER_LEN {
            self.data = &[];
            return Some(Err(Error::Malformed));
        }
        // Low 5 bits of byte 3: length in 4-byte words, excluding the option header (§3.5).
        let len = OPTION_HEADER_LEN + usize::from(d[3] & 0x1f) * 4;
        if len > d.len() {
            self.data = &[];
            return Some(Err(Error::Malformed));
        }
        self.data = &d[len..];
        Some(Ok(GeneveOption {
            class: u16::from_be_bytes([d[0], d[1]]),
            opt_type: d[2],
            data: &d[OPTION_HEADER_LEN..len],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ethernet::ethertype;

    // Geneve, Opt Len 3 (12 bytes), protocol TEB, VNI 0x123456, one option class 0x0102 type 0x03
    // with 8 bytes of data; then 2 payload bytes.
    /// The receive policy for a receiver that implements no option (podrouter's).
    fn validate_knowing_none(b: &[u8]) -> Result<()> {
        Header::new_checked(b).unwrap().check_valid(|_, _| false)
    }

    const HDR: [u8; 22] = [
        0x03, 0x00, 0x65, 0x58, 0x12, 0x34, 0x56, 0x00, 0x01, 0x02, 0x03, 0x02, 1, 2, 3, 4, 5, 6,
        7, 8, 0xaa, 0xbb,
    ];

    #[test]
    fn deconstruct() {
        let h = Header::new_checked(&HDR[..]).unwrap();
        assert_eq!(h.version(), 0);
        assert_eq!(h.opt_len_words(), 3);
        assert_eq!(h.header_len(), 20);
        assert!(!h.oam() && !h.critical());
        assert_eq!(h.protocol_type(), ethertype::TEB);
        assert_eq!(h.vni(), 0x123456);
        let opts: Vec<_> = h.options_iter().collect::<Result<_>>().unwrap();
        assert_eq!(
            opts,
            vec![GeneveOption {
                class: 0x0102,
                opt_type: 3,
                data: &[1, 2, 3, 4, 5, 6, 7, 8]
            }]
        );
        assert_eq!(h.payload(), &[0xaa, 0xbb]);
        assert_eq!(h.check_valid(|_, _| false), Ok(()));
    }

    #[test]
    fn construct() {
        let mut b = [0xeeu8; 22];
        let mut h = Header::new_unchecked(&mut b[..]);
        h.emit(0x123456, ethertype::TEB, 3);
        let n = emit_option(h.options_mut(), 0x0102, 3, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(n, 12);
        h.payload_mut().copy_from_slice(&[0xaa, 0xbb]);
        assert_eq!(b, HDR);
        assert_eq!(
            emit_option(&mut [0u8; 8], 0, 0, &[0; 3]),
            Err(Error::Malformed)
        );
        assert_eq!(
            emit_option(&mut [0u8; 7], 0, 0, &[0; 4]),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn critical_option_policy() {
        let mut b = HDR;
        b[10] = 0x83; // critical bit on the option type
        let h = Header::new_checked(&b[..]).unwrap();
        assert_eq!(
            h.check_valid(|_, _| false),
            Err(Error::UnknownCriticalOption)
        );
        assert_eq!(h.check_valid(|c, t| c == 0x0102 && t == 0x83), Ok(()));
        // non-critical unknown options are skipped
        b[10] = 0x7f;
        assert_eq!(validate_knowing_none(&b), Ok(()));
    }

    #[test]
    fn version_policy() {
        let mut b = HDR;
        b[0] |= 0x40;
        let h = Header::new_checked(&b[..]).unwrap();
        assert_eq!(h.version(), 1);
        assert_eq!(h.check_valid(|_, _| false), Err(Error::Unsupported));
    }

    #[test]
    fn option_bounds() {
        // Option length 3 words (12 bytes data) in an area of 12 bytes (4 header + 8 data).
        let mut b = HDR;
        b[11] = 0x03;
        let h = Header::new_checked(&b[..]).unwrap();
        assert_eq!(h.check_valid(|_, _| false), Err(Error::Malformed));
        assert_eq!(h.options_iter().count(), 1);
        // R bits in the length byte are ignored: 0xe2 still means 2 words.
        b[11] = 0xe2;
        assert_eq!(validate_knowing_none(&b), Ok(()));
    }

    #[test]
    fn impossible_len() {
        assert_eq!(
            Header::new_checked(&HDR[..7]).unwrap_err(),
            Error::Truncated
        );
        // Opt Len 3 needs 20 bytes.
        assert_eq!(
            Header::new_checked(&HDR[..19]).unwrap_err(),
            Error::Truncated
        );
        assert!(Header::new_checked(&HDR[..20])
            .unwrap()
            .payload()
            .is_empty());
        // Opt Len 63 in a short buffer.
        let mut b = HDR;
        b[0] = 0x3f;
        assert_eq!(Header::new_checked(&b[..]).unwrap_err(), Error::Truncated);
    }

    #[test]
    fn oam_and_flags() {
        let mut b = HDR;
        let mut h = Header::new_unchecked(&mut b[..]);
        h.set_oam(true);
        h.set_critical(true);
        assert_eq!(b[1], 0xc0);
        let h = Header::new_checked(&b[..]).unwrap();
        assert!(h.oam() && h.critical());
        assert!(!h.reserved_bits_set());
    }
}
