//! Oracles shared by the offload fuzz targets: checksum checks written against podrouter-core's
//! reference checksum code, GSO expansion of what the coalescer writes, and a normalised view of
//! a TCP segment (what segmentation must give back of what coalescing merged).
#![allow(dead_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

use podrouter_core::wire::checksum;
use podrouter_core::offload::gro::Coalescer;
use podrouter_core::offload::vnet::{self, VnetHdr, VNET_HDR_LEN};

/// Equal as one's-complement sums (0x0000 and 0xffff both stand for zero).
pub fn same_sum(a: u16, b: u16) -> bool {
    a % 0xffff == b % 0xffff
}

/// The IPv4 header checksum of `seg` verifies (reference code).
pub fn ipv4_header_ok(seg: &[u8]) -> bool {
    let ihl = usize::from(seg[0] & 0x0f) * 4;
    same_sum(checksum::data(&seg[..ihl]), 0xffff)
}

/// The TCP / UDP checksum of the transport header at `l4` of `seg` verifies over the pseudo-header
/// of `seg`'s addresses (reference code).
pub fn l4_checksum_ok(seg: &[u8], l4: usize, proto: u8) -> bool {
    let len = seg.len() - l4;
    let pseudo = if seg[0] >> 4 == 4 {
        let s = Ipv4Addr::new(seg[12], seg[13], seg[14], seg[15]);
        let d = Ipv4Addr::new(seg[16], seg[17], seg[18], seg[19]);
        checksum::pseudo_header_v4(s, d, proto, len as u16)
    } else {
        let s = Ipv6Addr::from(<[u8; 16]>::try_from(&seg[8..24]).unwrap());
        let d = Ipv6Addr::from(<[u8; 16]>::try_from(&seg[24..40]).unwrap());
        checksum::pseudo_header_v6(s, d, proto, len as u32)
    };
    same_sum(
        checksum::combine(&[pseudo, checksum::data(&seg[l4..])]),
        0xffff,
    )
}

/// A TCP segment without what merging and re-segmenting may legitimately change (IPv4
/// identification, checksums, PSH): addresses and ports, IP fields, sequence number, other flags,
/// the rest of the TCP header, payload. Anything else: its bytes.
pub fn norm(pkt: &[u8]) -> Vec<u8> {
    let l4 = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 40 && pkt[0] == 0x45 && pkt[9] == 6 => 20,
        Some(6) if pkt.len() >= 60 && pkt[6] == 6 => 40,
        _ => return pkt.to_vec(),
    };
    let mut v = pkt.to_vec();
    if l4 == 20 {
        v[4..6].fill(0);
        v[10..12].fill(0);
    }
    v[l4 + 13] &= !0x08;
    v[l4 + 16..l4 + 18].fill(0);
    v
}

/// What one write of the coalescer stands for on the wire: the packet itself, or the segments
/// of a GSO super-packet (which must segment, into exactly `segments` pieces, each with valid
/// checksums).
pub fn expand(hdr: &[u8; VNET_HDR_LEN], pkt: &[u8], segments: usize) -> Vec<Vec<u8>> {
    let h = VnetHdr::parse(hdr).unwrap();
    if !h.is_gso() {
        assert_eq!(segments, 1, "a plain write stands for one packet");
        assert_eq!(h, VnetHdr::default());
        return vec![pkt.to_vec()];
    }
    assert!(
        h.needs_csum(),
        "a merged packet leaves the checksum to the kernel"
    );
    assert!(segments > 1);
    let (n, _) = vnet::wire_size(pkt, &h);
    assert_eq!(n, segments, "wire_size agrees with the segment count");
    let mut out = Vec::new();
    let mut segs = Vec::new();
    vnet::segment(pkt, &h, 0, &mut out, &mut segs).expect("a merged packet segments");
    assert_eq!(segs.len(), segments);
    segs.into_iter()
        .map(|r| {
            let s = &out[r];
            if s[0] >> 4 == 4 {
                assert!(ipv4_header_ok(s), "segment IPv4 header checksum");
            }
            assert!(
                l4_checksum_ok(s, usize::from(h.csum_start), 6),
                "segment TCP checksum"
            );
            s.to_vec()
        })
        .collect()
}

/// Splits `data` into records of `[len_hi, len_lo, bytes...]` (length capped by what is left).
pub fn records(mut data: &[u8]) -> Vec<&[u8]> {
    let mut v = Vec::new();
    while data.len() >= 2 && v.len() < 256 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]])) % 4096;
        let n = n.min(data.len() - 2);
        v.push(&data[2..2 + n]);
        data = &data[2 + n..];
    }
    v
}

/// The previous packet's headers with the next sequence number and `payload`, lengths fixed.
pub fn continuation(prev: &[u8], payload: &[u8], flags: u8) -> Option<Vec<u8>> {
    let l4 = match prev.first()? >> 4 {
        4 if prev.len() >= 40 && prev[9] == 6 => usize::from(prev[0] & 0x0f) * 4,
        6 if prev.len() >= 60 && prev[6] == 6 => 40,
        _ => return None,
    };
    let thl = usize::from(*prev.get(l4 + 12)? >> 4) * 4;
    let hdrs = l4 + thl;
    if thl < 20 || hdrs > prev.len() {
        return None;
    }
    let seq = u32::from_be_bytes(prev[l4 + 4..l4 + 8].try_into().ok()?);
    let next = seq.wrapping_add((prev.len() - hdrs) as u32);
    let mut p = prev[..hdrs].to_vec();
    p.extend_from_slice(payload);
    p[l4 + 4..l4 + 8].copy_from_slice(&next.to_be_bytes());
    p[l4 + 13] = flags;
    if p[0] >> 4 == 4 {
        let n = u16::try_from(p.len()).ok()?;
        p[2..4].copy_from_slice(&n.to_be_bytes());
    } else {
        let n = u16::try_from(p.len() - 40).ok()?;
        p[4..6].copy_from_slice(&n.to_be_bytes());
    }
    fix_checksums(&mut p);
    Some(p)
}

/// Where the TCP header of `p` starts, if `p` is a whole IPv4 (any IHL) or IPv6 TCP packet.
fn tcp_offset(p: &[u8]) -> Option<usize> {
    let l4 = match p.first()? >> 4 {
        4 if p.len() >= 20 && p[9] == 6 => usize::from(p[0] & 0x0f) * 4,
        6 if p.len() >= 40 && p[6] == 6 => 40,
        _ => return None,
    };
    (l4 >= 20 && p.len() >= l4 + 20).then_some(l4)
}

/// Sets the IPv4 header checksum and the TCP checksum of a TCP packet (reference code), so that
/// the coalescer, which merges only segments whose checksums verify, gets trains to merge.
pub fn fix_checksums(p: &mut [u8]) {
    let Some(l4) = tcp_offset(p) else { return };
    if p[0] >> 4 == 4 {
        p[10..12].fill(0);
        let c = !checksum::data(&p[..l4]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p[l4 + 16..l4 + 18].fill(0);
    let len = p.len() - l4;
    let pseudo = if p[0] >> 4 == 4 {
        let s = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let d = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        checksum::pseudo_header_v4(s, d, 6, len as u16)
    } else {
        let s = Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap());
        let d = Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap());
        checksum::pseudo_header_v6(s, d, 6, len as u32)
    };
    let c = !checksum::combine(&[pseudo, checksum::data(&p[l4..])]);
    p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
}

/// A TCP packet with payload whose IPv4 header or TCP checksum does not verify.
fn bad_tcp(p: &[u8]) -> bool {
    let Some(l4) = tcp_offset(p) else {
        return false;
    };
    let thl = usize::from(p[l4 + 12] >> 4) * 4;
    let payload = p.len() > l4 + thl;
    payload && ((p[0] >> 4 == 4 && !ipv4_header_ok(p)) || !l4_checksum_ok(p, l4, 6))
}

/// The flow of a packet as the oracle orders it: addresses and ports when TCP, else none.
fn flow(p: &[u8]) -> Option<Vec<u8>> {
    match p.first()? >> 4 {
        4 if p.len() >= 24 && p[9] == 6 => {
            let l4 = usize::from(p[0] & 0x0f) * 4;
            Some([&p[12..20], p.get(l4..l4 + 4)?].concat())
        }
        6 if p.len() >= 44 && p[6] == 6 => Some([&p[8..40], &p[40..44]].concat()),
        _ => None,
    }
}

/// Offers `packets` to a coalescer and checks what it writes (see gro_coalesce.rs).
pub fn coalesce_check(packets: &[Vec<u8>]) {
    let mut g = Coalescer::new();
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut sink = |h: &[u8; VNET_HDR_LEN], p: &[u8], segments: usize| {
        written.extend(expand(h, p, segments));
    };
    for p in packets {
        g.offer(p, &mut sink);
    }
    g.flush(&mut sink);
    assert_eq!(
        written.len(),
        packets.len(),
        "one wire packet per offered packet"
    );
    // A segment whose checksum does not verify is never merged: it leaves byte for byte.
    for p in packets.iter().filter(|p| bad_tcp(p)) {
        let offered = packets.iter().filter(|q| *q == p).count();
        let verbatim = written.iter().filter(|q| *q == p).count();
        assert!(verbatim >= offered, "a bad-checksum segment was merged");
    }
    // Per flow (TCP 4-tuple), the order is kept; non-TCP packets keep their bytes.
    let by_flow = |v: &[Vec<u8>]| {
        let mut m: std::collections::BTreeMap<Option<Vec<u8>>, Vec<Vec<u8>>> = Default::default();
        for p in v {
            m.entry(flow(p)).or_default().push(norm(p));
        }
        m
    };
    let (mut a, mut b) = (by_flow(packets), by_flow(&written));
    // Non-TCP packets are independent of each other: compared as a multiset.
    if let (Some(x), Some(y)) = (a.get_mut(&None), b.get_mut(&None)) {
        x.sort();
        y.sort();
    }
    assert_eq!(a, b);
}
