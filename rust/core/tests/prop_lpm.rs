//! The fast LPM must agree with the linear-scan oracle on every table and address.
//!
//! Tables are drawn so that prefixes overlap a lot (addresses come from a handful of bases with
//! random low bits), include /0 and host routes, and repeat prefixes (the last value must win in
//! both). Queries are drawn near the prefixes (their network address, their last address, a
//! random host inside) as well as anywhere.

use std::net::{Ipv4Addr, Ipv6Addr};

use podrouter_core::lpm::{LinearLpm4, LinearLpm6, Lpm4, Lpm6, LpmError};
use proptest::prelude::*;

fn len4() -> impl Strategy<Value = u8> {
    prop_oneof![
        1 => Just(0u8),
        2 => Just(32u8),
        2 => prop::sample::select(vec![8u8, 16, 24]),
        6 => 0u8..=32,
    ]
}

fn len6() -> impl Strategy<Value = u8> {
    prop_oneof![
        1 => Just(0u8),
        2 => Just(128u8),
        2 => prop::sample::select(vec![16u8, 32, 48, 56, 64, 96, 127]),
        6 => 0u8..=128,
    ]
}

/// `n` prefixes around a few random bases: high bits shared, low bits random.
fn table4() -> impl Strategy<Value = Vec<(Ipv4Addr, u8, u32)>> {
    (prop::collection::vec(any::<u32>(), 1..4), 0usize..400).prop_flat_map(|(bases, n)| {
        let nb = bases.len();
        prop::collection::vec((0..nb, any::<u32>(), 0u32..=32, len4()), n).prop_map(move |v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (b, noise, shift, len))| {
                    let a = bases[b] ^ noise.checked_shr(shift).unwrap_or(0);
                    (Ipv4Addr::from(a), len, i as u32)
                })
                .collect()
        })
    })
}

fn table6() -> impl Strategy<Value = Vec<(Ipv6Addr, u8, u32)>> {
    (prop::collection::vec(any::<u128>(), 1..4), 0usize..150).prop_flat_map(|(bases, n)| {
        let nb = bases.len();
        prop::collection::vec((0..nb, any::<u128>(), 0u32..=128, len6()), n).prop_map(move |v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (b, noise, shift, len))| {
                    let a = bases[b] ^ noise.checked_shr(shift).unwrap_or(0);
                    (Ipv6Addr::from(a), len, i as u32)
                })
                .collect()
        })
    })
}

/// Addresses to ask about: near each prefix and anywhere.
fn queries4(t: &[(Ipv4Addr, u8, u32)], extra: &[u32]) -> Vec<Ipv4Addr> {
    let mut q: Vec<Ipv4Addr> = extra.iter().map(|&a| Ipv4Addr::from(a)).collect();
    for (i, &(a, len, _)) in t.iter().enumerate() {
        let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        let net = u32::from(a) & !host;
        let r = extra.get(i % extra.len().max(1)).copied().unwrap_or(0);
        q.push(Ipv4Addr::from(net));
        q.push(Ipv4Addr::from(net | host));
        q.push(Ipv4Addr::from(net | (r & host)));
        q.push(Ipv4Addr::from(net.wrapping_sub(1)));
        q.push(Ipv4Addr::from((net | host).wrapping_add(1)));
    }
    q
}

fn queries6(t: &[(Ipv6Addr, u8, u32)], extra: &[u128]) -> Vec<Ipv6Addr> {
    let mut q: Vec<Ipv6Addr> = extra.iter().map(|&a| Ipv6Addr::from(a)).collect();
    for (i, &(a, len, _)) in t.iter().enumerate() {
        let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        let net = u128::from(a) & !host;
        let r = extra.get(i % extra.len().max(1)).copied().unwrap_or(0);
        q.push(Ipv6Addr::from(net));
        q.push(Ipv6Addr::from(net | host));
        q.push(Ipv6Addr::from(net | (r & host)));
        q.push(Ipv6Addr::from(net.wrapping_sub(1)));
        q.push(Ipv6Addr::from((net | host).wrapping_add(1)));
    }
    q
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn lpm4_matches_linear(
        t in table4(),
        extra in prop::collection::vec(any::<u32>(), 0..64),
        bits in prop::sample::select(vec![1u8, 8, 13, 16, 20]),
    ) {
        let slow = LinearLpm4::build(&t).unwrap();
        // The size-chosen layout, and a forced one (small tables would otherwise never meet the
        // large layout here).
        for fast in [Lpm4::build(&t).unwrap(), Lpm4::build_with_direct_bits(&t, bits).unwrap()] {
            for a in queries4(&t, &extra) {
                prop_assert_eq!(fast.lookup(a), slow.lookup(a), "address {}", a);
            }
        }
    }

    #[test]
    fn lpm6_matches_linear(
        t in table6(),
        extra in prop::collection::vec(any::<u128>(), 0..64),
        bits in prop::sample::select(vec![1u8, 8, 13, 16, 20]),
    ) {
        let slow = LinearLpm6::build(&t).unwrap();
        for fast in [Lpm6::build(&t).unwrap(), Lpm6::build_with_direct_bits(&t, bits).unwrap()] {
            for a in queries6(&t, &extra) {
                prop_assert_eq!(fast.lookup(a), slow.lookup(a), "address {}", a);
            }
        }
    }

    #[test]
    fn too_long_prefixes_are_refused(a in any::<u32>(), len in 33u8..) {
        let t = [(Ipv4Addr::from(a), len, ())];
        prop_assert_eq!(Lpm4::build(&t).unwrap_err(), LpmError::PrefixTooLong { len, max: 32 });
        prop_assert!(LinearLpm4::build(&t).is_err());
    }

    #[test]
    fn too_long_v6_prefixes_are_refused(a in any::<u128>(), len in 129u8..) {
        let t = [(Ipv6Addr::from(a), len, ())];
        prop_assert!(Lpm6::build(&t).is_err());
        prop_assert!(LinearLpm6::build(&t).is_err());
    }
}
