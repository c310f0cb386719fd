//! The egress entry point a worker runs for every TUN read (`egress::egress`) on an arbitrary vnet
//! header and packet, against tables with all four paths (tunnel, native, masquerade, local),
//! each way of sending on the underlay, and a NAT table that lives across inputs. Nothing may
//! panic; every output lies inside its buffer and stands for at least one packet; a tunnel train
//! is whole units of its segment size (the last may be shorter); a frame holds at least its link
//! headers and, without a vnet header on a frame, no more than the packet; a drop counts at least
//! one packet.
//!
//! Input: 10 bytes of vnet header, one mode byte, the packet. Mode bits 0-1: no packet socket,
//! plain frames, vnet frames (twice); bit 2: the IP length field set to the buffer's length; bits
//! 3-4: an IPv4 packet is sent to node2's pods (tunnel), node3's (native), outside the cluster
//! (masquerade) or left as it is, with a correct header checksum; bit 5: no IPv4 tunnel socket;
//! bit 6: UDP-tunnel GSO for IPv4 remotes; bit 7: node1 on an IPv6 underlay (node2's pods through
//! a tunnel to 2001:db8:3::2) with UDP-tunnel GSO for IPv6 remotes (a whole unit must be one the
//! family allows, of two segments or more over IPv6, and its TAP prefix one the kernel accepts).
#![no_main]

use core::ops::{DerefMut, Range};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use podrouter_core::egress::{self, Buffer, FrameMode, Link, Packet, ETH_HLEN, HEADROOM};
use podrouter_core::nat::{NatConfig, NatTable, NatTable6};
use podrouter_core::offload::vnet::{VnetHdr, VNET_HDR_LEN};
use podrouter_core::wire::checksum;
use podrouter_core::{reference, DropReason, Tables};

/// The reference topology (core `reference`): hybrid, node2 tunnel, node3 native, masquerade on.
fn tables() -> Tables {
    reference::tables(&reference::hybrid())
}

/// node1 on an IPv6 underlay (2001:db8:2::2), node2's pods through a tunnel to 2001:db8:3::2.
fn tables6() -> Tables {
    let n2 = reference::peer(
        "node2",
        "2001:db8:3::2".parse().unwrap(),
        "10.244.2.0/24",
        false,
    );
    let mut spec = reference::node1(podrouter_core::spec::RoutingMode::Tunnel, vec![n2]);
    spec.gateway = None;
    let settings = podrouter_core::spec::EngineSettings::new("2001:db8:2::2".parse().unwrap());
    Tables::build(&spec, &settings).expect("the IPv6 underlay spec compiles")
}

#[derive(Default)]
struct Out {
    units: Vec<egress::TunnelUnit>,
    frames: Vec<egress::Frame>,
    locals: Vec<Range<usize>>,
}

impl egress::Sink for Out {
    fn tunnel(&mut self, u: egress::TunnelUnit) {
        self.units.push(u);
    }
    fn frame(&mut self, f: egress::Frame) {
        self.frames.push(f);
    }
    fn local(&mut self, range: Range<usize>) -> Result<(), DropReason> {
        self.locals.push(range);
        Ok(())
    }
    fn segment_dropped(&mut self, _: DropReason) {}
}

struct Shared<'a>(&'a Mutex<NatTable>, &'a Mutex<NatTable6>);

impl egress::Nat for Shared<'_> {
    fn v4(&mut self) -> Option<impl DerefMut<Target = NatTable> + '_> {
        Some(self.0.lock().unwrap())
    }
    fn v6(&mut self) -> Option<impl DerefMut<Target = NatTable6> + '_> {
        Some(self.1.lock().unwrap())
    }
}

static TABLES: OnceLock<Tables> = OnceLock::new();
static TABLES6: OnceLock<Tables> = OnceLock::new();
static NAT: OnceLock<(Mutex<NatTable>, Mutex<NatTable6>)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN + 1 {
        return;
    }
    let mode = data[VNET_HDR_LEN];
    // bit 7: the IPv6 underlay, whose tunnel remotes take the IPv6 UDP-tunnel GSO path
    let t = if mode & 0x80 != 0 {
        TABLES6.get_or_init(tables6)
    } else {
        TABLES.get_or_init(tables)
    };
    let (n4, n6) = NAT.get_or_init(|| {
        (
            Mutex::new(NatTable::new(NatConfig::default())),
            Mutex::new(NatTable6::new_v6(NatConfig::default())),
        )
    });
    let hdr = VnetHdr::parse(data).unwrap();
    let mut pkt = data[VNET_HDR_LEN + 1..].to_vec();
    let v4 = pkt.len() >= 20 && pkt[0] >> 4 == 4;
    if mode & 4 != 0 {
        if v4 && pkt.len() <= 65535 {
            let n = pkt.len() as u16;
            pkt[2..4].copy_from_slice(&n.to_be_bytes());
        } else if pkt.len() >= 40 && pkt[0] >> 4 == 6 && pkt.len() - 40 <= 65535 {
            let n = (pkt.len() - 40) as u16;
            pkt[4..6].copy_from_slice(&n.to_be_bytes());
        }
    }
    if v4 && (mode >> 3) & 3 != 3 {
        pkt[12..15].copy_from_slice(&[10, 244, 1]);
        let dst: [u8; 3] = [[10, 244, 2], [10, 244, 3], [203, 0, 113]][usize::from(mode >> 3) & 3];
        pkt[16..19].copy_from_slice(&dst);
        let ihl = (usize::from(pkt[0] & 0x0f) * 4).clamp(20, pkt.len());
        pkt[10..12].fill(0);
        let c = checksum::checksum(&pkt[..ihl]);
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let link = Link {
        mac: [2, 0, 0, 0, 0, 2],
        frames: [
            None,
            Some(FrameMode::Plain),
            Some(FrameMode::Vnet),
            Some(FrameMode::Vnet),
        ][usize::from(mode & 3)],
        tunnel_v4: mode & 0x20 == 0,
        tunnel_v6: true,
        tunnel_gso: mode & 0x40 != 0,
        tunnel_gso6: mode & 0x80 != 0,
    };
    let len = pkt.len();
    let mut buf = vec![0u8; HEADROOM];
    buf.extend_from_slice(&pkt);
    let (mut seg, mut segs) = (Vec::new(), Vec::new());
    let mut out = Out::default();
    let p = Packet {
        buf: &mut buf,
        start: HEADROOM,
        len,
        hdr,
        seg: &mut seg,
        segs: &mut segs,
    };
    match egress::egress(t, &link, &mut Shared(n4, n6), &mut out, p, 0) {
        Ok(()) => {}
        Err(d) => {
            assert!(d.packets >= 1);
            return;
        }
    }
    let size = |b: Buffer| match b {
        Buffer::Packet => buf.len(),
        Buffer::Segments => seg.len(),
    };
    for u in &out.units {
        assert!(
            u.range.start < u.range.end && u.range.end <= size(u.buf),
            "{u:?}"
        );
        assert!(u.pkts >= 1);
        if let Some(h) = u.gso {
            // A whole super-packet for the TAP: the prefix the I/O layer builds must be one the
            // kernel accepts, or the core must not have chosen this path.
            use podrouter_core::offload::tnl;
            let allowed = if u.remote.is_ipv4() {
                link.tunnel_gso
            } else {
                link.tunnel_gso6
            };
            assert!(allowed && u.segment == 0, "{u:?}");
            let data = &buf[u.range.clone()];
            let inner_off = data.len() - (len.min(data.len()));
            if u.remote.is_ipv4() {
                let mut pre = [0u8; tnl::PREFIX_LEN];
                let outer = tnl::Outer {
                    dst_mac: [2, 0, 0, 0, 0, 1],
                    src_mac: [2, 0, 0, 0, 0, 2],
                    src: [192, 0, 2, 1],
                    dst: [192, 0, 2, 2],
                    src_port: u.src_port,
                    dst_port: u.remote.port(),
                    tos: u.tos,
                    ttl: 65,
                    id: 0,
                };
                if tnl::build_prefix(&mut pre, &outer, data, inner_off, &h).is_ok() {
                    let t = tnl::TnlHdr::parse(&pre).unwrap();
                    assert!(t.kernel_accepts(tnl::OUTER_LEN + data.len()));
                }
            } else {
                // over IPv6 the core only picks super-packets of two segments or more
                assert!(u.pkts >= 2, "{u:?}");
                let mut pre = [0u8; tnl::PREFIX6_LEN];
                let outer = tnl::Outer6 {
                    dst_mac: [2, 0, 0, 0, 0, 1],
                    src_mac: [2, 0, 0, 0, 0, 2],
                    src: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    dst: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                    src_port: u.src_port,
                    dst_port: u.remote.port(),
                    tclass: u.tos,
                    flow_label: u.flow_label,
                    hop_limit: 65,
                };
                if tnl::build_prefix6(&mut pre, &outer, data, inner_off, &h).is_ok() {
                    let t = tnl::TnlHdr::parse(&pre).unwrap();
                    assert!(t.kernel_accepts(tnl::OUTER6_LEN + data.len()));
                }
            }
        } else if u.segment > 0 {
            let n = u.range.len().div_ceil(usize::from(u.segment));
            assert_eq!(n as u64, u.pkts, "{u:?}");
        } else {
            assert_eq!(u.pkts, 1);
        }
    }
    for f in &out.frames {
        assert!(
            f.range.start < f.range.end && f.range.end <= size(f.buf),
            "{f:?}"
        );
        assert!(f.range.len() > ETH_HLEN && f.pkts >= 1);
        if link.frames == Some(FrameMode::Plain) {
            assert!(f.range.len() - ETH_HLEN <= len && !f.gso);
        }
    }
    for r in &out.locals {
        assert!(r.start == HEADROOM && r.end <= HEADROOM + len);
    }
});
