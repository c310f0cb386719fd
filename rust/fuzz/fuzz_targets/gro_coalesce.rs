//! podrouter-core's TCP coalescer (`offload::gro`: userspace GRO before the TUN write) on arbitrary
//! packet sequences. Nothing may panic, and what it writes must stand for exactly what it was offered:
//! every GSO write segments (vnet::segment) into as many packets as it claims, with valid
//! checksums, and the segments of all writes, normalised (IPv4 id, checksums, PSH aside), are the
//! offered packets, in order per flow.
//!
//! Input: records `[len_hi, len_lo, bytes...]`; a record whose first byte has bit 7 set and that
//! follows a TCP packet is a continuation: the previous packet's headers with the sequence number
//! advanced past its payload and the record's remaining bytes as payload, with good checksums, so
//! that trains form. A segment whose checksum does not verify must leave unmerged, byte for byte.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut packets: Vec<Vec<u8>> = Vec::new();
    for r in common::records(data) {
        let cont = r.first().is_some_and(|b| b & 0x80 != 0);
        let next = match (cont, packets.last()) {
            (true, Some(prev)) => {
                let flags = [0x10, 0x18, 0x10, 0x11][usize::from(r[0]) & 3];
                common::continuation(prev, &r[1..], flags)
            }
            _ => None,
        };
        packets.push(next.unwrap_or_else(|| {
            // Most first packets get good checksums (so that trains form); an odd last byte
            // keeps whatever the input had, to exercise the bad-checksum rule too.
            let mut p = r.to_vec();
            if r.last().is_some_and(|b| b & 1 == 0) {
                common::fix_checksums(&mut p);
            }
            p
        }));
    }
    common::coalesce_check(&packets);
});
