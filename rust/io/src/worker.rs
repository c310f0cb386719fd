//! The engine: worker threads that move packets between the TUN, the tunnel UDP sockets and the
//! underlay AF_PACKET socket, asking `podrouter-core` what to do with each.
//!
//! Each worker owns one TUN queue and one `SO_REUSEPORT` receive socket per tunnel port, and waits
//! on all of them with epoll (level-triggered, so a batch cap keeps the two directions fair). The
//! tables live in an `ArcSwapOption`: a swap is one atomic pointer store, a worker `load()`s once
//! per batch, and a batch in flight finishes on the tables it started with, so no packet is lost or
//! judged half by old and half by new tables. Workers never take a lock on the packet path and
//! never touch Python.
//!
//! Egress (TUN read, maybe a 64 KiB TSO super-packet): the worker reads a batch, hands every read
//! with its vnet header to the core's one entry point (`podrouter_core::egress::egress`), which
//! decides and rewrites in place and reports tunnel units, underlay frames and drops; the worker
//! queues them ([`Outputs`]) and sends them in [`Worker::flush`]:
//! * tunnel units: grouped per send socket (picked by the unit's flow hash), one `sendmmsg` per
//!   socket, a train of units of one size as one UDP GSO entry;
//! * frames (native, masquerade): one AF_PACKET `sendmmsg`, whole super-packets with a vnet header
//!   when the socket has `PACKET_VNET_HDR`; the masquerade tables are shared by all workers and
//!   locked by the core only for a masqueraded packet ([`SharedNat`]);
//! * drops: counted by reason, with an event when events are on.
//!
//! Masquerade replies (worker 0): a filtered AF_PACKET copy of what reaches the node address on the
//! masquerade ports, reverse-translated (`datapath::masquerade_reply`) and written to the TUN; the
//! control plane drops the originals before the node's stack answers them (podrouter.nftables).
//!
//! Ingress (UDP, maybe a GRO train): split by the GRO segment size, decapsulate and validate each
//! datagram, apply the RFC 6040 ECN rule, write the inner packet to the TUN.

use crate::af_packet::{self, FrameScratch, PacketSocket, TxFrame};
use crate::counters::{Dir, Path, Snapshot, Stat, WorkerCounters};
use crate::events::{Direction, Event, EventRing, Kind};
use crate::handover::{dup_fd, AdoptFds, FdRole};
use crate::nat_persist::PersistStats;
use crate::sys::{Epoll, EventFd};
use crate::tap::{GsoTap, TapQueue};
use crate::tun::{Tun, TunOptions, TunQueue, MAX_READ};
use crate::udp::{RecvBatch, SendScratch, TxMsg, UdpSocket};
use arc_swap::ArcSwapOption;
use podrouter_core::datapath::{self, IngressAction};
use podrouter_core::egress;
use podrouter_core::encap;
use podrouter_core::nat::{NatConfig, NatTable, NatTable6};
use podrouter_core::offload::gro::Coalescer;
use podrouter_core::offload::tnl;
use podrouter_core::offload::vnet::{self, VnetHdr, VNET_HDR_LEN};
use podrouter_core::{DropReason, EngineSettings, Tables, TunnelProto};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::{DerefMut, Range};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Bytes kept free in front of every packet read from the TUN: room for the vnet header the read
/// itself fills, and afterwards for any encapsulation (`encap::MAX_HEADROOM`) or for an Ethernet
/// plus vnet header (native).
const HEADROOM: usize = 128;
const _: () = assert!(
    HEADROOM >= podrouter_core::encap::MAX_HEADROOM + VNET_HDR_LEN
        && HEADROOM >= egress::HEADROOM
        && HEADROOM >= af_packet::ETH_HLEN + VNET_HDR_LEN
);

/// Drop reasons of the I/O layer, counted after the core's [`DropReason::ALL`].
pub const IO_DROP_REASONS: [&str; 1] = [
    // The kernel refused a send or a TUN write (ENOBUFS, a send timeout, EMSGSIZE, ...).
    "tx_error",
];
const TX_ERROR: usize = DropReason::ALL.len();

/// Every drop reason name, in counter index order.
pub fn drop_reason_names() -> Vec<&'static str> {
    DropReason::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(IO_DROP_REASONS)
        .collect()
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub tun_name: String,
    /// MTU to set on the TUN when it is created (`None`: leave the kernel default).
    pub tun_mtu: Option<u32>,
    /// Make the TUN persistent (it outlives the engine; a successor attaches to it).
    pub tun_persist: bool,
    /// Underlay interface for native sends (0: no native path; such packets are dropped `no_route`).
    pub underlay_ifindex: u32,
    pub underlay_mac: [u8; 6],
    /// Outer source of tunnels to peers of its family (IPv4 or IPv6); the tunnel ports are bound
    /// on it.
    pub underlay_address: IpAddr,
    /// Dual-stack underlay: the IPv6 address when `underlay_address` is IPv4 (a second set of
    /// tunnel sockets is bound on it, for IPv6 peers).
    pub underlay_address6: Option<Ipv6Addr>,
    /// 0 disables the listener.
    pub vxlan_port: u16,
    pub geneve_port: u16,
    pub workers: usize,
    /// TUN and AF_PACKET checksum/segmentation offload.
    pub offload: bool,
    /// UDP-tunnel GSO (`datapath.tunnel_gso`): hand encapsulated TCP super-packets to the
    /// kernel whole through a TAP (`crate::tap`, both underlay families) where the kernel and
    /// the node's settings (`rp_filter` for IPv4, IPv6 forwarding) allow; otherwise (and with
    /// `false`) segment them here. Receiving whole datagrams is always on, whatever this says.
    pub tunnel_gso: bool,
    /// Number of send sockets (distinct outer UDP source ports).
    pub tx_sockets: usize,
    /// Most TUN reads (and `recvmmsg` messages) per batch.
    pub batch: usize,
    /// Masquerade table limits, timeouts (`masquerade.timeouts`) and port range
    /// (`masquerade.port_range`, `port_lo..=port_hi`).
    pub nat: NatConfig,
    /// The IPv6 masquerade address (`masquerade.address6`); `None`: IPv6 pods are not translated.
    pub masquerade_address6: Option<Ipv6Addr>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            tun_name: "podr0".into(),
            tun_mtu: None,
            tun_persist: false,
            underlay_ifindex: 0,
            underlay_mac: [0; 6],
            underlay_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            underlay_address6: None,
            vxlan_port: TunnelProto::Vxlan.default_port(),
            geneve_port: TunnelProto::Geneve.default_port(),
            workers: 1,
            offload: true,
            // off for an engine built directly; the daemon passes `tunnel.gso` (default auto)
            tunnel_gso: false,
            tx_sockets: 8,
            batch: 32,
            nat: NatConfig::default(),
            masquerade_address6: None,
        }
    }
}

impl EngineConfig {
    /// The addresses tunnel sockets are bound on: `underlay_address`, then `underlay_address6`.
    pub fn underlay_addresses(&self) -> Vec<IpAddr> {
        let mut v = vec![self.underlay_address];
        if let (IpAddr::V4(_), Some(a6)) = (self.underlay_address, self.underlay_address6) {
            v.push(IpAddr::V6(a6));
        }
        v
    }

    /// The start-time settings every table this engine runs is compiled against
    /// (`Tables::build(spec, &cfg.settings())`): the underlay addresses, the NAT port range, the
    /// IPv6 masquerade address. Read once, at start; only a restart changes them.
    pub fn settings(&self) -> EngineSettings {
        EngineSettings {
            address: self.underlay_address,
            address6: self.underlay_address6,
            port_range: (self.nat.port_lo, self.nat.port_hi),
            masquerade_address6: self.masquerade_address6,
        }
    }

    /// Checks values the kernel would otherwise reject later with a less helpful error; the
    /// `String` names the config key.
    pub fn validate(&self) -> Result<(), String> {
        self.settings().validate().map_err(|e| e.to_string())?;
        if self.workers == 0 || self.workers > 64 {
            return Err(format!("workers: {} is not in 1..=64", self.workers));
        }
        if self.tx_sockets == 0 || self.tx_sockets > 256 {
            return Err(format!("tx_sockets: {} is not in 1..=256", self.tx_sockets));
        }
        if self.batch == 0 || self.batch > 1024 {
            return Err(format!("batch: {} is not in 1..=1024", self.batch));
        }
        if self.vxlan_port != 0 && self.vxlan_port == self.geneve_port {
            return Err(format!(
                "geneve_port: {} is also the vxlan_port",
                self.geneve_port
            ));
        }
        if let Some(m) = self.tun_mtu {
            if !(68..=65535).contains(&m) {
                return Err(format!("tun_mtu: {m} is not in 68..=65535"));
            }
        }
        let n = &self.nat;
        if n.max_entries == 0 || n.max_entries > MAX_NAT_ENTRIES {
            return Err(format!(
                "nat.max_entries: {} is not in 1..={MAX_NAT_ENTRIES}",
                n.max_entries
            ));
        }
        if n.max_entries_per_pod == 0 || n.max_entries_per_pod > n.max_entries {
            return Err(format!(
                "nat.max_entries_per_pod: {} is not in 1..={} (nat.max_entries)",
                n.max_entries_per_pod, n.max_entries
            ));
        }
        for (key, t) in [
            ("tcp_syn_sent", n.tcp_syn_sent),
            ("tcp_established", n.tcp_established),
            ("tcp_fin_wait", n.tcp_fin_wait),
            ("tcp_time_wait", n.tcp_time_wait),
            ("tcp_close", n.tcp_close),
            ("udp_unreplied", n.udp_unreplied),
            ("udp_assured", n.udp_assured),
            ("icmp", n.icmp),
        ] {
            // 0 would make every new mapping dead on arrival; a year is far past any sane timeout.
            if t == 0 || t > 366 * 86400 {
                return Err(format!("nat.{key}: {t} is not in 1..=31622400 seconds"));
            }
        }
        Ok(())
    }
}

/// See [`Engine::nat_pressure`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatPressure {
    pub evictions: u64,
    pub pod_limit_drops: Vec<(IpAddr, u64)>,
    pub pod_limit_other: u64,
}

/// Upper bound on `nat.max_entries` (the table costs about 100 bytes per entry).
pub const MAX_NAT_ENTRIES: usize = 1 << 26;

/// Which offloads the kernel granted, for `counters()["offload"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffloadInfo {
    /// `TUN_F_*` bits accepted by `TUNSETOFFLOAD`.
    pub tun_flags: u32,
    pub udp_gso: bool,
    pub udp_gro: bool,
    pub packet_vnet_hdr: bool,
    /// Tunnel super-packets go to the kernel whole (the UDP-tunnel GSO TAP is open).
    pub tunnel_gso: bool,
    /// Why the TAP could not be used, when `tunnel_gso` was asked for and is off; or, on a
    /// dual-stack underlay, why one family does not use it ("IPv4 underlay: ...").
    pub tunnel_gso_error: Option<String>,
}

struct Running {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    alive: Arc<AtomicUsize>,
    /// Each worker hands its sockets back when it ends (kept by `quiesce`).
    threads: Vec<JoinHandle<WorkerSockets>>,
    tx_pool: Arc<TxPools>,
    pkt: Option<Arc<PacketSocket>>,
    /// The NAT snapshot writer (with `Engine::set_nat_snapshot`).
    writer: Option<crate::nat_persist::Writer>,
}

/// A worker's own sockets: its tunnel receive sockets and (worker 0) the masquerade reply socket.
type WorkerSockets = (
    Vec<(UdpSocket, TunnelProto)>,
    Option<PacketSocket>,
    Option<PacketSocket>,
);

/// The sockets of a started engine: opened by `start`, or passed by a predecessor, or kept by
/// `quiesce` for `resume`.
struct Sockets {
    tx_pool: Arc<TxPools>,
    pkt: Option<Arc<PacketSocket>>,
    rx_sets: Vec<Vec<(UdpSocket, TunnelProto)>>,
    masq: Option<PacketSocket>,
    /// The IPv6 masquerade reply socket.
    masq6: Option<PacketSocket>,
}

/// The running datapath of one node.
pub struct Engine {
    cfg: EngineConfig,
    tun: Tun,
    tables: Arc<ArcSwapOption<Tables>>,
    counters: Vec<Arc<WorkerCounters>>,
    /// Send errors of sockets of earlier runs (sockets are closed on stop).
    past_tx_errors: u64,
    offload: OffloadInfo,
    running: Option<Running>,
    nat: Arc<Mutex<NatTable>>,
    /// The IPv6 masquerade table: its own node port pool over the same range (docs/masquerade.md).
    nat6: Arc<Mutex<NatTable6>>,
    epoch: Instant,
    /// Drop and sampled-flow events for `podrouter monitor` (off unless someone listens).
    events: Arc<EventRing>,
    /// The NAT snapshot file (`None`: NAT state lives only in memory), whether it was loaded
    /// (at the first start only), and what loading and writing it did.
    nat_snapshot: Option<PathBuf>,
    nat_loaded: bool,
    persist: Arc<Mutex<PersistStats>>,
    /// Sockets a predecessor passed, for the next `start` (`Engine::adopt`).
    adopt: Option<AdoptFds>,
    /// The sockets of workers stopped by `quiesce`, for `resume` or a handover.
    parked: Option<Sockets>,
    /// Copies of the fds packets arrive on, made by `start` for the fd keeper (`take_keeper_fds`).
    keep: Vec<(FdRole, OwnedFd)>,
    /// The UDP-tunnel GSO TAP, opened by the first `start` that can (kept across restarts).
    gso_tap: Option<GsoTap>,
}

impl Engine {
    /// Creates the TUN device (so the control plane can configure it before `start`). The NAT
    /// hash seed in `cfg.nat` is replaced by a random one (per process: node ports must not be
    /// predictable, nor flows choosable to collide in the table).
    pub fn new(cfg: EngineConfig) -> io::Result<Engine> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tun = Tun::open(&TunOptions {
            name: cfg.tun_name.clone(),
            queues: cfg.workers,
            offload: cfg.offload,
            mtu: cfg.tun_mtu,
            persist: cfg.tun_persist,
        })?;
        Engine::with_tun(cfg, tun)
    }

    fn with_tun(mut cfg: EngineConfig, tun: Tun) -> io::Result<Engine> {
        cfg.nat.seed = crate::sys::random_u64()?;
        let n_drops = drop_reason_names().len();
        let counters = (0..cfg.workers)
            .map(|_| Arc::new(WorkerCounters::new(n_drops)))
            .collect();
        let offload = OffloadInfo {
            tun_flags: tun.offload(),
            ..OffloadInfo::default()
        };
        Ok(Engine {
            tun,
            tables: Arc::new(ArcSwapOption::empty()),
            counters,
            past_tx_errors: 0,
            offload,
            running: None,
            nat: Arc::new(Mutex::new(NatTable::new(cfg.nat.clone()))),
            nat6: Arc::new(Mutex::new(NatTable::new_v6(cfg.nat.clone()))),
            cfg,
            epoch: Instant::now(),
            events: Arc::new(EventRing::new()),
            nat_snapshot: None,
            nat_loaded: false,
            persist: Arc::new(Mutex::new(PersistStats::default())),
            adopt: None,
            parked: None,
            keep: Vec::new(),
            gso_tap: None,
        })
    }

    /// Like `new`, but on the fds a running predecessor passed (docs/handover.md) instead of
    /// opening the TUN: `fds.tun` are checked and adopted now, the tunnel receive sockets and
    /// the masquerade reply sockets at `start` (which checks them against the addresses, ports
    /// and tables it would bind; the send sockets are opened fresh). Every socket is checked
    /// here already, so a set that does not fit is refused before anything is built on it. Any
    /// mismatch is an `InvalidData` error naming the fd; the fds are then closed (the sender
    /// keeps its own).
    pub fn adopt(cfg: EngineConfig, mut fds: AdoptFds) -> io::Result<Engine> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        check_passed(&cfg, &fds)?;
        let tun = Tun::adopt(
            &TunOptions {
                name: cfg.tun_name.clone(),
                queues: cfg.workers,
                offload: cfg.offload,
                mtu: cfg.tun_mtu,
                persist: cfg.tun_persist,
            },
            std::mem::take(&mut fds.tun),
        )?;
        let mut e = Engine::with_tun(cfg, tun)?;
        e.adopt = Some(fds);
        Ok(e)
    }

    /// `new` + `start`.
    pub fn start_with(cfg: EngineConfig, tables: Arc<Tables>) -> io::Result<Engine> {
        let mut e = Engine::new(cfg)?;
        e.start(tables)?;
        Ok(e)
    }

    pub fn tun(&self) -> &Tun {
        &self.tun
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Keeps the NAT table in the snapshot file `path` (see `nat_persist`): the first `start`
    /// restores it before any worker runs, a writer thread rewrites it while the workers run,
    /// and `stop` writes it a last time. Call before `start`.
    pub fn set_nat_snapshot(&mut self, path: Option<PathBuf>) {
        self.persist.lock().unwrap_or_else(|p| p.into_inner()).path =
            path.clone().unwrap_or_default();
        self.nat_snapshot = path;
    }

    /// What loading and writing the NAT snapshot did.
    pub fn nat_snapshot_stats(&self) -> PersistStats {
        self.persist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Opens the sockets and starts the workers. Errors (a tunnel port in use, no permission for
    /// AF_PACKET) leave the engine stopped.
    pub fn start(&mut self, tables: Arc<Tables>) -> io::Result<()> {
        if self.running.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the datapath is already running",
            ));
        }
        if *tables.settings() != self.cfg.settings() {
            // the NAT tables and reply filters are sized from the engine's own settings
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the tables were compiled against other start-time settings than the engine's",
            ));
        }
        if let (Some(path), false) = (&self.nat_snapshot, self.nat_loaded) {
            // Before any worker runs: no packet can create a mapping that a restored one collides with.
            self.nat_loaded = true;
            let now = self.epoch.elapsed().as_secs();
            crate::nat_persist::load(
                path,
                tables.node_pod_cidrs(),
                &self.nat,
                &self.nat6,
                now,
                &self.persist,
            );
        }
        self.tables.store(Some(tables));
        let Sockets {
            tx_pool,
            pkt,
            rx_sets,
            masq: mut masq_rx,
            masq6: mut masq6_rx,
        } = match self.parked.take() {
            // `resume` after a handover that did not happen: the same sockets, nothing lost
            Some(p) => p,
            None => self.open_sockets()?,
        };
        // Copies for the fd keeper, made while this thread still holds every socket (the workers
        // own them from here on). Best effort: without them there is just no keeper.
        self.keep = arrival_copies(&self.tun, &rx_sets, masq_rx.as_ref(), masq6_rx.as_ref())
            .unwrap_or_default();
        self.offload.udp_gso = tx_pool.all().all(UdpSocket::gso_enabled);
        self.offload.udp_gro = rx_sets.iter().flatten().all(|(s, _)| s.gro_enabled());
        self.offload.packet_vnet_hdr = pkt.as_ref().is_some_and(|p| p.vnet_hdr());
        self.open_gso_tap();
        let tun_mtu = crate::tun::get_mtu(self.tun.name()).unwrap_or(1500) as usize;
        let cfg = &self.cfg;

        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new()?);
        let alive = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(cfg.workers);
        for (i, rx) in rx_sets.into_iter().enumerate() {
            let w = Worker {
                tun: Arc::clone(&self.tun.queues()[i]),
                rx,
                tx: Arc::clone(&tx_pool),
                pkt: pkt.clone(),
                masq: masq_rx.take(),
                masq6: masq6_rx.take(),
                masq_ifindex: if i == 0 { cfg.underlay_ifindex } else { 0 },
                tables: Arc::clone(&self.tables),
                counters: Arc::clone(&self.counters[i]),
                stop: Arc::clone(&stop),
                wake: Arc::clone(&wake),
                mac: cfg.underlay_mac,
                batch: cfg.batch,
                coalesce: cfg.offload,
                nat: Arc::clone(&self.nat),
                nat6: Arc::clone(&self.nat6),
                epoch: self.epoch,
                events: Arc::clone(&self.events),
                tun_mtu,
                tap: self.gso_tap.as_ref().and_then(|t| {
                    let fam = t.families();
                    let addrs = cfg.underlay_addresses();
                    let src = addrs.iter().find_map(|a| match a {
                        IpAddr::V4(a) if fam.v4 => Some(a.octets()),
                        _ => None,
                    });
                    let src6 = addrs.iter().find_map(|a| match a {
                        IpAddr::V6(a) if fam.v6 => Some(a.octets()),
                        _ => None,
                    });
                    Some(TapOut {
                        queue: Arc::clone(t.queues().get(i)?),
                        mac: t.mac(),
                        src,
                        src6,
                        id: std::cell::Cell::new(i as u16 * 0x4000),
                    })
                }),
            };
            alive.fetch_add(1, Ordering::SeqCst);
            let alive2 = Arc::clone(&alive);
            let spawned = std::thread::Builder::new()
                .name(format!("podr-worker-{i}"))
                .spawn(move || {
                    let _guard = AliveGuard(alive2);
                    w.run()
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    alive.fetch_sub(1, Ordering::SeqCst);
                    let r = Running {
                        stop,
                        wake,
                        alive,
                        threads,
                        tx_pool,
                        pkt,
                        writer: None,
                    };
                    self.running = Some(r);
                    self.stop();
                    return Err(e);
                }
            }
        }
        let writer = match &self.nat_snapshot {
            Some(path) => Some(crate::nat_persist::Writer::start(
                path.clone(),
                Arc::clone(&self.nat),
                Arc::clone(&self.nat6),
                self.epoch,
                Arc::clone(&self.persist),
            )?),
            None => None,
        };
        self.running = Some(Running {
            stop,
            wake,
            alive,
            threads,
            tx_pool,
            pkt,
            writer,
        });
        Ok(())
    }

    /// Opens the UDP-tunnel GSO TAP once, when asked for and possible (offload on, a kernel
    /// that accepts `TUN_F_UDP_TUNNEL_GSO`; per underlay family: `rp_filter` off for IPv4, IPv6
    /// forwarding on the TAP); otherwise records why not and the workers segment super-packets
    /// themselves (for a family the TAP does not carry, too).
    fn open_gso_tap(&mut self) {
        let cfg = &self.cfg;
        if self.gso_tap.is_none() && cfg.tunnel_gso {
            let addrs = cfg.underlay_addresses();
            let want = crate::tap::Families {
                v4: addrs.iter().any(IpAddr::is_ipv4),
                v6: addrs.iter().any(IpAddr::is_ipv6),
            };
            let why = if !cfg.offload {
                Some("offload is off".to_string())
            } else {
                match GsoTap::open(None, cfg.workers, want) {
                    Ok(t) => {
                        let why = t.refused().map(str::to_string);
                        self.gso_tap = Some(t);
                        why
                    }
                    Err(e) => Some(e.to_string()),
                }
            };
            self.offload.tunnel_gso_error = why;
        }
        self.offload.tunnel_gso = self.gso_tap.is_some();
    }

    /// The name of the UDP-tunnel GSO TAP, when open.
    pub fn gso_tap_name(&self) -> Option<&str> {
        self.gso_tap.as_ref().map(GsoTap::name)
    }

    /// The sockets `start` needs: bound and opened here, or the ones a predecessor passed
    /// (`Engine::adopt`), checked against this config.
    fn open_sockets(&mut self) -> io::Result<Sockets> {
        let mut adopted = self.adopt.take();
        let cfg = &self.cfg;
        let addrs = cfg.underlay_addresses();
        let mut pools = TxPools {
            v4: Vec::new().into(),
            v6: Vec::new().into(),
        };
        for &a in &addrs {
            let pool = bind_tx_pool(a, cfg.tx_sockets)?.into();
            match a {
                IpAddr::V4(_) => pools.v4 = pool,
                IpAddr::V6(_) => pools.v6 = pool,
            }
        }
        let tx_pool = Arc::new(pools);
        let pkt = if cfg.underlay_ifindex != 0 {
            Some(Arc::new(PacketSocket::open(
                cfg.underlay_ifindex,
                cfg.offload,
            )?))
        } else {
            None
        };
        let ports: Vec<(u16, TunnelProto)> = [
            (cfg.vxlan_port, TunnelProto::Vxlan),
            (cfg.geneve_port, TunnelProto::Geneve),
        ]
        .into_iter()
        .filter(|(p, _)| *p != 0)
        .collect();
        // Bind every worker's sockets before starting any thread, so a bind error leaves nothing running.
        let mut passed_rx = adopted.as_mut().map(|a| std::mem::take(&mut a.rx));
        if let Some(rx) = &passed_rx {
            let want = addrs.len() * ports.len();
            if rx.len() != cfg.workers || rx.iter().any(|w| w.len() != want) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the passed tunnel sockets do not match this config ({} workers x {want} \
                         sockets expected)",
                        cfg.workers
                    ),
                ));
            }
        }
        let mut rx_sets = Vec::with_capacity(cfg.workers);
        for w in 0..cfg.workers {
            let mut passed = passed_rx
                .as_mut()
                .map(|rx| std::mem::take(&mut rx[w]).into_iter());
            let mut set = Vec::new();
            for &addr in &addrs {
                for &(port, proto) in &ports {
                    let a = SocketAddr::new(addr, port);
                    let s = match passed.as_mut().and_then(Iterator::next) {
                        Some(fd) => UdpSocket::adopt_rx(fd, a)?,
                        None => UdpSocket::bind_rx(a, cfg.workers > 1)?,
                    };
                    set.push((s, proto));
                }
            }
            rx_sets.push(set);
        }
        // Masquerade replies: one filtered AF_PACKET receive socket, served by worker 0, open only
        // while the tables enable masquerade (without it nothing of ours can come back, and the
        // ICMP errors the filter would copy belong to the node's stack). Worker 0 opens or closes
        // it when a table swap changes `masquerade.enabled`; the node address and port range of
        // its filter are restart-only.
        let (masq, masq6) = match cfg.underlay_ifindex {
            0 => (None, None),
            idx => {
                let t = self
                    .tables
                    .load_full()
                    .ok_or_else(|| io::Error::other("no tables"))?;
                let (lo, hi) = (cfg.nat.port_lo, cfg.nat.port_hi);
                let v4 = match masq_wanted(&t) {
                    Some(node) => match adopted.as_mut().and_then(|a| a.masq.take()) {
                        Some(fd) => Some(PacketSocket::adopt_rx(
                            fd,
                            idx,
                            &af_packet::masquerade_filter(node, lo, hi),
                            af_packet::ETHERTYPE_IPV4,
                        )?),
                        None => Some(open_masq_rx(idx, node, lo, hi, cfg.offload)?),
                    },
                    None => None,
                };
                let v6 = match masq6_wanted(&t) {
                    Some(node) => match adopted.as_mut().and_then(|a| a.masq6.take()) {
                        Some(fd) => Some(PacketSocket::adopt_rx(
                            fd,
                            idx,
                            &af_packet::masquerade_filter_v6(node, lo, hi),
                            af_packet::ETHERTYPE_IPV6,
                        )?),
                        None => Some(open_masq6_rx(idx, node, lo, hi, cfg.offload)?),
                    },
                    None => None,
                };
                (v4, v6)
            }
        };
        Ok(Sockets {
            tx_pool,
            pkt,
            rx_sets,
            masq,
            masq6,
        })
    }

    /// Replaces the tables: one atomic pointer store; each worker picks them up at its next batch.
    /// They must be compiled against [`EngineConfig::settings`] (the bindings refuse others).
    pub fn swap_tables(&self, tables: Arc<Tables>) {
        self.tables.store(Some(tables));
    }

    pub fn tables(&self) -> Option<Arc<Tables>> {
        self.tables.load_full()
    }

    /// True while started and every worker thread is alive.
    pub fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|r| {
            r.alive.load(Ordering::SeqCst) == r.threads.len() && !r.stop.load(Ordering::SeqCst)
        })
    }

    /// Stops the workers and closes the sockets; the TUN stays until the engine is dropped. Idempotent.
    pub fn stop(&mut self) {
        self.keep.clear();
        if let Some(p) = self.parked.take() {
            self.past_tx_errors += tx_errors(&p.tx_pool, p.pkt.as_deref());
        }
        let Some(r) = self.running.take() else {
            return;
        };
        r.stop.store(true, Ordering::SeqCst);
        r.wake.signal();
        for t in r.threads {
            let _ = t.join();
        }
        // After the workers: the last snapshot holds every mapping they made.
        if let Some(w) = r.writer {
            w.finish();
        }
        self.past_tx_errors += tx_errors(&r.tx_pool, r.pkt.as_deref());
    }

    /// Handover, first step: stops the workers at a batch boundary (each finishes the batch in
    /// hand, so no packet is half handled) and keeps every socket open, so that what arrives
    /// meanwhile waits in the TUN queues and socket buffers. The NAT snapshot file, if any, is
    /// written a last time (exact: no worker runs). Then either `handover_fds` + drop (the
    /// successor took over) or `resume`.
    pub fn quiesce(&mut self) -> io::Result<()> {
        let Some(r) = self.running.take() else {
            return Err(io::Error::other("the datapath is not running"));
        };
        r.stop.store(true, Ordering::SeqCst);
        r.wake.signal();
        let mut rx_sets = Vec::with_capacity(r.threads.len());
        let (mut masq, mut masq6) = (None, None);
        let mut lost = false;
        for t in r.threads {
            match t.join() {
                Ok((rx, m, m6)) => {
                    rx_sets.push(rx);
                    masq = masq.or(m);
                    masq6 = masq6.or(m6);
                }
                Err(_) => lost = true,
            }
        }
        if let Some(w) = r.writer {
            w.finish();
        }
        if lost || rx_sets.len() != self.cfg.workers {
            self.past_tx_errors += tx_errors(&r.tx_pool, r.pkt.as_deref());
            return Err(io::Error::other("a worker died: its sockets are gone"));
        }
        self.parked = Some(Sockets {
            tx_pool: r.tx_pool,
            pkt: r.pkt,
            rx_sets,
            masq,
            masq6,
        });
        Ok(())
    }

    /// Restarts the workers `quiesce` stopped, on the same sockets (a handover that failed).
    pub fn resume(&mut self) -> io::Result<()> {
        if self.parked.is_none() {
            return Err(io::Error::other("the datapath is not quiesced"));
        }
        let tables = self
            .tables
            .load_full()
            .ok_or_else(|| io::Error::other("no tables"))?;
        self.start(tables)
    }

    /// While quiesced: the fds a successor adopts, by role (TUN queues, then each worker's
    /// tunnel receive sockets in bind order, then the masquerade reply sockets). The engine
    /// keeps them; the caller passes copies (SCM_RIGHTS duplicates them).
    pub fn handover_fds(&self) -> io::Result<Vec<(FdRole, RawFd)>> {
        let p = self
            .parked
            .as_ref()
            .ok_or_else(|| io::Error::other("the datapath is not quiesced"))?;
        let mut v: Vec<(FdRole, RawFd)> = self
            .tun
            .queues()
            .iter()
            .enumerate()
            .map(|(queue, q)| (FdRole::Tun { queue }, q.as_raw_fd()))
            .collect();
        for (worker, set) in p.rx_sets.iter().enumerate() {
            for (index, (s, _)) in set.iter().enumerate() {
                v.push((FdRole::Rx { worker, index }, s.as_raw_fd()));
            }
        }
        if let Some(m) = &p.masq {
            v.push((FdRole::Masq, m.as_raw_fd()));
        }
        if let Some(m) = &p.masq6 {
            v.push((FdRole::Masq6, m.as_raw_fd()));
        }
        Ok(v)
    }

    /// The fd keeper's set (docs/handover.md): close-on-exec copies of the fds packets arrive on
    /// (the same roles and order as `handover_fds`), made by the last `start`. The caller owns
    /// them; a second call returns nothing until the next `start`.
    pub fn take_keeper_fds(&mut self) -> Vec<(FdRole, OwnedFd)> {
        std::mem::take(&mut self.keep)
    }

    /// Live masquerade entries (`podrouter_nat_entries`).
    pub fn nat_entries(&self) -> usize {
        self.nat.lock().map_or(0, |n| n.len()) + self.nat6.lock().map_or(0, |n| n.len())
    }

    /// Masquerade pressure figures for `counters()`: entries evicted from a full table, and new
    /// flows refused at the per-pod cap, per pod address (highest first, at most `top`) plus the
    /// sum over all other pods.
    pub fn nat_pressure(&self, top: usize) -> NatPressure {
        let nat = self.nat.lock().unwrap_or_else(|p| p.into_inner());
        let nat6 = self.nat6.lock().unwrap_or_else(|p| p.into_inner());
        let (pods4, other4) = nat.pod_limit_drops();
        let (pods6, other6) = nat6.pod_limit_drops();
        let mut pods: Vec<(IpAddr, u64)> = pods4
            .into_iter()
            .map(|(a, n)| (IpAddr::V4(a), n))
            .chain(pods6.into_iter().map(|(a, n)| (IpAddr::V6(a), n)))
            .collect();
        pods.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut other = other4 + other6;
        other += pods.iter().skip(top).map(|p| p.1).sum::<u64>();
        pods.truncate(top);
        NatPressure {
            evictions: nat.evictions() + nat6.evictions(),
            pod_limit_drops: pods,
            pod_limit_other: other,
        }
    }

    /// The monitor's event ring (docs/monitoring.md).
    pub fn events(&self) -> &EventRing {
        &self.events
    }

    pub fn offload(&self) -> &OffloadInfo {
        &self.offload
    }

    /// Sum of all workers' counters; drops are indexed like [`drop_reason_names`].
    pub fn counters(&self) -> Snapshot {
        let mut s = Snapshot::sum(
            self.counters.iter().map(|c| &**c),
            drop_reason_names().len(),
        );
        let live = self
            .running
            .as_ref()
            .map_or(0, |r| tx_errors(&r.tx_pool, r.pkt.as_deref()));
        s.drops[TX_ERROR] += self.past_tx_errors + live;
        s
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tx_errors(pool: &TxPools, pkt: Option<&PacketSocket>) -> u64 {
    pool.all()
        .map(|s| s.tx_errors.load(Ordering::Relaxed))
        .sum::<u64>()
        + pkt.map_or(0, |p| p.tx_errors.load(Ordering::Relaxed))
}

/// Copies of the fds packets arrive on, by role (`Engine::take_keeper_fds`).
fn arrival_copies(
    tun: &Tun,
    rx_sets: &[Vec<(UdpSocket, TunnelProto)>],
    masq: Option<&PacketSocket>,
    masq6: Option<&PacketSocket>,
) -> io::Result<Vec<(FdRole, OwnedFd)>> {
    let mut v = Vec::new();
    for (queue, q) in tun.queues().iter().enumerate() {
        v.push((FdRole::Tun { queue }, dup_fd(q.as_raw_fd())?));
    }
    for (worker, set) in rx_sets.iter().enumerate() {
        for (index, (s, _)) in set.iter().enumerate() {
            v.push((FdRole::Rx { worker, index }, dup_fd(s.as_raw_fd())?));
        }
    }
    if let Some(m) = masq {
        v.push((FdRole::Masq, dup_fd(m.as_raw_fd())?));
    }
    if let Some(m) = masq6 {
        v.push((FdRole::Masq6, dup_fd(m.as_raw_fd())?));
    }
    Ok(v)
}

/// `Engine::adopt`'s check of the passed sockets against `cfg`: per worker the tunnel receive
/// sockets in bind order (for each underlay address, VXLAN then Geneve), the masquerade reply
/// sockets on the underlay interface. Each tunnel socket is checked on a copy (adopting sets
/// only idempotent options); `start` adopts the originals.
fn check_passed(cfg: &EngineConfig, fds: &AdoptFds) -> io::Result<()> {
    let addrs = cfg.underlay_addresses();
    let ports: Vec<u16> = [cfg.vxlan_port, cfg.geneve_port]
        .into_iter()
        .filter(|p| *p != 0)
        .collect();
    let want = addrs.len() * ports.len();
    if fds.rx.len() != cfg.workers || fds.rx.iter().any(|w| w.len() != want) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the passed tunnel sockets do not match this config ({} workers x {want} sockets \
                 expected)",
                cfg.workers
            ),
        ));
    }
    for set in &fds.rx {
        let mut it = set.iter();
        for &addr in &addrs {
            for &port in &ports {
                if let Some(fd) = it.next() {
                    UdpSocket::adopt_rx(dup_fd(fd.as_raw_fd())?, SocketAddr::new(addr, port))?;
                }
            }
        }
    }
    for (m, ethertype) in [
        (&fds.masq, af_packet::ETHERTYPE_IPV4),
        (&fds.masq6, af_packet::ETHERTYPE_IPV6),
    ] {
        if let Some(fd) = m {
            crate::handover::check_packet_rx(
                "masquerade reply socket",
                fd.as_raw_fd(),
                cfg.underlay_ifindex,
                ethertype,
            )?;
        }
    }
    Ok(())
}

struct AliveGuard(Arc<AtomicUsize>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Binds `n` send sockets to distinct ports of `encap::SOURCE_PORT_MIN..=SOURCE_PORT_MAX`
/// (49152-60999): the dynamic range RFC 7348 §5 asks tunnel source ports to come from, below
/// podrouter's default masquerade range (61000-65535), which peers refuse as a tunnel source
/// (`tunnel_source_port`). Ports in use are skipped; the start is spread by pid so two daemons
/// rarely probe the same ports.
fn bind_tx_pool(addr: IpAddr, n: usize) -> io::Result<Vec<UdpSocket>> {
    const LO: u32 = encap::SOURCE_PORT_MIN as u32;
    const SPAN: u32 = encap::SOURCE_PORT_MAX as u32 + 1 - LO;
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    let mut out = Vec::with_capacity(n);
    let mut last_err = None;
    for k in 0..SPAN.min(4096) {
        if out.len() == n {
            break;
        }
        let port = (LO + (start + k * 97) % SPAN) as u16;
        match UdpSocket::bind_tx(SocketAddr::new(addr, port)) {
            Ok(s) => out.push(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("binding a tunnel send socket on {addr}: {e}"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)));
    }
    Ok(out)
}

/// Which buffer of a slot an output refers to.
#[derive(Debug, Clone, Copy)]
enum Buf {
    Tun(usize),
    Seg(usize),
}

/// The tunnel send sockets, one pool per underlay family this node has an address in (an empty
/// pool: no address of that family).
#[derive(Debug)]
pub(crate) struct TxPools {
    v4: Arc<[UdpSocket]>,
    v6: Arc<[UdpSocket]>,
}

impl TxPools {
    fn all(&self) -> impl Iterator<Item = &UdpSocket> {
        self.v4.iter().chain(self.v6.iter())
    }

    /// The pool for outer packets to `dst`'s family.
    fn for_dst(&self, v6: bool) -> &[UdpSocket] {
        if v6 {
            &self.v6
        } else {
            &self.v4
        }
    }
}

#[derive(Clone)]
struct UdpOut {
    /// Index into the pool of `dst`'s family.
    sock: usize,
    buf: Buf,
    range: Range<usize>,
    dst: SocketAddr,
    tos: u8,
    flow_label: u32,
    segment: u16,
    /// A whole super-packet for the TAP: the TUN read's vnet header and where the inner packet
    /// starts in `range`.
    gso: Option<(VnetHdr, usize)>,
    path: Path,
    pkts: u64,
    bytes: u64,
}

/// A worker's side of the UDP-tunnel GSO TAP.
struct TapOut {
    queue: Arc<TapQueue>,
    mac: [u8; 6],
    /// The IPv4 underlay address, the outer source, when the TAP carries IPv4 frames.
    src: Option<[u8; 4]>,
    /// The IPv6 underlay address, when the TAP carries IPv6 frames.
    src6: Option<[u8; 16]>,
    /// Outer IPv4 identification of the next super-packet (the kernel counts per segment).
    id: std::cell::Cell<u16>,
}

struct FrameOut {
    buf: Buf,
    range: Range<usize>,
    ethertype: u16,
    path: Path,
    pkts: u64,
    bytes: u64,
}

/// One TUN read: `buf[HEADROOM..HEADROOM + len]` is the packet, its vnet header right in front.
struct Slot {
    buf: Box<[u8]>,
    len: usize,
    /// Segmentation output (`[headroom][segment]` units).
    seg: Vec<u8>,
    segs: Vec<Range<usize>>,
}

struct Worker {
    tun: Arc<TunQueue>,
    rx: Vec<(UdpSocket, TunnelProto)>,
    tx: Arc<TxPools>,
    pkt: Option<Arc<PacketSocket>>,
    /// Masquerade replies (worker 0 only), as opened at start; `run` owns it from then on.
    masq: Option<PacketSocket>,
    /// IPv6 masquerade replies (worker 0 only, with `masquerade.address6`), likewise.
    masq6: Option<PacketSocket>,
    /// The underlay interface for the masquerade reply socket on worker 0 (0 elsewhere, or
    /// without an underlay): worker 0 opens / closes the socket as `masquerade.enabled` changes.
    masq_ifindex: u32,
    tables: Arc<ArcSwapOption<Tables>>,
    counters: Arc<WorkerCounters>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    mac: [u8; 6],
    batch: usize,
    coalesce: bool,
    /// Masquerade connections, shared by all workers (a reply may land on any of them). Only
    /// masquerade packets take this lock.
    nat: Arc<Mutex<NatTable>>,
    /// The IPv6 masquerade connections, likewise.
    nat6: Arc<Mutex<NatTable6>>,
    /// NAT's clock: whole seconds since the engine started.
    epoch: Instant,
    events: Arc<EventRing>,
    /// The UDP-tunnel GSO TAP queue of this worker, when the engine opened one.
    tap: Option<TapOut>,
    /// The TUN's MTU (the underlay's): a received datagram longer than this may be a whole
    /// super-packet; it sizes the segments of one.
    tun_mtu: usize,
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_TUN: u64 = 1;
const TOKEN_MASQ: u64 = 2;
const TOKEN_MASQ6: u64 = 3;
const TOKEN_RX: u64 = 4;

/// Per-thread buffers, allocated once.
struct State {
    slots: Vec<Slot>,
    udp_out: Vec<UdpOut>,
    frames_out: Vec<FrameOut>,
    recv: RecvBatch,
    send: SendScratch,
    frames: FrameScratch,
    /// TCP coalescing of decapsulated packets before the TUN write (off without offload).
    gro: Option<Coalescer>,
    /// Runs of small datagrams merged into one UDP GSO message each (`flush`).
    merge: Vec<u8>,
}

/// Largest datagram [`small_run`] merges: its segments fit any underlay (IPv6's minimum MTU,
/// 1280, less the outer IPv6 and UDP headers), so the kernel never refuses a merged send for its
/// segment size (a refusal turns GSO off for the socket, `UdpSocket::send`).
const MERGE_MAX_DATAGRAM: usize = 1280 - 40 - 8;

/// The end of the run of datagrams starting at `outs[i]` that can leave as ONE UDP GSO message
/// (`UDP_SEGMENT` = the first one's length): plain datagrams (no GSO of their own, no TAP
/// super-packet) of at most [`MERGE_MAX_DATAGRAM`] bytes, consecutive, to the same destination
/// from the same socket with the same TOS and flow label, all as long as the first but the last
/// (which may be shorter), at most `UDP_MAX_SEGMENTS` of them and `UDP_GSO_MAX_BYTES` in all.
/// `i + 1` when nothing joins the first.
fn small_run(outs: &[UdpOut], i: usize) -> usize {
    let o = &outs[i];
    let len = o.range.len();
    let plain = |u: &UdpOut| u.segment == 0 && u.gso.is_none();
    if !plain(o) || len == 0 || len > MERGE_MAX_DATAGRAM {
        return i + 1;
    }
    let (mut j, mut total) = (i + 1, len);
    while j < outs.len() && j - i < crate::udp::GSO_MAX_SEGMENTS {
        let u = &outs[j];
        let n = u.range.len();
        let same = u.sock == o.sock && u.dst == o.dst && u.tos == o.tos;
        if !same || u.flow_label != o.flow_label || !plain(u) || n == 0 || n > len {
            break;
        }
        if total + n > egress::UDP_GSO_MAX_BYTES {
            break;
        }
        total += n;
        j += 1;
        if n < len {
            break; // a shorter datagram ends the train
        }
    }
    j
}

impl Worker {
    /// Serves until stopped, then hands its sockets back (`Engine::quiesce` keeps them).
    fn run(mut self) -> WorkerSockets {
        let mut masq = self.masq.take();
        let mut masq6 = self.masq6.take();
        self.serve(&mut masq, &mut masq6);
        (std::mem::take(&mut self.rx), masq, masq6)
    }

    fn serve(&mut self, masq: &mut Option<PacketSocket>, masq6: &mut Option<PacketSocket>) {
        let mut ep = match Epoll::new(5 + self.rx.len()) {
            Ok(e) => e,
            Err(_) => return,
        };
        let mut ok = ep.add(self.wake.as_raw_fd(), TOKEN_WAKE).is_ok()
            && ep.add(self.tun.as_raw_fd(), TOKEN_TUN).is_ok();
        for (i, (s, _)) in self.rx.iter().enumerate() {
            ok &= ep.add(s.as_raw_fd(), TOKEN_RX + i as u64).is_ok();
        }
        if let Some(m) = &masq {
            ok &= ep.add(m.as_raw_fd(), TOKEN_MASQ).is_ok();
        }
        if let Some(m) = &masq6 {
            ok &= ep.add(m.as_raw_fd(), TOKEN_MASQ6).is_ok();
        }
        if !ok {
            return;
        }
        let mut st = State {
            slots: (0..self.batch)
                .map(|_| Slot {
                    buf: vec![0u8; HEADROOM + MAX_READ].into_boxed_slice(),
                    len: 0,
                    seg: Vec::new(),
                    segs: Vec::new(),
                })
                .collect(),
            udp_out: Vec::with_capacity(self.batch * 2),
            frames_out: Vec::with_capacity(self.batch),
            recv: RecvBatch::new(self.batch.min(64)),
            send: SendScratch::new(64),
            frames: FrameScratch::new(64),
            gro: self.coalesce.then(Coalescer::new),
            merge: Vec::new(),
        };
        let mut ready = Vec::with_capacity(8);
        let mut last_expire = 0;
        let mut masq_tried = None;
        let mut masq6_tried = None;
        while !self.stop.load(Ordering::Relaxed) {
            // The timeout is only a safety net; `stop` signals the eventfd.
            if ep.wait(500, &mut ready).is_err() {
                break;
            }
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            self.sync_masq(&mut ep, masq, &mut masq_tried, false);
            self.sync_masq(&mut ep, masq6, &mut masq6_tried, true);
            for &t in &ready {
                match t {
                    TOKEN_TUN => {
                        if !self.egress_batch(&mut st) {
                            return;
                        }
                    }
                    TOKEN_WAKE => {}
                    TOKEN_MASQ => {
                        if let Some(m) = &masq {
                            self.masquerade_batch(m, &mut st, false);
                        }
                    }
                    TOKEN_MASQ6 => {
                        if let Some(m) = &masq6 {
                            self.masquerade_batch(m, &mut st, true);
                        }
                    }
                    t => self.ingress_batch(&mut st, (t - TOKEN_RX) as usize),
                }
            }
            // Sweep expired NAT entries a slice at a time, about once a second per worker; skip
            // when another worker holds the table rather than wait for it.
            let now = self.epoch.elapsed().as_secs();
            if now != last_expire {
                last_expire = now;
                if let Ok(mut nat) = self.nat.try_lock() {
                    nat.expire(now, 4096);
                }
                if let Ok(mut nat6) = self.nat6.try_lock() {
                    nat6.expire(now, 4096);
                }
            }
        }
    }

    /// Worker 0: keeps the masquerade reply socket of one family (`v6`) open exactly while the
    /// current tables masquerade that family (a SIGHUP may turn it on or off). Closing the fd also
    /// removes it from the epoll set (it is never duplicated). A failed open is retried at most
    /// once a second.
    fn sync_masq(
        &self,
        ep: &mut Epoll,
        masq: &mut Option<PacketSocket>,
        tried: &mut Option<u64>,
        v6: bool,
    ) {
        if self.masq_ifindex == 0 {
            return;
        }
        let guard = self.tables.load();
        let Some(t) = guard.as_deref() else {
            return;
        };
        let wanted = if v6 {
            masq6_wanted(t).is_some()
        } else {
            masq_wanted(t).is_some()
        };
        match (wanted, masq.is_some()) {
            (true, false) => {
                let now = self.epoch.elapsed().as_secs();
                if *tried == Some(now) {
                    return;
                }
                *tried = Some(now);
                // The NAT table's range, fixed at start (a changed range waits for a restart).
                let (lo, hi) = {
                    let nat = self.nat.lock().unwrap_or_else(|p| p.into_inner());
                    (nat.config().port_lo, nat.config().port_hi)
                };
                let opened = match (masq_wanted(t), masq6_wanted(t)) {
                    (_, Some(a6)) if v6 => {
                        open_masq6_rx(self.masq_ifindex, a6, lo, hi, self.coalesce)
                    }
                    (Some(a4), _) if !v6 => {
                        open_masq_rx(self.masq_ifindex, a4, lo, hi, self.coalesce)
                    }
                    _ => return,
                };
                let token = if v6 { TOKEN_MASQ6 } else { TOKEN_MASQ };
                if let Ok(s) = opened {
                    if ep.add(s.as_raw_fd(), token).is_ok() {
                        *masq = Some(s);
                    }
                }
            }
            (false, true) => *masq = None,
            _ => {}
        }
    }

    // ---------------------------------------------------------------------------------- egress

    /// Reads and handles one batch from the TUN. Returns `false` when the TUN is gone (any read
    /// error but `EAGAIN`/`EINTR`, e.g. `EBADFD` after the device was deleted): the worker then
    /// ends, `is_running()` turns false and the daemon notices, instead of spinning on an fd that
    /// epoll keeps reporting ready.
    fn egress_batch(&self, st: &mut State) -> bool {
        let c = &*self.counters;
        let mut n = 0;
        let mut alive = true;
        while n < st.slots.len() {
            let slot = &mut st.slots[n];
            match self.tun.read(&mut slot.buf[HEADROOM - VNET_HDR_LEN..]) {
                Ok(len) if len > VNET_HDR_LEN => {
                    slot.len = len - VNET_HDR_LEN;
                    n += 1;
                }
                Ok(_) => c.drop_packets(DropReason::Truncated.index(), 1),
                // A length beyond the buffer (sys::cvt_read): count, drop, keep reading.
                Err(e) if crate::sys::is_overlong_read(&e) => {
                    c.drop_packets(DropReason::Truncated.index(), 1)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break, // drained
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
        if n == 0 {
            return alive;
        }
        c.stat(Stat::Batches, 1);
        c.stat(Stat::TunReads, n as u64);
        st.udp_out.clear();
        st.frames_out.clear();
        let now = self.epoch.elapsed().as_secs();
        {
            let guard = self.tables.load();
            let Some(tables) = guard.as_deref() else {
                c.drop_packets(DropReason::NoRoute.index(), n as u64);
                return alive;
            };
            let link = self.link();
            let mut nat = SharedNat {
                v4: &self.nat,
                v6: &self.nat6,
            };
            for k in 0..n {
                self.egress_one(
                    tables,
                    &link,
                    &mut nat,
                    now,
                    k,
                    &mut st.slots[k],
                    &mut st.udp_out,
                    &mut st.frames_out,
                );
            }
        }
        self.flush(st);
        alive
    }

    /// One TUN read through the core's egress entry point (`podrouter_core::egress::egress`):
    /// the core decides and rewrites, [`Outputs`] queues what it reports for [`Worker::flush`].
    #[allow(clippy::too_many_arguments)]
    fn egress_one(
        &self,
        tables: &Tables,
        link: &egress::Link,
        nat: &mut SharedNat<'_>,
        now: u64,
        k: usize,
        slot: &mut Slot,
        udp_out: &mut Vec<UdpOut>,
        frames_out: &mut Vec<FrameOut>,
    ) {
        let c = &*self.counters;
        let hdr = VnetHdr::parse(&slot.buf[HEADROOM - VNET_HDR_LEN..HEADROOM]).unwrap_or_default();
        if hdr.is_gso() {
            c.stat(Stat::TunGsoReads, 1);
        }
        if self.events.sample_flow() {
            self.record_flow(tables, &slot.buf[HEADROOM..HEADROOM + slot.len]);
        }
        let mut out = Outputs {
            k,
            inner_len: slot.len,
            tx: &self.tx,
            counters: c,
            udp_out,
            frames_out,
        };
        let p = egress::Packet {
            buf: &mut slot.buf[..],
            start: HEADROOM,
            len: slot.len,
            hdr,
            seg: &mut slot.seg,
            segs: &mut slot.segs,
        };
        if let Err(d) = egress::egress(tables, link, nat, &mut out, p, now) {
            c.drop_packets(d.reason.index(), d.packets as u64);
            if self.events.enabled() {
                let pkt = &slot.buf[HEADROOM..HEADROOM + slot.len.min(slot.buf.len() - HEADROOM)];
                let mut e = Event::ip(Kind::Drop, Direction::Egress, pkt);
                e.reason = d.reason.index() as u16;
                self.events.push(e);
            }
        }
    }

    /// How this worker sends on the underlay, for the core.
    fn link(&self) -> egress::Link {
        egress::Link {
            mac: self.mac,
            frames: self.pkt.as_deref().map(|p| {
                if p.vnet_hdr() {
                    egress::FrameMode::Vnet
                } else {
                    egress::FrameMode::Plain
                }
            }),
            tunnel_v4: !self.tx.for_dst(false).is_empty(),
            tunnel_v6: !self.tx.for_dst(true).is_empty(),
            tunnel_gso: self.tap.as_ref().is_some_and(|t| t.src.is_some()),
            tunnel_gso6: self.tap.as_ref().is_some_and(|t| t.src6.is_some()),
        }
    }

    /// A sampled forwarded packet from a pod, with the path the tables give it.
    #[cold]
    fn record_flow(&self, tables: &Tables, pkt: &[u8]) {
        if let Ok((_, verdict)) = datapath::classify_packet(tables, pkt) {
            if let Some(path) = verdict.path() {
                let mut e = Event::ip(Kind::Flow, Direction::Egress, pkt);
                e.path = Some(path);
                self.events.push(e);
            }
        }
    }

    fn flush(&self, st: &mut State) {
        let c = &*self.counters;
        let slots = &st.slots;
        let bytes_of = |b: Buf| -> &[u8] {
            match b {
                Buf::Tun(k) => &slots[k].buf,
                Buf::Seg(k) => &slots[k].seg,
            }
        };
        if let Some(tap) = &self.tap {
            // Whole super-packets to the TAP, in order, before the socket sends of the batch.
            st.udp_out.retain(|o| {
                let Some((h, inner_off)) = o.gso else {
                    return true;
                };
                let v6 = o.dst.is_ipv6();
                let Some(sock) = self.tx.for_dst(v6).get(o.sock) else {
                    c.drop_packets(DropReason::NoRoute.index(), o.pkts);
                    return false;
                };
                let data = &bytes_of(o.buf)[o.range.clone()];
                let (mut pre4, mut pre6) = ([0u8; tnl::PREFIX_LEN], [0u8; tnl::PREFIX6_LEN]);
                let built: Option<&[u8]> = match (o.dst, tap.src, tap.src6) {
                    (SocketAddr::V4(dst), Some(src), _) => {
                        let id = tap.id.get();
                        tap.id.set(id.wrapping_add(o.pkts as u16));
                        let outer = tnl::Outer {
                            dst_mac: tap.mac,
                            src_mac: self.mac,
                            src,
                            dst: dst.ip().octets(),
                            src_port: sock.local_addr().port(),
                            dst_port: dst.port(),
                            tos: o.tos,
                            // forwarded once (TAP in, underlay out): the wire sees the sockets' TTL
                            ttl: encap::OUTER_TTL + 1,
                            id,
                        };
                        tnl::build_prefix(&mut pre4, &outer, data, inner_off, &h)
                            .ok()
                            .map(|()| &pre4[..])
                    }
                    (SocketAddr::V6(dst), _, Some(src)) => {
                        let outer = tnl::Outer6 {
                            dst_mac: tap.mac,
                            src_mac: self.mac,
                            src,
                            dst: dst.ip().octets(),
                            src_port: sock.local_addr().port(),
                            dst_port: dst.port(),
                            tclass: o.tos,
                            flow_label: o.flow_label,
                            // forwarded once: the wire sees the sockets' hop limit
                            hop_limit: encap::OUTER_TTL + 1,
                        };
                        tnl::build_prefix6(&mut pre6, &outer, data, inner_off, &h)
                            .ok()
                            .map(|()| &pre6[..])
                    }
                    // the core gives a family the TAP does not carry no whole unit
                    _ => None,
                };
                let Some(prefix) = built else {
                    c.drop_packets(DropReason::Malformed.index(), o.pkts);
                    return false;
                };
                match tap.queue.write(prefix, data) {
                    Ok(_) => {
                        c.stat(Stat::TapGsoWrites, 1);
                        c.count(o.path, Dir::Egress, o.pkts, o.bytes);
                    }
                    Err(_) => c.drop_packets(TX_ERROR, o.pkts),
                }
                false
            });
        }
        if !st.udp_out.is_empty() {
            // One sendmmsg per send socket; stable sort keeps each flow's order.
            st.udp_out.sort_by_key(|o| (o.dst.is_ipv6(), o.sock));
            // Runs of small datagrams of one flow become one UDP GSO message, copied once into
            // `merge`: the underlay, the peer's stack and its socket then see one skb per run
            // instead of one per datagram (the peer's UDP_GRO socket takes it whole).
            let outs = &st.udp_out;
            let merge = &mut st.merge;
            merge.clear();
            let mut plan: Vec<(usize, usize, Range<usize>)> = Vec::new();
            let mut i = 0;
            while i < outs.len() {
                let j = small_run(outs, i);
                let start = merge.len();
                if j - i > 1 {
                    for o in &outs[i..j] {
                        merge.extend_from_slice(&bytes_of(o.buf)[o.range.clone()]);
                    }
                }
                plan.push((i, j, start..merge.len()));
                i = j;
            }
            let merge = &st.merge;
            let mut msgs: Vec<TxMsg<'_>> = Vec::with_capacity(plan.len());
            let mut p = 0;
            while p < plan.len() {
                let key = (outs[plan[p].0].dst.is_ipv6(), outs[plan[p].0].sock);
                msgs.clear();
                while p < plan.len() && (outs[plan[p].0].dst.is_ipv6(), outs[plan[p].0].sock) == key
                {
                    let (i, j, ref merged) = plan[p];
                    let o = &outs[i];
                    let (data, segment) = if j - i > 1 {
                        (&merge[merged.clone()], o.range.len() as u16)
                    } else {
                        (&bytes_of(o.buf)[o.range.clone()], o.segment)
                    };
                    msgs.push(TxMsg {
                        data,
                        dst: o.dst,
                        tos: o.tos,
                        flow_label: o.flow_label,
                        segment,
                    });
                    if segment > 0 {
                        c.stat(Stat::UdpTxGsoMessages, 1);
                    }
                    for o in &outs[i..j] {
                        c.count(o.path, Dir::Egress, o.pkts, o.bytes);
                    }
                    p += 1;
                }
                c.stat(Stat::UdpTxCalls, 1);
                self.tx.for_dst(key.0)[key.1].send(&mut st.send, &msgs);
            }
        }
        if let (false, Some(p)) = (st.frames_out.is_empty(), self.pkt.as_deref()) {
            let frames: Vec<TxFrame<'_>> = st
                .frames_out
                .iter()
                .map(|o| {
                    c.count(o.path, Dir::Egress, o.pkts, o.bytes);
                    TxFrame {
                        data: &bytes_of(o.buf)[o.range.clone()],
                        ethertype: o.ethertype,
                    }
                })
                .collect();
            c.stat(Stat::PacketTxCalls, 1);
            p.send(&mut st.frames, &frames);
        }
    }

    // --------------------------------------------------------------------------------- ingress

    fn ingress_batch(&self, st: &mut State, idx: usize) {
        let Some((sock, _)) = self.rx.get(idx) else {
            return;
        };
        let c = &*self.counters;
        let n = match sock.recv(&mut st.recv) {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        c.stat(Stat::Batches, 1);
        c.stat(Stat::UdpRxMessages, n as u64);
        let guard = self.tables.load();
        let Some(tables) = guard.as_deref() else {
            c.drop_packets(DropReason::NoRoute.index(), n as u64);
            return;
        };
        let port = sock.local_addr().port();
        let tunnel_proto = self.rx[idx].1;
        let tun = &*self.tun;
        let mut sink =
            |h: &[u8; VNET_HDR_LEN], p: &[u8], segments: usize| match tun.write_with_hdr(h, p) {
                Ok(_) => {
                    c.stat(Stat::TunWrites, 1);
                    if segments > 1 {
                        c.stat(Stat::TunGsoWrites, 1);
                        c.stat(Stat::TunCoalescedSegments, segments as u64);
                    }
                }
                Err(_) => c.drop_packets(TX_ERROR, segments as u64),
            };
        let State { recv, gro, .. } = st;
        for m in 0..n {
            let meta = recv.meta()[m];
            if meta.truncated {
                c.drop_packets(DropReason::Truncated.index(), 1);
                if self.events.enabled() {
                    let outer = (meta.src.ip(), meta.src.port());
                    let node = sock.local_addr().ip();
                    let e =
                        Event::tunnel(DropReason::Truncated, tunnel_proto, outer, node, port, &[]);
                    self.events.push(e);
                }
                continue;
            }
            let seg = if meta.segment > 0 {
                c.stat(Stat::UdpRxGroMessages, 1);
                meta.segment
            } else {
                meta.len.max(1)
            };
            let buf = &mut recv.buf_mut(m)[..meta.len];
            // One GSO skb delivered whole (a peer's UDP-tunnel GSO over veths and forwarding):
            // ONE datagram longer than any wire datagram, no UDP_GRO cmsg, its inner TCP
            // super-packet with the checksum still partial; the loop below sees it as its only
            // datagram (`seg` is its length) and writes it to the TUN as one TSO packet.
            let whole = if meta.segment == 0 && meta.len > self.tun_mtu {
                tnl::whole_inner(buf, tunnel_proto).and_then(|off| {
                    // the path MTU of this tunnel: the TUN's less the outer IP and UDP headers
                    // (of the family the datagram came over) and the tunnel's own
                    let outer = if meta.src.is_ipv6() { 40 + 8 } else { 20 + 8 };
                    let mtu = self.tun_mtu.saturating_sub(off + outer);
                    tnl::rx_hdr(&buf[off..], u16::try_from(mtu).unwrap_or(0))
                })
            } else {
                None
            };
            for dg in buf.chunks_mut(seg) {
                let len = dg.len();
                if tunnel_proto == TunnelProto::Geneve {
                    count_geneve_options(c, dg);
                }
                let (src, sport) = (meta.src.ip(), meta.src.port());
                match datapath::ingress(tables, src, sport, port, meta.tos & 0x03, dg, 0, len) {
                    IngressAction::Deliver { range, path, .. } => {
                        let segs = whole.map_or(1, |h| vnet::wire_size(&dg[range.clone()], &h).0);
                        c.count(path, Dir::Ingress, segs as u64, range.len() as u64);
                        if self.events.sample_flow() {
                            let mut e =
                                Event::ip(Kind::Flow, Direction::Ingress, &dg[range.clone()]);
                            e.path = Some(path);
                            e.outer = match meta.src {
                                SocketAddr::V4(a) => Some((*a.ip(), a.port())),
                                SocketAddr::V6(_) => None,
                            };
                            self.events.push(e);
                        }
                        match (whole, gro.as_mut()) {
                            (Some(h), g) => {
                                // what the coalescer holds came first
                                if let Some(g) = g {
                                    g.flush(&mut sink);
                                }
                                c.stat(Stat::UdpRxWholeGso, 1);
                                let mut hb = [0u8; VNET_HDR_LEN];
                                h.emit(&mut hb);
                                sink(&hb, &dg[range], segs);
                            }
                            (None, Some(g)) => g.offer(&dg[range], &mut sink),
                            (None, None) => sink(&[0; VNET_HDR_LEN], &dg[range], 1),
                        }
                    }
                    IngressAction::Drop(r) => {
                        c.drop_packets(r.index(), 1);
                        if self.events.enabled() {
                            let outer = (meta.src.ip(), meta.src.port());
                            let node = sock.local_addr().ip();
                            self.events
                                .push(Event::tunnel(r, tunnel_proto, outer, node, port, dg));
                        }
                    }
                }
            }
        }
        if let Some(g) = gro {
            g.flush(&mut sink);
        }
    }

    /// Masquerade replies from the filtered AF_PACKET socket: reverse-translate (core
    /// `datapath::masquerade_reply`) and write to the TUN.
    fn masquerade_batch(&self, sock: &PacketSocket, st: &mut State, v6: bool) {
        let c = &*self.counters;
        let now = self.epoch.elapsed().as_secs();
        let vnet = sock.vnet_hdr();
        let slot = &mut st.slots[0];
        const ETH: usize = af_packet::ETH_HLEN;
        // Frames land so that the IP packet starts at HEADROOM: [vnet header][Ethernet][IP].
        let at = HEADROOM - ETH - if vnet { VNET_HDR_LEN } else { 0 };
        let mut n = 0;
        while n < self.batch {
            let len = match sock.recv(&mut slot.buf[at..]) {
                Ok(len) if len >= HEADROOM - at => len - (HEADROOM - at),
                Ok(_) => {
                    n += 1;
                    c.drop_packets(DropReason::Truncated.index(), 1);
                    continue;
                }
                Err(e) if crate::sys::is_overlong_read(&e) => {
                    n += 1;
                    c.drop_packets(DropReason::Truncated.index(), 1);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            n += 1;
            let hdr = if vnet {
                // The kernel's offsets count from the Ethernet header; ours from the IP header.
                let mut h = VnetHdr::parse(&slot.buf[at..at + VNET_HDR_LEN]).unwrap_or_default();
                h.csum_start = h.csum_start.saturating_sub(ETH as u16);
                h.hdr_len = h.hdr_len.saturating_sub(ETH as u16);
                Some(h)
            } else {
                None
            };
            let action = if v6 {
                let mut nat6 = self.nat6.lock().unwrap_or_else(|p| p.into_inner());
                datapath::masquerade_reply_v6(&mut nat6, &mut slot.buf, HEADROOM, len, now)
            } else {
                let mut nat = self.nat.lock().unwrap_or_else(|p| p.into_inner());
                datapath::masquerade_reply(&mut nat, &mut slot.buf, HEADROOM, len, now)
            };
            match action {
                IngressAction::Deliver { range, path, .. } => {
                    let pkt = &mut slot.buf[range];
                    let (segs, bytes) = vnet::wire_size(pkt, &hdr.unwrap_or_default());
                    let out = match datapath::masquerade_reply_offload(pkt, hdr) {
                        Ok(h) => h,
                        Err(r) => {
                            c.drop_packets(r.index(), segs as u64);
                            continue;
                        }
                    };
                    let mut h = [0u8; VNET_HDR_LEN];
                    out.emit(&mut h);
                    c.count(path, Dir::Ingress, segs as u64, bytes as u64);
                    match self.tun.write_with_hdr(&h, pkt) {
                        Ok(_) => c.stat(Stat::TunWrites, 1),
                        Err(_) => c.drop_packets(TX_ERROR, segs as u64),
                    }
                }
                IngressAction::Drop(r) => {
                    c.drop_packets(r.index(), 1);
                    if self.events.enabled() {
                        let pkt = slot.buf.get(HEADROOM..HEADROOM + len).unwrap_or(&[]);
                        let mut e = Event::ip(Kind::Drop, Direction::Ingress, pkt);
                        e.reason = r.index() as u16;
                        e.path = Some(Path::Masquerade);
                        self.events.push(e);
                    }
                }
            }
        }
        if n > 0 {
            c.stat(Stat::Batches, 1);
        }
    }
}

/// The masquerade reply socket: AF_PACKET on `ifindex` with [`af_packet::masquerade_filter`].
fn open_masq_rx(
    ifindex: u32,
    node: Ipv4Addr,
    lo: u16,
    hi: u16,
    vnet_hdr: bool,
) -> io::Result<PacketSocket> {
    let filter = af_packet::masquerade_filter(node, lo, hi);
    PacketSocket::open_rx(ifindex, &filter, vnet_hdr, af_packet::ETHERTYPE_IPV4)
}

/// The IPv6 masquerade reply socket: AF_PACKET (ETH_P_IPV6) on `ifindex` with
/// [`af_packet::masquerade_filter_v6`].
fn open_masq6_rx(
    ifindex: u32,
    node: Ipv6Addr,
    lo: u16,
    hi: u16,
    vnet_hdr: bool,
) -> io::Result<PacketSocket> {
    let filter = af_packet::masquerade_filter_v6(node, lo, hi);
    PacketSocket::open_rx(ifindex, &filter, vnet_hdr, af_packet::ETHERTYPE_IPV6)
}

/// The IPv4 masquerade address when the tables masquerade IPv4 (enabled, and the node has an
/// IPv4 underlay address: an IPv6-only underlay has none).
fn masq_wanted(t: &Tables) -> Option<Ipv4Addr> {
    let a = t.node_address();
    (t.masquerade().enabled && !a.is_unspecified()).then_some(a)
}

/// The IPv6 masquerade address when the tables masquerade IPv6 (`masquerade.address6`).
fn masq6_wanted(t: &Tables) -> Option<Ipv6Addr> {
    t.masquerade_address6().filter(|_| t.masquerade().enabled)
}

/// The shared masquerade tables, locked by the core only for a masqueraded packet (a poisoned lock
/// is taken over: the table itself is consistent after any panic-free call).
struct SharedNat<'a> {
    v4: &'a Mutex<NatTable>,
    v6: &'a Mutex<NatTable6>,
}

impl egress::Nat for SharedNat<'_> {
    fn v4(&mut self) -> Option<impl DerefMut<Target = NatTable> + '_> {
        Some(self.v4.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn v6(&mut self) -> Option<impl DerefMut<Target = NatTable6> + '_> {
        Some(self.v6.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Queues the core's egress outputs of slot `k` for [`Worker::flush`].
struct Outputs<'a> {
    k: usize,
    /// The length of the packet read into slot `k` (a whole super-packet unit ends with it).
    inner_len: usize,
    tx: &'a TxPools,
    counters: &'a WorkerCounters,
    udp_out: &'a mut Vec<UdpOut>,
    frames_out: &'a mut Vec<FrameOut>,
}

impl Outputs<'_> {
    fn buf(&self, b: egress::Buffer) -> Buf {
        match b {
            egress::Buffer::Packet => Buf::Tun(self.k),
            egress::Buffer::Segments => Buf::Seg(self.k),
        }
    }
}

impl egress::Sink for Outputs<'_> {
    fn tunnel(&mut self, u: egress::TunnelUnit) {
        // The outer source port is the bound port of the pool socket picked by the inner flow
        // hash, so one flow always leaves from one port. The core checked that the pool of the
        // remote's family is not empty (`Link::tunnel_v4` / `tunnel_v6`).
        let pool = self.tx.for_dst(u.remote.is_ipv6()).len().max(1);
        let gso = u
            .gso
            .map(|h| (h, u.range.len().saturating_sub(self.inner_len)));
        self.udp_out.push(UdpOut {
            sock: u.hash as usize % pool,
            buf: self.buf(u.buf),
            range: u.range,
            dst: u.remote,
            tos: u.tos,
            flow_label: u.flow_label,
            segment: u.segment,
            gso,
            path: Path::tunnel(u.proto),
            pkts: u.pkts,
            bytes: u.bytes,
        });
    }

    fn frame(&mut self, f: egress::Frame) {
        if f.gso {
            self.counters.stat(Stat::PacketTxGsoFrames, 1);
        }
        self.frames_out.push(FrameOut {
            buf: self.buf(f.buf),
            range: f.range,
            ethertype: f.ethertype,
            path: f.path,
            pkts: f.pkts,
            bytes: f.bytes,
        });
    }

    fn local(&mut self, _: Range<usize>) -> Result<(), DropReason> {
        // The kernel routed a packet for our own pod CIDR into the TUN, so it has no route to
        // that pod; writing it back would only loop it through the TUN until its TTL runs out.
        Err(DropReason::NoRoute)
    }

    fn segment_dropped(&mut self, reason: DropReason) {
        self.counters.drop_packets(reason.index(), 1);
    }
}

/// Count the options of a Geneve header at the start of `dg` (RFC 8926 §3.5), before validation:
/// what arrives is counted whether it is then delivered or dropped. A frame without options costs
/// one byte test; the walk stops at the first option that runs past the options area.
#[inline]
fn count_geneve_options(c: &WorkerCounters, dg: &[u8]) {
    if dg.first().is_some_and(|b| b & 0x3f != 0) {
        if let Ok(h) = podrouter_core::wire::geneve::Header::new_checked(dg) {
            for o in h.options_iter().map_while(Result::ok) {
                c.geneve_option(o.class, o.opt_type);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podrouter_core::{Cidr, MasqueradeSpec, NodeSpec, TableSpec, TunnelSpec};

    fn tables(address: &str, enabled: bool, address6: Option<&str>) -> Tables {
        let c = |s: &str| -> Cidr { s.parse().unwrap() };
        let settings = EngineSettings {
            masquerade_address6: address6.map(|a| a.parse().unwrap()),
            ..EngineSettings::new(address.parse().unwrap())
        };
        Tables::build(
            &TableSpec {
                generation: 1,
                node: NodeSpec {
                    name: "n".into(),
                    pod_cidrs: vec![c("10.244.1.0/24"), c("fd00:10:244:1::/64")],
                },
                cluster_cidrs: vec![c("10.244.0.0/16"), c("fd00:10:244::/48")],
                mode: podrouter_core::RoutingMode::Tunnel,
                native_cidrs: vec![],
                native_when_on_link: false,
                tunnel: TunnelSpec::default(),
                gateway: None,
                masquerade: MasqueradeSpec {
                    enabled,
                    ..MasqueradeSpec::default()
                },
                peers: vec![],
            },
            &settings,
        )
        .unwrap()
    }

    #[test]
    fn reply_sockets_follow_the_families_masqueraded() {
        let t = tables("172.16.2.2", true, Some("2001:db8:2::2"));
        assert_eq!(masq_wanted(&t), Some("172.16.2.2".parse().unwrap()));
        assert_eq!(masq6_wanted(&t), Some("2001:db8:2::2".parse().unwrap()));
        // no IPv6 masquerade address: no IPv6 socket
        let t = tables("172.16.2.2", true, None);
        assert_eq!(masq6_wanted(&t), None);
        // an IPv6-only underlay has no IPv4 masquerade address
        let t = tables("2001:db8:2::2", true, Some("2001:db8:2::2"));
        assert_eq!(masq_wanted(&t), None);
        assert!(masq6_wanted(&t).is_some());
        // disabled: neither
        let t = tables("172.16.2.2", false, Some("2001:db8:2::2"));
        assert_eq!((masq_wanted(&t), masq6_wanted(&t)), (None, None));
    }
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    fn out(sock: usize, len: usize, dst: &str) -> UdpOut {
        UdpOut {
            sock,
            buf: Buf::Tun(0),
            range: 0..len,
            dst: dst.parse().unwrap(),
            tos: 0,
            flow_label: 0,
            segment: 0,
            gso: None,
            path: Path::tunnel(TunnelProto::Vxlan),
            pkts: 1,
            bytes: len as u64,
        }
    }

    #[test]
    fn a_run_is_one_flow_of_equal_small_datagrams_the_last_may_be_shorter() {
        let d = "172.16.3.2:4789";
        let mut v: Vec<UdpOut> = [64, 64, 64, 40, 64].iter().map(|&n| out(0, n, d)).collect();
        assert_eq!(small_run(&v, 0), 4); // the shorter fourth ends it
        assert_eq!(small_run(&v, 3), 4); // longer than the first: alone
        v[1].dst = "172.16.2.2:4789".parse().unwrap();
        assert_eq!(small_run(&v, 0), 1);
        v[1].dst = d.parse().unwrap();
        v[2].tos = 2;
        assert_eq!(small_run(&v, 0), 2);
        v[2].tos = 0;
        v[1].sock = 1;
        assert_eq!(small_run(&v, 0), 1);
        v[1].sock = 0;
        v[1].segment = 64; // already a GSO message
        assert_eq!(small_run(&v, 0), 1);
        v[1].segment = 0;
        v[0].flow_label = 7;
        assert_eq!(small_run(&v, 0), 1);
        // too long to merge, an empty one, and the segment count limit
        let big: Vec<UdpOut> = (0..3).map(|_| out(0, MERGE_MAX_DATAGRAM + 1, d)).collect();
        assert_eq!(small_run(&big, 0), 1);
        let empty: Vec<UdpOut> = (0..3).map(|_| out(0, 0, d)).collect();
        assert_eq!(small_run(&empty, 0), 1);
        let many: Vec<UdpOut> = (0..200).map(|_| out(0, 64, d)).collect();
        assert_eq!(small_run(&many, 0), crate::udp::GSO_MAX_SEGMENTS);
        // the byte limit: MERGE_MAX_DATAGRAM-byte datagrams stop before UDP_GSO_MAX_BYTES
        let full: Vec<UdpOut> = (0..60).map(|_| out(0, MERGE_MAX_DATAGRAM, d)).collect();
        let j = small_run(&full, 0);
        assert_eq!(j, egress::UDP_GSO_MAX_BYTES / MERGE_MAX_DATAGRAM);
    }
}
