//! Bytes in, action out: the per-packet glue the I/O engine (rust/io) and the bindings call.
//!
//! Every function here takes the packet as `buf[start..start + len]`, may rewrite it in place
//! (NAT, ECN) and write headers into the headroom in front of it (encapsulation), and returns what
//! to send where as a byte range of `buf`. Nothing allocates, nothing panics on any input, and
//! the functions never touch a clock: `now` is seconds on any monotonic epoch, used only by NAT.
//!
//! * [`egress`]: a packet read from the TUN (a local pod's packet the kernel routed to podrouter),
//!   one plain packet at a time, through [`egress::egress`] (the entry point the I/O engine calls
//!   for every read, super-packets included). Leave [`MAX_HEADROOM`] bytes in front of `start`
//!   for the tunnel headers.
//! * [`ingress`]: the payload of a UDP datagram received on a tunnel port.
//! * [`masquerade_reply`]: a packet to the node address on the masquerade port range.
//!
//! Each forwarding action names its [`Path`] so the caller can count
//! `podrouter_packets_total{path,direction}` without knowing how it was decided, and every drop
//! carries a [`DropReason`] for `podrouter_drops_total{reason}`.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

pub use crate::classify::Tables;
pub use crate::drop::DropReason;
use crate::egress;
pub use crate::egress::check_ttl;
use crate::encap;
pub use crate::encap::{vxlan_inner_mac, TunnelProto, MAX_HEADROOM};
use crate::nat::{self, NatTable, NatTable6};
use crate::offload::csum;
use crate::offload::vnet::{self, VnetHdr};
pub use crate::spec::PeerId;
pub use crate::verdict::{Path, Verdict};
use crate::wire::{self, IpMeta};

/// What to do with a packet from a local pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressAction {
    /// Send `buf[range]` (tunnel header + inner packet) as the payload of one UDP datagram from
    /// the node address, source port `src_port`, to `remote`, with the IP TOS byte `tos`
    /// (inner DSCP copied, ECN per RFC 6040 normal mode).
    Tunnel {
        range: Range<usize>,
        remote: SocketAddr,
        src_port: u16,
        tos: u8,
        proto: TunnelProto,
    },
    /// Send the IP packet `buf[range]` on the underlay interface in an Ethernet frame to
    /// `next_hop_mac`. `path` is [`Path::Native`], or [`Path::Masquerade`] when the packet was
    /// source-translated to the node address.
    Native {
        range: Range<usize>,
        next_hop_mac: [u8; 6],
        path: Path,
    },
    /// The destination is a pod of this node: hand `buf[range]` to the kernel.
    Local {
        range: Range<usize>,
    },
    Drop(DropReason),
}

impl EgressAction {
    /// The metrics path label; `None` for a drop.
    pub fn path(&self) -> Option<Path> {
        match self {
            EgressAction::Tunnel { proto, .. } => Some(Path::tunnel(*proto)),
            EgressAction::Native { path, .. } => Some(*path),
            EgressAction::Local { .. } => Some(Path::Local),
            EgressAction::Drop(_) => None,
        }
    }

    /// The bytes to send, `None` for a drop.
    pub fn range(&self) -> Option<Range<usize>> {
        match self {
            EgressAction::Tunnel { range, .. }
            | EgressAction::Native { range, .. }
            | EgressAction::Local { range } => Some(range.clone()),
            EgressAction::Drop(_) => None,
        }
    }
}

/// What to do with a received tunnel datagram or masquerade reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressAction {
    /// Write the inner IP packet `buf[range]` to the TUN. `peer` is the sending peer for tunnel
    /// traffic, `None` for masquerade replies.
    Deliver {
        range: Range<usize>,
        path: Path,
        peer: Option<PeerId>,
    },
    Drop(DropReason),
}

impl IngressAction {
    /// The metrics path label; `None` for a drop.
    pub fn path(&self) -> Option<Path> {
        match self {
            IngressAction::Deliver { path, .. } => Some(*path),
            IngressAction::Drop(_) => None,
        }
    }
}

fn packet(buf: &mut [u8], start: usize, len: usize) -> Result<&mut [u8], DropReason> {
    let end = start.checked_add(len).ok_or(DropReason::Truncated)?;
    buf.get_mut(start..end).ok_or(DropReason::Truncated)
}

/// Parses the packet at `buf[start..start + len]` and classifies it: the "explain" call. The
/// verdict is what [`egress`] would act on (TTL aside).
pub fn classify_packet(tables: &Tables, pkt: &[u8]) -> Result<(IpMeta, Verdict), DropReason> {
    let meta = wire::parse_ip(pkt)?;
    Ok((meta, tables.classify(meta.src, meta.dst)))
}

/// Decides and prepares one plain packet from a local pod: [`egress::egress`], the entry point
/// the I/O engine runs, for a caller that handles one packet at a time (the criterion benches,
/// tests). `buf[start..start + len]` is the IP packet (link padding after its total length
/// is ignored); for tunnels, the headers are written into `buf[start - overhead..start]`, for
/// native and masqueraded packets an Ethernet header into `buf[start - 14..start]`. The packet
/// carries no offload metadata; a native frame is a plain Ethernet frame. `nat` is required for
/// masquerade (else `Drop(unsupported)`), which translates IPv4 only here.
///
/// TTL / hop limit handling follows [`check_ttl`].
pub fn egress(
    tables: &Tables,
    nat: Option<&mut NatTable>,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: u64,
) -> EgressAction {
    // A plain packet is never segmented: the scratch buffers stay empty and never allocate.
    let (mut seg, mut segs) = (Vec::new(), Vec::new());
    let p = egress::Packet {
        buf,
        start,
        len,
        hdr: VnetHdr::default(),
        seg: &mut seg,
        segs: &mut segs,
    };
    // Every `Ok` reports exactly one output for a plain packet, which overwrites this.
    let mut out = One(EgressAction::Drop(DropReason::Unsupported));
    match egress::egress(tables, &ONE_LINK, &mut OneNat(nat), &mut out, p, now) {
        Ok(()) => out.0,
        Err(d) => EgressAction::Drop(d.reason),
    }
}

/// The link of the one-packet API: a constant, so it is not built per packet.
const ONE_LINK: egress::Link = egress::Link {
    mac: [0; 6],
    frames: Some(egress::FrameMode::Plain),
    tunnel_v4: true,
    tunnel_v6: true,
    tunnel_gso: false,
    tunnel_gso6: false,
};

/// The one output of a plain packet, as an [`EgressAction`].
struct One(EgressAction);

impl egress::Sink for One {
    fn tunnel(&mut self, u: egress::TunnelUnit) {
        self.0 = EgressAction::Tunnel {
            range: u.range,
            remote: u.remote,
            src_port: u.src_port,
            tos: u.tos,
            proto: u.proto,
        };
    }

    fn frame(&mut self, f: egress::Frame) {
        self.0 = EgressAction::Native {
            range: f.range.start + egress::ETH_HLEN..f.range.end,
            next_hop_mac: f.next_hop_mac,
            path: f.path,
        };
    }

    fn local(&mut self, range: Range<usize>) -> Result<(), DropReason> {
        self.0 = EgressAction::Local { range };
        Ok(())
    }

    fn segment_dropped(&mut self, _: DropReason) {}
}

/// The caller's IPv4 masquerade table, if any.
struct OneNat<'a>(Option<&'a mut NatTable>);

impl egress::Nat for OneNat<'_> {
    fn v4(&mut self) -> Option<impl core::ops::DerefMut<Target = NatTable> + '_> {
        self.0.as_deref_mut()
    }

    fn v6(&mut self) -> Option<impl core::ops::DerefMut<Target = NatTable6> + '_> {
        None::<&mut NatTable6>
    }
}

/// Validates and decapsulates the payload `buf[start..start + len]` of a UDP datagram from
/// `outer_src` port `udp_src_port` to our port `udp_dst_port` whose outer IP header carried ECN
/// field `outer_ecn`.
///
/// Checks, in order: the port is a configured tunnel port (`unsupported`), the sender is a known
/// peer (`unknown_peer`), the source port is not in our masquerade port range
/// (`tunnel_source_port`, see [`check_tunnel_source_port`]), the tunnel header (the decap reasons), the inner packet parses, the VNI,
/// inner source inside the sender's pod CIDRs, inner destination one of our pods
/// (`validate_ingress`), then applies RFC 6040 §4.2 to the inner ECN field (outer CE over a
/// Not-ECT inner packet: `ecn_drop`).
#[allow(clippy::too_many_arguments)]
pub fn ingress(
    tables: &Tables,
    outer_src: IpAddr,
    udp_src_port: u16,
    udp_dst_port: u16,
    outer_ecn: u8,
    buf: &mut [u8],
    start: usize,
    len: usize,
) -> IngressAction {
    match ingress_inner(
        tables,
        outer_src,
        udp_src_port,
        udp_dst_port,
        outer_ecn,
        buf,
        start,
        len,
    ) {
        Ok(a) => a,
        Err(r) => IngressAction::Drop(r),
    }
}

#[allow(clippy::too_many_arguments)]
fn ingress_inner(
    tables: &Tables,
    outer_src: IpAddr,
    udp_src_port: u16,
    udp_dst_port: u16,
    outer_ecn: u8,
    buf: &mut [u8],
    start: usize,
    len: usize,
) -> Result<IngressAction, DropReason> {
    let proto = tables
        .tunnel()
        .proto_for_port(udp_dst_port)
        .ok_or(DropReason::Unsupported)?;
    tables
        .peer_by_address(outer_src)
        .ok_or(DropReason::UnknownPeer)?;
    check_tunnel_source_port(tables, udp_src_port)?;
    let payload = packet(buf, start, len)?;
    let d = encap::decap_payload(proto, payload, outer_ecn)?;
    let inner = payload
        .get_mut(d.inner.clone())
        .ok_or(DropReason::Truncated)?;
    let meta = wire::parse_ip(inner)?;
    let peer = tables.validate_ingress(outer_src, d.vni, meta.src, meta.dst)?;
    encap::apply_ecn(inner, d.ecn_action)?;
    Ok(IngressAction::Deliver {
        range: start + d.inner.start..start + d.inner.end,
        path: Path::tunnel(proto),
        peer: Some(peer),
    })
}

/// Refuses an encapsulated datagram whose outer UDP source port lies in this node's masquerade
/// port range (`tunnel_source_port`).
///
/// A pod can build a VXLAN / Geneve datagram itself and send it to a peer's tunnel port; when
/// that peer masquerades it, it leaves with the peer's address, so address checks alone would
/// take it for the peer's tunnel sender. Its source port, though, is a masquerade port, and no
/// tunnel sender uses one: podrouter sends from [`encap::SOURCE_PORT_MIN`]..=
/// [`encap::SOURCE_PORT_MAX`], Linux's VXLAN driver from 32768-60999, and the masquerade range
/// (61000-65535 by default) must not overlap the former. The node's own range stands for the
/// peers' (one cluster, one setting). Checked whether or not masquerade is enabled here.
pub fn check_tunnel_source_port(tables: &Tables, udp_src_port: u16) -> Result<(), DropReason> {
    let (lo, hi) = tables.settings().port_range;
    if (lo..=hi).contains(&udp_src_port) {
        return Err(DropReason::TunnelSourcePort);
    }
    Ok(())
}

/// Reverse-translates a masquerade reply `buf[start..start + len]` (an IPv4 packet to the node
/// address) back to the pod; see [`nat::translate_ingress`].
pub fn masquerade_reply(
    nat: &mut NatTable,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: u64,
) -> IngressAction {
    reply_with(nat, nat::translate_ingress, buf, start, len, now)
}

/// [`masquerade_reply`] for IPv6: a reply to the node's IPv6 masquerade address, translated back
/// with the IPv6 table ([`nat::translate_ingress_v6`]).
pub fn masquerade_reply_v6(
    nat: &mut NatTable6,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: u64,
) -> IngressAction {
    reply_with(nat, nat::translate_ingress_v6, buf, start, len, now)
}

/// A family's reverse translation ([`nat::translate_ingress`], [`nat::translate_ingress_v6`]).
type Translate<A> = fn(&mut nat::NatTable<A>, &mut [u8], u64) -> Result<A, DropReason>;

/// A masquerade reply of either family, reverse-translated by `translate` with its table.
fn reply_with<A: nat::NatAddr>(
    nat: &mut nat::NatTable<A>,
    translate: Translate<A>,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: u64,
) -> IngressAction {
    let mut run = || -> Result<IngressAction, DropReason> {
        let pkt = packet(buf, start, len)?;
        let total = wire::parse_ip(pkt)?.total_len;
        translate(nat, pkt, now)?;
        Ok(IngressAction::Deliver {
            range: start..start + total,
            path: Path::Masquerade,
            peer: None,
        })
    };
    run().unwrap_or_else(IngressAction::Drop)
}

/// The vnet header to write a reverse-translated masquerade reply `pkt` to the TUN with; `hdr` is
/// the vnet header the underlay packet socket read it with (offsets counted from the IP header),
/// `None` without one. A packet the kernel merged (GRO) or whose checksum it left to offload
/// (`NEEDS_CSUM`, e.g. from a sender on the same host) carries no valid TCP/UDP checksum, so after
/// NAT changed its destination the checksum field is set to the new pseudo-header sum and the
/// kernel finishes it (or segments the super-packet) — virtio `NEEDS_CSUM` semantics. A packet
/// with a complete checksum was updated incrementally by NAT and goes in without offload. Without
/// a vnet header we cannot tell, so the checksum is computed from scratch.
pub fn masquerade_reply_offload(
    pkt: &mut [u8],
    hdr: Option<VnetHdr>,
) -> Result<VnetHdr, DropReason> {
    let hdr = match hdr {
        Some(h) if !h.is_gso() && !h.needs_csum() => return Ok(VnetHdr::default()),
        Some(h) => h,
        None => VnetHdr::default(),
    };
    let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
    if v6 && pkt.len() < 40 {
        return Err(DropReason::Malformed);
    }
    if !v6 && (pkt.len() < 20 || pkt[0] >> 4 != 4) {
        return Err(DropReason::Malformed);
    }
    // IPv6: the core translates only a transport directly after the fixed header
    let (ihl, proto) = if v6 {
        (40, pkt[6])
    } else {
        (usize::from(pkt[0] & 0x0f) * 4, pkt[9])
    };
    let offset = match proto {
        6 => 16,
        17 => 6,
        _ => return Err(DropReason::Unsupported),
    };
    let mut h = vnet::shift_for_link(pkt, &hdr, 0).map_err(|_| DropReason::Malformed)?;
    if !h.needs_csum() {
        h.flags |= vnet::flags::NEEDS_CSUM;
    }
    h.flags &= !vnet::flags::DATA_VALID;
    h.csum_start = ihl as u16;
    h.csum_offset = offset;
    let end = if v6 {
        (40 + usize::from(u16::from_be_bytes([pkt[4], pkt[5]]))).min(pkt.len())
    } else {
        usize::from(u16::from_be_bytes([pkt[2], pkt[3]])).min(pkt.len())
    };
    let field = ihl + offset as usize;
    if field + 2 > end {
        return Err(DropReason::Truncated);
    }
    let pseudo = if v6 {
        csum::pseudo_v6(&pkt[8..24], &pkt[24..40], proto, (end - ihl) as u32)
    } else {
        csum::pseudo_v4(&pkt[12..16], &pkt[16..20], proto, (end - ihl) as u16)
    };
    pkt[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    if h.is_gso() || hdr.needs_csum() {
        return Ok(h);
    }
    vnet::complete_csum(&mut pkt[..end], ihl, usize::from(offset))
        .map_err(|_| DropReason::Malformed)?;
    Ok(VnetHdr::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encap::EncapParams;
    use crate::nat::NatConfig;
    use crate::spec::{
        Cidr, EngineSettings, MasqueradeSpec, NextHop, NodeSpec, PeerSpec, RoutingMode, TableSpec,
        TunnelSpec,
    };
    use crate::wire::{ecn, icmp, ip_proto, ipv4, udp};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// An IPv6 UDP datagram 2001:db8::1:53 -> fd00::a:5000 with `payload` and a wrong checksum.
    fn udp6(payload: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::a".parse().unwrap();
        let ulen = 8 + payload.len();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(ulen as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&5000u16.to_be_bytes());
        p.extend_from_slice(&(ulen as u16).to_be_bytes());
        p.extend_from_slice(&[0xde, 0xad]);
        p.extend_from_slice(payload);
        p
    }

    fn udp6_csum_ok(p: &[u8]) -> bool {
        let len = (p.len() - 40) as u32;
        let pseudo = csum::pseudo_v6(&p[8..24], &p[24..40], 17, len);
        csum::add(pseudo, csum::sum(&p[40..])) == 0xffff
    }

    #[test]
    fn offload_for_tun_fixes_ipv6_checksums() {
        // Without a vnet header the checksum is computed from scratch, no offload left.
        let mut p = udp6(b"hello, v6!");
        let h = masquerade_reply_offload(&mut p, None).unwrap();
        assert_eq!(h, VnetHdr::default());
        assert!(udp6_csum_ok(&p));
        // NEEDS_CSUM from the kernel: the field becomes the new pseudo-header sum, for the TUN
        // to finish at the transport header right after the 40-byte IPv6 header.
        let mut p = udp6(b"partial");
        let mut hdr = VnetHdr {
            flags: vnet::flags::NEEDS_CSUM,
            csum_start: 40,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let h = masquerade_reply_offload(&mut p, Some(hdr)).unwrap();
        assert!(h.needs_csum());
        assert_eq!((h.csum_start, h.csum_offset), (40, 6));
        vnet::complete_csum(&mut p, 40, 6).unwrap();
        assert!(udp6_csum_ok(&p));
        // A complete checksum (no offload flags) is left to NAT's incremental update.
        hdr.flags = 0;
        let mut p = udp6(b"x");
        assert_eq!(
            masquerade_reply_offload(&mut p, Some(hdr)).unwrap(),
            VnetHdr::default()
        );
        assert_eq!(&p[46..48], &[0xde, 0xad]);
        // Truncated or unsupported.
        assert_eq!(
            masquerade_reply_offload(&mut udp6(b"")[..30].to_vec(), None),
            Err(DropReason::Malformed)
        );
        let mut p = udp6(b"icmp");
        p[6] = 58;
        assert_eq!(
            masquerade_reply_offload(&mut p, None),
            Err(DropReason::Unsupported)
        );
    }

    fn a4(s: &str) -> IpAddr {
        IpAddr::V4(v4(s))
    }
    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn v6_addr(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }
    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const N3_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];

    fn peer(name: &str, addr: &str, cidr: &str, on_link: bool, mac: [u8; 6]) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            address: a4(addr),
            pod_cidrs: vec![c(cidr)],
            mode: None,
            tunnel_protocol: None,
            on_link,
            next_hop: Some(NextHop {
                ip: IpAddr::V4(if on_link { v4(addr) } else { v4("172.16.2.1") }),
                mac: Some(mac),
            }),
            vtep_mac: None,
            geneve_payload: None,
        }
    }

    /// The reference topology, hybrid with native_when_on_link (docs/design.md §8), seen from `me`.
    fn tables_for(me: usize) -> Tables {
        build(&spec_for(me), me)
    }

    const NODES: [(&str, &str, &str, bool); 3] = [
        ("node1", "172.16.2.2", "10.244.1.0/24", true),
        ("node2", "172.16.3.2", "10.244.2.0/24", false),
        ("node3", "172.16.2.3", "10.244.3.0/24", true),
    ];

    /// `spec` compiled against the start-time settings of node `me` (its address).
    fn build(spec: &TableSpec, me: usize) -> Tables {
        Tables::build(spec, &EngineSettings::new(a4(NODES[me].1))).unwrap()
    }

    fn spec_for(me: usize) -> TableSpec {
        let nodes = NODES;
        let (name, _, cidr, _) = nodes[me];
        let peers = nodes
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .map(|(_, &(n, a, c, l))| peer(n, a, c, l && nodes[me].3, N3_MAC))
            .collect();
        TableSpec {
            generation: 1,
            node: NodeSpec {
                name: name.into(),
                pod_cidrs: vec![c(cidr)],
            },
            cluster_cidrs: vec![c("10.244.0.0/16")],
            mode: RoutingMode::Hybrid,
            native_cidrs: vec![],
            native_when_on_link: true,
            tunnel: TunnelSpec::default(),
            gateway: Some(NextHop {
                ip: IpAddr::V4(v4("172.16.2.1")),
                mac: Some(GW_MAC),
            }),
            masquerade: MasqueradeSpec {
                enabled: true,
                ..MasqueradeSpec::default()
            },
            peers,
        }
    }

    /// A UDP/IPv4 packet at offset MAX_HEADROOM of a buffer, plus 4 bytes of link padding.
    fn udp_buf(src: &str, dst: &str, ttl: u8, tos: u8) -> (Vec<u8>, usize) {
        let payload = b"podrouter";
        let len = 20 + 8 + payload.len();
        let mut b = vec![0u8; MAX_HEADROOM + len + 4];
        let p = &mut b[MAX_HEADROOM..MAX_HEADROOM + len];
        ipv4::Repr {
            src: v4(src),
            dst: v4(dst),
            protocol: ip_proto::UDP,
            payload_len: 8 + payload.len(),
            ttl,
            tos,
            ident: 7,
            dont_frag: true,
        }
        .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
        .unwrap();
        {
            let mut u = udp::Packet::new_unchecked(&mut p[20..]);
            u.set_src_port(5000);
            u.set_dst_port(6000);
            u.set_len((8 + payload.len()) as u16);
        }
        p[28..].copy_from_slice(payload);
        udp::Packet::new_unchecked(&mut p[20..]).fill_checksum_v4(v4(src), v4(dst));
        (b, len)
    }

    #[test]
    fn tunnel_egress_then_peer_ingress() {
        let (n1, n2) = (tables_for(0), tables_for(1));
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", 63, 0xb8 | ecn::ECT0);
        let original = b[MAX_HEADROOM..MAX_HEADROOM + len].to_vec();
        let a = egress(&n1, None, &mut b, MAX_HEADROOM, len + 4, 0);
        let EgressAction::Tunnel {
            range,
            remote,
            src_port,
            tos,
            proto,
        } = a.clone()
        else {
            panic!("{a:?}")
        };
        assert_eq!(a.path(), Some(Path::Vxlan));
        assert_eq!(remote, "172.16.3.2:4789".parse().unwrap());
        assert_eq!(proto, TunnelProto::Vxlan);
        assert!(src_port >= encap::SOURCE_PORT_MIN);
        assert_eq!(tos, 0xb8 | ecn::ECT0);
        // Link padding is not sent.
        assert_eq!(range, MAX_HEADROOM - 22..MAX_HEADROOM + len);
        // node2 receives the UDP payload.
        let mut rx = b[range].to_vec();
        let n = rx.len();
        let d = ingress(&n2, a4("172.16.2.2"), 50000, 4789, ecn::ECT0, &mut rx, 0, n);
        let IngressAction::Deliver { range, path, peer } = d else {
            panic!("{d:?}")
        };
        assert_eq!((path, peer), (Path::Vxlan, Some(PeerId(0))));
        assert_eq!(&rx[range], &original[..]);
    }

    /// A tunnel datagram whose outer source port lies in the masquerade range (61000-65535 here)
    /// is what a pod's hand-built VXLAN frame looks like after a peer masqueraded it: dropped as
    /// `tunnel_source_port`, while the tunnel senders' range (podrouter 49152-60999, Linux's VXLAN
    /// driver 32768-60999) still passes. Egress never picks a port outside its range.
    #[test]
    fn tunnel_source_port_in_masquerade_range_is_dropped() {
        let (n1, n2) = (tables_for(0), tables_for(1));
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", 63, 0);
        let a = egress(&n1, None, &mut b, MAX_HEADROOM, len, 0);
        let EgressAction::Tunnel {
            range, src_port, ..
        } = a
        else {
            panic!("{a:?}")
        };
        assert!((encap::SOURCE_PORT_MIN..=encap::SOURCE_PORT_MAX).contains(&src_port));
        let frame = b[range].to_vec();
        let (lo, hi) = n2.settings().port_range;
        assert_eq!((lo, hi), (61000, 65535));
        let from = |port: u16| {
            let mut rx = frame.clone();
            let n = rx.len();
            ingress(&n2, a4("172.16.2.2"), port, 4789, 0, &mut rx, 0, n)
        };
        for port in [lo, 62000, hi] {
            assert_eq!(
                from(port),
                IngressAction::Drop(DropReason::TunnelSourcePort),
                "{port}"
            );
        }
        for port in [32768, 49152, src_port, 60999] {
            assert!(
                matches!(from(port), IngressAction::Deliver { .. }),
                "{port}"
            );
        }
        // an unknown sender is still `unknown_peer`, whatever its port
        let mut rx = frame.clone();
        let n = rx.len();
        assert_eq!(
            ingress(&n2, a4("172.16.9.9"), 62000, 4789, 0, &mut rx, 0, n),
            IngressAction::Drop(DropReason::UnknownPeer)
        );
    }

    /// The inner Ethernet header of a VXLAN frame: our synthesized VTEP MAC as the source; the
    /// peer's configured `vtep_mac` as the destination (a kernel vxlan device drops frames not
    /// addressed to its own MAC), else the peer's synthesized one.
    #[test]
    fn vxlan_inner_macs_are_our_vtep_mac_and_the_peers() {
        let inner_macs = |t: &Tables| {
            let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", 63, 0);
            let a = egress(t, None, &mut b, MAX_HEADROOM, len, 0);
            let EgressAction::Tunnel { range, .. } = a else {
                panic!("{a:?}")
            };
            let eth = &b[range.start + 8..range.start + 22];
            (
                <[u8; 6]>::try_from(&eth[..6]).unwrap(),
                <[u8; 6]>::try_from(&eth[6..12]).unwrap(),
                [eth[12], eth[13]],
            )
        };
        let ours = [0x02, 0x70, 172, 16, 2, 2];
        let t = tables_for(0);
        assert_eq!(t.vtep_mac(), ours);
        assert_eq!(
            inner_macs(&t),
            ([0x02, 0x70, 172, 16, 3, 2], ours, [0x08, 0x00])
        );
        let flannel = [0x3a, 0x1f, 0x9c, 0x44, 0x05, 0xe1];
        let mut spec = spec_for(0);
        let node2 = spec.peers.iter_mut().find(|p| p.name == "node2").unwrap();
        node2.vtep_mac = Some(flannel);
        let t = build(&spec, 0);
        assert_eq!(inner_macs(&t), (flannel, ours, [0x08, 0x00]));
        assert_eq!(
            t.peers()
                .iter()
                .find(|p| p.name == "node2")
                .unwrap()
                .vtep_mac,
            flannel
        );
    }

    #[test]
    fn geneve_override_and_native_on_link() {
        let mut spec_tables = tables_for(0);
        // node3 shares node1's L2: native to its MAC, unchanged packet.
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.3.30", 64, 0);
        let a = egress(&spec_tables, None, &mut b, MAX_HEADROOM, len, 0);
        assert_eq!(
            a,
            EgressAction::Native {
                range: MAX_HEADROOM..MAX_HEADROOM + len,
                next_hop_mac: N3_MAC,
                path: Path::Native
            }
        );
        // Geneve to node2 through a per-peer override on a rebuilt table.
        let mut spec = TableSpec {
            generation: 2,
            node: NodeSpec {
                name: "node1".into(),
                pod_cidrs: vec![c("10.244.1.0/24")],
            },
            cluster_cidrs: vec![c("10.244.0.0/16")],
            mode: RoutingMode::Tunnel,
            native_cidrs: vec![],
            native_when_on_link: false,
            tunnel: TunnelSpec::default(),
            gateway: None,
            masquerade: MasqueradeSpec::default(),
            peers: vec![peer("node2", "172.16.3.2", "10.244.2.0/24", false, GW_MAC)],
        };
        spec.peers[0].tunnel_protocol = Some(TunnelProto::Geneve);
        spec_tables = build(&spec, 0);
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", 64, 0);
        let a = egress(&spec_tables, None, &mut b, MAX_HEADROOM, len, 0);
        let EgressAction::Tunnel {
            range,
            remote,
            proto,
            ..
        } = a
        else {
            panic!("{a:?}")
        };
        assert_eq!((proto, remote.port()), (TunnelProto::Geneve, 6081));
        // Geneve carries an inner Ethernet frame by default (Protocol Type 0x6558)
        assert_eq!(range.start, MAX_HEADROOM - 22);
        assert_eq!(&b[range.start + 2..range.start + 4], &[0x65, 0x58]);
        let mut rx = b[range].to_vec();
        let n = rx.len();
        let d = ingress(
            &tables_for(1),
            a4("172.16.2.2"),
            50000,
            6081,
            0,
            &mut rx,
            0,
            n,
        );
        assert_eq!(d.path(), Some(Path::Geneve));
        // a per-peer `ip` override: the inner IP packet straight after the Geneve header, still
        // accepted by a receiver whose own default is `ethernet`
        spec.peers[0].geneve_payload = Some(crate::encap::GenevePayload::Ip);
        spec_tables = build(&spec, 0);
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", 64, 0);
        let a = egress(&spec_tables, None, &mut b, MAX_HEADROOM, len, 0);
        let EgressAction::Tunnel { range, .. } = a else {
            panic!("{a:?}")
        };
        assert_eq!(range.start, MAX_HEADROOM - 8);
        assert_eq!(&b[range.start + 2..range.start + 4], &[0x08, 0x00]);
        let mut rx = b[range].to_vec();
        let n = rx.len();
        let d = ingress(
            &tables_for(1),
            a4("172.16.2.2"),
            50000,
            6081,
            0,
            &mut rx,
            0,
            n,
        );
        assert_eq!(d.path(), Some(Path::Geneve));
    }

    /// The reference topology in dual stack (fd00:10:244::/48, fd00:10:244:<n>::/64), seen from `me`.
    fn dual_spec_for(me: usize) -> TableSpec {
        let mut spec = spec_for(me);
        spec.node
            .pod_cidrs
            .push(c(&format!("fd00:10:244:{}::/64", me + 1)));
        spec.cluster_cidrs.push(c("fd00:10:244::/48"));
        for p in &mut spec.peers {
            let n = &p.name["node".len()..];
            p.pod_cidrs.push(c(&format!("fd00:10:244:{n}::/64")));
        }
        spec
    }

    /// A UDP/IPv6 packet (valid checksum) at offset MAX_HEADROOM, plus 4 bytes of link padding.
    fn udp6_buf(src: &str, dst: &str, hop_limit: u8) -> (Vec<u8>, usize) {
        let payload = b"podrouter-v6";
        let len = 40 + 8 + payload.len();
        let mut b = vec![0u8; MAX_HEADROOM + len + 4];
        let p = &mut b[MAX_HEADROOM..MAX_HEADROOM + len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[6] = ip_proto::UDP;
        p[7] = hop_limit;
        p[8..24].copy_from_slice(&v6_addr(src));
        p[24..40].copy_from_slice(&v6_addr(dst));
        {
            let mut u = udp::Packet::new_unchecked(&mut p[40..]);
            u.set_src_port(5000);
            u.set_dst_port(6000);
            u.set_len((8 + payload.len()) as u16);
        }
        p[48..].copy_from_slice(payload);
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        udp::Packet::new_unchecked(&mut p[40..]).fill_checksum(s, d);
        (b, len)
    }

    /// IPv6 pods over the IPv4 underlay: VXLAN and Geneve carry the inner IPv6 packet unchanged to
    /// the peer, which validates the inner addresses against the v6 pod CIDRs; native goes to the
    /// next hop's MAC; hop limit 1 and spoofed inner sources are dropped; no NAT66.
    #[test]
    fn dual_stack_egress_ingress() {
        let (n1, n2) = (build(&dual_spec_for(0), 0), build(&dual_spec_for(1), 1));
        let node1 = a4("172.16.2.2");
        for proto in [TunnelProto::Vxlan, TunnelProto::Geneve] {
            let mut spec = dual_spec_for(0);
            spec.peers
                .iter_mut()
                .find(|p| p.name == "node2")
                .unwrap()
                .tunnel_protocol = Some(proto);
            let t = build(&spec, 0);
            let (mut b, len) = udp6_buf("fd00:10:244:1::a", "fd00:10:244:2::14", 63);
            let original = b[MAX_HEADROOM..MAX_HEADROOM + len].to_vec();
            let a = egress(&t, None, &mut b, MAX_HEADROOM, len + 4, 0);
            let EgressAction::Tunnel { range, remote, .. } = a.clone() else {
                panic!("{a:?}")
            };
            assert_eq!(a.path(), Some(Path::tunnel(proto)));
            assert_eq!(remote.ip(), a4("172.16.3.2"));
            // the inner protocol is IPv6: VXLAN's inner ethertype, Geneve's protocol type
            let hdr = &b[range.clone()];
            match proto {
                TunnelProto::Vxlan => assert_eq!(&hdr[8 + 12..8 + 14], &[0x86, 0xdd]),
                TunnelProto::Geneve => {
                    assert_eq!(&hdr[2..4], &[0x65, 0x58]);
                    assert_eq!(&hdr[8 + 12..8 + 14], &[0x86, 0xdd]);
                }
            }
            let mut rx = hdr.to_vec();
            let n = rx.len();
            let port = remote.port();
            let d = ingress(&n2, node1, 50000, port, 0, &mut rx, 0, n);
            let IngressAction::Deliver { range, .. } = d else {
                panic!("{d:?}")
            };
            assert_eq!(&rx[range], &original[..]);
        }
        // native to node3 on the shared L2: the unchanged IPv6 packet to node3's MAC
        let (mut b, len) = udp6_buf("fd00:10:244:1::a", "fd00:10:244:3::1e", 64);
        assert_eq!(
            egress(&n1, None, &mut b, MAX_HEADROOM, len, 0),
            EgressAction::Native {
                range: MAX_HEADROOM..MAX_HEADROOM + len,
                next_hop_mac: N3_MAC,
                path: Path::Native
            }
        );
        // hop limit exhausted: never sent on (it could not survive the peer's kernel), so no loop
        for hl in [0, 1] {
            let (mut b, len) = udp6_buf("fd00:10:244:1::a", "fd00:10:244:2::14", hl);
            assert_eq!(
                egress(&n1, None, &mut b, MAX_HEADROOM, len, 0),
                EgressAction::Drop(DropReason::TtlExceeded)
            );
        }
        // IPv6 leaving the cluster is routed natively via the gateway, with the pod's address
        let (mut b, len) = udp6_buf("fd00:10:244:1::a", "2001:db8::1", 64);
        assert_eq!(
            egress(&n1, None, &mut b, MAX_HEADROOM, len, 0),
            EgressAction::Native {
                range: MAX_HEADROOM..MAX_HEADROOM + len,
                next_hop_mac: GW_MAC,
                path: Path::Native
            }
        );
        // ingress from node2: inner sources outside node2's v6 CIDR, destinations not ours
        let from_node2 = |src: &str, dst: &str| {
            let (mut b, len) = udp6_buf(src, dst, 64);
            let params = EncapParams {
                proto: TunnelProto::Vxlan,
                vni: 1,
                src: a4("172.16.3.2"),
                dst: node1,
                dst_port: 4789,
                inner_src_mac: [0; 6],
                inner_dst_mac: [0; 6],
                geneve_payload: Default::default(),
            };
            let r = encap::encap_payload(&mut b, MAX_HEADROOM, len, &params).unwrap();
            let mut p = b[r].to_vec();
            let n = p.len();
            ingress(&n1, a4("172.16.3.2"), 50000, 4789, 0, &mut p, 0, n)
        };
        assert!(matches!(
            from_node2("fd00:10:244:2::5", "fd00:10:244:1::a"),
            IngressAction::Deliver { .. }
        ));
        for spoofed in [
            "fd00:10:244:3::5",
            "fd00:10:244:1::5",
            "2001:db8::5",
            "fd00:10:245:2::5",
        ] {
            assert_eq!(
                from_node2(spoofed, "fd00:10:244:1::a"),
                IngressAction::Drop(DropReason::SpoofedInnerSource),
                "{spoofed}"
            );
        }
        assert_eq!(
            from_node2("fd00:10:244:2::5", "fd00:10:244:3::a"),
            IngressAction::Drop(DropReason::NotLocalDestination)
        );
    }

    #[test]
    fn local_ttl_and_garbage() {
        let t = tables_for(0);
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.1.11", 64, 0);
        assert_eq!(
            egress(&t, None, &mut b, MAX_HEADROOM, len, 0),
            EgressAction::Local {
                range: MAX_HEADROOM..MAX_HEADROOM + len
            }
        );
        for ttl in [0, 1] {
            let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", ttl, 0);
            assert_eq!(
                egress(&t, None, &mut b, MAX_HEADROOM, len, 0),
                EgressAction::Drop(DropReason::TtlExceeded)
            );
        }
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.99.1", 64, 0);
        assert_eq!(
            egress(&t, None, &mut b, MAX_HEADROOM, len, 0),
            EgressAction::Drop(DropReason::NoRoute)
        );
        // Out-of-range and short inputs.
        assert_eq!(
            egress(&t, None, &mut b, 10, usize::MAX, 0),
            EgressAction::Drop(DropReason::Truncated)
        );
        assert_eq!(
            egress(&t, None, &mut b, MAX_HEADROOM, 10, 0),
            EgressAction::Drop(DropReason::Truncated)
        );
        // No headroom for the tunnel header.
        let (mut b, len) = udp_buf("10.244.1.10", "10.244.2.20", 64, 0);
        let (_, pkt) = b.split_at_mut(MAX_HEADROOM);
        assert_eq!(
            egress(&t, None, pkt, 0, len, 0),
            EgressAction::Drop(DropReason::Unsupported)
        );
    }

    #[test]
    fn masquerade_out_and_back() {
        let t = tables_for(0);
        let mut nat = NatTable::new(NatConfig::default());
        // TTL 1 is translated and sent on (traceroute through the NAT); TTL 0 never is
        let (mut b1, len1) = udp_buf("10.244.1.10", "203.0.113.9", 1, 0);
        assert!(matches!(
            egress(&t, Some(&mut nat), &mut b1, MAX_HEADROOM, len1, 0),
            EgressAction::Native {
                path: Path::Masquerade,
                ..
            }
        ));
        let (mut b0, len0) = udp_buf("10.244.1.10", "203.0.113.9", 0, 0);
        assert_eq!(
            egress(&t, Some(&mut nat), &mut b0, MAX_HEADROOM, len0, 0),
            EgressAction::Drop(DropReason::TtlExceeded)
        );
        let (mut b, len) = udp_buf("10.244.1.10", "203.0.113.9", 64, 0);
        assert_eq!(
            egress(&t, None, &mut b.clone(), MAX_HEADROOM, len, 0),
            EgressAction::Drop(DropReason::Unsupported)
        );
        let a = egress(&t, Some(&mut nat), &mut b, MAX_HEADROOM, len, 0);
        assert_eq!(
            a,
            EgressAction::Native {
                range: MAX_HEADROOM..MAX_HEADROOM + len,
                next_hop_mac: GW_MAC,
                path: Path::Masquerade
            }
        );
        let out = &b[MAX_HEADROOM..MAX_HEADROOM + len];
        let m = wire::parse_ip(out).unwrap();
        assert_eq!(m.src, IpAddr::V4(v4("172.16.2.2")));
        let (node_port, _) = m.ports().unwrap();
        assert!(node_port >= 61000);
        // The reply.
        let (mut r, rlen) = udp_buf("203.0.113.9", "172.16.2.2", 50, 0);
        {
            let p = &mut r[MAX_HEADROOM..MAX_HEADROOM + rlen];
            let mut u = udp::Packet::new_unchecked(&mut p[20..]);
            u.set_src_port(6000);
            u.set_dst_port(node_port);
            u.fill_checksum_v4(v4("203.0.113.9"), v4("172.16.2.2"));
        }
        let d = masquerade_reply(&mut nat, &mut r, MAX_HEADROOM, rlen + 4, 1);
        let IngressAction::Deliver { range, path, peer } = d else {
            panic!("{d:?}")
        };
        assert_eq!((path, peer), (Path::Masquerade, None));
        assert_eq!(range, MAX_HEADROOM..MAX_HEADROOM + rlen);
        let m = wire::parse_ip(&r[range]).unwrap();
        assert_eq!(m.dst, IpAddr::V4(v4("10.244.1.10")));
        assert_eq!(m.ports(), Some((6000, 5000)));
        // Unknown reply.
        let (mut r, rlen) = udp_buf("203.0.113.9", "172.16.2.2", 50, 0);
        assert_eq!(
            masquerade_reply(&mut nat, &mut r, MAX_HEADROOM, rlen, 1),
            IngressAction::Drop(DropReason::NatNoMapping)
        );
    }

    /// An IPv6 reply behind `headroom` bytes with trailing junk: translated in place to the pod,
    /// delivered range = the IPv6 packet; an unknown one is dropped `nat_no_mapping`.
    #[test]
    fn masquerade_reply_v6_translates_in_place() {
        let (pod, node, remote): (Ipv6Addr, Ipv6Addr, Ipv6Addr) = (
            "fd00:244:1::10".parse().unwrap(),
            "2001:db8:0:1::2".parse().unwrap(),
            "2001:db8:ff::7".parse().unwrap(),
        );
        let udp6 = |src: Ipv6Addr, sp: u16, dst: Ipv6Addr, dp: u16| {
            let mut p = vec![0x60, 0, 0, 0, 0, 12, ip_proto::UDP, 64];
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.octets());
            p.extend_from_slice(&sp.to_be_bytes());
            p.extend_from_slice(&dp.to_be_bytes());
            p.extend_from_slice(&[0, 12, 0, 0, b'd', b'a', b't', b'a']);
            udp::Packet::new_unchecked(&mut p[40..]).fill_checksum(src.into(), dst.into());
            p
        };
        let mut nat = NatTable6::new_v6(NatConfig::default());
        let mut out = udp6(pod, 5000, remote, 53);
        let np = nat::translate_egress_v6(&mut nat, &mut out, node, 0).unwrap();
        let r = udp6(remote, 53, node, np);
        let mut b = vec![0u8; MAX_HEADROOM];
        b.extend_from_slice(&r);
        b.extend_from_slice(&[0xee; 4]);
        let d = masquerade_reply_v6(&mut nat, &mut b, MAX_HEADROOM, r.len() + 4, 1);
        let IngressAction::Deliver { range, path, peer } = d else {
            panic!("{d:?}")
        };
        assert_eq!((path, peer), (Path::Masquerade, None));
        assert_eq!(range, MAX_HEADROOM..MAX_HEADROOM + r.len());
        let m = wire::parse_ip(&b[range.clone()]).unwrap();
        assert_eq!((m.src, m.dst), (IpAddr::V6(remote), IpAddr::V6(pod)));
        assert_eq!(m.ports(), Some((53, 5000)));
        assert!(udp::Packet::new_checked(&b[range.start + 40..range.end])
            .unwrap()
            .verify_checksum(remote.into(), pod.into()));
        let mut b = vec![0u8; MAX_HEADROOM];
        b.extend_from_slice(&udp6(remote, 53, node, np.wrapping_add(1)));
        assert_eq!(
            masquerade_reply_v6(&mut nat, &mut b, MAX_HEADROOM, r.len(), 1),
            IngressAction::Drop(DropReason::NatNoMapping)
        );
    }

    /// node2 tunnels `inner` to node1 and returns the UDP payload.
    fn tunneled(src: &str, dst: &str, tos: u8, vni: u32) -> Vec<u8> {
        let (mut b, len) = udp_buf(src, dst, 64, tos);
        let params = EncapParams {
            proto: TunnelProto::Vxlan,
            vni,
            src: a4("172.16.3.2"),
            dst: a4("172.16.2.2"),
            dst_port: 4789,
            inner_src_mac: [0; 6],
            inner_dst_mac: [0; 6],
            geneve_payload: Default::default(),
        };
        let r = encap::encap_payload(&mut b, MAX_HEADROOM, len, &params).unwrap();
        b[r].to_vec()
    }

    #[test]
    fn ingress_drops() {
        let t = tables_for(0);
        let n2 = a4("172.16.3.2");
        let run = |src: IpAddr, port: u16, ecn_bits: u8, mut p: Vec<u8>| {
            let n = p.len();
            ingress(&t, src, 50000, port, ecn_bits, &mut p, 0, n)
        };
        let ok = tunneled("10.244.2.20", "10.244.1.10", 0, 1);
        assert!(matches!(
            run(n2, 4789, 0, ok.clone()),
            IngressAction::Deliver { .. }
        ));
        let drop = |r| IngressAction::Drop(r);
        assert_eq!(run(n2, 9999, 0, ok.clone()), drop(DropReason::Unsupported));
        assert_eq!(
            run(a4("172.16.9.9"), 4789, 0, ok.clone()),
            drop(DropReason::UnknownPeer)
        );
        // VXLAN payload on the Geneve port.
        assert_eq!(run(n2, 6081, 0, ok.clone()), drop(DropReason::Malformed));
        let mut bad_flags = ok.clone();
        bad_flags[0] = 0;
        assert_eq!(run(n2, 4789, 0, bad_flags), drop(DropReason::BadVxlanFlags));
        assert_eq!(
            run(n2, 4789, 0, tunneled("10.244.2.20", "10.244.1.10", 0, 2)),
            drop(DropReason::BadVni)
        );
        assert_eq!(
            run(n2, 4789, 0, tunneled("10.244.3.20", "10.244.1.10", 0, 1)),
            drop(DropReason::SpoofedInnerSource)
        );
        assert_eq!(
            run(n2, 4789, 0, tunneled("10.244.2.20", "10.244.3.10", 0, 1)),
            drop(DropReason::NotLocalDestination)
        );
        assert_eq!(
            run(n2, 4789, 0, ok[..30].to_vec()),
            drop(DropReason::Truncated)
        );
        // RFC 6040: CE over Not-ECT is dropped, CE over ECT(0) is passed on as CE.
        assert_eq!(run(n2, 4789, ecn::CE, ok), drop(DropReason::EcnDrop));
        let mut p = tunneled("10.244.2.20", "10.244.1.10", ecn::ECT0, 1);
        let n = p.len();
        let IngressAction::Deliver { range, .. } =
            ingress(&t, n2, 50000, 4789, ecn::CE, &mut p, 0, n)
        else {
            panic!()
        };
        let m = wire::parse_ip(&p[range]).unwrap(); // the header checksum still verifies
        assert_eq!(m.ecn, ecn::CE);
    }

    #[test]
    fn classify_packet_explains() {
        let t = tables_for(0);
        let (b, len) = udp_buf("10.244.1.10", "10.244.2.20", 64, 0);
        let (m, v) = classify_packet(&t, &b[MAX_HEADROOM..MAX_HEADROOM + len]).unwrap();
        assert_eq!(m.dst, IpAddr::V4(v4("10.244.2.20")));
        assert_eq!(v.path(), Some(Path::Vxlan));
        assert_eq!(classify_packet(&t, &[0x45]), Err(DropReason::Truncated));
    }

    /// The tunnel path computes the source port, TOS and tunnel header from its one parse; it
    /// must give exactly what re-reading the inner packet gives (`udp_source_port`, `outer_tos`,
    /// `encap_payload`), on whole packets, fragments (IPv4 first / later, IPv6 atomic and not),
    /// IPv4 options, IPv6 extension headers, every transport podrouter reads ports from or not,
    /// and random corruptions of all of those that still parse.
    #[test]
    fn tunnel_egress_matches_the_reparsing_reference() {
        let mut spec = spec_for(0);
        spec.node.pod_cidrs.push(c("fd00:10:244:1::/64"));
        spec.cluster_cidrs.push(c("fd00:10:244::/48"));
        let node2 = spec.peers.iter_mut().find(|p| p.name == "node2").unwrap();
        node2.pod_cidrs.push(c("fd00:10:244:2::/64"));
        let t = build(&spec, 0);

        let reference = |b: &mut Vec<u8>, len: usize| -> Option<EgressAction> {
            let pkt = &b[MAX_HEADROOM..MAX_HEADROOM + len];
            let meta = wire::parse_ip(pkt).ok()?;
            if meta.ttl <= 1 {
                return None;
            }
            let Verdict::Tunnel {
                peer,
                proto,
                vni,
                remote,
                port,
            } = t.classify(meta.src, meta.dst)
            else {
                return None;
            };
            let inner = &pkt[..meta.total_len];
            let (src_port, tos) = (encap::udp_source_port(inner), encap::outer_tos(inner));
            let params = t.encap_params(peer, proto, vni, remote, port);
            let range = encap::encap_payload(b, MAX_HEADROOM, meta.total_len, &params).ok()?;
            Some(EgressAction::Tunnel {
                range,
                remote: SocketAddr::new(remote, port),
                src_port,
                tos,
                proto,
            })
        };

        // IPv4 to a node2 pod: protocol, IHL, flags/offset word and TOS vary.
        let v4 = |proto: u8, ihl: usize, flg_off: u16, tos: u8, l4: &[u8]| {
            let hl = ihl * 4;
            let mut p = vec![0u8; hl + l4.len()];
            p[0] = 0x40 | ihl as u8;
            p[1] = tos;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p[6..8].copy_from_slice(&flg_off.to_be_bytes());
            p[8] = 64;
            p[9] = proto;
            p[12..16].copy_from_slice(&[10, 244, 1, 10]);
            p[16..20].copy_from_slice(&[10, 244, 2, 20]);
            for o in p[20..hl].iter_mut() {
                *o = ipv4::option::NOP;
            }
            p[hl..].copy_from_slice(l4);
            ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
            p
        };
        // IPv6 to a node2 pod behind the extension headers `ext` (first Next Header `nh`).
        let v6 = |nh: u8, tc: u8, ext_and_l4: &[u8]| {
            let mut p = vec![0u8; 40 + ext_and_l4.len()];
            p[0] = 0x60 | tc >> 4;
            p[1] = tc << 4;
            p[4..6].copy_from_slice(&(ext_and_l4.len() as u16).to_be_bytes());
            p[6] = nh;
            p[7] = 64;
            p[8..24].copy_from_slice(&v6_addr("fd00:10:244:1::a"));
            p[24..40].copy_from_slice(&v6_addr("fd00:10:244:2::14"));
            p[40..].copy_from_slice(ext_and_l4);
            p
        };
        let udp_hdr = |len: u16| {
            let mut u = vec![0x13, 0x88, 0x17, 0x70];
            u.extend_from_slice(&len.to_be_bytes());
            u.extend_from_slice(&[0, 0]);
            u.resize(usize::from(len), 0x5a);
            u
        };
        let tcp_hdr = {
            let mut h = vec![0u8; 20];
            h[..4].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
            h[12] = 5 << 4;
            h[13] = 0x12;
            h
        };
        let icmp_echo = [8u8, 0, 0, 0, 0xbe, 0xef, 0, 1, 1, 2, 3, 4];
        let icmp_err = [3u8, 4, 0, 0, 0x05, 0xdc, 0x12, 0x34, 0x45, 0, 0, 20];
        let mut seeds = vec![
            v4(ip_proto::UDP, 5, 0x4000, 0xb8 | ecn::CE, &udp_hdr(16)),
            v4(ip_proto::TCP, 5, 0, 0x03, &tcp_hdr),
            v4(ip_proto::TCP, 6, 0, 0x01, &tcp_hdr),
            v4(
                ip_proto::SCTP,
                5,
                0,
                0,
                &[0x0b, 0x59, 0x0b, 0x5a, 1, 2, 3, 4, 5, 6, 7, 8],
            ),
            v4(ip_proto::ICMP, 5, 0, 0x02, &icmp_echo),
            v4(ip_proto::ICMP, 5, 0, 0, &icmp_err),
            // ICMPv6 inside IPv4 and an unknown protocol: the parse reads no ports, the hash
            // does (or does not) all the same.
            v4(ip_proto::ICMPV6, 5, 0, 0, &icmp_echo),
            v4(ip_proto::ESP, 5, 0, 0, &[9; 16]),
            // First fragment (MF), later fragment, last fragment.
            v4(ip_proto::UDP, 5, 0x2000, 0, &udp_hdr(16)[..8]),
            v4(ip_proto::UDP, 5, 0x2003, 0, &[7; 16]),
            v4(ip_proto::TCP, 5, 0x0005, 0, &tcp_hdr),
        ];
        let frag = |off_m: u16, l4: &[u8], proto: u8| {
            let mut e = vec![proto, 0];
            e.extend_from_slice(&off_m.to_be_bytes());
            e.extend_from_slice(&[0, 0, 0, 9]);
            e.extend_from_slice(l4);
            e
        };
        let mut hbh = vec![ip_proto::TCP, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&tcp_hdr);
        seeds.extend([
            v6(ip_proto::UDP, 0xb9, &udp_hdr(12)),
            v6(ip_proto::HOP_BY_HOP, 0x03, &hbh),
            v6(ip_proto::ICMPV6, 0, &[128, 0, 0, 0, 0x12, 0x34, 0, 1]),
            v6(ip_proto::ICMP, 0, &icmp_echo),
            // Atomic fragment (offset 0, M clear): a whole datagram, ports read.
            v6(
                ip_proto::IPV6_FRAGMENT,
                0,
                &frag(0, &udp_hdr(12), ip_proto::UDP),
            ),
            // First (M set) and later fragments: no ports.
            v6(
                ip_proto::IPV6_FRAGMENT,
                0,
                &frag(1, &udp_hdr(12), ip_proto::UDP),
            ),
            v6(
                ip_proto::IPV6_FRAGMENT,
                0,
                &frag(8 << 3, &[3; 12], ip_proto::UDP),
            ),
        ]);
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let (mut tunneled, mut compared) = (0usize, 0usize);
        for round in 0..30_000usize {
            let mut p = seeds[round % seeds.len()].clone();
            if round >= seeds.len() {
                for _ in 0..1 + next() % 3 {
                    let at = (next() as usize) % p.len();
                    p[at] ^= next() as u8;
                }
                if p[0] >> 4 == 4 && next() % 4 != 0 {
                    // Mostly keep the header checksum right so the corruption gets past it.
                    let _ =
                        ipv4::Packet::new_checked_header(&mut p[..]).map(|mut h| h.fill_checksum());
                }
            }
            let len = p.len();
            let mut a = vec![0u8; MAX_HEADROOM];
            a.extend_from_slice(&p);
            a.extend_from_slice(&[0xee; 3]); // link padding
            let mut b = a.clone();
            let got = egress(&t, None, &mut a, MAX_HEADROOM, len + 3, 0);
            if let Some(want) = reference(&mut b, len + 3) {
                assert_eq!(got, want, "round {round}: {p:02x?}");
                assert_eq!(a, b, "round {round}: {p:02x?}");
                compared += 1;
            }
            tunneled += usize::from(matches!(got, EgressAction::Tunnel { .. }));
        }
        // Every tunnel decision was checked, and there were plenty of them.
        assert_eq!(tunneled, compared);
        assert!(compared > 10_000, "{compared}");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let t = tables_for(0);
        let mut nat = NatTable::new(NatConfig::default());
        let mut s: u64 = 0x1234_5678;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let (seed, len) = udp_buf("10.244.1.10", "203.0.113.9", 64, 0);
        let ping = {
            let mut l4 = vec![8u8, 0, 0, 0, 0, 1, 0, 1];
            l4.extend_from_slice(b"abcd");
            let mut p = vec![0u8; 20 + l4.len()];
            ipv4::Repr {
                src: v4("203.0.113.9"),
                dst: v4("172.16.2.2"),
                protocol: ip_proto::ICMP,
                payload_len: l4.len(),
                ttl: 64,
                tos: 0,
                ident: 0,
                dont_frag: false,
            }
            .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
            .unwrap();
            p[20..].copy_from_slice(&l4);
            icmp::Packet::new_unchecked(&mut p[20..]).fill_checksum();
            p
        };
        for i in 0..20_000u32 {
            // Mutate a valid packet (so parsing gets deep) or use random bytes.
            let mut b = if i % 3 == 0 {
                (0..(next() % 120) as usize).map(|_| next() as u8).collect()
            } else if i % 3 == 1 {
                let mut b = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % b.len();
                    b[at] ^= next() as u8;
                }
                b
            } else {
                let mut b = ping.clone();
                let at = (next() as usize) % b.len();
                b[at] ^= next() as u8;
                b
            };
            let n = b.len();
            let start = (next() as usize) % (n + 1);
            let l = (next() as usize) % (n + 2);
            let _ = egress(&t, Some(&mut nat), &mut b, start, l, u64::from(i));
            let _ = egress(&t, Some(&mut nat), &mut b.clone(), MAX_HEADROOM, len, 0);
            let _ = ingress(
                &t,
                a4("172.16.3.2"),
                50000,
                4789,
                (i % 4) as u8,
                &mut b,
                start,
                l,
            );
            let _ = masquerade_reply(&mut nat, &mut b, 0, n, u64::from(i));
        }
    }
}
