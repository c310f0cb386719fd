//! The NAT snapshot: the masquerade table as bytes, so that mappings outlive the process.
//!
//! The I/O engine (`podrouter_io::nat_persist`) writes a snapshot file at most every 0.5 s while
//! the table changes and once more when it stops, and loads it before the workers start. This
//! module is the pure part: [`encode`] and [`load`]. No I/O, no clock (the wall-clock seconds
//! are passed in).
//!
//! # Format (version 1, little-endian)
//!
//! Header, [`HEADER_LEN`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `PODRNAT\n` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | entry size ([`ENTRY_LEN`]) |
//! | 16 | 8 | entry count |
//! | 24 | 8 | wall-clock second of the write (Unix time) |
//! | 32 | 8 | reserved, 0 |
//! | 40 | 8 | checksum of every other byte of the file ([`checksum`]) |
//!
//! Then `count` entries of [`ENTRY_LEN`] bytes: protocol (1 TCP, 2 UDP, 3 ICMP), state (1..=8),
//! flags ([`NatRecord::FLAGS`]), address family (4 or 6), pod address and remote address (16 bytes
//! each: IPv4-mapped IPv6 for family 4, the IPv6 address for family 6), pod port, remote port,
//! node port, 2 reserved bytes (0), seconds to live, TCP tracking `lo` and `hi`. The IPv4 table's
//! entries come first, then the IPv6 table's ([`encode_both_into`], [`load_both`]); the header's
//! count covers both.
//!
//! # Trust
//!
//! A snapshot is untrusted input (a file anyone with root could have edited, or a torn write
//! from a crash). [`load`] refuses the whole file for a wrong magic, version, entry size, length,
//! checksum or a count above the table's `max_entries`, and checks every entry on its own: a
//! pod address outside the node's pod CIDRs, a node port outside the masquerade range, an
//! unknown protocol, state or flag, a nonzero reserved field, a duplicate flow or reply key:
//! such an entry is skipped and counted ([`LoadReport`]), the others are restored. Nothing here
//! panics on any input (the fuzz-style test below feeds it random and mutated bytes).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::nat::{
    FlowKey, NatAddr, NatProto, NatRecord, NatState, NatTable, NatTable6, RestoreError,
};
use crate::spec::Cidr;

/// An address family the snapshot stores: its family byte and its 16-byte form.
pub trait SnapAddr: NatAddr {
    const FAMILY: u8;
    fn to16(self) -> [u8; 16];
    fn from16(b: [u8; 16]) -> Option<Self>;
    fn ip(self) -> IpAddr;
}

impl SnapAddr for Ipv4Addr {
    const FAMILY: u8 = 4;
    fn to16(self) -> [u8; 16] {
        self.to_ipv6_mapped().octets()
    }
    fn from16(b: [u8; 16]) -> Option<Self> {
        Ipv6Addr::from(b).to_ipv4_mapped()
    }
    fn ip(self) -> IpAddr {
        IpAddr::V4(self)
    }
}

impl SnapAddr for Ipv6Addr {
    const FAMILY: u8 = 6;
    fn to16(self) -> [u8; 16] {
        self.octets()
    }
    fn from16(b: [u8; 16]) -> Option<Self> {
        let a = Ipv6Addr::from(b);
        // an IPv4-mapped address is an IPv4 key written as IPv6: refused
        a.to_ipv4_mapped().is_none().then_some(a)
    }
    fn ip(self) -> IpAddr {
        IpAddr::V6(self)
    }
}

/// File magic.
pub const MAGIC: [u8; 8] = *b"PODRNAT\n";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 48;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 56;

/// The file size of a snapshot of `count` entries.
pub const fn file_len(count: usize) -> usize {
    HEADER_LEN + count * ENTRY_LEN
}

const CSUM_AT: usize = 40;

/// FNV-1a over 8-byte little-endian words (the last one zero-padded), skipping the checksum
/// field. It detects torn and truncated writes and bit flips; it is no defence against someone
/// who can write the file (they can recompute it), which is why every entry is checked too.
pub fn checksum(b: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut word = |w: u64| {
        h ^= w;
        h = h.wrapping_mul(PRIME);
    };
    for (i, c) in b.chunks(8).enumerate() {
        if i == CSUM_AT / 8 {
            continue;
        }
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        word(u64::from_le_bytes(w));
    }
    word(b.len() as u64);
    h
}

fn state_code(s: NatState) -> u8 {
    match s {
        NatState::TcpSynSent => 1,
        NatState::TcpEstablished => 2,
        NatState::TcpFinWait => 3,
        NatState::TcpTimeWait => 4,
        NatState::TcpClose => 5,
        NatState::UdpUnreplied => 6,
        NatState::UdpAssured => 7,
        NatState::Icmp => 8,
    }
}

fn state_of(c: u8) -> Option<NatState> {
    Some(match c {
        1 => NatState::TcpSynSent,
        2 => NatState::TcpEstablished,
        3 => NatState::TcpFinWait,
        4 => NatState::TcpTimeWait,
        5 => NatState::TcpClose,
        6 => NatState::UdpUnreplied,
        7 => NatState::UdpAssured,
        8 => NatState::Icmp,
        _ => return None,
    })
}

fn proto_of(c: u8) -> Option<NatProto> {
    Some(match c {
        1 => NatProto::Tcp,
        2 => NatProto::Udp,
        3 => NatProto::Icmp,
        _ => return None,
    })
}

/// Writes `records` as a snapshot taken at wall-clock second `wall_secs`.
pub fn encode(records: &[NatRecord], wall_secs: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(file_len(records.len()));
    encode_into(records, wall_secs, &mut b);
    b
}

/// [`encode`] into `b` (cleared first), reusing its allocation.
pub fn encode_into(records: &[NatRecord], wall_secs: u64, b: &mut Vec<u8>) {
    encode_both_into(records, &[], wall_secs, b);
}

/// [`encode_into`] for both tables: the IPv4 records, then the IPv6 ones.
pub fn encode_both_into(
    records: &[NatRecord],
    records6: &[NatRecord<Ipv6Addr>],
    wall_secs: u64,
    b: &mut Vec<u8>,
) {
    let n = records.len() + records6.len();
    b.clear();
    b.reserve(file_len(n));
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(ENTRY_LEN as u32).to_le_bytes());
    b.extend_from_slice(&(n as u64).to_le_bytes());
    b.extend_from_slice(&wall_secs.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    for r in records {
        push_entry(b, r);
    }
    for r in records6 {
        push_entry(b, r);
    }
    let c = checksum(b);
    b[CSUM_AT..CSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
}

fn push_entry<A: SnapAddr>(b: &mut Vec<u8>, r: &NatRecord<A>) {
    b.push(r.key.proto as u8);
    b.push(state_code(r.state));
    b.push(r.flags);
    b.push(A::FAMILY);
    b.extend_from_slice(&r.key.pod_ip.to16());
    b.extend_from_slice(&r.key.remote_ip.to16());
    b.extend_from_slice(&r.key.pod_port.to_le_bytes());
    b.extend_from_slice(&r.key.remote_port.to_le_bytes());
    b.extend_from_slice(&r.node_port.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&r.ttl.to_le_bytes());
    b.extend_from_slice(&r.lo.to_le_bytes());
    b.extend_from_slice(&r.hi.to_le_bytes());
}

/// Why a whole snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// Shorter than the header, or not a multiple of entries after it, or not the length the
    /// header's count implies.
    Length {
        len: usize,
        expected: usize,
    },
    BadMagic,
    Version(u32),
    EntrySize(u32),
    /// More entries than the table may hold.
    TooMany {
        count: u64,
        max: usize,
    },
    Checksum,
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Length { len, expected } => {
                write!(f, "length {len} bytes, expected {expected}")
            }
            SnapshotError::BadMagic => f.write_str("not a podrouter NAT snapshot (bad magic)"),
            SnapshotError::Version(v) => {
                write!(f, "unsupported version {v} (this build reads {VERSION})")
            }
            SnapshotError::EntrySize(n) => write!(f, "entry size {n}, expected {ENTRY_LEN}"),
            SnapshotError::TooMany { count, max } => {
                write!(f, "{count} entries, more than nat.max_entries {max}")
            }
            SnapshotError::Checksum => f.write_str("checksum mismatch (torn or corrupted file)"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// What [`load`] did with the entries of an accepted snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub restored: usize,
    /// Entries whose time ran out while no process held the table.
    pub expired: usize,
    /// Pod address not inside the node's pod CIDRs.
    pub outside_cidrs: usize,
    /// Node port outside the masquerade range.
    pub port_range: usize,
    /// Same flow or reply key as an earlier entry (or one already in the table).
    pub duplicate: usize,
    /// Unknown protocol, state, family or flag, nonzero reserved bytes, a state of another
    /// protocol, a zero TTL.
    pub invalid: usize,
    /// The table (or the pod's share of it) was full.
    pub full: usize,
}

impl LoadReport {
    /// Entries not restored for a defect (expired ones are not defects).
    pub fn rejected(&self) -> usize {
        self.outside_cidrs + self.port_range + self.duplicate + self.invalid + self.full
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn addr_at<A: SnapAddr>(b: &[u8], at: usize) -> Option<A> {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    A::from16(w)
}

/// Checks the header, length and checksum; returns the entry count and the write's wall-clock
/// second.
pub fn check_header(b: &[u8], max_entries: usize) -> Result<(usize, u64), SnapshotError> {
    if b.len() < HEADER_LEN {
        return Err(SnapshotError::Length {
            len: b.len(),
            expected: HEADER_LEN,
        });
    }
    if b[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let esize = u32_at(b, 12);
    if esize as usize != ENTRY_LEN {
        return Err(SnapshotError::EntrySize(esize));
    }
    let count = u64_at(b, 16);
    if count > max_entries as u64 {
        return Err(SnapshotError::TooMany {
            count,
            max: max_entries,
        });
    }
    let count = count as usize;
    if b.len() != file_len(count) {
        return Err(SnapshotError::Length {
            len: b.len(),
            expected: file_len(count),
        });
    }
    if u64_at(b, CSUM_AT) != checksum(b) || u64_at(b, 32) != 0 {
        return Err(SnapshotError::Checksum);
    }
    Ok((count, u64_at(b, 24)))
}

/// One entry, structurally: `None` for an unknown code or a nonzero reserved field.
fn decode_entry<A: SnapAddr>(e: &[u8]) -> Option<NatRecord<A>> {
    let proto = proto_of(e[0])?;
    let state = state_of(e[1])?;
    if e[3] != A::FAMILY || e[42..44] != [0, 0] {
        return None;
    }
    Some(NatRecord {
        key: FlowKey {
            proto,
            pod_ip: addr_at(e, 4)?,
            pod_port: u16_at(e, 36),
            remote_ip: addr_at(e, 20)?,
            remote_port: u16_at(e, 38),
        },
        node_port: u16_at(e, 40),
        state,
        ttl: u32_at(e, 44),
        lo: u32_at(e, 48),
        hi: u32_at(e, 52),
        flags: e[2],
    })
}

/// Restores the snapshot `b` into `table` (normally empty, before the workers start) at the
/// table's second `now`, wall-clock second `wall_now`: every entry loses the seconds that passed
/// since the write. Pod addresses must lie inside `pod_cidrs`; ports inside the table's range.
/// IPv6 entries are refused (`invalid`); [`load_both`] restores them.
pub fn load(
    b: &[u8],
    pod_cidrs: &[Cidr],
    table: &mut NatTable,
    now: u64,
    wall_now: u64,
) -> Result<LoadReport, SnapshotError> {
    load_both(b, pod_cidrs, table, None, now, wall_now)
}

/// [`load`] into both tables: IPv4 entries into `table`, IPv6 entries into `table6` (without
/// one, IPv6 entries are `invalid`). The entry count may reach both tables' `max_entries`.
pub fn load_both(
    b: &[u8],
    pod_cidrs: &[Cidr],
    table: &mut NatTable,
    mut table6: Option<&mut NatTable6>,
    now: u64,
    wall_now: u64,
) -> Result<LoadReport, SnapshotError> {
    let max = table.config().max_entries + table6.as_ref().map_or(0, |t| t.config().max_entries);
    let (count, written) = check_header(b, max)?;
    let elapsed = wall_now.saturating_sub(written);
    let mut rep = LoadReport::default();
    for e in b[HEADER_LEN..].chunks_exact(ENTRY_LEN).take(count) {
        match (e[3], table6.as_deref_mut()) {
            (6, Some(t6)) => restore_entry::<Ipv6Addr>(e, pod_cidrs, t6, now, elapsed, &mut rep),
            _ => restore_entry::<Ipv4Addr>(e, pod_cidrs, table, now, elapsed, &mut rep),
        }
    }
    Ok(rep)
}

fn restore_entry<A: SnapAddr>(
    e: &[u8],
    pod_cidrs: &[Cidr],
    table: &mut NatTable<A>,
    now: u64,
    elapsed: u64,
    rep: &mut LoadReport,
) {
    let Some(mut r) = decode_entry::<A>(e) else {
        rep.invalid += 1;
        return;
    };
    if !pod_cidrs.iter().any(|c| c.contains(r.key.pod_ip.ip())) {
        rep.outside_cidrs += 1;
        return;
    }
    if u64::from(r.ttl) <= elapsed {
        if r.ttl == 0 {
            rep.invalid += 1;
        } else {
            rep.expired += 1;
        }
        return;
    }
    r.ttl -= elapsed as u32;
    match table.restore(&r, now) {
        Ok(()) => rep.restored += 1,
        Err(RestoreError::PortRange) => rep.port_range += 1,
        Err(RestoreError::Duplicate) => rep.duplicate += 1,
        Err(RestoreError::Full) => rep.full += 1,
        Err(RestoreError::Invalid) => rep.invalid += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nat::NatConfig;

    mod tcp_flag {
        pub const SYN: u8 = 0x02;
        pub const ACK: u8 = 0x10;
    }

    fn cidr(s: &str, len: u8) -> Cidr {
        Cidr::new(s.parse().unwrap(), len).unwrap()
    }

    fn key(i: u32) -> FlowKey {
        FlowKey {
            proto: NatProto::Tcp,
            pod_ip: Ipv4Addr::from(0x0a00_0100 + (i % 200)),
            pod_port: 10000 + (i % 50000) as u16,
            remote_ip: Ipv4Addr::new(192, 0, 2, 7),
            remote_port: 443,
        }
    }

    fn table(seed: u64) -> NatTable {
        NatTable::new(NatConfig {
            seed,
            ..NatConfig::default()
        })
    }

    fn filled(n: u32) -> NatTable {
        let mut t = table(1);
        for i in 0..n {
            t.egress(&key(i), tcp_flag::SYN, 5).unwrap();
            if i % 2 == 0 {
                let k = key(i);
                let p = t.lookup(&k, 5).unwrap();
                t.ingress(
                    k.proto,
                    k.remote_ip,
                    k.remote_port,
                    p,
                    tcp_flag::SYN | tcp_flag::ACK,
                    6,
                )
                .unwrap();
            }
        }
        t
    }

    #[test]
    fn ipv6_entries_round_trip_next_to_ipv4_ones() {
        let key6 = |i: u16| FlowKey {
            proto: NatProto::Udp,
            pod_ip: "fd00:10:244:1::7".parse::<Ipv6Addr>().unwrap(),
            pod_port: 2000 + i,
            remote_ip: "2001:db8::53".parse::<Ipv6Addr>().unwrap(),
            remote_port: 53,
        };
        let old4 = filled(20);
        let mut old6 = NatTable::new_v6(NatConfig {
            seed: 3,
            ..NatConfig::default()
        });
        for i in 0..30 {
            old6.egress(&key6(i), 0, 5).unwrap();
        }
        let mut snap = Vec::new();
        encode_both_into(&old4.export(10), &old6.export(10), 1000, &mut snap);
        assert_eq!(snap.len(), file_len(50));
        let cidrs = [cidr("10.0.1.0", 24), cidr("fd00:10:244:1::", 64)];
        let (mut new4, mut new6) = (table(7), NatTable::new_v6(NatConfig::default()));
        let rep = load_both(&snap, &cidrs, &mut new4, Some(&mut new6), 0, 1001).unwrap();
        assert_eq!((rep.restored, rep.rejected()), (50, 0), "{rep:?}");
        assert_eq!((new4.len(), new6.len()), (20, 30));
        for i in 0..30 {
            let (a, b) = (
                old6.get(&key6(i), 10).unwrap(),
                new6.get(&key6(i), 0).unwrap(),
            );
            assert_eq!((a.node_port, a.state), (b.node_port, b.state));
        }
        // An IPv6 pod outside the pod CIDRs is refused; an IPv4-only load counts IPv6 as invalid.
        let mut other = NatTable::new_v6(NatConfig::default());
        let rep = load_both(&snap, &cidrs[..1], &mut table(1), Some(&mut other), 0, 1001).unwrap();
        assert_eq!((rep.restored, rep.outside_cidrs), (20, 30));
        let rep = load(&snap, &cidrs, &mut table(1), 0, 1001).unwrap();
        assert_eq!((rep.restored, rep.invalid), (20, 30));
        // An IPv4-mapped address written with family 6 is not an IPv6 key.
        let mut bad = snap.clone();
        let at = HEADER_LEN + 20 * ENTRY_LEN;
        bad[at + 4..at + 20].copy_from_slice(&Ipv4Addr::new(10, 0, 1, 9).to_ipv6_mapped().octets());
        let c = checksum(&bad);
        bad[CSUM_AT..CSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
        let mut t6 = NatTable::new_v6(NatConfig::default());
        let rep = load_both(&bad, &cidrs, &mut table(1), Some(&mut t6), 0, 1001).unwrap();
        assert_eq!((rep.restored, rep.invalid), (49, 1));
    }

    #[test]
    fn round_trip_keeps_ports_across_seeds() {
        let old = filled(500);
        let snap = encode(&old.export(10), 1000);
        let mut new = table(0xdead_beef);
        let rep = load(&snap, &[cidr("10.0.1.0", 24)], &mut new, 0, 1001).unwrap();
        assert_eq!(rep.restored, 500);
        assert_eq!(rep.rejected(), 0);
        for i in 0..500 {
            let k = key(i);
            let a = old.get(&k, 10).unwrap();
            let b = new.get(&k, 0).unwrap();
            assert_eq!(a.node_port, b.node_port);
            assert_eq!(a.state, b.state);
            // One second of downtime taken off.
            assert_eq!(b.expires, a.expires - 10 - 1);
            // The reply direction works in the new table.
            assert_eq!(
                new.lookup_reverse(k.proto, k.remote_ip, k.remote_port, a.node_port, 0),
                Some(k)
            );
        }
        // A new flow cannot take a restored port towards the same remote endpoint.
        let mut new2 = new.clone();
        for i in 500..900 {
            let p = new2.egress(&key(i), tcp_flag::SYN, 1).unwrap();
            let owner = new2
                .lookup_reverse(NatProto::Tcp, Ipv4Addr::new(192, 0, 2, 7), 443, p, 1)
                .unwrap();
            assert_eq!(owner, key(i));
        }
    }

    #[test]
    fn whole_file_refusals() {
        let snap = encode(&filled(10).export(5), 1);
        let cidrs = [cidr("10.0.0.0", 8)];
        let mut t = table(2);
        let mut bad = snap.clone();
        bad[0] ^= 1;
        assert_eq!(
            load(&bad, &cidrs, &mut t, 0, 1),
            Err(SnapshotError::BadMagic)
        );
        let mut bad = snap.clone();
        bad[8] = 2;
        assert_eq!(
            load(&bad, &cidrs, &mut t, 0, 1),
            Err(SnapshotError::Version(2))
        );
        let mut bad = snap.clone();
        bad[100] ^= 0x40;
        assert_eq!(
            load(&bad, &cidrs, &mut t, 0, 1),
            Err(SnapshotError::Checksum)
        );
        let bad = &snap[..snap.len() - 1];
        assert!(matches!(
            load(bad, &cidrs, &mut t, 0, 1),
            Err(SnapshotError::Length { .. })
        ));
        let mut small = NatTable::new(NatConfig {
            max_entries: 5,
            max_entries_per_pod: 5,
            ..NatConfig::default()
        });
        assert!(matches!(
            load(&snap, &cidrs, &mut small, 0, 1),
            Err(SnapshotError::TooMany { count: 10, max: 5 })
        ));
        assert!(t.is_empty() && small.is_empty());
    }

    #[test]
    fn entry_refusals_are_counted() {
        let mut recs = filled(4).export(5);
        recs.sort_by_key(|r| r.key);
        let mut extra = recs[0];
        extra.key.pod_ip = Ipv4Addr::new(10, 9, 0, 1); // outside 10.0.1.0/24
        recs.push(extra);
        let mut dup = recs[1];
        dup.key.pod_port ^= 1; // same reply key (remote + node port), another flow
        recs.push(dup);
        recs.push(recs[2]); // the same flow twice
        let mut port = recs[3];
        port.key.pod_port = 1;
        port.node_port = 1000;
        recs.push(port);
        let mut gone = recs[0];
        gone.key.pod_port = 2;
        gone.node_port = 61000;
        gone.ttl = 3;
        recs.push(gone);
        let mut bad_flags = recs[0];
        bad_flags.key.pod_port = 3;
        bad_flags.flags = 0x80;
        recs.push(bad_flags);
        let mut snap = encode(&recs, 100);
        let mut t = table(3);
        let rep = load(&snap, &[cidr("10.0.1.0", 24)], &mut t, 0, 105).unwrap();
        assert_eq!(
            rep,
            LoadReport {
                restored: 4,
                expired: 1,
                outside_cidrs: 1,
                port_range: 1,
                duplicate: 2,
                invalid: 1,
                full: 0,
            }
        );
        // An unknown state code (checksum fixed up): invalid, not a panic.
        snap[HEADER_LEN + 1] = 99;
        let c = checksum(&snap);
        snap[CSUM_AT..CSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
        let rep = load(&snap, &[cidr("10.0.1.0", 24)], &mut table(3), 0, 105).unwrap();
        assert_eq!(rep.invalid, 2);
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let snap = encode(&filled(20).export(5), 1);
        let cidrs = [cidr("0.0.0.0", 0)];
        let mut x: u64 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let mut b = snap.clone();
            match round % 3 {
                0 => {
                    let n = (next() % 8) as usize + 1;
                    for _ in 0..n {
                        let i = (next() as usize) % b.len();
                        b[i] = next() as u8;
                    }
                    // Half the time make the checksum match, so entry decoding is exercised.
                    if round % 2 == 0 && b.len() >= HEADER_LEN {
                        let c = checksum(&b);
                        b[CSUM_AT..CSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
                    }
                }
                1 => b.truncate((next() as usize) % (b.len() + 1)),
                _ => {
                    b = (0..(next() % 300) as usize).map(|_| next() as u8).collect();
                }
            }
            let mut t = table(round);
            if let Ok(rep) = load(&b, &cidrs, &mut t, 0, 2) {
                assert_eq!(rep.restored, t.len());
            }
        }
    }
}
