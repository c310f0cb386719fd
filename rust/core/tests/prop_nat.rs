//! The NAT table against `NatModel`, a plain map that implements the documented rules directly:
//! random sequences of new flows, replies, time steps and sweeps must leave both agreeing on
//! every mapping's node port, state and expiry, on every reply's owner, and on exhaustion.
//! The untrusted-pod rules are modelled too: only an opening packet creates a mapping, a pod
//! holds at most `max_entries_per_pod`, a full table evicts its oldest unanswered entry, and a
//! reply RST counts only in the window (the table's wrappers send sequence numbers 0, so the
//! window rule reduces to: before the remote's SYN+ACK, no reply RST is acceptable).
//! A second property translates random packets out and back and checks every checksum.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podrouter_core::nat::{
    translate_egress, translate_ingress, FlowKey, NatAddr, NatConfig, NatError, NatProto, NatState,
    NatTable,
};
use podrouter_core::wire::{self, icmp, ip_proto, ipv4, tcp, udp};
use podrouter_core::DropReason;
use proptest::prelude::*;

const LO: u16 = 61000;
const HI: u16 = 61002; // 3 ports for 4+ flows per endpoint: exhaustion is common

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn cfg() -> NatConfig {
    NatConfig {
        port_lo: LO,
        port_hi: HI,
        // Probing covers the whole range, so "exhausted" means exactly "every port in use".
        max_probe: 64,
        max_entries: 1 << 16,
        seed: 7,
        ..NatConfig::default()
    }
}

/// The documented creation rule, written out: a SYN without ACK or RST, UDP, ICMP echo.
fn model_opens(proto: NatProto, f: u8) -> bool {
    proto != NatProto::Tcp || (f & SYN != 0 && f & (ACK | RST) == 0)
}

/// The documented TCP / UDP / ICMP rules, written out independently of the table's code.
fn model_next(proto: NatProto, cur: Option<(NatState, u8)>, reply: bool, f: u8) -> (NatState, u8) {
    use NatState::*;
    let (syn, ack, fin, rst) = (f & SYN != 0, f & ACK != 0, f & FIN != 0, f & RST != 0);
    let my_fin = if reply { 2 } else { 1 };
    match proto {
        NatProto::Icmp => (Icmp, 0),
        NatProto::Udp => {
            if reply || cur.map(|c| c.0) == Some(UdpAssured) {
                (UdpAssured, 0)
            } else {
                (UdpUnreplied, 0)
            }
        }
        NatProto::Tcp => match cur {
            None if rst => (TcpClose, 0),
            None if syn && !ack => (TcpSynSent, 0),
            None if fin => (TcpFinWait, my_fin),
            None => (TcpEstablished, 0),
            Some((_, fins)) if rst => (TcpClose, fins),
            Some((TcpSynSent, _)) if reply && syn && ack => (TcpEstablished, 0),
            Some((TcpSynSent | TcpEstablished, fins)) if fin => (TcpFinWait, fins | my_fin),
            Some((TcpFinWait, fins)) if fin && (fins | my_fin) == 3 => (TcpTimeWait, 3),
            Some((TcpFinWait, fins)) if fin => (TcpFinWait, fins | my_fin),
            Some((TcpTimeWait | TcpClose, _)) if !reply && syn && !ack => (TcpSynSent, 0),
            Some(c) => c,
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct MEntry {
    port: u16,
    state: NatState,
    fins: u8,
    expires: u64,
    /// The remote's SYN+ACK was seen since the pod's last SYN.
    synced: bool,
    /// Any reply was seen (no eviction candidate).
    replied: bool,
    /// Creation order (eviction: the oldest unanswered first).
    born: u64,
}

/// An address family under test: how to make its table.
trait Fam: NatAddr {
    fn table(c: NatConfig) -> NatTable<Self>;
}

impl Fam for Ipv4Addr {
    fn table(c: NatConfig) -> NatTable<Self> {
        NatTable::new(c)
    }
}

impl Fam for Ipv6Addr {
    fn table(c: NatConfig) -> NatTable<Self> {
        NatTable::new_v6(c)
    }
}

/// A plain ordered map from flow to mapping; an entry is live while `now < expires`. The same
/// model serves both address families: the rules do not depend on the family.
#[derive(Debug)]
struct NatModel<A: NatAddr = Ipv4Addr> {
    map: BTreeMap<FlowKey<A>, MEntry>,
    births: u64,
}

impl<A: NatAddr> Default for NatModel<A> {
    fn default() -> Self {
        NatModel {
            map: BTreeMap::new(),
            births: 0,
        }
    }
}

impl<A: NatAddr> NatModel<A> {
    fn live(&self, k: &FlowKey<A>, now: u64) -> Option<MEntry> {
        self.map.get(k).copied().filter(|e| e.expires > now)
    }

    fn used_ports(&self, k: &FlowKey<A>, now: u64) -> Vec<u16> {
        self.map
            .iter()
            .filter(|(o, e)| {
                e.expires > now
                    && o.proto == k.proto
                    && o.remote_ip == k.remote_ip
                    && o.remote_port == k.remote_port
            })
            .map(|(_, e)| e.port)
            .collect()
    }

    /// Live flows towards `k`'s endpoint in `state`, with their ports: a new TCP connection (a
    /// SYN) may take over a CLOSE one like a free port, and a TIME-WAIT one when nothing else is left.
    fn in_state(&self, k: &FlowKey<A>, state: NatState, now: u64) -> Vec<(FlowKey<A>, u16)> {
        self.map
            .iter()
            .filter(|(o, e)| {
                e.expires > now
                    && o.proto == k.proto
                    && o.remote_ip == k.remote_ip
                    && o.remote_port == k.remote_port
                    && e.state == state
            })
            .map(|(o, e)| (*o, e.port))
            .collect()
    }

    fn owner(
        &self,
        proto: NatProto,
        rip: A,
        rport: u16,
        port: u16,
        now: u64,
    ) -> Option<FlowKey<A>> {
        self.map
            .iter()
            .find(|(k, e)| {
                e.expires > now
                    && e.port == port
                    && k.proto == proto
                    && k.remote_ip == rip
                    && k.remote_port == rport
            })
            .map(|(k, _)| *k)
    }

    /// Returns false if the packet was refused (a reply RST out of the window).
    fn touch(&mut self, k: &FlowKey<A>, reply: bool, flags: u8, now: u64, c: &NatConfig) -> bool {
        let e = self.map.get_mut(k).unwrap();
        let tcp = k.proto == NatProto::Tcp;
        if tcp && reply && flags & RST != 0 && !e.synced {
            return false;
        }
        let (state, fins) = model_next(k.proto, Some((e.state, e.fins)), reply, flags);
        if tcp && reply && flags & (SYN | ACK | RST) == SYN | ACK {
            e.synced = true;
        }
        if tcp && !reply && state == NatState::TcpSynSent && flags & (SYN | ACK) == SYN {
            e.synced = false;
        }
        e.replied |= reply;
        e.state = state;
        e.fins = fins;
        e.expires = now + u64::from(c.timeout(state));
        true
    }

    fn held_by(&self, pod: A) -> usize {
        self.map.keys().filter(|k| k.pod_ip == pod).count()
    }

    fn insert(&mut self, k: FlowKey<A>, port: u16, flags: u8, now: u64, c: &NatConfig) {
        let (state, fins) = model_next(k.proto, None, false, flags);
        self.births += 1;
        self.map.insert(
            k,
            MEntry {
                port,
                state,
                fins,
                expires: now + u64::from(c.timeout(state)),
                synced: false,
                replied: false,
                born: self.births,
            },
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Egress {
        flow: usize,
        flags: u8,
    },
    Reply {
        flow: usize,
        flags: u8,
        port_off: u16,
    },
    Advance(u64),
    Expire(usize),
}

fn flags() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![
        SYN,
        SYN | ACK,
        ACK,
        FIN | ACK,
        RST,
        RST | ACK,
        0,
        0x08 | ACK,
    ])
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0usize..24, flags()).prop_map(|(flow, flags)| Op::Egress { flow, flags }),
        4 => (0usize..24, flags(), prop_oneof![3 => Just(0u16), 1 => 1u16..4])
            .prop_map(|(flow, flags, port_off)| Op::Reply { flow, flags, port_off }),
        2 => prop::sample::select(vec![0u64, 1, 9, 10, 29, 30, 60, 119, 120, 121, 7439, 7440])
            .prop_map(Op::Advance),
        1 => prop::sample::select(vec![1usize, 3, 10, 1000]).prop_map(Op::Expire),
    ]
}

/// 24 flows: 3 protocols x 2 pods x 2 pod ports x 2 remote endpoints. Each endpoint is shared by
/// 4 flows per protocol, one more than there are node ports.
fn pool() -> Vec<FlowKey> {
    let mut v = Vec::new();
    for proto in [NatProto::Tcp, NatProto::Udp, NatProto::Icmp] {
        for pod in [[10, 244, 1, 10], [10, 244, 1, 11]] {
            for pod_port in [40000u16, 40001] {
                for (remote, rport) in [([203, 0, 113, 1], 443u16), ([203, 0, 113, 1], 80)] {
                    v.push(FlowKey {
                        proto,
                        pod_ip: Ipv4Addr::from(pod),
                        pod_port,
                        remote_ip: Ipv4Addr::from(remote),
                        remote_port: if proto == NatProto::Icmp { 0 } else { rport },
                    });
                }
            }
        }
    }
    v
}

/// Runs `ops` against the table and the model over `flows`, checking after every step.
fn check_model<A: Fam>(flows: &[FlowKey<A>], ops: Vec<Op>) -> Result<(), TestCaseError> {
    check_model_with(cfg(), flows, ops)
}

fn check_model_with<A: Fam>(
    c: NatConfig,
    flows: &[FlowKey<A>],
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut t = A::table(c.clone());
    let mut m = NatModel::<A>::default();
    let mut now = 1000u64;
    for op in ops {
        match op {
            Op::Egress { flow, flags } => {
                let k = flows[flow % flows.len()];
                let got = t.egress(&k, flags, now);
                if let Some(e) = m.live(&k, now) {
                    prop_assert_eq!(got, Ok(e.port));
                    m.touch(&k, false, flags, now, &c);
                } else if !model_opens(k.proto, flags) {
                    prop_assert_eq!(got, Err(NatError::NoMapping));
                } else {
                    let used = m.used_ports(&k, now);
                    let free = usize::from(HI - LO + 1) - used.len();
                    let opening = k.proto == NatProto::Tcp && flags & (SYN | ACK | RST) == SYN;
                    let (reset, tw) = if opening {
                        (
                            m.in_state(&k, NatState::TcpClose, now),
                            m.in_state(&k, NatState::TcpTimeWait, now),
                        )
                    } else {
                        (vec![], vec![])
                    };
                    if free > 0 || !reset.is_empty() || !tw.is_empty() {
                        let p = got.map_err(|e| {
                            TestCaseError::fail(format!("{e:?} with {used:?} used"))
                        })?;
                        prop_assert!((LO..=HI).contains(&p));
                        // a free port or a reset mapping's; a TIME-WAIT one only if neither exists
                        let taken = reset
                            .iter()
                            .chain(if free == 0 && reset.is_empty() {
                                &tw[..]
                            } else {
                                &[]
                            })
                            .find(|(_, cp)| *cp == p)
                            .map(|(o, _)| *o);
                        prop_assert!(
                            taken.is_some() || !used.contains(&p),
                            "port {} taken from {:?}",
                            p,
                            used
                        );
                        if let Some(old) = taken {
                            m.map.remove(&old);
                        }
                        m.insert(k, p, flags, now, &c);
                    } else {
                        prop_assert_eq!(got, Err(NatError::Exhausted));
                    }
                }
            }
            Op::Reply {
                flow,
                flags,
                port_off,
            } => {
                let k = flows[flow % flows.len()];
                let port = match m.live(&k, now) {
                    Some(e) => LO + (e.port - LO + port_off) % (HI - LO + 1),
                    None => LO + port_off,
                };
                let want = m.owner(k.proto, k.remote_ip, k.remote_port, port, now);
                let got = t.ingress(k.proto, k.remote_ip, k.remote_port, port, flags, now);
                match want {
                    Some(owner) if m.touch(&owner, true, flags, now, &c) => {
                        prop_assert_eq!(got, Some(owner));
                    }
                    _ => prop_assert_eq!(got, None),
                }
            }
            Op::Advance(dt) => now += dt,
            Op::Expire(budget) => {
                t.expire(now, budget);
                let live = m.map.values().filter(|e| e.expires > now).count();
                prop_assert!(t.len() >= live);
                if budget >= 1000 {
                    prop_assert_eq!(t.len(), live, "a full sweep leaves only live entries");
                }
            }
        }
        for k in flows {
            let got = t.get(k, now).map(|e| (e.node_port, e.state, e.expires));
            let want = m.live(k, now).map(|e| (e.port, e.state, e.expires));
            prop_assert_eq!(got, want, "flow {:?} at {}", k, now);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_model(ops in prop::collection::vec(op(), 1..120), extra_pool in 0usize..8) {
        let mut flows = pool();
        // Some extra flows to the first endpoint make exhaustion bite harder.
        for i in 0..extra_pool {
            let mut f = flows[0];
            f.pod_port = 50000 + i as u16;
            flows.push(f);
        }
        check_model(&flows, ops)?;
    }

    /// The same rules on the IPv6 table: the pool with every address mapped into IPv6.
    #[test]
    fn v6_table_matches_model(ops in prop::collection::vec(op(), 1..120), extra_pool in 0usize..8) {
        let mut flows: Vec<FlowKey<Ipv6Addr>> = pool()
            .into_iter()
            .map(|f| FlowKey {
                proto: f.proto,
                pod_ip: v6_of(f.pod_ip, 0xfd00),
                pod_port: f.pod_port,
                remote_ip: v6_of(f.remote_ip, 0x2001),
                remote_port: f.remote_port,
            })
            .collect();
        for i in 0..extra_pool {
            let mut f = flows[0];
            f.pod_port = 50000 + i as u16;
            flows.push(f);
        }
        check_model(&flows, ops)?;
    }

    /// TCP only, five connections for three ports towards one server: closing mappings, full
    /// ranges and SYNs that take a closing port over are the common case here.
    #[test]
    fn tcp_port_takeover_matches_model(ops in prop::collection::vec(op(), 1..150)) {
        let flows: Vec<FlowKey> = (0..5u16)
            .map(|i| FlowKey {
                proto: NatProto::Tcp,
                pod_ip: Ipv4Addr::new(10, 244, 1, 10),
                pod_port: 40000 + i,
                remote_ip: Ipv4Addr::new(203, 0, 113, 1),
                remote_port: 443,
            })
            .collect();
        check_model(&flows, ops)?;
    }
}

/// `a` in the last 32 bits of an IPv6 address whose first 16 bits are `top` (the middle bits are
/// set too, so the two halves the table hashes both vary).
fn v6_of(a: Ipv4Addr, top: u16) -> Ipv6Addr {
    let [w, x, y, z] = a.octets();
    Ipv6Addr::new(
        top,
        0xdb8,
        0,
        u16::from(z),
        0,
        0,
        u16::from_be_bytes([w, x]),
        u16::from_be_bytes([y, z]),
    )
}

/// Per-pod cap and eviction, without time passing (every entry is live, so "held" is "live"):
/// 3 pods open flows to distinct endpoints (ports never run out) and get some replies.
fn check_caps(cap: usize, max: usize, ops: Vec<(bool, u8, u8)>) -> Result<(), TestCaseError> {
    let c = NatConfig {
        port_lo: 61000,
        port_hi: 61999,
        max_entries: max,
        max_entries_per_pod: cap,
        ..cfg()
    };
    let flow = |sel: u8| FlowKey {
        proto: if sel & 1 == 0 {
            NatProto::Tcp
        } else {
            NatProto::Udp
        },
        pod_ip: Ipv4Addr::new(10, 244, 1, 10 + sel % 3),
        pod_port: 40000,
        remote_ip: Ipv4Addr::new(203, 0, 113, sel),
        remote_port: 443,
    };
    let mut t = NatTable::new(c.clone());
    let mut m = NatModel::default();
    let mut evicted = 0;
    for (reply, sel, f) in ops {
        let k = flow(sel);
        let flags = [SYN, ACK, SYN | ACK, RST][usize::from(f % 4)];
        if reply {
            let e = m.map.get(&k).copied();
            let got = t.ingress(
                k.proto,
                k.remote_ip,
                k.remote_port,
                e.map_or(61000, |e| e.port),
                SYN | ACK,
                0,
            );
            prop_assert_eq!(got, e.map(|_| k));
            if e.is_some() {
                m.touch(&k, true, SYN | ACK, 0, &c);
            }
            continue;
        }
        let got = t.egress(&k, flags, 0);
        if let Some(e) = m.map.get(&k).copied() {
            prop_assert_eq!(got, Ok(e.port));
            m.touch(&k, false, flags, 0, &c);
        } else if !model_opens(k.proto, flags) {
            prop_assert_eq!(got, Err(NatError::NoMapping));
        } else if m.held_by(k.pod_ip) >= cap {
            prop_assert_eq!(got, Err(NatError::PodLimit));
        } else {
            if m.map.len() >= max {
                let victim = m
                    .map
                    .iter()
                    .filter(|(_, e)| !e.replied)
                    .min_by_key(|(_, e)| e.born)
                    .map(|(k, _)| *k);
                match victim {
                    Some(v) => {
                        m.map.remove(&v);
                        evicted += 1;
                    }
                    None => {
                        prop_assert_eq!(got, Err(NatError::TableFull));
                        continue;
                    }
                }
            }
            let p = got.map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            m.insert(k, p, flags, 0, &c);
        }
        prop_assert_eq!(t.len(), m.map.len());
        prop_assert_eq!(t.evictions(), evicted);
        for sel in 0..=255u8 {
            let k = flow(sel);
            prop_assert_eq!(
                t.lookup(&k, 0),
                m.map.get(&k).map(|e| e.port),
                "flow {:?}",
                k
            );
        }
        for pod in 0..3 {
            let a = Ipv4Addr::new(10, 244, 1, 10 + pod);
            prop_assert_eq!(t.pod_entries(a), m.held_by(a));
            prop_assert!(t.pod_entries(a) <= cap);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn caps_and_eviction_match_model(
        cap in 1usize..12,
        max in 1usize..20,
        ops in prop::collection::vec((prop::bool::weighted(0.3), any::<u8>(), 0u8..6), 1..200),
    ) {
        // f in 4..6 maps to SYN / ACK again through `% 4`; SYN-heavy on purpose.
        check_caps(cap, max, ops)?;
    }
}

// ---- packets ----

fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8], ident: u16) -> Vec<u8> {
    let mut p = vec![0u8; 20 + l4.len()];
    ipv4::Repr {
        src,
        dst,
        protocol: proto,
        payload_len: l4.len(),
        ttl: 64,
        tos: 0,
        ident,
        dont_frag: true,
    }
    .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
    .unwrap();
    p[20..].copy_from_slice(l4);
    p
}

/// A TCP, UDP (with or without checksum) or ICMP echo packet with a random payload.
fn build(
    kind: u8,
    src: Ipv4Addr,
    sp: u16,
    dst: Ipv4Addr,
    dp: u16,
    payload: &[u8],
    echo_request: bool,
) -> Vec<u8> {
    let (s, d) = (IpAddr::V4(src), IpAddr::V4(dst));
    match kind {
        0 => {
            let mut l4 = vec![0u8; 20];
            l4[0..2].copy_from_slice(&sp.to_be_bytes());
            l4[2..4].copy_from_slice(&dp.to_be_bytes());
            l4[12] = 5 << 4;
            l4[13] = if echo_request { SYN } else { SYN | ACK };
            l4.extend_from_slice(payload);
            let mut p = ip_packet(src, dst, ip_proto::TCP, &l4, sp);
            tcp::Packet::new_unchecked(&mut p[20..]).fill_checksum(s, d);
            p
        }
        1 | 2 => {
            let mut l4 = vec![0u8; 8];
            l4[0..2].copy_from_slice(&sp.to_be_bytes());
            l4[2..4].copy_from_slice(&dp.to_be_bytes());
            l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(payload);
            let mut p = ip_packet(src, dst, ip_proto::UDP, &l4, sp);
            if kind == 1 {
                udp::Packet::new_unchecked(&mut p[20..]).fill_checksum(s, d);
            }
            p
        }
        _ => {
            let mut l4 = vec![if echo_request { 8 } else { 0 }, 0, 0, 0];
            l4.extend_from_slice(&(if echo_request { sp } else { dp }).to_be_bytes());
            l4.extend_from_slice(&[0, 1]);
            l4.extend_from_slice(payload);
            let mut p = ip_packet(src, dst, ip_proto::ICMP, &l4, sp);
            icmp::Packet::new_unchecked(&mut p[20..]).fill_checksum();
            p
        }
    }
}

fn checksums_ok(p: &[u8]) -> bool {
    let ip = ipv4::Packet::new_checked(p).unwrap();
    let (s, d) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
    let l4 = &p[20..];
    ip.verify_checksum()
        && match ip.protocol() {
            ip_proto::TCP => tcp::Packet::new_checked(l4).unwrap().verify_checksum(s, d),
            ip_proto::UDP => udp::Packet::new_checked(l4).unwrap().verify_checksum(s, d),
            _ => icmp::Packet::new_checked(l4).unwrap().verify_checksum(),
        }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn packets_translate_out_and_back(
        kind in 0u8..4,
        pod in any::<u32>(), remote in any::<u32>(), node in any::<u32>(),
        sp in any::<u16>(), dp in any::<u16>(),
        payload in prop::collection::vec(any::<u8>(), 0..40),
        seed in any::<u64>(),
    ) {
        let (pod, remote, node) = (Ipv4Addr::from(pod), Ipv4Addr::from(remote), Ipv4Addr::from(node));
        let mut t = NatTable::new(NatConfig { seed, ..NatConfig::default() });
        let mut out = build(kind, pod, sp, remote, dp, &payload, true);
        let np = translate_egress(&mut t, &mut out, node, 0).unwrap();
        prop_assert!(checksums_ok(&out));
        let m = wire::parse_ip(&out).unwrap();
        prop_assert_eq!(m.src, IpAddr::V4(node));
        prop_assert_eq!(m.dst, IpAddr::V4(remote));
        if kind == 2 {
            prop_assert_eq!(&out[26..28], &[0, 0], "no UDP checksum stays none");
        }
        prop_assert_eq!(&out[out.len() - payload.len()..], &payload[..]);

        let mut back = if kind == 3 {
            build(kind, remote, 0, node, np, &payload, false)
        } else {
            build(kind, remote, dp, node, np, &payload, false)
        };
        prop_assert_eq!(translate_ingress(&mut t, &mut back, 1), Ok(pod));
        prop_assert!(checksums_ok(&back));
        let m = wire::parse_ip(&back).unwrap();
        prop_assert_eq!(m.dst, IpAddr::V4(pod));
        match kind {
            3 => prop_assert_eq!(m.icmp_id(), Some(sp)),
            _ => prop_assert_eq!(m.ports(), Some((dp, sp))),
        }
        // The same reply from another remote port (or address) is not ours.
        if kind != 3 {
            let mut stray = build(kind, remote, dp.wrapping_add(1), node, np, &payload, false);
            prop_assert_eq!(translate_ingress(&mut t, &mut stray, 1), Err(DropReason::NatNoMapping));
        }
    }
}
