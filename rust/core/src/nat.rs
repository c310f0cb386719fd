//! Masquerade: source NAT of pod traffic to the node address, as pure logic over a table and a
//! byte buffer. No clock: every call takes `now` in seconds (any monotonic epoch).
//!
//! # Mapping
//!
//! The mapping is endpoint-dependent (RFC 4787 §4.1 "address and port-dependent"): the key is the
//! whole flow `(protocol, pod ip, pod port, remote ip, remote port)` and the reverse key is
//! `(protocol, remote ip, remote port, node port)`. One node port can therefore be in use towards
//! many remote endpoints at once, so the capacity of the port range `[lo, hi]` applies per remote
//! endpoint, as with Linux's `MASQUERADE`. For ICMP echo the identifier plays the pod port and the
//! remote port is 0.
//!
//! A new flow's node port starts at a seeded hash of the flow and probes upwards (wrapping in the
//! range) for at most [`NatConfig::max_probe`] ports; a port held by an entry that has expired but
//! not been swept yet is reclaimed on the way, and so, for a new TCP connection (a SYN), is one
//! held by a reset mapping (CLOSE). No such port: a SYN takes over a TIME-WAIT mapping's port
//! towards the same endpoint, as Linux's SNAT does; otherwise [`NatError::Exhausted`] and
//! existing flows are untouched.
//!
//! # Timeouts
//!
//! Entries expire `timeout(state)` seconds after their last packet; the defaults follow Linux
//! conntrack (`nf_conntrack_tcp_timeout_*`, `nf_conntrack_udp_timeout*`, `nf_conntrack_icmp_timeout`)
//! except TCP established: Linux keeps 5 days (432000 s), which on a busy node pins ports of
//! peers that vanished without a FIN for days; podrouter uses 7440 s (2 h 4 min), the RFC 5382
//! REQ-5 minimum for an established TCP mapping (2 h idle + the 4 min of keep-alive probes), so a
//! flow that keeps TCP keep-alives on survives. The TCP tracker is deliberately coarse (no window
//! tracking of the pod's side): SYN -> `SynSent`; SYN+ACK from the remote -> `Established`; a FIN
//! -> `FinWait`; FINs from both sides -> `TimeWait`; an RST -> `Close`. A SYN on a closed mapping
//! reopens it. UDP is `Unreplied` until the remote answers, then `Assured`.
//!
//! # A pod is an untrusted tenant
//!
//! * Only a packet that opens a flow creates a mapping: a TCP SYN without ACK or RST, a UDP
//!   datagram, an ICMP echo request. Any other TCP segment of an unknown flow (a bare ACK, an RST,
//!   a FIN) is refused with [`NatError::NoMapping`] (`nat_no_mapping`), as Linux does with
//!   `nf_conntrack_tcp_loose = 0`: a pod cannot fill the table with mid-stream garbage.
//! * A pod (a source address) holds at most [`NatConfig::max_entries_per_pod`] entries; a new flow
//!   beyond that is refused with [`NatError::PodLimit`] (`nat_pod_limit`, also counted per pod
//!   address in [`NatTable::pod_limit_drops`]).
//! * When the table is full, the oldest entry that never saw a reply is evicted to make room
//!   (a queue in creation order, [`NatTable::evictions`]), so a flood of unanswered flows cannot
//!   lock other pods out; only when every entry has been answered is a new flow refused
//!   ([`NatError::TableFull`]).
//! * A reply RST closes a mapping only if its sequence number is plausible (RFC 5961 §3 style,
//!   as a middlebox can check it): once the remote's SYN+ACK was seen, within [`RST_WINDOW`] of
//!   the span from the pod's last acknowledgement to the remote's next sequence number, both
//!   tracked from the segments that pass; before that, only an RST whose ACK acknowledges the
//!   pod's SYN (RFC 9293 §3.10.7.3). Anything else is refused with
//!   [`NatError::RstOutOfWindow`] (`nat_rst_out_of_window`) and the mapping is left as it was.
//! * The hash seed ([`NatConfig::seed`]) picks every new flow's first node port; the I/O engine
//!   draws it from the kernel's random source per process, so node ports are not predictable
//!   and flows cannot be chosen to collide.
//!
//! An expired entry is invisible to every lookup at once. Its memory is reclaimed either by a
//! lookup that meets it or by [`NatTable::expire`], a sweep bounded by a budget per call so that
//! the datapath can call it between batches without a latency spike.
//!
//! # Memory
//!
//! Two hash maps with [`FxBuildHasher`] (a seeded multiply-rotate hash written here, no
//! dependency): flow -> (port, state, expiry) inline, so an egress hit touches one bucket, and
//! reply key -> flow. A flat slab of keys with a free list gives the sweep something to walk in
//! bounded steps. [`NatTable::bytes_per_entry`] reports the measured cost (about 100 bytes at 1M
//! entries).
//!
//! # Packet rewriting
//!
//! [`translate_egress`] and [`translate_ingress`] parse an IPv4 packet with [`wire::parse_ip`],
//! consult the table and patch addresses, ports / identifiers and every checksum incrementally
//! (RFC 1624), including the header and transport quoted inside ICMP errors (RFC 5508 §7,
//! RFC 5382 REQ-9 / RFC 4787 REQ-14: errors must be translated for the flows they belong to).
//! Fragments are refused (`unsupported`): a later fragment carries no ports to translate, and
//! podrouter does not reassemble.
//!
//! # IPv6
//!
//! The table is generic over the address family ([`NatAddr`]): [`NatTable`] / [`FlowKey`] default
//! to IPv4, [`NatTable6`] / [`FlowKey6`] are the IPv6 forms, one table (one node port pool) per
//! family, every rule above shared. [`translate_egress_v6`] and [`translate_ingress_v6`] are the
//! IPv6 packet rewriters: no header checksum, but TCP, UDP and ICMPv6 checksums all cover the
//! 128-bit addresses through the pseudo-header, and ICMPv6 errors (RFC 4443) quoting a translated
//! packet are restored like ICMP ones.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::drop::DropReason;
use crate::wire::{self, checksum, ip_proto, ipv4, L4Info};

const FX_K: u64 = 0xf135_7aea_2e62_a9c5;

/// A small, fast, seeded hasher for fixed-size integer keys (FxHash's multiply-rotate step, with a
/// folded 128-bit multiply on `finish` so that both the low bits hashbrown indexes with and the
/// high bits it tags with are well mixed).
#[derive(Debug, Clone, Copy, Default)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        let m = u128::from(self.hash) * u128::from(FX_K);
        (m as u64) ^ ((m >> 64) as u64)
    }
}

/// Builds [`FxHasher`]s starting from a seed (pick it at random per process so that remote
/// parties cannot aim at one hash chain or predict node ports).
#[derive(Debug, Clone, Copy, Default)]
pub struct FxBuildHasher {
    pub seed: u64,
}

impl BuildHasher for FxBuildHasher {
    type Hasher = FxHasher;
    #[inline]
    fn build_hasher(&self) -> FxHasher {
        FxHasher { hash: self.seed }
    }
}

/// A `HashMap` with [`FxBuildHasher`].
pub type FxHashMap<K, V> = HashMap<K, V, FxBuildHasher>;

/// An address family the table can key on: [`Ipv4Addr`] (the default everywhere) or
/// [`Ipv6Addr`]. Each family has its own [`NatTable`] (and so its own node port pool); the IPv4
/// instantiation hashes exactly as before the table became generic, so its hot path is unchanged.
pub trait NatAddr: Copy + Eq + Ord + Hash + fmt::Debug + Send + Sync + 'static {
    /// Feeds the address and `low` (bits below `shift`, which the IPv4 form packs into one word
    /// with the address) to `state`.
    fn hash_with<H: Hasher>(self, shift: u32, low: u64, state: &mut H);
}

impl NatAddr for Ipv4Addr {
    #[inline]
    fn hash_with<H: Hasher>(self, shift: u32, low: u64, state: &mut H) {
        state.write_u64(u64::from(u32::from(self)) << shift | low);
    }
}

impl NatAddr for Ipv6Addr {
    /// Both halves separately (folding them first would let a pod pick remote addresses that
    /// collide whatever the seed), then the low word.
    #[inline]
    fn hash_with<H: Hasher>(self, _shift: u32, low: u64, state: &mut H) {
        let a = u128::from(self);
        state.write_u64((a >> 64) as u64);
        state.write_u64(a as u64);
        state.write_u64(low);
    }
}

/// The transports podrouter translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum NatProto {
    Tcp = 1,
    Udp = 2,
    /// ICMP echo (the identifier is the port).
    Icmp = 3,
}

impl NatProto {
    /// From an IP protocol number.
    pub const fn from_ip_proto(p: u8) -> Option<Self> {
        match p {
            ip_proto::TCP => Some(NatProto::Tcp),
            ip_proto::UDP => Some(NatProto::Udp),
            ip_proto::ICMP => Some(NatProto::Icmp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub const fn ip_proto(self) -> u8 {
        match self {
            NatProto::Tcp => ip_proto::TCP,
            NatProto::Udp => ip_proto::UDP,
            NatProto::Icmp => ip_proto::ICMP,
        }
    }
}

/// A flow as the pod sent it (the forward key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey<A: NatAddr = Ipv4Addr> {
    pub proto: NatProto,
    pub pod_ip: A,
    /// Source port, or the ICMP echo identifier.
    pub pod_port: u16,
    pub remote_ip: A,
    /// Destination port, 0 for ICMP.
    pub remote_port: u16,
}

/// A [`FlowKey`] of the IPv6 table.
pub type FlowKey6 = FlowKey<Ipv6Addr>;

impl<A: NatAddr> Hash for FlowKey<A> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.pod_ip.hash_with(
            32,
            u64::from(self.pod_port) << 16 | self.proto as u64,
            state,
        );
        self.remote_ip
            .hash_with(16, u64::from(self.remote_port), state);
    }
}

/// The reverse key: what a reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RevKey<A: NatAddr> {
    proto: NatProto,
    remote_ip: A,
    remote_port: u16,
    node_port: u16,
}

impl<A: NatAddr> Hash for RevKey<A> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.remote_ip.hash_with(
            32,
            u64::from(self.remote_port) << 16 | u64::from(self.node_port),
            state,
        );
        state.write_u8(self.proto as u8);
    }
}

impl<A: NatAddr> RevKey<A> {
    fn of(key: &FlowKey<A>, node_port: u16) -> Self {
        RevKey {
            proto: key.proto,
            remote_ip: key.remote_ip,
            remote_port: key.remote_port,
            node_port,
        }
    }
}

/// Connection-tracking state of a mapping; it selects the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatState {
    TcpSynSent,
    TcpEstablished,
    TcpFinWait,
    TcpTimeWait,
    TcpClose,
    UdpUnreplied,
    UdpAssured,
    Icmp,
}

/// Which way a packet travels relative to the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Pod to remote (egress).
    Orig,
    /// Remote to pod (a reply).
    Reply,
}

/// A FIN was seen from the pod.
const FIN_ORIG: u8 = 1;
/// A FIN was seen from the remote.
const FIN_REPLY: u8 = 2;
/// Both FIN bits.
const FINS: u8 = FIN_ORIG | FIN_REPLY;
/// The mapping has seen a reply (it is no eviction candidate any more).
const REPLIED: u8 = 4;
/// The mapping is in the eviction queue (used to drop duplicates when the queue is compacted).
const QUEUED: u8 = 8;
/// TCP: the remote's SYN+ACK was seen, `lo..hi` track the remote's sequence space (else the
/// pod's: `hi` is the next sequence number after the pod's SYN).
const SYNCED: u8 = 16;

/// How far (in sequence numbers) outside the tracked span a reply RST may lie and still close
/// the mapping: the largest window without scaling (RFC 7323), as RFC 5961 §3 measures a blind
/// attacker's odds (about 1 in 32768 per guess).
pub const RST_WINDOW: u32 = 65535;

/// True if `x` lies in the wrapping range `[lo, hi]` of sequence numbers.
#[inline]
fn seq_in(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) <= hi.wrapping_sub(lo)
}

/// True if `a` comes after `b` in sequence space (RFC 9293 §3.4 comparisons).
#[inline]
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// What the table needs of a packet: the TCP flags and, for TCP, sequence and acknowledgement
/// numbers and the payload length (UDP and ICMP: all zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seg {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes.
    pub len: u32,
}

impl Seg {
    /// A segment with these flags and sequence / acknowledgement numbers 0 and no payload.
    pub const fn flags(flags: u8) -> Seg {
        Seg {
            flags,
            seq: 0,
            ack: 0,
            len: 0,
        }
    }

    /// The sequence number after this segment (SYN and FIN count one each).
    pub fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(u32::from(self.flags & tcp_flag::SYN != 0))
            .wrapping_add(u32::from(self.flags & tcp_flag::FIN != 0))
    }
}

/// True if a packet with `tcp_flags` may create a mapping of `proto`: a TCP SYN without ACK or
/// RST, any UDP datagram, an ICMP echo request (the translator only passes requests).
pub const fn opens_flow(proto: NatProto, tcp_flags: u8) -> bool {
    match proto {
        NatProto::Tcp => {
            tcp_flags & (tcp_flag::SYN | tcp_flag::ACK | tcp_flag::RST) == tcp_flag::SYN
        }
        NatProto::Udp | NatProto::Icmp => true,
    }
}

/// TCP flag bits (RFC 9293 §3.1).
mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The state after a packet with `tcp_flags` travelling `dir`, given the current state and FIN
/// bits (`None` for a new mapping, which is always created by an `Orig` packet). Public so the
/// model in the property tests can be checked against the documented rules.
pub fn next_state(
    proto: NatProto,
    cur: Option<(NatState, u8)>,
    dir: Dir,
    tcp_flags: u8,
) -> (NatState, u8) {
    use NatState::*;
    match proto {
        NatProto::Icmp => (Icmp, 0),
        NatProto::Udp => match (cur, dir) {
            (_, Dir::Reply) | (Some((UdpAssured, _)), _) => (UdpAssured, 0),
            _ => (UdpUnreplied, 0),
        },
        NatProto::Tcp => {
            let syn = tcp_flags & tcp_flag::SYN != 0;
            let ack = tcp_flags & tcp_flag::ACK != 0;
            let fin = tcp_flags & tcp_flag::FIN != 0;
            let rst = tcp_flags & tcp_flag::RST != 0;
            let fin_bit = match dir {
                Dir::Orig => FIN_ORIG,
                Dir::Reply => FIN_REPLY,
            };
            let Some((state, fins)) = cur else {
                return if rst {
                    (TcpClose, 0)
                } else if syn && !ack {
                    (TcpSynSent, 0)
                } else if fin {
                    (TcpFinWait, fin_bit)
                } else {
                    (TcpEstablished, 0)
                };
            };
            if rst {
                return (TcpClose, fins);
            }
            match state {
                TcpSynSent if dir == Dir::Reply && syn && ack => (TcpEstablished, 0),
                TcpEstablished | TcpSynSent if fin => (TcpFinWait, fins | fin_bit),
                TcpFinWait if fin => {
                    let fins = fins | fin_bit;
                    if fins == FIN_ORIG | FIN_REPLY {
                        (TcpTimeWait, fins)
                    } else {
                        (TcpFinWait, fins)
                    }
                }
                TcpTimeWait | TcpClose if dir == Dir::Orig && syn && !ack => (TcpSynSent, 0),
                s => (s, fins),
            }
        }
    }
}

/// Table limits and timeouts (seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// First node port (inclusive).
    pub port_lo: u16,
    /// Last node port (inclusive).
    pub port_hi: u16,
    /// Upper bound on live + not-yet-swept entries (memory bound).
    pub max_entries: usize,
    /// Upper bound on the entries one pod (source address) holds.
    pub max_entries_per_pod: usize,
    /// Ports tried per new flow before giving up.
    pub max_probe: u32,
    /// Hash seed (allocation start and map hashing). The default is a constant for tests; the
    /// I/O engine replaces it with a random one per process.
    pub seed: u64,
    pub tcp_syn_sent: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp_unreplied: u32,
    pub udp_assured: u32,
    pub icmp: u32,
}

/// The default masquerade port range (`masquerade.port_range`), above the tunnel senders' source
/// ports ([`crate::encap::SOURCE_PORT_MAX`]) and Linux's default ephemeral range.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (61000, 65535);

/// The default size of the translation table (`masquerade.max_entries`).
pub const DEFAULT_MAX_ENTRIES: usize = 1 << 20;

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            port_lo: DEFAULT_PORT_RANGE.0,
            port_hi: DEFAULT_PORT_RANGE.1,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_entries_per_pod: DEFAULT_MAX_ENTRIES / 8,
            max_probe: 256,
            seed: 0x243f_6a88_85a3_08d3,
            tcp_syn_sent: 120,
            tcp_established: 7440,
            tcp_fin_wait: 120,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp_unreplied: 30,
            udp_assured: 120,
            icmp: 30,
        }
    }
}

impl NatConfig {
    /// The per-pod cap used when only `max_entries` is configured: an eighth of the table (so at
    /// least eight pods can be at their cap together), at least 64, at most the table.
    pub fn default_per_pod(max_entries: usize) -> usize {
        (max_entries / 8).max(64).min(max_entries)
    }

    /// The timeouts in seconds by their configuration key (`masquerade.timeouts.<key>`), in
    /// declaration order.
    pub fn timeouts(&self) -> [(&'static str, u32); 8] {
        [
            ("tcp_syn_sent", self.tcp_syn_sent),
            ("tcp_established", self.tcp_established),
            ("tcp_fin_wait", self.tcp_fin_wait),
            ("tcp_time_wait", self.tcp_time_wait),
            ("tcp_close", self.tcp_close),
            ("udp_unreplied", self.udp_unreplied),
            ("udp_assured", self.udp_assured),
            ("icmp", self.icmp),
        ]
    }

    /// The timeout of `state`.
    pub fn timeout(&self, state: NatState) -> u32 {
        match state {
            NatState::TcpSynSent => self.tcp_syn_sent,
            NatState::TcpEstablished => self.tcp_established,
            NatState::TcpFinWait => self.tcp_fin_wait,
            NatState::TcpTimeWait => self.tcp_time_wait,
            NatState::TcpClose => self.tcp_close,
            NatState::UdpUnreplied => self.udp_unreplied,
            NatState::UdpAssured => self.udp_assured,
            NatState::Icmp => self.icmp,
        }
    }
}

/// Why a new flow could not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatError {
    /// No free node port towards this remote endpoint within `max_probe` tries.
    Exhausted,
    /// `max_entries` reached.
    TableFull,
    /// The configured port range is empty (`lo > hi`).
    BadConfig,
    /// No live mapping, and the packet cannot open one (a TCP segment other than a SYN), or a
    /// reply that matches no mapping.
    NoMapping,
    /// The pod holds `max_entries_per_pod` entries already.
    PodLimit,
    /// A reply RST outside the connection's window.
    RstOutOfWindow,
}

impl fmt::Display for NatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatError::Exhausted => "no free masquerade port for this remote endpoint",
            NatError::TableFull => "masquerade table full",
            NatError::BadConfig => "empty masquerade port range",
            NatError::NoMapping => "no masquerade mapping and the packet cannot open one",
            NatError::PodLimit => "the pod holds its maximum of masquerade entries",
            NatError::RstOutOfWindow => "reset outside the connection's window",
        })
    }
}

impl std::error::Error for NatError {}

impl From<NatError> for DropReason {
    fn from(e: NatError) -> Self {
        match e {
            NatError::Exhausted | NatError::TableFull | NatError::BadConfig => {
                DropReason::NatExhausted
            }
            NatError::NoMapping => DropReason::NatNoMapping,
            NatError::PodLimit => DropReason::NatPodLimit,
            NatError::RstOutOfWindow => DropReason::NatRstOutOfWindow,
        }
    }
}

/// A mapping as [`NatTable::get`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatEntry<A: NatAddr = Ipv4Addr> {
    pub key: FlowKey<A>,
    pub node_port: u16,
    pub state: NatState,
    /// The entry is dead from this second on.
    pub expires: u64,
}

/// A live mapping as [`NatTable::export`] hands it out and [`NatTable::restore`] takes it back:
/// everything needed to rebuild it in another process (the NAT snapshot, `nat_snapshot.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatRecord<A: NatAddr = Ipv4Addr> {
    pub key: FlowKey<A>,
    pub node_port: u16,
    pub state: NatState,
    /// Seconds the mapping has left to live (at least 1).
    pub ttl: u32,
    /// TCP sequence tracking (see `Hot`), carried as is.
    pub lo: u32,
    pub hi: u32,
    /// [`NatRecord::FLAGS`] bits only.
    pub flags: u8,
}

impl<A: NatAddr> NatRecord<A> {
    /// The flag bits a record may carry: FIN from the pod (1), FIN from the remote (2), replied
    /// (4), remote sequence space tracked (16).
    pub const FLAGS: u8 = RECORD_FLAGS;
}

/// [`NatRecord::FLAGS`], for either family.
const RECORD_FLAGS: u8 = FINS | REPLIED | SYNCED;

/// Why [`NatTable::restore`] refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestoreError {
    /// The node port is outside the configured range.
    PortRange,
    /// The flow, or its reply key (remote endpoint + node port), is held already.
    Duplicate,
    /// `max_entries` or the pod's `max_entries_per_pod` reached.
    Full,
    /// Unknown flag bits, a zero TTL, or a state of another protocol.
    Invalid,
}

/// What a forward lookup needs, stored inline in the forward map so that a hit costs one cache
/// miss (the bucket) rather than two (bucket, then slab).
#[derive(Debug, Clone, Copy)]
struct Hot {
    expires: u64,
    /// Index of the key in the slab (for the sweep).
    id: u32,
    /// TCP sequence tracking (see `SYNCED`): the lower and upper end of the span a reply RST is
    /// measured against.
    lo: u32,
    hi: u32,
    node_port: u16,
    state: NatState,
    /// `FIN_ORIG`, `FIN_REPLY`, `REPLIED`, `QUEUED`, `SYNCED`.
    bits: u8,
}

impl Hot {
    /// A packet of the live flow `proto` went `dir`: step the state machine, track sequence
    /// numbers and restart the timeout of the state it lands in.
    fn advance(&mut self, proto: NatProto, dir: Dir, seg: &Seg, now: u64, cfg: &NatConfig) {
        let (state, fins) = next_state(proto, Some((self.state, self.bits & FINS)), dir, seg.flags);
        if proto == NatProto::Tcp {
            self.track(dir, seg, state);
        }
        if dir == Dir::Reply {
            self.bits |= REPLIED;
        }
        self.state = state;
        self.bits = (self.bits & !FINS) | fins;
        self.expires = now + u64::from(cfg.timeout(state));
    }

    /// TCP sequence tracking for a segment that takes the mapping to `next`. A pod SYN that
    /// (re)opens the connection starts over in the pod's space; the remote's SYN+ACK switches to
    /// the remote's space; after that the pod's acknowledgements raise `lo` and the remote's
    /// segments `hi`, but only from inside the window (a blindly spoofed segment cannot move it).
    fn track(&mut self, dir: Dir, seg: &Seg, next: NatState) {
        let syn = seg.flags & tcp_flag::SYN != 0;
        let ack = seg.flags & tcp_flag::ACK != 0;
        let synced = self.bits & SYNCED != 0;
        match dir {
            Dir::Orig if next == NatState::TcpSynSent && syn && !ack => {
                self.lo = seg.end();
                self.hi = self.lo;
                self.bits &= !SYNCED;
            }
            Dir::Orig if synced && ack && self.in_window(seg.ack) => {
                if seq_after(seg.ack, self.lo) {
                    self.lo = seg.ack;
                }
                if seq_after(seg.ack, self.hi) {
                    self.hi = seg.ack;
                }
            }
            Dir::Reply if !synced && syn && ack && seg.flags & tcp_flag::RST == 0 => {
                self.lo = seg.end();
                self.hi = self.lo;
                self.bits |= SYNCED;
            }
            Dir::Reply if synced && self.in_window(seg.seq) => {
                let end = seg.end();
                if seq_after(end, self.hi) {
                    self.hi = end;
                }
            }
            _ => {}
        }
    }

    /// `x` within `RST_WINDOW` of the tracked span.
    fn in_window(&self, x: u32) -> bool {
        seq_in(
            x,
            self.lo.wrapping_sub(RST_WINDOW),
            self.hi.wrapping_add(RST_WINDOW),
        )
    }

    /// Whether a reply RST `seg` may act on this TCP mapping.
    fn rst_acceptable(&self, seg: &Seg) -> bool {
        if self.bits & SYNCED != 0 {
            self.in_window(seg.seq)
        } else {
            seg.flags & tcp_flag::ACK != 0 && seq_in(seg.ack, self.lo, self.hi)
        }
    }
}

/// The masquerade table. See the module docs.
///
/// * `fwd`: flow -> `Hot` (port, state, expiry): egress and lookups touch only this;
/// * `rev`: reply key -> flow: a reply costs this bucket plus the flow's `fwd` bucket;
/// * `slab`: every flow once, in a flat `Vec` with a free list, so [`NatTable::expire`] can walk
///   the table a bounded number of slots at a time (a hash map cannot be resumed mid-iteration);
/// * `pods`: entries held per pod address (the per-pod cap);
/// * `unreplied`: flows in creation order, the eviction candidates (stale items are skipped when
///   met and dropped when the queue is compacted, at twice the table's size).
#[derive(Debug, Clone)]
pub struct NatTable<A: NatAddr = Ipv4Addr> {
    cfg: NatConfig,
    fwd: FxHashMap<FlowKey<A>, Hot>,
    rev: FxHashMap<RevKey<A>, FlowKey<A>>,
    slab: Vec<Option<FlowKey<A>>>,
    free: Vec<u32>,
    cursor: usize,
    pods: FxHashMap<A, u32>,
    unreplied: VecDeque<FlowKey<A>>,
    /// The second of the last on-demand sweep (at most one per second).
    reclaimed_at: Option<u64>,
    pod_limit_drops: FxHashMap<A, u64>,
    pod_limit_other: u64,
    evictions: u64,
    /// Bumped by every change (an entry added, removed or advanced), under the table's lock, so
    /// the snapshot writer can tell whether the table changed since its last write.
    generation: u64,
}

/// Pod addresses [`NatTable::pod_limit_drops`] counts one by one; later ones share one counter.
pub const MAX_TRACKED_PODS: usize = 1024;

/// Queue items [`NatTable`] examines per eviction before giving up.
const EVICT_SCAN: usize = 4096;

/// The IPv6 masquerade table (its own node port pool).
pub type NatTable6 = NatTable<Ipv6Addr>;

impl NatTable {
    /// An empty IPv4 table.
    pub fn new(cfg: NatConfig) -> Self {
        Self::with_capacity(cfg, 0)
    }

    /// An empty IPv4 table with room for `n` entries before any reallocation (growing a map of a
    /// million entries rehashes it, which takes milliseconds; reserving avoids that stall).
    pub fn with_capacity(cfg: NatConfig, n: usize) -> Self {
        Self::build(cfg, n)
    }
}

impl NatTable6 {
    /// An empty IPv6 table.
    pub fn new_v6(cfg: NatConfig) -> Self {
        Self::build(cfg, 0)
    }

    /// [`NatTable::with_capacity`] for IPv6.
    pub fn with_capacity_v6(cfg: NatConfig, n: usize) -> Self {
        Self::build(cfg, n)
    }
}

impl<A: NatAddr> NatTable<A> {
    fn build(cfg: NatConfig, n: usize) -> Self {
        let h = FxBuildHasher { seed: cfg.seed };
        NatTable {
            fwd: HashMap::with_capacity_and_hasher(n, h),
            // A different seed: the two maps must not share collision patterns.
            rev: HashMap::with_capacity_and_hasher(
                n,
                FxBuildHasher {
                    seed: cfg.seed.rotate_left(32) ^ FX_K,
                },
            ),
            slab: Vec::with_capacity(n),
            free: Vec::new(),
            cursor: 0,
            pods: HashMap::with_hasher(FxBuildHasher {
                seed: cfg.seed ^ 0x9e37_79b9_7f4a_7c15,
            }),
            unreplied: VecDeque::new(),
            reclaimed_at: None,
            pod_limit_drops: HashMap::with_hasher(FxBuildHasher {
                seed: cfg.seed ^ 0x6a09_e667_f3bc_c908,
            }),
            pod_limit_other: 0,
            evictions: 0,
            generation: 0,
            cfg,
        }
    }

    /// Entries (live or not yet swept) held by `pod`.
    pub fn pod_entries(&self, pod: A) -> usize {
        self.pods.get(&pod).map_or(0, |&n| n as usize)
    }

    /// New flows refused with [`NatError::PodLimit`], per pod address (at most
    /// [`MAX_TRACKED_PODS`] addresses, highest count first), and the count of all other pods.
    pub fn pod_limit_drops(&self) -> (Vec<(A, u64)>, u64) {
        let mut v: Vec<(A, u64)> = self.pod_limit_drops.iter().map(|(&a, &n)| (a, n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        (v, self.pod_limit_other)
    }

    /// Entries evicted because the table was full (oldest never-answered first).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    fn count_pod_limit(&mut self, pod: A) {
        let a = pod;
        let full = self.pod_limit_drops.len() >= MAX_TRACKED_PODS;
        match self.pod_limit_drops.get_mut(&a) {
            Some(n) => *n += 1,
            None if full => self.pod_limit_other += 1,
            None => {
                self.pod_limit_drops.insert(a, 1);
            }
        }
    }

    /// A bounded sweep on demand (a full table or a pod at its cap may be full of dead entries),
    /// at most once per second so that a pod hammering its cap cannot make every packet pay it.
    fn reclaim(&mut self, now: u64) {
        if self.reclaimed_at != Some(now) {
            self.reclaimed_at = Some(now);
            self.expire(now, 256);
        }
    }

    /// Frees one entry because the table is full: the oldest that never saw a reply (or is
    /// dead). False if none was found within `EVICT_SCAN` queue items.
    fn evict(&mut self, now: u64) -> bool {
        for _ in 0..EVICT_SCAN {
            let Some(k) = self.unreplied.pop_front() else {
                return false;
            };
            if let Some(h) = self.fwd.get(&k) {
                if h.bits & REPLIED == 0 || h.expires <= now {
                    self.remove(&k);
                    self.evictions += 1;
                    return true;
                }
            }
        }
        false
    }

    /// Keeps, once each, the queue items that are still eviction candidates.
    fn compact_queue(&mut self) {
        let fwd = &mut self.fwd;
        self.unreplied.retain(|k| match fwd.get_mut(k) {
            Some(h) if h.bits & (REPLIED | QUEUED) == QUEUED => {
                h.bits &= !QUEUED;
                true
            }
            _ => false,
        });
        for k in &self.unreplied {
            if let Some(h) = fwd.get_mut(k) {
                h.bits |= QUEUED;
            }
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    /// Entries held, including expired ones not yet reclaimed (`podrouter_nat_entries`).
    pub fn len(&self) -> usize {
        self.fwd.len()
    }

    /// True if no entry is held.
    pub fn is_empty(&self) -> bool {
        self.fwd.is_empty()
    }

    fn timeout(&self, s: NatState) -> u64 {
        u64::from(self.cfg.timeout(s))
    }

    fn remove(&mut self, key: &FlowKey<A>) {
        if let Some(h) = self.fwd.remove(key) {
            self.generation = self.generation.wrapping_add(1);
            self.rev.remove(&RevKey::of(key, h.node_port));
            let pod = key.pod_ip;
            if let Some(n) = self.pods.get_mut(&pod) {
                *n -= 1;
                if *n == 0 {
                    self.pods.remove(&pod);
                }
            }
            if let Some(slot) = self.slab.get_mut(h.id as usize) {
                *slot = None;
                self.free.push(h.id);
            }
        }
    }

    /// The live mapping of `key`, if any.
    pub fn get(&self, key: &FlowKey<A>, now: u64) -> Option<NatEntry<A>> {
        let h = self.fwd.get(key)?;
        (h.expires > now).then_some(NatEntry {
            key: *key,
            node_port: h.node_port,
            state: h.state,
            expires: h.expires,
        })
    }

    /// The node port of a live mapping (no state change).
    #[inline]
    pub fn lookup(&self, key: &FlowKey<A>, now: u64) -> Option<u16> {
        let h = self.fwd.get(key)?;
        (h.expires > now).then_some(h.node_port)
    }

    /// The flow a reply belongs to (no state change): ICMP errors use this.
    #[inline]
    pub fn lookup_reverse(
        &self,
        proto: NatProto,
        remote_ip: A,
        remote_port: u16,
        node_port: u16,
        now: u64,
    ) -> Option<FlowKey<A>> {
        let key = self.reply_flow(proto, remote_ip, remote_port, node_port)?;
        self.lookup(&key, now).map(|_| key)
    }

    /// The flow the reverse map names for a reply, live or not.
    #[inline]
    fn reply_flow(
        &self,
        proto: NatProto,
        remote_ip: A,
        remote_port: u16,
        node_port: u16,
    ) -> Option<FlowKey<A>> {
        let rk = RevKey {
            proto,
            remote_ip,
            remote_port,
            node_port,
        };
        self.rev.get(&rk).copied()
    }

    /// [`NatTable::egress_seg`] for a packet with `tcp_flags` and sequence numbers 0.
    pub fn egress(&mut self, key: &FlowKey<A>, tcp_flags: u8, now: u64) -> Result<u16, NatError> {
        self.egress_seg(key, &Seg::flags(tcp_flags), now)
    }

    /// A pod packet of flow `key`: returns the node port to use, creating the mapping if the
    /// packet may open one (see [`opens_flow`]; the pod is under its cap; the table has room or
    /// an unanswered entry to evict), and advances the flow's state and expiry.
    pub fn egress_seg(&mut self, key: &FlowKey<A>, seg: &Seg, now: u64) -> Result<u16, NatError> {
        if let Some(h) = self.fwd.get_mut(key) {
            if h.expires > now {
                h.advance(key.proto, Dir::Orig, seg, now, &self.cfg);
                self.generation = self.generation.wrapping_add(1);
                return Ok(h.node_port);
            }
            self.remove(key);
        }
        if !opens_flow(key.proto, seg.flags) {
            return Err(NatError::NoMapping);
        }
        if self.pod_entries(key.pod_ip) >= self.cfg.max_entries_per_pod {
            self.reclaim(now);
            if self.pod_entries(key.pod_ip) >= self.cfg.max_entries_per_pod {
                self.count_pod_limit(key.pod_ip);
                return Err(NatError::PodLimit);
            }
        }
        if self.len() >= self.cfg.max_entries {
            // Reclaim a little before evicting: the table may be full of dead entries.
            self.reclaim(now);
            if self.len() >= self.cfg.max_entries && !self.evict(now) {
                return Err(NatError::TableFull);
            }
        }
        let node_port = self.allocate(key, seg.flags, now)?;
        let (state, fins) = next_state(key.proto, None, Dir::Orig, seg.flags);
        let id = self.slot(key);
        let mut hot = Hot {
            expires: now + self.timeout(state),
            id,
            lo: 0,
            hi: 0,
            node_port,
            state,
            bits: fins | QUEUED,
        };
        if key.proto == NatProto::Tcp {
            hot.track(Dir::Orig, seg, state);
        }
        self.insert(key, hot);
        if self.unreplied.len() > 2 * self.fwd.len() + 64 {
            self.compact_queue();
        }
        Ok(node_port)
    }

    /// A slab slot holding `key`.
    fn slot(&mut self, key: &FlowKey<A>) -> u32 {
        match self.free.pop() {
            Some(id) => {
                self.slab[id as usize] = Some(*key);
                id
            }
            None => {
                self.slab.push(Some(*key));
                (self.slab.len() - 1) as u32
            }
        }
    }

    /// Adds a new entry (its slab slot taken already) to both maps, the pod count and, while
    /// unanswered, the eviction queue.
    fn insert(&mut self, key: &FlowKey<A>, hot: Hot) {
        self.fwd.insert(*key, hot);
        self.rev.insert(RevKey::of(key, hot.node_port), *key);
        *self.pods.entry(key.pod_ip).or_insert(0) += 1;
        if hot.bits & QUEUED != 0 {
            self.unreplied.push_back(*key);
        }
        self.generation = self.generation.wrapping_add(1);
    }

    /// Changes so far (see the field); equal values mean an unchanged table.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every live mapping (expired ones left out), in no particular order.
    pub fn export(&self, now: u64) -> Vec<NatRecord<A>> {
        let mut v = Vec::with_capacity(self.len());
        self.export_into(now, &mut v);
        v
    }

    /// [`NatTable::export`] into `out` (cleared first): reusing its allocation keeps page faults
    /// out of the time the caller holds the table's lock.
    pub fn export_into(&self, now: u64, out: &mut Vec<NatRecord<A>>) {
        out.clear();
        out.reserve(self.len());
        out.extend(
            self.fwd
                .iter()
                .filter(|(_, h)| h.expires > now)
                .map(|(k, h)| NatRecord {
                    key: *k,
                    node_port: h.node_port,
                    state: h.state,
                    ttl: u32::try_from(h.expires - now).unwrap_or(u32::MAX),
                    lo: h.lo,
                    hi: h.hi,
                    flags: h.bits & RECORD_FLAGS,
                }),
        );
    }

    /// Adds a mapping exported by another table (another process). Everything in `r` is checked
    /// against this table's configuration and contents; nothing is replaced.
    pub fn restore(&mut self, r: &NatRecord<A>, now: u64) -> Result<(), RestoreError> {
        let proto_ok = match r.state {
            NatState::UdpUnreplied | NatState::UdpAssured => r.key.proto == NatProto::Udp,
            NatState::Icmp => r.key.proto == NatProto::Icmp,
            _ => r.key.proto == NatProto::Tcp,
        };
        if !proto_ok || r.flags & !RECORD_FLAGS != 0 || r.ttl == 0 {
            return Err(RestoreError::Invalid);
        }
        // A timeout lowered since the export applies to the restored mapping too.
        let ttl = r.ttl.min(self.cfg.timeout(r.state));
        if r.node_port < self.cfg.port_lo || r.node_port > self.cfg.port_hi {
            return Err(RestoreError::PortRange);
        }
        if self.fwd.contains_key(&r.key) || self.rev.contains_key(&RevKey::of(&r.key, r.node_port))
        {
            return Err(RestoreError::Duplicate);
        }
        if self.len() >= self.cfg.max_entries
            || self.pod_entries(r.key.pod_ip) >= self.cfg.max_entries_per_pod
        {
            return Err(RestoreError::Full);
        }
        let id = self.slot(&r.key);
        let queued = if r.flags & REPLIED == 0 { QUEUED } else { 0 };
        let hot = Hot {
            expires: now + u64::from(ttl),
            id,
            lo: r.lo,
            hi: r.hi,
            node_port: r.node_port,
            state: r.state,
            bits: r.flags | queued,
        };
        self.insert(&r.key, hot);
        Ok(())
    }

    /// A node port for the new flow `key`: the first port in probe order that is free (a port
    /// held by an expired entry is free) or, when the flow opens a TCP connection (a SYN without
    /// ACK or RST), held by a reset mapping (`TcpClose`: the RST left no state at either end; the
    /// mapping only waited for stray packets). Failing both, an opening flow takes the first port
    /// whose owner is in `TcpTimeWait`, as Linux's SNAT does when it runs out of ports
    /// (`nf_nat_used_tuple_harder`): a remote still in TIME-WAIT accepts a new SYN with a newer
    /// timestamp (RFC 6191) or answers it with an ACK that the client resets before retrying.
    /// The owner taken over is forgotten. Without this, a client that opens and resets
    /// connections to one server would pin every port of the range for the CLOSE timeout.
    fn allocate(&mut self, key: &FlowKey<A>, tcp_flags: u8, now: u64) -> Result<u16, NatError> {
        let (lo, hi) = (self.cfg.port_lo, self.cfg.port_hi);
        if lo > hi {
            return Err(NatError::BadConfig);
        }
        let opening = key.proto == NatProto::Tcp
            && tcp_flags & (tcp_flag::SYN | tcp_flag::ACK | tcp_flag::RST) == tcp_flag::SYN;
        let mut closing: Option<(u16, FlowKey<A>)> = None;
        let range = u32::from(hi - lo) + 1;
        let start = (self.fwd.hasher().hash_one(key) % u64::from(range)) as u32;
        for i in 0..range.min(self.cfg.max_probe.max(1)) {
            let port = lo + ((start + i) % range) as u16;
            let Some(&owner) = self.rev.get(&RevKey::of(key, port)) else {
                return Ok(port);
            };
            let reusable = match self.fwd.get(&owner) {
                Some(h) if h.expires > now => {
                    if opening && closing.is_none() && h.state == NatState::TcpTimeWait {
                        closing = Some((port, owner));
                    }
                    opening && h.state == NatState::TcpClose
                }
                _ => true,
            };
            if reusable {
                self.remove(&owner);
                return Ok(port);
            }
        }
        match closing {
            Some((port, owner)) => {
                self.remove(&owner);
                Ok(port)
            }
            None => Err(NatError::Exhausted),
        }
    }

    /// [`NatTable::ingress_seg`] for a packet with `tcp_flags` and sequence numbers 0; `None`
    /// for any refusal.
    pub fn ingress(
        &mut self,
        proto: NatProto,
        remote_ip: A,
        remote_port: u16,
        node_port: u16,
        tcp_flags: u8,
        now: u64,
    ) -> Option<FlowKey<A>> {
        self.ingress_seg(
            proto,
            remote_ip,
            remote_port,
            node_port,
            &Seg::flags(tcp_flags),
            now,
        )
        .ok()
    }

    /// A reply from `remote_ip:remote_port` to node port `node_port`: returns the flow it belongs
    /// to and advances its state and expiry. [`NatError::NoMapping`] if no live mapping matches,
    /// [`NatError::RstOutOfWindow`] for a TCP RST outside the window (the mapping is untouched).
    pub fn ingress_seg(
        &mut self,
        proto: NatProto,
        remote_ip: A,
        remote_port: u16,
        node_port: u16,
        seg: &Seg,
        now: u64,
    ) -> Result<FlowKey<A>, NatError> {
        let key = self
            .reply_flow(proto, remote_ip, remote_port, node_port)
            .ok_or(NatError::NoMapping)?;
        let h = self.fwd.get_mut(&key).ok_or(NatError::NoMapping)?;
        if h.expires <= now {
            self.remove(&key);
            return Err(NatError::NoMapping);
        }
        if proto == NatProto::Tcp && seg.flags & tcp_flag::RST != 0 && !h.rst_acceptable(seg) {
            return Err(NatError::RstOutOfWindow);
        }
        h.advance(proto, Dir::Reply, seg, now, &self.cfg);
        self.generation = self.generation.wrapping_add(1);
        Ok(key)
    }

    /// Examines at most `budget` slots (continuing where the previous call stopped) and removes
    /// the expired ones. Returns how many were removed. A budget of at least the slab size sweeps
    /// everything once.
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        let n = self.slab.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            if self.cursor >= n {
                self.cursor = 0;
            }
            let id = self.cursor;
            self.cursor += 1;
            if let Some(key) = self.slab[id] {
                if self.lookup(&key, now).is_none() {
                    self.remove(&key);
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Heap bytes held by both maps and the slab (hashbrown: one `(key, value)` bucket plus one
    /// control byte per slot of capacity).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        self.fwd.capacity() * (size_of::<(FlowKey<A>, Hot)>() + 1)
            + self.rev.capacity() * (size_of::<(RevKey<A>, FlowKey<A>)>() + 1)
            + self.slab.capacity() * size_of::<Option<FlowKey<A>>>()
            + self.free.capacity() * 4
            + self.unreplied.capacity() * size_of::<FlowKey<A>>()
            + self.pods.capacity() * (size_of::<(A, u32)>() + 1)
    }

    /// Measured bytes per held entry; with no entry, the cost at the maps' maximum load factor
    /// (7/8).
    pub fn bytes_per_entry(&self) -> usize {
        use std::mem::size_of;
        match self.len() {
            0 => {
                size_of::<Option<FlowKey<A>>>()
                    + (size_of::<(FlowKey<A>, Hot)>() + 1) * 8 / 7
                    + (size_of::<(RevKey<A>, FlowKey<A>)>() + 1) * 8 / 7
            }
            n => self.memory_bytes() / n,
        }
    }
}

/// `u16` at `at`, or `Truncated`.
fn rd16(b: &[u8], at: usize) -> Result<u16, DropReason> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(DropReason::Truncated)
}

/// Writes `v` at `at`, or `Truncated` (nothing written).
fn wr16(b: &mut [u8], at: usize, v: u16) -> Result<(), DropReason> {
    b.get_mut(at..at + 2)
        .ok_or(DropReason::Truncated)?
        .copy_from_slice(&v.to_be_bytes());
    Ok(())
}

fn rd32(b: &[u8], at: usize) -> Result<u32, DropReason> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(DropReason::Truncated)
}

fn wr32(b: &mut [u8], at: usize, v: u32) -> Result<(), DropReason> {
    b.get_mut(at..at + 4)
        .ok_or(DropReason::Truncated)?
        .copy_from_slice(&v.to_be_bytes());
    Ok(())
}

/// Where the transport checksum of `proto` sits in its header, and whether it follows the UDP
/// rules (zero means none, never write zero).
const fn l4_checksum_at(proto: NatProto) -> (usize, bool) {
    match proto {
        NatProto::Tcp => (16, false),
        NatProto::Udp => (6, true),
        NatProto::Icmp => (2, false),
    }
}

/// Offset of the port / identifier NAT rewrites for the source side of `proto`'s header
/// (`src == false`: the destination side). ICMP echo has one identifier for both.
const fn port_at(proto: NatProto, src: bool) -> usize {
    match (proto, src) {
        (NatProto::Icmp, _) => 4,
        (_, true) => 0,
        (_, false) => 2,
    }
}

/// Rewrites one IPv4 address field (`ADDR_SRC` or `ADDR_DST`) of the header at `ip`, fixing the
/// header checksum. Returns the old address.
fn rewrite_addr(b: &mut [u8], ip: usize, field: usize, new: Ipv4Addr) -> Result<u32, DropReason> {
    let old = rd32(b, ip + field)?;
    let c = rd16(b, ip + 10)?;
    wr32(b, ip + field, u32::from(new))?;
    wr16(b, ip + 10, checksum::update32(c, old, u32::from(new)))?;
    Ok(old)
}

const ADDR_SRC: usize = 12;
const ADDR_DST: usize = 16;

/// Rewrites the port / identifier at `l4 + port_off` to `new_port` and fixes the transport
/// checksum for it and for the address change `old_addr -> new_addr` (pseudo-header; ICMP has
/// none). Returns the list of (offset, old word, new word) changed, for callers that must also
/// fix an enclosing checksum. A checksum field beyond the buffer (a truncated quote inside an
/// ICMP error) is skipped.
fn rewrite_l4(
    b: &mut [u8],
    l4: usize,
    proto: NatProto,
    port_off: usize,
    new_port: u16,
    addr: (u32, u32),
    changed: &mut Changes,
) -> Result<(), DropReason> {
    let old_port = rd16(b, l4 + port_off)?;
    wr16(b, l4 + port_off, new_port)?;
    changed.push(l4 + port_off, old_port, new_port);
    let (at, udp) = l4_checksum_at(proto);
    let Ok(c) = rd16(b, l4 + at) else {
        return Ok(());
    };
    let mut n = c;
    if proto != NatProto::Icmp {
        n = if udp {
            checksum::update32_udp(n, addr.0, addr.1)
        } else {
            checksum::update32(n, addr.0, addr.1)
        };
    }
    n = if udp {
        checksum::update16_udp(n, old_port, new_port)
    } else {
        checksum::update16(n, old_port, new_port)
    };
    wr16(b, l4 + at, n)?;
    changed.push(l4 + at, c, n);
    Ok(())
}

/// Up to 8 changed 16-bit words (an ICMP error changes 5 inside the quote).
struct Changes {
    words: [(usize, u16, u16); 8],
    n: usize,
}

impl Changes {
    fn new() -> Self {
        Changes {
            words: [(0, 0, 0); 8],
            n: 0,
        }
    }
    fn push(&mut self, at: usize, old: u16, new: u16) {
        if self.n < self.words.len() {
            self.words[self.n] = (at, old, new);
            self.n += 1;
        }
    }
    fn push32(&mut self, at: usize, old: u32, new: u32) {
        self.push(at, (old >> 16) as u16, (new >> 16) as u16);
        self.push(at + 2, old as u16, new as u16);
    }
    fn iter(&self) -> impl Iterator<Item = &(usize, u16, u16)> {
        self.words[..self.n].iter()
    }
}

/// The IPv4 packet's addresses, or `Unsupported` (NAT44 only). Fragments are refused.
fn v4_meta(pkt: &[u8]) -> Result<(wire::IpMeta, Ipv4Addr, Ipv4Addr), DropReason> {
    let meta = wire::parse_ip(pkt)?;
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (meta.src, meta.dst) else {
        return Err(DropReason::Unsupported);
    };
    if meta.is_fragment {
        return Err(DropReason::Unsupported);
    }
    Ok((meta, src, dst))
}

/// The tracker's view of a packet: for TCP its flags, sequence and acknowledgement numbers and
/// payload length (of the whole super-packet for a TSO / GRO one); for others flags only.
fn tcp_seg(pkt: &[u8], meta: &wire::IpMeta, tcp_flags: u8) -> Result<Seg, DropReason> {
    if meta.protocol != ip_proto::TCP {
        return Ok(Seg::flags(tcp_flags));
    }
    let l4 = meta.l4_offset;
    let doff = usize::from(pkt.get(l4 + 12).ok_or(DropReason::Truncated)? >> 4) * 4;
    Ok(Seg {
        flags: tcp_flags,
        seq: rd32(pkt, l4 + 4)?,
        ack: rd32(pkt, l4 + 8)?,
        len: meta.total_len.saturating_sub(l4 + doff) as u32,
    })
}

/// The flow of a pod's packet leaving, either family: TCP / UDP by its ports, an ICMP (`icmp`:
/// the family's ICMP protocol number) echo request by its identifier; with the TCP flags the
/// tracker sees. Anything else is `unsupported`.
#[inline]
fn egress_flow<A: NatAddr>(
    meta: &wire::IpMeta,
    icmp: u8,
    src: A,
    dst: A,
) -> Result<(FlowKey<A>, u8), DropReason> {
    match (meta.protocol, meta.l4) {
        (
            ip_proto::TCP | ip_proto::UDP,
            L4Info::Ports {
                src: sp,
                dst: dp,
                tcp_flags,
            },
        ) => Ok((
            FlowKey {
                proto: NatProto::from_ip_proto(meta.protocol).ok_or(DropReason::Unsupported)?,
                pod_ip: src,
                pod_port: sp,
                remote_ip: dst,
                remote_port: dp,
            },
            tcp_flags,
        )),
        (
            p,
            L4Info::IcmpEcho {
                ident,
                request: true,
                ..
            },
        ) if p == icmp => Ok((
            FlowKey {
                proto: NatProto::Icmp,
                pod_ip: src,
                pod_port: ident,
                remote_ip: dst,
                remote_port: 0,
            },
            0,
        )),
        _ => Err(DropReason::Unsupported),
    }
}

/// The flow a packet to the node address belongs to, either family, its state advanced: a TCP /
/// UDP reply, an ICMP (`icmp`: the family's protocol number) echo reply. `None`: an ICMP error,
/// which the family's own code translates; anything else is `unsupported`.
#[inline]
fn ingress_flow<A: NatAddr>(
    nat: &mut NatTable<A>,
    pkt: &[u8],
    meta: &wire::IpMeta,
    icmp: u8,
    src: A,
    now: u64,
) -> Result<Option<(FlowKey<A>, NatProto)>, DropReason> {
    match (meta.protocol, meta.l4) {
        (
            ip_proto::TCP | ip_proto::UDP,
            L4Info::Ports {
                src: sp,
                dst: dp,
                tcp_flags,
            },
        ) => {
            let proto = NatProto::from_ip_proto(meta.protocol).ok_or(DropReason::Unsupported)?;
            let seg = tcp_seg(pkt, meta, tcp_flags)?;
            Ok(Some((
                nat.ingress_seg(proto, src, sp, dp, &seg, now)?,
                proto,
            )))
        }
        (
            p,
            L4Info::IcmpEcho {
                ident,
                request: false,
                ..
            },
        ) if p == icmp => {
            let key = nat.ingress_seg(NatProto::Icmp, src, 0, ident, &Seg::default(), now)?;
            Ok(Some((key, NatProto::Icmp)))
        }
        (p, L4Info::IcmpError { .. }) if p == icmp => Ok(None),
        _ => Err(DropReason::Unsupported),
    }
}

/// Translates a packet from a pod (`pkt` starts at its IPv4 header) to come from
/// `node_addr`: TCP / UDP source port or ICMP echo identifier mapped through the table,
/// checksums fixed incrementally. Returns the node port used.
///
/// Drops: anything not IPv4 TCP / UDP / ICMP echo request or a fragment (`unsupported`), a
/// malformed packet (its parse error), no port or no room (`nat_exhausted`), a TCP segment that
/// cannot open a flow without a mapping (`nat_no_mapping`), the pod at its cap (`nat_pod_limit`).
pub fn translate_egress(
    nat: &mut NatTable,
    pkt: &mut [u8],
    node_addr: Ipv4Addr,
    now: u64,
) -> Result<u16, DropReason> {
    let (meta, src, dst) = v4_meta(pkt)?;
    let (key, flags) = egress_flow(&meta, ip_proto::ICMP, src, dst)?;
    let seg = tcp_seg(pkt, &meta, flags)?;
    let node_port = nat.egress_seg(&key, &seg, now)?;
    let old = rewrite_addr(pkt, 0, ADDR_SRC, node_addr)?;
    rewrite_l4(
        pkt,
        meta.l4_offset,
        key.proto,
        port_at(key.proto, true),
        node_port,
        (old, u32::from(node_addr)),
        &mut Changes::new(),
    )?;
    Ok(node_port)
}

/// Translates a packet to the node address back to the pod it belongs to: a TCP / UDP reply, an
/// ICMP echo reply, or an ICMP error (destination unreachable including fragmentation needed,
/// time exceeded, parameter problem, ...) quoting a translated packet, whose quoted source
/// address, port and checksums are restored too. Returns the pod address, the packet's new
/// destination.
///
/// Drops: no live mapping (`nat_no_mapping`), a TCP RST outside the window
/// (`nat_rst_out_of_window`), anything else not translatable (`unsupported`), a malformed packet
/// (its parse error).
pub fn translate_ingress(
    nat: &mut NatTable,
    pkt: &mut [u8],
    now: u64,
) -> Result<Ipv4Addr, DropReason> {
    let (meta, src, _dst) = v4_meta(pkt)?;
    let l4 = meta.l4_offset;
    let Some((key, proto)) = ingress_flow(nat, pkt, &meta, ip_proto::ICMP, src, now)? else {
        return translate_icmp_error(nat, pkt, l4, meta.total_len, now);
    };
    let old = rewrite_addr(pkt, 0, ADDR_DST, key.pod_ip)?;
    rewrite_l4(
        pkt,
        l4,
        proto,
        port_at(proto, false),
        key.pod_port,
        (old, u32::from(key.pod_ip)),
        &mut Changes::new(),
    )?;
    Ok(key.pod_ip)
}

/// RFC 792 / RFC 5508 §7: the error quotes the translated packet (source = node address and
/// node port). Restore the quote's source address and port and its header and transport
/// checksums, fix the ICMP checksum for every word changed inside the quote (all fields are at
/// even offsets from the ICMP header: the quote starts at +8 and IPv4 headers are multiples of 4),
/// then send the error to the pod.
fn translate_icmp_error(
    nat: &NatTable,
    pkt: &mut [u8],
    l4: usize,
    total_len: usize,
    now: u64,
) -> Result<Ipv4Addr, DropReason> {
    let quote = l4 + 8;
    let (inner_hl, inner_proto, inner_dst, later_fragment) = {
        let q = pkt.get(quote..total_len).ok_or(DropReason::Truncated)?;
        let ip = ipv4::Packet::new_checked_header(q)?;
        (
            ip.header_len(),
            ip.protocol(),
            ip.dst_addr(),
            ip.frag_offset() != 0,
        )
    };
    if later_fragment {
        return Err(DropReason::Unsupported);
    }
    let proto = NatProto::from_ip_proto(inner_proto).ok_or(DropReason::Unsupported)?;
    let il4 = quote + inner_hl;
    // The quote ends at the ICMP message's end, not at the quoted header's total length.
    let b = pkt.get_mut(..total_len).ok_or(DropReason::Truncated)?;
    let key = match proto {
        NatProto::Tcp | NatProto::Udp => {
            let (sp, dp) = (rd16(b, il4)?, rd16(b, il4 + 2)?);
            nat.lookup_reverse(proto, inner_dst, dp, sp, now)
        }
        NatProto::Icmp => {
            // Only an error about our echo request can be ours.
            if b.get(il4).copied() != Some(crate::wire::icmp::msg_type::ECHO_REQUEST) {
                return Err(DropReason::Unsupported);
            }
            nat.lookup_reverse(NatProto::Icmp, inner_dst, 0, rd16(b, il4 + 4)?, now)
        }
    }
    .ok_or(DropReason::NatNoMapping)?;

    let mut changes = Changes::new();
    let old_src = rd32(b, quote + ADDR_SRC)?;
    let old_csum = rd16(b, quote + 10)?;
    rewrite_addr(b, quote, ADDR_SRC, key.pod_ip)?;
    changes.push32(quote + ADDR_SRC, old_src, u32::from(key.pod_ip));
    changes.push(quote + 10, old_csum, rd16(b, quote + 10)?);
    rewrite_l4(
        b,
        il4,
        proto,
        port_at(proto, true),
        key.pod_port,
        (old_src, u32::from(key.pod_ip)),
        &mut changes,
    )?;
    let mut c = rd16(b, l4 + 2)?;
    for &(_, old, new) in changes.iter() {
        c = checksum::update16(c, old, new);
    }
    wr16(b, l4 + 2, c)?;
    rewrite_addr(b, 0, ADDR_DST, key.pod_ip)?;
    Ok(key.pod_ip)
}

// ---------------------------------------------------------------------------------------------
// IPv6 (NAT66 masquerade). No IP header checksum, but every transport checksum — ICMPv6's too —
// covers a pseudo-header with both 128-bit addresses (RFC 8200 §8.1), so an address change is
// folded into TCP, UDP and ICMPv6 checksums alike, eight 16-bit words at a time (RFC 1624).

/// Offsets of the source and destination address in the IPv6 header.
const ADDR6_SRC: usize = 8;
const ADDR6_DST: usize = 24;

fn rd_addr6(b: &[u8], at: usize) -> Result<[u8; 16], DropReason> {
    let mut a = [0u8; 16];
    a.copy_from_slice(b.get(at..at + 16).ok_or(DropReason::Truncated)?);
    Ok(a)
}

/// Writes `new` over the IPv6 address at `at`; returns the old one.
fn rewrite_addr6(b: &mut [u8], at: usize, new: Ipv6Addr) -> Result<[u8; 16], DropReason> {
    let old = rd_addr6(b, at)?;
    b.get_mut(at..at + 16)
        .ok_or(DropReason::Truncated)?
        .copy_from_slice(&new.octets());
    Ok(old)
}

/// An incrementally updated IPv6 transport checksum: UDP over IPv6 has no "no checksum" (RFC
/// 8200 §8.1), but a computed zero is still sent as 0xffff; TCP and ICMPv6 take the value as is.
fn v6_check(udp: bool, c: u16) -> u16 {
    if udp && c == 0 {
        0xffff
    } else {
        c
    }
}

/// The IP protocol number of `proto` inside IPv6.
const fn ip_proto6(proto: NatProto) -> u8 {
    match proto {
        NatProto::Icmp => ip_proto::ICMPV6,
        p => p.ip_proto(),
    }
}

/// Rewrites the port / identifier at `l4 + port_off` and fixes the transport checksum for it and
/// for the pseudo-header address change `old -> new`. Returns the (old, new) checksum, or `None`
/// when the checksum field lies beyond the buffer (a truncated quote inside an ICMPv6 error).
fn rewrite_l4_v6(
    b: &mut [u8],
    l4: usize,
    proto: NatProto,
    port_off: usize,
    new_port: u16,
    old: &[u8; 16],
    new: Ipv6Addr,
) -> Result<(u16, Option<(u16, u16)>), DropReason> {
    let old_port = rd16(b, l4 + port_off)?;
    wr16(b, l4 + port_off, new_port)?;
    let (at, udp) = l4_checksum_at(proto);
    let Ok(c) = rd16(b, l4 + at) else {
        return Ok((old_port, None));
    };
    let n = checksum::update_bytes(c, old, &new.octets());
    let n = v6_check(udp, checksum::update16(n, old_port, new_port));
    wr16(b, l4 + at, n)?;
    Ok((old_port, Some((c, n))))
}

/// The IPv6 packet's addresses, or `Unsupported`. Fragments are refused, as for IPv4.
fn v6_meta(pkt: &[u8]) -> Result<(wire::IpMeta, Ipv6Addr, Ipv6Addr), DropReason> {
    let meta = wire::parse_ip(pkt)?;
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (meta.src, meta.dst) else {
        return Err(DropReason::Unsupported);
    };
    if meta.is_fragment {
        return Err(DropReason::Unsupported);
    }
    Ok((meta, src, dst))
}

/// [`translate_egress`] for IPv6: a pod's TCP / UDP packet or ICMPv6 echo request (its
/// identifier is the port) leaves from `node_addr` and a node port of the IPv6 table. The
/// transport checksum is fixed for the address (pseudo-header) and port change. Same drops as
/// [`translate_egress`]; anything else (NDP, MLD, other ICMPv6, fragments) is `unsupported`.
pub fn translate_egress_v6(
    nat: &mut NatTable6,
    pkt: &mut [u8],
    node_addr: Ipv6Addr,
    now: u64,
) -> Result<u16, DropReason> {
    let (meta, src, dst) = v6_meta(pkt)?;
    let (key, flags) = egress_flow(&meta, ip_proto::ICMPV6, src, dst)?;
    let seg = tcp_seg(pkt, &meta, flags)?;
    let node_port = nat.egress_seg(&key, &seg, now)?;
    let old = rewrite_addr6(pkt, ADDR6_SRC, node_addr)?;
    rewrite_l4_v6(
        pkt,
        meta.l4_offset,
        key.proto,
        port_at(key.proto, true),
        node_port,
        &old,
        node_addr,
    )?;
    Ok(node_port)
}

/// [`translate_ingress`] for IPv6: a TCP / UDP reply, an ICMPv6 echo reply, or an ICMPv6 error
/// (Destination Unreachable, Packet Too Big, Time Exceeded, Parameter Problem) quoting a
/// translated packet, whose quoted source address, port and transport checksum are restored.
/// Returns the pod address, the packet's new destination.
pub fn translate_ingress_v6(
    nat: &mut NatTable6,
    pkt: &mut [u8],
    now: u64,
) -> Result<Ipv6Addr, DropReason> {
    let (meta, src, _dst) = v6_meta(pkt)?;
    let l4 = meta.l4_offset;
    let Some((key, proto)) = ingress_flow(nat, pkt, &meta, ip_proto::ICMPV6, src, now)? else {
        return translate_icmp6_error(nat, pkt, l4, meta.total_len, now);
    };
    let old = rewrite_addr6(pkt, ADDR6_DST, key.pod_ip)?;
    rewrite_l4_v6(
        pkt,
        l4,
        proto,
        port_at(proto, false),
        key.pod_port,
        &old,
        key.pod_ip,
    )?;
    Ok(key.pod_ip)
}

/// RFC 4443 §2.4(c) / RFC 6146 §3.5.3 style: the error quotes as much of the translated packet
/// as fits (source = node address and node port). The quote must be a bare IPv6 header followed
/// by TCP, UDP or an ICMPv6 echo request (a quote with extension headers is `unsupported`).
/// Restores the quote's source address, port and transport checksum, then fixes the ICMPv6
/// checksum for every word changed inside the quote and for its own pseudo-header's destination
/// (node -> pod), and sends the error to the pod.
fn translate_icmp6_error(
    nat: &NatTable6,
    pkt: &mut [u8],
    l4: usize,
    total_len: usize,
    now: u64,
) -> Result<Ipv6Addr, DropReason> {
    let quote = l4 + 8;
    let b = pkt.get_mut(..total_len).ok_or(DropReason::Truncated)?;
    if b.get(quote).map(|v| v >> 4) != Some(6) {
        return Err(DropReason::Unsupported);
    }
    let inner_next = *b.get(quote + 6).ok_or(DropReason::Truncated)?;
    let inner_dst = Ipv6Addr::from(rd_addr6(b, quote + ADDR6_DST)?);
    let proto = match inner_next {
        ip_proto::TCP => NatProto::Tcp,
        ip_proto::UDP => NatProto::Udp,
        ip_proto::ICMPV6 => NatProto::Icmp,
        _ => return Err(DropReason::Unsupported),
    };
    let il4 = quote + 40;
    let key = match proto {
        NatProto::Tcp | NatProto::Udp => {
            let (sp, dp) = (rd16(b, il4)?, rd16(b, il4 + 2)?);
            nat.lookup_reverse(proto, inner_dst, dp, sp, now)
        }
        NatProto::Icmp => {
            if b.get(il4).copied() != Some(crate::wire::icmpv6::msg_type::ECHO_REQUEST) {
                return Err(DropReason::Unsupported);
            }
            nat.lookup_reverse(NatProto::Icmp, inner_dst, 0, rd16(b, il4 + 4)?, now)
        }
    }
    .ok_or(DropReason::NatNoMapping)?;
    debug_assert_eq!(ip_proto6(key.proto), inner_next);

    let pod = key.pod_ip.octets();
    let old_src = rewrite_addr6(b, quote + ADDR6_SRC, key.pod_ip)?;
    let (old_port, csum) = rewrite_l4_v6(
        b,
        il4,
        proto,
        port_at(proto, true),
        key.pod_port,
        &old_src,
        key.pod_ip,
    )?;
    let old_dst = rewrite_addr6(b, ADDR6_DST, key.pod_ip)?;
    let mut c = rd16(b, l4 + 2)?;
    c = checksum::update_bytes(c, &old_src, &pod);
    c = checksum::update16(c, old_port, key.pod_port);
    if let Some((old, new)) = csum {
        c = checksum::update16(c, old, new);
    }
    c = checksum::update_bytes(c, &old_dst, &pod);
    wr16(b, l4 + 2, c)?;
    Ok(key.pod_ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{icmp, tcp, udp};

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cfg() -> NatConfig {
        NatConfig {
            port_lo: 61000,
            port_hi: 61007,
            ..NatConfig::default()
        }
    }

    fn flow(proto: NatProto, pod_port: u16, remote: &str, rport: u16) -> FlowKey {
        FlowKey {
            proto,
            pod_ip: v4("10.244.1.10"),
            pod_port,
            remote_ip: v4(remote),
            remote_port: rport,
        }
    }

    const SYN: u8 = tcp_flag::SYN;
    const SYNACK: u8 = tcp_flag::SYN | tcp_flag::ACK;
    const ACK: u8 = tcp_flag::ACK;
    const FIN: u8 = tcp_flag::FIN | tcp_flag::ACK;
    const RST: u8 = tcp_flag::RST;

    #[test]
    fn timeouts_by_key_are_the_states_timeouts() {
        let c = NatConfig {
            tcp_syn_sent: 1,
            tcp_established: 2,
            tcp_fin_wait: 3,
            tcp_time_wait: 4,
            tcp_close: 5,
            udp_unreplied: 6,
            udp_assured: 7,
            icmp: 8,
            ..NatConfig::default()
        };
        let states = [
            NatState::TcpSynSent,
            NatState::TcpEstablished,
            NatState::TcpFinWait,
            NatState::TcpTimeWait,
            NatState::TcpClose,
            NatState::UdpUnreplied,
            NatState::UdpAssured,
            NatState::Icmp,
        ];
        assert_eq!(c.timeouts().map(|(_, s)| s), states.map(|st| c.timeout(st)));
        assert_eq!(c.timeouts().map(|(_, s)| s), [1, 2, 3, 4, 5, 6, 7, 8]);
        let keys = c.timeouts().map(|(k, _)| k);
        assert_eq!(keys[0], "tcp_syn_sent");
        assert_eq!(keys[7], "icmp");
        let d = NatConfig::default();
        assert_eq!((d.port_lo, d.port_hi), DEFAULT_PORT_RANGE);
        assert_eq!(d.max_entries, DEFAULT_MAX_ENTRIES);
    }

    #[test]
    fn same_flow_same_port_distinct_flows_distinct_ports() {
        let mut t = NatTable::new(cfg());
        let a = flow(NatProto::Udp, 5000, "203.0.113.1", 53);
        let p = t.egress(&a, 0, 0).unwrap();
        assert!((61000..=61007).contains(&p));
        assert_eq!(t.egress(&a, 0, 1).unwrap(), p);
        let mut used = vec![p];
        for i in 1..8 {
            let f = flow(NatProto::Udp, 5000 + i, "203.0.113.1", 53);
            let q = t.egress(&f, 0, 1).unwrap();
            assert!(!used.contains(&q));
            used.push(q);
        }
        // The range is full towards 203.0.113.1:53 ...
        let f = flow(NatProto::Udp, 6000, "203.0.113.1", 53);
        assert_eq!(t.egress(&f, 0, 1), Err(NatError::Exhausted));
        // ... and existing flows are untouched.
        assert_eq!(t.lookup(&a, 1), Some(p));
        assert_eq!(t.len(), 8);
        // Another remote endpoint (other port or other address) has its own capacity.
        assert!(t
            .egress(&flow(NatProto::Udp, 6000, "203.0.113.1", 54), 0, 1)
            .is_ok());
        assert!(t
            .egress(&flow(NatProto::Udp, 6000, "203.0.113.2", 53), 0, 1)
            .is_ok());
        // Another protocol too.
        assert!(t
            .egress(&flow(NatProto::Tcp, 6000, "203.0.113.1", 53), SYN, 1)
            .is_ok());
    }

    #[test]
    fn one_port_reused_across_remote_endpoints() {
        let mut t = NatTable::new(NatConfig {
            port_lo: 62000,
            port_hi: 62000,
            ..NatConfig::default()
        });
        for i in 0..50u16 {
            let f = flow(NatProto::Tcp, 40000 + i, "198.51.100.9", 1000 + i);
            assert_eq!(t.egress(&f, SYN, 0), Ok(62000));
        }
        for i in 0..50u16 {
            let k = t
                .ingress(
                    NatProto::Tcp,
                    v4("198.51.100.9"),
                    1000 + i,
                    62000,
                    SYNACK,
                    1,
                )
                .unwrap();
            assert_eq!(k.pod_port, 40000 + i);
        }
        assert_eq!(
            t.egress(&flow(NatProto::Tcp, 1, "198.51.100.9", 1000), SYN, 1),
            Err(NatError::Exhausted)
        );
    }

    #[test]
    fn a_new_tcp_connection_takes_over_a_closing_mapping_only_when_no_port_is_free() {
        let mut t = NatTable::new(NatConfig {
            port_lo: 61000,
            port_hi: 61001,
            ..NatConfig::default()
        });
        let a = flow(NatProto::Tcp, 40000, "203.0.113.1", 443);
        let b = flow(NatProto::Tcp, 40001, "203.0.113.1", 443);
        let pa = t.egress(&a, SYN, 0).unwrap();
        let pb = t.egress(&b, SYN, 0).unwrap();
        // `a` was reset (CLOSE, 10 s), `b` closed both ways (TIME_WAIT, 120 s).
        t.egress(&a, RST, 1).unwrap();
        t.egress(&b, FIN, 1).unwrap();
        t.ingress(NatProto::Tcp, v4("203.0.113.1"), 443, pb, FIN, 1)
            .unwrap();
        assert_eq!(t.get(&b, 1).unwrap().state, NatState::TcpTimeWait);
        // Not for anything but a SYN (a mid-stream packet opens nothing at all).
        let c = flow(NatProto::Tcp, 40002, "203.0.113.1", 443);
        assert_eq!(t.egress(&c, ACK, 2), Err(NatError::NoMapping));
        assert_eq!(t.egress(&c, SYN | ACK, 2), Err(NatError::NoMapping));
        let u = flow(NatProto::Udp, 40002, "203.0.113.1", 443);
        assert!(t.egress(&u, 0, 2).is_ok());
        t.remove(&u);
        assert_eq!(t.len(), 2);
        // A SYN takes the reset mapping's port first; its owner is forgotten.
        let pc = t.egress(&c, SYN, 2).unwrap();
        assert_eq!(pc, pa);
        assert_eq!(t.get(&a, 2), None);
        // With no reset mapping left, the next SYN takes the TIME-WAIT one.
        let c2 = flow(NatProto::Tcp, 40005, "203.0.113.1", 443);
        assert_eq!(t.egress(&c2, SYN, 2), Ok(pb));
        assert_eq!(t.get(&b, 2), None);
        assert_eq!(
            t.lookup_reverse(NatProto::Tcp, v4("203.0.113.1"), 443, pc, 2),
            Some(c)
        );
        // Live connections are never taken over.
        let e = flow(NatProto::Tcp, 40004, "203.0.113.1", 443);
        assert_eq!(t.egress(&e, SYN, 3), Err(NatError::Exhausted));
        assert_eq!(t.len(), 2);
        // A free port is preferred to a reset mapping's only when it comes first in probe order;
        // either way the port is not held by a live connection.
        t.egress(&c, RST, 4).unwrap();
        let d = flow(NatProto::Tcp, 40003, "203.0.113.1", 443);
        assert_eq!(t.egress(&d, SYN, 5), Ok(pa));
    }

    #[test]
    fn reverse_lookup_and_wrong_endpoint() {
        let mut t = NatTable::new(cfg());
        let a = flow(NatProto::Tcp, 40000, "203.0.113.1", 443);
        let p = t.egress(&a, SYN, 0).unwrap();
        assert_eq!(
            t.lookup_reverse(NatProto::Tcp, v4("203.0.113.1"), 443, p, 0),
            Some(a)
        );
        assert_eq!(
            t.lookup_reverse(NatProto::Tcp, v4("203.0.113.1"), 444, p, 0),
            None
        );
        assert_eq!(
            t.lookup_reverse(NatProto::Udp, v4("203.0.113.1"), 443, p, 0),
            None
        );
        assert_eq!(
            t.lookup_reverse(NatProto::Tcp, v4("203.0.113.2"), 443, p, 0),
            None
        );
        assert_eq!(
            t.ingress(NatProto::Tcp, v4("203.0.113.1"), 443, p + 1, ACK, 0),
            None
        );
    }

    #[test]
    fn tcp_lifecycle_and_timeouts() {
        let c = NatConfig::default();
        let mut t = NatTable::new(c.clone());
        let a = flow(NatProto::Tcp, 40000, "203.0.113.1", 443);
        let r = |t: &mut NatTable, p: u16, f: u8, now: u64| {
            t.ingress(NatProto::Tcp, v4("203.0.113.1"), 443, p, f, now)
        };
        let p = t.egress(&a, SYN, 100).unwrap();
        let e = t.get(&a, 100).unwrap();
        assert_eq!((e.state, e.expires), (NatState::TcpSynSent, 100 + 120));
        r(&mut t, p, SYNACK, 101).unwrap();
        let e = t.get(&a, 101).unwrap();
        assert_eq!((e.state, e.expires), (NatState::TcpEstablished, 101 + 7440));
        t.egress(&a, ACK, 5000).unwrap();
        assert_eq!(t.get(&a, 5000).unwrap().expires, 5000 + 7440);
        t.egress(&a, FIN, 6000).unwrap();
        assert_eq!(t.get(&a, 6000).unwrap().state, NatState::TcpFinWait);
        // A FIN retransmitted by the same side does not close the other half.
        t.egress(&a, FIN, 6001).unwrap();
        assert_eq!(t.get(&a, 6001).unwrap().state, NatState::TcpFinWait);
        r(&mut t, p, FIN, 6002).unwrap();
        let e = t.get(&a, 6002).unwrap();
        assert_eq!((e.state, e.expires), (NatState::TcpTimeWait, 6002 + 120));
        // A new SYN on the same 5-tuple reopens the mapping with the same port.
        assert_eq!(t.egress(&a, SYN, 6003), Ok(p));
        assert_eq!(t.get(&a, 6003).unwrap().state, NatState::TcpSynSent);
        // Before the remote answered, only an RST acknowledging the SYN counts.
        assert_eq!(r(&mut t, p, RST, 6004), None);
        assert_eq!(t.get(&a, 6004).unwrap().state, NatState::TcpSynSent);
        let rst_ack = Seg {
            flags: RST | ACK,
            ack: 1,
            ..Seg::default()
        };
        t.ingress_seg(NatProto::Tcp, v4("203.0.113.1"), 443, p, &rst_ack, 6004)
            .unwrap();
        let e = t.get(&a, 6004).unwrap();
        assert_eq!((e.state, e.expires), (NatState::TcpClose, 6014));
        assert!(t.get(&a, 6013).is_some());
        assert!(t.get(&a, 6014).is_none());
        assert_eq!(r(&mut t, p, ACK, 6014), None);
    }

    #[test]
    fn only_an_opening_packet_creates_a_mapping() {
        let mut t = NatTable::new(NatConfig::default());
        let a = flow(NatProto::Tcp, 40000, "203.0.113.1", 443);
        for f in [
            ACK,
            RST,
            RST | ACK,
            FIN,
            SYN | ACK,
            SYN | RST,
            0,
            0x08 | ACK,
        ] {
            assert_eq!(t.egress(&a, f, 0), Err(NatError::NoMapping), "flags {f:#x}");
        }
        assert!(t.is_empty());
        assert_eq!(
            DropReason::from(NatError::NoMapping),
            DropReason::NatNoMapping
        );
        // A bare ACK packet through the translator: dropped, nothing created.
        let mut p = tcp_packet(POD, 40000, REMOTE, 443, ACK);
        assert_eq!(
            translate_egress(&mut t, &mut p, v4(NODE), 0),
            Err(DropReason::NatNoMapping)
        );
        assert!(t.is_empty());
        // A mapping that expired is gone: a mid-stream segment does not revive it.
        assert!(t.egress(&a, SYN, 0).is_ok());
        assert_eq!(t.egress(&a, ACK, 120), Err(NatError::NoMapping));
        // A SYN-SENT mapping lives 120 s.
        let b = flow(NatProto::Tcp, 40001, "203.0.113.1", 443);
        t.egress(&b, SYN, 0).unwrap();
        assert!(t.get(&b, 119).is_some());
        assert!(t.get(&b, 120).is_none());
    }

    #[test]
    fn udp_and_icmp_timeouts() {
        let mut t = NatTable::new(NatConfig::default());
        let u = flow(NatProto::Udp, 5353, "203.0.113.1", 53);
        let p = t.egress(&u, 0, 0).unwrap();
        assert_eq!(t.get(&u, 0).unwrap().expires, 30);
        t.ingress(NatProto::Udp, v4("203.0.113.1"), 53, p, 0, 10)
            .unwrap();
        let e = t.get(&u, 10).unwrap();
        assert_eq!((e.state, e.expires), (NatState::UdpAssured, 130));
        t.egress(&u, 0, 20).unwrap();
        assert_eq!(t.get(&u, 20).unwrap().expires, 140);
        let i = flow(NatProto::Icmp, 77, "203.0.113.1", 0);
        t.egress(&i, 0, 0).unwrap();
        assert_eq!(t.get(&i, 0).unwrap().expires, 30);
    }

    #[test]
    fn expired_entries_free_their_port_and_are_swept() {
        let mut t = NatTable::new(NatConfig {
            port_lo: 61000,
            port_hi: 61000,
            ..NatConfig::default()
        });
        let a = flow(NatProto::Udp, 1, "203.0.113.1", 53);
        let b = flow(NatProto::Udp, 2, "203.0.113.1", 53);
        assert_eq!(t.egress(&a, 0, 0), Ok(61000));
        assert_eq!(t.egress(&b, 0, 29), Err(NatError::Exhausted));
        // At 30 the mapping of `a` is dead: its port goes to `b` at once, no sweep needed.
        assert_eq!(t.egress(&b, 0, 30), Ok(61000));
        assert_eq!(t.lookup(&a, 30), None);
        assert_eq!(t.len(), 1);
        for i in 0..100 {
            t.egress(&flow(NatProto::Udp, 100 + i, "198.51.100.1", i), 0, 40)
                .unwrap();
        }
        assert_eq!(t.len(), 101);
        // Bounded: at most `budget` slots per call.
        assert_eq!(t.expire(1000, 10), 10);
        assert_eq!(t.len(), 91);
        assert_eq!(t.expire(1000, 1000), 91);
        assert!(t.is_empty());
        assert_eq!(t.expire(1000, 1000), 0);
    }

    #[test]
    fn table_full() {
        let mut t = NatTable::new(NatConfig {
            max_entries: 3,
            ..NatConfig::default()
        });
        for i in 0..3 {
            let p = t
                .egress(&flow(NatProto::Udp, i, "203.0.113.1", 53), 0, 0)
                .unwrap();
            // Answered: no eviction candidate.
            t.ingress(NatProto::Udp, v4("203.0.113.1"), 53, p, 0, 0)
                .unwrap();
        }
        let d = flow(NatProto::Udp, 9, "203.0.113.1", 53);
        assert_eq!(t.egress(&d, 0, 1), Err(NatError::TableFull));
        assert_eq!(
            DropReason::from(NatError::TableFull),
            DropReason::NatExhausted
        );
        // Once the others expired, room is made on demand.
        assert!(t.egress(&d, 0, 121).is_ok());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unanswered_entry() {
        let mut t = NatTable::new(NatConfig {
            max_entries: 4,
            ..NatConfig::default()
        });
        let pod_b = |port| FlowKey {
            pod_ip: v4("10.244.1.20"),
            ..flow(NatProto::Tcp, port, "203.0.113.9", 443)
        };
        // Two answered flows, then two unanswered ones from the same pod.
        let mut flows = vec![];
        for i in 0..4u16 {
            let f = flow(NatProto::Udp, 1000 + i, "203.0.113.1", 53);
            let p = t.egress(&f, 0, i.into()).unwrap();
            if i % 2 == 0 {
                t.ingress(NatProto::Udp, v4("203.0.113.1"), 53, p, 0, 5)
                    .unwrap();
            }
            flows.push(f);
        }
        // Another pod's connection still gets in; the oldest unanswered flow (1001) goes.
        assert!(t.egress(&pod_b(1), SYN, 6).is_ok());
        assert_eq!(t.evictions(), 1);
        assert_eq!(t.get(&flows[1], 6), None);
        assert!(t.get(&flows[3], 6).is_some());
        assert!(t.egress(&pod_b(2), SYN, 6).is_ok());
        assert_eq!(t.get(&flows[3], 6), None);
        // The new SYNs are unanswered too: the older of them goes next.
        let third = pod_b(3);
        assert!(t.egress(&third, SYN, 7).is_ok());
        assert_eq!(t.get(&pod_b(1), 7), None);
        assert_eq!(t.evictions(), 3);
        // Answered entries are never evicted: with only those left, the table is full.
        for f in [pod_b(2), third] {
            let e = t.get(&f, 7).unwrap();
            let synack = Seg {
                flags: SYNACK,
                ack: 1,
                ..Seg::default()
            };
            t.ingress_seg(NatProto::Tcp, f.remote_ip, 443, e.node_port, &synack, 7)
                .unwrap();
        }
        assert_eq!(
            t.egress(&pod_b(4), SYN, 8),
            Err(NatError::TableFull),
            "{:?}",
            t.unreplied
        );
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn eviction_queue_stays_bounded() {
        let mut t = NatTable::new(NatConfig {
            max_entries: 1000,
            udp_unreplied: 1,
            ..NatConfig::default()
        });
        for i in 0..100_000u32 {
            let f = flow(
                NatProto::Udp,
                (i % 60000) as u16,
                "203.0.113.1",
                53 + (i / 60000) as u16,
            );
            t.egress(&f, 0, u64::from(i / 100)).unwrap();
            t.expire(u64::from(i / 100), 4);
        }
        assert!(
            t.unreplied.len() <= 2 * t.len() + 65,
            "{} {}",
            t.unreplied.len(),
            t.len()
        );
    }

    #[test]
    fn per_pod_cap() {
        let mut t = NatTable::new(NatConfig {
            max_entries_per_pod: 3,
            ..NatConfig::default()
        });
        let pod_b = FlowKey {
            pod_ip: v4("10.244.1.20"),
            ..flow(NatProto::Udp, 1, "203.0.113.1", 53)
        };
        for i in 0..3 {
            t.egress(&flow(NatProto::Udp, i, "203.0.113.1", 53), 0, 0)
                .unwrap();
        }
        assert_eq!(t.pod_entries(v4(POD_A)), 3);
        let d = flow(NatProto::Udp, 9, "203.0.113.1", 53);
        assert_eq!(t.egress(&d, 0, 1), Err(NatError::PodLimit));
        assert_eq!(t.egress(&d, 0, 1), Err(NatError::PodLimit));
        assert_eq!(
            DropReason::from(NatError::PodLimit),
            DropReason::NatPodLimit
        );
        // Existing flows go on; another pod is not affected.
        assert!(t
            .egress(&flow(NatProto::Udp, 0, "203.0.113.1", 53), 0, 1)
            .is_ok());
        assert!(t.egress(&pod_b, 0, 1).is_ok());
        assert_eq!(t.pod_limit_drops(), (vec![(v4(POD_A), 2)], 0));
        // Room again once the pod's entries expired (reclaimed on demand).
        assert!(t.egress(&d, 0, 40).is_ok());
        assert_eq!(t.pod_entries(v4(POD_A)), 1);
    }

    #[test]
    fn pod_limit_drops_are_bounded() {
        let mut t = NatTable::new(NatConfig {
            max_entries_per_pod: 1,
            ..NatConfig::default()
        });
        for i in 0..(MAX_TRACKED_PODS as u32 + 10) {
            let mut f = flow(NatProto::Udp, 1, "203.0.113.1", 53);
            f.pod_ip = Ipv4Addr::from(0x0a00_0000 + i);
            t.egress(&f, 0, 0).unwrap();
            f.pod_port = 2;
            assert_eq!(t.egress(&f, 0, 0), Err(NatError::PodLimit));
        }
        let (v, other) = t.pod_limit_drops();
        assert_eq!((v.len(), other), (MAX_TRACKED_PODS, 10));
    }

    #[test]
    fn reply_rst_must_be_in_window() {
        let mut t = NatTable::new(NatConfig::default());
        let a = flow(NatProto::Tcp, 40000, "203.0.113.1", 443);
        let rip = v4("203.0.113.1");
        let seg = |flags, seq, ack, len| Seg {
            flags,
            seq,
            ack,
            len,
        };
        let p = t.egress_seg(&a, &seg(SYN, 1000, 0, 0), 0).unwrap();
        let reply = |t: &mut NatTable, s: Seg| t.ingress_seg(NatProto::Tcp, rip, 443, p, &s, 1);
        // SYN-SENT: an RST must acknowledge the SYN (ack 1001).
        for bad in [
            seg(RST, 0, 0, 0),
            seg(RST | ACK, 0, 1000, 0),
            seg(RST | ACK, 0, 1002, 0),
        ] {
            assert_eq!(reply(&mut t, bad), Err(NatError::RstOutOfWindow));
        }
        assert_eq!(t.get(&a, 1).unwrap().state, NatState::TcpSynSent);
        // The remote's ISN is 4_000_000_000: sequence numbers wrap during the test.
        let isn = 4_000_000_000u32;
        reply(&mut t, seg(SYNACK, isn, 1001, 0)).unwrap();
        t.egress_seg(&a, &seg(ACK, 1001, isn.wrapping_add(1), 0), 1)
            .unwrap();
        let mut next = isn.wrapping_add(1);
        for _ in 0..1000 {
            reply(&mut t, seg(ACK, next, 1001, 1400)).unwrap();
            next = next.wrapping_add(1400);
        }
        t.egress_seg(&a, &seg(ACK, 1001, next, 0), 1).unwrap();
        // A blind segment far ahead neither is refused (only RSTs are) nor moves the window.
        let far = next.wrapping_add(3_000_000);
        reply(&mut t, seg(ACK, far, 1001, 100)).unwrap();
        for bad in [
            far.wrapping_add(100),
            next.wrapping_add(RST_WINDOW + 1),
            next.wrapping_sub(1_400_000),
            next.wrapping_add(1 << 31),
        ] {
            assert_eq!(
                reply(&mut t, seg(RST, bad, 0, 0)),
                Err(NatError::RstOutOfWindow)
            );
            assert_eq!(t.get(&a, 1).unwrap().state, NatState::TcpEstablished);
        }
        assert_eq!(
            DropReason::from(NatError::RstOutOfWindow),
            DropReason::NatRstOutOfWindow
        );
        // In the window (a little behind or ahead, as RST seq = the ACK the pod sent): closes.
        reply(&mut t, seg(RST, next.wrapping_sub(20_000), 0, 0)).unwrap();
        assert_eq!(t.get(&a, 1).unwrap().state, NatState::TcpClose);
    }

    #[test]
    fn translated_out_of_window_rst_is_dropped() {
        let mut t = NatTable::new(NatConfig::default());
        let mut p = tcp_packet(POD, 40000, REMOTE, 443, SYN);
        let port = translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
        // tcp_packet uses sequence number 0x01020304 and ack 0 for every segment.
        let mut r = tcp_packet(REMOTE, 443, NODE, port, SYNACK);
        translate_ingress(&mut t, &mut r, 1).unwrap();
        let key = flow(NatProto::Tcp, 40000, REMOTE, 443);
        let mut rst = tcp_packet(REMOTE, 443, NODE, port, RST);
        rst[24..28].copy_from_slice(&0x7000_0000u32.to_be_bytes());
        tcp::Packet::new_unchecked(&mut rst[20..])
            .fill_checksum(IpAddr::V4(v4(REMOTE)), IpAddr::V4(v4(NODE)));
        assert_eq!(
            translate_ingress(&mut t, &mut rst, 2),
            Err(DropReason::NatRstOutOfWindow)
        );
        assert_eq!(t.get(&key, 2).unwrap().state, NatState::TcpEstablished);
        let mut rst = tcp_packet(REMOTE, 443, NODE, port, RST);
        assert_eq!(translate_ingress(&mut t, &mut rst, 2), Ok(v4(POD)));
        assert_eq!(t.get(&key, 2).unwrap().state, NatState::TcpClose);
    }

    #[test]
    fn the_seed_moves_node_ports() {
        let ports = |seed| {
            let mut t = NatTable::new(NatConfig {
                seed,
                ..NatConfig::default()
            });
            (0..16u16)
                .map(|i| {
                    t.egress(&flow(NatProto::Udp, 5000 + i, "203.0.113.1", 53), 0, 0)
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(1), ports(1));
        assert_ne!(ports(1), ports(2));
    }

    #[test]
    fn memory_estimate_is_sane() {
        let mut t = NatTable::new(NatConfig::default());
        let empty = t.bytes_per_entry();
        assert!((40..200).contains(&empty), "{empty}");
        for i in 0..10_000u32 {
            let f = FlowKey {
                proto: NatProto::Udp,
                pod_ip: Ipv4Addr::from(0x0af4_0100 + (i % 200)),
                pod_port: 10000 + (i / 200) as u16,
                remote_ip: Ipv4Addr::from(0xcb00_7100 + (i % 7)),
                remote_port: 53,
            };
            t.egress(&f, 0, 0).unwrap();
        }
        let b = t.bytes_per_entry();
        assert!((40..400).contains(&b), "{b}");
    }

    // ---- packets ----

    const POD: &str = "10.244.1.10";
    const POD_A: &str = POD;
    const NODE: &str = "172.16.2.2";
    const REMOTE: &str = "203.0.113.7";

    fn ip_packet(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + l4.len()];
        ipv4::Repr {
            src: v4(src),
            dst: v4(dst),
            protocol: proto,
            payload_len: l4.len(),
            ttl: 64,
            tos: 0,
            ident: 0x1234,
            dont_frag: true,
        }
        .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
        .unwrap();
        p[20..].copy_from_slice(l4);
        p
    }

    fn tcp_packet(src: &str, sp: u16, dst: &str, dp: u16, flags: u8) -> Vec<u8> {
        let mut l4 = vec![0u8; 24];
        l4[0..2].copy_from_slice(&sp.to_be_bytes());
        l4[2..4].copy_from_slice(&dp.to_be_bytes());
        l4[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        l4[20..24].copy_from_slice(b"data");
        let mut p = ip_packet(src, dst, ip_proto::TCP, &l4);
        tcp::Packet::new_unchecked(&mut p[20..])
            .fill_checksum(IpAddr::V4(v4(src)), IpAddr::V4(v4(dst)));
        p
    }

    fn udp_packet(src: &str, sp: u16, dst: &str, dp: u16, with_checksum: bool) -> Vec<u8> {
        let mut l4 = vec![0u8; 8 + 5];
        l4[0..2].copy_from_slice(&sp.to_be_bytes());
        l4[2..4].copy_from_slice(&dp.to_be_bytes());
        l4[4..6].copy_from_slice(&13u16.to_be_bytes());
        l4[8..].copy_from_slice(b"hello");
        let mut p = ip_packet(src, dst, ip_proto::UDP, &l4);
        if with_checksum {
            udp::Packet::new_unchecked(&mut p[20..]).fill_checksum_v4(v4(src), v4(dst));
        }
        p
    }

    fn icmp_echo(src: &str, dst: &str, request: bool, ident: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8 + 4];
        l4[0] = if request { 8 } else { 0 };
        l4[4..6].copy_from_slice(&ident.to_be_bytes());
        l4[6..8].copy_from_slice(&1u16.to_be_bytes());
        l4[8..].copy_from_slice(b"ping");
        let mut p = ip_packet(src, dst, ip_proto::ICMP, &l4);
        icmp::Packet::new_unchecked(&mut p[20..]).fill_checksum();
        p
    }

    /// An ICMP error from `from` to `to` quoting the first `quote_len` bytes of `orig`.
    fn icmp_error(from: &str, to: &str, t: u8, code: u8, orig: &[u8], quote_len: usize) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0] = t;
        l4[1] = code;
        if t == 3 && code == 4 {
            l4[6..8].copy_from_slice(&1400u16.to_be_bytes());
        }
        l4.extend_from_slice(&orig[..quote_len.min(orig.len())]);
        let mut p = ip_packet(from, to, ip_proto::ICMP, &l4);
        icmp::Packet::new_unchecked(&mut p[20..]).fill_checksum();
        p
    }

    fn assert_valid(p: &[u8]) {
        let ip = ipv4::Packet::new_checked(p).unwrap();
        assert!(ip.verify_checksum(), "ip checksum");
        let (s, d) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
        let l4 = &p[ip.header_len()..];
        match ip.protocol() {
            ip_proto::TCP => assert!(tcp::Packet::new_checked(l4).unwrap().verify_checksum(s, d)),
            ip_proto::UDP => assert!(udp::Packet::new_checked(l4).unwrap().verify_checksum(s, d)),
            ip_proto::ICMP => assert!(icmp::Packet::new_checked(l4).unwrap().verify_checksum()),
            _ => {}
        }
    }

    fn meta(p: &[u8]) -> wire::IpMeta {
        wire::parse_ip(p).unwrap()
    }

    #[test]
    fn tcp_round_trip() {
        let mut t = NatTable::new(NatConfig::default());
        let mut p = tcp_packet(POD, 40000, REMOTE, 443, SYN);
        let port = translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
        assert_valid(&p);
        let m = meta(&p);
        assert_eq!(m.src, IpAddr::V4(v4(NODE)));
        assert_eq!(m.ports(), Some((port, 443)));
        assert_eq!(&p[40..44], b"data");

        let mut r = tcp_packet(REMOTE, 443, NODE, port, SYNACK);
        assert_eq!(translate_ingress(&mut t, &mut r, 1), Ok(v4(POD)));
        assert_valid(&r);
        let m = meta(&r);
        assert_eq!(
            (m.src, m.dst),
            (IpAddr::V4(v4(REMOTE)), IpAddr::V4(v4(POD)))
        );
        assert_eq!(m.ports(), Some((443, 40000)));
        let key = flow(NatProto::Tcp, 40000, REMOTE, 443);
        assert_eq!(t.get(&key, 1).unwrap().state, NatState::TcpEstablished);

        // A reply to a port nobody holds.
        let mut r = tcp_packet(REMOTE, 443, NODE, port.wrapping_add(1), ACK);
        assert_eq!(
            translate_ingress(&mut t, &mut r, 1),
            Err(DropReason::NatNoMapping)
        );
    }

    #[test]
    fn udp_round_trip_with_and_without_checksum() {
        for with in [true, false] {
            let mut t = NatTable::new(NatConfig::default());
            let mut p = udp_packet(POD, 5353, REMOTE, 53, with);
            let port = translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
            assert_valid(&p);
            let csum = u16::from_be_bytes([p[26], p[27]]);
            assert_eq!(csum == 0, !with, "zero checksum means none and stays none");
            let mut r = udp_packet(REMOTE, 53, NODE, port, with);
            assert_eq!(translate_ingress(&mut t, &mut r, 1), Ok(v4(POD)));
            assert_valid(&r);
            assert_eq!(meta(&r).ports(), Some((53, 5353)));
        }
    }

    #[test]
    fn icmp_echo_round_trip() {
        let mut t = NatTable::new(NatConfig::default());
        let mut p = icmp_echo(POD, REMOTE, true, 0x4242);
        let id = translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
        assert_valid(&p);
        assert_eq!(meta(&p).icmp_id(), Some(id));
        let mut r = icmp_echo(REMOTE, NODE, false, id);
        assert_eq!(translate_ingress(&mut t, &mut r, 1), Ok(v4(POD)));
        assert_valid(&r);
        assert_eq!(meta(&r).icmp_id(), Some(0x4242));
        // An echo reply is not something a pod starts a mapping with.
        let mut q = icmp_echo(POD, REMOTE, false, 1);
        assert_eq!(
            translate_egress(&mut t, &mut q, v4(NODE), 0),
            Err(DropReason::Unsupported)
        );
    }

    /// Checks the quoted packet inside a translated ICMP error.
    fn quoted(r: &[u8]) -> (wire::IpMeta, &[u8]) {
        let q = &r[28..];
        let ip = ipv4::Packet::new_checked_header(q).unwrap();
        assert!(ip.verify_checksum(), "quoted ip checksum");
        assert_eq!(ip.src_addr(), v4(POD));
        assert_eq!(ip.dst_addr(), v4(REMOTE));
        (meta(q), q)
    }

    #[test]
    fn icmp_errors_are_translated_back() {
        let mut t = NatTable::new(NatConfig::default());
        // Fragmentation needed for a TCP segment, 8 bytes of transport quoted (RFC 792 minimum):
        // the quoted TCP checksum is not there and must not be touched.
        let mut p = tcp_packet(POD, 40000, REMOTE, 443, SYN);
        let port = translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
        let mut e = icmp_error("198.51.100.1", NODE, 3, 4, &p, 28);
        assert_eq!(translate_ingress(&mut t, &mut e, 1), Ok(v4(POD)));
        assert_valid(&e);
        assert_eq!(meta(&e).dst, IpAddr::V4(v4(POD)));
        assert_eq!(u16::from_be_bytes([e[26], e[27]]), 1400, "MTU kept");
        let q = &e[28..];
        let ip = ipv4::Packet::new_checked_header(q).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (v4(POD), v4(REMOTE)));
        assert_eq!(u16::from_be_bytes([q[20], q[21]]), 40000);
        assert_eq!(u16::from_be_bytes([q[22], q[23]]), 443);

        // Time exceeded for a whole UDP datagram: the quoted UDP checksum is restored too.
        let mut p = udp_packet(POD, 5353, REMOTE, 53, true);
        translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
        let mut e = icmp_error("198.51.100.1", NODE, 11, 0, &p, p.len());
        assert_eq!(translate_ingress(&mut t, &mut e, 1), Ok(v4(POD)));
        assert_valid(&e);
        let (m, q) = quoted(&e);
        assert_eq!(m.ports(), Some((5353, 53)));
        assert!(udp::Packet::new_checked(&q[20..])
            .unwrap()
            .verify_checksum(IpAddr::V4(v4(POD)), IpAddr::V4(v4(REMOTE))));

        // Destination unreachable about an echo request: the quoted identifier and ICMP checksum.
        let mut p = icmp_echo(POD, REMOTE, true, 0x4242);
        translate_egress(&mut t, &mut p, v4(NODE), 0).unwrap();
        let mut e = icmp_error(REMOTE, NODE, 3, 1, &p, p.len());
        assert_eq!(translate_ingress(&mut t, &mut e, 1), Ok(v4(POD)));
        assert_valid(&e);
        let (m, q) = quoted(&e);
        assert_eq!(m.icmp_id(), Some(0x4242));
        assert!(icmp::Packet::new_checked(&q[20..])
            .unwrap()
            .verify_checksum());

        // An error quoting a flow we never translated.
        let other = tcp_packet(NODE, port.wrapping_add(1), REMOTE, 443, SYN);
        let mut e = icmp_error("198.51.100.1", NODE, 3, 4, &other, 28);
        assert_eq!(
            translate_ingress(&mut t, &mut e, 1),
            Err(DropReason::NatNoMapping)
        );
        // A quote too short to hold the ports.
        let mut e = icmp_error("198.51.100.1", NODE, 3, 4, &p, 22);
        assert_eq!(
            translate_ingress(&mut t, &mut e, 1),
            Err(DropReason::Truncated)
        );
    }

    #[test]
    fn refuses_what_it_cannot_translate() {
        let mut t = NatTable::new(NatConfig::default());
        let n = v4(NODE);
        // A fragment.
        let mut p = udp_packet(POD, 1, REMOTE, 2, true);
        p[6] |= 0x20; // MF
        ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        assert_eq!(
            translate_egress(&mut t, &mut p, n, 0),
            Err(DropReason::Unsupported)
        );
        // Another protocol (GRE).
        let mut p = ip_packet(POD, REMOTE, 47, &[0; 8]);
        assert_eq!(
            translate_egress(&mut t, &mut p, n, 0),
            Err(DropReason::Unsupported)
        );
        // Garbage and truncation map to their parse errors.
        assert_eq!(
            translate_egress(&mut t, &mut [], n, 0),
            Err(DropReason::Truncated)
        );
        let mut p = tcp_packet(POD, 1, REMOTE, 2, SYN);
        assert_eq!(
            translate_egress(&mut t, &mut p[..30], n, 0),
            Err(DropReason::Truncated)
        );
        let mut p = tcp_packet(POD, 1, REMOTE, 2, SYN);
        p[10] ^= 0xff;
        assert_eq!(
            translate_egress(&mut t, &mut p, n, 0),
            Err(DropReason::BadChecksum)
        );
        assert!(t.is_empty());
    }

    #[test]
    fn hasher_spreads_keys() {
        let h = FxBuildHasher { seed: 1 };
        let mut low = std::collections::HashSet::new();
        for i in 0..4096u32 {
            // Keys differing only in the top octet of the remote address.
            let k = FlowKey {
                proto: NatProto::Tcp,
                pod_ip: v4(POD),
                pod_port: 1,
                remote_ip: Ipv4Addr::from(i << 20),
                remote_port: 80,
            };
            low.insert(h.hash_one(k) & 0xfff);
        }
        assert!(low.len() > 2000, "{}", low.len());
    }
}
