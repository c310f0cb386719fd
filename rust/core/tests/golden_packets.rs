//! Golden packets, checked field by field.
//!
//! `LINUX_VXLAN_*` were captured with tcpdump on the underlay veth of two network namespaces joined
//! by Linux `vxlan` devices (VNI 42, `udpcsum`), inner pods 10.244.1.1 / 10.244.2.1, underlay
//! 172.16.2.2 / 172.16.2.3: a `ping -s 16`, a TCP SYN to a closed port, and
//! the kernel's own MLDv2 report. Transmit checksum offload was
//! switched off (`ethtool -K ... tx off`) so the captured checksums are complete (IPv6 with a Hop-by-Hop Router Alert). The Ethernet header of the
//! underlay frame is stripped. The IPv6 Hop-by-Hop + Fragment packet and the Geneve frame with
//! options were built with scapy (the kernel here has no geneve module) and cross-checked with
//! tshark; their checksums are scapy's, not ours.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podrouter_core::encap::{self, DecapError, EcnAction, EncapParams, TunnelProto};
use podrouter_core::wire::ethernet::{self, ethertype};
use podrouter_core::wire::{
    self, geneve, icmp, icmpv6, ip_proto, ipv4, ipv6, tcp, udp, vxlan, L4Info,
};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    assert_eq!(s.len() & 1, 0, "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const LINUX_VXLAN_PING: &str = "4500005e74c700004011a9a2ac100202ac100203de3712b5004a7145
    0800000000002a00 020000000201 020000000101 0800
    4500002c0555400040011c930af401010af40201 08001a2a4a290001 3b58016b000000004be80b0000000000";

const LINUX_VXLAN_SYN: &str = "4500006e74d200004011a987ac100202ac100203a70e12b5005ac166
    0800000000002a00 020000000201 020000000101 0800
    4500003ce8a94000400639290af401010af40201
    8bfa1f9079c2a4ef00000000a002faf0afd00000020405b40402080a4ccc6d49000000000103030a";

const LINUX_VXLAN_MLD: &str = "4500007e3b7300004011e2d6ac100203ac100202d9bd12b5006a2688
    0800000000002a00 333300000016 020000000201 86dd
    6000000000240001fe80000000000000000000fffe000201ff020000000000000000000000000016
    3a00050200000100
    8f006e070000000104000000ff0200000000000000000001ff000201";

const SCAPY_IPV6_HBH_FRAG: &str = "6b91234500280040
    fd000010024400010000000000000001fd000010024400020000000000000001
    2c00050200000100 110000 01deadbeef
    138800350018d96d 706f64726f757465722d667261672121";

const SCAPY_GENEVE_OPTS: &str = "4500005c000040004011dd6cac100202ac100302 c35017c10048aac1
    0500080012345600 010201010a0b0c0d ffff7f020102030405060708
    45000024123440003f0110bc0af401010af40201 080026d13f980001 6162636465666768";

fn v4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

#[test]
fn linux_vxlan_ping() {
    let pkt = hex(LINUX_VXLAN_PING);
    assert_eq!(pkt.len(), 94);

    // Outer IPv4: Linux leaves DF clear on VXLAN by default and varies the ID.
    let ip = ipv4::Packet::new_checked(&pkt[..]).unwrap();
    assert_eq!((ip.version(), ip.header_len(), ip.total_len()), (4, 20, 94));
    assert_eq!(ip.ident(), 0x74c7);
    assert!(!ip.dont_frag() && !ip.is_fragment());
    assert_eq!((ip.ttl(), ip.protocol()), (64, ip_proto::UDP));
    assert_eq!(
        (ip.src_addr(), ip.dst_addr()),
        (v4([172, 16, 2, 2]), v4([172, 16, 2, 3]))
    );
    assert!(ip.verify_checksum());

    let u = udp::Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(
        (u.src_port(), u.dst_port(), u.len()),
        (0xde37, vxlan::UDP_PORT, 74)
    );
    assert_eq!(u.checksum(), 0x7145);
    assert!(u.verify_checksum(ip.src_addr().into(), ip.dst_addr().into()));

    let vx = vxlan::Header::new_checked(u.payload()).unwrap();
    assert!(vx.i_flag() && !vx.reserved_bits_set());
    assert_eq!(vx.vni(), 42);
    let eth = ethernet::Frame::new_checked(vx.payload()).unwrap();
    assert_eq!(eth.dst_addr(), [2, 0, 0, 0, 2, 1]);
    assert_eq!(eth.src_addr(), [2, 0, 0, 0, 1, 1]);
    assert_eq!(eth.ethertype(), ethertype::IPV4);

    let d = encap::decap_full(&pkt).unwrap();
    assert_eq!(
        (d.src, d.dst, d.src_port, d.dst_port),
        (
            v4([172, 16, 2, 2]).into(),
            v4([172, 16, 2, 3]).into(),
            0xde37,
            4789
        )
    );
    assert_eq!(
        (d.decap.proto, d.decap.vni, d.decap.inner.clone()),
        (TunnelProto::Vxlan, 42, 50..94)
    );
    assert_eq!(d.decap.ecn_action, EcnAction::Keep);

    let inner = &pkt[d.decap.inner.clone()];
    let m = wire::parse_ip(inner).unwrap();
    assert_eq!(m.src, IpAddr::V4(v4([10, 244, 1, 1])));
    assert_eq!(m.dst, IpAddr::V4(v4([10, 244, 2, 1])));
    assert_eq!(
        (m.protocol, m.l4_offset, m.total_len, m.ttl),
        (ip_proto::ICMP, 20, 44, 64)
    );
    assert_eq!((m.dscp, m.ecn, m.is_fragment), (0, 0, false));
    assert_eq!(
        m.l4,
        L4Info::IcmpEcho {
            ident: 0x4a29,
            seq: 1,
            request: true
        }
    );
    let ic = icmp::Packet::new_checked(&inner[20..]).unwrap();
    assert!(ic.verify_checksum());
    assert_eq!(ic.checksum(), 0x1a2a);
    // ping -s 16: the 16 data bytes are the sender's struct timeval, no room for the pattern.
    assert_eq!(ic.data().len(), 16);
}

#[test]
fn linux_vxlan_tcp_syn_with_options() {
    let pkt = hex(LINUX_VXLAN_SYN);
    let d = encap::decap_full(&pkt).unwrap();
    assert_eq!(d.decap.vni, 42);
    let inner = &pkt[d.decap.inner.clone()];
    assert_eq!(inner.len(), 60);
    let m = wire::parse_ip(inner).unwrap();
    assert_eq!(m.protocol, ip_proto::TCP);
    assert_eq!(
        m.l4,
        L4Info::Ports {
            src: 35834,
            dst: 8080,
            tcp_flags: tcp::flags::SYN
        }
    );
    let ip = ipv4::Packet::new_checked(inner).unwrap();
    assert!(ip.dont_frag());
    let t = tcp::Packet::new_checked(ip.payload()).unwrap();
    assert_eq!((t.src_port(), t.dst_port()), (35834, 8080));
    assert_eq!((t.seq_number(), t.ack_number()), (0x79c2_a4ef, 0));
    assert_eq!(t.header_len(), 40);
    assert!(t.syn() && !t.ack());
    assert_eq!(t.window_len(), 64240);
    assert_eq!(t.checksum(), 0xafd0);
    assert!(t.verify_checksum(m.src, m.dst));
    let opts: Vec<_> = t.options_iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        opts,
        vec![
            tcp::TcpOption::Mss(1460),
            tcp::TcpOption::SackPermitted,
            tcp::TcpOption::Timestamp {
                value: 0x4ccc_6d49,
                echo: 0
            },
            tcp::TcpOption::WindowScale(10),
        ]
    );
    assert!(t.payload().is_empty());
}

#[test]
fn linux_vxlan_mldv2_hop_by_hop() {
    let pkt = hex(LINUX_VXLAN_MLD);
    let d = encap::decap_full(&pkt).unwrap();
    assert_eq!(d.decap.inner_ethertype, ethertype::IPV6);
    let inner = &pkt[d.decap.inner.clone()];
    let ip = ipv6::Packet::new_checked(inner).unwrap();
    assert_eq!(ip.next_header(), ip_proto::HOP_BY_HOP);
    assert_eq!(ip.hop_limit(), 1);
    assert_eq!(
        ip.src_addr(),
        "fe80::ff:fe00:201".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(ip.dst_addr(), "ff02::16".parse::<Ipv6Addr>().unwrap());
    let c = ip.walk_extension_headers().unwrap();
    assert!(c.hop_by_hop && c.fragment.is_none());
    assert_eq!(
        (c.protocol, c.l4_offset, c.count),
        (ip_proto::ICMPV6, 48, 1)
    );
    let m = wire::parse_ip(inner).unwrap();
    assert_eq!(
        m.l4,
        L4Info::IcmpOther {
            msg_type: 143,
            code: 0
        }
    );
    let ic = icmpv6::Packet::new_checked(&inner[48..]).unwrap();
    assert_eq!(ic.msg_type(), 143);
    assert!(ic.verify_checksum(ip.src_addr(), ip.dst_addr()));
}

#[test]
fn ipv6_hop_by_hop_and_fragment() {
    let pkt = hex(SCAPY_IPV6_HBH_FRAG);
    assert_eq!(pkt.len(), 80);
    let ip = ipv6::Packet::new_checked(&pkt[..]).unwrap();
    assert_eq!(
        (ip.traffic_class(), ip.dscp(), ip.ecn()),
        (0xb9, 0xb9 >> 2, 1)
    );
    assert_eq!(ip.flow_label(), 0x12345);
    assert_eq!(ip.payload_len(), 40);
    let c = ip.walk_extension_headers().unwrap();
    assert!(c.hop_by_hop);
    assert_eq!((c.protocol, c.l4_offset, c.count), (ip_proto::UDP, 56, 2));
    let f = c.fragment.unwrap();
    assert_eq!(
        (f.header_offset, f.offset, f.more, f.ident),
        (48, 0, true, 0xdead_beef)
    );

    let m = wire::parse_ip(&pkt).unwrap();
    assert!(m.is_fragment && !m.is_later_fragment());
    assert_eq!(m.ports(), Some((5000, 53)));
    assert_eq!((m.ttl, m.total_len, m.l4_offset), (64, 80, 56));

    // The same datagram's second fragment (offset 24 bytes, M clear) carries no ports.
    let mut later = pkt.clone();
    later[50..52].copy_from_slice(&(24u16).to_be_bytes());
    let m = wire::parse_ip(&later).unwrap();
    assert!(m.is_later_fragment());
    assert_eq!(
        (m.frag_offset, m.l4, m.protocol),
        (24, L4Info::None, ip_proto::UDP)
    );

    // An atomic fragment (offset 0, M clear; RFC 6946) is a whole datagram.
    let mut atomic = pkt.clone();
    atomic[51] = 0;
    let m = wire::parse_ip(&atomic).unwrap();
    assert!(!m.is_fragment);
    assert_eq!(m.ports(), Some((5000, 53)));
}

#[test]
fn geneve_with_options() {
    let pkt = hex(SCAPY_GENEVE_OPTS);
    assert_eq!(pkt.len(), 92);
    let ip = ipv4::Packet::new_checked(&pkt[..]).unwrap();
    let u = udp::Packet::new_checked(ip.payload()).unwrap();
    assert_eq!((u.src_port(), u.dst_port()), (50000, geneve::UDP_PORT));
    assert!(u.verify_checksum(ip.src_addr().into(), ip.dst_addr().into()));
    let g = geneve::Header::new_checked(u.payload()).unwrap();
    assert_eq!((g.version(), g.opt_len_words(), g.header_len()), (0, 5, 28));
    assert!(!g.oam() && !g.critical());
    assert_eq!((g.protocol_type(), g.vni()), (ethertype::IPV4, 0x12_3456));
    let opts: Vec<_> = g.options_iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(opts.len(), 2);
    assert_eq!(
        (opts[0].class, opts[0].opt_type, opts[0].data),
        (0x0102, 0x01, &[10u8, 11, 12, 13][..])
    );
    assert_eq!(
        (opts[1].class, opts[1].opt_type, opts[1].data.len()),
        (0xffff, 0x7f, 8)
    );
    assert!(!opts[0].is_critical() && !opts[1].is_critical());

    let d = encap::decap_full(&pkt).unwrap();
    assert_eq!(
        (d.decap.proto, d.decap.vni, d.decap.inner.clone()),
        (TunnelProto::Geneve, 0x12_3456, 56..92)
    );
    let m = wire::parse_ip(&pkt[d.decap.inner.clone()]).unwrap();
    assert_eq!(
        m.l4,
        L4Info::IcmpEcho {
            ident: 0x3f98,
            seq: 1,
            request: true
        }
    );
    assert_eq!(m.ttl, 63);

    // Flip the first option to critical (type 0x81): the packet must be dropped. The UDP checksum
    // is zeroed, which IPv4 allows, so the drop is for the option and not the checksum.
    let mut crit = pkt.clone();
    crit[38] = 0x81;
    crit[26] = 0;
    crit[27] = 0;
    assert_eq!(
        encap::decap_full(&crit).unwrap_err(),
        DecapError::GeneveCriticalOption
    );
    assert_eq!(
        encap::decap_full(&crit).unwrap_err().as_str(),
        "geneve_critical_option"
    );
    // Without zeroing the checksum the corruption is caught first.
    let mut bad = pkt.clone();
    bad[38] = 0x81;
    assert_eq!(
        encap::decap_full(&bad).unwrap_err(),
        DecapError::BadOuterChecksum
    );
}

/// Our VXLAN framing of the captured inner ping matches what the Linux vxlan driver sent, byte for
/// byte from the VXLAN header on; the outer headers differ only where we choose differently
/// (DF set, ID 0, source port from our hash) and in the checksums that cover those choices.
#[test]
fn our_vxlan_matches_linux_layout() {
    let linux = hex(LINUX_VXLAN_PING);
    let inner = &linux[50..];
    let mut buf = vec![0u8; encap::MAX_HEADROOM];
    buf.extend_from_slice(inner);
    let params = EncapParams {
        proto: TunnelProto::Vxlan,
        vni: 42,
        src: v4([172, 16, 2, 2]).into(),
        dst: v4([172, 16, 2, 3]).into(),
        dst_port: 4789,
        inner_src_mac: [2, 0, 0, 0, 1, 1],
        inner_dst_mac: [2, 0, 0, 0, 2, 1],
        geneve_payload: encap::GenevePayload::Ethernet,
    };
    let r = encap::encap_full(&mut buf, encap::MAX_HEADROOM, inner.len(), &params).unwrap();
    let ours = &buf[r];
    assert_eq!(ours.len(), linux.len());
    assert_eq!(&ours[28..], &linux[28..]);
    assert_eq!(&ours[..4], &linux[..4]); // version, IHL, TOS, total length
    assert_eq!(&ours[6..8], &[0x40, 0x00]); // DF
    assert_eq!(&ours[8..10], &linux[8..10]); // TTL, protocol
    assert_eq!(&ours[12..20], &linux[12..20]); // addresses
    assert_eq!(&ours[22..26], &linux[22..26]); // destination port, UDP length
    let sport = u16::from_be_bytes([ours[20], ours[21]]);
    assert_eq!(sport, encap::udp_source_port(inner));
    assert!(sport >= 49152);
    let d = encap::decap_full(ours).unwrap();
    assert_eq!(&ours[d.decap.inner], inner);
}

#[test]
fn truncations_of_golden_packets_are_rejected_not_panics() {
    for p in [
        LINUX_VXLAN_PING,
        LINUX_VXLAN_SYN,
        LINUX_VXLAN_MLD,
        SCAPY_GENEVE_OPTS,
    ] {
        let pkt = hex(p);
        for n in 0..pkt.len() {
            assert!(encap::decap_full(&pkt[..n]).is_err(), "prefix {n} accepted");
        }
    }
    let v6 = hex(SCAPY_IPV6_HBH_FRAG);
    for n in 0..v6.len() {
        assert!(wire::parse_ip(&v6[..n]).is_err(), "prefix {n} accepted");
    }
}
