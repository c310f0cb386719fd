//! Decapsulation on arbitrary bytes: `decap_full` and `decap_payload` for both protocols and every
//! outer ECN value. Nothing may panic; an accepted packet's inner range lies inside the input and
//! holds an IP packet of the advertised family; re-encapsulating it round-trips.
#![no_main]

use core::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use podrouter_core::encap::{self, EncapParams, TunnelProto};
use podrouter_core::wire::{self, ethernet::ethertype};

fn check_inner(buf: &[u8], d: &encap::Decap) {
    assert!(d.inner.start <= d.inner.end && d.inner.end <= buf.len());
    let inner = &buf[d.inner.clone()];
    let version = inner.first().map(|b| b >> 4);
    match d.inner_ethertype {
        ethertype::IPV4 => assert_eq!(version, Some(4)),
        ethertype::IPV6 => assert_eq!(version, Some(6)),
        other => panic!("decap accepted ethertype {other:#06x}"),
    }
    assert!(d.vni <= wire::vxlan::MAX_VNI);
    let mut marked = inner.to_vec();
    assert!(encap::apply_ecn(&mut marked, d.ecn_action).is_ok());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(o) = encap::decap_full(data) {
        check_inner(data, &o.decap);
        // What we accepted, we can send again and get back.
        let inner = &data[o.decap.inner.clone()];
        let mut buf = vec![0u8; encap::MAX_HEADROOM];
        buf.extend_from_slice(inner);
        let params = EncapParams {
            proto: o.decap.proto,
            vni: o.decap.vni,
            src: Ipv4Addr::new(172, 16, 2, 2).into(),
            dst: Ipv4Addr::new(172, 16, 3, 2).into(),
            dst_port: o.decap.proto.default_port(),
            inner_src_mac: [2, 0, 0, 0, 0, 1],
            inner_dst_mac: [2, 0, 0, 0, 0, 2],
            // the inner length picks the framing, so both are re-encapsulated over a run
            geneve_payload: if inner.len() % 2 == 0 {
                encap::GenevePayload::Ethernet
            } else {
                encap::GenevePayload::Ip
            },
        };
        if let Ok(r) = encap::encap_full(&mut buf, encap::MAX_HEADROOM, inner.len(), &params) {
            let again = encap::decap_full(&buf[r.clone()])
                .expect("re-encapsulated packet must decapsulate");
            assert_eq!(again.decap.vni, o.decap.vni);
            assert_eq!(&buf[r][again.decap.inner.clone()], inner);
        }
    }
    // The option walk the datapath counts by (class, type) before validation: every option it
    // yields lies inside the options area, whatever the bytes.
    if let Ok(h) = wire::geneve::Header::new_checked(data) {
        let area = h.options().len();
        let mut seen = 0;
        for o in h.options_iter().map_while(Result::ok) {
            seen += wire::geneve::OPTION_HEADER_LEN + o.data.len();
            assert!(seen <= area && o.data.len() <= 31 * 4);
        }
    }
    for proto in [TunnelProto::Vxlan, TunnelProto::Geneve] {
        for ecn in 0..4u8 {
            if let Ok(d) = encap::decap_payload(proto, data, ecn) {
                assert_eq!(d.proto, proto);
                check_inner(data, &d);
            }
        }
    }
});
