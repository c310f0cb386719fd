//! The NAT table against a plain map, driven by arbitrary operation sequences, plus the packet
//! translators on arbitrary bytes.
//!
//! Each 4-byte record is one operation: `[op, a, b, c]`. The map model keeps, per flow, the node
//! port and expiry (state transitions come from `nat::next_state`; their rules are checked
//! independently by tests/prop_nat.rs). Checked after every step: a live flow keeps its port,
//! a new flow gets a port in range that no live flow to the same remote endpoint holds, the
//! table refuses only when every port towards that endpoint is taken, replies find exactly the
//! model's owner, and a full sweep leaves exactly the live flows. The untrusted-pod rules: only an
//! opening packet (`nat::opens_flow`) creates a mapping, and a reply RST before the remote's
//! SYN+ACK is refused (the table's wrappers send sequence numbers 0, after which every RST lies in
//! the window).
#![no_main]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use podrouter_core::nat::{
    self, next_state, Dir, FlowKey, NatConfig, NatError, NatProto, NatState, NatTable,
};

const LO: u16 = 40000;
const HI: u16 = 40003;

#[derive(Clone, Copy)]
struct M {
    port: u16,
    state: NatState,
    fins: u8,
    expires: u64,
    synced: bool,
}

fn flow(sel: u8) -> FlowKey {
    let proto = [NatProto::Tcp, NatProto::Udp, NatProto::Icmp][usize::from(sel % 3)];
    FlowKey {
        proto,
        pod_ip: Ipv4Addr::new(10, 244, 1, 10 + (sel >> 2) % 3),
        pod_port: 1000 + u16::from((sel >> 4) % 4),
        remote_ip: Ipv4Addr::new(203, 0, 113, 1 + (sel >> 6) % 2),
        remote_port: if proto == NatProto::Icmp { 0 } else { 443 },
    }
}

/// Both flows go to the same remote endpoint, so they draw node ports from one pool.
fn same_remote(a: &FlowKey, b: &FlowKey) -> bool {
    (a.proto, a.remote_ip, a.remote_port) == (b.proto, b.remote_ip, b.remote_port)
}

/// The model entry after a packet of flow `k` with TCP flags `flags` went `dir`: `cur` is the
/// live entry, `None` for a mapping the packet creates.
fn step(
    cfg: &NatConfig,
    k: &FlowKey,
    cur: Option<M>,
    port: u16,
    dir: Dir,
    flags: u8,
    now: u64,
) -> M {
    let (state, fins) = next_state(k.proto, cur.map(|e| (e.state, e.fins)), dir, flags);
    let tcp = k.proto == NatProto::Tcp;
    let mut synced = cur.is_some_and(|e| e.synced);
    if tcp && dir == Dir::Reply && flags & 0x16 == 0x12 {
        synced = true;
    }
    if tcp && dir == Dir::Orig && state == NatState::TcpSynSent && flags & 0x12 == 0x02 {
        synced = false;
    }
    M {
        port,
        state,
        fins,
        expires: now + u64::from(cfg.timeout(state)),
        synced,
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = NatConfig {
        port_lo: LO,
        port_hi: HI,
        max_probe: 16,
        max_entries: 1 << 12,
        tcp_established: 50,
        ..NatConfig::default()
    };
    let mut t = NatTable::new(cfg.clone());
    let mut m: BTreeMap<FlowKey, M> = BTreeMap::new();
    let mut now = 0u64;
    let live = |m: &BTreeMap<FlowKey, M>, k: &FlowKey, now: u64| {
        m.get(k).copied().filter(|e| e.expires > now)
    };
    for rec in data.chunks(4) {
        let [op, a, b, c] = [0, 1, 2, 3].map(|i| rec.get(i).copied().unwrap_or(0));
        match op % 6 {
            0 | 1 => {
                let k = flow(a);
                let got = t.egress(&k, b, now);
                if let Some(e) = live(&m, &k, now) {
                    assert_eq!(got, Ok(e.port));
                    m.insert(k, step(&cfg, &k, Some(e), e.port, Dir::Orig, b, now));
                } else if !nat::opens_flow(k.proto, b) {
                    assert_eq!(got, Err(NatError::NoMapping));
                } else {
                    let used: Vec<u16> = m
                        .iter()
                        .filter(|(o, e)| e.expires > now && same_remote(o, &k))
                        .map(|(_, e)| e.port)
                        .collect();
                    // A SYN may take a reset (CLOSE) mapping's port like a free one, and a
                    // TIME-WAIT mapping's when neither is left; the owner is forgotten.
                    let opening = k.proto == NatProto::Tcp && b & 0x16 == 0x02;
                    let owned_in = |state: NatState| -> Vec<(FlowKey, u16)> {
                        m.iter()
                            .filter(|(o, e)| {
                                opening && e.expires > now && e.state == state && same_remote(o, &k)
                            })
                            .map(|(o, e)| (*o, e.port))
                            .collect()
                    };
                    let (reset, tw) = (
                        owned_in(NatState::TcpClose),
                        owned_in(NatState::TcpTimeWait),
                    );
                    let free = usize::from(HI - LO + 1) - used.len();
                    if free == 0 && (!reset.is_empty() || !tw.is_empty()) {
                        let p = got.expect("a reset or TIME-WAIT port can be taken over");
                        let pool = if reset.is_empty() { &tw } else { &reset };
                        let (old, _) = *pool
                            .iter()
                            .find(|(_, cp)| *cp == p)
                            .expect("the port taken over was a reset one, or TIME-WAIT if none");
                        m.remove(&old);
                        m.insert(k, step(&cfg, &k, None, p, Dir::Orig, b, now));
                    } else if used.len() == usize::from(HI - LO + 1) {
                        assert_eq!(got, Err(NatError::Exhausted));
                    } else {
                        let p = got.expect("a free port exists");
                        assert!((LO..=HI).contains(&p));
                        if used.contains(&p) {
                            // probe order met a reset mapping before the free port
                            let (old, _) = *reset
                                .iter()
                                .find(|(_, cp)| *cp == p)
                                .expect("a live port is taken only from a reset mapping");
                            m.remove(&old);
                        }
                        m.insert(k, step(&cfg, &k, None, p, Dir::Orig, b, now));
                    }
                }
            }
            2 => {
                let k = flow(a);
                let port = LO + u16::from(c) % (HI - LO + 1);
                let owner = m
                    .iter()
                    .find(|(o, e)| e.expires > now && e.port == port && same_remote(o, &k))
                    .map(|(o, _)| *o)
                    .filter(|o| o.proto != NatProto::Tcp || b & 0x04 == 0 || m[o].synced);
                assert_eq!(
                    t.ingress(k.proto, k.remote_ip, k.remote_port, port, b, now),
                    owner
                );
                if let Some(o) = owner {
                    let e = m[&o];
                    m.insert(o, step(&cfg, &o, Some(e), e.port, Dir::Reply, b, now));
                }
            }
            3 => now += u64::from(a % 64),
            4 => {
                t.expire(now, usize::from(a));
                let n = m.values().filter(|e| e.expires > now).count();
                assert!(t.len() >= n);
                if a == 255 {
                    t.expire(now, usize::MAX);
                    assert_eq!(t.len(), n);
                }
            }
            _ => {
                // The translators on arbitrary bytes (the rest of the input): no panic, and
                // whatever they accept still parses afterwards.
                let at = 4 * usize::from(a) % data.len().max(1);
                let mut pkt = data[at..].to_vec();
                if nat::translate_egress(&mut t, &mut pkt, Ipv4Addr::new(172, 16, 2, 2), now)
                    .is_ok()
                {
                    assert!(podrouter_core::wire::parse_ip(&pkt).is_ok());
                }
                let mut pkt = data[at..].to_vec();
                if nat::translate_ingress(&mut t, &mut pkt, now).is_ok() {
                    assert!(podrouter_core::wire::parse_ip(&pkt).is_ok());
                }
                // Those may have added flows the model does not know: start over.
                t = NatTable::new(cfg.clone());
                m.clear();
            }
        }
        for sel in 0..=255u8 {
            let k = flow(sel);
            let got = t.get(&k, now).map(|e| (e.node_port, e.expires));
            let want = live(&m, &k, now).map(|e| (e.port, e.expires));
            assert_eq!(got, want);
        }
    }
});
