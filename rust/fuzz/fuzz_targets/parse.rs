//! Every wire parser on arbitrary bytes: nothing may panic, and what a successful parse reports
//! must stay inside the input.
#![no_main]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use podrouter_core::encap;
use podrouter_core::wire::{
    self, checksum, ethernet, geneve, icmp, icmpv6, ipv4, ipv6, tcp, udp, vxlan,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = wire::parse_ip(data) {
        assert!(m.l4_offset <= m.total_len && m.total_len <= data.len());
        assert!(!m.is_later_fragment() || m.ports().is_none());
    }
    if let Ok(f) = ethernet::Frame::new_checked(data) {
        let _ = (f.dst_addr(), f.src_addr(), f.ethertype(), f.payload().len());
        let _ = wire::parse_ip(f.payload());
    }
    if let Ok(p) = ipv4::Packet::new_checked(data) {
        assert!(p.payload().len() + p.header_len() <= data.len());
        let _ = (
            p.check_options(),
            p.verify_checksum(),
            p.is_first_fragment(),
            p.frag_offset(),
        );
        let _ = ipv4::Repr::parse(&p);
        let _ = p.options_iter().count();
    }
    if let Ok(p) = ipv4::Packet::new_checked_header(data) {
        let _ = (p.payload().len(), p.options_iter().count());
    }
    for p in [
        ipv6::Packet::new_checked(data),
        ipv6::Packet::new_checked_header(data),
    ]
    .into_iter()
    .flatten()
    {
        let _ = (p.flow_label(), p.traffic_class(), p.payload().len());
        if let Ok(c) = p.walk_extension_headers() {
            assert!(c.l4_offset <= data.len());
            assert!(c.count <= ipv6::MAX_EXT_HEADERS);
        }
    }
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 1));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if let Ok(p) = udp::Packet::new_checked(data) {
        assert!(p.datagram().len() <= data.len());
        let _ = (
            p.verify_checksum(v4, v4),
            p.verify_checksum(v6, v6),
            p.payload().len(),
        );
    }
    if let Ok(p) = tcp::Packet::new_checked(data) {
        let _ = (
            p.mss(),
            p.flags(),
            p.payload().len(),
            p.verify_checksum(v4, v6),
        );
        for o in p.options_iter() {
            let _ = o;
        }
    }
    if let Ok(p) = icmp::Packet::new_checked(data) {
        let _ = (
            p.echo_ident(),
            p.echo_seq_no(),
            p.next_hop_mtu(),
            p.verify_checksum(),
        );
        if let Ok(q) = p.embedded_ipv4() {
            let _ = (q.src_addr(), q.payload().len());
            let _ = wire::parse_ip(p.data());
        }
    }
    if let Ok(p) = icmpv6::Packet::new_checked(data) {
        let _ = (
            p.mtu(),
            p.verify_checksum(Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED),
        );
        if let Ok(q) = p.embedded_ipv6() {
            let _ = q.walk_extension_headers();
        }
    }
    if let Ok(h) = vxlan::Header::new_checked(data) {
        let _ = (
            h.vni(),
            h.check_valid(),
            h.reserved_bits_set(),
            h.payload().len(),
        );
    }
    if let Ok(h) = geneve::Header::new_checked(data) {
        assert!(h.header_len() <= data.len());
        let _ = (
            h.check_valid(|_, _| false),
            h.check_valid(|_, _| true),
            h.payload().len(),
        );
        for o in h.options_iter().flatten() {
            assert_eq!(o.data.len() & 3, 0);
        }
    }
    let _ = (
        checksum::data(data),
        encap::flow_hash(data),
        encap::outer_tos(data),
    );
    assert!(encap::udp_source_port(data) >= encap::SOURCE_PORT_MIN);
    let mut copy = data.to_vec();
    if encap::set_ecn_ce(&mut copy).is_ok() && data.first().map(|b| b >> 4) == Some(4) {
        // An IPv4 header whose checksum verified before still verifies after marking CE.
        if let (Ok(before), Ok(after)) = (
            ipv4::Packet::new_checked(data),
            ipv4::Packet::new_checked(&copy[..]),
        ) {
            assert_eq!(before.verify_checksum(), after.verify_checksum());
        }
    }
});
