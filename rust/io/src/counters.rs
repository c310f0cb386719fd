//! Per-worker counters: packets and bytes per (path, direction), drops per reason, and offload
//! statistics.
//!
//! Each worker owns one cache-line-aligned block and is its only writer, so an increment is a
//! relaxed load + store (no locked read-modify-write on the packet path); readers (`counters()` from
//! Python) sum the blocks with relaxed loads and may see a batch half-applied, which is fine for
//! monotonic metrics. Packets are counted as wire packets: a GSO super-packet counts once per segment.

pub use podrouter_core::classify::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The `direction` label values, in index order.
pub const DIRECTIONS: [&str; 2] = ["egress", "ingress"];
const N_PATHS: usize = Path::ALL.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Egress = 0,
    Ingress = 1,
}

/// Offload and I/O statistics (the `offload` dict of `Datapath.counters()`), in index order.
pub const STATS: [&str; 12] = [
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
}

#[repr(align(64))]
#[derive(Debug)]
pub struct WorkerCounters {
    packets: [AtomicU64; N_PATHS * 2],
    bytes: [AtomicU64; N_PATHS * 2],
    stats: [AtomicU64; STATS.len()],
    drops: Box<[AtomicU64]>,
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
        }
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
        }
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
    }
}
