//! IPv6 masquerade (NAT66): packets built byte by byte here, translated by the core, and every
//! transport checksum checked by recomputing it from scratch over the RFC 8200 §8.1 pseudo-header
//! (128-bit addresses), not with the incremental arithmetic under test.

use std::net::Ipv6Addr;

use podrouter_core::nat::{
    translate_egress, translate_egress_v6, translate_ingress_v6, FlowKey6, NatConfig, NatError,
    NatProto, NatState, NatTable, NatTable6,
};
use podrouter_core::wire::{self, checksum, ip_proto};
use podrouter_core::DropReason;
use proptest::prelude::*;

const POD: &str = "fd00:244:1::10";
const POD2: &str = "fd00:244:1::11";
const NODE: &str = "2001:db8:0:1::2";
const REMOTE: &str = "2001:db8:ff::7";
const ROUTER: &str = "2001:db8:0:1::1";

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn a(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn l4_sum(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, l4: &[u8]) -> u16 {
    checksum::combine(&[
        checksum::pseudo_header_v6(src, dst, nh, l4.len() as u32),
        checksum::data(l4),
    ])
}

/// An IPv6 packet with a correct transport checksum at `csum_at` (UDP: zero computed -> 0xffff).
fn ip6(src: &str, dst: &str, nh: u8, mut l4: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let (s, d) = (a(src), a(dst));
    l4[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let mut c = !l4_sum(s, d, nh, &l4);
    if nh == ip_proto::UDP && c == 0 {
        c = 0xffff;
    }
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nh, 64]);
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&l4);
    p
}

fn tcp6(src: &str, sp: u16, dst: &str, dp: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut l4 = vec![0u8; 24];
    l4[0..2].copy_from_slice(&sp.to_be_bytes());
    l4[2..4].copy_from_slice(&dp.to_be_bytes());
    l4[4..8].copy_from_slice(&seq.to_be_bytes());
    l4[8..12].copy_from_slice(&ack.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64800u16.to_be_bytes());
    l4[20..24].copy_from_slice(b"data");
    ip6(src, dst, ip_proto::TCP, l4, 16)
}

fn udp6(src: &str, sp: u16, dst: &str, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&sp.to_be_bytes());
    l4[2..4].copy_from_slice(&dp.to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(payload);
    ip6(src, dst, ip_proto::UDP, l4, 6)
}

fn echo6(src: &str, dst: &str, request: bool, ident: u16) -> Vec<u8> {
    let mut l4 = vec![if request { 128 } else { 129 }, 0, 0, 0];
    l4.extend_from_slice(&ident.to_be_bytes());
    l4.extend_from_slice(&7u16.to_be_bytes());
    l4.extend_from_slice(b"ping6");
    ip6(src, dst, ip_proto::ICMPV6, l4, 2)
}

/// An ICMPv6 error of type `t` from `from` to `to` quoting the first `quote_len` bytes of `orig`.
fn err6(from: &str, to: &str, t: u8, code: u8, orig: &[u8], quote_len: usize) -> Vec<u8> {
    let mut l4 = vec![t, code, 0, 0, 0, 0, 0, 0];
    if t == 2 {
        l4[4..8].copy_from_slice(&1280u32.to_be_bytes());
    }
    l4.extend_from_slice(&orig[..quote_len.min(orig.len())]);
    ip6(from, to, ip_proto::ICMPV6, l4, 2)
}

fn addrs(p: &[u8]) -> (Ipv6Addr, Ipv6Addr) {
    let mut s = [0u8; 16];
    let mut d = [0u8; 16];
    s.copy_from_slice(&p[8..24]);
    d.copy_from_slice(&p[24..40]);
    (Ipv6Addr::from(s), Ipv6Addr::from(d))
}

/// The transport checksum of a whole IPv6 packet (no extension headers) is right.
fn assert_valid(p: &[u8]) {
    let (s, d) = addrs(p);
    assert_eq!(l4_sum(s, d, p[6], &p[40..]), 0xffff, "transport checksum");
    if p[6] == ip_proto::UDP {
        assert_ne!(
            &p[46..48],
            &[0, 0],
            "UDP over IPv6 never carries checksum 0"
        );
    }
}

fn meta(p: &[u8]) -> wire::IpMeta {
    wire::parse_ip(p).unwrap()
}

fn port(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn key(proto: NatProto, pod_port: u16, remote_port: u16) -> FlowKey6 {
    FlowKey6 {
        proto,
        pod_ip: a(POD),
        pod_port,
        remote_ip: a(REMOTE),
        remote_port,
    }
}

#[test]
fn tcp_round_trip_and_state() {
    let mut t = NatTable6::new_v6(NatConfig::default());
    let mut p = tcp6(POD, 40000, REMOTE, 443, SYN, 1000, 0);
    let np = translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
    assert_valid(&p);
    assert_eq!(addrs(&p), (a(NODE), a(REMOTE)));
    assert_eq!(meta(&p).ports(), Some((np, 443)));
    assert_eq!(&p[60..64], b"data");

    let mut r = tcp6(REMOTE, 443, NODE, np, SYN | ACK, 5000, 1001);
    assert_eq!(translate_ingress_v6(&mut t, &mut r, 1), Ok(a(POD)));
    assert_valid(&r);
    assert_eq!(addrs(&r), (a(REMOTE), a(POD)));
    assert_eq!(meta(&r).ports(), Some((443, 40000)));
    let k = key(NatProto::Tcp, 40000, 443);
    assert_eq!(t.get(&k, 1).unwrap().state, NatState::TcpEstablished);

    // Mid-stream garbage opens nothing; a reply to a port nobody holds is dropped.
    let mut g = tcp6(POD, 40001, REMOTE, 443, ACK, 1, 1);
    assert_eq!(
        translate_egress_v6(&mut t, &mut g, a(NODE), 1),
        Err(DropReason::NatNoMapping)
    );
    let mut r = tcp6(REMOTE, 443, NODE, np.wrapping_add(1), ACK, 1, 1);
    assert_eq!(
        translate_ingress_v6(&mut t, &mut r, 1),
        Err(DropReason::NatNoMapping)
    );
    // A reply RST far outside the window leaves the mapping alone; one in the window closes it.
    let mut r = tcp6(REMOTE, 443, NODE, np, RST, 5001 + 0x4000_0000, 0);
    assert_eq!(
        translate_ingress_v6(&mut t, &mut r, 2),
        Err(DropReason::NatRstOutOfWindow)
    );
    assert_eq!(t.get(&k, 2).unwrap().state, NatState::TcpEstablished);
    let mut r = tcp6(REMOTE, 443, NODE, np, RST, 5001, 0);
    assert_eq!(translate_ingress_v6(&mut t, &mut r, 2), Ok(a(POD)));
    assert_eq!(t.get(&k, 2).unwrap().state, NatState::TcpClose);
}

#[test]
fn udp_round_trip_never_writes_a_zero_checksum() {
    let mut t = NatTable6::new_v6(NatConfig::default());
    // Many payloads: some translated checksums land on the 0 / 0xffff boundary.
    for i in 0..2000u16 {
        let payload = i.to_be_bytes();
        let mut p = udp6(POD, 5000 + (i % 50), REMOTE, 53, &payload);
        let np = translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
        assert_valid(&p);
        let mut r = udp6(REMOTE, 53, NODE, np, &payload);
        assert_eq!(translate_ingress_v6(&mut t, &mut r, 0), Ok(a(POD)));
        assert_valid(&r);
        assert_eq!(meta(&r).ports(), Some((53, 5000 + (i % 50))));
    }
}

#[test]
fn icmpv6_echo_identifier_is_translated_with_the_pseudo_header() {
    let mut t = NatTable6::new_v6(NatConfig::default());
    let mut p = echo6(POD, REMOTE, true, 0x4242);
    let id = translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
    assert_valid(&p);
    assert_eq!(meta(&p).icmp_id(), Some(id));
    let mut r = echo6(REMOTE, NODE, false, id);
    assert_eq!(translate_ingress_v6(&mut t, &mut r, 1), Ok(a(POD)));
    assert_valid(&r);
    assert_eq!(meta(&r).icmp_id(), Some(0x4242));
    // An echo reply does not open a mapping.
    let mut q = echo6(POD, REMOTE, false, 1);
    assert_eq!(
        translate_egress_v6(&mut t, &mut q, a(NODE), 0),
        Err(DropReason::Unsupported)
    );
}

/// The quote inside a translated error: source back to the pod, port restored, and (when the
/// quote holds the whole packet) its own transport checksum valid again.
fn check_quote(e: &[u8], proto: u8, port_at: usize, pod_port: u16, whole: bool) {
    let q = &e[48..];
    assert_eq!(addrs(q), (a(POD), a(REMOTE)));
    assert_eq!(q[6], proto);
    assert_eq!(port(q, 40 + port_at), pod_port);
    if whole {
        assert_eq!(l4_sum(a(POD), a(REMOTE), proto, &q[40..]), 0xffff);
    }
}

#[test]
fn icmpv6_errors_are_translated_back() {
    let mut t = NatTable6::new_v6(NatConfig::default());
    // Destination Unreachable (port unreachable) for a UDP datagram, whole packet quoted.
    let mut p = udp6(POD, 5353, REMOTE, 9, b"x");
    let np = translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
    let mut e = err6(REMOTE, NODE, 1, 4, &p, 1232);
    assert_eq!(translate_ingress_v6(&mut t, &mut e, 1), Ok(a(POD)));
    assert_valid(&e);
    assert_eq!(addrs(&e), (a(REMOTE), a(POD)));
    check_quote(&e, ip_proto::UDP, 0, 5353, true);
    let _ = np;

    // Packet Too Big from a router for a TCP segment, whole and cut after the ports.
    let mut p = tcp6(POD, 40000, REMOTE, 443, SYN, 9, 0);
    translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
    for (len, whole) in [(p.len(), true), (48, false)] {
        let mut e = err6(ROUTER, NODE, 2, 0, &p, len);
        assert_eq!(translate_ingress_v6(&mut t, &mut e, 1), Ok(a(POD)));
        assert_valid(&e);
        assert_eq!(&e[44..48], &1280u32.to_be_bytes(), "MTU untouched");
        check_quote(&e, ip_proto::TCP, 0, 40000, whole);
    }

    // Time Exceeded for an echo request.
    let mut p = echo6(POD, REMOTE, true, 0x77);
    translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
    let mut e = err6(ROUTER, NODE, 3, 0, &p, p.len());
    assert_eq!(translate_ingress_v6(&mut t, &mut e, 1), Ok(a(POD)));
    assert_valid(&e);
    check_quote(&e, ip_proto::ICMPV6, 4, 0x77, true);

    // An error about a flow we do not hold, or quoting something else, is not forwarded.
    let other = udp6(NODE, 61111, REMOTE, 9, b"x");
    let mut e = err6(REMOTE, NODE, 1, 4, &other, other.len());
    assert_eq!(
        translate_ingress_v6(&mut t, &mut e, 1),
        Err(DropReason::NatNoMapping)
    );
    let reply = echo6(NODE, REMOTE, false, 1);
    let mut e = err6(REMOTE, NODE, 1, 4, &reply, reply.len());
    assert_eq!(
        translate_ingress_v6(&mut t, &mut e, 1),
        Err(DropReason::Unsupported)
    );
}

#[test]
fn refuses_what_it_cannot_translate() {
    let mut t = NatTable6::new_v6(NatConfig::default());
    // Neighbour Solicitation and other non-echo ICMPv6 stay with the node.
    let mut ns = ip6(
        POD,
        REMOTE,
        ip_proto::ICMPV6,
        vec![135, 0, 0, 0, 0, 0, 0, 0],
        2,
    );
    assert_eq!(
        translate_egress_v6(&mut t, &mut ns, a(NODE), 0),
        Err(DropReason::Unsupported)
    );
    // A truncated packet.
    let mut p = tcp6(POD, 1, REMOTE, 2, SYN, 0, 0);
    assert!(translate_egress_v6(&mut t, &mut p[..50], a(NODE), 0).is_err());
    assert!(t.is_empty());
    // An IPv4 packet is not the IPv6 path's business and vice versa.
    let mut v4 = NatTable::new(NatConfig::default());
    let mut p = tcp6(POD, 1, REMOTE, 2, SYN, 0, 0);
    assert_eq!(
        translate_egress(&mut v4, &mut p, "192.0.2.1".parse().unwrap(), 0),
        Err(DropReason::Unsupported)
    );
}

#[test]
fn per_pod_limit_and_counters_are_per_v6_address() {
    let mut t = NatTable6::new_v6(NatConfig {
        max_entries_per_pod: 2,
        ..NatConfig::default()
    });
    for i in 0..2 {
        let mut p = udp6(POD, 6000 + i, REMOTE, 53, b"q");
        translate_egress_v6(&mut t, &mut p, a(NODE), 0).unwrap();
    }
    let mut p = udp6(POD, 6002, REMOTE, 53, b"q");
    assert_eq!(
        translate_egress_v6(&mut t, &mut p, a(NODE), 0),
        Err(DropReason::NatPodLimit)
    );
    // Another pod is not affected.
    let mut p = udp6(POD2, 6002, REMOTE, 53, b"q");
    assert!(translate_egress_v6(&mut t, &mut p, a(NODE), 0).is_ok());
    assert_eq!(t.pod_entries(a(POD)), 2);
    assert_eq!(t.pod_limit_drops(), (vec![(a(POD), 1)], 0));
    assert_eq!(
        t.egress(&key(NatProto::Udp, 7000, 53), 0, 0),
        Err(NatError::PodLimit)
    );
}

#[test]
fn node_ports_follow_the_seed_and_families_have_separate_pools() {
    let cfg = |seed| NatConfig {
        port_lo: 61000,
        port_hi: 61000,
        seed,
        ..NatConfig::default()
    };
    // One port: the v4 and v6 tables each hand it out once.
    let mut t6 = NatTable6::new_v6(cfg(1));
    let mut v4 = NatTable::new(cfg(1));
    assert_eq!(t6.egress(&key(NatProto::Udp, 1, 53), 0, 0), Ok(61000));
    assert_eq!(
        t6.egress(&key(NatProto::Udp, 2, 53), 0, 0),
        Err(NatError::Exhausted)
    );
    let k4 = podrouter_core::nat::FlowKey {
        proto: NatProto::Udp,
        pod_ip: "10.244.1.10".parse().unwrap(),
        pod_port: 1,
        remote_ip: "203.0.113.1".parse().unwrap(),
        remote_port: 53,
    };
    assert_eq!(v4.egress(&k4, 0, 0), Ok(61000));
    // The first port probed depends on the seed.
    let wide = |seed| NatConfig {
        port_hi: 65000,
        ..cfg(seed)
    };
    let ports: std::collections::BTreeSet<u16> = (0..16)
        .map(|s| {
            NatTable6::new_v6(wide(s))
                .egress(&key(NatProto::Tcp, 1, 80), SYN, 0)
                .unwrap()
        })
        .collect();
    assert!(ports.len() > 8, "{ports:?}");
}

proptest! {
    /// Random v6 flows out and back: every checksum stays right, replies reach the pod with its
    /// own port, and errors quoting any prefix of the translated packet are restored or refused,
    /// never mangled.
    #[test]
    fn random_v6_packets_translate_out_and_back(
        ops in proptest::collection::vec(
            (0u8..3, 1u16..40, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40), 48usize..200),
            1..40,
        ),
    ) {
        let mut t = NatTable6::new_v6(NatConfig { port_lo: 61000, port_hi: 61031, ..NatConfig::default() });
        for (kind, pp, rp, payload, qlen) in ops {
            let mut p = match kind {
                0 => udp6(POD, pp, REMOTE, rp, &payload),
                1 => tcp6(POD, pp, REMOTE, rp, SYN, u32::from(rp), 0),
                _ => echo6(POD, REMOTE, true, pp),
            };
            let orig = p.clone();
            let Ok(np) = translate_egress_v6(&mut t, &mut p, a(NODE), 0) else { continue };
            assert_valid(&p);
            prop_assert_eq!(&p[40..], &{
                let mut o = orig[40..].to_vec();
                let at = if kind == 2 { 4 } else { 0 };
                o[at..at + 2].copy_from_slice(&np.to_be_bytes());
                let c = match kind { 0 => 6, 1 => 16, _ => 2 };
                o[c..c + 2].copy_from_slice(&p[40 + c..42 + c]);
                o
            }[..]);
            let mut r = match kind {
                0 => udp6(REMOTE, rp, NODE, np, &payload),
                1 => tcp6(REMOTE, rp, NODE, np, SYN | ACK, 1, u32::from(rp) + 1),
                _ => echo6(REMOTE, NODE, false, np),
            };
            prop_assert_eq!(translate_ingress_v6(&mut t, &mut r, 0), Ok(a(POD)));
            assert_valid(&r);
            let mut e = err6(ROUTER, NODE, 1, 0, &p, qlen);
            match translate_ingress_v6(&mut t, &mut e, 0) {
                Ok(pod) => {
                    prop_assert_eq!(pod, a(POD));
                    assert_valid(&e);
                    let q = &e[48..];
                    prop_assert_eq!(addrs(q).0, a(POD));
                    if q.len() == orig.len() {
                        prop_assert_eq!(q, &orig[..]);
                    }
                }
                Err(d) => prop_assert!(matches!(d, DropReason::Truncated), "{:?}", d),
            }
        }
    }
}
