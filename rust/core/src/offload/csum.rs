//! The Internet checksum (RFC 1071) tuned for the I/O hot path: segmenting a 64 KiB TSO super-packet
//! sums every payload byte once, so this runs over ~all egress bytes on the tunnel path.
//!
//! RFC 1071 §2(B): the one's-complement sum is byte-order independent, so we add native-endian 64-bit
//! words with end-around carry and swap the folded 16-bit result once at the end, instead of
//! byte-swapping every word. All functions are total (any length, odd included) and never panic.
//! `crate::wire::checksum` (the straightforward big-endian sum) is the reference these are tested against.

/// Add `data` (starting at an even offset of the checksummed region) to a native-endian accumulator.
#[inline]
fn add_ne(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Zero padding on the right keeps every byte in its lane, which is what RFC 1071 §4.1 asks
        // for an odd trailing byte.
        let mut pad = [0u8; 8];
        pad[..rest.len()].copy_from_slice(rest);
        let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(pad));
        acc = s + u64::from(carry);
    }
    acc
}

/// Fold a native-endian 64-bit accumulator to the big-endian 16-bit sum.
#[inline]
fn fold_ne(acc: u64) -> u16 {
    let mut s = (acc & 0xffff_ffff) + (acc >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    let mut t = (s & 0xffff) + (s >> 16);
    t = (t & 0xffff) + (t >> 16);
    t = (t & 0xffff) + (t >> 16);
    let v = t as u16;
    if cfg!(target_endian = "little") {
        v.swap_bytes()
    } else {
        v
    }
}

/// One's-complement sum (not complemented) of `data` as big-endian 16-bit words.
#[inline]
pub fn sum(data: &[u8]) -> u16 {
    fold_ne(add_ne(0, data))
}

/// One's-complement addition of two sums.
#[inline]
pub fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The sum of `parts` taken as one region (every part but the last must have even length).
#[inline]
pub fn sum_parts(parts: &[&[u8]]) -> u16 {
    fold_ne(parts.iter().fold(0, |acc, p| add_ne(acc, p)))
}

/// Sum of the IPv4 pseudo-header (RFC 9293 §3.1 / RFC 768).
#[inline]
pub fn pseudo_v4(src: &[u8], dst: &[u8], proto: u8, len: u16) -> u16 {
    let mut s = u32::from(proto) + u32::from(len);
    for w in src.chunks_exact(2).chain(dst.chunks_exact(2)) {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Sum of the IPv6 pseudo-header (RFC 8200 §8.1).
#[inline]
pub fn pseudo_v6(src: &[u8], dst: &[u8], next_header: u8, len: u32) -> u16 {
    let a = sum_parts(&[src, dst]);
    let b = add((len >> 16) as u16, len as u16);
    add(add(a, b), u16::from(next_header))
}

/// The value to store in a checksum field: the complement of the sum, with a computed zero sent as
/// 0xffff (RFC 768 for UDP; for TCP both encode the same value and Linux does the same).
#[inline]
pub fn finish(s: u16) -> u16 {
    match !s {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        let mut it = data.chunks(2);
        for w in &mut it {
            let v = if w.len() == 2 {
                u16::from_be_bytes([w[0], w[1]])
            } else {
                u16::from(w[0]) << 8
            };
            acc += u32::from(v);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn rfc1071_example() {
        assert_eq!(
            sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn matches_reference_all_lengths() {
        let data: Vec<u8> = (0..600u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            assert_eq!(sum(&data[..len]), reference(&data[..len]), "len {len}");
        }
        let ff = vec![0xffu8; 77];
        assert_eq!(sum(&ff), reference(&ff));
    }

    #[test]
    fn parts_equal_whole() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(
            sum_parts(&[&data[..40], &data[40..122], &data[122..]]),
            sum(&data)
        );
    }

    #[test]
    fn pseudo_headers_match_core() {
        use crate::wire::checksum as c;
        use core::net::{Ipv4Addr, Ipv6Addr};
        let (s, d) = (Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(
            pseudo_v4(&s.octets(), &d.octets(), 6, 1400),
            c::pseudo_header_v4(s, d, 6, 1400)
        );
        let (s6, d6) = (
            "fd00::1".parse::<Ipv6Addr>().unwrap(),
            "fd00:1::ffff".parse::<Ipv6Addr>().unwrap(),
        );
        assert_eq!(
            pseudo_v6(&s6.octets(), &d6.octets(), 6, 70000),
            c::pseudo_header_v6(s6, d6, 6, 70000)
        );
        let data: Vec<u8> = (0..999u32).map(|i| (i * 13) as u8).collect();
        assert_eq!(sum(&data), c::data(&data));
    }
}
