//! podrouter-core's fast checksum (`offload::csum`: native-endian 64-bit words, RFC 1071 §2(B))
//! against its reference (`wire::checksum`) on arbitrary bytes: the sum of any data, of any split into parts
//! (every part but the last of even length), and both pseudo-headers.
#![no_main]

mod common;

use core::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use podrouter_core::wire::checksum;
use podrouter_core::offload::csum;

fuzz_target!(|data: &[u8]| {
    let want = checksum::data(data);
    assert!(common::same_sum(csum::sum(data), want));
    // Split at fuzzer-chosen even points (taken from the first bytes).
    let mut cuts: Vec<usize> = data
        .iter()
        .take(4)
        .map(|&b| (usize::from(b) * 2).min(data.len() & !1))
        .collect();
    cuts.sort_unstable();
    let mut parts = Vec::new();
    let mut at = 0;
    for c in cuts {
        parts.push(&data[at..c]);
        at = c;
    }
    parts.push(&data[at..]);
    assert!(common::same_sum(csum::sum_parts(&parts), want));
    let halves = csum::add(
        csum::sum(&data[..data.len() / 2 & !1]),
        csum::sum(&data[data.len() / 2 & !1..]),
    );
    assert!(common::same_sum(halves, want));
    assert!(common::same_sum(!csum::finish(csum::sum(data)), want));
    assert_ne!(
        csum::finish(csum::sum(data)),
        0,
        "a computed zero is sent as 0xffff"
    );
    if data.len() >= 40 {
        let (s4, d4) = (
            <[u8; 4]>::try_from(&data[0..4]).unwrap(),
            <[u8; 4]>::try_from(&data[4..8]).unwrap(),
        );
        let (proto, len16) = (data[8], u16::from_be_bytes([data[9], data[10]]));
        assert!(common::same_sum(
            csum::pseudo_v4(&s4, &d4, proto, len16),
            checksum::pseudo_header_v4(Ipv4Addr::from(s4), Ipv4Addr::from(d4), proto, len16)
        ));
        let (s6, d6) = (
            <[u8; 16]>::try_from(&data[8..24]).unwrap(),
            <[u8; 16]>::try_from(&data[24..40]).unwrap(),
        );
        let len32 = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        assert!(common::same_sum(
            csum::pseudo_v6(&s6, &d6, proto, len32),
            checksum::pseudo_header_v6(Ipv6Addr::from(s6), Ipv6Addr::from(d6), proto, len32)
        ));
    }
});
