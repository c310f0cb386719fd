//! Criterion benchmarks of the per-packet core:
//!
//! * `lpm/{v4,v6}/{1000,100000}/{podrouter,ip_network_table}`: one lookup, our poptrie and the
//!   reference crate side by side on the same random table and the same queries (half anywhere,
//!   half inside a random prefix, so deep paths are exercised too).
//! * `datapath/egress_vxlan/{64,1400}`: parse + classify + VXLAN encapsulation of one packet,
//!   through the one-packet API (`datapath::egress` over the egress entry point).
//! * `egress/vxlan/{64,1400}`, `egress/vxlan_tso/64000`: the entry point the I/O engine calls for
//!   every TUN read (`egress::egress`), outputs queued as the engine queues them; the TSO case
//!   segments a 64 KB TCP super-packet into 45 segments and encapsulates each (one GSO train).
//! * `nat/{lookup_hit,lookup_miss,egress_hit}/1M`: the masquerade table holding 1M flows.
//! * `nat_snapshot/{export,encode}/{10k,65k}`: one NAT snapshot write's copy (under the NAT lock)
//!   and encoding (outside it).
//!
//! `PODROUTER_BENCH_QUICK=1` shortens every measurement (about a minute in all) for smoke runs.
//! Table sizes and NAT bytes per entry are printed to stderr.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::{DerefMut, Range};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use ip_network::{Ipv4Network, Ipv6Network};
use ip_network_table::IpNetworkTable;
use podrouter_core::datapath::{self, EgressAction, MAX_HEADROOM};
use podrouter_core::egress;
use podrouter_core::lpm::{Lpm4, Lpm6};
use podrouter_core::nat::{self, FlowKey, NatConfig, NatProto, NatTable, NatTable6};
use podrouter_core::nat_snapshot;
use podrouter_core::offload::csum;
use podrouter_core::offload::vnet::{self, VnetHdr};
use podrouter_core::wire::{ip_proto, ipv4, udp};
use podrouter_core::{reference, DropReason, RoutingMode, Tables};

/// xorshift64: deterministic inputs without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn u128(&mut self) -> u128 {
        u128::from(self.next()) << 64 | u128::from(self.next())
    }
}

fn quick() -> bool {
    std::env::var_os("PODROUTER_BENCH_QUICK").is_some_and(|v| v != "0")
}

fn configure<M: criterion::measurement::Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    if quick() {
        g.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .sample_size(20);
    } else {
        g.warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
    }
}

const QUERIES: usize = 1 << 16;

/// IPv4 prefixes: random networks, lengths uniform in 8..=32 (a third longer than /24, so the
/// deep levels are not an afterthought).
fn v4_table(n: usize, r: &mut Rng) -> Vec<(Ipv4Addr, u8, u32)> {
    (0..n)
        .map(|i| {
            let len = 8 + (r.next() % 25) as u8;
            (Ipv4Addr::from(r.next() as u32), len, i as u32)
        })
        .collect()
}

/// IPv6 prefixes in 2000::/3: lengths uniform in 16..=64, plus 10 % host routes.
fn v6_table(n: usize, r: &mut Rng) -> Vec<(Ipv6Addr, u8, u32)> {
    (0..n)
        .map(|i| {
            let a = global6(r.u128());
            let len = if r.next() % 100 < 10 {
                128
            } else {
                16 + (r.next() % 49) as u8
            };
            (Ipv6Addr::from(a), len, i as u32)
        })
        .collect()
}

fn global6(a: u128) -> u128 {
    a & !(0xe000u128 << 112) | (0x2000u128 << 112)
}

fn bench_lpm(c: &mut Criterion) {
    let mut g = c.benchmark_group("lpm");
    configure(&mut g);
    for n in [1_000usize, 100_000] {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);

        let p4 = v4_table(n, &mut r);
        let ours = Lpm4::build(&p4).unwrap();
        let mut reference = IpNetworkTable::new();
        for &(a, l, v) in &p4 {
            reference.insert(Ipv4Network::new_truncate(a, l).unwrap(), v);
        }
        eprintln!(
            "lpm v4 {n} prefixes: {} distinct, {} KiB",
            ours.len(),
            ours.memory_bytes() / 1024
        );
        let q4: Vec<Ipv4Addr> = (0..QUERIES)
            .map(|i| {
                if i % 2 == 0 {
                    Ipv4Addr::from(r.next() as u32)
                } else {
                    let (a, l, _) = p4[r.next() as usize % n];
                    let host = (r.next() as u32).checked_shr(u32::from(l)).unwrap_or(0);
                    Ipv4Addr::from(u32::from(a) | host)
                }
            })
            .collect();
        // Both implementations must answer alike, or the comparison is meaningless.
        for &a in q4.iter().take(1000) {
            assert_eq!(
                ours.lookup(a),
                reference.longest_match_ipv4(a).map(|(_, v)| *v)
            );
        }
        let mut i = 0usize;
        g.bench_function(format!("v4/{n}/podrouter"), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                ours.lookup(black_box(q4[i]))
            })
        });
        g.bench_function(format!("v4/{n}/ip_network_table"), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                reference
                    .longest_match_ipv4(black_box(q4[i]))
                    .map(|(_, v)| *v)
            })
        });

        let p6 = v6_table(n, &mut r);
        let ours6 = Lpm6::build(&p6).unwrap();
        let mut reference6 = IpNetworkTable::new();
        for &(a, l, v) in &p6 {
            reference6.insert(Ipv6Network::new_truncate(a, l).unwrap(), v);
        }
        eprintln!(
            "lpm v6 {n} prefixes: {} distinct, {} KiB",
            ours6.len(),
            ours6.memory_bytes() / 1024
        );
        let q6: Vec<Ipv6Addr> = (0..QUERIES)
            .map(|i| {
                let rnd = r.u128();
                if i % 2 == 0 {
                    Ipv6Addr::from(global6(rnd))
                } else {
                    let (a, l, _) = p6[r.next() as usize % n];
                    Ipv6Addr::from(u128::from(a) | rnd.checked_shr(u32::from(l)).unwrap_or(0))
                }
            })
            .collect();
        for &a in q6.iter().take(1000) {
            assert_eq!(
                ours6.lookup(a),
                reference6.longest_match_ipv6(a).map(|(_, v)| *v)
            );
        }
        g.bench_function(format!("v6/{n}/podrouter"), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                ours6.lookup(black_box(q6[i]))
            })
        });
        g.bench_function(format!("v6/{n}/ip_network_table"), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                reference6
                    .longest_match_ipv6(black_box(q6[i]))
                    .map(|(_, v)| *v)
            })
        });
    }
    g.finish();
}

/// node1 of the reference topology (core `reference`) in tunnel mode, with 250 peers (one /24
/// each) behind the gateway.
fn tables() -> Tables {
    let peers = (2..252u32)
        .map(|i| {
            let addr = Ipv4Addr::new(172, 16, (i >> 8) as u8 + 3, i as u8);
            reference::peer(
                &format!("node{i}"),
                addr.into(),
                &format!("10.244.{i}.0/24"),
                false,
            )
        })
        .collect();
    reference::tables(&reference::node1(RoutingMode::Tunnel, peers))
}

/// A UDP/IPv4 packet of `total` bytes at `MAX_HEADROOM`.
fn udp_packet(total: usize, dst: Ipv4Addr) -> Vec<u8> {
    let src = Ipv4Addr::new(10, 244, 1, 10);
    let mut b = vec![0x5au8; MAX_HEADROOM + total];
    let p = &mut b[MAX_HEADROOM..];
    ipv4::Repr {
        src,
        dst,
        protocol: ip_proto::UDP,
        payload_len: total - 20,
        ttl: 63,
        tos: 0,
        ident: 1,
        dont_frag: true,
    }
    .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
    .unwrap();
    let mut u = udp::Packet::new_unchecked(&mut p[20..]);
    u.set_src_port(40000);
    u.set_dst_port(5201);
    u.set_len((total - 20) as u16);
    u.fill_checksum_v4(src, dst);
    b
}

fn bench_datapath(c: &mut Criterion) {
    let t = tables();
    let mut g = c.benchmark_group("datapath");
    configure(&mut g);
    for size in [64usize, 1400] {
        let mut buf = udp_packet(size, Ipv4Addr::new(10, 244, 77, 5));
        let a = datapath::egress(&t, None, &mut buf, MAX_HEADROOM, size, 0);
        assert!(matches!(a, EgressAction::Tunnel { .. }), "{a:?}");
        g.throughput(Throughput::Bytes(size as u64));
        // The inner packet is left untouched and the headroom is rewritten each time, so the
        // same buffer can be fed again.
        g.bench_function(format!("egress_vxlan/{size}"), |b| {
            b.iter(|| datapath::egress(&t, None, black_box(&mut buf), MAX_HEADROOM, size, 0))
        });
    }
    g.finish();
}

/// What the I/O engine's sink does with the core's outputs: queue them for the batch's sends.
#[derive(Default)]
struct Queue {
    units: Vec<egress::TunnelUnit>,
    frames: Vec<egress::Frame>,
}

impl egress::Sink for Queue {
    fn tunnel(&mut self, u: egress::TunnelUnit) {
        self.units.push(u);
    }
    fn frame(&mut self, f: egress::Frame) {
        self.frames.push(f);
    }
    fn local(&mut self, _: Range<usize>) -> Result<(), DropReason> {
        Err(DropReason::NoRoute)
    }
    fn segment_dropped(&mut self, _: DropReason) {}
}

/// No masquerade here.
struct NoNat;

impl egress::Nat for NoNat {
    fn v4(&mut self) -> Option<impl DerefMut<Target = NatTable> + '_> {
        None::<&mut NatTable>
    }
    fn v6(&mut self) -> Option<impl DerefMut<Target = NatTable6> + '_> {
        None::<&mut NatTable6>
    }
}

/// A TCP/IPv4 TSO super-packet of `total` bytes at `MAX_HEADROOM` as the TUN hands it over
/// (`NEEDS_CSUM`, the checksum field holding the pseudo-header sum), with its vnet header.
fn tso_packet(total: usize, mss: u16, dst: Ipv4Addr) -> (Vec<u8>, VnetHdr) {
    let src = Ipv4Addr::new(10, 244, 1, 10);
    let mut b = vec![0x5au8; MAX_HEADROOM + total];
    let p = &mut b[MAX_HEADROOM..];
    ipv4::Repr {
        src,
        dst,
        protocol: ip_proto::TCP,
        payload_len: total - 20,
        ttl: 63,
        tos: 0,
        ident: 1,
        dont_frag: true,
    }
    .emit(&mut ipv4::Packet::new_unchecked(&mut p[..]))
    .unwrap();
    let t = &mut p[20..40];
    t[..4].copy_from_slice(&[0x9c, 0x40, 0x14, 0x51]); // 40000 -> 5201
    t[4..12].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
    t[12] = 5 << 4;
    t[13] = 0x10; // ACK
    t[14..16].copy_from_slice(&512u16.to_be_bytes());
    let pseudo = csum::pseudo_v4(&src.octets(), &dst.octets(), 6, (total - 20) as u16);
    t[16..18].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: vnet::flags::NEEDS_CSUM,
        gso_type: vnet::gso_type::TCPV4,
        hdr_len: 40,
        gso_size: mss,
        csum_start: 20,
        csum_offset: 16,
    };
    (b, hdr)
}

/// The entry point the I/O engine runs for every TUN read (`egress::egress`), with a sink that
/// queues the outputs as the engine does: a plain packet, and a 64 KB TSO super-packet segmented
/// and encapsulated into one UDP GSO train (per byte figures: the super-packet's).
fn bench_egress(c: &mut Criterion) {
    let t = tables();
    let link = egress::Link {
        mac: [2, 0, 0, 0, 0, 2],
        frames: Some(egress::FrameMode::Vnet),
        tunnel_v4: true,
        tunnel_v6: true,
        tunnel_gso: false,
        tunnel_gso6: false,
    };
    let mut g = c.benchmark_group("egress");
    configure(&mut g);
    let (mut seg, mut segs) = (Vec::new(), Vec::new());
    let mut q = Queue::default();
    let mut run = |buf: &mut [u8], len: usize, hdr: VnetHdr, q: &mut Queue| {
        q.units.clear();
        q.frames.clear();
        let p = egress::Packet {
            buf,
            start: MAX_HEADROOM,
            len,
            hdr,
            seg: &mut seg,
            segs: &mut segs,
        };
        egress::egress(&t, &link, &mut NoNat, q, p, 0)
    };
    for size in [64usize, 1400] {
        let mut buf = udp_packet(size, Ipv4Addr::new(10, 244, 77, 5));
        run(&mut buf, size, VnetHdr::default(), &mut q).unwrap();
        assert_eq!(q.units.len(), 1);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("vxlan/{size}"), |b| {
            b.iter(|| run(black_box(&mut buf), size, VnetHdr::default(), &mut q))
        });
    }
    let total = 64000;
    let (mut buf, hdr) = tso_packet(total, 1448, Ipv4Addr::new(10, 244, 77, 5));
    run(&mut buf, total, hdr, &mut q).unwrap();
    assert_eq!(
        q.units.iter().map(|u| u.pkts).sum::<u64>(),
        45,
        "{:?}",
        q.units
    );
    g.throughput(Throughput::Bytes(total as u64));
    // The super-packet is only read (segments are written to the scratch buffer).
    g.bench_function(format!("vxlan_tso/{total}"), |b| {
        b.iter(|| run(black_box(&mut buf), total, hdr, &mut q))
    });
    g.finish();
}

fn flow(r: &mut Rng) -> FlowKey {
    let x = r.next();
    FlowKey {
        proto: if x & 1 == 0 {
            NatProto::Tcp
        } else {
            NatProto::Udp
        },
        pod_ip: Ipv4Addr::from(0x0af4_0100 | (x >> 8) as u32 & 0xff),
        pod_port: (x >> 16) as u16 | 0x8000,
        remote_ip: Ipv4Addr::from(0xcb00_0000 | (x >> 32) as u32 & 0x3fff),
        remote_port: [443, 80, 53, 8080][(x >> 48) as usize & 3],
    }
}

fn bench_nat(c: &mut Criterion) {
    const N: usize = 1 << 20;
    let mut t = NatTable::with_capacity(
        NatConfig {
            max_entries: 2 * N,
            max_entries_per_pod: 2 * N,
            ..NatConfig::default()
        },
        N,
    );
    let mut r = Rng(0x5851_f42d_4c95_7f2d);
    let mut keys = Vec::with_capacity(N);
    while keys.len() < N {
        let k = flow(&mut r);
        if t.lookup(&k, 0).is_none() && t.egress(&k, 0x02, 0).is_ok() {
            keys.push(k);
        }
    }
    eprintln!(
        "nat: {} entries, {} MiB, {} bytes per entry",
        t.len(),
        t.memory_bytes() >> 20,
        t.bytes_per_entry()
    );
    let misses: Vec<FlowKey> = (0..QUERIES)
        .map(|_| {
            let mut k = flow(&mut r);
            k.remote_port = 9; // never used above
            k
        })
        .collect();
    let hits: Vec<FlowKey> = (0..QUERIES).map(|_| keys[r.next() as usize % N]).collect();
    let mut g = c.benchmark_group("nat");
    configure(&mut g);
    let mut i = 0usize;
    g.bench_function("lookup_hit/1M", |b| {
        b.iter(|| {
            i = (i + 1) % QUERIES;
            t.lookup(black_box(&hits[i]), 1)
        })
    });
    g.bench_function("lookup_miss/1M", |b| {
        b.iter(|| {
            i = (i + 1) % QUERIES;
            t.lookup(black_box(&misses[i]), 1)
        })
    });
    g.bench_function("egress_hit/1M", |b| {
        b.iter(|| {
            i = (i + 1) % QUERIES;
            t.egress(black_box(&hits[i]), 0x10, 1)
        })
    });
    g.finish();
}

/// One masqueraded packet's translation (`nat::translate_egress`: parse, flow lookup in a table
/// holding the flow, address / port rewrite and checksum fix-ups); each iteration restores the
/// pod's source first (a 20-byte header copy, part of the figure).
fn bench_nat_translate(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat_translate");
    configure(&mut g);
    let node = Ipv4Addr::new(172, 16, 2, 2);
    let mut t = NatTable::new(NatConfig::default());
    let template = udp_packet(64, Ipv4Addr::new(203, 0, 113, 7));
    let mut buf = template.clone();
    nat::translate_egress(&mut t, &mut buf[MAX_HEADROOM..], node, 0).unwrap();
    let (ip, end) = (MAX_HEADROOM, MAX_HEADROOM + 28);
    g.bench_function("egress_hit/64", |b| {
        b.iter(|| {
            buf[ip..end].copy_from_slice(&template[ip..end]);
            nat::translate_egress(&mut t, black_box(&mut buf[MAX_HEADROOM..]), node, 1)
        })
    });
    g.finish();
}

/// The NAT snapshot writer's work per write: `export_into` (into a reused vector, as the writer does) (the part done under the NAT lock, which
/// the packet path waits for) and `encode` (done outside it), for tables of 10k and 65k flows.
fn bench_nat_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("nat_snapshot");
    configure(&mut g);
    for n in [10_000usize, 65_536] {
        let mut t = NatTable::with_capacity(NatConfig::default(), n);
        let mut r = Rng(0x2545_f491_4f6c_dd1d);
        while t.len() < n {
            let k = flow(&mut r);
            let _ = t.egress(&k, 0x02, 0);
        }
        let label = if n == 10_000 { "10k" } else { "65k" };
        let recs = t.export(1);
        let mut buf = Vec::new();
        nat_snapshot::encode_into(&recs, 1, &mut buf);
        eprintln!("nat_snapshot: {} entries, {} bytes", recs.len(), buf.len());
        g.throughput(Throughput::Elements(n as u64));
        let mut out = Vec::new();
        g.bench_function(format!("export/{label}"), |b| {
            b.iter(|| {
                t.export_into(1, &mut out);
                black_box(out.len())
            })
        });
        g.bench_function(format!("encode/{label}"), |b| {
            b.iter(|| nat_snapshot::encode_into(black_box(&recs), 1, &mut buf))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_lpm,
    bench_datapath,
    bench_egress,
    bench_nat,
    bench_nat_translate,
    bench_nat_snapshot
);
criterion_main!(benches);
