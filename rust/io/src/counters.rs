//! Per-worker counters: packets and bytes per (path, direction), drops per reason, offload
//! statistics, and the Geneve options received by (class, type).
//!
//! Geneve options come from the underlay, so their (class, type) keys are attacker-chosen: each
//! worker keeps the first [`GENEVE_OPTION_SLOTS`] distinct keys it sees and counts every later one
//! as "other", and the sum over workers is cut to the same bound, so the metric's label set never
//! grows past it.
//!
//! Each worker owns one cache-line-aligned block and is its only writer, so an increment is a
//! relaxed load + store (no locked read-modify-write on the packet path); readers (`counters()` from
//! Python) sum the blocks with relaxed loads and may see a batch half-applied, which is fine for
//! monotonic metrics. Packets are counted as wire packets: a GSO super-packet counts once per segment.

pub use podrouter_core::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Distinct Geneve option (class, type) keys counted by name; the rest count as "other".
pub const GENEVE_OPTION_SLOTS: usize = 16;

/// The `direction` label values, in index order.
pub const DIRECTIONS: [&str; 2] = ["egress", "ingress"];
const N_PATHS: usize = Path::ALL.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Egress = 0,
    Ingress = 1,
}

/// Offload and I/O statistics (the `offload` dict of `Datapath.counters()`), in index order.
pub const STATS: [&str; 14] = [
    "tun_reads",
    "tun_gso_reads",
    "tun_writes",
    "tun_gso_writes",
    "tun_coalesced_segments",
    "udp_rx_messages",
    "udp_rx_gro_messages",
    "udp_tx_calls",
    "udp_tx_gso_messages",
    "packet_tx_calls",
    "packet_tx_gso_frames",
    "batches",
    "tap_gso_writes",
    "udp_rx_whole_gso",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    TunReads = 0,
    TunGsoReads,
    TunWrites,
    TunGsoWrites,
    TunCoalescedSegments,
    UdpRxMessages,
    UdpRxGroMessages,
    UdpTxCalls,
    UdpTxGsoMessages,
    PacketTxCalls,
    PacketTxGsoFrames,
    Batches,
    /// Whole encapsulated super-packets written to the UDP-tunnel GSO TAP.
    TapGsoWrites,
    /// Received datagrams that were one whole super-packet (a peer's UDP-tunnel GSO).
    UdpRxWholeGso,
}

#[repr(align(64))]
#[derive(Debug)]
pub struct WorkerCounters {
    packets: [AtomicU64; N_PATHS * 2],
    bytes: [AtomicU64; N_PATHS * 2],
    stats: [AtomicU64; STATS.len()],
    drops: Box<[AtomicU64]>,
    /// 0 = free, else `1 << 24 | class << 8 | type`.
    geneve_opt_keys: [AtomicU32; GENEVE_OPTION_SLOTS],
    geneve_opt_counts: [AtomicU64; GENEVE_OPTION_SLOTS],
    geneve_opt_other: AtomicU64,
}

const fn option_key(class: u16, opt_type: u8) -> u32 {
    1 << 24 | (class as u32) << 8 | opt_type as u32
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    // Single writer per block: a plain load/store pair is enough and avoids a locked instruction.
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

impl WorkerCounters {
    pub fn new(drop_reasons: usize) -> WorkerCounters {
        WorkerCounters {
            packets: Default::default(),
            bytes: Default::default(),
            stats: Default::default(),
            drops: (0..drop_reasons).map(|_| AtomicU64::new(0)).collect(),
            geneve_opt_keys: Default::default(),
            geneve_opt_counts: Default::default(),
            geneve_opt_other: AtomicU64::new(0),
        }
    }

    /// One Geneve option of `class` / `opt_type` received (delivered or not).
    #[inline]
    pub fn geneve_option(&self, class: u16, opt_type: u8) {
        let key = option_key(class, opt_type);
        for (k, n) in self.geneve_opt_keys.iter().zip(&self.geneve_opt_counts) {
            match k.load(Relaxed) {
                0 => {
                    // single writer: claim the free slot, then count
                    k.store(key, Relaxed);
                    bump(n, 1);
                    return;
                }
                x if x == key => {
                    bump(n, 1);
                    return;
                }
                _ => {}
            }
        }
        bump(&self.geneve_opt_other, 1);
    }

    #[inline]
    pub fn count(&self, path: Path, dir: Dir, packets: u64, bytes: u64) {
        let i = path.index() * 2 + dir as usize;
        bump(&self.packets[i], packets);
        bump(&self.bytes[i], bytes);
    }

    #[inline]
    pub fn drop_packets(&self, reason: usize, packets: u64) {
        if let Some(c) = self.drops.get(reason) {
            bump(c, packets);
        }
    }

    #[inline]
    pub fn stat(&self, s: Stat, n: u64) {
        bump(&self.stats[s as usize], n);
    }
}

/// The sum over all workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `[path][direction]`
    pub packets: [[u64; 2]; N_PATHS],
    pub bytes: [[u64; 2]; N_PATHS],
    /// Indexed like the engine's drop reason names.
    pub drops: Vec<u64>,
    /// Indexed like [`STATS`].
    pub stats: [u64; STATS.len()],
    /// Geneve options received: `(class, type, count)`, at most [`GENEVE_OPTION_SLOTS`] keys,
    /// sorted by key.
    pub geneve_options: Vec<(u16, u8, u64)>,
    /// Geneve options whose key did not get a slot.
    pub geneve_options_other: u64,
}

impl Snapshot {
    pub fn sum<'a>(
        blocks: impl IntoIterator<Item = &'a WorkerCounters>,
        drop_reasons: usize,
    ) -> Snapshot {
        let mut s = Snapshot {
            drops: vec![0; drop_reasons],
            ..Snapshot::default()
        };
        for b in blocks {
            for i in 0..N_PATHS * 2 {
                s.packets[i / 2][i % 2] += b.packets[i].load(Relaxed);
                s.bytes[i / 2][i % 2] += b.bytes[i].load(Relaxed);
            }
            for (d, c) in s.drops.iter_mut().zip(b.drops.iter()) {
                *d += c.load(Relaxed);
            }
            for (d, c) in s.stats.iter_mut().zip(b.stats.iter()) {
                *d += c.load(Relaxed);
            }
            s.geneve_options_other += b.geneve_opt_other.load(Relaxed);
            for (k, n) in b.geneve_opt_keys.iter().zip(&b.geneve_opt_counts) {
                let (k, n) = (k.load(Relaxed), n.load(Relaxed));
                if k == 0 {
                    break;
                }
                let (class, opt_type) = ((k >> 8) as u16, k as u8);
                let full = s.geneve_options.len() >= GENEVE_OPTION_SLOTS;
                match s
                    .geneve_options
                    .iter_mut()
                    .find(|(c, t, _)| (*c, *t) == (class, opt_type))
                {
                    Some(e) => e.2 += n,
                    None if full => s.geneve_options_other += n,
                    None => s.geneve_options.push((class, opt_type, n)),
                }
            }
        }
        s.geneve_options.sort_unstable();
        s
    }

    pub fn get(&self, path: Path, dir: Dir) -> (u64, u64) {
        (
            self.packets[path.index()][dir as usize],
            self.bytes[path.index()][dir as usize],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_workers() {
        let a = WorkerCounters::new(3);
        let b = WorkerCounters::new(3);
        a.count(Path::Vxlan, Dir::Egress, 2, 3000);
        b.count(Path::Vxlan, Dir::Egress, 1, 100);
        b.count(Path::Native, Dir::Ingress, 1, 60);
        a.drop_packets(1, 5);
        b.drop_packets(1, 1);
        b.drop_packets(99, 1); // out of range: ignored, not a panic
        a.stat(Stat::TunGsoReads, 4);
        let s = Snapshot::sum([&a, &b], 3);
        assert_eq!(s.get(Path::Vxlan, Dir::Egress), (3, 3100));
        assert_eq!(s.get(Path::Native, Dir::Ingress), (1, 60));
        assert_eq!(s.get(Path::Geneve, Dir::Egress), (0, 0));
        assert_eq!(s.drops, vec![0, 6, 0]);
        assert_eq!(s.stats[Stat::TunGsoReads as usize], 4);
        assert_eq!(std::mem::align_of::<WorkerCounters>(), 64);
        assert!(s.geneve_options.is_empty() && s.geneve_options_other == 0);
    }

    #[test]
    fn geneve_options_are_bounded() {
        let a = WorkerCounters::new(0);
        let b = WorkerCounters::new(0);
        a.geneve_option(0x0102, 0x03);
        a.geneve_option(0x0102, 0x03);
        b.geneve_option(0x0102, 0x03);
        b.geneve_option(0xffff, 0x80);
        let s = Snapshot::sum([&a, &b], 0);
        assert_eq!(s.geneve_options, vec![(0x0102, 0x03, 3), (0xffff, 0x80, 1)]);
        assert_eq!(s.geneve_options_other, 0);
        // a flood of distinct keys: the first GENEVE_OPTION_SLOTS per worker, the rest "other"
        for i in 0..100u16 {
            a.geneve_option(i, 1);
            b.geneve_option(1000 + i, 1);
        }
        let s = Snapshot::sum([&a, &b], 0);
        assert_eq!(s.geneve_options.len(), GENEVE_OPTION_SLOTS);
        let named: u64 = s.geneve_options.iter().map(|e| e.2).sum();
        assert_eq!(named + s.geneve_options_other, 4 + 200);
        assert!(s.geneve_options.contains(&(0x0102, 0x03, 3)));
    }
}
