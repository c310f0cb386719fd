//! Property tests: no parser panics on any bytes, encapsulation round-trips any inner packet, and
//! incremental checksum updates agree with recomputation.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use podrouter_core::encap::{self, EcnAction, EncapParams, TunnelProto};
use podrouter_core::wire::{
    self, checksum, ethernet, geneve, icmp, icmpv6, ipv4, ipv6, tcp, udp, vxlan,
};

/// Touch every accessor of every view on `b`; the return value keeps the work observable.
fn exercise_all(b: &[u8]) -> usize {
    let mut n = 0usize;
    if let Ok(m) = wire::parse_ip(b) {
        assert!(m.l4_offset <= m.total_len && m.total_len <= b.len());
        n += m.total_len
            + usize::from(m.is_later_fragment())
            + m.ports().map_or(0, |p| p.0 as usize);
    }
    if let Ok(f) = ethernet::Frame::new_checked(b) {
        n += f.payload().len()
            + f.ethertype() as usize
            + f.src_addr()[0] as usize
            + f.dst_addr()[0] as usize;
    }
    if let Ok(p) = ipv4::Packet::new_checked(b) {
        n += p.payload().len() + p.options().len() + p.header().len();
        n += p.options_iter().count()
            + usize::from(p.check_options().is_ok())
            + usize::from(p.verify_checksum());
        n += usize::from(p.frag_offset())
            + usize::from(p.is_first_fragment())
            + usize::from(p.reserved_flag());
        let _ = ipv4::Repr::parse(&p);
    }
    if let Ok(p) = ipv4::Packet::new_checked_header(b) {
        n += p.payload().len() + p.options_iter().count();
    }
    for p in [
        ipv6::Packet::new_checked(b),
        ipv6::Packet::new_checked_header(b),
    ]
    .into_iter()
    .flatten()
    {
        n += p.payload().len() + p.flow_label() as usize + usize::from(p.ecn());
        if let Ok(c) = p.walk_extension_headers() {
            assert!(c.l4_offset <= b.len());
            n += c.l4_offset + c.count;
        }
    }
    if let Ok(p) = udp::Packet::new_checked(b) {
        n += p.payload().len() + p.datagram().len();
        let a = IpAddr::V4(Ipv4Addr::LOCALHOST);
        n += usize::from(p.verify_checksum(a, a));
    }
    if let Ok(p) = tcp::Packet::new_checked(b) {
        n += p.payload().len() + p.options_iter().count() + p.mss().map_or(0, usize::from);
        n += p.flags() as usize + p.seq_number() as usize % 7 + p.urgent_at() as usize;
        let a = IpAddr::V6(Ipv6Addr::LOCALHOST);
        n += usize::from(p.verify_checksum(a, a));
    }
    if let Ok(p) = icmp::Packet::new_checked(b) {
        n += p.data().len() + usize::from(p.echo_ident()) + usize::from(p.next_hop_mtu());
        if let Ok(q) = p.embedded_ipv4() {
            n += q.payload().len() + q.header_len();
        }
    }
    if let Ok(p) = icmpv6::Packet::new_checked(b) {
        n += p.data().len() + p.mtu() as usize;
        if let Ok(q) = p.embedded_ipv6() {
            n += q.payload().len() + q.walk_extension_headers().map_or(0, |c| c.count);
        }
    }
    if let Ok(h) = vxlan::Header::new_checked(b) {
        n += h.payload().len() + h.vni() as usize + usize::from(h.reserved_bits_set());
        n += usize::from(h.check_valid().is_ok());
    }
    if let Ok(h) = geneve::Header::new_checked(b) {
        n += h.payload().len() + h.options().len() + h.options_iter().count();
        n += usize::from(h.check_valid(|_, _| false).is_ok()) + usize::from(h.reserved_bits_set());
        assert!(h.header_len() <= b.len());
    }
    for proto in [TunnelProto::Vxlan, TunnelProto::Geneve] {
        for ecn in 0..4 {
            if let Ok(d) = encap::decap_payload(proto, b, ecn) {
                assert!(d.inner.start <= d.inner.end && d.inner.end <= b.len());
                n += d.inner.len();
            }
        }
    }
    if let Ok(d) = encap::decap_full(b) {
        assert!(d.decap.inner.end <= b.len());
        n += d.decap.inner.len();
    }
    n += encap::udp_source_port(b) as usize
        + encap::outer_tos(b) as usize
        + checksum::data(b) as usize;
    let mut copy = b.to_vec();
    let _ = encap::set_ecn_ce(&mut copy);
    n
}

/// A well-formed inner packet: IPv4 or IPv6, any protocol byte, any payload, any TOS.
fn inner_packet() -> impl Strategy<Value = Vec<u8>> {
    let v4 = (
        any::<[u8; 4]>(),
        any::<[u8; 4]>(),
        any::<u8>(),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(s, d, proto, tos, payload)| {
            let mut v = vec![0u8; 20 + payload.len()];
            let repr = ipv4::Repr {
                src: Ipv4Addr::from(s),
                dst: Ipv4Addr::from(d),
                protocol: proto,
                payload_len: payload.len(),
                ttl: 64,
                tos,
                ident: 1,
                dont_frag: true,
            };
            repr.emit(&mut ipv4::Packet::new_unchecked(&mut v[..]))
                .unwrap();
            v[20..].copy_from_slice(&payload);
            v
        });
    let v6 = (
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        any::<u8>(),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(s, d, nh, tc, payload)| {
            let mut v = vec![0u8; 40 + payload.len()];
            let mut p = ipv6::Packet::new_unchecked(&mut v[..]);
            p.set_version(6);
            p.set_traffic_class(tc);
            p.set_payload_len(payload.len() as u16);
            p.set_next_header(nh);
            p.set_hop_limit(64);
            p.set_src_addr(Ipv6Addr::from(s));
            p.set_dst_addr(Ipv6Addr::from(d));
            p.payload_mut().copy_from_slice(&payload);
            v
        });
    prop_oneof![v4, v6]
}

fn tunnel() -> impl Strategy<Value = TunnelProto> {
    prop_oneof![Just(TunnelProto::Vxlan), Just(TunnelProto::Geneve)]
}

fn geneve_payload() -> impl Strategy<Value = encap::GenevePayload> {
    prop_oneof![
        Just(encap::GenevePayload::Ethernet),
        Just(encap::GenevePayload::Ip)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_parser_panics_on_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..400)) {
        exercise_all(&b);
    }

    /// Random bytes rarely get past the first length check; mutating valid encapsulated packets
    /// reaches the deeper code paths.
    #[test]
    fn no_panics_on_mutated_tunnel_packets(
        inner in inner_packet(),
        proto in tunnel(),
        gp in geneve_payload(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut buf = vec![0u8; encap::MAX_HEADROOM];
        buf.extend_from_slice(&inner);
        let params = EncapParams {
            proto, vni: 7, src: Ipv4Addr::new(172, 16, 2, 2).into(), dst: Ipv4Addr::new(172, 16, 3, 2).into(),
            dst_port: proto.default_port(), inner_src_mac: [2, 0, 0, 0, 0, 1], inner_dst_mac: [2, 0, 0, 0, 0, 2],
            geneve_payload: gp,
        };
        let r = encap::encap_full(&mut buf, encap::MAX_HEADROOM, inner.len(), &params).unwrap();
        let mut pkt = buf[r].to_vec();
        for (at, val) in edits {
            let i = at % pkt.len();
            pkt[i] = val;
        }
        pkt.truncate(cut % (pkt.len() + 1));
        exercise_all(&pkt);
        // Also as a bare UDP payload and as the inner packet on its own.
        exercise_all(pkt.get(28..).unwrap_or(&[]));
        exercise_all(&inner);
    }

    #[test]
    fn encap_full_then_decap_full_is_identity(
        inner in inner_packet(),
        proto in tunnel(),
        gp in geneve_payload(),
        vni in 0u32..=0xff_ffff,
        src in any::<[u8; 4]>(),
        dst in any::<[u8; 4]>(),
        extra_headroom in 0usize..16,
    ) {
        let params = EncapParams {
            proto, vni, src: Ipv4Addr::from(src).into(), dst: Ipv4Addr::from(dst).into(),
            dst_port: proto.default_port(), inner_src_mac: [2, 0, 0, 0, 0, 1], inner_dst_mac: [2, 0, 0, 0, 0, 2],
            geneve_payload: gp,
        };
        prop_assert!(params.overhead() <= proto.overhead());
        let start = params.overhead() + extra_headroom;
        let mut buf = vec![0xa5u8; start];
        buf.extend_from_slice(&inner);
        buf.extend_from_slice(&[0x5a; 3]); // bytes after the packet must not matter
        let r = encap::encap_full(&mut buf, start, inner.len(), &params).unwrap();
        prop_assert_eq!(r.clone(), extra_headroom..start + inner.len());
        let outer = &buf[r];
        let u = udp::Packet::new_checked(&outer[20..]).unwrap();
        prop_assert_ne!(u.checksum(), 0);
        prop_assert!((49152..=65535).contains(&u.src_port()));
        let d = encap::decap_full(outer).unwrap();
        prop_assert_eq!(d.decap.proto, proto);
        prop_assert_eq!(d.decap.vni, vni);
        prop_assert_eq!((d.src, d.dst), (params.src, params.dst));
        // RFC 6040 normal mode never produces an outer code point that changes the inner one.
        prop_assert_eq!(d.decap.ecn_action, EcnAction::Keep);
        prop_assert_eq!(&outer[d.decap.inner.clone()], &inner[..]);
        let ip = ipv4::Packet::new_checked(outer).unwrap();
        prop_assert!(ip.dont_frag());
        prop_assert_eq!(ip.ttl(), 64);
        prop_assert_eq!(ip.dscp(), encap::outer_tos(&inner) >> 2);
    }

    #[test]
    fn encap_payload_then_decap_payload_is_identity(
        inner in inner_packet(), proto in tunnel(), gp in geneve_payload(), vni in 0u32..=0xff_ffff,
    ) {
        let mut buf = vec![0u8; encap::MAX_HEADROOM];
        buf.extend_from_slice(&inner);
        let params = EncapParams {
            proto, vni, src: Ipv4Addr::UNSPECIFIED.into(), dst: Ipv4Addr::UNSPECIFIED.into(), dst_port: 0,
            inner_src_mac: [0; 6], inner_dst_mac: [0; 6], geneve_payload: gp,
        };
        let r = encap::encap_payload(&mut buf, encap::MAX_HEADROOM, inner.len(), &params).unwrap();
        prop_assert_eq!(r.len(), params.payload_overhead() + inner.len());
        let payload = &buf[r];
        let d = encap::decap_payload(proto, payload, wire::ecn::NOT_ECT).unwrap();
        prop_assert_eq!(d.vni, vni);
        prop_assert_eq!(&payload[d.inner], &inner[..]);
    }

    #[test]
    fn incremental_checksum_matches_recompute(
        mut data in proptest::collection::vec(any::<u8>(), 4..120),
        at in any::<usize>(),
        new16 in any::<u16>(),
        new32 in any::<u32>(),
    ) {
        // Even-aligned checksum field at 0..2, the rest covered.
        if data.len() & 1 == 1 { data.pop(); }
        data[0] = 0;
        data[1] = 0;
        let c = checksum::checksum(&data);
        data[0..2].copy_from_slice(&c.to_be_bytes());
        prop_assert_eq!(checksum::data(&data), 0xffff);

        let words = data.len() / 2;
        let i = 2 * (1 + at % (words - 1));
        let old = u16::from_be_bytes([data[i], data[i + 1]]);
        data[i..i + 2].copy_from_slice(&new16.to_be_bytes());
        let c = checksum::update16(u16::from_be_bytes([data[0], data[1]]), old, new16);
        data[0..2].copy_from_slice(&c.to_be_bytes());
        prop_assert_eq!(checksum::data(&data), 0xffff);

        if words >= 3 {
            let j = 2 * (1 + at % (words - 2));
            let old32 = u32::from_be_bytes([data[j], data[j + 1], data[j + 2], data[j + 3]]);
            data[j..j + 4].copy_from_slice(&new32.to_be_bytes());
            let c = checksum::update32(u16::from_be_bytes([data[0], data[1]]), old32, new32);
            data[0..2].copy_from_slice(&c.to_be_bytes());
            prop_assert_eq!(checksum::data(&data), 0xffff);
        }
    }

    #[test]
    fn set_ecn_ce_keeps_ipv4_checksum_valid(inner in inner_packet()) {
        let mut p = inner.clone();
        encap::set_ecn_ce(&mut p).unwrap();
        let m = wire::parse_ip(&p);
        if inner[0] >> 4 == 4 {
            let ip = ipv4::Packet::new_checked(&p[..]).unwrap();
            prop_assert!(ip.verify_checksum());
            prop_assert_eq!(ip.ecn(), wire::ecn::CE);
            prop_assert_eq!(ip.dscp(), inner[1] >> 2);
        } else {
            prop_assert_eq!(ipv6::Packet::new_checked(&p[..]).unwrap().ecn(), wire::ecn::CE);
        }
        // Only the TOS / traffic-class byte (ECN bits) and the IPv4 header checksum changed.
        let changed_ok = |i: usize| i == 1 || (inner[0] >> 4 == 4 && (i == 10 || i == 11));
        prop_assert!((0..p.len()).filter(|&i| p[i] != inner[i]).all(changed_ok));
        prop_assert!(m.is_ok() || wire::parse_ip(&inner).is_err());
    }
}
