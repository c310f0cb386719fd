//! The virtio-net header that prefixes every packet on a TUN opened with `IFF_VNET_HDR` and every
//! frame on an AF_PACKET socket with `PACKET_VNET_HDR`, and the userspace TSO/USO segmentation that
//! turns a GSO super-packet read from the TUN into wire-sized packets with finished checksums.
//!
//! Byte order: TUN and AF_PACKET use the legacy (pre-1.0) virtio header, whose fields are in host
//! byte order unless `TUNSETVNETLE`/`TUNSETVNETBE` is used (we never call those).
//!
//! Nothing here panics on any input: every offset taken from the header or the packet is checked
//! against the buffer, and a packet that does not add up is reported as `OffloadError::Malformed`.

use super::csum;
use core::ops::Range;

/// `sizeof(struct virtio_net_hdr)`; the 12-byte `virtio_net_hdr_mrg_rxbuf` adds `num_buffers`,
/// which neither TUN nor AF_PACKET use, so we ask for the short one with `TUNSETVNETHDRSZ`.
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_*`.
pub mod flags {
    /// `csum_start`/`csum_offset` are valid and the checksum field holds the pseudo-header sum.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum was verified (received packets only).
    pub const DATA_VALID: u8 = 2;
}

/// `VIRTIO_NET_HDR_GSO_*`.
pub mod gso_type {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    /// IPv4 UDP fragmentation offload (UFO): never negotiated (we do not set `TUN_F_UFO`).
    pub const UDP: u8 = 3;
    pub const TCPV6: u8 = 4;
    /// UDP segmentation offload (USO, `TUN_F_USO4`/`TUN_F_USO6`, Linux 6.2).
    pub const UDP_L4: u8 = 5;
    /// Flag: the super-packet carries CWR; only the first segment may keep it (RFC 3168 §6.1.2).
    pub const ECN: u8 = 0x80;
}

/// Most segments one super-packet may produce. A 64 KiB packet with the smallest MSS Linux sends
/// (`tcp_min_snd_mss`, 48) is ~1400 segments; anything above this bound is not a real packet.
pub const MAX_SEGMENTS: usize = 2048;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads a header; `None` when `b` is shorter than [`VNET_HDR_LEN`].
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_ne_bytes([b[2], b[3]]),
            gso_size: u16::from_ne_bytes([b[4], b[5]]),
            csum_start: u16::from_ne_bytes([b[6], b[7]]),
            csum_offset: u16::from_ne_bytes([b[8], b[9]]),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b`; returns `false` (and writes
    /// nothing) when `b` is too short.
    pub fn emit(&self, b: &mut [u8]) -> bool {
        let Some(b) = b.get_mut(..VNET_HDR_LEN) else {
            return false;
        };
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        true
    }

    /// The GSO kind without the ECN flag.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !gso_type::ECN
    }

    pub fn is_gso(&self) -> bool {
        self.gso_kind() != gso_type::NONE
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & flags::NEEDS_CSUM != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Lengths or offsets that do not add up, or a GSO kind that does not match the packet.
    Malformed,
    /// A GSO kind we never negotiate (UFO).
    Unsupported,
}

/// Finishes a `NEEDS_CSUM` checksum in place: the field at `start + offset` holds the pseudo-header
/// sum, so the one's-complement sum of everything from `start` to the end, complemented, is the
/// final checksum (virtio spec 5.1.6.2, Linux `skb_checksum_help`).
pub fn complete_csum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let field = start.checked_add(offset).ok_or(OffloadError::Malformed)?;
    match field.checked_add(2) {
        Some(e) if e <= pkt.len() && start & 1 == 0 => {}
        _ => return Err(OffloadError::Malformed),
    }
    let s = csum::sum(&pkt[start..]);
    pkt[field..field + 2].copy_from_slice(&csum::finish(s).to_be_bytes());
    Ok(())
}

/// Where the headers of an offloaded packet are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    v4: bool,
    /// Offset of the transport header (== `csum_start` when given).
    l4: usize,
    /// Length of all headers through the transport header.
    hdrs: usize,
    /// End of the IP packet as its length field says (may be shorter than the buffer).
    end: usize,
    tcp: bool,
}

fn layout(pkt: &[u8], hdr: &VnetHdr) -> Result<Layout, OffloadError> {
    let first = *pkt.first().ok_or(OffloadError::Malformed)?;
    let (v4, l3, end) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || pkt.len() < ihl {
                return Err(OffloadError::Malformed);
            }
            (true, ihl, usize::from(u16::from_be_bytes([pkt[2], pkt[3]])))
        }
        6 => {
            if pkt.len() < 40 {
                return Err(OffloadError::Malformed);
            }
            (
                false,
                40,
                40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
            )
        }
        _ => return Err(OffloadError::Malformed),
    };
    if end > pkt.len() || end < l3 {
        return Err(OffloadError::Malformed);
    }
    let tcp = match hdr.gso_kind() {
        gso_type::TCPV4 if v4 => true,
        gso_type::TCPV6 if !v4 => true,
        gso_type::UDP_L4 => false,
        gso_type::UDP => return Err(OffloadError::Unsupported),
        _ => return Err(OffloadError::Malformed),
    };
    // With NEEDS_CSUM the kernel tells us where L4 starts (this skips IPv6 extension headers);
    // without it only a plain header can be handled.
    let l4 = if hdr.needs_csum() {
        usize::from(hdr.csum_start)
    } else {
        l3
    };
    if l4 < l3 {
        return Err(OffloadError::Malformed);
    }
    if l4 == l3 {
        let proto = if v4 { pkt[9] } else { pkt[6] };
        if proto != if tcp { 6 } else { 17 } {
            return Err(OffloadError::Malformed);
        }
    }
    let thl = if tcp {
        let off = *pkt.get(l4 + 12).ok_or(OffloadError::Malformed)?;
        let thl = usize::from(off >> 4) * 4;
        if thl < 20 {
            return Err(OffloadError::Malformed);
        }
        thl
    } else {
        8
    };
    let hdrs = l4 + thl;
    if hdrs > end {
        return Err(OffloadError::Malformed);
    }
    Ok(Layout {
        v4,
        l4,
        hdrs,
        end,
        tcp,
    })
}

/// The vnet header to send a TUN super-packet unchanged through AF_PACKET after an `eth_len`-byte
/// link header was put in front: offsets move by `eth_len`, and `hdr_len` is set to the real header
/// length so the kernel copies only headers into the linear part of the skb.
pub fn shift_for_link(pkt: &[u8], hdr: &VnetHdr, eth_len: u16) -> Result<VnetHdr, OffloadError> {
    let mut out = *hdr;
    if hdr.is_gso() {
        let l = layout(pkt, hdr)?;
        out.hdr_len = u16::try_from(l.hdrs).map_err(|_| OffloadError::Malformed)? + eth_len;
        if !hdr.needs_csum() {
            out.flags |= flags::NEEDS_CSUM;
            out.csum_start = l.l4 as u16;
            out.csum_offset = if l.tcp { 16 } else { 6 };
        }
    } else {
        out.hdr_len = 0;
    }
    if out.needs_csum() {
        out.csum_start = out
            .csum_start
            .checked_add(eth_len)
            .ok_or(OffloadError::Malformed)?;
    }
    Ok(out)
}

/// How many wire packets and bytes `pkt` stands for: a GSO super-packet counts once per segment,
/// each with its own copy of the headers. Anything that does not parse counts as one packet.
pub fn wire_size(pkt: &[u8], hdr: &VnetHdr) -> (usize, usize) {
    if !hdr.is_gso() || hdr.gso_size == 0 {
        return (1, pkt.len());
    }
    match layout(pkt, hdr) {
        Ok(l) => {
            let n = (l.end - l.hdrs).div_ceil(usize::from(hdr.gso_size)).max(1);
            (n, l.end + (n - 1) * l.hdrs)
        }
        Err(_) => (1, pkt.len()),
    }
}

/// Splits the GSO super-packet `pkt` (described by `hdr`) into wire-sized packets with finished
/// IPv4 header and TCP/UDP checksums, appended to `out`, each preceded by `headroom` zero bytes (room
/// for the caller's encapsulation headers, so that `[headroom][segment]` units lie back to back and
/// can go out as one UDP GSO send). `segs` receives the range of each segment (without headroom).
///
/// TCP (RFC 9293 / Linux `tcp_gso_segment`): segment *i* gets `seq + i * gso_size`; FIN and PSH only
/// on the last segment, CWR only on the first (RFC 3168 §6.1.2); IPv4 identification increments per
/// segment as Linux does for non-fixed-id TSO.
pub fn segment(
    pkt: &[u8],
    hdr: &VnetHdr,
    headroom: usize,
    out: &mut Vec<u8>,
    segs: &mut Vec<Range<usize>>,
) -> Result<(), OffloadError> {
    let l = layout(pkt, hdr)?;
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::Malformed);
    }
    let payload = l.end - l.hdrs;
    let nsegs = payload.div_ceil(mss).max(1);
    if nsegs > MAX_SEGMENTS {
        return Err(OffloadError::Malformed);
    }
    out.reserve(nsegs * (headroom + l.hdrs) + payload);
    let headers = &pkt[..l.hdrs];
    let ip_id = if l.v4 {
        u16::from_be_bytes([pkt[4], pkt[5]])
    } else {
        0
    };
    let seq = if l.tcp {
        u32::from_be_bytes([pkt[l.l4 + 4], pkt[l.l4 + 5], pkt[l.l4 + 6], pkt[l.l4 + 7]])
    } else {
        0
    };
    let (src, dst): (&[u8], &[u8]) = if l.v4 {
        (&pkt[12..16], &pkt[16..20])
    } else {
        (&pkt[8..24], &pkt[24..40])
    };
    let proto = if l.tcp { 6 } else { 17 };
    for i in 0..nsegs {
        let from = l.hdrs + i * mss;
        let to = (from + mss).min(l.end);
        let chunk = &pkt[from..to];
        let seg_len = l.hdrs + chunk.len();
        out.resize(out.len() + headroom, 0);
        let base = out.len();
        out.extend_from_slice(headers);
        out.extend_from_slice(chunk);
        let seg = &mut out[base..base + seg_len];
        let l4_len = seg_len - l.l4;
        if l.v4 {
            seg[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].fill(0);
            let ihl = usize::from(seg[0] & 0x0f) * 4;
            let c = !csum::sum(&seg[..ihl]);
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[4..6].copy_from_slice(&((seg_len - 40) as u16).to_be_bytes());
        }
        let th = l.l4;
        let check_at = if l.tcp {
            let s = seq.wrapping_add((i * mss) as u32);
            seg[th + 4..th + 8].copy_from_slice(&s.to_be_bytes());
            let mut f = seg[th + 13];
            if i + 1 != nsegs {
                f &= !(0x01 | 0x08); // FIN, PSH
            }
            if i != 0 {
                f &= !0x80; // CWR
            }
            seg[th + 13] = f;
            th + 16
        } else {
            seg[th + 4..th + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            th + 6
        };
        seg[check_at..check_at + 2].fill(0);
        let pseudo = if l.v4 {
            csum::pseudo_v4(src, dst, proto, l4_len as u16)
        } else {
            csum::pseudo_v6(src, dst, proto, l4_len as u32)
        };
        let c = csum::finish(csum::add(pseudo, csum::sum(&seg[th..])));
        seg[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        segs.push(base..base + seg_len);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP/IPv4 super-packet as the kernel hands it over with TSO: checksum field holds the
    /// pseudo-header sum over the whole super-packet length (NEEDS_CSUM).
    pub(crate) fn tso_v4(payload_len: usize, mss: u16, flags: u8) -> (Vec<u8>, VnetHdr) {
        let total = 20 + 32 + payload_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[1] = 0x02; // ECT(0)
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes()); // id close to wrap-around
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 244, 1, 1]);
        p[16..20].copy_from_slice(&[10, 244, 2, 1]);
        let c = !csum::sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let t = 20;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // seq wraps inside
        p[t + 8..t + 12].copy_from_slice(&7u32.to_be_bytes());
        p[t + 12] = 8 << 4; // 32-byte header: timestamps option
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&512u16.to_be_bytes());
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        for (i, b) in p[t + 32..].iter_mut().enumerate() {
            *b = (i * 31 + 7) as u8;
        }
        let pseudo = csum::pseudo_v4(&[10, 244, 1, 1], &[10, 244, 2, 1], 6, (total - 20) as u16);
        p[t + 16..t + 18].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VnetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso_type::TCPV4,
            hdr_len: 52,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (p, hdr)
    }

    pub(crate) fn tcp_v4_ok(seg: &[u8]) -> bool {
        use crate::wire::checksum as c;
        let ip_ok = c::data(&seg[..20]) == 0xffff;
        let src = core::net::Ipv4Addr::new(seg[12], seg[13], seg[14], seg[15]);
        let dst = core::net::Ipv4Addr::new(seg[16], seg[17], seg[18], seg[19]);
        let l4 = &seg[20..];
        let ps = c::pseudo_header_v4(src, dst, 6, l4.len() as u16);
        ip_ok && c::combine(&[ps, c::data(l4)]) == 0xffff
    }

    #[test]
    fn header_roundtrip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut b = [0u8; 10];
        assert!(h.emit(&mut b));
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(h.gso_kind(), gso_type::TCPV4);
        assert!(h.is_gso() && h.needs_csum());
        assert_eq!(VnetHdr::parse(&b[..9]), None);
        assert!(!h.emit(&mut [0u8; 9]));
        assert!(!VnetHdr::default().is_gso());
    }

    #[test]
    fn tso_v4_segments_are_valid() {
        let (p, hdr) = tso_v4(10_000, 1448, 0x18 | 0x80 | 0x01); // PSH ACK CWR FIN
        let mut out = Vec::new();
        let mut segs = Vec::new();
        segment(&p, &hdr, 50, &mut out, &mut segs).unwrap();
        assert_eq!(segs.len(), 7);
        let mut payload = Vec::new();
        for (i, r) in segs.iter().enumerate() {
            let s = &out[r.clone()];
            assert!(tcp_v4_ok(s), "segment {i} checksums");
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            assert_eq!(
                u16::from_be_bytes([s[4], s[5]]),
                0xfff0u16.wrapping_add(i as u16)
            );
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 0xffff_f000u32.wrapping_add(i as u32 * 1448));
            let f = s[33];
            assert_eq!(f & 0x80 != 0, i == 0, "CWR only first");
            assert_eq!(f & 0x09 != 0, i == 6, "FIN/PSH only last");
            assert_eq!(f & 0x10, 0x10, "ACK everywhere");
            assert_eq!(&s[40..52], &p[40..52], "options copied");
            if i < 6 {
                assert_eq!(s.len(), 52 + 1448);
                assert_eq!(r.start, 50 + i * (50 + 52 + 1448), "units are back to back");
            }
            payload.extend_from_slice(&s[52..]);
        }
        assert_eq!(payload, &p[52..]);
    }

    #[test]
    fn tso_v6_and_uso_segments_are_valid() {
        use crate::wire::checksum as c;
        use core::net::Ipv6Addr;
        for tcp in [true, false] {
            let hl = if tcp { 20 } else { 8 };
            let plen = 3000;
            let mut p = vec![0u8; 40 + hl + plen];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((hl + plen) as u16).to_be_bytes());
            p[6] = if tcp { 6 } else { 17 };
            p[7] = 64;
            let s: Ipv6Addr = "fd00:244:1::1".parse().unwrap();
            let d: Ipv6Addr = "fd00:244:2::1".parse().unwrap();
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(&d.octets());
            if tcp {
                p[52] = 5 << 4;
                p[53] = 0x10;
            }
            for (i, b) in p[40 + hl..].iter_mut().enumerate() {
                *b = i as u8;
            }
            let hdr = VnetHdr {
                flags: flags::NEEDS_CSUM,
                gso_type: if tcp {
                    gso_type::TCPV6
                } else {
                    gso_type::UDP_L4
                },
                hdr_len: (40 + hl) as u16,
                gso_size: 1200,
                csum_start: 40,
                csum_offset: if tcp { 16 } else { 6 },
            };
            let (mut out, mut segs) = (Vec::new(), Vec::new());
            segment(&p, &hdr, 0, &mut out, &mut segs).unwrap();
            assert_eq!(segs.len(), 3);
            for r in &segs {
                let sg = &out[r.clone()];
                assert_eq!(
                    usize::from(u16::from_be_bytes([sg[4], sg[5]])) + 40,
                    sg.len()
                );
                let ps = c::pseudo_header_v6(s, d, p[6], (sg.len() - 40) as u32);
                assert_eq!(c::combine(&[ps, c::data(&sg[40..])]), 0xffff);
                if !tcp {
                    assert_eq!(
                        usize::from(u16::from_be_bytes([sg[44], sg[45]])),
                        sg.len() - 40
                    );
                }
            }
        }
    }

    #[test]
    fn complete_csum_finishes_partial() {
        // A non-GSO packet with NEEDS_CSUM: payload short of one MSS.
        let (mut p, _) = tso_v4(100, 1448, 0x18);
        complete_csum(&mut p, 20, 16).unwrap();
        assert!(tcp_v4_ok(&p));
        assert_eq!(
            complete_csum(&mut p, 20, 1000),
            Err(OffloadError::Malformed)
        );
        assert_eq!(
            complete_csum(&mut p, usize::MAX, 16),
            Err(OffloadError::Malformed)
        );
    }

    #[test]
    fn malformed_inputs_are_rejected_not_panicking() {
        let (p, hdr) = tso_v4(5000, 1000, 0x10);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        for cut in [0, 1, 19, 20, 30, 51, 52, 100, p.len() - 1] {
            let r = segment(&p[..cut], &hdr, 8, &mut out, &mut segs);
            assert_eq!(r, Err(OffloadError::Malformed), "cut {cut}");
        }
        let bad = [
            VnetHdr { gso_size: 0, ..hdr },
            VnetHdr {
                gso_type: gso_type::TCPV6,
                ..hdr
            },
            VnetHdr {
                csum_start: 10,
                ..hdr
            },
            VnetHdr {
                csum_start: 60000,
                ..hdr
            },
            VnetHdr { gso_size: 1, ..hdr },
        ];
        for h in bad {
            assert_eq!(
                segment(&p, &h, 8, &mut out, &mut segs),
                Err(OffloadError::Malformed),
                "{h:?}"
            );
        }
        assert_eq!(
            segment(
                &p,
                &VnetHdr {
                    gso_type: gso_type::UDP,
                    ..hdr
                },
                8,
                &mut out,
                &mut segs
            ),
            Err(OffloadError::Unsupported)
        );
        // Arbitrary bytes: must not panic.
        let mut x: u32 = 1;
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            if let Some(b) = buf.first_mut() {
                *b = if x & 1 == 0 { 0x45 } else { 0x60 };
            }
            let h = VnetHdr {
                flags: (x >> 8) as u8 & 1,
                gso_type: [1, 4, 5, 0x81][(x >> 9) as usize % 4],
                hdr_len: 0,
                gso_size: (x >> 12) as u16 % 64,
                csum_start: (x >> 16) as u16 % 64,
                csum_offset: 16,
            };
            out.clear();
            segs.clear();
            let _ = segment(&buf, &h, 4, &mut out, &mut segs);
            let _ = shift_for_link(&buf, &h, 14);
        }
    }

    #[test]
    fn shift_for_link_moves_offsets() {
        let (p, hdr) = tso_v4(5000, 1000, 0x10);
        let h = shift_for_link(&p, &hdr, 14).unwrap();
        assert_eq!(h.csum_start, 34);
        assert_eq!(h.csum_offset, 16);
        assert_eq!(h.hdr_len, 14 + 52);
        assert_eq!(h.gso_size, 1000);
        let plain = VnetHdr::default();
        assert_eq!(shift_for_link(&p, &plain, 14).unwrap(), plain);
        // 5000 bytes in 1000-byte segments, each with 52 bytes of headers.
        assert_eq!(wire_size(&p, &hdr), (5, 5000 + 5 * 52));
        assert_eq!(wire_size(&p, &plain), (1, p.len()));
    }
}
