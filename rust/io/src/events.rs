//! The monitor's event ring: which packets were dropped (and, on request, a sample of forwarded
//! ones), for `podrouter monitor`.
//!
//! A fixed-size, lock-free ring written by every worker and read by one consumer (the daemon's
//! monitor thread). Nothing is recorded unless a subscriber turned the ring on: a drop point then
//! pays one relaxed load of a flag. While it is on, events are rate-limited (at most `rate` a
//! second; the rest are counted as suppressed), so a flood of bad input cannot make the monitor
//! cost more than a bounded amount of work.
//!
//! Each slot is a small seqlock made of atomics only (no `unsafe`): a writer claims an index with a
//! `fetch_add` on `head`, marks the slot odd (being written), stores the event words and marks it
//! even with its index. The reader checks the mark before and after copying a slot and skips slots
//! that were overwritten or torn, counting them as lost. Two writers on the same slot at once need
//! the ring to wrap during one write, which the rate limit rules out; even then a reader can only
//! see a garbled event, never undefined behaviour.

use podrouter_core::{DropReason, Path, TunnelProto};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::time::{SystemTime, UNIX_EPOCH};

/// Slots in the ring (a power of two).
pub const RING_SLOTS: usize = 4096;
const WORDS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Drop = 0,
    Flow = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Egress = 0,
    Ingress = 1,
}

/// One event: a dropped packet (with its reason) or a sampled forwarded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    /// Index into the engine's drop reason names (drops only).
    pub reason: u16,
    /// The path, when known.
    pub path: Option<Path>,
    pub dir: Direction,
    /// 4 or 6 for a parsed IP header, 0 when the bytes are not one.
    pub family: u8,
    /// IP protocol number (0 when unknown).
    pub proto: u8,
    /// IPv4 addresses are in the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Bytes of the packet as seen at the drop point.
    pub len: u32,
    /// For packets that arrived over a tunnel from an IPv4 underlay address: the sender's address
    /// and port (the event ring has no room for an IPv6 one; such events carry `None`).
    pub outer: Option<(Ipv4Addr, u16)>,
    /// Unix time in nanoseconds.
    pub time_ns: u64,
}

impl Event {
    fn blank(kind: Kind, dir: Direction) -> Event {
        Event {
            kind,
            reason: 0,
            path: None,
            dir,
            family: 0,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            len: 0,
            outer: None,
            time_ns: 0,
        }
    }

    /// An event about the IP packet `pkt` (addresses, protocol and ports parsed where the bytes
    /// allow; nothing is trusted and nothing panics).
    pub fn ip(kind: Kind, dir: Direction, pkt: &[u8]) -> Event {
        let mut e = Event::blank(kind, dir);
        e.len = pkt.len().min(u32::MAX as usize) as u32;
        e.fill_ip(pkt);
        e
    }

    /// A drop of a tunnel datagram (`dg` is the UDP payload) from `outer` arriving at our `port`:
    /// the inner packet's addresses where the header lets us find them, else the outer ones.
    pub fn tunnel(
        reason: DropReason,
        proto: TunnelProto,
        outer: (IpAddr, u16),
        node: IpAddr,
        port: u16,
        dg: &[u8],
    ) -> Event {
        let mut e = Event::blank(Kind::Drop, Direction::Ingress);
        e.reason = reason.index() as u16;
        e.path = Some(Path::tunnel(proto));
        e.outer = match outer.0 {
            IpAddr::V4(a) => Some((a, outer.1)),
            IpAddr::V6(_) => None,
        };
        e.len = dg.len().min(u32::MAX as usize) as u32;
        let inner = match proto {
            TunnelProto::Vxlan => dg.get(8 + 14..),
            TunnelProto::Geneve => dg
                .first()
                .and_then(|b| dg.get(8 + usize::from(b & 0x3f) * 4..)),
        };
        if !inner.is_some_and(|p| e.fill_ip(p)) {
            e.proto = 17;
            match outer.0 {
                IpAddr::V4(a) => {
                    e.family = 4;
                    e.src[..4].copy_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    e.family = 6;
                    e.src.copy_from_slice(&a.octets());
                }
            }
            match node {
                IpAddr::V4(a) => e.dst[..4].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => e.dst.copy_from_slice(&a.octets()),
            }
            e.sport = outer.1;
            e.dport = port;
        }
        e
    }

    fn fill_ip(&mut self, pkt: &[u8]) -> bool {
        let (l4, rest) = match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 => {
                let ihl = usize::from(pkt[0] & 0x0f) * 4;
                self.family = 4;
                self.proto = pkt[9];
                self.src[..4].copy_from_slice(&pkt[12..16]);
                self.dst[..4].copy_from_slice(&pkt[16..20]);
                let first_fragment = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff == 0;
                (first_fragment && ihl >= 20, pkt.get(ihl..))
            }
            Some(6) if pkt.len() >= 40 => {
                self.family = 6;
                self.proto = pkt[6];
                self.src.copy_from_slice(&pkt[8..24]);
                self.dst.copy_from_slice(&pkt[24..40]);
                (true, pkt.get(40..))
            }
            _ => return false,
        };
        // TCP, UDP, SCTP, UDP-Lite: ports lead the transport header
        if l4 && matches!(self.proto, 6 | 17 | 132 | 136) {
            if let Some(p) = rest.and_then(|r| r.get(..4)) {
                self.sport = u16::from_be_bytes([p[0], p[1]]);
                self.dport = u16::from_be_bytes([p[2], p[3]]);
            }
        }
        true
    }

    fn encode(&self) -> [u64; WORDS] {
        let path = self.path.map_or(u64::from(u8::MAX), |p| p.index() as u64);
        let (outer_ip, outer_port) = self.outer.map_or((0, 0), |(a, p)| (u32::from(a), p));
        [
            self.kind as u64
                | u64::from(self.reason) << 8
                | path << 24
                | (self.dir as u64) << 32
                | u64::from(self.family) << 40
                | u64::from(self.proto) << 48
                | u64::from(self.outer.is_some()) << 56,
            u64::from(self.sport) | u64::from(self.dport) << 16 | u64::from(self.len) << 32,
            u64::from_be_bytes(self.src[..8].try_into().unwrap_or_default()),
            u64::from_be_bytes(self.src[8..].try_into().unwrap_or_default()),
            u64::from_be_bytes(self.dst[..8].try_into().unwrap_or_default()),
            u64::from_be_bytes(self.dst[8..].try_into().unwrap_or_default()),
            u64::from(outer_ip) | u64::from(outer_port) << 32,
            self.time_ns,
        ]
    }

    fn decode(w: &[u64; WORDS]) -> Event {
        let path_idx = ((w[0] >> 24) & 0xff) as usize;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..8].copy_from_slice(&w[2].to_be_bytes());
        src[8..].copy_from_slice(&w[3].to_be_bytes());
        dst[..8].copy_from_slice(&w[4].to_be_bytes());
        dst[8..].copy_from_slice(&w[5].to_be_bytes());
        Event {
            kind: if w[0] & 0xff == 1 {
                Kind::Flow
            } else {
                Kind::Drop
            },
            reason: ((w[0] >> 8) & 0xffff) as u16,
            path: Path::ALL.get(path_idx).copied(),
            dir: if (w[0] >> 32) & 0xff == 1 {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            family: ((w[0] >> 40) & 0xff) as u8,
            proto: ((w[0] >> 48) & 0xff) as u8,
            src,
            dst,
            sport: (w[1] & 0xffff) as u16,
            dport: ((w[1] >> 16) & 0xffff) as u16,
            len: (w[1] >> 32) as u32,
            outer: ((w[0] >> 56) & 1 == 1).then(|| {
                (
                    Ipv4Addr::from((w[6] & 0xffff_ffff) as u32),
                    (w[6] >> 32) as u16,
                )
            }),
            time_ns: w[7],
        }
    }
}

struct Slot {
    seq: AtomicU64,
    words: [AtomicU64; WORDS],
}

/// What the reader saw since the ring was turned on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Events over the rate limit, never recorded.
    pub suppressed: u64,
    /// Events overwritten before the reader got to them.
    pub lost: u64,
}

pub struct EventRing {
    slots: Box<[Slot]>,
    head: AtomicU64,
    tail: AtomicU64,
    enabled: AtomicBool,
    flows: AtomicBool,
    /// Record one forwarded packet in `sample` (flows).
    sample: AtomicU64,
    forwarded: AtomicU64,
    rate: AtomicU32,
    window: AtomicU64,
    in_window: AtomicU32,
    suppressed: AtomicU64,
    lost: AtomicU64,
}

impl Default for EventRing {
    fn default() -> Self {
        EventRing::new()
    }
}

impl EventRing {
    pub fn new() -> EventRing {
        EventRing {
            slots: (0..RING_SLOTS)
                .map(|_| Slot {
                    seq: AtomicU64::new(0),
                    words: Default::default(),
                })
                .collect(),
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            flows: AtomicBool::new(false),
            sample: AtomicU64::new(100),
            forwarded: AtomicU64::new(0),
            rate: AtomicU32::new(1000),
            window: AtomicU64::new(0),
            in_window: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// Turns recording on (drops; forwarded flows too when `flows`, one packet in `sample`), at
    /// most `rate` events a second. The reader starts at the current head: nothing older is read.
    pub fn enable(&self, flows: bool, sample: u64, rate: u32) {
        self.sample.store(sample.max(1), Relaxed);
        self.rate.store(rate.max(1), Relaxed);
        self.tail.store(self.head.load(Acquire), Relaxed);
        self.suppressed.store(0, Relaxed);
        self.lost.store(0, Relaxed);
        self.flows.store(flows, Relaxed);
        self.enabled.store(true, Release);
    }

    pub fn disable(&self) {
        self.enabled.store(false, Relaxed);
        self.flows.store(false, Relaxed);
    }

    /// The one check a drop point pays when nobody listens.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    /// Whether this forwarded packet is one of the sampled flows (only when flows are on).
    #[inline]
    pub fn sample_flow(&self) -> bool {
        self.flows.load(Relaxed)
            && self.forwarded.fetch_add(1, Relaxed) % self.sample.load(Relaxed).max(1) == 0
    }

    fn admit(&self, now_s: u64) -> bool {
        let w = self.window.load(Relaxed);
        if w != now_s
            && self
                .window
                .compare_exchange(w, now_s, Relaxed, Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Relaxed);
        }
        if self.in_window.fetch_add(1, Relaxed) >= self.rate.load(Relaxed) {
            self.suppressed.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    /// Records an event (stamped with the current time) if the ring is on and the rate allows.
    pub fn push(&self, mut e: Event) {
        if !self.enabled() {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if !self.admit(now.as_secs()) {
            return;
        }
        e.time_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let i = self.head.fetch_add(1, Relaxed);
        let slot = &self.slots[(i as usize) & (RING_SLOTS - 1)];
        slot.seq.store(2 * i + 1, Relaxed);
        fence(Release);
        for (w, v) in slot.words.iter().zip(e.encode()) {
            w.store(v, Relaxed);
        }
        slot.seq.store(2 * i + 2, Release);
    }

    /// Moves up to `max` events into `out` (single reader).
    pub fn drain(&self, max: usize, out: &mut Vec<Event>) {
        let head = self.head.load(Acquire);
        let mut tail = self.tail.load(Relaxed);
        let mut lost = 0;
        if head.saturating_sub(tail) > RING_SLOTS as u64 {
            lost += head - tail - RING_SLOTS as u64;
            tail = head - RING_SLOTS as u64;
        }
        let mut taken = 0;
        while tail < head && taken < max {
            let slot = &self.slots[(tail as usize) & (RING_SLOTS - 1)];
            let want = 2 * tail + 2;
            let s1 = slot.seq.load(Acquire);
            if s1 < want {
                break; // claimed but still being written: next time
            }
            let mut words = [0u64; WORDS];
            for (d, w) in words.iter_mut().zip(&slot.words) {
                *d = w.load(Relaxed);
            }
            fence(Acquire);
            let s2 = slot.seq.load(Relaxed);
            tail += 1;
            if s1 != want || s2 != want {
                lost += 1; // overwritten by a later lap
                continue;
            }
            out.push(Event::decode(&words));
            taken += 1;
        }
        self.tail.store(tail, Relaxed);
        self.lost.fetch_add(lost, Relaxed);
    }

    pub fn stats(&self) -> RingStats {
        RingStats {
            suppressed: self.suppressed.load(Relaxed),
            lost: self.lost.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4() -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 244, 1, 5]);
        p[16..20].copy_from_slice(&[10, 244, 2, 7]);
        p[20..24].copy_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        p
    }

    #[test]
    fn nothing_is_recorded_while_off() {
        let r = EventRing::new();
        r.push(Event::ip(Kind::Drop, Direction::Egress, &udp4()));
        assert!(!r.sample_flow());
        let mut out = Vec::new();
        r.drain(10, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn round_trip_and_rate_limit() {
        let r = EventRing::new();
        r.enable(false, 1, 3);
        for _ in 0..5 {
            let mut e = Event::ip(Kind::Drop, Direction::Egress, &udp4());
            e.reason = 7;
            e.path = Some(Path::Vxlan);
            r.push(e);
        }
        let mut out = Vec::new();
        r.drain(10, &mut out);
        // the same second: 3 admitted, 2 suppressed (a second boundary may admit more)
        assert!((3..=5).contains(&out.len()));
        let e = out[0];
        assert_eq!(
            (e.kind, e.reason, e.path, e.family, e.proto),
            (Kind::Drop, 7, Some(Path::Vxlan), 4, 17)
        );
        assert_eq!(
            (&e.src[..4], &e.dst[..4], e.sport, e.dport),
            (&[10, 244, 1, 5][..], &[10, 244, 2, 7][..], 12345, 53)
        );
        assert!(e.time_ns > 0);
        assert_eq!(r.stats().suppressed as usize + out.len(), 5);
    }

    #[test]
    fn overrun_counts_lost_events() {
        let r = EventRing::new();
        r.enable(true, 1, u32::MAX);
        for _ in 0..RING_SLOTS + 10 {
            r.push(Event::ip(Kind::Flow, Direction::Ingress, &udp4()));
        }
        let mut out = Vec::new();
        r.drain(usize::MAX, &mut out);
        assert_eq!(out.len(), RING_SLOTS);
        assert_eq!(r.stats().lost, 10);
        assert!(r.sample_flow());
    }

    #[test]
    fn tunnel_drops_fall_back_to_outer_addresses() {
        let peer4 = (Ipv4Addr::new(172, 16, 2, 1), 40000);
        let peer = (IpAddr::V4(peer4.0), peer4.1);
        let node = IpAddr::V4(Ipv4Addr::new(172, 16, 2, 2));
        let e = Event::tunnel(
            DropReason::Truncated,
            TunnelProto::Vxlan,
            peer,
            node,
            4789,
            &[8, 0, 0],
        );
        assert_eq!((e.family, e.proto, e.sport, e.dport), (4, 17, 40000, 4789));
        assert_eq!(
            (&e.src[..4], &e.dst[..4]),
            (&[172, 16, 2, 1][..], &[172, 16, 2, 2][..])
        );
        let mut dg = vec![0u8; 22];
        dg.extend(udp4());
        let e = Event::tunnel(
            DropReason::UnknownPeer,
            TunnelProto::Vxlan,
            peer,
            node,
            4789,
            &dg,
        );
        assert_eq!(
            (&e.src[..4], e.dport, e.outer),
            (&[10, 244, 1, 5][..], 53, Some(peer4))
        );
        // An IPv6 underlay: the fallback addresses are the outer IPv6 ones; no `outer` (v4 only).
        let p6: IpAddr = "2001:db8::1".parse().unwrap();
        let n6: IpAddr = "2001:db8::2".parse().unwrap();
        let e = Event::tunnel(
            DropReason::Truncated,
            TunnelProto::Geneve,
            (p6, 40000),
            n6,
            6081,
            &[],
        );
        assert_eq!((e.family, e.proto, e.outer), (6, 17, None));
        assert_eq!((IpAddr::from(e.src), IpAddr::from(e.dst)), (p6, n6));
        // garbage never panics
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 0x40) as u8).collect();
            let _ = Event::ip(Kind::Drop, Direction::Egress, &junk);
            let _ = Event::tunnel(
                DropReason::Malformed,
                TunnelProto::Geneve,
                peer,
                node,
                6081,
                &junk,
            );
        }
    }
}
