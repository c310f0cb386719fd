//! `podrouter._native`: the PyO3 bindings (see python/podrouter/_native.pyi for the contract).
//!
//! `Tables(spec, settings)` compiles the control plane's table spec dict (docs/architecture.md)
//! against an engine config's start-time settings into `podrouter_core::Tables`; `Datapath(config)` wraps `podrouter_io::Engine`. Calls that
//! can take time (starting or stopping workers, compiling tables) release the GIL; worker threads
//! never touch Python.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use podrouter_core::encap;
use podrouter_core::nat::NatConfig;
use podrouter_core::{
    format_mac, DropReason, EngineSettings, GenevePayload, TableSpec, Tables as CoreTables,
    TunnelProto, Verdict,
};
use podrouter_io::counters::{Dir, Path, DIRECTIONS, STATS};
use podrouter_io::events::{Direction, Kind};
use podrouter_io::handover::{AdoptFds, FdRole};
use podrouter_io::{drop_reason_names, Engine, EngineConfig, Event};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

mod blast;
mod spec;
mod wire;

use spec::bad;

/// The table spec dict (docs/architecture.md, "Table spec") as the core's `TableSpec`.
fn table_spec(obj: &Bound<'_, PyAny>) -> PyResult<TableSpec> {
    spec::from_py::<spec::TableSpecIn>(obj, "")?.into_core()
}

/// The start-time settings of an engine config dict (`Datapath(config)`'s shape).
fn engine_settings(obj: &Bound<'_, PyAny>) -> PyResult<EngineSettings> {
    Ok(engine_config(obj)?.settings())
}

// ------------------------------------------------------------------------------------ Tables

/// Compiled routing tables, immutable; shared with the datapath by reference count.
#[pyclass(module = "podrouter._native", frozen)]
struct Tables {
    inner: Arc<CoreTables>,
}

fn ip_pair(packet: &[u8]) -> Result<(IpAddr, IpAddr), DropReason> {
    let m = podrouter_core::wire::parse_ip(packet).map_err(DropReason::from)?;
    Ok((m.src, m.dst))
}

fn drop_dict<'py>(py: Python<'py>, reason: DropReason) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("verdict", "drop")?;
    d.set_item("reason", reason.as_str())?;
    Ok(d)
}

fn verdict_dict<'py>(py: Python<'py>, t: &CoreTables, v: Verdict) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let hop = |d: &Bound<'py, PyDict>, id| -> PyResult<()> {
        let h = t.next_hop(id);
        d.set_item("next_hop", h.map(|h| h.ip.to_string()))?;
        d.set_item(
            "next_hop_mac",
            h.and_then(|h| h.mac).map(|m| format_mac(&m)),
        )
    };
    match v {
        Verdict::Local => d.set_item("verdict", "local")?,
        Verdict::Native { next_hop } => {
            d.set_item("verdict", "native")?;
            hop(&d, next_hop)?;
        }
        Verdict::Masquerade { next_hop } => {
            d.set_item("verdict", "masquerade")?;
            d.set_item("address", t.node_address().to_string())?;
            hop(&d, next_hop)?;
        }
        Verdict::Tunnel {
            peer,
            proto,
            vni,
            remote,
            port,
        } => {
            d.set_item("verdict", "tunnel")?;
            d.set_item("peer", t.peer(peer).map(|p| p.name.clone()))?;
            d.set_item("protocol", proto.as_str())?;
            d.set_item("vni", vni)?;
            d.set_item("remote", remote.to_string())?;
            d.set_item("port", port)?;
            let gp = t
                .peer(peer)
                .map_or(t.tunnel().geneve_payload, |p| p.geneve_payload);
            if proto == TunnelProto::Geneve {
                d.set_item("geneve_payload", gp.as_str())?;
            }
            if proto == TunnelProto::Vxlan || gp == GenevePayload::Ethernet {
                d.set_item("vtep_mac", format_mac(&t.peer_vtep_mac(peer, remote)))?;
            }
        }
        Verdict::Drop(r) => return drop_dict(py, r),
    }
    if let Some(p) = v.path() {
        d.set_item("path", p.as_str())?;
    }
    Ok(d)
}

#[pymethods]
impl Tables {
    #[new]
    fn new(
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        settings: &Bound<'_, PyAny>,
    ) -> PyResult<Tables> {
        let spec = table_spec(spec)?;
        let settings = engine_settings(settings)?;
        let t = py
            .allow_threads(|| CoreTables::build(&spec, &settings))
            .map_err(|e| bad(&e.path, &e.message))?;
        Ok(Tables { inner: Arc::new(t) })
    }

    #[getter]
    fn generation(&self) -> u64 {
        self.inner.generation()
    }

    #[getter]
    fn node_name(&self) -> &str {
        self.inner.node_name()
    }

    /// This node's VTEP MAC ("02:70:<underlay IPv4>", "02:76:<last 4 bytes of the IPv6
    /// underlay address>"): the inner Ethernet source of its VXLAN
    /// frames, what a Flannel-style kernel peer's neighbour and FDB entries must point at.
    #[getter]
    fn vtep_mac(&self) -> String {
        format_mac(&self.inner.vtep_mac())
    }

    /// The verdict the datapath gives `packet` (an IP packet from a local pod). Never raises for
    /// bad bytes: they are a `drop` verdict with the reason the datapath would count.
    fn classify<'py>(&self, py: Python<'py>, packet: &[u8]) -> PyResult<Bound<'py, PyDict>> {
        let (src, dst) = match ip_pair(packet) {
            Ok(a) => a,
            Err(r) => return drop_dict(py, r),
        };
        let v = self.inner.classify(src, dst);
        let d = verdict_dict(py, &self.inner, v)?;
        if let (Verdict::Masquerade { .. }, IpAddr::V6(_), Some(a6)) =
            (v, dst, self.inner.masquerade_address6())
        {
            // IPv6 is translated to the IPv6 masquerade address
            d.set_item("address", a6.to_string())?;
        }
        d.set_item("src", src.to_string())?;
        d.set_item("dst", dst.to_string())?;
        Ok(d)
    }

    /// The path (`native`, `vxlan`, `geneve`) the tables give each destination address inside a
    /// peer's pod CIDRs, decided like `classify` but whether or not the next hop is resolved yet;
    /// `None` for an address outside every peer's pod CIDRs. The route plan asks this for the
    /// first address of each route it installs into the datapath (one call for all of them).
    fn route_paths(&self, destinations: Vec<String>) -> PyResult<Vec<Option<&'static str>>> {
        destinations
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let ip: IpAddr = d.parse().map_err(|_| {
                    bad(
                        &format!("destinations[{i}]"),
                        format!("'{d}' is not an IP address"),
                    )
                })?;
                Ok(self.inner.peer_path(ip).map(|(_, p)| p.as_str()))
            })
            .collect()
    }

    /// The verdict for a UDP payload received on `udp_port` from `outer_src`: the same decap and
    /// validation checks the datapath runs. `{"verdict": "accept", "peer", "protocol", "vni",
    /// "src", "dst", "path"}` or `{"verdict": "drop", "reason"}`.
    #[pyo3(signature = (outer_src, udp_port, payload, outer_tos = 0))]
    fn classify_ingress<'py>(
        &self,
        py: Python<'py>,
        outer_src: &str,
        udp_port: u16,
        payload: &[u8],
        outer_tos: u8,
    ) -> PyResult<Bound<'py, PyDict>> {
        let outer: IpAddr = outer_src
            .parse()
            .map_err(|_| bad("outer_src", format!("'{outer_src}' is not an IP address")))?;
        let t = &self.inner;
        let Some(proto) = t.tunnel().proto_for_port(udp_port) else {
            return drop_dict(py, DropReason::Unsupported);
        };
        let dec = match encap::decap_payload(proto, payload, outer_tos & 3) {
            Ok(d) => d,
            Err(e) => return drop_dict(py, e.into()),
        };
        let (src, dst) = match ip_pair(&payload[dec.inner.clone()]) {
            Ok(a) => a,
            Err(r) => return drop_dict(py, r),
        };
        match t.validate_ingress(outer, dec.vni, src, dst) {
            Err(r) => drop_dict(py, r),
            Ok(peer) => {
                let d = PyDict::new(py);
                d.set_item("verdict", "accept")?;
                d.set_item("peer", t.peer(peer).map(|p| p.name.clone()))?;
                d.set_item("protocol", proto.as_str())?;
                d.set_item("vni", dec.vni)?;
                d.set_item("src", src.to_string())?;
                d.set_item("dst", dst.to_string())?;
                d.set_item("path", Path::tunnel(proto).as_str())?;
                Ok(d)
            }
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Tables(node={:?}, generation={}, peers={})",
            self.inner.node_name(),
            self.inner.generation(),
            self.inner.peers().len()
        )
    }
}

// ---------------------------------------------------------------------------------- Datapath

fn engine_config(obj: &Bound<'_, PyAny>) -> PyResult<EngineConfig> {
    spec::from_py::<spec::EngineIn>(obj, "")?.into_config()
}

/// Pod addresses `counters()["nat_pod_limit_drops"]` names (the highest counts); the rest are
/// summed in `nat_pod_limit_drops_other`, so the metric's label set stays bounded.
const NAT_POD_LIMIT_TOP: usize = 32;

/// `{"tun": [...], "rx": [[...] per worker], "masq": fd or None, "masq6": fd or None}`.
fn fds_by_role(py: Python<'_>, roles: Vec<(FdRole, i32)>) -> PyResult<Bound<'_, PyDict>> {
    let tun = PyList::empty(py);
    let rx = PyList::empty(py);
    let d = PyDict::new(py);
    d.set_item("masq", py.None())?;
    d.set_item("masq6", py.None())?;
    for (role, fd) in roles {
        match role {
            FdRole::Tun { .. } => tun.append(fd)?,
            FdRole::Rx { worker, .. } => {
                while rx.len() <= worker {
                    rx.append(PyList::empty(py))?;
                }
                rx.get_item(worker)?.downcast::<PyList>()?.append(fd)?;
            }
            FdRole::Masq => d.set_item("masq", fd)?,
            FdRole::Masq6 => d.set_item("masq6", fd)?,
        }
    }
    while rx.len() < tun.len() {
        rx.append(PyList::empty(py))?; // a worker without tunnel sockets
    }
    d.set_item("tun", tun)?;
    d.set_item("rx", rx)?;
    Ok(d)
}

fn os_err(what: &str, e: std::io::Error) -> PyErr {
    PyOSError::new_err((e.raw_os_error().unwrap_or(0), format!("{what}: {e}")))
}

/// The running I/O engine. Created with the TUN device; `start` opens sockets and starts workers.
#[pyclass(module = "podrouter._native", frozen)]
struct Datapath {
    engine: Mutex<Option<Engine>>,
    tun_name: String,
    tun_ifindex: u32,
}

/// Refuses tables compiled against other start-time settings than the engine's `running` ones
/// (`EngineConfig::settings`: the NAT tables and the masquerade reply filters are sized from
/// them, live mappings hold ports of the range): `ValueError` naming the first config key that
/// differs. The daemon compiles its tables against its own engine config and keeps these keys at
/// their running value on a reload (reconcile.py `restart_only_changes`); a restart applies a
/// change.
fn check_settings(running: &EngineSettings, tables: &CoreTables) -> PyResult<()> {
    let new = tables.settings();
    let show = |a: Option<std::net::Ipv6Addr>| a.map_or("None".to_string(), |a| a.to_string());
    let (key, was, now) = if running.port_range != new.port_range {
        (
            "masquerade.port_range",
            format!("{:?}", running.port_range),
            format!("{:?}", new.port_range),
        )
    } else if running.address != new.address {
        (
            "node.address",
            running.address.to_string(),
            new.address.to_string(),
        )
    } else if running.address6 != new.address6 {
        ("node.address6", show(running.address6), show(new.address6))
    } else if running.masquerade_address6 != new.masquerade_address6 {
        (
            "masquerade.address6",
            show(running.masquerade_address6),
            show(new.masquerade_address6),
        )
    } else {
        return Ok(());
    };
    Err(bad(
        key,
        format!(
            "{now} differs from {was}, which the datapath started with; only a restart changes it"
        ),
    ))
}

impl Datapath {
    fn lock(&self) -> MutexGuard<'_, Option<Engine>> {
        // A panic while holding the lock (none is expected) must not make every later call panic.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl Datapath {
    #[new]
    fn new(py: Python<'_>, config: &Bound<'_, PyAny>) -> PyResult<Datapath> {
        let cfg = engine_config(config)?;
        let name = cfg.tun_name.clone();
        let e = py
            .allow_threads(|| Engine::new(cfg))
            .map_err(|e| os_err(&format!("creating TUN {name}"), e))?;
        Ok(Datapath {
            tun_name: e.tun().name().to_string(),
            tun_ifindex: e.tun().ifindex(),
            engine: Mutex::new(Some(e)),
        })
    }

    /// A datapath on the fds a running predecessor (or the fd keeper) passed (docs/handover.md)
    /// instead of a new TUN: `fds` is `{"tun": [fd per worker], "rx": [[fd, ...] per worker],
    /// "masq": fd or None, "masq6": fd or None}` ("masq6" may be absent).
    /// The fds are the caller's (duplicated here, so close yours afterwards) and untrusted: each
    /// is checked against `config` (and the rest at `start`); a mismatch raises `OSError`.
    #[staticmethod]
    fn adopt(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        fds: &Bound<'_, PyAny>,
    ) -> PyResult<Datapath> {
        let cfg = engine_config(config)?;
        let fds: spec::FdsIn = spec::from_py(fds, "fds")?;
        let dup = |key: &str, fd: i32| -> PyResult<std::os::fd::OwnedFd> {
            podrouter_io::handover::dup_fd(fd).map_err(|e| os_err(&format!("fds.{key}"), e))
        };
        let mut passed = AdoptFds::default();
        for fd in fds.tun.map(|l| l.0).unwrap_or_default() {
            passed.tun.push(dup("tun", fd.0)?);
        }
        for w in fds.rx.map(|l| l.0).unwrap_or_default() {
            passed.rx.push(
                w.0.into_iter()
                    .map(|fd| dup("rx", fd.0))
                    .collect::<PyResult<_>>()?,
            );
        }
        passed.masq = fds.masq.map(|fd| dup("masq", fd.0)).transpose()?;
        passed.masq6 = fds.masq6.map(|fd| dup("masq6", fd.0)).transpose()?;
        let n = passed.tun.len()
            + passed.rx.iter().map(Vec::len).sum::<usize>()
            + usize::from(passed.masq.is_some())
            + usize::from(passed.masq6.is_some());
        if n > podrouter_io::handover::MAX_FDS {
            return Err(bad(
                "fds",
                format!("{n} fds is more than a handover carries"),
            ));
        }
        let e = py
            .allow_threads(|| Engine::adopt(cfg, passed))
            .map_err(|e| os_err("adopting the passed fds", e))?;
        Ok(Datapath {
            tun_name: e.tun().name().to_string(),
            tun_ifindex: e.tun().ifindex(),
            engine: Mutex::new(Some(e)),
        })
    }

    /// Handover, old side: stops the workers at a batch boundary, keeping every fd open.
    fn quiesce(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| {
            let mut g = self.lock();
            let e = g
                .as_mut()
                .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
            e.quiesce().map_err(|e| os_err("quiescing the datapath", e))
        })
    }

    /// Restarts the workers `quiesce` stopped, on the same fds.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| {
            let mut g = self.lock();
            let e = g
                .as_mut()
                .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
            e.resume().map_err(|e| os_err("resuming the datapath", e))
        })
    }

    /// While quiesced: `{"tun": [fd...], "rx": [[fd...]...], "masq": fd or None, "masq6": fd or
    /// None}`, the fds to pass (they stay the datapath's: send copies, close nothing).
    fn handover_fds<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let roles = py
            .allow_threads(|| self.lock().as_ref().map(Engine::handover_fds))
            .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?
            .map_err(|e| os_err("handover", e))?;
        fds_by_role(py, roles)
    }

    /// The fd keeper's set (docs/handover.md), the same shape as `handover_fds`: copies of the
    /// fds packets arrive on, made by the last `start`. The caller owns them (close them once
    /// passed); empty lists after the first call until the next `start`.
    fn keeper_fds<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let owned = py
            .allow_threads(|| self.lock().as_mut().map(Engine::take_keeper_fds))
            .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
        let roles = owned
            .into_iter()
            .map(|(role, fd)| (role, std::os::fd::IntoRawFd::into_raw_fd(fd)))
            .collect();
        fds_by_role(py, roles)
    }

    #[getter]
    fn tun_name(&self) -> &str {
        &self.tun_name
    }

    #[getter]
    fn tun_ifindex(&self) -> u32 {
        self.tun_ifindex
    }

    fn start(&self, py: Python<'_>, tables: &Tables) -> PyResult<()> {
        let t = Arc::clone(&tables.inner);
        py.allow_threads(|| {
            let mut g = self.lock();
            let e = g
                .as_mut()
                .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
            check_settings(&e.config().settings(), &t)?;
            e.start(t).map_err(|e| os_err("starting the datapath", e))?;
            Ok(())
        })
    }

    /// Refused (`ValueError` naming the key) when the tables were compiled against other
    /// start-time settings than the engine's ([`check_settings`]).
    fn swap_tables(&self, py: Python<'_>, tables: &Tables) -> PyResult<()> {
        let t = Arc::clone(&tables.inner);
        py.allow_threads(|| {
            let g = self.lock();
            let e = g
                .as_ref()
                .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
            check_settings(&e.config().settings(), &t)?;
            e.swap_tables(t);
            Ok(())
        })
    }

    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (snap, off, gen, workers, nat, pressure) = py
            .allow_threads(|| {
                let g = self.lock();
                g.as_ref().map(|e| {
                    let gen = e.tables().map_or(0, |t| t.generation());
                    (
                        e.counters(),
                        e.offload().clone(),
                        gen,
                        e.config().workers,
                        e.nat_entries(),
                        e.nat_pressure(NAT_POD_LIMIT_TOP),
                    )
                })
            })
            .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
        let packets = PyDict::new(py);
        let bytes = PyDict::new(py);
        for p in Path::ALL {
            for (di, dir) in [Dir::Egress, Dir::Ingress].into_iter().enumerate() {
                let key = format!("{}/{}", p.as_str(), DIRECTIONS[di]);
                let (n, b) = snap.get(p, dir);
                packets.set_item(&key, n)?;
                bytes.set_item(&key, b)?;
            }
        }
        let drops = PyDict::new(py);
        for (name, n) in drop_reason_names().into_iter().zip(&snap.drops) {
            drops.set_item(name, *n)?;
        }
        let offload = PyDict::new(py);
        let f = off.tun_flags;
        let names = [
            (1, "csum"),
            (2, "tso4"),
            (4, "tso6"),
            (8, "tso_ecn"),
            (0x20, "uso4"),
            (0x40, "uso6"),
        ];
        let flags: Vec<&str> = names
            .iter()
            .filter(|(b, _)| f & b != 0)
            .map(|(_, n)| *n)
            .collect();
        offload.set_item("tun", PyList::new(py, flags)?)?;
        offload.set_item("udp_gso", off.udp_gso)?;
        offload.set_item("udp_gro", off.udp_gro)?;
        offload.set_item("packet_vnet_hdr", off.packet_vnet_hdr)?;
        offload.set_item("tunnel_gso", off.tunnel_gso)?;
        offload.set_item("tunnel_gso_error", off.tunnel_gso_error.clone())?;
        for (name, v) in STATS.iter().zip(snap.stats) {
            offload.set_item(*name, v)?;
        }
        let d = PyDict::new(py);
        d.set_item("packets", packets)?;
        d.set_item("bytes", bytes)?;
        d.set_item("drops", drops)?;
        d.set_item("nat_entries", nat)?;
        d.set_item(
            "nat_alloc_failures",
            snap.drops[DropReason::NatExhausted.index()],
        )?;
        d.set_item("nat_evictions", pressure.evictions)?;
        let pods = PyDict::new(py);
        for (ip, n) in &pressure.pod_limit_drops {
            pods.set_item(ip.to_string(), *n)?;
        }
        d.set_item("nat_pod_limit_drops", pods)?;
        d.set_item("nat_pod_limit_drops_other", pressure.pod_limit_other)?;
        // Geneve options received, by class and type (bounded: the rest in `..._other`)
        let opts = PyList::empty(py);
        for (class, opt_type, n) in &snap.geneve_options {
            let o = PyDict::new(py);
            o.set_item("class", *class)?;
            o.set_item("type", *opt_type)?;
            o.set_item("critical", opt_type & 0x80 != 0)?;
            o.set_item("count", *n)?;
            opts.append(o)?;
        }
        d.set_item("geneve_options", opts)?;
        d.set_item("geneve_options_other", snap.geneve_options_other)?;
        d.set_item("table_generation", gen)?;
        d.set_item("workers", workers)?;
        d.set_item("offload", offload)?;
        Ok(d)
    }

    /// Turns the monitor's event ring on: drops, and with `flows` one forwarded packet in `sample`,
    /// at most `rate` events a second. Events older than this call are not read.
    #[pyo3(signature = (flows=false, sample=100, rate=1000))]
    fn monitor_start(&self, py: Python<'_>, flows: bool, sample: u64, rate: u32) -> PyResult<()> {
        py.allow_threads(|| {
            let g = self.lock();
            let e = g
                .as_ref()
                .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
            e.events().enable(flows, sample, rate);
            Ok(())
        })
    }

    /// Turns the event ring off: drop points go back to one flag check. Idempotent.
    fn monitor_stop(&self, py: Python<'_>) {
        py.allow_threads(|| {
            if let Some(e) = self.lock().as_ref() {
                e.events().disable();
            }
        });
    }

    /// Up to `max` events from the ring, oldest first: dicts with kind (drop/flow), reason, path,
    /// direction, family, proto, src, dst, sport, dport, len, outer (the tunnel sender) and time.
    #[pyo3(signature = (max=1024))]
    fn monitor_events<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Bound<'py, PyList>> {
        let events = py.allow_threads(|| {
            let g = self.lock();
            let mut out = Vec::new();
            if let Some(e) = g.as_ref() {
                e.events().drain(max.min(65536), &mut out);
            }
            out
        });
        let names = drop_reason_names();
        let list = PyList::empty(py);
        for ev in events {
            list.append(event_dict(py, &ev, &names)?)?;
        }
        Ok(list)
    }

    /// `{"suppressed": n, "lost": n}` since the ring was turned on.
    fn monitor_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = py.allow_threads(|| self.lock().as_ref().map(|e| e.events().stats()));
        let d = PyDict::new(py);
        let st = st.unwrap_or_default();
        d.set_item("suppressed", st.suppressed)?;
        d.set_item("lost", st.lost)?;
        Ok(d)
    }

    /// Keeps the NAT table in the snapshot file `path` (`None`: memory only). Before `start`:
    /// the first start restores the file, a writer thread rewrites it (at most every 0.5 s,
    /// write + rename) and `stop` writes it once more.
    #[pyo3(signature = (path))]
    fn set_nat_snapshot(&self, py: Python<'_>, path: Option<std::path::PathBuf>) -> PyResult<()> {
        py.allow_threads(|| {
            let mut g = self.lock();
            let e = g
                .as_mut()
                .ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
            e.set_nat_snapshot(path);
            Ok(())
        })
    }

    /// What loading and writing the NAT snapshot did: `path`, `loaded` (None, or a dict of
    /// `restored`, `expired`, `rejected` and the rejection reasons), `load_error` (None or the
    /// reason the whole file was refused), `writes`, `write_errors`, `last_write_error`,
    /// `last_entries`, `last_bytes`, `last_write_us`, `last_lock_us`.
    fn nat_snapshot_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = py.allow_threads(|| self.lock().as_ref().map(Engine::nat_snapshot_stats));
        let st = st.ok_or_else(|| PyRuntimeError::new_err("the datapath is closed"))?;
        let d = PyDict::new(py);
        d.set_item("path", st.path.to_string_lossy().into_owned())?;
        match &st.loaded {
            None => d.set_item("loaded", py.None())?,
            Some(r) => {
                let l = PyDict::new(py);
                l.set_item("restored", r.restored)?;
                l.set_item("expired", r.expired)?;
                l.set_item("rejected", r.rejected())?;
                l.set_item("outside_cidrs", r.outside_cidrs)?;
                l.set_item("port_range", r.port_range)?;
                l.set_item("duplicate", r.duplicate)?;
                l.set_item("invalid", r.invalid)?;
                l.set_item("full", r.full)?;
                d.set_item("loaded", l)?;
            }
        }
        d.set_item("load_error", st.load_error.clone())?;
        d.set_item("writes", st.writes)?;
        d.set_item("write_errors", st.write_errors)?;
        d.set_item("last_write_error", st.last_write_error.clone())?;
        d.set_item("last_entries", st.last_entries)?;
        d.set_item("last_bytes", st.last_bytes)?;
        d.set_item("last_write_us", st.last_write_us)?;
        d.set_item("last_lock_us", st.last_lock_us)?;
        Ok(d)
    }

    /// Stops the workers and closes the sockets; the TUN device stays (see `close`). Idempotent.
    fn stop(&self, py: Python<'_>) {
        py.allow_threads(|| {
            if let Some(e) = self.lock().as_mut() {
                e.stop();
            }
        });
    }

    /// Stops and closes the TUN device (the kernel deletes it). Idempotent.
    fn close(&self, py: Python<'_>) {
        py.allow_threads(|| drop(self.lock().take()));
    }

    fn is_running(&self, py: Python<'_>) -> bool {
        py.allow_threads(|| self.lock().as_ref().is_some_and(Engine::is_running))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Datapath(tun={:?}, running={})",
            self.tun_name,
            self.is_running(py)
        )
    }
}

fn event_dict<'py>(py: Python<'py>, ev: &Event, names: &[&str]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let addr = |b: &[u8; 16]| -> Option<String> {
        match ev.family {
            4 => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
            6 => Some(std::net::Ipv6Addr::from(*b).to_string()),
            _ => None,
        }
    };
    d.set_item(
        "kind",
        if ev.kind == Kind::Flow {
            "flow"
        } else {
            "drop"
        },
    )?;
    let reason = (ev.kind == Kind::Drop).then(|| names.get(usize::from(ev.reason)).copied());
    d.set_item("reason", reason.flatten())?;
    d.set_item("path", ev.path.map(|p| p.as_str()))?;
    let dir = if ev.dir == Direction::Ingress {
        "ingress"
    } else {
        "egress"
    };
    d.set_item("direction", dir)?;
    d.set_item("family", (ev.family != 0).then_some(ev.family))?;
    let proto = match ev.proto {
        _ if ev.family == 0 => None,
        1 => Some("icmp".to_string()),
        6 => Some("tcp".to_string()),
        17 => Some("udp".to_string()),
        58 => Some("icmpv6".to_string()),
        132 => Some("sctp".to_string()),
        n => Some(n.to_string()),
    };
    d.set_item("proto", proto)?;
    d.set_item("src", addr(&ev.src))?;
    d.set_item("dst", addr(&ev.dst))?;
    d.set_item("sport", ev.sport)?;
    d.set_item("dport", ev.dport)?;
    d.set_item("len", ev.len)?;
    d.set_item("outer", ev.outer.map(|(a, p)| format!("{a}:{p}")))?;
    d.set_item("time", ev.time_ns as f64 / 1e9)?;
    Ok(d)
}

// ------------------------------------------------------------------------------------ module

#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The synthesized VTEP MAC of a node with underlay address `address`
/// (core `encap::vxlan_inner_mac`): the one rule the control plane shows and configures peers with.
#[pyfunction]
fn vtep_mac(address: &str) -> PyResult<String> {
    let ip: IpAddr = address
        .parse()
        .map_err(|_| PyValueError::new_err(format!("{address:?} is not an IP address")))?;
    Ok(format_mac(&podrouter_core::vxlan_inner_mac(ip)))
}

/// Every problem the core's rulebook finds in `spec` compiled against `settings`
/// (`Tables(spec, settings)` raises for the first): a list of `(key path, message)` in spec
/// terms, e.g. `("peers[1].pod_cidrs[0]", "'10.244.1.0/25' overlaps node's pod CIDR
/// '10.244.1.0/24'")`; empty when the tables compile. A spec or settings dict of the wrong shape
/// still raises `ValueError("<key path>: <problem>")`.
#[pyfunction]
fn check_tables(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    settings: &Bound<'_, PyAny>,
) -> PyResult<Vec<(String, String)>> {
    let spec = table_spec(spec)?;
    let settings = engine_settings(settings)?;
    let problems = py.allow_threads(|| CoreTables::check(&spec, &settings));
    Ok(problems.into_iter().map(|e| (e.path, e.message)).collect())
}

/// [`check_tables`] with each problem's structure, for callers that word problems in their own
/// terms (etcd discovery names registrations, not spec keys): a list of `(code, key path, other
/// key path or None, values, message)`, e.g. `("pod_cidr_overlap", "peers[1].pod_cidrs[0]",
/// "node.pod_cidrs[0]", ["10.244.1.0/25", "10.244.1.0/24"], "...")`. The codes:
/// docs/architecture.md, "One rulebook".
#[pyfunction]
#[allow(clippy::type_complexity)]
fn check_problems(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    settings: &Bound<'_, PyAny>,
) -> PyResult<Vec<(&'static str, String, Option<String>, Vec<String>, String)>> {
    let spec = table_spec(spec)?;
    let settings = engine_settings(settings)?;
    let problems = py.allow_threads(|| CoreTables::check(&spec, &settings));
    Ok(problems
        .into_iter()
        .map(|e| (e.code, e.path, e.other, e.values, e.message))
        .collect())
}

/// The rulebook with precedence, for admitting untrusted records (core `rules::admit`): the
/// peers from index `first` on are admitted in spec order, each against the node, the peers
/// before `first` (which always win) and those admitted before it; the problems of each refused
/// peer, as [`check_problems`]' tuples. Rules (codes) named in `skip` are not applied.
#[pyfunction]
#[pyo3(signature = (spec, settings, first, skip = Vec::new()))]
#[allow(clippy::type_complexity)]
fn admit_problems(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    settings: &Bound<'_, PyAny>,
    first: usize,
    skip: Vec<String>,
) -> PyResult<Vec<(&'static str, String, Option<String>, Vec<String>, String)>> {
    let spec = table_spec(spec)?;
    let settings = engine_settings(settings)?;
    let problems = py.allow_threads(|| {
        let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
        podrouter_core::rules::admit(&spec, &settings, first, &skip)
    });
    Ok(problems
        .into_iter()
        .map(|e| (e.code, e.path, e.other, e.values, e.message))
        .collect())
}

/// `masquerade.max_entries_per_pod` when only `masquerade.max_entries` is set.
#[pyfunction]
fn default_max_entries_per_pod(max_entries: usize) -> usize {
    NatConfig::default_per_pod(max_entries)
}

/// The defaults and limits the core decides and the control plane must agree with
/// (docs/architecture.md, "Constants"): tunnel ports, the VNI width, the masquerade defaults, the
/// metrics' path labels.
fn register_constants(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("VXLAN_PORT", TunnelProto::Vxlan.default_port())?;
    m.add("GENEVE_PORT", TunnelProto::Geneve.default_port())?;
    m.add("MAX_VNI", podrouter_core::wire::vxlan::MAX_VNI)?;
    m.add(
        "MASQUERADE_PORT_RANGE",
        podrouter_core::nat::DEFAULT_PORT_RANGE,
    )?;
    m.add("NAT_DEFAULT_MAX_ENTRIES", NatConfig::default().max_entries)?;
    m.add("NAT_MAX_ENTRIES", podrouter_io::worker::MAX_NAT_ENTRIES)?;
    let timeouts = PyDict::new(m.py());
    for (key, seconds) in NatConfig::default().timeouts() {
        timeouts.set_item(key, seconds)?;
    }
    m.add("NAT_DEFAULT_TIMEOUTS", timeouts)?;
    // the `path` label values of podrouter_packets_total, in the core's order
    m.add("PATHS", PyTuple::new(m.py(), Path::ALL.map(Path::as_str))?)?;
    m.add_function(wrap_pyfunction!(vtep_mac, m)?)?;
    m.add_function(wrap_pyfunction!(check_tables, m)?)?;
    m.add_function(wrap_pyfunction!(check_problems, m)?)?;
    m.add_function(wrap_pyfunction!(admit_problems, m)?)?;
    m.add_function(wrap_pyfunction!(default_max_entries_per_pod, m)?)?;
    Ok(())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    // the outer UDP source ports podrouter's tunnel senders use (docs/architecture.md): the
    // masquerade range must stay outside them, since peers drop tunnel datagrams from it
    m.add(
        "TUNNEL_SOURCE_PORT_MIN",
        podrouter_core::encap::SOURCE_PORT_MIN,
    )?;
    m.add(
        "TUNNEL_SOURCE_PORT_MAX",
        podrouter_core::encap::SOURCE_PORT_MAX,
    )?;
    register_constants(m)?;
    m.add_class::<Tables>()?;
    m.add_class::<Datapath>()?;
    wire::register(m)?;
    blast::register(m)?;
    Ok(())
}
