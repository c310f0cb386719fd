//! The egress entry point: what every packet read from the TUN becomes.
//!
//! [`egress`] takes one TUN read (the IP packet, maybe a GSO super-packet, with the offload
//! metadata of its virtio-net header), the tables and `now`, and hands what to send where to a
//! [`Sink`]: tunnel units ([`TunnelUnit`]: peer, remote, flow hash and source port, outer TOS and
//! flow label, a byte range and the `UDP_SEGMENT` size when several units go as one send),
//! Ethernet frames for the underlay packet socket ([`Frame`], with the vnet header in front when
//! the socket takes one), or a drop with its [`DropReason`]. The I/O engine (rust/io) keeps the
//! reads, the writes, the batching and the counters; every decision and every byte rewrite is here.
//!
//! The packet walk, per verdict of [`Tables::classify`]:
//! * tunnel: a plain packet gets its offloaded checksum finished and the tunnel header written into
//!   the headroom in front of it; a super-packet is segmented ([`vnet::segment`]) into
//!   `[tunnel header][segment]` units laid back to back in the scratch buffer, each encapsulated in
//!   place, and reported as trains of at most [`UDP_GSO_MAX_SEGMENTS`] units / [`UDP_GSO_MAX_BYTES`]
//!   bytes, which is the shape one UDP GSO send wants. The outer source port is picked by the I/O
//!   layer from [`TunnelUnit::hash`] (one bound socket per port), so one flow keeps one port;
//! * native: an Ethernet header in front; with [`FrameMode::Vnet`] the vnet header, its offsets
//!   moved past the Ethernet header, in front of that and the whole super-packet goes as one frame
//!   (the kernel segments it after tc); with [`FrameMode::Plain`] super-packets are segmented and
//!   checksums finished here;
//! * masquerade: source NAT with the locked table of the packet's family (the [`Nat`] the caller
//!   passes decides how it is shared), then out like native to the gateway. An offloaded checksum
//!   with [`FrameMode::Vnet`] is translated once for the whole super-packet and its field rewritten
//!   as the pseudo-header sum of the translated addresses; otherwise segments are translated one by
//!   one, and a segment that cannot be translated is reported with [`Sink::segment_dropped`];
//! * local: [`Sink::local`] says what the caller can do with it (the TUN engine cannot);
//! * drop: the reason, with the number of wire packets the read stood for.
//!
//! Nothing allocates on a plain packet (segmentation grows the caller's scratch buffers once),
//! nothing panics on any input, and no clock is read.

use core::ops::{DerefMut, Range};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::classify::Tables;
use crate::drop::DropReason;
use crate::encap::{self, EncapParams, TunnelProto};
use crate::nat::{self, NatTable, NatTable6};
use crate::offload::csum;
use crate::offload::vnet::{self, OffloadError, VnetHdr, VNET_HDR_LEN};
use crate::spec::{NextHopId, PeerId};
use crate::verdict::{Path, Verdict};
use crate::wire::{self, ethernet, IpMeta};

/// Bytes of an Ethernet II header.
pub const ETH_HLEN: usize = ethernet::HEADER_LEN;

/// Bytes the caller leaves free in front of the packet: the largest tunnel header, or an Ethernet
/// plus a vnet header, whichever is longer.
pub const HEADROOM: usize = if encap::MAX_HEADROOM > ETH_HLEN + VNET_HDR_LEN {
    encap::MAX_HEADROOM
} else {
    ETH_HLEN + VNET_HDR_LEN
};

/// Linux `UDP_MAX_SEGMENTS` (64 before 6.9's raise to 128): more segments per send is `EINVAL`.
pub const UDP_GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload of one GSO send: IPv4 total length 65535 - 20 (IP) - 8 (UDP).
pub const UDP_GSO_MAX_BYTES: usize = 65535 - 20 - 8;

/// How this node sends on the underlay; fixed for an engine's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Our underlay MAC: the source of every Ethernet frame.
    pub mac: [u8; 6],
    /// How native and masqueraded packets leave; `None`: there is no underlay packet socket, and
    /// such packets are dropped `no_route`.
    pub frames: Option<FrameMode>,
    /// A tunnel send socket exists for IPv4 / IPv6 remotes (a family without one is `no_route`:
    /// the tables refuse peers of a family the node has no underlay address in, so only a race
    /// gets there).
    pub tunnel_v4: bool,
    pub tunnel_v6: bool,
    /// The I/O layer can hand an encapsulated TCP super-packet to the kernel whole (UDP-tunnel
    /// GSO, [`crate::offload::tnl`]) for IPv4 remotes: such a unit carries [`TunnelUnit::gso`].
    pub tunnel_gso: bool,
    /// The same for IPv6 remotes (an IPv6 or dual-stack underlay); only super-packets of at
    /// least two segments (`tnl::build_prefix6`).
    pub tunnel_gso6: bool,
}

/// What an underlay frame starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameMode {
    /// The Ethernet header: super-packets are segmented and checksums finished here.
    Plain,
    /// A vnet header, then the Ethernet header (`PACKET_VNET_HDR`): super-packets and offloaded
    /// checksums go to the kernel as they came.
    Vnet,
}

/// Which buffer an output's byte range is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The read buffer [`Packet::buf`].
    Packet,
    /// The segmentation scratch buffer [`Packet::seg`].
    Segments,
}

/// One read from the TUN: the IP packet at `buf[start..start + len]` with at least [`HEADROOM`]
/// bytes free in front of it, the offload metadata of its vnet header, and scratch buffers for
/// segmentation (cleared and refilled when a super-packet is segmented; kept by the caller so
/// their capacity is reused).
#[derive(Debug)]
pub struct Packet<'a> {
    pub buf: &'a mut [u8],
    pub start: usize,
    pub len: usize,
    /// The vnet header of the read (`VnetHdr::default()`: no offload).
    pub hdr: VnetHdr,
    pub seg: &'a mut Vec<u8>,
    pub segs: &'a mut Vec<Range<usize>>,
}

/// Send `range` of `buf` as the payload of UDP datagrams to `remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelUnit {
    pub buf: Buffer,
    /// `[tunnel header][inner packet]`, or several such units back to back (see `segment`).
    pub range: Range<usize>,
    pub peer: PeerId,
    pub proto: TunnelProto,
    pub remote: SocketAddr,
    /// The inner flow hash ([`encap::flow_hash_parsed`]): the I/O layer sends from the pool socket
    /// `hash % pool size`, so one flow always leaves from one port.
    pub hash: u32,
    /// The outer UDP source port this hash maps to in the source port range
    /// ([`encap::udp_source_port`]), for a caller that sets the port per datagram.
    pub src_port: u16,
    /// Outer IP TOS / traffic class: inner DSCP copied, ECN per RFC 6040 normal mode.
    pub tos: u8,
    /// Outer IPv6 flow label (RFC 6438); 0 for an IPv4 remote.
    pub flow_label: u32,
    /// `UDP_SEGMENT` size: every unit in `range` is this long but the last; 0: one datagram.
    pub segment: u16,
    /// With [`Link::tunnel_gso`]: `range` is ONE `[tunnel header][inner TCP super-packet]`
    /// described by this vnet header (the TUN read's), for the kernel to segment.
    pub gso: Option<VnetHdr>,
    /// Wire packets and inner bytes this stands for (the metrics).
    pub pkts: u64,
    pub bytes: u64,
}

impl TunnelUnit {
    /// The metrics path label.
    pub fn path(&self) -> Path {
        Path::tunnel(self.proto)
    }
}

/// Send `range` of `buf` on the underlay packet socket: `[vnet header]` (with
/// [`FrameMode::Vnet`]) `[Ethernet header][IP packet]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub buf: Buffer,
    pub range: Range<usize>,
    pub ethertype: u16,
    pub next_hop_mac: [u8; 6],
    /// [`Path::Native`] or [`Path::Masquerade`].
    pub path: Path,
    /// The vnet header asks the kernel to segment the frame (a GSO super-packet).
    pub gso: bool,
    /// Wire packets and IP bytes this stands for (the metrics).
    pub pkts: u64,
    pub bytes: u64,
}

/// Where [`egress`] puts its outputs, in the order they are to be sent.
pub trait Sink {
    fn tunnel(&mut self, unit: TunnelUnit);
    fn frame(&mut self, frame: Frame);
    /// A destination in this node's pod CIDRs: `Ok` when the caller hands `buf[range]` to the
    /// kernel itself, else the drop reason.
    fn local(&mut self, range: Range<usize>) -> Result<(), DropReason>;
    /// One segment of a masqueraded super-packet could not be translated (one wire packet); the
    /// other segments still go.
    fn segment_dropped(&mut self, reason: DropReason);
}

/// The masquerade tables, locked (or borrowed) only when a packet is masqueraded. `None`: this
/// caller cannot masquerade (the packet is dropped `unsupported`).
pub trait Nat {
    fn v4(&mut self) -> Option<impl DerefMut<Target = NatTable> + '_>;
    fn v6(&mut self) -> Option<impl DerefMut<Target = NatTable6> + '_>;
}

/// A dropped read: the reason, and how many wire packets it stood for (a super-packet counts once
/// per segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub reason: DropReason,
    pub packets: usize,
}

/// Decides and prepares one packet read from the TUN; see the module documentation. Outputs go
/// to `out`; `Err` is a drop of the whole read.
#[inline]
pub fn egress<N: Nat, S: Sink>(
    tables: &Tables,
    link: &Link,
    nat: &mut N,
    out: &mut S,
    p: Packet<'_>,
    now: u64,
) -> Result<(), Dropped> {
    let Some(pkt) = p
        .start
        .checked_add(p.len)
        .and_then(|end| p.buf.get(p.start..end))
    else {
        return Err(Dropped {
            reason: DropReason::Truncated,
            packets: 1,
        });
    };
    let sizes = vnet::wire_size(pkt, &p.hdr);
    decide(tables, link, nat, out, p, sizes, now).map_err(|reason| Dropped {
        reason,
        packets: sizes.0,
    })
}

/// Whether a packet from a local pod with TTL / hop limit `ttl` may take `verdict`.
///
/// The kernel already decremented the TTL when it routed the packet into the TUN (podrouter is not
/// a hop of its own). A packet at 1 or 0 could not survive the next router (or the peer's kernel
/// forwarding it to the pod), so it is dropped as `ttl_exceeded`, except a masqueraded packet at 1:
/// the next router answers it with ICMP time exceeded to the node address, which comes back
/// translated to the pod, so the hop shows up in a pod's traceroute (RFC 5508 §7, RFC 4787 REQ-14).
pub fn check_ttl(ttl: u8, verdict: &Verdict) -> Result<(), DropReason> {
    match (ttl, verdict) {
        (0, _) => Err(DropReason::TtlExceeded),
        (1, Verdict::Masquerade { .. }) => Ok(()),
        (1, _) => Err(DropReason::TtlExceeded),
        _ => Ok(()),
    }
}

// Inlined into `egress`: a separate frame costs the one-packet path ~60 instructions (callgrind).
#[inline]
fn decide<N: Nat, S: Sink>(
    tables: &Tables,
    link: &Link,
    nat: &mut N,
    out: &mut S,
    mut p: Packet<'_>,
    sizes: (usize, usize),
    now: u64,
) -> Result<(), DropReason> {
    let pkt = &p.buf[p.start..p.start + p.len];
    // Borrowed rather than moved out of the `Result`: moving the two `IpAddr`s out costs a
    // byte-by-byte copy of the whole struct on every packet.
    let parsed = wire::parse_ip(pkt);
    let meta = match &parsed {
        Ok(m) => m,
        Err(e) => return Err((*e).into()),
    };
    // IPv4 addresses straight from the header the parse just validated: the lookup then starts
    // from the packet bytes instead of waiting for the parse's byte-wise stores of two `IpAddr`s
    // to be read back (a failed store-to-load forward on the critical path).
    let (src, dst) = match (meta.src, pkt.first_chunk::<20>()) {
        (IpAddr::V4(_), Some(h)) => (
            IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
            IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        ),
        _ => (meta.src, meta.dst),
    };
    let verdict = tables.classify(src, dst);
    check_ttl(meta.ttl, &verdict)?;
    // Link padding after the IP total length is not part of the packet.
    p.len = meta.total_len;
    match verdict {
        Verdict::Tunnel {
            peer,
            proto,
            vni,
            remote,
            port,
        } => {
            let params = tables.encap_params(peer, proto, vni, remote, port);
            tunnel(link, out, p, meta, peer, &params)
        }
        Verdict::Native { next_hop } => {
            let mac = next_hop_mac(tables, next_hop)?;
            native(link, out, p, mac, Path::Native, sizes)
        }
        Verdict::Masquerade { next_hop } => {
            let mac = next_hop_mac(tables, next_hop)?;
            masquerade(tables, link, nat, out, p, mac, now)
        }
        Verdict::Local => out.local(p.start..p.start + p.len),
        Verdict::Drop(r) => Err(r),
    }
}

fn next_hop_mac(tables: &Tables, id: NextHopId) -> Result<[u8; 6], DropReason> {
    tables
        .next_hop(id)
        .and_then(|h| h.mac)
        .ok_or(DropReason::NeighborUnresolved)
}

fn offload_drop(e: OffloadError) -> DropReason {
    match e {
        OffloadError::Malformed => DropReason::Malformed,
        OffloadError::Unsupported => DropReason::Unsupported,
    }
}

/// Finishes the `NEEDS_CSUM` checksum of a packet that is not a super-packet, in place.
fn finish_csum(pkt: &mut [u8], hdr: &VnetHdr) -> Result<(), DropReason> {
    if hdr.needs_csum() && !hdr.is_gso() {
        let (s, o) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        vnet::complete_csum(pkt, s, o).map_err(|_| DropReason::Malformed)?;
    }
    Ok(())
}

/// Segments the super-packet into `p.seg`, `headroom` bytes in front of each segment.
fn segment(p: &mut Packet<'_>, headroom: usize) -> Result<(), DropReason> {
    p.seg.clear();
    p.segs.clear();
    vnet::segment(
        &p.buf[p.start..p.start + p.len],
        &p.hdr,
        headroom,
        p.seg,
        p.segs,
    )
    .map_err(offload_drop)
}

fn ethertype_of(first: u8) -> u16 {
    if first >> 4 == 4 {
        ethernet::ethertype::IPV4
    } else {
        ethernet::ethertype::IPV6
    }
}

/// Writes an Ethernet II header into `b` (exactly [`ETH_HLEN`] bytes long).
fn write_eth(b: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    let mut f = ethernet::Frame::new_unchecked(b);
    f.set_dst_addr(dst);
    f.set_src_addr(src);
    f.set_ethertype(ethertype);
}

/// The bytes in front of `start` where a frame header of `len` bytes goes (`Unsupported` when the
/// caller left too little headroom: a bug, counted rather than hidden).
fn headroom(start: usize, len: usize) -> Result<usize, DropReason> {
    start.checked_sub(len).ok_or(DropReason::Unsupported)
}

fn tunnel<S: Sink>(
    link: &Link,
    out: &mut S,
    mut p: Packet<'_>,
    meta: &IpMeta,
    peer: PeerId,
    params: &EncapParams,
) -> Result<(), DropReason> {
    let v6 = params.dst.is_ipv6();
    if !(if v6 { link.tunnel_v6 } else { link.tunnel_v4 }) {
        return Err(DropReason::NoRoute);
    }
    let end = p.start + p.len;
    // Hash, TOS and label from the parse just done: the inner headers are not read again.
    let hash = encap::flow_hash_parsed(&p.buf[p.start..end], meta);
    let inner_v6 = meta.dst.is_ipv6();
    let remote = SocketAddr::new(params.dst, params.dst_port);
    let tos = encap::outer_tos_for(meta.dscp << 2 | meta.ecn);
    let flow_label = if v6 { encap::flow_label_of(hash) } else { 0 };
    // One unit built in place per send (no template copied into each).
    let unit = |buf, range, segment, pkts, bytes| TunnelUnit {
        buf,
        range,
        peer,
        proto: params.proto,
        remote,
        hash,
        src_port: encap::source_port_of(hash),
        tos,
        flow_label,
        segment,
        gso: None,
        pkts,
        bytes,
    };
    let ovh = params.payload_overhead();
    let (gso_ok, max_payload) = if v6 {
        (link.tunnel_gso6, crate::offload::tnl::MAX_PAYLOAD6)
    } else {
        (link.tunnel_gso, crate::offload::tnl::MAX_PAYLOAD)
    };
    if gso_ok
        && p.hdr.needs_csum()
        && matches!(
            p.hdr.gso_kind(),
            vnet::gso_type::TCPV4 | vnet::gso_type::TCPV6
        )
        && p.len + ovh <= max_payload
    {
        let (pkts, _) = vnet::wire_size(&p.buf[p.start..end], &p.hdr);
        // over IPv6 one segment is not GSO for the kernel: its outer checksum seed would stay
        if !v6 || pkts > 1 {
            let range = encap::encap_payload_parsed(p.buf, p.start, p.len, inner_v6, params)
                .map_err(|_| DropReason::Unsupported)?;
            let mut u = unit(Buffer::Packet, range, 0, pkts as u64, p.len as u64);
            u.gso = Some(p.hdr);
            out.tunnel(u);
            return Ok(());
        }
    }
    if !p.hdr.is_gso() {
        finish_csum(&mut p.buf[p.start..end], &p.hdr)?;
        // Only a missing headroom (a bug in the caller) can fail; counted rather than hidden.
        let range = encap::encap_payload_parsed(p.buf, p.start, p.len, inner_v6, params)
            .map_err(|_| DropReason::Unsupported)?;
        out.tunnel(unit(Buffer::Packet, range, 0, 1, p.len as u64));
        return Ok(());
    }
    segment(&mut p, ovh)?;
    for r in p.segs.iter() {
        encap::encap_payload_parsed(&mut p.seg[..], r.start, r.len(), inner_v6, params)
            .map_err(|_| DropReason::Unsupported)?;
    }
    // Units are [tunnel header][segment], back to back; all but the last have the same size,
    // which is exactly the shape UDP GSO wants. Trains are cut at the kernel's limits.
    let first = p.segs.first().ok_or(DropReason::Malformed)?;
    let unit_len = ovh + first.len();
    let per_train = UDP_GSO_MAX_SEGMENTS
        .min(UDP_GSO_MAX_BYTES / unit_len)
        .max(1);
    for train in p.segs.chunks(per_train) {
        let (first, last) = (&train[0], &train[train.len() - 1]);
        let segment = if train.len() > 1 { unit_len as u16 } else { 0 };
        let bytes = train.iter().map(|r| r.len() as u64).sum();
        let range = first.start - ovh..last.end;
        out.tunnel(unit(
            Buffer::Segments,
            range,
            segment,
            train.len() as u64,
            bytes,
        ));
    }
    Ok(())
}

fn native<S: Sink>(
    link: &Link,
    out: &mut S,
    mut p: Packet<'_>,
    mac: [u8; 6],
    path: Path,
    (wire_pkts, wire_bytes): (usize, usize),
) -> Result<(), DropReason> {
    let mode = link.frames.ok_or(DropReason::NoRoute)?;
    let (start, end) = (p.start, p.start + p.len);
    let et = ethertype_of(p.buf[start]);
    let frame = |buf, range, gso, pkts, bytes| Frame {
        buf,
        range,
        ethertype: et,
        next_hop_mac: mac,
        path,
        gso,
        pkts,
        bytes,
    };
    if mode == FrameMode::Vnet {
        // The whole (super-)packet goes out as it came: the vnet header, with its offsets moved
        // past the Ethernet header, lets the kernel segment and checksum it after tc.
        let vh = vnet::shift_for_link(&p.buf[start..end], &p.hdr, ETH_HLEN as u16)
            .map_err(|_| DropReason::Malformed)?;
        let f = headroom(start, ETH_HLEN + VNET_HDR_LEN)?;
        write_eth(&mut p.buf[start - ETH_HLEN..start], mac, link.mac, et);
        vh.emit(&mut p.buf[f..start - ETH_HLEN]);
        out.frame(frame(
            Buffer::Packet,
            f..end,
            vh.is_gso(),
            wire_pkts as u64,
            wire_bytes as u64,
        ));
        return Ok(());
    }
    if p.hdr.is_gso() {
        segment(&mut p, ETH_HLEN)?;
        for r in p.segs.iter() {
            write_eth(&mut p.seg[r.start - ETH_HLEN..r.start], mac, link.mac, et);
            out.frame(frame(
                Buffer::Segments,
                r.start - ETH_HLEN..r.end,
                false,
                1,
                r.len() as u64,
            ));
        }
        return Ok(());
    }
    finish_csum(&mut p.buf[start..end], &p.hdr)?;
    let f = headroom(start, ETH_HLEN)?;
    write_eth(&mut p.buf[f..start], mac, link.mac, et);
    out.frame(frame(Buffer::Packet, f..end, false, 1, p.len as u64));
    Ok(())
}

/// Source NAT with the table of the packet's family, then out natively to `mac` (the gateway).
fn masquerade<N: Nat, S: Sink>(
    tables: &Tables,
    link: &Link,
    nat: &mut N,
    out: &mut S,
    p: Packet<'_>,
    mac: [u8; 6],
    now: u64,
) -> Result<(), DropReason> {
    let mode = link.frames.ok_or(DropReason::NoRoute)?;
    if p.buf[p.start] >> 4 == 6 {
        // the classifier gives IPv6 the masquerade verdict only with masquerade.address6
        let node = tables.masquerade_address6().ok_or(DropReason::NoRoute)?;
        let mut t = nat.v6().ok_or(DropReason::Unsupported)?;
        let translate =
            move |pkt: &mut [u8]| nat::translate_egress_v6(&mut t, pkt, node, now).map(|_| ());
        masquerade_with(link, mode, out, p, mac, translate)
    } else {
        let node = tables.node_address();
        let mut t = nat.v4().ok_or(DropReason::Unsupported)?;
        let translate =
            move |pkt: &mut [u8]| nat::translate_egress(&mut t, pkt, node, now).map(|_| ());
        masquerade_with(link, mode, out, p, mac, translate)
    }
}

/// The NAT rewrite updates checksums incrementally, which needs finished checksums: without a
/// vnet header on the frames, super-packets are segmented first and partial checksums completed.
/// `translate` owns the locked table; it is dropped (the lock released) as soon as the packet is
/// translated.
fn masquerade_with<S: Sink>(
    link: &Link,
    mode: FrameMode,
    out: &mut S,
    mut p: Packet<'_>,
    mac: [u8; 6],
    mut translate: impl FnMut(&mut [u8]) -> Result<(), DropReason>,
) -> Result<(), DropReason> {
    let end = p.start + p.len;
    if mode == FrameMode::Vnet && p.hdr.needs_csum() {
        // Offloaded checksum (and maybe TSO): translate the (super-)packet once, rewrite the
        // checksum field as the pseudo-header sum of the translated addresses, and let the
        // kernel segment and checksum it behind the packet socket, as on the native path.
        let sizes = vnet::wire_size(&p.buf[p.start..end], &p.hdr);
        let pkt = &mut p.buf[p.start..end];
        translate(pkt)?;
        drop(translate);
        let (start, off) = (
            usize::from(p.hdr.csum_start),
            usize::from(p.hdr.csum_offset),
        );
        let field = start + off;
        let pseudo = if pkt[0] >> 4 == 6 {
            if pkt.len() < 40 || field + 2 > pkt.len() || start > pkt.len() {
                return Err(DropReason::Malformed);
            }
            csum::pseudo_v6(
                &pkt[8..24],
                &pkt[24..40],
                pkt[6],
                (pkt.len() - start) as u32,
            )
        } else {
            if pkt.len() < 20 || field + 2 > pkt.len() || start > pkt.len() {
                return Err(DropReason::Malformed);
            }
            csum::pseudo_v4(
                &pkt[12..16],
                &pkt[16..20],
                pkt[9],
                (pkt.len() - start) as u16,
            )
        };
        pkt[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
        return native(link, out, p, mac, Path::Masquerade, sizes);
    }
    let lh = ETH_HLEN
        + if mode == FrameMode::Vnet {
            VNET_HDR_LEN
        } else {
            0
        };
    if !p.hdr.is_gso() {
        finish_csum(&mut p.buf[p.start..end], &p.hdr)?;
        headroom(p.start, lh)?;
        let range = p.start..end;
        return masquerade_frame(
            link,
            out,
            &mut translate,
            p.buf,
            range,
            Buffer::Packet,
            lh,
            mac,
        );
    }
    segment(&mut p, lh)?;
    for r in p.segs.iter() {
        // A segment that cannot be translated is counted on its own; the others still go.
        let b = Buffer::Segments;
        let seg = &mut p.seg[..];
        if let Err(e) = masquerade_frame(link, out, &mut translate, seg, r.clone(), b, lh, mac) {
            out.segment_dropped(e);
        }
    }
    Ok(())
}

/// Translates `buf[range]` and reports it as one frame with `lh` bytes of link headers in front.
#[allow(clippy::too_many_arguments)]
fn masquerade_frame<S: Sink>(
    link: &Link,
    out: &mut S,
    translate: &mut impl FnMut(&mut [u8]) -> Result<(), DropReason>,
    buf: &mut [u8],
    range: Range<usize>,
    b: Buffer,
    lh: usize,
    mac: [u8; 6],
) -> Result<(), DropReason> {
    let start = range.start;
    translate(&mut buf[range.clone()])?;
    let et = ethertype_of(buf[start]);
    let f = start - lh;
    if lh > ETH_HLEN {
        VnetHdr::default().emit(&mut buf[f..]);
    }
    write_eth(&mut buf[start - ETH_HLEN..start], mac, link.mac, et);
    out.frame(Frame {
        buf: b,
        range: f..range.end,
        ethertype: et,
        next_hop_mac: mac,
        path: Path::Masquerade,
        gso: false,
        pkts: 1,
        bytes: range.len() as u64,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::NatConfig;
    use crate::offload::vnet::tests::{tcp_v4_ok, tso_v4};

    const GW: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const ME: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const N3: [u8; 6] = [2, 0, 0, 0, 0, 3];

    /// node1 of the reference topology (hybrid, native when on link): node2's pods through a
    /// VXLAN tunnel, node3's natively, everything outside the cluster masqueraded via the gateway.
    fn tables() -> Tables {
        crate::reference::tables(&crate::reference::hybrid())
    }

    /// A TCP/IPv4 TSO super-packet (flags ACK) from 10.244.1.1 to `dst` with `payload` bytes in
    /// segments of `mss`, at `HEADROOM` of its buffer: (buffer, packet length, vnet header).
    fn tso_to(dst: [u8; 4], payload: usize, mss: u16) -> (Vec<u8>, usize, VnetHdr) {
        tso_with(dst, payload, mss, 0x10)
    }

    fn tso_with(dst: [u8; 4], payload: usize, mss: u16, flags: u8) -> (Vec<u8>, usize, VnetHdr) {
        let (mut p, hdr) = tso_v4(payload, mss, flags);
        p[16..20].copy_from_slice(&dst);
        p[10..12].fill(0);
        let c = !csum::sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let pseudo = csum::pseudo_v4(&p[12..16], &dst, 6, (p.len() - 20) as u16);
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let len = p.len();
        let mut b = vec![0u8; HEADROOM];
        b.extend_from_slice(&p);
        (b, len, hdr)
    }

    /// What `vnet::segment` makes of the packet: the wire segments the outputs must carry.
    fn wire_segments(b: &[u8], len: usize, hdr: &VnetHdr) -> Vec<Vec<u8>> {
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        vnet::segment(&b[HEADROOM..HEADROOM + len], hdr, 0, &mut out, &mut segs).unwrap();
        segs.iter().map(|r| out[r.clone()].to_vec()).collect()
    }

    #[derive(Default)]
    struct Out {
        units: Vec<TunnelUnit>,
        frames: Vec<Frame>,
        local: Vec<Range<usize>>,
        segment_drops: Vec<DropReason>,
    }

    impl Sink for Out {
        fn tunnel(&mut self, u: TunnelUnit) {
            self.units.push(u);
        }
        fn frame(&mut self, f: Frame) {
            self.frames.push(f);
        }
        fn local(&mut self, range: Range<usize>) -> Result<(), DropReason> {
            self.local.push(range);
            Ok(())
        }
        fn segment_dropped(&mut self, reason: DropReason) {
            self.segment_drops.push(reason);
        }
    }

    struct Both(NatTable, NatTable6);

    impl Nat for Both {
        fn v4(&mut self) -> Option<impl DerefMut<Target = NatTable> + '_> {
            Some(&mut self.0)
        }
        fn v6(&mut self) -> Option<impl DerefMut<Target = NatTable6> + '_> {
            Some(&mut self.1)
        }
    }

    fn nat() -> Both {
        Both(
            NatTable::new(NatConfig::default()),
            NatTable6::new_v6(NatConfig::default()),
        )
    }

    fn link(frames: Option<FrameMode>) -> Link {
        Link {
            mac: ME,
            frames,
            tunnel_v4: true,
            tunnel_v6: false,
            tunnel_gso: false,
            tunnel_gso6: false,
        }
    }

    /// Runs one read; returns the result, the outputs and the segmentation buffer.
    fn run(
        link: &Link,
        nat: &mut Both,
        b: &mut [u8],
        len: usize,
        hdr: VnetHdr,
    ) -> (Result<(), Dropped>, Out, Vec<u8>) {
        run_on(&tables(), link, nat, b, len, hdr)
    }

    /// [`run`] against the given tables.
    fn run_on(
        t: &Tables,
        link: &Link,
        nat: &mut Both,
        b: &mut [u8],
        len: usize,
        hdr: VnetHdr,
    ) -> (Result<(), Dropped>, Out, Vec<u8>) {
        let (mut seg, mut segs) = (Vec::new(), Vec::new());
        let mut out = Out::default();
        let p = Packet {
            buf: b,
            start: HEADROOM,
            len,
            hdr,
            seg: &mut seg,
            segs: &mut segs,
        };
        let r = egress(t, link, nat, &mut out, p, 0);
        (r, out, seg)
    }

    #[test]
    fn tso_with_tunnel_gso_is_one_whole_unit_for_the_kernel() {
        let (mut b, len, hdr) = tso_to([10, 244, 2, 9], 10_000, 1000);
        let orig = b[HEADROOM..HEADROOM + len].to_vec();
        let mut l = link(None);
        l.tunnel_gso = true;
        let (mut seg, mut segs) = (Vec::new(), Vec::new());
        let mut out = Out::default();
        let p = Packet {
            buf: &mut b,
            start: HEADROOM,
            len,
            hdr,
            seg: &mut seg,
            segs: &mut segs,
        };
        egress(&tables(), &l, &mut nat(), &mut out, p, 0).unwrap();
        assert_eq!(out.units.len(), 1);
        let u = &out.units[0];
        assert_eq!((u.buf, u.segment, u.gso), (Buffer::Packet, 0, Some(hdr)));
        assert_eq!(u.pkts, 10);
        assert!(seg.is_empty(), "nothing segmented in userspace");
        let data = &b[u.range.clone()];
        let ovh = data.len() - len;
        assert_eq!(
            &data[ovh..],
            &orig[..],
            "inner bytes untouched (partial checksum kept)"
        );
        let mut pre = [0u8; crate::offload::tnl::PREFIX_LEN];
        let outer = crate::offload::tnl::Outer {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: ME,
            src: [192, 168, 0, 1],
            dst: [192, 168, 0, 2],
            src_port: u.src_port,
            dst_port: 4789,
            tos: u.tos,
            ttl: 65,
            id: 1,
        };
        crate::offload::tnl::build_prefix(&mut pre, &outer, data, ovh, &hdr).unwrap();
        // A plain packet (no GSO) still takes the ordinary path.
        let (mut b2, len2, _) = tso_to([10, 244, 2, 9], 500, 1000);
        let mut out2 = Out::default();
        let p = Packet {
            buf: &mut b2,
            start: HEADROOM,
            len: len2,
            hdr: VnetHdr::default(),
            seg: &mut seg,
            segs: &mut segs,
        };
        egress(&tables(), &l, &mut nat(), &mut out2, p, 0).unwrap();
        assert_eq!(out2.units[0].gso, None);
    }

    /// node1 on an IPv6 underlay (2001:db8:2::2) with node2's pods behind a VXLAN tunnel to
    /// 2001:db8:3::2.
    fn tables6() -> Tables {
        let n2 = crate::reference::peer(
            "node2",
            "2001:db8:3::2".parse().unwrap(),
            "10.244.2.0/24",
            false,
        );
        let mut spec = crate::reference::node1(crate::spec::RoutingMode::Tunnel, vec![n2]);
        spec.gateway = None;
        let settings = crate::spec::EngineSettings::new("2001:db8:2::2".parse().unwrap());
        Tables::build(&spec, &settings).expect("the IPv6 underlay spec compiles")
    }

    #[test]
    fn tso_to_an_ipv6_remote_is_whole_only_with_tunnel_gso6_and_two_segments() {
        let t = tables6();
        let mut l = link(None);
        l.tunnel_v6 = true;
        let go = |l: &Link, payload: usize| {
            let (mut b, len, hdr) = tso_to([10, 244, 2, 9], payload, 1000);
            let (r, out, _seg) = run_on(&t, l, &mut nat(), &mut b, len, hdr);
            r.unwrap();
            assert_eq!(out.units.len(), 1);
            let u = out.units[0].clone();
            assert!(u.remote.is_ipv6() && u.flow_label != 0, "{u:?}");
            (u, hdr)
        };
        // the IPv4 bit alone does not send IPv6 remotes whole
        l.tunnel_gso = true;
        assert_eq!(go(&l, 10_000).0.gso, None);
        l.tunnel_gso6 = true;
        let (u, hdr) = go(&l, 10_000);
        assert_eq!((u.gso, u.pkts, u.segment), (Some(hdr), 10, 0));
        // one segment: the kernel would not segment it, so nothing would finish the outer
        // UDP checksum seed; it takes the socket path
        assert_eq!(go(&l, 1000).0.gso, None);
    }

    #[test]
    fn tso_to_a_tunnel_is_one_gso_train_of_encapsulated_segments() {
        let (mut b, len, hdr) = tso_to([10, 244, 2, 9], 10_000, 1000);
        let want = wire_segments(&b, len, &hdr);
        assert_eq!(want.len(), 10);
        let inner = b[HEADROOM..HEADROOM + len].to_vec();
        let (r, out, seg) = run(&link(Some(FrameMode::Vnet)), &mut nat(), &mut b, len, hdr);
        r.unwrap();
        assert_eq!((out.frames.len(), out.units.len()), (0, 1));
        let u = &out.units[0];
        assert_eq!(u.buf, Buffer::Segments);
        assert_eq!(u.remote, "172.16.3.2:4789".parse::<SocketAddr>().unwrap());
        assert_eq!(u.path(), Path::Vxlan);
        // the same hash, port and TOS the re-parsing helpers give the whole inner packet
        assert_eq!(u.hash, encap::flow_hash(&inner));
        assert_eq!(u.src_port, encap::udp_source_port(&inner));
        assert_eq!(u.tos, encap::outer_tos(&inner));
        assert_eq!(u.flow_label, 0);
        assert_eq!(u.pkts, 10);
        let bytes: usize = want.iter().map(Vec::len).sum();
        assert_eq!(u.bytes, bytes as u64);
        let unit = usize::from(u.segment);
        assert_eq!(unit, encap::VXLAN_PAYLOAD_OVERHEAD + want[0].len());
        let units: Vec<&[u8]> = seg[u.range.clone()].chunks(unit).collect();
        assert_eq!(units.len(), 10);
        for (got, want) in units.iter().zip(&want) {
            let d = encap::decap_payload(TunnelProto::Vxlan, got, 0).unwrap();
            assert_eq!(&got[d.inner], &want[..]);
            assert!(tcp_v4_ok(want));
        }
    }

    #[test]
    fn tunnel_trains_are_cut_at_the_kernel_limits() {
        // 45 segments of 52 + 1436 bytes: fewer than 45 units fit in one send's bytes.
        let (mut b, len, hdr) = tso_to([10, 244, 2, 9], 45 * 1436, 1436);
        let (r, out, _) = run(&link(Some(FrameMode::Vnet)), &mut nat(), &mut b, len, hdr);
        r.unwrap();
        let unit = encap::VXLAN_PAYLOAD_OVERHEAD + 52 + 1436;
        let per = UDP_GSO_MAX_BYTES / unit;
        assert!(per < 45);
        let shape: Vec<(u64, u16)> = out.units.iter().map(|u| (u.pkts, u.segment)).collect();
        assert_eq!(
            shape,
            [(per as u64, unit as u16), (45 - per as u64, unit as u16)]
        );
        assert_eq!(out.units[0].range.end, out.units[1].range.start);
        assert!(out.units[0].range.len() <= UDP_GSO_MAX_BYTES);
    }

    #[test]
    fn native_sends_the_super_packet_whole_or_segmented() {
        let (b0, len, hdr) = tso_to([10, 244, 3, 9], 10_000, 1000);
        let want = wire_segments(&b0, len, &hdr);
        // PACKET_VNET_HDR: one frame, the vnet header's offsets moved past the Ethernet header.
        let mut b = b0.clone();
        let (r, out, _) = run(&link(Some(FrameMode::Vnet)), &mut nat(), &mut b, len, hdr);
        r.unwrap();
        assert_eq!((out.frames.len(), out.units.len()), (1, 0));
        let f = &out.frames[0];
        assert_eq!(f.buf, Buffer::Packet);
        assert_eq!(f.range, HEADROOM - ETH_HLEN - VNET_HDR_LEN..HEADROOM + len);
        assert_eq!(
            (f.path, f.gso, f.pkts, f.next_hop_mac),
            (Path::Native, true, 10, N3)
        );
        assert_eq!(f.bytes, want.iter().map(|s| s.len() as u64).sum::<u64>());
        let vh = VnetHdr::parse(&b[f.range.start..]).unwrap();
        assert_eq!((vh.csum_start, vh.gso_size), (20 + ETH_HLEN as u16, 1000));
        let eth = &b[HEADROOM - ETH_HLEN..HEADROOM];
        assert_eq!(
            (&eth[..6], &eth[6..12], &eth[12..]),
            (&N3[..], &ME[..], &[8, 0][..])
        );
        assert_eq!(
            &b[HEADROOM..],
            &b0[HEADROOM..],
            "the packet itself is untouched"
        );
        // Plain frames: segmented here, one frame per wire segment.
        let mut b = b0.clone();
        let (r, out, seg) = run(&link(Some(FrameMode::Plain)), &mut nat(), &mut b, len, hdr);
        r.unwrap();
        assert_eq!(out.frames.len(), 10);
        for (f, want) in out.frames.iter().zip(&want) {
            assert_eq!((f.buf, f.gso, f.pkts), (Buffer::Segments, false, 1));
            assert_eq!(&seg[f.range.start..f.range.start + 6], &N3);
            assert_eq!(&seg[f.range.start + ETH_HLEN..f.range.end], &want[..]);
        }
    }

    #[test]
    fn drops_count_every_wire_packet_of_the_read() {
        let (b0, len, hdr) = tso_to([10, 244, 3, 9], 10_000, 1000);
        let no_route = Err(Dropped {
            reason: DropReason::NoRoute,
            packets: 10,
        });
        // no underlay packet socket
        let (r, out, _) = run(&link(None), &mut nat(), &mut b0.clone(), len, hdr);
        assert_eq!((r, out.frames.len()), (no_route, 0));
        // no tunnel socket of the remote's family
        let (b0, len, hdr) = tso_to([10, 244, 2, 9], 10_000, 1000);
        let mut l = link(Some(FrameMode::Vnet));
        l.tunnel_v4 = false;
        let (r, out, _) = run(&l, &mut nat(), &mut b0.clone(), len, hdr);
        assert_eq!((r, out.units.len()), (no_route, 0));
        // a range outside the buffer
        let (r, _, _) = run(&l, &mut nat(), &mut b0.clone(), usize::MAX - 1, hdr);
        assert_eq!(r.unwrap_err().reason, DropReason::Truncated);
    }

    #[test]
    fn local_destinations_go_to_the_sink() {
        let (mut b, len, hdr) = tso_to([10, 244, 1, 9], 10_000, 1000);
        let (r, out, _) = run(&link(Some(FrameMode::Vnet)), &mut nat(), &mut b, len, hdr);
        r.unwrap();
        assert_eq!(out.local.len(), 1);
        assert_eq!(out.local[0], HEADROOM..HEADROOM + len);
    }

    #[test]
    fn masquerade_translates_the_super_packet_once_or_each_segment() {
        // a SYN (only a packet that opens a flow creates a mapping), with data (TCP Fast Open)
        let (b0, len, hdr) = tso_with([203, 0, 113, 5], 10_000, 1000, 0x02);
        // PACKET_VNET_HDR: translated whole, the checksum field the new pseudo-header sum.
        let mut b = b0.clone();
        let mut n = nat();
        let (r, out, _) = run(&link(Some(FrameMode::Vnet)), &mut n, &mut b, len, hdr);
        r.unwrap();
        assert_eq!(n.0.len(), 1);
        assert_eq!(out.frames.len(), 1);
        let f = &out.frames[0];
        assert_eq!(
            (f.path, f.gso, f.pkts, f.next_hop_mac),
            (Path::Masquerade, true, 10, GW)
        );
        let pkt = &b[HEADROOM..HEADROOM + len];
        assert_eq!(&pkt[12..16], &[172, 16, 2, 2]);
        for s in wire_segments(&b, len, &hdr) {
            assert!(tcp_v4_ok(&s), "the kernel's segments carry good checksums");
        }
        // Plain frames: segmented first, every segment translated to the same mapping.
        let mut b = b0.clone();
        let mut n = nat();
        let (r, out, seg) = run(&link(Some(FrameMode::Plain)), &mut n, &mut b, len, hdr);
        r.unwrap();
        assert_eq!((out.frames.len(), n.0.len()), (10, 1));
        assert!(out.segment_drops.is_empty());
        let ports: Vec<&[u8]> = out
            .frames
            .iter()
            .map(|f| {
                let s = &seg[f.range.start + ETH_HLEN..f.range.end];
                assert_eq!(&s[12..16], &[172, 16, 2, 2]);
                assert!(tcp_v4_ok(s));
                &s[20..22]
            })
            .collect();
        assert!(ports.windows(2).all(|w| w[0] == w[1]));
    }
}
