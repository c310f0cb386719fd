//! Offload fix-ups of podrouter-core's `offload::vnet` on an arbitrary vnet header and packet, as
//! the TUN hands them over: `wire_size`, `shift_for_link`, `complete_csum` and `segment`. Nothing may
//! panic; a segmentation that succeeds yields `wire_size` segments, each within the MSS, with
//! valid IPv4 header and TCP/UDP checksums, and their payloads put together are the original
//! payload; a completed checksum equals the reference computation.
//!
//! Input: 10 bytes of vnet header, one mode byte, the packet. Mode bit 0 sets the IP length field
//! to the buffer's length (so the fuzzer need not find it), bits 1-2 pick the headroom, bits 3-4
//! where the inner packet starts when the bytes are taken as a tunnel datagram's payload for
//! `offload::tnl::build_prefix` / `build_prefix6` (UDP-tunnel GSO over either underlay family).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use podrouter_core::offload::tnl;
use podrouter_core::offload::vnet::{self, VnetHdr, VNET_HDR_LEN};
use podrouter_core::wire::checksum;

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN + 1 {
        return;
    }
    let hdr = VnetHdr::parse(data).unwrap();
    let mode = data[VNET_HDR_LEN];
    let mut pkt = data[VNET_HDR_LEN + 1..].to_vec();
    if mode & 1 != 0 {
        match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 && pkt.len() <= 65535 => {
                let n = pkt.len() as u16;
                pkt[2..4].copy_from_slice(&n.to_be_bytes());
            }
            Some(6) if pkt.len() >= 40 && pkt.len() - 40 <= 65535 => {
                let n = (pkt.len() - 40) as u16;
                pkt[4..6].copy_from_slice(&n.to_be_bytes());
            }
            _ => {}
        }
    }
    let headroom = [0usize, 1, 14, 64][usize::from(mode >> 1) & 3];

    // UDP-tunnel GSO (offload::tnl): `pkt` read as a tunnel datagram's payload with the inner
    // packet at `inner_off`; a prefix either family builds is one the kernel accepts, and over
    // IPv6 the outer UDP checksum field is the pseudo-header sum (never zero).
    let inner_off = [0usize, 8, 22, 30][usize::from(mode >> 3) & 3];
    let mut pre4 = [0u8; tnl::PREFIX_LEN];
    let outer = tnl::Outer {
        dst_mac: [2, 0, 0, 0, 0, 1],
        src_mac: [2, 0, 0, 0, 0, 2],
        src: [192, 0, 2, 1],
        dst: [192, 0, 2, 2],
        src_port: 50000,
        dst_port: 4789,
        tos: mode,
        ttl: 65,
        id: 0,
    };
    if tnl::build_prefix(&mut pre4, &outer, &pkt, inner_off, &hdr).is_ok() {
        let t = tnl::TnlHdr::parse(&pre4).unwrap();
        assert!(t.kernel_accepts(tnl::OUTER_LEN + pkt.len()));
    }
    let mut pre6 = [0u8; tnl::PREFIX6_LEN];
    let outer6 = tnl::Outer6 {
        dst_mac: [2, 0, 0, 0, 0, 1],
        src_mac: [2, 0, 0, 0, 0, 2],
        src: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        dst: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        src_port: 50000,
        dst_port: 4789,
        tclass: mode,
        flow_label: u32::from(mode) << 12,
        hop_limit: 65,
    };
    if tnl::build_prefix6(&mut pre6, &outer6, &pkt, inner_off, &hdr).is_ok() {
        let t = tnl::TnlHdr::parse(&pre6).unwrap();
        assert!(t.kernel_accepts(tnl::OUTER6_LEN + pkt.len()));
        let at = tnl::TNL_HDR_LEN + tnl::OUTER6_TH + 6;
        assert_ne!([pre6[at], pre6[at + 1]], [0, 0]);
    }

    let (n, bytes) = vnet::wire_size(&pkt, &hdr);
    assert!(n >= 1 && bytes >= pkt.len().min(bytes));
    if let Ok(out) = vnet::shift_for_link(&pkt, &hdr, 14) {
        if out.needs_csum() {
            assert!(out.csum_start >= 14);
        }
        if hdr.is_gso() {
            assert!(usize::from(out.hdr_len) <= pkt.len() + 14);
        }
    }

    // complete_csum against the reference: the field ends up as the complement of the sum of
    // everything from `start` (taken with the field as it was).
    let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
    let mut c = pkt.clone();
    if vnet::complete_csum(&mut c, start, off).is_ok() {
        let want = !checksum::data(&pkt[start..]);
        let got = u16::from_be_bytes([c[start + off], c[start + off + 1]]);
        assert!(common::same_sum(!got, !want), "{got:#x} vs {want:#x}");
        assert_eq!(&c[..start + off], &pkt[..start + off]);
        assert_eq!(&c[start + off + 2..], &pkt[start + off + 2..]);
    }

    let mut out = Vec::new();
    let mut segs = Vec::new();
    if vnet::segment(&pkt, &hdr, headroom, &mut out, &mut segs).is_err() {
        assert!(segs.is_empty());
        return;
    }
    assert_eq!(segs.len(), n, "segment count = wire_size");
    let mss = usize::from(hdr.gso_size);
    let v4 = pkt[0] >> 4 == 4;
    let l4 = if hdr.needs_csum() {
        usize::from(hdr.csum_start)
    } else if v4 {
        usize::from(pkt[0] & 0x0f) * 4
    } else {
        40
    };
    let end = if v4 {
        usize::from(u16::from_be_bytes([pkt[2], pkt[3]]))
    } else {
        40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]))
    };
    let tcp = matches!(
        hdr.gso_kind(),
        vnet::gso_type::TCPV4 | vnet::gso_type::TCPV6
    );
    let hdrs = l4
        + if tcp {
            usize::from(pkt[l4 + 12] >> 4) * 4
        } else {
            8
        };
    let mut payload = Vec::new();
    let mut wire = 0;
    let mut prev_end = 0;
    for r in &segs {
        assert!(r.start >= prev_end + headroom, "headroom kept");
        assert!(out[r.start - headroom..r.start].iter().all(|&b| b == 0));
        prev_end = r.end;
        let s = &out[r.clone()];
        assert!(s.len() >= hdrs && s.len() - hdrs <= mss.max(1));
        wire += s.len();
        if v4 {
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            assert!(common::ipv4_header_ok(s), "IPv4 header checksum");
        } else {
            assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])) + 40, s.len());
        }
        assert!(
            common::l4_checksum_ok(s, l4, if tcp { 6 } else { 17 }),
            "transport checksum"
        );
        payload.extend_from_slice(&s[hdrs..]);
    }
    assert_eq!(&payload[..], &pkt[hdrs..end], "payload preserved");
    assert_eq!(wire, bytes, "wire_size bytes");
});
