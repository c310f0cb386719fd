//! The poptrie must answer exactly like the linear-scan oracle, for any table and any address.
//!
//! Input layout: byte 0 picks the family (even: IPv4, odd: IPv6) and, in its other bits, a
//! direct-pointing width for a second, forced-layout build; byte 1 is the number of
//! prefixes (at most 255); then each prefix is an address (4 or 16 bytes) and a raw length byte
//! (lengths beyond the family width must make both builders fail); the rest are query
//! addresses. Every prefix's first and last address are queried as well.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use podrouter_core::lpm::{LinearLpm4, LinearLpm6, Lpm4, Lpm6};

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let (Some([family]), Some([n])) = (take::<1>(&mut data), take::<1>(&mut data)) else {
        return;
    };
    if family % 2 == 0 {
        let mut table = Vec::new();
        for i in 0..n {
            let (Some(a), Some([len])) = (take::<4>(&mut data), take::<1>(&mut data)) else {
                break;
            };
            table.push((Ipv4Addr::from(a), len, u32::from(i)));
        }
        let forced = Lpm4::build_with_direct_bits(&table, 1 + (family >> 1) % 16);
        let (fast, slow) = match (Lpm4::build(&table), LinearLpm4::build(&table)) {
            (Ok(f), Ok(s)) => (f, s),
            (Err(_), Err(_)) => {
                assert!(table.iter().any(|p| p.1 > 32) && forced.is_err());
                return;
            }
            (f, s) => panic!("builders disagree: {:?} vs {:?}", f.err(), s.err()),
        };
        let mut queries: Vec<u32> = Vec::new();
        for &(a, len, _) in &table {
            let host = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            queries.extend([u32::from(a) & !host, u32::from(a) | host]);
        }
        while let Some(a) = take::<4>(&mut data) {
            queries.push(u32::from_be_bytes(a));
        }
        for q in queries {
            let q = Ipv4Addr::from(q);
            assert_eq!(fast.lookup(q), slow.lookup(q), "{q}");
            assert_eq!(forced.as_ref().unwrap().lookup(q), slow.lookup(q), "{q}");
        }
    } else {
        let mut table = Vec::new();
        for i in 0..n {
            let (Some(a), Some([len])) = (take::<16>(&mut data), take::<1>(&mut data)) else {
                break;
            };
            table.push((Ipv6Addr::from(a), len, u32::from(i)));
        }
        let forced = Lpm6::build_with_direct_bits(&table, 1 + (family >> 1) % 16);
        let (fast, slow) = match (Lpm6::build(&table), LinearLpm6::build(&table)) {
            (Ok(f), Ok(s)) => (f, s),
            (Err(_), Err(_)) => {
                assert!(table.iter().any(|p| p.1 > 128) && forced.is_err());
                return;
            }
            (f, s) => panic!("builders disagree: {:?} vs {:?}", f.err(), s.err()),
        };
        let mut queries: Vec<u128> = Vec::new();
        for &(a, len, _) in &table {
            let host = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            queries.extend([u128::from(a) & !host, u128::from(a) | host]);
        }
        while let Some(a) = take::<16>(&mut data) {
            queries.push(u128::from_be_bytes(a));
        }
        for q in queries {
            let q = Ipv6Addr::from(q);
            assert_eq!(fast.lookup(q), slow.lookup(q), "{q}");
            assert_eq!(forced.as_ref().unwrap().lookup(q), slow.lookup(q), "{q}");
        }
    }
});
