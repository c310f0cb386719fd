//! TCP and UDP coalescing for the TUN write path (userspace GRO), the ingress twin of TSO on reads.
//!
//! UDP: consecutive datagrams of one flow (addresses, ports) with the same IP fields and equal
//! payloads (the last may be shorter and closes the train), checksums verified, at most 64
//! (`UDP_MAX_SEGMENTS`), are written as ONE `GSO_UDP_L4` packet (`NEEDS_CSUM`, `csum_offset` 6);
//! the kernel forwards it whole and the receiving socket segments it back (or takes it whole
//! with `UDP_GRO`). An IPv4 datagram without a checksum (0) is written through unchanged. The
//! rest of this text is TCP's.
//!
//! A UDP GRO train from one peer usually carries consecutive segments of one inner TCP flow. Writing
//! each to the TUN costs a syscall and a trip through the stack per ~1.4 KB; merging them into one
//! super-packet and writing it with a GSO vnet header (`NEEDS_CSUM`, `GSO_TCPV4/6`) costs one, and
//! the kernel forwards the merged skb to the pod as if the NIC had done GRO (wireguard-go and
//! tailscale do the same). The merge rules follow Linux `tcp_gro_receive`, so that the kernel could
//! re-segment the result into exactly the packets that arrived:
//!
//! * same flow (addresses, ports), next sequence number exactly following the previous payload;
//! * identical IP header fields that segmentation copies (TOS/traffic class including ECN, TTL /
//!   hop limit, DF, flow label) and identical TCP ACK, window and options;
//! * flags ACK, optionally PSH; PSH or a segment shorter than the first ends the train (a CE mark,
//!   CWR/ECE, SYN, FIN, RST or URG is never merged, so ECN signals survive unchanged);
//! * IPv4 without options or fragmentation, IPv6 without extension headers;
//! * at most 64 KiB.
//!
//! The merged packet's TCP checksum field holds the pseudo-header sum (virtio `NEEDS_CSUM`
//! semantics) and its IPv4 header checksum is recomputed. Packets are copied into per-flow buffers;
//! anything not mergeable is written through unchanged. Safe code; never panics on any input.
//!
//! Checksums are verified before a segment joins a train, as Linux GRO validates them before it
//! merges: a merged packet leaves with `NEEDS_CSUM`, so the pod's stack trusts it, and merging a
//! segment that was corrupted on the underlay (VXLAN peers usually send a zero outer UDP checksum,
//! which covers nothing) would launder the corruption into a packet with a good checksum. A
//! segment whose IPv4 header or TCP checksum does not verify is written through unchanged, after
//! its flow's open train, and the pod's stack drops it as it would on a wire.

use super::csum;
use super::vnet::{flags, gso_type, VnetHdr, VNET_HDR_LEN};

/// Open trains kept at once (flows interleaved within one receive batch).
const MAX_OPEN: usize = 8;
/// Largest merged IP packet (IPv4 total length / IPv6 payload length are 16 bits).
const MAX_PACKET: usize = 65535;

/// Where the write goes: (vnet header, packet, how many wire segments it stands for).
pub trait Sink {
    fn write(&mut self, hdr: &[u8; VNET_HDR_LEN], pkt: &[u8], segments: usize);
}

impl<F: FnMut(&[u8; VNET_HDR_LEN], &[u8], usize)> Sink for F {
    fn write(&mut self, hdr: &[u8; VNET_HDR_LEN], pkt: &[u8], segments: usize) {
        self(hdr, pkt, segments)
    }
}

const NO_OFFLOAD: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// What identifies a flow: addresses and ports (IPv4 addresses in the first 8 bytes), then the
/// protocol (TCP or UDP).
type FlowKey = [u8; 37];

/// `UDP_MAX_SEGMENTS` before Linux 6.9: a TUN write of a UDP GSO packet with more segments is
/// refused (`virtio_net_hdr_to_skb`).
const MAX_UDP_SEGMENTS: usize = 64;
const TCP: u8 = 6;
const UDP: u8 = 17;

struct Info {
    key: FlowKey,
    v4: bool,
    /// UDP (a datagram train: equal payloads, the last may be shorter) rather than TCP.
    udp: bool,
    /// Offset of the TCP header (= IP header length).
    l4: usize,
    /// IP + TCP header length.
    hdrs: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// The TCP or UDP facts of `pkt` if it is a candidate for merging at all.
fn inspect(pkt: &[u8]) -> Option<Info> {
    let mut key = [0u8; 37];
    let (v4, l4, total, proto) = match pkt.first()? >> 4 {
        4 => {
            // IHL 5 only (options would have to match too), not a fragment (MF clear, offset 0),
            // protocol TCP or UDP.
            if pkt.len() < 20
                || pkt[0] != 0x45
                || (pkt[9] != TCP && pkt[9] != UDP)
                || (pkt[6] & 0x3f) != 0
                || pkt[7] != 0
            {
                return None;
            }
            key[..8].copy_from_slice(&pkt[12..20]);
            let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
            (true, 20, total, pkt[9])
        }
        6 => {
            if pkt.len() < 40 || (pkt[6] != TCP && pkt[6] != UDP) {
                return None;
            }
            key[..32].copy_from_slice(&pkt[8..40]);
            let total = 40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            (false, 40, total, pkt[6])
        }
        _ => return None,
    };
    key[36] = proto;
    if proto == UDP {
        // The UDP length must be the packet's; an IPv4 datagram without a checksum (0) is
        // written through: merging would give it one it never had.
        if total != pkt.len() || pkt.len() < l4 + 8 {
            return None;
        }
        let u = &pkt[l4..];
        let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
        if ulen != pkt.len() - l4 || (v4 && u[6..8] == [0, 0]) {
            return None;
        }
        key[32..36].copy_from_slice(&u[..4]);
        return Some(Info {
            key,
            v4,
            udp: true,
            l4,
            hdrs: l4 + 8,
            seq: 0,
            flags: 0,
            payload: pkt.len() - l4 - 8,
        });
    }
    if total != pkt.len() || pkt.len() < l4 + 20 {
        return None;
    }
    let t = &pkt[l4..];
    let thl = usize::from(t[12] >> 4) * 4;
    if thl < 20 || l4 + thl > pkt.len() {
        return None;
    }
    key[32..36].copy_from_slice(&t[..4]);
    Some(Info {
        key,
        v4,
        udp: false,
        l4,
        hdrs: l4 + thl,
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        flags: t[13],
        payload: pkt.len() - l4 - thl,
    })
}

struct Train {
    key: FlowKey,
    v4: bool,
    udp: bool,
    l4: usize,
    hdrs: usize,
    /// Payload size of the first segment: the GSO size.
    mss: usize,
    next_seq: u32,
    segments: usize,
    closed: bool,
    /// The merged packet so far (headers of the first segment, then all payloads).
    buf: Vec<u8>,
}

impl Train {
    /// Whether `pkt` (described by `i`) continues this train.
    fn accepts(&self, pkt: &[u8], i: &Info) -> bool {
        if i.udp {
            return self.accepts_datagram(pkt, i);
        }
        if self.closed
            || i.seq != self.next_seq
            || i.payload == 0
            || i.payload > self.mss
            || i.hdrs != self.hdrs
        {
            return false;
        }
        if self.buf.len() + i.payload > MAX_PACKET {
            return false;
        }
        let first = &self.buf[..self.hdrs];
        let same_ip = self.same_ip(pkt);
        let (a, b) = (&first[self.l4..], &pkt[self.l4..self.hdrs]);
        // ACK number, data offset, window, options equal; flags equal but for PSH.
        same_ip
            && a[8..13] == b[8..13]
            && (a[13] & !PSH) == (b[13] & !PSH)
            && a[14..16] == b[14..16]
            && a[20..] == b[20..]
    }

    /// The IP header fields segmentation copies are equal: IPv4 TOS (incl. ECN), DF/flags, TTL,
    /// protocol (not length, ID, checksum); IPv6 version, traffic class, flow label, next header,
    /// hop limit.
    fn same_ip(&self, pkt: &[u8]) -> bool {
        let first = &self.buf;
        if self.v4 {
            first[1] == pkt[1] && first[6] == pkt[6] && first[8] == pkt[8] && first[9] == pkt[9]
        } else {
            first[..4] == pkt[..4] && first[6..8] == pkt[6..8]
        }
    }

    /// A UDP datagram continues the train: the same IP fields, a payload no longer than the
    /// first's (a shorter one closes the train), at most [`MAX_UDP_SEGMENTS`] and 64 KiB.
    fn accepts_datagram(&self, pkt: &[u8], i: &Info) -> bool {
        !self.closed
            && i.payload > 0
            && i.payload <= self.mss
            && self.segments < MAX_UDP_SEGMENTS
            && self.buf.len() + i.payload <= MAX_PACKET
            && self.same_ip(pkt)
    }
}

/// Merges consecutive TCP segments per flow; call [`Coalescer::offer`] for each packet of a batch
/// and [`Coalescer::flush`] at its end.
#[derive(Default)]
pub struct Coalescer {
    open: Vec<Train>,
    spare: Vec<Vec<u8>>,
    bad_checksums: u64,
}

/// Whether the IPv4 header checksum (IPv4) and the TCP checksum of a packet `inspect` accepted
/// verify.
fn checksums_ok(pkt: &[u8], i: &Info) -> bool {
    let l4_len = pkt.len() - i.l4;
    let pseudo = if i.v4 {
        if csum::sum(&pkt[..i.l4]) != 0xffff {
            return false;
        }
        csum::pseudo_v4(&pkt[12..16], &pkt[16..20], i.key[36], l4_len as u16)
    } else {
        csum::pseudo_v6(&pkt[8..24], &pkt[24..40], i.key[36], l4_len as u32)
    };
    csum::add(pseudo, csum::sum(&pkt[i.l4..])) == 0xffff
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// TCP segments and UDP datagrams written through unmerged because a checksum did not verify.
    pub fn bad_checksums(&self) -> u64 {
        self.bad_checksums
    }

    /// Takes `pkt` into a train, or writes it through `sink` unchanged (after writing out its
    /// flow's open train, so that a flow's packets keep their order).
    pub fn offer(&mut self, pkt: &[u8], sink: &mut impl Sink) {
        let Some(i) = inspect(pkt) else {
            // Not TCP or not mergeable: nothing of its flow can be open unless it is TCP with
            // odd headers, and then order still matters, so close a train of the same addresses.
            if let Some(k) = inspect_key(pkt) {
                self.flush_key(&k, sink);
            }
            return sink.write(&NO_OFFLOAD, pkt, 1);
        };
        if i.payload > 0 && !checksums_ok(pkt, &i) {
            // Never merged (see the module docs); its flow's train goes first to keep the order.
            self.bad_checksums += 1;
            self.flush_key(&i.key, sink);
            return sink.write(&NO_OFFLOAD, pkt, 1);
        }
        let pos = self.open.iter().position(|t| t.key == i.key);
        if let Some(p) = pos {
            if self.open[p].accepts(pkt, &i) {
                let t = &mut self.open[p];
                t.buf.extend_from_slice(&pkt[i.hdrs..]);
                t.segments += 1;
                if i.udp {
                    t.closed = i.payload < t.mss;
                    return;
                }
                t.next_seq = i.seq.wrapping_add(i.payload as u32);
                if i.flags & PSH != 0 {
                    let l4 = t.l4;
                    t.buf[l4 + 13] |= PSH;
                }
                if i.payload < t.mss || i.flags & PSH != 0 {
                    t.closed = true;
                }
                return;
            }
            let t = self.open.swap_remove(p);
            self.emit(t, sink);
        }
        if i.udp && i.payload > 0 {
            // a datagram opens a train; the checks below are TCP's
        } else if i.payload == 0
            || i.flags & !(ACK | PSH) != 0
            || i.flags & ACK == 0
            || i.flags & (SYN | FIN | RST) != 0
        {
            return sink.write(&NO_OFFLOAD, pkt, 1);
        }
        if self.open.len() == MAX_OPEN {
            let t = self.open.remove(0);
            self.emit(t, sink);
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(pkt);
        self.open.push(Train {
            key: i.key,
            v4: i.v4,
            udp: i.udp,
            l4: i.l4,
            hdrs: i.hdrs,
            mss: i.payload,
            next_seq: i.seq.wrapping_add(i.payload as u32),
            segments: 1,
            closed: i.flags & PSH != 0,
            buf,
        });
    }

    /// Writes out every open train.
    pub fn flush(&mut self, sink: &mut impl Sink) {
        while let Some(t) = self.open.pop() {
            self.emit(t, sink);
        }
    }

    fn flush_key(&mut self, key: &FlowKey, sink: &mut impl Sink) {
        if let Some(p) = self.open.iter().position(|t| &t.key == key) {
            let t = self.open.swap_remove(p);
            self.emit(t, sink);
        }
    }

    fn emit(&mut self, mut t: Train, sink: &mut impl Sink) {
        if t.segments == 1 {
            // Untouched original: its checksums are still valid.
            sink.write(&NO_OFFLOAD, &t.buf, 1);
        } else {
            let hdr = finish(&mut t);
            let mut h = [0u8; VNET_HDR_LEN];
            hdr.emit(&mut h);
            sink.write(&h, &t.buf, t.segments);
        }
        self.spare.push(t.buf);
    }
}

/// Key of a TCP packet with headers `inspect` refuses (options, fragments), so its train can be
/// closed before it is written through.
fn inspect_key(pkt: &[u8]) -> Option<FlowKey> {
    let mut key = [0u8; 37];
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 24 && (pkt[9] == TCP || pkt[9] == UDP) => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            key[..8].copy_from_slice(&pkt[12..20]);
            key[32..36].copy_from_slice(pkt.get(ihl..ihl + 4)?);
            key[36] = pkt[9];
        }
        6 if pkt.len() >= 44 && (pkt[6] == TCP || pkt[6] == UDP) => {
            key[..32].copy_from_slice(&pkt[8..40]);
            key[32..36].copy_from_slice(&pkt[40..44]);
            key[36] = pkt[6];
        }
        _ => return None,
    }
    Some(key)
}

/// Turns the merged bytes into a valid GSO super-packet and returns its vnet header.
fn finish(t: &mut Train) -> VnetHdr {
    let len = t.buf.len();
    let l4_len = len - t.l4;
    let p = &mut t.buf;
    let pseudo = if t.v4 {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[10..12].fill(0);
        let c = !csum::sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        csum::pseudo_v4(&p[12..16], &p[16..20], t.key[36], l4_len as u16)
    } else {
        p[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        csum::pseudo_v6(&p[8..24], &p[24..40], t.key[36], l4_len as u32)
    };
    if t.udp {
        // the UDP length covers every segment; the kernel gives each its own (USO)
        p[t.l4 + 4..t.l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        p[t.l4 + 6..t.l4 + 8].copy_from_slice(&pseudo.to_be_bytes());
        return VnetHdr {
            flags: flags::NEEDS_CSUM,
            gso_type: gso_type::UDP_L4,
            hdr_len: t.hdrs as u16,
            gso_size: t.mss as u16,
            csum_start: t.l4 as u16,
            csum_offset: 6,
        };
    }
    // NEEDS_CSUM: the field holds the (uncomplemented) pseudo-header sum; whoever finishes the
    // checksum adds the TCP header and payload from csum_start on.
    p[t.l4 + 16..t.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    VnetHdr {
        flags: flags::NEEDS_CSUM,
        gso_type: if t.v4 {
            gso_type::TCPV4
        } else {
            gso_type::TCPV6
        },
        hdr_len: t.hdrs as u16,
        gso_size: t.mss as u16,
        csum_start: t.l4 as u16,
        csum_offset: 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::vnet::{segment, tests::tcp_v4_ok, tests::tso_v4, VnetHdr};

    /// Wire segments of a synthetic TSO packet (valid checksums), as a peer would send them.
    fn segments(payload: usize, mss: u16, flags: u8) -> Vec<Vec<u8>> {
        let (p, hdr) = tso_v4(payload, mss, flags);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        segment(&p, &hdr, 0, &mut out, &mut segs).unwrap();
        segs.iter().map(|r| out[r.clone()].to_vec()).collect()
    }

    type Written = Vec<(VnetHdr, Vec<u8>, usize)>;

    fn run(pkts: &[Vec<u8>]) -> Written {
        let mut w: Written = Vec::new();
        let mut sink = |h: &[u8; VNET_HDR_LEN], p: &[u8], n: usize| {
            w.push((VnetHdr::parse(h).unwrap(), p.to_vec(), n))
        };
        let mut c = Coalescer::new();
        for p in pkts {
            c.offer(p, &mut sink);
        }
        c.flush(&mut sink);
        w
    }

    /// An IPv4 UDP datagram 10.0.0.1:5000 -> 10.0.0.2:9000 with valid checksums.
    fn udp4(id: u16, payload: &[u8], tos: u8) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[1] = tos;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let c = !csum::sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&5000u16.to_be_bytes());
        p[22..24].copy_from_slice(&9000u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let ps = csum::pseudo_v4(&p[12..16], &p[16..20], 17, (8 + payload.len()) as u16);
        let c = match !csum::add(ps, csum::sum(&p[20..])) {
            0 => 0xffff,
            c => c,
        };
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn a_udp_train_resegments_to_the_original_datagrams() {
        let mut pkts: Vec<Vec<u8>> = (0..10u16)
            .map(|k| udp4(100 + k, &[b'a' + k as u8; 18], 0))
            .collect();
        pkts.push(udp4(110, b"short", 0)); // a shorter last one closes the train
        pkts.push(udp4(111, &[b'z'; 18], 0)); // so this one starts another (alone: unchanged)
        let w = run(&pkts);
        assert_eq!(w.len(), 2);
        let (h, p, n) = &w[0];
        assert_eq!(
            (*n, h.gso_kind(), h.gso_size, h.csum_offset),
            (11, gso_type::UDP_L4, 18, 6)
        );
        assert_eq!((h.csum_start, h.hdr_len), (20, 28));
        assert!(h.needs_csum());
        assert_eq!(p.len(), 28 + 10 * 18 + 5);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        segment(p, h, 0, &mut out, &mut segs).unwrap();
        let back: Vec<Vec<u8>> = segs.iter().map(|r| out[r.clone()].to_vec()).collect();
        assert_eq!(back, pkts[..11].to_vec());
        assert_eq!(
            (w[1].0, &w[1].1, w[1].2),
            (VnetHdr::default(), &pkts[11], 1)
        );
    }

    #[test]
    fn udp_datagrams_that_must_not_merge_are_written_through_in_order() {
        let a = udp4(1, &[1; 18], 0);
        let mut no_csum = udp4(2, &[2; 18], 0);
        no_csum[26..28].fill(0); // IPv4 without a UDP checksum: never given one
        let mut bad = udp4(3, &[3; 18], 0);
        bad[30] ^= 0xff; // corrupted on the underlay: never laundered into a good checksum
        let ecn = udp4(4, &[4; 18], 1); // another TOS: another train
        let b = udp4(5, &[5; 18], 0);
        let longer = udp4(6, &[6; 30], 0); // longer than the first: a new train
        let pkts = vec![
            a.clone(),
            no_csum.clone(),
            bad.clone(),
            ecn.clone(),
            b.clone(),
            longer.clone(),
        ];
        let w = run(&pkts);
        let got: Vec<&Vec<u8>> = w.iter().map(|(_, p, _)| p).collect();
        assert_eq!(got, vec![&a, &no_csum, &bad, &ecn, &b, &longer]);
        assert!(w
            .iter()
            .all(|(h, _, n)| *h == VnetHdr::default() && *n == 1));
        // 100 equal datagrams: trains of at most MAX_UDP_SEGMENTS
        let many: Vec<Vec<u8>> = (0..100u16).map(|k| udp4(k, &[9; 18], 0)).collect();
        let w = run(&many);
        assert_eq!(
            w.iter().map(|x| x.2).collect::<Vec<_>>(),
            vec![MAX_UDP_SEGMENTS, 100 - MAX_UDP_SEGMENTS]
        );
    }

    #[test]
    fn merged_train_resegments_to_the_original_packets() {
        let segs = segments(20_000, 1400, 0x18); // ACK|PSH: PSH only on the last segment
        let w = run(&segs);
        assert_eq!(w.len(), 1);
        let (h, p, n) = &w[0];
        assert_eq!(*n, segs.len());
        assert_eq!(h.gso_kind(), gso_type::TCPV4);
        assert_eq!(h.gso_size, 1400);
        assert!(h.needs_csum());
        assert_eq!(p.len(), 52 + 20_000);
        assert_eq!(p[33] & PSH, PSH);
        // What the kernel would do with it: segment again, and get exactly what arrived.
        let (mut out, mut rs) = (Vec::new(), Vec::new());
        segment(p, h, 0, &mut out, &mut rs).unwrap();
        let again: Vec<Vec<u8>> = rs.iter().map(|r| out[r.clone()].to_vec()).collect();
        for (a, b) in again.iter().zip(&segs) {
            assert!(tcp_v4_ok(a));
            // IDs are regenerated from the first segment's; everything else is identical.
            assert_eq!(a[..4], b[..4]);
            assert_eq!(a[6..], b[6..]);
        }
        assert_eq!(again.len(), segs.len());
        // The IPv4 header checksum of the merged packet itself is valid (local delivery checks it).
        assert_eq!(csum::sum(&p[..20]), 0xffff);
    }

    #[test]
    fn gaps_flags_and_other_flows_split_trains() {
        let segs = segments(7000, 1000, 0x10);
        // Drop segment 3: two trains, 3 and 3 segments.
        let mut gap = segs.clone();
        gap.remove(3);
        let w = run(&gap);
        assert_eq!(w.iter().map(|x| x.2).collect::<Vec<_>>(), vec![3, 3]);
        // A CE-marked segment in the middle is written on its own, unmerged, with valid checksums.
        let mut ce = segs.clone();
        ce[2][1] |= 0x03;
        ce[2][10..12].fill(0);
        let c = !csum::sum(&ce[2][..20]);
        ce[2][10..12].copy_from_slice(&c.to_be_bytes());
        let w = run(&ce);
        let sizes: Vec<usize> = w.iter().map(|x| x.2).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 7);
        assert!(w
            .iter()
            .any(|(h, p, n)| *n == 1 && !h.is_gso() && p[1] & 3 == 3));
        // SYN / FIN are never merged.
        let fin = segments(3000, 1000, 0x11);
        let w = run(&fin);
        assert_eq!(w.iter().map(|x| x.2).sum::<usize>(), 3);
        assert!(w.iter().all(|(h, p, _)| !h.is_gso() || p[33] & FIN == 0));
        // Two interleaved flows: each merged on its own.
        let a = segments(4000, 1000, 0x10);
        let mut b = segments(4000, 1000, 0x10);
        for s in &mut b {
            // another flow: the ports swapped (which leaves every checksum valid)
            let (sport, dport) = ([s[20], s[21]], [s[22], s[23]]);
            s[20..22].copy_from_slice(&dport);
            s[22..24].copy_from_slice(&sport);
        }
        let mixed: Vec<Vec<u8>> = a
            .iter()
            .zip(&b)
            .flat_map(|(x, y)| [x.clone(), y.clone()])
            .collect();
        let w = run(&mixed);
        assert_eq!(w.len(), 2);
        assert!(w.iter().all(|x| x.2 == 4));
    }

    #[test]
    fn a_segment_with_a_bad_checksum_is_never_merged() {
        let segs = segments(7000, 1000, 0x10);
        // One payload byte of segment 3 corrupted on the way (checksum not updated), and the
        // TTL of segment 5 changed without fixing the IPv4 header checksum.
        let mut bad = segs.clone();
        bad[3][100] ^= 0x5a;
        bad[5][8] = bad[5][8].wrapping_sub(1);
        let mut c = Coalescer::new();
        let mut w: Written = Vec::new();
        let mut sink = |h: &[u8; VNET_HDR_LEN], p: &[u8], n: usize| {
            w.push((VnetHdr::parse(h).unwrap(), p.to_vec(), n))
        };
        for p in &bad {
            c.offer(p, &mut sink);
        }
        c.flush(&mut sink);
        assert_eq!(c.bad_checksums(), 2);
        // The two bad ones leave byte for byte as they came, unmerged; the good ones around them
        // are merged (3, then 1, then 1) and every merged train re-segments with valid checksums.
        assert_eq!(w.iter().map(|x| x.2).sum::<usize>(), 7);
        assert!(w
            .iter()
            .any(|(h, p, n)| *n == 1 && !h.is_gso() && *p == bad[3]));
        assert!(w
            .iter()
            .any(|(h, p, n)| *n == 1 && !h.is_gso() && *p == bad[5]));
        assert_eq!(w[0].2, 3);
        for (h, p, n) in &w {
            if h.is_gso() {
                let (mut out, mut rs) = (Vec::new(), Vec::new());
                segment(p, h, 0, &mut out, &mut rs).unwrap();
                assert_eq!(rs.len(), *n);
                assert!(rs.iter().all(|r| tcp_v4_ok(&out[r.clone()])));
            }
        }
        // The untouched train still merges whole.
        assert_eq!(run(&segs).len(), 1);
    }

    #[test]
    fn non_tcp_and_garbage_pass_through() {
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x45],
            vec![0x60; 39],
            vec![
                0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
            ],
        ];
        let w = run(&garbage);
        assert_eq!(w.len(), 4);
        assert!(w
            .iter()
            .all(|(h, _, n)| *n == 1 && *h == VnetHdr::default()));
        let mut x: u32 = 7;
        let mut pkts = Vec::new();
        for _ in 0..500 {
            let mut p = segments(2000, 700, 0x10)[x as usize % 3].clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % p.len();
                p[i] = (x >> 8) as u8;
            }
            p.truncate(x as usize % (p.len() + 1));
            pkts.push(p);
        }
        let w = run(&pkts);
        assert_eq!(w.iter().map(|x| x.2).sum::<usize>(), 500);
    }
}
