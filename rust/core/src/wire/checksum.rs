//! The Internet checksum (RFC 1071), the IPv4/IPv6 pseudo-headers, and incremental updates
//! (RFC 1624) for rewriting fields without re-reading the payload, as NAT and ECN marking need.
//!
//! All functions are total: any slice length (odd included) is accepted and nothing panics.
//!
//! Vocabulary: a *sum* is the folded 16-bit one's-complement sum of some bytes; a *checksum* is the
//! complement of the sum of everything it covers, which is what goes on the wire.

use core::net::{Ipv4Addr, Ipv6Addr};

/// Fold a wide accumulator to 16 bits with end-around carry.
#[inline]
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The one's-complement sum of `data` taken as big-endian 16-bit words; an odd trailing byte is
/// padded with a zero byte on the right (RFC 1071 §4.1).
///
/// 32-bit words are accumulated in a u64 and folded once: since 2^16 ≡ 1 (mod 2^16 - 1), this is the
/// same sum as adding 16-bit words one by one, at half the loop count.
pub fn data(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    fold(acc)
}

/// One's-complement sum of several partial sums.
pub fn combine(sums: &[u16]) -> u16 {
    fold(sums.iter().map(|&s| u64::from(s)).sum())
}

/// The checksum to write for `data` alone (IPv4 header, ICMPv4).
pub fn checksum(bytes: &[u8]) -> u16 {
    !data(bytes)
}

/// Sum of the IPv4 pseudo-header (RFC 768, RFC 9293 §3.1): addresses, zero, protocol, L4 length.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
    let s = src.octets();
    let d = dst.octets();
    fold(
        u64::from(u16::from_be_bytes([s[0], s[1]]))
            + u64::from(u16::from_be_bytes([s[2], s[3]]))
            + u64::from(u16::from_be_bytes([d[0], d[1]]))
            + u64::from(u16::from_be_bytes([d[2], d[3]]))
            + u64::from(protocol)
            + u64::from(length),
    )
}

/// Sum of the IPv6 pseudo-header (RFC 8200 §8.1): addresses, 32-bit upper-layer length, next header.
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, length: u32) -> u16 {
    combine(&[
        data(&src.octets()),
        data(&dst.octets()),
        fold(u64::from(length >> 16) + u64::from(length & 0xffff) + u64::from(next_header)),
    ])
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word covered by `check` changed from `old`
/// to `new`: `HC' = ~(~HC + ~m + m')`. Unlike eqn. 2 this never produces the 0x0000 / 0xffff
/// ambiguity of the original RFC 1141 formula for a non-zero header.
///
/// For UDP over IPv4 the caller must keep the special meanings: a zero checksum ("none") is not
/// updated, and a computed zero is written as 0xffff (RFC 768).
#[inline]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// [`update16`] for a 32-bit field (an IPv4 address, a TCP sequence number).
#[inline]
pub fn update32(check: u16, old: u32, new: u32) -> u16 {
    !fold(
        u64::from(!check)
            + u64::from(!((old >> 16) as u16))
            + u64::from(!(old as u16))
            + u64::from((new >> 16) as u16)
            + u64::from(new as u16),
    )
}

/// [`update16`] for a field of any even length that sits at an even offset (an IPv6 address).
/// If the lengths differ or are odd the result covers the common even prefix only; callers pass
/// same-length fields.
pub fn update_bytes(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u64::from(!check);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        acc += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    !fold(acc)
}

/// UDP-over-IPv4 flavour of an incremental update: leaves "no checksum" (0) alone and never
/// produces 0, which on the wire would mean "no checksum" (RFC 768).
#[inline]
pub fn update16_udp(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match update16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// [`update16_udp`] for a 32-bit field.
#[inline]
pub fn update32_udp(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match update32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 §3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    #[test]
    fn rfc1071_example() {
        assert_eq!(
            data(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn odd_length_pads_right() {
        assert_eq!(data(&[0xab]), 0xab00);
        assert_eq!(data(&[0x00, 0x01, 0xab]), 0xab01);
        assert_eq!(data(&[]), 0);
    }

    // A real IPv4 header (from a capture): 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn ipv4_header_verifies_and_recomputes() {
        assert_eq!(data(&HDR), 0xffff);
        let mut h = HDR;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn incremental_matches_recompute() {
        // Decrement TTL (word at offset 8 = TTL|proto) and rewrite the source address.
        let mut h = HDR;
        let old_word = u16::from_be_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new_word = u16::from_be_bytes([h[8], h[9]]);
        let c = update16(0xb861, old_word, new_word);
        let old_src = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        h[12..16].copy_from_slice(&[10, 244, 1, 7]);
        let c = update32(c, old_src, u32::from_be_bytes([10, 244, 1, 7]));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(data(&h), 0xffff);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(checksum(&z), c);
    }

    #[test]
    fn update_bytes_equals_update32() {
        let c = update32(0x1234, 0xdead_beef, 0x0a0b_0c0d);
        assert_eq!(
            update_bytes(
                0x1234,
                &0xdead_beefu32.to_be_bytes(),
                &0x0a0b_0c0du32.to_be_bytes()
            ),
            c
        );
    }

    #[test]
    fn udp_zero_rules() {
        assert_eq!(update16_udp(0, 1, 2), 0);
        // ~0xffff + ~0x0000 + 0x0000 = 0xffff, complemented: a plain update yields 0 here.
        assert_eq!(update16(0xffff, 0x0000, 0x0000), 0);
        assert_eq!(update16_udp(0xffff, 0x0000, 0x0000), 0xffff);
        assert_eq!(update32(0xffff, 0, 0), 0);
        assert_eq!(update32_udp(0xffff, 0, 0), 0xffff);
    }

    #[test]
    fn pseudo_headers() {
        // src 192.168.0.1 dst 192.168.0.199 proto 17 len 0x5f
        let s = pseudo_header_v4(
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
            17,
            0x5f,
        );
        assert_eq!(s, fold(0xc0a8 + 0x0001 + 0xc0a8 + 0x00c7 + 17 + 0x5f));
        let a = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
        let b = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
        let s6 = pseudo_header_v6(a, b, 58, 0x1_0004);
        assert_eq!(s6, fold(0xfe80 + 1 + 0xff02 + 0x16 + 1 + 4 + 58));
    }
}
