//! The whole tunnel ingress path of a worker on arbitrary datagrams: `datapath::ingress` (decap,
//! inner parse, peer / VNI / address validation, ECN) on each UDP payload, then the coalescer on
//! what is delivered, as `worker::ingress_batch` does before the TUN write. Nothing may panic; a
//! delivered packet lies inside its datagram, comes from the sending peer's pod CIDR and goes to
//! this node's; the coalescer's writes stand for exactly the delivered packets (see
//! gro_coalesce.rs).
//!
//! Input: records `[len_hi, len_lo, mode, bytes...]`. Mode bit 0: the bytes are the whole UDP
//! payload (else a valid VXLAN + Ethernet header is put in front and an IPv4 inner packet gets
//! the peer's and this node's pod addresses and a correct header checksum); bit 1: Geneve port
//! instead of VXLAN; bits 2-3: outer ECN; bit 4: from an unknown underlay address; bit 5: from a
//! UDP source port inside the masquerade range (refused: `tunnel_source_port`); bit 7 (framed
//! only): the inner packet continues the previous framed one's TCP flow (next sequence number).
#![no_main]

mod common;

use core::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use podrouter_core::{reference, Cidr, RoutingMode, Tables};
use podrouter_core::datapath::{self, IngressAction};
use podrouter_core::wire::checksum;

const PEER: Ipv4Addr = Ipv4Addr::new(172, 16, 3, 2);

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// node1 of the reference topology (core `reference`) in tunnel mode with node2, no gateway.
fn tables() -> Tables {
    let mut spec = reference::node1(
        RoutingMode::Tunnel,
        vec![reference::peer("node2", PEER.into(), "10.244.2.0/24", false)],
    );
    spec.gateway = None;
    reference::tables(&spec)
}

/// VXLAN (flags I, VNI 1) and an inner Ethernet header in front of `inner`.
fn frame(inner: &[u8]) -> Vec<u8> {
    let et: u16 = if inner.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    };
    let mut d = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    d.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
    d.extend_from_slice(&et.to_be_bytes());
    d.extend_from_slice(inner);
    d
}

/// Pod addresses and a correct header checksum for an IPv4 inner packet.
fn fix_v4(p: &mut [u8]) {
    if p.len() >= 20 && p[0] >> 4 == 4 {
        p[12..15].copy_from_slice(&[10, 244, 2]);
        p[16..19].copy_from_slice(&[10, 244, 1]);
        let ihl = (usize::from(p[0] & 0x0f) * 4).clamp(20, p.len());
        p[10..12].fill(0);
        let c = checksum::checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

static TABLES: OnceLock<Tables> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let t = TABLES.get_or_init(tables);
    let vxlan = t.tunnel().vxlan_port;
    let geneve = t.tunnel().geneve_port;
    let mut delivered: Vec<Vec<u8>> = Vec::new();
    let mut last_inner: Option<Vec<u8>> = None;
    for r in common::records(data) {
        let Some((&mode, bytes)) = r.split_first() else {
            continue;
        };
        let mut dg = if mode & 1 != 0 {
            bytes.to_vec()
        } else {
            let cont = match (&last_inner, mode & 0x80 != 0, bytes.split_first()) {
                (Some(prev), true, Some((&f, payload))) => common::continuation(
                    prev,
                    payload,
                    [0x10, 0x18, 0x10, 0x11][usize::from(f) & 3],
                ),
                _ => None,
            };
            let mut inner = cont.unwrap_or_else(|| bytes.to_vec());
            fix_v4(&mut inner);
            last_inner = Some(inner.clone());
            frame(&inner)
        };
        let port = if mode & 2 != 0 { geneve } else { vxlan };
        let src = if mode & 0x10 != 0 {
            Ipv4Addr::new(172, 16, 9, 9)
        } else {
            PEER
        }
        .into();
        let sport = if mode & 0x20 != 0 { 61000 } else { 40000 };
        let len = dg.len();
        match datapath::ingress(t, src, sport, port, (mode >> 2) & 3, &mut dg, 0, len) {
            IngressAction::Deliver { range, .. } => {
                assert!(range.start <= range.end && range.end <= len);
                assert_eq!(src, PEER, "only the known peer's packets are delivered");
                assert_eq!(sport, 40000, "never from a masquerade port");
                let p = &dg[range];
                let m = podrouter_core::wire::parse_ip(p).expect("a delivered packet parses");
                assert!(cidr("10.244.2.0/24").contains(m.src), "{:?}", m.src);
                assert!(cidr("10.244.1.0/24").contains(m.dst), "{:?}", m.dst);
                delivered.push(p.to_vec());
            }
            IngressAction::Drop(_) => {}
        }
    }
    common::coalesce_check(&delivered);
});
